"""How this process was launched: alone, as one rank of a torchrun job (RANK/WORLD_SIZE/MASTER_ADDR/...), or as
one task of a SLURM array (SLURM_ARRAY_TASK_ID/COUNT/MIN), read and checked in one place, and the process group
its ranks join.

A task of an `srun` step of several tasks (SLURM_STEP_NUM_TASKS > 1) must be a torchrun agent's rank: srun
starting the tool itself on N tasks gives N processes that do not know of each other, each doing the whole job
into the same output, so that is one error pointing to one torchrun per node (README, "Many nodes"). The ranks
are not taken from SLURM_PROCID/SLURM_LOCALID instead: torchrun's c10d rendezvous already numbers the ranks of
many nodes on any cluster, SLURM or not, so there is one launch path to document and test.

`read_launch()` parses the variables into a `LaunchEnv`; every value that is not a whole number, is negative,
or disagrees with another (RANK >= WORLD_SIZE, WORLD_SIZE without MASTER_ADDR, a SLURM array count without a
task id, ...) is one `AstroptError` naming the variables, their values and what to do. Nothing else in the
tool reads these variables. An empty variable (`export RANK=`) counts as unset.

`RankGroup` joins the ranks of a torchrun job with a bounded timeout (`--dist-timeout`). A stale environment,
RANK/WORLD_SIZE/MASTER_ADDR left in a shell with no other process to meet, is the likely way to meet a
launch problem on a cluster; torch would wait for the missing ranks for its default half hour (tokenise
used to wait 12 hours), silently. Here each rank first says which rank it is and what it waits for, and a
rendezvous that does not complete within the timeout is one error naming the variables.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Mapping

from astropt_tok.errors import AstroptError, first_line

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ARRAY_VARIABLES = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN")
# set by srun on every task of a step (SLURM_NODEID and SLURM_LOCALID too, which add nothing here); an sbatch
# script's own shell has no SLURM_STEP_NUM_TASKS, so running the tool there is a plain single process
SRUN_VARIABLES = ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID")
_SRUN_ADVICE = ("start one torchrun per node instead: srun --ntasks-per-node 1 torchrun --nnodes $SLURM_NNODES "
                "--rdzv-backend c10d ... (scripts/slurm/train_multinode.sbatch; README, \"Many nodes\")")
DEFAULT_DIST_TIMEOUT_S = 600.0  # the rendezvous and every collective; minutes, not torch's half hour
# Waits for other ranks' work (tokenise's store preparation and end of shards, training's checkpoint writes)
# use a separate gloo group with this timeout: ranks may legitimately finish hours apart. A rank that dies
# closes its connections, so the others fail at once rather than waiting this long.
WORK_WAIT_S = 7 * 24 * 3600.0
_UNSET_ADVICE = "unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT, or launch with torchrun"


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in its job, from the launch variables: how = "single", "torchrun" (RANK/WORLD_SIZE
    set, by torchrun or by hand) or "slurm-array"."""

    how: str = "single"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int | None = None  # None: not given (a launcher that sets LOCAL_RANK alone)
    master_addr: str | None = None
    master_port: int | None = None
    array_task_id: int | None = None
    array_task_count: int | None = None
    array_task_min: int | None = None
    by_torchrun: bool = False  # started by torchrun itself (TORCHELASTIC_RUN_ID), not by variables set by hand

    @property
    def distributed(self) -> bool:
        """Whether this process is one of several torchrun ranks that must join a process group."""
        return self.how == "torchrun" and self.world_size > 1

    @property
    def processes_per_node(self) -> int:
        """Processes of this job on this node: LOCAL_WORLD_SIZE, else 1."""
        return self.local_world_size or 1

    def variables(self) -> str:
        """The launch variables in force, as `NAME=value` words (for messages)."""
        if self.how == "slurm-array":
            return (f"SLURM_ARRAY_TASK_ID={self.array_task_id} SLURM_ARRAY_TASK_COUNT={self.array_task_count}"
                    + (f" SLURM_ARRAY_TASK_MIN={self.array_task_min}" if self.array_task_min is not None else ""))
        if self.how == "torchrun":
            return " ".join(f"{k}={v}" for k, v in (("RANK", self.rank), ("WORLD_SIZE", self.world_size),
                                                    ("MASTER_ADDR", self.master_addr),
                                                    ("MASTER_PORT", self.master_port)) if v is not None)
        return "no launch variables"


