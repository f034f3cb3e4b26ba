"""Reading a token store: `TokenStore`, a read-only view of its rows, and opening one arrow or zarr shard."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from astropt_tok.errors import AstroptError
from astropt_tok.schema import Fields
from astropt_tok.store.format import MANIFEST, modality_entries, path_bytes, read_manifest, token_dtype
from astropt_tok.store.ids import IdIndex, hash_strings


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
        # each token column's kind, vocabulary, tokens per object and dtype (for a store of images only: the
        # store's, for every column); keyed by modality name, and by "tokens" in a one-column store
        entries = {e["name"]: e for e in modality_entries(m)}
        self.modality_kind: dict[str, str] = {n: e["kind"] for n, e in entries.items()}
        self.modality_vocab: dict[str, int] = {n: int(e["vocab_size"]) for n, e in entries.items()}
        self.modality_tokens: dict[str, int] = {n: int(e["tokens_per_object"]) for n, e in entries.items()}
        self.modality_dtype: dict[str, np.dtype] = {n: np.dtype(e["dtype"]) for n, e in entries.items()}
        self.modality_aion: dict[str, str | None] = {n: e.get("aion_modality") for n, e in entries.items()}
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
        # shard index -> {"tokens": array-like, "row": ..., "object_id": an Arrow string array (memory-mapped) or a
        # zarr array; never a Python object per row}
        self._open: dict[int, dict] = {}
        self._fds: dict[int, int] = {}  # shard index -> file descriptor, for `read_rows`
        self._ids: IdIndex | None = None  # built by the first `find_object_ids`

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self):  # DataLoader workers reopen their own memory maps and files
        state = dict(self.__dict__)
        state["_open"], state["_fds"], state["_ids"] = {}, {}, None
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
            want = (self.shards[i]["rows"], self.modality_tokens[column])
            if tuple(t.shape) != want or np.dtype(t.dtype) != self.modality_dtype[column]:
                raise AstroptError(
                    f"token store {self.dir}: shard {path.name} holds {column} {tuple(t.shape)} {t.dtype}, the "
                    f"manifest says {want} {self.modality_dtype[column]}"
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
        several_vocabs = len(set(self.modality_vocab.values())) > 1
        for s in self.shards:
            if not s["rows"]:
                continue
            if several_vocabs and s.get("token_ranges") is None:
                return False  # the pooled range cannot be checked against vocabularies of different sizes
            spans = s.get("token_ranges") or {c: [s["token_min"], s["token_max"]] for c in self.token_columns}
            for column, (low, high) in spans.items():
                vocab = self.modality_vocab[column]
                if not (0 <= low and high < vocab):
                    what = "tokens" if column == "tokens" or not several_vocabs else f"{column} tokens"
                    raise AstroptError(
                        f"token store {self.dir}: shard {s['file']} holds {what} {low}..{high}, "
                        f"outside the vocabulary 0..{vocab - 1}")
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
                out[m][sel] = self._column_rows(int(i), f"{m}_valid", local[sel])
        return out

    def _column_rows(self, i: int, column: str, local: np.ndarray) -> np.ndarray:
        """Shard i's 1-d `column` (row, <name>_valid) at rows `local`: one fancy index into the memory map
        (arrow), or a read of only the chunks that hold those rows, each row once (zarr)."""
        values = self._shard(i)[column]
        if self.storage == "arrow":
            return values[local]
        want, back = np.unique(local, return_inverse=True)  # ascending, each row once
        return np.asarray(values.oindex[want])[back]

    def shard_source_rows(self, i: int) -> np.ndarray:
        """Shard i's global source row indices, [rows] int64."""
        return np.asarray(self._shard(i)["row"][:])

    def shard_object_ids(self, i: int) -> list[str] | None:
        """Shard i's object ids, or None when the source had no id column: a list made for this call, not kept."""
        ids = self._shard(i).get("object_id")
        if ids is None:
            return None
        return [str(x) for x in (ids.to_pylist() if self.storage == "arrow" else ids[:])]

    def _shard_ids(self, i: int, local: np.ndarray) -> list[str] | None:
        """Shard i's object ids at rows `local` as Python strings (a null id reads "None", as it always has), or
        None when the source had no id column: only those rows are read (zarr: the chunks that hold them)."""
        ids = self._shard(i).get("object_id")
        if ids is None:
            return None
        if self.storage == "arrow":
            import pyarrow as pa

            return [str(x) for x in ids.take(pa.array(local, type=pa.int64())).to_pylist()]
        want, back = np.unique(local, return_inverse=True)
        got = np.asarray(ids.oindex[want])
        return [str(got[k]) for k in back.tolist()]

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row within shard) for store row indices."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_rows):
            raise AstroptError(f"row index out of range: the store has {self.num_rows} rows (0..{self.num_rows - 1})")
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        return shard, indices - self.offsets[shard]

    def take(self, indices, modality: str | None = None) -> np.ndarray:
        """Tokens of store rows `indices`, [n, tokens of the modality] in its dtype, in the order asked."""
        return self.gather(*self.locate(indices), modality=modality)

    def gather(self, shard: np.ndarray, local: np.ndarray, modality: str | None = None) -> np.ndarray:
        """`take` for rows already located: (shard, row within shard) pairs from `locate`."""
        column = self._column(modality)
        out = np.empty((shard.size, self.modality_tokens[column]), dtype=self.modality_dtype[column])
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
        width, dtype = self.modality_tokens[column], self.modality_dtype[column]
        row_bytes = width * dtype.itemsize
        out = np.empty((shard.size, width), dtype=dtype)
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
        for i in np.unique(shard):  # each shard read once, for only the rows asked of it
            sel = shard == i
            out[sel] = self._column_rows(int(i), "row", local[sel])
        return out

    def object_ids(self, indices) -> list[str | None]:
        """Object id of each store row in `indices` (None where the source had no id column)."""
        shard, local = self.locate(indices)
        out: list[str | None] = [None] * shard.size
        for i in np.unique(shard):  # each shard read once, for only the rows asked of it
            sel = np.nonzero(shard == i)[0]
            ids = self._shard_ids(int(i), local[sel])
            if ids is not None:
                for j, oid in zip(sel.tolist(), ids):
                    out[j] = oid
        return out

    def find_object_ids(self, wanted: Iterable[str]) -> np.ndarray:
        """Store row index of each object id in `wanted` (an id the store repeats: its first row); an unknown id is
        an AstroptError naming it. A binary search of the store's id hashes (`id_index`), each match confirmed
        against the id itself."""
        import pyarrow as pa

        wanted = list(wanted)
        index = self.id_index()
        unique = list(dict.fromkeys(w for w in wanted if isinstance(w, str)))  # a non-string id is never found
        keys = hash_strings(pa.array(unique, type=pa.string()))
        where: dict[str, int] = {}
        for w, key in zip(unique, keys):
            for row in index.candidates(key).tolist():  # one id's rows, ascending; another id only on a collision
                if self.object_ids([row])[0] == w:
                    where[w] = int(row)
                    break
        missing = [str(w) for w in wanted if w not in where]
        if missing:
            raise AstroptError(f"object id(s) not in {self.dir}: {', '.join(missing[:5])}")
        return np.array([where[w] for w in wanted], dtype=np.int64)

    def id_index(self) -> IdIndex:
        """The store's id index (built on first use, shard by shard, then kept): every row's id hash, sorted."""
        if self._ids is None:
            if any(self._shard(i).get("object_id") is None for i in range(len(self.shards))):
                raise AstroptError(f"token store {self.dir} has no object_id column")
            self._ids = IdIndex([self._shard_id_hashes(i) for i in range(len(self.shards))])
        return self._ids

    def _shard_id_hashes(self, i: int) -> np.ndarray:
        """Shard i's id hashes, [rows] uint64 (zarr: the column read once, as strings, then let go)."""
        ids = self._shard(i)["object_id"]
        if self.storage == "arrow":
            return hash_strings(ids)
        import pyarrow as pa

        return hash_strings(pa.array([str(x) for x in ids[:]], type=pa.string()))

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
        elif name == "object_id":  # an Arrow string array over the map: Python strings only for rows asked
            cols[name] = (column.chunk(0) if column.num_chunks == 1 else
                          column.combine_chunks() if column.num_chunks else pa.array([], type=pa.string()))
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
