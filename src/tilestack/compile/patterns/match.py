"""A rewrite found by a pass (``Match``) and what every pass uses to recognise torch-level ops in a Dynamo graph:
the op family of a node (``kind``), its arguments by position or name, its constant values, where it runs."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx

from tilestack.config import knobs

Node = fx.Node


@dataclasses.dataclass
class Match:
    pattern: str                     # the pass that found it
    fn: Callable                     # a function of tilestack.compile.ops
    inputs: list[Node | None]        # fn's tensor arguments (None: an absent optional tensor)
    consts: tuple                    # fn's constant arguments, after the tensors
    outputs: list[Node]              # the nodes whose values fn returns, in order
    nodes: list[Node]                # every node the rewrite replaces (outputs included), in graph order
    what: str                        # one line for the report
    l2_tolerance: float | None = None   # set: the check bounds ||new - old|| / ||old|| by it instead of the
                                        # elementwise error by the dtype's rewrite.TOLERANCE


# Dynamo records module calls inlined, as functions (F.layer_norm, torch._C._nn.linear) or tensor methods
_FUNCTIONS = {
    F.scaled_dot_product_attention: "sdpa", torch._C._nn.scaled_dot_product_attention: "sdpa",
    F.layer_norm: "layer_norm", torch.layer_norm: "layer_norm",
    F.rms_norm: "rms_norm", torch.rms_norm: "rms_norm",
    F.softmax: "softmax", torch.softmax: "softmax", torch.special.softmax: "softmax",
    operator.matmul: "matmul", torch.matmul: "matmul",
    operator.add: "add", torch.add: "add",
    operator.mul: "mul", torch.mul: "mul",
    operator.truediv: "div", torch.div: "div",
    torch.transpose: "transpose", torch.masked_fill: "masked_fill",
    F.linear: "linear", torch._C._nn.linear: "linear",
    F.cross_entropy: "cross_entropy", F.nll_loss: "nll_loss",
    F.dropout: "dropout",
    torch.ops.tilestack.quant_linear.default: "quant_linear",
    torch._C._nn.gelu: "gelu", F.silu: "silu", F.relu: "relu", torch.relu: "relu", torch.relu_: "relu",
    torch.ops.aten.addmm.default: "addmm", torch.ops.aten.mm.default: "mm", torch.ops.aten.add.Tensor: "add",
    # Hugging Face GPT-2's Conv1D (and the models that copy it) calls torch.addmm(bias, x2d, w) itself; only
    # aten's addmm (after AOT autograd) was known, so its GELU and residual were left "no tilestack kernel for it"
    torch.addmm: "addmm",
    torch.ops.aten.gelu.default: "gelu", torch.ops.aten.relu.default: "relu", torch.ops.aten.silu.default: "silu",
    torch.where: "where",
}
_METHODS = {"softmax": "softmax", "matmul": "matmul", "add": "add", "mul": "mul", "div": "div",
            "transpose": "transpose", "masked_fill": "masked_fill", "where": "where", "relu": "relu"}


def kind(node) -> str | None:
    """The op family of a node ("sdpa", "softmax", "matmul", ...), None if it is none of them."""
    if not isinstance(node, Node):
        return None
    if node.op == "call_function":
        try:
            return _FUNCTIONS.get(node.target)
        except TypeError:           # an unhashable target
            return None
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def op_name(node: Node) -> str:
    """A short name for a node's op, for the report."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def value(node) -> object:
    """The example value Dynamo recorded for a node (a fake tensor), or the constant itself."""
    if isinstance(node, Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def _arg(node: Node, i: int, name: str, default=None):
    """Argument ``i`` (positional) or ``name`` (keyword) of a call, for functions and methods alike (a method's
    self is args[0], so its positions match the function's)."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def autocast_dtypes(gm: fx.GraphModule) -> dict[Node, torch.dtype]:
    """The nodes of a Dynamo graph inside an enabled ``torch.autocast`` region (between its ``_enter_autocast``
    (device, dtype, enabled, cache) and ``_exit_autocast`` calls), each with its innermost region's dtype. Their
    tensors' dtypes in the graph are the ones before autocast casts them inside the op."""
    from torch.amp.autocast_mode import _enter_autocast, _exit_autocast

    inside: dict[Node, torch.dtype] = {}
    regions: list[tuple[Node, torch.dtype | None]] = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is _enter_autocast:
            enabled = node.args[2] if len(node.args) > 2 else True
            dtype = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], torch.dtype) else None
            regions.append((node, dtype if enabled is not False else None))
        elif node.op == "call_function" and node.target is _exit_autocast:
            regions = [r for r in regions if r[0] is not (node.args[0] if node.args else None)]
        elif regions and regions[-1][1] is not None:
            inside[node] = regions[-1][1]
    return inside


def runs_here(t: torch.Tensor) -> str | None:
    """Why tilestack's kernels cannot run on t's device (None when they can)."""
    if t.device.type != "cuda" and knobs.backend == "auto":
        return (f"tensors on {t.device.type} (tilestack's kernels run on CUDA GPUs; config.override(backend="
                "'reference') runs them on the CPU)")
    return None


def _number(x) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _softmax_dtype(node: Node):
    """The dtype= of a softmax call: F.softmax(input, dim, _stacklevel, dtype), torch.softmax(input, dim, dtype),
    Tensor.softmax(dim, dtype)."""
    return _arg(node, 3 if node.target is F.softmax else 2, "dtype")


def _last_dim(dim, ndim: int) -> bool:
    return isinstance(dim, int) and dim in (-1, ndim - 1)


