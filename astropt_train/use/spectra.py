"""Spectrum tokens back to flux: a store's stored spectra decoded by their codec and, with a model (--given A
--generate-modality SPECTRUM), spectra the model draws after each galaxy's stored blocks, each beside the source
spectrum in one picture.

A spectrum is decoded on the source row's own wavelengths when the source can be read, else on the codec's latent
grid (`lambda_min + resolution * arange(num_pixels)`). The tiny spectrum codec shipped for the demo is random,
untrained: its decoded flux means nothing (the plumbing is what it shows).
"""

from __future__ import annotations

import sys

import numpy as np

from astropt_tok.errors import AstroptError

MAX_PANELS = 12  # galaxies drawn in the picture (all are decoded)


def decode_spectra(codec, tokens: np.ndarray, wavelengths: list[np.ndarray | None]) -> list[tuple[np.ndarray, np.ndarray]]:
    """AION decode of spectrum tokens [N, T] -> per row (wavelength [L] Angstrom, flux [L]) float32, on the
    row's `wavelengths` entry, or the codec's latent grid where it is None (rows decoded one by one: each has
    its own grid)."""
    import torch

    from astropt_train.use.decode import check_token_range

    tokens = np.asarray(tokens, dtype=np.int64)
    check_token_range(tokens, codec.vocab_size, what=f"spectrum tokens ({codec.aion_modality})")
    module = codec.codec
    device = module.latent_grid.wavelength.device
    out = []
    with torch.inference_mode():
        for t, wl in zip(tokens, wavelengths):
            grid = None if wl is None else torch.as_tensor(np.asarray(wl, np.float32), device=device)[None]  # [1, L]
            s = module.decode(torch.as_tensor(t[None], device=device), wavelength=grid)
            out.append((s.wavelength[0].float().cpu().numpy(), s.flux[0].float().cpu().numpy()))
    return out


def draw_spectrum_tokens(model, context: np.ndarray, modality: str, order: list[int] | None, cfg) -> np.ndarray:
    """Sample the `modality` block (its tokens_per_object tokens) after each row's stored blocks `context` [N, K]
    -> [N, T] int64, seeded by cfg.seed, in the block `order` (None: the model's own)."""
    import torch

    device = next(model.parameters()).device
    T = model.lengths[model.names.index(modality)]
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = []
    for i in range(0, len(context), cfg.batch_size):
        prefix = torch.as_tensor(np.ascontiguousarray(context[i : i + cfg.batch_size]), device=device)
        blocks = None if order is None else torch.tensor(order, device=device).expand(len(prefix), len(order))
        seq = model.generate(prefix, T, temperature=cfg.temperature, top_k=cfg.top_k, generator=gen,
                             use_kv_cache=cfg.kv_cache, order=blocks)
        out.append(seq[:, -T:].cpu().numpy())
    return np.concatenate(out).astype(np.int64) if out else np.zeros((0, T), np.int64)


