"""The tokenise pipeline against the real AION ImageCodec (tiny), real parquet written by `datasets`, and real
arrow/zarr shards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from astropt_tok import store as st
from astropt_tok.cli import main
from astropt_tok.errors import AstroptError
from astropt_tok.tokenise import TokeniseConfig, tokenise

BANDS = ("DES-G", "DES-R", "DES-I", "DES-Z")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run `astropt ARGV` in-process; return (exit code, stdout, stderr)."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def config(survey, codec, out, **kw) -> TokeniseConfig:
    kw.setdefault("shards", 4)
    kw.setdefault("batch_size", 8)
    kw.setdefault("device", "cpu")  # references (AION's encode, stores made here) are computed on the CPU
    return TokeniseConfig(source=str(survey), codec=str(codec), out=str(out), progress=False, **kw)


def direct_tokens(codec_dir, flux: np.ndarray) -> np.ndarray:
    """AION's own encode of float32 [n, 4, 160, 160] flux, as the reference."""
    import torch
    from aion.modalities import LegacySurveyImage

    from astropt_tok.codec import load_image_codec

    codec = load_image_codec(str(codec_dir)).codec
    with torch.inference_mode():
        return codec.encode(LegacySurveyImage(flux=torch.from_numpy(flux.copy()), bands=list(BANDS))).numpy()


def survey_flux(survey_dir) -> tuple[np.ndarray, list[str]]:
    """Every row's flux [n, 4, 160, 160] and object ids, read the slow obvious way (Python lists)."""
    flux, ids = [], []
    for f in sorted(Path(survey_dir).glob("*.parquet")):
        t = pq.read_table(f, columns=["object_id", "legacysurvey_image"])
        for rec in t.to_pylist():
            img = rec["legacysurvey_image"]
            if not set(BANDS) <= set(img["band"]):
                flux.append(np.full((len(BANDS), 160, 160), np.nan, dtype=np.float32))
            else:
                order = [img["band"].index(b) for b in BANDS]
                flux.append(np.array(img["flux"], dtype=np.float32)[order])
            ids.append(rec["object_id"])
    return np.stack(flux), ids


@pytest.fixture(scope="module")
def store_arrow(tmp_path_factory, survey_dir, codec_dir):
    out = tmp_path_factory.mktemp("tok") / "arrow"
    # one DataLoader worker process reads the row groups; the other stores here are read in-process (the CPU
    # default), and byte-equality with this one checks that both paths agree
    summary = tokenise(config(survey_dir, codec_dir, out, workers=1))
    assert summary.complete
    return out


def test_tokens_equal_direct_codec_encode(store_arrow, survey_dir, codec_dir):
    flux, ids = survey_flux(survey_dir)
    expected = direct_tokens(codec_dir, flux)
    store = st.TokenStore(store_arrow)
    assert store.num_rows == len(ids)
    got = store.take(np.arange(store.num_rows))
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got.astype(np.int64), expected)
    assert store.object_ids(np.arange(store.num_rows)) == ids
    np.testing.assert_array_equal(store.source_rows(np.arange(store.num_rows)), np.arange(len(ids)))
    m = st.read_manifest(store_arrow)
    assert m["complete"] and m["vocab_size"] == 4375 and m["tokens_per_image"] == 576 and m["dtype"] == "int16"
    assert m["totals"] == {"rows": len(ids), "rejected": 0}
    assert [s["rows"] for s in m["shards"]] == [10, 10, 10, 10]


def test_datasets_streaming_reader_gives_the_same_store(store_arrow, survey_dir, codec_dir, tmp_path):
    out = tmp_path / "via-datasets"
    tokenise(config(survey_dir, codec_dir, out, reader="datasets"))
    for s in st.read_manifest(store_arrow)["shards"]:
        assert (out / s["file"]).read_bytes() == (store_arrow / s["file"]).read_bytes()


def test_arrow_shard_opens_with_datasets_and_zero_copy(store_arrow):
    import datasets

    ds = datasets.Dataset.from_file(str(store_arrow / "shard-00000.arrow"))
    assert ds.column_names == ["tokens", "row", "object_id"] and len(ds) == 10
    store = st.TokenStore(store_arrow)
    tokens = store.shard_tokens(0)
    assert not tokens.flags.owndata and not tokens.flags.writeable  # a view of the memory map
    np.testing.assert_array_equal(np.array(ds["tokens"], dtype=np.int16), tokens)


def test_zarr_format_round_trips(store_arrow, survey_dir, codec_dir, tmp_path):
    import zarr

    out = tmp_path / "zarr"
    tokenise(config(survey_dir, codec_dir, out, storage="zarr"))
    za, ar = st.TokenStore(out), st.TokenStore(store_arrow)
    idx = np.array([39, 0, 17, 5, 22])
    np.testing.assert_array_equal(za.take(idx), ar.take(idx))
    assert za.object_ids(idx) == ar.object_ids(idx)
    g = zarr.open_group(str(out / "shard-00001.zarr"), mode="r")
    assert g["tokens"].shape == (10, 576) and g["tokens"].dtype == np.int16
    assert st.verify_store(out) == []


def _plant_bad_rows(row, cols, j):
    img = cols["legacysurvey_image"][j]
    if row == 3:
        img["flux"][1] = img["flux"][1].copy()
        img["flux"][1][80, 80] = np.nan  # inside the 96x96 crop: AION would return -2**31 tokens
    elif row == 7:
        img["flux"][0] = img["flux"][0].copy()
        img["flux"][0][2, 3] = np.inf  # outside the crop, still a bad row
    elif row == 12:
        img["band"] = ["DES-G", "DES-R", "DES-I", "DES-Y"]  # lacks DES-Z
    elif row == 18:
        img["band"] = img["band"][::-1]  # reordered bands are fine: channels follow each row's own list


