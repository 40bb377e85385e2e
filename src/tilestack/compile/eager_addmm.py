"""Eager numerics for a linear layer's bias under Inductor: keep a 16-bit ``addmm`` whole where its users are
pointwise, as eager runs it (cuBLAS adds the bias to the f32 accumulator and rounds once).

Inductor's post-grad pattern ``unfuse_bias_add_to_pointwise`` splits ``addmm(bias, x, w)`` into ``mm`` and an add
fused into the pointwise kernel after it, so a bf16 GEMM's result is rounded to bf16 before the bias is added and
rounded again. torch from 2.13 keeps 16-bit ``addmm`` whole by default (``keep_addmm_fused_for_half_dtypes``); torch
2.11 (the H200 image) has no such switch and splits a 16-bit ``addmm`` whose users are all pointwise on a GPU (a
2-D Linear feeding an activation or a residual add). GPT-2's 3-D linears reach their pointwise users through views,
and there 2.11 kept all four ``addmm`` calls whole already (H200, session 15): this pass is not what moves GPT-2's
compiled output from eager's (docs/inference.md, "Session 15").

With ``numerics="eager"`` the backend passes Inductor either that switch, or, on a torch without it,
``KeepHalfAddmm`` as a post-grad pre-pass: it marks the graph's 16-bit ``addmm`` nodes, and the pattern's check
(wrapped once per process, ``install``) declines a marked node. Graphs compiled without the pass carry no mark and
are split as Inductor decides, so plain ``torch.compile`` in the same process is unchanged; the pass's ``uuid``
keeps the two kinds of compiled graph apart in Inductor's cache.
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

MARK = "tilestack_keep_addmm"          # node.meta key set by KeepHalfAddmm on the addmm nodes to keep whole
_HALF = (torch.bfloat16, torch.float16)
_SWITCH = "keep_addmm_fused_for_half_dtypes"


class KeepHalfAddmm(CustomGraphPass):
    """Post-grad pre-pass: mark every ``aten.addmm`` whose result is 16-bit (module docstring)."""

    def __init__(self, then=None):
        self.then = then                  # a pre-pass the user had configured, run after this one

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            val = node.meta.get("val")
            if node.target is torch.ops.aten.addmm.default and getattr(val, "dtype", None) in _HALF:
                node.meta[MARK] = True
        if self.then is not None:
            self.then(graph)

    def uuid(self):
        inner = self.then.uuid() if self.then is not None and hasattr(self.then, "uuid") else None
        return ("tilestack-keep-half-addmm-1", inner)


class Tagged(CustomGraphPass):
    """A post-grad pre-pass that only runs ``then`` (if any) and names ``tag`` in its uuid: Inductor's compiled-graph
    cache keys on the config, not on the decomposition table given to ``compile_fx``, so a compile that changes
    the table (``numerics="exact"``) must differ in the config, or it is served another compile's graph."""

    def __init__(self, tag: str, then=None):
        self.tag, self.then = tag, then

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.then is not None:
            self.then(graph)

    def uuid(self):
        return (self.tag, self.then.uuid() if self.then is not None and hasattr(self.then, "uuid") else None)


def install() -> bool:
    """Wrap the check of Inductor's unfuse pattern so that it declines marked nodes (once; later calls find the
    wrapper). False where the pattern is not found (a torch that names or stores it otherwise)."""
    from torch._inductor.fx_passes import post_grad
    found = False
    for pass_ in getattr(post_grad, "pass_patterns", ()):
        for entries in getattr(pass_, "patterns", {}).values():
            for entry in entries:
                if getattr(getattr(entry, "handler", None), "__name__", "") != "unfuse_bias_add_to_pointwise":
                    continue
                found = True
                if getattr(entry.extra_check, "_tilestack_keep_addmm", False):
                    continue
                original = entry.extra_check

                def check(match, original=original) -> bool:
                    if match.output_node().meta.get(MARK):
                        return False
                    return original(match)

                check._tilestack_keep_addmm = True
                entry.extra_check = check
    return found


def patches(numerics: str) -> dict:
    """The Inductor config patch that keeps 16-bit addmm whole under ``numerics="eager"`` (nothing otherwise, or
    where neither the switch nor the pattern exists)."""
    from torch._inductor import config as inductor_config
    if numerics != "eager":
        return {}
    if hasattr(inductor_config, _SWITCH):
        return {_SWITCH: True}
    if not install():
        return {}
    current = inductor_config.post_grad_custom_pre_pass
    if isinstance(current, KeepHalfAddmm):
        return {}
    return {"post_grad_custom_pre_pass": KeepHalfAddmm(then=current)}
