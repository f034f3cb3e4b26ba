"""The encoders: each AION codec (images, catalogue scalars, spectra) on its device, at the precision the
manifest records, and the checks on what it returns, one shard at a time (`encode_shard`)."""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from astropt_tok.errors import AstroptError
from astropt_tok.executor import tf32_allowed
from astropt_tok.stages import PreparedBatch, reject_record
from astropt_tok.store.format import token_dtype

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
# the reasons rejects.jsonl gives for a row the codec failed on
NONFINITE_LATENTS = "codec latents not finite (NaN or inf before quantisation: overflow or a non-finite weight)"
OUT_OF_VOCABULARY = "codec produced tokens outside the vocabulary"


class Encoder:
    """The codec on its device, with the precision the manifest records; `encode` returns checked tokens."""

    def __init__(self, loaded, device: str, precision: str, bands: list[str]):
        import torch

        if precision not in PRECISIONS:
            raise AstroptError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.loaded = loaded
        self.codec = loaded.codec
        self.device = torch.device(device)
        self.precision = precision
        self.bands = bands
        self.vocab = loaded.vocab_size
        from aion.modalities import HSCImage, LegacySurveyImage

        self.image_type = HSCImage if bands[0].startswith("HSC") else LegacySurveyImage
        self.tokens = loaded.tokens_per_image
        self.dtype = token_dtype(self.vocab)  # the narrowest that holds every code: the store column's

    def precision_context(self):
        """The autocast and TF32 setting of `precision` for one call on this device (the caller's TF32 setting
        after it: the flags are process-wide)."""
        import torch

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        stack = contextlib.ExitStack()
        if dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=dtype))
        stack.enter_context(tf32_allowed(self.precision == "tf32"))
        return stack

    def submit(self, flux):
        """Start encoding [n, bands, 96, 96] flux; returns a handle for `result`. On a GPU nothing waits here:
        the host copies of the tokens and of the finite-latents flags land in pinned memory when the device
        gets there."""
        import torch

        try:
            x = flux.to(self.device, non_blocking=True)
            if x.data_ptr() == flux.data_ptr():
                x = x.clone()  # AION's Clamp writes into its input: never hand it memory we do not own
            tokens, finite = self.encode_on_device(x)  # [n, T] int32, [n] bool
        except torch.cuda.OutOfMemoryError:
            raise AstroptError(f"{self.device} ran out of memory encoding a batch of {len(flux)} images in "
                               f"{self.precision}: use a smaller --batch-size") from None
        if self.device.type != "cuda":
            return tokens, finite, None
        host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host_finite = torch.empty(finite.shape, dtype=finite.dtype, pin_memory=True)
        host_tokens.copy_(tokens, non_blocking=True)
        host_finite.copy_(finite, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host_tokens, host_finite, done

    def encode_on_device(self, x):
        """The codec on flux `x` already on the device (and ours to modify): ([n, T] int32 tokens, [n] bool
        finite), both still there. `finite` is False for an image whose latents (the codec's output before
        quantisation) hold a NaN or an infinity: its tokens mean nothing, whatever the float-to-int cast made
        of them (tanh of an infinite latent is a valid code; NaN casts to -2**31 on a CPU but to codes in the
        vocabulary on some GPUs). One reduction on the device: no per-image wait.

        This is AION's `Codec.encode` in its two steps (`_encode` to the latents, then `quantizer.encode`),
        so the tokens are the same as `codec.encode`'s.

        The device is made the default one while AION encodes: its ImagePadder builds a zero tensor
        [n, 9 bands, 96, 96] with `torch.zeros(...).to(image.device)`, which would otherwise be allocated and
        zeroed on the host and copied over (85 MB at n=256, a pageable copy that waits for the device) on
        every batch. Under the default device it is made on the device; the tokens are the same.

        TF32 is on inside the call only with precision "tf32"; the process's TF32 flags are as they were after."""
        import torch

        # TF32 as the precision says for this call only (its kernels are queued inside it, which is when torch
        # reads the flags), and the caller's setting after: the flags are process-wide, and a Python caller's
        # own fp32 work after tokenise() must not run in TF32. Set on every device (no effect off CUDA), so the
        # rule has one code path.
        with torch.inference_mode(), self.precision_context(), self.device:
            latents = self.codec._encode(self.image_type(flux=x, bands=self.bands))  # [n, C, T] float
            tokens = self.codec.quantizer.encode(latents)  # [n, T] int32
            finite = torch.isfinite(latents).flatten(1).all(dim=1)  # [n] bool
        return tokens, finite

    def result(self, handle) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens [n, T] int64, finite [n] bool, in_vocab [n] bool) of a submitted batch: `finite` is False
        where the codec's latents were not finite, `in_vocab` where a token is outside 0..vocab-1."""
        tokens, finite, done = handle
        if done is not None:
            done.synchronize()
        tokens = tokens.numpy().astype(np.int64)
        return tokens, finite.numpy().copy(), ((tokens >= 0) & (tokens < self.vocab)).all(axis=1)

    def encode(self, flux) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`result(submit(flux))`: encode one batch and wait for it."""
        return self.result(self.submit(flux))


class ScalarEncoder:
    """A catalogue scalar's AION codec (a quantiser: a table lookup, so on the host whatever the device): values
    [n] float32 -> [n, 1] tokens, equal to `codec.encode(Modality(value=values))`. The converter has already
    refused null, non-finite and (fixed-grid codecs) out-of-range values, which AION would map silently."""

    def __init__(self, loaded, modality_cls):
        import torch

        self.loaded, self.codec, self.modality_cls = loaded, loaded.codec.cpu(), modality_cls
        self.device = torch.device("cpu")
        self.vocab, self.tokens, self.dtype = loaded.vocab_size, 1, token_dtype(loaded.vocab_size)

    def submit(self, values):
        import torch

        with torch.inference_mode():
            tokens = self.codec.encode(self.modality_cls(value=values.float()))  # [n] int32 or int64
        return tokens.reshape(-1, 1), torch.ones(len(values), dtype=torch.bool)

    def result(self, handle) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens [n, 1] int64, finite [n] bool, in_vocab [n] bool), as `Encoder.result`."""
        tokens, finite = handle
        tokens = tokens.numpy().astype(np.int64)
        return tokens, finite.numpy().copy(), ((tokens >= 0) & (tokens < self.vocab)).all(axis=1)


