"""The trainer's data path: the split, the per-epoch order, DDP rank partitions, and the DataLoader's rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from astropt_tok.errors import AstroptError
from astropt_tok.store import TokenStore, write_store_from_arrays
from astropt_train.data import (EpochBatchSampler, TokenRows, make_loader, split_rows, to_device,
                                val_batch_rows)


@pytest.fixture(scope="module", params=["arrow", "zarr"])
def small_store(request, tmp_path_factory):
    """97 rows (an odd count, 3 uneven shards); row i's first token is i so rows identify themselves."""
    out = tmp_path_factory.mktemp(f"store-{request.param}")
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 500, size=(97, 32))
    tokens[:, 0] = np.arange(97)
    write_store_from_arrays(out, tokens, num_shards=3, storage=request.param,
                            codec={"id": "random", "vocab_size": 500, "tokens_per_image": 32}, bands=["DES-G"])
    return out, tokens


def test_split_is_seeded_disjoint_and_recorded():
    a, b = split_rows(100, 0.1, seed=3), split_rows(100, 0.1, seed=3)
    assert np.array_equal(a.val, b.val) and np.array_equal(a.train, b.train)
    assert len(a.val) == 10 and len(a.train) == 90
    assert set(a.val).isdisjoint(a.train) and set(a.val) | set(a.train) == set(range(100))
    assert not np.array_equal(split_rows(100, 0.1, seed=4).val, a.val)
    assert a.rule["num_val"] == 10 and a.rule["seed"] == 3
    assert len(split_rows(10, 0.001, seed=0).val) == 1  # at least one row
    with pytest.raises(AstroptError):
        split_rows(1, 0.5, seed=0)


def test_loader_returns_exactly_the_store_rows(small_store):
    path, tokens = small_store
    store = TokenStore(path)
    split = split_rows(store.num_rows, 0.1, seed=0)
    sampler = EpochBatchSampler(split.train, batch_size=8, seed=0)
    n = sampler.batches_per_epoch
    assert n == len(split.train) // 8
    seen = []
    for i, batch in zip(range(2 * n), make_loader(store, sampler, workers=0, pin_memory=False)):
        assert batch.dtype == torch.int16 and batch.shape == (8, 32)
        rows = batch[:, 0].long().numpy()
        np.testing.assert_array_equal(batch.numpy(), tokens[rows])  # each row is the store's row, byte for byte
        seen.append(rows)
    first, second = np.concatenate(seen[:n]), np.concatenate(seen[n:])
    assert len(set(first)) == len(first) and set(first) <= set(split.train)  # one epoch: no repeats, no val rows
    assert not np.array_equal(first, second)  # a fresh permutation each epoch
    # a resumed sampler continues with exactly the same batches
    later = EpochBatchSampler(split.train, batch_size=8, seed=0)
    later.start_epoch, later.start_batch = later.position(n + 2)
    it = iter(later)
    for k in range(3):
        assert next(it).rows == seen[n + 2 + k].tolist()


def test_loader_with_workers_matches_in_process(small_store):
    path, _ = small_store
    store = TokenStore(path)
    rows = np.arange(store.num_rows)
    a = [b for _, b in zip(range(5), make_loader(store, EpochBatchSampler(rows, 6, seed=2), 0, False))]
    b = [b for _, b in zip(range(5), make_loader(store, EpochBatchSampler(rows, 6, seed=2), 2, False))]
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_ddp_ranks_read_disjoint_rows_every_epoch(small_store):
    """Each of 3 ranks' own DataLoader (its rank's sampler) delivers, per epoch, rows no other rank gets, all of
    them training rows, each epoch in a new order: read from the delivered tokens (row i's first token is i),
    which must be that row's tokens, not from what the sampler would be expected to give."""
    path, tokens = small_store
    store = TokenStore(path)
    train = np.arange(4, 97)  # 93 training rows: 31 per rank, 7 batches of 4 per rank per epoch
    delivered = []  # [rank] -> [epoch, 28]: the rows its loader delivered, in order
    for r in range(3):
        sampler = EpochBatchSampler(train, 4, seed=9, rank=r, world=3)
        batches = [b.numpy() for _, b in zip(range(3 * sampler.batches_per_epoch), make_loader(store, sampler, 0,
                                                                                                False))]
        for b in batches:
            np.testing.assert_array_equal(b, tokens[b[:, 0]])
        delivered.append(np.concatenate([b[:, 0] for b in batches]).reshape(3, -1))
    for epoch in range(3):
        parts = [delivered[r][epoch] for r in range(3)]
        flat = np.concatenate(parts)
        assert all(len(p) == 28 for p in parts)
        assert len(set(flat)) == len(flat) and set(flat) <= set(train)
    assert not np.array_equal(delivered[0][0], delivered[0][1])


