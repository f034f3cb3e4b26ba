"""Reading ahead in a thread: `Prefetch` runs an iterator in a daemon thread a few items ahead of the thread that
consumes them. tokenise's staging thread (codec-sized batches ahead of the codec, `stages._Staged`) and embed's
token reader (token batches ahead of the model) are both one.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Iterable


class _Failure:
    """An exception raised in the thread, carried through the queue to be raised in the consumer."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetch:
    """Iterate `items` in a background thread, up to `depth` items ahead of the consumer.

    An exception in the thread is raised in the consumer where its item would have come. `close()` (or leaving
    a `with` block) stops the thread, also while it waits on a full queue (a consumer that stops early, on an
    error, leaves no thread holding batches), and the thread drops the source iterator as it ends (a
    DataLoader's iterator stops its worker processes when dropped). `wait_s` counts the seconds the consumer
    waited for items: high means the reading, not the consumer, sets the pace.
    """

    _END = object()

    def __init__(self, items: Iterable, depth: int = 3, name: str = "astropt-prefetch"):
        self._items = iter(items)  # made here, in the caller's thread (a DataLoader starts its workers here)
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self.wait_s = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            self._put(_Failure(exc))
        finally:
            self._items = None

    def _put(self, item) -> bool:
        """Queue `item`, waiting for room; False when closed meanwhile."""
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        t0 = time.perf_counter()
        item = self._ready.get()
        self.wait_s += time.perf_counter() - t0
        if item is self._END:
            self._finished = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._finished = True
            raise item.exc
        return item

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread (it ends at its next item) and wait for it, up to `timeout` seconds."""
        self._stop.set()
        self._thread.join(timeout=timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
