"""Node types registered by name: ``@node("Name", outputs=(...))`` on a plain function.

The function's parameters are the node's inputs (no default = required).  Three keyword names are
reserved and injected by the executor, never taken from the graph: ``progress`` (a callable
``progress(step, total)`` that emits a progress event), ``node_id`` (the node's id) and ``base_dir``
(the submitting client's working directory, against which relative paths are resolved).

Every type remembers the module that defines it: a graph sees the built-ins and the types of the
node modules it names (``mesh_ray.workflow.modules``), whatever else this process has imported.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from mesh_ray.errors import ConfigError

INJECTED = ("progress", "node_id", "base_dir")
BUILTIN_MODULE = "mesh_ray.workflow.nodes"


@dataclass(frozen=True)
class NodeType:
    """What the executor needs to know about one node type (resources, inputs, outputs, where it runs)."""

    name: str
    fn: Callable[..., Any]
    outputs: tuple[str, ...]
    required: tuple[str, ...]
    optional: tuple[str, ...]
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    host: bool = False      # runs in its own actor that keeps the outputs (models); consumers run there too
    output: bool = False    # an output node: its values are returned in the run result
    cache: bool = True      # may be reused across runs at release level 0
    injected: tuple[str, ...] = ()
    doc: str = ""
    module: str = ""        # the module that defines it (a graph sees it only when it names that module)

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.required + self.optional


@dataclass
class Expansion:
    """Returned by a node that expands the graph at run time.

    ``nodes``: new nodes in API format; a link to an id among them points into the expansion,
    any other id points to a node of the running graph (which may have to run again if its output
    was released).  ``result``: one entry per output of the expanding node, a link ``[id, k]`` or a
    literal value; consumers of the expanding node are re-pointed to these.
    """

    nodes: dict[str, dict]
    result: list[Any] = field(default_factory=list)


REGISTRY: dict[str, dict[str, NodeType]] = {}  # module -> type name -> type: each node module is its own namespace


def node(name: str, outputs: tuple[str, ...] | list[str] = (), num_gpus: float = 0, num_cpus: float = 1,
         host: bool = False, output: bool = False, cache: bool = True) -> Callable[[Callable], Callable]:
    """Register ``fn`` as node type ``name`` with the given output names and Ray resources."""
    def wrap(fn: Callable) -> Callable:
        types = REGISTRY.setdefault(fn.__module__, {})
        if name in types and types[name].fn is not fn:
            raise ConfigError(f"node type {name!r} is registered twice in {fn.__module__}: give the second one "
                              f"another name")
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        required = tuple(p.name for p in params if p.default is p.empty and p.name not in INJECTED)
        optional = tuple(p.name for p in params if p.default is not p.empty and p.name not in INJECTED)
        injected = tuple(p.name for p in params if p.name in INJECTED)
        doc = (inspect.getdoc(fn) or "").split("\n")[0]
        types[name] = NodeType(name, fn, tuple(outputs), required, optional, float(num_cpus), float(num_gpus),
                                  host, output, cache, injected, doc, fn.__module__)
        return fn
    return wrap


def types_in(modules: tuple[str, ...] | list[str] = ()) -> dict[str, NodeType]:
    """The registered types a graph naming ``modules`` (already imported) sees: the built-ins and theirs."""
    seen: dict[str, NodeType] = {}
    for module in (BUILTIN_MODULE, *modules):
        for name, nt in REGISTRY.get(module, {}).items():
            if name in seen and seen[name] is not nt:
                raise ConfigError(f"node type {name!r} is defined in both {seen[name].module} and {module}: "
                                  f"name only one of these modules")
            seen[name] = nt
    return seen
