"""Hostile input to the newer commands and flags (embed, probe, export, fit-codec, runs, tokenise --column,
train --head/--modalities/--loss-chunks/--init-from, decode --given/--generate-modality): every mistake is one
`error:` line naming the thing, a non-zero exit, no traceback, and no output left behind.

Everything runs in this process through `astropt_tok.cli.main(argv)` on one tiny real store of each kind, one
trained run of each kind, and one embeddings store, made once for the module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_hostile import HOLD_LOCK, REPO, assert_one_error, run_cli, temporaries, tiny_tmpfs  # noqa: F401 (a fixture)
from test_hostile import fill as fill_disk

# ---------------------------------------------------------------------------------------------------------
# fixtures: a one-column and a two-column store of the synthetic survey, a run trained on each, embeddings


TWO_COLUMNS = ["--column", "legacysurvey_image:DES-G,DES-R,DES-I,DES-Z",
               "--column", "hsc_image:HSC-G,HSC-R,HSC-I,HSC-Z,HSC-Y"]


@pytest.fixture(scope="module")
def made(tmp_path_factory, survey_dir, codec_dir):
    """{name: path} of everything the cases refer to as {name}."""
    from astropt_tok.tokenise import TokeniseConfig, parse_columns, tokenise
    from astropt_train.config import build_config
    from astropt_train.loop import train
    from astropt_train.use.embed import EmbedConfig, embed
    from astropt_train.use.interop import export_astropt

    base = tmp_path_factory.mktemp("hostile-use")
    common = dict(source=str(survey_dir), shards=2, codec=str(codec_dir), batch_size=20, device="cpu", progress=False)
    tokenise(TokeniseConfig(out=str(base / "store"), **common))
    single, bands, modalities = parse_columns(TWO_COLUMNS[1::2], None)
    tokenise(TokeniseConfig(out=str(base / "mstore"), column=single, bands=bands, modalities=modalities, **common))
    for store, run in (("store", "run"), ("mstore", "mrun")):
        train(build_config(dict(tokens=str(base / store), out=str(base / run), device="cpu", max_iters=2,
                                batch_size=4, eval_interval=2, eval_iters=1, log_interval=1, val_images=0,
                                preset="tiny", live=False)))
    embed(EmbedConfig(checkpoint=base / "run", out=base / "emb", device="cpu", progress=False))
    export_astropt(base / "run", base / "export")
    labels = base / "labels"
    labels.mkdir()
    import pandas as pd
    import pyarrow.parquet as pq

    cat = pd.concat([pq.read_table(f, columns=["object_id", "redshift", "morphology"]).to_pandas()
                     for f in sorted(Path(survey_dir).glob("*.parquet"))])
    cat.assign(constant=1.0, nothing=float("nan"), one_class="disk").to_csv(labels / "labels.csv", index=False)
    cat.drop(columns=["object_id"]).to_csv(labels / "no_id.csv", index=False)
    cat.head(3).to_csv(labels / "three.csv", index=False)
    (base / "afile").write_text("not a folder")
    (base / "flat").mkdir()  # the survey's files under names that mark no split
    for i, f in enumerate(sorted(Path(survey_dir).glob("*.parquet"))):
        shutil.copy(f, base / "flat" / f"galaxies-{i}.parquet")
    return {"store": base / "store", "mstore": base / "mstore", "run": base / "run", "mrun": base / "mrun",
            "emb": base / "emb", "export": base / "export", "labels": labels, "survey": Path(survey_dir),
            "codec": Path(codec_dir), "afile": base / "afile", "flat": base / "flat", "probe_out": base / "probe-out"}


def fill(items, paths: dict) -> list[str]:
    return [str(x).format(**paths) for x in items]


def check(argv, names, made, tmp_path, capsys) -> str:
    """Run argv ({name} filled in from `made`, {tmp} = tmp_path): one error naming each of `names`, and
    no file but a released lock written under {tmp}/out."""
    paths = {**made, "tmp": tmp_path}
    code, _, err = run_cli(fill(argv, paths), capsys)
    line = assert_one_error(code, err, *fill(names, paths))
    out = tmp_path / "out"
    written = [p for p in out.rglob("*") if p.is_file() and p.name != ".astropt.lock"] if out.exists() else []
    assert not written, written
    return line


EMBED = ["embed", "--checkpoint", "{run}", "--out", "{tmp}/out", "--device", "cpu"]
PROBE = ["probe", "--embeddings", "{emb}", "--labels", "{labels}/labels.csv", "--out", "{tmp}/out", "--device", "cpu"]
SLOW_PROBE = [*PROBE[:-3], "{probe_out}", "--device", "cpu"]  # shares the random-init baseline between cases
FIT = ["fit-codec", "--source", "{survey}", "--out", "{tmp}/out", "--steps", "1", "--batch-size", "4", "--device",
       "cpu", "--no-progress", "--hidden", "8", "--projection", "4"]
TOKENISE = ["tokenise", "--source", "{survey}", "--out", "{tmp}/out", "--shards", "2", "--codec", "{codec}",
            "--batch-size", "20", "--device", "cpu", "--no-progress"]
TRAIN = ["train", "--tokens", "{store}", "--out", "{tmp}/out", "--device", "cpu", "--max-iters", "1",
         "--batch-size", "4", "--eval-interval", "1", "--eval-iters", "1", "--val-images", "0", "--preset", "tiny"]
MTRAIN = [*TRAIN[:2], "{mstore}", *TRAIN[3:]]
CROSS = ["decode", "--checkpoint", "{mrun}", "--out", "{tmp}/out/d.png", "--device", "cpu", "--no-progress",
         "--rows", "0:2"]

STORED = ["decode", "--tokens", "{store}", "--out", "{tmp}/out/d.png", "--device", "cpu", "--rows", "0"]

CASES = {
    # embed
    "embed batch 0": ([*EMBED, "--batch-size", "0"], ["--batch-size"]),
    "embed limit negative": ([*EMBED, "--limit", "-5"], ["--limit", "-5"]),
    "embed unknown pool": ([*EMBED, "--pool", "max"], ["--pool", "max"]),
    "embed layer past the model": ([*EMBED, "--layer", "99"], ["--layer", "99"]),
    "embed layer nan": ([*EMBED, "--layer", "nan"], ["--layer", "nan"]),
    "embed layer twice": ([*EMBED, "--layer", "1,1"], ["--layer", "twice"]),
    "embed rows reversed": ([*EMBED, "--rows", "5:2"], ["--rows", "5:2"]),
    "embed dtype": ([*EMBED, "--dtype", "int8"], ["--dtype", "int8"]),
    "embed device": ([*EMBED, "--device", "tpu"], ["--device", "tpu"]),
    "embed missing step": ([*EMBED, "--step", "7"], ["step 7"]),
    "embed missing checkpoint": (["embed", "--checkpoint", "{tmp}/nope", "--out", "{tmp}/out"], ["{tmp}/nope"]),
    "embed checkpoint is a store": (["embed", "--checkpoint", "{store}", "--out", "{tmp}/out"],
                                    ["{store}", "no checkpoint"]),
    "embed out is a file": ([*EMBED[:4], "{afile}", *EMBED[5:]], ["{afile}", "file"]),
    "embed missing tokens": ([*EMBED, "--tokens", "{tmp}/nope"], ["{tmp}/nope"]),
    "embed verify a token store": (["embed", "--verify", "{store}"], ["{store}", "not an embeddings store"]),
    "embed verify nothing": (["embed", "--verify", "{tmp}/nope"], ["{tmp}/nope", "does not exist"]),
    "verify --finalize an embeddings store": (["verify", "{emb}", "--finalize"],
                                              ["{emb}", "embeddings store", "astropt embed"]),
    "embed usage type": ([*EMBED, "--batch-size", "many"], ["--batch-size", "astropt embed --help"]),
    # probe
    "probe one fold": ([*PROBE, "--target", "redshift", "--folds", "1"], ["--folds"]),
    "probe negative seed": ([*PROBE, "--target", "redshift", "--seed", "-1"], ["--seed", "-1"]),
    "probe unknown task": ([*PROBE, "--target", "redshift", "--task", "cluster"], ["--task", "cluster"]),
    "probe target twice": ([*PROBE, "--target", "redshift", "--target", "redshift"], ["redshift", "more than once"]),
    "probe target is the id": ([*PROBE, "--target", "object_id"], ["object_id", "id column"]),
    "probe unknown target": ([*PROBE, "--target", "mass"], ["labels.csv", "mass"]),
    "probe labels without id column": ([*PROBE[:4], "{labels}/no_id.csv", *PROBE[5:], "--target", "redshift"],
                                       ["no_id.csv", "object_id"]),
    "probe missing labels": ([*PROBE[:4], "{tmp}/nope.csv", *PROBE[5:], "--target", "redshift"], ["{tmp}/nope.csv"]),
    "probe unknown column": ([*PROBE, "--target", "redshift", "--column", "nope"], ["nope", "embedding"]),
    "probe missing embeddings": ([PROBE[0], PROBE[1], "{tmp}/nope", *PROBE[3:], "--target", "redshift"],
                                 ["{tmp}/nope"]),
    "probe embeddings is a token store": ([PROBE[0], PROBE[1], "{store}", *PROBE[3:], "--target", "redshift"],
                                          ["{store}", "not an embeddings store"]),
    "probe out is a file": ([*PROBE[:6], "{afile}", *PROBE[7:], "--target", "redshift"], ["{afile}", "file"]),
    "probe regression on strings": ([*SLOW_PROBE, "--target", "morphology", "--task", "regression"],
                                    ["disk", "classification"]),
    "probe all-nan target": ([*SLOW_PROBE, "--target", "nothing"], ["nothing", "only 0 rows"]),
    "probe constant target": ([*SLOW_PROBE, "--target", "constant"], ["constant", "one value"]),
    "probe single class": ([*SLOW_PROBE, "--target", "one_class"], ["one_class", "single class"]),
    "probe fewer rows than folds": ([*SLOW_PROBE[:4], "{labels}/three.csv", *SLOW_PROBE[5:], "--target",
                                     "redshift"], ["redshift", "only 3 rows", "5 folds"]),
    "probe image column as target": ([*PROBE[:4], "{survey}", *PROBE[5:], "--target", "legacysurvey_image"],
                                     ["legacysurvey_image", "scalar"]),
    "probe classes of a continuous column": ([*SLOW_PROBE, "--target", "redshift", "--task", "classification"],
                                             ["redshift", "40 classes", "--task regression"]),
    "probe more folds than rows": ([*SLOW_PROBE, "--target", "redshift", "--folds", "100"], ["100 folds"]),
    "probe more folds than the largest class": ([*SLOW_PROBE, "--target", "morphology", "--folds", "20"],
                                                ["morphology", "largest class has 15", "20 folds", "--folds 15"]),
    # export
    "export missing run": (["export", "{tmp}/nope", "--astropt", "{tmp}/out"], ["{tmp}/nope"]),
    "export out is a file": (["export", "{run}", "--astropt", "{afile}"], ["{afile}", "file"]),
    "export missing step": (["export", "{run}", "--astropt", "{tmp}/out", "--step", "9"], ["step 9"]),
    "export a store": (["export", "{store}", "--astropt", "{tmp}/out"], ["{store}", "no checkpoint"]),
    # runs
    "runs missing": (["runs", "{tmp}/nope"], ["{tmp}/nope", "does not exist"]),
    "runs a file": (["runs", "{afile}"], ["{afile}", "metrics.jsonl"]),
    "runs a store": (["runs", "{store}"], ["{store}", "metrics.jsonl"]),
    "runs out is a folder": (["runs", "{run}", "--out", "{tmp}"], ["--out", ".png"]),
    # fit-codec
    "fit band the codec lacks": ([*FIT, "--bands", "DES-G,WISE-W1"], ["WISE-W1"]),
    "fit band twice": ([*FIT, "--bands", "DES-G,DES-G"], ["DES-G", "more than once"]),
    "fit no band": ([*FIT, "--bands", ","], ["--bands"]),
    "fit bands the column lacks": ([*FIT, "--column", "hsc_image"], ["0 good rows", "DES-G"]),
    "fit unknown column": ([*FIT, "--column", "nope_image"], ["nope_image"]),
    "fit column not an image": ([*FIT, "--column", "redshift"], ["redshift", "not an image"]),
    "fit missing source": ([*FIT[:2], "{tmp}/nope", *FIT[3:]], ["{tmp}/nope"]),
    "fit zero steps": ([*FIT, "--steps", "0"], ["--steps"]),
    "fit lr nan": ([*FIT, "--lr", "nan"], ["--lr", "nan"]),
    "fit lr inf": ([*FIT, "--lr", "inf"], ["--lr", "inf"]),
    "fit lr negative": ([*FIT, "--lr", "-1"], ["--lr"]),
    "fit holdout nan": ([*FIT, "--holdout", "nan"], ["--holdout"]),
    "fit holdout one": ([*FIT, "--holdout", "1"], ["--holdout"]),
    "fit hidden zero": ([*FIT, "--hidden", "0"], ["--hidden"]),
    "fit hidden odd": ([*FIT, "--hidden", "7"], ["--hidden", "multiple of 4"]),
    "fit negative seed": ([*FIT, "--seed", "-1"], ["--seed"]),
    "fit zero threads": ([*FIT, "--threads", "0"], ["--threads"]),
    "fit one row": ([*FIT, "--limit", "1"], ["1 good rows", "at least 2"]),
    "fit missing init": ([*FIT, "--init", "{tmp}/nope"], ["{tmp}/nope"]),
    "fit init is a store": ([*FIT, "--init", "{store}"], ["{store}", "hub layout"]),
    "fit colour weight nan": ([*FIT, "--colour-weight", "nan"], ["--colour-weight", "nan"]),
    "fit colour weight negative": ([*FIT, "--colour-weight", "-1"], ["--colour-weight"]),
    "fit column twice": ([*FIT, "--column", "hsc_image:HSC-G", "--column", "hsc_image:HSC-R"],
                         ["hsc_image", "more than once"]),
    "fit column mixes surveys": ([*FIT, "--column", "legacysurvey_image:DES-G", "--column", "hsc_image:HSC-G,DES-R"],
                                 ["--column hsc_image", "mix surveys"]),
    "fit column without bands": ([*FIT, "--column", "legacysurvey_image:DES-G", "--column", "hsc_image:"],
                                 ["hsc_image:", "NAME:BAND"]),
    "fit bands with several columns": ([*FIT, "--column", "legacysurvey_image:DES-G", "--column", "hsc_image:HSC-G",
                                        "--bands", "DES-G"], ["--bands", "single --column"]),
    "fit device": ([*FIT, "--device", "tpu"], ["--device", "tpu"]),
    "fit usage type": ([*FIT, "--lr", "fast"], ["--lr", "astropt fit-codec --help"]),
    # tokenise --column
    "column empty bands": ([*TOKENISE, "--column", "legacysurvey_image:"], ["legacysurvey_image:"]),
    "column empty name": ([*TOKENISE, "--column", ":DES-G"], [":DES-G"]),
    "column two colons": ([*TOKENISE, "--column", "legacysurvey_image:DES-G:DES-R"], ["DES-G:DES-R", "NAME:BAND"]),
    "column commas only": ([*TOKENISE, "--column", "legacysurvey_image:,,"], ["legacysurvey_image:,,"]),
    "column twice": ([*TOKENISE, "--column", "legacysurvey_image:DES-G", "--column", "legacysurvey_image:DES-R"],
                     ["legacysurvey_image", "twice"]),
    "column unknown": ([*TOKENISE, "--column", "nope_image:DES-G", "--column", "hsc_image:HSC-G"], ["nope_image"]),
    "column not an image": ([*TOKENISE, "--column", "redshift:DES-G", "--column", "hsc_image:HSC-G"],
                            ["redshift", "not an image"]),
    "column band the codec lacks": ([*TOKENISE, "--column", "legacysurvey_image:DES-G,WISE-W1", "--column",
                                     "hsc_image:HSC-G"], ["legacysurvey_image", "WISE-W1"]),
    "column band twice": ([*TOKENISE, "--column", "legacysurvey_image:DES-G,DES-G", "--column", "hsc_image:HSC-G"],
                          ["DES-G", "more than once"]),
    "column and --bands": ([*TOKENISE, *TWO_COLUMNS, "--bands", "DES-G"], ["--bands", "--column"]),
    "column without bands beside one with": ([*TOKENISE, "--column", "legacysurvey_image", "--column",
                                              "hsc_image:HSC-G"], ["legacysurvey_image", "NAME:BAND"]),
    # --split of a local source
    "tokenise split the folder lacks": ([*TOKENISE, "--split", "test"], ["{survey}", "no split 'test'", "train"]),
    "fit split the folder lacks": ([*FIT, "--split", "validation"], ["{survey}", "no split 'validation'"]),
    "tokenise split of a folder without splits": ([*TOKENISE[:2], "{flat}", *TOKENISE[3:], "--split", "test"],
                                                  ["--split test", "{flat}", "no splits"]),
    "fit split of a folder without splits": ([*FIT[:2], "{flat}", *FIT[3:], "--split", "test"],
                                             ["--split test", "{flat}", "no splits"]),
    "fit split of files named otherwise": ([*FIT[:2], "{survey}/*.parquet", *FIT[3:], "--split", "test"],
                                           ["--split test", "train-00000-of-00002.parquet"]),
    "keep-partial with one column": ([*TOKENISE, "--keep-partial"], ["--keep-partial"]),
    # train
    "train unknown head": ([*TRAIN, "--head", "mlp"], ["head", "mlp"]),
    "train zero loss chunks": ([*TRAIN, "--loss-chunks", "0"], ["loss-chunks"]),
    "train loss chunks word": ([*TRAIN, "--loss-chunks", "some"], ["--loss-chunks", "astropt train --help"]),
    "train deterministic takes no value": ([*TRAIN, "--deterministic", "yes"], ["yes"]),
    "train unknown modality": ([*MTRAIN, "--modalities", "legacysurvey_image,nope"], ["--modalities", "nope"]),
    "train modality twice": ([*MTRAIN, "--modalities", "hsc_image,hsc_image"], ["--modalities", "hsc_image"]),
    "train no modality": ([*MTRAIN, "--modalities", ","], ["--modalities"]),
    "train modalities of a one-column store": ([*TRAIN, "--modalities", "hsc_image"], ["--modalities", "{store}"]),
    "train init from nothing": ([*TRAIN, "--init-from", "{tmp}/nope"], ["{tmp}/nope"]),
    "train init from a store": ([*TRAIN, "--init-from", "{store}"], ["{store}", "no checkpoint"]),
    "train init from other shape": ([*TRAIN, "--init-from", "{run}", "--n-embd", "32"], ["--init-from", "{run}"]),
    "train init from two surveys on one": ([*TRAIN, "--init-from", "{mrun}"],
                                           ["--init-from", "legacysurvey_image,hsc_image", "images_aion"]),
    "train init from one survey on two": ([*MTRAIN, "--init-from", "{export}/ckpt.pt"],
                                          ["--init-from", "images_aion", "legacysurvey_image,hsc_image"]),
    # decode across surveys
    "given equals generated": ([*CROSS, "--given", "hsc_image", "--generate-modality", "hsc_image"],
                               ["hsc_image", "two modalities"]),
    "given unknown": ([*CROSS, "--given", "nope", "--generate-modality", "hsc_image"], ["--given nope", "{mrun}"]),
    "generated unknown": ([*CROSS, "--given", "hsc_image", "--generate-modality", "nope"],
                          ["--generate-modality nope"]),
    "given alone": ([*CROSS, "--given", "hsc_image"], ["--generate-modality"]),
    "generated alone": ([*CROSS, "--generate-modality", "hsc_image"], ["--given"]),
    "given to a one-survey model": (["decode", "--checkpoint", "{run}", "--out", "{tmp}/out/d.png", "--rows", "0:2",
                                     "--given", "legacysurvey_image", "--generate-modality", "hsc_image"],
                                    ["--given", "{run}", "one image column"]),
    "given without a model": (["decode", "--tokens", "{mstore}", "--out", "{tmp}/out/d.png", "--rows", "0:2",
                               "--given", "legacysurvey_image", "--generate-modality", "hsc_image"],
                              ["--checkpoint"]),
    "given with --predict": ([*CROSS, "--given", "legacysurvey_image", "--generate-modality", "hsc_image",
                              "--predict"], ["--predict", "--given"]),
    "given from a one-column store": ([*CROSS, "--tokens", "{store}", "--given", "legacysurvey_image",
                                       "--generate-modality", "hsc_image"], ["{store}", "{mrun}", "hsc_image"]),
    "given temperature nan": ([*CROSS, "--given", "legacysurvey_image", "--generate-modality", "hsc_image",
                               "--temperature", "nan"], ["--temperature", "nan"]),
    "decode device": ([*CROSS, "--device", "tpu"], ["--device", "tpu"]),
    # the other commands' flags, beside test_hostile.py's
    "tokenise format": ([*TOKENISE, "--format", "parquet"], ["--format", "parquet"]),
    "tokenise workers negative": ([*TOKENISE, "--workers", "-1"], ["--workers", "-1"]),
    "tokenise precision": ([*TOKENISE, "--precision", "fp8"], ["--precision", "fp8"]),
    "tokenise reader": ([*TOKENISE, "--reader", "arrow"], ["--reader", "arrow"]),
    "fit layers zero": ([*FIT, "--layers", "0"], ["--layers"]),
    "fit projection zero": ([*FIT, "--projection", "0"], ["--projection"]),
    "fit warmup negative": ([*FIT, "--warmup", "-1"], ["--warmup"]),
    "fit colour weight nan": ([*FIT, "--colour-weight", "nan"], ["--colour-weight", "nan"]),
    "fit colour weight negative": ([*FIT, "--colour-weight", "-1"], ["--colour-weight"]),
    "train zero layers": ([*TRAIN, "--n-layer", "0"], ["n_layer (0)"]),
    "train zero heads": ([*TRAIN, "--n-head", "0"], ["n_head (0)"]),
    "train zero width": ([*TRAIN, "--n-embd", "0"], ["n_embd (0)"]),
    "train heads not dividing the width": ([*TRAIN, "--n-head", "3"], ["n_head (3)"]),
    "train unknown preset": ([*TRAIN, "--preset", "huge"], ["huge"]),
    "train zero grad accum": ([*TRAIN, "--grad-accum", "0"], ["grad-accum"]),
    "train negative warmup": ([*TRAIN, "--warmup-iters", "-1"], ["warmup-iters"]),
    "train negative decay": ([*TRAIN, "--lr-decay-iters", "-5"], ["lr-decay-iters", "-5"]),
    "train unknown log": ([*TRAIN, "--log", "nope"], ["log", "nope"]),
    "train negative workers": ([*TRAIN, "--workers", "-1"], ["workers", "-1"]),
    "train unknown store reads": ([*TRAIN, "--store-reads", "nope"], ["store-reads", "nope"]),
    "train negative checkpoint interval": ([*TRAIN, "--checkpoint-interval", "-1"], ["checkpoint-interval"]),
    "train keep no checkpoint": ([*TRAIN, "--keep-last", "0"], ["keep-last"]),
    "train dtype": ([*TRAIN, "--dtype", "int8"], ["dtype", "int8"]),
    "train missing config": ([*TRAIN, "--config", "{tmp}/nope.toml"], ["{tmp}/nope.toml"]),
    "decode unknown id": ([*STORED[:-2], "--ids", "nope"], ["nope"]),
    "decode random zero": ([*STORED[:-2], "--random", "0"], ["--random"]),
    "decode random past the store": ([*STORED[:-2], "--random", "1000"], ["--random 1000", "40 rows"]),
    "decode two rgb bands": ([*STORED, "--rgb", "DES-G,DES-R"], ["3 bands"]),
    "decode unknown band": ([*STORED, "--bands", "X"], ["'X'"]),
    "decode flux as text": ([*STORED, "--save-flux", "{tmp}/out/f.txt"], ["--save-flux", "f.txt"]),
    "decode complete from too many": (["decode", "--checkpoint", "{run}", "--out", "{tmp}/out/d.png", "--rows", "0",
                                       "--complete-from", "9999"], ["--complete-from", "9999"]),
    "decode zero batch": ([*CROSS, "--batch-size", "0"], ["--batch-size"]),
    "demo workdir is a file": (["demo", "--workdir", "{afile}"], ["{afile}", "file"]),
    "demo missing codec": (["demo", "--workdir", "{tmp}/out", "--codec", "{tmp}/nope"], ["{tmp}/nope"]),
    "demo codec is a store": (["demo", "--workdir", "{tmp}/out", "--codec", "{store}"], ["{store}", "hub layout"]),
    "demo limit word": (["demo", "--workdir", "{tmp}/out", "--limit", "some"], ["--limit", "astropt demo --help"]),
    "demo missing source": (["demo", "--workdir", "{tmp}/out", "--source", "{tmp}/nope"], ["{tmp}/nope"]),
    "probe negative baseline seed": ([*PROBE, "--target", "redshift", "--random-init-seed", "-1"],
                                     ["--random-init-seed", "-1"]),
    "info of an embeddings store": (["info", "{emb}"], ["{emb}", "embeddings store", "astropt verify"]),
    "export negative step": (["export", "{run}", "--astropt", "{tmp}/out", "--step", "-1"], ["step -1"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_use_is_one_error(case, made, capsys, tmp_path):
    argv, names = CASES[case]
    check(argv, names, made, tmp_path, capsys)


def test_a_second_embed_into_one_folder_is_refused(made, capsys, tmp_path):
    """`astropt embed` holds its --out folder's lock: while another process holds it, embed is one error naming
    the folder and the holder and writes nothing; once it is released embed runs, and --overwrite keeps the lock."""
    out = tmp_path / "out"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), "`astropt embed`", "exclusive"], cwd=REPO,
                             text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert other.stdout.readline() == "locked\n"
        line = check(EMBED, ["{tmp}/out", "in use"], made, tmp_path, capsys)
    finally:
        other.stdin.close()
        other.wait(timeout=60)
    assert "`astropt embed`" in line and f"pid {other.pid}" in line
    for extra in ([], ["--pool", "last", "--overwrite"]):  # embed took the lock itself, and keeps it through a clear
        code, _, err = run_cli(fill([*EMBED, *extra], {**made, "tmp": tmp_path}), capsys)
        assert code == 0, err
        assert json.loads((out / ".astropt.lock").read_text())["command"] == "`astropt embed`"
    assert json.loads((out / "manifest.json").read_text())["pool"] == "last"


DEMO_FLAGS = {"--rows": "0", "--steps": "0", "--limit": "0", "--seed": "-1", "--threads": "-1", "--device": "tpu"}


@pytest.mark.parametrize("flag", list(DEMO_FLAGS))
def test_a_bad_demo_flag_is_named_alone(flag, made, capsys, tmp_path):
    """Each bad `astropt demo` value is its own error naming that flag and value, and no other flag."""
    line = check(["demo", "--workdir", "{tmp}/out", flag, DEMO_FLAGS[flag]], [flag, DEMO_FLAGS[flag]], made, tmp_path,
                 capsys)
    assert not [other for other in DEMO_FLAGS if other != flag and other in line], line


# ---------------------------------------------------------------------------------------------------------
# damaged files


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


EMBEDDINGS_DAMAGE = {
    "truncated": (lambda p: p.write_text(p.read_text()[:100]), "not JSON"),
    "not an object": (lambda p: p.write_text("[1, 2]"), "not a JSON object"),
    "no layers": (lambda p: _edit(p, lambda m: m.pop("layers")), "layers is missing"),
    "no shards": (lambda p: _edit(p, lambda m: m.pop("shards")), "shards is missing"),
    "n_embd a string": (lambda p: _edit(p, lambda m: m.update(n_embd="x")), "n_embd is 'x'"),
    "shard outside the store": (lambda p: _edit(p, lambda m: m["shards"][0].update(file="../../x")),
                                "shards[0].file"),
    "layer without column": (lambda p: _edit(p, lambda m: m["layers"][0].pop("column")), "layers[0].column"),
}


@pytest.mark.parametrize("command", ["embed --verify", "probe"])
@pytest.mark.parametrize("damage", list(EMBEDDINGS_DAMAGE))
def test_damaged_embeddings_manifest_is_one_error(damage, command, made, capsys, tmp_path):
    emb = tmp_path / "emb"
    shutil.copytree(made["emb"], emb)
    change, what = EMBEDDINGS_DAMAGE[damage]
    change(emb / "manifest.json")
    if command == "embed --verify":  # verify reports what the readers refuse as a BAD line
        code, _, err = run_cli(["embed", "--verify", emb], capsys)
        assert code == 1 and err.startswith("BAD manifest.json: ") and len(err.splitlines()) == 1, err
        assert str(emb) in err and what in err, err
        return
    check([PROBE[0], PROBE[1], emb, *PROBE[3:], "--target", "redshift"], [str(emb), what], made, tmp_path, capsys)


def test_damaged_embeddings_shard_is_named_by_verify_and_redone_by_embed(made, capsys, tmp_path):
    emb = tmp_path / "emb"
    shutil.copytree(made["emb"], emb)
    shard = emb / "shard-00001.arrow"
    good = shard.read_bytes()
    shard.write_bytes(good[:500])
    for verify in (["embed", "--verify", emb], ["verify", emb]):  # `astropt verify` knows an embeddings store
        code, _, err = run_cli(verify, capsys)
        assert code == 1 and err.startswith("BAD shard-00001.arrow") and "Traceback" not in err
    code, out, err = run_cli(["embed", "--checkpoint", made["run"], "--out", emb, "--device", "cpu"], capsys)
    assert code == 0, err
    assert "1 already done" in out and shard.read_bytes() == good
    code, out, err = run_cli(["verify", emb], capsys)
    assert code == 0 and out.startswith(f"OK {emb}"), err


METRICS_DAMAGE = {
    "binary": (b"\xff\xfe\x00\x01", ["metrics.jsonl", "not UTF-8"]),
    "garbage line": (b'{"step": 1, "loss": \ngarbage\n{"step": 2, "loss": 1.0}\n', ["metrics.jsonl", "line 1"]),
    "strings for numbers": (b'{"step": "a", "loss": "x"}\n{"step": 2}\n', ["metrics.jsonl", "line 1"]),
    "not objects": (b'[1, 2]\n{"step": 2}\n', ["metrics.jsonl", "line 1"]),
}


@pytest.mark.parametrize("damage", list(METRICS_DAMAGE))
def test_damaged_metrics_is_one_error_for_runs(damage, made, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(made["run"], run)
    text, names = METRICS_DAMAGE[damage]
    (run / "metrics.jsonl").write_bytes(text)
    check(["runs", run], [str(run), *names], made, tmp_path, capsys)


def test_a_line_cut_by_a_kill_is_skipped_by_runs(made, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(made["run"], run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:20])
    code, out, err = run_cli(["runs", run], capsys)
    assert code == 0 and not err.strip(), err
    assert "1/2" in out


def _upstream(made, tmp_path, change=None, raw: bytes | None = None) -> Path:
    from astropt_train.use.interop import read_upstream_checkpoint

    folder = tmp_path / "upstream"
    folder.mkdir()
    if raw is not None:
        (folder / "ckpt.pt").write_bytes(raw)
    else:
        import torch

        ckpt = read_upstream_checkpoint(made["export"] / "ckpt.pt")
        torch.save(change(ckpt), folder / "ckpt.pt")
    return folder / "ckpt.pt"


INIT_DAMAGE = {
    "garbage": dict(raw=b"garbage" * 100),
    "truncated": "truncated",
    "a list": dict(change=lambda c: [1, 2]),
    "no model_args": dict(change=lambda c: {"model": c["model"]}),
}


@pytest.mark.parametrize("damage", list(INIT_DAMAGE))
def test_corrupt_init_from_ckpt_is_one_error(damage, made, capsys, tmp_path):
    how = INIT_DAMAGE[damage]
    if how == "truncated":
        how = dict(raw=(made["export"] / "ckpt.pt").read_bytes()[:5000])
    path = _upstream(made, tmp_path, **how)
    check([*TRAIN, "--init-from", path], [str(path), "upstream AstroPT checkpoint"], made, tmp_path, capsys)


@pytest.mark.parametrize("columns", [["--column", "hsc_image"], ["--column", "legacysurvey_image:HSC-G"]])
def test_a_store_where_every_row_was_rejected_is_an_error(columns, made, capsys, tmp_path):
    """Bands the column does not hold reject every row: the run must not end as a 0-galaxy store and exit 0."""
    argv = fill([*TOKENISE, *columns, "--limit", "4"], {**made, "tmp": tmp_path})
    code, _, err = run_cli(argv, capsys)
    assert_one_error(code, err, "every one of the 4 source rows was rejected", "--bands", "missing band")


# ---------------------------------------------------------------------------------------------------------
# I/O faults where export and runs write: a full disk, a read-only file system, a folder without write
# permission (as in test_hostile.py): one error naming the folder, no temporary or half-written file


WRITERS = {"export": (["export", "{run}", "--astropt", "{target}"], "ckpt.pt"),
           "runs": (["runs", "{run}", "--out", "{target}/loss.png"], "loss.png")}


@pytest.mark.parametrize("fault", ["full disk", "read-only"])
@pytest.mark.parametrize("command", list(WRITERS))
def test_io_faults_while_exporting_or_plotting(command, fault, made, tiny_tmpfs, capsys):
    argv, written = WRITERS[command]
    target = tiny_tmpfs / "out"
    target.mkdir()
    if fault == "full disk":
        fill_disk(tiny_tmpfs, leave=0)
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    code, _, err = run_cli(fill(argv, {**made, "target": target}), capsys)
    assert_one_error(code, err, str(target), "disk is full" if fault == "full disk" else "read-only")
    assert not (target / written).exists() and not temporaries(tiny_tmpfs)


@pytest.mark.parametrize("command", list(WRITERS))
def test_no_permission_to_write_an_export_or_plot(command, made, tmp_path):
    """For real, in a child process (root: without CAP_DAC_OVERRIDE, through setpriv)."""
    argv, written = WRITERS[command]
    target = tmp_path / "out"
    target.mkdir()
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root ignores permissions, and setpriv (to drop that) is not installed")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    target.chmod(0o555)
    try:
        out = subprocess.run([*prefix, sys.executable, "-m", "astropt_tok", *fill(argv, {**made, "target": target})],
                             cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        target.chmod(0o755)
    assert_one_error(out.returncode, out.stderr, str(target), "permission denied")
    assert not any(target.iterdir())
