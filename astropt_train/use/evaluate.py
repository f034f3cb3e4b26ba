"""`astropt eval`: does a trained model know more than token statistics? Every score beside model-free
baselines computed on the same rows in the same run, and every sampled score over several seeds.

`run_eval(EvalConfig)` is the one library call. Over the run's held-out rows (all of them by default), per
modality of the model:

  tokens       teacher-forced validation loss, perplexity, accuracy and top-5 accuracy of the model beside
               the per-position most-frequent-token map, a bigram and a unigram model counted on the training
               rows (astropt_train.token_scores); spread: standard error over rows
  completion   on `sample_rows` of them: the model keeps the first half of each image's tokens (`complete_from`)
               and samples the rest, once per seed; token agreement with the stored tokens and, decoded by the
               codec, explained variance and colour error against the original image (or against the codec's
               reconstruction when the source cannot be read), beside the per-position map's completion, the
               average training image of that survey, and the codec's own reconstruction (the ceiling)
  cross        a model of several image columns: each ordered pair of surveys, the wanted image drawn from the
               given one's tokens, once per seed, beside the same baselines

A sampled score is {"model": mean over seeds, "spread": standard deviation over seeds, "per_seed": [...]},
with temperature and top-k recorded. Writes OUT/eval.json, OUT/eval.png and prints a table.
"""

from __future__ import annotations

import math
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from astropt_tok.errors import AstroptError

EVAL_FILE = "eval.json"
FIGURE_FILE = "eval.png"
EVAL_FORMAT = "astropt-eval"
SAMPLE_STREAM = 0x5A3E  # the second word of the seed that picks the rows sampled (independent of --seeds)
MEAN_IMAGE_ROWS = 256  # training rows averaged into a survey's "average training image"
FLOOR = -1.0  # explained variance drawn down to here; lower bars are cut, with their value written


@dataclass
class EvalConfig:
    """Everything `astropt eval` needs."""

    checkpoint: Path  # run or checkpoint folder of `astropt train` (or an upstream ckpt.pt)
    out: Path = Path("eval")  # report folder: eval.json, eval.png
    tokens: Path | None = None  # token store (default: the one the model was trained on)
    step: int | None = None
    rows: str | None = None  # store rows to score (default: the run's held-out rows)
    limit: int | None = None  # at most this many of them (a quick look)
    seeds: int = 3  # draws of every sampled score
    sample_rows: int = 64  # rows completed / drawn per seed (0: no sampled scores)
    complete_from: int | None = None  # tokens kept per image before completing (default: half)
    temperature: float = 1.0
    top_k: int | None = None
    baseline_rows: int = 100_000  # training rows the token baselines are counted on (a seeded sample beyond)
    codec: str | None = None
    accept_codec_change: bool = False
    source: Path | None = None  # where the store's source files are now (if they moved)
    images: bool = True  # decoded scores (needs the codec); False: token scores only
    device: str = "auto"
    batch_size: int = 32
    threads: int | None = None
    overwrite: bool = False
    figure: bool = True


@dataclass
class EvalResult:
    """The report as written to eval.json, and where it went."""

    report: dict
    out: Path
    figure: Path | None


def _check_options(cfg: EvalConfig) -> None:
    """Bad flag values, before any model, store or codec is read."""
    for flag, value, least in (("--seeds", cfg.seeds, 1), ("--sample-rows", cfg.sample_rows, 0),
                               ("--batch-size", cfg.batch_size, 1), ("--baseline-rows", cfg.baseline_rows, 1),
                               ("--limit", cfg.limit, 1), ("--complete-from", cfg.complete_from, 1),
                               ("--top-k", cfg.top_k, 1), ("--threads", cfg.threads, 1), ("--step", cfg.step, 0)):
        if value is not None and value < least:
            raise AstroptError(f"{flag} must be at least {least}, got {value}")
    if not math.isfinite(cfg.temperature) or cfg.temperature < 0:
        raise AstroptError(f"--temperature must be a finite number >= 0 (0: greedy), got {cfg.temperature}")
    from astropt_tok.artifacts import check_claim

    check_claim(Path(cfg.out), "eval-report", "`astropt eval`")


def run_eval(cfg: EvalConfig) -> EvalResult:
    """Score a checkpoint beside its baselines (module doc); write OUT/eval.json and OUT/eval.png."""
    _check_options(cfg)
    from astropt_tok.executor import default_cpu_threads, resolve_device, torch_threads

    device = resolve_device(cfg.device)
    threads = cfg.threads if cfg.threads is not None else default_cpu_threads(device)
    with ExitStack() as held, torch_threads(threads):
        return _run_eval(cfg, device, held)


# ---------------------------------------------------------------------------------------------------------
# which rows


@dataclass
class Rows:
    """The rows scored and the rows the baselines are counted on, and how each was chosen."""

    scored: np.ndarray  # store rows of the evaluated store
    training: np.ndarray  # rows of `training_store` the model trained on (baselines count a sample of them)
    training_store: Any  # TokenStore
    note: dict


