"""RMSNorm written out by hand, as Hugging Face's Llama, T5 and many others write it, for the ``norm`` pass:

    x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w                   # in x's dtype
    h = x.to(torch.float32); w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)   # Llama
    x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)                          # no weight
    w * x * (x.pow(2).mean(-1, keepdim=True) + eps) ** -0.5                      # (w * x) first, a power -1/2
    h = x.float(); (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())).type_as(x)  # Gemma

-> ``tilestack::rms_norm_fwd`` (the kernel computes in f32 whatever x's dtype, and rounds once at the end). The
square may be ``pow(2)``, ``** 2``, ``square()`` or ``h * h``; the statistic may be upcast to f32 or f64; the
weight (a 1-D tensor of the last dim's size) may multiply on either side (the product cast back to x's dtype once,
as Gemma's), x before the inverse RMS, or be absent; the inverse RMS may be ``rsqrt`` or a power of -0.5."""

from __future__ import annotations

import operator

import torch

from tilestack.compile import ops
from tilestack.compile.patterns.match import Match, Node, _arg, cast_input, kind, runs_here, scalar, value
from tilestack.errors import LaunchError

_FUNCTIONS = {"pow": (torch.pow, operator.pow), "square": (torch.square,), "mean": (torch.mean,),
              "rsqrt": (torch.rsqrt,), "sqrt": (torch.sqrt,)}


def _is(node, name: str) -> bool:
    """node calls ``name`` (a key of _FUNCTIONS), as a torch function, an operator or a tensor method."""
    if not isinstance(node, Node):
        return False
    if node.op == "call_method":
        return node.target == name
    return node.op == "call_function" and any(node.target is f for f in _FUNCTIONS[name])


def _up_from(x, source) -> bool:
    """x is source, or source cast without loss (to its own dtype, f32 or f64)."""
    chain = []
    while x is not source:
        inner = cast_input(x)
        if inner is None:
            return False
        sv, xv = value(inner), value(x)
        if not (xv.dtype == sv.dtype or (xv.dtype in (torch.float32, torch.float64) and sv.dtype.is_floating_point
                                         and sv.dtype.itemsize <= xv.dtype.itemsize)):
            return False
        chain.append(x)
        x = inner
    return True


def _root(x):
    """x with the widening casts under it removed (the tensor whose rows are normalized)."""
    while (inner := cast_input(x)) is not None and _up_from(x, inner):
        x = inner
    return x


def _square_of(node):
    """t when node is t ** 2 (pow, **, square, t * t), else None."""
    if _is(node, "pow") and scalar(_arg(node, 1, "exponent")) == 2.0:
        return _arg(node, 0, "input")
    if _is(node, "square"):
        return _arg(node, 0, "input")
    if kind(node) == "mul" and isinstance(node.args[0], Node) and len(node.args) == 2 and node.args[0] is \
            node.args[1]:
        return node.args[0]
    return None


def _last_dim_mean(node):
    """t when node is t.mean(-1, keepdim=True) (torch.mean too; dim -1, [-1] or the last index), else None."""
    if not _is(node, "mean"):
        return None
    t, dim, keep = _arg(node, 0, "input"), _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False)
    tv = value(t)
    if not isinstance(tv, torch.Tensor) or keep is not True or _arg(node, 3, "dtype") is not None:
        return None
    dims = tuple(dim) if isinstance(dim, list | tuple) else (dim,)
    return t if len(dims) == 1 and isinstance(dims[0], int) and dims[0] in (-1, tv.dim() - 1) else None


def _inv_rms(node, inverse: bool):
    """(x, eps, nodes) when node is rsqrt(mean(x^2) + eps) or (mean(x^2) + eps) ** -0.5 (inverse) or
    sqrt(mean(x^2) + eps) (not inverse), x under widening casts, else None."""
    power = inverse and _is(node, "pow") and scalar(_arg(node, 1, "exponent")) == -0.5
    if not (power or _is(node, "rsqrt" if inverse else "sqrt")):
        return None
    s = _arg(node, 0, "input")
    if kind(s) != "add" or "alpha" in s.kwargs:
        return None
    a, b = _arg(s, 0, "input"), _arg(s, 1, "other")
    for m, e in ((a, b), (b, a)):
        eps = scalar(e)
        if eps is None and isinstance(e, Node) and not (isinstance(value(e), torch.Tensor) and value(e).dim()):
            eps = e                                      # a number computed in the graph
        if eps is not None and isinstance(m, Node) and (sq := _last_dim_mean(m)) is not None and \
                (t := _square_of(sq)) is not None:
            return _root(t), eps, [node, s, m, sq]
    return None


def _weighted(t, x):
    """w when t is ``w * x`` or ``x * w`` for a 1-D w (x under widening casts), else None."""
    if kind(t) != "mul":
        return None
    a, b = _arg(t, 0, "input"), _arg(t, 1, "other")
    for n, w in ((a, b), (b, a)):
        wv = value(w)
        if isinstance(n, Node) and isinstance(w, Node) and isinstance(wv, torch.Tensor) and wv.dim() == 1 and \
                _root(n) is x:
            return w
    return None


