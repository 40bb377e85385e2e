"""Fuzz round thirteen, part one: the backward of the norms, SwiGLU, rotary and the fused linear + cross-entropy
against float64 autograd of torch's reference, over seeded random cases (tests/_fuzz_round13.py says what is
shared and what this round draws that rounds 8 and 12 did not).

Each case draws the upstream gradient of every output: its scale (1, 1e4, 1e-4 or all zeros) and its memory
layout (contiguous, transposed, every other element of a wider buffer, one value expanded with stride 0, at a
storage offset), as autograd hands them to a backward; the residual stream's gradient dh of the fused add-norms
drawn apart (or none). Sizes are tile edges (t - 1, t, t + 1 for t in 16..256) and primes; inputs are views of
their leaves (channels_last-like permuted storage, stepped slices at an offset, stride-0 broadcasts, offsets);
weights of the norms in f32 under bf16/f16 activations (and the other way) now and then. Every 6th case runs
on the Triton interpreter, the others on the reference executor.

Bounds, per element, by what each result sums (``TOL`` of the dtype it is rounded to, plus ``(n + 2) * U32`` per
f32 sum of n terms): the norms' dx by the terms rstd (|w dy| + mean|w dy| + |xhat| mean|w dy xhat|), dw and db by
the sums over rows of |dy xhat| and |dy|; SwiGLU by |dy b silu'(a)| and |dy silu(a)|; rotary by the rotation of
|dy|; the cross-entropy by P's relative error from the logits' rounding (the logits are made in x's dtype).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tilestack.kernels as K
from _fuzz_round13 import (
    DTYPES,
    TOL,
    U32,
    Replay,
    UpstreamGrad,
    backend_for,
    fuzz_grads,
    grad_flags,
    leaves_for,
    pick,
    rng_for,
    rounded,
    rowmax,
    size,
)
from tilestack.torch import ops

NORM_CASES, SWIGLU_CASES, ROTARY_CASES, CE_CASES = 72, 30, 24, 24


def _leading(rng, budget: int) -> tuple[int, ...]:
    """0..3 leading dims of odd sizes and 1 (a 1 in the middle, as (B, 1, N) is), product <= budget."""
    dims = [int(pick(rng, (1, 1, 2, 3, 5, 7, 9, 15, 17))) for _ in range(int(rng.integers(0, 4)))]
    while math.prod(dims) > budget:
        dims[dims.index(max(dims))] //= 2
    return tuple(max(d, 1) for d in dims)


def _rows_budget(index: int, n: int, ref: int, triton: int) -> int:
    return max(1, (ref if backend_for(index) == "reference" else triton) // max(n, 1))


@pytest.mark.parametrize("op,index", [(op, i) for op in ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm")
                                      for i in range(NORM_CASES // 4)])
def test_norm(op, index, request):
    # one generator per (op, case): the group's number and the op's place among the four
    rng = rng_for("norm", index * 4 + ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm").index(op))
    rep = Replay("norm", index, request)
    rep["op"] = op
    residual, centered = op.startswith("add_"), op.endswith("layer_norm")
    dt = pick(rng, DTYPES)
    # weights in f32 under bf16/f16 activations, or bf16 weights under f32 ones, now and then
    wdt = dt if rng.random() < 0.5 else (torch.float32 if dt != torch.float32 else pick(rng, DTYPES[1:]))
    n = size(rng, 509)
    shape = (*_leading(rng, _rows_budget(index, n, 4000, 1000)), n)
    eps = float(pick(rng, (1e-6, 1e-5)))
    scale, shift = float(pick(rng, (1.0, 0.05, 20.0))), float(pick(rng, (0.0, 0.0, 3.0)))
    rep.fields.update(shape=shape, dtype=dt, weight=wdt, eps=eps, scale=scale, shift=shift)
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    tensors, dtypes, names = [torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift], [dt], ["x"]
    if residual:
        tensors.append(torch.randn(shape, generator=g, dtype=torch.float64) * scale)
        dtypes.append(dt)
        names.append("r")
    tensors.append(torch.randn(n, generator=g, dtype=torch.float64) * 0.5 + 1.0)
    dtypes.append(wdt)
    names.append("weight")
    if centered:
        tensors.append(torch.randn(n, generator=g, dtype=torch.float64))
        dtypes.append(wdt)
        names.append("bias")
    leaves, views = leaves_for(rng, tensors, dtypes, names, rep)
    flags = grad_flags(rng, len(leaves), rep)
    gy = UpstreamGrad(rng)
    gh = UpstreamGrad(rng) if residual and rng.random() < 0.6 else None
    rep.fields.update(dy=gy, dh=gh)
    iw = 2 if residual else 1

    def ours(*a):
        return getattr(ops, op)(*a, eps=eps)

    def theirs(*a):
        h = rounded(a[0] + a[1], dt) if residual else a[0]      # h = x + r in x's dtype, as the op keeps it
        w, b = a[iw], (a[-1] if centered else None)
        y = F.layer_norm(h, (n,), w, b, eps) if centered else F.rms_norm(h, (n,), w, eps)
        return (y, h) if residual else y

    def stats(ins):
        """(xhat, rstd, herr): herr bounds xhat's error from f32 statistics (the mean's rounding, a few ulp of
        the row's largest |h|, times rstd)."""
        h = rounded(ins[0] + ins[1], dt) if residual else ins[0]
        c = h - h.mean(-1, keepdim=True) if centered else h
        rstd = ((c * c).mean(-1, keepdim=True) + eps).rsqrt()
        herr = (4 + math.log2(n + 1)) * U32 * rowmax(h) * rstd
        return c * rstd, rstd, herr

    def out_bound(k, want, ins):
        if k == 1:                                               # h: x + r rounded once
            return TOL[dt] * want.abs()
        xhat, _, herr = stats(ins)
        w = ins[iw].abs()
        b = ins[-1].abs() if centered else 0
        return TOL[dt] * (want.abs() + w * xhat.abs() + b) + w * herr + 8 * U32 * (w * xhat.abs() + b)

    def grad_bound(i, grad, ins):
        xhat, rstd, herr = stats(ins)
        dy = gy.values(xhat.shape, dt).abs()
        if gh is not None and names[i] in ("x", "r"):
            dhv = gh.values(xhat.shape, dt).abs()
        else:
            dhv = 0
        m = math.prod(shape[:-1])
        if names[i] == "weight":                                 # sum over rows of dy xhat
            terms = (dy * (xhat.abs() + herr)).reshape(-1, n).sum(0)
            # (xhat rounded to x's dtype before the weight, as torch's own bf16/f16 norms round it)
            return TOL[wdt] * grad.abs() + (4 * (m + 2) * U32 + TOL[dt]) * terms + \
                (dy * herr).reshape(-1, n).sum(0)
        if names[i] == "bias":
            return TOL[wdt] * grad.abs() + 4 * (m + 2) * U32 * dy.reshape(-1, n).sum(0)
        wdy = ins[iw].abs() * dy
        t = rstd * (wdy + (wdy.mean(-1, keepdim=True) if centered else 0) +
                    xhat.abs() * (wdy * xhat.abs()).mean(-1, keepdim=True))
        return TOL[dt] * (grad.abs() + t) + 4 * (n + 2) * U32 * t + \
            2 * rstd * rowmax(wdy) * herr * (1 + rowmax(xhat)) + TOL[dt] * dhv

    fuzz_grads(rep, ours, theirs, leaves, views, flags, (gy, gh) if residual else (gy,), names=names,
               out_bound=out_bound, grad_bound=grad_bound, out_dtypes=(dt, dt) if residual else (dt,))


