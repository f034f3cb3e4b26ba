"""Tokens/s delivered by the trainer's DataLoader from a token store, against an upstream-style loader that
runs the AION image codec inside its collate function (as AstroPT's scripts/train_aion.py does).

Both see the same galaxies: random 4x160x160 images are encoded once by the full-size AION ImageCodec
architecture (random weights: throughput does not depend on them); the upstream-style loader re-encodes
them every batch, ours reads their tokens from a store (the same token rows tiled to --rows rows, so the
timed reads cover a realistically large file rather than a few cached rows).

    python benchmarks/bench_loader.py                 # prints one JSON object
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BANDS = ["DES-G", "DES-R", "DES-I", "DES-Z"]
FULL_CODEC = dict(quantizer_levels=[7, 5, 5, 5, 5], hidden_dims=512, multisurvey_projection_dims=54,
                  n_compressions=2, num_consecutive=4, embedding_dim=5)


class FluxRows(torch.utils.data.Dataset):
    """Rows shaped like the Legacy Survey dataset's items: {"image": {"flux": [4, H, W]}}."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": {"flux": self.images[i]}}


def collate_and_tokenise(batch, codec):
    """Upstream's pattern: stack the fluxes, wrap them as a LegacySurveyImage, encode the batch in the collate."""
    from aion.modalities import LegacySurveyImage

    flux = torch.stack([torch.as_tensor(item["image"]["flux"]) for item in batch])
    with torch.no_grad():
        tokens = codec.encode(LegacySurveyImage(flux=flux, bands=BANDS))
    return tokens.long()


def time_loader(loader, batches: int, warmup: int = 1) -> float:
    """Mean seconds per batch over `batches` batches after `warmup` batches."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - t) / batches


def main() -> None:
    """Run both loaders side by side and print a JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=16, help="images per batch for both loaders (upstream: 16)")
    ap.add_argument("--upstream-batch-size", type=int, default=None,
                    help="images per upstream-style batch (default: --batch-size; its images/s hardly depends on it)")
    ap.add_argument("--upstream-batches", type=int, default=3, help="timed upstream-style batches (~5 s each)")
    ap.add_argument("--store-batches", type=int, default=2000, help="timed batches from the store")
    ap.add_argument("--rows", type=int, default=100_000, help="rows in the store")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers for the store loader")
    ap.add_argument("--store-reads", nargs="+", default=["pread", "mmap"], choices=["pread", "mmap"],
                    help="how the store loader reads rows (pread: the trainer's default; mmap: through the maps)")
    ap.add_argument("--repeats", type=int, default=5, help="repeats of the store timing (median reported)")
    args = ap.parse_args()

    from aion.codecs.image import ImageCodec

    from astropt_tok.store import TokenStore, write_store_from_arrays
    from astropt_train.data import EpochBatchSampler, make_loader

    torch.manual_seed(0)
    codec = ImageCodec(**FULL_CODEC).eval()
    rng = np.random.default_rng(0)
    up_bs = args.upstream_batch_size or args.batch_size
    n_img = up_bs * (args.upstream_batches + 1)
    images = rng.normal(0, 1, size=(n_img, 4, 160, 160)).astype(np.float32)

    # upstream style: tokenise in the collate function, every batch, every epoch
    up_loader = torch.utils.data.DataLoader(FluxRows(images), batch_size=up_bs, num_workers=0,
                                            collate_fn=lambda b: collate_and_tokenise(b, codec))
    it = iter(up_loader)
    got = [next(it)]  # the first batch warms up, untimed
    per_batch = []
    for _ in range(args.upstream_batches):
        t = time.perf_counter()
        got.append(next(it))
        per_batch.append(time.perf_counter() - t)
    up_s = statistics.median(per_batch)  # median of the timed batches
    toks = torch.cat(got).numpy()  # the same galaxies' tokens, as the upstream-style loader produced them
    tpi = toks.shape[1]

    with tempfile.TemporaryDirectory() as tmp:
        store_dir = Path(tmp) / "store"
        tiled = toks[np.arange(args.rows) % len(toks)]
        write_store_from_arrays(store_dir, tiled, num_shards=args.shards,
                                codec={"id": "aion-full-random", "vocab_size": 4375, "tokens_per_image": tpi},
                                bands=BANDS)
        store = TokenStore(store_dir)
        ours = {}
        for reads in args.store_reads:
            times = []
            for r in range(args.repeats):
                sampler = EpochBatchSampler(np.arange(store.num_rows), args.batch_size, seed=r)
                loader = make_loader(store, sampler, args.workers, pin_memory=False, reads=reads)
                times.append(time_loader(loader, args.store_batches, warmup=10))
                del loader
            ours[reads] = statistics.median(times)

    up_tps = up_bs * tpi / up_s
    result = {
        "batch_size": args.batch_size, "tokens_per_image": tpi, "store_rows": args.rows, "workers": args.workers,
        "torch_threads": torch.get_num_threads(), "upstream_batches": args.upstream_batches,
        "upstream_style_tokens_per_s": round(up_tps, 1), "upstream_style_images_per_s": round(up_bs / up_s, 2), "upstream_batch_size": up_bs,
    }
    for reads, s in ours.items():
        tps = args.batch_size * tpi / s
        result[f"store_loader_{reads}_tokens_per_s"] = round(tps)
        result[f"speedup_{reads}"] = round(tps / up_tps)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
