"""The largest micro-batch per model preset that trains on this GPU: one training step as the trainer takes it
(bf16 autocast, fused AdamW, the real GPT at AION's 576 tokens and 4,375 codes, eager), per batch size.

The peak memory of a step is near linear in the batch: it is measured at batch 1 and 2, the largest batch
under --headroom of the GPU's memory is extrapolated from them, and then confirmed by a real step (lowered
by a tenth until one fits). Prints one JSON object per preset.

    python benchmarks/bench_memory.py --presets 95M 300M 700M
    python benchmarks/bench_memory.py --presets 95M 300M 700M --activation-checkpointing   # train's flag
Each result also holds `astropt plan`'s per-rank total for one GPU at the largest batch (its "DDP" or "DDP+AC"
row, overhead left out as max_memory_allocated leaves it out): measured / planned should be at most 1.
    python benchmarks/bench_memory.py --presets tiny --device cpu    # a smoke run: no memory figures on a CPU
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

VOCAB, TOKENS = 4375, 576


def step_peak_bytes(model, optimizer, batch: int, device: str) -> int | None:
    """Peak bytes allocated by one forward + backward + optimiser step at `batch`; None if out of memory."""
    import torch

    cuda = device.startswith("cuda")
    x = torch.randint(0, VOCAB, (batch, TOKENS), device=device)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cuda):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    except torch.cuda.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        return None
    finally:
        del x
    return torch.cuda.max_memory_allocated(device) if cuda else 0


def planned_bytes(preset: str, batch: int, checkpointing: bool) -> int:
    """`astropt plan`'s per-rank bytes (one GPU, bf16, overhead left out) of `preset` at `batch`."""
    from astropt_train.config import PRESETS
    from astropt_train.plan import OVERHEAD_BYTES, mode_total, model_shape

    shape = model_shape(preset, PRESETS[preset], VOCAB, TOKENS)
    return mode_total(shape, "DDP+AC" if checkpointing else "DDP", 1, batch, "bf16") - OVERHEAD_BYTES


def largest_batch(preset: str, device: str, headroom: float, checkpointing: bool = False) -> dict:
    """Largest batch whose training step fits in `headroom` of the device's memory, confirmed by a real step."""
    import torch

    from astropt_train.config import PRESETS
    from astropt_train.model import GPT, GPTConfig

    n_layer, n_head, n_embd = PRESETS[preset]
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=TOKENS, n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    model.to(device)
    for block in model.transformer.h:  # as `train --activation-checkpointing` sets it
        block.activation_checkpointing = checkpointing
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), torch.device(device).type)
    out = {"preset": preset, "params": model.num_params(), "device": device, "activation_checkpointing": checkpointing}
    one, two = step_peak_bytes(model, optimizer, 1, device), step_peak_bytes(model, optimizer, 2, device)
    if not device.startswith("cuda") or one is None or two is None:
        return {**out, "largest_batch": None if one is None else 2 if two is not None else 1}
    total = torch.cuda.get_device_properties(device).total_memory
    per_row = max(1, two - one)
    guess = max(1, int((headroom * total - (one - per_row)) // per_row))
    batch = guess
    for _ in range(20):
        peak = step_peak_bytes(model, optimizer, batch, device)
        if peak is not None:
            break
        batch = max(1, int(batch * 0.9))
    out.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gb=round(total / 1e9, 1),
               step_bytes_at_batch_1=one, bytes_per_row=per_row, extrapolated_batch=guess, largest_batch=batch,
               peak_gb_at_largest=None if peak is None else round(peak / 1e9, 1))
    if peak is not None:
        planned = planned_bytes(preset, batch, checkpointing)
        out.update(planned_gb_at_largest=round(planned / 1e9, 1), measured_over_planned=round(peak / planned, 3))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["95M", "300M", "700M"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--headroom", type=float, default=0.92, help="fraction of the GPU's memory a step may use")
    ap.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    results = []
    for preset in args.presets:
        r = largest_batch(preset, args.device, args.headroom, args.activation_checkpointing)
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.json:
        from astropt_tok.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=2))  # whole or not at all
    return results


if __name__ == "__main__":
    main()
