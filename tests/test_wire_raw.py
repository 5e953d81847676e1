"""Raw links carry numpy buffers (RawTensor) through Ray's object store, and pe keys are memoised
by equality: both exact, both through the real Ray."""

from __future__ import annotations

import pytest
import ray
import torch

from mesh_ray.actors.records import LinkPlan
from mesh_ray.actors.flux_host import flux_state, flux_streams
from mesh_ray.actors.wire import RawTensor, pack, unpack
from mesh_ray.codec import CodecSpec
from mesh_ray.digest import DigestMemo
from mesh_ray.models.flux import BlockState
from mesh_ray.split.model import tensor_key


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_raw_state_through_the_object_store_is_exact(ray_local, dtype):
    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    state = BlockState(torch.randn(2, 300, 64, generator=g).to(dt), torch.randn(2, 7, 64, generator=g).to(dt), 7)
    wire = pack(flux_streams(state), LinkPlan(spec=CodecSpec(mode="raw"), name="t", dtype=dtype))
    assert isinstance(wire.tensors["img"], RawTensor) and wire.hops[-1].raw_bytes == (2 * 300 + 2 * 7) * 64 * dt.itemsize
    got = ray.get(ray.put(wire), timeout=60)  # as a stage or the driver receives it: read-only buffers
    assert not got.tensors["img"].array.flags.writeable
    mine = flux_state(unpack(got, torch.device("cpu"), dt)[0])  # the default: a tensor the receiver may write
    lent = flux_state(unpack(got, torch.device("cpu"), dt, borrow=True)[0])
    for out in (mine, lent):
        assert out.img.dtype == dt and torch.equal(out.img, state.img) and torch.equal(out.txt, state.txt)
    mine.img.add_(1)  # a private copy: the object in the store is unchanged
    assert torch.equal(ray.get(ray.put(got), timeout=60).tensors["img"].tensor(), state.img)


def test_digest_memo_is_exact():
    calls = []

    def key(t):
        calls.append(1)
        return tensor_key(t)

    memo = DigestMemo(key, keep=2)
    a = torch.randn(3, 5)
    ka = memo(a)
    assert memo(a.clone()) == ka and len(calls) == 1  # equal contents: no new hash
    a.add_(1)  # the caller reuses its tensor for other contents
    assert memo(a) == tensor_key(a) != ka and len(calls) == 2
    b, c = torch.randn(3, 5), torch.randn(3, 6)
    memo(b), memo(c)
    assert memo(a.double()) == tensor_key(a.double())  # another dtype is another key
