"""The fuzzer's problems for GEMM, softmax, layer norm and RMS norm (forward and backward): each draws its
inputs and returns (description, run, expect)."""

from __future__ import annotations

import math
from collections.abc import Callable

from tilestack.testing.fuzz.compare import EXP2_APPROX, TINY32, U32, Mismatch, _atol, _eps, check
from tilestack.testing.fuzz.draws import Profile, _reduction_steps, log_uniform, poisoned_out, size, strided, tensor

# run() calls the library (its exceptions are crashes); expect(outputs) compares them with float64 (Mismatch).
Problem = tuple[str, Callable[[], tuple], Callable[[tuple], None]]


def _row_config(rng, n: int, device_type: str) -> dict:
    """Half the time the automatic config; else small explicit tiles (one tile per row when it fits)."""
    if rng.random() < 0.5:
        return {}
    bn = int(rng.choice((128, 256, 512) if device_type != "cuda" else (128, 1024, 4096)))
    cfg = dict(BM=int(rng.choice((1, 2, 4))), BN=bn, num_warps=4, num_stages=1)
    if bn >= n and rng.random() < 0.5:
        cfg["ONE_TILE"] = True
    return cfg


def gemm_problem(rng, device: str, backend: str, prof: Profile) -> Problem:
    import torch

    from tilestack.kernels import gemm

    m, n, k = (size(rng, prof.gemm) for _ in range(3))
    dtype = [torch.bfloat16, torch.float16][int(rng.integers(2))]
    style = str(rng.choice(["normal", "normal", "wide", "tiny", "huge"]))
    limit = torch.finfo(dtype).max / 8          # no product sum may overflow the output
    sa, sb = {"normal": (1.0, 1.0), "tiny": (1e-4, 1e-4),
              "huge": (limit ** 0.5 / 4, limit ** 0.5 / 4),
              "wide": (log_uniform(rng, 1e-3, 1e3), log_uniform(rng, 1e-3, 1e3))}[style]
    if dtype == torch.bfloat16 and style == "tiny":
        sa = sb = 1e-20                          # products near f32's smallest normals
    a, b = tensor(rng, (m, k), dtype, device, scale=sa), tensor(rng, (k, n), dtype, device, scale=sb)
    bound = float((a.double().abs() @ b.double().abs()).max()) if a.numel() and b.numel() else 0.0
    if bound > limit:                            # keep |A| @ |B| inside the dtype's range
        b = (b.double() * (limit / bound / 2)).to(dtype)
    a, b = strided(rng, a), strided(rng, b)
    out = poisoned_out(rng, (m, n), dtype, device)
    cfg = {}
    if rng.random() < 0.5:
        small = (16, 32, 64) if device != "cuda" else (32, 64, 128)
        cfg = dict(BM=int(rng.choice(small)), BN=int(rng.choice(small)), BK=int(rng.choice((16, 32))),
                   GROUP_M=int(rng.choice((1, 4, 8))), num_warps=4, num_stages=1 if device != "cuda" else 3)
    desc = (f"gemm M={m} N={n} K={k} {str(dtype)[6:]} {style} a{tuple(a.stride())} b{tuple(b.stride())} "
            f"out={'alloc' if out is None else tuple(out.stride())} cfg={cfg}")

    def run():
        return (gemm(a, b, out=out, backend=backend, **cfg),)

    def expect(outs):
        (c,) = outs
        if out is not None and c is not out:
            raise Mismatch("mismatch", "gemm returned a tensor other than out=")
        a64, b64 = a.double(), b.double()
        want = a64 @ b64
        growth = (a64.abs() @ b64.abs())
        tol = 2 * _eps(dtype) * want.abs() + 4 * (k + 1) * U32 * growth + (k + 1) * _atol(dtype)
        check("c", c, want, tol)

    return desc, run, expect


def _softmax_input(rng, m, n, dtype, device):
    import torch

    style = str(rng.choice(["normal", "wide", "extreme", "masked", "constant"]))
    big = torch.finfo(dtype).max
    if style == "normal":
        x = tensor(rng, (m, n), dtype, device)
    elif style == "wide":
        x = tensor(rng, (m, n), dtype, device, scale=log_uniform(rng, 1e-3, 1e3 if dtype == torch.float16 else 1e6))
    elif style == "extreme":                      # near the dtype's limits: x * log2(e) would overflow
        x = tensor(rng, (m, n), dtype, device, scale=big / 4, loc=float(rng.choice((-1, 0, 1))) * big / 2)
    elif style == "masked":                      # -inf entries, some rows entirely
        x = tensor(rng, (m, n), dtype, device, scale=3.0)
        x[torch.from_numpy(rng.random((m, n)) < 0.3).to(device)] = -math.inf
        if m:
            x[int(rng.integers(m))] = -math.inf
    else:
        x = torch.full((m, n), float(rng.choice((0.0, 7.5, -big))), dtype=dtype, device=device)
    return style, x


