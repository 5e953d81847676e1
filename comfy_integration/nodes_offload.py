"""MeshAutoCPUOffload: mesh-ray's traced, windowed weight streaming for ComfyUI's diffusion model.

The node returns a clone of the MODEL; the input MODEL is left as it was.  On the clone:

* ComfyUI's model management loads it the way its own low-VRAM mode does, with a budget of
  zero: the weights stay on the offload device (host memory) and ComfyUI counts almost no VRAM
  for them, so nothing is loaded twice;
* during each sampling run (a ``SAMPLER_SAMPLE`` wrapper, only on this clone)
  ``mesh_ray.memory.AutoOffload`` is attached to the diffusion model: the first pass traces the
  block order, later passes prefetch ``window_size`` blocks to the GPU ahead of use and release
  them after; it is detached when the run ends (also when it fails), so no hook, device copy or
  pinned buffer outlives the queue and the shared weights are back as ComfyUI left them.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from mesh_ray.memory import AutoOffload, OffloadSpec

from .node_spec import mesh_node

log = logging.getLogger("mesh_ray.comfy")

WRAPPER_KEY = "mesh_ray.auto_offload"
GIB = 1024 ** 3


class OffloadRun:
    """The ``SAMPLER_SAMPLE`` wrapper: streams the diffusion model's blocks for one sampling run."""

    def __init__(self, spec: OffloadSpec):
        self.spec = spec
        self.active: AutoOffload | None = None  # attached while a run is in progress
        self.last_stats: dict | None = None     # stats of the last finished run
        self.runs = 0

    def __call__(self, executor: Any, guider: Any, *args: Any, **kwargs: Any) -> Any:
        patcher = guider.model_patcher
        model = patcher.model.diffusion_model
        spec = self.spec if self.spec.device else self.spec.model_copy(update={"device": str(patcher.load_device)})
        offload = AutoOffload.from_spec(model, spec)
        self.active = offload
        try:
            return executor(guider, *args, **kwargs)
        finally:
            self.last_stats = offload.stats()
            offload.detach()
            self.active = None
            self.runs += 1


@functools.cache
def _streamed_patcher_class(base: type) -> type:
    """A subclass of the ModelPatcher class ``base`` whose weights ComfyUI never loads onto the GPU."""
    if getattr(base, "mesh_ray_streamed", False):
        return base

    class StreamedModelPatcher(base):
        mesh_ray_streamed = True

        def load(self, device_to: Any = None, lowvram_model_memory: int = 0, force_patch_weights: bool = False,
                 full_load: bool = False) -> Any:
            # ComfyUI's low-VRAM path with a budget of 1 byte: every cast-capable layer stays on the
            # offload device and counts ~0 bytes of VRAM; AutoOffload moves blocks in during a run.
            return super().load(device_to, lowvram_model_memory=1, force_patch_weights=force_patch_weights,
                                full_load=False)

        def partially_load(self, device_to: Any, extra_memory: int = 0, force_patch_weights: bool = False) -> Any:
            if not self.model.model_lowvram and self.model.model_loaded_weight_memory > 0:
                # Loaded whole for another clone of this model (the input MODEL ran before): give
                # the weights back to the offload device first, ComfyUI's own unload.
                self.unpatch_model(self.offload_device, unpatch_weights=True)
            return super().partially_load(device_to, extra_memory, force_patch_weights)

    return StreamedModelPatcher


def offload_runs(model: Any) -> list[OffloadRun]:
    """The offload wrappers on a ModelPatcher (empty when MeshAutoCPUOffload was not applied)."""
    import comfy.patcher_extension

    return list(model.get_wrappers(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY))


@mesh_node("apply", "Traced, windowed CPU offload: only window_size blocks of the diffusion model are on the GPU "
           "at a time, prefetched in the order they run.",
           [("MODEL", "model", "A clone of the model whose blocks are streamed during sampling.")])
class MeshAutoCPUOffload:
    """Stream the diffusion model's blocks from host memory to the GPU a window at a time."""

    INPUTS = {
        "required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to stream; the input MODEL itself is not changed."}),
            "enable": ("BOOLEAN", {"default": True, "tooltip": "Off: the model passes through unchanged."}),
            "window_size": ("INT", {"default": 2, "min": 1, "max": 256, "tooltip":
                            "Blocks kept on the GPU at once: the next ones are copied in ahead of use while "
                            "the ones already used are released."}),
            "pin_memory": ("BOOLEAN", {"default": True, "tooltip":
                           "Keep host copies in pinned memory for faster, asynchronous copies (CUDA only)."}),
        },
        "optional": {
            "max_device_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5, "tooltip":
                              "Optional weight budget on the GPU in GiB: the largest window that fits is "
                              "used instead of window_size. 0: no budget."}),
        },
    }

    def apply(self, model: Any, enable: bool, window_size: int, pin_memory: bool, max_device_gb: float = 0.0) -> tuple:
        import comfy.patcher_extension

        if not enable:
            return (model,)
        spec = OffloadSpec(window_size=int(window_size), pin_memory=bool(pin_memory),
                           max_device_bytes=int(max_device_gb * GIB) if max_device_gb else None)
        clone = model.clone()
        clone.__class__ = _streamed_patcher_class(type(model))
        clone.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY)
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, OffloadRun(spec))
        return (clone,)


NODE_CLASS_MAPPINGS = {"MeshAutoCPUOffload": MeshAutoCPUOffload}
NODE_DISPLAY_NAME_MAPPINGS = {"MeshAutoCPUOffload": "Mesh Auto CPU Offload"}
