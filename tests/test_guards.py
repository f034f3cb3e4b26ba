"""Guards with numbers (issue 16, class 5): a matrix per guard, through the `astropt` entry point in-process.

- probe: repeated object ids (catalogue side, embeddings side) are one error; classes seen once, NaN/inf
  labels and labels beyond 1e100 are left out and counted, or one error when nothing usable is left; every
  number in report.json is finite or null.
- a model with non-finite weights (each of several tensors, NaN and inf) is refused at load by decode, embed,
  probe, export, train --init-from and train --resume, ours and upstream's ckpt.pt; non-finite logits are one
  error from the sampler; embed refuses non-finite embeddings; verify reports null joint embeddings.
- fit-codec: --resume with fewer --steps is refused and the same --steps changes nothing; a damaged
  fit-state.pt is one error; a held folder lock is one error naming the holder; the report is strict JSON.
- runs and best.json: a NaN or infinite validation loss is never the best.

Everything real: the tiny AION codec of conftest, real stores, runs, embeddings and files, made once per module.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_hostile import HOLD_LOCK, REPO, assert_one_error, run_cli, tree_digest

BAD_TENSORS = ["transformer.h.0.attn.c_attn.weight", "transformer.ln_f.weight", "encoders.images_aion.wpe.weight",
               "decoders.images_aion.c_fc.weight"]
BAD_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def strict_json(path: Path):
    """json.loads that refuses NaN/Infinity (what a strict reader does)."""
    def refuse(name):
        raise AssertionError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def all_numbers_finite(obj) -> bool:
    if isinstance(obj, dict):
        return all(all_numbers_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(all_numbers_finite(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


# ---------------------------------------------------------------------------------------------------------
# fixtures: a store, a run trained on it, its embeddings and export, a catalogue; made once


@pytest.fixture(scope="module")
def made(tmp_path_factory, survey_dir, codec_dir):
    """{name: path}: store, run (2 steps, checkpoint at each), emb, export (upstream ckpt.pt), catalogue (DataFrame
    of object_id, redshift, morphology)."""
    import pandas as pd
    import pyarrow.parquet as pq

    from astropt_tok.tokenise import TokeniseConfig, tokenise
    from astropt_train.config import build_config
    from astropt_train.loop import train
    from astropt_train.use.embed import EmbedConfig, embed
    from astropt_train.use.interop import export_astropt

    base = tmp_path_factory.mktemp("guards")
    tokenise(TokeniseConfig(source=str(survey_dir), out=str(base / "store"), shards=2, codec=str(codec_dir),
                            batch_size=20, device="cpu", progress=False))
    train(build_config(dict(tokens=str(base / "store"), out=str(base / "run"), device="cpu", max_iters=2,
                            batch_size=4, eval_interval=1, eval_iters=1, log_interval=1, checkpoint_interval=1,
                            val_images=0, preset="tiny", live=False)))
    embed(EmbedConfig(checkpoint=base / "run", out=base / "emb", device="cpu", progress=False))
    export_astropt(base / "run", base / "export")
    cat = pd.concat([pq.read_table(f, columns=["object_id", "redshift", "morphology"]).to_pandas()
                     for f in sorted(Path(survey_dir).glob("*.parquet"))]).reset_index(drop=True)
    return {"base": base, "store": base / "store", "run": base / "run", "emb": base / "emb",
            "export": base / "export", "catalogue": cat, "survey": Path(survey_dir), "codec": Path(codec_dir)}


def newest_checkpoint(run: Path) -> Path:
    from astropt_train.checkpoint import find_checkpoint

    return find_checkpoint(run)


def poison_checkpoint(folder: Path, tensor: str, value: float) -> None:
    """Put `value` into one element of `tensor` in a checkpoint folder's model.safetensors (a diverged run's)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(str(path))
    state[tensor].view(-1)[state[tensor].numel() // 2] = value
    save_file(state, str(path))


def poison_upstream(src: Path, dest: Path, tensor: str, value: float) -> Path:
    """A copy of an upstream ckpt.pt with `value` in one element of `tensor`."""
    import torch

    from astropt_train.use.interop import read_upstream_checkpoint

    ckpt = read_upstream_checkpoint(src)
    ckpt["model"][tensor].view(-1)[0] = value
    dest.mkdir(parents=True, exist_ok=True)
    # upstream's own classes, as export writes them (so the file reads as upstream's)
    from astropt_train.use.interop import _UPSTREAM_PICKLE

    with open(dest / "ckpt.pt", "wb") as f:
        torch.save(ckpt, f, pickle_module=_UPSTREAM_PICKLE, pickle_protocol=2)
    return dest / "ckpt.pt"


@pytest.fixture(scope="module")
def poisoned(made, tmp_path_factory):
    """{(tensor, value name): a copy of the run whose newest checkpoint holds that value in that tensor}."""
    base = tmp_path_factory.mktemp("poisoned")
    out = {}
    for tensor in BAD_TENSORS:
        for name in ("nan", "inf"):
            run = base / f"{tensor}-{name}"
            shutil.copytree(made["run"], run, ignore=shutil.ignore_patterns(".astropt.lock"))
            poison_checkpoint(newest_checkpoint(run), tensor, BAD_VALUES[name])
            out[tensor, name] = run
    return out


# ---------------------------------------------------------------------------------------------------------
# non-finite weights: refused at load by every command


POISON_CASES = [(t, v) for t in BAD_TENSORS for v in ("nan", "inf")]
COMMANDS = {
    "decode --generate": ["decode", "--checkpoint", "{ckpt}", "--generate", "1", "--out", "{tmp}/out/g.png",
                          "--device", "cpu", "--no-progress"],
    "decode --predict": ["decode", "--checkpoint", "{ckpt}", "--tokens", "{store}", "--rows", "0", "--predict",
                         "--out", "{tmp}/out/p.png", "--device", "cpu", "--no-progress"],
    "embed": ["embed", "--checkpoint", "{ckpt}", "--tokens", "{store}", "--out", "{tmp}/out", "--device", "cpu"],
    "export": ["export", "{ckpt}", "--astropt", "{tmp}/out"],
    "train --init-from": ["train", "--tokens", "{store}", "--out", "{tmp}/out", "--init-from", "{ckpt}", "--device",
                          "cpu", "--max-iters", "1", "--batch-size", "4", "--val-images", "0"],
}


def fill(argv, **paths) -> list[str]:
    return [str(a).format(**paths) for a in argv]


def assert_nothing_written(out: Path) -> None:
    written = [p for p in out.rglob("*") if p.is_file() and p.name != ".astropt.lock"] if out.exists() else []
    assert not written, written


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("tensor, value", POISON_CASES)
def test_non_finite_weights_are_refused_at_load(command, tensor, value, made, poisoned, capsys, tmp_path):
    """Each command given a checkpoint with a NaN or an infinity in one tensor: one error naming the weights file
    and that tensor, exit 1, nothing written (a train run folder holds at most its released lock)."""
    run = poisoned[tensor, value]
    ckpt = newest_checkpoint(run)
    code, _, err = run_cli(fill(COMMANDS[command], ckpt=run, store=made["store"], tmp=tmp_path), capsys)
    assert_one_error(code, err, str(ckpt / "model.safetensors"), "non-finite weights", tensor, "diverged")
    assert code == 1
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("tensor, value", POISON_CASES)
def test_train_resume_refuses_a_non_finite_newest_checkpoint(tensor, value, poisoned, made, capsys, tmp_path):
    """--resume of a run whose newest checkpoint diverged: one error naming it; the run's checkpoints unchanged."""
    run = tmp_path / "run"
    shutil.copytree(poisoned[tensor, value], run)
    before = tree_digest(run / "checkpoints")
    code, _, err = run_cli(["train", "--tokens", made["store"], "--out", run, "--resume", "--device", "cpu",
                            "--max-iters", "4", "--batch-size", "4", "--val-images", "0", "--preset", "tiny"], capsys)
    assert_one_error(code, err, str(newest_checkpoint(run) / "model.safetensors"), "non-finite weights", tensor)
    assert tree_digest(run / "checkpoints") == before


@pytest.mark.parametrize("slot, value", [("exp_avg", "nan"), ("exp_avg_sq", "inf"), ("exp_avg", "-inf")])
def test_train_resume_refuses_non_finite_optimiser_state(slot, value, made, capsys, tmp_path):
    """Finite weights, but AdamW's moments hold a NaN/inf (the step that diverged was saved): --resume would make
    every weight NaN on its first step; one error naming trainer_state.pt instead, the run unchanged."""
    import torch

    run = tmp_path / "run"
    shutil.copytree(made["run"], run, ignore=shutil.ignore_patterns(".astropt.lock"))
    path = newest_checkpoint(run) / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    index = sorted(state["optimizer"]["state"])[-1]
    state["optimizer"]["state"][index][slot].view(-1)[0] = BAD_VALUES[value]
    torch.save(state, path)
    before = tree_digest(run / "checkpoints")
    code, _, err = run_cli(["train", "--tokens", made["store"], "--out", run, "--resume", "--device", "cpu",
                            "--max-iters", "4", "--batch-size", "4", "--val-images", "0", "--preset", "tiny"], capsys)
    assert_one_error(code, err, str(path), "non-finite optimiser state", f"{slot} of parameter {index}")
    assert tree_digest(run / "checkpoints") == before


@pytest.mark.parametrize("tensor", BAD_TENSORS[:2])
def test_probe_refuses_embeddings_whose_checkpoint_now_holds_non_finite_weights(tensor, made, capsys, tmp_path):
    """probe's random-init baseline loads the embeddings' checkpoint: poisoned since, one error, no report."""
    run = tmp_path / "run"
    shutil.copytree(made["run"], run, ignore=shutil.ignore_patterns(".astropt.lock"))
    code, _, err = run_cli(["embed", "--checkpoint", run, "--tokens", made["store"], "--out", tmp_path / "emb",
                            "--device", "cpu"], capsys)
    assert code == 0, err
    poison_checkpoint(newest_checkpoint(run), tensor, float("nan"))
    made["catalogue"].to_csv(tmp_path / "labels.csv", index=False)
    code, _, err = run_cli(["probe", "--embeddings", tmp_path / "emb", "--labels", tmp_path / "labels.csv",
                            "--target", "redshift", "--out", tmp_path / "out", "--device", "cpu"], capsys)
    assert_one_error(code, err, str(newest_checkpoint(run)))
    assert not (tmp_path / "out" / "report.json").exists()


UPSTREAM_COMMANDS = {k: COMMANDS[k] for k in ("decode --generate", "embed", "train --init-from")}
# an upstream ckpt.pt records no store, so decode needs --tokens (without it that flag error comes first)
UPSTREAM_COMMANDS["decode --generate"] = [*COMMANDS["decode --generate"], "--tokens", "{store}"]


@pytest.mark.parametrize("command", list(UPSTREAM_COMMANDS))
@pytest.mark.parametrize("tensor, value", [(BAD_TENSORS[0], "nan"), (BAD_TENSORS[3], "-inf")])
def test_upstream_checkpoint_with_non_finite_weights_is_refused(command, tensor, value, made, capsys, tmp_path):
    path = poison_upstream(made["export"] / "ckpt.pt", tmp_path / "upstream", tensor, BAD_VALUES[value])
    code, _, err = run_cli(fill(UPSTREAM_COMMANDS[command], ckpt=path, store=made["store"], tmp=tmp_path), capsys)
    assert_one_error(code, err, str(path), "non-finite weights", tensor)
    assert_nothing_written(tmp_path / "out")


def test_codec_with_non_finite_weights_is_refused(made, capsys, tmp_path):
    """The image codec is a model too: tokenise with a NaN in it is one error naming its weights."""
    from safetensors.torch import load_file, save_file

    codec = tmp_path / "codec"
    shutil.copytree(made["codec"], codec)
    weights = codec / "codecs" / "image" / "model.safetensors"
    state = load_file(str(weights))
    name = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(weights))
    code, _, err = run_cli(["tokenise", "--source", made["survey"], "--out", tmp_path / "out", "--shards", "1",
                            "--codec", codec, "--device", "cpu", "--no-progress"], capsys)
    assert_one_error(code, err, str(weights), "non-finite weights", name)


