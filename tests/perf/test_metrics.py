import math

import pytest
import torch

from tilestack import perf
from tilestack.perf.energy import EnergySample, EnergyWindow
from tilestack.perf.metrics import Measurement, MetricsError, compute_metrics, roofs_for
from tilestack.perf.timing import TimingError


def test_rates_and_utilisation_against_both_roofs(measurements):
    gemm, norm = measurements
    assert gemm.flops_per_s == pytest.approx(600e12)
    assert gemm.compute_util_measured == pytest.approx(600 / 757)
    assert gemm.compute_util_published == pytest.approx(600 / 989.4)
    assert gemm.intensity == pytest.approx(2 * 4096**3 / (3 * 4096 * 4096 * 2))
    assert gemm.bound == "compute" and gemm.items_per_s is None
    assert norm.bytes_per_s == pytest.approx(1.5e12)
    assert norm.memory_util_measured == pytest.approx(1.5 / 3.02)
    assert norm.memory_util_published == pytest.approx(1.5 / 3.35)
    assert norm.bound == "memory" and norm.roof_fraction == pytest.approx(1.5 / 3.02)
    assert norm.items_per_s == pytest.approx(16384 / norm.latency_s)
    assert "memory-bound at 50% of bandwidth" in norm.tip


def test_energy_fills_joules_power_and_perf_per_watt(h100, h100_ceilings):
    # 1000 calls over a 1.25 s window that used 500 J: 0.5 J a call at 400 W
    sample = EnergySample(EnergyWindow(500.0, 1.25, True), calls=1000)
    m = compute_metrics(name="k", latency_s=1e-3, flops=2e11, bytes_read=1e9, bytes_written=0,
                        roofs=roofs_for(h100, h100_ceilings, "bf16"), energy=sample, items=4096)
    assert m.joules_per_call == pytest.approx(0.5)
    assert m.avg_power_w == pytest.approx(400)
    assert m.flops_per_joule == pytest.approx(2e11 / 0.5)  # FLOP/s per W
    assert m.items_per_joule == pytest.approx(4096 / 0.5)


def test_too_short_energy_window_leaves_energy_empty_with_a_note():
    sample = EnergySample(EnergyWindow(0.01, 0.02, False, "window of 20.0 ms is shorter than 1.00 s"), calls=3)
    m = compute_metrics(name="k", latency_s=1e-3, flops=1, bytes_read=1, bytes_written=1, energy=sample)
    assert m.joules_per_call is None and m.avg_power_w is None and m.flops_per_joule is None
    assert "shorter than" in m.energy_note


@pytest.mark.parametrize("latency", [0.0, -1.0, math.inf, None])
def test_zero_length_window_is_refused(latency):
    with pytest.raises(MetricsError, match="latency_s="):
        compute_metrics(name="k", latency_s=latency, flops=1, bytes_read=1, bytes_written=1)


@pytest.mark.parametrize("field", ["flops", "bytes_read", "bytes_written"])
def test_negative_counts_are_refused(field):
    kwargs = {"flops": 1.0, "bytes_read": 1.0, "bytes_written": 1.0, field: -1.0}
    with pytest.raises(MetricsError, match=f"{field}=-1.0"):
        compute_metrics(name="k", latency_s=1.0, **kwargs)


def test_row_round_trip(measurements):
    gemm = measurements[0]
    row = gemm.to_row()
    assert row["flops_per_s"] == gemm.flops_per_s and row["bound"] == "compute" and row["tip"] == gemm.tip
    assert Measurement.from_row(row) == gemm


def test_measure_times_a_cpu_callable_end_to_end():
    a = torch.randn(128, 128)
    cost = perf.formulas.matmul(128, 128, 128, "fp32")
    ceil = perf.Ceilings("cpu", 1e10, {"fp32": 1e11}, "now")
    m = perf.measure(torch.mm, args_sets=[(a, a)], flops=cost.flops, bytes_read=cost.bytes_read,
                     bytes_written=cost.bytes_written, name="mm", config={"n": 128}, device="cpu", ceilings=ceil,
                     repeats=20)
    assert m.repeats == 20 and m.timing_method == "cpu-perf-counter" and m.dtype == "fp32"
    assert m.latency_p10_s <= m.latency_s <= m.latency_p90_s
    assert m.compute_util_measured == pytest.approx(m.flops_per_s / 1e11)
    assert m.compute_util_published is None and m.joules_per_call is None


def test_measure_reports_a_raising_kernel_by_name():
    def broken():
        raise RuntimeError("boom")

    with pytest.raises(MetricsError, match="'broken' raised RuntimeError"):
        perf.measure(broken, args_sets=None, flops=1, bytes_read=1, bytes_written=1, name="broken", device="cpu",
                     ceilings=False)
    with pytest.raises(TimingError, match="repeats=0"):
        perf.measure(lambda: None, args_sets=None, flops=1, bytes_read=1, bytes_written=1, name="k", device="cpu",
                     ceilings=False, repeats=0)


def test_energy_above_idle(h100, h100_ceilings):
    from tilestack.perf import report

    sample = EnergySample(EnergyWindow(500.0, 1.25, True), calls=1000, idle_power_w=100.0)
    m = compute_metrics(name="k", latency_s=1e-3, flops=2e11, bytes_read=1e9, bytes_written=0,
                        roofs=roofs_for(h100, h100_ceilings, "bf16"), energy=sample)
    assert m.idle_power_w == 100 and m.joules_above_idle_per_call == pytest.approx(0.5 * (1 - 100 / 400))
    assert report.energy_summary(m).startswith("500 mJ/op at 400 W (idle 100 W: 375 mJ/op above idle)")
    assert m.to_row()["joules_above_idle_per_call"] == pytest.approx(0.375)
