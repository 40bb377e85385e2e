"""Inference benchmark of issue 14: eager vs Inductor (default, max-autotune) vs the tilestack backend on a
GPT-2-small-shaped model and a ResNet-50-shaped CNN, and the quantized GEMMs against bf16 on GPT-2's linear
layers. Each (case, variant) runs in a process of its own (compile caches and memory do not carry over).

    PYTHONPATH=src python3 scripts/bench_inference.py                        # everything (H200; about 30 min)
    PYTHONPATH=src python3 scripts/bench_inference.py --cases epilogue --time-limit 300 --json epilogue.json
    PYTHONPATH=src python3 scripts/bench_inference.py --cases gpt2-prefill --variants eager,inductor,tilestack
    PYTHONPATH=src python3 scripts/bench_inference.py --cases gemm           # the fp8 bar alone (no compiling)
    PYTHONPATH=src python3 scripts/bench_inference.py --cases gemm --gemm-sweep   # and the fp8 GEMM's best config
    PYTHONPATH=src python3 scripts/bench_inference.py --quick                # tiny sizes on the CPU (a check)
    PYTHONPATH=src python3 scripts/bench_inference.py --json results.json --time-limit 2400   # (the default)

Cases:
- ``gpt2-prefill``: GPT-2 small (tilestack.bench.models.GPT, impl="torch", random weights, bf16), logits of
  B=8 sequences of N=1024 tokens; throughput in tokens/s.
- ``gpt2-decode``: one decoding step of batch 32 against a static KV cache of 1024 positions (the step writes
  position 1023 and attends to all 1024 through a boolean mask); throughput in tokens/s.
- ``resnet50-b1``, ``resnet50-b64``: torchvision's resnet50 (random weights) if torchvision imports, else the
  same architecture defined here (bottleneck blocks 3-4-6-3, widths 64-512, expansion 4); bf16, channels-last,
  224x224 images; throughput in images/s.
- ``gemm``: the GPT-2 linear layers at M = 8 x 1024 rows: torch bf16 (cuBLAS), tilestack's bf16 GEMM, int8
  weight-only (``int8-w``: quantized_linear, qgemm_kernel with W widened in the loop; ``int8-w-transposed``:
  qgemm_wonly_kernel, Y^T = W X^T), fp8
  weight-only, fp8 weights and activations (``fp8-act``: quantized_linear on bf16 x as the device's default
  quantizes it, on a GPU a quantizing pass then the fp8 x fp8 GEMM; ``fp8-act-in-gemm``: the activations
  quantized inside the GEMM by qgemm_act_kernel; ``fp8-in``: quantized_linear on x already in fp8, as its
  producer would hand it over; ``fp8-act-gemm-only``: qgemm_kernel called directly on that fp8 x, no
  host-side plan); on a GPU also ``fp8-act-gluon`` and
  ``fp8-act-gluon-ws``, the in-GEMM quantizing kernel on the Gluon backend, persistent or with warp roles.
  ``--gemm-variants`` picks some (bf16-torch, the baseline, always runs).
- ``epilogue``: GPT-2 small's MLP layers at M = 8 x 1024 rows, c_fc + bias + GELU (tanh) and c_proj + bias +
  residual add, and c_fc + GELU at 32 rows (decode): torch eager, Inductor, tilestack's GEMM with the epilogue
  in torch, tilestack's GEMM with the epilogue fused, and the tilestack backend's rewrite of the eager code
  (about 3 minutes).

Variants (model cases): ``eager``; ``inductor`` and ``inductor-max-autotune`` (torch.compile); ``tilestack``
(torch.compile(backend="tilestack"), the rest by Inductor default), ``tilestack-fused-numerics`` (the same with
``numerics="fused"``: intermediates kept f32 in fused kernels, not rounded as eager's), ``tilestack-max-autotune``,
``tilestack-reduce-overhead`` (the result captured in CUDA graphs); ``tilestack-int8``, ``tilestack-fp8-act``
(GPT-2 only: tilestack.quantize then the tilestack backend). Per variant: compile time (the first call), median
latency (CUDA events), throughput, peak memory of a steady-state call, the output's error against eager (two
measures: ||out - eager|| / ||eager|| over all elements, "norm", and max|out - eager| / max|eager|, "max"), and the
backend's swap counts. ``--min-rows`` / ``--min-query-rows`` set the backend's size thresholds
(tilestack.compile.policy: below them a swap does not pay and the op stays with Inductor).

Bars (issue 14), checked at the end: tilestack at least as fast as Inductor default and at least 1.3x eager on
every model case (also shown for tilestack-reduce-overhead when it runs); bf16 outputs within 1e-2 of eager,
norm-relative (the largest-relative error printed beside it, with Inductor's); fp8 weights-and-activations GEMM at
least 1.4x the bf16 GEMM on GPT-2's linear layers. Printed last: the bars, then the table of every row. ``--time-limit``
bounds the whole run (a case past it is stopped, later ones skipped; their rows say so).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

MODEL_CASES = ("gpt2-prefill", "gpt2-decode", "resnet50-b1", "resnet50-b64")
KERNEL_CASES = ("gemm", "epilogue")                  # no model variants: one process runs all of a case
CASES = MODEL_CASES + KERNEL_CASES
VARIANTS = ("eager", "inductor", "inductor-max-autotune", "tilestack", "tilestack-fused-numerics",
            "tilestack-max-autotune", "tilestack-reduce-overhead", "tilestack-int8",
            "tilestack-fp8-act")
QUICK_VARIANTS = ("eager", "inductor", "tilestack", "tilestack-int8")
QUANT_VARIANTS = {"tilestack-int8": "int8", "tilestack-fp8-act": "fp8-act"}
GEMM_VARIANTS = ("bf16-torch", "bf16-tilestack", "int8-w", "int8-w-transposed", "fp8-w", "fp8-act", "fp8-act-in-gemm",
                 "fp8-in", "fp8-act-gemm-only")
GLUON_GEMM_VARIANTS = {"fp8-act-gluon": dict(persistent=True),          # the same kernel on the Gluon backend (a
                       "fp8-act-gluon-ws": dict(warp_specialize=True)}  # Hopper GPU only): persistent / warp roles
FP8_BAR_VARIANTS = ("fp8-act", "fp8-act-in-gemm", "fp8-in", "fp8-act-gluon", "fp8-act-gluon-ws", "fp8-gemm-best")
EPILOGUE_VARIANTS = ("torch-eager", "inductor", "tilestack-unfused", "tilestack-fused", "tilestack-backend")
OUT_TOL = 1e-2            # bf16 outputs against eager: ||out - eager|| / ||eager|| (norm-relative; docs/inference.md)
SPEEDUP_EAGER = 1.3
FP8_SPEEDUP = 1.4
GEMM_ROUNDS = 5           # the gemm case's alternating timing rounds (run_gemm_case)


# ---- the models --------------------------------------------------------------------------------------------------
class GPTDecoder(nn.Module):
    """One decoding step of a tilestack.bench.models.GPT against a static KV cache (per layer (B, H, L, hd)):
    token ids (B, 1) at position ``pos`` (a 0-d int64 tensor, so that every position runs one compiled graph)
    -> next-token logits (B, V)."""

    def __init__(self, gpt, batch: int, length: int):
        super().__init__()
        self.gpt, self.length = gpt, length
        cfg = gpt.cfg
        hd = cfg.d // cfg.n_head
        p = next(gpt.parameters())
        for i in range(cfg.n_layer):
            # a prompt's keys and values, as if prefilled: random, scaled like the projections' outputs
            self.register_buffer(f"k{i}", 0.5 * torch.randn(batch, cfg.n_head, length, hd, device=p.device,
                                                            dtype=p.dtype))
            self.register_buffer(f"v{i}", 0.5 * torch.randn(batch, cfg.n_head, length, hd, device=p.device,
                                                            dtype=p.dtype))

    def forward(self, idx, pos):
        gpt = self.gpt
        B, d, H = idx.shape[0], gpt.cfg.d, gpt.cfg.n_head
        at = pos.view(1)
        h = gpt.wte(idx) + gpt.wpe(at)                                      # (B, 1, d)
        seen = (torch.arange(self.length, device=idx.device) <= pos).view(1, 1, 1, self.length)
        for i, block in enumerate(gpt.h):
            q, k, v = block.attn.c_attn(block.ln_1(h)).split(d, dim=2)     # (B, 1, d) each
            q, k, v = (t.view(B, 1, H, d // H).transpose(1, 2) for t in (q, k, v))   # (B, H, 1, hd)
            kc, vc = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            kc.index_copy_(2, at, k)
            vc.index_copy_(2, at, v)
            y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=seen)  # (B, H, 1, hd)
            h = h + block.attn.c_proj(y.transpose(1, 2).reshape(B, 1, d))
            h = h + block.mlp.c_proj(F.gelu(block.mlp.c_fc(block.ln_2(h)), approximate="tanh"))
        return F.linear(gpt.ln_f(h), gpt.wte.weight)[:, -1]               # (B, V)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """ResNet-50's architecture (depths 3-4-6-3, widths 64-128-256-512) when torchvision is not installed;
    ``base``/``depths`` shrink it for --quick."""

    def __init__(self, depths=(3, 4, 6, 3), base: int = 64, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], base
        for stage, depth in enumerate(depths):
            width = base * 2**stage
            for b in range(depth):
                blocks.append(Bottleneck(cin, width, 2 if b == 0 and stage > 0 else 1))
                cin = width * Bottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def resnet50(quick: bool) -> nn.Module:
    if quick:
        return ResNet(depths=(1, 1, 1, 1), base=8, classes=10)
    try:
        import torchvision
        return torchvision.models.resnet50(weights=None)
    except ImportError:
        return ResNet()


def build(case: str, quick: bool, device: str, dtype):
    """(module, args, units per call, unit name)."""
    from tilestack.bench.models import GPT, GPT2_SMALL, GPT2_TINY, make_batch

    torch.manual_seed(0)
    if case.startswith("gpt2"):
        cfg = GPT2_TINY if quick else GPT2_SMALL
        gpt = GPT(cfg, impl="torch").to(device=device, dtype=dtype).eval()
        if case == "gpt2-prefill":
            B, N = (2, 16) if quick else (8, 1024)
            idx, _ = make_batch(cfg, B, N, device=device)
            return gpt, (idx,), B * N, "tokens"
        B, L = (4, 16) if quick else (32, 1024)
        dec = GPTDecoder(gpt, B, L).eval()
        idx = torch.randint(0, cfg.vocab, (B, 1), device=device)
        return dec, (idx, torch.tensor(L - 1, device=device)), B, "tokens"
    B = int(case.split("-b")[1])
    B, size = (min(B, 2), 32) if quick else (B, 224)
    model = resnet50(quick).to(device=device, dtype=dtype).eval()
    x = torch.randn(B, 3, size, size, device=device, dtype=dtype)
    if device == "cuda":
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    return model, (x,), B, "images"


def output_errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max |got - want| / max |want|, ||got - want|| / ||want||): the largest difference against the largest
    magnitude, and the norm-relative error (2-norms over every element, in float64), which the bar uses."""
    got, want = got.double(), want.double()
    max_rel = float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))
    norm_rel = float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want).clamp_min(1e-300))
    return max_rel, norm_rel


