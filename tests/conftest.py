"""Shared fixtures: a tiny real AION ImageCodec in the hub layout, a small survey in the real Legacy Survey
schema (parquet written by `datasets`), and token stores built from them."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SURVEY_ROWS = 40
SURVEY_FILES = 2


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where torch sees a CUDA GPU (`make test-gpu` insists on one)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def codec_dir(tmp_path_factory):
    """A small, randomly initialised real `aion.codecs.image.ImageCodec`, saved in the hub layout."""
    from astropt_tok.codec import make_tiny_codec

    return make_tiny_codec(tmp_path_factory.mktemp("codec") / "tiny-aion")


@pytest.fixture(scope="session")
def survey_dir(tmp_path_factory):
    """40 synthetic galaxies in 2 parquet files, in the schema of Smith42/legacysurvey_hsc_crossmatched."""
    from astropt_tok.synthetic import write_synthetic_survey

    out = tmp_path_factory.mktemp("survey")
    write_synthetic_survey(out, n_rows=SURVEY_ROWS, n_files=SURVEY_FILES, seed=0)
    return out


@pytest.fixture(scope="session")
def random_store(tmp_path_factory):
    """A complete arrow store of 300 rows of random tokens (vocab 4375) in 3 shards, with object ids."""
    from astropt_tok.store import write_store_from_arrays

    out = tmp_path_factory.mktemp("random-store")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 4375, size=(300, 576))
    write_store_from_arrays(
        out, tokens, num_shards=3, codec={"id": "random", "vocab_size": 4375, "tokens_per_image": 576},
        bands=["DES-G", "DES-R", "DES-I", "DES-Z"], object_ids=[f"obj{i}" for i in range(300)],
    )
    return out


@pytest.fixture(scope="session")
def moved_source_store(tmp_path_factory, survey_dir, codec_dir):
    """(store, folder): a store tokenised from a copy of the survey, whose files then moved to `folder`."""
    import shutil

    from astropt_tok.tokenise import TokeniseConfig, tokenise

    base = tmp_path_factory.mktemp("moved-source")
    shutil.copytree(survey_dir, base / "survey")
    tokenise(TokeniseConfig(source=str(base / "survey"), out=str(base / "store"), shards=2, codec=str(codec_dir),
                            batch_size=16, device="cpu", progress=False))
    (base / "survey").rename(base / "elsewhere")
    return base / "store", base / "elsewhere"
