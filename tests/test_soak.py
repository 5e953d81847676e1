"""The leak soak's measuring (mesh_ray/bench/soak.py): glibc's malloc figures are real, a sampler's
first-call cost is not counted as growth, and the trend tells growth that goes on from growth that stops."""

from __future__ import annotations

import pytest

from mesh_ray.bench.soak import change, malloc_in_use, soak, trend


def test_malloc_in_use_sees_memory_the_process_holds_and_gives_back():
    """Other threads (Ray's, when a session fixture runs in this process) allocate meanwhile, so the
    pattern must show in one of a few tries; it never shows if the figure ignores mmapped blocks."""
    if malloc_in_use() is None:
        pytest.skip("not glibc >= 2.33 (no mallinfo2)")
    seen = []
    for _ in range(5):
        base = malloc_in_use()
        held = bytearray(64_000_000)  # one malloc'd block (mmapped: counted in hblkhd)
        grown = malloc_in_use()
        del held
        back = malloc_in_use()
        seen.append((grown - base, back - base))
        if grown - base >= 60_000_000 and abs(back - base) < 8_000_000:
            return
    pytest.fail(f"malloc in-use deltas (held, given back) per try: {seen}")


def test_a_samplers_first_call_is_not_counted_as_growth():
    """The bench once read the driver's RSS, then imported the store-usage API on its first call:
    the import counted as the soak's growth.  The soak now throws its first sample away."""
    cache: list[bytearray] = []

    def sample() -> dict:
        held = sum(map(len, cache))  # read first, then the sampler's own first-call cost (like the bench's)
        if not cache:
            cache.append(bytearray(32_000_000))
        return {"held": held}

    rows = soak(lambda _k: None, 6, sample, warm=2, points=3)
    assert [r["done"] for r in rows] == [0, 2, 4, 6]
    assert change(rows, "held") == 0


def test_trend_tells_growth_that_goes_on_from_growth_that_stops():
    keeps = [{"done": d, "x": 100 + d} for d in range(0, 101, 10)]  # a leak: the same per step throughout
    stops = [{"done": d, "x": 100 + min(d, 20)} for d in range(0, 101, 10)]  # settles early
    leak, settle = trend(keeps, "x"), trend(stops, "x")
    assert leak["growth_pct"] == 100.0 and leak["second_half_pct"] == 33.33
    assert settle["growth_pct"] == 20.0 and settle["second_half_pct"] == 0.0
    per_process = trend([{"done": 0, "x": [100, 200]}, {"done": 5, "x": [100, 200]}, {"done": 10, "x": [110, 200]}], "x")
    assert per_process["growth_pct"] == [10.0, 0.0] and per_process["second_half_pct"] == [10.0, 0.0]
