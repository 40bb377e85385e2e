"""Run the bench suite: check every kernel, time it beside its baseline, keep and show the results.

    rows, measurements = run_suite(full=True)       # what ``tilestack bench`` does
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tilestack import perf
from tilestack.bench.cases import Case, cases
from tilestack.perf import report

CPU_REPEATS = 3      # the Triton interpreter takes about a second a call: a few repeats say enough


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


def _sets(case: Case, dev, per_set_bytes: float) -> list[tuple]:
    return perf.rotating_sets(lambda: (case.make(dev.torch_device),), bytes_per_set=max(per_set_bytes, 1.0),
                              device=dev)


def run_case(case: Case, dev, ceil, store=None, run_id=None) -> BenchRow:
    check = case.check(dev.torch_device)
    first = case.make(dev.torch_device)
    cost = case.traced(first).cost(*case.cost_args(first))
    sets = _sets(case, dev, cost.dram_bytes)
    repeats = CPU_REPEATS if dev.kind == "cpu" else None
    common = dict(args_sets=sets, items=case.items, item_name=case.item_name, device=dev, ceilings=ceil,
                  repeats=repeats, dtype="bf16")
    # the roofline places a kernel by its compulsory DRAM bytes; every global access (L2 included) is noted
    ours = perf.measure(case.ours, flops=cost.flops, bytes_read=cost.dram_bytes_read,
                        bytes_written=cost.dram_bytes_written, name=f"tilestack.{case.name}",
                        config={"shape": case.shape, **case.config, "global_access_bytes": cost.bytes}, **common)
    base_cost = case.baseline_cost()
    baseline = perf.measure(case.baseline, flops=base_cost.flops, bytes_read=base_cost.bytes_read,
                            bytes_written=base_cost.bytes_written, name=case.baseline_name,
                            config={"shape": case.shape}, **common)
    if store is not None:
        store.append(run_id, ours)
        store.append(run_id, baseline)
    return BenchRow(case, check, ours, baseline)


def comparison_table(rows: list[BenchRow], device_label: str):
    from rich.table import Table

    t = Table(title=f"tilestack bench on {device_label}  (tilestack's FLOPs and bytes from its IR; "
                    "baselines' from formulas)")
    for col in ("kernel", "shape", "check (rel err)", "time", "FLOP/s", "bytes/s", "FLOP/byte",
                "baseline", "baseline time", "baseline FLOP/s", "speedup"):
        t.add_column(col, justify="left" if col in ("kernel", "shape", "baseline") else "right")
    for r in rows:
        ok = "[green]ok[/]" if r.passed else "[red]FAIL[/]"
        t.add_row(r.case.name, r.case.shape, f"{ok} {r.check['vs_float64']:.1e}",
                  report.seconds(r.ours.latency_s), report.si(r.ours.flops_per_s, "FLOP/s"),
                  report.si(r.ours.bytes_per_s, "B/s"), f"{r.ours.intensity:.1f}", r.case.baseline_name,
                  report.seconds(r.baseline.latency_s), report.si(r.baseline.flops_per_s, "FLOP/s"),
                  f"{r.speedup:.2f}x")
    return t


def run_suite(*, full: bool = True, only: list[str] | None = None, store: bool = True,
              out_dir: Path | None = None, console=None) -> list[BenchRow]:
    con = report.console(console)
    dev = perf.detect()
    label = f"{dev.name} ({dev.kind.upper()}{', Triton interpreter, small sizes' if dev.kind == 'cpu' else ''})"
    ceil = perf.ceilings(dev)
    suite = [c for c in cases(dev.kind, full) if not only or c.name in only]
    rows: list[BenchRow] = []
    st = perf.Store() if store else None
    try:
        run_id = (st.start_run(device=dev, ceilings=ceil, label="tilestack bench", command="tilestack bench")
                  if st else None)
        for case in report.track(suite, description=f"bench on {label}", total=len(suite)):
            rows.append(run_case(case, dev, ceil, st, run_id))
    finally:
        if st is not None:
            st.close()
    ms = [m for r in rows for m in (r.ours, r.baseline)]
    report.print_measurements(ms, title="every run, with roofline placement", con=con)
    con.print(comparison_table(rows, label))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        report.roofline_png(ms, out_dir / "roofline.png", device=dev, ceilings=ceil, title=label)
        report.html_report(ms, out_dir / "report.html", device=dev, ceilings=ceil, versions=perf.versions())
        (out_dir / "bench.md").write_text(report.measurements_markdown(ms))
        con.print(f"report: {out_dir / 'report.html'}, roofline: {out_dir / 'roofline.png'}")
    return rows
