"""The ``linear_epilogue`` pass: ``act(F.linear(x, w, b)) [+ r]`` (or ``x @ W + b``, aten's addmm / mm) in inference
graphs -> one GEMM with the bias, activation and residual add fused into its epilogue."""

from __future__ import annotations

import operator

import torch
from torch import fx

from tilestack.compile import ops
from tilestack.compile.patterns.match import Match, Node, _arg, autocast_dtypes, kind, runs_here, value

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
    elif k == "addmm" and len(node.args) == 3 and set(node.kwargs) <= {"beta", "alpha"} and \
            node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1:    # its tensors by position
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
    if node.op == "call_method" and node.target == "relu_" and node.args == (x,) and not node.kwargs:
        return "relu"       # fc(x).relu_(): x's only reader (the callers' _sole_user) written in place is a relu
    if k not in ("relu", "gelu", "silu") or _arg(node, 0, "input") is not x:
        return None
    if k == "gelu":
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(_arg(node, 1, "approximate", "none"))
    return k


def _sigmoid_of(node, x: Node) -> bool:
    """node is torch.sigmoid(x) / x.sigmoid() / F.sigmoid(x)."""
    return isinstance(node, Node) and node.args[:1] == (x,) and len(node.args) == 1 and not node.kwargs and (
        (node.op == "call_function" and node.target in (torch.sigmoid, torch.nn.functional.sigmoid)) or
        (node.op == "call_method" and node.target == "sigmoid"))


def _silu_written(x: Node) -> tuple[Node, Node] | None:
    """(sigmoid, product) when x's only readers are s = torch.sigmoid(x) and x * s (s read by the product alone):
    SiLU written out (``u * torch.sigmoid(u)``, as GPT-NeoX-style and older SwiGLU code writes it); else None."""
    users = list(x.users)
    if len(users) != 2:
        return None
    for sig, mul in (users, users[::-1]):
        if _sigmoid_of(sig, x) and list(sig.users) == [mul] and kind(mul) == "mul" and "alpha" not in mul.kwargs \
                and len(mul.args) == 2 and set(mul.args) == {x, sig}:
            return sig, mul
    return None


def _noop_dropout(node: Node) -> bool:
    """F.dropout in eval mode or with p = 0 (nanoGPT's and Hugging Face's after a projection)."""
    return kind(node) == "dropout" and (_arg(node, 2, "training", True) is False or _arg(node, 1, "p", 0.5) == 0)


def _sole_user(node: Node) -> Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _added(node: Node, x: Node) -> Node | None:
    """The other operand of ``x + other`` (no alpha) when node is that add, else None. Also ``x += other`` and
    ``x.add_(other)`` (x the tensor written): where x's only reader is that add (the callers' ``_sole_user``), the
    write changes nothing else, and the sum is the same (they were left, "nothing to fuse"); not ``other += x``,
    which writes other."""
    in_place = (node.op == "call_function" and node.target is operator.iadd) or \
        (node.op == "call_method" and node.target == "add_")
    if in_place:
        return node.args[1] if len(node.args) == 2 and not node.kwargs and node.args[0] is x and \
            isinstance(node.args[1], Node) and node.args[1] is not x else None
    if kind(node) != "add" or "alpha" in node.kwargs or len(node.args) > 2:
        return None
    a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
    other = b if a is x else a if b is x else None
    return other if isinstance(other, Node) and other is not x else None


_ATEN_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default)


def _view_shape(node: Node, x: Node) -> tuple | None:
    """The sizes given to ``x.view(*shape)`` / ``x.reshape(*shape)`` (or aten's view, as AOT autograd puts after an
    addmm of a 3-D input) when node is that (numbers, or symbolic sizes under dynamic shapes), else None."""
    method = node.op == "call_method" and node.target in ("view", "reshape")
    if not (method or (node.op == "call_function" and node.target in _ATEN_VIEWS)) or node.args[:1] != (x,) or \
            node.kwargs:
        return None
    shape = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], list | tuple) else node.args[1:]
    return tuple(shape) if shape else None


def _static_view(node: Node, x: Node) -> tuple[int, ...] | None:
    """The shape of a view of x (``_view_shape``) when every size is a number (QuantLinear views its rows back to the
    input's leading dims), else None."""
    shape = _view_shape(node, x)
    return shape if shape is not None and all(type(s) is int for s in shape) else None