def prepare(variant: str, model: nn.Module, args, passes=None, policy=None):
    """The callable to time for a variant, and a note. ``passes``: the tilestack backend's passes (None: all);
    ``policy``: the backend's size thresholds (dict of min_rows / min_query_rows; None: tilestack.compile.policy's)."""
    import tilestack

    if variant == "eager":
        return model, ""
    if variant.startswith("inductor"):
        mode = "max-autotune" if variant.endswith("max-autotune") else None
        return torch.compile(model, mode=mode), ""
    if variant in QUANT_VARIANTS:
        mode = QUANT_VARIANTS[variant]
        calib = [args] if mode == "fp8-act" else None      # calibrated on the benchmark batch itself
        model = tilestack.quantize(copy.deepcopy(model), mode, calibration=calib)
        return tilestack.optimize(model, passes=passes, **(policy or {})), f"quantized {mode}"
    if variant == "tilestack-fused-numerics":       # intermediates kept f32 inside fused kernels (not eager's)
        return tilestack.optimize(model, passes=passes, numerics="fused", **(policy or {})), "numerics=fused"
    mode = {"tilestack": None, "tilestack-max-autotune": "max-autotune",
            "tilestack-reduce-overhead": "reduce-overhead"}[variant]
    return tilestack.optimize(model, mode=mode, passes=passes, **(policy or {})), ""


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _f32_truth(case: str, model: nn.Module, args) -> torch.Tensor:
    """The model's output with the same weights and inputs in float32 (a copy: the model keeps its dtype and its
    KV cache), the reference both eager bf16 and the compiled variants are measured against."""
    ref = copy.deepcopy(model).float()
    ref_args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    out = ref(*ref_args).float()
    if case == "gpt2-decode":          # as for eager: the second step, over the cache the first one wrote
        out = ref(*ref_args).float()
    del ref
    return out


