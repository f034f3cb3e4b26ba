"""The artifact rules in one place (astropt_tok.artifacts, astropt_tok.atomic): what a folder holds, which
command may write or clear it, and the lineage checks before two artifacts are combined."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from astropt_tok import artifacts as art
from astropt_tok.atomic import atomic_file, atomic_write_text
from astropt_tok.errors import AstroptError
from astropt_tok.store import TokenStore, manifest_sha256, write_store_from_arrays

KIND_NAMES = sorted(art.KINDS)


def _store(path, codec_sha="a" * 64, bands=("DES-G", "DES-R"), modalities=None, id_column="object_id"):
    rng = np.random.default_rng(0)
    codec = {"id": "codec-x", "weights_sha256": codec_sha, "vocab_size": 64, "tokens_per_image": 16}
    if modalities:
        tokens = {m: rng.integers(0, 64, size=(6, 16)) for m in modalities}
        bands = {m: list(b) for m, b in modalities.items()}
    else:
        tokens = rng.integers(0, 64, size=(6, 16))
    write_store_from_arrays(path, tokens, num_shards=2, codec=codec, bands=bands,
                            source={"id": "in-memory", "kind": "arrays", "num_rows": 6, "column": "legacysurvey_image",
                                    "id_column": id_column})
    return TokenStore(path)


@pytest.mark.parametrize("made", KIND_NAMES)
@pytest.mark.parametrize("wanted", KIND_NAMES)
def test_a_folder_of_one_kind_is_never_claimed_by_another(made, wanted, tmp_path):
    folder = tmp_path / "out"
    art.claim_output(folder, made, f"`astropt {made}`")
    (folder / "something-it-wrote").write_text("x")
    if made == wanted:
        assert art.claim_output(folder, wanted, "`astropt x`", flag="--out") is True
    else:
        with pytest.raises(AstroptError, match=r"--out .* holds .*never replaces another kind"):
            art.claim_output(folder, wanted, "`astropt x`", flag="--out")
    assert (folder / "something-it-wrote").read_text() == "x"  # nothing cleared either way


@pytest.mark.parametrize("wanted", KIND_NAMES)
def test_a_folder_of_unknown_files_is_never_claimed(wanted, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    with pytest.raises(AstroptError, match=r"is not empty and holds no .*thesis\.tex"):
        art.claim_output(folder, wanted, "`astropt x`")
    assert (folder / "thesis.tex").read_text() == "years of work"
    assert not (folder / art.RECORD).exists()


def test_new_and_empty_folders_are_claimed_and_recorded(tmp_path):
    assert art.claim_output(tmp_path / "a" / "b", "embeddings", "`astropt embed`", lineage={"x": 1}) is False
    rec = art.read_record(tmp_path / "a" / "b")
    assert rec["kind"] == "embeddings" and rec["lineage"] == {"x": 1} and rec["command"] == "`astropt embed`"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / art.LOCK_FILE).write_text("")  # a lock file alone is not content
    assert art.claim_output(tmp_path / "empty", "run", "`astropt train`") is False
    assert art.identify(tmp_path / "empty") == "run"


def test_a_file_as_the_folder_is_one_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(AstroptError, match="exists as a file"):
        art.claim_output(tmp_path / "f", "run", "`astropt train`")


def test_legacy_folders_are_identified_by_their_own_files(tmp_path):
    store = tmp_path / "store"
    _store(store)
    (store / art.RECORD).unlink(missing_ok=True)
    assert art.identify(store) == "token-store"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert art.identify(run) == "run"
    codec = tmp_path / "codec"
    (codec / "codecs" / "image").mkdir(parents=True)
    assert art.identify(codec) == "codec"
    export = tmp_path / "export"
    export.mkdir()
    (export / "ckpt.pt").write_bytes(b"x")
    assert art.identify(export) == "export"
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "demo_summary.json").write_text("{}")
    assert art.identify(demo) == "demo"
    emb = tmp_path / "emb"
    emb.mkdir()
    (emb / "manifest.json").write_text(json.dumps({"format": "astropt-embeddings"}))
    assert art.identify(emb) == "embeddings"
    assert art.identify(tmp_path / "nothing") is None
    # a legacy store claimed by its own kind gets a record; by another kind, refused
    with pytest.raises(AstroptError, match="holds a token store"):
        art.claim_output(store, "embeddings", "`astropt embed`")
    assert art.claim_output(store, "token-store", "`astropt tokenise`") is True
    assert art.read_record(store)["kind"] == "token-store"


@pytest.mark.parametrize("damage", ["not json {", json.dumps({"format": "astropt-artifact", "kind": "nope"}),
                                    json.dumps([1, 2]), "\xff\xfe"])
def test_a_damaged_record_is_one_error_naming_it(damage, tmp_path):
    (tmp_path / art.RECORD).write_bytes(damage.encode("latin-1"))
    with pytest.raises(AstroptError, match=r"\.astropt-artifact\.json is damaged"):
        art.identify(tmp_path)


def test_clear_own_removes_only_what_the_kind_writes(tmp_path):
    store = tmp_path / "store"
    _store(store)
    (store / "notes.txt").write_text("mine")
    (store / art.LOCK_FILE).write_text("")
    removed = art.clear_own(store, "token-store")
    assert "manifest.json" in removed and any(n.startswith("shard-") for n in removed)
    assert sorted(p.name for p in store.iterdir()) == sorted([art.LOCK_FILE, "notes.txt", art.RECORD])
    with pytest.raises(AstroptError, match="not cleared"):
        art.clear_own(store, "run")


def test_clear_own_keeps_what_the_caller_names(tmp_path):
    demo = tmp_path / "demo"
    art.claim_output(demo, "demo", "`astropt demo`")
    for name in ("survey", "tokens", "run"):
        (demo / name).mkdir()
    art.clear_own(demo, "demo", keep=("survey",))
    assert sorted(p.name for p in demo.iterdir()) == [art.RECORD, "survey"]


def test_check_not_inside(tmp_path):
    art.check_not_inside(tmp_path / "src", tmp_path / "work", "--source", "--workdir")
    for inside in (tmp_path / "work", tmp_path / "work" / "survey", tmp_path / "work" / "a" / "b.parquet"):
        with pytest.raises(AstroptError, match="lies inside --workdir"):
            art.check_not_inside(inside, tmp_path / "work", "--source", "--workdir")


# --- lineage


def test_model_vs_store_codec_weights(tmp_path):
    store = _store(tmp_path / "s", codec_sha="a" * 64)
    sha = manifest_sha256(store.dir)
    trained = art.model_store_info(store, sha)
    assert art.check_model_store("run R", trained, None, store, sha) == []
    other = _store(tmp_path / "o", codec_sha="b" * 64)
    with pytest.raises(AstroptError, match=r"weights sha256 aaaaaaaaaaaa.*weights sha256 bbbbbbbbbbbb"):
        art.check_model_store("run R", trained, None, other, manifest_sha256(other.dir))


def test_model_vs_store_bands_and_modalities(tmp_path):
    two = _store(tmp_path / "two", modalities={"legacysurvey_image": ["DES-G", "DES-R"],
                                                "hsc_image": ["HSC-G", "HSC-R", "HSC-I"]})
    sha = manifest_sha256(two.dir)
    trained = art.model_store_info(two, sha)
    assert art.check_model_store("run R", trained, ["hsc_image"], two, sha) == []
    # a model of hsc_image alone fed a store whose only column is the Legacy Survey's
    one = _store(tmp_path / "one", bands=("DES-G", "DES-R"))
    with pytest.raises(AstroptError, match="models hsc_image, which store .* does not hold"):
        art.check_model_store("run R", trained, ["hsc_image"], one, manifest_sha256(one.dir))
    # the same modality name in other bands
    hsc_other = _store(tmp_path / "h2", modalities={"hsc_image": ["HSC-Z", "HSC-Y", "HSC-I"],
                                                     "legacysurvey_image": ["DES-G", "DES-R"]})
    with pytest.raises(AstroptError, match="learned hsc_image in bands HSC-G,HSC-R,HSC-I"):
        art.check_model_store("run R", trained, ["hsc_image"], hsc_other, manifest_sha256(hsc_other.dir))
    # a one-column model reads the first column: its bands must be the ones it learned
    des = art.model_store_info(one, manifest_sha256(one.dir))
    with pytest.raises(AstroptError, match="trained on images in bands DES-G,DES-R"):
        art.check_model_store("run R", des, None, hsc_other, manifest_sha256(hsc_other.dir))


def test_runs_recorded_before_lineage_records_are_checked_by_their_bands(tmp_path):
    """Older runs kept the modalities trained on as [{"name", "bands"}], and no codec sha256."""
    two = _store(tmp_path / "two", modalities={"legacysurvey_image": ["DES-G", "DES-R"],
                                                "hsc_image": ["HSC-G", "HSC-R", "HSC-I"]})
    older = {"dir": str(two.dir), "manifest_sha256": "0" * 64, "codec_id": "codec-x", "bands": ["DES-G", "DES-R"],
             "modalities": [{"name": "hsc_image", "bands": ["HSC-G", "HSC-R", "HSC-I"]}]}
    notes = art.check_model_store("run R", older, ["hsc_image"], two, manifest_sha256(two.dir))
    assert len(notes) == 1 and "codec is checked by its id only" in notes[0]
    other = _store(tmp_path / "h2", modalities={"hsc_image": ["HSC-Z", "HSC-Y", "HSC-I"],
                                                 "legacysurvey_image": ["DES-G", "DES-R"]})
    with pytest.raises(AstroptError, match="learned hsc_image in bands HSC-G,HSC-R,HSC-I"):
        art.check_model_store("run R", older, ["hsc_image"], other, manifest_sha256(other.dir))
    with pytest.raises(AstroptError, match="trained on tokens of codec codec-y, but store"):
        art.check_model_store("run R", {**older, "codec_id": "codec-y"}, ["hsc_image"], two, manifest_sha256(two.dir))


def test_upstream_models_record_nothing_and_get_a_note(tmp_path):
    store = _store(tmp_path / "s")
    notes = art.check_model_store("ckpt.pt", None, None, store)
    assert len(notes) == 1 and notes[0].startswith("note:")


class _Codec:
    def __init__(self, sha):
        self.codec_id, self.weights_sha256 = "/codecs/x", sha


def test_store_vs_codec_folder():
    recorded = {"id": "/codecs/x", "weights_sha256": "a" * 64}
    assert art.check_store_codec("store S", recorded, _Codec("a" * 64)) == []
    with pytest.raises(AstroptError, match=r"aaaaaaaaaaaa.*bbbbbbbbbbbb.*--accept-codec-change"):
        art.check_store_codec("store S", recorded, _Codec("b" * 64))
    notes = art.check_store_codec("store S", recorded, _Codec("b" * 64), accept_changed=True)
    assert notes and notes[0].startswith("note:")
    # the same folder refitted "now has" other weights; another folder is another codec
    with pytest.raises(AstroptError, match=r"but codec /codecs/x now has weights sha256 bbbbbbbbbbbb"):
        art.check_store_codec("store S", recorded, _Codec("b" * 64))
    with pytest.raises(AstroptError, match=r"made with codec /codecs/y .*but codec /codecs/x has weights"):
        art.check_store_codec("store S", {"id": "/codecs/y", "weights_sha256": "a" * 64}, _Codec("b" * 64))
    # a run's record names them codec_id / codec_sha256
    with pytest.raises(AstroptError, match=r"aaaaaaaaaaaa"):
        art.check_store_codec("run R", {"codec_id": "/codecs/x", "codec_sha256": "a" * 64}, _Codec("b" * 64))


def test_embeddings_vs_changed_sources():
    manifest = {"tokens": {"dir": "/s", "manifest_sha256": "a" * 64},
                "checkpoint": {"path": "/r", "weights_sha256": "c" * 64}}
    art.check_embeddings_sources("E", manifest, "a" * 64, "c" * 64)
    with pytest.raises(AstroptError, match="token store /s"):
        art.check_embeddings_sources("E", manifest, "b" * 64, "c" * 64)
    with pytest.raises(AstroptError, match="checkpoint /r"):
        art.check_embeddings_sources("E", manifest, "a" * 64, "d" * 64)


# --- atomic writes


def test_a_failed_write_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "flux.npy"
    path.write_bytes(b"the complete earlier file")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the writer failed")
    assert path.read_bytes() == b"the complete earlier file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flux.npy"]


def test_an_io_failure_is_one_error_naming_the_file(tmp_path):
    import errno

    path = tmp_path / "report.json"
    atomic_write_text(path, "old")
    with pytest.raises(AstroptError, match=r"cannot write .*report\.json: the disk is full"):
        with atomic_file(path):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_text() == "old"


def test_a_folder_replaces_a_folder_whole(tmp_path):
    final = tmp_path / "step-1"
    final.mkdir()
    (final / "old").write_text("old")
    with atomic_file(final, folder=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_every_written_file_and_folder_gets_a_plain_files_mode_under_the_umask(tmp_path, umask):
    """A writer that makes a private temporary (safetensors, tempfile: 0600/0700) leaves what open() and mkdir()
    would: 0666 / 0777 less the umask, for a file, a folder and everything in it."""
    import os
    import tempfile

    from safetensors.numpy import save_file

    old = os.umask(umask)
    try:
        with atomic_file(tmp_path / "model.safetensors") as tmp:
            save_file({"w": np.zeros(3, dtype=np.float32)}, str(tmp))
        atomic_write_text(tmp_path / "config.json", "{}")
        with atomic_file(tmp_path / "step-1", folder=True) as tmp:
            inner = Path(tempfile.mkdtemp(dir=tmp))  # 0700
            fd, name = tempfile.mkstemp(dir=inner)  # 0600
            os.close(fd)
    finally:
        os.umask(old)
    written = [tmp_path / "model.safetensors", tmp_path / "config.json", tmp_path / "step-1",
               *sorted((tmp_path / "step-1").rglob("*"))]
    assert len(written) == 5
    assert {p.name: p.stat().st_mode & 0o777 for p in written} == \
        {p.name: (0o777 if p.is_dir() else 0o666) & ~umask for p in written}


# --- claiming under the lock, parts a command makes inside its own folder, file outputs


def test_output_folder_refuses_before_writing_even_the_lock(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    with pytest.raises(AstroptError, match="is not empty"):
        with art.output_folder(mine, "run", "`astropt train`"):
            pass
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    with art.output_folder(tmp_path / "new", "run", "`astropt train`") as existed:
        assert existed is False and (tmp_path / "new" / art.LOCK_FILE).is_file()
        with pytest.raises(AstroptError, match="in use by another"):  # one writer at a time
            with art.output_folder(tmp_path / "new", "run", "`astropt train`"):
                pass


def test_a_record_alone_is_reclaimed_by_any_kind(tmp_path):
    art.claim_output(tmp_path / "f", "embeddings", "`astropt embed`")  # the command then failed before writing
    assert art.check_claim(tmp_path / "f", "run", "`astropt train`") is None
    assert art.claim_output(tmp_path / "f", "run", "`astropt train`") is False
    assert art.read_record(tmp_path / "f")["kind"] == "run"


def test_claim_part_replaces_only_what_its_command_made(tmp_path):
    work = tmp_path / "w"
    assert art.claim_part(work / "tokens", "token-store", "`astropt demo`", "--workdir") is False
    assert art.claim_part(work / "tokens", "token-store", "`astropt demo`", "--workdir") is True
    _store(work / "users")  # a store the user made (a record of another command)
    with pytest.raises(AstroptError, match=r"made by `write_store_from_arrays`, not .*made by `astropt demo`"):
        art.claim_part(work / "users", "token-store", "`astropt demo`", "--workdir")
    legacy = work / "legacy"
    _store(legacy)
    (legacy / art.RECORD).unlink()
    with pytest.raises(AstroptError, match="replaces only what it made"):
        art.claim_part(legacy, "token-store", "`astropt demo`", "--workdir")
    assert art.claim_part(legacy, "token-store", "`astropt demo`", "--workdir", legacy=True) is True
    (work / "files").mkdir()
    (work / "files" / "a.txt").write_text("x")
    with pytest.raises(AstroptError, match="files no astropt command wrote"):
        art.claim_part(work / "files", "run", "`astropt demo`", "--workdir")


def test_check_file_output(tmp_path):
    run = tmp_path / "run"
    art.claim_output(run, "run", "`astropt train`")
    for inside in (run / "config.json", run / "new.png", run / "checkpoints" / "step-1" / "x.npy"):
        with pytest.raises(AstroptError, match="lies inside .*a training run"):
            art.check_file_output(inside, "--out")
    assert art.check_file_output(run / "pictures" / "x.png", "--out", inside=run) == run / "pictures" / "x.png"
    (tmp_path / "grid.png").mkdir()
    with pytest.raises(AstroptError, match="is a folder"):
        art.check_file_output(tmp_path / "grid.png", "--out")
    # a folder made before records existed: only its own files' names are refused
    legacy = tmp_path / "legacy"
    (legacy / "checkpoints").mkdir(parents=True)
    with pytest.raises(AstroptError, match="lies inside"):
        art.check_file_output(legacy / "loss_curve.png", "--out")
    art.check_file_output(legacy / "samples.png", "--out")
    art.check_file_output(tmp_path / "plain" / "samples.png", "--out")


def test_a_refused_command_leaves_a_record_less_folder_of_its_kind_as_it_was(codec_dir, tmp_path):
    """A codec folder made by hand or downloaded (a hub snapshot: no record) that fit-codec refuses to replace
    keeps its files exactly: no lineage record is left behind by the refused claim."""
    import shutil

    from astropt_tok.cli import main

    snapshot = tmp_path / "snapshot"
    shutil.copytree(codec_dir, snapshot)
    (snapshot / art.RECORD).unlink(missing_ok=True)
    before = sorted((p.relative_to(snapshot).as_posix(), p.read_bytes()) for p in snapshot.rglob("*") if p.is_file())
    with pytest.raises(SystemExit) as exit_:
        main(["fit-codec", "--source", str(tmp_path / "no-such-survey"), "--out", str(snapshot), "--steps", "2"])
    assert exit_.value.code == 1
    after = sorted((p.relative_to(snapshot).as_posix(), p.read_bytes()) for p in snapshot.rglob("*")
                   if p.is_file() and p.name != art.LOCK_FILE)
    assert after == before


def test_info_prints_any_artifacts_kind_and_lineage(tmp_path, capsys):
    from astropt_tok.cli import main

    run = tmp_path / "run"
    art.claim_output(run, "run", "`astropt train`", lineage={"store": {"manifest_sha256": "a" * 64}, "init_from": None})
    main(["info", str(run)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("a training run (made by `astropt train`)")
    assert f"store.manifest_sha256: {'a' * 64}" in out and "init_from: null" in out
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("x")
    with pytest.raises(SystemExit) as exit_:
        main(["info", str(tmp_path / "mine")])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.count("error:") == 1
