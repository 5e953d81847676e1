"""Progress of a long benchmark on stderr: a rich bar, and one line per finished measurement.

stdout stays for the report (and the ``--json`` line); a user watching the terminal sees which
measurement runs now and what each one gave, with the time since the start.
"""

from __future__ import annotations

import time
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class BenchProgress:
    """``with BenchProgress(total, enabled) as p: p.start("what"); ...; p.done("figure")``."""

    def __init__(self, total: int, enabled: bool = True, title: str = "bench"):
        self.total, self.count, self.title = total, 0, title
        self.t0 = time.perf_counter()
        self._what = ""
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             console=Console(stderr=True, highlight=False), disable=not enabled,
                             refresh_per_second=1, redirect_stdout=False, redirect_stderr=False)  # 1/s: cores are scarce
        self._task = self._bar.add_task(title, total=total)

    def __enter__(self) -> "BenchProgress":
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def grow(self, more: int) -> None:
        """Measurements found to be needed once earlier ones are known (e.g. the planner's plan)."""
        self.total += more
        self._bar.update(self._task, total=self.total)

    def start(self, what: str) -> None:
        """A measurement begins: the bar shows what runs now."""
        self._what = what
        self._bar.update(self._task, description=f"{self.title}: {what}")

    def done(self, figure: str) -> None:
        """Print the line of the measurement just finished and advance the bar."""
        self.count += 1
        self._bar.advance(self._task)
        if not self._bar.disable:
            self._bar.console.print(f"[{self.count}/{self.total}] {self._what}: {figure} "
                                    f"(t={time.perf_counter() - self.t0:.0f}s)", markup=False, highlight=False, soft_wrap=True)


__all__ = ["BenchProgress"]
