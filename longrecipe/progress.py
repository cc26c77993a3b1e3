"""Progress bars (rich) that a RuntimeConfig can switch off; rates in units per second."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
    """One task of a rich progress display; a no-op when progress is off."""

    def __init__(self, progress: Progress | None, task, unit: str):
        self._p, self._t, self.unit = progress, task, unit

    def advance(self, n: float = 1) -> None:
        if self._p is not None:
            self._p.advance(self._t, n)

    def set_total(self, total: float | None) -> None:
        if self._p is not None:
            self._p.update(self._t, total=total)

    def note(self, text: str) -> None:
        """Extra text after the bar (loss, lr...)."""
        if self._p is not None:
            self._p.update(self._t, note=text)


@contextlib.contextmanager
def progress_bar(
    name: str, enabled: bool = True, *, unit: str = "it", total: float | None = None
) -> Iterator[Bar]:
    if not enabled:
        yield Bar(None, None, unit)
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
    with progress:
        task = progress.add_task(name, total=total, note="")
        yield Bar(progress, task, unit)
