"""The reading stages ahead of the codec: reader processes convert parquet row groups into checked,
cropped, band-ordered float32 flux; a staging thread regroups them into codec-sized batches (pinned on a
GPU run) and keeps a few ready across shard boundaries. `prepare_shards` is the entry point.
"""

from __future__ import annotations

import queue
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from astropt_tok.codec import CROP_SIZE
from astropt_tok.errors import AstroptError
from astropt_tok.executor import PREFETCH_PER_WORKER, free_shared_memory, workers_for_shared_memory
from astropt_tok.prefetch import Prefetch
from astropt_tok.source import (OpenFiles, batch_to_flux, batch_to_scalar, batch_to_spectrum, empty_spectra,
                                iter_row_range_datasets, object_ids_of, read_task, read_tasks)


@dataclass(frozen=True)
class SourceModality:
    """One token column a run makes and how its source column is read: an image column in `bands` order, a
    catalogue scalar (with the range of a codec that has a fixed grid), or a spectrum."""

    column: str
    kind: str = "image"  # "image", "scalar" or "spectrum"
    bands: tuple[str, ...] = ()
    value_range: tuple[float, float] | None = None


@dataclass
class PreparedBatch:
    """A batch of checked flux ready for the codec, with the bookkeeping of the rows it came from."""

    # torch tensor [n, bands, 96, 96] float32 (pinned on a GPU run); several modalities: {name: tensor}, a scalar
    # [n] float32, a spectrum [n, 4, L] (flux, ivar, mask, wavelength; see source.batch_to_spectrum)
    flux: object
    rows: np.ndarray  # [n] global source rows of the good rows
    object_ids: list  # [n]
    rejects: list[dict]  # bad rows met while preparing this batch
    valid: dict | None = None  # several modalities: {name: [n] bool}, False where a kept row lacks that image


def _map_flux(flux, fn):
    """Apply fn to the flux tensor, or to each modality's."""
    return {name: fn(f) for name, f in flux.items()} if isinstance(flux, dict) else fn(flux)


def _map_valid(valid, fn):
    return None if valid is None else {name: fn(v) for name, v in valid.items()}


def prepare_shards(plan, shards: list[tuple[int, int, int]], cfg, pin: bool,
                   modalities: list[SourceModality] | None = None):
    """For each (index, lo, hi) in `shards`, in order, yield (index, iterator of codec-sized PreparedBatch).
    `modalities`: the token columns of a run of several (None: the image columns `cfg` names).

    Three stages run ahead of the thread that drives the codec, so it only ever picks up a ready batch:
    `cfg.workers` DataLoader worker processes read and convert parquet row groups (no GIL between them and
    the codec's thread); a staging thread regroups their chunks into codec-sized batches, copying them
    straight into pinned memory on a GPU run (one copy, made while the codec runs, not between batches);
    and a queue holds a few batches across shard boundaries, so the device does not wait while one shard is
    written and the next begins. Each shard's iterator must be consumed before the next is taken; `close()`
    on this generator (or its garbage collection) stops the stages.
    """
    row_groups = None
    if modalities is None:
        modalities = [SourceModality(column, "image", tuple(bands)) for column, bands in modalities_of(cfg)]
    convert = _Converter(plan, list(cfg.bands), modalities, cfg.keep_partial)
    if cfg.reader == "datasets":  # a streaming source: convert its batches in threads, in order
        items = ((i, item) for i, lo, hi in shards
                 for item in iter_row_range_datasets(plan, lo, hi, batch_rows=cfg.batch_size))
        chunks = _ordered_map(lambda tagged: (tagged[0], convert(*tagged[1])), items, cfg.workers)
    else:
        import torch

        tasks = [(i, task) for i, lo, hi in shards for task in read_tasks(plan, lo, hi)]
        row_groups = _RowGroups(plan, tasks, convert)
        channels = sum(len(m.bands) for m in modalities) or len(cfg.bands)
        chunk_bytes = max((t.count for _, t in tasks), default=0) * channels * CROP_SIZE * CROP_SIZE * 4
        workers = workers_for_shared_memory(cfg.workers, chunk_bytes, free_shared_memory())
        if workers < cfg.workers:
            print(f"warning: /dev/shm has room for the row groups of {workers} of {cfg.workers} reader processes "
                  f"({chunk_bytes / 2**20:.0f} MB each, {PREFETCH_PER_WORKER + 1} in flight per reader); using "
                  f"{workers}. Give the container more (docker run --shm-size 8g) to read faster.", file=sys.stderr)
        loader = torch.utils.data.DataLoader(
            row_groups, batch_size=None, shuffle=False, num_workers=workers,
            collate_fn=_as_is, prefetch_factor=PREFETCH_PER_WORKER if workers > 0 else None,
        )
        chunks = iter(loader)  # worker processes start here, in the calling thread, not in the staging one
    staged = _Staged(_shard_batches(chunks, [i for i, _, _ in shards], cfg.batch_size, pin))
    try:
        for index, _, _ in shards:
            yield index, staged.shard(index)
    finally:
        staged.close()
        if row_groups is not None:
            row_groups.files.close()  # read in this process when there are no workers