def _shown(name: str, value: str) -> str:
    return f"{name}={value}" if value.isprintable() and value.strip() == value and " " not in value else f"{name}={value!r}"


def _whole(env: Mapping[str, str], name: str, least: int, advice: str) -> int | None:
    """The variable as an int >= least, None when unset or empty; anything else is one error."""
    value = env.get(name, "")
    if value == "":
        return None
    if not re.fullmatch(r"\s*-?[0-9]+\s*", value):
        raise AstroptError(f"{_shown(name, value)} is not a whole number: {advice}")
    number = int(value)
    if number < least:
        why = "negative" if number < 0 else f"less than {least}"
        raise AstroptError(f"{_shown(name, value)} is {why}: {advice}")
    return number


def read_launch(environ: Mapping[str, str] | None = None, arrays: bool = True) -> LaunchEnv:
    """The checked launch environment of this process (`environ`: os.environ). `arrays` False ignores the SLURM
    array variables (training: an array of training runs is a sweep of separate runs, not ranks of one)."""
    env = os.environ if environ is None else environ
    advice = _UNSET_ADVICE
    rank = _whole(env, "RANK", 0, advice)
    world = _whole(env, "WORLD_SIZE", 1, advice)
    local_rank = _whole(env, "LOCAL_RANK", 0, advice)
    local_world = _whole(env, "LOCAL_WORLD_SIZE", 1, advice)
    if (rank is None) != (world is None):
        given, missing = ("RANK", "WORLD_SIZE") if world is None else ("WORLD_SIZE", "RANK")
        raise AstroptError(f"{_shown(given, env[given])} is set without {missing}: torchrun sets both; {advice}")
    if world is None and (local_rank is not None or local_world is not None):
        name = "LOCAL_RANK" if local_rank is not None else "LOCAL_WORLD_SIZE"
        raise AstroptError(f"{_shown(name, env[name])} is set without RANK/WORLD_SIZE: {advice}")
    task = count = first = None
    if arrays:
        array_advice = ("unset SLURM_ARRAY_TASK_ID SLURM_ARRAY_TASK_COUNT SLURM_ARRAY_TASK_MIN, or submit with "
                        "sbatch --array")
        task = _whole(env, "SLURM_ARRAY_TASK_ID", 0, array_advice)
        count = _whole(env, "SLURM_ARRAY_TASK_COUNT", 1, array_advice)
        first = _whole(env, "SLURM_ARRAY_TASK_MIN", 0, array_advice)
        if (task is None) != (count is None) or (first is not None and task is None):
            given = next(n for n, v in (("SLURM_ARRAY_TASK_COUNT", count), ("SLURM_ARRAY_TASK_ID", task),
                                        ("SLURM_ARRAY_TASK_MIN", first)) if v is not None)
            missing = "SLURM_ARRAY_TASK_COUNT" if count is None else "SLURM_ARRAY_TASK_ID"
            raise AstroptError(f"{_shown(given, env[given])} is set without {missing}: a SLURM array task has "
                               f"both; {array_advice}")
        if task is not None and not 0 <= task - (first or 0) < count:
            raise AstroptError(
                f"SLURM_ARRAY_TASK_ID={task} is not among the {count} tasks from SLURM_ARRAY_TASK_MIN={first or 0}: "
                f"each process takes shards by its place in the array, so the array must be contiguous "
                f"(sbatch --array=0-{count - 1}, without a step or a list)")
    by_torchrun = bool(env.get("TORCHELASTIC_RUN_ID"))
    _check_srun_step(env, world)
    if world is None:
        if task is None:
            return LaunchEnv()
        return LaunchEnv("slurm-array", task - (first or 0), count, array_task_id=task, array_task_count=count,
                         array_task_min=first)
    if rank >= world:
        raise AstroptError(f"RANK={rank} is not below WORLD_SIZE={world} (ranks count from 0): {advice}")
    if local_world is not None and local_world > world:
        raise AstroptError(f"LOCAL_WORLD_SIZE={local_world} is more than WORLD_SIZE={world}: {advice}")
    if local_rank is not None and local_rank >= (local_world if local_world is not None else world):
        bound = "LOCAL_WORLD_SIZE" if local_world is not None else "WORLD_SIZE"
        raise AstroptError(f"LOCAL_RANK={local_rank} is not below {bound}={local_world or world}: {advice}")
    addr, port = env.get("MASTER_ADDR", "").strip() or None, None
    if world > 1:
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not env.get(n, "").strip()]
        if missing:
            raise AstroptError(f"WORLD_SIZE={world} without {'/'.join(missing)}: the ranks cannot find each other; "
                               f"{advice} (which sets them)")
        port = _whole(env, "MASTER_PORT", 1, advice)
        if port > 65535:
            raise AstroptError(f"MASTER_PORT={port} is not a port (1..65535): {advice}")
    if count is not None and count > 1 and world > 1:
        raise AstroptError(f"both torchrun (WORLD_SIZE={world}) and a SLURM array (SLURM_ARRAY_TASK_COUNT={count}) "
                           "are set: the shards are split over one of them; run one process per array task, or "
                           "one torchrun job")
    return LaunchEnv("torchrun", rank, world, local_rank or 0, local_world, addr, port, by_torchrun=by_torchrun)


