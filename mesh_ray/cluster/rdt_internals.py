"""Every use of Ray's private Ray Direct Transport (RDT) internals, in one place (checked against Ray 2.60.0).

Ray 2.60's RDT is alpha and lacks public hooks for what a recovering pipeline needs, so the
workarounds below reach into it; ``problems()`` says which of the names they use are missing, and
``tests/test_rdt_internals.py`` fails loudly when a Ray upgrade changes them.  Why each exists:

* **Abortable transports.**  On any failed or late GLOO/NCCL/CUDA_IPC transfer Ray's monitor calls
  ``ray.kill(src)`` and ``ray.kill(dst)`` (no restart) unless the transport says it can abort
  (``rdt_manager.py`` ``_abort_transport``), which defeats stage restarts.  ``MESH_GLOO`` and
  ``MESH_CUDA_IPC`` abort as a no-op (a gloo op ends by its own timeout or the peer's closed socket;
  an IPC open has nothing to interrupt); ``MESH_NCCL`` exits the process (an NCCL op cannot be
  interrupted) so that Ray *restarts* it.  Registered with the public ``register_tensor_transport``;
  whether one is registered is read from the private registry, and a restarted actor forgets custom
  transports (Ray registers them once per actor id), so stages register them again in ``__init__``.
* **Bounded waits.**  ``RAY_rdt_fetch_fail_timeout_milliseconds`` is read once at import; the
  module constant is set instead, in the driver and in each stage.  Ray's gloo group calls
  ``torch.distributed.init_process_group`` without a timeout (torch's 30 minutes bound every op),
  so the call is wrapped to pass one.
* **The monitor thread.**  Ray's driver-side transfer monitor dies when its abort path meets a
  restarting actor and is never started again: ``revive_monitor`` clears the dead thread.
* **Re-creating a group.**  Ray's gloo group lives on the process-wide torch default process group:
  a restarted member cannot rejoin it, so every member resets its torch.distributed state and the
  group is created again under a new name (``reset_member``); ``forget_group`` drops the driver's
  record without Ray's unbounded ``destroy_collective_group`` wait.
"""

from __future__ import annotations

import functools
import os
from datetime import timedelta
from typing import Any

from ray.experimental.rdt.collective_tensor_transport import GLOOTensorTransport, NCCLTensorTransport
from ray.experimental.rdt.cuda_ipc_transport import CudaIpcTransport

RAY_CHECKED = "2.60.0"
# mesh-ray's transport names -> the names registered with Ray
RAY_NAMES = {"gloo": "MESH_GLOO", "nccl": "MESH_NCCL", "cuda_ipc": "MESH_CUDA_IPC"}


class _Abortable:
    """Says it can abort, so Ray's monitor calls ``abort_transport`` instead of ``ray.kill`` on both
    actors; a collective transport finds its group under its own backend (not the registered name)."""

    @staticmethod
    def can_abort_transport() -> bool:
        return True

    def get_communicator_metadata(self, src_actor: Any, dst_actor: Any, backend: str | None = None) -> Any:
        return super().get_communicator_metadata(src_actor, dst_actor, self.tensor_transport_backend())  # type: ignore[misc]


class MeshGloo(_Abortable, GLOOTensorTransport):
    """Ray's GLOO transport, abortable: the op ends by its own timeout or the dead peer's closed socket."""

    def abort_transport(self, obj_id: str, communicator_metadata: Any) -> None:
        return None


class MeshNccl(_Abortable, NCCLTensorTransport):
    """Ray's NCCL transport whose abort exits the process, so that Ray restarts it (an NCCL op cannot be stopped)."""

    def abort_transport(self, obj_id: str, communicator_metadata: Any) -> None:
        os._exit(1)


class MeshCudaIpc(CudaIpcTransport):
    """Ray's CUDA_IPC transport, abortable (an IPC open has nothing to interrupt; no group)."""

    @staticmethod
    def can_abort_transport() -> bool:
        return True

    def abort_transport(self, obj_id: str, communicator_metadata: Any) -> None:
        return None


# registry name -> (class, devices)
_CLASSES: dict[str, tuple[type, list[str]]] = {"MESH_GLOO": (MeshGloo, ["cpu"]), "MESH_NCCL": (MeshNccl, ["cuda"]),
                                               "MESH_CUDA_IPC": (MeshCudaIpc, ["cuda"])}


