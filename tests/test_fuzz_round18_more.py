"""Fuzz round eighteen, part two: the public ops (``tilestack.rms_norm``, ``layer_norm``, ``add_rms_norm``,
``swiglu``, ``rotary``, ``attention``, ``fused_linear_cross_entropy``, and ``tilestack.kernels.gemm`` with its
epilogues, ``softmax`` and ``fused_linear_cross_entropy``) with their scalar arguments given as NumPy numbers, NumPy
bools and 0-d tensors, their inputs laid out every way a view can be (transposed, expanded with stride 0, channels-last,
a slice at an offset, 0-size dims), requiring grad or not (each subset of q, k, v and of x, weight, bias),
with NaN and inf in them, and their tuning constants and
launch options given as NumPy ints or as floats and bools equal to an int.

Each case draws from its own generator, ``np.random.default_rng([SEED, group, case])``, and is checked against
float64 torch (values, and gradients where one is asked for), with NaN where float64 has NaN and nowhere else; a
scalar argument of the wrong kind must be refused by name before any work (rounds 8 and 12-16 fuzzed the layouts and
edge values with Python scalars: this round found them right again, and draws NumPy and tensor scalars over them).

What this round found (each test below failed before its fix):
- a kernel's launcher was cached under its constants' values alone, and ``True == 1 == 1.0`` in Python:
  ``kernels.gemm(a, b, GROUP_M=True)`` or ``BM=32.0`` (refused as "constant BM is declared int" when first seen) was
  taken once ``GROUP_M=1`` or ``BM=32`` had launched, so the same call passed or failed by what ran before. The
  launcher key now holds each constant's type;
- ``kernels.gemm(a, b, num_warps=np.int64(4))`` was refused by every backend ("expected a positive int") where
  ``BM=np.int64(32)`` was taken: a launch option that is a NumPy int is now the int it is;
- ``kernels.fused_linear_cross_entropy(..., chunk=np.int64(2))`` was refused as "no positive int" where
  ``ignore_index=np.int64(...)`` was taken;
- ``kernels.rotary_tables(n, d, device=...)`` failed inside torch: a table past int64 (``n=1 << 62``) with
  "Storage size calculation overflowed", ``device="tpu"`` with torch's RuntimeError, ``device=3.5`` with its
  TypeError from arange, ``device="cuda"`` on a machine without CUDA with a bare AssertionError ("Torch not compiled
  with CUDA enabled"); each is now a LaunchError naming the argument (a table is at most 2**48 entries).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tilestack
import tilestack.kernels as K
from tilestack.errors import LaunchError, TilestackError

SEED = 1801
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
       torch.float16: dict(rtol=4e-3, atol=4e-3)}


def rng_for(group: int, case: int) -> np.random.Generator:
    return np.random.default_rng([SEED, group, case])


def randn(rng: np.random.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


def close(got: torch.Tensor, want: torch.Tensor, dtype, what: str) -> None:
    """got against float64 ``want`` within the bounds of ``dtype``, NaN exactly where want has NaN."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}; expected {tuple(want.shape)}"
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN where float64 has none, or the reverse"
    torch.testing.assert_close(got.double(), want, equal_nan=True, msg=lambda m: f"{what}: {m}", **TOL[dtype])


