"""The entry point of training: `train(cfg)` gives this process its place in the job (launch variables, device,
process group, deterministic kernels, the stop-signal flag, threads) and runs `astropt_train.trainer.Trainer`.

Single process: `astropt train ...`. DDP: `torchrun --nproc_per_node N -m astropt_tok train ...` (nccl on
GPUs, gloo on CPU); each rank reads a disjoint part of every epoch, rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from astropt_tok.errors import AstroptError
from astropt_train.config import TrainConfig


@dataclass
class Dist:
    """This process's place in a (possibly one-process) job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    ddp: bool = False

    @property
    def master(self) -> bool:
        """Whether this process logs and writes checkpoints."""
        return self.rank == 0


def _pick_device(cfg: TrainConfig, dist: Dist, launch):
    """This process's device: tokenise's `resolve_device` (cuda:LOCAL_RANK under torchrun; a missing GPU or
    more processes than GPUs is one clear error), made the current CUDA device."""
    import torch

    from astropt_tok.executor import resolve_device

    dev = torch.device(resolve_device(cfg.device, launch))
    if dev.type == "cuda":
        if dist.ddp:
            dev = torch.device(f"cuda:{dist.local_rank}")
        torch.cuda.set_device(dev)
    return dev


CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")  # the cuBLAS workspace settings that make its results reproducible


@contextmanager
def deterministic_mode(enabled: bool):
    """Deterministic kernels inside the block (`--deterministic`), and torch's previous settings after it.

    On a GPU, floating-point sums whose order depends on thread scheduling (atomic adds, split reductions,
    cuBLAS's workspace, autotuned kernel configs) make two identical runs drift apart after a few steps.
    This asks torch for deterministic algorithms (an error names any op that has none), cuDNN's
    deterministic convolutions without benchmarking, Inductor's deterministic mode for torch.compile (no
    on-device autotuning that changes numerics) and a fixed cuBLAS workspace. CUBLAS_WORKSPACE_CONFIG is read
    when cuBLAS starts, so it is set here, before this process's first CUDA work; when CUDA already started
    without it, that is an error rather than a silent miss. On a CPU the kernels are deterministic anyway."""
    import torch

    if not enabled:
        yield
        return
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in CUBLAS_DETERMINISTIC:
        if torch.cuda.is_initialized():
            raise AstroptError("--deterministic needs CUBLAS_WORKSPACE_CONFIG=:4096:8 before CUDA starts, and CUDA "
                               "already started in this process: set it in the environment")
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC[0]
    inductor = getattr(getattr(torch, "_inductor", None), "config", None)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark, getattr(inductor, "deterministic", None))
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    if before[3] is not None:
        inductor.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]
        if before[3] is not None:
            inductor.deterministic = before[3]


def _dist_of(launch) -> Dist:
    """This process's place from its checked launch environment (`astropt_tok.launch`)."""
    if launch.distributed:
        return Dist(launch.rank, launch.world_size, launch.local_rank, True)
    return Dist()


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and returns."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The config with its store, run folder and local codec and --init-from paths made absolute: the run's
    config.json and train_config.toml then work from any working folder (`--config` from elsewhere)."""
    def local(path: str | None) -> str | None:
        return str(Path(path).expanduser().resolve()) if path and Path(path).expanduser().exists() else path

    tokens = cfg.tokens if cfg.tokens.startswith("hf:") else str(Path(cfg.tokens).expanduser().resolve())
    return dataclasses.replace(cfg, tokens=tokens,
                               out=str(Path(cfg.out).expanduser().resolve()), codec=local(cfg.codec),
                               init_from=local(cfg.init_from))


def train(cfg: TrainConfig) -> dict:
    """Train a GPT on a token store as `cfg` says; returns a summary (step, loss, best val loss, run dir, checkpoint)."""
    cfg.validate()
    cfg = absolute_paths(cfg)
    import torch

    from astropt_tok.executor import torch_threads
    from astropt_tok.launch import RankGroup, dist_timeout, read_launch
    from astropt_train.trainer import Trainer

    launch = read_launch(arrays=False)  # SLURM array variables: an array of runs is a sweep, not ranks of one
    dist = _dist_of(launch)
    with deterministic_mode(cfg.deterministic):  # before any CUDA work: it sets cuBLAS's workspace
        device = _pick_device(cfg, dist, launch)  # before any work, on every rank
        # under torchrun: one line saying what this rank waits for, then the rendezvous within --dist-timeout
        with RankGroup(launch).join("nccl" if device.type == "cuda" else "gloo", dist_timeout(cfg.dist_timeout)) \
                as group:
            try:
                with _StopFlag() as stop, ExitStack() as held, torch_threads(cfg.threads):
                    # held: the run folder's lock and the TF32 setting, released when train returns
                    return Trainer(cfg, dist, device, stop, held, group).run()
            except torch.cuda.OutOfMemoryError:
                raise AstroptError(
                    f"{device} ran out of memory at --batch-size {cfg.batch_size}: use a smaller --batch-size (with "
                    f"a larger --grad-accum for the same tokens per step)") from None


