"""Interop with upstream AstroPT both ways: export for its `load_astropt`, and its checkpoints here for embed,
generate and --init-from; refusals of what cannot fit. Cross-checks against upstream's own code take it from
the `upstream_astropt` fixture ($ASTROPT_UPSTREAM_SRC or $ASTROPT_UPSTREAM_GIT; skipped without); the rest reads
what `export` writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from astropt_tok.errors import AstroptError
from astropt_tok.store import TokenStore
from astropt_train.use.embed import EmbedConfig, embed, read_embeddings
from astropt_train.use.interop import export_astropt, load_any_model
from test_embed import save_tiny_checkpoint
from test_train_model import upstream_gpt


@pytest.mark.parametrize("head", ["affine", "aim"])
def test_export_loads_with_upstreams_load_astropt(upstream_astropt, random_store, tmp_path, head):
    U = upstream_astropt.model
    ours = save_tiny_checkpoint(tmp_path / "run", random_store, head=head, n_layer=2)
    path = export_astropt(tmp_path / "run", tmp_path / "export")
    theirs = upstream_astropt.model_utils.load_astropt(repo_id=None, path=f"{path.parent}/").eval()
    assert isinstance(theirs, U.GPT) and theirs.config.tokeniser == head
    x = torch.as_tensor(TokenStore(random_store).take(np.arange(2)).astype(np.int64))
    out, _ = theirs({"images_aion": x, "images_aion_positions": torch.arange(576).expand(2, 576)})
    torch.testing.assert_close(out["images_aion"], ours(x, x)[0], atol=1e-5, rtol=1e-5)


def test_upstream_checkpoint_embeds_and_generates_here(upstream_astropt, moved_source_store, codec_dir, tmp_path):
    """An upstream-built AION GPT (aim head, vocabulary above the codec's, longer block) saved as its train
    script saves it: embed equals upstream's generate_embeddings; decode --generate draws only codec ids."""
    from astropt_train.use.decode import DecodeConfig, decode

    U = upstream_astropt.model
    store_dir, _ = moved_source_store
    store = TokenStore(store_dir)
    vocab, block = store.vocab_size + 100, store.tokens_per_image + 24
    torch.manual_seed(3)
    theirs = upstream_gpt(U, vocab, block, 3, 2, 16, "aim")
    mods = list(theirs.modality_registry.modalities.values())
    args = dict(n_layer=3, n_head=2, n_embd=16, n_chan=3, block_size=block, dropout=0.0, modalities=mods,
                attn_type="causal")  # as train_aion.py: no tokeniser given, so upstream's default "aim"
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in theirs.state_dict().items()}, "model_args": args,
                "iter_num": 42, "best_val_loss": 1.0, "config": {"batch_size": 8},
                "modality_registry": theirs.modality_registry}, tmp_path / "ckpt.pt")
    x = torch.as_tensor(store.take(np.arange(6)).astype(np.int64))
    for pool in ("mean", "exp_decay"):
        res = embed(EmbedConfig(checkpoint=tmp_path, tokens=store_dir, out=tmp_path / f"emb-{pool}", pool=pool,
                                layers="centre", rows="0:6", device="cpu", progress=False))
        assert res.manifest["checkpoint"]["kind"] == "upstream-astropt" and res.manifest["checkpoint"]["step"] == 42
        with torch.no_grad():
            want = theirs.generate_embeddings({"images_aion": x, "images_aion_positions": torch.arange(x.shape[1])
                                               .expand(len(x), -1)}, reduction=pool)["images_aion"]
        np.testing.assert_allclose(read_embeddings(tmp_path / f"emb-{pool}")[0], want.numpy(), rtol=1e-4, atol=1e-5)
    result = decode(DecodeConfig(checkpoint=tmp_path / "ckpt.pt", tokens=store_dir, generate=1, codec=str(codec_dir),
                                 device="cpu", out=tmp_path / "gen.png", save_flux=tmp_path / "gen.npy"))
    assert result.out.exists() and np.load(tmp_path / "gen.npy").shape[0] == 1


def test_exported_checkpoint_reads_back_and_init_from_trains(moved_source_store, tmp_path):
    """export -> ckpt.pt -> load_any_model gives the same logits; train --init-from keeps its shape and head."""
    from astropt_train.config import build_config
    from astropt_train.loop import train

    store_dir, _ = moved_source_store
    ours = save_tiny_checkpoint(tmp_path / "run", store_dir, head="aim", n_layer=2)
    path = export_astropt(tmp_path / "run", tmp_path / "export")
    back, info = load_any_model(path)
    assert info["kind"] == "upstream-astropt" and back.config == ours.config
    x = torch.as_tensor(TokenStore(store_dir).take(np.arange(2)).astype(np.int64))
    torch.testing.assert_close(back(x, x)[0], ours(x, x)[0])
    summary = train(build_config(dict(tokens=str(store_dir), out=str(tmp_path / "tuned"), init_from=str(path),
                                      batch_size=4, max_iters=2, eval_interval=2, eval_iters=1, val_images=0,
                                      live=False, checkpoint_interval=0, warmup_iters=0)))
    conf = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert conf["model"]["head"] == "aim" and conf["train"]["init_from"] == str(path) and summary["step"] == 2


def test_checkpoints_that_cannot_fit_are_one_clear_error(random_store, tmp_path):
    from astropt_train.use.interop import read_upstream_checkpoint

    from astropt_tok.store import write_store_from_arrays

    small = tmp_path / "small"
    write_store_from_arrays(small, np.zeros((4, 576), np.int64), num_shards=1, bands=["DES-G"],
                            codec={"id": "small", "vocab_size": 300, "tokens_per_image": 576})
    save_tiny_checkpoint(tmp_path / "run", small, n_layer=2)
    path = export_astropt(tmp_path / "run", tmp_path / "export")
    # its vocabulary (300) is smaller than the random store's 4375
    with pytest.raises(AstroptError, match="knows .* tokens, fewer than the vocabulary"):
        embed(EmbedConfig(checkpoint=path, tokens=random_store, out=tmp_path / "e", device="cpu", progress=False))
    # a modality renamed in model_args alone: the registry and the weights' names disagree with it
    from astropt_train.use.interop import _UPSTREAM_PICKLE

    ckpt = read_upstream_checkpoint(path)
    ckpt["model_args"]["modalities"][0].name = "images"
    torch.save(ckpt, tmp_path / "other.pt", pickle_module=_UPSTREAM_PICKLE)
    with pytest.raises(AstroptError, match="modality_registry is \\['images_aion'\\]"):
        load_any_model(tmp_path / "other.pt")
    del ckpt["modality_registry"]
    torch.save(ckpt, tmp_path / "other.pt", pickle_module=_UPSTREAM_PICKLE)
    with pytest.raises(AstroptError, match="weights do not fit its model_args"):
        load_any_model(tmp_path / "other.pt")
    # a modality of patches (upstream's images), not tokens
    ckpt["model_args"]["modalities"][0].vocab_size = 0
    torch.save(ckpt, tmp_path / "other.pt", pickle_module=_UPSTREAM_PICKLE)
    with pytest.raises(AstroptError, match="reads token models"):
        load_any_model(tmp_path / "other.pt")
    # a pickle that would run code is refused, not executed
    torch.save({"model": {}, "model_args": {}, "hook": print}, tmp_path / "evil.pt")
    with pytest.raises(AstroptError, match="not an upstream AstroPT checkpoint this tool can read"):
        read_upstream_checkpoint(tmp_path / "evil.pt")
