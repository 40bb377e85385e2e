import time

import pytest

from tilestack.perf import energy, nvtx


class FakeMeter(energy.EnergyMeter):
    """An energy counter that runs at a fixed power, for windows without a GPU."""

    def __init__(self, watts: float):
        self.index, self.reason, self._handle, self.watts = 99, "", object(), watts
        self._t0 = time.perf_counter()

    def energy_mj(self) -> int:
        return int((time.perf_counter() - self._t0) * self.watts * 1000)


def test_meter_without_nvml_says_why():
    m = energy.EnergyMeter(0)
    if m.available:
        pytest.skip("this machine has a readable NVML energy counter")
    assert m.reason
    s = energy.measure_energy(lambda: None, args_sets=None, per_call_s=1e-3, meter=m)
    assert not s.valid and s.joules_per_call is None and "no energy counter" in s.note
    assert energy.meter_for("cpu") is None


def test_short_window_is_flagged_not_trusted():
    with FakeMeter(300).window(min_window_s=1.0) as w:
        time.sleep(0.01)
    assert not w.result.valid and "shorter than 1.00 s" in w.result.note and "10-100 ms" in w.result.note


def test_long_enough_window_gives_power_and_energy_per_call():
    calls = []
    s = energy.measure_energy(lambda x: calls.append(x) or time.sleep(0.002), args_sets=[(1,), (2,)],
                              per_call_s=0.002, meter=FakeMeter(250), min_window_s=0.05)
    assert s.valid and s.calls == len(calls) >= 25 and set(calls) == {1, 2}
    assert s.avg_power_w == pytest.approx(250, rel=0.15)
    assert s.joules_per_call == pytest.approx(s.window.joules / s.calls)


def test_nvtx_names_are_sorted_and_slash_free():
    assert nvtx.range_name("attn", {"BN": 64, "BM": 128}) == "attn[BM=128,BN=64]"
    assert nvtx.range_name("a/b") == "a|b"


def test_nvtx_is_a_no_op_without_cuda():
    with nvtx.range("x"):
        pass

    @nvtx.annotate("f", {"k": 1})
    def f(a):
        return a + 1

    assert f(1) == 2 and f.__name__ == "f"
    nvtx.mark("here")
