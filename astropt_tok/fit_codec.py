"""Fit a small real AION `ImageCodec` to a survey, for the demo or for surveys and bands AION's codec lacks.

`fit_codec(FitCodecConfig)` is the one library call behind `astropt fit-codec`:

  1. read    the survey's image column(s) (the first `limit` rows) through the tokeniser's reader, centre-cropped
             to AION's 96x96, into memory; a seeded `holdout` of rows is kept out of training for the report
  2. fit     the real `aion.codecs.image.ImageCodec` (AION's own preprocessing: clamp, range compression,
             band padding, multi-survey projection; its finite scalar quantiser with the straight-through
             rounding it has) by AdamW on batches drawn per step from np.random.default_rng([seed, step]),
             each flipped/rotated by a multiple of 90 degrees; warmup then cosine learning rate. With several
             image columns (`modalities`, e.g. Legacy Survey and HSC), every step takes one batch of each
             column (the k-th from default_rng([seed, step, k])) and the loss is their mean: one codec learns
             every survey's bands, as AION's does
  3. report  encode -> tokens -> decode of the held-out galaxies with the fitted codec, exactly as
             `astropt tokenise` and `astropt decode` do, scored per band (astropt_tok.quality), per column
  4. save    the hub layout in `out` (codecs/image/config.json + model.safetensors), usable as `--codec out`,
             and `out/fit_report.json`

The loss is the reconstruction error in the codec's range-compressed space (where faint structure counts)
plus the error in flux (where bright galaxies count), each divided by its variance over the training data.
With `colour_weight` > 0 it adds a colour term on the galaxy's central-aperture fluxes S (one per band, the
aperture astropt_tok.quality scores colours in): |u_rec - u_true|^2 for the direction u = S / |S| of each (the
galaxy's colour, whatever its brightness; |S_rec| is floored at a tenth of |S_true| so that a faint or empty
reconstruction is far from every colour rather than free of the term), divided by the spread of u_true over
the training data (so a codec that gives every galaxy the average colour scores about 1). Pixel losses
are dominated by brightness and shape, and alone leave every galaxy near the average colour.
`out/fit-state.pt` is a checkpoint every `checkpoint_every` steps; `resume` continues from it.

One fit per folder: the fit holds `out`'s lock (astropt_tok.lock) from start to end, so a second fit-codec into
it is one error naming the first. `resume` of a fit that already reached `steps` changes nothing (the codec and
fit_report.json stay as they are); asking it for fewer steps than it ran is refused (a fit cannot be shortened).
fit-state.pt is read with `weights_only=True` and checked as a whole: keys, types, the codec's tensor names
and shapes, finite weights, the optimiser's groups; damage is one error naming the file. fit_report.json
holds only finite numbers or null (astropt_tok.health).

Catalogue scalars (`scalars`: (column, AION modality class name) pairs, `--scalar COLUMN:MODALITY`): every
named column is read in one pass (only those columns) before anything is written, and each gets the real AION
codec of its modality fitted to its finite values (astropt_tok.catalog_codecs: seconds, no training), written
beside the image codec as codecs/<Modality.name>/ (codecs/Z, codecs/FLUX_G) and described under "scalars" in
fit_report.json. With `image=False` (`--no-image`) only those are fitted: a folder's image codec, and its other
scalar codecs, stay as they are; a scalar codec already there is replaced only with `overwrite` (its subfolder
alone).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from astropt_tok.errors import AstroptError, first_line
from astropt_tok.atomic import atomic_write_text

STATE_FILE = "fit-state.pt"
REPORT_FILE = "fit_report.json"
DEFAULT_FIT_BANDS = ("DES-G", "DES-R", "DES-I", "DES-Z")


@dataclass
class FitCodecConfig:
    """What to fit the codec to, its size, and how to train it."""

    source: str  # local parquet/arrow folder, file or glob in the survey schema, or a hub dataset id
    out: Path  # codec folder to write (hub layout)
    init: str | None = None  # start from this codec (hub id or folder; its sizes win over hidden/projection/layers)
    bands: tuple[str, ...] = DEFAULT_FIT_BANDS
    column: str = "legacysurvey_image"
    # several image columns, each with its own survey's bands: ((column, bands), ...); empty = (column, bands)
    modalities: tuple[tuple[str, tuple[str, ...]], ...] = ()
    split: str = "train"
    limit: int | None = None  # read at most this many source rows
    hidden: int = 32  # hidden_dims of the MagViT autoencoder
    projection: int = 12  # multisurvey_projection_dims
    layers: int = 1  # num_consecutive residual layers per compression stage
    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-3  # peak learning rate
    min_lr: float | None = None  # end of the cosine (default lr / 20)
    warmup: int = 100  # linear warmup steps
    weight_decay: float = 1e-4
    colour_weight: float = 0.0  # weight of the aperture band-fraction term (colour); 0 = the plain pixel loss
    holdout: float = 0.1  # fraction of rows kept out of training for the report (at least 1 row)
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False  # replace the codec already in `out` (its own files only)
    checkpoint_every: int = 250
    progress: bool = True
    scalars: tuple[tuple[str, str], ...] = ()  # catalogue columns to fit scalar codecs to: ((column, modality), ...)
    scalar_codebook: int = 1024  # codes per scalar codec
    image: bool = True  # False: fit only the scalar codecs, keeping the folder's image codec


@dataclass
class FitCodecResult:
    """Where the codec went, its held-out report, and how the fit went."""

    out: Path
    steps: int
    report: dict  # astropt_tok.quality.summary_json of the held-out reconstruction (the first column's)
    train_rows: int
    heldout_rows: int
    final_loss: float
    seconds: float
    resumed_from: int | None = None
    already_finished: bool = False  # --resume of a fit that had already reached `steps`
    history: list = field(default_factory=list)  # [(step, loss)] every few steps
    reports: dict = field(default_factory=dict)  # {column: summary_json} for every fitted column
    scalars: dict = field(default_factory=dict)  # {AION modality: ScalarFit.describe()} for every fitted scalar


def codec_config(cfg: FitCodecConfig) -> dict:
    """The `ImageCodec` constructor arguments: AION's quantiser and compression, this fit's sizes."""
    return {
        "quantizer_levels": [7, 5, 5, 5, 5],  # AION's own levels: 4375 codes
        "n_compressions": 2,  # 96x96 -> 24x24 = 576 tokens, as AION
        "embedding_dim": 5,
        "range_compression_factor": 0.01,
        "mult_factor": 10.0,
        "hidden_dims": cfg.hidden,
        "multisurvey_projection_dims": cfg.projection,
        "num_consecutive": cfg.layers,
    }


def learning_rate(step: int, cfg: FitCodecConfig) -> float:
    """Linear warmup to cfg.lr over cfg.warmup steps, then cosine down to min_lr at cfg.steps."""
    min_lr = cfg.lr / 20 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def fitted_columns(cfg: FitCodecConfig) -> list[tuple[str, list[str]]]:
    """[(image column, its bands)]: cfg.modalities, or the one (column, bands)."""
    if cfg.modalities:
        return [(column, list(bands)) for column, bands in cfg.modalities]
    return [(cfg.column, list(cfg.bands))]


def read_survey_flux(cfg: FitCodecConfig, column: str | None = None, bands: list[str] | None = None) -> np.ndarray:
    """Every good row of one image column (default cfg.column with cfg.bands; up to `limit` rows), centre-cropped:
    float32 [N, bands, 96, 96]."""
    from astropt_tok.codec import CROP_SIZE
    from astropt_tok.source import batch_to_flux, iter_row_range, resolve_source

    column = cfg.column if column is None else column
    bands = list(cfg.bands) if bands is None else bands
    plan = resolve_source(cfg.source, split=cfg.split, column=column, id_column=None, limit=cfg.limit)
    n = min(plan.num_rows, cfg.limit) if cfg.limit else plan.num_rows
    chunks = []
    for _, batch in iter_row_range(plan, 0, n):
        flux, _, _ = batch_to_flux(batch, plan.column, bands, crop=CROP_SIZE)
        chunks.append(flux.copy())
    flux = np.concatenate(chunks) if chunks else np.zeros((0, len(bands), CROP_SIZE, CROP_SIZE), np.float32)
    if len(flux) < 2:
        raise AstroptError(f"source {cfg.source} has {len(flux)} good rows in column {column} with bands "
                           f"{','.join(bands)}; fitting a codec needs at least 2 (one to train on, one to score)")
    return flux


def colour_error(recon, flux, inside):
    """(recon, flux) [B, C, H, W] -> u_rec - u_true [B, C], the colour directions of their aperture fluxes
    (module doc); `inside` [H, W] is the aperture."""
    true_ap = (flux * inside).sum(dim=(-2, -1))  # S_true [B, C]
    rec_ap = (recon * inside).sum(dim=(-2, -1))  # S_rec [B, C]
    true_norm2 = (true_ap**2).sum(dim=1, keepdim=True).clamp_min(1e-12)  # |S_true|^2 [B, 1]
    rec_norm2 = (rec_ap**2).sum(dim=1, keepdim=True) + 0.01 * true_norm2  # |S_rec|^2, floored at |S_true|^2 / 100
    return rec_ap / rec_norm2.sqrt() - true_ap / true_norm2.sqrt()


def colour_spread(flux, inside):
    """sum over bands of the variance over galaxies of S/|S| (aperture fluxes S of flux [N, C, H, W]): a scalar."""
    true_ap = (flux * inside).sum(dim=(-2, -1))  # [N, C]
    unit = true_ap / (true_ap**2).sum(dim=1, keepdim=True).clamp_min(1e-6).sqrt()
    return unit.var(dim=0).sum().clamp_min(1e-12)


def aperture_mask(size: int, device):
    """The central aperture of astropt_tok.quality as a float [size, size] tensor."""
    import torch

    from astropt_tok.quality import APERTURE_RADIUS

    yx = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    return ((yx[:, None] ** 2 + yx[None, :] ** 2) <= APERTURE_RADIUS**2).float()


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) of n rows: a seeded permutation, at least one row on each side."""
    n_held = min(n - 1, max(1, int(round(n * fraction))))
    perm = np.random.default_rng([seed, 7919]).permutation(n)
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image [B, C, H, W] flipped and rotated by a random multiple of 90 degrees (galaxies have no up)."""
    out = np.empty_like(batch)
    for i, img in enumerate(batch):
        img = np.rot90(img, k=int(rng.integers(4)), axes=(-2, -1))
        out[i] = img[..., ::-1] if rng.random() < 0.5 else img
    return out


def reconstruct_straight_through(codec, flux, bands: list[str]):
    """Differentiable encode -> quantise -> decode: (recon in compressed space, recon flux), each [B, C, 96, 96].

    The same steps as `ImageCodec.encode` then `.decode`, with the quantiser's straight-through rounding
    (`quantizer.quantize`) in place of integer codes, and the range expansion split out so that the loss can
    be taken before it.
    """
    from aion.modalities import Image

    z = codec._encode(Image(flux=flux.clone(), bands=bands))  # [B, 5, 576]; _encode clamps in place: a copy
    z_q = codec.quantizer.quantize(z)  # rounded to the codebook's levels, identity gradient
    b, d, t = z_q.shape
    side = int(round(t**0.5))
    h = codec.post_quant_proj(z_q.reshape(b, d, side, side))
    decoded = codec.decoder(h)
    all_bands = torch_ones_mask(decoded, codec.image_padder.nbands)
    compressed = codec.image_padder.backward(codec.subsample_out(decoded, all_bands), bands)  # [B, C, 96, 96]
    recon_flux = codec.rescaler.backward(codec._reverse_range_compress(compressed), codec._get_survey(bands))
    return compressed, recon_flux


def torch_ones_mask(like, nbands: int):
    """AION's all-bands mask for the output projection: [B, nbands] True."""
    import torch

    return torch.ones((like.shape[0], nbands), device=like.device, dtype=torch.bool)


