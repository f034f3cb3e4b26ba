"""End-to-end training on CPU: overfitting, exact resume, checkpoints, refusals, NaN stop, signals, DDP,
validation images, and the codec staying out of the loop."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from astropt_tok.errors import AstroptError
from astropt_tok.store import write_store_from_arrays
from astropt_train import checkpoint as ck
from astropt_train.config import build_config
from astropt_train.loop import train

REPO = Path(__file__).resolve().parents[1]
VOCAB, T = 256, 48


def make_store(out, vocab=VOCAB, rows=40, t=T, codec_id="random", seed=0):
    """A store of `rows` rows drawn from 4 fixed token sequences: learnable by a tiny model."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, vocab, size=(4, t))
    write_store_from_arrays(out, base[rng.integers(0, 4, size=rows)], num_shards=2,
                            codec={"id": codec_id, "vocab_size": vocab, "tokens_per_image": t}, bands=["DES-G"])
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("train-store"))


def cfg(store, out, **kw):
    base = dict(tokens=str(store), out=str(out), n_layer=2, n_head=2, n_embd=32, batch_size=4, max_iters=20,
                lr=1e-2, warmup_iters=2, eval_interval=10, eval_iters=2, log_interval=1, val_images=0, live=False,
                checkpoint_interval=5, keep_last=2, device="cpu")
    base.update(kw)
    return build_config(base)


def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines())}


def test_tiny_model_overfits_tiny_store(store, tmp_path):
    summary = train(cfg(store, tmp_path / "run", max_iters=60, eval_interval=30, checkpoint_interval=0))
    assert summary["step"] == 60
    assert summary["loss"] < 0.25 * math.log(VOCAB)
    assert summary["best_val_loss"] < 0.25 * math.log(VOCAB)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(recs[0])
    assert [r["step"] for r in recs if "val_loss" in r] == [30, 60]
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 0
    assert (tmp_path / "run" / "metrics.csv").read_text().startswith("step,loss")
    run_cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run_cfg["split"]["num_val"] == 2 and run_cfg["model"]["block_size"] == T
    assert "max_iters = 60" in (tmp_path / "run" / "train_config.toml").read_text()


def test_aim_head_is_recorded_and_honoured_by_load_model(store, tmp_path):
    summary = train(cfg(store, tmp_path / "run", head="aim", max_iters=6, eval_interval=6, checkpoint_interval=0))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["head"] == "aim"
    model, conf = ck.load_model(summary["checkpoint"])
    assert conf["model"]["head"] == "aim" and model.decoders["images_aion"].c_proj.weight.shape == (VOCAB, 4 * 32)


def test_resume_gives_the_same_losses_as_a_straight_run(store, tmp_path):
    straight = train(cfg(store, tmp_path / "a", max_iters=20, lr_decay_iters=20))
    train(cfg(store, tmp_path / "b", max_iters=10, lr_decay_iters=20))
    resumed = train(cfg(store, tmp_path / "b", max_iters=20, lr_decay_iters=20, resume=True))
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(lb) == list(range(1, 21))  # the resumed log continues the first one
    for s in range(1, 21):
        assert la[s] == pytest.approx(lb[s], abs=1e-6, rel=0), s
    assert resumed["best_val_loss"] == pytest.approx(straight["best_val_loss"], abs=1e-6)
    # model weights agree too
    ma, _ = ck.load_model(tmp_path / "a")
    mb, _ = ck.load_model(tmp_path / "b")
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        torch.testing.assert_close(va, vb, atol=1e-6, rtol=0)


