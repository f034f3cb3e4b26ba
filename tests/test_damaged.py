"""Damaged or hand-edited files, field by field, through every command that reads them.

Each file kind the tool reads back (a token store's manifest, a checkpoint's config.json, a run's config.json,
trainer_state.pt, metrics.jsonl, an embeddings manifest) is damaged one field at a time: missing, of the wrong
type, out of range, inconsistent with the other fields or with the shards and weights it describes, not UTF-8,
not a JSON object. Every reader refuses it with exactly one `error:` line naming the file and the field, and
exit 1; `astropt verify` reports it as BAD lines and exit 1. Then export's round trip (it writes only what it
can load back, each modality under its own name) and a ckpt.pt left in a run folder.

Everything runs in this process through `astropt_tok.cli.main(argv)`, on stores and runs made once for the
module (test_hostile_use's) and copied per case.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from test_hostile import assert_one_error, run_cli
from test_hostile_use import PROBE, TWO_COLUMNS, made  # noqa: F401 (a fixture)

# ---------------------------------------------------------------------------------------------------------
# fixtures: besides test_hostile_use's store/mstore/run/mrun/emb, a --keep-partial store and a model of one
# column (hsc_image) of the two-column store


@pytest.fixture(scope="module")
def more(made, tmp_path_factory, codec_dir):
    """{"pstore": a two-column --keep-partial store, "srun": a model of hsc_image alone trained on mstore}."""
    from astropt_tok.tokenise import TokeniseConfig, parse_columns, tokenise
    from astropt_train.config import build_config
    from astropt_train.loop import train

    base = tmp_path_factory.mktemp("damaged")
    single, bands, modalities = parse_columns(TWO_COLUMNS[1::2], None)
    tokenise(TokeniseConfig(source=str(made["survey"]), out=str(base / "pstore"), shards=2, codec=str(codec_dir),
                            batch_size=20, device="cpu", progress=False, column=single, bands=bands,
                            modalities=modalities, keep_partial=True))
    train(build_config(dict(tokens=str(made["mstore"]), out=str(base / "srun"), device="cpu", max_iters=2,
                            batch_size=4, eval_interval=2, eval_iters=1, log_interval=1, val_images=0,
                            preset="tiny", live=False, modalities="hsc_image")))
    return {"pstore": base / "pstore", "srun": base / "srun"}


def copy_of(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def edited(change):
    """A damage: load the JSON file, let `change` edit the object, write it back."""
    def apply(path: Path):
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return apply


def raw(data: bytes):
    """A damage: replace the whole file with `data`."""
    return lambda path: path.write_bytes(data)


NOT_UTF8 = raw(b'{"format": "astropt-token-store", "note": "\xff\xfe"}')
NOT_OBJECT = raw(b"[1, 2, 3]")


def refused(code: int, err: str, command: str, *words) -> None:
    """Exactly one `error:` line naming every word, exit 1; for verify, BAD lines (the first naming them)."""
    if command.startswith("verify") or command == "embed --verify":
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 1 and lines and all(line.startswith("BAD ") for line in lines), err
        assert all(str(w) in lines[0] for w in words), (words, lines[0])
        return
    assert code == 1, err
    assert_one_error(code, err, *words)


# ---------------------------------------------------------------------------------------------------------
# the token store's manifest


def _set(obj, path, value):
    *head, last = path
    for key in head:
        obj = obj[key]
    obj[last] = value


def setting(*path_value):
    """A damage: set obj[path...] = value (path as a tuple of keys)."""
    *path, value = path_value
    return edited(lambda m: _set(m, path, value))


def _swap_first_rows(m):
    s = m["shards"][0]
    s["first_row"], s["last_row"] = s["last_row"], s["first_row"]


def _one_modality_store(m):  # a one-column store's manifest made to claim a named modality
    m.update(format_version=3, keep_partial=False,
             modalities=[{"name": "legacysurvey_image", "column": "legacysurvey_image", "bands": m["bands"]}])


TOKEN_MANIFEST = {  # name: (store, damage, words the error names beside manifest.json)
    "not UTF-8": ("store", NOT_UTF8, ["not UTF-8"]),
    "not an object": ("store", NOT_OBJECT, ["not a JSON object"]),
    "complete a string": ("store", setting("complete", "yes"), ["complete"]),
    "codec missing": ("store", edited(lambda m: m.pop("codec")), ["codec"]),
    "vocab_size 0": ("store", setting("vocab_size", 0), ["vocab_size"]),
    "vocab_size a string": ("store", setting("vocab_size", "4375"), ["vocab_size"]),
    "codec vocab disagrees": ("store", setting("codec", "vocab_size", 17), ["codec.vocab_size"]),
    "tokens_per_image negative": ("store", setting("tokens_per_image", -576), ["tokens_per_image"]),
    "dtype against the vocabulary": ("store", setting("dtype", "uint16"), ["dtype"]),
    "bands empty": ("store", setting("bands", []), ["bands"]),
    "bands of numbers": ("store", setting("bands", [1, 2]), ["bands"]),
    "storage unknown": ("store", setting("storage", "parquet"), ["storage"]),
    "source file path a number": ("store", setting("source", "files", 0, "path", 3), ["source.files[0].path"]),
    "num_shards 0": ("store", setting("sharding", "num_shards", 0), ["sharding.num_shards"]),
    "shard rows negative": ("store", setting("shards", 0, "rows", -1), ["shards[0].rows"]),
    "shard sha256 not hex": ("store", setting("shards", 0, "sha256", "xyz"), ["shards[0].sha256"]),
    "shard rows reversed": ("store", edited(_swap_first_rows), ["shards[0].first_row"]),
    "shard token range reversed": ("store", setting("shards", 1, "token_min", 10**4), ["shards[1].token_min"]),
    "totals disagree": ("store", setting("totals", "rows", 41), ["totals.rows"]),
    "version 3 without modalities": ("store", setting("format_version", 3), ["modalities"]),
    "keep_partial without modalities": ("store", setting("keep_partial", True), ["keep_partial"]),
    "modalities missing": ("mstore", edited(lambda m: m.pop("modalities")), ["modalities"]),
    "modalities a string": ("mstore", setting("modalities", "hsc_image"), ["modalities"]),
    "modality name a number": ("mstore", setting("modalities", 0, "name", 5), ["modalities[0].name"]),
    "modality names repeated": ("mstore", setting("modalities", 1, "name", "legacysurvey_image"),
                                ["modalities[1].name"]),
    "modality named tokens": ("mstore", setting("modalities", 1, "name", "tokens"), ["modalities[1].name"]),
    "modality column missing": ("mstore", edited(lambda m: m["modalities"][1].pop("column")),
                                ["modalities[1].column"]),
    "modality bands empty": ("mstore", setting("modalities", 1, "bands", []), ["modalities[1].bands"]),
    "keep_partial a string": ("mstore", setting("keep_partial", "no"), ["keep_partial"]),
    "version 2 with modalities": ("mstore", setting("format_version", 2), ["format_version"]),
    "bands not the first modality's": ("mstore", edited(lambda m: m.update(bands=m["modalities"][1]["bands"])),
                                       ["bands"]),
    # consistent in itself, but not what the shards hold
    "a modality dropped": ("mstore", edited(lambda m: m.update(modalities=m["modalities"][:1])), ["modalities"]),
    "a modality renamed": ("mstore", edited(lambda m: m["modalities"][1].update(name="hsc_x", column="hsc_x")),
                           ["modalities"]),
    "keep_partial on full shards": ("mstore", setting("keep_partial", True), ["keep_partial"]),
    "keep_partial off on partial shards": ("pstore", setting("keep_partial", False), ["keep_partial"]),
    "one column claims a modality": ("store", edited(_one_modality_store), ["modalities"]),
}
MODEL_OF = {"store": "run", "mstore": "mrun", "pstore": "mrun"}
STORE_COMMANDS = ["verify", "info", "train", "decode", "embed"]


@pytest.mark.parametrize("command", STORE_COMMANDS)
@pytest.mark.parametrize("case", list(TOKEN_MANIFEST))
def test_damaged_token_manifest(case, command, made, more, capsys, tmp_path):
    which, damage, words = TOKEN_MANIFEST[case]
    paths = {**made, **more}
    store = copy_of(paths[which], tmp_path / "store")
    damage(store / "manifest.json")
    out = tmp_path / "out"
    argv = {"verify": ["verify", store], "info": ["info", store],
            "train": ["train", "--tokens", store, "--out", out, "--device", "cpu", "--max-iters", "1",
                      "--batch-size", "4", "--val-images", "0", "--preset", "tiny"],
            "decode": ["decode", "--tokens", store, "--rows", "0", "--out", out / "d.png", "--device", "cpu"],
            "embed": ["embed", "--checkpoint", paths[MODEL_OF[which]], "--tokens", store, "--out", out,
                      "--device", "cpu"]}[command]
    code, _, err = run_cli(argv, capsys)
    refused(code, err, command, store / "manifest.json", *words)
    written = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".astropt")] if out.exists() else []
    assert not written, written


def test_the_intact_stores_are_sound(made, more, capsys):
    """The matrix's stores verify OK as made (so every BAD above comes from its damage)."""
    for store in (made["store"], made["mstore"], more["pstore"]):
        code, out, err = run_cli(["verify", store], capsys)
        assert code == 0 and out.startswith("OK"), err


