"""Weight streaming (AutoOffload) on real torch modules, with the CPU as the compute device."""

from __future__ import annotations

import gc
import warnings

import psutil
import pytest
import torch
from torch import nn

from mesh_ray.errors import ConfigError
from mesh_ray.memory import AutoOffload, OffloadSpec
from mesh_ray.models.flux import PRESETS, build, position_ids, random_state_dict

CFG = PRESETS["tiny-flux1"]
BLOCKS = [f"double_blocks.{i}" for i in range(CFG.depth)] + [f"single_blocks.{i}" for i in range(CFG.depth_single_blocks)]


def tiny_flux(seed: int = 1):
    model = build(CFG, "meta")
    model.load_state_dict(random_state_dict(CFG, seed), assign=True)
    return model.eval()


def inputs(seed: int = 0, h: int = 4, w: int = 4, txt_len: int = 8):
    g = torch.Generator().manual_seed(seed)
    img_ids, txt_ids = position_ids("flux1", 1, h, w, txt_len)
    return dict(img=torch.randn(1, h * w, CFG.in_channels, generator=g), img_ids=img_ids,
                txt=torch.randn(1, txt_len, CFG.context_in_dim, generator=g), txt_ids=txt_ids,
                timesteps=torch.rand(1, generator=g), y=torch.randn(1, CFG.vec_in_dim, generator=g),
                guidance=torch.full((1,), 3.5))


class Reorder(nn.Module):
    """Blocks run in ``self.order`` (repeats allowed): a model whose execution order can change."""

    def __init__(self, n: int = 4, width: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(width, width)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(n)])
        self.order = list(range(n))

    def forward(self, x):
        x = self.inp(x)
        for i in self.order:
            x = self.blocks[i](x)
        return x


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._forward_hooks_always_called)
               for m in model.modules())


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some lazy torch modules warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.fixture(scope="module")
def flux():
    return tiny_flux()


@pytest.fixture(scope="module")
def x():
    return inputs()


@pytest.fixture(scope="module")
def ref(flux, x):
    with torch.no_grad():
        return flux(**x)


# -- equivalence, trace, residency ------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(window_size=1), dict(window_size=3), dict(window_size=2, resident=["first", "last"]),
                                dict(window_size=2, unit="leaf")])
@torch.no_grad()
def test_offloaded_forward_is_bit_identical(flux, x, ref, kw):
    with AutoOffload(flux, device="cpu", **kw) as off:
        for _ in range(3):  # pass 1 traces, passes 2-3 stream in the traced order
            assert torch.equal(flux(**x), ref)
        assert off.stats()["traces"] == 1 and off.stats()["retraces"] == 0
    assert torch.equal(flux(**x), ref)


@pytest.mark.parametrize("window,resident", [(1, []), (2, []), (3, ["first", "last"])])
@torch.no_grad()
def test_window_bounds_device_units_and_trace_is_real_order(flux, x, window, resident):
    # A unit is "on the device" when its weights live in a copy, not in the original storage.
    original = {n: flux.get_submodule(n).state_dict(keep_vars=True) for n in BLOCKS}
    ptrs = {n: [t.data_ptr() for t in sd.values()] for n, sd in original.items()}

    def on_device() -> list[str]:
        return [n for n in BLOCKS if [t.data_ptr() for t in original[n].values()] != ptrs[n]]

    off = AutoOffload(flux, window_size=window, resident=resident, device="cpu")
    seen, ran = [], []

    def check(name):
        def hook(*_):
            seen.append(len(on_device()))
            ran.append(name)
        return hook
    handles = [flux.get_submodule(n).register_forward_pre_hook(check(n)) for n in BLOCKS]
    handles += [flux.get_submodule(n).register_forward_hook(check(n)) for n in BLOCKS]
    try:
        flux(**x)
        real_order = [n for n in ran[::2]]  # pre and post hooks alternate for blocks (no nesting)
        for _ in range(3):
            flux(**x)
            seen.append(len(on_device()))
        streamed = [n for n in BLOCKS if n not in off.resident_names]
        assert off.trace == [n for n in real_order if n in streamed]
        assert max(seen) <= window and max(seen) == min(window, len(streamed))
        assert set(on_device()) == set(off.device_units)
        assert off.stats()["peak_units_on_device"] <= window
        if resident:
            assert off.resident_names == [BLOCKS[0], BLOCKS[-1]]
    finally:
        for h in handles:
            h.remove()
        off.detach()


