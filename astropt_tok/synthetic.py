"""A small synthetic survey in the real Legacy Survey schema, for tests, benchmarks and the demo.

Rows look like `Smith42/legacysurvey_hsc_crossmatched`: an `object_id` string and a `legacysurvey_image`
column encoded by `datasets` as a Sequence of per-band dicts (`band`, `flux` and `ivar` as Array2D
[160, 160] float32, `psf_fwhm`, `scale`), plus an `hsc_image` column that the tokeniser must never decode.
Galaxies are Sersic profiles with varied sizes, indices, ellipticities, angles and colours, plus noise.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DEFAULT_BANDS = ("DES-G", "DES-R", "DES-I", "DES-Z")
IMAGE_SIZE = 160


def survey_features(image_size: int = IMAGE_SIZE, with_hsc: bool = True):
    """The `datasets.Features` of the crossmatched survey (the columns this project and its tests use)."""
    from datasets import Array2D, Features, Sequence, Value

    def image_feature():
        return Sequence(
            {
                "band": Value("string"),
                "flux": Array2D((image_size, image_size), "float32"),
                "ivar": Array2D((image_size, image_size), "float32"),
                "psf_fwhm": Value("float32"),
                "scale": Value("float32"),
            }
        )

    cols = {"object_id": Value("string"), "legacysurvey_image": image_feature()}
    if with_hsc:
        cols["hsc_image"] = image_feature()
        cols["ra"] = Value("float64")
        cols["dec"] = Value("float64")
    return Features(cols)


def galaxy_flux(rng: np.random.Generator, n_bands: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """One synthetic galaxy, float32 [n_bands, size, size], in nanomaggy-like units with sky noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2
    x = x - rng.normal(0, 2)
    y = y - rng.normal(0, 2)
    r_eff = rng.uniform(2.0, 14.0)
    n_sersic = rng.uniform(0.6, 4.0)
    q = rng.uniform(0.3, 1.0)  # axis ratio
    theta = rng.uniform(0, np.pi)
    xr = x * np.cos(theta) + y * np.sin(theta)
    yr = (-x * np.sin(theta) + y * np.cos(theta)) / q
    r = np.sqrt(xr**2 + yr**2)
    b_n = 2.0 * n_sersic - 1.0 / 3.0
    profile = np.exp(-b_n * ((r / r_eff) ** (1.0 / n_sersic) - 1.0)).astype(np.float32)
    profile /= profile.max()
    amplitude = rng.uniform(0.3, 4.0)
    colour = np.sort(rng.uniform(0.3, 1.6, size=n_bands))  # redder galaxies brighter in z
    if rng.random() < 0.3:
        colour = colour[::-1].copy()
    noise = rng.uniform(0.005, 0.05)
    flux = amplitude * colour[:, None, None] * profile[None] + rng.normal(0, noise, (n_bands, size, size))
    return flux.astype(np.float32)


def synthetic_rows(
    start: int, count: int, seed: int, bands=DEFAULT_BANDS, size: int = IMAGE_SIZE, with_hsc: bool = True
) -> dict:
    """Columns for rows [start, start + count), each row a pure function of (seed, row index)."""
    ids, images, hsc, ras, decs = [], [], [], [], []
    for row in range(start, start + count):
        rng = np.random.default_rng([seed, row])
        flux = galaxy_flux(rng, len(bands), size)
        ivar = np.full_like(flux, 100.0)
        ids.append(f"LS{seed:02d}-{row:07d}")
        images.append(
            {
                "band": list(bands),
                "flux": list(flux),
                "ivar": list(ivar),
                "psf_fwhm": [1.2] * len(bands),
                "scale": [0.262] * len(bands),
            }
        )
        if with_hsc:
            hsc_bands = ["HSC-G", "HSC-R"]
            hsc_flux = np.zeros((len(hsc_bands), size, size), np.float32)
            hsc.append({"band": hsc_bands, "flux": list(hsc_flux), "ivar": list(hsc_flux + 1),
                        "psf_fwhm": [0.6] * 2, "scale": [0.168] * 2})
            ras.append(150.0 + row * 1e-3)
            decs.append(2.0 - row * 1e-3)
    cols = {"object_id": ids, "legacysurvey_image": images}
    if with_hsc:
        cols.update(hsc_image=hsc, ra=ras, dec=decs)
    return cols


def write_synthetic_survey(
    out_dir: str | os.PathLike,
    n_rows: int = 48,
    n_files: int = 2,
    seed: int = 0,
    bands=DEFAULT_BANDS,
    size: int = IMAGE_SIZE,
    with_hsc: bool = True,
    row_group_size: int = 8,
    edit_rows=None,
    processes: int = 1,
) -> list[Path]:
    """Write `n_rows` galaxies as `n_files` parquet files (train-0000i-of-0000n.parquet) in the real schema.

    `edit_rows(global_row, cols_for_file, local_index)` may mutate a row before writing, to plant bad rows.
    `processes` > 1 writes files in parallel (the output is the same).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n_rows, n_files + 1).astype(int)
    jobs = [(out / f"train-{i:05d}-of-{n_files:05d}.parquet", int(bounds[i]), int(bounds[i + 1]), seed, tuple(bands),
             size, with_hsc, row_group_size, edit_rows) for i in range(n_files)]
    if processes > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(processes) as pool:
            return pool.starmap(_write_file, jobs)
    return [_write_file(*job) for job in jobs]


def _write_file(path: Path, lo: int, hi: int, seed, bands, size, with_hsc, row_group_size, edit_rows) -> Path:
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    cols = synthetic_rows(lo, hi - lo, seed, bands, size, with_hsc)
    if edit_rows is not None:
        for j in range(hi - lo):
            edit_rows(lo + j, cols, j)
    Dataset.from_dict(cols, features=survey_features(size, with_hsc)).to_parquet(str(path), batch_size=row_group_size)
    return path
