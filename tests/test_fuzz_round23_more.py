"""Fuzz round twenty-three, part two: the kernel functions' outputs (``out=``, ``q_out=``, ``da=``) as views that
overlap themselves (``as_strided`` rows sharing elements) refused by name, and as transposed or offset views written
exactly where they lie; the GEMM epilogue on inputs of every layout; every subset of inputs that require grad (the
gradients None exactly where torch's are, values as float64's, the same through ``torch.autograd.grad`` with
``allow_unused``); results under ``torch.no_grad`` and ``torch.inference_mode``, and a plan made in one mode used in
another; a double backward through the weight alone refused by name; attention with Nq != Nk under both causal
alignments with GQA and Dv != D, fwd and bwd in bf16; masks broadcast from batch and head dims of size 1; size-0 dims
of the kernel functions with an epilogue and an ``out=``; mixed dtypes across arguments refused naming the argument,
before any kernel launches. CPU backends (the NumPy reference executor); every result starts as NaN
(``poisoned_allocations``).
"""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F

import tilestack
import tilestack.kernels as K
from test_fuzz_round22_more import close  # (NaN and infinities exactly where float64 torch has them)
from tilestack import config
from tilestack.errors import LaunchError
from tilestack.kernels import rotary_tables
from tilestack.testing.fuzz.outcomes import poisoned_allocations
from tilestack.torch import ops


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(2350 + seed)


def randn(seed: int, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=torch.float64).to(dtype)


COS, SIN = rotary_tables(3, 16)


def rotate64(t, inverse=False):
    h = t.shape[-1] // 2
    c, s = COS.double()[None, :, None], SIN.double()[None, :, None] * (-1 if inverse else 1)
    return torch.cat((t[..., :h] * c - t[..., h:] * s, t[..., h:] * c + t[..., :h] * s), -1)


def _launch_guard(monkeypatch, what: str):
    kernel_module = importlib.import_module("tilestack.lang.kernel")

    def launched(*args, **kwargs):
        raise AssertionError(f"{what}: a kernel launched before the bad argument was refused")
    monkeypatch.setattr(kernel_module.Kernel, "launcher_for", launched, raising=False)


# ---- outputs that overlap themselves: refused by name --------------------------------------------------------------
def _overlapping(shape, dtype=torch.float32):
    """A view of ``shape`` whose consecutive rows share all but one element (stride 1 along the rows)."""
    n = shape[-1]
    rows = 1
    for s in shape[:-1]:
        rows *= s
    strides = [1] * len(shape)
    return torch.zeros(rows + n + 8, dtype=dtype).as_strided(shape, tuple(strides[:-1]) + (1,), 3)


A16, B16 = randn(1, 4, 8, dtype=torch.bfloat16), randn(2, 8, 6, dtype=torch.bfloat16)
X = randn(3, 4, 8)
Q, KK = randn(4, 1, 3, 2, 16), randn(5, 1, 3, 1, 16)

OUT_OVERLAP = [
    ("gemm out", "out", lambda: K.gemm(A16, B16, out=_overlapping((4, 6), torch.bfloat16))),
    ("gemm out rows 3 apart", "out",
     lambda: K.gemm(A16, B16, bias=torch.zeros(6),
                    out=torch.zeros(40, dtype=torch.bfloat16).as_strided((4, 6), (3, 1)))),
    ("softmax out", "out", lambda: K.softmax(X, out=_overlapping((4, 8)))),
    ("swiglu out", "out", lambda: K.swiglu(X[:, :4], X[:, 4:], out=_overlapping((4, 4)))),
    ("swiglu_backward da", "da", lambda: K.swiglu_backward(X[:, :4], X[:, :4], X[:, 4:], da=_overlapping((4, 4)))),
    ("swiglu_backward db", "db", lambda: K.swiglu_backward(X[:, :4], X[:, :4], X[:, 4:],
                                                           db=torch.zeros(4).expand(4, 4))),
    ("rotary q_out", "q_out", lambda: K.rotary(Q, KK, COS, SIN, q_out=_overlapping((1, 3, 2, 16)))),
    ("rotary k_out heads aliased", "k_out",
     lambda: K.rotary(Q, randn(6, 1, 3, 2, 16), COS, SIN, k_out=torch.zeros(1, 3, 1, 16).expand(1, 3, 2, 16))),
]


