#!/usr/bin/env bash
# One script for a single-GPU machine without internet (H100: well under 8 minutes). It measures:
#   1. the full-size AION image codec (aion-base's architecture, random weights: no hub here) tokenising a
#      synthetic survey end to end (`tokenise`: all shard time, and after the first batch) and alone on
#      pre-loaded GPU tensors (called as the pipeline calls it, and as a plain AION call), fp32 and bf16,
#      with the fraction of time the codec waited for input;
#   2. the precision table: codec-alone rows/s for fp32 / tf32 / bf16 (and bf16 with channels-last weights,
#      an experiment) and the fraction of tokens identical to fp32 (on random weights: the agreement of the
#      real weights may differ);
#   3. the training step: 95M preset, bf16, torch.compile: tokens/s and MFU.
# Usage, from the repository root:   bash benchmarks/gpu.sh            (results as JSON under $OUT)
# Without datasets/zarr/polymathic-aion on the machine, first gather wheels where pip works:
#   bash ../shared/gpu/wheels.sh      # -> .whl/, carried with the repository
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench-out}
ROWS=${ROWS:-4096}
DEVICE=${DEVICE:-cuda}            # DEVICE=cpu CODEC_SIZE=tiny ROWS=32 TRAIN_ARGS=... for a dry run on a CPU
CODEC_SIZE=${CODEC_SIZE:-full}
TRAIN_ARGS=${TRAIN_ARGS:---preset 95M --dtype bf16 --compile --steps 60 --batch-size 32}
mkdir -p "$OUT"
if ! python3 -c "import datasets, zarr, aion" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
WORK=$(mktemp -d)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no GPU"; } | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
{ echo "cores $(nproc)"; df -h /dev/shm | tail -1; } | tee -a "$OUT/gpu.txt"  # reader processes need shared memory
NPROC=$(nproc)

t0=$(date +%s)
python3 - "$WORK" "$ROWS" "$NPROC" "$CODEC_SIZE" <<'PY'
import sys
from astropt_tok.codec import make_random_codec
from astropt_tok.synthetic import write_synthetic_survey
work, rows, nproc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
make_random_codec(f"{work}/codec", sys.argv[4])
write_synthetic_survey(f"{work}/survey", n_rows=rows, n_files=16, seed=7, row_group_size=64, processes=min(16, nproc))
PY
echo "setup: $(( $(date +%s) - t0 )) s"

BENCH="python3 benchmarks/bench_tokenise.py --survey $WORK/survey --codec $WORK/codec --codec-size $CODEC_SIZE \
  --rows $ROWS --device $DEVICE --batch-size 256 --workers $(( NPROC > 4 ? NPROC - 2 : 2 )) --shards 4 --repeats 2"
$BENCH --precision fp32 encode --json "$OUT/encode_fp32.json"
$BENCH --precision bf16 encode --json "$OUT/encode_bf16.json"
$BENCH precision --channels-last --json "$OUT/precision.json"
echo "tokenise benchmarks done: $(( $(date +%s) - t0 )) s"

python3 benchmarks/bench_train_step.py $TRAIN_ARGS --device $DEVICE | tee "$OUT/train_step.json"
echo "all done: $(( $(date +%s) - t0 )) s"
