"""The output folder: built in a staging folder beside the target and renamed into place at the end.

So a compile's output is complete or absent, never half-written.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from prune2deploy.errors import OutputExistsError

__all__ = ["finish_out_dir", "prepare_out_dir"]


def prepare_out_dir(out_dir: Path, overwrite: bool) -> Path:
    """Checks the target and returns a fresh staging folder next to it."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise OutputExistsError(
            f"output folder {out_dir} exists and is not empty; choose another --out or pass --overwrite"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))


def finish_out_dir(staging: Path, out_dir: Path) -> None:
    """Renames the staging folder onto the target (replacing an old output only when asked to)."""
    if out_dir.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        backup.rmdir()
        out_dir.rename(backup)
        staging.rename(out_dir)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        staging.rename(out_dir)