def run_model_case(case: str, variant: str, quick: bool, passes=None, policy=None) -> dict:
    from tilestack.perf.timing import time_fn

    device = "cuda" if torch.cuda.is_available() and not quick else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, args, units, unit = build(case, quick, device, dtype)
    with torch.no_grad():
        truth = _f32_truth(case, model, args) if dtype != torch.float32 else None
        want = model(*args).float()
        if case == "gpt2-decode":      # the step wrote the cache: run it again so both see the same cache
            want = model(*args).float()
        fn, note = prepare(variant, model, args, passes, policy)
        t0 = time.perf_counter()
        got = fn(*args)
        _sync(device)
        compile_s = time.perf_counter() - t0
        got = fn(*args).float()
        err, norm_err = output_errors(got, want)
        # the distance from the true answer (the same weights in f32): this variant's and eager bf16's own
        f32_err = output_errors(got, truth)[1] if truth is not None else None
        eager_f32_err = output_errors(want, truth)[1] if truth is not None else None
        timing = time_fn(fn, args_sets=[args], budget_s=2.0 if quick else 10.0)
        peak = None
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            fn(*args)
            _sync(device)
            peak = torch.cuda.max_memory_allocated() / 2**30
    swaps = {}
    if variant.startswith("tilestack"):
        import tilestack.compile as tc
        for r in tc.reports():
            for k, v in r.swapped.items():
                swaps[k] = swaps.get(k, 0) + v
    lat = timing.median_s
    return dict(case=case, variant=variant, device=device, dtype=str(dtype).removeprefix("torch."),
                compile_s=compile_s, latency_ms=lat * 1e3, throughput=units / lat, unit=f"{unit}/s",
                peak_gib=peak, max_rel_err=err, norm_rel_err=norm_err, f32_norm_rel_err=f32_err,
                eager_f32_norm_rel_err=eager_f32_err, swaps=swaps, note=note, rel_ci=timing.rel_ci)


