"""The tokenise pipeline: source rows -> checked float32 flux -> AION codec on the device -> checked tokens
-> shards. Each shard is an independent unit of work: a rerun skips the done ones, and processes under
torchrun or a SLURM array split the shards between them (the executor is `shards_for_this_process`).

Follow one galaxy: in a reader process, `source.read_task` reads its row group and `source.batch_to_flux`
turns its image column into a [bands, 96, 96] crop in `--bands` order; the staging thread (`_Staged`) puts
it into a codec-sized batch in pinned memory; on the main thread `Encoder.submit` runs the codec and
`encode_shard` checks its 576 tokens; the writer thread's `write_encoded_shard` puts them in the row of its
shard.

Modules, one job each: `stages` (reading ahead of the codec), `encoder` (the codec and its checks),
`executor` (processes, devices, who creates the store), `store` (the format); this one wires them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from astropt_tok import store as st
from astropt_tok.codec import DEFAULT_CODEC
from astropt_tok.encoder import (PRECISIONS, EncodedShard, Encoder, ModalityEncoders, ScalarEncoder, SpectrumEncoder,
                                 encode_shard)
from astropt_tok.artifacts import output_folder, store_lineage, update_lineage
from astropt_tok.errors import AstroptError, Interrupted
from astropt_tok.lock import folder_lock
from astropt_tok.executor import (await_replaced_store, check_rerun, check_source_unchanged, default_workers,
                                  launch_of, prepare_store, remove_stale_temporaries, resolve_device,
                                  shards_for_this_process)
from astropt_tok.launch import DEFAULT_DIST_TIMEOUT_S, RankGroup, dist_timeout
from astropt_tok.source import DEFAULT_SOURCE
from astropt_tok.stages import SourceModality, modalities_of, prepare_shards



@dataclass
class TokeniseConfig:
    """Everything `astropt tokenise` needs; the CLI maps its flags onto these fields."""

    source: str = DEFAULT_SOURCE
    out: str = "data/tokens"
    shards: int = 256
    codec: str = DEFAULT_CODEC
    column: str = "legacysurvey_image"
    bands: tuple[str, ...] = ("DES-G", "DES-R", "DES-I", "DES-Z")
    # several image columns of the same galaxies, one token column each: ((column, bands), ...); two or more
    # replace `column`/`bands` (one is the same as setting those)
    modalities: tuple[tuple[str, tuple[str, ...]], ...] = ()
    keep_partial: bool = False  # several columns: keep a row when at least one image is good (others marked)
    # catalogue columns beside the images, a token column each: ((column, AION modality class name), ...)
    scalars: tuple[tuple[str, str], ...] = ()  # --scalar COLUMN:MODALITY (Z, LegacySurveyFluxG, ...): 1 token
    spectra: tuple[tuple[str, str], ...] = ()  # --spectrum COLUMN:MODALITY (DESISpectrum, SDSSSpectrum)
    split: str = "train"
    batch_size: int = 64
    device: str = "auto"
    storage: str = "arrow"  # --format
    limit: int | None = None
    workers: int | None = None  # processes reading row groups ahead of the codec; None: see default_workers
    id_column: str | None = "object_id"
    strict: bool = False
    overwrite: bool = False
    precision: str = "fp32"
    reader: str = "pyarrow"  # or "datasets": the `datasets` streaming reader
    progress: bool = True
    overwrite_wait_s: float = 1800.0  # SLURM array tasks > 0 with --overwrite wait this long for task 0
    # executor: None -> from the environment (torchrun's RANK/WORLD_SIZE or a SLURM array)
    rank: int | None = None
    world_size: int | None = None
    dist_timeout: float = DEFAULT_DIST_TIMEOUT_S  # torchrun: seconds to wait for the other ranks to join


@dataclass
class ShardResult:
    """What one process did to one shard."""

    index: int
    rows: int
    rejected: int
    skipped: bool  # already complete from an earlier run
    seconds: float = 0.0  # the codec's thread on this shard, waits for input included
    input_wait_s: float = 0.0  # of `seconds`, the codec's thread waiting for its next batch
    write_s: float = 0.0  # the writer thread writing the shard and its completion record (overlaps the next)


@dataclass
class TokeniseSummary:
    """The outcome of one process's `tokenise` call."""

    out: str
    num_shards: int
    my_shards: list[int]
    results: list[ShardResult] = field(default_factory=list)
    complete: bool = False
    rows_per_s: float = 0.0
    seconds: float = 0.0
    device: str = "cpu"
    precision: str = "fp32"
    work_s: float = 0.0  # wall time of reading, encoding and writing this process's shards
    first_batch_s: float = 0.0  # start-up: from the readers' start until the first batch was ready
    first_wait_s: float = 0.0  # of which the codec's thread spent waiting for that batch
    first_encoded_s: float = 0.0  # from the call's start until the first batch's tokens were back (start-up)

    def check_usable(self) -> None:
        """AstroptError when the finished store holds no galaxy because every row was rejected: a systematic
        mistake (bands or a column the source lacks, a broken codec) rather than bad rows, which a 0-row store
        marked complete would otherwise hide behind exit code 0."""
        if not self.complete:
            return
        totals = st.read_manifest(Path(self.out)).get("totals") or {}
        if totals.get("rows") == 0 and totals.get("rejected", 0) > 0:
            first = ""
            with contextlib.suppress(OSError, ValueError, IndexError):
                first = json.loads((Path(self.out) / st.REJECTS).read_text().splitlines()[0]).get("reason", "")
            raise AstroptError(f"every one of the {totals['rejected']:,} source rows was rejected, so {self.out} holds "
                               f"no galaxy (first reason: {first or 'see ' + st.REJECTS}); check --column/--bands "
                               f"and --codec against the source, then re-run with --overwrite")

    @property
    def input_wait_s(self) -> float:
        """Seconds the codec's thread waited for input after the first batch: high means raise --workers."""
        return sum(r.input_wait_s for r in self.results if not r.skipped) - self.first_wait_s

    @property
    def steady_s(self) -> float:
        """Seconds of work after the first batch was ready."""
        return self.work_s - self.first_batch_s

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.results if not r.skipped)

    @property
    def rejected(self) -> int:
        return sum(r.rejected for r in self.results if not r.skipped)



