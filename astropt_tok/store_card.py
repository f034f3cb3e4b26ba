"""A token store's dataset card: DIR/README.md, which makes the store folder a valid Hugging Face dataset repo.

The card is YAML front matter plus a markdown body. The front matter's `configs` section points `datasets` at
the shards, so `datasets.load_dataset(DIR)` (or `load_dataset("ORG/NAME")` once pushed) yields the tokens:
Arrow shards are Arrow IPC *stream* files, which `datasets`' packaged `arrow` builder reads (it opens a file as
a stream first, then as the random-access file format), and it picks that builder from the `.arrow` suffix.
`dataset_info.features` is `datasets`' own description of the first shard's schema. Zarr shards are folders of
chunk files that no `datasets` builder reads: their card says so, and its `configs` names no file, so
`load_dataset` on a Zarr store is one error instead of the Zarr metadata read as JSON rows.

The body repeats the manifest's facts (rows, shards, codec id and weights sha256, bands per column, tokens per
image, vocabulary, source, format version) and says how to train on the store from the hub.
"""

from __future__ import annotations

import os
from pathlib import Path

CARD = "README.md"
ARROW_SHARDS = "shard-*.arrow"  # data_files pattern of an Arrow store's shards (sorted: zero-padded indices)
NO_DATA_FILES = "zarr-shards-are-not-readable-by-datasets"  # a Zarr card's data_files: matches no file
TAGS = ["astronomy", "galaxies", "tokens", "astropt", "aion"]


def card_metadata(folder: str | os.PathLike, manifest: dict) -> dict:
    """The card's YAML front matter as a dict: configs (the shards as one `train` split), features, tags."""
    storage = manifest.get("storage", "arrow")
    pattern = ARROW_SHARDS if storage == "arrow" else NO_DATA_FILES
    meta = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": pattern}]}],
        "tags": TAGS,
        "pretty_name": f"AstroPT tokens of {(manifest.get('source') or {}).get('id', 'a survey')}",
        "size_categories": [_size_category(int((manifest.get("totals") or {}).get("rows", 0)))],
    }
    features = _arrow_features(folder, manifest) if storage == "arrow" else None
    if features is not None:
        meta["dataset_info"] = features
    return meta


def _arrow_features(folder: str | os.PathLike, manifest: dict) -> dict | None:
    """`datasets`' YAML of the first shard's schema ({"features": [...]}), via its own serialiser."""
    shards = manifest.get("shards") or []
    if not shards:
        return None
    import pyarrow as pa
    from datasets import DatasetInfo, Features
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCardData

    with pa.memory_map(str(Path(folder) / shards[0]["file"]), "r") as source:
        schema = pa.ipc.open_stream(source).schema
    data = DatasetCardData()
    DatasetInfosDict({"default": DatasetInfo(features=Features.from_arrow_schema(schema))}).to_dataset_card_data(data)
    return data.to_dict().get("dataset_info")


def _size_category(rows: int) -> str:
    """The hub's size bucket for a number of rows: 'n<1K', '1K<n<10K', ..."""
    if rows < 1000:
        return "n<1K"
    bounds = ["1K", "10K", "100K", "1M", "10M", "100M", "1B", "10B"]
    for low, high in zip(bounds, bounds[1:]):
        if rows < int(high[:-1]) * {"K": 10**3, "M": 10**6, "B": 10**9}[high[-1]]:
            return f"{low}<n<{high}"
    return "other"


def _what(modality: dict) -> str:
    """A token column's line in the card: an image column's bands; a scalar's or spectrum's AION modality, codec,
    vocabulary and tokens per galaxy."""
    if modality.get("kind", "image") == "image":
        return ", ".join(modality.get("bands") or [])
    codec = modality.get("codec") or {}
    return (f"{modality['kind']} `{modality.get('aion_modality')}` ({codec.get('class')} of `{codec.get('folder')}`, "
            f"{modality.get('vocab_size')} codes, {modality.get('tokens_per_object')} token(s) per galaxy)")


