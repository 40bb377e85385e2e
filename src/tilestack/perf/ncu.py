"""Nsight Compute on one kernel: speed-of-light and memory figures, folded into the same report.

    from tilestack.perf import ncu
    res = ncu.run([sys.executable, "bench_one.py"], kernel_regex="attn", launch_count=1)
    res.kernels[0].sm_throughput_pct, res.kernels[0].dram_bytes, res.summary()
    m = ncu.fold(m, res)            # the Measurement, with ``m.ncu`` filled in (shown by the report)

ncu is run with ``--clock-control none`` (by default it locks clocks to base, slower than what the timing
saw) and exports a report, which is then read back as raw CSV in base units. Counters need permission: in
containers and clouds ncu fails with ``ERR_NVGPUCTRPERM`` unless the host allows profiling by non-admin
users; that is raised as :class:`NcuPermissionError` with what to do, never as a crash.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tilestack.errors import TilestackError

NCU_TIMEOUT_S = 600
CUDA_BIN_DIRS = ("/usr/local/cuda/bin", "/opt/nvidia/nsight-compute")

# metric name -> field of NcuKernel. All exist on Volta through Hopper; SOL as ncu's SpeedOfLight section.
METRICS: dict[str, str] = {
    "gpu__time_duration.sum": "duration_s",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm_throughput_pct",
    "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed": "memory_throughput_pct",
    "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed": "dram_throughput_pct",
    "dram__bytes_read.sum": "dram_bytes_read",
    "dram__bytes_write.sum": "dram_bytes_written",
    "lts__t_bytes.sum": "l2_bytes",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved_occupancy_pct",
    "launch__registers_per_thread": "registers_per_thread",
}
# Unit scales to base units (seconds, bytes); ncu's "base" units are ns and bytes but be lenient.
UNIT_SCALE: dict[str, float] = {
    "nsecond": 1e-9,
    "ns": 1e-9,
    "usecond": 1e-6,
    "us": 1e-6,
    "msecond": 1e-3,
    "ms": 1e-3,
    "second": 1.0,
    "s": 1.0,
    "byte": 1.0,
    "kbyte": 1e3,
    "mbyte": 1e6,
    "gbyte": 1e9,
    "tbyte": 1e12,
    "kibyte": 1024.0,
    "mibyte": 1024.0**2,
    "gibyte": 1024.0**3,
}
PERMISSION_MARKERS = ("ERR_NVGPUCTRPERM", "permission to access NVIDIA GPU Performance Counters")
PERMISSION_HELP = (
    "Nsight Compute may not read the GPU's performance counters here (ERR_NVGPUCTRPERM). On the host, an "
    "administrator must allow it: `options nvidia NVreg_RestrictProfilingToAdminUsers=0` (then reload the "
    "driver), or run the container with CAP_SYS_ADMIN. Timing, energy and the roofline work without it."
)


class NcuError(TilestackError, RuntimeError):
    """ncu is missing, failed, or profiled no kernel."""


class NcuPermissionError(NcuError):
    """The machine does not permit reading performance counters (ERR_NVGPUCTRPERM)."""


@dataclasses.dataclass(frozen=True)
class NcuKernel:
    """ncu's figures for one profiled kernel launch (None where a metric was not reported)."""

    name: str
    duration_s: float | None = None
    sm_throughput_pct: float | None = None
    memory_throughput_pct: float | None = None
    dram_throughput_pct: float | None = None
    dram_bytes_read: float | None = None
    dram_bytes_written: float | None = None
    l2_bytes: float | None = None
    achieved_occupancy_pct: float | None = None
    registers_per_thread: float | None = None
    block_size: str = ""
    grid_size: str = ""

    @property
    def dram_bytes(self) -> float | None:
        if self.dram_bytes_read is None and self.dram_bytes_written is None:
            return None
        return (self.dram_bytes_read or 0.0) + (self.dram_bytes_written or 0.0)