def store_lineage_of(manifest: dict) -> dict:
    """A token store's lineage record: codec {id, weights_sha256, vocab_size}, modalities {name: bands},
    id_column, and the source it was read from."""
    source = manifest.get("source") or {}
    return {**store_lineage(manifest), "source": {"id": source.get("id"), "split": source.get("split")}}


def _record_fits(shard: dict, lo: int, hi: int) -> bool:
    """A completion record belongs to the shard of source rows [lo, hi): the rows it records lie inside (a
    record without a row range, of format 1 or of an empty shard, is trusted)."""
    if shard.get("first_row") is None:
        return True
    return lo <= shard["first_row"] <= shard["last_row"] < hi


def _band_list(text: str) -> tuple[str, ...]:
    return tuple(b.strip() for b in text.split(",") if b.strip())


def parse_columns(columns: list[str], bands: str | None) -> tuple[str, tuple[str, ...], tuple]:
    """The --column values (and --bands) -> (column, bands, modalities): `COLUMN` with --bands is one column;
    `COLUMN:BAND,BAND` (repeatable) names each image column with its own bands."""
    default = ("DES-G", "DES-R", "DES-I", "DES-Z")
    if len(columns) == 1 and ":" not in columns[0]:
        return columns[0], _band_list(bands) if bands is not None else default, ()
    if bands is not None:
        raise AstroptError("--bands goes with a single --column NAME; give several as --column NAME:BAND,BAND,...")
    modalities = []
    for entry in columns:
        name, sep, its_bands = entry.partition(":")
        if not sep or not name.strip() or ":" in its_bands or not _band_list(its_bands):
            raise AstroptError(f"--column {entry!r}: with several image columns each is NAME:BAND,BAND,... "
                               "(e.g. hsc_image:HSC-G,HSC-R,HSC-I,HSC-Z,HSC-Y)")
        modalities.append((name.strip(), _band_list(its_bands)))
    return modalities[0][0], modalities[0][1], tuple(modalities)


