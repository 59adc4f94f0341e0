"""The output folder: built in a staging folder beside the target and renamed into place at the end.

So a compile's output is complete or absent, never half-written, and never written over an input:

- the target may not be, contain or lie inside any input (model, masks, plan, feeds, config);
- ``--overwrite`` replaces only an earlier output of this tool: a folder whose ``manifest.json`` was written
  by prune2deploy and lists every file in it (besides the writers' folders, genai/ and hf/). A file, a
  symbolic link, a code checkout or a folder with anything else is refused and left as it is;
- a lock file beside the target (``.NAME.p2d-lock``, ``fcntl.flock``) makes a second compile to the same
  folder fail at once instead of racing the first;
- the "does it exist" check is repeated at the final rename (``rename(2)`` refuses a non-empty folder or a
  file), so an output that appeared while compiling is never replaced without ``--overwrite``;
- staging folders carry the PID of their writer (``.NAME.p2d-PID-XXXX``): those of a process that no longer
  runs (SIGKILL, power loss) are removed by the next compile to the same target;
- the finished folder and its files follow the user's umask, like any file they write.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from prune2deploy.errors import BadInputError, OutputExistsError
from prune2deploy.io import check_not_input  # the guard of every command that writes; lives low for prune

__all__ = ["OutputFolder", "apply_umask", "check_not_input", "foreign_contents", "umask"]

_TAG = "p2d"


def umask() -> int:
    """The process umask (read without changing it for longer than two syscalls)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Gives ``root`` and everything under it the modes a plain ``open``/``mkdir`` would have had.

    ``mkdtemp``/``mkstemp`` create 0700/0600 entries; an export step's artifacts should be as readable as
    any other file the user writes.
    """
    mask = umask()
    root = Path(root)
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o100
                os.chmod(path, (0o777 if executable else 0o666) & ~mask)


#: The most bytes of a manifest.json read to decide whether a folder is an output of this tool.
_MANIFEST_MAX_BYTES = 64 << 20


def foreign_contents(out: Path) -> str | None:
    """What at ``out`` this tool did not write (a phrase for a message), or None when ``--overwrite`` may replace it.

    Replaceable: nothing, an empty folder, or an output folder of a compile: its ``manifest.json`` says
    ``tool.name == "prune2deploy"`` and lists in ``outputs`` every file beside it; the only folders allowed
    are the output writers' (genai/, hf/), the engine build's (engine/) and those the manifest lists files of
    (inputs/). The content is read, not only the name: a user's folder that
    happens to hold a file called manifest.json is not replaced.
    """
    import json

    out = Path(out)
    if out.is_symlink():
        return f"a symbolic link (to {os.readlink(out)})"
    if not out.exists():
        return None
    if not out.is_dir():
        return "a file"
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return None
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    manifest = out / "manifest.json"
    if not manifest.is_file() or manifest.is_symlink():
        return f"a folder without a prune2deploy manifest.json (it holds {shown})"
    try:
        with open(manifest, "rb") as handle:
            data = handle.read(_MANIFEST_MAX_BYTES + 1)
        record = json.loads(data) if len(data) <= _MANIFEST_MAX_BYTES else None
    except (OSError, ValueError):
        record = None
    tool = record.get("tool") if isinstance(record, dict) else None
    listed = record.get("outputs") if isinstance(record, dict) else None
    if not isinstance(tool, dict) or tool.get("name") != "prune2deploy" or not isinstance(listed, dict):
        return f"a folder whose manifest.json was not written by prune2deploy (it holds {shown})"
    from prune2deploy.outputs.registry import load_writers

    # The output writers' folders, the engine build's, and folders whose files the manifest lists (inputs/).
    folders = {spec.folder for spec in load_writers().values()} | {"engine"}
    folders |= {Path(name).parts[0] for name in listed if len(Path(name).parts) > 1}
    others = [
        name
        for name in names
        if not (
            (name == "manifest.json" or name in listed) and (out / name).is_file() and not (out / name).is_symlink()
        )
        and not (name in folders and (out / name).is_dir() and not (out / name).is_symlink())
    ]
    if others:
        extra = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        return f"a prune2deploy output folder with files it did not write: {extra}"
    return None


def _refuse_foreign(out: Path, what: str, *, when: str = "") -> OutputExistsError:
    return OutputExistsError(
        f"--out {out} is {what}{when}; --overwrite replaces only an output folder of prune2deploy (one whose "
        "manifest.json lists what is in it), so it was left as it is. Choose another --out, or move it away yourself"
    )


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


class OutputFolder:
    """The staging folder of one compile and the lock on its target; :meth:`finish` or :meth:`abort` it."""

    def __init__(self, out_dir: Path | str, *, overwrite: bool, inputs: Iterable[Path | str | None] = ()) -> None:
        self.out_dir = Path(os.path.abspath(out_dir))  # `--out .` has a name and a parent
        self.overwrite = overwrite
        check_not_input(self.out_dir, inputs)
        if self._taken() and not overwrite:
            raise OutputExistsError(
                f"output folder {self.out_dir} exists and is not empty; choose another --out or pass --overwrite"
            )
        if self._taken() and (what := foreign_contents(self.out_dir)):
            raise _refuse_foreign(self.out_dir, what)
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadInputError(f"cannot create the folder of --out {self.out_dir}: {exc.strerror}") from exc
        self._lock_fd: int | None = None
        self._lock_path = self.out_dir.parent / f".{self.out_dir.name}.{_TAG}-lock"
        self._lock()
        self.remove_stale()
        try:
            self.staging = Path(
                tempfile.mkdtemp(prefix=f".{self.out_dir.name}.{_TAG}-{os.getpid()}-", dir=self.out_dir.parent)
            )
        except OSError as exc:
            self._unlock()
            raise BadInputError(f"cannot write next to --out {self.out_dir}: {exc.strerror}") from exc

    def _taken(self) -> bool:
        out = self.out_dir
        return out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir())))

    def _lock(self) -> None:
        while True:
            try:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
            except OSError as exc:
                raise BadInputError(f"cannot write next to --out {self.out_dir}: {exc.strerror}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputExistsError(
                    f"another prune2deploy compile (pid {holder}) is writing {self.out_dir}; wait for it to finish "
                    "or choose another --out"
                ) from None
            # The holder before us may have unlinked the file it locked: then lock the new one.
            try:
                same = os.stat(self._lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                self._lock_fd = fd
                return
            os.close(fd)

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        self._lock_path.unlink(missing_ok=True)  # while still holding it: see _lock
        os.close(self._lock_fd)
        self._lock_fd = None

    def remove_stale(self) -> list[Path]:
        """Staging and backup folders of earlier compiles to this target whose process no longer runs."""
        pattern = re.compile(rf"^\.{re.escape(self.out_dir.name)}\.(?:old\.)?{_TAG}-(\d+)-")
        removed = []
        for entry in self.out_dir.parent.iterdir():
            match = pattern.match(entry.name)
            if match and not _pid_alive(int(match.group(1))):
                _remove(entry)
                removed.append(entry)
        return removed

    def finish(self) -> None:
        """Renames the staging folder onto the target, checking again that it may replace what is there."""
        try:
            apply_umask(self.staging)
            out = self.out_dir
            if self.overwrite and (out.exists() or out.is_symlink()):
                if what := foreign_contents(out):  # changed since the check at the start
                    raise _refuse_foreign(out, what, when=" (it changed while compiling)")
                backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.{_TAG}-{os.getpid()}-", dir=out.parent))
                backup.rmdir()
                os.rename(out, backup)
                os.rename(self.staging, out)
                _remove(backup)
                return
            try:
                os.rename(self.staging, out)  # replaces an empty folder only
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise OutputExistsError(
                        f"{out} appeared while compiling (created by someone else); it was left as it is. "
                        "Choose another --out or pass --overwrite"
                    ) from None
                raise
        finally:
            self.abort()

    def abort(self) -> None:
        """Removes the staging folder (if still there) and releases the lock."""
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        self._unlock()
