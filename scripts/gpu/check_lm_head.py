"""On a GPU: the LM head + cross-entropy of a training step, tilestack's fused op against torch's, and the cuBLAS
kernels each GEMM of it gets, in one process.

    PYTHONPATH=src python3 scripts/gpu/check_lm_head.py --json /tmp/lm_head.json
    PYTHONPATH=src python3 scripts/gpu/check_lm_head.py --quick        # tiny shapes; runs on a CPU too

1. The three GEMMs of one chunk of ``fused_linear_cross_entropy`` (logits = x W^T, dx = G W, dw = G^T x; G the
   (c, V) logits gradient, rows padded to a multiple of 64) at GPT-2's vocabulary V = 50257, over all V columns
   at once and over the first 50240 (a multiple of 64) with the last 17 apart, as the op runs them now: time and
   the cuBLAS kernel's name (torch.profiler). An odd GEMM dimension sends cuBLAS to older kernels.
2. The whole LM head + loss, forward and backward through autograd (``tilestack.torch.ops``; the op makes the
   gradients in its forward), against torch's ``F.cross_entropy(F.linear(x, W).float(), labels)`` and its
   backward, at the GPT-2 step's (8192, 768, 50257) and the Llama step's (8192, 2048, 32000), bf16: time, peak
   memory, loss and gradient errors against float64 (on a slice of rows for memory).
3. The logits-gradient kernel alone (``ce_grad_kernel``, two passes over a chunk's logits, three times its
   bytes moved) at 2048 rows of 50257 (padded rows, as the op lays them out), 50304 and 65536 columns, over a
   few configs: bytes/s against the H200's 4.27 TB/s copy.
Prints a table last; ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
import torch.nn.functional as F

from tilestack.kernels import fused_linear_cross_entropy
from tilestack.kernels.cross_entropy import ROW_ALIGN, chunk_rows
from tilestack.perf.timing import time_fn
from tilestack.torch import ops

CASES = [("gpt2", 8192, 768, 50257), ("llama", 8192, 2048, 32000)]
QUICK = [("gpt2", 64, 32, 201), ("llama", 64, 32, 128)]


def _kernel_names(fn) -> str:
    """The GPU kernels one call of ``fn`` launches, by name (cuBLAS's choice)."""
    from torch.profiler import ProfilerActivity, profile
    if not torch.cuda.is_available():
        return "-"
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    return "; ".join(n[:60] for n in names)


def gemm_rows(device: str, quick: bool) -> list[dict]:
    """The chunk's three GEMMs over all of V and split at a multiple of ROW_ALIGN."""
    _, t, d, v = (QUICK if quick else CASES)[0]
    c = min(t, chunk_rows(t, v, 2))
    padded = -(-v // ROW_ALIGN) * ROW_ALIGN
    va = v - v % ROW_ALIGN
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(c, d, device=device, dtype=torch.bfloat16, generator=g)
    w = torch.randn(v, d, device=device, dtype=torch.bfloat16, generator=g)
    rows = torch.randn(c, padded, device=device, dtype=torch.bfloat16, generator=g)
    logits, dx, dw = rows[:, :v], torch.empty_like(x), torch.empty_like(w)
    forms = {
        "logits": (lambda: torch.mm(x, w.T, out=logits),
                   lambda: (torch.mm(x, w[:va].T, out=logits[:, :va]), torch.mm(x, w[va:].T, out=logits[:, va:]))),
        "dx": (lambda: torch.mm(logits, w, out=dx),
               lambda: (torch.mm(logits[:, :va], w[:va], out=dx), dx.addmm_(logits[:, va:], w[va:]))),
        "dw": (lambda: torch.mm(logits.T, x, out=dw),
               lambda: (torch.mm(logits[:, :va].T, x, out=dw[:va]), torch.mm(logits[:, va:].T, x, out=dw[va:]))),
    }
    out = []
    for name, (whole, split) in forms.items():
        tw = time_fn(whole, args_sets=[()], device=device, budget_s=1.0).median_s
        tsplit = time_fn(split, args_sets=[()], device=device, budget_s=1.0).median_s
        out.append(dict(gemm=name, c=c, d=d, V=v, whole_ms=tw * 1e3, split_ms=tsplit * 1e3, speedup=tw / tsplit,
                        tflops_split=2 * c * d * v / tsplit / 1e12, kernels_whole=_kernel_names(whole),
                        kernels_split=_kernel_names(split)))
    return out


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30)) if bool(a.isfinite().all()) else float("inf")


def _torch_eval(x, w, labels):
    return F.cross_entropy(F.linear(x, w).float(), labels)