@dataclasses.dataclass(frozen=True)
class NcuResult:
    kernels: list[NcuKernel]
    command: list[str]

    def summary(self) -> dict[str, Any]:
        """All profiled launches as one: times and bytes summed, percentages weighted by time."""
        ks = self.kernels
        total = math.fsum(k.duration_s or 0.0 for k in ks)

        def weighted(field: str) -> float | None:
            vals = [(getattr(k, field), k.duration_s or 0.0) for k in ks if getattr(k, field) is not None]
            if not vals:
                return None
            w = math.fsum(t for _, t in vals)
            return math.fsum(v * t for v, t in vals) / w if w else math.fsum(v for v, _ in vals) / len(vals)

        def summed(field: str) -> float | None:
            vals = [getattr(k, field) for k in ks if getattr(k, field) is not None]
            return math.fsum(vals) if vals else None

        dram = [k.dram_bytes for k in ks if k.dram_bytes is not None]
        return {
            "kernels": [k.name for k in ks],
            "launches": len(ks),
            "duration_s": total or None,
            "sm_throughput_pct": weighted("sm_throughput_pct"),
            "memory_throughput_pct": weighted("memory_throughput_pct"),
            "dram_throughput_pct": weighted("dram_throughput_pct"),
            "achieved_occupancy_pct": weighted("achieved_occupancy_pct"),
            "dram_bytes": math.fsum(dram) if dram else None,
            "l2_bytes": summed("l2_bytes"),
        }


def find_ncu() -> str | None:
    """The ncu executable: on PATH, or in the usual CUDA install folders."""
    found = shutil.which("ncu")
    if found:
        return found
    for d in CUDA_BIN_DIRS:
        p = Path(d) / "ncu"
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def build_command(
    target: Sequence[str],
    *,
    export: str | Path,
    kernel_regex: str | None = None,
    nvtx_include: str | None = None,
    launch_skip: int = 0,
    launch_count: int = 1,
    ncu: str = "ncu",
    metrics: Sequence[str] = tuple(METRICS),
) -> list[str]:
    """The ncu command line that profiles ``launch_count`` launches of argv ``target`` into ``export``."""
    if launch_count < 1:
        raise NcuError(f"launch_count={launch_count!r}; expected at least 1")
    if not target:
        raise NcuError("target=[]; expected the command to profile, e.g. [sys.executable, 'run.py']")
    cmd = [
        ncu,
        "--clock-control",
        "none",
        "--target-processes",
        "all",
        "--metrics",
        ",".join(metrics),
        "--launch-skip",
        str(launch_skip),
        "--launch-count",
        str(launch_count),
        "--export",
        str(export),
        "--force-overwrite",
    ]
    if kernel_regex:
        cmd += ["--kernel-name", f"regex:{kernel_regex}"]
    if nvtx_include:
        cmd += ["--nvtx", "--nvtx-include", nvtx_include]
    return cmd + list(target)


def _number(text: str) -> float | None:
    text = text.strip().replace(",", "")
    if not text or text.lower() in ("n/a", "nan"):
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _scaled(value: str, unit: str) -> float | None:
    v = _number(value)
    return None if v is None else v * UNIT_SCALE.get(unit.strip().lower(), 1.0)


