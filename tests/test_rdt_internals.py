"""The Ray internals mesh-ray's transports lean on (``mesh_ray/cluster/rdt_internals.py``) are still
there: this fails loudly when a Ray upgrade moves them, before a split fails in a stranger way."""

from __future__ import annotations

import ray

from mesh_ray.cluster import rdt_internals


def test_every_private_name_used_is_still_in_ray():
    assert rdt_internals.problems() == [], f"checked against Ray {rdt_internals.RAY_CHECKED}, installed {ray.__version__}"


def test_our_transports_register_abort_instead_of_kill():
    from ray.experimental.rdt import util

    rdt_internals.ensure_registered()
    rdt_internals.ensure_registered()  # idempotent: a restarted stage registers them again
    for name in rdt_internals.RAY_NAMES.values():
        info = util.transport_manager_info[name]
        assert info.transport_manager_class.can_abort_transport() is True


def test_bounded_collective_timeout_reaches_init_process_group():
    import torch.distributed as dist

    before = dist.init_process_group
    try:
        rdt_internals.bound_collective_timeout(3)
        rdt_internals.bound_collective_timeout(5)  # wraps the original again, not the wrapper
        assert dist.init_process_group.mesh_ray_original is before
    finally:
        dist.init_process_group = before
