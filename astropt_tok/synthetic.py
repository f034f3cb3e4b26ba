"""A small synthetic survey in the real Legacy Survey schema, for tests, benchmarks and the demo.

Rows look like `Smith42/legacysurvey_hsc_crossmatched`: an `object_id` string and a `legacysurvey_image`
column encoded by `datasets` as a Sequence of per-band dicts (`band`, `flux` and `ivar` as Array2D
[160, 160] float32, `psf_fwhm`, `scale`), plus (by default) the same galaxy seen by HSC in `hsc_image`, the
same struct with five bands (HSC-G/R/I/Z/Y): finer pixels (0.168" against 0.262"), a sharper PSF (a 0.6"
Gaussian) and lower noise (deeper), as the crossmatched survey pairs them. Galaxies are Sersic profiles with
varied sizes, indices, ellipticities, angles and colours, blurred by a PSF, with per-band sky noise (see
`galaxy_params` for the ranges, taken from Legacy Survey DR10 DES cutouts). Catalogue columns (redshift, mag_r,
half_light_radius, sersic_n, ellipticity, morphology) are known functions of each galaxy's drawn properties,
for linear probes of embeddings. Legacy Survey catalogue fluxes FLUX_G, FLUX_R, FLUX_I, FLUX_Z (one per DES band
imaged, in nanomaggies, as the Legacy Survey tractor catalogue names them) are the total noiseless flux of the
galaxy's image in that band; they feed AION's LegacySurveyFlux* codecs. With `with_spectrum`, `desi_spectrum`
holds a DESI-like fibre spectrum of the galaxy (`galaxy_spectrum`), in the Multimodal Universe layout:
{flux, ivar, mask, wavelength} lists. Images and the columns above stay as they were: the fluxes are functions
of the drawn galaxy, and the spectrum draws its noise from a stream of its own.
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


# DESI-like spectra: a 5 A grid over 3600-9795 A (DESI: 0.8 A over 3600-9824 A), 1240 pixels
SPECTRUM_WAVELENGTH_A = 3600.0 + 5.0 * np.arange(1240)
FIBRE_RADIUS_ARCSEC = 0.75  # DESI's fibres are 1.5" across
# rest-frame lines (A): emission, strong in disks; absorption, deep in ellipticals (equivalent widths, A)
EMISSION_LINES = {3727.0: 25.0, 4861.3: 8.0, 4958.9: 5.0, 5006.8: 15.0, 6562.8: 40.0, 6583.4: 12.0, 6716.4: 6.0,
                  6730.8: 5.0}
ABSORPTION_LINES = {3933.7: 6.0, 3968.5: 6.0, 4101.7: 2.0, 4304.4: 3.0, 5175.0: 4.0, 5892.9: 3.0}
SKY_LINES_A = (5577.3, 6300.3)  # masked, as DESI flags its brightest sky-subtraction residuals


def flux_columns(bands=DEFAULT_BANDS) -> list[str]:
    """The catalogue flux columns of a survey imaged in `bands`: FLUX_<letter> for each DES band (FLUX_G...)."""
    return [f"FLUX_{b.split('-')[1]}" for b in bands if b.startswith("DES-")]


def survey_features(image_size: int = IMAGE_SIZE, with_hsc: bool = True, bands=DEFAULT_BANDS,
                    with_spectrum: bool = False):
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
    for name in flux_columns(bands):
        cols[name] = Value("float32")
    if with_spectrum:  # struct of lists, as the Multimodal Universe's DESI spectra
        cols["desi_spectrum"] = {"flux": Sequence(Value("float32")), "ivar": Sequence(Value("float32")),
                                 "mask": Sequence(Value("bool")), "wavelength": Sequence(Value("float32"))}
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


def seen_profile(p: dict, size: int = IMAGE_SIZE) -> np.ndarray:
    """The galaxy's profile seen through the PSF, peak 1, [size, size] float32: its image is
    amplitude x colour[band] x this, plus noise."""
    profile = gaussian_blur(sersic_profile(p, size), p["psf_fwhm"])
    profile /= max(float(profile.max()), 1e-12)
    return profile


def galaxy_photometry(p: dict, size: int = IMAGE_SIZE) -> tuple[np.ndarray, float]:
    """(total noiseless flux of the galaxy's image per band [n_bands] in nanomaggies, the fraction of it a
    1.5" fibre on the galaxy's centre takes in)."""
    profile = seen_profile(p, size).astype(np.float64)
    total = float(profile.sum())
    y, x = np.mgrid[0:size, 0:size] - (size - 1) / 2
    in_fibre = (x - p["dx"]) ** 2 + (y - p["dy"]) ** 2 <= (FIBRE_RADIUS_ARCSEC / LS_PIXEL_ARCSEC) ** 2
    return p["amplitude"] * p["colour"] * total, float(profile[in_fibre].sum()) / total


def galaxy_spectrum(p: dict, band_flux: np.ndarray, fibre: float, redshift: float, rng: np.random.Generator,
                    wavelength: np.ndarray = SPECTRUM_WAVELENGTH_A) -> dict:
    """A DESI-like fibre spectrum of a drawn galaxy, in 1e-17 erg/s/cm^2/A as DESI stores it: {flux, ivar, mask,
    wavelength} (float32, float32, bool (True = bad pixel), float32 A), each [len(wavelength)].

    Continuum: the fibre's share of the band fluxes (nanomaggies at the DES bands' wavelengths), interpolated and
    turned into f_lambda, with a 4000 A break that deepens with the Sersic index. Lines at (1 + redshift) times
    their rest wavelengths: emission (equivalent widths x how disk-like, x a log-normal scatter) and absorption
    (x how elliptical-like), Gaussians of 2.5 (1 + z) A. Noise sigma 0.3 (1 + ((lambda - 6700) / 3100)^2),
    ivar = 1 / sigma^2; the brightest sky lines and a few random pixels are masked (ivar 0 there).
    Draws from `rng` only (the image's generator is not touched)."""
    lam = wavelength.astype(np.float64)
    ls_wavelength_a = (np.array(LS_WAVELENGTH_NM) if len(band_flux) == len(LS_WAVELENGTH_NM)
                       else np.linspace(473, 926, len(band_flux))) * 10.0
    f_nu = np.interp(lam, ls_wavelength_a, band_flux * fibre)  # nanomaggies
    continuum = f_nu * 3.631e-29 * 2.998e18 / lam**2 / 1e-17  # f_lambda, 1e-17 erg/s/cm^2/A
    elliptical = float(np.clip((p["n_sersic"] - 0.6) / 3.4, 0.0, 1.0))  # 0 (disk) .. 1 (de Vaucouleurs-like)
    z1 = 1.0 + redshift
    continuum *= np.where(lam < 4000.0 * z1, 1.0 - (0.1 + 0.4 * elliptical), 1.0)
    sigma_line = 2.5 * z1
    lines = np.zeros_like(lam)
    strengths = {**{w: ew * (1 - elliptical) * rng.lognormal(0.0, 0.3) for w, ew in EMISSION_LINES.items()},
                 **{w: -ew * elliptical for w, ew in ABSORPTION_LINES.items()}}
    for rest, ew in strengths.items():
        centre = rest * z1
        line_flux = ew * z1 * np.interp(centre, lam, continuum)  # observed equivalent width x continuum
        lines += line_flux * np.exp(-0.5 * ((lam - centre) / sigma_line) ** 2) / (np.sqrt(2 * np.pi) * sigma_line)
    sigma = 0.3 * (1.0 + ((lam - 6700.0) / 3100.0) ** 2)
    flux = continuum + lines + rng.normal(0.0, 1.0, lam.shape) * sigma
    mask = np.zeros(lam.shape, dtype=bool)
    for sky in SKY_LINES_A:
        mask |= np.abs(lam - sky) <= 5.0
    mask[rng.choice(len(lam), size=max(1, len(lam) // 200), replace=False)] = True
    ivar = np.where(mask, 0.0, 1.0 / sigma**2)
    return {"flux": flux.astype(np.float32), "ivar": ivar.astype(np.float32), "mask": mask,
            "wavelength": wavelength.astype(np.float32)}


def galaxy_flux(rng: np.random.Generator, n_bands: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """One synthetic galaxy, float32 [n_bands, size, size], in nanomaggies, seen through the PSF with sky noise."""
    p = galaxy_params(rng, n_bands)
    profile = seen_profile(p, size)
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
    start: int, count: int, seed: int, bands=DEFAULT_BANDS, size: int = IMAGE_SIZE, with_hsc: bool = True,
    with_spectrum: bool = False,
) -> dict:
    """Columns for rows [start, start + count), each row a pure function of (seed, row index)."""
    ids, images, hsc, ras, decs, spectra = [], [], [], [], [], []
    catalogue: dict[str, list] = {name: [] for name in CATALOGUE_COLUMNS}
    fluxes = flux_columns(bands)
    catalogue.update({name: [] for name in fluxes})
    for row in range(start, start + count):
        p = galaxy_params(np.random.default_rng([seed, row]), len(bands))
        values = galaxy_catalogue(p, bands, size)
        for name in CATALOGUE_COLUMNS:
            catalogue[name].append(values[name])
        band_flux, fibre = galaxy_photometry(p, size)  # [n_bands] nanomaggies, the fibre's fraction
        for name, b in zip(fluxes, [b for b in bands if b.startswith("DES-")]):
            catalogue[name].append(float(band_flux[list(bands).index(b)]))
        if with_spectrum:  # its own noise stream ([seed, row, 2]; HSC's is [seed, row, 1])
            spectra.append(galaxy_spectrum(p, band_flux, fibre, float(values["redshift"]),
                                           np.random.default_rng([seed, row, 2])))
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
    if with_spectrum:
        cols["desi_spectrum"] = spectra
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
    with_spectrum: bool = False,
) -> list[Path]:
    """Write `n_rows` galaxies as `n_files` parquet files (train-0000i-of-0000n.parquet) in the real schema.

    `edit_rows(global_row, cols_for_file, local_index)` may mutate a row before writing, to plant bad rows.
    `processes` > 1 writes files in parallel (the output is the same). `with_spectrum` adds `desi_spectrum`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n_rows, n_files + 1).astype(int)
    jobs = [(out / f"train-{i:05d}-of-{n_files:05d}.parquet", int(bounds[i]), int(bounds[i + 1]), seed, tuple(bands),
             size, with_hsc, row_group_size, edit_rows, with_spectrum) for i in range(n_files)]
    if processes > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(processes) as pool:
            return pool.starmap(_write_file, jobs)
    return [_write_file(*job) for job in jobs]


def _write_file(path: Path, lo: int, hi: int, seed, bands, size, with_hsc, row_group_size, edit_rows,
                with_spectrum=False) -> Path:
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    cols = synthetic_rows(lo, hi - lo, seed, bands, size, with_hsc, with_spectrum)
    if edit_rows is not None:
        for j in range(hi - lo):
            edit_rows(lo + j, cols, j)
    features = survey_features(size, with_hsc, bands, with_spectrum)
    Dataset.from_dict(cols, features=features).to_parquet(str(path), batch_size=row_group_size)
    return path