@pytest.mark.parametrize("case", range(len(OUT_OVERLAP)), ids=[c[0] for c in OUT_OVERLAP])
def test_self_overlapping_outputs_refused_by_name_before_any_work(case, monkeypatch):
    name, arg, call = OUT_OVERLAP[case]
    _launch_guard(monkeypatch, name)
    with config.override(backend="reference"), pytest.raises(LaunchError, match=rf"\b{arg}\b"):
        call()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_transposed_and_offset_outputs_are_written_where_they_lie(backend):
    """out= as a transposed view and as an offset window of a bigger NaN tensor: the result lands in the window,
    and every element outside it stays NaN."""
    a, b = randn(10, 5, 17, dtype=torch.bfloat16), randn(11, 17, 7, dtype=torch.bfloat16)
    bias, res = randn(12, 7), randn(13, 1, 7, dtype=torch.bfloat16).expand(5, 7)
    want = F.gelu(a.double() @ b.double() + bias.double(), approximate="tanh") + res.double()
    with config.override(backend=backend):
        big = torch.full((9, 12), torch.nan, dtype=torch.bfloat16)
        window = big[2:7, 3:10]
        got = K.gemm(a, b, bias=bias, residual=res, activation="gelu_tanh", out=window)
        assert got.data_ptr() == window.data_ptr()
        close(window, want, 2e-2, f"gemm into an offset window ({backend})")
        outside = torch.ones_like(big, dtype=torch.bool)
        outside[2:7, 3:10] = False
        assert big[outside].isnan().all(), "gemm wrote outside its out= window"
        t = torch.full((7, 5), torch.nan, dtype=torch.bfloat16).T
        close(K.gemm(a, b, bias=bias, residual=res, activation="gelu_tanh", out=t), want, 2e-2, "gemm into out.T")
        x = randn(14, 6, 9)
        sm = torch.full((9, 6), torch.nan).T
        close(K.softmax(x, out=sm), torch.softmax(x.double(), -1), 1e-6, "softmax into out.T")
        q = randn(15, 1, 3, 2, 16)
        qo = torch.full((1, 2, 3, 16), torch.nan).transpose(1, 2)        # (1, 3, 2, 16), heads outermost
        K.rotary(q, KK, COS, SIN, q_out=qo)
        close(qo, rotate64(q.double()), 1e-6, "rotary into a transposed q_out")


# ---- the GEMM epilogue on inputs of every layout -------------------------------------------------------------------
def _gemm_layouts():
    m, k, n = 5, 19, 7
    a_t = randn(20, k, m, dtype=torch.float16).T                              # transposed a
    b_t = randn(21, n, k, dtype=torch.float16).T                              # transposed b
    a_x = randn(22, 1, k, dtype=torch.float16).expand(m, k)                   # every row one
    b_x = randn(23, k, 1, dtype=torch.float16).expand(k, n)                   # every column one
    a_o = randn(24, 200, dtype=torch.float16)[11:11 + m * k].view(m, k)       # an offset (odd) view
    b_o = randn(25, k, 2 * n, dtype=torch.float16)[:, 1::2]                   # every other column, offset 1
    bias_x = randn(26, 1).expand(n)                                           # stride 0
    bias_s = randn(27, 2 * n, dtype=torch.float16)[::2]                       # stride 2
    res_t = randn(28, n, m, dtype=torch.float16).T
    res_x = randn(29, m, 1).expand(m, n)
    return [
        ("a.T b.T", a_t, b_t, None, None, None),
        ("a expanded, bias stride 0", a_x, b_t, bias_x, None, "relu"),
        ("b expanded, residual.T", a_t, b_x, None, res_t, "silu"),
        ("offset a, strided b, strided bias, expanded residual", a_o, b_o, bias_s, res_x, "gelu"),
        ("both expanded, every epilogue", a_x, b_x, bias_x, res_x, "gelu_tanh"),
    ]


