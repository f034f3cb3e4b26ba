"""`astropt eval`: every model score beside model-free baselines on the same rows, sampled scores over seeds.

The baselines are checked against an independent count (plain numpy over the training rows, written here from
the documented rules), the model's token scores against a forward pass of its own, and the sampled scores'
spread against their per-seed values. A real tiny codec tokenises a real synthetic survey; the model is trained
by `astropt train`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from astropt_tok.errors import AstroptError
from astropt_tok.store import TokenStore
from astropt_tok.tokenise import TokeniseConfig, tokenise
from astropt_train.config import build_config
from astropt_train.data import split_rows
from astropt_train.loop import train
from astropt_train.token_scores import ModalityBaselines
from astropt_train.use.evaluate import EvalConfig, run_eval

LS = ("legacysurvey_image", ("DES-G", "DES-R", "DES-I", "DES-Z"))
HSC = ("hsc_image", ("HSC-G", "HSC-R", "HSC-I", "HSC-Z", "HSC-Y"))


def _store(survey_dir, codec_dir, out, modalities=(LS,)):
    tokenise(TokeniseConfig(source=str(survey_dir), out=str(out), shards=2, codec=str(codec_dir), batch_size=8,
                            device="cpu", progress=False, limit=24, modalities=modalities))
    return out


def _run(store, out, **kw):
    base = dict(tokens=str(store), out=str(out), n_layer=1, n_head=2, n_embd=32, batch_size=4, max_iters=6,
                lr=1e-2, warmup_iters=1, eval_interval=3, eval_iters=1, log_interval=3, val_images=0, live=False,
                device="cpu", compile=False, checkpoint_interval=0, val_fraction=0.25)
    base.update(kw)
    train(build_config(base))
    return out


@pytest.fixture(scope="module")
def one_survey(survey_dir, codec_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-one")
    store = _store(survey_dir, codec_dir, root / "tokens")
    return store, _run(store, root / "run")


@pytest.fixture(scope="module")
def two_surveys(survey_dir, codec_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-two")
    store = _store(survey_dir, codec_dir, root / "tokens", modalities=(LS, HSC))
    return store, _run(store, root / "run")


def _independent_position_accuracy(store: TokenStore, train_rows, val_rows, column=None) -> float:
    """The per-position most-frequent-token map from the training rows, scored on positions 1..T-1 of the held-out
    rows: written from the rule, without the project's code."""
    train_tok = store.take(train_rows, column).astype(np.int64)
    val_tok = store.take(val_rows, column).astype(np.int64)
    mode = np.array([np.bincount(train_tok[:, p], minlength=store.vocab_size).argmax()
                     for p in range(train_tok.shape[1])])
    return float((val_tok[:, 1:] == mode[None, 1:]).mean())


def test_eval_scores_beside_baselines_on_the_held_out_rows(one_survey, tmp_path):
    store_dir, run = one_survey
    result = run_eval(EvalConfig(checkpoint=run, out=tmp_path / "eval", seeds=2, sample_rows=3, device="cpu"))
    rep = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert rep == json.loads(json.dumps(result.report))
    assert (tmp_path / "eval" / "eval.png").stat().st_size > 1000
    store = TokenStore(store_dir)
    config = json.loads((run / "config.json").read_text())
    split = split_rows(store.num_rows, config["split"]["val_fraction"], config["split"]["seed"])
    assert rep["rows"]["count"] == len(split.val)
    (name, entry), = rep["modalities"].items()
    tokens = entry["tokens"]
    assert tokens["targets"] == len(split.val) * (store.tokens_per_image - 1)
    # the per-position baseline agrees with an independent count on the same rows
    expected = _independent_position_accuracy(store, split.train, split.val)
    assert tokens["accuracy"]["baselines"]["position"] == pytest.approx(expected, abs=1e-12)
    for metric in ("loss", "perplexity", "accuracy", "top5_accuracy"):
        e = tokens[metric]
        assert set(e["baselines"]) == {"position", "bigram", "unigram"}
        assert np.isfinite(e["model"]) and e["spread"] is not None and e["spread"] >= 0
    assert tokens["perplexity"]["model"] == pytest.approx(np.exp(tokens["loss"]["model"]))
    assert tokens["top5_accuracy"]["model"] >= tokens["accuracy"]["model"]
    # sampled: the mean and spread of the per-seed values, temperature and top-k recorded
    comp = entry["completion"]
    assert comp["kept"] == store.tokens_per_image // 2
    for metric in ("token_agreement", "explained_variance"):
        per = comp[metric]["per_seed"]
        assert len(per) == 2
        assert comp[metric]["model"] == pytest.approx(np.mean(per))
        assert comp[metric]["spread"] == pytest.approx(np.std(per, ddof=1))
    assert {"position", "mean_image", "codec"} <= set(comp["explained_variance"]["baselines"])
    assert comp["against"] == "original"
    assert rep["sampling"]["temperature"] == 1.0 and rep["sampling"]["top_k"] is None
    assert rep["sampling"]["seeds"] == [0, 1]