# ---------------------------------------------------------------------------------------------------------
# a checkpoint's config.json


def _model(key, value):
    return setting("model", key, value)


CHECKPOINT_CONFIG = {  # name: (run, damage, words)
    "not UTF-8": ("run", NOT_UTF8, ["not UTF-8"]),
    "not an object": ("run", NOT_OBJECT, ["not a JSON object"]),
    "format_version 2": ("run", setting("format_version", 2), ["format_version"]),
    "step not its folder's": ("run", setting("step", 5), ["step"]),
    "step negative": ("run", setting("step", -2), ["step"]),
    "val_loss a string": ("run", setting("val_loss", "low"), ["val_loss"]),
    "vocab_size 0": ("run", setting("vocab_size", 0), ["vocab_size"]),
    "tokens_per_image a string": ("run", setting("tokens_per_image", "576"), ["tokens_per_image"]),
    "store a list": ("run", setting("store", []), ["store"]),
    "store dir a number": ("run", setting("store", "dir", 5), ["store.dir"]),
    "train a list": ("run", setting("train", []), ["train"]),
    "max_iters 0": ("run", setting("train", "max_iters", 0), ["train.max_iters"]),
    "model missing": ("run", edited(lambda c: c.pop("model")), ["model"]),
    "unknown head": ("run", _model("head", "mlp"), ["model.head"]),
    "dropout 5": ("run", _model("dropout", 5.0), ["model.dropout"]),
    "dropout negative": ("run", _model("dropout", -0.1), ["model.dropout"]),
    "dropout a string": ("run", _model("dropout", "none"), ["model.dropout"]),
    "n_layer 0": ("run", _model("n_layer", 0), ["model.n_layer"]),
    "n_head a string": ("run", _model("n_head", "2"), ["model.n_head"]),
    "n_embd not a multiple of n_head": ("run", _model("n_embd", 65), ["model.n_embd"]),
    "bias a string": ("run", _model("bias", "no"), ["model.bias"]),
    "unknown model field": ("run", _model("rotary", True), ["model.rotary"]),
    "vocab below the store's": ("run", _model("vocab_size", 100), ["model.vocab_size"]),
    "block below tokens per image": ("run", _model("block_size", 100), ["model.block_size"]),
    "modalities a string": ("run", _model("modalities", "hsc_image"), ["model.modalities"]),
    "modalities without room": ("run", _model("modalities", ["legacysurvey_image", "hsc_image"]),
                                ["model.block_size"]),
    "modalities repeated": ("mrun", _model("modalities", ["hsc_image", "hsc_image"]), ["model.modalities"]),
}
CKPT_COMMANDS = ["decode", "embed", "export", "train --resume", "train --init-from"]


