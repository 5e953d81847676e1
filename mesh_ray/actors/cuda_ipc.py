"""CUDA tensors between the caller and a stage on one node, by CUDA IPC with torch's own reductions.

GPU-only (nothing here runs on a machine without CUDA; see docs/transport.md for what was verified
where).  The caller is a Ray driver: Ray's CUDA_IPC transport cannot serve it (a driver holds no
Ray GPU ids), so the tensor goes as torch's IPC handle inside an ordinary object-store value, the
mechanism Ray's transport wraps.  The receiver maps the sender's memory; nothing is copied.
torch keeps the sender's block alive until every receiver has released it, and makes the
receiver's stream wait for the sender's work (``torch/multiprocessing/reductions.py``).  GPUs are
named by UUID, because the caller and a stage number them differently (a Ray actor sees only its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

_DEVICE_ARG = 6  # rebuild_cuda_tensor's storage_device argument (torch 2.x)


def gpu_uuid(index: int = 0) -> str:
    """The UUID of this process's GPU ``index`` (the same string in every process of the node)."""
    return str(torch.cuda.get_device_properties(index).uuid)


def visible_gpus() -> tuple[str, ...]:
    """UUIDs of the GPUs this process sees, in its own index order (empty without CUDA)."""
    if not torch.cuda.is_available():
        return ()
    return tuple(gpu_uuid(i) for i in range(torch.cuda.device_count()))


def local_device(uuid: str) -> torch.device:
    """This process's device for the GPU ``uuid``; a ValueError when it does not see it."""
    gpus = visible_gpus()
    if uuid not in gpus:
        raise ValueError(f"GPU {uuid} is not visible in this process (CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", gpus.index(uuid))


@dataclass
class IpcTensor:
    """A CUDA tensor as torch's IPC handle: ``open()`` it in another process of the same node."""

    rebuild: Any
    args: tuple
    gpu: str  # UUID of the GPU holding it

    @classmethod
    def share(cls, t: torch.Tensor, gpu: str | None = None) -> "IpcTensor":
        """``t`` as a handle; moved first to the GPU ``gpu`` (the receiver's) when it is elsewhere."""
        from torch.multiprocessing.reductions import reduce_tensor

        if gpu is not None and gpu_uuid(t.device.index) != gpu:
            t = t.to(local_device(gpu))  # peer to peer where the GPUs allow it, else CUDA stages it
        torch.cuda.ipc_collect()  # free the blocks earlier receivers have released
        rebuild, args = reduce_tensor(t.detach().contiguous())
        return cls(rebuild, tuple(args), gpu_uuid(t.device.index))

    def open(self) -> torch.Tensor:
        """The sender's tensor, mapped (not copied) on this process's device for its GPU."""
        args = list(self.args)
        args[_DEVICE_ARG] = local_device(self.gpu).index
        return self.rebuild(*args)


__all__ = ["IpcTensor", "gpu_uuid", "local_device", "visible_gpus"]
