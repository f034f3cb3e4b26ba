"""AION's scalar and spectrum codecs written in the hub layout (astropt_tok.catalog_codecs), `fit-codec --scalar`,
and the synthetic survey's catalogue fluxes and DESI-like spectra."""

from __future__ import annotations

import json

import numpy as np
import pytest

from astropt_tok.errors import AstroptError
from test_hostile import run_cli

SPECTRUM_ROWS = 12


@pytest.fixture(scope="module")
def catalog_survey(tmp_path_factory):
    """12 synthetic galaxies (no HSC view) with catalogue fluxes and DESI-like spectra, in 2 parquet files."""
    from astropt_tok.synthetic import write_synthetic_survey

    out = tmp_path_factory.mktemp("catalog-survey")
    write_synthetic_survey(out, n_rows=SPECTRUM_ROWS, n_files=2, seed=5, with_hsc=False, with_spectrum=True,
                           row_group_size=4)
    return out


def _read(survey, *columns):
    """The survey's columns as pyarrow read them, straight from its parquet files."""
    import pyarrow.parquet as pq

    tables = [pq.read_table(p, columns=list(columns)) for p in sorted(survey.glob("*.parquet"))]
    return {c: [v for t in tables for v in t.column(c).to_pylist()] for c in columns}


def _reload(folder):
    """The codec in `folder` as the hub layout defines it: aion's class(**config.json) + model.safetensors."""
    from aion.codecs.config import MODALITY_CODEC_MAPPING
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    cls = {c.__name__: c for c in MODALITY_CODEC_MAPPING.values()}[_CLASS_OF[folder.name]]
    codec = cls(**config)
    codec.load_state_dict(state, strict=True)
    return codec.eval(), state


_CLASS_OF = {"Z": "GridScalarCodec", "EBV": "ScalarCodec", "FLUX_G": "LogScalarCodec", "spectrum": "SpectrumCodec"}


@pytest.mark.parametrize("modality, folder, kind", [("Z", "Z", "grid"), ("LegacySurveyEBV", "EBV", "reservoir"),
                                                    ("LegacySurveyFluxG", "FLUX_G", "log")])
def test_fitted_scalar_codec_reloads_to_the_same_tokens_as_aions_own_encode(tmp_path, modality, folder, kind):
    """Each kind of AION scalar codec: fitted, written, reloaded by aion's class strictly, it encodes as the fitted
    one does; non-finite values are left out of the fit; the quantiles spread the values over the codes."""
    import aion.modalities as am
    import torch

    from astropt_tok.catalog_codecs import fit_scalar, fit_scalar_codec
    from astropt_tok.codec import load_codec

    rng = np.random.default_rng(1)
    values = {"grid": rng.uniform(0.01, 1.3, 600), "reservoir": rng.normal(0.05, 0.02, 600),
              "log": np.exp(rng.normal(2.0, 1.5, 600))}[kind]
    values[:3] = [np.nan, np.inf, -np.inf]
    fit = fit_scalar(values, modality, codebook_size=64)
    sub = fit_scalar_codec(values, modality, tmp_path, codebook_size=64)
    assert sub == tmp_path / "codecs" / folder and fit.values == 597 and fit.ignored == 3
    reloaded, state = _reload(sub)
    assert all(k.startswith("quantizer.") for k in state)  # the hub's spelling
    cls = getattr(am, modality)
    probe = torch.as_tensor(np.concatenate([values[3:], [-5.0, 0.0, 1e-9, 1e6]]), dtype=torch.float32)
    ours = fit.codec.encode(cls(value=probe))
    assert torch.equal(reloaded.encode(cls(value=probe)), ours)
    assert torch.equal(load_codec(str(tmp_path), modality).codec.encode(cls(value=probe)), ours)  # the tool's loader
    finite = values[3:].astype(np.float32)
    codes = ours[: len(finite)].numpy()
    assert codes.min() >= 0 and codes.max() <= 63
    if kind == "grid":  # 0 .. the maximum rounded up (1.3 -> 1.5): every fitted value inside the grid
        buckets = state["quantizer.buckets"]
        assert float(buckets[0]) == 0.0 and float(buckets[-1]) == pytest.approx(1.5)
        assert fit.config == {"codebook_size": 64, "modality": "Z"}
    else:  # the reservoir is the sorted values (in log space for Log): codes used about equally
        reservoir = state["quantizer._reservoir"].numpy()
        binned = np.log(np.maximum(finite, np.float32(np.exp(-3)))) if kind == "log" else finite
        np.testing.assert_allclose(reservoir, np.sort(binned), rtol=1e-6)
        counts = np.bincount(codes, minlength=64)
        assert counts.max() <= 2 * len(finite) / 64 and (counts > 0).sum() >= 60
        assert fit.config["reservoir_size"] == 597


