"""AstroPT's GPT for one discrete modality, `images_aion`, in one readable file.

A galaxy is a sequence of `block_size` (576) AION image tokens. The model embeds each token id
(`encoders.images_aion.wpe`, a [vocab, n_embd] table) and each position 0..575
(`embedders.images_aion.wpe`, [block_size, n_embd]), runs pre-LayerNorm transformer blocks with causal
`scaled_dot_product_attention` and a GELU MLP, a final LayerNorm, and a head to vocab logits: "affine", one
linear layer (`decoders.images_aion.c_fc`, [vocab, n_embd]), or "aim", upstream's default two-layer head
(`decoders.images_aion.c_fc` [4 n_embd, n_embd], GELU, `decoders.images_aion.c_proj` [vocab, 4 n_embd]).
Parameter names and shapes are those of upstream AstroPT's `GPT` built with one modality `images_aion`
(vocab_size > 0, embed_pos=True) and the same `tokeniser`, so a state dict saved here loads into upstream's
model for its downstream tools, and upstream's AION checkpoints load here. (Upstream's tokeniser choice
changes only the decoder for a token modality: its encoder is a lookup table either way.)

Several modalities (`GPTConfig.modalities`, e.g. the Legacy Survey and HSC images of each galaxy): a galaxy is
one sequence of their token blocks, `block_size` = modalities x 576, each modality with its own token table,
position table and head under its own name (`encoders.hsc_image.wpe`, ...), as upstream builds them from one
`ModalityConfig` each (upstream's position tables have `block_size` rows; positions count within a modality,
0..575, as upstream's `<name>_positions`). A token is embedded by its own modality's tables, and the logit at
position p comes from the head of the modality of token p+1 (the last token of one modality predicts the first
of the next, as upstream). The blocks come in `modalities` order, or per sample in the order `order` gives.

Modalities of their own vocabulary and length (a store's image, scalar and spectrum columns: `modality_vocab`,
`modality_tokens`): `block_size` is the sum of the blocks' lengths, each modality's token table and head have its
own vocabulary (upstream's `ModalityConfig.vocab_size` per modality), and a position's modality and its place in
its block come from the blocks' boundaries (`place`). Logits of different widths never share one tensor inside
the loss; where logits are returned they are padded with -inf to the widest vocabulary. `loss_weights` weigh each
modality's targets (upstream's `ModalityConfig.loss_weight`): one Z token beside 576 image tokens otherwise counts
for next to nothing. `next_token_logits` gives the distribution of a modality's first token from the blocks before.

Written after reading nanoGPT and AstroPT; the code is our own.
"""

from __future__ import annotations

import inspect
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

MODALITY = "images_aion"  # the one modality; part of every embedding/head parameter name

# Dense bf16 peak FLOP/s by GPU name fragment, for MFU. Unknown GPUs fall back to the A100 figure.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "V100": 125e12}


