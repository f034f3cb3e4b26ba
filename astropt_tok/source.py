"""Reading a survey: resolve a hub id or local parquet/arrow files into a plan of files with row counts,
read any global row range straight from the files that cover it, and turn the nested image column into a
float32 [rows, bands, H, W] array with Arrow-native operations (never through Python lists).

The image column (`legacysurvey_image`) is a struct with `band` (list of strings) and `flux` (a list of
per-band 2-D images). `datasets` stores each image as an Array2D extension type; read without `datasets`
the same bytes are plain nested lists; other writers use fixed-size lists. All three are handled here.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import hashlib
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from astropt_tok.errors import AstroptError, first_line

DEFAULT_SOURCE = "Smith42/legacysurvey_hsc_crossmatched"
DEFAULT_SPLIT = "train"
IMAGE_SIZE = 160  # the Legacy Survey cutouts are 160x160 pixels
SOURCE_SUFFIXES = (".parquet", ".arrow")


@dataclass
class SourceFile:
    """One file of the source and how many rows it holds."""

    path: str  # an absolute local path or an fsspec URL (hf://datasets/...)
    num_rows: int
    row_group_rows: list[int] | None = None  # parquet only: rows per row group, for reading a slice
    bytes: int | None = None  # the file's size
    fingerprint: str | None = None  # sha256 of its parquet footer (arrow: of its first and last 64 KiB)


@dataclass
class SourcePlan:
    """A source resolved to its files, in order: global row g is row g - start(file) of its file."""

    source_id: str
    kind: str  # "hub" or "local"
    split: str
    column: str
    id_column: str | None  # None when the source has no id column
    files: list[SourceFile]
    revision: str | None = None
    limit: int | None = None
    schema_note: str = ""
    extra_columns: list[str] = field(default_factory=list)  # more image columns read with `column` (one pass)
    # catalogue columns read in the same pass, {column: "scalar" | "spectrum"}: a number, or a struct of flux,
    # ivar, mask and wavelength lists
    catalogue: dict[str, str] = field(default_factory=dict)
    starts: np.ndarray = field(init=False)

    def __post_init__(self):
        self.starts = np.concatenate([[0], np.cumsum([f.num_rows for f in self.files])]).astype(np.int64)

    @property
    def columns(self) -> list[str]:
        """Every image column read: `column`, then `extra_columns`."""
        return [self.column] + list(self.extra_columns)

    def schema(self):
        """The Arrow schema of the source's first file (the one the plan's columns were checked against)."""
        return _file_schema(self.files[0].path)

    @property
    def num_rows(self) -> int:
        """Rows the run covers: the source length, or --limit when smaller."""
        total = int(self.starts[-1])
        return total if self.limit is None else min(total, self.limit)

    def describe(self) -> dict:
        """The source section of a store manifest."""
        return {
            "id": self.source_id,
            "kind": self.kind,
            "revision": self.revision,
            "split": self.split,
            "column": self.column,
            **({"columns": self.columns} if self.extra_columns else {}),
            **({"catalogue": dict(self.catalogue)} if self.catalogue else {}),
            "id_column": self.id_column,
            "files": [{"path": f.path, "rows": f.num_rows, "bytes": f.bytes, "fingerprint": f.fingerprint}
                      for f in self.files],
            "limit": self.limit,
            "num_rows": self.num_rows,
        }


# ---------------------------------------------------------------------------------------------------------
# resolving a source


def _local_files(source: str, split: str) -> list[str] | None:
    """Local parquet/arrow files of `split` for `source` (folder, file or glob), or None when it is not local."""
    p = Path(os.path.abspath(Path(source).expanduser()))  # absolute: a store works from any folder
    if p.is_dir():
        return _folder_split_files(p, split, source)
    if p.is_file():
        files = [str(p)]
    elif any(ch in source for ch in "*?["):
        files = sorted(os.path.abspath(f) for f in globlib.glob(os.path.expanduser(source), recursive=True)
                       if f.endswith(SOURCE_SUFFIXES))
    else:
        return None
    # files named directly are read as given; another split than the default must be what their names say
    other = [f for f in files if split != DEFAULT_SPLIT and not _named_for_split(f, split)]
    if other:
        raise AstroptError(f"--split {split}: {Path(other[0]).name} of source {source} is not named for split "
                           f"{split!r}; pass the folder that holds the splits, or only that split's files")
    return files


def _folder_split_files(folder: Path, split: str, source: str) -> list[str]:
    """The parquet/arrow files of `split` in a folder, split by `datasets`' rules for a dataset folder
    (data/train-00000-of-00002.parquet, test.parquet, a validation/ folder, ...); a folder whose data files'
    names mark no split is all one split, train, as `datasets.load_dataset` reads it."""
    from datasets.data_files import DEFAULT_PATTERNS_ALL, DataFilesDict, EmptyDatasetError, get_data_patterns

    try:
        patterns = get_data_patterns(str(folder))
    except EmptyDatasetError:  # no files at all: the caller says so
        return []
    except ValueError as exc:  # a split name `datasets` refuses
        raise AstroptError(f"source {source}: {exc}") from None
    by_name = DataFilesDict.from_patterns(patterns, str(folder), allowed_extensions=list(SOURCE_SUFFIXES))
    by_split = {str(name): sorted(map(str, files)) for name, files in by_name.items() if files}
    if patterns == DEFAULT_PATTERNS_ALL:
        by_split = {}  # `datasets`' fallback, every file in train: the folder has no split structure
    if not by_split:  # no parquet/arrow file is named for a split (a README or train.log may be)
        if split != DEFAULT_SPLIT and not _named_for_split(str(folder), split):
            raise AstroptError(f"--split {split}: source {source} has no splits (no data file or folder in it is "
                               f"named for one, as in data/{split}-00000-of-00001.parquet), so it is all split "
                               f"{DEFAULT_SPLIT}: leave out --split, or pass the folder that holds that split")
        return sorted(str(f) for f in folder.rglob("*") if f.suffix in SOURCE_SUFFIXES and f.is_file())
    if split not in by_split:
        raise AstroptError(f"source {source} has no split {split!r} (it has: {', '.join(by_split)}); "
                           "pass one of them with --split")
    return by_split[split]


def _named_for_split(path: str, split: str) -> bool:
    """Whether the file's (or folder's) name, or that of the folder it is in, has `split` as a word, as `datasets`
    tells a file's split (train-00000-of-00002.parquet, test.arrow, validation/part-0.parquet)."""
    word = re.compile(rf"(^|[-._ 0-9]){re.escape(split)}([-._ 0-9]|$)")
    return any(word.search(name) for name in (Path(path).name, Path(path).parent.name))


