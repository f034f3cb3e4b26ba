"""Training on a store's image, scalar and spectrum columns at once: each modality with its own vocabulary and
length (GPTConfig.modality_vocab / modality_tokens), blocks of unequal length per row, the loss head by head,
per-modality loss weights, checkpoints, export to upstream AstroPT, and the first-token distribution of a block."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from astropt_tok import store as st
from astropt_tok.errors import AstroptError
from astropt_train import checkpoint as ck
from astropt_train.config import build_config
from astropt_train.data import TokenRows, batch_to_device, valid_at
from astropt_train.loop import train
from astropt_train.model import GPT, GPTConfig

NAMES = ["img", "Z", "spec"]
VOCAB = {"img": 64, "Z": 32, "spec": 16}
TOKENS = {"img": 16, "Z": 1, "spec": 9}
SPECS = {"Z": {"kind": "scalar", "vocab_size": 32, "aion_modality": "Z"},
         "spec": {"kind": "spectrum", "vocab_size": 16, "aion_modality": "DESISpectrum"}}
CODEC = {"id": "tiny", "vocab_size": 64, "tokens_per_image": 16}


def _tokens(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Galaxies of four kinds: each kind's image, redshift and spectrum tokens follow from it (learnable)."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 4, rows)[:, None]
    noise = rng.random((rows, 16)) < 0.1
    img = np.where(noise, rng.integers(0, 64, (rows, 16)), (kind * 16 + np.arange(16)) % 64)
    return {"img": img, "Z": kind * 8 + 3, "spec": (kind + np.arange(9)) % 16}


def _store(path, rows: int = 40, valid: dict | None = None, specs: dict = SPECS, tokens=None) -> dict:
    tokens = tokens or _tokens(rows)
    st.write_store_from_arrays(path, tokens, 2, CODEC, {"img": ["DES-G", "DES-R"]}, specs=specs, valid=valid)
    return tokens


def _cfg(store, out, **kw):
    base = dict(tokens=str(store), out=str(out), n_layer=1, n_head=2, n_embd=32, batch_size=8, max_iters=30,
                lr=1e-2, warmup_iters=1, eval_interval=30, eval_iters=2, log_interval=1, val_images=0, live=False,
                device="cpu", compile=False, checkpoint_interval=0, val_fraction=0.2)
    base.update(kw)
    return build_config(base)


def _model(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, block_size=26, n_layer=2, n_head=2, n_embd=32, modalities=NAMES,
               modality_vocab=[VOCAB[n] for n in NAMES], modality_tokens=[TOKENS[n] for n in NAMES],
               modality_kinds=["image", "scalar", "spectrum"])
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def _sequences(tokens: dict, order: np.ndarray | None = None) -> torch.Tensor:
    """Each row's blocks concatenated in `order` (None: NAMES order) -> (B, 26) int64."""
    rows = len(tokens["img"])
    order = np.tile(np.arange(3), (rows, 1)) if order is None else order
    return torch.as_tensor(np.stack([np.concatenate([tokens[NAMES[k]][r] for k in order[r]]) for r in range(rows)]))


def test_batches_concatenate_each_column_at_its_length_in_each_rows_order(tmp_path):
    tokens = _store(tmp_path / "s")
    store = st.TokenStore(tmp_path / "s")
    rows = np.array([3, 0, 17, 30])
    batch = TokenRows(store, modalities=NAMES).__getitems__(rows)
    assert batch["lengths"].tolist() == [16, 1, 9] and batch["tokens"].shape == (4, 26)
    np.testing.assert_array_equal(batch["tokens"].numpy(), _sequences({n: t[rows] for n, t in tokens.items()}))
    shuffled = TokenRows(store, modalities=NAMES, shuffle=True, seed=5).__getitems__(np.arange(40))
    order = shuffled["order"].numpy()
    assert len({tuple(o) for o in order}) > 2  # several orders among 40 rows
    np.testing.assert_array_equal(shuffled["tokens"].numpy(), _sequences(tokens, order))
    from astropt_train.validate import split_blocks

    back = split_blocks(shuffled["tokens"], shuffled["order"], NAMES, shuffled["lengths"])
    for n in NAMES:
        np.testing.assert_array_equal(back[n].numpy(), tokens[n])


