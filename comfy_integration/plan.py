"""Mesh Split Model's plans: ``n_blocks_remote`` or a ``stages`` string, as mesh-ray StageSpecs.

A plan string lists block ranges in order, separated by ``;``, ``,`` or new lines; each range is
one remote stage unless followed by ``local`` (it then runs in the ComfyUI process), and
``@HOST`` pins a stage to a node (IP or node id).  Blocks before the first range run in ComfyUI.
Ranges are written in the model's own block lists: FLUX ``double:10-18; single:0-18`` (or
``double:10-single:5`` across the boundary), one-list models (LTX, Wan, Qwen-Image)
``blocks:0-23`` or ``0-23``; ``all`` is every block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mesh_ray.config import StageSpec
from mesh_ray.errors import ConfigError
from mesh_ray.models.blocks import BlockRange, check_cover, locate, parse_range

_ENTRY = re.compile(r"^(?P<range>[^@]+?)(?:\s+(?P<local>local))?\s*(?:@\s*(?P<node>\S+))?$")


class ListRange(BlockRange):
    """A block range of a model with one list of blocks, written ``blocks:A-B``."""

    def label(self, b: int) -> str:
        return f"blocks:{b}"

    def __str__(self) -> str:
        return f"blocks:{self.start}-{self.stop - 1}"


@dataclass(frozen=True)
class Layout:
    """A model's block lists and their lengths, in forward order: (kind, attribute, plan name, count)."""

    lists: tuple[tuple[str, str, str, int], ...]

    @property
    def total(self) -> int:
        return sum(n for *_, n in self.lists)

    @property
    def two_lists(self) -> bool:
        return len(self.lists) == 2

    def parse(self, text: str, where: str = "block range") -> BlockRange:
        """A range of this model, or a one-line ConfigError."""
        if self.two_lists:
            return parse_range(text, self.lists[0][3], self.lists[1][3], where)
        n = self.total
        body = text.strip()
        if body.startswith(("double:", "single:")) or "-double:" in body or "-single:" in body:
            raise ConfigError(f"{where} {text!r}: this model has one list of {n} blocks: write blocks:A-B or A-B "
                              f"(e.g. blocks:0-{n - 1})")
        r = parse_range(body.replace("blocks:", ""), n, 0, where)
        return ListRange(r.start, r.stop, r.depth, r.num_blocks)

    def range(self, start: int, stop: int) -> BlockRange:
        """Global blocks ``start <= b < stop`` as a range of this model."""
        if self.two_lists:
            return BlockRange(start, stop, self.lists[0][3], self.total)
        return ListRange(start, stop, self.total, self.total)

    def locate(self, b: int) -> tuple[str, str, int]:
        """Global block ``b`` -> (patch kind, attribute, index within its list)."""
        if self.two_lists:
            label, i = locate(b, self.lists[0][3])
            kind, attr, _, _ = self.lists[0] if label == "double" else self.lists[1]
            return kind, attr, i
        kind, attr, _, _ = self.lists[0]
        return kind, attr, b

    def prefixes(self, r: BlockRange) -> tuple[str, ...]:
        """State-dict prefixes (``double_blocks.3.``) of the blocks in ``r``."""
        return tuple(f"{attr}.{i}." for attr, i in (self.locate(b)[1:] for b in r))


def plan_stages(layout: Layout, n_blocks_remote: int = 0, stages: str = "") -> list[StageSpec]:
    """Stage specs covering every block once (local front first), or a one-line ConfigError."""
    n = layout.total
    if stages.strip():
        specs = _parse(stages, layout)
    elif n_blocks_remote:
        if not 1 <= n_blocks_remote <= n:
            raise ConfigError(f"n_blocks_remote={n_blocks_remote} but the model has {n} blocks: use 1 to {n}")
        specs = [StageSpec(blocks=str(layout.range(n - n_blocks_remote, n)))]
    else:
        raise ConfigError(f"nothing to split: set n_blocks_remote (1 to {n}) or a stages plan such as "
                          f"{layout.range(n // 2, n)}")
    first = layout.parse(specs[0].blocks)
    if first.start > 0:  # the front stays in ComfyUI
        specs.insert(0, StageSpec(blocks=str(layout.range(0, first.start)), local=True))
    check_cover([layout.parse(s.blocks, f"stage {i} block range") for i, s in enumerate(specs)])
    return specs


def _parse(text: str, layout: Layout) -> list[StageSpec]:
    specs = []
    for i, raw in enumerate(e.strip() for e in re.split(r"[;,\n]", text)):
        if not raw:
            continue
        m = _ENTRY.match(raw)
        if not m:
            raise ConfigError(f"stages entry {raw!r} is not 'RANGE [local] [@node]': write e.g. "
                              f"{layout.range(0, 1)} or {layout.range(0, 1)} local")
        blocks = m["range"].replace(" ", "")
        if "-" not in blocks and blocks != "all":  # one block: single:3 means single:3-3
            blocks = f"{blocks}-{blocks.rpartition(':')[2]}"
        r = layout.parse(blocks, f"stages entry {i}")
        specs.append(StageSpec(blocks=str(r), local=bool(m["local"]), node=m["node"]))
    if not specs:
        raise ConfigError(f"the stages plan is empty: write block ranges such as {layout.range(0, 1)}")
    return specs


def remote_ranges(specs: list[StageSpec], layout: Layout) -> list[BlockRange]:
    """The block ranges a plan runs on stage actors."""
    return [layout.parse(s.blocks) for s in specs if not s.local]


def describe(specs: list[StageSpec]) -> str:
    """The plan in one line, as the status light shows it."""
    return "; ".join(f"{s.blocks}{' local' if s.local else ''}{f' @{s.node}' if s.node else ''}" for s in specs)
