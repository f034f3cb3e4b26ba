"""Models from anywhere: this project's checkpoints, and (both ways) upstream AstroPT's pickled `ckpt.pt`.

`load_any_model(path)` gives (GPT, info) for a run folder, a `step-N` checkpoint folder, or an upstream AstroPT
checkpoint (a `ckpt.pt` file, or a folder holding one); `info` names what was loaded, for manifests and checks.

Upstream's checkpoint (`scripts/train_aion.py`, read back by `astropt.model_utils.load_astropt`) is a torch
pickle of {"model": state dict, "model_args": GPTConfig keyword arguments with "modalities": [ModalityConfig],
"modality_registry": ModalityRegistry, "iter_num", "best_val_loss", "config"}. Its classes live in
`astropt.model`; this module has look-alikes that pickle under those names (export) and that a
`weights_only` load maps those names to (import), so neither direction needs upstream installed and reading a
checkpoint never runs code from it.
"""

from __future__ import annotations

import os
import pickle
import types
from dataclasses import asdict, dataclass
from pathlib import Path

from astropt_tok.atomic import atomic_file
from astropt_tok.errors import AstroptError

UPSTREAM_FILE = "ckpt.pt"
UPSTREAM_MODULE = "astropt.model"


@dataclass
class ModalityConfig:
    """Look-alike of upstream's `astropt.model.ModalityConfig` (same fields), pickled under its name."""

    name: str
    input_size: int
    pos_input_size: int
    patch_size: int
    embed_pos: bool
    vocab_size: int = 0
    loss_weight: float = 1.0


class ModalityRegistry:
    """Look-alike of upstream's `astropt.model.ModalityRegistry`: `.modalities` maps name -> ModalityConfig."""

    def __init__(self, modalities: list[ModalityConfig]):
        self.modalities = {m.name: m for m in modalities}


_UPSTREAM_NAMES = {ModalityConfig: "ModalityConfig", ModalityRegistry: "ModalityRegistry"}


class _UpstreamPickler(pickle._Pickler):
    """A pickler that writes the look-alikes as upstream's `astropt.model` classes."""

    def save_global(self, obj, name=None):
        if obj in _UPSTREAM_NAMES:
            self.write(pickle.GLOBAL + f"{UPSTREAM_MODULE}\n{_UPSTREAM_NAMES[obj]}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


_UPSTREAM_PICKLE = types.SimpleNamespace(Pickler=_UpstreamPickler, __name__="pickle")


# ---------------------------------------------------------------------------------------------------------
# export: this project's checkpoint -> upstream's ckpt.pt


def upstream_checkpoint(model, step: int | None = None, val_loss: float | None = None, extra: dict | None = None) -> dict:
    """Upstream AstroPT's checkpoint dict for a GPT of this project (one modality `images_aion`)."""
    c = model.config
    if len(getattr(c, "modalities", None) or []) > 1:
        raise AstroptError("export writes one-modality (images_aion) models; this one models several image columns")
    modality = ModalityConfig(name="images_aion", input_size=c.vocab_size, pos_input_size=1, patch_size=0,
                              embed_pos=True, vocab_size=c.vocab_size)
    model_args = {"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "block_size": c.block_size,
                  "dropout": c.dropout, "bias": c.bias, "tokeniser": c.head, "attn_type": "causal",
                  "modalities": [modality]}
    return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "model_args": model_args,
            "modality_registry": ModalityRegistry([modality]), "iter_num": int(step or 0),
            "best_val_loss": float(val_loss) if val_loss is not None else None, "config": dict(extra or {})}


def export_astropt(run: str | os.PathLike, out: str | os.PathLike, step: int | None = None) -> Path:
    """Write OUT/ckpt.pt, which upstream's `load_astropt(repo_id=None, path="OUT/")` loads; returns its path."""
    import torch

    from astropt_tok.errors import ensure_folder
    from astropt_train import checkpoint as ck

    ckpt = ck.find_checkpoint(run, step)
    model, conf = ck.load_model(ckpt)
    out = Path(out)
    ensure_folder(out, "the export folder")
    extra = {"exported_from": str(ckpt.resolve()), "codec_id": (conf.get("store") or {}).get("codec_id"),
             "codec_vocab_size": conf.get("vocab_size"), "tokens_per_image": conf.get("tokens_per_image")}
    final = out / UPSTREAM_FILE
    # into a Python file: torch's own writer reports a full disk only as 'unexpected pos', ours as ENOSPC; a
    # full or read-only disk is one error, no temporary left, an earlier ckpt.pt left whole
    with atomic_file(final) as tmp, open(tmp, "wb") as f:
        torch.save(upstream_checkpoint(model, conf.get("step"), conf.get("val_loss"), extra), f,
                   pickle_module=_UPSTREAM_PICKLE, pickle_protocol=2)
    return final


# ---------------------------------------------------------------------------------------------------------
# import: upstream's ckpt.pt -> this project's GPT