def test_columns_of_different_dtypes_are_read_in_one_wider_type(tmp_path):
    wide = {"Z": SPECS["Z"], "spec": {**SPECS["spec"], "vocab_size": 40000}}  # a uint16 column beside int16 ones
    tokens = _tokens(10)
    tokens["spec"] = tokens["spec"] * 2000 + 7
    _store(tmp_path / "s", specs=wide, tokens=tokens)
    store = st.TokenStore(tmp_path / "s")
    assert store.modality_dtype["spec"] == np.uint16 and store.modality_dtype["img"] == np.int16
    batch = TokenRows(store, modalities=NAMES).__getitems__(np.arange(10))
    assert batch["tokens"].dtype == torch.int32
    np.testing.assert_array_equal(batch["tokens"].numpy(), _sequences(tokens))


@pytest.mark.parametrize("shuffle", [False, True])
def test_keep_partial_masks_exactly_the_tokens_of_a_missing_modality(tmp_path, shuffle):
    valid = {"img": np.ones(40, bool), "Z": np.arange(40) % 3 != 0, "spec": np.arange(40) % 5 != 0}
    _store(tmp_path / "s", valid=valid)
    store = st.TokenStore(tmp_path / "s")
    batch = TokenRows(store, modalities=NAMES, shuffle=shuffle, seed=1).__getitems__(np.arange(40))
    x, y, kw = batch_to_device(batch, "cpu")
    order = batch["order"].numpy() if shuffle else np.tile(np.arange(3), (40, 1))
    for r in range(40):
        owner = np.concatenate([np.full(TOKENS[NAMES[k]], k) for k in order[r]])  # the modality of each position
        has = np.array([valid[n][r] for n in NAMES])[owner]  # [26]
        np.testing.assert_array_equal(kw["loss_mask"][r].numpy(), has[1:])
        np.testing.assert_array_equal(kw["present"][r].numpy(), has[:-1])
    assert torch.equal(valid_at(batch["valid"], batch.get("order"), 0, 26, batch["lengths"])[:, :-1], kw["present"])


@pytest.mark.parametrize("shuffle", [False, True])
def test_each_position_is_read_and_predicted_by_its_own_modality(shuffle):
    model = _model()
    tokens = _tokens(6, seed=1)
    order = np.array([[2, 0, 1], [1, 2, 0], [0, 1, 2], [0, 2, 1], [1, 0, 2], [2, 1, 0]]) if shuffle else None
    seq = _sequences(tokens, order)
    order_t = torch.as_tensor(order) if shuffle else None
    modality, within = model.place(0, 26, order_t, 6, "cpu")
    for r in range(6):
        o = order[r] if shuffle else [0, 1, 2]
        owner = np.concatenate([np.full(TOKENS[NAMES[k]], k) for k in o])
        place = np.concatenate([np.arange(TOKENS[NAMES[k]]) for k in o])
        np.testing.assert_array_equal(modality[r].numpy(), owner)
        np.testing.assert_array_equal(within.expand(6, -1)[r].numpy(), place)
    x, y = seq[:, :-1], seq[:, 1:]
    parts = {}
    with torch.no_grad():
        logits, loss = model(x, y, order=order_t, modality_losses=parts)
        assert logits.shape == (6, 25, 64)
        # each position's logits: its next token's head, -inf past that modality's vocabulary
        target = model.modality_at(1, 25, order_t, 6, "cpu")
        width = torch.tensor([VOCAB[n] for n in NAMES])[target]  # (6, 25)
        assert torch.equal(torch.isinf(logits), torch.arange(64) >= width[..., None])
        ce = F.cross_entropy(logits.reshape(-1, 64), y.reshape(-1), reduction="none").view(6, 25)
        assert loss == pytest.approx(float(ce.mean()), rel=1e-5)
        for k, n in enumerate(NAMES):
            assert parts[n] == pytest.approx(float(ce[target == k].mean()), rel=1e-5)
        _, chunked = model(x, y, order=order_t, loss_chunks=3)
        assert chunked == pytest.approx(float(loss), rel=1e-5)
        weighted = _model(loss_weights=[1.0, 26.0, 2.0])  # the same weights (seed 0), other loss weights
        _, wloss = weighted(x, y, order=order_t)
        w = torch.tensor([1.0, 26.0, 2.0])[target]
        assert wloss == pytest.approx(float((ce * w).sum() / w.sum()), rel=1e-5)
    # training: the loss head by head (no padded logits); the same value, and gradients reach every head
    logits, train_loss = model(x, y, order=order_t)
    assert logits is None and train_loss.item() == pytest.approx(float(loss), rel=1e-5)
    train_loss.backward()
    assert all(model.decoders[n].c_fc.weight.grad.abs().sum() > 0 for n in NAMES)


