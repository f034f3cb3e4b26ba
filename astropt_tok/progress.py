"""One progress bar for long loops (fitting a codec, sampling, decoding): rich, on stderr, only on a terminal;
plain lines instead where a loop asks for them (a pipe or log file)."""

from __future__ import annotations

import sys
import time

LINES = 10  # plain progress lines over a whole loop (one every tenth of it) when stderr is not a terminal


class ProgressBar:
    """A rich bar on stderr when `enabled` and stderr is a terminal; otherwise silent (pipes, log files, tests), or
    with `lines` a plain line on stderr every tenth of the total: 'label: 300/3000 steps (10%), INFO, 42 s'."""

    def __init__(self, label: str, total: int, enabled: bool = True, unit: str = "", lines: bool = False):
        self.enabled = bool(enabled) and total > 0 and sys.stderr.isatty()
        self._lines = bool(enabled) and total > 0 and lines and not self.enabled
        self.label, self.total, self.unit = label, total, unit
        self._done, self._every, self._t0 = 0, max(1, -(-total // LINES)), time.perf_counter()  # ceil(total / 10)
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
        if self._lines:
            before, self._done = self._done, completed if completed is not None else self._done + n
            # a line when this advance reaches the next tenth or the end (a resumed loop's jump to its start: none)
            crossed = self._done // self._every > before // self._every or (self._done >= self.total > before)
            if crossed and info is not None:
                print(f"{self.label}: {self._done}/{self.total} {self.unit} ({100 * self._done // self.total}%), "
                      f"{info}, {time.perf_counter() - self._t0:.0f} s", file=sys.stderr, flush=True)
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
