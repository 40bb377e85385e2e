"""Reports: rich terminal tables, a roofline PNG, one self-contained HTML file.

    from tilestack.perf import report
    report.print_measurements(ms, title="attention, H100")           # rich table, tips underneath
    report.roofline_png(ms, "roofline.png", device=dev, ceilings=c)   # every kernel a point under both roofs
    report.html_report(ms, "report.html", device=dev, ceilings=c)     # tables + PNG embedded, no links
    for case in report.track(cases, "benchmarking"): ...             # a progress bar for long runs

Everything here takes :class:`~tilestack.perf.metrics.Measurement` objects (live, or read back from the
store), so a report can be rendered again later from a stored run (``tilestack report latest``).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tilestack.files import write_atomic
from tilestack.perf.metrics import Measurement, MetricsError

T = TypeVar("T")

_SI = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""), (1e-3, "m"), (1e-6, "u"))
_TIME = ((1.0, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns"))
PNG_DPI = 120
LABEL_OFFSETS = ((4, 4), (4, -10), (-10, 8))  # points: neighbours' labels alternate so they do not overlap
PIPE_WIDTH = 200  # columns of the tables when output goes to a file (logs, CI)
PNG_SIZE_IN = (9.0, 6.0)
ROOF_INTENSITY_RANGE = (1e-2, 1e4)  # FLOP/byte, the x-axis of the roofline plot
DTYPE_COLORS = {
    "bf16": "tab:blue",
    "fp16": "tab:cyan",
    "fp32": "tab:orange",
    "tf32": "tab:red",
    "fp64": "tab:purple",
    "fp8": "tab:green",
    "int8": "tab:olive",
}


# --- number formatting --------------------------------------------------------------------------------------
def si(x: float | None, unit: str = "", digits: int = 3) -> str:
    """``si(3.02e12, "B/s") == "3.02 TB/s"``, ``si(0.5, "J") == "500 mJ"``; "-" for None, "inf" for infinity."""
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    if x == 0:
        return f"0 {unit}".rstrip()
    for scale, prefix in _SI:
        if abs(x) >= scale:
            return f"{x / scale:.{digits}g} {prefix}{unit}"
    return f"{x:.{digits}g} {unit}".rstrip()


def seconds(x: float | None) -> str:
    """``seconds(2.5e-5) == "25 us"``."""
    if x is None:
        return "-"
    for scale, unit in _TIME:
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x / 1e-9:.3g} ns"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}" if x >= 0.1 else f"{x:.1%}"


def escape(text: str) -> str:
    """``text`` safe to print through rich (``torch.sdpa[flash]`` is not a style tag)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def spread(rel_ci: float | None) -> str:
    """``"+-2.1%"`` for a relative half-width, ``"-"`` for none, ``"+->100%"`` for one that says only "unknown"."""
    if rel_ci is None:
        return "-"
    return "+->100%" if rel_ci > 1 else f"+-{pct(rel_ci)}"


def _with_spread(text: str, ceilings: Any, key: str) -> str:
    """``"3.02 TB/s +-1.2%"``; just the value where no spread was kept (ceilings stored before it was)."""
    rel = getattr(ceilings, "rel_ci", lambda _: None)(key)
    return text if rel is None else f"{text} {spread(rel)}"


def ceilings_line(ceilings: Any) -> str:
    """One line: each measured ceiling with its spread, or why there are none."""
    if ceilings is None:
        return "roofs: no measured ceilings (published peaks only)"
    parts = [_with_spread(f"copy {si(ceilings.copy_bytes_per_s, 'B/s')}", ceilings, "copy")]
    for k, v in ceilings.matmul.items():
        parts.append(_with_spread(f"matmul {k} {si(v, 'FLOP/s')}", ceilings, f"matmul {k}"))
    return f"roofs measured {ceilings.measured_at}: " + ", ".join(parts)


def _config(cfg: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.items())


