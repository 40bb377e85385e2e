"""Fuzz round twelve, part two: attention, rotary, the fused linear + cross-entropy, gemm with epilogues and the
quantized linear over seeded random cases against float64 torch (tests/_fuzz_round12.py says what is shared).

Attention: GQA head ratios 1-4, Nq != Nk under both causal alignments, head dims 1..256 (80, 96, 112 among them)
with Dv != D, bool and additive masks holding -inf (rows that see no key: 0, as torch's SDPA gives), broadcast
masks, q/k/v permuted in memory ((B, N, H, D) storage), stepped, or expanded along B or H; the gradients against
torch's autograd in float64, bounded by the sizes of the terms each sums (P, dS), computed here in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tilestack
import tilestack.kernels as K
from _fuzz_round12 import (
    DTYPES,
    LAYOUTS,
    TOL,
    U32,
    Replay,
    backend_for,
    check,
    float64_refused,
    fuzz_case,
    grad_flags,
    inputs,
    out_grad,
    pick,
    rng_for,
    row_bound,
    rowmax,
    run_on_backend,
    values,
    width,
)
from tilestack.kernels.gemm import ACTIVATIONS, torch_activation
from tilestack.quant import quantize_weight, quantized_linear
from tilestack.quant.gemm import inverse_scale
from tilestack.torch import ops

ATTENTION_CASES, ROTARY_CASES, CE_CASES, GEMM_CASES, QUANT_CASES = 80, 40, 40, 60, 40
SEQ = (1, 1, 2, 3, 5, 7, 13, 16, 17, 31, 33, 64, 65)
HEAD_DIMS = (1, 2, 3, 5, 8, 16, 17, 31, 32, 33, 64, 80, 96, 112, 127, 128, 129, 160, 255, 256)


def _budget(index: int, reference: int, triton: int) -> int:
    return reference if backend_for(index) == "reference" else triton


def _seq(rng, zero: float = 0.04) -> int:
    return 0 if rng.random() < zero else int(pick(rng, SEQ))


def _attention_mask(rng, B, H, Nq, Nk, rep):
    """None, or a bool (True = attend) / additive mask holding -inf, of a shape broadcast to (B, H, Nq, Nk); a row
    all False / -inf now and then (that query sees no key)."""
    r = rng.random()
    if r < 0.45:
        return None
    shape = pick(rng, [(B, H, Nq, Nk), (B, 1, Nq, Nk), (1, H, 1, Nk), (Nq, Nk), (H, Nq, 1), (1, Nk)])
    keep = torch.from_numpy(rng.random(shape) < pick(rng, (0.5, 0.8, 0.95)))
    if len(shape) >= 2 and shape[-2] > 0 and rng.random() < 0.3:
        keep[..., int(rng.integers(shape[-2])), :] = False               # a query row that sees no key
    if r < 0.7:
        mask = keep
    else:
        mask = torch.from_numpy(rng.standard_normal(shape)).float().masked_fill(~keep, -math.inf)
    if mask.dim() >= 2 and rng.random() < 0.3:                            # stored transposed
        mask = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    rep["mask"] = f"{tuple(mask.shape)}:{str(mask.dtype).removeprefix('torch.')}"
    return mask


def _keep(mask, causal, align, Nq, Nk):
    """The float64 reference's mask: the user's (bool, or additive float64) and the causal triangle."""
    m = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    if causal:
        tri = torch.ones(Nq, Nk, dtype=torch.bool).tril(0 if align == "top_left" else Nk - Nq)
        m = tri if m is None else (m & tri if m.dtype == torch.bool else m.masked_fill(~tri, -math.inf))
    return m


@pytest.mark.parametrize("index", range(ATTENTION_CASES))
def test_attention(index):
    rng, rep = rng_for("attention", index), Replay("attention", index)
    dt = pick(rng, DTYPES)
    B, Hkv, groups = (0 if rng.random() < 0.04 else int(pick(rng, (1, 1, 2)))), int(pick(rng, (1, 2, 3))), \
        int(pick(rng, (1, 1, 2, 3, 4)))
    H, Nq, Nk = Hkv * groups, _seq(rng), _seq(rng)
    D = int(pick(rng, HEAD_DIMS))
    Dv = D if rng.random() < 0.5 else int(pick(rng, HEAD_DIMS))
    while max(B, 1) * H * max(Nq, Nk, 1) * (D + Dv) > _budget(index, 60000, 3000) and max(Nq, Nk) > 1:
        Nq, Nk = max(1, Nq // 2) if Nq else 0, max(1, Nk // 2) if Nk else 0
    if backend_for(index) == "triton":        # the interpreter runs each (B, H) program in Python: few heads
        B, Hkv = min(B, 1), 1
        H = groups
    causal, align = bool(rng.random() < 0.5), pick(rng, ("top_left", "bottom_right"))
    scale = None if rng.random() < 0.6 else float(rng.uniform(0.05, 1.0))
    sharp = float(pick(rng, (1.0, 1.0, 2.0, 4.0)))                       # q scaled: sharper softmax
    rep.fields.update(dtype=dt, q=(B, H, Nq, D), kv=(B, Hkv, Nk, D, Dv), causal=causal, align=align, scale=scale,
                      sharp=sharp)
    mask = _attention_mask(rng, B, H, Nq, Nk, rep)
    tensors = [values(rng, (B, H, Nq, D)) * sharp, values(rng, (B, Hkv, Nk, D)), values(rng, (B, Hkv, Nk, Dv))]
    leaves, makes = inputs(rng, tensors, [dt] * 3, rep, ["q", "k", "v"])
    flags = grad_flags(rng, 3, rep)
    no_grad = any(flags) and rng.random() < 0.1
    rep["no_grad"] = no_grad
    gy = out_grad(rng)
    sm = D ** -0.5 if scale is None else scale
    keep = _keep(mask, causal, align, Nq, Nk)

    def ours(q, k, v):
        return tilestack.attention(q, k, v, causal, scale, attn_mask=mask, causal_align=align)

    def theirs(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=sm, enable_gqa=True)

    def probs(ins):
        """P (B, H, Nq, Nk) in float64, 0 in rows that see no key; k and v repeated per group."""
        q, k, v = (t.detach() for t in ins)
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        s = q @ k.transpose(-1, -2) * sm
        if keep is not None:
            s = s.masked_fill(~keep, -math.inf) if keep.dtype == torch.bool else s + keep
        return torch.softmax(s, -1).nan_to_num(0.0), q, k, v

    def out_bound(_, want, ins):
        p, _, _, v = probs(ins)
        return TOL[dt] * (want.abs() + 2 * p @ v.abs())               # P rounded to dt before P @ V

    def grad_bound(i, g, ins):
        p, q, k, v = probs(ins)
        do = gy(p[..., :1].expand(*p.shape[:-1], Dv)).abs()            # (B, H, Nq, Dv), the output's gradient
        o = p @ v
        ds = p * (do @ v.abs().transpose(-1, -2) + (do * o.abs()).sum(-1, keepdim=True))   # |dS|'s terms
        mag = [sm * ds @ k.abs(), sm * ds.transpose(-1, -2) @ q.abs(), p.transpose(-1, -2) @ do][i]
        if i:                                                           # dk, dv: summed over the group's heads
            mag = mag.unflatten(1, (Hkv, groups)).sum(2)
        return TOL[dt] * (g.abs() + 4 * mag)
    fuzz_case(rep, ours, theirs, leaves, makes, flags, lambda outs: (gy(outs[0]),), dt, no_grad=no_grad,
              out_bound=out_bound, grad_bound=grad_bound, names=["q", "k", "v"], out_dtypes=(dt,))


@pytest.mark.parametrize("index", range(ROTARY_CASES))
def test_rotary(index):
    rng, rep = rng_for("rotary", index), Replay("rotary", index)
    dt, D = pick(rng, DTYPES), int(pick(rng, (16, 32, 64, 128, 256)))
    B, N, H, Hkv = int(pick(rng, (0, 1, 1, 2, 3))), _seq(rng), int(pick(rng, (1, 2, 3, 4))), int(pick(rng, (1, 2)))
    while max(B, 1) * max(N, 1) * (H + Hkv) * D > _budget(index, 40000, 2000) and N > 1:
        N //= 2
    style = pick(rng, ("normal", "wide", "outlier_rows", "nan", "tiny"))
    theta = float(pick(rng, (100.0, 10000.0, 500000.0)))
    rep.fields.update(dtype=dt, q=(B, N, H, D), k=(B, N, Hkv, D), style=style, theta=theta)
    cos, sin = K.rotary_tables(N, D, theta=theta)
    if rng.random() < 0.3:                                 # the tables as strided views too
        cos, sin = (torch.cat((t, t), 1)[:, ::2] for t in (cos, sin))
    leaves, makes = inputs(rng, [values(rng, (B, N, H, D), style), values(rng, (B, N, Hkv, D), style)], [dt] * 2,
                           rep, ["q", "k"])
    flags = grad_flags(rng, 2, rep)
    no_grad = any(flags) and rng.random() < 0.1
    rep["no_grad"] = no_grad
    gq, gk = out_grad(rng), out_grad(rng)

    def theirs(q, k):
        c, s = cos.double()[None, :, None], sin.double()[None, :, None]

        def rot(x):
            x1, x2 = x.chunk(2, -1)
            return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)
        return rot(q), rot(k)
    fuzz_case(rep, lambda q, k: ops.rotary(q, k, cos, sin), theirs, leaves, makes, flags,
              lambda outs: (gq(outs[0]), gk(outs[1])), dt, no_grad=no_grad, names=["q", "k"], out_dtypes=(dt, dt))


@pytest.mark.parametrize("index", range(CE_CASES))
def test_fused_linear_cross_entropy(index):
    rng, rep = rng_for("cross_entropy", index), Replay("cross_entropy", index)
    dt = pick(rng, DTYPES)
    T, d, V = _seq(rng, zero=0.06), max(1, min(width(rng, zero=0), 257)), max(1, width(rng, zero=0))
    while T * V * d > _budget(index, 150000, 4000) and T > 1:
        T //= 2
    style = pick(rng, ("normal", "normal", "wide", "tiny", "outlier_rows", "equal_rows", "zero_rows"))
    ignore = int(pick(rng, (-100, -1, 0, V - 1, V + 3)))
    labels = torch.from_numpy(rng.integers(0, V, T))
    labels[torch.from_numpy(rng.random(T) < pick(rng, (0.0, 0.2, 1.0)))] = ignore
    labels = labels.to(pick(rng, (torch.int64, torch.int32)))
    if T > 1 and rng.random() < 0.3:
        labels = torch.stack((labels, labels), 1)[:, 0]                  # a strided view
    rep.fields.update(dtype=dt, T=T, d=d, V=V, style=style, ignore=ignore, labels=labels.dtype)
    x, w = values(rng, (T, d), style), values(rng, (V, d)) * 0.3
    # logits past the dtype's range are inf in the kernels' logits as in torch's own fp16 x @ w.T (NaN in the
    # loss and, from an ignored row too, in the gradients): x kept within range, as training keeps it
    top = (x.abs().nan_to_num(0.0) @ w.abs().T).max().item() if x.numel() and w.numel() else 0.0
    if top > torch.finfo(dt).max / 4:
        x = x * (torch.finfo(dt).max / 4 / top)
    leaves, makes = inputs(rng, [x, w], [dt] * 2, rep, ["x", "weight"])
    flags = grad_flags(rng, 2, rep)
    counted = labels != ignore
    dloss = float(rng.uniform(0.5, 2.0))

    def theirs(x, w):
        return F.cross_entropy(x @ w.T, labels.long(), ignore_index=ignore)

    def parts(ins):
        x, w = (t.detach() for t in ins)
        mag = x.abs() @ w.abs().T                                       # (T, V): the logits' terms
        p = torch.softmax(x @ w.T, -1)
        onehot = F.one_hot(labels.long().clamp(0, V - 1), V).double() * counted[:, None]
        err = TOL[dt] * rowmax(mag)                                     # a logit's error (rounded to dt)
        return x, w, p * counted[:, None], onehot, err, max(1, int(counted.sum()))

    def out_bound(_, want, ins):
        x, w, p, onehot, err, n = parts(ins)
        return TOL[dt] * want.abs() + 2 * (err * counted[:, None]).sum() / n + 1e-6

    def grad_bound(i, g, ins):
        x, w, p, onehot, err, n = parts(ins)
        weight = (p + onehot) * (1 + 2 * err.clamp(max=4))              # P's relative error from the logits'
        mag = (weight @ w.abs() if i == 0 else weight.T @ x.abs()) / n
        return TOL[dt] * (g.abs() + 4 * mag) + (2 * err.clamp(max=4) * p @ w.abs() / n if i == 0 else
                                                2 * (err.clamp(max=4) * p).T @ x.abs() / n)
    fuzz_case(rep, lambda x, w: ops.fused_linear_cross_entropy(x, w, labels, ignore), theirs, leaves, makes,
              flags, lambda outs: (torch.tensor(dloss),), dt,
              out_bound=out_bound, grad_bound=grad_bound, names=["x", "weight"], out_dtypes=(torch.float32,))


@pytest.mark.parametrize("index", range(GEMM_CASES))
def test_gemm(index):
    rng, rep = rng_for("gemm", index), Replay("gemm", index)
    dt = pick(rng, (torch.bfloat16, torch.float16))
    M, Kd, N = _seq(rng, zero=0.05), width(rng, zero=0.05), width(rng, zero=0.05)
    while M * Kd * N > _budget(index, 400000, 60000):
        M, Kd, N = (max(1, s // 2) if s == max(M, Kd, N) else s for s in (M, Kd, N))
    act = pick(rng, (None, *ACTIVATIONS))
    odt = pick(rng, (None, None, *DTYPES))
    style = pick(rng, ("normal", "normal", "wide", "tiny", "outlier_rows", "zero_rows", "nan"))
    has_bias, has_res = rng.random() < 0.5, rng.random() < 0.5
    bdt, rdt = pick(rng, DTYPES), pick(rng, DTYPES)
    rep.fields.update(dtype=dt, MKN=(M, Kd, N), act=act, out_dtype=odt, style=style, bias=has_bias and bdt,
                      residual=has_res and rdt)
    tensors, dtypes, names = [values(rng, (M, Kd), style), values(rng, (Kd, N)) * 0.3], [dt, dt], ["a", "b"]
    if has_bias:
        tensors, dtypes, names = tensors + [values(rng, (N,))], dtypes + [bdt], names + ["bias"]
    if has_res:
        tensors, dtypes, names = tensors + [values(rng, (M, N))], dtypes + [rdt], names + ["residual"]
    leaves, makes = inputs(rng, tensors, dtypes, rep, names)
    ins = [make(t) for make, t in zip(makes, leaves, strict=True)]
    kw = dict(zip(names[2:], ins[2:], strict=True))
    with run_on_backend(rep):
        got = K.gemm(ins[0], ins[1], activation=act, out_dtype=odt, **kw)
    a, b = ins[0].double(), ins[1].double()
    pre = a @ b + (kw["bias"].double() if has_bias else 0)
    want = torch_activation(pre, act) + (kw["residual"].double() if has_res else 0)
    mag = a.abs() @ b.abs() + (kw["bias"].double().abs() if has_bias else 0)
    out = dt if odt is None else odt
    bound = TOL[out] * want.abs() + (Kd + 2) * U32 * 2 * mag + (TOL[out] * kw["residual"].double().abs()
                                                                 if has_res else 0)
    check(got, want, bound, "output", rep, dtype=out)


@pytest.mark.parametrize("index", range(QUANT_CASES))
def test_quantized_linear(index):
    rng, rep = rng_for("quantized_linear", index), Replay("quantized_linear", index)
    dt, mode = pick(rng, DTYPES), pick(rng, ("int8", "fp8"))
    M, Kd, N = _seq(rng, zero=0.05), max(1, width(rng, zero=0)), max(1, width(rng, zero=0))
    while M * Kd * N > _budget(index, 300000, 40000):
        M, Kd, N = (max(1, s // 2) if s == max(M, Kd, N) else s for s in (M, Kd, N))
    x_scale = float(pick(rng, (0.01, 0.02, 0.125))) if mode == "fp8" and rng.random() < 0.5 else None
    act = pick(rng, (None, *ACTIVATIONS))
    style = pick(rng, ("normal", "wide", "tiny", "zero_rows", "nan"))
    has_bias, has_res = rng.random() < 0.5, rng.random() < 0.3
    rep.fields.update(dtype=dt, mode=mode, MKN=(M, Kd, N), x_scale=x_scale, act=act, style=style, bias=has_bias,
                      residual=has_res)
    wrows = values(rng, (N, Kd), pick(rng, ("normal", "zero_rows", "equal_rows")))
    q, s = quantize_weight(wrows.float(), mode)
    tensors, dtypes, names = [values(rng, (M, Kd), style)], [dt], ["x"]
    if has_bias:
        tensors, dtypes, names = tensors + [values(rng, (N,))], dtypes + [dt], names + ["bias"]
    if has_res:
        tensors, dtypes, names = tensors + [values(rng, (M, N))], dtypes + [dt], names + ["residual"]
    leaves, makes = inputs(rng, tensors, dtypes, rep, names, layouts=LAYOUTS)
    ins = [make(t) for make, t in zip(makes, leaves, strict=True)]
    if rng.random() < 0.3:
        q = q.t().contiguous().t()                                          # stored column-major
    kw = dict(zip(names[1:], ins[1:], strict=True))
    with run_on_backend(rep):
        got = quantized_linear(ins[0], q, s, kw.get("bias"), x_scale=x_scale, activation=act,
                               residual=kw.get("residual"))
    x = ins[0].double()
    if x_scale is not None:        # x quantized as the kernels do: f32 x * f32(1 / x_scale), saturated, E4M3
        x = (ins[0].float() * inverse_scale(x_scale)).clamp(-448, 448).to(torch.float8_e4m3fn).double() * x_scale
    w = q.double() * s.double()[:, None]                                    # (N, K)
    pre = x @ w.T + (kw["bias"].double() if has_bias else 0)
    want = torch_activation(pre, act) + (kw["residual"].double() if has_res else 0)
    mag = x.abs().nan_to_num(0.0) @ w.abs().T + (kw["bias"].double().abs() if has_bias else 0)
    bound = TOL[dt] * (want.abs() + (kw["residual"].double().abs() if has_res else 0)) + (Kd + 2) * U32 * 2 * mag
    check(got, want, bound, "output", rep, dtype=dt)


@pytest.mark.parametrize("op", ["attention", "rotary", "cross_entropy", "gemm", "quantized_linear"])
def test_float64_refused(op):
    q = torch.randn(1, 2, 3, 16, dtype=torch.float64)
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    call = {"attention": lambda: tilestack.attention(q, q, q),
            "rotary": lambda: ops.rotary(q.transpose(1, 2), q.transpose(1, 2), *K.rotary_tables(3, 16)),
            "cross_entropy": lambda: ops.fused_linear_cross_entropy(x, w, torch.tensor([0, 1, 2])),
            "gemm": lambda: K.gemm(x, w.T),
            "quantized_linear": lambda: quantized_linear(x, *quantize_weight(w.float(), "int8"))}[op]
    float64_refused(call, op)


def test_row_bound_is_not_vacuous():
    """The shared comparison catches what it is for: a wrong element, a NaN where torch has none, a finite value
    where the dtype overflows, and a NaN missing where torch has one."""
    rep = Replay("softmax", -1)
    want = torch.tensor([[1.0, 2.0, 70000.0, math.nan]], dtype=torch.float64)
    good = torch.tensor([[1.0, 2.0, math.inf, math.nan]], dtype=torch.float16)
    check(good, want, row_bound(TOL[torch.float16], want[:, :3]).amax(), "good", rep)
    for bad in ([1.1, 2.0, math.inf, math.nan], [1.0, math.nan, math.inf, math.nan], [1.0, 2.0, 60000.0, math.nan],
                [1.0, 2.0, math.inf, 0.0]):
        with pytest.raises(AssertionError, match="replay: seed=1200 op=softmax"):
            check(torch.tensor([bad], dtype=torch.float16), want, 1e-3, "bad", rep)


def _failures(test, cases) -> list[str]:
    """The assertion messages of the cases of ``test`` that fail."""
    out = []
    for case in cases:
        try:
            test(*case)
        except AssertionError as e:
            out.append(str(e))
    return out


def test_the_fuzz_catches_a_wrong_forward(monkeypatch):
    """attention's output off by a tenth of its largest |o|: every case with an output element fails, replayably."""
    real = tilestack.attention

    def off(q, k, v, *args, **kw):
        o = real(q, k, v, *args, **kw)
        return o + 0.1 * o.detach().abs().amax() if o.numel() else o

    monkeypatch.setattr(tilestack, "attention", off)
    failed = _failures(test_attention, [(i,) for i in range(12)])
    assert len(failed) >= 8, failed
    assert all(m.startswith("replay: seed=1200 op=attention case=") and "dtype=" in m for m in failed), failed


def test_the_fuzz_catches_a_wrong_gradient(monkeypatch):
    """rms_norm's dx doubled (the forward right): the cases where x needs a gradient (4 of these 12) fail, naming
    it; the others pass."""
    from test_fuzz_round12 import test_norm

    real = ops._NormPlan.backward

    def off(self, *args):
        dx, sums = real(self, *args)
        return dx * 2, sums

    monkeypatch.setattr(ops._NormPlan, "backward", off)
    failed = _failures(test_norm, [("rms_norm", i) for i in range(12)])
    assert len(failed) == 4, failed
    assert all("gradient of x" in m and "op=rms_norm" in m for m in failed), failed
