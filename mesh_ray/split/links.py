"""How each link of a split moves its activations: one choice per link, from where its two ends run.

``choose`` is the table of docs/transport.md.  Between two stages: Ray Direct Transport keeps
tensors where they are (``cuda_ipc`` for two stages on one GPU, ``nccl`` between GPUs, ``gloo``
between CPU stages on different nodes when it measured faster than the object store), else the
object store (raw numpy buffers, or codec bytes).  Between the caller and a stage: the caller is a
Ray driver, which cannot join a gloo or NCCL group, so it uses CUDA IPC (torch's own reductions,
``actors/cuda_ipc.py``) when it sees the stage's GPU on the same node, else the object store.
``transport`` set to one of the direct transports forces it on every link between stages; where it
cannot work there the split fails at start with one line naming the link, the reason and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from mesh_ray.config import SplitOptions
from mesh_ray.errors import ConfigError

TRANSPORTS: tuple[str, ...] = get_args(SplitOptions.model_fields["transport"].annotation)
DIRECT = ("gloo", "nccl", "cuda_ipc")  # Ray Direct Transport between stages (CUDA IPC: torch's own for the caller)


@dataclass(frozen=True)
class Endpoint:
    """One end of a link as the planner sees it (a stage reports its own; the caller is this process)."""

    name: str  # "stage1" or "caller"
    node_id: str
    device: str  # "cpu" or "cuda"
    gpu_uuid: str | None = None  # the GPU it computes on (cuda)
    nccl: bool = False  # Ray's NCCL groups can run there (CUDA and cupy)
    caller: bool = False
    visible_gpus: tuple[str, ...] = ()  # the caller: UUIDs of the GPUs its torch sees (CUDA IPC needs the stage's)


@dataclass(frozen=True)
class Choice:
    """A link's transport and why (shown in ``split.links`` and docs/transport.md)."""

    transport: str  # "object", "gloo", "nccl" or "cuda_ipc"
    reason: str

    @property
    def measure(self) -> bool:
        """Not decided yet: gloo against the object store, to be measured once on this node pair."""
        return self.transport == "measure"


MEASURE = Choice("measure", "CPU stages on different nodes: gloo against the object store, measured once")


def choose(option: str, a: Endpoint, b: Endpoint, coded: bool, p2p: bool | None = None) -> Choice:
    """The transport for the link ``a -> b`` under ``option`` (see the module docstring); ``coded``:
    the link's codec makes bytes (they go through the object store); ``p2p``: whether the two GPUs
    can reach each other directly (None: unknown).  May return ``MEASURE`` (auto, CPU stages on two
    nodes).  A forced transport that cannot work on a link between stages is a ConfigError."""
    link = f"{a.name}->{b.name}"
    if option not in TRANSPORTS:
        raise ConfigError(f"unknown transport {option!r}: use one of {', '.join(TRANSPORTS)}")
    if a.caller or b.caller:
        return _caller_link(a, b, coded, p2p)
    if coded:
        if option in DIRECT:
            raise ConfigError(f"transport={option!r} cannot carry link {link}: its codec makes bytes, which go "
                              f"through the object store; use codec='raw' (or 'auto') with transport={option!r}")
        return Choice("object", "the codec's bytes go through the object store")
    if option == "object":
        return Choice("object", "transport='object'")
    why_not = {t: _direct_problem(t, a, b) for t in DIRECT}
    if option in DIRECT:
        if why_not[option]:
            raise ConfigError(f"transport={option!r} cannot work on link {link}: {why_not[option]}; "
                              f"use transport='auto' (or 'object')")
        return Choice(option, f"transport={option!r}")
    # auto
    if not why_not["cuda_ipc"]:
        return Choice("cuda_ipc", "both stages on one GPU: the receiver maps the sender's memory (no copy)")
    if not why_not["nccl"]:
        via = {True: "peer to peer", False: "through host memory (no P2P between these GPUs)", None: ""}[p2p]
        return Choice("nccl", f"two GPUs: NCCL moves device to device{' ' + via if via else ''}")
    if a.device == b.device == "cpu":
        if a.node_id == b.node_id:
            return Choice("object", "CPU stages on one node: the object store's shared memory beats gloo "
                                    "(docs/transport.md)")
        return MEASURE
    return Choice("object", why_not["nccl"] if a.device == b.device == "cuda" else
                  f"{a.name} on {a.device}, {b.name} on {b.device}: no direct transport between them")


def _direct_problem(transport: str, a: Endpoint, b: Endpoint) -> str:
    """Why ``transport`` cannot carry a link between stages ``a`` and ``b`` ('' when it can)."""
    devices = {a.device, b.device}
    if transport == "gloo":
        return "" if devices == {"cpu"} else "gloo moves CPU tensors, and a stage here runs on CUDA (use nccl or cuda_ipc)"
    if devices != {"cuda"}:
        return f"{transport} moves CUDA tensors, and {a.name if a.device == 'cpu' else b.name} runs on the CPU"
    same_gpu = a.node_id == b.node_id and a.gpu_uuid is not None and a.gpu_uuid == b.gpu_uuid
    if transport == "cuda_ipc":
        if a.node_id != b.node_id:
            return "CUDA IPC needs both stages on one node"
        return "" if same_gpu else "Ray's CUDA IPC needs both stages on the same GPU (num_gpus below 1 on one GPU)"
    if same_gpu:
        return "NCCL cannot run two ranks on one GPU (use cuda_ipc)"
    if not (a.nccl and b.nccl):
        return "Ray's NCCL groups need cupy in both stages' Python (pip install cupy-cuda12x)"
    return ""


def _caller_link(a: Endpoint, b: Endpoint, coded: bool, p2p: bool | None) -> Choice:
    """A link to or from the caller: CUDA IPC where the caller sees the stage's GPU, else the object store."""
    caller, stage = (a, b) if a.caller else (b, a)
    if coded:
        return Choice("object", "the codec's bytes go through the object store")
    if caller.device != "cuda" or stage.device != "cuda":
        return Choice("object", "a CPU end: the object store's shared memory (raw numpy buffers)")
    if caller.node_id != stage.node_id:
        return Choice("object", "the caller is on another node (CUDA IPC needs one node)")
    if stage.gpu_uuid not in caller.visible_gpus:
        return Choice("object", "the caller does not see the stage's GPU (CUDA_VISIBLE_DEVICES)")
    via = {True: ", copied peer to peer", False: ", copied through host memory (no P2P)", None: ""}[p2p]
    return Choice("cuda_ipc", f"CUDA IPC with torch's reductions (a Ray driver cannot use Ray's){via}")


def pick_measured(gloo_ms: float, object_ms: float) -> Choice:
    """The faster of the two measured raw paths between CPU stages on two nodes."""
    figures = f"gloo {gloo_ms:.1f} ms, object store {object_ms:.1f} ms per probe"
    return Choice("gloo", f"measured faster: {figures}") if gloo_ms < object_ms else Choice("object", f"measured faster: {figures}")


__all__ = ["Choice", "DIRECT", "Endpoint", "MEASURE", "TRANSPORTS", "choose", "pick_measured"]
