"""Features of one (problem, config) for the cost model: from the IR analysis, the config, the device table and,
where there is one, the compiler's resource report.

    e = space.estimate(cfg)                              # tune.constraints
    f = config_features(e, device=key, peak=spec)        # {"log2_warps": 3.0, "occupancy": 0.25, ...}
    f |= resource_features(aot.resources(...))           # registers, spills, shared as compiled
    x = vector(f)                                        # in FEATURES order, NaN-free

Every feature is a number that means the same in every kernel (no kernel names): tile and launch shape (log2),
pipelining, per-program work (FLOPs and bytes per program, their ratio), occupancy and waves over the SMs, how
far the problem's roofline time is, and the compiler's registers, spills and shared memory; then what
``derived_features`` computes from those (elements per thread, the fraction of the SMs the launch fills), which a
dataset stored before them gains in ``vector``. Sizes and counts enter as log2 (times span decades); a feature
that does not apply is 0 and its ``has_*`` flag says so.
"""

from __future__ import annotations

import math
from typing import Any

# The feature order of every vector: append only (stored datasets keep their features by name).
FEATURES = (
    "log2_warps", "stages", "log2_bm", "log2_bn", "log2_bk", "log2_tile_elements",
    "log2_mma_m", "log2_mma_n", "log2_mma_k", "mma_count", "has_mma",
    "shared_kib", "shared_frac", "est_registers", "est_register_frac", "blocks_per_sm", "occupancy",
    "log2_programs", "waves", "tail_efficiency",
    "log2_flops", "log2_bytes", "log2_dram_bytes", "log2_flops_per_program", "log2_bytes_per_program",
    "log2_intensity", "log2_roofline_us", "compute_bound",
    "tma_fraction", "pointer_accesses", "loop_loads",
    "has_aot", "aot_registers", "aot_spills_log2", "aot_shared_kib", "aot_register_frac",
    "log2_elements_per_thread", "log2_sm_fill",
)
AOT_FEATURES = frozenset(("has_aot", "aot_registers", "aot_spills_log2", "aot_shared_kib", "aot_register_frac"))
KIB = 1024
WARP_SIZE = 32


def _log2(x: float | None) -> float:
    return math.log2(x) if x and x > 0 else 0.0


