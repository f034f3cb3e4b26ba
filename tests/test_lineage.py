"""Lineage: every command that combines two artifacts checks that they belong together before any work.

A matrix, not examples: each consumer (train --resume, train --init-from, embed, decode of stored rows,
--predict, --generate, --complete-from, cross-survey, --compare, probe's random-init baseline) against each
mismatched producer (a store made by another codec with the same vocabulary, a store of other modalities or
bands, a codec folder refitted after the store was made, and under embeddings a re-tokenised store or a changed
checkpoint). Each runs through `astropt_tok.cli.main` in this process: exactly one `error:` line naming both
sides, exit 1, nothing written. The matching combinations still work, `--accept-codec-change` decodes with a
refitted codec on purpose, and decode draws the bands of the modality it decodes.

Every store and run is real (tiny real AION codecs, the synthetic survey, a few training steps) and made once
for the module; the rules themselves live in astropt_tok/artifacts.py (unit tests: test_artifacts.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from test_hostile import assert_one_error, run_cli, tree_digest

from astropt_tok.synthetic import HSC_BANDS

DES = ("DES-G", "DES-R", "DES-I", "DES-Z")
LS_COLUMN = "legacysurvey_image:" + ",".join(DES)
HSC_COLUMN = "hsc_image:" + ",".join(HSC_BANDS)
ROWS = 12


# ---------------------------------------------------------------------------------------------------------
# the producers, made once


def _tokenise(source, out, codec, columns=(("legacysurvey_image", DES),), **kw):
    from astropt_tok.tokenise import TokeniseConfig, tokenise

    one = len(columns) == 1
    kw.setdefault("limit", ROWS)
    tokenise(TokeniseConfig(source=str(source), out=str(out), shards=2, codec=str(codec), batch_size=6, device="cpu",
                            progress=False, column=columns[0][0], bands=tuple(columns[0][1]),
                            modalities=() if one else tuple((c, tuple(b)) for c, b in columns), **kw))
    return out


def _train(store, out, **kw):
    from astropt_train.config import build_config
    from astropt_train.loop import train

    base = dict(tokens=str(store), out=str(out), preset="tiny", batch_size=4, max_iters=2, eval_interval=2,
                eval_iters=1, log_interval=1, val_images=0, live=False, device="cpu", compile=False,
                checkpoint_interval=1, val_fraction=0.2)
    train(build_config({**base, **kw}))
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory, survey_dir, codec_dir):
    """{name: path}: stores, runs, codecs and embeddings, matching and mismatched."""
    from astropt_tok.codec import make_tiny_codec
    from astropt_train.use.embed import EmbedConfig, embed

    base = tmp_path_factory.mktemp("lineage")
    both = (("legacysurvey_image", DES), ("hsc_image", HSC_BANDS))
    p = {"survey": Path(survey_dir), "codec": Path(codec_dir)}
    # another tiny real AION codec: another seed, the same 4375-code vocabulary
    p["codec_b"] = make_tiny_codec(base / "codec-b", seed=1)
    # a codec folder that will be refitted (its weights rewritten) after stores were made and runs trained with it
    p["codec_r"] = base / "codec-r"
    shutil.copytree(codec_dir, p["codec_r"])

    p["store"] = _tokenise(survey_dir, base / "store", codec_dir)
    p["store_b"] = _tokenise(survey_dir, base / "store-b", p["codec_b"])  # same vocabulary, other codec
    p["hsc_store"] = _tokenise(survey_dir, base / "hsc-store", codec_dir, columns=(("hsc_image", HSC_BANDS),))
    p["mstore"] = _tokenise(survey_dir, base / "mstore", codec_dir, columns=both)
    p["mstore_b"] = _tokenise(survey_dir, base / "mstore-b", p["codec_b"], columns=both)
    p["store_r"] = _tokenise(survey_dir, base / "store-r", p["codec_r"])
    p["mstore_r"] = _tokenise(survey_dir, base / "mstore-r", p["codec_r"], columns=both)

    p["run"] = _train(p["store"], base / "run")
    p["mrun"] = _train(p["mstore"], base / "mrun", shuffle_modalities=True)
    p["hsc_run"] = _train(p["mstore"], base / "hsc-run", modalities="hsc_image")  # a model of hsc_image alone
    p["run_r"] = _train(p["store_r"], base / "run-r")
    p["mrun_r"] = _train(p["mstore_r"], base / "mrun-r", shuffle_modalities=True)
    # refitted: the folder's weights are now another codec's (same config, same vocabulary)
    weights = "codecs/image/model.safetensors"
    (p["codec_r"] / weights).write_bytes((p["codec_b"] / weights).read_bytes())

    # embeddings whose token store is re-tokenised afterwards, and whose checkpoint's weights change afterwards
    p["store_x"] = _tokenise(survey_dir, base / "store-x", codec_dir)
    p["run_x"] = base / "run-x"
    shutil.copytree(p["run"], p["run_x"])
    p["emb"] = base / "emb"
    embed(EmbedConfig(checkpoint=p["run"], out=p["emb"], tokens=p["store"], device="cpu", progress=False))
    p["emb_x"] = base / "emb-x"
    embed(EmbedConfig(checkpoint=p["run_x"], out=p["emb_x"], tokens=p["store_x"], device="cpu", progress=False))
    p["emb_y"] = base / "emb-y"
    embed(EmbedConfig(checkpoint=p["run_x"], out=p["emb_y"], tokens=p["store"], device="cpu", progress=False))
    _tokenise(survey_dir, p["store_x"], codec_dir, limit=ROWS - 2, overwrite=True)  # re-tokenised: other rows
    steps = sorted((p["run_x"] / "checkpoints").glob("step-*"))
    (steps[-1] / "model.safetensors").write_bytes((steps[0] / "model.safetensors").read_bytes())  # another model

    import pandas as pd
    import pyarrow.parquet as pq

    cat = pd.concat([pq.read_table(f, columns=["object_id", "redshift"]).to_pandas()
                     for f in sorted(Path(survey_dir).glob("*.parquet"))])
    p["labels"] = base / "labels.csv"
    cat.to_csv(p["labels"], index=False)
    return p


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def _weights(codec: Path) -> str:
    return _sha(codec / "codecs/image/model.safetensors")


# ---------------------------------------------------------------------------------------------------------
# the matrix: consumer x mismatched producer -> one error naming both sides, nothing written


TRAIN = ["train", "--device", "cpu", "--max-iters", "3", "--batch-size", "4", "--eval-interval", "3",
         "--eval-iters", "1", "--val-images", "0", "--no-compile", "--val-fraction", "0.2"]
DECODE = ["decode", "--device", "cpu", "--no-progress", "--threads", "1", "--out", "{tmp}/out/d.png"]
MODEL = [*DECODE, "--rows", "0:2"]

# consumer -> argv ({tokens}, {run} or {mrun}: the producer's), the first being the command
CONSUMERS = {
    "train --resume": [*TRAIN, "--tokens", "{tokens}", "--out", "{run_copy}", "--resume"],
    "train --init-from": [*TRAIN, "--tokens", "{tokens}", "--out", "{tmp}/out", "--init-from", "{run}"],
    "embed": ["embed", "--checkpoint", "{run}", "--tokens", "{tokens}", "--out", "{tmp}/out", "--device", "cpu"],
    "decode stored": [*DECODE, "--tokens", "{tokens}", "--rows", "0:2"],
    "decode --compare": [*DECODE, "--tokens", "{tokens}", "--rows", "0:2", "--compare"],
    "decode --predict": [*MODEL, "--checkpoint", "{run}", "--tokens", "{tokens}", "--predict"],
    "decode --generate": [*DECODE, "--checkpoint", "{run}", "--tokens", "{tokens}", "--generate", "2"],
    "decode --complete-from": [*MODEL, "--checkpoint", "{run}", "--tokens", "{tokens}", "--complete-from", "500"],
    "decode cross-survey": [*MODEL, "--checkpoint", "{mrun}", "--tokens", "{tokens}", "--given",
                            "legacysurvey_image", "--generate-modality", "hsc_image"],
}
MODEL_CONSUMERS = [c for c in CONSUMERS if c not in ("decode stored", "decode --compare")]


def _other_codec(consumer):
    """A store made by another codec (same vocabulary) under a model of the first; for stored rows, the store
    decoded with the other codec (--codec)."""
    if consumer in ("decode stored", "decode --compare"):
        return {"tokens": "{store}", "extra": ["--codec", "{codec_b}"],
                "names": ["{store}", "{codec_b}", "{w_codec}", "{w_codec_b}"]}
    if consumer == "decode cross-survey":
        return {"tokens": "{mstore_b}", "mrun": "{mrun}", "names": ["{mrun}", "{mstore_b}", "{w_codec}", "{w_codec_b}"]}
    return {"tokens": "{store_b}", "run": "{run}", "names": ["{run}", "{store_b}", "{w_codec}", "{w_codec_b}"]}


def _other_bands(consumer):
    """A store of other modalities or bands: the one-column DES model on an HSC store; the two-survey model on a
    store without hsc_image."""
    if consumer == "decode cross-survey":
        return {"tokens": "{store}", "mrun": "{mrun}", "names": ["{mrun}", "{store}", "hsc_image"]}
    return {"tokens": "{hsc_store}", "run": "{run}", "names": ["{run}", "{hsc_store}", "DES-G", "HSC-G"]}


def _refitted(consumer):
    """The codec folder the store (and the model's tokens) were made with, refitted since: its weights differ
    from the sha256 the store recorded. train draws validation images with it; embed never decodes."""
    if consumer == "embed":
        return None
    names = ["{store_r}" if consumer != "decode cross-survey" else "{mstore_r}", "{codec_r}", "{w_codec}",
             "{w_codec_b}", "--accept-codec-change"]
    if consumer.startswith("train"):
        return {"tokens": "{store_r}", "run": "{run_r}", "extra": ["--val-images", "1"], "names": names}
    if consumer == "decode cross-survey":
        return {"tokens": "{mstore_r}", "mrun": "{mrun_r}", "names": names}
    return {"tokens": "{store_r}", "run": "{run_r}", "names": names}


PRODUCERS = {"other codec, same vocabulary": _other_codec, "other modalities or bands": _other_bands,
             "codec folder refitted": _refitted}
MATRIX = [(c, p) for c in CONSUMERS for p, make in PRODUCERS.items()
          if make(c) is not None and not (p == "other modalities or bands" and c in ("decode stored", "decode --compare"))]


def _paths(made, tmp_path) -> dict:
    return {**{k: str(v) for k, v in made.items()}, "tmp": str(tmp_path), "w_codec": _weights(made["codec"]),
            "w_codec_b": _weights(made["codec_b"])}


def _argv(consumer, case, made, tmp_path):
    paths = _paths(made, tmp_path)
    run = case.get("run", "{run}").format(**paths)
    if consumer == "train --resume":  # a private copy, named in the message: the run must come out unchanged
        shutil.copytree(run, tmp_path / "run-copy")
        run = paths["run_copy"] = str(tmp_path / "run-copy")
    paths.update(tokens=case["tokens"].format(**paths), run=run, mrun=case.get("mrun", "{mrun}").format(**paths))
    argv = [a.format(**paths) for a in CONSUMERS[consumer] + case.get("extra", [])]
    return argv, [n.format(**paths) for n in case["names"]], paths


@pytest.mark.parametrize("consumer,producer", MATRIX, ids=[f"{c} <- {p}" for c, p in MATRIX])
def test_a_mismatched_producer_is_one_error_naming_both_sides(consumer, producer, made, tmp_path, capsys):
    argv, names, paths = _argv(consumer, PRODUCERS[producer](consumer), made, tmp_path)
    before = {k: tree_digest(Path(paths[k])) for k in ("run_copy",) if k in paths}
    code, _, err = run_cli(argv, capsys)
    assert code == 1
    assert_one_error(code, err, *names)
    assert not (tmp_path / "out").exists(), sorted((tmp_path / "out").rglob("*"))
    for k, digest in before.items():
        assert tree_digest(Path(paths[k])) == digest  # the resumed run is untouched


# --- the probe's random-init baseline against embeddings whose sources changed since they were written

PROBE = ["probe", "--embeddings", "{emb}", "--labels", "{labels}", "--target", "redshift", "--folds", "2",
         "--out", "{tmp}/out", "--device", "cpu"]


@pytest.mark.parametrize("emb,names", [("emb_x", ["{emb_x}", "{store_x}", "re-run `astropt embed`"]),
                                       ("emb_y", ["{emb_y}", "{run_x}", "re-run `astropt embed`"])],
                         ids=["re-tokenised store", "checkpoint changed"])
def test_probe_refuses_embeddings_whose_sources_changed(emb, names, made, tmp_path, capsys):
    paths = _paths(made, tmp_path)
    code, _, err = run_cli([a.format(**{**paths, "emb": paths[emb]}) for a in PROBE], capsys)
    assert_one_error(code, err, *[n.format(**paths) for n in names])
    assert code == 1 and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# the matching combinations still work


@pytest.mark.parametrize("consumer", list(CONSUMERS))
def test_matching_artifacts_work(consumer, made, tmp_path, capsys):
    case = {"tokens": "{mstore}" if consumer == "decode cross-survey" else "{store}"}
    argv, _, paths = _argv(consumer, {**case, "names": []}, made, tmp_path)
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "error:" not in err
    written = list((tmp_path / "out").rglob("*")) + list((tmp_path / "run-copy").rglob("step-00000003"))
    assert written


def test_the_probe_baseline_works_on_unchanged_sources(made, tmp_path, capsys):
    paths = _paths(made, tmp_path)
    code, _, err = run_cli([a.format(**{**paths, "emb": paths["emb"]}) for a in PROBE], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["targets"]["redshift"]["n"] == ROWS


@pytest.mark.parametrize("consumer", ["decode stored", "decode --predict", "decode cross-survey", "train --resume"])
def test_accept_codec_change_decodes_with_a_refitted_codec_and_says_so(consumer, made, tmp_path, capsys):
    case = _refitted(consumer)
    argv, _, _ = _argv(consumer, case, made, tmp_path)
    code, out, err = run_cli([*argv, "--accept-codec-change"], capsys)
    assert code == 0, err
    said = out + err
    assert "note:" in said and "--accept-codec-change given" in said and _weights(made["codec_r"]) in said


def test_train_records_what_later_commands_check(made):
    from astropt_tok.store import TokenStore, manifest_sha256

    store = TokenStore(made["mstore"])
    for config in [made["hsc_run"] / "config.json",
                   *sorted((made["hsc_run"] / "checkpoints").glob("step-*/config.json"))]:
        rec = json.loads(config.read_text())["store"]
        assert rec["codec_sha256"] == store.manifest["codec"]["weights_sha256"] and rec["codec_id"] == store.codec_id
        assert rec["modalities"] == {"legacysurvey_image": list(DES), "hsc_image": list(HSC_BANDS)}
        assert rec["manifest_sha256"] == manifest_sha256(made["mstore"]) and rec["id_column"] == "object_id"
        assert rec["bands"] == list(DES) and rec["dir"] == str(made["mstore"].resolve())  # the older keys


# ---------------------------------------------------------------------------------------------------------
# decode draws the bands of the modality it decodes


@pytest.mark.parametrize("mode", [["--predict", "--rows", "0:2"], ["--generate", "2"], ["--complete-from", "500", "--rows", "0:2"]])
def test_a_model_of_hsc_alone_decodes_and_draws_hsc(mode, made, tmp_path, capsys):
    """A model trained with --modalities hsc_image on a store whose first column is the Legacy Survey reads and
    writes hsc_image tokens: they are decoded in HSC bands and drawn as HSC i, r, g."""
    from astropt_tok.store import TokenStore

    code, out, err = run_cli(["decode", "--checkpoint", made["hsc_run"], "--tokens", made["mstore"], "--device", "cpu",
                              "--no-progress", "--threads", "1", "--out", tmp_path / "d.png", "--json", *mode], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["bands"] == list(HSC_BANDS) and summary["rgb"] == ["HSC-I", "HSC-R", "HSC-G"]
    assert summary["modality"] == "hsc_image"
    if "--predict" in mode:  # the stored tokens it was given are the HSC ones
        from astropt_train.use.decode import DecodeConfig, decode

        result = decode(DecodeConfig(checkpoint=made["hsc_run"], tokens=made["mstore"], rows="0:2", predict=True,
                                     out=tmp_path / "p.png", device="cpu", threads=1, progress=False))
        stored = TokenStore(made["mstore"]).take(np.arange(2), "hsc_image")
        assert (result.tokens[:, 0] == stored[:, 0]).all() and result.bands == list(HSC_BANDS)


def test_a_store_of_hsc_alone_is_drawn_in_hsc_colours(made, tmp_path, capsys):
    code, out, err = run_cli(["decode", "--tokens", made["hsc_store"], "--rows", "0:2", "--device", "cpu",
                              "--no-progress", "--out", tmp_path / "d.png", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)  # not the DES default, which would decode DES bands from HSC tokens to draw them
    assert summary["bands"] == list(HSC_BANDS) and summary["rgb"] == ["HSC-I", "HSC-R", "HSC-G"]


# ---------------------------------------------------------------------------------------------------------
# a keep-partial store under a model of one unnamed column: a missing image is never embedded as a galaxy


def test_an_upstream_model_never_embeds_a_missing_image(made, tmp_path, capsys):
    from astropt_tok.store import TokenStore, write_store_from_arrays
    from astropt_train.use.embed import read_embeddings
    from astropt_train.use.interop import export_astropt

    store = TokenStore(made["mstore"])
    rows = np.arange(store.num_rows)
    tokens = {m: store.take(rows, m) for m in store.modalities}
    valid = {m: np.ones(len(rows), bool) for m in store.modalities}
    valid["legacysurvey_image"][[1, 4]] = False
    tokens["legacysurvey_image"][[1, 4]] = 0  # what tokenise --keep-partial stores for a missing image
    write_store_from_arrays(tmp_path / "partial", tokens, 2, store.manifest["codec"], store.modality_bands,
                            object_ids=[f"g{i}" for i in rows], valid=valid)
    export_astropt(made["run"], tmp_path / "upstream")
    code, _, err = run_cli(["embed", "--checkpoint", tmp_path / "upstream", "--tokens", tmp_path / "partial",
                            "--out", tmp_path / "emb", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "records no token store" in err  # an upstream model: nothing to check it against, and it says so
    emb, _, ids = read_embeddings(tmp_path / "emb")
    assert np.isnan(emb).all(1).tolist() == [i in (1, 4) for i in rows]
    (tmp_path / "labels.csv").write_text("object_id,mass\n" + "".join(f"g{i},{i % 5 + 0.1 * i}\n" for i in rows))
    code, _, err = run_cli(["probe", "--embeddings", tmp_path / "emb", "--labels", tmp_path / "labels.csv", "--target",
                            "mass", "--folds", "2", "--out", tmp_path / "probe", "--device", "cpu"], capsys)
    assert code == 0, err
    entry = json.loads((tmp_path / "probe" / "report.json").read_text())["targets"]["mass"]
    assert entry["n"] == len(rows) - 2 and entry["left_out"]["no_embedding"] == 2


# ---------------------------------------------------------------------------------------------------------
# tokenise: a re-run with other recorded settings is refused, the id column included


def test_a_tokenise_rerun_with_another_id_column_is_refused(made, tmp_path, capsys):
    out = tmp_path / "store"
    shutil.copytree(made["store"], out)
    before = tree_digest(out)
    argv = ["tokenise", "--source", made["survey"], "--out", out, "--shards", "2", "--codec", made["codec"],
            "--batch-size", "6", "--device", "cpu", "--no-progress", "--limit", str(ROWS)]
    code, _, err = run_cli([*argv, "--id-column", "no_such_column"], capsys)
    assert_one_error(code, err, str(out), "source.id_column", "--overwrite")
    assert tree_digest(out) == before
    code, _, err = run_cli(argv, capsys)  # the same settings: nothing to do, nothing changed
    assert code == 0, err
    assert tree_digest(out) == before


def test_a_key_an_older_manifest_lacks_is_not_a_difference():
    from astropt_tok.executor import check_rerun

    wanted = {"codec": {"weights_sha256": "a"}, "source": {"id": "s", "kind": "local", "id_column": "object_id",
                                                           "revision": None, "files": []}}
    older = json.loads(json.dumps(wanted))
    for key in ("kind", "id_column", "revision"):
        del older["source"][key]
    assert check_rerun(older, wanted) == []
    assert check_rerun({**wanted, "source": {**wanted["source"], "id_column": "objid"}}, wanted) == ["source.id_column"]
    assert check_rerun({**wanted, "source": {**wanted["source"], "id_column": None}}, wanted) == ["source.id_column"]
    hub = {**wanted, "source": {**wanted["source"], "revision": "abc"}}
    assert check_rerun(hub, {**wanted, "source": {**wanted["source"], "revision": "def"}}) == ["source.revision"]
    assert check_rerun(hub, wanted) == []  # a revision one side could not resolve (offline) is not a difference
