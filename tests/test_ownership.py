"""Ownership: a command writes into, clears or replaces only a folder that is new, empty, or holds its own kind
of artifact; `--overwrite`/`--fresh` never remove another kind, nor anything no command made.

The matrix: every command that writes a folder (tokenise, train, embed, fit-codec, export, demo, probe) is given
each other kind of folder as its output (a token store, a run, one of its checkpoints, an embeddings store, a
codec, an export, a demo folder, a probe report, a folder of the user's own files), without and with its replace flag: exactly one
`error:` line, exit 1, and every file of the foreign folder byte-for-byte as it was. Every artifact is made once,
by the real commands, for the whole module.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from astropt_tok import artifacts as art
from astropt_tok.errors import AstroptError


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`astropt ARGV` in this process (the real command line, its one-line errors): (exit code, stdout, stderr)."""
    from astropt_tok.cli import main

    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict[str, str]:
    """Every file (sha256) and folder under `folder`, hidden ones and the lock included."""
    found = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        found[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return found


def unlocked(folder: Path) -> dict[str, str]:
    """`snapshot` without lock files (a command refused in its own kind of folder held the lock meanwhile)."""
    return {k: v for k, v in snapshot(folder).items() if Path(k).name != art.LOCK_FILE}


@pytest.fixture(scope="module")
def made(tmp_path_factory, survey_dir, codec_dir):
    """One folder of every kind, each made by its own command, and a folder of the user's own files."""
    from astropt_tok.tokenise import TokeniseConfig, tokenise
    from astropt_train.config import TrainConfig
    from astropt_train.loop import train
    from astropt_train.use.embed import EmbedConfig, embed
    from astropt_train.use.interop import export_astropt
    from astropt_train.use.probe import ProbeConfig, probe

    base = tmp_path_factory.mktemp("ownership")
    f = {}
    f["codec"] = base / "codec"
    shutil.copytree(codec_dir, f["codec"])
    art.claim_output(f["codec"], "codec", "`astropt fit-codec`")  # a shipped-style codec, recorded as fit-codec's
    f["token-store"] = base / "tokens"
    tokenise(TokeniseConfig(source=str(survey_dir), out=str(f["token-store"]), shards=2, codec=str(codec_dir),
                            limit=12, batch_size=16, device="cpu", progress=False))
    f["run"] = base / "run"
    train(TrainConfig(tokens=str(f["token-store"]), out=str(f["run"]), preset="tiny", max_iters=2, batch_size=2,
                      eval_interval=2, eval_iters=1, val_images=0, device="cpu", live=False, log_interval=1,
                      checkpoint_interval=1))  # two checkpoints: two sets of weights
    from astropt_train.checkpoint import list_checkpoints

    f["checkpoint"] = list_checkpoints(f["run"])[-1][1]  # RUN/checkpoints/step-N: the run's own
    f["embeddings"] = base / "emb"
    embed(EmbedConfig(checkpoint=f["run"], out=f["embeddings"], device="cpu", progress=False))
    f["export"] = base / "export"
    export_astropt(f["run"], f["export"])
    f["probe-report"] = base / "probe"
    probe(ProbeConfig(embeddings=f["embeddings"], labels=str(survey_dir), targets=["redshift"], folds=2,
                      out=f["probe-report"], device="cpu"))
    from astropt_train.use.evaluate import EvalConfig, run_eval

    f["eval-report"] = base / "eval"
    run_eval(EvalConfig(checkpoint=f["run"], out=f["eval-report"], images=False, device="cpu"))
    f["demo"] = base / "demo"  # a demo folder as the demo leaves it (the demo itself runs in the tests below)
    art.claim_output(f["demo"], "demo", "`astropt demo`")
    (f["demo"] / "pictures").mkdir()
    (f["demo"] / "pictures" / "generated.png").write_bytes(b"\x89PNG picture")
    (f["demo"] / "demo_summary.json").write_text(json.dumps({"reconstruction": {}}))
    f["user"] = base / "mine"
    (f["user"] / "chapter-1").mkdir(parents=True)
    (f["user"] / "thesis.tex").write_text("years of work")
    (f["user"] / "chapter-1" / "figure.pdf").write_bytes(b"%PDF figure")
    for name, folder in f.items():
        assert name == "user" or art.identify(folder) == name, name
    return {"folders": f, "survey": survey_dir, "codec": codec_dir, "base": base}


# command -> (its kind, argv builder given the output folder, its replace flag)
COMMANDS = {
    "tokenise": ("token-store", lambda m, out: ["tokenise", "--source", str(m["survey"]), "--out", str(out),
                                                "--shards", "2", "--codec", str(m["codec"]), "--limit", "12",
                                                "--device", "cpu", "--no-progress"], "--overwrite"),
    "train": ("run", lambda m, out: ["train", "--tokens", str(m["folders"]["token-store"]), "--out", str(out),
                                     "--preset", "tiny", "--max-iters", "1", "--batch-size", "2", "--val-images", "0",
                                     "--device", "cpu"], "--resume"),  # train replaces nothing: --resume continues
    "embed": ("embeddings", lambda m, out: ["embed", "--checkpoint", str(m["folders"]["run"]), "--out", str(out),
                                            "--device", "cpu"], "--overwrite"),
    "fit-codec": ("codec", lambda m, out: ["fit-codec", "--source", str(m["survey"]), "--out", str(out), "--steps",
                                           "1", "--limit", "8", "--hidden", "4", "--device", "cpu", "--no-progress"],
                  "--overwrite"),
    "export": ("export", lambda m, out: ["export", str(m["folders"]["run"]), "--astropt", str(out)], "--overwrite"),
    "demo": ("demo", lambda m, out: ["demo", "--workdir", str(out), "--rows", "10", "--steps", "1", "--device", "cpu",
                                     "--no-cross-survey"], "--fresh"),
    "probe": ("probe-report", lambda m, out: ["probe", "--embeddings", str(m["folders"]["embeddings"]), "--labels",
                                              str(m["survey"]), "--target", "redshift", "--folds", "2", "--out",
                                              str(out), "--device", "cpu"], "--overwrite"),
    "eval": ("eval-report", lambda m, out: ["eval", "--checkpoint", str(m["folders"]["run"]), "--out", str(out),
                                            "--no-images", "--device", "cpu"], "--overwrite"),
}
FOLDERS = sorted(art.KINDS) + ["user"]
CASES = [(cmd, folder) for cmd in COMMANDS for folder in FOLDERS if folder != COMMANDS[cmd][0]]


@pytest.mark.parametrize("replace", [False, True], ids=["plain", "replace-flag"])
@pytest.mark.parametrize("command, foreign", CASES)
def test_no_command_writes_into_a_folder_it_does_not_own(made, command, foreign, replace, capsys):
    folder = made["folders"][foreign]
    before = snapshot(folder)
    _, argv, flag = COMMANDS[command]
    code, _, err = run_cli(argv(made, folder) + ([flag] if replace else []), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert str(folder) in lines[0]
    assert snapshot(folder) == before  # not a byte changed, not a file (nor a lock) added


# --- same kind, other inputs: replaced only with the command's replace flag


def test_fit_codec_onto_an_existing_codec_needs_overwrite(made, tmp_path, capsys):
    codec = tmp_path / "codec"
    shutil.copytree(made["codec"], codec)  # a codec made before records existed, found by its files
    (codec / "notes.txt").write_text("mine")
    before = snapshot(codec)
    argv = COMMANDS["fit-codec"][1](made, codec)
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and "already holds a fitted codec; pass --overwrite" in err and err.count("\n") == 1
    assert {k: v for k, v in snapshot(codec).items() if k not in (art.RECORD, art.LOCK_FILE)} == before
    code, out, err = run_cli(argv + ["--overwrite"], capsys)
    assert code == 0, err
    assert (codec / "notes.txt").read_text() == "mine"  # not the codec's: kept
    assert (codec / "fit_report.json").is_file() and before["codecs/image/model.safetensors"] != \
        snapshot(codec)["codecs/image/model.safetensors"]
    rec = art.read_record(codec)
    assert rec["kind"] == "codec" and len(rec["lineage"]["weights_sha256"]) == 64
    assert rec["lineage"]["columns"] == {"legacysurvey_image": ["DES-G", "DES-R", "DES-I", "DES-Z"]}


def test_export_of_another_checkpoint_needs_overwrite(made, tmp_path, capsys):
    from astropt_train.checkpoint import list_checkpoints

    export = tmp_path / "export"
    code, _, err = run_cli(["export", str(made["folders"]["run"]), "--astropt", str(export)], capsys)
    assert code == 0, err
    code, _, err = run_cli(["export", str(made["folders"]["run"]), "--astropt", str(export)], capsys)
    assert code == 0, err  # the same weights again: rewritten
    other = list_checkpoints(made["folders"]["run"])[0][1]  # the run's other checkpoint: other weights
    before = unlocked(export)
    code, _, err = run_cli(["export", str(other), "--astropt", str(export)], capsys)
    assert code == 1 and "export of another checkpoint" in err and unlocked(export) == before
    code, _, err = run_cli(["export", str(other), "--astropt", str(export), "--overwrite"], capsys)
    assert code == 0, err
    assert art.read_record(export)["lineage"]["checkpoint"]["path"] == str(other.resolve())


def test_probe_of_other_embeddings_needs_overwrite(made, tmp_path, capsys):
    argv = COMMANDS["probe"][1](made, tmp_path / "p")
    assert run_cli(argv, capsys)[0] == 0
    other_targets = [a if a != "redshift" else "mag_r" for a in argv]
    assert run_cli(other_targets, capsys)[0] == 0  # the same embeddings: rewritten
    assert sorted(p.name for p in (tmp_path / "p").glob("*.png")) == ["mag_r.png"]  # redshift's picture went
    emb = tmp_path / "emb"
    shutil.copytree(made["folders"]["embeddings"], emb)
    other = [a if a != str(made["folders"]["embeddings"]) else str(emb) for a in argv]
    before = unlocked(tmp_path / "p")
    code, _, err = run_cli(other, capsys)
    assert code == 1 and "probe report of other embeddings" in err
    assert unlocked(tmp_path / "p") == before
    code, _, err = run_cli(other + ["--overwrite"], capsys)
    assert code == 0, err
    assert art.read_record(tmp_path / "p")["lineage"]["embeddings"]["dir"] == str(emb.resolve())


def test_reruns_into_a_commands_own_folder_carry_on(made, tmp_path, capsys):
    store = made["folders"]["token-store"]
    rec = art.read_record(store)
    assert rec["lineage"]["codec"]["vocab_size"] == 4375 and rec["lineage"]["id_column"] == "object_id"
    assert rec["lineage"]["modalities"] == {"legacysurvey_image": ["DES-G", "DES-R", "DES-I", "DES-Z"]}
    copy = tmp_path / "tokens"
    shutil.copytree(store, copy)
    code, _, err = run_cli(COMMANDS["tokenise"][1](made, copy), capsys)
    assert code == 0, err  # every shard done: nothing to redo
    code, _, err = run_cli([a if a != "12" else "10" for a in COMMANDS["tokenise"][1](made, copy)] + ["--overwrite"],
                           capsys)
    assert code == 0, err
    assert json.loads((copy / "manifest.json").read_text())["totals"]["rows"] + \
        json.loads((copy / "manifest.json").read_text())["totals"]["rejected"] == 10
    run_rec = art.read_record(made["folders"]["run"])["lineage"]
    assert run_rec["store"]["dir"] == str(store.resolve()) and len(run_rec["store"]["manifest_sha256"]) == 64
    emb_rec = art.read_record(made["folders"]["embeddings"])["lineage"]
    assert emb_rec["checkpoint"]["weights_sha256"] and emb_rec["store"]["manifest_sha256"] == \
        run_rec["store"]["manifest_sha256"]
    probe_rec = art.read_record(made["folders"]["probe-report"])["lineage"]
    assert probe_rec["embeddings"]["dir"] == str(made["folders"]["embeddings"].resolve())


def test_a_record_alone_is_an_empty_folder(tmp_path):
    """A command that claimed a folder and failed before writing leaves only its record: any command may use it."""
    art.claim_output(tmp_path / "f", "embeddings", "`astropt embed`")
    assert art.claim_output(tmp_path / "f", "token-store", "`astropt tokenise`") is False
    assert art.read_record(tmp_path / "f")["kind"] == "token-store"
    assert art.claim_output(tmp_path / "f", "token-store", "`astropt tokenise`") is False  # still holds nothing


# --- file outputs


def test_file_outputs_never_land_among_an_artifacts_files(made, capsys):
    run = made["folders"]["run"]
    before = snapshot(run)
    for argv in (["decode", "--tokens", str(made["folders"]["token-store"]), "--rows", "0:2", "--save-flux",
                  str(run / "checkpoints" / "flux.npy")],
                 ["decode", "--tokens", str(made["folders"]["token-store"]), "--rows", "0:2", "--out",
                  str(run / "loss_curve.png")],
                 ["decode", "--tokens", str(made["folders"]["token-store"]), "--rows", "0:2", "--out",
                  str(made["folders"]["demo"] / "pictures" / "generated.png")],
                 ["runs", str(run), "--out", str(made["folders"]["token-store"] / "curves.png")]):
        code, _, err = run_cli(argv, capsys)
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and "lies inside" in err, err
    assert snapshot(run) == before


def test_a_file_output_that_is_a_folder_is_one_error(made, tmp_path, capsys):
    (tmp_path / "grid.png").mkdir()
    (tmp_path / "grid.png" / "keep").write_text("x")
    code, _, err = run_cli(["decode", "--tokens", str(made["folders"]["token-store"]), "--rows", "0:2", "--out",
                            str(tmp_path / "grid.png")], capsys)
    assert code == 1 and "is a folder" in err and (tmp_path / "grid.png" / "keep").read_text() == "x"


def test_a_failed_save_flux_keeps_the_earlier_file(made, tmp_path, capsys):
    """`decode --save-flux f.npy` whose write fails (a file-size limit, as a full disk) leaves the earlier f.npy."""
    import resource
    import signal
    import subprocess
    import sys

    path = tmp_path / "flux.npy"
    argv = ["decode", "--tokens", str(made["folders"]["token-store"]), "--rows", "0:2", "--save-flux", str(path),
            "--device", "cpu"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    before = path.read_bytes()

    def small_files():  # the flux (295 kB) no longer fits; EFBIG instead of SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    again = subprocess.run([sys.executable, "-m", "astropt_tok"] + argv, capture_output=True, text=True,
                           timeout=300, preexec_fn=small_files, cwd=Path(__file__).resolve().parents[1])
    assert again.returncode == 1 and again.stderr.startswith("error: cannot write") and "flux.npy" in again.stderr
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["flux.npy"]


# --- the demo


def test_the_demo_keeps_its_inputs_and_never_replaces_a_users_store(made, tmp_path, capsys):
    from astropt_train.use.demo import DemoConfig, run_demo

    work = tmp_path / "w"
    shutil.copytree(made["survey"], work / "my-survey")  # the user keeps the survey under the work folder
    cfg = DemoConfig(workdir=work, source=str(work / "my-survey"), limit=8, steps=1, show=1, score_rows=2, shards=1,
                     batch_size=2,
                     device="cpu", progress=False, cross_survey=False, complete_from=572)
    run_demo(cfg)
    survey = snapshot(work / "my-survey")
    assert art.read_record(work)["kind"] == "demo"
    for name, kind in (("tokens", "token-store"), ("run", "run")):
        rec = art.read_record(work / name)
        assert rec["kind"] == kind and rec["command"] == "`astropt demo`"  # made by the demo: its to replace
    (work / "notes.txt").write_text("mine")
    run_demo(DemoConfig(**{**cfg.__dict__, "fresh": True}))  # --fresh: the demo's own outputs again, not its input
    assert snapshot(work / "my-survey") == survey and (work / "notes.txt").read_text() == "mine"
    assert (work / "tokens" / "manifest.json").is_file()
    # a store the user made at W/tokens is never replaced, with or without --fresh
    shutil.rmtree(work / "tokens")
    code, _, err = run_cli(COMMANDS["tokenise"][1](made, work / "tokens"), capsys)
    assert code == 0, err
    before = unlocked(work)  # W is the demo's: it locks it while it checks
    for fresh in ([], ["--fresh"]):
        code, _, err = run_cli(["demo", "--workdir", str(work), "--source", str(work / "my-survey"), "--limit", "8",
                                "--steps", "1", "--device", "cpu", "--no-cross-survey"] + fresh, capsys)
        assert code == 1 and "made by `astropt tokenise`, not" in err and err.count("\n") == 1, err
        assert unlocked(work) == before


def test_the_demo_refuses_a_workdir_of_the_users_own_tokens_and_inputs_it_would_clear(made, tmp_path, capsys):
    work = tmp_path / "w"
    shutil.copytree(made["folders"]["token-store"], work / "tokens")
    before = snapshot(work)
    code, _, err = run_cli(COMMANDS["demo"][1](made, work) + ["--fresh"], capsys)
    assert code == 1 and "is not empty" in err and snapshot(work) == before
    # an input inside what the demo rewrites, or the work folder itself as the input
    for source in (work / "tokens", work):
        code, _, err = run_cli(COMMANDS["demo"][1](made, work) + ["--source", str(source)], capsys)
        assert code == 1 and err.count("\n") == 1 and ("lies inside" in err or "itself" in err), err
    assert snapshot(work) == before


def test_nested_locks_are_separate_files(made, tmp_path):
    """The demo holds W's lock; its tokenise, train and embed lock their own folders inside W."""
    from astropt_tok.lock import folder_lock

    work = tmp_path / "w"
    with art.output_folder(work, "demo", "`astropt demo`", "--workdir"):
        art.claim_part(work / "tokens", "token-store", "`astropt demo`", "--workdir")
        with art.output_folder(work / "tokens", "token-store", "`astropt tokenise`"):
            with pytest.raises(AstroptError, match="in use by another"):
                with folder_lock(work, "`astropt demo`"):
                    pass
    assert (work / art.LOCK_FILE).is_file() and (work / "tokens" / art.LOCK_FILE).is_file()
    assert art.read_record(work / "tokens")["command"] == "`astropt demo`"  # the inner command keeps the maker
