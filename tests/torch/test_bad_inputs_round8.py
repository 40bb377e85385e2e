"""Round eight of the bad-input sweep: the kernel-level functions of ``tilestack.kernels`` as a user calls them
(inputs that require grad, outputs they are given), on the reference backend and Triton's interpreter, against
torch's own rules (its ``out=`` refuses autograd; a result made from an input that requires grad carries a
gradient or an error, never nothing).

What rounds 1-7 did not reach, and what it found (each test failed before its fix):
- every kernel function but gemm and softmax (round 5) gave a result without grad_fn for an input that requires
  grad (swiglu, swiglu_backward, rotary, layer_norm, rms_norm, add_rms_norm, add_layer_norm, rms_norm_backward,
  layer_norm_backward, attention_forward, attention_backward), so a loss through it lost that input's gradient
  without a word; kernels.fused_linear_cross_entropy failed inside torch ("mm(): functions with out=... arguments
  don't support automatic differentiation"). Each result now joins autograd through a node whose backward raises,
  naming the function (``kernels._plan.forward_only`` / ``no_backward``);
- kernels.swiglu's out=, swiglu_backward's da=/db= and rotary's q_out=/k_out= took a tensor that requires grad
  (the reference backend failed in its in-place copy back, "a leaf Variable that requires grad is being used in an
  in-place operation"; Triton's wrote it behind autograd's back) and outputs made from inputs that require grad
  (no gradient): refused as torch's out= is (``_checks.check_out_autograd``);
- kernels.rotary with q_out a shifted view of q (or k_out of k): rows rotated twice on the Triton backend (a
  program stored over rows another one read later), without a word: refused as swiglu's out= over a shifted input
  is; q_out=q itself (in place) still rotates exactly;
- a float tensor with torch's negative bit (``z.conj().imag``, a lazily negated view) was read as stored: the
  Triton backend's results lost the sign (rms_norm, swiglu, softmax, attention, gemm) without a word. Refused by
  name before any work (the bit is in the plan and launch keys); the SDPA drop-in hands it to torch;
- an inference tensor given as an output (out=, da=, k_out=) outside torch.inference_mode: the reference backend
  failed in its copy back with torch's error after the kernel ran, the Triton backend wrote it (torch refuses):
  refused by name before any work.
"""

from __future__ import annotations

import pytest
import torch

import tilestack
from tilestack import config
from tilestack import kernels as K
from tilestack.errors import LaunchError
from tilestack.kernels.attention_bwd import attention_backward
from tilestack.kernels.rotary import reference as rotary_reference
from tilestack.torch import ops


@pytest.fixture(autouse=True)
def reference_backend():
    with config.override(backend="reference"):
        yield


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


COS, SIN = K.rotary_tables(5, 16)
X, W, B = randn(4, 8), randn(8, seed=1), randn(8, seed=2)
Q, KK, V = randn(1, 2, 3, 16), randn(1, 2, 3, 16, seed=1), randn(1, 2, 3, 16, seed=2)


def _attention_backward(q):
    o, lse = K.attention_forward(Q, KK, V, False, 0.25)
    return attention_backward(q, KK, V, o, lse, randn(1, 2, 3, 16, seed=3), False, 0.25)[0]


# name -> (the leaf that requires grad, a call of the kernel function on it giving one tensor)
KERNEL_FUNCTIONS = {
    "swiglu": (X, lambda t: K.swiglu(t, X)),
    "swiglu_backward": (X, lambda t: K.swiglu_backward(t, X, X)[0]),
    "rotary": (randn(2, 5, 3, 16), lambda t: K.rotary(t, randn(2, 5, 1, 16), COS, SIN)[0]),
    "layer_norm": (X, lambda t: K.layer_norm(t, W, B)[0]),
    "rms_norm": (X, lambda t: K.rms_norm(t, W)[0]),
    "add_rms_norm": (X, lambda t: K.add_rms_norm(X, t, W)[0]),
    "add_layer_norm": (W, lambda t: K.add_layer_norm(X, X, t, B)[0]),
    "rms_norm_backward": (X, lambda t: K.rms_norm_backward(t, X, W, K.rms_norm(X, W)[1])[0]),
    "layer_norm_backward": (X, lambda t: K.layer_norm_backward(t, X, W, *K.layer_norm(X, W, B)[1:])[1]),
    "attention_forward": (Q, lambda t: K.attention_forward(t, KK, V, True, 0.25)[0]),
    "attention_backward": (Q, _attention_backward),
    "fused_linear_cross_entropy": (randn(10, 8), lambda t: K.fused_linear_cross_entropy(
        X, t, torch.tensor([1, 0, 9, -100]))[0]),
}


