"""The one output path of every ``mesh-ray`` command: a table for people or one JSON line for
machines, and errors as one line ``error: ...`` on stderr with exit code 1."""

from __future__ import annotations

import json
from typing import Any, Callable

import typer
from rich.console import Console
from rich.table import Table

from mesh_ray.errors import MeshError

err_console = Console(stderr=True)


def guard(fn: Callable[[], Any]) -> Any:
    """Run a command body; a MeshError becomes one line ``error: …`` on stderr and exit code 1."""
    try:
        return fn()
    except MeshError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def int_list(value: str | None, flag: str, example: str) -> tuple[int, ...] | None:
    """A comma-separated option (``--windows 1,2,4``) as integers; None stays None; bad text is one line."""
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise MeshError(f"{flag} {value!r} is not a comma-separated list of integers: use e.g. {example}") from None


def json_line(result: Any) -> None:
    """One JSON object on one stdout line (always the last line a command prints)."""
    print(json.dumps(result, default=str))


def emit(result: dict, as_json: bool, title: str) -> None:
    """A key/value table on stdout for people; with --json, instead one JSON object as the last stdout line."""
    if as_json:
        json_line(result)
        return
    table = Table(title=title, show_header=True)
    table.add_column("key")
    table.add_column("value")
    for k, v in result.items():
        table.add_row(str(k), json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))
    Console().print(table)


def emit_report(result: dict, as_json: bool, format_table: Callable[[dict], str]) -> None:
    """A benchmark's own table on stdout, then with --json one JSON object as the last line."""
    print(format_table(result))
    if as_json:
        json_line(result)
