"""`astropt demo` end to end at a reduced size: survey, the shipped demo codec, tokenise, train, decode pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from astropt_train.use.demo import DemoConfig, print_demo_summary, run_demo


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
    # the synthetic survey has both surveys, the redshift, four fluxes and a spectrum; the demo codec their codecs
    assert store.modalities == ["legacysurvey_image", "hsc_image", "redshift", "FLUX_G", "FLUX_R", "FLUX_I", "FLUX_Z",
                                "desi_spectrum"]
    assert store.modality_kind["redshift"] == "scalar" and store.modality_kind["desi_spectrum"] == "spectrum"
    assert store.modality_tokens["redshift"] == 1 and store.modality_tokens["desi_spectrum"] == 129
    from astropt_train.checkpoint import find_checkpoint, read_config

    model = read_config(find_checkpoint(res.run))["model"]  # the images, then the redshift, weighted
    assert model["modalities"] == ["legacysurvey_image", "hsc_image", "redshift"]
    assert model["loss_weights"] == [1.0, 1.0, cfg.redshift_weight]
    # the redshift predicted from the images, scored as photo-z beside the training median and the codec ceiling
    pz = res.metrics["photo_z"]
    assert set(pz) == {"rows", "given", "model", "training_median", "codec_ceiling"} and pz["rows"] >= 1
    assert set(pz["model"]) == {"nmad", "outlier_frac", "bias", "n"} and pz["codec_ceiling"]["nmad"] < 0.01
    assert "redshift from the images (median, 68% interval) vs the truth" in res.pictures
    assert "hsc_image drawn from legacysurvey_image tokens" in res.pictures
    # the model's numbers are eval's: every held-out row, sampled ones over seeds, each beside its baselines
    evaluation = json.loads((cfg.workdir / "eval" / "eval.json").read_text())
    assert res.metrics["eval"]["rows"] == evaluation["rows"]["count"] >= 1
    assert evaluation["sampling"]["seeds"] == [0, 1, 2] and evaluation["sampling"]["top_k"] == cfg.top_k
    cross = evaluation["cross_survey"]["legacysurvey_image->hsc_image"]
    assert len(cross["explained_variance"]["per_seed"]) == 3
    hsc = {"HSC-G", "HSC-R", "HSC-I", "HSC-Z", "HSC-Y"}  # the drawn HSC images, vs the real ones, beside the ceiling
    assert set(cross["per_band_explained_variance"]) == hsc and cross["against"] == "original"
    table = res.metrics["eval"]["table"]
    assert any(r["score"] == "next-token accuracy" and "position map" in r["baselines"] for r in table)
    assert any(r["what"] == "legacysurvey_image -> hsc_image" and "±" in r["model"] and r["ceiling"] for r in table)
    assert verify_store(res.store) == []
    assert [s for s, _ in list_checkpoints(res.run)] == [6]
    for name, path in res.pictures.items():
        assert path.is_file(), name
        if path.suffix == ".png":
            with Image.open(path) as im:
                assert im.format == "PNG" and im.size[0] > 96 and im.size[1] > 96
    assert np.load(res.pictures["generated flux (.npy)"]).shape == (2, 4, 96, 96)
    assert evaluation["modalities"]["legacysurvey_image"]["completion"]["kept"] == cfg.complete_from
    summary = json.loads((cfg.workdir / "demo_summary.json").read_text())
    bands = {"DES-G", "DES-R", "DES-I", "DES-Z"}
    keys = {"mse", "explained_variance", "psnr"}
    assert set(summary["reconstruction"]) == bands and all(set(v) == keys for v in summary["reconstruction"].values())
    for name in ("zero", "image_mean"):
        assert set(summary["baselines"][name]) == bands
        assert all(set(v) == keys and np.isfinite(v["psnr"]) for v in summary["baselines"][name].values())
    assert "probes" in summary and summary["demo_codec"] is True
    assert set(summary["colours"]) == {"g-r", "r-i", "i-z"} and summary["eval"]["table"] == res.metrics["eval"]["table"]
    for b in bands:  # the shipped codec beats both baselines on the demo's own galaxies
        rec, zero, mean = (summary["reconstruction"][b], summary["baselines"]["zero"][b],
                           summary["baselines"]["image_mean"][b])
        assert rec["explained_variance"] > mean["explained_variance"] == 0.0 and rec["mse"] < zero["mse"]
    # the catalogue probes: one headline row per column, next to both baselines, and the full report
    from astropt_tok.synthetic import CATALOGUE_COLUMNS

    table = summary["probes"]["table"]
    probed = [c for c in CATALOGUE_COLUMNS if c not in ("mag_r", "half_light_radius")]  # those two: the baseline's
    assert [r["target"] for r in table] == probed
    assert all(r["random_init"] and r["shuffled_labels"] and r["catalogue"] and r["model_and_catalogue"] for r in table)
    report = json.loads((cfg.workdir / "probe" / "report.json").read_text())
    assert set(report["targets"]) == set(probed) and report["baseline_features"] == ["mag_r", "half_light_radius"]


def test_demo_summary_prints_scores_beside_baselines_in_80_columns(demo):
    from rich.console import Console

    _, res = demo
    narrow = Console(record=True, width=80)
    print_demo_summary(res, console=narrow)
    text = narrow.export_text()
    assert "untrained" not in text and "all-zero" in text and "image mean" in text and "explained var." in text
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80  # folded, never cut short
    assert "redshift from legacysurvey_image" in " ".join(text.split()) and "training median NMAD" in " ".join(text.split())
    wide = Console(record=True, width=400)
    print_demo_summary(res, console=wide)
    text = wide.export_text()
    for path in res.pictures.values():
        assert str(path) in text
    assert "linear probes of the catalogue" in text and "morphology" in text
    assert "held-out rows" in text and "position map" in text and "seeds" in text  # eval's scores, with baselines


def test_shipped_demo_codec_reconstructs_held_out_galaxies():
    """The demo codec explains >= 70% of the pixel variance in every Legacy Survey band, and >= 65% in every HSC
    band, of galaxies it was not fitted to (both views of the demo survey's first 32)."""
    from astropt_tok.codec import demo_codec_dir, load_image_codec
    from astropt_tok.fit_codec import round_trip
    from astropt_tok.quality import center_crop, reconstruction_metrics
    from astropt_tok.synthetic import DEFAULT_BANDS, HSC_BANDS, galaxy_flux, hsc_flux

    loaded = load_image_codec(str(demo_codec_dir()))
    views = {"legacysurvey": (np.stack([center_crop(galaxy_flux(np.random.default_rng([0, row]), 4), 96)
                                        for row in range(32)]), list(DEFAULT_BANDS), 0.70),
             "hsc": (np.stack([center_crop(hsc_flux(0, row)[0], 96) for row in range(32)]), list(HSC_BANDS), 0.65)}
    for name, (flux, bands, floor) in views.items():
        m = reconstruction_metrics(flux, round_trip(loaded.codec, flux, bands), bands)
        ev = {b: v["explained_variance"] for b, v in m["per_band"].items()}
        assert min(ev.values()) >= floor, (name, ev)


def test_demo_reuses_its_cached_survey_and_uses_the_shipped_codec(demo):
    from astropt_tok.codec import demo_codec_dir

    cfg, res = demo
    before = {p: p.stat().st_mtime_ns for p in (cfg.workdir / "survey").glob("*.parquet")}
    from astropt_train.use.demo import prepare_codec, prepare_survey

    assert prepare_survey(cfg) == res.survey and prepare_codec(cfg) == res.codec == str(demo_codec_dir())
    assert {p: p.stat().st_mtime_ns for p in (cfg.workdir / "survey").glob("*.parquet")} == before


def test_fresh_deletes_only_the_demos_own_outputs(tmp_path):
    from astropt_train.use.demo import clean_workdir

    work = tmp_path / "w"
    (work / "run").mkdir(parents=True)
    (work / "run" / "old.txt").write_text("old")
    (work / "demo-summary.json").write_text("{}")
    (work / "demo_summary.json").write_text("{}")
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


def test_demo_on_a_source_whose_every_row_is_rejected_is_one_error(tmp_path):
    """A --source without the demo's bands: tokenise rejects every row, and the demo stops there with the reason."""
    from astropt_tok.errors import AstroptError
    from astropt_tok.synthetic import write_synthetic_survey

    write_synthetic_survey(tmp_path / "two-bands", n_rows=4, n_files=1, bands=("DES-G", "DES-R"), with_hsc=False)
    with pytest.raises(AstroptError, match="every one of the 4 source rows was rejected"):
        run_demo(DemoConfig(workdir=tmp_path / "w", source=str(tmp_path / "two-bands"), device="cpu", progress=False,
                            shards=1))
    assert not (tmp_path / "w" / "run").exists()


def test_demo_catalogue_needs_the_column_and_its_codec(survey_dir, codec_dir, tmp_path):
    """The demo tokenises a catalogue column only where the survey has it (of the right type) and the codec
    folder has its codec; --no-catalogue none at all."""
    from astropt_tok.codec import demo_codec_dir
    from astropt_train.use.demo import DEMO_SCALARS, catalogue_columns

    demo_codec = str(demo_codec_dir())
    # the test survey has redshift and fluxes but no spectrum; the shipped codec has every codec
    scalars, spectra = catalogue_columns(DemoConfig(workdir=tmp_path), str(survey_dir), demo_codec)
    assert scalars == DEMO_SCALARS and spectra == ()
    assert catalogue_columns(DemoConfig(workdir=tmp_path), str(survey_dir), str(codec_dir)) == ((), ())  # no codecs/Z
    assert catalogue_columns(DemoConfig(workdir=tmp_path, catalogue=False), str(survey_dir), demo_codec) == ((), ())
    from astropt_tok.errors import AstroptError

    with pytest.raises(AstroptError, match="--redshift-weight must be a positive number"):
        run_demo(DemoConfig(workdir=tmp_path / "w", redshift_weight=0, progress=False))
