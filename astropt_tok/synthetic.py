"""A small synthetic survey in the real Legacy Survey schema, for tests, benchmarks and the demo.

Rows look like `Smith42/legacysurvey_hsc_crossmatched`: an `object_id` string and a `legacysurvey_image`
column encoded by `datasets` as a Sequence of per-band dicts (`band`, `flux` and `ivar` as Array2D
[160, 160] float32, `psf_fwhm`, `scale`), plus (by default) the same galaxy seen by HSC in `hsc_image`, the
same struct with five bands (HSC-G/R/I/Z/Y): finer pixels (0.168" against 0.262"), a sharper PSF (a 0.6"
Gaussian) and lower noise (deeper), as the crossmatched survey pairs them. Galaxies are Sersic profiles with
varied sizes, indices, ellipticities, angles and colours, blurred by a PSF, with per-band sky noise (see
`galaxy_params` for the ranges, taken from Legacy Survey DR10 DES cutouts). Catalogue columns (redshift, mag_r,
half_light_radius, sersic_n, ellipticity, morphology) are known functions of each galaxy's drawn properties,
for linear probes of embeddings.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DEFAULT_BANDS = ("DES-G", "DES-R", "DES-I", "DES-Z")
HSC_BANDS = ("HSC-G", "HSC-R", "HSC-I", "HSC-Z", "HSC-Y")
IMAGE_SIZE = 160
LS_PIXEL_ARCSEC, HSC_PIXEL_ARCSEC = 0.262, 0.168
HSC_PSF_FWHM_ARCSEC = 0.6
HSC_NOISE_FACTOR = 0.35  # HSC's sky noise per pixel relative to the Legacy Survey draw: deeper imaging
# effective wavelengths (nm): an HSC band's colour is the Legacy Survey colour interpolated at its wavelength
LS_WAVELENGTH_NM = (473.0, 642.0, 784.0, 926.0)
HSC_WAVELENGTH_NM = (475.0, 617.0, 765.0, 891.0, 977.0)


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
    for name in CATALOGUE_COLUMNS:
        cols[name] = Value("string") if name == "morphology" else Value("float32")
    return Features(cols)


def galaxy_params(rng: np.random.Generator, n_bands: int) -> dict:
    """The drawn properties of one galaxy (offset, r_eff and PSF in Legacy Survey pixels), in a fixed draw order.

    Ranges follow Legacy Survey DR10 (DES) cutouts at 0.262"/pixel: a Gaussian PSF of FWHM 1.0-1.5", a peak
    surface brightness of 0.1-4 nanomaggies/pixel (log-uniform) before colour (r ~ 17-22 mag galaxies), and
    per-pixel sky noise rising from about 0.004 nanomaggies (g) to 0.015 (z), times a depth factor 0.7-2.
    """
    p = {"dx": rng.normal(0, 2), "dy": rng.normal(0, 2)}
    p["r_eff"] = rng.uniform(2.0, 14.0)
    p["n_sersic"] = rng.uniform(0.6, 4.0)
    p["q"] = rng.uniform(0.3, 1.0)  # axis ratio
    p["theta"] = rng.uniform(0, np.pi)
    p["amplitude"] = float(np.exp(rng.uniform(np.log(0.1), np.log(4.0))))
    colour = np.sort(rng.uniform(0.3, 1.6, size=n_bands))  # redder galaxies brighter in z
    if rng.random() < 0.3:
        colour = colour[::-1].copy()
    p["colour"] = colour
    p["psf_fwhm"] = rng.uniform(1.0, 1.5) / LS_PIXEL_ARCSEC  # pixels
    p["sky_noise"] = np.linspace(0.004, 0.015, n_bands) * rng.uniform(0.7, 2.0)  # [n_bands], bluest to reddest
    p["noise"] = float(p["sky_noise"].mean())  # one figure for the HSC view's noise
    return p


def sersic_profile(p: dict, size: int, pixel_scale: float = 1.0) -> np.ndarray:
    """The galaxy's Sersic profile, peak 1, [size, size] float32; `pixel_scale` > 1 draws it on finer pixels."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2
    x = x - p["dx"] * pixel_scale
    y = y - p["dy"] * pixel_scale
    r_eff = p["r_eff"] * pixel_scale
    xr = x * np.cos(p["theta"]) + y * np.sin(p["theta"])
    yr = (-x * np.sin(p["theta"]) + y * np.cos(p["theta"])) / p["q"]
    r = np.sqrt(xr**2 + yr**2)
    b_n = 2.0 * p["n_sersic"] - 1.0 / 3.0
    profile = np.exp(-b_n * ((r / r_eff) ** (1.0 / p["n_sersic"]) - 1.0)).astype(np.float32)
    profile /= profile.max()
    return profile


# Catalogue columns beside the images, each a known function of the drawn galaxy (see `galaxy_catalogue`).
CATALOGUE_COLUMNS = ("redshift", "mag_r", "half_light_radius", "sersic_n", "ellipticity", "morphology")


