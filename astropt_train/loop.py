"""The training loop: `train(cfg)` wires store, data, model, optimiser, checkpoints, validation and logs.

Single process: `astropt train ...`. DDP: `torchrun --nproc_per_node N -m astropt_tok train ...` (nccl on
GPUs, gloo on CPU); each rank reads a disjoint part of every epoch, rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import statistics
import time
import zlib
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from astropt_tok.errors import AstroptError, ensure_folder
from astropt_tok.artifacts import output_folder, update_lineage
from astropt_train.config import TrainConfig, to_toml

RUN_CONFIG = "config.json"
RUN_TOML = "train_config.toml"


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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_iters, then cosine decay to min_lr at lr_decay_iters, then flat."""
    lo, decay = cfg.final_lr(), cfg.decay_iters()
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay or decay <= cfg.warmup_iters:
        return lo
    ratio = (step - cfg.warmup_iters) / (decay - cfg.warmup_iters)
    return lo + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - lo)


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


def _rng_state(cuda: bool) -> dict:
    import torch

    return {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if cuda else {})}


def _set_rng_state(rng: dict, cuda: bool) -> None:
    import torch

    torch.set_rng_state(rng["torch"])
    if cuda and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])


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

    return dataclasses.replace(cfg, tokens=str(Path(cfg.tokens).expanduser().resolve()),
                               out=str(Path(cfg.out).expanduser().resolve()), codec=local(cfg.codec),
                               init_from=local(cfg.init_from))


def train(cfg: TrainConfig) -> dict:
    """Train a GPT on a token store as `cfg` says; returns a summary (step, loss, best val loss, run dir, checkpoint)."""
    cfg.validate()
    cfg = absolute_paths(cfg)
    import torch

    from astropt_tok.executor import torch_threads
    from astropt_tok.launch import RankGroup, dist_timeout, read_launch

    launch = read_launch(arrays=False)  # SLURM array variables: an array of runs is a sweep, not ranks of one
    dist = _dist_of(launch)
    with deterministic_mode(cfg.deterministic):  # before any CUDA work: it sets cuBLAS's workspace
        device = _pick_device(cfg, dist, launch)  # before any work, on every rank
        # under torchrun: one line saying what this rank waits for, then the rendezvous within --dist-timeout
        with RankGroup(launch).join("nccl" if device.type == "cuda" else "gloo", dist_timeout(cfg.dist_timeout)) \
                as group:
            try:
                with _StopFlag() as stop, ExitStack() as held, torch_threads(cfg.threads):
                    return _train(cfg, dist, device, stop, held, group)  # held: the run folder's lock
            except torch.cuda.OutOfMemoryError:
                raise AstroptError(
                    f"{device} ran out of memory at --batch-size {cfg.batch_size}: use a smaller --batch-size (with "
                    f"a larger --grad-accum for the same tokens per step)") from None


def _init_from(cfg: TrainConfig, store, manifest_sha: str, dims: tuple[int, int, int], modalities: list[str] | None,
               echo):
    """(model config, state dict) of `--init-from`, refused with one line when it cannot fit the store: its
    shape, its image columns, and (our runs) the codec weights and bands it was trained on."""
    from dataclasses import replace

    from astropt_tok.artifacts import check_model_store
    from astropt_train.use.interop import load_any_model

    model, info = load_any_model(cfg.init_from)
    c = model.config
    if c.block_size < store.tokens_per_image or c.vocab_size < store.vocab_size:
        raise AstroptError(f"--init-from {cfg.init_from}: its model has {c.block_size} positions and {c.vocab_size} "
                           f"tokens; store {cfg.tokens} needs {store.tokens_per_image} positions and {store.vocab_size} "
                           "tokens")
    if (c.modalities or None) != modalities:
        raise AstroptError(f"--init-from {cfg.init_from} models {','.join(c.modalities or ['images_aion'])}; this run "
                           f"trains on {','.join(modalities or ['images_aion'])} of store {cfg.tokens}: start from a "
                           "model of the same image columns (or pass --modalities to match it)")
    if info["kind"] == "astropt-train" and info["vocab_size"] != store.vocab_size:
        raise AstroptError(f"--init-from {cfg.init_from} was trained on a vocabulary of {info['vocab_size']}; "
                           f"store {cfg.tokens} has {store.vocab_size}")
    # the same vocabulary is not the same codec: token ids of another codec's weights mean other images
    for note in check_model_store(f"--init-from {info['path']}", info.get("store"), c.modalities, store, manifest_sha):
        echo(note)
    if cfg.model_given() and (c.n_layer, c.n_head, c.n_embd) != dims:
        raise AstroptError(f"--init-from {cfg.init_from} is {c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide; "
                           f"the flags ask for {dims[0]}/{dims[1]}/{dims[2]} (leave the shape flags out)")
    echo(f"initialised from {info['path']} ({info['kind']}, step {info['step']}, head {c.head}, vocab {c.vocab_size})")
    return replace(c, dropout=cfg.dropout), model.state_dict()


