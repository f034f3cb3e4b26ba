"""Checking a token store: every shard re-hashed against the manifest, its shapes, dtypes and token ranges, and
the codebook's usage."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from astropt_tok.errors import AstroptError
from astropt_tok.schema import DamagedFile
from astropt_tok.store.format import MANIFEST, read_manifest, sha256_path
from astropt_tok.store.reader import TokenStore


def shard_hash_problem(folder: Path, entry: dict) -> str | None:
    """The verify line for a manifest's shard entry whose file is missing or does not hash to its recorded
    sha256; None when it does (shared by the token and embeddings stores' verify)."""
    path = folder / entry["file"]
    if not path.exists():
        return f"{entry['file']}: missing"
    digest = sha256_path(path)
    if digest != entry["sha256"]:
        return f"{entry['file']}: sha256 {digest[:12]}… does not match the manifest's {entry['sha256'][:12]}…"
    return None


def verify_store(store_dir: str | os.PathLike) -> list[str]:
    """Re-hash every shard against the manifest and check shapes, dtypes and token ranges.

    Returns one problem line per bad shard (empty when the store is sound).
    """
    store_dir = Path(store_dir)
    try:
        manifest = read_manifest(store_dir)
    except DamagedFile as exc:  # what every reader would refuse: reported, as a bad shard is
        return [f"{MANIFEST}: {exc}"]
    if not manifest.get("complete"):
        return [f"{store_dir}: manifest is not complete (run `astropt verify {store_dir} --finalize`)"]
    problems = []
    store = TokenStore(store_dir, check_sizes=False)
    for i, s in enumerate(store.shards):
        problem = shard_hash_problem(store_dir, s)
        if problem:
            problems.append(problem)
            continue
        try:
            present = {c: np.asarray(store.shard_tokens(i, c)[:]) for c in store.token_columns}  # each [rows, T]
        except AstroptError as exc:
            problems.append(f"{s['file']}: {exc}")
            continue
        present = {c: t for c, t in present.items() if t.size}
        vocab = store.modality_vocab
        outside = [c for c, t in present.items() if int(t.min()) < 0 or int(t.max()) >= vocab[c]]
        for column in outside:
            what = "tokens" if column == "tokens" else f"{column} tokens"
            problems.append(f"{s['file']}: {what} outside 0..{vocab[column] - 1}")
        spans = {c: [int(t.min()), int(t.max())] for c, t in present.items()}
        if not outside and spans and s.get("token_min") is not None:
            low, high = min(lo for lo, _ in spans.values()), max(hi for _, hi in spans.values())
            if (s["token_min"], s["token_max"]) != (low, high):
                problems.append(f"{s['file']}: tokens span {low}..{high}, the manifest says "
                                f"{s['token_min']}..{s['token_max']}")
        if not outside and spans and s.get("token_ranges") is not None and s["token_ranges"] != spans:
            wrong = sorted(c for c in spans if s["token_ranges"].get(c) != spans[c])
            problems.append(f"{s['file']}: {', '.join(wrong)} tokens span "
                            f"{'; '.join(f'{spans[c][0]}..{spans[c][1]}' for c in wrong)}, not the manifest's "
                            "token_ranges")
        rows = store.shard_source_rows(i)
        if rows.shape[0] != s["rows"] or (rows.size > 1 and np.any(np.diff(rows) <= 0)):
            problems.append(f"{s['file']}: source row column is not {s['rows']} ascending rows")
    return problems


def codebook_usage(store: TokenStore) -> tuple[int, np.ndarray]:
    """(distinct codes used, per-code counts [vocab]) over the whole store (every image column's tokens: they
    share the image codec's codebook; scalars and spectra have codebooks of their own)."""
    counts = np.zeros(store.vocab_size, dtype=np.int64)
    for i in range(len(store.shards)):
        for column in [c for c in store.token_columns if store.modality_kind[c] == "image"]:
            tokens = np.asarray(store.shard_tokens(i, column)[:]).astype(np.int64).reshape(-1)
            counts += np.bincount(tokens, minlength=store.vocab_size)[: store.vocab_size]
    return int((counts > 0).sum()), counts
