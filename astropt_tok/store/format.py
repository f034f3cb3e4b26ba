"""The token store's format: names, versions, dtypes, shard naming and bounds, the manifest's reading and
checking, sha256 helpers.

Format (version 2; version 1 stores, without source fingerprints and shard row/token ranges, are still read;
version 3: several image columns)
------------------
DIR/manifest.json
    {"format": "astropt-token-store", "format_version": 2, "tool_version", "complete": bool,
     "codec": {"id", "revision", "config", "weights_sha256", "vocab_size", "tokens_per_image"},
     "vocab_size", "tokens_per_image", "dtype": "int16" | "uint16", "bands": [...], "precision",
     "storage": "arrow" | "zarr",
     "source": {"id", "kind", "revision", "split", "column", "id_column", "num_rows",
                "files": [{"path" (absolute, or a URL), "rows", "bytes", "fingerprint"}, ...]},
     "sharding": {"rule", "num_shards"},
     "shards": [{"index", "file", "rows", "rejected", "sha256", "bytes", "first_row", "last_row",
                 "token_min", "token_max"}, ...],                                   # only when complete
     "totals": {"rows", "rejected"}}                                             # only when complete
    Rewritten atomically (temporary file, fsync, rename). `complete` is true only once every shard is done.
DIR/shard-00000.arrow ...
    Arrow IPC *stream* format, uncompressed, as `datasets` writes its cache files: `datasets.Dataset.from_file`
    opens a shard and `pyarrow.memory_map` reads it zero-copy. Columns: `tokens` fixed_size_list<int16 or
    uint16>[tokens_per_image], `row` int64 (the global source row index), and `object_id` string when the
    source has an id column. Rows are in ascending `row` order.
DIR/shard-00000.zarr/ ... (`--format zarr`)
    A Zarr v3 group with arrays of the same names: `tokens` [rows, tokens_per_image], `row` [rows],
    `object_id` [rows] (variable-length strings). Its sha256 is taken over its files in sorted path order.
DIR/.done/shard-00000.json
    The completion record of one shard (its manifest entry and its rejected rows). A shard counts as done
    only when this record exists and its file has the recorded size (else it is redone); shards and records appear only when complete (temporary name, fsync,
    rename), so a killed run leaves nothing partial that looks finished.
DIR/rejects.jsonl
    One JSON object per skipped source row, in shard order: {"row", "object_id" (when known), "reason"}.

Several image columns of the same galaxies (version 3): the manifest adds "modalities": [{"name", "column",
"bands"}, ...] (name = the image column; "bands" is the first one's) and "keep_partial"; each shard holds one
token column per modality, named after it, instead of `tokens`, and with keep_partial a bool column
`<name>_valid` (False: the row lacks that image, its tokens are zeros). A store of one image column is still
written as version 2, so older readers read it. token_min/token_max of a shard cover all its token columns.

Catalogue scalars and spectra beside images (version 4): each modality entry also says what it is, {"name",
"column", "kind": "image" | "scalar" | "spectrum", "bands" (images; [] otherwise), "aion_modality" (the AION
class name: LegacySurveyImage, Z, LegacySurveyFluxG, DESISpectrum, ...), "codec": {"folder", "class", "config",
"weights_sha256"}, "vocab_size", "tokens_per_object", "dtype"}: each token column has its own vocabulary,
length and dtype. The first modality is an image column; the top-level codec, vocab_size, tokens_per_image,
dtype and bands are its. A shard entry adds "token_ranges": {name: [min, max]} (token_min/token_max still span
every column). A store of images only is still written as version 2 or 3.

Token dtype: int16 holds codebooks up to 32768 codes, uint16 up to 65536; anything larger is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from astropt_tok.errors import AstroptError
from astropt_tok.schema import Fields, read_json_object

FORMAT = "astropt-token-store"
FORMAT_VERSION = 2  # a store of one image column (a `tokens` column)
MODALITIES_VERSION = 3  # several image columns in one store, a token column each
KINDS_VERSION = 4  # catalogue scalars and spectra beside images: a vocabulary, length and dtype per column
READABLE_VERSIONS = (1, 2, 3, 4)  # 1: no source fingerprints, no per-shard row or token ranges
MODALITY_KINDS = ("image", "scalar", "spectrum")
RESERVED_COLUMNS = ("tokens", "row", "object_id")  # shard columns an image column may not be named
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
DONE_DIR = ".done"
STORAGES = ("arrow", "zarr")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype that holds every token id of a codebook: int16, else uint16; never wraps."""
    if vocab_size <= 0:
        raise AstroptError(f"vocab size must be positive, got {vocab_size}")
    if vocab_size <= 2**15:
        return np.dtype(np.int16)
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    raise AstroptError(f"a codebook of {vocab_size} codes does not fit 16-bit tokens (at most 65536)")


def shard_name(index: int, storage: str) -> str:
    """`shard-00042.arrow` or `shard-00042.zarr`."""
    return f"shard-{index:05d}.{storage}"


