"""Round five of the bad-input sweep over every public op (``tilestack.attention``, the SDPA drop-in, the ops of
``tilestack.torch.ops``, the kernel-level functions of ``tilestack.kernels``, ``tilestack.quant``), on the
reference backend, each call against what torch does with it: torch's answer (float64 where it computes), or an
error of the same kind raised before any work, naming the argument, what was given and what was expected.

What rounds 1-4 did not reach: meta tensors and device mixes, int and bool tensors where floats are expected,
dtype mixes between arguments, 0-d tensors, dims of 0, dims past 2**31 (on meta), NaN and inf, non-tensor
arguments (lists, NumPy arrays, None), tensors that are views of each other, outputs that overlap, torch's keyword
names. What it found (each test failed before its fix):
- fused linear cross-entropy: a NaN or inf in a row whose label is ignore_index made the loss NaN (its row loss
  times a scale of 0); torch leaves ignored rows out of the loss;
- kernels.rotary with q_out and k_out the same tensor (or overlapping), kernels.swiglu_backward with da and db
  overlapping: each output overwrote the other without a word;
- rotary_tables took an odd or zero head dim, a negative length and a theta of 0, NaN or below 0 (NaN or inf
  tables, or torch's arange error);
- attention refused NumPy 2's np.True_ for causal (its type is named "bool", not "bool_");
- kernels.gemm and kernels.softmax, which have no backward, gave a result without a gradient for an input that
  requires grad, so a loss through them lost that input's gradient without a word; a backward through them now
  raises, naming the op;
- kernels.rotary with q_out over k (the Triton backend read k after storing q's rotation there), kernels.swiglu
  with out a shifted view of an input.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tilestack
from tilestack import config
from tilestack.errors import LaunchError
from tilestack.kernels import gemm, rotary_tables, softmax, swiglu_backward
from tilestack.kernels import rotary as kernel_rotary
from tilestack.kernels import swiglu as kernel_swiglu
from tilestack.quant import quantize_weight, quantized_linear
from tilestack.torch import ops


@pytest.fixture(autouse=True)
def reference_backend():
    with config.override(backend="reference"):
        yield


def randn(*shape, dtype=torch.float32, seed=0, device="cpu"):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype=dtype, device=device)


def _rn(x, w, eps=1e-6):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def _ln(x, w, b, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _swiglu(x):
    f = x.shape[-1] // 2
    return F.silu(x[..., :f]) * x[..., f:]


def _rotate(x, cos, sin):
    x1, x2 = x.double().chunk(2, dim=-1)
    c, s = cos.double()[None, :, None, :], sin.double()[None, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def _sdpa_math(q, k, v, **kw):
    """torch's math backend in float64: the arithmetic as written (torch's CPU flash kernel turns a query row of
    NaN into zeros; the math gives NaN, as tilestack does)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kw = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in kw.items()}
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw).to(q.dtype)


def _ce(x, w, labels, ignore_index=-100):
    return F.cross_entropy(x.double() @ w.double().T, labels.long(), ignore_index=ignore_index).float()


def _qref(x, q, s, bias=None):
    y = x.double() @ (q.double() * s.double()[:, None]).T
    return (y if bias is None else y + bias.double()).to(x.dtype)


def _as_tuple(o):
    return o if isinstance(o, tuple) else (o,)


def _assert_same(got, want, tol=1e-4):
    got, want = _as_tuple(got), _as_tuple(want)
    assert len(got) >= len(want)
    for a, b in zip(got, want, strict=False):
        assert a.shape == b.shape and a.device == b.device, (a.shape, b.shape, a.device, b.device)
        if a.device.type != "meta":
            torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol, equal_nan=True)


W8, B8 = randn(8, seed=1), randn(8, seed=2)
COS, SIN = rotary_tables(5, 16)
LABELS = torch.tensor([0, 3, -100, 9, 2, 5])


# ---- bugs found by this round --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("path", ["no grad", "grad"])
def test_cross_entropy_leaves_an_ignored_row_out_whatever_it_holds(bad, path):
    """A NaN or inf hidden state in a row labelled ignore_index (padding, masked prompt tokens): torch's loss leaves
    the row out and is finite; ours was NaN (the row's loss times a scale of 0). The gradients as torch's
    (NaN where torch's are: the row's logits reach dw through the softmax's backward)."""
    h, lm = randn(6, 8), randn(10, 8, seed=1)
    h[2, 3] = bad                                    # LABELS[2] is -100
    grad = path == "grad"
    got, want = [], []
    for fn, out in ((ops.fused_linear_cross_entropy, got), (_ce, want)):
        hs, ls = h.clone().requires_grad_(grad), lm.clone().requires_grad_(grad)
        loss = fn(hs, ls, LABELS)
        out.append(loss.detach())
        if grad:
            loss.backward()
            out += [hs.grad, ls.grad]
    assert got[0].isfinite()
    _assert_same(tuple(got), tuple(want), tol=1e-5)