def step_rows(device: str, quick: bool) -> list[dict]:
    out = []
    for name, t, d, v in QUICK if quick else CASES:
        g = torch.Generator(device=device).manual_seed(1)
        x = (torch.randn(t, d, device=device, generator=g)).to(torch.bfloat16).requires_grad_()
        w = (torch.randn(v, d, device=device, generator=g) * d**-0.5).to(torch.bfloat16).requires_grad_()
        labels = torch.randint(0, v, (t,), device=device, generator=g)

        def ours(x=x, w=w, labels=labels):                   # the public op, through autograd
            torch.autograd.grad(ops.fused_linear_cross_entropy(x, w, labels), (x, w))

        def torch_ref(x=x, w=w, labels=labels):
            torch.autograd.grad(F.cross_entropy(F.linear(x, w).float(), labels), (x, w))

        row = dict(model=name, T=t, d=d, V=v)
        for impl, fn in (("tilestack", ours), ("torch", torch_ref)):
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn()
                torch.cuda.synchronize()
                row[f"{impl}_peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
            row[f"{impl}_ms"] = time_fn(fn, args_sets=[()], device=device, budget_s=2.0).median_s * 1e3
        row["ratio"] = row["tilestack_ms"] / row["torch_ms"]
        # evaluation (no_grad): the loss only, ours on its loss-only path against torch's logits + CE
        with torch.no_grad():
            for impl, fn in (("tilestack", functools.partial(ops.fused_linear_cross_entropy, x, w, labels)),
                             ("torch", functools.partial(_torch_eval, x, w, labels))):
                row[f"{impl}_eval_ms"] = time_fn(fn, args_sets=[()], device=device, budget_s=1.0).median_s * 1e3
            want_eval = float(_torch_eval(x, w, labels))
            row["eval_loss_rel"] = abs(float(ops.fused_linear_cross_entropy(x, w, labels)) - want_eval) / want_eval
        # errors against float64 on the first rows (the whole (T, V) logits in float64 would take 3.3 GB)
        n = min(t, 1024)
        loss, dx, dw = fused_linear_cross_entropy(x[:n].detach(), w.detach(), labels[:n])
        xd, wd = x[:n].detach().double().requires_grad_(), w.detach().double().requires_grad_()
        want = F.cross_entropy(xd @ wd.T, labels[:n])
        wdx, wdw = torch.autograd.grad(want, (xd, wd))
        row |= dict(loss_rel=abs(float(loss) - float(want)) / float(want), dx_rel=_rel(dx, wdx), dw_rel=_rel(dw, wdw))
        out.append(row)
    return out


CE_CONFIGS = [dict(BM=bm, BN=bn, num_warps=nw, num_stages=ns) for bm in (1, 2, 4) for bn in (2048, 4096, 8192)
              for nw in (4, 8, 16) for ns in (1,)]


def ce_kernel_rows(device: str, quick: bool) -> list[dict]:
    from tilestack.kernels.cross_entropy import ce_grad_kernel
    rows_n = 16 if quick else 2048
    out = []
    for width, v in ((50304, 50257), (50304, 50304), (65536, 65536)) if not quick else ((208, 201),):
        g = torch.Generator(device=device).manual_seed(2)
        buf = torch.randn(rows_n, width, device=device, dtype=torch.bfloat16, generator=g)
        logits = buf[:, :v]
        labels = torch.randint(0, v, (rows_n,), device=device, generator=g)
        scale = torch.full((rows_n,), 1.0 / rows_n, device=device)
        loss = torch.empty(rows_n, device=device)
        best = None
        for cfg in CE_CONFIGS[:2] if quick else CE_CONFIGS:
            cols = torch.arange(cfg["BN"], dtype=torch.float32, device=device)
            fn = functools.partial(ce_grad_kernel, logits, labels, scale, cols, loss, **cfg)
            try:
                t = time_fn(fn, args_sets=[()], device=device, budget_s=0.3).median_s
            except Exception:       # a config past the register or shared-memory limit
                continue
            if best is None or t < best[0]:
                best = (t, cfg)
        bytes_moved = 3 * rows_n * v * 2
        out.append(dict(rows=rows_n, V=v, row_stride=width, best_ms=best[0] * 1e3, config=best[1],
                        tb_per_s=bytes_moved / best[0] / 1e12))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not a.quick else "cpu"
    gemms, steps, ce = gemm_rows(device, a.quick), step_rows(device, a.quick), ce_kernel_rows(device, a.quick)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                           torch=torch.__version__, gemms=gemms, steps=steps, ce_kernel=ce), f, indent=1)
    for r in gemms:
        print(f"  {r['gemm']}: whole {r['kernels_whole']}\n  {r['gemm']}: split {r['kernels_split']}")
    print(f"{'gemm (c, d, V)':28} {'whole ms':>9} {'split ms':>9} {'speedup':>8} {'TFLOP/s':>8}")
    for r in gemms:
        print(f"{r['gemm'] + str((r['c'], r['d'], r['V'])):28} {r['whole_ms']:9.3f} {r['split_ms']:9.3f} "
              f"{r['speedup']:8.2f} {r['tflops_split']:8.1f}")
    for r in ce:
        print(f"ce_grad_kernel ({r['rows']}, {r['V']}) stride {r['row_stride']}: {r['best_ms']:.3f} ms "
              f"{r['tb_per_s']:.2f} TB/s at {r['config']}")
    print(f"{'LM head + CE fwd+bwd':28} {'tilestack':>9} {'torch':>9} {'ratio':>8} {'peak ts/torch GB':>18} "
          f"{'err loss/dx/dw':>24}")
    for r in steps:
        peak = f"{r.get('tilestack_peak_gb', float('nan')):.2f}/{r.get('torch_peak_gb', float('nan')):.2f}"
        print(f"{r['model'] + str((r['T'], r['d'], r['V'])):28} {r['tilestack_ms']:9.3f} {r['torch_ms']:9.3f} "
              f"{r['ratio']:8.3f} {peak:>18} {r['loss_rel']:.1e}/{r['dx_rel']:.1e}/{r['dw_rel']:.1e}")
    print(f"{'LM head + CE, no_grad (eval)':28} {'tilestack':>9} {'torch':>9} {'ratio':>8} {'loss vs torch':>14}")
    for r in steps:
        ts_ms, torch_ms = r["tilestack_eval_ms"], r["torch_eval_ms"]
        print(f"{r['model'] + str((r['T'], r['d'], r['V'])):28} {ts_ms:9.3f} {torch_ms:9.3f} {ts_ms / torch_ms:8.3f} "
              f"{r['eval_loss_rel']:14.1e}")


if __name__ == "__main__":
    main()
