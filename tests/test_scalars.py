"""Scalar predictions: quantiles of a code distribution, photo-z and residual scores (hand-computed values), the
codec's value table, and catalogue values read back from a store's source."""

from __future__ import annotations

import json

import numpy as np
import pytest

from astropt_tok.errors import AstroptError
from astropt_train.use.scalars import (
    is_redshift,
    photoz_scores,
    quantile_codes,
    residual_scores,
    scalar_distribution,
    scalar_values,
)


def test_quantiles_are_the_first_code_whose_cdf_reaches_q():
    values = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    probs = np.array([[0.10, 0.10, 0.30, 0.40, 0.10],  # cdf .1 .2 .5 .9 1: q16 -> code 1, median -> 2, q84 -> 3
                      [0.00, 0.00, 0.00, 0.00, 1.00],  # all on the last code
                      [0.50, 0.50, 0.00, 0.00, 0.00],  # cdf .5 exactly at code 0: the median is code 0
                      [2.00, 0.00, 6.00, 0.00, 0.00]])  # not normalised: .25 .25 1 -> q16 code 0, q50/q84 code 2
    median, lo, hi = scalar_distribution(probs, values)
    np.testing.assert_allclose(median, [0.2, 0.4, 0.0, 0.2])
    np.testing.assert_allclose(lo, [0.1, 0.4, 0.0, 0.0])
    np.testing.assert_allclose(hi, [0.3, 0.4, 0.1, 0.2])
    # float32 softmax rounding: a cdf a hair below q still reaches it
    p = np.array([[0.5 - 1e-12, 0.5 + 1e-12]])
    assert quantile_codes(p, 0.5).tolist() == [0]


def test_distribution_refuses_mismatched_or_damaged_probabilities():
    with pytest.raises(AstroptError, match="do not match a codec of 3 codes"):
        scalar_distribution(np.ones((2, 4)), np.arange(3.0))
    with pytest.raises(AstroptError, match="not finite"):
        scalar_distribution(np.array([[np.nan, 1.0, 0.0]]), np.arange(3.0))


def test_photoz_scores_by_hand():
    true = np.array([0.0, 1.0, 0.5, 1.0])
    pred = np.array([0.1, 1.2, 0.5, 0.4])
    # dz = (pred - true) / (1 + true) = [0.1, 0.1, 0.0, -0.3]; median(dz) = 0.05
    # |dz - 0.05| = [0.05, 0.05, 0.05, 0.35] -> median 0.05 -> NMAD 1.4826 * 0.05
    s = photoz_scores(pred, true)
    assert s["n"] == 4
    assert s["nmad"] == pytest.approx(1.4826 * 0.05)
    assert s["bias"] == pytest.approx(0.05)
    assert s["outlier_frac"] == pytest.approx(0.25)  # only |-0.3| > 0.15
    assert photoz_scores(np.array([]), np.array([])) == {"nmad": None, "outlier_frac": None, "bias": None, "n": 0}


def test_residual_scores_by_hand():
    true = np.array([10.0, 20.0, 30.0])
    pred = np.array([11.0, 19.0, 36.0])  # r = [1, -1, 6]; median 1; |r - 1| = [0, 2, 5] -> median 2
    s = residual_scores(pred, true)
    assert s == {"nmad": pytest.approx(1.4826 * 2), "bias": 1.0, "n": 3}


def test_redshift_is_the_codec_modality_not_a_name_ending():
    assert is_redshift("redshift", "Z") and is_redshift("anything", "Z")
    assert not is_redshift("FLUX_Z", "LegacySurveyFluxZ")  # a flux in the z band
    assert is_redshift("photo_z", None) and not is_redshift("mass", None)


def test_scalar_values_of_a_grid_codec(tmp_path):
    import torch
    from aion.codecs import GridScalarCodec
    from aion.modalities import Z

    from astropt_tok.codec import load_codec

    z = GridScalarCodec("Z", codebook_size=16)
    z._quantizer.buckets.copy_(torch.linspace(0.0, 3.0, 16))
    z.save_pretrained(tmp_path / "codec", modality=Z)
    values = scalar_values(load_codec(str(tmp_path / "codec"), "Z"))
    assert values.dtype == np.float64 and values.shape == (16,)
    np.testing.assert_allclose(values, np.linspace(0.0, 3.0, 16).astype(np.float32))


