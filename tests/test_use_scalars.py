"""`astropt decode --given IMAGE --generate-modality Z` and `astropt eval` on a model of an image and a redshift:
the model's median and 68% interval from its code probabilities, beside the truth read back from the source, the
codec's value of the stored token (its ceiling) and the training rows' median (the model-free baseline), each
checked against an independent computation. A real tiny codec tokenises a real synthetic survey; the model is
trained a few steps by `astropt train` (too few to beat the baseline: that is not asserted)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from astropt_tok.errors import AstroptError
from astropt_tok.store import TokenStore
from astropt_tok.tokenise import TokeniseConfig, tokenise
from astropt_train.config import build_config
from astropt_train.loop import train
from astropt_train.use.decode import DecodeConfig, decode, summarise

Z_CODES = 64
Z_RANGE = (0.0, 1.0)


@pytest.fixture(scope="module")
def z_codec(codec_dir, tmp_path_factory):
    """The tiny image codec and a 64-code redshift grid over 0..1, in the hub layout."""
    import torch
    from aion.codecs import GridScalarCodec
    from aion.modalities import Z

    out = tmp_path_factory.mktemp("z-codec") / "codec"
    shutil.copytree(codec_dir, out)
    z = GridScalarCodec("Z", codebook_size=Z_CODES)
    z._quantizer.buckets.copy_(torch.linspace(*Z_RANGE, Z_CODES))
    z.save_pretrained(out, modality=Z)
    return out


@pytest.fixture(scope="module")
def image_z(survey_dir, z_codec, tmp_path_factory):
    """(store, run): the survey's legacysurvey_image and redshift (tokenise --scalar redshift:Z), a model trained
    6 steps on both (the image block first, so it predicts Z from the image)."""
    root = tmp_path_factory.mktemp("use-z")
    tokenise(TokeniseConfig(source=str(survey_dir), out=str(root / "tokens"), shards=2, codec=str(z_codec),
                            batch_size=8, device="cpu", progress=False, workers=0, scalars=(("redshift", "Z"),)))
    train(build_config(dict(tokens=str(root / "tokens"), out=str(root / "run"), n_layer=1, n_head=2, n_embd=32,
                            batch_size=4, max_iters=6, lr=1e-2, warmup_iters=1, eval_interval=3, eval_iters=1,
                            log_interval=3, val_images=0, live=False, device="cpu", compile=False,
                            checkpoint_interval=0, val_fraction=0.25)))
    return root / "tokens", root / "run"


def _truth(survey_dir, store, rows):
    """The source's redshift of store rows, read with pyarrow alone."""
    z = pq.read_table(sorted(survey_dir.glob("*.parquet")), columns=["redshift"]).column("redshift").to_numpy()
    return z[store.source_rows(rows)].astype(np.float64)


def _grid():
    import torch

    return torch.linspace(*Z_RANGE, Z_CODES).double().numpy()  # the codec's value of each code (float32 grid)


def test_decode_predicts_z_from_the_image_with_the_truth_and_the_codec_ceiling(image_z, survey_dir, tmp_path):
    import torch

    from astropt_train.use.interop import load_any_model
    from astropt_train.use.scalars import photoz_scores

    store_dir, run = image_z
    store = TokenStore(store_dir)
    result = decode(DecodeConfig(checkpoint=run, tokens=store_dir, rows="0:10", given="legacysurvey_image",
                                 generate_modality="redshift", out=tmp_path / "z.png", device="cpu", progress=False))
    assert result.mode == "scalar" and result.kind == "scalar" and result.modality == "redshift"
    assert (tmp_path / "z.png").stat().st_size > 1000
    rows = np.arange(10)
    true = _truth(survey_dir, store, rows)
    stored = store.take(rows, "redshift")[:, 0].astype(np.int64)
    codec = _grid()[stored]
    # the model's distribution, from a forward pass of its own: the image tokens in, Z's head out
    model, _ = load_any_model(run, device="cpu")
    with torch.no_grad():
        logits, _ = model(torch.as_tensor(store.take(rows, "legacysurvey_image").astype(np.int64)))
    probs = torch.softmax(logits[:, -1, :Z_CODES].double(), -1).numpy()
    cdf = np.cumsum(probs, 1)
    median = _grid()[(cdf < 0.5 - 1e-9).sum(1)]
    for k, row in enumerate(result.table):
        assert row["id"] == store.object_ids([k])[0] and row["row"] == k
        assert row["true"] == pytest.approx(true[k]) and row["codec"] == pytest.approx(codec[k])
        assert row["median"] == pytest.approx(median[k])
        assert row["lo16"] <= row["median"] <= row["hi84"]
    want = photoz_scores(codec, true)
    assert result.metrics["codec"] == {**{k: pytest.approx(v) for k, v in want.items()}, "left_out": 0}
    assert result.metrics["model"]["n"] == 10 and result.metrics["redshift"]
    # the model-free baseline on the same rows: the median stored value of the run's training rows
    from astropt_train.checkpoint import find_checkpoint, read_config
    from astropt_train.data import split_rows

    split = read_config(find_checkpoint(run))["split"]
    train = split_rows(store.num_rows, split["val_fraction"], split["seed"]).train
    base = float(np.median(_grid()[store.take(train, "redshift")[:, 0].astype(np.int64)]))
    baseline = result.metrics["training_median"]
    assert baseline["value"] == pytest.approx(base) and baseline["training_rows"] == len(train)
    assert baseline["of"] == "the run's training rows"
    assert {k: baseline[k] for k in ("nmad", "outlier_frac", "bias", "n")} == {
        k: pytest.approx(v) for k, v in photoz_scores(np.full(10, base), true).items()}
    s = json.loads(json.dumps(summarise(result)))
    assert s["kind"] == "scalar" and len(s["rows"]) == 10 and set(s["rows"][0]) == {
        "id", "row", "true", "codec", "median", "lo16", "hi84"}


