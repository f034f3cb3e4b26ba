"""What a newcomer meets at the command line: readable help and tables in a pipe, no stray files, fast offline
errors, and `astropt runs` comparing training runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from astropt_tok.cli import main
from astropt_tok.errors import AstroptError


@pytest.mark.parametrize("command", [[], ["tokenise"], ["fit-codec"], ["train"], ["decode"], ["demo"], ["runs"],
                                     ["embed"]])
def test_help_reads_in_an_80_column_pipe_without_type_tags(command, capsys):
    try:
        main([*command, "--help"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    text = capsys.readouterr().out
    assert "Usage: astropt" in text
    for tag in ("<bool>", "<str>", "<int>", "<float>", "<path>"):
        assert tag not in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_tables_fold_instead_of_cutting_at_80_columns():
    from rich.console import Console

    from astropt_tok.quality import reconstruction_metrics, summary_json
    from astropt_tok.report import folding_table, print_reconstruction_table

    rng = np.random.default_rng(0)
    orig = rng.normal(size=(3, 2, 96, 96))
    report = summary_json(reconstruction_metrics(orig, orig * 0.9, ["DES-G", "DES-R"]))
    console = Console(record=True, width=80)
    print_reconstruction_table(report, "t", console=console)
    table = folding_table("what", "where")
    table.add_row("stored vs original", "/a/long/folder/" * 8 + "stored_vs_original.png")
    console.print(table)
    text = console.export_text()
    assert "…" not in text and "stored_vs_origin" in text and "all-zero" in text
    assert "".join(line.strip(" │") for line in text.splitlines()).count("stored_vs_original.png") == 1


def test_save_flux_without_out_writes_no_picture_in_the_current_folder(random_store, codec_dir, tmp_path,
                                                                       monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["decode", "--tokens", str(random_store), "--rows", "0:2", "--codec", str(codec_dir), "--save-flux",
          "flux.npy", "--device", "cpu"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flux.npy"]
    assert np.load(tmp_path / "flux.npy").shape == (2, 4, 96, 96)
    assert "flux.npy" in capsys.readouterr().out


def test_unreachable_hub_is_one_quick_error_naming_the_local_alternative(monkeypatch):
    from astropt_tok.codec import resolve_codec_files
    from astropt_tok.hub import hub_unreachable_reason
    from astropt_tok.source import resolve_source

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    assert "127.0.0.1:9" in hub_unreachable_reason()
    with pytest.raises(AstroptError, match=r"cannot reach the Hugging Face hub .*--source PATH.*HF_HUB_OFFLINE=1"):
        resolve_source("someone/some-survey")
    with pytest.raises(AstroptError, match=r"cannot reach the Hugging Face hub .*--codec DIR.*HF_HUB_OFFLINE=1"):
        resolve_codec_files("someone/some-codec")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: the libraries use the HF cache, nothing is probed
    assert hub_unreachable_reason() is None


def test_runs_table_and_curves_of_two_runs(random_store, tmp_path, capsys):
    from PIL import Image

    from astropt_train.config import build_config
    from astropt_train.loop import train

    for name, steps in (("a", 4), ("b", 2)):
        train(build_config(dict(tokens=str(random_store), out=str(tmp_path / name), n_layer=1, n_head=2, n_embd=16,
                                batch_size=2, max_iters=steps, eval_interval=2, eval_iters=1, val_images=0,
                                log_interval=1, device="cpu", live=False)))
    capsys.readouterr()
    main(["runs", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "curves.png")])
    text = capsys.readouterr().out
    lines = text.splitlines()
    row_a = next(line for line in lines if line.strip("│ ").startswith("a "))
    assert "4/4" in row_a and "step-00000004" in text.replace("\n", "").replace("│", "").replace(" ", "")
    best_a = min(json.loads(x)["val_loss"] for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()
                 if "val_loss" in json.loads(x))
    assert f"{best_a:.4f}" in row_a
    assert "…" not in text
    with Image.open(tmp_path / "curves.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    with pytest.raises(SystemExit) as exit_info:
        main(["runs", str(tmp_path)])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: run {tmp_path} is not a training run (no metrics.jsonl); pass run folders written by "
        "`astropt train --out RUN`"]


def test_tables_in_a_pipe_keep_paths_and_names_whole(random_store, tmp_path):
    """Piped (not a terminal), `astropt info`'s table prints a long store path on one line, as grep needs it,
    whatever $COLUMNS an exporting shell left behind."""
    import os
    import shutil
    import subprocess
    import sys

    deep = tmp_path / ("a-rather-long-folder-name-for-a-survey-of-many-galaxies" * 2) / "tokens-of-the-survey"
    shutil.copytree(random_store, deep)
    for columns in (None, "80"):
        env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | ({"COLUMNS": columns} if columns else {})
        done = subprocess.run([sys.executable, "-m", "astropt_tok.cli", "info", str(deep)], capture_output=True,
                              text=True, env=env)
        assert done.returncode == 0, done.stderr
        assert len(str(deep)) > 160 and any(str(deep) in line for line in done.stdout.splitlines())