def test_scalar_fit_refusals(tmp_path):
    from astropt_tok.catalog_codecs import fit_scalar, fit_scalar_codec

    with pytest.raises(AstroptError, match=r"column z \(Z\) has 1 finite values of 3"):
        fit_scalar([0.5, np.nan, np.inf], "Z", column="z")
    with pytest.raises(AstroptError, match="constant"):
        fit_scalar([0.3] * 5, "Z")
    with pytest.raises(AstroptError, match="constant at or below the codec's floor"):
        fit_scalar([-1.0, 0.0, 0.01], "LegacySurveyFluxR")  # all clipped to e^-3 in log space
    with pytest.raises(AstroptError, match="not numeric"):
        fit_scalar(["a", "b"], "LegacySurveyEBV")
    with pytest.raises(AstroptError, match="image modality, not a scalar"):
        fit_scalar([1.0, 2.0], "LegacySurveyImage")
    with pytest.raises(AstroptError, match="not an AION modality"):
        fit_scalar([1.0, 2.0], "Redshift")
    with pytest.raises(AstroptError, match="at least 2 codes"):
        fit_scalar([1.0, 2.0], "Z", codebook_size=1)
    with pytest.raises(AstroptError, match="constant"):
        fit_scalar_codec([2.0, 2.0], "LegacySurveyEBV", tmp_path)
    assert not (tmp_path / "codecs").exists()