def _choose_rows(cfg: EvalConfig, store, ckpt: dict, run_config: dict | None) -> Rows:
    """Held-out rows of the run's split (or --rows), and its training rows for the baselines."""
    from astropt_tok.store import TokenStore, manifest_sha256
    from astropt_train.data import split_rows
    from astropt_train.use.decode import parse_rows

    split_rule = (run_config or {}).get("split")
    trained = (ckpt.get("store") or {})
    same_store = trained.get("manifest_sha256") == manifest_sha256(store.dir)
    if split_rule is None:  # an upstream checkpoint: its training rows are unknown
        if cfg.rows is None:
            raise AstroptError(f"{cfg.checkpoint} records no train/validation split (not a run of `astropt train`): "
                               "pass --rows with rows it did not train on; the baselines count the store's other rows")
        scored = parse_rows(cfg.rows, store.num_rows)
        training = np.setdiff1d(np.arange(store.num_rows), scored)
        if not len(training):
            raise AstroptError("--rows selects every row of the store: no rows are left to count the baselines on")
        note = {"scored": f"--rows {cfg.rows}", "training": "the store's other rows (the model's are unknown)"}
        return _limited(cfg, Rows(np.unique(scored), training, store, note))
    split = split_rows(int(split_rule["num_rows"]), float(split_rule["val_fraction"]), int(split_rule["seed"]))
    training_store = store
    if not same_store:  # another store: score its rows, count the baselines on the run's own training rows
        if not trained.get("dir") or not Path(trained["dir"]).is_dir():
            raise AstroptError(f"the baselines are counted on the rows {cfg.checkpoint} trained on, but its token "
                               f"store {trained.get('dir')} is not here: evaluate on that store, or restore it")
        training_store = TokenStore(trained["dir"])
        if training_store.num_rows != split.rule["num_rows"] or \
                manifest_sha256(training_store.dir) != trained.get("manifest_sha256"):
            raise AstroptError(f"token store {trained['dir']} changed since {cfg.checkpoint} trained on it (its "
                               "manifest differs): the training rows cannot be told apart; re-tokenise or retrain")
    if cfg.rows is not None:
        scored = np.unique(parse_rows(cfg.rows, store.num_rows))
        seen = int(np.isin(scored, split.train).sum()) if same_store else 0
        note = {"scored": f"--rows {cfg.rows}", "trained_on": seen}
        if seen:
            print(f"note: {seen} of the {len(scored)} rows chosen with --rows were trained on: their scores are not "
                  "held-out scores", file=sys.stderr)
    elif same_store:
        scored, note = split.val, {"scored": "the run's held-out rows", "split": split.rule}
    else:
        scored, note = np.arange(store.num_rows), {"scored": f"every row of {store.dir} (not the store trained on)"}
    note["training"] = "the run's training rows" + ("" if same_store else f" of {training_store.dir}")
    return _limited(cfg, Rows(scored, split.train, training_store, note))


def _limited(cfg: EvalConfig, rows: Rows) -> Rows:
    if cfg.limit is not None and len(rows.scored) > cfg.limit:
        rows.scored = rows.scored[: cfg.limit]
        rows.note["limit"] = cfg.limit
    return rows


def sample_rows(rows: np.ndarray, n: int) -> np.ndarray:
    """The rows whose sampled scores are drawn: all of `rows`, or a fixed seeded choice of n (sorted)."""
    from astropt_train.token_scores import seeded_subset

    return seeded_subset(rows, n, [0, SAMPLE_STREAM])


# ---------------------------------------------------------------------------------------------------------
# the one library call


