"""`astropt embed`: pooled per-galaxy embeddings from a trained model, written as a sharded, verifiable store.

Each galaxy's 576 tokens go through the model in one pass; the hidden states of one or more layers are
pooled over positions with upstream AstroPT's reductions (`GPT.generate_embeddings`):
    mean       the mean over positions
    last       the last position's state
    exp_decay  a weighted mean with weights 10**linspace(0, -1, T) (torch.logspace(0, -1, T)): early positions
               weigh up to 10x the last
Layers: `final` (default) is the output after the final LayerNorm, what the head sees; `centre` is block
n_layer // 2's output, upstream's `draw_from_centre`; an integer i is block i's output (0-based). A model of
several image columns (`astropt train --modalities`) reads each galaxy as its columns' token blocks in the
model's order, one after another, and writes per layer the joint embedding (pooled over all of them) and one
per modality (pooled over its block): `embedding` and `embedding_<modality>`, listed as "columns".
A galaxy that lacks an image (a token store made with --keep-partial) is read without it: the model attends
only to the blocks the galaxy has, the joint embedding pools only their positions, and the embedding of the
missing modality is null (`read_embeddings` gives NaN for it; `astropt probe` leaves such rows out).

Embeddings store (format version 1)
-----------------------------------
EMB/manifest.json
    {"format": "astropt-embeddings", "format_version": 1, "complete",
     "checkpoint": {"kind", "path", "step", "weights_sha256", "model", "random_init_seed"},
     "tokens": {"dir", "manifest_sha256", "num_rows", "codec_id"}, "modalities", "store_rows": [start, stop],
     "pool", "layers": [{"name", "index", "column"}], "n_embd", "dtype",
     "shards": [{"index", "file", "rows", "rejected", "sha256", "bytes"}, ...]}   # shards: once complete
EMB/shard-00000.arrow ...
    One Arrow IPC stream per token shard (same index), uncompressed: `row` int64 (the token store's global
    source row), `store_row` int64 (the row's index in the token store), `object_id` string (null when the
    store has none), and one fixed_size_list<float32 | float16>[n_embd] column per layer: `embedding` for a
    single layer, `embedding_<name>` for each of several. `datasets.Dataset.from_file` and `pyarrow` read it.
    An entry is null where the galaxy lacks what it would pool (a --keep-partial store's missing image).
EMB/.done/shard-00000.json
    The shard's completion record, as in a token store; a shard without one is redone on the next run.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from astropt_tok.artifacts import clear_own, output_folder, update_lineage
from astropt_tok.errors import AstroptError
from astropt_tok.prefetch import Prefetch

FORMAT = "astropt-embeddings"
FORMAT_VERSION = 1
POOLS = ("mean", "last", "exp_decay")
DTYPES = ("float32", "float16")
IDENTITY_KEYS = ("checkpoint", "tokens", "store_rows", "pool", "layers", "dtype")  # what a rerun must agree on


@dataclass
class EmbedConfig:
    """Everything `astropt embed` needs; every flag is one field."""

    checkpoint: Path | str
    out: Path | str
    tokens: Path | str | None = None  # default: the store the checkpoint was trained on
    step: int | None = None
    pool: str = "mean"
    layers: str = "final"  # comma list of final, centre, or block indices
    rows: str | None = None  # "A:B" store rows
    limit: int | None = None
    batch_size: int = 32
    device: str = "auto"
    dtype: str = "float32"  # storage dtype of the embeddings
    random_init_seed: int | None = None  # embed with a fresh model of the same shape, seeded so (probe baseline)
    overwrite: bool = False
    progress: bool = True


@dataclass
class EmbedResult:
    """What one `embed` call did."""

    out: Path
    rows: int  # rows in the whole embeddings store
    shards_written: int
    shards_skipped: int
    seconds: float
    rows_embedded: int = 0  # rows computed by this call
    loader_seconds: float = 0.0  # time the model waited for token batches
    manifest: dict = field(default_factory=dict)

    @property
    def embeddings_per_s(self) -> float:
        return self.rows_embedded / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------
# the arithmetic


def parse_layers(spec: str, n_layer: int) -> list[dict]:
    """`final,centre,3` -> [{"name", "index", "column"}]: index n_layer is after ln_f, i < n_layer block i's output."""
    names = [s.strip().lower() for s in str(spec).split(",") if s.strip()]
    if not names:
        raise AstroptError("--layer names no layer: use final, centre or a block index")
    layers = []
    for name in names:
        if name == "final":
            index = n_layer
        elif name in ("centre", "center"):
            name, index = "centre", n_layer // 2
        else:
            try:
                index = int(name)
            except ValueError:
                raise AstroptError(f"--layer {name!r}: use final, centre or a block index 0..{n_layer - 1}") from None
            if not 0 <= index < n_layer:
                raise AstroptError(f"--layer {index}: the model has blocks 0..{n_layer - 1}")
        if any(lay["name"] == name for lay in layers):
            raise AstroptError(f"--layer names {name} twice")
        layers.append({"name": name, "index": index})
    for lay in layers:
        lay["column"] = "embedding" if len(layers) == 1 else f"embedding_{lay['name']}"
    return layers