def test_first_token_distribution_of_a_block_and_generation_within_each_vocabulary():
    model = _model()
    seq = _sequences(_tokens(4, seed=2))
    with torch.no_grad():
        z = model.next_token_logits(seq[:, :16], "Z")  # the image -> the distribution of Z's token
        assert z.shape == (4, 32) and torch.isfinite(z).all()
        full, _ = model(seq[:, :-1], seq[:, 1:])
        torch.testing.assert_close(z, full[:, 15, :32])
        spec = model.next_token_logits(seq[:, :17], "spec")
        torch.testing.assert_close(spec, full[:, 16, :16])
    with pytest.raises(ValueError, match="begins at position 16"):
        model.next_token_logits(seq[:, :10], "Z")
    with pytest.raises(ValueError, match="begins the sequence"):
        model.next_token_logits(seq[:, :0], "img")
    order = torch.tensor([[2, 0, 1]] * 4)  # spec first: Z begins at 9 + 16 = 25
    assert model.block_start("Z", order).tolist() == [25] * 4
    drawn = [model.generate(seq[:, :3], 23, generator=torch.Generator().manual_seed(0), use_kv_cache=kv)
             for kv in (True, False)]
    assert torch.equal(*drawn)
    assert drawn[0][:, 16].max() < 32 and drawn[0][:, 17:].max() < 16  # each block among its own ids


def test_a_mixed_store_trains_logs_each_modality_and_reloads(tmp_path):
    _store(tmp_path / "s")
    summary = train(_cfg(tmp_path / "s", tmp_path / "run", loss_weight="Z=4", checkpoint_interval=30))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    for n in NAMES:
        assert np.isfinite(last[f"loss_{n}"]) and np.isfinite(last[f"val_loss_{n}"])
        assert last[f"loss_{n}"] < first[f"loss_{n}"]
    assert last["loss"] < first["loss"] - 0.5
    model, config = ck.load_model(summary["checkpoint"])
    m = config["model"]
    assert (m["modalities"], m["modality_vocab"], m["modality_tokens"], m["modality_kinds"], m["loss_weights"]) == (
        NAMES, [64, 32, 16], [16, 1, 9], ["image", "scalar", "spectrum"], [1.0, 4.0, 1.0])
    assert m["block_size"] == 26 and model.decoders["Z"].c_fc.weight.shape == (32, 32)
    assert model.encoders["spec"].wpe.weight.shape == (16, 32)
    store = st.TokenStore(tmp_path / "s")
    batch = TokenRows(store, modalities=NAMES).__getitems__(np.arange(8))
    x, y, kw = batch_to_device(batch, "cpu")
    again, _ = ck.load_model(summary["checkpoint"])
    with torch.no_grad():
        torch.testing.assert_close(model(x, y, **kw)[0], again(x, y, **kw)[0], rtol=0, atol=0)
    # resume with the same shapes continues; a model of other shapes is refused
    more = train(_cfg(tmp_path / "s", tmp_path / "run", loss_weight="Z=4", max_iters=32, resume=True))
    assert more["step"] == 32
    with pytest.raises(AstroptError, match="cannot resume .* modalities"):
        train(_cfg(tmp_path / "s", tmp_path / "run", modalities="img,Z", max_iters=40, resume=True))
    # a new run from its weights: the same shapes start from them; a store of other shapes is refused
    started = train(_cfg(tmp_path / "s", tmp_path / "init", init_from=str(tmp_path / "run"), max_iters=1))
    assert np.isfinite(started["loss"])
    wide = {"Z": SPECS["Z"], "spec": {**SPECS["spec"], "vocab_size": 20}}
    _store(tmp_path / "wide", specs=wide)
    with pytest.raises(AstroptError, match="--init-from .* spec spectrum 9 x vocab 16; store .* spec spectrum 9 x "
                                           "vocab 20"):
        train(_cfg(tmp_path / "wide", tmp_path / "init2", init_from=str(tmp_path / "run"), max_iters=1))