def test_tiny_spectrum_codec_reloads_strictly_and_encodes_synthetic_spectra(tmp_path, catalog_survey):
    """The tiny random SpectrumCodec: reloaded strictly by aion's class, it gives the tokens of the loader's codec:
    [B, 1 + num_pixels / 8] (a normalisation token, then the LFQ's), within its codebook."""
    import torch
    from aion.modalities import DESISpectrum

    from astropt_tok.catalog_codecs import TINY_SPECTRUM_CONFIG, make_tiny_spectrum_codec
    from astropt_tok.codec import load_codec

    assert make_tiny_spectrum_codec(tmp_path) == tmp_path
    reloaded, _ = _reload(tmp_path / "codecs" / "spectrum")
    spectra = _read(catalog_survey, "desi_spectrum")["desi_spectrum"][:5]
    dtypes = {"flux": np.float32, "ivar": np.float32, "mask": bool, "wavelength": np.float32}  # the column's
    batch = DESISpectrum(**{k: torch.tensor(np.array([s[k] for s in spectra], dtype=t)) for k, t in dtypes.items()})
    with torch.inference_mode():
        tokens = reloaded.encode(batch)
        loaded = load_codec(str(tmp_path), "DESISpectrum")
        again = loaded.codec.encode(batch)
    assert tokens.shape == (5, 1 + TINY_SPECTRUM_CONFIG["num_pixels"] // 8) == (5, loaded.tokens_per_object)
    assert torch.equal(tokens, again) and 0 <= int(tokens.min()) and int(tokens.max()) < loaded.vocab_size == 1024


def test_fit_codec_scalars_beside_an_image_codec(tmp_path, catalog_survey, capsys):
    """--no-image --scalar fits scalar codecs beside a folder's image codec (left byte for byte), records them,
    refuses to replace one without --overwrite, replaces only the named one with it; each mistake is one error."""
    import aion.modalities as am
    import torch

    from astropt_tok.artifacts import identify, read_record
    from astropt_tok.catalog_codecs import fit_scalar
    from astropt_tok.codec import load_codec, load_image_codec, make_tiny_codec

    out = make_tiny_codec(tmp_path / "codec")
    image_bytes = (out / "codecs/image/model.safetensors").read_bytes()
    base = ["fit-codec", "--source", catalog_survey, "--out", out, "--no-image", "--scalar-codebook", 32]
    code, stdout, err = run_cli(base + ["--scalar", "redshift:Z", "--scalar", "FLUX_G:LegacySurveyFluxG"], capsys)
    assert code == 0, err
    assert "codecs/Z: GridScalarCodec of column redshift" in stdout
    assert (out / "codecs/image/model.safetensors").read_bytes() == image_bytes and identify(out) == "codec"
    load_image_codec(str(out))
    columns = _read(catalog_survey, "redshift", "FLUX_G")
    for column, modality in (("redshift", "Z"), ("FLUX_G", "LegacySurveyFluxG")):  # the whole column, one fit
        values = torch.tensor(columns[column], dtype=torch.float32)
        want = fit_scalar(np.array(columns[column]), modality, codebook_size=32).codec.encode(
            getattr(am, modality)(value=values))
        loaded = load_codec(str(out), modality)
        assert loaded.vocab_size == 32 and torch.equal(loaded.codec.encode(getattr(am, modality)(value=values)), want)
    report = json.loads((out / "fit_report.json").read_text())["scalars"]
    assert set(report) == {"Z", "LegacySurveyFluxG"} and report["Z"]["values"] == SPECTRUM_ROWS
    assert report["LegacySurveyFluxG"]["folder"] == "codecs/FLUX_G" and report["Z"]["column"] == "redshift"
    assert set(read_record(out)["lineage"]["scalars"]) == {"Z", "LegacySurveyFluxG"}

    code, _, err = run_cli(base + ["--scalar", "redshift:Z"], capsys)
    assert code == 1 and err.startswith("error: ") and "codecs/Z" in err and "--overwrite" in err
    code, _, err = run_cli(base + ["--scalar", "redshift:Z", "--overwrite", "--scalar-codebook", 16], capsys)
    assert code == 0, err
    assert load_codec(str(out), "Z").vocab_size == 16 and load_codec(str(out), "LegacySurveyFluxG").vocab_size == 32
    assert set(json.loads((out / "fit_report.json").read_text())["scalars"]) == {"Z", "LegacySurveyFluxG"}
    assert (out / "codecs/image/model.safetensors").read_bytes() == image_bytes

    fresh = tmp_path / "fresh"
    for argv, names in ((["--scalar", "redshift:Redshift"], ["Redshift", "not an AION modality"]),
                        (["--scalar", "redshift:LegacySurveyImage"], ["LegacySurveyImage", "not a scalar"]),
                        (["--scalar", "redshift:DESISpectrum"], ["DESISpectrum", "not a scalar"]),
                        (["--scalar", "nope:Z"], ["'nope'", "has no column"]),
                        (["--scalar", "morphology:Z"], ["morphology", "not numbers"]),
                        (["--scalar", "redshift"], ["COLUMN:MODALITY"]),
                        (["--scalar", "redshift:Z", "--scalar", "mag_r:Z"], ["more than once"]),
                        (["--scalar", "redshift:Z", "--scalar-codebook", "1"], ["--scalar-codebook must be 2 to 65536"]),
                        (["--scalar", "redshift:Z", "--scalar-codebook", "70000"], ["16-bit tokens", "70000"]),
                        ([], ["--no-image", "--scalar"])):
        code, _, err = run_cli(["fit-codec", "--source", catalog_survey, "--out", fresh, "--no-image"] + argv, capsys)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
        assert all(n in lines[0] for n in names), lines[0]
        assert not (fresh / "codecs").exists() and not (fresh / "fit_report.json").exists()


def test_fit_codec_image_and_scalars_in_one_call(tmp_path, catalog_survey):
    """--scalar beside an image fit: both codecs and both reports; an image --overwrite clears every codec."""
    from astropt_tok.fit_codec import FitCodecConfig, fit_codec

    cfg = dict(source=str(catalog_survey), out=tmp_path / "both", hidden=8, projection=4, steps=1, batch_size=2,
               warmup=0, device="cpu", progress=False)
    result = fit_codec(FitCodecConfig(**cfg, scalars=(("FLUX_Z", "LegacySurveyFluxZ"),), scalar_codebook=16))
    assert set(result.scalars) == {"LegacySurveyFluxZ"}
    assert sorted(p.name for p in (tmp_path / "both/codecs").iterdir()) == ["FLUX_Z", "image"]
    report = json.loads((tmp_path / "both/fit_report.json").read_text())
    assert "heldout" in report and report["scalars"]["LegacySurveyFluxZ"]["config"]["codebook_size"] == 16
    fit_codec(FitCodecConfig(**cfg, overwrite=True))  # the codec fitted again: its scalar codecs are gone with it
    assert [p.name for p in (tmp_path / "both/codecs").iterdir()] == ["image"]
    assert "scalars" not in json.loads((tmp_path / "both/fit_report.json").read_text())


def test_synthetic_fluxes_match_the_images_and_spectra_read_back(catalog_survey):
    """FLUX_<band> is the galaxy's image flux in that band (within its sky noise); drawing spectra changes no image;
    desi_spectrum reads back through `datasets` as a struct of float32/bool lists on one wavelength grid, with
    masked pixels at ivar 0 and, in disk galaxies, the [OII] line at (1 + z) x 3727 A."""
    from datasets import load_dataset

    from astropt_tok.synthetic import (DEFAULT_BANDS, SPECTRUM_WAVELENGTH_A, flux_columns, galaxy_params,
                                       synthetic_rows)

    rows = synthetic_rows(0, 6, seed=5, with_hsc=False, with_spectrum=True)
    plain = synthetic_rows(0, 6, seed=5, with_hsc=False)
    assert "desi_spectrum" not in plain and flux_columns() == ["FLUX_G", "FLUX_R", "FLUX_I", "FLUX_Z"]
    for i in range(6):
        image = np.asarray(rows["legacysurvey_image"][i]["flux"])  # [4, 160, 160]
        np.testing.assert_array_equal(image, np.asarray(plain["legacysurvey_image"][i]["flux"]))
        sky = galaxy_params(np.random.default_rng([5, i]), len(DEFAULT_BANDS))["sky_noise"]  # per pixel, per band
        for b, name in enumerate(flux_columns()):
            assert rows[name][i] == plain[name][i] > 0
            assert abs(image[b].sum() - rows[name][i]) < 5 * sky[b] * 160  # 5 sigma of 160 x 160 pixels' noise
    assert list(synthetic_rows(0, 1, seed=5, bands=("DES-G", "DES-R"), with_hsc=False)) [-2:] == ["FLUX_G", "FLUX_R"]

    ds = load_dataset("parquet", data_files=sorted(str(p) for p in catalog_survey.glob("*.parquet")), split="train")
    feature = ds.features["desi_spectrum"]
    assert {k: feature[k].feature.dtype for k in feature} == {"flux": "float32", "ivar": "float32", "mask": "bool",
                                                             "wavelength": "float32"}
    lines_seen = 0
    for row in ds.with_format("numpy"):
        s = row["desi_spectrum"]
        assert all(len(s[k]) == len(SPECTRUM_WAVELENGTH_A) for k in ("flux", "ivar", "mask", "wavelength"))
        np.testing.assert_allclose(s["wavelength"], SPECTRUM_WAVELENGTH_A)
        assert s["mask"].sum() >= 6 and (s["ivar"][s["mask"]] == 0).all() and (s["ivar"][~s["mask"]] > 0).all()
        line = 3727.0 * (1 + row["redshift"])
        near, beside = np.abs(s["wavelength"] - line) <= 6, np.abs(np.abs(s["wavelength"] - line) - 60) <= 30
        sigma = 1 / np.sqrt(s["ivar"][beside & ~s["mask"]].mean())
        if row["sersic_n"] < 1.5 and s["flux"][near].max() - np.median(s["flux"][beside]) > 5 * sigma:
            lines_seen += 1
    assert lines_seen >= 1