def pool_hidden(hidden, pool: str, keep=None):
    """(B, T, C) hidden states -> (B, C) in float32 with upstream's reduction `pool`; with `keep` (B, T) bool,
    over the kept positions only (their own weights, for exp_decay), NaN for a row that keeps none."""
    import torch

    hidden = hidden.float()
    B, T, _ = hidden.shape
    if pool not in POOLS:
        raise AstroptError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if keep is None:
        if pool == "mean":
            return hidden.mean(dim=1)
        if pool == "last":
            return hidden[:, -1, :]
    keep = torch.ones(B, T, dtype=torch.bool, device=hidden.device) if keep is None else keep
    if pool == "last":
        last = T - 1 - keep.flip(1).int().argmax(dim=1)  # (B,) the last kept position
        pooled = hidden[torch.arange(B, device=hidden.device), last]
    else:
        weights = torch.ones(T, device=hidden.device) if pool == "mean" else torch.logspace(0, -1, T, device=hidden.device)
        weights = weights * keep  # (B, T)
        pooled = (weights[..., None] * hidden).sum(dim=1) / weights.sum(dim=1, keepdim=True)
    return torch.where(keep.any(dim=1, keepdim=True), pooled, float("nan"))


def embed_batch(model, tokens, layers: list[dict], pool: str, blocks: int = 1, valid=None,
                lengths: list[int] | None = None) -> list:
    """tokens (B, T) int64 on the model's device -> one (B, C) float32 tensor per layer. With `blocks` > 1 (a
    sequence of several modalities' blocks, of `lengths` tokens each; equal when not given), per layer the joint
    embedding (pooled over the whole sequence) and then one per block (pooled over its positions). `valid`
    (B, blocks) bool: which blocks the galaxy has; the model reads only those, the joint embedding pools only
    them, a missing block's is NaN."""
    import torch

    if lengths is None or len(lengths) != blocks:
        lengths = [tokens.size(1) // blocks] * blocks
    present = None
    if valid is not None and not bool(valid.all()):
        repeats = torch.tensor(lengths, device=valid.device)
        present = valid.repeat_interleave(repeats, dim=1)  # (B, T): blocks in the model's order
    with torch.no_grad():
        hidden = model.hidden_states(tokens, [lay["index"] for lay in layers], present=present)
    if blocks == 1:
        return [pool_hidden(h, pool, present) for h in hidden]
    out = []
    for h in hidden:  # (B, M * T, C)
        out.append(pool_hidden(h, pool, present))
        parts = h.split(lengths, dim=1)
        kept = None if present is None else present.split(lengths, dim=1)
        out.extend(pool_hidden(part, pool, None if kept is None else kept[k]) for k, part in enumerate(parts))
    return out


# ---------------------------------------------------------------------------------------------------------
# reading token batches ahead of the model


def _token_batches(tokens: np.ndarray, batch_size: int, pin: bool, valid: np.ndarray | None = None):
    """(token batch, valid batch or None) pairs: int64 tokens, pinned on CUDA, and the [b, M] bool of which
    images each galaxy has. Run in a thread a few batches ahead of the model (`Prefetch`)."""
    import torch

    for a in range(0, len(tokens), batch_size):
        batch = torch.from_numpy(np.asarray(tokens[a : a + batch_size]).astype(np.int64))
        has = None if valid is None else torch.from_numpy(valid[a : a + batch_size])
        yield batch.pin_memory() if pin else batch, has


# ---------------------------------------------------------------------------------------------------------
# the store


_REPAIR = "re-run `astropt embed` with --overwrite"


def _read_manifest(out: Path) -> dict | None:
    p = out / "manifest.json"
    if not p.is_file():
        return None
    from astropt_tok.schema import read_json_object

    m = read_json_object(p, "embeddings manifest", "remove it or pass --overwrite")
    if m.get("format") != FORMAT:
        raise AstroptError(f"{out} is not an embeddings store (its manifest.json is of another kind); choose another "
                           "folder")
    return m


def open_embeddings(path: str | os.PathLike) -> dict:
    """The manifest of a complete embeddings store, checked as a whole; one clear error otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise AstroptError(f"embeddings store {path} does not exist")
    m = _read_manifest(path)
    if m is None:
        raise AstroptError(f"{path} is not an embeddings store: no manifest.json")
    if m.get("format_version") != FORMAT_VERSION:
        raise AstroptError(f"{path} has format version {m.get('format_version')!r}; this tool reads {FORMAT_VERSION}")
    if not m.get("complete"):
        raise AstroptError(f"embeddings store {path} is incomplete: re-run the same `astropt embed` command")
    _check_complete_manifest(m, path / "manifest.json")
    return m


def _check_complete_manifest(m: dict, path: Path) -> None:
    """Every field a reader of a complete embeddings store relies on is there with the right type and agrees
    with the others (n_embd with the checkpoint's model, layers with its depth, columns with layers and
    modalities, shard rows with store_rows); shard entries name their own files."""
    from astropt_tok.schema import Fields
    from astropt_tok.store import shard_name

    f = Fields(path, _REPAIR)
    n_embd = f.need(m, "n_embd", int, low=1)
    f.one_of(m, "dtype", DTYPES)
    f.one_of(m, "pool", POOLS)
    model = f.need(f.need(m, "checkpoint", dict), "model", dict, "checkpoint.")
    f.equal("n_embd", n_embd, model.get("n_embd"), "the width of the checkpoint's model (checkpoint.model.n_embd)")
    depth = f.need(model, "n_layer", int, "checkpoint.model.", low=1)
    tokens = f.need(m, "tokens", dict)
    f.need(tokens, "dir", str, "tokens.")
    num_rows = f.need(tokens, "num_rows", int, "tokens.", low=1)
    layers = f.need_list(m, "layers", dict)
    for i, layer in enumerate(layers):
        where = f"layers[{i}]."
        f.need(layer, "name", str, where)
        f.need(layer, "index", int, where, low=0, high=depth)
        f.need(layer, "column", str, where)
    mods = f.need_list(m, "modalities", str, unique=True) if m.get("modalities") is not None else []
    joint = [lay["column"] for lay in layers]
    want = [c for c in joint for c in [c] + ([f"{c}_{x}" for x in mods] if len(mods) > 1 else [])]
    columns = f.need_list(m, "columns", str, unique=True) if "columns" in m else joint
    f.equal("columns" if "columns" in m else "layers", columns, want,
            "a column per layer" + (", then one per modality" if len(mods) > 1 else "") + ", none twice")
    if any(c in ("row", "store_row", "object_id") for c in columns):
        raise f.fail("columns", columns, "embedding columns, not row, store_row or object_id")
    start, stop = (f.need_list(m, "store_rows", int) + [None, None])[:2]
    if len(m["store_rows"]) != 2 or not 0 <= start < stop <= num_rows:
        raise f.fail("store_rows", m["store_rows"], f"[start, stop] with 0 <= start < stop <= tokens.num_rows "
                     f"({num_rows})")
    shards = f.need(m, "shards", list)
    seen = -1
    for i, s in enumerate(shards):
        where = f"shards[{i}]."
        index = f.need(s, "index", int, where, low=0)
        f.equal(where + "file", f.need(s, "file", str, where), shard_name(index, "arrow"), "the shard of its index")
        if index <= seen:
            raise f.fail(where + "index", index, f"above the previous entry's {seen} (shards in order)")
        seen = index
        f.need(s, "rows", int, where, low=0)
        f.need(s, "sha256", str, where)
    f.equal("shards", f"{sum(s['rows'] for s in shards)} rows", f"{stop - start} rows",
            f"the rows of store_rows [{start}, {stop})")


def _shard_problem(table, m: dict) -> str | None:
    """Why a shard's table is not what the manifest describes (its columns, each embedding column a
    fixed_size_list of n_embd values of dtype), or None."""
    import pyarrow as pa

    want = ["row", "store_row", "object_id"] + embedding_columns(m)
    if table.column_names != want:
        return f"columns {table.column_names}, the manifest's layers and modalities name {want}"
    for column in embedding_columns(m):
        t = table.schema.field(column).type
        if not pa.types.is_fixed_size_list(t) or t.list_size != m["n_embd"] or \
                t.value_type != pa.from_numpy_dtype(np.dtype(m["dtype"])):
            return f"column {column} is {t}; the manifest says n_embd {m['n_embd']}, dtype {m['dtype']}"
    return None


def embedding_columns(manifest: dict) -> list[str]:
    """The embedding columns of an embeddings store: one per layer, and with a model of several modalities the
    joint one followed by one per modality for each layer."""
    return manifest.get("columns") or [lay["column"] for lay in manifest["layers"]]


def read_embeddings(path: str | os.PathLike, column: str | None = None) -> tuple[np.ndarray, np.ndarray, list]:
    """(embeddings [N, C] float32, source rows [N], object ids [N]) of a complete store; `column` defaults to the
    first layer's."""
    import pyarrow as pa

    path = Path(path)
    m = open_embeddings(path)
    column = column or m["layers"][0]["column"]
    if column not in embedding_columns(m):
        raise AstroptError(f"{path} has no column {column!r} (it has {', '.join(embedding_columns(m))})")
    embs, rows, ids = [], [], []
    for s in m["shards"]:
        try:
            with pa.memory_map(str(path / s["file"])) as src:
                table = pa.ipc.open_stream(src).read_all()
        except (OSError, pa.ArrowInvalid) as exc:
            raise AstroptError(f"embeddings shard {path / s['file']} is unreadable ({exc}); run "
                               f"`astropt embed --verify {path}`") from None
        problem = _shard_problem(table, m)
        if problem:  # a manifest that does not describe its shards (edited, or another store's)
            from astropt_tok.schema import DamagedFile

            raise DamagedFile(f"{path / 'manifest.json'} is damaged: {s['file']} holds {problem}; {_REPAIR}")
        embs.append(_column_rows(table, column, m["n_embd"]))
        rows.append(table.column("row").to_numpy())
        ids.extend(table.column("object_id").to_pylist())
    n = m["n_embd"]
    return (np.concatenate(embs) if embs else np.zeros((0, n), np.float32),
            np.concatenate(rows) if rows else np.zeros(0, np.int64), ids)