def test_model_token_scores_equal_a_direct_forward_pass(one_survey, tmp_path):
    import torch

    from astropt_train.checkpoint import find_checkpoint, load_model

    store_dir, run = one_survey
    result = run_eval(EvalConfig(checkpoint=run, out=tmp_path / "e", images=False, device="cpu"))
    model, conf = load_model(find_checkpoint(run))
    store = TokenStore(store_dir)
    val = split_rows(store.num_rows, conf["split"]["val_fraction"], conf["split"]["seed"]).val
    tok = torch.as_tensor(store.take(val).astype(np.int64))
    with torch.no_grad():
        logits, loss = model.eval()(tok[:, :-1], tok[:, 1:])
    acc = float((logits.argmax(-1) == tok[:, 1:]).double().mean())
    (entry,) = result.report["modalities"].values()
    assert entry["tokens"]["loss"]["model"] == pytest.approx(float(loss), rel=1e-5)
    assert entry["tokens"]["accuracy"]["model"] == pytest.approx(acc, abs=1e-12)
    assert "completion" not in entry


def test_baselines_follow_their_documented_rules():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 6, size=(50, 8))
    train[:, 3] = 4  # position 3 always holds token 4
    b = ModalityBaselines.fit([train[:20], train[20:]], vocab=6, tokens_per_image=8)  # in two pieces: counts add up
    assert b.rows == 50
    y, pos, prev = np.array([4, 4, 1]), np.array([3, 2, 0]), np.array([train[0, 2], 0, -1])
    s = b.score(y, pos, prev)
    assert s["position"][1][0]  # position 3's most frequent token is 4
    counts = np.bincount(train[:, 3], minlength=6)
    assert np.exp(s["position"][0][0]) == pytest.approx((counts[4] + 0.5) / (50 + 0.5 * 6))
    pairs = {}
    for row in train:
        for u, v in zip(row[:-1], row[1:]):
            pairs[(u, v)] = pairs.get((u, v), 0) + 1
    uni = np.bincount(train.ravel(), minlength=6)
    p_uni = (uni[4] + 0.5) / (uni.sum() + 3)
    c_u = sum(c for (u, _), c in pairs.items() if u == 0)
    assert np.exp(s["bigram"][0][1]) == pytest.approx((pairs.get((0, 4), 0) + 5 * p_uni) / (c_u + 5))
    assert s["bigram"][0][2] == s["unigram"][0][2]  # position 0: no previous token in the block, the unigram
    # the bigram's probabilities after a context sum to one over the vocabulary
    total = sum(np.exp(b.score(np.array([v]), np.array([5]), np.array([2]))["bigram"][0][0]) for v in range(6))
    assert total == pytest.approx(1.0)


