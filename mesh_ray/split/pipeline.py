"""Pipelined sampling of many images over a split: while stage 2 runs image i, stage 1 already runs image j.

Each image has its own sampler loop (``SamplerRun``); step s+1 of image i is submitted through the
split's one step-submission path (``SplitModel.submit_step``) as soon as step s of image i has
returned.  At most ``max_in_flight`` images are in flight, so memory stays flat.  Every image gets
exactly the arithmetic of ``generate`` run on it alone.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import ray
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from mesh_ray.config import validate
from mesh_ray.errors import ConfigError, StageError
from mesh_ray.split.sampler import SamplerRun


class ImageRequest(BaseModel):
    """One image to sample: the arguments of ``generate`` for it.

    Fields: txt (Tensor [B, L, context_in_dim], required); y (Tensor [B, vec_in_dim] | None, None);
    width / height (int, 1024); steps (int, 20); seed (int, 0); guidance (float, 3.5).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    txt: torch.Tensor
    y: torch.Tensor | None = None
    width: int = Field(default=1024, ge=16)
    height: int = Field(default=1024, ge=16)
    steps: int = Field(default=20, ge=1)
    seed: int = 0
    guidance: float = 3.5


@dataclass(frozen=True)
class ImageEvent:
    """Progress of one image: after ``step`` of ``steps`` (``done`` when it is the last), ``t_s`` after the start."""

    index: int
    step: int
    steps: int
    t_s: float
    done: bool = False
    cancelled: bool = False


@dataclass
class ManyResult:
    """What ``generate_many`` made: latents in request order (None where cancelled) and how it went."""

    latents: list[torch.Tensor | None]
    order: list[int]  # request indices in order of completion
    cancelled: list[int]
    events: list[ImageEvent] = field(default_factory=list)
    wall_s: float = 0.0
    max_in_flight: int = 1

    @property
    def images_per_s(self) -> float:
        return len(self.order) / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class _Active:
    index: int
    run: SamplerRun
    step: Any  # the split's Step in flight


Cancel = threading.Event | Callable[[int], bool] | None


def _is_cancelled(cancel: Cancel, index: int) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel(index))


def default_in_flight(split: Any) -> int:
    """Images in flight by default: one per stage plus one being finished by the caller."""
    return len(split.stages) + 1


@torch.inference_mode()
def generate_many(split: Any, requests: Sequence[ImageRequest | dict], *, max_in_flight: int | None = None,
                  progress: bool = True, callback: Callable[[ImageEvent], Any] | None = None, cancel: Cancel = None,
                  poll_s: float = 0.05) -> ManyResult:
    """Sample several images at once over ``split`` (a ``SplitModel``), overlapping them across its stages.

    ``requests``: ``ImageRequest``s or dicts of its fields.  ``max_in_flight`` (default: stages + 1)
    bounds the images whose steps are in flight.  ``callback(ImageEvent)`` runs after every step of
    every image; ``cancel`` (a ``threading.Event`` for all, or ``f(index) -> bool``) is checked
    before each image starts and after each of its steps: a cancelled image's latent is None.
    No wait is unbounded: a step that does not return within the split's ``step_timeout_s`` fails.
    """
    if not hasattr(split, "submit_step"):
        raise ConfigError(f"generate_many needs a split model from mesh.split(...), got {type(split).__name__}: "
                          f"use mesh_ray.generate for a single-process model")
    reqs = [validate(ImageRequest, r) for r in requests]
    limit = default_in_flight(split) if max_in_flight is None else max_in_flight
    if limit < 1:
        raise ConfigError(f"max_in_flight must be at least 1, got {limit}")
    timeout_s = split.options.step_timeout_s
    result = ManyResult([None] * len(reqs), [], [], max_in_flight=limit)
    queue, active = deque(range(len(reqs))), {}
    bar = tqdm(total=sum(r.steps for r in reqs), desc="sampling", unit="step", disable=not progress, leave=False)
    t0 = last = time.perf_counter()

    def report(ev: ImageEvent) -> None:
        result.events.append(ev)
        if callback is not None:
            callback(ev)

    def submit(a: _Active) -> None:
        a.step = split.submit_step(*a.run.inputs(), transformer_options=a.run.options)

    try:
        while queue or active:
            while queue and len(active) < limit:
                i = queue.popleft()
                if _is_cancelled(cancel, i):
                    result.cancelled.append(i)
                    report(ImageEvent(i, 0, reqs[i].steps, time.perf_counter() - t0, cancelled=True))
                    continue
                r = reqs[i]
                a = _Active(i, SamplerRun(split.config, split.device, split.dtype, r.txt, r.y, width=r.width,
                                          height=r.height, steps=r.steps, seed=r.seed, guidance=r.guidance), None)
                submit(a)
                active[i] = a
            if not active:
                continue
            waiting = {ref: i for i, a in active.items() for ref in a.step.pending()}
            ready: set = set()
            if waiting:
                got, _ = ray.wait(list(waiting), num_returns=1, timeout=poll_s)
                if not got:
                    if time.perf_counter() - last > timeout_s:
                        raise StageError(f"no image step returned within step_timeout_s={timeout_s:g}s with "
                                         f"{len(active)} images in flight: check the stages with `mesh-ray status`, "
                                         f"or raise step_timeout_s")
                    continue
                # Everything already done, not just the first, so that no finished image waits a round.
                ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
                ready = set(ready) | set(got)
            for i in [i for i, a in active.items() if all(ref in ready for ref in a.step.pending())]:
                a = active[i]
                pred, _stats = split.finish_step(a.step)
                a.run.advance(pred)
                last = time.perf_counter()
                bar.update(1)
                if a.run.done:
                    result.latents[i] = a.run.latent()
                    result.order.append(i)
                    del active[i]
                    report(ImageEvent(i, a.run.step, a.run.steps, last - t0, done=True))
                elif _is_cancelled(cancel, i):
                    result.cancelled.append(i)
                    del active[i]
                    report(ImageEvent(i, a.run.step, a.run.steps, last - t0, cancelled=True))
                else:
                    submit(a)
                    report(ImageEvent(i, a.run.step, a.run.steps, last - t0))
    finally:
        bar.close()
    result.wall_s = time.perf_counter() - t0
    return result


__all__ = ["ImageEvent", "ImageRequest", "ManyResult", "default_in_flight", "generate_many"]
