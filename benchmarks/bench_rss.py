"""Peak memory of a training run on a small and a large synthetic store: the trainer keeps no copy of the store.

Writes two stores of random AION-sized rows (vocab 4375, 576 int16 tokens; 10k and 1M rows by default), then
runs the same short training on each in a fresh process and reports that process's peak RSS (the kernel's
VmHWM, which counts memory-mapped store pages it touched) and, sampled every 20 ms, its peak anonymous RSS
(memory that is not a file mapping: what a copy of the store would show up in).

    python benchmarks/bench_rss.py                  # prints one JSON object
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, {repo!r})
peak = {{"anon_kb": 0}}
def status():
    out = {{}}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0])
    return out
def sample():
    while True:
        peak["anon_kb"] = max(peak["anon_kb"], status()["RssAnon"])
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
from astropt_train.config import build_config
from astropt_train.loop import train
s = train(build_config(json.loads(sys.argv[1])))
st = status()
print(json.dumps({{"peak_rss_mb": st["VmHWM"] / 1024, "peak_anon_mb": max(peak["anon_kb"], st["RssAnon"]) / 1024,
                  "final_file_rss_mb": st["RssFile"] / 1024, "step": s["step"]}}))
"""


def write_store(path: Path, rows: int, shards: int, tokens_per_image: int = 576, ids: bool = False) -> None:
    """A complete arrow store of random rows, written a shard at a time (never the whole store in memory); with
    `ids`, an object_id column ("obj0000000042", 13 characters) as a survey's id column gives."""
    import numpy as np

    from astropt_tok.store import finalize_store, mark_shard_done, new_manifest, shard_bounds, write_manifest, write_shard

    path.mkdir(parents=True)
    codec = {"id": "synthetic", "vocab_size": 4375, "tokens_per_image": tokens_per_image}
    manifest = new_manifest(codec=codec, bands=["DES-G", "DES-R", "DES-I", "DES-Z"], storage="arrow",
                            num_shards=shards, precision="fp32", source={"id": "random", "kind": "arrays", "num_rows": rows})
    write_manifest(path, manifest)
    bounds = shard_bounds(rows, shards)
    rng = np.random.default_rng(0)
    for i in range(shards):
        lo, hi = bounds[i], bounds[i + 1]
        tokens = rng.integers(0, 4375, size=(hi - lo, tokens_per_image), dtype=np.int16)
        object_ids = [f"obj{r:010d}" for r in range(lo, hi)] if ids else None
        mark_shard_done(path, write_shard(path, i, "arrow", tokens, np.arange(lo, hi, dtype=np.int64), object_ids), [])
    finalize_store(path, manifest)


def main() -> None:
    """Build both stores, train on each in a fresh process, print the peaks and their differences."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--large", type=int, default=1_000_000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--tmp", default=None, help="where to write the stores (default: the system temp dir)")
    args = ap.parse_args()

    results = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for name, rows in (("small", args.small), ("large", args.large)):
            store = Path(tmp) / name
            write_store(store, rows, shards=max(1, rows // 62_500))
            cfg = dict(tokens=str(store), out=str(Path(tmp) / f"run-{name}"), preset="tiny", batch_size=args.batch_size,
                       max_iters=args.steps, eval_interval=max(1, args.steps // 2), eval_iters=2, val_images=0,
                       log_interval=10, live=False, device="cpu", workers=args.workers)
            out = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO)), json.dumps(cfg)],
                                 capture_output=True, text=True, check=True)
            results[name] = {"rows": rows, **json.loads(out.stdout.strip().splitlines()[-1])}
    results["diff_peak_rss_mb"] = round(results["large"]["peak_rss_mb"] - results["small"]["peak_rss_mb"], 1)
    results["diff_peak_anon_mb"] = round(results["large"]["peak_anon_mb"] - results["small"]["peak_anon_mb"], 1)
    results["steps"], results["batch_size"], results["workers"] = args.steps, args.batch_size, args.workers
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
