"""On a GPU: the attention backward's variants through the public op, against torch SDPA's cuDNN and Flash
backwards, in one process on the same inputs. The variants: the split kernels (dK/dV, then dQ: 7 matrix products
per block pair) as shipped; the dK/dV block key-major (``KEY_MAJOR``: S^T = K Q^T); dQ fused into the dK/dV kernel
by atomic adds (``dkdvdq``: 5 products), query- and key-major; each over a few block shapes. Every variant's
gradients are checked against SDPA's (relative norm error) before it is timed; a failing one is reported, not
timed.

    PYTHONPATH=src python3 scripts/gpu/probe_attention_bwd.py [--json out.json] [--shapes llama,gpt2]
                                                              [--family split|ws]

``--family ws``: the warp-specialized kernels (kernels/attention_bwd_ws.py, ``schedule="ws"``) on the Gluon
backend, both parts or one beside the other part's split kernel on the tables' backend, over a few block shapes.

Shapes: Llama's (1, 16 heads, 4 K/V heads, 8192, 128) causal and (4, 16, 4, 2048, 128); GPT-2's (4, 12, 12,
2048, 64) causal. Time: the backward alone (forward outputs kept), CUDA-event median over a 1 s budget
(tilestack.perf.timing.time_fn).
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
import torch.nn.functional as F

from tilestack.kernels.attention_bwd import attention_backward
from tilestack.kernels.attention_fwd import attention_forward
from tilestack.perf.timing import time_fn

SHAPES = {   # (B, H, Hkv, N, D, causal)
    "llama-8k": (1, 16, 4, 8192, 128, True),
    "llama-2k": (4, 16, 4, 2048, 128, True),
    "gpt2-2k": (4, 12, 12, 2048, 64, True),
    "fa3-hd128-4k": (4, 16, 16, 4096, 128, False),    # the FlashAttention-3 grid: B*N = 16k, H*D = 2048
    "fa3-hd128-4k-causal": (4, 16, 16, 4096, 128, True),
    "fa3-hd64-4k": (4, 32, 32, 4096, 64, False),
    "tiny": (1, 4, 2, 40, 16, True),            # --device cpu: a dry run of the script under the interpreter
}
BLOCKS = ((32, 128, 8, 3), (32, 128, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2), (64, 128, 8, 2), (128, 64, 8, 2),
          (32, 128, 4, 3))
# (sm_90a, CPU compile, hd128: key-major at BM32 BN128 w8 s3 is all wgmma with 1-4 spill loads per iteration;
# query-major at BM32 cannot use wgmma for S = Q K^T (M = 32) and spills 139 words)
TOL = 2e-2          # bf16 gradients against SDPA's (itself bf16)


WS_KV = ((64, 128, 2), (64, 128, 3), (32, 128, 2))       # (BM, BN, STAGES); BN / 2 keys a consumer
WS_Q = ((128, 64, 2), (128, 128, 2), (128, 64, 3))       # (BM, BN, STAGES) of the dQ kernel: BM / 2 rows a consumer


def ws_variants():
    """(label, config, backend): both parts warp-specialized on Gluon, then each alone beside the other's split."""
    yield "shipped", None, None
    yield "gluon split", None, "gluon"
    for bm, bn, st in WS_KV:
        kv = dict(schedule="ws", BM=bm, BN=bn, STAGES=st)
        yield f"ws dkdv BM{bm} BN{bn} s{st} + ws dq", {"dkdv": kv, "dq": dict(schedule="ws")}, "gluon"
        yield f"ws dkdv BM{bm} BN{bn} s{st} + split dq", {"dkdv": kv | dict(backend="gluon")}, None
    yield "ws both, turns", {"dkdv": dict(schedule="ws", TURNS=True), "dq": dict(schedule="ws", TURNS=True)}, "gluon"
    for bm, bn, st in WS_Q:
        q = dict(schedule="ws", BM=bm, BN=bn, STAGES=st)
        yield f"split dkdv + ws dq BM{bm} BN{bn} s{st}", {"dq": q | dict(backend="gluon")}, None


