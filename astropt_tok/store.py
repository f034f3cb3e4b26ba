"""The token store: a folder of independent shards plus a manifest. This module writes and reads it.

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

Token dtype: int16 holds codebooks up to 32768 codes, uint16 up to 65536; anything larger is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from astropt_tok.atomic import atomic_file, atomic_write_text
from astropt_tok.errors import AstroptError, writing
from astropt_tok.schema import DamagedFile, Fields, read_json_object

FORMAT = "astropt-token-store"
FORMAT_VERSION = 2  # a store of one image column (a `tokens` column)
MODALITIES_VERSION = 3  # several image columns in one store, a token column each
READABLE_VERSIONS = (1, 2, 3)  # 1: no source fingerprints, no per-shard row or token ranges
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


def shard_hash_problem(folder: Path, entry: dict) -> str | None:
    """The verify line for a manifest's shard entry whose file is missing or does not hash to its recorded
    sha256; None when it does (shared by the token and embeddings stores' verify)."""
    path = folder / entry["file"]
    if not path.exists():
        return f"{entry['file']}: missing"
    digest = sha256_path(path)
    if digest != entry["sha256"]:
        return f"{entry['file']}: sha256 {digest[:12]}… does not match the manifest's {entry['sha256'][:12]}…"
    return None


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


# ---------------------------------------------------------------------------------------------------------
# writing


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


def write_shard(
    out_dir: str | os.PathLike,
    index: int,
    storage: str,
    tokens,
    rows: np.ndarray,
    object_ids: list[str] | None,
    rejected: int = 0,
    valid: dict | None = None,
) -> ShardRecord:
    """Write one complete shard atomically (temporary name, fsync, rename) and return its record.

    tokens: [n, tokens_per_image] in the store dtype, or {modality: [n, tokens_per_image]} for a store of several
    image columns (with `valid` {modality: [n] bool} when rows may lack some); rows: [n] int64 global source rows.
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
    token_arrays = [t for name, t in columns.items() if t.ndim == 2]  # every token column, not the validity flags
    return ShardRecord(index, final.name, n, int(rejected), sha256_path(final), path_bytes(final),
                       int(rows[0]) if n else None, int(rows[-1]) if n else None,
                       min(int(t.min()) for t in token_arrays) if n else None,
                       max(int(t.max()) for t in token_arrays) if n else None)


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
    atomic_write_text(path, json.dumps({"shard": asdict(record), "rejects": rejects}))


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


# ---------------------------------------------------------------------------------------------------------
# reading


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
    totals = f.need(m, "totals", dict)
    f.equal("totals.rows", f.need(totals, "rows", int, "totals."), sum(s["rows"] for s in shards),
            "the sum of the shards' rows")
    f.equal("totals.rejected", f.need(totals, "rejected", int, "totals."), sum(s["rejected"] for s in shards),
            "the sum of the shards' rejected rows")


def _check_modalities(m: dict, f: Fields, bands: list) -> None:
    """The version agrees with whether the store names modalities; each is {name, column, bands}, the names are
    distinct token columns that clash with no other shard column, and `bands` are the first one's."""
    version = m["format_version"]
    if m.get("modalities") is None:
        if version == MODALITIES_VERSION:
            raise f.fail("modalities", expected="a list of image columns: format_version is "
                         f"{MODALITIES_VERSION} (several image columns)")
        if m.get("keep_partial"):
            raise f.fail("keep_partial", m["keep_partial"], "false or absent: the store names no modalities")
        return
    if version != MODALITIES_VERSION:
        raise f.fail("format_version", version, f"{MODALITIES_VERSION}, the version of a store of several image "
                     "columns (it lists modalities)")
    mods = f.need_list(m, "modalities", dict)
    names = []
    for i, mod in enumerate(mods):
        where = f"modalities[{i}]."
        name = f.need(mod, "name", str, where)
        f.need(mod, "column", str, where)
        f.need_list(mod, "bands", str, where, unique=True)
        if not name or name in RESERVED_COLUMNS or name.endswith("_valid") or name in names:
            raise f.fail(where + "name", name, "a distinct image column name, not "
                         f"{', '.join(RESERVED_COLUMNS)} nor *_valid")
        names.append(name)
    f.equal("bands", bands, mods[0]["bands"], f"the bands of the first modality, {names[0]}")
    f.need(m, "keep_partial", bool)


def manifest_sha256(store_dir: str | os.PathLike) -> str:
    """sha256 of the manifest file: identifies one exact store."""
    return sha256_path(Path(store_dir) / MANIFEST)


class TokenStore:
    """Read-only view of a complete token store: arrow shards memory-mapped zero-copy, zarr shards by chunk.

    Store rows are numbered 0..num_rows-1 through the shards in order. `take(indices)` gathers any rows with
    one vectorised index per shard, so a batch never copies more than the rows it asks for. A store of several
    image columns (`modalities`) is read one modality at a time: `take(indices, modality)`; without one, the
    first modality's tokens.
    """

    def __init__(self, store_dir: str | os.PathLike, check_sizes: bool = True):
        self.dir = Path(store_dir)
        self.manifest = read_manifest(self.dir)
        if not self.manifest.get("complete"):
            raise AstroptError(
                f"token store {self.dir} is incomplete (a tokenise run has not finished every shard); "
                f"re-run the same `astropt tokenise` command or `astropt verify {self.dir} --finalize`"
            )
        m = self.manifest
        self.storage: str = m["storage"]
        self.vocab_size: int = int(m["vocab_size"])
        self.tokens_per_image: int = int(m["tokens_per_image"])
        self.dtype = np.dtype(m["dtype"])
        if self.dtype != token_dtype(self.vocab_size):
            raise AstroptError(f"{self.dir}: dtype {self.dtype} does not match vocab size {self.vocab_size}")
        self.bands: list[str] = list(m["bands"])
        # several image columns: their names (= token columns), bands and whether rows may lack some
        self.modalities: list[str] = [x["name"] for x in m.get("modalities") or []]
        self.modality_bands: dict[str, list[str]] = {x["name"]: list(x["bands"]) for x in m.get("modalities") or []}
        self.partial: bool = bool(m.get("keep_partial")) and bool(self.modalities)
        self.token_columns: list[str] = self.modalities or ["tokens"]
        self.codec_id: str = m["codec"]["id"]
        self.shards: list[dict] = m["shards"]
        self.shard_rows = np.array([s["rows"] for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_rows)])  # store row of each shard's first row
        self.num_rows = int(self.offsets[-1])
        if check_sizes:
            for s in self.shards:
                p = self.dir / s["file"]
                if not p.exists():
                    raise AstroptError(f"token store {self.dir}: shard {s['file']} is missing")
                size = path_bytes(p)
                if size != s["bytes"]:
                    raise AstroptError(
                        f"token store {self.dir}: shard {s['file']} is {size} bytes, the manifest says {s['bytes']} "
                        f"(corrupt or truncated; run `astropt verify {self.dir}`)"
                    )
            for i, s in enumerate(self.shards):  # a manifest edited to name other columns: refused before any work
                self._check_columns(i, self.dir / s["file"], _shard_columns(self.dir / s["file"], self.storage))
        self._open: dict[int, dict] = {}  # shard index -> {"tokens": array-like, "row": ..., "object_id": ...}
        self._fds: dict[int, int] = {}  # shard index -> file descriptor, for `read_rows`

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self):  # DataLoader workers reopen their own memory maps and files
        state = dict(self.__dict__)
        state["_open"], state["_fds"] = {}, {}
        return state

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def _shard(self, i: int) -> dict:
        if i not in self._open:
            path = self.dir / self.shards[i]["file"]
            try:
                self._open[i] = _open_arrow(path) if self.storage == "arrow" else _open_zarr(path, self.token_columns)
            except AstroptError:
                raise
            except Exception as exc:
                raise AstroptError(f"token store {self.dir}: shard {path.name} is unreadable ({exc})") from None
            try:
                self._check_shard(i, path)
            except AstroptError:
                del self._open[i]  # never trusted later either
                raise
        return self._open[i]

    def _check_shard(self, i: int, path: Path) -> None:
        """Shard i is the one the manifest describes: exactly its token columns (and `<name>_valid` flags iff
        keep_partial), each of the recorded shape and dtype, and the recorded first and last source rows."""
        self._check_columns(i, path, self._open[i]["columns"])
        self._check_flags(i, path)
        for column in self.token_columns:
            t = self._open[i].get(column)
            if t is None:
                raise AstroptError(f"token store {self.dir}: shard {path.name} has no {column!r} token column")
            if tuple(t.shape) != (self.shards[i]["rows"], self.tokens_per_image) or np.dtype(t.dtype) != self.dtype:
                raise AstroptError(
                    f"token store {self.dir}: shard {path.name} holds {column} {tuple(t.shape)} {t.dtype}, the "
                    f"manifest says ({self.shards[i]['rows']}, {self.tokens_per_image}) {self.dtype}"
                )
        self._check_row_ids(i, path)

    def _check_columns(self, i: int, path: Path, columns: list[str]) -> None:
        """The shard holds the columns the manifest's modalities and keep_partial name, no more, no fewer: a
        manifest edited to drop a modality or flip keep_partial is refused, not read as another store."""
        have = set(columns)
        tokens = {c for c in have if c not in ("row", "object_id") and not c.endswith("_valid")}
        flags = {c for c in have if c.endswith("_valid")}
        want_flags = {f"{c}_valid" for c in self.token_columns} if self.partial else set()
        f = Fields(self.dir / MANIFEST, f"its shards hold token columns {', '.join(sorted(tokens)) or 'none'}"
                   f"{' with ' + ', '.join(sorted(flags)) if flags else ''}: restore the manifest that describes them")
        if tokens != set(self.token_columns):
            if self.modalities:
                raise f.fail("modalities", [m["name"] for m in self.manifest["modalities"]], why="not the token "
                             f"columns of shard {path.name}")
            raise f.fail("modalities", expected=f"the image columns of shard {path.name}: a store without "
                         "modalities holds one `tokens` column")
        if flags != want_flags:
            raise f.fail("keep_partial", self.manifest.get("keep_partial"),
                         why=f"shard {path.name} {'holds' if flags else 'lacks'} <name>_valid columns")
        if "row" not in have:
            raise AstroptError(f"token store {self.dir}: shard {path.name} has no row column")

    def _check_flags(self, i: int, path: Path) -> None:
        """An opened shard's row ids and validity flags: one per row, of their dtypes."""
        n = self.shards[i]["rows"]
        for column in ["row", *(f"{c}_valid" for c in self.token_columns if self.partial)]:
            values = self._open[i][column]
            if tuple(values.shape) != (n,) or (column != "row" and np.dtype(values.dtype) != np.bool_):
                raise AstroptError(f"token store {self.dir}: shard {path.name} holds {column} {tuple(values.shape)} "
                                   f"{values.dtype}, the manifest says ({n},) {'int64' if column == 'row' else 'bool'}")

    def check_shards(self) -> None:
        """Open every shard once and check it is the one the manifest describes (shape, dtype, first and last
        source rows), so that a wrong shard is one error before work starts, not in a reader process later."""
        for i in range(len(self.shards)):
            self._shard(i)

    def _check_row_ids(self, i: int, path: Path) -> None:
        """A shard is the one the manifest describes: its first and last source rows are the recorded ones
        (a same-sized file of another shard or store at its name is refused)."""
        s = self.shards[i]
        if s.get("first_row") is None or not s["rows"]:
            return  # format version 1, or an empty shard
        rows = self._open[i]["row"]
        first, last = int(rows[0]), int(rows[s["rows"] - 1])
        if (first, last) != (s["first_row"], s["last_row"]):
            raise AstroptError(
                f"token store {self.dir}: shard {path.name} holds source rows {first}..{last}, the manifest says "
                f"{s['first_row']}..{s['last_row']}: not this store's shard (run `astropt verify {self.dir}`)")

    def check_token_range(self) -> bool:
        """Refuse a store whose recorded per-shard token range leaves the vocabulary; False when the manifest
        records no ranges (format version 1), True when every shard is within 0..vocab_size-1."""
        if any(s.get("token_min") is None and s["rows"] for s in self.shards):
            return False
        for s in self.shards:
            if s["rows"] and not (0 <= s["token_min"] and s["token_max"] < self.vocab_size):
                raise AstroptError(
                    f"token store {self.dir}: shard {s['file']} holds tokens {s['token_min']}..{s['token_max']}, "
                    f"outside the vocabulary 0..{self.vocab_size - 1}")
        return True

    def _column(self, modality: str | None) -> str:
        """The token column of `modality` (None: the only or first one)."""
        if modality is None:
            return self.token_columns[0]
        if modality not in self.token_columns:
            have = ", ".join(self.modalities) if self.modalities else "one image column (no named modalities)"
            raise AstroptError(f"token store {self.dir} has no modality {modality!r} (it has {have})")
        return modality

    def shard_tokens(self, i: int, modality: str | None = None):
        """Shard i's tokens of `modality`, [rows, tokens_per_image]: a zero-copy numpy view (arrow) or a zarr array."""
        return self._shard(i)[self._column(modality)]

    def valid(self, indices) -> dict[str, np.ndarray]:
        """{modality: [n] bool} for store rows `indices`: False where a row lacks that image (stores made with
        --keep-partial; otherwise all True)."""
        shard, local = self.locate(indices)
        out = {m: np.ones(shard.size, dtype=bool) for m in self.modalities}
        if not self.partial:
            return out
        for i in np.unique(shard):
            sel = shard == i
            for m in self.modalities:
                out[m][sel] = np.asarray(self._shard(int(i))[f"{m}_valid"][:])[local[sel]]
        return out

    def shard_source_rows(self, i: int) -> np.ndarray:
        """Shard i's global source row indices, [rows] int64."""
        return np.asarray(self._shard(i)["row"][:])

    def shard_object_ids(self, i: int) -> list[str] | None:
        """Shard i's object ids, or None when the source had no id column."""
        ids = self._shard(i).get("object_id")
        return None if ids is None else [str(x) for x in ids[:]]

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row within shard) for store row indices."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_rows):
            raise AstroptError(f"row index out of range: the store has {self.num_rows} rows (0..{self.num_rows - 1})")
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        return shard, indices - self.offsets[shard]

    def take(self, indices, modality: str | None = None) -> np.ndarray:
        """Tokens of store rows `indices`, [n, tokens_per_image] in the store dtype, in the order asked."""
        return self.gather(*self.locate(indices), modality=modality)

    def gather(self, shard: np.ndarray, local: np.ndarray, modality: str | None = None) -> np.ndarray:
        """`take` for rows already located: (shard, row within shard) pairs from `locate`."""
        out = np.empty((shard.size, self.tokens_per_image), dtype=self.dtype)
        for i in np.unique(shard):
            sel = np.nonzero(shard == i)[0]
            tokens = self.shard_tokens(int(i), modality)
            if self.storage == "arrow":
                out[sel] = tokens[local[sel]]  # one fancy index into the memory map
            else:
                order = np.argsort(local[sel], kind="stable")
                out[sel[order]] = tokens.oindex[local[sel][order], :]  # zarr reads only the chunks it needs
        return out

    def read_rows(self, shard: np.ndarray, local: np.ndarray, modality: str | None = None) -> np.ndarray:
        """`gather` through the file instead of the memory map: one pread per row into the batch.

        Pages read this way live in the page cache, not in this process: its resident memory does not grow
        with the store however many random rows it reads (reading through the map, every row touched stays
        mapped and counts in RSS). Zarr shards, and arrow shards not written by this tool, use `gather`.
        """
        if self.storage != "arrow":
            return self.gather(shard, local, modality)
        column = self._column(modality)
        row_bytes = self.tokens_per_image * self.dtype.itemsize
        out = np.empty((shard.size, self.tokens_per_image), dtype=self.dtype)
        view = memoryview(out).cast("B")
        for j, (i, r) in enumerate(zip(shard.tolist(), local.tolist())):
            opened = self._shard(i)
            if column not in opened["file_offset"]:
                out[j] = opened[column][r]
                continue
            fd = self._fds.get(i)
            if fd is None:
                fd = self._fds[i] = os.open(self.dir / self.shards[i]["file"], os.O_RDONLY)
            if os.preadv(fd, [view[j * row_bytes:(j + 1) * row_bytes]],
                         opened["file_offset"][column] + r * row_bytes) != row_bytes:
                raise AstroptError(f"token store {self.dir}: shard {self.shards[i]['file']} ended early (truncated?)")
        return out

    def source_rows(self, indices) -> np.ndarray:
        """Global source row index of each store row in `indices`."""
        shard, local = self.locate(indices)
        out = np.empty(shard.size, dtype=np.int64)
        for i in np.unique(shard):  # each shard's row column read once, not once per asked row
            sel = shard == i
            out[sel] = self.shard_source_rows(int(i))[local[sel]]
        return out

    def object_ids(self, indices) -> list[str | None]:
        """Object id of each store row in `indices` (None where the source had no id column)."""
        shard, local = self.locate(indices)
        ids = {int(i): self.shard_object_ids(int(i)) for i in np.unique(shard)}  # each shard's ids read once
        return [None if ids[int(s)] is None else ids[int(s)][j] for s, j in zip(shard, local)]

    def find_object_ids(self, wanted: Iterable[str]) -> np.ndarray:
        """Store row index of each object id in `wanted`; an unknown id is an AstroptError."""
        wanted = list(wanted)
        where: dict[str, int] = {}
        for i in range(len(self.shards)):
            ids = self.shard_object_ids(i)
            if ids is None:
                raise AstroptError(f"token store {self.dir} has no object_id column")
            for j, oid in enumerate(ids):
                if oid in wanted and oid not in where:
                    where[oid] = int(self.offsets[i] + j)
        missing = [w for w in wanted if w not in where]
        if missing:
            raise AstroptError(f"object id(s) not in {self.dir}: {', '.join(missing[:5])}")
        return np.array([where[w] for w in wanted], dtype=np.int64)


