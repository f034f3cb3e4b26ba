"""`astropt decode --compare` on a store made by the real `astropt tokenise` from a real parquet survey."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from astropt_train.use.decode import DecodeConfig, decode


@pytest.fixture(scope="module")
def survey_store(tmp_path_factory, survey_dir, codec_dir):
    from astropt_tok.tokenise import TokeniseConfig, tokenise

    out = tmp_path_factory.mktemp("compare") / "store"
    tokenise(TokeniseConfig(source=str(survey_dir), out=str(out), shards=2, codec=str(codec_dir), batch_size=16,
                            device="cpu", progress=False))
    return out


def _parquet_flux(survey_dir, object_ids, bands):
    """The survey's flux of the given objects, read straight from the parquet files: [n, bands, 160, 160]."""
    by_id = {}
    for f in sorted(survey_dir.glob("*.parquet")):
        for rec in pq.read_table(f, columns=["object_id", "legacysurvey_image"]).to_pylist():
            img = rec["legacysurvey_image"]
            by_id[rec["object_id"]] = np.stack([np.array(img["flux"][img["band"].index(b)], np.float32) for b in bands])
    return np.stack([by_id[i] for i in object_ids])


def test_compare_metrics_equal_a_direct_computation(survey_store, survey_dir, codec_dir, tmp_path):
    from astropt_tok.codec import load_image_codec
    from astropt_tok.store import TokenStore

    rows = "5,18:21,33"  # both shards
    res = decode(DecodeConfig(tokens=survey_store, rows=rows, compare=True, out=tmp_path / "cmp.png",
                              save_flux=tmp_path / "recon.npy", device="cpu"))  # as the reference
    store = TokenStore(survey_store)
    bands = store.bands
    assert res.columns == ["original", "codec reconstruction"] and res.bands == bands
    ids = store.object_ids(res.rows)
    assert res.labels == ids

    original = _parquet_flux(survey_dir, ids, bands)[:, :, 32:128, 32:128]  # AION's centre crop of 160
    codec = load_image_codec(str(codec_dir))
    with torch.inference_mode():
        recon = codec.codec.decode(torch.as_tensor(store.take(res.rows).astype(np.int64)), bands=bands).flux.numpy()
    np.testing.assert_allclose(np.load(tmp_path / "recon.npy"), recon, rtol=1e-5, atol=1e-6)

    m = res.metrics["reconstruction"]
    mse = ((original.astype(np.float64) - recon) ** 2).mean(axis=(2, 3))
    rng = original.max(axis=(2, 3)) - original.min(axis=(2, 3))
    np.testing.assert_allclose(m["mse"], mse, rtol=1e-5)
    np.testing.assert_allclose(m["psnr"], 10 * np.log10(rng.astype(np.float64) ** 2 / mse), rtol=1e-5)
    for i, b in enumerate(bands):
        assert m["per_band"][b]["mse"] == pytest.approx(mse[:, i].mean(), rel=1e-5)


def test_compare_grid_has_original_and_reconstruction_panels(survey_store, tmp_path):
    from PIL import Image

    from astropt_train.use.images import GridLayout

    out = tmp_path / "cmp.png"
    decode(DecodeConfig(tokens=survey_store, rows="0:3", compare=True, out=out))
    layout = GridLayout(ncols=6)
    w, h = layout.size(6, 96, 96)  # 3 galaxies x (original, codec reconstruction), side by side
    with Image.open(out) as im:  # + a title, the column names, and the stretch and scores below the panels
        assert im.size[0] == w and im.size[1] >= h + (2 + 1 + 1 + 4) * layout.label_height


def test_compare_reads_moved_source_files_from_source(moved_source_store, survey_store, tmp_path):
    import shutil

    from astropt_tok.errors import AstroptError

    store, folder = moved_source_store
    with pytest.raises(AstroptError, match="is no longer there; pass --source DIR"):
        decode(DecodeConfig(tokens=store, rows="0:3", compare=True, out=tmp_path / "a.png"))
    moved = decode(DecodeConfig(tokens=store, rows="0:3,25", compare=True, source=folder, out=tmp_path / "b.png"))
    same = decode(DecodeConfig(tokens=survey_store, rows="0:3,25", compare=True, out=tmp_path / "c.png"))
    np.testing.assert_array_equal(moved.metrics["reconstruction"]["mse"], same.metrics["reconstruction"]["mse"])
    # a file of the same name holding other rows is not taken for the source
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    victim = sorted(other.glob("*.parquet"))[0]
    pq.write_table(pq.read_table(victim).slice(0, 3), victim)
    with pytest.raises(AstroptError, match="has 3 rows; the store was made from 20: not the same file"):
        decode(DecodeConfig(tokens=store, rows="0", compare=True, source=other, out=tmp_path / "d.png"))