def _hub_files(source: str, split: str) -> tuple[list[str], str | None]:
    """The parquet files of a hub dataset's split, resolved by `datasets` (honours HF_HUB_OFFLINE and the cache)."""
    from astropt_tok.hub import hub_unreachable_reason

    unreachable = hub_unreachable_reason()
    if unreachable:
        raise AstroptError(f"cannot reach the Hugging Face hub for source {source!r} ({unreachable}); pass local "
                           "parquet/arrow files with --source PATH, or set HF_HUB_OFFLINE=1 to use the HF cache")
    import datasets

    try:
        builder = datasets.load_dataset_builder(source)
    except Exception as exc:
        reason = first_line(exc, None)
        raise AstroptError(
            f"unknown source {source!r}: not a local file, folder or glob, and the Hugging Face hub cannot "
            f"resolve it ({reason[:200]}); pass local parquet/arrow files with --source PATH"
        ) from None
    data_files = builder.config.data_files or {}
    if split not in data_files:
        raise AstroptError(f"source {source!r} has no split {split!r} (it has: {', '.join(data_files) or 'none'})")
    files = [str(f) for f in data_files[split]]
    revision = getattr(builder, "hash", None)
    return files, revision


def _open(path: str):
    if "://" in path:
        import fsspec

        return fsspec.open(path, "rb").open()
    return path


@contextlib.contextmanager
def _readable(what: str):
    """Turn a read failure inside the block (the filesystem's, or pyarrow's on a corrupt file) into one
    AstroptError, '{what} is unreadable: ...'."""
    import pyarrow as pa

    try:
        yield
    except (OSError, pa.ArrowInvalid) as exc:
        raise AstroptError(f"{what} is unreadable: {exc}") from None


SPECTRUM_FIELDS = ("flux", "ivar", "mask")  # and the wavelength, as "wavelength" or (Multimodal Universe) "lambda"
WAVELENGTH_FIELDS = ("wavelength", "lambda")


def spectrum_fields(arrow_type) -> list[str] | None:
    """The leaves a spectrum column is read from (flux, ivar, mask, and its wavelength field), or None when
    `arrow_type` is not a struct of those lists."""
    import pyarrow as pa

    if not pa.types.is_struct(arrow_type):
        return None
    names = {f.name: f.type for f in arrow_type}
    wavelength = next((w for w in WAVELENGTH_FIELDS if w in names), None)
    leaves = [*SPECTRUM_FIELDS, wavelength]
    if wavelength is None or not set(SPECTRUM_FIELDS) <= set(names):
        return None
    def numbers(t) -> bool:  # a list of numbers (a mask: of bools or numbers)
        listed = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
        return listed and (_is_number(t.value_type) or pa.types.is_boolean(t.value_type))

    return leaves if all(numbers(names[n]) for n in leaves) else None