@torch.no_grad()
def test_changed_order_is_traced_again_and_repeats_work():
    model = Reorder()
    xin = torch.randn(3, 16, generator=torch.Generator().manual_seed(3))

    def plain(order):
        model.order = order
        return model(xin)
    orders = ([0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2], [0, 1, 2], [3, 1, 0, 2], [3, 1, 0, 2], [0, 1, 0, 2, 1], [0, 1, 0, 2, 1])
    expected = {tuple(o): plain(o) for o in orders}
    with AutoOffload(model, window_size=2, device="cpu") as off:
        for order in orders:
            model.order = order
            assert torch.equal(model(xin), expected[tuple(order)])
            assert off.trace == [f"blocks.{i}" for i in order]
            assert off.stats()["peak_units_on_device"] <= 2
        assert off.stats()["traces"] == 1 and off.stats()["retraces"] == 3


@torch.no_grad()
def test_forward_that_raises_keeps_the_trace():
    model = Reorder()
    xin = torch.randn(2, 16)
    ref = model(xin)
    with AutoOffload(model, window_size=2, device="cpu") as off:
        model(xin)
        model.order = [0, 1, 7]
        with pytest.raises(IndexError):
            model(xin)
        assert off.trace == [f"blocks.{i}" for i in range(4)] and off.device_units == []
        model.order = [0, 1, 2, 3]
        assert torch.equal(model(xin), ref) and off.stats()["retraces"] == 0


@torch.no_grad()
def test_flux_block_replacement_retraces(flux, x, ref):
    skip = {"patches_replace": {"dit": {("single_block", 1): lambda args, extra: {"img": args["img"]}}}}

    def twice(args, extra):  # run the original block two times in a row
        out = extra["original_block"](args)
        return extra["original_block"]({**args, **out})
    rep = {"patches_replace": {"dit": {("double_block", 1): twice}}}
    want_skip, want_rep = flux(**x, transformer_options=skip), flux(**x, transformer_options=rep)
    with AutoOffload(flux, window_size=2, device="cpu") as off:
        assert torch.equal(flux(**x), ref)
        assert torch.equal(flux(**x, transformer_options=skip), want_skip)
        assert off.trace == [n for n in BLOCKS if n != "single_blocks.1"]
        assert torch.equal(flux(**x, transformer_options=rep), want_rep)
        assert off.trace.count("double_blocks.1") == 2
        assert torch.equal(flux(**x, transformer_options=rep), want_rep)
        assert off.stats()["retraces"] == 2 and off.stats()["peak_units_on_device"] <= 2


@torch.no_grad()
def test_stage_with_part_of_the_blocks_on_meta(flux, x):
    """A stage actor holds global blocks 2..4 only; run_blocks inside forward_pass streams them."""
    state, cond, pe = flux.embed(**x)
    want = flux.run_blocks(state, cond, pe, 2, 5)
    stage = build(CFG, "meta")
    mine = ("single_blocks.0.", "single_blocks.1.", "single_blocks.2.")
    stage.load_state_dict({k: v for k, v in flux.state_dict().items() if k.startswith(mine)}, strict=False, assign=True)
    with AutoOffload.from_spec(stage, OffloadSpec(window_size=1, resident=["last"], device="cpu")) as off:
        assert off.stats()["streamed_units"] == 2 and off.resident_names == ["single_blocks.2"]
        for _ in range(3):
            with off.forward_pass():
                got = stage.run_blocks(state, cond, pe, 2, 5)
            assert torch.equal(got.img, want.img)
        assert off.trace == ["single_blocks.0", "single_blocks.1"] and off.stats()["unscoped_calls"] == 0
    assert all(p.is_meta for p in stage.double_blocks.parameters())


# -- weights, detach, leaks -------------------------------------------------------------------


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_changed_weights_are_written_back_others_are_not(mode):
    model = Reorder()
    xin = torch.randn(2, 16)
    with mode():
        off = AutoOffload(model, window_size=2, device="cpu")
        model(xin)
        model(xin)
        assert off.stats()["writebacks"] == 0
        assert "blocks.0" in off.device_units  # prefetched for the next pass
        w = model.blocks[0][0].weight
        expected = w.detach().clone() + 1
        w.add_(1.0)  # changed while it lives in the device copy
        model(xin)
        off.detach()
    assert not any(p.is_inference() for p in model.parameters())
    assert off.stats()["writebacks"] == 1
    assert torch.equal(model.blocks[0][0].weight, expected)


@torch.no_grad()
def test_detach_restores_model_exactly(x):
    model = tiny_flux(seed=2)
    before = {n: (p.data_ptr(), p.device, p.dtype, p.requires_grad, p.detach().clone())
              for n, p in model.named_parameters()}
    hooks, tensors = hook_count(model), live_tensors() - len(before)  # the clones above are not ours
    off = AutoOffload(model, window_size=2, resident=["first"], device="cpu")
    for _ in range(3):
        model(**x)
    assert hook_count(model) > hooks
    off.detach()
    del off
    assert hook_count(model) == hooks
    for n, p in model.named_parameters():
        ptr, dev, dtype, rg, val = before[n]
        assert (p.data_ptr(), p.device, p.dtype, p.requires_grad) == (ptr, dev, dtype, rg), n
        assert torch.equal(p, val), n
    del before, val, p
    assert live_tensors() == tensors
    AutoOffload(model, device="cpu").detach()  # attachable again


