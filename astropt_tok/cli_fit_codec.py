"""`astropt fit-codec`: flags -> FitCodecConfig -> astropt_tok.fit_codec.fit_codec."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the `fit-codec` command to the app."""

    @app.command("fit-codec", epilog="Example: astropt fit-codec --source data/survey --out models/my-codec --steps 3000")
    def fit_codec_command(
        source: str = typer.Option(..., "--source", help="Survey to fit: a local folder/file/glob of parquet or arrow files in the Legacy Survey schema, or a hub dataset id."),
        out: Path = typer.Option(..., "--out", help="Codec folder to write (hub layout: codecs/image/config.json + model.safetensors)."),
        column: List[str] = typer.Option(["legacysurvey_image"], "--column", help="Image column: a struct with 'band' and 'flux'. Several surveys for one codec: repeat as COLUMN:BAND,BAND,... (e.g. --column legacysurvey_image:DES-G,DES-R,DES-I,DES-Z --column hsc_image:HSC-G,HSC-R,HSC-I,HSC-Z,HSC-Y); each step then takes a batch of each."),
        bands: Optional[str] = typer.Option(None, "--bands", help="Bands of a single --column, one survey, in channel order [default: DES-G,DES-R,DES-I,DES-Z]."),
        split: str = typer.Option("train", "--split", help="Dataset split."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Read only the first ROWS rows (all are held in memory)."),
        init: Optional[str] = typer.Option(None, "--init", help="Start from this codec (folder or hub id, e.g. polymathic-ai/aion-base) instead of random weights; its sizes are kept."),
        hidden: int = typer.Option(32, "--hidden", help="Hidden width of the codec's autoencoder (aion-base: 512)."),
        projection: int = typer.Option(12, "--projection", help="Channels of the multi-survey band projection (aion-base: 54)."),
        layers: int = typer.Option(1, "--layers", help="Residual layers per compression stage (aion-base: 4)."),
        steps: int = typer.Option(2000, "--steps", help="Optimiser steps."),
        batch_size: int = typer.Option(16, "--batch-size", help="Galaxies per step."),
        lr: float = typer.Option(2e-3, "--lr", help="Peak learning rate (warmup, then cosine to lr/20)."),
        warmup: int = typer.Option(100, "--warmup", help="Linear warmup steps."),
        colour_weight: float = typer.Option(0.0, "--colour-weight", help="Add a colour term (each band's central-aperture flux as a fraction of the galaxy's, against the original) with this weight; 0 = pixel losses only."),
        holdout: float = typer.Option(0.1, "--holdout", help="Fraction of rows kept out of training for the report."),
        seed: int = typer.Option(0, "--seed", help="Seed for the initial weights, held-out rows and batches."),
        device: str = typer.Option("auto", "--device", help="auto, cuda or cpu."),
        resume: bool = typer.Option(False, "--resume", help="Continue the fit checkpointed in --out (fit-state.pt)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace the codec already in --out: clears its own files (codecs/, fit_report.json, fit-state.pt, MODEL.md), never another kind of folder or files it did not write."),
        threads: Optional[int] = typer.Option(None, "--threads", help="Torch CPU threads (default: torch's; 1 is often fastest on a busy small CPU)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress on stderr: a bar on a terminal, else a line (step, loss) every tenth of the steps."),
        scalar: List[str] = typer.Option([], "--scalar", help="Also fit AION's codec of a catalogue scalar to a numeric column, as COLUMN:MODALITY with MODALITY an AION scalar modality class (e.g. --scalar redshift:Z --scalar FLUX_G:LegacySurveyFluxG); written as codecs/<name>/ beside the image codec. Repeatable; all read in one pass."),
        scalar_codebook: int = typer.Option(1024, "--scalar-codebook", help="Codes per scalar codec (AION's: 1024)."),
        image: bool = typer.Option(True, "--image/--no-image", help="--no-image: fit only the --scalar codecs, into a new folder or beside the image codec already in --out (left as it is)."),
    ) -> None:
        """Fit a small real AION ImageCodec to a survey and save it in the hub layout, usable as --codec DIR.

        Reports per-band MSE, explained variance and PSNR of encode -> tokens -> decode on held-out galaxies,
        beside an all-zero and an image-mean reconstruction; writes DIR/fit_report.json. With --scalar, also
        fits AION's scalar codecs (redshift, fluxes, ...) to catalogue columns, in seconds.
        """
        from astropt_tok.codec import parse_modality_pairs
        from astropt_tok.fit_codec import FitCodecConfig, fit_codec
        from astropt_tok.report import print_reconstruction_table
        from astropt_tok.executor import torch_threads
        from astropt_tok.tokenise import parse_columns

        single, band_list, modalities = parse_columns(column, bands)
        if len(modalities) == 1:  # one COLUMN:BANDS is the one-column fit
            (single, band_list), modalities = modalities[0], ()
        cfg = FitCodecConfig(
            source=source, out=out, init=init, bands=tuple(band_list), column=single, modalities=modalities,
            split=split, limit=limit, hidden=hidden, projection=projection, layers=layers, steps=steps,
            batch_size=batch_size, lr=lr, warmup=warmup, colour_weight=colour_weight, holdout=holdout, seed=seed, device=device, resume=resume, overwrite=overwrite,
            progress=progress, scalars=parse_modality_pairs(scalar, "--scalar"), scalar_codebook=scalar_codebook, image=image,
        )
        if threads is not None and threads < 1:
            from astropt_tok.errors import AstroptError

            raise AstroptError(f"--threads must be at least 1, got {threads}")
        with torch_threads(threads):
            result = fit_codec(cfg)
        if result.already_finished:  # the image codec is the finished fit's (scalar codecs may have been written)
            what = "the image codec is unchanged" if result.scalars else "nothing changed"
            typer.echo(f"fit already finished at step {result.steps}; raise --steps to continue ({what})")
        for name, s in result.scalars.items():
            typer.echo(f"{s['folder']}: {s['codec_class']} of column {s['column']} ({name}), {s['values']} values"
                       f" ({s['ignored_not_finite']} null or not finite left out), {s['config']['codebook_size']} codes"
                       f" over {s['codec_range'][0]:.4g}..{s['codec_range'][1]:.4g}")
        if not image:
            typer.echo(f"wrote {len(result.scalars)} scalar codec(s) into {result.out}; report in "
                       f"{result.out / 'fit_report.json'}")
            return
        if len(result.reports) > 1:
            for name, report in result.reports.items():
                print_reconstruction_table(report, title=f"{name}: held-out reconstruction")
        else:
            print_reconstruction_table(result.report, title=f"held-out reconstruction ({result.heldout_rows} galaxies)")
        done = "" if result.already_finished else "wrote "
        typer.echo(f"{done}{result.out} (use it with --codec {result.out}); report in {result.out / 'fit_report.json'}")
