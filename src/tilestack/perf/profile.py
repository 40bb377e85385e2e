"""Profile a PyTorch model: where the time goes, op by op, and how far each op is from its roof.

    from tilestack.perf import profile
    prof = profile.profile_model(model, (x,), steps=5)            # device read off the model's parameters
    prof.ops[0].op, prof.ops[0].share, prof.ops[0].m.bound, prof.ops[0].m.tip
    profile.print_profile(prof)                                   # hot spots and tips first, then the table
    model, inputs = profile.load_target("examples/tiny.py:build") # what `tilestack profile` runs

Two passes over the same step, so counting never distorts timing:
1. counting: one step under a ``TorchDispatchMode`` that sees every ATen op, counts its FLOPs with the
   formulas of ``torch.utils.flop_counter`` (matmuls, convolutions, attention; causal attention halved as
   tilestack counts it) and its bytes as the sizes of its distinct input and output tensors (views move none);
2. timing: ``steps`` steps under ``torch.profiler`` (CUDA kernel time on a GPU, CPU self time on a CPU),
   after one discarded profiler step; each op's time is that of its whole subtree of the profiler's event
   tree when the counting pass saw it (``clone`` takes the ``copy_`` inside it), its own time otherwise
   (``linear``, which decomposes before dispatch, leaves its ``addmm`` to be counted on its own).
The two are joined by op name, per step, and every op becomes a :class:`Measurement` (per call) so it gets
the same roofline placement and tip as a kernel; time no ATen op accounts for is one ``(other)`` row.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tilestack.errors import TilestackError
from tilestack.perf import formulas
from tilestack.perf.metrics import Measurement, compute_metrics, roofs_for

US_TO_S = 1e-6
DEFAULT_STEPS = 5
DEFAULT_WARMUP = 2
PROFILER_WARMUP_STEPS = 1
# Row-wise ops torch's flop counter leaves out, counted per input element as tilestack.perf.formulas does.
ROW_OP_FLOPS_PER_ELEMENT = {
    "aten.native_layer_norm": formulas.LAYERNORM_FLOPS_PER_ELEMENT,
    "aten._fused_rms_norm": formulas.RMSNORM_FLOPS_PER_ELEMENT,
    "aten._softmax": formulas.SOFTMAX_FLOPS_PER_ELEMENT,
    "aten._safe_softmax": formulas.SOFTMAX_FLOPS_PER_ELEMENT,
    "aten._log_softmax": formulas.SOFTMAX_FLOPS_PER_ELEMENT,
}
HOT_SPOTS = 5  # ops listed, with tips, before the table
OTHER = "(other)"
DEFAULT_BUILDER = "build"
ALLOCATING_PREFIXES = ("empty", "new_empty", "zeros_like", "ones_like", "full_like", "resize_")


class ProfileError(TilestackError, RuntimeError):
    """A model that cannot be loaded or raises while profiled; the message names the target and the phase."""


@dataclasses.dataclass(frozen=True)
class OpStat:
    """One ATen op over one step: ``calls``, ``total_s``, its ``share`` of the step, and ``m`` per call."""

    op: str
    calls: float
    total_s: float
    share: float
    m: Measurement
    counted: bool  # False: the op moved no counted bytes nor FLOPs (views, bookkeeping, uncounted time)

    @property
    def bound(self) -> str:
        return self.m.bound if self.counted else "-"

    @property
    def roof_fraction(self) -> float | None:
        return self.m.roof_fraction if self.counted else None

    @property
    def tip(self) -> str:
        if self.counted:
            return self.m.tip
        return "host-side or uncounted time: fewer ops (fusion, torch.compile, CUDA graphs) removes it"


@dataclasses.dataclass
class ModelProfile:
    """A model's per-op profile for one step (forward, or forward and backward with ``train``)."""

    name: str
    device: Any
    ceilings: Any
    steps: int
    train: bool
    step_s: float  # sum of attributed op time per step
    wall_s: float  # wall-clock per step, host included
    ops: list[OpStat]

    @property
    def flops(self) -> float:
        return math.fsum(o.m.flops * o.calls for o in self.ops)

    def hot_spots(self, n: int = HOT_SPOTS) -> list[OpStat]:
        return [o for o in self.ops if o.op != OTHER][:n]