@pytest.mark.parametrize("command", CKPT_COMMANDS)
@pytest.mark.parametrize("case", list(CHECKPOINT_CONFIG))
def test_damaged_checkpoint_config(case, command, made, capsys, tmp_path):
    which, damage, words = CHECKPOINT_CONFIG[case]
    run = copy_of(made[which], tmp_path / "run")
    store = made["store" if which == "run" else "mstore"]
    ckpt = next((run / "checkpoints").glob("step-*"))
    damage(ckpt / "config.json")
    before = (ckpt / "config.json").read_bytes()
    out = tmp_path / "out"
    train = ["train", "--tokens", store, "--device", "cpu", "--max-iters", "4", "--batch-size", "4",
             "--val-images", "0"]
    argv = {"decode": ["decode", "--checkpoint", run, "--tokens", store, "--rows", "0", "--predict", "--out",
                       out / "d.png", "--device", "cpu"],
            "embed": ["embed", "--checkpoint", run, "--tokens", store, "--out", out, "--device", "cpu"],
            "export": ["export", run, "--astropt", out],
            "train --resume": [*train, "--out", run, "--resume"],
            "train --init-from": [*train, "--out", out, "--init-from", run]}[command]
    code, _, err = run_cli(argv, capsys)
    refused(code, err, command, ckpt / "config.json", *words)
    assert (ckpt / "config.json").read_bytes() == before
    assert not list((run / "checkpoints").glob("step-0000000[34]"))  # resume wrote nothing
    written = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".astropt")] if out.exists() else []
    assert not written, written