class SpectrumEncoder:
    """A spectrum's AION codec on the device: spectra [n, 4, L] (flux, ivar, mask, wavelength; each row's pixels
    before its first NaN wavelength) -> [n, T] tokens, the normalisation token then the codebook tokens, equal to
    `codec.encode(DESISpectrum(...))` of each row on its own pixels: rows are encoded in groups of one length
    (AION resamples each spectrum onto its latent grid from its own wavelengths, so padding would change it).
    A row with no pixels (kept with --keep-partial, without a spectrum) gets zeros."""

    def __init__(self, loaded, device: str, precision: str, modality_cls):
        import torch

        self.loaded, self.modality_cls = loaded, modality_cls
        self.device = torch.device(device)
        self.codec = loaded.codec.to(self.device)
        self.vocab, self.tokens = loaded.vocab_size, loaded.tokens_per_object
        self.dtype = token_dtype(loaded.vocab_size)
        self.precision = precision

    precision_context = Encoder.precision_context

    def submit(self, spectra):
        import torch

        n = spectra.shape[0]
        lengths = torch.isfinite(spectra[:, 3]).sum(dim=1)  # [n] pixels of each row (host)
        tokens = torch.zeros((n, self.tokens), dtype=torch.int64)
        finite = torch.ones(n, dtype=torch.bool)
        for length in sorted(set(lengths.tolist()) - {0}):
            rows = torch.nonzero(lengths == length).flatten()
            x = spectra[rows, :, :length].to(self.device)
            spectrum = self.modality_cls(flux=x[:, 0].contiguous(), ivar=x[:, 1].contiguous(), mask=x[:, 2] > 0.5,
                                         wavelength=x[:, 3].contiguous())
            try:
                with torch.inference_mode(), self.precision_context(), self.device:
                    # AION's SpectrumCodec.encode in its steps, so that the latents can be checked
                    latents, normalization = self.codec._encode(spectrum)  # [k, C, T-1], [k]
                    codes = self.codec.quantizer.encode(latents)  # [k, T-1]
                    norm_code = self.codec.normalization_quantizer.encode(normalization)  # [k]
                    group = torch.cat([norm_code[:, None].to(codes.dtype), codes], dim=-1)
                    ok = torch.isfinite(latents).flatten(1).all(dim=1) & torch.isfinite(normalization)
            except torch.cuda.OutOfMemoryError:
                raise AstroptError(f"{self.device} ran out of memory encoding {len(rows)} spectra of {length} "
                                   "pixels: use a smaller --batch-size") from None
            tokens[rows] = group.cpu().to(torch.int64)
            finite[rows] = ok.cpu()
        return tokens, finite

    result = ScalarEncoder.result