def card_body(manifest: dict, repo_id: str | None = None) -> str:
    """The card's markdown: the manifest's facts and how to read and train on the store."""
    m = manifest
    codec, source, totals = m.get("codec") or {}, m.get("source") or {}, m.get("totals") or {}
    storage = m.get("storage", "arrow")
    repo = repo_id or "ORG/NAME"
    columns = [(x["name"], _what(x)) for x in m.get("modalities") or []] or [("tokens", ", ".join(m.get("bands") or []))]
    column_rows = "\n".join(f"| `{name}` | {what} |" for name, what in columns)
    source_line = ", ".join(f"{k} `{source[k]}`" for k in ("id", "split", "column", "id_column", "revision")
                            if source.get(k))
    lines = [
        f"# AstroPT token store: {source.get('id', 'unknown source')}",
        "",
        "Galaxy images tokenised once with the AION image codec by astropt-tokens (`astropt tokenise`), for "
        "training AstroPT-style GPTs on the tokens instead of the pixels.",
        "",
        "| fact | value |",
        "| --- | --- |",
        f"| rows | {totals.get('rows', 'unknown')}" + (f" ({totals['rejected']} source rows rejected, listed in "
                                                       "`rejects.jsonl`)" if totals.get("rejected") else "") + " |",
        f"| shards | {len(m.get('shards') or [])} ({storage}) |",
        f"| codec | `{codec.get('id', 'unknown')}`" + (f" at revision `{codec['revision']}`" if codec.get("revision")
                                                      else "") + " |",
        f"| codec weights sha256 | `{codec.get('weights_sha256') or 'not recorded'}` |",
        f"| vocabulary | {m.get('vocab_size')} codes ({m.get('dtype')}) |",
        f"| tokens per image | {m.get('tokens_per_image')} |",
        f"| source | {source_line or 'not recorded'} |",
        f"| format | {m.get('format')} version {m.get('format_version')} (astropt-tokens {m.get('tool_version')}) |",
        "",
        "| token column | bands, or what it holds |",
        "| --- | --- |",
        column_rows,
        "",
        "`manifest.json` holds every fact above and each shard's sha256, rows and token range.",
        "",
        "## Use",
        "",
        "Train on it from the hub (downloaded once per node into the Hugging Face cache, checked against the "
        "manifest, then memory-mapped):",
        "",
        "```bash",
        f"astropt train --tokens hf://datasets/{repo} --out runs/mine",
        "```",
        "",
    ]
    if storage == "arrow":
        lines += [
            "Read the tokens with `datasets` (each row: one token column per image column, `row`, the galaxy's "
            "row in the source, and `object_id` when the source had ids):",
            "",
            "```python",
            "from datasets import load_dataset",
            f'tokens = load_dataset("{repo}", split="train")',
            "```",
        ]
    else:
        lines += [
            "The shards are Zarr groups, which `datasets.load_dataset` cannot read (its `configs` name no file): "
            "read them with `astropt` (`--tokens hf://...`, or `astropt_tok.store.TokenStore` on the downloaded "
            "folder) or with `zarr` directly. `astropt tokenise --format arrow` writes a store `datasets` reads.",
        ]
    return "\n".join(lines) + "\n"


def card_text(folder: str | os.PathLike, manifest: dict, repo_id: str | None = None) -> str:
    """The whole README.md: YAML front matter, then the markdown body."""
    import yaml

    front = yaml.safe_dump(card_metadata(folder, manifest), sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n{card_body(manifest, repo_id)}"


def write_store_card(folder: str | os.PathLike, manifest: dict, repo_id: str | None = None) -> Path:
    """Write DIR/README.md (atomically) for a complete store's manifest; returns its path."""
    from astropt_tok.atomic import atomic_write_text

    path = Path(folder) / CARD
    atomic_write_text(path, card_text(folder, manifest, repo_id))
    return path


def read_card_metadata(folder: str | os.PathLike) -> dict | None:
    """The YAML front matter of DIR/README.md as a dict, or None when there is no card."""
    import yaml

    path = Path(folder) / CARD
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return None
    front, _, _ = text[4:].partition("\n---\n")
    meta = yaml.safe_load(front)
    return meta if isinstance(meta, dict) else None