def write_encoded_shard(encoded: EncodedShard, out: Path, storage: str, ranges: bool = False) -> ShardResult:
    """Write a shard and its completion record atomically (temporary name, fsync, rename). `ranges`: record
    each token column's range (a store of several kinds of modality)."""
    t0 = time.perf_counter()
    remove_stale_temporaries(out, encoded.index)
    record = st.write_shard(out, encoded.index, storage, encoded.tokens, encoded.rows, encoded.object_ids,
                            rejected=len(encoded.rejects), valid=encoded.valid, ranges=ranges)
    st.mark_shard_done(out, record, encoded.rejects)
    write_s = time.perf_counter() - t0
    return ShardResult(encoded.index, record.rows, len(encoded.rejects), False, encoded.seconds,
                       encoded.input_wait_s, write_s)



# ---------------------------------------------------------------------------------------------------------
# the whole job


def tokenise(cfg: TokeniseConfig) -> TokeniseSummary:
    """Tokenise this process's shards of the source into the store at `cfg.out`; finalize when all are done."""
    from astropt_tok.codec import load_image_codec
    from astropt_tok.source import resolve_source

    t_start = time.perf_counter()
    if cfg.storage not in st.STORAGES:
        raise AstroptError(f"--format must be one of {', '.join(st.STORAGES)}, got {cfg.storage!r}")
    if cfg.batch_size < 1:
        raise AstroptError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.workers is not None and cfg.workers < 0:
        raise AstroptError(f"--workers must be 0 (read in this process) or more, got {cfg.workers}")
    if cfg.reader not in ("pyarrow", "datasets"):
        raise AstroptError(f"--reader must be pyarrow or datasets, got {cfg.reader!r}")
    timeout = dist_timeout(cfg.dist_timeout)
    if cfg.precision not in PRECISIONS:  # before the store's manifest is written
        raise AstroptError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if len(cfg.modalities) == 1:  # one COLUMN:BANDS is the one-column store
        (column, one_bands), = cfg.modalities
        cfg = dataclasses.replace(cfg, column=column, bands=tuple(one_bands), modalities=())
    catalogue = _catalogue_of(cfg)  # [(column, AionModality)] of --scalar and --spectrum
    modalities = modalities_of(cfg)  # [(column, bands)] when several
    if catalogue and not modalities:  # one image column beside catalogue columns: a token column each
        modalities = [(cfg.column, tuple(cfg.bands))]
    if cfg.keep_partial and len(modalities) + len(catalogue) < 2:
        raise AstroptError("--keep-partial needs several columns (--column NAME:BANDS twice or more, or --scalar "
                           "or --spectrum beside an image column)")
    if modalities:
        names = [c for c, _ in modalities] + [c for c, _ in catalogue]
        twice = sorted({c for c in names if names.count(c) > 1})
        if twice:
            raise AstroptError(f"column {twice[0]!r} is named twice among --column, --scalar and --spectrum; "
                               "give each source column once")
        reserved = [c for c in names if c in st.RESERVED_COLUMNS or c.endswith("_valid")]
        if reserved:
            raise AstroptError(f"column {reserved[0]!r} clashes with a store column name; rename it")
        cfg = dataclasses.replace(cfg, column=names[0], bands=tuple(modalities[0][1]))
    bands = list(cfg.bands)
    from aion.codecs.preprocessing.band_to_index import BAND_TO_INDEX

    for column, its_bands in modalities or [(cfg.column, bands)]:
        unknown = [b for b in its_bands if b not in BAND_TO_INDEX]
        if not its_bands or unknown or len({b.split("-")[0] for b in its_bands}) != 1:
            what = f"the bands of --column {column}" if modalities else "--bands"
            raise AstroptError(f"{what} must be bands of one survey known to AION ({', '.join(BAND_TO_INDEX)}); "
                               f"got {','.join(its_bands)}")
        repeated = sorted({b for b in its_bands if list(its_bands).count(b) > 1})
        if repeated:
            what = f"the bands of --column {column} name" if modalities else "--bands names"
            raise AstroptError(f"{what} {','.join(repeated)} more than once; give each band once")
    launch = launch_of(cfg)  # the launch variables, checked
    rank, world = launch.rank, launch.world_size
    device = resolve_device(cfg.device, launch)  # before any work: also refuses more torchrun processes than GPUs
    # Under torchrun the ranks meet first, before any slow work, so a stale environment is one error within
    # --dist-timeout; reading the source and loading the codec (their times differ per rank) come after.
    with RankGroup(launch).join("gloo", timeout) as group:
        plan = resolve_source(cfg.source, cfg.split, cfg.column, cfg.id_column, cfg.limit,
                              extra_columns=[c for c, _ in modalities[1:]],
                              catalogue={c: m.kind for c, m in catalogue})
        if cfg.workers is None:
            cfg = dataclasses.replace(cfg, workers=default_workers(device, launch.processes_per_node))
        loaded = load_image_codec(cfg.codec, device=device)
        from astropt_tok.codec import load_codec

        # catalogue codecs from the same snapshot: scalars are table lookups, encoded on the host
        loaded_catalogue = {c: load_codec(cfg.codec, m.name, device=device if m.kind == "spectrum" else "cpu")
                            for c, m in catalogue}
        out = Path(cfg.out)
        entries = _modality_entries(modalities, catalogue, loaded, loaded_catalogue)
        manifest = st.new_manifest(loaded.describe(), bands, cfg.storage, cfg.shards, cfg.precision,
                                   plan.describe(), modalities=entries or None, keep_partial=cfg.keep_partial)
        # The store folder is claimed before anything is written (a folder of another kind, or of files no
        # command made, is refused even with --overwrite), under its lock: two uncoordinated runs on one store are
        # refused, the processes of one job (world > 1) share it, and claiming a store of its kind is harmless.
        with output_folder(out, "token-store", "`astropt tokenise`", lineage=store_lineage_of(manifest),
                           shared=world > 1):
            try:
                return _tokenise(cfg, out, manifest, plan, loaded, device, bands, modalities, rank, world,
                                 group, t_start, catalogue, loaded_catalogue)
            except KeyboardInterrupt:  # Ctrl-C: say what is kept and how to go on (one line, no traceback)
                raise Interrupted(_resume_line(out, cfg)) from None


