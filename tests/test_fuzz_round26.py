"""Fuzz round twenty-six: seeded random draws over the public ops (ragged and size-0/size-1 shapes, f32/bf16/f16,
contiguous, transposed, offset, stepped, zero-stride and channels-last inputs, a random subset of inputs requiring
grad, under grad mode, ``torch.no_grad`` and ``torch.inference_mode``, ignore_index at 0, V-1, -1 and -100) against
float64 torch, values and gradients; which results require grad, against torch's own ops, for every subset of inputs
needing a gradient, on both paths (the eager autograd Functions and the ``tilestack::`` ops); the drop-in
``tilestack.scaled_dot_product_attention`` with out-of-range hyperparameters (scale 0, -0.0, negative, NaN, inf,
1e30; dropout_p 1, negative, past 1, NaN): torch's answer, or torch's error; ``dropout_p=1`` through
``tilestack.attention`` (zeros and zero gradients, as torch's); ``tilestack.patch`` on ``nn.MultiheadAttention``
variants no round drew (``add_bias_kv``, ``add_zero_attn``, ``kdim``/``vdim``, unbatched input, a float
key_padding_mask holding -inf, a batch row with every key padded, per-head 3-D masks). CPU backends (the NumPy
reference executor; Triton's interpreter in a few draws); every result starts as NaN (``poisoned_allocations``).

What this round found (the test failed before its fix):
- ``add_rms_norm`` / ``add_layer_norm`` with only the weight (or bias) requiring grad returned h = x + r with
  ``requires_grad=True`` and a graph leading nowhere, where torch's ``x + r`` does not require grad; ``rotary``
  with q alone requiring grad returned its rotated k requiring grad (and the reverse), where torch's rotation of k
  does not. Code that branches on ``requires_grad`` (checkpointing, ``h.backward()`` as a check, a cache that keeps
  only constants) saw a differentiable result of constants. Both paths (``ops._Norm``, ``ops._Rotary`` and the
  ``tilestack::`` ops' setup, so under torch.compile too) now mark such results not differentiable
  (``ops._mark_constant_results``).

The rest found no bug: 300 seeded draws (the first 14 kept here), the drop-in's out-of-range hyperparameters, dropout_p=1
and the patched MultiheadAttention variants answered as torch.
"""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tilestack
import tilestack.torch.sdpa as sdpa_module
from test_fuzz_round22_more import close  # (NaN and infinities exactly where float64 torch has them)
from tilestack import config
from tilestack.kernels import rotary_tables
from tilestack.testing.fuzz.outcomes import poisoned_allocations
from tilestack.torch import ops
from tilestack.torch.sdpa import torch_sdpa

TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
D_ROT = 16
COS, SIN = rotary_tables(3, D_ROT)   # (3, D/2) f32


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(2600 + seed)


