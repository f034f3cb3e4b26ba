"""The GPT: upstream AstroPT key names and shapes, loss, and KV-cache generation equal to the no-cache path."""

from __future__ import annotations

import math

import pytest
import torch

from astropt_train.model import GPT, GPTConfig


def upstream_keys(n_layer: int, n_embd: int, vocab: int, block: int, bias: bool) -> dict[str, tuple]:
    """Key -> shape of upstream AstroPT's GPT with one modality `images_aion` (vocab > 0, embed_pos, affine)."""
    keys = {}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        keys[p + "ln_1.weight"] = (n_embd,)
        keys[p + "attn.c_attn.weight"] = (3 * n_embd, n_embd)
        keys[p + "attn.c_proj.weight"] = (n_embd, n_embd)
        keys[p + "ln_2.weight"] = (n_embd,)
        keys[p + "mlp.c_fc.weight"] = (4 * n_embd, n_embd)
        keys[p + "mlp.c_proj.weight"] = (n_embd, 4 * n_embd)
        if bias:
            for k in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
                keys[p + k + ".bias"] = (keys[p + k + ".weight"][0],)
    keys["transformer.ln_f.weight"] = (n_embd,)
    keys["encoders.images_aion.wpe.weight"] = (vocab, n_embd)
    keys["embedders.images_aion.wpe.weight"] = (block, n_embd)
    keys["decoders.images_aion.c_fc.weight"] = (vocab, n_embd)
    if bias:
        keys["transformer.ln_f.bias"] = (n_embd,)
        keys["decoders.images_aion.c_fc.bias"] = (vocab,)
    return keys


def test_state_dict_keys_match_upstream():
    for bias in (False, True):
        model = GPT(GPTConfig(vocab_size=4375, block_size=576, n_layer=2, n_head=2, n_embd=32, bias=bias))
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert got == upstream_keys(2, 32, 4375, 576, bias)
        aim = GPT(GPTConfig(vocab_size=4375, block_size=576, n_layer=2, n_head=2, n_embd=32, bias=bias, head="aim"))
        want = upstream_keys(2, 32, 4375, 576, bias)
        want["decoders.images_aion.c_fc.weight"] = (4 * 32, 32)  # aim: Linear to 4n, GELU, Linear to vocab
        want["decoders.images_aion.c_proj.weight"] = (4375, 4 * 32)
        if bias:
            want["decoders.images_aion.c_fc.bias"] = (4 * 32,)
            want["decoders.images_aion.c_proj.bias"] = (4375,)
        assert {k: tuple(v.shape) for k, v in aim.state_dict().items()} == want


def test_forward_shapes_and_initial_loss():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg)
    x = torch.randint(0, 100, (3, 15))
    logits, loss = model(x, x)
    assert logits.shape == (3, 15, 100)
    assert abs(loss.item() - math.log(100)) < 0.3  # GPT-2 init: near-uniform predictions
    logits, loss = model(x)
    assert logits.shape == (3, 1, 100) and loss is None
    assert model.estimate_mfu(1e6, peak_flops=1e12) > 0


@pytest.mark.parametrize("head, chunks", [("affine", 4), ("affine", 7), ("aim", 3)])
def test_chunked_loss_equals_the_plain_loss_and_gradients(head, chunks):
    """--loss-chunks: the same mean cross-entropy and the same gradients as the plain path (to float32
    rounding: the sum runs in another order), with no (B, T, vocab) logits returned."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=24, n_layer=2, n_head=2, n_embd=32, head=head, dropout=0.1))
    x = torch.randint(0, 97, (3, 23))
    y = torch.randint(0, 97, (3, 23))

    def loss_and_grads(n):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks on both paths
        logits, loss = model(x, y, loss_chunks=n)
        loss.backward()
        return logits, loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    plain_logits, plain, plain_grads = loss_and_grads(1)
    chunked_logits, chunked, chunked_grads = loss_and_grads(chunks)
    assert plain_logits.shape == (3, 23, 97) and chunked_logits is None
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    for k, g in plain_grads.items():
        torch.testing.assert_close(chunked_grads[k], g, rtol=1e-5, atol=1e-7, msg=k)


def test_kv_cache_generation_matches_no_cache():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=24, n_layer=2, n_head=2, n_embd=32)).eval()
    prefix = torch.randint(0, 50, (2, 3))
    # the cached logits equal the full forward pass's, position by position
    full, _ = model(torch.cat([prefix, prefix], 1), torch.cat([prefix, prefix], 1))
    from astropt_train.model import KVCache

    cache = KVCache(2)
    a, _ = model(prefix, pos_offset=0, kv_cache=cache)
    b, _ = model(prefix, pos_offset=3, kv_cache=cache)  # several new tokens at once after a prefix
    torch.testing.assert_close(a[:, -1], full[:, 2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b[:, -1], full[:, 5], atol=1e-5, rtol=1e-5)
    for kwargs in ({"temperature": 1.0}, {"temperature": 0.8, "top_k": 5}, {"temperature": 0}):
        outs = []
        for use in (True, False):
            g = torch.Generator().manual_seed(7)
            outs.append(model.generate(prefix, 20, generator=g, use_kv_cache=use, **kwargs))
        assert outs[0].shape == (2, 23)
        assert torch.equal(outs[0], outs[1]), kwargs
        assert torch.equal(outs[0][:, :3], prefix)


def upstream_gpt(U, vocab: int, block: int, n_layer: int, n_head: int, n_embd: int, head: str, bias: bool = False,
                 names: tuple[str, ...] = ("images_aion",)):
    """Upstream's GPT (U: its `astropt.model`) with one token modality per name, built as its train_aion.py
    does, with tokeniser=head."""
    mods = [U.ModalityConfig(name=m, input_size=vocab, pos_input_size=1, patch_size=0, embed_pos=True,
                             vocab_size=vocab) for m in names]
    conf = U.GPTConfig(block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd, tokeniser=head, bias=bias,
                       modalities=mods)
    return U.GPT(conf, U.ModalityRegistry(mods), master_process=False).eval()


@pytest.mark.parametrize("head", ["affine", "aim"])
def test_state_dict_loads_into_upstream_astropt(upstream_astropt, head):
    """With upstream AstroPT's source, our weights (either head) load strictly into its GPT and agree."""
    U = upstream_astropt.model
    theirs = upstream_gpt(U, 300, 40, 2, 2, 32, head)
    ours = GPT(GPTConfig(vocab_size=300, block_size=40, n_layer=2, n_head=2, n_embd=32, head=head)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randint(0, 300, (2, 40))
    out, _ = theirs({"images_aion": x, "images_aion_positions": torch.arange(40).expand(2, 40)})
    logits, _ = ours(x, x)
    torch.testing.assert_close(out["images_aion"], logits, atol=1e-5, rtol=1e-5)