# ---- the GEMMs ----------------------------------------------------------------------------------------------------
def gemm_shapes(quick: bool):
    """(name, M, K, N) of GPT-2 small's linear layers at B x N = 8 x 1024 rows."""
    if quick:
        return [("c_attn", 32, 32, 96), ("c_fc", 32, 32, 128)]
    M, d = 8 * 1024, 768
    return [("c_attn", M, d, 3 * d), ("attn.c_proj", M, d, d), ("mlp.c_fc", M, d, 4 * d), ("mlp.c_proj", M, 4 * d, d)]


# qgemm_act_kernel's configs for --gemm-sweep, less those that cannot win, by their sm_90a compile on a CPU
# (Triton 3.6, docs/inference.md "fp8 GEMM: what the SASS shows"): BM=128 at 4 warps with BN=256 or BK=128 spills
# (136 B to 4.4 KB), and 128x256x128 in 4 stages needs 246 KB of shared memory. The small-register configs stay:
# they fit 2 blocks per SM (BM=128, BN=128, BK=64 at 8 warps: 123 registers), which hides one block's epilogue
# and its serialized wgmmas behind the other's.
SWEEP = [dict(BM=bm, BN=bn, BK=bk, num_warps=nw, num_stages=ns) for bm in (64, 128) for bn in (128, 256)
         for bk in (64, 128) for nw in (4, 8) for ns in (3, 4)
         if not (bm == 128 and nw == 4 and (bn == 256 or bk == 128)) and not (bm, bn, bk, ns) == (128, 256, 128, 4)]


def _weight_only_transposed(x, q, s):
    """Weight-only through qgemm_wonly_kernel (Y^T = W X^T: the widened W tile as the mma's register operand), the
    alternative form ``quantized_linear`` does not launch (slower on the H200: docs/inference.md)."""
    from tilestack.quant.gemm import qgemm_wonly_kernel

    y = torch.empty(x.shape[0], q.shape[0], device=x.device, dtype=x.dtype)
    qgemm_wonly_kernel(x, q, s, s, s, y.t())
    return y


