"""What ``tilestack.perf.profile.profile_model`` puts back after profiling: the model as it found it.

A profile runs the model's step many times (warm-up, the counting pass, the profiled rounds). Each step may change
the model: BatchNorm's running statistics and num_batches_tracked move, a forward that updates its own state (a
MoCo queue and its pointer, a momentum encoder's parameters, a step counter buffer) does so once per step, a training
step sums its gradients into every parameter's ``.grad``, and random ops advance the RNG. ``preserved`` keeps what
each of those was and puts it back, even when the model raises, so that the model's next output is the one it would
have given unprofiled. State a module keeps in plain attributes is put back too: a recurrent state carried from call
to call (truncated BPTT), a Python flag (ActNorm's "initialised from the first batch") or counter, a list a hook
appends to, a ``torch.Generator`` of the model's own, an optimizer's, a scheduler's and a grad scaler's state (a
training step written as a module that holds its optimizer).

    with preserved(model, inputs):
        ...run the steps...
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import operator
import random
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from tilestack.perf.counting import _tensors
from tilestack.perf.profile_args import _fresh


class _Saved:
    """One tensor's values, kept off the profiled device (the snapshot takes none of its memory). Put back only
    where they differ: copying back an unchanged tensor would move its version counter and break the caller's
    autograd graphs that saved it. Compared by value, not by version counter: BatchNorm's kernel updates its running
    statistics in place without moving theirs, writes through ``.data`` (an EMA's ``p.data.mul_``) move none, and
    an inference tensor keeps none."""

    def __init__(self, t: Any) -> None:
        import torch

        self.tensor = t
        with torch.no_grad():
            self.values = t.detach().to("cpu", copy=True)

    def restore(self) -> None:
        import torch

        t = self.tensor
        values = self.values.to(t.device)
        if t.shape != values.shape:
            # resized in place (an observer's min/max, empty until its first forward): the tensor's old size back
            t.data = values
            return
        if torch.equal(t.detach(), values):
            return
        # an inference tensor can only be written inside inference_mode; any other under no_grad (a leaf parameter)
        with torch.inference_mode() if t.is_inference() else torch.no_grad():
            t.copy_(values)


def _saveable(t: Any) -> bool:
    """A plain tensor with data: a meta tensor or a lazy module's uninitialised parameter holds none, a sparse or
    nested one cannot be copied back in place."""
    import torch

    return (isinstance(t, torch.Tensor) and not is_lazy(t) and t.layout == torch.strided and not t.is_nested
            and t.device.type != "meta")


def is_lazy(t: Any) -> bool:
    """An uninitialised parameter or buffer of a lazy module (nn.LazyLinear before its first forward)."""
    from torch.nn.parameter import is_lazy as lazy

    return t is not None and lazy(t)


def _module_internals() -> frozenset[str]:
    """The attributes every nn.Module has (its parameter, buffer, submodule and hook tables, ``training``): kept
    by the other means of :func:`preserved`, or not state at all."""
    import torch

    return frozenset(vars(torch.nn.Module()))


class _Attributes:
    """A module's plain attributes (``vars(m)`` less the nn.Module internals) and what each held: rebound on
    restore where the forward rebound one (``self.state = (h, c)``, ``self.initialized = True``), a list, dict,
    set or deque emptied and refilled (it may have been changed in place). Tensors they hold are put back by value
    with the parameters, generators' states with the others' (see ``preserved``)."""

    def __init__(self, m: Any, internals: frozenset[str]) -> None:
        self.module, self.internals = m, internals
        self.values = {k: v for k, v in vars(m).items() if k not in internals}
        self.size = len(vars(m))
        # containers changed in place: their items (a deque of the last frames keeps its maxlen, refilled)
        self.contents = {k: (dict(v) if isinstance(v, dict) else list(v)) for k, v in self.values.items()
                         if isinstance(v, list | dict | set | collections.deque)}

    def restore(self) -> None:
        now = vars(self.module)
        if not self.contents and _same(now, self.values, self.size):
            return  # nothing added, removed nor rebound: the common case, checked at C speed (a step restores all)
        for k in [k for k in now if k not in self.values and k not in self.internals]:
            del now[k]  # set by the profiled steps
        for k, v in self.values.items():
            if k not in now or now[k] is not v:
                now[k] = v
        for k, held in self.contents.items():
            v = self.values[k]
            if not _changed(v, held):
                continue
            v.clear()
            if isinstance(v, dict | set):
                v.update(held)
            else:
                v.extend(held)


class _Stepper:
    """An optimizer, a learning-rate scheduler or a grad scaler a module holds in a plain attribute (a training step
    written as a module: ``self.opt = AdamW(self.parameters())``, whose forward calls backward and
    ``self.opt.step()``): the per-parameter state an optimizer's steps create and change (Adam's moments and step
    count, SGD's momentum buffers: created by the first step, moved by every one), its parameter groups' settings (a
    scheduler's lr), and a scheduler's or grad scaler's own attributes (its epoch and last lr; the loss scale and
    its growth tracker). ``restore`` rebinds them; the tensors among them (``held``) are put back by value with the
    others."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.state = {p: dict(s) for p, s in obj.state.items()} if hasattr(obj, "param_groups") else None
        self.groups = [dict(g) for g in obj.param_groups] if hasattr(obj, "param_groups") else None
        # containers copied (a grad scaler's per-optimizer states: a dict of dicts its step() changes in place)
        self.attributes = None if hasattr(obj, "param_groups") else _fresh(dict(vars(obj)))
        self.held = [self.state, self.groups, self.attributes]

    def restore(self) -> None:
        if self.attributes is not None:  # a scheduler, a grad scaler
            vars(self.obj).clear()
            vars(self.obj).update(_fresh(self.attributes))
            return
        self.obj.state.clear()  # a defaultdict(dict): a parameter it did not hold gets an empty state again
        self.obj.state.update({p: dict(s) for p, s in self.state.items()})
        for group, saved in zip(self.obj.param_groups, self.groups, strict=False):
            group.clear()
            group.update(saved)


def _stepper_kinds() -> tuple[type, ...]:
    import torch

    return torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.amp.GradScaler


def _steppers(attributes: list[_Attributes], bound: list[Any]) -> list[_Stepper]:
    """The optimizers, learning-rate schedulers and grad scalers the modules hold in their plain attributes, or
    that a partial binds or a function refers to."""
    kinds = _stepper_kinds()
    held = [v for a in attributes for v in a.values.values()] + list(bound)
    held += [x for v in held if isinstance(v, list | tuple | dict) for x in (v.values() if isinstance(v, dict) else v)]
    found = {id(v): v for v in held if isinstance(v, kinds)}  # as attributes, or in a list or dict of them
    return [_Stepper(v) for v in found.values()]


def _same(now: dict, before: dict, size: int) -> bool:
    """Whether ``now`` still has ``size`` entries and holds the very objects ``before`` had under its keys."""
    return len(now) == size and all(map(operator.is_, map(now.get, before), before.values()))


def _changed(now: Any, held: Any) -> bool:
    """Whether a container's items differ from those kept, by identity (``==`` on tensors compares elements)."""
    if len(now) != len(held):
        return True
    if isinstance(now, dict):
        return any(k not in held or v is not held[k] for k, v in now.items())
    if isinstance(now, set):
        return now != set(held)  # membership tests identity first: no tensor is compared by value
    return any(a is not b for a, b in zip(now, held, strict=True))


def _unwrap(model: Any, inputs: Any = ()) -> tuple[list[Any], list[Any], list[Any]]:
    """The modules whose state a call of ``model`` may change (the model, net.forward's net, a net a
    ``functools.partial`` binds), the arguments its partials bind (and the modules, optimizers and tensors a function
    refers to), and the plain objects (:func:`_reachable`) the modules, the bound arguments and the ``inputs`` hold."""
    import torch

    bound: list[Any] = []  # what functools.partial(net, mask=m) binds: its tensors are kept as the inputs are
    while isinstance(model, functools.partial):
        bound += [*model.args, *model.keywords.values()]
        model = model.func
    bound += _referenced(model)
    owners = [o if isinstance(o, torch.nn.Module) else getattr(o, "__self__", None) for o in (model, *bound)]
    roots = [o for o in owners if isinstance(o, torch.nn.Module)] + [model, *bound, inputs]
    modules, objects = _reachable(roots)
    return modules, bound, objects


OBJECT_DEPTH = 6  # links followed from a model to the modules and plain objects it holds (attribute, item, ...)
OBJECT_ITEMS = 256  # items of one list, tuple, set or dict looked into for modules and plain objects


def _plain_object(x: Any) -> bool:
    """An instance of a user class that keeps its state in its ``__dict__`` (a KV cache object, a holder of a teacher
    net): not a module, tensor, class, function, Python module, generator, optimizer (``_Stepper`` puts those back)."""
    import types

    import torch

    return hasattr(x, "__dict__") and not isinstance(x, (
        type, torch.nn.Module, torch.Tensor, types.FunctionType, types.MethodType, types.BuiltinFunctionType,
        types.ModuleType, functools.partial, torch.Generator, *_stepper_kinds(),
    ))


def _reachable(roots: list[Any]) -> tuple[list[Any], list[Any]]:
    """The modules (with their submodules) and the plain objects reachable from ``roots`` through modules' plain
    attributes, plain objects' attributes and the items of lists, tuples, sets and dicts (``OBJECT_DEPTH`` links,
    ``OBJECT_ITEMS`` items of each container).

    A module's registered submodules were not all a forward changes (profiler round 13): a net held in a plain list
    (``self._teacher = [copy.deepcopy(self.net)]``, kept out of ``parameters()`` on purpose, as EMA teachers are)
    had its parameters and BatchNorm statistics moved by every profiled step and left so; a cache object on the
    module or among the inputs (``cache.keys.append(k)``, as a decoder's past key values) grew by one entry per
    step, so every timed step attended over a longer cache than the counted one, and the caller's cache was left
    holding the profile's entries."""
    import torch

    internals = _module_internals()
    modules: dict[int, Any] = {}
    objects: dict[int, Any] = {}
    seen: set[int] = set()
    todo = [(r, 0) for r in roots]
    while todo:
        x, depth = todo.pop()
        if id(x) in seen or depth > OBJECT_DEPTH or isinstance(x, torch.Tensor | str | bytes | int | float):
            continue
        seen.add(id(x))
        if isinstance(x, torch.nn.Module):
            for m in x.modules():
                modules.setdefault(id(m), m)
                todo += [(v, depth + 1) for k, v in vars(m).items() if k not in internals]
        elif isinstance(x, Mapping):
            todo += [(v, depth + 1) for v in itertools.islice(x.values(), OBJECT_ITEMS)]
        elif isinstance(x, list | tuple | set | frozenset | collections.deque):
            todo += [(v, depth + 1) for v in itertools.islice(x, OBJECT_ITEMS)]
        elif _plain_object(x):
            objects.setdefault(id(x), x)
            todo += [(v, depth + 1) for v in vars(x).values()]
    return list(modules.values()), list(objects.values())


def _referenced(fn: Any, depth: int = 3) -> list[Any]:
    """The modules, optimizers, schedulers, grad scalers, tensors (and lists, tuples and dicts of them) and plain
    objects a plain function (a training step ``def step(x, y)``, a lambda around a model, a functional model on its
    own weight tensors) refers to by its closure or by global names, also through the functions it calls (to
    ``depth``): a profile of the function runs their steps, and must put them back too."""
    import types

    import torch

    found: dict[int, Any] = {}
    todo, seen = [(fn, depth)], set()
    while todo:
        f, left = todo.pop()
        if not isinstance(f, types.FunctionType) or id(f) in seen:
            continue
        seen.add(id(f))
        codes, names = [f.__code__], set()
        while codes:  # its own names and those of the lambdas and comprehensions inside it
            code = codes.pop()
            names.update(code.co_names)
            codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
        cells = []
        for cell in f.__closure__ or ():
            with contextlib.suppress(ValueError):  # a cell not yet filled
                cells.append(cell.cell_contents)
        for obj in [*cells, *(f.__globals__[n] for n in names if n in f.__globals__)]:
            if isinstance(obj, (torch.nn.Module, torch.Tensor, *_stepper_kinds())) or (
                isinstance(obj, list | tuple | dict) and _tensors(obj)
            ) or (not isinstance(obj, types.FunctionType) and _plain_object(obj)):
                # tensors too (round 13): a functional model's own weights (``x @ W1 + b1``, W1 a global leaf that
                # requires grad) took the profile's gradients, summed over its steps, and kept them in W1.grad
                found.setdefault(id(obj), obj)
            elif left > 1:
                todo.append((obj, left - 1))
    return list(found.values())


class _Draws:
    """The random number generators' states: torch's (CPU and every initialised GPU), Python's ``random``,
    NumPy's, and the ``torch.Generator`` attributes of ``modules``; ``restore`` sets them all back."""

    def __init__(self, modules: list[Any]) -> None:
        import torch

        self.cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.torch = torch.get_rng_state()
        self.gpus = torch.cuda.get_rng_state_all() if self.cuda else None
        self.python = random.getstate()
        self.numpy = sys.modules["numpy"].random.get_state() if "numpy" in sys.modules else None
        self.generators = [(g, g.get_state()) for m in modules for g in vars(m).values()
                           if isinstance(g, torch.Generator)]

    def restore(self) -> None:
        import torch

        torch.set_rng_state(self.torch)
        if self.gpus is not None:
            torch.cuda.set_rng_state_all(self.gpus)
        random.setstate(self.python)
        if self.numpy is not None:
            sys.modules["numpy"].random.set_state(self.numpy)
        for g, state in self.generators:
            g.set_state(state)


def same_draws(step: Callable[[], Any], model: Any) -> Callable[[], Any]:
    """``step`` drawing the same random numbers on every call: the generators (global and the model's own) are set
    back to their states of now before each. A step whose work depends on its draws (tokens sampled until an
    end token, a random depth) then does the same work in the counted step and in every timed one; without this
    the counted step's 6 sampled tokens were joined with timed steps of 1 to 30."""
    modules, _, objects = _unwrap(model)
    draws = _Draws([*modules, *objects])

    def inner() -> Any:
        draws.restore()
        return step()

    return inner


class _Bindings:
    """Which objects ``modules`` hold: each one's tables (parameters, buffers, submodules and hooks: the dicts among
    the nn.Module internals) and plain attributes (:class:`_Attributes`); ``restore`` rebinds them, copying no tensor
    (rebinding, ``self.buf = self.buf + 1``, is undone too). A ScriptModule's tables wrap C++ state that Python cannot
    rebind; a lazy module's first forward rewrites its attributes (in_features, its class), materialises its
    parameters and removes its initialising hook: those changes stay.

    The submodule table too: a forward that builds a head on its first call (``if self.head is None: self.head =
    nn.Linear(...)``) or swaps one (``self.act = nn.GELU()``) moves it from the plain attributes into ``_modules``;
    with only the attributes put back, the caller's model read ``head`` as None while ``parameters()`` and
    ``state_dict()`` still held the head's weights. And the hook tables: a forward that registers a hook on every call
    left one per profiled step on the caller's model, and each timed step ran more hooks than the counted one
    (profiler round 12)."""

    def __init__(self, modules: list[Any], objects: list[Any] = ()) -> None:
        import torch

        lazy = torch.nn.modules.lazy.LazyModuleMixin
        internals = _module_internals()
        self.slots = [
            (m, {name: dict(table) for name in internals
                 if type(table := vars(m).get(name)) in (dict, collections.OrderedDict)
                 and (name in ("_parameters", "_buffers", "_modules") or not isinstance(m, lazy))})
            for m in modules
            if all(isinstance(getattr(m, t, None), dict) for t in ("_parameters", "_buffers", "_modules"))
        ]
        self.attributes = [_Attributes(m, internals) for m in modules if not isinstance(m, lazy)]
        # a plain object's attributes (a cache object's list of keys), rebound and refilled as a module's
        self.attributes += [_Attributes(o, frozenset()) for o in objects]

    def restore(self) -> None:
        for m, tables in self.slots:
            held = vars(m)
            for name, before in tables.items():
                now = held.get(name)
                if now is None or (_same(now, before, len(before)) and list(now) == list(before)):
                    continue  # the same entries in the same order (a hook moved last holds the same entries)
                # Rebuilt in its old order (hooks run in it, parameters() and state_dict() list by it); a lazy
                # parameter materialised by the forward keeps its new tensor.
                items = [(k, now[k] if is_lazy(t) else t) for k, t in before.items() if k in now or not is_lazy(t)]
                now.clear()
                now.update(items)
        for a in self.attributes:
            a.restore()


def same_state(step: Callable[[], Any], model: Any, inputs: Any = ()) -> Callable[[], Any]:
    """``step`` starting on every call from the model's state of now (after the warm-up): its plain attributes and
    parameter and buffer tables rebound as they are now (no tensor copied: a copy would be the step's work). A
    model whose work grows with its state (a KV cache concatenated onto, or written at a position counter) then
    does the same work in the counted step and in every timed one; without this each timed step attended over a
    longer cache than the counted one. Plain objects among ``inputs`` (a cache object passed to forward) too."""
    modules, _, objects = _unwrap(model, inputs)
    bindings = _Bindings(modules, objects)

    def inner() -> Any:
        bindings.restore()
        return step()

    return inner


@contextlib.contextmanager
def preserved(model: Any, inputs: Any) -> Iterator[None]:
    """Keep, and put back on exit, for a module, a bound method of one (``net.forward``) or a ``functools.partial`` of
    either: each module's parameters, buffers, submodules and plain attributes (which tensors and objects they are,
    and the tensors' values and requires_grad flags), each parameter's (and each leaf input's) ``.grad`` tensor (set
    aside, so the profile's gradients are neither added into the caller's nor left behind), each module's training
    mode, the input tensors' values, and the RNG states of torch (CPU and every initialised GPU), Python's ``random``
    and NumPy's; likewise the modules and plain objects (their attributes) that these and the inputs hold
    (:func:`_reachable`), and the tensors a function refers to (:func:`_referenced`)."""

    modules, bound, objects = _unwrap(model, inputs)
    bindings = _Bindings(modules, objects)
    values = [t for m in modules for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))]
    values += _tensors([a.values for a in bindings.attributes])
    steppers = _steppers(bindings.attributes, bound)
    values += _tensors([s.held for s in steppers])
    modes = [(m, m.training) for m in modules]
    held: dict[int, Any] = {}
    for t in (*values, *_tensors(inputs), *_tensors(bound)):
        if _saveable(t):
            held.setdefault(id(t), t)
    saved = [_Saved(t) for t in held.values()]
    with_grad = [t for t in held.values() if t.requires_grad and t.is_leaf]
    grads = [(t, t.grad) for t in with_grad]
    for t in with_grad:
        t.grad = None
    # Whether each leaf requires grad: a forward that freezes a layer (``self.encoder.requires_grad_(False)`` after
    # some calls) left the caller's parameters frozen, so its next training step skipped their gradients (round 12).
    flags = [(t, t.requires_grad) for t in held.values() if t.is_leaf]
    draws = _Draws([*modules, *objects])
    try:
        yield
    finally:
        bindings.restore()
        for stepper in steppers:
            stepper.restore()
        for s in saved:
            s.restore()
        for t, flag in flags:
            if t.requires_grad != flag:
                t.requires_grad_(flag)
        for t, grad in grads:
            t.grad = grad
        for m, mode in modes:
            m.training = mode
        draws.restore()