def test_shuffled_partial_mixed_store_trains(tmp_path):
    valid = {"img": np.ones(40, bool), "Z": np.arange(40) % 3 != 0, "spec": np.arange(40) % 5 != 0}
    _store(tmp_path / "s", valid=valid)
    summary = train(_cfg(tmp_path / "s", tmp_path / "run", shuffle_modalities=True, max_iters=4, eval_interval=4,
                         loss_chunks=2))
    assert np.isfinite(summary["loss"]) and np.isfinite(summary["val_loss"])


def test_loss_weight_mistakes_are_one_error(tmp_path):
    _store(tmp_path / "s", rows=20)
    for weight, message in [("Z", "give NAME=W"), ("Z=-1", "give NAME=W"), ("Z=nan", "give NAME=W"),
                            ("Z=1,Z=2", "names Z twice")]:
        with pytest.raises(AstroptError, match=message):
            _cfg(tmp_path / "s", tmp_path / "bad", loss_weight=weight)
    with pytest.raises(AstroptError, match="no modality of that name"):
        train(_cfg(tmp_path / "s", tmp_path / "bad", loss_weight="redshift=2"))
    with pytest.raises(AstroptError, match="every modality's weight is 0"):
        train(_cfg(tmp_path / "s", tmp_path / "bad", loss_weight="img=0,Z=0,spec=0"))
    with pytest.raises(AstroptError, match="one token has nothing to predict"):
        train(_cfg(tmp_path / "s", tmp_path / "bad", modalities="Z"))


def test_cli_loss_weight_flag_repeats(tmp_path, capsys):
    from astropt_tok.cli import main

    _store(tmp_path / "s", rows=20)
    common = ["train", "--tokens", str(tmp_path / "s"), "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
              "--batch-size", "4", "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1",
              "--val-images", "0", "--device", "cpu", "--no-compile"]
    main([*common, "--out", str(tmp_path / "run"), "--loss-weight", "Z=8", "--loss-weight", "spec=2"])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["loss_weights"] == [1.0, 8.0, 2.0] and config["train"]["loss_weight"] == "Z=8,spec=2"
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main([*common, "--out", str(tmp_path / "bad"), "--loss-weight", "Z:8"])
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --loss-weight 'Z:8': give NAME=W")


def test_mixed_export_reads_back_with_each_modalitys_vocabulary(tmp_path):
    from astropt_train.use.interop import _UPSTREAM_PICKLE, export_astropt, load_any_model, read_upstream_checkpoint

    _store(tmp_path / "s", rows=20)
    train(_cfg(tmp_path / "s", tmp_path / "run", max_iters=2, eval_interval=2, loss_weight="Z=3"))
    path = export_astropt(tmp_path / "run", tmp_path / "export")
    raw = read_upstream_checkpoint(path)
    mods = {m.name: m for m in raw["model_args"]["modalities"]}
    assert {n: (m.vocab_size, m.input_size, m.loss_weight) for n, m in mods.items()} == {
        "img": (64, 64, 1.0), "Z": (32, 32, 3.0), "spec": (16, 16, 1.0)}
    assert raw["config"]["modality_tokens"] == TOKENS
    back, info = load_any_model(path)
    mine, _ = ck.load_model(tmp_path / "run")
    assert back.config == mine.config and info["kind"] == "upstream-astropt"
    raw["config"].pop("modality_tokens")  # an upstream checkpoint of several vocabularies, lengths unknown
    with open(tmp_path / "other.pt", "wb") as f:
        torch.save(raw, f, pickle_module=_UPSTREAM_PICKLE, pickle_protocol=2)
    with pytest.raises(AstroptError, match="records no tokens per modality"):
        load_any_model(tmp_path / "other.pt")