def run_gemm_case(quick: bool, sweep: bool = False, variants=None) -> list[dict]:
    """Per GPT-2 linear shape, each variant's time (``variants``: names from GEMM_VARIANTS and, on a GPU,
    GLUON_GEMM_VARIANTS; None: all; bf16-torch, the baseline, always runs); with ``sweep`` also the best config of
    SWEEP for the fp8 weights-and-activations GEMM (qgemm_act_kernel, the activations quantized in its loop). A
    variant that fails gives a row with its error; the others still run."""
    from tilestack.kernels import gemm
    from tilestack.perf.timing import time_fn
    from tilestack.quant import quantize_weight, quantized_linear
    from tilestack.quant.gemm import (
        activation_scale,
        inverse_scale,
        qgemm_act_kernel,
        qgemm_kernel,
        quantize_fp8_kernel,
    )

    device = "cuda" if torch.cuda.is_available() and not quick else "cpu"
    dtype = torch.bfloat16
    rows = []
    for name, M, K, N in gemm_shapes(quick):
        torch.manual_seed(0)
        x = torch.randn(M, K, device=device, dtype=dtype)
        w = (torch.randn(N, K, device=device) * K**-0.5).to(dtype)
        wt = w.t().contiguous()                                            # (K, N) for tilestack's gemm
        want = (x.float() @ w.float().T)
        q8, s8 = quantize_weight(w, "int8")
        qf, sf = quantize_weight(w, "fp8")
        xs = activation_scale(float(x.abs().max()))
        xq = torch.empty(M, K, device=device, dtype=torch.float8_e4m3fn)
        quantize_fp8_kernel(x, xq, inverse_scale(xs))
        yq = torch.empty(M, N, device=device, dtype=dtype)
        P = functools.partial
        fns = {
            "bf16-torch": P(F.linear, x, w),
            "bf16-tilestack": P(gemm, x, wt),
            "int8-w": P(quantized_linear, x, q8, s8),                  # qgemm_kernel, W widened in the loop
            "int8-w-transposed": P(_weight_only_transposed, x, q8, s8),
            "fp8-w": P(quantized_linear, x, qf, sf),
            "fp8-act": P(quantized_linear, x, qf, sf, x_scale=xs),     # the device's default (GPU: a pass, then fp8)
            "fp8-act-in-gemm": P(quantized_linear, x, qf, sf, x_scale=xs, act_quant="gemm"),   # qgemm_act_kernel
            "fp8-in": P(quantized_linear, xq, qf, sf, x_scale=xs),     # x in fp8 already (its producer quantized it)
            "fp8-act-gemm-only": P(qgemm_kernel, xq, qf, sf, sf, sf, yq, xs),   # writes yq, returns None
        }
        if device == "cuda":
            fns |= {v: P(quantized_linear, x, qf, sf, x_scale=xs, act_quant="gemm", backend="gluon", **opts)
                    for v, opts in GLUON_GEMM_VARIANTS.items()}
        fns = {v: f for v, f in fns.items() if variants is None or v in variants or v == "bf16-torch"}
        # each variant checked once, then every one timed in GEMM_ROUNDS alternating rounds (the median of the
        # rounds' medians), so that the GPU's clock and power state fall on bf16 cuBLAS and the fp8 GEMMs alike:
        # timed one after another the ratios moved by up to 7% between runs on the H200. On a GPU each time is of
        # 20 calls captured in a CUDA graph and replayed: kernel time (event-timed launches of these 12-60 us
        # kernels measure the host instead: bf16 cuBLAS read 35 us for its 17 us c_proj)
        checked = {}
        for variant, fn in fns.items():
            try:
                out = fn()
                out = yq if out is None else out
                checked[variant] = output_errors(out, want)
            except Exception as e:   # one variant's failure (a backend that cannot take it) must not hide the rest
                rows.append(dict(case="gemm", variant=variant, shape=f"{name} {M}x{K}x{N}",
                                 error=f"{type(e).__name__}: {str(e)[:300]}"))
        times = {v: [] for v in checked}
        for _ in range(1 if quick else GEMM_ROUNDS):
            for variant in list(times):
                try:
                    t = time_fn(fns[variant], args_sets=[()], budget_s=1.0 if quick else 0.4, device=device,
                                graph=device == "cuda")
                except Exception as e:   # capture refused, or the like
                    rows.append(dict(case="gemm", variant=variant, shape=f"{name} {M}x{K}x{N}",
                                     error=f"{type(e).__name__}: {str(e)[:300]}"))
                    del times[variant]
                    continue
                times[variant].append(t.median_s)
        base = statistics.median(times["bf16-torch"]) if times.get("bf16-torch") else None
        for variant, ts in times.items():
            err, norm_err = checked[variant]
            sec = statistics.median(ts)
            rows.append(dict(case="gemm", variant=variant, shape=f"{name} {M}x{K}x{N}", latency_ms=sec * 1e3,
                             tflops=2 * M * N * K / sec / 1e12,
                             speedup_vs_bf16=base / sec if base else float("nan"), rounds=len(ts),
                             spread=(max(ts) - min(ts)) / sec, max_rel_err=err, norm_rel_err=norm_err,
                             device=device))
        if sweep and not quick:
            best = None
            for cfg in SWEEP:
                try:
                    t = time_fn(functools.partial(qgemm_act_kernel, x, qf, sf, sf, sf, yq, xs, inverse_scale(xs),
                                                  **cfg), args_sets=[()], budget_s=0.5, device=device)
                except Exception:   # a config past the shared-memory or register limit
                    continue
                if best is None or t.median_s < best[0]:
                    best = (t.median_s, cfg)
            if best is not None:
                rows.append(dict(case="gemm", variant="fp8-gemm-best", shape=f"{name} {M}x{K}x{N}",
                                 latency_ms=best[0] * 1e3, tflops=2 * M * N * K / best[0] / 1e12,
                                 speedup_vs_bf16=base / best[0], max_rel_err=float("nan"),
                                 norm_rel_err=float("nan"), device=device,
                                 note=str(best[1])))
    return rows


