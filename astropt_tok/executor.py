"""The executor: which process does which shards (torchrun ranks, SLURM array tasks), on which device, with
how many reader processes, and who creates or replaces the store while the others wait. The work itself
(reading, encoding, writing) knows nothing of processes; it is handed a list of shard indices.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from astropt_tok import store as st
from astropt_tok.errors import AstroptError, ensure_folder
from astropt_tok.launch import LaunchEnv, read_launch


def launch_of(cfg) -> LaunchEnv:
    """How this tokenise process takes part: the config's rank/world_size when a caller assigns them (then it
    acts as an array task does: it prepares the store itself and joins no process group), else the checked
    launch environment (torchrun's RANK/WORLD_SIZE, a SLURM array, or one process)."""
    if cfg.rank is not None or cfg.world_size is not None:
        rank, world = int(cfg.rank or 0), int(cfg.world_size or 1)
        if not 0 <= rank < world:
            raise AstroptError(f"process rank {rank} is outside a world of {world} processes")
        return LaunchEnv("single" if world == 1 else "slurm-array", rank, world)
    return read_launch()


def process_rank(cfg) -> tuple[int, int]:
    """(rank, world size) of this tokenise process (see `launch_of`)."""
    launch = launch_of(cfg)
    return launch.rank, launch.world_size


def shards_for_this_process(num_shards: int, rank: int, world: int) -> list[int]:
    """Shards i with i % world == rank: every process gets an even share, in a fixed order."""
    return list(range(rank, num_shards, world))


def default_workers(device: str, processes_per_node: int = 1) -> int:
    """Reader processes when --workers is not given: on a GPU, min(8, this process's share of the cores - 1),
    leaving a core to drive the codec (torchrun's LOCAL_WORLD_SIZE processes share the node); on a CPU none,
    since the codec needs every core and reading in-process is as fast as pyarrow itself."""
    if not device.startswith("cuda"):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    share = cores // max(1, processes_per_node)
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


def free_shared_memory() -> int | None:
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


def check_device_name(device: str) -> None:
    """A --device value that names no device kind is one error (without importing torch)."""
    if device != "auto" and device not in ("cpu", "mps") and device.partition(":")[0] != "cuda":
        raise AstroptError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")


def resolve_device(device: str, launch: LaunchEnv | None = None) -> str:
    """'auto' -> the local GPU when there is one (cuda:LOCAL_RANK under torchrun: `launch`, None for a single
    process), else cpu. A GPU that is not there, or more torchrun processes on this node than it has GPUs, is
    one clear error, raised by every process before any work."""
    import torch

    launch = launch or LaunchEnv()

    check_device_name(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AstroptError("--device cuda asked for, but torch sees no GPU")
        gpus = torch.cuda.device_count()
        if device == "cuda":
            check_processes_per_gpu(launch.processes_per_node, launch.local_rank, gpus)
            device = f"cuda:{launch.local_rank}"
        elif not device.partition(":")[2].isdigit() or int(device.partition(":")[2]) >= gpus:
            raise AstroptError(f"--device {device}: this node has {gpus} GPU{'s' * (gpus != 1)} "
                               f"(cuda, or cuda:0..cuda:{gpus - 1})")
    return device


def check_processes_per_gpu(local_world_size: int, local_rank: int, gpus: int) -> None:
    """One process per GPU: more processes on this node (torchrun's LOCAL_WORLD_SIZE) than GPUs is an error
    naming both counts."""
    if local_world_size > gpus or local_rank >= gpus:
        raise AstroptError(
            f"torchrun started {max(local_world_size, local_rank + 1)} processes per node but this node has {gpus} "
            f"GPU{'s' * (gpus != 1)}: one process per GPU (--nproc_per_node {gpus}), or --device cpu")


@contextlib.contextmanager
def tf32_allowed(allow: bool):
    """TF32 for CUDA matrix products and cuDNN convolutions on (`allow`) or off inside the block, and back to
    what it was after it. torch's default leaves cuDNN convolutions in TF32 (10-bit mantissa), so an AION
    decode on a GPU differs from its fp32 decode by ~1e-3 unless this turns it off."""
    import torch

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ---------------------------------------------------------------------------------------------------------
# the store's identity: what a rerun must agree on


# Everything in a manifest that shapes what the shards hold: the codec's weights and settings, the bands and
# image columns, the source (which files, split, rows, id column: the shards' object_id), how tokens are
# computed and stored. A re-run that differs in any of them would mix two kinds of rows in one store.
IDENTITY_KEYS = ("codec.weights_sha256", "codec.config", "bands", "storage", "sharding.num_shards",
                 "source.id", "source.kind", "source.revision", "source.split", "source.column", "source.id_column",
                 "source.files", "source.limit", "precision", "modalities", "keep_partial")
# keys that a store made by another version (or by hand) may lack: absent there means "not recorded", so they are
# compared only when both manifests hold them; a hub revision is compared only when both runs could resolve one
# (offline, the cache may not say)
_WHEN_RECORDED = ("source.kind", "source.revision", "source.id_column")
_ABSENT = object()


def _get(d: dict, dotted: str, absent=None):
    for part in dotted.split("."):
        d = d.get(part, absent) if isinstance(d, dict) else absent
    return d


def _file_list(files) -> list | None:
    """(absolute path, rows) of a manifest's source files: fingerprints are compared apart (`source_changed`),
    and relative paths of format-1 stores count from the working folder, as they did when recorded."""
    if not isinstance(files, list):
        return None
    return [(f.get("path") if "://" in str(f.get("path")) else os.path.abspath(str(f.get("path"))), f.get("rows"))
            if isinstance(f, dict) else f for f in files]


def check_rerun(existing: dict, wanted: dict) -> list[str]:
    """Fields where an existing store differs from what this run would write."""
    norm = {"source.files": _file_list}
    diff = []
    for k in IDENTITY_KEYS:
        old, new = _get(existing, k, _ABSENT), _get(wanted, k, _ABSENT)
        if k in _WHEN_RECORDED and (old is _ABSENT or new is _ABSENT or (k == "source.revision" and None in (old, new))):
            continue
        old, new = (None if v is _ABSENT else v for v in (old, new))
        if norm.get(k, lambda v: v)(old) != norm.get(k, lambda v: v)(new):
            diff.append(k)
    return diff


def _changed_source_files(existing: dict, wanted: dict) -> list[str]:
    from astropt_tok.source import SourceFile, changed_files

    found = [SourceFile(f["path"], f["rows"], None, f.get("bytes"), f.get("fingerprint"))
             for f in wanted["source"].get("files") or []]
    return changed_files(existing["source"].get("files") or [], found)


def check_source_unchanged(out: Path, existing: dict, wanted: dict) -> None:
    """Refuse a store whose source files changed since it was begun (same path and rows, other content)."""
    changed = _changed_source_files(existing, wanted)
    if changed:
        raise AstroptError(f"source file {changed[0]} changed since {out} was begun from it (its size or parquet "
                           f"footer differ): a store must not mix two versions of a survey; restore the file, "
                           f"or pass --overwrite to start the store again")
    if any(isinstance(f, dict) and not f.get("fingerprint") for f in existing["source"].get("files") or []):
        print(f"note: {out} was made by an older version that kept no source fingerprints: whether the source "
              "files changed since cannot be checked", file=sys.stderr)


def prepare_store(out: Path, manifest: dict, overwrite: bool) -> None:
    """Create the store folder, or check that an existing one was made by the same command. The caller has
    claimed `out` as a token store (astropt_tok.artifacts), so --overwrite clears only a store's own files."""
    ensure_folder(out, "the store folder")
    path = out / st.MANIFEST
    if path.is_file():
        try:
            existing = st.read_manifest(out)
        except AstroptError:
            existing = None
        diff = ["manifest"] if existing is None else check_rerun(existing, manifest)
        if not diff and not overwrite:
            check_source_unchanged(out, existing, manifest)
        elif not diff and changed_source(existing, manifest):
            diff = ["source file"]
        if diff and not overwrite:
            raise AstroptError(
                f"{out} holds a store made with a different {', '.join(diff)}; "
                f"choose another --out or pass --overwrite to replace it"
            )
        if diff:
            from astropt_tok.artifacts import clear_own

            clear_own(out, "token-store")  # the store's files only: never the lock, the record or a stranger's file
        elif existing.get("complete"):
            bad = st.shards_not_matching(out, existing)
            if not bad:
                return  # nothing to do but report
            print(f"note: store {out} was complete, but {', '.join(bad)} is missing or not of its recorded size: "
                  f"redoing it", file=sys.stderr)
            st.write_manifest(out, manifest)  # not complete while they are redone
    elif out.exists() and any(out.iterdir()) and not overwrite:
        if any(p.name.startswith("shard-") for p in out.iterdir()):
            raise AstroptError(f"{out} holds shards but no manifest; pass --overwrite to replace them")
    if not path.is_file():
        st.write_manifest(out, manifest)


def changed_source(existing: dict, wanted: dict) -> bool:
    """Whether any source file's fingerprint differs from the one the existing store recorded."""
    return bool(_changed_source_files(existing, wanted))


def await_replaced_store(out: Path, manifest: dict, timeout_s: float) -> None:
    """`--overwrite` in a task other than the first of a SLURM array: wait until the store's manifest is the
    one this run would write (task 0 clears a different store and writes it), so that no task clears shards
    another has written. A matching store is used at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if (out / st.MANIFEST).is_file():
                existing = st.read_manifest(out)
                if not check_rerun(existing, manifest) and not changed_source(existing, manifest):
                    return
        except AstroptError:
            pass  # being rewritten
        if time.monotonic() >= deadline:
            raise AstroptError(f"waited {timeout_s:g} s for array task 0 to replace {out} (with --overwrite only "
                               "task 0 clears a store); run it, or run the --overwrite once alone first")
        time.sleep(min(2.0, max(0.05, timeout_s / 20)))


def remove_stale_temporaries(out: Path, index: int) -> None:
    name = st.shard_name(index, "x").rsplit(".", 1)[0]
    for p in out.glob(f".{name}.*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@contextmanager
def torch_threads(n: int | None):
    """Use n torch CPU threads inside the block, then restore the previous count (None: leave it alone).

    Sampling runs hundreds of tiny per-token steps; on a busy small machine one thread avoids OpenMP
    threads waiting on each other at every step (measured 18x faster on the shared 2-core dev box).
    """
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


SMALL_CPU_CORES = 4  # at or below this many cores, sampling and decoding default to one torch thread


def default_cpu_threads(device: str) -> int | None:
    """Torch threads for decoding and sampling on `device`: 1 on a CPU of <= 4 cores, else None (torch's own).

    Sampling runs hundreds of tiny per-token steps; on a small CPU torch's threads wait on each other at every
    one (BENCHMARKS.md: `decode --generate` on the 2-core box, --threads 1 against 2).
    """
    if device != "cpu":
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if cores <= SMALL_CPU_CORES else None
