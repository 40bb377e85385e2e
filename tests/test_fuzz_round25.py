"""Fuzz round twenty-five: the public ops inside ``torch.autocast`` with arguments of different floating dtypes (a
bf16 activation from an autocast Linear beside an f32 parameter), forward and backward, against torch's own ops there
and float64 torch; the backward on meta tensors (gradients of the inputs' shapes and dtypes, None where torch's are);
NumPy and ``fractions`` scalars as eps, scale, dropout_p and ignore_index; the fused cross-entropy with NaN and
infinities in x or the weight, in rows labelled and ignored, forward and backward on both CPU backends; incoming
gradients holding NaN, infinities and large values, through every differentiable op, against float64 torch. Every
result starts as NaN (``poisoned_allocations``).

What this round found (the test failed before its fix):
- ``fused_linear_cross_entropy(h, lm_head.weight, labels)`` inside ``torch.autocast`` with h in bf16 (an autocast
  Linear's output) and the weight an f32 parameter was refused ("weight has dtype float32; expected bfloat16"),
  where torch's ``F.cross_entropy(F.linear(h, weight), labels)`` there casts both to the autocast dtype and answers;
  likewise ``tilestack.attention`` with q, k, v of different dtypes (torch's SDPA casts them). Inside autocast,
  arguments of different floating dtypes are now cast to the autocast dtype as torch's are
  (``tilestack.torch._autograd.autocast_unify``); arguments of one dtype keep it, as before, and outside autocast
  mixed dtypes are refused by name, as before.
"""

from __future__ import annotations

import fractions
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tilestack
from test_fuzz_round22_more import close  # (NaN and infinities exactly where float64 torch has them)
from tilestack import config
from tilestack.errors import LaunchError
from tilestack.kernels import rotary_tables
from tilestack.testing.fuzz.outcomes import poisoned_allocations
from tilestack.torch import ops

BACKENDS = ("reference", "triton")
BF16 = torch.bfloat16
LABELS = torch.tensor([1, 4, -100, 2, 0])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(2500 + seed)


def randn(seed: int, *shape, dtype=torch.float32, requires_grad: bool = False) -> torch.Tensor:
    t = torch.randn(shape, generator=gen(seed), dtype=torch.float64).to(dtype)
    return t.requires_grad_(requires_grad)


def bf16_64(t: torch.Tensor) -> torch.Tensor:
    """t as autocast hands it to the op (bf16), in float64: the reference of a bf16 computation."""
    return t.detach().to(BF16).double().requires_grad_()


# ---- autocast: arguments of different floating dtypes, cast as torch's autocast casts them -------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["x_bf16", "weight_bf16"])
def test_fused_cross_entropy_under_autocast_with_mixed_dtypes(backend, which):
    x = randn(1, 5, 16, dtype=BF16 if which == "x_bf16" else torch.float32, requires_grad=True)
    w = randn(2, 7, 16, dtype=BF16 if which == "weight_bf16" else torch.float32, requires_grad=True)
    with config.override(backend=backend), poisoned_allocations(), torch.autocast("cpu", dtype=BF16):
        loss = ops.fused_linear_cross_entropy(x, w, LABELS)
        want_torch = F.cross_entropy(F.linear(x, w), LABELS)
    loss.backward()
    assert loss.dtype == want_torch.dtype == torch.float32
    x64, w64 = bf16_64(x), bf16_64(w)
    want = F.cross_entropy(x64 @ w64.T, LABELS)
    want.backward()
    close(loss, want, 1e-2, "loss")                # (the logits rounded to bf16, as torch's)
    close(loss, want_torch, 2e-2, "loss against torch's under autocast")
    assert x.grad.dtype == x.dtype and w.grad.dtype == w.dtype, "each gradient in its input's dtype"
    close(x.grad, x64.grad, 1e-2, "dx")
    close(w.grad, w64.grad, 1e-2, "dw")


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_under_autocast_with_mixed_dtypes_answers_as_torchs_sdpa(backend):
    q = randn(3, 1, 2, 5, 16, requires_grad=True)                 # (B, H, N, D) f32
    k = randn(4, 1, 2, 6, 16, dtype=BF16, requires_grad=True)     # bf16
    v = randn(5, 1, 2, 6, 16, requires_grad=True)
    with config.override(backend=backend), poisoned_allocations(), torch.autocast("cpu", dtype=BF16):
        o = tilestack.attention(q, k, v, causal=True, causal_align="bottom_right")
        want_torch = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool).tril(1))
    assert o.dtype == want_torch.dtype == BF16
    do = randn(6, 1, 2, 5, 16)
    o.backward(do)
    q64, k64, v64 = bf16_64(q), bf16_64(k), bf16_64(v)
    want = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=torch.ones(5, 6, dtype=torch.bool).tril(1))
    want.backward(do.double())
    close(o, want, 1e-2, "o")
    close(o, want_torch, 2e-2, "o against torch's under autocast")
    for name, t, t64 in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert t.grad.dtype == t.dtype, f"{name} in {t.grad.dtype}, its input in {t.dtype}"
        close(t.grad, t64.grad, 2e-2, name)


