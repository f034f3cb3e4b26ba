"""Artifacts: what kind of thing each folder the tool writes is, what made it, and who may clear it.

Every folder a command writes is an *artifact* of one kind (`KINDS`: a token store, a training run and each
of its checkpoints, an embeddings store, a fitted codec, an export, a demo work folder, a probe report, an
evaluation report). Its lineage record, `DIR/.astropt-artifact.json`, says

    {"format": "astropt-artifact", "format_version": 1, "kind", "command", "tool_version", "created",
     "lineage": {...}}

where `lineage` holds the identities of what the artifact was made from, as far as the kind has them:
`codec` {id, weights_sha256, vocab_size}, `store` {dir, manifest_sha256}, `modalities` {name: bands},
`id_column`, `checkpoint` {path, weights_sha256}. The kind's own files (a store's manifest, a run's
config.json) hold the full details; the record is what any command reads to tell kinds apart.

Three rules live here and in no command:

1. **What a folder holds** (`identify`): its record, or, for folders written before records existed, its own
   files (a token store's manifest, a run's checkpoints, a codec's `codecs/image/config.json`, ...).
2. **Ownership** (`claim_output`, `clear_own`): a command writes into a folder only when it is new, empty, or
   holds the command's own kind of artifact; `--overwrite`/`--fresh` clear only the files that kind writes
   (`Kind.owns`), never another kind's folder, never a file no command of the tool created.
3. **Lineage checks** (`check_model_store`, `check_store_codec`, `check_embeddings_sources`): before two
   artifacts are combined, what they were made from agrees; a mismatch is one AstroptError naming both sides.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from astropt_tok.errors import AstroptError, ensure_folder, remove_quietly, writing

RECORD = ".astropt-artifact.json"
RECORD_FORMAT = "astropt-artifact"
RECORD_VERSION = 1
LOCK_FILE = ".astropt.lock"  # astropt_tok.lock's file: shared by every kind, never cleared
# names no command ever clears or counts as content: the lock, the record, and temporaries of atomic writes
_ALWAYS_IGNORED = (LOCK_FILE, ".*.tmp-*", ".*.old-*")


@dataclass(frozen=True)
class Kind:
    """One kind of artifact: its name, how a message calls it, which command makes it, and the files it owns."""

    name: str
    noun: str  # "a token store"
    made_by: str  # "`astropt tokenise`"
    owns: tuple[str, ...]  # glob patterns (top-level names) of what its commands write: what a replace may clear
    folder: str = "output"  # how messages call its folder: "the store folder"


KINDS: dict[str, Kind] = {k.name: k for k in (
    # a token store's README.md is its dataset card; .cache holds `astropt push`'s upload_large_folder records
    Kind("token-store", "a token store", "`astropt tokenise`",
         ("manifest.json", "shard-*", ".shard-*", "rejects.jsonl", ".done", "README.md", ".cache", RECORD), "store"),
    Kind("embeddings", "an embeddings store", "`astropt embed`",
         ("manifest.json", "shard-*", ".shard-*", ".done", RECORD), "embeddings"),
    Kind("run", "a training run", "`astropt train`",
         ("config.json", "train_config.toml", "metrics.jsonl", "metrics.csv", "loss_curve.png", "val_images",
          "checkpoints", "rows-rank*.txt", "tensorboard", "wandb", RECORD), "run"),
    Kind("checkpoint", "a training checkpoint", "`astropt train`",  # RUN/checkpoints/step-N: the run's to prune
         ("model.safetensors", "config.json", "trainer_state.pt", "sharded", RECORD), "checkpoint"),
    Kind("codec", "a fitted codec", "`astropt fit-codec`",
         ("codecs", "fit_report.json", "fit-state.pt", "MODEL.md", RECORD), "codec"),
    Kind("export", "an upstream AstroPT export", "`astropt export`", ("ckpt.pt", RECORD), "export"),
    Kind("demo", "a demo work folder", "`astropt demo`",
         ("survey", "codec", "tokens", "run", "pictures", "eval", "embeddings", "probe", "demo_summary.json",
          "demo-summary.json", RECORD), "demo"),
    Kind("probe-report", "a probe report", "`astropt probe`",
         ("report.json", "*.png", "random-init-embeddings", RECORD), "probe output"),
    Kind("eval-report", "an evaluation report", "`astropt eval`", ("eval.json", "eval.png", RECORD), "eval output"),
)}


# ---------------------------------------------------------------------------------------------------------
# the record


def read_record(folder: str | os.PathLike) -> dict | None:
    """DIR/.astropt-artifact.json as a dict, or None when there is none. A record that is there but damaged
    is one AstroptError naming it (a command must not guess what a folder is)."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AstroptError(f"{path} is damaged ({type(exc).__name__}): delete it if {folder} is yours, and re-run "
                           "the command that made the folder") from None
    if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT or rec.get("kind") not in KINDS \
            or not isinstance(rec.get("lineage", {}), dict):
        raise AstroptError(f"{path} is damaged: not an {RECORD_FORMAT} record of a known kind "
                           f"({', '.join(KINDS)}); delete it if {folder} is yours, and re-run the command that made it")
    return rec