def test_deterministic_flag_is_recorded_and_leaves_torch_as_it_was(store, tmp_path):
    """On a CPU the kernels are deterministic anyway: --deterministic gives the same losses, is written to
    train_config.toml (so --config and --resume keep it), and torch's global settings are put back after."""
    plain = train(cfg(store, tmp_path / "plain", max_iters=6, checkpoint_interval=0))
    strict = train(cfg(store, tmp_path / "strict", max_iters=6, checkpoint_interval=0, deterministic=True))
    assert losses(tmp_path / "plain") == losses(tmp_path / "strict") and plain["loss"] == strict["loss"]
    assert "deterministic = true" in (tmp_path / "strict" / "train_config.toml").read_text()
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_checkpoint_folder_format_and_retention(store, tmp_path):
    run = tmp_path / "run"
    train(cfg(store, run, max_iters=20, checkpoint_interval=5, keep_last=2, eval_interval=5))
    steps = [s for s, _ in ck.list_checkpoints(run)]
    best = ck.read_best(run)
    assert steps[-2:] == [15, 20] and set(steps) <= {best["step"], 15, 20}
    last = run / "checkpoints" / "step-00000020"
    assert sorted(p.name for p in last.iterdir()) == [".astropt-artifact.json", "config.json", "model.safetensors",
                                                      "trainer_state.pt"]
    from astropt_tok.artifacts import read_record
    from astropt_tok.store import sha256_path

    record = read_record(last)  # the checkpoint's lineage: kind, step and its weights' sha256
    assert record["kind"] == "checkpoint" and record["lineage"]["step"] == 20
    assert record["lineage"]["weights_sha256"] == sha256_path(last / "model.safetensors")
    state = torch.load(last / "trainer_state.pt", weights_only=True)  # no pickled Python objects needed
    assert state["step"] == 20 and state["data"]["micro_batches_done"] == 20
    conf = json.loads((last / "config.json").read_text())
    assert conf["vocab_size"] == VOCAB and conf["tokens_per_image"] == T and conf["step"] == 20
    # the older keys, and what later commands check a store against (astropt_tok.artifacts.model_store_info)
    assert set(conf["store"]) == {"dir", "manifest_sha256", "codec_id", "bands", "codec_sha256", "modalities",
                                  "id_column"}
    assert conf["model"]["n_embd"] == 32 and conf["train"]["max_iters"] == 20
    model, conf2 = ck.load_model(last)
    assert model.config.vocab_size == VOCAB and conf2["step"] == 20
    assert not list((run / "checkpoints").glob(".tmp-*"))
    # a second fresh run into the same folder is refused rather than mixing two runs
    with pytest.raises(AstroptError, match="--resume"):
        train(cfg(store, run))


def test_resume_refuses_another_vocab_or_codec(store, tmp_path):
    run = tmp_path / "run"
    train(cfg(store, run, max_iters=5))
    other_vocab = make_store(tmp_path / "v512", vocab=512)
    with pytest.raises(AstroptError, match="vocab 512"):
        train(cfg(other_vocab, run, max_iters=10, resume=True))
    other_codec = make_store(tmp_path / "codec2", codec_id="another/codec")
    with pytest.raises(AstroptError, match="another/codec"):
        train(cfg(other_codec, run, max_iters=10, resume=True))
    with pytest.raises(AstroptError, match="layers"):
        train(cfg(store, run, max_iters=10, resume=True, n_layer=3))


