"""Benchmarks behind ``mesh-ray bench …``: ratios measured side by side in one run."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def median_ms(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, in milliseconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def text_table(columns: list[str], rows: list[list[Any]], title: str | None = None) -> str:
    """A rich table rendered to text for a benchmark report: first column left, the others right;
    None shows as "-".  Wide enough never to wrap a cell, so figures stay greppable."""
    import io

    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for i, col in enumerate(table.columns):
        col.justify, col.no_wrap = ("left" if i == 0 else "right"), True
    for row in rows:
        table.add_row(*("-" if v is None else str(v) for v in row))
    out = io.StringIO()
    Console(file=out, width=400, color_system=None, highlight=False).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines() if line.strip())
