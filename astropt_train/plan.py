"""The memory plan: bytes per GPU of training a GPT preset under DDP or FSDP2, with and without activation
checkpointing, and the largest micro-batch that fits (`astropt plan`).

Arithmetic only: nothing is allocated on a device. Parameter counts are exact: the real `GPT` is built on the
meta device (no memory), and every count, each block's and each tensor's shard, is read from its tensors.

Assumptions, the trainer's (`astropt train`; P parameters, N = --gpus ranks, c = bytes of the compute dtype: 2
for bf16/fp16, 4 for fp32; B the micro-batch, T = positions - 1 fed per galaxy, E width, H heads, V vocabulary):

- Mixed precision keeps fp32 master weights, fp32 gradients and AdamW's two fp32 moments (fused AdamW: no
  other state); compute runs in the --dtype.
- DDP (`--parallel ddp`) replicates everything on every rank: fp32 params 4P, plus the bf16 copies autocast
  makes of every matmul weight (cached for the forward, saved for the backward: 2 x the non-embedding
  parameters), fp32 grads 4P, and DDP's gradient buckets, another 4P (`gradient_as_bucket_view` is off, torch's
  default; one process has no buckets), optimiser 8P. Under autocast the residual stream stays fp32.
- FSDP2 (`--parallel fsdp`: `fully_shard` per transformer block, then the root; MixedPrecisionPolicy
  param_dtype bf16, reduce_dtype fp32) shards each tensor's first dimension over N ranks, padded to a multiple
  of N (the count is per tensor: S = sum of ceil(rows / N) x the rest): fp32 params 4S, grads 4S, optimiser 8S.
  Unsharded at a time: the root's params in bf16 (FSDP2 does not reshard the root after forward: embeddings,
  position tables, ln_f, heads), two blocks' (the one computing and the one prefetched), the root's bf16 grads
  (held until its reduce-scatter at the end of backward) and one block's grads in bf16 plus their fp32 copy for
  the reduce-scatter. Params are bf16 in compute, so the residual stream is bf16.
- Activations are eager autograd's saved tensors with dropout 0 (the default) and SDPA's flash or
  memory-efficient kernel (no T x T matrix; a log-sum-exp per head and position). Per block, in bytes per
  position, with r the residual stream's bytes: LayerNorm inputs 2r, the c_attn input c, q/k/v 3c, attention
  output c (laid out as c_proj's input: no copy), the c_fc input c, the GELU input 4c, the c_proj input 4c
  (= (2r + 14c) E), plus 4H (log-sum-exp) and 16 (two LayerNorms' mean and rstd). Outside the blocks: ln_f's
  input, the head's input (aim: plus its 4E hidden twice), the fp32 log-softmax (4 V), the int64 tokens and
  targets. At the peak besides: the logits' transients (8 V: the bf16 logits and their fp32 copy in forward,
  the log-softmax's gradient and the logits' in backward; --loss-chunks N: one chunk's head and logits, remade
  in backward, and the hidden states kept instead), and the backward pass's working gradients (the residual's,
  r E, and the MLP's two 4E ones, 8c E). tests/test_plan.py checks the saved part against the tensors autograd
  saves for a real model (fp32 on CPU, where SDPA's flash kernel saves what CUDA's does). torch.compile (on by
  default on CUDA) recomputes cheap pointwise ops instead of saving them, so compiled runs keep less: the
  figures are eager's.
- Activation checkpointing (`--activation-checkpointing`, per block) keeps each block's input (r E per
  position) and recomputes one block at a time in backward.
- Overhead: a fixed OVERHEAD_BYTES per GPU for what the tensors above leave out: the CUDA context (~0.5 GiB),
  NCCL's buffers, cuBLAS workspaces and the caching allocator's fragmentation.
- The total is the sum of the columns: at the first micro-batch of a step grads fill in during backward as
  activations are freed, so the real peak can be lower by up to the smaller of the two; with --grad-accum > 1
  grads persist through the next micro-batch's forward and the sum is the peak.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from astropt_tok.errors import AstroptError

from astropt_train.config import DTYPES, PRESETS, TrainConfig, check_types

GIB = 1024**3
OVERHEAD_BYTES = 2 * GIB  # CUDA context, NCCL buffers, cuBLAS workspaces, allocator fragmentation (see above)
AION_TOKENS = 576  # positions per galaxy: one AION image (96 x 96 crop, 24 x 24 tokens)
AION_VOCAB = 4375  # AION's image codec: quantizer levels [7, 5, 5, 5, 5]
MODES = ("DDP", "DDP+AC", "FSDP", "FSDP+AC")
MAX_BATCH = 2**31  # the search's ceiling: a tiny model on a large GPU


@dataclass
class PlanConfig:
    """Everything `astropt plan` needs; every flag is one field."""

    preset: str | None = None  # None and no sizes: every preset
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    gpus: int = 8
    gpu_memory: float = 80.0  # GiB per GPU
    batch_size: int = 8  # micro-batch per GPU
    dtype: str = "bf16"
    seq_len: int | None = None  # positions per galaxy (the model's block_size); None: 576, or the store's
    vocab: int | None = None  # None: AION's 4375, or the store's
    tokens: str | None = None  # a token store: its vocabulary, tokens per image and modalities
    head: str = "affine"
    loss_chunks: int = 1

    def validate(self) -> None:
        """Refuse bad values with one clear message."""
        check_types(self)
        if self.preset is not None and self.preset not in PRESETS:
            raise AstroptError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.gpus < 1:
            raise AstroptError(f"gpus must be 1 or more, got {self.gpus}")
        if self.gpu_memory <= 0:
            raise AstroptError(f"gpu-memory must be a positive number of GiB per GPU, got {self.gpu_memory}")
        if self.batch_size < 1:
            raise AstroptError(f"batch-size must be 1 or more, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise AstroptError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.head not in ("affine", "aim"):
            raise AstroptError(f"head must be affine or aim, got {self.head!r}")
        if self.loss_chunks < 1:
            raise AstroptError(f"loss-chunks must be 1 (plain) or more, got {self.loss_chunks}")
        if self.seq_len is not None and self.seq_len < 2:
            raise AstroptError(f"seq-len must be 2 or more positions, got {self.seq_len}")
        if self.vocab is not None and self.vocab < 1:
            raise AstroptError(f"vocab must be 1 or more, got {self.vocab}")
        if self.tokens is not None and (self.seq_len is not None or self.vocab is not None):
            raise AstroptError("--tokens gives the sequence length and vocabulary: leave out --seq-len and --vocab")
        for name in ("n_layer", "n_head", "n_embd"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise AstroptError(f"{name.replace('_', '-')} must be 1 or more, got {getattr(self, name)}")

    def shapes(self) -> list[tuple[str, tuple[int, int, int]]]:
        """(name, (n_layer, n_head, n_embd)) of each model to plan: the one asked for, or every preset."""
        sizes = (self.n_layer, self.n_head, self.n_embd)
        if self.preset is None and all(s is None for s in sizes):
            return list(PRESETS.items())
        dims = TrainConfig(preset=self.preset, n_layer=self.n_layer, n_head=self.n_head,
                           n_embd=self.n_embd).model_dims()
        _, H, E = dims
        if E % H:
            raise AstroptError(f"n_embd ({E}) must be a multiple of n_head ({H})")
        name = self.preset if self.preset is not None and dims == PRESETS[self.preset] else "custom"
        return [(name, dims)]


@dataclass(frozen=True)
class ModelShape:
    """A GPT's sizes and its parameters, counted on the meta device: the whole, one block, per-tensor shapes."""

    name: str
    n_layer: int
    n_head: int
    n_embd: int
    vocab: int
    block_size: int  # positions per galaxy (tokens per image x modalities)
    modalities: int
    head: str
    params: int  # every parameter (GPT.num_params)
    embedding_params: int  # the token and position lookup tables (not cast by autocast)
    block_shapes: tuple[tuple[int, ...], ...]  # the tensors of one transformer block
    root_shapes: tuple[tuple[int, ...], ...]  # every tensor outside the blocks

    @property
    def block_params(self) -> int:
        """Parameters of one transformer block."""
        return sum(_numel(s) for s in self.block_shapes)

    @property
    def root_params(self) -> int:
        """Parameters outside the blocks: token and position tables, ln_f, heads."""
        return sum(_numel(s) for s in self.root_shapes)

    def sharded_params(self, ranks: int) -> int:
        """Parameters one rank holds under FSDP2: each tensor's first dimension split over `ranks`, padded."""
        per = lambda shapes: sum(-(-s[0] // ranks) * _numel(s[1:]) for s in shapes)
        return per(self.root_shapes) + self.n_layer * per(self.block_shapes)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def model_shape(name: str, dims: tuple[int, int, int], vocab: int, block_size: int, head: str = "affine",
                modalities: list[str] | None = None, per_modality: dict | None = None) -> ModelShape:
    """Build the real GPT on the meta device (no memory) and read its parameter shapes: the root's and one
    block's (every block has the same; one is built, so a hostile --n-layer costs nothing). `per_modality`:
    GPTConfig's modality_vocab/modality_tokens/modality_kinds of a store of image, scalar and spectrum columns."""
    import torch

    from astropt_train.model import GPT, GPTConfig

    L, H, E = dims
    cfg = GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=1, n_head=H, n_embd=E, head=head,
                    modalities=modalities, **(per_modality or {}))
    with torch.device("meta"):
        model = GPT(cfg)
    blocks = {id(p) for p in model.transformer.h.parameters()}
    root = tuple(tuple(p.shape) for p in model.parameters() if id(p) not in blocks)
    block = tuple(tuple(p.shape) for p in model.transformer.h[0].parameters())
    return ModelShape(name=name, n_layer=L, n_head=H, n_embd=E, vocab=vocab, block_size=block_size,
                      modalities=len(model.names), head=head,
                      params=sum(map(_numel, root)) + L * sum(map(_numel, block)),
                      embedding_params=model.num_params() - model.num_params(non_embedding=True),
                      block_shapes=block, root_shapes=root)


@dataclass
class ModePlan:
    """Bytes per rank of one parallel mode at the batch asked, and the largest micro-batch that fits."""

    mode: str  # one of MODES
    params: int
    grads: int
    optimiser: int
    activations: int
    overhead: int
    total: int
    fits: bool
    largest_batch: int  # 0: not even batch 1 fits


@dataclass
class Plan:
    """The memory plan of one model on `gpus` GPUs of `gpu_memory` GiB."""

    model: ModelShape
    gpus: int
    gpu_memory: float
    batch_size: int
    dtype: str
    loss_chunks: int
    modes: list[ModePlan] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (bytes as ints), without the per-tensor shapes."""
        model = {k: v for k, v in asdict(self.model).items() if not k.endswith("_shapes")}
        model.update(block_params=self.model.block_params, root_params=self.model.root_params)
        return {"model": model, "gpus": self.gpus, "gpu_memory_gib": self.gpu_memory, "batch_size": self.batch_size,
                "dtype": self.dtype, "loss_chunks": self.loss_chunks, "overhead_bytes": OVERHEAD_BYTES,
                "modes": [asdict(m) for m in self.modes]}


def state_bytes(shape: ModelShape, mode: str, gpus: int, dtype: str) -> tuple[int, int, int]:
    """(params, grads, optimiser) bytes per rank under `mode` (DDP or FSDP, with or without +AC)."""
    c = 4 if dtype == "fp32" else 2  # compute bytes
    P = shape.params
    if mode.startswith("DDP"):
        casts = 0 if c == 4 else c * (P - shape.embedding_params)  # autocast's bf16 copies of matmul weights
        buckets = 4 * P if gpus > 1 else 0  # DDP's gradient buckets (one process: no DDP)
        return 4 * P + casts, 4 * P + buckets, 8 * P
    S = shape.sharded_params(gpus)
    root, block = shape.root_params, shape.block_params
    unsharded_params = c * (root + 2 * block)  # the root's and two blocks' (computing, prefetched)
    unsharded_grads = c * root + (c + 4 if c < 4 else 4) * block  # the root's; one block's and its fp32 copy
    return 4 * S + unsharded_params, 4 * S + unsharded_grads, 8 * S


def _widths(mode: str, dtype: str) -> tuple[int, int]:
    """(r, c): bytes of the residual stream (fp32 under DDP's autocast; FSDP's params are bf16) and of compute."""
    c = 4 if dtype == "fp32" else 2
    return (4 if mode.startswith("DDP") else c), c


def saved_activation_bytes(shape: ModelShape, batch: int, mode: str, dtype: str, loss_chunks: int = 1) -> int:
    """Bytes autograd saves for backward in one forward at micro-batch `batch` (module docstring); with
    checkpointing, the blocks' inputs only. Constant (batch-free) tensors such as the position ids are left out."""
    r, c = _widths(mode, dtype)
    BT, E, V = batch * (shape.block_size - 1), shape.n_embd, shape.vocab
    blocks = shape.n_layer * (r * BT * E if mode.endswith("+AC") else block_activation_bytes(shape, batch, mode, dtype))
    ln_f = BT * (r * E + 8)  # ln_f's input, mean and rstd
    if loss_chunks > 1:  # the head and the logits live inside the chunks' checkpoints: only ln_f's output is kept
        head = r * BT * E
    else:  # the head's input (aim: + its GELU input and c_proj input, 4E each), the fp32 log-softmax
        head = BT * (c * E * (1 if shape.head == "affine" else 9) + 4 * V)
    inputs = 16 * BT  # int64 tokens (the embedding's) and targets (the loss's)
    return blocks + ln_f + head + inputs


def block_activation_bytes(shape: ModelShape, batch: int, mode: str, dtype: str) -> int:
    """Bytes one transformer block saves for backward: (2r + 14c) E + 4H + 16 per position."""
    r, c = _widths(mode, dtype)
    BT, E, H = batch * (shape.block_size - 1), shape.n_embd, shape.n_head
    # LayerNorm inputs 2r; c_attn input, q/k/v, attention output (laid out as c_proj's input: no copy) 5c;
    # c_fc input c, GELU input 4c, c_proj input 4c; log-sum-exp fp32 per head; two LayerNorms' mean and rstd
    return BT * ((2 * r + 14 * c) * E + 4 * H + 16)


def activation_bytes(shape: ModelShape, batch: int, mode: str, dtype: str, loss_chunks: int = 1) -> int:
    """Peak activation bytes at micro-batch `batch`: the saved tensors, plus what lives only at the peak: the
    block being recomputed (checkpointing), the logits' transients and the backward's working gradients."""
    r, c = _widths(mode, dtype)
    BT, E, V = batch * (shape.block_size - 1), shape.n_embd, shape.vocab
    recomputed = block_activation_bytes(shape, batch, mode, dtype) if mode.endswith("+AC") else 0
    # logits: forward, the bf16 logits and their fp32 copy; backward, the log-softmax's gradient and the logits'
    # (8 V beside the saved fp32 log-softmax); --loss-chunks: one chunk's head and logits, remade in backward
    per_position = 8 * V
    if loss_chunks > 1:
        per_position = c * E * (1 if shape.head == "affine" else 9) + 12 * V
    logits = per_position * (-(-BT // loss_chunks))
    backward = BT * (r + 8 * c) * E  # the residual's gradient and the MLP's two 4E gradients
    return saved_activation_bytes(shape, batch, mode, dtype, loss_chunks) + recomputed + logits + backward


def mode_total(shape: ModelShape, mode: str, gpus: int, batch: int, dtype: str, loss_chunks: int = 1) -> int:
    """Total bytes per rank of `mode` at micro-batch `batch`, overhead included."""
    return sum(state_bytes(shape, mode, gpus, dtype)) + activation_bytes(shape, batch, mode, dtype, loss_chunks) \
        + OVERHEAD_BYTES


def largest_batch(shape: ModelShape, mode: str, gpus: int, budget: int, dtype: str, loss_chunks: int = 1) -> int:
    """The largest micro-batch whose total fits `budget` bytes (0 when batch 1 does not): the total grows with
    the batch, so double, then bisect."""
    fits = lambda b: mode_total(shape, mode, gpus, b, dtype, loss_chunks) <= budget
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi < MAX_BATCH and fits(hi):
        lo, hi = hi, hi * 2
    if fits(hi):
        return hi
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def plan_model(shape: ModelShape, gpus: int, gpu_memory: float, batch_size: int, dtype: str = "bf16",
               loss_chunks: int = 1) -> Plan:
    """The plan of one model: each of MODES at `batch_size`, and its largest micro-batch."""
    budget = int(gpu_memory * GIB)
    plan = Plan(model=shape, gpus=gpus, gpu_memory=gpu_memory, batch_size=batch_size, dtype=dtype,
                loss_chunks=loss_chunks)
    for mode in MODES:
        params, grads, optimiser = state_bytes(shape, mode, gpus, dtype)
        activations = activation_bytes(shape, batch_size, mode, dtype, loss_chunks)
        total = params + grads + optimiser + activations + OVERHEAD_BYTES
        plan.modes.append(ModePlan(mode=mode, params=params, grads=grads, optimiser=optimiser,
                                   activations=activations, overhead=OVERHEAD_BYTES, total=total,
                                   fits=total <= budget,
                                   largest_batch=largest_batch(shape, mode, gpus, budget, dtype, loss_chunks)))
    return plan


def sequence(cfg: PlanConfig) -> tuple[int, int, list[str] | None, dict]:
    """(vocabulary, positions per galaxy, modality names or None, per-modality GPTConfig fields or {}): the
    store's, the flags', or AION's. A store of image, scalar and spectrum columns: positions are the sum of the
    columns' tokens, the vocabulary (what the plan's logits are sized by) the largest."""
    if cfg.tokens is None:
        return (cfg.vocab or AION_VOCAB, cfg.seq_len or AION_TOKENS, None, {})
    from astropt_tok.store.format import modality_entries
    from astropt_tok.store_hub import read_store_manifest

    m = read_store_manifest(cfg.tokens)  # a folder, or an hf:// store's manifest alone
    names = [x["name"] for x in m.get("modalities") or []] or None
    entries = modality_entries(m) if names else []
    if not any("kind" in x for x in m.get("modalities") or []):  # images of one codec: equal blocks
        return int(m["vocab_size"]), int(m["tokens_per_image"]) * len(names or [0]), names, {}
    per_modality = {"modality_vocab": [int(e["vocab_size"]) for e in entries],
                    "modality_tokens": [int(e["tokens_per_object"]) for e in entries],
                    "modality_kinds": [e["kind"] for e in entries]}
    return (max(per_modality["modality_vocab"]), sum(per_modality["modality_tokens"]), names, per_modality)


def plan(cfg: PlanConfig) -> list[Plan]:
    """The memory plan of the model `cfg` names, or of every preset: one Plan each."""
    cfg.validate()
    vocab, block_size, modalities, per_modality = sequence(cfg)
    return [plan_model(model_shape(name, dims, vocab, block_size, cfg.head, modalities, per_modality), cfg.gpus,
                       cfg.gpu_memory, cfg.batch_size, cfg.dtype, cfg.loss_chunks)
            for name, dims in cfg.shapes()]


def gib(n: int) -> str:
    """Bytes as GiB with one decimal."""
    return f"{n / GIB:,.1f}"


def plan_table(p: Plan):
    """One model's plan: a row per mode, a column per part (GiB per rank)."""
    from astropt_tok.report import folding_table

    m = p.model
    title = (f"{m.name}: {m.params / 1e6:,.1f}M params ({m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide), "
             f"{m.block_size} positions, vocab {m.vocab}; {p.gpus} x {p.gpu_memory:g} GiB, batch {p.batch_size} "
             f"per GPU, {p.dtype}" + (f", loss in {p.loss_chunks} chunks" if p.loss_chunks > 1 else ""))
    table = folding_table("mode", "params", "grads", "optimiser", "activations", "overhead", "total per rank",
                          "fits?", "largest batch", title=title, caption="GiB per GPU (README: Memory plan)")
    for x in p.modes:
        table.add_row(x.mode, gib(x.params), gib(x.grads), gib(x.optimiser), gib(x.activations), gib(x.overhead),
                      gib(x.total), "yes" if x.fits else "no", str(x.largest_batch))
    return table


def presets_table(plans: list[Plan]):
    """Every model's plan, compact: a row per model, per mode its total per rank at the batch, whether it fits
    and the largest batch."""
    from astropt_tok.report import folding_table

    p = plans[0]
    title = (f"{p.gpus} x {p.gpu_memory:g} GiB, batch {p.batch_size} per GPU, {p.dtype}, "
             f"{p.model.block_size} positions, vocab {p.model.vocab}")
    table = folding_table("preset", "shape", "params", *MODES, title=title,
                          caption="per GPU at the batch: total, fits or over; the largest batch that fits "
                                  "(README: Memory plan)")
    for q in plans:
        m = q.model
        cells = [f"{gib(x.total)} GiB {'fits' if x.fits else 'over'}; max {x.largest_batch}" for x in q.modes]
        table.add_row(m.name, f"{m.n_layer}/{m.n_head}/{m.n_embd}", f"{m.params / 1e6:,.1f}M", *cells)
    return table
