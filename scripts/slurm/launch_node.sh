#!/usr/bin/env bash
# One node's share of a many-node `astropt train`: one torchrun agent, which starts one training process per
# GPU of this node; the agents of all nodes meet at the head node (torchrun's c10d rendezvous), which then
# numbers the ranks. train_multinode.sbatch runs this once per node (srun --ntasks-per-node 1); the tests run
# it once per "node" on one machine.
#
#   bash scripts/slurm/launch_node.sh TRAIN_ARGS...        (e.g. --tokens $SHARED/tokens --out $SHARED/runs/95m)
#
# Read from the environment (srun sets the SLURM_ ones on every task):
#   SLURM_NNODES           nodes in the job (default 1)
#   SLURM_NODEID           this node's index, for the log line (c10d numbers the nodes itself)
#   SLURM_JOB_ID           the rendezvous id: the agents of one job find each other by it (default astropt-train)
#   HEAD_ADDR              the head node's address (default: the first of `scontrol show hostnames`; required
#                          for several nodes outside SLURM)
#   RDZV_PORT              the rendezvous port on the head node (default 29500)
#   GPUS_PER_NODE          training processes per node (default SLURM_GPUS_ON_NODE, else 1)
#   JOIN_TIMEOUT           seconds an agent waits for the other nodes before it gives up (default 600)
#   PYTHON                 the Python with astropt and torch (default python)
set -euo pipefail

nnodes=${SLURM_NNODES:-1}
node=${SLURM_NODEID:-0}
job=${SLURM_JOB_ID:-astropt-train}
port=${RDZV_PORT:-29500}
gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
join_timeout=${JOIN_TIMEOUT:-600}
python=${PYTHON:-python}

fail() { echo "error: $*" >&2; exit 2; }

head=${HEAD_ADDR:-}
if [[ -z $head && -n ${SLURM_JOB_NODELIST:-} ]] && command -v scontrol >/dev/null; then
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
if [[ -z $head ]]; then
  [[ $nnodes == 1 ]] || fail "HEAD_ADDR is not set and the head node cannot be found (no SLURM_JOB_NODELIST," \
    "or no scontrol to read it): export HEAD_ADDR=<the first node's address> on every node"
  head=127.0.0.1
fi
# one agent per node: more tasks than nodes would be agents the rendezvous does not expect
tasks=${SLURM_STEP_NUM_TASKS:-$nnodes}
[[ $tasks == "$nnodes" ]] || fail "srun started $tasks tasks on $nnodes nodes: run one per node" \
  "(srun --ntasks-per-node 1); torchrun starts the $gpus process(es) of each node"

echo "node $node of $nnodes: torchrun agent for $gpus process(es), rendezvous $job at $head:$port" \
  "(waiting up to $join_timeout s for the other nodes)" >&2
# exec: SLURM's SIGTERM (scancel, --signal) reaches torchrun, which passes it to the training processes
exec "$python" -m torch.distributed.run --nnodes "$nnodes" --nproc-per-node "$gpus" \
  --rdzv-backend c10d --rdzv-endpoint "$head:$port" --rdzv-id "$job" --rdzv-conf "join_timeout=$join_timeout" \
  -m astropt_tok train "$@"
