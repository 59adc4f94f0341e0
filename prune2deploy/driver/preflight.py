"""What the compile checks and settles before it loads anything: the plan's options, GPUs, the engine, inputs."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from prune2deploy.errors import BadInputError, P2DError

__all__ = ["bound_mask_file", "check_before_loading", "input_paths", "resolve_plan"]


def check_before_loading(options: Any, source: Any = None) -> None:
    """What can be checked without the model, checked before the minutes of loading and exporting it:
    target GPU names, the engine's availability and that ``--baseline`` is the input's dense model."""
    from prune2deploy.profiling.roofline import load_catalog, resolve_gpus

    if options.gpus:
        resolve_gpus(options.gpus, load_catalog())
    if options.baseline:
        from prune2deploy.driver.baseline import check_baseline

        check_baseline(source, options)
    if options.engine != "onnxruntime":
        from prune2deploy.driver.engine import check_engine_available

        check_engine_available(options)


def input_paths(source: Any, options: Any) -> list[Path]:
    """Every file or folder this compile reads: the output may not be, contain or lie inside one."""
    paths: list[Path] = []
    if isinstance(source, (str, Path)):
        from prune2deploy.frontends.hf import BUNDLED_MODELS, bundled_model_path

        if str(source) in BUNDLED_MODELS:
            with contextlib.suppress(P2DError):  # a missing bundled package is reported by the loader
                paths.append(bundled_model_path(str(source)))
        else:
            paths.append(Path(source))
    paths += [p for p in (options.masks, options.plan) if p is not None]
    if options.baseline:
        from prune2deploy.driver.baseline import baseline_path

        with contextlib.suppress(P2DError):  # a missing baseline is reported by check_before_loading
            paths.append(baseline_path(options.baseline))
    paths += list(options.feeds)
    return paths


def bound_mask_file(plan_path: Path, masks: dict[str, Any]) -> Path:
    """The plan's mask file, inside the plan's folder and with the sha256 the plan records for it.

    The binding is the default, not an option: a plan without ``masks.sha256`` would accept any file put
    in place of its masks (``prune2deploy prune`` always writes the hash). Using a mask file the plan does
    not vouch for is said explicitly with ``--masks FILE``, which takes the file as it is.

    Raises:
        BadInputError: the path leaves the plan's folder (``..``, a symlink), the plan records no sha256,
            or the file's sha256 is not the recorded one.
    """
    from prune2deploy.io import sha256_file

    folder = plan_path.parent.resolve()
    path = plan_path.parent / masks["file"]
    if not path.resolve().is_relative_to(folder):
        raise BadInputError(
            f"{plan_path}: masks.file '{masks['file']}' resolves to {path.resolve()}, outside the plan's folder "
            f"{folder}; a plan's mask file lies beside it. Move the file there, or pass --masks FILE"
        )
    expected = masks.get("sha256")
    if not expected:
        raise BadInputError(
            f"{plan_path}: masks.file '{masks['file']}' has no masks.sha256, so any file in its place would be "
            "used (`prune2deploy prune` always records it). Add `sha256: <sha256sum of the file>` under masks:, "
            f"or pass --masks {path} to use the file as it is"
        )
    if path.is_file():  # a missing file is reported by the mask loader, with the flag to use
        found = sha256_file(path)
        if found != expected:
            raise BadInputError(
                f"{path}: sha256 {found[:12]}… is not the {str(expected)[:12]}… that the plan {plan_path} records "
                "for it; the mask file was replaced or edited after pruning. Re-run `prune2deploy prune`, or pass "
                "--masks explicitly to use this file anyway"
            )
    return path


def resolve_plan(options: Any) -> Any:
    """A plan brings its mask file (next to it), its depth plan and its hidden-channel plan.

    The plan's layer and hidden-channel lists are pass options: giving them switches their passes on.
    """
    if options.plan is None:
        return options
    from prune2deploy.pruning.plan import load_plan

    plan = load_plan(options.plan)
    changes: dict[str, Any] = {}
    if options.masks is None and plan.masks and plan.masks.get("file"):
        changes["masks"] = bound_mask_file(options.plan, plan.masks)
    if plan.dropped_layers:
        changes["drop_layers"] = list(plan.dropped_layers)
    if plan.hidden is not None and list(plan.hidden.removed):
        changes["drop_hidden"] = [int(c) for c in plan.hidden.removed]
    return options.replace(**changes) if changes else options