def _column_rows(table, column: str, n_embd: int) -> np.ndarray:
    """An embedding column -> [rows, n_embd] float32, NaN rows where the entry is null (a missing image)."""
    values = table.column(column).combine_chunks()
    out = np.full((table.num_rows, n_embd), np.nan, dtype=np.float32)
    real = ~values.is_null().to_numpy(zero_copy_only=False)
    out[real] = values.flatten().to_numpy(zero_copy_only=False).reshape(-1, n_embd)
    return out


def _write_shard(out: Path, index: int, rows: np.ndarray, store_rows: np.ndarray, ids: list,
                 columns: dict[str, np.ndarray], dtype: str):
    import pyarrow as pa

    from astropt_tok.atomic import atomic_file
    from astropt_tok.store import ShardRecord, path_bytes, sha256_path, shard_name

    final = out / shard_name(index, "arrow")
    cols = {"row": pa.array(rows, type=pa.int64()), "store_row": pa.array(store_rows, type=pa.int64()),
            "object_id": pa.array(ids, type=pa.string())}
    for name, emb in columns.items():  # emb [n, C]; a NaN row (nothing to pool) is written as null
        flat = pa.array(np.ascontiguousarray(emb, dtype=dtype).reshape(-1))
        missing = np.isnan(emb).all(axis=1)
        cols[name] = pa.FixedSizeListArray.from_arrays(flat, emb.shape[1],
                                                       mask=pa.array(missing) if missing.any() else None)
    table = pa.table(cols)
    with atomic_file(final) as tmp:  # a full or read-only disk: one error, no temporary left
        with open(tmp, "wb") as f:
            with pa.ipc.new_stream(f, table.schema) as writer:
                writer.write_table(table, max_chunksize=max(1, table.num_rows))
    return ShardRecord(index, final.name, int(len(rows)), 0, sha256_path(final), path_bytes(final))


