"""`astropt tokenise --scalar/--spectrum`: catalogue numbers and spectra beside the images, in one pass, each
column's tokens equal to AION's own encode of it, and every bad value a reject naming its column."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from astropt_tok import store as st
from astropt_tok.errors import AstroptError
from astropt_tok.codec import parse_modality_pairs
from astropt_tok.tokenise import TokeniseConfig, tokenise

ROWS = 16


def _spectrum(rng, length):
    wavelength = np.linspace(3600, 9800, length)
    return {"flux": (rng.random(length) * 5).tolist(), "ivar": np.ones(length).tolist(),
            "mask": [False] * length, "wavelength": wavelength.tolist()}


def _catalogue_survey(folder, survey_dir, edit=None):
    """The test survey's first ROWS rows, with a flux column and a spectrum column added (spectra of two
    lengths), in row groups of 4; `edit(row, columns)` plants bad values."""
    table = pq.read_table(sorted(survey_dir.glob("*.parquet"))).slice(0, ROWS)
    rng = np.random.default_rng(1)
    cols = {"redshift": table.column("redshift").to_pylist(),
            "FLUX_G": [float(v) for v in rng.uniform(0.2, 40, ROWS)],
            "desi_spectrum": [_spectrum(rng, 150 if r % 3 == 0 else 200) for r in range(ROWS)]}
    if edit is not None:
        for r in range(ROWS):
            edit(r, cols)
    for name in cols:
        table = table.drop_columns([name]) if name in table.column_names else table
        table = table.append_column(name, pa.array(cols[name]))
    folder.mkdir(parents=True)
    pq.write_table(table.slice(0, ROWS // 2), folder / "train-00000-of-00002.parquet", row_group_size=4)
    pq.write_table(table.slice(ROWS // 2), folder / "train-00001-of-00002.parquet", row_group_size=4)
    return folder


def _config(source, codec, out, **kw):
    base = dict(source=str(source), out=str(out), shards=2, codec=str(codec), device="cpu", progress=False,
                batch_size=3, workers=0, scalars=(("redshift", "Z"), ("FLUX_G", "LegacySurveyFluxG")),
                spectra=(("desi_spectrum", "DESISpectrum"),))
    return TokeniseConfig(**{**base, **kw})


def _aion_encode(codec_folder, modality, values):
    """AION's own encode of a column, codec loaded as aion builds it from the folder."""
    import torch

    from astropt_tok.codec import load_codec

    loaded = load_codec(str(codec_folder), modality)
    cls = loaded.codec  # the real aion codec
    from astropt_tok.codec import aion_modality

    holder = aion_modality(modality).cls
    with torch.inference_mode():
        if loaded.kind == "scalar":
            return cls.encode(holder(value=torch.tensor(values, dtype=torch.float32))).numpy().reshape(-1, 1)
        out = []
        for x in values:  # one spectrum at a time, on its own pixels
            s = holder(flux=torch.tensor([x["flux"]], dtype=torch.float32),
                       ivar=torch.tensor([x["ivar"]], dtype=torch.float32), mask=torch.tensor([x["mask"]]),
                       wavelength=torch.tensor([x["wavelength"]], dtype=torch.float32))
            out.append(cls.encode(s).numpy()[0])
        return np.stack(out)


@pytest.mark.parametrize("storage, workers, reader", [("arrow", 0, "pyarrow"), ("zarr", 2, "pyarrow"),
                                                     ("arrow", 1, "datasets")])
def test_catalogue_columns_equal_aions_own_encode(survey_dir, catalogue_codec, tmp_path, storage, workers, reader):
    source = _catalogue_survey(tmp_path / "survey", survey_dir)
    summary = tokenise(_config(source, catalogue_codec, tmp_path / "tokens", storage=storage, workers=workers,
                               reader=reader))
    assert summary.complete and summary.rows == ROWS and summary.rejected == 0
    store = st.TokenStore(tmp_path / "tokens")
    m = store.manifest
    assert m["format_version"] == st.KINDS_VERSION
    assert store.modalities == ["legacysurvey_image", "redshift", "FLUX_G", "desi_spectrum"]
    assert store.modality_kind == {"legacysurvey_image": "image", "redshift": "scalar", "FLUX_G": "scalar",
                                   "desi_spectrum": "spectrum"}
    assert store.modality_tokens["redshift"] == 1 and store.modality_tokens["desi_spectrum"] == 129
    entry = {e["name"]: e for e in m["modalities"]}
    assert entry["redshift"]["codec"]["class"] == "GridScalarCodec" and entry["redshift"]["aion_modality"] == "Z"
    assert entry["desi_spectrum"]["codec"]["folder"] == "codecs/spectrum"
    assert m["source"]["catalogue"] == {"redshift": "scalar", "FLUX_G": "scalar", "desi_spectrum": "spectrum"}
    table = pq.read_table(sorted(source.glob("*.parquet")))
    rows = store.source_rows(np.arange(store.num_rows))
    everything = np.arange(store.num_rows)
    for column, modality in [("redshift", "Z"), ("FLUX_G", "LegacySurveyFluxG"), ("desi_spectrum", "DESISpectrum")]:
        values = [table.column(column)[int(r)].as_py() for r in rows]
        np.testing.assert_array_equal(store.take(everything, column), _aion_encode(catalogue_codec, modality, values))
    assert st.verify_store(tmp_path / "tokens") == []