def compress(codec, flux, bands: list[str]):
    """Flux -> the codec's range-compressed input space (clamp, rescale, arcsinh), as `_encode` does."""
    x = codec.clamp(flux.clone(), bands)
    x = codec.rescaler.forward(x, codec._get_survey(bands))
    return codec._range_compress(x)


def round_trip(codec, flux: np.ndarray, bands: list[str], batch_size: int = 32, device: str = "cpu") -> np.ndarray:
    """decode(encode(flux)) through the integer tokens, as tokenise and decode do: float32 [N, C, 96, 96]."""
    import torch
    from aion.modalities import Image

    out = []
    with torch.inference_mode():
        for i in range(0, len(flux), batch_size):
            x = torch.as_tensor(flux[i : i + batch_size], device=device)
            tokens = codec.encode(Image(flux=x.clone(), bands=bands))  # [b, 576] int
            out.append(codec.decode(tokens, bands=bands).flux.float().cpu().numpy())
    return np.concatenate(out)


def fit_scalars(cfg: FitCodecConfig) -> list:
    """Read cfg.scalars' columns (one pass, only those columns, the first `limit` rows) and fit each one's AION
    scalar codec in memory: [catalog_codecs.ScalarFit]. A missing or non-numeric column is one error."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from astropt_tok.catalog_codecs import fit_scalar
    from astropt_tok.source import check_catalogue_column, read_columns

    if not cfg.scalars:
        return []
    columns = list(dict.fromkeys(column for column, _ in cfg.scalars))
    read = read_columns(cfg.source, columns, split=cfg.split, limit=cfg.limit)
    schema = pa.schema([(column, arr.type) for column, arr in read.items()])
    fits = []
    for column, modality in cfg.scalars:
        check_catalogue_column(schema, column, "scalar", f"source {cfg.source}")  # numbers, as tokenise reads them
        arr = read[column]
        values = pc.fill_null(pc.cast(arr, pa.float64()), float("nan")).to_numpy()  # null -> NaN: left out
        fits.append(fit_scalar(values, modality, cfg.scalar_codebook, column=column))
    return fits


def _check_scalars(cfg: FitCodecConfig) -> None:
    from astropt_tok.codec import aion_modality

    if not 2 <= cfg.scalar_codebook <= 2**16:  # a store keeps tokens in 16 bits (store.format.token_dtype)
        raise AstroptError(f"--scalar-codebook must be 2 to {2**16} (a token store holds 16-bit tokens), got "
                           f"{cfg.scalar_codebook}")
    modalities = [aion_modality(modality, kind="scalar", flag="--scalar").name for _, modality in cfg.scalars]
    repeated = sorted({m for m in modalities if modalities.count(m) > 1})
    if repeated:
        raise AstroptError(f"--scalar names modality {repeated[0]} more than once; one column per modality (its "
                           "codec has one folder)")
    if not cfg.image:
        if not cfg.scalars:
            raise AstroptError("--no-image fits only the --scalar codecs, and none is given: add --scalar "
                               "COLUMN:MODALITY (e.g. --scalar redshift:Z), or leave out --no-image")
        if cfg.resume or cfg.init:
            raise AstroptError(f"--{'resume' if cfg.resume else 'init'} is about the image codec, which --no-image "
                               "does not fit: leave out one of them")


def _check(cfg: FitCodecConfig) -> None:
    from aion.codecs.preprocessing.band_to_index import BAND_TO_INDEX

    _check_scalars(cfg)
    if not cfg.image:
        return
    for name in ("hidden", "projection", "layers", "steps", "batch_size", "checkpoint_every"):
        if getattr(cfg, name) < 1:
            raise AstroptError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.hidden % 4:
        raise AstroptError(f"--hidden must be a multiple of 4 (the autoencoder's two compression stages split it), "
                           f"got {cfg.hidden}")
    if cfg.warmup < 0:
        raise AstroptError(f"--warmup must be 0 or more, got {cfg.warmup}")
    if not 0 <= cfg.colour_weight < math.inf:
        raise AstroptError(f"--colour-weight must be 0 or a positive finite number, got {cfg.colour_weight}")
    if not 0 < cfg.lr < math.inf:
        raise AstroptError(f"--lr must be a positive finite number, got {cfg.lr}")
    if not 0 <= cfg.seed < 2**32:
        raise AstroptError(f"--seed must be between 0 and 2**32 - 1, got {cfg.seed}")
    if not 0 < cfg.holdout < 1:
        raise AstroptError(f"--holdout must be a fraction between 0 and 1, got {cfg.holdout}")
    columns = [column for column, _ in fitted_columns(cfg)]
    if len(set(columns)) < len(columns):
        raise AstroptError(f"--column names {sorted({c for c in columns if columns.count(c) > 1})[0]} more than "
                           "once; give each image column once")
    for column, bands in fitted_columns(cfg):
        where = "--bands" if not cfg.modalities else f"--column {column}"
        if not bands:
            raise AstroptError(f"{where} names no band")
        repeated = sorted({b for b in bands if bands.count(b) > 1})
        if repeated:
            raise AstroptError(f"{where} names {repeated[0]} more than once; give each band once")
        unknown = [b for b in bands if b not in BAND_TO_INDEX]
        if unknown:
            raise AstroptError(f"unknown band(s) {', '.join(unknown)} in {where}; the AION image codec knows "
                               f"{', '.join(BAND_TO_INDEX)}")
        if len({b.split('-')[0] for b in bands}) > 1:
            raise AstroptError(f"{where} {','.join(bands)} mix surveys; AION's image codec takes one survey's bands "
                               "at a time (give each survey its own --column NAME:BANDS)")


def _save_state(path: Path, state: dict) -> None:
    import torch

    from astropt_tok.atomic import atomic_file

    with atomic_file(path) as tmp:  # a full disk (torch.save's RuntimeError) is one error, no temporary left
        torch.save(state, tmp)


def _identity(cfg: FitCodecConfig) -> dict:
    """The settings a resumed fit must share with the one it continues."""
    keep = ("source", "init", "bands", "column", "split", "limit", "hidden", "projection", "layers", "batch_size", "lr",
            "min_lr", "warmup", "weight_decay", "holdout", "seed")
    d = asdict(cfg)
    identity = {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in keep}
    if cfg.modalities:  # (a one-column fit's identity stays as it was, so its fit-state.pt still resumes)
        identity["modalities"] = [[column, list(bands)] for column, bands in cfg.modalities]
    if cfg.colour_weight:
        identity["colour_weight"] = cfg.colour_weight
    return identity


STATE_KEYS = {"step": int, "codec": dict, "optimizer": dict, "history": list, "identity": dict, "config": dict}


def read_fit_state(path: Path, cfg: FitCodecConfig) -> dict:
    """fit-state.pt, loaded without running code from it (`weights_only=True`) and checked: its keys and their
    types, a step within 0..cfg.steps, the settings of this fit; damage is one error naming the file."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = first_line(exc, 160)
        raise AstroptError(f"--resume: {path} is unreadable or not a fit state ({reason}); delete it to start "
                           "again") from None
    if not isinstance(state, dict):
        raise AstroptError(f"--resume: {path} holds a {type(state).__name__}, not a fit state (a dict of "
                           f"{', '.join(STATE_KEYS)}); delete it to start again")
    for key, kind in STATE_KEYS.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            got = "missing" if key not in state else f"a {type(value).__name__}"
            raise AstroptError(f"--resume: {path} is damaged: {key!r} is {got}, not a {kind.__name__}; delete it to "
                               "start again")
    if state["step"] < 0:
        raise AstroptError(f"--resume: {path} is damaged: step {state['step']} is negative; delete it to start again")
    pairs = all(isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, (int, float)) for x in h)
                for h in state["history"])
    if not pairs:
        raise AstroptError(f"--resume: {path} is damaged: its history is not (step, loss) pairs; delete it to start "
                           "again")
    bad = [k for k, v in state["codec"].items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise AstroptError(f"--resume: {path} is damaged: codec entry {bad[0]!r} is not a named tensor; delete it "
                           "to start again")
    identity = _identity(cfg)
    if state["identity"] != identity:
        diff = [k for k in sorted(set(state["identity"]) | set(identity)) if state["identity"].get(k) != identity.get(k)]
        raise AstroptError(f"--resume: {path} was a fit with other settings ({', '.join(diff)}); "
                           "give the same ones, or another --out")
    if state["step"] > cfg.steps:
        raise AstroptError(f"--resume --steps {cfg.steps}: the fit in {path.parent} already ran {state['step']} steps, "
                           f"and a fit cannot be shortened; pass --steps {state['step']} (nothing left to do) or more "
                           "to continue it, or fit again into another --out")
    return state


def _restore(codec, opt, state: dict, path: Path) -> None:
    """Load a checked fit state's codec and optimiser; tensors of other names or shapes, non-finite weights or
    other optimiser groups are one error naming the file."""
    from astropt_tok.health import refuse_non_finite_weights

    refuse_non_finite_weights(state["codec"], path, "the fit diverged; delete it to start again")
    try:
        missing, unexpected = codec.load_state_dict(state["codec"], strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:160])
        raise AstroptError(f"--resume: {path} does not fit this codec ({detail}); delete it to start again") from None
    missing = [k for k in missing if not k.endswith("levels")]  # the quantiser's levels come from the config
    if missing or unexpected:
        raise AstroptError(f"--resume: {path} does not fit this codec (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}); delete it to start again")
    try:
        opt.load_state_dict(state["optimizer"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise AstroptError(f"--resume: {path}: its optimiser state does not fit this codec ({type(exc).__name__}: "
                           f"{str(exc)[:160]}); delete it to start again") from None


def _finished_report(out: Path) -> dict | None:
    """The fit_report.json of a finished fit whose codec is in place, or None (then the fit is completed)."""
    try:
        record = json.loads((out / REPORT_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    weights = out / "codecs" / "image" / "model.safetensors"
    if not isinstance(record, dict) or not isinstance(record.get("heldout"), dict) or not weights.is_file():
        return None
    return record


def fit_codec(cfg: FitCodecConfig) -> FitCodecResult:
    """Fit a real AION ImageCodec to cfg.source and save it in the hub layout in cfg.out (see the module doc);
    the folder's lock is held for the whole fit, so a second fit-codec into it is one error naming this one.

    `out` is claimed as a codec folder before anything is written: another kind of folder, or files no command
    made, is refused even with --overwrite; an existing codec (another fit's, or a shipped one) is replaced only
    with --overwrite (its own files: codecs/, fit_report.json, fit-state.pt, MODEL.md), continued with --resume."""
    from astropt_tok.artifacts import output_folder

    _check(cfg)
    if cfg.overwrite and cfg.resume:
        raise AstroptError("--overwrite starts the fit in --out again and --resume continues it: give one of them")
    lineage = {"source": cfg.source, "split": cfg.split, "init": cfg.init}
    if cfg.image:
        lineage["columns"] = dict(fitted_columns(cfg))
    with output_folder(cfg.out, "codec", "`astropt fit-codec`", lineage=lineage) as existed:
        out = Path(cfg.out)
        fits = fit_scalars(cfg)  # every column read and fitted before anything is written
        report = _read_report(out) if existed else None
        earlier = report.get("scalars") if report and isinstance(report.get("scalars"), dict) else {}
        if cfg.image:
            # a folder of scalar codecs alone holds no image codec to replace: the image fit adds one beside them
            has_image = (out / "codecs" / "image").exists() or (out / STATE_FILE).exists() or \
                bool(report and isinstance(report.get("heldout"), dict))
            result = _fit_codec(cfg, existed and has_image, {**lineage, "columns": dict(fitted_columns(cfg))})
        else:
            there = [f.modality.folder for f in fits if (out / f.modality.folder).exists()]
            if there and not cfg.overwrite:
                raise AstroptError(f"{out} already holds {there[0]}; pass --overwrite to replace the scalar codecs "
                                   "named by --scalar (their subfolders only), or choose another --out")
            result = FitCodecResult(out=out, steps=0, report={}, train_rows=0, heldout_rows=0,
                                    final_loss=float("nan"), seconds=0.0)
        result.scalars = _write_scalars(out, fits, earlier, cfg)
        return result


def _read_report(out: Path) -> dict | None:
    """out/fit_report.json, or None without one. A report that is there but unreadable is one error (it would be
    rewritten without what it records)."""
    path = out / REPORT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AstroptError(f"{path} is unreadable ({type(exc).__name__}); delete it, or choose another --out") from None
    if not isinstance(record, dict):
        raise AstroptError(f"{path} holds no report (a {type(record).__name__}); delete it, or choose another --out")
    return record


def _write_scalars(out: Path, fits: list, earlier: dict, cfg: FitCodecConfig) -> dict:
    """Write each fitted scalar codec into out/codecs/<name>/ and record them all in fit_report.json (the
    earlier entries whose codec is still there kept) and in the folder's lineage; returns the new entries."""
    from astropt_tok.artifacts import update_lineage
    from astropt_tok.catalog_codecs import save_codec
    from astropt_tok.codec import sha256_file
    from astropt_tok.health import dumps_finite

    kept = {name: e for name, e in earlier.items() if isinstance(e, dict) and name not in
            {f.modality.name for f in fits} and (out / str(e.get("folder"))).is_dir()}
    if not fits and not earlier:
        return {}
    entries = {}
    for fit in fits:
        sub = save_codec(fit.codec, fit.config, out, fit.modality.folder)
        entries[fit.modality.name] = {"source": cfg.source, "split": cfg.split, "limit": cfg.limit, **fit.describe(),
                                      "weights_sha256": sha256_file(sub / "model.safetensors")}
    record = _read_report(out) or {}  # the image fit's report, just written, or the folder's
    scalars = {**kept, **entries}  # none left: an image --overwrite cleared codecs/, and with it every scalar codec
    record.pop("scalars", None)
    if scalars:
        record["scalars"] = scalars
    atomic_write_text(out / REPORT_FILE, dumps_finite(record, indent=2))
    update_lineage(out, scalars={name: {k: e.get(k) for k in ("source", "column", "weights_sha256")}
                                 for name, e in scalars.items()})
    return entries


def _fit_codec(cfg: FitCodecConfig, existed: bool, lineage: dict) -> FitCodecResult:
    import torch
    from aion.codecs.image import ImageCodec

    from astropt_tok.artifacts import clear_own, update_lineage
    from astropt_tok.codec import CROP_SIZE, _fix_hsc_decode, save_image_codec, sha256_file
    from astropt_tok.executor import resolve_device
    from astropt_tok.health import dumps_finite
    from astropt_tok.progress import ProgressBar
    from astropt_tok.quality import reconstruction_metrics, summary_json

    t0 = time.perf_counter()
    out = Path(cfg.out)
    state_path = out / STATE_FILE
    device = resolve_device(cfg.device)
    start_from = None
    if cfg.init is not None:
        from astropt_tok.codec import load_image_codec

        start_from = load_image_codec(cfg.init)  # a folder or hub id; its config fixes the sizes
        config = dict(start_from.config)
    else:
        config = codec_config(cfg)

    state = None
    if cfg.resume:
        if not state_path.is_file():
            raise AstroptError(f"--resume: {state_path} does not exist; run without --resume to start a fit")
        state = read_fit_state(state_path, cfg)
        done = _finished_report(out) if state["step"] == cfg.steps else None
        if done is not None:  # finished, codec and report in place: nothing to do, nothing rewritten
            reports = {c: r["report"] for c, r in (done.get("heldout_by_column") or {}).items()
                       if isinstance(r, dict) and "report" in r} or {fitted_columns(cfg)[0][0]: done["heldout"]}
            return FitCodecResult(out=out, steps=cfg.steps, report=done["heldout"], train_rows=done.get("train_rows"),
                                  heldout_rows=done.get("heldout_rows"), final_loss=done.get("final_loss"),
                                  seconds=time.perf_counter() - t0, resumed_from=state["step"], already_finished=True,
                                  history=list(state["history"]), reports=reports)
    elif state_path.is_file() and not cfg.overwrite:
        raise AstroptError(f"{out} already holds a fit ({STATE_FILE}); add --resume to continue it (or raise "
                           "--steps), --overwrite to replace it, or choose another --out")
    elif existed and not cfg.overwrite:
        raise AstroptError(f"{out} already holds a fitted codec; pass --overwrite to replace it (its codecs/, "
                           f"{REPORT_FILE}, {STATE_FILE} and MODEL.md), or choose another --out")

    # One entry per image column: its bands, flux [N, C, 96, 96] and rows. The same seeded split per column, so
    # with no rejected rows the same galaxies are held out of every survey.
    surveys = []
    for column, bands in fitted_columns(cfg):
        flux = read_survey_flux(cfg, column, bands)
        train_rows, held_rows = split_holdout(len(flux), cfg.holdout, cfg.seed)
        surveys.append({"column": column, "bands": bands, "flux": flux, "train": train_rows, "held": held_rows})

    if existed and cfg.overwrite:  # the survey is read: now the old codec goes (its own files only)
        clear_own(out, "codec")
        update_lineage(out, **lineage, weights_sha256=None)
    torch.manual_seed(cfg.seed)
    codec = ImageCodec(**config)
    _fix_hsc_decode(codec)  # polymathic-aion 0.0.2 cannot decode HSC bands without it (see codec.py)
    if start_from is not None:
        codec.load_state_dict(start_from.codec.state_dict())
    codec = codec.to(device)
    decay = [p for n, p in codec.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in codec.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    start, history = 0, []
    if state is not None:
        _restore(codec, opt, state, state_path)
        start, history = int(state["step"]), list(state["history"])

    # Loss weights: the variance of the training flux, per band, in compressed space and in flux.
    inside = aperture_mask(CROP_SIZE, device)  # [96, 96]: the colour term's aperture
    with torch.no_grad():
        for survey in surveys:
            sample = torch.as_tensor(survey["flux"][survey["train"][: 256]], device=device)
            survey["flux_var"] = sample.var(dim=(0, 2, 3)).clamp_min(1e-12)  # [C]
            survey["compressed_var"] = compress(codec, sample, survey["bands"]).var(dim=(0, 2, 3)).clamp_min(1e-12)
            survey["colour_spread"] = colour_spread(sample, inside)  # how much galaxies' colours differ

    codec.train()
    # the last recorded loss when no step is left to run (a finished fit whose report is being completed)
    loss_value = float(history[-1][1]) if history and not start < cfg.steps else float("nan")
    with ProgressBar("fit-codec", cfg.steps, cfg.progress, unit="steps", lines=True) as bar:  # lines in a pipe
        bar.advance(completed=start)
        for step in range(start, cfg.steps):
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, cfg)
            loss = 0.0
            for k, survey in enumerate(surveys):  # one batch of each image column, each through its own bands
                rng = np.random.default_rng([cfg.seed, step] if k == 0 else [cfg.seed, step, k])
                pick = survey["train"][rng.integers(0, len(survey["train"]), size=cfg.batch_size)]
                x = torch.as_tensor(augment(survey["flux"][pick], rng), device=device)  # [B, C, 96, 96]
                compressed, recon = reconstruct_straight_through(codec, x, survey["bands"])
                target = compress(codec, x, survey["bands"])
                per_band = ((compressed - target) ** 2).mean(dim=(0, 2, 3)) / survey["compressed_var"] \
                    + ((recon - x) ** 2).mean(dim=(0, 2, 3)) / survey["flux_var"]  # [C]
                if cfg.colour_weight:
                    colour = colour_error(recon, x, inside) ** 2  # [B, C]; summed over C, about the spread
                    per_band = per_band + cfg.colour_weight * len(survey["bands"]) * colour.mean(dim=0) \
                        / survey["colour_spread"]  # per_band.mean() then holds |colour error|^2 / spread
                loss = loss + per_band.mean() / len(surveys)
            if not torch.isfinite(loss):
                raise AstroptError(f"the fit diverged at step {step} (loss {float(loss)}); lower --lr "
                                   f"(was {cfg.lr}) and start again")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(codec.parameters(), 1.0)
            opt.step()
            loss_value = float(loss.detach())
            done = step + 1
            if done % 10 == 0 or done == cfg.steps:
                history.append((done, loss_value))
            bar.advance(info=f"loss {loss_value:.4f} lr {learning_rate(step, cfg):.1e}")
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                _save_state(state_path, {"step": done, "codec": codec.state_dict(), "optimizer": opt.state_dict(),
                                         "history": history, "identity": _identity(cfg), "config": config})

    codec.eval()
    reports = {}
    for survey in surveys:
        held = survey["flux"][survey["held"]]
        recon = round_trip(codec, held, survey["bands"], device=device)
        reports[survey["column"]] = summary_json(reconstruction_metrics(held, recon, survey["bands"]))
    save_image_codec(codec, out, config)
    update_lineage(out, **lineage, weights_sha256=sha256_file(out / "codecs" / "image" / "model.safetensors"))
    first = surveys[0]
    report = reports[first["column"]]
    result = FitCodecResult(out=out, steps=cfg.steps, report=report, train_rows=len(first["train"]),
                            heldout_rows=len(first["held"]), final_loss=loss_value, seconds=time.perf_counter() - t0,
                            resumed_from=start if state is not None else None,
                            already_finished=state is not None and start >= cfg.steps, history=history,
                            reports=reports)
    settings = {k: (json.loads(json.dumps(v)) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    settings["out"] = str(cfg.out)
    record = {"settings": settings, "codec_config": config, "steps": cfg.steps, "train_rows": len(first["train"]),
              "heldout_rows": len(first["held"]), "final_loss": loss_value, "heldout": report}
    if cfg.modalities:  # every column's held-out scores ("heldout" stays the first column's)
        record["heldout_by_column"] = {s["column"]: {"train_rows": len(s["train"]), "heldout_rows": len(s["held"]),
                                                     "report": reports[s["column"]]} for s in surveys}
    atomic_write_text(out / REPORT_FILE, dumps_finite(record, indent=2))  # a loss or score that is no number: null
    return result
