"""Checkpoints: one folder per saved step, written atomically, loadable without unpickling Python objects.

RUN/checkpoints/step-00001000/
    model.safetensors   the GPT's state dict (upstream AstroPT key names)
    config.json         {"model": GPTConfig fields, "train": TrainConfig fields, "vocab_size", "tokens_per_image",
                         "store": {"dir", "manifest_sha256", "codec_id", "codec_sha256", "bands", "modalities",
                         "id_column"} (astropt_tok.artifacts.model_store_info), "split": {...}, "step",
                         "val_loss", "format": "astropt-train-checkpoint", "format_version": 1}
    trainer_state.pt    optimiser, grad scaler, RNG and data position; tensors, numbers, strings, lists and
                        dicts only, so `torch.load(path, weights_only=True)` reads it
    .astropt-artifact.json  its lineage record (astropt_tok.artifacts, kind "checkpoint"): store, codec, step
                        and the weights' sha256
RUN/checkpoints/best.json   {"step", "val_loss"} of the best checkpoint by validation loss (never pruned)

A sharded checkpoint (`train --checkpoint-format sharded`, the default under `--parallel fsdp`) holds instead of
model.safetensors and the optimiser part of trainer_state.pt:
    sharded/            torch.distributed.checkpoint files: `.metadata` (which rank's file holds which slice of
                        each tensor) and one `__R_0.distcp` per rank, {"model": weights, "optimizer": AdamW
                        state} under upstream key names. Every rank writes its own shards (no gather to rank 0),
                        and any process count reads them back (resharding), one process with no group included
    model.safetensors   only with --save-consolidated: the whole model, gathered to rank 0
    trainer_state.pt    as above less "optimizer", with "sharded": true
Every rank writes into the same temporary folder (rank 0 names it and makes it; a file system all ranks see),
and rank 0 renames it into place once every rank's shards are written and fsynced.

A checkpoint is written into a temporary folder beside its final name, fsynced, then renamed into place: a
killed run leaves either the whole checkpoint or none of it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from astropt_tok.errors import AstroptError, first_line, writing
from astropt_tok.store.format import MODALITY_KINDS
from astropt_tok.health import first_non_finite, refuse_non_finite_weights

CKPT_DIR = "checkpoints"
FORMAT = "astropt-train-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "trainer_state.pt"
SHARDED_DIR = "sharded"  # a sharded checkpoint's torch.distributed.checkpoint files
SHARD_INDEX = ".metadata"  # written last by DCP's coordinator: which file holds which slice of each tensor
BEST_FILE = "best.json"
_STEP_RE = re.compile(r"^step-(\d+)$")
# what to do about a checkpoint whose weights hold a NaN or an infinity (astropt_tok.health)
DIVERGED = ("the run diverged; use an earlier checkpoint (`astropt runs RUN` names the best; `--step N`, or delete "
            "this step's folder to --resume from the one before)")


def step_dir_name(step: int) -> str:
    """`step-00001000`."""
    return f"step-{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, (step, folder), oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and is_checkpoint(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def is_checkpoint(folder: Path) -> bool:
    """Whether `folder` holds a checkpoint: its config.json and its weights (model.safetensors, or shards)."""
    return (folder / CONFIG_FILE).is_file() and ((folder / MODEL_FILE).is_file() or is_sharded(folder))


def is_sharded(ckpt: str | os.PathLike) -> bool:
    """Whether a checkpoint folder holds its weights and optimiser state as torch.distributed.checkpoint shards."""
    return (Path(ckpt) / SHARDED_DIR / SHARD_INDEX).is_file()


def weights_sha256(ckpt: str | os.PathLike) -> str:
    """What names a checkpoint's weights in lineage records: model.safetensors's sha256; a sharded checkpoint
    without one, the sha256 of its shard index (`.metadata`, unique to that save: its shards are never hashed)."""
    from astropt_tok.store import sha256_path

    ckpt = Path(ckpt)
    return sha256_path(ckpt / MODEL_FILE if (ckpt / MODEL_FILE).is_file() else ckpt / SHARDED_DIR / SHARD_INDEX)


def find_checkpoint(path: str | os.PathLike, step: int | None = None) -> Path:
    """A checkpoint folder itself, or a run folder's newest checkpoint (or the one at `step`)."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    if not path.exists():
        raise AstroptError(f"{path} does not exist")
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise AstroptError(f"{path} holds no checkpoint (expected {CKPT_DIR}/step-*/ with {MODEL_FILE})")
    if step is None:
        return ckpts[-1][1]
    for s, p in ckpts:
        if s == step:
            return p
    raise AstroptError(f"{path} has no checkpoint at step {step} (it has {', '.join(str(s) for s, _ in ckpts)})")