def _run_eval(cfg: EvalConfig, device: str, held: ExitStack) -> EvalResult:
    from astropt_tok.artifacts import check_model_store, clear_own, output_folder, read_record, update_lineage
    from astropt_tok.store import TokenStore, manifest_sha256
    from astropt_train import checkpoint as ck
    from astropt_train.token_scores import baseline_rows, fit_baselines
    from astropt_train.use.interop import load_any_model

    model, ckpt = load_any_model(cfg.checkpoint, step=cfg.step, device=device)
    run_config = ck.read_config(ckpt["path"]) if ckpt.get("kind") == "astropt-train" else None
    trained = ckpt.get("store") or {}
    store_dir = cfg.tokens or (Path(trained["dir"]) if trained.get("dir") else None)
    if store_dir is None:
        raise AstroptError("pass the token store with --tokens DIR (the checkpoint names none)")
    if not Path(store_dir).exists():
        raise AstroptError(f"token store {store_dir} is not here: pass --tokens DIR")
    store = TokenStore(store_dir)
    for note in check_model_store(f"checkpoint {ckpt['path']}", trained or None, model.config.modalities, store,
                                  manifest_sha256(store.dir)):
        print(note, file=sys.stderr)
    columns = {m: m for m in model.config.modalities} if model.config.modalities else {model.names[0]: None}
    T = store.tokens_per_image
    if cfg.complete_from is not None and cfg.complete_from >= T:
        raise AstroptError(f"--complete-from must be between 1 and {T - 1} (tokens kept of each image's {T}), "
                           f"got {cfg.complete_from}")
    rows = _choose_rows(cfg, store, ckpt, run_config)
    if cfg.images and cfg.sample_rows > 0:  # a codec that is not there is one error now, not after the token scores
        from astropt_tok.codec import resolve_codec_files

        resolve_codec_files(str(_codec_id(cfg, trained, store)))

    out = Path(cfg.out)
    lineage = {"checkpoint": {"path": ckpt["path"], "weights_sha256": ckpt.get("weights_sha256")},
               "store": {"dir": str(Path(store.dir).resolve()), "manifest_sha256": manifest_sha256(store.dir)}}
    if held.enter_context(output_folder(out, "eval-report", "`astropt eval`", lineage=lineage)):
        before = (read_record(out) or {}).get("lineage") or {}
        same = ((before.get("checkpoint") or {}).get("weights_sha256") == lineage["checkpoint"]["weights_sha256"]
                and before.get("store") == lineage["store"])
        if not same and not cfg.overwrite:
            raise AstroptError(f"--out {out} holds an evaluation of another checkpoint or store "
                               f"({(before.get('checkpoint') or {}).get('path')}); pass --overwrite to replace it, "
                               "or choose another --out")
        clear_own(out, "eval-report")
    update_lineage(out, **lineage)

    counted = baseline_rows(rows.training, cfg.baseline_rows)
    print(f"eval: {len(rows.scored)} rows scored; baselines counted on {len(counted)} training rows", file=sys.stderr)
    baselines = fit_baselines(rows.training_store, counted, columns)
    tokens = _token_scores(cfg, model, store, rows.scored, baselines, run_config, device)

    report: dict[str, Any] = {
        "format": EVAL_FORMAT, "format_version": 1,
        "checkpoint": {"path": ckpt["path"], "step": ckpt.get("step"), "weights_sha256": ckpt.get("weights_sha256")},
        "store": lineage["store"],
        "rows": {**rows.note, "count": int(len(rows.scored))},
        "baselines": {"training_rows_counted": int(len(counted)), "of": int(len(rows.training)),
                      "position": "per block position, the token most frequent there in the training rows",
                      "bigram": "the token that most often followed the previous one in the training rows",
                      "unigram": "the token most frequent in the training rows",
                      "mean_image": f"the average of up to {MEAN_IMAGE_ROWS} training images of that survey",
                      "codec": "the codec's own reconstruction of the stored tokens (the ceiling)"},
        "modalities": {m: {"tokens": entry} for m, entry in tokens.summary().items()},
    }
    by_position = {m: tokens.accuracy_by_position(m) for m in columns}
    scatter = {}  # scalar modality -> its per-row truth and prediction, for the figure
    for m, column in columns.items():
        if column is not None and store.modality_kind.get(column) == "scalar":
            report["modalities"][m]["scalar"], scatter[m] = scalar_scores(cfg, model, store, rows, column, counted,
                                                                         trained, run_config, device)
    if cfg.images and cfg.sample_rows > 0:
        _image_scores(cfg, model, store, rows, columns, baselines, trained, report, device)
    elif cfg.images:
        report["sampling"] = {"rows": 0, "note": "--sample-rows 0: no sampled scores"}

    from astropt_tok.atomic import atomic_write_text
    from astropt_tok.health import dumps_finite

    atomic_write_text(out / EVAL_FILE, dumps_finite(report, indent=2) + "\n")
    figure = write_figure(report, by_position, out / FIGURE_FILE, scatter) if cfg.figure else None
    return EvalResult(report=report, out=out / EVAL_FILE, figure=figure)


def _token_scores(cfg: EvalConfig, model, store, rows: np.ndarray, baselines: dict, run_config: dict | None,
                  device: str):
    """Teacher-forced scores over `rows`, batch by batch, with each row's modality order as validation gives it."""
    import torch

    from astropt_tok.progress import ProgressBar
    from astropt_train.data import TokenRows, batch_to_device
    from astropt_train.token_scores import TokenScores

    train = (run_config or {}).get("train") or {}
    dataset = TokenRows(store, modalities=model.config.modalities or None,
                        shuffle=bool(train.get("shuffle_modalities")), seed=int(train.get("seed", 0)))
    scores = TokenScores(baselines)
    model.eval()
    with torch.inference_mode(), ProgressBar("eval tokens", len(rows), sys.stderr.isatty(), "rows") as bar:
        for i in range(0, len(rows), cfg.batch_size):
            part = rows[i : i + cfg.batch_size]
            x, y, kw = batch_to_device(dataset.__getitems__(part), device)
            logits, _ = model(x, y, **kw)  # (B, L-1, vocab)
            # ids past a modality's own vocabulary are -inf (modalities of different vocabularies); NaN or +inf is damage
            if bool(torch.isnan(logits).any() or torch.isposinf(logits).any()):
                raise AstroptError(f"the model's logits are not finite (NaN or infinite) for rows {int(part[0])}.."
                                   f"{int(part[-1])}: its weights are damaged or its activations overflowed")
            scores.add_batch(model, logits, y, x, kw.get("order"), kw.get("loss_mask"), row_offset=i)
            bar.advance(len(part))
    return scores


# ---------------------------------------------------------------------------------------------------------
# catalogue numbers


def _truth_or_codec(cfg: EvalConfig, store, rows: np.ndarray, column: str, values: np.ndarray
                    ) -> tuple[np.ndarray, str]:
    """(the number each row is scored against: the source's, else the codec's value of its stored token; what it
    is). NaN where a row has none (null in the source, or masked with --keep-partial)."""
    from astropt_train.use import scalars as sc

    try:
        return sc.source_truth(store, rows, column, cfg.source), "source"
    except AstroptError as exc:
        print(f"note: {column} is scored against the codec's value of the stored token (no codec ceiling): {exc}",
              file=sys.stderr)
        return sc.codec_values_of(store, rows, column, values), "codec value of the stored token"


