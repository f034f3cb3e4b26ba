"""`astropt plan`: parameter counts equal the real model's, the activation formula equals what autograd saves,
FSDP's states are DDP's divided over the GPUs, checkpointing keeps less, the largest batch fits, every preset
answers, and bad flags are one error line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from astropt_train.config import PRESETS
from astropt_train.model import GPT, GPTConfig
from astropt_train.plan import (AION_TOKENS, AION_VOCAB, GIB, MODES, PlanConfig, activation_bytes, largest_batch,
                                mode_total, model_shape, plan, plan_model, saved_activation_bytes, state_bytes)
from test_hostile import assert_one_error, run_cli


def shape_of(name: str, vocab: int = AION_VOCAB, block_size: int = AION_TOKENS, head: str = "affine"):
    return model_shape(name, PRESETS[name], vocab, block_size, head)


@pytest.mark.parametrize("name, head", [("tiny", "affine"), ("tiny", "aim"), ("001M", "affine"), ("small", "aim")])
def test_param_counts_equal_the_real_model(name, head):
    L, H, E = PRESETS[name]
    model = GPT(GPTConfig(vocab_size=AION_VOCAB, block_size=AION_TOKENS, n_layer=L, n_head=H, n_embd=E, head=head))
    shape = shape_of(name, head=head)
    assert shape.params == model.num_params() == sum(p.numel() for p in model.parameters())
    assert shape.block_params == sum(p.numel() for p in model.transformer.h[0].parameters())
    assert shape.root_params + L * shape.block_params == shape.params
    assert shape.embedding_params == model.num_params() - model.num_params(non_embedding=True)


def test_every_preset_counts_as_the_model_on_meta_and_by_the_closed_form():
    # bias-free GPT, affine head: blocks 12E^2 + 2E each; token table and head V E each, positions T E, ln_f E
    assert PRESETS["2100M-32L"] == (32, 32, 2560) and PRESETS["2100M"] == (26, 32, 2560)
    for name, (L, H, E) in PRESETS.items():
        shape = shape_of(name)
        with torch.device("meta"):
            assert shape.params == GPT(GPTConfig(vocab_size=AION_VOCAB, block_size=AION_TOKENS, n_layer=L, n_head=H,
                                                 n_embd=E)).num_params(), name
        assert shape.block_params == 12 * E * E + 2 * E, name
        assert shape.params == L * (12 * E * E + 2 * E) + 2 * AION_VOCAB * E + AION_TOKENS * E + E, name
    assert 2.5e9 < shape_of("2100M-32L").params < 2.6e9


def saved_by_autograd(model: GPT, batch: int, seq: int, vocab: int) -> int:
    """Bytes of the distinct tensors (not parameters) autograd saves in one training forward of `model`."""
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1].clone(), tokens[:, 1:].clone()  # each its own storage (at batch 1 slices share one)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y)
    assert loss is not None
    return sum(saved.values())


@pytest.mark.parametrize("head", ["affine", "aim"])
def test_saved_activations_equal_what_autograd_saves(head):
    # fp32 on the CPU: SDPA's flash kernel saves q, k, v, the output and a log-sum-exp, as CUDA's does
    vocab, seq, (L, H, E) = 64, 33, (2, 4, 32)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=seq, n_layer=L, n_head=H, n_embd=E, head=head))
    shape = model_shape("custom", (L, H, E), vocab, seq, head)
    # beside the formula autograd keeps only batch-free tensors (the position ids, the loss's weight total)
    constant = {saved_by_autograd(model, b, seq, vocab) - saved_activation_bytes(shape, b, "FSDP", "fp32")
                for b in (1, 3)}
    assert len(constant) == 1 and 0 <= constant.pop() <= 8 * seq + 64


def test_fsdp_states_are_ddp_states_over_the_gpus():
    for name in ("95M", "2100M", "2100M-32L"):
        shape = shape_of(name)
        P, root, block = shape.params, shape.root_params, shape.block_params
        ddp = state_bytes(shape, "DDP", 8, "bf16")
        assert ddp == (4 * P + 2 * (P - shape.embedding_params), 4 * P + 4 * P, 8 * P)
        assert state_bytes(shape, "DDP", 1, "bf16")[1] == 4 * P  # one process: no DDP buckets
        for gpus in (1, 2, 8, 64):
            S = shape.sharded_params(gpus)
            # every tensor's rows padded to a multiple of the GPUs: at most gpus - 1 padding rows per tensor
            row = lambda shapes: sum(int(np.prod(s[1:])) for s in shapes)  # elements per row
            padding = gpus * (row(shape.root_shapes) + shape.n_layer * row(shape.block_shapes))
            assert P <= gpus * S <= P + padding
            params, grads, optimiser = state_bytes(shape, "FSDP", gpus, "bf16")
            assert optimiser == 8 * S and (gpus > 1 or optimiser == ddp[2])
            assert params == 4 * S + 2 * (root + 2 * block)  # fp32 shard + bf16 root and two blocks
            assert grads == 4 * S + 2 * root + 6 * block  # fp32 shard + bf16 root grads, a block's bf16 + fp32
            assert state_bytes(shape, "FSDP+AC", gpus, "bf16") == (params, grads, optimiser)
        assert state_bytes(shape, "FSDP", 8, "fp32")[0] == 4 * shape.sharded_params(8) + 4 * (root + 2 * block)
    # first dimensions that 8 divides: the shards are exactly an eighth
    even = model_shape("even", (4, 8, 256), 4096, 512)
    assert 8 * even.sharded_params(8) == even.params
    assert 8 * state_bytes(even, "FSDP", 8, "bf16")[2] == state_bytes(even, "DDP", 8, "bf16")[2]


def test_checkpointing_keeps_less_and_activations_grow_with_the_batch():
    for name in PRESETS:
        shape = shape_of(name)
        for base in ("DDP", "FSDP"):
            plain, ac = activation_bytes(shape, 8, base, "bf16"), activation_bytes(shape, 8, base + "+AC", "bf16")
            assert ac < plain, (name, base)
            assert activation_bytes(shape, 16, base, "bf16") == 2 * plain  # linear in the batch
            assert saved_activation_bytes(shape, 8, base, "bf16") < plain
    shape = shape_of("95M")
    # FSDP's bf16 params make a bf16 residual stream, autocast's is fp32; in fp32 they are the same
    assert activation_bytes(shape, 8, "FSDP", "bf16") < activation_bytes(shape, 8, "DDP", "bf16")
    assert activation_bytes(shape, 8, "FSDP", "fp32") == activation_bytes(shape, 8, "DDP", "fp32")
    # the loss in chunks keeps less than the whole logits; fp32 keeps more than bf16
    assert activation_bytes(shape, 8, "DDP", "bf16", loss_chunks=8) < activation_bytes(shape, 8, "DDP", "bf16")
    assert activation_bytes(shape, 8, "FSDP", "fp32") > activation_bytes(shape, 8, "FSDP", "bf16")


def test_largest_batch_fits_and_grows_with_the_memory():
    shape = shape_of("2100M-32L")
    for mode in MODES:
        previous = 0
        for gib in (8, 24, 40, 80, 141, 1000):
            budget = gib * GIB
            n = largest_batch(shape, mode, 8, budget, "bf16")
            assert n >= previous
            previous = n
            if n:
                assert mode_total(shape, mode, 8, n, "bf16") <= budget
            assert mode_total(shape, mode, 8, n + 1, "bf16") > budget
    # upstream's memory limit: the 32-layer 2.1B fits no DDP batch on a 40 GiB GPU, FSDP on 8 of them does
    p = plan_model(shape, gpus=8, gpu_memory=40, batch_size=8)
    by = {m.mode: m for m in p.modes}
    assert by["DDP"].largest_batch == by["DDP+AC"].largest_batch == 0 and not by["DDP"].fits
    assert by["FSDP+AC"].fits and by["FSDP+AC"].largest_batch >= 8
    for m in p.modes:
        assert m.total == m.params + m.grads + m.optimiser + m.activations + m.overhead
        assert m.fits == (m.total <= 40 * GIB) == (m.largest_batch >= 8)


def test_every_preset_answers():
    plans = plan(PlanConfig(gpus=8, gpu_memory=80, batch_size=8))
    assert [p.model.name for p in plans] == list(PRESETS)
    assert all([m.mode for m in p.modes] == list(MODES) for p in plans)
    one = plan(PlanConfig(preset="tiny", n_layer=3))
    assert [(p.model.name, p.model.n_layer) for p in one] == [("custom", 3)]


def test_cli_table_json_and_store(tmp_path, capsys):
    from astropt_tok.store import write_store_from_arrays

    code, out, err = run_cli(["plan", "--preset", "2100M-32L", "--gpus", "8", "--gpu-memory", "80"], capsys)
    assert code == 0, err
    for word in ("2100M-32L", *MODES, "params", "grads", "optimiser", "activations", "largest batch"):
        assert word in out
    code, out, err = run_cli(["plan"], capsys)
    assert code == 0 and all(name in out for name in PRESETS), err
    # a store of two image columns: its vocabulary, and positions for both
    tokens = {m: np.random.default_rng(0).integers(0, 64, size=(4, 16)) for m in ("a_image", "b_image")}
    write_store_from_arrays(tmp_path / "store", tokens, num_shards=1,
                            bands={"a_image": ["DES-G"], "b_image": ["DES-G"]}, codec={"id": "random", "vocab_size": 64, "tokens_per_image": 16})
    code, out, err = run_cli(["plan", "--preset", "tiny", "--tokens", tmp_path / "store", "--json"], capsys)
    assert code == 0, err
    (got,) = json.loads(out)
    real = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64,
                         modalities=["a_image", "b_image"]))
    assert (got["model"]["vocab"], got["model"]["block_size"], got["model"]["modalities"]) == (64, 32, 2)
    assert got["model"]["params"] == real.num_params()
    assert [m["mode"] for m in got["modes"]] == list(MODES)


@pytest.mark.parametrize("argv, names", [
    (["--preset", "huge"], ["huge", "2100M-32L"]),
    (["--gpus", "0"], ["gpus"]),
    (["--gpu-memory", "0"], ["gpu-memory"]),
    (["--gpu-memory", "-8"], ["gpu-memory"]),
    (["--gpu-memory", "nan"], ["gpu-memory"]),
    (["--batch-size", "0"], ["batch-size"]),
    (["--tokens", "no-such-store"], ["no-such-store"]),
    (["--tokens", "S", "--vocab", "10"], ["--tokens", "--vocab"]),
    (["--n-head", "5", "--n-embd", "64"], ["n_head", "5"]),
    (["--dtype", "fp8"], ["dtype"]),
    (["--seq-len", "1"], ["seq-len"]),
])
def test_bad_flags_are_one_error_line(argv, names, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["plan", *argv], capsys)
    assert_one_error(code, err, *names)
    assert out == ""


def test_readme_table_is_the_commands_output(capsys):
    from pathlib import Path

    command = "astropt plan --gpus 8 --gpu-memory 80 --batch-size 8"
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split(f"$ {command}\n", 1)[1].split("```", 1)[0]
    code, out, err = run_cli(command.split()[1:], capsys)
    assert code == 0, err
    assert [line.rstrip() for line in block.splitlines()] == [line.rstrip() for line in out.splitlines()], \
        f"README's table is stale: paste the output of `{command}`"