def read_config(ckpt: str | os.PathLike) -> dict:
    """A checkpoint's config.json, checked as a whole (`check_config`): damage is one error naming the field."""
    from astropt_tok.schema import read_json_object

    p = Path(ckpt) / CONFIG_FILE
    cfg = read_json_object(p, "checkpoint config", _REPAIR)
    if cfg.get("format") != FORMAT:
        raise AstroptError(f"{p} is not an {FORMAT} config")
    check_config(cfg, p, checkpoint=True)
    return cfg


def read_run_config(run: str | os.PathLike) -> dict | None:
    """RUN/config.json (the settings a run trained with), checked as a whole; None when the run has none."""
    from astropt_tok.schema import read_json_object

    p = Path(run) / RUN_CONFIG_FILE
    if not p.is_file():
        return None
    cfg = read_json_object(p, "run config", _RUN_REPAIR)
    check_config(cfg, p, checkpoint=False)
    return cfg


RUN_CONFIG_FILE = "config.json"  # RUN/config.json: the run's settings, as a checkpoint's config.json less its step
_REPAIR = "delete that checkpoint folder to use an earlier one, or restore the file"
_RUN_REPAIR = "`astropt train --resume` rewrites it, or restore the file"


def check_config(cfg: dict, path: Path, checkpoint: bool) -> None:
    """Every field a run's or checkpoint's config.json holds that a reader builds on: the model (each GPTConfig
    field, its head, sizes, dropout, modalities), and how it agrees with the store's vocabulary and tokens per
    image; a checkpoint's own step (that of its folder name) and format version."""
    from astropt_tok.schema import Fields

    f = Fields(path, _REPAIR if checkpoint else _RUN_REPAIR)
    if checkpoint:
        f.one_of(cfg, "format_version", (FORMAT_VERSION,))
        step = f.need(cfg, "step", int, low=0)
        m = _STEP_RE.match(path.parent.name)
        if m:
            f.equal("step", step, int(m.group(1)), f"the step of its folder {path.parent.name}")
        f.maybe(cfg, "val_loss", float, finite=False)
    vocab = f.need(cfg, "vocab_size", int, low=1)
    per_image = f.need(cfg, "tokens_per_image", int, low=1)
    check_model_fields(f.need(cfg, "model", dict), f, vocab, per_image)
    train = f.maybe(cfg, "train", dict) or {}  # every run writes it; checkpoints made by hand may not
    f.maybe(train, "max_iters", int, "train.", low=1)
    store = f.need(cfg, "store", dict)
    for key in ("dir", "codec_id", "manifest_sha256", "codec_sha256", "id_column"):
        f.maybe(store, key, str, "store.")
    if store.get("bands") is not None:
        f.need_list(store, "bands", str, "store.")
    f.maybe(cfg, "split", dict)


