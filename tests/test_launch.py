"""The launch environment (`astropt_tok.launch`): every bad or inconsistent launch variable is one `error:` line
before any work, for `tokenise` and `train` through the real CLI; a stale RANK/WORLD_SIZE/MASTER_ADDR left in a
shell is one error within --dist-timeout (real gloo rendezvous in a child process), not a hang; and waits for
other ranks' work are not cut by that timeout, while a rank that dies ends them at once.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from astropt_tok.errors import AstroptError
from astropt_tok.launch import ARRAY_VARIABLES, RANK_VARIABLES, SRUN_VARIABLES, LaunchEnv, read_launch
from test_hostile import assert_one_error, run_cli

REPO = Path(__file__).resolve().parents[1]
ALL_VARIABLES = (*RANK_VARIABLES, *ARRAY_VARIABLES, *SRUN_VARIABLES, "TORCHELASTIC_RUN_ID")
HANG_GUARD_S = 180  # a child that runs past this is a hang: the test fails with its output
MASTER = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}


@pytest.fixture
def clean_env(monkeypatch):
    """No launch variable from the shell that runs the tests; returns monkeypatch to set some."""
    for name in ALL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**launch) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ALL_VARIABLES}
    env.update(launch, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


# ---------------------------------------------------------------------------------------------------------
# parsing: good environments


def test_good_environments_parse():
    assert read_launch({}) == LaunchEnv()
    assert read_launch({"RANK": "", "WORLD_SIZE": "", "SLURM_ARRAY_TASK_ID": ""}) == LaunchEnv()  # empty = unset
    env = read_launch({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", **MASTER})
    assert (env.how, env.rank, env.world_size, env.local_rank, env.processes_per_node) == ("torchrun", 3, 4, 1, 2)
    assert env.distributed and (env.master_addr, env.master_port) == ("127.0.0.1", 29511)
    assert read_launch({"RANK": "0", "WORLD_SIZE": "1"}).distributed is False  # torchrun of one: no group needed
    array = read_launch({"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "4"})
    assert (array.how, array.rank, array.world_size, array.distributed) == ("slurm-array", 2, 4, False)
    # training ignores the array variables (an array of runs is a sweep), however they are set
    assert read_launch({"SLURM_ARRAY_TASK_COUNT": "abc"}, arrays=False) == LaunchEnv()
    # a torchrun of one process per array task is fine; several of each is refused (below)
    assert read_launch({"RANK": "0", "WORLD_SIZE": "1", "SLURM_ARRAY_TASK_ID": "1",
                        "SLURM_ARRAY_TASK_COUNT": "2"}).how == "torchrun"


def test_srun_tasks_are_one_error_unless_they_are_torchrun_agents():
    """srun sets SLURM_STEP_NUM_TASKS, SLURM_PROCID, SLURM_NODEID and SLURM_LOCALID on every task of a step: the
    tool started by srun on several tasks is refused (they would be separate runs into one output), for training
    (arrays=False) as for tokenise; under one torchrun agent per node the ranks are torchrun's."""
    task = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "1", "SLURM_NODEID": "0", "SLURM_LOCALID": "1"}
    for arrays in (True, False):
        with pytest.raises(AstroptError, match=r"^srun started 4 tasks \(SLURM_STEP_NUM_TASKS=4, this one "
                                               r"SLURM_PROCID=1\) without torchrun"):
            read_launch(task, arrays=arrays)
    agent_task = {**task, "SLURM_STEP_NUM_TASKS": "2", "TORCHELASTIC_RUN_ID": "job", **MASTER,
                  "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    env = read_launch(agent_task, arrays=False)
    assert (env.how, env.rank, env.world_size, env.local_rank, env.by_torchrun) == ("torchrun", 3, 4, 1, True)
    # a torchrun (--standalone) in each of 4 tasks: 4 jobs of one process each
    with pytest.raises(AstroptError, match="only WORLD_SIZE=1: the tasks are separate jobs"):
        read_launch({**task, "RANK": "0", "WORLD_SIZE": "1"}, arrays=False)
    # one task (`srun astropt train`), and an sbatch script's own shell (SLURM_NTASKS, no step): one process
    assert read_launch({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}) == LaunchEnv()
    assert read_launch({"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_NODEID": "0"}, arrays=False) == LaunchEnv()


def test_tokenise_process_rank_from_environment(clean_env):
    from astropt_tok.executor import process_rank
    from astropt_tok.tokenise import TokeniseConfig

    clean_env.setenv("SLURM_ARRAY_TASK_ID", "12")
    clean_env.setenv("SLURM_ARRAY_TASK_MIN", "10")
    clean_env.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert process_rank(TokeniseConfig()) == (2, 4)
    assert process_rank(TokeniseConfig(rank=1, world_size=3)) == (1, 3)  # a caller's assignment wins
    for k in ARRAY_VARIABLES:
        clean_env.delenv(k)
    for k, v in {"RANK": "5", "WORLD_SIZE": "8", **MASTER}.items():
        clean_env.setenv(k, v)
    assert process_rank(TokeniseConfig()) == (5, 8)


# ---------------------------------------------------------------------------------------------------------
# the matrix: each variable bad in each way, one error line from `tokenise` and from `train`

GOOD = {"RANK": "0", "WORLD_SIZE": "2", **MASTER}
BAD_RANK_ENVIRONMENTS = [  # (environment, words the error must hold)
    ({**GOOD, "WORLD_SIZE": "abc"}, ["WORLD_SIZE=abc", "not a whole number", "unset"]),
    ({**GOOD, "WORLD_SIZE": "2.0"}, ["WORLD_SIZE=2.0", "not a whole number"]),
    ({**GOOD, "WORLD_SIZE": "-2"}, ["WORLD_SIZE=-2", "negative"]),
    ({**GOOD, "WORLD_SIZE": "0"}, ["WORLD_SIZE=0", "less than 1"]),
    ({**GOOD, "RANK": "one"}, ["RANK=one", "not a whole number"]),
    ({**GOOD, "RANK": "-1"}, ["RANK=-1", "negative"]),
    ({**GOOD, "RANK": "2"}, ["RANK=2", "WORLD_SIZE=2"]),
    ({**GOOD, "RANK": "7"}, ["RANK=7", "WORLD_SIZE=2"]),
    ({"WORLD_SIZE": "2", **MASTER}, ["WORLD_SIZE=2", "without RANK"]),
    ({"RANK": "1", **MASTER}, ["RANK=1", "without WORLD_SIZE"]),
    ({"RANK": "0", "WORLD_SIZE": "2"}, ["WORLD_SIZE=2", "MASTER_ADDR/MASTER_PORT"]),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29511"}, ["WORLD_SIZE=2", "MASTER_ADDR"]),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, ["WORLD_SIZE=2", "MASTER_PORT"]),
    ({**GOOD, "MASTER_PORT": "http"}, ["MASTER_PORT=http", "not a whole number"]),
    ({**GOOD, "MASTER_PORT": "0"}, ["MASTER_PORT=0"]),
    ({**GOOD, "MASTER_PORT": "70000"}, ["MASTER_PORT=70000", "1..65535"]),
    ({**GOOD, "LOCAL_RANK": "x"}, ["LOCAL_RANK=x", "not a whole number"]),
    ({**GOOD, "LOCAL_RANK": "-1"}, ["LOCAL_RANK=-1", "negative"]),
    ({**GOOD, "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, ["LOCAL_RANK=2", "LOCAL_WORLD_SIZE=2"]),
    ({**GOOD, "LOCAL_RANK": "2"}, ["LOCAL_RANK=2", "WORLD_SIZE=2"]),
    ({**GOOD, "LOCAL_WORLD_SIZE": "many"}, ["LOCAL_WORLD_SIZE=many", "not a whole number"]),
    ({**GOOD, "LOCAL_WORLD_SIZE": "0"}, ["LOCAL_WORLD_SIZE=0"]),
    ({**GOOD, "LOCAL_WORLD_SIZE": "4"}, ["LOCAL_WORLD_SIZE=4", "WORLD_SIZE=2"]),
    ({"LOCAL_RANK": "1"}, ["LOCAL_RANK=1", "without RANK/WORLD_SIZE"]),
    ({"LOCAL_WORLD_SIZE": "8"}, ["LOCAL_WORLD_SIZE=8", "without RANK/WORLD_SIZE"]),
    # srun started the tool itself on several tasks, or a torchrun per task of separate jobs
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "1"},
     ["srun started 4 tasks", "SLURM_PROCID=1", "without torchrun", "one torchrun per node", "Many nodes"]),
    ({"SLURM_STEP_NUM_TASKS": "4", "RANK": "0", "WORLD_SIZE": "1"}, ["srun started 4 tasks", "WORLD_SIZE=1"]),
    ({"SLURM_STEP_NUM_TASKS": "two"}, ["SLURM_STEP_NUM_TASKS=two", "not a whole number"]),
]
ARRAY = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4"}
BAD_ARRAY_ENVIRONMENTS = [
    ({"SLURM_ARRAY_TASK_COUNT": "4"}, ["SLURM_ARRAY_TASK_COUNT=4", "without SLURM_ARRAY_TASK_ID"]),
    ({"SLURM_ARRAY_TASK_ID": "3"}, ["SLURM_ARRAY_TASK_ID=3", "without SLURM_ARRAY_TASK_COUNT"]),
    ({"SLURM_ARRAY_TASK_MIN": "0"}, ["SLURM_ARRAY_TASK_MIN=0", "without"]),
    ({**ARRAY, "SLURM_ARRAY_TASK_ID": "abc"}, ["SLURM_ARRAY_TASK_ID=abc", "not a whole number"]),
    ({**ARRAY, "SLURM_ARRAY_TASK_ID": "-1"}, ["SLURM_ARRAY_TASK_ID=-1", "negative"]),
    ({**ARRAY, "SLURM_ARRAY_TASK_COUNT": "four"}, ["SLURM_ARRAY_TASK_COUNT=four", "not a whole number"]),
    ({**ARRAY, "SLURM_ARRAY_TASK_COUNT": "0"}, ["SLURM_ARRAY_TASK_COUNT=0"]),
    ({**ARRAY, "SLURM_ARRAY_TASK_COUNT": "-4"}, ["SLURM_ARRAY_TASK_COUNT=-4", "negative"]),
    ({**ARRAY, "SLURM_ARRAY_TASK_MIN": "x"}, ["SLURM_ARRAY_TASK_MIN=x", "not a whole number"]),
    ({**ARRAY, "SLURM_ARRAY_TASK_ID": "4"}, ["SLURM_ARRAY_TASK_ID=4", "contiguous"]),  # --array=0-6:2
    ({**ARRAY, "SLURM_ARRAY_TASK_MIN": "2"}, ["SLURM_ARRAY_TASK_ID=1", "SLURM_ARRAY_TASK_MIN=2"]),
    ({**ARRAY, **GOOD}, ["WORLD_SIZE=2", "SLURM_ARRAY_TASK_COUNT=4"]),  # a torchrun in each array task
]


def _ids(cases):
    return [" ".join(f"{k}={v}" for k, v in env.items()) for env, _ in cases]


@pytest.fixture(scope="module")
def tokenise_argv(survey_dir, codec_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("launch") / "store"
    return ["tokenise", "--source", survey_dir, "--codec", codec_dir, "--out", out, "--shards", "2",
            "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def train_argv(random_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("launch") / "run"
    return ["train", "--tokens", random_store, "--out", out, "--device", "cpu", "--max-iters", "1",
            "--val-images", "0"]


@pytest.mark.parametrize("env, words", BAD_RANK_ENVIRONMENTS + BAD_ARRAY_ENVIRONMENTS,
                         ids=_ids(BAD_RANK_ENVIRONMENTS + BAD_ARRAY_ENVIRONMENTS))
def test_bad_launch_environment_is_one_error_from_tokenise(env, words, tokenise_argv, clean_env, capsys):
    for k, v in env.items():
        clean_env.setenv(k, v)
    code, _, err = run_cli(tokenise_argv, capsys)
    assert code == 1
    assert_one_error(code, err, *words)
    assert not Path(tokenise_argv[6]).exists()  # refused before the store folder was made


@pytest.mark.parametrize("env, words", BAD_RANK_ENVIRONMENTS, ids=_ids(BAD_RANK_ENVIRONMENTS))
def test_bad_launch_environment_is_one_error_from_train(env, words, train_argv, clean_env, capsys):
    for k, v in env.items():
        clean_env.setenv(k, v)
    code, _, err = run_cli(train_argv, capsys)
    assert code == 1
    assert_one_error(code, err, *words)
    assert not Path(train_argv[4]).exists()  # refused before the run folder was made


def test_train_ignores_slurm_array_variables(train_argv, clean_env, capsys, tmp_path):
    """An array of training runs is a sweep: each task trains alone, whatever the array variables say."""
    clean_env.setenv("SLURM_ARRAY_TASK_COUNT", "4")  # even malformed ones: training does not read them
    argv = [*train_argv[:4], tmp_path / "run", *train_argv[5:], "--batch-size", "2", "--eval-iters", "1",
            "--n-layer", "1", "--n-head", "1", "--n-embd", "8"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "done: step 1" in out


@pytest.mark.parametrize("argv_fixture", ["tokenise_argv", "train_argv"])
@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_dist_timeout_must_be_positive(argv_fixture, value, request, clean_env, capsys):
    code, _, err = run_cli([*request.getfixturevalue(argv_fixture), "--dist-timeout", value], capsys)
    assert_one_error(code, err, "dist-timeout")


def test_dist_timeout_is_read_from_a_train_config_file(tmp_path):
    from astropt_train.config import build_config, to_toml

    (tmp_path / "c.toml").write_text('tokens = "x"\ndist_timeout = 42.5\n')
    cfg = build_config({}, config_file=tmp_path / "c.toml")
    assert cfg.dist_timeout == 42.5 and "dist_timeout = 42.5" in to_toml(cfg)
    (tmp_path / "bad.toml").write_text('tokens = "x"\ndist-timeout = "soon"\n')
    with pytest.raises(AstroptError, match="dist-timeout"):
        build_config({}, config_file=tmp_path / "bad.toml")


# ---------------------------------------------------------------------------------------------------------
# a stale environment: a real gloo rendezvous that nobody else joins


@pytest.mark.slow
@pytest.mark.parametrize("command", ["tokenise", "train"])
@pytest.mark.parametrize("rank", ["0", "1"])  # rank 0 hosts the rendezvous; rank 1 looks for a host not there
def test_stale_environment_is_one_error_within_the_timeout(command, rank, tokenise_argv, train_argv, tmp_path):
    argv = tokenise_argv if command == "tokenise" else train_argv
    argv = [str(a) for a in argv]
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    env = child_env(RANK=rank, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-m", "astropt_tok", *argv, "--dist-timeout", "2"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and "frame #" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for word in (f"rank {rank} of 2", "RANK", "WORLD_SIZE", "MASTER_ADDR", "unset", "--dist-timeout"):
        assert word in errors[0], (word, errors[0])
    # the progress line first says what this rank waits for, and nothing else is said
    assert lines == [f"rank {rank} of 2: joining the process group at 127.0.0.1:{env['MASTER_PORT']} (RANK/WORLD_SIZE/"
                     "MASTER_ADDR from the environment); waiting up to 2 s for the other ranks", errors[0]]
    assert not (tmp_path / "out").exists()  # nothing was written


# ---------------------------------------------------------------------------------------------------------
# waits for other ranks' work: longer than --dist-timeout is fine; a rank that dies ends them with one error

_TWO_RANKS = textwrap.dedent("""
    import datetime, os, sys, time
    from pathlib import Path
    from astropt_tok.errors import AstroptError
    from astropt_tok.launch import RankGroup, read_launch
    rank, mode, meet = int(os.environ["RANK"]), sys.argv[1], Path(sys.argv[2])
    # both ranks have imported torch before either joins: on a loaded machine one may start seconds after the
    # other, which the short timeout below must not be asked to absorb
    (meet / f"up-{rank}").touch()
    while not all((meet / f"up-{r}").exists() for r in (0, 1)):
        time.sleep(0.02)
    with RankGroup(read_launch()).join("gloo", datetime.timedelta(seconds=3)) as group:
        if rank == 1:
            time.sleep(6)  # twice the timeout: rank 0 waits for this rank's work
            if mode == "dies":
                os._exit(3)
        try:
            group.wait_for_all("rank 1's work")
        except AstroptError as exc:
            print(f"error: {exc}", flush=True)
            sys.exit(1)
    print(f"rank {rank} done", flush=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["slow", "dies"])
def test_waits_for_work_outlast_the_timeout_and_end_when_a_rank_dies(mode, tmp_path):
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_RANKS, mode, str(tmp_path)], cwd=REPO, text=True,
                              env=child_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    try:
        results = [p.communicate(timeout=HANG_GUARD_S) for p in procs]
    finally:
        for p in procs:
            p.kill()
    (out0, err0), (out1, err1) = results
    if mode == "slow":
        assert [p.returncode for p in procs] == [0, 0], err0[-2000:] + err1[-2000:]
        assert out0.strip() == "rank 0 done" and out1.strip() == "rank 1 done"
    else:
        assert procs[1].returncode == 3 and procs[0].returncode == 1, err0[-2000:]
        assert out0.startswith("error: rank 0 of 2: another rank stopped while this one waited for rank 1's work")
        assert "Traceback" not in err0
