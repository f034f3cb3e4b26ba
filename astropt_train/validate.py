"""Validation: mean loss over held-out rows, and a PNG of a few validation galaxies decoded by the codec: the
stored tokens (the codec's reconstruction, the model's target) beside the model's argmax prediction. This is
the only module of the trainer that touches the codec, and it imports it only when it first draws images."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np

from astropt_train.data import TokenRows, batch_to_device, val_batch_rows

RGB_BANDS = ("DES-Z", "DES-R", "DES-G")  # red, green, blue when the store has them
HSC_RGB_BANDS = ("HSC-I", "HSC-R", "HSC-G")  # the same for an HSC modality


def evaluate(model, dataset: TokenRows, val_rows: np.ndarray, batch_size: int, eval_iters: int, device,
             ctx=None, rank: int = 0, world: int = 1, by_modality: dict | None = None, scores=None) -> float:
    """Mean validation loss over eval_iters batches per rank (the same batches at every eval), averaged over ranks.
    Several modalities: pass a dict as `by_modality` to get each modality's mean loss in it. `scores`, a
    `token_scores.TokenScores`, gets the same batches' accuracies and its baselines' (summed over ranks)."""
    import torch
    import torch.distributed as dist

    ctx = ctx or nullcontext()
    was_training = model.training
    model.eval()
    names = dataset.modalities if by_modality is not None else []
    losses = torch.zeros(eval_iters, device=device)
    per_modality = torch.zeros(eval_iters, len(names), device=device)
    with torch.no_grad():
        for i in range(eval_iters):
            x, y, kw = batch_to_device(dataset.__getitems__(val_batch_rows(val_rows, batch_size, i, rank, world)), device)
            with ctx:
                logits, loss = model(x, y, **kw)
            losses[i] = loss.float()
            if scores is not None:
                scores.add_batch(model, logits, y, x, kw.get("order"), kw.get("loss_mask"), row_offset=i * batch_size)
            if names:
                parts = model.loss_by_modality(logits, y, kw.get("order"), kw.get("loss_mask"))
                per_modality[i] = torch.stack([parts[m].float() for m in names])
    means = torch.cat([losses.mean()[None], per_modality.mean(0)])  # [1 + modalities]
    if world > 1:
        dist.all_reduce(means)
        means /= world
        if scores is not None:  # sums, not means: every rank's targets count once
            summed = torch.as_tensor(scores.vector(), dtype=torch.float64, device=device)
            dist.all_reduce(summed)
            scores.load(summed.cpu().numpy())
    model.train(was_training)
    values = means.tolist()
    if names:
        by_modality.update(zip(names, values[1:]))
    return float(values[0])


def predict_tokens(model, tokens, device, ctx=None, vocab_limit=None):
    """Teacher-forced argmax prediction of every token after the first, among ids below `vocab_limit` when given:
    (n, T) int16 -> (n, T) int64 on CPU (several modalities: a batch dict in, the whole (n, M * T) sequence out)."""
    import torch

    ctx = ctx or nullcontext()
    x, y, kw = batch_to_device(tokens, device)
    kw.pop("loss_mask", None)
    was_training = model.training
    model.eval()
    with torch.no_grad(), ctx:
        logits, _ = model(x, y, **kw)  # (n, T-1, vocab)
    model.train(was_training)
    pred = logits[..., :vocab_limit].argmax(dim=-1)  # (n, T-1): the prediction for positions 1..T-1
    return torch.cat([x[:, :1], pred], dim=1).cpu()


def split_blocks(sequences, order, names: list[str], lengths=None) -> dict:
    """(n, sum T_m) sequences -> {modality: (n, T_m)}: each sample's block of that modality, wherever `order`
    (n, M; None: `names` order) put it. `lengths` [M]: each modality's block length (None: M equal blocks)."""
    import torch

    n, total = sequences.shape
    if lengths is None:
        lengths = [total // len(names)] * len(names)
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    order = torch.arange(len(names)).expand(n, -1) if order is None else torch.as_tensor(order)
    sizes = lengths[order]  # [n, M]: the length of each sample's block k
    begins = sizes.cumsum(1) - sizes  # [n, M]: where block k begins
    slot_of = torch.argsort(order, dim=1)  # [n, M]: the block that holds modality m
    out = {}
    for k, m in enumerate(names):
        at = begins.gather(1, slot_of[:, k : k + 1]) + torch.arange(int(lengths[k]))  # [n, T_m]
        out[m] = sequences.gather(1, at.to(sequences.device))
    return out


def rgb_bands(bands: list[str]) -> list[str]:
    """The three bands drawn as red, green, blue: z, r, g (HSC: i, r, g) when present, else the first three."""
    for wanted in (RGB_BANDS, HSC_RGB_BANDS):
        if all(b in bands for b in wanted):
            return list(wanted)
    return list(bands[:3]) or ["DES-G", "DES-R", "DES-Z"]


class ImageGrid:
    """Decodes validation targets and predictions with the codec into RUN/val_images/step-N.png.

    The codec loads on first use; if it cannot (offline, missing), this says so once and draws nothing after.
    """

    def __init__(self, codec_id: str, store_bands: list[str], device, echo=print, made_with: dict | None = None,
                 accept_changed: bool = False):
        self.codec_id, self.store_bands, self.device, self.echo = codec_id, list(store_bands), device, echo
        # the store's codec section {id, weights_sha256}: a codec loaded here (e.g. from the hub at the first eval,
        # after the check before the first step could not see it) must have those weights to draw its tokens
        self.made_with, self.accept_changed = made_with or {}, accept_changed
        self._codec = None
        self.failed = False
        self.bands = rgb_bands(self.store_bands)

    def _load(self):
        if self._codec is None and not self.failed:
            try:
                from astropt_tok.codec import load_image_codec

                from astropt_tok.artifacts import check_store_codec

                loaded = load_image_codec(self.codec_id, device=str(self.device))
                check_store_codec("the token store", self.made_with, loaded, self.accept_changed)
                self._codec = loaded.codec
            except Exception as exc:  # AstroptError (offline, bad folder) or anything the codec raises
                self.failed = True
                self.echo(f"validation images off: cannot load codec {self.codec_id!r} ({exc}); training goes on")
        return self._codec

    def decode(self, tokens) -> np.ndarray:
        """(n, T) int tokens -> (n, 3, H, W) float flux in self.bands order."""
        import torch

        codec = self._load()
        with torch.no_grad():
            img = codec.decode(tokens.to(self.device).long(), bands=self.bands)
        return img.flux.float().cpu().numpy()

    def write(self, targets, predictions, path: str | Path, labels=None, step: int | None = None) -> Path | None:
        """Draw codec reconstruction | prediction for (n, T) token tensors into a PNG; None when the codec is unavailable.

        The same style as `astropt decode` (astropt_train.use.images.save_figure); `labels` are object ids.
        """
        if self._load() is None:
            return None
        try:
            t, p = self.decode(targets), self.decode(predictions)
        except Exception as exc:
            self.failed = True
            self.echo(f"validation images off: decoding with codec {self.codec_id!r} failed ({exc}); training goes on")
            return None
        from astropt_train.use.images import save_figure

        labels = [str(x) for x in labels] if labels is not None else [f"val #{i}" for i in range(len(t))]
        when = f"step {step}: " if step is not None else ""
        return save_figure([t, p], ["codec reconstruction", "prediction"], labels, self.bands, path,
                           title=f"{when}validation galaxies: the stored tokens decoded by the codec (what the model "
                                 "learns; not the original) | teacher-forced argmax prediction",
                           rgb_bands=self.bands)
