"""One exception type for every user-facing failure: the CLI prints its message as one line and exits 1."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterable


class AstroptError(Exception):
    """A failure caused by the user's input or environment, with a message that says what to do."""


class Interrupted(AstroptError):
    """Ctrl-C (SIGINT) during a command that can say what was kept and how to go on: the CLI prints
    `interrupted: MESSAGE` and exits 130 (an AstroptError, not a KeyboardInterrupt, which typer itself turns
    into a silent exit code)."""


def first_line(exc: BaseException, limit: int | None = 200) -> str:
    """The first line of an exception's message (its type's name when it has none), cut to `limit` characters:
    what one `error:` line quotes of a cause from another library."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


def temporary_name(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A hidden temporary name beside `path`, unique to this process and call: `.NAME.tag-PID-RANDOM`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def ensure_folder(path: str | os.PathLike, what: str) -> Path:
    """Create folder `path` and its parents, or say in one AstroptError why it cannot be (`what` names it)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise AstroptError(f"{what} {folder} exists as a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AstroptError(f"cannot create {what} {folder}: {_WRITE_HINTS.get(exc.errno) or exc.strerror or exc}") from None
    return folder


_WRITE_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or choose another folder",
    errno.EDQUOT: "the disk quota is used up: free some space or choose another folder",
    errno.EFBIG: "the file is larger than the file system or this process's file-size limit (ulimit -f) allows",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EACCES: "permission denied: choose a folder you may write to, or fix its permissions",
    errno.EPERM: "not permitted: choose a folder you may write to, or fix its permissions",
}


def _io_errno(exc: BaseException) -> int | None:
    """The errno behind a failed write: an OSError's own, the one behind torch.save's RuntimeError (the file
    object's OSError it was raised while handling, or one in its message) or safetensors' (a SafetensorError,
    '... (os error 28)'); None if not an I/O failure."""
    if isinstance(exc, OSError):
        return exc.errno or -1
    if isinstance(exc, RuntimeError) and isinstance(exc.__context__, OSError):  # torch.save into a Python file
        return exc.__context__.errno or -1
    text = str(exc)
    found = re.search(r"Os \{ code: (\d+)|\(os error (\d+)\)", text)
    if found:
        return int(found.group(1) or found.group(2))
    lower = text.lower()
    if isinstance(exc, RuntimeError) and any(w in lower for w in ("file write failed", "no space", "too large",
                                                                  "unexpected pos", "pytorchstreamwriter")):
        return errno.ENOSPC if "no space" in lower else errno.EFBIG if "too large" in lower else -1
    return None


def write_failure(path: str | os.PathLike, exc: BaseException) -> AstroptError:
    """The one-line AstroptError for a failed write of `path`: what went wrong and what to do."""
    code = _io_errno(exc)
    reason = _WRITE_HINTS.get(code) or getattr(exc, "strerror", None) or \
        first_line(exc)
    return AstroptError(f"cannot write {path}: {reason}")


@contextlib.contextmanager
def writing(path: str | os.PathLike, cleanup: Iterable[str | os.PathLike] = ()):
    """Turn a failed write inside the block (an OSError, or torch's or safetensors' wrapping of one) into one
    AstroptError naming `path` and what to do, after deleting the temporary files or folders in `cleanup`."""
    try:
        yield
    except AstroptError:
        for tmp in cleanup:
            remove_quietly(tmp)
        raise
    except Exception as exc:
        if _io_errno(exc) is None:
            raise
        for tmp in cleanup:
            remove_quietly(tmp)
        raise write_failure(path, exc) from None


def remove_quietly(path: str | os.PathLike) -> None:
    """Delete a file or folder if it is there; never raises (for cleaning up after a failure)."""
    p = Path(path)
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    except OSError:
        pass
