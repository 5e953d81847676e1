"""Memory soak: run one thing many times and sample a process's memory as it goes, to tell a leak
(growth that goes on) from allocator noise (growth that stops).

What is sampled, per point: the caller's figures (RSS of processes, the object store's used bytes)
and, for this process, the bytes glibc's malloc has handed out and not got back (``malloc_in_use``):
growth there is memory the program holds (Python objects, Ray's C++ core worker, torch's CPU
tensors); RSS growth beyond it is the allocator's free pool, thread stacks or mappings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any, Callable

import psutil


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):  # not glibc >= 2.33
        return None


_LIBC = _libc()


def malloc_in_use() -> int | None:
    """Bytes this process's malloc has handed out now (glibc ``mallinfo2``: in-use chunks plus
    mmapped ones), over all arenas; None where glibc's mallinfo2 is missing."""
    if _LIBC is None:
        return None
    m = _LIBC.mallinfo2()
    return int(m.uordblks + m.hblkhd)


def rss(pid: int | None = None) -> int:
    """Resident set size of ``pid`` (default: this process) in bytes."""
    return psutil.Process(pid or os.getpid()).memory_info().rss


def growth_pct(before: float | None, after: float | None) -> float | None:
    """(after - before) / before in percent, two decimals; None when either is unknown."""
    if not before or after is None:
        return None
    return round((after - before) / before * 100, 2)


def soak(step: Callable[[int], Any], n: int, sample: Callable[[], dict], warm: int, points: int = 10) -> list[dict]:
    """Run ``step(k)`` ``warm`` times, then ``n`` times, sampling after the warm-up and at ``points``
    even marks after it: ``[{"done": steps after warm-up, **sample(), "malloc_in_use": ...}]``.

    One sample is taken and thrown away before the warm-up ends, so the first call of a sampler
    (imports, a gRPC channel) is not counted as growth.
    """
    for k in range(warm):
        step(k)
    sample()
    marks = sorted({max(1, round(n * i / points)) for i in range(1, points + 1)})
    rows = [{"done": 0, **sample(), "malloc_in_use": malloc_in_use()}]
    for k in range(n):
        step(warm + k)
        if k + 1 in marks:
            rows.append({"done": k + 1, **sample(), "malloc_in_use": malloc_in_use()})
    return rows


def trend(rows: list[dict], key: str) -> dict:
    """Growth of ``rows[*][key]`` (a number, or a list of numbers per process): from after the warm-up
    to the end (``growth_pct``), over the first and the second half of the soak (a leak grows in both,
    allocator noise that settles grows in the first only), and the series itself."""
    mid = min(rows, key=lambda r: abs(r["done"] - rows[-1]["done"] / 2))
    first, last = rows[0][key], rows[-1][key]

    def pct(a: Any, b: Any) -> Any:
        if isinstance(a, list):
            return [growth_pct(x, y) for x, y in zip(a, b)]
        return growth_pct(a, b)

    return {"growth_pct": pct(first, last), "first_half_pct": pct(first, mid[key]),
            "second_half_pct": pct(mid[key], last), "series": [r[key] for r in rows]}


def change(rows: list[dict], key: str) -> int | None:
    """``rows[-1][key] - rows[0][key]`` (bytes), None when either is unknown."""
    a, b = rows[0].get(key), rows[-1].get(key)
    return None if a is None or b is None else int(b - a)


__all__ = ["change", "growth_pct", "malloc_in_use", "rss", "soak", "trend"]