def _plan(store, start: int, stop: int) -> list[tuple[int, int, int]]:
    """(token shard, first local row, end local row) of every shard that meets store rows [start, stop)."""
    plan = []
    for i in range(len(store.shards)):
        a, b = max(start, int(store.offsets[i])), min(stop, int(store.offsets[i + 1]))
        if a < b:
            plan.append((i, a - int(store.offsets[i]), b - int(store.offsets[i])))
    return plan


def _row_range(cfg: EmbedConfig, num_rows: int) -> tuple[int, int]:
    start, stop = 0, num_rows
    if cfg.rows:
        try:
            a, _, b = cfg.rows.partition(":")
            start = int(a) if a.strip() else 0
            stop = int(b) if b.strip() else num_rows
        except ValueError:
            raise AstroptError(f"--rows {cfg.rows!r}: give a range A:B of store rows") from None
        if ":" not in cfg.rows:
            stop = start + 1
    if not 0 <= start < stop <= num_rows:
        raise AstroptError(f"--rows {cfg.rows}: the store has rows 0..{num_rows - 1}")
    if cfg.limit is not None:
        stop = min(stop, start + cfg.limit)
    return start, stop


def _check_options(cfg: EmbedConfig) -> None:
    if cfg.pool not in POOLS:
        raise AstroptError(f"--pool must be one of {', '.join(POOLS)}, got {cfg.pool!r}")
    if cfg.dtype not in DTYPES:
        raise AstroptError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.batch_size < 1:
        raise AstroptError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.limit is not None and cfg.limit < 1:
        raise AstroptError(f"--limit must be at least 1, got {cfg.limit}")


