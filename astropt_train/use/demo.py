"""`astropt demo`: the whole pipeline, offline, in one command on the project's own embedded default.

  1. survey    a synthetic survey in the real Legacy Survey schema (Sersic galaxies with varied profiles,
               sizes, ellipticities, colours and noise; 160x160, bands DES-G/R/I/Z), unless --source is given
  2. codec     the small real AION ImageCodec shipped in the package (astropt_tok/demo_codec, fitted with
               `astropt fit-codec` to a synthetic survey like the demo's; see its MODEL.md), unless --codec
  3. tokenise  the survey into a sharded token store with that codec (`astropt tokenise`)
  4. train     a tiny GPT on the store for a few hundred steps (`astropt train`)
  5. decode    stored rows against their originals, teacher-forced predictions, completions and generated
               galaxies, each a PNG grid (`astropt decode`)
  6. eval      `astropt eval` on every held-out row: token accuracy and loss beside the per-position map, bigram
               and unigram baselines; completions and cross-survey drawings over several seeds beside the
               average training image, the position map and the codec's own reconstruction
  7. probe     embeds every galaxy with the trained model (`astropt embed`) and fits linear probes of the
               synthetic survey's catalogue columns, next to a random-init model and shuffled labels
               (`astropt probe`; synthetic survey only)

When the survey carries catalogue columns AION has codecs for, and the codec folder holds those codecs (the
synthetic survey and the shipped demo codec do: redshift, the Legacy Survey fluxes FLUX_G..FLUX_Z and a
DESI-like spectrum), the store holds their tokens beside the images (`astropt tokenise --scalar/--spectrum`),
the model learns the redshift token after the images (weighted: one token against hundreds), and `astropt eval`
scores its redshift-from-image predictions with the photometric-redshift metrics beside the training rows'
median and the codec's own quantisation error.

When the survey also holds each galaxy as HSC sees it (`hsc_image`: the synthetic survey and the crossmatched
hub survey do), the store holds both surveys' tokens, the model trains on both in a per-galaxy shuffled order,
and a sixth picture draws HSC images from Legacy Survey tokens (`astropt decode --given ... --generate-modality`).

Everything lives under one work folder (default `.astropt-demo/`). The survey is cached there and reused when
its settings match; the store and run are rebuilt every time (they take seconds). `demo_summary.json` holds the
figures: per band MSE, explained variance and PSNR of the codec's reconstruction and of the all-zero and
image-mean baselines on the same galaxies, and the rest of the run.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from astropt_tok.errors import AstroptError, writing
from astropt_tok.atomic import atomic_write_text

SUMMARY_FILE = "demo_summary.json"
DEMO = "`astropt demo`"
# the artifacts the demo makes inside its work folder, each claimed with the demo as its maker: the demo replaces
# one only when its record says the demo made it (a user's own store at W/tokens is never touched)
DEMO_PARTS = {"tokens": "token-store", "run": "run", "embeddings": "embeddings", "probe": "probe-report",
              "eval": "eval-report"}
# what the demo rewrites on every run: an input (--source, --codec) may not lie inside these
REWRITTEN = ("tokens", "run", "pictures", "eval", "embeddings", "probe", SUMMARY_FILE)


@dataclass
class DemoConfig:
    """Sizes and places for one demo run; the defaults finish in a few minutes on 2 CPU cores."""

    workdir: Path = Path(".astropt-demo")
    rows: int = 300  # synthetic galaxies (ignored with `source`)
    steps: int = 300  # training steps
    codec: str | None = None  # None: the demo codec shipped in the package (astropt_tok/demo_codec)
    source: str | None = None  # None: the synthetic survey written into workdir
    limit: int | None = None  # tokenise at most this many source rows
    seed: int = 0
    device: str = "auto"
    fresh: bool = False  # delete the demo's own earlier outputs in workdir first (clean_workdir), never its inputs
    preset: str = "tiny"  # model shape (astropt_train.config.PRESETS)
    batch_size: int = 8  # galaxies per step with one survey; with two, half as many (the same tokens per step)
    shards: int = 4
    show: int = 8  # galaxies per picture (predicted, completed, generated)
    score_rows: int = 32  # galaxies in stored_vs_original.png, whose reconstruction scores the summary reports
    complete_from: int = 288  # completion keeps the top half of each image's 24x24 token grid
    temperature: float = 1.0
    top_k: int | None = 100
    eval_seeds: int = 3  # draws of every sampled score the summary reports (mean and spread over them)
    eval_sample_rows: int = 64  # held-out rows completed and drawn per seed (the demo's 30: all of them)
    progress: bool = True  # progress bars and training log lines
    cpu_threads: int | None = None  # torch threads on CPU for every stage (None: torch's for training, decode's own
    # default, 1 on a small CPU, for sampling); see run_demo
    cross_survey: bool = True  # with an hsc_image column: both surveys in one store, and a cross-survey picture
    catalogue: bool = True  # tokenise the catalogue columns the survey and codec have; train on redshift too
    redshift_weight: float = 100.0  # the redshift token's loss weight (--loss-weight): one token beside 576 a survey


# the catalogue columns the demo tokenises when the survey has them and the codec folder has their codecs:
# (column, AION modality); the model trains on the redshift after the images, the rest are in the store
DEMO_SCALARS = (("redshift", "Z"), ("FLUX_G", "LegacySurveyFluxG"), ("FLUX_R", "LegacySurveyFluxR"),
                ("FLUX_I", "LegacySurveyFluxI"), ("FLUX_Z", "LegacySurveyFluxZ"))
DEMO_SPECTRA = (("desi_spectrum", "DESISpectrum"),)
REDSHIFT = "redshift"
SURVEY_VERSION = 2  # of the synthetic survey the demo writes: 2 adds the fluxes and the spectrum


@dataclass
class DemoResult:
    """Where the demo put everything, what it measured, and how long each stage took."""

    workdir: Path
    survey: str
    codec: str
    store: Path
    run: Path
    pictures: dict[str, Path]
    metrics: dict[str, Any]
    seconds: dict[str, float]
    demo_codec: bool  # the codec shipped for the demo (not one the user chose)
    train_summary: dict = field(default_factory=dict)


def clean_workdir(workdir: Path, keep: tuple[str, ...] = ()) -> None:
    """Delete the demo's own earlier outputs in `workdir` (a demo folder's files, astropt_tok.artifacts KINDS
    "demo"), minus `keep`, never anything else in a folder the user named. `run_demo` checks first that each
    of W/tokens, W/run, W/embeddings and W/probe it would delete is one the demo made."""
    from astropt_tok.artifacts import clear_own

    clear_own(workdir, "demo", keep=keep)


def inputs_under(cfg: DemoConfig) -> tuple[str, ...]:
    """The top-level names under the work folder of --source and --codec when they lie inside it: the demo reads
    them and never deletes them (--fresh keeps them). The work folder itself as an input, or an input inside
    something the demo rewrites (W/tokens, W/run, ...; W/survey when the demo writes its own survey), is one
    error: the demo would clear what it reads."""
    from astropt_tok.artifacts import check_not_inside

    work = Path(cfg.workdir).expanduser().resolve()
    names = []
    for flag, value in (("--source", cfg.source), ("--codec", cfg.codec)):
        if value is None:
            continue
        path = Path(value).expanduser().resolve()  # a glob's pattern resolves as text: its folder still shows
        if path == work:
            raise AstroptError(f"{flag} {value} is the --workdir itself, where the demo writes its outputs: choose "
                               "another --workdir")
        if work not in path.parents:
            continue
        for name in REWRITTEN + (("survey",) if cfg.source is None else ()):
            check_not_inside(path, work / name, flag, f"--workdir's {name}")
        names.append(path.relative_to(work).parts[0])
    return tuple(names)


def _cached(stamp: Path, settings: dict) -> bool:
    """Whether `stamp` records exactly these settings (so the cached output next to it can be reused)."""
    try:
        return json.loads(stamp.read_text()) == settings
    except (OSError, json.JSONDecodeError):
        return False


def prepare_survey(cfg: DemoConfig) -> str:
    """The survey to tokenise: --source as given, or the cached/written synthetic survey under workdir."""
    if cfg.source is not None:
        return cfg.source
    from astropt_tok.synthetic import write_synthetic_survey

    out = cfg.workdir / "survey"
    stamp = out / "demo-survey.json"
    settings = {"rows": cfg.rows, "seed": cfg.seed, "files": 2, "version": SURVEY_VERSION}
    if not _cached(stamp, settings):
        shutil.rmtree(out, ignore_errors=True)
        with writing(out):
            write_synthetic_survey(out, n_rows=cfg.rows, n_files=2, seed=cfg.seed, processes=2,  # a file per core
                                   with_spectrum=True)
        atomic_write_text(stamp, json.dumps(settings))
    return str(out)


def prepare_codec(cfg: DemoConfig) -> str:
    """The codec: --codec as given, or the demo codec shipped in the package."""
    if cfg.codec is not None:
        return cfg.codec
    from astropt_tok.codec import demo_codec_dir

    return str(demo_codec_dir())


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Survey -> codec -> tokenise -> train -> decode pictures, all under `cfg.workdir`.

    On CPU, by default, training uses torch's own thread count and decoding and sampling use decode's default
    (one thread on a CPU of up to 4 cores, where per-token steps are tiny: see BENCHMARKS.md). Measured on an
    idle 2-core machine, training with 2 threads is 1.8x faster than with 1 (two-survey demo, 4,604 tokens per
    step); on a machine busy with other work one thread can be faster, hence `cfg.cpu_threads` (--threads N)
    to pin every stage.
    """
    from astropt_tok.executor import resolve_device
    from astropt_train.use.decode import torch_threads

    _check_flags(cfg)
    threads = cfg.cpu_threads if resolve_device(cfg.device) == "cpu" else None
    with torch_threads(threads):
        return _run_demo(cfg)


