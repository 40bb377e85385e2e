"""The benchmark cases of ``tilestack bench``: each library kernel beside its PyTorch baseline.

    for case in cases(device_kind="cuda", full=True): ...

A case knows how to make fresh inputs at its size, run tilestack and the baseline on them, the traced kernel
whose IR gives tilestack's FLOPs and bytes, the baseline's formula cost, and a correctness check at a small
ragged size against the reference executor and float64 PyTorch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from tilestack.kernels import (
    attention_fwd,
    gemm,
    gemm_kernel,
    layer_norm,
    layer_norm_kernel,
    softmax,
    softmax_kernel,
)
from tilestack.kernels.gemm import gemm_config
from tilestack.kernels.softmax import row_config
from tilestack.perf import formulas
from tilestack.perf.device import GPU_COPY_BYTES
from tilestack.tune.lookup import launch_config

POISON = float("nan")
BACKEND = "triton"   # what is timed: the GPU, or Triton's interpreter on a CPU (never the reference executor)


@dataclasses.dataclass
class Case:
    """One row of the suite. A kernel case counts tilestack's FLOPs and bytes from its traced IR (``traced``,
    ``cost_args``); a model step counts them by formula (``ours_cost``). ``baseline_cost`` None: the same as ours."""

    name: str                                   # "attention_fwd", "gpt2_step"
    shape: str                                  # what a person reads in the table; with ``name``, the case's key
    make: Callable[[str], dict]                 # device -> fresh inputs (and preallocated outputs)
    ours: Callable[[dict], Any]                 # runs tilestack on the inputs
    baseline_name: str
    baseline: Callable[[dict], Any]
    baseline_cost: Callable[[], Any] | None     # perf.formulas.Cost
    check: Callable[[str], dict]                # device -> {"vs_float64": err, "vs_reference": err, "tol": tol}
    traced: Callable[[dict], Any] | None = None         # the TracedKernel (for the IR's cost)
    cost_args: Callable[[dict], tuple] | None = None    # arguments of traced.cost
    ours_cost: Callable[[dict], Any] | None = None      # inputs -> perf.formulas.Cost, where there is no IR
    items: float | None = None
    item_name: str = "items"
    config: dict = dataclasses.field(default_factory=dict)
    dtype: str = "bf16"                         # of the inputs: the roofs it is placed under
    rotate: bool = True                         # fresh inputs per call, rotated past the caches (kernels)


def _rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not bool(a.isfinite().all()):
        return math.inf                         # NaN never passes (outputs start poisoned)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _check(run_ours: Callable[[str], Any], ref64, device: str, tol: float) -> dict:
    """Run ours through the Triton backend (the GPU, or Triton's interpreter on a CPU) and through the reference
    executor; compare both with float64 and with each other."""
    ours = run_ours(BACKEND)
    reference = run_ours("reference")
    return {"vs_float64": _rel(ours, ref64), "vs_reference": _rel(ours, reference),
            "reference_vs_float64": _rel(reference, ref64), "tol": tol}


# ---- GEMM ---------------------------------------------------------------------------------------------------
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16"}


def gemm_case(device: str, m: int, n: int, k: int, config: dict, dtype: str = "bf16") -> Case:
    import torch

    tdt = getattr(torch, DTYPE_NAMES[dtype])

    def make(dev):
        a = torch.randn(m, k, dtype=tdt, device=dev)
        b = torch.randn(k, n, dtype=tdt, device=dev)
        return {"a": a, "b": b, "c": torch.full((m, n), POISON, dtype=tdt, device=dev)}

    def check(dev):
        cm, cn, ck = 67, 45, 50                  # ragged: no multiple of any tile
        a = torch.randn(cm, ck, dtype=tdt, device=dev)
        b = torch.randn(ck, cn, dtype=tdt, device=dev)
        small = dict(BM=32, BN=32, BK=32, GROUP_M=4, num_warps=4, num_stages=2)

        def run(backend):
            out = torch.full((cm, cn), POISON, dtype=tdt, device=dev)
            return gemm(a, b, out=out, backend=backend, **small)
        return _check(run, a.double() @ b.double(), dev, 1e-2)

    return Case(
        "gemm", f"{m}x{n}x{k} {dtype}", make,
        ours=lambda x: gemm_kernel(x["a"], x["b"], x["c"], **config, backend=BACKEND),
        traced=lambda x: gemm_kernel.trace(x["a"], x["b"], x["c"], **config),
        cost_args=lambda x: (x["a"], x["b"], x["c"]),
        baseline_name="torch.matmul (cuBLAS)" if device == "cuda" else "torch.matmul",
        baseline=lambda x: torch.matmul(x["a"], x["b"]),
        baseline_cost=lambda: formulas.matmul(m, n, k, dtype),
        check=check, config=config, dtype=dtype)


# ---- row softmax and layer norm --------------------------------------------------------------------------------
def softmax_case(device: str, rows: int, cols: int, config: dict) -> Case:
    import torch

    def make(dev):
        x = torch.randn(rows, cols, dtype=torch.bfloat16, device=dev)
        return {"x": x, "y": torch.full_like(x, POISON)}

    def check(dev):
        x = torch.randn(37, 300, dtype=torch.float32, device=dev)
        small = dict(BM=4, BN=128, num_warps=4, num_stages=1)

        def run(backend):
            return softmax(x, out=torch.full_like(x, POISON), backend=backend, **small)
        return _check(run, torch.softmax(x.double(), -1), dev, 1e-5)

    return Case(
        "softmax", f"{rows}x{cols} bf16", make,
        ours=lambda x: softmax_kernel(x["x"], x["y"], **config, backend=BACKEND),
        traced=lambda x: softmax_kernel.trace(x["x"], x["y"], **config),
        cost_args=lambda x: (x["x"], x["y"]),
        baseline_name="torch.softmax", baseline=lambda x: torch.softmax(x["x"], -1),
        baseline_cost=lambda: formulas.softmax(rows, cols, "bf16"),
        check=check, items=rows, item_name="rows", config=config)


def layer_norm_case(device: str, rows: int, cols: int, config: dict) -> Case:
    import torch

    def make(dev):
        x = torch.randn(rows, cols, dtype=torch.bfloat16, device=dev)
        w = torch.randn(cols, dtype=torch.bfloat16, device=dev)
        b = torch.randn(cols, dtype=torch.bfloat16, device=dev)
        f32 = dict(dtype=torch.float32, device=dev)
        return {"x": x, "w": w, "b": b, "y": torch.full_like(x, POISON), "mean": torch.empty(rows, **f32),
                "rstd": torch.empty(rows, **f32)}

    def args(x):
        return (x["x"], x["w"], x["b"], x["y"], x["mean"], x["rstd"], 1e-5)

    def check(dev):
        x = torch.randn(37, 300, device=dev)
        w, b = torch.randn(300, device=dev), torch.randn(300, device=dev)
        small = dict(BM=4, BN=128, num_warps=4, num_stages=1)

        def run(backend):
            return layer_norm(x, w, b, backend=backend, **small)[0]
        ref = torch.nn.functional.layer_norm(x.double(), (300,), w.double(), b.double(), 1e-5)
        return _check(run, ref, dev, 1e-5)

    return Case(
        "layer_norm", f"{rows}x{cols} bf16", make,
        ours=lambda x: layer_norm_kernel(*args(x), **config, backend=BACKEND),
        traced=lambda x: layer_norm_kernel.trace(*args(x), **config),
        cost_args=args,
        baseline_name="F.layer_norm",
        baseline=lambda x: torch.nn.functional.layer_norm(x["x"], (cols,), x["w"], x["b"], 1e-5),
        baseline_cost=lambda: formulas.layernorm(rows, cols, "bf16"),
        check=check, items=rows, item_name="rows", config=config)


# ---- attention forward --------------------------------------------------------------------------------------------
def attention_case(device: str, B: int, H: int, N: int, D: int, causal: bool, config: dict) -> Case:
    import torch

    scale = 1.0 / math.sqrt(D)

    def make(dev):
        q, k, v = (torch.randn(B, H, N, D, dtype=torch.bfloat16, device=dev) for _ in range(3))
        return {"q": q, "k": k, "v": v, "o": torch.full_like(q, POISON),
                "lse": torch.empty(B, H, N, dtype=torch.float32, device=dev)}

    def args(x):
        return (x["q"], x["k"], x["v"], x["o"], x["lse"], scale)

    def check(dev):
        q = torch.randn(2, 4, 77, D, dtype=torch.bfloat16, device=dev)
        k = torch.randn(2, 2, 90, D, dtype=torch.bfloat16, device=dev)   # GQA and Nk != Nq, both ragged
        v = torch.randn(2, 2, 90, D, dtype=torch.bfloat16, device=dev)
        small = dict(BM=32, BN=32, num_warps=4, num_stages=2)

        def run(backend):
            return attention_fwd.attention_forward(q, k, v, causal, backend=backend, **small)[0]
        return _check(run, attention_fwd.reference(q, k, v, causal)[0], dev, 1e-2)

    def baseline(x):
        if device != "cuda":
            return torch.nn.functional.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=causal)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=causal)

    default = attention_fwd.default_config(D, causal, device)
    cfg = launch_config("attention_fwd", f"bfloat16-D{D}-{'causal' if causal else 'full'}", device, N, default) | config
    return Case(
        "attention_fwd", f"B={B} H={H} N={N} D={D}{' causal' if causal else ''} bf16", make,
        ours=lambda x: attention_fwd.attention_fwd_kernel(*args(x), D=D, causal=causal, **cfg, backend=BACKEND),
        traced=lambda x: attention_fwd.attention_fwd_kernel.trace(*args(x), D=D, causal=causal, **cfg),
        cost_args=args,
        baseline_name="SDPA FLASH_ATTENTION (FA2)" if device == "cuda" else "SDPA (math, CPU)",
        baseline=baseline,
        baseline_cost=lambda: formulas.attention(B, H, N, N, D, "bf16", causal=causal),
        check=check, items=B * N, item_name="tokens", config=cfg)


# ---- attention through the public op, forward and backward ---------------------------------------------------------
def attention_train_case(device: str, B: int, H: int, N: int, D: int, causal: bool) -> Case:
    """``tilestack.attention`` forward and backward as a user calls it (host cost included, configs as the op picks
    them), against SDPA's; FLOPs by formula (forward, and backward 2.5x that)."""
    import torch

    from tilestack import config as ts_config
    from tilestack.torch.attention import attention

    def make(dev):
        q, k, v = (torch.randn(B, H, N, D, dtype=torch.bfloat16, device=dev, requires_grad=True) for _ in range(3))
        return {"q": q, "k": k, "v": v, "do": torch.randn(B, H, N, D, dtype=torch.bfloat16, device=dev)}

    def step(fn, x):
        o = fn(x["q"], x["k"], x["v"])
        q, k, v = torch.autograd.grad(o, (x["q"], x["k"], x["v"]), x["do"])
        return o, q, k, v

    def ours(x, backend=BACKEND):
        with ts_config.override(backend=backend):
            return step(lambda q, k, v: attention(q, k, v, causal=causal), x)

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def baseline(x):
        if device != "cuda":
            return step(sdpa, x)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return step(sdpa, x)

    def check(dev):
        x = {"q": torch.randn(1, 2, 77, D, dtype=torch.bfloat16, device=dev, requires_grad=True),   # ragged
             "k": torch.randn(1, 2, 77, D, dtype=torch.bfloat16, device=dev, requires_grad=True),
             "v": torch.randn(1, 2, 77, D, dtype=torch.bfloat16, device=dev, requires_grad=True),
             "do": torch.randn(1, 2, 77, D, dtype=torch.bfloat16, device=dev)}
        x64 = {k: t.detach().double().requires_grad_(t.requires_grad) for k, t in x.items()}
        cat = lambda ts: torch.cat([t.flatten() for t in ts])  # noqa: E731  (output and the three gradients)
        want = cat(step(sdpa, x64))
        got, reference = cat(ours(x)), cat(ours(x, "reference"))
        return {"vs_float64": _rel(got, want), "vs_reference": _rel(got, reference),
                "reference_vs_float64": _rel(reference, want), "tol": 1e-2}

    cost = lambda: sum((formulas.attention(B, H, N, N, D, "bf16", causal=causal, backward=bw)  # noqa: E731
                        for bw in (False, True)), formulas.Cost(0.0, 0.0, 0.0))
    return Case(
        "attention_train", f"B={B} H={H} N={N} D={D}{' causal' if causal else ''} bf16", make,
        ours=ours, ours_cost=lambda x: cost(), baseline_cost=cost,
        baseline_name="SDPA FLASH_ATTENTION (FA2), fwd+bwd" if device == "cuda" else "SDPA (CPU), fwd+bwd",
        baseline=baseline, check=check, items=B * N, item_name="tokens", config={"op": "tilestack.attention"})


def cases(device: str, full: bool = True, models: bool = True) -> list[Case]:
    """The suite: full sizes on a GPU; small sizes on a CPU (Triton's interpreter is slow). The library's kernels,
    then (``models``) whole training steps of two language models (:mod:`tilestack.bench.steps`)."""
    from tilestack.bench.steps import step_cases

    return kernel_cases(device, full) + (step_cases(device, full) if models else [])


def kernel_cases(device: str, full: bool = True) -> list[Case]:
    """A case per library kernel: full sizes on a GPU, small ones on a CPU."""
    import torch

    if device == "cuda" and full:
        # GEMM: issue 8's bar is >= 1.0x cuBLAS at 4096^3 and 8192^3, bf16 and fp16
        return [
            *(gemm_case(device, n, n, n, gemm_config(n, n, n, getattr(torch, DTYPE_NAMES[dt]), device), dt)
              for n in (4096, 8192) for dt in ("bf16", "fp16")),
            softmax_case(device, 8192, 8192, launch_config("softmax", "bfloat16", device, 8192,
                                                           row_config(8192, device))),
            layer_norm_case(device, 8192, 8192, launch_config("layer_norm", "bfloat16", device, 8192,
                                                                 row_config(8192, device))),
            # the same rows at the copy ceiling's traffic (perf.device.GPU_COPY_BYTES read, as many written): the
            # ratio to that ceiling without a launch's fixed cost in it (at 8192^2 that cost holds layer norm at
            # 89% of the ceiling and 95% of a copy of its own bytes: H200, docs/performance.md, session 15)
            *(case(device, GPU_COPY_BYTES // (8192 * 2), 8192,
                   launch_config(name, "bfloat16", device, 8192, row_config(8192, device)))
              for name, case in (("softmax", softmax_case), ("layer_norm", layer_norm_case))),
            attention_case(device, 4, 16, 4096, 128, False, {}),
            attention_case(device, 4, 16, 4096, 128, True, {}),
            attention_case(device, 8, 32, 2048, 64, False, {}),
            attention_train_case(device, 4, 16, 4096, 128, True),
            attention_train_case(device, 8, 32, 2048, 64, False),
        ]
    small = dict(num_warps=4, num_stages=1)
    return [
        gemm_case(device, 128, 96, 80, dict(BM=32, BN=32, BK=32, GROUP_M=4) | small),
        softmax_case(device, 64, 300, dict(BM=4, BN=128) | small),
        layer_norm_case(device, 64, 300, dict(BM=4, BN=128) | small),
        attention_case(device, 1, 2, 96, 64, False, dict(BM=32, BN=32) | small),
        attention_case(device, 1, 2, 96, 64, True, dict(BM=32, BN=32) | small),
        attention_train_case(device, 1, 2, 96, 64, True),
    ]


