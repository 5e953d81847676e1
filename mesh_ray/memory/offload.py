"""Weight streaming: trace the order units run in, then keep only a window of them on the device.

The first forward pass records the real execution order of the offloadable units (transformer
blocks by default, leaf modules as an option).  Later passes copy the next ``window_size`` units
to the device ahead of use (on CUDA: from pinned host copies on a side stream, the compute stream
waits on an event before a unit runs) and release a unit after use by pointing its tensors back
at the host copy: weights that did not change are never copied back.  Everything else in the
model (embedders, final layer: the "trunk") and units named in ``resident`` stay on the device.

On a machine without a GPU the compute device is the CPU and a "device copy" is a real separate
allocation (a clone), so the trace, the window bookkeeping and the results are the same code.

A pass is one call of the model's ``forward``; callers that run pieces of a model instead (a
stage actor calling ``model.run_blocks``) wrap the call in ``with offload.forward_pass():``.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, field_validator
from torch import Tensor, nn

from mesh_ray.errors import ConfigError

Unit = Literal["block", "leaf"]
ALIASES = ("first", "last")  # resident aliases: the first / last unit with weights on this model

# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def _check_window(window_size: int) -> int:
    if window_size < 1:
        raise ConfigError(f"offload window_size={window_size} is below 1: use window_size >= 1 "
                          f"(1 keeps a single streamed unit on the device)")
    return window_size


def _check_budget(max_device_bytes: int | None) -> int | None:
    if max_device_bytes is not None and max_device_bytes <= 0:
        raise ConfigError(f"offload max_device_bytes={max_device_bytes} is not positive: give a byte "
                          f"budget such as 4_000_000_000, or leave it unset and use window_size")
    return max_device_bytes


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The compute device: the one asked for, else the current CUDA device, else the CPU."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"offload device {device!r} is not a torch device: use 'cuda', 'cuda:1' or 'cpu'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"offload device {device!r} needs CUDA, which is not available here: "
                              f"use device='cpu' or run on a GPU node")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ConfigError(f"offload device {device!r} is not supported: use a 'cuda' device or 'cpu'")
    return dev


class OffloadSpec(BaseModel):
    """Weight-streaming options for a model or a stage actor (see ``AutoOffload``).

    Fields (type, default):
      enabled (bool, True): False leaves the model untouched.
      window_size (int, 2): streamed units on the device at once (>= 1).
      pin_memory (bool, True): keep host copies in pinned memory (CUDA only) for async copies.
      unit (``"block" | "leaf"``, "block"): transformer blocks, or every leaf module with weights.
      max_device_bytes (int | None, None): weight budget on the device (trunk + resident +
          window); when set, the largest window that fits is used instead of ``window_size``.
      resident (list[str], []): unit names kept on the device, e.g. ``["first", "last"]`` or
          ``["double_blocks.0"]``; names of units this model holds only on ``meta`` are ignored.
      device (str | None, None): compute device; None picks CUDA when present, else the CPU.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    window_size: int = 2
    pin_memory: bool = True
    unit: Unit = "block"
    max_device_bytes: int | None = None
    resident: list[str] = []
    device: str | None = None

    @field_validator("window_size")
    @classmethod
    def _window(cls, v: int) -> int:
        return _check_window(v)

    @field_validator("max_device_bytes")
    @classmethod
    def _budget(cls, v: int | None) -> int | None:
        return _check_budget(v)


# --------------------------------------------------------------------------------------------
# Units: which tensors move together
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Unit:
    """One offloadable module: its tensors (parameters and buffers) and their host copies."""

    index: int
    name: str
    module: nn.Module
    tensors: list[Tensor]
    nbytes: int
    host: list[Tensor] = field(default_factory=list)        # what a released unit points at
    orig_device: list[torch.device] = field(default_factory=list)
    copied: list[bool] = field(default_factory=list)       # host is a copy of the original
    dev: list[Tensor] | None = None                        # device copies while loaded
    versions: list[int] = field(default_factory=list)      # tensor versions at load time
    event: Any = None                                      # CUDA event: copies finished
    waited: bool = False
    running: int = 0


def _tensors(module: nn.Module) -> list[Tensor]:
    seen: dict[int, Tensor] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        seen.setdefault(id(t), t)
    return list(seen.values())