def test_rotary_outputs_that_share_memory_are_refused():
    """kernels.rotary into q_out and k_out that are one tensor, or overlapping views of one buffer: each rotation
    overwrote the other's (k_out held k's rotation, and so did q_out); q_out over k (or k_out over q): the Triton
    backend read k after storing q's rotation there. Refused, naming both; an output that is its own input (an
    in-place rotation) is still taken and right."""
    q, k = randn(2, 5, 3, 16), randn(2, 5, 3, 16, seed=1)
    one = torch.empty_like(q)
    with pytest.raises(LaunchError, match=r"rotary: q_out and k_out share memory"):
        kernel_rotary(q, k, COS, SIN, q_out=one, k_out=one)
    buf = torch.empty(2 * q.numel() - 16)
    with pytest.raises(LaunchError, match=r"rotary: q_out and k_out share memory"):
        kernel_rotary(q, k, COS, SIN, q_out=buf[:q.numel()].view(q.shape), k_out=buf[-q.numel():].view(q.shape))
    kc = k.clone()                       # q_out over k: the Triton backend read k after q's rotation (k_out wrong)
    with pytest.raises(LaunchError, match=r"rotary: q_out shares memory with k; the kernel would read k after"):
        kernel_rotary(q, kc, COS, SIN, q_out=kc)
    with pytest.raises(LaunchError, match=r"rotary: k_out shares memory with q"):
        kernel_rotary(kc, k, COS, SIN, k_out=kc[:, :, :, :].view(kc.shape))
    qc, kc = q.clone(), k.clone()
    qo, ko = kernel_rotary(qc, kc, COS, SIN, q_out=qc, k_out=kc)
    _assert_same((qo, ko), (_rotate(q, COS, SIN), _rotate(k, COS, SIN)), tol=1e-5)


def test_swiglu_out_over_a_shifted_view_of_its_input_is_refused():
    """kernels.swiglu(a, b, out=) with out a shifted view of a's buffer (columns 3.. of it): its stores land on
    elements other programs read (taken before); out that is a or b itself is taken (element-wise, in place)."""
    buf, b = randn(4, 70), randn(4, 64, seed=1)
    a = buf[:, :64]
    with pytest.raises(LaunchError, match=r"swiglu: out shares memory with a; the kernel would read a after"):
        kernel_swiglu(a, b, out=buf[:, 3:67])
    want = F.silu(a.double()) * b.double()
    for target in ("a", "b"):
        a2, b2 = a.clone(), b.clone()
        y = kernel_swiglu(a2, b2, out=a2 if target == "a" else b2)
        assert y.data_ptr() == (a2 if target == "a" else b2).data_ptr()
        _assert_same(y, want, tol=1e-5)


def test_swiglu_backward_outputs_that_share_memory_are_refused():
    dy, a, b = randn(4, 8), randn(4, 8, seed=1), randn(4, 8, seed=2)
    d = torch.empty(4, 8)
    with pytest.raises(LaunchError, match=r"swiglu_backward: da and db share memory"):
        swiglu_backward(dy, a, b, da=d, db=d)
    both = torch.empty(4, 16)                        # the halves of one gradient (what ops.swiglu passes): taken
    da, db = swiglu_backward(dy, a, b, da=both[:, :8], db=both[:, 8:])
    a64 = a.double().requires_grad_()
    b64 = b.double().requires_grad_()
    (F.silu(a64) * b64 * dy.double()).sum().backward()
    _assert_same((da, db), (a64.grad, b64.grad), tol=1e-5)


ROTARY_TABLES_BAD = {
    "odd d": ((5, 15), r"d must be an even int >= 2 \(a head dim\), got 15"),
    "d 0": ((5, 0), r"d must be an even int >= 2 \(a head dim\), got 0"),
    "d float": ((5, 16.0), r"d must be an even int >= 2 \(a head dim\), got 16.0"),
    "n negative": ((-1, 16), r"n must be an int >= 0 \(a number of positions\), got -1"),
    "n bool": ((True, 16), r"n must be an int >= 0 \(a number of positions\), got True"),
    "theta 0": ((5, 16, 0.0), r"theta must be a finite number > 0, got 0.0"),
    "theta nan": ((5, 16, math.nan), r"theta must be a finite number > 0, got nan"),
    "theta negative": ((5, 16, -10.0), r"theta must be a finite number > 0, got -10.0"),
}


@pytest.mark.parametrize("case", list(ROTARY_TABLES_BAD))
def test_rotary_tables_refuses_what_makes_no_table(case):
    """An odd head dim (d/2 frequencies lose one), theta 0 or NaN (inf and NaN tables: NaN outputs later), a
    negative length (torch's "upper bound and lower bound inconsistent with step sign")."""
    args, fragment = ROTARY_TABLES_BAD[case]
    with pytest.raises(LaunchError, match=r"rotary_tables: " + fragment):
        rotary_tables(*args)


