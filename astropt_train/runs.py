"""`astropt runs`: several training runs side by side, a table of where each stands and their loss curves in one PNG.

Everything comes from files a run already writes: RUN/metrics.jsonl (one record per logged step: step, loss,
lr, tokens_per_s, grad_norm, and val_loss at evaluations) and RUN/checkpoints/ (complete checkpoints, best.json).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from astropt_tok.errors import AstroptError
from astropt_tok.schema import DamagedFile


@dataclass
class RunSummary:
    """What one run folder says about itself."""

    run: Path
    name: str
    steps: int | None  # last logged step
    max_iters: int | None  # from RUN/config.json
    best_val_loss: float | None
    best_val_step: int | None
    tokens_per_s: float | None  # median over logged steps (the first left out: it includes start-up)
    last_checkpoint: str | None
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)


def read_metrics(run: Path) -> list[dict]:
    """RUN/metrics.jsonl's records (a line cut by a kill is skipped)."""
    path = run / "metrics.jsonl"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AstroptError(f"{path} is unreadable ({exc.strerror or exc}); it is not a metrics log of `astropt train`") from None
    try:  # records are ASCII JSON: a byte that is not UTF-8 is damage, never a line cut by a kill
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DamagedFile(f"{path} is damaged: not UTF-8 text (byte {exc.start}); leave it out of `astropt runs`, "
                          "or restore it") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # the last line, cut by a kill
            raise AstroptError(f"{path} line {number} is not JSON: the metrics log is damaged "
                               "(leave it out of `astropt runs`, or delete that line)") from None
        if not isinstance(record, dict) or not _numbers(record):
            raise AstroptError(f"{path} line {number} is not a metrics record (a step and numbers): the metrics "
                               "log is damaged (leave it out of `astropt runs`, or delete that line)")
        records.append(record)
    return records


def _numbers(record: dict) -> bool:
    """A record has an integer step, and its loss, val_loss and tokens_per_s (when there) are numbers."""
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return False
    return all(record.get(k) is None or (isinstance(record[k], (int, float)) and not isinstance(record[k], bool))
               for k in ("loss", "val_loss", "tokens_per_s"))


def summarise_run(run: str | Path) -> RunSummary:
    """Read one run folder; a folder that is not a run (no metrics.jsonl) is an AstroptError."""
    from astropt_train.checkpoint import list_checkpoints, read_run_config

    run = Path(run)
    if not (run / "metrics.jsonl").is_file():
        what = "does not exist" if not run.exists() else "is not a training run (no metrics.jsonl)"
        raise AstroptError(f"run {run} {what}; pass run folders written by `astropt train --out RUN`")
    records = read_metrics(run)
    train_curve = [(int(r["step"]), float(r["loss"])) for r in records
                   if r.get("loss") is not None and math.isfinite(r["loss"])]
    # a NaN or infinite validation loss (an overflow in evaluation) is neither plotted nor ever the best
    val_curve = [(int(r["step"]), float(r["val_loss"])) for r in records
                 if r.get("val_loss") is not None and math.isfinite(r["val_loss"])]
    rates = [float(r["tokens_per_s"]) for r in records if r.get("tokens_per_s") and math.isfinite(r["tokens_per_s"])]
    best = min(val_curve, key=lambda sv: sv[1]) if val_curve else None
    checkpoints = list_checkpoints(run)
    config = read_run_config(run)  # damaged (not UTF-8, not an object, wrong fields): one error naming it
    max_iters = ((config or {}).get("train") or {}).get("max_iters")
    return RunSummary(
        run=run, name=run.name or str(run), steps=max((int(r["step"]) for r in records), default=None),
        max_iters=max_iters, best_val_loss=best[1] if best else None, best_val_step=best[0] if best else None,
        tokens_per_s=statistics.median(rates[1:] if len(rates) > 1 else rates) if rates else None,
        last_checkpoint=str(checkpoints[-1][1]) if checkpoints else None, train_curve=train_curve, val_curve=val_curve,
    )


def plot_runs(runs: list[RunSummary], out: str | Path) -> Path:
    """Training (line) and validation (dots) loss of every run in one PNG, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from astropt_tok.errors import ensure_folder

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise AstroptError(f"--out must be a .png file, got {out}")
    from astropt_tok.artifacts import check_file_output

    check_file_output(out, "--out")  # not a folder, nor among a run's (or any artifact's) own files
    ensure_folder(out.parent, "the output folder")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    labels = _distinct_names(runs)
    for i, (r, label) in enumerate(zip(runs, labels)):
        colour = f"C{i % 10}"
        if r.train_curve:
            ax.plot(*zip(*r.train_curve), color=colour, lw=1, alpha=0.8, label=f"{label} train")
        if r.val_curve:
            ax.plot(*zip(*r.val_curve), "o--", color=colour, ms=3, label=f"{label} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("loss curves")
    ax.grid(alpha=0.3)
    if any(r.train_curve or r.val_curve for r in runs):
        ax.legend(fontsize=8)
    fig.tight_layout()
    from astropt_train.metrics import write_png

    return write_png(fig, out)


def _distinct_names(runs: list[RunSummary]) -> list[str]:
    """Each run's folder name, or its whole path where two runs share a name."""
    names = [r.name for r in runs]
    return [str(r.run) if names.count(r.name) > 1 else r.name for r in runs]


def runs_table(runs: list[RunSummary]):
    """A rich table: run, steps (of max-iters), best validation loss (at step), tokens/s, last checkpoint."""
    from astropt_tok.report import folding_table

    table = folding_table("run", "steps", "best val loss", "tokens/s", "last checkpoint", title="training runs")
    for r, name in zip(runs, _distinct_names(runs)):
        steps = "-" if r.steps is None else f"{r.steps}" + (f"/{r.max_iters}" if r.max_iters else "")
        best = "-" if r.best_val_loss is None else f"{r.best_val_loss:.4f} (step {r.best_val_step})"
        rate = "-" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}"
        table.add_row(name, steps, best, rate, r.last_checkpoint or "-")
    return table