def scalar_scores(cfg: EvalConfig, model, store, rows: Rows, column: str, counted: np.ndarray, trained: dict,
                  run_config: dict | None, device: str) -> tuple[dict, dict]:
    """A scalar column's entry in eval.json and its per-row arrays for the figure: the model's median given the
    blocks before it (its own order; with --shuffle-modalities every other block when it begins the sequence)
    against the truth on the scored rows, beside the training rows' median truth (a model-free baseline) and the
    codec's value of the stored token (the quantisation ceiling). Rows without a truth or whose block is masked
    are left out and counted; photo-z scores for a redshift codec, residual scores otherwise."""
    from astropt_train.use import scalars as sc

    aion = store.modality_aion.get(column)
    redshift = sc.is_redshift(column, aion)
    entry: dict[str, Any] = {"aion_modality": aion, "redshift": redshift,
                             "scores": "photo-z: dz = (pred - true) / (1 + true); NMAD = 1.4826 median|dz - median dz|, "
                                       "outliers |dz| > 0.15, bias = median dz" if redshift else
                                       "residual pred - true in the column's units: NMAD, bias = median",
                             "prediction": "median of the model's probabilities over the codes (the first code whose "
                                           "cumulative probability reaches 0.5); 68% interval: 0.16 and 0.84"}
    shuffled = bool(((run_config or {}).get("train") or {}).get("shuffle_modalities"))
    try:
        context, order = sc.scalar_order(model, column, None, shuffled)
    except AstroptError as exc:
        return {**entry, "skipped": str(exc)}, {}
    try:
        codec = sc.store_codec(store, column, _codec_id(cfg, trained, store), device, cfg.accept_codec_change)
    except AstroptError as exc:
        if cfg.images:
            raise
        return {**entry, "skipped": f"--no-images and its codec cannot be loaded: {exc}"}, {}
    values = sc.scalar_values(codec)  # [V]
    if model.vocabs[model.names.index(column)] != len(values):
        raise AstroptError(f"{cfg.checkpoint} predicts {column} among {model.vocabs[model.names.index(column)]} codes, "
                           f"but its codec {codec.codec_id} has {len(values)}")
    scored = rows.scored
    valid = store.valid(scored)
    present = np.logical_and.reduce([valid[m] for m in [*context, column]]) if valid else np.ones(len(scored), bool)
    true, against = _truth_or_codec(cfg, store, scored, column, values)
    has_truth = np.isfinite(true)
    keep = present & has_truth
    use = scored[keep]
    given = np.concatenate([store.take(use, m).astype(np.int64) for m in context], axis=1)
    median, lo, hi = sc.scalar_distribution(sc.predict_probs(model, given, column, order, cfg.batch_size), values) \
        if len(use) else (np.zeros(0),) * 3
    truth = true[keep]
    # the baseline: one number for every galaxy, the median truth of the training rows the token baselines count
    train_truth, _ = _truth_or_codec(cfg, rows.training_store, counted, column, values)
    train_valid = rows.training_store.valid(counted).get(column, np.ones(len(counted), bool))
    train_truth = train_truth[np.isfinite(train_truth) & train_valid]
    entry.update({"against": against, "codec": codec.codec_id, "codes": int(len(values)),
                  "given": context, "order": "the model's own" if order is None else [model.names[i] for i in order],
                  "rows": int(len(use)),
                  "left_out": {"no_truth": int((present & ~has_truth).sum()), "masked": int((~present).sum())},
                  "model": sc.scores(median, truth, redshift)})
    base = float(np.median(train_truth)) if len(train_truth) else None
    scored_by = (np.full(len(truth), base), truth) if base is not None else (np.zeros(0), np.zeros(0))
    entry["baselines"] = {"training_median": {"value": base, "training_rows": int(len(train_truth)),
                                              **sc.scores(*scored_by, redshift)}}
    if against == "source":
        ceiling = sc.codec_values_of(store, use, column, values)  # the stored token's value, vs the truth
        entry["codec_ceiling"] = sc.scores(ceiling, truth, redshift)
    return entry, {"true": truth, "median": median, "lo": lo, "hi": hi, "against": against,
                   "legend": {"model": sc.score_text(entry["model"]),
                              "baseline": sc.score_text(entry["baselines"]["training_median"]),
                              **({"codec": sc.score_text(entry["codec_ceiling"])} if "codec_ceiling" in entry else {})}}


# ---------------------------------------------------------------------------------------------------------
# decoded and sampled scores


def image_metrics(reference: np.ndarray, candidate: np.ndarray, bands: list[str]) -> dict:
    """Explained variance (mean over bands, and per band) and colour RMS error (mean over neighbouring band
    pairs, mag) of `candidate` against `reference`, both [N, B, S, S]."""
    from astropt_tok.quality import band_scores, colour_scores

    ev = band_scores(reference, candidate)["explained_variance"]  # [B]
    colours = colour_scores(reference, candidate, bands)
    rms = [c["rms_mag"] for c in colours.values() if c["rms_mag"] is not None]
    one = [c["baseline_rms_mag"] for c in colours.values() if c["baseline_rms_mag"] is not None]
    return {"explained_variance": float(np.mean(ev)), "per_band": {b: float(v) for b, v in zip(bands, ev)},
            "colour_rms_mag": float(np.mean(rms)) if rms else None,
            "one_colour_rms_mag": float(np.mean(one)) if one else None}