GEMM_LAYOUTS = _gemm_layouts()


@pytest.mark.parametrize("case", range(len(GEMM_LAYOUTS)), ids=[c[0] for c in GEMM_LAYOUTS])
def test_gemm_epilogue_on_inputs_of_every_layout(case):
    _, a, b, bias, res, act = GEMM_LAYOUTS[case]
    y = a.double() @ b.double()
    if bias is not None:
        y = y + bias.double()
    y = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
         None: lambda t: t}[act](y)
    if res is not None:
        y = y + res.double()
    for out_dtype in (None, torch.float32):
        with config.override(backend="reference"), poisoned_allocations():
            got = K.gemm(a, b, bias=bias, residual=res, activation=act, out_dtype=out_dtype)
        close(got, y, 2e-3 if out_dtype is None else 1e-5, f"gemm {GEMM_LAYOUTS[case][0]} ({out_dtype})")


# ---- every subset of inputs requiring grad -------------------------------------------------------------------------
MASK = torch.tensor([[True, False, True, True, True]])
LAB = torch.tensor([0, 4, -100, 2])
SUBSET_OPS = {
    "rms_norm": ([(2, 3, 8), (8,)], lambda x, w: ops.rms_norm(x, w), lambda x, w: F.rms_norm(x, (8,), w, 1e-6)),
    "layer_norm": ([(2, 3, 8), (8,), (8,)], lambda x, w, b: ops.layer_norm(x, w, b),
                   lambda x, w, b: F.layer_norm(x, (8,), w, b, 1e-5)),
    "add_layer_norm": ([(2, 3, 8), (2, 3, 8), (8,), (8,)],
                       lambda x, r, w, b: sum(t.sin().sum() for t in ops.add_layer_norm(x, r, w, b)),
                       lambda x, r, w, b: F.layer_norm(x + r, (8,), w, b, 1e-5).sin().sum() + (x + r).sin().sum()),
    "add_rms_norm": ([(2, 3, 8), (2, 3, 8), (8,)], lambda x, r, w: ops.add_rms_norm(x, r, w)[0],
                     lambda x, r, w: F.rms_norm(x + r, (8,), w, 1e-6)),
    "rotary": ([(1, 3, 2, 16), (1, 3, 1, 16)], lambda q, k: sum(t.sin().sum() for t in ops.rotary(q, k, COS, SIN)),
               lambda q, k: rotate64(q).sin().sum() + rotate64(k).sin().sum()),
    "attention": ([(1, 2, 3, 8), (1, 1, 5, 8), (1, 1, 5, 4)],
                  lambda q, k, v: tilestack.attention(q, k, v, attn_mask=MASK),
                  lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=MASK, enable_gqa=True)),
    "fused_linear_cross_entropy": ([(4, 8), (5, 8)], lambda x, w: ops.fused_linear_cross_entropy(x, w, LAB),
                                   lambda x, w: F.cross_entropy(x @ w.T, LAB)),
}
SUBSETS = [(op, mask) for op, (shapes, _, _) in SUBSET_OPS.items()
           for mask in itertools.product((False, True), repeat=len(shapes)) if any(mask)]


