"""What every mesh node declares to ComfyUI (inputs, category, outputs, entry point), in one call."""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence, TypeVar

CATEGORY = "mesh"

N = TypeVar("N", bound=type)


def mesh_node(function: str, description: str, outputs: Sequence[tuple[str, str, str]] = (),
              output_node: bool = False) -> Callable[[N], N]:
    """Class decorator setting ComfyUI's node attributes; ``outputs`` are (type, name, tooltip) each.
    A class with a static ``INPUTS`` dict gets ``INPUT_TYPES`` from it (others define their own)."""
    def wrap(cls: N) -> N:
        if hasattr(cls, "INPUTS"):
            cls.INPUT_TYPES = classmethod(_input_types)
        cls.RETURN_TYPES = tuple(o[0] for o in outputs)
        cls.RETURN_NAMES = tuple(o[1] for o in outputs)
        cls.OUTPUT_TOOLTIPS = tuple(o[2] for o in outputs)
        cls.FUNCTION, cls.CATEGORY, cls.DESCRIPTION, cls.OUTPUT_NODE = function, CATEGORY, description, output_node
        return cls
    return wrap


def _input_types(cls: type) -> dict[str, Any]:
    """ComfyUI's ``INPUT_TYPES()``: a fresh copy of the class's ``INPUTS`` (callers may change it)."""
    return copy.deepcopy(cls.INPUTS)
