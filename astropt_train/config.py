"""The training configuration: one typed dataclass, model presets, and TOML loading.

Precedence: dataclass defaults < `--config FILE.toml` < command-line flags. The resolved config is saved
in the run folder (`config.json`, and `train_config.toml` that `--config` reads back).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from astropt_tok.errors import AstroptError
from astropt_tok.launch import DEFAULT_DIST_TIMEOUT_S

# name -> (n_layer, n_head, n_embd). The numbered ones are upstream AstroPT's scaling-suite shapes
# (config/scaling/astroptNNNM.py); their names count upstream's parameters, which depend on its patch
# size and vocabulary, so the count for a 4375-code AION vocabulary differs a little.
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 2, 64),  # CPU tests and the demo
    "small": (6, 6, 384),
    "001M": (4, 8, 128),
    "005M": (6, 8, 256),
    "010M": (6, 8, 384),
    "020M": (6, 8, 512),
    "95M": (12, 12, 768),  # AstroPT's published 95M (upstream config astropt070M.py, HF astropt/095M)
    "300M": (24, 16, 1024),
    "700M": (16, 8, 2048),
    "2100M": (26, 32, 2560),
    # upstream's 2.1B at its full 32 layers: its config cut them to 26 "due to memory limitations" (DDP only);
    # sharded with FSDP it fits (`astropt plan --preset 2100M-32L`)
    "2100M-32L": (32, 32, 2560),
}
DEFAULT_PRESET = "tiny"
DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("bf16", "fp16", "fp32")
LOGGERS = ("csv", "wandb", "tensorboard")
PARALLEL = ("ddp", "fsdp")
CHECKPOINT_FORMATS = ("full", "sharded")


@dataclass
class TrainConfig:
    """Everything a training run needs; every `astropt train` flag is one field."""

    tokens: str = ""  # token store folder
    out: str = "runs/astropt"  # run folder: checkpoints, metrics, images
    # model: a preset, or explicit sizes (which override the preset's)
    preset: str | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    dropout: float = 0.0
    bias: bool = False
    head: str = "affine"  # "affine" or "aim": upstream AstroPT's two heads (its `tokeniser`)
    # a store of several image columns: which, in sequence order (comma-separated; None: all, the store's order)
    modalities: str | None = None
    shuffle_modalities: bool = False  # draw each galaxy's block order from (seed, epoch, row) instead
    # each modality's weight in the loss, "NAME=W,NAME=W" (--loss-weight NAME=W, repeatable); unnamed ones 1
    loss_weight: str | None = None
    init_from: str | None = None  # start from these weights: a run/checkpoint folder or upstream AstroPT's ckpt.pt
    # optimisation
    batch_size: int = 16  # micro-batch per process
    grad_accum: int = 1
    max_iters: int = 1000
    lr: float = 6e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None: max_iters
    min_lr: float | None = None  # None: lr / 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    # evaluation
    eval_interval: int = 200
    eval_iters: int = 20
    val_fraction: float = 0.05
    val_images: int = 4  # validation galaxies drawn target|prediction at each eval; 0 never loads the codec
    codec: str | None = None  # codec id or folder for those images; None: the store manifest's codec
    accept_codec_change: bool = False  # draw them with a codec whose weights differ from those that made the store
    # system
    device: str = "auto"
    dtype: str = "bf16"  # autocast dtype on CUDA; CPU always trains in fp32
    compile: bool | None = None  # None: compile on CUDA only
    deterministic: bool = False  # deterministic kernels (CUDA: bit-identical reruns and resumes, a little slower)
    loss_chunks: int = 1  # > 1: the loss's logits are made (and remade in backward) this many chunks at a time
    seed: int = 1337
    workers: int | None = None  # DataLoader workers; None: 0 on CPU, 2 on CUDA
    threads: int | None = None  # torch CPU threads; None: torch's own (training uses every core well, BENCHMARKS.md)
    store_reads: str = "pread"  # "pread": RSS flat however large the store; "mmap": gather through the maps
    # under torchrun: "ddp" replicates the model on every rank; "fsdp" shards parameters, gradients and AdamW
    # state across ranks (FSDP2, per transformer block, astropt_train.parallel)
    parallel: str = "ddp"
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory
    # "full": rank 0 writes model.safetensors + trainer_state.pt; "sharded": every rank writes its own shards
    # (torch.distributed.checkpoint), resumable with another process count. None: sharded under fsdp, else full
    checkpoint_format: str | None = None
    save_consolidated: bool = False  # sharded checkpoints also get a model.safetensors of the whole model
    # under torchrun: seconds to wait for the other ranks to join, and the limit of every collective (DDP's
    # all-reduces); waits for rank 0's checkpoints and validation pictures are not limited by it
    dist_timeout: float = DEFAULT_DIST_TIMEOUT_S
    # checkpoints and logs
    resume: bool = False
    checkpoint_interval: int = 1000  # 0: only at the end of the run
    keep_last: int = 3
    save: bool = True  # False writes no checkpoints at all (benchmarks)
    log: str = "csv"
    log_interval: int = 10
    live: bool | None = None  # rich live display; None: when stdout is a terminal
    log_rows: bool = False  # debug: each rank appends the rows its DataLoader delivered (found from their tokens) to RUN/rows-rank{r}.txt

    def model_dims(self) -> tuple[int, int, int]:
        """(n_layer, n_head, n_embd): the preset's, overridden by explicit sizes."""
        name = self.preset or DEFAULT_PRESET
        if name not in PRESETS:
            raise AstroptError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        L, H, E = PRESETS[name]
        return (L if self.n_layer is None else self.n_layer, H if self.n_head is None else self.n_head,  # 0 is refused
                E if self.n_embd is None else self.n_embd)

    def model_given(self) -> bool:
        """Whether the user chose a model shape (a preset or any size)."""
        return any(v is not None for v in (self.preset, self.n_layer, self.n_head, self.n_embd))

    def modality_names(self, store) -> list[str] | None:
        """The modalities to train on, in sequence order: --modalities, else all of the store's; None for a store
        of one image column (its tokens are the one modality images_aion)."""
        if not store.modalities:
            if self.modalities or self.shuffle_modalities:
                raise AstroptError(f"--modalities and --shuffle-modalities need a store of several image columns "
                                   f"(or scalar and spectrum columns beside one); {store.dir} holds one")
            return None
        if self.modalities is None:
            names = list(store.modalities)
        else:
            names = [m.strip() for m in self.modalities.split(",") if m.strip()]
            unknown = [m for m in names if m not in store.modalities]
            if not names or unknown or len(set(names)) != len(names):
                raise AstroptError(f"--modalities {self.modalities!r}: name each of the store's modalities at most "
                                   f"once ({', '.join(store.modalities)})")
        if sum(store.modality_tokens[m] for m in names) < 2:
            raise AstroptError(f"--modalities {','.join(names)}: a sequence of one token has nothing to predict; "
                               "train on more modalities (e.g. an image column with it)")
        return names

    def model_shapes(self, store, names: list[str] | None) -> dict:
        """The GPTConfig fields that come from the store: vocab_size, block_size and, when the modalities differ
        in kind, vocabulary or length (a store's image, scalar and spectrum columns), each one's own
        (modality_vocab, modality_tokens, modality_kinds, in `names` order); and the loss weights."""
        shapes = {"vocab_size": store.vocab_size, "modalities": names, "loss_weights": self.loss_weights(names)}
        if not names:
            return {**shapes, "block_size": store.tokens_per_image}
        vocab = [store.modality_vocab[n] for n in names]
        tokens = [store.modality_tokens[n] for n in names]
        kinds = [store.modality_kind[n] for n in names]
        shapes["block_size"] = sum(tokens)
        if len(set(vocab)) > 1 or len(set(tokens)) > 1 or set(kinds) != {"image"}:
            shapes.update(modality_vocab=vocab, modality_tokens=tokens, modality_kinds=kinds)
        return shapes

    def loss_weights(self, names: list[str] | None) -> list[float] | None:
        """Each trained modality's loss weight (--loss-weight NAME=W; 1 for the others), in `names` order; None
        when none is given (every weight 1)."""
        given = parse_loss_weights(self.loss_weight)
        if not given:
            return None
        known = names or []
        unknown = [n for n in given if n not in known]
        if unknown:
            have = ", ".join(known) if known else "one image column (no named modalities)"
            raise AstroptError(f"--loss-weight {unknown[0]}: this run trains on no modality of that name; it trains "
                               f"on {have}")
        weights = [given.get(n, 1.0) for n in known]
        if not any(weights):
            raise AstroptError("--loss-weight: every modality's weight is 0; give at least one a positive weight")
        return weights

    def sharded_checkpoints(self) -> bool:
        """Whether checkpoints are written as every rank's shards (--checkpoint-format, else --parallel fsdp)."""
        return (self.checkpoint_format or ("sharded" if self.parallel == "fsdp" else "full")) == "sharded"

    def decay_iters(self) -> int:
        """The cosine schedule's length."""
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.max_iters

    def final_lr(self) -> float:
        """The learning rate the cosine decays to."""
        return self.min_lr if self.min_lr is not None else self.lr / 10

    def validate(self) -> None:
        """Refuse wrong types, non-finite numbers and inconsistent settings with one clear message."""
        check_types(self)
        L, H, E = self.model_dims()
        if min(L, H, E) <= 0 or E % H:
            raise AstroptError(f"n_embd ({E}) must be a positive multiple of n_head ({H}), n_layer ({L}) positive")
        for name in ("batch_size", "grad_accum", "max_iters", "eval_iters", "log_interval", "eval_interval"):
            if getattr(self, name) <= 0:
                raise AstroptError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if min(self.warmup_iters, self.checkpoint_interval, self.val_images) < 0 or self.keep_last < 1:
            raise AstroptError("warmup-iters, checkpoint-interval and val-images must be >= 0, keep-last >= 1")
        if self.loss_chunks < 1:
            raise AstroptError(f"loss-chunks must be 1 (plain) or more, got {self.loss_chunks}")
        if self.head not in ("affine", "aim"):
            raise AstroptError(f"head must be affine or aim, got {self.head!r}")
        if self.lr_decay_iters is not None and self.lr_decay_iters < 0:
            raise AstroptError(f"lr-decay-iters must be >= 0, got {self.lr_decay_iters}")
        if self.threads is not None and self.threads < 1:
            raise AstroptError(f"threads must be 1 or more (or left out: torch's own), got {self.threads}")
        if self.workers is not None and self.workers < 0:
            raise AstroptError(f"workers must be 0 (read in this process) or more, got {self.workers}")
        if self.dist_timeout <= 0:
            raise AstroptError(f"dist-timeout must be a positive number of seconds, got {self.dist_timeout}")
        if self.seed < 0:
            raise AstroptError(f"seed must be 0 or more, got {self.seed}")
        if self.parallel not in PARALLEL:
            raise AstroptError(f"parallel must be one of {', '.join(PARALLEL)}, got {self.parallel!r}")
        if self.checkpoint_format is not None and self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise AstroptError(f"checkpoint-format must be one of {', '.join(CHECKPOINT_FORMATS)}, got "
                               f"{self.checkpoint_format!r}")
        if self.parallel == "fsdp" and self.checkpoint_format == "full":
            raise AstroptError("--checkpoint-format full needs --parallel ddp: under fsdp each rank writes its own "
                               "shards (--checkpoint-format sharded; add --save-consolidated for a model.safetensors)")
        if self.save_consolidated and not self.sharded_checkpoints():
            raise AstroptError("--save-consolidated applies to sharded checkpoints (--checkpoint-format sharded or "
                               "--parallel fsdp); full checkpoints always hold model.safetensors")
        if self.store_reads not in ("pread", "mmap"):
            raise AstroptError(f"store-reads must be pread or mmap, got {self.store_reads!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise AstroptError(f"val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise AstroptError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise AstroptError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.log not in LOGGERS:
            raise AstroptError(f"log must be one of {', '.join(LOGGERS)}, got {self.log!r}")
        if self.lr <= 0 or self.final_lr() < 0:
            raise AstroptError(f"lr must be positive and min-lr non-negative, got lr {self.lr}, min-lr {self.final_lr()}")
        if not 0.0 <= self.dropout < 1.0:
            raise AstroptError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise AstroptError(f"weight-decay and grad-clip must be >= 0, got {self.weight_decay} and {self.grad_clip}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise AstroptError(f"beta1 and beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        if not self.tokens:
            raise AstroptError("no token store given: pass --tokens DIR")
        parse_loss_weights(self.loss_weight)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)


def parse_loss_weights(text: str | None) -> dict[str, float]:
    """"NAME=W,NAME=W" -> {NAME: W}: each name once, W a finite number >= 0."""
    out: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, eq, value = item.partition("=")
        name = name.strip()
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not eq or not name or not math.isfinite(weight) or weight < 0:
            raise AstroptError(f"--loss-weight {item.strip()!r}: give NAME=W, a modality's name and a finite weight "
                               ">= 0 (e.g. --loss-weight Z=100)")
        if name in out:
            raise AstroptError(f"--loss-weight names {name} twice; give each modality once")
        out[name] = weight
    return out


FIELDS = {f.name for f in fields(TrainConfig)}
_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "None": type(None)}


