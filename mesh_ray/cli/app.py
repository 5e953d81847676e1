"""The ``mesh-ray`` Typer apps, the option choices shared by commands, and the console-script entry."""

from __future__ import annotations

import sys
from enum import Enum

import typer

from mesh_ray.names import VAE_MODES

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Run FLUX diffusion transformers across the GPUs of a Ray cluster.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: ratios measured side by side in one run.")
app.add_typer(bench_app, name="bench")


class Arch(str, Enum):
    flux1 = "flux1"
    flux2 = "flux2"


VaeMode = Enum("VaeMode", {m: m for m in VAE_MODES}, type=str)  # the decode modes, named once in names.py


class Codec(str, Enum):
    raw = "raw"
    quant8 = "quant8"
    hevc = "hevc"
    auto = "auto"


def main() -> None:
    """Console-script entry point (``mesh_ray.cli:main``: importing the package registers every command)."""
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        sys.exit(130)
