import pytest

from tilestack.parallel.cost import fit_ring, ps_time, ring_allreduce_time


@pytest.mark.parametrize("n", [2, 3, 8])
def test_fit_recovers_alpha_and_bandwidth(n):
    alpha, bw = 20e-6, 12e9
    sizes = [2**k for k in range(10, 28, 3)]
    times = [ring_allreduce_time(s, n, alpha, bw) for s in sizes]
    a, b = fit_ring(sizes, times, n)
    assert a == pytest.approx(alpha, rel=1e-6) and b == pytest.approx(bw, rel=1e-6)


def test_formulas():
    assert ring_allreduce_time(1e9, 4, 0.0, 1e9) == pytest.approx(1.5)        # 2 * 3 / 4 of the bytes
    assert ps_time(1e9, 8, 2, 1e9) == pytest.approx(4.0)


def test_fit_needs_two_sizes_and_two_ranks():
    with pytest.raises(ValueError, match="two distinct sizes"):
        fit_ring([8, 8], [1.0, 1.0], 2)
    with pytest.raises(ValueError, match="world_size=1"):
        fit_ring([8, 16], [1.0, 2.0], 1)
