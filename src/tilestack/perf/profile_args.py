"""What ``tilestack.perf.profile.profile_model`` checks before it runs anything: each argument by name (what was
given and what was expected), and that the model and its inputs sit on the device being profiled."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from typing import Any

from tilestack.perf.counting import ProfileError, _tensors
from tilestack.perf.profile_render import describe

# At most this many profiled (or warm-up) steps, as timing.MAX_REPEATS bounds a kernel's timed calls: steps=2**40 (a
# sentinel or a typo) ran step after step with no end and every step's profiler events held in memory (profiler
# round 19); a bound refuses it before any work, naming the argument.
MAX_STEPS = 100_000


def as_call(inputs: Any, model: Any = None) -> tuple[tuple, dict]:
    """inputs as (args, kwargs): a dict gives keyword arguments, a tuple or list positional ones, else one. A
    namedtuple (a record: a batch of tokens and mask) is spread into its fields where they fit ``model``'s
    signature, and is one argument where only that fits: given bare, a record taken by a forward(batch) was spread
    and refused as 'too many positional arguments' (profiler round 16), as a PackedSequence was before round 15."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, tuple | list) and not _is_packed_sequence(inputs):
        if hasattr(inputs, "_fields") and model is not None and not _fits(model, tuple(inputs)) and _fits(
            model, (inputs,)
        ):
            return (inputs,), {}
        return tuple(inputs), {}
    return (inputs,), {}


def _fits(model: Any, args: tuple) -> bool:
    """Whether positional ``args`` bind to the signature of ``model`` (a module's forward); True where it has none
    to check against (a builtin)."""
    import inspect

    import torch

    try:
        sig = inspect.signature(model.forward if isinstance(model, torch.nn.Module) else model)
    except (TypeError, ValueError):
        return True
    try:
        sig.bind(*args)
    except TypeError:
        return False
    return True


def _is_packed_sequence(obj: Any) -> bool:
    """A PackedSequence is a namedtuple, but one argument (what nn.LSTM / nn.GRU take), as a tensor is: given as the
    inputs it was spread into its four fields, and refused as 'too many positional arguments' (profiler round 15)."""
    from torch.nn.utils.rnn import PackedSequence

    return isinstance(obj, PackedSequence)


