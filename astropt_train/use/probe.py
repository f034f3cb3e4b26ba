"""`astropt probe`: linear probes of embeddings on catalogue columns, with k-fold CV and two baselines.

The embeddings are joined with a catalogue by object id (the survey's own parquet files, or any parquet/CSV
file with an id column). Per target:
  regression      standardised features -> ridge regression, its alpha chosen per fold by efficient
                  leave-one-out CV over a small grid (scikit-learn `RidgeCV`); scores R², MAE and NMAD
  classification  standardised features -> multinomial logistic regression; scores accuracy and macro F1
NMAD = 1.4826 median(|dz - median(dz)|) with dz = prediction - truth, or, for a redshift-like target (its name
is `z` or contains "redshift", or ends in "_z"), the usual photometric-redshift form dz = (prediction - truth)
/ (1 + truth). Every score is the mean over the k test folds, with the standard deviation over folds as its
spread. The same folds are scored for two baselines: embeddings of the same rows from a randomly initialised
model of the same shape (seeded; embedded here with the same pooling and layer), and the real embeddings with
shuffled labels.

Guards with numbers: nothing is silently dropped or kept, and report.json holds only finite numbers or null.
  - An object id that appears twice in the catalogue (among the embedded galaxies), or twice among the
    embeddings, is one error naming the id column, how many ids repeat and one of them: which row's label
    (or embedding) is the galaxy's is not ours to guess, and a galaxy in both a training and a test fold
    inflates every score.
  - Left out and counted per target (`left_out`): no catalogue row (`no_label_row`), no embedding in the
    column (`no_embedding`, a --keep-partial store's missing image), a null label (`missing_label`), NaN or
    infinite (`non_finite_label`), a regression label beyond +-OVERFLOW_LABEL (`overflowing_label`: the ridge
    and R² square labels, and float64 overflows near 1e308), and members of a class seen only once
    (`rare_class`: a class needs a member in a training fold and one to test). When too few rows are left,
    one error.
"""

from __future__ import annotations

import glob
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from astropt_tok.errors import AstroptError

TASKS = ("auto", "regression", "classification")
ALPHAS = np.logspace(-2, 4, 7)  # ridge strengths tried by RidgeCV in each training fold
RANDOM_INIT = "random-init-embeddings"  # OUT/RANDOM_INIT: the random-init baseline's embeddings store
MAX_CLASSES = 20  # an integer or string column with at most this many distinct values is a class label (auto)
# |label| beyond this is left out of a regression (`overflowing_label`): squares and sums of squares of labels
# (centring, the ridge's closed form, R²) then stay far below float64's 1.8e308; no physical catalogue column
# in any sane unit comes near it
OVERFLOW_LABEL = 1e100
MIN_CLASS_MEMBERS = 2  # a class seen fewer times is left out (`rare_class`): one to train on, one to test


@dataclass
class ProbeConfig:
    """Everything `astropt probe` needs; every flag is one field."""

    embeddings: Path | str
    labels: str  # parquet/CSV file, folder or glob
    targets: list[str]
    out: Path | str = "probe"
    task: str = "auto"
    id_column: str = "object_id"
    folds: int = 5
    column: str | None = None  # embeddings column (default: the store's first layer)
    seed: int = 0
    random_init_seed: int = 0
    device: str = "cpu"
    batch_size: int = 32
    pictures: bool = True
    progress: bool = False
    overwrite: bool = False  # replace a report in `out` of other embeddings
    baseline_features: list[str] = field(default_factory=list)  # catalogue columns probed alone ("beyond them?")


@dataclass
class ProbeResult:
    """report.json's content and where it was written."""

    out: Path
    report: dict = field(default_factory=dict)


# the other half of a two-part redshift column name: photo_z, z_spec, zphot, z_best, ... (but not FLUX_Z or MAG_Z,
# which are the z band)
_REDSHIFT_KINDS = ("photo", "phot", "spec", "best", "true", "cmb", "helio", "mean", "median")