# ---------------------------------------------------------------------------------------------------------
# the run's own config.json and metrics.jsonl (read by `astropt runs`)


RUN_FILES = {  # name: (file, damage, words)
    "config not UTF-8": ("config.json", NOT_UTF8, ["config.json", "not UTF-8"]),
    "config not an object": ("config.json", NOT_OBJECT, ["config.json", "not a JSON object"]),
    "config not JSON": ("config.json", raw(b'{"model": '), ["config.json", "not JSON"]),
    "config max_iters a string": ("config.json", setting("train", "max_iters", "many"), ["train.max_iters"]),
    "config train a list": ("config.json", setting("train", [1]), ["train"]),
    "config unknown head": ("config.json", _model("head", "mlp"), ["model.head"]),
    "config dropout 5": ("config.json", _model("dropout", 5.0), ["model.dropout"]),
    "config vocab_size missing": ("config.json", edited(lambda c: c.pop("vocab_size")), ["vocab_size"]),
    "metrics not UTF-8": ("metrics.jsonl", raw(b'{"step": 1, "loss": 2.0}\n\xff\xfe\n{"step": 2}\n'),
                          ["metrics.jsonl", "not UTF-8"]),
    "metrics line not an object": ("metrics.jsonl", raw(b'[1]\n{"step": 2}\n'), ["metrics.jsonl", "line 1"]),
    "metrics step a string": ("metrics.jsonl", raw(b'{"step": "1", "loss": 2.0}\n{"step": 2}\n'),
                              ["metrics.jsonl", "line 1"]),
    "metrics loss a list": ("metrics.jsonl", raw(b'{"step": 1, "loss": [2.0]}\n{"step": 2}\n'),
                            ["metrics.jsonl", "line 1"]),
}


@pytest.mark.parametrize("case", list(RUN_FILES))
def test_damaged_run_files_for_runs(case, made, capsys, tmp_path):
    name, damage, words = RUN_FILES[case]
    run = copy_of(made["run"], tmp_path / "run")
    damage(run / name)
    code, _, err = run_cli(["runs", run, "--out", tmp_path / "curves.png"], capsys)
    refused(code, err, "runs", run, *words)
    assert not (tmp_path / "curves.png").exists()


def test_runs_reads_the_intact_run(made, capsys, tmp_path):
    code, out, err = run_cli(["runs", made["run"], made["mrun"]], capsys)
    assert code == 0 and "2/2" in out, err


# ---------------------------------------------------------------------------------------------------------
# trainer_state.pt (read by `train --resume`)


def _state_edit(change):
    def apply(path: Path):
        state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, path)
    return apply


