"""Loading AION codecs (images, catalogue scalars, spectra) from a hub id or a local snapshot in the hub layout.

The hub layout (as in `polymathic-ai/aion-base`) keeps each codec in a subfolder named after the AION
modality's short name: `codecs/image/` (the `ImageCodec` of every image survey), `codecs/Z/` (redshift),
`codecs/FLUX_G/`, ..., `codecs/spectrum/` (DESI and SDSS spectra), each a `config.json` (the codec's
constructor arguments) and a `model.safetensors`. AION 0.0.2's own `from_pretrained(local_dir, modality=...)`
fails on a local folder, so we build the real aion codec class from the config and load the weights ourselves.
Users name a modality by its AION class name (`LegacySurveyFluxG`, `Z`, `DESISpectrum`): `aion_modality`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astropt_tok.errors import AstroptError, first_line

DEFAULT_CODEC = "polymathic-ai/aion-base"
CODEC_SUBFOLDER = "codecs/image"
CONFIG_FILE = f"{CODEC_SUBFOLDER}/config.json"
WEIGHTS_FILE = f"{CODEC_SUBFOLDER}/model.safetensors"
CROP_SIZE = 96  # AION's image codec centre-crops every image to 96x96 before encoding
DEMO_CODEC_DIR = Path(__file__).parent / "demo_codec"  # the demo's fitted codec, shipped as package data


@dataclass
class CodecFiles:
    """Where a codec's config and weights live on disk, and where they came from."""

    codec_id: str  # the hub id, or the local folder made absolute
    config_path: Path
    weights_path: Path
    revision: str | None = None  # hub commit, when known


@dataclass
class LoadedCodec:
    """A ready `ImageCodec` and the facts about it that the token store records."""

    codec: Any  # aion.codecs.image.ImageCodec, in eval mode, on `device`
    codec_id: str
    config: dict
    weights_sha256: str
    vocab_size: int
    tokens_per_image: int
    revision: str | None = None
    device: str = "cpu"
    extra: dict = field(default_factory=dict)
    kind: str = "image"  # "image", "scalar" or "spectrum" (AionModality.kind)
    aion_modality: str | None = None  # the AION modality class name it was loaded for; None: images
    folder: str = CODEC_SUBFOLDER  # its subfolder of the snapshot
    value_range: tuple[float, float] | None = None  # a scalar codec with a fixed grid (Z): the values it can hold

    @property
    def tokens_per_object(self) -> int:
        """Tokens one object of this modality becomes (an image 576, a scalar 1, a spectrum 273 for AION)."""
        return self.tokens_per_image

    def describe_modality(self) -> dict:
        """This codec's part of a store manifest's modality entry."""
        return {"folder": self.folder, "class": type(self.codec).__name__, "config": self.config,
                "weights_sha256": self.weights_sha256}

    def describe(self) -> dict:
        """The codec section of a store manifest."""
        return {
            "id": self.codec_id,
            "revision": self.revision,
            "config": self.config,
            "weights_sha256": self.weights_sha256,
            "vocab_size": self.vocab_size,
            "tokens_per_image": self.tokens_per_image,
        }