class ModalityEncoders:
    """One encoder per token column (`Encoder` for images, `ScalarEncoder`, `SpectrumEncoder`), the image ones
    sharing one codec: a batch of several columns of the same galaxies costs one codec call per column.
    `submit`/`result` take and give {column: ...}."""

    def __init__(self, encoders: dict):
        self.encoders = encoders
        first = next(iter(encoders.values()))  # a store's first column is an image column
        self.loaded, self.device = first.loaded, first.device

    def submit(self, flux: dict) -> dict:
        """Start encoding each column's values."""
        return {column: self.encoders[column].submit(f) for column, f in flux.items()}

    def result(self, handles: dict) -> dict:
        """{column: (tokens [n, T] int64, finite [n] bool, in_vocab [n] bool)}, as `Encoder.result`."""
        return {column: self.encoders[column].result(h) for column, h in handles.items()}


@dataclass
class EncodedShard:
    """One shard's checked tokens, in source-row order, ready to be written."""

    index: int
    tokens: np.ndarray  # [rows, T] int16 or uint16
    rows: np.ndarray  # [rows] int64 global source rows
    object_ids: list | None
    rejects: list[dict]  # sorted by row
    seconds: float  # encoding, waits for input included
    input_wait_s: float
    valid: dict | None = None  # several modalities with --keep-partial: {column: [rows] bool}