def check_model_fields(model: dict, f, vocab: int | None = None, per_image: int | None = None) -> None:
    """The GPTConfig fields of a config.json: known names, positive sizes, n_embd a multiple of n_head, dropout
    in [0, 1), bias a bool, a head the model has, distinct modality names; and, given the store's vocabulary
    and tokens per image, room for both (every modality's block in `block_size`)."""
    import dataclasses

    from astropt_train.model import HEADS, GPTConfig

    known = {fl.name for fl in dataclasses.fields(GPTConfig)}
    for key in model:
        if key not in known:
            raise f.fail(f"model.{key}", model[key], f"no such field: a GPT has {', '.join(sorted(known))}")
    for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        f.need(model, key, int, "model.", low=1)
    if model["n_embd"] % model["n_head"]:
        raise f.fail("model.n_embd", model["n_embd"], f"a multiple of model.n_head ({model['n_head']})")
    f.maybe(model, "dropout", float, "model.", low=0.0, below=1.0)
    f.maybe(model, "bias", bool, "model.")
    if "head" in model:
        f.one_of(model, "head", HEADS, "model.")
    mods = f.need_list(model, "modalities", str, "model.", unique=True) if model.get("modalities") is not None else []
    blocks = max(1, len(mods))
    if vocab is not None and model["vocab_size"] < vocab:
        raise f.fail("model.vocab_size", model["vocab_size"], f"at least the store's vocab_size {vocab}")
    if any(model.get(k) is not None for k in ("modality_vocab", "modality_tokens", "modality_kinds")):
        # modalities of their own vocabulary, length and kind: one entry each, the lengths summing to block_size
        for key, kind in (("modality_vocab", int), ("modality_tokens", int), ("modality_kinds", str)):
            values = f.need_list(model, key, kind, "model.")
            if len(values) != len(mods):
                raise f.fail(f"model.{key}", values, f"one entry per modality of model.modalities ({len(mods)})")
            if kind is int and min(values) < 1:
                raise f.fail(f"model.{key}", values, "positive numbers")
        for kind in model["modality_kinds"]:
            if kind not in MODALITY_KINDS:
                raise f.fail("model.modality_kinds", model["modality_kinds"],
                             f"each one of {', '.join(MODALITY_KINDS)}")
        if sum(model["modality_tokens"]) != model["block_size"]:
            raise f.fail("model.block_size", model["block_size"], f"the sum of model.modality_tokens "
                         f"{model['modality_tokens']}")
    else:
        if model["block_size"] % blocks:
            raise f.fail("model.block_size", model["block_size"], f"a multiple of the {blocks} modalities' blocks")
        if per_image is not None and model["block_size"] // blocks < per_image:
            raise f.fail("model.block_size", model["block_size"], f"at least {blocks} x tokens_per_image {per_image}")
    if model.get("loss_weights") is not None:
        weights = f.need_list(model, "loss_weights", float, "model.")
        if len(weights) != blocks or not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
            raise f.fail("model.loss_weights", weights, f"{blocks} finite weights >= 0, not all 0")


def model_config(ckpt: str | os.PathLike, cfg: dict):
    """The GPTConfig a checkpoint's config.json describes: `cfg` as `read_config` returned it, which checked its
    model fields (`check_model_fields`) as part of the whole file."""
    from astropt_train.model import GPTConfig

    return GPTConfig(**cfg["model"])


