"""Atomic output and safe input handling: inputs are never modified, outputs never half-written."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from prune2deploy.errors import BadInputError, ConfigError, P2DError
from prune2deploy.limits import CONFIG_BYTES, check_regular_file

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_not_input",
    "dumps_json",
    "json_safe",
    "read_config_file",
    "sha256_file",
    "sha256_files",
]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temp file in the same folder and renames it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # a full disk: a write error names no file, so name the one being written
        Path(tmp).unlink(missing_ok=True)
        if exc.filename in (None, tmp):
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_not_input(out_dir: Path | str, inputs: Any, *, flag: str = "--out") -> None:
    """Refuses an output that is, contains or lies inside an input: ``--overwrite`` would destroy it.

    Every command that writes runs its output folder through this (compile, prune, sweep; the export cache
    with ``flag="--export-cache-dir"``), so none writes into what it reads. ``inputs`` may hold None.
    """
    target = Path(os.path.abspath(out_dir)).resolve()
    for given in inputs:
        if given is None:
            continue
        path = Path(os.path.abspath(given)).resolve()
        if target == path or path.is_relative_to(target) or target.is_relative_to(path):
            how = "is" if target == path else ("contains" if path.is_relative_to(target) else "lies inside")
            raise BadInputError(
                f"{flag} {out_dir} {how} the input {given}; writing there would overwrite or corrupt the input. "
                f"Choose a {flag} folder outside every input (model, masks, plan, feeds, config)."
            )


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float as None: JSON has no NaN or Infinity, and readers reject them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """Strict JSON (non-finite floats become null; ``allow_nan=False`` guarantees none slips through)."""
    return json.dumps(json_safe(obj), allow_nan=False, default=str, **kwargs)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, dumps_json(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file or, for a folder, of its files' names and contents in sorted order."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return sha256_files(files, root=path if path.is_dir() else None, chunk=chunk)


def sha256_files(files: list[Path], *, root: Path | None = None, chunk: int = 1 << 20) -> str:
    """Hex sha256 of ``files`` in the given order; with ``root``, each file's path below it is hashed too
    (a renamed file is a different folder)."""
    digest = hashlib.sha256()
    for file in files:
        if root is not None:
            digest.update(str(Path(file).relative_to(root)).encode())
        with open(file, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()


_FORMATS = {".yaml": "YAML", ".yml": "YAML", ".toml": "TOML", ".json": "JSON"}


def read_config_file(
    path: Path | str,
    *,
    what: str = "config",
    max_bytes: int = CONFIG_BYTES,
    default_format: str | None = None,
    error: type[P2DError] = ConfigError,
) -> Any:
    """Reads a YAML, TOML or JSON file that a user hands in; the format comes from the suffix.

    Every file a user gives (config, sweep, plan, model config) is read here, so that none of them skips
    a check. Refused with ``error`` (exit code 2), naming the file: a missing file, one over ``max_bytes``,
    bytes that are not UTF-8, YAML anchors and aliases (a 600-byte alias bomb expands to gigabytes), an
    unknown suffix (read as ``default_format``, "YAML", "TOML" or "JSON", when given) and text that does
    not parse. An empty YAML file is ``{}``; the caller checks the shape of what it got.

    Args:
        what: the kind of file, for the messages ("config", "sweep", "plan").
    """
    path = Path(path)
    if not path.exists():
        raise error(f"{what} file {path} does not exist")
    size = check_regular_file(path, what=f"{what} file").st_size  # a FIFO would block the read forever
    if size > max_bytes:
        raise error(f"{path}: {size} bytes; {what} files are at most {max_bytes} bytes")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    kind = _FORMATS.get(path.suffix, default_format)
    if kind is None:
        raise error(f"{path}: {what} files are .yaml, .toml or .json")
    try:
        if kind == "YAML":
            import yaml

            data = yaml.load(text, Loader=_yaml_loader(what))  # a SafeLoader subclass
            return {} if data is None else data
        if kind == "TOML":
            import tomllib

            return tomllib.loads(text)
        return json.loads(text)
    except _RefusedYAML as exc:
        raise error(f"{path}: {exc}") from None
    except Exception as exc:
        raise error(f"{path}: cannot parse (not valid {kind}: {str(exc)[:300]})") from None


class _RefusedYAML(Exception):
    """YAML that parses but is refused (anchors, aliases); the reader re-raises it with the file's name."""


def _yaml_loader(what: str):
    import yaml

    class _NoAliasLoader(yaml.SafeLoader):
        """SafeLoader without anchors and aliases: a 600-byte alias bomb expands to gigabytes."""

        def compose_node(self, parent, index):  # type: ignore[override]
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                mark = event.start_mark
                raise _RefusedYAML(
                    f"line {mark.line + 1}: YAML anchors and aliases (&name / *name) are not allowed in {what} "
                    "files; write each value out"
                )
            return super().compose_node(parent, index)

    return _NoAliasLoader
