"""`astropt embed`: upstream's reductions on the right layer, the store format, resume, verify, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from astropt_tok.errors import AstroptError
from astropt_tok.store import TokenStore, manifest_sha256
from astropt_train import checkpoint as ck
from astropt_train.model import GPT, GPTConfig
from astropt_train.use.embed import EmbedConfig, embed, read_embeddings, verify_embeddings

REPO = Path(__file__).resolve().parents[1]


def save_tiny_checkpoint(run: Path, store_dir: Path, head: str = "affine", n_layer: int = 3, seed: int = 0) -> GPT:
    """A randomly initialised tiny GPT saved as an `astropt train` checkpoint of `store_dir` (no training needed)."""
    store = TokenStore(store_dir)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=store.vocab_size, block_size=store.tokens_per_image, n_layer=n_layer, n_head=2,
                          n_embd=32, head=head)).eval()
    config = {"model": asdict(model.config), "vocab_size": store.vocab_size, "tokens_per_image": store.tokens_per_image,
              "store": {"dir": str(store_dir), "manifest_sha256": manifest_sha256(store_dir),
                        "codec_id": store.codec_id, "bands": store.bands}, "step": 7}
    ck.save_checkpoint(run, 7, model.state_dict(), config, {"step": 7})
    return model


@pytest.fixture(scope="module")
def run(tmp_path_factory, random_store):
    run = tmp_path_factory.mktemp("embed-run")
    return run, save_tiny_checkpoint(run, random_store)


def direct(model: GPT, tokens: np.ndarray, pool: str, layer: str) -> np.ndarray:
    """The pooled embedding computed by hand from the model's modules, with numpy pooling."""
    x = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        h = model.encoders["images_aion"].wpe(x) + model.embedders["images_aion"].wpe(torch.arange(x.shape[1]))
        for i, block in enumerate(model.transformer.h):
            h = block(h)
            if layer == "centre" and i == len(model.transformer.h) // 2:  # upstream's draw_from_centre
                break
        if layer == "final":
            h = model.transformer.ln_f(h)
    h = h.numpy().astype(np.float64)
    if pool == "mean":
        return h.mean(axis=1)
    if pool == "last":
        return h[:, -1]
    w = 10.0 ** np.linspace(0, -1, h.shape[1])  # torch.logspace(0, -1, T)
    return (h * w[None, :, None]).sum(axis=1) / w.sum()


@pytest.mark.parametrize("pool", ["mean", "last", "exp_decay"])
def test_embeddings_equal_a_direct_computation(run, random_store, tmp_path, pool):
    run_dir, model = run
    res = embed(EmbedConfig(checkpoint=run_dir, out=tmp_path / "emb", pool=pool, layers="final,centre",
                            rows="90:130", batch_size=16, device="cpu", progress=False))
    m = res.manifest
    assert m["complete"] and m["store_rows"] == [90, 130] and [s["index"] for s in m["shards"]] == [0, 1]
    assert [lay["column"] for lay in m["layers"]] == ["embedding_final", "embedding_centre"]
    assert m["checkpoint"]["step"] == 7 and m["tokens"]["manifest_sha256"] == manifest_sha256(random_store)
    tokens = TokenStore(random_store).take(np.arange(90, 130))
    for layer in ("final", "centre"):
        emb, rows, ids = read_embeddings(tmp_path / "emb", f"embedding_{layer}")
        np.testing.assert_allclose(emb, direct(model, tokens, pool, layer), rtol=1e-4, atol=1e-5)
    assert ids == [f"obj{i}" for i in range(90, 130)]
    assert verify_embeddings(tmp_path / "emb") == []


def test_store_reads_with_datasets_and_pyarrow_and_resumes_bytewise(run, tmp_path):
    import datasets
    import pyarrow as pa

    run_dir, model = run
    cfg = EmbedConfig(checkpoint=run_dir, out=tmp_path / "emb", limit=210, dtype="float16", device="cpu",
                      progress=False)
    first = embed(cfg)
    shards = [tmp_path / "emb" / s["file"] for s in first.manifest["shards"]]
    assert len(shards) == 3 and first.rows == 210
    ds = datasets.Dataset.from_file(str(shards[2]))
    assert ds.num_rows == 10 and ds.column_names == ["row", "store_row", "object_id", "embedding"]
    assert len(ds[0]["embedding"]) == 32 and ds[0]["object_id"] == "obj200"
    with pa.memory_map(str(shards[0])) as src:
        table = pa.ipc.open_stream(src).read_all()
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 32)
    before = [p.read_bytes() for p in shards]
    # a shard lost (and its completion record) is redone; the others are kept; bytes are identical
    shards[1].unlink()
    (tmp_path / "emb" / ".done" / "shard-00001.json").unlink()
    again = embed(cfg)
    assert (again.shards_written, again.shards_skipped) == (1, 2)
    assert [p.read_bytes() for p in shards] == before
    # a damaged shard is named by verify
    with open(shards[2], "r+b") as f:
        f.seek(-9, 2)
        f.write(b"\x00\x01\x02")
    assert any("shard-00002.arrow" in p for p in verify_embeddings(tmp_path / "emb"))
    # other settings into the same folder are refused without --overwrite
    with pytest.raises(AstroptError, match="another pool"):
        embed(EmbedConfig(checkpoint=run_dir, out=tmp_path / "emb", limit=210, dtype="float16", pool="last",
                          device="cpu", progress=False))


@pytest.mark.parametrize("kwargs, message", [
    ({"pool": "max"}, "--pool"),
    ({"layers": "7"}, "blocks 0..2"),
    ({"layers": "middle"}, "--layer"),
    ({"rows": "290:400"}, "--rows"),
    ({"dtype": "bf16"}, "--dtype"),
    ({"batch_size": 0}, "--batch-size"),
    ({"checkpoint": "nothing-here"}, "does not exist"),
])
def test_bad_options_are_one_clear_error(run, tmp_path, kwargs, message):
    with pytest.raises(AstroptError, match=message):
        embed(EmbedConfig(**{"checkpoint": run[0], "out": tmp_path / "emb", "device": "cpu", "progress": False,
                             **kwargs}))


def test_cli_embed_and_verify(run, tmp_path):
    env_cmd = [sys.executable, "-m", "astropt_tok"]
    out = subprocess.run(env_cmd + ["embed", "--checkpoint", str(run[0]), "--out", str(tmp_path / "e"), "--rows",
                                    "0:20", "--device", "cpu", "--pool", "exp_decay"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and "20 embeddings of 32" in out.stdout
    ok = subprocess.run(env_cmd + ["embed", "--verify", str(tmp_path / "e")], cwd=REPO, capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0 and "OK" in ok.stdout
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["pool"] == "exp_decay"