# ---- the fused epilogue -------------------------------------------------------------------------------------------
def epilogue_shapes(quick: bool):
    """(name, M, K, N, activation, residual) of GPT-2 small's MLP at B x N = 8 x 1024 rows (prefill): c_fc + bias +
    GELU (tanh form, as GPT-2) and c_proj + bias + the residual add; and c_fc + GELU at 32 rows (a decode step of
    batch 32, where the weights' traffic and the launches dominate)."""
    if quick:
        return [("mlp.c_fc+gelu", 32, 32, 128, "gelu_tanh", False), ("mlp.c_proj+res", 32, 128, 32, None, True)]
    M, d = 8 * 1024, 768
    return [("mlp.c_fc+gelu", M, d, 4 * d, "gelu_tanh", False), ("mlp.c_proj+res", M, 4 * d, d, None, True),
            ("decode mlp.c_fc+gelu", 32, d, 4 * d, "gelu_tanh", False)]


def _linear_epilogue(activation: str | None, residual: bool):
    """The torch code a model runs: F.linear, then the activation, then the residual add."""
    def fn(x, w, b, r):
        y = F.linear(x, w, b)
        if activation == "gelu_tanh":
            y = F.gelu(y, approximate="tanh")
        return y + r if residual else y
    return fn


def run_epilogue_case(quick: bool) -> list[dict]:
    """Per GPT-2 MLP layer: torch eager, Inductor (default), tilestack's plain GEMM with the epilogue left to
    torch, tilestack's GEMM with the epilogue fused (kernels.gemm(..., bias=, activation=, residual=)), and the
    tilestack backend's rewrite of the eager code (linear_epilogue pass, the rest by Inductor)."""
    import tilestack
    import tilestack.compile as tc
    from tilestack.kernels import gemm
    from tilestack.kernels.gemm import torch_activation
    from tilestack.perf.timing import time_fn

    device = "cuda" if torch.cuda.is_available() and not quick else "cpu"
    dtype = torch.bfloat16
    rows = []
    for name, M, K, N, act, res in epilogue_shapes(quick):
        torch.manual_seed(0)
        x = torch.randn(M, K, device=device, dtype=dtype)
        w = (torch.randn(N, K, device=device) * K**-0.5).to(dtype)         # (out, in), as nn.Linear
        b = (0.1 * torch.randn(N, device=device)).to(dtype)
        r = torch.randn(M, N, device=device, dtype=dtype)
        wt = w.t().contiguous()                                            # (K, N) for the plain GEMM
        fn = _linear_epilogue(act, res)
        want = fn(x.float(), w.float(), b.float(), r.float())

        def unfused(x=x, wt=wt, b=b, r=r, act=act, res=res):
            y = torch_activation(gemm(x, wt) + b, act)
            return y + r if res else y

        torch._dynamo.reset()
        backend_fn = tilestack.optimize(fn)
        P = functools.partial
        fns = {
            "torch-eager": P(fn, x, w, b, r),
            "inductor": P(torch.compile(fn), x, w, b, r),
            "tilestack-unfused": unfused,
            "tilestack-fused": P(gemm, x, w.t(), bias=b, activation=act, residual=r if res else None),
            "tilestack-backend": P(backend_fn, x, w, b, r),
        }
        base = None
        for variant, f in fns.items():
            with torch.no_grad():
                out = f()
                note = ""
                if variant == "tilestack-backend":
                    note = str(dict(tc.last_report().swapped))
                err, norm_err = output_errors(out, want)
                t = time_fn(f, args_sets=[()], budget_s=1.0 if quick else 3.0, device=device)
            base = t.median_s if variant == "torch-eager" else base
            rows.append(dict(case="epilogue", variant=variant, shape=f"{name} {M}x{K}x{N}",
                             latency_ms=t.median_s * 1e3, tflops=2 * M * N * K / t.median_s / 1e12,
                             speedup_vs_eager=base / t.median_s, max_rel_err=err, norm_rel_err=norm_err,
                             device=device, note=note))
    return rows


# ---- the driver ---------------------------------------------------------------------------------------------------
def worker(case: str, variant: str, quick: bool, passes=None, sweep: bool = False, policy=None,
           gemm_variants=None) -> list[dict]:
    from tilestack import config

    if quick:   # tilestack's kernels on CPU tensors: the reference executor (the backend swaps only then)
        config.knobs.backend = "reference"
    try:
        if case == "gemm":
            return run_gemm_case(quick, sweep, gemm_variants)
        if case == "epilogue":
            return run_epilogue_case(quick)
        return [run_model_case(case, variant, quick, passes, policy)]
    except Exception as e:   # one failed case must not hide the others' results
        return [dict(case=case, variant=variant, error=f"{type(e).__name__}: {str(e)[:500]}")]


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _errs(r: dict) -> str:
    """The row's output errors against the reference: norm-relative (the bar's) and largest-relative."""
    return f"err norm {_fmt(r.get('norm_rel_err'), '.1e')} max {r['max_rel_err']:.1e}"


