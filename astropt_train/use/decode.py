"""Tokens back to galaxies: decode stored rows, check what the codec loses, and look at what a model predicts,
completes and invents.

`decode(DecodeConfig)` is the one library call behind `astropt decode`. It picks one mode:

  stored     decode store rows (--rows / --ids / --random) with the AION codec; with `compare`, re-read the
             same rows from the store's source and report per-band MSE and PSNR over the codec's 96x96 crop
  predict    teacher-forced argmax: input row[:-1], prediction of row[1:] (as validation scores it); the
             predicted image is row[0] followed by the 575 argmax tokens
  complete   keep the first K tokens of each stored row and let the model sample the rest
  generate   sample N galaxies from nothing (see `first_token_distribution` for how the first token is drawn)
  cross      a model trained on several surveys draws each row's image in one survey (--generate-modality)
             from its stored tokens in another (--given), beside the real image and the codec's reconstruction

Every token sequence is [N, tokens_per_image] (576 for AION). Decoded flux is float32 [N, bands, 96, 96].
"""

from __future__ import annotations

import math
import sys

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from astropt_tok.errors import AstroptError
from astropt_tok.executor import torch_threads  # noqa: F401  (re-exported: demo and tests use it from here)
from astropt_tok.quality import center_crop, reconstruction_metrics, summary_json  # noqa: F401  (re-exported)
from astropt_train.use.images import rgb_indices, save_figure, save_flux

MODES = ("stored", "predict", "complete", "generate", "cross")


@dataclass
class DecodeConfig:
    """Everything `astropt decode` needs; exactly one row selection for the modes that read stored rows."""

    out: Path | None = None  # the PNG grid; None: decoded.png, or no picture when save_flux is given
    tokens: Path | None = None  # token store folder (stored, predict, complete; generate's first tokens)
    rows: str | None = None  # "0:16", "3", "1,5,9" or "0:4,10"
    ids: list[str] | None = None  # object ids
    random: int | None = None  # this many random rows, drawn with `seed`
    seed: int = 0
    codec: str | None = None  # hub id or folder; default: the store's (or the checkpoint's store's) codec
    compare: bool = False  # re-read rows from the source: original | reconstruction, with MSE and PSNR
    source: Path | None = None  # where the store's source files are now (by file name), if they moved
    checkpoint: Path | None = None  # run folder or checkpoint folder of `astropt train`
    step: int | None = None  # checkpoint step (default: the run's latest)
    generate: int | None = None  # sample this many galaxies from the model
    complete_from: int | None = None  # keep the first K tokens of each row, let the model write the rest
    predict: bool = False  # teacher-forced argmax prediction of each row
    modality: str | None = None  # the image column (model modality) decoded; None: the model's first, else the store's
    given: str | None = None  # cross-survey: the modality whose stored tokens the model is given
    generate_modality: str | None = None  # cross-survey: the modality the model draws from them
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = None
    kv_cache: bool = True  # sample with the model's key/value cache (same tokens, much faster)
    accept_codec_change: bool = False  # decode with a codec whose weights differ from those that made the tokens
    bands: list[str] | None = None  # bands of --save-flux, among the decoded modality's (default: all of them)
    rgb_bands: tuple[str, str, str] | None = None  # displayed as (red, green, blue); None: z,r,g (HSC: i,r,g) of them
    save_flux: Path | None = None  # .npy or .fits
    device: str = "auto"  # "cpu", "cuda", "auto" (cuda when available)
    batch_size: int = 32  # images per codec decode / model batch
    tf32: bool = False  # let the codec decode in TF32 on a GPU (faster; flux then differs from fp32 by ~1e-3)
    ncols: int | None = None  # panels per grid row (default: about 8)
    threads: int | None = None  # torch CPU threads while decoding/sampling (None: 1 on a CPU of <= 4 cores, else torch's)
    progress: bool = True  # progress bars on stderr while sampling and decoding (only on a terminal)
    title: str | None = None  # a line above the grid
    inside: Path | None = None  # an artifact folder the caller owns, where --out/--save-flux may go (the demo's)


@dataclass
class DecodeResult:
    """What one `decode` call made: tokens, flux and labels of every panel, metrics, and where files went."""

    mode: str
    out: Path | None  # the PNG grid (None: only flux was asked for)
    tokens: np.ndarray  # [N, T] int64, the sequences decoded in the last panel column
    flux: np.ndarray  # [N, bands, 96, 96] float32 of those sequences, in `bands` order
    bands: list[str]
    labels: list[str]  # one per galaxy
    codec_id: str
    rows: np.ndarray | None = None  # store rows, when the mode reads stored rows
    metrics: dict | None = None  # --compare: per-band MSE/PSNR; predict: accuracy/loss; complete: agreement
    flux_path: Path | None = None
    columns: list[str] = field(default_factory=list)  # panel kinds per galaxy, e.g. ["original", "reconstruction"]
    rgb_bands: list[str] = field(default_factory=list)  # the bands drawn as red, green, blue
    modality: str | None = None  # the store column whose tokens were decoded (None: a store of one column)
    kind: str = "image"  # the decoded column's kind: "image", "scalar" or "spectrum"
    table: list[dict] = field(default_factory=list)  # a scalar column: per galaxy id, row, true, codec, median, lo16, hi84


# ---------------------------------------------------------------------------------------------------------
# choosing rows


def parse_rows(spec: str, num_rows: int) -> np.ndarray:
    """Store rows from "0:16", "7", "1,5,9", "0:4,10" or "-3:" (Python slice rules); out of range is an error."""
    def bounded(v: int | None, is_stop: bool) -> None:
        if v is not None and not -num_rows <= v <= (num_rows if is_stop else num_rows - 1):
            raise AstroptError(f"rows {spec!r} are out of range: the store has {num_rows} rows (0..{num_rows - 1})")

    out: list[int] = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        try:
            bits = [int(b) if b.strip() else None for b in part.split(":")]
        except ValueError:
            raise AstroptError(f"cannot read --rows {spec!r}: use e.g. 0:16, 7 or 1,5,9") from None
        if len(bits) > 3 or (len(bits) == 3 and bits[2] == 0):
            raise AstroptError(f"cannot read --rows {spec!r}: use e.g. 0:16, 7 or 1,5,9")
        if len(bits) == 1:
            bounded(bits[0], is_stop=False)
            out.append(bits[0] % num_rows)
        else:
            bounded(bits[0], is_stop=False)
            bounded(bits[1], is_stop=True)
            out.extend(range(*slice(*bits).indices(num_rows)))
    if not out:
        raise AstroptError(f"--rows {spec!r} selects no rows (the store has {num_rows})")
    return np.array(out, dtype=np.int64)


