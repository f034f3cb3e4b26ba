"""A token store on the Hugging Face hub: `astropt push` uploads one, `hf://datasets/ORG/NAME[@revision]` reads one.

Reading (`resolve_store`, called where each command takes its `--tokens` or store argument): the repo's snapshot
is downloaded once into the HF cache (`snapshot_download(repo_type="dataset")`, so HF_HUB_CACHE, HF_TOKEN and
HF_HUB_OFFLINE apply), checked against its manifest (every shard's sha256, as `astropt verify`), and its local
folder is returned, which the command memory-maps as any store folder.

One download per node: every process takes an exclusive lock in the cache (`<repo folder>/.astropt/resolve.lock`)
before it resolves a hub store. The first to take it downloads and verifies, and leaves a record of the snapshot
it resolved; the others (torchrun's or srun's other ranks on that node: there is no process group yet) wait on
the lock, then reuse that snapshot without asking the hub again, so every rank of a launch reads the same commit
even if the branch moves meanwhile. A record counts for the processes of one launch: those started within
LAUNCH_WINDOW_S of the process that wrote it; any other command asks the hub again. A verified snapshot is
re-hashed only when one of its files changed size or modification time since (`verified-<commit>.json`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from astropt_tok.errors import AstroptError, first_line

HF_SCHEME = "hf://"
FORM = "hf://datasets/ORG/NAME[@revision]"
LAUNCH_WINDOW_S = 60.0  # ranks of one launch start within this of each other (seconds); launches further apart
FULL_VERIFY_BYTES = 1 << 30  # push re-hashes every shard of a store up to this size (quick checks above it)
_IMPORTED_AT = time.time()
# what `astropt push` uploads of a store folder (the token-store kind's files, less its completion records and
# temporaries), and what it never does even inside those
PUSH_FILES = ["manifest.json", "README.md", "rejects.jsonl", ".astropt-artifact.json", "shard-*"]
PUSH_NEVER = [".astropt.lock", ".done/*", ".shard-*", "*.tmp-*", "*.old-*", ".cache/*"]


# ---------------------------------------------------------------------------------------------------------
# hf:// addresses


@dataclass(frozen=True)
class HubStore:
    """A token store in a Hugging Face dataset repo: `hf://datasets/{repo_id}[@{revision}]`."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{HF_SCHEME}datasets/{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def parse_hub_store(spec: str | os.PathLike) -> HubStore | None:
    """The hub store an `hf://` address names, None for a local path; a malformed address is one AstroptError."""
    text = str(spec)
    if not text.startswith("hf:"):
        return None
    shown = re.sub(r"^hf:/*", HF_SCHEME, text)  # as the user wrote it (pathlib.Path makes hf:// hf:/)
    found = re.fullmatch(r"hf:/{1,2}([^@]*)(@(.*))?", text)  # one slash: the address went through pathlib.Path
    parts = found.group(1).strip("/").split("/") if found else []
    if not found or len(parts) != 3 or parts[0] != "datasets" or not all(parts):
        kind = f" (token stores are dataset repos, not {parts[0]})" if parts and parts[0] in ("models", "spaces") \
            else ""
        raise AstroptError(f"{shown} is not a token store on the hub{kind}: write {FORM}")
    if found.group(2) is not None and not found.group(3):
        raise AstroptError(f"{shown}: empty revision after @; write {FORM} (a branch, tag or commit) or leave out @")
    repo_id = f"{parts[1]}/{parts[2]}"
    check_repo_id(repo_id, shown)
    return HubStore(repo_id, found.group(3))


