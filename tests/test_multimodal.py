"""Several surveys of one galaxy: the synthetic HSC view, multi-column tokenising, multimodal training and
cross-survey decoding."""

from __future__ import annotations

import numpy as np

from astropt_tok.synthetic import HSC_BANDS, synthetic_rows


def _flux(cols, column):
    return np.stack([np.stack(image["flux"]) for image in cols[column]])  # [rows, bands, H, W]


def test_synthetic_hsc_is_the_same_galaxy_deeper_and_sharper():
    with_hsc, without = synthetic_rows(0, 4, seed=3), synthetic_rows(0, 4, seed=3, with_hsc=False)
    assert np.array_equal(_flux(with_hsc, "legacysurvey_image"), _flux(without, "legacysurvey_image"))
    ls, hsc = _flux(with_hsc, "legacysurvey_image"), _flux(with_hsc, "hsc_image")
    assert hsc.shape == (4, 5, 160, 160) and hsc.dtype == np.float32
    assert all(image["band"] == list(HSC_BANDS) for image in with_hsc["hsc_image"])
    assert set(with_hsc["hsc_image"][0]) == set(with_hsc["legacysurvey_image"][0])  # the same struct fields
    corner = (slice(None), slice(None), slice(0, 12), slice(0, 12))  # sky only: HSC is deeper
    assert hsc[corner].std() < 0.5 * ls[corner].std()
    # the same galaxy: its brightest pixel is at the same place on the sky (finer HSC pixels, same centre)
    for g in range(4):
        ly, lx = np.unravel_index(ls[g].sum(0).argmax(), ls.shape[2:])
        hy, hx = np.unravel_index(hsc[g].sum(0).argmax(), hsc.shape[2:])
        scale = 0.262 / 0.168
        assert abs((hy - 79.5) - (ly - 79.5) * scale) < 4 and abs((hx - 79.5) - (lx - 79.5) * scale) < 4


# ---------------------------------------------------------------------------------------------------------
# tokenising several image columns in one pass

import json  # noqa: E402

import pytest  # noqa: E402

from astropt_tok import store as st  # noqa: E402
from astropt_tok.errors import AstroptError  # noqa: E402
from astropt_tok.tokenise import TokeniseConfig, parse_columns, tokenise  # noqa: E402

LS = ("legacysurvey_image", ("DES-G", "DES-R", "DES-I", "DES-Z"))
HSC = ("hsc_image", HSC_BANDS)
ROWS = 12


def _config(source, codec_dir, out, **kw):
    base = dict(source=str(source), out=str(out), shards=2, codec=str(codec_dir), batch_size=5, device="cpu",
                progress=False, limit=ROWS, modalities=(LS, HSC))
    base.update(kw)
    return TokeniseConfig(**base)


@pytest.fixture(scope="module")
def two_column_store(survey_dir, codec_dir, tmp_path_factory):
    """The first 12 galaxies of the survey, Legacy Survey and HSC, tokenised in one pass (arrow)."""
    out = tmp_path_factory.mktemp("two-columns") / "store"
    tokenise(_config(survey_dir, codec_dir, out))
    return out


def test_two_columns_in_one_pass_equal_two_one_column_stores(two_column_store, survey_dir, codec_dir, tmp_path):
    store = st.TokenStore(two_column_store)
    m = store.manifest
    assert m["format_version"] == st.MODALITIES_VERSION == 3
    assert [(x["name"], x["bands"]) for x in m["modalities"]] == [(LS[0], list(LS[1])), (HSC[0], list(HSC[1]))]
    assert store.modalities == ["legacysurvey_image", "hsc_image"] and store.num_rows == ROWS
    assert st.verify_store(two_column_store) == []
    import pyarrow as pa

    schema = pa.ipc.open_stream(pa.memory_map(str(two_column_store / "shard-00000.arrow"))).schema
    assert schema.names == ["legacysurvey_image", "hsc_image", "row", "object_id"]
    assert str(schema.field("hsc_image").type) == "fixed_size_list<item: int16>[576]"
    for column, bands in (LS, HSC):  # the same tokens as a store of that column alone
        single = tmp_path / column
        tokenise(_config(survey_dir, codec_dir, single, modalities=(), column=column, bands=bands))
        one = st.TokenStore(single)
        assert one.manifest["format_version"] == st.FORMAT_VERSION and "modalities" not in one.manifest and one.bands == list(bands)
        rows = np.arange(ROWS)
        np.testing.assert_array_equal(store.take(rows, column), one.take(rows))
        np.testing.assert_array_equal(store.read_rows(*store.locate(rows), modality=column), one.take(rows))
    assert not np.array_equal(store.take([0], "hsc_image"), store.take([0], "legacysurvey_image"))
    with pytest.raises(AstroptError, match="no modality 'tokens'"):
        store.take([0], "tokens")


def test_one_codec_call_per_modality_per_batch(survey_dir, codec_dir, tmp_path, monkeypatch):
    from aion.codecs.image import ImageCodec

    calls = []
    real = ImageCodec._encode

    def counted(self, image):  # the real codec, counted
        calls.append((type(image).__name__, int(image.flux.shape[0])))
        return real(self, image)

    monkeypatch.setattr(ImageCodec, "_encode", counted)
    tokenise(_config(survey_dir, codec_dir, tmp_path / "s", shards=1, batch_size=6))
    assert sorted(calls) == sorted([("LegacySurveyImage", 6), ("HSCImage", 6)] * 2)  # 12 rows, 2 batches


def _plant_bad_hsc(row, cols, j):
    if row == 2:
        cols["hsc_image"][j]["flux"][3][50, 50] = np.nan
    elif row == 5:
        cols["hsc_image"][j]["band"] = ["HSC-G", "HSC-R", "HSC-I", "HSC-Z", "HSC-X"]  # lacks HSC-Y
    elif row == 7:
        cols["legacysurvey_image"][j]["flux"][0][40, 40] = np.inf