def write_record(folder: str | os.PathLike, kind_name: str, command: str, lineage: dict | None = None) -> dict:
    """Write (or rewrite, keeping its creation time) DIR/.astropt-artifact.json for an artifact of `kind_name`."""
    from astropt_tok import __version__
    from astropt_tok.atomic import atomic_write_json

    if kind_name not in KINDS:
        raise ValueError(f"unknown artifact kind {kind_name!r}")
    old = None
    try:
        old = read_record(folder)
    except AstroptError:
        pass
    rec = {"format": RECORD_FORMAT, "format_version": RECORD_VERSION, "kind": kind_name, "command": command,
           "tool_version": __version__,
           "created": (old or {}).get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "lineage": _jsonable(lineage or {})}
    atomic_write_json(Path(folder) / RECORD, rec)
    return rec


def update_lineage(folder: str | os.PathLike, **fields) -> None:
    """Add or replace lineage fields of an existing record (e.g. the weights sha256 once they are written)."""
    rec = read_record(folder)
    if rec is None:
        return
    write_record(folder, rec["kind"], rec["command"], {**rec.get("lineage", {}), **fields})


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ---------------------------------------------------------------------------------------------------------
# what a folder holds


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _ignored(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in _ALWAYS_IGNORED)


def contents(folder: str | os.PathLike) -> list[str]:
    """Top-level names in `folder` that count as content (not the lock, the record or atomic temporaries)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not _ignored(p.name) and p.name != RECORD)


def identify(folder: str | os.PathLike) -> str | None:
    """The kind of artifact `folder` holds: its record's, or for a folder made before records existed, what its
    own files say; None for a missing or empty folder, or one holding nothing the tool makes."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    rec = read_record(folder)
    if rec is not None:
        return rec["kind"]
    return _identify_by_files(folder)


def _identify_by_files(folder: Path) -> str | None:
    manifest = _json(folder / "manifest.json")
    if isinstance(manifest, dict):
        fmt = manifest.get("format")
        if fmt == "astropt-token-store":
            return "token-store"
        if fmt == "astropt-embeddings":
            return "embeddings"
    config = _json(folder / "config.json")
    if (folder / "model.safetensors").is_file() and isinstance(config, dict) and \
            config.get("format") == "astropt-train-checkpoint":
        return "checkpoint"  # one checkpoint folder of a run (its config.json holds "train" and "model" too)
    if (folder / "checkpoints").is_dir() or (folder / "metrics.jsonl").is_file() or \
            (isinstance(config, dict) and "train" in config and "model" in config):
        return "run"
    if (folder / "codecs").is_dir() or (folder / "fit-state.pt").is_file() or (folder / "fit_report.json").is_file():
        return "codec"
    if (folder / "demo_summary.json").is_file() or (folder / "demo-summary.json").is_file() or \
            ((folder / "survey" / "demo-survey.json").is_file()):
        return "demo"
    if (folder / "ckpt.pt").is_file():
        return "export"
    report = _json(folder / "report.json")
    if isinstance(report, dict) and ("targets" in report or "embeddings" in report):
        return "probe-report"
    return None


def describe(folder: str | os.PathLike) -> str:
    """How a message names what `folder` holds: 'a token store (made by `astropt tokenise`)', or its files."""
    found = identify(folder)
    if found is not None:
        k = KINDS[found]
        return f"{k.noun} (made by {k.made_by})"
    names = contents(folder)
    return f"files no astropt command wrote ({_shown(names)})" if names else "nothing"


