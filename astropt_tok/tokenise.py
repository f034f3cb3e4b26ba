"""The tokenise pipeline: source rows -> checked float32 flux -> AION codec on the device -> checked tokens
-> shards. Each shard is an independent unit of work: a rerun skips the done ones, and processes under
torchrun or a SLURM array split the shards between them (the executor is `shards_for_this_process`).

Follow one galaxy: in a reader process, `source.read_task` reads its row group and `source.batch_to_flux`
turns its image column into a [bands, 96, 96] crop in `--bands` order; the staging thread (`_Staged`) puts
it into a codec-sized batch in pinned memory; on the main thread `Encoder.submit` runs the codec and
`encode_shard` checks its 576 tokens; the writer thread's `write_encoded_shard` puts them in the row of its
shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from astropt_tok import store as st
from astropt_tok.codec import CROP_SIZE, DEFAULT_CODEC
from astropt_tok.errors import AstroptError, ensure_folder
from astropt_tok.source import (DEFAULT_SOURCE, OpenFiles, batch_to_flux, iter_row_range_datasets, object_ids_of, read_task,
                                read_tasks)

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


@dataclass
class TokeniseConfig:
    """Everything `astropt tokenise` needs; the CLI maps its flags onto these fields."""

    source: str = DEFAULT_SOURCE
    out: str = "data/tokens"
    shards: int = 256
    codec: str = DEFAULT_CODEC
    column: str = "legacysurvey_image"
    bands: tuple[str, ...] = ("DES-G", "DES-R", "DES-I", "DES-Z")
    split: str = "train"
    batch_size: int = 64
    device: str = "auto"
    storage: str = "arrow"  # --format
    limit: int | None = None
    workers: int | None = None  # processes reading row groups ahead of the codec; None: see default_workers
    id_column: str | None = "object_id"
    strict: bool = False
    overwrite: bool = False
    precision: str = "fp32"
    reader: str = "pyarrow"  # or "datasets": the `datasets` streaming reader
    progress: bool = True
    overwrite_wait_s: float = 1800.0  # SLURM array tasks > 0 with --overwrite wait this long for task 0
    # executor: None -> from the environment (torchrun's RANK/WORLD_SIZE or a SLURM array)
    rank: int | None = None
    world_size: int | None = None


@dataclass
class ShardResult:
    """What one process did to one shard."""

    index: int
    rows: int
    rejected: int
    skipped: bool  # already complete from an earlier run
    seconds: float = 0.0  # the codec's thread on this shard, waits for input included
    input_wait_s: float = 0.0  # of `seconds`, the codec's thread waiting for its next batch
    write_s: float = 0.0  # the writer thread writing the shard and its completion record (overlaps the next)


@dataclass
class TokeniseSummary:
    """The outcome of one process's `tokenise` call."""

    out: str
    num_shards: int
    my_shards: list[int]
    results: list[ShardResult] = field(default_factory=list)
    complete: bool = False
    rows_per_s: float = 0.0
    seconds: float = 0.0
    device: str = "cpu"
    precision: str = "fp32"
    work_s: float = 0.0  # wall time of reading, encoding and writing this process's shards
    first_batch_s: float = 0.0  # start-up: from the readers' start until the first batch was ready
    first_wait_s: float = 0.0  # of which the codec's thread spent waiting for that batch

    @property
    def input_wait_s(self) -> float:
        """Seconds the codec's thread waited for input after the first batch: high means raise --workers."""
        return sum(r.input_wait_s for r in self.results if not r.skipped) - self.first_wait_s

    @property
    def steady_s(self) -> float:
        """Seconds of work after the first batch was ready."""
        return self.work_s - self.first_batch_s

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.results if not r.skipped)

    @property
    def rejected(self) -> int:
        return sum(r.rejected for r in self.results if not r.skipped)


# ---------------------------------------------------------------------------------------------------------
# executor: which shards are this process's


