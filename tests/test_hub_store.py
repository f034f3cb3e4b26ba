"""One store, many nodes and collaborators: a token store folder is a Hugging Face dataset repo (its card, read by
`datasets.load_dataset`), `astropt push`'s refusals, and `hf://datasets/ORG/NAME` read through the HF cache.

Nothing here reaches the hub: the hub's side is a local HF cache laid out as `snapshot_download` leaves it
(datasets--ORG--NAME/refs/main and snapshots/<commit>/), read by the real `snapshot_download` offline. The upload
itself (`HfApi.upload_large_folder` / `upload_folder`) needs the hub and is not tested here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from astropt_tok.cli import main
from astropt_tok.errors import AstroptError
from astropt_tok.store import TokenStore, verify_store, write_store_from_arrays
from astropt_tok.store_card import CARD, NO_DATA_FILES, read_card_metadata
from astropt_tok.store_hub import parse_hub_store, resolve_store

CODEC = {"id": "tiny/codec", "vocab_size": 300, "tokens_per_image": 16, "weights_sha256": "ab" * 32}
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "org/galaxy-tokens"
URL = f"hf://datasets/{REPO}"


def make_store(folder: Path, storage: str = "arrow", rows: int = 30, shards: int = 3) -> Path:
    """A complete store of random tokens (vocab 300, 16 per image) with object ids."""
    rng = np.random.default_rng(1)
    write_store_from_arrays(folder, rng.integers(0, 300, size=(rows, 16)), shards, CODEC, ["DES-G", "DES-R"],
                            storage=storage, object_ids=[f"gal{i}" for i in range(rows)],
                            source={"id": "Smith42/legacysurvey", "kind": "hub", "split": "train",
                                    "column": "image", "num_rows": rows})
    return folder


@pytest.fixture(scope="module")
def arrow_store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("hub") / "store")


def hub_cache(cache: Path, store: Path, repo: str = REPO, commit: str = COMMIT) -> Path:
    """Lay `store`'s pushed files out in an HF cache as snapshot_download leaves a dataset repo (each file a blob
    named by its hash, linked from snapshots/<commit>/); the snapshot."""
    import hashlib

    from astropt_tok.store_hub import _push_files

    repo_dir = cache / ("datasets--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    for name in _push_files(store):
        data = (store / name).read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(os.path.relpath(blob, (snapshot / name).parent))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def damage(shard: Path) -> None:
    """Change one token of a shard in place (same size, still a valid Arrow file: only its sha256 tells)."""
    data = bytearray(shard.read_bytes())
    first = TokenStore(shard.parent, check_sizes=False).shard_tokens(int(shard.stem.split("-")[1]))[0].tobytes()
    at = data.find(first)
    assert at > 0
    data[at] ^= 0x01
    shard.write_bytes(bytes(data))


def run_cli(args, capsys) -> tuple[int, str, str]:
    """`astropt ARGS` in this process: (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# the card


def test_card_yaml_parses_and_holds_the_manifest_facts(arrow_store):
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(arrow_store / CARD)  # the hub library's own parser of a dataset card
    meta = card.data.to_dict()
    assert meta == read_card_metadata(arrow_store)
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "shard-*.arrow"}]}]
    assert [f["name"] for f in meta["dataset_info"]["features"]] == ["tokens", "row", "object_id"]
    assert meta["dataset_info"]["features"][0] == {"name": "tokens", "list": "int16", "length": 16}
    assert "astropt" in meta["tags"] and meta["size_categories"] == ["n<1K"]
    body = card.text
    for fact in ("| rows | 30 |", "| shards | 3 (arrow) |", "`tiny/codec`", "ab" * 32, "| vocabulary | 300 codes",
                 "| tokens per image | 16 |", "| `tokens` | DES-G, DES-R |", "`Smith42/legacysurvey`",
                 "astropt-token-store version 2", "astropt train --tokens hf://datasets/ORG/NAME"):
        assert fact in body, fact