def _shard_batches(chunks, indices: list[int], batch_size: int, pin: bool):
    """The staging work: (shard, PreparedBatch) for each batch of each shard in `indices` order, then
    (shard, None) to close that shard (also for a shard with no rows)."""
    stream = _Peekable(chunks)
    for index in indices:
        def mine():
            while stream.peek() is not None and stream.peek()[0] == index:
                chunk = next(stream)[1]
                if isinstance(chunk, _ReadFailure):
                    raise AstroptError(chunk.message)
                yield chunk

        for batch in _rebatch(mine(), batch_size, pin):
            yield index, batch
        yield index, None


class _Staged:
    """The staging thread's (shard, batch-or-None) items, `depth` ahead of the codec's thread (a `Prefetch`), taken
    one shard at a time."""

    def __init__(self, items, depth: int = 3):
        self.ahead = Prefetch(items, depth, name="astropt-staging")

    def shard(self, index: int) -> Iterator[PreparedBatch]:
        """The batches of shard `index`, which must be the next shard in the staged order."""
        while True:
            try:
                shard, batch = next(self.ahead)
            except StopIteration:
                raise RuntimeError(f"the staging thread ended before shard {index}") from None
            assert shard == index, f"staged shard {shard} where shard {index} was expected"
            if batch is None:
                return
            yield batch

    def close(self) -> None:
        self.ahead.close()


def modalities_of(cfg) -> list[tuple[str, tuple[str, ...]]]:
    """The (image column, bands) of a run that tokenises several columns; empty for a one-column run."""
    modalities = list(getattr(cfg, "modalities", ()) or ())
    return modalities if len(modalities) > 1 else []


