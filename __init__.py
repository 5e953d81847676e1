"""ComfyUI entry when this repository is cloned or symlinked into ``ComfyUI/custom_nodes/``.

Only ComfyUI's custom-node loader imports this file; it re-exports the nodes of
``comfy_integration`` (the package that ``pip install mesh-ray[comfy]`` also installs).
"""

import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.realpath(__file__))
if importlib.util.find_spec("mesh_ray") is None or importlib.util.find_spec("comfy_integration") is None:
    sys.path.append(_ROOT)  # a plain clone: make its packages importable (an installed copy wins)

from comfy_integration import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./comfy_integration/web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