def _open_arrow(path: Path) -> dict:
    """A shard's columns: each token column [rows, T] as a zero-copy numpy view (with its offset in the file, for
    pread, under "file_offset"), validity flags, `row` and `object_id`."""
    import pyarrow as pa

    whole = pa.memory_map(str(path), "r").read_buffer()  # the whole file, zero-copy
    table = pa.ipc.open_stream(whole).read_all()
    cols = {"file_offset": {}, "columns": list(table.column_names)}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_fixed_size_list(column.type):  # a token column
            t = column.type.list_size
            if column.num_chunks == 1:
                cols[name] = column.chunk(0).flatten().to_numpy(zero_copy_only=True).reshape(-1, t)
                # where row 0's tokens start in the file, for reading rows with pread instead of through the map
                cols["file_offset"][name] = cols[name].__array_interface__["data"][0] - whole.address
            elif column.num_chunks == 0:  # an empty shard (more shards than rows): its stream holds no batch
                cols[name] = np.zeros((0, t), dtype=column.type.value_type.to_pandas_dtype())
            else:  # not written by this tool, but still readable
                cols[name] = np.concatenate([c.flatten().to_numpy() for c in column.chunks]).reshape(-1, t)
        elif name == "object_id":
            cols[name] = column.to_pylist()
        else:  # row, <modality>_valid
            cols[name] = column.to_numpy(zero_copy_only=False)
    return cols