def write_spectrum_figure(labels: list[str], source: list[dict | None], decoded: list[tuple], drawn: list[tuple] | None,
                          path, title: str):
    """One panel per galaxy (at most MAX_PANELS): the source flux, the codec's decode of the stored tokens and the
    model's drawn spectrum, against wavelength."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from astropt_train.metrics import write_png

    n = min(len(labels), MAX_PANELS)
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.9 * n + 0.6), dpi=100, squeeze=False)
    for k, ax in enumerate(axes[:, 0]):
        if source[k] is not None:
            ax.plot(source[k]["wavelength"], source[k]["flux"], color="0.6", lw=0.6, label="source")
        ax.plot(*decoded[k], color="C1", lw=0.8, label="codec decode of the stored tokens")
        if drawn is not None:
            ax.plot(*drawn[k], color="C0", lw=0.8, label="drawn by the model")
        ax.set_title(labels[k], fontsize=7, loc="left")
        ax.tick_params(labelsize=6)
        if k == 0:
            ax.legend(fontsize=6, loc="upper right")
    axes[-1, 0].set_xlabel("wavelength (Angstrom)")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return write_png(fig, path)


def decode_spectrum(cfg, plan, model, ck_store: dict, device: str):
    """`astropt decode` of a spectrum column: the stored tokens decoded (and, with a model and --given, a drawn
    spectrum per galaxy) on each source row's wavelengths, beside the source flux in a PNG."""
    from astropt_tok.source import read_source_spectra
    from astropt_train.use import scalars as sc
    from astropt_train.use.decode import (
        DecodeResult,
        _labels_for,
        _source_rereadable,
        check_token_range,
        picture_path,
        rows_with_images,
    )

    store, modality = plan.store, plan.modality
    codec = sc.store_codec(store, modality, cfg.codec, device, cfg.accept_codec_change)
    if codec.tokens_per_object != store.modality_tokens[modality]:
        raise AstroptError(f"codec {codec.codec_id} writes {codec.tokens_per_object} tokens per spectrum, but column "
                           f"{modality} of token store {store.dir} holds {store.modality_tokens[modality]}")
    context, order = [], None
    if model is not None:
        context, order = sc.scalar_order(model, modality, cfg.given, bool(ck_store.get("shuffle_modalities")))
    rows = rows_with_images(store, plan.rows, [*context, modality])
    labels = _labels_for(store, rows)
    stored = store.take(rows, modality).astype(np.int64)  # [N, T]
    source: list[dict | None] = [None] * len(rows)
    if _source_rereadable(store.manifest):
        try:
            source = read_source_spectra(store.manifest["source"], store.source_rows(rows), modality, cfg.source)
        except AstroptError as exc:
            if cfg.compare:
                raise
            print(f"note: no source spectra (decoded on the codec's latent grid): {exc}", file=sys.stderr)
    elif cfg.compare:
        raise AstroptError(f"--compare needs the store's source, but {store.dir} was not made from a survey")
    grids = [None if s is None else s["wavelength"] for s in source]
    decoded = decode_spectra(codec, stored, grids)
    drawn, agreement = None, None
    if model is not None:
        given = np.concatenate([store.take(rows, m).astype(np.int64) for m in context], axis=1)
        for m in context:
            check_token_range(store.take(rows, m), store.modality_vocab[m], what=f"store {store.dir} ({m})")
        drawn_tokens = draw_spectrum_tokens(model, given, modality, order, cfg)
        agreement = float((drawn_tokens == stored).mean())
        drawn = decode_spectra(codec, drawn_tokens, grids)
        print(f"note: the model reads {', '.join(context)} before {modality}: each drawn spectrum follows the row's "
              "stored tokens of them", file=sys.stderr)
    table = []
    for k, (label, r) in enumerate(zip(labels, rows)):
        entry = {"id": label, "row": int(r), "pixels": int(len(decoded[k][0])),
                 "grid": "source" if grids[k] is not None else "codec latent grid"}
        if source[k] is not None:
            good = ~source[k]["mask"]
            entry["codec_rms"] = _rms(decoded[k][1][good] - source[k]["flux"][good])
            if drawn is not None:
                entry["drawn_rms"] = _rms(drawn[k][1][good] - source[k]["flux"][good])
        table.append(entry)
    metrics = {"spectrum": {"codec": codec.codec_id, "tokens_per_spectrum": codec.tokens_per_object,
                            "rms": "RMS of decoded - source flux over the source's unmasked pixels"}}
    if agreement is not None:
        metrics["spectrum"].update(given=context, token_agreement=agreement, seed=cfg.seed,
                                   temperature=cfg.temperature, top_k=cfg.top_k)
    out = None
    if picture_path(cfg) is not None:
        what = f"{modality} drawn from {', '.join(context)}" if model is not None else f"stored {modality}"
        out = write_spectrum_figure(labels, source, decoded, drawn, picture_path(cfg),
                                    cfg.title or f"{what} | codec {codec.aion_modality} ({codec.vocab_size} codes)")
    final = drawn_tokens if model is not None else stored
    return DecodeResult(mode="spectrum" if model is not None else "stored", out=out, tokens=final,
                        flux=np.zeros((len(rows), 0), np.float32), bands=[], labels=labels, codec_id=codec.codec_id,
                        rows=rows, metrics=metrics, modality=modality, kind="spectrum", table=table,
                        columns=["source", "codec"] + (["drawn"] if model is not None else []))


def _rms(x: np.ndarray) -> float | None:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else None
