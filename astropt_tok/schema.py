"""Checking files the tool reads back: one field at a time, each failure one error naming the file and field.

Every reader of a JSON file the tool wrote (a token store's or embeddings store's manifest, a checkpoint's or
run's config.json, best.json, a trainer state) checks the whole file before using any of it, through a
`Fields` bound to that file:

    f = Fields(path, hint="re-run `astropt tokenise` with --overwrite")
    vocab = f.need(manifest, "vocab_size", int, low=1)
    f.one_of(manifest, "storage", ("arrow", "zarr"))
    bands = f.need_list(manifest, "bands", str)

A failure is a `DamagedFile` (an AstroptError): "FILE is damaged: FIELD is VALUE (expected ...)", so a
hand-edited or half-overwritten file is one line naming what to fix, never a KeyError deep in a reader, and
`astropt verify` can tell damage (reported as a BAD line) from a missing store (an error).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from astropt_tok.errors import AstroptError

_MISSING = object()


class DamagedFile(AstroptError):
    """A file the tool wrote is there but does not hold what its format says (hand-edited, overwritten, cut)."""


def _shown(value: Any) -> str:
    if value is _MISSING:
        return "missing"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def is_kind(value: Any, kind) -> bool:
    """isinstance with JSON's meaning: an int is never a bool, a float field takes integers too (finite only)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    for k in kinds:
        if k is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if k is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if k not in (int, float) and isinstance(value, k):
            return True
    return False


class Fields:
    """The checks of one file's fields; every failure is a DamagedFile naming `path` and the field."""

    def __init__(self, path: str | os.PathLike, hint: str = ""):
        self.path = Path(path)
        self.hint = hint

    def fail(self, field: str, value: Any = _MISSING, expected: str = "", why: str = "") -> DamagedFile:
        """The error for `field` (a dotted path such as "shards[3].rows") holding `value`."""
        text = f"{self.path} is damaged: {field} is {_shown(value)}"
        if expected:
            text += f" (expected {expected})"
        if why:
            text += f": {why}"
        if self.hint:
            text += f"; {self.hint}"
        return DamagedFile(text)

    def need(self, obj: dict, key: str, kind, where: str = "", low=None, high=None, below=None,
             finite: bool = True) -> Any:
        """obj[key] of `kind` (int excludes bool; float takes ints), within [low, high] / below `below` when given."""
        value = obj.get(key, _MISSING) if isinstance(obj, dict) else _MISSING
        expected = _kind_name(kind)
        if value is _MISSING or not is_kind(value, kind):
            raise self.fail(where + key, value, expected)
        if isinstance(value, float) and finite and not math.isfinite(value):
            raise self.fail(where + key, value, "a finite number")
        if is_kind(value, float) and not isinstance(value, bool):
            if (low is not None and value < low) or (high is not None and value > high) or \
                    (below is not None and value >= below):
                bounds = " and ".join(x for x in (f"at least {low}" if low is not None else "",
                                                  f"at most {high}" if high is not None else "",
                                                  f"below {below}" if below is not None else "") if x)
                raise self.fail(where + key, value, f"{expected}, {bounds}")
        return value

    def maybe(self, obj: dict, key: str, kind, where: str = "", **bounds) -> Any:
        """Like `need`, but an absent key or null is fine (returns None)."""
        if not isinstance(obj, dict) or obj.get(key) is None:
            return None
        return self.need(obj, key, kind, where, **bounds)

    def need_list(self, obj: dict, key: str, item_kind, where: str = "", nonempty: bool = True,
                  unique: bool = False) -> list:
        """obj[key]: a list (non-empty unless told) whose every item is of `item_kind` (unique when told)."""
        value = self.need(obj, key, list, where)
        expected = f"a {'non-empty ' if nonempty else ''}list of {_kind_name(item_kind).split(' ', 1)[-1]}s"
        if (nonempty and not value) or not all(is_kind(v, item_kind) for v in value):
            raise self.fail(where + key, value, expected)
        if item_kind is str and not all(v for v in value):
            raise self.fail(where + key, value, f"{expected} (no empty names)")
        if unique and len(set(map(json.dumps, value))) != len(value):
            raise self.fail(where + key, value, f"{expected} without repeats")
        return value

    def one_of(self, obj: dict, key: str, choices: Iterable, where: str = "") -> Any:
        """obj[key], which must be one of `choices`."""
        choices = tuple(choices)
        value = obj.get(key, _MISSING) if isinstance(obj, dict) else _MISSING
        if value is _MISSING or isinstance(value, (dict, list)) or value not in choices or \
                type(value) is bool and not any(c is value for c in choices):
            raise self.fail(where + key, value, "one of " + ", ".join(map(repr, choices)))
        return value

    def equal(self, field: str, value: Any, want: Any, why: str) -> None:
        """`field` holds `value`, which must equal `want` (a cross-field rule `why` explains)."""
        if value != want:
            raise self.fail(field, value, repr(want), why)


def read_json_object(path: str | os.PathLike, what: str, hint: str = "") -> dict:
    """A JSON file that must hold one object: not readable, not UTF-8, not JSON, or not an object is one
    DamagedFile naming `path` (`what` says what the file is, e.g. "checkpoint config")."""
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AstroptError(f"{what} {path} is unreadable: {exc.strerror or exc}{tail}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DamagedFile(f"{what} {path} is damaged: not UTF-8 text (byte {exc.start}){tail}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DamagedFile(f"{what} {path} is damaged: not JSON ({exc.msg} at line {exc.lineno} column "
                          f"{exc.colno}){tail}") from None
    if not isinstance(obj, dict):
        raise DamagedFile(f"{what} {path} is damaged: it holds {type(obj).__name__ if obj is not None else 'null'}, "
                          f"not a JSON object{tail}")
    return obj
