"""Writing a token store: one shard at a time (atomically), its completion record, the manifest, and
finalising the store once every shard is done."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from astropt_tok.atomic import atomic_file, atomic_write_text
from astropt_tok.errors import AstroptError, writing
from astropt_tok.store.format import (
    DONE_DIR,
    FORMAT,
    FORMAT_VERSION,
    KINDS_VERSION,
    MANIFEST,
    MODALITIES_VERSION,
    REJECTS,
    SHARDING_RULE,
    STORAGES,
    path_bytes,
    sha256_path,
    shard_bounds,
    shard_name,
    token_dtype,
)


@dataclass
class ShardRecord:
    """One shard's manifest entry."""

    index: int
    file: str
    rows: int
    rejected: int
    sha256: str
    bytes: int
    first_row: int | None = None  # global source row of the shard's first row (None: an empty shard)
    last_row: int | None = None
    token_min: int | None = None  # smallest and largest token id in the shard
    token_max: int | None = None
    token_ranges: dict | None = None  # a store of several kinds of modality: {name: [min, max]} per token column

    def entry(self) -> dict:
        """The manifest's shard entry (token_ranges only where recorded, so older stores' entries are unchanged)."""
        entry = asdict(self)
        if entry["token_ranges"] is None:
            del entry["token_ranges"]
        return entry


def write_shard(
    out_dir: str | os.PathLike,
    index: int,
    storage: str,
    tokens,
    rows: np.ndarray,
    object_ids: list[str] | None,
    rejected: int = 0,
    valid: dict | None = None,
    ranges: bool = False,
) -> ShardRecord:
    """Write one complete shard atomically (temporary name, fsync, rename) and return its record.

    tokens: [n, tokens_per_image] in the store dtype, or {modality: [n, tokens_per_image]} for a store of several
    image columns (with `valid` {modality: [n] bool} when rows may lack some), each of its own width and dtype
    (a version-4 store of images, scalars and spectra: then `ranges` records each column's token range); rows:
    [n] int64 global source rows.
    """
    out = Path(out_dir)
    final = out / shard_name(index, storage)
    columns = {name: np.ascontiguousarray(t) for name, t in (tokens.items() if isinstance(tokens, dict)
                                                             else [("tokens", tokens)])}
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    for name, t in columns.items():
        if t.ndim != 2 or t.shape[0] != rows.shape[0]:
            raise ValueError(f"{name} {t.shape} and rows {rows.shape} disagree")
    for name, v in (valid or {}).items():
        columns[f"{name}_valid"] = np.ascontiguousarray(v, dtype=bool)
    if storage not in STORAGES:
        raise AstroptError(f"unknown store format {storage!r}; choose one of {', '.join(STORAGES)}")
    # a full or read-only disk: one error, no temporary left; an earlier, unrecorded attempt at this shard is
    # replaced only once the new one is whole
    with atomic_file(final) as tmp:
        (_write_arrow if storage == "arrow" else _write_zarr)(tmp, columns, rows, object_ids)
    n = int(rows.shape[0])
    token_arrays = {name: t for name, t in columns.items() if t.ndim == 2}  # every token column, not the flags
    per_column = {name: [int(t.min()), int(t.max())] for name, t in token_arrays.items()} if n else {}
    return ShardRecord(index, final.name, n, int(rejected), sha256_path(final), path_bytes(final),
                       int(rows[0]) if n else None, int(rows[-1]) if n else None,
                       min(low for low, _ in per_column.values()) if n else None,
                       max(high for _, high in per_column.values()) if n else None,
                       per_column if ranges and n else None)


def _arrow_table(columns: dict, rows: np.ndarray, object_ids: list[str] | None):
    import pyarrow as pa

    cols = {}
    for name, values in columns.items():  # token columns [n, T] as fixed-size lists; validity flags [n] bool
        if values.ndim == 1:
            cols[name] = pa.array(values, type=pa.bool_())
            continue
        flat = pa.array(values.reshape(-1), type=pa.from_numpy_dtype(values.dtype))
        cols[name] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    cols["row"] = pa.array(rows, type=pa.int64())
    if object_ids is not None:
        cols["object_id"] = pa.array(object_ids, type=pa.string())
    return pa.table(cols)


def _write_arrow(path: Path, columns: dict, rows: np.ndarray, object_ids: list[str] | None) -> None:
    import pyarrow as pa

    table = _arrow_table(columns, rows, object_ids)
    with open(path, "wb") as f:
        # One record batch per shard: the reader gets the whole shard as one zero-copy [rows, T] view.
        with pa.ipc.new_stream(f, table.schema) as writer:
            writer.write_table(table, max_chunksize=max(1, table.num_rows))