def print_results(rows: list[dict]) -> None:
    for case in dict.fromkeys(r["case"] for r in rows):
        print(f"\n== {case}")
        for r in (r for r in rows if r["case"] == case):
            if "error" in r:
                print(f"  {r.get('shape', '')} {r['variant']:<26} ERROR {r['error']}")
            elif case == "gemm":
                print(f"  {r['shape']:<28} {r['variant']:<18} {r['latency_ms']:8.3f} ms {r['tflops']:7.1f} TFLOP/s "
                      f"x{r['speedup_vs_bf16']:.2f} vs bf16  {_errs(r)} {r.get('note', '')}")
            elif case == "epilogue":
                print(f"  {r['shape']:<30} {r['variant']:<18} {r['latency_ms']:8.3f} ms {r['tflops']:7.1f} TFLOP/s "
                      f"x{r['speedup_vs_eager']:.2f} vs eager  {_errs(r)} {r['note']}")
            else:
                print(f"  {r['variant']:<26} compile {r['compile_s']:6.1f} s  {r['latency_ms']:9.3f} ms  "
                      f"{r['throughput']:12.1f} {r['unit']:<9} peak {_fmt(r['peak_gib'], '.2f')} GiB  "
                      f"{_errs(r)}  {r['swaps'] or ''} {r['note']}")


def check_bars(rows: list[dict]) -> list[str]:
    """The issue's bars for every model case that has a tilestack row (and for its CUDA-graph form, when run), then
    the fp8 GEMM's. The output bar is on the norm-relative error; the largest-relative one is printed beside it,
    with Inductor's own for scale (docs/inference.md says why)."""
    lines = []
    for case in MODEL_CASES:
        got = {r["variant"]: r for r in rows if r["case"] == case and "error" not in r}
        for variant in ("tilestack", "tilestack-reduce-overhead"):
            if variant not in got:
                continue
            ts = got[variant]["latency_ms"]
            if "eager" in got:
                s = got["eager"]["latency_ms"] / ts
                lines.append(f"{case}: {variant} {s:.2f}x eager ({'ok' if s >= SPEEDUP_EAGER else 'MISSED'}, bar "
                             f"{SPEEDUP_EAGER}x)")
            if "inductor" in got:
                s = got["inductor"]["latency_ms"] / ts
                lines.append(f"{case}: {variant} {s:.2f}x Inductor default ({'ok' if s >= 1.0 else 'MISSED'})")
            err, worst = got[variant].get("norm_rel_err"), got[variant]["max_rel_err"]
            ind = got.get("inductor", {}).get("max_rel_err")
            verdict = "no norm error recorded" if err is None else f"{'ok' if err <= OUT_TOL else 'MISSED'}"
            lines.append(f"{case}: {variant} output vs eager ||d||/||eager|| {_fmt(err, '.1e')} ({verdict}, bar "
                         f"{OUT_TOL}); max|d|/max|eager| {worst:.1e} (Inductor's {_fmt(ind, '.1e')}; no bar)")
            f32, eager_f32 = got[variant].get("f32_norm_rel_err"), got[variant].get("eager_f32_norm_rel_err")
            if f32 is not None:
                ind32 = got.get("inductor", {}).get("f32_norm_rel_err")
                lines.append(f"{case}: {variant} output vs the f32 model {f32:.1e}, eager bf16's own {eager_f32:.1e}, "
                             f"Inductor's {_fmt(ind32, '.1e')} (no bar: how far each is from the true answer)")
    for shape in dict.fromkeys(r["shape"] for r in rows if r["case"] == "epilogue" and "error" not in r):
        got = {r["variant"]: r["latency_ms"] for r in rows if r["case"] == "epilogue" and r.get("shape") == shape}
        if "tilestack-fused" in got and "inductor" in got:
            lines.append(f"epilogue {shape}: tilestack-fused {got['inductor'] / got['tilestack-fused']:.2f}x "
                         f"Inductor, {got['torch-eager'] / got['tilestack-fused']:.2f}x eager (no bar: a measure)")
    for r in rows:
        if r["case"] == "gemm" and r.get("variant") in FP8_BAR_VARIANTS and "error" not in r:
            s = r["speedup_vs_bf16"]
            lines.append(f"gemm {r['shape']}: {r['variant']} {s:.2f}x bf16 "
                         f"({'ok' if s >= FP8_SPEEDUP else 'MISSED'}, bar {FP8_SPEEDUP}x)")
    return lines


def _gemm_variants(a) -> list[str] | None:
    return a.gemm_variants.split(",") if a.gemm_variants else None


