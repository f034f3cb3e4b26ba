"""The store's object ids and per-row columns at scale: ids stay Arrow/zarr arrays (no Python object per row
kept), Python strings are made for the rows asked, a lookup by id is a hash search with the answers of a plain
scan (missing, repeated and null ids included), and zarr reads of a few rows equal the whole column's."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest

from astropt_tok.errors import AstroptError
from astropt_tok.store import TokenStore, write_store_from_arrays
from astropt_tok.store.ids import hash_strings

CODEC = {"id": "random", "vocab_size": 50, "tokens_per_image": 4}
# 23 rows in 5 uneven shards: "g3" three times, "dup" twice across shards, two nulls, an empty string, a non-ASCII and a long id
IDS = ["g0", "g1", "dup", "g3", None, "g3", "", "g7", "naïve-ø", "dup", "g3", "x" * 300, "g12", None,
       "g14", "g15", "g16", "g17", "g18", "g19", "g20", "g21", "last"]


def reference_ids(ids):
    """What object_ids has always answered: str() of each stored value (a null id reads "None")."""
    return [str(x) for x in ids]


def reference_find(ids, wanted):
    """What a plain scan answers: the first row of each wanted id, or the missing ones in order."""
    shown = reference_ids(ids)
    missing = [w for w in wanted if w not in shown]
    return missing, [shown.index(w) for w in wanted if w in shown]


@pytest.fixture(scope="module", params=["arrow", "zarr"])
def id_store(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"ids-{request.param}") / "store"
    tokens = np.random.default_rng(0).integers(0, 50, size=(len(IDS), 4))
    write_store_from_arrays(out, tokens, num_shards=5, codec=CODEC, bands=["DES-G"], storage=request.param,
                            object_ids=IDS)
    return out


def test_no_python_list_of_ids_is_kept(id_store):
    store = TokenStore(id_store)
    store.check_shards()  # opens every shard, as the trainer does
    store.object_ids(np.arange(store.num_rows))
    store.find_object_ids(["g7"])
    for i in range(len(store.shards)):
        ids = store._shard(i)["object_id"]
        assert not isinstance(ids, list)
        assert isinstance(ids, pa.Array) if store.storage == "arrow" else type(ids).__name__ == "Array"
    index = store.id_index()
    assert index.hashes.dtype == np.uint64 and index.hashes.shape == (len(IDS),) and index.rows.dtype == np.int32
    assert pickle.loads(pickle.dumps(store))._ids is None  # DataLoader workers get no index, nor open shards


def test_object_ids_are_the_stored_ids(id_store):
    store = TokenStore(id_store)
    want = reference_ids(IDS)
    assert store.object_ids(np.arange(len(IDS))) == want
    rows = np.array([22, 0, 4, 11, 11, 13, 8, 2])  # any order, repeats, across shards
    assert store.object_ids(rows) == [want[r] for r in rows]
    assert store.object_ids([]) == []
    for i, s in enumerate(store.shards):
        lo = int(store.offsets[i])
        assert store.shard_object_ids(i) == want[lo:lo + s["rows"]]


@pytest.mark.parametrize("wanted", [
    ["g3"],                       # stored three times: its first row
    ["dup", "g3", "dup", "last"],  # asked twice: the same row twice, in the order asked
    ["None"],                     # a null id reads "None" and is found as such
    ["", "naïve-ø", "x" * 300],
    [],
])
def test_find_object_ids_agrees_with_a_scan(id_store, wanted):
    missing, rows = reference_find(IDS, wanted)
    assert not missing
    np.testing.assert_array_equal(TokenStore(id_store).find_object_ids(wanted), rows)


def test_find_object_ids_names_the_missing_ones(id_store):
    wanted = ["g1", "nope", "g3", "x" * 299, "nope", "G1", "g", "g33"]
    missing, _ = reference_find(IDS, wanted)
    assert missing == ["nope", "x" * 299, "nope", "G1", "g", "g33"]
    with pytest.raises(AstroptError) as err:
        TokenStore(id_store).find_object_ids(wanted)
    assert str(err.value) == f"object id(s) not in {id_store}: {', '.join(missing[:5])}"


@pytest.mark.parametrize("storage", ["arrow", "zarr"])
def test_a_store_without_ids(tmp_path, storage):
    write_store_from_arrays(tmp_path / "s", np.zeros((6, 4), np.int16), num_shards=2, codec=CODEC, bands=["DES-G"],
                            storage=storage)
    store = TokenStore(tmp_path / "s")
    assert store.object_ids([0, 5]) == [None, None] and store.shard_object_ids(1) is None
    with pytest.raises(AstroptError, match="has no object_id column"):
        store.find_object_ids(["g0"])


def fnv1a(text: str) -> int:
    """FNV-1a 64-bit of a string's UTF-8 bytes, one byte at a time."""
    h = 0xCBF29CE484222325
    for b in text.encode():
        h = ((h ^ b) * 0x100000001B3) % 2**64
    return h


def test_hash_strings_is_fnv1a_of_each_string():
    values = ["", "a", "ab", "naïve-ø", "x" * 70, "obj0000123", None, "b"]
    want = [fnv1a("None" if v is None else v) for v in values]
    arr = pa.array(values, type=pa.string())
    assert hash_strings(arr).tolist() == want
    assert hash_strings(arr.slice(2, 4)).tolist() == want[2:6]  # an array that starts inside its buffers
    assert hash_strings(pa.array(values, type=pa.large_string())).tolist() == want
    assert hash_strings(pa.chunked_array([arr.slice(0, 3), arr.slice(3)])).tolist() == want
    assert hash_strings(pa.array([], type=pa.string())).shape == (0,)


def test_zarr_reads_of_a_few_rows_equal_the_whole_column(tmp_path):
    """valid() and source_rows() of some rows (any order, repeats, across shards) read only those rows' chunks and
    give what indexing the whole columns gives."""
    n = 40
    rng = np.random.default_rng(3)
    tokens = {m: rng.integers(0, 50, size=(n, 4)) for m in ("a", "b")}
    valid = {"a": rng.random(n) < 0.7, "b": rng.random(n) < 0.4}
    write_store_from_arrays(tmp_path / "z", tokens, num_shards=3, codec=CODEC, bands={"a": ["DES-G"], "b": ["HSC-G"]},
                            storage="zarr", valid=valid)
    store = TokenStore(tmp_path / "z")
    rows = np.array([39, 3, 3, 17, 0, 26, 14, 13])
    whole_rows = np.concatenate([store.shard_source_rows(i) for i in range(len(store.shards))])
    np.testing.assert_array_equal(store.source_rows(rows), whole_rows[rows])
    got = store.valid(rows)
    for m in ("a", "b"):
        whole = np.concatenate([np.asarray(store._shard(i)[f"{m}_valid"][:]) for i in range(len(store.shards))])
        np.testing.assert_array_equal(got[m], whole[rows])
        np.testing.assert_array_equal(got[m], valid[m][rows])