@pytest.mark.parametrize("op,mask", SUBSETS, ids=[f"{o}-{''.join('1' if m else '0' for m in k)}" for o, k in SUBSETS])
def test_every_subset_of_inputs_requiring_grad(op, mask):
    shapes, fn, ref = SUBSET_OPS[op]
    inputs = [randn(40 + i, *s) for i, s in enumerate(shapes)]
    got = [t.clone().requires_grad_(m) for t, m in zip(inputs, mask, strict=True)]
    want = [t.double().requires_grad_(m) for t, m in zip(inputs, mask, strict=True)]
    with config.override(backend="reference"), poisoned_allocations():
        y = fn(*got)
        g = randn(50, *y.shape)
        y.backward(g)
    yd = ref(*want)
    yd.backward(g.double())
    close(y, yd, 2e-6, f"{op}: forward")
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert (a.grad is None) == (b.grad is None), f"{op} {mask}: input {i}'s gradient None differs from torch's"
        if b.grad is not None:
            close(a.grad, b.grad, 2e-6, f"{op} {mask}: input {i}")


def test_autograd_grad_allow_unused_matches_torch():
    """torch.autograd.grad over (x, w, an unrelated tensor) with allow_unused: the unrelated one None, as torch's."""
    x, w, other = randn(60, 3, 8).requires_grad_(), randn(61, 8).requires_grad_(), randn(62, 8).requires_grad_()
    with config.override(backend="reference"), poisoned_allocations():
        y = ops.add_rms_norm(x, x * 2, w)[1]           # h only: w unused
        gx, gw, go = torch.autograd.grad(y.sum(), (x, w, other), allow_unused=True)
    assert gw is None and go is None
    close(gx, torch.full((3, 8), 3.0), 0.0, "d(x + 2x)/dx")


# ---- grad modes ---------------------------------------------------------------------------------------------------
def _all_ops(xs):
    x, w, b, q, k = xs
    return [ops.rms_norm(x, w), ops.layer_norm(x, w, b), *ops.add_rms_norm(x, x, w), ops.swiglu(x),
            *ops.rotary(q, k, COS, SIN), tilestack.attention(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2)),
            ops.fused_linear_cross_entropy(x[0], torch.cat((w[None], b[None])), torch.tensor([0, 1, -100]))]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "plan made under inference_mode, then grad"])
def test_grad_modes_give_the_same_results_without_a_graph(mode):
    base = [randn(70, 2, 3, 8), randn(71, 8), randn(72, 8), randn(73, 1, 3, 2, 16), randn(74, 1, 3, 1, 16)]
    xs = [t.clone().requires_grad_() for t in base]
    with config.override(backend="reference"):
        plain = [t.detach() for t in _all_ops(xs)]
        ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
        with ctx, poisoned_allocations():
            got = _all_ops(xs if mode == "no_grad" else [t.detach().clone() for t in base])
        for i, (g, p) in enumerate(zip(got, plain, strict=True)):
            assert not g.requires_grad and g.grad_fn is None, f"{mode}: result {i} carries a graph"
            assert g.is_inference() == (mode != "no_grad"), f"{mode}: result {i}'s inference flag"
            close(g, p, 0.0, f"{mode}: result {i}")
        if mode.startswith("plan"):
            # the same signatures again, now with grad: the plans made under inference_mode serve a training step
            fresh = [t.clone().requires_grad_() for t in base]
            sum(t.float().sum() for t in _all_ops(fresh)).backward()
            want = [t.double().requires_grad_() for t in base]
            x, w, b, q, k = want
            lab = torch.tensor([0, 1, -100])
            (F.rms_norm(x, (8,), w, 1e-6).sum() + F.layer_norm(x, (8,), w, b, 1e-5).sum()
             + F.rms_norm(2 * x, (8,), w, 1e-6).sum() + (2 * x).sum() + (F.silu(x[..., :4]) * x[..., 4:]).sum()
             + rotate64(q).sum() + rotate64(k).sum()
             + F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2),
                                              enable_gqa=True).sum()
             + F.cross_entropy(x[0] @ torch.cat((w[None], b[None])).T, lab)).backward()
            for i, (f, wt) in enumerate(zip(fresh, want, strict=True)):
                close(f.grad, wt.grad, 5e-6, f"after an inference_mode plan: input {i}")


