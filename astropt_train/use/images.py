"""Pictures and files from decoded flux: RGB composites with an arcsinh stretch, labelled PNG grids, .npy/.fits.

Flux arrays here are float32 [N, bands, H, W] in the survey's units (nanomaggies for Legacy Survey).
Every figure of the project (decode grids, the demo, validation images during training) is drawn by
`save_figure` in one style: black background, a title, column names above (original, codec reconstruction,
prediction, completion, generated), the object id under every panel, and one arcsinh stretch per figure (not
per panel, so an original, its reconstruction and a model's completion share one brightness scale), stated
in a note under the panels with any figures (scores) the caller adds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from astropt_tok.atomic import atomic_file
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
    pictures: np.ndarray, labels: Sequence[str], path: str | os.PathLike, layout: GridLayout, title: str | None = None,
    header: Sequence[str] | None = None, notes: Sequence[str] = (),
) -> Path:
    """Write pictures [N, H, W, 3] (0..1) as a labelled PNG grid, row-major, `layout.ncols` per row.

    `title` is a line above; `header` names each grid column above the first row; `notes` are lines below.
    """
    from PIL import Image, ImageDraw, ImageFont

    pictures = np.asarray(pictures)
    if pictures.ndim != 4 or pictures.shape[-1] != 3:
        raise ValueError(f"pictures must be [N, H, W, 3], got {pictures.shape}")
    if len(labels) != len(pictures):
        raise ValueError(f"{len(pictures)} pictures but {len(labels)} labels")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise AstroptError(f"--out must be a .png file, got {path}")
    n, h, w, _ = pictures.shape
    width, height = layout.size(n, h, w)
    font = ImageFont.load_default()
    line = layout.label_height
    title_lines = [title] if title else []
    top = line * len(title_lines) + (line if header else 0)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped_notes = [piece for note in notes for piece in _wrap(probe, font, str(note), width - 2 * layout.pad)]
    bottom = line * len(wrapped_notes) + (layout.pad if wrapped_notes else 0)
    canvas = Image.new("RGB", (width, height + top + bottom), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(title_lines):
        draw.text((layout.pad, 1 + k * line), _fit_label(draw, font, text, width - 2 * layout.pad), fill=(255, 255, 255),
                  font=font)
    cell_w = w * layout.scale + layout.pad
    cell_h = h * layout.scale + layout.label_height + layout.pad
    if header:
        for c, name in enumerate(list(header)[: layout.ncols]):
            x0 = layout.pad + c * cell_w
            draw.text((x0 + 1, top - line + 1), _fit_label(draw, font, str(name), w * layout.scale),
                      fill=(255, 220, 120), font=font)
    for i in range(n):
        r, c = divmod(i, layout.ncols)
        x0, y0 = layout.pad + c * cell_w, top + layout.pad + r * cell_h
        tile = Image.fromarray((pictures[i] * 255).round().astype(np.uint8), "RGB")
        if layout.scale != 1:
            tile = tile.resize((w * layout.scale, h * layout.scale), Image.NEAREST)  # keep pixels honest
        canvas.paste(tile, (x0, y0))
        label = _fit_label(draw, font, str(labels[i]), w * layout.scale)
        draw.text((x0 + 1, y0 + h * layout.scale + 1), label, fill=(230, 230, 230), font=font)
    for k, text in enumerate(wrapped_notes):
        draw.text((layout.pad, top + height + k * line), text, fill=(200, 200, 200), font=font)
    ensure_folder(path.parent, "the output folder")
    with atomic_file(path) as tmp:  # a full or read-only disk: one error, no half-written PNG
        canvas.save(tmp, format="PNG")
    return path


def stretch_note(rgb_bands: Sequence[str]) -> str:
    """What every figure states about its display: the bands as RGB and the one stretch shared by all panels."""
    return (f"RGB = {','.join(rgb_bands)}; one arcsinh stretch for every panel of this figure "
            "(black at the 50th percentile, white at the 99.8th, per colour)")


def save_figure(
    stacks: Sequence[np.ndarray], columns: Sequence[str], labels: Sequence[str], bands: Sequence[str],
    path: str | os.PathLike, title: str, notes: Sequence[str] = (), rgb_bands: Sequence[str] = DEFAULT_RGB_BANDS,
    per_row: int = 8, ncols: int | None = None,
) -> Path:
    """The project's one picture style: galaxies side by side in named columns, one stretch, stated on the figure.

    stacks: one flux array [N, bands, H, W] per column (e.g. original, codec reconstruction, prediction);
    labels: one per galaxy (object ids), written under each of its panels; columns: named above the panels.
    """
    idx = rgb_indices(bands, rgb_bands)
    per_panel = np.stack([np.asarray(s)[:, idx] for s in stacks], axis=1)  # [N, C, 3, H, W]
    n, c = per_panel.shape[:2]
    rgb = per_panel.reshape(n * c, 3, *per_panel.shape[-2:])  # galaxy-major: its columns side by side
    pictures = apply_stretch(rgb, fit_stretch(rgb))
    ncols = ncols or (min(per_row, n) if c == 1 else c * max(1, min(n, per_row // c)))
    header = [columns[k % c] for k in range(ncols)] if c > 1 or columns else None
    panel_labels = [str(lab) for lab in labels for _ in range(c)]
    return save_grid(pictures, panel_labels, path, GridLayout(ncols=ncols), title=title, header=header,
                     notes=[stretch_note(rgb_bands), *notes])


def _wrap(draw, font, text: str, max_width: int) -> list[str]:
    """Break a note into lines that fit `max_width` pixels, at spaces."""
    lines, current = [], ""
    for word in text.split(" "):
        trial = f"{current} {word}".strip()
        if current and draw.textlength(trial, font=font) > max_width:
            lines.append(current)
            current = word
        else:
            current = trial
    return lines + ([current] if current else [])


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
        # through a temporary name: a failed write leaves an earlier file of that name whole, not deleted
        with atomic_file(path) as tmp, open(tmp, "wb") as f:  # np.save on a name would add .npy to one without
            np.save(f, flux)
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
        with atomic_file(path) as tmp:
            fits.HDUList([primary, table]).writeto(tmp)
    else:
        raise AstroptError(f"--save-flux must end in .npy or .fits, got {path.name}")
    return path
