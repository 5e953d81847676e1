"""A collective group (gloo or NCCL) over some actors, for Ray Direct Transport links: created, and
created again after a member restarted, with every wait bounded.

Ray 2.60 has no way for a restarted actor to rejoin a group, and a group's name may still be
destroyed late by Ray's own abort path; so each (re)creation resets torch.distributed on every
member first and uses a new name (``cluster/rdt_internals.py`` says why in detail).
"""

from __future__ import annotations

import itertools
import threading
import uuid
from typing import Any

import ray

from mesh_ray.cluster import rdt_internals
from mesh_ray.cluster.ray_errors import ray_error
from mesh_ray.errors import ClusterError, MeshError


class CollectiveGroup:
    """The group ``backend`` ("gloo" or "nccl") over ``actors`` (ranks in list order); ``label``
    names it for people and in Ray (``<label>-<backend>-<n>``, a new ``n`` on each creation)."""

    def __init__(self, actors: list[Any], backend: str, label: str, timeout_s: float):
        self.actors = list(actors)
        self.backend = backend
        self.label = f"{label}-{uuid.uuid4().hex[:6]}"
        self.timeout_s = timeout_s
        self.name: str | None = None
        self.creations = 0
        self._count = itertools.count()

    def create(self) -> str:
        """(Re)create the group: forget the old one, reset every member, create under a new name.
        A ClusterError (one line) when a member does not answer or Ray fails within ``timeout_s``."""
        from ray.experimental.collective import create_collective_group

        rdt_internals.revive_monitor()
        self.forget()
        what = f"resetting the {self.backend} group of {len(self.actors)} stages"
        try:
            ray.get([a.__ray_call__.remote(rdt_internals.reset_member) for a in self.actors], timeout=self.timeout_s)
        except Exception as e:  # noqa: BLE001 - one line, whatever Ray raised
            raise ray_error(e, what, self.timeout_s) from None
        name = f"{self.label}-{self.backend}-{next(self._count)}"
        done: dict[str, Any] = {}

        def make() -> None:  # Ray's create_collective_group waits on its members without a timeout
            try:
                create_collective_group(self.actors, backend=self.backend, name=name)
                done["ok"] = True
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                done["error"] = e

        worker = threading.Thread(target=make, name=f"mesh-ray-{name}", daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            raise ClusterError(f"creating the {self.backend} group {name} did not finish within {self.timeout_s:g} s: "
                               f"check the stages with `mesh-ray status`, or use transport='object'")
        if "error" in done:
            e = done["error"]
            if isinstance(e, MeshError):
                raise e
            raise ray_error(e, f"creating the {self.backend} group {name}", self.timeout_s,
                            failed_fix="use transport='object' or 'auto'") from None
        self.name = name
        self.creations += 1
        return name

    def forget(self) -> None:
        """Drop the driver's record of the current group (members are reset by the next ``create``)."""
        if self.name is not None:
            rdt_internals.forget_group(self.name)
            self.name = None


__all__ = ["CollectiveGroup"]