TRAINER_STATE = {  # name: (damage, words)
    "not a dict": (lambda p: torch.save([1, 2], p), ["the whole file"]),
    "step not its folder's": (_state_edit(lambda s: s.update(step=7)), ["step"]),
    "optimizer missing": (_state_edit(lambda s: s.pop("optimizer")), ["optimizer"]),
    "optimizer without param_groups": (_state_edit(lambda s: s["optimizer"].update(param_groups=[])),
                                       ["optimizer.param_groups"]),
    "param_groups params of strings": (_state_edit(lambda s: s["optimizer"]["param_groups"][0].update(
        params=["a"])), ["optimizer.param_groups[0].params"]),
    "rng state of floats": (_state_edit(lambda s: s["rng"]["per_rank"][0].update(torch=torch.zeros(3))),
                            ["rng.per_rank[0].torch"]),
    "rng per_rank empty": (_state_edit(lambda s: s["rng"].update(per_rank=[])), ["rng.per_rank"]),
    "data batch_size 0": (_state_edit(lambda s: s["data"].update(batch_size=0)), ["data.batch_size"]),
    "data epoch missing": (_state_edit(lambda s: s["data"].pop("epoch")), ["data.epoch"]),
    "best_val_loss nan": (_state_edit(lambda s: s.update(best_val_loss=float("nan"))), ["best_val_loss"]),
    "best_val_loss a string": (_state_edit(lambda s: s.update(best_val_loss="low")), ["best_val_loss"]),
}


@pytest.mark.parametrize("case", list(TRAINER_STATE))
def test_damaged_trainer_state(case, made, capsys, tmp_path):
    damage, words = TRAINER_STATE[case]
    run = copy_of(made["run"], tmp_path / "run")
    ckpt = next((run / "checkpoints").glob("step-*"))
    damage(ckpt / "trainer_state.pt")
    code, _, err = run_cli(["train", "--tokens", made["store"], "--out", run, "--resume", "--device", "cpu",
                            "--max-iters", "4", "--batch-size", "4", "--val-images", "0"], capsys)
    refused(code, err, "train", ckpt / "trainer_state.pt", *words)
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == [ckpt.name]


# ---------------------------------------------------------------------------------------------------------
# the embeddings manifest


def _both_n_embd(m):  # consistent with the checkpoint it records, not with the shards
    m["n_embd"] = m["checkpoint"]["model"]["n_embd"] = 32


EMBEDDINGS = {  # name: (damage, words)
    "not UTF-8": (raw(b'{"format": "astropt-embeddings", "\xff": 1}'), ["not UTF-8"]),
    "not an object": (NOT_OBJECT, ["not a JSON object"]),
    "n_embd against the checkpoint": (setting("n_embd", 32), ["n_embd"]),
    "n_embd against the shards": (edited(_both_n_embd), ["n_embd"]),
    "dtype against the shards": (setting("dtype", "float16"), ["dtype"]),
    "dtype unknown": (setting("dtype", "int8"), ["dtype"]),
    "pool unknown": (setting("pool", "max"), ["pool"]),
    "layer past the model": (setting("layers", 0, "index", 99), ["layers[0].index"]),
    "columns not the layers'": (setting("columns", ["embedding", "embedding_x"]), ["columns"]),
    "store_rows reversed": (setting("store_rows", [30, 10]), ["store_rows"]),
    "shard rows disagree": (setting("shards", 0, "rows", 3), ["shards"]),
    "shard index a string": (setting("shards", 0, "index", "0"), ["shards[0].index"]),
    "modalities a string": (setting("modalities", "hsc_image"), ["modalities"]),
    "tokens missing": (edited(lambda m: m.pop("tokens")), ["tokens"]),
}


@pytest.mark.parametrize("command", ["verify", "embed --verify", "probe"])
@pytest.mark.parametrize("case", list(EMBEDDINGS))
def test_damaged_embeddings_manifest(case, command, made, capsys, tmp_path):
    damage, words = EMBEDDINGS[case]
    emb = copy_of(made["emb"], tmp_path / "emb")
    damage(emb / "manifest.json")
    out = tmp_path / "out"
    argv = {"verify": ["verify", emb], "embed --verify": ["embed", "--verify", emb],
            "probe": [PROBE[0], PROBE[1], emb, "--labels", made["labels"] / "labels.csv", "--out", out,
                      "--device", "cpu", "--target", "redshift"]}[command]
    code, _, err = run_cli(argv, capsys)
    refused(code, err, command, emb / "manifest.json", *words)
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".astropt")]


