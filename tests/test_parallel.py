"""parallel.build_model: deterministic (seed, name) initial weights, activation checkpointing, and FSDP2 against
DDP under real torchrun + gloo on CPU (one launch of two processes runs every distributed check)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from astropt_train import parallel
from astropt_train.model import GPTConfig, LayerNorm

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_TIMEOUT_S = 600  # a limit for a loaded 2-core machine, not a timing assertion


def tiny(**kw) -> GPTConfig:
    """2 layers, 64 wide: small enough for CPU, large enough that every parameter is sharded over 2 ranks."""
    return GPTConfig(**{"vocab_size": 61, "block_size": 24, "n_layer": 2, "n_head": 2, "n_embd": 64, **kw})


def test_init_weights_depend_on_seed_and_name_only():
    """Same seed: the same weights whatever the global RNG; another seed: other weights; GPT-2 distributions."""
    torch.manual_seed(0)
    a = parallel.build_model(tiny(), seed=5, device="cpu").raw
    torch.manual_seed(123)
    b = parallel.build_model(tiny(), seed=5, device="cpu").raw
    c = parallel.build_model(tiny(), seed=6, device="cpu").raw
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert not torch.equal(sa["transformer.h.0.attn.c_attn.weight"], sc["transformer.h.0.attn.c_attn.weight"])
    # two parameters of one shape never share their draws (each has its own generator)
    assert not torch.equal(sa["transformer.h.0.attn.c_proj.weight"], sa["transformer.h.1.attn.c_proj.weight"])
    for name, p in a.named_parameters():
        owner = a.get_submodule(name.rpartition(".")[0])
        if isinstance(owner, LayerNorm):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("c_proj.weight"):
            assert abs(p.std().item() - 0.02 / 2) < 0.002, name  # 0.02 / sqrt(2 n_layer), n_layer 2
        else:
            assert abs(p.std().item() - 0.02) < 0.003, name
    with_bias = parallel.build_model(tiny(bias=True), seed=5, device="cpu").raw
    assert all(torch.equal(p, torch.zeros_like(p)) for n, p in with_bias.named_parameters() if n.endswith(".bias"))


def test_activation_checkpointing_changes_no_loss_grad_key_or_sample():
    """One process: the same loss and gradients (dropout on: the recompute replays the RNG), the same state-dict
    keys, and generate (KV cache, no grad) untouched."""
    gconf = tiny(dropout=0.1)
    plain = parallel.build_model(gconf, seed=1, device="cpu")
    ac = parallel.build_model(gconf, seed=1, device="cpu", activation_checkpointing=True)
    assert list(plain.raw.state_dict()) == list(ac.raw.state_dict())
    x = torch.randint(0, gconf.vocab_size, (3, gconf.block_size), generator=torch.Generator().manual_seed(0))
    losses, mlp_calls = [], []
    for built in (plain, ac):
        calls = []
        # a pre-hook: the recompute stops early, once it has rebuilt what backward needs, inside the MLP
        built.raw.transformer.h[1].mlp.register_forward_pre_hook(lambda mod, inp, calls=calls: calls.append(1))
        torch.manual_seed(42)
        _, loss = built.model(x[:, :-1], x[:, 1:])
        loss.backward()
        losses.append(loss.item())
        mlp_calls.append(len(calls))
    assert losses[0] == losses[1]
    assert mlp_calls == [1, 2]  # checkpointed: the block ran again in backward
    for (name, p), (_, q) in zip(plain.raw.named_parameters(), ac.raw.named_parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert plain.eval_model is plain.raw and not plain.forward_is_collective
    samples = []
    for built in (plain, ac):
        built.raw.eval()
        samples.append(built.raw.generate(x[:, :2], 6, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(samples[0], samples[1])


def test_build_model_rejects_unknown_mode_and_fsdp_without_process_group():
    with pytest.raises(ValueError, match="mode must be one of"):
        parallel.build_model(tiny(), seed=0, device="cpu", mode="zero3")
    with pytest.raises(RuntimeError, match="process group"):
        parallel.build_model(tiny(), seed=0, device="cpu", mode="fsdp")


# Run by every rank of `torchrun --nproc-per-node 2`; rank 0 writes what the test asserts to argv[1].
SCRIPT = r'''
import json, math, sys
import torch
import torch.distributed as dist
from astropt_train import parallel
from astropt_train.model import GPTConfig

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
gconf = GPTConfig(vocab_size=61, block_size=24, n_layer=2, n_head=2, n_embd=64)
SEED, STEPS, ACCUM, CLIP = 5, 3, 2, 0.05  # a small clip: the norm is clipped every step
# this rank's fixed micro-batches (B 2, T 24), different on each rank
gen = torch.Generator().manual_seed(100 + rank)
batches = [torch.randint(0, gconf.vocab_size, (2, gconf.block_size + 1), generator=gen) for _ in range(ACCUM)]
single = parallel.build_model(gconf, seed=SEED, device="cpu").raw.state_dict()
out = {}

def gathered(built):
    """The full state dict on every rank (FSDP's is a collective to rank 0, then broadcast for the check)."""
    sd = [parallel.full_state_dict(built)]
    dist.broadcast_object_list(sd, src=0)
    return sd[0]

def max_diff(a, b):
    assert list(a) == list(b), (list(a), list(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

def train(mode, ac=False, chunks=1):
    """STEPS AdamW steps with grad accumulation and clipping -> (this rank's losses, grad norms, full weights)."""
    built = parallel.build_model(gconf, seed=SEED, device="cpu", mode=mode, activation_checkpointing=ac)
    opt = built.raw.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    calls = []  # forwards of one block's MLP: twice per micro-batch when checkpointed (the recompute)
    built.raw.transformer.h[1].mlp.register_forward_pre_hook(lambda mod, inp: calls.append(1))
    losses, norms = [], []
    for _ in range(STEPS):
        total = 0.0
        for micro, b in enumerate(batches):
            with parallel.grad_sync(built, sync=micro == ACCUM - 1):
                _, loss = built.model(b[:, :-1], b[:, 1:], loss_chunks=chunks)
                loss = loss / ACCUM
            loss.backward()
            total += loss.item()
        norm = parallel.clip_grad_norm(built, CLIP)
        assert type(norm) is torch.Tensor, type(norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        norms.append(norm.item())
    return losses, norms, len(calls), gathered(built)

# (a) the same initial weights in every mode
ddp = parallel.build_model(gconf, SEED, "cpu", "ddp")
out["init_ddp_vs_single"] = max_diff(ddp.raw.state_dict(), single)
fsdp = parallel.build_model(gconf, SEED, "cpu", "fsdp")
fsdp_init = gathered(fsdp)
out["eval_models"] = [ddp.eval_model is ddp.raw, fsdp.eval_model is fsdp.raw, fsdp.forward_is_collective]
out["num_params"] = [fsdp.raw.num_params(), ddp.raw.num_params()]  # global counts (MFU) from the shards
out["init_fsdp_vs_single"] = max_diff(fsdp_init, single)
# (b) FSDP trains as DDP; (c, d) activation checkpointing under FSDP changes no loss and no key
weights = {}
# (the head's checkpointed loss pieces, --loss-chunks, recompute with the root's parameters under FSDP)
runs = (("ddp", "ddp", False, 1), ("ddp_ac", "ddp", True, 1), ("fsdp", "fsdp", False, 1),
        ("fsdp_ac", "fsdp", True, 1), ("fsdp_chunks", "fsdp", False, 3), ("ddp_chunks", "ddp", False, 3))
for name, mode, ac, chunks in runs:
    losses, norms, calls, weights[name] = train(mode, ac, chunks)
    everyone = [None] * world
    dist.all_gather_object(everyone, losses)
    out[name] = {"losses": everyone, "norms": norms, "keys": list(weights[name]), "mlp_calls": calls}
out["single_keys"] = list(single)
out["final_fsdp_vs_ddp"] = max_diff(weights["fsdp"], weights["ddp"])
out["final_fsdp_ac_vs_fsdp"] = max_diff(weights["fsdp_ac"], weights["fsdp"])
out["final_fsdp_chunks_vs_ddp_chunks"] = max_diff(weights["fsdp_chunks"], weights["ddp_chunks"])
# (e) a full state dict (another seed's weights, as --init-from gives) loads into FSDP: the logits of the
# single-process model holding it, and the same full state back
# (with activation checkpointing on: generate, no grad and a KV cache, is untouched by it)
other = parallel.build_model(gconf, seed=SEED + 1, device="cpu")
loaded = parallel.build_model(gconf, seed=SEED, device="cpu", mode="fsdp", activation_checkpointing=True,
                              init_state=other.raw.state_dict())
tokens = torch.randint(0, gconf.vocab_size, (3, 10), generator=torch.Generator().manual_seed(9))
with torch.no_grad():
    want, _ = other.raw(tokens)
    got, _ = loaded.model(tokens)
out["init_state_logits"] = (got - want).abs().max().item()
out["init_state_roundtrip"] = max_diff(gathered(loaded), other.raw.state_dict())
other.raw.eval(), loaded.raw.eval()
samples = [m.generate(tokens[:, :2], 8, generator=torch.Generator().manual_seed(4)) for m in (other.raw, loaded.raw)]
out["init_state_generate_equal"] = torch.equal(*samples)
# bf16 mixed precision (MixedPrecisionPolicy): blocks compute in bf16 from fp32 shards, gradients reduced in fp32
bf16 = parallel.build_model(gconf, seed=SEED, device="cpu", mode="fsdp", param_dtype=torch.bfloat16)
seen = []
bf16.raw.transformer.h[0].attn.c_attn.register_forward_hook(lambda mod, inp, o: seen.append(str(o.dtype)))
_, loss = bf16.model(batches[0][:, :-1], batches[0][:, 1:])
loss.backward()
out["bf16"] = {"compute": seen[0], "master": str(next(bf16.raw.parameters()).dtype), "loss": loss.item(),
               "grad": str(next(bf16.raw.parameters()).grad.dtype), "norm": parallel.clip_grad_norm(bf16, 1.0).item()}
with torch.no_grad():
    out["fp32_loss"] = parallel.build_model(gconf, SEED, "cpu").model(batches[0][:, :-1], batches[0][:, 1:])[1].item()
try:
    parallel.build_model(gconf, SEED, "cpu", "fsdp", param_dtype=torch.float16)
    out["fp16"] = "built"
except ValueError as exc:
    out["fp16"] = str(exc)
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_fsdp_matches_ddp_and_single_under_torchrun(tmp_path):
    """Two gloo ranks: FSDP2's initial weights equal the single process's exactly; 3 AdamW steps (grad
    accumulation 2, clipping; with --loss-chunks too) give DDP's losses, grad norms and weights to rounding;
    activation checkpointing under FSDP changes no loss and no key; a full state dict loads into FSDP and gives
    its logits and samples; bf16 mixed precision computes in bf16 from fp32 shards; fp16 is refused."""
    script, result = tmp_path / "fsdp_vs_ddp.py", tmp_path / "result.json"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(result)]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TORCHRUN_TIMEOUT_S)
    assert proc.returncode == 0, f"{proc.stdout[-1500:]}\n{proc.stderr[-4000:]}"
    r = json.loads(result.read_text())
    assert r["init_ddp_vs_single"] == 0.0
    assert r["init_fsdp_vs_single"] == 0.0  # sharding-independent init: exactly the same weights
    assert r["eval_models"] == [True, True, True]
    assert r["num_params"][0] == r["num_params"][1]
    steps_x_accum = 3 * 2
    assert [r[name]["mlp_calls"] for name in ("ddp", "ddp_ac", "fsdp", "fsdp_ac")] == [steps_x_accum, 2 * steps_x_accum,
                                                                                     steps_x_accum, 2 * steps_x_accum]
    ddp, fsdp, fsdp_ac = r["ddp"], r["fsdp"], r["fsdp_ac"]
    for rank in range(2):
        assert fsdp["losses"][rank] == pytest.approx(ddp["losses"][rank], rel=1e-5)
        assert fsdp_ac["losses"][rank] == pytest.approx(fsdp["losses"][rank], rel=1e-6)
        assert r["ddp_ac"]["losses"][rank] == pytest.approx(ddp["losses"][rank], rel=1e-6)
    assert ddp["losses"][0] != ddp["losses"][1]  # the ranks saw different data
    assert ddp["losses"][0][-1] < ddp["losses"][0][0]  # and the steps trained
    assert all(n > 0.05 for n in ddp["norms"])  # every step's norm was clipped
    assert fsdp["norms"] == pytest.approx(ddp["norms"], rel=1e-5)
    assert r["final_fsdp_vs_ddp"] < 1e-5
    assert r["final_fsdp_ac_vs_fsdp"] < 1e-6
    for rank in range(2):
        assert r["fsdp_chunks"]["losses"][rank] == pytest.approx(r["ddp_chunks"]["losses"][rank], rel=1e-5)
        assert r["fsdp_chunks"]["losses"][rank] == pytest.approx(fsdp["losses"][rank], rel=1e-5)
    assert r["final_fsdp_chunks_vs_ddp_chunks"] < 1e-5
    # upstream key names throughout, with and without activation checkpointing
    assert ddp["keys"] == r["ddp_ac"]["keys"] == fsdp["keys"] == fsdp_ac["keys"] == r["single_keys"]
    assert r["init_state_logits"] < 1e-5
    assert r["init_state_roundtrip"] == 0.0
    assert r["init_state_generate_equal"]
    bf16 = r["bf16"]
    assert (bf16["compute"], bf16["master"], bf16["grad"]) == ("torch.bfloat16", "torch.float32", "torch.float32")
    assert bf16["loss"] == pytest.approx(r["fp32_loss"], rel=2e-2) and bf16["loss"] != r["fp32_loss"]
    assert math.isfinite(bf16["norm"]) and bf16["norm"] > 0
    assert r["fp16"] == "mode 'fsdp' trains in bf16 or fp32, not fp16"