def test_missing_or_corrupt_store_is_one_clear_error(store, tmp_path):
    import shutil

    with pytest.raises(AstroptError, match="does not exist"):
        train(cfg(tmp_path / "nope", tmp_path / "r0"))
    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    shard = sorted(bad.glob("shard-*.arrow"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(AstroptError, match=shard.name):
        train(cfg(bad, tmp_path / "r1"))
    shard.unlink()
    with pytest.raises(AstroptError, match=f"{shard.name} is missing"):
        train(cfg(bad, tmp_path / "r2"))
    assert not (tmp_path / "r1" / "checkpoints").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(store, tmp_path):
    run = tmp_path / "run"
    # warmup 0 and a huge learning rate without clipping: step 1 is finite, then the weights blow up
    with pytest.raises(AstroptError, match=r"loss is (nan|inf).*step-00000001"):
        train(cfg(store, run, lr=1e9, warmup_iters=0, grad_clip=0.0, checkpoint_interval=1, max_iters=20))
    steps = [s for s, _ in ck.list_checkpoints(run)]
    assert steps and max(steps) < 5
    model, _ = ck.load_model(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_trainer_never_imports_the_codec_outside_validation(store, tmp_path):
    code = (
        "import sys, json\n"
        "from astropt_train.config import build_config\n"
        "from astropt_train.loop import train\n"
        f"train(build_config(dict(tokens={str(store)!r}, out={str(tmp_path / 'run')!r}, n_layer=1, n_head=2, "
        "n_embd=16, batch_size=4, max_iters=3, eval_interval=2, eval_iters=1, val_images=0, live=False, "
        "device='cpu')))\n"
        "bad = [m for m in ('aion', 'astropt_tok.codec') if m in sys.modules]\n"
        "print(json.dumps(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_validation_images_with_the_real_codec(random_store, codec_dir, tmp_path):
    run = tmp_path / "run"
    train(build_config(dict(tokens=str(random_store), out=str(run), n_layer=1, n_head=2, n_embd=16, batch_size=2,
                            max_iters=2, eval_interval=2, eval_iters=1, val_images=2, codec=str(codec_dir),
                            live=False, device="cpu")))
    from PIL import Image

    png = run / "val_images" / "step-00000002.png"
    w, h = Image.open(png).size
    assert w > 2 * 96 and h > 2 * 96  # two galaxies: target | prediction


def test_unloadable_codec_says_so_once_and_training_goes_on(random_store, tmp_path, capsys):
    run = tmp_path / "run"
    summary = train(build_config(dict(tokens=str(random_store), out=str(run), n_layer=1, n_head=2, n_embd=16,
                                      batch_size=2, max_iters=4, eval_interval=2, eval_iters=1, val_images=2,
                                      codec=str(tmp_path / "no-codec-here"), live=False, device="cpu")))
    assert summary["step"] == 4
    assert capsys.readouterr().out.count("validation images off") == 1
    assert not (run / "val_images").exists()


def test_sigint_saves_a_checkpoint_and_exits_cleanly(store, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "astropt_tok", "train", "--tokens", str(store), "--out", str(run),
           "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--batch-size", "4", "--max-iters", "100000",
           "--log-interval", "1", "--eval-interval", "100000", "--val-images", "0", "--checkpoint-interval", "0",
           "--workers", "1", "--device", "cpu"]  # a loader worker must not die of the signal before the trainer saves
    # its own process group, signalled as a whole like Ctrl-C in a terminal (or a scheduler's SIGTERM)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (out + err).count("stopped by SIGINT") == 1  # one stop line, not the loop's and the CLI's
    (step, path), = ck.list_checkpoints(run)
    assert step >= 3 and torch.load(path / "trainer_state.pt", weights_only=True)["step"] == step


# A hang guard only: one run takes about 10 s on an idle 2-core box and 30-35 s beside two busy processes
# (load 5.5); a too-tight limit, not the training, is what a loaded machine trips.
TORCHRUN_TIMEOUT_S = 600


def torchrun(*args, env: dict) -> None:
    """`torchrun --standalone --nproc_per_node 2 -m astropt_tok ARGS` to its end; past the limit, torchrun is
    stopped with its workers (none left burning the CPU) and the test fails with their output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "astropt_tok", *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its workers (each in a session of its own) on SIGTERM, then exits
        out, err = proc.communicate(timeout=120)
        pytest.fail(f"torchrun ran past {TORCHRUN_TIMEOUT_S} s: {' '.join(map(str, args))}\n{err[-3000:]}")
    assert proc.returncode == 0, f"{out[-1500:]}\n{err[-3000:]}"


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_read_disjoint_rows(tmp_path):
    """The rows each rank's DataLoader delivered (found by the trainer from the batches' tokens, so every row of
    this store must be distinct) never overlap within an epoch, and together cover the training rows."""
    from astropt_train.data import split_rows

    tokens = np.random.default_rng(3).integers(0, VOCAB, size=(64, T))  # 64 distinct rows
    store = tmp_path / "store"
    write_store_from_arrays(store, tokens, num_shards=2, codec={"id": "random", "vocab_size": VOCAB,
                                                               "tokens_per_image": T}, bands=["DES-G"])
    run = tmp_path / "run"
    # log_rows is a debug setting without a flag: pass it through a TOML config
    (tmp_path / "dbg.toml").write_text("log_rows = true\n")
    torchrun("train", "--tokens", store, "--out", run, "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
             "--batch-size", "4", "--max-iters", "12", "--eval-interval", "6", "--eval-iters", "1", "--val-images",
             "0", "--log-interval", "3", "--device", "cpu", "--seed", "5", "--config", tmp_path / "dbg.toml",
             env=dict(os.environ, OMP_NUM_THREADS="1"))
    rows = [[list(map(int, line.split())) for line in (run / f"rows-rank{r}.txt").read_text().splitlines()]
            for r in range(2)]
    assert len(rows[0]) == len(rows[1]) == 12
    conf = json.loads((run / "config.json").read_text())
    train_rows = set(split_rows(64, conf["split"]["val_fraction"], conf["split"]["seed"]).train.tolist())
    # per epoch (60 train rows / 2 ranks / 4 = 7 batches per rank), the two ranks' rows never overlap
    for e in range(2):
        a = [x for b in rows[0][7 * e:7 * e + 7] for x in b]
        c = [x for b in rows[1][7 * e:7 * e + 7] for x in b]
        assert set(a) <= train_rows and set(c) <= train_rows  # real training rows (-1: tokens of no such row)
        assert len(set(a)) == len(a) and len(set(c)) == len(c)  # no row twice in a rank's epoch
        assert set(a).isdisjoint(c) and len(a) == len(c) == min(28, 4 * len(rows[0][7 * e:7 * e + 7]))
    epoch0 = {x for r in range(2) for b in rows[r][:7] for x in b}
    assert len(epoch0) == 56  # 7 batches x 4 rows x 2 ranks of the 60 training rows (the last 4 are dropped)
    assert conf["world_size"] == 2
    assert [s for s, _ in ck.list_checkpoints(run)][-1] == 12


def test_ddp_resume_with_dropout_gives_the_same_losses_as_a_straight_run(tmp_path):
    """Every rank's random state is saved and restored: with dropout, a resumed two-process run draws the
    same masks on both ranks as the straight run (a reseeded rank 1 would change the averaged gradients)."""
    store = make_store(tmp_path / "store", rows=64)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    (tmp_path / "dropout.toml").write_text("dropout = 0.2\n")

    def run(out, iters, *extra):
        torchrun("train", "--tokens", store, "--out", out, "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                 "--batch-size", "4", "--max-iters", iters, "--lr-decay-iters", "12", "--eval-interval", "100",
                 "--eval-iters", "1", "--val-images", "0", "--log-interval", "1", "--device", "cpu", "--seed", "5",
                 "--no-compile", "--lr", "0.01", "--config", tmp_path / "dropout.toml", *extra, env=env)

    run(tmp_path / "a", 12)
    run(tmp_path / "b", 6)
    run(tmp_path / "b", 12, "--resume")
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(lb) == list(range(1, 13))
    for s in range(1, 13):
        assert la[s] == pytest.approx(lb[s], abs=1e-6, rel=0), s


def test_every_checkpoint_file_gets_the_permissions_of_a_plain_file(store, tmp_path):
    """safetensors writes through a private temporary (0600); the checkpoint's weights get what every other file
    gets: 0666 less the umask, so a group's shared run folder is readable by the group."""
    from astropt_train.loop import train

    old = os.umask(0o027)
    try:
        train(cfg(store, tmp_path / "run", max_iters=1, eval_interval=1))
    finally:
        os.umask(old)
    (_, ckpt), = ck.list_checkpoints(tmp_path / "run")
    modes = {p.name: p.stat().st_mode & 0o777 for p in ckpt.iterdir()}
    assert modes["model.safetensors"] == 0o640 and set(modes.values()) == {0o640}, modes
    assert ckpt.stat().st_mode & 0o777 == 0o750


def test_logged_train_loss_is_the_mean_since_the_last_log_line(store, tmp_path, capsys):
    """With --log-interval 3 the loss at step 3k is the mean of steps 3k-2..3k's losses (a run logging every step
    gives them: CPU runs are bit-identical); the summary's loss is the last interval's mean. --warmup-iters past
    --max-iters is noted; --threads sets torch's threads for the run and puts them back."""
    import torch

    from astropt_train.loop import train

    every = train(cfg(store, tmp_path / "a", max_iters=6, log_interval=1, eval_interval=6, warmup_iters=8))
    assert "--warmup-iters 8 exceeds --max-iters 6" in capsys.readouterr().out
    before = torch.get_num_threads()
    third = train(cfg(store, tmp_path / "b", max_iters=6, log_interval=3, eval_interval=6, warmup_iters=8, threads=1))
    assert torch.get_num_threads() == before
    step_loss = losses(tmp_path / "a")
    logged = losses(tmp_path / "b")
    assert sorted(logged) == [3, 6]
    for s in (3, 6):
        assert logged[s] == pytest.approx(sum(step_loss[t] for t in range(s - 2, s + 1)) / 3, rel=1e-6)
    assert third["loss"] == pytest.approx(logged[6]) and every["loss"] == pytest.approx(step_loss[6])
    with pytest.raises(AstroptError, match="threads must be 1 or more"):
        train(cfg(store, tmp_path / "c", threads=0))
