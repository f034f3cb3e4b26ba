"""Writing AION's non-image codecs (catalogue scalars, spectra) in the hub layout, as `astropt_tok.codec.load_codec`
reads them.

Scalars (`fit_scalar` / `fit_scalar_codec`): the real aion codec of the modality (aion.codecs.config), its
quantiser filled from one column's finite values, no gradient training:

  GridScalarCodec  (Z)                       buckets = linspace(lo, hi, V): lo = 0 (or below the smallest
                                             value when some are negative), hi = the largest value rounded up
                                             to 1, 1.5, 2, 3, 4, 5, 6 or 8 x 10^k (`grid_range`), so every
                                             fitted value, and a little more, is inside the grid (AION clamps
                                             values beyond it silently; the tokeniser rejects them)
  ScalarCodec      (EBV, HSC magnitudes...)  reservoir = R quantiles of the values (R = reservoir_size, default
  LogScalarCodec   (Legacy Survey fluxes...) the number of values up to 100,000), sorted, in the space the
                                             quantiser bins in (Log: ln(max(v, e^min_log_value)), by the
                                             quantiser's own transform); then aion's `_generate_index_to_val`

Quantiles rather than a random sample: the reservoir is the column's empirical inverse CDF, the same for any
row order and the best R-point summary of it (with R = the number of values, exactly the sorted values).

Each codec is written to `<out>/codecs/<Modality.name>/` (codecs/Z, codecs/FLUX_G, codecs/spectrum) as aion's
`save_pretrained` lays it out: `config.json` (the constructor's arguments) and `model.safetensors`, scalar keys
spelled `quantizer.*` as on the hub. The subfolder is written as a whole under a temporary name and renamed:
a reader sees the old codec or the new one, never one's config with the other's weights.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from astropt_tok.errors import AstroptError

DEFAULT_RESERVOIR_LIMIT = 100_000  # the reservoir's default size: every value, up to this many quantiles

# A tiny real aion SpectrumCodec for tests and the demo (random weights: for plumbing, its pictures mean
# nothing). Two encoder stages: 1 + num_pixels / 8 = 129 tokens a spectrum. latent_channels must equal
# encoder_dims[-1] and embedding_dim the LFQ's dim (10), as aion asserts. resolution 6.4 A a latent pixel
# (aion-base: 0.8 over 8704 pixels) so that its 1024 pixels span 3500-10047 A, DESI's whole range.
TINY_SPECTRUM_CONFIG = {
    "encoder_depths": [1, 1],
    "encoder_dims": [8, 16],
    "decoder_depths": [1, 1],
    "decoder_dims": [8, 1],
    "latent_channels": 16,
    "embedding_dim": 10,
    "lambda_min": 3500.0,
    "resolution": 6.4,
    "num_pixels": 1024,
    "codebook_size": 1024,
    "dim": 10,
}


@dataclass
class ScalarFit:
    """One fitted scalar codec and what it was fitted on."""

    modality: Any  # astropt_tok.codec.AionModality
    codec: Any  # the aion codec (GridScalarCodec, ScalarCodec or LogScalarCodec), eval mode, on the CPU
    config: dict  # its constructor arguments (config.json)
    values: int  # finite values fitted on
    ignored: int  # values left out: NaN or infinite
    low: float  # smallest and largest finite value
    high: float
    column: str | None = None

    def describe(self) -> dict:
        """This fit's entry in fit_report.json."""
        import torch

        codes = self.codec.decode(torch.arange(self.codec.quantizer.codebook_size)).value  # [V] values, monotone
        return {"column": self.column, "aion_modality": self.modality.name, "folder": self.modality.folder,
                "codec_class": type(self.codec).__name__, "config": self.config, "values": self.values,
                "ignored_not_finite": self.ignored, "min": self.low, "max": self.high,
                "codec_range": [float(codes[0]), float(codes[-1])]}


NICE_STEPS = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)  # a grid's end: one of these x a power of ten


def nice_ceiling(x: float) -> float:
    """The smallest of 1, 1.5, 2, 3, 4, 5, 6, 8 x 10^k at or above x > 0 (0.68 -> 0.8, 5.83 -> 6): headroom for
    values a little beyond those fitted on, at most a third of the grid unused."""
    power = 10.0 ** math.floor(math.log10(x))
    return next(step * power for step in NICE_STEPS if step * power >= x)


def grid_range(values: np.ndarray) -> tuple[float, float]:
    """(lo, hi) of a GridScalarCodec's buckets for finite `values`: 0 (or -nice_ceiling(-min) when some are
    negative) to nice_ceiling(max) (0 when none is positive)."""
    lo, hi = float(values.min()), float(values.max())
    return (0.0 if lo >= 0 else -nice_ceiling(-lo)), (nice_ceiling(hi) if hi > 0 else 0.0)


