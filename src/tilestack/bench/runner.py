"""Run the bench suite: check every case, time it beside its baseline, keep and show the results.

    rows = run_suite(full=True, out_dir=Path("out/bench"))    # what ``tilestack bench`` does
    rows[0].passed, rows[0].speedup, rows[0].ours.flops_per_s
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

from tilestack import perf
from tilestack.bench import record
from tilestack.bench.cases import Case, cases
from tilestack.files import write_atomic
from tilestack.perf import formulas, report
from tilestack.perf.metrics import compute_metrics, roofs_for
from tilestack.perf.timing import Timing

CPU_REPEATS = 3      # the Triton interpreter takes about a second a call: a few repeats say enough
STEP_CPU_PLAN = (1, 2)   # (warm-up, timed) steps of a model step on a CPU, where one takes seconds
GPU_PASSES = 2       # timings of each implementation on a GPU, in turns (``_timed_in_turn``)


@dataclasses.dataclass
class BenchRow:
    case: Case
    check: dict
    ours: Any            # perf.Measurement, tilestack (FLOPs and bytes from the IR)
    baseline: Any        # perf.Measurement, the PyTorch baseline (FLOPs and bytes from formulas)

    @property
    def passed(self) -> bool:
        c = self.check
        return c["vs_float64"] <= c["tol"] and c["vs_reference"] <= c["tol"]

    @property
    def speedup(self) -> float:
        return self.baseline.latency_s / self.ours.latency_s


def _sets(case: Case, dev, first: dict, per_set_bytes: float) -> list[tuple]:
    if not case.rotate:             # a model step: one model, its optimizer and a batch, stepped again and again
        return [(first,)]
    return perf.rotating_sets(lambda: (case.make(dev.torch_device),), bytes_per_set=max(per_set_bytes, 1.0),
                              device=dev)


def _cost(case: Case, first: dict) -> tuple[formulas.Cost, dict]:
    """tilestack's FLOPs and compulsory DRAM bytes (from the IR where there is one), and what else to keep."""
    if case.traced is None:
        return case.ours_cost(first), {}
    ir = case.traced(first).cost(*case.cost_args(first))
    # the roofline places a kernel by its compulsory DRAM bytes; every global access (L2 included) is noted
    return formulas.Cost(ir.flops, ir.dram_bytes_read, ir.dram_bytes_written), {"global_access_bytes": ir.bytes}


def _measure(fn, sets: list[tuple], cost: formulas.Cost, *, case: Case, dev, ceil, **common):
    """perf.measure, except for a model step on a CPU: a step under Triton's interpreter takes seconds, so it is
    timed over STEP_CPU_PLAN steps (perf.measure warms up with at least five calls)."""
    counts = dict(flops=cost.flops, bytes_read=cost.bytes_read, bytes_written=cost.bytes_written,
                  items=case.items, item_name=case.item_name, **common)
    if dev.kind == "cpu" and not case.rotate:
        warm, repeats = STEP_CPU_PLAN
        for _ in range(warm):
            fn(*sets[0])
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*sets[0])
            times.append(time.perf_counter() - t0)
        t = Timing(tuple(times), "cpu-perf-counter", warm, 1)
        return compute_metrics(latency_s=t.median_s, roofs=roofs_for(dev, ceil, case.dtype), device=dev.name,
                               device_kind=dev.kind, dtype=case.dtype, timing=t, **counts)
    return perf.measure(fn, args_sets=sets, device=dev, ceilings=ceil, dtype=case.dtype,
                        repeats=CPU_REPEATS if dev.kind == "cpu" else None, **counts)


def _timed_in_turn(time_ours, time_baseline, *, passes: int):
    """(ours, baseline): each implementation's fastest of ``passes`` timings, taken in the order ours, baseline,
    baseline, ours, ... so that neither always runs on a cooler or a hotter device. A GPU at its power limit
    slows down within seconds (the H200's bench of 2026-12-02: one GEMM config at 771 TFLOP/s in bf16, 637 in
    fp16 seconds later, the board at 700 W); one pass each would charge that to whichever ran second."""
    ours, baseline = [], []
    for i in range(passes):
        for take, into in ((time_ours, ours), (time_baseline, baseline))[::1 if i % 2 == 0 else -1]:
            into.append(take())
    return min(ours, key=lambda m: m.latency_s), min(baseline, key=lambda m: m.latency_s)


