"""Round ten of the bad-input sweep over the public ops (``tilestack.attention``, the SDPA drop-in, the ops of
``tilestack.torch.ops``, the kernel functions ``tilestack.kernels.gemm`` / ``softmax`` / ``rotary`` / ...): each call
against what torch does with it, torch's answer in float64 (NaN and inf where torch has them) or an error raised
before any work, naming the argument, what was given and what was expected.

What rounds 1-9 did not reach: rows read through an index that reverses them (``x[idx]`` with idx descending, the
nearest torch has to a negative stride), channels-last layouts of rotary's and SwiGLU's inputs, dims past 2**31
elements made with ``expand()`` (stride 0, no memory) on the CPU where a mistake elsewhere must be refused before
an output is allocated, zero-size dims in every position with gradients, inputs that require grad beside ones that
do not, eps 0 (NaN rows as torch) and below 0, attention scales of 0, -0.0, below 0, NaN and inf (refused by the op,
torch's answer from the drop-in), cross-entropy's ignore_index patterns (every row ignored: NaN as torch, zero
gradients), labels out of range, float64 and complex tensors, misspelled keywords. Part two
(``test_bad_inputs_round10_more.py``): inference tensors, ``tilestack.quantize`` and the planner's
``describe_module``. The reference backend, and Triton's interpreter where a layout or a NaN reaches the kernel.

The ops' own checks held: every call here was answered as torch or refused by name before this round (a misspelled
keyword of a kernel function is refused as an unknown kernel constant, named). The two bugs found are in part two.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import tilestack
from tilestack import config
from tilestack import kernels as K
from tilestack.errors import LaunchError
from tilestack.torch import ops

BIG = 2**31 + 8          # rows past int32 indexing, made by expand() (stride 0): no memory behind them


@pytest.fixture(autouse=True)
def reference_backend():
    with config.override(backend="reference"):
        yield


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def d(t):
    return t.double()


def assert_as_torch(got, want, tol=1e-5):
    """got (ours) against want (torch in float64): the same NaN and inf positions, the rest within tol."""
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape, (a.shape, b.shape)
        assert torch.equal(a.isnan(), b.isnan()), (a, b)
        assert torch.equal(a.isinf(), b.isinf()) and torch.equal(a[a.isinf()], b[b.isinf()].to(a.dtype)), (a, b)
        finite = a.isfinite()
        torch.testing.assert_close(d(a)[finite], d(b)[finite], rtol=tol, atol=tol)


def rope(x, cos, sin):
    x1, x2 = d(x).chunk(2, -1)
    c, s = d(cos)[None, :, None], d(sin)[None, :, None]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)


def reversed_rows(t, dim=0):
    """t read through an index that reverses dim (a gather: torch has no negative strides), as a model's
    ``x[idx]`` with idx descending gives it."""
    return t.index_select(dim, torch.arange(t.shape[dim] - 1, -1, -1))


COS, SIN = K.rotary_tables(5, 16)
W8, B8 = randn(8, seed=1), randn(8, seed=2)


# ---- layouts: rows reversed through an index, channels-last, stride 0 -------------------------------------------
def _cl(t):
    return t.to(memory_format=torch.channels_last)     # (B, C, H, W) strides (CHW, 1, WC, C): W not contiguous


def _layout_cases():
    """name -> (the leaves, our op on them with the layout made inside (a differentiable view or gather, so the
    leaves get gradients through it), torch's op on them in float64)."""
    x4, x2 = randn(2, 3, 4, 8), randn(4, 8)
    q, k = randn(2, 5, 3, 16), randn(2, 5, 1, 16, seed=1)
    qa, ka, va = randn(1, 2, 5, 16), randn(1, 2, 7, 16, seed=1), randn(1, 2, 7, 16, seed=2)
    h, lm, lab = randn(6, 8), randn(10, 8, seed=1), torch.tensor([1, 0, 9, -100, 2, 5])
    cs, sn = COS[:1].expand(5, 8), SIN[:1].expand(5, 8)                 # one angle for every position: stride 0
    return {
        "rms_norm channels-last": ((x4,), lambda x: ops.rms_norm(_cl(x), W8),
                                   lambda x: F.rms_norm(x, (8,), d(W8), 1e-6)),
        "layer_norm channels-last": ((x4,), lambda x: ops.layer_norm(_cl(x), W8, B8),
                                     lambda x: F.layer_norm(x, (8,), d(W8), d(B8), 1e-5)),
        "add_layer_norm channels-last beside contiguous": (
            (x4, x4 + 1), lambda x, r: ops.add_layer_norm(_cl(x), r, W8, B8),
            lambda x, r: (F.layer_norm(x + r, (8,), d(W8), d(B8), 1e-5), x + r)),
        "swiglu channels-last": ((x4,), lambda x: ops.swiglu(_cl(x)), lambda x: F.silu(x[..., :4]) * x[..., 4:]),
        "rotary channels-last": ((q, k), lambda a, b: ops.rotary(_cl(a), _cl(b), COS, SIN),
                                 lambda a, b: (rope(a, COS, SIN), rope(b, COS, SIN))),
        "rotary positions reversed": ((q, k), lambda a, b: ops.rotary(reversed_rows(a, 1), b, COS, SIN),
                                      lambda a, b: (rope(reversed_rows(a, 1), COS, SIN), rope(b, COS, SIN))),
        "rotary tables stride 0": ((q, k), lambda a, b: ops.rotary(a, b, cs, sn),
                                   lambda a, b: (rope(a, cs, sn), rope(b, cs, sn))),
        "attention channels-last": ((qa, ka, va), lambda a, b, c: tilestack.attention(_cl(a), _cl(b), _cl(c), True),
                                    lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)),
        "attention queries reversed": ((qa, ka, va),
                                       lambda a, b, c: tilestack.attention(reversed_rows(a, 2), b, c),
                                       lambda a, b, c: F.scaled_dot_product_attention(reversed_rows(a, 2), b, c)),
        "rms_norm columns reversed": ((x2,), lambda x: ops.rms_norm(reversed_rows(x, 1), W8),
                                      lambda x: F.rms_norm(reversed_rows(x, 1), (8,), d(W8), 1e-6)),
        "rms_norm rows stride 0": ((x2[:1],), lambda x: ops.rms_norm(x.expand(4, 8), W8),
                                   lambda x: F.rms_norm(x.expand(4, 8), (8,), d(W8), 1e-6)),
        "cross-entropy rows reversed": ((h, lm),
                                        lambda a, b: ops.fused_linear_cross_entropy(reversed_rows(a), b, lab),
                                        lambda a, b: F.cross_entropy(reversed_rows(a) @ b.T, lab)),
        "cross-entropy x stride 0": ((h[:1], lm),
                                     lambda a, b: ops.fused_linear_cross_entropy(a.expand(6, 8), b, lab),
                                     lambda a, b: F.cross_entropy(a.expand(6, 8) @ b.T, lab)),
    }


