"""Many nodes, as two "nodes" on one machine: two torchrun agents on localhost (gloo, CPU), meeting by c10d
rendezvous (through scripts/slurm/launch_node.sh, the line the SLURM batch script runs on each node) or by the
static --master-addr/--node-rank form, train exactly the run one agent of two processes trains (the same losses;
each rank the same rows, disjoint from the other rank's), and only rank 0 writes the run folder. The script's
own refusals and a node that never arrives end with an exit code, not a hang."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from astropt_tok.store import write_store_from_arrays
from test_launch import child_env, free_port

REPO = Path(__file__).resolve().parents[1]
LAUNCH_NODE = REPO / "scripts" / "slurm" / "launch_node.sh"
HANG_GUARD_S = 600  # a hang guard only: both agents together take about 10 s on an idle 2-core box
VOCAB, T, ROWS, STEPS, BATCH = 256, 48, 64, 6, 4
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def store_and_debug(tmp_path_factory):
    """(store, debug config): 64 distinct rows (so a delivered batch's tokens name its rows), and a TOML file
    turning on log_rows (each rank writes rows-rank{R}.txt of the rows its DataLoader delivered)."""
    base = tmp_path_factory.mktemp("multinode")
    tokens = np.random.default_rng(3).integers(0, VOCAB, size=(ROWS, T))
    write_store_from_arrays(base / "store", tokens, num_shards=2, bands=["DES-G"],
                            codec={"id": "random", "vocab_size": VOCAB, "tokens_per_image": T})
    (base / "debug.toml").write_text("log_rows = true\n")
    return base / "store", base / "debug.toml"


def train_args(store_and_debug, out) -> list[str]:
    store, debug = store_and_debug
    return ["train", "--tokens", str(store), "--out", str(out), "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
            "--batch-size", str(BATCH), "--max-iters", str(STEPS), "--eval-interval", str(STEPS), "--eval-iters", "1",
            "--val-images", "0", "--log-interval", "1", "--device", "cpu", "--threads", "1", "--seed", "5",
            "--config", str(debug)]


def run_together(commands: list[list[str]], envs: list[dict]) -> list[tuple[int, str, str]]:
    """Start every command at once (one per "node") and wait for all: [(exit code, stdout, stderr)]. Their
    output goes to files (no agent blocks on a full pipe while another is waited for). Past the hang guard
    every agent is stopped (torchrun stops its workers on SIGTERM) and the test fails."""
    with contextlib.ExitStack() as files:
        logs = [(files.enter_context(tempfile.TemporaryFile("w+")), files.enter_context(tempfile.TemporaryFile("w+")))
                for _ in commands]
        procs = [subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=out, stderr=err)
                 for cmd, env, (out, err) in zip(commands, envs, logs)]
        timed_out = False
        try:
            for p in procs:
                p.wait(timeout=HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            timed_out = True
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=120)
        texts = []
        for out, err in logs:
            out.seek(0), err.seek(0)
            texts.append((out.read(), err.read()))
    if timed_out:
        pytest.fail(f"the agents ran past {HANG_GUARD_S} s:\n" + "\n".join(err[-2000:] for _, err in texts))
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, texts)]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def delivered(run: Path, rank: int) -> list[list[int]]:
    return [list(map(int, line.split())) for line in (run / f"rows-rank{rank}.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_node(store_and_debug, tmp_path_factory):
    """The run of one agent with two processes: what two nodes of one process each must reproduce."""
    out = tmp_path_factory.mktemp("one-node") / "run"
    (code, _, err), = run_together([[*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "astropt_tok",
                                     *train_args(store_and_debug, out)]], [child_env()])
    assert code == 0, err[-3000:]
    return out


def node_commands(how: str, args: list[str]) -> tuple[list[list[str]], list[dict]]:
    """The two agents' commands and environments, as each node of a two-node job would run them."""
    port, job = str(free_port()), f"astropt-test-{free_port()}"
    if how == "static":  # node ranks given; node 0 hosts the rendezvous and rank 0
        return ([[*TORCHRUN, "--nnodes", "2", "--node-rank", str(n), "--nproc-per-node", "1", "--master-addr",
                  "127.0.0.1", "--master-port", port, "-m", "astropt_tok", *args] for n in (0, 1)],
                [child_env(), child_env()])
    # c10d, by the SLURM script's own per-node line (launch_node.sh runs `torchrun --nnodes 2 --nproc-per-node 1
    # --rdzv-backend c10d --rdzv-endpoint HEAD:PORT --rdzv-id JOB ...`), in the environment srun gives each
    # node's task of `srun --ntasks-per-node 1` in a two-node job, and the head's address as the batch script
    # exports it (there is no SLURM_JOB_NODELIST here to find it in)
    return ([["bash", str(LAUNCH_NODE), *args[1:]]] * 2,
            [child_env(SLURM_NNODES="2", SLURM_NODEID=str(n), SLURM_PROCID=str(n), SLURM_LOCALID="0",
                       SLURM_STEP_NUM_TASKS="2", SLURM_JOB_ID=job, HEAD_ADDR="127.0.0.1", RDZV_PORT=port,
                       PYTHON=sys.executable) for n in (0, 1)])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["c10d-slurm-script", "static"])