def _catalogue_of(cfg: TokeniseConfig) -> list:
    """[(column, AionModality)] of the run's --scalar and --spectrum columns, each modality checked to be of
    its flag's kind."""
    from astropt_tok.codec import aion_modality

    return ([(c, aion_modality(m, "scalar", "--scalar")) for c, m in cfg.scalars]
            + [(c, aion_modality(m, "spectrum", "--spectrum")) for c, m in cfg.spectra])


def _modality_entries(modalities, catalogue, loaded, loaded_catalogue) -> list[dict]:
    """The manifest's modality entries: image columns {name, column, bands} (format version 3), or, with
    catalogue columns, every column with its kind, AION modality, codec, vocabulary, length and dtype (4)."""
    if not catalogue:
        return [{"name": c, "column": c, "bands": list(b)} for c, b in modalities]

    def entry(column, kind, bands, aion, codec):
        return {"name": column, "column": column, "kind": kind, "bands": list(bands), "aion_modality": aion,
                "codec": codec.describe_modality(), "vocab_size": codec.vocab_size,
                "tokens_per_object": codec.tokens_per_object, "dtype": st.token_dtype(codec.vocab_size).name}

    images = [entry(c, "image", b, "HSCImage" if b[0].startswith("HSC") else "LegacySurveyImage", loaded)
              for c, b in modalities]
    return images + [entry(c, m.kind, (), m.name, loaded_catalogue[c]) for c, m in catalogue]