@pytest.fixture(scope="module")
def bad_hsc_survey(tmp_path_factory):
    from astropt_tok.synthetic import write_synthetic_survey

    out = tmp_path_factory.mktemp("bad-hsc")
    write_synthetic_survey(out, n_rows=10, n_files=1, seed=2, edit_rows=_plant_bad_hsc)
    return out


def test_rejects_name_the_modality_and_keep_partial_marks_it(bad_hsc_survey, codec_dir, tmp_path):
    out = tmp_path / "all"
    summary = tokenise(_config(bad_hsc_survey, codec_dir, out, limit=None))
    assert summary.rejected == 3
    rejects = [json.loads(line) for line in (out / st.REJECTS).read_text().splitlines()]
    assert [r["row"] for r in rejects] == [2, 5, 7]
    assert rejects[0]["reason"].startswith("hsc_image: non-finite") and "legacysurvey_image" not in rejects[0]["reason"]
    assert rejects[1]["reason"].startswith("hsc_image: missing band HSC-Y")
    assert rejects[2]["reason"].startswith("legacysurvey_image: non-finite")

    partial = tmp_path / "partial"
    summary = tokenise(_config(bad_hsc_survey, codec_dir, partial, limit=None, keep_partial=True, storage="zarr"))
    assert summary.rejected == 0
    store = st.TokenStore(partial)
    assert store.partial and store.num_rows == 10
    valid = store.valid(np.arange(10))
    assert np.nonzero(~valid["hsc_image"])[0].tolist() == [2, 5]
    assert np.nonzero(~valid["legacysurvey_image"])[0].tolist() == [7]
    assert not store.take([2], "hsc_image").any()  # a missing image's tokens are zeros
    np.testing.assert_array_equal(store.take([0, 3], "hsc_image"), st.TokenStore(out).take([0, 2], "hsc_image"))
    with pytest.raises(AstroptError, match="--keep-partial needs several"):
        tokenise(_config(bad_hsc_survey, codec_dir, tmp_path / "x", keep_partial=True, modalities=()))


def _codec_failing_on_hsc(codec_dir, dest):
    """A copy of the codec whose input projection weighs the HSC bands by float32's max: an HSC image's
    latents overflow, while a Legacy Survey image (HSC channels absent) encodes exactly as before."""
    import shutil

    from aion.codecs.preprocessing.band_to_index import BAND_TO_INDEX
    from safetensors.torch import load_file, save_file

    shutil.copytree(codec_dir, dest)
    weights = dest / "codecs/image/model.safetensors"
    state = load_file(str(weights))
    hsc = [BAND_TO_INDEX[b] for b in HSC_BANDS]
    state["subsample_in.weight"][:, hsc] = float(np.finfo(np.float32).max)  # [projection, 9 bands]
    save_file(state, str(weights))
    return dest


@pytest.mark.parametrize("keep_partial", [False, True])
def test_codec_failures_name_the_modality_and_keep_partial_marks_them(keep_partial, two_column_store, survey_dir,
                                                                      codec_dir, tmp_path):
    """The codec fails on every HSC image only: a reject's reason is the failed column's alone; with
    --keep-partial every row is kept, HSC marked invalid with zero tokens, Legacy Survey as before."""
    from astropt_tok.encoder import NONFINITE_LATENTS

    broken = _codec_failing_on_hsc(codec_dir, tmp_path / "codec")
    out = tmp_path / "store"
    summary = tokenise(_config(survey_dir, broken, out, keep_partial=keep_partial))
    rows = np.arange(ROWS)
    if not keep_partial:
        assert summary.rows == 0 and summary.rejected == ROWS
        rejects = [json.loads(line) for line in (out / st.REJECTS).read_text().splitlines()]
        assert [r["row"] for r in rejects] == rows.tolist()
        assert {r["reason"] for r in rejects} == {f"hsc_image: {NONFINITE_LATENTS}"}
        return
    store = st.TokenStore(out)
    assert summary.rejected == 0 and store.num_rows == ROWS
    valid = store.valid(rows)
    assert valid["legacysurvey_image"].all() and not valid["hsc_image"].any()
    assert not store.take(rows, "hsc_image").any()
    np.testing.assert_array_equal(store.take(rows, "legacysurvey_image"),
                                  st.TokenStore(two_column_store).take(rows, "legacysurvey_image"))


@pytest.mark.parametrize("columns, bands, message", [
    (["legacysurvey_image", "hsc_image"], None, "each is NAME:BAND"),
    (["legacysurvey_image:DES-G", "hsc_image:"], None, "each is NAME:BAND"),
    (["legacysurvey_image:DES-G,DES-R"], "DES-G", "--bands goes with a single --column"),
])
def test_column_syntax_mistakes_are_one_error(columns, bands, message):
    with pytest.raises(AstroptError, match=message):
        parse_columns(columns, bands)


def test_column_syntax():
    assert parse_columns(["legacysurvey_image"], None) == ("legacysurvey_image", LS[1], ())
    assert parse_columns(["x"], "HSC-G, HSC-R") == ("x", ("HSC-G", "HSC-R"), ())
    assert parse_columns(["legacysurvey_image:DES-G,DES-R,DES-I,DES-Z", "hsc_image:" + ",".join(HSC_BANDS)], None) == (
        "legacysurvey_image", LS[1], (LS, HSC))