def check_types(config) -> None:
    """Every field of a config dataclass has its annotated type (an int is a float too; a bool is not an int)
    and every number is finite: a TOML value of the wrong type or `--lr nan` is one error naming the setting."""
    for f in fields(config):
        value = getattr(config, f.name)
        allowed = tuple(_TYPES[t.strip()] for t in str(f.type).split("|") if t.strip() in _TYPES)
        if not allowed:
            continue
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if not ok and float in allowed and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        name = f.name.replace("_", "-")
        if not ok:
            kinds = " or ".join("none" if t is type(None) else t.__name__ for t in allowed)
            raise AstroptError(f"{name} must be {kinds}, got {value!r} ({type(value).__name__})")
        if isinstance(value, float) and not math.isfinite(value):
            raise AstroptError(f"{name} must be a finite number, got {value}")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config (flat `key = value`, or under a [train] table); keys may use dashes."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise AstroptError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AstroptError(f"config file {path} is unreadable: {exc}") from None
    if isinstance(data.get("train"), dict):
        data = data["train"]
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise AstroptError(f"config file {path}: unknown setting {key!r}")
        out[name] = value
    return out


def build_config(overrides: dict[str, Any] | None = None, config_file: str | Path | None = None) -> TrainConfig:
    """Defaults, then the TOML file, then `overrides` (None values mean "not given"); validated."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(load_toml(config_file))
    for k, v in (overrides or {}).items():
        if k not in FIELDS:
            raise AstroptError(f"unknown setting {k!r}")
        if v is not None:
            values[k] = v
    try:
        cfg = TrainConfig(**values)
    except TypeError as exc:
        raise AstroptError(f"bad config: {exc}") from None
    try:
        cfg.validate()
    except AstroptError as exc:
        if config_file is not None:
            raise AstroptError(f"{exc} (settings from {config_file} and the flags)") from None
        raise
    if cfg.tokens.startswith("hf:"):  # hf://datasets/ORG/NAME[@rev]: checked here, fetched by the trainer
        from astropt_tok.store_hub import parse_hub_store

        cfg.tokens = str(parse_hub_store(cfg.tokens))  # as written (a Path option makes hf:// hf:/)
    return cfg


NOT_REPLAYED = ("resume",)  # how a run was started, not what it is: left out of train_config.toml


def to_toml(cfg: TrainConfig) -> str:
    """The config as TOML that `--config` reads back to replay the run (unset optional fields and `resume` left out)."""
    lines = ["# the configuration this run used; `astropt train --config` reads it back (add --resume to continue it)"]
    for k, v in cfg.to_dict().items():
        if v is None or k in NOT_REPLAYED:
            continue
        lines.append(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}")
    return "\n".join(lines) + "\n"
