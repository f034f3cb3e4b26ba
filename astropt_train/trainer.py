"""The trainer: one object per run, with one method per job (store, run folder, resume, model, data, logs, the
step, validation, pictures, checkpoints), wired by `Trainer.run`.

`astropt_train.loop.train` makes the process's place in the job (device, process group, signal flag) and hands
it here. Under DDP every rank builds the same Trainer; rank 0 (the master) alone claims the run folder, logs,
draws and writes checkpoints, and the others wait for it at `group.wait_for_all`.
"""

from __future__ import annotations

import json
import math
import signal
import statistics
import time
import zlib
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np

from astropt_tok.artifacts import output_folder, update_lineage
from astropt_tok.errors import AstroptError, ensure_folder
from astropt_train.config import TrainConfig, to_toml

RUN_CONFIG = "config.json"
RUN_TOML = "train_config.toml"
TRAINER_BASELINE_ROWS = 2048  # training rows the validation accuracy's baselines are counted on


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_iters, then cosine decay to min_lr at lr_decay_iters, then flat."""
    lo, decay = cfg.final_lr(), cfg.decay_iters()
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay or decay <= cfg.warmup_iters:
        return lo
    ratio = (step - cfg.warmup_iters) / (decay - cfg.warmup_iters)
    return lo + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - lo)


def rng_state(cuda: bool) -> dict:
    """This process's torch (and CUDA) random state."""
    import torch

    return {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if cuda else {})}


def set_rng_state(rng: dict, cuda: bool) -> None:
    """Restore a state `rng_state` returned."""
    import torch

    torch.set_rng_state(rng["torch"])
    if cuda and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])


def init_from_model(cfg: TrainConfig, store, manifest_sha: str, dims: tuple[int, int, int],
                    modalities: list[str] | None, echo):
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
    shapes = cfg.model_shapes(store, modalities)
    refuse_other_shapes(f"--init-from {cfg.init_from}", c, replace(c, **shapes), cfg.tokens)
    echo(f"initialised from {info['path']} ({info['kind']}, step {info['step']}, head {c.head}, vocab {c.vocab_size})")
    return replace(c, dropout=cfg.dropout, loss_weights=shapes["loss_weights"]), model.state_dict()


def refuse_other_shapes(what: str, model_config, wanted, store_dir: str) -> None:
    """A model whose modalities' vocabularies, lengths or kinds differ from those the store's columns need (a
    model of image columns alone against a store of a scalar too, or a spectrum of another length) is refused."""
    have = list(zip(model_config.vocab_sizes(), model_config.token_counts(), model_config.kinds()))
    need = list(zip(wanted.vocab_sizes(), wanted.token_counts(), wanted.kinds()))
    if (model_config.modality_vocab or model_config.modality_tokens or wanted.modality_vocab) and have != need:
        show = lambda shapes: ", ".join(f"{n} {k} {t} x vocab {v}"  # noqa: E731
                                        for n, (v, t, k) in zip(wanted.modalities or ["images_aion"], shapes))
        raise AstroptError(f"{what}: its model's modalities are {show(have)}; store {store_dir} has {show(need)}")


def check_validation_codec(cfg: TrainConfig, store) -> list[str]:
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
            split_blocks(batch["tokens"], batch.get("order"), self.modalities, batch.get("lengths"))[self.modalities[0]]
        return [self.index.get(zlib.crc32(np.ascontiguousarray(seq.numpy(), dtype=self.dtype).tobytes()), -1)
                for seq in tokens]


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