def sha256_path(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's files (relative path and content, in sorted path order)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f is not path:
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def path_bytes(path: Path) -> int:
    """Size of a file, or the total size of a folder's files."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def shard_bounds(num_rows: int, num_shards: int) -> list[int]:
    """The sharding rule: shard i holds source rows [floor(i*R/N), floor((i+1)*R/N)), R rows in N shards.

    Contiguous ranges keep each shard's reads to the files and row groups that cover it.
    """
    if num_shards < 1:
        raise AstroptError(f"--shards must be at least 1, got {num_shards}")
    return [(i * num_rows) // num_shards for i in range(num_shards + 1)]


SHARDING_RULE = "contiguous: shard i holds global source rows [floor(i*R/N), floor((i+1)*R/N)) of R rows in N shards"


def read_manifest(store_dir: str | os.PathLike) -> dict:
    """Load and check DIR/manifest.json as a whole (format, version, every field a reader uses, their types and
    how they agree with each other); damage is one DamagedFile naming the file and the field."""
    path = Path(store_dir) / MANIFEST
    if not Path(store_dir).is_dir():
        raise AstroptError(f"token store {store_dir} does not exist")
    if not path.is_file():
        raise AstroptError(f"{store_dir} is not a token store: no {MANIFEST}")
    manifest = read_json_object(path, "token store manifest", _REPAIR)
    if manifest.get("format") != FORMAT:
        raise AstroptError(f"{path} is not an {FORMAT} manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise AstroptError(
            f"{path} has format version {manifest.get('format_version')!r}; this tool reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (a newer astropt-tokens wrote it: upgrade to read it)"
        )
    check_manifest(manifest, path)
    return manifest


def manifest_format(folder: str | os.PathLike) -> str | None:
    """The `format` DIR/manifest.json declares (a token store, an embeddings store), or None when there is no
    readable one; `read_manifest` says what is wrong with it."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest.get("format") if isinstance(manifest, dict) else None


_REPAIR = "re-run the `astropt tokenise` that made the store (with --overwrite), or restore the file"


def check_manifest(m: dict, path: Path) -> None:
    """Every field a reader relies on is there with the right type and agrees with the others: vocabulary and
    dtype, the codec section, modalities and their bands, the version, and (complete) each shard entry and the
    totals. A DamagedFile names the first field that does not."""
    f = Fields(path, _REPAIR)
    f.need(m, "complete", bool)
    codec = f.need(m, "codec", dict)
    f.need(codec, "id", str, "codec.")
    vocab = f.need(m, "vocab_size", int, low=1, high=2**16)
    per_image = f.need(m, "tokens_per_image", int, low=1)
    for key, want in (("vocab_size", vocab), ("tokens_per_image", per_image)):
        if codec.get(key) is not None:
            f.equal(f"codec.{key}", codec[key], want, f"the store's {key} is {want}")
    f.equal("dtype", f.one_of(m, "dtype", ("int16", "uint16")), token_dtype(vocab).name,
            f"the narrowest token dtype of a vocabulary of {vocab}")
    bands = f.need_list(m, "bands", str, unique=True)
    storage = f.one_of(m, "storage", STORAGES)
    f.maybe(m, "precision", str)
    source = f.need(m, "source", dict)
    f.need(source, "id", str, "source.")
    for key in ("kind", "split", "column", "id_column", "revision"):
        f.maybe(source, key, str, "source.")
    for i, entry in enumerate(f.need_list(source, "files", dict, "source.", nonempty=False)
                              if source.get("files") is not None else []):
        where = f"source.files[{i}]."
        f.need(entry, "path", str, where)
        for key in ("rows", "bytes"):
            f.maybe(entry, key, int, where, low=0)
        f.maybe(entry, "fingerprint", str, where)
    _check_modalities(m, f, bands)
    num_shards = f.need(f.need(m, "sharding", dict), "num_shards", int, "sharding.", low=1)
    if not m["complete"]:
        return
    shards = f.need(m, "shards", list)
    if len(shards) != num_shards:
        raise f.fail("shards", f"{len(shards)} entries", f"one entry per shard: sharding.num_shards is {num_shards}")
    last_row = -1
    for i, s in enumerate(shards):
        where = f"shards[{i}]."
        f.equal(where + "index", f.need(s, "index", int, where), i, "entries are in shard order")
        f.equal(where + "file", f.need(s, "file", str, where), shard_name(i, storage),
                f"shard {i} of a {storage} store")
        rows = f.need(s, "rows", int, where, low=0)
        for key in ("rejected", "bytes"):
            f.need(s, key, int, where, low=0)
        sha = f.need(s, "sha256", str, where)
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise f.fail(where + "sha256", sha, "64 lowercase hex digits")
        first, last = (f.maybe(s, key, int, where, low=0) for key in ("first_row", "last_row"))
        if first is not None or last is not None:
            if not rows or first is None or last is None or not last_row < first <= last:
                raise f.fail(where + "first_row", first, f"ascending source rows after {last_row}, "
                             f"first_row <= last_row, only in a shard with rows (it has {rows})")
            last_row = last
        # (a range that leaves the vocabulary is the store's content, not damage: train refuses it, verify reports it)
        low, high = (f.maybe(s, key, int, where, low=0) for key in ("token_min", "token_max"))
        if (low is None) != (high is None) or (low is not None and low > high):
            raise f.fail(where + "token_min", low, f"token_min <= token_max ({high})")
        ranges = f.maybe(s, "token_ranges", dict, where)
        if ranges is not None:
            names = [mod["name"] for mod in m.get("modalities") or []]
            if sorted(ranges) != sorted(names):
                raise f.fail(where + "token_ranges", sorted(ranges), f"one [min, max] per modality ({', '.join(names)})")
            for name, span in ranges.items():
                if not (isinstance(span, list) and len(span) == 2 and all(type(v) is int and v >= 0 for v in span)
                        and span[0] <= span[1]):
                    raise f.fail(f"{where}token_ranges.{name}", span, "[min, max], two token ids, min <= max")
    totals = f.need(m, "totals", dict)
    f.equal("totals.rows", f.need(totals, "rows", int, "totals."), sum(s["rows"] for s in shards),
            "the sum of the shards' rows")
    f.equal("totals.rejected", f.need(totals, "rejected", int, "totals."), sum(s["rejected"] for s in shards),
            "the sum of the shards' rejected rows")


def _check_modalities(m: dict, f: Fields, bands: list) -> None:
    """The version agrees with what the store names: no modalities (one image column), several image columns
    (version 3), or modalities of several kinds (version 4, each with its own vocabulary, length and dtype). The
    names are distinct token columns that clash with no other shard column, the first is an image column, and
    the top-level `bands` (and, in version 4, vocab_size, tokens_per_image, dtype) are its."""
    version = m["format_version"]
    if m.get("modalities") is None:
        if version in (MODALITIES_VERSION, KINDS_VERSION):
            raise f.fail("modalities", expected=f"a list of modalities: format_version is {version}")
        if m.get("keep_partial"):
            raise f.fail("keep_partial", m["keep_partial"], "false or absent: the store names no modalities")
        return
    if version not in (MODALITIES_VERSION, KINDS_VERSION):
        raise f.fail("format_version", version, f"{MODALITIES_VERSION} or {KINDS_VERSION}, the versions of a store "
                     "that lists modalities")
    mods = f.need_list(m, "modalities", dict)
    names = []
    for i, mod in enumerate(mods):
        where = f"modalities[{i}]."
        name = f.need(mod, "name", str, where)
        f.need(mod, "column", str, where)
        if not name or name in RESERVED_COLUMNS or name.endswith("_valid") or name in names:
            raise f.fail(where + "name", name, "a distinct token column name, not "
                         f"{', '.join(RESERVED_COLUMNS)} nor *_valid")
        names.append(name)
        kind = f.one_of(mod, "kind", MODALITY_KINDS, where) if version == KINDS_VERSION else "image"
        its_bands = f.need_list(mod, "bands", str, where, unique=True, nonempty=kind == "image")
        if kind != "image" and its_bands:
            raise f.fail(where + "bands", its_bands, f"[]: a {kind} has no bands")
        if version != KINDS_VERSION:
            continue
        if i == 0 and kind != "image":
            raise f.fail(where + "kind", kind, "image: the first modality is an image column")
        f.need(mod, "aion_modality", str, where)
        codec = f.need(mod, "codec", dict, where)
        for key in ("folder", "class", "weights_sha256"):
            f.need(codec, key, str, f"{where}codec.")
        vocab = f.need(mod, "vocab_size", int, where, low=1, high=2**16)
        f.need(mod, "tokens_per_object", int, where, low=1)
        f.equal(where + "dtype", f.one_of(mod, "dtype", ("int16", "uint16"), where), token_dtype(vocab).name,
                f"the narrowest token dtype of a vocabulary of {vocab}")
    f.equal("bands", bands, mods[0]["bands"], f"the bands of the first modality, {names[0]}")
    if version == KINDS_VERSION:
        for key, its in (("vocab_size", "vocab_size"), ("tokens_per_image", "tokens_per_object"), ("dtype", "dtype")):
            f.equal(key, m[key], mods[0][its], f"the first modality's {its}, {names[0]}")
    f.need(m, "keep_partial", bool)


def modality_entries(m: dict) -> list[dict]:
    """Every token column of a store as a version-4 modality entry {name, kind, bands, aion_modality, vocab_size,
    tokens_per_object, dtype}, whatever the version: a one-column store's `tokens`, or image columns filled in
    from the top-level fields."""
    image = {"kind": "image", "aion_modality": None, "vocab_size": m["vocab_size"],
             "tokens_per_object": m["tokens_per_image"], "dtype": m["dtype"]}
    if not m.get("modalities"):
        return [{**image, "name": "tokens", "column": (m.get("source") or {}).get("column"), "bands": list(m["bands"])}]
    return [{**image, **mod} for mod in m["modalities"]]


def manifest_sha256(store_dir: str | os.PathLike) -> str:
    """sha256 of the manifest file: identifies one exact store."""
    return sha256_path(Path(store_dir) / MANIFEST)
