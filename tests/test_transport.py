"""Transports per link (docs/transport.md) on real Ray: gloo Ray Direct Transport between CPU stages
equals the single-process result bit for bit (generate and generate_many, 2 and 3 stages, through a
stage killed mid-generation with its collective group made again), ``auto`` picks the table's
choice, a forced transport that cannot work is one line, and no wait on a collective is unbounded."""

from __future__ import annotations

import time

import pytest
import ray
import torch

from mesh_ray.errors import ConfigError, StageError
from mesh_ray.split.links import Endpoint, choose
from mesh_ray.split.pipeline import ImageRequest, generate_many
from mesh_ray.split.sampler import generate, random_conditioning

from helpers import inputs, kill_actor, local_model

GEN = dict(width=32, height=32, steps=2, progress=False)
FAST = dict(codec="raw", transfer_timeout_s=15, step_timeout_s=90, start_timeout_s=90)


def _ep(name, node="n1", device="cpu", gpu=None, nccl=False, caller=False, visible=()):
    return Endpoint(name, node, device, gpu, nccl, caller, visible)


A, B = "GPU-a", "GPU-b"


@pytest.mark.parametrize("a, b, coded, want", [
    (_ep("stage0", gpu=A, device="cuda"), _ep("stage1", gpu=A, device="cuda"), False, "cuda_ipc"),  # one GPU
    (_ep("stage0", gpu=A, device="cuda", nccl=True), _ep("stage1", gpu=B, device="cuda", nccl=True), False, "nccl"),
    (_ep("stage0", gpu=A, device="cuda", nccl=True), _ep("stage1", "n2", "cuda", B, True), False, "nccl"),  # other node
    (_ep("stage0", gpu=A, device="cuda"), _ep("stage1", gpu=B, device="cuda"), False, "object"),  # no cupy: no NCCL
    (_ep("stage0"), _ep("stage1"), False, "object"),  # CPU, one node: the object store beats gloo
    (_ep("stage0"), _ep("stage1", "n2"), False, "measure"),  # CPU, two nodes: measured once
    (_ep("stage0"), _ep("stage1", "n2"), True, "object"),  # a codec's bytes
    (_ep("stage0", gpu=A, device="cuda"), _ep("stage1"), False, "object"),  # CUDA -> CPU
    (_ep("caller", device="cuda", gpu=A, caller=True, visible=(A, B)), _ep("stage0", gpu=B, device="cuda"), False,
     "cuda_ipc"),  # the caller sees the stage's GPU
    (_ep("caller", device="cuda", gpu=A, caller=True, visible=(A,)), _ep("stage0", gpu=B, device="cuda"), False,
     "object"),  # ... or not
    (_ep("stage0", gpu=A, device="cuda"), _ep("caller", "n2", "cuda", B, caller=True, visible=(B,)), False, "object"),
    (_ep("caller", caller=True), _ep("stage0"), False, "object"),
])
def test_auto_picks_what_the_table_says(a, b, coded, want):
    assert choose("auto", a, b, coded).transport == want


def test_forced_transports_on_the_table():
    cpu0, cpu1 = _ep("stage0"), _ep("stage1", "n2")
    assert choose("gloo", cpu0, cpu1, False).transport == "gloo"
    assert choose("object", cpu0, cpu1, False).transport == "object"
    assert choose("gloo", _ep("caller", caller=True), cpu0, False).transport == "object"  # a driver joins no group
    g0, g1 = _ep("stage0", gpu=A, device="cuda"), _ep("stage1", gpu=A, device="cuda")
    for option, a, b, words in [("nccl", g0, g1, "NCCL cannot run two ranks on one GPU"),
                                ("cuda_ipc", g0, _ep("stage1", gpu=B, device="cuda"), "same GPU"),
                                ("gloo", g0, g1, "gloo moves CPU tensors"),
                                ("gloo", cpu0, cpu1, "codec makes bytes")]:
        with pytest.raises(ConfigError, match=words) as e:
            choose(option, a, b, coded=words == "codec makes bytes")
        assert "\n" not in str(e.value) and "stage0->stage1" in str(e.value)


