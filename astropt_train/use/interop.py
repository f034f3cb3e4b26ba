"""Models from anywhere: this project's checkpoints, and (both ways) upstream AstroPT's pickled `ckpt.pt`.

`load_any_model(path)` gives (GPT, info) for a run folder, a `step-N` checkpoint folder, or an upstream AstroPT
checkpoint (a `ckpt.pt` file or a folder holding one); `info` names what was loaded, for manifests.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from astropt_tok.errors import AstroptError


def load_any_model(path: str | os.PathLike, step: int | None = None, device: str = "cpu"):
    """(GPT in eval mode on `device`, info) where info = {kind, path, step, weights_sha256, model, store, vocab_size}."""
    from astropt_tok.store import sha256_path
    from astropt_train import checkpoint as ck

    path = Path(path)
    ckpt = ck.find_checkpoint(path, step)
    model, conf = ck.load_model(ckpt, device=device)
    info = {"kind": "astropt-train", "path": str(ckpt.resolve()), "step": conf.get("step"),
            "weights_sha256": sha256_path(ckpt / ck.MODEL_FILE), "model": asdict(model.config),
            "store": conf.get("store"), "vocab_size": int(conf.get("vocab_size", model.config.vocab_size))}
    return model, info