class Trainer:
    """One training run. Under DDP the collectives on the default group (the all-reduces of every step, the
    agreed stop and non-finite flags, validation) have --dist-timeout; work that rank 0 does alone while the
    others wait (the run folder and its lock, checkpoints, validation pictures and the loss curve) is followed
    by `group.wait_for_all`, whose limit is days, so a large checkpoint on a slow disk is no timeout. Rank 0's
    log lines between two collectives are the only such work left under --dist-timeout."""

    def __init__(self, cfg: TrainConfig, dist, device, stop, held, group):
        self.cfg, self.dist, self.device, self.stop, self.held, self.group = cfg, dist, device, stop, held, group
        self.run_dir = Path(cfg.out)
        self.cuda = device.type == "cuda"
        self.echo = print if dist.master else (lambda *a, **k: None)
        self.logger = self.display = self.images = self.rows_log = None
        self.step, self.best_val, self.batches_done = 0, float("inf"), 0
        self.last_ckpt: str | None = None

    # --- the store: manifest, dtype, vocab and every shard's size are checked before the first step
    def open_store(self) -> None:
        """Open and check the store; the modalities trained on, the store facts a run records, the split."""
        from astropt_tok.artifacts import model_store_info
        from astropt_tok.store import TokenStore, manifest_sha256
        from astropt_train.data import split_rows

        from astropt_tok.store_hub import parse_hub_store, resolve_store

        cfg = self.cfg
        # an hf://datasets/ORG/NAME[@rev] store: fetched into the HF cache once per node and verified there; the
        # run's settings keep the hf:// address (replayable on any machine), its lineage the snapshot it read
        hub = parse_hub_store(cfg.tokens)
        store = self.store = TokenStore(resolve_store(cfg.tokens) if hub is not None else cfg.tokens)
        store.check_shards()  # each shard is the one the manifest describes (size, shape, source row ids)
        if not store.check_token_range():  # refuses tokens outside the vocabulary before the model sees one
            self.echo(f"note: {cfg.tokens} records no per-shard token ranges (an older store): "
                      f"`astropt verify {cfg.tokens}` checks every token")
        self.modalities = cfg.modality_names(store)  # None: a one-column store, one modality images_aion
        # what later commands check a store against (astropt_tok.artifacts.check_model_store): the codec's
        # weights, each modality's bands, the id column; dir, manifest_sha256, codec_id and bands as before
        self.store_info = model_store_info(store, manifest_sha256(cfg.tokens))
        if self.modalities:
            self.store_info["shuffle_modalities"] = cfg.shuffle_modalities
        if hub is not None:
            self.store_info["hub"] = cfg.tokens
        # every node reads the same store: a copy that differs (an hf:// branch that moved between two nodes'
        # downloads, a stale local copy) would train the ranks on different galaxies under one split
        self.same_on_every_rank(self.store_info["manifest_sha256"], f"stores at {cfg.tokens}",
                                "every node must read the same store (one shared folder, or an hf:// store pinned "
                                "with @revision)", show=lambda sha: f"manifest sha256 {sha[:12]}")
        self.split = split_rows(store.num_rows, cfg.val_fraction, cfg.seed)
        self.dims = cfg.model_dims()

    # --- the run folder: claimed once the store and any --init-from model are known to fit
    def claim_run_folder(self) -> None:
        """Load --init-from (refused before anything is written), check the validation codec, claim the folder."""
        from astropt_train import checkpoint as ck

        cfg, store = self.cfg, self.store
        self.init = None
        if cfg.init_from and not (cfg.resume and ck.list_checkpoints(self.run_dir)):
            # loaded and checked against the store before the run folder is made: a refused model leaves nothing
            self.init = init_from_model(cfg, store, self.store_info["manifest_sha256"], self.dims, self.modalities,
                                        self.echo)
        # on every rank, though only the master draws: a refusal on the master alone would leave the others waiting
        codec_notes = check_validation_codec(cfg, store) if cfg.val_images > 0 else []
        # the run's lineage record: the store and codec it trains on, and the weights it started from
        self.lineage = {"store": {"dir": self.store_info["dir"], "manifest_sha256": self.store_info["manifest_sha256"]},
                        "codec": {"id": store.codec_id, "weights_sha256": self.store_info.get("codec_sha256")},
                        "init_from": cfg.init_from}
        if self.dist.master:  # claimed before anything is written (another kind of folder, or files no command
            # made, is refused), under its lock: one run per run folder, a second `astropt train --out` is refused
            self.held.enter_context(output_folder(self.run_dir, "run", "`astropt train`", lineage=self.lineage))
        for note in codec_notes:
            self.echo(note)

    # --- resume: the newest complete checkpoint, refused if it was trained on another codec or vocabulary
    def find_resume_point(self) -> dict | None:
        """The checkpoint to resume (self.ckpt_dir, self.state) and the model config; a summary when the run
        already reached --max-iters (nothing to do)."""
        from astropt_tok.artifacts import check_model_store
        from dataclasses import replace

        from astropt_train import checkpoint as ck
        from astropt_train.model import GPTConfig

        cfg, store, run, modalities = self.cfg, self.store, self.run_dir, self.modalities
        n_layer, n_head, n_embd = self.dims
        self.ckpt_dir, self.state, self.init_state = None, None, None
        existing = ck.list_checkpoints(run)
        self.agree_on_checkpoints(existing[-1][0] if existing else None)
        if cfg.resume and existing:
            self.ckpt_dir = existing[-1][1]
        elif cfg.resume:
            self.echo(f"--resume: no checkpoint in {run}; starting from scratch")
        elif existing:
            raise AstroptError(f"{run} already holds checkpoints; pass --resume to continue that run, or choose "
                               "another --out")
        # each modality's vocabulary, length and kind come from the store (one column: the store's own)
        self.gconf = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=cfg.dropout, bias=cfg.bias,
                               head=cfg.head, **cfg.model_shapes(store, modalities))
        if self.ckpt_dir is not None:
            ckpt_dir = self.ckpt_dir
            old = ck.read_config(ckpt_dir)
            if (old["vocab_size"], old["tokens_per_image"]) != (store.vocab_size, store.tokens_per_image):
                raise AstroptError(
                    f"cannot resume {run}: it was trained on codec {old['store'].get('codec_id')!r} (vocab "
                    f"{old['vocab_size']}, {old['tokens_per_image']} tokens per image) but store {cfg.tokens} has "
                    f"codec {store.codec_id!r} (vocab {store.vocab_size}, {store.tokens_per_image} tokens per image)")
            saved = ck.model_config(ckpt_dir, old)
            # the codec's weights (by sha256; by id for older runs) and each modality's bands, before any step
            for note in check_model_store(f"run {run}", old["store"], saved.modalities, store,
                                          self.store_info["manifest_sha256"]):
                self.echo(note)
            if old["store"].get("manifest_sha256") != self.store_info["manifest_sha256"]:
                self.echo(f"note: {cfg.tokens} is not the store {run} was trained on (same codec and vocab); continuing")
            if (saved.modalities or None) != modalities:
                raise AstroptError(f"cannot resume {run}: it was trained on modalities "
                                   f"{','.join(saved.modalities or ['images_aion'])}, this run asks for "
                                   f"{','.join(modalities or ['images_aion'])}")
            refuse_other_shapes(f"cannot resume {run}", saved, self.gconf, cfg.tokens)
            if cfg.model_given() and (saved.n_layer, saved.n_head, saved.n_embd) != (n_layer, n_head, n_embd):
                raise AstroptError(f"cannot resume {run}: its model is {saved.n_layer} layers, {saved.n_head} heads, "
                                   f"{saved.n_embd} wide; the flags ask for {n_layer}/{n_head}/{n_embd}")
            self.gconf = replace(saved, loss_weights=self.gconf.loss_weights)  # --loss-weight may change on resume
            self.state = ck.load_trainer_state(ckpt_dir)
            if int(self.state["step"]) >= cfg.max_iters:  # nothing to do: say so, change nothing
                best = float(self.state["best_val_loss"])
                return {"step": int(self.state["step"]), "loss": float("nan"), "val_loss": None,
                        "best_val_loss": best if math.isfinite(best) else None, "run_dir": str(run),
                        "checkpoint": str(ckpt_dir), "tokens_per_s": 0.0, "stopped": None,
                        "already_finished": True, "rank": self.dist.rank, "world_size": self.dist.world}
        if cfg.init_from and self.state is None:  # start from another model's weights (ours, or upstream's ckpt.pt)
            if self.init is None:  # the run's checkpoints went away since they were listed above
                self.init = init_from_model(cfg, store, self.store_info["manifest_sha256"], self.dims, modalities,
                                            self.echo)
            self.gconf, self.init_state = self.init
        return None

    def same_on_every_rank(self, value, what: str, fix: str, show=str) -> None:
        """Under DDP, refuse (on every rank, with each rank's view) a `value` that is not the same on every rank:
        `what` names it, `fix` says what to do; `show` prints one rank's value."""
        if not self.dist.ddp:
            return
        import torch.distributed as tdist

        seen = [None] * self.dist.world
        tdist.all_gather_object(seen, value)
        if len(set(seen)) > 1:
            views = ", ".join(f"rank {r}: {show(v)}" for r, v in enumerate(seen))
            raise AstroptError(f"the ranks see different {what} ({views}): {fix}")

    def agree_on_checkpoints(self, newest: int | None) -> None:
        """Every rank must see the run folder's newest checkpoint as rank 0 does: a node that cannot see --out
        (no shared file system) would otherwise start from scratch while the others resume."""
        self.same_on_every_rank(newest, f"checkpoints in {self.run_dir}",
                                "every node must see the same --out (a shared file system); rank 0 writes it, every "
                                "rank resumes from it", show=lambda s: "none" if s is None else f"step {s}")

    # --- precision: autocast and the grad scaler
    def set_precision(self) -> None:
        """Mixed precision on CUDA (bf16, else fp16 with a GradScaler), fp32 on a CPU; TF32 matmuls on CUDA."""
        import torch

        if self.cuda:  # TF32 matmuls for training, and back to the caller's setting when train() returns
            from astropt_tok.executor import tf32_allowed

            self.held.enter_context(tf32_allowed(True))
        dtype = self.cfg.dtype
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[dtype] if self.cuda else None
        if dtype == "bf16" and self.cuda and not torch.cuda.is_bf16_supported():
            amp = torch.float16
            self.echo("this GPU has no bf16: using fp16 with a GradScaler")
        self.amp_dtype = amp
        self.ctx = torch.autocast("cuda", dtype=amp) if amp is not None else nullcontext()
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)

    # --- model and optimiser, restored from the checkpoint when resuming
    def build_model(self) -> None:
        """The GPT as this rank trains it (one process, DDP or FSDP: astropt_train.parallel, the one place they
        differ), its optimiser, and the resumed state."""
        import torch

        from astropt_train import parallel

        cfg, dist, device = self.cfg, self.dist, self.device
        mode = ("fsdp" if cfg.parallel == "fsdp" else "ddp") if dist.ddp else "single"
        if cfg.parallel == "fsdp" and not dist.ddp:
            self.echo("note: --parallel fsdp in one process has nothing to shard: training as one process "
                      "(launch with torchrun to shard)")
        param_dtype = None
        if mode == "fsdp" and self.amp_dtype is not None:
            if self.amp_dtype == torch.float16:
                raise AstroptError("--parallel fsdp trains in bf16 or fp32: fp16's loss scaling would see only one "
                                   "rank's gradient shards; pass --dtype bf16 (or fp32)")
            param_dtype = self.amp_dtype  # FSDP's mixed precision policy casts per block: no autocast on top
            self.ctx = nullcontext()
        if self.state is not None and mode == "fsdp" and not self.state.get("sharded"):
            raise AstroptError(f"checkpoint {self.ckpt_dir} holds the whole model and optimiser (written without "
                               "sharding): resume it with --parallel ddp, or start an FSDP run from its weights "
                               "with --init-from")
        self.compiled = cfg.compile if cfg.compile is not None else self.cuda
        # the same initial weights whatever the mode, device or process count: drawn per (seed, parameter name)
        self.built = parallel.build_model(self.gconf, cfg.seed, device, mode, cfg.activation_checkpointing,
                                          param_dtype=param_dtype, compile=self.compiled, init_state=self.init_state)
        self.model, self.raw_model = self.built.model, self.built.raw
        self.optimizer = self.raw_model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2),
                                                             device.type)
        self.next_epoch = None
        rng_restored = False
        if self.state is not None:
            rng_restored = self._restore(self.raw_model)
        if not rng_restored:
            torch.manual_seed(cfg.seed + 1000 * dist.rank + self.step)  # per-rank streams (dropout)

    def _restore(self, model) -> bool:
        """Weights, optimiser, scaler, step, data position and this rank's random state from the checkpoint;
        returns whether the random state was restored."""
        from astropt_train import checkpoint as ck

        state, ckpt_dir, cfg, dist = self.state, self.ckpt_dir, self.cfg, self.dist
        if state.get("sharded"):  # weights and optimiser from every rank's shards, whatever process count wrote them
            ck.load_sharded_checkpoint(ckpt_dir, model, self.optimizer, distributed=dist.ddp,
                                       process_group=self.group.patient)
        else:
            ck.load_weights(model, ckpt_dir, str(self.device))
        try:
            if not state.get("sharded"):
                self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            d = state["data"]
            data_key = (int(d["batch_size"]), int(d["world_size"]), int(d["seed"]))
            saved_batches, saved_epoch = int(d["micro_batches_done"]), int(d["epoch"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise AstroptError(f"trainer state {ckpt_dir / ck.STATE_FILE} does not fit this model or is damaged "
                               f"({type(exc).__name__}: {str(exc)[:160]})") from None
        self.step, self.best_val = int(state["step"]), float(state["best_val_loss"])
        if data_key == (cfg.batch_size, dist.world, cfg.seed):
            self.batches_done = saved_batches
        else:
            self.echo("note: batch size, process count or seed changed since the checkpoint: data restarts at a new "
                      "epoch")
            self.batches_done = None  # resolved in build_data once the sampler knows its epoch length
            self.next_epoch = saved_epoch + 1
        per_rank = state["rng"].get("per_rank") or [state["rng"]]  # older checkpoints: rank 0's alone
        same_world = len(per_rank) == dist.world
        restored = False
        if same_world or dist.master:  # the master is rank 0, whose state comes first
            try:
                set_rng_state(per_rank[dist.rank], self.cuda)
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
                raise AstroptError(f"trainer state {ckpt_dir / ck.STATE_FILE}: its random state is damaged "
                                   f"({type(exc).__name__}: {str(exc)[:160]})") from None
            restored = True
        if not same_world and dist.master:
            self.echo(f"note: the checkpoint holds the random state of {len(per_rank)} processes, not {dist.world}: "
                      "the other ranks start new dropout streams")
        self.echo(f"resumed {self.run_dir} from {ckpt_dir.name} (step {self.step})")
        self.last_ckpt = str(ckpt_dir)
        return restored

    # --- data: this rank's batches, and the validation accuracy's model-free baselines
    def build_data(self) -> None:
        """The epoch sampler (at the resumed position), the dataset, the baselines and the DataLoader."""
        from astropt_train.data import EpochBatchSampler, TokenRows, make_loader
        from astropt_train.model import MODALITY
        from astropt_train.token_scores import baseline_rows, fit_baselines

        cfg, dist, store, modalities = self.cfg, self.dist, self.store, self.modalities
        sampler = self.sampler = EpochBatchSampler(self.split.train, cfg.batch_size, cfg.seed, dist.rank, dist.world)
        if self.batches_done is None:
            self.batches_done = self.next_epoch * sampler.batches_per_epoch
        sampler.start_epoch, sampler.start_batch = sampler.position(self.batches_done)
        workers = cfg.workers if cfg.workers is not None else (2 if self.cuda else 0)
        self.dataset = TokenRows(store, cfg.store_reads, modalities, cfg.shuffle_modalities, cfg.seed)
        # model-free baselines for the validation accuracy (astropt_train.token_scores), counted once on a sample
        # of the training rows: each eval's accuracy is logged beside the per-position most-frequent-token map's
        self.baselines = fit_baselines(store, baseline_rows(self.split.train, TRAINER_BASELINE_ROWS, cfg.seed),
                                       {m: m for m in modalities} if modalities else {MODALITY: None})
        self.loader = make_loader(store, sampler, workers, pin_memory=self.cuda, reads=cfg.store_reads,
                                  dataset=self.dataset)
        self.seq_len = self.gconf.block_size - 1
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * dist.world * self.seq_len

    # --- the run folder's settings, logs, pictures
    def open_logs(self) -> None:
        """Write the run's config (master), open metrics.jsonl and the live display, the validation picture
        grids and the --log-rows files."""
        import torch

        cfg, dist, run = self.cfg, self.dist, self.run_dir
        gconf, raw = self.gconf, self.raw_model
        self.run_config = {
            "model": asdict(gconf), "train": cfg.to_dict(), "vocab_size": self.store.vocab_size,
            "tokens_per_image": self.store.tokens_per_image, "store": self.store_info, "split": self.split.rule,
            "world_size": dist.world, "tokens_per_step": self.tokens_per_step, "params": raw.num_params(),
        }
        if dist.master:
            from astropt_tok.atomic import atomic_write_text
            from astropt_train.metrics import LiveDisplay, MetricsLogger

            ensure_folder(run, "the run folder")
            update_lineage(run, **self.lineage)  # a resumed run may have moved on to another store of the same codec
            atomic_write_text(run / RUN_CONFIG, json.dumps(self.run_config, indent=2) + "\n")
            atomic_write_text(run / RUN_TOML, to_toml(cfg))
            self.logger = MetricsLogger(run, cfg.log, start_step=self.step, config=self.run_config, echo=self.echo)
            self.display = LiveDisplay(cfg.max_iters, self.step, cfg.live)
            self.echo = self.display.print
            amp = self.amp_dtype
            vocab = f"vocab {gconf.vocab_size}" if not gconf.modality_vocab else ", ".join(
                f"{n} {t} x vocab {v}" + (f" weight {w:g}" if w != 1 else "")
                for n, v, t, w in zip(raw.names, raw.vocabs, raw.lengths, raw.loss_weights))
            self.echo(f"model {raw.num_params() / 1e6:.2f}M parameters ({gconf.n_layer} layers, {gconf.n_head} "
                      f"heads, {gconf.n_embd} wide, {vocab}); {self.split.rule['num_train']} train / "
                      f"{self.split.rule['num_val']} val rows; {self.tokens_per_step:,} tokens per step on "
                      f"{dist.world} x {self.device}"
                      f"{' bf16' if amp == torch.bfloat16 else ' fp16' if amp == torch.float16 else ' fp32'}"
                      f"{' compiled' if self.compiled else ''}{' deterministic' if cfg.deterministic else ''}"
                      f"{' sharded (fsdp)' if self.built.mode == 'fsdp' else ''}"
                      f"{' activation-checkpointed' if cfg.activation_checkpointing else ''}")
        if dist.master and cfg.val_images > 0:  # {modality: ImageGrid}, one picture per modality at each eval
            from astropt_train.validate import ImageGrid

            store = self.store
            # the codec decodes images: a scalar's or spectrum's tokens get no picture
            self.images = {m: ImageGrid(cfg.codec or store.codec_id, store.modality_bands.get(m, store.bands),
                                        self.device, echo=self.echo, made_with=store.manifest.get("codec"),
                                        accept_changed=cfg.accept_codec_change)
                           for m in self.modalities or [None] if m is None or store.modality_kind[m] == "image"}
        if cfg.log_rows:
            ensure_folder(run, "the run folder")
            self.rows_log = open(run / f"rows-rank{dist.rank}.txt", "a")
            self.delivered = DeliveredRows(self.store, self.split.train, self.modalities)

    def close_logs(self) -> None:
        """Close the --log-rows files, the live display and metrics.jsonl."""
        for thing in (self.rows_log, self.display, self.logger):
            if thing is not None:
                thing.close()

    # --- one optimiser step
    def train_step(self, batches) -> tuple:
        """Forward and backward over --grad-accum micro-batches, clip, step; returns (summed loss as a device
        tensor, the gradient norm, the last micro-batch's per-modality losses)."""
        import torch

        from astropt_train.data import batch_to_device
        from astropt_train.parallel import clip_grad_norm, grad_sync

        cfg, model, device = self.cfg, self.model, self.device
        lr = lr_at(self.step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        loss_acc = torch.zeros((), device=device)
        train_parts = None
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            if self.rows_log is not None:  # the rows this batch's tokens are, found by content, not recomputed
                self.rows_log.write(" ".join(map(str, self.delivered.rows(batch))) + "\n")
            x, y, kw = batch_to_device(batch, device)
            sync = micro == cfg.grad_accum - 1
            parts = {} if self.modalities else None  # each modality's loss (detached), plain or --loss-chunks
            with grad_sync(self.built, sync), self.ctx:  # no gradient all-reduce before the last micro-batch
                logits, loss = model(x, y, loss_chunks=cfg.loss_chunks, modality_losses=parts, **kw)
                loss = loss / cfg.grad_accum
            if sync:
                train_parts = parts  # the last micro-batch's, for the log line
            del logits
            self.scaler.scale(loss).backward()
            loss_acc += loss.detach().float()
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm(self.built, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.batches_done += cfg.grad_accum
        return loss_acc, grad_norm, train_parts, lr

    # --- what every rank must agree on
    def agree(self, bad, at_sync: bool) -> tuple[bool, bool | None]:
        """(stopping, non-finite): whether a signal asked any rank to stop, and whether any rank's loss was not
        finite since the last agreement. Under DDP both are combined across ranks at `at_sync` steps only (the
        same steps on every rank: no per-step sync), so every rank stops, or refuses a diverged run, together."""
        import torch
        import torch.distributed as tdist

        if not self.dist.ddp:  # read only when the loop checks it: no sync per step
            return self.stop.signum is not None, None
        if not at_sync:
            return False, False
        flags = torch.stack([torch.tensor(1.0 if self.stop.signum else 0.0, device=self.device), bad.float()])
        tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
        stopping, non_finite = bool(flags[0].item()), bool(flags[1].item())
        if stopping and self.stop.signum is None:
            self.stop.signum = signal.SIGTERM
        return stopping, non_finite

    def refuse_non_finite(self, loss_value: float) -> None:
        """A loss that is not finite stops the run with one error naming the last good checkpoint."""
        where = f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else "no checkpoint was written"
        raise AstroptError(f"loss is {loss_value} at step {self.step}: training stopped; {where} "
                           f"(try a lower --lr, more --warmup-iters, or --dtype bf16/fp32)")

    # --- validation: loss and accuracy beside the baselines, and the pictures
    def validate(self, record: dict) -> float:
        """Validation loss and accuracy (every rank takes part), added to `record`; returns the loss."""
        from astropt_train.token_scores import TokenScores
        from astropt_train.validate import evaluate

        cfg, dist = self.cfg, self.dist
        val_parts = {} if self.modalities else None
        scores = TokenScores(self.baselines)
        val = evaluate(self.built.eval_model, self.dataset, self.split.val, cfg.batch_size, cfg.eval_iters, self.device, self.ctx,
                       dist.rank, dist.world, by_modality=val_parts, scores=scores)
        record["val_loss"] = val
        record.update(accuracy_record(scores.summary(), several=bool(self.modalities)))
        if not math.isfinite(val):
            self.echo(f"note: validation loss is {val} at step {self.step} (the training loss is finite): "
                      "not a candidate for the best checkpoint; try --dtype fp32 if it persists")
        record.update({f"val_loss_{m}": v for m, v in (val_parts or {}).items()})
        return val

    def draw(self) -> None:
        """The master's validation pictures: stored and predicted tokens decoded, one picture per modality. Under
        FSDP every rank predicts (each forward gathers the shards), the master alone draws."""
        from astropt_train.validate import predict_tokens, split_blocks

        collective = self.built.forward_is_collective and self.cfg.val_images > 0
        if self.images is None and not collective:
            return
        cfg, store, step, run = self.cfg, self.store, self.step, self.run_dir
        shown = self.split.val[: cfg.val_images]
        targets = self.dataset.__getitems__(shown)
        # a model of several vocabularies draws each position among its own modality's ids (no common limit)
        limit = None if self.gconf.modality_vocab else store.vocab_size
        predicted = predict_tokens(self.raw_model, targets, self.device, self.ctx, limit)
        if self.images is None:
            return
        labels = [oid if oid is not None else f"row {r}" for oid, r in zip(store.object_ids(shown), shown)]
        if not self.modalities:
            self.images[None].write(targets, predicted, run / "val_images" / f"step-{step:08d}.png", labels=labels,
                                    step=step)
            return
        # one picture per modality: its block of each sequence, wherever the order put it
        order = targets.get("order")
        wanted = split_blocks(targets["tokens"], order, self.modalities, targets.get("lengths"))
        got = split_blocks(predicted, order, self.modalities, targets.get("lengths"))
        valid = targets.get("valid")  # [n, M]: a row lacking m shows its placeholder, so marked
        for k, m in enumerate(self.modalities):
            if m not in self.images:  # not an image: nothing to draw
                continue
            marks = [f"{label} {m}" + ("" if valid is None or valid[i, k] else " MISSING (not a galaxy)")
                     for i, label in enumerate(labels)]
            self.images[m].write(wanted[m], got[m], run / "val_images" / f"step-{step:08d}-{m}.png", labels=marks,
                                 step=step)

    # --- checkpoints
    def save(self, val_loss) -> None:
        """Every rank's random state gathered; the master writes the checkpoint, the best record and prunes."""
        import torch.distributed as tdist

        from astropt_train import checkpoint as ck

        cfg, dist, step = self.cfg, self.dist, self.step
        if not cfg.save:
            return
        rng = rng_state(self.cuda)
        per_rank = [rng]
        if dist.ddp:  # every rank's dropout stream, so a resumed DDP run draws what the straight run would
            per_rank = [None] * dist.world
            tdist.all_gather_object(per_rank, rng)
        if cfg.sharded_checkpoints():
            self._save_sharded(val_loss, per_rank)
            return
        if dist.master:
            path = ck.save_checkpoint(self.run_dir, step, self.raw_model.state_dict(),
                                      {**self.run_config, "step": step, "val_loss": val_loss},
                                      self._trainer_state(per_rank, optimizer=True))
            self._after_save(path, val_loss)
        self.group.wait_for_all(f"rank 0 to write the checkpoint of step {step}")

    def _trainer_state(self, per_rank: list, optimizer: bool) -> dict:
        """What trainer_state.pt holds: step, optimiser (unless sharded), scaler, every rank's random state, the
        data position, the best validation loss so far."""
        cfg = self.cfg
        epoch, b = self.sampler.position(self.batches_done)
        return {
            "step": self.step, **({"optimizer": self.optimizer.state_dict()} if optimizer else {}),
            "scaler": self.scaler.state_dict(), "rng": {"per_rank": per_rank},  # [rank] -> {"torch", "cuda"?}
            "data": {"micro_batches_done": self.batches_done, "epoch": epoch, "batch": b,
                     "batch_size": cfg.batch_size, "world_size": self.dist.world, "seed": cfg.seed},
            "best_val_loss": self.best_val,
        }

    def _save_sharded(self, val_loss, per_rank: list) -> None:
        """Every rank writes its shards of the weights and AdamW state (astropt_train.checkpoint); the master
        the rest, the best record, and prunes."""
        from astropt_train import checkpoint as ck
        from astropt_train.parallel import full_state_dict

        cfg, dist, step = self.cfg, self.dist, self.step
        path = ck.save_sharded_checkpoint(
            self.run_dir, step, self.raw_model, self.optimizer, {**self.run_config, "step": step, "val_loss": val_loss},
            self._trainer_state(per_rank, optimizer=False), master=dist.master, distributed=dist.ddp,
            wait=self.group.wait_for_all, process_group=self.group.patient,
            full_state=(lambda: full_state_dict(self.built)) if cfg.save_consolidated else None)
        if dist.master:
            self._after_save(path, val_loss)
        self.group.wait_for_all(f"rank 0 to record the checkpoint of step {step}")

    def _after_save(self, path, val_loss) -> None:
        """The master's bookkeeping after a checkpoint: the best record, pruning, the last checkpoint's name."""
        from astropt_train import checkpoint as ck

        best = ck.read_best(self.run_dir)
        # a NaN or infinite validation loss is never the best (NaN < x is False, but not against no best yet)
        if val_loss is not None and math.isfinite(val_loss) and (best is None or val_loss < best["val_loss"]):
            ck.write_best(self.run_dir, self.step, val_loss)
        ck.prune(self.run_dir, self.cfg.keep_last)
        self.last_ckpt = str(path)

    # --- the whole run
    def prepare(self) -> dict | None:
        """Every job before the first step, in order; a summary when there is nothing to do."""
        cfg = self.cfg
        if cfg.warmup_iters > cfg.max_iters:
            self.echo(f"note: --warmup-iters {cfg.warmup_iters} exceeds --max-iters {cfg.max_iters}: the learning "
                      f"rate never reaches --lr {cfg.lr:g} (it ends at {lr_at(cfg.max_iters - 1, cfg):.3g}); lower "
                      "--warmup-iters")
        self.open_store()
        self.claim_run_folder()
        finished = self.find_resume_point()
        if finished is not None:
            return finished
        self.set_precision()
        self.build_model()
        self.build_data()
        self.open_logs()
        return None

    def run(self) -> dict:
        """Train to --max-iters (or a stop signal); returns a summary (step, loss, best val loss, run dir, ...)."""
        finished = self.prepare()
        if finished is not None:
            return finished
        try:
            summary = self._loop()
        finally:
            self.close_logs()
        return summary

    def _loop(self) -> dict:
        import torch
        import torch.distributed as tdist

        cfg, dist, device = self.cfg, self.dist, self.device
        self.group.wait_for_all("rank 0 to prepare the run folder")  # its lock and settings, written by rank 0 alone
        batches = iter(self.loader)
        self.model.train()
        t_last, steps_since = time.perf_counter(), 0
        rates: list[float] = []
        last_val, stopped = None, None
        bad = torch.zeros((), dtype=torch.bool, device=device)
        # the logged train loss is the mean over the steps since the last log line (summed on the device: no sync
        # per step), not one batch's: with a few galaxies per batch one batch's loss is mostly noise
        loss_sum = torch.zeros((), device=device)
        interval_loss = float("nan")
        while self.step < cfg.max_iters:
            loss_acc, grad_norm, train_parts, lr = self.train_step(batches)
            bad |= ~torch.isfinite(loss_acc)
            loss_sum += loss_acc
            steps_since += 1
            step = self.step
            is_eval = step % cfg.eval_interval == 0 or step == cfg.max_iters
            scheduled_ckpt = bool(cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0) or step == cfg.max_iters
            scheduled_log = step % cfg.log_interval == 0 or is_eval
            stopping, non_finite = self.agree(bad, scheduled_log or scheduled_ckpt)
            is_log = scheduled_log or stopping
            is_ckpt = scheduled_ckpt or stopping
            if is_log or is_ckpt:
                loss_value = float(loss_acc.item())
                if non_finite is None:  # one process: its own flag
                    non_finite = bool(bad.item())
                if non_finite or not math.isfinite(loss_value):  # any rank's, since the last agreement
                    self.refuse_non_finite(loss_value if not math.isfinite(loss_value) else float("nan"))
            if is_log:
                dt = time.perf_counter() - t_last
                tps = steps_since * self.tokens_per_step / dt
                rates.append(tps)
                mean = loss_sum / steps_since
                if dist.ddp:  # every rank logs at the same steps: the mean over all ranks' batches
                    tdist.all_reduce(mean)
                    mean /= dist.world
                interval_loss = float(mean.item())
                record = {"step": step, "loss": interval_loss, "lr": lr, "tokens_per_s": tps,
                          "grad_norm": float(grad_norm.item())}
                if self.cuda:
                    record["mfu"] = self.raw_model.estimate_mfu(tps / dist.world, seq_len=self.seq_len)
                for m, value in (train_parts or {}).items():
                    record[f"loss_{m}"] = float(value.item())
                if is_eval:
                    last_val = self.validate(record)
                    self.draw()
                if dist.master:
                    self.logger.log(record)
                    self.display.update(step, record)
                    if is_eval:
                        self.logger.plot()
                if is_eval:  # the first pictures load the codec on rank 0, which may take minutes
                    self.group.wait_for_all(f"rank 0 to draw the validation pictures of step {step}")
                t_last, steps_since = time.perf_counter(), 0
                loss_sum.zero_()
            if is_eval and last_val < self.best_val:
                self.best_val = last_val
            if is_ckpt:
                self.save(last_val if is_eval else None)
            if stopping:
                stopped = signal.Signals(self.stop.signum).name
                self.echo(f"stopped by {stopped} at step {step}"
                          + (f"; checkpoint {self.last_ckpt}; continue with --resume" if cfg.save else ""))
                break
        return self.summary(interval_loss, last_val, rates, stopped)

    def summary(self, interval_loss: float, last_val, rates: list[float], stopped) -> dict:
        """What `train` returns: step, losses, the run folder and checkpoint, the median tokens/s after the first
        log interval, and on CUDA the model FLOPs utilisation."""
        import torch

        steady = rates[1:] if len(rates) > 1 else rates
        tps = statistics.median(steady) if steady else 0.0
        dist, raw = self.dist, self.raw_model
        out = {
            "step": self.step, "loss": interval_loss, "val_loss": last_val,
            "best_val_loss": self.best_val if math.isfinite(self.best_val) else None, "run_dir": str(self.run_dir),
            "checkpoint": self.last_ckpt, "tokens_per_s": tps, "stopped": stopped, "params": raw.num_params(),
            "device": str(self.device), "rank": dist.rank, "world_size": dist.world,
        }
        if self.cuda:
            out["mfu"] = raw.estimate_mfu(tps / dist.world, seq_len=self.seq_len)
            out["gpu"] = torch.cuda.get_device_name(self.device)
        return out
