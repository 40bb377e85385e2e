"""The named pattern passes: each scans a Dynamo-captured FX graph (torch-level ops, modules inlined) and
returns the rewrites it can make and, for what it recognised but cannot take, why.

    matches, declined = PASSES["sdpa"](gm)      # list[Match], list[(node, reason)]

A ``Match`` names the original nodes a rewrite replaces (``outputs``, in order) and removes (``nodes``), and
the function of ``tilestack.compile.ops`` that computes the outputs from ``inputs`` and constants. Applying
and checking matches is ``tilestack.compile.rewrite``'s job, so every pass is only a matcher.

Passes, in the order they run:
- ``sdpa``: ``F.scaled_dot_product_attention`` calls -> ``tilestack::attention_fwd``.
- ``explicit_attention``: ``softmax(q @ k.transpose(-2, -1) * s [+ mask | .masked_fill(cond, -inf) |
  torch.where(keep, ., -inf)]) @ v``.
- ``add_norm``: ``h = a + b`` followed by LayerNorm / RMSNorm of h -> one fused add + norm kernel.
- ``norm``: the remaining LayerNorm (with weight and bias) and RMSNorm (with weight).
- ``linear_epilogue``: ``act(F.linear(x, w, b)) [+ r]`` (or ``x @ W + b``, aten's addmm / mm; act relu, gelu,
  silu) in inference graphs -> one GEMM with the bias, activation and residual add fused into its epilogue.
- ``fp8_chain``: ``tilestack.quantize(..., "fp8-act")`` layers that read the norm or the layer before them ->
  the producer writes their fp8 activations (no quantizing pass of their own).
- ``softmax``: the remaining softmax over the last dim.
- ``linear_cross_entropy``: ``F.cross_entropy(F.linear(x, w), labels)`` in training graphs.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx

import tilestack.quant.linear  # noqa: F401 - registers tilestack::quant_linear, a head of linear_epilogue
from tilestack.compile import ops
from tilestack.config import knobs
from tilestack.errors import LaunchError

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


# ---- recognising torch-level ops --------------------------------------------------------------------------------
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
    F.cross_entropy: "cross_entropy",
    F.dropout: "dropout",
    torch.ops.tilestack.quant_linear.default: "quant_linear",
    torch._C._nn.gelu: "gelu", F.silu: "silu", F.relu: "relu", torch.relu: "relu", torch.relu_: "relu",
    torch.ops.aten.addmm.default: "addmm", torch.ops.aten.mm.default: "mm", torch.ops.aten.add.Tensor: "add",
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


# ---- sdpa -----------------------------------------------------------------------------------------------------
_SDPA_ARGS = (("query", None), ("key", None), ("value", None), ("attn_mask", None), ("dropout_p", 0.0),
              ("is_causal", False), ("scale", None), ("enable_gqa", False))


def sdpa(gm: fx.GraphModule):
    from tilestack.kernels.attention_fwd import check_attention_args
    from tilestack.torch.sdpa import unsupported

    matches, declined = [], []
    for node in gm.graph.nodes:
        if kind(node) != "sdpa":
            continue
        a = {name: _arg(node, i, name, d) for i, (name, d) in enumerate(_SDPA_ARGS)}
        consts = [name for name in ("dropout_p", "is_causal", "scale", "enable_gqa") if isinstance(a[name], Node)]
        if consts:
            declined.append((node, f"{', '.join(consts)} computed in the graph (the kernels take constants)"))
            continue
        q, k, v, mask = (value(a[n]) for n in ("query", "key", "value", "attn_mask"))
        why = unsupported(q, k, v, mask, a["dropout_p"], a["is_causal"], a["enable_gqa"], a["scale"])
        if why is None and a["dropout_p"]:    # the rewrite's op call carries no dropout stream
            why = f"dropout_p={a['dropout_p']} (tilestack.scaled_dot_product_attention fuses it; the rewrite does not)"
        if why is None and isinstance(q, torch.Tensor):
            why = runs_here(q)
        if why is None:
            try:
                check_attention_args("attention", q, k, v, a["scale"], attn_mask=mask)
            except LaunchError as e:
                why = str(e)
        if why is None and a["scale"] is None and not isinstance(q.shape[-1], int):
            why = "a symbolic head dim with scale=None (the kernel's scale is a constant; pass scale=)"
        if why is not None:
            declined.append((node, why))
            continue
        scale = q.shape[-1] ** -0.5 if a["scale"] is None else float(a["scale"])
        matches.append(Match("sdpa", ops.ts_attention, [a["query"], a["key"], a["value"], a["attn_mask"]],
                             (False, bool(a["is_causal"]), scale), [node], [node],
                             f"scaled_dot_product_attention{' causal' if a['is_causal'] else ''}"
                             f"{' masked' if a['attn_mask'] is not None else ''} -> tilestack::attention_fwd"))
    return matches, declined


# ---- explicit attention -----------------------------------------------------------------------------------------
def _scores(x: Node, chain: list[Node]):
    """(q, k, scale) if x is ``q @ k.transpose(-2, -1)`` times numbers, with its nodes added to chain."""
    nodes: list[Node] = []
    scale = 1.0
    while kind(x) in ("mul", "div"):
        a, b = _arg(x, 0, "input"), _arg(x, 1, "other")
        if kind(x) == "mul":
            c, inner = (_number(b), a) if isinstance(a, Node) else (_number(a), b)
        else:
            c, inner = (None if _number(b) in (None, 0.0) else 1.0 / _number(b)), a
            if x.kwargs.get("rounding_mode") is not None:
                c = None
        if c is None or not isinstance(inner, Node):
            return None
        nodes.append(x)
        scale, x = scale * c, inner
    if kind(x) != "matmul":
        return None
    q, kt = _arg(x, 0, "input"), _arg(x, 1, "other")
    if kind(kt) != "transpose" or not isinstance(q, Node):
        return None
    k, d0, d1 = _arg(kt, 0, "input"), _arg(kt, 1, "dim0"), _arg(kt, 2, "dim1")
    kv = value(k)
    if not isinstance(kv, torch.Tensor) or kv.dim() != 4 or not (isinstance(d0, int) and isinstance(d1, int)) or \
            {d0 % 4, d1 % 4} != {2, 3}:
        return None
    chain.extend([kt, x, *reversed(nodes)])
    return q, k, scale


def explicit_attention(gm: fx.GraphModule):
    from tilestack.kernels.attention_fwd import check_attention_args
    from tilestack.torch.sdpa import unsupported

    matches, declined = [], []
    for node in gm.graph.nodes:
        if kind(node) != "matmul":
            continue
        p, v = _arg(node, 0, "input"), _arg(node, 1, "other")
        drop = None
        if kind(p) == "dropout":           # nanoGPT's attn_dropout: a no-op in eval mode or with p = 0
            if kind(_arg(p, 0, "input")) == "softmax" and (
                    _arg(p, 2, "training", True) is not False and _arg(p, 1, "p", 0.5) != 0):
                declined.append((node, "explicit attention: dropout on the probabilities (training; the kernels "
                                       "fuse no dropout)"))
                continue
            drop, p = p, _arg(p, 0, "input")
        if kind(p) != "softmax":
            continue
        x = _arg(p, 0, "input")
        pv = value(p)
        if not isinstance(pv, torch.Tensor) or not _last_dim(_arg(p, 1, "dim"), pv.dim()) or \
                _softmax_dtype(p) is not None:
            continue
        chain: list[Node] = []
        mask, fill, finite = None, False, False     # finite: the masked scores were set to a finite lowest value
        found = _scores(x, chain)
        if found is None and kind(x) == "add":
            a, b = _arg(x, 0, "input"), _arg(x, 1, "other")
            for s, m in ((a, b), (b, a)):
                if isinstance(s, Node) and isinstance(m, Node) and "alpha" not in x.kwargs:
                    found = _scores(s, chain)
                    if found is not None:
                        mask = m
                        break
        elif found is None and kind(x) == "masked_fill":
            s, cond, fillv = _arg(x, 0, "input"), _arg(x, 1, "mask"), _arg(x, 2, "value")
            qv = value(s)
            low = _number(fillv)
            if low is not None and isinstance(qv, torch.Tensor) and qv.dtype.is_floating_point and \
                    (low == -math.inf or low <= torch.finfo(qv.dtype).min) and isinstance(cond, Node):
                found = _scores(s, chain)
                mask, fill, finite = cond, True, low != -math.inf
        elif found is None and kind(x) == "where" and x.op == "call_function":
            cond, s, low = _arg(x, 0, "condition"), _arg(x, 1, "input"), _number(_arg(x, 2, "other"))
            qv = value(s)
            if low is not None and isinstance(qv, torch.Tensor) and qv.dtype.is_floating_point and \
                    (low == -math.inf or low <= torch.finfo(qv.dtype).min) and isinstance(cond, Node):
                found = _scores(s, chain)           # Hugging Face's eager GPT-2: where(causal, scores, min)
                mask, finite = cond, low != -math.inf
        if found is None:
            continue
        q, k = found[0], found[1]
        scale = found[2]
        if mask is not None:
            chain.append(x)
        chain.extend([p, node] + ([drop] if drop is not None else []))
        qv, kv_, vv, mv = value(q), value(k), value(v), value(mask)
        why = unsupported(qv, kv_, vv, mv, 0.0, False, False)
        if why is None:
            why = runs_here(qv)
        if why is None:
            try:
                check_attention_args("attention", qv, kv_, vv, scale, attn_mask=mv)
            except LaunchError as e:
                why = str(e)
        if why is not None:
            declined.append((node, f"explicit attention: {why}"))
            continue
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        chain = sorted(set(chain), key=order.__getitem__)
        how = "" if mask is None else (" with masked_fill(cond, -inf)" if fill else " with a boolean mask"
                                       if kind(x) == "where" else " with an additive mask")
        matches.append(Match("explicit_attention", ops.ts_attention, [q, k, v, mask], (fill, False, scale, finite),
                             [node], chain, f"softmax(q @ k^T * {scale:.4g}){how} @ v -> tilestack::attention_fwd"))
    return matches, declined


# ---- norms ------------------------------------------------------------------------------------------------------
def _norm_args(node: Node):
    """(x, weight, bias, eps, why-not) of a LayerNorm / RMSNorm node."""
    k = kind(node)
    x, shape = _arg(node, 0, "input"), _arg(node, 1, "normalized_shape")
    weight = _arg(node, 2, "weight")
    bias = _arg(node, 3, "bias") if k == "layer_norm" else None
    eps = _arg(node, 4, "eps", 1e-5) if k == "layer_norm" else _arg(node, 3, "eps")
    xv = value(x)
    if not isinstance(xv, torch.Tensor):
        return None
    if eps is None:                                  # F.rms_norm's default
        eps = torch.finfo(xv.dtype).eps
    shape = tuple(shape) if isinstance(shape, list | tuple) else (shape,)
    if shape != (xv.shape[-1],):
        return x, weight, bias, eps, f"normalized_shape {shape} is not the last dim alone ({xv.shape[-1]},)"
    if not isinstance(weight, Node) or (k == "layer_norm" and not isinstance(bias, Node)):
        need = "a weight and a bias" if k == "layer_norm" else "a weight"
        return x, weight, bias, eps, f"no affine parameters (the kernel takes {need})"
    if isinstance(eps, Node):
        return x, weight, bias, eps, "eps computed in the graph"
    why = runs_here(xv)
    if why is None:
        from tilestack.kernels.rmsnorm import check_norm_args
        try:
            check_norm_args(k, xv.reshape(-1, xv.shape[-1]), value(weight), float(eps),
                            bias=value(bias) if bias is not None else None)
        except LaunchError as e:
            why = str(e)
    return x, weight, bias, float(eps), why


def add_norm(gm: fx.GraphModule):
    matches, declined = [], []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        if kind(node) not in ("layer_norm", "rms_norm"):
            continue
        got = _norm_args(node)
        if got is None or got[4] is not None or kind(got[0]) != "add":
            continue
        x, weight, bias, eps, _ = got
        a, b = _arg(x, 0, "input"), _arg(x, 1, "other")
        if not (isinstance(a, Node) and isinstance(b, Node)) or x.kwargs.get("alpha") is not None:
            continue
        av, bv = value(a), value(b)
        if not (isinstance(av, torch.Tensor) and isinstance(bv, torch.Tensor)) or av.shape != bv.shape or \
                av.dtype != bv.dtype:
            declined.append((x, "residual add of differing shapes or dtypes (the fused kernel adds equal ones)"))
            continue
        late = [w for w in (weight, bias) if w is not None and order[w] > order[x]]
        if late:
            declined.append((x, "norm parameters computed after the residual add"))
            continue
        ln = kind(node) == "layer_norm"
        fn = ops.ts_add_layer_norm if ln else ops.ts_add_rms_norm
        inputs = [a, b, weight, bias] if ln else [a, b, weight]
        name = "layer_norm" if ln else "rms_norm"
        matches.append(Match("add_norm", fn, inputs, (eps,), [x, node], [x, node],
                             f"add + {name} -> tilestack::add_{name}_fwd"))
    return matches, declined


def norm(gm: fx.GraphModule):
    matches, declined = [], []
    for node in gm.graph.nodes:
        if kind(node) not in ("layer_norm", "rms_norm"):
            continue
        got = _norm_args(node)
        if got is None:
            continue
        x, weight, bias, eps, why = got
        if why is not None:
            declined.append((node, why))
            continue
        if kind(node) == "layer_norm":
            matches.append(Match("norm", ops.ts_layer_norm, [x, weight, bias], (eps,), [node], [node],
                                 "layer_norm -> tilestack::layer_norm_fwd"))
        else:
            matches.append(Match("norm", ops.ts_rms_norm, [x, weight], (eps,), [node], [node],
                                 "rms_norm -> tilestack::rms_norm_fwd"))
    return matches, declined


# ---- linear + cross-entropy ---------------------------------------------------------------------------------------
_CE_ARGS = (("input", None), ("target", None), ("weight", None), ("size_average", None), ("ignore_index", -100),
            ("reduce", None), ("reduction", "mean"), ("label_smoothing", 0.0))


def linear_cross_entropy(gm: fx.GraphModule):
    """``F.cross_entropy(F.linear(x, w)[.float()], labels)`` (mean, no class weights or smoothing) in a training
    graph -> the fused linear + cross-entropy, which never makes the (T, V) logits whole. Not in inference
    graphs: the fused op makes the gradients in its forward, which only a backward pays back."""
    from tilestack.kernels.cross_entropy import check_ce_args

    matches, declined = [], []
    for node in gm.graph.nodes:
        if kind(node) != "cross_entropy":
            continue
        a = {name: _arg(node, i, name, d) for i, (name, d) in enumerate(_CE_ARGS)}
        if a["weight"] is not None or a["size_average"] is not None or a["reduce"] is not None or \
                a["reduction"] != "mean" or a["label_smoothing"] != 0.0 or isinstance(a["ignore_index"], Node):
            declined.append((node, "cross_entropy with class weights, smoothing or a reduction other than mean"))
            continue
        logits, chain = a["input"], [node]
        if isinstance(logits, Node) and logits.op == "call_method" and (
                logits.target == "float" or (logits.target == "to" and torch.float32 in logits.args[1:])):
            chain.append(logits)
            logits = logits.args[0]
        if kind(logits) != "linear" or _arg(logits, 2, "bias") is not None or len(logits.users) != 1:
            continue
        chain.append(logits)
        x, w = _arg(logits, 0, "input"), _arg(logits, 1, "weight")
        xv, wv, tv, out = value(x), value(w), value(a["target"]), value(node)
        if not all(isinstance(t, torch.Tensor) for t in (xv, wv, tv, out)) or out.dtype != torch.float32:
            continue
        why = None if out.requires_grad else \
            "an inference graph (the fused op makes gradients in its forward; the plain GEMM is cheaper)"
        why = why or runs_here(xv)
        if why is None:
            try:
                check_ce_args("fused_linear_cross_entropy", xv, wv, tv, a["ignore_index"])
            except LaunchError as e:
                why = str(e)
        if why is not None:
            declined.append((node, why))
            continue
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        matches.append(Match("linear_cross_entropy", ops.ts_linear_cross_entropy, [x, w, a["target"]],
                             (int(a["ignore_index"]),), [node], sorted(chain, key=order.__getitem__),
                             "cross_entropy(linear(x, w)) -> tilestack::fused_linear_cross_entropy"))
    return matches, declined


# ---- linear + bias + activation (+ residual) -> one GEMM with a fused epilogue -------------------------------------
_GEMM_DTYPES = (torch.bfloat16, torch.float16)      # what tilestack.kernels.gemm multiplies
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _gemm_head(node: Node):
    """(x, w, bias, w_is_kn, x_scale) of a GEMM node: ``F.linear(x, w, b)`` (w (N, K)), ``x @ W`` (W (K, N)),
    aten's ``addmm(b, x, W)`` and ``mm(x, W)``, and ``tilestack::quant_linear(x, q, scale, b, x_scale)`` (w is
    (q, scale) then); None for anything else (a batched matmul, addmm with alpha or beta)."""
    k, x_scale = kind(node), None
    if k == "linear":
        x, w, bias, kn = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias"), False
    elif k in ("matmul", "mm"):
        x, w, bias, kn = _arg(node, 0, "input"), _arg(node, 1, "other"), None, True
    elif k == "addmm" and node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1:
        x, w, bias, kn = node.args[1], node.args[2], node.args[0], True
    elif k == "quant_linear" and len(node.args) == 5 and not node.kwargs:
        x, q, scale, bias, x_scale = node.args
        w, kn = (q, scale), False
        if not isinstance(x_scale, float):
            return None
    else:
        return None
    xv, wv = value(x), value(w[0] if k == "quant_linear" else w)
    if not (isinstance(xv, torch.Tensor) and isinstance(wv, torch.Tensor)) or wv.dim() != 2 or xv.dim() < 1 or \
            (bias is not None and not isinstance(bias, Node)):
        return None
    return x, w, bias, kn, x_scale


def _activation(node: Node, x: Node) -> str | None:
    """The epilogue name (kernels.gemm.ACTIVATIONS) of an activation node applied to x, else None."""
    k = kind(node)
    if k not in ("relu", "gelu", "silu") or _arg(node, 0, "input") is not x:
        return None
    if k == "gelu":
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(_arg(node, 1, "approximate", "none"))
    return k


def _noop_dropout(node: Node) -> bool:
    """F.dropout in eval mode or with p = 0 (nanoGPT's and Hugging Face's after a projection)."""
    return kind(node) == "dropout" and (_arg(node, 2, "training", True) is False or _arg(node, 1, "p", 0.5) == 0)


def _sole_user(node: Node) -> Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _added(node: Node, x: Node) -> Node | None:
    """The other operand of ``x + other`` (no alpha) when node is that add, else None."""
    if kind(node) != "add" or "alpha" in node.kwargs or len(node.args) > 2:
        return None
    a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
    other = b if a is x else a if b is x else None
    return other if isinstance(other, Node) and other is not x else None


_ATEN_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default)


def _static_view(node: Node, x: Node) -> tuple[int, ...] | None:
    """The shape of ``x.view(*shape)`` / ``x.reshape(*shape)`` (or aten's view, as AOT autograd puts after an
    addmm of a 3-D input) when node is that and every size is a number (QuantLinear views its rows back to the
    input's leading dims), else None."""
    method = node.op == "call_method" and node.target in ("view", "reshape")
    if not (method or (node.op == "call_function" and node.target in _ATEN_VIEWS)) or node.args[:1] != (x,) or \
            node.kwargs:
        return None
    shape = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], list | tuple) else node.args[1:]
    return tuple(shape) if shape and all(type(s) is int for s in shape) else None


