"""The ``linear_cross_entropy`` pass: ``F.cross_entropy(F.linear(x, w), labels)`` in training graphs -> the fused
linear + cross-entropy kernel (the logits never reach memory whole)."""

from __future__ import annotations

import torch
from torch import fx

from tilestack.compile import ops
from tilestack.compile.patterns.match import Match, Node, _arg, kind, runs_here, value
from tilestack.errors import LaunchError

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
        if why is None and not value(logits).dtype == xv.dtype == wv.dtype:
            why = (f"logits in {value(logits).dtype} from x in {xv.dtype} and a weight in {wv.dtype} (autocast runs "
                   "the Linear in its dtype; the fused op computes them in x's)")
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
