"""The data layer at 1M and 10M galaxies with object ids: memory per rank and per DataLoader worker, loader
tokens/s and id lookups, for this code and for the store reader before ids were read lazily, side by side.

Writes one arrow store per --rows (random tokens, 16 tokens per image by default so 10M rows fit a small disk:
10M rows = 320 MB of tokens + 80 MB of row ids + ~170 MB of 13-character ids; 62,500 rows a shard, as
bench_rss.py) with bench_rss.write_store, then for each store and each reader runs one fresh process (one rank)
that reports its memory (/proc: RssAnon = the process's own heap, what per-row Python objects land in;
RssFile = memory-mapped store and library pages, reclaimable) at each step:

  opened   TokenStore(dir) + check_shards() (every shard opened, as the trainer does)
  ids      object_ids of 64 random rows and one row of every shard
  loader   --batches batches of --batch-size random rows through the trainer's own loader (EpochBatchSampler
           over every row, make_loader, pread) with each --workers count: tokens/s, and each worker's RssAnon
           and Pss (its proportional share, so pages shared with the rank count once)
  find     find_object_ids of 10 ids (the new reader builds its id index here): seconds, memory after
  find_again  find_object_ids of 10 other ids (the index built)

The old reader is astropt_tok/store.py as it was before the split into astropt_tok/store/ (`--old-ref`,
default: the parent of the commit that removed that file), loaded from `git show` into a temporary file.

    python benchmarks/loader_scale.py --rows 1000000 10000000      # prints one JSON object
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

CHILD = r"""
import importlib.util, json, sys, time
sys.path.insert(0, {repo!r})
import numpy as np
args = json.loads(sys.argv[1])

def status(pid="self"):
    out = {{}}
    for line in open(f"/proc/{{pid}}/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            out[k] = round(int(v.split()[0]) / 1024, 1)
    try:
        for line in open(f"/proc/{{pid}}/smaps_rollup"):
            k, _, v = line.partition(":")
            if k == "Pss":
                out["Pss"] = round(int(v.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out

if args["old"]:
    spec = importlib.util.spec_from_file_location("old_store", args["old"])
    module = sys.modules["old_store"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    TokenStore = module.TokenStore
else:
    from astropt_tok.store import TokenStore
from astropt_train.data import EpochBatchSampler, make_loader
import torch

res = {{"start": status()}}
store = TokenStore(args["store"])
store.check_shards()
res["opened"] = status()
rng = np.random.default_rng(0)
rows = np.concatenate([rng.integers(0, store.num_rows, 64), store.offsets[:-1]])
t = time.perf_counter()
ids = store.object_ids(rows)
res["ids"] = {{**status(), "seconds": round(time.perf_counter() - t, 3)}}
assert all(i == f"obj{{r:010d}}" for i, r in zip(ids, rows))
res["loader"] = {{}}
for workers in args["workers"]:
    sampler = EpochBatchSampler(np.arange(store.num_rows), args["batch_size"], seed=0)
    loader = make_loader(store, sampler, workers, pin_memory=False)
    it = iter(loader)
    for _ in range(10):
        next(it)
    t = time.perf_counter()
    for _ in range(args["batches"]):
        batch = next(it)
    s = time.perf_counter() - t
    entry = {{"tokens_per_s": round(args["batches"] * batch.numel() / s), **status()}}
    entry["workers"] = [status(w.pid) for w in getattr(it, "_workers", [])]
    res["loader"][str(workers)] = entry
    del it, loader, sampler
wanted = [f"obj{{r:010d}}" for r in rng.integers(0, store.num_rows, 10)]
t = time.perf_counter()
found = store.find_object_ids(wanted)
res["find"] = {{**status(), "seconds": round(time.perf_counter() - t, 3)}}
assert [f"obj{{r:010d}}" for r in found] == wanted
wanted = [f"obj{{r:010d}}" for r in rng.integers(0, store.num_rows, 10)]
t = time.perf_counter()
found = store.find_object_ids(wanted)
res["find_again"] = {{**status(), "seconds": round(time.perf_counter() - t, 4)}}
assert [f"obj{{r:010d}}" for r in found] == wanted
print(json.dumps(res))
"""


def old_reader(ref: str | None, tmp: Path) -> Path | None:
    """astropt_tok/store.py at `ref` (default: before the split into a package) in a temporary file."""
    try:
        if ref is None:
            removed = subprocess.run(["git", "-C", str(REPO), "rev-list", "-1", "HEAD", "--", "astropt_tok/store.py"],
                                     capture_output=True, text=True, check=True).stdout.strip()
            ref = f"{removed}^" if removed else None
        if ref is None:
            return None
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:astropt_tok/store.py"],
                              capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = tmp / "old_store.py"
    path.write_text(text)
    return path


def main() -> None:
    """Write each store, measure both readers on it in fresh processes, print the figures and the growth per row."""
    from bench_rss import write_store

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--tokens-per-image", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--old-ref", default=None, help="git ref of the old single-file reader (default: found)")
    ap.add_argument("--no-old", action="store_true", help="measure this code only")
    ap.add_argument("--tmp", default=None, help="where to write the stores (default: the system temp dir)")
    args = ap.parse_args()

    results = {"tokens_per_image": args.tokens_per_image, "batch_size": args.batch_size, "batches": args.batches,
               "workers": args.workers, "runs": {}}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        old = None if args.no_old else old_reader(args.old_ref, Path(tmp))
        readers = {"new": None, **({"old": str(old)} if old else {})}
        for rows in args.rows:
            store = Path(tmp) / f"store-{rows}"
            write_store(store, rows, shards=max(1, rows // 62_500), tokens_per_image=args.tokens_per_image, ids=True)
            for name, path in readers.items():
                child = dict(store=str(store), old=path, workers=args.workers, batch_size=args.batch_size,
                             batches=args.batches)
                out = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO)), json.dumps(child)],
                                     capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"{name} reader on {rows} rows failed:\n{out.stderr}")
                results["runs"][f"{name}-{rows}"] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{name} {rows}: done", file=sys.stderr, flush=True)
            import shutil

            shutil.rmtree(store)
    if len(args.rows) >= 2:  # growth of the rank's own heap per added row, opened and after the loader
        small, large = min(args.rows), max(args.rows)
        growth = {}
        for name in readers:
            a, b = results["runs"][f"{name}-{small}"], results["runs"][f"{name}-{large}"]
            per_row = lambda key: round((b[key]["RssAnon"] - a[key]["RssAnon"]) * 2**20 / (large - small), 1)
            growth[name] = {"opened_bytes_per_row": per_row("opened"), "ids_bytes_per_row": per_row("ids"),
                            "find_bytes_per_row": per_row("find")}
            for w in args.workers:  # the rank after its loader ran (the sampler's row arrays included), its workers
                la, lb = a["loader"][str(w)], b["loader"][str(w)]
                growth[name][f"loader_{w}_workers_rank_bytes_per_row"] = round(
                    (lb["RssAnon"] - la["RssAnon"]) * 2**20 / (large - small), 1)
                if lb["workers"]:
                    growth[name][f"loader_{w}_workers_worker_pss_bytes_per_row"] = round(
                        (max(x["Pss"] for x in lb["workers"]) - max(x["Pss"] for x in la["workers"])) * 2**20
                        / (large - small), 1)
        results["anon_growth"] = growth
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