@pytest.mark.parametrize("transport", ["nccl", "cuda_ipc"])
def test_forced_transport_that_cannot_work_here_is_one_line(mesh, tiny_ckpts, transport):
    with pytest.raises(ConfigError) as e:
        mesh.split(str(tiny_ckpts["flux1"]), stages=2, transport=transport, **FAST)
    msg = str(e.value)
    assert "\n" not in msg and f"transport='{transport}' cannot work on link stage0->stage1" in msg
    assert "runs on the CPU" in msg and "use transport='auto'" in msg


def _main_thread_probe():
    """A function for ``__ray_call__`` (made here so that Ray pickles it by value): runs on the stage's main thread?"""
    def on_main_thread(_stage) -> bool:
        import threading

        return threading.current_thread() is threading.main_thread()

    return on_main_thread


def test_env_variable_sets_the_transport(mesh, tiny_ckpts, monkeypatch):
    monkeypatch.setenv("MESH_RAY_TRANSPORT", "bogus")
    with pytest.raises(ConfigError, match="transport"):
        mesh.split(str(tiny_ckpts["flux1"]), stages=2)
    monkeypatch.setenv("MESH_RAY_TRANSPORT", "object")
    with mesh.split(str(tiny_ckpts["flux1"]), stages=2, **FAST) as split:
        assert [ln["transport"] for ln in split.links] == ["object"] * 3
        assert all(ln["reason"] for ln in split.links)
        assert ray.get(split.segments[0].actor.__ray_call__.remote(_main_thread_probe()), timeout=60)  # created without RDT


@pytest.mark.parametrize("stages", [2, 3])
def test_gloo_between_cpu_stages_equals_the_single_process_bit_for_bit(mesh, tiny_ckpts, stages):
    path = str(tiny_ckpts["flux1" if stages == 2 else "flux2"])
    model = local_model(path)
    with mesh.split(path, stages=stages, transport="gloo", **FAST) as split:
        links = {ln["link"]: ln["transport"] for ln in split.links}
        assert [links[f"stage{i}->stage{i + 1}"] for i in range(stages - 1)] == ["gloo"] * (stages - 1)
        assert links["caller->stage0"] == links[f"stage{stages - 1}->caller"] == "object"  # the driver joins no group
        assert not ray.get(split.segments[0].actor.__ray_call__.remote(_main_thread_probe()), timeout=60)  # RDT: threads
        txt, y = random_conditioning(split.config, seed=1)
        assert torch.equal(generate(split, txt, y, seed=4, **GEN), generate(model, txt, y, seed=4, **GEN))
        hops = split.last.transfers
        assert [h.transport for h in hops] == ["object"] + ["gloo"] * (stages - 1) + ["object"]
        assert all(h.transfer_ms is not None and h.transfer_ms >= 0 and h.raw_bytes > 0 for h in hops)
        reqs = [ImageRequest(txt=txt, y=y, seed=s, **{k: GEN[k] for k in ("width", "height", "steps")}) for s in (5, 6)]
        many = generate_many(split, reqs, progress=False)
        for s, got in zip((5, 6), many.latents):
            assert torch.equal(got, generate(model, txt, y, seed=s, **GEN))


def test_gloo_stage_killed_mid_generation_recovers_exactly_with_a_new_group(mesh, tiny_ckpts):
    path = str(tiny_ckpts["flux2"])
    model = local_model(path)
    with mesh.split(path, stages=3, transport="gloo", **FAST) as split:
        txt, y = random_conditioning(split.config, seed=2)
        want = generate(model, txt, y, seed=7, **GEN)
        version = split.group.links_version()

        def kill_middle(step: int, _steps: int, _img: torch.Tensor) -> None:
            if step == 1:  # the next step's transfer meets a restarted stage outside the old group
                kill_actor(split.segments[1].actor)

        assert torch.equal(generate(split, txt, y, seed=7, callback=kill_middle, **GEN), want)
        assert split.recovery.restarts == 1 and split.group.links_version() > version
        # Mid-step, with several images in flight: chains sent under the old group are sent again.
        reqs = [ImageRequest(txt=txt, y=y, seed=s, **{k: GEN[k] for k in ("width", "height", "steps")}) for s in (7, 8)]
        killed = []

        def kill_once(ev) -> None:
            if not killed:
                killed.append(ev)
                ray.kill(split.segments[2].actor, no_restart=False)

        many = generate_many(split, reqs, progress=False, callback=kill_once)
        assert torch.equal(many.latents[0], want)
        assert torch.equal(many.latents[1], generate(model, txt, y, seed=8, **GEN))
        assert split.recovery.restarts == 2
        split(*inputs(split.config))
        assert [h.transport for h in split.last.transfers] == ["object", "gloo", "gloo", "object"]  # back on gloo


