"""Node modules: which extra modules of node types a run imports by name, and which names are allowed.

A graph sees the built-in node types and the types defined in the node modules named with it
(``node_modules=[...]`` in Python, ``mesh-ray run --nodes MODULE``).  The process that runs the graph
(the calling one, or the workflow service) imports them itself, by name: no code travels with a
submission.  Only modules under the allow-list are imported: ``MESH_RAY_NODE_MODULE_PREFIXES``
(comma-separated or a JSON list; default ``mesh_ray.``), which the operator sets for the service
when starting it (``mesh-ray serve``).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, field_validator

from mesh_ray.config import ENV_PREFIX, load_settings
from mesh_ray.errors import ConfigError
from mesh_ray.workflow.registry import BUILTIN_MODULE, REGISTRY, NodeType, types_in

TESTING_NODES = "mesh_ray.workflow.testing_nodes"
PREFIXES_ENV = f"{ENV_PREFIX}NODE_MODULE_PREFIXES"


class NodeModuleOptions(BaseModel):
    """The node-module allow-list: dotted prefixes (``mesh_ray.`` allows ``mesh_ray`` and everything under it)."""

    model_config = ConfigDict(extra="forbid")

    node_module_prefixes: list[str] = ["mesh_ray."]

    @field_validator("node_module_prefixes", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else value


def allowed_prefixes() -> tuple[str, ...]:
    """This process's allow-list (``MESH_RAY_NODE_MODULE_PREFIXES``, else ``mesh_ray.``)."""
    return tuple(load_settings(NodeModuleOptions).node_module_prefixes)


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p.rstrip(".") or name.startswith(p.rstrip(".") + ".") for p in prefixes if p.rstrip("."))


def _is_module_name(name: object) -> bool:
    """A plain dotted module name (no paths, no ``__main__``-like parts)."""
    return isinstance(name, str) and all(p.isidentifier() and not p.startswith("__") for p in name.split("."))


def import_node_modules(modules: Iterable[str] | str = (), prefixes: Iterable[str] | None = None) -> tuple[str, ...]:
    """Import the built-ins and each named node module after checking it against the allow-list
    (``prefixes``, default ``allowed_prefixes()``); returns the names, without repeats."""
    importlib.import_module(BUILTIN_MODULE)
    names = [modules] if isinstance(modules, str) else list(modules or ())
    allow = tuple(prefixes) if prefixes is not None else allowed_prefixes() if names else ()
    for name in names:
        if not _is_module_name(name):
            raise ConfigError(f"node module {name!r} is not a module name: write a dotted name without '__' parts, "
                              f"such as {TESTING_NODES}")
        if not _under(name, allow):
            raise ConfigError(f"node module {name!r} is not allowed (allowed: {', '.join(allow) or 'none'}): name a "
                              f"module under these, or have the operator add its package to {PREFIXES_ENV} where "
                              f"the graph runs (for the service: when starting `mesh-ray serve`)")
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - ImportError, or anything the module's own code raises
            why = (str(e).splitlines() or [""])[0]
            raise ConfigError(f"node module {name!r} cannot be imported ({type(e).__name__}: {why}): check the name "
                              f"and that its package is installed where the graph runs") from None
        if not REGISTRY.get(name):
            raise ConfigError(f"node module {name!r} defines no node types: name a module with @node functions")
    return tuple(dict.fromkeys(names))


def node_types(modules: Iterable[str] | str = (), prefixes: Iterable[str] | None = None) -> dict[str, NodeType]:
    """The node types a graph naming ``modules`` can use: the built-ins plus the types those modules define."""
    return types_in(import_node_modules(modules, prefixes))


def module_hint(class_type: str) -> str:
    """For an unknown ``class_type`` that a node module defines (the testing nodes are looked up too):
    which module to name; else ''."""
    importlib.import_module(TESTING_NODES)  # small; its types stay invisible to graphs that do not name it
    found = sorted(m for m, types in REGISTRY.items()
                   if class_type in types and m != BUILTIN_MODULE and _is_module_name(m))
    if not found:
        return ""
    return (f"it is a node type of module {found[0]}, which this run does not load: pass --nodes {found[0]} "
            f"(node_modules=[{found[0]!r}] in Python)")