def test_a_healthy_checkpoint_passes_the_weight_check(made):
    """The check is one isfinite per tensor and lets sound weights through (what every other test relies on)."""
    from safetensors.torch import load_file

    from astropt_tok.health import first_non_finite

    state = load_file(str(newest_checkpoint(made["run"]) / "model.safetensors"))
    assert first_non_finite(state) is None
    state["transformer.ln_f.weight"][3] = float("inf")
    assert first_non_finite(state) == "transformer.ln_f.weight"


# ---------------------------------------------------------------------------------------------------------
# non-finite numbers from finite weights: the sampler, embed, verify


def scaled_checkpoint(made, dest: Path, scale: float) -> Path:
    """A copy of the run whose final LayerNorm weight is multiplied by `scale` (finite weights, huge activations)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(made["run"], dest, ignore=shutil.ignore_patterns(".astropt.lock"))
    path = newest_checkpoint(dest) / "model.safetensors"
    state = load_file(str(path))
    state["transformer.ln_f.weight"] *= scale
    save_file(state, str(path))
    return dest


OVERFLOWING_DECODES = {
    "sample": (["--generate", "2"], "of 2 sequences"),
    "greedy": (["--generate", "2", "--temperature", "0"], "of 2 sequences"),
    "top-k": (["--generate", "2", "--top-k", "5"], "of 2 sequences"),
    "complete": (["--rows", "0:2", "--complete-from", "500"], "of 2 sequences"),
    "predict": (["--rows", "0:2", "--predict"], "rows 0..1"),
}


@pytest.mark.parametrize("case", list(OVERFLOWING_DECODES))
def test_decode_with_overflowing_logits_is_one_error(case, made, capsys, tmp_path):
    """Finite weights whose activations overflow float32 give infinite/NaN logits: the sampler (or the
    teacher-forced prediction) says so once, instead of a traceback or tokens drawn from NaN."""
    run = scaled_checkpoint(made, tmp_path / "run", 1e38)
    extra, where = OVERFLOWING_DECODES[case]
    code, _, err = run_cli(["decode", "--checkpoint", run, "--tokens", made["store"], "--out",
                            tmp_path / "out" / "g.png", "--device", "cpu", "--no-progress", *extra], capsys)
    assert_one_error(code, err, "logits are not finite", where)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("temperature", ["1e-50", "1e-300"])
def test_a_temperature_so_small_that_logits_overflow_is_one_error(temperature, made, capsys, tmp_path):
    code, _, err = run_cli(["decode", "--checkpoint", made["run"], "--generate", "1", "--temperature", temperature,
                            "--out", tmp_path / "out" / "g.png", "--device", "cpu", "--no-progress"], capsys)
    assert_one_error(code, err, f"--temperature {float(temperature)}", "too small")


@pytest.mark.parametrize("use_kv_cache", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_refuses_nan_logits_in_the_library(use_kv_cache, temperature, made):
    """GPT.generate itself, with a NaN put into the weights after loading (what no loader lets through)."""
    import torch

    from astropt_tok.errors import AstroptError
    from astropt_train.checkpoint import load_model

    model, _ = load_model(made["run"])
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(AstroptError, match="logits are not finite"):
        model.generate(torch.zeros((2, 1), dtype=torch.long), 3, temperature=temperature, use_kv_cache=use_kv_cache,
                       generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("scale, dtype, words", [(1e7, "float16", ["float16", "--dtype float32"]),
                                                 (1e38, "float32", ["activations overflowed"])],
                         ids=["float16 overflow", "float32 overflow"])
def test_embed_refuses_non_finite_embeddings(scale, dtype, words, made, capsys, tmp_path):
    """Finite weights, embeddings beyond the stored dtype: one error before any shard is written (they used to be
    written as null rows or infinities that looked like galaxies without an image)."""
    run = scaled_checkpoint(made, tmp_path / "run", scale)
    code, _, err = run_cli(["embed", "--checkpoint", run, "--out", tmp_path / "out", "--device", "cpu",
                            "--dtype", dtype], capsys)
    assert_one_error(code, err, str(run), "non-finite embeddings", "column embedding", *words)
    assert not list((tmp_path / "out").glob("shard-*")) and not list((tmp_path / "out").glob(".done/*"))
    if dtype == "float16":  # the same model in float32 embeds fine
        code, _, err = run_cli(["embed", "--checkpoint", run, "--out", tmp_path / "out32", "--device", "cpu"], capsys)
        assert code == 0, err


def rewrite_shard(emb: Path, index: int, change) -> None:
    """Rewrite shard `index` of an embeddings store with embed's own writer, its embeddings changed by `change`
    (an older embed's output from a diverged model), and record it in the manifest as embed would."""
    from astropt_tok.store import write_manifest
    from astropt_train.use.embed import _write_shard, read_embeddings  # noqa: F401

    import pyarrow as pa

    m = json.loads((emb / "manifest.json").read_text())
    entry = m["shards"][index]
    with pa.memory_map(str(emb / entry["file"])) as src:
        table = pa.ipc.open_stream(src).read_all()
    n = m["n_embd"]
    values = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    x = values.reshape(-1, n).astype(np.float32).copy()
    change(x)
    record = _write_shard(emb, entry["index"], table.column("row").to_numpy(), table.column("store_row").to_numpy(),
                          table.column("object_id").to_pylist(), {"embedding": x}, m["dtype"])
    entry.update(sha256=record.sha256, bytes=record.bytes)
    write_manifest(emb, m)


EMB_DAMAGE = {
    "every row null": (lambda x: x.fill(np.nan), "null rows"),
    "one row null": (lambda x: x.__setitem__(2, np.nan), "1 null rows"),
    "one value NaN": (lambda x: x.__setitem__((1, 3), np.nan), "finite"),
    "one value inf": (lambda x: x.__setitem__((0, 0), np.inf), "finite"),
}


@pytest.mark.parametrize("damage", list(EMB_DAMAGE))
def test_verify_reports_non_finite_or_null_embeddings(damage, made, capsys, tmp_path):
    """A one-column store holds an embedding for every galaxy: nulls there (what a NaN model gave) and NaN/inf
    values are BAD in verify."""
    emb = tmp_path / "emb"
    shutil.copytree(made["emb"], emb)
    change, words = EMB_DAMAGE[damage]
    rewrite_shard(emb, 1, change)
    code, _, err = run_cli(["verify", emb], capsys)
    assert code != 0 and err.startswith("BAD shard-00001.arrow") and words in err and "Traceback" not in err
    if "value" in damage:  # probe refuses a number that is none rather than fitting it (or a sklearn traceback)
        made["catalogue"].to_csv(tmp_path / "labels.csv", index=False)
        code, _, err = probe_cli(emb, tmp_path / "labels.csv", ["redshift"], tmp_path / "out", capsys)
        assert_one_error(code, err, str(emb), "non-finite values in the embeddings of 1 of 40 galaxies", "astropt embed --verify")


def test_verify_passes_the_sound_store(made, capsys):
    code, out, err = run_cli(["verify", made["emb"]], capsys)
    assert code == 0 and out.startswith("OK"), err


# ---------------------------------------------------------------------------------------------------------
# probe: repeated ids, rare classes, non-finite and overflowing labels


def write_labels(path: Path, columns: dict) -> Path:
    """A parquet catalogue (NaN and inf stay floats, as they would in a survey's own files)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def probe_cli(emb, labels, targets, out, capsys, *extra):
    argv = ["probe", "--embeddings", emb, "--labels", labels, "--out", out, "--device", "cpu"]
    for t in targets:
        argv += ["--target", t]
    return run_cli([*argv, *extra], capsys)


def ids_and_redshift(made):
    cat = made["catalogue"]
    return list(cat["object_id"].astype(str)), list(cat["redshift"].astype(float))


LABEL_REPEATS = {
    "one id twice, same label": lambda ids, z: (ids + ids[:1], z + z[:1], 1),
    "three ids twice, other labels": lambda ids, z: (ids + ids[5:8], z + [9.0, 8.0, 7.0], 3),
    "one id three times": lambda ids, z: (ids + ids[4:5] * 2, z + [1.0, 2.0], 1),
    "a repeat with a null label": lambda ids, z: (ids + ids[9:10], z + [None], 1),
}


@pytest.mark.parametrize("case", list(LABEL_REPEATS))
def test_probe_refuses_repeated_ids_in_the_catalogue(case, made, capsys, tmp_path):
    ids, z = ids_and_redshift(made)
    ids, z, repeated = LABEL_REPEATS[case](ids, z)
    labels = write_labels(tmp_path / "labels.parquet", {"object_id": ids, "redshift": z})
    code, _, err = probe_cli(made["emb"], labels, ["redshift"], tmp_path / "out", capsys)
    line = assert_one_error(code, err, "'object_id'", str(labels), f"repeats {repeated} object id")
    assert any(f"'{i}'" in line for i in set(ids[40:])), line  # an example of the repeated ids
    assert not (tmp_path / "out").exists() or not (tmp_path / "out" / "report.json").exists()


def test_probe_ignores_repeats_of_ids_it_does_not_join(made, capsys, tmp_path):
    """A catalogue repeating a galaxy that was never embedded: nothing to decide, the probe runs."""
    ids, z = ids_and_redshift(made)
    labels = write_labels(tmp_path / "labels.parquet", {"object_id": ids + ["elsewhere", "elsewhere"],
                                                        "redshift": z + [1.0, 2.0]})
    code, _, err = probe_cli(made["emb"], labels, ["redshift"], tmp_path / "out", capsys)
    assert code == 0, err
    assert strict_json(tmp_path / "out" / "report.json")["targets"]["redshift"]["n"] == 40


@pytest.fixture(scope="module")
def repeated_emb(made, tmp_path_factory):
    """{repeats: (embeddings store, its ids)}: the survey with the last `repeats` galaxies' object ids set to the
    first ones' (a survey that lists a galaxy twice), tokenised with the same codec and embedded by the run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from astropt_tok.tokenise import TokeniseConfig, tokenise
    from astropt_train.use.embed import EmbedConfig, embed

    ids, _ = ids_and_redshift(made)
    base = tmp_path_factory.mktemp("repeated-emb")
    out = {}
    for repeats in (1, 4):
        these = ids[:40 - repeats] + ids[:repeats]
        survey = base / f"survey-{repeats}"
        survey.mkdir()
        start = 0
        for f in sorted(made["survey"].glob("*.parquet")):
            table = pq.read_table(f)
            k = table.column_names.index("object_id")
            part = pa.array(these[start:start + table.num_rows], type=table.schema.field("object_id").type)
            pq.write_table(table.set_column(k, "object_id", part), survey / f.name)
            start += table.num_rows
        tokenise(TokeniseConfig(source=str(survey), out=str(base / f"store-{repeats}"), shards=2,
                                codec=str(made["codec"]), batch_size=20, device="cpu", progress=False))
        embed(EmbedConfig(checkpoint=made["run"], tokens=base / f"store-{repeats}", out=base / f"emb-{repeats}",
                          device="cpu", progress=False))
        out[repeats] = (base / f"emb-{repeats}", these)
    return out


@pytest.mark.parametrize("repeats", [1, 4])
def test_probe_refuses_repeated_ids_among_the_embeddings(repeats, repeated_emb, made, capsys, tmp_path):
    emb, ids = repeated_emb[repeats]
    made["catalogue"].to_csv(tmp_path / "labels.csv", index=False)
    code, _, err = probe_cli(emb, tmp_path / "labels.csv", ["redshift"], tmp_path / "out", capsys)
    line = assert_one_error(code, err, str(emb), f"repeats {repeats} object id", "embedded twice")
    assert f"'{ids[0]}'" in line
    assert not (tmp_path / "out").exists() or not (tmp_path / "out" / "report.json").exists()


def class_labels(made, classes: list):
    """The catalogue's 40 ids with `classes` as the label (cycled)."""
    ids, _ = ids_and_redshift(made)
    return {"object_id": ids, "kind": [classes[i % len(classes)] for i in range(len(ids))]}


def with_values(values: list, at: list[int], column: list) -> list:
    column = list(column)
    for i, v in zip(at, values):
        column[i] = v
    return column


def run_probe_ok(made, labels: dict, target: str, tmp_path, capsys, *extra) -> dict:
    path = write_labels(tmp_path / "labels.parquet", labels)
    code, _, err = probe_cli(made["emb"], path, [target], tmp_path / "out", capsys, *extra)
    assert code == 0, err
    report = strict_json(tmp_path / "out" / "report.json")
    assert all_numbers_finite(report)
    return report["targets"][target]


RARE = {
    # (classes of the 40 rows, rows whose labels are replaced and by what, expected rare_class, classes kept)
    "two singletons": (["a", "b"], {3: "c", 4: "d"}, 2, ["a", "b"]),
    "one singleton": (["a", "b", "c"], {7: "lonely"}, 1, ["a", "b", "c"]),
    "integer singleton (auto task)": ([0, 1], {11: 7}, 1, ["0", "1"]),
    "no singleton": (["a", "b"], {}, 0, ["a", "b"]),
}


@pytest.mark.parametrize("case", list(RARE))
def test_probe_leaves_out_classes_seen_once_and_counts_them(case, made, capsys, tmp_path):
    classes, replace, rare, kept = RARE[case]
    labels = class_labels(made, classes)
    labels["kind"] = with_values(list(replace.values()), list(replace), labels["kind"])
    entry = run_probe_ok(made, labels, "kind", tmp_path, capsys)
    assert entry["task"] == "classification" and entry["classes"] == kept
    assert entry["left_out"]["rare_class"] == rare and entry["n"] == 40 - rare


@pytest.mark.parametrize("classes, replace", [(["a"], {0: "b"}), (["a"], {0: "b", 1: "c", 2: "d"})],
                         ids=["one class and a singleton", "one class and three singletons"])
def test_probe_with_one_class_left_after_singletons_is_one_error(classes, replace, made, capsys, tmp_path):
    labels = class_labels(made, classes)
    labels["kind"] = with_values(list(replace.values()), list(replace), labels["kind"])
    path = write_labels(tmp_path / "labels.parquet", labels)
    code, _, err = probe_cli(made["emb"], path, ["kind"], tmp_path / "out", capsys)
    assert_one_error(code, err, "'kind'", "single class", f"{len(replace)} rows of classes seen once")


BAD_LABELS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "1e200": 1e200, "-1e200": -1e200,
              "1e101": 1e101}
