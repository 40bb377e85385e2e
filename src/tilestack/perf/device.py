"""The device: what it is, what its spec sheet promises, and what it measurably reaches.

    from tilestack.perf import device
    dev = device.detect()                  # the first GPU, else the CPU
    dev.name, dev.spec.peak("bf16")        # "NVIDIA H100 80GB HBM3", 9.89e14 (published, dense)
    c = device.ceilings(dev)               # measured once per device and machine, cached on disk
    c.copy_bytes_per_s, c.matmul["bf16"]
    c.spread["copy"]["rel_ci"]             # each ceiling known to +- this (95% interval of the median)
    device.ceilings(dev, remeasure=True)   # measure again (``tilestack device --remeasure``)

Published peaks are dense (no 2:4 sparsity), from the vendors' data sheets, for the matrix units of each
dtype (``fp32`` is the non-tensor-core rate, ``tf32`` the tensor-core one). Utilisation is reported against
both these and the measured ceilings: the spec sheet says what the silicon could do, the ceiling what a
well-written kernel reaches here (clocks, power limits, memory controller efficiency).

Each ceiling is timed until its median is known to ``CEILING_TARGET_REL_CI`` or its time budget is spent, and
keeps its spread (``Ceilings.spread``). A cached file is used only on the machine that measured it (host,
cores, memory, device, torch version: ``machine_fingerprint``) and while each ceiling's spread is within
``MAX_CACHED_REL_CI``; otherwise the ceilings are measured again, and where a busy machine cannot do better,
each ceiling keeps the better-known of its measurements, up to ``MAX_REMEASURES`` tries.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import numbers
import os
import platform
import re
import socket
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tilestack import config
from tilestack.errors import DeviceError
from tilestack.perf import timing

TERA = 1e12
GIGA = 1e9
MIB = 1 << 20

# How large the ceiling measurements are. GPU copies are many times the L2 so they stream from HBM; matmuls
# are large enough to reach the matrix units' plateau. The CPU sizes keep `tilestack device` to seconds.
GPU_COPY_BYTES = 1 << 30
CPU_COPY_BYTES = 64 * MIB
GPU_MATMUL_N = (4096, 8192)  # cuBLAS peaks at different sizes per dtype and GPU: the ceiling is the best
CPU_MATMUL_N = (1024,)
GPU_MATMUL_DTYPES = ("fp32", "tf32", "bf16", "fp16")
CPU_MATMUL_DTYPES = ("fp32", "bf16")
MEASURABLE_DTYPES = ("fp64", "fp32", "tf32", "bf16", "fp16")   # those measure_ceilings times
MIG_MARKER = " mig "
CEILINGS_FORMAT = 2  # bumped when the cached file's layout changes; older files are measured again
CEILING_TARGET_REL_CI = 0.02  # time each ceiling until its median is known to +-2% ...
GPU_CEILING_BUDGET_S = 3.0  # ... or this many seconds of timed calls have passed (per ceiling and size)
CPU_CEILING_BUDGET_S = 1.0
MAX_CACHED_REL_CI = 0.1  # a cached ceiling known worse than +-10% (or from too few calls) is measured again ...
MAX_REMEASURES = 3  # ... at most this many times; then it is used, with its spread shown


@dataclasses.dataclass(frozen=True)
class PeakSpec:
    """A device's published peaks: ``flops`` by dtype (FLOP/s, dense), ``bandwidth`` (bytes/s), ``tdp_w``.

    ``patterns`` are regular expressions matched, case-insensitively, against the name the driver reports.
    """

    key: str
    label: str
    patterns: tuple[str, ...]
    flops: dict[str, float]
    bandwidth: float | None
    tdp_w: float | None = None
    l2_bytes: int | None = None
    source: str = ""

    def peak(self, dtype: str) -> float | None:
        """Published FLOP/s for ``dtype`` (``"bf16"``...), or None where the sheet gives none."""
        return self.flops.get(dtype)


def _tf(**per_dtype: float) -> dict[str, float]:
    return {k: v * TERA for k, v in per_dtype.items()}


# The spec-sheet table. Order matters: the first entry whose pattern matches wins ("L40S" before "L4").
PEAKS: tuple[PeakSpec, ...] = (
    PeakSpec(
        "h100-sxm",
        "H100 SXM",
        (r"h100.*(sxm|hbm3)",),
        _tf(fp64=67, fp32=67, tf32=494.7, bf16=989.4, fp16=989.4, fp8=1978.9, int8=1978.9),
        3.35e12,
        700,
        50 * MIB,
        "NVIDIA H100 datasheet (SXM5), dense",
    ),
    PeakSpec(
        "h100-nvl",
        "H100 NVL",
        (r"h100.*nvl",),
        _tf(fp64=60, fp32=60, tf32=417.5, bf16=835, fp16=835, fp8=1670, int8=1670),
        3.9e12,
        400,
        50 * MIB,
        "NVIDIA H100 datasheet (NVL), dense",
    ),
    PeakSpec(
        "h100-pcie",
        "H100 PCIe",
        (r"h100.*pcie",),
        _tf(fp64=51, fp32=51, tf32=378, bf16=756, fp16=756, fp8=1513, int8=1513),
        2.0e12,
        350,
        50 * MIB,
        "NVIDIA H100 datasheet (PCIe), dense",
    ),
    PeakSpec(
        "h200-nvl",
        "H200 NVL",
        (r"h200.*nvl",),
        _tf(fp64=60, fp32=60, tf32=417.5, bf16=835, fp16=835, fp8=1670, int8=1670),
        4.8e12,
        600,
        50 * MIB,
        "NVIDIA H200 datasheet (NVL), dense",
    ),
    PeakSpec(
        "gh200",
        "GH200 (96 GB HBM3)",
        (r"gh200",),
        _tf(fp64=67, fp32=67, tf32=494.7, bf16=989.4, fp16=989.4, fp8=1978.9, int8=1978.9),
        4.0e12,
        None,  # the module's power is configurable, shared with the Grace CPU
        50 * MIB,
        "NVIDIA GH200 datasheet, dense (the 144 GB HBM3e part has 4.9 TB/s)",
    ),
    PeakSpec(
        "h200",
        "H200 SXM",
        (r"\bh200",),
        _tf(fp64=67, fp32=67, tf32=494.7, bf16=989.4, fp16=989.4, fp8=1978.9, int8=1978.9),
        4.8e12,
        700,
        50 * MIB,
        "NVIDIA H200 datasheet (SXM), dense",
    ),
    PeakSpec(
        "a100-sxm-80gb",
        "A100 SXM 80GB",
        (r"a100.*sxm.*80",),
        _tf(fp64=19.5, fp32=19.5, tf32=156, bf16=312, fp16=312, int8=624),
        2.039e12,
        400,
        40 * MIB,
        "NVIDIA A100 datasheet, dense",
    ),
    PeakSpec(
        "a100-sxm-40gb",
        "A100 SXM 40GB",
        (r"a100.*sxm",),
        _tf(fp64=19.5, fp32=19.5, tf32=156, bf16=312, fp16=312, int8=624),
        1.555e12,
        400,
        40 * MIB,
        "NVIDIA A100 datasheet, dense",
    ),
    PeakSpec(
        "a100-pcie-80gb",
        "A100 PCIe 80GB",
        (r"a100.*80gb.*pcie", r"a100.*pcie.*80"),
        _tf(fp64=19.5, fp32=19.5, tf32=156, bf16=312, fp16=312, int8=624),
        1.935e12,
        300,
        40 * MIB,
        "NVIDIA A100 datasheet, dense",
    ),
    PeakSpec(
        "a100-pcie-40gb",
        "A100 PCIe 40GB",
        (r"a100",),
        _tf(fp64=19.5, fp32=19.5, tf32=156, bf16=312, fp16=312, int8=624),
        1.555e12,
        250,
        40 * MIB,
        "NVIDIA A100 datasheet, dense",
    ),
    PeakSpec(
        "l40s",
        "L40S",
        (r"l40s",),
        _tf(fp32=91.6, tf32=183, bf16=362.05, fp16=362.05, fp8=733, int8=733),
        0.864e12,
        350,
        96 * MIB,
        "NVIDIA L40S datasheet, dense",
    ),
    PeakSpec(
        "l4",
        "L4",
        (r"\bl4\b",),
        _tf(fp32=30.3, tf32=60, bf16=121, fp16=121, fp8=242.5, int8=242.5),
        0.3e12,
        72,
        48 * MIB,
        "NVIDIA L4 datasheet, dense",
    ),
    # CPUs differ too much for one sheet: no published peaks, so utilisation is against measured ceilings.
    PeakSpec("cpu", "CPU", (r"^cpu\b",), {}, None, None, None, "none: measured ceilings only"),
)


def lookup_peaks(name: str, *, strict: bool = True) -> PeakSpec | None:
    """The spec-sheet entry for a driver-reported name.

        lookup_peaks("NVIDIA H100 80GB HBM3").key == "h100-sxm"

    A key of the table (``"h100-sxm"``) is accepted too. Unknown names raise :class:`DeviceError`
    (or return None with ``strict=False``: an unknown GPU still gets measured ceilings).
    """
    if not isinstance(name, str):
        raise DeviceError(f"lookup_peaks: name={name!r} ({type(name).__name__}); expected a device name (str)")
    text = name.strip().lower()
    for spec in PEAKS:
        if text == spec.key or any(re.search(p, text) for p in spec.patterns):
            return spec
    if strict:
        known = ", ".join(s.label for s in PEAKS)
        raise DeviceError(f"device name={name!r} is not in the table of published peaks; expected one of: {known}")
    return None


@dataclasses.dataclass(frozen=True)
class Device:
    """One device to measure on. ``kind`` is ``"cuda"`` or ``"cpu"``; ``spec`` None for an unknown GPU."""

    kind: str
    name: str
    index: int = 0
    spec: PeakSpec | None = None
    sm_count: int | None = None
    memory_bytes: int | None = None
    capability: str | None = None
    cores: int | None = None
    l2_cache_bytes: int | None = None  # as the driver reports it

    def __post_init__(self):
        # checked when made: a Device of kind "gpu", a name 3 or an index -1 was kept and failed later, far from
        # here (`slug`'s "'int' object has no attribute 'lower'"), or timed on another device than named
        if not isinstance(self.kind, str) or self.kind not in ("cuda", "cpu"):
            raise DeviceError(f"Device: kind={self.kind!r:.60} ({type(self.kind).__name__}); expected 'cuda' or 'cpu'")
        if not isinstance(self.name, str) or not self.name.strip():
            raise DeviceError(f"Device: name={self.name!r:.60} ({type(self.name).__name__}); expected the device's "
                              "name, a non-empty str")
        if self.spec is not None and not isinstance(self.spec, PeakSpec):
            raise DeviceError(f"Device: spec={self.spec!r:.60} ({type(self.spec).__name__}); expected None or a "
                              "PeakSpec (perf.lookup_peaks(name))")
        if self.capability is not None and not (isinstance(self.capability, str)
                                                and re.fullmatch(r"\d+\.\d+", self.capability)):
            raise DeviceError(f"Device: capability={self.capability!r:.60}; expected None or '<major>.<minor>' "
                              "('9.0')")
        for arg, least in (("index", 0), ("sm_count", 1), ("memory_bytes", 1), ("cores", 1), ("l2_cache_bytes", 0)):
            value = getattr(self, arg)
            if value is None and arg != "index":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise DeviceError(f"Device: {arg}={value!r:.60} ({type(value).__name__}); expected "
                                  f"{'' if arg == 'index' else 'None or '}an int >= {least}")
            object.__setattr__(self, arg, int(value))   # a NumPy int as the int it is (describe() goes to JSON)

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else "cpu"

    @property
    def slug(self) -> str:
        """A file-name-safe identity: ``nvidia-h100-80gb-hbm3``."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or self.kind

    @property
    def l2_bytes(self) -> int | None:
        """The L2 size the driver reports, else the spec sheet's."""
        return self.l2_cache_bytes or (self.spec.l2_bytes if self.spec else None)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "index": self.index,
            "spec": self.spec.key if self.spec else None,
            "sm_count": self.sm_count,
            "memory_bytes": self.memory_bytes,
            "capability": self.capability,
            "cores": self.cores,
        }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_device() -> Device:
    """The host CPU (its name as /proc/cpuinfo reports it, with ``cpu:`` in front)."""
    return Device("cpu", f"cpu: {_cpu_name()}", 0, lookup_peaks("cpu"), cores=os.cpu_count())


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (False, not an error, where torch itself is a CPU build)."""
    try:
        import torch
    except ImportError:
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver install makes is_available() raise on some builds
        return False


def detect(device: str | int | None = None) -> Device:
    """The device to measure on: ``None`` picks ``cuda:0`` if present, else the CPU.

    detect("cpu"); detect("cuda:1"); detect(0)
    """
    if device is None:
        device = "cuda" if cuda_available() else "cpu"
    text = str(device)
    if text.isdigit():
        text = f"cuda:{text}"
    if re.fullmatch(r"cpu(?::\d+)?", text):  # torch.device("cpu", 0) reads "cpu:0": the one CPU, as torch takes it
        return cpu_device()
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not m:
        raise DeviceError(f"device={device!r}; expected 'cpu', 'cuda', 'cuda:N' or a GPU index")
    if not cuda_available():
        raise DeviceError(f"device={device!r} asked for, but torch sees no CUDA GPU here; use device='cpu'")
    import torch

    index = int(m.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device={device!r}; expected an index below the {count} GPU(s) present")
    props = torch.cuda.get_device_properties(index)
    return Device(
        "cuda",
        props.name,
        index,
        # A MIG slice has a fraction of the SMs and bandwidth: the sheet's whole-GPU peaks would mislead.
        None if MIG_MARKER in props.name.lower() else lookup_peaks(props.name, strict=False),
        sm_count=props.multi_processor_count,
        memory_bytes=props.total_memory,
        capability=f"{props.major}.{props.minor}",
        l2_cache_bytes=getattr(props, "L2_cache_size", None),
    )


def versions() -> dict[str, str | None]:
    """Versions that change what a measurement means: Python, tilestack, torch, CUDA, Triton, the driver."""
    import tilestack

    out: dict[str, str | None] = {"python": platform.python_version(), "tilestack": tilestack.__version__}
    try:
        import torch

        out["torch"] = torch.__version__
        out["cuda"] = torch.version.cuda
    except ImportError:
        out["torch"] = None
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    from tilestack.perf import energy

    out["driver"] = energy.driver_version()
    return out


@dataclasses.dataclass
class Ceilings:
    """What this device measurably reaches: copy bandwidth (read + written B/s), matmul FLOP/s by dtype.

    ``spread`` has one entry per ceiling (``"copy"``, ``"matmul bf16"``...): ``rel_ci`` (half-width of the
    median's 95% interval over the median), ``rel_spread`` ((p90 - p10) / median of single calls),
    ``repeats`` and ``converged``. ``machine`` is the :func:`machine_fingerprint` of where it was measured;
    ``measurements`` how many measurements the cached file has merged.
    """

    device: str
    copy_bytes_per_s: float
    matmul: dict[str, float]
    measured_at: str
    versions: dict[str, Any] = dataclasses.field(default_factory=dict)
    sizes: dict[str, Any] = dataclasses.field(default_factory=dict)
    format: int = CEILINGS_FORMAT
    spread: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    machine: dict[str, Any] = dataclasses.field(default_factory=dict)
    measurements: int = 1

    def __post_init__(self) -> None:
        # checked when made, as roofline.Roof is (profiler round 24): a negative or NaN rate was refused only once a
        # profile's rows were placed, after every step had run, naming a roof field the caller never set; a rate
        # keyed by a name that is no short dtype name ("float32") or a list of rates was taken, and every row of
        # that dtype read "bound unknown" with no word said
        if not isinstance(self.device, str) or not self.device:
            raise DeviceError(f"Ceilings: device={self.device!r:.60} ({type(self.device).__name__}); expected the "
                              "device's name, a non-empty str (dev.name)")
        if not _is_rate(self.copy_bytes_per_s):
            raise DeviceError(f"Ceilings: copy_bytes_per_s={self.copy_bytes_per_s!r:.60} "
                              f"({type(self.copy_bytes_per_s).__name__}); expected a positive, finite bandwidth in "
                              "bytes/s")
        if not isinstance(self.matmul, dict):
            raise DeviceError(f"Ceilings: matmul={self.matmul!r:.60} ({type(self.matmul).__name__}); expected a dict "
                              "of matmul FLOP/s by dtype short name ({'fp32': 2e11})")
        from tilestack.perf import formulas

        for dtype, rate in self.matmul.items():
            if not (isinstance(dtype, str) and dtype in formulas.DTYPE_BYTES):
                raise DeviceError(f"Ceilings: matmul key {dtype!r:.60}; expected a dtype short name, one of "
                                  f"{sorted(formulas.DTYPE_BYTES)}")
            if not _is_rate(rate):
                raise DeviceError(f"Ceilings: matmul[{dtype!r}]={rate!r:.60} ({type(rate).__name__}); expected a "
                                  "positive, finite rate in FLOP/s")

    def rel_ci(self, ceiling: str) -> float | None:
        """How well ``ceiling`` (``"copy"``, ``"matmul fp32"``) is known; None where no spread was kept."""
        value = self.spread.get(ceiling, {}).get("rel_ci")
        return None if value is None else float(value)

    @property
    def worst(self) -> tuple[str, float] | None:
        """The least well-known ceiling and its ``rel_ci``, or None where no spread was kept."""
        known = [(k, float(v["rel_ci"])) for k, v in self.spread.items() if v.get("rel_ci") is not None]
        return max(known, key=lambda kv: kv[1]) if known else None

    def peak(self, dtype: Any) -> float | None:
        """Measured FLOP/s for ``dtype``, a short name or a torch / numpy dtype (torch.float64 reads ``fp64``); None
        where it was not measured, or for no dtype (None, ""); ``tf32`` falls back to ``fp32`` where only that was
        measured. A name tilestack does not know is refused (profiler round 25: ``peak(torch.float64)`` and
        ``peak("float64")`` read None, no roof, beside a measured fp64 one)."""
        if dtype is None or dtype == "":
            return None
        from tilestack.perf import formulas

        try:
            dtype = formulas.dtype_name(dtype)
        except Exception:
            raise DeviceError(f"Ceilings.peak: dtype={dtype!r:.60} ({type(dtype).__name__}); expected a dtype short "
                              f"name, one of {sorted(formulas.DTYPE_BYTES)}, or a torch dtype of one") from None
        if dtype in self.matmul:
            return self.matmul[dtype]
        return self.matmul.get("fp32") if dtype == "tf32" else None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def ceilings_path(dev: Device) -> Path:
    """Where ``dev``'s measured ceilings are cached: ``<cache_dir>/perf/ceilings-<slug>.json``."""
    return Path(config.knobs.cache_dir) / "perf" / f"ceilings-{dev.slug}.json"


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return None


def machine_fingerprint(dev: Device) -> dict[str, Any]:
    """What makes ceilings measured here valid here only: host, cores, memory, the device, torch's version.

    Two machines with the same CPU model name (a cache directory shared over NFS, a copied home) differ here.
    """
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    d = dev.describe()
    d.pop("index", None)  # the same GPU model at another index is the same ceilings
    return {
        "host": socket.gethostname(),
        "cores": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "device": d,
        "torch": torch_version,
    }


def _is_rate(value: Any) -> bool:
    """A positive, finite real number (not a bool, a str or NaN): a measured bandwidth or FLOP rate."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value < math.inf


_CEILINGS_TYPES = {"device": str, "copy_bytes_per_s": (int, float), "matmul": dict, "measured_at": str,
                   "versions": dict, "sizes": dict, "format": int, "spread": dict, "machine": dict,
                   "measurements": int}


def _load(path: Path, dev: Device) -> Ceilings | None:
    """The ceilings cached in ``path`` for ``dev``; None where there are none, or none usable: another device's,
    an older layout, or a file that is not ceilings (truncated, garbage, another shape), this last with a warning."""
    try:
        data = json.loads(path.read_text())
        c = Ceilings(**data)
        wrong = [k for k, t in _CEILINGS_TYPES.items() if not isinstance(getattr(c, k), t)]
        if not wrong:
            wrong = [f"spread[{k!r}]" for k, v in c.spread.items() if not isinstance(v, dict)]
            wrong += [f"matmul[{k!r}]" for k, v in c.matmul.items() if not isinstance(v, int | float)]
        if wrong:
            raise TypeError(f"{', '.join(wrong)} of the wrong type")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        warnings.warn(f"ceilings cached in {path} cannot be read ({type(e).__name__}: {e}); measuring again",
                      stacklevel=3)
        return None
    return c if c.format == CEILINGS_FORMAT and c.device == dev.name else None


def stale_reason(cached: Ceilings, dev: Device) -> str | None:
    """Why a cached measurement cannot be used here as it is (another machine; a ceiling known too loosely),
    or None. A ceiling still too loose after ``MAX_REMEASURES`` measurements is used, spread and all."""
    here = machine_fingerprint(dev)
    differ = sorted(k for k in here if cached.machine.get(k) != here[k])
    if differ:
        return "measured on another machine or software (" + ", ".join(
            f"{k} {cached.machine.get(k)!r}, here {here[k]!r}" for k in differ
        ) + ")"
    if not cached.spread:
        return "no spread kept with the ceilings"
    if cached.measurements >= MAX_REMEASURES:
        return None
    for name, entry in cached.spread.items():
        if entry.get("repeats", 0) < timing.MIN_CI_SAMPLES:
            return f"{name} timed only {entry.get('repeats', 0)} times"
        if entry.get("rel_ci", math.inf) > MAX_CACHED_REL_CI:
            return f"{name} known only to +-{entry['rel_ci']:.0%} (above +-{MAX_CACHED_REL_CI:.0%})"
    return None


def _merge(old: Ceilings, new: Ceilings) -> Ceilings:
    """Each ceiling from whichever of two measurements on this machine knows it better (smaller ``rel_ci``)."""
    def better(k: str) -> bool:  # the old one, known at least as well
        o, n = old.rel_ci(k), new.rel_ci(k)
        return o is not None and o <= (math.inf if n is None else n)

    copy = old if better("copy") else new
    matmul, spread = dict(new.matmul), {**new.spread, "copy": copy.spread.get("copy", {})}
    for dtype, rate in old.matmul.items():
        key = f"matmul {dtype}"
        if dtype not in new.matmul or better(key):
            matmul[dtype], spread[key] = rate, old.spread.get(key, {})
    return dataclasses.replace(
        new,
        copy_bytes_per_s=copy.copy_bytes_per_s,
        matmul=matmul,
        spread=spread,
        measurements=old.measurements + new.measurements,
    )


def _check_ceiling_args(dev, copy_bytes, matmul_n, dtypes, budget_s) -> None:
    """ceilings' arguments, before the cache is read or anything measured."""
    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if dev is not None and not isinstance(dev, Device):
        raise DeviceError(f"ceilings: dev={dev!r} ({type(dev).__name__}); expected a perf.Device (perf.detect(...)) "
                          "or None")
    if copy_bytes is not None and not count(copy_bytes):
        raise DeviceError(f"ceilings: copy_bytes={copy_bytes!r}; expected None or an int > 0")
    sizes = [matmul_n] if isinstance(matmul_n, int) else list(matmul_n) if isinstance(matmul_n, Sequence) else []
    if matmul_n is not None and (isinstance(matmul_n, str) or not sizes or not all(count(n) for n in sizes)):
        raise DeviceError(f"ceilings: matmul_n={matmul_n!r}; expected None, an int > 0 or a sequence of them")
    if dtypes is not None and (isinstance(dtypes, str) or not isinstance(dtypes, Iterable)
                               or not set(dtypes) <= set(MEASURABLE_DTYPES)):
        raise DeviceError(f"ceilings: dtypes={dtypes!r}; expected None or some of {MEASURABLE_DTYPES}")
    if budget_s is not None and (isinstance(budget_s, bool) or not isinstance(budget_s, int | float)
                                 or not 0 < budget_s < math.inf):
        raise DeviceError(f"ceilings: budget_s={budget_s!r}; expected None or a finite number of seconds > 0")


def ceilings(
    dev: Device | None = None,
    *,
    remeasure: bool = False,
    copy_bytes: int | None = None,
    matmul_n: int | Sequence[int] | None = None,
    dtypes: Iterable[str] | None = None,
    budget_s: float | None = None,
) -> Ceilings:
    """The device's measured ceilings, from the on-disk cache or measured now (and cached).

    ``copy_bytes``, ``matmul_n`` and ``dtypes`` override the default sizes (tests use small ones); sizes that
    differ from the cached ones are measured again. ``budget_s`` is the time budget of each ceiling (default
    ``GPU_CEILING_BUDGET_S`` / ``CPU_CEILING_BUDGET_S``). A cached file from another machine, or whose spread
    is too large (:func:`stale_reason`), is measured again, with a warning that says why.
    """
    if not isinstance(remeasure, bool):     # (remeasure="no" was taken by its truth and measured for seconds)
        raise DeviceError(f"ceilings: remeasure={remeasure!r:.60} ({type(remeasure).__name__}); expected True or "
                          "False")
    _check_ceiling_args(dev, copy_bytes, matmul_n, dtypes, budget_s)
    dev = dev or detect()
    path = ceilings_path(dev)
    cached = None if remeasure else _load(path, dev)
    gpu = dev.kind == "cuda"
    copy_bytes = copy_bytes or (GPU_COPY_BYTES if gpu else CPU_COPY_BYTES)
    sizes = [
        int(n)
        for n in ((matmul_n,) if isinstance(matmul_n, int) else matmul_n or (GPU_MATMUL_N if gpu else CPU_MATMUL_N))
    ]
    dtypes = tuple(dtypes or (GPU_MATMUL_DTYPES if gpu else CPU_MATMUL_DTYPES))
    budget_s = budget_s or (GPU_CEILING_BUDGET_S if gpu else CPU_CEILING_BUDGET_S)
    same_sizes = (
        cached is not None
        and cached.sizes.get("copy_bytes") == copy_bytes
        and cached.sizes.get("matmul_n") == sizes
        and set(dtypes) <= set(cached.matmul)
    )
    reason = stale_reason(cached, dev) if cached is not None and same_sizes else None
    if cached is not None and same_sizes and reason is None:
        return cached
    c = measure_ceilings(dev, copy_bytes=copy_bytes, matmul_n=sizes, dtypes=dtypes, budget_s=budget_s)
    if reason is not None:
        if not reason.startswith("measured on another"):  # only this machine's own measurements merge
            c = _merge(cached, c)
        warnings.warn(f"ceilings cached in {path} measured again: {reason}", stacklevel=2)
    worst = c.worst
    if worst is not None and worst[1] > MAX_CACHED_REL_CI:
        warnings.warn(
            f"ceilings of {dev.name}: {worst[0]} known only to +-{worst[1]:.0%} within its {budget_s:g} s budget "
            "(a busy machine?): utilisations against it are that uncertain",
            stacklevel=2,
        )
    from tilestack.files import write_atomic
    try:  # its temporaries named "<stem>.<pid>.*.tmp", as before tilestack.files
        write_atomic(path, json.dumps(c.to_json(), indent=2), tmp_prefix=f"{path.stem}.")
    except OSError as e:  # a read-only cache dir costs a re-measure next time, not this run
        warnings.warn(f"ceilings not cached: cannot write {path} ({e}); set TILESTACK_CACHE_DIR", stacklevel=2)
    return c


def _spread(t: Any) -> dict[str, Any]:
    return {"rel_ci": t.rel_ci, "rel_spread": t.rel_spread, "repeats": t.repeats, "converged": t.converged}


def measure_ceilings(
    dev: Device,
    *,
    copy_bytes: int,
    matmul_n: Sequence[int],
    dtypes: Iterable[str],
    budget_s: float | None = None,
    target_rel_ci: float = CEILING_TARGET_REL_CI,
) -> Ceilings:
    """Measure copy bandwidth and matmul rate per dtype on ``dev`` now (no cache), each timed until its median
    is known to ``target_rel_ci`` or ``budget_s`` (per ceiling and size) is spent.

    The matmul ceiling of a dtype is the best rate over the square sizes ``matmul_n``.
    """
    import torch

    budget_s = budget_s or (GPU_CEILING_BUDGET_S if dev.kind == "cuda" else CPU_CEILING_BUDGET_S)
    until = {"target_rel_ci": target_rel_ci, "budget_s": budget_s}
    td = dev.torch_device
    n_copy = max(1, copy_bytes // 4)  # fp32 elements
    src = torch.empty(n_copy, dtype=torch.float32, device=td).uniform_()
    dst = torch.empty_like(src)
    t = timing.time_fn(lambda s, d: d.copy_(s), args_sets=[(src, dst)], device=dev, **until)
    copy_bw = 2 * n_copy * 4 / t.median_s  # bytes read + bytes written
    spread = {"copy": _spread(t)}
    del src, dst

    matmul: dict[str, float] = {}
    for name in dtypes:
        torch_dtype = {
            "fp32": torch.float32,
            "tf32": torch.float32,
            "bf16": torch.bfloat16,
            "fp16": torch.float16,
            "fp64": torch.float64,
        }.get(name)
        if torch_dtype is None:
            raise DeviceError(f"dtypes contains {name!r}; expected some of fp64, fp32, tf32, bf16, fp16")
        for n in matmul_n:
            a = torch.randn(n, n, device=td).to(torch_dtype)
            b = torch.randn(n, n, device=td).to(torch_dtype)
            out = torch.empty_like(a)
            allow = torch.backends.cuda.matmul.allow_tf32
            try:
                torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
                t = timing.time_fn(
                    lambda x, y, o: torch.mm(x, y, out=o), args_sets=[(a, b, out)], device=dev, **until
                )
            finally:
                torch.backends.cuda.matmul.allow_tf32 = allow
            rate = 2 * n**3 / t.median_s
            if rate > matmul.get(name, 0.0):
                matmul[name], spread[f"matmul {name}"] = rate, _spread(t)
            del a, b, out
    return Ceilings(
        dev.name,
        copy_bw,
        matmul,
        datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        versions(),
        {"copy_bytes": copy_bytes, "matmul_n": list(matmul_n)},
        spread=spread,
        machine=machine_fingerprint(dev),
    )
