import math

import pytest

from tilestack.perf.roofline import Roof, place

ROOF = Roof(peak_flops_per_s=1000e12, bandwidth=4e12, label="published")  # ridge at 250 FLOP/B


def test_ridge_and_attainable():
    assert ROOF.ridge == 250
    assert ROOF.attainable(10) == 40e12
    assert ROOF.attainable(1000) == 1000e12
    assert Roof(None, 4e12).ridge is None and Roof(None, None).attainable(1) is None


def test_memory_bound_fraction_distance_and_tip():
    # intensity 1 FLOP/B, 1.6 TB/s achieved of 4 TB/s: 40% of bandwidth
    p = place(flops=1e9, bytes_moved=1e9, seconds=1e9 / 1.6e12, roof=ROOF)
    assert p.bound == "memory"
    assert p.fraction == pytest.approx(0.4)
    assert p.distance == pytest.approx(2.5)
    assert "memory-bound at 40% of bandwidth" in p.tip and "fuse" in p.tip


def test_memory_bound_near_roof_says_only_fewer_bytes_help():
    p = place(flops=1e9, bytes_moved=1e9, seconds=1e9 / 3.8e12, roof=ROOF)
    assert p.fraction == pytest.approx(0.95) and "on the roof" in p.tip and "fewer bytes" in p.tip


@pytest.mark.parametrize("frac,phrase", [(0.3, "matrix units"), (0.7, "overlap"), (0.9, "only less work")])
def test_compute_bound_tips_follow_the_fraction(frac, phrase):
    flops = 1e15
    p = place(flops=flops, bytes_moved=flops / 1000, seconds=flops / (frac * 1000e12), roof=ROOF)
    assert p.bound == "compute" and p.fraction == pytest.approx(frac)
    assert phrase in p.tip and f"{frac:.0%}" in p.tip


def test_tiny_kernel_is_latency_bound():
    p = place(flops=1e6, bytes_moved=1e6, seconds=3e-6, roof=ROOF)
    assert p.tip.startswith("latency-bound") and "CUDA graph" in p.tip


def test_above_the_roof_points_at_cache_or_counts():
    p = place(flops=1e9, bytes_moved=1e9, seconds=1e9 / 8e12, roof=ROOF)
    assert p.fraction == pytest.approx(2.0) and "cache" in p.tip


def test_zero_bytes_is_compute_bound_and_zero_flops_memory_bound():
    assert place(flops=1e12, bytes_moved=0, seconds=1.0, roof=ROOF).intensity == math.inf
    assert place(flops=1e12, bytes_moved=0, seconds=1.0, roof=ROOF).bound == "compute"
    assert place(flops=0, bytes_moved=1e12, seconds=1.0, roof=ROOF).bound == "memory"


def test_unknown_roof_says_how_to_get_one():
    p = place(flops=1e9, bytes_moved=1e9, seconds=1.0, roof=Roof(None, None))
    assert p.bound == "unknown" and p.fraction is None and "tilestack device" in p.tip
