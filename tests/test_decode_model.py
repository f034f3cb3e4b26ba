"""`astropt decode --checkpoint`: generation (KV cache vs none), completion, teacher-forced prediction, errors.

The checkpoint is a real one written by `astropt_train.checkpoint.save_checkpoint` from a tiny real GPT.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

from astropt_tok.errors import AstroptError
from astropt_train.use.decode import (
    DecodeConfig,
    complete_tokens,
    decode,
    generate_tokens,
    predict_tokens,
    torch_threads,
)
from astropt_train.model import GPT, GPTConfig


def _tiny_gpt(vocab: int = 4375, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=576, n_layer=2, n_head=2, n_embd=32))
    # Sharpen the random model a little so sampling is not uniform noise (logits far from flat).
    with torch.no_grad():
        model.decoders["images_aion"].c_fc.weight.mul_(20)
    return model.eval()


def _save_run(run_dir, model: GPT, store_dir, codec_id: str, bands, step: int = 7):
    """A checkpoint as if trained on `store_dir` (its manifest's sha256 recorded: the random store records no
    codec weights, so the lineage check knows the store by that), whose validation images used `codec_id`."""
    from pathlib import Path

    from astropt_tok.store import manifest_sha256
    from astropt_train.checkpoint import save_checkpoint

    sha = manifest_sha256(store_dir) if (Path(store_dir) / "manifest.json").is_file() else ""
    config = {
        "model": asdict(model.config),
        "vocab_size": model.config.vocab_size,
        "tokens_per_image": 576,
        "store": {"dir": str(store_dir), "manifest_sha256": sha, "codec_id": codec_id, "bands": list(bands)},
        "step": step,
    }
    save_checkpoint(run_dir, step, model.state_dict(), config, {})
    return run_dir


@pytest.fixture(scope="module")
def model():
    return _tiny_gpt()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model, random_store, codec_dir):
    return _save_run(tmp_path_factory.mktemp("run"), model, random_store, str(codec_dir),
                     ["DES-G", "DES-R", "DES-I", "DES-Z"])


def test_generation_with_kv_cache_equals_without(model):
    probs = np.full(4375, 1 / 4375)
    with torch_threads(1):  # tiny per-token steps: one thread avoids OpenMP stalls on a busy 2-core box
        with_cache = generate_tokens(model, 2, probs, 576, temperature=1.0, top_k=50, seed=3, kv_cache=True)
        without = generate_tokens(model, 2, probs, 576, temperature=1.0, top_k=50, seed=3, kv_cache=False)
        other_seed = generate_tokens(model, 2, probs, 576, temperature=1.0, top_k=50, seed=4, kv_cache=True)
    assert with_cache.shape == (2, 576)
    np.testing.assert_array_equal(with_cache, without)
    assert not np.array_equal(with_cache, other_seed)
    assert len(np.unique(with_cache)) > 20  # really sampled, not one repeated token


def test_completion_with_kv_cache_equals_without(model, random_store):
    from astropt_tok.store import TokenStore

    stored = TokenStore(random_store).take(np.arange(2)).astype(np.int64)
    with torch_threads(1):  # a 400-token prefix goes through the cache's multi-token prefill path
        a = complete_tokens(model, stored, keep=400, top_k=20, seed=9, kv_cache=True)
        b = complete_tokens(model, stored, keep=400, top_k=20, seed=9, kv_cache=False)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :400], stored[:, :400])


def test_sampling_feeds_each_position_through_the_model_once_with_the_cache(model):
    fed = []  # token positions run through the model, per forward call
    hook = model.encoders["images_aion"].register_forward_hook(lambda mod, args, out: fed.append(args[0].shape[1]))
    try:
        with torch_threads(1):
            generate_tokens(model, 1, np.full(4375, 1 / 4375), 576, seed=0, kv_cache=True)
            cached = list(fed)
            fed.clear()
            generate_tokens(model, 1, np.full(4375, 1 / 4375), 576, seed=0, kv_cache=False)
    finally:
        hook.remove()
    assert cached == [1] * 575  # one new position per step: not 575 full forward passes
    assert fed == list(range(1, 576))  # without the cache every step re-runs the whole prefix


def test_generate_from_checkpoint_draws_first_tokens_from_the_store(run_dir, random_store, tmp_path):
    from astropt_tok.store import TokenStore

    res = decode(DecodeConfig(checkpoint=run_dir, generate=3, seed=5, top_k=100, out=tmp_path / "gen.png", threads=1,
                              save_flux=tmp_path / "gen.npy"))
    again = decode(DecodeConfig(checkpoint=run_dir, generate=3, seed=5, top_k=100, out=tmp_path / "gen2.png",
                                kv_cache=False, threads=1))
    assert res.mode == "generate" and res.labels == ["generated #0", "generated #1", "generated #2"]
    np.testing.assert_array_equal(res.tokens, again.tokens)
    first_tokens = set(TokenStore(random_store).take(np.arange(300))[:, 0].tolist())
    assert set(res.tokens[:, 0].tolist()) <= first_tokens
    assert np.load(tmp_path / "gen.npy").shape == (3, 4, 96, 96)


def test_completion_keeps_the_first_k_tokens(run_dir, random_store, tmp_path):
    from astropt_tok.store import TokenStore

    stored = TokenStore(random_store).take(np.arange(4, 7)).astype(np.int64)
    res = decode(DecodeConfig(checkpoint=run_dir, tokens=random_store, rows="4:7", complete_from=100, seed=1,
                              out=tmp_path / "c.png", threads=1))
    assert res.tokens.shape == (3, 576)
    np.testing.assert_array_equal(res.tokens[:, :100], stored[:, :100])
    assert not np.array_equal(res.tokens[:, 100:], stored[:, 100:])  # the model wrote the rest
    # the random store has no survey behind it, so there is no original column
    assert res.columns == ["codec reconstruction", "completion from 100"]
    assert res.metrics["completion"]["kept"] == 100
    with pytest.raises(AstroptError, match="between 1 and 575"):
        complete_tokens(_tiny_gpt(), stored, keep=576)


def test_prediction_is_teacher_forced_argmax(model, random_store, tmp_path):
    from astropt_tok.store import TokenStore

    stored = TokenStore(random_store).take(np.arange(2)).astype(np.int64)
    pred, stats = predict_tokens(model, stored)
    assert pred.shape == (2, 576) and (pred[:, 0] == stored[:, 0]).all()
    x = torch.as_tensor(stored)
    with torch.no_grad():
        for j in (1, 2, 300, 575):  # the token at position j is predicted from positions 0..j-1
            logits, _ = model(x[:, :j])
            np.testing.assert_array_equal(pred[:, j], logits[:, -1].argmax(-1).numpy())
    assert stats["accuracy"] == pytest.approx(float((pred[:, 1:] == stored[:, 1:]).mean()))
    assert stats["loss"] > 0


def test_predict_mode_shows_reconstruction_and_prediction(run_dir, random_store, tmp_path):
    res = decode(DecodeConfig(checkpoint=run_dir, tokens=random_store, ids=["obj9"], predict=True,
                              out=tmp_path / "p.png"))
    assert res.columns == ["codec reconstruction", "prediction"] and res.labels == ["obj9"]
    assert 0 <= res.metrics["prediction"]["accuracy"] <= 1


def test_checkpoint_vocab_must_match_the_codec(tmp_path, random_store, codec_dir):
    run = _save_run(tmp_path / "run5000", _tiny_gpt(vocab=5000), random_store, str(codec_dir),
                    ["DES-G", "DES-R", "DES-I", "DES-Z"])
    with pytest.raises(AstroptError, match="vocabulary of 5000"):
        decode(DecodeConfig(checkpoint=run, generate=1, out=tmp_path / "x.png"))


def test_mode_errors(run_dir, random_store, tmp_path, codec_dir):
    with pytest.raises(AstroptError, match="--checkpoint"):
        decode(DecodeConfig(tokens=random_store, generate=2, out=tmp_path / "x.png"))
    with pytest.raises(AstroptError, match="one of --generate, --complete-from, --predict"):
        decode(DecodeConfig(checkpoint=run_dir, rows="0", predict=True, complete_from=3, out=tmp_path / "x.png"))
    with pytest.raises(AstroptError, match="no --rows"):
        decode(DecodeConfig(checkpoint=run_dir, rows="0", generate=2, out=tmp_path / "x.png"))
    gone = _save_run(tmp_path / "run-gone", _tiny_gpt(), tmp_path / "no-such-store", str(codec_dir), ["DES-G"])
    with pytest.raises(AstroptError, match="--tokens"):
        decode(DecodeConfig(checkpoint=gone, generate=1, out=tmp_path / "x.png"))


def test_predict_without_the_source_files_leaves_out_the_originals(moved_source_store, codec_dir, model, tmp_path,
                                                                   capsys):
    store, folder = moved_source_store
    run = _save_run(tmp_path / "run", model, store, str(codec_dir), ["DES-G", "DES-R", "DES-I", "DES-Z"])
    res = decode(DecodeConfig(checkpoint=run, tokens=store, rows="0:2", predict=True, out=tmp_path / "p.png"))
    assert res.columns == ["codec reconstruction", "prediction"]
    assert "note: no original panels" in capsys.readouterr().err
    res = decode(DecodeConfig(checkpoint=run, tokens=store, rows="0:2", predict=True, source=folder,
                              out=tmp_path / "q.png"))
    assert res.columns == ["original", "codec reconstruction", "prediction"]
