"""Round seven, part two: the drop-ins inside ``torch.autocast``, against torch's own ops there.

What it found (each test failed before its fix):
- the SDPA drop-in answered in f32 for f32 inputs inside autocast, where torch's SDPA (a lower-precision op of
  autocast) casts its floating arguments, a float mask too, and answers in the autocast dtype: a patched model's
  activations changed dtype (and on a GPU ran f32 attention where torch ran bf16);
- a QuantLinear answered in its input's dtype inside autocast, where the nn.Linear it replaces answers in the
  autocast dtype;
- the drop-in's notice called a NumPy or list attn_mask "an attn_mask that needs a gradient".
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tilestack
from tilestack import config
from tilestack.quant import quantize


@pytest.fixture(autouse=True)
def reference_backend():
    with config.override(backend="reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the drop-in's one-time notices
        yield


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _math_sdpa(*args, **kwargs):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


Q, K, V = randn(2, 2, 5, 8, seed=1), randn(2, 2, 7, 8, seed=2), randn(2, 2, 7, 8, seed=3)
CASES = {
    "plain": {},
    "causal": dict(is_causal=True),
    "float mask": dict(attn_mask=randn(5, 7, seed=4)),
    "bool mask": dict(attn_mask=randn(2, 1, 5, 7, seed=5) > 0),
    "gqa": dict(enable_gqa=True),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_sdpa_drop_in_inside_autocast_answers_in_torchs_dtype(case, dtype):
    kw = dict(CASES[case])
    k, v = (K[:, :1], V[:, :1]) if case == "gqa" else (K, V)
    with torch.autocast("cpu", dtype=dtype):
        ours = tilestack.scaled_dot_product_attention(Q, k, v, **kw)
        theirs = F.scaled_dot_product_attention(Q, k, v, **kw)
    assert ours.dtype == theirs.dtype == dtype
    # against float64 of the cast inputs: both within the autocast dtype's rounding
    cast = {n: (t.to(dtype).double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for n, t in kw.items()}
    want = _math_sdpa(Q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(), **cast)
    torch.testing.assert_close(ours.double(), want, atol=2e-2, rtol=2e-2)


def test_sdpa_drop_in_inside_autocast_gives_f32_leaves_f32_gradients():
    leaves = [t.clone().requires_grad_() for t in (Q, K, V)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tilestack.scaled_dot_product_attention(*leaves, is_causal=True)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).sum().backward()
    grads = [t.grad for t in leaves]
    refs = [t.detach().to(torch.bfloat16).double().requires_grad_() for t in (Q, K, V)]
    _math_sdpa(*refs, is_causal=True).pow(2).sum().backward()
    for g, r in zip(grads, refs, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), r.grad, atol=5e-2, rtol=5e-2)


def test_sdpa_drop_in_outside_autocast_and_float64_inside_keep_their_dtype():
    assert tilestack.scaled_dot_product_attention(Q, K, V).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):       # float64 is not cast by autocast: handed to torch
        ours = tilestack.scaled_dot_product_attention(Q.double(), K.double(), V.double())
        theirs = F.scaled_dot_product_attention(Q.double(), K.double(), V.double())
    assert ours.dtype == theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantized_linear_inside_autocast_answers_as_the_linear_it_replaced(mode, dtype):
    linear = torch.nn.Linear(16, 6)
    with torch.no_grad():
        linear.weight.copy_(randn(6, 16, seed=6))
    model = quantize(linear, mode)
    x = randn(3, 4, 16, seed=7)
    with torch.autocast("cpu", dtype=dtype):
        ours, theirs = model(x), linear(x)
    assert ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours.double(), theirs.double(), atol=0.25, rtol=5e-2)
    assert model(x).dtype == torch.float32                  # outside autocast: x's dtype, as ever


@pytest.mark.parametrize("mask", [np.zeros((5, 7), np.float32), [[0.0] * 7] * 5], ids=["ndarray", "list"])
def test_sdpa_drop_in_names_a_mask_that_is_not_a_tensor_and_raises_as_torch(mask):
    """The drop-in's notice called a NumPy or list mask "an attn_mask that needs a gradient"; torch's TypeError
    followed. Now the notice names its type, and torch's TypeError follows as before."""
    from tilestack.torch import sdpa

    sdpa._noticed.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match="attn_mask"):
            tilestack.scaled_dot_product_attention(Q, K, V, attn_mask=mask)
    notices = [str(w.message) for w in seen if "handing" in str(w.message)]
    assert notices and f"an attn_mask of type {type(mask).__name__} (not a tensor)" in notices[0], notices
