"""The norms on the GPU at rows past f32's range for squares (|x| up to 1e37, where the kernels scale a row's
statistics by a power of two: kernels/layernorm.row_scale) and at ordinary rows, against float64 torch: the largest
error of y relative to the output's scale, per op, dtype and magnitude. The ordinary rows must match what the
kernels gave before the scaling (c = 1 exactly: exp2 of 0 and log2 of 1 on the GPU's approximate units).

    PYTHONPATH=src python3 scripts/gpu/check_norm_extremes.py
"""

import torch
import torch.nn.functional as F

from tilestack.torch import ops


def main() -> int:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    worst = 0.0
    print(f"{'op':14s} {'dtype':9s} {'width':>6s} {'scale':>8s} {'max rel err':>12s}")
    for dtype in (torch.float32, torch.bfloat16):
        for width in ((768, 4096, 20000) if dev == "cuda" else (96, 300)):
            for scale in (1.0, 1e20, 1e30, 1e37 if dtype == torch.float32 else 1e36):
                x = (torch.randn(64 if dev == "cuda" else 5, width, device=dev, generator=g) * scale).to(dtype)
                w = torch.randn(width, device=dev, generator=g).to(dtype)
                b = torch.randn(width, device=dev, generator=g).to(dtype)
                x64, w64, b64 = x.double(), w.double(), b.double()
                cases = {
                    "layer_norm": (ops.layer_norm(x, w, b, 1e-5),
                                   F.layer_norm(x64, (width,), w64, b64, 1e-5)),
                    "rms_norm": (ops.rms_norm(x, w, 1e-5),
                                 x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64),
                }
                for name, (got, want) in cases.items():
                    err = ((got.double() - want).abs().max() / want.abs().max()).item()
                    bad = not torch.isfinite(got).all()
                    tol = 1e-5 if dtype == torch.float32 else 2e-2
                    worst = max(worst, err / tol if not bad else float("inf"))
                    print(f"{name:14s} {str(dtype)[6:]:9s} {width:6d} {scale:8.0e} {err:12.2e}"
                          f"{'  NON-FINITE' if bad else ''}{'  FAIL' if err > tol or bad else ''}", flush=True)
    print(f"worst error over its tolerance: {worst:.2f} ({'ok' if worst <= 1 else 'FAIL'})")
    return 0 if worst <= 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
