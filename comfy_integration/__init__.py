"""mesh-ray nodes for ComfyUI: install by cloning or symlinking into ``ComfyUI/custom_nodes/``.

ComfyUI is imported only inside this package, and lazily.  Each ``nodes_*`` module declares its
own ``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS``; this file merges them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

if importlib.util.find_spec("mesh_ray") is None:  # symlinked alone from a clone: use the clone's mesh_ray
    sys.path.append(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

_MODULES = ("nodes_mesh", "nodes_vae", "nodes_offload")

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = "./web"

for _name in _MODULES:
    _mod = importlib.import_module(f"{__name__}.{_name}")
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

from . import registry  # noqa: E402,F401 - inside a running ComfyUI this adds GET /mesh/status