class _Converter:
    """One record batch -> a PreparedBatch of checked, cropped, band-ordered flux.

    Several modalities (`modalities`: SourceModality entries, images, scalars and spectra): each column is
    converted on its own and a row is kept when every one is good, or with `keep_partial` when at least one is
    (the others zero, marked invalid); a rejected row's reason names each bad column."""

    def __init__(self, plan, bands: list[str], modalities=(), keep_partial: bool = False):
        self.plan, self.bands = plan, bands
        self.modalities, self.keep_partial = list(modalities), keep_partial

    def __call__(self, first_row: int, batch) -> PreparedBatch:
        import torch

        if self.modalities:
            return self._several(first_row, batch)
        shape = (batch.num_rows, len(self.bands), CROP_SIZE, CROP_SIZE)
        buffer = torch.empty(shape, dtype=torch.float32)
        flux, good, reasons = batch_to_flux(batch, self.plan.column, self.bands, out=buffer.numpy(), crop=CROP_SIZE)
        ids = object_ids_of(batch, self.plan.id_column)
        rejects = [reject_record(first_row + r, ids[r], reasons[r]) for r in range(batch.num_rows) if reasons[r]]
        return PreparedBatch(buffer[: len(good)], first_row + good, [ids[g] for g in good], rejects)

    def _convert(self, batch, modality: SourceModality):
        """One column of the batch -> (values tensor: the good rows first for an image, all rows otherwise;
        positions of the good rows; reason per row)."""
        import torch

        n = batch.num_rows
        if modality.kind == "scalar":
            values, good, reasons = batch_to_scalar(batch, modality.column, modality.value_range)
            return torch.from_numpy(values), good, reasons
        if modality.kind == "spectrum":
            spectra, good, reasons = batch_to_spectrum(batch, modality.column)
            return torch.from_numpy(spectra), good, reasons
        buffer = torch.empty((n, len(modality.bands), CROP_SIZE, CROP_SIZE), dtype=torch.float32)
        _, good, reasons = batch_to_flux(batch, modality.column, list(modality.bands), out=buffer.numpy(),
                                         crop=CROP_SIZE)
        return buffer, good, reasons

    def _several(self, first_row: int, batch) -> PreparedBatch:
        import torch

        n = batch.num_rows
        buffers, goods, reasons, compact = {}, {}, {}, {}
        for modality in self.modalities:
            c = modality.column
            buffers[c], goods[c], reasons[c] = self._convert(batch, modality)
            compact[c] = modality.kind == "image"  # images: the good rows first; scalars, spectra: row by row
        good_of = {c: np.zeros(n, dtype=bool) for c in goods}  # [n] per column: its value is good
        for c, good in goods.items():
            good_of[c][good] = True
        stacked = np.stack(list(good_of.values()))  # [columns, n]
        kept = np.nonzero(stacked.any(0) if self.keep_partial else stacked.all(0))[0]  # [n_kept] batch positions
        flux, valid = {}, {}
        for c, good in goods.items():
            valid[c] = good_of[c][kept]
            if not compact[c]:  # row by row: take the kept rows; a kept row without this value holds zeros
                taken = buffers[c][torch.from_numpy(kept)]
                if not valid[c].all():
                    missing = np.nonzero(~valid[c])[0]
                    # a spectrum: padding only (no pixels, so nothing to encode); a scalar: 0
                    taken[torch.from_numpy(missing)] = (torch.from_numpy(empty_spectra(len(missing), taken.shape[-1]))
                                                        if taken.dim() == 3 else 0)
                flux[c] = taken
                continue
            if len(good) == len(kept):  # every kept row has this image, in the same order: no copy
                flux[c] = buffers[c][: len(kept)]
                continue
            aligned = torch.zeros((len(kept), *buffers[c].shape[1:]), dtype=torch.float32)
            at = np.searchsorted(good, kept[valid[c]])  # where each kept row's image sits in the compact buffer
            aligned[torch.from_numpy(np.nonzero(valid[c])[0])] = buffers[c][torch.from_numpy(at)]
            flux[c] = aligned
        ids = object_ids_of(batch, self.plan.id_column)
        rejects = []
        for r in np.nonzero(~np.isin(np.arange(n), kept))[0]:
            why = "; ".join(f"{c}: {reasons[c][r]}" for c in goods if reasons[c][r])
            rejects.append(reject_record(first_row + r, ids[r], why))
        return PreparedBatch(flux, first_row + kept, [ids[k] for k in kept], rejects,
                             valid if self.keep_partial else None)


class _RowGroups:
    """A map-style dataset of read tasks: item k is (shard, PreparedBatch) of task k, read in a worker."""

    def __init__(self, plan, tasks: list, convert: _Converter):
        self.plan, self.tasks = plan, tasks
        self.convert = convert
        self.files = OpenFiles()  # each worker process gets its own, empty

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, k: int):
        shard, task = self.tasks[k]
        try:
            return shard, self.convert(task.first_row, read_task(self.plan, task, self.files))
        except AstroptError as exc:  # passed on as a value: a worker's exception would arrive with a traceback
            return shard, _ReadFailure(str(exc))


@dataclass
class _ReadFailure:
    """A read task that failed (an unreadable row group), raised as one AstroptError where it is consumed."""

    message: str


def _as_is(item):
    return item


class _Peekable:
    """An iterator whose next item can be looked at (None at the end)."""

    _END = object()

    def __init__(self, it):
        self.it, self.head = it, self._END

    def peek(self):
        if self.head is self._END:
            self.head = next(self.it, None)
        return self.head

    def __next__(self):
        item = self.peek()
        self.head = self._END
        if item is None:
            raise StopIteration
        return item


