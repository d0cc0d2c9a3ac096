"""Files balspec writes: modes under the user's umask, partial paths renamed into place, stale partials.

A converted model, an export or a checkpoint file is written under a sibling name `<name>.partial-<pid>`
(`.<name>.partial-<pid>` where a user lists the directory) and renamed into place, so nothing is ever
half-written. A killed process leaves its partial behind; the next run that writes the same target removes
it once no process with that id is alive. safetensors (and mkstemp) create files 0600: what balspec writes
is given the modes the user's umask gives any other tool.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

WRITE_ERRORS = (OSError, SafetensorError)  # safetensors reports a full disk in its own type


def current_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give `path` (a file, or a directory and everything in it) the modes a new file or directory gets."""
    mask = current_umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def partial_path(target: Path, hidden: bool = False) -> Path:
    """Where this process writes `target` before renaming it into place."""
    return target.with_name(f"{'.' if hidden else ''}{target.name}.partial-{os.getpid()}")


def remove_stale_partials(target: Path, hidden: bool = False, marker: str | None = None) -> list[Path]:
    """Delete the partials of `target` that killed processes left: only paths named as `partial_path` names
    them, whose process is gone, and (with `marker`) only directories holding that file, or empty ones.
    Returns what it removed."""
    pattern = re.compile(re.escape(f"{'.' if hidden else ''}{target.name}.partial-") + r"(\d{1,9})")
    if not target.parent.is_dir():
        return []
    removed = []
    for p in target.parent.iterdir():
        match = pattern.fullmatch(p.name)
        if match is None or p.is_symlink() or _alive(int(match[1])):
            continue
        if p.is_dir() and (marker is None or (p / marker).is_file() or not any(p.iterdir())):
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and marker is None:
            p.unlink(missing_ok=True)
        else:
            continue
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    return True


def check_output_file(path: str | Path, flag: str) -> None:
    """Refuse, before any work, an output file that cannot be written: its folder missing, a folder in its
    place, or no write permission. (A disk that fills up later is reported when the write fails.)"""
    from balspec.errors import BalspecError

    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise BalspecError(f"{flag}: {path} is a directory; give a file name")
    if not folder.is_dir():
        raise BalspecError(f"{flag}: the directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise BalspecError(f"{flag}: {path} is not writable")


def check_output_dir(path: str | Path, flag: str) -> None:
    """Refuse, before any work, an output directory that cannot be created or written: a file in its place or
    on its way, or a folder without write permission."""
    from balspec.errors import BalspecError

    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise BalspecError(f"{flag}: {path} cannot be a directory: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BalspecError(f"{flag}: {existing} is not writable")


def failed_write(error: Exception) -> str:
    """Why a write failed, in a few words ("No space left on device"), from an OSError or a SafetensorError."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    match = re.search(r"I/O error: (.+?) \(os error \d+\)", str(error))
    return match[1] if match else str(error).splitlines()[0]


@contextmanager
def writing(what: str):
    """A write that fails after the work (a full disk, a read-only filesystem) as one line: `what (why)`."""
    from balspec.errors import BalspecError

    try:
        yield
    except WRITE_ERRORS as e:
        raise BalspecError(f"{what} ({failed_write(e)})") from None
