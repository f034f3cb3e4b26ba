"""`astropt demo` end to end at a reduced size: survey, untrained codec, tokenise, train, decode pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from astropt_train.use.demo import UNTRAINED_NOTE, DemoConfig, print_demo_summary, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    cfg = DemoConfig(workdir=tmp_path_factory.mktemp("demo") / "work", rows=24, steps=6, show=2, shards=2,
                     device="cpu", progress=False)
    return cfg, run_demo(cfg)


def test_demo_runs_every_stage_and_writes_pictures(demo):
    from PIL import Image

    from astropt_tok.store import TokenStore, verify_store
    from astropt_train.checkpoint import list_checkpoints

    cfg, res = demo
    store = TokenStore(res.store)
    assert store.num_rows == 24 and store.vocab_size == 4375 and store.tokens_per_image == 576
    assert store.modalities == ["legacysurvey_image", "hsc_image"]  # the synthetic survey has both
    assert "hsc_image drawn from legacysurvey_image tokens" in res.pictures
    assert 0 <= res.metrics["cross_survey"]["token_agreement"] <= 1
    assert verify_store(res.store) == []
    assert [s for s, _ in list_checkpoints(res.run)] == [6]
    for name, path in res.pictures.items():
        assert path.is_file(), name
        if path.suffix == ".png":
            with Image.open(path) as im:
                assert im.format == "PNG" and im.size[0] > 96 and im.size[1] > 96
    assert np.load(res.pictures["generated flux (.npy)"]).shape == (2, 4, 96, 96)
    assert set(res.metrics["reconstruction"]) == {"DES-G", "DES-R", "DES-I", "DES-Z"}
    assert all(np.isfinite(v["psnr"]) for v in res.metrics["reconstruction"].values())
    assert res.metrics["completion"]["kept"] == cfg.complete_from
    summary = json.loads((cfg.workdir / "demo-summary.json").read_text())
    assert summary["untrained_codec"] is True and "untrained" in summary["note"]
    # the catalogue probes: one headline row per column, next to both baselines, and the full report
    from astropt_tok.synthetic import CATALOGUE_COLUMNS

    table = summary["metrics"]["probe"]["table"]
    assert [r["target"] for r in table] == list(CATALOGUE_COLUMNS)
    assert all(r["random_init"] and r["shuffled_labels"] for r in table)
    assert set(json.loads((cfg.workdir / "probe" / "report.json").read_text())["targets"]) == set(CATALOGUE_COLUMNS)


def test_demo_says_plainly_that_its_codec_is_untrained(demo):
    from rich.console import Console

    _, res = demo
    console = Console(record=True, width=200)
    print_demo_summary(res, console=console)
    text = console.export_text()
    assert "untrained" in UNTRAINED_NOTE and "randomly initialised (untrained)" in text
    for path in res.pictures.values():
        assert str(path) in text
    assert "linear probes of the catalogue" in text and "morphology" in text


def test_demo_reuses_its_cached_survey_and_codec(demo):
    cfg, res = demo
    before = {p: p.stat().st_mtime_ns for p in (cfg.workdir / "survey").glob("*.parquet")}
    codec_weights = cfg.workdir / "codec" / "codecs" / "image" / "model.safetensors"
    codec_before = codec_weights.stat().st_mtime_ns
    from astropt_train.use.demo import prepare_codec, prepare_survey

    assert prepare_survey(cfg) == res.survey and prepare_codec(cfg) == res.codec
    assert {p: p.stat().st_mtime_ns for p in (cfg.workdir / "survey").glob("*.parquet")} == before
    assert codec_weights.stat().st_mtime_ns == codec_before


def test_fresh_deletes_only_the_demos_own_outputs(tmp_path):
    from astropt_train.use.demo import clean_workdir

    work = tmp_path / "w"
    (work / "run").mkdir(parents=True)
    (work / "run" / "old.txt").write_text("old")
    (work / "demo-summary.json").write_text("{}")
    (work / "mine.txt").write_text("keep me")
    clean_workdir(work)
    assert sorted(p.name for p in work.iterdir()) == ["mine.txt"]


def test_demo_refuses_bad_sizes(tmp_path):
    from astropt_tok.errors import AstroptError

    with pytest.raises(AstroptError, match="--steps"):
        run_demo(DemoConfig(workdir=tmp_path / "w", steps=0, progress=False))
    with pytest.raises(AstroptError, match="--threads must be 0"):
        run_demo(DemoConfig(workdir=tmp_path / "w", cpu_threads=-1, progress=False))
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(AstroptError, match="the demo folder .* exists as a file, not a folder"):
        run_demo(DemoConfig(workdir=tmp_path / "taken", progress=False))
    assert (tmp_path / "taken").read_text() == "a file"
