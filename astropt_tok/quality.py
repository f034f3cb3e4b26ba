"""How well a reconstruction matches its original, per band, beside two baselines that know nothing.

Flux is [N, bands, H, W] in survey units. Per band, over N galaxies:

  mse                 mean over galaxies of mean((orig - recon)^2) over the pixels
  explained_variance  1 - sum((recon - orig)^2) / sum((orig - that galaxy's mean in that band)^2), both sums
                      pooled over galaxies and pixels: 1 is perfect, 0 is no better than each image's own mean
  psnr                mean over galaxies of 10 log10(range^2 / MSE), range = max - min of that original

The baselines are scored on the same rows: `zero` (an all-zero reconstruction) and `image_mean` (each image
replaced by its own mean, per band; explained variance 0 by construction). A codec that does not beat them
has learned nothing.

Colour, per pair of neighbouring bands (`colour_scores`): a galaxy's colour is -2.5 log10 of the ratio of its
flux in the two bands, summed in a central aperture of radius APERTURE_RADIUS pixels, over the galaxies whose
aperture flux is positive in every band of original and reconstruction. `rms_mag` is the RMS of
(reconstructed - original colour); `baseline_rms_mag` is the RMS of (the median colour of those galaxies -
original colour): what a reconstruction that gives every galaxy the same colour scores. Per-band scores can
be high while colour is lost (brightness and shape carry most of each band's variance); this shows it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

METRICS = ("mse", "explained_variance", "psnr")
APERTURE_RADIUS = 12  # pixels (the 96x96 crop's central galaxy; 0.262"/px: about 3")


def center_crop(flux: np.ndarray, size: int) -> np.ndarray:
    """AION's CenterCrop on [..., H, W]: start = (H - size) // 2 (the same pixels the codec encodes)."""
    h, w = flux.shape[-2:]
    y0, x0 = (h - size) // 2, (w - size) // 2
    return flux[..., y0 : y0 + size, x0 : x0 + size]


def band_scores(original: np.ndarray, recon: np.ndarray) -> dict:
    """Per-image and per-band figures of one reconstruction: {"mse" [N, B], "psnr" [N, B], "explained_variance" [B]}."""
    orig = np.asarray(original, dtype=np.float64)
    rec = np.asarray(recon, dtype=np.float64)
    sq_err = (orig - rec) ** 2  # [N, B, H, W]
    mse = sq_err.mean(axis=(-2, -1))  # [N, B]
    spread = orig - orig.mean(axis=(-2, -1), keepdims=True)  # each galaxy about its own mean
    total = (spread**2).sum(axis=(0, 2, 3))  # [B]
    ev = 1.0 - sq_err.sum(axis=(0, 2, 3)) / np.maximum(total, 1e-300)  # [B]
    rng = orig.max(axis=(-2, -1)) - orig.min(axis=(-2, -1))  # [N, B]
    with np.errstate(divide="ignore"):
        psnr = np.where(mse > 0, 10.0 * np.log10(np.maximum(rng, 1e-300) ** 2 / np.where(mse > 0, mse, 1.0)), np.inf)
    return {"mse": mse, "psnr": psnr, "explained_variance": ev}


def _per_band(scores: dict, bands: Sequence[str]) -> dict:
    return {b: {"mse": float(scores["mse"][:, i].mean()), "explained_variance": float(scores["explained_variance"][i]),
                "psnr": float(scores["psnr"][:, i].mean())} for i, b in enumerate(bands)}


def aperture_flux(flux: np.ndarray, radius: float = APERTURE_RADIUS) -> np.ndarray:
    """Flux [N, B, H, W] summed within `radius` pixels of the image centre: [N, B] float64."""
    h, w = flux.shape[-2:]
    y, x = np.mgrid[:h, :w]
    inside = (y - (h - 1) / 2) ** 2 + (x - (w - 1) / 2) ** 2 <= radius**2  # [H, W]
    return np.asarray(flux, dtype=np.float64)[..., inside].sum(axis=-1)