def _ordered_map(fn, items, workers: int, ahead: int = 2):
    """`map(fn, items)` on a thread pool with up to workers*ahead results in flight, in input order."""
    if workers <= 0:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="astropt-decode")
    pending: queue.SimpleQueue = queue.SimpleQueue()
    try:
        in_flight = 0
        for item in items:
            pending.put(pool.submit(fn, item))
            in_flight += 1
            if in_flight >= workers * ahead:
                yield pending.get().result()
                in_flight -= 1
        while in_flight:
            yield pending.get().result()
            in_flight -= 1
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _rebatch(chunks: Iterator[PreparedBatch], batch_size: int, pin: bool = False) -> Iterator[PreparedBatch]:
    """Regroup converted chunks into batches of exactly `batch_size` good rows (the last one smaller), in
    pinned memory when `pin`."""
    held: list[PreparedBatch] = []
    count = 0
    for chunk in chunks:
        held.append(chunk)
        count += len(chunk.rows)
        while count >= batch_size:
            yield _merge(held, batch_size, pin)
            held = _rest(held, batch_size)
            count = sum(len(c.rows) for c in held)
    if held:
        yield _merge(held, count, pin)


def _merge(held: list[PreparedBatch], n: int, pin: bool = False) -> PreparedBatch:
    """The first n good rows of `held`, with every reject `held` carries: a view when one chunk holds them
    and nothing needs pinning, else one copy into a new (pinned when `pin`) buffer."""
    import torch

    rejects = [r for c in held for r in c.rejects]
    if len(held[0].rows) >= n and not pin:
        first = held[0]
        return PreparedBatch(_map_flux(first.flux, lambda f: f[:n]), first.rows[:n], first.object_ids[:n], rejects,
                             _map_valid(first.valid, lambda v: v[:n]))
    parts, rows, ids, taken = [], [], [], 0
    for c in held:
        k = min(n - taken, len(c.rows))
        parts.append(c)
        rows.append(c.rows[:k])
        ids.extend(c.object_ids[:k])
        taken += k
    counts = [len(r) for r in rows]

    def cat(pick):  # one modality's (or the only) flux of the first n rows, copied once
        pieces = [pick(c.flux)[:k] for c, k in zip(parts, counts)]
        if pieces[0].dim() == 3:  # spectra [k, 4, L]: chunks of different L are padded to the longest
            pieces = _pad_spectra(pieces)
        merged = torch.empty((n, *pieces[0].shape[1:]), dtype=pieces[0].dtype, pin_memory=pin)
        # from the workers' shared memory straight into pinned memory on a GPU run
        torch.cat(pieces, out=merged)
        return merged

    if isinstance(held[0].flux, dict):
        flux = {name: cat(lambda f, name=name: f[name]) for name in held[0].flux}
    else:
        flux = cat(lambda f: f)
    valid = None
    if held[0].valid is not None:
        valid = {name: np.concatenate([c.valid[name][:k] for c, k in zip(parts, counts)]) for name in held[0].valid}
    return PreparedBatch(flux, np.concatenate(rows), ids, rejects, valid)


def _pad_spectra(pieces: list) -> list:
    """Spectra [k, 4, L] of different L, padded to the longest with source.empty_spectra's padding, so that
    they can be one batch."""
    import torch

    width = max(p.shape[-1] for p in pieces)
    return [p if p.shape[-1] == width else
            torch.cat([p, torch.from_numpy(empty_spectra(p.shape[0], width - p.shape[-1]))], dim=-1) for p in pieces]


def _rest(held: list[PreparedBatch], n: int) -> list[PreparedBatch]:
    """What remains of `held` after its first n good rows and all its rejects were handed on."""
    rest, taken = [], 0
    for c in held:
        k = min(n - taken, len(c.rows))
        taken += k
        if k < len(c.rows):
            rest.append(PreparedBatch(_map_flux(c.flux, lambda f: f[k:]), c.rows[k:], c.object_ids[k:], [],
                                      _map_valid(c.valid, lambda v: v[k:])))
    return rest



def reject_record(row: int, object_id, reason: str) -> dict:
    """One rejects.jsonl record: the global source row, its object id when known, and why it was skipped."""
    rec = {"row": int(row)}
    if object_id is not None:
        rec["object_id"] = object_id
    rec["reason"] = reason
    return rec
