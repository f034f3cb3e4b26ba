"""`astropt decode` and `astropt demo`: flags become a config dataclass, then one library call does the work.

Only typer and the standard library are imported here at start-up; torch, aion and friends load inside
the commands so `astropt --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _split(value: Optional[str]) -> Optional[list[str]]:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _store(tokens: Optional[Path]) -> Optional[Path]:
    """--tokens as a local folder: hf://datasets/ORG/NAME[@revision] is downloaded (once per node) and verified."""
    from astropt_tok.store_hub import resolve_store

    return None if tokens is None else resolve_store(tokens)


def decode_command(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG grid to write (default decoded.png; with --save-flux and no --out, no picture)."),
    tokens: Optional[Path] = typer.Option(None, "--tokens", help="Token store folder or hf://datasets/ORG/NAME[@revision] (default with --checkpoint: the store it was trained on)."),
    rows: Optional[str] = typer.Option(None, "--rows", help="Store rows: 0:16, 7, 1,5,9 or 0:4,10."),
    ids: Optional[str] = typer.Option(None, "--ids", help="Object ids, comma-separated."),
    random: Optional[int] = typer.Option(None, "--random", help="This many random stored rows (see --seed)."),
    seed: int = typer.Option(0, "--seed", help="Seed for --random and for sampling."),
    codec: Optional[str] = typer.Option(None, "--codec", help="Codec hub id or local folder (default: the checkpoint's, else the store's)."),
    accept_codec_change: bool = typer.Option(False, "--accept-codec-change", help="Decode with a codec whose weights differ from those that made the tokens (a codec folder refitted since); refused without it."),
    compare: bool = typer.Option(False, "--compare", help="Re-read the rows from the store's source: original | codec reconstruction; per-band MSE, explained variance and PSNR beside all-zero and image-mean baselines."),
    source: Optional[Path] = typer.Option(None, "--source", help="Folder where the store's source files are now, found by name (if they moved since tokenising)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Run or checkpoint folder of `astropt train`."),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: latest)."),
    generate: Optional[int] = typer.Option(None, "--generate", help="Sample this many galaxies from the model."),
    complete_from: Optional[int] = typer.Option(None, "--complete-from", help="Keep the first K tokens of each row; the model writes the rest."),
    predict: bool = typer.Option(False, "--predict", help="Teacher-forced argmax prediction beside each stored row."),
    modality: Optional[str] = typer.Option(None, "--modality", help="Which column of the store (modality of the model) to decode, e.g. hsc_image (default: the model's first, else the store's first); --bands and --rgb must be its bands. A scalar column lists its true and codec values; a spectrum column is decoded to flux beside the source."),
    given: Optional[str] = typer.Option(None, "--given", help="Cross-survey (a model trained on several columns): the modality whose stored tokens the model is given, e.g. legacysurvey_image."),
    generate_modality: Optional[str] = typer.Option(None, "--generate-modality", help="Cross-survey: the modality the model draws from them, e.g. hsc_image (beside its real image and codec reconstruction), a scalar such as redshift (true value, codec value, the model's median and 68% interval) or a spectrum (drawn beside the source and codec decode)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (0: greedy)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample among the k most likely tokens."),
    no_kv_cache: bool = typer.Option(False, "--no-kv-cache", help="Re-run the whole sequence per token (slow; for checking)."),
    bands: Optional[str] = typer.Option(None, "--bands", help="Bands of --save-flux, comma-separated, among those of the modality decoded (default: all of them)."),
    rgb: Optional[str] = typer.Option(None, "--rgb", help="Bands of the modality decoded shown as red, green, blue (default: z,r,g; HSC: i,r,g)."),
    save_flux: Optional[Path] = typer.Option(None, "--save-flux", help="Write decoded float32 flux [N, bands, 96, 96] as .npy or .fits."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto (cuda when available)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per decode / model batch."),
    tf32: bool = typer.Option(False, "--tf32", help="Let the codec decode in TF32 on a GPU (faster; flux differs from AION's fp32 decode by ~1e-3)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch CPU threads (default: 1 on a CPU of up to 4 cores, where it samples fastest; else torch's)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr while sampling and decoding (only on a terminal)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Decode tokens back to galaxies: stored rows (--compare: what the codec loses), or a model's predictions, completions and samples."""
    from astropt_train.use.decode import DecodeConfig, decode, summarise

    cfg = DecodeConfig(
        out=out, tokens=_store(tokens), rows=rows, ids=_split(ids), random=random, seed=seed, codec=codec,
        accept_codec_change=accept_codec_change, compare=compare,
        source=source, checkpoint=checkpoint, step=step, generate=generate, complete_from=complete_from, predict=predict,
        modality=modality, given=given, generate_modality=generate_modality,
        temperature=temperature, top_k=top_k, kv_cache=not no_kv_cache, bands=_split(bands),
        rgb_bands=None if rgb is None else tuple(_split(rgb)), save_flux=save_flux, device=device, batch_size=batch_size,
        tf32=tf32, threads=threads, progress=progress,
    )
    result = decode(cfg)
    summary = summarise(result)
    if json_out:
        from astropt_tok.health import dumps_finite

        typer.echo(dumps_finite(summary, indent=2))  # strict JSON for jq & co: a score that is no number is null
        return
    from astropt_tok.report import output_console

    from astropt_tok.report import print_reconstruction_table

    console = output_console()
    if result.kind != "image":
        _print_catalogue(result, console)
        return
    if result.out is not None:
        console.print(f"wrote [bold]{result.out}[/]: {len(result.labels)} galaxies ({' | '.join(result.columns)}), "
                      f"codec {result.codec_id}")
    if result.flux_path:
        console.print(f"wrote {result.flux_path}: float32 flux {list(result.flux.shape)}, bands {','.join(result.bands)}")
    if "reconstruction" in (result.metrics or {}):
        print_reconstruction_table(summary["metrics"]["reconstruction"], console=console,
                                   title=f"codec reconstruction vs original ({len(result.labels)} galaxies, 96x96 centre crop)")
    m = result.metrics or {}
    if "prediction" in m:
        console.print(f"teacher-forced next-token accuracy {m['prediction']['accuracy']:.4f}, "
                      f"loss {m['prediction']['loss']:.4f}")
    if "completion" in m:
        console.print(f"completion kept {m['completion']['kept']} tokens; "
                      f"{100 * m['completion']['token_agreement']:.2f}% of written tokens equal the stored ones")
    if "cross" in m:
        c = summary["metrics"]["cross"]
        for key, what in (("vs_original", f"drawn from {c['given']} vs the real image"),
                          ("reconstruction_vs_original", "codec reconstruction vs the real image (the ceiling)"),
                          ("vs_reconstruction", f"drawn from {c['given']} vs the codec reconstruction")):
            if key in c:
                print_reconstruction_table(c[key], console=console, title=f"{c['generated']}: {what} "
                                           f"({len(result.labels)} galaxies, 96x96 centre crop)")


def _print_catalogue(result, console) -> None:
    """A scalar column's table (id, true, codec value, model median and 68% interval) and scores, or where a
    spectrum picture went."""
    from astropt_tok.report import folding_table
    from astropt_train.use.scalars import score_text

    m = result.metrics or {}
    if result.kind == "scalar":
        predicted = "median" in result.columns
        table = folding_table("id", "row", "true", "codec", *(["median", "68% interval"] if predicted else []),
                              title=f"{result.modality}: {len(result.labels)} galaxies")
        fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        for r in result.table:
            extra = [fmt(r["median"]), f"[{fmt(r['lo16'])}, {fmt(r['hi84'])}]"] if predicted else []
            table.add_row(r["id"], str(r["row"]), fmt(r["true"]), fmt(r["codec"]), *extra)
        console.print(table)
        baseline = m.get("training_median") or {}
        for key, what in (("model", "model median vs true"),
                          ("training_median", f"training median {baseline.get('value', 0):.4g} vs true (no model; "
                                              f"{baseline.get('of')})"),
                          ("codec", "codec value of the stored token vs true (the ceiling)")):
            if key in m:
                console.print(f"{what}: {score_text(m[key])}" + (f", {m[key]['left_out']} left out (no truth or "
                              "no stored token)" if m[key]["left_out"] else ""), highlight=False)
        if "model" in m or "codec" in m:
            console.print(f"scores: {m['scores']}", highlight=False)
    if result.kind == "spectrum":
        drawn = "drawn" in result.columns
        table = folding_table("id", "row", "pixels", "grid", "codec RMS", *(["drawn RMS"] if drawn else []),
                              title=f"{result.modality}: {len(result.labels)} spectra (RMS of decoded - source flux)")
        fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        for r in result.table:
            table.add_row(r["id"], str(r["row"]), str(r["pixels"]), r["grid"], fmt(r.get("codec_rms")),
                          *([fmt(r.get("drawn_rms"))] if drawn else []))
        console.print(table)
        if drawn:
            s = m["spectrum"]
            console.print(f"drawn after {', '.join(s['given'])} (seed {s['seed']}, T={s['temperature']}, top-k "
                          f"{s['top_k']}): {100 * s['token_agreement']:.1f}% of tokens equal the stored ones",
                          highlight=False)
    if result.out is not None:
        console.print(f"wrote [bold]{result.out}[/]: {len(result.labels)} galaxies ({result.modality})")


def demo_command(
    workdir: Path = typer.Option(Path(".astropt-demo"), "--workdir", help="Folder for the survey, codec, store, run and pictures."),
    rows: int = typer.Option(300, "--rows", help="Synthetic galaxies to write (ignored with --source)."),
    steps: int = typer.Option(300, "--steps", help="Training steps."),
    codec: Optional[str] = typer.Option(None, "--codec", help="Codec hub id or folder (default: the small AION codec shipped for the demo, fitted to synthetic galaxies like its survey)."),
    source: Optional[str] = typer.Option(None, "--source", help="Survey to tokenise (default: a synthetic Legacy Survey written into --workdir)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Tokenise at most this many source rows."),
    seed: int = typer.Option(0, "--seed", help="Seed for the survey, codec, model and sampling."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete the demo's own earlier outputs in --workdir first (survey, tokens, run, pictures, embeddings, probe, summary); never a --source or --codec inside it, nor anything the demo did not make."),
    threads: int = typer.Option(0, "--threads", help="Torch threads on CPU for every stage (0: torch's for training, one for sampling on a small CPU). 1 is faster on a busy machine."),
    cross_survey: bool = typer.Option(True, "--cross-survey/--no-cross-survey", help="When the survey has hsc_image too: tokenise and train on both surveys and draw HSC images from Legacy Survey tokens."),
    catalogue: bool = typer.Option(True, "--catalogue/--no-catalogue", help="Tokenise the survey's catalogue columns (redshift, FLUX_G..FLUX_Z, desi_spectrum) beside the images when the codec folder has their codecs, and train the model to predict the redshift token from the images; eval scores it as a photometric redshift."),
    redshift_weight: float = typer.Option(100.0, "--redshift-weight", help="Loss weight of the redshift token (one token beside hundreds of image tokens)."),
) -> None:
    """Run the whole pipeline offline in one command: synthetic survey -> tokenise -> train -> decode pictures."""
    from astropt_train.use.demo import DemoConfig, print_demo_summary, run_demo

    cfg = DemoConfig(workdir=workdir, rows=rows, steps=steps, codec=codec, source=source, limit=limit, seed=seed,
                     device=device, fresh=fresh, cpu_threads=threads or None, cross_survey=cross_survey,
                     catalogue=catalogue, redshift_weight=redshift_weight)
    print_demo_summary(run_demo(cfg))


def embed_command(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Run or checkpoint folder of `astropt train`, or an upstream AstroPT ckpt.pt (or its folder)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Embeddings store folder to write."),
    tokens: Optional[Path] = typer.Option(None, "--tokens", help="Token store folder or hf://datasets/ORG/NAME[@revision] (default: the one the checkpoint was trained on)."),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: latest)."),
    pool: str = typer.Option("mean", "--pool", help="Reduction over positions: mean, last or exp_decay (upstream AstroPT's)."),
    layer: str = typer.Option("final", "--layer", help="final (after the last LayerNorm), centre (block n_layer//2, upstream's draw_from_centre), a block index, or a comma list."),
    rows: Optional[str] = typer.Option(None, "--rows", help="Store rows A:B (default: all)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most this many rows."),
    batch_size: int = typer.Option(32, "--batch-size", help="Galaxies per forward pass."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto (cuda when available; bf16 autocast there)."),
    dtype: str = typer.Option("float32", "--dtype", help="Storage dtype of the embeddings: float32 or float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace embeddings in --out made with other settings: clears only an embeddings store's own files (manifest, shards, completion records), never another kind of folder or files it did not write."),
    verify: Optional[Path] = typer.Option(None, "--verify", help="Check an embeddings store against its manifest instead."),
) -> None:
    """Per-galaxy embeddings from a trained model: one Arrow shard per token shard, a manifest, resumable and verifiable."""
    from astropt_tok.errors import AstroptError

    if verify is not None:
        from astropt_tok.report import report_verify
        from astropt_train.use.embed import verify_embeddings

        report_verify(verify_embeddings(verify), verify)
        return
    if checkpoint is None or out is None:
        raise AstroptError("pass --checkpoint RUN and --out DIR (or --verify DIR)")
    from astropt_train.use.embed import EmbedConfig, embed

    r = embed(EmbedConfig(checkpoint=checkpoint, out=out, tokens=_store(tokens), step=step, pool=pool, layers=layer, rows=rows,
                          limit=limit, batch_size=batch_size, device=device, dtype=dtype, overwrite=overwrite))
    m = r.manifest
    typer.echo(f"wrote {r.out}: {r.rows} embeddings of {m['n_embd']} ({', '.join(x['name'] for x in m['layers'])}; "
               f"{m['pool']} pooling; {m['dtype']}) in {len(m['shards'])} shards ({r.shards_skipped} already done); "
               f"{r.embeddings_per_s:,.1f} embeddings/s")


def probe_command(
    embeddings: Path = typer.Option(..., "--embeddings", help="Embeddings store of `astropt embed`."),
    labels: str = typer.Option(..., "--labels", help="Catalogue: the survey's parquet files (folder, file or glob) or any parquet/CSV with an id column."),
    target: list[str] = typer.Option(..., "--target", help="Catalogue column to probe (repeat for several)."),
    task: str = typer.Option("auto", "--task", help="auto, regression or classification (auto: strings, booleans and integers with few values are classes)."),
    id_column: str = typer.Option("object_id", "--id-column", help="The catalogue's object id column."),
    folds: int = typer.Option(5, "--folds", help="Cross-validation folds."),
    out: Path = typer.Option(Path("probe"), "--out", "-o", help="Folder for report.json and one PNG per target."),
    column: Optional[str] = typer.Option(None, "--column", help="Embeddings column (default: the first layer's)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the folds and the shuffled-label baseline."),
    random_init_seed: int = typer.Option(0, "--random-init-seed", help="Seed of the randomly initialised model of the baseline."),
    device: str = typer.Option("auto", "--device", help="Device for the random-init baseline's embeddings."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a report in --out of other embeddings (one of the same embeddings is rewritten, whatever the labels and targets): clears its report.json and pictures, never another kind of folder or files it did not write."),
    baseline_features: Optional[str] = typer.Option(None, "--baseline-features", help="Catalogue columns (comma-separated, e.g. mag_r,half_light_radius) probed alone, and beside the embeddings, on the same rows: does the model know more than the catalogue?"),
) -> None:
    """Linear probes of embeddings on catalogue columns (k-fold CV), next to a random-init model, shuffled labels and (--baseline-features) the catalogue alone."""
    from astropt_train.use.probe import ProbeConfig, print_table, probe

    result = probe(ProbeConfig(embeddings=embeddings, labels=labels, targets=list(target), out=out, task=task,
                               id_column=id_column, folds=folds, column=column, seed=seed,
                               random_init_seed=random_init_seed, device=device, progress=True,
                               overwrite=overwrite, baseline_features=_split(baseline_features) or []))
    print_table(result.report)
    typer.echo(f"wrote {result.out / 'report.json'}")


def export_command(
    run: Path = typer.Argument(..., help="Run or checkpoint folder of `astropt train`."),
    astropt: Path = typer.Option(..., "--astropt", help="Folder to write upstream AstroPT's ckpt.pt into."),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: latest)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an export of another checkpoint in --astropt (its ckpt.pt only; never another kind of folder). An export of the same weights is rewritten without it."),
) -> None:
    """Write a checkpoint as upstream AstroPT's ckpt.pt: `load_astropt(repo_id=None, path="OUT/")` loads it."""
    from astropt_train.use.interop import export_astropt

    path = export_astropt(run, astropt, step=step, overwrite=overwrite)
    typer.echo(f"wrote {path}: load it with astropt.model_utils.load_astropt(repo_id=None, path=\"{path.parent}/\")")


def eval_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Run or checkpoint folder of `astropt train` (or an upstream AstroPT ckpt.pt)."),
    out: Path = typer.Option(Path("eval"), "--out", "-o", help="Folder for eval.json and eval.png."),
    tokens: Optional[Path] = typer.Option(None, "--tokens", help="Token store folder or hf://datasets/ORG/NAME[@revision] (default: the one the checkpoint was trained on; another store is scored on all its rows)."),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: latest)."),
    rows: Optional[str] = typer.Option(None, "--rows", help="Store rows to score, e.g. 0:500 (default: the run's held-out rows)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most this many of the scored rows (a quick look)."),
    seeds: int = typer.Option(3, "--seeds", help="Draws of every sampled score (mean and standard deviation over them)."),
    sample_rows: int = typer.Option(64, "--sample-rows", help="Rows completed and drawn per seed (0: token scores only)."),
    complete_from: Optional[int] = typer.Option(None, "--complete-from", help="Tokens kept of each image before the model completes it (default: half)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (0: greedy)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample among the k most likely tokens."),
    baseline_rows: int = typer.Option(100_000, "--baseline-rows", help="Training rows the token baselines are counted on (a seeded sample when there are more)."),
    codec: Optional[str] = typer.Option(None, "--codec", help="Codec hub id or folder (default: the one that made the store)."),
    accept_codec_change: bool = typer.Option(False, "--accept-codec-change", help="Decode with a codec whose weights differ from those that made the tokens; refused without it."),
    source: Optional[Path] = typer.Option(None, "--source", help="Folder where the store's source files are now (if they moved)."),
    images: bool = typer.Option(True, "--images/--no-images", help="Decoded and sampled scores (need the codec); --no-images: token scores only."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    batch_size: int = typer.Option(32, "--batch-size", help="Rows per forward pass, sampling batch and decode."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch CPU threads (default: 1 on a CPU of up to 4 cores, else torch's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a report in --out of another checkpoint or store (its own files only)."),
    json_out: bool = typer.Option(False, "--json", help="Print eval.json instead of the table."),
) -> None:
    """Score a trained model beside model-free baselines on its held-out rows: token accuracy and loss, completions and cross-survey drawings over several seeds."""
    from astropt_train.use.evaluate import EvalConfig, print_table, run_eval

    cfg = EvalConfig(checkpoint=checkpoint, out=out, tokens=_store(tokens), step=step, rows=rows, limit=limit, seeds=seeds,
                     sample_rows=sample_rows, complete_from=complete_from, temperature=temperature, top_k=top_k,
                     baseline_rows=baseline_rows, codec=codec, accept_codec_change=accept_codec_change, source=source,
                     images=images, device=device, batch_size=batch_size, threads=threads, overwrite=overwrite)
    result = run_eval(cfg)
    if json_out:
        from astropt_tok.health import dumps_finite

        print(dumps_finite(result.report, indent=2))
    else:
        print_table(result)


def register(app: typer.Typer) -> None:
    """Add the `decode`, `demo`, `embed`, `probe`, `export` and `eval` commands to the `astropt` app."""
    app.command("decode")(decode_command)
    app.command("demo")(demo_command)
    app.command("embed")(embed_command)
    app.command("probe")(probe_command)
    app.command("export")(export_command)
    app.command("eval")(eval_command)
