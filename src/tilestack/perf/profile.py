"""Profile a PyTorch model: where the time goes, op by op, and how far each op is from its roof.

    from tilestack.perf import profile
    prof = profile.profile_model(model, (x,), steps=5)            # device read off the model's parameters
    prof.ops[0].op, prof.ops[0].share, prof.ops[0].m.bound, prof.ops[0].m.tip
    profile.print_profile(prof)                                   # hot spots and tips first, then the table
    model, inputs = profile.load_target("examples/tiny.py:build") # what `tilestack profile` runs

Two passes over the same step, so counting never distorts timing:
1. counting (``tilestack.perf.counting``): one step under a ``TorchDispatchMode`` that sees every ATen op, counts its
   FLOPs with the formulas of ``torch.utils.flop_counter`` (matmuls, attention; causal attention halved as tilestack
   counts it) or tilestack's own (convolutions forward and backward with their groups: ``formulas.convolution``; the
   CPU LSTM kernel, norms, softmax, reductions, scatters, selections, interpolation, losses, dense linear algebra,
   matrix-vector products and 1 FLOP per element of a pointwise op; complex values as real FLOPs), and its bytes as
   the sizes of its distinct input and output tensors (views move none, an expanded input is read as held, a lookup
   reads only its rows). A composite op that reaches the mode whole (under ``inference_mode``) is counted as the ops
   it runs, as ``FlopCounterMode`` does; an op that computes but has no formula is listed in
   ``ModelProfile.unsupported`` (its FLOPs shown as ``?``, not 0). torch.compile'd code is counted eagerly
   (``force_eager``) and timed compiled;
2. timing: ``steps`` steps under ``torch.profiler`` with ``record_shapes`` (CUDA kernel time on a GPU, CPU
   self time on a CPU), after one discarded profiler step, or with ``steps=None`` rounds of steps until the
   median step time is known to +-5% or a time budget is spent; each op's time per step is its median over
   the steps (a step the machine descheduled does not set it), and is that of its whole subtree of the
   profiler's event tree when the counting pass saw it (``clone`` takes the ``copy_`` inside it), its own time
   otherwise (``linear``, which decomposes before dispatch, leaves its ``addmm`` to be counted on its own).
The two are joined by op name and input shapes, per step: a stem, a depthwise and a pointwise convolution are three
rows, each with its own bound and tip. Ops of any namespace the counting pass saw (``quantized::``, a
``torch.library`` custom op) are joined like ATen's; an op whose shapes change from step to step (data-dependent
routing) carries its counts in its row at the shapes the counting step did not see. A row's calls, FLOPs and bytes
are the counting pass's, so the rows (and ``ModelProfile.untimed``, counted ops the profiler timed under no row of
their own) add up to what was counted. ``profile_model`` checks its arguments, and that the inputs fit ``forward``,
before any work, and leaves the model as it found it (``profile_state.preserved``: parameters, buffers such as
BatchNorm's running statistics, gradients, training modes, the inputs and the RNG states are put back, so the
profile's many steps change nothing the caller sees); every step draws the same random numbers
(``profile_state.same_draws``) and starts from the Python-side state the warm-up left (``same_state``: a KV cache
concatenated onto, a position counter), so tokens sampled until an end token, or attention over a cache, are the
same work in every step. Every row becomes a :class:`Measurement` (per call) so it gets the same roofline placement
and tip as a kernel, and the spread of its time over the steps; time no ATen op accounts for is one ``(other)`` row.
An op on integers and bools only is placed under its dtype's roof where the device has one (int8 on most GPUs), else
under the step's float dtype's. The rows' config names the model, the step (forward, or forward and backward) and
the shapes, so ``tilestack compare`` pairs only the same op of the same model at the same shapes.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from tilestack.perf import call_tree, roofline, timing
from tilestack.perf.counting import (  # noqa: F401 - ProfileError, OpKey, Shapes, count_ops: public here too
    OpKey,
    ProfileError,
    Shapes,
    _Count,
    _event_shapes,
    _tensors,
    count_ops,
    event_key,
    split_by_dtype,
    tagged_ops,
    untagged,
)
from tilestack.perf.metrics import Measurement, compute_metrics, roofs_for
from tilestack.perf.profile_args import (
    _fresh,
    as_call,
    check_arguments,
    check_call,
    check_ceilings,
    check_leaf_inputs,
    check_placement,
    model_name,
)
from tilestack.perf.profile_render import (  # noqa: F401 - the rendering and target loading: public here too
    HOT_SPOTS,
    OTHER,
    PROFILE_COLUMNS,
    UNKNOWN_FLOPS,
    describe,
    error_text,
    hot_spot_lines,
    load_target,
    notes,
    print_profile,
    profile_html,
    profile_rows,
    shapes_text,
)
from tilestack.perf.profile_state import preserved, same_draws, same_state

US_TO_S = 1e-6
DEFAULT_WARMUP = 2
# steps=None profiles rounds of steps until the step time's median is known to +-5% or the budget is spent.
ROUND_STEPS = 6  # the first round: the fewest steps whose (min, max) is a 95% interval of the median
PROFILE_TARGET_REL_CI = 0.05
PROFILE_BUDGET_S = 10.0
PROFILER_WARMUP_STEPS = 1
SUM_ROUNDING_REL = 1e-9  # a step's time less its rows' by this little is the sums' rounding, not an (other) row
IMPL_SUFFIX = "_impl"  # aten::_index_put_impl_ implements aten::index_put_
DEFAULT_DTYPE = "fp32"  # of a step that moved no floating-point data
WHOLE_DTYPES = frozenset({"int8", "int32", "int64", "bool"})  # the dtypes of ops on integers and bools only
NO_FORMULA_TIP = (
    "no FLOP formula for this op: its FLOPs, bound and distance from the roof are unknown (its bytes are "
    "counted); compare its time with its neighbours'"
)  # the FLOPs column of an op with no FLOP formula


@dataclasses.dataclass(frozen=True)
class OpStat:
    """One ATen op at one set of input shapes over one step: ``calls``, ``total_s``, its ``share`` of the step,
    and ``m`` per call (with its own bound and tip: a depthwise and a dense convolution are different work)."""

    op: str
    calls: float
    total_s: float
    share: float
    m: Measurement
    counted: bool  # False: the op moved no counted bytes nor FLOPs (views, bookkeeping, uncounted time)
    shapes: Shapes = ()
    flops_known: bool = True  # False: an op that computes but has no FLOP formula (its FLOPs show as 0)

    @property
    def label(self) -> str:
        """``aten::convolution (2x16x8x8, 16x1x3x3)``: the op and the shapes it ran at."""
        return f"{self.op} ({shapes_text(self.shapes)})" if self.shapes else self.op

    @property
    def bound(self) -> str:
        if not self.flops_known:
            return "unknown"  # bytes alone would place it on the memory side, whatever its math
        return self.m.bound if self.counted else "-"

    @property
    def roof_fraction(self) -> float | None:
        return self.m.roof_fraction if self.counted and self.flops_known else None

    @property
    def tip(self) -> str:
        if not self.flops_known:
            return NO_FORMULA_TIP
        if self.counted:
            return self.m.tip
        return roofline.uncounted_tip(self.m.device_kind)


@dataclasses.dataclass(frozen=True)
class Untimed:
    """A counted op the profiler timed under no row of its own (under another name, or in few steps): its
    work per step still counts towards the profile's totals; its time is in another row or ``(other)``."""

    op: str
    shapes: Shapes
    calls: int
    flops: float  # per step
    bytes: float  # per step
    flops_known: bool = True


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
    step_times_s: tuple[float, ...] = ()  # op time of each profiled step
    untimed: tuple[Untimed, ...] = ()  # counted ops with no time of their own (see Untimed)
    unsupported: tuple[str, ...] = ()  # ops that compute but have no FLOP formula: their FLOPs are not in flops
    own_backward: bool = False  # train False, but the model runs its backward itself (a training step module)

    @property
    def flops(self) -> float:
        """FLOPs per step: every row's and every untimed op's, as the counting pass counted them."""
        return math.fsum([o.m.flops * o.calls for o in self.ops] + [u.flops for u in self.untimed])

    @property
    def bytes(self) -> float:
        """Bytes moved per step, summed like :attr:`flops`."""
        return math.fsum([o.m.bytes * o.calls for o in self.ops] + [u.bytes for u in self.untimed])

    @property
    def step_rel_ci(self) -> float | None:
        """How well the step time is known: the half-width of its median's 95% interval over the median."""
        return timing.rel_ci(self.step_times_s) if any(self.step_times_s) else None  # all 0: nothing ran

    def hot_spots(self, n: int | None = HOT_SPOTS) -> list[OpStat]:
        """The ``n`` ops that took the most time. A negative ``n`` (a slice's end) dropped the last rows silently
        and a str failed inside the slice (profiler round 13): both refused by name."""
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):  # None: all, as top=None
            raise ProfileError(f"hot_spots: n={describe(n)} ({type(n).__name__}); expected an int >= 0 (rows shown) "
                               "or None (all)")
        return [o for o in self.ops if o.op != OTHER][:n]