def _check_validation_codec(cfg: TrainConfig, store) -> list[str]:
    """Validation images decode stored tokens with --codec (else the store's): refuse, before the first step, a
    codec whose weights are not those that made the tokens (a folder refitted since, another codec), unless
    --accept-codec-change; returns notes. A codec not on this machine (a hub id offline) is checked by nobody
    here: the images then say they are off when they fail to load."""
    from types import SimpleNamespace

    from astropt_tok.artifacts import check_store_codec
    from astropt_tok.codec import local_codec_files, sha256_file

    files = local_codec_files(cfg.codec or store.codec_id)
    if files is None:
        return []
    codec = SimpleNamespace(codec_id=files.codec_id, weights_sha256=sha256_file(files.weights_path))
    return check_store_codec(f"store {store.dir}", store.manifest.get("codec") or {}, codec, cfg.accept_codec_change)


class DeliveredRows:
    """Debug (--log-rows): which training rows a delivered batch holds, found from its tokens (a fingerprint of
    each row's first-modality block), so the log shows what the DataLoader gave, not what the sampler meant to
    ask for. A row whose tokens equal an earlier row's is logged as that row; tokens of no training row: -1."""

    def __init__(self, store, train_rows: np.ndarray, modalities: list[str] | None):
        self.modalities = modalities
        first = modalities[0] if modalities else None
        tokens = store.take(train_rows, first)  # [n, T]: a debug store is small
        self.index: dict[int, int] = {}
        for row, seq in zip(train_rows.tolist(), tokens):
            self.index.setdefault(zlib.crc32(np.ascontiguousarray(seq).tobytes()), row)
        self.dtype = tokens.dtype

    def rows(self, batch) -> list[int]:
        from astropt_train.validate import split_blocks

        tokens = batch if not isinstance(batch, dict) else \
            split_blocks(batch["tokens"], batch.get("order"), self.modalities)[self.modalities[0]]
        return [self.index.get(zlib.crc32(np.ascontiguousarray(seq.numpy(), dtype=self.dtype).tobytes()), -1)
                for seq in tokens]


TRAINER_BASELINE_ROWS = 2048  # training rows the validation accuracy's baselines are counted on


def accuracy_record(summary: dict, several: bool) -> dict:
    """metrics.jsonl keys of a `TokenScores.summary()`: val_accuracy, val_top5_accuracy and the per-position
    baseline's val_accuracy_position (over all modalities' targets), and with several modalities the same per
    modality (suffix _NAME)."""
    def keys(entries: list[dict], suffix: str) -> dict:
        n = sum(e["targets"] for e in entries) or 1
        mean = lambda get: sum(get(e) * e["targets"] for e in entries) / n  # noqa: E731 (a pooled mean)
        return {f"val_accuracy{suffix}": mean(lambda e: e["accuracy"]["model"]),
                f"val_top5_accuracy{suffix}": mean(lambda e: e["top5_accuracy"]["model"]),
                f"val_accuracy_position{suffix}": mean(lambda e: e["accuracy"]["baselines"]["position"])}

    record = keys(list(summary.values()), "")
    if several:
        for m, e in summary.items():
            record.update(keys([e], f"_{m}"))
    return record


