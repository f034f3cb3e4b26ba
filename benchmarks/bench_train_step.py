"""Training-step throughput through the real trainer (`astropt_train.loop.train`): tokens/s and, on CUDA, MFU.

Builds a synthetic token store (random AION-sized rows: vocab 4375, 576 tokens) in a temporary folder, runs
--steps optimiser steps, and prints one JSON object. The first log interval (compilation, warm-up) is left
out of the reported figure, which is the median of the remaining intervals.

    python benchmarks/bench_train_step.py --preset 95M --dtype bf16 --compile --steps 60 --batch-size 32
    python benchmarks/bench_train_step.py --preset tiny --steps 6 --batch-size 2 --device cpu   # a CPU smoke run
    python benchmarks/bench_train_step.py --modalities 2 --batch-size 16 --shuffle-modalities --loss-chunks 8

`--modalities 2` trains on a store of two token columns (legacysurvey_image, hsc_image: 1,152 tokens a galaxy);
halve --batch-size against a one-modality run for the same tokens per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

LS_BANDS = ("DES-G", "DES-R", "DES-I", "DES-Z")
HSC_BANDS = ("HSC-G", "HSC-R", "HSC-I", "HSC-Z", "HSC-Y")
TWO = ("legacysurvey_image", "hsc_image")  # --modalities 2: the store's two token columns


def main(argv: list[str] | None = None) -> dict:
    """Parse flags, train on a synthetic store, print and return the JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="95M")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--deterministic", action="store_true", help="train --deterministic (its cost)")
    ap.add_argument("--loss-chunks", type=int, default=1, help="train --loss-chunks (1: plain cross-entropy)")
    ap.add_argument("--modalities", type=int, choices=[1, 2], default=1, help="token columns per galaxy")
    ap.add_argument("--shuffle-modalities", action="store_true", help="train --shuffle-modalities (--modalities 2)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--log-interval", type=int, default=None, help="default: steps // 6")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="train --threads (default: torch's own)")
    ap.add_argument("--rows", type=int, default=None, help="store rows (default: enough for one epoch of steps)")
    ap.add_argument("--json", type=Path, help="also write the JSON object to this file")
    args = ap.parse_args(argv)

    import numpy as np

    from astropt_tok.store import write_store_from_arrays
    from astropt_train.config import build_config
    from astropt_train.loop import train

    rows = args.rows or max(512, args.batch_size * args.grad_accum * args.steps + 64)
    log_interval = args.log_interval or max(1, args.steps // 6)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = Path(tmp) / "store"
        rng = np.random.default_rng(0)
        codec = {"id": "synthetic", "vocab_size": 4375, "tokens_per_image": 576}
        if args.modalities == 1:
            tokens = rng.integers(0, 4375, size=(rows, 576), dtype=np.int16)
            write_store_from_arrays(store, tokens, num_shards=4, bands=list(LS_BANDS), codec=codec)
        else:
            columns = {name: rng.integers(0, 4375, size=(rows, 576), dtype=np.int16) for name in TWO}
            write_store_from_arrays(store, columns, num_shards=4, codec=codec,
                                    bands={TWO[0]: list(LS_BANDS), TWO[1]: list(HSC_BANDS)})
        cfg = build_config(dict(
            tokens=str(store), out=str(Path(tmp) / "run"), preset=args.preset, dtype=args.dtype,
            compile=args.compile, max_iters=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
            warmup_iters=min(10, args.steps), log_interval=log_interval, eval_interval=args.steps, eval_iters=1,
            val_images=0, save=False, device=args.device, workers=args.workers, live=False, val_fraction=0.01,
            deterministic=args.deterministic, loss_chunks=args.loss_chunks,
            shuffle_modalities=args.shuffle_modalities, threads=args.threads,
        ))
        t1 = time.perf_counter()
        summary = train(cfg)
        t2 = time.perf_counter()
    out = {
        "preset": args.preset, "dtype": args.dtype, "compile": args.compile, "deterministic": args.deterministic,
        "loss_chunks": args.loss_chunks, "modalities": args.modalities, "shuffle_modalities": args.shuffle_modalities,
        "batch_size": args.batch_size, "tokens_per_step": args.batch_size * args.grad_accum * (576 * args.modalities - 1),
        "grad_accum": args.grad_accum, "threads": args.threads, "steps": args.steps, "params": summary["params"],
        "device": summary.get("gpu", summary["device"]), "tokens_per_s": round(summary["tokens_per_s"]),
        "mfu": None if summary.get("mfu") is None else round(summary["mfu"], 4),
        "final_loss": summary["loss"], "store_build_s": round(t1 - t0, 1), "train_s": round(t2 - t1, 1),
    }
    print(json.dumps(out), flush=True)
    if args.json:
        from astropt_tok.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(out, indent=2) + "\n")  # whole or not at all
    return out


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
