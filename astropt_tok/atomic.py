"""Atomic writes: the one place a file or folder is written under a temporary name, fsynced, then renamed.

Readers (and a crash) see the old content or the new, never a mix, and a failed write (full disk, read-only
file system, no permission, file-size limit) is one AstroptError naming the file, leaves no temporary behind
and leaves the file it would have replaced whole. Every command that writes over an existing file goes
through `atomic_file` or one of the helpers built on it: the store's manifests, shards and completion records,
checkpoints, embeddings shards, exported `ckpt.pt`, pictures, `--save-flux` arrays, reports.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from astropt_tok.errors import temporary_name, writing


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so a rename inside it survives a crash (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under `path` (a file or a folder), then the folders themselves."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        return
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    for d in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
        fsync_dir(d)
    fsync_dir(path)


def _umask() -> int:
    """The process's umask: Linux's /proc/self/status line, else by setting it and putting it back (os has no
    getter; meanwhile a file another thread creates, a tokenise writer's shard say, would get the wrong mode)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_modes(path: Path) -> None:
    """Give `path` (and, for a folder, everything under it) the permissions a plain open() or mkdir() would: 0o666
    (files) or 0o777 (folders) less the umask. Writers that go through a private temporary file (safetensors:
    0600) would otherwise leave an artifact other users of a shared group folder cannot read."""
    mask = _umask()
    items = [path] + (sorted(path.rglob("*")) if path.is_dir() else [])
    for p in items:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _replace(tmp: Path, final: Path) -> None:
    """Move `tmp` to `final`: a file replaces a file in one rename; a folder replacing a folder moves the old one
    aside first and deletes it only after the new one is in place."""
    if tmp.is_dir() and final.exists():
        old = temporary_name(final, "old")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write (a file, or with `folder` a folder, created empty); on
    success it is fsynced and renamed over `path`. On any failure the temporary is removed and an existing
    `path` is left as it was; an I/O failure becomes one AstroptError naming `path`."""
    final = Path(path)
    tmp = temporary_name(final)
    with writing(final, cleanup=[tmp]):
        try:
            if folder:
                tmp.mkdir()
            yield tmp
            if not tmp.exists():
                raise FileNotFoundError(f"nothing was written to {tmp}")
            plain_modes(tmp)
            fsync_tree(tmp)
            _replace(tmp, final)
            fsync_dir(final.parent)
        except BaseException:
            from astropt_tok.errors import remove_quietly

            remove_quietly(tmp)  # also on KeyboardInterrupt and errors that are not I/O failures
            raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file (UTF-8) so that readers see the old content or the new, never a mix. A failed write
    (disk full, read-only, no permission) is one AstroptError naming `path`, and leaves no temporary file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    """Write `obj` as strict JSON (NaN and infinities are refused: they are not JSON) atomically."""
    import json

    atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")