def embed(cfg: EmbedConfig) -> EmbedResult:
    """Embed the chosen rows of a token store with a checkpoint into an embeddings store (resumable per shard)."""
    with ExitStack() as held:  # held: the embeddings folder's lock, released on return
        return _embed(cfg, held)


def _embed(cfg: EmbedConfig, held: ExitStack) -> EmbedResult:
    import torch

    from astropt_tok.artifacts import check_model_store
    from astropt_tok.executor import resolve_device
    from astropt_tok.store import TokenStore, manifest_sha256, mark_shard_done, read_done_records, write_manifest
    from astropt_train.use.interop import load_any_model

    _check_options(cfg)
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    model, info = load_any_model(cfg.checkpoint, step=cfg.step, device=device)
    if cfg.random_init_seed is not None:  # same shape, fresh weights: the probe's random-init baseline
        from astropt_train.model import GPT

        torch.manual_seed(cfg.random_init_seed)
        model = GPT(model.config).to(device).eval()
    store_dir = cfg.tokens if cfg.tokens is not None else (info.get("store") or {}).get("dir")
    if store_dir is None:
        raise AstroptError("pass the token store with --tokens DIR")
    if cfg.tokens is None and not Path(store_dir).exists():
        raise AstroptError(f"the checkpoint's token store {store_dir} is not here: pass --tokens DIR")
    store = TokenStore(store_dir)
    store_sha = manifest_sha256(store.dir)
    # a model of several image columns sees each galaxy as their token blocks in its order, one after another
    modalities = list(getattr(model.config, "modalities", None) or [])
    # before any work: the store holds tokens of the codec, modalities and bands the checkpoint was trained on
    # (a random-init baseline takes the checkpoint's shape and so reads the store as it would)
    for note in check_model_store(f"checkpoint {info['path']}", info.get("store"), modalities, store, store_sha):
        print(note, file=sys.stderr)
    if len(modalities) > 1 and not set(modalities) <= set(store.modalities):
        raise AstroptError(f"{cfg.checkpoint} models image columns {', '.join(modalities)}; store {store.dir} holds "
                           f"{', '.join(store.modalities) or 'one unnamed column'}")
    # each block's length: the store's tokens of that column (images 576, a scalar 1, a spectrum 273)
    lengths = [store.modality_tokens[m] for m in modalities] if len(modalities) > 1 else [store.tokens_per_image]
    if len(modalities) > 1:  # a block per column, each as long and of as many codes as the model learned it
        for m, length, want_length, vocab in zip(modalities, lengths, model.lengths, model.vocabs):
            if length != want_length or store.modality_vocab[m] > vocab:
                raise AstroptError(f"{cfg.checkpoint} learned {m} as {want_length} tokens of {vocab} codes; store "
                                   f"{store.dir} holds {length} tokens of {store.modality_vocab[m]} codes")
    elif lengths[0] > model.config.block_size:
        raise AstroptError(f"{cfg.checkpoint} has {model.config.block_size} positions, fewer than the "
                           f"{lengths[0]} tokens per galaxy of store {store.dir}")
    elif store.vocab_size > model.config.vocab_size:
        raise AstroptError(f"{cfg.checkpoint} knows {model.config.vocab_size} tokens, fewer than the vocabulary of "
                           f"{store.vocab_size} of store {store.dir}")
    layers = parse_layers(cfg.layers, model.config.n_layer)
    # several modalities: per layer the joint embedding (`embedding`), then one per modality (`embedding_<name>`)
    blocks = len(modalities) if len(modalities) > 1 else 1
    columns = [c for lay in layers
               for c in [lay["column"]] + ([f"{lay['column']}_{m}" for m in modalities] if blocks > 1 else [])]
    start, stop = _row_range(cfg, store.num_rows)
    plan = _plan(store, start, stop)

    out = Path(cfg.out)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "complete": False,
        "checkpoint": {**{k: info[k] for k in ("kind", "path", "step", "weights_sha256")},
                       "model": info["model"], "random_init_seed": cfg.random_init_seed},
        "tokens": {"dir": str(store.dir.resolve()), "manifest_sha256": store_sha,
                   "num_rows": store.num_rows, "codec_id": store.codec_id},
        "modalities": modalities or None, "store_rows": [start, stop], "pool": cfg.pool, "layers": layers,
        "n_embd": model.config.n_embd,
        **({"columns": columns} if len(modalities) > 1 else {}),
        "dtype": cfg.dtype, "planned_shards": [i for i, _, _ in plan],
    }
    lineage = {"checkpoint": {"path": info["path"], "weights_sha256": info["weights_sha256"],
                              "random_init_seed": cfg.random_init_seed},
               "store": {"dir": manifest["tokens"]["dir"], "manifest_sha256": manifest["tokens"]["manifest_sha256"]}}
    # claimed before anything is written (another kind of folder, or files no command made, is refused even with
    # --overwrite), under its lock: a second `astropt embed --out` here is refused until this one ends
    held.enter_context(output_folder(out, "embeddings", "`astropt embed`", lineage=lineage))
    old = _read_manifest(out)
    if old is not None and any(old.get(k) != manifest[k] for k in IDENTITY_KEYS):
        if not cfg.overwrite:
            diff = [k for k in IDENTITY_KEYS if old.get(k) != manifest[k]]
            raise AstroptError(f"{out} holds embeddings made with another {', '.join(diff)}; pass --overwrite "
                               "to replace them, or choose another --out")
        clear_own(out, "embeddings")  # an embeddings store's own files: never the lock, the record or a stranger's
        old = None
    if old is None or not old.get("complete"):
        write_manifest(out, manifest)
    update_lineage(out, **lineage)  # what the store holds now (a replaced, or older, store recorded)

    done = read_done_records(out, len(store.shards))
    todo = [p for p in plan if p[0] not in done]
    rows_done, loader_s = 0, 0.0
    cuda = device.startswith("cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) \
        if cuda else None
    total = sum(b - a for _, a, b in todo)
    bar = _progress(cfg.progress and total > 0, total)
    try:
        for index, a, b in todo:
            if len(modalities) > 1:  # [rows, M * T]
                tokens = np.concatenate([np.asarray(store.shard_tokens(index, modality=m)[a:b]) for m in modalities], 1)
            else:  # [rows, T], a zero-copy view (a model of one of several columns: that column)
                tokens = store.shard_tokens(index, modality=modalities[0] if modalities else None)[a:b]
            valid = None  # [rows, M] bool: which images each galaxy has (a --keep-partial store)
            if store.partial:  # a model of one unnamed column (upstream's) reads the first: its rows may lack it too
                has = store.valid(np.arange(a, b) + int(store.offsets[index]))
                valid = np.stack([has[m] for m in modalities or store.modalities[:1]], axis=1)
            parts: list[list[np.ndarray]] = [[] for _ in columns]
            # read a few batches ahead of the model; closed (its thread stopped) also when a batch fails
            with Prefetch(_token_batches(tokens, cfg.batch_size, cuda, valid), depth=3,
                          name="astropt-embed-reader") as reader:
                for batch, batch_valid in reader:
                    batch = batch.to(device, non_blocking=True)
                    if batch_valid is not None:
                        batch_valid = batch_valid.to(device)
                    with amp if amp is not None else nullcontext():
                        pooled = embed_batch(model, batch, layers, cfg.pool, blocks, batch_valid, lengths)
                    for k, p in enumerate(pooled):
                        parts[k].append(p.float().cpu().numpy())
                    if bar is not None:
                        bar.update(bar.task_ids[0], advance=batch.shape[0])
            loader_s += reader.wait_s
            ids = store.shard_object_ids(index)
            arrays = {column: np.concatenate(parts[k]) for k, column in enumerate(columns)}
            _refuse_non_finite(arrays, _pooled_modality(columns, layers, modalities), valid, cfg, index)
            record = _write_shard(
                out, index, store.shard_source_rows(index)[a:b], np.arange(a, b) + int(store.offsets[index]),
                ids[a:b] if ids is not None else [None] * (b - a), arrays, cfg.dtype)
            mark_shard_done(out, record, [])
            rows_done += b - a
    finally:
        if bar is not None:
            bar.stop()
    final = _finalize(out, manifest)
    return EmbedResult(out=out, rows=stop - start, shards_written=len(todo), shards_skipped=len(plan) - len(todo),
                       seconds=time.perf_counter() - t_start, rows_embedded=rows_done, loader_seconds=loader_s,
                       manifest=final)


def _pooled_modality(columns: list[str], layers: list[dict], modalities: list[str]) -> dict[str, int | None]:
    """{column: index of the modality it pools alone, or None for a joint column (every galaxy has one)}."""
    per = {f"{lay['column']}_{m}": k for lay in layers for k, m in enumerate(modalities)} if len(modalities) > 1 else {}
    return {c: per.get(c) for c in columns}


def _refuse_non_finite(arrays: dict[str, np.ndarray], pooled: dict[str, int | None], valid, cfg, index: int) -> None:
    """One error, before the shard is written, when an embedding that should exist is not finite: a joint column's
    where the galaxy has an image the model reads, a per-modality column's where it has that image. Only a
    missing image's entry may be empty (NaN here, null on disk); anything else would be written as a null or
    NaN row that looks like a galaxy without the image, or a number that is none."""
    for column, emb in arrays.items():  # emb [rows, C] float32
        k = pooled[column]
        if valid is None:  # every galaxy has every image the model reads
            should = np.ones(len(emb), bool)
        else:  # a joint column: a galaxy with any of them (a one-column model: with that one); else with its own
            should = valid.any(axis=1) if k is None else valid[:, k]
        with np.errstate(over="ignore"):
            stored = emb.astype(cfg.dtype)  # float16 overflows to inf above 65504
        bad = should & ~np.isfinite(stored).all(axis=1)
        if bad.any():
            how = (f"in {cfg.dtype} (values beyond its range): use --dtype float32"
                   if np.isfinite(emb[bad]).all() else
                   "its activations overflowed or its weights are damaged: use another checkpoint")
            raise AstroptError(f"{cfg.checkpoint} gives non-finite embeddings in column {column} for {int(bad.sum())} "
                               f"of {len(emb)} galaxies of token shard {index}, {how}")


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]embed"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    bar.add_task("embed", total=total)
    bar.start()
    return bar


