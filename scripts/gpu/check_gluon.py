"""Check and time the Gluon backend on a Hopper GPU (H100/H200): correctness against float64 torch on ragged
shapes, then kernel time against cuBLAS (torch.matmul) and the Triton backend.

    PYTHONPATH=src python3 scripts/gpu/check_gluon.py --json gluon.json            # at most --time-limit (170 s)
    PYTHONPATH=src python3 scripts/gpu/check_gluon.py --json quick.json --quick     # a first look, ~1-2 min
    # everything fits two bounded runs: correctness, then the timings
    PYTHONPATH=src python3 scripts/gpu/check_gluon.py --json check.json --skip attn_bwd,fp8,bench,attn_bench
    PYTHONPATH=src python3 scripts/gpu/check_gluon.py --json bench.json --skip gemm,gemm_ws,attention,attn_lib
    PYTHONPATH=src python3 scripts/gpu/check_gluon.py --json gluon.json --dump gluon_sass/   # + PTX/SASS

Sections (each case runs on its own; a failure is recorded with its traceback and the next one runs):
  gemm       kernels.gemm's kernel on the gluon backend (pipelined TMA ring + wgmma; warp-specialized by the
             backend's pass: producer/consumer partitions; and persistent too), bf16 and fp16, ragged
  gemm_ws    the hand-scheduled warp-specialized GEMM of tests/backends/test_gluon_source.py (producer and
             consumer partitions, setmaxnreg), ragged
  attention  the explicit attention forward of tests/lang/test_explicit.py (a producer and two ping-pong
             consumer partitions) and the FA3-scheduled one of tests/backends/test_gluon_source.py (the next
             block's scores on wgmma under this block's softmax), bf16, head dims 64 and 128, ragged lengths
  attn_lib   the library's attention forward (kernels.attention_fwd, a plain kernel the schedule pass pipelines)
             on the gluon backend: causal (both alignments) and not, GQA, head dims 64 and 128, bf16 and fp16,
             ragged lengths; o and lse against float64
  attn_bwd   the library attention backward (delta, dK/dV, dQ kernels) on gluon: gradients against float64 autograd
             (causal and not, hd 64 and 128, ragged), then at N=4096 against SDPA's cuDNN backward
  fp8        tilestack.quant's GEMM with e4m3 operands on gluon (QGMMA): ragged shapes against float64 of the
             fp8 values, then 8192^3 against torch._scaled_mm (cuBLASLt fp8) and bf16 cuBLAS
  bench      4096^3 and 8192^3, bf16 and fp16: gluon (a few stage/tile configs, the best kept), gluon_ws,
             triton backend, torch.matmul (cuBLAS); kernel time by triton.testing.do_bench (median), TFLOP/s
  attn_bench the FA3 grid at N=4096 (B*N = 16k, H*D = 2048), bf16, causal and not: the library attention on
             gluon and on triton, the explicit attention on gluon, SDPA's cuDNN and flash backends
A case's output tensor starts as NaN, so a tile the kernel never writes fails the check. Each section runs in
a child process killed after SECTION_MAX_S (a hung kernel cannot stall the run); the whole is bounded by
--time-limit (default 170 s): cases past it are recorded as skipped. The last thing printed is a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from tilestack.kernels.gemm import gemm_config, gemm_kernel  # noqa: E402

SECTIONS = ("gemm", "gemm_ws", "attention", "attn_lib", "attn_bwd", "fp8", "bench", "attn_bench")
# (M, N, K): ragged edges on every axis; one tile, a sub-tile problem, more k-steps than ring stages, a wide one;
# N and K multiples of 8 (the copy engine's 16-byte row rule for 2-byte dtypes) except the last two
GEMM_SHAPES = [(128, 128, 64), (1, 8, 8), (257, 136, 72), (1000, 520, 1032), (300, 1024, 4096), (2048, 2048, 512),
               (130, 24, 13), (77, 9, 40)]   # rows not 16-byte aligned: no copy engine, pointers into shared
# (B, H, Nq, Nk, D): ragged lengths, fewer keys than one block, more than the ring
ATTN_SHAPES = [(1, 2, 128, 128, 64), (2, 3, 300, 257, 64), (1, 2, 1, 40, 64), (2, 2, 513, 1000, 128),
               (1, 4, 1024, 1024, 128)]
# (B, H, Hkv, Nq, Nk, D, causal, causal_align, dtype)
ATTN_LIB_CASES = [(2, 4, 4, 300, 257, 64, False, "top_left", "bfloat16"), (1, 4, 2, 513, 1000, 128, True, "top_left",
                  "bfloat16"), (2, 2, 2, 200, 333, 64, True, "bottom_right", "float16"),
                  (1, 8, 2, 1024, 1024, 128, True, "top_left", "float16"), (1, 2, 1, 1, 77, 64, False, "top_left",
                                                                             "bfloat16")]
# gluon configs for the library attention: 128 query rows over two warpgroups, K/V rings of 3 (2 at hd 128)
ATTN_LIB_CONFIG = {64: dict(BM=128, BN=128, num_warps=8, num_stages=3),
                   128: dict(BM=128, BN=64, num_warps=8, num_stages=3)}
BENCH_SIZES = (4096, 8192)
ATTN_BENCH = [(4, 32, 4096, 64), (4, 16, 4096, 128)]   # (B, H, N, D): B*N = 16k, H*D = 2048
# the library's ping-pong attention (kernels.attention_fwd_pingpong, BM = 128: two consumers of 64 rows) by head
# dim: key blocks and ring stages that compile without spills (hd128 causal at BN 128 spills 8 words)
PINGPONG_ATTN_CONFIGS = {64: [dict(BN=128, STAGES=2), dict(BN=128, STAGES=3), dict(BN=64, STAGES=3)],
                         128: [dict(BN=64, STAGES=2), dict(BN=64, STAGES=3), dict(BN=128, STAGES=2)]}
# the ping-pong GEMM's (BM, BN, BK, STAGES) a consumer: its tile's accumulator fits 168 registers, both consumers'
# rings and epilogue buffers fit 227 KiB (tests/backends/test_gluon_gemm_pingpong.py compiles each)
PINGPONG_CONFIGS = [dict(BM=128, BN=128, BK=64, STAGES=2), dict(BM=64, BN=256, BK=64, STAGES=2),
                    dict(BM=128, BN=128, BK=32, STAGES=4)]
GEMM_CONFIGS = [dict(BM=128, BN=128, BK=64, num_stages=4), dict(BM=128, BN=256, BK=64, num_stages=3),
                dict(BM=128, BN=128, BK=64, num_stages=3),
                dict(BM=128, BN=128, BK=64, num_stages=4, warp_specialize=True),
                dict(BM=128, BN=256, BK=64, num_stages=3, warp_specialize=True),
                dict(BM=128, BN=128, BK=64, num_stages=4, warp_specialize=True, persistent=True),
                dict(BM=128, BN=256, BK=64, num_stages=3, warp_specialize=True, persistent=True)]
# errors against float64, relative to the largest reference element: the output's rounding (bf16: 2^-8,
# fp16: 2^-11) plus f32 accumulation, with room; cuBLAS's own error is recorded beside each
GEMM_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
ATTN_TOL = 2e-2
QUICK = False           # --quick: a few cases a section (a first look at whether it works at all)
SECTION_MAX_S = 60      # a section's child process is killed past this (or past the time left)
SECTION_MIN_S = 10      # a section is not started with less time than this left
SECTION_GRACE_S = 8     # the child stops starting cases this long before it would be killed


def few(cases: list) -> list:
    """All the cases, or with --quick the first and the last."""
    return cases if not QUICK or len(cases) <= 2 else [cases[0], cases[-1]]


def load_test_module(relpath: str, name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str((ROOT / relpath).parent))
    spec.loader.exec_module(module)
    return module


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| in float64; inf if out has a NaN or an inf where ref has none."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    scale = ref.abs().max().item() or 1.0
    return (out - ref).abs().max().item() / scale


class Runner:
    def __init__(self, limit: float, sink: Path | None = None):
        self.t0 = time.time()
        self.limit = limit
        self.rows: list[dict] = []
        self.sink = sink        # rewritten after every case: a killed child leaves what it finished

    def case(self, section: str, name: str, fn) -> None:
        row = {"section": section, "case": name}
        if time.time() - self.t0 > self.limit:
            row.update(status="skipped", detail="past --time-limit")
        else:
            t = time.time()
            try:
                row.update(fn())
                row.setdefault("status", "ok")
            except Exception as e:   # recorded, and the next case runs
                row.update(status="error", detail=f"{type(e).__name__}: {e}"[:400],
                           traceback=traceback.format_exc()[-3000:])
            row["seconds"] = round(time.time() - t, 2)
        self.rows.append(row)
        if self.sink is not None:
            self.sink.write_text(json.dumps({"results": self.rows}, default=str))
        print(f"[{row['status']:>7}] {section:<9} {name:<40} {row.get('detail', '')[:100]}", flush=True)


def check_gemm(kernel, a, b, tol, **cfg) -> dict:
    c = torch.full((a.shape[0], b.shape[1]), float("nan"), dtype=a.dtype, device=a.device)
    kernel(a, b, c, backend="gluon", **cfg)
    torch.cuda.synchronize()
    ref = a.double() @ b.double()
    err = rel_err(c, ref)
    cublas = rel_err(a @ b, ref)
    ok = err <= tol
    return {"status": "ok" if ok else "FAIL", "rel_err": err, "cublas_rel_err": cublas,
            "detail": f"rel err {err:.2e} (cuBLAS {cublas:.2e}, tol {tol:.0e})"}


def gemm_cases(run: Runner, section: str, kernel) -> None:
    """Ragged GEMMs; kernels.gemm's kernel also with its loop warp-specialized by the backend's pass."""
    g = torch.Generator(device="cuda").manual_seed(0)
    variants = ({}, {"warp_specialize": True}, {"warp_specialize": True, "persistent": True}) \
        if section == "gemm" else ({},)
    for dtype in (torch.bfloat16, torch.float16) if section == "gemm" else (torch.bfloat16,):
        for opts in variants if dtype is torch.bfloat16 else variants[:1]:   # fp16: the plain schedule
            for m, n, k in few(GEMM_SHAPES):
                def one(m=m, n=n, k=k, dtype=dtype, opts=opts):
                    a = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
                    b = torch.randn(k, n, device="cuda", dtype=dtype, generator=g)
                    return check_gemm(kernel, a, b, GEMM_TOL[dtype], **opts)
                tag = "".join(f" {name}" for name in opts)
                run.case(section, f"{str(dtype)[6:]} {m}x{n}x{k}{tag}", one)


# (M, N, K, dtype, bias, activation, residual, out_dtype, b stored transposed)
EPILOGUE_CASES = [(257, 136, 72, "bfloat16", True, "gelu", True, None, False),
                  (1000, 520, 1032, "float16", True, "silu", False, "float32", False),
                  (300, 264, 520, "bfloat16", False, "relu", True, None, True),
                  (128, 128, 64, "bfloat16", True, "gelu_tanh", False, None, False)]
GLUON_GEMM = dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=4)   # through the public op (its tuned table
#                                                                        is the Triton backend's)


def epilogue_cases(run: Runner) -> None:
    """The public gemm with fused epilogues on the gluon backend (gemm_epilogue_kernel), against float64."""
    gemm_mod = importlib.import_module("tilestack.kernels.gemm")   # the module (the package exports the function)
    g = torch.Generator(device="cuda").manual_seed(3)
    for m, n, k, dt, has_bias, act, has_res, out_dt, trans in few(EPILOGUE_CASES):
        def one(m=m, n=n, k=k, dt=dt, has_bias=has_bias, act=act, has_res=has_res, out_dt=out_dt, trans=trans):
            dtype = getattr(torch, dt)
            a = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
            b = torch.randn(n, k, device="cuda", dtype=dtype, generator=g).t() if trans else \
                torch.randn(k, n, device="cuda", dtype=dtype, generator=g)
            bias = torch.randn(n, device="cuda", dtype=dtype, generator=g) if has_bias else None
            res = torch.randn(m, n, device="cuda", dtype=dtype, generator=g) if has_res else None
            out_dtype = getattr(torch, out_dt) if out_dt else None
            c = gemm_mod.gemm(a, b, bias=bias, activation=act, residual=res, out_dtype=out_dtype, backend="gluon",
                              **GLUON_GEMM)
            torch.cuda.synchronize()
            y = a.double() @ b.double() + (bias.double() if has_bias else 0)
            y = gemm_mod.torch_activation(y, act) + (res.double() if has_res else 0)
            err = rel_err(c, y)
            tol = GEMM_TOL[out_dtype or dtype] if (out_dtype or dtype) in GEMM_TOL else 1e-3
            return {"status": "ok" if err <= tol else "FAIL", "rel_err": err,
                    "detail": f"rel err {err:.2e} (tol {tol:.0e})"}
        tag = f"{dt} {m}x{n}x{k} {'bias ' if has_bias else ''}{act}{' residual' if has_res else ''}" \
              f"{' -> ' + out_dt if out_dt else ''}{' b^T' if trans else ''}"
        run.case("gemm", f"epilogue {tag}", one)


FP8_SHAPES = [(257, 136, 128), (1000, 520, 1024), (128, 128, 128)]   # K a multiple of 16: TMA's row rule
FP8_CONFIGS = [dict(BM=128, BN=128, BK=128, num_stages=4), dict(BM=128, BN=256, BK=128, num_stages=3),
               dict(BM=128, BN=128, BK=128, num_stages=4, warp_specialize=True),
               dict(BM=128, BN=256, BK=128, num_stages=3, warp_specialize=True, persistent=True)]


def fp8_cases(run: Runner) -> None:
    from triton.testing import do_bench

    from tilestack.quant.gemm import qgemm_kernel

    f8 = torch.float8_e4m3fn
    g = torch.Generator(device="cuda").manual_seed(4)

    def operands(m, n, k):
        x = torch.randn(m, k, device="cuda", generator=g).to(f8)
        w = torch.randn(n, k, device="cuda", generator=g).to(f8)
        s = torch.ones(n, device="cuda")
        return x, w, s, torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)

    for m, n, k in few(FP8_SHAPES):
        for cfg in FP8_CONFIGS[:1] + FP8_CONFIGS[2:3]:
            def one(m=m, n=n, k=k, cfg=cfg):
                x, w, s, y = operands(m, n, k)
                qgemm_kernel(x, w, s, s, y, y, 1.0, backend="gluon", **cfg)     # Bias, R: not read
                torch.cuda.synchronize()
                err = rel_err(y, x.double() @ w.double().t())
                return {"status": "ok" if err <= GEMM_TOL[torch.bfloat16] else "FAIL", "rel_err": err,
                        "detail": f"rel err {err:.2e} (tol {GEMM_TOL[torch.bfloat16]:.0e})"}
            run.case("fp8", f"e4m3 {m}x{n}x{k}{' ws' if cfg.get('warp_specialize') else ''}", one)
    n = 8192
    flops = 2 * n**3
    x, w, s, y = operands(n, n, n)
    a16, b16 = x.to(torch.bfloat16), w.to(torch.bfloat16).t()
    best: dict[str, float] = {}

    def timed(impl, fn, launcher=None, **extra):
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        best[impl] = min(ms, best.get(impl, math.inf))
        report = kernel_report(Timed(fn, launcher), f"fp8 {n}", impl) if launcher is not None else {}
        return {"impl": impl, "ms": ms, "tflops": flops / ms / 1e9, **extra, **report,
                "detail": f"{ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s"}

    one = torch.ones((), device="cuda")
    run.case("fp8", f"{n}^3 cublas bf16", lambda: timed("cublas_bf16", lambda: torch.matmul(a16, b16)))
    run.case("fp8", f"{n}^3 torch._scaled_mm", lambda: timed("scaled_mm", lambda: torch._scaled_mm(
        x, w.t(), one, one, out_dtype=torch.bfloat16)))
    for cfg in few(FP8_CONFIGS):
        def gluon(cfg=cfg):
            launch = qgemm_kernel.launcher_for((x, w, s, s, y, y, 1.0), "gluon", **cfg)
            return timed("gluon", lambda: launch((x, w, s, s, y, y, 1.0)), launch, config=cfg)
        run.case("fp8", f"{n}^3 gluon {cfg}", gluon)
    if "cublas_bf16" in best:
        ratios = {i: best["cublas_bf16"] / ms for i, ms in best.items() if i != "cublas_bf16"}
        run.rows.append({"section": "fp8", "case": f"{n}^3 vs bf16 cuBLAS", "status": "ok",
                         **{f"{i}_vs_bf16_cublas": r for i, r in ratios.items()},
                         "detail": ", ".join(f"{i} {r:.2f}x" for i, r in ratios.items())})


def attention_cases(run: Runner, attention, fa3) -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    kernels = (("explicit", attention, {}), ("fa3", fa3, {}), ("fa3 causal", fa3, {"CAUSAL": True}))
    for (b, h, nq, nk, d), (name, kernel, opts) in itertools.product(few(ATTN_SHAPES), kernels):
        if opts and nq > nk:
            continue        # the causal kernel is top-left aligned: Nq <= Nk
        def one(b=b, h=h, nq=nq, nk=nk, d=d, kernel=kernel, opts=opts):
            q = torch.randn(b, h, nq, d, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(b, h, nk, d, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(b, h, nk, d, device="cuda", dtype=torch.bfloat16, generator=g)
            o = torch.full_like(q, float("nan"))
            scale = 1 / math.sqrt(d)
            bn = 64 if opts and d == 128 else 128     # the causal mask's arithmetic needs registers at hd 128
            kernel(q, k, v, o, scale, backend="gluon", BM=128, BN=bn, D=d, STAGES=2, **opts)
            torch.cuda.synchronize()
            s = (q.double() @ k.double().transpose(-1, -2)) * scale
            if opts:
                s = s.masked_fill(torch.ones(nq, nk, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
            ref = torch.softmax(s, dim=-1) @ v.double()
            err = rel_err(o, ref)
            sdpa = rel_err(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=bool(opts)), ref)
            return {"status": "ok" if err <= ATTN_TOL else "FAIL", "rel_err": err, "sdpa_rel_err": sdpa,
                    "detail": f"rel err {err:.2e} (SDPA {sdpa:.2e}, tol {ATTN_TOL:.0e})"}
        run.case("attention", f"{name} bf16 B{b} H{h} Nq{nq} Nk{nk} D{d}", one)


# (B, H, Nq, Nk, D, causal): ragged; the gluon configs per kernel (as the H100 tuning picks for the Triton backend)
ATTN_BWD_CASES = [(1, 2, 200, 260, 64, False), (1, 2, 300, 300, 64, True), (2, 2, 256, 256, 128, False),
                  (1, 2, 130, 200, 128, True)]
ATTN_BWD_CONFIG = {64: {"delta": dict(BM=64, num_warps=4, num_stages=1),
                        "dkdv": dict(BM=64, BN=64, num_warps=4, num_stages=3),
                        "dq": dict(BM=128, BN=64, num_warps=8, num_stages=3)},
                   128: {"delta": dict(BM=64, num_warps=4, num_stages=1),
                         "dkdv": dict(BM=64, BN=64, num_warps=4, num_stages=2),
                         "dq": dict(BM=128, BN=64, num_warps=8, num_stages=3)}}


def attention_bwd_cases(run: Runner) -> None:
    from triton.testing import do_bench

    from tilestack.kernels import attention_bwd as ab
    from tilestack.kernels import attention_fwd as af

    g = torch.Generator(device="cuda").manual_seed(5)
    for b, h, nq, nk, d, causal in few(ATTN_BWD_CASES):
        def one(b=b, h=h, nq=nq, nk=nk, d=d, causal=causal):
            q = torch.randn(b, h, nq, d, device="cuda", dtype=torch.bfloat16, generator=g)
            k, v = (torch.randn(b, h, nk, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
            do = torch.randn(b, h, nq, d, device="cuda", dtype=torch.bfloat16, generator=g)
            o, lse = af.attention_forward(q, k, v, causal, backend="triton")
            dq, dk, dv = ab.attention_backward(q, k, v, o, lse, do, causal, backend="gluon",
                                               config=ATTN_BWD_CONFIG[d])
            torch.cuda.synchronize()
            q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
            ref = af.reference(q64, k64, v64, causal)[0]
            grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
            errs = [rel_err(x, r) for x, r in zip((dq, dk, dv), grads, strict=True)]
            ok = max(errs) <= ATTN_TOL
            return {"status": "ok" if ok else "FAIL", "rel_err": max(errs),
                    "detail": "rel err dq {:.2e} dk {:.2e} dv {:.2e}".format(*errs)}
        run.case("attn_bwd", f"bf16 B{b} H{h} {nq}x{nk} D{d} {'causal' if causal else 'full'}", one)
    for d in (64, 128):
        b, h, n = 4, 2048 // d, 4096
        q, k, v, do = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        o, lse = af.attention_forward(q, k, v, False, backend="triton")

        def ours(d=d, q=q, k=k, v=v, o=o, lse=lse, do=do):
            ms = do_bench(lambda: ab.attention_backward(q, k, v, o, lse, do, False, backend="gluon",
                                                        config=ATTN_BWD_CONFIG[d]), warmup=5, rep=50,
                          return_mode="median")
            return {"impl": "gluon", "ms": ms, "detail": f"{ms:.3f} ms"}

        def cudnn(q=q, k=k, v=v, do=do):
            from torch.nn.attention import SDPBackend, sdpa_kernel
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                out = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv)
            ms = do_bench(lambda: torch.autograd.grad(out, (qq, kk, vv), do, retain_graph=True), warmup=5, rep=50,
                          return_mode="median")
            return {"impl": "cudnn", "ms": ms, "detail": f"{ms:.3f} ms"}
        run.case("attn_bwd", f"B{b} H{h} N{n} D{d} backward gluon", ours)
        run.case("attn_bwd", f"B{b} H{h} N{n} D{d} backward sdpa cudnn", cudnn)
        timed = {r["impl"]: r["ms"] for r in run.rows[-2:] if r.get("status") == "ok" and "impl" in r}
        if len(timed) == 2:
            run.rows.append({"section": "attn_bwd", "case": f"B{b} H{h} N{n} D{d} backward vs cuDNN", "status": "ok",
                             "gluon_vs_cudnn": timed["cudnn"] / timed["gluon"],
                             "detail": f"gluon {timed['cudnn'] / timed['gluon']:.2f}x"})


def attention_lib_cases(run: Runner) -> None:
    from tilestack.kernels import attention_fwd as af

    g = torch.Generator(device="cuda").manual_seed(2)
    variants = {"": {}, " ws": dict(warp_specialize=True), " pingpong": dict(schedule="pingpong")}
    for (b, h, hkv, nq, nk, d, causal, align, dt), ws in itertools.product(few(ATTN_LIB_CASES), variants):
        def one(b=b, h=h, hkv=hkv, nq=nq, nk=nk, d=d, causal=causal, align=align, dt=dt, ws=ws):
            dtype = getattr(torch, dt)
            q = torch.randn(b, h, nq, d, device="cuda", dtype=dtype, generator=g)
            k = torch.randn(b, hkv, nk, d, device="cuda", dtype=dtype, generator=g)
            v = torch.randn(b, hkv, nk, d, device="cuda", dtype=dtype, generator=g)
            o, lse = af.attention_forward(q, k, v, causal, backend="gluon", causal_align=align,
                                          **variants[ws], **ATTN_LIB_CONFIG[d])
            torch.cuda.synchronize()
            ref_o, ref_lse = af.reference(q, k, v, causal, causal_align=align)
            err = rel_err(o, ref_o)
            lse_err = (lse.double() - ref_lse).nan_to_num(posinf=0, neginf=0).abs().max().item()
            ok = err <= ATTN_TOL and lse_err <= 1e-3 and torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
            return {"status": "ok" if ok else "FAIL", "rel_err": err, "lse_abs_err": lse_err,
                    "detail": f"o rel err {err:.2e}, lse abs err {lse_err:.2e}"}
        run.case("attn_lib", f"{dt} B{b} H{h}/{hkv} {nq}x{nk} D{d} {'causal ' + align if causal else 'full'}"
                             f"{ws}", one)


def attention_bench(run: Runner, attention, fa3) -> None:
    for b, h, n, d in few(ATTN_BENCH):
        for causal in (False, True):
            attention_bench_one(run, attention, fa3, b, h, n, d, causal)
        torch.cuda.empty_cache()


def attention_bench_one(run: Runner, attention, fa3, b: int, h: int, n: int, d: int, causal: bool) -> None:
    """One FA3-grid point: SDPA's cuDNN and flash kernels, the library attention on triton and on gluon, the
    library's ping-pong forward through the public op, the hand-scheduled FA3 attention on gluon, the explicit one
    (not causal: it has no mask); then the ratios to cuDNN."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from tilestack.kernels import attention_fwd as af

    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * b * h * n * n * d // (2 if causal else 1)
    tag = f"B{b} H{h} N{n} D{d} {'causal' if causal else 'full'}"
    best: dict[str, float] = {}

    def timed(impl: str, fn) -> dict:
        ms = do_bench(fn, warmup=10, rep=50, return_mode="median")
        best[impl] = min(ms, best.get(impl, math.inf))      # an impl timed at several configs: its best
        return {"impl": impl, "ms": ms, "tflops": flops / ms / 1e9, **kernel_report(fn, tag, impl),
                "detail": f"{ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s"}

    def sdpa(backend):
        def fn():
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return lambda: timed(backend.name.lower(), fn)

    def library(backend: str, impl: str | None = None, **cfg):   # through the public op (planned once)
        return lambda: timed(impl or backend, lambda: af.attention_forward(q, k, v, causal, backend=backend, **cfg))

    def explicit(kernel, impl: str, **opts):
        def case():
            o, scale = torch.empty_like(q), 1 / math.sqrt(d)
            bn = 64 if opts and d == 128 else 128
            launch = kernel.launcher_for((q, k, v, o, scale), "gluon", BM=128, BN=bn, D=d, STAGES=2, **opts)
            return timed(impl, Timed(lambda: launch((q, k, v, o, scale)), launch))
        return case

    run.case("attn_bench", f"{tag} sdpa cudnn", sdpa(SDPBackend.CUDNN_ATTENTION))
    run.case("attn_bench", f"{tag} sdpa flash", sdpa(SDPBackend.FLASH_ATTENTION))
    run.case("attn_bench", f"{tag} triton", library("triton"))
    run.case("attn_bench", f"{tag} gluon", library("gluon", **ATTN_LIB_CONFIG[d]))
    for cfg in few(PINGPONG_ATTN_CONFIGS[d]):
        run.case("attn_bench", f"{tag} gluon pingpong (library) {cfg}", library("gluon", "gluon_pingpong_lib",
                                                                                schedule="pingpong", **cfg))
    run.case("attn_bench", f"{tag} gluon ws", lambda: timed("gluon_ws", lambda: af.attention_forward(
        q, k, v, causal, backend="gluon", warp_specialize=True, **ATTN_LIB_CONFIG[d])))
    if not causal:
        run.case("attn_bench", f"{tag} gluon explicit", explicit(attention, "gluon_explicit"))
    run.case("attn_bench", f"{tag} gluon fa3", explicit(fa3, "gluon_fa3", **({"CAUSAL": True} if causal else {})))
    if "cudnn_attention" in best:
        ratios = {i: best["cudnn_attention"] / ms for i, ms in best.items() if i != "cudnn_attention"}
        run.rows.append({"section": "attn_bench", "case": f"{tag} vs cuDNN", "status": "ok",
                         **{f"{i}_vs_cudnn": r for i, r in ratios.items()},
                         "detail": ", ".join(f"{i} {r:.2f}x" for i, r in ratios.items())})


