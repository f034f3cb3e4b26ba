"""Checkpoints: one folder per saved step, written atomically, loadable without unpickling Python objects.

RUN/checkpoints/step-00001000/
    model.safetensors   the GPT's state dict (upstream AstroPT key names)
    config.json         {"model": GPTConfig fields, "train": TrainConfig fields, "vocab_size", "tokens_per_image",
                         "store": {"dir", "manifest_sha256", "codec_id", "codec_sha256", "bands", "modalities",
                         "id_column"} (astropt_tok.artifacts.model_store_info), "split": {...}, "step",
                         "val_loss", "format": "astropt-train-checkpoint", "format_version": 1}
    trainer_state.pt    optimiser, grad scaler, RNG and data position; tensors, numbers, strings, lists and
                        dicts only, so `torch.load(path, weights_only=True)` reads it
RUN/checkpoints/best.json   {"step", "val_loss"} of the best checkpoint by validation loss (never pruned)

A checkpoint is written into a temporary folder beside its final name, fsynced, then renamed into place: a
killed run leaves either the whole checkpoint or none of it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from astropt_tok.errors import AstroptError, writing

CKPT_DIR = "checkpoints"
FORMAT = "astropt-train-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "trainer_state.pt"
BEST_FILE = "best.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


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
        if m and (p / MODEL_FILE).is_file() and (p / CONFIG_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_checkpoint(path: str | os.PathLike, step: int | None = None) -> Path:
    """A checkpoint folder itself, or a run folder's newest checkpoint (or the one at `step`)."""
    path = Path(path)
    if (path / MODEL_FILE).is_file() and (path / CONFIG_FILE).is_file():
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
    """A checkpoint's config.json."""
    p = Path(ckpt) / CONFIG_FILE
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AstroptError(f"checkpoint config {p} is unreadable: {exc}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise AstroptError(f"{p} is not an {FORMAT} config")
    for key, kind in (("model", dict), ("vocab_size", int), ("tokens_per_image", int), ("store", dict)):
        if not isinstance(cfg.get(key), kind):
            raise AstroptError(f"checkpoint config {p} is damaged: {key!r} is {cfg.get(key)!r} "
                               f"(expected {kind.__name__})")
    return cfg


def model_config(ckpt: str | os.PathLike, cfg: dict):
    """The GPTConfig a checkpoint's config.json describes; damaged fields are one error naming the file."""
    from astropt_train.model import GPTConfig

    try:
        gconf = GPTConfig(**cfg["model"])
        dims = (gconf.vocab_size, gconf.block_size, gconf.n_layer, gconf.n_head, gconf.n_embd)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims) or gconf.n_embd % gconf.n_head:
            raise ValueError(f"sizes {dims}")
    except (TypeError, ValueError) as exc:
        raise AstroptError(f"checkpoint config {Path(ckpt) / CONFIG_FILE} is damaged: its model is not a GPT ({exc})") from None
    return gconf


def load_weights(model, ckpt: str | os.PathLike, device: str = "cpu") -> None:
    """Load a checkpoint's model.safetensors into `model`; missing, truncated, corrupt or mis-shaped weights are
    one error naming the file."""
    from safetensors.torch import load_file

    path = Path(ckpt) / MODEL_FILE
    try:
        state = load_file(str(path), device=str(device))
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise AstroptError(f"checkpoint weights {path} are unreadable (truncated or corrupt?): {reason}; "
                           f"delete that checkpoint folder to use an earlier one") from None
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
    """The optimiser/scaler/RNG/data-position state, read with weights_only=True."""
    import torch

    p = Path(ckpt) / STATE_FILE
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise AstroptError(f"trainer state {p} is unreadable (truncated or corrupt?): {reason}") from None
    need = {"step": int, "optimizer": dict, "rng": dict, "data": dict, "best_val_loss": float}
    bad = [k for k, kind in need.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
    if bad:
        raise AstroptError(f"trainer state {p} is damaged: {', '.join(bad)} missing or of the wrong type")
    return state


def save_checkpoint(run_dir: str | os.PathLike, step: int, model_state: dict, config: dict, trainer_state: dict) -> Path:
    """Write RUN/checkpoints/step-N/ atomically (temporary folder, fsync, rename); returns the folder."""
    import torch
    from safetensors.torch import save_file

    from astropt_tok.atomic import atomic_file

    root = Path(run_dir) / CKPT_DIR
    final = root / step_dir_name(step)
    with writing(final):
        root.mkdir(parents=True, exist_ok=True)
    # a full or read-only disk: one error, no temporary folder left; the same step saved again (a signal right
    # after an interval save) replaces the old folder only once the new one is whole
    with atomic_file(final, folder=True) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}, str(tmp / MODEL_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **config},
                                                  indent=2))
        torch.save(trainer_state, tmp / STATE_FILE)
    return final


def read_best(run_dir: str | os.PathLike) -> dict | None:
    """{"step", "val_loss"} of the run's best checkpoint, or None."""
    p = Path(run_dir) / CKPT_DIR / BEST_FILE
    try:
        best = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # damaged or missing: the next evaluation writes a new one
    ok = isinstance(best, dict) and isinstance(best.get("step"), int) and isinstance(best.get("val_loss"), (int, float))
    return best if ok else None


def write_best(run_dir: str | os.PathLike, step: int, val_loss: float) -> None:
    """Record the best checkpoint (atomically)."""
    from astropt_tok.atomic import atomic_write_text

    atomic_write_text(Path(run_dir) / CKPT_DIR / BEST_FILE, json.dumps({"step": step, "val_loss": val_loss}) + "\n")


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