def test_rotary_tables_of_length_zero_and_numpy_ints():
    cos, sin = rotary_tables(np.int64(0), np.int64(16))
    assert cos.shape == sin.shape == (0, 8)
    cos, _ = rotary_tables(3, 4, theta=np.float32(100.0))
    torch.testing.assert_close(cos[2], torch.tensor([math.cos(2.0), math.cos(0.2)]))


def test_attention_takes_numpy_bool_causal():
    """causal=np.True_ (from a config array): NumPy 2 names its type "bool", and the check looked for "bool_"."""
    q, k, v = randn(1, 2, 5, 16), randn(1, 2, 7, 16, seed=1), randn(1, 2, 7, 16, seed=2)
    for flag in (np.True_, np.False_):
        _assert_same(tilestack.attention(q, k, v, flag), _sdpa_math(q, k, v, is_causal=bool(flag)))
        _assert_same(tilestack.kernels.attention_forward(q, k, v, flag)[0],
                     _sdpa_math(q, k, v, is_causal=bool(flag)))


@pytest.mark.parametrize("op", ["gemm", "softmax"])
def test_kernel_functions_without_backward_refuse_a_backward(op):
    """kernels.gemm and kernels.softmax have no backward: an input requiring grad got a result without grad_fn, so
    ``(y.sum() + t.sum()).backward()`` gave t a gradient missing the op's term without a word. The result now
    joins autograd through a node whose backward raises, naming the op (as a quantized linear layer's); the
    forward answers as before, and under no_grad nothing is recorded."""
    a, b = randn(4, 8, dtype=torch.bfloat16), randn(8, 6, dtype=torch.bfloat16, seed=1)
    call = (lambda t: gemm(a, t)) if op == "gemm" else softmax
    t = b if op == "gemm" else randn(4, 8)
    leaf = t.clone().requires_grad_()
    y = call(leaf)
    _assert_same(y.detach(), call(t), tol=0)
    with pytest.raises(LaunchError, match=rf"{op}: a backward through tilestack.kernels.{op}, which has no backward"):
        (y.float().sum() + leaf.float().sum()).backward()
    with torch.no_grad():
        assert call(leaf).grad_fn is None


# ---- meta tensors and device mixes ---------------------------------------------------------------------------------
def _meta_cases():
    m = lambda t: t.to("meta")                       # noqa: E731
    x, q, k, v = randn(3, 4, 8), randn(1, 2, 5, 16), randn(1, 2, 7, 16, seed=1), randn(1, 2, 7, 16, seed=2)
    h, lm = randn(6, 8), randn(10, 8, seed=1)
    a, b = randn(4, 8, dtype=torch.bfloat16), randn(8, 6, dtype=torch.bfloat16)
    qw, sw = quantize_weight(randn(6, 8), "int8")
    return {
        "rms_norm": (lambda: ops.rms_norm(m(x), m(W8)), lambda: _rn(m(x), m(W8))),
        "layer_norm": (lambda: ops.layer_norm(m(x), m(W8), m(B8)), lambda: _ln(m(x), m(W8), m(B8))),
        "add_rms_norm": (lambda: ops.add_rms_norm(m(x), m(x), m(W8)), lambda: (_rn(m(x), m(W8)), m(x))),
        "swiglu": (lambda: ops.swiglu(m(x)), lambda: _swiglu(m(x))),
        "softmax": (lambda: softmax(m(h)), lambda: torch.softmax(m(h), -1)),
        "gemm": (lambda: gemm(m(a), m(b)), lambda: m(a) @ m(b)),
        "attention": (lambda: tilestack.attention(m(q), m(k), m(v)),
                      lambda: F.scaled_dot_product_attention(m(q), m(k), m(v))),
        "sdpa": (lambda: tilestack.scaled_dot_product_attention(m(q), m(k), m(v), is_causal=True),
                 lambda: F.scaled_dot_product_attention(m(q), m(k), m(v), is_causal=True)),
        "fused_linear_cross_entropy": (lambda: ops.fused_linear_cross_entropy(m(h), m(lm), m(LABELS)),
                                       lambda: F.cross_entropy(m(h) @ m(lm).T, m(LABELS))),
        "rotary": (lambda: ops.rotary(m(q.transpose(1, 2)), m(q.transpose(1, 2)), m(COS), m(SIN)),
                   lambda: (m(q.transpose(1, 2)), m(q.transpose(1, 2)))),
        "quantized_linear": (lambda: quantized_linear(m(h), m(qw), m(sw)), lambda: m(h) @ m(qw.float()).T),
    }


META = _meta_cases()


@pytest.mark.parametrize("op", list(META))
def test_meta_tensors_give_torchs_meta_result(op):
    ours, theirs = META[op]
    _assert_same(ours(), theirs())


