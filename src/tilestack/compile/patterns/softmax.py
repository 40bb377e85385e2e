"""The ``softmax`` pass: the remaining softmax over the last dim -> tilestack's row softmax."""

from __future__ import annotations

import torch
from torch import fx

from tilestack.compile import ops
from tilestack.compile.patterns.match import Match, _arg, _last_dim, _softmax_dtype, kind, runs_here, value


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
        elif dtype not in (None, xv.dtype):         # softmax(x, dtype=x.dtype) (Falcon's) is softmax(x)
            declined.append((node, f"softmax of {xv.dtype} with dtype={dtype} (the kernel keeps the input's dtype)"))
        elif xv.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            declined.append((node, f"softmax of {xv.dtype} (the kernel takes f32, bf16, f16)"))
        elif (why := runs_here(xv)) is not None:
            declined.append((node, why))
        else:
            matches.append(Match("softmax", ops.ts_softmax, [x], (), [node], [node],
                                 "softmax(dim=-1) -> tilestack::softmax"))
    return matches, declined