WHY = {"nan": "non_finite_label", "inf": "non_finite_label", "-inf": "non_finite_label",
       "1e200": "overflowing_label", "-1e200": "overflowing_label", "1e101": "overflowing_label"}


@pytest.mark.parametrize("bad", list(BAD_LABELS))
@pytest.mark.parametrize("count", [3])
def test_probe_regression_leaves_out_non_finite_and_overflowing_labels(bad, count, made, capsys, tmp_path):
    ids, z = ids_and_redshift(made)
    z = with_values([BAD_LABELS[bad]] * count, list(range(2, 2 + 2 * count, 2)), z)
    entry = run_probe_ok(made, {"object_id": ids, "redshift": z}, "redshift", tmp_path, capsys)
    assert entry["task"] == "regression" and entry["n"] == 40 - count
    assert entry["left_out"][WHY[bad]] == count
    assert sum(entry["left_out"].values()) == count
    assert all(v is not None for v in entry["scores"].values())


def test_probe_regression_keeps_large_labels_below_the_threshold(made, capsys, tmp_path):
    """1e50 is far from overflowing (squares 1e100): kept, and every score is a finite number."""
    ids, z = ids_and_redshift(made)
    entry = run_probe_ok(made, {"object_id": ids, "redshift": with_values([1e50, -1e50], [0, 1], z)}, "redshift",
                         tmp_path, capsys)
    assert entry["n"] == 40 and entry["left_out"]["overflowing_label"] == 0