def variants(family: str = "split"):
    if family == "ws":
        yield from ws_variants()
        return
    yield "shipped", None, None
    for bm, bn, nw, st in BLOCKS:
        blk = dict(BM=bm, BN=bn, num_warps=nw, num_stages=st)
        tag = f"BM{bm} BN{bn} w{nw} s{st}"
        yield f"split q-major {tag}", {"dkdv": blk}, None
        yield f"split k-major {tag}", {"dkdv": blk | dict(KEY_MAJOR=True)}, None
        yield f"fused q-major {tag}", {"dkdvdq": blk}, None
        yield f"fused k-major {tag}", {"dkdvdq": blk | dict(KEY_MAJOR=True)}, None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-6)) if bool(a.isfinite().all()) else float("inf")


def sdpa_backward(q, k, v, do, causal, backend):
    """(SDPA's gradients on ``backend``, its backward alone as a function: the graph kept for every call)."""
    from torch.nn.attention import sdpa_kernel
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(backend):
        o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, enable_gqa=q.shape[1] > k.shape[1])
    fn = functools.partial(torch.autograd.grad, o, (qq, kk, vv), do, retain_graph=True)
    return fn(), fn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--shapes", default="llama-8k,llama-2k,gpt2-2k")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run (tiny shape, SDPA's math backend as both)")
    ap.add_argument("--family", default="split", choices=("split", "ws"))
    a = ap.parse_args()
    from torch.nn.attention import SDPBackend
    rows = []
    for name in a.shapes.split(","):
        B, H, Hkv, N, D, causal = SHAPES[name]
        dev = a.device
        g = torch.Generator(device=dev).manual_seed(0)
        q, do = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
        k, v = (torch.randn(B, Hkv, N, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
        flops = 2.5 * 4 * B * H * N * N * D * (0.5 if causal else 1.0)     # 5 products of 2 N N D, causal half
        base = {}
        gpu = dev == "cuda"
        for label, be in (("cudnn", SDPBackend.CUDNN_ATTENTION if gpu else SDPBackend.MATH),
                          ("flash", SDPBackend.FLASH_ATTENTION if gpu else SDPBackend.MATH)):
            try:
                want, fn = sdpa_backward(q, k, v, do, causal, be)
                base[label] = time_fn(fn, args_sets=[()], device=dev, budget_s=1.0).median_s
            except RuntimeError as e:            # cuDNN refuses some shapes
                print(f"{name} sdpa {label}: {str(e)[:100]}")
        want = sdpa_backward(q, k, v, do, causal, SDPBackend.FLASH_ATTENTION if gpu else SDPBackend.MATH)[0]
        o, lse = attention_forward(q, k, v, causal)
        ref = base.get("cudnn") or base.get("flash")
        print(f"{name}: cuDNN {base.get('cudnn', 0) * 1e3:.3f} ms, flash {base.get('flash', 0) * 1e3:.3f} ms")
        for label, cfg, backend in variants(a.family):
            try:
                attention_backward.plans.clear()
                cfg = {part: dict(c) for part, c in cfg.items()} if cfg else None   # the op pops keys of its own
                got = attention_backward(q, k, v, o, lse, do, causal, config=cfg, backend=backend)
                err = max(rel(x, y) for x, y in zip(got, want, strict=True))
                if not err <= TOL:
                    print(f"{name} {label}: WRONG, error {err:.2e}")
                    rows.append(dict(shape=name, variant=label, error=err, ok=False))
                    continue
                fn = functools.partial(attention_backward, q, k, v, o, lse, do, causal, config=cfg, backend=backend)
                t = time_fn(fn, args_sets=[()], device=dev, budget_s=0.5).median_s
            except Exception as e:               # a config past the register or shared-memory limit
                print(f"{name} {label}: {type(e).__name__}: {str(e)[:100]}")
                continue
            rows.append(dict(shape=name, variant=label, ms=t * 1e3, tflops=flops / t / 1e12, error=err,
                             vs_cudnn=ref / t if ref else None, ok=True))
            print(f"{name} {label}: {t * 1e3:.3f} ms {flops / t / 1e12:.0f} TFLOP/s, {ref / t:.3f}x cuDNN, "
                  f"err {err:.1e}", flush=True)
        best = max((r for r in rows if r["shape"] == name and r["ok"]), key=lambda r: r["tflops"], default=None)
        if best:
            print(f"BEST {name}: {best['variant']} {best['ms']:.3f} ms = {best['vs_cudnn']:.3f}x cuDNN")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if a.device == "cuda" else a.device,
                           torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
