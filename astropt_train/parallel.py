"""Turn a GPTConfig into the model a rank trains: one process, DDP or FSDP2, with optional activation
checkpointing and torch.compile. DDP and FSDP differ here only; the trainer calls these functions.

What runs where:
- "single": the GPT is built on `device`, every parameter drawn by `GPT.init_weights(seed)` (a generator per
  (seed, parameter name), so the weights are the same on every device and world size), or `init_state` loaded.
- "ddp": the same on every rank (identical weights without a broadcast), then `torch.compile` (when asked) and
  `DistributedDataParallel`. Every rank holds the whole model, its gradients and optimiser state.
- "fsdp": the GPT is built on the meta device (shapes only, no memory), `fully_shard` is applied to each
  transformer Block (its own all-gather / reduce-scatter unit) and then to the root (embeddings, final LayerNorm,
  heads), and `to_empty` allocates only this rank's shard of each parameter (dim 0, torch.chunk-style, on
  `device`). Each parameter is then initialised one at a time: every rank draws the FULL tensor on the CPU from
  its (seed, name) generator and keeps its own shard, so no rank ever holds the whole model unsharded and the
  weights equal the single-process ones exactly. `init_state` (a full state dict, on every rank) is loaded with
  `set_model_state_dict(..., full_state_dict=True)`. Parameters are DTensors; the optimiser built from them holds
  only this rank's shard of its state. With `param_dtype` the forward/backward run on param_dtype copies gathered
  per block (MixedPrecisionPolicy), gradients reduced in `reduce_dtype`, the sharded master weights stay fp32.
  Every forward (training, evaluation, `generate`) is collective under FSDP: all ranks must call it together.
  On CUDA, `device` is this rank's GPU (torch.cuda.set_device called before: the mesh uses the current device).

The trainer's step, the same code for every mode (`built = build_model(...)`):
    optimizer = built.raw.configure_optimizers(...)            # DTensor shards under FSDP: sharded AdamW state
    for micro in range(accum):
        with grad_sync(built, sync=micro == accum - 1), autocast:
            _, loss = built.model(x, y, ...)
        (loss / accum).backward()
    norm = clip_grad_norm(built, max_norm)                     # a plain tensor, the same on every rank
    optimizer.step(); optimizer.zero_grad(set_to_none=True)
Evaluation runs `built.eval_model` (every rank when `built.forward_is_collective`); weights for a checkpoint or
export come from `full_state_dict(built)` (every rank calls it under FSDP; rank 0 gets them).

Activation checkpointing sets `Block.activation_checkpointing`: a Block's training forward keeps only its input
and is recomputed in backward (torch.utils.checkpoint, non-reentrant, inside the Block's forward, so FSDP's
hooks stay outside it and parameter names are those of upstream, without any wrapper prefix). Forwards without
grad (evaluation, `generate` with its KV cache) are untouched.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from astropt_train.model import GPT, GPTConfig

MODES = ("single", "ddp", "fsdp")


@dataclass
class BuiltModel:
    """model: what forward/backward is called on (DDP wrapper, compiled module, or the sharded GPT itself);
    raw: the GPT (parameters, optimiser groups, generate, estimate_mfu); under FSDP the two are the same module."""

    model: nn.Module
    raw: GPT
    mode: str

    @property
    def eval_model(self) -> nn.Module:
        """What evaluation forwards run on: `model` without the DDP wrapper (compiled when compiled)."""
        return self.model.module if self.mode == "ddp" else self.model

    @property
    def forward_is_collective(self) -> bool:
        """Whether every forward (evaluation, pictures, generate) must run on all ranks together (FSDP)."""
        return self.mode == "fsdp"


def build_model(gconf: GPTConfig, seed: int, device: torch.device | str, mode: str = "single",
                activation_checkpointing: bool = False, param_dtype: torch.dtype | None = None,
                reduce_dtype: torch.dtype = torch.float32, compile: bool = False,
                init_state: dict | None = None) -> BuiltModel:
    """The GPT this rank trains for `mode` ("single", "ddp" or "fsdp"; the last two need the default process
    group), initialised from `seed` (or `init_state`, a full state dict), see the module docstring."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    device = torch.device(device)
    if mode == "fsdp":
        return _build_fsdp(gconf, seed, device, activation_checkpointing, param_dtype, reduce_dtype, compile,
                           init_state)
    raw = GPT(gconf).to(device)  # the constructor's own init is overwritten below
    if init_state is not None:
        raw.load_state_dict(init_state)
    else:
        raw.init_weights(seed)
    _set_activation_checkpointing(raw, activation_checkpointing)
    model: nn.Module = torch.compile(raw) if compile else raw
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return BuiltModel(model=model, raw=raw, mode=mode)


