"""Batches of token rows from the store: a seeded train/validation split, a map-style Dataset with a batched
fetch, a deterministic per-epoch batch sampler that splits every epoch across DDP ranks, and the DataLoader.

Nothing here holds a copy of the store: each batch's rows are read from the shard files (at the offsets their
memory maps give, `TokenStore.read_rows`) or gathered through the maps, and DataLoader workers reopen their own
maps and files. Tokens stay int16 until the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from astropt_tok.errors import AstroptError
from astropt_tok.store import TokenStore

SPLIT_STREAM = 0x5A11  # the second word of the split's seed, so it never equals an epoch's stream
ORDER_STREAM = 0x0D3A  # the second word of a row's modality-order seed (--shuffle-modalities)
EPOCH_GAMMA = 0xD1B54A32D192ED03  # odd: each epoch moves a row's modality-order hash input by this much
VAL_EPOCH = 0  # rows given without an epoch (validation, pictures) take their epoch-0 modality order


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


READ_MODES = ("pread", "mmap")


class TokenRows:
    """Map-style Dataset over store rows; `__getitems__` fetches a whole batch, one vectorised lookup per batch.

    `reads="pread"` (the default) reads each row from its shard file with one pread at the offset the memory
    map gives (`TokenStore.read_rows`): pages stay in the page cache, so a process's resident memory is flat
    however large the store and however long the run. `reads="mmap"` gathers through the memory maps
    (`TokenStore.gather`): as fast once the store is resident, but every page touched stays mapped and counts
    in the process's RSS, which then grows toward the store's size.

    Several modalities (`modalities`, names of a store's token columns): a galaxy is one sequence of their
    blocks, in that order or, with `shuffle`, in the order `modality_orders` picks from (seed, epoch, row); a
    batch is then a dict {"tokens": [B, sum of T_m] (int16; a wider type when the columns' dtypes differ),
    "lengths": [M] (each modality's T_m: an image's 576, a scalar's 1, a spectrum's own), "order": [B, M]
    (shuffled), "valid": [B, M] bool (stores with missing modalities)}. The epoch comes with the rows
    (`EpochRows`, what `EpochBatchSampler` yields), so workers hold no epoch state; plain row indices (validation,
    pictures) get the fixed order of epoch 0.
    """

    def __init__(self, store: TokenStore, reads: str = "pread", modalities: list[str] | None = None,
                 shuffle: bool = False, seed: int = 0):
        if reads not in READ_MODES:
            raise AstroptError(f"store reads must be one of {', '.join(READ_MODES)}, got {reads!r}")
        self.store, self.reads = store, reads
        self.modalities, self.shuffle, self.seed = list(modalities or []), shuffle, seed

    def __len__(self) -> int:
        return self.store.num_rows

    def __getitem__(self, row: int):
        """One row, [tokens_per_image] int16 tensor."""
        return self.__getitems__([row])[0]

    def __getitems__(self, rows):
        """Rows (store indices, or an `EpochRows`) -> [len(rows), tokens_per_image] int16 tensor (several
        modalities: a dict, above)."""
        import torch

        epoch = VAL_EPOCH
        if isinstance(rows, EpochRows):
            epoch, rows = rows.epoch, rows.rows
        rows = np.asarray(rows, dtype=np.int64)
        located = self.store.locate(rows)
        read = self.store.read_rows if self.reads == "pread" else self.store.gather
        if not self.modalities:
            return torch.from_numpy(read(*located))
        blocks = [read(*located, modality=m) for m in self.modalities]  # [B, T_m] each, its column's own dtype
        lengths = [b.shape[1] for b in blocks]
        tokens = np.concatenate(blocks, axis=1, dtype=np.result_type(*blocks))  # [B, sum T_m], modality order
        batch = {}
        if self.shuffle:
            order = modality_orders(self.seed, epoch, rows, len(self.modalities))  # [B, M]: block k is modality order[b, k]
            tokens = np.take_along_axis(tokens, reordered_positions(order, lengths), axis=1)
            batch["order"] = torch.from_numpy(order)
        batch["tokens"] = torch.from_numpy(np.ascontiguousarray(tokens))
        batch["lengths"] = torch.tensor(lengths)  # [M]: each modality's block length, in modality order
        if self.store.partial:
            valid = self.store.valid(rows)
            batch["valid"] = torch.from_numpy(np.stack([valid[m] for m in self.modalities], axis=1))
        return batch


def reordered_positions(order: np.ndarray, lengths: list[int]) -> np.ndarray:
    """[B, sum(lengths)] int64: for each sample, the position in its modality-order sequence (blocks of `lengths`)
    of each token once its blocks are put in `order` [B, M] (block k = modality order[b, k])."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths  # [M]: where modality m begins in modality order
    sizes = lengths[order]  # [B, M]: the length of each sample's block k
    ends = np.cumsum(sizes, axis=1)  # [B, M]
    pos = np.arange(lengths.sum())
    slot = (pos[None, None, :] >= ends[:, :, None]).sum(axis=1)  # [B, T]: the block of each position
    modality = np.take_along_axis(order, slot, axis=1)
    within = pos[None] - np.take_along_axis(ends - sizes, slot, axis=1)
    return starts[modality] + within


@dataclass(frozen=True)
class EpochRows:
    """One batch of store rows and the epoch it belongs to: what the batch sampler hands the Dataset (through
    DataLoader workers too), so a shuffled modality order can depend on the epoch without state in workers."""

    epoch: int
    rows: list[int]

    def __len__(self) -> int:
        return len(self.rows)


def modality_orders(seed: int, epoch: int, rows: np.ndarray, num_modalities: int) -> np.ndarray:
    """Each row's block order in an epoch, [len(rows), M] int64: one of the M! permutations, picked by a
    splitmix64 hash of (seed, epoch, row), so a galaxy's order changes from epoch to epoch but is a pure function
    of the three (the same on every rank, worker count and resume), vectorised over the batch. Epoch 0 gives the
    order every epoch had before the order depended on the epoch."""
    import itertools

    perms = np.array(list(itertools.permutations(range(num_modalities))), dtype=np.int64)  # [M!, M]
    key = (seed * 0x9E3779B97F4A7C15 + ORDER_STREAM + epoch * EPOCH_GAMMA) % 2**64
    with np.errstate(over="ignore"):
        z = np.asarray(rows, dtype=np.uint64) + np.uint64(key)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return perms[(z % np.uint64(len(perms))).astype(np.int64)]


def pass_through(batch):
    """collate_fn: the dataset already returns the batch tensor."""
    return batch


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of an epoch's training rows: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class EpochBatchSampler:
    """Endless batches of store rows: epoch e visits train rows in `epoch_permutation(seed, e)` order, rank r
    takes `perm[r::world]` cut to an equal length, in batches of `batch_size` (the ragged tail is dropped).
    Each batch is an `EpochRows` (the rows and their epoch).

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

    def __iter__(self) -> Iterator[EpochRows]:
        epoch, b = self.start_epoch, self.start_batch
        while True:
            mine = self.rank_rows(epoch)
            while b < self.batches_per_epoch:
                yield EpochRows(epoch, mine[b * self.batch_size : (b + 1) * self.batch_size].tolist())
                b += 1
            epoch, b = epoch + 1, 0


def _ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn: SIGINT/SIGTERM are the training process's to handle (save, then stop the workers)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(store: TokenStore, sampler: EpochBatchSampler, workers: int, pin_memory: bool, reads: str = "pread",
                dataset: TokenRows | None = None):
    """A plain DataLoader: one sampler item = one batched fetch = one [B, T] int16 tensor. It draws its
    worker seeds from its own generator, never from torch's global one, so dropout's random stream is the
    same whether or not a loader was started mid-run (an exact resume needs that)."""
    import torch
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset if dataset is not None else TokenRows(store, reads),
        batch_sampler=sampler,
        collate_fn=pass_through,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        worker_init_fn=_ignore_stop_signals if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(sampler.seed + 7919 * sampler.rank),
    )


def val_batch_rows(val_rows: np.ndarray, batch_size: int, i: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """Validation batch i of this rank: a fixed cycle through the held-out rows, the same at every eval."""
    start = (i * world + rank) * batch_size
    return val_rows[(start + np.arange(batch_size)) % len(val_rows)]


def to_device(batch, device, non_blocking: bool = True):
    """int16 [B, T] -> (x, y) int64 on device: x = tokens[:, :-1], y = tokens[:, 1:] (positions 0..T-2)."""
    tokens = batch.to(device, non_blocking=non_blocking).long()
    return tokens[:, :-1], tokens[:, 1:]


def batch_to_device(batch, device, non_blocking: bool = True):
    """A batch (tensor, or a several-modality dict) -> (x, y, model kwargs) on device: kwargs carry the
    sample's block `order`, a `loss_mask` (B, T-1) that leaves out targets in a modality the row lacks and, when
    some row lacks one, `present` (B, T-1): which inputs are real tokens (the model attends to no other)."""
    if not isinstance(batch, dict):
        return (*to_device(batch, device, non_blocking), {})
    x, y = to_device(batch["tokens"], device, non_blocking)
    kwargs = {}
    if "order" in batch:
        kwargs["order"] = batch["order"].to(device, non_blocking=non_blocking)
    if "valid" in batch:
        valid, order, lengths = batch["valid"], batch.get("order"), batch.get("lengths")  # on the CPU: no GPU sync
        kwargs["loss_mask"] = valid_at(valid, order, 1, y.size(1), lengths).to(device, non_blocking=non_blocking)
        if not bool(valid.all()):
            kwargs["present"] = valid_at(valid, order, 0, x.size(1), lengths).to(device, non_blocking=non_blocking)
    return x, y, kwargs


def valid_at(valid, order, start: int, length: int, lengths=None):
    """valid [B, M] bool (does the row have modality m), order [B, M] or None -> [B, length] bool: whether the
    token at sequence positions start..start+length-1 belongs to a modality the row has, its blocks in `order`.
    `lengths` [M]: each modality's block length (None: M equal blocks of the sequence x or y is one shorter than)."""
    import torch

    B, M = valid.shape
    if lengths is not None:
        from astropt_train.model import block_layout

        pos = torch.arange(start, start + length, device=valid.device)
        modality, _ = block_layout([int(n) for n in lengths], pos, order)
        return valid.gather(1, modality.expand(B, -1) if order is None else modality)
    per = (length + 1) // M  # tokens per modality (the sequence is M blocks; x and y are one shorter)
    slot = torch.arange(start, start + length, device=valid.device) // per  # the block of each position
    modality = order.to(valid.device)[:, slot] if order is not None else slot.expand(B, -1)  # (B, length)
    return valid.gather(1, modality)