def encode_shard(batches: Iterator[PreparedBatch], encoder: Encoder, cfg, index: int,
                 has_ids: bool, on_rows=None, on_first_batch=None, on_first_encoded=None) -> EncodedShard:
    """Encode one shard's batches. `on_rows(n)` is told of rows as they are done, `on_first_batch(seconds)` of
    the wait for the shard's first batch, `on_first_encoded()` when its first batch's tokens are back.

    The three things the codec's thread does between codec calls are named ranges for torch.profiler
    (`astropt.wait_for_batch`, `astropt.submit`, `astropt.collect`: see bench_tokenise.py --profile)."""
    from torch.profiler import record_function

    t0 = time.perf_counter()
    several = isinstance(encoder, ModalityEncoders)
    # each column's dtype: its encoder's (the narrowest for its codec's vocabulary)
    dtype_of = {c: e.dtype for c, e in encoder.encoders.items()} if several else {None: encoder.dtype}
    tokens_parts, rows_parts, ids, rejects, valid_parts = [], [], [], [], []
    in_flight = None  # (batch, handle): the device works on one batch while the host prepares the next

    def collect(batch: PreparedBatch, handle) -> None:
        """Keep the rows whose images encoded well: with one image column, or several without --keep-partial,
        every image; with --keep-partial, at least one (the others are marked invalid and hold zeros). A
        reject's reason names each failed column (with one column, the reason alone). Per-row work is only
        for rejected rows."""
        nonlocal on_first_encoded
        with record_function("astropt.collect"):
            results = encoder.result(handle) if several else {None: encoder.result(handle)}
            present = batch.valid  # --keep-partial: {column: [n] bool}, False where a kept row lacks that image
            encoded_well = {column: finite & in_vocab for column, (_, finite, in_vocab) in results.items()}
            good = encoded_well if present is None else {c: present[c] & e for c, e in encoded_well.items()}
            if len(good) == 1:
                ok = next(iter(good.values()))  # [n] bool
            else:
                stacked = np.stack(list(good.values()))  # [columns, n]
                ok = stacked.any(0) if present is not None else stacked.all(0)
            for j in np.nonzero(~ok)[0]:
                why = {c: OUT_OF_VOCABULARY if results[c][1][j] else NONFINITE_LATENTS for c in results
                       if not encoded_well[c][j] and (present is None or present[c][j])}  # {column: reason}
                reason = "; ".join(f"{c}: {text}" for c, text in why.items()) if several else why[None]
                _bad_row(reject_record(batch.rows[j], batch.object_ids[j], reason), cfg, rejects)
            tokens = {column: t for column, (t, _, _) in results.items()}  # [n, T] int64 each
            if present is not None:  # --keep-partial: a kept row's failed images hold zeros
                tokens = {column: np.where(good[column][:, None], t, 0) for column, t in tokens.items()}
                valid_parts.append({column: v[ok] for column, v in good.items()})
            tokens_parts.append({column: t[ok].astype(dtype_of[column]) for column, t in tokens.items()})
            rows_parts.append(batch.rows[ok])
            ids.extend(itertools.compress(batch.object_ids, ok))
            if on_rows is not None:
                on_rows(len(batch.rows))
            if on_first_encoded is not None:
                on_first_encoded()
                on_first_encoded = None

    waited = 0.0
    batches = iter(batches)
    while True:
        t_wait = time.perf_counter()
        with record_function("astropt.wait_for_batch"):
            batch = next(batches, None)
        waited += time.perf_counter() - t_wait
        if batch is None:
            break
        if on_first_batch is not None:
            on_first_batch(waited)
            on_first_batch = None
        for rej in batch.rejects:
            _bad_row(rej, cfg, rejects)
        if on_rows is not None:
            on_rows(len(batch.rejects))
        if len(batch.rows):
            with record_function("astropt.submit"):
                handle = encoder.submit(batch.flux)
            if in_flight is not None:
                collect(*in_flight)
            in_flight = (batch, handle)
    if in_flight is not None:
        collect(*in_flight)
    rows = np.concatenate(rows_parts) if rows_parts else np.zeros(0, dtype=np.int64)
    rejects.sort(key=lambda r: r["row"])
    width = {c: e.tokens for c, e in encoder.encoders.items()} if several else {None: encoder.tokens}
    tokens = {c: np.concatenate([p[c] for p in tokens_parts]) if tokens_parts else
              np.zeros((0, width[c]), dtype=dtype_of[c]) for c in width}
    valid = None
    if several and getattr(cfg, "keep_partial", False):
        valid = {c: np.concatenate([p[c] for p in valid_parts]) if valid_parts else np.zeros(0, dtype=bool)
                 for c in width}
    if not several:
        tokens = tokens[None]
    return EncodedShard(index, tokens, rows, ids if has_ids else None, rejects, time.perf_counter() - t0, waited,
                        valid)


def _bad_row(rej: dict, cfg, rejects: list) -> None:
    if cfg.strict:
        who = f" ({rej['object_id']})" if "object_id" in rej else ""
        raise AstroptError(f"bad source row {rej['row']}{who}: {rej['reason']} (--strict stops at the first bad row)")
    rejects.append(rej)