@dataclass
class GPTConfig:
    """Model shape. `block_size` is the number of positions (tokens per image, 576 for AION)."""

    vocab_size: int = 4375
    block_size: int = 576
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False  # bias in Linears and LayerNorms; False like upstream's default
    head: str = "affine"  # "affine" (one Linear) or "aim" (Linear to 4n, GELU, Linear): upstream's `tokeniser`
    modalities: list[str] | None = None  # several modalities, their blocks in this order; None: one, images_aion
    # modalities of their own vocabulary and length (a store's image, scalar and spectrum columns), one entry per
    # name of `modalities`, in its order; None: every modality has `vocab_size` and block_size / modalities tokens
    # (every config written before there were such modalities)
    modality_vocab: list[int] | None = None
    modality_tokens: list[int] | None = None
    modality_kinds: list[str] | None = None  # "image", "scalar" or "spectrum"; None: images
    loss_weights: list[float] | None = None  # each modality's weight in the loss (see GPT.forward); None: 1 each

    def vocab_sizes(self) -> list[int]:
        """Each modality's vocabulary, in `modalities` order (one entry for the one modality images_aion)."""
        return list(self.modality_vocab or [self.vocab_size] * len(self.modalities or [MODALITY]))

    def token_counts(self) -> list[int]:
        """Each modality's tokens per object, in `modalities` order; they sum to block_size."""
        names = self.modalities or [MODALITY]
        return list(self.modality_tokens or [self.block_size // len(names)] * len(names))

    def kinds(self) -> list[str]:
        """Each modality's kind ("image", "scalar", "spectrum"), in `modalities` order."""
        return list(self.modality_kinds or ["image"] * len(self.modalities or [MODALITY]))


HEADS = ("affine", "aim")


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (weight only when bias=False), as upstream."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension."""
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class KVCache:
    """Per-layer key/value buffers for incremental decoding; `length` is how many positions are filled.
    `present` (B, block_size) bool, once a partial row was fed: which cached positions hold real tokens."""

    def __init__(self, n_layer: int):
        self.k: list[torch.Tensor | None] = [None] * n_layer  # each (B, nh, block_size, hs) once allocated
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.length = 0
        self.present: torch.Tensor | None = None


def attention_mask(present_keys: torch.Tensor, num_queries: int) -> torch.Tensor:
    """The boolean attention mask (B, 1, T, Tk) for the last T = num_queries of Tk positions whose keys are real
    tokens where present_keys (B, Tk) is True: causal, no key of a missing token, and always the query's own
    position (so no row is fully masked: a missing position attends to itself and the real tokens before it)."""
    B, Tk = present_keys.shape
    offset = Tk - num_queries  # query i sits at key position offset + i
    ones = torch.ones(num_queries, Tk, dtype=torch.bool, device=present_keys.device)
    causal, own = ones.tril(offset), ones.tril(offset) & ~ones.tril(offset - 1)  # (T, Tk) each
    return ((causal & present_keys[:, None, :]) | own)[:, None]  # (B, 1, T, Tk)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through `scaled_dot_product_attention`, with an optional KV cache."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.block_size, self.layer = config.block_size, layer

    def forward(self, x: torch.Tensor, pos_offset: int = 0, kv_cache: KVCache | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) at positions pos_offset..pos_offset+T-1 -> (B, T, C). `mask` (B, 1, T, keys) from
        `attention_mask` replaces the causal rule when rows lack a modality (None: plain causal, flash on GPU)."""
        B, T, C = x.size()
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        attn_mask, is_causal = None, True
        if kv_cache is not None:
            if kv_cache.k[self.layer] is None:  # allocate this layer's buffers once, full length
                shape = (B, self.n_head, self.block_size, hs)
                kv_cache.k[self.layer] = torch.empty(shape, dtype=k.dtype, device=k.device)
                kv_cache.v[self.layer] = torch.empty(shape, dtype=v.dtype, device=v.device)
            kbuf, vbuf = kv_cache.k[self.layer], kv_cache.v[self.layer]
            kbuf[:, :, pos_offset : pos_offset + T] = k
            vbuf[:, :, pos_offset : pos_offset + T] = v
            k = kbuf[:, :, : pos_offset + T]  # (B, nh, pos_offset+T, hs)
            v = vbuf[:, :, : pos_offset + T]
            if pos_offset > 0:
                is_causal = False
                if T > 1:  # query i (at pos_offset+i) sees keys 0..pos_offset+i
                    attn_mask = torch.ones(T, pos_offset + T, dtype=torch.bool, device=x.device).tril(pos_offset)
        if mask is not None:
            attn_mask, is_causal = mask, False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Two linear layers with a tanh-approximated GELU (the same function as upstream's new_gelu)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # (B, T, 4C) inside


def _summed_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                          weight: torch.Tensor | None) -> torch.Tensor:
    """sum of weight x cross-entropy(head(hidden), targets): hidden (n, C), targets (n,), weight (n,) or None (1)."""
    if weight is None:
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    return (F.cross_entropy(head(hidden).float(), targets, reduction="none") * weight).sum()


def chunked_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunks: int,
                          weight: torch.Tensor | None = None) -> torch.Tensor:
    """The summed cross-entropy of head(hidden) against targets (each position times its `weight`, when given),
    computed `chunks` pieces of positions at a time.

    hidden (..., C), targets (...), weight (...) float. Each piece's logits (rows, vocab) live only inside a
    checkpointed function: the backward pass recomputes them instead of keeping all (B, T, vocab) of them (and
    their fp32 copy) from the forward pass. Costs one more head matmul; saves B * T * vocab * 6 bytes of activations.
    """
    from torch.utils.checkpoint import checkpoint

    hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)  # (N, C), (N,)
    weights = weight.reshape(-1).chunk(chunks) if weight is not None else [None] * chunks
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t, w in zip(hidden.chunk(chunks), targets.chunk(chunks), weights):
        total = total + checkpoint(_summed_cross_entropy, head, h, t, w, use_reentrant=False)
    return total


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.activation_checkpointing = False  # set by parallel.build_model: recompute this block in backward

    def forward(self, x: torch.Tensor, pos_offset: int = 0, kv_cache: KVCache | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C). With activation checkpointing, a training forward (grad enabled, no KV cache)
        keeps only x and recomputes the block in backward; the module and its parameter names are unchanged."""
        if self.activation_checkpointing and torch.is_grad_enabled() and kv_cache is None:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._forward, x, pos_offset, None, mask, use_reentrant=False)
        return self._forward(x, pos_offset, kv_cache, mask)

    def _forward(self, x: torch.Tensor, pos_offset: int, kv_cache: KVCache | None,
                 mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), pos_offset=pos_offset, kv_cache=kv_cache, mask=mask)
        return x + self.mlp(self.ln_2(x))