@pytest.mark.parametrize("fn", list(KERNEL_FUNCTIONS))
def test_kernel_functions_refuse_a_backward_by_name(fn):
    """A kernel function's result for an input that requires grad: the same values, and a backward through it
    raises naming the function (it had no grad_fn, so ``(y.sum() + t.sum()).backward()`` gave t a gradient missing
    y's term without a word; the fused cross-entropy failed inside torch's mm); under no_grad nothing is recorded."""
    t, call = KERNEL_FUNCTIONS[fn]
    want = call(t)
    leaf = t.clone().requires_grad_()
    y = call(leaf)
    torch.testing.assert_close(y.detach(), want, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(LaunchError, match=rf"{fn}: a backward through tilestack.kernels.{fn}, which has no backward"):
        (y.float().nan_to_num().sum() + leaf.sum()).backward()
    with torch.no_grad():
        assert call(leaf).grad_fn is None


def _out_cases():
    a, b, dy = randn(4, 6), randn(4, 6, seed=1), randn(4, 6, seed=2)
    q, k = randn(2, 5, 3, 16), randn(2, 5, 1, 16, seed=1)
    leaf = lambda t: t.clone().requires_grad_()           # noqa: E731
    return {
        "swiglu out": (lambda: K.swiglu(a, b, out=leaf(a)), r"swiglu: out= does not support autograd, but out "),
        "swiglu a": (lambda: K.swiglu(leaf(a), b, out=torch.empty_like(a)), r"swiglu: out= .* but a requires grad"),
        "swiglu_backward da": (lambda: K.swiglu_backward(dy, a, b, da=leaf(a)),
                               r"swiglu_backward: da= does not support autograd, but da requires grad"),
        "swiglu_backward dy": (lambda: K.swiglu_backward(leaf(dy), a, b, da=torch.empty_like(a),
                                                         db=torch.empty_like(a)),
                               r"swiglu_backward: da=/db= does not support autograd, but dy requires grad"),
        "rotary q_out": (lambda: K.rotary(q, k, COS, SIN, q_out=leaf(q)),
                         r"rotary: q_out= does not support autograd, but q_out requires grad"),
        "rotary k": (lambda: K.rotary(q, leaf(k), COS, SIN, k_out=torch.empty_like(k)),
                     r"rotary: k_out= does not support autograd, but k requires grad"),
    }


OUT_CASES = _out_cases()


@pytest.mark.parametrize("case", list(OUT_CASES))
def test_given_outputs_refuse_autograd_as_torchs_out(case):
    """An output the caller gives, or one made from an input that requires grad, takes no autograd (torch's out=
    refuses both): refused by name before any work, where the reference backend failed in its copy back ("a leaf
    Variable that requires grad is being used in an in-place operation") and Triton's wrote behind autograd."""
    call, message = OUT_CASES[case]
    with pytest.raises(LaunchError, match=message):
        call()
    with torch.no_grad():
        call()                              # under no_grad: answered, as torch's out= is


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("which", ["q", "k"])
@pytest.mark.parametrize("shift", [1, -1])
def test_rotary_output_over_a_shifted_view_of_its_input_is_refused(backend, which, shift):
    """q_out one position along N from q (a fused buffer's neighbouring slice): the Triton backend rotated rows
    twice (4.4 off the reference on these); refused by name on every backend, as swiglu's out= over a shifted
    input. The same view (in place) still rotates exactly."""
    q, k = randn(2, 5, 3, 16), randn(2, 5, 1, 16, seed=1)
    heads = 3 if which == "q" else 1
    buf = randn(2, 6, heads, 16, seed=2)
    src, dst = (buf[:, :5], buf[:, 1:]) if shift == 1 else (buf[:, 1:], buf[:, :5])
    args = (src, k) if which == "q" else (q, src)
    with config.override(backend=backend):
        with pytest.raises(LaunchError, match=rf"rotary: {which}_out shares memory with {which}; the kernel would"):
            K.rotary(*args, COS, SIN, **{f"{which}_out": dst})
        want = rotary_reference(src, COS, SIN)
        out = K.rotary(*args, COS, SIN, **{f"{which}_out": src})[0 if which == "q" else 1]
        assert out is src
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


# ---- lazily negated views (torch's negative bit) ------------------------------------------------------------------
def negated(*shape, dtype=torch.float32, seed=0):
    """A tensor with torch's negative bit set: the imaginary part of a conjugate view (public API), whose memory
    holds the values' negation; (the view, its values resolved)."""
    complex_dtype = torch.complex64 if dtype == torch.float32 else torch.complex32
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.complex64).to(complex_dtype)
    x = z.conj().imag
    assert x.is_neg() and x.dtype == dtype
    return x, x.resolve_neg()