def _plant(r, cols):
    if r == 1:
        cols["redshift"][r] = None
    if r == 2:
        cols["redshift"][r] = float("nan")
    if r == 4:
        cols["redshift"][r] = 3.5  # past the codec's grid, which AION would clamp to 3.0
    if r == 5:
        cols["desi_spectrum"][r] = None
    if r == 7:
        cols["desi_spectrum"][r]["mask"] = [True] * len(cols["desi_spectrum"][r]["mask"])
    if r == 8:
        cols["desi_spectrum"][r]["ivar"] = cols["desi_spectrum"][r]["ivar"][:-1]
    if r == 10:
        cols["desi_spectrum"][r]["wavelength"] = cols["desi_spectrum"][r]["wavelength"][::-1]


def test_bad_catalogue_values_are_rejects_naming_the_column(survey_dir, catalogue_codec, tmp_path):
    source = _catalogue_survey(tmp_path / "survey", survey_dir, _plant)
    summary = tokenise(_config(source, catalogue_codec, tmp_path / "tokens"))
    assert summary.complete and summary.rejected == 7 and summary.rows == ROWS - 7
    reasons = {r["row"]: r["reason"] for r in map(json.loads, (tmp_path / "tokens" / st.REJECTS).read_text().splitlines())}
    assert reasons[1] == "redshift: null"
    assert reasons[2].startswith("redshift: not finite")
    assert reasons[4] == "redshift: 3.5 outside the codec's range [0, 3]"
    assert reasons[5] == "desi_spectrum: null"
    assert reasons[7].startswith("desi_spectrum: no good pixels")
    assert reasons[8].startswith("desi_spectrum: flux, ivar, mask, wavelength have different lengths")
    assert reasons[10] == "desi_spectrum: wavelength not increasing"


def test_keep_partial_masks_a_bad_catalogue_value_instead(survey_dir, catalogue_codec, tmp_path):
    source = _catalogue_survey(tmp_path / "survey", survey_dir, _plant)
    summary = tokenise(_config(source, catalogue_codec, tmp_path / "tokens", keep_partial=True))
    assert summary.rejected == 0 and summary.rows == ROWS
    store = st.TokenStore(tmp_path / "tokens")
    valid = store.valid(np.arange(ROWS))
    assert np.nonzero(~valid["redshift"])[0].tolist() == [1, 2, 4]
    assert np.nonzero(~valid["desi_spectrum"])[0].tolist() == [5, 7, 8, 10]
    assert valid["legacysurvey_image"].all() and valid["FLUX_G"].all()
    assert not store.take(np.array([5, 7]), "desi_spectrum").any()  # a masked spectrum holds zeros


def test_catalogue_flag_mistakes_are_one_error(survey_dir, catalogue_codec, codec_dir, tmp_path):
    source = _catalogue_survey(tmp_path / "survey", survey_dir)
    with pytest.raises(AstroptError, match=r"--scalar 'redshift': give COLUMN:MODALITY"):
        parse_modality_pairs(["redshift"], "--scalar")
    for kw, message in [
        (dict(scalars=(("redshift", "Redshift"),)), r"--scalar modality 'Redshift' is not an AION modality"),
        (dict(scalars=(("redshift", "DESISpectrum"),)), r"is an AION spectrum modality, not a scalar"),
        (dict(spectra=(("desi_spectrum", "Z"),)), r"--spectrum modality 'Z' is an AION scalar modality"),
        (dict(scalars=(("morphology", "Z"),)), r"column 'morphology' .* not numbers"),
        (dict(scalars=(("object_id", "Z"),)), r"'object_id' clashes with a store column"),
        (dict(scalars=(("nope", "Z"),)), r"has no column 'nope'"),
        (dict(scalars=(), spectra=(("redshift", "DESISpectrum"),)), r"column 'redshift' .* is not a spectrum"),
        (dict(scalars=(("redshift", "Z"), ("redshift", "Z"))), r"'redshift' is named twice"),
        (dict(scalars=(("redshift", "HSCMagG"),)), r"missing codecs/g_cmodel_mag/config.json"),
        (dict(codec=str(codec_dir)), r"missing codecs/Z/config.json"),
    ]:
        with pytest.raises(AstroptError, match=message):
            tokenise(_config(source, kw.pop("codec", catalogue_codec), tmp_path / "bad", **kw))


def test_a_rerun_with_another_scalar_codec_is_refused(survey_dir, catalogue_codec, tmp_path):
    import torch
    from aion.codecs import GridScalarCodec
    from aion.modalities import Z

    source = _catalogue_survey(tmp_path / "survey", survey_dir)
    cfg = _config(source, catalogue_codec, tmp_path / "tokens", scalars=(("redshift", "Z"),), spectra=())
    tokenise(cfg)
    other = tmp_path / "other-codec"
    shutil.copytree(catalogue_codec, other)
    z = GridScalarCodec("Z", codebook_size=64)
    z._quantizer.buckets.copy_(torch.linspace(0, 4, 64))
    z.save_pretrained(other, modality=Z)
    with pytest.raises(AstroptError, match="different .*modalities"):
        tokenise(_config(source, other, tmp_path / "tokens", scalars=(("redshift", "Z"),), spectra=()))