def _nbytes(tensors: Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _find_units(model: nn.Module, unit: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of every unit: the children of the block containers, or the leaf modules."""
    if unit == "leaf":
        return [(n, m) for n, m in model.named_modules()
                if n and not any(True for _ in m.children()) and any(True for _ in m.parameters(recurse=False))]
    if unit != "block":
        raise ConfigError(f"offload unit {unit!r} is unknown: use 'block' or 'leaf'")
    names = getattr(model, "shard_unit", None)
    if names:
        containers = [(n, getattr(model, n)) for n in names]
    else:  # every outermost ModuleList
        containers, taken = [], []
        for n, m in model.named_modules():
            if isinstance(m, nn.ModuleList) and not any(n.startswith(t + ".") or t == "" for t in taken):
                containers.append((n, m))
                taken.append(n)
    units = [(f"{cn}.{k}" if cn else k, child) for cn, c in containers for k, child in c.named_children()]
    if not units:
        raise ConfigError(f"{type(model).__name__} has no block containers (no shard_unit, no ModuleList): "
                          f"use unit='leaf'")
    return units


def _outside_tensor_ids(model: nn.Module, units: list[tuple[str, nn.Module]]) -> set[int]:
    """Ids of the tensors that modules outside every unit hold directly (tied weights show up here)."""
    inside = {id(m) for _, u in units for m in u.modules()}
    return {id(t) for m in model.modules() if id(m) not in inside
            for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))}


# --------------------------------------------------------------------------------------------
# The offloader
# --------------------------------------------------------------------------------------------

_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, AutoOffload]" = weakref.WeakKeyDictionary()


# Copies made while the caller is in inference mode would be inference tensors, which a later
# in-place update outside it (or a version check) cannot use: make ours ordinary tensors.
_normal_tensors = torch.inference_mode(False)


class AutoOffload:
    """Stream a model's units between host and device in their traced order (see module doc).

    ``window_size`` streamed units are on the device at most (plus the ``resident`` ones); a
    unit running nested inside another beyond that is the only exception (counted as overflow).
    """

    def __init__(self, model: nn.Module, window_size: int = 2, pin_memory: bool = True, enabled: bool = True,
                 unit: Unit = "block", max_device_bytes: int | None = None, resident: Sequence[str] = (),
                 device: str | torch.device | None = None) -> None:
        _check_window(window_size)
        _check_budget(max_device_bytes)
        if model in _ATTACHED:
            raise ConfigError(f"{type(model).__name__} already has an AutoOffload attached: call .detach() on it first")
        self.model = model
        self.enabled = enabled
        self.unit = unit
        self.device = resolve_device(device)
        self.cuda = self.device.type == "cuda"
        self.pin = bool(pin_memory and self.cuda)
        self.observer: Callable[[str, str], None] | None = None  # (event, unit name): load/release/run
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._moved: list[tuple[Tensor, torch.device]] = []       # trunk/resident tensors moved to device
        self._units: list[_Unit] = []
        self._loaded: dict[int, _Unit] = {}                       # insertion order = load order
        self._trace: list[int] = []
        self._observed: list[int] = []
        self._cursor = 0
        self._mode = "idle"                                       # idle | trace | follow | diverged
        self._depth = 0
        self._stream = None
        self._counts = dict(passes=0, traces=0, retraces=0, loads=0, releases=0, writebacks=0,
                            bytes_loaded=0, unscoped_calls=0, overflows=0)
        self._pass_bytes = 0
        self._last_pass_bytes = 0
        self._peak_units = 0
        self._peak_loaded_bytes = 0
        self.resident_names: list[str] = []
        self.skipped_meta: list[str] = []
        self.trunk_bytes = 0
        self.resident_bytes = 0
        self.window_size = window_size
        if not enabled:
            return
        self._setup(resident, max_device_bytes)
        _ATTACHED[model] = self

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_spec(cls, model: nn.Module, spec: OffloadSpec) -> "AutoOffload":
        """An offloader configured by an ``OffloadSpec`` (what stage actors receive)."""
        return cls(model, window_size=spec.window_size, pin_memory=spec.pin_memory, enabled=spec.enabled,
                   unit=spec.unit, max_device_bytes=spec.max_device_bytes, resident=spec.resident,
                   device=spec.device)

    @_normal_tensors
    def _setup(self, resident: Sequence[str], max_device_bytes: int | None) -> None:
        found = _find_units(self.model, self.unit)
        all_names = {n for n, _ in found}
        # A tensor shared by two units (or a unit and the trunk) cannot move with one of them.
        owners: dict[int, int] = {}
        for _, m in found:
            for t in _tensors(m):
                owners[id(t)] = owners.get(id(t), 0) + 1
        shared = {i for i, k in owners.items() if k > 1} | (set(owners) & _outside_tensor_ids(self.model, found))
        real: list[tuple[str, nn.Module, list[Tensor]]] = []
        for name, m in found:
            ts = [t for t in _tensors(m) if id(t) not in shared]
            if any(t.is_meta for t in ts):
                self.skipped_meta.append(name)
            elif ts:
                real.append((name, m, ts))
        real_names = [n for n, _, _ in real]
        wanted: set[str] = set()
        for r in resident:
            if r in ALIASES:
                if real_names:
                    wanted.add(real_names[0] if r == "first" else real_names[-1])
            elif r not in all_names:
                example = ", ".join(sorted(all_names)[:3])
                raise ConfigError(f"offload resident unit {r!r} does not exist in {type(self.model).__name__} "
                                  f"(unit={self.unit!r}): use names like {example}, or 'first' / 'last'")
            elif r in real_names:
                wanted.add(r)
        streamed = [(n, m, ts) for n, m, ts in real if n not in wanted]
        self.resident_names = [n for n in real_names if n in wanted]
        unit_tensor_ids = {id(t) for _, _, ts in streamed for t in ts}
        on_device = [t for t in _tensors(self.model) if id(t) not in unit_tensor_ids and not t.is_meta]
        resident_ids = {id(t) for n, _, ts in real if n in wanted for t in ts}
        self.resident_bytes = _nbytes([t for t in on_device if id(t) in resident_ids])
        self.trunk_bytes = _nbytes(on_device) - self.resident_bytes
        self._units = [_Unit(i, n, m, ts, _nbytes(ts)) for i, (n, m, ts) in enumerate(streamed)]
        if max_device_bytes is not None:
            self.window_size = self._fit_window(max_device_bytes)
        # Every check passed: only now touch the model.
        for t in on_device:
            if t.device != self.device:
                self._moved.append((t, t.device))
                t.data = t.data.to(self.device)
        for u in self._units:
            self._make_host(u)
        if self.cuda:
            self._stream = torch.cuda.Stream(self.device)
        for u in self._units:
            # Ours run first before the unit (other hooks see device weights) and last after it.
            self._hooks.append(u.module.register_forward_pre_hook(lambda m, a, u=u: self._before(u), prepend=True))
            self._hooks.append(u.module.register_forward_hook(lambda m, a, o, u=u: self._after(u), always_call=True))
        self._hooks.append(self.model.register_forward_pre_hook(lambda m, a: self._begin(), prepend=True))
        # always_call: a forward that raises still ends the pass (as aborted: the trace is kept).
        self._hooks.append(self.model.register_forward_hook(
            lambda m, a, o: self._end(aborted=o is None and sys.exc_info()[1] is not None), always_call=True))

    def _fit_window(self, budget: int) -> int:
        """The largest window whose worst case (the biggest units) fits in ``budget`` bytes."""
        fixed = self.trunk_bytes + self.resident_bytes
        sizes = sorted((u.nbytes for u in self._units), reverse=True)
        if not sizes:
            return self.window_size
        if fixed + sizes[0] > budget:
            big = max(self._units, key=lambda u: u.nbytes)
            raise ConfigError(f"offload max_device_bytes={budget} is smaller than the trunk and resident units "
                              f"({fixed} bytes) plus the largest unit {big.name} ({big.nbytes} bytes): "
                              f"raise it to at least {fixed + big.nbytes} or pin fewer units resident")
        window, total = 0, fixed
        for s in sizes:
            if total + s > budget:
                break
            total += s
            window += 1
        return window

    @_normal_tensors
    def _make_host(self, u: _Unit) -> None:
        """Give every tensor of ``u`` a host copy (pinned on CUDA) and point the tensor at it."""
        for t in u.tensors:
            orig = t.data
            u.orig_device.append(orig.device)
            host, copied = orig, False
            if orig.device.type != "cpu":
                host, copied = orig.to("cpu"), True
            if self.pin and not host.is_pinned():
                host, copied = host.pin_memory(), True
            u.host.append(host)
            u.copied.append(copied)
            t.data = host

    # -- passes -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def forward_pass(self) -> Iterator["AutoOffload"]:
        """Mark one pass for callers that do not go through ``model.forward`` (e.g. ``run_blocks``)."""
        self._begin()
        ok = False
        try:
            yield self
            ok = True
        finally:
            self._end(aborted=not ok)

    def _begin(self) -> None:
        self._depth += 1
        if self._depth > 1:
            return
        self._observed, self._cursor = [], 0
        self._mode = "follow" if self._trace else "trace"
        if self._mode == "follow":
            self._drop_unwanted()
            self._fill_window()

    def _end(self, aborted: bool) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        mode, self._mode = self._mode, "idle"
        if aborted:  # keep the old trace; the pass did not finish
            self._release_idle()
            return
        if mode == "trace":
            self._trace = list(self._observed)
            self._counts["traces"] += 1
        elif mode == "diverged" or self._cursor != len(self._trace):
            self._trace = list(self._observed)
            self._counts["retraces"] += 1
        self._counts["passes"] += 1
        self._last_pass_bytes, self._pass_bytes = self._pass_bytes, 0  # head prefetch counts to the next pass
        # Prefetch the head of the next pass while the caller does its own work.
        self._cursor = 0
        self._drop_unwanted()
        self._fill_window()

    # -- hooks ------------------------------------------------------------------------------

    def _before(self, u: _Unit) -> None:
        if self._depth == 0:
            self._counts["unscoped_calls"] += 1
        else:
            self._observed.append(u.index)
            if self._mode == "follow":
                if self._cursor < len(self._trace) and self._trace[self._cursor] == u.index:
                    self._cursor += 1
                else:  # the order changed: stream on demand for the rest of this pass, retrace at its end
                    self._mode = "diverged"
                    self._release_idle(keep=u)
        if u.dev is None:
            self._make_room(u)
            self._load(u)
        self._wait(u)
        u.running += 1
        if self.observer:
            self.observer("run", u.name)
        if self._mode == "follow":
            self._fill_window()

    def _after(self, u: _Unit) -> None:
        u.running = max(0, u.running - 1)
        if u.running:
            return
        if self._mode == "follow":
            if u.index not in self._wanted():
                self._release(u)
            self._fill_window()
        else:
            self._release(u)

    # -- window bookkeeping -----------------------------------------------------------------

    def _wanted(self) -> list[int]:
        """The next ``window_size`` distinct units from the cursor on (wrapping into the next pass)."""
        out: list[int] = []
        n = len(self._trace)
        for k in range(n):
            i = self._trace[(self._cursor + k) % n]
            if i not in out:
                out.append(i)
                if len(out) == self.window_size:
                    break
        return out

    def _fill_window(self) -> None:
        for i in self._wanted():
            if len(self._loaded) >= self.window_size:
                break
            if self._units[i].dev is None:
                self._load(self._units[i])

    def _drop_unwanted(self) -> None:
        keep = set(self._wanted())
        for u in list(self._loaded.values()):
            if not u.running and u.index not in keep:
                self._release(u)

    def _make_room(self, u: _Unit) -> None:
        """Release idle units (least wanted first) so that ``u`` fits in the window."""
        if len(self._loaded) < self.window_size:
            return
        wanted = self._wanted() if self._mode == "follow" else []
        rank = {i: k for k, i in enumerate(wanted)}
        idle = sorted((v for v in self._loaded.values() if not v.running and v is not u),
                      key=lambda v: -rank.get(v.index, len(wanted)))
        for v in idle:
            if len(self._loaded) < self.window_size:
                return
            self._release(v)
        if len(self._loaded) >= self.window_size:
            self._counts["overflows"] += 1

    def _release_idle(self, keep: _Unit | None = None) -> None:
        for v in list(self._loaded.values()):
            if not v.running and v is not keep:
                self._release(v)

    # -- moving weights ---------------------------------------------------------------------

    @_normal_tensors
    def _load(self, u: _Unit) -> None:
        """Start copying ``u`` to the device (a side stream on CUDA) and point its tensors there."""
        if self.cuda:
            with torch.cuda.stream(self._stream):
                dev = [h.to(self.device, non_blocking=True) for h in u.host]
                u.event = torch.cuda.Event()
                u.event.record(self._stream)
        else:
            dev = [h.clone() for h in u.host]  # a real, separate allocation stands in for the device
        for t, d in zip(u.tensors, dev):
            t.data = d
        u.dev, u.waited = dev, False
        u.versions = [t._version for t in u.tensors]
        self._loaded[u.index] = u
        self._counts["loads"] += 1
        self._counts["bytes_loaded"] += u.nbytes
        self._pass_bytes += u.nbytes
        self._peak_units = max(self._peak_units, len(self._loaded))
        self._peak_loaded_bytes = max(self._peak_loaded_bytes, self.device_unit_bytes)
        if self.observer:
            self.observer("load", u.name)

    def _wait(self, u: _Unit) -> None:
        """Make the compute stream wait for ``u``'s copies, and tell the allocator it uses them."""
        if not self.cuda or u.waited:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(u.event)
        for d in u.dev:
            d.record_stream(compute)
        u.waited = True

    @_normal_tensors
    def _release(self, u: _Unit) -> None:
        """Point ``u`` back at its host copy; copy back only tensors changed on the device."""
        if u.dev is None:
            return
        if self.cuda and not u.waited:  # prefetched but never used: finish the copy before freeing
            torch.cuda.current_stream(self.device).wait_event(u.event)
            for d in u.dev:
                d.record_stream(torch.cuda.current_stream(self.device))
        for t, h, d, v in zip(u.tensors, u.host, u.dev, u.versions):
            if t._version != v:
                h.copy_(d)
                self._counts["writebacks"] += 1
            t.data = h
        u.dev, u.event, u.versions, u.waited = None, None, [], False
        del self._loaded[u.index]
        self._counts["releases"] += 1
        if self.observer:
            self.observer("release", u.name)

    # -- inspection and teardown ------------------------------------------------------------

    @property
    def trace(self) -> list[str]:
        """Names of the streamed units in the order the last traced pass ran them."""
        return [self._units[i].name for i in self._trace]

    @property
    def device_units(self) -> list[str]:
        """Names of the streamed units that hold device copies right now."""
        return [u.name for u in self._loaded.values()]

    @property
    def device_unit_bytes(self) -> int:
        return sum(u.nbytes for u in self._loaded.values())

    def stats(self) -> dict[str, Any]:
        """Counters and sizes for benchmarks and logs (bytes are weight bytes, not activations)."""
        unit_bytes = sum(u.nbytes for u in self._units)
        return {
            "enabled": self.enabled, "device": str(self.device), "unit": self.unit, "pinned": self.pin,
            "window_size": self.window_size, "streamed_units": len(self._units),
            "resident_units": list(self.resident_names), "skipped_meta_units": len(self.skipped_meta),
            "trace_len": len(self._trace), **self._counts,
            "last_pass_bytes_loaded": self._last_pass_bytes,
            "units_on_device": len(self._loaded), "peak_units_on_device": self._peak_units,
            "streamed_unit_bytes": unit_bytes, "trunk_bytes": self.trunk_bytes,
            "resident_bytes": self.resident_bytes, "device_unit_bytes": self.device_unit_bytes,
            "peak_device_bytes": self.trunk_bytes + self.resident_bytes + self._peak_loaded_bytes,
        }

    @_normal_tensors
    def detach(self) -> None:
        """Remove every hook and put every tensor back on the device it started on."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for u in list(self._loaded.values()):
            u.running = 0
            self._release(u)
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        for u in self._units:
            for t, h, dev, copied in zip(u.tensors, u.host, u.orig_device, u.copied):
                if copied:  # a pinned or host copy we made: give back pageable memory / the original device
                    t.data = h.to(dev) if dev.type != "cpu" else torch.empty_like(h, pin_memory=False).copy_(h)
            u.host, u.copied, u.orig_device = [], [], []
        for t, dev in self._moved:
            t.data = t.data.to(dev)
        self._moved.clear()
        self._units, self._trace, self._observed = [], [], []
        self._stream = None
        self._mode, self._depth = "idle", 0
        _ATTACHED.pop(self.model, None)

    def __enter__(self) -> "AutoOffload":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()