def find_upstream_checkpoint(path: str | os.PathLike) -> Path | None:
    """The upstream `ckpt.pt` that `path` names (the file, or a folder holding one), or None."""
    path = Path(path)
    if path.is_file() and path.suffix == ".pt":
        return path
    if path.is_dir() and (path / UPSTREAM_FILE).is_file():
        return path / UPSTREAM_FILE
    return None


def read_upstream_checkpoint(path: Path) -> dict:
    """Load an upstream ckpt.pt with `weights_only=True`, upstream's two classes mapped to the look-alikes."""
    import torch

    allowed = [(cls, f"{UPSTREAM_MODULE}.{name}") for cls, name in _UPSTREAM_NAMES.items()]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AstroptError(f"{path} is not an upstream AstroPT checkpoint this tool can read ({first})") from None


def gpt_config_from_upstream(ckpt: dict, path: Path):
    """This project's GPTConfig for an upstream checkpoint, refusing what this model cannot be."""
    from astropt_train.model import HEADS, MODALITY, GPTConfig

    args = ckpt.get("model_args") if isinstance(ckpt, dict) else None
    if not isinstance(args, dict) or "model" not in ckpt:
        raise AstroptError(f"{path} has no model_args/model: not an upstream AstroPT checkpoint")
    mods = args.get("modalities") or list(getattr(ckpt.get("modality_registry"), "modalities", {}).values())
    names = [getattr(m, "name", None) for m in mods]
    if names != [MODALITY]:
        raise AstroptError(f"{path} models modalities {names}; this tool reads AION image-token models, one modality "
                           f"{MODALITY!r}")
    mod = mods[0]
    if not mod.vocab_size or mod.input_size != mod.vocab_size or not mod.embed_pos:
        raise AstroptError(f"{path}: modality {MODALITY} has vocab_size {mod.vocab_size}, input_size {mod.input_size}, "
                           f"embed_pos {mod.embed_pos}; a token model needs vocab_size = input_size > 0, embed_pos")
    head = args.get("tokeniser", "aim")  # upstream's GPTConfig default
    unsupported = {k: args.get(k) for k, ok in (("attn_type", "causal"), ("objective", "ar"), ("backbone", "native"),
                                                 ("lora_r", 0)) if args.get(k, ok) != ok}
    if head not in HEADS or unsupported:
        raise AstroptError(f"{path} was trained with {unsupported or {'tokeniser': head}}; this tool reads native "
                           f"causal autoregressive models with an affine or aim head")
    return GPTConfig(vocab_size=int(mod.vocab_size), block_size=int(args.get("block_size", 1024)),
                     n_layer=int(args.get("n_layer", 12)), n_head=int(args.get("n_head", 12)),
                     n_embd=int(args.get("n_embd", 768)), dropout=0.0, bias=bool(args.get("bias", False)), head=head)


def load_upstream_model(path: Path, device: str = "cpu"):
    """(GPT in eval mode, info) from an upstream AstroPT ckpt.pt."""
    from astropt_tok.store import sha256_path
    from astropt_train.model import GPT

    ckpt = read_upstream_checkpoint(path)
    try:  # a damaged or hand-made file: wrong types in model_args, weights of other shapes
        config = gpt_config_from_upstream(ckpt, path)
        state = {k.replace("_orig_mod.", ""): v for k, v in ckpt["model"].items()}
        model = GPT(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (AttributeError, TypeError, ValueError, RuntimeError, AssertionError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise AstroptError(f"{path} is a damaged upstream AstroPT checkpoint ({first}); export it again") from None
    if missing or unexpected:
        raise AstroptError(f"{path}: weights do not fit its model_args (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]})")
    info = {"kind": "upstream-astropt", "path": str(path.resolve()), "step": ckpt.get("iter_num"),
            "weights_sha256": sha256_path(path), "model": asdict(config), "store": None,
            "vocab_size": config.vocab_size}
    return model.to(device).eval(), info


def load_any_model(path: str | os.PathLike, step: int | None = None, device: str = "cpu"):
    """(GPT in eval mode on `device`, info) where info = {kind, path, step, weights_sha256, model, store, vocab_size}:
    this project's run or checkpoint folder, or an upstream AstroPT ckpt.pt (file or folder)."""
    from astropt_tok.store import sha256_path
    from astropt_train import checkpoint as ck

    path = Path(path)
    upstream = find_upstream_checkpoint(path)
    if upstream is not None and not (path / ck.MODEL_FILE).is_file():
        if step is not None:
            raise AstroptError(f"{upstream} is an upstream AstroPT checkpoint (one step); drop --step")
        return load_upstream_model(upstream, device)
    ckpt = ck.find_checkpoint(path, step)
    model, conf = ck.load_model(ckpt, device=device)
    info = {"kind": "astropt-train", "path": str(ckpt.resolve()), "step": conf.get("step"),
            "weights_sha256": sha256_path(ckpt / ck.MODEL_FILE), "model": asdict(model.config),
            "store": conf.get("store"), "vocab_size": int(conf.get("vocab_size", model.config.vocab_size))}
    return model, info