def _finalize(out: Path, manifest: dict) -> dict:
    """Write the complete manifest (shards in order) once every planned shard is done."""
    from astropt_tok.store import read_done_records, write_manifest

    done = read_done_records(out, max(manifest["planned_shards"], default=-1) + 1)
    missing = [i for i in manifest["planned_shards"] if i not in done]
    if missing:
        raise AstroptError(f"{out}: shards {missing[:5]} are not done; re-run the same command")
    final = dict(manifest, complete=True, shards=[done[i]["shard"] for i in manifest["planned_shards"]])
    write_manifest(out, final)
    return final


def verify_embeddings(path: str | os.PathLike) -> list[str]:
    """Re-hash every shard against the manifest and check its columns, row count and finiteness; one line per
    problem (empty when sound)."""
    import pyarrow as pa

    from astropt_tok.store import shard_hash_problem

    from astropt_tok.schema import DamagedFile

    path = Path(path)
    try:
        m = open_embeddings(path)
    except DamagedFile as exc:  # what every reader would refuse: reported, as a bad shard is
        return [f"manifest.json: {exc}"]
    problems = []
    joint = {lay["column"] for lay in m["layers"]}
    for s in m["shards"]:
        problem = shard_hash_problem(path, s)
        if problem:
            problems.append(problem)
            continue
        p = path / s["file"]
        try:
            with pa.memory_map(str(p)) as src:
                table = pa.ipc.open_stream(src).read_all()
        except (OSError, pa.ArrowInvalid) as exc:
            problems.append(f"{s['file']}: unreadable ({exc})")
            continue
        problem = _shard_problem(table, m) or (f"{table.num_rows} rows, the manifest says {s['rows']}"
                                               if table.num_rows != s["rows"] else None)
        if problem:
            problems.append(f"{s['file']}: {problem} (manifest {path / 'manifest.json'})")
            continue
        for column in embedding_columns(m):
            values = table.column(column).combine_chunks()
            vals = values.flatten().to_numpy(zero_copy_only=False)
            real = s["rows"] - values.null_count  # null: a galaxy lacking the image this column pools
            if vals.size != real * m["n_embd"] or not np.isfinite(vals).all():
                problems.append(f"{s['file']}: column {column} is not {s['rows']} finite rows of {m['n_embd']}")
            elif values.null_count and column in joint:
                why = _joint_nulls_problem(m, table, values)
                if why:
                    problems.append(f"{s['file']}: column {column} has {values.null_count} null rows, {why}")
    return problems