def test_a_collective_whose_peer_died_ends_within_the_timeouts(mesh, tiny_ckpts):
    """No restart left: the gloo transfer to the dead stage fails, and the step ends in one line
    within transfer_timeout_s + step_timeout_s, never waiting on the collective."""
    opts = dict(FAST, step_timeout_s=30, start_timeout_s=30, transfer_timeout_s=6)
    with mesh.split(str(tiny_ckpts["flux1"]), stages=3, transport="gloo", max_restarts=0, **opts) as split:
        args = inputs(split.config)
        split(*args)
        step = split.submit_step(*args)
        ray.kill(split.segments[1].actor, no_restart=True)
        t0 = time.monotonic()
        with pytest.raises(StageError) as e:
            split.finish_step(step)
        assert time.monotonic() - t0 < 6 + 30 + 30
        assert "\n" not in str(e.value) and "stage" in str(e.value)


def test_a_stuck_collective_times_out_and_the_next_step_makes_the_group_again(mesh, tiny_ckpts):
    def recv_from_nobody(_stage) -> tuple[float, str]:  # inside a stage: a gloo receive no peer sends to
        import time as t
        import torch as th
        import torch.distributed as dist

        t0 = t.monotonic()
        try:
            dist.recv(th.zeros(4), src=1)
        except RuntimeError as e:
            return t.monotonic() - t0, str(e)
        return t.monotonic() - t0, "received"

    path = str(tiny_ckpts["flux1"])
    with mesh.split(path, stages=2, transport="gloo", **dict(FAST, transfer_timeout_s=5)) as split:
        args = inputs(split.config)
        want = split(*args)
        took, msg = ray.get(split.segments[0].actor.__ray_call__.remote(recv_from_nobody), timeout=60)
        assert took < 5 and "Timed out" in msg  # 0.8 x transfer_timeout_s, not torch's 30 minutes
        version = split.group.links_version()
        assert torch.equal(split(*args), want)  # the closed gloo pair fails the transfer; the group is made again
        assert split.group.links_version() > version and split.recovery.restarts == 0
        assert [h.transport for h in split.last.transfers] == ["object", "gloo", "object"]


def test_doctor_says_which_transports_work_here_and_why_not():
    from mesh_ray.cluster.transports import probe_transports

    rows = {r.name: r for r in probe_transports()}
    assert rows["object"].usable and rows["gloo"].usable
    if not torch.cuda.is_available():
        assert not rows["nccl"].usable and not rows["cuda_ipc"].usable
        assert rows["nccl"].reason == rows["cuda_ipc"].reason == "no CUDA device visible"


def test_a_group_ray_dropped_is_made_again_before_the_next_step(mesh, tiny_ckpts):
    """Ray's abort path drops a group's record after a failed transfer; a step sent then makes the
    group again (instead of failing at submit) and stays exact."""
    from mesh_ray.cluster import rdt_internals

    path = str(tiny_ckpts["flux1"])
    with mesh.split(path, stages=2, transport="gloo", **FAST) as split:
        args = inputs(split.config)
        want = split(*args)
        version = split.group.links_version()
        rdt_internals.forget_group(split.group.transports.groups["gloo"].name)  # as Ray's abort path does
        assert torch.equal(split(*args), want)
        assert split.group.links_version() == version + 1 and split.recovery.retries == 0
        assert [h.transport for h in split.last.transfers] == ["object", "gloo", "object"]