def select_rows(store, rows: str | None, ids: Sequence[str] | None, random: int | None, seed: int) -> np.ndarray:
    """Store row indices from exactly one of rows / ids / random."""
    given = [name for name, v in (("--rows", rows), ("--ids", ids), ("--random", random)) if v]
    if len(given) != 1:
        raise AstroptError(f"choose the stored rows with exactly one of --rows, --ids, --random (got {given or 'none'})")
    if rows:
        return parse_rows(rows, store.num_rows)
    if ids:
        return store.find_object_ids([str(i).strip() for i in ids if str(i).strip()])
    if random < 1 or random > store.num_rows:
        raise AstroptError(f"--random {random}: the store has {store.num_rows} rows")
    return np.sort(np.random.default_rng(seed).choice(store.num_rows, size=random, replace=False)).astype(np.int64)


def rows_with_images(store, rows: np.ndarray, modalities: Sequence[str]) -> np.ndarray:
    """The rows that have every image in `modalities`: in a --keep-partial store a row may lack one (its tokens are
    placeholder zeros, not a galaxy), and such rows are left out with a note naming them; none left is an error."""
    if not store.partial:
        return rows
    valid = store.valid(rows)
    has = np.logical_and.reduce([valid[m] for m in modalities])
    if has.all():
        return rows

    def lack(m: str) -> str:  # "rows 2, 5 lack hsc_image", at most 12 rows named
        r = rows[~valid[m]]
        listed = ", ".join(str(int(x)) for x in r[:12]) + (f" and {len(r) - 12} more" if len(r) > 12 else "")
        return f"rows {listed} lack {m}" if len(r) > 1 else f"row {listed} lacks {m}"

    lacking = "; ".join(lack(m) for m in modalities if not valid[m].all())
    why = f"token store {store.dir} was made with --keep-partial"
    if not has.any():
        raise AstroptError(f"{lacking} ({why}): no chosen row has {' and '.join(modalities)}; choose other rows")
    print(f"note: {lacking} ({why}): left out", file=sys.stderr)
    return rows[has]


def check_token_range(tokens: np.ndarray, vocab_size: int, what: str = "tokens") -> None:
    """Raise AstroptError when any token is outside 0..vocab_size-1, naming the first bad one."""
    tokens = np.asarray(tokens)
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise AstroptError(
            f"{what}: token {int(tokens[r, c])} at sequence {r}, position {c} is outside the codec's vocabulary "
            f"0..{vocab_size - 1}")


# ---------------------------------------------------------------------------------------------------------
# codec and metrics