def _shard_columns(path: Path, storage: str) -> list[str]:
    """The column names of a shard, from its schema alone (arrow) or its group's arrays (zarr)."""
    try:
        if storage == "arrow":
            import pyarrow as pa

            with pa.memory_map(str(path), "r") as source:
                return list(pa.ipc.open_stream(source).schema.names)
        import zarr

        return sorted(name for name, _ in zarr.open_group(str(path), mode="r").arrays())
    except Exception as exc:
        raise AstroptError(f"token store {path.parent}: shard {path.name} is unreadable ({exc}); run "
                           f"`astropt verify {path.parent}`") from None


def _open_zarr(path: Path, token_columns=("tokens",)) -> dict:
    import zarr

    group = zarr.open_group(str(path), mode="r")
    names = sorted(name for name, _ in group.arrays())
    if "row" not in names:
        raise AstroptError(f"shard {path.name} has no row array")
    cols = {"row": group["row"], "file_offset": {}, "columns": names}
    for name in list(token_columns) + [f"{c}_valid" for c in token_columns] + ["object_id"]:
        if name in group:
            cols[name] = group[name]
    return cols


# ---------------------------------------------------------------------------------------------------------
# verification


def verify_store(store_dir: str | os.PathLike) -> list[str]:
    """Re-hash every shard against the manifest and check shapes, dtypes and token ranges.

    Returns one problem line per bad shard (empty when the store is sound).
    """
    store_dir = Path(store_dir)
    try:
        manifest = read_manifest(store_dir)
    except DamagedFile as exc:  # what every reader would refuse: reported, as a bad shard is
        return [f"{MANIFEST}: {exc}"]
    if not manifest.get("complete"):
        return [f"{store_dir}: manifest is not complete (run `astropt verify {store_dir} --finalize`)"]
    problems = []
    store = TokenStore(store_dir, check_sizes=False)
    for i, s in enumerate(store.shards):
        problem = shard_hash_problem(store_dir, s)
        if problem:
            problems.append(problem)
            continue
        try:
            present = {c: np.asarray(store.shard_tokens(i, c)[:]) for c in store.token_columns}  # each [rows, T]
        except AstroptError as exc:
            problems.append(f"{s['file']}: {exc}")
            continue
        present = {c: t for c, t in present.items() if t.size}
        outside = [c for c, t in present.items() if int(t.min()) < 0 or int(t.max()) >= store.vocab_size]
        for column in outside:
            what = "tokens" if column == "tokens" else f"{column} tokens"
            problems.append(f"{s['file']}: {what} outside 0..{store.vocab_size - 1}")
        present = list(present.values())
        if not outside and present and s.get("token_min") is not None:
            low, high = min(int(t.min()) for t in present), max(int(t.max()) for t in present)
            if (s["token_min"], s["token_max"]) != (low, high):
                problems.append(f"{s['file']}: tokens span {low}..{high}, the manifest says "
                                f"{s['token_min']}..{s['token_max']}")
        rows = store.shard_source_rows(i)
        if rows.shape[0] != s["rows"] or (rows.size > 1 and np.any(np.diff(rows) <= 0)):
            problems.append(f"{s['file']}: source row column is not {s['rows']} ascending rows")
    return problems