def is_redshift_like(name: str) -> bool:
    """Whether NMAD of `name` uses dz / (1 + z): `z`, anything with `redshift`, or z with a redshift kind
    (photo_z, z_spec, zphot, spec-z); a band's column (FLUX_Z, mag_z) is not."""
    n = name.lower().replace("-", "_")
    if n == "z" or "redshift" in n:
        return True
    parts = n.split("_")
    if len(parts) == 2 and "z" in parts:
        other = parts[1] if parts[0] == "z" else parts[0]
        return other in _REDSHIFT_KINDS
    return any(n in (f"z{kind}", f"{kind}z") for kind in _REDSHIFT_KINDS)


def nmad(pred: np.ndarray, true: np.ndarray, redshift: bool) -> float:
    """1.4826 median(|dz - median(dz)|), dz = pred - true, or divided by (1 + true) for redshifts."""
    dz = pred - true
    if redshift:
        dz = dz / (1.0 + true)
    return float(1.4826 * np.median(np.abs(dz - np.median(dz))))


# ---------------------------------------------------------------------------------------------------------
# labels


def _label_files(spec: str) -> list[Path]:
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in (".parquet", ".csv") and f.is_file())
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(spec))
    if not files:
        raise AstroptError(f"--labels {spec}: no parquet or CSV file there")
    return files


def read_labels(spec: str, id_column: str, targets: list[str]) -> dict[str, np.ndarray]:
    """{id_column: ids as str, target: values} from parquet/CSV files, reading only those columns."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    wanted = [id_column] + [t for t in targets if t != id_column]
    tables = []
    for f in _label_files(spec):
        try:
            if f.suffix.lower() == ".csv":
                table = pacsv.read_csv(f)
            else:
                names = pq.ParquetFile(f).schema_arrow.names
                missing = [c for c in wanted if c not in names]
                if missing:
                    raise AstroptError(f"labels file {f} has no column {missing[0]!r} (it has {', '.join(names[:12])})")
                table = pq.read_table(f, columns=wanted)
        except (OSError, pa.ArrowInvalid) as exc:
            raise AstroptError(f"labels file {f} is unreadable: {exc}") from None
        missing = [c for c in wanted if c not in table.column_names]
        if missing:
            raise AstroptError(f"labels file {f} has no column {missing[0]!r}")
        tables.append(table.select(wanted))
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise AstroptError(f"--labels {spec}: the files' columns disagree in type ({exc})") from None
    out = {id_column: np.array([str(x) if x is not None else None for x in table.column(id_column).to_pylist()],
                               dtype=object)}
    for t in targets:
        kind = table.column(t).type
        if pa.types.is_nested(kind):
            raise AstroptError(f"--target {t}: column {t!r} of {spec} holds {str(kind).split('<')[0]} values, not "
                               "one number or class per galaxy: probe a scalar column")
        out[t] = np.array(table.column(t).to_pylist(), dtype=object)
    return out


def _task_of(values: np.ndarray, task: str) -> str:
    if task != "auto":
        return task
    present = [v for v in values if v is not None]
    if any(isinstance(v, (str, bool)) for v in present):
        return "classification"
    if all(isinstance(v, (int, np.integer)) for v in present) and len(set(present)) <= MAX_CLASSES:
        return "classification"
    return "regression"


def _clean(values: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(kept mask, values, {reason: mask of rows left out for it}): null labels (`missing_label`), NaN or
    infinite ones (`non_finite_label`) and, for a regression, ones beyond +-OVERFLOW_LABEL (`overflowing_label`)."""
    missing = np.array([v is None for v in values], dtype=bool)
    if task == "regression":
        y = np.zeros(len(values))
        for i, v in enumerate(values):
            try:
                y[i] = float(v) if v is not None else 0.0
            except (TypeError, ValueError):
                raise AstroptError(f"label {v!r} is not a number: use --task classification") from None
            except OverflowError:  # an integer too large for a float64
                y[i] = np.inf
        non_finite = ~missing & ~np.isfinite(y)
        with np.errstate(invalid="ignore"):
            overflowing = ~missing & ~non_finite & (np.abs(y) > OVERFLOW_LABEL)
        out = {"missing_label": missing, "non_finite_label": non_finite, "overflowing_label": overflowing}
        return ~(missing | non_finite | overflowing), y, out
    non_finite = np.array([isinstance(v, (float, np.floating)) and not np.isfinite(v) for v in values], dtype=bool)
    out = {"missing_label": missing, "non_finite_label": non_finite,
           "overflowing_label": np.zeros(len(values), dtype=bool)}  # a class is a name: no arithmetic on it
    return ~(missing | non_finite), np.array([str(v) for v in values], dtype=object), out


