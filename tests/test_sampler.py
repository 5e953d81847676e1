"""Sampler: FLUX.1 / FLUX.2 schedules against the reference values, seeding, split == local."""

import pytest
import torch

from mesh_ray.errors import ConfigError
from mesh_ray.models.flux import PRESETS
from mesh_ray.split.sampler import generate, initial_noise, random_conditioning, schedule

from helpers import local_model

# Produced by BFL's own get_schedule functions (flux/sampling.py, flux2/src/flux2/sampling.py).
REFERENCE = [
    ("flux1-dev", 4, 4096, [1.0, 0.90453076, 0.75951093, 0.51284409, 0.0]),
    ("flux1-dev", 20, 1024, [1.0, 0.97273314, 0.94412941, 0.91408789, 0.88249719, 0.84923482, 0.81416416,
                             0.77713346, 0.73797405, 0.69649673, 0.65248942, 0.60571355, 0.55589902, 0.50274014,
                             0.44588831, 0.38494474, 0.31945133, 0.24887879, 0.17261241, 0.089934163, 0.0]),
    ("flux2-dev", 4, 4096, [1.0, 0.96738404, 0.90814388, 0.76719993, 0.0]),
    ("flux2-klein-4b", 4, 6000, [1.0, 0.92896503, 0.81340468, 0.59234649, 0.0]),
    ("flux1-schnell", 4, 4096, [1.0, 0.75, 0.5, 0.25, 0.0]),
]


@pytest.mark.parametrize("name, steps, seq, expected", REFERENCE)
def test_schedules_match_reference(name, steps, seq, expected):
    assert schedule(PRESETS[name], steps, seq) == pytest.approx(expected, abs=1e-6)


def test_bad_steps_and_size():
    with pytest.raises(ConfigError, match="steps must be at least 1"):
        schedule(PRESETS["flux1-dev"], 0, 256)
    with pytest.raises(ConfigError, match="not a multiple of 16"):
        initial_noise(PRESETS["tiny-flux1"], 1, 100, 64, 0)


@pytest.mark.parametrize("arch", ["flux1", "flux2"])
def test_generate_is_seeded_and_split_equals_local(mesh, tiny_ckpts, arch):
    path = tiny_ckpts[arch]
    model = local_model(path)
    txt, y = random_conditioning(model.config, batch=1, txt_len=8, seed=1)
    a = generate(model, txt, y, width=64, height=48, steps=3, seed=5, progress=False)
    b = generate(model, txt, y, width=64, height=48, steps=3, seed=5, progress=False)
    c = generate(model, txt, y, width=64, height=48, steps=3, seed=6, progress=False)
    assert a.shape == (1, model.config.latent_channels, 6, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    split = mesh.split(str(path), stages=2)
    steps_seen = []
    s = generate(split, txt, y, width=64, height=48, steps=3, seed=5, progress=False,
                 callback=lambda i, n, x: steps_seen.append((i, n)))
    split.close()
    assert torch.equal(s, a)
    assert steps_seen == [(1, 3), (2, 3), (3, 3)]