def _joint_nulls_problem(m: dict, table, values) -> str | None:
    """Why null rows in a joint (layer) column are wrong, or None where each is a galaxy lacking the one image
    the model reads. Nulls belong to a missing image: a per-modality column's, or, for a model of one column
    embedding a --keep-partial store, the joint column's where the row lacks that column. Anything else is what a
    model with non-finite weights or activations wrote (an all-null store that used to verify)."""
    from astropt_tok.store import TokenStore

    again = "a model with non-finite weights or activations writes these: embed again"
    if len(m.get("modalities") or []) > 1:
        return f"but every galaxy has at least one image; {again}"
    store_dir = Path((m.get("tokens") or {}).get("dir") or "")
    if not (store_dir / "manifest.json").is_file():
        return f"and the token store {store_dir} that would show which galaxies lack the image is not here"
    try:
        store = TokenStore(store_dir)
    except AstroptError as exc:
        return f"and the token store that would show which galaxies lack the image is unreadable ({exc})"
    if not store.partial:
        return f"but its token store {store_dir} holds every image of every galaxy; {again}"
    name = (m.get("modalities") or store.modalities[:1])[0]
    null_rows = table.column("store_row").to_numpy()[values.is_null().to_numpy(zero_copy_only=False)]
    if null_rows.size and ((null_rows < 0) | (null_rows >= store.num_rows)).any():
        return f"at rows outside token store {store_dir}"
    has = store.valid(null_rows)[name]
    if has.any():
        return f"{int(has.sum())} of them galaxies that have {name} in {store_dir}; {again}"
    return None
