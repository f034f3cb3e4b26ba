"""Shared fixtures: a tiny real AION ImageCodec in the hub layout, a small survey in the real Legacy Survey
schema (parquet written by `datasets`), and token stores built from them."""

from __future__ import annotations

import os
import shutil

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


UPSTREAM_MODULES = ("model.py", "model_utils.py")  # upstream's GPT and its `load_astropt`


@pytest.fixture(scope="session")
def upstream_astropt(tmp_path_factory):
    """Upstream AstroPT's own package `astropt` (its `model` and `model_utils` imported, unchanged), from
    $ASTROPT_UPSTREAM_SRC (a folder holding astropt/, as upstream's src) or $ASTROPT_UPSTREAM_GIT (a git
    checkout, read at HEAD), written into tmp as a package `astropt`; skips without either or without
    `loralib` (which upstream's model imports). A variable set to a folder without the files fails."""
    import importlib
    import subprocess
    import sys
    from pathlib import Path

    src_dir, git_dir = os.environ.get("ASTROPT_UPSTREAM_SRC"), os.environ.get("ASTROPT_UPSTREAM_GIT")
    if not src_dir and not git_dir:
        pytest.skip("upstream AstroPT checks need ASTROPT_UPSTREAM_SRC (a folder holding upstream's astropt/, "
                    "e.g. its src) or ASTROPT_UPSTREAM_GIT (a git checkout of github.com/Smith42/astroPT)")
    try:
        importlib.import_module("loralib")
    except ImportError:
        pytest.skip("upstream AstroPT's model imports loralib: pip install loralib")
    if all(f"astropt.{name[:-3]}" in sys.modules for name in UPSTREAM_MODULES):  # already imported in this process
        return sys.modules["astropt"]
    pkg = tmp_path_factory.mktemp("upstream") / "astropt"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")  # only the model's two modules: the rest imports upstream's data stack
    for name in UPSTREAM_MODULES:
        if src_dir:
            path = Path(src_dir) / "astropt" / name
            if not path.is_file():
                pytest.fail(f"ASTROPT_UPSTREAM_SRC={src_dir}: no astropt/{name} there (name upstream's src folder)")
            (pkg / name).write_text(path.read_text())
            continue
        shown = subprocess.run(["git", "-C", git_dir, "show", f"HEAD:src/astropt/{name}"],
                               capture_output=True, text=True)
        if shown.returncode:
            pytest.fail(f"ASTROPT_UPSTREAM_GIT={git_dir}: cannot read src/astropt/{name}: {shown.stderr.strip()}")
        (pkg / name).write_text(shown.stdout)
    sys.path.insert(0, str(pkg.parent))
    try:
        package = importlib.import_module("astropt")
        for name in UPSTREAM_MODULES:
            importlib.import_module(f"astropt.{name[:-3]}")
    finally:
        sys.path.remove(str(pkg.parent))
    return package


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


Z_RANGE = (0.0, 3.0)  # catalogue_codec's redshift grid


@pytest.fixture(scope="session")
def catalogue_codec(codec_dir, tmp_path_factory):
    """The tiny image codec plus a redshift grid codec (64 codes over 0..3), a log-flux codec and a tiny
    spectrum codec, in the hub layout, written by aion's own save_pretrained."""
    import torch
    from aion.codecs import GridScalarCodec, LogScalarCodec, SpectrumCodec
    from aion.modalities import DESISpectrum, LegacySurveyFluxG, Z

    out = tmp_path_factory.mktemp("catalogue-codec") / "codec"
    shutil.copytree(codec_dir, out)
    z = GridScalarCodec("Z", codebook_size=64)
    z._quantizer.buckets.copy_(torch.linspace(*Z_RANGE, 64))
    z.save_pretrained(out, modality=Z)
    flux = LogScalarCodec("FLUX_G", codebook_size=32, reservoir_size=64)
    flux._quantizer._reservoir.copy_(torch.sort(torch.log(torch.linspace(0.1, 50, 64))).values)
    flux._quantizer._generate_index_to_val()
    flux.save_pretrained(out, modality=LegacySurveyFluxG)
    torch.manual_seed(0)
    SpectrumCodec(encoder_depths=(1, 1), encoder_dims=(8, 16), decoder_depths=(1, 1), decoder_dims=(8, 1),
                  latent_channels=16, num_pixels=1024, embedding_dim=10).save_pretrained(out, modality=DESISpectrum)
    return out
