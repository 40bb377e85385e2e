"""The ``linear_cross_entropy`` pass: ``F.cross_entropy(F.linear(x, w), labels)`` in training graphs -> the fused
linear + cross-entropy kernel (the logits never reach memory whole)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from tilestack.compile import ops
from tilestack.compile.patterns.match import Match, Node, _arg, kind, runs_here, value
from tilestack.errors import LaunchError


def _f32_cast(node) -> bool:
    return isinstance(node, Node) and node.op == "call_method" and (
        node.target == "float" or (node.target == "to" and torch.float32 in node.args[1:]))


def _rows_view(node) -> bool:
    """node merges the leading dims of a tensor (..., V) into rows (T, V): ``logits.view(-1, V)`` /
    ``reshape`` / ``flatten(0, 1)`` (Hugging Face computes (B, N, V) logits in the model and flattens them in the
    loss). Any 2-D view keeping the last dim is that: row-major order keeps each V-row whole."""
    if not (isinstance(node, Node) and node.args and isinstance(node.args[0], Node) and (
            (node.op == "call_method" and node.target in ("view", "reshape", "flatten")) or
            (node.op == "call_function" and node.target in (torch.reshape, torch.flatten)))):
        return False
    src, out = value(node.args[0]), value(node)
    return isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dim() > 2 and out.dim() == 2 \
        and out.shape[-1] == src.shape[-1]


_CE_ARGS = (("input", None), ("target", None), ("weight", None), ("size_average", None), ("ignore_index", -100),
            ("reduce", None), ("reduction", "mean"), ("label_smoothing", 0.0))
_NLL_ARGS = _CE_ARGS[:-1]       # F.nll_loss(input, target, weight, size_average, ignore_index, reduce, reduction)


def _log_softmax_rows(node) -> Node | None:
    """The logits when node is ``F.log_softmax(logits, dim)`` (``torch.log_softmax``, ``logits.log_softmax``) of
    (T, V) rows over their last dim (1 or -1: the class dim nll_loss reads) with no dtype= or f32's, read by one node;
    else None. With it ``F.nll_loss(node, labels)`` is ``F.cross_entropy(logits, labels)``."""
    if not isinstance(node, Node) or len(node.users) != 1 or not node.args:
        return None
    if node.op == "call_function" and node.target in (F.log_softmax, torch.log_softmax, torch.special.log_softmax):
        dtype = _arg(node, 3 if node.target is F.log_softmax else 2, "dtype")
    elif node.op == "call_method" and node.target == "log_softmax":
        dtype = _arg(node, 2, "dtype")
    else:
        return None
    logits, dim = node.args[0], _arg(node, 1, "dim")
    lv = value(logits)
    if not isinstance(logits, Node) or not isinstance(lv, torch.Tensor) or lv.dim() != 2 or dim not in (1, -1) or \
            dtype not in (None, torch.float32):
        return None
    return logits


def linear_cross_entropy(gm: fx.GraphModule):
    """``F.cross_entropy(F.linear(x, w)[.float()], labels)`` (mean, no class weights or smoothing; the logits may be
    flattened to rows in the loss, ``logits.view(-1, V)``; or ``F.nll_loss(F.log_softmax(logits, -1), labels)`` of
    such (T, V) logits) in a training
    graph -> the fused linear + cross-entropy, which never makes the (T, V) logits whole. Not in inference
    graphs: the fused op makes the gradients in its forward, which only a backward pays back."""
    from tilestack.kernels.cross_entropy import check_ce_args

    matches, declined = [], []
    for node in gm.graph.nodes:
        # F.nll_loss(F.log_softmax(logits, -1), labels) is the cross-entropy written in two (it was left as "no
        # tilestack kernel for it"): the log_softmax is erased with the loss
        nll = kind(node) == "nll_loss" and _log_softmax_rows(_arg(node, 0, "input")) is not None
        if kind(node) != "cross_entropy" and not nll:
            continue
        a = {name: _arg(node, i, name, d) for i, (name, d) in enumerate(_NLL_ARGS if nll else _CE_ARGS)}
        a.setdefault("label_smoothing", 0.0)
        given = [f"{k}={a[k]!r}" for k in ("weight", "size_average", "reduce") if a[k] is not None]
        given += [f"{k}={a[k]!r}" for k, unset in (("reduction", "mean"), ("label_smoothing", 0.0))
                  if isinstance(a[k], Node) or a[k] != unset]
        if isinstance(a["ignore_index"], Node):
            given.append("ignore_index computed in the graph")
        if given:   # the argument named (it said only "class weights, smoothing or a reduction", whichever it was)
            declined.append((node, f"{'nll_loss' if nll else 'cross_entropy'} with {', '.join(given)}: the fused "
                                   "kernel takes no class weights, smoothing or a reduction other than mean"))
            continue
        logits, chain, rows = a["input"], [node], False
        if nll:
            chain.append(logits)
            logits = _log_softmax_rows(logits)
        # (B, N, V) logits flattened to rows in the loss (Hugging Face: logits.view(-1, V), maybe .float() first
        # or after): the fused op flattens x to (B * N, d) itself (ops.ts_linear_cross_entropy)
        while _f32_cast(logits) or (not rows and _rows_view(logits)):
            rows = rows or not _f32_cast(logits)
            chain.append(logits)
            logits = logits.args[0]
        if kind(logits) != "linear" or _arg(logits, 2, "bias") is not None or len(logits.users) != 1:
            # said, not left to "no tilestack kernel for it" (a kernel it has, for another form of the logits)
            declined.append((node, "the logits are not F.linear(x, w) without a bias read by the loss alone (a "
                                   "bias, a slice, or another reader of the logits between: the fused kernel "
                                   "computes the logits of x itself and never keeps them)"))
            continue
        chain.append(logits)
        x, w = _arg(logits, 0, "input"), _arg(logits, 1, "weight")
        xv, wv, tv, out = value(x), value(w), value(a["target"]), value(node)
        if rows and isinstance(xv, torch.Tensor):
            xv = xv.reshape(-1, xv.shape[-1])           # as ops.ts_linear_cross_entropy reads it
        if not all(isinstance(t, torch.Tensor) for t in (xv, wv, tv, out)):
            continue
        why = None if out.requires_grad else \
            "an inference graph (the fused op makes gradients in its forward; the plain GEMM is cheaper)"
        if why is None and out.dtype != torch.float32:
            # a bf16 model's F.cross_entropy(logits.view(-1, V), labels) was skipped without a word, and the report
            # said "cross_entropy: no tilestack kernel for it"
            why = (f"a loss in {out.dtype} (the logits are {value(logits).dtype}; the fused kernel gives an f32 loss): "
                   "take the loss of logits.float() to have it fused")
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
                             f"{'nll_loss(log_softmax(linear(x, w)))' if nll else 'cross_entropy(linear(x, w))'} -> "
                             "tilestack::fused_linear_cross_entropy"))
    return matches, declined