def _rare_classes(y: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Rows of `keep` whose class has fewer than MIN_CLASS_MEMBERS kept members (a mask)."""
    classes, counts = np.unique(y[keep], return_counts=True)
    rare = set(classes[counts < MIN_CLASS_MEMBERS].tolist())
    return keep & np.array([v in rare for v in y], dtype=bool)


def _repeated(ids, what: str, where: str) -> None:
    """One error when an id occurs more than once in `ids` (None ignored), naming how many and one example."""
    from collections import Counter

    counts = Counter(i for i in ids if i is not None)
    repeated = [(i, c) for i, c in counts.items() if c > 1]
    if repeated:
        example, times = repeated[0]
        raise AstroptError(f"{where} repeats {len(repeated)} object id{'s' if len(repeated) > 1 else ''} (e.g. "
                           f"{example!r}, {times} times) {what}")


# ---------------------------------------------------------------------------------------------------------
# fitting


def _folds(y: np.ndarray, task: str, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    import warnings

    from sklearn.model_selection import KFold, StratifiedKFold

    if task == "classification":
        # stratified (_prepare_target checked that the largest class fills the k folds): a class of m >= 2
        # members (rare ones are left out) then lies in m different folds, so every training fold holds every class
        with warnings.catch_warnings():  # "the least populated class has only m members": known, intended
            warnings.simplefilter("ignore", UserWarning)
            return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    return list(KFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y))))


def _probe(task: str):
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if task == "regression":
        return make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS))
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))


def cross_validate(x: np.ndarray, y: np.ndarray, task: str, folds, redshift: bool) -> dict:
    """Fit the probe on each training fold, score its test fold: {scores, spread, per_fold, predictions}."""
    from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, r2_score

    per_fold: dict[str, list[float]] = {}
    pred = np.empty(len(y), dtype=y.dtype)
    for train, test in folds:
        if task == "classification" and len(np.unique(y[train])) < 2:
            # one class in a training fold (the shuffled-labels baseline can put a small class's every member in
            # one test fold): what any classifier learns from it is that class
            p = np.full(len(test), y[train][0], dtype=y.dtype)
        else:
            p = _probe(task).fit(x[train], y[train]).predict(x[test])
        pred[test] = p
        if task == "regression":
            scores = {"r2": r2_score(y[test], p), "mae": mean_absolute_error(y[test], p),
                      "nmad": nmad(p.astype(float), y[test].astype(float), redshift)}
        else:
            scores = {"accuracy": accuracy_score(y[test], p),
                      "f1_macro": f1_score(y[test], p, average="macro", zero_division=0)}
        for k, v in scores.items():
            per_fold.setdefault(k, []).append(float(v))
    return {"scores": {k: float(np.mean(v)) for k, v in per_fold.items()},
            "spread": {k: float(np.std(v)) for k, v in per_fold.items()}, "per_fold": per_fold, "predictions": pred}


# ---------------------------------------------------------------------------------------------------------
# the command


def _check_baseline_sources(cfg: ProbeConfig, manifest: dict) -> None:
    """The random-init baseline re-embeds the embeddings' token store with their checkpoint's shape: both must be
    here and unchanged since the embeddings were written (a re-tokenised store holds other galaxies in its rows,
    a changed checkpoint is another model), checked before anything is written."""
    from astropt_tok.artifacts import check_embeddings_sources
    from astropt_tok.store import manifest_sha256, sha256_path

    ck, tokens = (v if isinstance(v, dict) else {} for v in (manifest.get("checkpoint"), manifest.get("tokens")))
    if not isinstance(ck.get("path"), str) or not Path(ck["path"]).exists():
        raise AstroptError(f"the random-init baseline needs the checkpoint the embeddings came from, {ck.get('path')}, "
                           "which is not here")
    if not isinstance(tokens.get("dir"), str) or not Path(tokens["dir"]).exists():
        raise AstroptError(f"the random-init baseline needs the token store {tokens.get('dir')}, which is not here")
    weights = Path(ck["path"])
    if weights.is_dir():  # one of our checkpoint folders (an upstream ckpt.pt is recorded as the file itself)
        from astropt_train.checkpoint import is_checkpoint, weights_sha256

        weights_sha = weights_sha256(weights) if is_checkpoint(weights) else None
    else:
        weights_sha = sha256_path(weights) if weights.is_file() else None
    store_manifest = Path(tokens["dir"]) / "manifest.json"
    check_embeddings_sources(cfg.embeddings, {"checkpoint": ck, "tokens": tokens},
                             manifest_sha256(tokens["dir"]) if store_manifest.is_file() else None, weights_sha)


def _random_init_embeddings(cfg: ProbeConfig, manifest: dict, out: Path) -> Path:
    """Embed the store rows of `manifest` with a fresh model of the same shape (seeded), same pooling and layers."""
    from astropt_train.use.embed import EmbedConfig, embed

    ck = manifest["checkpoint"]
    start, stop = manifest["store_rows"]
    dest = out / RANDOM_INIT
    embed(EmbedConfig(checkpoint=ck["path"], out=dest, tokens=manifest["tokens"]["dir"], step=None,
                      pool=manifest["pool"], layers=",".join(lay["name"] for lay in manifest["layers"]),
                      rows=f"{start}:{stop}", batch_size=cfg.batch_size, device=cfg.device, dtype=manifest["dtype"],
                      random_init_seed=cfg.random_init_seed, overwrite=True, progress=cfg.progress))
    return dest


def _catalogue_features(cfg: ProbeConfig, labels: dict, at: np.ndarray, found: np.ndarray
                        ) -> tuple[np.ndarray | None, np.ndarray]:
    """(features [rows, k] float64 of --baseline-features, per embedded row (NaN where absent), and the mask of
    rows that have every one as a finite number of at most OVERFLOW_LABEL); (None, all True) without them."""
    if not cfg.baseline_features:
        return None, np.ones(len(at), dtype=bool)
    cols = []
    for name in cfg.baseline_features:
        raw = np.where(found, labels[name][np.where(found, at, 0)], None)
        values = np.full(len(raw), np.nan)
        for i, v in enumerate(raw):
            if v is None:
                continue
            if isinstance(v, (str, bytes)) or not isinstance(v, (int, float, np.integer, np.floating, bool)):
                raise AstroptError(f"--baseline-features {name}: column {name!r} of {cfg.labels} holds "
                                   f"{type(v).__name__} values such as {v!r}, not numbers: name numeric catalogue "
                                   "columns (a magnitude, a size)")
            try:
                values[i] = float(v)
            except OverflowError:
                values[i] = np.inf
        cols.append(values)
    features = np.stack(cols, axis=1)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(features).all(axis=1) & (np.abs(features) <= OVERFLOW_LABEL).all(axis=1)
    return features, ok


def _prepare_target(cfg: ProbeConfig, target: str, labels: dict, at: np.ndarray, found: np.ndarray,
                    embedded: np.ndarray, has_features: np.ndarray) -> tuple[str, np.ndarray, np.ndarray, dict]:
    """(task, kept rows mask, their labels, left-out counts by reason) of one target; too few rows for the folds
    (two per fold; for classes, a largest class smaller than the folds), too many classes, one class or one value
    is one error."""
    raw = np.where(found, labels[target][np.where(found, at, 0)], None)
    task = _task_of(raw[found], cfg.task)
    keep, y, why = _clean(raw, task)
    usable = found & embedded
    keep &= usable
    no_feature = keep & ~has_features  # a row without a catalogue feature is no row of any score
    keep &= has_features
    if task == "classification" and len(np.unique(y[keep])) > int(keep.sum()) // 2:  # before rare classes go
        raise AstroptError(f"target {target!r} has {len(np.unique(y[keep]))} classes among {int(keep.sum())} "
                           "labelled rows, too few rows per class to learn from: use --task regression for a "
                           "continuous column")
    rare = _rare_classes(y, keep) if task == "classification" else np.zeros(len(y), dtype=bool)
    keep &= ~rare
    left_out = {"no_label_row": int((~found).sum()), "no_embedding": int((found & ~embedded).sum()),
                **{reason: int((mask & usable).sum()) for reason, mask in why.items()},
                "rare_class": int(rare.sum())}
    if cfg.baseline_features:
        left_out["missing_feature"] = int(no_feature.sum())
    n = int(keep.sum())
    if n < 2 * cfg.folds:
        counted = ", ".join(f"{k} {v}" for k, v in left_out.items() if v)
        raise AstroptError(f"target {target!r}: only {n} rows have a label, too few for {cfg.folds} folds "
                           f"(--folds; at least {2 * cfg.folds} rows: two per fold)"
                           + (f" (left out: {counted}; |label| above {OVERFLOW_LABEL:g} overflows)"
                              if left_out["overflowing_label"] else f" (left out: {counted})" if counted else ""))
    yk = y[keep]
    if task == "classification" and len(np.unique(yk)) < 2:
        raise AstroptError(f"target {target!r} has a single class"
                           + (f" once {left_out['rare_class']} rows of classes seen once are left out"
                              if left_out["rare_class"] else "") + "; nothing to classify")
    if task == "classification":
        largest = int(np.unique(yk, return_counts=True)[1].max())
        if largest < cfg.folds:  # stratified folds need one class with a member in each of the k test folds
            raise AstroptError(f"target {target!r}: its largest class has {largest} labelled rows, fewer than "
                               f"{cfg.folds} folds (--folds): the folds cannot be stratified, so a training fold "
                               f"could lack a class; use --folds {largest} or fewer")
    if task == "regression" and np.ptp(yk.astype(float)) == 0:
        raise AstroptError(f"target {target!r} has one value ({yk[0]:g}) in all {n} labelled rows; "
                           "nothing to predict: choose a column that varies")
    return task, keep, yk, left_out


def _check_options(cfg: ProbeConfig) -> None:
    if not cfg.targets:
        raise AstroptError("pass at least one --target COLUMN")
    if cfg.task not in TASKS:
        raise AstroptError(f"--task must be one of {', '.join(TASKS)}, got {cfg.task!r}")
    if cfg.folds < 2:
        raise AstroptError(f"--folds must be at least 2, got {cfg.folds}")
    for flag, seed in (("--seed", cfg.seed), ("--random-init-seed", cfg.random_init_seed)):
        if not 0 <= seed < 2**32:
            raise AstroptError(f"{flag} must be between 0 and 2**32 - 1, got {seed}")
    repeated = sorted({t for t in cfg.targets if cfg.targets.count(t) > 1})
    if repeated:
        raise AstroptError(f"--target {repeated[0]} is given more than once: name each column once")
    if cfg.id_column in cfg.targets:
        raise AstroptError(f"--target {cfg.id_column} is the id column (--id-column): probe a catalogue column instead")
    features = list(cfg.baseline_features)
    repeated = sorted({f for f in features if features.count(f) > 1})
    if repeated:
        raise AstroptError(f"--baseline-features names {repeated[0]} more than once: name each column once")
    both = [t for t in cfg.targets if t in features]
    if both:
        raise AstroptError(f"--target {both[0]} is also among --baseline-features: a probe given the target itself "
                           "scores perfectly; leave it out of the features")
    if cfg.id_column in features:
        raise AstroptError(f"--baseline-features {cfg.id_column} is the id column (--id-column), not a catalogue "
                           "value: name catalogue columns such as a magnitude and a size")


def probe(cfg: ProbeConfig) -> ProbeResult:
    """Join embeddings with labels, cross-validate a linear probe per target next to both baselines, write the
    report and pictures.

    `out` is claimed as a probe report before anything is written (another kind of folder, or files no command
    made, is refused even with --overwrite), and locked while the probe runs. A report of the same embeddings
    is rewritten (for any labels and targets: pictures of targets no longer probed are removed with the new
    report); one of other embeddings is replaced only with `overwrite` (its own files only)."""
    with ExitStack() as held:
        return _run_probe(cfg, held)


def _run_probe(cfg: ProbeConfig, held: ExitStack) -> ProbeResult:
    from astropt_tok.artifacts import claim_part, clear_own, output_folder, read_record, update_lineage
    from astropt_tok.store import manifest_sha256
    from astropt_train.use.embed import open_embeddings, read_embeddings

    _check_options(cfg)
    manifest = open_embeddings(cfg.embeddings)
    _check_baseline_sources(cfg, manifest)
    column = cfg.column or manifest["layers"][0]["column"]
    emb, _, ids = read_embeddings(cfg.embeddings, column)
    embedded = ~np.isnan(emb).all(axis=1)  # a NaN row: the galaxy lacks the image this column pools (--keep-partial)
    broken = embedded & ~np.isfinite(emb).all(axis=1)
    if broken.any():  # a number that is none in a galaxy's embedding: a damaged store or a model that overflowed
        raise AstroptError(f"column {column} of {cfg.embeddings} holds non-finite values in the embeddings of "
                           f"{int(broken.sum())} of {len(ids)} galaxies; run `astropt embed --verify "
                           f"{cfg.embeddings}`, and embed again")
    if not embedded.any():
        raise AstroptError(f"column {column} of {cfg.embeddings} has no embedding: every galaxy lacks the image it "
                           "pools; probe another --column (e.g. the joint embedding)")
    if not embedded.all():
        print(f"note: {int((~embedded).sum())} of {len(ids)} galaxies lack the image that column {column} pools "
              "(their token store was made with --keep-partial): left out of the probe", file=sys.stderr)
    if any(i is None for i in ids):
        raise AstroptError(f"{cfg.embeddings} has rows without an object id (the token store had no id column); "
                           "the probe joins labels by object id")
    _repeated(ids, "among its galaxies: a galaxy embedded twice would sit in training and test folds at once; "
              "embed a store that holds each galaxy once", f"{cfg.embeddings}")
    labels = read_labels(cfg.labels, cfg.id_column, cfg.targets + list(cfg.baseline_features))
    embedded_ids = set(ids)
    _repeated([i for i in labels[cfg.id_column] if i in embedded_ids],
              "among the embedded galaxies: which row is the galaxy's label is not ours to guess; keep one row per "
              "galaxy", f"column {cfg.id_column!r} of {cfg.labels}")
    index = {i: j for j, i in enumerate(labels[cfg.id_column]) if i is not None}  # each id once (checked above)
    at = np.array([index.get(i, -1) for i in ids])
    found = at >= 0
    if not found.any():
        raise AstroptError(f"no object id of {cfg.embeddings} is in column {cfg.id_column!r} of {cfg.labels}")
    features, has_features = _catalogue_features(cfg, labels, at, found)
    # every target's rows and labels settled before anything is written or embedded: too few rows for the folds,
    # one class, a constant column are errors now, not after the random-init model has embedded every galaxy
    prepared = {t: _prepare_target(cfg, t, labels, at, found, embedded, has_features) for t in cfg.targets}
    out = Path(cfg.out)
    lineage = {"embeddings": {"dir": str(Path(cfg.embeddings).resolve()),
                              "manifest_sha256": manifest_sha256(cfg.embeddings)},
               "labels": str(cfg.labels), "id_column": cfg.id_column, "targets": list(cfg.targets), "column": column}
    legacy = out.is_dir() and read_record(out) is None  # a report made before records existed
    if held.enter_context(output_folder(out, "probe-report", "`astropt probe`", lineage=lineage)):
        before = (read_record(out) or {}).get("lineage") or {}
        if before.get("embeddings") != lineage["embeddings"]:  # another model's (or store's) report
            if not cfg.overwrite:
                raise AstroptError(f"--out {out} holds a probe report of other embeddings "
                                   f"({(before.get('embeddings') or {}).get('dir')}); pass --overwrite to replace it, "
                                   "or choose another --out")
            clear_own(out, "probe-report", keep=(RANDOM_INIT,))  # the baseline's own checks decide whether it is redone
    update_lineage(out, **lineage)
    # the baseline's embeddings store is the probe's own: one there made by anything else is never replaced
    claim_part(out / RANDOM_INIT, "embeddings", "`astropt probe`", "--out", legacy=legacy)
    rand_dir = _random_init_embeddings(cfg, manifest, out)
    rand_emb, _, rand_ids = read_embeddings(rand_dir, column)
    if rand_ids != ids:
        raise AstroptError(f"the random-init embeddings in {rand_dir} do not cover the same rows; delete it and re-run")
    if (np.isnan(rand_emb).any(axis=1) != ~embedded).any():  # both read the same store: the same images are missing
        raise AstroptError(f"the random-init embeddings in {rand_dir} lack other galaxies' images than {cfg.embeddings}; "
                           "delete it and re-run")

    report = {"embeddings": str(Path(cfg.embeddings).resolve()), "column": column, "labels": str(cfg.labels),
              "id_column": cfg.id_column, "folds": cfg.folds, "seed": cfg.seed, "pool": manifest["pool"],
              "checkpoint": manifest["checkpoint"]["path"], "step": manifest["checkpoint"]["step"],
              "random_init_seed": cfg.random_init_seed, "rows": len(ids), "rows_without_labels": int((~found).sum()),
              "targets": {}}
    if cfg.baseline_features:
        report["baseline_features"] = list(cfg.baseline_features)
    for target in cfg.targets:
        task, keep, yk, left_out = prepared[target]
        n = len(yk)
        # float64 features: scikit-learn casts the labels to the features' dtype, and float32 overflows at 3.4e38
        x, xr = emb[keep].astype(np.float64), rand_emb[keep].astype(np.float64)
        folds = _folds(yk, task, cfg.folds, cfg.seed)
        redshift = task == "regression" and is_redshift_like(target)
        model = cross_validate(x, yk, task, folds, redshift)
        rand = cross_validate(xr, yk, task, folds, redshift)
        shuffled = cross_validate(x, np.random.default_rng(cfg.seed).permutation(yk), task, folds, redshift)
        entry = {"task": task, "n": n, "left_out": left_out,
                 "scores": model["scores"], "spread": model["spread"], "per_fold": model["per_fold"],
                 "baselines": {name: {"scores": r["scores"], "spread": r["spread"]}
                               for name, r in (("random_init", rand), ("shuffled_labels", shuffled))}}
        if cfg.baseline_features:  # the same probe, folds and rows on the catalogue columns, alone and with the model
            alone = cross_validate(features[keep], yk, task, folds, redshift)
            joint = cross_validate(np.hstack([x, features[keep]]), yk, task, folds, redshift)
            entry["baselines"]["catalogue"] = {"features": list(cfg.baseline_features), "scores": alone["scores"],
                                               "spread": alone["spread"]}
            entry["model_and_catalogue"] = {"scores": joint["scores"], "spread": joint["spread"]}
            entry["same_rows"] = ("the model, both baselines, the catalogue and model + catalogue are scored on the "
                                  "same rows and folds: rows lacking a catalogue feature are left out of all")
        if task == "regression":
            entry["nmad_dz"] = "(pred - true) / (1 + true)" if redshift else "pred - true"
        else:
            entry["classes"] = sorted(set(yk.tolist()))
        if cfg.pictures:
            entry["picture"] = _picture(out, target, task, yk, model["predictions"], rand["predictions"], entry)
        report["targets"][target] = entry
    from astropt_tok.atomic import atomic_write_text
    from astropt_tok.health import dumps_finite, finite_json

    report = finite_json(report)  # a score that is no number (a fold without variance) is null, never NaN
    atomic_write_text(out / "report.json", dumps_finite(report, indent=2) + "\n")
    drawn = {entry.get("picture") for entry in report["targets"].values()}
    for stale in out.glob("*.png"):  # a picture of a target this report no longer holds (other --target)
        if stale.name not in drawn:
            stale.unlink(missing_ok=True)
    return ProbeResult(out=out, report=report)


def _num(value, spec: str) -> str:
    """A score in a title; a non-finite one as `-`."""
    return "-" if value is None or not np.isfinite(value) else format(value, spec)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _picture(out: Path, target: str, task: str, y: np.ndarray, pred: np.ndarray, rand_pred: np.ndarray,
             entry: dict) -> str:
    """Predicted vs true (regression) or a confusion matrix (classification), the model beside random init."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    panels = (("model", pred, entry["scores"]), ("random init", rand_pred, entry["baselines"]["random_init"]["scores"]))
    for ax, (name, p, scores) in zip(axes, panels):
        if task == "regression":
            ax.scatter(y.astype(float), p.astype(float), s=6, alpha=0.6)
            lo, hi = float(np.min(y)), float(np.max(y))
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
            ax.set_xlabel(f"true {target}")
            ax.set_ylabel(f"predicted {target}")
            ax.set_title(f"{name}: R² {_num(scores['r2'], '.3f')}, NMAD {_num(scores['nmad'], '.3g')}")
        else:
            classes = entry["classes"]
            k = {c: i for i, c in enumerate(classes)}
            cm = np.zeros((len(classes), len(classes)), int)
            for t, q in zip(y, p):
                cm[k[t], k[q]] += 1
            ax.imshow(cm, cmap="Blues")
            for i in range(len(classes)):
                for j in range(len(classes)):
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
            ax.set_yticks(range(len(classes)), classes, fontsize=8)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(f"{name}: accuracy {_num(scores['accuracy'], '.3f')}")
    fig.suptitle(f"linear probe of {target} (out-of-fold predictions)")
    fig.tight_layout()
    from astropt_train.metrics import write_png

    return write_png(fig, out / f"{_safe(target)}.png", dpi=90).name


def _pm(scores: dict, spread: dict, metric: str) -> str:
    """`value ± spread`, with `-` for a score that is null (not a number)."""
    f = (lambda v: "-" if v is None else f"{v:.3f}")
    return f"{f(scores.get(metric))} ± {f(spread.get(metric))}"


TABLE_COLUMNS = ("target", "task", "n", "metric", "model", "random init", "shuffled labels")
CATALOGUE_COLUMNS = ("catalogue", "model + catalogue")  # with --baseline-features


def table_rows(report: dict) -> list[tuple[str, ...]]:
    """(target, task, n, metric, model ± spread, random init, shuffled labels[, catalogue, model + catalogue])
    per target and metric; the last two with --baseline-features."""
    rows = []
    for target, e in report["targets"].items():
        for metric in e["scores"]:
            b = e["baselines"]
            row = (target, e["task"], str(e["n"]), metric, _pm(e["scores"], e["spread"], metric),
                   _pm(b["random_init"]["scores"], b["random_init"]["spread"], metric),
                   _pm(b["shuffled_labels"]["scores"], b["shuffled_labels"]["spread"], metric))
            if "catalogue" in b:
                joint = e["model_and_catalogue"]
                row += (_pm(b["catalogue"]["scores"], b["catalogue"]["spread"], metric),
                        _pm(joint["scores"], joint["spread"], metric))
            rows.append(row)
    return rows


def print_table(report: dict, console=None) -> None:
    """The probe table: each target's scores next to both baselines (and the catalogue's, when probed)."""
    from astropt_tok.report import folding_table, output_console


    console = console or output_console()
    features = report.get("baseline_features")
    title = f"linear probes ({report['folds']}-fold CV, mean ± std over folds)"
    if features:
        title += f"; catalogue: the same probe on {', '.join(features)} alone, on the same rows"
    table = folding_table(*TABLE_COLUMNS, *(CATALOGUE_COLUMNS if features else ()), title=title)
    for col in table.columns:
        col.justify = "left" if col.header in ("target", "task", "metric") else "right"
    for r in table_rows(report):
        table.add_row(*r)
    console.print(table)
