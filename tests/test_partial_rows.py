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
                         n_embd=16, modalities=PAIR)).eval()


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


def test_no_real_position_attends_to_a_missing_block(partial_store):
    """Row 2 lacks HSC, its HSC block first: the outputs at its Legacy Survey positions read nothing of that block,
    not even its position embeddings (the key mask), while row 0, which has both, does read them."""
    store = st.TokenStore(partial_store)
    model = _tiny_model(store)
    rows, order = [2, 0], torch.tensor([[1, 0], [1, 0]])
    tokens = torch.as_tensor(np.concatenate([store.take(rows, m) for m in ("hsc_image", "legacysurvey_image")], 1)
                             .astype(np.int64))
    valid = torch.as_tensor(np.stack([store.valid(rows)[m] for m in PAIR], 1))
    present = valid_at(valid, order, 0, tokens.size(1) - 1)
    x, y = tokens[:, :-1], tokens[:, 1:]
    before, _ = model(x, y, order=order, present=present)
    with torch.no_grad():
        table = model.embedders["hsc_image"].wpe.weight
        table.add_(torch.randn(table.shape, generator=torch.Generator().manual_seed(5)))
    after, _ = model(x, y, order=order, present=present)
    assert torch.equal(before[0, 576:], after[0, 576:])
    assert not torch.allclose(before[1, 576:], after[1, 576:])


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
    """Galaxies lacking HSC, their blocks HSC first: the next-token logits of the Legacy Survey tail, through the
    key/value cache or not, are the same whatever the placeholder holds and whatever the model's HSC position
    table is, and so are the tokens drawn."""
    from astropt_train.model import KVCache

    store = st.TokenStore(partial_store)
    model = _tiny_model(store)
    order = torch.tensor([[1, 0]] * len(LACK_HSC))
    seq = torch.as_tensor(np.concatenate([store.take(LACK_HSC, m) for m in ("hsc_image", "legacysurvey_image")], 1)
                          .astype(np.int64))[:, : 576 + 8]
    present = torch.arange(seq.size(1)).expand(len(LACK_HSC), -1) >= 576

    def next_logits(tokens):  # (uncached, cached: the prefix, then one step) logits of the next token
        whole, _ = model(tokens, order=order, present=present)
        cache = KVCache(model.config.n_layer)
        model(tokens[:, :-1], kv_cache=cache, order=order, present=present[:, :-1])
        step, _ = model(tokens[:, -1:], pos_offset=tokens.size(1) - 1, kv_cache=cache, order=order)
        return whole, step

    outs, logits = [], []
    for scrambled in (False, True):
        if scrambled:
            seq = seq.clone()
            seq[:, :576] = torch.randint(1, 4000, (len(LACK_HSC), 576), generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                table = model.embedders["hsc_image"].wpe.weight
                table.add_(torch.randn(table.shape, generator=torch.Generator().manual_seed(5)))
        logits.append(next_logits(seq))
        for use in (True, False):
            outs.append(model.generate(seq, 6, temperature=0, use_kv_cache=use, order=order, present=present)[:, -6:])
    torch.testing.assert_close(logits[0][0], logits[0][1], rtol=1e-5, atol=1e-5)
    assert torch.equal(logits[0][0], logits[1][0]) and torch.equal(logits[0][1], logits[1][1])
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_training_and_validation_on_a_partial_store(partial_run):
    import json

    records = [json.loads(line) for line in (partial_run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert all(np.isfinite(r[f"val_loss_{m}"]) for r in records if "val_loss" in r for m in PAIR)


# ---------------------------------------------------------------------------------------------------------
# the use side: embed, probe, decode


def test_pool_hidden_over_the_kept_positions_only():
    from astropt_train.use.embed import pool_hidden

    hidden = torch.randn(2, 6, 3)
    keep = torch.tensor([[True, True, True, False, False, False], [False] * 6])
    weights = torch.logspace(0, -1, 6)[:3, None]
    expected = {"mean": hidden[0, :3].mean(0), "last": hidden[0, 2],
                "exp_decay": (weights * hidden[0, :3]).sum(0) / weights.sum()}
    for pool, want in expected.items():
        got = pool_hidden(hidden, pool, keep)
        torch.testing.assert_close(got[0], want)
        assert torch.isnan(got[1]).all()  # a galaxy with nothing to pool
        torch.testing.assert_close(pool_hidden(hidden, pool, torch.ones(2, 6, dtype=torch.bool)), pool_hidden(hidden, pool))


@pytest.fixture(scope="module")
def partial_embeddings(partial_run, partial_store, tmp_path_factory):
    from astropt_train.use.embed import EmbedConfig, embed

    out = tmp_path_factory.mktemp("partial-emb") / "emb"
    embed(EmbedConfig(checkpoint=partial_run, out=out, tokens=partial_store, device="cpu", progress=False, batch_size=4))
    return out


def test_embed_pools_only_the_images_a_galaxy_has(partial_embeddings, partial_run, partial_store):
    import pyarrow as pa

    from astropt_train.checkpoint import load_model
    from astropt_train.use.embed import read_embeddings, verify_embeddings

    assert verify_embeddings(partial_embeddings) == []
    joint, _, _ = read_embeddings(partial_embeddings)
    per = {m: read_embeddings(partial_embeddings, f"embedding_{m}")[0] for m in PAIR}
    lacks = {"hsc_image": LACK_HSC, "legacysurvey_image": LACK_LS}
    for m in PAIR:  # a missing image's embedding is null in the store, NaN when read
        assert np.isnan(per[m]).all(1).tolist() == [r in lacks[m] for r in range(10)]
    nulls = sum(pa.ipc.open_stream(pa.memory_map(str(f))).read_all().column("embedding_hsc_image").null_count
                for f in sorted(partial_embeddings.glob("shard-*.arrow")))
    assert nulls == len(LACK_HSC) and np.isfinite(joint).all()
    for m, other in (PAIR, PAIR[::-1]):  # lacking one image, the joint mean is the other block's
        np.testing.assert_allclose(joint[lacks[other]], per[m][lacks[other]], atol=1e-5)
    full = [r for r in range(10) if r not in LACK_HSC + LACK_LS]
    np.testing.assert_allclose(joint[full], (per[PAIR[0]][full] + per[PAIR[1]][full]) / 2, atol=1e-5)
    # and by hand: row 2's Legacy Survey states whatever its HSC placeholder holds
    model, _ = load_model(partial_run)
    store = st.TokenStore(partial_store)
    sequence = torch.as_tensor(np.concatenate([store.take([2], m) for m in PAIR], 1).astype(np.int64))
    sequence[0, 576:] = torch.randint(1, 4000, (576,), generator=torch.Generator().manual_seed(4))
    present = torch.arange(1152)[None] < 576
    (hidden,) = model.hidden_states(sequence, [model.config.n_layer], present=present)
    np.testing.assert_allclose(joint[2], hidden[0, :576].mean(0).detach().numpy(), atol=1e-4)


def test_probe_leaves_out_galaxies_without_the_probed_image(partial_embeddings, tmp_path, capsys):
    from astropt_train.use.embed import read_embeddings
    from astropt_train.use.probe import ProbeConfig, probe

    _, _, ids = read_embeddings(partial_embeddings)
    values = np.random.default_rng(0).normal(size=len(ids))
    (tmp_path / "cat.csv").write_text("object_id,mass\n" + "".join(f"{i},{v}\n" for i, v in zip(ids, values)))
    report = probe(ProbeConfig(embeddings=partial_embeddings, labels=str(tmp_path / "cat.csv"), targets=["mass"],
                               out=tmp_path / "out", folds=2, column="embedding_hsc_image", pictures=False)).report
    entry = report["targets"]["mass"]
    assert entry["n"] == 10 - len(LACK_HSC) and entry["left_out"]["no_embedding"] == len(LACK_HSC)
    assert all(np.isfinite(v) for v in entry["scores"].values())
    assert f"{len(LACK_HSC)} of 10 galaxies lack the image that column embedding_hsc_image pools" in capsys.readouterr().err


def test_decode_leaves_out_rows_without_the_image_and_refuses_when_none_is_left(partial_run, partial_store, tmp_path,
                                                                                capsys):
    from astropt_tok.errors import AstroptError
    from astropt_train.use.decode import DecodeConfig, decode, first_token_distribution

    base = dict(checkpoint=partial_run, device="cpu", threads=1, seed=1, given="hsc_image",
                generate_modality="legacysurvey_image")
    with pytest.raises(AstroptError, match=r"rows 2, 5 lack hsc_image \(token store .* --keep-partial\): no chosen row"):
        decode(DecodeConfig(out=tmp_path / "none.png", rows="2,5", **base))
    result = decode(DecodeConfig(out=tmp_path / "cross.png", rows="1:3", **base))
    assert result.rows.tolist() == [1] and "note: row 2 lacks hsc_image" in capsys.readouterr().err
    stored = decode(DecodeConfig(out=tmp_path / "stored.png", tokens=partial_store, rows="6:8", device="cpu", threads=1))
    assert stored.rows.tolist() == [6] and "note: row 7 lacks legacysurvey_image" in capsys.readouterr().err
    store = st.TokenStore(partial_store)  # generating from nothing: first tokens of rows that have the image
    firsts = store.take([r for r in range(10) if r not in LACK_LS], "legacysurvey_image")[:, 0].astype(np.int64)
    np.testing.assert_allclose(first_token_distribution(store, store.vocab_size),
                               np.bincount(firsts, minlength=store.vocab_size) / len(firsts))


def test_a_model_of_one_column_embeds_that_column_and_nulls_galaxies_without_it(partial_store, tmp_path):
    """A model trained with --modalities hsc_image on a several-column store: embed reads hsc_image (not the
    store's first column) and writes a null embedding for the galaxies that lack it."""
    from dataclasses import asdict

    from astropt_tok.store import manifest_sha256
    from astropt_train import checkpoint as ck
    from astropt_train.use.embed import EmbedConfig, embed, read_embeddings, verify_embeddings

    store = st.TokenStore(partial_store)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=store.vocab_size, block_size=576, n_layer=1, n_head=2, n_embd=16,
                          modalities=["hsc_image"])).eval()
    config = {"model": asdict(model.config), "vocab_size": store.vocab_size, "tokens_per_image": 576,
              "store": {"dir": str(partial_store), "manifest_sha256": manifest_sha256(partial_store),
                        "codec_id": store.codec_id, "bands": store.modality_bands["hsc_image"]}, "step": 1}
    ck.save_checkpoint(tmp_path / "run", 1, model.state_dict(), config, {"step": 1})
    embed(EmbedConfig(checkpoint=tmp_path / "run", out=tmp_path / "emb", device="cpu", progress=False))
    assert verify_embeddings(tmp_path / "emb") == []
    emb, _, _ = read_embeddings(tmp_path / "emb")
    assert np.isnan(emb).all(1).tolist() == [r in LACK_HSC for r in range(10)]
    (hidden,) = model.hidden_states(torch.as_tensor(store.take([0], "hsc_image").astype(np.int64)), [1])
    np.testing.assert_allclose(emb[0], hidden[0].mean(0).detach().numpy(), atol=1e-5)


@pytest.mark.gpu
def test_the_missing_modality_mask_on_a_gpu_under_autocast(partial_store):
    """The same independence on CUDA in bf16 autocast (the masked kernel there), compared on the same GPU."""
    store = st.TokenStore(partial_store)
    model = _tiny_model(store).cuda()
    batch = TokenRows(store, modalities=PAIR, shuffle=True, seed=1).__getitems__([0, 2, 5, 7])
    outputs = []
    for b in (batch, _scramble_missing(batch)):
        x, y, kw = batch_to_device(b, "cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs.append((*model(x, y, **kw), kw["loss_mask"]))
    (logits, loss, keep), (logits2, loss2, _) = outputs
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[keep].float(), logits2[keep].float(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(loss, loss2, rtol=1e-3, atol=1e-3)
