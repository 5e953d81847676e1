"""CUDA transports on a real GPU (skipped without one; the GPU check runs them: docs/gpu-results.md):
two stages on one GPU over CUDA IPC equal the unsplit model bit for bit, the caller's links use CUDA IPC
too, a stage killed mid-generation recovers exactly, and NCCL on one GPU is one line."""

from __future__ import annotations

import pytest
import ray
import torch

from mesh_ray.errors import ConfigError
from mesh_ray.split.sampler import generate, random_conditioning

from helpers import local_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA IPC and NCCL)")

GEN = dict(width=64, height=64, steps=3, seed=5, progress=False)
ONE_GPU = [{"blocks": "0-2", "num_gpus": 0.5}, {"blocks": "3-5", "num_gpus": 0.5}]  # tiny-flux1: 6 blocks


@pytest.fixture
def gpu_mesh():
    from mesh_ray.mesh import connect

    ray.shutdown()
    mesh = connect(num_gpus=1)
    yield mesh
    mesh.close()
    ray.shutdown()


def test_two_stages_on_one_gpu_move_activations_by_cuda_ipc_exactly(gpu_mesh, tiny_ckpts):
    path = str(tiny_ckpts["flux1"])
    model = local_model(path).to("cuda", torch.bfloat16)
    txt, y = random_conditioning(model.config, seed=1)
    want = generate(model, txt, y, **GEN)
    with gpu_mesh.split(path, stages=ONE_GPU, codec="raw") as split:  # transport="auto"
        assert [ln["transport"] for ln in split.links] == ["cuda_ipc"] * 3
        assert torch.equal(generate(split, txt, y, **GEN), want)
        assert [h.transport for h in split.last.transfers] == ["cuda_ipc"] * 3

        def kill(step: int, _steps: int, _img: torch.Tensor) -> None:
            if step == 1:
                ray.kill(split.segments[1].actor, no_restart=False)

        assert torch.equal(generate(split, txt, y, callback=kill, **GEN), want)
        assert split.recovery.restarts == 1


def test_nccl_on_one_gpu_is_one_line(gpu_mesh, tiny_ckpts):
    with pytest.raises(ConfigError, match="NCCL cannot run two ranks on one GPU") as e:
        gpu_mesh.split(str(tiny_ckpts["flux1"]), stages=ONE_GPU, transport="nccl")
    assert "\n" not in str(e.value)