def _check_flags(cfg: DemoConfig) -> None:
    """Each bad flag is its own error naming only that flag, before the demo writes anything."""
    from astropt_tok.codec import resolve_codec_files

    if cfg.source is None and cfg.rows < 10:
        raise AstroptError(f"--rows must be at least 10 for the demo, got {cfg.rows}")
    if cfg.steps < 1:
        raise AstroptError(f"--steps must be at least 1, got {cfg.steps}")
    if cfg.limit is not None and cfg.limit < 1:
        raise AstroptError(f"--limit must be at least 1, got {cfg.limit}")
    if cfg.seed < 0:
        raise AstroptError(f"--seed must be 0 or more, got {cfg.seed}")
    if cfg.cpu_threads is not None and cfg.cpu_threads < 1:
        raise AstroptError(f"--threads must be 0 (torch's default) or more, got {cfg.cpu_threads}")
    if not cfg.redshift_weight > 0:
        raise AstroptError(f"--redshift-weight must be a positive number, got {cfg.redshift_weight}")
    if cfg.codec is not None:
        resolve_codec_files(cfg.codec)  # a missing folder or unknown hub id now, not after writing the survey


def _run_demo(cfg: DemoConfig) -> DemoResult:
    from astropt_tok.artifacts import output_folder, read_record, update_lineage

    keep = inputs_under(cfg)
    # W is claimed as a demo folder (a folder of the user's own files, or another kind of artifact, is refused),
    # and locked for the whole demo; its inner tokenise, train and embed lock their own sub-folders
    legacy = Path(cfg.workdir).is_dir() and read_record(cfg.workdir) is None  # made before records existed
    lineage = {"source": cfg.source or "synthetic", "codec": cfg.codec or "the shipped demo codec"}
    with output_folder(cfg.workdir, "demo", DEMO, "--workdir", lineage=lineage, may_hold=keep):
        for name in DEMO_PARTS:  # before --fresh deletes anything: every part there is the demo's own
            if (Path(cfg.workdir) / name).exists():
                _claim(cfg, name, legacy)
        if cfg.fresh:
            clean_workdir(cfg.workdir, keep=keep)
        update_lineage(cfg.workdir, **lineage)  # this run's survey and codec
        try:
            return _run_demo_stages(cfg, legacy)
        except BaseException:
            from astropt_tok.artifacts import release_if_unused

            for name in DEMO_PARTS:  # a part claimed but never written: no trace of it (W's own is released after)
                release_if_unused(Path(cfg.workdir) / name, remove_folder=True)
            raise