def over_seeds(values: list[float | None]) -> dict:
    """{"model": mean, "spread": sample standard deviation (None for one seed), "per_seed": values}."""
    got = [v for v in values if v is not None]
    if not got:
        return {"model": None, "spread": None, "spread_of": None, "per_seed": values}
    spread = float(np.std(got, ddof=1)) if len(got) > 1 else None
    return {"model": float(np.mean(got)), "spread": spread, "spread_of": "standard deviation over seeds",
            "per_seed": values}


class _Survey:
    """One image modality's reference images, codec reconstructions and average training image, for some rows."""

    def __init__(self, cfg: EvalConfig, store, column, bands: list[str], rows: np.ndarray, training: np.ndarray,
                 training_store, codec):
        from astropt_train.use.decode import _read_originals, _source_rereadable, decode_tokens

        self.cfg, self.codec, self.bands = cfg, codec, bands
        self.stored = store.take(rows, column).astype(np.int64)  # [n, T]
        self.recon = self.decode(self.stored)
        self.against = "codec reconstruction"
        self.original = None
        if _source_rereadable(store.manifest):
            try:
                self.original = _read_originals(store, rows, bands, 96, cfg.source, column=column)
                self.against = "original"
            except AstroptError as exc:
                print(f"note: image scores are against the codec reconstruction: {exc}", file=sys.stderr)
        self.reference = self.original if self.original is not None else self.recon
        from astropt_train.token_scores import seeded_subset

        mean_rows = seeded_subset(training, MEAN_IMAGE_ROWS, [1, SAMPLE_STREAM])
        valid = training_store.valid(mean_rows).get(column or (training_store.modalities or [None])[0])
        if valid is not None:
            mean_rows = mean_rows[valid]
        if self.original is not None and _source_rereadable(training_store.manifest):
            mean = _read_originals(training_store, mean_rows, bands, 96, cfg.source, column=column).mean(0)
        else:
            mean = decode_tokens(codec, training_store.take(mean_rows, column).astype(np.int64), bands,
                                 cfg.batch_size).mean(0)
        self.mean_image = np.broadcast_to(mean, self.reference.shape)  # [n, B, 96, 96]

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        from astropt_train.use.decode import decode_tokens

        return decode_tokens(self.codec, tokens, self.bands, self.cfg.batch_size)

    def baselines(self, position_tokens: np.ndarray) -> dict:
        """Image scores of the position map's tokens, the average training image and the codec's reconstruction."""
        out = {"position": image_metrics(self.reference, self.decode(position_tokens), self.bands),
               "mean_image": image_metrics(self.reference, self.mean_image, self.bands)}
        if self.original is not None:
            out["codec"] = image_metrics(self.original, self.recon, self.bands)
        return out


def _sampled_entry(token_agreement: list[float], images: list[dict], baseline_agreement: float, baselines: dict,
                   against: str) -> dict:
    """eval.json's form of one sampled task: each metric over seeds beside its baselines."""
    entry = {"against": against,
             "token_agreement": {**over_seeds(token_agreement), "baselines": {"position": baseline_agreement}}}
    for metric in ("explained_variance", "colour_rms_mag"):
        entry[metric] = {**over_seeds([m[metric] for m in images]),
                         "baselines": {b: v[metric] for b, v in baselines.items()}}
        if metric == "colour_rms_mag" and images and images[0].get("one_colour_rms_mag") is not None:
            entry[metric]["baselines"]["one_colour"] = images[0]["one_colour_rms_mag"]
    entry["per_band_explained_variance"] = {
        b: {**over_seeds([m["per_band"][b] for m in images]),
            "baselines": {k: v["per_band"][b] for k, v in baselines.items()}} for b in (images[0]["per_band"] if images else {})}
    return entry


def _codec_id(cfg: EvalConfig, trained: dict, store) -> str:
    """--codec, else the codec the model's tokens came from, else the store's."""
    return cfg.codec or trained.get("codec_id") or store.codec_id