def softmax_problem(rng, device: str, backend: str, prof: Profile) -> Problem:
    import torch

    from tilestack.kernels import softmax

    m, n = size(rng, prof.rows), size(rng, prof.cols)
    dtype = [torch.float32, torch.bfloat16, torch.float16][int(rng.integers(3))]
    style, x = _softmax_input(rng, m, n, dtype, device)
    x = strided(rng, x)
    out = poisoned_out(rng, (m, n), dtype, device)
    cfg = _row_config(rng, n, device)
    desc = (f"softmax M={m} N={n} {str(dtype)[6:]} {style} x{tuple(x.stride())} "
            f"out={'alloc' if out is None else tuple(out.stride())} cfg={cfg}")

    def run():
        return (softmax(x, out=out, backend=backend, **cfg),)

    def expect(outs):
        (y,) = outs
        if out is not None and y is not out:
            raise Mismatch("mismatch", "softmax returned a tensor other than out=")
        x64 = x.double()
        want = torch.softmax(x64, dim=-1)
        if want.numel() == 0:
            check("y", y, want)
            return
        shift = (x64 - x64.amax(dim=-1, keepdim=True)).abs().nan_to_num(0.0, 0.0, 0.0)   # |x - max|
        rel = 2 * _eps(dtype) + 4 * (n + 8) * U32 + EXP2_APPROX + 4 * U32 * shift
        check("y", y, want, rel * want.nan_to_num(0.0) + _atol(dtype))

    return desc, run, expect


def _norm_input(rng, m, n, dtype, device):
    import torch

    style = str(rng.choice(["normal", "offset", "wide", "constant"]))
    hi = 1e3 if dtype == torch.float16 else 1e15
    if style == "normal":
        x = tensor(rng, (m, n), dtype, device)
    elif style == "offset":                      # a large mean: cancellation in x - mean
        s = log_uniform(rng, 1e-3, 1.0 if dtype == torch.float16 else 1e3)
        x = tensor(rng, (m, n), dtype, device, scale=s, loc=s * float(rng.choice((-1, 1))) * log_uniform(rng, 1, 1e3))
    elif style == "wide":
        x = tensor(rng, (m, n), dtype, device, scale=log_uniform(rng, 1 / hi, hi))
    else:
        x = torch.full((m, n), float(rng.normal()), dtype=dtype, device=device)
    return style, x


def _norm_draw(rng, device: str, prof: Profile):
    """(m, n, dtype, pdtype, style, x, w) of a norm problem (forward or backward): sizes, x's dtype, the weight's
    (x's or f32), the value style, x (maybe strided) and the weight, drawn in this order (a seed's problems
    replay the same)."""
    import torch

    m, n = size(rng, prof.rows), size(rng, prof.cols)
    dtype = [torch.float32, torch.bfloat16, torch.float16][int(rng.integers(3))]
    pdtype = dtype if rng.random() < 0.7 else torch.float32
    style, x = _norm_input(rng, m, n, dtype, device)
    x = strided(rng, x)
    w = tensor(rng, (n,), pdtype, device, scale=float(rng.choice((1.0, 10.0))), loc=1.0)
    return m, n, dtype, pdtype, style, x, w


def layer_norm_problem(rng, device: str, backend: str, prof: Profile) -> Problem:
    import torch

    from tilestack.kernels import layer_norm

    m, n, dtype, pdtype, style, x, w = _norm_draw(rng, device, prof)
    b = tensor(rng, (n,), pdtype, device, scale=float(rng.choice((0.0, 1.0, 10.0))))
    eps = float(rng.choice((1e-5, 1e-6, 1e-2)))
    cfg = _row_config(rng, n, device)
    desc = f"layer_norm M={m} N={n} {str(dtype)[6:]} w,b {str(pdtype)[6:]} {style} eps={eps} x{tuple(x.stride())} " \
           f"cfg={cfg}"

    def run():
        return layer_norm(x, w, b, eps, backend=backend, **cfg)

    def expect(outs):
        y, mean, rstd = outs
        x64, w64, b64 = x.double(), w.double(), b.double()
        want = torch.nn.functional.layer_norm(x64, (n,), w64, b64, eps)
        check("y", y, want, None if n == 0 else _layer_norm_tol(x64, w64, b64, want, eps, dtype))
        if n == 0:                               # the statistics of an empty row: only the shapes
            check("mean", mean, torch.zeros(m, dtype=torch.float64))
            return
        mean64 = x64.mean(-1)
        var64 = x64.var(-1, unbiased=False)
        rstd64 = (var64 + eps).rsqrt()
        steps = _reduction_steps(n) * U32
        spread = x64.abs().mean(-1)
        check("mean", mean, mean64, 2 * steps * spread + TINY32)
        check("rstd", rstd, rstd64, rstd64 * (4 * steps + 2 * (steps * spread * rstd64) ** 2) + TINY32)

    return desc, run, expect