def layout(rng: np.random.Generator, t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t``'s values in the memory layout ``kind``: contiguous, the transpose of a contiguous tensor of the swapped
    shape (the last two dims), a slice at an offset of a wider tensor, expanded from one row (stride 0), or
    channels-last (4-d)."""
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "offset":
        wide = torch.cat([t, t[..., :1]], dim=-1) if t.shape[-1] else t
        return torch.cat([t.new_zeros(*t.shape[:-1], 1), wide], dim=-1)[..., 1:1 + t.shape[-1]]
    if kind == "expanded" and t.dim() >= 2 and t.shape[0] > 0:
        return t[:1].expand_as(t)
    if kind == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


def numpy_scalar(rng: np.random.Generator, value: float):
    """``value`` as a NumPy float of a drawn width, or a Python float."""
    return [float, np.float64, np.float32][int(rng.integers(3))](value)


# ---- norms with NumPy eps, every layout, NaN and inf rows, gradients ---------------------------------------------
def rms64(x, w, eps):
    x = x.double()
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + float(eps)) * w.double()


@pytest.mark.parametrize("case", range(24))
def test_norms_with_numpy_eps_against_float64(case):
    rng = rng_for(1, case)
    dtype = [torch.float32, torch.bfloat16, torch.float16][case % 3]
    lead = [tuple(int(s) for s in rng.choice([0, 1, 2, 3, 5], size=int(rng.integers(1, 4))))][0]
    n = int(rng.choice([1, 2, 7, 16, 33, 64]))
    kind = str(rng.choice(["contiguous", "transposed", "offset", "expanded", "channels_last"]))
    shape = (*lead, n) if kind != "channels_last" else (2, 3, 2, n)
    x = layout(rng, randn(rng, *shape, dtype=dtype), kind)
    if x.numel() and rng.random() < 0.4:                       # a NaN or an inf in one row: that row alone
        flat = x.contiguous().view(-1, n)
        flat[0, int(rng.integers(n))] = float(rng.choice([math.nan, math.inf, -math.inf]))
        x = flat.view(shape)
    w, b = randn(rng, n, dtype=dtype), randn(rng, n, dtype=dtype)
    eps = numpy_scalar(rng, float(rng.choice([1e-6, 1e-5, 0.1])))
    grad = bool(rng.random() < 0.5) and x.numel() > 0 and not x.isnan().any() and not x.isinf().any()
    xg, wg, bg = (t.detach().clone().requires_grad_(grad) for t in (x, w, b))
    what = f"replay: seed={SEED} group=1 case={case}: {dtype} {shape} {kind} eps={eps!r}"
    y = tilestack.rms_norm(xg, wg, eps)
    want = rms64(x, w, eps)
    close(y, want, dtype, f"rms_norm {what}")
    z = tilestack.layer_norm(xg, wg, bg, eps)
    want_ln = F.layer_norm(x.double(), (n,), w.double(), b.double(), float(eps))
    close(z, want_ln, dtype, f"layer_norm {what}")
    if grad:
        g = randn(rng, *shape, dtype=torch.float64)
        (y.double() * g).sum().backward()
        x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
        (rms64(x64, w64, eps) * g).sum().backward()
        close(xg.grad, x64.grad, dtype if dtype == torch.float32 else torch.bfloat16, f"rms_norm dx {what}")
        scale = max(1.0, float(w64.grad.abs().max()))
        close(wg.grad / scale, w64.grad / scale, torch.bfloat16 if dtype != torch.float32 else dtype,
              f"rms_norm dw {what}")


def test_add_rms_norm_with_a_residual_of_stride_0_and_numpy_eps():
    rng = rng_for(2, 0)
    x = layout(rng, randn(rng, 6, 16), "transposed")
    r = randn(rng, 1, 16).expand(6, 16)                   # one residual row for every row
    w = randn(rng, 16)
    y, h = tilestack.add_rms_norm(x, r, w, np.float32(1e-5))
    close(h, x.double() + r.double(), torch.float32, "add_rms_norm h")
    close(y, rms64(x.double() + r.double(), w, np.float32(1e-5)), torch.float32, "add_rms_norm y")


SCALARS = {"0-d tensor": torch.tensor(1e-5), "numpy bool": np.bool_(True), "bool": True, "str": "1e-5",
           "nan": math.nan, "negative": -1e-6, "None": None, "list": [1e-5], "1-elem array": np.array([1e-5])}


@pytest.mark.parametrize("label", sorted(SCALARS))
def test_norms_refuse_an_eps_that_is_no_number_by_name(label):
    x, w = torch.randn(3, 8), torch.randn(8)
    for name, call in (("rms_norm", lambda: tilestack.rms_norm(x, w, SCALARS[label])),
                       ("layer_norm", lambda: tilestack.layer_norm(x, w, torch.zeros(8), SCALARS[label])),
                       ("add_rms_norm", lambda: tilestack.add_rms_norm(x, x, w, SCALARS[label]))):
        with pytest.raises(LaunchError) as info:
            call()
        assert f"{name}: eps must be a number >= 0" in str(info.value), str(info.value)


# ---- attention with NumPy scale and causal ------------------------------------------------------------------
def attention64(q, k, v, causal, scale):
    q, k, v = q.double(), k.double(), v.double()
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        nq, nk = s.shape[-2:]
        s = s.masked_fill(torch.ones(nq, nk, dtype=torch.bool).triu(1), -math.inf)
    dead = (s == -math.inf).all(-1, keepdim=True)        # a row that sees no key gives 0 (README)
    return torch.softmax(s, -1).masked_fill(dead, 0.0) @ v


@pytest.mark.parametrize("case", range(12))
def test_attention_with_numpy_scalars_and_views_against_float64(case):
    rng = rng_for(3, case)
    dtype = [torch.float32, torch.bfloat16, torch.float16][case % 3]
    b, h = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    nq, nk, d = int(rng.choice([0, 1, 5, 17])), int(rng.choice([1, 4, 17])), int(rng.choice([16, 32]))
    kind = str(rng.choice(["contiguous", "transposed", "offset", "expanded"]))
    q, k, v = (layout(rng, randn(rng, b, h, n, d, dtype=dtype), kind) for n in (nq, nk, nk))
    scale = numpy_scalar(rng, float(rng.choice([0.05, 0.25, 1.0])))
    causal = [bool, np.bool_][int(rng.integers(2))](rng.random() < 0.5)
    grad = bool(rng.random() < 0.5) and nq > 0
    qg, kg, vg = (t.detach().clone().requires_grad_(grad) for t in (q, k, v))
    what = f"replay: seed={SEED} group=3 case={case}: {dtype} q {tuple(q.shape)} k {tuple(k.shape)} {kind} " \
           f"causal={causal!r} scale={scale!r}"
    o = tilestack.attention(qg, kg, vg, causal=causal, scale=scale)
    want = attention64(q, k, v, bool(causal), float(scale))
    close(o, want, dtype, what)
    if grad:
        g = randn(rng, *o.shape, dtype=torch.float64)
        (o.double() * g).sum().backward()
        q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
        (attention64(q64, k64, v64, bool(causal), float(scale)) * g).sum().backward()
        for name, got, ref in (("dq", qg.grad, q64.grad), ("dk", kg.grad, k64.grad), ("dv", vg.grad, v64.grad)):
            top = max(1.0, float(ref.abs().max()))
            close(got / top, ref / top, torch.bfloat16 if dtype != torch.float32 else torch.float16, f"{name} {what}")


@pytest.mark.parametrize("case", range(8))
def test_attention_propagates_nan_and_inf_as_the_float64_formula(case):
    """A NaN or inf in one element of q, k or v: NaN exactly where softmax(q k^T * scale) v has NaN in float64 (a
    query row with a NaN is NaN, as the formula gives; torch's fused CPU SDPA gives 0 there, a masked row's value)."""
    rng = rng_for(8, case)
    dtype = [torch.float32, torch.bfloat16][case % 2]
    n, d = int(rng.choice([3, 9])), 16
    q, k, v = (randn(rng, 1, 2, n, d, dtype=dtype) for _ in range(3))
    which = int(rng.integers(3))
    (q, k, v)[which][0, int(rng.integers(2)), int(rng.integers(n)), int(rng.integers(d))] = float(
        rng.choice([math.nan, math.inf, -math.inf]))
    causal = bool(case % 3 == 0)
    o = tilestack.attention(q, k, v, causal=causal, scale=np.float32(0.25))
    close(o, attention64(q, k, v, causal, 0.25), dtype, f"replay: seed={SEED} group=8 case={case} {'qkv'[which]}")


@pytest.mark.parametrize("which", ["q", "k", "v", "qk", "kv", "qv"])
def test_attention_and_layer_norm_gradients_for_each_subset_that_requires_grad(which):
    """Only some inputs require grad: those get float64's gradient, the others none (None, not zeros)."""
    rng = rng_for(9, "qkv".index(which[0]) * 3 + len(which))
    q, k, v = (randn(rng, 1, 2, 6, 16) for _ in range(3))
    ts = [t.requires_grad_(name in which) for name, t in zip("qkv", (q, k, v), strict=True)]
    o = tilestack.attention(*ts, causal=True, scale=np.float64(0.3))
    g = randn(rng, *o.shape)
    o.backward(g)
    refs = [t.detach().double().requires_grad_(name in which) for name, t in zip("qkv", ts, strict=True)]
    attention64(*refs, True, 0.3).backward(g.double())
    for name, t, r in zip("qkv", ts, refs, strict=True):
        if name in which:
            close(t.grad, r.grad, torch.float32, f"d{name} with {which} requiring grad")
        else:
            assert t.grad is None, f"{name} requires no grad but got one"
    x, w, b = randn(rng, 5, 16), randn(rng, 16), randn(rng, 16)        # the same subsets over (x, w, b)
    ts = [t.requires_grad_(name in which) for name, t in zip("qkv", (x, w, b), strict=True)]
    y = tilestack.layer_norm(*ts, np.float32(1e-5))
    gy = randn(rng, *y.shape)
    y.backward(gy)
    refs = [t.detach().double().requires_grad_(name in which) for name, t in zip("qkv", ts, strict=True)]
    F.layer_norm(refs[0], (16,), refs[1], refs[2], float(np.float32(1e-5))).backward(gy.double())
    for name, t, r in zip("xwb", ts, refs, strict=True):
        if t.requires_grad:
            close(t.grad, r.grad, torch.float32, f"layer_norm d{name} with {which}")
        else:
            assert t.grad is None, f"layer_norm {name} requires no grad but got one"


def test_attention_refuses_a_scale_or_causal_of_the_wrong_kind_by_name():
    q = torch.randn(1, 1, 4, 16)
    for value in (torch.tensor(0.25), True, "0.25", math.nan, -0.25, [0.25]):
        with pytest.raises(LaunchError, match=r"scale must be a positive number or None"):
            tilestack.attention(q, q, q, scale=value)
    for value in (1, "yes", None, np.int64(1), torch.tensor(True)):
        with pytest.raises(LaunchError, match=r"causal must be a bool"):
            tilestack.attention(q, q, q, causal=value)


# ---- rotary, SwiGLU, softmax ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", range(6))
def test_rotary_with_numpy_table_sizes_and_strided_q_k(case):
    rng = rng_for(4, case)
    b, n, h, hk, d = 2, int(rng.choice([1, 3, 8])), 4, int(rng.choice([1, 2, 4])), int(rng.choice([16, 32, 64]))
    cos, sin = K.rotary_tables(np.int64(n), np.int32(d), np.float32(10000.0))
    cos64, sin64 = K.rotary_tables(n, d, 10000.0)
    torch.testing.assert_close(cos, cos64, rtol=0, atol=0)          # NumPy sizes give the same tables
    grad = bool(case % 2)
    qkv = randn(rng, b, n, h + 2 * hk, d).requires_grad_(grad)     # a fused projection: q and k are views of it
    q, k = qkv[:, :, :h], qkv[:, :, h:h + hk]
    got_q, got_k = tilestack.rotary(q, k, cos, sin)

    def rot64(x):
        x1, x2 = x.double().chunk(2, dim=-1)
        c, s = cos.double()[None, :, None, :], sin.double()[None, :, None, :]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    qkv64 = qkv.detach().double().requires_grad_(grad)
    want_q, want_k = rot64(qkv64[:, :, :h]), rot64(qkv64[:, :, h:h + hk])
    close(got_q, want_q.detach(), torch.float32, f"rotary q case {case}")
    close(got_k, want_k.detach(), torch.float32, f"rotary k case {case}")
    if grad:
        gq, gk = randn(rng, *got_q.shape, dtype=torch.float64), randn(rng, *got_k.shape, dtype=torch.float64)
        ((got_q.double() * gq).sum() + (got_k.double() * gk).sum()).backward()
        ((want_q * gq).sum() + (want_k * gk).sum()).backward()
        close(qkv.grad, qkv64.grad, torch.float32, f"rotary d(qkv) case {case}")   # zero on v's columns


def test_rotary_tables_refuse_a_size_or_device_torch_would_fail_on_by_name():
    for n, d in ((1 << 62, 64), (2, 1 << 62), (1 << 40, 1 << 10)):
        with pytest.raises(LaunchError, match=rf"rotary_tables: n={n}, d={d} make a table of .* expected at most"):
            K.rotary_tables(n, d)
    for device in ("tpu", 3.5, True, [0], "cuda:x", -1):
        with pytest.raises(LaunchError, match=r"rotary_tables: device="):
            K.rotary_tables(4, 16, device=device)
    if not torch.cuda.is_available():
        for device in ("cuda", "cuda:0", torch.device("cuda", 1)):
            with pytest.raises(LaunchError, match=r"this machine has 0 CUDA device"):
                K.rotary_tables(4, 16, device=device)
    for device in (None, "cpu", torch.device("cpu"), "meta"):    # taken, and the same tables (by hand) on the CPU
        cos, sin = K.rotary_tables(np.int64(5), 16, device=device)
        assert cos.shape == sin.shape == (5, 8) and cos.dtype == torch.float32
        if device != "meta":
            freq = 1e4 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)     # theta**(-2i/d)
            angles = torch.arange(5, dtype=torch.float64)[:, None] * freq[None, :]
            assert torch.equal(cos, angles.cos().float()) and torch.equal(sin, angles.sin().float())


