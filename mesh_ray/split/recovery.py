"""Stage restart and step retry for a split: a step whose stage died is computed again, exactly.

Every sampler step is a pure function of its inputs, so a step lost with a stage is recomputed
from what the caller still holds: the input state of the chain, the step's conditioning and the
generation's constants (ObjectRefs the caller owns; a new actor fetches them on its first step).

    ref = split.submit_chain(chain, state, cond, gen)     # remembered here
    wire = recovery.wait(ref, chain[-1], "a forward step") # the result, retried through restarts

When a stage dies (killed, crashed, its node left), Ray starts it again (``max_restarts``); the
new actor has no weights, so ``recover`` waits for it (``start_timeout_s`` for the whole
recovery), loads its shard again (file, node cache or shipped, as at start) and re-plans the links
when it moved to another node.  A chain with Ray Direct Transport links also recovers from a failed
transfer (its peer died, or it ran past ``transfer_timeout_s``): the collective groups are made
again, since a restarted stage cannot rejoin the old ones.  Then the step is sent again, up to
``max_step_retries`` times.  A stage that cannot come back ends in one ``StageError`` naming it,
what was tried and the fix.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import ray
from ray.exceptions import (ActorUnavailableError, GetTimeoutError, ObjectLostError, RayActorError,
                            RayDirectTransportError, RayTaskError)

from mesh_ray.cluster import metrics
from mesh_ray.actors.stage import NotLoadedError
from mesh_ray.cluster.resources import explain_unschedulable
from mesh_ray.errors import MeshError, StageError
from mesh_ray.cluster.ray_errors import error_cause

log = logging.getLogger("mesh_ray.split.recovery")

POLL_S = 0.2  # how often a restarting stage is asked whether it is back
# Where a failed direct transfer shows in a task's error: Ray's RDT modules and gloo's own messages.
TRANSPORT_MARKS = ("ray/experimental/rdt/", "ray/util/collective/", "RDT object store", "Connection closed by peer",
                   "Timed out waiting")


def stage_lost(e: BaseException) -> bool:
    """True when a step failed because a stage's worker died (or came back without its weights)."""
    cause = error_cause(e) if isinstance(e, RayTaskError) else e
    return isinstance(cause, (RayActorError, ObjectLostError, NotLoadedError))


def transfer_lost(e: BaseException) -> bool:
    """True when a step failed in Ray Direct Transport rather than in a stage's own code: a transfer
    whose peer died or that timed out fails inside Ray (the receiving task's arguments, a send or
    receive task), never as one of mesh-ray's errors."""
    cause = error_cause(e) if isinstance(e, RayTaskError) else e
    if isinstance(cause, (RayActorError, ObjectLostError, RayDirectTransportError)):
        return True
    return isinstance(e, RayTaskError) and not isinstance(cause, MeshError) and _in_transport(e)


def _in_transport(e: RayTaskError) -> bool:
    """Whether the task failed in Ray's RDT machinery (its traceback names it), not in a stage's method body."""
    text = str(e)
    return any(mark in text for mark in TRANSPORT_MARKS)


class Recoverable(Protocol):
    """What recovery needs of a split (``StageGroup`` is one): its options, one-line errors, and the
    calls that wait on, reload (blocks, then weight patches) and re-plan its stages and submit a chain."""

    options: Any

    def stage_error(self, e: BaseException, seg: Any, timeout: float, doing: str) -> Exception: ...
    def stage_get(self, ref: Any, seg: Any, timeout: float, doing: str) -> Any: ...
    def load_stage(self, seg: Any) -> Any: ...
    def restore_patches(self, seg: Any, timeout: float) -> None: ...
    def note_stage(self, seg: Any, info: dict) -> bool: ...
    def plan_links(self) -> None: ...
    def restore_links(self, version: int) -> None: ...
    def links_version(self) -> int: ...
    def num_gpus(self, spec: Any) -> float: ...
    def submit_chain(self, chain: list, state: Any, cond: Any, gen: Any, remember: bool = True) -> Any: ...


@dataclass
class ChainCall:
    """What a submitted chain needs to be sent again: the stages and the inputs the caller holds."""

    chain: list
    state: Any
    cond: Any
    gen: Any
    version: int = 0  # the links (collective groups) it was sent under
    direct: bool = False  # some link of it uses Ray Direct Transport