def test_decode_stored_z_without_a_model(image_z, survey_dir, tmp_path):
    store_dir, _ = image_z
    store = TokenStore(store_dir)
    result = decode(DecodeConfig(tokens=store_dir, modality="redshift", rows="3:7", out=tmp_path / "s.png",
                                 device="cpu", progress=False))
    assert result.mode == "stored" and result.columns == ["true", "codec"]
    np.testing.assert_allclose([r["true"] for r in result.table], _truth(survey_dir, store, np.arange(3, 7)))
    np.testing.assert_allclose([r["codec"] for r in result.table],
                               _grid()[store.take(np.arange(3, 7), "redshift")[:, 0].astype(np.int64)])


def test_decode_z_mistakes_are_one_error_each(image_z, tmp_path):
    store_dir, run = image_z
    base = dict(checkpoint=run, tokens=store_dir, rows="0:3", device="cpu", progress=False, out=tmp_path / "x.png")
    with pytest.raises(AstroptError, match="--generate-modality mass: checkpoint .* was trained on"):
        decode(DecodeConfig(**base, given="legacysurvey_image", generate_modality="mass"))
    with pytest.raises(AstroptError, match="--predict works on image columns, and redshift is a scalar column"):
        decode(DecodeConfig(**base, predict=True, modality="redshift"))
    with pytest.raises(AstroptError, match="--bands is for image columns"):
        decode(DecodeConfig(**{**base, "checkpoint": None}, modality="redshift", bands=["DES-G"]))
    # the model reads the image first and was trained without --shuffle-modalities: Z cannot be given to it
    with pytest.raises(AstroptError, match="--given redshift is a scalar column: an image is drawn from another image"):
        decode(DecodeConfig(**base, given="redshift", generate_modality="legacysurvey_image"))


def test_eval_scores_z_beside_the_training_median_and_the_codec_ceiling(image_z, survey_dir, tmp_path):
    from astropt_train.data import split_rows
    from astropt_train.use.evaluate import EvalConfig, run_eval, scalar_rows
    from astropt_train.use.scalars import photoz_scores

    store_dir, run = image_z
    store = TokenStore(store_dir)
    result = run_eval(EvalConfig(checkpoint=run, out=tmp_path / "eval", seeds=1, sample_rows=0, device="cpu"))
    rep = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert (tmp_path / "eval" / "eval.png").stat().st_size > 1000
    e = rep["modalities"]["redshift"]["scalar"]
    config = json.loads((run / "config.json").read_text())
    split = split_rows(store.num_rows, config["split"]["val_fraction"], config["split"]["seed"])
    true = _truth(survey_dir, store, split.val)
    # the baseline: the training rows' median truth, one number for every held-out galaxy
    base = float(np.median(_truth(survey_dir, store, split.train)))
    assert e["baselines"]["training_median"]["value"] == pytest.approx(base)
    want = photoz_scores(np.full(len(true), base), true)
    assert {k: e["baselines"]["training_median"][k] for k in want} == pytest.approx(want)
    # the ceiling: the codec's value of each stored token against the truth
    ceiling = photoz_scores(_grid()[store.take(split.val, "redshift")[:, 0].astype(np.int64)], true)
    assert e["codec_ceiling"] == pytest.approx(ceiling)
    assert e["redshift"] and e["against"] == "source" and e["given"] == ["legacysurvey_image"]
    assert e["rows"] == len(split.val) == e["model"]["n"] and e["left_out"] == {"no_truth": 0, "masked": 0}
    assert set(e["model"]) == {"nmad", "outlier_frac", "bias", "n"}
    assert [r[1] for r in scalar_rows(rep)] == ["photo-z NMAD", "photo-z outlier fraction", "photo-z bias (median)"]
    assert result.report == json.loads(json.dumps(rep))
