"""Fuzz round fifteen, part one: the non-attention ops over seeded random cases against float64 torch, forward and
backward (tests/_fuzz_round15.py says what this round draws that rounds 8, 12, 13 and 14 did not).

- the four norms of ``tilestack.torch.ops`` on inputs of rank 1-4 with ragged widths (1, 3, 17, 1000, 4097, 0),
  rows at 1e4 in f16, eps from 1e-12 to 1e39 (the kernels take eps in f32: past its range, inf, y = 0, and the
  float64 reference is given the same f32 eps), weights of another dtype, requires_grad on a subset;
- ``tilestack.kernels.softmax`` on rows of -1e30, finfo.min/max, -inf and +inf, into NaN-poisoned ``out=`` views;
- SwiGLU on rows at 1e4 (products past f16's range: inf, as float64 past it), rank 1-4;
- rotary through the op (gradients) and the kernel function into poisoned ``q_out``/``k_out`` or in place;
- the fused linear + cross-entropy with rows of x at -1e30 (f32: logits near -1e30, a loss of that size) or 1e3,
  rows labelled ignore_index and batches where every row is (loss NaN, gradients 0, as torch), V up to 4097;
- gemm with its epilogues into a poisoned ``out=``, sizes from the ragged set (K = 0: the epilogue of zeros).

Bounds per element as round 13's (TOL of the dtype a result is rounded to, times the size of the terms it sums,
plus (n + 2) * U32 of them per f32 sum of n terms); NaN exactly where float64 has NaN; past a dtype's range the
same infinity. Every 5th case runs on the Triton interpreter, the others on the reference executor.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tilestack.kernels as K
from _fuzz_round13 import (
    UpstreamGrad,
    check,
    fuzz_grads,
    grad_flags,
    leaves_for,
    poisoned,
    rounded,
    rowmax,
    untouched_outside,
)
from _fuzz_round15 import (
    DTYPES,
    EPS,
    TOL,
    U32,
    Replay,
    budget_rows,
    edge_rows,
    leading_dims,
    pick,
    ragged,
    rng_for,
    seeded,
)
from tilestack.kernels.gemm import ACTIVATIONS, torch_activation
from tilestack.torch import ops

NORMS = ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm")
NORM_CASES, SOFTMAX_CASES, SWIGLU_CASES, ROTARY_CASES, CE_CASES, GEMM_CASES = 10, 20, 15, 12, 20, 15


def _f32(eps: float) -> float:
    """eps as the kernels take it: an f32 (1e39 is inf there)."""
    return float(torch.tensor(eps, dtype=torch.float32))


@pytest.mark.parametrize("op,index", [(op, i) for op in NORMS for i in range(NORM_CASES)])
def test_norm(op, index, request):
    case = index * len(NORMS) + NORMS.index(op)
    rng, rep = rng_for("norm", case), Replay("norm", case, request)
    rep["op"] = op
    residual, centered = op.startswith("add_"), op.endswith("layer_norm")
    dt = pick(rng, DTYPES)
    wdt = dt if rng.random() < 0.6 else pick(rng, DTYPES)
    n = ragged(rng)
    shape = (*leading_dims(rng, 3, budget_rows(rep, n, 30000, 1200)), n)
    style = pick(rng, ("normal", "normal", "big", "tiny", "shifted"))
    # eps 0 only where every row has a spread (a row of one element is 0 / 0 for a layer norm)
    eps = float(pick(rng, EPS if centered and n < 2 else (*EPS, 0.0)))
    rep.fields.update(shape=shape, dtype=dt, weight=wdt, style=style, eps=eps)
    g = seeded(rng)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = {"big": x * 1e4, "tiny": x * 1e-3, "shifted": x + 50.0}.get(style, x)
    tensors, dtypes, names = [x], [dt], ["x"]
    if residual:
        tensors.append(torch.randn(shape, generator=g, dtype=torch.float64) * (1e4 if style == "big" else 1.0))
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
    iw, e32 = (2 if residual else 1), _f32(eps)

    def ours(*a):
        return getattr(ops, op)(*a, eps=eps)

    def theirs(*a):
        h = rounded(a[0] + a[1], dt) if residual else a[0]
        w, b = a[iw], (a[-1] if centered else None)
        y = F.layer_norm(h, (n,), w, b, e32) if centered else F.rms_norm(h, (n,), w, e32)
        return (y, h) if residual else y

    def stats(ins):
        h = rounded(ins[0] + ins[1], dt) if residual else ins[0]
        c = h - h.mean(-1, keepdim=True) if centered else h
        rstd = ((c * c).mean(-1, keepdim=True) + e32).rsqrt()
        herr = (4 + math.log2(n + 1)) * U32 * rowmax(h) * rstd
        return c * rstd, rstd, herr

    def out_bound(k, want, ins):
        if k == 1:
            return TOL[dt] * want.abs()
        xhat, _, herr = stats(ins)
        w, b = ins[iw].abs(), (ins[-1].abs() if centered else 0)
        return TOL[dt] * (want.abs() + w * xhat.abs() + b) + w * herr + 8 * U32 * (w * xhat.abs() + b)

    def grad_bound(i, grad, ins):
        xhat, rstd, herr = stats(ins)
        dy = gy.values(xhat.shape, dt).abs()
        dhv = gh.values(xhat.shape, dt).abs() if gh is not None and names[i] in ("x", "r") else 0
        m = math.prod(shape[:-1])
        if names[i] == "weight":
            terms = (dy * (xhat.abs() + herr)).reshape(m, n).sum(0)
            return TOL[wdt] * grad.abs() + (4 * (m + 2) * U32 + TOL[dt]) * terms + (dy * herr).reshape(m, n).sum(0)
        if names[i] == "bias":
            return TOL[wdt] * grad.abs() + 4 * (m + 2) * U32 * dy.reshape(m, n).sum(0)
        wdy = ins[iw].abs() * dy
        t = rstd * (wdy + (wdy.mean(-1, keepdim=True) if centered else 0) +
                    xhat.abs() * (wdy * xhat.abs()).mean(-1, keepdim=True))
        return TOL[dt] * (grad.abs() + t) + 4 * (n + 2) * U32 * t + \
            2 * rstd * rowmax(wdy) * herr * (1 + rowmax(xhat)) + TOL[dt] * dhv

    fuzz_grads(rep, ours, theirs, leaves, views, flags, (gy, gh) if residual else (gy,), names=names,
               out_bound=out_bound, grad_bound=grad_bound, out_dtypes=(dt, dt) if residual else (dt,))


@pytest.mark.parametrize("index", range(SOFTMAX_CASES))
def test_softmax(index, request):
    rng, rep = rng_for("softmax", index), Replay("softmax", index, request)
    dt, n = pick(rng, DTYPES), ragged(rng)
    m = int(pick(rng, (1, 2, 3, 5, 17, 64))) if rng.random() < 0.95 else 0
    m = max(0, min(m, budget_rows(rep, n, 40000, 1500)))
    style = pick(rng, ("normal", "big", "minus_huge_rows", "finfo_rows", "inf_rows", "inf_rows"))
    into = rng.random() < 0.5
    rep.fields.update(shape=(m, n), dtype=dt, style=style, out=into)
    leaves, views = leaves_for(rng, [edge_rows(rng, (m, n), dt, style)], [dt], ["x"], rep)
    x = views[0].make(leaves[0])
    out, whole = poisoned((m, n), dt, rng, rep, "y") if into else (None, None)
    with rep.backend():
        got = K.softmax(x, out=out)
    if into:
        assert got is out, f"{rep}\n  softmax(out=) returned another tensor than out"
        untouched_outside(out, whole, rep, "y")
    want = torch.softmax(x.double(), -1)
    spread = (x.double() - rowmax(x.double())).abs().nan_to_num(0.0, posinf=0.0, neginf=0.0)
    check(got, want, TOL[dt] * (want.abs() + rowmax(want) * 1e-3) + 4 * U32 * spread * want.abs() + 1e-30,
          "output", rep, dtype=dt)


@pytest.mark.parametrize("index", range(SWIGLU_CASES))
def test_swiglu(index, request):
    rng, rep = rng_for("swiglu", index), Replay("swiglu", index, request)
    dt, f = pick(rng, DTYPES), ragged(rng, cap=1000 if rep.triton else None)
    shape = (*leading_dims(rng, 3, budget_rows(rep, 2 * f, 30000, 1500)), 2 * f)
    scale = float(pick(rng, (1.0, 1.0, 1e4, 1e-3)))
    rep.fields.update(shape=shape, dtype=dt, scale=scale)
    x = torch.randn(shape, generator=seeded(rng), dtype=torch.float64) * scale
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


def _rot(x, c, s, sign=1.0):
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * c - sign * x2 * s, x2 * c + sign * x1 * s), -1)


def _rot_abs(x, c, s):
    x1, x2 = x.abs().chunk(2, -1)
    return torch.cat((x1 * c.abs() + x2 * s.abs(),) * 2, -1)


@pytest.mark.parametrize("index", range(ROTARY_CASES))
def test_rotary(index, request):
    """Even cases: the op with gradients; odd ones: the kernel function into poisoned q_out/k_out (or in place)."""
    rng, rep = rng_for("rotary", index), Replay("rotary", index, request)
    dt, D = pick(rng, DTYPES), int(pick(rng, (16, 32, 128, 256)))
    B, H, Hkv, N = int(pick(rng, (0, 1, 1, 2))), int(pick(rng, (1, 3))), int(pick(rng, (1, 2))), ragged(rng)
    while max(B, 1) * N * (H + Hkv) * D > (2000 if rep.triton else 60000) and N > 1:
        N = max(1, N // 3)
    scale = float(pick(rng, (1.0, 1e4 if dt == torch.float16 else 1e20)))
    cos, sin = K.rotary_tables(N, D, theta=float(pick(rng, (10000.0, 500000.0))))
    rep.fields.update(dtype=dt, q=(B, N, H, D), Hkv=Hkv, scale=scale)
    g = seeded(rng)
    tensors = [torch.randn(B, N, H, D, generator=g, dtype=torch.float64) * scale,
               torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)]
    leaves, views = leaves_for(rng, tensors, [dt, dt], ["q", "k"], rep)
    c64, s64 = cos.double()[None, :, None], sin.double()[None, :, None]
    if index % 2 == 0:
        flags = grad_flags(rng, 2, rep)
        gq, gk = UpstreamGrad(rng), UpstreamGrad(rng)
        rep.fields.update(dq=gq, dk=gk)
        fuzz_grads(rep, lambda q, k: ops.rotary(q, k, cos, sin), lambda q, k: (_rot(q, c64, s64), _rot(k, c64, s64)),
                   leaves, views, flags, (gq, gk), names=["q", "k"],
                   out_bound=lambda k, want, ins: TOL[dt] * (want.abs() + _rot_abs(ins[k], c64, s64)),
                   grad_bound=lambda i, grad, ins: TOL[dt] * (grad.abs() + _rot_abs(
                       (gq, gk)[i].values(ins[i].shape, dt), c64, s64)), out_dtypes=(dt, dt))
        return
    q, k = (v.make(t) for v, t in zip(views, leaves, strict=True))
    inverse = bool(rng.random() < 0.5)
    mode = pick(rng, ("poisoned", "poisoned", "in_place"))
    rep.fields.update(inverse=inverse, mode=mode)
    sign = -1.0 if inverse else 1.0
    want = tuple(_rot(t.double(), c64, s64, sign) for t in (q, k))
    mags = tuple(_rot_abs(t.double(), c64, s64) for t in (q, k))      # (before an in-place call overwrites q, k)
    if mode == "in_place":                       # q_out is q, k_out is k: each element read before its store
        q, k = q.clone(), k.clone()
        outs, wholes = (q, k), (None, None)
    else:
        (qo, qw), (ko, kw) = poisoned(tuple(q.shape), dt, rng, rep, "q"), poisoned(tuple(k.shape), dt, rng, rep, "k")
        outs, wholes = (qo, ko), (qw, kw)
    with rep.backend():
        got = K.rotary(q, k, cos, sin, inverse=inverse, q_out=outs[0], k_out=outs[1])
    for name, o, w, mag, out, whole in zip("qk", got, want, mags, outs, wholes, strict=True):
        assert o is out, f"{rep}\n  rotary returned another tensor than {name}_out"
        if whole is not None:
            untouched_outside(out, whole, rep, f"{name}_out")
        check(o, w, TOL[dt] * (w.abs() + mag), f"{name}_out", rep, dtype=dt)


@pytest.mark.parametrize("index", range(CE_CASES))
def test_fused_linear_cross_entropy(index, request):
    rng, rep = rng_for("cross_entropy", index), Replay("cross_entropy", index, request)
    dt = pick(rng, DTYPES)
    T, d, V = ragged(rng, zero=0.08, cap=1000), int(pick(rng, (1, 3, 17, 64, 129))), max(1, ragged(rng, zero=0))
    if rep.triton:                  # the interpreter runs the loss's kernel a program a row, each in Python
        T = min(T, 8)
    while T * V * d > (3000 if rep.triton else 400000) and max(T, d, V) > 1:
        if d > 17:
            d //= 2
        elif T >= V:
            T = max(1, T // 3)
        else:
            V = max(1, V // 3)
    # a class as ignore_index only where another class is left (V = 1 would ignore every row: drawn below)
    ignore = int(pick(rng, (-100, 0, V - 1))) if V > 1 else -100
    g = seeded(rng)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[torch.rand(T, generator=g) < pick(rng, (0.0, 0.0, 0.3, 0.3, 1.0))] = ignore   # 1.0: every row ignored
    labels = labels.to(pick(rng, (torch.int64, torch.int32)))
    style = pick(rng, ("normal", "normal", "huge_rows", "big_rows"))
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    if T and style != "normal":
        rows = torch.rand(T, generator=g) < 0.3
        rows[int(rng.integers(T))] = True
        # -1e30 in f32 (logits near -1e30: the loss that size); 1e3 in bf16/f16 (logits past f16's range are inf
        # in torch's f16 x @ w.T too: kept at 1e3 / sqrt(d) each)
        x[rows] = -1e30 if dt == torch.float32 and style == "huge_rows" else 1e3 / math.sqrt(d) * x[rows].sign()
    w = torch.randn(V, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    leaves, views = leaves_for(rng, [x, w], [dt, dt], ["x", "weight"], rep)
    flags = grad_flags(rng, 2, rep)
    gl = UpstreamGrad(rng)
    rep.fields.update(dtype=dt, T=T, d=d, V=V, ignore=ignore, labels=labels.dtype, style=style, dloss=gl,
                      counted=int((labels != ignore).sum()))
    counted = (labels != ignore).double()
    n = max(1.0, float(counted.sum()))

    def theirs(x, w):
        return F.cross_entropy(x @ w.T, labels.long(), ignore_index=ignore)

    def parts(ins):
        x, w = ins
        mag = x.abs() @ w.abs().T
        err = (TOL[dt] + (d + 2) * U32) * rowmax(mag)
        p = torch.softmax(x @ w.T, -1) * counted[:, None]
        onehot = F.one_hot(labels.long().clamp(0, V - 1), V).double() * counted[:, None]
        return x, w, p, onehot, err

    def out_bound(_, want, ins):
        *_, err = parts(ins)
        return TOL[dt] * want.abs() + 2 * (err[:, 0] * counted).sum() / n + 1e-6

    def grad_bound(i, grad, ins):
        x, w, p, onehot, err = parts(ins)
        err = err.clamp(max=4.0)
        top = float(err.max()) if err.numel() else 0.0
        dloss = abs(float(gl.values((), torch.float32)))
        weight = p * (1 + 2 * err) + onehot
        terms = (weight @ w.abs() if i == 0 else weight.T @ x.abs()) * dloss / n
        sub = torch.finfo(dt).smallest_normal * torch.finfo(dt).eps
        return 2 * TOL[dt] * grad.abs() + (2 * TOL[dt] + 2 * top + (max(V, T) + 2) * U32) * terms + \
            dloss * sub

    fuzz_grads(rep, lambda x, w: ops.fused_linear_cross_entropy(x, w, labels, ignore), theirs, leaves, views,
               flags, (gl,), names=["x", "weight"], out_bound=out_bound, grad_bound=grad_bound,
               out_dtypes=(torch.float32,))


@pytest.mark.parametrize("index", range(GEMM_CASES))
def test_gemm_into_poisoned_out(index, request):
    rng, rep = rng_for("gemm", index), Replay("gemm", index, request)
    dt = pick(rng, (torch.bfloat16, torch.float16))
    M, Kd, N = (ragged(rng, zero=0.08) for _ in range(3))
    while M * Kd * N > (20000 if rep.triton else 300000):
        big = max(M, Kd, N)
        M, Kd, N = (max(1, s // 3) if s == big else s for s in (M, Kd, N))
    act, odt = pick(rng, (None, *ACTIVATIONS)), pick(rng, (None, None, *DTYPES))
    has_bias, has_res = rng.random() < 0.5, rng.random() < 0.5
    bdt, rdt = pick(rng, DTYPES), pick(rng, DTYPES)
    scale = float(pick(rng, (1.0, 1.0, 30.0)))
    rep.fields.update(dtype=dt, MKN=(M, Kd, N), act=act, out_dtype=odt, bias=has_bias and bdt,
                      residual=has_res and rdt, scale=scale)
    g = seeded(rng)
    tensors = [torch.randn(M, Kd, generator=g, dtype=torch.float64) * scale,
               torch.randn(Kd, N, generator=g, dtype=torch.float64) / math.sqrt(max(Kd, 1))]
    dtypes, names = [dt, dt], ["a", "b"]
    if has_bias:
        tensors, dtypes, names = tensors + [torch.randn(N, generator=g, dtype=torch.float64)], dtypes + [bdt], \
            names + ["bias"]
    if has_res:
        tensors, dtypes, names = tensors + [torch.randn(M, N, generator=g, dtype=torch.float64)], \
            dtypes + [rdt], names + ["residual"]
    leaves, views = leaves_for(rng, tensors, dtypes, names, rep)
    ins = [v.make(t) for v, t in zip(views, leaves, strict=True)]
    kw = dict(zip(names[2:], ins[2:], strict=True))
    odtype = dt if odt is None else odt
    out, whole = poisoned((M, N), odtype, rng, rep, "c")
    with rep.backend():
        got = K.gemm(ins[0], ins[1], activation=act, out_dtype=odt, out=out, **kw)
    assert got is out, f"{rep}\n  gemm(out=) returned another tensor than out"
    untouched_outside(out, whole, rep, "c")
    a, b = ins[0].double(), ins[1].double()
    pre = a @ b + (kw["bias"].double() if has_bias else 0)
    want = torch_activation(pre, act) + (kw["residual"].double() if has_res else 0)
    mag = a.abs() @ b.abs() + (kw["bias"].double().abs() if has_bias else 0)
    bound = TOL[odtype] * want.abs() + (Kd + 2) * U32 * 2 * mag + \
        (TOL[odtype] * (mag + kw["residual"].double().abs()) if has_res else TOL[odtype] * mag)
    check(got, want, bound, "output", rep, dtype=odtype)