def test_two_surveys_score_each_modality_and_both_cross_directions(two_surveys, tmp_path):
    _, run = two_surveys
    rep = run_eval(EvalConfig(checkpoint=run, out=tmp_path / "e", seeds=2, sample_rows=2, device="cpu")).report
    assert set(rep["modalities"]) == {"legacysurvey_image", "hsc_image"}
    assert set(rep["cross_survey"]) == {"legacysurvey_image->hsc_image", "hsc_image->legacysurvey_image"}
    cross = rep["cross_survey"]["legacysurvey_image->hsc_image"]
    assert len(cross["explained_variance"]["per_seed"]) == 2
    assert set(cross["per_band_explained_variance"]) == set(HSC[1])
    assert {"position", "mean_image", "codec"} <= set(cross["explained_variance"]["baselines"])


def test_trainer_logs_accuracy_beside_the_position_baseline(one_survey):
    _, run = one_survey
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("val_loss") is not None]
    assert evals and all(0 <= r["val_accuracy"] <= r["val_top5_accuracy"] <= 1 for r in evals)
    assert all(0 <= r["val_accuracy_position"] <= 1 for r in evals)


def test_eval_refuses_other_reports_and_bad_flags(one_survey, tmp_path):
    _, run = one_survey
    with pytest.raises(AstroptError, match="--seeds must be at least 1"):
        run_eval(EvalConfig(checkpoint=run, out=tmp_path / "e", seeds=0))
    for kwargs, message in (({"temperature": float("nan")}, "--temperature must be a finite number"),
                            ({"rows": "0:99999"}, "out of range"), ({"limit": 0}, "--limit must be at least 1"),
                            ({"top_k": 0}, "--top-k must be at least 1"), ({"sample_rows": -1}, "--sample-rows")):
        with pytest.raises(AstroptError, match=message):
            run_eval(EvalConfig(checkpoint=run, out=tmp_path / "bad", device="cpu", **kwargs))
        assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").glob("eval.*"))
    with pytest.raises(AstroptError, match="--complete-from must be between"):
        run_eval(EvalConfig(checkpoint=run, out=tmp_path / "e", complete_from=576, device="cpu"))
    with pytest.raises(AstroptError, match="codec"):  # before any scoring, and nothing is left in --out
        run_eval(EvalConfig(checkpoint=run, out=tmp_path / "no-codec", codec=str(tmp_path / "missing"), device="cpu"))
    assert not (tmp_path / "no-codec").exists()
    other = tmp_path / "not-ours"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(AstroptError):
        run_eval(EvalConfig(checkpoint=run, out=other, images=False, device="cpu"))
    assert (other / "notes.txt").read_text() == "mine"