def linear_epilogue(gm: fx.GraphModule):
    """``act(F.linear(x, w, b)) [+ r]`` (also ``x @ W + b``, aten's ``addmm`` / ``mm`` and ``tilestack.quantize``'s
    ``tilestack::quant_linear``, its view back to the input's leading dims included; act relu, gelu in either
    form or silu; through no-op dropouts) -> ``tilestack::linear_epilogue`` / ``quant_linear_epilogue``: one
    GEMM with the bias, the activation and the residual add applied to its f32 accumulator. Only where it pays:
    an activation or a residual add to fuse (a lone Linear is cuBLAS's addmm with the bias fused already) in a
    graph without gradients (the fused op has no backward; Inductor fuses training graphs' epilogues itself)."""
    matches, declined = [], []
    for node in gm.graph.nodes:
        head = _gemm_head(node)
        if head is None:
            continue
        x, w, bias, kn, x_scale = head
        quant = kind(node) == "quant_linear"
        out = value(node)
        if not isinstance(out, torch.Tensor):
            continue
        n = out.shape[-1]
        chain, cur, activation, residual, shape = [node], node, None, None, None
        user = _sole_user(cur)
        if bias is None and user is not None and (b := _added(user, cur)) is not None:
            bv = value(b)
            if isinstance(bv, torch.Tensor) and bv.dim() == 1 and bv.shape[0] == n and \
                    value(user).dtype == out.dtype:
                bias, cur = b, user
                chain.append(cur)
        user = _sole_user(cur)
        if user is not None and (shape := _static_view(user, cur)) is not None:
            cur = user
            chain.append(cur)
        for step in ("activation", "residual"):
            user = _sole_user(cur)
            while user is not None and _noop_dropout(user) and _arg(user, 0, "input") is cur:
                chain.append(user)
                cur, user = user, _sole_user(user)
            if user is None:
                break
            if step == "activation" and (act := _activation(user, cur)) is not None:
                activation, cur = act, user
                chain.append(cur)
            elif step == "residual" and (r := _added(user, cur)) is not None:
                rv, cv = value(r), value(cur)
                if isinstance(rv, torch.Tensor) and rv.shape == cv.shape and rv.dtype == cv.dtype == \
                        value(user).dtype:
                    residual, cur = r, user
                    chain.append(cur)
        if activation is None and residual is None:
            continue                      # nothing to fuse: LEFT_REASONS["linear"]
        xv = value(x)
        wv = value(w[0] if quant else w)
        why = None
        if value(cur).requires_grad:
            why = "a graph that needs gradients (the fused GEMM has no backward; Inductor fuses there)"
        elif not quant and (xv.dtype not in _GEMM_DTYPES or wv.dtype != xv.dtype):
            why = (f"x is {xv.dtype} and the weight {wv.dtype} (tilestack's GEMM multiplies bf16 or f16, both "
                   "alike)")
        elif bias is not None and (not isinstance(value(bias), torch.Tensor) or value(bias).dim() != 1 or
                                   value(bias).dtype not in _FLOATS):
            why = "a bias that is not one float per output column"
        else:
            why = runs_here(xv)
        if why is not None:
            declined.append((node, f"linear epilogue: {why}"))
            continue
        order = {nd: i for i, nd in enumerate(gm.graph.nodes)}
        parts = [kind(node)] + (["bias"] if bias is not None else []) + ([activation] if activation else []) + \
            (["residual add"] if residual is not None else [])
        if quant:
            m = Match("linear_epilogue", ops.ts_quant_linear_epilogue, [x, w[0], w[1], bias, residual],
                      (x_scale, activation, shape), [cur], sorted(chain, key=order.__getitem__),
                      f"{' + '.join(parts)} -> tilestack::quant_linear_epilogue")
        else:
            m = Match("linear_epilogue", ops.ts_linear_epilogue, [x, w, bias, residual], (activation, kn, shape),
                      [cur], sorted(chain, key=order.__getitem__), f"{' + '.join(parts)} -> tilestack::linear_epilogue")
        matches.append(m)
    return matches, declined