def test_probe_regression_with_every_kind_at_once(made, capsys, tmp_path):
    ids, z = ids_and_redshift(made)
    z = with_values([float("nan"), float("inf"), -1e200, None, 1e200], [0, 1, 2, 3, 4], z)
    entry = run_probe_ok(made, {"object_id": ids + ["not-embedded"], "redshift": z + [1.0]}, "redshift", tmp_path,
                         capsys)
    assert entry["left_out"] == {"no_label_row": 0, "no_embedding": 0, "missing_label": 1, "non_finite_label": 2,
                                 "overflowing_label": 2, "rare_class": 0}
    assert entry["n"] == 35


CLASS_BAD = {  # a float column probed as classes: (values put into rows 5 and 6, left_out reason, count, classes)
    "nan twice": ([float("nan")] * 2, "non_finite_label", 2, 2),
    "inf and -inf": ([float("inf"), float("-inf")], "non_finite_label", 2, 2),
    "1e200 and -1e200": ([1e200, -1e200], "rare_class", 2, 2),  # each a class seen once
    "1e200 twice": ([1e200] * 2, None, 0, 3),  # a class of two: a name, kept (no arithmetic on a class)
}


@pytest.mark.parametrize("case", list(CLASS_BAD))
def test_probe_classification_leaves_out_non_finite_labels_and_singletons(case, made, capsys, tmp_path):
    values, why, count, classes = CLASS_BAD[case]
    labels = class_labels(made, [0.0, 1.0])
    labels["kind"] = with_values(values, [5, 6], labels["kind"])
    entry = run_probe_ok(made, labels, "kind", tmp_path, capsys, "--task", "classification")
    assert entry["n"] == 40 - count and len(entry["classes"]) == classes
    assert sum(entry["left_out"].values()) == count and (why is None or entry["left_out"][why] == count)