def process_rank(cfg: TokeniseConfig) -> tuple[int, int]:
    """(rank, world size): from the config, else torchrun's RANK/WORLD_SIZE, else a SLURM array, else (0, 1)."""
    if cfg.rank is not None or cfg.world_size is not None:
        rank, world = int(cfg.rank or 0), int(cfg.world_size or 1)
    elif "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"])
    elif "SLURM_ARRAY_TASK_COUNT" in os.environ:
        rank = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        world = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    else:
        rank, world = 0, 1
    if not 0 <= rank < world:
        raise AstroptError(f"process rank {rank} is outside a world of {world} processes")
    return rank, world


def shards_for_this_process(num_shards: int, rank: int, world: int) -> list[int]:
    """Shards i with i % world == rank: every process gets an even share, in a fixed order."""
    return list(range(rank, num_shards, world))


def default_workers(device: str) -> int:
    """Reader processes when --workers is not given: on a GPU, min(8, this process's share of the cores - 1),
    leaving a core to drive the codec (torchrun's LOCAL_WORLD_SIZE processes share the node); on a CPU none,
    since the codec needs every core and reading in-process is as fast as pyarrow itself."""
    if not device.startswith("cuda"):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    share = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, min(8, share - 1))


PREFETCH_PER_WORKER = 2  # row groups each reader process keeps converted ahead of the codec