def _negated_cases():
    x, _ = negated(6, 16)
    h, _ = negated(6, 16, dtype=torch.float16)
    q, _ = negated(1, 2, 3, 16)
    qr = negated(2, 5, 1, 16)[0]
    return {
        "rms_norm": (lambda: ops.rms_norm(x, W.new_ones(16)), "rms_norm: x"),
        "layer_norm weight": (lambda: ops.layer_norm(x.resolve_neg(), x[0], x[1].resolve_neg()),
                              "layer_norm: weight"),
        "swiglu": (lambda: ops.swiglu(x), "swiglu: x"),
        "attention": (lambda: tilestack.attention(q, Q, V), "attention_forward: q"),
        "rotary": (lambda: ops.rotary(qr, qr.resolve_neg(), COS, SIN), "rotary: q"),
        "fused_linear_cross_entropy": (lambda: ops.fused_linear_cross_entropy(
            x, randn(10, 16), torch.tensor([1, 0, 9, 3, 2, 5])), "fused_linear_cross_entropy: x"),
        "softmax": (lambda: K.softmax(x), "softmax: x"),
        "gemm": (lambda: K.gemm(h, randn(16, 4, dtype=torch.float16)), "gemm: a"),
        "softmax out": (lambda: K.softmax(x.resolve_neg(), out=x), "softmax: out"),
    }


NEGATED = _negated_cases()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", list(NEGATED))
def test_lazily_negated_views_are_refused_by_name(case, backend):
    """A float tensor with torch's negative bit (``z.conj().imag``): its memory holds the negated values, which the
    kernels read as stored. The Triton backend answered with the sign lost (rms_norm off by 5.5, attention by 3.4,
    gemm by 13) without a word; the reference backend, which copied through torch, answered right: now refused on
    both, before any work, naming the argument (``.resolve_neg()`` makes a plain tensor)."""
    call, name = NEGATED[case]
    with config.override(backend=backend):
        with pytest.raises(LaunchError, match=rf"{name} is a lazily negated view \(torch's negative bit"):
            call()


def test_a_user_kernel_refuses_a_negated_argument_by_name():
    """``kernel[grid](...)``-style launches check their arguments once per launch signature; the negative bit is
    in that signature, so a negated view of an already-launched layout is refused too."""
    x, xr = negated(4, 16)
    K.softmax(xr.clone())                                  # the plain layout's launcher, made and kept
    with pytest.raises(LaunchError, match=r"softmax_kernel: argument X is a lazily negated view"):
        K.softmax_kernel.trace(xr.clone(), torch.empty(4, 16)).run(x, torch.empty(4, 16))


def test_sdpa_drop_in_hands_a_negated_view_to_torch():
    """The drop-in promises torch's answer: a negated view goes to torch's function (a notice), which resolves it."""
    q, qr = negated(1, 2, 3, 16)
    with pytest.warns(UserWarning, match="handing a lazily negated view"):
        got = tilestack.scaled_dot_product_attention(q, Q, V)
    torch.testing.assert_close(got, torch.nn.functional.scaled_dot_product_attention(qr, Q, V))