def _train(cfg: TrainConfig, dist: Dist, device, stop: _StopFlag, held: ExitStack, group) -> dict:
    """The run itself. Under DDP the collectives on the default group (the all-reduces of every step, the
    stop flags at log steps, validation) have --dist-timeout; work that rank 0 does alone while the others
    wait (the run folder and its lock, checkpoints, validation pictures and the loss curve) is followed by
    `group.wait_for_all`, whose limit is days, so a large checkpoint on a slow disk is no timeout. Rank 0's
    log lines between two collectives are the only such work left under --dist-timeout."""
    import torch
    import torch.distributed as tdist

    from astropt_tok.artifacts import check_model_store, model_store_info
    from astropt_tok.store import TokenStore, manifest_sha256
    from astropt_train import checkpoint as ck
    from astropt_train.data import EpochBatchSampler, TokenRows, batch_to_device, make_loader, split_rows
    from astropt_train.metrics import LiveDisplay, MetricsLogger
    from astropt_train.model import GPT, MODALITY, GPTConfig
    from astropt_train.validate import ImageGrid, evaluate, predict_tokens, split_blocks

    echo = print if dist.master else (lambda *a, **k: None)
    run = Path(cfg.out)
    if cfg.warmup_iters > cfg.max_iters:
        echo(f"note: --warmup-iters {cfg.warmup_iters} exceeds --max-iters {cfg.max_iters}: the learning rate "
             f"never reaches --lr {cfg.lr:g} (it ends at {lr_at(cfg.max_iters - 1, cfg):.3g}); lower --warmup-iters")

    # --- store: manifest, dtype, vocab and every shard's size are checked before the first step
    store = TokenStore(cfg.tokens)
    store.check_shards()  # each shard is the one the manifest describes (size, shape, source row ids)
    if not store.check_token_range():  # refuses tokens outside the vocabulary before the model sees one
        echo(f"note: {cfg.tokens} records no per-shard token ranges (an older store): "
             f"`astropt verify {cfg.tokens}` checks every token")
    modalities = cfg.modality_names(store)  # None: a one-column store, one modality images_aion
    # what later commands check a store against (astropt_tok.artifacts.check_model_store): the codec's weights,
    # each modality's bands, the id column; dir, manifest_sha256, codec_id and bands as before
    store_info = model_store_info(store, manifest_sha256(cfg.tokens))
    if modalities:
        store_info["shuffle_modalities"] = cfg.shuffle_modalities
    split = split_rows(store.num_rows, cfg.val_fraction, cfg.seed)
    n_layer, n_head, n_embd = cfg.model_dims()
    init = None
    if cfg.init_from and not (cfg.resume and ck.list_checkpoints(run)):
        # loaded and checked against the store before the run folder is made: a refused model leaves nothing
        init = _init_from(cfg, store, store_info["manifest_sha256"], (n_layer, n_head, n_embd), modalities, echo)
    # on every rank, though only the master draws: a refusal on the master alone would leave the others waiting
    codec_notes = _check_validation_codec(cfg, store) if cfg.val_images > 0 else []
    # the run's lineage record: the store and codec it trains on, and the weights it started from
    lineage = {"store": {"dir": store_info["dir"], "manifest_sha256": store_info["manifest_sha256"]},
               "codec": {"id": store.codec_id, "weights_sha256": store_info.get("codec_sha256")},
               "init_from": cfg.init_from}
    if dist.master:  # claimed before anything is written (another kind of folder, or files no command made, is
        # refused), under its lock: one run per run folder, a second `astropt train --out` here is refused
        held.enter_context(output_folder(run, "run", "`astropt train`", lineage=lineage))
    for note in codec_notes:
        echo(note)

    # --- resume: the newest complete checkpoint, refused if it was trained on another codec or vocabulary
    ckpt_dir = None
    existing = ck.list_checkpoints(run)
    if cfg.resume and existing:
        ckpt_dir = existing[-1][1]
    elif cfg.resume:
        echo(f"--resume: no checkpoint in {run}; starting from scratch")
    elif existing:
        raise AstroptError(f"{run} already holds checkpoints; pass --resume to continue that run, or choose another --out")
    gconf = GPTConfig(vocab_size=store.vocab_size, block_size=store.tokens_per_image * len(modalities or [0]),
                      n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=cfg.dropout, bias=cfg.bias, head=cfg.head,
                      modalities=modalities)
    state = None
    if ckpt_dir is not None:
        old = ck.read_config(ckpt_dir)
        if (old["vocab_size"], old["tokens_per_image"]) != (store.vocab_size, store.tokens_per_image):
            raise AstroptError(
                f"cannot resume {run}: it was trained on codec {old['store'].get('codec_id')!r} (vocab {old['vocab_size']}, "
                f"{old['tokens_per_image']} tokens per image) but store {cfg.tokens} has codec {store.codec_id!r} "
                f"(vocab {store.vocab_size}, {store.tokens_per_image} tokens per image)")
        saved = ck.model_config(ckpt_dir, old)
        # the codec's weights (by sha256; by id for older runs) and each modality's bands, before any step
        for note in check_model_store(f"run {run}", old["store"], saved.modalities, store,
                                      store_info["manifest_sha256"]):
            echo(note)
        if old["store"].get("manifest_sha256") != store_info["manifest_sha256"]:
            echo(f"note: {cfg.tokens} is not the store {run} was trained on (same codec and vocab); continuing")
        if (saved.modalities or None) != modalities:
            raise AstroptError(f"cannot resume {run}: it was trained on modalities "
                               f"{','.join(saved.modalities or ['images_aion'])}, this run asks for "
                               f"{','.join(modalities or ['images_aion'])}")
        if cfg.model_given() and (saved.n_layer, saved.n_head, saved.n_embd) != (n_layer, n_head, n_embd):
            raise AstroptError(f"cannot resume {run}: its model is {saved.n_layer} layers, {saved.n_head} heads, "
                               f"{saved.n_embd} wide; the flags ask for {n_layer}/{n_head}/{n_embd}")
        gconf = saved
        state = ck.load_trainer_state(ckpt_dir)
        if int(state["step"]) >= cfg.max_iters:  # nothing to do: say so, change nothing
            return {"step": int(state["step"]), "loss": float("nan"), "val_loss": None,
                    "best_val_loss": float(state["best_val_loss"]) if math.isfinite(state["best_val_loss"]) else None,
                    "run_dir": str(run), "checkpoint": str(ckpt_dir), "tokens_per_s": 0.0, "stopped": None,
                    "already_finished": True, "rank": dist.rank, "world_size": dist.world}
    init_state = None
    if cfg.init_from and state is None:  # start from another model's weights (ours, or upstream's ckpt.pt)
        if init is None:  # the run's checkpoints went away since they were listed above
            init = _init_from(cfg, store, store_info["manifest_sha256"], (n_layer, n_head, n_embd), modalities, echo)
        gconf, init_state = init

    # --- precision, seeds
    cuda = device.type == "cuda"
    if cuda:  # TF32 matmuls for training, and back to the caller's setting when train() returns
        from astropt_tok.executor import tf32_allowed

        held.enter_context(tf32_allowed(True))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[cfg.dtype] if cuda else None
    if cfg.dtype == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        amp_dtype = torch.float16
        echo("this GPU has no bf16: using fp16 with a GradScaler")
    ctx = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)

    # --- model and optimiser
    model = GPT(gconf).to(device)
    if init_state is not None:
        model.load_state_dict(init_state)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), device.type)
    step, best_val, batches_done = 0, float("inf"), 0
    rng_restored = False
    if state is not None:
        ck.load_weights(model, ckpt_dir, str(device))
        try:
            optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            d = state["data"]
            data_key = (int(d["batch_size"]), int(d["world_size"]), int(d["seed"]))
            saved_batches, saved_epoch = int(d["micro_batches_done"]), int(d["epoch"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise AstroptError(f"trainer state {ckpt_dir / ck.STATE_FILE} does not fit this model or is damaged "
                               f"({type(exc).__name__}: {str(exc)[:160]})") from None
        step, best_val = int(state["step"]), float(state["best_val_loss"])
        if data_key == (cfg.batch_size, dist.world, cfg.seed):
            batches_done = saved_batches
        else:
            echo("note: batch size, process count or seed changed since the checkpoint: data restarts at a new epoch")
            batches_done = None  # resolved below once the sampler knows its epoch length
            next_epoch = saved_epoch + 1
        per_rank = state["rng"].get("per_rank") or [state["rng"]]  # older checkpoints: rank 0's alone
        same_world = len(per_rank) == dist.world
        if same_world or dist.master:  # the master is rank 0, whose state comes first
            try:
                _set_rng_state(per_rank[dist.rank], cuda)
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
                raise AstroptError(f"trainer state {ckpt_dir / ck.STATE_FILE}: its random state is damaged "
                                   f"({type(exc).__name__}: {str(exc)[:160]})") from None
            rng_restored = True
        if not same_world and dist.master:
            echo(f"note: the checkpoint holds the random state of {len(per_rank)} processes, not {dist.world}: "
                 "the other ranks start new dropout streams")
        echo(f"resumed {run} from {ckpt_dir.name} (step {step})")
    if not rng_restored:
        torch.manual_seed(cfg.seed + 1000 * dist.rank + step)  # per-rank streams (dropout)
    raw_model = model
    compile_on = cfg.compile if cfg.compile is not None else cuda
    if compile_on:
        model = torch.compile(model)
    if dist.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if cuda else None)

    # --- data
    sampler = EpochBatchSampler(split.train, cfg.batch_size, cfg.seed, dist.rank, dist.world)
    if batches_done is None:
        batches_done = next_epoch * sampler.batches_per_epoch
    sampler.start_epoch, sampler.start_batch = sampler.position(batches_done)
    workers = cfg.workers if cfg.workers is not None else (2 if cuda else 0)
    dataset = TokenRows(store, cfg.store_reads, modalities, cfg.shuffle_modalities, cfg.seed)
    # model-free baselines for the validation accuracy (astropt_train.token_scores), counted once on a sample of
    # the training rows: each eval's accuracy is logged beside the per-position most-frequent-token map's
    from astropt_train.token_scores import TokenScores, baseline_rows, fit_baselines

    baselines = fit_baselines(store, baseline_rows(split.train, TRAINER_BASELINE_ROWS, cfg.seed),
                              {m: m for m in modalities} if modalities else {MODALITY: None})
    loader = make_loader(store, sampler, workers, pin_memory=cuda, reads=cfg.store_reads, dataset=dataset)
    seq_len = gconf.block_size - 1
    tokens_per_step = cfg.batch_size * cfg.grad_accum * dist.world * seq_len

    # --- run folder: the config actually used
    run_config = {
        "model": asdict(gconf), "train": cfg.to_dict(), "vocab_size": store.vocab_size,
        "tokens_per_image": store.tokens_per_image, "store": store_info, "split": split.rule,
        "world_size": dist.world, "tokens_per_step": tokens_per_step, "params": raw_model.num_params(),
    }
    logger = display = None
    if dist.master:
        from astropt_tok.atomic import atomic_write_text

        ensure_folder(run, "the run folder")
        update_lineage(run, **lineage)  # a resumed run may have moved on to another store of the same codec
        atomic_write_text(run / RUN_CONFIG, json.dumps(run_config, indent=2) + "\n")
        atomic_write_text(run / RUN_TOML, to_toml(cfg))
        logger = MetricsLogger(run, cfg.log, start_step=step, config=run_config, echo=echo)
        display = LiveDisplay(cfg.max_iters, step, cfg.live)
        echo = display.print
        echo(f"model {raw_model.num_params() / 1e6:.2f}M parameters ({gconf.n_layer} layers, {gconf.n_head} heads, "
             f"{gconf.n_embd} wide, vocab {gconf.vocab_size}); {split.rule['num_train']} train / "
             f"{split.rule['num_val']} val rows; {tokens_per_step:,} tokens per step on {dist.world} x {device}"
             f"{' bf16' if amp_dtype == torch.bfloat16 else ' fp16' if amp_dtype == torch.float16 else ' fp32'}"
             f"{' compiled' if compile_on else ''}{' deterministic' if cfg.deterministic else ''}")
    images = None  # {modality: ImageGrid}, one picture per modality at each eval
    if dist.master and cfg.val_images > 0:
        images = {m: ImageGrid(cfg.codec or store.codec_id, store.modality_bands.get(m, store.bands), device, echo=echo,
                               made_with=store.manifest.get("codec"), accept_changed=cfg.accept_codec_change)
                  for m in modalities or [None]}
    rows_log = None
    if cfg.log_rows:
        ensure_folder(run, "the run folder")
        rows_log = open(run / f"rows-rank{dist.rank}.txt", "a")
        delivered = DeliveredRows(store, split.train, modalities)

    last_ckpt = str(ckpt_dir) if ckpt_dir is not None else None
    last_loss, last_val = float("nan"), None
    rates: list[float] = []
    stopped = None

    def save(step_now: int, val_loss):
        nonlocal last_ckpt
        if not cfg.save:
            return
        rng = _rng_state(cuda)
        per_rank = [rng]
        if dist.ddp:  # every rank's dropout stream, so a resumed DDP run draws what the straight run would
            per_rank = [None] * dist.world
            tdist.all_gather_object(per_rank, rng)
        if dist.master:
            epoch, b = sampler.position(batches_done)
            tstate = {
                "step": step_now, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "rng": {"per_rank": per_rank},  # [rank] -> {"torch", "cuda"?}
                "data": {"micro_batches_done": batches_done, "epoch": epoch, "batch": b, "batch_size": cfg.batch_size,
                         "world_size": dist.world, "seed": cfg.seed},
                "best_val_loss": best_val,
            }
            path = ck.save_checkpoint(run, step_now, raw_model.state_dict(),
                                      {**run_config, "step": step_now, "val_loss": val_loss}, tstate)
            best = ck.read_best(run)
            # a NaN or infinite validation loss is never the best (NaN < x is False, but not against no best yet)
            if val_loss is not None and math.isfinite(val_loss) and (best is None or val_loss < best["val_loss"]):
                ck.write_best(run, step_now, val_loss)
            ck.prune(run, cfg.keep_last)
            last_ckpt = str(path)
        group.wait_for_all(f"rank 0 to write the checkpoint of step {step_now}")

    def check_finite(loss_value: float, at: int):
        if not math.isfinite(loss_value):
            where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written"
            raise AstroptError(f"loss is {loss_value} at step {at}: training stopped; {where} "
                               f"(try a lower --lr, more --warmup-iters, or --dtype bf16/fp32)")

    # --- the loop
    group.wait_for_all("rank 0 to prepare the run folder")  # its lock and settings, written by rank 0 alone
    it = iter(loader)
    model.train()
    t_last, steps_since = time.perf_counter(), 0
    bad = torch.zeros((), dtype=torch.bool, device=device)
    # the logged train loss is the mean over the steps since the last log line (summed on the device: no sync per
    # step), not one batch's: with a few galaxies per batch one batch's loss is mostly noise
    loss_sum = torch.zeros((), device=device)
    interval_loss = float("nan")
    try:
        while step < cfg.max_iters:
            lr = lr_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_acc = torch.zeros((), device=device)
            train_parts = None
            for micro in range(cfg.grad_accum):
                batch = next(it)
                if rows_log is not None:  # the rows this batch's tokens are, found by content, not recomputed
                    rows_log.write(" ".join(map(str, delivered.rows(batch))) + "\n")
                x, y, kw = batch_to_device(batch, device)
                sync = micro == cfg.grad_accum - 1
                parts = {} if modalities else None  # each modality's loss (detached), plain or --loss-chunks
                with (model.no_sync() if dist.ddp and not sync else nullcontext()), ctx:
                    logits, loss = model(x, y, loss_chunks=cfg.loss_chunks, modality_losses=parts, **kw)
                    loss = loss / cfg.grad_accum
                if sync:
                    train_parts = parts  # the last micro-batch's, for the log line
                del logits
                scaler.scale(loss).backward()
                loss_acc += loss.detach().float()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            bad |= ~torch.isfinite(loss_acc)
            loss_sum += loss_acc
            step += 1
            batches_done += cfg.grad_accum
            steps_since += 1
            if dist.ddp:  # every rank stops at the same step: the flags are combined at log steps only (no per-step sync)
                stopping = False
                if step % cfg.log_interval == 0:
                    flag = torch.tensor([1.0 if stop.signum else 0.0], device=device)
                    tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
                    stopping = bool(flag.item())
                    if stopping and stop.signum is None:
                        stop.signum = signal.SIGTERM
            else:
                stopping = stop.signum is not None
            is_eval = step % cfg.eval_interval == 0 or step == cfg.max_iters
            is_log = step % cfg.log_interval == 0 or step == cfg.max_iters or is_eval or stopping
            is_ckpt = (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0) or step == cfg.max_iters or stopping
            if is_log or is_ckpt:
                last_loss = float(loss_acc.item())
                if bool(bad.item()):
                    check_finite(float("nan") if math.isfinite(last_loss) else last_loss, step)
                check_finite(last_loss, step)
            if is_log:
                dt = time.perf_counter() - t_last
                tps = steps_since * tokens_per_step / dt
                rates.append(tps)
                mean = loss_sum / steps_since
                if dist.ddp:  # every rank logs at the same steps: the mean over all ranks' batches
                    tdist.all_reduce(mean)
                    mean /= dist.world
                interval_loss = float(mean.item())
                record = {"step": step, "loss": interval_loss, "lr": lr, "tokens_per_s": tps,
                          "grad_norm": float(grad_norm.item())}
                if cuda:
                    record["mfu"] = raw_model.estimate_mfu(tps / dist.world, seq_len=seq_len)
                for m, value in (train_parts or {}).items():
                    record[f"loss_{m}"] = float(value.item())
                if is_eval:
                    val_parts = {} if modalities else None
                    scores = TokenScores(baselines)
                    last_val = evaluate(model.module if dist.ddp else model, dataset, split.val, cfg.batch_size, cfg.eval_iters, device, ctx,
                                        dist.rank, dist.world, by_modality=val_parts, scores=scores)
                    record["val_loss"] = last_val
                    record.update(accuracy_record(scores.summary(), several=bool(modalities)))
                    if not math.isfinite(last_val):
                        echo(f"note: validation loss is {last_val} at step {step} (the training loss is finite): "
                             "not a candidate for the best checkpoint; try --dtype fp32 if it persists")
                    record.update({f"val_loss_{m}": v for m, v in (val_parts or {}).items()})
                    if images is not None:
                        shown = split.val[: cfg.val_images]
                        targets = dataset.__getitems__(shown)
                        labels = [oid if oid is not None else f"row {r}" for oid, r in zip(store.object_ids(shown), shown)]
                        predicted = predict_tokens(raw_model, targets, device, ctx, store.vocab_size)
                        if not modalities:
                            images[None].write(targets, predicted, run / "val_images" / f"step-{step:08d}.png",
                                               labels=labels, step=step)
                        else:  # one picture per modality: its block of each sequence, wherever the order put it
                            order = targets.get("order")
                            wanted = split_blocks(targets["tokens"], order, modalities)
                            got = split_blocks(predicted, order, modalities)
                            valid = targets.get("valid")  # [n, M]: a row lacking m shows its placeholder, so marked
                            for k, m in enumerate(modalities):
                                marks = [f"{label} {m}" + ("" if valid is None or valid[i, k] else " MISSING (not a galaxy)")
                                         for i, label in enumerate(labels)]
                                images[m].write(wanted[m], got[m], run / "val_images" / f"step-{step:08d}-{m}.png",
                                                labels=marks, step=step)
                if dist.master:
                    logger.log(record)
                    display.update(step, record)
                    if is_eval:
                        logger.plot()
                if is_eval:  # the first pictures load the codec on rank 0, which may take minutes
                    group.wait_for_all(f"rank 0 to draw the validation pictures of step {step}")
                t_last, steps_since = time.perf_counter(), 0
                loss_sum.zero_()
            if is_eval and last_val < best_val:
                best_val = last_val
            if is_ckpt:
                save(step, last_val if is_eval else None)
            if stopping:
                stopped = signal.Signals(stop.signum).name
                echo(f"stopped by {stopped} at step {step}"
                     + (f"; checkpoint {last_ckpt}; continue with --resume" if cfg.save else ""))
                break
    finally:
        if rows_log is not None:
            rows_log.close()
        if display is not None:
            display.close()
        if logger is not None:
            logger.close()

    steady = rates[1:] if len(rates) > 1 else rates
    tps = statistics.median(steady) if steady else 0.0
    summary = {
        "step": step, "loss": interval_loss, "val_loss": last_val,
        "best_val_loss": best_val if math.isfinite(best_val) else None, "run_dir": str(run),
        "checkpoint": last_ckpt, "tokens_per_s": tps, "stopped": stopped, "params": raw_model.num_params(),
        "device": str(device), "rank": dist.rank, "world_size": dist.world,
    }
    if cuda:
        summary["mfu"] = raw_model.estimate_mfu(tps / dist.world, seq_len=seq_len)
        summary["gpu"] = torch.cuda.get_device_name(device)
    return summary