@pytest.mark.parametrize("index", range(SWIGLU_CASES))
def test_swiglu(index, request):
    rng, rep = rng_for("swiglu", index), Replay("swiglu", index, request)
    dt, f = pick(rng, DTYPES), size(rng, 257)
    shape = (*_leading(rng, _rows_budget(index, 2 * f, 8000, 2000)), 2 * f)
    scale = float(pick(rng, (1.0, 4.0, 0.01)))
    rep.fields.update(shape=shape, dtype=dt, scale=scale)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))),
                    dtype=torch.float64) * scale
    leaves, views = leaves_for(rng, [x], [dt], ["x"], rep)
    gy = UpstreamGrad(rng)
    rep["dy"] = gy

    def theirs(x):
        return F.silu(x[..., :f]) * x[..., f:]

    def grad_bound(_, grad, ins):
        a, b = ins[0][..., :f], ins[0][..., f:]
        s = torch.sigmoid(a)
        dy = gy.values(a.shape, dt).abs()
        terms = torch.cat((dy * b.abs() * s * (1 + a.abs() * (1 - s)), dy * (a * s).abs()), -1)
        return 2 * TOL[dt] * (grad.abs() + terms)

    fuzz_grads(rep, ops.swiglu, theirs, leaves, views, [True], (gy,), names=["x"],
               out_bound=lambda k, w, ins: 2 * TOL[dt] * w.abs(), grad_bound=grad_bound, out_dtypes=(dt,))