@pytest.fixture(scope="module")
def bad_survey(tmp_path_factory):
    from astropt_tok.synthetic import write_synthetic_survey

    out = tmp_path_factory.mktemp("bad-survey")
    write_synthetic_survey(out, n_rows=20, n_files=2, seed=1, with_hsc=False, edit_rows=_plant_bad_rows)
    return out


def test_bad_rows_are_skipped_and_recorded(bad_survey, codec_dir, tmp_path):
    out = tmp_path / "tok"
    summary = tokenise(config(bad_survey, codec_dir, out, shards=3))
    assert summary.complete and summary.rejected == 3
    rejects = [json.loads(line) for line in (out / st.REJECTS).read_text().splitlines()]
    assert [r["row"] for r in rejects] == [3, 7, 12]
    assert rejects[0]["object_id"] == "LS01-0000003"
    assert "non-finite" in rejects[0]["reason"] and "non-finite" in rejects[1]["reason"]
    assert "missing band DES-Z" in rejects[2]["reason"]
    m = st.read_manifest(out)
    assert m["totals"] == {"rows": 17, "rejected": 3}
    store = st.TokenStore(out)
    rows = store.source_rows(np.arange(store.num_rows))
    assert sorted(set(range(20)) - set(rows.tolist())) == [3, 7, 12]
    # row 18 lists its bands backwards: its channels follow its own band list into --bands order
    flux, _ = survey_flux(bad_survey)
    k = int(np.nonzero(rows == 18)[0][0])
    expected = direct_tokens(codec_dir, flux[18:19])[0]
    np.testing.assert_array_equal(store.take([k])[0].astype(np.int64), expected)
    assert not np.array_equal(expected, direct_tokens(codec_dir, flux[18:19, ::-1].copy())[0])


def test_strict_stops_at_first_bad_row_and_marks_nothing_complete(bad_survey, codec_dir, tmp_path, capsys):
    out = tmp_path / "strict"
    code, _, err = run_cli(capsys, "tokenise", "--source", str(bad_survey), "--codec", str(codec_dir), "--out",
                           str(out), "--shards", "1", "--strict", "--no-progress")
    assert code == 1
    assert err.strip().count("\n") == 0 and "bad source row 3 (LS01-0000003)" in err
    assert not st.read_manifest(out)["complete"]
    assert not list(out.glob("shard-*"))


def test_reader_processes_are_fitted_to_shared_memory():
    from astropt_tok.executor import PREFETCH_PER_WORKER, workers_for_shared_memory

    chunk = 64 * 4 * 96 * 96 * 4  # a 64-galaxy row group after the crop
    in_flight = (PREFETCH_PER_WORKER + 1) * chunk
    assert workers_for_shared_memory(8, chunk, 64 * 2**20) == 64 * 2**20 // 2 // in_flight == 1  # docker's default
    assert workers_for_shared_memory(8, chunk, 2 * 3 * in_flight) == 3
    assert workers_for_shared_memory(8, chunk, 2**40) == 8
    assert workers_for_shared_memory(8, chunk, 2 * in_flight - 1) == 0  # read in-process instead
    assert workers_for_shared_memory(8, chunk, None) == 8 and workers_for_shared_memory(0, chunk, 0) == 0


def test_finiteness_check_is_exact_even_where_a_sum_overflows():
    from astropt_tok.source import _finite_images

    stack = np.zeros((5, 160, 160), dtype=np.float32)
    stack[1, 0, 0] = np.nan  # a corner: outside AION's 96x96 crop, still a bad image
    stack[2, 80, 80] = np.inf
    stack[3, 5, 5], stack[3, 6, 6] = np.inf, -np.inf  # the sum is NaN
    stack[4, :2] = 3e38  # finite pixels whose float32 sum overflows to inf
    assert _finite_images(stack).tolist() == [True, False, False, False, True]


def test_open_files_parse_each_footer_once_and_read_the_same_rows(survey_dir):
    import pickle

    from astropt_tok.source import OpenFiles, read_task, read_tasks, resolve_source

    plan = resolve_source(str(survey_dir))
    tasks = read_tasks(plan, 0, plan.num_rows)
    assert len(tasks) > len(plan.files) == 2  # several row groups per file
    files = OpenFiles(keep=1)
    for task in tasks:
        batch = read_task(plan, task, files)
        assert batch.equals(read_task(plan, task))
        assert batch.schema.names == ["legacysurvey_image", "object_id"]  # never hsc_image, ra, dec
        assert batch.schema.field(0).type.names == ["band", "flux"]  # never ivar, psf_fwhm, scale
    assert files.opened == len(plan.files)  # tasks come in file order: one open per file, even keeping one
    assert pickle.loads(pickle.dumps(files)).opened == 0  # a worker's copy starts with nothing open
    files.close()
    assert not files.handles


