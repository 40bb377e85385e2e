"""Roofline placement: is a kernel memory- or compute-bound, how far below its roof, and what to try.

    from tilestack.perf.roofline import Roof, place
    roof = Roof(peak_flops_per_s=7.6e14, bandwidth=3.0e12, label="measured")
    p = place(flops=2 * 4096**3, bytes_moved=3 * 2 * 4096**2, seconds=2.1e-4, roof=roof)
    p.bound, p.fraction, p.distance, p.tip     # "compute", 0.86, 1.16, "compute-bound at 86% ..."
    place(..., kind="cpu").tip                 # the advice of the device at hand: caches, cores, SIMD

The roof at arithmetic intensity I (FLOPs per byte of global memory) is ``min(peak, bandwidth * I)``; the
ridge point ``peak / bandwidth`` separates the memory-bound side from the compute-bound one.
``fraction`` is the achieved rate over the roof at the kernel's intensity (FLOP/s on the compute side,
bytes/s on the memory side: the two agree, since there the roof's FLOP/s is bandwidth times intensity).
The tip names the situation (which side, how far below the roof) in the words of the device kind: a GPU's
(launches, CUDA graphs, coalesced loads, occupancy, matrix units) or a CPU's (per-op overhead, cores,
contiguous data and SIMD, caches); ``TIPS`` holds both.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from tilestack.errors import TilestackError

LAUNCH_BOUND_S = 10e-6  # below this a kernel's time is mostly launch and tail latency, not throughput
# Below this an eager CPU op far from its roof is mostly framework overhead (Python, dispatch, allocation,
# waking the thread pool: each some microseconds), not its work.
CPU_OVERHEAD_BOUND_S = 100e-6
LATENCY_BOUND_S = {"cuda": LAUNCH_BOUND_S, "cpu": CPU_OVERHEAD_BOUND_S}
# Below this fraction of its roof a CPU op's time is not in its work at all: overhead, an oversubscribed
# thread pool, or a machine busy with other work (a 32x32 matmul timed at 70 ms on a loaded 2-core VM).
CPU_FAR_FRACTION = 0.02
LOW_FRACTION = 0.5  # below half the roof: something structural (loads, tiles, occupancy) is wrong
NEAR_ROOF_FRACTION = 0.8  # above this: only less work or fewer bytes help
RIDGE_BAND = 2.0  # within 2x of the ridge point, both bytes and math matter
ABOVE_ROOF_FRACTION = 1.1  # more than 10% above a measured roof is not noise: the counts or the roof are off


@dataclasses.dataclass(frozen=True)
class Roof:
    """A compute peak (FLOP/s) and a memory bandwidth (bytes/s); either may be None where unknown."""

    peak_flops_per_s: float | None
    bandwidth: float | None
    label: str = "measured"

    def __post_init__(self):
        # checked when made (a negative, NaN or str roof gave a negative or NaN ridge, or a bare TypeError, to every
        # reader before place() refused it); the message names the field as place() has always named it
        for arg in ("peak_flops_per_s", "bandwidth"):
            value = getattr(self, arg)
            if value is not None and (not _is_number(value) or not 0 <= value < math.inf):
                raise RooflineError(f"roof.{arg}={value!r:.60} ({type(value).__name__}); expected None (unknown) or "
                                    "a finite rate >= 0")
        if not isinstance(self.label, str):
            raise RooflineError(f"roof.label={self.label!r:.60} ({type(self.label).__name__}); expected a str "
                                "('measured', 'published')")

    @property
    def ridge(self) -> float | None:
        """The intensity (FLOP/byte) where the memory slope meets the compute peak."""
        if not self.peak_flops_per_s or not self.bandwidth:
            return None
        return self.peak_flops_per_s / self.bandwidth

    def attainable(self, intensity: float) -> float | None:
        """The roof's FLOP/s at ``intensity``: ``min(peak, bandwidth * intensity)``."""
        caps = []
        if self.peak_flops_per_s:
            caps.append(self.peak_flops_per_s)
        if self.bandwidth and math.isfinite(intensity):
            caps.append(self.bandwidth * intensity)
        return min(caps) if caps else None


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one kernel sits under one roof."""

    roof: Roof
    intensity: float  # FLOP/byte; inf for zero bytes
    bound: str  # "memory" | "compute" | "unknown"
    achieved_flops_per_s: float
    achieved_bytes_per_s: float
    fraction: float | None  # achieved / roof at this intensity, in [0, ~1]
    seconds: float
    tip: str
    kind: str = "cuda"  # the device kind whose tips apply

    @property
    def distance(self) -> float | None:
        """How many times faster the kernel could run before it hits the roof (1.0 = on the roof)."""
        return 1 / self.fraction if self.fraction else None


# One sentence per situation and device kind; ``{pct}`` is the fraction of the roof, ``{us}`` the call's time.
TIPS: dict[str, dict[str, str]] = {
    "cuda": {
        "memory-above": "memory-bound at {pct} of bandwidth, above the roof: its bytes came from cache, not DRAM; "
        "time it with inputs larger than the cache (timing.rotating_sets)",
        "latency": "latency-bound: {us:.1f} us per call at {pct} of the {bound} roof; put more work in each "
        "launch (batch, fuse) or replay it from a CUDA graph",
        "memory-low": "memory-bound at {pct} of bandwidth: loads are not saturating memory; widen and coalesce "
        "loads (128-bit), raise occupancy or the number of blocks in flight, or fuse with a neighbour",
        "memory-mid": "memory-bound at {pct} of bandwidth: fuse with a neighbouring op to cut bytes, "
        "or widen loads and pipeline them deeper",
        "compute-low": "compute-bound at {pct} of peak: use the matrix units (bf16/fp16/tf32 mma), larger tiles, "
        "and more pipeline stages to keep them fed",
        "compute-mid": "compute-bound at {pct} of peak: overlap memory and math (warp specialisation, "
        "asynchronous copies), trim non-matmul work on the critical path",
        "compute-roof": "compute-bound at {pct} of peak, on the roof: only less work helps (skip masked blocks, "
        "lower precision such as fp8)",
        "uncounted": "host-side or uncounted time: fewer ops (fusion, torch.compile, CUDA graphs) removes it",
    },
    "cpu": {
        "memory-above": "memory-bound at {pct} of bandwidth, above the roof: its bytes came from the CPU's "
        "caches, not DRAM; the op's data fits in cache, so time it with inputs larger than the last-level cache",
        "latency": "overhead-bound: {us:.1f} us per call at {pct} of the {bound} roof; per-op framework overhead "
        "(Python, dispatch, allocation) dominates: put more work in each call (batch) or fuse ops "
        "(torch.compile)",
        "memory-low": "memory-bound at {pct} of bandwidth: the op does not stream memory; make its inputs "
        "contiguous (strided reads defeat SIMD and prefetching), let it use every core "
        "(torch.get_num_threads), or fuse it with a neighbour so its data is read once",
        "memory-mid": "memory-bound at {pct} of bandwidth: fuse with a neighbouring op to cut bytes "
        "(torch.compile), or work in blocks that stay in the L2 cache",
        "compute-low": "compute-bound at {pct} of peak: give it a vectorised library path (oneDNN/MKL: contiguous "
        "inputs, channels_last for convolutions, fp32, or bf16 only where the CPU has AMX or AVX-512 BF16), "
        "larger batches and every core",
        "compute-mid": "compute-bound at {pct} of peak: block the work for the caches, keep every core busy, and "
        "trim the non-matmul work around it",
        "compute-roof": "compute-bound at {pct} of peak, on the roof: only less work helps (smaller or pruned "
        "layers, lower precision where the CPU has units for it)",
        "uncounted": "framework overhead or uncounted time: fewer, larger ops (fusion, torch.compile) remove it",
        "far": "{bound}-bound at {pct} of the roof: its time is not in its work; per-op overhead, an "
        "oversubscribed thread pool (more threads than free cores: lower torch.set_num_threads) or other work "
        "on the machine; check the +- spread, then batch more work into each call",
    },
}
# Situations worded alike on every device.
COMMON_TIPS = {
    "unknown": "no roof known for this device and dtype (no FLOP/s peak measured or published for it): its bound "
    "is unknown; `tilestack device --remeasure` measures the common matmul dtypes (fp32, bf16...)",
    "compute-above": "compute-bound at {pct} of peak, above the roof: the FLOP count overstates the work "
    "(masked blocks counted?) or the ceiling was measured low (`tilestack device --remeasure`)",
    "memory-roof": "memory-bound at {pct} of bandwidth, on the roof: only fewer bytes help (fuse, keep data "
    "on chip, lower precision){ridge}",
}
NEAR_RIDGE_NOTE = "; near the ridge, so fewer bytes soon make it compute-bound"


class RooflineError(TilestackError, ValueError):
    """Counts, a time or a roof that no placement can be computed from."""


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def tips_for(kind: str) -> dict[str, str]:
    """The tip table of a device kind (``"cuda"``, ``"cpu"``; any other kind gets the GPU's)."""
    return {**TIPS.get(kind, TIPS["cuda"]), **COMMON_TIPS}


def uncounted_tip(kind: str) -> str:
    """The tip of time no FLOP or byte count accounts for (host work, bookkeeping)."""
    return tips_for(kind)["uncounted"]


def place(*, flops: float, bytes_moved: float, seconds: float, roof: Roof, kind: str = "cuda") -> Placement:
    """Place a kernel of ``flops`` and ``bytes_moved`` that ran in ``seconds`` under ``roof``.

    ``kind`` (``"cuda"`` or ``"cpu"``) is the device kind it ran on: it picks the words of the tip.
    """
    for arg, value in (("flops", flops), ("bytes_moved", bytes_moved)):
        if not _is_number(value) or not 0 <= value < math.inf:
            raise RooflineError(f"{arg}={value!r} ({type(value).__name__}); expected a finite count >= 0")
    if not _is_number(seconds) or not 0 < seconds < math.inf:
        raise RooflineError(f"seconds={seconds!r} ({type(seconds).__name__}); expected a positive, finite time")
    # (a list failed unhashable in the tip table, 1.5 got the GPU's tips; and so did a name of no kind: "CPU",
    # "tpu", "cuda:0" placed a CPU's op with a GPU's words, profiler round 20). "" is a stored row's unknown kind.
    if not isinstance(kind, str) or kind not in (*LATENCY_BOUND_S, ""):
        raise RooflineError(f"kind={kind!r:.60} ({type(kind).__name__}); expected the device kind, 'cuda' or 'cpu' "
                            "('' where unknown)")
    if not isinstance(roof, Roof):
        raise RooflineError(f"roof={roof!r} ({type(roof).__name__}); expected a roofline.Roof")
    for arg, value in (("peak_flops_per_s", roof.peak_flops_per_s), ("bandwidth", roof.bandwidth)):
        # a negative or NaN roof placed every kernel as compute-bound at a negative or NaN fraction of it
        if value is not None and (not _is_number(value) or not 0 <= value < math.inf):
            raise RooflineError(f"roof.{arg}={value!r} ({type(value).__name__}); expected None (unknown) or a "
                                "finite rate >= 0")
    intensity = flops / bytes_moved if bytes_moved > 0 else math.inf if flops > 0 else 0.0  # 0/0: no work
    fps, bps = flops / seconds, bytes_moved / seconds
    ridge = roof.ridge
    if ridge is not None:
        bound = "memory" if intensity < ridge else "compute"
    elif roof.bandwidth and not roof.peak_flops_per_s:
        # No compute peak for this dtype (float64 on a CPU whose ceilings measure fp32 and bf16): only an op
        # with no math is surely memory-bound; one with FLOPs could sit on either side of the unknown ridge.
        bound = "memory" if flops == 0 else "unknown"
    elif roof.peak_flops_per_s and not roof.bandwidth:
        bound = "compute"
    else:
        bound = "unknown"
    fraction: float | None = None
    if bound == "memory" and roof.bandwidth:
        fraction = bps / roof.bandwidth  # below the ridge the roof is the bandwidth itself
    elif bound == "compute" and roof.peak_flops_per_s:
        fraction = fps / roof.peak_flops_per_s
    p = Placement(roof, intensity, bound, fps, bps, fraction, seconds, "", kind)
    return dataclasses.replace(p, tip=tip(p))


def situation(p: Placement) -> str:
    """Which tip applies: a key of :data:`TIPS` / :data:`COMMON_TIPS`."""
    if p.bound == "unknown" or p.fraction is None:
        return "unknown"
    if p.fraction > ABOVE_ROOF_FRACTION:
        return f"{p.bound}-above"
    if p.seconds < LATENCY_BOUND_S.get(p.kind, LAUNCH_BOUND_S) and p.fraction < LOW_FRACTION:
        return "latency"
    if p.kind == "cpu" and p.fraction < CPU_FAR_FRACTION:
        return "far"
    level = "low" if p.fraction < LOW_FRACTION else "mid" if p.fraction < NEAR_ROOF_FRACTION else "roof"
    return f"{p.bound}-{level}"


def tip(p: Placement) -> str:
    """One short, actionable sentence that follows from where ``p`` sits, for the device kind it ran on."""
    near_ridge = (
        p.roof.ridge is not None
        and math.isfinite(p.intensity)
        and p.intensity > 0
        and 1 / RIDGE_BAND <= p.intensity / p.roof.ridge <= RIDGE_BAND
    )
    return tips_for(p.kind)[situation(p)].format(
        pct=f"{p.fraction:.0%}" if p.fraction is not None else "-",
        us=p.seconds * 1e6,
        bound=p.bound,
        ridge=NEAR_RIDGE_NOTE if near_ridge else "",
    )