class Recovery:
    """Restarts and retries for one SplitModel (its ``submit_chain`` / ``collect`` use it)."""

    def __init__(self, split: Recoverable):
        self.split = split
        self.calls: dict[Any, ChainCall] = {}  # chain result ref -> its inputs, until collected
        self.restarts = 0
        self.retries = 0

    def remember(self, ref: Any, call: ChainCall) -> None:
        self.calls[ref] = call

    def forget(self) -> None:
        self.calls.clear()

    def wait(self, ref: Any, seg: Any, doing: str) -> Any:
        """The WireState behind ``ref`` (each wait bounded by ``step_timeout_s``); when a stage of its
        chain died, the chain is recovered and sent again (``max_step_retries`` times)."""
        opts = self.split.options
        call = self.calls.pop(ref, None)
        tries = 0
        while True:
            try:
                return ray.get(ref, timeout=opts.step_timeout_s)
            except Exception as e:  # noqa: BLE001 - sorted below; nothing is swallowed
                lost = stage_lost(e) or (call is not None and call.direct and transfer_lost(e))
                if call is None or not lost:
                    raise self.split.stage_error(e, seg, opts.step_timeout_s, doing) from None
                if tries >= opts.max_step_retries:
                    raise StageError(
                        f"{doing} through stages {_names(call.chain)} failed {tries + 1} times because a stage died "
                        f"or a transfer failed each time ({type(error_cause(e)).__name__}); max_step_retries="
                        f"{opts.max_step_retries} is spent: check the workers' logs (out of memory?) or raise "
                        f"max_step_retries") from None
                self.recover(call.chain, e)
                if call.direct:
                    self.split.restore_links(call.version)
                tries += 1
                self.retries += 1
                metrics.retry("stage_step")
                log.warning("%s: sending the step again through %s (retry %d of %d)", doing, _names(call.chain),
                            tries, opts.max_step_retries)
                ref = self.split.submit_chain(call.chain, call.state, call.cond, call.gen, remember=False)
                call = ChainCall(call.chain, call.state, call.cond, call.gen, self.split.links_version(), call.direct)

    def recover(self, chain: list, cause: BaseException | None = None) -> None:
        """Wait until every stage of ``chain`` answers again and reload the ones that restarted,
        all within ``start_timeout_s``; re-plan the links when a stage moved to another node."""
        split = self.split
        deadline = time.monotonic() + split.options.start_timeout_s
        moved = False
        for seg in chain:
            info = self._answer(seg, deadline)
            if info["loaded"]:
                continue
            self.restarts += 1
            metrics.restart("stage")
            log.warning("stage %d (%s) was restarted on node %s: loading its blocks again", seg.index, seg.range,
                        info["node_id"][:8])
            left = max(1.0, deadline - time.monotonic())
            info = split.stage_get(split.load_stage(seg), seg, left, "reloading its blocks after a restart")
            split.restore_patches(seg, max(1.0, deadline - time.monotonic()))  # its LoRA, before the retried step
            moved |= split.note_stage(seg, info)
        if moved:
            split.plan_links()

    def _answer(self, seg: Any, deadline: float) -> dict:
        """The stage's info once it answers; a StageError when it is gone for good or not back in time."""
        split = self.split
        timeout = split.options.start_timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                return ray.get(seg.actor.info.remote(), timeout=max(0.1, min(left, 5.0)))
            except (ActorUnavailableError, GetTimeoutError):
                pass  # restarting, or waiting for a node with room
            except RayActorError as e:
                raise StageError(
                    f"stage {seg.index} ({seg.range}) died and cannot come back ({type(e).__name__}): Ray restarts a "
                    f"stage at most max_restarts={split.options.max_restarts} times (this split restarted stages "
                    f"{self.restarts} times and sent {self.retries} steps again so far): raise max_restarts, or "
                    f"create the split again with mesh.split(...)") from None
            if time.monotonic() >= deadline:
                need = {"CPU": seg.spec.num_cpus, "GPU": split.num_gpus(seg.spec)}
                raise StageError(
                    f"stage {seg.index} ({seg.range}) died and was not back within start_timeout_s={timeout:g}: "
                    f"{explain_unschedulable(need, 'its restart')}") from None
            time.sleep(POLL_S)


def _names(chain: list) -> str:
    return ", ".join(str(s.index) for s in chain)


__all__ = ["ChainCall", "Recoverable", "Recovery", "stage_lost"]
