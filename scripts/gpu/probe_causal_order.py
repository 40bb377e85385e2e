"""On a GPU: causal attention's forward and backward through the library functions, with the tables shipped, against
SDPA's cuDNN forward and backward on the same inputs, in one process; a line per shape with both ratios.

    PYTHONPATH=src python3 scripts/gpu/probe_causal_order.py --tag heavy-first [--shapes ...]

Run it twice, once on the tree as it is and once on a copy whose ``kernels.attention_fwd.heavy_first`` returns the
block index unchanged (the launch order before it), alternating: the ratios to cuDNN taken in each process cancel
the drift between the two processes. ``--device cpu`` is a dry run (a tiny shape, SDPA's math backend).
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F
from probe_attention_bwd import rel, sdpa_backward  # scripts/gpu/ is the script's folder

from tilestack.kernels.attention_bwd import attention_backward
from tilestack.kernels.attention_fwd import attention_forward
from tilestack.perf.timing import time_fn

SHAPES = {   # (B, H, Hkv, N, D): every one causal
    "fa3-hd128-4k": (4, 16, 16, 4096, 128),
    "fa3-hd128-16k": (1, 16, 16, 16384, 128),
    "fa3-hd64-2k": (8, 32, 32, 2048, 64),
    "llama-8k": (1, 16, 4, 8192, 128),
    "tiny": (1, 4, 2, 40, 16),
}
TOL = 2e-2          # bf16 outputs and gradients against SDPA's


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="")
    ap.add_argument("--shapes", default="fa3-hd128-4k,fa3-hd128-16k,fa3-hd64-2k,llama-8k")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    cuda = a.device == "cuda"
    backend = SDPBackend.CUDNN_ATTENTION if cuda else SDPBackend.MATH
    dtype = torch.bfloat16 if cuda else torch.float32
    for name in a.shapes.split(","):
        B, H, Hkv, N, D = SHAPES[name]
        g = torch.Generator(device=a.device).manual_seed(0)
        q, do = (torch.randn(B, H, N, D, device=a.device, dtype=dtype, generator=g) for _ in range(2))
        k, v = (torch.randn(B, Hkv, N, D, device=a.device, dtype=dtype, generator=g) for _ in range(2))
        with sdpa_kernel(backend):
            want_o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H > Hkv)
        want, bwd_ref = sdpa_backward(q, k, v, do, True, backend)

        def fwd_ref(q=q, k=k, v=v, gqa=H > Hkv):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        o, lse = attention_forward(q, k, v, True)
        got = attention_backward(q, k, v, o, lse, do, True)
        err = max([rel(o, want_o)] + [rel(x, y) for x, y in zip(got, want, strict=True)])
        if not err < TOL:
            print(f"{a.tag} {name}: WRONG, error {err:.2e} against SDPA's", flush=True)
            continue
        dev = "cuda" if cuda else "cpu"
        t = {label: time_fn(fn, args_sets=[()], device=dev, budget_s=1.0 if cuda else 0.05).median_s for label, fn in (
            ("fwd", functools.partial(attention_forward, q, k, v, True)), ("fwd_ref", fwd_ref),
            ("bwd", functools.partial(attention_backward, q, k, v, o, lse, do, True)), ("bwd_ref", bwd_ref))}
        print(f"{a.tag} {name}: forward {t['fwd'] * 1e3:.3f} ms ({t['fwd_ref'] / t['fwd']:.3f}x cuDNN), backward "
              f"{t['bwd'] * 1e3:.3f} ms ({t['bwd_ref'] / t['bwd']:.3f}x cuDNN), error {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
