"""The transports of one split's links: the choice per link, the collective groups it needs, the measurement.

``Transports.choose`` applies ``split/links.py``'s table to every link of a ``StageGroup``, makes the
gloo / NCCL groups the chosen links need (``cluster/collective.py``), measures gloo against the
object store once per pair of nodes where the table asks, and falls back to the object store where
``auto`` chose a group that cannot be made (a forced transport fails in one line instead).
``version`` counts the times the groups were made: a chain remembers the version it was sent under,
so that a failed chain rebuilds the groups only if nobody has since (``StageGroup.restore_links``).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch

from mesh_ray.actors.records import LinkPlan
from mesh_ray.cluster.collective import CollectiveGroup
from mesh_ray.cluster.rdt_internals import RAY_NAMES
from mesh_ray.codec import CodecSpec
from mesh_ray.errors import MeshError
from mesh_ray.split.links import Choice, Endpoint, choose, pick_measured

log = logging.getLogger("mesh_ray.split.transport")

PROBE_BYTES = 8 << 20  # what a link is measured with: large enough for bandwidth, small enough to be quick
PROBE_REPEATS = 3
GROUP_BACKENDS = {"gloo": ("gloo", "measure"), "nccl": ("nccl",)}  # backend -> the choices whose stages join it


@dataclass
class Link:
    """One link to plan: its two segments (None: the caller), their endpoints and its codec spec."""

    a: Any
    b: Any
    ea: Endpoint
    eb: Endpoint
    spec: CodecSpec  # the link's codec, resolved for where its ends run

    @property
    def coded(self) -> bool:
        return self.spec.mode != "raw"

    @property
    def name(self) -> str:
        return f"{self.ea.name}->{self.eb.name}"


class Transports:
    """Choices, groups and measurements for the links of one split (``label`` names its groups)."""

    def __init__(self, label: str, option: str, timeout_s: float):
        self.label, self.option, self.timeout_s = label, option, timeout_s
        self.groups: dict[str, CollectiveGroup] = {}
        self.version = 0
        self._measured: dict[tuple[str, str], Choice] = {}

    def choose(self, links: list[Link]) -> list[Choice]:
        """Each link's transport; the groups they need made (again) and the version bumped."""
        choices = [choose(self.option, ln.ea, ln.eb, ln.coded, _p2p(ln.ea, ln.eb)) for ln in links]
        choices = [self._measured.get((ln.ea.node_id, ln.eb.node_id), c) if c.measure else c
                   for ln, c in zip(links, choices)]
        for backend, wants in GROUP_BACKENDS.items():
            members = {s.index: s for ln, c in zip(links, choices) if c.transport in wants for s in (ln.a, ln.b)}
            try:
                self._group(backend, [members[i].actor for i in sorted(members)])
            except MeshError as e:
                if self.option != "auto":
                    raise
                log.warning("%s links fall back to the object store: %s", backend, e)
                choices = [Choice("object", f"the {backend} group could not be made ({e})") if c.transport in wants
                           else c for c in choices]
        choices = [self._measure(ln) if c.measure else c for ln, c in zip(links, choices)]
        if "gloo" not in {c.transport for c in choices}:
            self._group("gloo", [])  # only measured, and the object store won
        self.version += 1
        return choices

    def _group(self, backend: str, actors: list) -> None:
        """Make the ``backend`` group over ``actors`` (again); none when the list is empty."""
        old = self.groups.pop(backend, None)
        if old is not None:
            old.forget()
        if actors:
            group = CollectiveGroup(actors, backend, self.label, self.timeout_s)
            group.create()
            self.groups[backend] = group

    def _measure(self, ln: Link) -> Choice:
        """gloo against the object store between two CPU stages on different nodes, once per node pair."""
        key = (ln.ea.node_id, ln.eb.node_id)
        if key not in self._measured:
            plans = {t: LinkPlan(CodecSpec(mode="raw"), ln.name, "float32", t, rdt=t != "object")
                     for t in ("gloo", "object")}
            ms: dict[str, list[float]] = {t: [] for t in plans}
            for k in range(PROBE_REPEATS + 1):  # the first round warms both paths up
                for t, plan in plans.items():
                    took = self._probe(ln, plan)
                    if k:
                        ms[t].append(took)
            self._measured[key] = pick_measured(statistics.median(ms["gloo"]), statistics.median(ms["object"]))
            log.info("link %s: %s", ln.name, self._measured[key].reason)
        return self._measured[key]

    def _probe(self, ln: Link, plan: LinkPlan) -> float:
        """Milliseconds for one probe from ``ln.a`` to ``ln.b`` over ``plan``'s transport."""
        send = ln.a.actor.probe
        if plan.rdt:
            send = send.options(tensor_transport=RAY_NAMES[plan.transport])
        t0 = time.perf_counter()
        ray.get(ln.b.actor.take.remote(send.remote(PROBE_BYTES, plan)), timeout=self.timeout_s)
        return (time.perf_counter() - t0) * 1000

    def forget(self) -> None:
        """Drop every group (the split closes)."""
        for group in self.groups.values():
            group.forget()
        self.groups.clear()


def ray_name(plan: LinkPlan) -> str:
    """The name Ray knows ``plan``'s direct transport by (``.options(tensor_transport=...)``)."""
    return RAY_NAMES[plan.transport]


def _p2p(a: Endpoint, b: Endpoint) -> bool | None:
    """Whether the GPUs of ``a`` and ``b`` reach each other peer to peer, asked in this process when it
    sees both (``torch.cuda.can_device_access_peer`` needs both devices visible); None: unknown."""
    if a.gpu_uuid is None or b.gpu_uuid is None or a.gpu_uuid == b.gpu_uuid or a.node_id != b.node_id:
        return None
    caller = a if a.caller else b if b.caller else None
    visible = caller.visible_gpus if caller else ()
    if not visible and torch.cuda.is_available():
        from mesh_ray.actors.cuda_ipc import visible_gpus

        visible = visible_gpus()
    if a.gpu_uuid not in visible or b.gpu_uuid not in visible:
        return None
    i, j = visible.index(a.gpu_uuid), visible.index(b.gpu_uuid)
    return bool(torch.cuda.can_device_access_peer(i, j) and torch.cuda.can_device_access_peer(j, i))


__all__ = ["Link", "Transports", "ray_name"]
