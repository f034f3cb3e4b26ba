"""Guards with numbers: weights a command must not build on, and reports that must stay valid JSON.

- `refuse_non_finite_weights(state, path, advice)`: a model whose weights hold a NaN or an infinity (a run that
  diverged, a damaged file) is refused where it is loaded, one error naming the file and the first bad
  tensor, instead of embeddings, samples or a fine-tuned run built on it. One `torch.isfinite(t).all()` per
  floating-point tensor: a few ms for a 95M model, small beside reading it.
- `finite_json(obj)` / `dumps_finite(obj)`: every float that is not finite becomes null, on purpose, and the
  text is written with `allow_nan=False`, so a report is never the invalid JSON `NaN` / `Infinity` that
  Python's json writes by default (strict readers, jq and browsers refuse it).
"""

from __future__ import annotations

import json
import math

from astropt_tok.errors import AstroptError


def first_non_finite(state) -> str | None:
    """The name of the first floating-point tensor of a state dict holding a NaN or an infinity, or None."""
    import torch

    for name, t in state.items():
        if torch.is_tensor(t) and (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return name
    return None


def refuse_non_finite_weights(state, path, advice: str) -> None:
    """One AstroptError naming `path` and the first non-finite tensor of `state`, if there is one."""
    bad = first_non_finite(state)
    if bad is not None:
        raise AstroptError(f"{path} holds non-finite weights in {bad}: {advice}")


def finite_json(obj):
    """`obj` with every non-finite float (NaN, inf; numpy's too) replaced by None, recursively."""
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, float) or type(obj).__name__ in ("float16", "float32", "float64"):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def dumps_finite(obj, **kwargs) -> str:
    """json.dumps of `finite_json(obj)` with allow_nan=False: non-finite numbers are null, never `NaN`."""
    return json.dumps(finite_json(obj), allow_nan=False, **kwargs)
