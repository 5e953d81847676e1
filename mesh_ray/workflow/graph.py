"""ComfyUI API-format graphs ``{id: {"class_type": ..., "inputs": {name: value | [node_id, k]}}}``,
validated before anything runs: every problem is one line naming the node and the fix.  A graph
sees the built-in node types and those of the node modules named with it (``modules``)."""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from mesh_ray.errors import ConfigError, validation_line
from mesh_ray.workflow.modules import import_node_modules, module_hint
from mesh_ray.workflow.registry import NodeType, types_in

Link = tuple[str, int]


class NodeSpec(BaseModel):
    """One node: its type name and its inputs (extra keys such as ComfyUI's ``_meta`` are kept)."""

    model_config = ConfigDict(extra="allow")

    class_type: str
    inputs: dict[str, Any] = {}


def is_link(value: Any) -> bool:
    """``[node_id, output_index]`` with a string id and an int index, as in ComfyUI's API format."""
    return (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


@dataclass
class Graph:
    """A validated graph: node specs, their types, a topological order and the node modules it names."""

    nodes: dict[str, NodeSpec]
    types: dict[str, NodeType]
    order: list[str] = field(default_factory=list)
    modules: tuple[str, ...] = ()

    def links(self, nid: str) -> dict[str, Link]:
        """Inputs of ``nid`` that come from another node's output."""
        return {k: (v[0], v[1]) for k, v in self.nodes[nid].inputs.items() if is_link(v)}

    def literals(self, nid: str) -> dict[str, Any]:
        """Inputs of ``nid`` given as plain values."""
        return {k: v for k, v in self.nodes[nid].inputs.items() if not is_link(v)}

    def consumers(self) -> dict[Link, set[str]]:
        """For every output that is linked somewhere, the nodes that take it."""
        out: dict[Link, set[str]] = {}
        for nid in self.nodes:
            for src in self.links(nid).values():
                out.setdefault(src, set()).add(nid)
        return out

    def to_json(self) -> dict[str, dict]:
        return {nid: spec.model_dump() for nid, spec in self.nodes.items()}


def _closest(name: str, names: list[str]) -> str:
    near = difflib.get_close_matches(name, names, n=1)
    return f"did you mean {near[0]!r}? " if near else ""


def _parse_node(nid: str, raw: Any) -> NodeSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"node {nid!r} is a {type(raw).__name__}, not an object: write it as "
                          f'{{"class_type": "...", "inputs": {{...}}}}')
    try:
        return NodeSpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{validation_line(e, f'node {nid!r}', NodeSpec.model_fields, 'field')}: write it as "
                          f'{{"class_type": "...", "inputs": {{...}}}}') from None


def _check_inputs(nid: str, spec: NodeSpec, nt: NodeType, known: dict[str, NodeSpec], known_types: dict[str, NodeType]) -> None:
    for name in nt.required:
        if name not in spec.inputs:
            raise ConfigError(f"node {nid!r} ({nt.name}) is missing input {name!r}: add it to its inputs "
                              f"as a value or a link [node_id, output_index]")
    for name, value in spec.inputs.items():
        if name not in nt.inputs:
            have = ", ".join(nt.inputs) or "none"
            raise ConfigError(f"node {nid!r} ({nt.name}) has no input {name!r}: "
                              f"{_closest(name, list(nt.inputs))}its inputs are {have}")
        if not is_link(value):
            continue
        src, k = value
        if src not in known:
            raise ConfigError(f"node {nid!r} input {name!r} links to node {src!r}, which is not in the graph: "
                              f"fix the link or add node {src!r}")
        src_type = known_types[src]
        if not 0 <= k < len(src_type.outputs):
            raise ConfigError(f"node {nid!r} input {name!r} links to output {k} of node {src!r} ({src_type.name}), "
                              f"which has {len(src_type.outputs)} outputs: use an index from 0 to {len(src_type.outputs) - 1}")


def _topo_order(nodes: dict[str, NodeSpec], fixed: set[str]) -> list[str]:
    """The new nodes in dependency order (``graphlib``); a cycle is reported as a path."""
    deps = {nid: sorted({v[0] for v in spec.inputs.values() if is_link(v) and v[0] not in fixed})
            for nid, spec in nodes.items()}
    try:
        return list(TopologicalSorter(deps).static_order())
    except CycleError as e:
        cycle = list(reversed(e.args[1]))  # graphlib lists producer before consumer; name consumer first
        raise ConfigError(f"node {cycle[0]!r} is part of a cycle ({' -> '.join(cycle)}, each takes the next one's "
                          f"output): remove one of these links") from None


def validate_graph(data: Any, existing: Graph | None = None, modules: Iterable[str] | str = (),
                   prefixes: Iterable[str] | None = None) -> Graph:
    """Check a graph against the built-in node types and those of the node ``modules`` (imported here
    when the allow-list, ``prefixes`` or this process's setting, lets them) and return it as a Graph.
    An expansion's new nodes link into ``existing`` and see its modules.  A Graph is returned as it is."""
    if isinstance(data, Graph):
        return data
    if not isinstance(data, dict) or not data:
        raise ConfigError("a workflow graph must be a non-empty JSON object {node_id: {\"class_type\": ..., "
                          "\"inputs\": {...}}} (ComfyUI's API format: 'Save (API)')")
    named = existing.modules if existing is not None else import_node_modules(modules, prefixes)
    visible = types_in(named)
    specs = {str(nid): _parse_node(str(nid), raw) for nid, raw in data.items()}
    types: dict[str, NodeType] = {}
    for nid, spec in specs.items():
        if existing is not None and nid in existing.nodes:
            raise ConfigError(f"expansion node {nid!r} reuses an id of the running graph: give it a new id")
        nt = visible.get(spec.class_type)
        if nt is None:
            names = sorted(visible)
            raise ConfigError(f"node {nid!r} has unknown class_type {spec.class_type!r}: "
                              + (module_hint(spec.class_type)
                                 or f"{_closest(spec.class_type, names)}known types: {', '.join(names)}"))
        types[nid] = nt
    known = {**(existing.nodes if existing else {}), **specs}
    known_types = {**(existing.types if existing else {}), **types}
    for nid, spec in specs.items():
        _check_inputs(nid, spec, types[nid], known, known_types)
    order = _topo_order(specs, set(existing.nodes) if existing else set())
    return Graph(specs, types, order, named)


def read_graph(path: str | os.PathLike) -> dict:
    """A graph file's JSON (ComfyUI 'Save (API)' format, or a ``{"prompt": ...}`` body), not yet validated."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"graph file {p} not found: check the path")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:  # a pickle or other binary: graphs are JSON only, never unpickled
        raise ConfigError(f"graph file {p} is not JSON text (binary data): save the graph as JSON "
                          f"(ComfyUI 'Save (API)'); pickled graphs are never loaded") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"graph file {p} is not valid JSON ({e.msg} at line {e.lineno}): fix its syntax") from None
    if isinstance(data, dict) and "prompt" in data and isinstance(data["prompt"], dict):
        data = data["prompt"]  # ComfyUI's /prompt request body
    return data


def load_graph(path: str | os.PathLike, modules: Iterable[str] | str = (), prefixes: Iterable[str] | None = None) -> Graph:
    """Read and validate a graph from a JSON file (ComfyUI 'Save (API)' format) with node ``modules``."""
    return validate_graph(read_graph(path), modules=modules, prefixes=prefixes)