def _device_mixes():
    m = lambda t: t.to("meta")                       # noqa: E731
    x, q, k, v = randn(4, 8), randn(1, 2, 5, 16), randn(1, 2, 7, 16, seed=1), randn(1, 2, 7, 16, seed=2)
    a, b = randn(4, 8, dtype=torch.bfloat16), randn(8, 6, dtype=torch.bfloat16)
    qw, sw = quantize_weight(randn(6, 8), "int8")
    return {
        "rms_norm weight": (lambda: ops.rms_norm(m(x), W8), "x on meta, weight on cpu"),
        "layer_norm bias": (lambda: ops.layer_norm(x, W8, m(B8)), "bias on meta"),
        "add_rms_norm r": (lambda: ops.add_rms_norm(x, m(x), W8), "r on meta"),
        "gemm b": (lambda: gemm(a, m(b)), "a on cpu, b on meta"),
        "gemm bias": (lambda: gemm(a, b, bias=m(randn(6, dtype=torch.bfloat16))), "bias on meta"),
        "softmax out": (lambda: softmax(x, out=m(torch.empty(4, 8))), "x on cpu, out on meta"),
        "attention k": (lambda: tilestack.attention(q, m(k), v), "k on meta"),
        "attention mask": (lambda: tilestack.attention(q, k, v, attn_mask=m(torch.zeros(5, 7))), "attn_mask on meta"),
        "fused_linear_cross_entropy labels": (lambda: ops.fused_linear_cross_entropy(randn(6, 8), randn(10, 8),
                                                                                       m(LABELS)), "labels on meta"),
        "rotary sin": (lambda: ops.rotary(q.transpose(1, 2), q.transpose(1, 2), COS, m(SIN)), "sin on meta"),
        "quantized_linear scale": (lambda: quantized_linear(x, qw, m(sw)), "scale on meta"),
    }


DEVICES = _device_mixes()


@pytest.mark.parametrize("case", list(DEVICES))
def test_tensors_on_two_devices_are_refused_naming_both(case):
    """torch raises for these ("Tensor on device cpu is not on the expected device meta!"); tilestack before any
    work, naming each tensor's device."""
    call, fragment = DEVICES[case]
    with pytest.raises(LaunchError, match=r"all tensors must be on one device; got .*" + re.escape(fragment)):
        call()


# ---- dtypes: integers and bools where floats go, mixes between arguments -------------------------------------------
def _dtype_cases():
    x, q = randn(4, 8), randn(1, 2, 5, 16)
    h, lm = randn(6, 8), randn(10, 8, seed=1)
    a, b = randn(4, 8, dtype=torch.bfloat16), randn(8, 6, dtype=torch.bfloat16)
    qw, sw = quantize_weight(randn(6, 8), "int8")
    return {
        "rms_norm x int64": (lambda: ops.rms_norm(x.long(), W8), r"rms_norm: x has dtype int64; expected one of"),
        "rms_norm weight bool": (lambda: ops.rms_norm(x, W8 > 0), r"rms_norm: weight has dtype bool"),
        "layer_norm x int32": (lambda: ops.layer_norm(x.int(), W8, B8), r"layer_norm: x has dtype int32"),
        "add_layer_norm r bf16 with f32 x": (lambda: ops.add_layer_norm(x, x.bfloat16(), W8, B8),
                                             r"add_layer_norm: r has dtype bfloat16; expected one of float32"),
        "swiglu int64": (lambda: ops.swiglu(x.long()), r"swiglu: x has dtype torch.int64"),
        "softmax bool": (lambda: softmax(x > 0), r"softmax: x has dtype bool"),
        "gemm int": (lambda: gemm(a.long(), b.long()), r"gemm: a has dtype int64"),
        "gemm bf16 with f16": (lambda: gemm(a, b.half()), r"gemm: b has dtype float16; expected one of bfloat16"),
        "attention int": (lambda: tilestack.attention(q.long(), q.long(), q.long()), r"q has dtype int64"),
        "attention k bf16": (lambda: tilestack.attention(q, q.bfloat16(), q), r"q, k, v must share a dtype"),
        "attention mask int": (lambda: tilestack.attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.int32)),
                               r"attn_mask has dtype int32"),
        "cross_entropy float labels": (lambda: ops.fused_linear_cross_entropy(h, lm, LABELS.float()),
                                       r"labels has dtype float32; expected one of int64, int32"),
        "cross_entropy weight bf16": (lambda: ops.fused_linear_cross_entropy(h, lm.bfloat16(), LABELS),
                                      r"weight has dtype bfloat16; expected one of float32"),
        "rotary cos bf16": (lambda: ops.rotary(q, q, COS.bfloat16(), SIN), r"rotary: cos has dtype bfloat16"),
        "quantized_linear q float": (lambda: quantized_linear(h, qw.float(), sw), r"q has dtype float32"),
        "quantized_linear scale int": (lambda: quantized_linear(h, qw, sw.long()), r"scale has dtype int64"),
    }


DTYPES = _dtype_cases()


