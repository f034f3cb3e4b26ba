"""`astropt train`: a thin CLI over TrainConfig; TOML precedence; one-line errors; instant help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from astropt_tok.errors import AstroptError
from astropt_train.config import PRESETS, build_config, load_toml, to_toml

REPO = Path(__file__).resolve().parents[1]


def test_cli_module_imports_no_torch():
    code = ("import sys, astropt_tok.cli, astropt_train.cli_train; "
            "print([m for m in ('torch', 'aion', 'astropt_train.loop', 'astropt_train.model') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_train_help_lists_the_flags():
    out = subprocess.run([sys.executable, "-m", "astropt_tok", "train", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--tokens", "--preset", "--grad-accum", "--lr-decay-iters", "--resume", "--compile", "--workers",
                 "--val-fraction", "--log"):
        assert flag in out.stdout


def test_toml_then_flags_precedence(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('tokens = "S"\npreset = "95M"\nbatch-size = 8\nlr = 0.001\n')
    cfg = build_config({"batch_size": 4, "lr": None}, config_file=toml)
    assert (cfg.tokens, cfg.batch_size, cfg.lr, cfg.model_dims()) == ("S", 4, 0.001, (12, 12, 768))
    assert build_config({"tokens": "S", "preset": "95M", "n_layer": 3}).model_dims() == (3, 12, 768)
    assert PRESETS["tiny"] == (2, 2, 64)
    # the saved config reads back to the same config
    (tmp_path / "back.toml").write_text(to_toml(cfg))
    assert build_config(config_file=tmp_path / "back.toml") == cfg
    (tmp_path / "bad.toml").write_text("learning_rate = 1\n")
    with pytest.raises(AstroptError, match="unknown setting"):
        load_toml(tmp_path / "bad.toml")


@pytest.mark.parametrize("overrides, message", [
    ({}, "--tokens"),
    ({"tokens": "S", "preset": "huge"}, "unknown preset"),
    ({"tokens": "S", "n_head": 3, "n_embd": 64}, "multiple of n_head"),
    ({"tokens": "S", "val_fraction": 1.5}, "val-fraction"),
    ({"tokens": "S", "dtype": "fp8"}, "dtype"),
    ({"tokens": "S", "workers": -1}, "workers must be 0"),
])
def test_bad_settings_are_one_clear_error(overrides, message):
    with pytest.raises(AstroptError, match=message):
        build_config(overrides)


def test_cli_error_is_one_line_and_exit_1(tmp_path):
    out = subprocess.run([sys.executable, "-m", "astropt_tok", "train", "--tokens", str(tmp_path / "missing"),
                          "--out", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"error: token store {tmp_path / 'missing'} does not exist"]


def test_cli_trains_and_saves_the_config_it_used(tmp_path):
    from astropt_tok.store import write_store_from_arrays

    store = tmp_path / "store"
    write_store_from_arrays(store, np.random.default_rng(0).integers(0, 64, size=(24, 16)), num_shards=1,
                            codec={"id": "random", "vocab_size": 64, "tokens_per_image": 16}, bands=["DES-G"])
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "astropt_tok", "train", "--tokens", str(store), "--out", str(run),
                          "--n-layer", "1", "--n-embd", "16", "--batch-size", "4", "--max-iters", "3",
                          "--eval-iters", "1", "--val-images", "0", "--device", "cpu", "--no-compile"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "done: step 3" in out.stdout
    used = json.loads((run / "config.json").read_text())
    assert used["train"]["n_layer"] == 1 and used["train"]["compile"] is False and used["model"]["n_head"] == 2
    assert build_config(config_file=run / "train_config.toml").max_iters == 3

    again = subprocess.run([sys.executable, "-m", "astropt_tok", "train", "--config", str(run / "train_config.toml"),
                            "--resume"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "run already finished at step 3; raise --max-iters to continue" in again.stdout
    assert "nan" not in again.stdout and "0 tokens/s" not in again.stdout
    replay = (run / "train_config.toml").read_text()
    assert "resume" not in replay.replace("--resume", "")  # the saved settings replay the run as given


def test_bench_train_step_runs_on_cpu():
    out = subprocess.run([sys.executable, "benchmarks/bench_train_step.py", "--preset", "tiny", "--steps", "4",
                          "--batch-size", "2", "--device", "cpu", "--no-compile", "--dtype", "fp32"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["tokens_per_s"] > 0 and res["steps"] == 4


@pytest.mark.parametrize("command", ["tokenise", "train", "decode"])
def test_unknown_flag_is_a_usage_error_not_a_traceback(command, tmp_path):
    out = subprocess.run([sys.executable, "-m", "astropt_tok", command, "--no-such-flag"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "No such option: --no-such-flag" in out.stderr and "Traceback" not in out.stderr


def test_an_out_that_is_a_file_is_one_clear_error(tmp_path):
    from astropt_tok.store import write_store_from_arrays

    store = tmp_path / "store"
    write_store_from_arrays(store, np.random.default_rng(0).integers(0, 64, size=(24, 16)), num_shards=1,
                            codec={"id": "random", "vocab_size": 64, "tokens_per_image": 16}, bands=["DES-G"])
    (tmp_path / "taken").write_text("a file")
    out = subprocess.run([sys.executable, "-m", "astropt_tok", "train", "--tokens", str(store), "--out",
                          str(tmp_path / "taken"), "--n-layer", "1", "--n-head", "1", "--n-embd", "8",
                          "--batch-size", "4", "--max-iters", "1", "--device", "cpu", "--val-images", "0"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"error: the run folder {tmp_path / 'taken'} exists as a file, "
                                               "not a folder"]
