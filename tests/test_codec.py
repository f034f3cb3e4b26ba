"""Loading the real AION ImageCodec: a local snapshot in the hub layout, and a hub id from the HF cache offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from astropt_tok.codec import load_image_codec
from astropt_tok.errors import AstroptError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_local_snapshot_loads_the_real_codec(codec_dir):
    import torch
    from aion.codecs.image import ImageCodec
    from aion.modalities import LegacySurveyImage

    loaded = load_image_codec(str(codec_dir))
    assert isinstance(loaded.codec, ImageCodec)
    assert loaded.vocab_size == 4375 and loaded.tokens_per_image == 576  # from the quantizer, not a constant
    assert loaded.revision is None and len(loaded.weights_sha256) == 64
    flux = torch.rand(2, 4, 160, 160)
    with torch.inference_mode():
        tokens = loaded.codec.encode(LegacySurveyImage(flux=flux, bands=["DES-G", "DES-R", "DES-I", "DES-Z"]))
    assert tokens.shape == (2, 576) and int(tokens.min()) >= 0 and int(tokens.max()) < 4375


def test_hub_id_resolves_from_the_hf_cache_offline(codec_dir, tmp_path):
    """A hub id is read through hf_hub_download, which finds the cached snapshot with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    repo = cache / "models--polymathic-ai--aion-base"
    shutil.copytree(codec_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    code = ("import json; from astropt_tok.codec import load_image_codec; c = load_image_codec('polymathic-ai/aion-base');"
            " print(json.dumps([c.vocab_size, c.revision, c.weights_sha256]))")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    vocab, revision, sha = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (vocab, revision, sha) == (4375, COMMIT, load_image_codec(str(codec_dir)).weights_sha256)


def test_folder_not_in_hub_layout_is_one_clear_error(codec_dir, tmp_path):
    broken = tmp_path / "flat"
    broken.mkdir()
    shutil.copy(codec_dir / "codecs/image/config.json", broken / "config.json")
    with pytest.raises(AstroptError, match="not in the hub layout: missing codecs/image/config.json"):
        load_image_codec(str(broken))


def test_weights_that_do_not_fit_the_config_are_refused(codec_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(codec_dir, other)
    cfg_path = other / "codecs/image/config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["hidden_dims"] = 16
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AstroptError, match="do not match its config .*size mismatch"):
        load_image_codec(str(other))


def test_vocab_follows_the_quantizer_levels(tmp_path):
    import torch
    from aion.codecs.image import ImageCodec

    from astropt_tok.codec import save_image_codec

    config = {"quantizer_levels": [8, 8, 8], "hidden_dims": 8, "multisurvey_projection_dims": 12,
              "num_consecutive": 1, "embedding_dim": 3}
    torch.manual_seed(0)
    save_image_codec(ImageCodec(**config), tmp_path / "c", config)
    assert load_image_codec(str(tmp_path / "c")).vocab_size == 512 == int(np.prod([8, 8, 8]))