# ---- fp8 activations written by their producers -------------------------------------------------------------------
_VIEW_METHODS = ("view", "reshape")


def _fp8_gemm(node: Node):
    """(x, q, scale, bias, residual, x_scale, activation, shape) of a ``tilestack.quantize(..., "fp8-act")``
    layer (``tilestack::quant_linear`` with x_scale > 0, or the linear_epilogue pass's fused form of it), else
    None."""
    if kind(node) == "quant_linear" and len(node.args) == 5 and not node.kwargs:
        x, q, scale, bias, x_scale = node.args
        residual, activation, shape = None, None, None
    elif node.op == "call_function" and node.target is ops.ts_quant_linear_epilogue and len(node.args) == 8:
        x, q, scale, bias, residual, x_scale, activation, shape = node.args
    else:
        return None
    qv = value(q)
    if not isinstance(x_scale, float) or x_scale <= 0 or not isinstance(qv, torch.Tensor) or \
            qv.dtype != torch.float8_e4m3fn:
        return None
    return x, q, scale, bias, residual, x_scale, activation, shape


def _unview(x):
    """(the node x views, the view nodes between, in graph order): x through reshape/view nodes that each have
    one user."""
    views = []
    while isinstance(x, Node) and len(x.users) == 1 and (
            (x.op == "call_method" and x.target in _VIEW_METHODS) or
            (x.op == "call_function" and x.target in _ATEN_VIEWS)):
        views.append(x)
        x = x.args[0]
    return x, views[::-1]