# --- tables -------------------------------------------------------------------------------------------------
# (heading, how to read it off a Measurement). The terminal and the HTML show the same columns.
COLUMNS: tuple[tuple[str, Any], ...] = (
    ("kernel", lambda m: m.name),
    ("config", lambda m: _config(m.config)),
    ("dtype", lambda m: m.dtype),
    ("latency", lambda m: seconds(m.latency_s)),
    ("+-", lambda m: spread(m.latency_rel_ci)),
    ("items/s", lambda m: si(m.items_per_s, f" {m.item_name}/s") if m.items is not None else "-"),
    ("FLOP/s", lambda m: si(m.flops_per_s, "FLOP/s")),
    ("bytes/s", lambda m: si(m.bytes_per_s, "B/s")),
    ("FLOP/B", lambda m: f"{m.intensity:.3g}"),
    ("compute % meas/pub", lambda m: f"{pct(m.compute_util_measured)} / {pct(m.compute_util_published)}"),
    ("memory % meas/pub", lambda m: f"{pct(m.memory_util_measured)} / {pct(m.memory_util_published)}"),
    ("bound", lambda m: m.bound),
    ("% of roof", lambda m: pct(m.roof_fraction)),
    ("J/op", lambda m: si(m.joules_per_call, "J")),
    ("power", lambda m: si(m.avg_power_w, "W")),
    ("perf/W", lambda m: si(m.flops_per_joule, "FLOP/J")),
)


def check_measurements(where: str, ms: Any) -> None:
    """MetricsError where ``ms`` is not a sequence of Measurements: one Measurement failed with "'Measurement'
    object is not iterable", None likewise, a list holding something else with an AttributeError mid-table, and a
    generator was used up by the table, leaving the tips under it empty."""
    if isinstance(ms, str | bytes) or not isinstance(ms, Sequence):   # (a generator was used up by the table)
        hint = " (one: pass [m])" if isinstance(ms, Measurement) else ""
        raise MetricsError(f"{where}: ms is {type(ms).__name__}{hint}; expected a list of perf.Measurement")
    at = next((i for i, m in enumerate(ms) if not isinstance(m, Measurement)), None)  # by index: None is wrong too
    if at is not None:  # (profiler round 23: [None] passed, then failed mid-table with an AttributeError)
        wrong = ms[at]
        raise MetricsError(f"{where}: ms holds {type(wrong).__name__} {wrong!r:.40}; expected perf.Measurement "
                           f"objects (perf.measure, perf.compute_metrics, Store.measurements); the first other is "
                           f"ms[{at}]")


def check_path(where: str, path: Any, *, none_ok: bool = False) -> None:
    """MetricsError for a ``path`` that is no file path (profiler round 23: html_report(ms, None) failed with a
    TypeError deep in the file writer, after the report was drawn)."""
    if path is None and none_ok:
        return
    if isinstance(path, bool) or not isinstance(path, str | Path) or str(path) == "":
        raise MetricsError(f"{where}: path={path!r:.60} ({type(path).__name__}); expected a file path (str or "
                           f"pathlib.Path){', or None for none' if none_ok else ''}")


def rows(ms: Sequence[Measurement]) -> list[list[str]]:
    return [[str(get(m)) for _, get in COLUMNS] for m in ms]


def measurements_table(ms: Sequence[Measurement], title: str = "") -> Any:
    """A ``rich.table.Table`` of ``ms``, one row each."""
    check_measurements("measurements_table", ms)
    from rich.table import Table

    t = Table(title=escape(title) or None, show_lines=False, header_style="bold")
    for heading, _ in COLUMNS:
        t.add_column(heading, overflow="fold", no_wrap=heading in ("latency", "bound"))
    for r in rows(ms):
        t.add_row(*(escape(c) for c in r))
    return t


def console(given: Any = None) -> Any:
    """``given``, or a rich Console: wide (``PIPE_WIDTH``) when writing to a pipe or a file."""
    if given is not None:
        return given
    from rich.console import Console

    con = Console()
    return con if con.is_terminal else Console(width=PIPE_WIDTH)