@pytest.mark.parametrize("case", list(DTYPES))
def test_wrong_and_mixed_dtypes_are_refused_by_name(case):
    call, fragment = DTYPES[case]
    with pytest.raises(LaunchError, match=fragment):
        call()


# ---- 0-d tensors, dims of 0, dims past 2**31 -----------------------------------------------------------------------
def _zero_dim_cases():
    z = torch.tensor(1.5)
    h, lm = randn(6, 8), randn(10, 8, seed=1)
    return {
        "rms_norm": (lambda: ops.rms_norm(z, W8), r"rms_norm: x must have at least one dim, got a 0-d tensor"),
        "rms_norm weight": (lambda: ops.rms_norm(randn(4, 1), z), r"weight must have rank 1, got shape \(\)"),
        "swiglu": (lambda: ops.swiglu(z), r"swiglu: x must be a tensor whose last dim is even .*got \(\)"),
        "softmax": (lambda: softmax(z), r"softmax: x must have rank 2, got shape \(\)"),
        "gemm": (lambda: gemm(z.bfloat16(), z.bfloat16()), r"gemm: a must have rank 2, got shape \(\)"),
        "attention": (lambda: tilestack.attention(z, z, z), r"q must have rank 4, got shape \(\)"),
        "attention mask": (lambda: tilestack.attention(*(randn(1, 1, 4, 8),) * 3, attn_mask=torch.tensor(True)),
                           r"attn_mask is \(\); expected a shape broadcastable to"),
        "cross_entropy labels": (lambda: ops.fused_linear_cross_entropy(h, lm, torch.tensor(3)),
                                 r"labels must have rank 1, got shape \(\)"),
        "quantized_linear": (lambda: quantized_linear(z, *quantize_weight(randn(6, 8), "int8")),
                             r"x must have rank 2, got shape \(\)"),
    }


ZERO_DIM = _zero_dim_cases()


@pytest.mark.parametrize("case", list(ZERO_DIM))
def test_zero_dim_tensors_are_refused_by_name(case):
    call, fragment = ZERO_DIM[case]
    with pytest.raises(LaunchError, match=fragment):
        call()


def _empty_cases():
    e = randn
    a16 = lambda *s: randn(*s, dtype=torch.bfloat16)        # noqa: E731
    q, k = randn(1, 2, 5, 16), randn(1, 2, 7, 16, seed=1)
    qw, sw = quantize_weight(randn(6, 8), "int8")
    q0, s0 = quantize_weight(randn(6, 0), "int8")
    no_labels = torch.zeros(0, dtype=torch.long)
    return {
        "rms_norm rows 0": (lambda: ops.rms_norm(e(2, 0, 8), W8), lambda: _rn(e(2, 0, 8), W8)),
        "rms_norm width 0": (lambda: ops.rms_norm(e(4, 0), e(0)), lambda: _rn(e(4, 0), e(0))),
        "layer_norm width 0": (lambda: ops.layer_norm(e(4, 0), e(0), e(0)), lambda: _ln(e(4, 0), e(0), e(0))),
        "add_layer_norm rows 0": (lambda: ops.add_layer_norm(e(0, 8), e(0, 8), W8, B8),
                                  lambda: (_ln(e(0, 8), W8, B8), e(0, 8))),
        "swiglu rows 0": (lambda: ops.swiglu(e(0, 3, 8)), lambda: _swiglu(e(0, 3, 8))),
        "swiglu width 0": (lambda: ops.swiglu(e(4, 0)), lambda: _swiglu(e(4, 0))),
        "softmax width 0": (lambda: softmax(e(4, 0)), lambda: torch.softmax(e(4, 0), -1)),
        "gemm K 0 with epilogue": (lambda: gemm(a16(4, 0), a16(0, 6), bias=a16(6), activation="gelu",
                                                residual=a16(4, 6)),
                                   lambda: (F.gelu(a16(6).float()) + a16(4, 6).float()).bfloat16()),
        "gemm N 0": (lambda: gemm(a16(4, 8), a16(8, 0)), lambda: a16(4, 8) @ a16(8, 0)),
        "attention no keys": (lambda: tilestack.attention(q, e(1, 2, 0, 16), e(1, 2, 0, 16)),
                              lambda: F.scaled_dot_product_attention(q, e(1, 2, 0, 16), e(1, 2, 0, 16))),
        "attention batch 0": (lambda: tilestack.attention(e(0, 2, 5, 16), e(0, 2, 7, 16), e(0, 2, 7, 16)),
                              lambda: e(0, 2, 5, 16)),
        "sdpa no queries": (lambda: tilestack.scaled_dot_product_attention(e(1, 2, 0, 16), k, k),
                            lambda: F.scaled_dot_product_attention(e(1, 2, 0, 16), k, k)),
        "cross_entropy no rows": (lambda: ops.fused_linear_cross_entropy(e(0, 8), e(10, 8), no_labels),
                                  lambda: _ce(e(0, 8), e(10, 8), no_labels)),
        "cross_entropy width 0": (lambda: ops.fused_linear_cross_entropy(e(6, 0), e(10, 0), LABELS),
                                  lambda: _ce(e(6, 0), e(10, 0), LABELS)),
        "rotary length 0": (lambda: ops.rotary(e(2, 0, 3, 16), e(2, 0, 1, 16), COS[:0], SIN[:0]),
                            lambda: (e(2, 0, 3, 16), e(2, 0, 1, 16))),
        "quantized_linear rows 0": (lambda: quantized_linear(e(0, 8), qw, sw), lambda: _qref(e(0, 8), qw, sw)),
        "quantized_linear K 0 with bias": (lambda: quantized_linear(e(4, 0), q0, s0, e(6)),
                                           lambda: _qref(e(4, 0), q0, s0, e(6))),
    }