def _resume_line(out: Path, cfg: TokeniseConfig) -> str:
    """What an interrupted tokenise kept, and how to finish the store."""
    try:
        complete = len(st.read_done_records(out, cfg.shards, cfg.storage))
    except (AstroptError, OSError, ValueError):  # interrupted before the store was prepared: no shard count
        return f"run the same command again to resume {out} (every finished shard is kept)"
    return (f"{complete} of {cfg.shards} shards of {out} are complete and kept; run the same command again to "
            "resume (it redoes only the shards not yet complete)")


def finalize(out_dir) -> None:
    """`astropt verify --finalize`: complete the manifest of a store whose shards separate processes all wrote,
    holding the store's lock (a tokenise or another finalize at work there is one error)."""
    from astropt_tok.source import check_recorded_files

    out = Path(out_dir)
    if st.read_manifest(out).get("complete"):
        return
    with folder_lock(out, "`astropt verify --finalize`"):
        manifest = st.read_manifest(out)  # again, under the lock: another finalize may have just completed it
        if manifest.get("complete"):
            return
        note = check_recorded_files(manifest["source"])  # refuses a source that changed meanwhile
        if note:
            print(f"note: {note}", file=sys.stderr)
        if st.finalize_store(out, manifest) is None:
            raise AstroptError(f"{out}: not every shard is done yet; re-run `astropt tokenise` to finish them")


def _tokenise(cfg, out, manifest, plan, loaded, device, bands, modalities, rank, world, group,
              t_start, catalogue=(), loaded_catalogue=None) -> TokeniseSummary:
    if rank != 0 and not group.active and cfg.overwrite:
        await_replaced_store(out, manifest, cfg.overwrite_wait_s)  # task 0 of the array replaces it
    elif rank == 0 or not group.active:  # SLURM array tasks each check (or create) the store themselves
        prepare_store(out, manifest, cfg.overwrite)
        update_lineage(out, **store_lineage_of(manifest))  # a replaced store: what it is made from now
    group.wait_for_all("the store to be created or checked by rank 0")  # under torchrun, the others look after it
    if rank != 0 and group.active:
        existing = st.read_manifest(out)
        diff = check_rerun(existing, manifest)
        if diff:
            raise AstroptError(f"{out} holds a store made with a different {', '.join(diff)}")
        check_source_unchanged(out, existing, manifest)
    bounds = st.shard_bounds(plan.num_rows, cfg.shards)
    mine = shards_for_this_process(cfg.shards, rank, world)
    done = {i: rec for i, rec in st.read_done_records(out, cfg.shards, cfg.storage).items()
            if _record_fits(rec["shard"], bounds[i], bounds[i + 1])}
    summary = TokeniseSummary(str(out), cfg.shards, mine, device=device, precision=cfg.precision)
    encoder = (_encoders(loaded, device, cfg.precision, modalities, catalogue, loaded_catalogue) if modalities
               else Encoder(loaded, device, cfg.precision, bands))
    # what the readers make of each column: images in their bands, scalars checked against a fixed grid
    sources = [SourceModality(c, "image", tuple(b)) for c, b in modalities] + [
        SourceModality(c, m.kind, value_range=loaded_catalogue[c].value_range) for c, m in catalogue]
    ranges = bool(catalogue)  # a version-4 store records each column's token range

    todo = [i for i in mine if i not in done]
    for i in mine:
        if i in done:
            s = done[i]["shard"]
            summary.results.append(ShardResult(i, s["rows"], s["rejected"], True))
    total_rows = sum(bounds[i + 1] - bounds[i] for i in todo)
    with _Progress(cfg.progress and rank == 0, total_rows, len(mine), len(mine) - len(todo),
                   loaded.tokens_per_image) as progress:
        pin = encoder.device.type == "cuda"
        work = prepare_shards(plan, [(i, bounds[i], bounds[i + 1]) for i in todo], cfg, pin, sources or None)
        t_work = time.perf_counter()

        def first_batch(waited: float) -> None:
            if not summary.first_batch_s:
                summary.first_batch_s, summary.first_wait_s = time.perf_counter() - t_work, waited

        def first_encoded() -> None:
            if not summary.first_encoded_s:
                summary.first_encoded_s = time.perf_counter() - t_start

        # A writer thread writes (hashes, fsyncs) each shard while the codec encodes the next; one write at a
        # time is pending, so at most two shards' tokens are held in memory.
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="astropt-writer")
        pending = None

        def finish_pending() -> None:
            summary.results.append(pending.result())
            progress.shard_done()

        try:
            for i, batches in work:
                encoded = encode_shard(batches, encoder, cfg, i, plan.id_column is not None,
                                       progress.advance, first_batch, first_encoded)
                if pending is not None:
                    finish_pending()
                pending = writer.submit(write_encoded_shard, encoded, out, cfg.storage, ranges)
            if pending is not None:
                finish_pending()
        finally:
            work.close()  # stops the reader processes and the staging thread, also after an error
            writer.shutdown(wait=True)  # a shard encoded in full is still written
        summary.work_s = time.perf_counter() - t_work
    summary.results.sort(key=lambda r: r.index)
    # Every rank's shards are written before anyone checks whether the store is complete. Ranks may finish
    # hours apart (a rerun where one rank's shards were done): this is RankGroup's long wait, not a collective
    # under --dist-timeout.
    group.wait_for_all("every rank to finish its shards")
    group.close()
    final = st.finalize_store(out, st.read_manifest(out) if (out / st.MANIFEST).is_file() else manifest)
    summary.complete = final is not None
    summary.seconds = time.perf_counter() - t_start
    summary.rows_per_s = (summary.rows + summary.rejected) / summary.work_s if summary.work_s else 0.0
    return summary