def print_measurements(ms: Sequence[Measurement], title: str = "", con: Any = None) -> None:
    """Print the table, then one tip per kernel (and every energy note) underneath."""
    check_measurements("print_measurements", ms)
    con = console(con)
    con.print(measurements_table(ms, title))
    for m in ms:
        con.print(f"[bold]{escape(m.name)}[/bold] {escape(_config(m.config))}: {escape(m.tip)}")
        if m.energy_note:
            con.print(f"  [dim]energy: {escape(m.energy_note)}[/dim]")
        if m.ncu:
            con.print(f"  [dim]ncu: {escape(ncu_summary(m.ncu))}[/dim]")


def energy_summary(m: Measurement) -> str:
    """``"0.52 J/op at 612 W (idle 75 W: 0.46 J/op above idle), 1.9 TFLOP/J"``, or why there is none."""
    if m.joules_per_call is None:
        return m.energy_note or "not measured"
    text = f"{si(m.joules_per_call, 'J')}/op at {si(m.avg_power_w, 'W')}"
    if m.idle_power_w is not None:
        text += f" (idle {si(m.idle_power_w, 'W')}: {si(m.joules_above_idle_per_call, 'J')}/op above idle)"
    return text + (f", {si(m.flops_per_joule, 'FLOP/J')}" if m.flops else "")


def ncu_summary(ncu: Mapping[str, Any]) -> str:
    parts = []
    for key, label in (
        ("sm_throughput_pct", "SM SOL"),
        ("memory_throughput_pct", "memory SOL"),
        ("dram_throughput_pct", "DRAM"),
        ("achieved_occupancy_pct", "occupancy"),
    ):
        if ncu.get(key) is not None:
            parts.append(f"{label} {ncu[key]:.0f}%")
    if ncu.get("dram_bytes") is not None:
        parts.append(f"DRAM bytes {si(ncu['dram_bytes'], 'B')}")
    if ncu.get("duration_s") is not None:
        parts.append(f"time {seconds(ncu['duration_s'])}")
    return ", ".join(parts) or "no figures"


def comparison_table(cmp: Any) -> Any:
    """A ``rich.table.Table`` of a :class:`~tilestack.perf.store.Comparison`."""
    from rich.table import Table

    t = Table(title=escape(f"A = {cmp.a_label}   B = {cmp.b_label}"), header_style="bold")
    for h in ("kernel", "config", "latency A", "latency B", "B speed-up", "FLOP/s A", "FLOP/s B"):
        t.add_column(h, overflow="fold")
    def latency(m: Measurement | None) -> str:
        if m is None:
            return "-"
        return seconds(m.latency_s) + ("" if m.latency_rel_ci is None else f" {spread(m.latency_rel_ci)}")

    for r in cmp.rows:
        sp, noise = r.speedup, r.within_noise
        style = "" if sp is None else "yellow" if noise else "green" if sp > 1 else "red"
        t.add_row(
            escape(r.name),
            escape(_config(r.config)),
            latency(r.a),
            latency(r.b),
            f"[{style}]{sp:.2f}x{' (noise)' if noise else ''}[/{style}]" if sp is not None else "-",
            si(r.a.flops_per_s if r.a else None, "FLOP/s"),
            si(r.b.flops_per_s if r.b else None, "FLOP/s"),
        )
    return t


