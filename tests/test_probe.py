"""`astropt probe`: the join, left-out rows, scores that can fail, both baselines, the report and pictures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from astropt_tok.errors import AstroptError
from astropt_train.use.embed import EmbedConfig, embed, read_embeddings
from astropt_train.use.probe import ProbeConfig, nmad, probe
from test_embed import save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def emb(tmp_path_factory, moved_source_store):
    """Embeddings of the synthetic survey's 40 galaxies (tiny codec, random tiny model), and the survey folder."""
    store, survey = moved_source_store
    base = tmp_path_factory.mktemp("probe")
    save_tiny_checkpoint(base / "run", store, n_layer=2, seed=5)  # not the baseline's seed 0
    embed(EmbedConfig(checkpoint=base / "run", out=base / "emb", device="cpu", progress=False))
    return base / "emb", survey


def test_probe_scores_a_known_linear_label_and_both_baselines(emb, tmp_path):
    emb_dir, _ = emb
    x, _, ids = read_embeddings(emb_dir)
    w = np.random.default_rng(1).normal(size=x.shape[1])
    values = x @ w  # a label that is exactly linear in the embeddings
    lines = ["object_id,linear,flag"]
    for k, (i, v) in enumerate(zip(ids, values)):
        if k == 3:
            continue  # an embedded galaxy the catalogue lacks
        lines.append(f"{i},{'' if k == 5 else 'nan' if k == 6 else repr(float(v))},{'yes' if v > np.median(values) else 'no'}")
    lines.append("not-embedded,1.0,yes")
    (tmp_path / "cat.csv").write_text("\n".join(lines) + "\n")
    r = probe(ProbeConfig(embeddings=emb_dir, labels=str(tmp_path / "cat.csv"), targets=["linear", "flag"],
                          out=tmp_path / "out", folds=4))
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    lin, flag = rep["targets"]["linear"], rep["targets"]["flag"]
    assert rep["rows_without_labels"] == 1
    assert lin["left_out"] == {"no_label_row": 1, "no_embedding": 0, "missing_label": 2, "non_finite_label": 0,
                               "overflowing_label": 0, "rare_class": 0}
    assert lin["task"] == "regression" and lin["n"] == 37 and flag["task"] == "classification" and flag["n"] == 39
    assert lin["scores"]["r2"] > 0.95 and lin["baselines"]["shuffled_labels"]["scores"]["r2"] < 0.5
    assert set(lin["spread"]) == {"r2", "mae", "nmad"} and set(flag["scores"]) == {"accuracy", "f1_macro"}
    assert set(lin["baselines"]) == {"random_init", "shuffled_labels"}
    assert lin["nmad_dz"] == "pred - true"
    assert (tmp_path / "out" / "linear.png").stat().st_size > 0 and (tmp_path / "out" / "flag.png").stat().st_size > 0
    assert r.report == rep
    # the random-init baseline's embeddings came from a fresh model of the same shape, same rows and pooling
    m = json.loads((tmp_path / "out" / "random-init-embeddings" / "manifest.json").read_text())
    assert m["checkpoint"]["random_init_seed"] == 0 and m["pool"] == "mean"
    assert not np.allclose(read_embeddings(tmp_path / "out" / "random-init-embeddings")[0], x)


def test_probe_reads_the_surveys_own_catalogue_columns_from_the_cli(emb, tmp_path):
    emb_dir, survey = emb
    out = subprocess.run([sys.executable, "-m", "astropt_tok", "probe", "--embeddings", str(emb_dir), "--labels",
                          str(survey), "--target", "redshift", "--target", "morphology", "--folds", "3", "--out",
                          str(tmp_path / "p"), "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "linear probes" in out.stdout and "shuffled" in out.stdout and "redshift" in out.stdout
    rep = json.loads((tmp_path / "p" / "report.json").read_text())
    assert rep["targets"]["redshift"]["n"] == 40 and rep["targets"]["redshift"]["nmad_dz"] == "(pred - true) / (1 + true)"
    assert rep["targets"]["morphology"]["task"] == "classification"


def test_nmad_and_bad_options(emb, tmp_path):
    assert nmad(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]), False) == 0.0
    assert nmad(np.array([0.2, 1.2]), np.array([0.0, 1.0]), False) < 1e-12  # dz 0.2 and 0.2
    assert abs(nmad(np.array([0.2, 1.2]), np.array([0.0, 1.0]), True) - 1.4826 * 0.05) < 1e-12  # dz/(1+z) 0.2, 0.1
    emb_dir, survey = emb
    for kwargs, message in (({"targets": ["no_such"]}, "no column 'no_such'"), ({"folds": 1}, "--folds"),
                            ({"task": "ranking"}, "--task"), ({"labels": str(tmp_path / "none.csv")}, "no parquet")):
        with pytest.raises(AstroptError, match=message):
            probe(ProbeConfig(**{"embeddings": emb_dir, "labels": str(survey), "targets": ["redshift"],
                                 "out": tmp_path / "o", **kwargs}))