def check_repo_id(repo_id: str, where: str) -> None:
    """Refuse a repo id the hub would (ORG/NAME of letters, digits, - _ .)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        if repo_id.count("/") != 1:
            raise HFValidationError("it is not ORG/NAME")
    except HFValidationError as exc:
        raise AstroptError(f"{where}: {repo_id!r} is not a hub repo id ({str(exc).splitlines()[0].rstrip('.')}); "
                           "write ORG/NAME") from None


# ---------------------------------------------------------------------------------------------------------
# reading: hf:// -> a verified local snapshot


def resolve_store(spec: str | os.PathLike, verify: bool = True, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder of a token store: `spec` itself, or for `hf://datasets/ORG/NAME[@revision]` its snapshot
    in the HF cache (`cache_dir`, default HF_HUB_CACHE), downloaded once per node and, with `verify`, checked
    against its manifest (every shard's sha256) before it is returned."""
    hub = parse_hub_store(spec)
    if hub is None:
        return Path(spec)
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    work = cache / repo_folder_name(repo_id=hub.repo_id, repo_type="dataset") / ".astropt"  # lock and records
    key = re.sub(r"[^A-Za-z0-9._-]", "_", hub.revision or "main") + "-" + \
        hashlib.sha256((hub.revision or "").encode()).hexdigest()[:8]
    record_path = work / f"resolved-{key}.json"
    with _exclusive_lock(work, f"another process is fetching {hub}; waiting for it"):
        record = _read_json(record_path)
        started = _process_start_time()
        fresh = not (isinstance(record, dict) and isinstance(record.get("process_started"), (int, float))
                     and abs(record["process_started"] - started) <= LAUNCH_WINDOW_S
                     and Path(record.get("snapshot", "")).is_dir())
        # fresh: this launch's first process here asks the hub; else another rank resolved it a moment ago
        snapshot = _download(hub, cache) if fresh else Path(record["snapshot"])
        if verify:
            _ensure_verified(hub, snapshot, work)
        if fresh:
            _write_quietly(record_path, {"store": str(hub), "snapshot": str(snapshot), "process_started": started})
    return snapshot


