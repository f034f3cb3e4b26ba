"""Generation tokens/s with and without the KV cache, side by side on the same model in one process.

Each repeat samples `--batch` galaxies of 576 tokens (a 1-token prefix, 575 sampled tokens) with the cache,
then the same with the cache off (the whole sequence re-run per token), with the same seed; the tokens
must be identical. Reports the median over repeats of each and the ratio.

    python benchmarks/bench_generate.py                       # tiny model (2 layers, 64 wide), 1 thread
    python benchmarks/bench_generate.py --preset small --threads 2 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def bench(preset: str, batch: int, repeats: int, threads: int | None, device: str, top_k: int | None, seed: int) -> dict:
    """Time `GPT.generate` with and without the KV cache; returns medians, tokens/s and their ratio."""
    import torch

    from astropt_train.config import PRESETS
    from astropt_train.model import GPT, GPTConfig

    if threads:
        torch.set_num_threads(threads)
    n_layer, n_head, n_embd = PRESETS[preset]
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=4375, block_size=576, n_layer=n_layer, n_head=n_head, n_embd=n_embd)).to(device).eval()
    prefix = torch.randint(0, 4375, (batch, 1), device=device)
    new = 575

    def run(kv: bool):
        gen = torch.Generator(device=device).manual_seed(seed)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(prefix, new, temperature=1.0, top_k=top_k, generator=gen, use_kv_cache=kv)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    run(True)  # warm-up (allocator, kernels)
    times = {True: [], False: []}
    for _ in range(repeats):
        for kv in (True, False):  # interleaved, so machine noise hits both alike
            dt, out = run(kv)
            times[kv].append(dt)
            if kv:
                ref = out
            elif not torch.equal(out, ref):
                raise SystemExit("KV-cache and full-recompute generation gave different tokens")
    med = {kv: statistics.median(v) for kv, v in times.items()}
    result = {
        "preset": preset, "params": model.num_params(), "batch": batch, "new_tokens": new, "repeats": repeats,
        "threads": torch.get_num_threads(), "device": device,
        "kv_cache_s": med[True], "no_cache_s": med[False],
        "kv_cache_tokens_per_s": batch * new / med[True], "no_cache_tokens_per_s": batch * new / med[False],
        "speedup": med[False] / med[True], "same_tokens": True,
    }
    if device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    return result


def main() -> None:
    """Parse flags, run the benchmark, print a table line and JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    r = bench(a.preset, a.batch, a.repeats, a.threads or None, a.device, a.top_k, a.seed)
    print(f"| {r['preset']} ({r['params'] / 1e6:.2f}M params), batch {r['batch']}, {r['device']}, {r['threads']} thread(s) "
          f"| {r['kv_cache_tokens_per_s']:.0f} tok/s | {r['no_cache_tokens_per_s']:.0f} tok/s | {r['speedup']:.1f}x |")
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
