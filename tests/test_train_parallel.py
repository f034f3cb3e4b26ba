"""The trainer under torchrun (gloo, CPU): what ranks agree on, FSDP2 against DDP, activation checkpointing,
sharded checkpoints resumed with another process count."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from astropt_train import checkpoint as ck  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_TIMEOUT_S = 600  # a hang guard only (a loaded 2-core box is slow to start torchrun)


def run_torchrun(nproc: int, args: list, env_extra: dict | None = None, module: bool = True) -> str:
    """`torchrun --standalone --nproc_per_node N [-m astropt_tok] ARGS` to its end; its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           *(["-m", "astropt_tok"] if module else []), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=120)
        pytest.fail(f"torchrun ran past {TORCHRUN_TIMEOUT_S} s: {args}\n{err[-3000:]}")
    assert proc.returncode == 0, f"{out[-1500:]}\n{err[-3000:]}"
    return out


AGREE = """
import json, signal, sys, torch, torch.distributed as dist
from astropt_train.config import TrainConfig
from astropt_train.loop import Dist, _StopFlag
from astropt_train.trainer import Trainer
dist.init_process_group("gloo")
r = dist.get_rank()
t = Trainer(TrainConfig(tokens="x"), Dist(r, 2, r, True), torch.device("cpu"), _StopFlag(), None, None)
answers = [t.agree(torch.tensor(r == 1), True)]          # rank 1's loss went non-finite
answers.append(t.agree(torch.tensor(True), False))      # not a sync step: nobody looks
t.stop.signum = signal.SIGTERM if r == 0 else None      # a signal reached rank 0 alone
answers.append(t.agree(torch.tensor(False), True))
t.agree_on_checkpoints(4)                                # the same newest checkpoint: nothing to say
try:
    t.agree_on_checkpoints(4 if r == 0 else None)        # a node that cannot see --out
    answers.append("no error")
except Exception as exc:
    answers.append(str(exc).split(":")[0])
try:
    t.same_on_every_rank("a" if r == 0 else "b", "stores at S", "read one store", show=lambda v: "sha " + v)
except Exception as exc:
    answers.append(str(exc))
open(f"{sys.argv[1]}/agree-{r}.json", "w").write(json.dumps(answers + [t.stop.signum is not None]))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ranks_agree_on_a_non_finite_loss_a_stop_signal_and_the_checkpoint_to_resume(tmp_path):
    """One rank's non-finite loss, or one rank's signal, is every rank's at the next sync step: all refuse or stop
    together (a rank raising alone would leave the others in their next all-reduce until the timeout). Ranks that
    see different newest checkpoints (a node without the shared --out) are all refused before the first step."""
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    run_torchrun(2, [script, tmp_path], module=False)
    got = {r: json.loads((tmp_path / f"agree-{r}.json").read_text()) for r in (0, 1)}
    refused = "the ranks see different checkpoints in " + str(Path("runs/astropt")) + " (rank 0"
    stores = "the ranks see different stores at S (rank 0: sha a, rank 1: sha b): read one store"
    expected = [[False, True], [False, False], [True, False], refused, stores, True]
    assert got == {0: expected, 1: expected}


def make_store(out, vocab=256, rows=64, t=48):
    """A store of rows drawn from 4 fixed token sequences: learnable by a tiny model."""
    import numpy as np

    from astropt_tok.store import write_store_from_arrays

    rng = np.random.default_rng(0)
    base = rng.integers(0, vocab, size=(4, t))
    write_store_from_arrays(out, base[rng.integers(0, 4, size=rows)], num_shards=2,
                            codec={"id": "random", "vocab_size": vocab, "tokens_per_image": t}, bands=["DES-G"])
    return out


def losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines())}


def train_args(store, out, iters, *extra):
    return ["train", "--tokens", store, "--out", out, "--n-layer", "2", "--n-head", "2", "--n-embd", "16",
            "--batch-size", "4", "--max-iters", iters, "--lr-decay-iters", "8", "--eval-interval", "3",
            "--eval-iters", "1", "--val-images", "2", "--log-interval", "1", "--device", "cpu", "--seed", "5",
            "--no-compile", "--lr", "0.01", "--checkpoint-interval", "3", *extra]


@pytest.mark.slow
def test_fsdp_trains_as_ddp_and_its_sharded_checkpoints_resume_with_any_process_count(tmp_path):
    """Two ranks: FSDP2 with activation checkpointing (dropout on) gives DDP's losses to rounding; its sharded
    checkpoint resumed by two ranks continues exactly as the straight run; one process (no process group)
    resumes it too, and decode/embed's loader reads it with or without a consolidated model.safetensors."""
    import shutil

    store = make_store(tmp_path / "store")
    (tmp_path / "dropout.toml").write_text("dropout = 0.1\n")
    dropout = ["--config", tmp_path / "dropout.toml"]
    run_torchrun(2, train_args(store, tmp_path / "ddp", 6, *dropout))
    fsdp = ["--parallel", "fsdp", "--activation-checkpointing", "--save-consolidated", *dropout]
    out = run_torchrun(2, train_args(store, tmp_path / "fsdp", 3, *fsdp))
    assert "on 2 x cpu fp32 sharded (fsdp) activation-checkpointed" in out
    # validation pictures: every rank's forward (FSDP gathers), the master draws (here: no codec to draw with)
    assert out.count("validation images off") == 1
    run_torchrun(2, train_args(store, tmp_path / "fsdp", 6, *fsdp, "--resume"))
    ddp, sharded = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert sorted(sharded) == list(range(1, 7))
    for s in range(1, 7):
        assert sharded[s] == pytest.approx(ddp[s], rel=1e-5, abs=1e-6), s

    (s3, c3), (s6, c6) = ck.list_checkpoints(tmp_path / "fsdp")
    assert (s3, s6) == (3, 6) and ck.is_sharded(c3) and (c3 / ck.MODEL_FILE).is_file()
    state = torch.load(c3 / ck.STATE_FILE, weights_only=True)
    assert state["sharded"] is True and "optimizer" not in state
    assert ck.read_config(c3)["train"]["parallel"] == "fsdp"
    from safetensors.torch import load_file

    model, _ = ck.load_model(c6)
    consolidated = load_file(str(c6 / ck.MODEL_FILE))
    for name, value in model.state_dict().items():
        assert torch.equal(value, consolidated[name]), name
    ddp_model, _ = ck.load_model(tmp_path / "ddp")  # the same weights, to rounding, as the DDP run's
    for name, value in ddp_model.state_dict().items():
        assert torch.allclose(value, consolidated[name], rtol=1e-4, atol=1e-5), name

    # the shards alone: loaded in this process (no process group), and consolidated on request
    bare = tmp_path / "bare" / "checkpoints" / c6.name
    shutil.copytree(c6, bare)
    (bare / ck.MODEL_FILE).unlink()
    alone, _ = ck.load_model(bare)
    assert all(torch.equal(v, consolidated[k]) for k, v in alone.state_dict().items())
    sha = ck.weights_sha256(bare)
    ck.consolidate_checkpoint(bare)
    assert load_file(str(bare / ck.MODEL_FILE)).keys() == consolidated.keys() and ck.weights_sha256(bare) != sha

    # one process resumes the two ranks' shards (another process count: the data restart at a new epoch)
    from astropt_train.config import build_config
    from astropt_train.loop import train

    summary = train(build_config(dict(tokens=str(store), out=str(tmp_path / "fsdp"), n_layer=2, n_head=2, n_embd=16,
                                      batch_size=4, max_iters=8, eval_interval=100, eval_iters=1, val_images=0,
                                      log_interval=1, device="cpu", seed=5, compile=False, lr=0.01,
                                      checkpoint_interval=3, dropout=0.1, checkpoint_format="sharded",
                                      resume=True, live=False, lr_decay_iters=8)))
    assert summary["step"] == 8 and ck.is_sharded(summary["checkpoint"])
    assert all(map(math.isfinite, losses(tmp_path / "fsdp").values()))