def codebook_usage(store: TokenStore) -> tuple[int, np.ndarray]:
    """(distinct codes used, per-code counts [vocab]) over the whole store (every modality's tokens)."""
    counts = np.zeros(store.vocab_size, dtype=np.int64)
    for i in range(len(store.shards)):
        for column in store.token_columns:
            tokens = np.asarray(store.shard_tokens(i, column)[:]).astype(np.int64).reshape(-1)
            counts += np.bincount(tokens, minlength=store.vocab_size)[: store.vocab_size]
    return int((counts > 0).sum()), counts


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
) -> dict:
    """Write a complete store from tokens already in memory ([rows, T]); rows split into contiguous shards.

    For synthetic stores (tests, benchmarks) and re-packing. `codec` is a manifest codec section
    (`LoadedCodec.describe()`, or at least {"id", "vocab_size", "tokens_per_image"}). Several modalities:
    `tokens` {name: [rows, T]}, `bands` {name: [...]}, and optionally `valid` {name: [rows] bool}.
    """
    from astropt_tok.artifacts import claim_output

    out = Path(out_dir)
    claim_output(out, "token-store", "`write_store_from_arrays`")
    vocab = int(codec["vocab_size"])
    dtype = token_dtype(vocab)
    several = isinstance(tokens, dict)
    for t in (tokens.values() if several else [tokens]):
        if t.size and (t.min() < 0 or t.max() >= vocab):
            raise AstroptError(f"tokens outside 0..{vocab - 1}")
    n = next(iter(tokens.values())).shape[0] if several else tokens.shape[0]
    bounds = shard_bounds(n, num_shards)
    modalities = [{"name": name, "column": name, "bands": list(bands[name])} for name in tokens] if several else None
    manifest = new_manifest(
        codec=codec, bands=modalities[0]["bands"] if several else bands, storage=storage, num_shards=num_shards,
        precision=precision, source=source or {"id": "in-memory", "kind": "arrays", "num_rows": n},
        modalities=modalities, keep_partial=valid is not None,
    )
    write_manifest(out, manifest)
    for i in range(num_shards):
        lo, hi = bounds[i], bounds[i + 1]
        part = ({name: t[lo:hi].astype(dtype) for name, t in tokens.items()} if several
                else tokens[lo:hi].astype(dtype))
        rec = write_shard(out, i, storage, part, np.arange(lo, hi, dtype=np.int64),
                          None if object_ids is None else object_ids[lo:hi],
                          valid=None if valid is None else {name: v[lo:hi] for name, v in valid.items()})
        mark_shard_done(out, rec, [])
    return finalize_store(out, manifest)


def shard_bounds(num_rows: int, num_shards: int) -> list[int]:
    """The sharding rule: shard i holds source rows [floor(i*R/N), floor((i+1)*R/N)), R rows in N shards.

    Contiguous ranges keep each shard's reads to the files and row groups that cover it.
    """
    if num_shards < 1:
        raise AstroptError(f"--shards must be at least 1, got {num_shards}")
    return [(i * num_rows) // num_shards for i in range(num_shards + 1)]


SHARDING_RULE = "contiguous: shard i holds global source rows [floor(i*R/N), floor((i+1)*R/N)) of R rows in N shards"


def new_manifest(codec: dict, bands: list[str], storage: str, num_shards: int, precision: str, source: dict,
                 modalities: list[dict] | None = None, keep_partial: bool = False) -> dict:
    """A manifest for a store in progress (`complete` false, no shard list yet). `modalities`: several image
    columns, [{"name", "column", "bands"}] (format version 2)."""
    from astropt_tok import __version__

    vocab = int(codec["vocab_size"])
    several = {"modalities": modalities, "keep_partial": bool(keep_partial)} if modalities else {}
    return {
        "format": FORMAT,
        "format_version": MODALITIES_VERSION if modalities else FORMAT_VERSION,
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