def test_targets_shift_by_one_and_widen_on_device():
    batch = torch.arange(10, dtype=torch.int16).view(2, 5)
    x, y = to_device(batch, "cpu")
    assert x.dtype == torch.int64 and x.shape == (2, 4)
    assert torch.equal(y, batch[:, 1:].long()) and torch.equal(x, batch[:, :-1].long())


def test_val_batches_are_fixed_and_split_across_ranks():
    val = np.arange(10)
    assert np.array_equal(val_batch_rows(val, 4, 2), [8, 9, 0, 1])
    r0, r1 = val_batch_rows(val, 2, 0, 0, 2), val_batch_rows(val, 2, 0, 1, 2)
    assert set(r0).isdisjoint(r1)


def test_batch_larger_than_the_store_is_a_clear_error():
    with pytest.raises(AstroptError, match="batch"):
        EpochBatchSampler(np.arange(5), batch_size=8, seed=0)


@pytest.mark.parametrize("storage", ["arrow", "zarr"])
def test_dataset_does_not_copy_the_store(tmp_path, storage):
    """What a DataLoader worker receives is the store's path and manifest, not its tokens: the pickle stays a
    few KB for a store of 400 KB of tokens (a copy would be at least that), and a worker's copy reads the rows."""
    import pickle

    tokens = np.random.default_rng(0).integers(0, 4375, size=(350, 576))  # 350 x 576 x 2 bytes = 403 KB
    write_store_from_arrays(tmp_path / "s", tokens, num_shards=2, codec={"id": "r", "vocab_size": 4375,
                            "tokens_per_image": 576}, bands=["DES-G"], storage=storage)
    ds = TokenRows(TokenStore(tmp_path / "s"))
    ds[0], ds[349]  # the maps are open in this process: they must not travel either
    blob = pickle.dumps(ds)
    assert tokens.size * 2 > 400_000 and len(blob) < 20_000
    again = pickle.loads(blob)
    assert np.array_equal(again.__getitems__([3, 300]).numpy(), tokens[[3, 300]])


def _rss_file_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_pread_loader_keeps_resident_memory_flat(tmp_path):
    """Random reads through the memory map leave every touched page mapped (RSS grows with the store); pread
    reads leave them in the page cache only, and return the same rows."""
    rows = 20_000  # 23 MB of tokens
    write_store_from_arrays(tmp_path / "s", np.random.default_rng(0).integers(0, 4375, size=(rows, 576), dtype=np.int16),
                            num_shards=2, codec={"id": "random", "vocab_size": 4375, "tokens_per_image": 576},
                            bands=["DES-G"])
    grown, got = {}, {}
    batches = np.random.default_rng(0).integers(0, rows, size=(200, 16))
    for reads in ("mmap", "pread"):
        ds = TokenRows(TokenStore(tmp_path / "s"), reads=reads)
        before = _rss_file_kb()
        got[reads] = [ds.__getitems__(b) for b in batches]
        grown[reads] = (_rss_file_kb() - before) / 1024
        del ds
    assert grown["pread"] < 1, grown
    assert grown["mmap"] > 4, grown  # 3,200 random rows of a 23 MB store stay mapped
    assert all(torch.equal(a, b) for a, b in zip(got["mmap"], got["pread"]))