# --- counting -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Count:
    calls: int = 0
    flops: float = 0.0
    bytes_read: float = 0.0
    bytes_written: float = 0.0
    dtype: str = ""


def _tensors(obj: Any) -> list[Any]:
    import torch

    out: list[Any] = []
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, list | tuple):
            stack.extend(x)
        elif isinstance(x, Mapping):
            stack.extend(x.values())
    return out


def _nbytes(ts: Sequence[Any]) -> float:
    seen, total = set(), 0
    for t in ts:
        key = (t.data_ptr(), t.numel(), t.dtype) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return float(total)


def _flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    """FLOPs of one ATen call: torch's registered formula, or tilestack's for the ops torch leaves out."""
    import torch
    from torch.utils.flop_counter import flop_registry

    packet = func._overloadpacket
    is_causal = _argument(func, args, kwargs, "is_causal")
    if packet in flop_registry:
        flops = float(flop_registry[packet](*args, **kwargs, out_val=out))
        return flops * formulas.CAUSAL_FRACTION if is_causal else flops
    if str(packet) == "aten._scaled_dot_product_flash_attention_for_cpu":
        q, k, v = args[:3]
        return float(formulas.sdpa(q, k, v, causal=bool(is_causal)).flops)
    per_element = ROW_OP_FLOPS_PER_ELEMENT.get(str(packet))
    if per_element is not None and args and isinstance(args[0], torch.Tensor):
        return float(per_element * args[0].numel())
    if torch.Tag.pointwise in getattr(func, "tags", ()):
        return float(sum(t.numel() for t in _tensors(out)))  # 1 FLOP per output element, as torch's profiler
    return 0.0


def _argument(func: Any, args: tuple, kwargs: dict, name: str) -> Any:
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            return kwargs.get(name, args[i] if i < len(args) else a.default_value)
    return None


def _dtype(ts: Sequence[Any]) -> str:
    for t in ts:
        if t.is_floating_point():
            try:
                return formulas.dtype_name(t.dtype)
            except Exception:
                continue
    return ""


def _profiler_name(func: Any) -> str:
    ns, _, name = str(func._overloadpacket).partition(".")
    return f"{ns}::{name}"


def _storage(t: Any) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # tensors without storage (sparse, some subclasses)
        return id(t)


def _moves_no_data(func: Any, name: str, ins: Sequence[Any], outs: Sequence[Any]) -> bool:
    """Views and aliases (their outputs share the inputs' storage) and allocations move no bytes."""
    if getattr(func, "is_view", False) or name.removeprefix("aten::").startswith(ALLOCATING_PREFIXES):
        return True
    in_place = name.endswith("_")
    return not in_place and bool(outs) and {_storage(t) for t in outs} <= {_storage(t) for t in ins}