def aion_bands() -> list[str]:
    """The bands AION's image codec knows (aion.codecs.preprocessing.band_to_index), read from that one file so
    that checking a flag does not import aion's package (torch and the codecs: seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("aion")  # finds the package without running its __init__
    table = Path(next(iter(spec.submodule_search_locations or []), "")) / "codecs/preprocessing/band_to_index.py" \
        if spec is not None else None
    if table is None or not table.is_file():
        from aion.codecs.preprocessing.band_to_index import BAND_TO_INDEX  # another layout: import it

        return list(BAND_TO_INDEX)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("_aion_band_to_index", table))
    module.__spec__.loader.exec_module(module)  # a module of plain dict literals, imports nothing
    return list(module.BAND_TO_INDEX)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_codec_files(codec_id: str = DEFAULT_CODEC, folder: str = CODEC_SUBFOLDER) -> CodecFiles:
    """Find one codec's config and weights (`folder` of the snapshot: codecs/image, codecs/Z, ...): a local folder
    in the hub layout, or the HF hub (cache first)."""
    config_file, weights_file = f"{folder}/config.json", f"{folder}/model.safetensors"
    local = Path(codec_id).expanduser()
    if local.exists():
        config_path, weights_path = local / config_file, local / weights_file
        for p in (config_path, weights_path):
            if not p.is_file():
                raise AstroptError(
                    f"codec folder {local} is not in the hub layout: missing {p.relative_to(local)} "
                    f"(expected {config_file} and {weights_file})"
                )
        # recorded in manifests and run configs: absolute, so that they work from any working folder
        return CodecFiles(codec_id=str(local.resolve()), config_path=config_path, weights_path=weights_path)
    if codec_id.startswith((".", "/", "~")) or codec_id.count("/") != 1:
        raise AstroptError(f"codec {codec_id!r} is neither an existing folder nor a hub id like {DEFAULT_CODEC}")

    from astropt_tok.hub import hub_unreachable_reason

    unreachable = hub_unreachable_reason()
    if unreachable:
        raise AstroptError(f"cannot reach the Hugging Face hub for codec {codec_id!r} ({unreachable}); pass a local "
                           f"snapshot with --codec DIR (made elsewhere with `huggingface-cli download {codec_id} "
                           f"--include 'codecs/*' --local-dir DIR`), or set HF_HUB_OFFLINE=1 to use the HF cache")
    from huggingface_hub import hf_hub_download  # honours HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE

    try:
        config_path = Path(hf_hub_download(codec_id, config_file))
        weights_path = Path(hf_hub_download(codec_id, weights_file))
    except Exception as exc:  # offline, unreachable, gated, missing repo: all end the same way for the user
        reason = first_line(exc, None)
        raise AstroptError(
            f"cannot fetch codec {codec_id!r} ({folder}) from the Hugging Face hub ({type(exc).__name__}: "
            f"{reason[:160]}); on a machine without internet pass a local snapshot with --codec DIR "
            f"(made elsewhere with `huggingface-cli download {codec_id} --include 'codecs/*' --local-dir DIR`)"
        ) from None
    # the HF cache keeps files at .../snapshots/<commit>/codecs/image/model.safetensors
    snapshot = weights_path.parents[len(Path(weights_file).parts) - 1]
    revision = snapshot.name if snapshot.parent.name == "snapshots" else None
    return CodecFiles(codec_id=codec_id, config_path=config_path, weights_path=weights_path, revision=revision)


def local_codec_files(codec_id: str) -> CodecFiles | None:
    """The codec's files when they are on this machine (a folder in the hub layout, or a hub id already in the HF
    cache), without reaching the hub; None otherwise (a check that needs the weights is then left to whoever loads
    them)."""
    local = Path(codec_id).expanduser()
    if local.exists():
        try:
            return resolve_codec_files(codec_id)
        except AstroptError:
            return None
    if codec_id.startswith((".", "/", "~")) or codec_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        config_path = try_to_load_from_cache(codec_id, CONFIG_FILE)
        weights_path = try_to_load_from_cache(codec_id, WEIGHTS_FILE)
    except Exception:  # an old huggingface_hub, a damaged cache: nothing known here
        return None
    if not isinstance(config_path, str) or not isinstance(weights_path, str):
        return None
    return CodecFiles(codec_id=codec_id, config_path=Path(config_path), weights_path=Path(weights_path))


def tokens_per_image(config: dict) -> int:
    """Tokens per image: the 96x96 crop downsampled 2**n_compressions times per side (576 for AION)."""
    side = CROP_SIZE // (2 ** int(config.get("n_compressions", 2)))
    return side * side


def check_codec_config(config: dict, path: Path) -> None:
    """The `ImageCodec` arguments a codec's config.json gives, of the types and ranges aion builds from (a
    negative or fractional size is a traceback inside torch otherwise, a string factor a codec that fails later)."""
    from astropt_tok.schema import Fields

    f = Fields(path, "fit or download the codec again")
    levels = f.need_list(config, "quantizer_levels", int)
    if any(level < 2 for level in levels):
        raise f.fail("quantizer_levels", levels, "a list of integers, each at least 2")
    for key in ("hidden_dims", "multisurvey_projection_dims", "embedding_dim", "num_consecutive"):
        f.maybe(config, key, int, low=1)
    f.maybe(config, "n_compressions", int, low=0)
    for key in ("range_compression_factor", "mult_factor"):
        if config.get(key) is not None and f.need(config, key, float) <= 0:
            raise f.fail(key, config[key], "a positive number")


def load_image_codec(codec_id: str = DEFAULT_CODEC, device: str = "cpu") -> LoadedCodec:
    """Build the real `aion.codecs.image.ImageCodec` from its config and load its safetensors weights."""
    from astropt_tok.schema import read_json_object

    files = resolve_codec_files(codec_id)
    config = read_json_object(files.config_path, "codec config", "fit or download the codec again")
    check_codec_config(config, files.config_path)

    from aion.codecs.image import ImageCodec

    try:
        codec = ImageCodec(**config)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise AstroptError(f"codec config {files.config_path} does not fit aion's ImageCodec: {exc}") from None
    # the quantizer's `levels` buffer is rebuilt from the config; anything else missing is a real mismatch
    load_weights(codec, files.weights_path, rebuilt=("levels",))
    codec = move_codec(codec.eval(), device)
    _fix_hsc_decode(codec)
    vocab = int(codec.quantizer.codebook_size)
    return LoadedCodec(
        codec=codec,
        codec_id=files.codec_id,
        config=config,
        weights_sha256=sha256_file(files.weights_path),
        vocab_size=vocab,
        tokens_per_image=tokens_per_image(config),
        revision=files.revision,
        device=str(device),
    )


# The kinds of AION codec this tool tokenises with, by codec class name. AION's MultiScalarCodec (Gaia XP
# coefficients), ScalarFieldCodec (segmentation maps) and CatalogCodec are not among them yet.
CODEC_KINDS = {"ImageCodec": "image", "GridScalarCodec": "scalar", "ScalarCodec": "scalar",
               "LogScalarCodec": "scalar", "SpectrumCodec": "spectrum"}


@dataclass(frozen=True)
class AionModality:
    """One AION modality as a user names it (its class name, `Z`, `LegacySurveyFluxG`, `DESISpectrum`), with
    the aion classes that hold and encode it and the snapshot subfolder of its codec."""

    name: str  # the AION modality class name
    cls: Any  # aion.modalities.<name>
    codec_cls: Any  # the aion codec class that serves it (aion.codecs.config.MODALITY_CODEC_MAPPING)
    kind: str  # "image", "scalar" or "spectrum"

    @property
    def folder(self) -> str:
        """The codec's subfolder of a hub snapshot: codecs/<the modality's short name> (codecs/Z, codecs/FLUX_G,
        codecs/spectrum for DESI and SDSS alike, codecs/image for every image survey)."""
        return f"codecs/{self.cls.name}"


def aion_modalities() -> dict[str, AionModality]:
    """Every AION modality this tool can tokenise, by class name."""
    from aion.codecs.config import MODALITY_CODEC_MAPPING

    return {cls.__name__: AionModality(cls.__name__, cls, codec_cls, CODEC_KINDS[codec_cls.__name__])
            for cls, codec_cls in MODALITY_CODEC_MAPPING.items() if codec_cls.__name__ in CODEC_KINDS}


def aion_modality(name: str, kind: str | None = None, flag: str = "--scalar") -> AionModality:
    """The AION modality of class `name`, checked to be of `kind` when given; one AstroptError naming the
    choices otherwise (`flag` is how the message calls the option that named it)."""
    known = aion_modalities()
    found = known.get(name)
    if found is None or (kind is not None and found.kind != kind):
        choices = sorted(n for n, m in known.items() if kind is None or m.kind == kind)
        what = "is not an AION modality" if found is None else f"is an AION {found.kind} modality, not a {kind}"
        raise AstroptError(f"{flag} modality {name!r} {what}; choose one of {', '.join(choices)}")
    return found


def parse_modality_pairs(entries: list[str], flag: str) -> tuple[tuple[str, str], ...]:
    """--scalar / --spectrum values, COLUMN:MODALITY each -> ((column, modality), ...), for tokenise and
    fit-codec alike; the modality is checked later by `aion_modality`."""
    out = []
    for entry in entries:
        column, sep, modality = entry.partition(":")
        if not sep or not column.strip() or not modality.strip() or ":" in modality:
            example = "Z:Z or FLUX_G:LegacySurveyFluxG" if flag == "--scalar" else "spectrum:DESISpectrum"
            raise AstroptError(f"{flag} {entry!r}: give COLUMN:MODALITY, the source column and its AION modality "
                               f"(e.g. {example})")
        out.append((column.strip(), modality.strip()))
    return tuple(out)


def load_codec(codec_id: str, modality: str, device: str = "cpu") -> LoadedCodec:
    """The real AION codec of `modality` (an AION class name) from the snapshot `codec_id`, ready on `device`:
    an image modality loads the image codec (`load_image_codec`); a scalar or spectrum modality its own codec
    from codecs/<short name>/ (config.json -> the aion codec class, model.safetensors -> its state, strictly)."""
    from astropt_tok.schema import read_json_object

    mod = aion_modality(modality, flag="modality")
    if mod.kind == "image":
        return load_image_codec(codec_id, device)
    files = resolve_codec_files(codec_id, mod.folder)
    config = read_json_object(files.config_path, "codec config", "fit or download the codec again")
    if mod.kind == "scalar" and config.get("modality") not in (None, mod.cls.name):
        raise AstroptError(f"codec config {files.config_path} is for modality {config.get('modality')!r}, not "
                           f"{mod.cls.name!r} ({modality}); fit or download that modality's codec again")
    args = {**config, "modality": mod.cls.name} if mod.kind == "scalar" else config
    try:
        codec = mod.codec_cls(**args)
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise AstroptError(f"codec config {files.config_path} does not fit aion's {mod.codec_cls.__name__} "
                           f"({type(exc).__name__}: {first_line(exc)})") from None
    load_weights(codec, files.weights_path)
    import torch

    codec = codec.eval().to(torch.device(device))
    quantizer = codec.quantizer
    value_range = None
    if mod.kind == "scalar":
        vocab, tokens = int(quantizer.codebook_size), 1
        buckets = getattr(quantizer, "buckets", None)  # GridScalarCodec: a fixed grid; values beyond it clamp
        if isinstance(buckets, torch.Tensor):
            value_range = (float(buckets[0]), float(buckets[-1]))
    else:  # a spectrum: its normalisation token, then the LFQ tokens (one codebook size for both)
        vocab = max(int(quantizer.codebook_size), int(codec.normalization_quantizer.codebook_size))
        tokens = _spectrum_tokens(codec)
    return LoadedCodec(codec=codec, codec_id=files.codec_id, config=config, weights_sha256=sha256_file(files.weights_path),
                       vocab_size=vocab, tokens_per_image=tokens, revision=files.revision, device=str(device),
                       kind=mod.kind, aion_modality=mod.name, folder=mod.folder, value_range=value_range)


def _spectrum_tokens(codec) -> int:
    """Tokens per spectrum of a SpectrumCodec: encode one flat spectrum on its own latent grid (the count depends
    on the encoder's depth and the grid's length, not on the spectrum)."""
    import torch
    from aion.modalities import Spectrum

    grid = codec.latent_grid.wavelength.reshape(1, -1).float()  # [1, num_pixels] Angstrom
    device = grid.device
    flat = Spectrum(flux=torch.ones_like(grid), ivar=torch.ones_like(grid),
                    mask=torch.zeros(grid.shape, dtype=torch.bool, device=device), wavelength=grid)
    with torch.inference_mode():
        return int(codec.encode(flat).shape[-1])


def load_weights(codec: Any, weights_path: Path, rebuilt: tuple[str, ...] = ()) -> None:
    """Load a codec's model.safetensors into it, strictly: unreadable, non-finite or mismatched weights are one
    AstroptError naming the file. `rebuilt`: endings of buffer names the codec builds from its config itself
    (the image quantizer's `levels`), allowed to be missing. A scalar codec's own `load_state_dict` maps the hub's
    `quantizer.*` keys onto its `_quantizer.*`."""
    from safetensors.torch import load_file

    from astropt_tok.health import refuse_non_finite_weights

    try:
        state = load_file(str(weights_path))
    except Exception as exc:
        raise AstroptError(f"codec weights {weights_path} are unreadable: {first_line(exc)}") from None
    # a NaN weight would give NaN latents (every row rejected by tokenise) or NaN pictures (decode)
    refuse_non_finite_weights(state, weights_path, "the codec is damaged or its fit diverged; fit it again "
                              "(astropt fit-codec) or pass another --codec")
    try:
        missing, unexpected = codec.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not fit the config
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), first_line(exc))
        raise AstroptError(f"codec weights {weights_path} do not match its config ({detail})") from None
    missing = [k for k in missing if not k.endswith(rebuilt)] if rebuilt else list(missing)
    if missing or unexpected:
        raise AstroptError(f"codec weights {weights_path} do not match its config "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def move_codec(codec: Any, device: str) -> Any:
    """`codec.to(device)`, the quantizer's place values included.

    AION's FiniteScalarQuantizer keeps `_basis` as a plain tensor, not a buffer: `.to(device)` leaves it on the
    host, and quantizer.encode/decode copy it to the device on every call. A blocking host-to-device copy waits
    for all queued device work, so each batch's encode would stall the codec's thread until the GPU had
    finished that batch, and the GPU would idle while the thread prepares the next. The values (and so the
    tokens) are the same."""
    import torch

    codec = codec.to(torch.device(device))
    if isinstance(getattr(codec.quantizer, "_basis", None), torch.Tensor):
        codec.quantizer._basis = codec.quantizer._basis.to(torch.device(device))
    return codec


def save_image_codec(codec: Any, out_dir: str | os.PathLike, config: dict) -> Path:
    """Save an `ImageCodec` in the hub layout (`codecs/image/config.json` + `model.safetensors`)."""
    from safetensors.torch import save_file

    from astropt_tok.atomic import atomic_file, atomic_write_text
    from astropt_tok.errors import writing

    sub = Path(out_dir) / CODEC_SUBFOLDER
    state = {k: v.detach().cpu().contiguous() for k, v in codec.state_dict().items()}
    with writing(sub):  # a full or read-only disk is one error naming the folder
        sub.mkdir(parents=True, exist_ok=True)
    # each file through a temporary name: a failed write (a refit's, or a resumed fit's) leaves the old one whole
    with atomic_file(sub / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    atomic_write_text(sub / "config.json", json.dumps(config, indent=2, sort_keys=True))
    return Path(out_dir)


CODEC_SIZES = {
    # a small real ImageCodec for tests and the demo (~10k parameters)
    "tiny": {"hidden_dims": 8, "multisurvey_projection_dims": 12, "num_consecutive": 1},
    # the architecture of polymathic-ai/aion-base's image codec (hidden 512, 4 residual layers per stage)
    "full": {"hidden_dims": 512, "multisurvey_projection_dims": 54, "num_consecutive": 4},
}


def make_random_codec(out_dir: str | os.PathLike, size: str = "tiny", seed: int = 0) -> Path:
    """Write a randomly initialised (untrained) real AION `ImageCodec` in the hub layout.

    `tiny` is for tests and the demo; `full` has aion-base's architecture, for throughput benchmarks on
    machines that cannot download the real weights (speed does not depend on the weights; tokens do).
    """
    import torch
    from aion.codecs.image import ImageCodec

    config = {
        "quantizer_levels": [7, 5, 5, 5, 5],  # AION's own levels: 4375 codes
        "n_compressions": 2,
        "embedding_dim": 5,
        "range_compression_factor": 0.01,
        "mult_factor": 10.0,
        **CODEC_SIZES[size],
    }
    torch.manual_seed(seed)
    return save_image_codec(ImageCodec(**config), out_dir, config)


def make_tiny_codec(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny, randomly initialised real AION `ImageCodec` in the hub layout (tests, demo)."""
    return make_random_codec(out_dir, "tiny", seed)


def _fix_hsc_decode(codec) -> None:
    """Let the codec decode HSC bands. polymathic-aion 0.0.2's `RescaleToLegacySurvey.backward` calls a
    `_reverse_zeropoint` it does not define (decoding any HSC band raises AttributeError); the inverse of its
    `forward` (flux / 10**((27 - 22.5) / 2.5)) multiplies by that same scale, `convert_zeropoint(27)`. Given to
    this codec's rescaler only, and only where the method is missing; encoding is untouched."""
    rescaler = getattr(codec, "rescaler", None)
    if rescaler is not None and not hasattr(rescaler, "_reverse_zeropoint"):
        rescaler._reverse_zeropoint = rescaler.convert_zeropoint


def demo_codec_dir() -> Path:
    """The small AION ImageCodec shipped for the demo (hub layout; how it was fitted: its MODEL.md)."""
    if not (DEMO_CODEC_DIR / WEIGHTS_FILE).is_file():
        raise AstroptError(f"the demo codec is missing from this installation ({DEMO_CODEC_DIR / WEIGHTS_FILE}); "
                           "reinstall the package, or pass --codec DIR")
    return DEMO_CODEC_DIR