def test_plan_takes_a_mixed_stores_positions_and_parameters(tmp_path):
    from astropt_train.plan import PlanConfig, plan

    _store(tmp_path / "s", rows=10)
    (shape,) = [p.model for p in plan(PlanConfig(tokens=str(tmp_path / "s"), preset="tiny"))]
    assert shape.block_size == 26 and shape.vocab == 64 and shape.modalities == 3
    model = _model(n_layer=2, n_head=2, n_embd=64)  # the tiny preset's shape
    assert shape.params == model.num_params()


def test_loss_weights_of_equal_image_blocks_weigh_each_modalitys_targets():
    torch.manual_seed(0)
    shape = dict(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, modalities=["a", "b"])
    plain = GPT(GPTConfig(**shape)).eval()
    weighted = GPT(GPTConfig(**shape, loss_weights=[1.0, 3.0])).eval()
    weighted.load_state_dict(plain.state_dict())
    seq = torch.randint(0, 50, (4, 16))
    x, y = seq[:, :-1], seq[:, 1:]
    with torch.no_grad():
        logits, _ = plain(x, y)
        ce = F.cross_entropy(logits.reshape(-1, 50), y.reshape(-1), reduction="none").view(4, 15)
        w = torch.where(torch.arange(1, 16) >= 8, 3.0, 1.0).expand(4, -1)  # targets 8..15 are b's
        for chunks in (1, 3):
            _, loss = weighted(x, y, loss_chunks=chunks)
            assert loss.item() == pytest.approx(float((ce * w).sum() / w.sum()), rel=1e-5)


def test_validation_pictures_draw_the_image_column_and_skip_scalars_and_spectra(codec_dir, tmp_path):
    from astropt_tok.codec import load_image_codec

    codec = load_image_codec(str(codec_dir)).describe()  # the tiny real AION ImageCodec: 576 tokens of 4375
    rng = np.random.default_rng(0)
    tokens = {"img": rng.integers(0, 4375, (12, 576)), "Z": rng.integers(0, 32, (12, 1)),
              "spec": rng.integers(0, 16, (12, 9))}
    st.write_store_from_arrays(tmp_path / "s", tokens, 1, codec, {"img": ["DES-G", "DES-R", "DES-I", "DES-Z"]},
                               specs=SPECS)
    summary = train(_cfg(tmp_path / "s", tmp_path / "run", batch_size=4, max_iters=2, eval_interval=2, eval_iters=1,
                         val_images=1))
    assert np.isfinite(summary["val_loss"])
    assert [p.name for p in (tmp_path / "run" / "val_images").iterdir()] == ["step-00000002-img.png"]