def parse_raw_csv(text: str) -> list[NcuKernel]:
    """Kernels from ``ncu --import rep --csv --page raw --print-units base``: a header row, a unit row, one
    row per launch. The long layout of ncu's default ``details`` page (one row per launch and metric, with
    ``Metric Name``, ``Metric Unit``, ``Metric Value``) is read too."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]  # drop ==PROF== and app output
    table = list(csv.reader(io.StringIO("\n".join(lines))))
    if not table:
        return []
    header = table[0]
    col = {h: i for i, h in enumerate(header)}
    if "Kernel Name" not in col:
        raise NcuError(f"ncu CSV without a 'Kernel Name' column (header {header[:6]}...); expected --page raw")
    if {"Metric Name", "Metric Value"} <= set(col):
        return _parse_long(table[1:], col)
    body = table[1:]
    units = [""] * len(header)
    if body and not body[0][col["Kernel Name"]]:
        units, body = body[0], body[1:]
    kernels = []
    for row in body:
        fields = {
            field: _scaled(row[col[metric]], units[col[metric]])
            for metric, field in METRICS.items()
            if metric in col and col[metric] < len(row)
        }
        kernels.append(_kernel(row, col, fields))
    return kernels


def _kernel(row: list[str], col: dict[str, int], fields: dict[str, Any]) -> NcuKernel:
    get = lambda name: row[col[name]] if name in col and col[name] < len(row) else ""  # noqa: E731
    return NcuKernel(name=get("Kernel Name"), block_size=get("Block Size"), grid_size=get("Grid Size"), **fields)


def _parse_long(body: list[list[str]], col: dict[str, int]) -> list[NcuKernel]:
    by_launch: dict[str, tuple[list[str], dict[str, Any]]] = {}
    unit_col = col.get("Metric Unit")
    for row in body:
        launch = row[col["ID"]] if "ID" in col else str(len(by_launch))
        first, fields = by_launch.setdefault(launch, (row, {}))
        field = METRICS.get(row[col["Metric Name"]])
        if field is not None:
            fields[field] = _scaled(row[col["Metric Value"]], row[unit_col] if unit_col is not None else "")
    return [_kernel(first, col, fields) for first, fields in by_launch.values()]


def _check_output(text: str, returncode: int, cmd: Sequence[str]) -> None:
    if any(marker in text for marker in PERMISSION_MARKERS):
        raise NcuPermissionError(PERMISSION_HELP)
    if "No kernels were profiled" in text:
        raise NcuError(
            "ncu profiled no kernel: the --kernel-name regex or --nvtx-include filter matched nothing "
            f"(command: {' '.join(cmd)})"
        )
    if returncode != 0:
        tail = "\n".join(text.strip().splitlines()[-15:])
        raise NcuError(f"ncu exited with status {returncode}: {' '.join(cmd)}\n{tail}")


def run(
    target: Sequence[str],
    *,
    kernel_regex: str | None = None,
    nvtx_include: str | None = None,
    launch_skip: int = 0,
    launch_count: int = 1,
    timeout_s: float = NCU_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
    keep_report: str | Path | None = None,
) -> NcuResult:
    """Profile ``target`` (an argv, e.g. ``[sys.executable, "run.py"]``) under ncu and parse its figures."""
    exe = find_ncu()
    if exe is None:
        raise NcuError(
            "ncu (Nsight Compute) is not on PATH nor in /usr/local/cuda/bin; install Nsight Compute or add it to PATH"
        )
    with tempfile.TemporaryDirectory(prefix="tilestack-ncu-") as tmp:
        rep = Path(keep_report) if keep_report else Path(tmp) / "report"
        cmd = build_command(
            target,
            export=rep,
            kernel_regex=kernel_regex,
            nvtx_include=nvtx_include,
            launch_skip=launch_skip,
            launch_count=launch_count,
            ncu=exe,
        )
        try:
            p = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout_s, env={**os.environ, **(env or {})}
            )
        except subprocess.TimeoutExpired as e:
            raise NcuError(f"ncu ran past timeout_s={timeout_s}: {' '.join(cmd)}") from e
        _check_output(p.stdout + p.stderr, p.returncode, cmd)
        rep_file = rep if rep.suffix == ".ncu-rep" else rep.with_name(rep.name + ".ncu-rep")
        imp = [exe, "--import", str(rep_file), "--csv", "--page", "raw", "--print-units", "base"]
        q = subprocess.run(imp, capture_output=True, text=True, timeout=timeout_s)
        _check_output(q.stdout + q.stderr, q.returncode, imp)
        kernels = parse_raw_csv(q.stdout)
    if not kernels:
        raise NcuError(f"ncu's report holds no kernel rows (command: {' '.join(cmd)})")
    return NcuResult(kernels, cmd)


def fold(m: Any, result: NcuResult) -> Any:
    """A copy of Measurement ``m`` with ncu's summary in ``m.ncu`` (shown by the reports)."""
    return dataclasses.replace(m, ncu=result.summary())
