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


def _nmad(x: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


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
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if not len(pred):
        return {"nmad": None, "bias": None, "n": 0}
    r = pred - true
    return {"nmad": _nmad(r), "bias": float(np.median(r)), "n": int(len(pred))}


def is_redshift(name: str, aion_modality: str | None) -> bool:
    """Whether a scalar column is a redshift (scored by dz / (1 + z)): its AION modality is Z, or, when no codec
    names it, its name reads like one (`probe.is_redshift_like`; a column FLUX_Z of a flux codec is not)."""
    from astropt_train.use.probe import is_redshift_like

    return aion_modality == "Z" if aion_modality else is_redshift_like(name)


def scores(pred: np.ndarray, true: np.ndarray, redshift: bool) -> dict:
    """photoz_scores for a redshift, residual_scores for any other number."""
    return photoz_scores(pred, true) if redshift else residual_scores(pred, true)