_CASTS = ("to", "type", "float", "half", "bfloat16", "double", "type_as")


def cast_input(node) -> Node | None:
    """x when node is a dtype cast of the tensor x (``x.to(dtype)``, ``x.type(dtype)``, ``x.float()``,
    ``x.type_as(y)``, ...) that keeps its shape and device, else None. Whether the cast loses precision is the
    caller's to judge (``value(node).dtype`` against ``value(x).dtype``)."""
    if not isinstance(node, Node) or node.op != "call_method" or node.target not in _CASTS or not node.args:
        return None
    x, rest = node.args[0], node.args[1:]
    if node.target == "type_as":
        ok = len(rest) == 1 and isinstance(rest[0], Node) and not node.kwargs
    elif node.target in ("to", "type"):
        dtypes = [*rest, *(v for k, v in node.kwargs.items() if k == "dtype")]
        ok = len(dtypes) == 1 and isinstance(dtypes[0], torch.dtype) and set(node.kwargs) <= {"dtype"}
    else:
        ok = not rest and not node.kwargs
    xv, yv = value(x), value(node)
    if not ok or not (isinstance(xv, torch.Tensor) and isinstance(yv, torch.Tensor)) or xv.shape != yv.shape or \
            xv.device != yv.device:
        return None
    return x


def scalar(x) -> float | None:
    """The number x stands for: a Python number, or a graph node making a 0-d tensor of a constant number
    (``torch.full([], c)``, ``torch.tensor(c)``: Hugging Face's GPT-2 divides its scores by one), or computing one
    from such tensors and numbers alone (``torch.sqrt(torch.tensor(hd, dtype=q.dtype))``: older BERT-style code
    divides its scores by that; ``constant_tensor``), else None."""
    if not isinstance(x, Node):
        return _number(x)
    t = constant_tensor(x)
    return None if t is None else float(t)


def _made_constant(x: Node) -> torch.Tensor | None:
    """The real 0-d float tensor ``torch.full([], c)`` / ``torch.tensor(c)`` (dtype= a float dtype or none) makes,
    else None."""
    if x.op != "call_function" or set(x.kwargs) - {"dtype", "device", "requires_grad"}:
        return None
    if x.target is torch.full and len(x.args) == 2 and isinstance(x.args[0], list | tuple) and not x.args[0]:
        c = _number(x.args[1])
    elif x.target is torch.tensor and len(x.args) == 1:
        c = _number(x.args[0])
    else:
        return None
    dtype = x.kwargs.get("dtype")
    if c is None or not (dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return None
    return torch.tensor(c, dtype=dtype)            # the number as the tensor holds it (an int c: int64)


# element-wise ops of one 0-d constant (and numbers) that ``constant_tensor`` evaluates
_CONSTANT_FUNCTIONS = {torch.sqrt, torch.rsqrt, torch.reciprocal, torch.exp, torch.log, torch.neg, torch.pow,
                       torch.mul, torch.div, torch.add, torch.sub, operator.mul, operator.truediv, operator.add,
                       operator.sub, operator.neg, operator.pow}
_CONSTANT_METHODS = {"sqrt", "rsqrt", "reciprocal", "exp", "log", "neg", "pow", "mul", "div", "add", "sub", "__mul__",
                     "__truediv__", "__rtruediv__", "__add__", "__sub__", "__pow__", *("to", "type", "float", "half",
                                                                                      "bfloat16", "double")}


def constant_tensor(x: Node, _depth: int = 0) -> torch.Tensor | None:
    """The real 0-d float tensor a node computes from constants alone, else None: ``torch.full([], c)``,
    ``torch.tensor(c)``, and element-wise ops of those and numbers (``_CONSTANT_FUNCTIONS``, ``_CONSTANT_METHODS``:
    sqrt, rsqrt, reciprocal, casts, arithmetic), evaluated here as the graph would, in the tensors' dtypes. Not a
    tensor written in place after it was made (``mask_value.fill_(...)``): not that value where it is read."""
    from tilestack.compile.rewrite import _aliases, _writes

    if not isinstance(x, Node) or _depth > 8:
        return None
    t = _made_constant(x)
    if t is None:
        fn = x.op == "call_function" and x.target in _CONSTANT_FUNCTIONS
        method = x.op == "call_method" and x.target in _CONSTANT_METHODS
        if not (fn or method) or not x.args or (x.kwargs and set(x.kwargs) != {"dtype"}):
            return None
        args = []
        for a in x.args:
            if isinstance(a, Node):
                a = constant_tensor(a, _depth + 1)
                if a is None:
                    return None
            elif _number(a) is None and not isinstance(a, torch.dtype):
                return None
            args.append(a)
        if not any(isinstance(a, torch.Tensor) for a in args):
            return None
        try:
            t = x.target(*args, **x.kwargs) if fn else getattr(args[0], x.target)(*args[1:], **x.kwargs)
        except (TypeError, RuntimeError, ValueError):
            return None
        if not isinstance(t, torch.Tensor) or t.dim() != 0 or not t.dtype.is_floating_point:
            return None
    if any(_writes(u, a) for a in _aliases(x) for u in a.users):
        return None                      # written in place after it was made: not this value where it is read
    return t


def constant_nodes(x) -> list[Node]:
    """The nodes of x's constant expression (``constant_tensor``) that nothing else reads, x first: what a rewrite
    that folds x's value erases with it."""
    if not isinstance(x, Node) or len(x.users) != 1 or constant_tensor(x) is None:
        return []
    out = [x]
    for a in x.all_input_nodes:
        out.extend(constant_nodes(a))
    return out