@pytest.mark.parametrize("case", range(8))
def test_swiglu_and_softmax_on_views_with_nan_and_inf(case):
    rng = rng_for(5, case)
    dtype = [torch.float32, torch.bfloat16][case % 2]
    m, f = int(rng.choice([0, 1, 3, 9])), int(rng.choice([1, 8, 33]))
    kind = str(rng.choice(["contiguous", "transposed", "offset", "expanded"]))
    x = layout(rng, randn(rng, m, 2 * f, dtype=dtype), kind)
    if m and rng.random() < 0.5:
        x = x.clone()
        x[0, int(rng.integers(2 * f))] = float(rng.choice([math.nan, math.inf, -math.inf]))
    a, b = x.double()[:, :f], x.double()[:, f:]
    close(tilestack.swiglu(x), F.silu(a) * b, dtype, f"swiglu case {case} {kind} {tuple(x.shape)}")
    close(K.softmax(x), torch.softmax(x.double(), -1), dtype, f"softmax case {case} {kind} {tuple(x.shape)}")


# ---- gemm with epilogues: constants, launch options --------------------------------------------------------------
def test_a_constant_equal_to_an_int_is_refused_whatever_ran_before():
    rng = rng_for(6, 0)
    a, b = randn(rng, 40, 24, dtype=torch.bfloat16), randn(rng, 24, 40, dtype=torch.bfloat16)
    want = (a.double() @ b.double()).bfloat16().double()
    for good, bad in ((dict(GROUP_M=1), dict(GROUP_M=True)), (dict(BM=32), dict(BM=32.0)),
                      (dict(BK=16), dict(BK=16.0)), (dict(GROUP_M=4), dict(GROUP_M=4.0))):
        torch.testing.assert_close(K.gemm(a, b, **good).double(), want, rtol=1e-2, atol=1e-2)
        name, value = next(iter(bad.items()))
        with pytest.raises(LaunchError, match=rf"constant {name} is declared int; got {type(value).__name__}"):
            K.gemm(a, b, **bad)


