"""Plain-text tables for people: benchmark reports and the planner's ``Plan.table()``."""

from __future__ import annotations

from typing import Any


def text_table(columns: list[str], rows: list[list[Any]], title: str | None = None) -> str:
    """A rich table rendered to text for a report (benchmarks, plans): first column left, the others right;
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


__all__ = ["text_table"]
