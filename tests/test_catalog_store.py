"""Store format version 4: image, scalar and spectrum token columns side by side, each with its own vocabulary,
length and dtype (written from arrays here; `astropt tokenise --scalar/--spectrum` in test_catalog_tokenise)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from astropt_tok import store as st
from astropt_tok.errors import AstroptError

SPECS = {"Z": {"kind": "scalar", "vocab_size": 300, "aion_modality": "Z"},
         "spec": {"kind": "spectrum", "vocab_size": 40000, "aion_modality": "DESISpectrum"}}


def _mixed_store(path, storage="arrow", rows=12, shards=3):
    rng = np.random.default_rng(0)
    tokens = {"img": rng.integers(0, 64, (rows, 16)), "Z": rng.integers(0, 300, (rows, 1)),
              "spec": rng.integers(0, 40000, (rows, 9))}
    st.write_store_from_arrays(path, tokens, shards, {"id": "tiny", "vocab_size": 64, "tokens_per_image": 16},
                               {"img": ["DES-G", "DES-R"]}, storage=storage, specs=SPECS)
    return tokens


@pytest.mark.parametrize("storage", ["arrow", "zarr"])
def test_a_mixed_store_reads_each_column_with_its_own_length_and_dtype(tmp_path, storage):
    tokens = _mixed_store(tmp_path / "s", storage)
    store = st.TokenStore(tmp_path / "s")
    m = store.manifest
    assert m["format_version"] == st.KINDS_VERSION
    assert store.modalities == ["img", "Z", "spec"]
    assert store.modality_kind == {"img": "image", "Z": "scalar", "spec": "spectrum"}
    assert store.modality_tokens == {"img": 16, "Z": 1, "spec": 9}
    assert store.modality_dtype["spec"] == np.uint16 and store.modality_dtype["Z"] == np.int16
    rows = np.array([11, 0, 5])
    for name, t in tokens.items():
        np.testing.assert_array_equal(store.take(rows, name), t[rows])
        np.testing.assert_array_equal(store.read_rows(*store.locate(rows), modality=name), t[rows])
    assert store.check_token_range()
    assert m["shards"][0]["token_ranges"]["Z"] == [int(tokens["Z"][:4].min()), int(tokens["Z"][:4].max())]
    assert st.verify_store(tmp_path / "s") == []


def test_older_stores_read_as_image_columns(random_store):
    store = st.TokenStore(random_store)
    assert store.modality_kind == {"tokens": "image"}
    assert store.modality_vocab == {"tokens": store.vocab_size}
    assert store.modality_tokens == {"tokens": store.tokens_per_image}


def _edit(path, change):
    m = json.loads((path / st.MANIFEST).read_text())
    change(m)
    (path / st.MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("change, field", [
    (lambda m: m["modalities"][1].update(dtype="uint16"), "modalities[1].dtype"),
    (lambda m: m["modalities"][1].update(kind="catalog"), "modalities[1].kind"),
    (lambda m: m["modalities"].insert(0, m["modalities"].pop(1)), "modalities[0].kind"),
    (lambda m: m["modalities"][1].update(bands=["DES-G"]), "modalities[1].bands"),
    (lambda m: m["modalities"][2].pop("tokens_per_object"), "modalities[2].tokens_per_object"),
    (lambda m: m["shards"][0]["token_ranges"].pop("Z"), "shards[0].token_ranges"),
    (lambda m: m["modalities"][0].update(vocab_size=128, dtype="int16"), "vocab_size"),
])
def test_a_damaged_version_4_manifest_is_one_error_naming_the_field(tmp_path, change, field):
    _mixed_store(tmp_path / "s")
    _edit(tmp_path / "s", change)
    with pytest.raises(AstroptError, match=field.replace("[", r"\[").replace("]", r"\]")):
        st.TokenStore(tmp_path / "s")


def test_a_scalar_range_past_its_vocabulary_is_refused_by_its_own_vocabulary(tmp_path):
    _mixed_store(tmp_path / "s")
    # Z's codebook has 300 codes: 310 is outside it, although it is inside the spectrum's 40000
    _edit(tmp_path / "s", lambda m: m["shards"][1]["token_ranges"].update(Z=[0, 310]))
    with pytest.raises(AstroptError, match=r"Z tokens 0\.\.310, outside the vocabulary 0\.\.299"):
        st.TokenStore(tmp_path / "s").check_token_range()
    assert any("not the manifest's token_ranges" in p for p in st.verify_store(tmp_path / "s"))


def test_tokens_outside_a_columns_own_vocabulary_are_not_written(tmp_path):
    with pytest.raises(AstroptError, match=r"Z: tokens outside 0\.\.299"):
        st.write_store_from_arrays(tmp_path / "s", {"img": np.zeros((2, 16), int), "Z": np.full((2, 1), 300)}, 1,
                                   {"id": "t", "vocab_size": 64, "tokens_per_image": 16}, {"img": ["DES-G"]},
                                   specs={"Z": SPECS["Z"]})


def test_a_model_of_one_scalar_codec_refuses_a_store_of_another(tmp_path):
    from astropt_tok.artifacts import check_model_store, model_store_info

    def make(path, sha, kind="scalar"):
        tokens = {"img": np.zeros((4, 16), int), "Z": np.ones((4, 1), int)}
        spec = {"kind": kind, "vocab_size": 300, "aion_modality": "Z",
                "codec": {"folder": "codecs/Z", "class": "GridScalarCodec", "config": {}, "weights_sha256": sha}}
        st.write_store_from_arrays(path, tokens, 1, {"id": "t", "vocab_size": 64, "tokens_per_image": 16},
                                   {"img": ["DES-G"]}, specs={"Z": spec})
        return st.TokenStore(path)

    a, b = make(tmp_path / "a", "a" * 64), make(tmp_path / "b", "b" * 64)
    trained_on = model_store_info(a, st.manifest_sha256(a.dir))
    assert trained_on["catalogue_codecs"]["Z"]["weights_sha256"] == "a" * 64
    check_model_store("run", trained_on, ["img", "Z"], a)  # no error: the same codecs
    with pytest.raises(AstroptError, match="the same token ids mean different values"):
        check_model_store("run", trained_on, ["img", "Z"], b)
    images = tmp_path / "images"
    st.write_store_from_arrays(images, {"img": np.zeros((4, 16), int), "Z": np.zeros((4, 16), int)}, 1,
                               {"id": "t", "vocab_size": 64, "tokens_per_image": 16}, {"img": ["DES-G"], "Z": ["DES-G"]})
    with pytest.raises(AstroptError, match="learned Z as scalar Z, but store .* holds it as an image column"):
        check_model_store("run", trained_on, ["img", "Z"], st.TokenStore(images))