def _rows_of(x: Node, view: Node, out: Node) -> Node | None:
    """x0 when x is ``x0.reshape(-1, K)`` (QuantLinear's rows) read by the GEMM ``out`` alone and ``view`` is the GEMM's
    output viewed back to x0's leading dims, ``(*x0.shape[:-1], N)``, with symbolic sizes (dynamic shapes): the fused
    op can then make the rows and the view itself, from x0's own sizes when it runs; else None."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if not (isinstance(x, Node) and x.op == "call_method" and x.target in ("reshape", "view") and
            list(x.users) == [out] and not x.kwargs and len(x.args) == 3 and x.args[1] == -1):
        return None
    x0, xv, vv = x.args[0], value(x.args[0]), value(view)
    if not (isinstance(xv, torch.Tensor) and isinstance(vv, torch.Tensor) and xv.dim() >= 2 and
            vv.dim() == xv.dim() and type(x.args[2]) is int and x.args[2] == xv.shape[-1]):
        return None
    same = all(statically_known_true(a == b) for a, b in zip(vv.shape[:-1], xv.shape[:-1], strict=True))
    return x0 if same else None


def _fusable_after(node: Node) -> bool:
    """Whether what reads node is an activation or a residual add the epilogue would take."""
    user = _sole_user(node)
    return _silu_written(node) is not None or (user is not None and (
        _activation(user, node) is not None or _added(user, node) is not None))


def linear_epilogue(gm: fx.GraphModule):
    """``act(F.linear(x, w, b)) [+ r]`` (also ``x @ W + b``, aten's ``addmm`` / ``mm`` and ``tilestack.quantize``'s
    ``tilestack::quant_linear``, its view back to the input's leading dims included; act relu, gelu in either
    form or silu (also written ``u * torch.sigmoid(u)``); through no-op dropouts) -> ``tilestack::linear_epilogue``
    / ``quant_linear_epilogue``: one GEMM with the bias, the activation and the residual add applied to its f32
    accumulator. Only where it pays: an activation or a residual add to fuse (a lone Linear is cuBLAS's addmm with
    the bias fused already) in a graph without gradients (the fused op has no backward; Inductor fuses training
    graphs' epilogues itself)."""
    matches, declined = [], []
    autocast = autocast_dtypes(gm)
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
        chain, cur, activation, residual, shape, rows_of = [node], node, None, None, None, None
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
        elif quant and not x_scale and cur is node and user is not None and _view_shape(user, cur) is not None \
                and (rows_of := _rows_of(x, user, node)) is not None:
            # under dynamic shapes QuantLinear's view of its rows back to the input's leading dims has symbolic
            # sizes: the fused op takes the input itself and makes both from its sizes when it runs (its GELU was
            # left unfused). Weight-only layers: an fp8-act layer's rows are what the fp8_chain pass reads to give
            # it its fp8 input from the layer or norm before it
            chain[:0] = [x]
            cur = user
            chain.append(cur)
        elif user is not None and _view_shape(user, cur) is not None and _fusable_after(user):
            # symbolic sizes of another view: the activation after it was not fused, and the report said only
            # "nothing to fuse"
            declined.append((node, "linear epilogue: a view with symbolic sizes (dynamic shapes: the rows viewed back "
                                   "to the input's leading dims) between the GEMM and its activation or residual add; "
                                   "the fused op ends with a static view"))
            continue
        for step in ("activation", "residual"):
            if step == "activation" and (silu := _silu_written(cur)) is not None:
                activation, cur = "silu", silu[1]     # its epilogue's SiLU (it was left, "nothing to fuse")
                chain.extend(silu)
                continue
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
        elif not quant and node in autocast and not xv.dtype == wv.dtype == autocast[node]:
            why = (f"inside a torch.autocast({autocast[node]}) region: x is {xv.dtype} and the weight {wv.dtype} in "
                   "the graph, and autocast casts them inside the linear, out of the graph's sight; cast the model "
                   "to that dtype to have its linear layers fused")
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
        if quant and rows_of is not None:
            m = Match("linear_epilogue", ops.ts_quant_linear_epilogue_of_rows, [rows_of, w[0], w[1], bias, residual],
                      (x_scale, activation), [cur], sorted(chain, key=order.__getitem__),
                      f"{' + '.join(parts)} -> tilestack::quant_linear_epilogue")
        elif quant:
            m = Match("linear_epilogue", ops.ts_quant_linear_epilogue, [x, w[0], w[1], bias, residual],
                      (x_scale, activation, shape), [cur], sorted(chain, key=order.__getitem__),
                      f"{' + '.join(parts)} -> tilestack::quant_linear_epilogue")
        else:
            m = Match("linear_epilogue", ops.ts_linear_epilogue, [x, w, bias, residual], (activation, kn, shape),
                      [cur], sorted(chain, key=order.__getitem__), f"{' + '.join(parts)} -> tilestack::linear_epilogue")
        matches.append(m)
    return matches, declined
