"""Round thirteen, part two: the performance API's numbers-in-hand path (``perf.compute_metrics``, ``perf.measure``)
and its reports (``perf.report.print_measurements``, ``measurements_table``, ``html_report``,
``measurements_markdown``).

What it found (each test failed before its fix):
- ``compute_metrics(config='BM=64')`` failed inside dict() ("dictionary update sequence element #0 has length 1"),
  ``timing='fast'`` / ``energy='lots'`` with an AttributeError (".p10_s", ".valid"); ``device=0``, ``dtype=3`` and
  ``item_name=None`` were stored as given (a row whose device is 0, an items column "None/s"), ``items=inf`` showed
  inf items/s. ``perf.measure(name=None)`` failed making its NVTX label ("'NoneType' object has no attribute
  'replace'"), ``config='BM=64'`` there with "string indices must be integers". Each is now a MetricsError naming
  the argument, before anything is timed;
- the reports took one Measurement (``print_measurements(m)``: "'Measurement' object is not iterable"), None, a
  list holding something else (an AttributeError mid-table) and a generator, which the table used up so that the
  tips under it were missing without a word: refused by name.
"""

from __future__ import annotations

import io

import pytest

from tilestack import perf
from tilestack.perf import MetricsError, compute_metrics, report
from tilestack.perf.timing import Timing

BASE = dict(name="k", latency_s=1e-3, flops=2e9, bytes_read=3e6, bytes_written=1e6)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(config="BM=64"), r"config='BM=64' \(str\) for 'k'; expected a dict of the kernel's constants"),
    (dict(config=[("BM", 64)]), r"config=\[\('BM', 64\)\] \(list\)"),
    (dict(config={1: 64}), r"config=\{1: 64\} \(dict\)"),
    (dict(timing="fast"), r"timing='fast' \(str\) for 'k'; expected a Timing or None"),
    (dict(energy="lots"), r"energy='lots' \(str\) for 'k'; expected an EnergySample or None"),
    (dict(device=0), r"device=0 \(int\) for 'k'; expected the device's name, a str"),
    (dict(device_kind=None), r"device_kind=None"),
    (dict(dtype=3), r"dtype=3 \(int\) for 'k'; expected a dtype's short name"),
    (dict(items=5, item_name=None), r"item_name=None \(NoneType\) for 'k'; expected what items counts, a str"),
    (dict(items=float("inf")), r"items=inf \(float\) for 'k'; expected a finite count >= 0 or None"),
    (dict(name=None), r"name=None \(NoneType\); expected the kernel's name as a str"),
])
def test_compute_metrics_refuses_what_a_measurement_cannot_carry(kwargs, fragment):
    with pytest.raises(MetricsError, match=fragment):
        compute_metrics(**(BASE | kwargs))


def test_compute_metrics_still_computes_from_numbers_in_hand():
    t = Timing((1e-3, 1.2e-3, 0.8e-3), "cpu-perf-counter", 1, 1)
    m = compute_metrics(**BASE, config={"BM": 64}, items=4096, item_name="tokens", timing=t, device="cpu",
                        dtype="fp32")
    # by hand: 2e9 FLOP / 1e-3 s, 4e6 B / 1e-3 s, 2e9 / 4e6 FLOP/B, 4096 tokens / 1e-3 s
    assert m.flops_per_s == pytest.approx(2e12) and m.bytes_per_s == pytest.approx(4e9)
    assert m.intensity == pytest.approx(500.0) and m.items_per_s == pytest.approx(4.096e6)
    assert m.config == {"BM": 64} and m.repeats == 3 and m.latency_p10_s == t.p10_s   # three repeats timed


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(name=None), r"name=None \(NoneType\); expected the kernel's name as a str"),
    (dict(config="BM=64"), r"config='BM=64' \(str\) for 'k'"),
    (dict(item_name=3), r"item_name=3 \(int\) for 'k'"),
])
def test_measure_refuses_a_bad_label_before_timing_anything(kwargs, fragment):
    calls = []
    args = dict(args_sets=None, flops=1.0, bytes_read=1.0, bytes_written=1.0, name="k", ceilings=False,
                energy=False) | kwargs
    with pytest.raises(MetricsError, match=fragment):
        perf.measure(lambda: calls.append(1), **args)
    assert calls == []


def _m(name: str):
    return compute_metrics(**(BASE | dict(name=name)))


@pytest.mark.parametrize("entry", ["print_measurements", "measurements_table", "measurements_markdown",
                                   "html_report"])
@pytest.mark.parametrize("ms, fragment", [
    (lambda: _m("k"), r"ms is Measurement \(one: pass \[m\]\); expected a list of perf.Measurement"),
    (lambda: None, r"ms is NoneType; expected a list"),
    (lambda: [_m("k"), "k2"], r"ms holds str 'k2'; expected perf.Measurement objects"),
    (lambda: (m for m in [_m("k")]), r"ms is generator; expected a list"),
    (lambda: "k", r"ms is str; expected a list"),
])
def test_reports_refuse_what_is_no_list_of_measurements(tmp_path, entry, ms, fragment):
    fn = getattr(report, entry)
    args = (ms(), tmp_path / "r.html") if entry == "html_report" else (ms(),)
    with pytest.raises(MetricsError, match=rf"{entry}: {fragment}"):
        fn(*args)
    assert not (tmp_path / "r.html").exists()


def test_reports_of_a_list_show_every_row_and_its_tip(tmp_path):
    from rich.console import Console

    ms = [_m("first"), _m("second")]
    out = io.StringIO()
    report.print_measurements(ms, con=Console(file=out, width=400))
    text = out.getvalue()
    assert text.count("first") == 2 and text.count("second") == 2     # a row and a tip each
    md = report.measurements_markdown(tuple(ms))
    assert len(md.splitlines()) == 2 + len(ms)                          # heading, rule, one line per measurement
    assert report.html_report(ms, tmp_path / "r.html").read_text().count("second") >= 1
