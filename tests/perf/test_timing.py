import types

import pytest

from tilestack.perf import timing
from tilestack.perf.timing import TimingError

CALL_S = 1e-6  # what one reading of the fake clock costs: a call that does nothing still takes this


class FakeClock:
    """time_fn's clock, advanced only by the calls it times (``sleep``) and by each reading (``CALL_S``): what the
    timing loop decides from the clock is then the same on an idle and on a loaded machine."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += CALL_S
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def test_cpu_timing_statistics_and_rotation():
    seen = []
    sets = [(i,) for i in range(3)]
    t = timing.time_fn(lambda i: seen.append(i), args_sets=sets, repeats=30, warmup_s=0)
    assert t.repeats == 30 and t.method == "cpu-perf-counter" and t.n_sets == 3
    timed = seen[t.warmup_calls:]
    assert timed == [i % 3 for i in range(30)]  # repeat i runs set i % 3
    assert t.min_s <= t.p10_s <= t.median_s <= t.p90_s and t.total_s > 0


def test_median_resists_outliers(clock):
    calls = iter(range(10_000))

    def fn():
        if next(calls) == 20:
            clock.sleep(0.05)

    t = timing.time_fn(fn, repeats=25, warmup_s=0)
    assert t.median_s < 0.01 and max(t.times_s) >= 0.04


def test_repeats_chosen_from_the_window(clock):
    t = timing.time_fn(lambda: clock.sleep(0.002), window_s=0.05, warmup_s=0, target_rel_ci=None)
    assert timing.MIN_REPEATS <= t.repeats <= 30
    assert t.repeats == 24  # 0.05 s of calls of 2 ms and two clock readings each (the fake clock: exact)


def test_median_interval_from_order_statistics():
    xs = [float(i) for i in range(1, 101)]
    assert timing.median_ci(xs) == (40.0, 61.0)  # ranks 40 and 61 of 100: the textbook 95% interval
    assert timing.median_ci([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few for ranks: (min, max)
    assert timing.rel_ci(xs) == pytest.approx((61 - 40) / 2 / 50.5)
    few = timing.Timing((1.0, 1.0, 1.0), "cpu-perf-counter", 0, 1, target_rel_ci=0.5)
    assert few.rel_ci == 0 and not few.converged  # three equal times prove nothing
    with pytest.raises(TimingError, match="no samples"):
        timing.median_ci([])


def _noisy(clock: FakeClock, period: int, slow_s: float):
    """A call that takes ``slow_s`` more on one call in ``period``: a busy machine's descheduled calls."""
    calls = iter(range(10**9))

    def fn():
        if next(calls) % period == 0:
            clock.sleep(slow_s)

    return fn


def test_repeats_until_the_median_is_known(clock):
    # 1 call in 5 is 1 ms slower: a few repeats can put the median among the slow ones; enough repeats do not.
    fn = _noisy(clock, 5, 0.001)
    t = timing.time_fn(fn, warmup_s=0, window_s=1e-4, target_rel_ci=0.5, budget_s=5.0)
    assert t.converged and t.repeats >= timing.MIN_CI_SAMPLES and t.rel_ci <= 0.5 and t.target_rel_ci == 0.5
    assert t.median_s == pytest.approx(CALL_S)  # the fast calls' time, not the slow ones'


def test_an_unreachable_target_stops_at_the_budget_and_says_so(clock):
    t0 = clock.perf_counter()
    t = timing.time_fn(_noisy(clock, 2, 0.002), warmup_s=0, target_rel_ci=1e-9, budget_s=0.3)
    spent = clock.perf_counter() - t0
    assert not t.converged and t.rel_ci > 1e-9 and t.repeats >= timing.MIN_CI_SAMPLES
    assert 0.3 <= spent < 0.31  # the budget (0.3 s), not the target, ended it: past it by one call of 2 ms at most
    slow = timing.time_fn(lambda: clock.sleep(0.05), warmup_s=0, budget_s=0.05)
    assert slow.repeats == timing.MIN_BUDGET_REPEATS and not slow.converged  # slower than the budget: 3 calls


def test_fixed_repeats_are_exact_and_report_their_spread():
    t = timing.time_fn(lambda: None, repeats=7, warmup_s=0)
    assert t.repeats == 7 and t.target_rel_ci is None and t.rel_ci >= 0 and t.rel_spread >= 0
    with pytest.raises(TimingError, match="budget_s=0"):
        timing.time_fn(lambda: None, budget_s=0)
    with pytest.raises(TimingError, match="target_rel_ci=-1"):
        timing.time_fn(lambda: None, target_rel_ci=-1)


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