LAYOUTS = _layout_cases()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", list(LAYOUTS))
def test_layouts_answer_as_torch_forward_and_backward(case, backend):
    """Each input in its layout: the outputs and every leaf's gradient (through the view: summed over a stride-0
    dim, reversed back through the gather) as torch's in float64."""
    bases, ours, theirs = LAYOUTS[case]
    leaves = [t.clone().requires_grad_() for t in bases]
    refs = [d(t).requires_grad_() for t in bases]
    with config.override(backend=backend):
        got = ours(*leaves)
    want = theirs(*refs)
    assert_as_torch(tuple(t.detach() for t in got) if isinstance(got, tuple) else got.detach(),
                    tuple(t.detach() for t in want) if isinstance(want, tuple) else want.detach())
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    gs = [randn(*w.shape, seed=7 + i) for i, w in enumerate(want)]
    with config.override(backend=backend):
        torch.autograd.backward(list(got), gs)
    torch.autograd.backward(list(want), [d(g) for g in gs])
    for leaf, ref in zip(leaves, refs, strict=True):
        torch.testing.assert_close(d(leaf.grad), ref.grad, rtol=1e-5, atol=1e-5)


# ---- zero-size dims in every position, with gradients -------------------------------------------------------------
@pytest.mark.parametrize("shape", [(0, 8), (4, 0), (0, 0), (2, 0, 8), (0, 3, 8), (2, 3, 0)])
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm", "swiglu"])
def test_zero_size_dims_in_every_position_with_gradients(op, shape):
    """Outputs and gradients (of x, weight and bias: zeros, or empty) of the shapes torch gives."""
    x, w, b = randn(*shape), randn(shape[-1], seed=1), randn(shape[-1], seed=2)
    ours = {"rms_norm": lambda x, w, b: ops.rms_norm(x, w), "layer_norm": ops.layer_norm,
            "swiglu": lambda x, w, b: ops.swiglu(x) * w[: shape[-1] // 2].sum()}[op]
    theirs = {"rms_norm": lambda x, w, b: F.rms_norm(x, (shape[-1],), w, 1e-6),
              "layer_norm": lambda x, w, b: F.layer_norm(x, (shape[-1],), w, b, 1e-5),
              "swiglu": lambda x, w, b: F.silu(x[..., :shape[-1] // 2]) * x[..., shape[-1] // 2:]
              * w[: shape[-1] // 2].sum()}[op]
    mine = [t.clone().requires_grad_() for t in (x, w, b)]
    refs = [d(t).requires_grad_() for t in (x, w, b)]
    y, want = ours(*mine), theirs(*refs)
    assert_as_torch(y.detach(), want.detach())
    (y.sum() + sum(t.sum() for t in mine)).backward()
    (want.sum() + sum(t.sum() for t in refs)).backward()
    for a, r in zip(mine, refs, strict=True):
        torch.testing.assert_close(d(a.grad), r.grad, rtol=1e-6, atol=1e-6)


# ---- dims past 2**31 elements by expand(): a mistake elsewhere refused before any output is allocated -----------
def _huge(*shape, dtype=torch.float32):
    """A (shape) tensor past 2**31 elements of one stored element, broadcast (stride 0 everywhere)."""
    return torch.zeros((1,) * len(shape), dtype=dtype).expand(*shape)


def _huge_cases():
    bf = torch.bfloat16
    return {
        "rms_norm weight length": (lambda: ops.rms_norm(_huge(BIG, 8), W8[:4]),
                                   r"rms_norm: weight has 4 elements; expected x.shape\[1\] = 8"),
        "rms_norm x int64": (lambda: ops.rms_norm(_huge(BIG, 8, dtype=torch.int64), W8),
                             r"rms_norm: x has dtype int64; expected one of"),
        "layer_norm bias None": (lambda: ops.layer_norm(_huge(BIG, 8), W8, None), r"layer_norm: bias must be"),
        "add_rms_norm r shape": (lambda: ops.add_rms_norm(_huge(BIG, 8), _huge(BIG - 1, 8), W8),
                                 r"add_rms_norm: r is \(2147483655, 8\); expected x's shape \(2147483656, 8\)"),
        "swiglu odd width": (lambda: ops.swiglu(_huge(BIG, 7)), r"swiglu: x must be a tensor whose last dim is even"),
        "attention head dims": (lambda: tilestack.attention(_huge(1, 1, BIG, 16), randn(1, 1, 4, 8), randn(1, 1, 4, 8)),
                                r"attention_forward: k is \(1, 1, 4, 8\); expected \(B=1, Hkv, Nk, D=16\)"),
        "attention keys f64": (lambda: tilestack.attention(randn(1, 1, 4, 16), *[_huge(1, 1, BIG, 16,
                                                                                dtype=torch.float64)] * 2),
                               r"(k has dtype float64|q, k, v must share a dtype)"),
        "cross-entropy labels length": (lambda: ops.fused_linear_cross_entropy(randn(6, 8), randn(10, 8),
                                                                               _huge(BIG, dtype=torch.long)),
                                        r"labels has 2147483656 elements; expected x.shape\[0\] = 6"),
        "cross-entropy vocabulary": (lambda: ops.fused_linear_cross_entropy(randn(6, 8), _huge(BIG, 8),
                                                                            torch.zeros(6, dtype=torch.long)),
                                     r"the vocabulary weight.shape\[0\] = 2147483656; expected 1 .. 16777215"),
        "gemm inner dims": (lambda: K.gemm(_huge(BIG, 16, dtype=bf), randn(8, 6, dtype=bf)),
                            r"gemm: a is \(2147483656, 16\) and b is \(8, 6\); a.shape\[1\] must equal b.shape\[0\]"),
        "gemm residual shape": (lambda: K.gemm(_huge(BIG, 8, dtype=bf), randn(8, 6, dtype=bf),
                                               residual=randn(4, 6, dtype=bf)),
                                r"gemm: residual is \(4, 6\); expected the output's shape"),
        "softmax out shape": (lambda: K.softmax(_huge(BIG, 4), out=torch.empty(4, 4)), r"softmax: out"),
        "rotary cos length": (lambda: ops.rotary(_huge(1, BIG, 1, 16), _huge(1, BIG, 1, 16), COS, SIN),
                              r"rotary: cos is \(5, 8\); expected \(N, D/2\) = \(2147483656, 8\)"),
    }


HUGE = _huge_cases()


@pytest.mark.parametrize("case", list(HUGE))
def test_a_mistake_beside_a_dim_past_2_31_is_refused_before_allocating(case):
    """An output of 2**34 f32 elements would take 64 GiB: each call must be refused by its checks (before the
    output is made, which would fail in torch's allocator or take the machine's memory), naming the argument."""
    call, message = HUGE[case]
    with pytest.raises(LaunchError, match=message):
        call()


@pytest.mark.parametrize("case", ["softmax no columns", "attention no batch",
                                  "gemm no columns"])
def test_dims_past_2_31_with_nothing_to_compute_answer_as_torch(case):
    """A dim past 2**31 beside a dim of 0: nothing to launch (no output element), so an empty answer at once, of
    torch's shape and dtype. (Not the norms or the cross-entropy: their per-row statistics and masks, as torch's
    intermediates, take bytes per row whatever the width.)"""
    bf = torch.bfloat16
    if case == "softmax no columns":
        got, want = K.softmax(_huge(BIG, 0)), torch.empty(BIG, 0)
    elif case == "attention no batch":
        got = tilestack.attention(_huge(0, 2, BIG, 16), _huge(0, 2, BIG, 16), _huge(0, 2, BIG, 16))
        want = torch.empty(0, 2, BIG, 16)
    else:
        got, want = K.gemm(_huge(BIG, 8, dtype=bf), randn(8, 0, dtype=bf)), torch.empty(BIG, 0, dtype=bf)
    assert got.shape == want.shape and got.dtype == want.dtype


# ---- eps: 0 gives torch's NaN rows, below 0 is refused ------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm"])
@pytest.mark.parametrize("eps", [0.0, -0.0])
def test_eps_zero_on_rows_of_no_spread_gives_torchs_nans(op, eps, backend):
    """Row 0 all zeros, row 1 constant (no spread about its mean), rows 2-3 random: with eps 0 torch's rsqrt(0) is
    inf and 0 * inf NaN (row 0 in both norms, row 1 in layer norm), the other rows finite. Never replaced."""
    x = randn(4, 8)
    x[0], x[1] = 0.0, 3.0
    r = torch.zeros(4, 8)
    theirs = {"rms_norm": lambda: F.rms_norm(d(x), (8,), d(W8), eps),
              "layer_norm": lambda: F.layer_norm(d(x), (8,), d(W8), d(B8), eps),
              "add_rms_norm": lambda: (F.rms_norm(d(x), (8,), d(W8), eps), d(x)),
              "add_layer_norm": lambda: (F.layer_norm(d(x), (8,), d(W8), d(B8), eps), d(x))}[op]
    ours = {"rms_norm": lambda: ops.rms_norm(x, W8, eps), "layer_norm": lambda: ops.layer_norm(x, W8, B8, eps),
            "add_rms_norm": lambda: ops.add_rms_norm(x, r, W8, eps),
            "add_layer_norm": lambda: ops.add_layer_norm(x, r, W8, B8, eps)}[op]
    with config.override(backend=backend):
        got = ours()
    want = theirs()
    assert bool((want if isinstance(want, torch.Tensor) else want[0])[0].isnan().all())     # the case has NaN rows
    assert_as_torch(got, want)


@pytest.mark.parametrize("eps", [-1e-6, -1.0, -math.inf, math.nan])
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm"])
def test_eps_below_zero_or_nan_is_refused_naming_eps(op, eps):
    x = randn(4, 8)
    call = {"rms_norm": lambda: ops.rms_norm(x, W8, eps), "layer_norm": lambda: ops.layer_norm(x, W8, B8, eps),
            "add_rms_norm": lambda: ops.add_rms_norm(x, x, W8, eps),
            "add_layer_norm": lambda: ops.add_layer_norm(x, x, W8, B8, eps)}[op]
    with pytest.raises(LaunchError, match=rf"{op}: eps must be a number >= 0, got {re.escape(repr(eps))}"):
        call()


# ---- attention scales: refused by the op, torch's answer from the drop-in ----------------------------------------
SCALES = [0.0, -0.0, -0.25, math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", SCALES)
def test_attention_refuses_a_scale_outside_its_range_by_name(scale, causal):
    q = randn(1, 2, 5, 16)
    with pytest.raises(LaunchError, match=rf"scale must be a positive number or None, got {re.escape(repr(scale))}"):
        tilestack.attention(q, q, q, causal, scale=scale)


@pytest.mark.filterwarnings("ignore:tilestack.scaled_dot_product_attention")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", SCALES)
def test_sdpa_drop_in_gives_torchs_answer_for_any_scale(scale, causal):
    """The drop-in promises torch's answer, and hands these scales to torch: its default dispatch's answer in
    float64 (on the CPU its flash kernel: causal rows NaN at scale 0 or below, a NaN scale read as 0; torch's math
    backend differs from it there, so the reference is the function as a model calls it), the same NaN positions."""
    q, k, v = randn(1, 2, 5, 16), randn(1, 2, 7, 16, seed=1), randn(1, 2, 7, 16, seed=2)
    got = tilestack.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    want = F.scaled_dot_product_attention(d(q), d(k), d(v), is_causal=causal, scale=scale)
    torch_f32 = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    if torch.equal(torch_f32.isnan(), want.isnan()):
        assert_as_torch(got, want)
        assert torch.equal(got.isnan(), torch_f32.isnan())
    else:
        # torch's own f32 and f64 kernels disagree for this scale (an AVX2 machine, session 25: a NaN scale gave 0
        # in f32 and NaN in f64): the drop-in's answer is torch's for the call as made, in f32
        torch.testing.assert_close(got, torch_f32, rtol=0, atol=0, equal_nan=True)


# ---- cross-entropy: ignore_index patterns and labels out of range -------------------------------------------------
def _ce_pair(x, w, labels, ignore_index=-100):
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    xr, wr = d(x).requires_grad_(), d(w).requires_grad_()
    loss = ops.fused_linear_cross_entropy(xl, wl, labels, ignore_index)
    want = F.cross_entropy(xr @ wr.T, labels.long(), ignore_index=ignore_index)
    return (loss, xl, wl), (want, xr, wr)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", ["all ignored", "ignore a real class", "ignore past the vocabulary", "ignore -1",
                                  "no rows", "int32 labels", "labels stride 0", "one row kept"])
def test_cross_entropy_ignore_patterns_as_torch(case, backend):
    """The loss (NaN where torch's mean is over no row: 0/0) and both gradients (zeros then, as torch's) against
    float64 torch."""
    x, w = randn(6, 8), randn(10, 8, seed=1)
    labels, ii = {
        "all ignored": (torch.full((6,), -100), -100),
        "ignore a real class": (torch.tensor([1, 0, 9, 3, 9, 5]), 9),
        "ignore past the vocabulary": (torch.tensor([1, 50, 9, 50, 2, 5]), 50),
        "ignore -1": (torch.tensor([-1, 4, -1, 3, -1, -1]), -1),
        "no rows": (torch.zeros(0, dtype=torch.long), -100),
        "int32 labels": (torch.tensor([1, -100, 9, 3, 2, 5], dtype=torch.int32), -100),
        "labels stride 0": (torch.tensor([7]).expand(6), -100),
        "one row kept": (torch.tensor([-100, -100, -100, 4, -100, -100]), -100),
    }[case]
    if case == "no rows":
        x = x[:0]
    with config.override(backend=backend):
        (loss, xl, wl), (want, xr, wr) = _ce_pair(x, w, labels, ii)
        assert_as_torch(loss.detach(), want.detach())
        loss.backward()
    want.backward()
    for ours, ref in ((xl, xr), (wl, wr)):
        assert_as_torch(ours.grad, ref.grad)


@pytest.mark.parametrize("labels,ii,bad,index", [
    ([1, 0, 10, 3, 2, 5], -100, 10, 2),                # = V
    ([1, 0, -1, 3, 2, 5], -100, -1, 2),                # negative, not the ignore_index
    ([1, -100, 9, 3, 2, 5], -1, -100, 1),              # torch's default ignore_index, with another given
    ([1, 0, 2**40, 3, 2, 5], -100, 2**40, 2),          # past int32
])
def test_cross_entropy_labels_out_of_range_are_refused_naming_the_first(labels, ii, bad, index):
    """torch raises ("Target 10 is out of bounds"); tilestack before any work, naming the value, its index and the
    classes expected."""
    with pytest.raises(LaunchError, match=rf"labels holds {bad} \(at index {index}\); expected classes 0..V-1 = "
                                          rf"0..9 or ignore_index={ii}"):
        ops.fused_linear_cross_entropy(randn(6, 8), randn(10, 8, seed=1), torch.tensor(labels), ii)


# ---- dtypes: float64 and complex where the kernels take f32/bf16/f16 ---------------------------------------------
def _dtype_cases():
    f64, c64 = torch.float64, torch.complex64
    x, q, k = randn(4, 8), randn(1, 2, 5, 16), randn(2, 5, 1, 16)
    a = randn(4, 8, dtype=torch.bfloat16)
    return {
        "rms_norm x f64": (lambda: ops.rms_norm(d(x), d(W8)), r"rms_norm: x has dtype float64; expected one of "
                                                              r"float32, bfloat16, float16"),
        "rms_norm weight f64": (lambda: ops.rms_norm(x, d(W8)), r"rms_norm: weight has dtype float64"),
        "layer_norm x complex": (lambda: ops.layer_norm(x.to(c64), W8, B8), r"layer_norm: x has dtype complex64"),
        "swiglu f64": (lambda: ops.swiglu(d(x)), r"swiglu: x has dtype torch.float64"),
        "swiglu complex": (lambda: ops.swiglu(x.to(c64)), r"swiglu: x has dtype torch.complex64"),
        "rotary q f64": (lambda: ops.rotary(d(k), d(k), COS, SIN), r"rotary: q has dtype float64"),
        "rotary cos f64": (lambda: ops.rotary(k, k, d(COS), SIN), r"rotary: cos has dtype float64; expected one of "
                                                                  r"float32"),
        "attention f64": (lambda: tilestack.attention(d(q), d(q), d(q)), r"q has dtype float64"),
        "attention complex": (lambda: tilestack.attention(q.to(c64), q.to(c64), q.to(c64)), r"q has dtype complex64"),
        "attention mask f64": (lambda: tilestack.attention(q, q, q, attn_mask=torch.zeros(5, 5, dtype=f64)),
                               r"attn_mask has dtype float64; expected one of bool, float32"),
        "attention mask complex": (lambda: tilestack.attention(q, q, q, attn_mask=torch.zeros(5, 5, dtype=c64)),
                                   r"attn_mask has dtype complex64"),
        "cross-entropy f64": (lambda: ops.fused_linear_cross_entropy(d(x), randn(10, 8, dtype=f64),
                                                                     torch.zeros(4, dtype=torch.long)),
                              r"x has dtype float64"),
        "cross-entropy labels uint8": (lambda: ops.fused_linear_cross_entropy(x, randn(10, 8),
                                                                              torch.zeros(4, dtype=torch.uint8)),
                                       r"labels has dtype uint8; expected one of int64, int32"),
        "gemm f64": (lambda: K.gemm(d(a), d(a.T)), r"gemm: a has dtype float64; expected one of bfloat16, float16"),
        "gemm bias f64": (lambda: K.gemm(a, a.T.contiguous(), bias=torch.zeros(4, dtype=f64)),
                          r"gemm: bias has dtype float64"),
        "gemm out_dtype f64": (lambda: K.gemm(a, a.T.contiguous(), out_dtype=f64), r"gemm: out_dtype=torch.float64"),
        "softmax complex": (lambda: K.softmax(x.to(c64)), r"softmax: x has dtype complex64"),
    }


DTYPES = _dtype_cases()


@pytest.mark.parametrize("case", list(DTYPES))
def test_float64_and_complex_are_refused_by_name(case):
    call, message = DTYPES[case]
    with pytest.raises(LaunchError, match=message):
        call()


# ---- misspelled keywords ------------------------------------------------------------------------------------------
def test_misspelled_keywords_of_the_public_ops_are_pythons_type_error():
    x, q = randn(4, 8), randn(1, 2, 5, 16)
    for call, name in ((lambda: tilestack.attention(q, q, q, is_causal=True), "is_causal"),
                       (lambda: ops.rms_norm(x, W8, epsilon=1e-5), "epsilon"),
                       (lambda: ops.fused_linear_cross_entropy(x, randn(10, 8), torch.zeros(4, dtype=torch.long),
                                                               ignore_idx=-1), "ignore_idx"),
                       (lambda: tilestack.scaled_dot_product_attention(q, q, q, causal=True), "causal"),
                       (lambda: tilestack.quantize(torch.nn.Linear(8, 8), "int8", skips=()), "skips")):
        with pytest.raises(TypeError, match=rf"unexpected keyword argument '{name}'"):
            call()


@pytest.mark.parametrize("case", ["softmax outt", "gemm activaton", "gemm bais", "rotary qout", "swiglu output"])
def test_misspelled_keywords_of_kernel_functions_are_refused_before_any_write(case):
    """The kernel functions take launch config as keywords (BM=, num_warps=): a misspelled keyword of their own is
    refused naming it, and an output given beside it is left unwritten."""
    a, b = randn(4, 8, dtype=torch.bfloat16), randn(8, 6, dtype=torch.bfloat16, seed=1)
    q, k = randn(2, 5, 3, 16), randn(2, 5, 1, 16, seed=1)
    out = torch.full((4, 8), 7.0)
    call, name = {
        "softmax outt": (lambda: K.softmax(randn(4, 8), out=out, outt=out), "outt"),
        "gemm activaton": (lambda: K.gemm(a, b, activaton="relu"), "activaton"),
        "gemm bais": (lambda: K.gemm(a, b, bais=torch.zeros(6)), "bais"),
        "rotary qout": (lambda: K.rotary(q, k, COS, SIN, q_out=torch.full_like(q, 7.0), qout=q), "qout"),
        "swiglu output": (lambda: K.swiglu(randn(4, 8), randn(4, 8), out=out, output=out), "output"),
    }[case]
    with pytest.raises(LaunchError, match=rf"unknown constant\(s\) \['{name}'\]"):
        call()
    assert bool((out == 7.0).all())


def test_misspelled_optimize_option_is_refused_naming_it():
    with pytest.raises(LaunchError, match=r"optimize: options \['min_row'\] unknown; expected tilestack's"):
        tilestack.optimize(torch.nn.Linear(8, 8), min_row=1)
