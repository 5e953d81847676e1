"""MeshSplitFlux's split plans: ``n_blocks_remote`` or a ``stages`` string, as mesh-ray StageSpecs.

A plan string lists block ranges in order, separated by ``;``, ``,`` or new lines; each range is
one remote stage unless followed by ``local`` (it then runs in the ComfyUI process), and
``@HOST`` pins a stage to a node (IP or node id).  Blocks before the first range run in ComfyUI.
Example: ``double:10-18; single:0-18; single:19-37 @10.0.0.7``.
"""

from __future__ import annotations

import re

from mesh_ray.config import StageSpec
from mesh_ray.errors import ConfigError
from mesh_ray.models.blocks import BlockRange, check_cover, parse_range

_ENTRY = re.compile(r"^(?P<range>[^@]+?)(?:\s+(?P<local>local))?\s*(?:@\s*(?P<node>\S+))?$")


def plan_stages(depth: int, num_single: int, n_blocks_remote: int = 0, stages: str = "") -> list[StageSpec]:
    """Stage specs covering every block once (local front first), or a one-line ConfigError."""
    n = depth + num_single
    if stages.strip():
        specs = _parse(stages, depth, num_single)
    elif n_blocks_remote:
        if not 1 <= n_blocks_remote <= n:
            raise ConfigError(f"n_blocks_remote={n_blocks_remote} but the model has {n} blocks: use 1 to {n}")
        specs = [StageSpec(blocks=f"{n - n_blocks_remote}-{n - 1}")]
    else:
        raise ConfigError("nothing to split: set n_blocks_remote (1 or more) or a stages plan such as single:0-37")
    first = parse_range(specs[0].blocks, depth, num_single)
    if first.start > 0:  # the front stays in ComfyUI
        specs.insert(0, StageSpec(blocks=f"0-{first.start - 1}", local=True))
    check_cover([parse_range(s.blocks, depth, num_single, f"stage {i} block range") for i, s in enumerate(specs)])
    return specs


def _parse(text: str, depth: int, num_single: int) -> list[StageSpec]:
    specs = []
    for i, raw in enumerate(e.strip() for e in re.split(r"[;,\n]", text)):
        if not raw:
            continue
        m = _ENTRY.match(raw)
        if not m:
            raise ConfigError(f"stages entry {raw!r} is not 'RANGE [local] [@node]': write e.g. single:0-18 or "
                              f"double:0-9 local")
        blocks = m["range"].replace(" ", "")
        if "-" not in blocks:  # one block: single:3 means single:3-3
            blocks = f"{blocks}-{blocks.rpartition(':')[2]}"
        parse_range(blocks, depth, num_single, f"stages entry {i}")
        specs.append(StageSpec(blocks=blocks, local=bool(m["local"]), node=m["node"]))
    if not specs:
        raise ConfigError("the stages plan is empty: write block ranges such as double:10-18; single:0-37")
    return specs


def remote_ranges(specs: list[StageSpec], depth: int, num_single: int) -> list[BlockRange]:
    """The block ranges a plan runs on stage actors."""
    return [parse_range(s.blocks, depth, num_single) for s in specs if not s.local]


def describe(specs: list[StageSpec]) -> str:
    """The plan in one line, as the status light shows it."""
    return "; ".join(f"{s.blocks}{' local' if s.local else ''}{f' @{s.node}' if s.node else ''}" for s in specs)