def test_load_dataset_on_the_folder_yields_exactly_the_store_tokens(arrow_store, tmp_path):
    import datasets

    ds = datasets.load_dataset(str(arrow_store), split="train", cache_dir=str(tmp_path / "cache"))
    store = TokenStore(arrow_store)
    every = np.arange(store.num_rows)
    assert ds.num_rows == store.num_rows
    np.testing.assert_array_equal(np.array(ds["tokens"], dtype=np.int16), store.take(every))
    np.testing.assert_array_equal(np.array(ds["row"]), store.source_rows(every))
    assert list(ds["object_id"]) == store.object_ids(every)


def test_load_dataset_reads_every_column_of_a_store_of_several_image_columns(tmp_path):
    import datasets

    rng = np.random.default_rng(2)
    tokens = {"legacysurvey_image": rng.integers(0, 300, size=(12, 16)), "hsc_image": rng.integers(0, 300, (12, 16))}
    valid = {"legacysurvey_image": np.ones(12, bool), "hsc_image": np.arange(12) % 3 != 0}
    write_store_from_arrays(tmp_path / "s", tokens, 2, CODEC, {"legacysurvey_image": ["DES-G"], "hsc_image": ["HSC-G"]},
                            valid=valid)
    body = (tmp_path / "s" / CARD).read_text()
    assert "| `legacysurvey_image` | DES-G |" in body and "| `hsc_image` | HSC-G |" in body
    ds = datasets.load_dataset(str(tmp_path / "s"), split="train", cache_dir=str(tmp_path / "cache"))
    store = TokenStore(tmp_path / "s")
    for name in tokens:
        np.testing.assert_array_equal(np.array(ds[name], dtype=np.int16), store.take(np.arange(12), name))
    np.testing.assert_array_equal(np.array(ds["hsc_image_valid"]), valid["hsc_image"])


def test_a_zarr_store_card_says_datasets_cannot_read_it_and_load_dataset_refuses(tmp_path):
    import datasets

    folder = make_store(tmp_path / "z", storage="zarr")
    meta = read_card_metadata(folder)
    assert meta["configs"][0]["data_files"] == [{"split": "train", "path": NO_DATA_FILES}]
    assert "dataset_info" not in meta
    assert "`datasets.load_dataset` cannot read" in (folder / CARD).read_text()
    with pytest.raises(FileNotFoundError, match=NO_DATA_FILES):  # never the Zarr metadata read as JSON rows
        datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "cache"))


def test_the_card_is_a_store_file_and_stores_without_one_still_read(arrow_store, tmp_path, capsys):
    from astropt_tok.artifacts import check_claim, clear_own

    folder = tmp_path / "s"
    shutil.copytree(arrow_store, folder)
    assert check_claim(folder, "token-store", "`astropt tokenise`") == "token-store"  # README.md is its own
    assert verify_store(folder) == []
    code, out, _ = run_cli(["verify", str(folder)], capsys)
    assert code == 0 and out.startswith("OK ")
    (folder / CARD).unlink()  # a store made before cards
    np.testing.assert_array_equal(TokenStore(folder).take([0, 29]), TokenStore(arrow_store).take([0, 29]))
    assert verify_store(folder) == []
    (folder / CARD).write_text("# old card\n")
    (folder / "notes.txt").write_text("mine")
    removed = clear_own(folder, "token-store")  # --overwrite clears the card with the rest of the store
    assert CARD in removed and "manifest.json" in removed
    assert (folder / "notes.txt").read_text() == "mine"  # never a file no command made


# ---------------------------------------------------------------------------------------------------------
# hf:// addresses and the cache


@pytest.mark.parametrize("bad, why", [("hf://org/name", "not a token store on the hub"),
                                      ("hf://models/org/name", "dataset repos, not models"),
                                      (f"{URL}@", "empty revision"),
                                      ("hf://datasets/org/na me", "not a hub repo id"),
                                      ("hf://datasets/org", "not a token store on the hub")])