def _check_srun_step(env: Mapping[str, str], world: int | None) -> None:
    """One error when this process is one of several tasks of an srun step that are not all ranks of one job:
    srun started the tool itself (no WORLD_SIZE), or a torchrun per task whose job is smaller than the step
    (`srun -n 4 torchrun --standalone ...`: four separate jobs)."""
    tasks = _whole(env, "SLURM_STEP_NUM_TASKS", 1, "srun sets it to the number of tasks of its step; unset it if "
                   "it was set by hand")
    if tasks is None or tasks == 1 or (world is not None and world >= tasks):
        return
    task = env.get("SLURM_PROCID", "").strip()
    this = f", this one SLURM_PROCID={task}" if task.isdigit() else ""
    if world is None:
        raise AstroptError(f"srun started {tasks} tasks (SLURM_STEP_NUM_TASKS={tasks}{this}) without torchrun: they "
                           f"would be {tasks} separate runs of the whole job into one output, not ranks of one; "
                           + _SRUN_ADVICE)
    raise AstroptError(f"srun started {tasks} tasks (SLURM_STEP_NUM_TASKS={tasks}{this}) but this torchrun job has "
                       f"only WORLD_SIZE={world}: the tasks are separate jobs (torchrun --standalone, or --nnodes 1, "
                       f"in each), not one; " + _SRUN_ADVICE)


def dist_timeout(seconds) -> datetime.timedelta:
    """--dist-timeout SECONDS as a timedelta; not a positive finite number is one error."""
    import math

    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
        raise AstroptError(f"--dist-timeout must be a positive number of seconds, got {seconds!r}")
    return datetime.timedelta(seconds=float(seconds))


# ---------------------------------------------------------------------------------------------------------
# the process group of a torchrun job