@pytest.mark.parametrize("bad", ["nan", "inf", "1e200", "-1e200"])
def test_probe_with_every_label_left_out_is_one_error(bad, made, capsys, tmp_path):
    ids, _ = ids_and_redshift(made)
    path = write_labels(tmp_path / "labels.parquet", {"object_id": ids, "redshift": [BAD_LABELS[bad]] * len(ids)})
    code, _, err = probe_cli(made["emb"], path, ["redshift"], tmp_path / "out", capsys)
    words = ["only 0 rows", f"{WHY[bad]} 40"] + (["1e+100"] if WHY[bad] == "overflowing_label" else [])
    assert_one_error(code, err, "'redshift'", *words)


def test_probe_report_turns_a_nan_score_into_null():
    """finite_json/dumps_finite: NaN and inf (numpy's too) become null on purpose; the text is strict JSON."""
    from astropt_tok.health import dumps_finite

    text = dumps_finite({"r2": float("nan"), "mae": np.float32("inf"), "ok": np.float64(0.5), "n": 3,
                         "per_fold": [1.0, float("-inf")]})
    assert json.loads(text) == {"r2": None, "mae": None, "ok": 0.5, "n": 3, "per_fold": [1.0, None]}


# ---------------------------------------------------------------------------------------------------------
# fit-codec: resume with fewer steps, a damaged fit-state, a held lock, a strict report

