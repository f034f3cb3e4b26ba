"""Pictures and files from decoded flux: RGB composites with an arcsinh stretch, labelled PNG grids, .npy/.fits.

Flux arrays here are float32 [N, bands, H, W] in the survey's units (nanomaggies for Legacy Survey).
One stretch is computed per figure (not per panel), so panels in one grid are comparable by eye:
an original, its reconstruction and a model's completion share the same brightness scale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from astropt_tok.errors import AstroptError, ensure_folder

# Astronomical convention: the reddest band is shown red, the bluest blue.
DEFAULT_RGB_BANDS = ("DES-Z", "DES-R", "DES-G")


@dataclass(frozen=True)
class Stretch:
    """A per-figure arcsinh stretch: per display channel, black level, white level and softening."""

    lo: np.ndarray  # [3] flux mapped to black
    hi: np.ndarray  # [3] flux mapped to white
    softening: np.ndarray  # [3] where the stretch turns from linear to logarithmic


def rgb_indices(bands: Sequence[str], rgb_bands: Sequence[str] = DEFAULT_RGB_BANDS) -> list[int]:
    """Positions in `bands` of the (red, green, blue) display bands; a missing band is an AstroptError."""
    bands = list(bands)
    if len(rgb_bands) != 3:
        raise AstroptError(f"an RGB composite needs 3 bands, got {list(rgb_bands)}")
    missing = [b for b in rgb_bands if b not in bands]
    if missing:
        raise AstroptError(f"band(s) {', '.join(missing)} are not among the decoded bands {', '.join(bands)}")
    return [bands.index(b) for b in rgb_bands]


def fit_stretch(rgb_flux: np.ndarray, lo_pct: float = 50.0, hi_pct: float = 99.8, soft_frac: float = 0.1) -> Stretch:
    """Fit one arcsinh stretch to every panel of a figure. rgb_flux: [N, 3, H, W] (red, green, blue)."""
    per_channel = np.moveaxis(np.asarray(rgb_flux, dtype=np.float64), 1, 0).reshape(3, -1)
    finite = [c[np.isfinite(c)] for c in per_channel]
    lo = np.array([np.percentile(c, lo_pct) if c.size else 0.0 for c in finite])
    hi = np.array([np.percentile(c, hi_pct) if c.size else 1.0 for c in finite])
    span = np.maximum(hi - lo, 1e-12)  # a constant figure still maps to a valid (black) picture
    return Stretch(lo=lo, hi=lo + span, softening=soft_frac * span)


def apply_stretch(rgb_flux: np.ndarray, stretch: Stretch) -> np.ndarray:
    """[N, 3, H, W] flux -> [N, H, W, 3] float in 0..1: asinh((x - lo) / soft) / asinh((hi - lo) / soft)."""
    x = np.asarray(rgb_flux, dtype=np.float64)
    lo, hi, soft = (v[None, :, None, None] for v in (stretch.lo, stretch.hi, stretch.softening))
    y = np.arcsinh(np.maximum(x - lo, 0.0) / soft) / np.arcsinh((hi - lo) / soft)
    y = np.nan_to_num(np.clip(y, 0.0, 1.0), nan=0.0)
    return np.moveaxis(y, 1, -1).astype(np.float32)


def rgb_composite(
    flux: np.ndarray, bands: Sequence[str], rgb_bands: Sequence[str] = DEFAULT_RGB_BANDS, stretch: Stretch | None = None
) -> np.ndarray:
    """RGB pictures of flux [N, bands, H, W] -> [N, H, W, 3] in 0..1, with one stretch for all N panels."""
    idx = rgb_indices(bands, rgb_bands)
    rgb = np.asarray(flux)[:, idx]
    return apply_stretch(rgb, stretch or fit_stretch(rgb))


@dataclass
class GridLayout:
    """Pixel geometry of a grid: each cell is the panel upscaled by `scale`, with a label strip under it."""

    ncols: int
    scale: int = 2
    label_height: int = 14
    pad: int = 2

    def size(self, n_panels: int, panel_h: int, panel_w: int) -> tuple[int, int]:
        """(width, height) in pixels of a grid of n_panels panels of panel_h x panel_w."""
        nrows = max(1, -(-n_panels // self.ncols))
        cell_w = panel_w * self.scale + self.pad
        cell_h = panel_h * self.scale + self.label_height + self.pad
        return self.ncols * cell_w + self.pad, nrows * cell_h + self.pad


def save_grid(
    pictures: np.ndarray, labels: Sequence[str], path: str | os.PathLike, layout: GridLayout, title: str | None = None
) -> Path:
    """Write pictures [N, H, W, 3] (0..1) as a labelled PNG grid, row-major, `layout.ncols` per row."""
    from PIL import Image, ImageDraw, ImageFont

    pictures = np.asarray(pictures)
    if pictures.ndim != 4 or pictures.shape[-1] != 3:
        raise ValueError(f"pictures must be [N, H, W, 3], got {pictures.shape}")
    if len(labels) != len(pictures):
        raise ValueError(f"{len(pictures)} pictures but {len(labels)} labels")
    n, h, w, _ = pictures.shape
    width, height = layout.size(n, h, w)
    title_h = layout.label_height if title else 0
    canvas = Image.new("RGB", (width, height + title_h), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    if title:
        draw.text((layout.pad, 1), title, fill=(255, 255, 255), font=font)
    cell_w = w * layout.scale + layout.pad
    cell_h = h * layout.scale + layout.label_height + layout.pad
    for i in range(n):
        r, c = divmod(i, layout.ncols)
        x0, y0 = layout.pad + c * cell_w, title_h + layout.pad + r * cell_h
        tile = Image.fromarray((pictures[i] * 255).round().astype(np.uint8), "RGB")
        if layout.scale != 1:
            tile = tile.resize((w * layout.scale, h * layout.scale), Image.NEAREST)  # keep pixels honest
        canvas.paste(tile, (x0, y0))
        label = _fit_label(draw, font, str(labels[i]), w * layout.scale)
        draw.text((x0 + 1, y0 + h * layout.scale + 1), label, fill=(230, 230, 230), font=font)
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise AstroptError(f"--out must be a .png file, got {path}")
    ensure_folder(path.parent, "the output folder")
    canvas.save(path, format="PNG")
    return path


def _fit_label(draw, font, text: str, max_width: int) -> str:
    """Shorten a label with an ellipsis until it fits under its panel."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "…", font=font) > max_width:
        text = text[:-1]
    return text + "…"