# --- the model step -----------------------------------------------------------------------------------------
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


# autograd's refusal of backward() or autograd.grad() on an output made under no_grad
NO_GRAD_FN = "does not require grad and does not have a grad_fn"


def make_step(model: Callable[..., Any], inputs: Any, *, train: bool = False) -> Callable[[], Any]:
    """One forward (``train`` False, under no_grad unless the model needs gradients to run: a training step calling
    backward and its optimizer itself), or forward + backward of the sum of the outputs (of both parts of a complex
    one). Each step calls the model with fresh containers around the inputs (:func:`_fresh`): every
    step sees the same inputs.

    Dense gradients accumulate from step to step (each step adds into them: the same work every step). A sparse
    one (nn.Embedding(sparse=True)) is dropped before each step: accumulated, it would grow by its rows every
    step (sparse adds concatenate), so no two steps, the counted one and the timed ones, would do the same work.
    """
    import torch

    if not isinstance(train, bool):  # "no" would be truthy: a backward nobody asked for
        raise ProfileError(f"train={describe(train)} ({type(train).__name__}); expected True or False")
    check_call(model, inputs)  # now, not when the step first runs
    if train:
        check_leaf_inputs(inputs)
    args, kwargs = as_call(inputs, model)
    params = list(model.parameters()) if train and isinstance(model, torch.nn.Module) else []
    needs_grad: list[bool] = []  # decided by the first forward-only call: [True] where the model needs gradients

    def forward_only(a: tuple, kw: dict) -> Any:
        # A forward runs under no_grad, unless the model needs gradients recorded to run at all: a training step
        # that calls backward and an optimizer itself, a net taking autograd.grad of its input. Under no_grad its
        # first call fails (autograd's NO_GRAD_FN): it is run again, and from then on, as it is written.
        if needs_grad:
            if not needs_grad[0]:
                with torch.no_grad():
                    return model(*a, **kw)
            return model(*a, **kw)
        try:
            with torch.no_grad():
                out = model(*a, **kw)
        except RuntimeError as e:
            if NO_GRAD_FN not in str(e):
                raise  # any other error: the model is not run again
            needs_grad.append(True)
            return model(*_fresh(args), **_fresh(kwargs))
        needs_grad.append(False)
        return out

    def step() -> Any:
        a, kw = _fresh(args), _fresh(kwargs)
        if not train:
            return forward_only(a, kw)
        for p in params:
            if p.grad is not None and p.grad.layout != torch.strided:
                p.grad = None
        out = model(*a, **kw)
        # a complex output's real and imaginary parts both (its .float() would drop the imaginary one, warning)
        loss = sum((torch.view_as_real(t) if t.is_complex() else t).float().sum()
                   for t in _tensors(out) if t.requires_grad)
        if not isinstance(loss, torch.Tensor):
            raise ProfileError(
                "train=True but no output of the model requires grad: there is no backward to profile; "
                "expected a model whose outputs depend on its parameters, or train=False (a training step that "
                "runs its own backward and optimizer is profiled with train=False)"
            )
        loss.backward()
        return out

    step.needs_grad = needs_grad  # type: ignore[attr-defined]  # [True] once found to run its own backward
    return step