def test_eval_cli_prints_one_table_and_errors_in_one_line(one_survey, tmp_path):
    _, run = one_survey
    cmd = [sys.executable, "-m", "astropt_tok.cli", "eval", "--checkpoint", str(run), "--out", str(tmp_path / "e"),
           "--no-images", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "position" in done.stdout and "teacher-forced accuracy" in done.stdout
    bad = subprocess.run(cmd[:-2] + ["--seeds", "0"], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.count("error:") == 1 and "Traceback" not in bad.stderr


def test_a_held_out_store_is_scored_whole_against_the_runs_training_baselines(one_survey, codec_dir, tmp_path):
    from astropt_tok.synthetic import write_synthetic_survey

    store_dir, run = one_survey
    other_survey = tmp_path / "other-survey"
    write_synthetic_survey(other_survey, n_rows=10, n_files=1, seed=7)
    other = _store(other_survey, codec_dir, tmp_path / "other-tokens")
    rep = run_eval(EvalConfig(checkpoint=run, out=tmp_path / "e", tokens=other, images=False, device="cpu")).report
    held_out = TokenStore(other)
    assert rep["rows"]["count"] == held_out.num_rows
    trained = TokenStore(store_dir)
    config = json.loads((run / "config.json").read_text())
    train_rows = split_rows(trained.num_rows, config["split"]["val_fraction"], config["split"]["seed"]).train
    # the map counted on the run's training rows, scored on every row of the other store: an independent count
    mode = np.array([np.bincount(trained.take(train_rows)[:, p].astype(np.int64), minlength=trained.vocab_size).argmax()
                     for p in range(trained.tokens_per_image)])
    tok = held_out.take(np.arange(held_out.num_rows)).astype(np.int64)
    expected = float((tok[:, 1:] == mode[None, 1:]).mean())
    (entry,) = rep["modalities"].values()
    assert entry["tokens"]["accuracy"]["baselines"]["position"] == pytest.approx(expected, abs=1e-12)


def _plant_missing_hsc(row, cols, j):
    if row in (2, 5, 9, 14):
        cols["hsc_image"][j]["flux"][3][50, 50] = np.nan  # a bad HSC image: the row keeps only its Legacy Survey one


def test_rows_lacking_a_modality_are_left_out_of_its_scores(codec_dir, tmp_path):
    """A --keep-partial store: a row without its HSC image is no target of the HSC scores (model or baselines)
    and is never completed or drawn."""
    from astropt_tok.synthetic import write_synthetic_survey

    survey = tmp_path / "survey"
    write_synthetic_survey(survey, n_rows=24, n_files=1, seed=4, edit_rows=_plant_missing_hsc)
    store_dir = tmp_path / "tokens"
    tokenise(TokeniseConfig(source=str(survey), out=str(store_dir), shards=2, codec=str(codec_dir), batch_size=8,
                            device="cpu", progress=False, modalities=(LS, HSC), keep_partial=True))
    run = _run(store_dir, tmp_path / "run", max_iters=3, val_fraction=0.4)
    rep = run_eval(EvalConfig(checkpoint=run, out=tmp_path / "e", seeds=1, sample_rows=20, device="cpu")).report
    store = TokenStore(store_dir)
    config = json.loads((run / "config.json").read_text())
    val = split_rows(store.num_rows, config["split"]["val_fraction"], config["split"]["seed"]).val
    has_hsc = store.valid(val)["hsc_image"]
    assert not has_hsc.all(), "the split should hold out a row without HSC for this test to mean anything"
    T = store.tokens_per_image
    hsc = rep["modalities"]["hsc_image"]["tokens"]
    assert hsc["rows"] == int(has_hsc.sum())
    # HSC is the second block (no shuffle): each row that has it contributes all T of its tokens as targets
    assert hsc["targets"] == int(has_hsc.sum()) * T
    assert rep["modalities"]["legacysurvey_image"]["tokens"]["targets"] == len(val) * (T - 1)
    assert rep["sampling"]["rows"] == int(has_hsc.sum())  # only rows with both images are completed or drawn


def test_an_upstream_checkpoint_needs_rows_it_did_not_train_on(one_survey, tmp_path):
    from astropt_train.use.interop import export_astropt

    store_dir, run = one_survey
    exported = export_astropt(run, tmp_path / "export")
    with pytest.raises(AstroptError, match="records no train/validation split"):
        run_eval(EvalConfig(checkpoint=exported, tokens=store_dir, out=tmp_path / "e", images=False, device="cpu"))
    rep = run_eval(EvalConfig(checkpoint=exported, tokens=store_dir, rows="0:5", out=tmp_path / "e", images=False,
                              device="cpu")).report
    assert rep["rows"]["count"] == 5 and rep["baselines"]["of"] == TokenStore(store_dir).num_rows - 5
    ours = run_eval(EvalConfig(checkpoint=run, rows="0:5", out=tmp_path / "ours", images=False, device="cpu")).report
    (a,), (b,) = rep["modalities"].values(), ours["modalities"].values()
    assert a["tokens"]["loss"]["model"] == pytest.approx(b["tokens"]["loss"]["model"], rel=1e-5)  # the same weights