def one_process(store, out, **kw):
    from astropt_train.config import build_config

    base = dict(tokens=str(store), out=str(out), n_layer=1, n_head=2, n_embd=16, batch_size=4, max_iters=3,
                eval_interval=100, eval_iters=1, val_images=0, log_interval=1, device="cpu", seed=5, compile=False,
                checkpoint_interval=3, checkpoint_format="sharded", live=False)
    base.update(kw)
    return build_config(base)


def test_sharded_checkpoints_in_one_process_and_their_damage(tmp_path):
    """One process writes sharded checkpoints with no process group; resuming one continues exactly; a damaged
    or missing shard, or a folder without its shard index, is refused or ignored, never half-read."""
    from astropt_tok.errors import AstroptError
    from astropt_train.loop import train

    store = make_store(tmp_path / "store")
    train(one_process(store, tmp_path / "straight", max_iters=6))
    train(one_process(store, tmp_path / "run"))
    train(one_process(store, tmp_path / "run", max_iters=6, resume=True))
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")  # bit-identical on a CPU
    (_, c3), (_, c6) = ck.list_checkpoints(tmp_path / "run")
    assert ck.is_sharded(c6) and not (c6 / ck.MODEL_FILE).exists()

    shard = next((c6 / ck.SHARDED_DIR).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(AstroptError, match=f"sharded checkpoint {c6} is unreadable"):
        train(one_process(store, tmp_path / "run", max_iters=9, resume=True))
    with pytest.raises(AstroptError, match=f"sharded checkpoint {c6} is unreadable"):
        ck.load_model(c6)
    (c6 / ck.SHARDED_DIR / ck.SHARD_INDEX).unlink()  # as a killed writer would leave it: not a checkpoint
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "run")] == [3]