def test_numpy_ints_as_constants_and_launch_options_give_the_int_answer():
    rng = rng_for(6, 1)
    a, b = randn(rng, 33, 40, dtype=torch.float16), randn(rng, 40, 17, dtype=torch.float16)
    bias = randn(rng, 17).expand(17)                               # (a bias given as an expanded view)
    res = randn(rng, 1, 17, dtype=torch.float16).expand(33, 17)    # one residual row for every row (stride 0)
    want = F.gelu(a.double() @ b.double() + bias.double()) + res.double()
    for kw in (dict(num_warps=np.int64(4)), dict(num_warps=np.int32(2), num_stages=np.int64(2)),
               dict(BM=np.int64(32), BN=np.int64(16), BK=np.int16(16), GROUP_M=np.int64(1))):
        got = K.gemm(a, b, bias=bias, activation=np.str_("gelu"), residual=res, out_dtype=torch.float32, **kw)
        torch.testing.assert_close(got.double(), want, rtol=5e-3, atol=5e-3, msg=lambda m, kw=kw: f"{kw}: {m}")
    for bad in (dict(num_warps=np.float64(4.0)), dict(num_warps=True), dict(num_warps=np.int64(3))):
        with pytest.raises(TilestackError, match="num_warps"):
            K.gemm(a, b, **bad)


