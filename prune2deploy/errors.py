"""One exception hierarchy for every failure a user can act on.

The CLI turns each class into a message and an exit code; the library never prints. Every message says
what went wrong, where (file, tensor, node) and what to do.
"""

from __future__ import annotations

__all__ = [
    "BadInputError",
    "ConfigError",
    "EngineBuildError",
    "EngineUnavailable",
    "MaskError",
    "OutputExistsError",
    "P2DError",
    "UnsupportedModelError",
    "VerificationError",
]


class P2DError(Exception):
    """Base of every user-facing error. ``exit_code`` is what the CLI returns."""

    exit_code = 2


class BadInputError(P2DError):
    """An input file is missing, corrupt or of the wrong kind."""


class ConfigError(P2DError):
    """A config file or option is invalid."""


class MaskError(BadInputError):
    """A mask names a parameter that does not exist, has the wrong shape, or is not 0/1."""


class OutputExistsError(P2DError):
    """The output folder exists and the user did not ask to overwrite it."""


class UnsupportedModelError(P2DError):
    """The model cannot be exported or analysed (the message says which part and why)."""


class EngineUnavailable(P2DError):
    """An optional engine (TensorRT, a GPU) is not installed or not present on this machine."""


class EngineBuildError(P2DError):
    """An engine failed to build; the message carries the engine's own log lines."""


class VerificationError(P2DError):
    """The compiled model does not match the reference within the tolerance of an exact pipeline."""

    exit_code = 1
