"""mesh-ray nodes for ComfyUI: install by cloning or symlinking into ``ComfyUI/custom_nodes/``.

ComfyUI is imported only inside this package, and lazily.  Each ``nodes_*`` module declares its
own ``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS``; this file merges them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

if importlib.util.find_spec("mesh_ray") is None or importlib.util.find_spec("comfy_integration") is None:
    # symlinked alone from a clone: use the clone's packages
    sys.path.append(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

_MODULES = ("nodes_mesh", "nodes_vae", "nodes_save", "nodes_offload")

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = "./web"

# Objects this package sends to Ray workers (stage hosts, ComfyUI sources) are pickled by module name,
# so they must come from ``comfy_integration.*``: when ComfyUI's loader imports this folder under
# another name (symlinked alone into custom_nodes/), the nodes come from the package by its own name.
_PACKAGE = __name__ if __name__ == "comfy_integration" else "comfy_integration"
for _name in _MODULES:
    _mod = importlib.import_module(f"{_PACKAGE}.{_name}")
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

importlib.import_module(f"{_PACKAGE}.registry")  # inside a running ComfyUI this adds GET /mesh/status
importlib.import_module(f"{_PACKAGE}.queue_routes")  # ... and POST /mesh/queue, GET /mesh/queue/status
