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

import dataclasses
import os
import pickle
import sys
import types
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from astropt_tok.atomic import atomic_file
from astropt_tok.errors import AstroptError, first_line
from astropt_tok.health import refuse_non_finite_weights
from astropt_tok.schema import is_kind

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
    """Upstream AstroPT's checkpoint dict for a GPT of this project: one ModalityConfig per modality the model
    reads (`images_aion` for a model of one unnamed column, else each image column's name), all with the
    model's vocabulary, so the weights' names (`encoders.<name>.wpe.weight`, ...) are those upstream's GPT
    builds from its registry. `config.modality_order` keeps the model's block order (upstream's own GPT
    orders the blocks by name)."""
    from astropt_train.model import MODALITY

    c = model.config
    names = list(c.modalities or [MODALITY])
    mods = [ModalityConfig(name=n, input_size=v, pos_input_size=1, patch_size=0, embed_pos=True, vocab_size=v,
                           loss_weight=w)
            for n, v, w in zip(names, c.vocab_sizes(), c.loss_weights or [1.0] * len(names))]
    model_args = {"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "block_size": c.block_size,
                  "dropout": c.dropout, "bias": c.bias, "tokeniser": c.head, "attn_type": "causal",
                  "modalities": mods}
    layout = {"modality_order": names}
    if c.modality_tokens:  # modalities of their own length and kind: upstream's ModalityConfig records neither
        layout.update(modality_tokens=dict(zip(names, c.token_counts())), modality_kinds=dict(zip(names, c.kinds())),
                      model_vocab_size=c.vocab_size)
    return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "model_args": model_args,
            "modality_registry": ModalityRegistry(mods), "iter_num": int(step or 0),
            "best_val_loss": float(val_loss) if val_loss is not None else None,
            "config": {**(extra or {}), **layout}}


def export_astropt(run: str | os.PathLike, out: str | os.PathLike, step: int | None = None,
                   overwrite: bool = False) -> Path:
    """Write OUT/ckpt.pt, which upstream's `load_astropt(repo_id=None, path="OUT/")` loads; returns its path.
    The file is read back with this tool's own upstream loader before it takes its name: what export writes
    loads, with the same weights, or nothing is written.

    OUT is claimed as an export folder first (another kind of folder, or files no command made, is refused);
    an export of the same checkpoint weights is rewritten, one of other weights is replaced only with
    `overwrite`."""
    with ExitStack() as held:
        return _export_astropt(run, out, step, overwrite, held)


def _export_astropt(run, out, step, overwrite: bool, held: ExitStack) -> Path:
    import torch

    from astropt_tok.artifacts import clear_own, output_folder, read_record, update_lineage
    from astropt_train import checkpoint as ck

    ckpt = ck.find_checkpoint(run, step)
    model, conf = ck.load_model(ckpt)
    out = Path(out)
    lineage = {"checkpoint": {"path": str(ckpt.resolve()), "step": conf.get("step"),
                              "weights_sha256": ck.weights_sha256(ckpt)}}
    if held.enter_context(output_folder(out, "export", "`astropt export`", "--astropt", lineage=lineage)):
        before = ((read_record(out) or {}).get("lineage") or {}).get("checkpoint") or {}
        if before.get("weights_sha256") != lineage["checkpoint"]["weights_sha256"]:
            if not overwrite:
                raise AstroptError(f"--astropt {out} holds an export of another checkpoint ({before.get('path')}); "
                                   "pass --overwrite to replace it, or choose another --astropt")
            clear_own(out, "export")
    update_lineage(out, **lineage)
    extra = {"exported_from": str(ckpt.resolve()), "codec_id": (conf.get("store") or {}).get("codec_id"),
             "codec_vocab_size": conf.get("vocab_size"), "tokens_per_image": conf.get("tokens_per_image")}
    final = out / UPSTREAM_FILE
    # into a Python file: torch's own writer reports a full disk only as 'unexpected pos', ours as ENOSPC; a
    # full or read-only disk is one error, no temporary left, an earlier ckpt.pt left whole
    with atomic_file(final) as tmp:
        with open(tmp, "wb") as f:
            torch.save(upstream_checkpoint(model, conf.get("step"), conf.get("val_loss"), extra), f,
                       pickle_module=_UPSTREAM_PICKLE, pickle_protocol=2)
        _check_reads_back(tmp, final, model)
    return final