def lineage_lines(folder: str | os.PathLike) -> list[str]:
    """What `astropt info` prints for an artifact of any kind: its kind, the command and version that made it,
    and its lineage record, one `key: value` line each (a folder made before records: its kind alone)."""
    found = identify(folder)
    if found is None:
        raise AstroptError(f"{folder} holds {describe(folder)}: not an artifact of astropt (a token store, run, "
                           f"checkpoint, embeddings store, codec, export, demo folder or probe report)")
    lines = [f"{folder}: {describe(folder)}"]
    rec = read_record(folder)
    if rec is None:
        return lines + ["lineage: not recorded (made before lineage records, or not by astropt: a hub snapshot, say)"]
    lines += [f"made by: {rec.get('command')} (astropt-tokens {rec.get('tool_version')}, {rec.get('created')})"]

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        else:
            lines.append(f"{prefix}: {json.dumps(value) if not isinstance(value, str) else value}")

    walk("", rec.get("lineage") or {})
    return lines + (model_modality_lines(folder) if rec.get("kind") in ("run", "checkpoint") else [])


def model_modality_lines(folder: str | os.PathLike) -> list[str]:
    """A run's or checkpoint's modalities in the model's block order, each with the bands it learned, from its
    config.json ("model.modalities", "store.modalities"); no lines when it has none (yet) or is unreadable."""
    config = _json(Path(folder) / "config.json")
    if not isinstance(config, dict) or not isinstance(config.get("store"), dict):
        return []
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    learned = _learned_bands(config["store"].get("modalities"))
    names = model.get("modalities")
    if isinstance(names, list) and names:
        return [f"modality {m}: bands {','.join(learned.get(m) or ['not recorded'])}" for m in names]
    bands = config["store"].get("bands") or next(iter(learned.values()), None)  # one modality: the first column
    bands = bands if isinstance(bands, list) and all(isinstance(b, str) for b in bands) else None
    first = next(iter(learned), None)
    return [f"modality images_aion: bands {','.join(bands) if bands else 'not recorded'}"
            + (f" (the store's column {first})" if first else "")]


# ---------------------------------------------------------------------------------------------------------
# ownership


def _folder_words(k: Kind) -> str:
    """'the store folder', 'the demo folder': how an error names the folder."""
    return f"the {k.folder} folder"


def _foreign(folder: Path, may_hold: tuple[str, ...]) -> list[str]:
    return [n for n in contents(folder) if not any(fnmatch.fnmatch(n, p) for p in may_hold)]