def randn(g: torch.Generator, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def as64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().requires_grad_(t.requires_grad)


def rotate64(x: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of a (B, S, H, D) float64 tensor by the tables COS, SIN."""
    s = x.shape[1]
    cos = torch.cat([COS[:s], COS[:s]], -1).double().view(1, s, 1, D_ROT)
    sin = torch.cat([SIN[:s], SIN[:s]], -1).double().view(1, s, 1, D_ROT)
    half = D_ROT // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


# ---- which results require grad: torch's answer, on both paths ----------------------------------------------------
def norm_call(name: str, path: str, x, r, w, b):
    """(y, h) of the named fused norm, through the eager op or its ``tilestack::`` op."""
    if path == "eager":
        return getattr(ops, name)(x, r, w) if name == "add_rms_norm" else getattr(ops, name)(x, r, w, b)
    op = getattr(torch.ops.tilestack, name + "_fwd")
    out = op(x, r, w, 1e-6) if name == "add_rms_norm" else op(x, r, w, b, 1e-5)
    return out[0], out[1]


def norm64(name: str, x, r, w, b):
    h = x + r
    y = F.rms_norm(h, (h.shape[-1],), w, 1e-6) if name == "add_rms_norm" else \
        F.layer_norm(h, (h.shape[-1],), w, b, 1e-5)
    return y, h


NEEDS = {"add_rms_norm": ["w", "x", "r", "xw", ""], "add_layer_norm": ["w", "b", "wb", "r", ""]}


@pytest.mark.parametrize("path", ["eager", "op"])
@pytest.mark.parametrize("name,needs", [(n, s) for n, subsets in NEEDS.items() for s in subsets])
def test_h_of_inputs_needing_no_gradient_does_not_require_grad(name, needs, path):
    g = gen(1)
    x, r = randn(g, 2, 3, 8), randn(g, 2, 3, 8)                   # (B, N, C)
    w, b = randn(g, 8), randn(g, 8)
    for key, t in zip("xrwb", (x, r, w, b), strict=True):
        t.requires_grad_(key in needs)
    with config.override(backend="reference"), poisoned_allocations():
        got = norm_call(name, path, x, r, w, b)
    x64, r64, w64, b64 = (as64(t) for t in (x, r, w, b))
    want = norm64(name, x64, r64, w64, b64)
    assert [t.requires_grad for t in got] == [t.requires_grad for t in want], "requires_grad of (y, h) as torch's"
    for a, e, what in zip(got, want, ("y", "h"), strict=True):
        close(a, e, 1e-5, what)
    outs = [(a, e) for a, e in zip(got, want, strict=True) if e.requires_grad]
    if not outs:
        return
    leaves = [(t, t64) for t, t64 in zip((x, r, w, b), (x64, r64, w64, b64), strict=True) if t.requires_grad]
    ups = [randn(g, *a.shape) for a, _ in outs]
    with config.override(backend="reference"):
        grads = torch.autograd.grad([a for a, _ in outs], [t for t, _ in leaves], ups, allow_unused=True)
    wants = torch.autograd.grad([e for _, e in outs], [t for _, t in leaves], [u.double() for u in ups],
                                allow_unused=True)
    for i, (a, e) in enumerate(zip(grads, wants, strict=True)):
        assert (a is None) == (e is None), f"gradient {i}: None exactly where torch's is"
        if e is not None:
            close(a, e, 1e-5, f"gradient {i}")


@pytest.mark.parametrize("path", ["eager", "op"])
@pytest.mark.parametrize("needs", ["q", "k", "qk"])
def test_rotary_result_of_an_input_needing_no_gradient_does_not_require_grad(needs, path):
    g = gen(2)
    q = randn(g, 2, 3, 2, D_ROT).requires_grad_("q" in needs)     # (B, S, H, D)
    k = randn(g, 2, 3, 1, D_ROT).requires_grad_("k" in needs)     # (B, S, Hkv, D)
    with config.override(backend="reference"), poisoned_allocations():
        got = ops.rotary(q, k, COS, SIN) if path == "eager" else torch.ops.tilestack.rotary(q, k, COS, SIN, False)
    q64, k64 = as64(q), as64(k)
    want = rotate64(q64), rotate64(k64)
    assert [t.requires_grad for t in got] == [t.requires_grad for t in want], "requires_grad of (qr, kr) as torch's"
    for a, e, what in zip(got, want, ("qr", "kr"), strict=True):
        close(a, e, 1e-5, what)
    outs = [(a, e) for a, e in zip(got, want, strict=True) if e.requires_grad]
    ups = [randn(g, *a.shape) for a, _ in outs]
    leaves = [(t, t64) for t, t64 in ((q, q64), (k, k64)) if t.requires_grad]
    with config.override(backend="reference"):
        grads = torch.autograd.grad([a for a, _ in outs], [t for t, _ in leaves], ups)
    wants = torch.autograd.grad([e for _, e in outs], [t for _, t in leaves], [u.double() for u in ups])
    for i, (a, e) in enumerate(zip(grads, wants, strict=True)):
        close(a, e, 1e-5, f"gradient {i}")


# ---- seeded draws over every op: shapes, layouts, dtypes, grad modes ------------------------------------------------
LAYOUTS = ("contiguous", "transposed", "offset", "stepped", "expanded", "channels_last")


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values in the named layout (the expanded one repeats t's first row along dim 0, its values then)."""
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "offset":
        flat = torch.full((t.numel() + 3,), math.nan, dtype=t.dtype)
        flat[3:] = t.reshape(-1)
        return flat[3:].view(t.shape)
    if layout == "stepped" and t.dim() >= 1:
        wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), math.nan, dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "expanded" and t.dim() >= 2 and t.shape[0] >= 1:
        return t[:1].expand(t.shape)
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


def draw(seed: int):
    """One case: (what, f(ops inputs), f64(float64 inputs), inputs, dtype, mode, backend), all from the seed."""
    rng, g = random.Random(2600 + seed), gen(seed)
    dtype = rng.choice((torch.float32, torch.bfloat16, torch.float16))
    mode = rng.choice(("grad", "grad", "no_grad", "inference_mode"))
    backend = "triton" if seed % 6 == 5 else "reference"

    def tensor(*shape):
        t = laid_out(randn(g, *shape, dtype=dtype), rng.choice(LAYOUTS))
        return t.requires_grad_(mode == "grad" and rng.random() < 0.6)

    op = rng.choice(("rms_norm", "layer_norm", "add_rms_norm", "swiglu", "cross_entropy", "attention", "rotary"))
    lead = [rng.choice((0, 1, 2, 3)) for _ in range(rng.choice((1, 2)))]
    n = rng.choice((1, 2, 5, 17, 33))
    eps = rng.choice((1e-6, 0.0, 1.0, 1e3))
    if op in ("rms_norm", "layer_norm", "add_rms_norm"):
        x, r, w, b = tensor(*lead, n), tensor(*lead, n), tensor(n), tensor(n)
        inputs = [x, r, w, b]

        def f(x, r, w, b):
            if op == "rms_norm":
                return (ops.rms_norm(x, w, eps),)
            if op == "layer_norm":
                return (ops.layer_norm(x, w, b, eps),)
            return ops.add_rms_norm(x, r, w, eps)

        def f64(x, r, w, b):
            if op == "rms_norm":
                return (F.rms_norm(x, (n,), w, eps),)
            if op == "layer_norm":
                return (F.layer_norm(x, (n,), w, b, eps),)
            return F.rms_norm(x + r, (n,), w, eps), x + r
    elif op == "swiglu":
        inputs = [tensor(*lead, 2 * n)]
        f = lambda x: (ops.swiglu(x),)                                          # noqa: E731
        f64 = lambda x: (F.silu(x[..., :n]) * x[..., n:],)                       # noqa: E731
    elif op == "cross_entropy":
        t, v, d = rng.choice((0, 1, 3, 7)), rng.choice((1, 2, 5, 19)), rng.choice((1, 4, 16))
        ignore = rng.choice((-100, 0, v - 1, -1))
        labels = torch.randint(0, v, (t,), generator=g)
        labels[torch.rand(t, generator=g) < 0.3] = ignore
        inputs = [tensor(t, d), tensor(v, d)]
        f = lambda x, w: (ops.fused_linear_cross_entropy(x, w, labels, ignore_index=ignore),)   # noqa: E731
        f64 = lambda x, w: (F.cross_entropy(x @ w.T, labels, ignore_index=ignore),)             # noqa: E731
        op = f"{op} T={t} V={v} ignore_index={ignore}"
    elif op == "attention":
        b_, h, hkv = rng.choice((1, 2)), 2, rng.choice((1, 2))
        nq, nk, d = rng.choice((1, 3, 17)), rng.choice((1, 4, 17)), rng.choice((1, 8, 16))
        dv = rng.choice((d, 4))
        causal, scale = rng.random() < 0.4, rng.choice((None, 0.1, 2.0))
        mask = None if causal or rng.random() < 0.5 else \
            torch.rand(rng.choice(((nq, nk), (1, 1, nq, nk), (b_, 1, nq, nk))), generator=g) > 0.3
        inputs = [tensor(b_, h, nq, d), tensor(b_, hkv, nk, d), tensor(b_, hkv, nk, dv)]
        f = lambda q, k, v: (tilestack.attention(q, k, v, causal, scale, attn_mask=mask),)     # noqa: E731
        f64 = lambda q, k, v: (F.scaled_dot_product_attention(q, k, v, mask, 0.0, causal,      # noqa: E731
                                                              scale=scale, enable_gqa=True),)
        op = f"attention Nq={nq} Nk={nk} H/Hkv={h}/{hkv} D={d} Dv={dv} causal={causal} mask={mask is not None}"
    else:
        b_, s, h = rng.choice((1, 2)), rng.choice((1, 3)), rng.choice((1, 2))
        inputs = [tensor(b_, s, h, D_ROT), tensor(b_, s, 1, D_ROT)]
        f = lambda q, k: ops.rotary(q, k, COS[:s], SIN[:s])                     # noqa: E731
        f64 = lambda q, k: (rotate64(q), rotate64(k))                           # noqa: E731
    return f"{op} {dtype} {mode} {backend}", f, f64, inputs, dtype, mode, backend


@pytest.mark.parametrize("seed", range(14))
def test_seeded_draws_match_float64_values_gradients_and_requires_grad(seed):
    what, f, f64, inputs, dtype, mode, backend = draw(seed)
    grad_mode = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with config.override(backend=backend), poisoned_allocations(), grad_mode():
        got = f(*inputs)
    inputs64 = [as64(t) for t in inputs]
    want = f64(*inputs64)
    tol = TOL[dtype]
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        assert a.requires_grad == (e.requires_grad and mode == "grad"), f"{what}: result {i}'s requires_grad"
        close(a, e, tol, f"{what}: result {i}")
    outs = [(a, e) for a, e in zip(got, want, strict=True) if a.requires_grad]
    if not outs:
        return
    g = gen(100 + seed)
    ups = [randn(g, *a.shape) for a, _ in outs]
    leaves = [(t, t64) for t, t64 in zip(inputs, inputs64, strict=True) if t.requires_grad]
    with config.override(backend=backend), poisoned_allocations():
        grads = torch.autograd.grad([a for a, _ in outs], [t for t, _ in leaves], [u.to(a.dtype) for u, (a, _) in
                                    zip(ups, outs, strict=True)], allow_unused=True)
    wants = torch.autograd.grad([e for _, e in outs], [t for _, t in leaves], ups, allow_unused=True)
    for i, (a, e) in enumerate(zip(grads, wants, strict=True)):
        assert (a is None) == (e is None), f"{what}: gradient {i} None exactly where torch's is"
        if e is not None:
            close(a, e, 5 * tol, f"{what}: gradient {i}")


# ---- the drop-in with out-of-range hyperparameters: torch's answer or torch's error ---------------------------------
def qkv(seed: int, requires_grad: bool = False):
    g = gen(seed)
    return tuple(randn(g, *shape).requires_grad_(requires_grad)                 # (B, H, N, D)
                 for shape in ((1, 2, 5, 8), (1, 2, 6, 8), (1, 2, 6, 8)))


@pytest.mark.parametrize("scale", [0.0, 0, -0.0, -1.5, math.nan, math.inf, 1e30])
def test_drop_in_scale_out_of_the_kernels_range_gives_torchs_answer(scale):
    q, k, v = qkv(3)
    with warnings.catch_warnings(), config.override(backend="reference"):
        warnings.simplefilter("ignore")
        got = tilestack.scaled_dot_product_attention(q, k, v, scale=scale)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    want = torch_sdpa(q64, k64, v64, scale=scale)
    if math.isnan(scale):        # torch's CPU kernel: NaN scores give 0 (its row guard), float64 math the same
        want = torch_sdpa(q, k, v, scale=scale).double()
    close(got, want, 1e-5, f"scale={scale}")


@pytest.mark.parametrize("dropout_p", [-0.1, 1.5, math.nan])
def test_drop_in_dropout_p_out_of_range_raises_torchs_error(dropout_p):
    q, k, v = qkv(4)
    with pytest.raises(RuntimeError) as torch_error:
        torch_sdpa(q, k, v, dropout_p=dropout_p)
    with warnings.catch_warnings(), config.override(backend="reference"), \
            pytest.raises(type(torch_error.value)) as ours:
        warnings.simplefilter("ignore")
        tilestack.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    assert str(ours.value) == str(torch_error.value)


@pytest.mark.parametrize("dropout_p", [1.0, 1])
@pytest.mark.parametrize("fn", ["attention", "drop_in"])
def test_dropout_p_one_gives_zeros_and_zero_gradients_as_torch(fn, dropout_p):
    q, k, v = qkv(5, requires_grad=True)
    with warnings.catch_warnings(), config.override(backend="reference"), poisoned_allocations():
        warnings.simplefilter("ignore")
        o = tilestack.attention(q, k, v, dropout_p=dropout_p) if fn == "attention" else \
            tilestack.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        o.backward(torch.ones_like(o))
    want = torch_sdpa(*(t.detach() for t in (q, k, v)), dropout_p=1.0)
    assert torch.equal(want, torch.zeros_like(want)), "torch's answer: every probability dropped"
    assert torch.equal(o.detach(), want)
    for name, t in zip("qkv", (q, k, v), strict=True):
        assert torch.equal(t.grad, torch.zeros_like(t)), f"d{name}: zeros (the output depends on nothing)"


# ---- tilestack.patch on MultiheadAttention variants ------------------------------------------------------------------
@pytest.fixture
def kernel_calls(monkeypatch):
    """How many drop-in calls reached tilestack's kernels (not torch's function)."""
    calls = []
    real = sdpa_module.attention
    monkeypatch.setattr(sdpa_module, "attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


E = 16
MHA_CASES = {
    "add_bias_kv": (dict(add_bias_kv=True), ((2, 5, E),) * 3, {}),
    "add_zero_attn": (dict(add_zero_attn=True), ((2, 5, E),) * 3, {}),
    "kdim_vdim": (dict(kdim=8, vdim=12), ((2, 5, E), (2, 7, 8), (2, 7, 12)), {}),
    "unbatched": ({}, ((5, E),) * 3, {}),
    "float_key_padding_with_-inf": ({}, ((2, 5, E),) * 3, dict(
        key_padding_mask=torch.tensor([[0.0, 0.0, 0.0, -1e9, -math.inf], [0.0] * 5]))),
    "every_key_padded_in_one_row": ({}, ((2, 5, E),) * 3, dict(
        key_padding_mask=torch.tensor([[False] * 4 + [True], [False] * 5]))),
    "per_head_3d_mask": ({}, ((2, 5, E),) * 3, dict(
        attn_mask=torch.rand(4, 5, 5, generator=gen(6)) > 0.3)),
}


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_patched_multihead_attention_variants_forward_and_backward(case, kernel_calls):
    kwargs, shapes, call = MHA_CASES[case]
    torch.manual_seed(26)
    mha = nn.MultiheadAttention(E, 2, batch_first=True, **kwargs)
    mha64 = nn.MultiheadAttention(E, 2, batch_first=True, **kwargs).double()
    mha64.load_state_dict(mha.state_dict())
    g = gen(7)
    inputs = [randn(g, *s).requires_grad_() for s in shapes]
    inputs64 = [as64(t) for t in inputs]
    call64 = {k: (v.double() if v.is_floating_point() else v) for k, v in call.items()}
    with config.override(backend="reference"), tilestack.patch(mha), poisoned_allocations():
        got, _ = mha(*inputs, need_weights=False, **call)
        got.backward(torch.ones_like(got))
    want, _ = mha64(*inputs64, need_weights=False, **call64)
    want.backward(torch.ones_like(want))
    assert len(kernel_calls) == 1, "the kernels did not take the call"
    close(got, want, 1e-5, "output")
    for i, (t, t64) in enumerate(zip(inputs, inputs64, strict=True)):
        close(t.grad, t64.grad, 1e-4, f"input {i}'s gradient")
    close(mha.in_proj_weight.grad if mha.in_proj_weight is not None else mha.q_proj_weight.grad,
          mha64.in_proj_weight.grad if mha64.in_proj_weight is not None else mha64.q_proj_weight.grad,
          1e-4, "the projection's gradient")


def test_constant_results_under_torch_compile_as_torchs():
    """The ``tilestack::`` ops' path under torch.compile: h and the rotated k of inputs needing no gradient do not
    require grad, and the weight's and q's gradients are float64 torch's."""
    g = gen(8)
    x, r, w = randn(g, 4, 8), randn(g, 4, 8), randn(g, 8).requires_grad_()     # (T, C)
    q, k = randn(g, 1, 3, 2, D_ROT).requires_grad_(), randn(g, 1, 3, 1, D_ROT)  # (B, S, H, D)

    def f(x, r, w, q, k):
        y, h = ops.add_rms_norm(x, r, w)
        qr, kr = ops.rotary(q, k, COS, SIN)
        return (y * h).sum() + (qr * qr).sum(), h, kr

    with config.override(backend="reference"):
        loss, h, kr = torch.compile(f, backend="aot_eager", fullgraph=True)(x, r, w, q, k)
        loss.backward()
    w64, q64 = as64(w), as64(q)
    h64 = x.double() + r.double()
    loss64 = (F.rms_norm(h64, (8,), w64, 1e-6) * h64).sum() + (rotate64(q64) ** 2).sum()
    loss64.backward()
    assert not h.requires_grad and not kr.requires_grad, "h = x + r and k's rotation are constants, as torch's"
    close(loss, loss64, 1e-5, "loss")
    close(w.grad, w64.grad, 1e-5, "dw")
    close(q.grad, q64.grad, 1e-5, "dq")