def _check_reads_back(written: Path, final: Path, model) -> None:
    """Load the written ckpt.pt as any upstream checkpoint is loaded here; its model must be `model` (shape,
    head, modalities in order, every weight equal), else one error and nothing written."""
    import torch

    back, _ = load_upstream_model(written)
    want = dataclasses.replace(model.config, dropout=0.0)  # upstream's dropout is a training setting
    if back.config != want:
        raise AstroptError(f"export would write {final} that reads back as another model ({back.config}, not "
                           f"{want}); nothing written")
    mine, theirs = model.state_dict(), back.state_dict()
    if mine.keys() != theirs.keys() or any(not torch.equal(mine[k].cpu(), theirs[k]) for k in mine):
        raise AstroptError(f"export would write {final} whose weights read back differently; nothing written")


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
        raise AstroptError(f"{path} is not an upstream AstroPT checkpoint this tool can read "
                           f"({first_line(exc, None)})") from None


def gpt_config_from_upstream(ckpt: dict, path: Path):
    """This project's GPTConfig for an upstream checkpoint, refusing what this model cannot be: every modality a
    token modality (vocab_size = input_size > 0, embedded positions), of one shared vocabulary unless the
    checkpoint records each modality's tokens (our export of a model of image, scalar and spectrum columns);
    native causal autoregressive; sizes of the right types. Upstream's loss_weight per modality is kept."""
    from astropt_tok.schema import Fields
    from astropt_train.model import HEADS, MODALITY, GPTConfig

    args = ckpt.get("model_args") if isinstance(ckpt, dict) else None
    if not isinstance(args, dict) or "model" not in ckpt:
        raise AstroptError(f"{path} has no model_args/model: not an upstream AstroPT checkpoint")
    f = Fields(path, "export it again")
    f.maybe(ckpt, "iter_num", int, low=0)  # the step every manifest records of it
    registry = getattr(ckpt.get("modality_registry"), "modalities", None)  # {name: ModalityConfig}
    registry = registry if isinstance(registry, dict) else {}
    mods = args.get("modalities") or list(registry.values())
    names = [getattr(m, "name", None) for m in mods]
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise f.fail("model_args.modalities", names, "distinct modality names")
    if registry and sorted(registry) != sorted(names):  # upstream builds its modules from the registry's names
        raise f.fail("modality_registry", sorted(registry), f"the modalities of model_args, {names}")
    for mod in mods:
        if not is_kind(mod.vocab_size, int) or mod.vocab_size < 1 or mod.input_size != mod.vocab_size \
                or not mod.embed_pos:
            raise AstroptError(f"{path}: modality {mod.name} has vocab_size {mod.vocab_size}, input_size "
                               f"{mod.input_size}, embed_pos {mod.embed_pos}; this tool reads token models "
                               "(vocab_size = input_size > 0, embed_pos), such as AION image tokens")
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    lengths, kinds = config.get("modality_tokens"), config.get("modality_kinds")
    if lengths is None and len({mod.vocab_size for mod in mods}) > 1:
        raise AstroptError(f"{path}: its modalities have vocabularies {[m.vocab_size for m in mods]} and it records "
                           "no tokens per modality (config.modality_tokens, which `astropt export` writes); this "
                           "tool cannot tell where each modality's block lies")
    weights = [getattr(mod, "loss_weight", 1.0) for mod in mods]
    if not all(is_kind(w, float) and w >= 0 for w in weights):
        raise f.fail("model_args.modalities", weights, "loss weights >= 0")
    head = args.get("tokeniser", "aim")  # upstream's GPTConfig default
    unsupported = {k: args.get(k) for k, ok in (("attn_type", "causal"), ("objective", "ar"), ("backbone", "native"),
                                                 ("lora_r", 0)) if args.get(k, ok) != ok}
    if head not in HEADS or unsupported:
        raise AstroptError(f"{path} was trained with {unsupported or {'tokeniser': head}}; this tool reads native "
                           f"causal autoregressive models with an affine or aim head")
    dims = {key: (f.need(args, key, int, "model_args.", low=1) if key in args else default)  # upstream's defaults
            for key, default in (("block_size", 1024), ("n_layer", 12), ("n_head", 12), ("n_embd", 768))}
    if dims["n_embd"] % dims["n_head"]:
        raise f.fail("model_args.n_embd", dims["n_embd"], f"a multiple of n_head ({dims['n_head']})")
    if lengths is None and dims["block_size"] % len(names):
        raise f.fail("model_args.block_size", dims["block_size"], f"a multiple of its {len(names)} modalities")
    f.maybe(args, "dropout", float, "model_args.", low=0.0, below=1.0)
    bias = f.maybe(args, "bias", bool, "model_args.") or False
    # the block order: the one our export recorded, else upstream's own (its GPT reads modalities by sorted name)
    order = config.get("modality_order")
    if not (isinstance(order, list) and sorted(order) == sorted(names)):
        order = sorted(names)
    by_name = {mod.name: mod for mod in mods}
    weight_of = dict(zip(names, weights))
    shapes = {"vocab_size": int(mods[0].vocab_size),
              "loss_weights": [float(weight_of[n]) for n in order] if any(w != 1 for w in weights) else None}
    if lengths is not None:  # modalities of their own vocabulary and length, as `upstream_checkpoint` records them
        if not (isinstance(lengths, dict) and isinstance(kinds, dict) and sorted(lengths) == sorted(names)
                and sorted(kinds) == sorted(names)):
            raise f.fail("config.modality_tokens", lengths, f"tokens and kinds of each of its modalities {names}")
        shapes.update(modality_vocab=[int(by_name[n].vocab_size) for n in order],
                      modality_tokens=[f.need(lengths, n, int, "config.modality_tokens.", low=1) for n in order],
                      modality_kinds=[f.need(kinds, n, str, "config.modality_kinds.") for n in order],
                      vocab_size=f.need(config, "model_vocab_size", int, "config.", low=1))
        if sum(shapes["modality_tokens"]) != dims["block_size"]:
            raise f.fail("model_args.block_size", dims["block_size"], f"the sum of config.modality_tokens {lengths}")
    return GPTConfig(dropout=0.0, bias=bias, head=head, modalities=None if order == [MODALITY] else order,
                     **shapes, **dims)


