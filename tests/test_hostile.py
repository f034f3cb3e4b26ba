"""Hostile input, damaged files and faults: every one is a single `error:` line and a non-zero exit, never a
traceback, and nothing is lost or marked complete.

The CLI runs in this process (`astropt_tok.cli.main(argv)`), so each case costs milliseconds to seconds.
I/O faults are real conditions, not mocks: a file-size limit (RLIMIT_FSIZE gives EFBIG), a full or read-only
tmpfs (root only: mounted for the test), and a folder without write permission (for root, a child process
without CAP_DAC_OVERRIDE, through util-linux's setpriv).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from astropt_tok.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `astropt ARGV` run in this process."""
    capsys.readouterr()
    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(code: int, err: str, *names: str) -> str:
    """A non-zero exit and exactly one stderr line, `error: ...`, naming each of `names`."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def tree_digest(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` but the lock file (to show nothing changed)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".astropt.lock"}


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


# ---------------------------------------------------------------------------------------------------------
# fixtures: one real store and one real run, copied by the tests that damage them


@pytest.fixture(scope="module")
def made_store(tmp_path_factory, survey_dir, codec_dir):
    """A complete store of the 40-row survey in 2 arrow shards of 20 rows, and the tokenise argv that made it."""
    from astropt_tok.tokenise import TokeniseConfig, tokenise

    out = tmp_path_factory.mktemp("hostile") / "store"
    tokenise(TokeniseConfig(source=str(survey_dir), out=str(out), shards=2, codec=str(codec_dir), batch_size=20,
                            device="cpu", progress=False))
    argv = ["tokenise", "--source", survey_dir, "--shards", "2", "--codec", codec_dir, "--batch-size", "20",
            "--device", "cpu", "--no-progress"]
    return out, argv


@pytest.fixture
def store(made_store, tmp_path):
    """A private copy of the complete store."""
    copy = tmp_path / "store"
    shutil.copytree(made_store[0], copy)
    return copy


def train_argv(tokens, out, *extra):
    return ["train", "--tokens", tokens, "--out", out, "--device", "cpu", "--max-iters", "2", "--batch-size", "4",
            "--eval-interval", "2", "--eval-iters", "1", "--log-interval", "1", "--val-images", "0", *extra]


@pytest.fixture(scope="module")
def made_run(made_store, tmp_path_factory):
    """A run folder with one checkpoint (step 2) trained on the store."""
    from astropt_train.config import build_config
    from astropt_train.loop import train

    run = tmp_path_factory.mktemp("hostile-run") / "run"
    train(build_config(dict(tokens=str(made_store[0]), out=str(run), device="cpu", max_iters=2, batch_size=4,
                            eval_interval=2, eval_iters=1, log_interval=1, val_images=0, live=False)))
    return run


@pytest.fixture
def run(made_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(made_run, copy)
    return copy


def edit_manifest(store: Path, change) -> None:
    path = store / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------------------------
# flag and config values: checked for type, range and finiteness before any work


@pytest.mark.parametrize("argv, names", [
    (["train", "--tokens", "x", "--lr", "nan"], ["lr", "nan"]),
    (["train", "--tokens", "x", "--lr", "inf"], ["lr", "inf"]),
    (["train", "--tokens", "x", "--min-lr", "nan"], ["min-lr"]),
    (["train", "--tokens", "x", "--weight-decay", "-1"], ["weight-decay"]),
    (["train", "--tokens", "x", "--weight-decay", "inf"], ["weight-decay"]),
    (["train", "--tokens", "x", "--val-fraction", "nan"], ["val-fraction"]),
    (["train", "--tokens", "x", "--batch-size", "0"], ["batch-size"]),
    (["train", "--tokens", "x", "--seed", "-1"], ["seed"]),
    (["decode", "--tokens", "x", "--rows", "0", "--temperature", "nan"], ["temperature"]),
    (["decode", "--tokens", "x", "--rows", "0", "--temperature", "-1"], ["temperature"]),
    (["decode", "--tokens", "x", "--rows", "0", "--top-k", "0"], ["top-k"]),
    (["decode", "--tokens", "x", "--rows", "0", "--seed", "-1"], ["seed"]),
    (["decode", "--tokens", "x", "--checkpoint", "x", "--generate", "0"], ["generate"]),
])
def test_bad_flag_values_are_one_error(argv, names, capsys, tmp_path):
    code, _, err = run_cli(argv, capsys)
    assert_one_error(code, err, *names)


@pytest.mark.parametrize("text, names", [
    ('lr = "fast"\n', ["lr", "fast"]),
    ("dropout = 1.5\n", ["dropout"]),
    ("lr = nan\n", ["lr", "nan"]),
    ('compile = "yes"\n', ["compile"]),
    ("batch_size = 2.5\n", ["batch-size"]),
    ("tokens = 5\n", ["tokens"]),
    ("no_such_setting = 1\n", ["no_such_setting"]),
    ("lr = [[[\n", ["unreadable"]),
    (b"\xff\xfe\x00", ["unreadable"]),
])
def test_bad_toml_values_are_one_error_naming_the_file(text, names, capsys, tmp_path):
    config = tmp_path / "train.toml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, _, err = run_cli(["train", "--config", config, "--out", tmp_path / "run"], capsys)
    assert_one_error(code, err, str(config), *names)
    assert not (tmp_path / "run").exists()


def test_repeated_band_is_refused_before_anything_is_written(made_store, capsys, tmp_path):
    argv = made_store[1] + ["--out", tmp_path / "store", "--bands", "DES-G,DES-G,DES-I,DES-Z"]
    code, _, err = run_cli(argv, capsys)
    assert_one_error(code, err, "DES-G", "more than once")
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------------------------------------------------
# damaged files the tools read


MANIFEST_DAMAGE = {
    "missing vocab_size": (lambda m: m.pop("vocab_size"), "vocab_size"),
    "bands not a list": (lambda m: m.update(bands="DES-G"), "bands"),
    "num_shards a string": (lambda m: m["sharding"].update(num_shards="2"), "num_shards"),
    "shard file outside the store": (lambda m: m["shards"][0].update(file="../../elsewhere.arrow"), "shards[0].file"),
    "shard bytes missing": (lambda m: m["shards"][1].pop("bytes"), "bytes"),
    "no shard list": (lambda m: m.pop("shards"), "shards"),
}


@pytest.mark.parametrize("command", ["info", "verify", "train", "decode"])
@pytest.mark.parametrize("damage", [*MANIFEST_DAMAGE, "truncated"])
def test_damaged_manifest_is_one_error_naming_it(store, damage, command, capsys, tmp_path):
    if damage == "truncated":
        text = (store / "manifest.json").read_text()
        (store / "manifest.json").write_text(text[: len(text) // 2])
        names = ["manifest.json", "not JSON"]
    else:
        change, what = MANIFEST_DAMAGE[damage]
        edit_manifest(store, change)
        names = ["manifest.json", what]
    argv = {"info": ["info", store], "verify": ["verify", store],
            "train": train_argv(store, tmp_path / "run"),
            "decode": ["decode", "--tokens", store, "--rows", "0", "--out", tmp_path / "out.png"]}[command]
    code, _, err = run_cli(argv, capsys)
    if command == "verify":  # verify reports what the readers refuse as a BAD line
        assert code == 1 and err.startswith("BAD manifest.json: ") and len(err.splitlines()) == 1, err
        assert all(name in err for name in names), err
    else:
        assert_one_error(code, err, *names)
    assert not (tmp_path / "run").exists() and not (tmp_path / "out.png").exists()


def test_damaged_done_record_means_the_shard_is_redone(made_store, store, capsys):
    edit_manifest(store, lambda m: (m.update(complete=False), m.pop("shards"), m.pop("totals")))
    (store / ".done" / "shard-00001.json").write_text('{"shard": {"index": 1, "file": "shard-0')
    code, out, err = run_cli(made_store[1] + ["--out", store], capsys)
    assert code == 0, err
    assert "1 already done" in out
    assert tree_digest(store)["shard-00001.arrow"] == tree_digest(made_store[0])["shard-00001.arrow"]
    assert json.loads((store / "manifest.json").read_text())["complete"]


CHECKPOINT_DAMAGE = {
    "weights truncated": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:1000]), "model.safetensors"),
    "weights garbage": ("model.safetensors", lambda p: p.write_bytes(b"\x00" * 64), "model.safetensors"),
    "trainer state truncated": ("trainer_state.pt", lambda p: p.write_bytes(p.read_bytes()[:300]),
                                "trainer_state.pt"),
    "config without model": ("config.json", lambda p: p.write_text(json.dumps(
        {k: v for k, v in json.loads(p.read_text()).items() if k != "model"})), "config.json"),
    "config not json": ("config.json", lambda p: p.write_text("{"), "config.json"),
    "config model of strings": ("config.json", lambda p: p.write_text(json.dumps(
        {**json.loads(p.read_text()), "model": {"n_layer": "two"}})), "config.json"),
}


@pytest.mark.parametrize("command", ["train --resume", "decode"])
@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_damaged_checkpoint_is_one_error_and_left_as_it_was(made_store, run, damage, command, capsys, tmp_path):
    name, change, what = CHECKPOINT_DAMAGE[damage]
    if command == "decode" and name == "trainer_state.pt":
        pytest.skip("decode never reads the trainer state")
    ckpt = next((run / "checkpoints").glob("step-*"))
    change(ckpt / name)
    before = tree_digest(run / "checkpoints")
    argv = (train_argv(made_store[0], run, "--resume", "--max-iters", "4") if command.startswith("train") else
            ["decode", "--checkpoint", run, "--generate", "1", "--tokens", made_store[0], "--out", tmp_path / "g.png"])
    code, _, err = run_cli(argv, capsys)
    assert_one_error(code, err, what)
    assert tree_digest(run / "checkpoints") == before
    assert not (tmp_path / "g.png").exists()


# ---------------------------------------------------------------------------------------------------------
# a store knows what it holds


def test_source_fingerprints_tell_files_apart(survey_dir, tmp_path):
    from astropt_tok.source import _file_rows

    a, b = sorted(Path(survey_dir).glob("*.parquet"))
    shutil.copy(a, tmp_path / a.name)
    fa, fb, copy = _file_rows(str(a)), _file_rows(str(b)), _file_rows(str(tmp_path / a.name))
    assert fa.fingerprint != fb.fingerprint and fa.fingerprint == copy.fingerprint and fa.bytes == copy.bytes


def _pretend_source_changed(store: Path) -> str:
    changed = {}

    def edit(m):
        f = m["source"]["files"][1]
        f["fingerprint"] = "footer-sha256:" + "0" * 64
        changed["path"] = f["path"]

    edit_manifest(store, edit)
    return changed["path"]


def test_changed_source_is_refused_by_a_rerun(made_store, store, capsys):
    path = _pretend_source_changed(store)
    edit_manifest(store, lambda m: (m.update(complete=False), m.pop("shards"), m.pop("totals")))
    (store / ".done" / "shard-00001.json").unlink()
    before = tree_digest(store)
    code, _, err = run_cli(made_store[1] + ["--out", store], capsys)
    assert_one_error(code, err, path, "changed")
    assert tree_digest(store) == before


def test_changed_source_is_refused_by_finalize(store, capsys):
    path = _pretend_source_changed(store)
    edit_manifest(store, lambda m: (m.update(complete=False), m.pop("shards"), m.pop("totals")))
    code, _, err = run_cli(["verify", store, "--finalize"], capsys)
    assert_one_error(code, err, path, "changed")
    assert not json.loads((store / "manifest.json").read_text())["complete"]


def test_changed_source_is_refused_by_compare(store, capsys, tmp_path):
    path = _pretend_source_changed(store)
    code, _, err = run_cli(["decode", "--tokens", store, "--rows", "25", "--compare", "--out", tmp_path / "c.png"],
                           capsys)
    assert_one_error(code, err, path, "changed")
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("command", ["train", "decode"])
def test_a_shard_swapped_for_another_is_refused(store, command, capsys, tmp_path):
    a, b = store / "shard-00000.arrow", store / "shard-00001.arrow"
    assert a.stat().st_size == b.stat().st_size  # the sizes agree: only the row ids tell them apart
    a.rename(tmp_path / "a")
    b.rename(a)
    (tmp_path / "a").rename(b)
    argv = (train_argv(store, tmp_path / "run") if command == "train" else
            ["decode", "--tokens", store, "--rows", "0", "--out", tmp_path / "out.png"])
    code, _, err = run_cli(argv, capsys)
    assert_one_error(code, err, "shard-0000", "not this store's shard")
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_tokens_outside_the_vocabulary_stop_train_before_the_first_step(store, capsys, tmp_path):
    edit_manifest(store, lambda m: (m.update(vocab_size=100), m["codec"].update(vocab_size=100)))
    code, _, err = run_cli(train_argv(store, tmp_path / "run"), capsys)
    assert_one_error(code, err, "shard-00000.arrow", "outside the vocabulary")
    assert not (tmp_path / "run").exists()


def test_truncated_shard_in_a_complete_store_is_redone(made_store, store, capsys):
    shard = store / "shard-00001.arrow"
    shard.write_bytes(shard.read_bytes()[:1000])
    code, out, err = run_cli(made_store[1] + ["--out", store], capsys)
    assert code == 0, err
    assert "1 already done" in out and "shard-00001.arrow" in err
    assert tree_digest(store)["shard-00001.arrow"] == tree_digest(made_store[0])["shard-00001.arrow"]
    assert run_cli(["verify", store], capsys)[0] == 0


def test_a_moved_store_trains_and_decodes_from_another_folder(store, capsys, tmp_path, monkeypatch):
    moved = tmp_path / "elsewhere" / "tokens"
    moved.parent.mkdir()
    store.rename(moved)
    monkeypatch.chdir(moved.parent)
    code, _, err = run_cli(["decode", "--tokens", "tokens", "--rows", "0:2", "--compare", "--out", "c.png"], capsys)
    assert code == 0, err
    code, _, err = run_cli(train_argv("tokens", "run", "--max-iters", "1"), capsys)
    assert code == 0, err
    toml = (moved.parent / "run" / "train_config.toml").read_text()
    assert f'tokens = "{moved}"' in toml
    monkeypatch.chdir(tmp_path)  # the run's own config works from anywhere
    code, _, err = run_cli(["train", "--config", moved.parent / "run" / "train_config.toml", "--resume",
                            "--max-iters", "2"], capsys)
    assert code == 0, err


# ---------------------------------------------------------------------------------------------------------
# one writer per folder


def test_a_second_train_on_one_run_folder_is_refused(made_store, run, capsys):
    from astropt_tok.lock import folder_lock

    before = tree_digest(run)
    with folder_lock(run, "`astropt train`"):
        code, _, err = run_cli(train_argv(made_store[0], run, "--resume", "--max-iters", "4"), capsys)
    assert_one_error(code, err, str(run), f"pid {os.getpid()}", "in use")
    assert tree_digest(run) == before


def test_a_second_tokenise_on_one_store_is_refused(made_store, store, capsys):
    from astropt_tok.lock import folder_lock

    (store / ".done" / "shard-00001.json").unlink()
    with folder_lock(store, "`astropt tokenise`"):
        code, _, err = run_cli(made_store[1] + ["--out", store], capsys)
    assert_one_error(code, err, str(store), "in use")
    assert not (store / ".done" / "shard-00001.json").exists()


HOLD_LOCK = ("import sys; from astropt_tok.lock import folder_lock\n"
             "with folder_lock(sys.argv[1], sys.argv[2], shared=sys.argv[3] == 'shared'):\n"
             "    print('locked', flush=True)\n    sys.stdin.read()\n")  # until the test closes its stdin


@pytest.mark.parametrize("holder, how", [("`astropt tokenise`", "exclusive"), ("`astropt tokenise`", "shared"),
                                         ("`astropt verify --finalize`", "exclusive")],
                         ids=["a tokenise", "an array task", "another finalize"])
def test_finalize_is_refused_while_another_process_holds_the_store(store, holder, how, capsys):
    """`verify --finalize` takes the store's lock: while another process holds it (a tokenise, one task of an
    array, another finalize), finalize is one error naming it and completes nothing; afterwards it goes on."""
    edit_manifest(store, lambda m: (m.update(complete=False), m.pop("shards"), m.pop("totals")))
    other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(store), holder, how], cwd=REPO, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert other.stdout.readline() == "locked\n"
        code, _, err = run_cli(["verify", store, "--finalize"], capsys)
    finally:
        other.stdin.close()
        other.wait(timeout=60)
    line = assert_one_error(code, err, str(store), "in use")
    if how == "exclusive":
        assert holder in line and f"pid {other.pid}" in line
    assert not json.loads((store / "manifest.json").read_text())["complete"]
    code, out, err = run_cli(["verify", store, "--finalize"], capsys)
    assert code == 0 and out.startswith("OK"), err
    assert json.loads((store / "manifest.json").read_text())["complete"]


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    from astropt_tok.lock import folder_lock

    code = ("import os, signal, sys; from astropt_tok.lock import folder_lock\n"
            "with folder_lock(sys.argv[1], 'x'):\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode == -signal.SIGKILL
    assert "pid" in (tmp_path / ".astropt.lock").read_text()
    with folder_lock(tmp_path, "`astropt train`"):  # the OS released it when the holder died
        pass


# ---------------------------------------------------------------------------------------------------------
# I/O faults: the path and what to do, no temporary files, nothing marked complete


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """RLIMIT_FSIZE for this process inside the block: a write past it fails with EFBIG (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_file_size_limit_while_writing_a_shard(made_store, capsys, tmp_path):
    out = tmp_path / "store"
    with file_size_limit(8000):  # the manifest (3 KB) fits, a 20-row shard (24 KB) does not
        code, _, err = run_cli(made_store[1] + ["--out", out], capsys)
    assert_one_error(code, err, "shard-0000", "file-size limit")
    assert not temporaries(out) and not list(out.glob("shard-*")) and not list(out.glob(".done/*"))
    assert not json.loads((out / "manifest.json").read_text())["complete"]


def test_file_size_limit_while_writing_a_checkpoint(made_store, capsys, tmp_path):
    run = tmp_path / "run"
    with file_size_limit(1 << 20):  # metrics and the loss curve fit, the tiny model's 2 MB weights do not
        code, _, err = run_cli(train_argv(made_store[0], run), capsys)
    assert_one_error(code, err, "step-00000002", "file-size limit")
    assert not temporaries(run) and not list((run / "checkpoints").glob("step-*"))


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MB tmpfs mounted at tmp_path/mnt (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a real full or read-only file system needs a tmpfs mount (root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder: Path, leave: int) -> None:
    """Fill the file system of `folder` to the brim, then free `leave` bytes."""
    with open(folder / "filler", "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    size = (folder / "filler").stat().st_size
    os.truncate(folder / "filler", max(0, size - leave))


def test_full_disk_while_tokenising(made_store, tiny_tmpfs, capsys):
    out = tiny_tmpfs / "store"
    out.mkdir()
    fill(tiny_tmpfs, leave=16 << 10)  # room for the manifest, not for a shard
    code, _, err = run_cli(made_store[1] + ["--out", out], capsys)
    assert_one_error(code, err, str(out), "disk is full")
    assert not temporaries(out) and not list(out.glob(".done/*")) and not list(out.glob("shard-*"))
    manifest = out / "manifest.json"
    assert not manifest.exists() or not json.loads(manifest.read_text())["complete"]


@pytest.mark.parametrize("command", ["train", "decode"])
def test_full_disk_while_writing_a_run_or_picture(made_store, tiny_tmpfs, command, capsys):
    fill(tiny_tmpfs, leave=0)
    argv = (train_argv(made_store[0], tiny_tmpfs / "run") if command == "train" else
            ["decode", "--tokens", made_store[0], "--rows", "0", "--out", tiny_tmpfs / "out.png"])
    code, _, err = run_cli(argv, capsys)
    assert_one_error(code, err, str(tiny_tmpfs), "disk is full")
    assert not temporaries(tiny_tmpfs) and not (tiny_tmpfs / "out.png").exists()
    assert not (tiny_tmpfs / "run" / "checkpoints").exists()


@pytest.mark.parametrize("command", ["tokenise", "train", "decode"])
def test_read_only_file_system(made_store, tiny_tmpfs, command, capsys):
    (tiny_tmpfs / "out").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    target = tiny_tmpfs / "out"
    argv = {"tokenise": made_store[1] + ["--out", target],
            "train": train_argv(made_store[0], target),
            "decode": ["decode", "--tokens", made_store[0], "--rows", "0", "--out", target / "x.png"]}[command]
    code, _, err = run_cli(argv, capsys)
    assert_one_error(code, err, str(target), "read-only")
    assert not any(target.iterdir())


def test_no_permission_to_write(made_store, tmp_path):
    """`verify --finalize` in a folder it may not write: for real (root: without CAP_DAC_OVERRIDE)."""
    store = tmp_path / "store"
    shutil.copytree(made_store[0], store)
    edit_manifest(store, lambda m: (m.update(complete=False), m.pop("shards"), m.pop("totals")))
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root ignores permissions, and setpriv (to drop that) is not installed")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    store.chmod(0o555)
    try:
        out = subprocess.run([*prefix, sys.executable, "-m", "astropt_tok", "verify", str(store), "--finalize"],
                             cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        store.chmod(0o755)
    assert_one_error(out.returncode, out.stderr, str(store), "permission denied")
    assert not temporaries(store) and not json.loads((store / "manifest.json").read_text())["complete"]
