"""tilestack.perf: time a kernel, explain its performance, keep the result.

    from tilestack import perf
    dev = perf.detect()                                   # GPU if present, else the CPU; dev.spec: the sheet
    ceil = perf.ceilings(dev)                             # measured copy bandwidth and matmul rates, cached
    cost = perf.formulas.attention(4, 16, 4096, 4096, 128, "bf16", causal=True)   # or kernel.cost(**sizes)
    m = perf.measure(fn, args_sets=sets, flops=cost.flops, bytes_read=cost.bytes_read,
                     bytes_written=cost.bytes_written, name="attention_fwd", config={"BM": 128},
                     items=4 * 4096, item_name="tokens", device=dev, ceilings=ceil)
    m.latency_s, m.flops_per_s, m.compute_util_measured, m.bound, m.tip, m.joules_per_call
    with perf.Store() as st:
        st.append(st.start_run(device=dev, ceilings=ceil), m)
    perf.report.print_measurements([m])
    perf.report.html_report([m], "report.html", device=dev, ceilings=ceil)

Modules, one job each: ``device`` (spec sheet and measured ceilings), ``timing`` (events, rotation,
graphs), ``energy`` (NVML), ``metrics`` (the numbers), ``roofline`` (bound and tip), ``nvtx``, ``ncu``
(Nsight Compute), ``profile`` (PyTorch models: its counting pass ``counting``, whose FLOP rules are
``counting_rules`` and ``counting_linalg``, and its tables and HTML ``profile_render``), ``store`` (SQLite),
``report`` (tables, PNG, HTML), ``formulas`` (baselines' costs).
Importing this package imports neither torch nor matplotlib.
"""

from tilestack.perf import formulas, report
from tilestack.perf.device import Ceilings, Device, PeakSpec, ceilings, detect, lookup_peaks, versions
from tilestack.perf.energy import EnergyMeter, EnergySample, EnergyWindow, measure_energy
from tilestack.perf.metrics import Measurement, MetricsError, Roofs, compute_metrics, measure, roofs_for
from tilestack.perf.ncu import NcuError, NcuPermissionError
from tilestack.perf.nvtx import range_name
from tilestack.perf.profile import ModelProfile, ProfileError, profile_model
from tilestack.perf.roofline import Placement, Roof, RooflineError, place
from tilestack.perf.store import Store, StoreError
from tilestack.perf.timing import Timing, TimingError, rotating_sets, time_fn

__all__ = [
    "Ceilings",
    "Device",
    "EnergyMeter",
    "EnergySample",
    "EnergyWindow",
    "Measurement",
    "MetricsError",
    "ModelProfile",
    "NcuError",
    "NcuPermissionError",
    "PeakSpec",
    "Placement",
    "ProfileError",
    "Roof",
    "RooflineError",
    "Roofs",
    "Store",
    "StoreError",
    "Timing",
    "TimingError",
    "ceilings",
    "compute_metrics",
    "detect",
    "formulas",
    "lookup_peaks",
    "measure",
    "measure_energy",
    "place",
    "profile_model",
    "range_name",
    "report",
    "roofs_for",
    "rotating_sets",
    "time_fn",
    "versions",
]
