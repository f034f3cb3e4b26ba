"""`astropt tokenise`: flags -> TokeniseConfig -> astropt_tok.tokenise.tokenise."""

from __future__ import annotations

from typing import List, Optional

import typer

from astropt_tok.codec import DEFAULT_CODEC
from astropt_tok.launch import DEFAULT_DIST_TIMEOUT_S
from astropt_tok.source import DEFAULT_SOURCE


def register(app: typer.Typer) -> None:
    """Add the `tokenise` command to the app."""

    @app.command(epilog="Example: astropt tokenise --source data/survey --out data/tokens --shards 256 --batch-size 256")
    def tokenise(
        source: str = typer.Option(DEFAULT_SOURCE, "--source", help="Hub dataset id, or a local folder/file/glob of parquet or arrow files in the Legacy Survey schema."),
        out: str = typer.Option("data/tokens", "--out", help="Token store folder to write."),
        shards: int = typer.Option(..., "--shards", help="Number of shards (independent units of work; e.g. 256)."),
        codec: str = typer.Option(DEFAULT_CODEC, "--codec", help="AION codec: hub id or a local snapshot in the hub layout (codecs/image/...)."),
        column: List[str] = typer.Option(["legacysurvey_image"], "--column", help="Image column: a struct with 'band' and 'flux'. Several surveys of each galaxy in one store: repeat as COLUMN:BAND,BAND,... (e.g. --column legacysurvey_image:DES-G,DES-R,DES-I,DES-Z --column hsc_image:HSC-G,HSC-R,HSC-I,HSC-Z,HSC-Y); one token column each."),
        bands: Optional[str] = typer.Option(None, "--bands", help="Bands of a single --column, in the channel order given to the codec [default: DES-G,DES-R,DES-I,DES-Z]."),
        scalar: List[str] = typer.Option([], "--scalar", help="A catalogue column beside the images, as COLUMN:MODALITY with MODALITY an AION scalar modality (e.g. --scalar Z:Z --scalar FLUX_G:LegacySurveyFluxG); its codec is read from --codec's codecs/<name>/. One token per galaxy, in a token column named after COLUMN. Repeatable."),
        spectrum: List[str] = typer.Option([], "--spectrum", help="A spectrum column beside the images, as COLUMN:MODALITY (DESISpectrum or SDSSSpectrum): a struct of flux, ivar, mask and wavelength (or lambda) lists; its codec is --codec's codecs/spectrum/. Repeatable."),
        keep_partial: bool = typer.Option(False, "--keep-partial", help="Several columns (--column twice, or --scalar/--spectrum): keep a row when at least one of its columns is good; the others are zeros, marked False in <column>_valid (training, embed and decode never read them)."),
        split: str = typer.Option("train", "--split", help="Dataset split."),
        batch_size: int = typer.Option(64, "--batch-size", help="Images per codec call (use 256+ on a GPU)."),
        device: str = typer.Option("auto", "--device", help="auto, cuda, cuda:N or cpu."),
        storage: str = typer.Option("arrow", "--format", help="Shard format: arrow (IPC stream, memory-mappable) or zarr (v3)."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Tokenise only the first ROWS rows of the source."),
        workers: Optional[int] = typer.Option(None, "--workers", help="Processes reading and decoding parquet row groups ahead of the codec [default: min(8, cores - 1) on a GPU, 0 (in-process) on a CPU]."),
        id_column: str = typer.Option("object_id", "--id-column", help="Column copied into the store as object_id (skipped when absent)."),
        strict: bool = typer.Option(False, "--strict", help="Stop at the first bad row instead of skipping it into rejects.jsonl."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store made with a different codec, bands, shard count or source: clears only a token store's own files (manifest, shards, completion records, rejects), never another kind of folder or files it did not write."),
        precision: str = typer.Option("fp32", "--precision", help="Codec precision: fp32, tf32, bf16 or fp16 (recorded in the manifest)."),
        reader: str = typer.Option("pyarrow", "--reader", help="pyarrow (direct, fastest) or datasets (streaming IterableDataset)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a live progress bar."),
        dist_timeout: float = typer.Option(DEFAULT_DIST_TIMEOUT_S, "--dist-timeout", help="Under torchrun: seconds each rank waits "
                                           "for the others to join the process group before giving up with an "
                                           "error (a stale RANK/WORLD_SIZE in the shell); waits for other ranks' "
                                           "shards are not limited by it."),
    ) -> None:
        """Stream a survey through the AION image codec into a sharded int16 token store.

        Deterministic and resumable: re-running the same command skips complete shards. Under torchrun
        (RANK/WORLD_SIZE) or a SLURM array (SLURM_ARRAY_TASK_ID/COUNT) each process takes its own shards.
        """
        from astropt_tok.report import print_tokenise_summary
        from astropt_tok.codec import parse_modality_pairs
        from astropt_tok.tokenise import TokeniseConfig, parse_columns, tokenise as run

        single, band_list, modalities = parse_columns(column, bands)
        cfg = TokeniseConfig(
            source=source, out=out, shards=shards, codec=codec, column=single, bands=band_list,
            modalities=modalities, keep_partial=keep_partial, scalars=parse_modality_pairs(scalar, "--scalar"),
            spectra=parse_modality_pairs(spectrum, "--spectrum"), split=split, batch_size=batch_size,
            device=device, storage=storage, limit=limit, workers=workers, id_column=id_column or None,
            strict=strict, overwrite=overwrite, precision=precision, reader=reader, progress=progress,
            dist_timeout=dist_timeout,
        )
        summary = run(cfg)
        print_tokenise_summary(summary)
        summary.check_usable()