def save_flux(path: str | os.PathLike, flux: np.ndarray, bands: Sequence[str], labels: Sequence[str]) -> Path:
    """Write decoded float32 flux [N, bands, H, W] as .npy, or as .fits (needs astropy) with bands and labels."""
    path = Path(path)
    flux = np.ascontiguousarray(flux, dtype=np.float32)
    ensure_folder(path.parent, "the output folder")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        np.save(path, flux)
    elif suffix in (".fits", ".fit"):
        try:
            from astropy.io import fits
        except ImportError:
            raise AstroptError(
                f"writing {path.name} needs astropy (pip install 'astropt-tokens[fits]'); or use a .npy file"
            ) from None
        primary = fits.PrimaryHDU(flux)  # FITS axes are reversed: NAXIS1 = W, ..., NAXIS4 = N
        primary.header["BUNIT"] = "nanomaggy"
        for i, b in enumerate(bands):
            primary.header[f"BAND{i}"] = str(b)
        table = fits.BinTableHDU.from_columns(
            [fits.Column(name="label", format=f"{max(1, max((len(str(s)) for s in labels), default=1))}A",
                         array=np.array([str(s) for s in labels]))],
            name="LABELS",
        )
        fits.HDUList([primary, table]).writeto(path, overwrite=True)
    else:
        raise AstroptError(f"--save-flux must end in .npy or .fits, got {path.name}")
    return path