@pytest.mark.parametrize("layout", [  # {file: (survey file it copies, its split)}; None: not data
    {"data/train-00000-of-00001.parquet": (0, "train"), "data/test-00000-of-00001.parquet": (1, "test"),
     "README.md": None},
    {"train/part-0.parquet": (0, "train"), "validation/part-0.parquet": (1, "validation")},
    {"train.parquet": (0, "train"), "test.arrow": (1, "test"), "test_notes.csv": None},
], ids=["hub shards", "split folders", "split files"])
def test_split_picks_its_files_in_a_local_folder_laid_out_by_split(survey_dir, tmp_path, layout):
    """A local folder named by split as `datasets` names them: --split reads that split's files only, and a
    split it lacks is one error listing those it has."""
    from astropt_tok.source import resolve_source

    survey = sorted(Path(survey_dir).glob("*.parquet"))
    for name, made in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if made is None:
            (tmp_path / name).write_text("not data")
        elif name.endswith(".arrow"):  # the same rows as an Arrow IPC file
            table = pq.read_table(survey[made[0]])
            with pa.ipc.new_file(tmp_path / name, table.schema) as writer:
                writer.write_table(table)
        else:
            shutil.copy(survey[made[0]], tmp_path / name)
    splits = {made[1]: name for name, made in layout.items() if made is not None}
    for split, name in splits.items():
        plan = resolve_source(str(tmp_path), split)
        assert [f.path for f in plan.files] == [str(tmp_path / name)] and plan.describe()["split"] == split
        assert plan.num_rows == pq.ParquetFile(survey[layout[name][0]]).metadata.num_rows
    with pytest.raises(AstroptError, match=f"no split 'dev' \\(it has: {', '.join(splits)}\\)"):
        resolve_source(str(tmp_path), "dev")


def test_split_of_local_files_without_splits_is_refused_not_ignored(survey_dir, tmp_path):
    """A folder whose files name no split is all split train (as `datasets` reads it): another --split is one
    error rather than reading everything; files or a glob given directly must be named for a non-default split."""
    from astropt_tok.source import resolve_source

    flat = tmp_path / "survey" / "flat"  # names of its own: pytest's tmp_path has "test" in its name
    flat.mkdir(parents=True)
    for i, f in enumerate(sorted(Path(survey_dir).glob("*.parquet"))):
        shutil.copy(f, flat / f"galaxies-{i}.parquet")
    assert resolve_source(str(flat)).num_rows == 40  # the default split: every file
    with pytest.raises(AstroptError, match="--split test: source .*flat has no splits"):
        resolve_source(str(flat), "test")
    with pytest.raises(AstroptError, match="--split test: galaxies-0.parquet of source .* is not named for split"):
        resolve_source(str(flat / "*.parquet"), "test")
    named = tmp_path / "survey" / "test"
    flat.rename(named)
    assert resolve_source(str(named), "test").num_rows == 40  # a folder named for it: its files are that split
    (named / "galaxies-0.parquet").rename(flat.parent / "test-0.parquet")
    assert resolve_source(str(flat.parent / "test-0.parquet"), "test").num_rows == 20  # a file named for it


def test_cli_run_closes_with_a_summary_of_rows_and_where_the_time_went(bad_survey, codec_dir, tmp_path, capsys):
    out = tmp_path / "tok"
    code, stdout, _ = run_cli(capsys, "tokenise", "--source", str(bad_survey), "--codec", str(codec_dir), "--out",
                              str(out), "--shards", "2", "--batch-size", "4", "--no-progress")
    assert code == 0
    text = " ".join(stdout.replace("│", " ").split())
    assert "rows written 17" in text and "rows rejected 3" in text and "complete" in text
    assert "codec waiting for input" in text and "start-up" in text
    summary = tokenise(config(bad_survey, codec_dir, tmp_path / "again", shards=2, batch_size=4))
    worked = [r for r in summary.results if not r.skipped]
    assert len(worked) == 2 and all(0 <= r.input_wait_s <= r.seconds and r.write_s > 0 for r in worked)
    assert 0 < summary.first_wait_s <= summary.first_batch_s < summary.work_s <= summary.seconds
    assert 0 <= summary.input_wait_s <= summary.steady_s


def test_an_error_mid_run_stops_the_reader_processes_and_staging_thread(bad_survey, codec_dir, tmp_path):
    import multiprocessing
    import threading

    cfg = config(bad_survey, codec_dir, tmp_path / "strict", shards=2, workers=2, batch_size=1, strict=True)
    with pytest.raises(AstroptError, match="bad source row 3") as caught:
        tokenise(cfg)  # `caught` keeps the traceback, and with it tokenise's frame, alive: no help from the GC
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (multiprocessing.active_children() or any(
            t.name == "astropt-staging" for t in threading.enumerate())):
        time.sleep(0.1)
    assert not multiprocessing.active_children()
    assert not [t for t in threading.enumerate() if t.name == "astropt-staging"]
    assert caught.traceback


def _edited_codec(codec_dir, dest: Path, edit) -> Path:
    """A copy of the codec whose pre-quantisation projection (`pre_quant_proj`: weight [C, hidden, 1, 1], bias
    [C]) is edited in place by `edit(weight, bias)`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(codec_dir, dest)
    weights = dest / "codecs/image/model.safetensors"
    state = load_file(str(weights))
    prefix = next(k for k in state if k.endswith("pre_quant_proj.weight")).removesuffix("weight")
    edit(state[prefix + "weight"], state[prefix + "bias"])
    save_file(state, str(weights))
    return dest


def _latents_and_tokens(codec_dir, flux: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([n, hidden, T] features, [n, C, T] latents, [n, T] tokens) of AION's own `codec.encode` on CPU: the
    features and latents are the input and output of the projection that makes the latents, caught by a
    forward hook on it (independent of how the Encoder reads them)."""
    import torch
    from aion.modalities import LegacySurveyImage

    from astropt_tok.codec import load_image_codec

    codec = load_image_codec(str(codec_dir)).codec
    caught = []
    hook = codec.pre_quant_proj.register_forward_hook(lambda module, args, out: caught.append((args[0], out)))
    try:
        with torch.inference_mode():
            tokens = codec.encode(LegacySurveyImage(flux=torch.from_numpy(flux.copy()), bands=list(BANDS)))
    finally:
        hook.remove()
    features, latents = caught[0]
    return features.flatten(2).numpy(), latents.flatten(2).numpy(), tokens.numpy()


