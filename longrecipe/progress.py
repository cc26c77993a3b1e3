"""Progress of a long stage, wherever it runs.

On a terminal: a rich bar (rates in units per second). Without one (CI, a Prefect
worker's log, output piped to a file): plain lines, one per tenth of the work (at least
one a minute, none closer than 2 s, and a last one), so a log shows where a stage is. Either way the same lines go to
whoever listens (`progress_lines`): the task layer sends them to Prefect's run log. While
a bar is shown, Hugging Face's own bars are off, so they never break into ours.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

LINES_PER_STAGE = 10
"""Plain lines per bar with a known total: one per tenth of it."""
HEARTBEAT_S = 60.0
"""A plain line at least this often while a stage advances."""
MIN_INTERVAL_S = 2.0
"""No two lines closer than this (but the last): a stage of seconds says little."""

_listeners: list[Callable[[str], None]] = []


@contextlib.contextmanager
def progress_lines(listener: Callable[[str], None]) -> Iterator[None]:
    """Send every plain progress line to `listener` (e.g. a logger's info) inside the block."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def on_terminal() -> bool:
    """Whether rich would draw live bars here (stdout is a terminal, or forced)."""
    from rich import get_console

    return get_console().is_terminal


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Hugging Face's own bars off inside the block (transformers' loading bars)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class RateColumn(ProgressColumn):
    """Units per second, e.g. tokens/s."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None and task.elapsed:  # rich's estimate is empty before two samples
            speed = task.completed / task.elapsed
        return Text("-" if not speed else f"{speed:,.1f} {self.unit}/s")


class Bar:
    """One stage's progress: a rich task on a terminal, plain lines for logs; a no-op when
    progress is off."""

    def __init__(self, name: str, unit: str, total: float | None, progress: Progress | None,
                 lines: bool, clock: Callable[[], float] | None = None):
        self.name, self.unit, self.total = name, unit, total
        self._p, self._lines, self._clock = progress, lines, clock or time.monotonic
        self._t = progress.add_task(name, total=total, note="") if progress is not None else None
        self.done = 0.0
        self._note = ""
        self._start = self._last = self._clock()
        self._next_tenth = 1

    def advance(self, n: float = 1) -> None:
        self.done += n
        if self._p is not None:
            self._p.advance(self._t, n)
        if self._lines and self._due():
            self._say()

    def set_total(self, total: float | None) -> None:
        self.total = total
        if self._p is not None:
            self._p.update(self._t, total=total)

    def note(self, text: str) -> None:
        """Extra text after the bar and in its lines (loss, lr, the part being done...)."""
        self._note = text
        if self._p is not None:
            self._p.update(self._t, note=text)

    def finish(self) -> None:
        if self._lines:
            self._say(final=True)

    def _due(self) -> bool:
        if self._clock() - self._last >= HEARTBEAT_S:
            return True
        if not self.total:
            return False
        tenth = math.floor(LINES_PER_STAGE * min(self.done / self.total, 1.0))
        if tenth >= self._next_tenth:
            self._next_tenth = tenth + 1
            # the last one is said by finish()
            return tenth < LINES_PER_STAGE and self._clock() - self._last >= MIN_INTERVAL_S
        return False

    def _say(self, final: bool = False) -> None:
        now = self._clock()
        self._last = now
        elapsed = now - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        count = f"{self.done:,.0f}" + (f"/{self.total:,.0f} {self.unit}" if self.total else f" {self.unit}")
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        left = ""
        if self.total and rate > 0 and not final and self.done < self.total:
            left = f", ~{(self.total - self.done) / rate:,.0f} s left"
        head = "done: " if final else ""
        line = (f"{self.name}: {head}{count}{pct} in {elapsed:,.0f} s, {rate:,.1f} {self.unit}/s"
                f"{left}" + (f" | {self._note}" if self._note else ""))
        emit(line, to_stderr=self._p is None)


def emit(line: str, to_stderr: bool = True) -> None:
    """A plain progress line: to the listeners, and to stderr when no bar is drawn."""
    for listener in list(_listeners):
        try:
            listener(line)
        except Exception:  # a log sink must never fail a stage
            pass
    if to_stderr:
        # not print(): inside a Prefect flow with log_prints, print() becomes a log record
        # that the console may filter out, and a log without a terminal must show it
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


@contextlib.contextmanager
def progress_bar(
    name: str, enabled: bool = True, *, unit: str = "it", total: float | None = None
) -> Iterator[Bar]:
    """Progress of one stage: a rich bar on a terminal, plain lines otherwise, lines to the
    listeners in both cases; nothing at all when `enabled` is false."""
    if not enabled:
        yield Bar(name, unit, total, None, lines=False)
        return
    if not on_terminal():
        bar = Bar(name, unit, total, None, lines=True)
        with quiet_hf():
            yield bar
        bar.finish()
        return
    progress = Progress(
        TextColumn(f"[bold]{name}"),
        BarColumn(),
        MofNCompleteColumn() if total else TaskProgressColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
        transient=False,
    )
    with progress, quiet_hf():
        # on a terminal the lines go only to listeners (a run log), the bar is the display
        bar = Bar(name, unit, total, progress, lines=bool(_listeners))
        yield bar
        bar.finish()
