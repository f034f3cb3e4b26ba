"""`astropt embed` throughput: embeddings/s end to end next to the model's forward pass alone, and the loader's share.

Writes a random token store (`--rows` rows of 576 tokens, vocab 4375, `--shards` shards) and a randomly
initialised checkpoint of `--preset` into a temporary folder, then per repeat, interleaved:
  model alone  the same batches, already int64 on the device, through `hidden_states` + mean pooling
  embed        `embed()` into a fresh folder: shard reads by the reader thread, the model, Arrow shards written
and reports the median embeddings/s of each, their ratio, and the loader's share of `embed`'s time (the time
the model waited for a token batch / wall time).

    python benchmarks/bench_embed.py                                  # tiny preset, CPU
    python benchmarks/bench_embed.py --preset 95M --device cuda --rows 20000 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path


def bench(preset: str, rows: int, shards: int, batch_size: int, repeats: int, device: str, threads: int | None) -> dict:
    """Median embeddings/s of the model alone and of `embed`, and the loader's share of `embed`'s time."""
    import numpy as np
    import torch

    from astropt_tok.store import TokenStore, manifest_sha256, write_store_from_arrays
    from astropt_train import checkpoint as ck
    from astropt_train.config import PRESETS
    from astropt_train.model import GPT, GPTConfig
    from astropt_train.use.embed import EmbedConfig, embed, embed_batch, parse_layers

    if threads:
        torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    tokens = np.random.default_rng(0).integers(0, 4375, size=(rows, 576))
    write_store_from_arrays(tmp / "store", tokens, num_shards=shards,
                            codec={"id": "random", "vocab_size": 4375, "tokens_per_image": 576}, bands=["DES-G"],
                            object_ids=[f"obj{i}" for i in range(rows)])
    L, H, E = PRESETS[preset]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=4375, block_size=576, n_layer=L, n_head=H, n_embd=E)).eval()
    store = TokenStore(tmp / "store")
    config = {"model": asdict(model.config), "vocab_size": 4375, "tokens_per_image": 576, "step": 0,
              "store": {"dir": str(tmp / "store"), "manifest_sha256": manifest_sha256(tmp / "store"),
                        "codec_id": store.codec_id, "bands": store.bands}}
    ck.save_checkpoint(tmp / "run", 0, model.state_dict(), config, {"step": 0})
    model = model.to(device)
    cuda = device.startswith("cuda")
    layers = parse_layers("final", L)
    batches = [torch.from_numpy(tokens[a : a + batch_size]).to(device) for a in range(0, rows, batch_size)]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else None

    def model_alone() -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in batches:
            if amp is not None:
                with amp:
                    embed_batch(model, b, layers, "mean")[0].cpu()
            else:
                embed_batch(model, b, layers, "mean")[0].cpu()
        if cuda:
            torch.cuda.synchronize()
        return rows / (time.perf_counter() - t0)

    alone, full, share = [], [], []
    model_alone()  # warm-up (kernels, allocator)
    for r in range(repeats):
        alone.append(model_alone())
        res = embed(EmbedConfig(checkpoint=tmp / "run", out=tmp / f"emb-{r}", batch_size=batch_size, device=device,
                                progress=False))
        full.append(res.embeddings_per_s)
        share.append(res.loader_seconds / res.seconds)
    return {"preset": preset, "device": device, "rows": rows, "batch_size": batch_size, "repeats": repeats,
            "model_alone_per_s": statistics.median(alone), "embed_per_s": statistics.median(full),
            "embed_over_model_alone": statistics.median(full) / statistics.median(alone),
            "loader_share": statistics.median(share), "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    print(json.dumps(bench(a.preset, a.rows, a.shards, a.batch_size, a.repeats, a.device, a.threads), indent=2))


if __name__ == "__main__":
    main()