class Timed:
    """A launch to time, and the launcher behind it (for its compiled kernel's report)."""

    def __init__(self, fn, launcher):
        self.fn, self.launcher = fn, launcher

    def __call__(self):
        self.fn()


def kernel_report(launch, tag: str, impl: str) -> dict:
    """Registers, spills and shared memory of a gluon launcher's kernel; its PTX and SASS written under --dump."""
    launcher = getattr(launch, "launcher", None)
    if not hasattr(launcher, "resources"):
        return {}
    out = launcher.resources()
    if DUMP is not None:
        from tilestack.backends.gluon import aot
        stem = DUMP / "".join(ch if ch.isalnum() else "_" for ch in f"{tag}_{impl}")
        stem.with_suffix(".ptx").write_text(launcher.compiled.asm["ptx"])
        try:
            stem.with_suffix(".sass").write_text(aot.sass(launcher.compiled))
        except Exception as e:      # no cuobjdump: the PTX is still there
            out["sass_error"] = str(e)[:200]
    return out


DUMP: Path | None = None     # --dump: a folder for the PTX and SASS of the timed gluon kernels


def bench_cases(run: Runner, gemm_ws, gemm_pingpong) -> None:
    for dtype in (torch.bfloat16, torch.float16):
        for n in BENCH_SIZES[-1:] if QUICK else BENCH_SIZES:
            bench_one(run, gemm_ws, gemm_pingpong, dtype, n)
            torch.cuda.empty_cache()


