"""The norm passes: ``add_norm`` (a residual add followed by LayerNorm / RMSNorm -> one fused kernel) and ``norm``
(the remaining LayerNorm with weight and bias, RMSNorm with weight)."""

from __future__ import annotations

import torch
from torch import fx

from tilestack.compile import ops
from tilestack.compile.patterns.match import Match, Node, _arg, kind, runs_here, value
from tilestack.errors import LaunchError


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
    if eps is None:        # F.rms_norm's default: the epsilon of the dtype it computes in (f32 for 16-bit x)
        eps = torch.finfo(torch.float32 if xv.dtype in (torch.bfloat16, torch.float16) else xv.dtype).eps
    shape = tuple(shape) if isinstance(shape, list | tuple) else (shape,)
    if shape != (xv.shape[-1],):
        return x, weight, bias, eps, f"normalized_shape {shape} is not the last dim alone ({xv.shape[-1]},)"
    if not all(p is None or isinstance(p, Node) for p in (weight, bias)):
        return x, weight, bias, eps, "affine parameters that are not tensors"
    if isinstance(eps, Node):
        return x, weight, bias, eps, "eps computed in the graph"
    why = runs_here(xv)
    if why is None and (weight is None or (k == "layer_norm" and bias is None)) and type(xv.shape[-1]) is not int:
        why = "no affine parameters and a symbolic last dim (the kernel's ones / zeros are made at its size)"
    if why is None:
        from tilestack.kernels.rmsnorm import check_norm_args
        # elementwise_affine=False, bias=False: the ops give the kernel ones and zeros (ops._affine)
        dtype = xv.dtype if weight is None else value(weight).dtype
        absent = torch.empty(xv.shape[-1], dtype=dtype, device=xv.device) if weight is None or (
            k == "layer_norm" and bias is None) else None
        try:
            check_norm_args(k, xv.reshape(-1, xv.shape[-1]), absent if weight is None else value(weight), float(eps),
                            bias=None if k != "layer_norm" else absent if bias is None else value(bias))
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
    """The remaining LayerNorm / RMSNorm calls, and RMSNorms written out (``hand_norms``)."""
    from tilestack.compile.patterns.hand_norms import hand_rms_norms

    matches, declined = hand_rms_norms(gm)
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
