"""Scalar predictions: quantiles of a code distribution, photo-z and residual scores (hand-computed values), the
codec's value table, and catalogue values read back from a store's source."""

from __future__ import annotations

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
