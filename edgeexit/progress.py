"""Progress that reads well wherever the output goes.

On a terminal: rich's live bar. Anywhere else (a log file, CI, systemd's journal, a pipe) a live bar
cannot redraw itself, and rich prints its last frame cut to an assumed 80 columns ("625/6…"). There
the same calls print plain lines instead: one per finished step (an epoch, a pass over the data) with
its numbers, and one every ``every_s`` seconds while a long step runs.
"""

from __future__ import annotations

import time


def progress(console, *fields: str, show: bool = True, transient: bool = False, every_s: float = 60.0):
    """A progress display for ``console``: rich's `Progress` on a terminal, a `LineProgress` elsewhere.

    ``fields``: format strings over ``task`` shown after the count (rich's TextColumn syntax, no
    markup), e.g. ``"loss {task.fields[loss]:.3f}"``. ``show=False``: nothing is printed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if show and not console.is_terminal:
        return LineProgress(console, fields, every_s)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f, markup=False) for f in fields),
        TimeRemainingColumn(),
        console=console,
        disable=not show,
        transient=transient,
    )


class _Task:
    """What a field's format string reads: ``task.description``, ``task.fields[...]``, counts."""

    def __init__(self, description: str, total: float | None, fields: dict) -> None:
        self.description, self.total, self.fields = description, total, dict(fields)
        self.completed = 0.0
        self.started = self.last_line = time.perf_counter()
        self.printed = False

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


class LineProgress:
    """The calls of rich's `Progress` that edgeexit uses (add_task, update, advance, tasks, as a
    context manager), printed as whole lines: a task's line when the next task starts or the display
    stops (so the line carries what was set last, e.g. an epoch's validation accuracy), and a
    line every ``every_s`` seconds while a task runs."""

    def __init__(self, console, fields: tuple[str, ...] = (), every_s: float = 60.0) -> None:
        self.console, self.fields, self.every_s = console, fields, every_s
        self.tasks: list[_Task] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        for task in self.tasks:
            if not task.printed:
                self._print(task)

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        self.stop()  # the previous step is finished: its line now, with what it was last told
        self.tasks.append(_Task(description, total, fields))
        return len(self.tasks) - 1

    def update(self, task_id: int, *, completed=None, advance=None, description=None, total=None, **fields) -> None:
        task = self.tasks[task_id]
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if description is not None:
            task.description = description
        if total is not None:
            task.total = total
        task.fields.update(fields)
        if time.perf_counter() - task.last_line >= self.every_s and not task.printed:
            self._print(task, running=True)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def line(self, task: _Task) -> str:
        count = f"{task.completed:g}/{task.total:g}" if task.total is not None else f"{task.completed:g}"
        extra = "  ".join(f.format(task=task) for f in self.fields)
        return f"{task.description}: {count}" + (f"  {extra}" if extra else "") + f"  ({task.elapsed:.0f} s)"

    def _print(self, task: _Task, running: bool = False) -> None:
        task.last_line = time.perf_counter()
        task.printed = not running
        self.console.print(self.line(task), markup=False, highlight=False, soft_wrap=True)