_NORM_OPS = {ops.ts_layer_norm: ("layer", False), ops.ts_rms_norm: ("rms", False),
             ops.ts_add_layer_norm: ("layer", True), ops.ts_add_rms_norm: ("rms", True)}


def _norm_source(src: Node):
    """(kind, adds, the nodes it replaces, h node or None, (x, r, weight, bias), eps) when src is a norm's output
    (the norm and add_norm passes' calls), else None. Who reads src is the caller's to check."""
    if not isinstance(src, Node) or src.op != "call_function":
        return None
    if src.target in (ops.ts_layer_norm, ops.ts_rms_norm):
        k, _ = _NORM_OPS[src.target]
        x, w, *rest = src.args
        bias, eps = (rest[0], rest[1]) if k == "layer" else (None, rest[0])
        return k, False, [src], None, (x, None, w, bias), eps
    if src.target is operator.getitem and src.args[1] == 1:
        call = src.args[0]
        if not (isinstance(call, Node) and call.op == "call_function" and
                call.target in (ops.ts_add_layer_norm, ops.ts_add_rms_norm)):
            return None
        k, _ = _NORM_OPS[call.target]
        x, r, w, *rest = call.args
        bias, eps = (rest[0], rest[1]) if k == "layer" else (None, rest[0])
        hs = [u for u in call.users if u.target is operator.getitem and u.args[1] == 0]
        if len(call.users) != len(hs) + 1 or len(hs) > 1:
            return None
        h = hs[0] if hs else None
        return k, True, [call, src] + hs, h, (x, r, w, bias), eps
    return None


