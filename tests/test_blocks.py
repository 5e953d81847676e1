"""Block ranges as text: parsing and the one-line errors for overlap, gap and overrun."""

import pytest

from mesh_ray.errors import ConfigError
from mesh_ray.models.blocks import check_cover, parse_range, split_evenly

DEPTH, SINGLE = 19, 38  # FLUX.1 dev


def r(text):
    return parse_range(text, DEPTH, SINGLE)


def test_forms():
    assert (r("double:0-9").start, r("double:0-9").stop) == (0, 10)
    assert (r("single:0-37").start, r("single:0-37").stop) == (19, 57)
    assert (r("double:10-single:5").start, r("double:10-single:5").stop) == (10, 25)
    assert (r("0-56").start, r("0-56").stop) == (0, 57)
    assert str(r("double:10-single:5")) == "double:10-single:5" and str(r("single:3-4")) == "single:3-4"


def test_runs_past_the_model():
    with pytest.raises(ConfigError, match=r"stage 2 block range single:20-40 runs past the model \(38 single blocks\): use single:20-37"):
        parse_range("single:20-40", DEPTH, SINGLE, "stage 2 block range")


def test_not_a_range():
    with pytest.raises(ConfigError, match="is not a block range"):
        r("blocks 1 to 3")


def test_overlap_gap_and_short_cover():
    with pytest.raises(ConfigError, match="stage 1 block range double:9-18 overlaps stage 0"):
        check_cover([r("double:0-9"), r("double:9-18"), r("single:0-37")])
    with pytest.raises(ConfigError, match="leaves a gap: blocks double:10 to double:11 are not assigned"):
        check_cover([r("double:0-9"), r("double:12-single:37")])
    with pytest.raises(ConfigError, match="extend the last range to single:37"):
        check_cover([r("double:0-9"), r("double:10-single:20")])


def test_split_evenly_covers():
    parts = split_evenly(DEPTH, SINGLE, 3)
    check_cover(parts)
    assert [len(p) for p in parts] == [19, 19, 19]
