"""The planner's records: a model's shape, a measured device, and the plan made from them
(``mesh_ray.split.planner`` makes plans; ``Plan.table()`` shows one to people)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from mesh_ray.config import StageSpec
from mesh_ray.models.blocks import BlockRange
from mesh_ray.models.flux import FluxConfig, build
from mesh_ray.tables import text_table


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know of a model: block counts and each block's weight bytes."""

    depth: int
    num_single: int
    block_bytes: tuple[int, ...]
    front_bytes: int = 0  # embedders + final layer: what a stage running the front holds besides its blocks

    @property
    def num_blocks(self) -> int:
        return self.depth + self.num_single

    @classmethod
    def from_config(cls, config: FluxConfig, dtype_bytes: int = 2) -> "ModelShape":
        """Block bytes counted from the architecture (no file needed), at ``dtype_bytes`` per weight."""
        model = build(config, "meta")
        sizes = tuple(sum(p.numel() for p in model.block(b).parameters()) * dtype_bytes for b in range(config.num_blocks))
        blocks = sum(p.numel() for b in range(config.num_blocks) for p in model.block(b).parameters())
        front = (sum(p.numel() for p in model.parameters()) - blocks) * dtype_bytes
        return cls(config.depth, config.depth_single_blocks, sizes, front)

    def range(self, start: int, stop: int) -> BlockRange:
        return BlockRange(start, stop, self.depth, self.num_blocks)


class DeviceProfile(BaseModel):
    """One candidate device: its speed on one block of each kind, free memory, and where a stage goes to use it.

    Fields: name (str); double_ms / single_ms (float, ms for one block at the planned token count);
    free_bytes (int | None: None = no limit); work_bytes (int, 0: activation memory a running stage
    needs beyond its weights); h2d_bytes_per_s (float | None: host-to-device copy speed; None = this
    device cannot stream weights, e.g. a CPU); stage (dict: StageSpec fields that place a stage on
    this device, such as num_gpus, node, torch_threads); embed_ms / final_ms (float | None: ms of the
    embedders / final layer on this device, for a plan with the front on the stages; None = half the
    caller's front each).
    """

    name: str
    double_ms: float = Field(gt=0)
    single_ms: float = Field(gt=0)
    free_bytes: int | None = Field(default=None, ge=0)
    work_bytes: int = Field(default=0, ge=0)
    h2d_bytes_per_s: float | None = Field(default=None, gt=0)
    stage: dict = Field(default_factory=dict)
    embed_ms: float | None = Field(default=None, ge=0)
    final_ms: float | None = Field(default=None, ge=0)


class PlanStage(BaseModel):
    """One stage of a plan: which device runs which blocks, how long it takes and what it holds."""

    device: str
    blocks: str
    start: int
    stop: int
    ms: float
    weight_bytes: int
    need_bytes: int
    free_bytes: int | None
    offload: bool
    stage: dict
    front_ms: float = 0.0  # of ``ms``: the embedders (first stage) / final layer (last) with front="stage"


class Plan(BaseModel):
    """Block ranges per device and what the pipeline is predicted to do with them."""

    stages: list[PlanStage]
    front: Literal["caller", "stage"] = "caller"  # where the embedders and final layer run (SplitOptions.front)
    front_ms: float
    link_ms: float
    bottleneck: str
    bottleneck_ms: float
    step_latency_ms: float
    steps: int
    in_flight: int
    predicted_images_per_s: float
    single_device_images_per_s: float | None
    unused_devices: list[str]
    notes: list[str]
    devices: list[DeviceProfile] = Field(default_factory=list)  # the candidates as measured (or given) and planned from

    @property
    def caller_is_bottleneck(self) -> bool:
        return self.bottleneck == "caller"

    @property
    def needs_offload(self) -> bool:
        return any(s.offload for s in self.stages)

    def stage_specs(self) -> list[StageSpec]:
        """The plan as ``StageSpec``s for ``mesh.split(ckpt, stages=...)``."""
        return [StageSpec(blocks=s.blocks, **s.stage) for s in self.stages]

    def table(self) -> str:
        """The plan for people: one line per stage, then the prediction and the bottleneck."""
        lines = [text_table(["stage", "device", "blocks", "ms/step", "of it front", "weights GB", "free GB", "offload"],
                            [[i, s.device, s.blocks, f"{s.ms:.2f}", f"{s.front_ms:.2f}" if s.front_ms else "-",
                              f"{s.weight_bytes / 1e9:.3f}", None if s.free_bytes is None else f"{s.free_bytes / 1e9:.2f}",
                              "yes" if s.offload else "no"] for i, s in enumerate(self.stages)])]
        if self.front == "stage":
            lines.append(f"front (embedders + final layer): on the stages (front='stage', their ms/step include it); "
                         f"measured in the caller {self.front_ms:.2f} ms/step; link {self.link_ms:.2f} ms/hop")
        else:
            lines.append(f"front (embedders + final layer): in the caller (front='caller'), {self.front_ms:.2f} ms/step; "
                         f"link {self.link_ms:.2f} ms/hop")
        lines.append(f"predicted: {self.predicted_images_per_s:.4g} images/s at {self.steps} steps with "
                     f"{self.in_flight} images in flight; bottleneck: {self.bottleneck} ({self.bottleneck_ms:.2f} ms/step)")
        if self.single_device_images_per_s:
            lines.append(f"one device alone: {self.single_device_images_per_s:.4g} images/s")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


__all__ = ["DeviceProfile", "ModelShape", "Plan", "PlanStage"]