# ---- fused linear + cross-entropy ---------------------------------------------------------------------------------
def ce64(x, w, labels, ignore_index):
    return F.cross_entropy(x.double() @ w.double().T, labels, ignore_index=ignore_index)


@pytest.mark.parametrize("case", range(6))
def test_fused_linear_cross_entropy_with_numpy_chunk_and_ignore_index(case):
    rng = rng_for(7, case)
    t, d, v = int(rng.choice([1, 5, 12])), int(rng.choice([8, 16])), int(rng.choice([3, 10, 40]))
    x = layout(rng, randn(rng, t, d), str(rng.choice(["contiguous", "transposed", "offset"])))
    w = layout(rng, randn(rng, v, d), str(rng.choice(["contiguous", "transposed"])))
    labels = torch.from_numpy(rng.integers(0, v, t))
    ignore = [np.int64, np.int32, int][case % 3](int(labels[0]) if case % 2 else -100)
    chunk = [np.int64, np.int32, int][(case + 1) % 3](int(rng.integers(1, t + 1)))
    loss, dx, dw = K.fused_linear_cross_entropy(x, w, labels, ignore_index=ignore, chunk=chunk)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    want = ce64(x64, w64, labels, int(ignore))
    what = f"replay: seed={SEED} group=7 case={case} chunk={chunk!r} ignore_index={ignore!r}"
    close(loss.reshape(()), want.detach(), torch.float32, f"loss {what}")
    if not want.isnan():
        want.backward()
        close(dx, x64.grad, torch.float32, f"dx {what}")
        close(dw, w64.grad, torch.float32, f"dw {what}")
    same = K.fused_linear_cross_entropy(x, w, labels, ignore_index=int(ignore), chunk=int(chunk))
    for got, again in zip((loss, dx, dw), same, strict=True):        # a NumPy int is the int it is: bit for bit
        torch.testing.assert_close(got, again, rtol=0, atol=0, equal_nan=True)
    xg = x.detach().clone().requires_grad_()
    top = tilestack.fused_linear_cross_entropy(xg, w, labels, ignore_index=ignore)
    close(top.reshape(()), want.detach(), torch.float32, f"tilestack.fused_linear_cross_entropy {what}")


def test_fused_linear_cross_entropy_refuses_a_chunk_or_switch_of_the_wrong_kind():
    x, w, labels = torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3])
    for value in (0, -1, 2.0, True, "2", np.float64(2.0), torch.tensor(2)):
        with pytest.raises(LaunchError, match=r"chunk must be a positive int, got"):
            K.fused_linear_cross_entropy(x, w, labels, chunk=value)
    for value in (1, np.bool_(False), "no", None):
        with pytest.raises(LaunchError, match=r"grad must be a bool"):
            K.fused_linear_cross_entropy(x, w, labels, grad=value)
    for value in (3.0, torch.tensor(3), "3", 1 << 70):
        with pytest.raises(LaunchError, match=r"ignore_index must be an int"):
            tilestack.fused_linear_cross_entropy(x, w, labels, ignore_index=value)
