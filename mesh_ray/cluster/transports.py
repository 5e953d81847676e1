"""Which activation transports can work in this process, and why not (``mesh-ray doctor``).

What a split chooses per link is ``split/links.py``; this says what the machine it runs on allows:
torch.distributed's gloo for CPU stages, Ray's NCCL groups (CUDA and cupy), CUDA IPC (CUDA; two
stages on one GPU, or the caller and a stage on one node), and peer-to-peer access between the
GPUs this process sees (asked here, where both are visible).  Never raises.
"""

from __future__ import annotations

import importlib.util

import torch

from mesh_ray.codec import BackendStatus


def probe_transports() -> list[BackendStatus]:
    """Every transport with usable/not and the reason, for this process."""
    rows = [BackendStatus("object", True, "always available (Ray's object store: raw numpy buffers or codec bytes)")]
    internals = _internals()
    rows.append(_gloo(internals))
    cuda = torch.cuda.is_available()
    nccl_why = ("no CUDA device visible" if not cuda else
                "Ray's NCCL groups need cupy: pip install cupy-cuda12x" if importlib.util.find_spec("cupy") is None else
                internals or "CUDA and cupy present (between stages on different GPUs)")
    rows.append(BackendStatus("nccl", cuda and importlib.util.find_spec("cupy") is not None and not internals, nccl_why))
    ipc_why = ("no CUDA device visible" if not cuda else
               internals or "CUDA present (two stages sharing one GPU; the caller and a stage on one node)")
    rows.append(BackendStatus("cuda_ipc", cuda and not internals, ipc_why))
    if cuda and torch.cuda.device_count() > 1:
        rows.append(_p2p())
    return rows


def _internals() -> str:
    """'' when the Ray internals the direct transports lean on are as checked, else why not."""
    try:
        from mesh_ray.cluster import rdt_internals

        found = rdt_internals.problems()
    except Exception as exc:  # noqa: BLE001 - an import that moved is what this reports
        found = [f"{type(exc).__name__}: {exc}"]
    return f"Ray's direct transport changed under mesh-ray ({'; '.join(found)})" if found else ""


def _gloo(internals: str) -> BackendStatus:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        return BackendStatus("gloo", False, "this torch has no gloo backend (torch.distributed)")
    if internals:
        return BackendStatus("gloo", False, internals)
    return BackendStatus("gloo", True, "torch.distributed gloo (between CPU stages; auto uses it across nodes when "
                                       "it measures faster than the object store)")


def _p2p() -> BackendStatus:
    """Peer-to-peer access between every pair of GPUs this process sees (both directions)."""
    try:
        n = torch.cuda.device_count()
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        off = [f"{i}<->{j}" for i, j in pairs
               if not (torch.cuda.can_device_access_peer(i, j) and torch.cuda.can_device_access_peer(j, i))]
    except Exception as exc:  # noqa: BLE001 - a broken driver must not break doctor
        return BackendStatus("p2p", False, f"probe failed ({type(exc).__name__}: {exc})")
    if off:
        return BackendStatus("p2p", False, f"no peer access between GPUs {', '.join(off)}: NCCL and CUDA IPC copies "
                                           f"go through host memory there (slower, still exact)")
    return BackendStatus("p2p", True, f"every pair of the {n} GPUs reaches each other directly")


__all__ = ["probe_transports"]
