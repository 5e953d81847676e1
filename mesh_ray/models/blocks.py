"""Block ranges: the sharding unit of a FLUX transformer, written as text people can read.

Internally a range is a half-open interval of global block indices (double blocks first, then
single blocks).  As text it is inclusive, in the model's own numbering:
``double:0-9``, ``single:20-23``, ``double:10-single:5`` (across the boundary) or ``all``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mesh_ray.errors import ConfigError

KINDS = ("double", "single")  # block kinds in global order; the model's shard unit is "<kind>_blocks"
_PART = r"(?:(double|single):)?(\d+)"


def locate(b: int, depth: int) -> tuple[str, int]:
    """Global block index -> (kind, index within its kind): double blocks first, then single."""
    return ("double", b) if b < depth else ("single", b - depth)


def global_index(kind: str, i: int, depth: int) -> int:
    """(kind, index within its kind) -> global block index (the inverse of ``locate``)."""
    return i + depth if kind == "single" else i
_RANGE = re.compile(rf"^\s*{_PART}\s*-\s*{_PART}\s*$")


@dataclass(frozen=True)
class BlockRange:
    """Global blocks ``start <= b < stop`` of a model with ``depth`` double blocks."""

    start: int
    stop: int
    depth: int
    num_blocks: int

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def label(self, b: int) -> str:
        return "{}:{}".format(*locate(b, self.depth))

    def __str__(self) -> str:
        first, last = self.label(self.start), self.label(self.stop - 1)
        kind_a, a = first.split(":")
        kind_b, b = last.split(":")
        return f"{kind_a}:{a}-{b}" if kind_a == kind_b else f"{first}-{last}"

    def keys_prefixes(self) -> list[str]:
        """State-dict prefixes of the blocks in this range."""
        return ["{}_blocks.{}.".format(*locate(b, self.depth)) for b in self]


def parse_range(text: str, depth: int, num_single: int, where: str = "block range") -> BlockRange:
    """Parse ``double:A-B`` / ``single:A-B`` / ``A-B`` (global) / ``double:A-single:B`` / ``all``."""
    n = depth + num_single
    if text.strip() == "all":
        return BlockRange(0, n, depth, n)
    m = _RANGE.match(text)
    if not m:
        raise ConfigError(f"{where} {text!r} is not a block range: write e.g. double:0-9, single:0-23, "
                          f"double:10-single:5 or 0-{n - 1}")
    kind_a, a, kind_b, b = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
    kind_b = kind_b or kind_a

    def to_global(kind: str | None, i: int) -> int:
        limit = {"double": depth, "single": num_single, None: n}[kind]
        if i >= limit:
            noun = {"double": "double", "single": "single", None: "blocks in all"}[kind]
            last = f"{kind}:{a}-{limit - 1}" if kind else f"{a}-{limit - 1}"
            raise ConfigError(f"{where} {text} runs past the model ({limit} {noun} blocks): use {last}")
        return global_index(kind, i, depth) if kind else i

    start, last = to_global(kind_a, a), to_global(kind_b, b)
    if last < start:
        raise ConfigError(f"{where} {text} ends before it starts: write the lower block first")
    return BlockRange(start, last + 1, depth, n)


def check_cover(ranges: list[BlockRange], what: str = "stage") -> None:
    """Ranges in order must cover every block exactly once: no overlap, no gap, no overrun."""
    if not ranges:
        raise ConfigError(f"no {what}s given: give at least one block range")
    n = ranges[0].num_blocks
    expected = 0
    for i, r in enumerate(ranges):
        if r.start < expected:
            raise ConfigError(f"{what} {i} block range {r} overlaps {what} {i - 1} (which ends at "
                              f"{r.label(expected - 1)}): start it at {r.label(expected)}")
        if r.start > expected:
            raise ConfigError(f"{what} {i} block range {r} leaves a gap: blocks {r.label(expected)} to "
                              f"{r.label(r.start - 1)} are not assigned; start it at {r.label(expected)}")
        expected = r.stop
    if expected != n:
        raise ConfigError(f"the {what}s stop at {ranges[-1].label(expected - 1)} but the model has {n} blocks: "
                          f"extend the last range to {ranges[-1].label(n - 1)}")


def split_evenly(depth: int, num_single: int, parts: int) -> list[BlockRange]:
    """``parts`` contiguous ranges of near-equal block count (a default for ``stages=N``)."""
    n = depth + num_single
    if not 1 <= parts <= n:
        raise ConfigError(f"cannot split {n} blocks into {parts} stages: use 1 to {n} stages")
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [BlockRange(bounds[i], bounds[i + 1], depth, n) for i in range(parts)]