# ---- outputs that are inference tensors ---------------------------------------------------------------------------
def _inference_out_cases():
    with torch.inference_mode():
        out, out_bf16, k_out = torch.empty(4, 6), torch.empty(4, 6, dtype=torch.bfloat16), torch.empty(2, 5, 1, 16)
    a, b = randn(4, 6), randn(4, 6, seed=1)
    return {
        "softmax": (lambda: K.softmax(a, out=out), "softmax: out"),
        "gemm": (lambda: K.gemm(randn(4, 8, dtype=torch.bfloat16), randn(8, 6, dtype=torch.bfloat16), out=out_bf16),
                 "gemm: out"),
        "swiglu": (lambda: K.swiglu(a, b, out=out), "swiglu: out"),
        "swiglu_backward": (lambda: K.swiglu_backward(a, a, b, db=out), "swiglu_backward: db"),
        "rotary": (lambda: K.rotary(randn(2, 5, 3, 16), randn(2, 5, 1, 16), COS, SIN, k_out=k_out),
                   "rotary: k_out"),
    }


INFERENCE_OUT = _inference_out_cases()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", list(INFERENCE_OUT))
def test_an_inference_tensor_as_output_outside_inference_mode_is_refused(case, backend):
    """torch refuses to write an inference tensor outside torch.inference_mode (its out= too): the reference backend
    failed with torch's error in its copy back, after the kernel ran, and the Triton backend wrote it. Refused by
    name before any work on both; inside inference mode the call answers."""
    call, name = INFERENCE_OUT[case]
    with config.override(backend=backend):
        with pytest.raises(LaunchError, match=rf"{name} is an inference tensor \(made under torch.inference_mode\)"):
            call()
        with torch.inference_mode():
            call()


def _rope(x):
    x1, x2 = x.double().chunk(2, -1)
    c, s = COS.double()[None, :, None], SIN.double()[None, :, None]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)


F_ = torch.nn.functional
# name -> (our op, torch's, the input, the output's shape)
GRADIENT_CASES = {
    "rms_norm": (lambda x: ops.rms_norm(x, W.new_ones(16)), lambda x: F_.rms_norm(x, (16,), None, 1e-6),
                 randn(4, 16), (4, 16)),
    "layer_norm": (lambda x: ops.layer_norm(x, W.new_ones(16), W.new_zeros(16)),
                   lambda x: F_.layer_norm(x, (16,), None, None, 1e-5), randn(4, 16), (4, 16)),
    "add_rms_norm": (lambda x: ops.add_rms_norm(x, x, W.new_ones(16))[0],
                     lambda x: F_.rms_norm(x + x, (16,), None, 1e-6), randn(4, 16), (4, 16)),
    "swiglu": (ops.swiglu, lambda x: F_.silu(x[:, :8]) * x[:, 8:], randn(4, 16), (4, 8)),
    "rotary": (lambda x: ops.rotary(x, x, COS, SIN)[0], _rope, randn(1, 5, 2, 16), (1, 5, 2, 16)),
    "attention": (lambda x: tilestack.attention(x, x, x), lambda x: F_.scaled_dot_product_attention(x, x, x),
                  randn(1, 2, 5, 16), (1, 2, 5, 16)),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_a_negated_incoming_gradient_is_taken_as_torch_takes_it(case, backend):
    """``y.backward(gradient=g)`` with g a lazily negated view: torch's ops take it; the ops' backward kernels read
    its memory as stored (the Triton backend's gradients lost the sign, then, once the kernels refused the bit,
    the backward failed naming an internal kernel, norm_bwd_kernel's DY). The ops resolve incoming gradients."""
    ours, theirs, x, shape = GRADIENT_CASES[case]
    g, g_plain = negated(*shape, seed=5)
    a, b = x.clone().requires_grad_(), x.double().requires_grad_()
    with config.override(backend=backend):
        ours(a).backward(g)
    theirs(b).backward(g_plain.double())
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-5)
