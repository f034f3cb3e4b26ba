"""Several surveys of one galaxy: the synthetic HSC view, multi-column tokenising, multimodal training and
cross-survey decoding."""

from __future__ import annotations

import numpy as np

from astropt_tok.synthetic import HSC_BANDS, synthetic_rows


def _flux(cols, column):
    return np.stack([np.stack(image["flux"]) for image in cols[column]])  # [rows, bands, H, W]


def test_synthetic_hsc_is_the_same_galaxy_deeper_and_sharper():
    with_hsc, without = synthetic_rows(0, 4, seed=3), synthetic_rows(0, 4, seed=3, with_hsc=False)
    assert np.array_equal(_flux(with_hsc, "legacysurvey_image"), _flux(without, "legacysurvey_image"))
    ls, hsc = _flux(with_hsc, "legacysurvey_image"), _flux(with_hsc, "hsc_image")
    assert hsc.shape == (4, 5, 160, 160) and hsc.dtype == np.float32
    assert all(image["band"] == list(HSC_BANDS) for image in with_hsc["hsc_image"])
    assert set(with_hsc["hsc_image"][0]) == set(with_hsc["legacysurvey_image"][0])  # the same struct fields
    corner = (slice(None), slice(None), slice(0, 12), slice(0, 12))  # sky only: HSC is deeper
    assert hsc[corner].std() < 0.5 * ls[corner].std()
    # the same galaxy: its brightest pixel is at the same place on the sky (finer HSC pixels, same centre)
    for g in range(4):
        ly, lx = np.unravel_index(ls[g].sum(0).argmax(), ls.shape[2:])
        hy, hx = np.unravel_index(hsc[g].sum(0).argmax(), hsc.shape[2:])
        scale = 0.262 / 0.168
        assert abs((hy - 79.5) - (ly - 79.5) * scale) < 4 and abs((hx - 79.5) - (lx - 79.5) * scale) < 4


# ---------------------------------------------------------------------------------------------------------
# tokenising several image columns in one pass

import json  # noqa: E402

import pytest  # noqa: E402

from astropt_tok import store as st  # noqa: E402
from astropt_tok.errors import AstroptError  # noqa: E402
from astropt_tok.tokenise import TokeniseConfig, parse_columns, tokenise  # noqa: E402

LS = ("legacysurvey_image", ("DES-G", "DES-R", "DES-I", "DES-Z"))
HSC = ("hsc_image", HSC_BANDS)
ROWS = 12


def _config(source, codec_dir, out, **kw):
    base = dict(source=str(source), out=str(out), shards=2, codec=str(codec_dir), batch_size=5, device="cpu",
                progress=False, limit=ROWS, modalities=(LS, HSC))
    base.update(kw)
    return TokeniseConfig(**base)


@pytest.fixture(scope="module")
def two_column_store(survey_dir, codec_dir, tmp_path_factory):
    """The first 12 galaxies of the survey, Legacy Survey and HSC, tokenised in one pass (arrow)."""
    out = tmp_path_factory.mktemp("two-columns") / "store"
    tokenise(_config(survey_dir, codec_dir, out))
    return out


def test_two_columns_in_one_pass_equal_two_one_column_stores(two_column_store, survey_dir, codec_dir, tmp_path):
    store = st.TokenStore(two_column_store)
    m = store.manifest
    assert m["format_version"] == st.MODALITIES_VERSION == 3
    assert [(x["name"], x["bands"]) for x in m["modalities"]] == [(LS[0], list(LS[1])), (HSC[0], list(HSC[1]))]
    assert store.modalities == ["legacysurvey_image", "hsc_image"] and store.num_rows == ROWS
    assert st.verify_store(two_column_store) == []
    import pyarrow as pa

    schema = pa.ipc.open_stream(pa.memory_map(str(two_column_store / "shard-00000.arrow"))).schema
    assert schema.names == ["legacysurvey_image", "hsc_image", "row", "object_id"]
    assert str(schema.field("hsc_image").type) == "fixed_size_list<item: int16>[576]"
    for column, bands in (LS, HSC):  # the same tokens as a store of that column alone
        single = tmp_path / column
        tokenise(_config(survey_dir, codec_dir, single, modalities=(), column=column, bands=bands))
        one = st.TokenStore(single)
        assert one.manifest["format_version"] == st.FORMAT_VERSION and "modalities" not in one.manifest and one.bands == list(bands)
        rows = np.arange(ROWS)
        np.testing.assert_array_equal(store.take(rows, column), one.take(rows))
        np.testing.assert_array_equal(store.read_rows(*store.locate(rows), modality=column), one.take(rows))
    assert not np.array_equal(store.take([0], "hsc_image"), store.take([0], "legacysurvey_image"))
    with pytest.raises(AstroptError, match="no modality 'tokens'"):
        store.take([0], "tokens")


def test_one_codec_call_per_modality_per_batch(survey_dir, codec_dir, tmp_path, monkeypatch):
    from aion.codecs.image import ImageCodec

    calls = []
    real = ImageCodec._encode

    def counted(self, image):  # the real codec, counted
        calls.append((type(image).__name__, int(image.flux.shape[0])))
        return real(self, image)

    monkeypatch.setattr(ImageCodec, "_encode", counted)
    tokenise(_config(survey_dir, codec_dir, tmp_path / "s", shards=1, batch_size=6))
    assert sorted(calls) == sorted([("LegacySurveyImage", 6), ("HSCImage", 6)] * 2)  # 12 rows, 2 batches