@pytest.mark.parametrize("index", range(ROTARY_CASES))
def test_rotary(index, request):
    rng, rep = rng_for("rotary", index), Replay("rotary", index, request)
    dt, D = pick(rng, DTYPES), int(pick(rng, (16, 32, 64, 128, 256)))
    B, H, Hkv = int(pick(rng, (1, 1, 2, 3))), int(pick(rng, (1, 3, 5, 7))), int(pick(rng, (1, 2, 3)))
    N = size(rng, 257)
    budget = 30000 if backend_for(index) == "reference" else 3000
    while B * N * (H + Hkv) * D > budget and N > 1:
        N = max(1, N // 2 + (N % 2))                      # halves of odd sizes stay odd
    theta = float(pick(rng, (10000.0, 500000.0)))
    rep.fields.update(dtype=dt, q=(B, N, H, D), Hkv=Hkv, theta=theta)
    cos, sin = K.rotary_tables(N, D, theta=theta)
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    tensors = [torch.randn(B, N, H, D, generator=g, dtype=torch.float64),
               torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64) * 30]
    leaves, views = leaves_for(rng, tensors, [dt, dt], ["q", "k"], rep)
    flags = grad_flags(rng, 2, rep)
    gq, gk = UpstreamGrad(rng), (UpstreamGrad(rng) if rng.random() < 0.8 else None)
    rep.fields.update(dq=gq, dk=gk)
    c64, s64 = cos.double()[None, :, None], sin.double()[None, :, None]

    def rot(x, sign=1.0):
        x1, x2 = x.chunk(2, -1)
        return torch.cat((x1 * c64 - sign * x2 * s64, x2 * c64 + sign * x1 * s64), -1)

    def rot_abs(x):
        x1, x2 = x.abs().chunk(2, -1)
        return torch.cat((x1 * c64.abs() + x2 * s64.abs(),) * 2, -1)

    def out_bound(k, want, ins):
        return TOL[dt] * (want.abs() + rot_abs(ins[k]))

    def grad_bound(i, grad, ins):
        dy = (gq, gk)[i].values(ins[i].shape, dt)
        return TOL[dt] * (grad.abs() + rot_abs(dy))

    fuzz_grads(rep, lambda q, k: ops.rotary(q, k, cos, sin), lambda q, k: (rot(q), rot(k)), leaves, views, flags,
               (gq, gk), names=["q", "k"], out_bound=out_bound, grad_bound=grad_bound, out_dtypes=(dt, dt))


@pytest.mark.parametrize("index", range(CE_CASES))
def test_fused_linear_cross_entropy(index, request):
    # the Triton interpreter runs the loss's kernel a program a row: every 12th case only
    rng, rep = rng_for("cross_entropy", index), Replay("cross_entropy", index, request, every=12)
    dt = pick(rng, DTYPES)
    T, d, V = size(rng, 65), size(rng, 129), size(rng, 509)
    budget = 200000 if backend_for(index, 12) == "reference" else 4000
    while T * V * d > budget and max(T, d, V) > 1:
        if V >= max(T, d):
            V = max(1, V // 2)
        elif d >= T:
            d = max(1, d // 2)
        else:
            T = max(1, T // 2)
    ignore = int(pick(rng, (-100, 0, V - 1)))
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    labels = torch.randint(0, V, (T,), generator=g)
    labels[torch.rand(T, generator=g) < pick(rng, (0.0, 0.3))] = ignore
    labels = labels.to(pick(rng, (torch.int64, torch.int32)))
    x = torch.randn(T, d, generator=g, dtype=torch.float64) * pick(rng, (1.0, 0.1))
    w = torch.randn(V, d, generator=g, dtype=torch.float64) * (1.0 / math.sqrt(d))
    leaves, views = leaves_for(rng, [x, w], [dt, dt], ["x", "weight"], rep)
    flags = grad_flags(rng, 2, rep)
    gl = UpstreamGrad(rng)
    rep.fields.update(dtype=dt, T=T, d=d, V=V, ignore=ignore, labels=labels.dtype, dloss=gl)
    counted = (labels != ignore).double()
    n = max(1.0, float(counted.sum()))

    def theirs(x, w):
        return F.cross_entropy(x @ w.T, labels.long(), ignore_index=ignore)

    def parts(ins):
        x, w = ins
        mag = x.abs() @ w.abs().T                                 # (T, V): the logits' terms
        # a logit's error: rounded to x's dtype (the kernels' logits are made in it), from a sum of d f32 terms
        err = (TOL[dt] + (d + 2) * U32) * rowmax(mag)
        p = torch.softmax(x @ w.T, -1) * counted[:, None]
        onehot = F.one_hot(labels.long().clamp(0, V - 1), V).double() * counted[:, None]
        return x, w, p, onehot, err.clamp(max=4.0)

    def out_bound(_, want, ins):
        *_, err = parts(ins)
        return TOL[dt] * want.abs() + 2 * (err[:, 0] * counted).sum() / n + 1e-6

    def grad_bound(i, grad, ins):
        x, w, p, onehot, err = parts(ins)
        dloss = abs(float(gl.values((), torch.float32)))
        # P - onehot, rounded to x's dtype, P off by its logits' error; then a GEMM of f32 sums
        weight = p * (1 + 2 * err) + onehot
        terms = (weight @ w.abs() if i == 0 else weight.T @ x.abs()) * dloss / n
        sub = torch.finfo(dt).smallest_normal * torch.finfo(dt).eps      # a gradient made at dloss 1: one step
        return 2 * TOL[dt] * grad.abs() + (2 * TOL[dt] + 2 * err.max() + (max(V, T) + 2) * U32) * terms + \
            dloss * sub

    fuzz_grads(rep, lambda x, w: ops.fused_linear_cross_entropy(x, w, labels, ignore), theirs, leaves, views,
               flags, (gl,), names=["x", "weight"], out_bound=out_bound, grad_bound=grad_bound,
               out_dtypes=(torch.float32,))