def _encoders(loaded, device, precision, modalities, catalogue, loaded_catalogue) -> ModalityEncoders:
    """One encoder per token column: the image columns share the image codec; each catalogue column has its own
    codec (and so its own token dtype)."""
    encoders = {c: Encoder(loaded, device, precision, list(b)) for c, b in modalities}
    for column, modality in catalogue:
        codec = loaded_catalogue[column]
        encoders[column] = (ScalarEncoder(codec, modality.cls) if modality.kind == "scalar"
                             else SpectrumEncoder(codec, device, precision, modality.cls))
    return ModalityEncoders(encoders)


class _Progress:
    """A rich progress bar (rows/s, tokens/s, shards done, ETA) on a terminal, or nothing when not wanted."""

    def __init__(self, enabled: bool, total_rows: int, total_shards: int, done_shards: int, tokens_per_image: int):
        self.enabled = enabled and total_rows > 0 and sys.stdout.isatty()  # a live bar; none in pipes and log files
        self.tokens_per_image = tokens_per_image
        self.total_shards, self.done_shards = total_shards, done_shards
        self.t0 = time.perf_counter()
        self.rows = 0
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]tokenise"), BarColumn(), TextColumn("{task.completed}/{task.total} rows"),
                TextColumn("{task.fields[rate]}"), TextColumn("shards {task.fields[shards]}"),
                TimeElapsedColumn(), TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("tokenise", total=total_rows, rate="", shards=self._shards())

    def _shards(self) -> str:
        return f"{self.done_shards}/{self.total_shards}"

    def __enter__(self):
        if self.enabled:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()

    def advance(self, rows: int) -> None:
        self.rows += rows
        if self.enabled:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            rate = f"{self.rows / dt:,.1f} rows/s {self.rows * self.tokens_per_image / dt:,.0f} tok/s"
            self.bar.update(self.task, advance=rows, rate=rate)

    def shard_done(self) -> None:
        self.done_shards += 1
        if self.enabled:
            self.bar.update(self.task, shards=self._shards())