def config_features(e, *, sms: int, shared_per_block: int, peak_flops: float | None = None,
                    bandwidth: float | None = None) -> dict[str, float]:
    """Features of one ``tune.constraints.Estimate`` on a device of ``sms`` SMs and ``shared_per_block`` bytes of
    shared memory per block, with the device table's ``peak_flops`` (FLOP/s of the dtype's matrix units) and
    ``bandwidth`` (bytes/s) for the roofline time (0 where not given)."""
    cfg = e.config
    warps = cfg.get("num_warps", e.threads // WARP_SIZE if e.threads else 4)
    mm = max(e.mma_tiles, default=(0, 0, 0), key=lambda t: t[0] * t[1] * t[2])
    f: dict[str, float] = {
        "log2_warps": _log2(warps), "stages": float(cfg.get("num_stages", 1)),
        "log2_bm": _log2(cfg.get("BM")), "log2_bn": _log2(cfg.get("BN")), "log2_bk": _log2(cfg.get("BK")),
        "log2_tile_elements": _log2(e.tile_elements),
        "log2_mma_m": _log2(mm[0]), "log2_mma_n": _log2(mm[1]), "log2_mma_k": _log2(mm[2]),
        "mma_count": float(len(e.mma_tiles)), "has_mma": float(bool(e.mma_tiles)),
        "shared_kib": e.shared_bytes / KIB, "shared_frac": e.shared_bytes / shared_per_block,
        "est_registers": float(e.registers),
        "est_register_frac": e.registers / e.register_limit if e.register_limit else 0.0,
        "blocks_per_sm": float(e.blocks_per_sm), "occupancy": e.occupancy,
        "tma_fraction": len(e.tma_boxes) / max(1, len(e.tma_boxes) + e.pointer_accesses),
        "pointer_accesses": float(e.pointer_accesses), "loop_loads": float(e.loop_loads),
    }
    programs = e.programs or 0
    slots = sms * max(e.blocks_per_sm, 1)
    waves = programs / slots if programs else 0.0
    f["log2_programs"] = _log2(programs)
    f["waves"] = waves
    f["tail_efficiency"] = waves / math.ceil(waves) if waves else 0.0
    f["log2_flops"], f["log2_bytes"], f["log2_dram_bytes"] = _log2(e.flops), _log2(e.bytes), _log2(e.dram_bytes)
    f["log2_flops_per_program"] = _log2(e.flops / programs) if programs and e.flops else 0.0
    f["log2_bytes_per_program"] = _log2(e.bytes / programs) if programs and e.bytes else 0.0
    f["log2_intensity"] = _log2(e.flops / e.dram_bytes) if e.flops and e.dram_bytes else 0.0
    t_compute = e.flops / peak_flops if peak_flops and e.flops else 0.0
    t_memory = e.dram_bytes / bandwidth if bandwidth and e.dram_bytes else 0.0
    f["log2_roofline_us"] = _log2(max(t_compute, t_memory) * 1e6)
    f["compute_bound"] = float(t_compute > t_memory)
    f.update(resource_features(None))
    f.update(derived_features(f))
    return f


def derived_features(f: dict[str, float]) -> dict[str, float]:
    """Features computed from others, so that a dataset stored before they existed gains them too (``vector``
    adds them where missing).

    ``log2_elements_per_thread``: the largest register tile's elements over the block's threads. On a row kernel
    it is how much work (and how many loads in flight) each thread has: too few and the warps wait on memory with
    nothing to issue, too many and the registers spill or occupancy falls. On the H200's row kernels the best
    configs hold 16-64 elements per thread whatever the row length, which the forest could only piece together
    from tile size and warps in separate splits.

    ``log2_sm_fill``: log2 of the fraction of the SMs that get a program (0 where there are at least as many
    programs as SMs; the SM count from ``log2_programs``, ``waves`` and ``blocks_per_sm``): a launch of 32
    programs on 132 SMs leaves 100 idle, so it runs at best 132/32 times its roofline. The cost model takes this
    bound out of what its forest learns (``cost_model.CostModel``) because a forest cannot extrapolate it: the
    problems it trained on may never launch that few programs."""
    threads = f.get("log2_warps", 0.0) + math.log2(WARP_SIZE)
    tile = f.get("log2_tile_elements", 0.0)
    out = {"log2_elements_per_thread": tile - threads if tile else 0.0, "log2_sm_fill": 0.0}
    programs, waves = f.get("log2_programs", 0.0), f.get("waves", 0.0)
    if waves and waves > 0:             # some programs (log2_programs is 0 for one program and for none)
        log2_sms = programs - math.log2(waves) - math.log2(max(f.get("blocks_per_sm", 1.0), 1.0))
        out["log2_sm_fill"] = min(0.0, programs - log2_sms)
    return out


def resource_features(r: Any) -> dict[str, float]:
    """The compiler's report (``tune.aot.Resources``, or a dict with its fields) as features; zeros and
    ``has_aot`` = 0 when there is none."""
    if r is None:
        return {"has_aot": 0.0, "aot_registers": 0.0, "aot_spills_log2": 0.0, "aot_shared_kib": 0.0,
                "aot_register_frac": 0.0}
    get = r.get if isinstance(r, dict) else (lambda k, d=None: getattr(r, k, d))
    from tilestack.tune.constraints import ArchLimits

    regs = get("registers") or 0
    warps = get("num_warps") or 4
    return {"has_aot": 1.0, "aot_registers": float(regs), "aot_spills_log2": math.log2(1 + (get("spills") or 0)),
            "aot_shared_kib": (get("shared_bytes") or 0) / KIB,
            "aot_register_frac": regs * warps * WARP_SIZE / ArchLimits().registers_per_sm}


def vector(f: dict[str, float], aot: bool = True) -> list[float]:
    """``f`` in ``FEATURES`` order (a missing or non-finite feature is 0; the compiler's report too unless
    ``aot``: a model that ranks configs before any compile must not learn from it)."""
    f = derived_features(f) | f
    out = []
    for name in FEATURES:
        v = f.get(name, 0.0) if aot or name not in AOT_FEATURES else 0.0
        out.append(float(v) if v is not None and math.isfinite(v) else 0.0)
    return out


def device_peaks(name: str, dtype: str = "bf16") -> tuple[float | None, float | None]:
    """(matrix FLOP/s of ``dtype``, DRAM bytes/s) from the device table for a GPU called ``name``."""
    import re

    from tilestack.perf.device import PEAKS

    low = name.lower()
    for spec in PEAKS:
        if any(re.search(p, low) for p in spec.patterns):
            return spec.peak(dtype), spec.bandwidth
    return None, None
