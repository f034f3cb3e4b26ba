"""One exception type for every user-facing failure: the CLI prints its message as one line and exits 1."""

from __future__ import annotations

import os
from pathlib import Path


class AstroptError(Exception):
    """A failure caused by the user's input or environment, with a message that says what to do."""


def ensure_folder(path: str | os.PathLike, what: str) -> Path:
    """Create folder `path` and its parents, or say in one AstroptError why it cannot be (`what` names it)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise AstroptError(f"{what} {folder} exists as a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AstroptError(f"cannot create {what} {folder}: {exc.strerror or exc}") from None
    return folder
