"""Catalogue numbers (redshift, fluxes...) a model predicts from the blocks before them, and how good that is.

A scalar modality is one token per galaxy from a scalar codec's vocabulary of V codes; code k decodes to the
number `values[k]` (`scalar_values`, non-decreasing in k for every AION scalar codec). The model's prediction is
its whole distribution over the V codes; it is summarised by quantiles, never by one sample:

  scalar_distribution   (median, 16th, 84th percentile) of [B, V] probabilities: for quantile q, the value of
                        the FIRST code whose cumulative probability reaches q (no interpolation between codes,
                        so every prediction is a number the codec can hold)
  photoz_scores         redshift scores of dz = (pred - true) / (1 + true): NMAD, outlier fraction
                        (|dz| > 0.15), bias = median(dz) (the median, not the mean: robust to outliers)
  residual_scores       any other number, in its own units: NMAD and median of pred - true
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from astropt_tok.errors import AstroptError

OUTLIER_DZ = 0.15  # |dz| above this is a catastrophic photo-z outlier (the usual convention)
QUANTILES = (0.5, 0.16, 0.84)  # median and the 68% interval


def scalar_values(loaded_codec) -> np.ndarray:
    """The number each code of a scalar codec decodes to: float64 [V] (`codec.decode(arange(V))`)."""
    import torch

    V = int(loaded_codec.vocab_size)
    with torch.inference_mode():
        values = loaded_codec.codec.decode(torch.arange(V, device=_device(loaded_codec.codec)))
    values = values.value.double().cpu().numpy().reshape(V)
    if not np.isfinite(values).all() or (np.diff(values) < 0).any():
        raise AstroptError(f"scalar codec {loaded_codec.codec_id} ({loaded_codec.aion_modality}) does not decode its "
                           "codes to finite non-decreasing numbers: its weights are damaged")
    return values


def _device(module):
    p = next(iter(list(module.parameters()) + list(module.buffers())), None)
    return "cpu" if p is None else p.device


def quantile_codes(probs: np.ndarray, q: float) -> np.ndarray:
    """[B, V] probabilities -> [B] int64: the first code whose cumulative probability reaches q (each row is
    normalised first, in float64; a cumulative sum short of q by rounding alone, < 1e-9, counts as reaching it)."""
    p = np.asarray(probs, dtype=np.float64)
    cdf = np.cumsum(p, axis=1)
    cdf /= cdf[:, -1:]
    return np.minimum((cdf < q - 1e-9).sum(axis=1), p.shape[1] - 1).astype(np.int64)


def scalar_distribution(probs: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(median, lo16, hi84), each float64 [B], of the numbers that [B, V] code probabilities give: the value of
    the first code whose cumulative probability reaches 0.5, 0.16 and 0.84."""
    probs = np.asarray(probs)
    values = np.asarray(values, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(values):
        raise AstroptError(f"probabilities {list(probs.shape)} do not match a codec of {len(values)} codes")
    if not (np.isfinite(probs).all() and (probs >= 0).all() and (probs.sum(axis=1) > 0).all()):
        raise AstroptError("the model's probabilities are not finite non-negative numbers: its weights are damaged")
    median, lo, hi = (values[quantile_codes(probs, q)] for q in QUANTILES)
    return median, lo, hi


def photoz_scores(pred: np.ndarray, true: np.ndarray) -> dict:
    """{"nmad", "outlier_frac", "bias", "n"} of dz = (pred - true) / (1 + true): NMAD = 1.4826 median(|dz -
    median(dz)|), outliers |dz| > 0.15, bias = median(dz); None for each score when n is 0."""
    from astropt_train.use.probe import nmad

    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if not len(pred):
        return {"nmad": None, "outlier_frac": None, "bias": None, "n": 0}
    dz = (pred - true) / (1.0 + true)
    return {"nmad": nmad(pred, true, redshift=True), "outlier_frac": float(np.mean(np.abs(dz) > OUTLIER_DZ)),
            "bias": float(np.median(dz)), "n": int(len(pred))}


def residual_scores(pred: np.ndarray, true: np.ndarray) -> dict:
    """{"nmad", "bias", "n"} of the residual pred - true in the column's own units: NMAD = 1.4826 median(|r -
    median(r)|), bias = median(r); None for each score when n is 0."""
    from astropt_train.use.probe import nmad

    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if not len(pred):
        return {"nmad": None, "bias": None, "n": 0}
    return {"nmad": nmad(pred, true, redshift=False), "bias": float(np.median(pred - true)), "n": int(len(pred))}


def is_redshift(name: str, aion_modality: str | None) -> bool:
    """Whether a scalar column is a redshift (scored by dz / (1 + z)): its AION modality is Z, or, when no codec
    names it, its name reads like one (`probe.is_redshift_like`; a column FLUX_Z of a flux codec is not)."""
    from astropt_train.use.probe import is_redshift_like

    return aion_modality == "Z" if aion_modality else is_redshift_like(name)


def scores(pred: np.ndarray, true: np.ndarray, redshift: bool) -> dict:
    """photoz_scores for a redshift, residual_scores for any other number."""
    return photoz_scores(pred, true) if redshift else residual_scores(pred, true)


# ---------------------------------------------------------------------------------------------------------
# the codec of a store column, the truth and the model's distribution


def store_codec(store, modality: str, codec_id: str | None = None, device: str = "cpu",
                accept_change: bool = False):
    """The codec that made store column `modality` (a scalar or spectrum), loaded from --codec or the store's
    codec snapshot; its weights must be those the manifest records for that column (else AstroptError, or a
    note printed with `accept_change`)."""
    import sys

    from astropt_tok.artifacts import check_store_codec
    from astropt_tok.codec import load_codec

    aion = store.modality_aion.get(modality)
    if not aion:
        raise AstroptError(f"column {modality} of token store {store.dir} records no AION modality: it was not made "
                           "by `astropt tokenise --scalar/--spectrum`")
    codec = load_codec(str(codec_id or store.codec_id), aion, device=device)
    entry = next(e for e in store.manifest["modalities"] if e["name"] == modality)
    recorded = {"id": store.codec_id, "weights_sha256": (entry.get("codec") or {}).get("weights_sha256")}
    for note in check_store_codec(f"column {modality} of token store {store.dir}", recorded, codec, accept_change):
        print(note, file=sys.stderr)
    if codec.vocab_size != store.modality_vocab[modality]:
        raise AstroptError(f"codec {codec.codec_id} has {codec.vocab_size} codes for {aion}, but column {modality} of "
                           f"token store {store.dir} holds tokens of {store.modality_vocab[modality]}")
    return codec


def source_truth(store, rows: np.ndarray, modality: str, moved_to=None) -> np.ndarray:
    """The source's numbers of scalar column `modality` at store `rows`: float64 [n], NaN where null."""
    from astropt_tok.source import read_source_values

    source = store.manifest.get("source") or {}
    if source.get("kind") not in ("local", "hub") or not source.get("files"):
        raise AstroptError(f"token store {store.dir} was not made from a survey (its source is {source.get('id')!r}): "
                           f"the true {modality} cannot be read")
    return read_source_values(source, store.source_rows(rows), modality, moved_to)


def codec_values_of(store, rows: np.ndarray, modality: str, values: np.ndarray) -> np.ndarray:
    """The codec's number for each stored token of scalar `modality` at `rows` (float64 [n]; NaN where the row
    lacks it, --keep-partial): the best any prediction of tokens can do (the codec's quantisation ceiling)."""
    tokens = np.asarray(store.take(rows, modality), dtype=np.int64)[:, 0]  # [n]
    from astropt_train.use.decode import check_token_range

    check_token_range(tokens[:, None], len(values), what=f"store {store.dir} ({modality})")
    out = values[tokens]
    if store.partial:
        out = np.where(store.valid(rows)[modality], out, np.nan)
    return out


def training_rows(store, ckpt: dict) -> tuple[np.ndarray, str]:
    """The store rows a model-free baseline may learn from: the run's training rows (its checkpoint config's split
    rule) when `store` is the store the checkpoint (`load_any_model`'s info) trained on, else every row of
    `store`; and how to say which."""
    from astropt_tok.store import manifest_sha256
    from astropt_train.checkpoint import is_checkpoint, read_config
    from astropt_train.data import split_rows

    split = read_config(ckpt["path"]).get("split") or {} if is_checkpoint(Path(ckpt["path"])) else {}
    trained_on = (ckpt.get("store") or {}).get("manifest_sha256")
    if split and trained_on == manifest_sha256(store.dir) and int(split.get("num_rows", -1)) == store.num_rows:
        return (split_rows(store.num_rows, float(split["val_fraction"]), int(split["seed"])).train,
                "the run's training rows")
    return np.arange(store.num_rows), "every row of the store (not the one the model trained on)"


def scalar_order(model, modality: str, given: str | None, shuffled: bool) -> tuple[list[str], list[int] | None]:
    """(the modalities whose stored tokens the model reads before scalar `modality`, the block order to give it
    or None for its own). A model trained with --shuffle-modalities reads `given` alone first (or, given None, the
    blocks before `modality` in its order, else every other block); one trained without reads what precedes
    `modality` in its order, which must include `given`."""
    names = list(model.names)
    if modality not in names:
        raise AstroptError(f"the model was trained on {', '.join(names)}, not {modality}")
    before = names[: names.index(modality)]
    if given is not None and given not in names:
        raise AstroptError(f"--given {given}: the model was trained on {', '.join(names)}")
    if shuffled:
        context = [given] if given is not None else (before or [n for n in names if n != modality])
        rest = [n for n in names if n not in context and n != modality]
        order = [names.index(n) for n in [*context, modality, *rest]]
        return context, (None if order == list(range(len(names))) else order)
    if not before:
        raise AstroptError(f"{modality} begins the model's sequence ({', '.join(names)}) and it was trained without "
                           f"--shuffle-modalities: nothing precedes it, so it cannot predict {modality} from the "
                           "other blocks")
    if given is not None and given not in before:
        raise AstroptError(f"--given {given}: the model reads {given} after {modality} ({', '.join(names)}; trained "
                           f"without --shuffle-modalities), so it cannot predict {modality} from it")
    return before, None


def predict_probs(model, context: np.ndarray, modality: str, order: list[int] | None = None,
                  batch_size: int = 32) -> np.ndarray:
    """The model's probabilities [N, V] of the first (for a scalar: the only) token of `modality` given each row's
    stored blocks before it, `context` [N, K] int64 (`model.next_token_logits`); float64, rows sum to 1."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, len(context), batch_size):
            prefix = torch.as_tensor(np.ascontiguousarray(context[i : i + batch_size], dtype=np.int64), device=device)
            blocks = None if order is None else torch.tensor(order, device=device).expand(len(prefix), len(order))
            logits = model.next_token_logits(prefix, modality, order=blocks).double()  # [b, V]
            if not bool(torch.isfinite(logits).all()):
                raise AstroptError(f"the model's logits for {modality} are not finite (NaN or infinite) for rows "
                                   f"{i}..{i + len(prefix) - 1}: its weights are damaged or its activations "
                                   "overflowed")
            out.append(torch.softmax(logits, dim=-1).cpu().numpy())
    V = model.vocabs[model.names.index(modality)]
    return np.concatenate(out) if out else np.zeros((0, V))


# ---------------------------------------------------------------------------------------------------------
# the picture


def write_scalar_figure(name: str, true: np.ndarray | None, codec: np.ndarray, median: np.ndarray | None,
                        lo: np.ndarray | None, hi: np.ndarray | None, path, title: str,
                        legend: dict[str, str] | None = None):
    """Predicted `name` (median, 68% bar) and the codec's value of the stored token against the truth (or, with
    no truth, against the codec's value), the diagonal drawn; `legend`: {series: its scores} in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from astropt_train.metrics import write_png

    legend = legend or {}
    x = true if true is not None else codec
    xlabel = f"true {name} (source)" if true is not None else f"{name}: codec value of the stored token"
    fig, ax = plt.subplots(figsize=(5.6, 5.2), dpi=100)
    shown = [v for v in (x, codec, median, lo, hi) if v is not None]
    finite = np.concatenate([v[np.isfinite(v)] for v in shown]) if shown else np.zeros(0)
    if len(finite):
        a, b = float(finite.min()), float(finite.max())
        pad = 0.05 * (b - a or 1.0)
        ax.plot([a - pad, b + pad], [a - pad, b + pad], color="k", lw=0.8, label="y = x")
    if true is not None:
        ax.scatter(x, codec, s=10, color="C1", marker="x", label="codec value of the stored token"
                   + (f" ({legend['codec']})" if legend.get("codec") else ""))
    if median is not None:
        ax.errorbar(x, median, yerr=[median - lo, hi - median], fmt="o", ms=3, color="C0", elinewidth=0.8,
                    label="model: median, 68% interval" + (f" ({legend['model']})" if legend.get("model") else ""))
    if legend.get("baseline"):
        ax.plot([], [], " ", label=f"training median: {legend['baseline']}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{name}")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return write_png(fig, path)


def score_text(s: dict) -> str:
    """"NMAD 0.031, outliers 2.0%, bias -0.004 (n=40)" (photo-z) or "NMAD 0.12, bias 0.01 (n=40)"."""
    if not s.get("n"):
        return "no rows"
    parts = [f"NMAD {s['nmad']:.3g}"]
    if "outlier_frac" in s:
        parts.append(f"outliers {100 * s['outlier_frac']:.1f}%")
    parts.append(f"bias {s['bias']:.3g}")
    return ", ".join(parts) + f" (n={s['n']})"
