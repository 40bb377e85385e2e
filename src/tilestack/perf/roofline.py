"""Roofline placement: is a kernel memory- or compute-bound, how far below its roof, and what to try.

    from tilestack.perf.roofline import Roof, place
    roof = Roof(peak_flops_per_s=7.6e14, bandwidth=3.0e12, label="measured")
    p = place(flops=2 * 4096**3, bytes_moved=3 * 2 * 4096**2, seconds=2.1e-4, roof=roof)
    p.bound, p.fraction, p.distance, p.tip     # "compute", 0.86, 1.16, "compute-bound at 86% ..."

The roof at arithmetic intensity I (FLOPs per byte of global memory) is ``min(peak, bandwidth * I)``; the
ridge point ``peak / bandwidth`` separates the memory-bound side from the compute-bound one.
``fraction`` is the achieved rate over the roof at the kernel's intensity (FLOP/s on the compute side,
bytes/s on the memory side: the two agree, since there the roof's FLOP/s is bandwidth times intensity).
"""

from __future__ import annotations

import dataclasses
import math

LAUNCH_BOUND_S = 10e-6  # below this a kernel's time is mostly launch and tail latency, not throughput
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

    @property
    def distance(self) -> float | None:
        """How many times faster the kernel could run before it hits the roof (1.0 = on the roof)."""
        return 1 / self.fraction if self.fraction else None


def place(*, flops: float, bytes_moved: float, seconds: float, roof: Roof) -> Placement:
    """Place a kernel of ``flops`` and ``bytes_moved`` that ran in ``seconds`` under ``roof``."""
    intensity = flops / bytes_moved if bytes_moved > 0 else math.inf
    fps, bps = flops / seconds, bytes_moved / seconds
    ridge = roof.ridge
    if ridge is not None:
        bound = "memory" if intensity < ridge else "compute"
    elif roof.bandwidth and not roof.peak_flops_per_s:
        bound = "memory"
    elif roof.peak_flops_per_s and not roof.bandwidth:
        bound = "compute"
    else:
        bound = "unknown"
    fraction: float | None = None
    if bound == "memory" and roof.bandwidth:
        fraction = bps / roof.bandwidth  # below the ridge the roof is the bandwidth itself
    elif bound == "compute" and roof.peak_flops_per_s:
        fraction = fps / roof.peak_flops_per_s
    p = Placement(roof, intensity, bound, fps, bps, fraction, seconds, "")
    return dataclasses.replace(p, tip=tip(p))


def tip(p: Placement) -> str:
    """One short, actionable sentence that follows from where ``p`` sits."""
    if p.bound == "unknown" or p.fraction is None:
        return "no roof known for this device and dtype: run `tilestack device --remeasure` to measure one"
    pct = f"{p.fraction:.0%}"
    if p.fraction > ABOVE_ROOF_FRACTION:
        if p.bound == "memory":
            return (f"memory-bound at {pct} of bandwidth, above the roof: its bytes came from cache, "
                    "not DRAM; time it with inputs larger than the cache (timing.rotating_sets)")
        return (f"compute-bound at {pct} of peak, above the roof: the FLOP count overstates the work "
                "(masked blocks counted?) or the ceiling was measured low (`tilestack device --remeasure`)")
    if p.seconds < LAUNCH_BOUND_S and p.fraction < LOW_FRACTION:
        return (
            f"latency-bound: {p.seconds * 1e6:.1f} us per call at {pct} of the {p.bound} roof; "
            "put more work in each launch (batch, fuse) or replay it from a CUDA graph"
        )
    near_ridge = (
        p.roof.ridge is not None
        and math.isfinite(p.intensity)
        and p.intensity > 0
        and 1 / RIDGE_BAND <= p.intensity / p.roof.ridge <= RIDGE_BAND
    )
    if p.bound == "memory":
        if p.fraction < LOW_FRACTION:
            return (
                f"memory-bound at {pct} of bandwidth: loads are not saturating memory; widen and coalesce "
                "loads (128-bit), raise occupancy or the number of blocks in flight, or fuse with a neighbour"
            )
        if p.fraction < NEAR_ROOF_FRACTION:
            return (
                f"memory-bound at {pct} of bandwidth: fuse with a neighbouring op to cut bytes, "
                "or widen loads and pipeline them deeper"
            )
        extra = "; near the ridge, so fewer bytes soon make it compute-bound" if near_ridge else ""
        return (
            f"memory-bound at {pct} of bandwidth, on the roof: only fewer bytes help (fuse, keep data "
            f"on chip, lower precision){extra}"
        )
    if p.fraction < LOW_FRACTION:
        return (
            f"compute-bound at {pct} of peak: use the matrix units (bf16/fp16/tf32 mma), larger tiles, "
            "and more pipeline stages to keep them fed"
        )
    if p.fraction < NEAR_ROOF_FRACTION:
        return (
            f"compute-bound at {pct} of peak: overlap memory and math (warp specialisation, "
            "asynchronous copies), trim non-matmul work on the critical path"
        )
    return (
        f"compute-bound at {pct} of peak, on the roof: only less work helps (skip masked blocks, "
        "lower precision such as fp8)"
    )