def decode_tokens(codec, tokens: np.ndarray, bands: Sequence[str], batch_size: int = 32,
                  tf32: bool = False, progress: bool = False, what: str = "decode") -> np.ndarray:
    """AION decode of token sequences [N, T] -> float32 flux [N, len(bands), 96, 96], in batches.

    `codec` is a `LoadedCodec`; tokens are checked against its vocabulary first. The codec runs in fp32 with
    TF32 off (unless `tf32`), so the flux is AION's fp32 decode on any device; the TF32 settings are put back
    after. `progress`: a bar on stderr (on a terminal only).
    """
    import torch

    from astropt_tok.executor import tf32_allowed
    from astropt_tok.progress import ProgressBar

    tokens = np.asarray(tokens)
    check_token_range(tokens, codec.vocab_size)
    if tokens.ndim != 2 or tokens.shape[1] != codec.tokens_per_image:
        raise AstroptError(f"token sequences must be [N, {codec.tokens_per_image}] for this codec, got {list(tokens.shape)}")
    device = next(codec.codec.parameters()).device
    out = []
    with torch.inference_mode(), tf32_allowed(tf32), \
            ProgressBar(what, len(tokens), progress and len(tokens) > batch_size, "images") as bar:
        for i in range(0, len(tokens), batch_size):
            t = torch.as_tensor(tokens[i : i + batch_size].astype(np.int64), device=device)  # [b, T]
            out.append(codec.codec.decode(t, bands=list(bands)).flux.float().cpu().numpy())  # [b, nb, 96, 96]
            bar.advance(len(t))
    if not out:
        return np.zeros((0, len(bands), 96, 96), np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------------------
# model-side token work


def predict_tokens(model, tokens: np.ndarray, batch_size: int = 32, vocab_limit: int | None = None,
                   context: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Teacher-forced argmax prediction, as validation scores it: X = row[:-1], Y = row[1:]; only ids below
    `vocab_limit` are predicted when given. `context` [N, C*T]: the stored blocks a several-modality model reads
    before this one (its trained order); the sequence is then context + row, and only the row's tokens are scored.

    Returns (row[0] followed by argmax(logits) at positions 1..T-1, [N, T] int64; {"accuracy", "loss"}).
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    preds, correct, loss_sum, count = [], 0, 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(tokens), batch_size):
            t = torch.as_tensor(np.asarray(tokens[i : i + batch_size], dtype=np.int64), device=device)  # [b, T]
            seq = t if context is None else torch.cat(
                [torch.as_tensor(np.asarray(context[i : i + batch_size], dtype=np.int64), device=device), t], dim=1)
            logits, _ = model(seq[:, :-1], targets=seq[:, 1:])  # [b, C*T + T-1, vocab]
            y = t[:, 1:]
            logits = logits[:, -y.size(1):, :vocab_limit]  # [b, T-1, vocab]: those that predict row[1:]
            if not bool(torch.isfinite(logits).all()):  # an argmax of NaN is a token that means nothing
                raise AstroptError("the model's logits are not finite (NaN or infinite) for rows "
                                   f"{i}..{i + len(t) - 1}: its activations overflowed or its weights are damaged; "
                                   "nothing was predicted from them (try another checkpoint, or fp32)")
            arg = logits.argmax(dim=-1)  # [b, T-1]
            correct += int((arg == y).sum())
            loss_sum += float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"))
            count += y.numel()
            preds.append(torch.cat([t[:, :1], arg], dim=1).cpu().numpy())
    return np.concatenate(preds), {"accuracy": correct / max(count, 1), "loss": loss_sum / max(count, 1)}


def complete_tokens(
    model, tokens: np.ndarray, keep: int, temperature: float = 1.0, top_k: int | None = None,
    seed: int = 0, batch_size: int = 32, kv_cache: bool = True, vocab_limit: int | None = None,
    progress: bool = False, context: np.ndarray | None = None,
) -> np.ndarray:
    """Keep tokens[:, :keep] and sample the remaining T - keep with the model (ids below vocab_limit) -> [N, T] int64.

    `context` [N, C*T]: stored blocks the model reads first (as `predict_tokens`); they are not returned."""
    import torch

    from astropt_tok.progress import ProgressBar

    n, t = tokens.shape
    if not 1 <= keep < t:
        raise AstroptError(f"--complete-from must be between 1 and {t - 1} (tokens kept from each row), got {keep}")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    batches = -(-n // batch_size)
    with ProgressBar("complete", batches * (t - keep), progress, "tokens") as bar:
        for i in range(0, n, batch_size):
            prefix = torch.as_tensor(np.asarray(tokens[i : i + batch_size, :keep], dtype=np.int64), device=device)  # [b, K]
            if context is not None:  # [b, C*T + K]
                prefix = torch.cat([torch.as_tensor(np.asarray(context[i : i + batch_size], dtype=np.int64),
                                                    device=device), prefix], dim=1)
            seq = model.generate(prefix, t - keep, temperature=temperature, top_k=top_k, generator=gen,
                                 use_kv_cache=kv_cache, vocab_limit=vocab_limit, on_token=bar.advance)
            out.append(seq[:, -t:].cpu().numpy())
    return np.concatenate(out).astype(np.int64)


def cross_survey_tokens(
    model, given_tokens: np.ndarray, given: str, wanted: str, temperature: float = 1.0, top_k: int | None = None,
    seed: int = 0, batch_size: int = 32, kv_cache: bool = True,
) -> np.ndarray:
    """A several-modality model draws each galaxy's `wanted` block after its `given` one: [N, T] -> [N, T] int64.

    The sequence is the given block then the wanted one (the model's other modalities, if any, would follow).
    """
    import torch

    names = list(model.names)
    n, t = given_tokens.shape
    order = [names.index(given), names.index(wanted)] + [i for i, m in enumerate(names) if m not in (given, wanted)]
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i in range(0, n, batch_size):
        prefix = torch.as_tensor(np.asarray(given_tokens[i : i + batch_size], dtype=np.int64), device=device)  # [b, T]
        blocks = torch.tensor(order, device=device).expand(len(prefix), len(names))  # [b, M]
        seq = model.generate(prefix, t, temperature=temperature, top_k=top_k, generator=gen, use_kv_cache=kv_cache,
                             order=blocks)  # [b, 2T]
        out.append(seq[:, t:].cpu().numpy())
    return np.concatenate(out).astype(np.int64)


def first_token_distribution(store, vocab_size: int, max_rows: int = 100_000, modality: str | None = None
                             ) -> np.ndarray:
    """Empirical distribution [vocab] of the first token of stored rows (at most the first `max_rows`) of
    `modality` (None: the store's first column).

    The model has no begin-of-image token, so it cannot choose position 0 itself; generating "from nothing"
    draws the first token from how images in the training store actually begin, then the model writes the rest.
    """
    n = min(store.num_rows, max_rows)
    first = np.asarray(store.take(np.arange(n), modality)[:, 0], dtype=np.int64)
    if store.partial:  # a row that lacks the image holds placeholder zeros, not a beginning
        first = first[store.valid(np.arange(n))[modality or store.modalities[0]]]
    check_token_range(first[:, None], vocab_size, what=f"store {store.dir}")
    counts = np.bincount(first, minlength=vocab_size).astype(np.float64)
    return counts / counts.sum()


def generate_tokens(
    model, n: int, first_token_probs: np.ndarray, tokens_per_image: int, temperature: float = 1.0,
    top_k: int | None = None, seed: int = 0, batch_size: int = 32, kv_cache: bool = True, vocab_limit: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Sample n sequences of `tokens_per_image` tokens (T; a several-modality model: its blocks in order, T each):
    first token from `first_token_probs` [vocab], the other T-1 from the model (ids below vocab_limit) -> [n, T]."""
    import torch

    from astropt_tok.progress import ProgressBar

    if n < 1:
        raise AstroptError(f"--generate must be at least 1, got {n}")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    probs = torch.as_tensor(first_token_probs, dtype=torch.float64, device=device)
    first = torch.multinomial(probs, n, replacement=True, generator=gen).view(n, 1)  # [n, 1]
    out = []
    batches = -(-n // batch_size)
    with ProgressBar("generate", batches * (tokens_per_image - 1), progress, "tokens") as bar:
        for i in range(0, n, batch_size):
            seq = model.generate(first[i : i + batch_size], tokens_per_image - 1, temperature=temperature, top_k=top_k,
                                 generator=gen, use_kv_cache=kv_cache, vocab_limit=vocab_limit, on_token=bar.advance)
            out.append(seq.cpu().numpy())
    return np.concatenate(out).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# the one library call


def _labels_for(store, rows: np.ndarray) -> list[str]:
    ids = store.object_ids(rows)
    return [oid if oid is not None else f"row {r}" for oid, r in zip(ids, rows)]


def _source_rereadable(manifest: dict) -> bool:
    return manifest.get("source", {}).get("kind") in ("local", "hub") and bool(manifest["source"].get("files"))


def _read_originals(store, rows: np.ndarray, bands: list[str], crop: int, moved_to: Path | None,
                    column: str | None = None) -> np.ndarray:
    """The source flux of store rows (of image `column`, default the store's first), centre-cropped like the
    codec: [N, bands, crop, crop]."""
    from astropt_tok.source import read_source_flux

    if not _source_rereadable(store.manifest):
        raise AstroptError(
            f"--compare needs the store's source, but {store.dir} was not made from a survey "
            f"(its manifest source is {store.manifest.get('source', {}).get('id')!r})")
    return read_source_flux(store.manifest["source"], store.source_rows(rows), bands, crop=crop, moved_to=moved_to,
                            column=column)


def _mode(cfg: DecodeConfig) -> str:
    if (cfg.given is None) != (cfg.generate_modality is None):
        raise AstroptError("cross-survey decoding needs both --given MODALITY and --generate-modality MODALITY")
    chosen = [m for m, on in (("generate", cfg.generate is not None), ("complete", cfg.complete_from is not None),
                              ("predict", cfg.predict), ("cross", cfg.given is not None)) if on]
    if len(chosen) > 1:
        raise AstroptError(f"choose one of --generate, --complete-from, --predict, --given (got {', '.join(chosen)})")
    if chosen == ["cross"] and cfg.given == cfg.generate_modality:
        raise AstroptError(f"--given and --generate-modality are both {cfg.given}: name two modalities")
    if chosen == ["cross"] and cfg.modality is not None and cfg.modality != cfg.generate_modality:
        raise AstroptError(f"--modality {cfg.modality} with --given: cross-survey decoding decodes the modality "
                           f"drawn, --generate-modality {cfg.generate_modality}; drop --modality")
    if chosen == ["cross"] and cfg.checkpoint is None:
        raise AstroptError("--given/--generate-modality need a model trained on several surveys: pass --checkpoint RUN")
    if chosen and cfg.checkpoint is None:
        raise AstroptError(f"--{chosen[0].replace('complete', 'complete-from')} needs a trained model: pass --checkpoint RUN")
    if not chosen and cfg.checkpoint is not None:
        raise AstroptError("with --checkpoint choose what to show: --generate N, --rows ... --complete-from K, --predict, "
                           "or --given A --generate-modality B")
    mode = chosen[0] if chosen else "stored"
    if mode == "generate" and (cfg.rows or cfg.ids or cfg.random):
        raise AstroptError("--generate samples new galaxies: it takes no --rows, --ids or --random")
    if mode == "generate" and cfg.compare:
        raise AstroptError("--compare needs stored rows; generated galaxies have no original")
    return mode


def decode(cfg: DecodeConfig) -> DecodeResult:
    """Run one `astropt decode`: choose tokens (stored, predicted, completed or generated), decode, write files."""
    _check_options(cfg)
    plan = _plan(cfg)  # every flag value checked against the store: before torch, any model or codec loads
    from astropt_tok.executor import default_cpu_threads, resolve_device

    threads = cfg.threads if cfg.threads is not None else default_cpu_threads(resolve_device(cfg.device))
    with torch_threads(threads):
        return _decode(cfg, plan)


def _checkpoint_config(cfg: DecodeConfig) -> dict:
    """The store and model modalities a checkpoint of this project records, {"store": {...}, "modalities": [...]},
    read from its config.json without torch or its weights so flag values are checked against the store before
    any model loads; {} for an upstream ckpt.pt. Only plain values are taken: `load_any_model` checks the file
    whole afterwards, so a damaged config is still reported by it."""
    import json

    from astropt_train import checkpoint as ck
    from astropt_train.use.interop import find_upstream_checkpoint

    path = Path(cfg.checkpoint)
    if find_upstream_checkpoint(path) is not None and not ck.is_checkpoint(path) \
            and not ck.list_checkpoints(path):
        return {}
    try:
        conf = json.loads((ck.find_checkpoint(path, cfg.step) / ck.CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return {}  # unreadable: load_any_model says what is wrong with it
    if not isinstance(conf, dict):
        return {}
    store = conf.get("store")
    mods = conf["model"].get("modalities") if isinstance(conf.get("model"), dict) else None
    return {"store": store if isinstance(store, dict) and isinstance(store.get("dir", ""), str) else {},
            "modalities": mods if isinstance(mods, list) and all(isinstance(m, str) for m in mods) else None}


def _open_store(cfg: DecodeConfig, mode: str, recorded: dict):
    """The token store: --tokens, else (a model's modes) the one the checkpoint was trained on."""
    from astropt_tok.store import TokenStore

    store_dir = cfg.tokens
    if store_dir is None and mode != "stored" and recorded.get("dir"):
        store_dir = Path(recorded["dir"])  # the store the model was trained on
    if store_dir is None and mode != "generate":
        raise AstroptError("pass the token store with --tokens DIR")
    if store_dir is None:
        raise AstroptError("--generate draws each galaxy's first token from a token store: pass --tokens DIR "
                           "(the checkpoint names no store that exists here)")
    if not Path(store_dir).exists() and cfg.tokens is None:
        raise AstroptError(f"the checkpoint's token store {store_dir} is not here: pass --tokens DIR")
    return TokenStore(store_dir)


def _store_columns(store) -> str:
    """'legacysurvey_image, hsc_image', or a one-column store's source column."""
    return ", ".join(store.modalities) or (store.manifest.get("source", {}).get("column") or "tokens")


def _choose_modality(cfg: DecodeConfig, mode: str, store, recorded: dict) -> str | None:
    """The store column whose tokens are decoded (None: a store of one column): --generate-modality (cross),
    --modality, else the model's first block (its positions 0..T-1), else the store's first column.
    `recorded`: what the checkpoint's config.json says (`_checkpoint_config`; {} without one)."""
    model_modalities = recorded.get("modalities")
    if mode == "cross":
        held = store.modalities or [_store_columns(store)]  # a one-column store holds its source column
        for flag, name in (("--given", cfg.given), ("--generate-modality", cfg.generate_modality)):
            if recorded:  # the model first: one that never learned the modality cannot draw it from any store
                _check_model_has(cfg, flag, name, model_modalities)
            if name not in held:
                raise AstroptError(f"{flag} {name}: token store {store.dir} holds {', '.join(held)}, not {name}; "
                                   f"drawing one survey from another with checkpoint {cfg.checkpoint} needs a store "
                                   "of both")
        return cfg.generate_modality
    if cfg.modality is not None:
        if not store.modalities:
            if cfg.modality == _store_columns(store):
                return None  # the one column, named
            raise AstroptError(f"--modality {cfg.modality}: token store {store.dir} holds one image column, "
                               f"{_store_columns(store)}")
        if cfg.modality not in store.modalities:
            raise AstroptError(f"--modality {cfg.modality}: token store {store.dir} holds {_store_columns(store)}; "
                               "choose one of them")
        return cfg.modality
    return (model_modalities or store.modalities or [None])[0]


def _check_bands(flag: str, bands, modality: str | None, own: list[str], store, choose: str) -> None:
    """Bands decoded must be the decoded modality's own: another survey's bands would draw its tokens as an image
    they never were (the codec decodes any token ids in any bands, silently)."""
    other = [b for b in bands if b not in own]
    if not other:
        return
    what = f"{modality} of token store {store.dir}" if modality else f"those of token store {store.dir}"
    fits = [m for m in store.modalities if m != modality and set(other) <= set(store.modality_bands[m])]
    hint = (f"; to decode {fits[0]}'s tokens pass {choose} {fits[0]}" if fits else
            f"; choose the image column with {choose} ({_store_columns(store)})" if len(store.modalities) > 1 else "")
    raise AstroptError(f"{flag} {','.join(other)}: the tokens decoded are {what}, in bands {','.join(own)}; "
                       f"bands of another survey would draw them as an image they never were{hint}")


def _model_context(model, modality: str | None) -> list[str]:
    """The model's modalities before `modality` in its block order: the blocks a model reads before that one."""
    if model is None or not model.config.modalities or modality is None:
        return []
    return list(model.names[: model.names.index(modality)])


@dataclass
class _Plan:
    """What `decode` will do, settled from the flags and the store alone (no torch, model or codec yet)."""

    mode: str
    store: Any  # TokenStore
    modality: str | None  # the store column decoded (None: a store of one column)
    flux_bands: list[str]  # bands of --save-flux and DecodeResult.flux
    rgb_wanted: tuple[str, str, str]
    decode_bands: list[str]  # flux_bands, then any display band not among them
    rows: np.ndarray | None  # store rows (None: --generate)
    kind: str = "image"  # the decoded column's kind: "image", "scalar" (a catalogue number) or "spectrum"


def _catalogue_plan(cfg: DecodeConfig, mode: str, store, modality: str, kind: str) -> _Plan:
    """A scalar or spectrum column: its stored tokens decoded (no --checkpoint), or (--given A
    --generate-modality it) predicted from another block; image-only flags are refused."""
    if mode in ("predict", "complete", "generate"):
        flag = {"predict": "--predict", "complete": "--complete-from", "generate": "--generate"}[mode]
        raise AstroptError(f"{flag} works on image columns, and {modality} is a {kind} column; to predict it from an "
                           f"image pass --given IMAGE_COLUMN --generate-modality {modality}")
    for flag, value in (("--bands", cfg.bands), ("--rgb", cfg.rgb_bands), ("--save-flux", cfg.save_flux)):
        if value:
            raise AstroptError(f"{flag} is for image columns; {modality} is a {kind} column")
    rows = select_rows(store, cfg.rows, cfg.ids, cfg.random, cfg.seed)
    return _Plan(mode, store, modality, [], ("", "", ""), [], rows, kind=kind)


def _plan(cfg: DecodeConfig) -> _Plan:
    """Check every flag value that the store can check (mode, --modality, bands, rows, --complete-from) and settle
    what to decode: a mistake fails in a moment, before torch, the model or the codec loads."""
    mode = _mode(cfg)
    recorded = _checkpoint_config(cfg) if cfg.checkpoint is not None else {}
    store = _open_store(cfg, mode, recorded.get("store") or {})
    modality = _choose_modality(cfg, mode, store, recorded)
    kind = store.modality_kind.get(modality, "image") if modality else "image"
    if kind != "image":
        return _catalogue_plan(cfg, mode, store, modality, kind)
    if mode == "cross" and store.modality_kind.get(cfg.given, "image") != "image":
        raise AstroptError(f"--given {cfg.given} is a {store.modality_kind[cfg.given]} column: an image is drawn from "
                           f"another image column's tokens; to predict {cfg.given} from {modality} pass --given "
                           f"{modality} --generate-modality {cfg.given}")
    # `store.bands` are the first column's only: each column's own are in store.modality_bands
    own_bands = store.modality_bands[modality] if modality in store.modality_bands else store.bands
    choose = "--generate-modality" if mode == "cross" else "--modality"
    _check_bands("--bands", cfg.bands or [], modality, own_bands, store, choose)
    flux_bands = list(cfg.bands or own_bands)
    if cfg.rgb_bands is not None:
        _check_bands("--rgb", cfg.rgb_bands, modality, own_bands, store, choose)
        rgb_wanted = tuple(cfg.rgb_bands)
    else:
        from astropt_train.validate import rgb_bands as rgb_of

        rgb = rgb_of(own_bands)  # the decoded survey's own colours: z, r, g (HSC i, r, g), else its first three
        rgb_wanted = tuple(rgb + rgb[-1:] * (3 - len(rgb)))  # fewer than three bands: the last repeated (grey)
    if not flux_bands:
        raise AstroptError("no bands to decode: pass --bands")
    decode_bands = flux_bands + [b for b in rgb_wanted if b not in flux_bands]  # one decode serves both
    rgb_indices(decode_bands, rgb_wanted)  # three display bands
    rows = None if mode == "generate" else select_rows(store, cfg.rows, cfg.ids, cfg.random, cfg.seed)
    if mode == "complete" and not cfg.complete_from < store.tokens_per_image:
        raise AstroptError(f"--complete-from must be between 1 and {store.tokens_per_image - 1} (tokens kept of the "
                           f"{store.tokens_per_image} of each image), got {cfg.complete_from}")
    return _Plan(mode, store, modality, flux_bands, rgb_wanted, decode_bands, rows)


def _decode(cfg: DecodeConfig, plan: _Plan) -> DecodeResult:
    from astropt_tok.artifacts import check_model_store, check_store_codec
    from astropt_tok.codec import load_image_codec
    from astropt_tok.executor import resolve_device
    from astropt_tok.store import manifest_sha256

    mode, store, modality, rows = plan.mode, plan.store, plan.modality, plan.rows
    flux_bands, rgb_wanted, decode_bands = plan.flux_bands, plan.rgb_wanted, plan.decode_bands
    device = resolve_device(cfg.device)
    model, ckpt = None, {}
    if cfg.checkpoint is not None:
        from astropt_train.use.interop import load_any_model

        model, ckpt = load_any_model(cfg.checkpoint, step=cfg.step, device=device)  # ours, or upstream's ckpt.pt
    ck_store = ckpt.get("store") or {}
    if model is not None:  # before any work: the store holds tokens of the codec, modalities and bands it learned
        for note in check_model_store(f"checkpoint {ckpt['path']}", ck_store or None, model.config.modalities, store,
                                      manifest_sha256(store.dir)):
            print(note, file=sys.stderr)
        if plan.kind == "image" and mode == "cross":  # a scalar or spectrum is checked where it is predicted
            _check_cross(cfg, model, store, ck_store)
        elif plan.kind == "image":
            _check_model_modality(cfg, model, store, modality, ck_store)
    if plan.kind == "scalar":
        return _decode_scalar(cfg, plan, model, ckpt, device)
    if plan.kind == "spectrum":
        from astropt_train.use.spectra import decode_spectrum

        return decode_spectrum(cfg, plan, model, ck_store, device)
    context = [] if mode == "cross" else _model_context(model, modality)  # blocks the model reads first

    # The model's own codec first (its tokens are what it learned), then the store's.
    codec_id = cfg.codec or ck_store.get("codec_id") or store.codec_id
    codec = load_image_codec(str(codec_id), device=device)
    # its weights must be those that made the store's tokens, and those of the tokens the model learned: a codec
    # folder refitted since decodes the same ids to other images
    notes = check_store_codec(f"token store {store.dir}", store.manifest.get("codec") or {}, codec,
                              cfg.accept_codec_change)
    if model is not None and ck_store:
        notes += check_store_codec(f"the token store checkpoint {ckpt['path']} was trained on",
                                   {"id": ck_store.get("codec_id"), "weights_sha256": ck_store.get("codec_sha256")},
                                   codec, cfg.accept_codec_change)
    for note in notes:
        print(note, file=sys.stderr)
    if store.vocab_size != codec.vocab_size or store.tokens_per_image != codec.tokens_per_image:
        raise AstroptError(
            f"store {store.dir} holds {store.tokens_per_image} tokens per image from a vocabulary of {store.vocab_size}, "
            f"but codec {codec.codec_id} has {codec.tokens_per_image} and {codec.vocab_size}")
    if model is not None:
        vocab = int(ckpt.get("vocab_size", model.config.vocab_size))
        if ckpt.get("kind") == "astropt-train" and vocab != codec.vocab_size:
            raise AstroptError(f"checkpoint {cfg.checkpoint} was trained on a vocabulary of {vocab} tokens, "
                               f"but codec {codec.codec_id} has {codec.vocab_size}")
        if model.config.vocab_size < codec.vocab_size:  # a larger one is fine: ids above the codec's are never drawn
            raise AstroptError(f"checkpoint {cfg.checkpoint} knows {model.config.vocab_size} tokens, fewer than the "
                               f"{codec.vocab_size} of codec {codec.codec_id}")
        if model.config.block_size < codec.tokens_per_image:
            raise AstroptError(f"checkpoint {cfg.checkpoint} has {model.config.block_size} positions, "
                               f"fewer than the codec's {codec.tokens_per_image} tokens per image")

    if cfg.modality is None and mode != "cross" and len(store.modalities) > 1:  # once all is loaded and agrees
        print(f"note: token store {store.dir} holds {_store_columns(store)}: decoding {modality} "
              "(--modality chooses)", file=sys.stderr)
    metrics: dict | None = None
    stacks: list[np.ndarray] = []  # each [N, decode_bands, 96, 96], one per panel column
    columns: list[str] = []
    per = codec.tokens_per_image
    if mode == "generate":
        # a modality after others in the model's order is sampled in its block: the blocks before it first
        begins = (context or [modality])[0]
        probs = first_token_distribution(store, store.modality_vocab.get(begins, codec.vocab_size), modality=begins)
        before = sum(store.modality_tokens.get(m, per) for m in context)  # tokens of the blocks before it (C)
        drawn = generate_tokens(model, cfg.generate, probs, before + per, cfg.temperature, cfg.top_k,
                                cfg.seed, cfg.batch_size, cfg.kv_cache, vocab_limit=codec.vocab_size,
                                progress=cfg.progress)  # [n, C + T]
        final = drawn[:, before:]  # [n, T]: the decoded modality's block
        labels = [f"generated #{i}" for i in range(len(final))]
        columns = ["generated"]
        stacks.append(decode_tokens(codec, final, decode_bands, cfg.batch_size, cfg.tf32, cfg.progress))
    elif mode == "cross":
        rows = rows_with_images(store, rows, [cfg.given, cfg.generate_modality])
        labels = _labels_for(store, rows)
        final, metrics, columns, stacks = _cross(cfg, model, store, codec, rows, decode_bands)
    else:
        # the rows that have the image decoded (and those the model reads before it)
        rows = rows_with_images(store, rows, [*context, modality] if modality else [])
        stored = store.take(rows, modality).astype(np.int64)  # [N, T]
        check_token_range(stored, codec.vocab_size, what=f"store {store.dir}")
        given = None  # [N, C*T]: the stored blocks the model reads before the decoded one
        if context:
            given = np.concatenate([store.take(rows, m).astype(np.int64) for m in context], axis=1)
            for m in context:  # each block against its own vocabulary (a scalar's or a spectrum's may differ)
                check_token_range(store.take(rows, m), store.modality_vocab.get(m, codec.vocab_size),
                                  what=f"store {store.dir} ({m})")
        labels = _labels_for(store, rows)
        original = None
        if cfg.compare:
            original = _read_originals(store, rows, decode_bands, 96, cfg.source, column=modality)
        elif mode in ("complete", "predict") and _source_rereadable(store.manifest):
            try:  # a nicety beside predictions: shown when the source can still be read
                original = _read_originals(store, rows, decode_bands, 96, cfg.source, column=modality)
            except AstroptError as exc:
                print(f"note: no original panels: {exc}", file=sys.stderr)
        if original is not None:
            stacks.append(original)
            columns.append("original")
        recon = decode_tokens(codec, stored, decode_bands, cfg.batch_size, cfg.tf32, cfg.progress)
        stacks.append(recon)
        columns.append("codec reconstruction")
        final = stored
        if cfg.compare:
            metrics = {"reconstruction": reconstruction_metrics(original, recon, decode_bands)}
        if mode == "predict":
            final, stats = predict_tokens(model, stored, cfg.batch_size, vocab_limit=codec.vocab_size, context=given)
            metrics = {**(metrics or {}), "prediction": stats}
            columns.append("prediction")
            stacks.append(decode_tokens(codec, final, decode_bands, cfg.batch_size, cfg.tf32, cfg.progress))
        elif mode == "complete":
            final = complete_tokens(model, stored, cfg.complete_from, cfg.temperature, cfg.top_k, cfg.seed,
                                    cfg.batch_size, cfg.kv_cache, vocab_limit=codec.vocab_size,
                                    progress=cfg.progress, context=given)
            k = cfg.complete_from
            agree = float((final[:, k:] == stored[:, k:]).mean())
            metrics = {**(metrics or {}), "completion": {"kept": k, "token_agreement": agree}}
            columns.append(f"completion from {k}")
            stacks.append(decode_tokens(codec, final, decode_bands, cfg.batch_size, cfg.tf32, cfg.progress))

    title = cfg.title or _default_title(mode, codec.codec_id, cfg)
    out = None
    if picture_path(cfg) is not None:
        out = save_figure(stacks, columns, labels, decode_bands, picture_path(cfg), title, notes=figure_notes(metrics),
                          rgb_bands=rgb_wanted, ncols=cfg.ncols)

    final_flux = stacks[-1][:, : len(flux_bands)]
    flux_path = save_flux(cfg.save_flux, final_flux, flux_bands, labels) if cfg.save_flux else None
    return DecodeResult(mode=mode, out=out, tokens=np.asarray(final, dtype=np.int64), flux=final_flux,
                        bands=flux_bands, labels=labels, codec_id=codec.codec_id, rows=rows, metrics=metrics,
                        flux_path=flux_path, columns=columns, rgb_bands=list(rgb_wanted), modality=modality)


def _decode_scalar(cfg: DecodeConfig, plan: _Plan, model, ckpt: dict, device: str) -> DecodeResult:
    """A scalar column per galaxy: the true number (from the source), the codec's value of the stored token (the
    best any token can do) and, with a model (--given A --generate-modality Z), its median and 68% interval from
    its probabilities over the codes given the row's stored blocks before Z (never one sample), scored beside a
    model-free baseline on the same rows: the median of the training rows' stored values."""
    from astropt_train.use import scalars as sc

    ck_store = ckpt.get("store") or {}

    store, modality = plan.store, plan.modality
    codec = sc.store_codec(store, modality, cfg.codec, device, cfg.accept_codec_change)
    redshift = sc.is_redshift(modality, store.modality_aion.get(modality))
    values = sc.scalar_values(codec)  # [V]
    rows, probs = plan.rows, None
    if model is not None:
        context, order = sc.scalar_order(model, modality, cfg.given, bool(ck_store.get("shuffle_modalities")))
        want = store.modality_vocab[modality]
        have = model.vocabs[model.names.index(modality)] if hasattr(model, "vocabs") else model.config.vocab_size
        if have != want:
            raise AstroptError(f"checkpoint {cfg.checkpoint} predicts {modality} among {have} codes, but column "
                               f"{modality} of token store {store.dir} holds tokens of {want}")
        rows = rows_with_images(store, rows, context)  # the blocks it reads must be real
        if context != [cfg.given]:
            print(f"note: the model reads {', '.join(context)} before {modality}: it is given each row's stored "
                  "tokens of them", file=sys.stderr)
        given = np.concatenate([store.take(rows, m).astype(np.int64) for m in context], axis=1)  # [N, K]
        for m in context:
            check_token_range(store.take(rows, m), store.modality_vocab[m], what=f"store {store.dir} ({m})")
        probs = sc.predict_probs(model, given, modality, order, cfg.batch_size)  # [N, V]
    labels = _labels_for(store, rows)
    codec_value = sc.codec_values_of(store, rows, modality, values)  # [N], NaN where the row lacks it
    true = None
    try:
        true = sc.source_truth(store, rows, modality, cfg.source)
    except AstroptError as exc:
        if cfg.compare:
            raise
        print(f"note: no true {modality}: {exc}", file=sys.stderr)
    median = lo = hi = None
    if probs is not None:
        median, lo, hi = sc.scalar_distribution(probs, values)
    table = []
    for k, (label, r) in enumerate(zip(labels, rows)):
        entry = {"id": label, "row": int(r), "true": None if true is None else _number(true[k]),
                 "codec": _number(codec_value[k])}
        if median is not None:
            entry.update(median=float(median[k]), lo16=float(lo[k]), hi84=float(hi[k]))
        table.append(entry)
    metrics: dict = {"redshift": redshift, "scores": "photo-z: dz = (pred - true) / (1 + true), NMAD, |dz| > 0.15 "
                     "outliers, bias = median dz" if redshift else "residual pred - true: NMAD, bias = median"}
    legend = {}
    if true is not None:
        for key, pred in (("codec", codec_value), ("model", median)):
            if pred is None:
                continue
            ok = np.isfinite(true) & np.isfinite(pred)
            metrics[key] = sc.scores(pred[ok], true[ok], redshift)
            metrics[key]["left_out"] = int((~ok).sum())  # null truth, or no stored token (--keep-partial)
            legend[key] = sc.score_text(metrics[key])
            if key == "model":  # the model-free baseline on the same rows: one number for every galaxy
                train, which = sc.training_rows(store, ckpt)
                known = sc.codec_values_of(store, train, modality, values)
                known = known[np.isfinite(known)]
                if len(known):
                    base = float(np.median(known))
                    metrics["training_median"] = {"value": base, "training_rows": int(len(known)), "of": which,
                                                  **sc.scores(np.full(int(ok.sum()), base), true[ok], redshift),
                                                  "left_out": int((~ok).sum())}
                    legend["baseline"] = sc.score_text(metrics["training_median"])
    out = None
    if picture_path(cfg) is not None:
        what = f"{modality} predicted from {', '.join(context)}" if model is not None else f"stored {modality}"
        name = "/".join(Path(codec.codec_id).parts[-2:]) if Path(codec.codec_id).exists() else codec.codec_id
        title = cfg.title or f"{what} | codec {name} ({codec.aion_modality}, {codec.vocab_size} codes)"
        out = sc.write_scalar_figure(modality, true, codec_value, median, lo, hi, picture_path(cfg), title, legend)
    mode = "scalar" if model is not None else "stored"
    return DecodeResult(mode=mode, out=out, tokens=np.asarray(store.take(rows, modality), dtype=np.int64),
                        flux=np.zeros((len(rows), 0), np.float32), bands=[], labels=labels, codec_id=codec.codec_id,
                        rows=rows, metrics=metrics, modality=modality, kind="scalar", table=table,
                        columns=["true", "codec"] + (["median", "lo16", "hi84"] if median is not None else []))


def _number(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def _check_model_has(cfg: DecodeConfig, flag: str, name: str, modalities: list[str] | None) -> None:
    """Cross-survey: `name` is one of the several modalities the checkpoint was trained on."""
    if not modalities or name not in modalities:
        raise AstroptError(f"{flag} {name}: checkpoint {cfg.checkpoint} was trained on "
                           f"{', '.join(modalities or ['one image column'])}")


def _check_cross(cfg: DecodeConfig, model, store, trained_on: dict) -> None:
    """Both modalities are the model's (the store's were checked before it loaded); a note when the model never saw
    them in this order."""
    for flag, name in (("--given", cfg.given), ("--generate-modality", cfg.generate_modality)):
        _check_model_has(cfg, flag, name, model.config.modalities)
    if not trained_on.get("shuffle_modalities") and model.names.index(cfg.given) > model.names.index(cfg.generate_modality):
        print(f"note: this model was trained with {cfg.generate_modality} before {cfg.given} and without "
              "--shuffle-modalities: it has not learned to draw it from what follows", file=sys.stderr)


def _check_model_modality(cfg: DecodeConfig, model, store, modality: str | None, trained_on: dict) -> None:
    """The decoded modality is one the model reads; a note when the model reads other blocks before it.

    A several-modality model learned each block in its place in the sequence (`model.names` order): a block
    after others is predicted, completed and sampled there, after the row's stored tokens of those others (or,
    for --generate, after sampling them), never alone at positions 0..T-1, which it learned for its first block
    only (without --shuffle-modalities it saw no other order)."""
    if model.config.modalities:
        if modality not in model.names:
            raise AstroptError(f"--modality {modality}: checkpoint {cfg.checkpoint} was trained on "
                               f"{', '.join(model.names)}; choose one of them")
    else:  # one modality (images_aion): what it read is the store's first (or only) column
        first = (store.modalities or [None])[0]
        if modality != first:
            raise AstroptError(f"--modality {modality}: checkpoint {cfg.checkpoint} models one image column, the "
                               f"store's first ({first}); decode {modality}'s stored tokens without --checkpoint")
    context = _model_context(model, modality)
    if context:
        order = "" if trained_on.get("shuffle_modalities") else \
            " (trained without --shuffle-modalities, it has seen no other order)"
        how = "samples them first" if cfg.generate is not None else "is given each row's stored tokens of them first"
        print(f"note: this model reads {', '.join(context)} before {modality}{order}: it {how}, and writes "
              f"{modality} in its own block", file=sys.stderr)


def _cross(cfg: DecodeConfig, model, store, codec, rows: np.ndarray, decode_bands: list[str]):
    """Cross-survey panels: real image (when the source can be read) | codec reconstruction | drawn from the
    given survey's tokens, with the drawn image's per-band error against the real one and the reconstruction."""
    given = store.take(rows, cfg.given).astype(np.int64)  # [N, T]
    stored = store.take(rows, cfg.generate_modality).astype(np.int64)  # [N, T]
    for what, t in ((cfg.given, given), (cfg.generate_modality, stored)):
        check_token_range(t, codec.vocab_size, what=f"store {store.dir} ({what})")
    stacks, columns, original = [], [], None
    if _source_rereadable(store.manifest):
        try:
            original = _read_originals(store, rows, decode_bands, 96, cfg.source, column=cfg.generate_modality)
            stacks.append(original)
            columns.append(f"real {cfg.generate_modality}")
        except AstroptError as exc:
            print(f"note: no original panels: {exc}", file=sys.stderr)
    recon = decode_tokens(codec, stored, decode_bands, cfg.batch_size, cfg.tf32)
    stacks.append(recon)
    columns.append("codec reconstruction")
    drawn_tokens = cross_survey_tokens(model, given, cfg.given, cfg.generate_modality, cfg.temperature, cfg.top_k,
                                       cfg.seed, cfg.batch_size, cfg.kv_cache)
    drawn = decode_tokens(codec, drawn_tokens, decode_bands, cfg.batch_size, cfg.tf32)
    stacks.append(drawn)
    columns.append(f"drawn from {cfg.given}")
    cross = {"given": cfg.given, "generated": cfg.generate_modality,
             "token_agreement": float((drawn_tokens == stored).mean()),
             "vs_reconstruction": reconstruction_metrics(recon, drawn, decode_bands)}
    if original is not None:
        cross["vs_original"] = reconstruction_metrics(original, drawn, decode_bands)
        # the ceiling: the codec's own reconstruction of the real image (what perfect tokens would score)
        cross["reconstruction_vs_original"] = reconstruction_metrics(original, recon, decode_bands)
    return drawn_tokens, {"cross": cross}, columns, stacks


def picture_path(cfg: DecodeConfig) -> Path | None:
    """Where the PNG goes: --out, else decoded.png, except that --save-flux alone writes no picture."""
    if cfg.out is not None:
        return Path(cfg.out)
    return None if cfg.save_flux is not None else Path("decoded.png")


def _check_options(cfg: DecodeConfig) -> None:
    """Refuse bad output names and sampling settings before any work is done."""
    if cfg.out is not None and Path(cfg.out).suffix.lower() != ".png":
        raise AstroptError(f"--out must be a .png file, got {cfg.out}")
    if cfg.save_flux is not None and Path(cfg.save_flux).suffix.lower() not in (".npy", ".fits", ".fit"):
        raise AstroptError(f"--save-flux must end in .npy or .fits, got {Path(cfg.save_flux).name}")
    # a file output never lands on a folder, nor among an artifact's own files (RUN/config.json, a store's shards)
    from astropt_tok.artifacts import check_file_output

    if picture_path(cfg) is not None:
        check_file_output(picture_path(cfg), "--out", cfg.inside)
    if cfg.save_flux is not None:
        check_file_output(cfg.save_flux, "--save-flux", cfg.inside)
    if not math.isfinite(cfg.temperature) or cfg.temperature < 0:
        raise AstroptError(f"--temperature must be a finite number >= 0 (0: greedy), got {cfg.temperature}")
    for flag, value, least in (("--seed", cfg.seed, 0), ("--generate", cfg.generate, 1), ("--random", cfg.random, 1),
                               ("--complete-from", cfg.complete_from, 1), ("--step", cfg.step, 0)):
        if value is not None and value < least:
            raise AstroptError(f"{flag} must be at least {least}, got {value}")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise AstroptError(f"--top-k must be at least 1, got {cfg.top_k}")
    if cfg.batch_size < 1:
        raise AstroptError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.threads is not None and cfg.threads < 1:
        raise AstroptError(f"--threads must be at least 1, got {cfg.threads}")
    from astropt_tok.codec import aion_bands
    from astropt_tok.executor import check_device_name

    check_device_name(cfg.device)

    known = aion_bands()
    for flag, bands in (("--bands", cfg.bands or []), ("--rgb", cfg.rgb_bands or [])):
        for b in bands:
            if b not in known:
                raise AstroptError(f"{flag}: unknown band {b!r}; the AION image codec knows {', '.join(known)}")
    if cfg.rgb_bands is not None and len(cfg.rgb_bands) != 3:
        raise AstroptError(f"--rgb needs 3 bands (red, green, blue), got {','.join(cfg.rgb_bands) or 'none'}")
    if cfg.save_flux is not None and Path(cfg.save_flux).suffix.lower() in (".fits", ".fit"):
        import importlib.util

        if importlib.util.find_spec("astropy") is None:
            raise AstroptError(f"--save-flux {Path(cfg.save_flux).name} needs astropy to write FITS: pip install "
                               "astropy (or pip install 'astropt-tokens[fits]'), or write a .npy file")


def _default_title(mode: str, codec_id: str, cfg: DecodeConfig) -> str:
    p = Path(codec_id)
    name = "/".join(p.parts[-2:]) if p.exists() else codec_id  # a folder: its last two parts are enough
    what = {"stored": "stored rows" + (" beside their originals" if cfg.compare else ""),
            "predict": "teacher-forced argmax prediction of each token from the stored ones before it",
            "complete": f"completion: the first {cfg.complete_from} stored tokens kept, the model samples the rest "
                        f"({sampling_words(cfg)})",
            "generate": f"generated ({sampling_words(cfg)})",
            "cross": f"{cfg.generate_modality} drawn from the {cfg.given} tokens ({sampling_words(cfg)})",
            }[mode]
    return f"{what} | codec {name}"


def sampling_words(cfg: DecodeConfig) -> str:
    """How a sampled picture was drawn: "T=1.0, top-k=100, seed=0"."""
    return f"T={cfg.temperature}, top-k={cfg.top_k}, seed={cfg.seed}"


ONE_DRAW = ("one draw of these rows; `astropt eval` scores the model over all held-out rows and several seeds, "
            "beside model-free baselines")


def figure_notes(metrics: dict | None) -> list[str]:
    """The scores drawn under a figure: per band, the codec against the all-zero and image-mean baselines; a
    sampled panel's scores are marked as one draw (`astropt eval` gives the spread and the baselines)."""
    from astropt_tok.report import colour_line

    metrics = metrics or {}
    notes = []
    rec = metrics.get("reconstruction")
    if rec:
        notes.append("codec reconstruction vs original, per band: explained variance (all-zero / image-mean "
                     "baselines), PSNR dB (baselines)")
        for b, m in rec["per_band"].items():
            z, im = rec["baselines"]["zero"][b], rec["baselines"]["image_mean"][b]
            notes.append(f"{b}: EV {m['explained_variance']:.3f} ({z['explained_variance']:.3f} / "
                         f"{im['explained_variance']:.3f}), PSNR {m['psnr']:.1f} ({z['psnr']:.1f} / {im['psnr']:.1f}), "
                         f"MSE {m['mse']:.3g}")
        if rec.get("colours"):
            notes.append(colour_line("colour RMS error, mag (codec / one colour for all)", rec["colours"]))
    cross = metrics.get("cross")
    if cross or "completion" in metrics:
        notes.append(ONE_DRAW)
    for key, what in (("vs_original", "drawn vs the real image"),
                      ("reconstruction_vs_original", "codec reconstruction vs the real image (the ceiling)"),
                      ("vs_reconstruction", "drawn vs the codec reconstruction")):
        if cross and key in cross:
            notes.append(f"{cross['generated']} {what}, per band: explained variance, PSNR dB")
            notes.append("  ".join(f"{b}: {m['explained_variance']:.2f}, {m['psnr']:.1f}"
                                   for b, m in cross[key]["per_band"].items()))
            if key != "vs_reconstruction" and cross[key].get("colours"):
                notes.append(colour_line("  colour RMS error, mag (this / one colour for all)", cross[key]["colours"]))
    if "prediction" in metrics:
        notes.append(f"teacher-forced next-token accuracy {metrics['prediction']['accuracy']:.3f} on these rows "
                     "(`astropt eval`: beside the per-position most-frequent-token baseline)")
    if "completion" in metrics:
        c = metrics["completion"]
        notes.append(f"completion kept {c['kept']} tokens; {100 * c['token_agreement']:.1f}% of written tokens "
                     "equal the stored ones")
    return notes


def summarise(result: DecodeResult) -> dict[str, Any]:
    """A JSON-friendly summary of a decode result."""
    s: dict[str, Any] = {"mode": result.mode, "out": None if result.out is None else str(result.out),
                         "images": len(result.labels),
                         "codec": result.codec_id, "bands": result.bands, "columns": result.columns,
                         "rgb": result.rgb_bands, "modality": result.modality}
    if result.flux_path:
        s["flux"] = str(result.flux_path)
    if result.kind != "image":
        s["kind"] = result.kind
        s["rows"] = result.table  # per galaxy
    if result.metrics:
        m = dict(result.metrics)
        if "reconstruction" in m:
            m["reconstruction"] = summary_json(m["reconstruction"])
        if "cross" in m:
            m["cross"] = {k: summary_json(v) if isinstance(v, dict) and "per_band" in v else v
                          for k, v in m["cross"].items()}
        s["metrics"] = m
    return s