def fit_scalar(values, modality: str, codebook_size: int = 1024, reservoir_size: int | None = None,
               column: str | None = None) -> ScalarFit:
    """Fit the real AION codec of scalar `modality` (an AION class name: Z, LegacySurveyFluxG, ...) to `values`
    (any shape, read as float32; NaN and infinities are ignored), in memory (module doc)."""
    import torch

    from astropt_tok.codec import aion_modality

    mod = aion_modality(modality, kind="scalar")
    what = f"column {column} ({modality})" if column else f"modality {modality}"
    if codebook_size < 2:
        raise AstroptError(f"{what}: a scalar codebook needs at least 2 codes, got {codebook_size}")
    if reservoir_size is not None and reservoir_size < 2:
        raise AstroptError(f"{what}: a reservoir needs at least 2 values, got {reservoir_size}")
    try:
        raw = np.asarray(values, dtype=np.float32).reshape(-1)  # float32: what the tokeniser encodes
    except (TypeError, ValueError):
        raise AstroptError(f"{what} is not numeric (e.g. {np.asarray(values).reshape(-1)[:1].tolist()}); a scalar "
                           "codec is fitted to numbers") from None
    finite = raw[np.isfinite(raw)]
    if len(finite) < 2:
        raise AstroptError(f"{what} has {len(finite)} finite values of {len(raw)}; fitting a scalar codec needs at "
                           "least 2 different ones")
    if finite.min() == finite.max():
        raise AstroptError(f"{what} is constant ({finite[0]:g}) over its {len(finite)} finite values; a scalar codec "
                           "needs values that vary")
    name = mod.cls.name  # the codec's own `modality` argument: aion.modalities.ScalarModalities' key
    cls_name = mod.codec_cls.__name__
    if cls_name == "GridScalarCodec":
        config = {"codebook_size": int(codebook_size), "modality": name}
        lo, hi = grid_range(finite)  # lo < hi: the values vary
        codec = mod.codec_cls(**config)
        codec.quantizer.buckets.copy_(torch.linspace(lo, hi, codebook_size))
    elif cls_name in ("ScalarCodec", "LogScalarCodec"):
        size = int(reservoir_size or min(len(finite), DEFAULT_RESERVOIR_LIMIT))
        config = {"codebook_size": int(codebook_size), "modality": name, "reservoir_size": size}
        if cls_name == "LogScalarCodec":
            config["min_log_value"] = -3  # aion's default, as the hub's codecs carry it
        codec = mod.codec_cls(**config)
        q = codec.quantizer
        binned = torch.as_tensor(finite)
        if cls_name == "LogScalarCodec":
            binned = q._log_and_apply_min(binned)  # ln(max(v, e^min_log_value)): the space it bins in
        binned = binned.double().numpy()
        if binned.min() == binned.max():  # only a log codec's floor can make varying values one
            raise AstroptError(f"{what} is constant at or below the codec's floor e^{config['min_log_value']} over its "
                               f"{len(finite)} finite values (max {finite.max():g}); a scalar codec needs values that vary")
        reservoir = np.quantile(binned, np.linspace(0.0, 1.0, size))  # [R] sorted: the inverse CDF
        q._reservoir.copy_(torch.as_tensor(reservoir, dtype=q._reservoir.dtype))
        q._generate_index_to_val()  # [V] bin edges from the reservoir, as aion builds them
    else:  # aion_modality(kind="scalar") admits only the classes above
        raise AstroptError(f"{what}: aion's {cls_name} is not a scalar codec this tool fits")
    return ScalarFit(modality=mod, codec=codec.eval(), config=config, values=int(len(finite)),
                     ignored=int(len(raw) - len(finite)), low=float(finite.min()), high=float(finite.max()),
                     column=column)


def save_codec(codec, config: dict, out_dir: str | os.PathLike, folder: str) -> Path:
    """Write an aion codec into `out_dir/folder` (e.g. codecs/Z) as config.json + model.safetensors, the
    subfolder replaced as a whole (atomic); scalar codecs' `_quantizer.*` keys are saved as `quantizer.*`, the
    hub's spelling (their load_state_dict takes both). Returns the subfolder."""
    from aion.codecs.scalar import BaseScalarIdentityCodec
    from safetensors.torch import save_file

    from astropt_tok.atomic import atomic_file
    from astropt_tok.errors import ensure_folder

    sub = Path(out_dir) / folder
    ensure_folder(sub.parent, "codec folder")
    scalar = isinstance(codec, BaseScalarIdentityCodec)
    state = {(k.replace("_quantizer.", "quantizer.", 1) if scalar and k.startswith("_quantizer.") else k):
             v.detach().cpu().contiguous() for k, v in codec.state_dict().items()}
    with atomic_file(sub, folder=True) as tmp:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return sub


def fit_scalar_codec(values, modality: str, out_dir: str | os.PathLike, codebook_size: int = 1024,
                     reservoir_size: int | None = None, column: str | None = None) -> Path:
    """Fit the AION codec of scalar `modality` to `values` (`fit_scalar`) and write it to
    `out_dir/codecs/<Modality.name>/`; returns that subfolder."""
    fit = fit_scalar(values, modality, codebook_size, reservoir_size, column)
    return save_codec(fit.codec, fit.config, out_dir, fit.modality.folder)


def make_tiny_spectrum_codec(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny, randomly initialised real aion `SpectrumCodec` (TINY_SPECTRUM_CONFIG) to
    `out_dir/codecs/spectrum/`; returns `out_dir` (a snapshot for `load_codec(out_dir, "DESISpectrum")`)."""
    import torch
    from aion.codecs import SpectrumCodec

    torch.manual_seed(seed)
    save_codec(SpectrumCodec(**TINY_SPECTRUM_CONFIG), dict(TINY_SPECTRUM_CONFIG), out_dir, "codecs/spectrum")
    return Path(out_dir)