def test_baseline_features_probe_the_catalogue_alone_on_the_same_rows(emb, tmp_path):
    """--baseline-features: the same probe on catalogue columns alone (and with the embeddings), the same folds and
    rows as the model's; its R² equals an independent scikit-learn fit on those rows and folds."""
    import pyarrow.parquet as pq
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from astropt_train.use.probe import ALPHAS

    emb_dir, survey = emb
    _, _, ids = read_embeddings(emb_dir)
    table = pq.read_table(sorted(Path(survey).glob("*.parquet")),
                          columns=["object_id", "redshift", "mag_r", "half_light_radius"]).to_pydict()
    at = {i: k for k, i in enumerate(table["object_id"])}
    rows = [at[i] for i in ids]
    # one galaxy lacks its size: left out of every score of the table, model's included
    table["half_light_radius"][rows[4]] = None
    import pyarrow as pa

    pq.write_table(pa.table(table), tmp_path / "cat.parquet")
    r = probe(ProbeConfig(embeddings=emb_dir, labels=str(tmp_path / "cat.parquet"), targets=["redshift"],
                          out=tmp_path / "out", folds=4, baseline_features=["mag_r", "half_light_radius"]))
    e = r.report["targets"]["redshift"]
    assert e["n"] == 39 and e["left_out"]["missing_feature"] == 1
    assert e["baselines"]["catalogue"]["features"] == ["mag_r", "half_light_radius"]
    keep = [k for k in range(len(ids)) if k != 4]
    x = np.array([[table["mag_r"][rows[k]], table["half_light_radius"][rows[k]]] for k in keep], dtype=float)
    y = np.array([table["redshift"][rows[k]] for k in keep], dtype=float)
    scores = []
    for train, test in KFold(4, shuffle=True, random_state=0).split(x):
        fit = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS)).fit(x[train], y[train])
        scores.append(r2_score(y[test], fit.predict(x[test])))
    assert e["baselines"]["catalogue"]["scores"]["r2"] == pytest.approx(np.mean(scores), abs=1e-10)
    assert set(e["model_and_catalogue"]["scores"]) == {"r2", "mae", "nmad"}
    assert "same rows" in e["same_rows"] and r.report["baseline_features"] == ["mag_r", "half_light_radius"]


def test_baseline_feature_mistakes_are_one_error_before_any_work(emb, tmp_path):
    emb_dir, survey = emb
    base = dict(embeddings=emb_dir, labels=str(survey), out=tmp_path / "out", folds=3)
    for kwargs, message in (
            ({"targets": ["redshift"], "baseline_features": ["redshift", "mag_r"]}, "also among --baseline-features"),
            ({"targets": ["redshift"], "baseline_features": ["mag_r", "mag_r"]}, "more than once"),
            ({"targets": ["redshift"], "baseline_features": ["no_such_column"]}, "no column 'no_such_column'"),
            ({"targets": ["redshift"], "baseline_features": ["morphology"]}, "not numbers"),
            ({"targets": ["redshift"], "folds": 30}, "only 40 rows have a label, too few for 30 folds"),
            # 40 rows fill 16 folds, but morphology's largest class (15 galaxies) cannot be stratified into them
            ({"targets": ["morphology"], "folds": 16}, "largest class has 15 labelled rows, fewer than 16 folds")):
        with pytest.raises(AstroptError, match=message):
            probe(ProbeConfig(**{**base, **kwargs}))
        # refused before anything was written: no report folder, no random-init embeddings
        assert not (tmp_path / "out" / "random-init-embeddings").exists()