def test_mixed_export_loads_into_upstreams_gpt_and_agrees(upstream_astropt, tmp_path):
    """Upstream's `load_astropt` builds its GPT from the exported registry (each modality's own vocabulary) and
    takes every weight; with the blocks in its order (sorted names) its logits of each modality are ours."""
    from astropt_train.use.interop import export_astropt

    _store(tmp_path / "s", rows=20)
    train(_cfg(tmp_path / "s", tmp_path / "run", max_iters=2, eval_interval=2))
    path = export_astropt(tmp_path / "run", tmp_path / "export")
    theirs = upstream_astropt.model_utils.load_astropt(repo_id=None, path=f"{path.parent}/").eval()
    exported = torch.load(path, weights_only=False, map_location="cpu")["model"]  # upstream's classes: trusted here
    assert theirs.load_state_dict(exported, strict=True)
    names = theirs.modality_registry.names()
    assert names == sorted(NAMES)
    ours, _ = ck.load_model(tmp_path / "run")
    tokens = _tokens(3, seed=4)
    blocks = {m: torch.as_tensor(tokens[m]) for m in names}
    inputs = {**blocks, **{f"{m}_positions": torch.arange(TOKENS[m]).expand(3, -1) for m in names}}
    sequence = torch.cat([blocks[m] for m in names], dim=1)  # (3, 26): upstream's order
    order = torch.tensor([[NAMES.index(m) for m in names]] * 3)
    with torch.no_grad():
        out, _ = theirs(inputs)
        after = torch.cat([sequence[:, 1:], torch.zeros(3, 1, dtype=torch.long)], dim=1)  # each position's target
        logits, _ = ours(sequence, after, order=order)  # position p: the head of token p + 1's modality
    start = 0
    for m in names:  # upstream's outputs of modality m: the positions that predict its tokens (none before the first)
        first = max(start - 1, 0)
        end = start + TOKENS[m] - 1
        torch.testing.assert_close(out[m], logits[:, first:end, : VOCAB[m]], atol=1e-5, rtol=1e-5)
        start += TOKENS[m]


def test_a_tokenised_catalogue_store_trains_and_draws_its_image(survey_dir, catalogue_codec, tmp_path):
    """The real path: `tokenise --scalar/--spectrum` (the tiny image codec, AION's Z, flux and spectrum codecs),
    then `train` on every column, blocks shuffled, the image drawn at validation."""
    from astropt_tok.tokenise import tokenise
    from test_catalog_tokenise import _catalogue_survey, _config

    source = _catalogue_survey(tmp_path / "survey", survey_dir)
    tokenise(_config(source, catalogue_codec, tmp_path / "tokens"))
    store = st.TokenStore(tmp_path / "tokens")
    summary = train(_cfg(tmp_path / "tokens", tmp_path / "run", batch_size=4, max_iters=2, eval_interval=2,
                         eval_iters=1, val_images=1, shuffle_modalities=True, loss_weight="redshift=50"))
    assert np.isfinite(summary["loss"]) and np.isfinite(summary["val_loss"])
    model, config = ck.load_model(tmp_path / "run")
    assert model.names == store.modalities and model.lengths == [store.modality_tokens[m] for m in store.modalities]
    assert model.vocabs == [store.modality_vocab[m] for m in store.modalities]
    assert config["model"]["modality_kinds"] == [store.modality_kind[m] for m in store.modalities]
    assert [p.name for p in (tmp_path / "run" / "val_images").iterdir()] == ["step-00000002-legacysurvey_image.png"]


def test_a_mixed_model_embeds_each_block_at_its_own_length(tmp_path):
    """`astropt embed` of a model of an image, a scalar and a spectrum: per layer the joint embedding and one per
    block, each pooled over that block's own positions (16, 1 and 9 tokens)."""
    from astropt_train.use.embed import EmbedConfig, embed, read_embeddings

    tokens = _store(tmp_path / "s", rows=12)
    summary = train(_cfg(tmp_path / "s", tmp_path / "run", max_iters=2, checkpoint_interval=2))
    embed(EmbedConfig(checkpoint=summary["checkpoint"], out=tmp_path / "emb", device="cpu", progress=False))
    model, _ = ck.load_model(summary["checkpoint"])
    x = _sequences(tokens)  # (12, 26) in the model's order
    with torch.no_grad():
        hidden = model.hidden_states(x, [model.config.n_layer])[0]  # (12, 26, C): "final", after ln_f
    for name, (a, b) in {"img": (0, 16), "Z": (16, 17), "spec": (17, 26)}.items():
        values, rows, _ = read_embeddings(tmp_path / "emb", f"embedding_{name}")
        np.testing.assert_allclose(values, hidden[rows, a:b].mean(dim=1).numpy(), rtol=1e-4, atol=1e-5)
    values, rows, _ = read_embeddings(tmp_path / "emb", "embedding")
    np.testing.assert_allclose(values, hidden[rows].mean(dim=1).numpy(), rtol=1e-4, atol=1e-5)