def load_weights(model, ckpt: str | os.PathLike, device: str = "cpu") -> None:
    """Load a checkpoint's model.safetensors into `model`; missing, truncated, corrupt, mis-shaped or non-finite
    weights are one error naming the file."""
    from safetensors.torch import load_file

    path = Path(ckpt) / MODEL_FILE
    if not path.is_file() and is_sharded(ckpt):  # no consolidated file: the shards, read in this process
        path = Path(ckpt) / SHARDED_DIR
        state = {k: v.to(device) for k, v in read_sharded_weights(ckpt, model).items()}
    else:
        try:
            state = load_file(str(path), device=str(device))
        except Exception as exc:
            raise AstroptError(f"checkpoint weights {path} are unreadable (truncated or corrupt?): "
                               f"{_first_line(exc)}; delete that checkpoint folder to use an earlier one") from None
    refuse_non_finite_weights(state, path, DIVERGED)  # before anything is built on them (embed, decode, resume)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        reason = (str(exc).strip().splitlines() or ["shape mismatch"])[-1].strip()[:200]
        raise AstroptError(f"checkpoint weights {path} do not fit its config: {reason}") from None
    if missing or unexpected:
        raise AstroptError(f"{path} does not fit its config (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_model(path: str | os.PathLike, step: int | None = None, device: str = "cpu"):
    """(GPT in eval mode on `device`, config.json dict) from a run folder (newest or `step`) or a checkpoint folder."""
    from astropt_train.model import GPT

    ckpt = find_checkpoint(path, step)
    cfg = read_config(ckpt)
    model = GPT(model_config(ckpt, cfg))
    load_weights(model, ckpt, device)
    return model.to(device).eval(), cfg


def load_trainer_state(ckpt: str | os.PathLike) -> dict:
    """The optimiser/scaler/RNG/data-position state, read with weights_only=True and checked as a whole."""
    import torch

    p = Path(ckpt) / STATE_FILE
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AstroptError(f"trainer state {p} is unreadable (truncated or corrupt?): {_first_line(exc)}; "
                           f"{_REPAIR}") from None
    check_trainer_state(state, p)
    return state


def check_trainer_state(state, path: Path) -> None:
    """The structure `train --resume` restores: step (that of the checkpoint folder), an optimiser state dict,
    every rank's random state, the data position, the best validation loss so far."""
    import torch

    from astropt_tok.schema import Fields

    f = Fields(path, _REPAIR)
    if not isinstance(state, dict):
        raise f.fail("the whole file", type(state).__name__, "a dict of step, optimizer, rng, data, best_val_loss")
    step = f.need(state, "step", int, low=0)
    m = _STEP_RE.match(path.parent.name)
    if m:
        f.equal("step", step, int(m.group(1)), f"the step of its folder {path.parent.name}")
    if state.get("sharded") is not True:  # a sharded checkpoint keeps its optimiser state in its shards
        opt = f.need(state, "optimizer", dict)
        f.need(opt, "state", dict, "optimizer.")
        for index, slots in opt["state"].items():  # AdamW's moments: a NaN there makes the first resumed step NaN
            bad = first_non_finite(slots) if isinstance(slots, dict) else None
            if bad is not None:
                raise AstroptError(f"trainer state {path} holds non-finite optimiser state ({bad} of parameter "
                                   f"{index}): {DIVERGED}")
        for i, group in enumerate(f.need_list(opt, "param_groups", dict, "optimizer.")):
            f.need_list(group, "params", int, f"optimizer.param_groups[{i}].", nonempty=False)
    if state.get("scaler") is not None:
        f.need(state, "scaler", dict)
    rng = f.need(state, "rng", dict)
    per_rank = f.need_list(rng, "per_rank", dict, "rng.") if "per_rank" in rng else [rng]  # older: rank 0's alone
    for i, r in enumerate(per_rank):
        where = f"rng.per_rank[{i}]." if "per_rank" in rng else "rng."
        t = f.need(r, "torch", torch.Tensor, where)
        if t.dtype != torch.uint8 or tuple(t.shape) != tuple(torch.get_rng_state().shape):
            raise f.fail(where + "torch", f"{t.dtype} {tuple(t.shape)}", "a 1-D uint8 tensor (torch's RNG state)")
    data = f.need(state, "data", dict)
    for key in ("micro_batches_done", "epoch", "batch", "seed"):
        f.need(data, key, int, "data.", low=0)
    for key in ("batch_size", "world_size"):
        f.need(data, key, int, "data.", low=1)
    best = f.need(state, "best_val_loss", float, finite=False)
    if math.isnan(best) or best == -math.inf:
        raise f.fail("best_val_loss", best, "a loss, or inf before the first evaluation")


def save_checkpoint(run_dir: str | os.PathLike, step: int, model_state: dict, config: dict, trainer_state: dict) -> Path:
    """Write RUN/checkpoints/step-N/ atomically (temporary folder, fsync, rename); returns the folder."""
    from astropt_tok.atomic import atomic_file

    root = Path(run_dir) / CKPT_DIR
    final = root / step_dir_name(step)
    with writing(final):
        root.mkdir(parents=True, exist_ok=True)
    # a full or read-only disk: one error, no temporary folder left; the same step saved again (a signal right
    # after an interval save) replaces the old folder only once the new one is whole
    with atomic_file(final, folder=True) as tmp:
        _write_checkpoint_files(tmp, model_state, config, trainer_state)
    return final


def _write_checkpoint_files(folder: Path, model_state: dict | None, config: dict, trainer_state: dict) -> None:
    """A checkpoint's own files in its (temporary) folder: model.safetensors (unless None: a sharded one without
    it), config.json, trainer_state.pt and the lineage record, named by the weights' sha256 (`weights_sha256`)."""
    import torch
    from safetensors.torch import save_file

    from astropt_tok.artifacts import write_record

    if model_state is not None:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}, str(folder / MODEL_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **config},
                                                 indent=2))
    torch.save(trainer_state, folder / STATE_FILE)
    write_record(folder, "checkpoint", "`astropt train`", checkpoint_lineage(config, weights_sha256(folder)))