def _is_number(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_floating(arrow_type) or pa.types.is_integer(arrow_type) or pa.types.is_decimal(arrow_type)


def check_catalogue_column(schema, name: str, kind: str, where: str) -> None:
    """A scalar column must be numbers; a spectrum column a struct of flux, ivar, mask and wavelength lists."""
    if name not in schema.names:
        raise AstroptError(f"{where} has no column {name!r} (columns: {', '.join(schema.names)})")
    arrow_type = schema.field(name).type
    if kind == "scalar" and not _is_number(arrow_type):
        raise AstroptError(f"column {name!r} of {where} holds {arrow_type}, not numbers: --scalar needs a numeric "
                           "column")
    if kind == "spectrum" and spectrum_fields(arrow_type) is None:
        raise AstroptError(f"column {name!r} of {where} is not a spectrum: --spectrum needs a struct of flux, ivar, "
                           f"mask and wavelength (or lambda) lists, as the Multimodal Universe has it (got {arrow_type})")


def _is_image_struct(arrow_type) -> bool:
    """An image column's type: a struct with (at least) `band` and `flux` fields."""
    import pyarrow as pa

    return pa.types.is_struct(arrow_type) and {"band", "flux"} <= {f.name for f in arrow_type}


ENDS_BYTES = 1 << 16  # an arrow file's fingerprint covers its first and last 64 KiB


def _fingerprint(fh, arrow: bool, path: str) -> tuple[int, str]:
    """(size, fingerprint) of an open binary file: the sha256 of its parquet footer (the file's schema, row
    groups, column offsets and statistics; one small read, cheap for a remote file), or of an arrow file's
    first and last 64 KiB (schema, and the IPC footer or last batch). Any rewrite of the data moves them."""
    size = fh.seek(0, os.SEEK_END)
    h = hashlib.sha256(str(size).encode() + b"\0")
    if arrow:
        fh.seek(0)
        h.update(fh.read(ENDS_BYTES))
        fh.seek(max(0, size - ENDS_BYTES))
        h.update(fh.read(ENDS_BYTES))
        return size, "ends-sha256:" + h.hexdigest()
    if size < 12:
        raise AstroptError(f"source file {path} is unreadable: {size} bytes is too short for a parquet file")
    fh.seek(size - 8)
    tail = fh.read(8)
    footer_len = int.from_bytes(tail[:4], "little")
    if tail[4:] != b"PAR1" or footer_len > size - 12:
        raise AstroptError(f"source file {path} is unreadable: no parquet footer (truncated or not parquet)")
    fh.seek(size - 8 - footer_len)
    h.update(fh.read(footer_len))
    return size, "footer-sha256:" + h.hexdigest()


def _open_binary(path: str):
    if "://" in path:
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def _file_rows(path: str) -> SourceFile:
    """A source file's row counts and fingerprint (its footer only is read)."""
    import pyarrow.parquet as pq

    with _readable(f"source file {path}"):
        arrow = path.endswith(".arrow")
        with _open_binary(path) as fh:
            size, fingerprint = _fingerprint(fh, arrow, path)
            if arrow:
                return SourceFile(path, _arrow_reader(path)[1], None, size, fingerprint)
            fh.seek(0)
            meta = pq.ParquetFile(fh).metadata
        return SourceFile(path, meta.num_rows, [meta.row_group(i).num_rows for i in range(meta.num_row_groups)],
                          size, fingerprint)


def changed_files(recorded: list[dict], found: list[SourceFile]) -> list[str]:
    """Paths of source files whose fingerprint differs from the one a manifest recorded (same path, other
    content). Files recorded without a fingerprint (stores of format version 1) cannot be checked."""
    known = {f["path"]: f for f in recorded if isinstance(f, dict) and f.get("fingerprint")}
    return [f.path for f in found if f.path in known and f.fingerprint is not None
            and (known[f.path]["fingerprint"], known[f.path].get("bytes")) != (f.fingerprint, f.bytes)]


def _files_rows(paths: list[str]) -> list[SourceFile]:
    """Row counts of many files, read a few footers at a time: on the hub each is a round trip, and a survey
    of hundreds of files would otherwise spend its start-up waiting on them one by one."""
    if len(paths) < 2:
        return [_file_rows(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        return list(pool.map(_file_rows, paths))  # in order; the first unreadable file's error is raised


def _arrow_reader(path: str):
    """(list of record batches, rows) of an Arrow IPC file, stream or file format, memory-mapped."""
    import pyarrow as pa

    source = pa.memory_map(path, "r")
    try:
        reader = pa.ipc.open_file(source)
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    except pa.ArrowInvalid:
        source.seek(0)
        batches = list(pa.ipc.open_stream(source))
    return batches, sum(b.num_rows for b in batches)


def _file_schema(path: str):
    import pyarrow.parquet as pq

    with _readable(f"source file {path}"):
        if path.endswith(".arrow"):
            batches, _ = _arrow_reader(path)
            if not batches:
                raise AstroptError(f"source file {path} holds no record batches")
            return batches[0].schema
        return pq.ParquetFile(_open(path)).schema_arrow


def _source_files(source: str, split: str) -> tuple[str, str, list[str], str | None]:
    """(kind "local" or "hub", source id, the split's files in order, hub revision) of a source."""
    files = _local_files(source, split)
    if files is not None:
        if not files:
            raise AstroptError(f"source {source} holds no .parquet or .arrow files")
        source_id = str(Path(source).expanduser().resolve()) if Path(source).expanduser().exists() else source
        return "local", source_id, files, None
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise AstroptError(f"source {source!r} does not exist (expected a folder, file or glob of parquet/arrow "
                           f"files, or a hub dataset id like {DEFAULT_SOURCE})")
    files, revision = _hub_files(source, split)
    return "hub", source, files, revision


def resolve_source(
    source: str = DEFAULT_SOURCE,
    split: str = DEFAULT_SPLIT,
    column: str = "legacysurvey_image",
    id_column: str | None = "object_id",
    limit: int | None = None,
    extra_columns: list[str] | None = None,
    catalogue: dict[str, str] | None = None,
) -> SourcePlan:
    """Resolve a hub dataset id or local parquet/arrow files into a plan; check the columns exist.
    `extra_columns`: more image columns to read in the same pass (several surveys of each galaxy); `catalogue`:
    {column: "scalar" | "spectrum"} read in that pass too."""
    if limit is not None and limit < 1:
        raise AstroptError(f"--limit must be at least 1, got {limit}")

    kind, source_id, files, revision = _source_files(source, split)
    schema = _file_schema(files[0])
    for name in [column] + list(extra_columns or []):
        if name not in schema.names:
            raise AstroptError(f"source {source} has no column {name!r} (columns: {', '.join(schema.names)})")
        if not _is_image_struct(schema.field(name).type):
            raise AstroptError(f"column {name!r} of {source} is not an image struct with 'band' and 'flux' fields")
    for name, its_kind in (catalogue or {}).items():
        check_catalogue_column(schema, name, its_kind, f"source {source}")
    if id_column is not None and id_column not in schema.names:
        id_column = None  # recorded as absent in the manifest; shards then carry no object_id column
    return SourcePlan(source_id, kind, split, column, id_column, _files_rows(files), revision, limit,
                      extra_columns=list(extra_columns or []), catalogue=dict(catalogue or {}))


def check_recorded_files(section: dict) -> str | None:
    """Re-read the footers of a manifest's source files: AstroptError naming the first that changed since;
    a note (or None) when some cannot be checked (unreachable, or recorded without fingerprints)."""
    recorded = [f for f in section.get("files") or [] if isinstance(f, dict) and f.get("fingerprint")]
    if not section.get("files"):
        return None
    if not recorded:
        return "the store records no source fingerprints (made by an older version): the source is not checked"

    def look(path: str):
        try:
            return _file_rows(path)
        except AstroptError:
            return None

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(16, len(recorded))) as pool:
        found = list(pool.map(look, [f["path"] for f in recorded]))
    changed = changed_files(recorded, [f for f in found if f is not None])
    if changed:
        raise AstroptError(f"source file {changed[0]} changed since the store was made from it (its size or "
                           "footer differ): its shards may mix two versions of the survey; re-tokenise with "
                           "--overwrite")
    missing = [f["path"] for f, got in zip(recorded, found) if got is None]
    if missing:
        return f"{len(missing)} source file(s) cannot be read to check them (first: {missing[0]})"
    return None


def plan_from_manifest(section: dict, moved_to: str | Path | None = None) -> SourcePlan:
    """Rebuild a source plan from a store manifest's source section (to re-read rows for --compare).
    `moved_to`: the folder where the source files are now, found by file name, when they moved since.
    A file whose rows or fingerprint differ from the recorded ones is refused: it is not the same file."""
    files = []
    for f in section["files"]:
        path = f["path"]
        if moved_to is not None:
            path = str(Path(moved_to).resolve() / Path(path).name)
            if not Path(path).exists():
                raise AstroptError(f"the store's source file {Path(path).name} is no longer in {moved_to}")
        elif "://" not in path and not Path(path).exists():
            raise AstroptError(f"the store's source file {path} is no longer there; pass --source DIR where the "
                               "files are now")
        found = _file_rows(path)
        if f.get("rows") is not None and found.num_rows != f["rows"]:
            raise AstroptError(f"source file {path} has {found.num_rows} rows; the store was made from "
                               f"{f['rows']}: not the same file")
        if f.get("fingerprint") and (found.fingerprint, found.bytes) != (f["fingerprint"], f.get("bytes")):
            raise AstroptError(f"source file {path} changed since the store was made from it (its size or "
                               "footer differ): not the same file")
        files.append(found)
    return SourcePlan(section["id"], section["kind"], section["split"], section["column"], section.get("id_column"),
                      files, section.get("revision"), section.get("limit"),
                      extra_columns=list(section.get("columns", [section["column"]])[1:]),
                      catalogue=dict(section.get("catalogue") or {}))


# ---------------------------------------------------------------------------------------------------------
# reading row ranges


@dataclass
class ReadTask:
    """One independently readable piece of a row range: rows [start, start+count) of one parquet row group
    (or Arrow record batch) of one file; `first_row` is the global index of its first row."""

    file: int
    unit: int  # row group (parquet) or record batch (arrow) index within the file
    start: int
    count: int
    first_row: int


def read_tasks(plan: SourcePlan, lo: int, hi: int) -> list[ReadTask]:
    """Split global rows [lo, hi) into per-row-group read tasks, in row order (only the units that overlap)."""
    tasks = []
    for fi, f in enumerate(plan.files):
        f_lo, f_hi = int(plan.starts[fi]), int(plan.starts[fi + 1])
        a, b = max(lo, f_lo), min(hi, f_hi)
        if a >= b:
            continue
        sizes = f.row_group_rows if f.row_group_rows is not None else [x.num_rows for x in _arrow_reader(f.path)[0]]
        pos = f_lo
        for u, size in enumerate(sizes):
            s, e = max(a, pos), min(b, pos + size)
            if s < e:
                tasks.append(ReadTask(fi, u, s - pos, e - s, s))
            pos += size
    return tasks


class OpenFiles:
    """The last few source files read, kept open, so that a parquet footer is parsed (and a remote file's
    connection made, or an Arrow file's batches mapped) once per file per reading process, not once per row
    group. Each reading process holds its own: a copy made by pickling (a DataLoader worker) starts empty."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self.handles: OrderedDict = OrderedDict()  # path -> (ParquetFile or list of record batches, file object)
        self.opened = 0  # files opened so far

    def get(self, f: SourceFile):
        """The open ParquetFile, or list of Arrow record batches, of source file `f`."""
        import pyarrow.parquet as pq

        handle = self.handles.pop(f.path, None)
        if handle is None:
            if f.row_group_rows is None:
                handle = (_arrow_reader(f.path)[0], None)
            else:
                raw = _open(f.path)
                remote = raw is not f.path
                # remote: coalesce a row group's column-chunk reads into few large requests (pyarrow's advice
                # for high-latency filesystems)
                handle = (pq.ParquetFile(raw, pre_buffer=remote), raw if remote else None)
            self.opened += 1
        self.handles[f.path] = handle
        while len(self.handles) > self.keep:
            self._close(self.handles.popitem(last=False)[1])
        return handle[0]

    @staticmethod
    def _close(handle) -> None:
        reader, raw = handle
        if hasattr(reader, "close"):
            reader.close()
        if raw is not None:
            raw.close()

    def close(self) -> None:
        while self.handles:
            self._close(self.handles.popitem()[1])

    def __getstate__(self):
        return {"keep": self.keep, "handles": OrderedDict(), "opened": 0}


def read_task(plan: SourcePlan, task: ReadTask, files: OpenFiles | None = None):
    """The record batch of one read task: only the image columns' `band` and `flux` (parquet: `ivar`, `psf_fwhm`
    and the rest are never read or decompressed) and the id column of one row group, sliced. Pass the reading
    process's `OpenFiles` to keep files open between tasks."""
    ids = [plan.id_column] if plan.id_column else []
    f = plan.files[task.file]
    own = files is None
    files = OpenFiles(keep=1) if own else files
    try:
        with _readable(f"source file {f.path}"):
            reader = files.get(f)
        with _readable(f"source file {f.path}, row group {task.unit},"):
            if f.row_group_rows is None:  # Arrow IPC: memory-mapped, so unread fields cost nothing
                batch = reader[task.unit]
                _check_columns(batch.schema, f.path, plan)
                batch = batch.select(plan.columns + list(plan.catalogue) + ids)
            else:
                columns = [f"{c}.{part}" for c in plan.columns for part in ("band", "flux")] + ids
                schema = reader.schema_arrow
                for c, kind in plan.catalogue.items():  # a scalar whole; a spectrum's four leaves, no others
                    leaves = spectrum_fields(schema.field(c).type) if c in schema.names else None
                    columns += [f"{c}.{leaf}" for leaf in leaves] if kind == "spectrum" and leaves else [c]
                table = reader.read_row_group(task.unit, columns=columns, use_threads=False)
                _check_columns(table.schema, f.path, plan)  # pyarrow skips asked-for columns a file lacks
                batch = table.combine_chunks().to_batches()[0]
    finally:
        if own:
            files.close()
    return batch.slice(task.start, task.count)


def _check_columns(schema, path: str, plan: SourcePlan) -> None:
    """Every file must have what the first one had: the image struct with band and flux, and the id column."""
    for column in plan.columns:
        if column not in schema.names or not _is_image_struct(schema.field(column).type):
            raise AstroptError(f"source file {path} has no image column {column!r} with band and flux, "
                               f"unlike the source's first file")
    for column, kind in plan.catalogue.items():
        check_catalogue_column(schema, column, kind, f"source file {path}")
    if plan.id_column and plan.id_column not in schema.names:
        raise AstroptError(f"source file {path} has no {plan.id_column!r} column, unlike the source's first file")


def iter_row_range(plan: SourcePlan, lo: int, hi: int, batch_rows: int = 64) -> Iterator[tuple[int, object]]:
    """Yield (global row of the first row, pyarrow.RecordBatch) covering global rows [lo, hi) in order.

    Reads only the files and parquet row groups that overlap the range, and only the image and id columns.
    """
    files = OpenFiles()
    try:
        for task in read_tasks(plan, lo, hi):
            batch = read_task(plan, task, files)
            for k in range(0, batch.num_rows, batch_rows):
                yield task.first_row + k, batch.slice(k, batch_rows)
    finally:
        files.close()


def iter_row_range_datasets(plan: SourcePlan, lo: int, hi: int, batch_rows: int = 64) -> Iterator[tuple[int, object]]:
    """Same as `iter_row_range`, through the `datasets` streaming reader (one IterableDataset per file)."""
    import datasets

    columns = plan.columns + list(plan.catalogue) + ([plan.id_column] if plan.id_column else [])
    for fi, f in enumerate(plan.files):
        f_lo, f_hi = int(plan.starts[fi]), int(plan.starts[fi + 1])
        a, b = max(lo, f_lo), min(hi, f_hi)
        if a >= b:
            continue
        builder = "arrow" if f.path.endswith(".arrow") else "parquet"
        ds = datasets.load_dataset(builder, data_files=[f.path], split="train", streaming=True)
        ds = ds.select_columns(columns).skip(a - f_lo).take(b - a).with_format("arrow")
        pos = a
        for table in ds.iter(batch_size=batch_rows):
            for batch in table.to_batches():
                yield pos, batch
                pos += batch.num_rows


def read_columns(source: str, columns: list[str], split: str = DEFAULT_SPLIT, limit: int | None = None) -> dict:
    """{column: pyarrow.ChunkedArray} of the first `limit` rows (all without) of top-level `columns`, in one pass
    over the source's files; parquet reads only those columns' chunks. A column a file lacks is one error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if limit is not None and limit < 1:
        raise AstroptError(f"--limit must be at least 1, got {limit}")
    _, _, files, _ = _source_files(source, split)
    parts: dict[str, list] = {c: [] for c in columns}
    left = limit
    for path in files:
        with _readable(f"source file {path}"):
            if path.endswith(".arrow"):
                table = pa.Table.from_batches(_arrow_reader(path)[0])
                names = table.column_names
            else:
                raw = _open(path)
                try:
                    parquet = pq.ParquetFile(raw)
                    names = parquet.schema_arrow.names
                    table = parquet.read(columns=[c for c in columns if c in names], use_threads=False)
                finally:
                    if raw is not path:
                        raw.close()
        missing = [c for c in columns if c not in names]
        if missing:
            where = "" if path == files[0] else f" in its file {path}"
            raise AstroptError(f"source {source} has no column {missing[0]!r}{where} (columns: {', '.join(names)})")
        if left is not None:
            table = table.slice(0, left)
            left -= table.num_rows
        for c in columns:
            parts[c].append(table.column(c))
        if left == 0:
            break
    return {c: pa.chunked_array([chunk for col in parts[c] for chunk in col.chunks], type=parts[c][0].type)
            for c in columns}


# ---------------------------------------------------------------------------------------------------------
# nested image column -> float32 array


def _lengths(list_array) -> np.ndarray:
    """Per-entry list lengths as int64, -1 for a null entry."""
    import pyarrow.compute as pc

    return pc.fill_null(pc.list_value_length(list_array), -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _storage(arr):
    import pyarrow as pa

    return arr.storage if isinstance(arr.type, pa.BaseExtensionType) else arr  # datasets' Array2D -> nested lists


def batch_to_flux(
    batch, column: str, bands: list[str], out: np.ndarray | None = None, size: int = IMAGE_SIZE, crop: int | None = None
) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Convert one record batch's image column into float32 flux in `bands` order.

    Returns (flux [n_good, len(bands), S, S], good row positions [n_good] within the batch, reason per row:
    None for a good row, else why it is bad). S is `crop` (a centre crop, AION's rule) or `size`. When `out`
    (an owned, writable buffer, e.g. pinned memory) is given, flux is written into out[:n_good].
    """
    import pyarrow.compute as pc

    n = batch.num_rows
    images_col = batch.column(batch.schema.get_field_index(column))
    band_lists = pc.struct_field(images_col, "band").to_pylist()  # a few short strings per row: cheap
    flux_lists = pc.struct_field(images_col, "flux")  # respects the struct's nulls and offset
    n_images = _lengths(flux_lists)  # [n] images per row, -1 for a null row
    images = _storage(flux_lists.flatten())  # [sum n_images] one entry per (row, band) image
    image_rows = _lengths(images)  # [n_img] rows per image
    pixel_rows = _storage(images.flatten())  # [sum image_rows] one entry per image row
    row_pixels = _lengths(pixel_rows)  # [n_pixel_rows] pixels per image row
    pixels = pixel_rows.flatten().to_numpy(zero_copy_only=False)  # nulls become NaN, caught below
    if pixels.dtype != np.float32:
        pixels = pixels.astype(np.float32)

    # image i is well-shaped when it has `size` rows of `size` pixels each
    first_row = np.concatenate([[0], np.cumsum(np.maximum(image_rows, 0))])  # [n_img + 1]
    bad_rows_before = np.concatenate([[0], np.cumsum(row_pixels != size)])
    image_ok = (image_rows == size) & (bad_rows_before[first_row[1:]] == bad_rows_before[first_row[:-1]])
    first_pixel = np.concatenate([[0], np.cumsum(np.maximum(row_pixels, 0))])[first_row[:-1]]  # [n_img]

    reasons: list[str | None] = [None] * n
    first_image = np.concatenate([[0], np.cumsum(np.maximum(n_images, 0))])
    pick = np.zeros((n, len(bands)), dtype=np.int64)  # image index of each requested band of each row
    for r in range(n):
        row_bands = band_lists[r]
        if n_images[r] < 0 or row_bands is None:
            reasons[r] = "null image"
            continue
        if len(row_bands) != n_images[r]:
            reasons[r] = f"{len(row_bands)} band names for {n_images[r]} flux images"
            continue
        missing = [b for b in bands if b not in row_bands]
        if missing:
            reasons[r] = f"missing band {','.join(missing)} (row has {','.join(map(str, row_bands))})"
            continue
        idx = first_image[r] + np.array([row_bands.index(b) for b in bands], dtype=np.int64)
        if not image_ok[idx].all():
            reasons[r] = f"flux image is not {size}x{size}"
            continue
        pick[r] = idx

    good = np.array([r for r in range(n) if reasons[r] is None], dtype=np.int64)
    side = crop or size
    off = (size - side) // 2  # AION's CenterCrop: start = (W - crop) // 2
    if out is None:
        out = np.empty((len(good), len(bands), side, side), dtype=np.float32)
    flux = out[: len(good)]
    if not len(good):
        return flux, good, reasons
    image_pixels = size * size
    if len(first_pixel) and np.array_equal(first_pixel, np.arange(len(first_pixel)) * image_pixels):
        # the common case: every image is size x size, back to back, so the pixels are one [n_img, S, S] array
        stack = pixels[: len(first_pixel) * image_pixels].reshape(-1, size, size)
        flux[:] = stack[pick[good], off:off + side, off:off + side]  # [n_good, n_bands, S, S]: gathers the crops only
        finite = _finite_images(stack)[pick[good]].all(axis=1)  # everywhere, not only inside the crop
    else:
        starts = first_pixel[pick[good]]  # [n_good, n_bands]
        within = (np.arange(side)[:, None] + off) * size + (np.arange(side)[None, :] + off)  # [S, S] pixel offsets
        np.take(pixels, starts[:, :, None, None] + within[None, None], out=flux)
        finite = np.array([np.isfinite(pixels[s:s + image_pixels]).all() for s in starts.reshape(-1)])
        finite = finite.reshape(starts.shape).all(axis=1)
    if not finite.all():
        for r in good[~finite]:
            reasons[r] = "non-finite flux (NaN or inf)"
        kept = flux[finite].copy()
        good = good[finite]
        flux = out[: len(good)]
        flux[:] = kept
    return flux, good, reasons


def _finite_images(stack: np.ndarray) -> np.ndarray:
    """[n_img] bool: image i holds no NaN or inf. A sum is NaN or inf whenever a term is, so summing (no
    temporary array) clears almost every image; the rare non-finite sum (a NaN, or finite values that
    overflow) is checked pixel by pixel."""
    with np.errstate(over="ignore", invalid="ignore"):
        sums = np.add.reduce(stack.reshape(len(stack), -1), axis=1)
    finite = np.isfinite(sums)
    for i in np.nonzero(~finite)[0]:
        finite[i] = np.isfinite(stack[i]).all()
    return finite


def batch_to_scalar(batch, column: str, value_range: tuple[float, float] | None = None
                    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """A catalogue column of a record batch -> (values [n] float32, positions of the good rows, reason per row
    or None). Bad: null, not finite, or outside `value_range` (a codec with a fixed grid, which AION would
    clamp silently: a redshift of 7 on a grid ending at 6 would read back as 6)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = batch.column(batch.schema.get_field_index(column))
    values = pc.cast(arr, pa.float64(), safe=False).to_numpy(zero_copy_only=False)  # nulls -> NaN
    null = arr.is_null().to_numpy(zero_copy_only=False)
    values32 = values.astype(np.float32)  # what the codec is given (its tables are float32)
    reasons: list[str | None] = [None] * len(values)
    finite = np.isfinite(values32)
    inside = np.ones(len(values), dtype=bool)
    if value_range is not None:
        lo, hi = value_range
        inside = ~finite | ((values32 >= np.float32(lo)) & (values32 <= np.float32(hi)))
    for r in np.nonzero(null | ~finite | ~inside)[0]:
        if null[r]:
            reasons[r] = "null"
        elif not finite[r]:
            reasons[r] = f"not finite ({values[r]})"
        else:
            reasons[r] = f"{values[r]:g} outside the codec's range [{value_range[0]:g}, {value_range[1]:g}]"
    good = np.nonzero(finite & inside & ~null)[0]
    return values32, good, reasons


def empty_spectra(n: int, width: int) -> np.ndarray:
    """[n, 4, width] float32 of spectrum padding: flux and ivar 0, mask 1, and no wavelength (NaN): the encoder
    takes each row's pixels before its first NaN wavelength, so a row of padding has none."""
    out = np.zeros((n, 4, width), dtype=np.float32)
    out[:, 2] = 1.0
    out[:, 3] = np.nan
    return out


def batch_to_spectrum(batch, column: str) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """A spectrum column of a record batch -> (spectra [n, 4, L] float32: flux, ivar, mask (1 = bad) and
    wavelength in Angstrom, each row's pixels first and the rest padding (wavelength NaN, mask 1); positions of
    the good rows; reason per row or None). L is the batch's longest good spectrum. Bad: null, leaves of
    different lengths, no pixels, a wavelength not finite or not increasing, no good pixel (all masked, or
    no positive ivar). NaN flux is AION's to handle (it zeroes it)."""
    import pyarrow.compute as pc

    col = batch.column(batch.schema.get_field_index(column))
    n = len(col)
    leaves = spectrum_fields(col.type)
    parts, lengths = [], []
    null = col.is_null().to_numpy(zero_copy_only=False).copy()
    for leaf in leaves:  # flux, ivar, mask, wavelength
        lists = col.field(leaf)
        null |= lists.is_null().to_numpy(zero_copy_only=False)
        lengths.append(pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64))
        parts.append(np.asarray(lists.flatten().to_numpy(zero_copy_only=False), dtype=np.float32))
    lengths = np.stack(lengths)  # [4, n]
    starts = np.concatenate([np.zeros((4, 1), np.int64), np.cumsum(lengths, axis=1)[:, :-1]], axis=1)
    reasons: list[str | None] = [None] * n
    for r in range(n):
        if null[r]:
            reasons[r] = "null"
        elif len(set(lengths[:, r])) != 1:
            reasons[r] = f"{', '.join(leaves)} have different lengths ({', '.join(map(str, lengths[:, r]))})"
        elif lengths[0, r] == 0:
            reasons[r] = "no pixels"
    ok = [r for r in range(n) if reasons[r] is None]
    width = int(max((lengths[0, r] for r in ok), default=0))
    out = empty_spectra(n, width)
    for r in ok:
        k = lengths[0, r]
        for j in range(4):
            out[r, j, :k] = parts[j][starts[j, r]:starts[j, r] + k]
        wavelength, mask, ivar = out[r, 3, :k], out[r, 2, :k] != 0, out[r, 1, :k]
        if not np.isfinite(wavelength).all():
            reasons[r] = "wavelength not finite"
        elif k > 1 and not (np.diff(wavelength) > 0).all():
            reasons[r] = "wavelength not increasing"
        elif not ((~mask) & (ivar > 0)).any():
            reasons[r] = "no good pixels (every pixel masked or of zero ivar)"
        else:
            out[r, 2, :k] = mask  # 0/1, whatever the source's mask type was
    good = np.array([r for r in range(n) if reasons[r] is None], dtype=np.int64)
    return out, good, reasons


def object_ids_of(batch, id_column: str | None) -> list[str | None]:
    """The id column of a record batch as strings (None when the source has no id column)."""
    if id_column is None:
        return [None] * batch.num_rows
    return [None if v is None else str(v) for v in batch.column(batch.schema.get_field_index(id_column)).to_pylist()]


def read_source_flux(section: dict, rows, bands: list[str], crop: int | None = None,
                     moved_to: str | Path | None = None, column: str | None = None) -> np.ndarray:
    """Re-read global source rows from a store manifest's source section: float32 [n, bands, S, S].

    Used by `astropt decode --compare`. A row that is bad in the source raises AstroptError. `moved_to`:
    see `plan_from_manifest`. `column`: another of the store's image columns than its first.
    """
    plan = plan_from_manifest(section, moved_to)
    if column is not None:  # read that image column alone
        plan.column, plan.extra_columns = column, []
    rows = np.asarray(rows, dtype=np.int64)
    side = crop or IMAGE_SIZE
    out = np.empty((len(rows), len(bands), side, side), dtype=np.float32)
    files = OpenFiles()  # each file opened once for all the rows, not once per row
    try:
        for k, g in enumerate(rows):
            if g < 0 or g >= plan.num_rows:
                raise AstroptError(f"source row {g} is outside the source's {plan.num_rows} rows")
            (task,) = read_tasks(plan, int(g), int(g) + 1)
            flux, good, reasons = batch_to_flux(read_task(plan, task, files), plan.column, bands, crop=crop)
            if not len(good):
                raise AstroptError(f"source row {g} is bad: {reasons[0]}")
            out[k] = flux[0]
    finally:
        files.close()
    return out


def _read_catalogue(section: dict, rows, column: str, kind: str, moved_to: str | Path | None):
    """Global source rows' values of catalogue `column` (a record batch of that column alone, in `rows` order):
    each row group holding some of the rows is read once (only that column's leaves), each file opened once."""
    import pyarrow as pa

    plan = plan_from_manifest(section, moved_to)
    if plan.catalogue.get(column) != kind:
        recorded = ", ".join(f"{c} ({k})" for c, k in plan.catalogue.items()) or "none"
        raise AstroptError(f"the store's source records no {kind} column {column!r} (its catalogue columns: "
                           f"{recorded})")
    rows = np.asarray(rows, dtype=np.int64)
    outside = rows[(rows < 0) | (rows >= plan.num_rows)]
    if len(outside):
        raise AstroptError(f"source row {int(outside[0])} is outside the source's {plan.num_rows} rows")
    tasks = read_tasks(plan, 0, plan.num_rows)  # one per row group, in row order
    firsts = np.array([t.first_row for t in tasks], dtype=np.int64)
    which = np.searchsorted(firsts, rows, side="right") - 1  # [n]: the row group of each row
    parts, order = [], []
    files = OpenFiles()
    try:
        for k in np.unique(which):
            task, here = tasks[k], np.nonzero(which == k)[0]
            f = plan.files[task.file]
            with _readable(f"source file {f.path}, row group {task.unit},"):
                reader = files.get(f)
                if f.row_group_rows is None:  # Arrow IPC: one record batch
                    unit = reader[task.unit]
                    check_catalogue_column(unit.schema, column, kind, f"source file {f.path}")
                    values = unit.column(unit.schema.get_field_index(column))
                else:
                    schema = reader.schema_arrow
                    check_catalogue_column(schema, column, kind, f"source file {f.path}")
                    leaves = [f"{column}.{leaf}" for leaf in spectrum_fields(schema.field(column).type)] \
                        if kind == "spectrum" else [column]
                    values = reader.read_row_group(task.unit, columns=leaves, use_threads=False).column(column)
                    values = values.combine_chunks()
            parts.append(values.take(pa.array(task.start + rows[here] - task.first_row)))
            order.append(here)
    finally:
        files.close()
    if not parts:
        return pa.record_batch([pa.array([], type=pa.float64())], names=[column])
    joined = pa.concat_arrays(parts).take(pa.array(np.argsort(np.concatenate(order), kind="stable")))
    return pa.record_batch([joined], names=[column])


def read_source_values(section: dict, rows, column: str, moved_to: str | Path | None = None) -> np.ndarray:
    """The catalogue numbers of scalar `column` at global source rows, from a store manifest's source section:
    float64 [n], NaN where the source holds null (the truth a store's scalar tokens are scored against).
    `moved_to`: see `plan_from_manifest`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    batch = _read_catalogue(section, rows, column, "scalar", moved_to)
    return np.asarray(pc.cast(batch.column(0), pa.float64(), safe=False).to_numpy(zero_copy_only=False),
                      dtype=np.float64)  # nulls -> NaN


def read_source_spectra(section: dict, rows, column: str, moved_to: str | Path | None = None
                        ) -> list[dict | None]:
    """The spectra of catalogue `column` at global source rows: per row {"flux", "ivar", "mask", "wavelength"}
    (float32 [L] each, mask True = bad; its own pixels only), or None for a row the tokeniser would reject
    (null, no good pixels...; see `batch_to_spectrum`)."""
    batch = _read_catalogue(section, rows, column, "spectrum", moved_to)
    if not batch.num_rows:
        return []
    spectra, good, _ = batch_to_spectrum(batch, column)  # [n, 4, L]
    out: list[dict | None] = [None] * batch.num_rows
    for r in good:
        length = int(np.isfinite(spectra[r, 3]).sum())  # padding has no wavelength
        flux, ivar, mask, wavelength = spectra[r, :, :length]
        out[r] = {"flux": flux, "ivar": ivar, "mask": mask != 0, "wavelength": wavelength}
    return out