def workers_for_shared_memory(workers: int, chunk_bytes: int, free_bytes: int | None) -> int:
    """The most reader processes, up to `workers`, whose chunks in flight (PREFETCH_PER_WORKER each, plus the
    one each is writing) fit in half of the free shared memory; None for unknown: `workers` unchanged.
    A container's default /dev/shm (64 MB) holds few 64-galaxy row groups (9.4 MB each after the crop): a
    reader process that outgrows it dies of SIGBUS, so fewer readers, or none, is the better outcome."""
    if free_bytes is None or workers <= 0 or chunk_bytes <= 0:
        return workers
    return max(0, min(workers, free_bytes // 2 // ((PREFETCH_PER_WORKER + 1) * chunk_bytes)))


def _free_shared_memory() -> int | None:
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


def resolve_device(device: str) -> str:
    """'auto' -> the local GPU when there is one (cuda:LOCAL_RANK under torchrun), else cpu."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AstroptError("--device cuda asked for, but torch sees no GPU")
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


# ---------------------------------------------------------------------------------------------------------
# the store's identity: what a rerun must agree on


IDENTITY_KEYS = ("codec.weights_sha256", "codec.config", "bands", "storage", "sharding.num_shards",
                 "source.id", "source.split", "source.column", "source.files", "source.limit", "precision")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def check_rerun(existing: dict, wanted: dict) -> list[str]:
    """Fields where an existing store differs from what this run would write."""
    return [k for k in IDENTITY_KEYS if _get(existing, k) != _get(wanted, k)]


def prepare_store(out: Path, manifest: dict, overwrite: bool) -> None:
    """Create the store folder, or check that an existing one was made by the same command."""
    ensure_folder(out, "the store folder")
    path = out / st.MANIFEST
    if path.is_file():
        try:
            existing = st.read_manifest(out)
        except AstroptError:
            existing = None
        diff = ["manifest"] if existing is None else check_rerun(existing, manifest)
        if diff and not overwrite:
            raise AstroptError(
                f"{out} holds a store made with a different {', '.join(diff)}; "
                f"choose another --out or pass --overwrite to replace it"
            )
        if diff:
            _clear_store(out)
        elif existing.get("complete"):
            return  # nothing to do but report
    elif out.exists() and any(out.iterdir()) and not overwrite:
        if any(p.name.startswith("shard-") for p in out.iterdir()):
            raise AstroptError(f"{out} holds shards but no manifest; pass --overwrite to replace them")
    if not path.is_file():
        st.write_manifest(out, manifest)


def await_replaced_store(out: Path, manifest: dict, timeout_s: float) -> None:
    """`--overwrite` in a task other than the first of a SLURM array: wait until the store's manifest is the
    one this run would write (task 0 clears a different store and writes it), so that no task clears shards
    another has written. A matching store is used at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if (out / st.MANIFEST).is_file() and not check_rerun(st.read_manifest(out), manifest):
                return
        except AstroptError:
            pass  # being rewritten
        if time.monotonic() >= deadline:
            raise AstroptError(f"waited {timeout_s:g} s for array task 0 to replace {out} (with --overwrite only "
                               "task 0 clears a store); run it, or run the --overwrite once alone first")
        time.sleep(min(2.0, max(0.05, timeout_s / 20)))


def _clear_store(out: Path) -> None:
    for p in out.iterdir():
        if p.name.startswith(("shard-", ".shard-")) or p.name in (st.MANIFEST, st.REJECTS, st.DONE_DIR):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _remove_stale_temporaries(out: Path, index: int) -> None:
    name = st.shard_name(index, "x").rsplit(".", 1)[0]
    for p in out.glob(f".{name}.*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# encoding


@dataclass
class PreparedBatch:
    """A batch of checked flux ready for the codec, with the bookkeeping of the rows it came from."""

    flux: object  # torch tensor [n, bands, 96, 96] float32 (pinned on a GPU run)
    rows: np.ndarray  # [n] global source rows of the good rows
    object_ids: list  # [n]
    rejects: list[dict]  # bad rows met while preparing this batch


def prepare_shards(plan, shards: list[tuple[int, int, int]], cfg: TokeniseConfig, pin: bool):
    """For each (index, lo, hi) in `shards`, in order, yield (index, iterator of codec-sized PreparedBatch).

    Three stages run ahead of the thread that drives the codec, so it only ever picks up a ready batch:
    `cfg.workers` DataLoader worker processes read and convert parquet row groups (no GIL between them and
    the codec's thread); a staging thread regroups their chunks into codec-sized batches, copying them
    straight into pinned memory on a GPU run (one copy, made while the codec runs, not between batches);
    and a queue holds a few batches across shard boundaries, so the device does not wait while one shard is
    written and the next begins. Each shard's iterator must be consumed before the next is taken; `close()`
    on this generator (or its garbage collection) stops the stages.
    """
    row_groups = None
    if cfg.reader == "datasets":  # a streaming source: convert its batches in threads, in order
        items = ((i, item) for i, lo, hi in shards
                 for item in iter_row_range_datasets(plan, lo, hi, batch_rows=cfg.batch_size))
        convert = _Converter(plan, list(cfg.bands))
        chunks = _ordered_map(lambda tagged: (tagged[0], convert(*tagged[1])), items, cfg.workers)
    else:
        import torch

        tasks = [(i, task) for i, lo, hi in shards for task in read_tasks(plan, lo, hi)]
        row_groups = _RowGroups(plan, tasks, list(cfg.bands))
        chunk_bytes = max((t.count for _, t in tasks), default=0) * len(cfg.bands) * CROP_SIZE * CROP_SIZE * 4
        workers = workers_for_shared_memory(cfg.workers, chunk_bytes, _free_shared_memory())
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
    """Runs a generator of (shard, batch-or-None) in a thread, `depth` items ahead of the consumer."""

    _STOP = object()

    def __init__(self, items, depth: int = 3):
        self.items = items
        self.ready: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="astropt-staging", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for item in self.items:
                if not self._put(item):
                    return
            self._put(self._STOP)
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            self._put(exc)
        finally:
            self.items = None  # drops the DataLoader iterator, which stops its workers

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def shard(self, index: int) -> Iterator[PreparedBatch]:
        """The batches of shard `index`, which must be the next shard in the staged order."""
        while True:
            item = self.ready.get()
            if isinstance(item, BaseException):
                raise item
            if item is self._STOP:
                raise RuntimeError(f"the staging thread ended before shard {index}")
            shard, batch = item
            assert shard == index, f"staged shard {shard} where shard {index} was expected"
            if batch is None:
                return
            yield batch

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


class _Converter:
    """One record batch -> a PreparedBatch of checked, cropped, band-ordered flux."""

    def __init__(self, plan, bands: list[str]):
        self.plan, self.bands = plan, bands

    def __call__(self, first_row: int, batch) -> PreparedBatch:
        import torch

        shape = (batch.num_rows, len(self.bands), CROP_SIZE, CROP_SIZE)
        buffer = torch.empty(shape, dtype=torch.float32)
        flux, good, reasons = batch_to_flux(batch, self.plan.column, self.bands, out=buffer.numpy(), crop=CROP_SIZE)
        ids = object_ids_of(batch, self.plan.id_column)
        rejects = [_reject(first_row + r, ids[r], reasons[r]) for r in range(batch.num_rows) if reasons[r]]
        return PreparedBatch(buffer[: len(good)], first_row + good, [ids[g] for g in good], rejects)


class _RowGroups:
    """A map-style dataset of read tasks: item k is (shard, PreparedBatch) of task k, read in a worker."""

    def __init__(self, plan, tasks: list, bands: list[str]):
        self.plan, self.tasks = plan, tasks
        self.convert = _Converter(plan, bands)
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
        return PreparedBatch(first.flux[:n], first.rows[:n], first.object_ids[:n], rejects)
    flux, rows, ids, taken = [], [], [], 0
    for c in held:
        k = min(n - taken, len(c.rows))
        flux.append(c.flux[:k])
        rows.append(c.rows[:k])
        ids.extend(c.object_ids[:k])
        taken += k
    merged = torch.empty((n, *held[0].flux.shape[1:]), dtype=held[0].flux.dtype, pin_memory=pin)
    torch.cat(flux, out=merged)  # from the workers' shared memory straight into pinned memory on a GPU run
    return PreparedBatch(merged, np.concatenate(rows), ids, rejects)


def _rest(held: list[PreparedBatch], n: int) -> list[PreparedBatch]:
    """What remains of `held` after its first n good rows and all its rejects were handed on."""
    rest, taken = [], 0
    for c in held:
        k = min(n - taken, len(c.rows))
        taken += k
        if k < len(c.rows):
            rest.append(PreparedBatch(c.flux[k:], c.rows[k:], c.object_ids[k:], []))
    return rest


def _reject(row: int, object_id, reason: str) -> dict:
    rec = {"row": int(row)}
    if object_id is not None:
        rec["object_id"] = object_id
    rec["reason"] = reason
    return rec


class Encoder:
    """The codec on its device, with the precision the manifest records; `encode` returns checked tokens."""

    def __init__(self, loaded, device: str, precision: str, bands: list[str]):
        import torch

        if precision not in PRECISIONS:
            raise AstroptError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.loaded = loaded
        self.codec = loaded.codec
        self.device = torch.device(device)
        self.precision = precision
        self.bands = bands
        self.vocab = loaded.vocab_size
        if self.device.type == "cuda":
            allow = precision == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = allow
            torch.backends.cudnn.allow_tf32 = allow
        from aion.modalities import HSCImage, LegacySurveyImage

        self.image_type = HSCImage if bands[0].startswith("HSC") else LegacySurveyImage

    def submit(self, flux):
        """Start encoding [n, bands, 96, 96] flux; returns a handle for `result`. On a GPU nothing waits here:
        the host copy of the tokens lands in pinned memory when the device gets there."""
        import torch

        x = flux.to(self.device, non_blocking=True)
        if x.data_ptr() == flux.data_ptr():
            x = x.clone()  # AION's Clamp writes into its input: never hand it memory we do not own
        tokens = self.encode_on_device(x)  # [n, T] int32
        if self.device.type != "cuda":
            return tokens, None
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done

    def encode_on_device(self, x):
        """The codec on flux `x` already on the device (and ours to modify): [n, T] int32 tokens, still there.

        The device is made the default one while AION encodes: its ImagePadder builds a zero tensor
        [n, 9 bands, 96, 96] with `torch.zeros(...).to(image.device)`, which would otherwise be allocated and
        zeroed on the host and copied over (85 MB at n=256, a pageable copy that waits for the device) on
        every batch. Under the default device it is made on the device; the tokens are the same."""
        import torch

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        mixed = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), mixed, self.device:
            return self.codec.encode(self.image_type(flux=x, bands=self.bands))

    def result(self, handle) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [n, T] int64, ok [n] bool) of a submitted batch: ok is False where a token is outside 0..vocab-1."""
        host, done = handle
        if done is not None:
            done.synchronize()
        tokens = host.numpy().astype(np.int64)
        return tokens, ((tokens >= 0) & (tokens < self.vocab)).all(axis=1)

    def encode(self, flux) -> tuple[np.ndarray, np.ndarray]:
        """`result(submit(flux))`: encode one batch and wait for it."""
        return self.result(self.submit(flux))


# ---------------------------------------------------------------------------------------------------------
# one shard


@dataclass
class EncodedShard:
    """One shard's checked tokens, in source-row order, ready to be written."""

    index: int
    tokens: np.ndarray  # [rows, T] int16 or uint16
    rows: np.ndarray  # [rows] int64 global source rows
    object_ids: list | None
    rejects: list[dict]  # sorted by row
    seconds: float  # encoding, waits for input included
    input_wait_s: float


def encode_shard(batches: Iterator[PreparedBatch], encoder: Encoder, cfg: TokeniseConfig, index: int,
                 dtype: np.dtype, has_ids: bool, on_rows=None, on_first_batch=None) -> EncodedShard:
    """Encode one shard's batches. `on_rows(n)` is told of rows as they are done, `on_first_batch(seconds)` of
    the wait for the shard's first batch."""
    t0 = time.perf_counter()
    tokens_parts, rows_parts, ids, rejects = [], [], [], []
    in_flight = None  # (batch, handle): the device works on one batch while the host prepares the next

    def collect(batch: PreparedBatch, handle) -> None:
        tokens, ok = encoder.result(handle)
        for j in np.nonzero(~ok)[0]:
            _bad_row(_reject(batch.rows[j], batch.object_ids[j], "codec produced tokens outside the vocabulary "
                             "(non-finite values inside the codec)"), cfg, rejects)
        tokens_parts.append(tokens[ok].astype(dtype))
        rows_parts.append(batch.rows[ok])
        ids.extend(i for i, good in zip(batch.object_ids, ok) if good)
        if on_rows is not None:
            on_rows(len(batch.rows))

    waited = 0.0
    batches = iter(batches)
    while True:
        t_wait = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - t_wait
        if batch is None:
            break
        if on_first_batch is not None:
            on_first_batch(waited)
            on_first_batch = None
        for rej in batch.rejects:
            _bad_row(rej, cfg, rejects)
        if on_rows is not None:
            on_rows(len(batch.rejects))
        if len(batch.rows):
            handle = encoder.submit(batch.flux)
            if in_flight is not None:
                collect(*in_flight)
            in_flight = (batch, handle)
    if in_flight is not None:
        collect(*in_flight)
    T = encoder.loaded.tokens_per_image
    tokens = np.concatenate(tokens_parts) if tokens_parts else np.zeros((0, T), dtype=dtype)
    rows = np.concatenate(rows_parts) if rows_parts else np.zeros(0, dtype=np.int64)
    rejects.sort(key=lambda r: r["row"])
    return EncodedShard(index, tokens, rows, ids if has_ids else None, rejects, time.perf_counter() - t0, waited)


def write_encoded_shard(encoded: EncodedShard, out: Path, storage: str) -> ShardResult:
    """Write a shard and its completion record atomically (temporary name, fsync, rename)."""
    t0 = time.perf_counter()
    _remove_stale_temporaries(out, encoded.index)
    record = st.write_shard(out, encoded.index, storage, encoded.tokens, encoded.rows, encoded.object_ids,
                            rejected=len(encoded.rejects))
    st.mark_shard_done(out, record, encoded.rejects)
    write_s = time.perf_counter() - t0
    return ShardResult(encoded.index, record.rows, len(encoded.rejects), False, encoded.seconds,
                       encoded.input_wait_s, write_s)


def _bad_row(rej: dict, cfg: TokeniseConfig, rejects: list) -> None:
    if cfg.strict:
        who = f" ({rej['object_id']})" if "object_id" in rej else ""
        raise AstroptError(f"bad source row {rej['row']}{who}: {rej['reason']} (--strict stops at the first bad row)")
    rejects.append(rej)


# ---------------------------------------------------------------------------------------------------------
# the whole job


def tokenise(cfg: TokeniseConfig) -> TokeniseSummary:
    """Tokenise this process's shards of the source into the store at `cfg.out`; finalize when all are done."""
    from astropt_tok.codec import load_image_codec
    from astropt_tok.source import resolve_source

    t_start = time.perf_counter()
    if cfg.storage not in st.STORAGES:
        raise AstroptError(f"--format must be one of {', '.join(st.STORAGES)}, got {cfg.storage!r}")
    if cfg.batch_size < 1:
        raise AstroptError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.workers is not None and cfg.workers < 0:
        raise AstroptError(f"--workers must be 0 (read in this process) or more, got {cfg.workers}")
    if cfg.reader not in ("pyarrow", "datasets"):
        raise AstroptError(f"--reader must be pyarrow or datasets, got {cfg.reader!r}")
    bands = list(cfg.bands)
    from aion.codecs.preprocessing.band_to_index import BAND_TO_INDEX

    unknown = [b for b in bands if b not in BAND_TO_INDEX]
    if unknown or len({b.split("-")[0] for b in bands}) != 1:
        raise AstroptError(f"--bands must be bands of one survey known to AION ({', '.join(BAND_TO_INDEX)}); "
                           f"got {','.join(bands)}")
    rank, world = process_rank(cfg)
    plan = resolve_source(cfg.source, cfg.split, cfg.column, cfg.id_column, cfg.limit)
    device = resolve_device(cfg.device)
    if cfg.workers is None:
        cfg = dataclasses.replace(cfg, workers=default_workers(device))
    loaded = load_image_codec(cfg.codec, device=device)
    dtype = st.token_dtype(loaded.vocab_size)
    out = Path(cfg.out)
    manifest = st.new_manifest(loaded.describe(), bands, cfg.storage, cfg.shards, cfg.precision, plan.describe())
    group = _TorchrunGroup(world)
    if rank != 0 and not group.active and cfg.overwrite:
        await_replaced_store(out, manifest, cfg.overwrite_wait_s)  # task 0 of the array replaces it
    elif rank == 0 or not group.active:  # SLURM array tasks each check (or create) the store themselves
        prepare_store(out, manifest, cfg.overwrite)
    group.barrier()  # under torchrun, the other ranks look only once rank 0 has created or checked the store
    if rank != 0 and group.active:
        diff = check_rerun(st.read_manifest(out), manifest)
        if diff:
            raise AstroptError(f"{out} holds a store made with a different {', '.join(diff)}")
    bounds = st.shard_bounds(plan.num_rows, cfg.shards)
    mine = shards_for_this_process(cfg.shards, rank, world)
    done = st.read_done_records(out, cfg.shards)
    summary = TokeniseSummary(str(out), cfg.shards, mine, device=device, precision=cfg.precision)
    encoder = Encoder(loaded, device, cfg.precision, bands)

    todo = [i for i in mine if i not in done]
    for i in mine:
        if i in done:
            s = done[i]["shard"]
            summary.results.append(ShardResult(i, s["rows"], s["rejected"], True))
    total_rows = sum(bounds[i + 1] - bounds[i] for i in todo)
    with _Progress(cfg.progress and rank == 0, total_rows, len(mine), len(mine) - len(todo),
                   loaded.tokens_per_image) as progress:
        pin = encoder.device.type == "cuda"
        work = prepare_shards(plan, [(i, bounds[i], bounds[i + 1]) for i in todo], cfg, pin)
        t_work = time.perf_counter()

        def first_batch(waited: float) -> None:
            if not summary.first_batch_s:
                summary.first_batch_s, summary.first_wait_s = time.perf_counter() - t_work, waited

        # A writer thread writes (hashes, fsyncs) each shard while the codec encodes the next; one write at a
        # time is pending, so at most two shards' tokens are held in memory.
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="astropt-writer")
        pending = None

        def finish_pending() -> None:
            summary.results.append(pending.result())
            progress.shard_done()

        try:
            for i, batches in work:
                encoded = encode_shard(batches, encoder, cfg, i, dtype, plan.id_column is not None,
                                       progress.advance, first_batch)
                if pending is not None:
                    finish_pending()
                pending = writer.submit(write_encoded_shard, encoded, out, cfg.storage)
            if pending is not None:
                finish_pending()
        finally:
            work.close()  # stops the reader processes and the staging thread, also after an error
            writer.shutdown(wait=True)  # a shard encoded in full is still written
        summary.work_s = time.perf_counter() - t_work
    summary.results.sort(key=lambda r: r.index)
    group.barrier()  # every rank's shards are written before anyone checks whether the store is complete
    group.close()
    final = st.finalize_store(out, st.read_manifest(out) if (out / st.MANIFEST).is_file() else manifest)
    summary.complete = final is not None
    summary.seconds = time.perf_counter() - t_start
    summary.rows_per_s = (summary.rows + summary.rejected) / summary.work_s if summary.work_s else 0.0
    return summary


