"""The numbers every run gets: latency, throughput, FLOP/s, bytes/s, intensity, utilisation, energy, perf/W.

    from tilestack import perf
    m = perf.measure(fn, args_sets=sets, flops=c.flops, bytes_read=c.bytes_read,
                     bytes_written=c.bytes_written,
                     name="attention_fwd", config={"BM": 128}, items=4 * 4096, item_name="tokens")
    m.latency_s, m.items_per_s, m.flops_per_s, m.compute_util_measured, m.bound, m.tip, m.joules_per_call
    m.to_row()                                  # flat dict: what the store keeps and the tables show

    # Without running anything (numbers from elsewhere, e.g. a profiler):
    m = perf.compute_metrics(name="mm", latency_s=1e-3, flops=2e12 * 1e-3, bytes_read=..., bytes_written=...,
                             roofs=perf.roofs_for(dev, ceil, "bf16"))

Utilisation is given against the measured ceiling (what a good kernel reaches here) and the published peak
(the spec sheet); each is None where that roof is unknown. Perf per watt is FLOP/s per W, i.e. FLOP per joule.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tilestack.errors import TilestackError
from tilestack.perf import formulas
from tilestack.perf.roofline import LATENCY_BOUND_S, Placement, Roof, place
from tilestack.perf.timing import (
    DEFAULT_BUDGET_S,
    DEFAULT_TARGET_REL_CI,
    DEFAULT_WINDOW_S,
    Timing,
    TimingError,
    time_fn,
)
from tilestack.perf.timing import _check as check_timing


class MetricsError(TilestackError, ValueError):
    """Counts or times that no metric can be computed from (negative FLOPs, a zero-length window)."""


@dataclasses.dataclass(frozen=True)
class Roofs:
    """The measured and the published roof of one device for one dtype."""

    measured: Roof
    published: Roof
    dtype: str


def roofs_for(device: Any, ceilings: Any, dtype: str) -> Roofs:
    """Both roofs of ``device`` (a :class:`~tilestack.perf.device.Device`) for ``dtype``.

    ``ceilings`` is a :class:`~tilestack.perf.device.Ceilings` or None (no measured roof). ``dtype`` is taken by
    any of its names (``"float32"``, ``torch.float32``: profiler round 23, they found no roof, silently, and
    ``measure(dtype="float32")`` placed its kernel under none); a name no dtype has is refused.
    """
    from tilestack.perf.device import Ceilings

    if not (ceilings is None or ceilings is False or isinstance(ceilings, Ceilings)):   # (an AttributeError)
        raise MetricsError(f"ceilings={ceilings!r:.60} ({type(ceilings).__name__}); expected perf.ceilings(device) "
                           "or None")
    dtype = _short_dtype(dtype, "roofs_for")
    spec = getattr(device, "spec", None)
    measured = Roof(
        ceilings.peak(dtype) if ceilings else None,
        ceilings.copy_bytes_per_s if ceilings else None,
        "measured",
    )
    published = Roof(spec.peak(dtype) if spec else None, spec.bandwidth if spec else None, "published")
    return Roofs(measured, published, dtype)


def is_number(value: Any) -> bool:
    """A real number (int, float, NumPy scalar), not a bool, a string or a tensor: what counts and times are."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_labels(name: Any, config: Any, item_name: Any) -> None:
    """MetricsError for a name, config or item name a Measurement cannot carry: a str config failed inside dict()
    ("dictionary update sequence element #0 has length 1"), a None name in the NVTX label ("'NoneType' object has
    no attribute 'replace'"), a None item name was stored and shown as "None/s"."""
    if not isinstance(name, str) or not name.strip():  # round 23: an empty name was stored, pairing with no case
        raise MetricsError(f"name={name!r} ({type(name).__name__}); expected the kernel's name as a str (not empty)")
    if config is not None and not (isinstance(config, Mapping) and all(isinstance(k, str) for k in config)):
        raise MetricsError(f"config={config!r:.60} ({type(config).__name__}) for {name!r}; expected a dict of the "
                           "kernel's constants by name (config={'BM': 128}), or None")
    if not isinstance(item_name, str):
        raise MetricsError(f"item_name={item_name!r} ({type(item_name).__name__}) for {name!r}; expected what items "
                           "counts, a str (\"tokens\")")


def _check_items(items: Any, name: str) -> None:
    if items is not None and not (is_number(items) and 0 <= items < math.inf):   # (inf items/s was shown)
        raise MetricsError(f"items={items!r} ({type(items).__name__}) for {name!r}; expected a finite count >= 0 "
                           "or None")