def _shown(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_claim(folder: str | os.PathLike, kind_name: str, command: str, flag: str = "--out",
                may_hold: tuple[str, ...] = ()) -> str | None:
    """Refuse, without writing anything, a `folder` that `claim_output` would refuse; returns what it holds
    (`kind_name`, or None for a missing or empty folder, or one holding nothing but another kind's record)."""
    k = KINDS[kind_name]
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise AstroptError(f"{_folder_words(k)} {folder} exists as a file, not a folder")
    found = identify(folder)
    if found == kind_name:
        return found
    if found is not None and (contents(folder) or read_record(folder) is None):
        other = KINDS[found]
        raise AstroptError(
            f"{flag} {folder} holds {other.noun} (made by {other.made_by}); {command} writes {k.noun} and never "
            f"replaces another kind of folder, even with --overwrite: choose another {flag}")
    foreign = _foreign(folder, may_hold) if folder.is_dir() else []
    if foreign:
        raise AstroptError(
            f"{flag} {folder} is not empty and holds no {k.noun.split(' ', 1)[1]} ({_shown(foreign)}); {command} "
            f"writes only into a new or empty folder, or one it made: choose another {flag}")
    return None


def claim_output(folder: str | os.PathLike, kind_name: str, command: str, flag: str = "--out",
                 lineage: dict | None = None, may_hold: tuple[str, ...] = ()) -> bool:
    """Make `folder` this command's output folder, before anything is written into it.

    A missing or empty folder is created and gets a record of `kind_name` (returns False: nothing was there);
    so does a folder holding nothing but another kind's record (a command that claimed it and then failed
    before writing anything: there is nothing to lose). A folder that holds an artifact of `kind_name` is this
    command's to reuse or, with its replace flag, to clear with `clear_own` (returns True, or False when its
    record is all it holds; its record, and the command that first made it, are kept). Anything else, another kind of artifact or files no command made,
    is one AstroptError naming the folder and what it holds: `--overwrite` never changes that. `may_hold`
    names files (patterns) the caller knows are there on purpose (e.g. a source under the demo folder)."""
    k = KINDS[kind_name]
    folder = Path(folder)
    found = check_claim(folder, kind_name, command, flag, may_hold)
    ensure_folder(folder, _folder_words(k))
    if found == kind_name:
        if read_record(folder) is None:  # made before records existed: record it now, lineage unknown (the
            write_record(folder, kind_name, command, {})  # caller records what it checks or makes there)
        return bool(contents(folder))  # a record alone (a claim whose command then failed) holds nothing yet
    remove_quietly(folder / RECORD)  # another kind's record alone (see above): this is a new artifact
    write_record(folder, kind_name, command, lineage)
    return False


@contextlib.contextmanager
def output_folder(folder: str | os.PathLike, kind_name: str, command: str, flag: str = "--out",
                  lineage: dict | None = None, may_hold: tuple[str, ...] = (), shared: bool = False):
    """Claim `folder` (`claim_output`) and hold its lock (astropt_tok.lock) for the block; yields whether it
    already held an artifact of `kind_name`. A folder that cannot be claimed is refused before anything is
    written into it, not even the lock file; the claim itself is made under the lock, so two commands cannot
    both claim one new folder. `shared`: the processes of one job (torchrun ranks, array tasks) share it."""
    from astropt_tok.lock import folder_lock

    check_claim(folder, kind_name, command, flag, may_hold)
    ensure_folder(folder, _folder_words(KINDS[kind_name]))
    with folder_lock(folder, command, shared=shared):
        had_record = read_record(folder) is not None
        existed = claim_output(folder, kind_name, command, flag, lineage, may_hold)
        try:
            yield existed
        except BaseException:
            if not shared:  # under an exclusive lock no other process is at work here (a job's others may be)
                if existed and not had_record:  # a folder made before records (or by hand: a hub snapshot)
                    remove_quietly(Path(folder) / RECORD)  # that the command refused: leave it as it was
                release_if_unused(folder)
            raise


def release_if_unused(folder: str | os.PathLike, remove_folder: bool = False) -> None:
    """After a failed command: a folder it claimed but wrote nothing into loses its record (and with
    `remove_folder`, the folder itself, lock and all), so the failure leaves nothing behind. Call it only while
    holding the folder's lock, or its parent's."""
    folder = Path(folder)
    if not folder.is_dir() or contents(folder):
        return
    remove_quietly(folder / RECORD)
    if remove_folder:
        remove_quietly(folder / LOCK_FILE)
        try:
            folder.rmdir()
        except OSError:
            pass  # something else appeared: leave it


def claim_part(folder: str | os.PathLike, kind_name: str, command: str, flag: str,
               legacy: bool = False, lineage: dict | None = None) -> bool:
    """Claim an artifact that `command` makes inside its own output folder (the demo's tokens, run, embeddings
    and probe; the probe's random-init embeddings), recording `command` as its maker. Returns True when it
    holds one this command made (the caller may replace it), False when it was missing or empty. One made by
    another command (a user's own store at W/tokens), another kind, or files no command made are one error:
    a command replaces only what it made. `legacy`: a folder of the kind without a record counts as this
    command's (its parent was made by this command before records existed)."""
    folder = Path(folder)
    k = KINDS[kind_name]
    rec = read_record(folder) if folder.is_dir() else None
    if rec is not None and rec["kind"] == kind_name and rec.get("command") == command:
        return True
    found = identify(folder)
    if rec is None and found == kind_name and legacy:
        write_record(folder, kind_name, command, lineage)
        return True
    if found is not None or contents(folder):
        if rec is not None and not contents(folder):  # another command's record alone: nothing to lose
            remove_quietly(folder / RECORD)
        else:
            what = (f"{KINDS[rec['kind']].noun} made by {rec.get('command')}" if rec is not None else describe(folder))
            raise AstroptError(f"{folder} holds {what}, not {k.noun} made by {command}: {command} replaces only "
                               f"what it made itself; move it away, or choose another {flag}")
    ensure_folder(folder, _folder_words(k))
    write_record(folder, kind_name, command, lineage)
    return False


def check_file_output(path: str | os.PathLike, flag: str, inside: str | os.PathLike | None = None) -> Path:
    """Refuse a file output (a picture, a flux array) that is an existing folder, or that lies inside an artifact
    folder (it would write among, or over, that artifact's own files: `--save-flux RUN/config.json`). `inside`:
    a folder the caller owns and may write into (the demo's pictures under its work folder). Returns the path."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise AstroptError(f"{flag} {path} is a folder: give a file name")
    name, parent = p.name, p.resolve().parent
    mine = Path(inside).expanduser().resolve() if inside is not None else None
    if name in (RECORD, LOCK_FILE):
        raise AstroptError(f"{flag} {path}: that name is the tool's own record of a folder; choose another name")
    for folder in (parent, *parent.parents):
        if folder == mine:
            break
        rec = read_record(folder)
        found = rec["kind"] if rec is not None else None
        if found is None and folder == parent:  # a folder made before records existed: only its own files
            legacy = _identify_by_files(folder)
            if legacy is not None and any(fnmatch.fnmatch(name, pat) for pat in KINDS[legacy].owns):
                found = legacy
        if found is not None:
            k = KINDS[found]
            raise AstroptError(f"{flag} {path} lies inside {folder}, which holds {k.noun} (made by {k.made_by}): "
                               f"a file written there could replace or hide its own files; write it outside")
    return p


def clear_own(folder: str | os.PathLike, kind_name: str, keep: tuple[str, ...] = ()) -> list[str]:
    """Delete what an artifact of `kind_name` wrote in `folder` (its `owns` patterns, minus `keep`), leaving the
    lock, the record and anything else; returns the names removed. Refuses a folder of another kind."""
    folder = Path(folder)
    found = identify(folder)
    if found not in (None, kind_name):
        raise AstroptError(f"{folder} holds {KINDS[found].noun}, not {KINDS[kind_name].noun}: not cleared")
    removed = []
    with writing(folder):
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            if p.name in (RECORD, LOCK_FILE) or any(fnmatch.fnmatch(p.name, pat) for pat in keep):
                continue
            if any(fnmatch.fnmatch(p.name, pat) for pat in KINDS[kind_name].owns):
                if p.is_dir() and not p.is_symlink():
                    import shutil

                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p.name)
    return removed


def check_not_inside(path: str | os.PathLike, folder: str | os.PathLike, what: str, flag: str) -> None:
    """Refuse a `folder` that a command would clear while `path` (an input: a source, a codec) lies inside it."""
    p, f = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    if p == f or f in p.parents:
        raise AstroptError(f"{what} {path} lies inside {flag} {folder}, which this command may clear: move it out, "
                           f"or choose another {flag}")


# ---------------------------------------------------------------------------------------------------------
# lineage: what each artifact was made from, and the checks before two are combined


def short(digest: str | None) -> str:
    """A sha256 as messages show it: its first 12 hex digits."""
    return (digest or "unknown")[:12]


def store_lineage(manifest: dict) -> dict:
    """The lineage a token store's manifest gives: codec {id, weights_sha256, vocab_size}, modalities
    {name: bands} (a one-column store: {column: bands}), id_column."""
    source = manifest.get("source") or {}
    mods = {m["name"]: list(m["bands"]) for m in manifest.get("modalities") or []}
    if not mods:
        mods = {source.get("column") or "tokens": list(manifest.get("bands") or [])}
    codec = manifest.get("codec") or {}
    lineage = {"codec": {"id": codec.get("id"), "weights_sha256": codec.get("weights_sha256"),
                         "vocab_size": manifest.get("vocab_size")},
               "modalities": mods, "id_column": source.get("id_column")}
    catalogue = catalogue_codecs(manifest)
    if catalogue:
        lineage["catalogue_codecs"] = catalogue
    return lineage


def catalogue_codecs(manifest: dict) -> dict:
    """{column: {aion_modality, kind, weights_sha256, vocab_size}} of a store's scalar and spectrum columns
    (format version 4; empty otherwise): the codec each column's tokens mean values of."""
    return {m["name"]: {"aion_modality": m.get("aion_modality"), "kind": m.get("kind"),
                        "weights_sha256": (m.get("codec") or {}).get("weights_sha256"), "vocab_size": m.get("vocab_size")}
            for m in manifest.get("modalities") or [] if m.get("kind") not in (None, "image")}


def model_store_info(store, manifest_sha: str) -> dict:
    """What a training run records of the store it trains on (RUN/config.json "store"): enough for every later
    command to check that a store it is given holds tokens of the same codec, modalities and bands."""
    lin = store_lineage(store.manifest)
    return {"dir": str(Path(store.dir).resolve()), "manifest_sha256": manifest_sha, "codec_id": store.codec_id,
            "codec_sha256": lin["codec"]["weights_sha256"], "bands": list(store.bands),
            "modalities": lin["modalities"], "id_column": lin["id_column"],
            **({"catalogue_codecs": lin["catalogue_codecs"]} if "catalogue_codecs" in lin else {})}


def check_model_store(model_name: str, trained_on: dict | None, model_modalities: list[str] | None, store,
                      manifest_sha: str | None = None) -> list[str]:
    """Refuse to combine a model with a token store whose tokens it was not trained on; returns notes to print.

    `trained_on` is the checkpoint's recorded store ("store" of its config.json; None for an upstream AstroPT
    checkpoint, which records nothing to check). The codec's weights must agree (by sha256; by id for runs that
    recorded no sha), and each modality the model reads must be in the store with the bands it was trained on.
    """
    notes: list[str] = []
    if not trained_on:
        return [f"note: {model_name} records no token store or codec (an upstream AstroPT checkpoint?): "
                f"cannot check that store {store.dir} holds tokens of the codec it was trained on"]
    lin = store_lineage(store.manifest)
    same_store = manifest_sha is not None and trained_on.get("manifest_sha256") == manifest_sha
    want_sha, have_sha = trained_on.get("codec_sha256"), lin["codec"]["weights_sha256"]
    if want_sha and have_sha:
        if want_sha != have_sha:
            raise AstroptError(
                f"{model_name} was trained on tokens of codec {trained_on.get('codec_id')} (weights sha256 "
                f"{short(want_sha)}), but store {store.dir} was made with codec {lin['codec']['id']} (weights sha256 "
                f"{short(have_sha)}): the same token ids mean different images; use a store made with the model's "
                f"codec, or train on this one")
    elif not same_store and trained_on.get("codec_id") and trained_on.get("codec_id") != lin["codec"]["id"]:
        raise AstroptError(
            f"{model_name} was trained on tokens of codec {trained_on.get('codec_id')}, but store {store.dir} was "
            f"made with codec {lin['codec']['id']}: use a store made with the model's codec")
    elif not same_store and not want_sha:
        notes.append(f"note: {model_name} records no codec weights sha256 (an older run): the codec is checked by "
                     f"its id only")
    # which bands did the model learn for each modality it reads? (runs before lineage records kept a list of
    # {"name", "bands"} of the modalities trained on; dict() of that list would pair up its keys, silently)
    learned = _learned_bands(trained_on.get("modalities"))
    names = list(model_modalities or [])
    if not names:  # a one-modality model (images_aion): it reads the store's first (or only) column
        first = next(iter(lin["modalities"]))
        want = trained_on.get("bands") or (next(iter(learned.values())) if learned else None)
        have = lin["modalities"][first]
        if want is not None and list(want) != list(have):
            raise AstroptError(
                f"{model_name} was trained on images in bands {','.join(want)}, but store {store.dir} holds "
                f"{first} in bands {','.join(have)}: a model of one survey cannot read another's tokens")
        return notes
    for name in names:
        if name not in lin["modalities"]:
            raise AstroptError(f"{model_name} models {name}, which store {store.dir} does not hold (it has "
                               f"{', '.join(lin['modalities'])})")
        _check_catalogue_codec(model_name, name, (trained_on.get("catalogue_codecs") or {}).get(name),
                               (lin.get("catalogue_codecs") or {}).get(name), store.dir)
        want = learned.get(name)
        have = lin["modalities"][name]
        if want is not None and list(want) != list(have):
            raise AstroptError(f"{model_name} learned {name} in bands {','.join(want)}, but store {store.dir} holds "
                               f"{name} in bands {','.join(have)}")
    return notes


def _check_catalogue_codec(model_name: str, name: str, learned: dict | None, held: dict | None, store_dir) -> None:
    """A scalar or spectrum column the model learned must be in the store as the same kind, from a codec of the
    same weights: another codec's token 17 is another redshift."""
    if learned is None and held is None:
        return  # an image column on both sides
    if learned is None or held is None:
        what = lambda c: f"as {c['kind']} {c['aion_modality']}" if c else "as an image column"  # noqa: E731
        raise AstroptError(f"{model_name} learned {name} {what(learned)}, but store {store_dir} holds it "
                           f"{what(held)}: use a store tokenised as the model's was")
    if learned.get("weights_sha256") and held.get("weights_sha256") and learned["weights_sha256"] != held["weights_sha256"]:
        raise AstroptError(
            f"{model_name} learned {name} from tokens of a {learned.get('aion_modality')} codec with weights sha256 "
            f"{short(learned['weights_sha256'])}, but store {store_dir} holds {name} tokens of one with weights sha256 "
            f"{short(held['weights_sha256'])}: the same token ids mean different values; use a store tokenised with "
            "the model's codec")


def _learned_bands(recorded) -> dict[str, list[str]]:
    """{modality: bands} of a run's recorded store: {name: bands} (lineage records), or the older
    [{"name", "bands"}] list."""
    if isinstance(recorded, dict):
        return {str(k): list(v) for k, v in recorded.items() if isinstance(v, (list, tuple))}
    if isinstance(recorded, list):
        return {m["name"]: list(m["bands"]) for m in recorded
                if isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("bands"), list)}
    return {}