def _fresh(obj: Any) -> Any:
    """``obj`` with new lists, dicts and tuples around the same tensors and values: each step gets containers of
    its own, so a forward that consumes its inputs (pops a key off a target dict, rebinds its boxes) does it to its
    step's copy, not to the next step's nor to the caller's."""
    if isinstance(obj, list):
        return [_fresh(x) for x in obj]
    if isinstance(obj, tuple):
        items = [_fresh(x) for x in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # a namedtuple by position
    if isinstance(obj, dict):
        fresh = copy.copy(obj)  # of its own type: an OrderedDict, a defaultdict with its factory
        for k, v in obj.items():
            fresh[k] = _fresh(v)
        return fresh
    return obj


def model_name(model: Any) -> str:
    """The name a profile gives ``model`` when the caller gives none: a module's class (a TorchScript module's original
    class, not ``RecursiveScriptModule``), a function's qualified name (``train_step``), a bound method's class and
    method (``Net.forward``), a partial's function's. The type's name alone (``function``, ``partial``, ``method``)
    would name every such model alike, and the store pairs rows of models of one name as comparable."""
    import functools
    import types

    while isinstance(model, functools.partial):
        model = model.func
    original = getattr(model, "original_name", None)  # torch.jit.ScriptModule: the scripted class's name
    if isinstance(original, str) and original:
        return original
    if isinstance(model, types.MethodType):
        return f"{model_name(model.__self__)}.{model.__func__.__name__}"
    if isinstance(model, types.FunctionType | types.BuiltinFunctionType):
        return getattr(model, "__qualname__", None) or model.__name__
    return type(model).__name__


def _lacks_forward(model: Any) -> bool:
    """A module whose forward is nn.Module's placeholder (``_forward_unimplemented``), not one of its own."""
    import torch

    return isinstance(model, torch.nn.Module) and getattr(getattr(model, "forward", None), "__func__", None) is (
        torch.nn.Module.forward
    )


def check_leaf_inputs(inputs: Any) -> None:
    """With a backward in every step, an input that is the output of an autograd graph (a grad_fn) is refused: the
    warm-up's backward ran back through that graph into the caller's leaves (their .grad changed, outside what a
    profile puts back), and the next step's failed there with autograd's 'backward through the graph a second
    time' (profiler round 15)."""
    import torch

    found = _find(inputs, "inputs", lambda t: isinstance(t, torch.Tensor) and t.grad_fn is not None)
    if found is not None:
        where, t = found
        raise ProfileError(
            f"{where}={describe(t)} is the output of an autograd graph (grad_fn={type(t.grad_fn).__name__}): with "
            "train=True each step's backward would run back through that graph, freed after the first step, into "
            "tensors outside the model; expected a leaf tensor: x.detach(), or x.detach().requires_grad_() to "
            "profile its gradient too"
        )


def _refuse(arg: str, value: Any, expected: str) -> None:
    raise ProfileError(f"{arg}={describe(value)} ({type(value).__name__}); expected {expected}")


def check_call(model: Any, inputs: Any) -> None:
    """Refuse a model that cannot be called and inputs that cannot be bound to a call (``profile_model`` and
    ``make_step`` check them before any work): each message names the argument, what it was given and what it
    expects. ``make_step(None, x)`` returned a step that failed only when run ("'NoneType' object is not callable",
    profiler round 13)."""
    if not callable(model):
        _refuse("model", model, "a torch.nn.Module or a callable taking the inputs")
    if isinstance(model, type):  # nn.Linear, not nn.Linear(8, 8): calling it would build a module, not run one
        _refuse("model", model, f"a model instance, not its class (build one first: {model.__name__}(...))")
    if type(model).__name__ == "ExportedProgram" and type(model).__module__.startswith("torch.export"):
        # callable, but its __call__ only raises "Unable to call ExportedProgram directly": it failed in the warm-up,
        # after the checks (profiler round 16)
        _refuse("model", model, "a callable model: an ExportedProgram runs through its module "
                "(profile exported.module())")
    if _lacks_forward(model):
        # nn.Module's placeholder forward takes any arguments, so the signature check let a ModuleList, ModuleDict or
        # bare Module through, to fail in the warm-up (profiler round 15)
        raise ProfileError(
            f"model={type(model).__name__} defines no forward (nn.Module's placeholder would raise "
            "NotImplementedError on the first step); expected a module with a forward of its own (a ModuleList or "
            "ModuleDict holds layers: call them from a module's forward, or chain them in nn.Sequential)"
        )
    if isinstance(inputs, str | bytes | int | float | complex | bool) or inputs is None:
        _refuse("inputs", inputs, "a tensor, a tuple or list of positional arguments, or a dict of keyword arguments")
    if isinstance(inputs, set | frozenset | Iterator):  # no order to bind by, or used up by the first step
        _refuse("inputs", inputs, "a tuple or list of positional arguments (a set has no order, an iterator is "
               "used up by the first step)")
    # ... and one inside the inputs (a generator of extra tensors as one argument): the warm-up used it up, so every
    # counted and timed step ran the model on an empty one, with no word said (profiler round 17)
    used_up = _find(inputs, "inputs", lambda x: isinstance(x, Iterator)) if isinstance(
        inputs, tuple | list | Mapping) else None
    if used_up is not None:
        _refuse(used_up[0], used_up[1], "a tuple or list (an iterator or generator inside the inputs is used up by "
                "the first step: every later step would see it empty)")
    if type(inputs).__module__ == "numpy":
        _refuse("inputs", inputs, "torch tensors (torch.from_numpy turns an array into one)")
    if isinstance(inputs, Mapping) and not all(isinstance(k, str) for k in inputs):
        _refuse("inputs", inputs, "a dict whose keys are the names of forward's keyword arguments (str)")
    array = _numpy_array(inputs if isinstance(inputs, tuple | list | Mapping) else (inputs,), "inputs")
    if array is not None:  # a model's layers take tensors: it would fail in its first step, naming no argument
        where, value = array
        raise ProfileError(f"{where}=a numpy array of shape {tuple(value.shape)} ({value.dtype}); expected a torch "
                           "tensor (torch.from_numpy(array) makes one)")


def check_arguments(
    model: Any, inputs: Any, *, steps: Any, warmup: Any, train: Any, name: Any, device: Any, ceilings: Any,
    fastpath: Any, budget_s: Any,
) -> None:
    """Refuse, before any work, arguments :func:`profile_model` cannot use; each message names the argument,
    what it was given and what it expects."""
    import inspect

    import torch

    from tilestack.perf import device as device_mod

    refuse = _refuse
    check_call(model, inputs)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS):
        refuse("steps", steps, f"an int >= 1 and <= {MAX_STEPS} (profiled steps), or None to profile until the "
               "step time is known")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup <= MAX_STEPS:
        refuse("warmup", warmup, f"an int >= 0 and <= {MAX_STEPS} (steps run before counting and profiling)")
    for arg, value in (("train", train), ("fastpath", fastpath)):
        if not isinstance(value, bool):
            refuse(arg, value, "True or False")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        # "" was taken as None (``name or model_name(model)``): the store then paired its rows with those of every
        # other unnamed model of that class (profiler round 20)
        refuse("name", name, "a str (not empty), or None for the model's class name")
    if isinstance(budget_s, bool) or not isinstance(budget_s, int | float) or not 0 < budget_s < math.inf:
        refuse("budget_s", budget_s, "a positive, finite time budget in seconds")
    if not (ceilings is None or ceilings is False or isinstance(ceilings, device_mod.Ceilings)):
        refuse("ceilings", ceilings, "a perf.Ceilings, None (the cached ones) or False (none)")
    if not (device is None or isinstance(device, str | int | torch.device | device_mod.Device)) or isinstance(
        device, bool
    ):
        refuse("device", device, "'cpu', 'cuda', 'cuda:N', a torch.device, a perf.Device or None")
    # Meta tensors hold no data and run no kernels: nothing to time (detect would refuse device='meta', an argument
    # the caller may not have passed). count_ops needs no data: it counts a meta model's FLOPs and bytes.
    meta = {"inputs on meta" for t in _tensors(inputs) if t.device.type == "meta"}
    if isinstance(model, torch.nn.Module):
        meta |= {"model parameters on meta" for t in model.parameters() if t.device.type == "meta"}
    if (meta and device is None) or str(device) == "meta":  # a device given: check_placement names it
        raise ProfileError(
            f"{', '.join(sorted(meta)) or 'device=' + repr(str(device))}: meta tensors hold no data and run no "
            "kernels, so there is no time to profile; expected the model and its inputs on a real device "
            "(model.to_empty(device=...) and initialise it), or tilestack.perf.counting.count_ops(lambda: model(...)) "
            "to count FLOPs and bytes without running anything"
        )
    if train and not torch.is_grad_enabled():
        raise ProfileError(
            "train=True, but gradients are off where profile_model was called (inside torch.no_grad or "
            "torch.inference_mode): there is no backward to profile; expected train=False, or a call outside them"
        )
    if train:
        check_leaf_inputs(inputs)
    if train and isinstance(model, torch.nn.Module):
        trainable = any(p.requires_grad for p in model.parameters()) or any(
            t.requires_grad for t in _tensors(inputs)
        )
        if not trainable:
            raise ProfileError(
                f"train=True, but model {model_name(model)} has no parameter that requires grad and no input "
                "does: there is no backward to profile; expected train=False"
            )
    # The inputs must fit the signature of forward (or of the callable): caught here, not deep in a trace.
    is_module = isinstance(model, torch.nn.Module)
    try:
        sig = inspect.signature(model.forward if is_module else model)
    except (TypeError, ValueError):
        return  # a builtin or C callable: no signature to check against
    args, kwargs = as_call(inputs, model)
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        called = f"{model_name(model)}.forward" if is_module else model_name(model)
        raise ProfileError(
            f"inputs={describe(inputs)} do not fit {called}{sig}: {e}; expected a tuple of its positional "
            "arguments, a dict of its keyword arguments, or one tensor"
        ) from None


