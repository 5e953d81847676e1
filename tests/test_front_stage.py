"""The front (embedders and final layer) on the stages, SplitOptions.front="stage", on real Ray: bit for bit the
same as the front in the caller (raw, fp32, CPU) with generate and generate_many, through a stage restart,
and one-line errors where it cannot run."""

import pytest
import ray
import torch

from mesh_ray.errors import ConfigError
from mesh_ray.split.pipeline import ImageRequest, generate_many
from mesh_ray.split.sampler import generate, random_conditioning

from helpers import inputs

GEN = dict(width=32, height=48, steps=3, seed=5, progress=False)


@pytest.mark.parametrize("arch", ["flux1", "flux2"])
def test_front_on_stage_equals_front_in_caller_bit_for_bit(mesh, tiny_ckpts, arch):
    path = str(tiny_ckpts[arch])
    opts = dict(stages=2, codec="raw", dtype="float32")
    with mesh.split(path, front="caller", **opts) as caller, mesh.split(path, front="stage", **opts) as staged:
        assert not caller.front_on_stage and staged.front_on_stage
        # The caller holds none of the model's weights; the stages hold the front too.
        assert all(p.is_meta for p in staged.model.parameters())
        assert not any(p.is_meta for p in caller.model.final_layer.parameters())
        args = inputs(staged.config)
        out, stats = staged.finish_step(staged.submit_step(*args))
        assert torch.equal(out, caller(*args))
        # caller->stage0 carries the step inputs (latent tokens, timestep, y, guidance), not an activation.
        assert [h.link for h in stats.transfers] == ["caller->stage0", "stage0->stage1", "stage1->caller"]
        img, _, _, _, t, y, g = args
        assert stats.transfers[0].raw_bytes == sum(x.numel() * 4 for x in (img, t, y, g) if x is not None)
        reqs = []
        for i in range(3):
            txt, y = random_conditioning(staged.config, batch=1, txt_len=8, seed=40 + i)
            reqs.append(ImageRequest(txt=txt, y=y, width=32, height=32 + 16 * i, steps=3, seed=i))
        res = generate_many(staged, reqs, progress=False)
        assert sorted(res.order) == [0, 1, 2]
        for i, r in enumerate(reqs):
            ref = generate(caller, r.txt, r.y, width=r.width, height=r.height, steps=r.steps, seed=r.seed,
                           progress=False)
            assert torch.equal(generate(staged, r.txt, r.y, width=r.width, height=r.height, steps=r.steps,
                                        seed=r.seed, progress=False), ref), f"generate, image {i}"
            assert torch.equal(res.latents[i], ref), f"generate_many, image {i}"


def test_front_on_stage_survives_a_restarted_stage(mesh, tiny_ckpts):
    path = str(tiny_ckpts["flux1"])
    with mesh.split(path, stages=2, codec="raw", dtype="float32", front="stage", micro_batches=2) as split:
        txt, y = random_conditioning(split.config, seed=1)
        clean = generate(split, txt, y, **GEN)

        def kill_between_steps(step: int, _steps: int, _img: torch.Tensor) -> None:
            if step in (1, 2):  # the embedding stage, then the final-layer stage, restart without weights
                ray.kill(split.segments[step - 1].actor, no_restart=False)

        assert torch.equal(generate(split, txt, y, callback=kill_between_steps, **GEN), clean)
        assert split.recovery.restarts == 2
        assert all(i["loaded"] for i in split.stage_info())


def test_front_on_stage_refuses_what_it_cannot_run(mesh, tiny_ckpts):
    path = str(tiny_ckpts["flux1"])
    with pytest.raises(ConfigError, match="front='stage' needs every block range on a stage") as e:
        mesh.split(path, n_blocks_remote=2, front="stage")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="front"):
        mesh.split(path, stages=2, front="middle")
    with mesh.split(path, stages=2, front="stage") as split:
        with pytest.raises(ConfigError, match="block_patches.*front='caller'") as e:
            split.block_patches()
        assert "\n" not in str(e.value)
