import time

import pytest

from tilestack.perf import timing
from tilestack.perf.timing import TimingError


def test_cpu_timing_statistics_and_rotation():
    seen = []
    sets = [(i,) for i in range(3)]
    t = timing.time_fn(lambda i: seen.append(i), args_sets=sets, repeats=30, warmup_s=0)
    assert t.repeats == 30 and t.method == "cpu-perf-counter" and t.n_sets == 3
    timed = seen[t.warmup_calls:]
    assert timed == [i % 3 for i in range(30)]  # repeat i runs set i % 3
    assert t.min_s <= t.p10_s <= t.median_s <= t.p90_s and t.total_s > 0


def test_median_resists_outliers():
    calls = iter(range(10_000))

    def fn():
        if next(calls) == 20:
            time.sleep(0.05)

    t = timing.time_fn(fn, repeats=25, warmup_s=0)
    assert t.median_s < 0.01 and max(t.times_s) >= 0.04


def test_repeats_chosen_from_the_window():
    t = timing.time_fn(lambda: time.sleep(0.002), window_s=0.05, warmup_s=0)
    assert timing.MIN_REPEATS <= t.repeats <= 30


@pytest.mark.parametrize("kwargs,match", [({"repeats": 0}, "repeats=0"), ({"window_s": 0.0}, "window_s=0.0"),
                                          ({"args_sets": []}, "args_sets=\\[\\]"),
                                          ({"graph": True}, "graph=True")])
def test_bad_windows_are_refused(kwargs, match):
    with pytest.raises(TimingError, match=match):
        timing.time_fn(lambda *a: None, **kwargs)


def test_not_callable():
    with pytest.raises(TimingError, match="expected a callable"):
        timing.time_fn(42)


def test_rotating_sets_exceed_twice_the_l2():
    class Gpu:
        kind, l2_bytes = "cuda", 50 << 20

    sets = timing.rotating_sets(lambda: ("x",), bytes_per_set=20 << 20, device=Gpu())
    assert len(sets) == 5  # 5 x 20 MiB >= 2 x 50 MiB
    assert len(timing.rotating_sets(lambda: ("x",), bytes_per_set=1, device=Gpu())) == timing.MAX_ROTATING_SETS
    assert len(timing.rotating_sets(lambda: ("x",), bytes_per_set=1 << 30, device="cpu")) == 1
    with pytest.raises(TimingError, match="bytes_per_set=0"):
        timing.rotating_sets(lambda: (), bytes_per_set=0)