def colour_scores(original: np.ndarray, recon: np.ndarray, bands: Sequence[str]) -> dict:
    """{"g-r": {"rms_mag", "baseline_rms_mag", "galaxies"}, ...} for each pair of neighbouring bands (module doc);
    None for the figures where no galaxy has positive aperture flux in every band (JSON null)."""
    orig_flux, rec_flux = aperture_flux(original), aperture_flux(recon)  # [N, B]
    usable = (orig_flux > 0).all(axis=1) & (rec_flux > 0).all(axis=1)  # [N]
    out = {}
    for i in range(len(bands) - 1):
        name = f"{bands[i].split('-')[-1].lower()}-{bands[i + 1].split('-')[-1].lower()}"
        if not usable.any():
            out[name] = {"rms_mag": None, "baseline_rms_mag": None, "galaxies": 0}
            continue
        o, r = orig_flux[usable], rec_flux[usable]
        true_colour = -2.5 * np.log10(o[:, i] / o[:, i + 1])  # [n]
        rec_colour = -2.5 * np.log10(r[:, i] / r[:, i + 1])
        out[name] = {"rms_mag": float(np.sqrt(np.mean((rec_colour - true_colour) ** 2))),
                     "baseline_rms_mag": float(np.sqrt(np.mean((np.median(true_colour) - true_colour) ** 2))),
                     "galaxies": int(usable.sum())}
    return out


def reconstruction_metrics(original: np.ndarray, recon: np.ndarray, bands: Sequence[str]) -> dict:
    """Per-band MSE, explained variance and PSNR of `recon` against the original's centre crop, with baselines.

    original: [N, B, H, W] (H >= recon's size; centre-cropped as the codec does); recon: [N, B, S, S].
    Returns {"bands", "mse" [N, B], "psnr" [N, B], "per_band": {band: {mse, explained_variance, psnr}},
    "baselines": {"zero": {band: ...}, "image_mean": {band: ...}}}.
    """
    rec = np.asarray(recon, dtype=np.float64)
    orig = center_crop(np.asarray(original, dtype=np.float64), rec.shape[-1])
    if orig.shape != rec.shape:
        raise ValueError(f"original crop {orig.shape} and reconstruction {rec.shape} disagree")
    scores = band_scores(orig, rec)
    zero = band_scores(orig, np.zeros_like(orig))
    image_mean = band_scores(orig, np.broadcast_to(orig.mean(axis=(-2, -1), keepdims=True), orig.shape))
    return {"bands": list(bands), "mse": scores["mse"], "psnr": scores["psnr"], "per_band": _per_band(scores, bands),
            "baselines": {"zero": _per_band(zero, bands), "image_mean": _per_band(image_mean, bands)},
            "colours": colour_scores(orig, rec, bands)}


def metrics_table_rows(per_band: dict, baselines: dict) -> list[tuple[str, ...]]:
    """Printable rows: band, then MSE / explained variance / PSNR for the codec, all-zero and image-mean."""
    rows = []
    for b, m in per_band.items():
        z, im = baselines["zero"][b], baselines["image_mean"][b]
        rows.append((b, f"{m['mse']:.3g}", f"{z['mse']:.3g}", f"{im['mse']:.3g}",
                     f"{m['explained_variance']:.3f}", f"{z['explained_variance']:.3f}", f"{im['explained_variance']:.3f}",
                     f"{m['psnr']:.1f}", f"{z['psnr']:.1f}", f"{im['psnr']:.1f}"))
    return rows


METRICS_TABLE_HEADER = ("band", "MSE", "MSE zero", "MSE mean", "EV", "EV zero", "EV mean", "PSNR", "PSNR zero",
                        "PSNR mean")


def summary_json(metrics: dict) -> dict:
    """The JSON form: per band {mse, explained_variance, psnr}, the same under baselines -> zero, image_mean, and
    the colours of neighbouring bands."""
    return {"per_band": metrics["per_band"], "baselines": metrics["baselines"], "colours": metrics["colours"]}
