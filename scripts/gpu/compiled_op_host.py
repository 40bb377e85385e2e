"""On a GPU: the host cost per call of the ``tilestack::*`` ops a compiled graph calls, beside the public ops and
torch's own, at tiny sizes where the kernel is a few microseconds (so the wall time per call is host work).
Timed in alternating rounds in one process (``bench_host_cost.per_call_us_interleaved``), then a compiled
module's whole call: ``torch.compile(backend="tilestack")`` against Inductor on a block whose swaps are forced.

    PYTHONPATH=src python3 scripts/gpu/compiled_op_host.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_host_cost import per_call_us_interleaved  # noqa: E402  (scripts/bench_host_cost.py)


def _nograd(fn):
    def call():
        with torch.no_grad():
            fn()
    return call


def _fwd_bwd(fn, leaves):
    def call():
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
        for t in leaves:
            t.grad = None
    return call


def main() -> None:
    import tilestack
    from tilestack.torch import ops

    t = torch.ops.tilestack
    dev, bf = "cuda", torch.bfloat16
    q, k, v = (torch.randn(1, 8, 128, 64, device=dev, dtype=bf, requires_grad=True) for _ in range(3))
    h = torch.randn(4, 16, 1024, device=dev, dtype=bf, requires_grad=True)
    w = torch.ones(1024, device=dev, dtype=bf, requires_grad=True)
    b = torch.zeros(1024, device=dev, dtype=bf, requires_grad=True)
    groups = {
        "attention fwd (1,8,128,64), no grad": {
            "tilestack::attention_fwd": _nograd(lambda: t.attention_fwd(q, k, v, None, True, 0.125, "top_left")),
            "tilestack.attention": _nograd(lambda: tilestack.attention(q, k, v, causal=True)),
            "SDPA": _nograd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        },
        "attention fwd+bwd (1,8,128,64)": {
            "tilestack::attention_fwd": _fwd_bwd(lambda: t.attention_fwd(q, k, v, None, True, 0.125, "top_left"),
                                                 (q, k, v)),
            "tilestack.attention": _fwd_bwd(lambda: tilestack.attention(q, k, v, causal=True), (q, k, v)),
            "SDPA": _fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v)),
        },
        "layer_norm fwd (4,16,1024), no grad": {
            "tilestack::layer_norm_fwd": _nograd(lambda: t.layer_norm_fwd(h, w, b, 1e-5)),
            "ops.layer_norm": _nograd(lambda: ops.layer_norm(h, w, b)),
            "F.layer_norm": _nograd(lambda: F.layer_norm(h, (1024,), w, b)),
        },
        "layer_norm fwd+bwd (4,16,1024)": {
            "tilestack::layer_norm_fwd": _fwd_bwd(lambda: t.layer_norm_fwd(h, w, b, 1e-5), (h, w, b)),
            "ops.layer_norm": _fwd_bwd(lambda: ops.layer_norm(h, w, b), (h, w, b)),
            "F.layer_norm": _fwd_bwd(lambda: F.layer_norm(h, (1024,), w, b), (h, w, b)),
        },
    }
    rows = []
    for group, fns in groups.items():
        us = per_call_us_interleaved(fns, n=300)
        base = us.get("SDPA", us.get("F.layer_norm"))
        for name, u in us.items():
            rows.append((group, name, u, u / base if base else float("nan")))
    print(f"\n{'case':40s} {'implementation':28s} {'us/call':>9s} {'vs torch':>9s}")
    for group, name, u, r in rows:
        print(f"{group:40s} {name:28s} {u:9.1f} {r:8.2f}x")


if __name__ == "__main__":
    main()