def _layer_norm_tol(x64, w64, b64, want, eps, dtype):
    n = x64.shape[1]
    mean = x64.mean(-1, keepdim=True)
    rstd = (x64.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
    xhat = (x64 - mean) * rstd
    cond = xhat.abs() + mean.abs() * rstd + 1.0            # how far f32 rounding of x and the mean can move xhat
    steps = _reduction_steps(n) * U32
    return 2 * _eps(dtype) * want.abs() + 4 * steps * cond * w64.abs() + 4 * U32 * b64.abs() + _atol(dtype)


def rms_norm_problem(rng, device: str, backend: str, prof: Profile) -> Problem:

    from tilestack.kernels.rmsnorm import rms_norm

    m, n, dtype, pdtype, style, x, w = _norm_draw(rng, device, prof)
    eps = float(rng.choice((1e-6, 1e-5, 1e-2)))
    cfg = _row_config(rng, n, device)
    desc = f"rms_norm M={m} N={n} {str(dtype)[6:]} w {str(pdtype)[6:]} {style} eps={eps} x{tuple(x.stride())} " \
           f"cfg={cfg}"

    def run():
        return rms_norm(x, w, eps, backend=backend, **cfg)

    def expect(outs):
        y, rstd = outs
        x64, w64 = x.double(), w.double()
        if n == 0:
            check("y", y, x64)
            if tuple(rstd.shape) != (m,):
                raise Mismatch("mismatch", f"rstd has shape {tuple(rstd.shape)}, expected ({m},)")
            return
        rstd64 = ((x64 * x64).mean(-1, keepdim=True) + eps).rsqrt()
        want = x64 * rstd64 * w64
        steps = _reduction_steps(n) * U32
        tol = 2 * _eps(dtype) * want.abs() + 4 * steps * (x64 * rstd64 * w64).abs() + _atol(dtype)
        check("y", y, want, tol)
        check("rstd", rstd, rstd64[:, 0], 4 * steps * rstd64[:, 0] + TINY32)

    return desc, run, expect


def norm_backward_problem(rng, device: str, backend: str, prof: Profile, *, centered: bool) -> Problem:
    """layer_norm_backward (centered) or rms_norm_backward, from statistics the forward would save (the exact
    ones rounded to f32), with an optional gradient dh that reaches x by another path."""
    import torch

    from tilestack.kernels import layer_norm_backward, rms_norm_backward

    m, n, dtype, pdtype, style, x, w = _norm_draw(rng, device, prof)
    dy = tensor(rng, (m, n), dtype, device, scale=log_uniform(rng, 1e-3, 1e2 if dtype == torch.float16 else 1e4))
    dh = tensor(rng, (m, n), dtype, device) if rng.random() < 0.3 else None
    eps = float(rng.choice((1e-6, 1e-5, 1e-2)))
    x64 = x.double()
    mean = x64.mean(-1) if centered else torch.zeros(m, dtype=torch.float64, device=device)
    msq = (x64 - mean[:, None]).square().mean(-1) if n else torch.zeros(m, dtype=torch.float64, device=device)
    mean32, rstd32 = mean.float(), (msq + eps).rsqrt().float()
    cfg = _row_config(rng, n, device)
    name = "layer_norm_backward" if centered else "rms_norm_backward"
    desc = (f"{name} M={m} N={n} {str(dtype)[6:]} w {str(pdtype)[6:]} {style} eps={eps} dh={dh is not None} "
            f"x{tuple(x.stride())} cfg={cfg}")

    def run():
        if centered:
            return layer_norm_backward(dy, x, w, mean32, rstd32, dh=dh, backend=backend, **cfg)
        return rms_norm_backward(dy, x, w, rstd32, dh=dh, backend=backend, **cfg)

    def expect(outs):
        r = rstd32.double()[:, None]                             # (M, 1)
        xhat = (x64 - mean32.double()[:, None]) * r if centered else x64 * r
        g = dy.double() * w.double()
        g_xhat = (g * xhat).mean(-1, keepdim=True) if n else torch.zeros_like(r)
        g_mean = g.mean(-1, keepdim=True) if n and centered else torch.zeros_like(r)
        dx64 = r * (g - g_mean - xhat * g_xhat)
        dh64 = torch.zeros_like(dx64) if dh is None else dh.double()
        dx64 = dx64 + dh64
        steps_n = _reduction_steps(n) * U32
        spread = (g.abs().mean(-1, keepdim=True) + xhat.abs() * (g * xhat).abs().mean(-1, keepdim=True)) if n \
            else torch.zeros_like(r)
        tol_dx = 2 * _eps(dtype) * (dx64.abs() + dh64.abs()) + 4 * steps_n * r * (g.abs() + spread) + _atol(dtype)
        check("dx", outs[0], dx64, tol_dx)
        steps_m = _reduction_steps(m) * U32
        dys = dy.double()
        sums = [("dw", (dys * xhat).sum(0), (dys * xhat).abs().sum(0))]
        if centered:
            sums.append(("db", dys.sum(0), dys.abs().sum(0)))
        for (label, want, growth), got in zip(sums, outs[1:], strict=True):
            check(label, got, want, 2 * _eps(pdtype) * want.abs() + 4 * steps_m * growth + (m + 1) * _atol(pdtype))

    return desc, run, expect