FIT = ["fit-codec", "--source", "{survey}", "--out", "{out}", "--batch-size", "2", "--device", "cpu",
       "--no-progress", "--hidden", "8", "--projection", "4", "--warmup", "0", "--seed", "0"]


@pytest.fixture(scope="module")
def fitted(made, tmp_path_factory):
    """A finished 2-step fit (its fit-state, codec and report), copied by the tests that change it."""
    from astropt_tok.cli import main

    out = tmp_path_factory.mktemp("fitted") / "codec"
    try:
        main(fill([*FIT, "--steps", "2"], survey=made["survey"], out=out))
    except SystemExit as exc:
        assert not exc.code
    return out


def copy_fit(fitted, tmp_path) -> Path:
    dest = tmp_path / "codec"
    shutil.copytree(fitted, dest, ignore=shutil.ignore_patterns(".astropt.lock"))
    return dest


def test_fit_report_is_strict_json(fitted):
    report = strict_json(fitted / "fit_report.json")
    assert all_numbers_finite(report) and isinstance(report["final_loss"], float) and report["steps"] == 2


@pytest.mark.parametrize("steps", [1])
def test_fit_resume_with_fewer_steps_is_refused_and_changes_nothing(steps, fitted, made, capsys, tmp_path):
    out = copy_fit(fitted, tmp_path)
    before = tree_digest(out)
    code, _, err = run_cli(fill([*FIT, "--steps", str(steps), "--resume"], survey=made["survey"], out=out), capsys)
    assert_one_error(code, err, f"--steps {steps}", "already ran 2 steps", "cannot be shortened")
    assert tree_digest(out) == before