def save_sharded_checkpoint(run_dir: str | os.PathLike, step: int, model, optimizer, config: dict,
                            trainer_state: dict, *, master: bool, distributed: bool, wait: Callable[[str], None],
                            full_state: Callable[[], dict] | None = None, process_group=None) -> Path:
    """Write RUN/checkpoints/step-N/ as a sharded checkpoint; every rank calls it (a collective under torchrun).

    `model` is the GPT itself (its parameters plain tensors, or DTensor shards under FSDP: never a DDP wrapper),
    `optimizer` its AdamW; each rank writes its own shards of both. Rank 0 makes the temporary folder and tells
    the others its name, writes config.json, trainer_state.pt (`trainer_state` less the optimiser) and the
    lineage record, and renames the folder into place after every rank's shards are fsynced; `full_state` (a
    collective under FSDP: every rank calls it, rank 0 gets the weights) adds a consolidated model.safetensors.
    `wait(what)` then holds every rank until rank 0 has renamed it. `process_group` (the trainer's group of long
    waits) carries DCP's coordination, so a slow rank's write is no collective timeout for the others."""
    import torch.distributed as tdist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from astropt_tok.atomic import atomic_file

    root = Path(run_dir) / CKPT_DIR
    final = root / step_dir_name(step)
    model_state, optim_state = get_state_dict(model, optimizer)
    with contextlib.ExitStack() as held:
        tmp, failure = None, None
        if master:
            try:
                with writing(final):
                    root.mkdir(parents=True, exist_ok=True)
                tmp = held.enter_context(atomic_file(final, folder=True))
            except AstroptError as exc:  # a full or read-only disk: told to the others before raising
                failure = exc
        name = [str(tmp) if tmp is not None else None]
        if distributed:
            tdist.broadcast_object_list(name, src=0, group=process_group)
        if failure is not None:
            raise failure
        if name[0] is None:
            raise AstroptError(f"rank 0 could not start checkpoint {final}; see its error")
        tmp = Path(name[0])
        try:  # every rank's shards; DCP's coordinator (rank 0) writes the index once all are written
            with _single_process_quiet():
                dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / SHARDED_DIR),
                         no_dist=not distributed, process_group=process_group)
        except OSError as exc:
            raise AstroptError(f"cannot write checkpoint {final}: {exc.strerror or exc}; free space or choose "
                               "another --out") from None
        full = full_state() if full_state is not None else None
        if master:  # the optimiser lives in the shards
            small = {k: v for k, v in trainer_state.items() if k != "optimizer"}
            _write_checkpoint_files(tmp, full, config, {**small, "sharded": True})
    wait(f"rank 0 to finish the checkpoint of step {step}")
    return final


