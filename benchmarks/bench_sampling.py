"""`astropt decode --generate` wall time against torch's CPU thread count, measured side by side.

Runs the same decode (same checkpoint, seed and galaxies) with each --threads value in turn, `--repeats`
rounds interleaved so that a busy machine slows every contender alike; prints one JSON line with the median
seconds per thread count and their ratio to the first.

  python benchmarks/bench_sampling.py --checkpoint .astropt-demo/run --generate 16 --threads 1,2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder of astropt train (e.g. the demo's)")
    p.add_argument("--generate", type=int, default=16)
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to compare")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from astropt_train.use.decode import DecodeConfig, decode

    counts = [int(t) for t in args.threads.split(",")]
    seconds: dict[int, list[float]] = {t: [] for t in counts}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for t in counts:
                cfg = DecodeConfig(checkpoint=Path(args.checkpoint), generate=args.generate, threads=t, seed=0,
                                   top_k=100, out=Path(tmp) / f"g{t}.png", device="cpu", progress=False)
                t0 = time.perf_counter()
                decode(cfg)
                seconds[t].append(time.perf_counter() - t0)
    medians = {t: statistics.median(v) for t, v in seconds.items()}
    first = medians[counts[0]]
    print(json.dumps({"generate": args.generate, "cores": os.cpu_count(), "repeats": args.repeats,
                      "median_s": medians, "ratio_to_first": {t: m / first for t, m in medians.items()},
                      "all_s": seconds}))


if __name__ == "__main__":
    main()