def ensure_registered() -> None:
    """Register mesh-ray's transports in this process (the driver before it creates stages; each
    stage in ``__init__``, since a restarted actor has forgotten them).  Idempotent."""
    import torch
    from ray.experimental import register_tensor_transport
    from ray.experimental.rdt import util

    util._ensure_default_transports_registered()
    for name, (cls, devices) in _CLASSES.items():
        if name not in util.transport_manager_info:
            register_tensor_transport(name, devices, cls, torch.Tensor)


def set_transfer_timeout(seconds: float) -> None:
    """How long Ray waits for one direct transfer (its monitor's deadline, a receiver's wait) in this process."""
    from ray._private import ray_constants

    ray_constants.RDT_FETCH_FAIL_TIMEOUT_SECONDS = float(seconds)


def bound_collective_timeout(seconds: float) -> None:
    """Make the collective groups Ray creates in this process time out their ops after ``seconds``
    (torch.distributed's gloo default is 30 minutes).  Call before the group is created."""
    import torch.distributed as dist

    init = getattr(dist.init_process_group, "mesh_ray_original", dist.init_process_group)

    @functools.wraps(init)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", timedelta(seconds=seconds))
        return init(*args, **kwargs)

    bounded.mesh_ray_original = init  # type: ignore[attr-defined] - a later call wraps the original again
    dist.init_process_group = bounded


def reset_member(_actor_self: Any = None) -> bool:
    """Run on every member (``actor.__ray_call__``) before its group is created again: drops Ray's
    group records in the process and torch's default process group, which survivors still hold."""
    import torch.distributed as dist
    from ray.util.collective import collective as col

    with col._group_mgr_lock:
        for name in list(col._group_mgr._name_group_map):
            try:
                col._group_mgr.destroy_collective_group(name)
            except Exception:  # noqa: BLE001 - a group half torn down by Ray's own abort path
                col._group_mgr._name_group_map.pop(name, None)
    if dist.is_initialized():
        dist.destroy_process_group()
    return True


def forget_group(name: str) -> None:
    """Drop the driver's record of a collective group without Ray's unbounded wait on its members
    (they are reset with ``reset_member`` before the next group is made)."""
    from ray.experimental.collective.collective import RemoteCommunicatorManager

    RemoteCommunicatorManager.get().remove_remote_communicator(name)


def revive_monitor() -> bool:
    """Let Ray start its driver-side transfer monitor again if it died (True when it had)."""
    import ray

    manager = ray._private.worker.global_worker.rdt_manager
    with manager._init_lock:
        thread = manager._monitor_failures_thread
        if thread is not None and not thread.is_alive():
            manager._monitor_failures_thread = None
            return True
    return False


def problems() -> list[str]:
    """What of the above no longer matches the installed Ray (empty when everything does)."""
    out: list[str] = []
    try:
        import ray
        import ray._private.ray_constants as rc
        from ray.experimental.collective.collective import RemoteCommunicatorManager
        from ray.experimental.rdt import rdt_manager, util
        from ray.util.collective import collective as col

        checks = {
            "ray_constants.RDT_FETCH_FAIL_TIMEOUT_SECONDS": hasattr(rc, "RDT_FETCH_FAIL_TIMEOUT_SECONDS"),
            "rdt.util.transport_manager_info": isinstance(getattr(util, "transport_manager_info", None), dict),
            "rdt.util._ensure_default_transports_registered": callable(getattr(util, "_ensure_default_transports_registered", None)),
            "RDTManager._monitor_failures_thread": "_monitor_failures_thread" in rdt_manager.RDTManager().__dict__,
            "RDTManager._init_lock": "_init_lock" in rdt_manager.RDTManager().__dict__,
            "RemoteCommunicatorManager.remove_remote_communicator": hasattr(RemoteCommunicatorManager, "remove_remote_communicator"),
            "collective._group_mgr._name_group_map": hasattr(getattr(col, "_group_mgr", None), "_name_group_map"),
            "collective._group_mgr_lock": hasattr(col, "_group_mgr_lock"),
        }
        out += [f"Ray {ray.__version__} lacks {name}" for name, ok in checks.items() if not ok]
        for name, (cls, _devices) in _CLASSES.items():
            if cls.can_abort_transport() is not True:
                out.append(f"{name} cannot abort")
    except Exception as e:  # noqa: BLE001 - an import that moved is exactly what this reports
        out.append(f"Ray's RDT modules moved ({type(e).__name__}: {e})")
    return out


__all__ = ["RAY_CHECKED", "RAY_NAMES", "bound_collective_timeout", "ensure_registered", "forget_group", "problems",
           "reset_member", "revive_monitor", "set_transfer_timeout"]