def test_attention_under_fp16_autocast_with_mixed_dtypes_and_an_f32_float_mask():
    q, k, v = randn(19, 1, 2, 4, 16, dtype=BF16), randn(20, 1, 2, 5, 16), randn(21, 1, 2, 5, 16, dtype=BF16)
    mask = randn(22, 4, 5)                                          # an additive f32 mask, broadcast over (B, H)
    mask[1, :] = -float("inf")                                      # a query row that sees no key
    with config.override(backend="reference"), poisoned_allocations(), torch.autocast("cpu", dtype=torch.float16):
        o = tilestack.attention(q, k, v, attn_mask=mask)
        want_torch = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert o.dtype == want_torch.dtype == torch.float16
    f16_64 = lambda t: t.to(torch.float16).double()                  # noqa: E731
    close(o, F.scaled_dot_product_attention(f16_64(q), f16_64(k), f16_64(v), attn_mask=mask.double()), 2e-3, "o")
    close(o, want_torch, 2e-3, "o against torch's under autocast")


def test_one_dtype_under_autocast_is_kept_and_mixed_outside_it_refused_by_name():
    x, w = randn(7, 5, 16), randn(8, 7, 16)
    with config.override(backend="reference"), poisoned_allocations():
        with torch.autocast("cpu", dtype=BF16):
            inside = ops.fused_linear_cross_entropy(x, w, LABELS)
        close(inside, F.cross_entropy(x.double() @ w.double().T, LABELS), 1e-5, "f32 loss under autocast")
        with pytest.raises(LaunchError, match="weight has dtype float32"):
            ops.fused_linear_cross_entropy(x.to(BF16), w, LABELS)
        with pytest.raises(LaunchError, match="q, k, v must share a dtype"):
            tilestack.attention(randn(9, 1, 1, 3, 16), randn(9, 1, 1, 3, 16, dtype=BF16), randn(9, 1, 1, 3, 16))
        with torch.autocast("cpu", dtype=BF16), pytest.raises(LaunchError, match="weight has dtype float64"):
            ops.fused_linear_cross_entropy(x, w.double(), LABELS)      # autocast leaves float64 alone