def check_store_codec(store_name: str, recorded: dict, codec, accept_changed: bool = False,
                      flag: str = "--accept-codec-change") -> list[str]:
    """Refuse to decode a store's (or a model's) tokens with a codec whose weights differ from those that made
    them; returns notes. `recorded` {id, weights_sha256}; `codec` a LoadedCodec (or anything with
    `codec_id` and `weights_sha256`). With `accept_changed` a difference is a note instead."""
    want = recorded.get("weights_sha256") or recorded.get("codec_sha256")
    have = getattr(codec, "weights_sha256", None)
    if not want or not have or want == have:
        return []
    made_with = recorded.get("id") or recorded.get("codec_id")
    # the same folder or hub id with other weights was refitted (or replaced) since; another id is another codec
    now = "now has" if made_with == codec.codec_id else "has"
    message = (f"{store_name} was made with codec {made_with} (weights sha256 {short(want)}), but codec "
               f"{codec.codec_id} {now} weights sha256 {short(have)}: its tokens would decode to other images")
    if accept_changed:
        return [f"note: {message} ({flag} given: decoding anyway)"]
    raise AstroptError(f"{message}; use the codec that made them, or pass {flag} to decode with this one")


def check_embeddings_sources(emb_dir: str | os.PathLike, manifest: dict, store_manifest_sha: str | None,
                             checkpoint_sha: str | None) -> None:
    """Refuse to re-embed (the probe's random-init baseline) or join embeddings whose token store or
    checkpoint changed since they were written: the rows would no longer be the same galaxies or model."""
    tokens = manifest.get("tokens") or {}
    if store_manifest_sha is not None and tokens.get("manifest_sha256") not in (None, store_manifest_sha):
        raise AstroptError(
            f"embeddings {emb_dir} were made from token store {tokens.get('dir')} with manifest sha256 "
            f"{short(tokens.get('manifest_sha256'))}, but that store's manifest is now {short(store_manifest_sha)}: "
            f"re-run `astropt embed` on the store as it is")
    ckpt = manifest.get("checkpoint") or {}
    if checkpoint_sha is not None and ckpt.get("weights_sha256") not in (None, checkpoint_sha):
        raise AstroptError(
            f"embeddings {emb_dir} were made by checkpoint {ckpt.get('path')} with weights sha256 "
            f"{short(ckpt.get('weights_sha256'))}, but its weights are now {short(checkpoint_sha)}: re-run "
            f"`astropt embed`")