def read_store_manifest(spec: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> dict:
    """The manifest of a store folder, or of an `hf://` store with only its manifest.json fetched (no shards):
    what a command that needs the store's facts, not its tokens, reads (`astropt plan --tokens`)."""
    from astropt_tok.store import read_manifest

    hub = parse_hub_store(spec)
    if hub is None:
        return read_manifest(spec)
    from huggingface_hub import constants

    from astropt_tok.store import MANIFEST

    snapshot = _download(hub, Path(cache_dir or constants.HF_HUB_CACHE).expanduser(), files=[MANIFEST])
    if not (snapshot / MANIFEST).is_file():
        raise AstroptError(f"{hub} holds no {MANIFEST}: it is not a token store (push one with `astropt push`)")
    return read_manifest(snapshot)


def _download(hub: HubStore, cache: Path, files: list[str] | None = None) -> Path:
    """snapshot_download of the repo (or only `files` of it) into `cache` (only the cache offline or when the
    hub is unreachable)."""
    from huggingface_hub import snapshot_download

    from astropt_tok.hub import hub_offline, hub_unreachable_reason

    unreachable = None if hub_offline() else hub_unreachable_reason()
    cache_only = hub_offline() or unreachable is not None
    if not cache_only:
        print(f"{hub}: fetching its snapshot into the Hugging Face cache ({cache})", file=sys.stderr, flush=True)
    try:
        snapshot = Path(snapshot_download(hub.repo_id, repo_type="dataset", revision=hub.revision, cache_dir=cache,
                                          local_files_only=cache_only, allow_patterns=files))
        if cache_only:
            why = "HF_HUB_OFFLINE is set" if hub_offline() else f"the hub is unreachable: {unreachable}"
            print(f"{hub}: using snapshot {snapshot.name[:12]} from the Hugging Face cache ({why})", file=sys.stderr,
                  flush=True)
        return snapshot
    except Exception as exc:  # the hub's errors, and the HTTP client's under them: one line naming the store
        if cache_only:
            why = "HF_HUB_OFFLINE is set" if hub_offline() else f"the hub is unreachable ({unreachable})"
            raise AstroptError(f"{hub} is not in the Hugging Face cache ({cache}) and {why}: run once where the hub "
                               "can be reached (HF_HUB_OFFLINE unset) to download it") from None
        name = type(exc).__name__
        reason = (str(exc).strip().splitlines() or [name])[0][:300]
        hint = {"RepositoryNotFoundError": "no such dataset repo, or it is private: check the name, or log in "
                                           "(`hf auth login` or HF_TOKEN)",
                "RevisionNotFoundError": "no such branch, tag or commit in it",
                "GatedRepoError": "it is gated: ask for access on its page, then log in"}.get(name)
        raise AstroptError(f"cannot download {hub}: {hint or reason}") from None


def _ensure_verified(hub: HubStore, snapshot: Path, work: Path) -> None:
    """Check a snapshot against its manifest (every shard's sha256, as `astropt verify`), unless it passed
    before and none of its files changed since; a damaged or incomplete snapshot is one AstroptError."""
    from astropt_tok.store import MANIFEST, read_manifest, verify_store

    marker = work / f"verified-{snapshot.name}.json"
    try:
        manifest = read_manifest(snapshot)
    except AstroptError as exc:
        raise AstroptError(f"{hub} (snapshot {snapshot}): {exc}") from None
    files = [MANIFEST] + [s["file"] for s in manifest.get("shards") or []]
    stats = _file_stats(snapshot, files)
    if stats is not None and _read_json(marker) == stats:
        return  # verified before, and not one of its files changed since
    problems = verify_store(snapshot)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AstroptError(f"{hub}: the downloaded snapshot does not match its manifest: {problems[0]}{more}; "
                           f"delete {snapshot.parent.parent} to download it anew")
    print(f"{hub}: verified {len(manifest['shards'])} shards of snapshot {snapshot.name[:12]} against its manifest",
          file=sys.stderr, flush=True)
    _write_quietly(marker, stats)


def _write_quietly(path: Path, obj) -> None:
    """Write a record in the cache; a read-only cache (a shared mirror) keeps none: each process checks anew."""
    from astropt_tok.atomic import atomic_write_json

    with contextlib.suppress(AstroptError):
        atomic_write_json(path, obj)


def _file_stats(folder: Path, names: list[str]) -> dict | None:
    """{relative path: [size, mtime_ns]} of the named files (a folder: each file in it), through symlinks;
    None when one is missing."""
    out = {}
    for name in names:
        path = folder / name
        if not path.exists():
            return None
        for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            st = f.stat()
            out[f.relative_to(folder).as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


@contextlib.contextmanager
def _exclusive_lock(folder: Path, waiting: str):
    """Hold an exclusive flock on FOLDER/resolve.lock for the block, saying once on stderr when another process
    holds it. A cache where it cannot be made (a read-only mirror) or a file system without locks: no lock, each
    process resolves on its own (the HF cache's own locks still keep its files whole)."""
    import fcntl

    try:
        folder.mkdir(parents=True, exist_ok=True)
        fh = open(folder / "resolve.lock", "a+b", buffering=0)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        fh.close()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _process_start_time() -> float:
    """When this process started (seconds since the epoch): Linux's /proc, else when this module was imported."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in clock ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT


# ---------------------------------------------------------------------------------------------------------
# pushing


@dataclass
class PushConfig:
    """`astropt push DIR --repo ORG/NAME [--private] [--revision BRANCH]`."""

    store: Path
    repo: str
    private: bool = False
    revision: str | None = None


@dataclass
class PushResult:
    url: str
    files: int
    bytes: int
    verified: bool  # every shard re-hashed (a small store), else the quick checks only


def push_store(cfg: PushConfig) -> PushResult:
    """Check that cfg.store is a complete, sound token store, then upload it to the dataset repo cfg.repo
    (created if missing; resumable: run again after an interruption)."""
    store_dir, repo = Path(cfg.store), cfg.repo
    check_repo_id(repo, f"--repo {repo}")
    if cfg.revision is not None and not cfg.revision.strip():
        raise AstroptError(f"--revision is empty: name the branch of {repo} to push to (default main)")
    with contextlib.ExitStack() as held:
        if store_dir.is_dir() and os.access(store_dir, os.W_OK):  # a tokenise --overwrite meanwhile would mix files
            from astropt_tok.lock import folder_lock

            held.enter_context(folder_lock(store_dir, "command writing or pushing this store"))
        return _push_locked(cfg, store_dir, repo)


def _push_locked(cfg: PushConfig, store_dir: Path, repo: str) -> PushResult:
    try:
        manifest, verified = _check_pushable(store_dir)
    except AstroptError as exc:
        raise AstroptError(f"cannot push {store_dir} to {repo}: {exc}") from None
    _check_hub_access(repo)
    from huggingface_hub import HfApi, constants

    from astropt_tok.store_card import CARD, write_store_card

    if not (store_dir / CARD).is_symlink():  # a store folder of ours (not a HF cache snapshot): card names the repo
        write_store_card(store_dir, manifest, repo)
    files = _push_files(store_dir)
    api = HfApi()
    try:
        api.create_repo(repo, repo_type="dataset", private=cfg.private, exist_ok=True)
        if cfg.revision and cfg.revision != "main":
            api.create_branch(repo, branch=cfg.revision, repo_type="dataset", exist_ok=True)
        if hasattr(api, "upload_large_folder"):  # huggingface_hub < 2: the resumable, many-commit uploader
            api.upload_large_folder(repo_id=repo, folder_path=store_dir, repo_type="dataset",
                                    revision=cfg.revision, private=cfg.private,
                                    allow_patterns=PUSH_FILES, ignore_patterns=PUSH_NEVER)
        else:  # huggingface_hub 2: upload_folder itself uploads large folders in resumable batches (hf_xet)
            api.upload_folder(repo_id=repo, folder_path=store_dir, repo_type="dataset", revision=cfg.revision,
                              allow_patterns=PUSH_FILES, ignore_patterns=PUSH_NEVER,
                              commit_message=f"astropt push: token store of {manifest['totals']['rows']} rows")
    except Exception as exc:  # the hub's errors and the HTTP client's under them: one line naming the repo
        reason = first_line(exc, 300)
        raise AstroptError(f"pushing {store_dir} to {repo} failed ({type(exc).__name__}: {reason}); run the same "
                           "command again to resume") from None
    return PushResult(f"{constants.ENDPOINT}/datasets/{repo}", len(files),
                      sum((store_dir / f).stat().st_size for f in files), verified)


def _check_pushable(store_dir: Path) -> tuple[dict, bool]:
    """The manifest of a complete store whose shards are those it describes (sizes, columns, rows, token
    ranges; every sha256 too when the store is small); returns (manifest, whether every shard was re-hashed)."""
    from astropt_tok.store import TokenStore, verify_store

    store = TokenStore(store_dir)  # a store at all, complete, every shard present at its recorded size
    store.check_shards()
    store.check_token_range()
    if sum(s["bytes"] for s in store.shards) > FULL_VERIFY_BYTES:
        return store.manifest, False
    problems = verify_store(store_dir)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AstroptError(f"{problems[0]}{more}: `astropt verify {store_dir}` lists what is wrong")
    return store.manifest, True


def _check_hub_access(repo: str) -> None:
    """Offline, not logged in or the hub unreachable: one AstroptError naming the repo, before any upload."""
    from huggingface_hub import get_token

    from astropt_tok.hub import hub_offline, hub_unreachable_reason

    if hub_offline():
        raise AstroptError(f"cannot push to {repo}: HF_HUB_OFFLINE is set; unset it where the hub can be reached")
    if not get_token():
        raise AstroptError(f"cannot push to {repo}: not logged in to the Hugging Face hub; run `hf auth login` "
                           "or set HF_TOKEN to a token that may write there")
    reason = hub_unreachable_reason()
    if reason is not None:
        raise AstroptError(f"cannot push to {repo}: the hub is unreachable ({reason}); push again from a machine "
                           "that reaches it")


def _push_files(store_dir: Path) -> list[str]:
    """The files `push_store` uploads, relative to the store folder (what PUSH_FILES and PUSH_NEVER select)."""
    import fnmatch

    names = [p.relative_to(store_dir).as_posix() for p in sorted(store_dir.rglob("*")) if p.is_file()]
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in PUSH_FILES)
            and not any(fnmatch.fnmatch(n, p) for p in PUSH_NEVER)]
