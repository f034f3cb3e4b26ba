"""One writer per folder: an advisory lock (`fcntl.flock`) on DIR/.astropt.lock, held for a whole command.

The operating system releases it when the process exits, however it exits, so a crash or kill -9 leaves no
stale lock to clear by hand. The file records who holds it (pid, host, command, start time) for the message
a refused second writer prints. Processes of one job that share a folder on purpose (torchrun ranks, SLURM
array tasks on a token store) take it shared: they exclude a stray single run, not each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from astropt_tok.errors import AstroptError, writing

LOCK_FILE = ".astropt.lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str, shared: bool = False):
    """Hold DIR/.astropt.lock for the block: exclusive (one `command` at a time), or shared with other
    processes of the same job; a folder held otherwise is one AstroptError naming who holds it."""
    import fcntl

    path = Path(folder) / LOCK_FILE
    with writing(path):
        fh = open(path, "a+b", buffering=0)  # unbuffered: nothing left to flush (and fail) at close
    try:
        try:
            fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = _describe(fh.read())
            raise AstroptError(f"{folder} is in use by another {holder}: one {command} at a time per folder; "
                               f"wait for it to finish, or choose another folder") from None
        except OSError as exc:  # a file system without locks: go on unguarded rather than refuse to work
            print(f"note: cannot lock {path} ({exc.strerror}); make sure no other run writes there", flush=True)
        if not shared:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                    "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            with contextlib.suppress(OSError):  # only for the message; never a reason to fail
                fh.truncate(0)
                fh.write((json.dumps(info) + "\n").encode())  # appended: at 0 after the truncate
        yield path
    finally:
        fh.close()  # closing the file releases the lock


def _describe(text: str) -> str:
    try:
        info = json.loads(text.strip().splitlines()[-1])
        return f"{info['command']} (pid {info['pid']} on {info['host']}, since {info['since']})"
    except (ValueError, IndexError, KeyError, TypeError):
        return "astropt process"