def _what(norm: tuple | None, chains: list[list[tuple]]) -> str:
    head = [f"{'add + ' if norm[1] else ''}{norm[0]}_norm"] if norm else []
    body = [" -> ".join(f"fp8 linear{'+' + a if a else ''}" for _, a in chain) for chain in chains]
    return " -> ".join(head + ([body[0]] if len(body) == 1 else [f"({' | '.join(body)})"]))


# The chain quantizes each layer's f32 result once; the layers it replaces rounded it to bf16 first and then
# to fp8, so an element within a bf16 step of an fp8 rounding boundary lands one fp8 step (2^-3 relative) apart:
# about 1 in 32. An output element that sums few inputs (the check's tiny models: K = 32) can then move by a
# large share of itself, so the check bounds the relative L2 error (1-4% measured on GPT-2 tiny's chains).
FP8_CHAIN_TOLERANCE = 0.08


def fp8_chain(gm: fx.GraphModule):
    """Chains of ``tilestack.quantize(..., "fp8-act")`` layers, each reading only the one before it (through
    views), and the norm before the first -> ``ops.ts_fp8_chain``: the norm writes the first layer's fp8
    activations (``quant.producers``) and each layer's epilogue the next one's (``qgemm_fp8_out_kernel``), so no
    layer makes a quantizing pass over its input and the activations between them cross memory in 8 bits. A norm
    read by several chains with one calibrated scale (Llama's q, k and v projections, its gate and up: the same
    input, so the same scale) writes one fp8 tensor for all. GPT-2's MLP (ln_2 -> c_fc + GELU -> c_proj) is one
    chain, its qkv projection (ln_1 -> c_attn) another."""
    matches, declined = [], []
    gemms = {n: g for n in gm.graph.nodes if (g := _fp8_gemm(n)) is not None}
    after: dict[Node, tuple[Node, list[Node]]] = {}      # a layer -> (the layer it reads, the views between)
    for node, g in gemms.items():
        src, views = _unview(g[0])
        if src in gemms and len(src.users) == 1 and src is not node:
            after[node] = (src, views)
    nxt = {prev: (node, views) for node, (prev, views) in after.items()}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def chain_from(head: Node) -> tuple[list[Node], list[Node]]:
        layers, nodes = [head], [head]
        while layers[-1] in nxt:
            node, views = nxt[layers[-1]]
            layers.append(node)
            nodes += views + [node]
        return layers, nodes

    groups: dict[Node, list[tuple[Node, list[Node]]]] = {}   # a layer's source -> [(head, views)] in graph order
    for head, g in gemms.items():
        if head not in after:
            src, views = _unview(g[0])
            groups.setdefault(src, []).append((head, views))
    for src, heads in groups.items():
        norm = _norm_source(src)
        readers = {u for _, views in heads for u in (views[:1] or [])} | {h for h, views in heads if not views}
        if norm is not None and (set(src.users) != readers or len({gemms[h][5] for h, _ in heads}) != 1):
            norm = None                   # read by something else too, or by layers of different scales
        units = [[h] for h, _ in heads] if norm is None else [[h for h, _ in heads]]
        for unit in units:
            chains = [chain_from(h) for h in unit]
            if norm is None and len(chains[0][0]) == 1:
                continue                  # a lone layer with a float input: quant_linear as it is
            lasts = [layers[-1] for layers, _ in chains]
            outs = [value(n) for n in lasts]
            if not all(isinstance(o, torch.Tensor) and not o.requires_grad for o in outs):
                continue
            nodes = [n for _, chain_nodes in chains for n in chain_nodes]
            if norm is not None:
                k, adds, norm_nodes, h, head_inputs, eps = norm
                nodes += norm_nodes + [v for _, views in heads for v in views]
            else:
                k, adds, h, eps = None, False, None, 0.0
                head_inputs = (gemms[unit[0]][0], None, None, None)     # the first layer's float input
            if adds and h is None:
                declined.append((lasts[-1], "fp8 chain: the fused add + norm's residual output is unused"))
                continue
            inputs, specs = list(head_inputs), []
            for layers, _ in chains:
                spec_chain = []
                for layer in layers:
                    _, q, scale, lbias, residual, x_scale, activation, _ = gemms[layer]
                    inputs += [q, scale, lbias, residual]
                    spec_chain.append((x_scale, activation))
                specs.append(tuple(spec_chain))
            outputs = ([h] if adds else []) + lasts
            first = min(outputs, key=order.__getitem__)
            late = [n for n in inputs if isinstance(n, Node) and n not in nodes and order[n] > order[first]]
            if late:
                declined.append((lasts[-1], "fp8 chain: an input computed after the chain's first output"))
                continue
            xv = value(head_inputs[0])
            if isinstance(xv, torch.Tensor) and (why := runs_here(xv)) is not None:
                declined.append((lasts[-1], f"fp8 chain: {why}"))
                continue
            spec = (k, float(eps), tuple(specs), tuple(o.dtype for o in outs),
                    tuple(gemms[n][7] for n in lasts))
            matches.append(Match("fp8_chain", ops.ts_fp8_chain, inputs, (spec,), outputs,
                                 sorted(set(nodes), key=order.__getitem__),
                                 f"{_what(norm, specs)} -> tilestack::norm_fp8 / quant_linear_fp8 (fp8 activations "
                                 "between)", l2_tolerance=FP8_CHAIN_TOLERANCE))
    return matches, declined


