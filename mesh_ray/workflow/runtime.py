"""Where a node's function runs: a Ray task, or an actor call on a node host (an actor that keeps
stateful outputs such as a loaded model).  Both return the outputs plus a small metadata object."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import ray

from mesh_ray.errors import MeshError
from mesh_ray.workflow.registry import Expansion, NodeType


@dataclass(frozen=True)
class Hosted:
    """Stand-in for an output kept inside a node host actor; resolved there, never shipped."""

    key: str
    nbytes: int
    type_name: str


def nbytes(value: Any, _depth: int = 0) -> int:
    """Bytes a value holds (tensors, arrays, bytes, containers); a rough size for anything else."""
    if isinstance(value, Hosted):
        return value.nbytes
    if hasattr(value, "element_size") and hasattr(value, "numel"):
        return int(value.element_size() * value.numel())
    if hasattr(value, "nbytes") and isinstance(getattr(value, "nbytes"), int):
        return int(value.nbytes)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if _depth < 3 and isinstance(value, (list, tuple)):
        return sum(nbytes(v, _depth + 1) for v in value)
    if _depth < 3 and isinstance(value, dict):
        return sum(nbytes(v, _depth + 1) for v in value.values())
    info = getattr(value, "info", None)  # a SplitModel or VaeService: the weights it loaded
    for attr in ("total_bytes", "decoder_bytes"):
        if isinstance(getattr(info, attr, None), int):
            return int(getattr(info, attr))
    return sys.getsizeof(value)


class Progress:
    """``progress(step, total)`` for a node: sends a progress event to the run's event sink, never blocks."""

    def __init__(self, sink: Any, run_id: str, node_id: str):
        self.sink, self.run_id, self.node_id = sink, run_id, node_id

    def __call__(self, step: int, total: int) -> None:
        if self.sink is not None:
            self.sink.emit.remote(self.run_id, {"type": "progress", "node": self.node_id, "step": int(step),
                                                "total": int(total), "t": time.time()})


def _outputs(nt: NodeType, result: Any) -> tuple:
    n = len(nt.outputs)
    if n == 1 and not (isinstance(result, tuple) and len(result) == 1):
        return (result,)
    if result is None and n == 0:
        return ()
    if not isinstance(result, tuple) or len(result) != n:
        got = len(result) if isinstance(result, tuple) else 1
        raise MeshError(f"node type {nt.name} returned {got} values but declares {n} outputs "
                        f"({', '.join(nt.outputs) or 'none'}): return a tuple with one value per output")
    return result


def call_node(nt: NodeType, ctx: dict, inputs: dict) -> tuple:
    """Run the node function; returns (*outputs, meta) where meta has sizes, time and any expansion."""
    kwargs = dict(inputs)
    if "progress" in nt.injected:
        kwargs["progress"] = Progress(ctx.get("sink"), ctx["run_id"], ctx["node_id"])
    if "node_id" in nt.injected:
        kwargs["node_id"] = ctx["node_id"]
    if "base_dir" in nt.injected:
        kwargs["base_dir"] = ctx.get("base_dir") or "."
    t0 = time.perf_counter()
    result = nt.fn(**kwargs)
    meta: dict[str, Any] = {"ms": (time.perf_counter() - t0) * 1000}
    if isinstance(result, Expansion):
        meta["expand"] = {"nodes": result.nodes, "result": list(result.result)}
        outs = (None,) * len(nt.outputs)
    else:
        outs = _outputs(nt, result)
    meta["sizes"] = [0 if o is None else nbytes(o) for o in outs]
    return (*outs, meta)


def _ret(values: tuple) -> Any:
    return values if len(values) > 1 else values[0]


@ray.remote
def run_task(_wf_type: NodeType, _wf_ctx: dict, **inputs: Any) -> Any:
    """A node as a Ray task: Ray resolves the input ObjectRefs, the outputs become ObjectRefs."""
    return _ret(call_node(_wf_type, _wf_ctx, inputs))


@ray.remote
class NodeHost:
    """An actor that runs a hosted node (e.g. a model loader) and keeps its outputs; nodes that take
    those outputs run here as actor calls.  Killing the actor frees everything it holds."""

    def __init__(self) -> None:
        self._held: dict[str, Any] = {}

    def run(self, _wf_type: NodeType, _wf_ctx: dict, _wf_keep: bool, **inputs: Any) -> Any:
        inputs = {k: self._held[v.key] if isinstance(v, Hosted) else v for k, v in inputs.items()}
        *outs, meta = call_node(_wf_type, _wf_ctx, inputs)
        if _wf_keep and "expand" not in meta:
            kept = []
            for k, (o, size) in enumerate(zip(outs, meta["sizes"])):
                key = f"{_wf_ctx['node_id']}:{k}:{time.monotonic_ns()}"
                self._held[key] = o
                kept.append(Hosted(key, size, type(o).__name__))
            outs = kept
        return _ret((*outs, meta))

    def drop(self, key: str) -> None:
        """Forget one held output (closing it when it can be closed)."""
        value = self._held.pop(key, None)
        if hasattr(value, "close"):
            try:
                value.close()
            except Exception:  # noqa: BLE001 - best effort on release
                pass

    def close(self) -> None:
        """Close what this host holds (a VAE service finishes its forget-mode writes, a split stops its
        stages), then end the actor."""
        for key in list(self._held):
            self.drop(key)
        ray.actor.exit_actor()