EMPTY = _empty_cases()


@pytest.mark.parametrize("case", list(EMPTY))
def test_dims_of_zero_give_torchs_empty_or_epilogue_result(case):
    ours, theirs = EMPTY[case]
    _assert_same(ours(), theirs(), tol=1e-2)


def _huge_cases():
    big = 2**31 + 8                                  # past int32 indexing: shapes on meta, no data
    m = lambda *s, dtype=torch.float32: torch.empty(s, device="meta", dtype=dtype)   # noqa: E731
    return {
        "rms_norm rows": (lambda: ops.rms_norm(m(big, 8), m(8)), (big, 8)),
        "rms_norm width": (lambda: ops.rms_norm(m(2, big), m(big)), (2, big)),
        "layer_norm rows": (lambda: ops.layer_norm(m(big, 8), m(8), m(8)), (big, 8)),
        "swiglu": (lambda: ops.swiglu(m(big, 4)), (big, 2)),
        "softmax": (lambda: softmax(m(big, 4)), (big, 4)),
        "gemm": (lambda: gemm(m(big, 4, dtype=torch.bfloat16), m(4, 4, dtype=torch.bfloat16)), (big, 4)),
        "attention queries": (lambda: tilestack.attention(m(1, 1, big, 16), m(1, 1, 8, 16), m(1, 1, 8, 16)),
                              (1, 1, big, 16)),
    }


HUGE = _huge_cases()


@pytest.mark.parametrize("case", list(HUGE))
def test_dims_past_two_to_the_31_on_meta(case):
    call, shape = HUGE[case]
    out = _as_tuple(call())[0]
    assert out.is_meta and tuple(out.shape) == shape


def test_a_vocabulary_past_exact_f32_labels_is_refused():
    m = lambda *s, dtype=torch.float32: torch.empty(s, device="meta", dtype=dtype)   # noqa: E731
    with pytest.raises(LaunchError, match=r"the vocabulary weight.shape\[0\] = 2147483648; expected 1 .. 16777215"):
        ops.fused_linear_cross_entropy(m(2, 8), m(2**31, 8), m(2, dtype=torch.long))


# ---- NaN and inf propagate as in torch -----------------------------------------------------------------------------
def _poisoned(t, *where, value=math.nan):
    t = t.clone()
    t[where] = value
    return t


def _nan_cases():
    x = _poisoned(_poisoned(randn(4, 8), 1, 2), 2, 3, value=math.inf)
    q, k, v = randn(1, 2, 5, 16), randn(1, 2, 7, 16, seed=1), randn(1, 2, 7, 16, seed=2)
    a16 = randn(4, 8, dtype=torch.bfloat16)
    inf_a = _poisoned(a16, 0, 0, value=math.inf)
    zeros = torch.zeros(8, 6, dtype=torch.bfloat16)
    qw, sw = quantize_weight(randn(6, 8, seed=3), "int8")
    rot = _poisoned(randn(2, 5, 3, 16), 0, 1, 0, 4)
    return {
        "rms_norm": (lambda: ops.rms_norm(x, W8), lambda: _rn(x, W8)),
        "layer_norm": (lambda: ops.layer_norm(x, W8, B8), lambda: _ln(x, W8, B8)),
        "add_rms_norm": (lambda: ops.add_rms_norm(x, randn(4, 8), W8),
                         lambda: (_rn(x + randn(4, 8), W8), x + randn(4, 8))),
        "swiglu": (lambda: ops.swiglu(x), lambda: _swiglu(x)),
        "softmax": (lambda: softmax(x), lambda: torch.softmax(x, -1)),
        "softmax -inf row": (lambda: softmax(_poisoned(x, 0, value=-math.inf)),
                             lambda: torch.softmax(_poisoned(x, 0, value=-math.inf), -1)),
        "gemm inf times 0": (lambda: gemm(inf_a, zeros), lambda: inf_a @ zeros),
        "gemm relu of NaN": (lambda: gemm(_poisoned(a16, 1, 1), zeros + 1, activation="relu"),
                             lambda: torch.relu(_poisoned(a16, 1, 1) @ (zeros + 1))),
        "attention NaN q": (lambda: tilestack.attention(_poisoned(q, 0, 0, 0, 0), k, v),
                            lambda: _sdpa_math(_poisoned(q, 0, 0, 0, 0), k, v)),
        "attention NaN k causal": (lambda: tilestack.attention(q, _poisoned(k, 0, 1, 3, 0), v, True),
                                   # torch's math backend adds the causal mask to NaN scores (NaN rows that
                                   # never see key 3); its default kernel, as tilestack, skips masked keys
                                   lambda: F.scaled_dot_product_attention(q, _poisoned(k, 0, 1, 3, 0), v,
                                                                          is_causal=True)),
        "attention inf mask": (lambda: tilestack.attention(q, k, v, attn_mask=_poisoned(torch.zeros(5, 7), 0, 0,
                                                                                        value=math.inf)),
                               lambda: _sdpa_math(q, k, v, attn_mask=_poisoned(torch.zeros(5, 7), 0, 0,
                                                                               value=math.inf))),
        "cross_entropy NaN in a labelled row": (
            lambda: ops.fused_linear_cross_entropy(_poisoned(randn(6, 8), 0, 0), randn(10, 8), LABELS),
            lambda: _ce(_poisoned(randn(6, 8), 0, 0), randn(10, 8), LABELS)),
        "rotary": (lambda: ops.rotary(rot, rot, COS, SIN), lambda: (_rotate(rot, COS, SIN),) * 2),
        "quantized_linear": (lambda: quantized_linear(x, qw, sw), lambda: _qref(x, qw, sw)),
    }


