"""Where tilestack's bf16 GEMM with a fused epilogue stands on GPT-2 small's prefill layers (issue 14: the
backend's linear_epilogue swap pays only where it beats cuBLAS plus Inductor's fused pointwise kernel), kernel
time only: every candidate is captured 20 launches to a CUDA graph and replayed (``time_fn(graph=True)``).

    PYTHONPATH=src python3 scripts/gpu/probe_bf16_epilogue_gemm.py [--json out.json]

Rows per layer (M x K x N, M = 8 x 1024 rows, bf16, the weight a Linear's (N, K)):
  cuBLAS                 F.linear(x, w, b) (+ residual): what eager runs (addmm, then an add kernel)
  Inductor               torch.compile of the same function: what the backend's inner compiler makes of it
  tilestack <config>     kernels.gemm(x, w.t(), bias=, activation=, residual=) with the epilogue fused, per config
The epilogues are GPT-2's: c_attn + bias, attn.c_proj + bias + residual, mlp.c_fc + bias + GELU (tanh),
mlp.c_proj + bias + residual, and the tied LM head (no bias). Each output is checked against the f32 reference
before it is timed; the best config per layer is printed with its ratio to both baselines.
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
import torch.nn.functional as F

M = 8 * 1024
# (name, K, N, activation, residual, bias)
LAYERS = [("c_attn", 768, 2304, None, False, True), ("attn.c_proj", 768, 768, None, True, True),
          ("mlp.c_fc", 768, 3072, "gelu_tanh", False, True), ("mlp.c_proj", 3072, 768, None, True, True),
          ("lm_head", 768, 50257, None, False, False)]
# (BM, BN, BK, num_warps, num_stages): 1 block per SM (128x256 at 8 warps), 2 per SM (128x128 at 4/8 warps,
# 64x256), deeper pipelines for the short K = 768 (12 steps of 64)
CONFIGS = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 4, 4), (128, 128, 64, 4, 3),
           (128, 128, 64, 8, 4), (128, 128, 128, 4, 3), (64, 256, 64, 4, 4), (256, 128, 64, 8, 3),
           (128, 64, 64, 4, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--layers", default=",".join(n for n, *_ in LAYERS))
    a = ap.parse_args()
    from tilestack.kernels.gemm import gemm, gemm_config, torch_activation
    from tilestack.perf.timing import time_fn

    dev = "cuda"
    rows = []

    def timed(fn):
        return time_fn(fn, args_sets=[()], budget_s=0.4, device=dev, graph=True).median_s

    for name, K, N, act, res, has_bias in LAYERS:
        if name not in a.layers.split(","):
            continue
        torch.manual_seed(0)
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = (torch.randn(N, K, device=dev) * K**-0.5).to(torch.bfloat16)
        b = (0.1 * torch.randn(N, device=dev)).to(torch.bfloat16) if has_bias else None
        r = torch.randn(M, N, device=dev, dtype=torch.bfloat16) if res else None
        want = torch_activation(x.float() @ w.float().T + (b.float() if has_bias else 0), act)
        if res:
            want = want + r.float()

        def eager(x, w, b, r, act=act):
            y = torch_activation(F.linear(x, w, b), act)
            return y + r if r is not None else y

        compiled = torch.compile(eager)
        base = {}
        for label, fn in (("cuBLAS", eager), ("Inductor", compiled)):
            call = functools.partial(fn, x, w, b, r)
            y = call()
            err = float((y.float() - want).norm() / want.norm())
            base[label] = t = timed(call)
            rows.append(dict(layer=name, K=K, N=N, variant=label, seconds=t, err=err))
        shipped = {k: v for k, v in gemm_config(M, N, K, torch.bfloat16, x.device).items()}
        configs = [None] + [dict(BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=nw, num_stages=ns)
                            for bm, bn, bk, nw, ns in CONFIGS]
        for cfg in configs:
            label = "tilestack shipped" if cfg is None else "tilestack"
            out = torch.full((M, N), float("nan"), device=dev, dtype=torch.bfloat16)
            fn = functools.partial(gemm, x, w.t(), bias=b, activation=act, residual=r, out=out, **(cfg or {}))
            try:
                fn()
                torch.cuda.synchronize()
                err = float((out.float() - want).norm() / want.norm())
                if not err < 1e-2:
                    raise AssertionError(f"relative error {err:.2e}")
                t = timed(fn)
            except Exception as e:   # past the shared-memory or register limits, or wrong
                rows.append(dict(layer=name, variant=label, config=cfg, error=f"{type(e).__name__}: {str(e)[:160]}"))
                continue
            rows.append(dict(layer=name, K=K, N=N, variant=label, config=cfg or shipped, seconds=t, err=err))
        for row in rows:
            if row.get("layer") == name and "seconds" in row:
                row["tflops"] = 2 * M * N * K / row["seconds"] / 1e12
                row["vs_cublas"] = base["cuBLAS"] / row["seconds"]
                row["vs_inductor"] = base["Inductor"] / row["seconds"]
        print(f"{name}: done", flush=True)

    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; kernel time (CUDA graph of 20 launches), "
          f"M = {M}")
    print(f"{'layer':<12} {'variant':<18} {'us':>8} {'TFLOP/s':>8} {'vs cuBLAS':>9} {'vs Ind.':>8}  config")
    for name, *_ in LAYERS:
        best = {}
        for row in rows:
            if row.get("layer") == name and "seconds" in row:
                v = row["variant"]
                if v not in best or row["seconds"] < best[v]["seconds"]:
                    best[v] = row
        for v, row in best.items():
            print(f"{name:<12} {v:<18} {row['seconds'] * 1e6:8.1f} {row['tflops']:8.1f} {row['vs_cublas']:9.2f} "
                  f"{row['vs_inductor']:8.2f}  {row.get('config', '')}")
    failed = [row for row in rows if "error" in row]
    print(f"{len(failed)} candidates failed: " + "; ".join(f"{row['layer']} {row.get('config')}: {row['error'][:60]}"
                                                          for row in failed[:6]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