def track(items: Iterable[T], description: str = "working", total: int | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar (quiet when output is not a terminal)."""
    from rich.progress import track as rich_track

    yield from rich_track(items, description=description, total=total, transient=True)


# --- roofline PNG -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RoofLine:
    """One roof to draw: peak FLOP/s and bandwidth; measured roofs are drawn solid, published ones dashed."""

    label: str
    peak_flops_per_s: float
    bandwidth: float
    dtype: str
    published: bool


def roof_lines(ms: Sequence[Measurement], device: Any = None, ceilings: Any = None) -> list[RoofLine]:
    """The roofs of every dtype among ``ms``: from the device and ceilings where given, else from the rows."""
    lines: list[RoofLine] = []
    for dtype in dict.fromkeys(m.dtype for m in ms):
        first = next(m for m in ms if m.dtype == dtype)
        mp = ceilings.peak(dtype) if ceilings is not None else first.measured_peak_flops
        mb = ceilings.copy_bytes_per_s if ceilings is not None else first.measured_bandwidth
        spec = getattr(device, "spec", None)
        pp = spec.peak(dtype) if spec else first.published_peak_flops
        pb = spec.bandwidth if spec else first.published_bandwidth
        if mp and mb:
            lines.append(RoofLine(f"measured {dtype}", mp, mb, dtype, False))
        if pp and pb:
            lines.append(RoofLine(f"published {dtype}", pp, pb, dtype, True))
    return lines


def roofline_png(
    ms: Sequence[Measurement],
    path: str | Path | None = None,
    *,
    device: Any = None,
    ceilings: Any = None,
    title: str = "",
) -> bytes:
    """Draw the roofline with every measurement as a point; write it to ``path`` (if given), return PNG bytes.

    Kernels with no FLOPs (copies) have no place on a FLOP/s axis and are listed in the caption instead.
    """
    check_measurements("roofline_png", ms)  # (profiler round 23: one Measurement failed as "not iterable")
    check_path("roofline_png", path, none_ok=True)
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=PNG_SIZE_IN, dpi=PNG_DPI)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    lo, hi = ROOF_INTENSITY_RANGE
    finite = [m.intensity for m in ms if m.flops > 0 and math.isfinite(m.intensity)]
    if finite:
        lo, hi = min(lo, min(finite) / 2), max(hi, max(finite) * 2)
    steps = 200
    xs = [lo * (hi / lo) ** (i / steps) for i in range(steps + 1)]
    for line in roof_lines(ms, device, ceilings):
        ys = [min(line.peak_flops_per_s, line.bandwidth * x) for x in xs]
        ax.plot(
            xs,
            ys,
            linestyle="--" if line.published else "-",
            color=DTYPE_COLORS.get(line.dtype, "gray"),
            linewidth=1.2 if line.published else 2.0,
            label=f"{line.label}: {si(line.peak_flops_per_s, 'FLOP/s')}, {si(line.bandwidth, 'B/s')}",
        )
    skipped = []
    for i, m in enumerate(ms):
        if m.flops <= 0:
            skipped.append(m.name)
            continue
        x = m.intensity if math.isfinite(m.intensity) else hi
        ax.scatter([x], [m.flops_per_s], color=DTYPE_COLORS.get(m.dtype, "black"), edgecolor="black", zorder=3)
        ax.annotate(
            f"{i + 1}. {m.name}",
            (x, m.flops_per_s),
            textcoords="offset points",
            xytext=LABEL_OFFSETS[i % len(LABEL_OFFSETS)],
            fontsize=7,
        )
    ax.set_xlabel("arithmetic intensity (FLOP / byte of global memory)")
    ax.set_ylabel("FLOP/s")
    ax.set_title(title or (getattr(device, "name", None) or (ms[0].device if ms else "roofline")))
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    if skipped:
        fig.text(0.01, 0.01, "not plotted (0 FLOPs): " + ", ".join(skipped), fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = buf.getvalue()
    if path is not None:
        write_atomic(path, data)
    return data


# --- HTML ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Section:
    """One part of an HTML report: a heading, an optional table, notes, and an optional PNG."""

    heading: str
    columns: Sequence[str] = ()
    rows: Sequence[Sequence[Any]] = ()
    notes: Sequence[str] = ()
    png: bytes | None = None


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0} tr:nth-child(even) td{background:#fafafa}
h1{font-size:22px} h2{font-size:17px;margin-top:1.6em} .note{color:#555;font-size:13px}
img{max-width:100%;border:1px solid #ddd}
"""


def write_html(path: str | Path, title: str, sections: Sequence[Section]) -> Path:
    """One self-contained HTML file (inline CSS, images as data: URIs, nothing fetched)."""
    e = html.escape
    out = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>",
        f"<p class='note'>generated {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}</p>",
    ]
    for s in sections:
        out.append(f"<h2>{e(s.heading)}</h2>")
        if s.png:
            out.append(f"<img alt='{e(s.heading)}' src='data:image/png;base64,{base64.b64encode(s.png).decode()}'>")
        if s.columns:
            out.append("<table><tr>" + "".join(f"<th>{e(str(c))}</th>" for c in s.columns) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in r) + "</tr>" for r in s.rows]
            out.append("</table>")
        out += [f"<p class='note'>{e(n)}</p>" for n in s.notes]
    out.append("</body></html>")
    return write_atomic(path, "\n".join(out))