@pytest.mark.parametrize("op", ["rms_norm weight", "layer_norm bias", "cross-entropy weight", "attention v",
                                "swiglu", "add_rms_norm r"])
def test_double_backward_through_one_input_alone_refused_by_name(op):
    x, w, b = randn(80, 3, 8), randn(81, 8).requires_grad_(), randn(82, 8).requires_grad_()
    q, v = randn(83, 1, 1, 3, 8), randn(84, 1, 1, 3, 8).requires_grad_()
    r = randn(85, 3, 8).requires_grad_()
    xs = randn(86, 3, 8).requires_grad_()
    lm = randn(87, 5, 8).requires_grad_()
    calls = {
        "rms_norm weight": (lambda: ops.rms_norm(x, w), w, "rms_norm"),
        "layer_norm bias": (lambda: ops.layer_norm(x, w.detach(), b), b, "layer_norm"),
        "cross-entropy weight": (lambda: ops.fused_linear_cross_entropy(x, lm, torch.tensor([0, 1, 2])), lm,
                                 "fused_linear_cross_entropy"),
        "attention v": (lambda: tilestack.attention(q, q, v), v, "attention"),
        "swiglu": (lambda: ops.swiglu(xs), xs, "swiglu"),
        "add_rms_norm r": (lambda: ops.add_rms_norm(x, r, w.detach())[0], r, "add_rms_norm"),
    }
    fn, wrt, name = calls[op]
    with config.override(backend="reference"):
        (g,) = torch.autograd.grad(fn().pow(2).sum(), wrt, create_graph=True)
        with pytest.raises((RuntimeError, LaunchError), match=rf"{name}: double backward"):
            g.pow(2).sum().backward()


# ---- attention: Nq != Nk under both alignments, GQA, Dv != D, bf16 -------------------------------------------------
ALIGN = [(nq, nk, align) for nq, nk in [(1, 9), (9, 1), (4, 11), (11, 4)] for align in ("top_left", "bottom_right")]


@pytest.mark.parametrize("nq,nk,align", ALIGN, ids=[f"{a}-{b}-{c}" for a, b, c in ALIGN])
def test_attention_nq_not_nk_gqa_bf16_forward_and_backward(nq, nk, align):
    q = randn(90, 2, 4, nq, 16, dtype=torch.bfloat16)
    k = randn(91, 2, 2, nk, 16, dtype=torch.bfloat16)
    v = randn(92, 2, 2, nk, 8, dtype=torch.bfloat16)
    got = [t.clone().requires_grad_() for t in (q, k, v)]
    want = [t.double().requires_grad_() for t in (q, k, v)]
    seen = torch.ones(nq, nk, dtype=torch.bool).tril(0 if align == "top_left" else nk - nq)
    with config.override(backend="reference"), poisoned_allocations():
        o = tilestack.attention(*got, causal=True, causal_align=align)
        g = randn(93, *o.shape, dtype=torch.bfloat16)
        o.backward(g)
    od = F.scaled_dot_product_attention(want[0], want[1], want[2], attn_mask=seen, enable_gqa=True)
    od.backward(g.double())
    # (rows that see no key: o = 0 and zero gradients, as torch's math backend)
    close(o, od, 1e-2, f"o {nq}x{nk} {align}")
    for name, a, b in zip("qkv", got, want, strict=True):
        close(a.grad, b.grad, 2e-2, f"d{name} {nq}x{nk} {align}")