def _write_zarr(path: Path, columns: dict, rows: np.ndarray, object_ids: list[str] | None) -> None:
    import zarr

    if path.exists():
        shutil.rmtree(path)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    n = rows.shape[0]
    for name, values in columns.items():
        chunks = (max(1, min(n, 4096)), *values.shape[1:])
        arr = group.create_array(name, shape=values.shape, chunks=chunks, dtype=values.dtype)
        if n:
            arr[:] = values
    rarr = group.create_array("row", shape=(n,), chunks=(max(1, min(n, 65536)),), dtype="int64")
    if n:
        rarr[:] = rows
    if object_ids is not None:
        oarr = group.create_array("object_id", shape=(n,), chunks=(max(1, min(n, 65536)),), dtype=str)
        if n:
            oarr[:] = np.array(object_ids, dtype=object)


def done_record_path(out_dir: str | os.PathLike, index: int) -> Path:
    """Where shard `index`'s completion record lives."""
    return Path(out_dir) / DONE_DIR / f"shard-{index:05d}.json"


def mark_shard_done(out_dir: str | os.PathLike, record: ShardRecord, rejects: list[dict]) -> None:
    """Record a written shard as complete (after the shard itself is in place)."""
    path = done_record_path(out_dir, record.index)
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"shard": record.entry(), "rejects": rejects}))


def read_done_records(out_dir: str | os.PathLike, num_shards: int, storage: str | None = None) -> dict[int, dict]:
    """Completion records of the shards that are done: a readable record whose shard file is present with the
    recorded size (a truncated, grown or replaced shard is not done, and is redone)."""
    out = Path(out_dir)
    done = {}
    for i in range(num_shards):
        p = done_record_path(out, i)
        if not p.is_file():
            continue
        try:
            rec = json.loads(p.read_text())
            shard = rec["shard"]
            name, size, rejects = shard["file"], shard["bytes"], rec["rejects"]
            if shard["index"] != i or not isinstance(size, int) or not isinstance(rejects, list):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an unreadable or damaged record means the shard is redone
        expected = {shard_name(i, s) for s in ([storage] if storage else STORAGES)}
        if name in expected and (out / name).exists() and path_bytes(out / name) == size:
            done[i] = rec
    return done