def test_two_nodes_train_as_one_node_of_two_processes(how, store_and_debug, one_node, tmp_path):
    run = tmp_path / "run"
    results = run_together(*node_commands(how, train_args(store_and_debug, run)))
    for code, out, err in results:
        assert code == 0, f"{out[-1500:]}\n{err[-3000:]}"
    # the run folder is written once, by rank 0 (on whichever node c10d numbered first; node-rank 0 when static)
    done = [n for n, (_, out, _) in enumerate(results) if f"done: step {STEPS}" in out]
    assert len(done) == 1, [out[-500:] for _, out, _ in results]
    if how == "static":
        assert done == [0]
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in one_node.iterdir())
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert list(losses(run)) == list(range(1, STEPS + 1))  # one line per step: not written by two ranks
    # each rank read what rank R of one node reads, and the two ranks' rows are disjoint
    rows = [delivered(run, r) for r in (0, 1)]
    assert rows == [delivered(one_node, r) for r in (0, 1)]
    firsts = [[x for batch in rows[r] for x in batch] for r in (0, 1)]
    assert len(firsts[0]) == len(firsts[1]) == STEPS * BATCH and -1 not in firsts[0] + firsts[1]
    assert len(set(firsts[0] + firsts[1])) == 2 * STEPS * BATCH  # 6 steps of 4 rows per rank: within epoch 0
    # the same training: gradients averaged over the same two ranks' batches give the same losses
    want = losses(one_node)
    for step, loss in losses(run).items():
        assert loss == pytest.approx(want[step], abs=1e-6, rel=0), step


@pytest.mark.slow
def test_a_node_that_never_arrives_ends_the_other_within_the_join_timeout(store_and_debug, tmp_path):
    """The rendezvous of nodes is torchrun's: the agent gives up after JOIN_TIMEOUT (its own error), before any
    training process starts, so --out is never made."""
    run = tmp_path / "run"
    env = child_env(SLURM_NNODES="2", SLURM_NODEID="0", SLURM_JOB_ID=f"alone-{free_port()}", HEAD_ADDR="127.0.0.1",
                    RDZV_PORT=str(free_port()), JOIN_TIMEOUT="3", PYTHON=sys.executable)
    (code, _, err), = run_together([["bash", str(LAUNCH_NODE), *train_args(store_and_debug, run)[1:]]], [env])
    assert code != 0
    assert err.splitlines()[0].startswith("node 0 of 2: torchrun agent for 1 process(es), rendezvous")
    assert "waiting up to 3 s for the other nodes" in err.splitlines()[0]
    assert "RendezvousTimeoutError" in err, err[-2000:]
    assert not run.exists()


@pytest.mark.parametrize("env, words", [
    ({"SLURM_NNODES": "2"}, ["HEAD_ADDR is not set", "head node cannot be found", "export HEAD_ADDR"]),  # no head to meet, none to find
    ({"SLURM_NNODES": "2", "HEAD_ADDR": "127.0.0.1", "SLURM_STEP_NUM_TASKS": "4"},
     ["srun started 4 tasks on 2 nodes", "--ntasks-per-node 1"]),  # two agents per node
])
def test_launch_node_refuses_what_cannot_meet(env, words, tmp_path):
    proc = subprocess.run(["bash", str(LAUNCH_NODE), "--tokens", str(tmp_path / "none"), "--out", str(tmp_path / "run")],
                          env=child_env(**env, PYTHON=sys.executable), cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "run").exists()
