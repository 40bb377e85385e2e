"""Two bench runs side by side, case by case: two runs here, two devices (an H100 record against an H200 run), or a
record file against either.

    cmp = compare(load_side("docs/results/bench_h100.json"), load_side("latest"))
    cmp.pairs            # per case and shape: tilestack and baseline on each side
    cmp.notices          # what makes the ratios mean less (or nothing): sizes, devices, versions, tuned configs
    print_comparison(cmp)

A case is matched by its name and shape (``gemm`` ``4096x4096x4096 bf16``), not by its launch config: tuned
configs differ between devices by design, and a notice lists where they do. Ratios are B over A: a speed-up above
1 means B is faster.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tilestack.bench.record import Record
from tilestack.perf.metrics import Measurement

OURS = "tilestack"
BASELINE = "baseline"
KEY_FIELDS = ("case", "shape", "role")          # what the runner adds to a result's config to name its case
NOT_TUNING = (*KEY_FIELDS, "global_access_bytes")  # config entries that are no launch choice
VERSION_KEYS = ("tilestack", "torch", "triton", "cuda", "driver", "python")


def case_of(ms: list[Measurement]) -> dict[tuple[str, str], dict[str, Measurement]]:
    """(case, shape) -> {"tilestack": m, "baseline": m} for the results of one bench run.

    Results stored before the runner named their case carry only ``shape``: tilestack's are named
    ``tilestack.<case>``, and the baseline is the next result of the same shape."""
    out: dict[tuple[str, str], dict[str, Measurement]] = {}
    last: tuple[str, str] | None = None
    for m in ms:
        cfg = m.config or {}
        shape = str(cfg.get("shape", ""))
        if "case" in cfg and "role" in cfg:
            key, role = (str(cfg["case"]), shape), str(cfg["role"])
        elif m.name.startswith(OURS + "."):
            key, role = (m.name[len(OURS) + 1:], shape), OURS
        elif last is not None and last[1] == shape:
            key, role = last, BASELINE
        else:
            continue                                  # not a bench result (a profile row, say)
        out.setdefault(key, {})[role] = m
        last = key
    return out


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


@dataclasses.dataclass(frozen=True)
class Pair:
    case: str
    shape: str
    a: dict[str, Measurement]                         # {"tilestack": m, "baseline": m}, either may be missing
    b: dict[str, Measurement]

    def _lat(self, side: str, role: str) -> float | None:
        m = getattr(self, side).get(role)
        return m.latency_s if m else None

    @property
    def speedup(self) -> float | None:
        """tilestack on B against tilestack on A: latency A / latency B."""
        return _ratio(self._lat("a", OURS), self._lat("b", OURS))

    @property
    def baseline_speedup(self) -> float | None:
        """The baseline on B against the baseline on A."""
        return _ratio(self._lat("a", BASELINE), self._lat("b", BASELINE))

    def vs_baseline(self, side: str) -> float | None:
        """How many times faster tilestack is than its baseline on ``side`` ("a" or "b")."""
        return _ratio(self._lat(side, BASELINE), self._lat(side, OURS))

    def roof(self, side: str) -> float | None:
        m = getattr(self, side).get(OURS)
        return m.roof_fraction if m else None

    def tuning(self, side: str) -> dict[str, Any]:
        m = getattr(self, side).get(OURS)
        return {k: v for k, v in (m.config if m else {}).items() if k not in NOT_TUNING}


@dataclasses.dataclass
class BenchComparison:
    a: Record
    b: Record
    pairs: list[Pair]                     # cases present on both sides
    only_a: list[tuple[str, str]]
    only_b: list[tuple[str, str]]
    notices: list[str]

    @property
    def comparable(self) -> bool:
        return bool(self.pairs)


def _kind(r: Record) -> str:
    kinds = {m.kind for m in r.measurements} - {""}
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "unknown")


def _names(keys) -> str:
    return ", ".join(f"{c} {s}" for c, s in list(keys)[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def _none(r: Record) -> str:
    """What a side with no bench case holds: nothing, or results of another command (a run of ``tilestack
    profile``: those were called "no results", as if the run were empty)."""
    if not r.measurements:
        return "no results"
    n = len(r.measurements)
    return (f"no bench results ({n} result{'s' * (n != 1)} of {r.command or 'another command'!r}; "
            "`tilestack compare` pairs those)")


def compare(a: Record, b: Record) -> BenchComparison:
    """Pair A's and B's cases by name and shape and say what differs between the two runs."""
    ca, cb = case_of(a.measurements), case_of(b.measurements)
    pairs = [Pair(k[0], k[1], ca[k], cb[k]) for k in ca if k in cb]
    only_a = [k for k in ca if k not in cb]
    only_b = [k for k in cb if k not in ca]
    notes: list[str] = []
    ka, kb = _kind(a), _kind(b)
    if not pairs:
        why = (f"A ran on {ka}, B on {kb}: a CPU runs the small sizes under Triton's interpreter, a GPU the full "
               "ones (`tilestack bench --small` on the GPU gives the small ones)" if ka != kb
               else "no case ran at the same size on both")
        notes.append(f"NOT COMPARABLE: no case and shape in common ({why}). A: {_names(list(ca)) or _none(a)}; "
                     f"B: {_names(list(cb)) or _none(b)}")
    elif ka != kb:
        notes.append(f"A ran on {ka} and B on {kb}: CPU times are Triton's interpreter, not a GPU's; the ratios "
                     "compare the two machines, not the code")
    if pairs and (only_a or only_b):
        notes.append(f"{len(pairs)} cases in both; only in A: {_names(only_a) or 'none'}; "
                     f"only in B: {_names(only_b) or 'none'}")
    if a.device != b.device:
        notes.append(f"devices differ (A: {a.device}; B: {b.device}): the ratios are the hardware's (and its tuning's) "
                     "as much as the code's; 'vs baseline' compares each device with itself")
    changed = [f"{k} {a.versions.get(k)} -> {b.versions.get(k)}" for k in VERSION_KEYS
               if a.versions.get(k) != b.versions.get(k) and (a.versions.get(k) or b.versions.get(k))]
    if changed:
        notes.append("versions differ: " + ", ".join(changed))
    retuned = [f"{p.case} {p.shape}" for p in pairs if p.tuning("a") != p.tuning("b")]
    if retuned:
        notes.append(f"launch configs differ (tuned per device, or retuned) for: {', '.join(retuned)}")
    return BenchComparison(a, b, pairs, only_a, only_b, notes)


def _x(v: float | None, good: float = 1.0) -> str:
    if v is None:
        return "-"
    style = "green" if v > good else "red" if v < good else ""
    text = f"{v:.2f}x" if v >= 0.1 else f"{v:.2g}x"    # the CPU's interpreter is 100s of times slower
    return f"[{style}]{text}[/{style}]" if style else text


def comparison_table(cmp: BenchComparison):
    from rich.table import Table

    from tilestack.perf import report

    t = Table(title=report.escape(f"A = {cmp.a.label}   B = {cmp.b.label}"), header_style="bold")
    for col in ("case", "shape", "time A", "time B", "B speed-up", "baseline B speed-up", "vs baseline A",
                "vs baseline B", "% of roof A", "% of roof B"):
        t.add_column(col, justify="left" if col in ("case", "shape") else "right", overflow="fold")
    for p in cmp.pairs:
        t.add_row(report.escape(p.case), report.escape(p.shape), report.seconds(p._lat("a", OURS)),
                  report.seconds(p._lat("b", OURS)), _x(p.speedup), _x(p.baseline_speedup), _x(p.vs_baseline("a")),
                  _x(p.vs_baseline("b")), report.pct(p.roof("a")), report.pct(p.roof("b")))
    return t


def print_comparison(cmp: BenchComparison, console=None) -> None:
    from tilestack.perf import report

    con = report.console(console)
    if cmp.pairs:
        con.print(comparison_table(cmp))
    for note in cmp.notices:
        con.print(("[bold red]" if note.startswith("NOT COMPARABLE") else "[yellow]") + report.escape(note) + "[/]")