def load_sharded_checkpoint(ckpt: str | os.PathLike, model, optimizer, distributed: bool,
                            process_group=None) -> None:
    """Load a sharded checkpoint's weights and optimiser state into `model` (the GPT itself, sharded or not)
    and `optimizer`, whatever the process count that wrote it; every rank calls it. Unreadable or missing shards
    are one error naming the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(Path(ckpt) / SHARDED_DIR), no_dist=not distributed,
                     process_group=process_group)
    except _dcp_failures() as exc:  # a missing or truncated shard, on any rank
        raise AstroptError(f"sharded checkpoint {ckpt} is unreadable ({_first_line(exc)}): {_REPAIR}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def read_sharded_weights(ckpt: str | os.PathLike, model) -> dict:
    """A sharded checkpoint's whole weights, read in this one process into CPU tensors shaped as `model`'s
    (a plain GPT of the checkpoint's config): what decode, embed, eval and export load."""
    import torch
    import torch.distributed.checkpoint as dcp

    state = {k: torch.empty_like(v, device="cpu") for k, v in model.state_dict().items()}
    try:
        with _single_process_quiet():
            dcp.load({"model": state}, checkpoint_id=str(Path(ckpt) / SHARDED_DIR), no_dist=True)
    except _dcp_failures() as exc:
        raise AstroptError(f"sharded checkpoint {ckpt} is unreadable ({_first_line(exc)}): {_REPAIR}") from None
    return state


def consolidate_checkpoint(ckpt: str | os.PathLike) -> Path:
    """Write model.safetensors into a sharded checkpoint from its shards (in this one process); returns it."""
    from safetensors.torch import save_file

    from astropt_tok.atomic import atomic_file

    from astropt_train.model import GPT

    ckpt = Path(ckpt)
    state = read_sharded_weights(ckpt, GPT(model_config(ckpt, read_config(ckpt))))
    refuse_non_finite_weights(state, ckpt / SHARDED_DIR, DIVERGED)
    with atomic_file(ckpt / MODEL_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    return ckpt / MODEL_FILE


def _dcp_failures() -> tuple:
    """What a failed DCP read raises: each rank's failure is wrapped in a CheckpointException (a BaseException,
    so `except Exception` misses it), a damaged index is an ordinary exception."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it assumes one process when no group is joined: that is what this one process means."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _first_line(exc: BaseException) -> str:
    failures = getattr(exc, "failures", None)  # a CheckpointException: {rank: that rank's exception}
    if isinstance(failures, dict) and failures:
        rank, cause = sorted(failures.items())[0]
        if isinstance(cause, tuple) and cause:  # (the exception, its traceback frames)
            cause = cause[0]
        text = _first_line(cause) if isinstance(cause, BaseException) else str(cause)[:200]
        return f"rank {rank}: {type(cause).__name__}{': ' + text if text != type(cause).__name__ else ''}"
    return first_line(exc)


def checkpoint_lineage(config: dict, weights_sha256: str) -> dict:
    """A checkpoint's lineage record: the store and codec it was trained on, its step and its weights' sha256."""
    store = config.get("store") or {}
    return {"store": {"dir": store.get("dir"), "manifest_sha256": store.get("manifest_sha256")},
            "codec": {"id": store.get("codec_id"), "weights_sha256": store.get("codec_sha256")},
            "step": config.get("step"), "weights_sha256": weights_sha256}


def read_best(run_dir: str | os.PathLike) -> dict | None:
    """{"step", "val_loss"} of the run's best checkpoint, or None."""
    p = Path(run_dir) / CKPT_DIR / BEST_FILE
    try:
        best = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # damaged or missing: the next evaluation writes a new one
    ok = isinstance(best, dict) and isinstance(best.get("step"), int) and isinstance(best.get("val_loss"), (int, float))
    # a NaN (from an older version) would never compare below a later loss: as if there were no best yet
    return best if ok and math.isfinite(best["val_loss"]) else None


def write_best(run_dir: str | os.PathLike, step: int, val_loss: float) -> None:
    """Record the best checkpoint (atomically); a validation loss that is not finite is never a best (ValueError)."""
    from astropt_tok.atomic import atomic_write_text

    if not math.isfinite(val_loss):  # callers compare first; this keeps NaN out of best.json whatever they do
        raise ValueError(f"a validation loss of {val_loss} cannot be the best")
    atomic_write_text(Path(run_dir) / CKPT_DIR / BEST_FILE,
                      json.dumps({"step": step, "val_loss": val_loss}, allow_nan=False) + "\n")


def prune(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints, always keeping the best one; clear stale temporaries."""
    root = Path(run_dir) / CKPT_DIR
    best = read_best(run_dir)
    ckpts = list_checkpoints(run_dir)
    keep = {s for s, _ in ckpts[-keep_last:]}
    if best is not None:
        keep.add(int(best["step"]))
    for s, p in ckpts:
        if s not in keep:
            shutil.rmtree(p, ignore_errors=True)
    for pattern in (".step-*.tmp-*", ".step-*.old-*"):  # a killed run's leftovers (one writer per run folder)
        for p in root.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)


def unwrap_state_dict(model) -> dict[str, Any]:
    """The plain GPT's state dict from a model that may be wrapped by DDP and/or torch.compile."""
    m = model.module if hasattr(model, "module") else model
    m = getattr(m, "_orig_mod", m)
    return m.state_dict()