@contextlib.contextmanager
def _torch_logs_held():
    """Hold what torch's C++ side writes to stderr (file descriptor 2) while the block runs: a rank whose master
    is not there logs every retry with a C++ stack dump. On success it is written out as it came; on failure
    it is dropped, since the failure becomes one error line that carries torch's own message."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to hold
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if ok:
                held.seek(0)
                text = held.read()
                if text:
                    os.write(2, text)


class RankGroup:
    """The process group of a torchrun job, joined with a bounded timeout, or nothing for a single process.

    `join()` prints one line saying which rank waits for what, then joins the default process group
    (`backend`, `timeout`): a rendezvous that fails or times out is one AstroptError naming the launch
    variables and what to do. Collectives on the default group then have that timeout too.

    `wait_for_all(what)` is the barrier for waits on other ranks' *work*, which may take far longer than the
    timeout (tokenise's ranks finish their shards minutes or hours apart; rank 0 writes a large checkpoint
    while the others wait). It runs on a second gloo group made at join with a timeout of WORK_WAIT_S. A
    second group, rather than polling files on disk: it works for any wait (not only ones that leave
    records), it needs no shared file system, and a rank that dies closes its gloo connections, so the others
    learn it at once (one error) instead of polling for records that never come.
    """

    def __init__(self, launch: LaunchEnv):
        self.launch = launch
        self.active = False  # joined: wait_for_all waits for the other ranks
        self.patient = None  # the gloo group of long waits
        self.owned = False  # this object made the default group (and so destroys it)

    def join(self, backend: str, timeout: datetime.timedelta) -> "RankGroup":
        """Join the job's process group (a no-op for a single process); returns self."""
        launch = self.launch
        if not launch.distributed:
            return self
        import torch.distributed as dist

        if dist.is_initialized():  # a caller (a notebook, a test harness) already joined: use its group
            self.active = True
            self.patient = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=WORK_WAIT_S))
            return self
        seconds = timeout.total_seconds()
        source = "torchrun" if launch.by_torchrun else "RANK/WORLD_SIZE/MASTER_ADDR from the environment"
        print(f"rank {launch.rank} of {launch.world_size}: joining the process group at "
              f"{launch.master_addr}:{launch.master_port} ({source}); waiting up to {seconds:g} s for the other "
              f"ranks", file=sys.stderr, flush=True)
        try:
            with _torch_logs_held():
                dist.init_process_group(backend, timeout=timeout, rank=launch.rank, world_size=launch.world_size)
                self.active = self.owned = True
                self.patient = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=WORK_WAIT_S))
        except (RuntimeError, TimeoutError, ValueError, OSError) as exc:  # DistStoreError, DistNetworkError, ...
            self.close()
            if launch.by_torchrun:  # torchrun set the variables: the other ranks (or nodes) did not come
                what = (f"torchrun set {launch.variables()}: start every node's torchrun of this job, or give slow "
                        "starters more time with --dist-timeout")
            else:
                what = (f"{launch.variables()} came from the environment: if they are left over from another job, "
                        f"unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT; otherwise start "
                        f"all {launch.world_size} ranks (torchrun --nproc_per_node ...), or give slow starters more "
                        "time with --dist-timeout")
            raise AstroptError(f"rank {launch.rank} of {launch.world_size} could not join the process group at "
                               f"{launch.master_addr}:{launch.master_port} within {seconds:g} s (torch: "
                               f"{first_line(exc, 300)}). {what}") from None
        return self

    def wait_for_all(self, what: str) -> None:
        """Wait until every rank gets here (`what`: what the wait is for, in the error when a rank is gone)."""
        if not self.active:
            return
        import torch.distributed as dist

        try:
            dist.barrier(group=self.patient)
        except (RuntimeError, TimeoutError) as exc:
            raise AstroptError(
                f"rank {self.launch.rank} of {self.launch.world_size}: another rank stopped while this one waited "
                f"for {what} (torch: {first_line(exc, 300)}); see that rank's error") from None

    def close(self) -> None:
        """Leave the process group (safe to call twice, and when never joined)."""
        if not self.active and not self.owned:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            if self.owned:
                dist.destroy_process_group()  # the patient group with it
            elif self.patient is not None:
                dist.destroy_process_group(self.patient)
        self.patient, self.active, self.owned = None, False, False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        if exc_type is None and self.active:  # ranks leave together: gloo can abort a rank whose peers tore down
            self.wait_for_all("the other ranks to finish")  # their connections while it was still leaving
        self.close()