def shards_not_matching(store_dir: str | os.PathLike, manifest: dict) -> list[str]:
    """Files of a complete manifest's shards that are missing or not of their recorded size (a cheap check)."""
    out = Path(store_dir)
    return [s["file"] for s in manifest.get("shards", [])
            if not (out / s["file"]).exists() or path_bytes(out / s["file"]) != s["bytes"]]


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> None:
    """Rewrite DIR/manifest.json atomically."""
    atomic_write_text(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def finalize_store(out_dir: str | os.PathLike, manifest: dict) -> dict | None:
    """If every shard is done, write rejects.jsonl and the complete manifest; return it, else None."""
    out = Path(out_dir)
    n = int(manifest["sharding"]["num_shards"])
    done = read_done_records(out, n, manifest.get("storage"))
    if len(done) < n:
        return None
    shards = [done[i]["shard"] for i in range(n)]
    rejects = [r for i in range(n) for r in done[i]["rejects"]]
    atomic_write_text(out / REJECTS, "".join(json.dumps(r) + "\n" for r in rejects))
    final = dict(manifest)
    final["shards"] = shards
    final["totals"] = {"rows": sum(s["rows"] for s in shards), "rejected": sum(s["rejected"] for s in shards)}
    final["complete"] = True
    write_manifest(out, final)
    from astropt_tok.store_card import write_store_card

    write_store_card(out, final)  # DIR/README.md: the store folder is a Hugging Face dataset repo
    return final


def write_store_from_arrays(
    out_dir: str | os.PathLike,
    tokens,
    num_shards: int,
    codec: dict,
    bands,
    storage: str = "arrow",
    object_ids: list[str] | None = None,
    source: dict | None = None,
    precision: str = "fp32",
    valid: dict | None = None,
    specs: dict | None = None,
) -> dict:
    """Write a complete store from tokens already in memory ([rows, T]); rows split into contiguous shards.

    For synthetic stores (tests, benchmarks) and re-packing. `codec` is a manifest codec section
    (`LoadedCodec.describe()`, or at least {"id", "vocab_size", "tokens_per_image"}). Several modalities:
    `tokens` {name: [rows, T]}, `bands` {name: [...]} of the image columns, and optionally `valid` {name: [rows]
    bool}. Scalars and spectra (a version-4 store): `specs` {name: {"kind", "vocab_size", "aion_modality", and
    optionally "codec" (a modality codec section)}} for each column that is not an image of `codec`.
    """
    from astropt_tok.artifacts import claim_output

    out = Path(out_dir)
    claim_output(out, "token-store", "`write_store_from_arrays`")
    several = isinstance(tokens, dict)
    specs = dict(specs or {})
    if specs and not several:
        raise AstroptError("specs name modalities: give tokens as {name: [rows, T]}")
    vocab_of = {name: int(specs[name]["vocab_size"]) if name in specs else int(codec["vocab_size"])
                for name in (tokens if several else ["tokens"])}
    for name, t in (tokens.items() if several else [("tokens", tokens)]):
        if t.size and (t.min() < 0 or t.max() >= vocab_of[name]):
            raise AstroptError(f"{name}: tokens outside 0..{vocab_of[name] - 1}")
    n = next(iter(tokens.values())).shape[0] if several else tokens.shape[0]
    bounds = shard_bounds(n, num_shards)
    modalities = None
    if several:
        image = {"kind": "image", "aion_modality": codec.get("aion_modality", "LegacySurveyImage"),
                 "codec": {"folder": "codecs/image", "class": "ImageCodec", "config": codec.get("config") or {},
                           "weights_sha256": codec.get("weights_sha256") or ""}}
        modalities = []
        for name, t in tokens.items():
            entry = {"name": name, "column": name, "bands": list(bands[name]) if name not in specs else []}
            if specs:  # version 4: every entry says what it is
                spec = specs.get(name)
                entry.update(image if spec is None else {
                    "kind": spec["kind"], "aion_modality": spec["aion_modality"],
                    "codec": spec.get("codec") or {"folder": f"codecs/{spec['aion_modality']}", "class": "",
                                                   "config": {}, "weights_sha256": ""}})
                entry.update(vocab_size=vocab_of[name], tokens_per_object=int(t.shape[1]),
                             dtype=token_dtype(vocab_of[name]).name)
            modalities.append(entry)
    manifest = new_manifest(
        codec=codec, bands=modalities[0]["bands"] if several else bands, storage=storage, num_shards=num_shards,
        precision=precision, source=source or {"id": "in-memory", "kind": "arrays", "num_rows": n},
        modalities=modalities, keep_partial=valid is not None,
    )
    write_manifest(out, manifest)
    for i in range(num_shards):
        lo, hi = bounds[i], bounds[i + 1]
        part = ({name: t[lo:hi].astype(token_dtype(vocab_of[name])) for name, t in tokens.items()} if several
                else tokens[lo:hi].astype(token_dtype(vocab_of["tokens"])))
        rec = write_shard(out, i, storage, part, np.arange(lo, hi, dtype=np.int64),
                          None if object_ids is None else object_ids[lo:hi],
                          valid=None if valid is None else {name: v[lo:hi] for name, v in valid.items()},
                          ranges=bool(specs))
        mark_shard_done(out, rec, [])
    return finalize_store(out, manifest)


def new_manifest(codec: dict, bands: list[str], storage: str, num_shards: int, precision: str, source: dict,
                 modalities: list[dict] | None = None, keep_partial: bool = False) -> dict:
    """A manifest for a store in progress (`complete` false, no shard list yet). `modalities`: several image
    columns, [{"name", "column", "bands"}] (format version 3), or modalities of several kinds, each entry also
    with {"kind", "aion_modality", "codec", "vocab_size", "tokens_per_object", "dtype"} (format version 4)."""
    from astropt_tok import __version__

    vocab = int(codec["vocab_size"])
    several = {"modalities": modalities, "keep_partial": bool(keep_partial)} if modalities else {}
    kinds = modalities and any("kind" in mod for mod in modalities)
    version = KINDS_VERSION if kinds else MODALITIES_VERSION if modalities else FORMAT_VERSION
    return {
        "format": FORMAT,
        "format_version": version,
        "tool_version": __version__,
        "complete": False,
        "codec": codec,
        "vocab_size": vocab,
        "tokens_per_image": int(codec["tokens_per_image"]),
        "dtype": token_dtype(vocab).name,
        "bands": list(bands),
        "precision": precision,
        "storage": storage,
        "source": source,
        "sharding": {"rule": SHARDING_RULE, "num_shards": int(num_shards)},
        **several,
    }