def test_attention_masks_broadcast_from_size_one_dims_agree():
    """One additive mask given as (Nq, Nk), (1, 1, Nq, Nk), (H, Nq, Nk) expanded from one head, and the full
    (B, H, Nq, Nk) expand: the same answer, float64 torch's."""
    q, k, v = randn(100, 2, 3, 4, 16), randn(101, 2, 3, 6, 16), randn(102, 2, 3, 6, 16)
    m = randn(103, 4, 6)
    masks = {"2-D": m, "1x1": m[None, None], "heads expanded": m[None].expand(3, 4, 6),
             "full expand": m.expand(2, 3, 4, 6), "batch 1 strided": m.T.contiguous().T[None, None]}
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m.double())
    for name, mask in masks.items():
        with config.override(backend="reference"), poisoned_allocations():
            close(tilestack.attention(q, k, v, attn_mask=mask), want, 2e-6, f"mask {name}")


def test_attention_batch_of_one_kv_refused_naming_k_and_the_drop_in_broadcasts_as_torch():
    q, k, v = randn(104, 2, 2, 3, 16), randn(105, 1, 2, 5, 16), randn(106, 1, 2, 5, 16)
    with config.override(backend="reference"):
        with pytest.raises(LaunchError, match=r"\bk\b"):
            tilestack.attention(q, k, v)
        with pytest.warns(UserWarning):
            o = tilestack.scaled_dot_product_attention(q, k, v)
    close(o, F.scaled_dot_product_attention(q.double(), k.double(), v.double()), 2e-6, "drop-in, k batch 1")


# ---- size-0 dims of the kernel functions with an epilogue and out= -------------------------------------------------
def test_kernel_functions_with_size_zero_dims_and_outputs():
    with config.override(backend="reference"), poisoned_allocations():
        bias, act = randn(110, 6), "gelu"
        for m, k, n in [(0, 8, 6), (4, 0, 6), (4, 8, 0), (0, 0, 0)]:
            a, b = torch.zeros(m, k, dtype=torch.float16), torch.zeros(k, n, dtype=torch.float16)
            out = torch.full((m, n), torch.nan)
            res = randn(111, m, n)
            got = K.gemm(a, b, bias=bias[:n], residual=res, activation=act, out_dtype=torch.float32, out=out)
            assert got.data_ptr() == out.data_ptr() or out.numel() == 0
            close(got, F.gelu(torch.zeros(m, n, dtype=torch.float64) + bias[:n].double()) + res.double(), 1e-6,
                  f"gemm ({m}, {k}) @ ({k}, {n}) with an epilogue")
        for shape in [(0, 5), (3, 0)]:
            close(K.softmax(torch.zeros(shape), out=torch.empty(shape)), torch.zeros(shape), 0.0, f"softmax {shape}")
        for qs, ks in [((0, 3, 2, 16), (0, 3, 1, 16)), ((1, 3, 0, 16), (1, 3, 0, 16)), ((1, 3, 2, 16), (1, 3, 0, 16))]:
            n = qs[1]
            c, s = rotary_tables(n, 16)
            qr, kr = K.rotary(torch.ones(qs), torch.ones(ks), c, s)
            assert qr.shape == qs and kr.shape == ks
        da, db = K.swiglu_backward(torch.zeros(3, 0), torch.zeros(3, 0), torch.zeros(3, 0))
        assert da.shape == db.shape == (3, 0)
        loss = ops.fused_linear_cross_entropy(torch.zeros(0, 8), randn(112, 5, 8), torch.zeros(0, dtype=torch.long))
    assert loss.isnan(), "mean over no rows: NaN, as torch's cross_entropy"


