"""tilestack's public PyTorch ops (tilestack.torch and tilestack.torch.ops) under ``torch.jit.trace`` on the CPU
(reference executor): a traced module must record the ``tilestack::`` op itself, so that a NEW input (same shape,
and another shape where the op allows) gives the right answer, against eager tilestack and float64 torch, and so
does the module after ``torch.jit.save``/``load``. Before the fix the eager path ran under the tracer: the kernel's
output was recorded as a constant (swiglu: the first batch's answer for every input), or a size read by the tracer
as a tensor reached the kernels ("'Tensor' object has no attribute 'bit_length'" in attention, "constant ONE_TILE
is declared bool; got Tensor" in the norms)."""

import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import tilestack
from tilestack import config
from tilestack.kernels import rotary_tables
from tilestack.torch import ops

TOL = 2e-5


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not bool(got.isfinite().all()):
        return math.inf
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _rope64(x, cos, sin):
    x1, x2 = x.double().chunk(2, dim=-1)
    c, s = cos.double()[None, :, None, :], sin.double()[None, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def _rms64(x, w, eps=1e-6):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def _ln64(x, w, b, eps=1e-5):
    return F.layer_norm(x.double(), (x.shape[-1],), w.double(), b.double(), eps)


def _sdpa64(q, k, v, causal=False, scale=None, mask=None):
    h, hkv = q.shape[1], k.shape[1]
    k, v = k.double().repeat_interleave(h // hkv, 1), v.double().repeat_interleave(h // hkv, 1)
    s = (q.double() @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    return s.softmax(-1) @ v


def _flce64(x, w, labels):
    return F.cross_entropy(x.double() @ w.double().T, labels, ignore_index=-100)


def _swiglu64(x):
    a, b = x.double().chunk(2, dim=-1)
    return F.silu(a) * b


# name -> (fn, make(size) -> inputs, float64 reference(*inputs) -> tuple, two sizes: traced and another)
def _att_inputs(shape, hkv=None):
    B, H, N, D = shape
    hkv = hkv or H
    return (torch.randn(B, H, N, D), torch.randn(B, hkv, N, D), torch.randn(B, hkv, N, D))


def _rot_inputs(shape):
    B, N, H, D = shape
    cos, sin = rotary_tables(N, D)
    return (torch.randn(B, N, H, D), torch.randn(B, N, 1, D), cos, sin)


def _bool_mask(n):
    m = torch.rand(n, n) > 0.3
    m[:, 0] = True
    return m


CASES = {
    "attention": (lambda q, k, v: tilestack.attention(q, k, v), _att_inputs, lambda q, k, v: (_sdpa64(q, k, v),),
                  ((1, 2, 8, 16), (2, 3, 5, 8))),      # another head dim: the default scale follows it
    "attention_causal_scale": (lambda q, k, v: tilestack.attention(q, k, v, True, 0.3), _att_inputs,
                               lambda q, k, v: (_sdpa64(q, k, v, True, 0.3),), ((1, 2, 8, 16), (1, 1, 11, 4))),
    "attention_gqa": (lambda q, k, v: tilestack.attention(q, k, v, causal=True),
                      lambda s: _att_inputs(s, hkv=1), lambda q, k, v: (_sdpa64(q, k, v, True),),
                      ((1, 4, 6, 8), (2, 2, 9, 8))),
    "attention_mask": (lambda q, k, v, m: tilestack.attention(q, k, v, attn_mask=m),
                       lambda s: (*_att_inputs(s), _bool_mask(s[2])),
                       lambda q, k, v, m: (_sdpa64(q, k, v, mask=m),), ((1, 2, 8, 16), (1, 2, 12, 16))),
    "sdpa": (lambda q, k, v: tilestack.scaled_dot_product_attention(q, k, v, is_causal=True), _att_inputs,
             lambda q, k, v: (_sdpa64(q, k, v, True),), ((1, 2, 8, 16), (2, 1, 7, 8))),
    "rms_norm": (lambda x, w: ops.rms_norm(x, w), lambda s: (torch.randn(*s), torch.randn(s[-1])),
                 lambda x, w: (_rms64(x, w),), ((4, 16), (3, 5, 16))),
    "layer_norm": (lambda x, w, b: ops.layer_norm(x, w, b),
                   lambda s: (torch.randn(*s), torch.randn(s[-1]), torch.randn(s[-1])),
                   lambda x, w, b: (_ln64(x, w, b),), ((4, 16), (7, 24))),
    "add_rms_norm": (lambda x, r, w: ops.add_rms_norm(x, r, w),
                     lambda s: (torch.randn(*s), torch.randn(*s), torch.randn(s[-1])),
                     lambda x, r, w: (_rms64(x + r, w), x.double() + r.double()), ((4, 16), (2, 3, 8))),
    "add_layer_norm": (lambda x, r, w, b: ops.add_layer_norm(x, r, w, b),
                       lambda s: (torch.randn(*s), torch.randn(*s), torch.randn(s[-1]), torch.randn(s[-1])),
                       lambda x, r, w, b: (_ln64(x + r, w, b), x.double() + r.double()), ((4, 16), (6, 32))),
    "rotary": (lambda q, k, c, s: ops.rotary(q, k, c, s), _rot_inputs,
               lambda q, k, c, s: (_rope64(q, c, s), _rope64(k, c, s)), ((1, 6, 2, 16), (2, 9, 3, 32))),
    "swiglu": (lambda x: ops.swiglu(x), lambda s: (torch.randn(*s),), lambda x: (_swiglu64(x),),
               ((4, 16), (2, 3, 10))),
    "fused_linear_cross_entropy": (
        lambda x, w, y: ops.fused_linear_cross_entropy(x, w, y),
        lambda s: (torch.randn(s[0], s[1]), torch.randn(s[2], s[1]) * 0.3,
                   torch.randint(0, s[2], (s[0],)).index_fill(0, torch.tensor([0]), -100)),
        lambda x, w, y: (_flce64(x, w, y),), ((6, 8, 10), (9, 16, 5))),
}


def _tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _trace(fn, args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # TracerWarnings (python values recorded): what this file checks
        return torch.jit.trace(Fn(fn), args, check_trace=False)


def _check(name, got, args, ref, what):
    want = ref(*args)
    assert len(got) == len(want), f"{name} {what}: {len(got)} outputs, expected {len(want)}"
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape, f"{name} {what}: shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        err = rel(g, w)
        assert err < TOL, f"{name} {what}: relative error {err:.3g} against float64 torch"


@pytest.fixture(autouse=True)
def _reference():
    with config.override(backend="reference"):   # (the SDPA drop-in hands CPU tensors to torch under "auto")
        yield


@pytest.mark.parametrize("name", list(CASES))
def test_traced_op_follows_new_inputs(name):
    torch.manual_seed(0)
    fn, make, ref, (shape, other) = CASES[name]
    traced = _trace(fn, make(shape))
    graph = str(traced.graph)
    assert "tilestack::" in graph, f"{name}: the traced graph does not call a tilestack:: op:\n{graph}"
    fresh = make(shape)                                   # a new input of the traced shape
    got = _tuple(traced(*fresh))
    _check(name, got, fresh, ref, "traced, new input")
    eager = _tuple(fn(*fresh))
    for g, e in zip(got, eager, strict=True):
        assert rel(g, e) < TOL, f"{name}: traced and eager tilestack differ"
    resized = make(other)                                 # another shape
    _check(name, _tuple(traced(*resized)), resized, ref, f"traced, another shape {other}")
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    _check(name, _tuple(loaded(*fresh)), fresh, ref, "saved and loaded, new input")
    _check(name, _tuple(loaded(*resized)), resized, ref, "saved and loaded, another shape")


@pytest.mark.parametrize("name", ["attention", "rms_norm", "swiglu", "fused_linear_cross_entropy"])
def test_traced_op_gradients(name):
    """A traced module trains: gradients through the recorded op match float64 torch's for a new input."""
    torch.manual_seed(1)
    fn, make, ref, (shape, _) = CASES[name]
    traced = _trace(fn, make(shape))
    args = [a.requires_grad_() if a.is_floating_point() else a for a in make(shape)]
    out = _tuple(traced(*args))[0]
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [a for a in args if a.requires_grad], g)
    args64 = [a.detach().double().requires_grad_() if a.is_floating_point() else a for a in args]
    want = torch.autograd.grad(ref(*args64)[0], [a for a in args64 if a.requires_grad], g.double())
    for i, (a, b) in enumerate(zip(grads, want, strict=True)):
        assert rel(a, b) < 1e-4, f"{name}: gradient of input {i}: relative error {rel(a, b):.3g}"


def test_traced_dropout_draws_a_new_mask_per_call():
    """dropout's random stream is drawn by a recorded torch.randint, not a constant: two calls of the traced module
    differ, and with one seed the traced module repeats the eager call."""
    fn = lambda q, k, v: tilestack.attention(q, k, v, dropout_p=0.5)   # noqa: E731
    q, k, v = _att_inputs((1, 2, 8, 8))
    traced = _trace(fn, (q, k, v))
    a, b = traced(q, k, v), traced(q, k, v)
    assert not torch.equal(a, b), "traced dropout repeated one mask"
    torch.manual_seed(5)
    eager = fn(q, k, v)
    torch.manual_seed(5)
    assert rel(traced(q, k, v), eager) < TOL


def _rot_bad():
    cos, sin = rotary_tables(6, 16)
    return (torch.randn(1, 5, 2, 16), torch.randn(1, 5, 1, 16), cos, sin)


BAD = {   # name -> (fn, inputs, fragment of the message: the argument named, the shapes as ints)
    "rms_norm": (lambda x, w: ops.rms_norm(x, w), lambda: (torch.randn(4, 16), torch.randn(8)), "weight has 8"),
    "layer_norm": (lambda x, w, b: ops.layer_norm(x, w, b),
                   lambda: (torch.randn(4, 16), torch.randn(16), torch.randn(8)), "bias has 8"),
    "swiglu": (lambda x: ops.swiglu(x), lambda: (torch.randn(4, 15),), "got (4, 15)"),
    "attention": (lambda q, k, v: tilestack.attention(q, k, v),
                  lambda: (torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 16)),
                  "k is (1, 2, 8, 8)"),
    "rotary": (lambda q, k, c, s: ops.rotary(q, k, c, s), _rot_bad, "cos is (6, 8)"),
    "fused_linear_cross_entropy": (lambda x, w, y: ops.fused_linear_cross_entropy(x, w, y),
                                   lambda: (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long)),
                                   "labels has 5"),
    "sdpa": (lambda q, k, v: tilestack.scaled_dot_product_attention(q, k, v),
             lambda: (torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 7, 16)),
             "value (1, 2, 7, 16)"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_under_trace_is_refused_by_name(name):
    """Bad input met while tracing gets the eager call's clear error (the tracer's sizes-as-tensors gave an
    AttributeError deep in a check, or a message naming shapes as (tensor(1), tensor(8)))."""
    fn, make, fragment = BAD[name]
    with pytest.raises(ValueError) as eager:
        fn(*make())
    with pytest.raises(ValueError) as traced:
        _trace(fn, make())
    assert fragment in str(traced.value) and "tensor(" not in str(traced.value), str(traced.value)
    assert fragment in str(eager.value)