def _image_scores(cfg: EvalConfig, model, store, rows: Rows, columns: dict, baselines: dict, trained: dict,
                  report: dict, device: str) -> None:
    """Completion per modality and, for several image columns, each cross-survey direction, over the seeds."""
    from astropt_tok.artifacts import check_store_codec
    from astropt_tok.codec import load_image_codec
    from astropt_train.use.decode import cross_survey_tokens

    codec = load_image_codec(str(_codec_id(cfg, trained, store)), device=device)
    # its weights made the scored store's tokens and those the model learned (a refitted codec folder draws
    # other images from the same ids)
    notes = check_store_codec(f"token store {store.dir}", store.manifest.get("codec") or {}, codec,
                              cfg.accept_codec_change)
    if trained:
        notes += check_store_codec("the token store the checkpoint was trained on",
                                   {"id": trained.get("codec_id"), "weights_sha256": trained.get("codec_sha256")},
                                   codec, cfg.accept_codec_change)
    for note in notes:
        print(note, file=sys.stderr)
    if codec.vocab_size != store.vocab_size or codec.tokens_per_image != store.tokens_per_image:
        raise AstroptError(f"codec {codec.codec_id} ({codec.vocab_size} tokens, {codec.tokens_per_image} per image) "
                           f"did not make store {store.dir} ({store.vocab_size}, {store.tokens_per_image})")
    T = store.tokens_per_image
    keep = cfg.complete_from or T // 2
    names = list(columns)
    valid = store.valid(rows.scored)
    has_all = np.logical_and.reduce([valid.get(c, np.ones(len(rows.scored), bool)) for c in columns.values()]
                                    ) if valid else np.ones(len(rows.scored), bool)
    chosen = sample_rows(rows.scored[has_all], cfg.sample_rows)
    if not len(chosen):
        report["sampling"] = {"rows": 0, "note": "no scored row has every modality of the model"}
        return
    report["sampling"] = {"rows": int(len(chosen)), "seeds": list(range(cfg.seeds)), "temperature": cfg.temperature,
                          "top_k": cfg.top_k, "complete_from": keep, "codec": codec.codec_id}
    position_maps = {m: b.position_tokens() for m, b in baselines.items()}
    surveys = {}
    for m, column in columns.items():
        if column is not None and store.modality_kind.get(column, "image") != "image":
            continue  # a scalar or spectrum block: scored by `scalar_report`, read here as context only
        bands = store.modality_bands.get(column, store.bands) if column else store.bands
        surveys[m] = _Survey(cfg, store, column, list(bands), chosen, rows.training, rows.training_store, codec)
    stored = {m: surveys[m].stored if m in surveys else store.take(chosen, columns[m]).astype(np.int64)
              for m in names}

    for k, m in enumerate(names):  # completion: blocks before m as stored, then the first `keep` tokens of m
        if m not in surveys:
            continue
        s = surveys[m]
        prefix = np.concatenate([stored[n] for n in names[:k]] + [s.stored[:, :keep]], axis=1)
        agree, images = [], []
        for seed in range(cfg.seeds):
            done = _continue(model, prefix, T - keep, cfg, seed, codec.vocab_size)[:, -T:]
            agree.append(float((done[:, keep:] == s.stored[:, keep:]).mean()))
            images.append(image_metrics(s.reference, s.decode(done), s.bands))
        pos_fill = np.concatenate([s.stored[:, :keep], np.broadcast_to(position_maps[m][keep:], (len(chosen), T - keep))], 1)
        base_agree = float((pos_fill[:, keep:] == s.stored[:, keep:]).mean())
        report["modalities"][m]["completion"] = {
            "kept": keep, **_sampled_entry(agree, images, base_agree, s.baselines(pos_fill), s.against)}

    image_names = [m for m in names if m in surveys]
    if len(image_names) > 1:
        report["cross_survey"] = {}
        for given in image_names:
            for wanted in image_names:
                if given == wanted:
                    continue
                s = surveys[wanted]
                agree, images = [], []
                for seed in range(cfg.seeds):
                    drawn = cross_survey_tokens(model, stored[given], given, wanted, cfg.temperature, cfg.top_k, seed,
                                                cfg.batch_size)
                    agree.append(float((drawn == s.stored).mean()))
                    images.append(image_metrics(s.reference, s.decode(drawn), s.bands))
                pos_tokens = np.broadcast_to(position_maps[wanted], s.stored.shape)
                entry = _sampled_entry(agree, images, float((pos_tokens == s.stored).mean()),
                                       s.baselines(np.ascontiguousarray(pos_tokens)), s.against)
                report["cross_survey"][f"{given}->{wanted}"] = {"given": given, "generated": wanted, **entry}


def _continue(model, prefix: np.ndarray, new: int, cfg: EvalConfig, seed: int, vocab: int) -> np.ndarray:
    """Sample `new` tokens after each prefix row (the model's default block order): [n, K] -> [n, K + new]."""
    import torch

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i in range(0, len(prefix), cfg.batch_size):
        p = torch.as_tensor(np.ascontiguousarray(prefix[i : i + cfg.batch_size]), device=device)
        out.append(model.generate(p, new, temperature=cfg.temperature, top_k=cfg.top_k, generator=gen,
                                  vocab_limit=vocab).cpu().numpy())
    return np.concatenate(out).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# the figure and the table


