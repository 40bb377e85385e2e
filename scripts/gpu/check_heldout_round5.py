"""On a GPU: round 5's held-out kernels compiled by Triton and Gluon (not interpreted) against the reference executor.

    PYTHONPATH=src python3 scripts/gpu/check_heldout_round5.py

The CPU tests run Triton's interpreter, which keeps a Python float as it is until its first operation; on the GPU
a float argument is a typed parameter (it was fp32 even for f64 work) and sizes and int arguments are i32. This runs
the f64-argument, index-past-2**31, fp8 and alpha-beta GEMM, Welford and sliding-window kernels of
tests/lang/test_heldout_round5*.py with CUDA tensors on both GPU backends (the attention on Triton: f32 products),
and the same inputs on the CPU with the reference backend; prints each case and exits non-zero on a mismatch.
"""

from __future__ import annotations

import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "lang")]

import test_heldout_round5 as r5  # noqa: E402
import test_heldout_round5_more as r5b  # noqa: E402


def compare(name: str, backend: str, kernel, args, rtol: float = 0.0, **consts) -> bool:
    """Every tensor after the launch on the GPU ``backend`` equals the reference's (NaN where it is NaN), or is within
    ``rtol`` of it."""
    cpu = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    gpu = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    kernel(*cpu, backend="reference", **consts)
    kernel(*gpu, backend=backend, **consts)
    torch.cuda.synchronize()
    ok = True
    for k, (c, g) in enumerate(zip(cpu, gpu, strict=True)):
        if isinstance(c, torch.Tensor):
            g = g.cpu()
            same = torch.allclose(c.double(), g.double(), rtol=rtol, atol=rtol, equal_nan=True)
            ok &= bool(same)
            if not same:
                bad = (c != g) & ~(c.isnan() & g.isnan()) if c.is_floating_point() else c != g
                print(f"     arg {k}: {int(bad.sum())} differ; reference {c[bad][:3].tolist()}, {backend} "
                      f"{g[bad][:3].tolist()}")
    print(f"{'ok  ' if ok else 'FAIL'} {backend:7s} {name}")
    return ok


def main() -> int:
    torch.manual_seed(0)
    ok = True
    f64 = torch.float64
    for backend in ("triton", "gluon"):
        x, y = torch.randn(256, dtype=f64), torch.randn(256, dtype=f64)
        for a, b in ((1.0 + 2.0**-40, -(1.0 - 2.0**-45)), (0.1, 1e-300)):
            args = [x, y, torch.full((256,), float("nan"), dtype=f64), torch.full((256,), float("nan")), a, b]
            # (1e-15: the GPU fuses a x + b y into one FMA; an f32 a = 1 + 2**-40 would be off by 1e-12)
            ok &= compare(f"axpby64 a={a!r}", backend, r5.axpby64, args, rtol=1e-15, BN=128)
        xs = torch.cat([torch.tensor(r5.SPECIAL), torch.randn(246)]).to(f64)
        ok &= compare("clamp f64 0.1..0.3", backend, r5.clamp_relu6,
                      [xs, torch.zeros_like(xs), torch.zeros_like(xs), 0.1, 0.3], BN=128)
        for off in (r5.INT32_MAX - 10, -(2**31) + 3, 2**30 + 1, 5):
            args = [torch.zeros(100), torch.full((3, 32), -5, dtype=torch.int64), torch.full((4, 32), 7.0), off]
            ok &= compare(f"positions off={off}", backend, r5.positions_past_2_31, args, BN=32)
        a8 = (torch.randn(300, 96) * 4).to(torch.float8_e4m3fn)
        b8 = (torch.randn(80, 96) * 4).to(torch.float8_e4m3fn)
        ok &= compare("gemm_f8_scaled", backend, r5b.gemm_f8_scaled,
                      [a8, b8, torch.zeros(300, 80, dtype=torch.bfloat16), 0.037, 1.9], rtol=1e-2,
                      BM=128, BN=64, BK=64)
        at, b = torch.randn(96, 300, dtype=torch.bfloat16).T, torch.randn(96, 80, dtype=torch.bfloat16)
        for beta in (0.0, 2.0):
            c = torch.randn(300, 80)
            c[0, 0] = float("nan")
            ok &= compare(f"gemm_alpha_beta beta={beta}", backend, r5b.gemm_alpha_beta, [at, b, c, 0.5, beta],
                          rtol=1e-4, BM=128, BN=64, BK=64)
        w = torch.randn(64, 1000) * 0.01 + 1e4
        ok &= compare("welford_rows", backend, r5b.welford_rows, [w, torch.zeros(64), torch.zeros(64)], rtol=1e-3,
                      BM=32, BN=128)
    for window in (5, 100):
        q, k, v = (torch.randn(300, 32) for _ in range(3))
        ok &= compare(f"window_attention w={window}", "triton", r5.window_attention,
                      [q, k, v, torch.zeros(300, 32), window, 32**-0.5], rtol=1e-4, BM=32, BN=32, D=32)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