# ---- the backward on meta tensors --------------------------------------------------------------------------------
COS, SIN = rotary_tables(4, 16)
META_CASES = {
    "rms_norm": ([(3, 8), (8,)], lambda x, w: ops.rms_norm(x, w)),
    "layer_norm": ([(3, 8), (8,), (8,)], lambda x, w, b: ops.layer_norm(x, w, b)),
    "add_rms_norm": ([(3, 8), (3, 8), (8,)], lambda x, r, w: ops.add_rms_norm(x, r, w)[0]),
    "add_layer_norm": ([(3, 8), (3, 8), (8,), (8,)], lambda x, r, w, b: ops.add_layer_norm(x, r, w, b)[1]),
    "swiglu": ([(3, 8)], lambda x: ops.swiglu(x)),
    "rotary": ([(1, 4, 2, 16), (1, 4, 1, 16)],
               lambda q, k: ops.rotary(q, k, COS.to("meta"), SIN.to("meta"))[0]),
    "attention": ([(1, 2, 4, 16), (1, 1, 5, 16), (1, 1, 5, 16)],
                  lambda q, k, v: tilestack.attention(q, k, v, causal=True)),
    "fused_linear_cross_entropy": ([(3, 8), (5, 8)], lambda x, w: ops.fused_linear_cross_entropy(
        x, w, torch.zeros(3, dtype=torch.long, device="meta"))),
}