# ---- mixed dtypes across arguments: refused naming the argument, before any work -----------------------------------
MIXED = [
    ("add_rms_norm f32 x, bf16 r", "r", lambda: ops.add_rms_norm(X, X.bfloat16(), randn(120, 8))),
    ("add_layer_norm bf16 x, f16 r", "r",
     lambda: ops.add_layer_norm(X.bfloat16(), X.half(), randn(121, 8), randn(122, 8))),
    ("layer_norm bf16 bias, f32 weight", "bias", lambda: ops.layer_norm(X, randn(123, 8), randn(124, 8).bfloat16())),
    ("attention f16 v", "v",
     lambda: tilestack.attention(Q.transpose(1, 2), Q.transpose(1, 2), Q.transpose(1, 2).half())),
    ("attention bf16 mask for f32 q", "attn_mask",
     lambda: tilestack.attention(Q, Q, Q, attn_mask=torch.zeros(2, 2, dtype=torch.bfloat16))),
    ("rotary bf16 k, f32 q", "k", lambda: ops.rotary(Q, KK.bfloat16(), COS, SIN)),
    ("rotary f64 cos", "cos", lambda: ops.rotary(Q, KK, COS.double(), SIN.double())),
    ("ce bf16 weight, f32 x", "weight", lambda: ops.fused_linear_cross_entropy(X, randn(125, 5, 8).bfloat16(), LAB)),
    ("ce float labels", "labels", lambda: ops.fused_linear_cross_entropy(X, randn(126, 5, 8), LAB.float())),
    ("gemm f16 a, bf16 b", "b", lambda: K.gemm(A16.half(), B16)),
    ("gemm f32 out for a bf16 out_dtype", "out", lambda: K.gemm(A16, B16, out_dtype=torch.bfloat16,
                                                                  out=torch.zeros(4, 6))),
    ("swiglu f32 a, f16 b", "b", lambda: K.swiglu(X[:, :4], X[:, 4:].half())),
    ("swiglu_backward bf16 dy", "dy", lambda: K.swiglu_backward(X[:, :4].bfloat16(), X[:, :4], X[:, 4:])),
    ("swiglu_backward f16 da", "da", lambda: K.swiglu_backward(X[:, :4], X[:, :4], X[:, 4:],
                                                               da=torch.zeros(4, 4, dtype=torch.float16))),
    ("softmax bf16 out for f32 x", "out", lambda: K.softmax(X, out=torch.zeros(4, 8, dtype=torch.bfloat16))),
    ("rms_norm_backward f16 dy", "dy", lambda: K.rms_norm_backward(X.half(), X, randn(127, 8), torch.ones(4))),
    ("rms_norm_backward f64 rstd", "rstd",
     lambda: K.rms_norm_backward(X, X, randn(128, 8), torch.ones(4, dtype=torch.float64))),
]


@pytest.mark.parametrize("case", range(len(MIXED)), ids=[c[0] for c in MIXED])
def test_mixed_dtypes_refused_naming_the_argument_before_any_work(case, monkeypatch):
    name, arg, call = MIXED[case]
    _launch_guard(monkeypatch, name)
    with config.override(backend="reference"), pytest.raises(LaunchError, match=rf"\b{arg}\b"):
        call()


# ---- torch.func: vmap of attention with Nq != Nk and GQA, and of a norm over a middle dim ------------------------
def test_vmap_of_bottom_right_attention_and_of_a_norm_over_a_middle_dim():
    q, k, v = randn(130, 3, 1, 4, 2, 8), randn(131, 3, 1, 2, 5, 8), randn(132, 3, 1, 2, 5, 8)
    seen = torch.ones(2, 5, dtype=torch.bool).tril(3)
    with config.override(backend="reference"):
        got = torch.func.vmap(lambda q, k, v: tilestack.attention(q, k, v, causal=True, causal_align="bottom_right"))(
            q, k, v)
        x, w = randn(133, 2, 5, 3, 8), randn(134, 8)
        y = torch.func.vmap(lambda t: ops.rms_norm(t, w), in_dims=2, out_dims=2)(x)
    want = torch.stack([F.scaled_dot_product_attention(q[i].double(), k[i].double(), v[i].double(), attn_mask=seen,
                                                       enable_gqa=True) for i in range(3)])
    close(got, want, 2e-6, "vmap of bottom-right causal GQA attention")
    close(y, F.rms_norm(x.double(), (8,), w.double(), 1e-6), 2e-6, "vmap of rms_norm over dim 2")