def test_malformed_hub_addresses_are_one_error(bad, why, capsys):
    with pytest.raises(AstroptError, match=why):
        parse_hub_store(bad)
    code, _, err = run_cli(["info", bad], capsys)
    assert code == 1 and why in one_error(err)


def test_hub_addresses_parse_also_after_pathlib():
    assert parse_hub_store(URL) == parse_hub_store(Path(URL))  # typer's Path options make hf:// hf:/
    assert str(parse_hub_store(f"{URL}@v1")) == f"{URL}@v1"
    assert parse_hub_store(f"{URL}@refs/pr/3").revision == "refs/pr/3"
    assert parse_hub_store("runs/store") is None


def test_hf_address_resolves_to_the_verified_cached_snapshot(arrow_store, tmp_path, capsys):
    snapshot = hub_cache(tmp_path / "cache", arrow_store)
    assert resolve_store(URL, cache_dir=tmp_path / "cache") == snapshot
    assert resolve_store(f"{URL}@{COMMIT}", cache_dir=tmp_path / "cache") == snapshot
    assert capsys.readouterr().err.count("verified 3 shards") == 1  # the second finds it verified already
    np.testing.assert_array_equal(TokenStore(snapshot).take(np.arange(30)), TokenStore(arrow_store).take(np.arange(30)))


def test_a_zarr_store_resolves_from_the_cache_too(tmp_path):
    folder = make_store(tmp_path / "z", storage="zarr")
    snapshot = hub_cache(tmp_path / "cache", folder)
    assert (snapshot / "shard-00000.zarr" / "zarr.json").is_symlink()
    assert resolve_store(URL, cache_dir=tmp_path / "cache") == snapshot
    np.testing.assert_array_equal(TokenStore(snapshot).take(np.arange(30)), TokenStore(folder).take(np.arange(30)))