# ---------------------------------------------------------------------------------------------------------
# catalogue values read back from a store's source

ROWS = 24


def _spectrum(rng, length):
    return {"flux": (rng.random(length) * 5).tolist(), "ivar": np.ones(length).tolist(), "mask": [False] * length,
            "wavelength": np.linspace(3600, 9800, length).tolist()}


@pytest.fixture(scope="module")
def catalogue_store(survey_dir, codec_dir, tmp_path_factory):
    """(store dir, source table): a survey of ROWS galaxies with a null redshift at row 3 and spectra of two
    lengths (row 5's null) in row groups of 5, tokenised with --scalar redshift:Z --spectrum desi_spectrum
    --keep-partial by a tiny image codec, a 32-code redshift grid and a tiny random spectrum codec."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from aion.codecs import GridScalarCodec, SpectrumCodec
    from aion.modalities import DESISpectrum, Z

    from astropt_tok.tokenise import TokeniseConfig, tokenise

    base = tmp_path_factory.mktemp("catalogue-readback")
    codec = base / "codec"
    shutil.copytree(codec_dir, codec)
    z = GridScalarCodec("Z", codebook_size=32)
    z._quantizer.buckets.copy_(torch.linspace(0.0, 2.0, 32))
    z.save_pretrained(codec, modality=Z)
    torch.manual_seed(0)
    SpectrumCodec(encoder_depths=(1, 1), encoder_dims=(8, 16), decoder_depths=(1, 1), decoder_dims=(8, 1),
                  latent_channels=16, num_pixels=1024, embedding_dim=10).save_pretrained(codec, modality=DESISpectrum)
    table = pq.read_table(sorted(survey_dir.glob("*.parquet"))).slice(0, ROWS)
    rng = np.random.default_rng(2)
    redshift = table.column("redshift").to_pylist()
    redshift[3] = None
    spectra = [None if r == 5 else _spectrum(rng, 120 if r % 2 else 90) for r in range(ROWS)]
    table = table.drop_columns(["redshift"]).append_column("redshift", pa.array(redshift))
    table = table.append_column("desi_spectrum", pa.array(spectra))
    (base / "survey").mkdir()
    pq.write_table(table.slice(0, 14), base / "survey" / "train-00000-of-00002.parquet", row_group_size=5)
    pq.write_table(table.slice(14), base / "survey" / "train-00001-of-00002.parquet", row_group_size=5)
    tokenise(TokeniseConfig(source=str(base / "survey"), out=str(base / "store"), shards=2, codec=str(codec),
                            device="cpu", progress=False, batch_size=8, workers=0, keep_partial=True,
                            scalars=(("redshift", "Z"),), spectra=(("desi_spectrum", "DESISpectrum"),)))
    return base / "store", table


def test_read_source_values_and_spectra_back(catalogue_store):
    from astropt_tok.source import read_source_spectra, read_source_values
    from astropt_tok.store import TokenStore

    store_dir, table = catalogue_store
    store = TokenStore(store_dir)
    section = store.manifest["source"]
    rows = np.array([13, 3, 0, 22, 14, 5, 3])  # out of order, across files and row groups, one twice
    values = read_source_values(section, rows, "redshift")
    assert values.dtype == np.float64
    truth = [table.column("redshift")[int(r)].as_py() for r in rows]
    np.testing.assert_array_equal(values, [np.nan if v is None else v for v in truth])
    spectra = read_source_spectra(section, rows, "desi_spectrum")
    assert spectra[5] is None
    for k, r in enumerate(rows):
        if r == 5:
            continue
        want = table.column("desi_spectrum")[int(r)].as_py()
        np.testing.assert_array_equal(spectra[k]["flux"], np.float32(want["flux"]))
        np.testing.assert_array_equal(spectra[k]["wavelength"], np.float32(want["wavelength"]))
        assert spectra[k]["mask"].dtype == bool and not spectra[k]["mask"].any()
    # the store's own source rows: what scores read
    got = read_source_values(section, store.source_rows(np.arange(store.num_rows)), "redshift")
    assert np.isnan(got).sum() == 1
    with pytest.raises(AstroptError, match="records no scalar column 'mag_r'"):
        read_source_values(section, rows, "mag_r")
    with pytest.raises(AstroptError, match="outside the source's 24 rows"):
        read_source_values(section, np.array([24]), "redshift")


# ---------------------------------------------------------------------------------------------------------
# decode of a spectrum column and of a scalar with rows that lack it


@pytest.fixture(scope="module")
def catalogue_run(catalogue_store, tmp_path_factory):
    """A model trained 4 steps on the catalogue store's image, redshift and spectrum (in that order)."""
    from astropt_train.config import build_config
    from astropt_train.loop import train

    out = tmp_path_factory.mktemp("catalogue-run") / "run"
    train(build_config(dict(tokens=str(catalogue_store[0]), out=str(out), n_layer=1, n_head=2, n_embd=32,
                            batch_size=4, max_iters=4, lr=1e-2, warmup_iters=1, eval_interval=4, eval_iters=1,
                            log_interval=4, val_images=0, live=False, device="cpu", compile=False,
                            checkpoint_interval=0, val_fraction=0.25)))
    return out