def test_fit_resume_of_a_finished_fit_changes_nothing(fitted, made, capsys, tmp_path):
    out = copy_fit(fitted, tmp_path)
    before = tree_digest(out)
    code, stdout, err = run_cli(fill([*FIT, "--steps", "2", "--resume"], survey=made["survey"], out=out), capsys)
    assert code == 0, err
    assert "already finished at step 2" in stdout and "nothing changed" in stdout
    assert tree_digest(out) == before


def test_fit_resume_completes_a_finished_fit_whose_report_is_missing(fitted, made, capsys, tmp_path):
    """Killed between the last fit-state and the report: --resume writes the report, its loss the last recorded."""
    import torch

    out = copy_fit(fitted, tmp_path)
    (out / "fit_report.json").unlink()
    code, _, err = run_cli(fill([*FIT, "--steps", "2", "--resume"], survey=made["survey"], out=out), capsys)
    assert code == 0, err
    report = strict_json(out / "fit_report.json")
    history = torch.load(out / "fit-state.pt", weights_only=True)["history"]
    assert report["final_loss"] == pytest.approx(history[-1][1]) and all_numbers_finite(report)


def _state_change(change):
    def apply(path: Path):
        import torch

        state = torch.load(path, weights_only=True)
        torch.save(change(state), path)
    return apply


def _wrong_shape(state):
    name = next(k for k, v in state["codec"].items() if v.dim() >= 2)
    state["codec"][name] = state["codec"][name][:1]
    return state, name


def _nan_weight(state):
    name = next(k for k, v in state["codec"].items() if v.is_floating_point())
    state["codec"][name].view(-1)[0] = float("nan")
    return state


def _first_weight(state) -> str:
    """A codec tensor the config does not rebuild (the quantiser's levels it does)."""
    return next(k for k in state["codec"] if not k.endswith("levels"))


class Pickled:
    """A class a weights-only load refuses (the old loader would have run its pickle)."""


FIT_STATE_DAMAGE = {
    "garbage bytes": (lambda p: p.write_bytes(b"not a torch file" * 10), ["unreadable"]),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:2000]), ["unreadable"]),
    "a list": (_state_change(lambda s: [1, 2, 3]), ["holds a list", "not a fit state"]),
    "a tensor": (_state_change(lambda s: s["codec"][next(iter(s["codec"]))]), ["holds a Tensor"]),
    "an arbitrary object": (lambda p: __import__("torch").save({"step": Pickled()}, p), ["unreadable"]),
    "no codec": (_state_change(lambda s: {k: v for k, v in s.items() if k != "codec"}), ["'codec' is missing"]),
    "no step": (_state_change(lambda s: {k: v for k, v in s.items() if k != "step"}), ["'step' is missing"]),
    "step a string": (_state_change(lambda s: {**s, "step": "2"}), ["'step' is a str"]),
    "step negative": (_state_change(lambda s: {**s, "step": -1}), ["step -1"]),
    "codec a list": (_state_change(lambda s: {**s, "codec": [1]}), ["'codec' is a list"]),
    "codec entry not a tensor": (_state_change(lambda s: {**s, "codec": {**s["codec"], "x": 1}}), ["codec entry 'x'"]),
    "codec tensor of another shape": ("shape", ["does not fit this codec", "size mismatch"]),
    "codec tensor missing": (_state_change(lambda s: {**s, "codec": {k: v for k, v in s["codec"].items()
                                                                   if k != _first_weight(s)}}),
                             ["does not fit this codec", "missing"]),
    "codec tensor extra": (_state_change(lambda s: {**s, "codec": {**s["codec"], "extra.weight":
                                                                    __import__("torch").zeros(2)}}),
                           ["does not fit this codec", "extra.weight"]),
    "codec weight NaN": (_state_change(_nan_weight), ["non-finite weights", "diverged"]),
    "optimizer empty": (_state_change(lambda s: {**s, "optimizer": {}}), ["optimiser state does not fit"]),
    "history garbage": (_state_change(lambda s: {**s, "history": ["x"]}), ["history"]),
    "identity other": (_state_change(lambda s: {**s, "identity": {**s["identity"], "seed": 5}}), ["other settings",
                                                                                                  "seed"]),
}


