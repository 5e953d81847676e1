"""What every ``mesh-ray`` command shares: the stderr console and the one-line error exit."""

from __future__ import annotations

from typing import Any, Callable

import typer
from rich.console import Console

from mesh_ray.errors import MeshError

err_console = Console(stderr=True)


def guard(fn: Callable[[], Any]) -> Any:
    """Run a command body; a MeshError becomes one line ``error: …`` on stderr and exit code 1."""
    try:
        return fn()
    except MeshError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
