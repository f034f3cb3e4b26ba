"""One progress bar for long loops (fitting a codec, sampling, decoding): rich, on stderr, only on a terminal."""

from __future__ import annotations

import sys


class ProgressBar:
    """A rich bar on stderr when `enabled` and stderr is a terminal; silent otherwise (pipes, log files, tests)."""

    def __init__(self, label: str, total: int, enabled: bool = True, unit: str = ""):
        self.enabled = bool(enabled) and total > 0 and sys.stderr.isatty()
        self._bar = None
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self._bar = Progress(
                TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False,
            )
            self._task = self._bar.add_task(label, total=total, info="")

    def __enter__(self) -> "ProgressBar":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, n: int = 1, info: str | None = None, completed: int | None = None) -> None:
        """Move the bar on by n (or to `completed`), optionally replacing its info text."""
        if self._bar is None:
            return
        fields = {} if info is None else {"info": info}
        if completed is not None:
            self._bar.update(self._task, completed=completed, **fields)
        else:
            self._bar.update(self._task, advance=n, **fields)

    def print(self, msg: str) -> None:
        """A line above the bar, or on stderr when there is no bar."""
        if self._bar is not None:
            self._bar.console.print(msg, markup=False, highlight=False)
        else:
            print(msg, file=sys.stderr, flush=True)