def profile_model(
    model: Callable[..., Any],
    inputs: Any,
    *,
    steps: int | None = None,
    warmup: int = DEFAULT_WARMUP,
    train: bool = False,
    name: str | None = None,
    device: Any = None,
    ceilings: Any = None,
    fastpath: bool = False,
    budget_s: float = PROFILE_BUDGET_S,
) -> ModelProfile:
    """Profile ``model(*inputs)`` (a tuple, a dict of keyword arguments, or one tensor): see the module doc.

    ``steps`` profiles that many steps; None profiles rounds of steps (``ROUND_STEPS``, then as many as
    already done) until the median step time is known to ``PROFILE_TARGET_REL_CI`` or ``budget_s`` seconds
    of profiling have passed. Each op's time per step is its median over the steps (robust to a step the
    machine descheduled), with its spread.

    ``device`` None reads it off the inputs or parameters; ``ceilings`` None uses the cached (or freshly
    measured) ceilings of that device, measured again with the dtypes the step computes in that have no roof there
    (fp64 on a CPU), ``False`` none; given ceilings are taken as they are. ``fastpath`` False turns off the
    inference fast path of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer``: its fused native kernels
    call matmuls that no dispatch mode sees, so with it on their time is shown but not their FLOPs.
    """
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from tilestack.perf import device as device_mod

    check_arguments(
        model, inputs, steps=steps, warmup=warmup, train=train, name=name, device=device, ceilings=ceilings,
        fastpath=fastpath, budget_s=budget_s,
    )
    name = name or model_name(model)  # not type(model).__name__: every function would be 'function'
    dev = (
        device
        if isinstance(device, device_mod.Device)
        else device_mod.detect(_model_device(model, inputs) if device is None else device)  # 0: GPU 0
    )
    check_placement(model, inputs, dev.kind)
    check_ceilings(ceilings, dev)
    ceil = None if ceilings is False else (ceilings or device_mod.ceilings(dev))
    cuda = dev.kind == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step = bare = make_step(model, inputs, train=train)
    if not fastpath:
        step = _without_fastpath(step)

    def guarded(phase: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except ProfileError:
            raise
        except Exception as e:
            raise ProfileError(
                f"model {name!r} raised {type(e).__name__} during the {phase}: {error_text(e)} "
                f"(inputs={describe(inputs)})"
            ) from e

    def warm() -> None:
        for _ in range(warmup):
            step()
        sync()

    # The model as it was before (buffers, parameters, gradients, modes, RNG) once done, even if it raises.
    with preserved(model, inputs):
        step = same_draws(step, model)  # every step the same random draws: the same work, counted and timed
        # Warm-up first, so the counted step is a steady-state one (gradients already allocated, caches built).
        guarded("warm-up", warm)
        step = same_state(step, model, inputs)  # every later step from the state the warm-up left: the same work
        # (an op at one shape in several dtypes: a row per dtype, each under its own roof)
        counts = split_by_dtype(guarded("counting pass", lambda: count_ops(step)))
        if ceilings is None and ceil is not None:
            ceil = _with_roofs_for(ceil, dev, counts)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

        counted = {key for key, c in counts.items() if c.flops > 0 or c.bytes_read + c.bytes_written > 0}

        def timed(n: int) -> tuple[Any, float]:
            # One profiled-but-discarded step first: the profiler may drop kernel events as it starts up.
            plan = schedule(wait=0, warmup=PROFILER_WARMUP_STEPS, active=n, repeat=1)
            with profile(activities=activities, schedule=plan, record_shapes=True) as prof:
                for _ in range(PROFILER_WARMUP_STEPS):
                    step()
                    prof.step()
                sync()
                t0 = time.perf_counter()
                for _ in range(n):
                    step()
                    sync()  # inside the step, so its kernels belong to it
                    prof.step()
                wall = time.perf_counter() - t0
            return prof, wall

        t_start = time.perf_counter()
        rounds: list[tuple[dict[OpKey, _Timed], list[float], float]] = []
        wall = 0.0
        while True:
            done = sum(len(r[1]) for r in rounds)
            n = steps if steps is not None else max(ROUND_STEPS, done)
            r0 = time.perf_counter()
            prof, w = guarded("profiled steps", lambda n=n: timed(n))
            # CPU events straight from the profiler's raw records (call_tree: prof.events() costs ~0.24 ms an event);
            # a GPU kernel's time needs torch's correlation of kernels with their launches
            rounds.append(attribute(prof.events() if cuda else call_tree.cpu_events(prof), counted, cuda))
            wall += w
            now = time.perf_counter()
            step_s = [x for r in rounds for x in r[1]]
            if steps is not None or not any(step_s) or timing.rel_ci(step_s) <= PROFILE_TARGET_REL_CI:
                break
            # The next round has as many steps as all before, each costing what this one's did (profiler included).
            if now - t_start + (now - r0) * (done + n) / n > budget_s:
                break
        own = getattr(bare, "needs_grad", None) == [True]
        return _join(name, dev, ceil, counts, counted, rounds, wall, train, own_backward=own)


def _with_roofs_for(ceil: Any, dev: Any, counts: Mapping[OpKey, _Count]) -> Any:
    """The cached ceilings, measured again with the dtypes the step computes in that have no roof here (neither
    measured nor published: a float64 model on a CPU, whose cached ceilings hold fp32 and bf16), where the device
    can measure them; else as they are. Without this every row of such a model reads "bound unknown"."""
    from tilestack.perf import device as device_mod

    spec = getattr(dev, "spec", None)
    missing = {
        c.dtype for c in counts.values()
        if c.flops > 0 and c.dtype in device_mod.MEASURABLE_DTYPES and ceil.peak(c.dtype) is None
        and (spec is None or spec.peak(c.dtype) is None)
    }
    if not missing:
        return ceil
    dtypes = sorted(({*ceil.matmul} & set(device_mod.MEASURABLE_DTYPES)) | missing)
    try:
        return device_mod.ceilings(dev, dtypes=dtypes)
    except (device_mod.DeviceError, RuntimeError) as e:  # a dtype this machine cannot multiply in: as before
        warnings.warn(f"no roof measured for {', '.join(sorted(missing))} on {dev.name} ({e}): the rows of those "
                      "dtypes have no bound", stacklevel=3)
        return ceil


def _self_s(e: Any, cuda: bool) -> float:
    if cuda:  # torch < 2.4 named it self_cuda_time_total
        us = getattr(e, "self_device_time_total", None)
        return float(us if us is not None else getattr(e, "self_cuda_time_total", 0.0)) * US_TO_S
    return float(e.self_cpu_time_total) * US_TO_S


@dataclasses.dataclass
class _Timed:
    """One row's profiled time: calls and seconds over all steps, and seconds in each step."""

    calls: int = 0
    seconds: float = 0.0
    per_step: dict[int, float] = dataclasses.field(default_factory=lambda: collections.defaultdict(float))
    inside: OpKey | None = None  # the counted row whose subtree the profiler ran this counted op in

    def add(self, other: _Timed) -> None:
        self.calls += other.calls
        self.seconds += other.seconds
        for k, v in other.per_step.items():
            self.per_step[k] += v
        self.inside = self.inside or other.inside


def resolve(key: OpKey, counted: Collection[OpKey], names: Mapping[str, Sequence[OpKey]]) -> OpKey | None:
    """The counted row a profiled ``(op, shapes)`` belongs to, or None.

    The key itself; else its in-place or out-of-place twin at the same shapes (with a dispatch mode on, a
    composite op may run ``add`` where plain eager runs ``add_``: composite compliance), or the public op of an
    implementation op (autograd's index backward calls ``_index_put_impl_`` where the dispatch mode sees
    ``index_put``); else the one counted row of that name, when there is only one (a shape the profiler records
    differently, e.g. a tensor list).
    """
    if key in counted:
        return key
    name, shapes = key
    for twin_name in _twin_names(name):
        if (twin_name, shapes) in counted:
            return twin_name, shapes
    same_name = names.get(name, ())
    return same_name[0] if len(same_name) == 1 else None


def _twin_names(name: str) -> list[str]:
    """Names an op may be counted under where the profiler times it as ``name``: its in-place or out-of-place
    twin, and for an implementation op (``aten::_index_put_impl_``) its public op, both forms."""
    names = [name[:-1] if name.endswith("_") else name + "_"]
    ns, _, op = name.partition("::")
    base = op.rstrip("_")
    if base.startswith("_") and base.endswith(IMPL_SUFFIX):
        public = f"{ns}::{base[1:-len(IMPL_SUFFIX)]}"
        names += [public, public + "_"]
    return names


def _by_name(keys: Collection[OpKey]) -> dict[str, list[OpKey]]:
    names: dict[str, list[OpKey]] = collections.defaultdict(list)
    for key in keys:
        names[key[0]].append(key)
    return names


def _is_op(name: str, counted_names: Collection[str]) -> bool:
    """An event of an op: any ATen op, and an op of another namespace the counting pass saw (``quantized::``,
    ``torchvision::``, a ``torch.library`` custom op), not a ``record_function`` range or an autograd node."""
    return name.startswith("aten::") or name in counted_names


def attribute(
    events: Sequence[Any], counted: Collection[OpKey], cuda: bool
) -> tuple[dict[OpKey, _Timed], list[float], float]:
    """Seconds and calls per (op name, input shapes) over the profiler's event tree, as the counting pass saw them.

    The dispatch mode counts the outermost ATen op of each call chain below autograd (``clone``, not the
    ``copy_`` inside it); so a counted op takes the time of its whole subtree, while an op it never saw
    (``linear``, which decomposes before dispatch) keeps only its own time and its children are visited.
    Returns ``{(op, shapes): _Timed}``, the time of each ``ProfilerStep`` (GPU kernel time, or CPU self time),
    and the time outside any step. Each counted event is keyed by the counted row it resolves to (:func:`resolve`).
    """
    from torch.autograd import DeviceType

    names = _by_name(counted)
    tagged = tagged_ops(counted)   # ops counted at one shape in several dtypes: their events' rows by dtype

    per: dict[OpKey, _Timed] = collections.defaultdict(_Timed)
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    roots = [e for e in cpu if e.cpu_parent is None]
    step_roots = sorted((e for e in roots if e.name.startswith("ProfilerStep")), key=lambda e: e.time_range.start)
    step_of = {id(e): i for i, e in enumerate(step_roots)}
    step_s = [0.0] * len(step_roots)
    outside = 0.0

    def subtree_s(e: Any, row: OpKey) -> float:
        """The subtree's time; counted ops inside it (autograd's clone inside mul_) are marked as in ``row``."""
        acc, stack = 0.0, [e]
        while stack:
            x = stack.pop()
            acc += _self_s(x, cuda)
            stack.extend(x.cpu_children)
            if x is not e and _is_op(x.name, names):
                inner = resolve(event_key(x, counted, tagged), counted, names)
                if inner is not None and inner != row and per[inner].inside is None:
                    per[inner].inside = row
        return acc

    stack: list[tuple[Any, int | None]] = [(e, step_of.get(id(e))) for e in roots]
    while stack:
        e, step = stack.pop()
        key = event_key(e, counted, tagged) if _is_op(e.name, names) else None
        row = resolve(key, counted, names) if key is not None else None
        whole = row is not None  # a counted op: its subtree is its time, and nothing below is visited
        s = subtree_s(e, row) if row is not None else 0.0 if e.name.startswith("ProfilerStep") else _self_s(e, cuda)
        if step is None:
            outside += s
        else:
            step_s[step] += s
        if key is not None:
            t = per[row or key]
            t.calls += 1
            t.seconds += s
            if step is not None:
                t.per_step[step] += s
        if not whole:
            stack.extend((c, step) for c in e.cpu_children)
    return dict(per), step_s, outside


def _fold_untimed(
    counts: dict[OpKey, _Count], counted: set[OpKey], timed: set[OpKey], inside: Mapping[OpKey, OpKey]
) -> dict[OpKey, _Count]:
    """Counts with each counted op that got no time of its own folded into the row that has its time: the row
    whose subtree the profiler ran it in (autograd's ``clone`` inside ``mul_``), else its in-place or out-of-place
    twin at the same shapes (``add`` counted, ``add_`` timed: composite compliance), else the nearest composite
    it ran inside that has a row (``max_pool1d``, whose own CPU kernel plain eager runs instead of the
    ``max_pool2d_with_indices`` the counting pass saw), else the op's own row at shapes the counting step did not
    see (data-dependent shapes). Calls stay the row's own. Ops with none of these stay apart
    (``ModelProfile.untimed``)."""
    out = {k: dataclasses.replace(c) for k, c in counts.items()}
    for key in counted - timed:
        name, shapes = key
        target, seen = inside.get(key), {key}
        while target is not None and target not in timed and target not in seen:  # a chain of nested rows
            seen.add(target)
            target = inside.get(target)
        if target is None or target not in timed:
            twin = (name[:-1] if name.endswith("_") else name + "_", shapes)
            target = twin if twin in timed and twin in counted else None
        if target is None and (name, ()) in timed:
            # The same op, timed only at shapes the counting step did not run: shapes that depend on the data
            # (an expert's share of tokens under noisy routing) differ from step to step.
            target = (name, ())
        if target is None:  # the composite it ran inside, where eager runs that one's own kernel instead
            target = next(
                (k for parent in counts[key].parents for k in (parent, (parent[0], ())) if k in timed), None
            )
        if target is None:
            continue
        c = out.pop(key)
        into = out.setdefault(target, _Count(dtype=c.dtype))  # calls 0: an uncounted row keeps the profiler's
        into.flops += c.flops
        into.bytes_read += c.bytes_read
        into.bytes_written += c.bytes_written
        into.unsupported = into.unsupported or c.unsupported
    return out


def _join(
    name: str,
    dev: Any,
    ceil: Any,
    counts: dict[OpKey, _Count],
    counted: set[OpKey],
    rounds: Sequence[tuple[dict[OpKey, _Timed], list[float], float]],
    wall: float,
    train: bool,
    *,
    own_backward: bool = False,
) -> ModelProfile:
    """Rows from the profiled rounds: each op's per-step time is its median over all steps, the step the sum.

    A counted row's calls, FLOPs and bytes per step are the counting pass's (one step, exact); the profiler
    gives only its time. So the rows' FLOPs and bytes add up to what was counted: a counted row that got no
    time of its own (the profiler ran it under another name, or in fewer than half of the steps) is kept in
    ``ModelProfile.untimed`` with its counts.
    """
    rows: dict[OpKey, _Timed] = collections.defaultdict(_Timed)
    step_s: list[float] = []
    outside = 0.0
    for timed, r_step_s, r_outside in rounds:
        offset = len(step_s)  # the round's steps are numbered after the earlier rounds' steps
        for key, t in timed.items():
            if key not in counted:
                key = (key[0], ())  # no bound nor tip to tell apart: one row per op name (views, bookkeeping)
            rows[key].add(_Timed(t.calls, t.seconds, {i + offset: v for i, v in t.per_step.items()}, t.inside))
        step_s += r_step_s
        outside += r_outside
    steps = len(step_s) or 1
    inside = {k: t.inside for k, t in rows.items() if t.inside is not None}
    rows = {k: t for k, t in rows.items() if t.seconds > 0}
    unsupported = tuple(sorted({untagged(op) for (op, _), c in counts.items() if c.unsupported}))
    # Rows with time in the median step: a counted op timed in fewer than half of the steps (data-dependent
    # shapes) has none, and its counts go to a row that has.
    timed = {k for k, t in rows.items() if statistics.median([t.per_step.get(i, 0.0) for i in range(steps)]) > 0}
    counts = _fold_untimed(counts, counted, timed, inside)
    counted = counted | {k for k, c in counts.items() if c.flops > 0 or c.bytes_read + c.bytes_written > 0}

    def per_step(t: _Timed) -> tuple[float, ...]:
        return tuple(t.per_step.get(i, 0.0) for i in range(steps))

    # Time no ATen op accounts for (autograd bookkeeping, custom kernels), step by step.
    attributed = [math.fsum(t.per_step.get(i, 0.0) for t in rows.values()) for i in range(len(step_s))]
    residual = [
        total - a if total - a > SUM_ROUNDING_REL * total else 0.0 for total, a in zip(step_s, attributed, strict=True)
    ]
    if outside > 0 or any(residual):
        rows[OTHER, ()] = _Timed(0, math.fsum(residual) + outside, dict(enumerate(residual)))
    median_s = {k: statistics.median(per_step(t)) for k, t in rows.items()}
    total = math.fsum(median_s.values())
    mode = "forward+backward" if train else "own step" if own_backward else "forward"
    kind = dev.kind
    # Rows with no dtype of their own (views, (other)) take the dtype that moves the most bytes in the step.
    moved: dict[str, float] = collections.Counter()
    for c in counts.values():
        if c.dtype and c.dtype not in WHOLE_DTYPES:
            moved[c.dtype] += c.bytes_read + c.bytes_written
    step_dtype = max(moved, key=moved.__getitem__) if moved else DEFAULT_DTYPE
    ops: list[OpStat] = []
    for key, t in rows.items():
        op, shapes = untagged(key[0]), key[1]     # (a row of an op's second dtype at these shapes: its own)
        s = median_s[key]
        if s <= 0:
            continue  # an op in fewer than half of the steps: no time in the median step
        c = counts.get(key) if key in counted else None
        calls = c.calls if c is not None and c.calls else t.calls / steps  # counted calls are exact; else profiler's
        per_call = max(calls, 1)
        c = c or _Count()
        dtype = c.dtype or step_dtype
        # Per-call time in each step: how much the op's time varies from step to step.
        spread = timing.Timing(tuple(x / per_call for x in per_step(t)), "torch-profiler", PROFILER_WARMUP_STEPS, 1)
        roofs = roofs_for(dev, ceil, dtype)
        if dtype in WHOLE_DTYPES and not (roofs.measured.peak_flops_per_s or roofs.published.peak_flops_per_s):
            # No roof for integer math here (int8 has one on most GPUs' sheets): integer ALU work runs on the float
            # lanes at about their rate, so the step's float roof places it, and the row reads as of that dtype.
            dtype = step_dtype
            roofs = roofs_for(dev, ceil, dtype)
        m = compute_metrics(
            name=op,
            latency_s=s / per_call,
            flops=c.flops / per_call,
            bytes_read=c.bytes_read / per_call,
            bytes_written=c.bytes_written / per_call,
            roofs=roofs,
            device=dev.name,
            device_kind=kind,
            dtype=dtype,
            config={
                "model": name,
                "step": mode,
                "shapes": shapes_text(shapes),
                "calls/step": round(calls, 2),
                **({} if not c.unsupported else {"flops": "no formula"}),  # stored: 0 FLOPs here means unknown
            },
            timing=spread,
        )
        ops.append(OpStat(op, calls, s, s / total if total else 0.0, m, key in counted, shapes, not c.unsupported))
    ops.sort(key=lambda o: o.total_s, reverse=True)
    timed_keys = {key for key in rows if median_s[key] > 0}
    untimed = tuple(
        Untimed(untagged(op), shapes, c.calls, c.flops, c.bytes_read + c.bytes_written, not c.unsupported)
        for (op, shapes), c in counts.items()
        if (op, shapes) in counted and (op, shapes) not in timed_keys
    )
    return ModelProfile(
        name, dev, ceil, steps, train, total, wall / steps, ops, tuple(step_s), untimed, unsupported, own_backward
    )