def load_upstream_model(path: Path, device: str = "cpu"):
    """(GPT in eval mode, info) from an upstream AstroPT ckpt.pt."""
    from astropt_tok.store import sha256_path
    from astropt_train.model import GPT

    ckpt = read_upstream_checkpoint(path)
    try:  # a damaged or hand-made file: wrong types in model_args, weights of other shapes
        config = gpt_config_from_upstream(ckpt, path)
        state = {k.replace("_orig_mod.", ""): v for k, v in ckpt["model"].items()}
        refuse_non_finite_weights(state, path, "the run that wrote it diverged; use an earlier checkpoint")
        model = GPT(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (AttributeError, TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise AstroptError(f"{path} is a damaged upstream AstroPT checkpoint ({first_line(exc)}); export it again") from None
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
    from astropt_train import checkpoint as ck

    path = Path(path)
    upstream = find_upstream_checkpoint(path)
    if upstream is not None and path.is_dir() and ck.list_checkpoints(path):
        # a run folder always means its own checkpoints: a ckpt.pt left beside them (an export, a download)
        # never shadows them; pass the file itself to load it
        print(f"note: {path} is a training run: using its own checkpoints, not the {UPSTREAM_FILE} beside "
              f"them (pass {upstream} to load that)", file=sys.stderr)
        upstream = None
    if upstream is not None and not ck.is_checkpoint(path):
        if step is not None:
            raise AstroptError(f"{upstream} is an upstream AstroPT checkpoint (one step); drop --step")
        return load_upstream_model(upstream, device)
    ckpt = ck.find_checkpoint(path, step)
    model, conf = ck.load_model(ckpt, device=device)
    info = {"kind": "astropt-train", "path": str(ckpt.resolve()), "step": conf.get("step"),
            "weights_sha256": ck.weights_sha256(ckpt), "model": asdict(model.config),
            "store": conf.get("store"), "vocab_size": int(conf.get("vocab_size", model.config.vocab_size))}
    return model, info