def galaxy_catalogue(p: dict, bands, size: int = IMAGE_SIZE) -> dict:
    """Catalogue values of a drawn galaxy `p`, as a real crossmatched survey stores them beside its images:

    redshift           redshift-like: 0.02 + 0.4 (14 - r_eff) / 12 + 0.3 ln(4 / amplitude) / ln(40), so smaller and
                       fainter galaxies lie further away (0.02..0.72); r_eff in pixels, amplitude the peak
                       surface brightness (0.1..4 nanomaggies/pixel)
    mag_r              22.5 - 2.5 log10(total noiseless flux in DES-R, nanomaggies) (the middle band without DES-R)
    half_light_radius  the Sersic effective radius in arcsec (r_eff x 0.262"/pixel)
    sersic_n           the Sersic index (0.6..4)
    ellipticity        1 - axis ratio (0..0.7)
    morphology         "disk" (n < 1.5), "lenticular" (1.5 <= n < 2.5) or "elliptical" (n >= 2.5)
    """
    bands = list(bands)
    r_band = bands.index("DES-R") if "DES-R" in bands else len(bands) // 2
    total_r = p["amplitude"] * p["colour"][r_band] * float(sersic_profile(p, size).sum())
    n = p["n_sersic"]
    return {
        "redshift": 0.02 + 0.4 * (14.0 - p["r_eff"]) / 12.0 + 0.3 * np.log(4.0 / p["amplitude"]) / np.log(40.0),
        "mag_r": 22.5 - 2.5 * np.log10(total_r),
        "half_light_radius": p["r_eff"] * LS_PIXEL_ARCSEC,
        "sersic_n": n,
        "ellipticity": 1.0 - p["q"],
        "morphology": "disk" if n < 1.5 else "lenticular" if n < 2.5 else "elliptical",
    }


def galaxy_flux(rng: np.random.Generator, n_bands: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """One synthetic galaxy, float32 [n_bands, size, size], in nanomaggies, seen through the PSF with sky noise."""
    p = galaxy_params(rng, n_bands)
    profile = gaussian_blur(sersic_profile(p, size), p["psf_fwhm"])
    profile /= max(float(profile.max()), 1e-12)
    noise = rng.normal(0, 1, (n_bands, size, size)) * p["sky_noise"][:, None, None]
    flux = p["amplitude"] * p["colour"][:, None, None] * profile[None] + noise
    return flux.astype(np.float32)


def gaussian_blur(image: np.ndarray, fwhm_pixels: float) -> np.ndarray:
    """[..., H, W] convolved with a circular Gaussian PSF of the given FWHM (FFT, periodic edges)."""
    sigma = fwhm_pixels / 2.3548
    fy = np.fft.fftfreq(image.shape[-2])[:, None]
    fx = np.fft.rfftfreq(image.shape[-1])[None, :]
    transfer = np.exp(-2 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))  # the Gaussian's Fourier transform
    return np.fft.irfft2(np.fft.rfft2(image) * transfer, s=image.shape[-2:]).astype(np.float32)


def hsc_flux(seed: int, row: int, size: int = IMAGE_SIZE, n_ls_bands: int = len(DEFAULT_BANDS)) -> tuple[np.ndarray, float]:
    """The galaxy of (seed, row) as HSC sees it: (flux [5, size, size] float32, sky noise sigma).

    The galaxy's properties are the Legacy Survey draw's (the same generator stream); its own noise comes from a
    second stream, so the Legacy Survey image is unchanged by drawing this one.
    """
    p = galaxy_params(np.random.default_rng([seed, row]), n_ls_bands)
    scale = LS_PIXEL_ARCSEC / HSC_PIXEL_ARCSEC  # HSC pixels per Legacy Survey pixel
    profile = gaussian_blur(sersic_profile(p, size, scale), HSC_PSF_FWHM_ARCSEC / HSC_PIXEL_ARCSEC)
    profile /= max(float(profile.max()), 1e-12)
    ls_wavelengths = LS_WAVELENGTH_NM if n_ls_bands == len(LS_WAVELENGTH_NM) else np.linspace(473, 926, n_ls_bands)
    colour = np.interp(HSC_WAVELENGTH_NM, ls_wavelengths, p["colour"])  # [5]
    area = 1.0 / scale**2  # the same surface brightness spread over smaller pixels
    sigma = p["noise"] * HSC_NOISE_FACTOR
    noise = np.random.default_rng([seed, row, 1]).normal(0, sigma, (len(HSC_BANDS), size, size))
    return (p["amplitude"] * area * colour[:, None, None] * profile[None] + noise).astype(np.float32), sigma


def synthetic_rows(
    start: int, count: int, seed: int, bands=DEFAULT_BANDS, size: int = IMAGE_SIZE, with_hsc: bool = True
) -> dict:
    """Columns for rows [start, start + count), each row a pure function of (seed, row index)."""
    ids, images, hsc, ras, decs = [], [], [], [], []
    catalogue: dict[str, list] = {name: [] for name in CATALOGUE_COLUMNS}
    for row in range(start, start + count):
        for name, value in galaxy_catalogue(galaxy_params(np.random.default_rng([seed, row]), len(bands)), bands,
                                            size).items():
            catalogue[name].append(value)
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
            flux_hsc, sigma = hsc_flux(seed, row, size, len(bands))
            hsc.append({"band": list(HSC_BANDS), "flux": list(flux_hsc),
                        "ivar": list(np.full_like(flux_hsc, 1.0 / sigma**2)),
                        "psf_fwhm": [HSC_PSF_FWHM_ARCSEC] * len(HSC_BANDS),
                        "scale": [HSC_PIXEL_ARCSEC] * len(HSC_BANDS)})
            ras.append(150.0 + row * 1e-3)
            decs.append(2.0 - row * 1e-3)
    cols = {"object_id": ids, "legacysurvey_image": images}
    if with_hsc:
        cols.update(hsc_image=hsc, ra=ras, dec=decs)
    cols.update(catalogue)
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