def test_a_tokenised_store_card_names_its_codec_and_source(moved_source_store, tmp_path):
    import datasets

    store_dir, _ = moved_source_store
    store = TokenStore(store_dir)
    body = (store_dir / CARD).read_text()
    assert f"`{store.codec_id}`" in body and store.manifest["codec"]["weights_sha256"] in body
    assert f"| rows | {store.num_rows}" in body and ", ".join(store.bands) in body
    ds = datasets.load_dataset(str(store_dir), split="train", cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(np.array(ds["tokens"], dtype=store.dtype), store.take(np.arange(store.num_rows)))
    assert list(ds["object_id"]) == store.object_ids(np.arange(store.num_rows))


def test_commands_take_hf_addresses(arrow_store, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from astropt_train.config import build_config

    snapshot = hub_cache(tmp_path / "cache", arrow_store)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # as HF_HUB_CACHE would set it
    code, out, _ = run_cli(["verify", URL], capsys)
    assert code == 0 and f"OK {snapshot}" in out
    code, out, _ = run_cli(["info", URL], capsys)
    assert code == 0 and "rows" in out and "30" in out
    assert build_config({"tokens": URL}).tokens == URL  # the run keeps the address: the trainer fetches it
    with pytest.raises(AstroptError, match="is not a token store on the hub"):
        build_config({"tokens": "hf://models/org/galaxy-tokens"})


def test_train_reads_a_store_from_the_hub_cache(tmp_path, monkeypatch, capsys):
    import json

    from huggingface_hub import constants

    store = tmp_path / "store"
    write_store_from_arrays(store, np.random.default_rng(0).integers(0, 64, size=(24, 16)), 2,
                            {"id": "random", "vocab_size": 64, "tokens_per_image": 16}, ["DES-G"])
    snapshot = hub_cache(tmp_path / "cache", store)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    code, out, err = run_cli(["train", "--tokens", URL, "--out", str(tmp_path / "run"), "--n-layer", "1",
                              "--n-embd", "16", "--batch-size", "4", "--max-iters", "2", "--eval-iters", "1",
                              "--val-images", "0", "--device", "cpu", "--no-compile"], capsys)
    assert code == 0 and "done: step 2" in out, err
    run_config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run_config["store"]["dir"] == str(snapshot) and run_config["store"]["hub"] == URL
    # the settings replay from the hub address on any machine, not from this machine's cache
    assert f'tokens = "{URL}"' in (tmp_path / "run" / "train_config.toml").read_text()


def test_decode_reads_a_store_from_the_hub_cache(random_store, codec_dir, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    hub_cache(tmp_path / "cache", random_store)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    code, _, err = run_cli(["decode", "--tokens", URL, "--rows", "0:2", "--codec", str(codec_dir), "--save-flux",
                            str(tmp_path / "flux.npy"), "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "flux.npy").shape == (2, 4, 96, 96)


def test_a_damaged_cached_shard_is_refused(arrow_store, tmp_path, capsys):
    snapshot = hub_cache(tmp_path / "cache", arrow_store)
    damage(snapshot / "shard-00001.arrow")
    with pytest.raises(AstroptError, match=rf"{URL}: .*shard-00001.arrow: sha256 .* delete "):
        resolve_store(URL, cache_dir=tmp_path / "cache")


def test_a_snapshot_missing_a_shard_is_refused(arrow_store, tmp_path):
    snapshot = hub_cache(tmp_path / "cache", arrow_store)
    (snapshot / "shard-00000.arrow").unlink()  # an interrupted download, say
    with pytest.raises(AstroptError, match=rf"{URL}: .*shard-00000.arrow: missing"):
        resolve_store(URL, cache_dir=tmp_path / "cache")


def test_a_shard_damaged_after_it_was_verified_is_refused_too(arrow_store, tmp_path):
    snapshot = hub_cache(tmp_path / "cache", arrow_store)
    resolve_store(URL, cache_dir=tmp_path / "cache")
    shard = snapshot / "shard-00002.arrow"
    stat = shard.stat()
    damage(shard)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later write: its modification time moves
    with pytest.raises(AstroptError, match="shard-00002.arrow: sha256"):
        resolve_store(URL, cache_dir=tmp_path / "cache")


def test_offline_with_nothing_cached_is_one_error_naming_the_id(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for args in (["info", f"{URL}@v2"], ["train", "--tokens", f"{URL}@v2", "--out", str(tmp_path / "run")]):
        code, _, err = run_cli(args, capsys)
        line = one_error(err)
        assert code == 1 and f"{URL}@v2 is not in the Hugging Face cache" in line and "HF_HUB_OFFLINE" in line
    assert not (tmp_path / "run").exists()


def test_a_repo_that_is_not_a_token_store_is_one_error(tmp_path):
    snapshot = tmp_path / "cache" / "datasets--org--galaxy-tokens" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "data.csv").write_text("a\n1\n")
    (tmp_path / "cache" / "datasets--org--galaxy-tokens" / "refs").mkdir()
    (tmp_path / "cache" / "datasets--org--galaxy-tokens" / "refs" / "main").write_text(COMMIT)
    with pytest.raises(AstroptError, match=rf"{URL} \(snapshot .*\): .* is not a token store: no manifest.json"):
        resolve_store(URL, cache_dir=tmp_path / "cache")


RESOLVE = "import sys; from astropt_tok.store_hub import resolve_store; print(resolve_store(sys.argv[1]))"


@pytest.mark.slow
def test_two_ranks_of_a_node_resolving_at_once_fetch_and_verify_once(arrow_store, tmp_path):
    snapshot = hub_cache(tmp_path / "cache", arrow_store)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, "-c", RESOLVE, URL], env={**env, "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [out.strip() for out, _ in outs] == [str(snapshot)] * 2
    err = "".join(e for _, e in outs)
    assert err.count("using snapshot 0123456789ab") == 1 and err.count("verified 3 shards") == 1, err


# ---------------------------------------------------------------------------------------------------------
# astropt push: its refusals (the upload needs the hub)


def test_push_help_reads_in_an_80_column_pipe(capsys):
    code, out, _ = run_cli(["push", "--help"], capsys)
    assert code == 0 and "--repo" in out and "--private" in out and "--revision" in out
    assert max(len(line) for line in out.splitlines()) <= 80



def test_push_refuses_what_is_not_a_complete_store(arrow_store, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["push", str(tmp_path / "empty"), "--repo", REPO], capsys)
    assert code == 1 and f"cannot push {tmp_path / 'empty'} to {REPO}: " in one_error(err)
    assert "is not a token store" in err
    from astropt_tok.store import new_manifest, write_manifest

    (tmp_path / "half").mkdir()  # a store whose shards are not all written yet
    write_manifest(tmp_path / "half", new_manifest(CODEC, ["DES-G"], "arrow", 2, "fp32", {"id": "x"}))
    code, _, err = run_cli(["push", str(tmp_path / "half"), "--repo", REPO], capsys)
    assert code == 1 and "incomplete" in one_error(err) and REPO in err
    damaged = tmp_path / "damaged"
    shutil.copytree(arrow_store, damaged)
    damage(damaged / "shard-00000.arrow")
    code, _, err = run_cli(["push", str(damaged), "--repo", REPO], capsys)
    assert code == 1 and "shard-00000.arrow: sha256" in one_error(err) and REPO in err
    code, _, err = run_cli(["push", str(arrow_store), "--repo", "not a repo"], capsys)
    assert code == 1 and "not a hub repo id" in one_error(err)
    from astropt_tok.lock import folder_lock

    busy = tmp_path / "busy"
    shutil.copytree(arrow_store, busy)
    with folder_lock(busy, "`astropt tokenise`"):  # a tokenise --overwrite writing it meanwhile
        code, _, err = run_cli(["push", str(busy), "--repo", REPO], capsys)
    assert code == 1 and f"{busy} is in use by another" in one_error(err)


def test_push_offline_not_logged_in_or_unreachable_is_one_error_naming_the_repo(arrow_store, tmp_path,
                                                                                 monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(["push", str(arrow_store), "--repo", REPO], capsys)
    assert code == 1 and f"cannot push to {REPO}: HF_HUB_OFFLINE is set" in one_error(err)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    code, _, err = run_cli(["push", str(arrow_store), "--repo", REPO], capsys)
    assert code == 1 and f"cannot push to {REPO}: not logged in" in one_error(err)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    code, _, err = run_cli(["push", str(arrow_store), "--repo", REPO], capsys)
    assert code == 1 and f"cannot push to {REPO}: the hub is unreachable" in one_error(err)


def test_plan_reads_only_the_manifest_of_an_hf_store(arrow_store, tmp_path, monkeypatch, capsys):
    """`astropt plan --tokens hf://...` needs the store's vocabulary and tokens per image, not its shards: with
    only manifest.json cached it answers, with the same numbers as on the folder itself."""
    import json

    from huggingface_hub import constants

    snapshot = hub_cache(tmp_path / "cache", arrow_store)
    for shard in snapshot.glob("shard-*"):
        shard.unlink()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    args = ["plan", "--preset", "tiny", "--gpus", "2", "--gpu-memory", "16", "--json"]
    code, out, err = run_cli([*args, "--tokens", URL], capsys)
    assert code == 0, err
    code, local, err = run_cli([*args, "--tokens", str(arrow_store)], capsys)
    assert code == 0 and json.loads(out) == json.loads(local)
    code, _, err = run_cli([*args, "--tokens", "hf://datasets/org/not-cached"], capsys)
    assert code == 1 and "hf://datasets/org/not-cached is not in the Hugging Face cache" in one_error(err)
