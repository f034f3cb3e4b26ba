"""Batches of token rows from the store: a seeded train/validation split, a map-style Dataset with a batched
fetch, a deterministic per-epoch batch sampler that splits every epoch across DDP ranks, and the DataLoader.

Nothing here holds a copy of the store: rows are gathered from memory-mapped shards one batch at a time
(`TokenStore.take`), and DataLoader workers reopen their own maps. Tokens stay int16 until the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from astropt_tok.errors import AstroptError
from astropt_tok.store import TokenStore

SPLIT_STREAM = 0x5A11  # the second word of the split's seed, so it never equals an epoch's stream


@dataclass
class Split:
    """Store rows for training and validation (ascending), and the rule that chose them."""

    train: np.ndarray
    val: np.ndarray
    rule: dict


def split_rows(num_rows: int, val_fraction: float, seed: int) -> Split:
    """Hold out a seeded fraction (at least one row) of the store for validation."""
    n_val = max(1, int(round(num_rows * val_fraction)))
    if num_rows - n_val < 1:
        raise AstroptError(f"the store has {num_rows} rows: too few to hold out {n_val} for validation and train")
    perm = np.random.default_rng([seed, SPLIT_STREAM]).permutation(num_rows)
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    rule = {
        "rule": f"val = sorted(np.random.default_rng([seed, {SPLIT_STREAM}]).permutation(num_rows)[:num_val])",
        "seed": seed,
        "val_fraction": val_fraction,
        "num_rows": num_rows,
        "num_val": int(n_val),
        "num_train": int(num_rows - n_val),
    }
    return Split(train=train, val=val, rule=rule)


_PAGE = 4096
try:
    import mmap as _mmap

    _PAGE = _mmap.PAGESIZE
except ImportError:  # pragma: no cover
    pass

MADV_RANDOM = 1  # Linux: no readahead, no large-folio mappings per fault: a random row maps ~64 KiB, not ~400
MADV_DONTNEED = 4  # Linux: drop this process's page-table entries for a range (clean file pages stay cached)


class _Madvise:
    """madvise(2) over the memory-mapped arrow shards' token arrays; a no-op where unavailable (not Linux).

    Reading a random row maps a window of the file around it (fault-around, readahead's large folios), and
    those pages count in the process's RSS until it exits: after enough random batches a process would
    appear to hold the whole store. The pages are clean copies of the file, so dropping the mappings
    (MADV_DONTNEED) is safe: the data stays in the page cache and the next read maps it again.
    """

    def __init__(self):
        self._madvise = None
        try:
            import ctypes
            import sys

            if sys.platform.startswith("linux"):
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                self._madvise = libc.madvise
        except (OSError, AttributeError):
            self._madvise = None

    def __call__(self, arrays, advice: int) -> None:
        """Apply `advice` to the pages under each numpy array (a view of a memory map)."""
        if self._madvise is None:
            return
        for a in arrays:
            if not isinstance(a, np.ndarray) or a.nbytes == 0:
                continue
            addr = a.__array_interface__["data"][0]
            start = addr - addr % _PAGE
            self._madvise(start, a.nbytes + (addr - start), advice)


CHECK_ROWS = 32  # rows read between looks at this process's mapped file pages (one read of /proc/self/statm)


def mapped_file_bytes() -> int | None:
    """Resident file-backed (and shared) memory of this process, from /proc/self/statm; None off Linux."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[2]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


class TokenRows:
    """Map-style Dataset over store rows; `__getitems__` fetches a whole batch with one index per shard.

    Keeps about `mapped_mb` MiB of arrow store pages mapped at most: every CHECK_ROWS rows it reads the
    process's resident file-backed memory, and when that has grown by more than the budget since the last
    release, it releases the touched shards' pages (see `_Madvise`). So a process's RSS stays flat however
    large the store and however long the run, whatever the kernel maps per fault (fault-around, large folios).
    A store no larger than `mapped_mb` is never released; mapped_mb=0 never releases (fastest once resident).
    """

    def __init__(self, store: TokenStore, mapped_mb: int = 32):
        self.store = store
        store_bytes = sum(int(s["bytes"]) for s in store.shards)
        self.budget = mapped_mb * 2**20
        self.active = store.storage == "arrow" and self.budget > 0 and store_bytes > self.budget
        self._since, self._touched, self._madvise, self._base, self._advised = 0, set(), None, None, set()

    def __getstate__(self):  # workers get the store (which drops its maps) and make their own releaser
        state = dict(self.__dict__)
        state.update(_madvise=None, _since=0, _touched=set(), _base=None, _advised=set())
        return state

    def __len__(self) -> int:
        return self.store.num_rows

    def __getitem__(self, row: int):
        """One row, [tokens_per_image] int16 tensor."""
        return self.__getitems__([row])[0]

    def __getitems__(self, rows):
        """Rows (store indices) -> [len(rows), tokens_per_image] int16 tensor."""
        import torch

        rows = np.asarray(rows, dtype=np.int64)
        if not self.active:
            return torch.from_numpy(self.store.take(rows))
        if self._base is None:  # before this process's first read of the store
            self._base = mapped_file_bytes()
            if self._base is None:
                self.active = False
        shard, local = self.store.locate(rows)
        touched = set(np.unique(shard).tolist())
        new = touched - self._advised
        if new:  # before the first read of a shard: random access, so map only what is read
            self._advise([self.store.shard_tokens(i) for i in sorted(new)], MADV_RANDOM)
            self._advised |= new
        out = torch.from_numpy(self.store.gather(shard, local))
        self._touched |= touched
        self._since += len(rows)
        if self._since >= CHECK_ROWS:
            self._since = 0
            now = mapped_file_bytes()
            if now is not None and now - self._base > self.budget:
                self.release()
        return out

    def _advise(self, arrays, advice: int) -> None:
        if self._madvise is None:
            self._madvise = _Madvise()
        self._madvise(arrays, advice)

    def release(self) -> None:
        """Unmap the pages read so far from the shards touched since the last release."""
        self._advise([self.store.shard_tokens(i) for i in sorted(self._touched)], MADV_DONTNEED)
        self._touched = set()
        self._base = mapped_file_bytes()


def pass_through(batch):
    """collate_fn: the dataset already returns the batch tensor."""
    return batch


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of an epoch's training rows: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class EpochBatchSampler:
    """Endless batches of store rows: epoch e visits train rows in `epoch_permutation(seed, e)` order, rank r
    takes `perm[r::world]` cut to an equal length, in batches of `batch_size` (the ragged tail is dropped).

    Starts at (start_epoch, start_batch), so a resumed run continues with exactly the batches it would have seen.
    """

    def __init__(self, train_rows: np.ndarray, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 start_epoch: int = 0, start_batch: int = 0):
        self.rows = np.asarray(train_rows, dtype=np.int64)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.per_rank = len(self.rows) // world
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise AstroptError(
                f"{len(self.rows)} training rows over {world} process(es) do not fill one batch of {batch_size}; "
                f"use a smaller --batch-size or a larger store"
            )
        self.start_epoch, self.start_batch = start_epoch, start_batch

    def rank_rows(self, epoch: int) -> np.ndarray:
        """This rank's rows of an epoch, in order."""
        perm = epoch_permutation(self.seed, epoch, len(self.rows))
        return self.rows[perm[self.rank :: self.world][: self.per_rank]]

    def position(self, batches_done: int) -> tuple[int, int]:
        """(epoch, batch) after `batches_done` batches from the start of epoch 0."""
        return divmod(batches_done, self.batches_per_epoch)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, b = self.start_epoch, self.start_batch
        while True:
            mine = self.rank_rows(epoch)
            while b < self.batches_per_epoch:
                yield mine[b * self.batch_size : (b + 1) * self.batch_size].tolist()
                b += 1
            epoch, b = epoch + 1, 0


def _ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn: SIGINT/SIGTERM are the training process's to handle (save, then stop the workers)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(store: TokenStore, sampler: EpochBatchSampler, workers: int, pin_memory: bool, mapped_mb: int = 32):
    """A plain DataLoader: one sampler item = one batched fetch = one [B, T] int16 tensor."""
    from torch.utils.data import DataLoader

    return DataLoader(
        TokenRows(store, mapped_mb),
        batch_sampler=sampler,
        collate_fn=pass_through,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        worker_init_fn=_ignore_stop_signals if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None,
    )


def val_batch_rows(val_rows: np.ndarray, batch_size: int, i: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """Validation batch i of this rank: a fixed cycle through the held-out rows, the same at every eval."""
    start = (i * world + rank) * batch_size
    return val_rows[(start + np.arange(batch_size)) % len(val_rows)]


def to_device(batch, device, non_blocking: bool = True):
    """int16 [B, T] -> (x, y) int64 on device: x = tokens[:, :-1], y = tokens[:, 1:] (positions 0..T-2)."""
    tokens = batch.to(device, non_blocking=non_blocking).long()
    return tokens[:, :-1], tokens[:, 1:]