def _policy(a) -> dict:
    """The backend's size thresholds from the command line; at --quick's tiny sizes every swap is made (the run
    checks the kernels, not the policy) unless given."""
    default = 0 if a.quick else None
    got = {"min_rows": a.min_rows if a.min_rows is not None else default,
           "min_query_rows": a.min_query_rows if a.min_query_rows is not None else default,
           "measure": False if a.no_measure else None}
    return {k: v for k, v in got.items() if v is not None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--variants", default=None, help=f"comma-separated, from {VARIANTS}")
    ap.add_argument("--quick", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--in-process", action="store_true", help="run every case in this process")
    ap.add_argument("--json", "--out", default=None, help="write every row and the bars here")
    ap.add_argument("--time-limit", type=float, default=2400.0, help="seconds for the whole run: a case past it is "
                    "stopped and the cases after it skipped (their rows say so); default 40 minutes")
    ap.add_argument("--gemm-sweep", action="store_true", help="also search the fp8 GEMM's config (about a minute)")
    ap.add_argument("--passes", default=None, help="the tilestack backend's passes, comma-separated (default: all "
                    "of tilestack.compile.PASSES), e.g. norm,add_norm to leave attention to Inductor")
    ap.add_argument("--min-rows", type=int, default=None, help="the backend's row threshold (tilestack.compile.policy."
                    "MIN_ROWS by default; 0 under --quick): row-wise ops with fewer rows stay with Inductor")
    ap.add_argument("--min-query-rows", type=int, default=None, help="the backend's query-rows-per-head threshold "
                    "for attention (policy.MIN_QUERY_ROWS by default; 0 under --quick)")
    ap.add_argument("--no-measure", action="store_true", help="the backend swaps fused GEMMs unmeasured "
                    "(tilestack.compile.measure: by default a GPU's fused GEMM is swapped only where measured faster)")
    ap.add_argument("--gemm-variants", default=None, help="the gemm case's variants, comma-separated (default: all "
                    f"of {GEMM_VARIANTS + tuple(GLUON_GEMM_VARIANTS)}; bf16-torch always runs, as the baseline)")
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        passes = a.passes.split(",") if a.passes else None
        print("RESULT " + json.dumps(worker(a.worker[0], a.worker[1], a.quick, passes, a.gemm_sweep,
                                            _policy(a), _gemm_variants(a))))
        return 0
    cases = [c for c in a.cases.split(",") if c]
    variants = a.variants.split(",") if a.variants else list(QUICK_VARIANTS if a.quick else VARIANTS)
    bad = [c for c in cases if c not in CASES] + [v for v in variants if v not in VARIANTS] + [
        v for v in (_gemm_variants(a) or []) if v not in GEMM_VARIANTS and v not in GLUON_GEMM_VARIANTS]
    if bad:
        ap.error(f"unknown cases or variants {bad}; cases: {CASES}, variants: {VARIANTS}")
    jobs = [(c, v) for c in cases for v in (["-"] if c in KERNEL_CASES else variants)
            if not (v in QUANT_VARIANTS and not c.startswith("gpt2"))]
    rows: list[dict] = []
    deadline = time.monotonic() + a.time_limit
    for case, variant in jobs:
        left = deadline - time.monotonic()
        if left <= 0:
            rows.append(dict(case=case, variant=variant, error=f"skipped: --time-limit {a.time_limit:g} s reached"))
            continue
        print(f"[bench_inference] {case} {variant}", file=sys.stderr, flush=True)
        if a.in_process:
            rows += worker(case, variant, a.quick, a.passes.split(",") if a.passes else None, a.gemm_sweep,
                           _policy(a), _gemm_variants(a))
            continue
        cmd = [sys.executable, __file__, "--worker", case, variant] + (["--quick"] if a.quick else []) + (
            ["--passes", a.passes] if a.passes else []) + (["--gemm-sweep"] if a.gemm_sweep else []) + [
            f"--{k.replace('_', '-')}={v}" for k, v in (("min_rows", a.min_rows), ("min_query_rows", a.min_query_rows))
            if v is not None] + (["--gemm-variants", a.gemm_variants] if a.gemm_variants else []) + (
            ["--no-measure"] if a.no_measure else [])
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            rows.append(dict(case=case, variant=variant, error=f"stopped: --time-limit {a.time_limit:g} s reached"))
            continue
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not lines:
            rows.append(dict(case=case, variant=variant, error=f"exit {p.returncode}: {p.stderr[-500:]}"))
        else:
            rows += json.loads(lines[-1][len("RESULT "):])
    bars = check_bars(rows)
    if bars:
        print("\n== bars\n  " + "\n  ".join(bars))
    print_results(rows)                              # the table last
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(rows=rows, bars=bars, argv=sys.argv[1:], torch=torch.__version__), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