def _spectrum_codec(store):
    from astropt_tok.codec import load_codec

    return load_codec(store.codec_id, "DESISpectrum")


def test_decode_stored_spectra_on_their_source_wavelengths(catalogue_store, tmp_path):
    import torch

    from astropt_tok.store import TokenStore
    from astropt_train.use.decode import DecodeConfig, decode, summarise

    store_dir, table = catalogue_store
    store = TokenStore(store_dir)
    result = decode(DecodeConfig(tokens=store_dir, modality="desi_spectrum", rows="4:8", out=tmp_path / "s.png",
                                 device="cpu", progress=False))
    assert result.kind == "spectrum" and result.mode == "stored" and (tmp_path / "s.png").stat().st_size > 1000
    kept = store.source_rows(result.rows)
    assert 5 not in kept.tolist()  # row 5's spectrum is null: its placeholder tokens are not decoded
    codec = _spectrum_codec(store)
    for k, row in enumerate(result.table):
        want = table.column("desi_spectrum")[int(kept[k])].as_py()
        wl = torch.tensor([want["wavelength"]], dtype=torch.float32)
        with torch.inference_mode():
            flux = codec.codec.decode(torch.as_tensor(store.take(result.rows[k : k + 1], "desi_spectrum")
                                                      .astype(np.int64)), wavelength=wl).flux[0].numpy()
        assert row["grid"] == "source" and row["pixels"] == len(want["flux"])
        rms = float(np.sqrt(np.mean((flux.astype(np.float64) - np.float32(want["flux"])) ** 2)))
        assert row["codec_rms"] == pytest.approx(rms, rel=1e-5)
    assert summarise(result)["kind"] == "spectrum"


def test_decode_draws_a_spectrum_and_predicts_z_skipping_rows_without_it(catalogue_store, catalogue_run, tmp_path):
    from astropt_tok.store import TokenStore
    from astropt_train.use.decode import DecodeConfig, decode

    store_dir, _ = catalogue_store
    store = TokenStore(store_dir)
    drawn = decode(DecodeConfig(checkpoint=catalogue_run, tokens=store_dir, rows="0:3", given="legacysurvey_image",
                                generate_modality="desi_spectrum", out=tmp_path / "d.png", device="cpu",
                                progress=False))
    assert drawn.mode == "spectrum" and drawn.tokens.shape == (3, store.modality_tokens["desi_spectrum"])
    assert drawn.metrics["spectrum"]["given"] == ["legacysurvey_image", "redshift"]  # the blocks before it
    assert all("drawn_rms" in r for r in drawn.table)
    z = decode(DecodeConfig(checkpoint=catalogue_run, tokens=store_dir, rows="0:8", given="legacysurvey_image",
                            generate_modality="redshift", out=tmp_path / "z.png", device="cpu", progress=False))
    r3 = next(r for r in z.table if r["row"] == int(np.nonzero(store.source_rows(np.arange(store.num_rows)) == 3)[0][0]))
    assert r3["true"] is None and r3["codec"] is None and r3["median"] is not None  # no truth, no stored token
    assert z.metrics["codec"]["left_out"] == 1 and z.metrics["codec"]["n"] == 7