def test_parallel_settings_that_cannot_work_are_one_error(tmp_path):
    from astropt_tok.errors import AstroptError
    from astropt_train.config import build_config

    base = dict(tokens="x", out=str(tmp_path / "r"))
    for bad, match in ((dict(parallel="zero"), "parallel must be one of ddp, fsdp"),
                       (dict(checkpoint_format="dcp"), "checkpoint-format must be one of full, sharded"),
                       (dict(parallel="fsdp", checkpoint_format="full"), "--checkpoint-format full needs --parallel ddp"),
                       (dict(save_consolidated=True), "--save-consolidated applies to sharded checkpoints")):
        with pytest.raises(AstroptError, match=match):
            build_config({**base, **bad})
    assert build_config({**base, "parallel": "fsdp"}).sharded_checkpoints()
    assert not build_config(base).sharded_checkpoints()


def test_fsdp_in_one_process_says_it_has_nothing_to_shard(tmp_path, capsys):
    """--parallel fsdp without torchrun trains as one process, says so once, and writes sharded checkpoints."""
    from astropt_train.loop import train

    store = make_store(tmp_path / "store")
    summary = train(one_process(store, tmp_path / "run", parallel="fsdp", checkpoint_format=None,
                                activation_checkpointing=True))
    out = capsys.readouterr().out
    assert out.count("--parallel fsdp in one process has nothing to shard") == 1
    assert "activation-checkpointed" in out and "sharded (fsdp)" not in out
    assert ck.is_sharded(summary["checkpoint"])


def test_sharded_weights_that_diverged_are_refused_and_killed_saves_are_cleared(tmp_path):
    """A sharded checkpoint whose weights hold a NaN is refused at load (as a model.safetensors is); the
    temporary folder a killed sharded save leaves is cleared by the next prune."""
    import torch.distributed.checkpoint as dcp

    from astropt_tok.errors import AstroptError
    from astropt_train.loop import train

    store = make_store(tmp_path / "store")
    summary = train(one_process(store, tmp_path / "run"))
    ckpt = Path(summary["checkpoint"])
    model, _ = ck.load_model(ckpt)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(iter(state))
    state[first].view(-1)[0] = float("nan")
    import shutil

    shards = ckpt / ck.SHARDED_DIR
    shutil.rmtree(shards)  # the same checkpoint, its weights rewritten with one NaN
    dcp.save({"model": state}, checkpoint_id=str(shards), no_dist=True)
    with pytest.raises(AstroptError, match="the run diverged"):
        ck.load_model(ckpt)
    stale = ckpt.parent / ".step-00000009.tmp-killed"
    (stale / ck.SHARDED_DIR).mkdir(parents=True)
    ck.prune(tmp_path / "run", keep_last=3)
    assert not stale.exists() and ckpt.exists()