def _numpy_array(obj: Any, where: str, depth: int = 0) -> tuple[str, Any] | None:
    """The first numpy array inside the inputs' lists, tuples and dicts, with where it is (``inputs[0][1]``)."""
    return _find(obj, where, lambda x: type(x).__module__ == "numpy" and type(x).__name__ == "ndarray", depth=depth)


def _find(obj: Any, where: str, match: Any, depth: int = 0) -> tuple[str, Any] | None:
    """The first value inside the inputs' lists, tuples and dicts (or the inputs themselves) for which ``match``
    holds, with where it is (``inputs[0][1]``)."""
    if match(obj):
        return where, obj
    if depth > INPUT_DEPTH:
        return None
    items = obj.items() if isinstance(obj, Mapping) else enumerate(obj) if isinstance(obj, tuple | list) else ()
    for key, value in items:
        found = _find(value, f"{where}[{key!r}]", match, depth + 1)
        if found is not None:
            return found
    return None


INPUT_DEPTH = 8  # nesting of the inputs searched for numpy arrays


def check_placement(model: Any, inputs: Any, kind: str) -> None:
    """Inputs (but 0-dim ones, which torch moves itself) and parameters must be on the profiled device kind:
    a meta or another device's tensor would be timed as nothing, or fail deep in the first step."""
    import torch

    where = {f"inputs on {t.device.type}" for t in _tensors(inputs) if t.dim() > 0 and t.device.type != kind}
    if isinstance(model, torch.nn.Module):  # buffers may stay elsewhere on purpose (moved in forward)
        where |= {f"model parameters on {t.device.type}" for t in model.parameters() if t.device.type != kind}
    if where:
        raise ProfileError(
            f"{', '.join(sorted(where))}; expected the model and its inputs on the profiled device ({kind}): "
            "move them (model.to(device), tensor.to(device)) or pass device= to match"
            + ("; meta tensors hold no data (tilestack.perf.counting.count_ops counts a meta model without running "
               "it)" if any(w.endswith(" on meta") for w in where) else "")
        )


def check_ceilings(ceilings: Any, dev: Any) -> None:
    """Ceilings measured on another device would place every row under that device's roofs (an H100's on a CPU:
    every op a few percent of its roof): refused, naming both devices, where both names are ones the spec table
    knows and they differ (synthetic ceilings under a name it does not know are taken as given)."""
    from tilestack.perf import device as device_mod

    if not isinstance(ceilings, device_mod.Ceilings) or ceilings.device in (dev.name, dev.kind):
        return
    theirs, ours = device_mod.lookup_peaks(ceilings.device, strict=False), getattr(dev, "spec", None)
    if theirs is not None and ours is not None and theirs.key != ours.key:
        raise ProfileError(
            f"ceilings measured on {ceilings.device!r}, but the profile runs on {dev.name!r}; expected that "
            "device's ceilings (perf.ceilings(perf.detect(...))), None for the cached ones, or False for none"
        )