def _normalized(node):
    """(x, eps, nodes, w) when node is x * rsqrt(...) or x / sqrt(...) of x's rows (x under widening casts); w is
    a weight that multiplied x first (``w * x * rsqrt(...)``), else None."""
    if kind(node) == "mul":
        a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
        pairs, inverse = ((a, b), (b, a)), True
    elif kind(node) == "div" and node.kwargs.get("rounding_mode") is None:
        pairs, inverse = ((_arg(node, 0, "input"), _arg(node, 1, "other")),), False
    else:
        return None
    for t, r in pairs:
        found = _inv_rms(r, inverse) if isinstance(t, Node) else None
        if found is not None and _root(t) is found[0]:
            return found[0], found[1], [*found[2], node], None
        if found is not None and (w := _weighted(t, found[0])) is not None:
            return found[0], found[1], [*found[2], t, node], w
    return None


def hand_rms_norms(gm):
    """The matches (``norm`` pass) of RMSNorms written out, and the ones declined with why."""
    matches, declined, taken = [], [], set()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in reversed(gm.graph.nodes):         # the outermost first: the weight's multiply before the norm's
        if node in taken:
            continue
        found = _normalized(node)
        weight, out, extra = (None if found is None else found[3]), node, []
        if found is None:                          # w * cast(x * rsqrt(...)) or cast(...) * w
            mul, back = node, []
            if kind(node) != "mul" and kind(cast_input(node)) == "mul":
                mul, back = cast_input(node), [node]     # Gemma: cast(normalized * (1 + w)) back to x's dtype
            if kind(mul) != "mul":
                continue
            a, b = _arg(mul, 0, "input"), _arg(mul, 1, "other")
            if back and (found := _normalized(mul)) is not None and found[3] is not None:
                weight, extra, a, b = found[3], back, None, None    # (w * h * rsqrt(...)).to(x.dtype)
            else:
                found = None
            for n, w in ((a, b), (b, a)) if found is None else ():
                wv = value(w)
                inner = cast_input(n) if isinstance(n, Node) else None
                if isinstance(wv, torch.Tensor) and wv.dim() == 1 and isinstance(n, Node) and \
                        (found := _normalized(n if inner is None else inner)) is not None and found[3] is None:
                    weight, extra = w, ([n, mul] if inner is not None else [mul]) + back
                    break
            if found is None or (back and value(node).dtype != value(found[0]).dtype):
                continue        # not a cast back to x's dtype (a model's final .float()): the product is the norm
        x, eps, nodes = found[:3]
        chain = nodes + extra
        xv, ov = value(x), value(out)
        taken.update(chain)
        why = None
        if not (isinstance(xv, torch.Tensor) and isinstance(ov, torch.Tensor)) or xv.dim() == 0:
            continue
        d = xv.shape[-1]
        wv = value(weight)
        if isinstance(eps, Node):
            why = ("eps computed in the graph (dynamic=True makes a module's float attribute a graph input; the "
                   "kernel takes a constant)")
        elif eps < 0:
            why = f"eps={eps} < 0"
        elif ov.shape != xv.shape or ov.dtype != xv.dtype:
            why = f"a result of {ov.dtype} {tuple(ov.shape)} from x of {xv.dtype} (the kernel keeps x's dtype)"
        elif type(d) is not int:
            why = "a symbolic last dim"
        elif weight is not None and wv.shape[0] != d:
            why = f"a weight of {wv.shape[0]} elements over rows of {d}"
        else:
            why = runs_here(xv)
        if why is None:
            from tilestack.kernels.rmsnorm import check_norm_args
            w_check = wv if weight is not None else torch.empty(d, dtype=xv.dtype, device=xv.device)
            try:
                check_norm_args("rms_norm", xv.reshape(-1, d), w_check, float(eps))
            except LaunchError as e:
                why = str(e)
        if why is not None:
            declined.append((out, f"RMSNorm written out: {why}"))
            continue
        chain = sorted(set(chain) | {c for c in _casts_between(chain, x)}, key=order.__getitem__)
        matches.append(Match("norm", ops.ts_rms_norm, [x, weight], (float(eps),), [out], chain,
                             f"x * rsqrt(mean(x^2) + eps){' * w' if weight is not None else ''} (written out) -> "
                             "tilestack::rms_norm_fwd"))
    matches.sort(key=lambda m: order[m.outputs[0]])
    return matches, declined


def _casts_between(chain, x):
    """The widening casts of x that the chain's nodes read (erased with them when nothing else reads them); not a
    cast of the weight (``w.float() * h * rsqrt(...)``: the weight's cast is the rewrite's input)."""
    for n in chain:
        for a in n.args:
            if not isinstance(a, Node) or _root(a) is not x:
                continue
            while isinstance(a, Node) and a is not x and cast_input(a) is not None:
                yield a
                a = cast_input(a)