class TokenEmbedding(nn.Module):
    """A lookup table held as `.wpe`, the attribute name upstream uses for both token and position tables."""

    def __init__(self, num: int, n_embd: int):
        super().__init__()
        self.wpe = nn.Embedding(num, n_embd)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(...,) int64 -> (..., n_embd)."""
        return self.wpe(idx)


class Head(nn.Module):
    """The head to vocab logits, upstream's decoder: affine `.c_fc`, or aim `.c_fc` to 4C, GELU, `.c_proj`."""

    def __init__(self, config: GPTConfig, vocab_size: int | None = None):
        super().__init__()
        if config.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {config.head!r}")
        self.kind = config.head
        vocab = config.vocab_size if vocab_size is None else vocab_size  # its modality's vocabulary
        if self.kind == "affine":
            self.c_fc = nn.Linear(config.n_embd, vocab, bias=config.bias)
        else:
            self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
            self.c_proj = nn.Linear(4 * config.n_embd, vocab, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, vocab)."""
        if self.kind == "affine":
            return self.c_fc(x)
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # (B, T, 4C) inside


def block_layout(lengths: list[int], pos: torch.Tensor, order: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(modality, within) of sequence positions pos (L,) in a sequence of blocks of `lengths` (one per modality, in
    modality order): the index of the modality holding each position and its place in that block. `order` (B, M):
    each sample's block order (block k holds modality order[:, k]); then both are (B, L), else (L,). Positions past
    the end count in the last block."""
    lengths_t = torch.tensor(lengths, device=pos.device)  # (M,)
    if order is None:
        ends = lengths_t.cumsum(0)  # (M,)
        slot = torch.searchsorted(ends, pos, right=True).clamp(max=len(lengths) - 1)  # (L,)
        return slot, pos - (ends - lengths_t)[slot]
    order = order.to(pos.device)
    sizes = lengths_t[order]  # (B, M): the length of each sample's block k
    ends = sizes.cumsum(1)  # (B, M)
    slot = torch.searchsorted(ends, pos.expand(order.size(0), -1).contiguous(), right=True).clamp(max=len(lengths) - 1)
    return order.gather(1, slot), pos - (ends - sizes).gather(1, slot)