def _check_switch(arg: str, value: Any, name: str, *, none_ok: bool = False) -> None:
    """A yes/no argument of measure: ``energy="no"`` or ``graph=[]`` was taken by its truth and ran otherwise
    than asked (``energy="no"`` measured energy), ``graph=np.ones(3)`` failed in ``if`` deep in the timing."""
    if not (isinstance(value, bool) or (none_ok and value is None)):
        raise MetricsError(f"{arg}={value!r:.60} ({type(value).__name__}) for {name!r}; expected True or False"
                           + (" or None" if none_ok else ""))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One timed run of one kernel in one config, and everything derived from it.

    Stored fields are plain numbers and strings (see :meth:`to_row`); the rates, utilisations and roofline
    placement are properties computed from them.
    """

    name: str
    config: dict[str, Any]
    device: str
    dtype: str
    latency_s: float  # median per call
    flops: float
    bytes_read: float
    bytes_written: float
    items: float | None = None
    item_name: str = "items"
    latency_p10_s: float | None = None
    latency_p90_s: float | None = None
    latency_rel_ci: float | None = None  # half-width of the median's 95% interval over the median
    latency_converged: bool | None = None  # whether the repeats reached their target interval
    repeats: int = 1
    timing_method: str = "given"
    device_kind: str = ""  # "cuda" | "cpu"; "" in rows stored before it was kept (read off the name)
    measured_peak_flops: float | None = None
    measured_bandwidth: float | None = None
    published_peak_flops: float | None = None
    published_bandwidth: float | None = None
    joules_per_call: float | None = None
    avg_power_w: float | None = None
    idle_power_w: float | None = None
    energy_note: str = ""
    ncu: dict[str, Any] | None = None
    time: str = ""

    # --- rates -------------------------------------------------------------------------------------------
    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        """FLOPs per byte of global-memory traffic (inf for a kernel that computes but moves nothing, 0 for one
        that does neither: an op at batch size 0)."""
        if not self.bytes:
            return math.inf if self.flops else 0.0
        return self.flops / self.bytes

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.latency_s

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.latency_s

    @property
    def items_per_s(self) -> float | None:
        return self.items / self.latency_s if self.items is not None else None

    # --- utilisation -------------------------------------------------------------------------------------
    @property
    def compute_util_measured(self) -> float | None:
        return _ratio(self.flops_per_s, self.measured_peak_flops)

    @property
    def compute_util_published(self) -> float | None:
        return _ratio(self.flops_per_s, self.published_peak_flops)

    @property
    def memory_util_measured(self) -> float | None:
        return _ratio(self.bytes_per_s, self.measured_bandwidth)

    @property
    def memory_util_published(self) -> float | None:
        return _ratio(self.bytes_per_s, self.published_bandwidth)

    # --- energy --------------------------------------------------------------------------------------------
    @property
    def flops_per_joule(self) -> float | None:
        """Perf per watt: (FLOP/s) / W = FLOP/J."""
        return _ratio(self.flops, self.joules_per_call)

    @property
    def joules_above_idle_per_call(self) -> float | None:
        """Energy per call beyond what the idle GPU would have drawn meanwhile: J * (1 - P_idle / P_avg)."""
        if self.joules_per_call is None or not self.avg_power_w or self.idle_power_w is None:
            return None
        return self.joules_per_call * max(0.0, 1 - self.idle_power_w / self.avg_power_w)

    @property
    def items_per_joule(self) -> float | None:
        return _ratio(self.items, self.joules_per_call) if self.items is not None else None

    @property
    def kind(self) -> str:
        """The kind of device it ran on, ``"cuda"`` or ``"cpu"`` (``""`` where unknown)."""
        return self.device_kind or device_kind_of(self.device)

    # --- roofline ------------------------------------------------------------------------------------------
    @property
    def roofs(self) -> Roofs:
        return Roofs(
            Roof(self.measured_peak_flops, self.measured_bandwidth, "measured"),
            Roof(self.published_peak_flops, self.published_bandwidth, "published"),
            self.dtype,
        )

    def placement(self, which: str = "measured") -> Placement:
        """Roofline placement under the ``"measured"`` or the ``"published"`` roof."""
        if which not in ("measured", "published"):
            raise MetricsError(f"which={which!r}; expected 'measured' or 'published'")
        roof = getattr(self.roofs, which)
        return place(flops=self.flops, bytes_moved=self.bytes, seconds=self.latency_s, roof=roof, kind=self.kind)

    def _best_placement(self) -> Placement:
        p = self.placement("measured")
        return p if p.fraction is not None else self.placement("published")

    @property
    def bound(self) -> str:
        return self._best_placement().bound

    @property
    def roof_fraction(self) -> float | None:
        """Achieved over the roof at this intensity (the measured roof, else the published one)."""
        return self._best_placement().fraction

    @property
    def tip(self) -> str:
        return self._best_placement().tip

    def to_row(self) -> dict[str, Any]:
        """Every stored field and every derived metric, flat (``config`` and ``ncu`` stay dicts)."""
        row = dataclasses.asdict(self)
        pub = self.placement("published")
        row.update(
            bytes=self.bytes,
            intensity=self.intensity,
            flops_per_s=self.flops_per_s,
            bytes_per_s=self.bytes_per_s,
            items_per_s=self.items_per_s,
            compute_util_measured=self.compute_util_measured,
            compute_util_published=self.compute_util_published,
            memory_util_measured=self.memory_util_measured,
            memory_util_published=self.memory_util_published,
            flops_per_joule=self.flops_per_joule,
            joules_above_idle_per_call=self.joules_above_idle_per_call,
            items_per_joule=self.items_per_joule,
            bound=self.bound,
            roof_fraction=self.roof_fraction,
            roof_fraction_published=pub.fraction,
            tip=self.tip,
        )
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Measurement:
        """The inverse of :meth:`to_row` (derived columns are ignored and recomputed). A row that is no mapping, or
        lacks a column every Measurement has, is refused naming what is missing (profiler round 23: a TypeError
        listing __init__'s arguments, or an AttributeError for None)."""
        if not isinstance(row, Mapping):
            raise MetricsError(f"Measurement.from_row: row={row!r:.60} ({type(row).__name__}); expected a mapping of "
                               "columns, as to_row() or a store's row gives")
        fields = dataclasses.fields(cls)
        required = [f.name for f in fields if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in row]
        if missing:
            raise MetricsError(f"Measurement.from_row: row lacks {', '.join(missing)}; expected the columns to_row() "
                               "writes")
        names = {f.name for f in fields}
        return cls(**{k: v for k, v in row.items() if k in names})


def device_kind_of(name: str) -> str:
    """``"cpu"`` for a device named as :func:`tilestack.perf.device.cpu_device` names CPUs, ``"cuda"`` for any
    other name, ``""`` for none: the kind of rows stored without one."""
    if not name:
        return ""
    return "cpu" if name.lower().startswith("cpu") else "cuda"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _short_dtype(dtype: str | None, name: str) -> str | None:
    """``dtype`` by its short name (``"float32"`` -> ``"fp32"``); None and ``""`` (unknown) as given. A name no dtype
    has (``"fp99"``) is refused: stored, it found no roof for the row and no match among other runs' rows, silently
    (profiler round 22)."""
    from tilestack.perf import formulas

    if dtype is None or dtype == "":
        return dtype
    try:
        return formulas.dtype_name(dtype)
    except Exception:  # formulas' LaunchError: the names it knows
        raise MetricsError(f"dtype={dtype!r} ({type(dtype).__name__}) for {name!r}; expected a dtype's short name, one "
                           f"of {sorted(formulas.DTYPE_BYTES)}, or None") from None


def compute_metrics(
    *,
    name: str,
    latency_s: float,
    flops: float,
    bytes_read: float,
    bytes_written: float,
    roofs: Roofs | None = None,
    device: str = "",
    device_kind: str = "",
    dtype: str | None = None,
    config: Mapping[str, Any] | None = None,
    items: float | None = None,
    item_name: str = "items",
    timing: Timing | None = None,
    energy: Any = None,
) -> Measurement:
    """A :class:`Measurement` from numbers already in hand (no running). ``energy`` is an EnergySample.

    ``device_kind`` (``"cuda"``, ``"cpu"``) picks the tips; empty reads it off the device's name.
    """
    _check_labels(name, config, item_name)
    for arg, value in (("flops", flops), ("bytes_read", bytes_read), ("bytes_written", bytes_written)):
        if not is_number(value) or not value >= 0 or not math.isfinite(value):
            raise MetricsError(f"{arg}={value!r} ({type(value).__name__}) for {name!r}; expected a finite count >= 0")
    for arg, value, kind in (("device", device, "the device's name, a str"),
                             ("device_kind", device_kind, "'cuda', 'cpu' or '' (read off the device's name)"),
                             ("dtype", dtype, "a dtype's short name (formulas.dtype_name), or None")):
        # (stored as given; a device kind of no device, "tpu" or "CPU", was stored and failed every later
        # placement of the row, its to_row() and reports included: profiler round 21)
        if (not isinstance(value, str) and not (arg == "dtype" and value is None)) or (
                arg == "device_kind" and value not in (*LATENCY_BOUND_S, "")):
            raise MetricsError(f"{arg}={value!r} ({type(value).__name__}) for {name!r}; expected {kind}")
    dtype = _short_dtype(dtype, name)
    from tilestack.perf.energy import EnergySample
    for arg, value, cls, what in (("timing", timing, Timing, "a Timing"),
                                  ("energy", energy, EnergySample, "an EnergySample")):
        if value is not None and not isinstance(value, cls):   # (an AttributeError reading .p10_s or .valid)
            raise MetricsError(f"{arg}={value!r:.60} ({type(value).__name__}) for {name!r}; expected {what} or None")
    if not (is_number(latency_s) and latency_s > 0 and math.isfinite(latency_s)):
        raise MetricsError(
            f"latency_s={latency_s!r} ({type(latency_s).__name__}) for {name!r}; expected a positive time in "
            "seconds. A zero-length window means the timer could not resolve the call: time more work per call"
        )
    _check_items(items, name)
    if roofs is not None and not isinstance(roofs, Roofs):
        raise MetricsError(f"roofs={roofs!r} ({type(roofs).__name__}); expected perf.roofs_for(device, ceilings, "
                           "dtype) or None")
    e_ok = energy is not None and energy.valid
    return Measurement(
        name=name,
        config=dict(config or {}),
        device=device,
        dtype=dtype or (roofs.dtype if roofs else ""),
        latency_s=latency_s,
        flops=flops,
        bytes_read=bytes_read,
        bytes_written=bytes_written,
        items=items,
        item_name=item_name,
        latency_p10_s=timing.p10_s if timing else None,
        latency_p90_s=timing.p90_s if timing else None,
        latency_rel_ci=timing.rel_ci if timing else None,
        latency_converged=timing.converged if timing else None,
        repeats=timing.repeats if timing else 1,
        timing_method=timing.method if timing else "given",
        device_kind=device_kind or device_kind_of(device),
        measured_peak_flops=roofs.measured.peak_flops_per_s if roofs else None,
        measured_bandwidth=roofs.measured.bandwidth if roofs else None,
        published_peak_flops=roofs.published.peak_flops_per_s if roofs else None,
        published_bandwidth=roofs.published.bandwidth if roofs else None,
        joules_per_call=energy.joules_per_call if e_ok else None,
        avg_power_w=energy.avg_power_w if e_ok else None,
        idle_power_w=getattr(energy, "idle_power_w", None),
        energy_note=energy.note if energy is not None else "",
        time=_now(),
    )


def infer_dtype(args_sets: Sequence[tuple] | None) -> str:
    """The short dtype name of the first floating-point tensor among the arguments (``"fp32"`` if none)."""
    for args in (args_sets or [])[:1]:
        for a in args:
            dt = getattr(a, "dtype", None)
            if dt is not None and getattr(dt, "is_floating_point", False):
                return formulas.dtype_name(dt)
    return "fp32"


def _energy_on_gpu(run: Callable[..., Any], args_sets: Sequence[tuple] | None, t: Timing, dev: Any, graph: bool) -> Any:
    """NVML energy of back-to-back calls (replays of one CUDA graph when the timing used one)."""
    import torch

    from tilestack.perf import energy as energy_mod
    from tilestack.perf import timing as timing_mod

    meter = energy_mod.meter_for(dev)
    if graph and meter is not None and meter.available:
        replay, _ = timing_mod.capture_graph(run, args_sets)
        return energy_mod.measure_energy(
            lambda: replay(),
            args_sets=None,
            per_call_s=t.median_s,
            meter=meter,
            sync=torch.cuda.synchronize,
            calls_per_invocation=timing_mod.GRAPH_CALLS,
            idle=True,
        )
    return energy_mod.measure_energy(
        run, args_sets=args_sets, per_call_s=t.median_s, meter=meter, sync=torch.cuda.synchronize, idle=True
    )


def measure(
    fn: Callable[..., Any],
    *,
    args_sets: Sequence[tuple] | None,
    flops: float,
    bytes_read: float,
    bytes_written: float,
    name: str,
    config: Mapping[str, Any] | None = None,
    items: float | None = None,
    item_name: str = "items",
    dtype: str | None = None,
    device: Any = None,
    ceilings: Any = None,
    energy: bool | None = None,
    graph: bool = False,
    repeats: int | None = None,
    window_s: float | None = None,
    budget_s: float | None = None,
    target_rel_ci: float | None = DEFAULT_TARGET_REL_CI,
    nvtx: bool = True,
) -> Measurement:
    """Time ``fn`` over ``args_sets`` (see :func:`~tilestack.perf.timing.time_fn`) and compute every metric.

    ``device`` None detects one; ``ceilings`` None loads (or measures once) the device's cached ceilings,
    ``False`` skips them. ``energy`` None measures energy where NVML can (GPUs), adding about a second per
    call of ``measure``; ``False`` skips it. ``dtype`` None reads it off the first floating-point argument.
    ``repeats``, ``window_s``, ``budget_s`` and ``target_rel_ci`` go to :func:`~tilestack.perf.timing.time_fn`:
    by default calls repeat until the median is known to +-2% or the budget is spent.
    Every call runs inside an NVTX range named by ``name`` and ``config``.
    """
    from tilestack.perf import device as device_mod
    from tilestack.perf import energy as energy_mod
    from tilestack.perf import nvtx as nvtx_mod

    if not callable(fn):
        raise MetricsError(f"fn={fn!r} ({type(fn).__name__}); expected the callable to time")
    _check_labels(name, config, item_name)      # before the NVTX label is made of them
    if args_sets is not None and (
        isinstance(args_sets, str | bytes) or not all(isinstance(a, tuple | list) for a in args_sets)
    ):
        raise MetricsError(
            f"args_sets={args_sets!r:.80} ({type(args_sets).__name__}); expected a list of argument tuples "
            "(one per call in rotation), or None for no arguments"
        )
    for arg, value in (("flops", flops), ("bytes_read", bytes_read), ("bytes_written", bytes_written)):
        if not is_number(value) or not value >= 0 or not math.isfinite(value):
            raise MetricsError(f"{arg}={value!r} ({type(value).__name__}) for {name!r}; expected a finite count >= 0")
    # Every argument is checked before the device is detected, its ceilings measured or fn timed: items,
    # ceilings and the timing knobs were read only after fn had been timed (a str window_s then failed inside
    # the timing loop, reported as fn's own error), ceilings="x" ended in an AttributeError.
    _check_items(items, name)
    for arg, value in (("graph", graph), ("nvtx", nvtx)):
        _check_switch(arg, value, name)
    _check_switch("energy", energy, name, none_ok=True)
    if not (ceilings is None or ceilings is False or isinstance(ceilings, device_mod.Ceilings)):
        raise MetricsError(f"ceilings={ceilings!r:.60} ({type(ceilings).__name__}) for {name!r}; expected "
                           "perf.ceilings(device), None (load or measure them) or False (none)")
    check_timing(fn, args_sets, repeats, DEFAULT_WINDOW_S if window_s is None else window_s,
                 DEFAULT_BUDGET_S if budget_s is None else budget_s, target_rel_ci)
    dtype = formulas.dtype_name(dtype) if dtype is not None else infer_dtype(args_sets)  # (0 or [] was "none")
    dev = device if isinstance(device, device_mod.Device) else device_mod.detect(device)
    ceil = None if ceilings is False else (ceilings or device_mod.ceilings(dev))
    label = nvtx_mod.range_name(name, config)

    def run(*args: Any) -> Any:
        with nvtx_mod.range(label, enabled=nvtx):
            return fn(*args)

    kwargs: dict[str, Any] = {"repeats": repeats, "target_rel_ci": target_rel_ci}
    if window_s is not None:
        kwargs["window_s"] = window_s
    if budget_s is not None:
        kwargs["budget_s"] = budget_s
    try:
        t = time_fn(run, args_sets=args_sets, device=dev, graph=graph, **kwargs)
    except TimingError:
        raise
    except Exception as e:
        raise MetricsError(f"{name!r} raised {type(e).__name__} while being timed: {e}") from e
    sample = None
    if energy is not False and dev.kind == "cuda":
        sample = _energy_on_gpu(run, args_sets, t, dev, graph)
    elif energy:
        sample = energy_mod.measure_energy(run, args_sets=args_sets, per_call_s=t.median_s, meter=None)
    return compute_metrics(
        name=name,
        latency_s=t.median_s,
        flops=flops,
        bytes_read=bytes_read,
        bytes_written=bytes_written,
        roofs=roofs_for(dev, ceil, dtype),
        device=dev.name,
        device_kind=dev.kind,
        dtype=dtype,
        config=config,
        items=items,
        item_name=item_name,
        timing=t,
        energy=sample,
    )