@pytest.mark.parametrize("damage", list(FIT_STATE_DAMAGE))
def test_damaged_fit_state_is_one_error(damage, fitted, made, capsys, tmp_path):
    import torch

    out = copy_fit(fitted, tmp_path)
    state_path = out / "fit-state.pt"
    how, words = FIT_STATE_DAMAGE[damage]
    if how == "shape":
        state, name = _wrong_shape(torch.load(state_path, weights_only=True))
        torch.save(state, state_path)
        words = [*words, name]
    else:
        how(state_path)
    before = tree_digest(out)
    code, _, err = run_cli(fill([*FIT, "--steps", "3", "--resume"], survey=made["survey"], out=out), capsys)
    assert_one_error(code, err, str(state_path), *words)
    assert tree_digest(out) == before


def test_a_second_fit_codec_into_one_folder_is_refused(made, capsys, tmp_path):
    """fit-codec holds its folder's lock for the whole fit: while another holds it, one error naming the holder,
    nothing written; afterwards the fit runs."""
    out = tmp_path / "codec"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), "`astropt fit-codec`", "exclusive"],
                             cwd=REPO, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert other.stdout.readline() == "locked\n"
        code, _, err = run_cli(fill([*FIT, "--steps", "1"], survey=made["survey"], out=out), capsys)
    finally:
        other.stdin.close()
        other.wait(timeout=60)
    line = assert_one_error(code, err, str(out), "in use", "`astropt fit-codec`", f"pid {other.pid}")
    assert line and not tree_digest(out)
    code, _, err = run_cli(fill([*FIT, "--steps", "1"], survey=made["survey"], out=out), capsys)
    assert code == 0, err
    assert json.loads((out / ".astropt.lock").read_text())["command"] == "`astropt fit-codec`"


# ---------------------------------------------------------------------------------------------------------
# runs and best.json: a non-finite validation loss is never the best


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_runs_never_picks_a_non_finite_validation_loss(bad, made, capsys, tmp_path):
    """The first evaluation's loss made NaN/inf/-inf (json's NaN, Infinity, -Infinity, as the logger writes them):
    the best is the other, finite one."""
    run = tmp_path / "run"
    shutil.copytree(made["run"], run, ignore=shutil.ignore_patterns(".astropt.lock"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert len(evals) == 2
    evals[0]["val_loss"] = BAD_VALUES[bad]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    from astropt_train.runs import summarise_run

    summary = summarise_run(run)
    assert summary.best_val_loss == evals[1]["val_loss"] and summary.best_val_step == evals[1]["step"]
    code, out, err = run_cli(["runs", run, "--out", tmp_path / "curves.png"], capsys)
    assert code == 0, err
    assert f"{evals[1]['val_loss']:.4f}" in out


def test_runs_with_only_non_finite_validation_losses_has_no_best(made, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(made["run"], run, ignore=shutil.ignore_patterns(".astropt.lock"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps({**r, **({"val_loss": float("nan")} if "val_loss" in r
                                                                     else {})}) + "\n" for r in records))
    from astropt_train.runs import summarise_run

    assert summarise_run(run).best_val_loss is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_best_json_never_holds_a_non_finite_loss(bad, made, tmp_path):
    from astropt_train import checkpoint as ck

    run = tmp_path / "run"
    (run / ck.CKPT_DIR).mkdir(parents=True)
    with pytest.raises(ValueError):
        ck.write_best(run, 3, bad)
    assert not (run / ck.CKPT_DIR / ck.BEST_FILE).exists()
    (run / ck.CKPT_DIR / ck.BEST_FILE).write_text(json.dumps({"step": 3, "val_loss": bad}))  # an older version's
    assert ck.read_best(run) is None  # as if none: the next finite evaluation becomes the best
    ck.write_best(run, 4, 2.5)
    assert strict_json(run / ck.CKPT_DIR / ck.BEST_FILE) == {"step": 4, "val_loss": 2.5}


def test_training_records_a_finite_best(made):
    from astropt_train import checkpoint as ck

    best = strict_json(made["run"] / ck.CKPT_DIR / ck.BEST_FILE)
    assert math.isfinite(best["val_loss"]) and best["step"] in (1, 2)
