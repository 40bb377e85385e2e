"""On a GPU: the attention backward through the public op with the shipped tables (no config, no backend), beside
the same call on ``backend="triton"`` and SDPA's cuDNN backward, on the same inputs: which dQ kernel the tables
chose, the gradients' error against SDPA's, and the times (CUDA events, median).

    PYTHONPATH=src python3 scripts/gpu/check_bwd_table.py [--shapes llama-8k,fa3-hd128-4k-causal]
"""

from __future__ import annotations

import argparse
import functools

import torch
from probe_attention_bwd import SHAPES, rel, sdpa_backward  # scripts/gpu/ is the script's folder

from tilestack.kernels import attention_bwd as ab
from tilestack.kernels import attention_bwd_ws as abws
from tilestack.kernels.attention_fwd import attention_forward
from tilestack.perf.timing import time_fn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama-8k,fa3-hd128-4k-causal")
    a = ap.parse_args()
    from torch.nn.attention import SDPBackend
    chose = []
    real = ab.tuned_launcher
    ab.tuned_launcher = abws.tuned_launcher = \
        lambda kernel, *x, **kw: (chose.append(kernel.name), real(kernel, *x, **kw))[1]
    for name in a.shapes.split(","):
        B, H, Hkv, N, D, causal = SHAPES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        q, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        k, v = (torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        want, fn = sdpa_backward(q, k, v, do, causal, SDPBackend.CUDNN_ATTENTION)
        t_cudnn = time_fn(fn, args_sets=[()], device="cuda", budget_s=1.0).median_s
        o, lse = attention_forward(q, k, v, causal)
        chose.clear()
        got = ab.attention_backward(q, k, v, o, lse, do, causal)
        kernels = sorted(set(chose))
        err = max(rel(x, y) for x, y in zip(got, want, strict=True))
        t = {}
        for label, kw in (("tables", {}), ("triton", dict(backend="triton"))):
            t[label] = time_fn(functools.partial(ab.attention_backward, q, k, v, o, lse, do, causal, **kw),
                               args_sets=[()], device="cuda", budget_s=1.0).median_s
        print(f"{name}: tables {t['tables'] * 1e3:.3f} ms ({t_cudnn / t['tables']:.3f}x cuDNN), triton "
              f"{t['triton'] * 1e3:.3f} ms, tables/triton speed-up {t['triton'] / t['tables']:.3f}x, err {err:.1e}, "
              f"kernels {kernels}", flush=True)


if __name__ == "__main__":
    main()