def test_a_row_group_read_takes_only_the_leaves_it_needs(survey_dir, tmp_path):
    """Parquet reads ask for a spectrum's flux, ivar, mask and wavelength (here named `lambda`, as the
    Multimodal Universe names it) and a scalar column, never the spectrum's other fields or other columns."""
    from astropt_tok.source import read_task, read_tasks, resolve_source

    def add_fields(r, cols):
        x = cols["desi_spectrum"][r]
        x["lambda"] = x.pop("wavelength")
        x["lsf_sigma"] = [1.0] * len(x["flux"])

    source = _catalogue_survey(tmp_path / "survey", survey_dir, add_fields)
    plan = resolve_source(str(source), column="legacysurvey_image",
                          catalogue={"redshift": "scalar", "desi_spectrum": "spectrum"})
    batch = read_task(plan, read_tasks(plan, 0, 4)[0])
    assert sorted(batch.schema.names) == ["desi_spectrum", "legacysurvey_image", "object_id", "redshift"]
    assert [f.name for f in batch.schema.field("desi_spectrum").type] == ["flux", "ivar", "mask", "lambda"]
    assert [f.name for f in batch.schema.field("legacysurvey_image").type] == ["band", "flux"]


def test_a_spectrum_whose_leaves_are_not_lists_of_numbers_is_one_error(survey_dir, catalogue_codec, tmp_path):
    def nest(r, cols):
        cols["desi_spectrum"][r]["flux"] = [[v] for v in cols["desi_spectrum"][r]["flux"]]  # a list of lists

    source = _catalogue_survey(tmp_path / "survey", survey_dir, nest)
    with pytest.raises(AstroptError, match="column 'desi_spectrum' .* is not a spectrum"):
        tokenise(_config(source, catalogue_codec, tmp_path / "tokens", scalars=()))


def test_info_and_the_store_card_say_what_each_column_holds(survey_dir, catalogue_codec, tmp_path):
    from rich.console import Console

    from astropt_tok.report import print_store_info
    from astropt_tok.store_card import card_body

    source = _catalogue_survey(tmp_path / "survey", survey_dir)
    tokenise(_config(source, catalogue_codec, tmp_path / "tokens"))
    console = Console(record=True, width=200)
    print_store_info(tmp_path / "tokens", console)
    text = console.export_text()
    assert "scalar Z (GridScalarCodec, 64 codes, 1 token); source column redshift" in text
    assert "spectrum DESISpectrum (SpectrumCodec, 1024 codes, 129 tokens)" in text
    card = card_body(st.read_manifest(tmp_path / "tokens"))
    assert "| `FLUX_G` | scalar `LegacySurveyFluxG` (LogScalarCodec of `codecs/FLUX_G`, 32 codes" in card
    assert (tmp_path / "tokens" / "README.md").read_text().count("`desi_spectrum`") >= 1


@pytest.mark.gpu
def test_catalogue_columns_on_the_gpu_equal_aions_own_encode_there(survey_dir, catalogue_codec, tmp_path):
    """On CUDA: scalars are encoded on the host (a table lookup), so exactly AION's; spectra on the device in
    groups of one length, against AION's own encode on the same device (one spectrum at a time: a batched
    convolution may pick another kernel, so a token on a quantisation boundary may flip; at most 1% may)."""
    import torch

    source = _catalogue_survey(tmp_path / "survey", survey_dir)
    summary = tokenise(_config(source, catalogue_codec, tmp_path / "tokens", device="cuda"))
    assert summary.complete and summary.rows == ROWS
    store = st.TokenStore(tmp_path / "tokens")
    table = pq.read_table(sorted(source.glob("*.parquet")))
    rows = store.source_rows(np.arange(store.num_rows))
    everything = np.arange(store.num_rows)
    for column, modality in [("redshift", "Z"), ("FLUX_G", "LegacySurveyFluxG")]:
        values = [table.column(column)[int(r)].as_py() for r in rows]
        np.testing.assert_array_equal(store.take(everything, column), _aion_encode(catalogue_codec, modality, values))
    from astropt_tok.codec import load_codec
    from aion.modalities import DESISpectrum

    codec = load_codec(str(catalogue_codec), "DESISpectrum", device="cuda").codec
    reference = []
    with torch.inference_mode():
        for r in rows:
            x = table.column("desi_spectrum")[int(r)].as_py()
            s = DESISpectrum(**{k: torch.tensor([x[k]], dtype=torch.bool if k == "mask" else torch.float32,
                                                device="cuda") for k in ("flux", "ivar", "mask", "wavelength")})
            reference.append(codec.encode(s).cpu().numpy()[0])
    agreement = (store.take(everything, "desi_spectrum") == np.stack(reference)).mean()
    assert agreement >= 0.99, agreement
