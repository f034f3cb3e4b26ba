"""The token store: a folder of independent shards plus a manifest (the format: `format.py`).

`format` names, dtypes, shard naming and bounds, and reads and checks the manifest; `writer` writes shards,
their completion records and the manifest; `reader` is `TokenStore`, the read-only view training and every
command use; `verify` re-hashes and checks a store. Every public name is importable from here.
"""

from astropt_tok.store.format import (
    DONE_DIR,
    FORMAT,
    FORMAT_VERSION,
    KINDS_VERSION,
    MANIFEST,
    MODALITIES_VERSION,
    MODALITY_KINDS,
    READABLE_VERSIONS,
    REJECTS,
    RESERVED_COLUMNS,
    SHARDING_RULE,
    STORAGES,
    check_manifest,
    manifest_format,
    manifest_sha256,
    modality_entries,
    path_bytes,
    read_manifest,
    sha256_path,
    shard_bounds,
    shard_name,
    token_dtype,
)
from astropt_tok.store.reader import TokenStore
from astropt_tok.store.verify import codebook_usage, shard_hash_problem, verify_store
from astropt_tok.store.writer import (
    ShardRecord,
    done_record_path,
    finalize_store,
    mark_shard_done,
    new_manifest,
    read_done_records,
    shards_not_matching,
    write_manifest,
    write_shard,
    write_store_from_arrays,
)

__all__ = [
    "DONE_DIR", "FORMAT", "FORMAT_VERSION", "KINDS_VERSION", "MANIFEST", "MODALITIES_VERSION", "MODALITY_KINDS",
    "READABLE_VERSIONS", "REJECTS",
    "RESERVED_COLUMNS", "SHARDING_RULE", "STORAGES", "ShardRecord", "TokenStore", "check_manifest", "codebook_usage",
    "done_record_path", "finalize_store", "manifest_format", "manifest_sha256", "mark_shard_done", "modality_entries", "new_manifest",
    "path_bytes", "read_done_records", "read_manifest", "sha256_path", "shard_bounds", "shard_hash_problem",
    "shard_name", "shards_not_matching", "token_dtype", "verify_store", "write_manifest", "write_shard",
    "write_store_from_arrays",
]