@pytest.mark.parametrize("name", sorted(META_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_backward_on_meta_tensors_gives_gradients_of_the_inputs_shapes(name, dtype):
    shapes, fn = META_CASES[name]
    ins = [torch.empty(s, dtype=dtype, device="meta", requires_grad=True) for s in shapes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = fn(*ins)
        y.sum().backward()
    # add_layer_norm's h does not reach the weight and bias; rotary's first result does not reach k: None, as torch's
    unreached = {"add_layer_norm": (2, 3), "rotary": (1,)}.get(name, ())
    for i, t in enumerate(ins):
        if i in unreached:
            assert t.grad is None, f"{name}: input {i} got a gradient; torch's is None"
            continue
        assert t.grad is not None and t.grad.is_meta, f"{name}: input {i} has no meta gradient"
        assert t.grad.shape == t.shape and t.grad.dtype == t.dtype, \
            f"{name}: input {i}'s gradient {tuple(t.grad.shape)} {t.grad.dtype}, expected {tuple(t.shape)} {t.dtype}"


# ---- NumPy and fractions scalars as arguments ----------------------------------------------------------------------
@pytest.mark.parametrize("num", [np.float32, np.float64, fractions.Fraction])
def test_numpy_and_fraction_scalars_as_arguments(num):
    x, w, b = randn(10, 3, 16), randn(11, 16), randn(12, 16)
    q, k, v = randn(13, 1, 2, 4, 16), randn(14, 1, 2, 5, 16), randn(15, 1, 2, 5, 16)
    eps, scale = num(1, 4) if num is fractions.Fraction else num(0.25), \
        num(1, 2) if num is fractions.Fraction else num(0.5)
    with config.override(backend="reference"), poisoned_allocations():
        close(ops.rms_norm(x, w, eps), F.rms_norm(x.double(), (16,), w.double(), 0.25), 1e-5, "rms_norm")
        close(ops.layer_norm(x, w, b, eps), F.layer_norm(x.double(), (16,), w.double(), b.double(), 0.25), 1e-5,
              "layer_norm")
        close(tilestack.attention(q, k, v, scale=scale),
              F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.5), 1e-5, "attention")
        for bad in (num(-1), ):
            with pytest.raises(LaunchError, match="eps"):
                ops.rms_norm(x, w, bad)
            with pytest.raises(LaunchError, match="scale"):
                tilestack.attention(q, k, v, scale=bad)
    labels = torch.tensor([1, 2, 2])
    with config.override(backend="reference"), poisoned_allocations():
        got = ops.fused_linear_cross_entropy(x, randn(16, 5, 16), labels, ignore_index=np.int64(2))
    close(got, F.cross_entropy(x.double() @ randn(16, 5, 16).double().T, labels, ignore_index=2), 1e-5, "loss")


# ---- the fused cross-entropy with NaN and infinities --------------------------------------------------------------
SPECIALS = {
    "nan in a labelled row of x": ("x", (0, 3), float("nan")),
    "nan in an ignored row of x": ("x", (2, 3), float("nan")),
    "+inf in an ignored row of x": ("x", (2, 0), float("inf")),
    "-inf in a labelled row of x": ("x", (1, 5), -float("inf")),
    "nan in a class row of the weight no label names": ("w", (3, 0), float("nan")),
    "-inf in the weight": ("w", (4, 2), -float("inf")),
    "a logit near 1e30": ("x", (0, 0), 1e30),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(SPECIALS))
def test_fused_cross_entropy_specials_forward_and_backward(case, backend):
    which, at, value = SPECIALS[case]
    x, w = randn(17, 5, 16), randn(18, 7, 16)
    (x if which == "x" else w)[at] = value
    x.requires_grad_(), w.requires_grad_()
    with config.override(backend=backend), poisoned_allocations():
        loss = ops.fused_linear_cross_entropy(x, w, LABELS)
    loss.backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = F.cross_entropy(x64 @ w64.T, LABELS)
    want.backward()
    close(loss, want, 1e-4, f"{case}: loss")
    close(x.grad, x64.grad, 1e-4, f"{case}: dx")
    close(w.grad, w64.grad, 1e-4, f"{case}: dw")


# ---- incoming gradients holding NaN, infinities and large values -------------------------------------------------
def _rotate64(t):
    c, s = COS[:3].double()[None, :, None], SIN[:3].double()[None, :, None]
    return torch.cat((t[..., :8] * c - t[..., 8:] * s, t[..., 8:] * c + t[..., :8] * s), -1)


DY_OPS = {
    "rms_norm": ([(3, 8), (8,)], lambda x, w: ops.rms_norm(x, w), lambda x, w: F.rms_norm(x, (8,), w, 1e-6)),
    "layer_norm": ([(3, 8), (8,), (8,)], lambda x, w, b: ops.layer_norm(x, w, b),
                   lambda x, w, b: F.layer_norm(x, (8,), w, b, 1e-5)),
    "swiglu": ([(3, 8)], lambda x: ops.swiglu(x), lambda x: F.silu(x[..., :4]) * x[..., 4:]),
    "rotary": ([(1, 3, 2, 16)], lambda q: ops.rotary(q, q[:, :, :1].detach(), COS[:3], SIN[:3])[0], _rotate64),
    "attention bottom_right": ([(1, 2, 3, 16), (1, 1, 4, 16), (1, 1, 4, 16)],
                               lambda q, k, v: tilestack.attention(q, k, v, causal=True, causal_align="bottom_right"),
                               lambda q, k, v: F.scaled_dot_product_attention(
                                   q, k, v, attn_mask=torch.ones(3, 4, dtype=torch.bool).tril(1), enable_gqa=True)),
}
# (layer_norm with an infinite dy is left out: its dx is inf - inf somewhere in the row, and which entries come out
# NaN rather than +-inf depends on how the two row sums are arranged: torch's CPU kernel sums over the uncentered x,
# the kernels over (x - mean) * rstd, and both are the same gradient wherever it is finite)
# (1e37: large, and its products with the O(1) values beside it stay finite in f32, as in float64)
DY_SPECIALS = {"nan": float("nan"), "+inf": float("inf"), "-inf": -float("inf"), "1e37": 1e37}
DY_CASES = [(name, special) for name in sorted(DY_OPS) for special in sorted(DY_SPECIALS)
            if not (name == "layer_norm" and special.endswith("inf"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,special", DY_CASES)
def test_incoming_gradient_specials_reach_the_inputs_as_in_float64(name, special, backend):
    shapes, fn, fn64 = DY_OPS[name]
    ins = [randn(30 + i, *s, requires_grad=True) for i, s in enumerate(shapes)]
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    with config.override(backend=backend), poisoned_allocations():
        y = fn(*ins)
        dy = randn(40, *y.shape)
        dy.view(-1)[1] = DY_SPECIALS[special]
        y.backward(dy)
    fn64(*ins64).backward(dy.double())
    for i, (t, t64) in enumerate(zip(ins, ins64, strict=True)):
        close(t.grad, t64.grad, 1e-4, f"{name}: gradient of input {i}")
