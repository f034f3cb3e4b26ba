"""Rows of a --keep-partial store that lack one image: the model never reads the placeholder tokens of a missing
modality (training, validation, generation), embed pools only what a row has, and decode says what is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from astropt_tok import store as st
from astropt_tok.tokenise import tokenise
from astropt_train.data import TokenRows, batch_to_device, valid_at
from astropt_train.loop import train
from astropt_train.model import GPT, GPTConfig
from test_multimodal import PAIR, _config, _train_cfg, bad_hsc_survey  # noqa: F401  (a fixture, used below)

LACK_HSC, LACK_LS = [2, 5], [7]  # what bad_hsc_survey's planted faults leave out


@pytest.fixture(scope="module")
def partial_store(bad_hsc_survey, codec_dir, tmp_path_factory):  # noqa: F811
    """The 10 galaxies of bad_hsc_survey tokenised with --keep-partial: rows 2 and 5 lack HSC, row 7 Legacy Survey."""
    out = tmp_path_factory.mktemp("partial") / "store"
    tokenise(_config(bad_hsc_survey, codec_dir, out, limit=None, keep_partial=True))
    valid = st.TokenStore(out).valid(np.arange(10))
    assert np.nonzero(~valid["hsc_image"])[0].tolist() == LACK_HSC
    assert np.nonzero(~valid["legacysurvey_image"])[0].tolist() == LACK_LS
    return out


@pytest.fixture(scope="module")
def partial_run(partial_store, tmp_path_factory):
    """A tiny two-modality model trained a few steps on the partial store, blocks shuffled per galaxy."""
    out = tmp_path_factory.mktemp("partial-run") / "run"
    summary = train(_train_cfg(partial_store, out, shuffle_modalities=True, batch_size=4, max_iters=2,
                               eval_interval=2, log_interval=1))
    assert np.isfinite(summary["loss"])
    return out


def _tiny_model(store: st.TokenStore) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=store.vocab_size, block_size=2 * store.tokens_per_image, n_layer=2, n_head=2,
                         n_embd=32, modalities=PAIR)).eval()


def _scramble_missing(batch: dict) -> dict:
    """The batch with random ids instead of the zeros in every block a row lacks."""
    tokens = batch["tokens"].clone()  # [B, 2T]
    missing = ~valid_at(batch["valid"], batch.get("order"), 0, tokens.size(1))
    tokens[missing] = torch.randint(1, 4000, (int(missing.sum()),), generator=torch.Generator().manual_seed(1),
                                    dtype=tokens.dtype)
    assert missing.any() and not torch.equal(tokens, batch["tokens"])
    return {**batch, "tokens": tokens}


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_missing_modality_changes_nothing_at_real_positions(partial_store, shuffle):
    store = st.TokenStore(partial_store)
    model = _tiny_model(store)
    batch = TokenRows(store, modalities=PAIR, shuffle=shuffle, seed=1).__getitems__([0, 2, 5, 7])
    x, y, kw = batch_to_device(batch, "cpu")
    assert "present" in kw and not kw["present"].all()
    x2, y2, kw2 = batch_to_device(_scramble_missing(batch), "cpu")
    assert not torch.equal(x, x2)
    logits, loss = model(x, y, **kw)
    logits2, loss2 = model(x2, y2, **kw2)
    keep = kw["loss_mask"]  # every target in a modality the row has, including the first of a block after a gap
    assert torch.equal(logits[keep], logits2[keep]) and torch.equal(loss, loss2)
    parts = model.loss_by_modality(logits, y, kw.get("order"), keep)
    parts2 = model.loss_by_modality(logits2, y2, kw2.get("order"), keep)
    assert all(torch.equal(parts[m], parts2[m]) for m in PAIR)
    grads = []
    for loss_of in (loss, loss2):  # the gradients too: the placeholder ids' table rows get none
        model.zero_grad()
        loss_of.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    # the rows that have both images are computed as without any mask
    full = batch["valid"].all(1)
    order = kw.get("order")
    ref, _ = model(x[full], y[full], order=None if order is None else order[full])
    torch.testing.assert_close(logits[full], ref, rtol=1e-5, atol=1e-5)


def test_rows_with_every_modality_take_the_causal_fast_path(partial_store, monkeypatch):
    import torch.nn.functional as F

    store = st.TokenStore(partial_store)
    model = _tiny_model(store)
    batch = TokenRows(store, modalities=PAIR).__getitems__([0, 1, 3, 4])
    x, y, kw = batch_to_device(batch, "cpu")
    assert "present" not in kw and kw["loss_mask"].all()  # decided on the CPU: no GPU sync
    real, calls = F.scaled_dot_product_attention, []

    def recorded(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **rest):  # the real kernel, recorded
        calls.append((attn_mask is None, is_causal))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **rest)

    before, _ = model(x, y)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
    after, _ = model(x, y, present=torch.ones_like(x, dtype=torch.bool), **kw)
    assert torch.equal(before, after) and calls == [(True, True)] * model.config.n_layer
    calls.clear()
    x, y, kw = batch_to_device(TokenRows(store, modalities=PAIR).__getitems__([1, 2]), "cpu")  # row 2 lacks HSC
    model(x, y, **kw)
    assert calls == [(False, False)] * model.config.n_layer


def test_generation_from_a_partial_row_ignores_the_missing_block(partial_store):
    """A galaxy lacking HSC, its blocks HSC first: sampling its Legacy Survey tail gives the same tokens whatever
    the placeholder holds, with or without the key/value cache."""
    store = st.TokenStore(partial_store)
    model = _tiny_model(store)
    rows = [2, 5, 0]
    order = torch.tensor([[1, 0]] * 3)
    seq = torch.as_tensor(np.concatenate([store.take(rows, m) for m in ("hsc_image", "legacysurvey_image")], 1)
                          .astype(np.int64))[:, : 576 + 8]
    present = valid_at(torch.as_tensor(np.stack([store.valid(rows)[m] for m in PAIR], 1)), order, 0, seq.size(1))
    scrambled = seq.clone()
    scrambled[:2, :576] = torch.randint(1, 4000, (2, 576), generator=torch.Generator().manual_seed(2))
    outs = [model.generate(prefix, 6, generator=torch.Generator().manual_seed(3), use_kv_cache=use, order=order,
                           present=present)
            for prefix in (seq, scrambled) for use in (True, False)]
    assert all(torch.equal(outs[0][:, -6:], o[:, -6:]) for o in outs[1:])


def test_training_and_validation_on_a_partial_store(partial_run):
    import json

    records = [json.loads(line) for line in (partial_run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert all(np.isfinite(r[f"val_loss_{m}"]) for r in records if "val_loss" in r for m in PAIR)