NANS = _nan_cases()


@pytest.mark.parametrize("case", list(NANS))
def test_nan_and_inf_propagate_as_in_torch(case):
    ours, theirs = NANS[case]
    got, want = _as_tuple(ours()), _as_tuple(theirs())
    for a, b in zip(got, want, strict=False):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), case
    _assert_same(got, want, tol=2e-2)


# ---- non-tensor arguments ------------------------------------------------------------------------------------------
def _non_tensor_cases():
    x, q = randn(4, 8), randn(1, 2, 5, 16)
    h, lm = randn(6, 8), randn(10, 8, seed=1)
    a = randn(4, 8, dtype=torch.bfloat16)
    qw, sw = quantize_weight(randn(6, 8), "int8")
    return {
        "rms_norm x list": (lambda: ops.rms_norm(x.tolist(), W8), r"rms_norm: x must be a torch.Tensor, got list"),
        "rms_norm weight None": (lambda: ops.rms_norm(x, None), r"weight must be a torch.Tensor, got NoneType"),
        "layer_norm bias ndarray": (lambda: ops.layer_norm(x, W8, B8.numpy()), r"bias must be a torch.Tensor, got "
                                                                               r"ndarray"),
        "layer_norm bias None": (lambda: ops.layer_norm(x, W8, None), r"bias must be a torch.Tensor of shape"),
        "add_rms_norm r ndarray": (lambda: ops.add_rms_norm(x, x.numpy(), W8), r"r must be a torch.Tensor"),
        "swiglu None": (lambda: ops.swiglu(None), r"swiglu: x must be a tensor .* got NoneType"),
        "softmax ndarray": (lambda: softmax(x.numpy()), r"softmax: x must be a torch.Tensor, got ndarray"),
        "gemm bias list": (lambda: gemm(a, a.T.contiguous(), bias=[0.0] * 4), r"bias must be a torch.Tensor, got "
                                                                              r"list"),
        "attention mask ndarray": (lambda: tilestack.attention(q, q, q, attn_mask=np.ones((5, 5), bool)),
                                   r"attn_mask must be a torch.Tensor, got ndarray"),
        "attention v None": (lambda: tilestack.attention(q, q, None), r"v must be a torch.Tensor, got NoneType"),
        "cross_entropy labels list": (lambda: ops.fused_linear_cross_entropy(h, lm, LABELS.tolist()),
                                      r"labels must be a torch.Tensor, got list"),
        "cross_entropy ignore_index tensor": (lambda: ops.fused_linear_cross_entropy(h, lm, LABELS, torch.tensor(-1)),
                                              r"ignore_index must be an int"),
        "rotary cos ndarray": (lambda: ops.rotary(q, q, COS.numpy(), SIN), r"cos must be a torch.Tensor"),
        "quantized_linear x ndarray": (lambda: quantized_linear(h.numpy(), qw, sw), r"x must be a torch.Tensor"),
        "quantize list": (lambda: tilestack.quantize([nn.Linear(8, 6)], "int8"), r"model must be a torch.nn.Module"),
    }


NON_TENSORS = _non_tensor_cases()


@pytest.mark.parametrize("case", list(NON_TENSORS))
def test_non_tensor_arguments_are_refused_by_name(case):
    call, fragment = NON_TENSORS[case]
    with pytest.raises(LaunchError, match=fragment):
        call()