def test_eval_leaves_out_and_counts_rows_whose_scalar_is_masked(catalogue_store, catalogue_run, tmp_path):
    from astropt_tok.store import TokenStore
    from astropt_train.use.evaluate import EvalConfig, run_eval

    store_dir, table = catalogue_store
    store = TokenStore(store_dir)
    rep = run_eval(EvalConfig(checkpoint=catalogue_run, out=tmp_path / "eval", rows=f"0:{store.num_rows}",
                              sample_rows=0, images=False, device="cpu")).report
    e = rep["modalities"]["redshift"]["scalar"]
    assert e["given"] == ["legacysurvey_image"] and e["left_out"] == {"no_truth": 0, "masked": 1}  # row 3: null
    assert e["rows"] == store.num_rows - 1 == e["model"]["n"] == e["codec_ceiling"]["n"]
    assert "scalar" not in rep["modalities"]["desi_spectrum"]  # a spectrum has no number to score


def test_a_scalar_asked_from_a_block_after_it_is_one_error_line(catalogue_store, catalogue_run, tmp_path):
    import subprocess
    import sys

    from astropt_train.use.decode import DecodeConfig, decode

    store_dir, _ = catalogue_store
    # the model reads image, redshift, spectrum in that order and was trained without --shuffle-modalities
    with pytest.raises(AstroptError, match="reads desi_spectrum after redshift"):
        decode(DecodeConfig(checkpoint=catalogue_run, tokens=store_dir, rows="0:2", given="desi_spectrum",
                            generate_modality="redshift", out=tmp_path / "x.png", device="cpu", progress=False))
    done = subprocess.run([sys.executable, "-m", "astropt_tok.cli", "decode", "--checkpoint", str(catalogue_run),
                           "--tokens", str(store_dir), "--rows", "0:2", "--given", "legacysurvey_image",
                           "--generate-modality", "redshift", "--bands", "DES-G", "--out", str(tmp_path / "y.png")],
                          capture_output=True, text=True)
    assert done.returncode != 0 and done.stderr.strip().splitlines() == [
        "error: --bands is for image columns; redshift is a scalar column"]
    done = subprocess.run([sys.executable, "-m", "astropt_tok.cli", "decode", "--tokens", str(store_dir), "--rows",
                           "0:4", "--modality", "redshift", "--json", "--out", str(tmp_path / "z.png")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["kind"] == "scalar" and [r["row"] for r in summary["rows"]] == [0, 1, 2, 3]


def test_scalar_order_reads_the_blocks_before_it_or_given_ones_when_shuffled():
    from astropt_train.model import GPT, GPTConfig
    from astropt_train.use.scalars import scalar_order

    names = ["img", "Z", "hsc"]
    model = GPT(GPTConfig(vocab_size=64, block_size=33, n_layer=1, n_head=2, n_embd=16, modalities=names,
                          modality_vocab=[64, 8, 64], modality_tokens=[16, 1, 16],
                          modality_kinds=["image", "scalar", "image"]))
    assert scalar_order(model, "Z", None, shuffled=False) == (["img"], None)
    assert scalar_order(model, "Z", "img", shuffled=False) == (["img"], None)
    assert scalar_order(model, "Z", "hsc", shuffled=True) == (["hsc"], [2, 1, 0])
    with pytest.raises(AstroptError, match="reads hsc after Z"):
        scalar_order(model, "Z", "hsc", shuffled=False)
    first = GPT(GPTConfig(vocab_size=64, block_size=17, n_layer=1, n_head=2, n_embd=16, modalities=["Z", "img"],
                          modality_vocab=[8, 64], modality_tokens=[1, 16], modality_kinds=["scalar", "image"]))
    with pytest.raises(AstroptError, match="Z begins the model's sequence"):
        scalar_order(first, "Z", None, shuffled=False)
    assert scalar_order(first, "Z", None, shuffled=True) == (["img"], [1, 0])


def test_a_z_band_column_is_not_a_redshift():
    from astropt_train.use.probe import is_redshift_like

    assert all(is_redshift_like(n) for n in ("z", "Z", "redshift", "photo_z", "z_spec", "zphot", "spec-z", "z_best"))
    assert not any(is_redshift_like(n) for n in ("FLUX_Z", "mag_z", "a_z", "z_cmodel_mag", "size"))