def _claim(cfg: DemoConfig, name: str, legacy: bool) -> bool:
    """Claim W/name for the demo (astropt_tok.artifacts.claim_part): True when it holds what the demo made."""
    from astropt_tok.artifacts import claim_part

    return claim_part(Path(cfg.workdir) / name, DEMO_PARTS[name], DEMO, "--workdir", legacy=legacy)


def _run_demo_stages(cfg: DemoConfig, legacy: bool) -> DemoResult:
    from astropt_tok.artifacts import clear_own
    from astropt_tok.tokenise import TokeniseConfig, tokenise
    from astropt_train.config import TrainConfig
    from astropt_train.use.decode import DecodeConfig, decode
    from astropt_train.loop import train

    seconds: dict[str, float] = {}
    say = print if cfg.progress else (lambda *a, **k: None)
    stages = 7 if cfg.source is None else 6

    t = time.perf_counter()
    say(f"[1/{stages}] survey")
    survey = prepare_survey(cfg)
    say(f"[2/{stages}] codec")
    codec = prepare_codec(cfg)
    seconds["survey+codec"] = time.perf_counter() - t

    store = cfg.workdir / "tokens"
    _claim(cfg, "tokens", legacy)  # the demo's own store: replaced (overwrite) when its settings changed
    t = time.perf_counter()
    say(f"[3/{stages}] tokenise {survey} -> {store}")
    surveys = _surveys(survey) if cfg.cross_survey else ()
    scalars, spectra = catalogue_columns(cfg, survey, codec)
    tokenise(TokeniseConfig(source=survey, out=str(store), shards=cfg.shards, codec=codec, limit=cfg.limit,
                            device=cfg.device, batch_size=32, overwrite=True, progress=cfg.progress, modalities=surveys,
                            scalars=scalars, spectra=spectra)
             ).check_usable()  # a --source whose every row was rejected is one error here, not a failure in training
    seconds["tokenise"] = time.perf_counter() - t

    run = cfg.workdir / "run"
    if _claim(cfg, "run", legacy):  # the demo's own run folder: always a fresh run
        clear_own(run, "run")
    t = time.perf_counter()
    say(f"[4/{stages}] train {cfg.steps} steps -> {run}")
    evals = max(1, cfg.steps // 3)
    # a galaxy seen by both surveys is a sequence twice as long: as many tokens per step, so the same time
    batch_size = max(1, cfg.batch_size // max(1, len(surveys)))
    # the model reads the images, then (with a catalogue) the redshift: its token predicted from the images
    redshift = any(column == REDSHIFT for column, _ in scalars)
    images = [column for column, _ in surveys] or ["legacysurvey_image"]
    learned = dict(modalities=",".join(images + [REDSHIFT]), loss_weight=f"{REDSHIFT}={cfg.redshift_weight:g}") \
        if redshift else dict(modalities=",".join(images)) if scalars or spectra else {}
    summary = train(TrainConfig(
        tokens=str(store), out=str(run), preset=cfg.preset, batch_size=batch_size, max_iters=cfg.steps,
        lr=1e-3, warmup_iters=min(20, max(0, cfg.steps // 10)), eval_interval=evals, eval_iters=5,
        val_fraction=0.1, val_images=4, codec=codec, device=cfg.device, seed=cfg.seed, checkpoint_interval=0,
        keep_last=1, live=False, log_interval=max(1, min(50, cfg.steps // 5)), shuffle_modalities=bool(surveys),
        **learned,
    ))
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    say(f"[5/{stages}] decode pictures")
    pics = cfg.workdir / "pictures"
    common = dict(codec=codec, device=cfg.device, seed=cfg.seed, progress=cfg.progress, inside=cfg.workdir)
    from astropt_tok.store import TokenStore

    n_rows = TokenStore(store).num_rows
    rows = f"0:{min(max(cfg.show, cfg.score_rows), n_rows)}"  # enough galaxies for steady scores
    val_rows = _validation_rows(run, cfg.show)  # the model never trained on these
    one = dict(modality=surveys[0][0]) if surveys else {}  # two surveys: these pictures are of the first, named
    stored = decode(DecodeConfig(tokens=store, rows=rows, compare=True, out=pics / "stored_vs_original.png", **one,
                                 **common))
    predicted = decode(DecodeConfig(tokens=store, rows=val_rows, checkpoint=run, predict=True,
                                    out=pics / "predicted.png", **one, **common))
    completed = decode(DecodeConfig(tokens=store, rows=val_rows, checkpoint=run, complete_from=cfg.complete_from,
                                    temperature=cfg.temperature, top_k=cfg.top_k, out=pics / "completed.png", **one,
                                    **common))
    generated = decode(DecodeConfig(tokens=store, checkpoint=run, generate=cfg.show, temperature=cfg.temperature,
                                    top_k=cfg.top_k, out=pics / "generated.png",
                                    save_flux=pics / "generated_flux.npy", **one, **common))
    cross = None
    if surveys:  # the model draws each galaxy's HSC image from its Legacy Survey tokens
        cross = decode(DecodeConfig(tokens=store, rows=val_rows, checkpoint=run, given=surveys[0][0],
                                    generate_modality=surveys[1][0], temperature=cfg.temperature, top_k=cfg.top_k,
                                    out=pics / "cross_survey.png", **common))
    redshift_picture = None
    if redshift:  # every held-out galaxy's redshift drawn from its images: median and 68% interval vs the truth
        redshift_picture = decode(DecodeConfig(tokens=store, rows=_validation_rows(run, n_rows), checkpoint=run,
                                               given=images[0], generate_modality=REDSHIFT,
                                               out=pics / "redshift_from_images.png", **common))
    seconds["decode"] = time.perf_counter() - t

    # the numbers the demo reports: every held-out row, each score beside its baselines, sampled ones over seeds
    t = time.perf_counter()
    say(f"[6/{stages}] evaluate on every held-out row beside model-free baselines ({cfg.eval_seeds} seeds)")
    evaluation = _evaluate(cfg, run, codec, legacy)
    seconds["eval"] = time.perf_counter() - t

    probe_report = None
    if cfg.source is None:  # the synthetic survey's catalogue columns are known functions of each galaxy
        t = time.perf_counter()
        say("[7/7] embed and probe the catalogue")
        probe_report = _embed_and_probe(cfg, run, survey, legacy)
        seconds["probe"] = time.perf_counter() - t

    rec = stored.metrics["reconstruction"]
    from astropt_train.use.evaluate import HEADLINE_KEYS, headline_rows

    metrics = {
        "reconstruction": rec["per_band"],  # per band: mse, explained_variance, psnr
        "baselines": rec["baselines"],  # the same for "zero" and "image_mean" on the same galaxies
        "colours": rec["colours"],  # per neighbouring-band pair: RMS colour error (mag) beside one colour for all
        "reconstruction_galaxies": len(stored.labels),
        # the model's scores: `astropt eval` over every held-out row, beside its baselines and spread
        "eval": {"report": str(cfg.workdir / "eval" / "eval.json"), "rows": evaluation["rows"]["count"],
                 "sampling": evaluation.get("sampling"),
                 "table": [dict(zip(HEADLINE_KEYS, r)) for r in headline_rows(evaluation)]},
        "train_loss": summary.get("loss"),
        "val_loss": summary.get("val_loss"),
    }
    photo_z = ((evaluation.get("modalities") or {}).get(REDSHIFT) or {}).get("scalar")
    if photo_z and photo_z.get("model"):  # the redshift scored as photometric redshifts are, beside its baselines
        metrics["photo_z"] = {"rows": photo_z["rows"], "given": photo_z.get("given"), "model": photo_z["model"],
                              "training_median": photo_z["baselines"]["training_median"],
                              "codec_ceiling": photo_z.get("codec_ceiling")}
    if probe_report is not None:
        metrics["probe"] = {"report": str(cfg.workdir / "probe" / "report.json"),
                            "table": [dict(zip(PROBE_TABLE_KEYS, r)) for r in _probe_table(probe_report)]}
    pictures = {
        "original vs codec reconstruction (+ scores)": stored.out,
        "teacher-forced prediction": predicted.out,
        f"completion from {cfg.complete_from} tokens": completed.out,
        "generated galaxies": generated.out,
        "generated flux (.npy)": generated.flux_path,
        "evaluation (accuracy by position, sampled scores)": cfg.workdir / "eval" / "eval.png",
    }
    if cross is not None:
        pictures[f"{surveys[1][0]} drawn from {surveys[0][0]} tokens"] = cross.out
    if redshift_picture is not None:
        pictures["redshift from the images (median, 68% interval) vs the truth"] = redshift_picture.out
    val_images = sorted((run / "val_images").glob("*.png"))
    if val_images:
        pictures["validation images during training"] = val_images[-1]
    result = DemoResult(workdir=cfg.workdir, survey=survey, codec=codec, store=store, run=run, pictures=pictures,
                        metrics=metrics, seconds=seconds, demo_codec=cfg.codec is None, train_summary=summary)
    write_summary(result)
    return result


def _evaluate(cfg: DemoConfig, run: Path, codec: str, legacy: bool) -> dict:
    """`astropt eval` of the demo's run into W/eval: every held-out row, sampled scores over `eval_seeds` draws
    with the demo's temperature and top-k; the report."""
    from astropt_train.use.evaluate import EvalConfig, run_eval

    _claim(cfg, "eval", legacy)
    return run_eval(EvalConfig(checkpoint=run, out=cfg.workdir / "eval", seeds=cfg.eval_seeds,
                               sample_rows=cfg.eval_sample_rows, complete_from=cfg.complete_from,
                               temperature=cfg.temperature, top_k=cfg.top_k, codec=codec, device=cfg.device,
                               overwrite=True)).report


def catalogue_columns(cfg: DemoConfig, source: str, codec: str) -> tuple[tuple, tuple]:
    """(scalars, spectra): the demo's catalogue columns (DEMO_SCALARS, DEMO_SPECTRA) that the source holds, of
    the right type, and whose codecs the codec folder holds; ((), ()) with --no-catalogue."""
    if not cfg.catalogue:
        return (), ()
    from astropt_tok.codec import aion_modality, resolve_codec_files
    from astropt_tok.source import check_catalogue_column, resolve_source

    try:  # the source resolved once, not per column (a source without the image column: tokenise says so)
        schema = resolve_source(source, column="legacysurvey_image").schema()
    except AstroptError:
        return (), ()

    def usable(column: str, modality: str, kind: str) -> bool:
        try:
            resolve_codec_files(codec, aion_modality(modality).folder)
            check_catalogue_column(schema, column, kind, f"source {source}")
        except AstroptError:
            return False
        return True

    return (tuple(c for c in DEMO_SCALARS if usable(*c, "scalar")),
            tuple(c for c in DEMO_SPECTRA if usable(*c, "spectrum")))


def _surveys(source: str) -> tuple:
    """(column, bands) of the Legacy Survey and HSC images when the source has both, else () (one column)."""
    from astropt_tok.source import resolve_source
    from astropt_tok.synthetic import DEFAULT_BANDS, HSC_BANDS

    try:
        resolve_source(source, column="legacysurvey_image", extra_columns=["hsc_image"])
    except AstroptError:
        return ()
    return (("legacysurvey_image", DEFAULT_BANDS), ("hsc_image", HSC_BANDS))


PROBE_TABLE_KEYS = ("target", "task", "n", "metric", "model", "random_init", "shuffled_labels", "catalogue",
                    "model_and_catalogue")


def _embed_and_probe(cfg: DemoConfig, run: Path, survey: str, legacy: bool = False) -> dict:
    """Embed every stored galaxy with the trained model and probe the synthetic catalogue; the probe report."""
    from astropt_tok.synthetic import CATALOGUE_COLUMNS
    from astropt_train.use.embed import EmbedConfig, embed
    from astropt_train.use.probe import ProbeConfig, probe

    _claim(cfg, "embeddings", legacy)
    embed(EmbedConfig(checkpoint=run, out=cfg.workdir / "embeddings", device=cfg.device, batch_size=32,
                      overwrite=True, progress=cfg.progress))
    _claim(cfg, "probe", legacy)
    # beside the model: the same probe on the catalogue's magnitude and size alone, on the same galaxies (does the
    # model know more than those two columns?), each target but those two
    features = ["mag_r", "half_light_radius"]
    return probe(ProbeConfig(embeddings=cfg.workdir / "embeddings", labels=survey,
                             targets=[c for c in CATALOGUE_COLUMNS if c not in features], baseline_features=features,
                             out=cfg.workdir / "probe", folds=5, seed=cfg.seed, random_init_seed=cfg.seed + 1,
                             device=cfg.device, overwrite=True)).report


def _probe_table(report: dict) -> list[tuple[str, ...]]:
    """The headline metric per target: R² for regression, accuracy for classes."""
    from astropt_train.use.probe import table_rows

    return [r for r in table_rows(report) if r[3] in ("r2", "accuracy")]


def write_summary(result: DemoResult) -> Path:
    """WORKDIR/demo_summary.json: reconstruction scores and baselines at the top, then the model's scores, then
    the rest of the run.

    Layout: {"reconstruction": {band: {mse, explained_variance, psnr}}, "baselines": {"zero": {band: ...},
    "image_mean": {band: ...}}, "colours": {pair: rms colour error beside one colour for all}, "eval": the
    model's headline scores from `astropt eval` over every held-out row (each "model" as mean ± spread beside
    its "baselines" and the codec's "ceiling"; sampled ones over seeds, with temperature and top-k) and the
    path of the full eval.json, "probes": the linear probes' table and report path (None without the probe
    step), "train_loss", "val_loss", "seconds", "pictures", ...}.
    """
    m = result.metrics
    summary = {"reconstruction": m["reconstruction"], "baselines": m["baselines"], "colours": m.get("colours"),
               "reconstruction_galaxies": m["reconstruction_galaxies"], "eval": m.get("eval"),
               "probes": m.get("probe"),
               **{k: v for k, v in _jsonable(result).items() if k != "metrics"},
               "metrics": {k: v for k, v in m.items() if k not in ("reconstruction", "baselines", "colours", "eval")}}
    path = result.workdir / SUMMARY_FILE
    from astropt_tok.health import dumps_finite

    # a score that is no number (a PSNR of a perfect reconstruction is inf) is null: the file stays strict JSON
    atomic_write_text(path, dumps_finite(json.loads(json.dumps(summary, default=str)), indent=2))
    return path


def _validation_rows(run: Path, n: int) -> str:
    """Up to n of the run's held-out validation rows (as a --rows string), rebuilt from its checkpoint's split rule."""
    from astropt_train.checkpoint import find_checkpoint, read_config
    from astropt_train.data import split_rows

    split = read_config(find_checkpoint(run))["split"]
    val = split_rows(int(split["num_rows"]), float(split["val_fraction"]), int(split["seed"])).val
    return ",".join(str(int(v)) for v in val[:n])


def photo_z_line(pz: dict) -> str:
    """The demo's redshift-from-images scores in one line: NMAD, outlier fraction and bias of the model, of the
    training rows' median (no model), and of the codec's own quantisation."""
    def scores(e: dict | None) -> str:
        if not e:
            return "n/a"
        return f"NMAD {e['nmad']:.4f}, outliers {e['outlier_frac']:.1%}, bias {e['bias']:+.4f}"

    given = " and ".join(pz.get("given") or ["images"])
    return (f"redshift from {given} on {pz['rows']} held-out galaxies: model {scores(pz['model'])}; training median "
            f"{scores(pz['training_median'])}; codec ceiling {scores(pz.get('codec_ceiling'))}")


def _jsonable(result: DemoResult) -> dict:
    d = asdict(result)
    return json.loads(json.dumps(d, default=str))


def print_demo_summary(result: DemoResult, console=None) -> None:
    """Print where every output is, the reconstruction scores beside their baselines, and the headline figures."""
    from astropt_tok.report import output_console

    from astropt_tok.report import folding_table, print_reconstruction_table

    console = console or output_console()
    where = folding_table("what", "where", title="astropt demo: where everything is", show_header=False)
    where.add_row("survey", str(result.survey))
    where.add_row("codec", str(result.codec) + ("  (the demo codec shipped with the package)" if result.demo_codec else ""))
    where.add_row("token store", str(result.store))
    where.add_row("run (checkpoints, metrics)", str(result.run))
    for name, path in result.pictures.items():
        where.add_row(name, str(path))
    where.add_row("summary", str(result.workdir / SUMMARY_FILE))
    console.print(where)
    m = result.metrics
    print_reconstruction_table({"per_band": m["reconstruction"], "baselines": m["baselines"],
                                "colours": m.get("colours")}, console=console,
                               title=f"codec reconstruction vs original ({m['reconstruction_galaxies']} galaxies)")
    ev = m.get("eval")
    if ev:
        table = folding_table("", "score", "model", "baselines (no model)", "codec",
                              title=f"the model on all {ev['rows']} held-out rows (`astropt eval`; {ev['report']})")
        for r in ev["table"]:
            table.add_row(r["what"], r["score"], r["model"], r["baselines"], r["ceiling"])
        console.print(table)
        from astropt_train.use.evaluate import sampling_line

        console.print(sampling_line({"sampling": ev.get("sampling")}), highlight=False)
    if m.get("photo_z"):
        console.print(photo_z_line(m["photo_z"]), highlight=False)
    console.print(f"train loss {m['train_loss']:.3f}, val loss {m['val_loss']:.3f}")
    console.print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
                  + f" (total {sum(result.seconds.values()):.0f} s)")
    if "probe" in m:
        report = json.loads(Path(m["probe"]["report"]).read_text()) if Path(m["probe"]["report"]).is_file() else {}
        features = ", ".join(report.get("baseline_features") or []) or "-"
        table = folding_table("target", "metric", "model", "random init", "catalogue", "model + cat.",
                              title=f"linear probes of the catalogue (5-fold CV, same galaxies; catalogue: {features} "
                                    f"alone; shuffled labels in {m['probe']['report']})")
        for col in table.columns[2:]:
            col.justify = "right"
        for r in m["probe"]["table"]:
            table.add_row(r["target"], r["metric"], r["model"], r["random_init"], r.get("catalogue", "-"),
                          r.get("model_and_catalogue", "-"))
        console.print(table)
    console.print(f"next: `astropt decode --tokens {result.store} --rows 0:16 --compare --out grid.png`, "
                  f"`astropt decode --checkpoint {result.run} --generate 16 --out samples.png`")