def count_ops(step: Callable[[], Any]) -> dict[str, _Count]:
    """Run ``step`` once under a dispatch mode; FLOPs and bytes of every ATen op, by profiler name."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: dict[str, _Count] = collections.defaultdict(_Count)

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(
            self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
        ) -> Any:
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = _profiler_name(func)
            c = counts[name]
            c.calls += 1
            ins, outs = _tensors((args, kwargs)), _tensors(out)
            if not _moves_no_data(func, name, ins, outs):
                c.bytes_read += _nbytes(ins)
                c.bytes_written += _nbytes(outs)
            c.flops += _flops(func, args, kwargs, out)
            c.dtype = c.dtype or _dtype(ins + outs)
            return out

    with Counter():
        step()
    return dict(counts)


# --- the model step -----------------------------------------------------------------------------------------
def _as_call(inputs: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, tuple | list):
        return tuple(inputs), {}
    return (inputs,), {}


def _model_device(model: Any, inputs: Any) -> str:
    for t in _tensors(inputs):
        return t.device.type
    params = getattr(model, "parameters", None)
    if params is not None:
        for p in params():
            return p.device.type
    return "cpu"


def _without_fastpath(step: Callable[[], Any]) -> Callable[[], Any]:
    import torch

    def inner() -> Any:
        mha = getattr(torch.backends, "mha", None)
        if mha is None:
            return step()
        before = mha.get_fastpath_enabled()
        mha.set_fastpath_enabled(False)
        try:
            return step()
        finally:
            mha.set_fastpath_enabled(before)

    return inner


def make_step(model: Callable[..., Any], inputs: Any, *, train: bool = False) -> Callable[[], Any]:
    """One forward (``train`` False, under no_grad), or forward + backward of the sum of the outputs."""
    import torch

    args, kwargs = _as_call(inputs)

    def step() -> Any:
        if not train:
            with torch.no_grad():
                return model(*args, **kwargs)
        out = model(*args, **kwargs)
        loss = sum(t.float().sum() for t in _tensors(out) if t.requires_grad)
        if not isinstance(loss, torch.Tensor):
            raise ProfileError(
                "train=True but no output of the model requires grad; expected a trainable model"
            )
        loss.backward()
        return out

    return step


def profile_model(
    model: Callable[..., Any],
    inputs: Any,
    *,
    steps: int = DEFAULT_STEPS,
    warmup: int = DEFAULT_WARMUP,
    train: bool = False,
    name: str | None = None,
    device: Any = None,
    ceilings: Any = None,
    fastpath: bool = False,
) -> ModelProfile:
    """Profile ``model(*inputs)`` (a tuple, a dict of keyword arguments, or one tensor): see the module doc.

    ``device`` None reads it off the inputs or parameters; ``ceilings`` None uses the cached (or freshly
    measured) ceilings of that device, ``False`` none. ``fastpath`` False turns off the inference fast path
    of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer``: its fused native kernels call matmuls that
    no dispatch mode sees, so with it on their time is shown but not their FLOPs.
    """
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from tilestack.perf import device as device_mod

    if steps < 1:
        raise ProfileError(f"steps={steps!r}; expected at least 1 profiled step")
    name = name or type(model).__name__
    dev = (
        device
        if isinstance(device, device_mod.Device)
        else device_mod.detect(device or _model_device(model, inputs))
    )
    ceil = None if ceilings is False else (ceilings or device_mod.ceilings(dev))
    cuda = dev.kind == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step = make_step(model, inputs, train=train)
    if not fastpath:
        step = _without_fastpath(step)

    def guarded(phase: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except ProfileError:
            raise
        except Exception as e:
            raise ProfileError(f"model {name!r} raised {type(e).__name__} during the {phase}: {e}") from e

    def warm() -> None:
        for _ in range(warmup):
            step()
        sync()

    # Warm-up first, so the counted step is a steady-state one (gradients already allocated, caches built).
    guarded("warm-up", warm)
    counts = guarded("counting pass", lambda: count_ops(step))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    # One profiled-but-discarded step first: the profiler may drop kernel events as it starts up.
    plan = schedule(wait=0, warmup=PROFILER_WARMUP_STEPS, active=steps, repeat=1)

    def timed() -> tuple[Any, float]:
        with profile(activities=activities, schedule=plan) as prof:
            for _ in range(PROFILER_WARMUP_STEPS):
                step()
                prof.step()
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
                sync()  # inside the step, so its kernels belong to it
                prof.step()
            wall = time.perf_counter() - t0
        return prof, wall

    prof, wall = guarded("profiled steps", timed)
    return _join(name, dev, ceil, counts, prof.events(), steps, wall, train, cuda)


def _self_s(e: Any, cuda: bool) -> float:
    if cuda:  # torch < 2.4 named it self_cuda_time_total
        us = getattr(e, "self_device_time_total", None)
        return float(us if us is not None else getattr(e, "self_cuda_time_total", 0.0)) * US_TO_S
    return float(e.self_cpu_time_total) * US_TO_S


def attribute(events: Sequence[Any], counted: set[str], cuda: bool) -> tuple[dict[str, list[float]], float]:
    """Seconds and calls per op name over the profiler's event tree, the way the counting pass saw the ops.

    The dispatch mode counts the outermost ATen op of each call chain below autograd (``clone``, not the
    ``copy_`` inside it); so a counted op takes the time of its whole subtree, while an op it never saw
    (``linear``, which decomposes before dispatch) keeps only its own time and its children are visited.
    Returns ``{op: [calls, seconds]}`` over all steps, and the total (GPU kernel time, or CPU self time).
    """
    from torch.autograd import DeviceType

    per: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    total = math.fsum(_self_s(e, cuda) for e in cpu if not e.name.startswith("ProfilerStep"))

    def subtree_s(e: Any) -> float:
        acc, stack = 0.0, [e]
        while stack:
            x = stack.pop()
            acc += _self_s(x, cuda)
            stack.extend(x.cpu_children)
        return acc

    stack = [e for e in cpu if e.cpu_parent is None]
    while stack:
        e = stack.pop()
        if e.name.startswith("aten::"):
            per[e.name][0] += 1
            if e.name in counted:
                per[e.name][1] += subtree_s(e)
                continue
            per[e.name][1] += _self_s(e, cuda)
        stack.extend(e.cpu_children)
    return dict(per), total


def _join(
    name: str,
    dev: Any,
    ceil: Any,
    counts: dict[str, _Count],
    events: Any,
    steps: int,
    wall: float,
    train: bool,
    cuda: bool,
) -> ModelProfile:
    counted = {op for op, c in counts.items() if c.flops > 0 or c.bytes_read + c.bytes_written > 0}
    per, total = attribute(events, counted, cuda)
    per_op = {op: (calls / steps, s / steps) for op, (calls, s) in per.items() if s > 0}
    total /= steps
    attributed = math.fsum(s for _, s in per_op.values())
    if total > attributed:
        per_op[OTHER] = (0.0, total - attributed)  # non-ATen work: autograd bookkeeping, custom kernels
    total = max(total, attributed)
    ops: list[OpStat] = []
    for op, (calls, s) in per_op.items():
        c = counts.get(op, _Count())
        n = c.calls or max(calls, 1)  # per-step calls as counted; the profiler's if the op was not seen
        is_counted = op in counted
        dtype = c.dtype or "fp32"
        m = compute_metrics(
            name=op,
            latency_s=s / max(calls, 1),
            flops=c.flops / n,
            bytes_read=c.bytes_read / n,
            bytes_written=c.bytes_written / n,
            roofs=roofs_for(dev, ceil, dtype),
            device=dev.name,
            dtype=dtype,
            config={"calls/step": round(calls, 2)},
        )
        ops.append(OpStat(op, calls, s, s / total if total else 0.0, m, is_counted))
    ops.sort(key=lambda o: o.total_s, reverse=True)
    return ModelProfile(name, dev, ceil, steps, train, total, wall / steps, ops)


# --- loading a target ---------------------------------------------------------------------------------------
def load_target(target: str) -> tuple[Any, Any]:
    """``(model, inputs)`` from ``path/to/script.py[:fn]`` or ``package.module[:fn]``.

    ``fn`` (default ``build``) is called with no arguments and returns ``(model, inputs)``; without such a
    function the module's top-level ``model`` and ``inputs`` are used.
    """
    spec, _, fn_name = target.partition(":")
    if spec.endswith(".py") or Path(spec).is_file():
        path = Path(spec)
        if not path.is_file():
            raise ProfileError(f"target={target!r}: no file {path}; expected a .py script or a module path")
        mod_spec = importlib.util.spec_from_file_location(f"_tilestack_target_{path.stem}", path)
        if mod_spec is None or mod_spec.loader is None:
            raise ProfileError(f"target={target!r}: cannot import {path} as a Python module")
        module = importlib.util.module_from_spec(mod_spec)
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            raise ProfileError(f"target={target!r} raised {type(e).__name__} while loading: {e}") from e
        finally:
            sys.path.remove(str(path.parent.resolve()))
    else:
        try:
            module = importlib.import_module(spec)
        except ImportError as e:
            raise ProfileError(
                f"target={target!r}: cannot import module {spec!r} ({e}); expected a .py path "
                "or an importable module"
            ) from e
    fn = getattr(module, fn_name or DEFAULT_BUILDER, None)
    if fn is not None:
        try:
            built = fn()
        except Exception as e:
            raise ProfileError(
                f"target={target!r}: {fn_name or DEFAULT_BUILDER}() raised {type(e).__name__}: {e}"
            ) from e
        if not (isinstance(built, tuple) and len(built) == 2):
            raise ProfileError(
                f"target={target!r}: {fn_name or DEFAULT_BUILDER}() returned {type(built).__name__}; "
                "expected a (model, inputs) pair"
            )
        return built
    if fn_name:
        raise ProfileError(f"target={target!r}: the module has no function {fn_name!r}")
    if hasattr(module, "model") and hasattr(module, "inputs"):
        return module.model, module.inputs
    raise ProfileError(
        f"target={target!r}: expected a function {DEFAULT_BUILDER}() returning (model, inputs), "
        "or top-level variables `model` and `inputs`"
    )


# --- rendering ----------------------------------------------------------------------------------------------
PROFILE_COLUMNS = (
    "op",
    "calls/step",
    "time/step",
    "share",
    "FLOPs/step",
    "bytes/step",
    "FLOP/B",
    "bound",
    "% of roof",
    "FLOP/s",
)


def profile_rows(p: ModelProfile) -> list[list[str]]:
    from tilestack.perf.report import pct, seconds, si

    out = []
    for o in p.ops:
        out.append(
            [
                o.op,
                f"{o.calls:g}",
                seconds(o.total_s),
                pct(o.share),
                si(o.m.flops * o.calls, "FLOP"),
                si(o.m.bytes * o.calls, "B"),
                f"{o.m.intensity:.3g}" if o.counted else "-",
                o.bound,
                pct(o.roof_fraction),
                si(o.m.flops_per_s, "FLOP/s") if o.m.flops else "-",
            ]
        )
    return out


def hot_spot_lines(p: ModelProfile, n: int = HOT_SPOTS) -> list[str]:
    from tilestack.perf.report import pct, seconds

    return [
        f"{i + 1}. {o.op}: {pct(o.share)} of the step ({seconds(o.total_s)}), {o.tip}"
        for i, o in enumerate(p.hot_spots(n))
    ]


def print_profile(p: ModelProfile, con: Any = None, top: int | None = None) -> None:
    """Hot spots with tips first, then the per-op table (the ``top`` ops, all by default)."""
    from rich.table import Table

    from tilestack.perf.report import console, escape, seconds, si

    con = console(con)
    mode = "forward + backward" if p.train else "forward"
    con.print(
        f"[bold]{escape(p.name)}[/bold] on {escape(p.device.name)}: {mode}, {seconds(p.step_s)} of op time per step "
        f"({seconds(p.wall_s)} wall), {si(p.flops, 'FLOP')} per step"
    )
    con.print("[bold]hot spots[/bold]")
    for line in hot_spot_lines(p):
        con.print("  " + escape(line))
    t = Table(header_style="bold")
    for c in PROFILE_COLUMNS:
        t.add_column(c, overflow="fold")
    for r in profile_rows(p)[:top]:
        t.add_row(*(escape(c) for c in r))
    con.print(t)


def profile_html(p: ModelProfile, path: str | Path, png_path: str | Path | None = None) -> Path:
    """The profile as one self-contained HTML file, with a roofline of the counted ops."""
    from tilestack.perf import report

    counted = [o.m for o in p.ops if o.counted and o.m.flops > 0]
    png = report.roofline_png(
        counted, png_path, device=p.device, ceilings=p.ceilings, title=f"{p.name}: ops on {p.device.name}"
    )
    sections = [
        report.Section("hot spots", notes=hot_spot_lines(p)),
        report.Section(
            "roofline of the ops",
            png=png,
            notes=["each point is one ATen op, per call; solid: measured, dashed: published"],
        ),
        report.Section("ops", PROFILE_COLUMNS, profile_rows(p)),
        report.device_section(p.device, p.ceilings),
    ]
    return report.write_html(path, f"profile of {p.name}", sections)