def test_embeddings_reader_refuses_a_manifest_that_does_not_describe_its_shards(made, tmp_path):
    from astropt_tok.schema import DamagedFile
    from astropt_train.use.embed import read_embeddings

    emb = copy_of(made["emb"], tmp_path / "emb")
    edited(_both_n_embd)(emb / "manifest.json")
    with pytest.raises(DamagedFile, match="n_embd 32"):
        read_embeddings(emb)


# ---------------------------------------------------------------------------------------------------------
# export writes only what it can load back, each modality under its own name


@pytest.mark.parametrize("which, names", [("run", ["images_aion"]), ("mrun", ["legacysurvey_image", "hsc_image"]),
                                          ("srun", ["hsc_image"])])
def test_export_round_trip(which, names, made, more, capsys, tmp_path):
    from astropt_tok.store import TokenStore
    from astropt_train.checkpoint import load_model
    from astropt_train.use.interop import load_any_model, read_upstream_checkpoint

    run = {**made, **more}[which]
    code, out, err = run_cli(["export", run, "--astropt", tmp_path / "export"], capsys)
    assert code == 0, err
    ckpt = read_upstream_checkpoint(tmp_path / "export" / "ckpt.pt")
    assert [m.name for m in ckpt["model_args"]["modalities"]] == names
    assert sorted(ckpt["modality_registry"].modalities) == sorted(names)
    assert all(k.split(".")[1] in names for k in ckpt["model"] if k.split(".")[0] in ("encoders", "embedders",
                                                                                     "decoders"))
    ours, _ = load_model(run)
    back, info = load_any_model(tmp_path / "export" / "ckpt.pt")
    assert info["kind"] == "upstream-astropt" and back.config == ours.config
    for k, v in ours.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    store = TokenStore(made["mstore" if which != "run" else "store"])
    x = torch.as_tensor(np.concatenate([store.take(np.arange(2), m if m != "images_aion" else None) for m in names],
                                       axis=1).astype(np.int64))
    torch.testing.assert_close(back(x, x)[0], ours(x, x)[0])
    # and the tool reads it as a model wherever one is taken
    code, _, err = run_cli(["embed", "--checkpoint", tmp_path / "export" / "ckpt.pt", "--tokens", store.dir,
                            "--out", tmp_path / "emb", "--device", "cpu"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("names", [["images_aion"], ["hsc_image"], ["hsc_image", "legacysurvey_image"],
                                   ["legacysurvey_image", "hsc_image"]])
def test_export_loads_in_upstreams_own_gpt(names, upstream_astropt, made, tmp_path):
    """Upstream's load_astropt builds its GPT from the exported registry and takes every weight; its outputs
    are ours (upstream orders modalities by name: the demo's Legacy Survey-first model is compared with ours
    given its blocks in that sorted order)."""
    from dataclasses import asdict

    from astropt_tok.store import TokenStore, manifest_sha256
    from astropt_train import checkpoint as ck
    from astropt_train.model import GPT, GPTConfig
    from astropt_train.use.interop import export_astropt

    U = upstream_astropt.model
    store = TokenStore(made["store" if names == ["images_aion"] else "mstore"])
    mods = None if names == ["images_aion"] else names
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=store.vocab_size, block_size=576 * len(names), n_layer=2, n_head=2, n_embd=32,
                          head="aim", modalities=mods)).eval()
    config = {"model": asdict(model.config), "vocab_size": store.vocab_size, "tokens_per_image": 576, "step": 1,
              "store": {"dir": str(store.dir), "manifest_sha256": manifest_sha256(store.dir),
                        "codec_id": store.codec_id}}
    ck.save_checkpoint(tmp_path / "run", 1, model.state_dict(), config, {"step": 1})
    path = export_astropt(tmp_path / "run", tmp_path / "export")
    theirs = upstream_astropt.model_utils.load_astropt(repo_id=None, path=f"{path.parent}/")
    assert isinstance(theirs, U.GPT) and theirs.modality_registry.names() == sorted(names)
    theirs.eval()
    blocks = {m: torch.as_tensor(store.take(np.arange(2), None if mods is None else m).astype(np.int64))
              for m in names}
    inputs = {**blocks, **{f"{m}_positions": torch.arange(576).expand(2, 576) for m in names}}
    upstream_order = sorted(names)
    order = None if upstream_order == names else torch.tensor([[names.index(m) for m in upstream_order]] * 2)
    with torch.no_grad():
        out, _ = theirs(inputs)
        x = torch.cat([blocks[m] for m in upstream_order], dim=1)
        logits = model(x, x, order=order)[0]  # (2, 576 * M, vocab): position p from the head of token p + 1's modality
    names = upstream_order
    if len(names) == 1:
        torch.testing.assert_close(out[names[0]], logits, atol=1e-5, rtol=1e-5)
    else:  # upstream: the first modality's head on positions 0..574, the second's on 575..1150
        torch.testing.assert_close(out[names[0]], logits[:, :575], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[names[1]], logits[:, 575:1151], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# a ckpt.pt in a run folder never shadows the run's own checkpoints


def test_a_ckpt_pt_in_a_run_folder_is_ignored_with_a_note(made, more, capsys, tmp_path):
    run = copy_of(made["run"], tmp_path / "run")
    code, _, err = run_cli(["export", more["srun"], "--astropt", tmp_path / "other"], capsys)
    assert code == 0, err
    shutil.copy(tmp_path / "other" / "ckpt.pt", run / "ckpt.pt")  # another model's export, left in the run
    code, out, err = run_cli(["embed", "--checkpoint", run, "--tokens", made["store"], "--out", tmp_path / "emb",
                              "--device", "cpu"], capsys)
    assert code == 0, err
    assert "note:" in err and "ckpt.pt" in err
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["checkpoint"]["kind"] == "astropt-train"
    assert manifest["checkpoint"]["path"] == str(next((run / "checkpoints").glob("step-*")).resolve())
    # named as the file, it is the file
    code, _, err = run_cli(["embed", "--checkpoint", run / "ckpt.pt", "--tokens", made["mstore"], "--out",
                            tmp_path / "emb2", "--device", "cpu"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "emb2" / "manifest.json").read_text())
    assert manifest["checkpoint"]["kind"] == "upstream-astropt" and manifest["modalities"] == ["hsc_image"]


# ---------------------------------------------------------------------------------------------------------
# a codec folder's config.json (the ImageCodec arguments), read by tokenise and decode


CODEC_CONFIG = {  # name: (damage, words)
    "not UTF-8": (NOT_UTF8, ["not UTF-8"]),
    "not an object": (NOT_OBJECT, ["not a JSON object"]),
    "levels missing": (edited(lambda c: c.pop("quantizer_levels")), ["quantizer_levels"]),
    "levels of one": (setting("quantizer_levels", [1, 5]), ["quantizer_levels"]),
    "negative size": (setting("embedding_dim", -3), ["embedding_dim"]),
    "fractional size": (setting("hidden_dims", 2.5), ["hidden_dims"]),
    "factor a string": (setting("mult_factor", "ten"), ["mult_factor"]),
    "unknown argument": (setting("rotary", True), ["rotary"]),
}


@pytest.mark.parametrize("command", ["tokenise", "decode"])
@pytest.mark.parametrize("case", list(CODEC_CONFIG))
def test_damaged_codec_config(case, command, made, capsys, tmp_path):
    damage, words = CODEC_CONFIG[case]
    codec = copy_of(made["codec"], tmp_path / "codec")
    config = codec / "codecs" / "image" / "config.json"
    damage(config)
    out = tmp_path / "out"
    argv = {"tokenise": ["tokenise", "--source", made["survey"], "--out", out, "--shards", "2", "--codec", codec,
                         "--device", "cpu", "--no-progress"],
            "decode": ["decode", "--tokens", made["store"], "--rows", "0", "--codec", codec, "--out", out / "d.png",
                       "--device", "cpu"]}[command]
    code, _, err = run_cli(argv, capsys)
    refused(code, err, command, config, *words)
    assert not out.exists() or not list(out.glob("shard-*")) and not (out / "d.png").exists()


# ---------------------------------------------------------------------------------------------------------
# an upstream ckpt.pt (export's output, or upstream's own), read wherever a checkpoint is taken


def _upstream_edit(change):
    def apply(path: Path):
        from astropt_train.use.interop import _UPSTREAM_PICKLE, read_upstream_checkpoint

        ckpt = read_upstream_checkpoint(path)
        change(ckpt)
        torch.save(ckpt, path, pickle_module=_UPSTREAM_PICKLE)
    return apply


def _mods(ckpt):
    return ckpt["model_args"]["modalities"]


UPSTREAM = {  # name: (damage, words)
    "n_layer a string": (_upstream_edit(lambda c: c["model_args"].update(n_layer="two")), ["model_args.n_layer"]),
    "n_embd not a multiple of n_head": (_upstream_edit(lambda c: c["model_args"].update(n_head=3)),
                                        ["model_args.n_embd"]),
    "block_size not a multiple of its modalities": (_upstream_edit(lambda c: c["model_args"].update(block_size=1151)),
                                                    ["model_args.block_size"]),
    "bias a string": (_upstream_edit(lambda c: c["model_args"].update(bias="no")), ["model_args.bias"]),
    "iter_num a string": (_upstream_edit(lambda c: c.update(iter_num="last")), ["iter_num"]),
    "registry of other modalities": (_upstream_edit(lambda c: c["modality_registry"].modalities.pop("hsc_image")),
                                     ["modality_registry"]),
    "modality names repeated": (_upstream_edit(lambda c: c["model_args"].update(modalities=[_mods(c)[0]] * 2)),
                                ["model_args.modalities"]),
    "a modality of patches": (_upstream_edit(lambda c: setattr(_mods(c)[1], "vocab_size", 0)), ["hsc_image",
                                                                                                "token models"]),
    "vocabularies differ": (_upstream_edit(lambda c: (setattr(_mods(c)[1], "vocab_size", 9),
                                                      setattr(_mods(c)[1], "input_size", 9))), ["vocabularies"]),
    "an MAE model": (_upstream_edit(lambda c: c["model_args"].update(objective="mae")), ["mae"]),
    "weights of another model": (_upstream_edit(lambda c: c["model"].pop("encoders.hsc_image.wpe.weight")),
                                 ["encoders.hsc_image.wpe.weight"]),
}


@pytest.fixture(scope="module")
def exported_pair(made, tmp_path_factory):
    """upstream ckpt.pt of the two-column model."""
    from astropt_train.use.interop import export_astropt

    return export_astropt(made["mrun"], tmp_path_factory.mktemp("exported") / "pair")


@pytest.mark.parametrize("command", ["embed", "decode", "train --init-from"])
@pytest.mark.parametrize("case", list(UPSTREAM))
def test_damaged_upstream_checkpoint(case, command, made, exported_pair, capsys, tmp_path):
    damage, words = UPSTREAM[case]
    ckpt = tmp_path / "ckpt.pt"
    shutil.copy(exported_pair, ckpt)
    damage(ckpt)
    out = tmp_path / "out"
    argv = {"embed": ["embed", "--checkpoint", ckpt, "--tokens", made["mstore"], "--out", out, "--device", "cpu"],
            "decode": ["decode", "--checkpoint", ckpt, "--tokens", made["mstore"], "--rows", "0", "--predict",
                       "--out", out / "d.png", "--device", "cpu"],
            "train --init-from": ["train", "--tokens", made["mstore"], "--out", out, "--init-from", ckpt,
                                  "--device", "cpu", "--max-iters", "1", "--batch-size", "4", "--val-images", "0"]
            }[command]
    code, _, err = run_cli(argv, capsys)
    refused(code, err, command, ckpt, *words)
    written = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".astropt")] if out.exists() else []
    assert not written, written