def bench_one(run: Runner, gemm_ws, gemm_pingpong, dtype, n: int) -> None:
    """One size and dtype: cuBLAS, the Triton backend (its tuned config), the gluon backend (each config of
    GEMM_CONFIGS; the best is its number), the warp-specialized explicit GEMM, the ping-pong one (each config of
    PINGPONG_CONFIGS, checked against cuBLAS's product first); then the ratios to cuBLAS."""
    from triton.testing import do_bench

    flops = 2 * n**3
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    c = torch.empty(n, n, device="cuda", dtype=dtype)
    tag = f"{str(dtype)[6:]} {n}^3"
    best: dict[str, float] = {}

    def timed(impl: str, launch, **extra) -> dict:
        ms = do_bench(launch, warmup=25, rep=100, return_mode="median")
        best[impl] = min(ms, best.get(impl, math.inf))
        return {"impl": impl, "ms": ms, "tflops": flops / ms / 1e9, **extra, **kernel_report(launch, tag, impl),
                "detail": f"{ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s"}

    def through(kernel, backend: str, **cfg):
        launch = kernel.launcher_for((a, b, c), backend, **cfg)
        return Timed(lambda: launch((a, b, c)), launch)

    run.case("bench", f"{tag} cublas", lambda: timed("cublas", lambda: torch.matmul(a, b, out=c)))
    tuned = gemm_config(n, n, n, dtype, a.device)      # the Triton backend's tuned config, as kernels.gemm uses
    run.case("bench", f"{tag} triton", lambda: timed("triton", through(gemm_kernel, "triton", **tuned), config=tuned))
    for cfg in few(GEMM_CONFIGS if dtype is torch.bfloat16 else GEMM_CONFIGS[::3]):   # fp16: fewer, bounded
        impl = "gluon" + ("_ws_pass" if cfg.get("warp_specialize") else "") + ("_persistent" if cfg.get("persistent")
                                                                                else "")
        run.case("bench", f"{tag} gluon {cfg}", lambda cfg=cfg, impl=impl: timed(
            impl, through(gemm_kernel, "gluon", **cfg), config=cfg))
    run.case("bench", f"{tag} gluon_ws explicit", lambda: timed("gluon_ws", through(gemm_ws, "gluon")))
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count

    def pingpong(cfg):
        launch = through(gemm_pingpong, "gluon", PROGRAMS=sms, **cfg)
        c.fill_(float("nan"))
        launch()
        err = rel_err(c, torch.matmul(a, b))
        if not err <= 1e-2:
            return {"status": "FAIL", "rel_err": err, "detail": f"rel err {err:.2e} against cuBLAS's product"}
        return timed("gluon_pingpong", launch, config=cfg, rel_err=err)
    for cfg in few(PINGPONG_CONFIGS):
        run.case("bench", f"{tag} gluon pingpong {cfg}", lambda cfg=cfg: pingpong(cfg))
    if dtype is torch.bfloat16:
        def fused():     # bias + gelu + residual: what the epilogue costs over the plain product
            from tilestack.kernels.gemm import gemm_epilogue_kernel
            bias, res = torch.randn(n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
            launch = gemm_epilogue_kernel.launcher_for((a, b, bias, res, c), "gluon", activation="gelu",
                                                       HAS_BIAS=True, HAS_RESIDUAL=True, **GLUON_GEMM)
            return timed("gluon_epilogue", Timed(lambda: launch((a, b, bias, res, c)), launch), config=GLUON_GEMM)
        run.case("bench", f"{tag} gluon bias+gelu+residual", fused)
    if "cublas" in best:
        ratios = {k: best["cublas"] / v for k, v in best.items() if k != "cublas"}
        run.rows.append({"section": "bench", "case": f"{tag} vs cuBLAS", "status": "ok",
                         **{f"{k}_vs_cublas": r for k, r in ratios.items()},
                         "detail": ", ".join(f"{k} {r:.2f}x" for k, r in ratios.items())})


def run_section(section: str, limit: float, sink: Path | None) -> list[dict]:
    """One section in this process (``--section``, what the parent runs in a child)."""
    run = Runner(limit, sink)
    ws = load_test_module("tests/backends/test_gluon_source.py", "gluon_source_tests")
    {"gemm": lambda: (gemm_cases(run, "gemm", gemm_kernel), epilogue_cases(run)),
     "gemm_ws": lambda: gemm_cases(run, "gemm_ws", ws.gemm_ws),
     "attention": lambda: attention_cases(run, ws.explicit_attention(), ws.attention_fa3),
     "attn_lib": lambda: attention_lib_cases(run),
     "attn_bwd": lambda: attention_bwd_cases(run),
     "fp8": lambda: fp8_cases(run),
     "bench": lambda: bench_cases(run, ws.gemm_ws, load_test_module("tests/backends/test_gluon_gemm_pingpong.py",
                                                                    "gluon_gemm_pingpong_tests").gemm_pingpong),
     "attn_bench": lambda: attention_bench(run, ws.explicit_attention(), ws.attention_fa3)}[section]()
    return run.rows


def run_isolated(section: str, limit: float) -> list[dict]:
    """A section in a child process, killed past its time (a kernel that never returns, e.g. a barrier waited on
    with the wrong phase, cannot be interrupted from Python; the driver frees a killed process's GPU context)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rows.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", section, "--json", str(out),
               "--time-limit", str(max(1.0, limit - SECTION_GRACE_S))] + (["--dump", str(DUMP)] if DUMP else []) \
            + (["--quick"] if QUICK else [])
        try:
            subprocess.run(cmd, timeout=limit, check=False)
        except subprocess.TimeoutExpired:
            rows = json.loads(out.read_text())["results"] if out.exists() else []
            return rows + [{"section": section, "case": "(section)", "status": "error",
                            "detail": f"killed after {limit:.0f} s: a kernel that never finished (hang?) or "
                                      "compiles past the budget"}]
        if not out.exists():
            return [{"section": section, "case": "(section)", "status": "error", "detail": "the child crashed "
                     "before writing its results (see its output above)"}]
        return json.loads(out.read_text())["results"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", "--out", dest="json", type=Path, default=None, help="write the results here")
    ap.add_argument("--time-limit", type=float, default=170.0, help="seconds in all; later cases are skipped")
    ap.add_argument("--skip", default="", help=f"comma-separated sections of {SECTIONS}")
    ap.add_argument("--section-max-s", type=float, default=SECTION_MAX_S,
                    help="seconds a section's child process may run before it is killed")
    ap.add_argument("--section", choices=SECTIONS, help="run one section in this process (no isolation)")
    ap.add_argument("--dump", type=Path, default=None, help="write the timed gluon kernels' PTX and SASS here")
    ap.add_argument("--quick", action="store_true", help="two cases a list: a first look, about a minute")
    args = ap.parse_args()
    global DUMP, QUICK
    DUMP, QUICK = args.dump, args.quick
    if DUMP is not None:
        DUMP.mkdir(parents=True, exist_ok=True)
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - set(SECTIONS)
    if unknown:
        ap.error(f"--skip: unknown sections {sorted(unknown)}; expected some of {SECTIONS}")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("needs a Hopper GPU (sm_90): the gluon backend generates sm_90a code", file=sys.stderr)
        return 2
    t0 = time.time()
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__}
    if args.section:
        rows = run_section(args.section, args.time_limit, args.json)
    else:
        rows = []
        for section in (s for s in SECTIONS if s not in skip):
            left = args.time_limit - (time.time() - t0)
            if left < SECTION_MIN_S:
                rows.append({"section": section, "case": "(section)", "status": "skipped",
                             "detail": "past --time-limit"})
                continue
            rows += run_isolated(section, min(left, args.section_max_s))
    env["seconds"] = round(time.time() - t0, 1)
    if args.json:
        args.json.write_text(json.dumps({"env": env, "results": rows}, indent=1, default=str))
    if args.section:
        return 0
    bad = [r for r in rows if r["status"] in ("FAIL", "error")]
    print(f"\n{env}")
    print(f"{'section':<10} {'case':<52} {'status':<8} detail")
    for r in rows:
        print(f"{r['section']:<10} {r['case'][:52]:<52} {r['status']:<8} {r.get('detail', '')[:90]}")
    print(f"\n{len(rows)} cases, {len(bad)} failed or errored")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