@pytest.mark.filterwarnings("ignore:tilestack.scaled_dot_product_attention")
@pytest.mark.parametrize("bad", ["query ndarray", "attn_mask list", "key None"])
def test_sdpa_drop_in_gives_torchs_type_error_for_non_tensors(bad):
    """The drop-in hands such calls to torch: its own TypeError, naming the argument."""
    q = randn(1, 2, 5, 16)
    kw = dict(query=q, key=q, value=q)
    if bad == "query ndarray":
        kw["query"] = q.numpy()
    elif bad == "key None":
        kw["key"] = None
    else:
        kw["attn_mask"] = [[True] * 5] * 5
    name = next(n for n, t in kw.items() if not isinstance(t, torch.Tensor))
    fragment = rf"scaled_dot_product_attention\(\): argument '{name}'( \(position \d\))? must be Tensor, not "
    with pytest.raises(TypeError, match=fragment):
        F.scaled_dot_product_attention(**kw)
    with pytest.raises(TypeError, match=fragment):
        tilestack.scaled_dot_product_attention(**kw)


def test_sdpa_drop_in_takes_torchs_keyword_names():
    q, k, v = randn(1, 4, 5, 16), randn(1, 2, 7, 16, seed=1), randn(1, 2, 7, 16, seed=2)
    kw = dict(query=q, key=k, value=v, attn_mask=None, dropout_p=0.0, is_causal=True, scale=0.3, enable_gqa=True)
    _assert_same(tilestack.scaled_dot_product_attention(**kw), F.scaled_dot_product_attention(**kw))


# ---- tensors that are views of each other, outputs that overlap ----------------------------------------------------
def _views_cases():
    x = randn(4, 8)
    q = randn(2, 5, 3, 16)
    h = randn(10, 8)
    return {
        "add_rms_norm x is r": (lambda x: ops.add_rms_norm(x, x, W8), lambda x: (_rn(2 * x, W8), 2 * x), (x,)),
        "add_layer_norm r a view of x": (lambda x: ops.add_layer_norm(x, x.view(4, 8), W8, B8),
                                         lambda x: (_ln(2 * x, W8, B8), 2 * x), (x,)),
        "rms_norm weight a row of x": (lambda x: ops.rms_norm(x, x[0]), lambda x: _rn(x, x[0]), (x,)),
        "rotary q is k": (lambda q: ops.rotary(q, q, COS, SIN), lambda q: (_rotate(q, COS, SIN),) * 2, (q,)),
        "attention q is k is v": (lambda q: tilestack.attention(q, q, q),
                                  lambda q: _sdpa_math(q, q, q), (q.transpose(1, 2),)),
        "cross_entropy x is weight": (lambda h: ops.fused_linear_cross_entropy(h, h, torch.arange(10)),
                                      lambda h: _ce(h, h, torch.arange(10)), (h,)),
    }


VIEWS = _views_cases()


@pytest.mark.parametrize("case", list(VIEWS))
def test_inputs_that_are_views_of_each_other_as_torch(case):
    """One tensor passed as two arguments: outputs and the (summed) gradient of that tensor as torch's."""
    ours, theirs, (t,) = VIEWS[case]
    got = []
    for fn in (ours, theirs):
        leaf = t.detach().clone().requires_grad_()
        outs = _as_tuple(fn(leaf))
        gen = torch.Generator().manual_seed(5)
        sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs).backward()
        got.append((*[o.detach() for o in outs], leaf.grad))
    _assert_same(got[0], got[1], tol=1e-4)


def test_outputs_overlapping_their_inputs():
    """out= that is an input: refused where the kernel reads the input after writing (softmax, gemm); an
    element-wise kernel's exact in-place use (rotary's q_out=q) is taken; an expanded out is refused."""
    x = randn(4, 8)
    with pytest.raises(LaunchError, match=r"softmax: out shares memory with x"):
        softmax(x[:3], out=x[1:])
    a = randn(6, 6, dtype=torch.bfloat16)
    with pytest.raises(LaunchError, match=r"gemm: out shares memory with residual"):
        gemm(a.clone(), a.clone(), residual=a, out=a)
    with pytest.raises(LaunchError, match=r"gemm: out has shape \(4, 6\) and strides \(0, 1\)"):
        gemm(randn(4, 8, dtype=torch.bfloat16), randn(8, 6, dtype=torch.bfloat16),
             out=torch.empty(1, 6, dtype=torch.bfloat16).expand(4, 6))


# ---- found in tilestack.quant, outside this round's files (reported; expected to fail until fixed there) ----------
def test_quantize_refuses_nan_calibration_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    with pytest.raises(LaunchError, match=r"calibration inputs of \['0'\] hold NaN or infinite values"):
        tilestack.quantize(model, "fp8-act", calibration=[torch.full((2, 8), math.nan)])


def test_quantize_warns_of_a_skip_name_that_matches_no_layer():
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 6))
    with pytest.warns(UserWarning, match=r"skip names \['1 '\] match no nn.Linear"):
        tilestack.quantize(model, "int8", skip=["1 "])