def device_section(device: Any = None, ceilings: Any = None, versions: Mapping[str, Any] | None = None) -> Section:
    rows_: list[tuple[str, str]] = []
    if device is not None:
        rows_.append(("device", getattr(device, "name", str(device))))
        spec = getattr(device, "spec", None)
        if spec is not None:
            rows_.append(
                (
                    "published peaks",
                    ", ".join(f"{k} {si(v, 'FLOP/s')}" for k, v in spec.flops.items()) or "none",
                )
            )
            rows_.append(("published bandwidth", si(spec.bandwidth, "B/s")))
            rows_.append(("TDP", si(spec.tdp_w, "W")))
            rows_.append(("source", spec.source))
    if ceilings is not None:
        rows_.append(("measured copy bandwidth", _with_spread(si(ceilings.copy_bytes_per_s, "B/s"), ceilings, "copy")))
        rows_.append(
            (
                "measured matmul",
                ", ".join(
                    _with_spread(f"{k} {si(v, 'FLOP/s')}", ceilings, f"matmul {k}") for k, v in ceilings.matmul.items()
                ),
            )
        )
        rows_.append(("ceilings measured at", ceilings.measured_at))
    for k, v in (versions or {}).items():
        rows_.append((k, str(v)))
    return Section("device", ("", ""), rows_)


def measurement_sections(
    ms: Sequence[Measurement], *, device: Any = None, ceilings: Any = None, title: str = ""
) -> list[Section]:
    """The roofline plot, the metrics table, the tips and (where present) ncu's figures."""
    png = roofline_png(ms, device=device, ceilings=ceilings, title=title)
    out = [
        Section(
            "roofline",
            png=png,
            notes=["solid: measured ceilings; dashed: published peaks. Points are numbered as the table."],
        ),
        Section("results", ["#"] + [h for h, _ in COLUMNS], [[i + 1, *r] for i, r in enumerate(rows(ms))]),
        Section(
            "tips",
            ["#", "kernel", "config", "tip", "energy"],
            [[i + 1, m.name, _config(m.config), m.tip, energy_summary(m)] for i, m in enumerate(ms)],
        ),
    ]
    ncu_rows = [[i + 1, m.name, ncu_summary(m.ncu)] for i, m in enumerate(ms) if m.ncu]
    if ncu_rows:
        out.append(Section("Nsight Compute", ["#", "kernel", "figures"], ncu_rows))
    return out


def html_report(
    ms: Sequence[Measurement],
    path: str | Path,
    *,
    device: Any = None,
    ceilings: Any = None,
    versions: Mapping[str, Any] | None = None,
    title: str = "tilestack report",
    extra: Sequence[Section] = (),
) -> Path:
    """Write the whole report for ``ms`` (roofline embedded) to ``path``."""
    check_measurements("html_report", ms)
    check_path("html_report", path)
    sections = measurement_sections(ms, device=device, ceilings=ceilings, title=title)
    sections += [*extra, device_section(device, ceilings, versions)]
    return write_html(path, title, sections)


def markdown_table(columns: Sequence[str], rows_: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (for docs/)."""
    esc = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(esc(v) for v in r) + " |" for r in rows_]
    return "\n".join(lines)


def measurements_markdown(ms: Sequence[Measurement]) -> str:
    check_measurements("measurements_markdown", ms)
    return markdown_table([h for h, _ in COLUMNS], rows(ms))