def _reasons(out: Path) -> dict[int, str]:
    return {r["row"]: r["reason"] for r in map(json.loads, (out / st.REJECTS).read_text().splitlines())}


def _edit_projection(fault: str):
    def edit(weight, bias):
        if fault == "nan weight":
            weight[0, 0] = float("nan")
        else:
            bias[0] = float(fault.split()[0])
    return edit


@pytest.mark.parametrize("fault", ["nan weight", "+inf bias", "-inf bias"])
def test_codec_with_non_finite_weights_is_refused_at_load(fault, survey_dir, codec_dir, tmp_path):
    """A codec file holding a NaN or an infinity is refused before any row is read: one error naming the
    weights file, nothing written."""
    broken = _edited_codec(codec_dir, tmp_path / "broken-codec", _edit_projection(fault))
    out = tmp_path / "tok"
    with pytest.raises(AstroptError, match=r"model\.safetensors.*non-finite"):
        tokenise(config(survey_dir, broken, out, shards=2, limit=6))
    assert not (out / st.MANIFEST).exists()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("fault", ["nan weight", "+inf bias", "-inf bias"])
def test_codec_with_non_finite_latents_is_caught(fault, device, survey_dir, codec_dir):
    """Every image's latents are NaN or +/-inf (the codec's weights went bad after loading, which the load-time
    check cannot see): the encoder flags every image. A NaN latent casts to -2**31 on a CPU (also out of the
    vocabulary), but to in-range codes on some GPUs; tanh of an infinite latent is a valid code on every device,
    so only the latents check sees those."""
    import torch

    from astropt_tok.codec import load_image_codec
    from astropt_tok.encoder import Encoder

    loaded = load_image_codec(str(codec_dir), device=device)
    with torch.no_grad():
        projection = loaded.codec.pre_quant_proj
        _edit_projection(fault)(projection.weight, projection.bias)
    flux, _ = survey_flux(survey_dir)
    crop = np.ascontiguousarray(flux[:6, :, 32:128, 32:128])  # AION's 96x96 centre of the 160x160 cut-outs
    tokens, finite, in_vocab = Encoder(loaded, device, "fp32", list(BANDS)).encode(torch.from_numpy(crop))
    assert tokens.shape[0] == 6 and not finite.any()


def test_rows_whose_latents_overflow_are_rejected_and_the_others_kept(survey_dir, codec_dir, tmp_path):
    """The projection to the latents scaled so that it overflows float32 for some images only: exactly those
    rows are rejected (their AION tokens are in the vocabulary, so the range check alone would keep them),
    and the other rows are stored with AION's own tokens."""
    from astropt_tok.encoder import NONFINITE_LATENTS

    flux, _ = survey_flux(survey_dir)
    features, _, _ = _latents_and_tokens(codec_dir, flux)
    # latent channel 0 becomes scale * feature 0 alone (one product, no sum): it overflows exactly where
    # |feature 0| * scale > float32's max, i.e. for the images whose largest |feature 0| is above the median
    largest = np.abs(features[:, 0]).max(axis=1)  # [n]
    scale = float(np.finfo(np.float32).max) / float(np.median(largest))

    def edit(weight, bias):
        weight[0] = 0.0
        weight[0, 0] = scale
        bias[0] = 0.0

    overflowing = _edited_codec(codec_dir, tmp_path / "overflowing-codec", edit)
    _, latents, tokens = _latents_and_tokens(overflowing, flux)
    bad = ~np.isfinite(latents).all(axis=(1, 2))
    in_vocab = ((tokens >= 0) & (tokens < 4375)).all(axis=1)
    assert 0 < bad.sum() < len(bad)  # some rows overflow, some do not
    assert (bad & in_vocab).any()  # and some of those would pass the range check

    out = tmp_path / "tok"
    summary = tokenise(config(survey_dir, overflowing, out, shards=2))
    assert _reasons(out) == {int(r): NONFINITE_LATENTS for r in np.nonzero(bad)[0]}
    assert summary.rows == int((~bad).sum())
    store = st.TokenStore(out)
    np.testing.assert_array_equal(store.source_rows(np.arange(store.num_rows)), np.nonzero(~bad)[0])
    np.testing.assert_array_equal(store.take(np.arange(store.num_rows)).astype(np.int64), tokens[~bad])


def test_encoder_allocates_nothing_batch_sized_on_the_host(codec_dir):
    """AION's ImagePadder makes a [n, 9, 96, 96] zero tensor with torch.zeros(...).to(device): on an
    accelerator that is a host allocation and a waiting copy per batch unless the Encoder makes the device the
    default one. Checked on the meta device (a stand-in for any non-CPU device here): the plain AION call
    allocates on the host, the Encoder does not, and both give tokens of the same shape."""
    import torch
    from aion.modalities import LegacySurveyImage
    from torch.utils._python_dispatch import TorchDispatchMode

    from astropt_tok.codec import load_image_codec
    from astropt_tok.encoder import Encoder

    class HostAllocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numels = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    self.numels.append(t.numel())
            return out

    loaded = load_image_codec(str(codec_dir), device="cpu")
    loaded.codec.to("meta")
    encoder = Encoder(loaded, "meta", "fp32", list(BANDS))
    flux = torch.zeros(8, 4, 96, 96, device="meta")
    with HostAllocations() as plain, torch.inference_mode():
        expected = loaded.codec.encode(LegacySurveyImage(flux=flux.clone(), bands=list(BANDS)))
    with HostAllocations() as ours:
        tokens, finite = encoder.encode_on_device(flux.clone())
    assert max(plain.numels) == 8 * 9 * 96 * 96  # the check can fail: AION does allocate on the host
    assert max(ours.numels, default=0) < 96 * 96
    assert tokens.shape == expected.shape == (8, 576) and tokens.device.type == "meta"
    assert finite.shape == (8,) and finite.device.type == "meta"