def _set_activation_checkpointing(raw: GPT, on: bool) -> None:
    for block in raw.transformer.h:
        block.activation_checkpointing = on


def _build_fsdp(gconf, seed, device, activation_checkpointing, param_dtype, reduce_dtype, compile, init_state):
    """build_model for mode "fsdp": meta device, fully_shard per Block then the root, materialise sharded."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise RuntimeError("mode 'fsdp' needs the default process group (run under torchrun)")
    if param_dtype == torch.float16:  # GradScaler's inf check would see only this rank's gradient shards
        raise ValueError("mode 'fsdp' trains in bf16 or fp32, not fp16")
    with torch.device("meta"):
        raw = GPT(gconf)
    if any(True for _ in raw.buffers()):
        raise NotImplementedError("fsdp: the GPT has buffers, which _build_fsdp does not initialise")
    _set_activation_checkpointing(raw, activation_checkpointing)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kw = {"mesh": mesh}
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = raw.transformer.h
    for i, block in enumerate(blocks):
        if compile:
            block.compile()  # in place: the parameter names stay those of upstream (no `_orig_mod.`)
        # the last block is all-gathered again at once by the backward pass: keep it unsharded (torchtitan)
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kw)
    fully_shard(raw, **kw)  # the root: FSDP keeps its parameters unsharded after forward (backward needs them next)
    raw.to_empty(device=device)
    if init_state is not None:
        load_full_state_dict(raw, "fsdp", init_state)
    else:
        init_sharded_weights(raw, seed)
    return BuiltModel(model=raw, raw=raw, mode="fsdp")


@torch.no_grad()
def init_sharded_weights(raw: GPT, seed: int) -> None:
    """Give each sharded (DTensor) parameter this rank's shard of `raw.initial_value(name, seed)`, one parameter
    at a time (the full tensor of one parameter on the CPU at most)."""
    from torch.distributed.tensor import distribute_tensor

    for name, p in raw.named_parameters():
        full = raw.initial_value(name, seed).to(p.dtype)  # every rank draws the same full tensor
        # src_data_rank=None: each rank cuts its own shard locally (no scatter), as fully_shard does (Shard(0))
        shard = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
        p.to_local().copy_(shard)


def load_full_state_dict(model: nn.Module, mode: str, state: dict) -> None:
    """Load a full (unsharded) state dict with upstream key names into `model` (the raw GPT, or the sharded one
    under FSDP, where every rank passes the full state and keeps its shards)."""
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))
    else:
        model.load_state_dict(state)


def full_state_dict(built: BuiltModel) -> dict:
    """The full state dict (upstream key names) on rank 0, as CPU tensors under FSDP. Under FSDP this is a
    collective (every rank calls it) and ranks other than 0 get {}; otherwise the raw GPT's state dict."""
    if built.mode != "fsdp":
        return built.raw.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(built.raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def grad_sync(built: BuiltModel, sync: bool):
    """The context for one micro-batch's forward under gradient accumulation: `sync` False on all but the last
    micro-batch skips the gradient all-reduce (DDP) or reduce-scatter (FSDP). The backward may run after the
    context exits (DDP decides in forward; FSDP's flag is set here and holds until the next call)."""
    if built.mode == "fsdp":
        built.model.set_requires_gradient_sync(sync)
        return nullcontext()
    if built.mode == "ddp" and not sync:
        return built.model.no_sync()
    return nullcontext()


def clip_grad_norm(built: BuiltModel, max_norm: float) -> torch.Tensor:
    """Clip the gradients' global norm to max_norm (math.inf: measure only); returns the norm before clipping
    as a plain tensor (under FSDP the norm over all ranks' shards, the same on every rank)."""
    norm = torch.nn.utils.clip_grad_norm_(built.model.parameters(), max_norm)
    if built.mode == "fsdp":
        from torch.distributed.tensor import DTensor

        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
    return norm
