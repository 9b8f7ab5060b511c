"""A small live progress view (rich) shared by the phases: what runs, how many done/failed, ETA."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as _RichProgress


class Progress:
    def __init__(self, phase: str, total: int | None = None, console: Console | None = None):
        self.phase = phase
        self._p = _RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn(), console=console or Console(stderr=True), transient=False)
        self._task = self._p.add_task(phase, total=total, status="")
        self.t0 = time.perf_counter()
        self.done = self.failed = 0
        self.running: set[str] = set()
        self._last_log = -float("inf")

    def __enter__(self) -> Progress:
        self._p.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        t = self._p.tasks[0]
        if exc_type is None and t.total is None:  # a phase that counted no units (drift, report) ended: show it done,
            n = max(t.completed, 1)  # not as "0/?" with an open ETA
            self._p.update(self._task, total=n, completed=n)
        self._p.stop()

    def set_total(self, total: int) -> None:
        self._p.update(self._task, total=total)

    def _status(self) -> str:
        run = ", ".join(sorted(self.running)[:3]) + (" …" if len(self.running) > 3 else "")
        return f"failed {self.failed} | running: {run}" if self.running or self.failed else ""

    def start(self, unit: str) -> None:
        self.running.add(unit)
        self._p.update(self._task, status=self._status())

    def finish(self, unit: str, ok: bool = True) -> None:
        self.running.discard(unit)
        self.done += ok
        self.failed += not ok
        self._p.update(self._task, advance=1, status=self._status())
        self._log(f"{unit}{'' if ok else ' FAILED'}")

    def end(self, unit: str) -> None:
        """Unit no longer running, without counting it (its sub-units were counted)."""
        self.running.discard(unit)
        self._p.update(self._task, status=self._status())

    def advance_rows(self, n: float, label: str = "") -> None:
        self._p.update(self._task, advance=n)
        self._log(label)

    def _log(self, label: str) -> None:
        """Without a terminal (a log file, a batch job) the live bar shows nothing until the end: one line per
        finished unit instead."""
        if self._p.console.is_terminal:
            return
        now = time.perf_counter()
        if not label and now - self._last_log < 10:  # unlabeled row counts (extraction batches): every 10 s
            return
        self._last_log = now
        t = self._p.tasks[0]
        total = "?" if t.total is None else f"{t.total:.0f}"
        self._p.console.print(f"{self.phase}: {t.completed:.0f}/{total} done, {time.perf_counter() - self.t0:.0f} s"
                              + (f" ({label})" if label else ""), highlight=False)

    def print(self, *a, **k) -> None:
        self._p.console.print(*a, **k)