@torch.no_grad()
def test_fifty_forwards_do_not_leak(x):
    model = tiny_flux(seed=3)
    proc = psutil.Process()
    off = AutoOffload(model, window_size=2, device="cpu")
    model(**x)
    gc.collect()
    rss, held, tensors = proc.memory_info().rss, off.stats()["device_unit_bytes"], live_tensors()
    for _ in range(49):
        model(**x)
    gc.collect()
    assert off.stats()["device_unit_bytes"] == held
    assert live_tensors() == tensors
    assert abs(proc.memory_info().rss - rss) <= 0.01 * rss
    off.detach()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_cuda_stream_offload_matches_and_does_not_leak(x):
    model = tiny_flux(seed=4)
    ref = model.to("cuda")(**{k: v.cuda() for k, v in x.items()})
    model.to("cpu")
    xc = {k: v.cuda() for k, v in x.items()}
    with AutoOffload(model, window_size=2, pin_memory=True, device="cuda") as off:
        model(**xc)
        torch.cuda.synchronize()
        level = torch.cuda.memory_allocated()
        for _ in range(49):
            assert torch.equal(model(**xc), ref)
        torch.cuda.synchronize()
        assert abs(torch.cuda.memory_allocated() - level) <= 0.01 * level
        assert off.stats()["pinned"] and off.stats()["peak_units_on_device"] <= 2
    assert all(p.device.type == "cpu" and not p.is_pinned() for p in model.parameters())


# -- budget and errors ------------------------------------------------------------------------


def test_budget_picks_largest_window_that_fits(flux):
    sizes = sorted((sum(p.numel() * 4 for p in flux.get_submodule(n).parameters()) for n in BLOCKS), reverse=True)
    with AutoOffload(flux, window_size=1, device="cpu") as off:
        trunk = off.trunk_bytes
    with AutoOffload(flux, max_device_bytes=trunk + sum(sizes[:3]) + 1, device="cpu") as off:
        assert off.window_size == 3
    with AutoOffload(flux, max_device_bytes=trunk + sum(sizes[:3]) - 1, device="cpu") as off:
        assert off.window_size == 2
    with AutoOffload(flux, max_device_bytes=10**12, device="cpu") as off:
        assert off.window_size == len(BLOCKS)


@pytest.mark.parametrize("make,words", [
    (lambda m: AutoOffload(m, window_size=0, device="cpu"), "window_size=0"),
    (lambda m: OffloadSpec(window_size=-1), "window_size=-1"),
    (lambda m: AutoOffload(m, max_device_bytes=1000, device="cpu"), "largest unit"),
    (lambda m: AutoOffload(m, resident=["double_blocks.9"], device="cpu"), "'double_blocks.9' does not exist"),
    (lambda m: AutoOffload(m, unit="layer", device="cpu"), "unit 'layer'"),
])
def test_bad_options_raise_one_line_config_error(flux, make, words):
    hooks = hook_count(flux)
    with pytest.raises(ConfigError) as err:
        make(flux)
    msg = str(err.value)
    assert words in msg and "\n" not in msg and ": " in msg
    assert hook_count(flux) == hooks  # nothing was attached


def test_disabled_spec_leaves_model_alone(flux):
    hooks = hook_count(flux)
    off = AutoOffload.from_spec(flux, OffloadSpec(enabled=False))
    assert hook_count(flux) == hooks and off.trace == []
    off.detach()


def test_bench_rows_side_by_side():
    from mesh_ray.bench.offload import format_table, run_offload_bench

    res = run_offload_bench(hidden=128, tokens=16, blocks=9, windows=(1, 2), steps=1, device="cpu")
    rows = {r["setting"]: r for r in res["rows"]}
    assert list(rows)[:3] == ["resident", "offload w=1", "offload w=2"] and res["bandwidth_bytes_per_s"] > 0
    assert all(r["max_abs_diff"] == 0.0 for r in rows.values() if "skipped" not in r)
    assert rows["offload budget 25%"]["resident_fraction"] <= 0.25
    assert rows["offload w=1"]["peak_device_bytes"] < rows["offload w=2"]["peak_device_bytes"] < rows["resident"]["peak_device_bytes"]
    assert "skipped" in rows["diffusers group offload (use_stream)"]
    assert "offload w=2" in format_table(res)
