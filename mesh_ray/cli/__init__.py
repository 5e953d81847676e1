"""The ``mesh-ray`` command line: commands in modules (models and cluster, benchmarks, workflows),
one output path (``output.py``).  ``mesh-ray`` and ``python -m mesh_ray.cli`` run ``main``."""

from __future__ import annotations

from mesh_ray.cli import bench, comfy, commands, workflow  # noqa: F401 - each registers its commands on ``app``
from mesh_ray.cli.app import app, bench_app, main
from mesh_ray.cli.commands import doctor_table

__all__ = ["app", "bench_app", "doctor_table", "main"]
