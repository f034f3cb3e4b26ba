"""Training logs: RUN/metrics.jsonl (one JSON object per logged step), an optional CSV / wandb / tensorboard
mirror, the loss-curve PNG, and a rich live display. Only the rank-0 process logs."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from astropt_tok.errors import AstroptError, writing
from astropt_tok.atomic import atomic_write_text

METRICS_FILE = "metrics.jsonl"
CSV_FILE = "metrics.csv"
CURVE_FILE = "loss_curve.png"
CSV_COLUMNS = ("step", "loss", "lr", "tokens_per_s", "grad_norm", "val_loss", "mfu", "val_accuracy",
               "val_accuracy_position")


def write_png(fig, path: str | Path, **savefig_kwargs) -> Path:
    """Save a matplotlib figure as PNG `path` through a temporary name, then close it: a full or read-only disk
    is one AstroptError naming `path`, and no half-written file is left."""
    import matplotlib.pyplot as plt

    from astropt_tok.atomic import atomic_file

    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", **savefig_kwargs)
    finally:
        plt.close(fig)
    return path

class MetricsLogger:
    """Appends one record per logged step to RUN/metrics.jsonl (and the chosen mirror); draws the loss curve."""

    def __init__(self, run_dir: str | Path, backend: str = "csv", start_step: int = 0, config: dict | None = None,
                 echo=print):
        self.run = Path(run_dir)
        self.path = self.run / METRICS_FILE
        self.echo = echo
        # On resume keep the records up to the checkpoint's step only, so the file reads as one straight run.
        self.history: list[dict] = []
        if start_step > 0 and self.path.is_file():
            try:
                text = self.path.read_text(errors="replace")
            except OSError as exc:
                raise AstroptError(f"cannot read {self.path}: {exc.strerror}") from None
            for line in text.splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if isinstance(rec, dict) and isinstance(rec.get("step", 0), int) and rec.get("step", 0) <= start_step:
                    self.history.append(rec)
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.history))
        with writing(self.path):
            self._file = open(self.path, "a")
        self._csv = None
        self._wandb = self._tb = None
        if backend == "csv":
            csv_path = self.run / CSV_FILE
            # the kept history through a temporary name (a failed rewrite leaves the old file whole), then appended to
            atomic_write_text(csv_path, "".join(self._csv_line(r) for r in [dict(zip(CSV_COLUMNS, CSV_COLUMNS))]
                                                + self.history))
            with writing(csv_path):
                self._csv = open(csv_path, "a")
        elif backend == "wandb":
            try:
                import wandb

                self._wandb = wandb.init(project="astropt", dir=str(self.run), config=config or {}, resume="allow")
            except ImportError:
                echo("wandb is not installed: logging to metrics.jsonl only (pip install wandb)")
        elif backend == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run / "tensorboard"))
            except ImportError:
                echo("tensorboard is not installed: logging to metrics.jsonl only (pip install tensorboard)")

    @staticmethod
    def _csv_line(rec: dict) -> str:
        return ",".join("" if rec.get(c) is None else str(rec[c]) for c in CSV_COLUMNS) + "\n"

    def _write_csv(self, rec: dict) -> None:
        self._csv.write(self._csv_line(rec))

    def log(self, record: dict[str, Any]) -> None:
        """Write one step's record everywhere it goes."""
        self.history.append(record)
        with writing(self.path):
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._csv is not None:
            with writing(self.run / CSV_FILE):
                self._write_csv(record)
                self._csv.flush()
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)

    def plot(self) -> Path:
        """Redraw RUN/loss_curve.png: training loss per logged step and validation loss per eval."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        tr = [(r["step"], r["loss"]) for r in self.history if r.get("loss") is not None]
        va = [(r["step"], r["val_loss"]) for r in self.history if r.get("val_loss") is not None]
        if tr:
            ax.plot(*zip(*tr), label="train", lw=1)
        if va:
            ax.plot(*zip(*va), "o-", label="validation", ms=3)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return write_png(fig, self.run / CURVE_FILE)

    def close(self) -> None:
        """Flush and close every sink (a write that fails here was reported by `log` already)."""
        for f in (self._file, self._csv):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


class LiveDisplay:
    """A rich progress bar (step, loss, tokens/s, ETA) on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, start: int, enabled: bool | None = None):
        self.enabled = sys.stdout.isatty() if enabled is None else enabled
        self._progress = None
        self.t0, self.start, self.total = time.perf_counter(), start, total
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                TextColumn("ETA"), TimeRemainingColumn(),
            )
            self._task = self._progress.add_task("train", total=total, completed=start, loss="-", tps="-")
            self._progress.start()

    def print(self, msg: str) -> None:
        """A line above the live bar (or plainly)."""
        if self._progress is not None:
            self._progress.console.print(msg, markup=False, highlight=False)
        else:
            print(msg, flush=True)

    def update(self, step: int, record: dict) -> None:
        """Advance to `step` and show its record."""
        line = f"step {step}/{self.total} loss {record['loss']:.4f} lr {record['lr']:.2e} " \
               f"{record['tokens_per_s']:,.0f} tok/s grad_norm {record['grad_norm']:.3f}"
        if record.get("mfu") is not None:
            line += f" mfu {100 * record['mfu']:.1f}%"
        if record.get("val_loss") is not None:
            line += f" val_loss {record['val_loss']:.4f}"
        if record.get("val_accuracy") is not None:  # beside what the per-position most-frequent-token map scores
            line += f" val_acc {record['val_accuracy']:.3f} (position baseline {record['val_accuracy_position']:.3f})"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=f"{record['loss']:.4f}",
                                  tps=f"{record['tokens_per_s']:,.0f}")
            if record.get("val_loss") is not None:
                self.print(line)
        else:
            done = step - self.start
            if done > 0:
                eta = (time.perf_counter() - self.t0) / done * (self.total - step)
                line += f" eta {eta:,.0f}s"
            print(line, flush=True)

    def close(self) -> None:
        """Stop the live bar."""
        if self._progress is not None:
            self._progress.stop()