def test_encoder_copies_nothing_from_the_host_while_encoding(codec_dir):
    """On a GPU a host-to-device copy inside the codec call waits for all queued device work, so the codec's
    thread could not run ahead of the device by a batch. AION's quantizer copies its `_basis` from the host
    on every encode unless the codec was moved by `move_codec` (as `load_image_codec` does), which moves it once. Checked on the meta
    device (a stand-in for any non-CPU device here): no op of the Encoder's call mixes host and device tensors;
    the same codec moved the plain way does copy, so the check can fail."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from astropt_tok.codec import load_image_codec, move_codec
    from astropt_tok.encoder import Encoder

    class HostToDevice(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.device.type for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)}
            outputs = {t.device.type for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
            if "cpu" in inputs and "meta" in inputs | outputs:
                self.ops.append(str(func))
            return out

    flux = torch.zeros(8, 4, 96, 96, device="meta")
    loaded = load_image_codec(str(codec_dir))
    move_codec(loaded.codec, "meta")  # as load_image_codec moves it to its device
    with HostToDevice() as ours:
        tokens, finite = Encoder(loaded, "meta", "fp32", list(BANDS)).encode_on_device(flux.clone())
    plain = load_image_codec(str(codec_dir))
    plain.codec.to("meta")
    with HostToDevice() as theirs:
        Encoder(plain, "meta", "fp32", list(BANDS)).encode_on_device(flux.clone())
    assert theirs.ops  # the check can fail: the plain move leaves the quantizer's basis on the host
    assert ours.ops == [] and tokens.shape == (8, 576)



@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_tf32_is_set_only_inside_the_codec_calls(precision, codec_dir, survey_dir, tmp_path):
    """TF32 flags are process-wide: the encoder sets them as its precision says inside each codec call only,
    and tokenise() leaves them as the caller had them. The caller's flags are set to the opposite of the
    precision's, so a leak either way is seen; the codec's own modules report what they ran under (forward
    pre-hooks), so the check can fail (these flags can be read and set without a GPU)."""
    import torch

    from astropt_tok.codec import load_image_codec
    from astropt_tok.encoder import Encoder

    def flags():
        return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    before = flags()
    caller = (precision != "tf32",) * 2
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = caller
        loaded = load_image_codec(str(codec_dir), device="cpu")
        seen = set()
        for module in loaded.codec.modules():
            module.register_forward_pre_hook(lambda m, args: seen.add(flags()))
        encoder = Encoder(loaded, "cpu", precision, list(BANDS))
        assert flags() == caller  # making an encoder changes nothing
        encoder.encode(torch.zeros(2, 4, 96, 96))
        assert seen == {(precision == "tf32",) * 2}  # inside the call: the precision's
        assert flags() == caller  # after it: the caller's
        tokenise(config(survey_dir, codec_dir, tmp_path / "tok", shards=1, limit=8, precision=precision))
        assert flags() == caller
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _plain_list_survey(path: Path, flux: np.ndarray, fixed: bool) -> None:
    """The same galaxies written by pyarrow alone: plain nested lists, or fixed-size lists."""
    n, b, h, w = flux.shape
    values = pa.array(flux.reshape(-1), type=pa.float32())
    if fixed:
        rows = pa.FixedSizeListArray.from_arrays(values, w)
        images = pa.FixedSizeListArray.from_arrays(rows, h)
        per_row = pa.FixedSizeListArray.from_arrays(images, b)
    else:
        rows = pa.ListArray.from_arrays(pa.array(np.arange(0, n * b * h * w + 1, w, dtype=np.int32)), values)
        images = pa.ListArray.from_arrays(pa.array(np.arange(0, n * b * h + 1, h, dtype=np.int32)), rows)
        per_row = pa.ListArray.from_arrays(pa.array(np.arange(0, n * b + 1, b, dtype=np.int32)), images)
    bands = pa.array([list(BANDS)] * n, type=pa.list_(pa.string()))
    image = pa.StructArray.from_arrays([bands, per_row], names=["band", "flux"])
    pq.write_table(pa.table({"legacysurvey_image": image}), path, row_group_size=4)


@pytest.mark.parametrize("fixed", [False, True], ids=["plain-lists", "fixed-size-lists"])
def test_plain_and_fixed_size_list_schemas(survey_dir, codec_dir, tmp_path, fixed):
    flux, _ = survey_flux(survey_dir)
    src = tmp_path / "src"
    src.mkdir()
    _plain_list_survey(src / "train-00000-of-00001.parquet", flux[:10], fixed)
    out = tmp_path / "tok"
    tokenise(config(src, codec_dir, out, shards=2))
    store = st.TokenStore(out)
    np.testing.assert_array_equal(store.take(np.arange(10)).astype(np.int64), direct_tokens(codec_dir, flux[:10]))
    assert store.object_ids([0]) == [None] and st.read_manifest(out)["source"]["id_column"] is None


def test_limit_and_more_shards_than_files(survey_dir, codec_dir, tmp_path):
    out = tmp_path / "tok"
    tokenise(config(survey_dir, codec_dir, out, shards=7, limit=15))
    m = st.read_manifest(out)
    assert m["totals"]["rows"] == 15 and [s["rows"] for s in m["shards"]] == [2, 2, 2, 2, 2, 2, 3]


@pytest.mark.parametrize("storage", ["arrow", "zarr"])
def test_more_shards_than_rows_leaves_valid_empty_shards(survey_dir, codec_dir, tmp_path, storage):
    out = tmp_path / "tok"
    tokenise(config(survey_dir, codec_dir, out, shards=12, limit=5, storage=storage))
    m = st.read_manifest(out)
    assert [s["rows"] for s in m["shards"]] == [0, 0, 1, 0, 1, 0, 0, 1, 0, 1, 0, 1]  # floor(i*5/12) steps
    assert st.verify_store(out) == []
    store = st.TokenStore(out)
    assert store.shard_tokens(0).shape == (0, 576)
    np.testing.assert_array_equal(store.source_rows(np.arange(5)), np.arange(5))


def _run_tokenise_subprocess(args, env=None):
    """`astropt tokenise ARGS` in a child process that takes SIGINT as a terminal's Ctrl-C does, even when this
    test run was started in the background by a shell without job control (which starts it ignoring SIGINT, a
    disposition a child would inherit: Python then never raises KeyboardInterrupt)."""
    cmd = [sys.executable, "-m", "astropt_tok.cli", "tokenise", "--no-progress", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _await_done_shards(out, n: int, limit_s: float = 120):
    """Wait (up to limit_s) until a running tokenise into `out` has completed n shards; its completion folder."""
    done_dir = out / st.DONE_DIR
    deadline = time.time() + limit_s
    while time.time() < deadline and not (done_dir.is_dir() and len(list(done_dir.glob("*.json"))) >= n):
        time.sleep(0.01)
    return done_dir


def test_sigkill_then_rerun_gives_identical_bytes(survey_dir, codec_dir, store_arrow, tmp_path):
    out = tmp_path / "killed"
    args = ["--source", str(survey_dir), "--codec", str(codec_dir), "--out", str(out), "--device", "cpu",
            "--shards", "4", "--batch-size", "8"]
    # 20 shards of 2 rows, one row per codec call: slow enough to be caught between shards
    slow = args[:-4] + ["--shards", "20", "--batch-size", "1"]
    proc = _run_tokenise_subprocess(slow)
    done_dir = _await_done_shards(out, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(list(done_dir.glob("*.json")))
    assert 3 <= n_done < 20, "the run must be killed part-way"
    assert not st.read_manifest(out)["complete"]
    with pytest.raises(AstroptError, match="incomplete"):
        st.TokenStore(out)
    summary = tokenise(config(survey_dir, codec_dir, out, shards=20, batch_size=1))
    assert summary.complete and sum(r.skipped for r in summary.results) == n_done
    reference = tmp_path / "straight"
    tokenise(config(survey_dir, codec_dir, reference, shards=20, batch_size=1))
    for s in st.read_manifest(reference)["shards"]:
        assert (out / s["file"]).read_bytes() == (reference / s["file"]).read_bytes(), s["file"]
    assert st.read_manifest(out)["shards"] == st.read_manifest(reference)["shards"]
    rows = st.TokenStore(out).source_rows(np.arange(40))
    np.testing.assert_array_equal(rows, np.arange(40))  # none lost, none duplicated
    assert not list(out.glob(".shard-*"))  # no temporaries left


def test_ctrl_c_prints_one_line_saying_how_to_resume(survey_dir, codec_dir, tmp_path):
    """SIGINT part-way: exit 130, one `interrupted:` line naming the complete shards and how to resume, no
    traceback; running the same command again finishes the store."""
    out = tmp_path / "interrupted"
    args = ["--source", str(survey_dir), "--codec", str(codec_dir), "--out", str(out), "--device", "cpu",
            "--shards", "20", "--batch-size", "1", "--workers", "0"]
    proc = _run_tokenise_subprocess(args)
    done_dir = _await_done_shards(out, 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("interrupted: "), err
    complete = len(list(done_dir.glob("*.json")))
    assert f"{complete} of 20 shards" in lines[0] and "run the same command again to resume" in lines[0]
    assert not st.read_manifest(out)["complete"]
    rerun = _run_tokenise_subprocess(args)
    assert rerun.wait(timeout=300) == 0 and st.read_manifest(out)["complete"]


def test_mismatched_rerun_is_refused_unless_overwrite(store_arrow, survey_dir, codec_dir, tmp_path, capsys):
    out = tmp_path / "tok"
    shutil.copytree(store_arrow, out)
    base = ["tokenise", "--source", str(survey_dir), "--codec", str(codec_dir), "--out", str(out), "--no-progress"]
    code, _, err = run_cli(capsys, *base, "--shards", "5")
    assert code == 1 and "different sharding.num_shards" in err and "--overwrite" in err
    code, _, err = run_cli(capsys, *base, "--shards", "4", "--bands", "DES-G,DES-R,DES-Z")
    assert code == 1 and "different bands" in err
    code, _, _ = run_cli(capsys, *base, "--shards", "4")  # the same command: nothing to redo
    assert code == 0
    code, _, err = run_cli(capsys, *base, "--shards", "5", "--overwrite")
    assert code == 0, err
    assert st.read_manifest(out)["sharding"]["num_shards"] == 5 and not (out / "shard-00005.arrow").exists()
    assert st.verify_store(out) == []


def test_verify_catches_flipped_byte_and_truncated_shard(store_arrow, tmp_path, capsys):
    out = tmp_path / "tok"
    shutil.copytree(store_arrow, out)
    code, stdout, _ = run_cli(capsys, "verify", str(out))
    assert code == 0 and "OK" in stdout
    flipped = out / "shard-00001.arrow"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated = out / "shard-00003.arrow"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    code, _, err = run_cli(capsys, "verify", str(out))
    assert code == 1
    bad = [line for line in err.splitlines() if line.startswith("BAD")]
    assert len(bad) == 2 and "shard-00001.arrow" in bad[0] and "shard-00003.arrow" in bad[1]
    with pytest.raises(AstroptError, match="shard-00003.arrow is .* bytes"):
        st.TokenStore(out)


def test_info_summarises_store(store_arrow, capsys):
    code, stdout, _ = run_cli(capsys, "info", str(store_arrow))
    assert code == 0 and "4375" in stdout and "codebook_used" in stdout and "40" in stdout


@pytest.mark.slow
def test_two_torchrun_processes_give_the_same_store_as_one(store_arrow, survey_dir, codec_dir, tmp_path):
    out = tmp_path / "tok2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "astropt_tok.cli", "tokenise", "--source", str(survey_dir), "--codec", str(codec_dir),
           "--out", str(out), "--shards", "4", "--batch-size", "8", "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert st.read_manifest(out) == {**st.read_manifest(store_arrow), "codec": st.read_manifest(out)["codec"]}
    for s in st.read_manifest(store_arrow)["shards"]:
        assert (out / s["file"]).read_bytes() == (store_arrow / s["file"]).read_bytes()


def test_slurm_array_processes_split_shards_and_last_one_finalizes(store_arrow, survey_dir, codec_dir, tmp_path):
    out = tmp_path / "slurm"
    env = {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0"}
    for task in ("1", "0"):
        os.environ.update(env, SLURM_ARRAY_TASK_ID=task)
        try:
            summary = tokenise(config(survey_dir, codec_dir, out))
        finally:
            for k in (*env, "SLURM_ARRAY_TASK_ID"):
                os.environ.pop(k, None)
        assert summary.my_shards == ([1, 3] if task == "1" else [0, 2])
        assert summary.complete == (task == "0")
    for s in st.read_manifest(store_arrow)["shards"]:
        assert (out / s["file"]).read_bytes() == (store_arrow / s["file"]).read_bytes()


def test_slurm_array_overwrite_is_done_by_task_0_while_the_others_wait(store_arrow, survey_dir, codec_dir,
                                                                       tmp_path):
    out = tmp_path / "slurm-overwrite"
    tokenise(config(survey_dir, codec_dir, out, shards=2, limit=8))  # an old, different store
    array = {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0"}
    # task 1 alone: it never clears the store, and says why it gives up
    lone = config(survey_dir, codec_dir, out, overwrite=True, overwrite_wait_s=0.5, rank=1, world_size=2)
    with pytest.raises(AstroptError, match="waited 0.5 s for array task 0 to replace"):
        tokenise(lone)
    assert st.read_manifest(out)["sharding"]["num_shards"] == 2  # untouched
    # task 1 starts first and waits; task 0 replaces the store; both finish it
    cmd = [sys.executable, "-m", "astropt_tok", "tokenise", "--source", str(survey_dir), "--codec", str(codec_dir),
           "--out", str(out), "--shards", "4", "--batch-size", "8", "--overwrite", "--no-progress", "--device", "cpu"]
    waiting = subprocess.Popen(cmd, env=dict(os.environ, **array, SLURM_ARRAY_TASK_ID="1"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)  # task 1 is up and polling before task 0 starts
        first = tokenise(config(survey_dir, codec_dir, out, overwrite=True, rank=0, world_size=2))
        assert first.my_shards == [0, 2]
        _, err = waiting.communicate(timeout=120)
    finally:
        waiting.kill()
    assert waiting.returncode == 0, err[-2000:]
    assert st.read_manifest(out)["complete"]
    for s in st.read_manifest(store_arrow)["shards"]:
        assert (out / s["file"]).read_bytes() == (store_arrow / s["file"]).read_bytes()


@pytest.mark.parametrize("local_world, local_rank, gpus, ok", [
    (1, 0, 1, True), (8, 7, 8, True), (4, 1, 8, True),  # fewer processes than GPUs is allowed
    (2, 0, 1, False), (2, 1, 1, False), (9, 8, 8, False), (1, 1, 1, False)])
def test_more_torchrun_processes_than_gpus_is_one_clear_error(local_world, local_rank, gpus, ok):
    from astropt_tok.executor import check_processes_per_gpu

    if ok:
        check_processes_per_gpu(local_world, local_rank, gpus)
        return
    with pytest.raises(AstroptError) as caught:
        check_processes_per_gpu(local_world, local_rank, gpus)
    procs = max(local_world, local_rank + 1)
    assert str(caught.value).startswith(f"torchrun started {procs} processes per node but this node has {gpus} GPU")
    assert f"--nproc_per_node {gpus}" in str(caught.value)


def test_token_dtype_never_wraps():
    assert st.token_dtype(4375) == np.int16 and st.token_dtype(32768) == np.int16
    assert st.token_dtype(32769) == np.uint16 and st.token_dtype(65536) == np.uint16
    with pytest.raises(AstroptError, match="does not fit"):
        st.token_dtype(65537)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--source", "/nonexistent/survey"], "does not exist"),
        (["--source", "nobody/no-such-survey"], "unknown source 'nobody/no-such-survey'"),
        (["--column", "hsc_flux"], "has no column 'hsc_flux'"),
        (["--codec", "polymathic-ai/aion-base"], "pass a local snapshot with --codec DIR"),
        (["--codec", "/nonexistent/codec"], "neither an existing folder nor a hub id"),
        (["--bands", "DES-G,HSC-R"], "--bands must be bands of one survey"),
        (["--workers", "-1"], "--workers must be 0 (read in this process) or more, got -1"),
        (["--limit", "0"], "--limit must be at least 1, got 0"),
        (["--out", "FILE"], "exists as a file, not a folder"),
        (["--out", "FILE/sub"], "cannot create the store folder"),
    ],
    ids=["missing-source", "unreachable-hub-source", "wrong-column", "unreachable-hub-codec", "missing-codec-dir",
         "mixed-bands", "negative-workers", "zero-limit", "out-is-a-file", "out-under-a-file"],
)
def test_bad_input_is_one_line_and_nonzero(args, message, survey_dir, codec_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "FILE").write_text("not a folder")
    base = {"--source": str(survey_dir), "--codec": str(codec_dir), "--out": str(tmp_path / "tok")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = str(tmp_path / v) if k == "--out" else v
    argv = ["tokenise", "--shards", "2", "--no-progress"]
    for k, v in base.items():
        argv += [k, v]
    code, _, err = run_cli(capsys, *argv)
    assert code == 1
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and message in err
    manifest = tmp_path / "tok" / st.MANIFEST
    assert not manifest.exists() or not json.loads(manifest.read_text())["complete"]


@pytest.mark.parametrize("which", [0, 1], ids=["first-file", "second-file"])
def test_corrupt_source_file_is_one_clear_error(which, survey_dir, codec_dir, tmp_path, capsys):
    survey = tmp_path / "survey"
    shutil.copytree(survey_dir, survey)
    victim = sorted(survey.glob("*.parquet"))[which]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    code, _, err = run_cli(capsys, "tokenise", "--source", str(survey), "--codec", str(codec_dir), "--out",
                           str(tmp_path / "tok"), "--shards", "2", "--no-progress")
    assert code == 1 and err.strip().count("\n") == 0
    assert err.startswith(f"error: source file {victim} is unreadable")


@pytest.mark.parametrize("workers", [0, 1], ids=["in-process", "worker-process"])
def test_corrupt_row_group_is_one_clear_error_and_nothing_complete(workers, codec_dir, tmp_path, capsys):
    from astropt_tok.synthetic import write_synthetic_survey

    survey = tmp_path / "survey"
    write_synthetic_survey(survey, n_rows=16, n_files=1, seed=0, row_group_size=4)
    victim = next(survey.glob("*.parquet"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2:len(data) // 2 + 200_000] = b"\xff" * 200_000  # data pages; the footer stays intact
    victim.write_bytes(bytes(data))
    out = tmp_path / "tok"
    code, _, err = run_cli(capsys, "tokenise", "--source", str(survey), "--codec", str(codec_dir), "--out",
                           str(out), "--shards", "1", "--workers", str(workers), "--no-progress")
    assert code == 1 and err.strip().count("\n") == 0
    assert err.startswith(f"error: source file {victim}, row group ") and "is unreadable" in err
    assert not st.read_manifest(out)["complete"] and not list(out.glob("shard-*"))


@pytest.mark.parametrize("drop", ["legacysurvey_image", "object_id"])
def test_a_later_file_without_a_column_is_one_clear_error(drop, survey_dir, codec_dir, tmp_path, capsys):
    survey = tmp_path / "survey"
    shutil.copytree(survey_dir, survey)
    last = sorted(survey.glob("*.parquet"))[-1]
    pq.write_table(pq.read_table(last).drop_columns([drop]), last)  # the first file still has every column
    code, _, err = run_cli(capsys, "tokenise", "--source", str(survey), "--codec", str(codec_dir), "--out",
                           str(tmp_path / "tok"), "--shards", "2", "--no-progress")
    assert code == 1 and err.strip().count("\n") == 0
    assert err.startswith(f"error: source file {last} has no ") and repr(drop) in err


def test_wrong_shape_and_null_rows_are_rejected(survey_dir, codec_dir, tmp_path):
    """Plain nested lists can hold what Array2D cannot: a 150-row image, a null image, a null flux list."""
    flux, _ = survey_flux(survey_dir)
    rows = []
    for i in range(5):
        image = {"band": list(BANDS), "flux": [band.tolist() for band in flux[i]]}
        if i == 1:
            image["flux"][2] = image["flux"][2][:150]  # 150 x 160
        elif i == 2:
            image = None
        elif i == 3:
            image["flux"] = None
        rows.append(image)
    image_type = pa.struct([("band", pa.list_(pa.string())), ("flux", pa.list_(pa.list_(pa.list_(pa.float32()))))])
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"legacysurvey_image": pa.array(rows, type=image_type)}), src / "train-0.parquet")
    out = tmp_path / "tok"
    summary = tokenise(config(src, codec_dir, out, shards=1))
    rejects = [json.loads(line) for line in (out / st.REJECTS).read_text().splitlines()]
    assert summary.rejected == 3
    assert [(r["row"], r["reason"]) for r in rejects] == [
        (1, "flux image is not 160x160"), (2, "null image"), (3, "null image")]
    store = st.TokenStore(out)
    np.testing.assert_array_equal(store.source_rows([0, 1]), [0, 4])
    np.testing.assert_array_equal(store.take([0, 1]).astype(np.int64), direct_tokens(codec_dir, flux[[0, 4]]))