class GPT(nn.Module):
    """Decoder-only transformer over AION image tokens, state-dict compatible with upstream AstroPT."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.vocab_size > 0 and config.block_size > 0
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.names = list(config.modalities or [MODALITY])  # modality names, in their default sequence order
        self.vocabs = config.vocab_sizes()  # [M]: each modality's vocabulary (its token table and head width)
        self.lengths = config.token_counts()  # [M]: each modality's tokens per object (its block's length)
        self.kinds = config.kinds()
        self.loss_weights = [float(w) for w in (config.loss_weights or [1.0] * len(self.names))]
        M = len(self.names)
        if not (len(self.vocabs) == len(self.lengths) == len(self.kinds) == len(self.loss_weights) == M):
            raise ValueError(f"modality_vocab, modality_tokens, modality_kinds and loss_weights need one entry per "
                             f"modality ({M})")
        if sum(self.lengths) != config.block_size or min(self.lengths) < 1 or min(self.vocabs) < 1:
            raise ValueError(f"block_size {config.block_size} must be the sum of the modalities' tokens "
                             f"{self.lengths} (each >= 1, vocabularies >= 1)")
        if min(self.loss_weights) < 0 or not all(math.isfinite(w) for w in self.loss_weights):
            raise ValueError(f"loss weights must be finite and >= 0, got {self.loss_weights}")
        # equal blocks (one modality, or several image columns of one codec): positions by integer division, as
        # before there were modalities of their own length; otherwise by the blocks' boundaries
        self.uniform = len(set(self.lengths)) == 1
        self.tokens_per_modality = self.lengths[0] if self.uniform else None
        self.block_ends = [sum(self.lengths[: k + 1]) for k in range(M)]  # default order: block k ends here
        self.max_vocab = max(self.vocabs)
        self.several_vocabs = len(set(self.vocabs)) > 1  # heads of different widths: logits padded, loss per head
        self.weighted = any(w != 1.0 for w in self.loss_weights)
        self.encoders = nn.ModuleDict({n: TokenEmbedding(v, config.n_embd) for n, v in zip(self.names, self.vocabs)})
        self.embedders = nn.ModuleDict({n: TokenEmbedding(config.block_size, config.n_embd) for n in self.names})
        self.decoders = nn.ModuleDict({n: Head(config, v) for n, v in zip(self.names, self.vocabs)})
        # GPT-2 init: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * n_layer)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)

    def initial_value(self, name: str, seed: int) -> torch.Tensor:
        """The initial full value (CPU, fp32) of parameter `name` for `seed`, drawn from a generator seeded by
        (seed, name) alone: the same tensor whatever the device, world size or sharding. The constructor's
        distributions: LayerNorm weight 1, biases 0, other weights N(0, 0.02), c_proj weights
        N(0, 0.02 / sqrt(2 n_layer))."""
        owner_name, _, leaf = name.rpartition(".")
        owner = self.get_submodule(owner_name)
        shape = getattr(owner, leaf).shape  # the global shape, also for a sharded (DTensor) or meta parameter
        if leaf == "bias":
            return torch.zeros(shape)
        if isinstance(owner, LayerNorm):
            return torch.ones(shape)
        std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj.weight") else 0.02
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        return torch.empty(shape).normal_(0.0, std, generator=generator)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """(Re)initialise every parameter of an unsharded model from `initial_value` (one parameter at a time)."""
        for name, p in self.named_parameters():
            p.copy_(self.initial_value(name, seed))

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; non_embedding drops the token and position lookup tables (not matmuls)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(self.encoders[m].wpe.weight.numel() + self.embedders[m].wpe.weight.numel() for m in self.names)
        return n

    def place(self, start: int, length: int, order: torch.Tensor | None, batch: int, device
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(modality (B, length), within) of positions start..start+length-1 (clamped to the sequence): the index
        into `names` of the modality each position holds and the position's place in its own block (0..tokens-1),
        (length,) when it is the same in every sample (equal blocks, or the default order), else (B, length).
        `order` (B, M) gives each sample's block order (block k holds modality order[:, k]), None the default one."""
        pos = torch.arange(start, start + length, device=device).clamp(max=self.config.block_size - 1)  # (L,)
        if self.uniform:
            slot = pos // self.tokens_per_modality  # (L,)
            within = pos % self.tokens_per_modality
            return (slot.expand(batch, length) if order is None else order.to(device)[:, slot]), within
        modality, within = block_layout(self.lengths, pos, order)
        return (modality.expand(batch, length) if order is None else modality), within

    def modality_at(self, start: int, length: int, order: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """(B, length) index into `names` of the modality at positions start..start+length-1 (clamped to the
        sequence); `order` (B, M) gives each sample's block order, None the default one."""
        return self.place(start, length, order, batch, device)[0]

    def block_start(self, name: str, order: torch.Tensor | None = None) -> torch.Tensor | int:
        """The sequence position of the first token of modality `name`: an int in the default order, (B,) for each
        sample's block `order` (B, M)."""
        m = self.names.index(name)
        if order is None:
            return self.block_ends[m] - self.lengths[m]
        sizes = torch.tensor(self.lengths, device=order.device)[order]  # (B, M)
        slot = torch.argsort(order, dim=1)[:, m]  # (B,): the block that holds modality m
        return (sizes.cumsum(1) - sizes).gather(1, slot[:, None])[:, 0]

    def _embed(self, tokens: torch.Tensor, pos_offset: int, order: torch.Tensor | None,
               present: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) at positions pos_offset.. -> token + position embeddings (B, T, C), each token by the
        tables of its own modality. Where `present` (B, T) is False (a modality the row lacks) the position
        embedding stands alone: the placeholder token's id never enters the model."""
        B, T = tokens.size()
        modality, within = self.place(pos_offset, T, order, B, tokens.device)  # (B, T), (T,) or (B, T)
        x = None
        for m, name in enumerate(self.names):
            here = modality == m  # (B, T)
            # another modality's id may lie outside this table: only this modality's ids are looked up in it
            ids = torch.where(here, tokens, 0) if self.several_vocabs else tokens
            tok = self.encoders[name](ids)  # (B, T, C)
            if present is not None:
                tok = torch.where(present[..., None], tok, 0.0)
            emb = tok + self.embedders[name](within)  # (B, T, C)
            x = emb if x is None else torch.where(here[..., None], emb, x)
        return x

    def _mask(self, present: torch.Tensor | None, T: int, pos_offset: int, kv_cache: KVCache | None):
        """The attention mask for T new positions from pos_offset given `present` (B, T) (None: all real), or
        None when every key is a real token (then attention is plain causal: the fast path)."""
        if present is not None and bool(present.all()):
            present = None
        if kv_cache is not None:
            if present is not None and kv_cache.present is None:
                kv_cache.present = torch.ones(present.size(0), self.config.block_size, dtype=torch.bool,
                                              device=present.device)
            if kv_cache.present is None:
                return None
            kv_cache.present[:, pos_offset : pos_offset + T] = True if present is None else present
            return attention_mask(kv_cache.present[:, : pos_offset + T], T)
        return None if present is None else attention_mask(present, T)

    def _target_runs(self, pos_offset: int, T: int) -> list[tuple[int, int, int]]:
        """(block, start, end) for each run of positions start..end-1 (of T from pos_offset) whose next tokens lie
        in one block of the sequence: block k holds modality k, or order[:, k] for a shuffled sample."""
        import bisect

        last = len(self.names) - 1
        runs, start = [], 0
        while start < T:
            k = min(bisect.bisect_right(self.block_ends, pos_offset + start + 1), last)  # the block start predicts in
            end = T if k == last else min(T, self.block_ends[k] - 1 - pos_offset)
            runs.append((k, start, end))
            start = end
        return runs

    def _padded(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V_m) logits of one head -> (..., max_vocab): ids past its vocabulary get -inf (probability 0), so
        the logits of modalities with different vocabularies stack; a no-op when they share one."""
        short = self.max_vocab - logits.size(-1)
        return logits if short == 0 else F.pad(logits, (0, short), value=-math.inf)

    def _logits(self, x: torch.Tensor, pos_offset: int, order: torch.Tensor | None) -> torch.Tensor:
        """Final hidden states (B, T, C) at positions pos_offset.. -> (B, T, vocab): each position through the
        head of the modality of the token it predicts (the next one). Modalities of different vocabularies:
        vocab is the largest, and a position's logits past its own head's width are -inf."""
        if len(self.names) == 1:
            return self.decoders[self.names[0]](x)
        B, T, _ = x.size()
        if order is None:  # contiguous runs of one modality: each head only on its own positions
            runs = self._target_runs(pos_offset, T)
            return torch.cat([self._padded(self.decoders[self.names[k]](x[:, start:end])) for k, start, end in runs],
                             dim=1)
        target = self.modality_at(pos_offset + 1, T, order, B, x.device)  # (B, T)
        logits = None
        for m, name in enumerate(self.names):
            out = self._padded(self.decoders[name](x))
            logits = out if logits is None else torch.where((target == m)[..., None], out, logits)
        return logits

    def next_token_logits(self, prefix: torch.Tensor, modality: str, order: torch.Tensor | None = None,
                          present: torch.Tensor | None = None) -> torch.Tensor:
        """The logits (B, V) of the FIRST token of modality `modality` (V its vocabulary) given the blocks before
        it: prefix (B, K) int64 holds exactly those blocks, K = `block_start(modality)` (in each sample's `order`
        (B, M) when given, which must put that block at the same K in every sample). E.g. an image-then-Z model:
        the image's tokens in, the distribution of Z's token out (softmax of the result). `present` (B, K) as in
        `forward`. A modality that begins the sequence has no predictor: ValueError."""
        B, K = prefix.shape
        start = self.block_start(modality, order)
        starts = {int(start)} if order is None else set(start.tolist())
        if starts != {K}:
            where = ", ".join(str(s) for s in sorted(starts))
            raise ValueError(f"modality {modality} begins at position {where}: the prefix must hold exactly the "
                             f"blocks before it ({K} tokens given)")
        if K == 0:
            raise ValueError(f"modality {modality} begins the sequence: no token precedes its first one")
        logits, _ = self(prefix, order=order, present=present)  # (B, 1, max_vocab)
        return logits[:, 0, : self.vocabs[self.names.index(modality)]]

    def _modality_means(self, ce_sums: list[torch.Tensor], counts: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """{modality: its summed cross-entropy / its number of (kept) targets}."""
        return {name: total / count.clamp(min=1) for name, total, count in zip(self.names, ce_sums, counts)}

    def _ce_by_modality(self, ce: torch.Tensor, keep: torch.Tensor, order: torch.Tensor | None, pos_offset: int):
        """ce, keep (B, T) float -> ([summed kept cross-entropy], [kept targets]), one entry per modality."""
        B, T = ce.size()
        target = self.modality_at(pos_offset + 1, T, order, B, ce.device)  # (B, T)
        weights = [keep * (target == m) for m in range(len(self.names))]
        return [(ce * w).sum() for w in weights], [w.sum() for w in weights]

    def loss_by_modality(self, logits: torch.Tensor, targets: torch.Tensor, order: torch.Tensor | None = None,
                         loss_mask: torch.Tensor | None = None, pos_offset: int = 0) -> dict[str, torch.Tensor]:
        """{modality: mean cross-entropy over the targets that belong to it} (targets at positions pos_offset+1..)."""
        B, T = targets.size()
        ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view(B, T)
        keep = torch.ones_like(ce) if loss_mask is None else loss_mask.float()
        return self._modality_means(*self._ce_by_modality(ce, keep, order, pos_offset))

    def _weighted_mean(self, sums: list[torch.Tensor], counts: list[torch.Tensor]) -> torch.Tensor:
        """The loss with per-modality `loss_weights` w: sum_m w_m * (summed cross-entropy of m) / sum_m w_m * (its
        kept targets), the mean over targets with each target of modality m counted w_m times."""
        w = torch.tensor(self.loss_weights, device=sums[0].device)
        total = (w * torch.stack(sums)).sum()
        norm = (w * torch.stack([torch.as_tensor(c, dtype=torch.float32, device=w.device) for c in counts])).sum()
        return total / norm.clamp(min=torch.finfo(torch.float32).tiny)

    def _chunked_loss(self, x: torch.Tensor, targets: torch.Tensor, chunks: int, pos_offset: int,
                      order: torch.Tensor | None, loss_mask: torch.Tensor | None, modality_losses: dict | None):
        """The loss of `forward` from final hidden states x (B, T, C), `chunks` pieces of positions at a time
        through `chunked_cross_entropy`, each head only on the positions that predict its modality's tokens; the
        (B, T, vocab) logits never exist. Default order: a contiguous slice per modality. Shuffled `order`: each
        modality's positions gathered per sample into (B, its tokens), static shapes, no host sync."""
        B, T = targets.size()
        keep = None if loss_mask is None else loss_mask.float()  # (B, T)
        sums = [x.new_zeros((), dtype=torch.float32) for _ in self.names]
        counts = [x.new_zeros((), dtype=torch.float32) for _ in self.names]
        if order is None or len(self.names) == 1:
            for k, start, end in self._target_runs(pos_offset, T):
                w = None if keep is None else keep[:, start:end]  # (B, run)
                sums[k] = sums[k] + chunked_cross_entropy(self.decoders[self.names[k]], x[:, start:end],
                                                          targets[:, start:end], chunks, w)
                counts[k] = counts[k] + (w.sum() if w is not None else B * (end - start))
        else:
            order = order.to(x.device)
            sizes = torch.tensor(self.lengths, device=x.device)[order]  # (B, M): the length of block k
            begins = sizes.cumsum(1) - sizes  # (B, M): where block k begins
            block_of = torch.argsort(order, dim=1)  # (B, M): the block that holds modality m
            for m, name in enumerate(self.names):
                within = torch.arange(self.lengths[m], device=x.device)  # (L_m,)
                begin = begins.gather(1, block_of[:, m : m + 1])  # (B, 1)
                at = begin + within - 1 - pos_offset  # (B, L_m): the position predicting each token
                real = (at >= 0) & (at < T)  # the first token of the first block has no predictor
                at = at.clamp(0, T - 1)
                w = real.float() if keep is None else keep.gather(1, at) * real  # (B, L_m)
                hidden = x.gather(1, at[..., None].expand(-1, -1, x.size(-1)))  # (B, L_m, C)
                # a position with no predictor reads another modality's token: id 0 there, weighted 0
                wanted = torch.where(real, targets.gather(1, at), 0)  # (B, L_m)
                sums[m] = chunked_cross_entropy(self.decoders[name], hidden, wanted, chunks, w)
                counts[m] = w.sum()
        if modality_losses is not None:
            modality_losses.update({m: v.detach() for m, v in self._modality_means(sums, counts).items()})
        if self.weighted:
            return self._weighted_mean(sums, counts)
        kept = keep.sum().clamp(min=1) if keep is not None else B * T
        return torch.stack(sums).sum() / kept

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        pos_offset: int = 0,
        kv_cache: KVCache | None = None,
        loss_chunks: int = 1,
        order: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        present: torch.Tensor | None = None,
        modality_losses: dict | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """tokens (B, T) int64 at positions pos_offset.. -> (logits, loss).

        With targets (B, T): logits (B, T, vocab) for every position and the mean cross-entropy (over the
        positions `loss_mask` (B, T) keeps, when given: a row's missing modality is left out).
        Without: logits (B, 1, vocab) for the last position only (what sampling needs), loss None.
        With targets and loss_chunks > 1 (training): logits None and the same loss from `chunked_cross_entropy`,
        which never holds the (B, T, vocab) logits (several modalities, shuffled `order` and `loss_mask` too).
        With targets, a dict as `modality_losses` gets {modality: mean cross-entropy over its targets} (detached),
        on both paths.
        Several modalities: `order` (B, M) is each sample's block order (None: `modalities` order). `present`
        (B, T) bool marks real tokens; False: a modality the row lacks (--keep-partial stores), whose positions
        no position attends to and whose token ids are ignored, so every output at a real position is
        independent of them. None (or all True) is plain causal attention.
        Modalities of different vocabularies (`modality_vocab`): vocab is the largest and each position's logits
        past its own head's width are -inf (probability 0); with targets the loss is computed head by head on each
        modality's own target positions (the chunked path, any loss_chunks), and the logits are returned only
        when gradients are off (evaluation, prediction: what reads them), else None.
        `loss_weights` (config): the loss counts each target of modality m w_m times (a weighted mean); the
        per-modality losses stay unweighted means.
        """
        B, T = tokens.size()
        if pos_offset + T > self.config.block_size:
            raise ValueError(f"positions {pos_offset}..{pos_offset + T - 1} exceed block_size {self.config.block_size}")
        mask = self._mask(present, T, pos_offset, kv_cache)  # (B, 1, T, keys) or None
        x = self.transformer.drop(self._embed(tokens, pos_offset, order, present if mask is not None else None))
        for block in self.transformer.h:
            x = block(x, pos_offset=pos_offset, kv_cache=kv_cache, mask=mask)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self._logits(x[:, [-1], :], pos_offset + T - 1, order), None  # (B, 1, vocab)
        if loss_chunks > 1 or self.several_vocabs:  # each head on its own target positions: widths never stack
            loss = self._chunked_loss(x, targets, loss_chunks, pos_offset, order, loss_mask, modality_losses)
            wanted = self.several_vocabs and loss_chunks == 1 and not torch.is_grad_enabled()
            return (self._logits(x, pos_offset, order) if wanted else None), loss
        logits = self._logits(x, pos_offset, order)  # (B, T, vocab)
        if loss_mask is None and modality_losses is None and not self.weighted:
            return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view(B, T)
        keep = torch.ones_like(ce) if loss_mask is None else loss_mask.float()
        if self.weighted:
            loss = self._weighted_mean(*self._ce_by_modality(ce, keep, order, pos_offset))
        elif loss_mask is None:
            loss = ce.mean()
        else:
            loss = (ce * keep).sum() / keep.sum().clamp(min=1)
        if modality_losses is not None:
            parts = self._modality_means(*self._ce_by_modality(ce.detach(), keep, order, pos_offset))
            modality_losses.update(parts)
        return logits, loss

    def hidden_states(self, tokens: torch.Tensor, layers: list[int], order: torch.Tensor | None = None,
                      present: torch.Tensor | None = None) -> list[torch.Tensor]:
        """tokens (B, T) int64 -> one (B, T, C) per entry of `layers`: i < n_layer is block i's output (no final
        LayerNorm), n_layer is the final output after `ln_f` (what the head sees). Runs only the blocks needed.
        `present` (B, T) as in `forward`: states at real positions ignore the missing ones."""
        B, T = tokens.size()
        if T > self.config.block_size:
            raise ValueError(f"{T} positions exceed block_size {self.config.block_size}")
        mask = self._mask(present, T, 0, None)
        x = self.transformer.drop(self._embed(tokens, 0, order, present if mask is not None else None))  # (B, T, C)
        wanted, out = set(layers), {}
        last = min(max(layers), self.config.n_layer - 1)
        for i, block in enumerate(self.transformer.h[: last + 1]):
            x = block(x, mask=mask)
            if i in wanted:
                out[i] = x
        if self.config.n_layer in wanted:
            out[self.config.n_layer] = self.transformer.ln_f(x)
        return [out[i] for i in layers]

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on matrices and embeddings (dim >= 2) only; fused on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12 L H Q T, as in the PaLM appendix."""
        cfg = self.config
        T = seq_len if seq_len is not None else cfg.block_size - 1
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T

    def estimate_mfu(self, tokens_per_s: float, peak_flops: float | None = None, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the GPU's dense bf16 peak."""
        if peak_flops is None:
            peak_flops = peak_flops_for_device()
        return self.flops_per_token(seq_len) * tokens_per_s / peak_flops

    @torch.no_grad()
    def generate(
        self,
        prefix_tokens: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_kv_cache: bool = True,
        order: torch.Tensor | None = None,
        vocab_limit: int | None = None,
        on_token=None,
        present: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Continue prefix_tokens (B, K) int64, K >= 1, by max_new_tokens sampled tokens -> (B, K + max_new_tokens).

        temperature 0 means greedy (argmax). With use_kv_cache each step feeds only the newest token through
        per-layer key/value buffers; without it the whole sequence is re-run each step. Both give the same
        tokens for the same generator seed. To generate a galaxy from nothing, pass a first token yourself
        (e.g. sampled from the first tokens of training images in the store) as a (B, 1) prefix. `vocab_limit`
        samples only ids below it (a model whose vocabulary is larger than the codec's, e.g. upstream's 10,000).
        `on_token()`, when given, is called after each new token (a progress bar's hook). `present` (B, K) marks
        the prefix's real tokens, as in `forward` (the sampled tokens are all real). Modalities of different
        vocabularies: each token is drawn from the head of the modality at its position, among its own ids only.
        """
        B, K = prefix_tokens.shape
        if K < 1:
            raise ValueError("generate needs a prefix of at least one token (see the docstring)")
        if K + max_new_tokens > self.config.block_size:
            raise ValueError(f"{K} + {max_new_tokens} tokens exceed block_size {self.config.block_size}")
        seq = prefix_tokens
        cache = KVCache(self.config.n_layer) if use_kv_cache else None
        step_in, offset, step_present = seq, 0, present
        # rows whose logits (raw, or after the temperature) were not finite at some step: flagged on the device,
        # read once at the end (no sync per token), and refused there rather than returned as samples
        bad_logits = torch.zeros(B, dtype=torch.bool, device=prefix_tokens.device)
        vocabs = torch.tensor(self.vocabs, device=prefix_tokens.device)  # each step's ids past its modality's are -inf
        bad_probs = torch.zeros(B, dtype=torch.bool, device=prefix_tokens.device)
        for _ in range(max_new_tokens):
            if cache is not None:
                logits, _ = self(step_in, pos_offset=offset, kv_cache=cache, order=order, present=step_present)
                offset, step_present = offset + step_in.size(1), None
            else:
                whole = None if present is None else torch.cat([present, present.new_ones(B, seq.size(1) - K)], 1)
                logits, _ = self(seq, order=order, present=whole)
            logits = logits[:, -1, :vocab_limit].float()  # (B, vocab) or (B, vocab_limit)
            finite = torch.isfinite(logits)  # (B, vocab)
            if self.several_vocabs:  # ids past the next modality's vocabulary are -inf by design: not a fault
                nxt_modality = self.modality_at(seq.size(1), 1, order, B, logits.device)[:, 0]  # (B,)
                finite |= torch.arange(logits.size(-1), device=logits.device) >= vocabs[nxt_modality][:, None]
            bad_logits |= ~finite.all(dim=-1)  # (B,)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)  # (B, vocab)
                ok = torch.isfinite(probs).all(dim=-1)  # (B,): NaN when a logit (or logit / T) is not finite
                bad_probs |= ~ok
                # multinomial raises on NaN (and misbehaves on a GPU): such a row draws uniformly until the end,
                # where it is refused
                probs = torch.where(ok[:, None], probs, torch.ones_like(probs))
                nxt = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            seq = torch.cat((seq, nxt), dim=1)
            step_in = nxt
            if on_token is not None:
                on_token()
        if bool((bad_logits | bad_probs).any()):
            from astropt_tok.errors import AstroptError  # the one-line error of the `astropt` commands

            rows = int((bad_logits | bad_probs).sum())
            if bool(bad_logits.any()):
                raise AstroptError(f"the model's logits are not finite (NaN or infinite) for {rows} of {B} sequences: "
                                   "its activations overflowed or its weights are damaged; nothing was drawn from "
                                   "them (try another checkpoint, or fp32)")
            raise AstroptError(f"--temperature {temperature} is too small: logits / temperature overflow for {rows} of "
                               f"{B} sequences; use a larger temperature, or 0 for greedy sampling")
        return seq


def peak_flops_for_device(device: torch.device | str | None = None) -> float:
    """Dense bf16 peak FLOP/s of the current CUDA GPU (A100 figure when unknown or on CPU)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_BF16_FLOPS.items():
            if key in name:
                return flops
    return PEAK_BF16_FLOPS["A100"]