def _plant_bad_hsc(row, cols, j):
    if row == 2:
        cols["hsc_image"][j]["flux"][3][50, 50] = np.nan
    elif row == 5:
        cols["hsc_image"][j]["band"] = ["HSC-G", "HSC-R", "HSC-I", "HSC-Z", "HSC-X"]  # lacks HSC-Y
    elif row == 7:
        cols["legacysurvey_image"][j]["flux"][0][40, 40] = np.inf


@pytest.fixture(scope="module")
def bad_hsc_survey(tmp_path_factory):
    from astropt_tok.synthetic import write_synthetic_survey

    out = tmp_path_factory.mktemp("bad-hsc")
    write_synthetic_survey(out, n_rows=10, n_files=1, seed=2, edit_rows=_plant_bad_hsc)
    return out


def test_rejects_name_the_modality_and_keep_partial_marks_it(bad_hsc_survey, codec_dir, tmp_path):
    out = tmp_path / "all"
    summary = tokenise(_config(bad_hsc_survey, codec_dir, out, limit=None))
    assert summary.rejected == 3
    rejects = [json.loads(line) for line in (out / st.REJECTS).read_text().splitlines()]
    assert [r["row"] for r in rejects] == [2, 5, 7]
    assert rejects[0]["reason"].startswith("hsc_image: non-finite") and "legacysurvey_image" not in rejects[0]["reason"]
    assert rejects[1]["reason"].startswith("hsc_image: missing band HSC-Y")
    assert rejects[2]["reason"].startswith("legacysurvey_image: non-finite")

    partial = tmp_path / "partial"
    summary = tokenise(_config(bad_hsc_survey, codec_dir, partial, limit=None, keep_partial=True, storage="zarr"))
    assert summary.rejected == 0
    store = st.TokenStore(partial)
    assert store.partial and store.num_rows == 10
    valid = store.valid(np.arange(10))
    assert np.nonzero(~valid["hsc_image"])[0].tolist() == [2, 5]
    assert np.nonzero(~valid["legacysurvey_image"])[0].tolist() == [7]
    assert not store.take([2], "hsc_image").any()  # a missing image's tokens are zeros
    np.testing.assert_array_equal(store.take([0, 3], "hsc_image"), st.TokenStore(out).take([0, 2], "hsc_image"))
    with pytest.raises(AstroptError, match="--keep-partial needs several"):
        tokenise(_config(bad_hsc_survey, codec_dir, tmp_path / "x", keep_partial=True, modalities=()))


@pytest.mark.parametrize("columns, bands, message", [
    (["legacysurvey_image", "hsc_image"], None, "each is NAME:BAND"),
    (["legacysurvey_image:DES-G", "hsc_image:"], None, "each is NAME:BAND"),
    (["legacysurvey_image:DES-G,DES-R"], "DES-G", "--bands goes with a single --column"),
])
def test_column_syntax_mistakes_are_one_error(columns, bands, message):
    with pytest.raises(AstroptError, match=message):
        parse_columns(columns, bands)


def test_column_syntax():
    assert parse_columns(["legacysurvey_image"], None) == ("legacysurvey_image", LS[1], ())
    assert parse_columns(["x"], "HSC-G, HSC-R") == ("x", ("HSC-G", "HSC-R"), ())
    assert parse_columns(["legacysurvey_image:DES-G,DES-R,DES-I,DES-Z", "hsc_image:" + ",".join(HSC_BANDS)], None) == (
        "legacysurvey_image", LS[1], (LS, HSC))


def test_bad_multi_column_runs_are_one_error(survey_dir, codec_dir, tmp_path):
    for modalities, message in [
        ((LS, ("hsc_image", ("HSC-G", "DES-R"))), "bands of --column hsc_image must be bands of one survey"),
        ((LS, LS), "names an image column twice"),
        ((LS, ("row", HSC_BANDS)), "clashes with a store column name"),
        ((LS, ("nope", HSC_BANDS)), "has no column 'nope'"),
    ]:
        with pytest.raises(AstroptError, match=message):
            tokenise(_config(survey_dir, codec_dir, tmp_path / "bad", modalities=modalities))


def test_readers_refuse_an_unknown_version_and_read_old_ones(two_column_store, random_store, tmp_path):
    import shutil

    assert st.read_manifest(random_store)["format_version"] == st.FORMAT_VERSION  # a one-column store
    copy = tmp_path / "future"
    shutil.copytree(two_column_store, copy)
    m = json.loads((copy / st.MANIFEST).read_text())
    m["format_version"] = 4
    (copy / st.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(AstroptError, match="format version 4; this tool reads versions 1, 2, 3"):
        st.TokenStore(copy)


def test_cli_tokenises_two_columns_and_info_lists_them(survey_dir, codec_dir, tmp_path, capsys):
    from astropt_tok.cli import main

    out = tmp_path / "cli"
    main(["tokenise", "--source", str(survey_dir), "--out", str(out), "--shards", "1", "--codec", str(codec_dir),
          "--limit", "4", "--device", "cpu", "--no-progress", "--column", "legacysurvey_image:DES-G,DES-R,DES-I,DES-Z",
          "--column", "hsc_image:" + ",".join(HSC_BANDS)])
    assert st.TokenStore(out).modalities == ["legacysurvey_image", "hsc_image"]
    from rich.console import Console

    from astropt_tok.report import print_store_info

    figures = print_store_info(out, Console(width=200))
    assert figures["modalities"] == "legacysurvey_image (DES-G,DES-R,DES-I,DES-Z); hsc_image (HSC-G,HSC-R,HSC-I,HSC-Z,HSC-Y)"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["tokenise", "--source", str(survey_dir), "--out", str(tmp_path / "x"), "--shards", "1",
              "--column", "legacysurvey_image", "--column", "hsc_image"])
    assert "error: --column 'legacysurvey_image': with several image columns" in capsys.readouterr().err
