"""The trainer under torchrun (gloo, CPU): what ranks agree on, FSDP2 against DDP, activation checkpointing,
sharded checkpoints resumed with another process count."""

from __future__ import annotations

import json
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
    expected = [[False, True], [False, False], [True, False], refused, True]
    assert got == {0: expected, 1: expected}