class _TorchrunGroup:
    """A gloo process group when running under torchrun (RANK/WORLD_SIZE/MASTER_ADDR), else nothing."""

    def __init__(self, world: int):
        self.active = world > 1 and "MASTER_ADDR" in os.environ
        if self.active:
            import datetime

            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.destroy_process_group()


class _Progress:
    """A rich progress bar (rows/s, tokens/s, shards done, ETA), or nothing when not wanted."""

    def __init__(self, enabled: bool, total_rows: int, total_shards: int, done_shards: int, tokens_per_image: int):
        self.enabled = enabled and total_rows > 0
        self.tokens_per_image = tokens_per_image
        self.total_shards, self.done_shards = total_shards, done_shards
        self.t0 = time.perf_counter()
        self.rows = 0
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]tokenise"), BarColumn(), TextColumn("{task.completed}/{task.total} rows"),
                TextColumn("{task.fields[rate]}"), TextColumn("shards {task.fields[shards]}"),
                TimeElapsedColumn(), TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("tokenise", total=total_rows, rate="", shards=self._shards())

    def _shards(self) -> str:
        return f"{self.done_shards}/{self.total_shards}"

    def __enter__(self):
        if self.enabled:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()

    def advance(self, rows: int) -> None:
        self.rows += rows
        if self.enabled:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            rate = f"{self.rows / dt:,.1f} rows/s {self.rows * self.tokens_per_image / dt:,.0f} tok/s"
            self.bar.update(self.task, advance=rows, rate=rate)

    def shard_done(self) -> None:
        self.done_shards += 1
        if self.enabled:
            self.bar.update(self.task, shards=self._shards())