def test_bad_multi_column_runs_are_one_error(survey_dir, codec_dir, tmp_path):
    for modalities, message in [
        ((LS, ("hsc_image", ("HSC-G", "DES-R"))), "bands of --column hsc_image must be bands of one survey"),
        ((LS, LS), "is named twice among --column"),
        ((LS, ("row", HSC_BANDS)), "clashes with a store column name"),
        ((LS, ("nope", HSC_BANDS)), "has no column 'nope'"),
    ]:
        with pytest.raises(AstroptError, match=message):
            tokenise(_config(survey_dir, codec_dir, tmp_path / "bad", modalities=modalities))


def test_readers_refuse_an_unknown_version_and_read_old_ones(two_column_store, random_store, tmp_path):
    import shutil

    assert st.read_manifest(random_store)["format_version"] == st.FORMAT_VERSION  # a one-column store
    copy = tmp_path / "future"
    shutil.copytree(two_column_store, copy)
    m = json.loads((copy / st.MANIFEST).read_text())
    m["format_version"] = 5
    (copy / st.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(AstroptError, match="format version 5; this tool reads versions 1, 2, 3, 4"):
        st.TokenStore(copy)


def test_cli_tokenises_two_columns_and_info_lists_them(survey_dir, codec_dir, tmp_path, capsys):
    from astropt_tok.cli import main

    out = tmp_path / "cli"
    main(["tokenise", "--source", str(survey_dir), "--out", str(out), "--shards", "1", "--codec", str(codec_dir),
          "--limit", "4", "--device", "cpu", "--no-progress", "--column", "legacysurvey_image:DES-G,DES-R,DES-I,DES-Z",
          "--column", "hsc_image:" + ",".join(HSC_BANDS)])
    assert st.TokenStore(out).modalities == ["legacysurvey_image", "hsc_image"]
    from rich.console import Console

    from astropt_tok.report import print_store_info

    figures = print_store_info(out, Console(width=200))
    assert figures["modalities"] == "legacysurvey_image, hsc_image"
    for name, bands in (LS, HSC):  # every column: its bands and its source column
        assert figures[f"column {name}"] == f"bands {','.join(bands)}; source column {name}"
    assert "bands" not in figures and figures["codec"] == str(codec_dir)  # the first column's alone would mislead
    capsys.readouterr()
    main(["info", str(out)])
    printed = capsys.readouterr().out
    assert "column hsc_image" in printed and "HSC-G,HSC-R,HSC-I,HSC-Z,HSC-Y" in printed
    with pytest.raises(SystemExit):
        main(["tokenise", "--source", str(survey_dir), "--out", str(tmp_path / "x"), "--shards", "1",
              "--column", "legacysurvey_image", "--column", "hsc_image"])
    assert "error: --column 'legacysurvey_image': with several image columns" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# multimodal training

import torch  # noqa: E402

from astropt_train import checkpoint as ck  # noqa: E402
from astropt_train.config import build_config  # noqa: E402
from astropt_train.loop import train  # noqa: E402
from astropt_train.model import GPT, GPTConfig  # noqa: E402

PAIR = ["legacysurvey_image", "hsc_image"]


def _train_cfg(store, out, **kw):
    base = dict(tokens=str(store), out=str(out), n_layer=1, n_head=2, n_embd=32, batch_size=4, max_iters=4,
                lr=1e-2, warmup_iters=1, eval_interval=4, eval_iters=1, log_interval=2, val_images=0, live=False,
                device="cpu", compile=False, checkpoint_interval=0, val_fraction=0.2)
    base.update(kw)
    return build_config(base)


@pytest.fixture(scope="module")
def two_modality_run(two_column_store, tmp_path_factory):
    """A tiny model trained a few steps on both modalities, with validation pictures."""
    out = tmp_path_factory.mktemp("mm-run") / "run"
    train(_train_cfg(two_column_store, out, val_images=1))
    return out


def test_multimodal_training_logs_each_modality_and_draws_each(two_modality_run):
    records = [json.loads(line) for line in (two_modality_run / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    for m in PAIR:
        assert np.isfinite(last[f"loss_{m}"]) and np.isfinite(last[f"val_loss_{m}"])
    assert abs(np.mean([last[f"val_loss_{m}"] for m in PAIR]) - last["val_loss"]) < 0.05  # equal-length blocks
    assert sorted(p.name for p in (two_modality_run / "val_images").iterdir()) == [
        "step-00000004-hsc_image.png", "step-00000004-legacysurvey_image.png"]
    model, config = ck.load_model(two_modality_run)
    assert config["model"]["modalities"] == PAIR and config["model"]["block_size"] == 2 * 576
    assert list(config["store"]["modalities"]) == PAIR  # {name: bands} of the store trained on
    keys = set(model.state_dict())
    for m in PAIR:
        assert {f"encoders.{m}.wpe.weight", f"embedders.{m}.wpe.weight", f"decoders.{m}.c_fc.weight"} <= keys
    assert not any("images_aion" in k for k in keys)


def test_modalities_flag_order_and_refusals(two_column_store, random_store, tmp_path):
    summary = train(_train_cfg(two_column_store, tmp_path / "hsc", modalities="hsc_image", max_iters=2, eval_interval=2))
    model, config = ck.load_model(summary["run_dir"])
    assert model.names == ["hsc_image"] and config["model"]["block_size"] == 576
    for kw, message in [(dict(modalities="hsc_image,nope"), "name each of the store's modalities"),
                        (dict(modalities="hsc_image,hsc_image"), "at most once")]:
        with pytest.raises(AstroptError, match=message):
            train(_train_cfg(two_column_store, tmp_path / "bad", **kw))
    with pytest.raises(AstroptError, match="need a store of several image columns"):
        train(_train_cfg(random_store, tmp_path / "bad2", shuffle_modalities=True))
    with pytest.raises(AstroptError, match="cannot resume .* modalities"):
        train(_train_cfg(two_column_store, tmp_path / "hsc", modalities="legacysurvey_image", resume=True))


def test_shuffled_order_and_missing_modalities_are_masked(tmp_path):
    from astropt_train.data import TokenRows, batch_to_device

    rng = np.random.default_rng(0)
    tokens = {m: rng.integers(0, 50, size=(20, 8)) for m in PAIR}
    valid = {"legacysurvey_image": np.ones(20, bool), "hsc_image": np.arange(20) % 4 != 0}
    st.write_store_from_arrays(tmp_path / "s", tokens, 2, {"id": "random", "vocab_size": 50, "tokens_per_image": 8},
                               {m: ["DES-G"] if m == PAIR[0] else ["HSC-G"] for m in PAIR}, valid=valid)
    store = st.TokenStore(tmp_path / "s")
    rows = TokenRows(store, modalities=PAIR, shuffle=True, seed=3)
    batch = rows.__getitems__(np.arange(20))
    order = batch["order"].numpy()
    assert {tuple(o) for o in order} == {(0, 1), (1, 0)}
    for r in range(20):  # each galaxy's blocks, in its order
        expected = np.concatenate([tokens[PAIR[k]][r] for k in order[r]])
        np.testing.assert_array_equal(batch["tokens"][r].numpy(), expected)
    again = TokenRows(store, modalities=PAIR, shuffle=True, seed=3).__getitems__([5, 0])
    np.testing.assert_array_equal(again["order"].numpy(), order[[5, 0]])
    x, y, kw = batch_to_device(batch, "cpu")
    mask = kw["loss_mask"].numpy()  # False exactly on targets in a row's missing hsc block
    for r in range(20):
        hsc_slot = list(order[r]).index(1)
        in_hsc = (np.arange(1, 16) // 8) == hsc_slot
        np.testing.assert_array_equal(mask[r], ~in_hsc | valid["hsc_image"][r])
    summary = train(_train_cfg(tmp_path / "s", tmp_path / "run", shuffle_modalities=True, max_iters=2,
                               eval_interval=2, log_interval=1))
    assert np.isfinite(summary["loss"])


def test_modality_orders_reach_every_permutation_and_change_per_epoch():
    from astropt_train.data import modality_orders

    perms = {tuple(p) for p in __import__("itertools").permutations(range(3))}
    epoch0 = modality_orders(7, 0, np.arange(300), 3)
    assert {tuple(o) for o in epoch0} == perms  # across galaxies
    assert {tuple(modality_orders(7, e, [5], 3)[0]) for e in range(80)} == perms  # one galaxy across epochs
    epoch1 = modality_orders(7, 1, np.arange(300), 3)
    assert 0.7 < (epoch0 != epoch1).any(axis=1).mean() < 0.95  # about 5/6 of galaxies change order
    np.testing.assert_array_equal(modality_orders(7, 1, np.arange(300), 3), epoch1)  # a pure function
    assert not np.array_equal(modality_orders(8, 1, np.arange(300), 3), epoch1)  # of the seed too


def _tiny_two_column_store(path, rows=24, per=8):
    rng = np.random.default_rng(1)
    tokens = {m: rng.integers(0, 50, size=(rows, per)) for m in PAIR}
    st.write_store_from_arrays(path, tokens, 2, {"id": "random", "vocab_size": 50, "tokens_per_image": per},
                               {m: ["DES-G"] if m == PAIR[0] else ["HSC-G"] for m in PAIR})
    return tokens


def test_shuffled_orders_change_per_epoch_equal_across_workers_and_resume(tmp_path):
    from astropt_train.data import EpochBatchSampler, TokenRows, make_loader

    tokens = _tiny_two_column_store(tmp_path / "s")
    store = st.TokenStore(tmp_path / "s")
    dataset = TokenRows(store, modalities=PAIR, shuffle=True, seed=3)
    rows = np.arange(store.num_rows)

    def batches(workers, start=0, count=12):
        sampler = EpochBatchSampler(rows, 4, seed=3)
        sampler.start_epoch, sampler.start_batch = sampler.position(start)
        return [b for _, b in zip(range(count), make_loader(store, sampler, workers, False, dataset=dataset))]

    in_process, workers = batches(0), batches(2)
    for a, b in zip(in_process, workers):
        assert torch.equal(a["order"], b["order"]) and torch.equal(a["tokens"], b["tokens"])
    for a, b in zip(in_process[7:], batches(2, start=7, count=5)):  # resumed mid-epoch 1
        assert torch.equal(a["order"], b["order"]) and torch.equal(a["tokens"], b["tokens"])
    per_epoch = {}  # epoch -> {row: order}; 6 batches of 4 per epoch
    for i, batch in enumerate(in_process):
        for seq, order in zip(batch["tokens"].numpy(), batch["order"].numpy()):
            row = int(np.flatnonzero((tokens[PAIR[order[0]]] == seq[:8]).all(1))[0])
            np.testing.assert_array_equal(seq, np.concatenate([tokens[PAIR[k]][row] for k in order]))
            per_epoch.setdefault(i // 6, {})[row] = tuple(order)
    assert sorted(per_epoch[0]) == sorted(per_epoch[1]) == list(range(24))
    changed = sum(per_epoch[0][r] != per_epoch[1][r] for r in range(24))
    assert 4 <= changed <= 20  # about half of the galaxies swap their blocks between epochs
    fixed = dataset.__getitems__(rows)["order"]  # plain rows (validation): the epoch-0 order, at every call
    assert torch.equal(fixed, dataset.__getitems__(rows)["order"])
    assert [tuple(o) for o in fixed.tolist()] == [per_epoch[0][r] for r in range(24)]


def test_shuffled_training_resumes_exactly_and_loss_chunks_logs_each_modality(tmp_path):
    _tiny_two_column_store(tmp_path / "s")
    kw = dict(shuffle_modalities=True, max_iters=8, lr_decay_iters=8, log_interval=1, eval_interval=8)
    train(_train_cfg(tmp_path / "s", tmp_path / "a", **kw))  # 19 train rows: 4 batches per epoch, two epochs
    train(_train_cfg(tmp_path / "s", tmp_path / "b", **{**kw, "max_iters": 3, "checkpoint_interval": 3}))
    train(_train_cfg(tmp_path / "s", tmp_path / "b", **kw, resume=True))
    train(_train_cfg(tmp_path / "s", tmp_path / "c", **kw, loss_chunks=3))

    def losses(run, key="loss"):
        return [(r["step"], r[key]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    straight, resumed = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [s for s, _ in resumed] == list(range(1, 9))
    np.testing.assert_allclose([v for _, v in resumed], [v for _, v in straight], rtol=0, atol=1e-6)
    for key in ["loss", *(f"loss_{m}" for m in PAIR)]:  # --loss-chunks: the same run, each modality logged
        np.testing.assert_allclose([v for _, v in losses(tmp_path / "c", key)], [v for _, v in losses(tmp_path / "a", key)],
                                   rtol=0, atol=1e-4, err_msg=key)


@pytest.mark.parametrize("head, chunks, shuffled, partial", [("affine", 3, False, False), ("affine", 4, True, False),
                                                        ("aim", 2, False, True), ("affine", 5, True, True)])
def test_chunked_loss_with_two_modalities_equals_the_plain_loss(head, chunks, shuffled, partial):
    """--loss-chunks with several modalities: the same loss, per-modality losses and gradients as the plain path,
    each position through its own modality's head (shuffled orders, a loss_mask and the missing-modality attention
    mask too), and no (B, T, vocab) logits returned or kept for the backward pass."""
    from astropt_train.data import valid_at

    torch.manual_seed(0)
    B, per, vocab = 4, 6, 301
    model = GPT(GPTConfig(vocab_size=vocab, block_size=2 * per, n_layer=2, n_head=2, n_embd=32, head=head,
                          dropout=0.1, modalities=["a", "b"]))
    tokens = torch.randint(0, vocab, (B, 2 * per))
    x, y, kw = tokens[:, :-1], tokens[:, 1:], {}
    if shuffled:
        kw["order"] = torch.tensor([[1, 0], [0, 1], [1, 0], [1, 0]])
    if partial:  # row 1 lacks b, row 2 lacks a
        valid = torch.tensor([[True, True], [True, False], [False, True], [True, True]])
        kw["loss_mask"] = valid_at(valid, kw.get("order"), 1, 2 * per - 1)
        kw["present"] = valid_at(valid, kw.get("order"), 0, 2 * per - 1)

    def run(n):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks on both paths
        parts, saved = {}, []

        def keep(t):
            saved.append(t.size(-1) == vocab if t.dim() else False)  # a tensor of logits (..., vocab)
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            logits, loss = model(x, y, loss_chunks=n, modality_losses=parts, **kw)
        loss.backward()
        return logits, loss.detach(), parts, any(saved), {k: p.grad.clone() for k, p in model.named_parameters()}

    plain_logits, plain, plain_parts, plain_saved, plain_grads = run(1)
    logits, chunked, parts, saved, grads = run(chunks)
    assert plain_logits.shape == (B, 2 * per - 1, vocab) and logits is None
    assert plain_saved and not saved  # the plain path keeps logits for its backward pass, the chunked one none
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    expected = model.loss_by_modality(plain_logits, y, kw.get("order"), kw.get("loss_mask"))
    for m in ("a", "b"):
        torch.testing.assert_close(plain_parts[m], expected[m].detach())
        torch.testing.assert_close(parts[m], expected[m].detach(), rtol=1e-6, atol=1e-6)
    for k, g in plain_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-7, msg=k)


def test_model_several_modalities_kv_cache_and_order():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=12, n_layer=2, n_head=2, n_embd=32, modalities=["a", "b"])).eval()
    tokens = torch.randint(0, 50, (3, 12))
    fixed, _ = model(tokens[:, :-1], tokens[:, 1:])
    same, _ = model(tokens[:, :-1], tokens[:, 1:], order=torch.tensor([[0, 1]] * 3))
    torch.testing.assert_close(fixed, same)
    swapped, _ = model(tokens[:, :-1], tokens[:, 1:], order=torch.tensor([[1, 0]] * 3))
    assert not torch.allclose(fixed, swapped)
    for order in (None, torch.tensor([[1, 0], [0, 1], [1, 0]])):
        outs = [model.generate(tokens[:, :4], 8, generator=torch.Generator().manual_seed(1), use_kv_cache=use,
                               order=order) for use in (True, False)]
        assert torch.equal(outs[0], outs[1])


def test_two_modality_checkpoint_loads_into_upstream_astropt(upstream_astropt):
    """Upstream's GPT built with the same two ModalityConfigs takes our weights strictly, and with the blocks in
    its order (sorted names) gives our logits."""
    from test_train_model import upstream_gpt

    names = sorted(PAIR)  # upstream concatenates modalities in sorted-name order
    vocab, per = 60, 8
    theirs = upstream_gpt(upstream_astropt.model, vocab, 2 * per, 2, 2, 32, "affine", names=tuple(names))
    ours = GPT(GPTConfig(vocab_size=vocab, block_size=2 * per, n_layer=2, n_head=2, n_embd=32, modalities=names)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    blocks = {m: torch.randint(0, vocab, (2, per)) for m in names}
    inputs = {**blocks, **{f"{m}_positions": torch.arange(per).expand(2, per) for m in names}}
    out, _ = theirs(inputs)
    sequence = torch.cat([blocks[m] for m in names], dim=1)
    logits, _ = ours(sequence[:, :-1], sequence[:, 1:])
    torch.testing.assert_close(out[names[0]], logits[:, : per - 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[names[1]], logits[:, per - 1:], atol=1e-5, rtol=1e-5)


def test_two_survey_export_loads_into_upstreams_gpt_and_agrees(upstream_astropt, two_modality_run, two_column_store,
                                                              tmp_path):
    """`export` of the two-survey run (blocks legacysurvey_image, hsc_image): upstream's own `load_astropt` builds
    its GPT from the exported registry and takes every weight, and so does a strict load_state_dict; on the same
    galaxies, in upstream's block order (sorted names), its logits and its centre-layer embeddings per modality
    (`generate_embeddings`, mean and exp_decay) are our model's."""
    from astropt_train.checkpoint import load_model
    from astropt_train.use.embed import pool_hidden
    from astropt_train.use.interop import export_astropt

    path = export_astropt(two_modality_run, tmp_path / "export")
    theirs = upstream_astropt.model_utils.load_astropt(repo_id=None, path=f"{path.parent}/").eval()
    exported = torch.load(path, weights_only=False, map_location="cpu")["model"]  # upstream's classes: trusted here
    assert theirs.load_state_dict(exported, strict=True)  # every key, no key left over (no _orig_mod. prefix)
    names = theirs.modality_registry.names()
    assert names == sorted(PAIR) != PAIR  # upstream reads hsc_image first, our run legacysurvey_image first
    ours, _ = load_model(two_modality_run)
    store, n = st.TokenStore(two_column_store), 3
    per = store.tokens_per_image
    blocks = {m: torch.as_tensor(store.take(np.arange(n), m).astype(np.int64)) for m in names}
    inputs = {**blocks, **{f"{m}_positions": torch.arange(per).expand(n, per) for m in names}}
    sequence = torch.cat([blocks[m] for m in names], dim=1)  # (n, 2 * per): upstream's order
    order = torch.tensor([[PAIR.index(m) for m in names]] * n)  # block k holds our modality order[:, k]
    with torch.no_grad():
        out, _ = theirs(inputs)
        logits, _ = ours(sequence, sequence, order=order)  # position p: the head of token p + 1's modality
        centre = ours.hidden_states(sequence, [ours.config.n_layer // 2], order=order)[0]  # (n, 2 * per, C)
    torch.testing.assert_close(out[names[0]], logits[:, : per - 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[names[1]], logits[:, per - 1: 2 * per - 1], atol=1e-5, rtol=1e-5)
    for pool in ("mean", "exp_decay"):
        want = theirs.generate_embeddings(inputs, reduction=pool)
        for k, m in enumerate(names):
            torch.testing.assert_close(want[m], pool_hidden(centre[:, k * per:(k + 1) * per], pool), atol=1e-5,
                                       rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# cross-survey decoding


def test_decode_draws_one_survey_from_the_other(two_modality_run, two_column_store, tmp_path, capsys):
    from astropt_train.use.decode import DecodeConfig, decode, summarise

    given, wanted = PAIR
    result = decode(DecodeConfig(out=tmp_path / "cross.png", checkpoint=two_modality_run, rows="0:1", given=given,
                                 generate_modality=wanted, device="cpu", seed=1, threads=1))
    store = st.TokenStore(two_column_store)
    assert result.mode == "cross" and result.out.is_file() and result.tokens.shape == (1, 576)
    assert result.columns == [f"real {wanted}", "codec reconstruction", f"drawn from {given}"]
    assert result.bands == store.modality_bands[wanted] and result.flux.shape == (1, 5, 96, 96)
    cross = summarise(result)["metrics"]["cross"]
    assert set(cross["vs_original"]["per_band"]) == set(result.bands) == set(cross["vs_reconstruction"]["per_band"])
    assert set(cross["reconstruction_vs_original"]["per_band"]) == set(result.bands)  # the codec's ceiling
    assert set(cross["vs_original"]["colours"]) == {"g-r", "r-i", "i-z", "z-y"}
    assert "has not learned" not in capsys.readouterr().err  # trained legacysurvey_image first


def test_cross_survey_tokens_continue_the_given_block_in_order():
    """Greedy drawing: every drawn token is the model's argmax after the given block and the tokens drawn before
    it, with the given modality first (either way round)."""
    from astropt_train.use.decode import cross_survey_tokens

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=30, block_size=12, n_layer=1, n_head=2, n_embd=16, modalities=["a", "b"])).eval()
    given = torch.randint(0, 30, (2, 6)).numpy()
    for first, second, order in (("a", "b", [0, 1]), ("b", "a", [1, 0])):
        drawn = cross_survey_tokens(model, given, first, second, temperature=0)
        sequence = torch.as_tensor(np.concatenate([given, drawn], axis=1))
        logits, _ = model(sequence[:, :-1], sequence[:, 1:], order=torch.tensor([order, order]))
        np.testing.assert_array_equal(logits[:, 5:].argmax(-1).numpy(), drawn)


def test_cross_survey_mistakes_are_one_error(two_modality_run, tmp_path):
    from astropt_train.use.decode import DecodeConfig, decode

    base = dict(out=tmp_path / "x.png", checkpoint=two_modality_run, rows="0:1", device="cpu")
    for kw, message in [(dict(given=PAIR[0]), "needs both --given"),
                        (dict(given=PAIR[0], generate_modality=PAIR[0]), "name two modalities"),
                        (dict(given=PAIR[0], generate_modality="nope"), "--generate-modality nope: checkpoint"),
                        (dict(given=PAIR[0], generate_modality=PAIR[1], predict=True), "choose one of")]:
        with pytest.raises(AstroptError, match=message):
            decode(DecodeConfig(**{**base, **kw}))


def test_cross_survey_warns_about_an_order_never_trained(two_modality_run, two_column_store, capsys):
    from astropt_train.checkpoint import load_model
    from astropt_train.use.decode import DecodeConfig, _check_cross

    model, config = load_model(two_modality_run)
    store = st.TokenStore(two_column_store)
    _check_cross(DecodeConfig(checkpoint=two_modality_run, given=PAIR[1], generate_modality=PAIR[0]), model, store,
                 config["store"])
    assert "has not learned to draw it" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# decode chooses its survey (--modality) and refuses another survey's bands


def test_decode_modality_decodes_that_columns_tokens_in_its_bands(two_column_store, codec_dir, tmp_path, capsys):
    from astropt_tok.codec import load_image_codec
    from astropt_train.use.decode import DecodeConfig, decode, decode_tokens

    store = st.TokenStore(two_column_store)
    rows = np.array([0, 2])
    hsc = decode(DecodeConfig(tokens=two_column_store, rows="0,2", modality=HSC[0], out=tmp_path / "h.png",
                              device="cpu", threads=1))
    assert "note:" not in capsys.readouterr().err  # chosen: nothing to say
    assert hsc.modality == HSC[0] and hsc.bands == list(HSC_BANDS) and hsc.rgb_bands == ["HSC-I", "HSC-R", "HSC-G"]
    np.testing.assert_array_equal(hsc.tokens, store.take(rows, HSC[0]))
    assert not np.array_equal(hsc.tokens, store.take(rows, LS[0]))
    codec = load_image_codec(str(codec_dir))
    np.testing.assert_allclose(hsc.flux, decode_tokens(codec, store.take(rows, HSC[0]), list(HSC_BANDS)),
                               rtol=1e-5, atol=1e-5)  # threads may differ: float sums in another order
    # none chosen: the first column, as before, with a note that says so and how to choose
    first = decode(DecodeConfig(tokens=two_column_store, rows="0,2", save_flux=tmp_path / "f.npy", device="cpu",
                                threads=1, bands=["DES-R"]))
    assert f"decoding {LS[0]} (--modality chooses)" in capsys.readouterr().err
    assert first.modality == LS[0] and first.bands == ["DES-R"]
    np.testing.assert_array_equal(first.tokens, store.take(rows, LS[0]))


def _run_decode_cli(argv, capsys) -> str:
    from astropt_tok.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["decode", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    return err


@pytest.fixture(scope="module")
def unloadable_checkpoint(two_modality_run, tmp_path_factory):
    """A copy of the two-survey run's checkpoint whose weights cannot be loaded: any error that is not about
    them was found before the model loaded."""
    import shutil

    from astropt_train.checkpoint import MODEL_FILE, find_checkpoint

    copy = tmp_path_factory.mktemp("unloadable") / "ckpt"
    shutil.copytree(find_checkpoint(two_modality_run), copy)
    (copy / MODEL_FILE).write_bytes(b"not safetensors")
    return copy


def test_bands_of_another_survey_and_flag_mistakes_fail_before_any_codec_or_model_loads(
        two_column_store, unloadable_checkpoint, tmp_path, capsys):
    base = ["--tokens", str(two_column_store), "--codec", str(tmp_path / "no-such-codec"), "--out",
            str(tmp_path / "g.png")]
    hsc = ",".join(HSC_BANDS)
    model = ["--checkpoint", str(unloadable_checkpoint)]
    cases = [
        (["--rows", "0", "--bands", hsc], f"--bands {hsc}: the tokens decoded are {LS[0]} of token store"),
        (["--rows", "0", "--bands", "HSC-G"], f"in bands DES-G,DES-R,DES-I,DES-Z; bands of another survey"),
        (["--rows", "0", "--bands", "HSC-G"], f"pass --modality {HSC[0]}"),
        (["--rows", "0", "--rgb", "HSC-I,HSC-R,HSC-G"], f"--rgb HSC-I,HSC-R,HSC-G: the tokens decoded are {LS[0]}"),
        (["--rows", "0", "--modality", HSC[0], "--rgb", "DES-Z,DES-R,DES-G"], f"pass --modality {LS[0]}"),
        (["--rows", "0", "--modality", "nope"], f"--modality nope: token store {two_column_store} holds {LS[0]}, {HSC[0]}"),
        (["--rows", "0", "--bands", "DES-Q"], "--bands: unknown band 'DES-Q'"),
        (["--rows", "0:13"], "rows '0:13' are out of range: the store has 12 rows"),
        (["--random", "13"], "--random 13: the store has 12 rows"),
        ([*model, "--rows", "0", "--complete-from", "576"], "--complete-from must be between 1 and 575"),
        ([*model, "--rows", "0:99", "--predict"], "out of range"),
        ([*model, "--rows", "0", "--predict", "--modality", HSC[0], "--bands", "DES-G"], "the tokens decoded are hsc"),
        ([*model, "--rows", "0", "--given", LS[0], "--generate-modality", HSC[0], "--modality", LS[0]],
         "--modality legacysurvey_image with --given"),
        ([*model, "--rows", "0", "--given", LS[0], "--generate-modality", HSC[0], "--rgb", "DES-Z,DES-R,DES-G"],
         f"pass --generate-modality {LS[0]}"),
    ]
    import importlib.util

    if importlib.util.find_spec("astropy") is None:
        cases.append((["--rows", "0", "--save-flux", str(tmp_path / "f.fits")], "needs astropy to write FITS: pip install astropy"))
    for extra, message in cases:
        assert message in _run_decode_cli([*base, *extra], capsys), extra
    # the same flags, right: now the codec (stored rows) and the weights (a model's mode) are what fail
    assert "no-such-codec" in _run_decode_cli([*base, "--rows", "0", "--modality", HSC[0], "--rgb", "HSC-I,HSC-R,HSC-G"],
                                              capsys)
    assert "unreadable" in _run_decode_cli([*base, *model, "--rows", "0", "--predict", "--modality", HSC[0]], capsys)


def test_flag_mistakes_are_found_before_torch_is_imported(two_column_store, two_modality_run):
    """A fresh process: the flag errors come before torch (or aion) is imported at all, so they take a moment."""
    import subprocess
    import sys

    code = ("import sys; from astropt_tok.cli import main\n"
            "for extra in (['--rows', '0:13'], ['--checkpoint', sys.argv[2], '--rows', '0', '--predict', "
            "'--modality', 'hsc_image', '--bands', 'DES-G'], ['--checkpoint', sys.argv[2], '--rows', '0', "
            "'--complete-from', '576']):\n"
            "    try: main(['decode', '--tokens', sys.argv[1], *extra])\n"
            "    except SystemExit: pass\n"
            "print([m for m in ('torch', 'aion') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, str(two_column_store), str(two_modality_run)],
                         capture_output=True, text=True, check=True)
    errors = out.stderr.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("error: ") for e in errors), out.stderr
    assert out.stdout.strip() == "[]"


def test_a_later_modality_is_predicted_completed_and_sampled_in_its_trained_block(two_modality_run, two_column_store,
                                                                                  tmp_path, capsys):
    """Greedy: each token the model writes for hsc_image (its second block) is its argmax after the row's stored
    legacysurvey_image block and the hsc_image tokens before it, as it was trained."""
    from astropt_train.checkpoint import load_model
    from astropt_train.use.decode import DecodeConfig, decode

    model, _ = load_model(two_modality_run)
    store = st.TokenStore(two_column_store)
    rows = np.array([1, 3])
    ls, hsc = (torch.as_tensor(store.take(rows, m).astype(np.int64)) for m in PAIR)
    base = dict(tokens=two_column_store, checkpoint=two_modality_run, rows="1,3", modality=HSC[0], device="cpu",
                threads=1, temperature=0, save_flux=tmp_path / "f.npy")

    predicted = decode(DecodeConfig(predict=True, **base))
    assert f"reads {LS[0]} before {HSC[0]}" in capsys.readouterr().err
    logits, _ = model(torch.cat([ls, hsc], 1)[:, :-1], torch.cat([ls, hsc], 1)[:, 1:])  # [2, 2T-1, vocab]
    want = logits[:, 576:].argmax(-1)  # [2, T-1]: the predictions of hsc_image tokens 1..T-1
    np.testing.assert_array_equal(predicted.tokens[:, 1:], want.numpy())
    np.testing.assert_array_equal(predicted.tokens[:, 0], hsc[:, 0].numpy())
    accuracy = float((want == hsc[:, 1:]).float().mean())
    assert predicted.metrics["prediction"]["accuracy"] == pytest.approx(accuracy)
    assert predicted.bands == list(HSC_BANDS) and predicted.flux.shape == (2, 5, 96, 96)

    k = 570
    completed = decode(DecodeConfig(complete_from=k, **base))
    np.testing.assert_array_equal(completed.tokens[:, :k], hsc[:, :k].numpy())
    sequence = torch.cat([ls, torch.as_tensor(completed.tokens)], 1)
    logits, _ = model(sequence[:, :-1], sequence[:, 1:])
    np.testing.assert_array_equal(logits[:, 576 + k - 1:].argmax(-1).numpy(), completed.tokens[:, k:])

    generated = decode(DecodeConfig(**{**base, "rows": None, "generate": 2}))
    assert "it samples them first" in capsys.readouterr().err
    assert generated.tokens.shape == (2, 576) and generated.modality == HSC[0]
    assert generated.tokens.min() >= 0 and generated.tokens.max() < store.vocab_size


def test_info_of_a_run_and_checkpoint_lists_each_modality_with_its_bands(two_modality_run, capsys):
    from astropt_tok.cli import main
    from astropt_train.checkpoint import find_checkpoint

    for folder in (two_modality_run, find_checkpoint(two_modality_run)):
        main(["info", str(folder)])
        lines = capsys.readouterr().out.splitlines()
        shown = [line for line in lines if line.startswith("modality ")]
        assert shown == [f"modality {name}: bands {','.join(bands)}" for name, bands in (LS, HSC)], lines


def test_embed_gives_joint_and_per_modality_embeddings(two_modality_run, two_column_store, tmp_path):
    from astropt_train.use.embed import EmbedConfig, embed, read_embeddings, verify_embeddings

    out = tmp_path / "emb"
    embed(EmbedConfig(checkpoint=two_modality_run, out=out, tokens=two_column_store, device="cpu", progress=False,
                      batch_size=8))
    assert verify_embeddings(out) == []
    joint, rows, _ = read_embeddings(out)
    per = {m: read_embeddings(out, f"embedding_{m}")[0] for m in PAIR}
    assert joint.shape == per[PAIR[0]].shape == (ROWS, 32)
    np.testing.assert_allclose(joint, (per[PAIR[0]] + per[PAIR[1]]) / 2, atol=1e-5)  # mean over equal blocks
    assert not np.allclose(per[PAIR[0]], per[PAIR[1]])
    from astropt_train.checkpoint import load_model

    model, _ = load_model(two_modality_run)
    store = st.TokenStore(two_column_store)
    sequence = torch.as_tensor(np.concatenate([store.take([0], m) for m in PAIR], axis=1).astype(np.int64))
    (hidden,) = model.hidden_states(sequence, [model.config.n_layer])
    np.testing.assert_allclose(per[PAIR[1]][0], hidden[0, 576:].mean(0).detach().numpy(), atol=1e-4)