def run_case(case: Case, dev, ceil, store=None, run_id=None) -> BenchRow:
    check = case.check(dev.torch_device)
    first = case.make(dev.torch_device)
    cost, extra = _cost(case, first)
    base_cost = case.baseline_cost() if case.baseline_cost is not None else cost
    sets = _sets(case, dev, first, cost.bytes)
    key = {"case": case.name, "shape": case.shape}    # what pairs a result with its match in another run
    def time_ours():
        return _measure(case.ours, sets, cost, case=case, dev=dev, ceil=ceil, name=f"tilestack.{case.name}",
                        config={**key, "role": "tilestack", **case.config, **extra})

    def time_baseline():
        return _measure(case.baseline, sets, base_cost, case=case, dev=dev, ceil=ceil, name=case.baseline_name,
                        config={**key, "role": "baseline"})

    turns = GPU_PASSES if dev.kind == "cuda" and case.rotate else 1     # kernels; a model step is long enough
    ours, baseline = _timed_in_turn(time_ours, time_baseline, passes=turns)
    if store is not None:
        store.append(run_id, ours)
        store.append(run_id, baseline)
    return BenchRow(case, check, ours, baseline)


def comparison_table(rows: list[BenchRow], device_label: str):
    from rich.table import Table

    t = Table(title=f"tilestack bench on {device_label}  (a kernel's FLOPs and bytes from its IR; whole ops', "
                    "model steps' and baselines' from formulas)")
    for col in ("case", "shape", "check (rel err)", "time", "FLOP/s", "bytes/s", "FLOP/byte",
                "baseline", "baseline time", "baseline FLOP/s", "speedup"):
        t.add_column(col, justify="left" if col in ("case", "shape", "baseline") else "right")
    for r in rows:
        ok = "[green]ok[/]" if r.passed else "[red]FAIL[/]"
        t.add_row(r.case.name, r.case.shape, f"{ok} {r.check['vs_float64']:.1e}",
                  report.seconds(r.ours.latency_s), report.si(r.ours.flops_per_s, "FLOP/s"),
                  report.si(r.ours.bytes_per_s, "B/s"), f"{r.ours.intensity:.1f}", r.case.baseline_name,
                  report.seconds(r.baseline.latency_s), report.si(r.baseline.flops_per_s, "FLOP/s"),
                  f"{r.speedup:.2f}x" if r.speedup >= 0.1 else f"{r.speedup:.2g}x")
    return t


def _open_store():
    """The result store, or None with a warning where it cannot be opened: the run is still measured and reported."""
    try:
        return record.open_store()
    except record.RecordError as e:
        warnings.warn(f"{e}; this run's results are not stored", stacklevel=3)
        return None


def _append_row(st, run_id: str, row: BenchRow):
    """Append a case's two results to the store; the store, or None (closed) with one warning where the append
    failed (a full disk, the file gone read-only): before, a sqlite3 error here ended the whole bench run and its
    report with a traceback. The rows committed before stay in the store."""
    import sqlite3

    try:
        st.append(run_id, row.ours)
        st.append(run_id, row.baseline)
        return st
    except sqlite3.Error as e:
        warnings.warn(f"result store {st.path} cannot be written ({type(e).__name__}: {e}); the rest of this run's "
                      "results are not stored (those before are)", stacklevel=2)
        st.close()
        return None


def run_suite(*, full: bool = True, only: list[str] | None = None, store: bool = True, models: bool = True,
              out_dir: Path | None = None, console=None) -> list[BenchRow]:
    """Every case (``only``: those names) on this machine's device; results appended to the result store as one
    run; with ``out_dir``, report.html, roofline.png, bench.md and bench.json (the run as a record) there."""
    con = report.console(console)
    dev = perf.detect()
    label = f"{dev.name} ({dev.kind.upper()}{', Triton interpreter, small sizes' if dev.kind == 'cpu' else ''})"
    ceil = perf.ceilings(dev)
    suite = [c for c in cases(dev.kind, full, models) if not only or c.name in only]
    rows: list[BenchRow] = []
    versions = perf.versions()
    started = record.now()
    st = _open_store() if store else None
    run_id = None
    try:
        if st is not None:
            run_id = st.start_run(device=dev, ceilings=ceil, label="tilestack bench", command=record.BENCH_COMMAND,
                                  versions=versions)
        for case in report.track(suite, description=f"bench on {label}", total=len(suite)):
            rows.append(run_case(case, dev, ceil))
            if st is not None:
                st = _append_row(st, run_id, rows[-1])
    finally:
        if st is not None:
            st.close()
    ms = [m for r in rows for m in (r.ours, r.baseline)]
    report.print_measurements(ms, title="every run, with roofline placement", con=con)
    con.print(comparison_table(rows, label))
    if run_id is not None:
        con.print(f"stored as run {run_id}; compare with another run or device: tilestack bench compare A B")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        report.roofline_png(ms, out_dir / "roofline.png", device=dev, ceilings=ceil, title=label)
        report.html_report(ms, out_dir / "report.html", device=dev, ceilings=ceil, versions=versions)
        write_atomic(out_dir / "bench.md", report.measurements_markdown(ms))
        record.Record(dev.name, ms, versions, dev.describe(), started, record.BENCH_COMMAND,
                      f"run {run_id}" if run_id else "tilestack bench --no-store").write(out_dir / "bench.json")
        con.print(f"report: {out_dir / 'report.html'}, roofline: {out_dir / 'roofline.png'}, "
                  f"record: {out_dir / 'bench.json'}")
    return rows
