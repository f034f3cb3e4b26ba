"""Object ids without a Python object per row: a vectorised 64-bit hash of an Arrow string array, and the
store-wide id index (every id's hash, sorted, with its store row) that `TokenStore.find_object_ids` searches.

A store of 10M galaxies holds 10M ids; as Python strings in a list they cost ~80 bytes a row in every rank and
DataLoader worker. The shards keep them as Arrow string arrays (memory-mapped) instead, Python strings are made
only for the rows a caller asks for, and a lookup by id is a binary search over 12-16 bytes a row.
"""

from __future__ import annotations

import numpy as np

FNV_OFFSET = np.uint64(0xCBF29CE484222325)  # FNV-1a 64-bit
FNV_PRIME = np.uint64(0x100000001B3)
NULL_ID = "None"  # a null id reads back as str(None), as it always has: it is found as "None" too


def hash_strings(ids) -> np.ndarray:
    """FNV-1a 64-bit hash of the UTF-8 bytes of each string of an Arrow string array (or chunked array), [n]
    uint64; a null hashes as NULL_ID. Vectorised: one numpy pass per byte position, over only the rows at least
    that long (rows sorted longest first), so the cost is the array's bytes, not rows x longest id."""
    import pyarrow as pa

    if isinstance(ids, pa.ChunkedArray):
        parts = [hash_strings(c) for c in ids.chunks]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        ids = ids.cast(pa.string())
    n = len(ids)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    _, offsets_buf, data_buf = ids.buffers()
    width = np.int64 if pa.types.is_large_string(ids.type) else np.int32
    offsets = np.frombuffer(offsets_buf, dtype=width, count=n + 1, offset=ids.offset * np.dtype(width).itemsize)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, dtype=np.uint8)
    lengths = np.diff(offsets).astype(np.int64)  # [n] bytes of each id
    order = np.argsort(-lengths, kind="stable")  # longest first: the rows still going at byte k are a prefix
    starts = offsets[:-1].astype(np.int64)[order]
    longer = np.searchsorted(-lengths[order], -np.arange(int(lengths.max())), side="left")  # [k]: rows longer than k
    h = np.full(n, FNV_OFFSET, dtype=np.uint64)
    for k, m in enumerate(longer.tolist()):
        h[:m] ^= data[starts[:m] + k].astype(np.uint64)
        h[:m] *= FNV_PRIME  # wraps mod 2**64, as FNV wants (numpy arrays wrap silently)
    out = np.empty(n, dtype=np.uint64)
    out[order] = h
    if ids.null_count:
        out[ids.is_null().to_numpy(zero_copy_only=False)] = hash_strings(pa.array([NULL_ID]))[0]
    return out


class IdIndex:
    """Every store row's id hash, sorted, with its row: [num_rows] uint64 and [num_rows] int32/int64 (12-16 bytes a
    row). Rows of equal hash stay in store order, so the first candidate of an id is its first row in the store."""

    def __init__(self, shard_hashes: list[np.ndarray]):
        hashes = np.concatenate(shard_hashes) if shard_hashes else np.zeros(0, dtype=np.uint64)  # [num_rows], store order
        order = np.argsort(hashes, kind="stable")  # store rows by hash; equal hashes in row order
        self.hashes = hashes[order]
        self.rows = order.astype(np.int32) if hashes.size < 2**31 else order

    def candidates(self, key: np.uint64) -> np.ndarray:
        """Store rows whose id hashes to `key`, ascending (almost always one id's rows; a collision adds others)."""
        lo, hi = np.searchsorted(self.hashes, key, side="left"), np.searchsorted(self.hashes, key, side="right")
        return self.rows[lo:hi]
