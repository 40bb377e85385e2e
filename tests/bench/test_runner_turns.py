"""bench.runner._timed_in_turn: on a GPU each implementation is timed more than once, in alternating order, and
the fastest timing of each is kept, so a device slowing down (a power limit) is not charged to whichever ran
second."""

import types

from tilestack.bench.runner import _timed_in_turn


def test_turns_alternate_and_the_fastest_of_each_is_kept():
    order = []
    # a device that gets slower with every timing (heating up): 1.0, 1.1, 1.2, ... seconds
    clock = iter(1.0 + 0.1 * i for i in range(100))

    def timer(name):
        def take():
            order.append(name)
            return types.SimpleNamespace(latency_s=next(clock), name=name)
        return take

    ours, baseline = _timed_in_turn(timer("ours"), timer("baseline"), passes=2)
    assert order == ["ours", "baseline", "baseline", "ours"]                 # ABBA: drift hits both alike
    assert (ours.latency_s, baseline.latency_s) == (1.0, 1.1)                # each one's fastest timing
    order.clear()
    ours, baseline = _timed_in_turn(timer("ours"), timer("baseline"), passes=1)
    assert order == ["ours", "baseline"] and ours.latency_s < baseline.latency_s