# ---- softmax ----------------------------------------------------------------------------------------------------
def softmax(gm: fx.GraphModule):
    matches, declined = [], []
    for node in gm.graph.nodes:
        if kind(node) != "softmax":
            continue
        x = _arg(node, 0, "input")
        xv = value(x)
        if not isinstance(xv, torch.Tensor) or xv.dim() == 0:
            continue
        dtype = _softmax_dtype(node)
        if not _last_dim(_arg(node, 1, "dim"), xv.dim()):
            declined.append((node, f"softmax over dim {_arg(node, 1, 'dim')!r}, not the last (the kernel takes "
                                   "rows)"))
        elif dtype is not None:
            declined.append((node, f"softmax with dtype={dtype} (the kernel keeps the input's dtype)"))
        elif xv.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            declined.append((node, f"softmax of {xv.dtype} (the kernel takes f32, bf16, f16)"))
        elif (why := runs_here(xv)) is not None:
            declined.append((node, why))
        else:
            matches.append(Match("softmax", ops.ts_softmax, [x], (), [node], [node],
                                 "softmax(dim=-1) -> tilestack::softmax"))
    return matches, declined


PASSES: dict[str, Callable] = {
    "sdpa": sdpa,
    "explicit_attention": explicit_attention,
    "add_norm": add_norm,
    "norm": norm,
    "linear_epilogue": linear_epilogue,
    "fp8_chain": fp8_chain,
    "softmax": softmax,
    "linear_cross_entropy": linear_cross_entropy,
}

# Why the ops no pass takes stay with Inductor, by op family (the report's "left" section)
LEFT_REASONS = {
    "linear": "no activation or residual add after it to fuse (a lone Linear is cuBLAS's addmm, its bias fused "
              "already), or one the linear_epilogue pass declined (listed above): left to Inductor",
    "matmul": "a plain matrix product: left to Inductor (cuBLAS or its templates)",
}
