"""Probe actor: runs ``mesh_ray.actors.profiling`` on one candidate device for the planner
(``mesh_ray.split.probing`` places one on each candidate and reads them)."""

from __future__ import annotations

from typing import Any

import ray
import torch

from mesh_ray.actors.profiling import measure_blocks, measure_front_parts
from mesh_ray.models.flux import FluxConfig


class ProbeClass:
    """A short-lived actor on one candidate device: times one block of each kind and the front's parts there."""

    def __init__(self, torch_threads: int | None = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)

    def measure(self, cfg: FluxConfig, img_tokens: int, txt_tokens: int, dtype: str, repeats: int) -> dict:
        return {**measure_blocks(cfg, img_tokens, txt_tokens, dtype, repeats),
                **measure_front_parts(cfg, img_tokens, txt_tokens, dtype, repeats), "node_ip": ray.util.get_node_ip_address()}

    def echo(self, x: Any) -> Any:
        return x


ProbeActor = ray.remote(ProbeClass)


__all__ = ["ProbeActor", "ProbeClass"]