def _fmt(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table_rows(report: dict) -> list[tuple[str, ...]]:
    """(modality or direction, score, model, spread, position, bigram, unigram, mean image, codec) per line."""
    out = []
    for m, entry in report["modalities"].items():
        for metric in ("loss", "perplexity", "accuracy", "top5_accuracy"):
            e = entry["tokens"][metric]
            b = e["baselines"]
            digits = 2 if metric == "perplexity" else 3
            out.append((m, f"teacher-forced {metric.replace('_', ' ')}", _fmt(e["model"], digits),
                        _fmt(e["spread"], digits), _fmt(b["position"], digits), _fmt(b["bigram"], digits),
                        _fmt(b["unigram"], digits), "", ""))
        if "completion" in entry:
            out += _sampled_rows(m, "completion", entry["completion"])
    for direction, entry in (report.get("cross_survey") or {}).items():
        out += _sampled_rows(direction.replace("->", " -> "), "drawn", entry)
    return out


SCALAR_HEADER = ("modality", "score", "model", "training median", "codec ceiling", "rows")
SCALAR_SCORES = (("nmad", "NMAD"), ("outlier_frac", "outlier fraction"), ("bias", "bias (median)"))


def scalar_rows(report: dict) -> list[tuple[str, ...]]:
    """(modality, score, model, training-median baseline, codec ceiling, rows scored) per scalar score."""
    out = []
    for m, entry in report["modalities"].items():
        e = entry.get("scalar")
        if not e:
            continue
        if "skipped" in e:
            out.append((m, "not scored", "-", "-", "-", e["skipped"]))
            continue
        left = e["left_out"]
        count = f"{e['rows']} (left out: {left['no_truth']} without truth, {left['masked']} masked)"
        kind = "photo-z " if e["redshift"] else ""
        for key, label in SCALAR_SCORES:
            if key not in e["model"]:
                continue
            out.append((m, kind + label, _fmt(e["model"][key], 4), _fmt(e["baselines"]["training_median"][key], 4),
                        _fmt((e.get("codec_ceiling") or {}).get(key), 4), count))
    return out


def _sampled_rows(who: str, what: str, entry: dict) -> list[tuple[str, ...]]:
    rows = []
    for metric, label in (("token_agreement", "token agreement"), ("explained_variance", "explained variance"),
                          ("colour_rms_mag", "colour RMS (mag)")):
        e = entry[metric]
        b = e["baselines"]
        image = metric != "token_agreement"
        rows.append((who, f"{what}: {label}", _fmt(e["model"]), _fmt(e["spread"]), _fmt(b.get("position")), "", "",
                     _fmt(b.get("mean_image")) if image else "", _fmt(b.get("codec")) if image else ""))
    return rows


TABLE_HEADER = ("modality", "score", "model", "spread", "position", "bigram", "unigram", "mean image", "codec")
HEADLINE_KEYS = ("what", "score", "model", "baselines", "ceiling")
BASELINE_NAMES = {"position": "position map", "bigram": "bigram", "unigram": "unigram", "mean_image": "mean image",
                  "one_colour": "one colour"}


def _pm(e: dict, digits: int = 3) -> str:
    """"0.606 ± 0.004" (model and spread) or the model alone."""
    if e["model"] is None:
        return "-"
    return f"{e['model']:.{digits}f}" + (f" ± {e['spread']:.{digits}f}" if e.get("spread") is not None else "")


def _baseline_text(e: dict, names=("position", "bigram", "unigram", "mean_image", "one_colour")) -> str:
    return ", ".join(f"{BASELINE_NAMES[n]} {e['baselines'][n]:.3f}" for n in names
                     if e["baselines"].get(n) is not None)


def headline_rows(report: dict) -> list[tuple[str, str, str, str, str]]:
    """The few scores a newcomer reads first, each beside its baselines: (what, score, model ± spread,
    baselines, the codec's ceiling)."""
    out = []
    for m, entry in report["modalities"].items():
        t = entry["tokens"]
        out.append((m, "next-token accuracy", _pm(t["accuracy"]), _baseline_text(t["accuracy"]), ""))
        out.append((m, "validation loss (nats)", _pm(t["loss"]), _baseline_text(t["loss"]), ""))
        if "completion" in entry:
            c = entry["completion"]
            out.append((m, f"completion from {c['kept']}: token agreement", _pm(c["token_agreement"]),
                        _baseline_text(c["token_agreement"]), ""))
            out.append((m, f"completion from {c['kept']}: explained variance", _pm(c["explained_variance"]),
                        _baseline_text(c["explained_variance"]), _fmt(c["explained_variance"]["baselines"].get("codec"))))
        e = entry.get("scalar") or {}
        if e.get("model", {}).get("n"):
            base, ceiling = e["baselines"]["training_median"], e.get("codec_ceiling") or {}
            out.append((m, "photo-z NMAD" if e["redshift"] else "NMAD of pred - true", _fmt(e["model"]["nmad"], 4),
                        f"training median {_fmt(base['nmad'], 4)}", _fmt(ceiling.get("nmad"), 4)))
    for direction, c in (report.get("cross_survey") or {}).items():
        who = direction.replace("->", " -> ")
        out.append((who, "drawn: explained variance", _pm(c["explained_variance"]),
                    _baseline_text(c["explained_variance"]), _fmt(c["explained_variance"]["baselines"].get("codec"))))
        out.append((who, "drawn: colour RMS error (mag)", _pm(c["colour_rms_mag"]),
                    _baseline_text(c["colour_rms_mag"]), _fmt(c["colour_rms_mag"]["baselines"].get("codec"))))
    return out


def sampling_line(report: dict) -> str:
    """How the sampled scores were drawn, for a caption."""
    s = report.get("sampling") or {}
    if not s.get("rows"):
        return "no sampled scores; ± is the standard error over rows (teacher-forced scores)"
    return (f"sampled scores: {s['rows']} held-out rows x {len(s['seeds'])} seeds ({s['seeds'][0]}..{s['seeds'][-1]}), "
            f"temperature {s['temperature']}, top-k {s['top_k']}; ± is the standard deviation over seeds "
            "(teacher-forced scores: the standard error over rows)")


def print_table(result: EvalResult, console=None) -> None:
    """The report as a table: every model score beside its baselines and spread."""
    from astropt_tok.report import folding_table, output_console

    console = console or output_console()
    rep = result.report
    s = rep.get("sampling") or {}
    title = f"eval of {rep['checkpoint']['path']} (step {rep['checkpoint']['step']}) on {rep['rows']['count']} rows"
    table = folding_table(*TABLE_HEADER, title=title)
    for row in table_rows(rep):
        table.add_row(*row)
    console.print(table)
    scalars = scalar_rows(rep)
    if scalars:
        st = folding_table(*SCALAR_HEADER, title="catalogue numbers: the model's median given the blocks before "
                           "them, vs the truth")
        for row in scalars:
            st.add_row(*row)
        console.print(st)
        console.print("photo-z: dz = (pred - true) / (1 + true), NMAD = 1.4826 median|dz - median dz|, outliers "
                      "|dz| > 0.15, bias = median dz; other numbers: the same of pred - true in their units; training "
                      "median: one number for every galaxy; codec ceiling: the stored token's value", highlight=False)
    console.print(sampling_line(rep) + "; '-': no value (e.g. no galaxy with positive flux in every band for "
                  "colours)", highlight=False)
    if s.get("rows"):
        against = {e.get("against") for e in _sampled(rep)}
        console.print(f"completion keeps {s['complete_from']} tokens; image scores against the "
                      f"{' / '.join(sorted(against))}; codec: its own reconstruction (the ceiling)", highlight=False)
    console.print(f"wrote {result.out}" + (f" and {result.figure}" if result.figure else ""), highlight=False)


def _sampled(report: dict) -> list[dict]:
    """Every sampled entry of a report: completions, then cross-survey directions."""
    return [e["completion"] for e in report["modalities"].values() if "completion" in e] + \
        list((report.get("cross_survey") or {}).values())


def write_figure(report: dict, by_position: dict, path: Path, scatter: dict | None = None) -> Path:
    """Accuracy by block position (model and token baselines) per modality, the sampled explained variance
    (mean and spread over seeds) beside the image baselines, and per scalar modality (`scatter`: its truth and
    the model's median and 68% interval per row) the prediction against the truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from astropt_train.metrics import write_png

    names = list(report["modalities"])
    sampled = [(f"{m}\ncompletion", e["completion"]) for m, e in report["modalities"].items() if "completion" in e]
    sampled += [(d, e) for d, e in (report.get("cross_survey") or {}).items()]
    scatter = {m: d for m, d in (scatter or {}).items() if len(d.get("true", ()))}
    fig, axes = plt.subplots(1, 2 + len(scatter), figsize=(12 + 4.6 * len(scatter), 4.2), dpi=100)
    ax = axes[0]
    colours = {"model": "C0", "position": "C1", "bigram": "C2", "unigram": "C3"}
    for m in names:
        for scorer, acc in by_position[m].items():
            T = len(acc)
            bins = max(1, T // 24)  # one point per row of the token grid (24 for AION's 576)
            usable = acc[: T - T % bins].reshape(-1, bins)
            with np.errstate(invalid="ignore"):
                y = np.nanmean(np.where(np.isnan(usable), np.nan, usable), axis=1)
            ax.plot(np.arange(len(y)) * bins, y, color=colours[scorer], ls="-" if m == names[0] else "--",
                    label=f"{scorer}" + (f" ({m})" if len(names) > 1 else ""), lw=1.2)
    ax.set_xlabel("token position within the image")
    ax.set_ylabel("teacher-forced accuracy")
    ax.set_title("next-token accuracy: model vs token baselines", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    if sampled:
        labels, width, lowest = [], 0.2, 0.0
        for i, (who, e) in enumerate(sampled):
            ev = e["explained_variance"]
            bars = [("model", ev["model"], ev["spread"]), ("position map", ev["baselines"].get("position"), None),
                    ("mean image", ev["baselines"].get("mean_image"), None), ("codec", ev["baselines"].get("codec"), None)]
            for j, (name, v, err) in enumerate(bars):
                if v is None:
                    continue
                lowest = min(lowest, v - (err or 0.0))
                x = i + (j - 1.5) * width
                ax.bar(x, max(v, FLOOR), width, yerr=err if v > FLOOR else None, color=f"C{j}", capsize=3,
                       label=name if i == 0 else None)
                if v < FLOOR:  # far below zero (worse than each image's own mean): drawn cut, its value written
                    ax.text(x, FLOOR, f"{v:.3g}", rotation=90, ha="center", va="bottom", fontsize=6)
            labels.append(who.replace("->", "\n-> ") if "\n" not in who else who)
        ax.set_xticks(range(len(sampled)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_ylim(max(FLOOR, lowest) - 0.05, 1.05)
        s = report["sampling"]
        ax.set_title(f"explained variance vs {sampled[0][1]['against']} ({s['rows']} rows, seeds "
                     f"{s['seeds'][0]}..{s['seeds'][-1]}, T={s['temperature']}, top-k={s['top_k']})", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "no sampled scores", ha="center")
    for ax, (m, d) in zip(axes[2:], scatter.items()):
        _scalar_panel(ax, m, d)
    fig.tight_layout()
    return write_png(fig, path)


def _scalar_panel(ax, name: str, d: dict) -> None:
    """The model's median (68% bars) against the truth, the diagonal, the scores in the legend."""
    true, median = d["true"], d["median"]
    a, b = float(min(true.min(), d["lo"].min())), float(max(true.max(), d["hi"].max()))
    ax.plot([a, b], [a, b], color="k", lw=0.8, label="y = x")
    ax.errorbar(true, median, yerr=[median - d["lo"], d["hi"] - median], fmt="o", ms=3, color="C0", elinewidth=0.7,
                label=f"model median, 68%: {d['legend']['model']}")
    ax.plot([], [], " ", label=f"training median: {d['legend']['baseline']}")
    if d["legend"].get("codec"):
        ax.plot([], [], " ", label=f"codec ceiling: {d['legend']['codec']}")
    ax.set_xlabel(f"true {name} ({d['against']})")
    ax.set_ylabel(f"predicted {name}")
    ax.set_title(f"{name}: predicted from the blocks before it", fontsize=9)
    ax.legend(fontsize=6, loc="upper left")
    ax.grid(alpha=0.3)
