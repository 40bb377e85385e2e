"""SDPA parity, round one, part two: dropout, torch.compile and torch.func around
``tilestack.scaled_dot_product_attention``, against torch's SDPA on the CPU backends.

- dropout_p > 0 (fused in the kernels on the CPU): the dropped fraction is p, a kept entry of P is worth
  P / (1 - p), the mean over seeds is P (z-scores of the per-entry mean), ``torch.manual_seed`` repeats a run;
  the gradients are those of float64 attention with the forward's own mask (read back with v = I: o = P*M/(1-p));
- ``torch.compile(fullgraph=True)`` of the kernel path and of every hand-off to torch (rank 3 and 5, fp64, head
  dim 300, scale 0, a mask that needs a gradient), with dynamic shapes, forward and backward: no graph break,
  torch's answer;
- ``torch.func``: vmap (batched and unbatched arguments, a batched mask, dropout's randomness modes), grad, jacrev,
  and the forward-mode transforms (jvp, jacfwd, hessian), which the kernels have no rule for: handed to torch, so
  they raise torch's NotImplementedError on its CPU flash kernel and give its answer on its math backend.

What it found (failed before its fix): ``torch.func.hessian`` (jacfwd over jacrev) reached the kernels' op, whose
tangent check raised a LaunchError (a ValueError) where torch raises NotImplementedError, or, on its math backend,
answers: the tangent sits below the inner transforms' wrappers, where ``unpack_dual`` does not see it; a jvp
transform on functorch's interpreter stack now hands the call to torch (``sdpa.unsupported``).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import tilestack
from tilestack import config
from tilestack.torch import sdpa as sdpa_module

torch_sdpa = sdpa_module.torch_sdpa
ours = tilestack.scaled_dot_product_attention
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float64: 1e-10}


def randn(seed, *shape, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def rel(got, want) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@pytest.fixture(autouse=True)
def quiet_notices():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="tilestack.scaled_dot_product_attention: handing")
        warnings.filterwarnings("ignore", message="There is a performance drop")
        yield


# ---- dropout -----------------------------------------------------------------------------------------------------
B, H, L, S = 2, 2, 16, 24


def _identity_value(dtype, heads=H):
    """v = I (S keys, Ev = S): o = dropout(P) @ I is P with the dropped entries 0 and the kept ones / (1 - p)."""
    return torch.eye(S, dtype=dtype).expand(B, heads, S, S).contiguous()


@pytest.mark.parametrize("p", (0.1, 0.5))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_dropout_statistics_match_torchs(p, dtype):
    q, k = randn(1, B, H, L, 8, dtype=dtype), randn(2, B, H, S, 8, dtype=dtype)
    v = _identity_value(dtype)
    P = torch_sdpa(q.double(), k.double(), v.double())                 # (B, H, L, S) float64 probabilities
    seeds = 120
    with config.override(backend="reference"):
        runs = []
        for s in range(seeds):
            torch.manual_seed(s)
            runs.append(ours(q, k, v, dropout_p=p).double())
        torch.manual_seed(3)
        again = ours(q, k, v, dropout_p=p)
    o = torch.stack(runs)                                              # (seeds, B, H, L, S)
    kept = o != 0
    n = kept.numel()
    assert abs((1 - kept.double().mean().item()) - p) <= 4 * math.sqrt(p * (1 - p) / n)
    # a kept entry is P / (1 - p), to the dtype's rounding of P
    assert float(((o - P / (1 - p)).abs() * kept).max()) <= 2 * TOL[dtype] * float(P.max()) / (1 - p)
    # the mean over seeds is P: per entry (B*H*L*S of them) a z-score of the mean of `seeds` draws
    z = (o.mean(0) - P) / (P * math.sqrt(p / (1 - p) / seeds))
    assert float(z.abs().max()) <= 5.0 and abs(float(z.mean())) <= 4 / math.sqrt(z.numel())
    torch.manual_seed(3)
    assert torch.equal(runs[3], again.double()) and not torch.equal(runs[3], runs[4])
    # and torch's own dropout, the same statistics (so that the test reads what SDPA means)
    torch.manual_seed(0)
    theirs = torch.stack([torch_sdpa(q, k, v, dropout_p=p) for _ in range(20)]).double()
    assert abs((1 - (theirs != 0).double().mean().item()) - p) <= 4 * math.sqrt(p * (1 - p) / theirs.numel())


# (name, q heads, kv heads, Ev, causal, mask)
DROPOUT_GRAD_CASES = {
    "plain": (H, H, 8, False, None),
    "causal-gqa": (4, 2, 8, True, None),
    "bool-mask-Ev12": (H, H, 12, False, "bool"),
    "additive-mask": (H, H, 8, False, "float"),
}


@pytest.mark.parametrize("backend", ("reference", "triton"))
@pytest.mark.parametrize("case", list(DROPOUT_GRAD_CASES))
def test_dropout_with_requires_grad_gives_the_gradients_of_the_forwards_mask(case, backend):
    if backend == "triton" and case in ("plain", "bool-mask-Ev12"):
        pytest.skip("the reference backend covers it; the interpreter is slow")
    hq, hkv, ev, causal, mask_kind = DROPOUT_GRAD_CASES[case]
    p, seed = 0.3, 11
    q, k, v = randn(1, B, hq, L, 8), randn(2, B, hkv, S, 8), randn(3, B, hkv, S, ev)
    mask = {None: None, "bool": randn(4, B, 1, L, S) > -0.5, "float": randn(4, hq, L, S)}[mask_kind]
    kw = dict(attn_mask=mask, is_causal=causal, enable_gqa=hq != hkv)
    with config.override(backend=backend):
        torch.manual_seed(seed)
        dropped = ours(q, k, _identity_value(torch.float32, hkv), dropout_p=p, **kw)   # P * M / (1 - p)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(seed)
        o = ours(*leaves, dropout_p=p, **kw)
        do = randn(5, *o.shape)
        o.backward(do)
    keep = dropped != 0
    # float64: P from torch's SDPA (v = I), dropped with the forward's mask, times v; autograd gives the grads
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    P64 = torch_sdpa(q64, k64, _identity_value(torch.float64, hkv), attn_mask=None if mask is None else (
        mask if mask.dtype == torch.bool else mask.double()), is_causal=causal, enable_gqa=hq != hkv)
    seen = P64.detach() > 0                                  # (the entries a mask or causality leaves)
    assert abs(1 - keep[seen].double().mean().item() - p) <= 0.05   # a real mask, not all kept or all dropped
    v_rep = v64.repeat_interleave(hq // hkv, dim=1)
    o64 = (P64 * keep / (1 - p)) @ v_rep
    o64.backward(do.double())
    assert rel(o.detach(), o64.detach()) <= TOL[torch.float32]
    for t, t64 in zip(leaves, (q64, k64, v64), strict=True):
        assert rel(t.grad, t64.grad) <= 2 * TOL[torch.float32]


def test_dropout_one_with_requires_grad_gives_zeros_as_torch():
    leaves = [randn(i, 1, 2, 5, 8).requires_grad_() for i in range(3)]
    with config.override(backend="reference"):
        o = ours(*leaves, dropout_p=1.0)
        o.sum().backward()
    theirs = torch_sdpa(*(t.detach() for t in leaves), dropout_p=1.0)
    assert not o.any() and not theirs.any()
    assert all(not t.grad.any() for t in leaves)


# ---- torch.compile(fullgraph=True) -----------------------------------------------------------------------------------
def _compile_case(name):
    g = 10 * (1 + len(name))
    if name == "kernels-causal":
        return (randn(g, 2, 2, 9, 16), randn(g + 1, 2, 2, 11, 16), randn(g + 2, 2, 2, 11, 16)), dict(is_causal=True)
    if name == "kernels-bool-mask-gqa":
        return ((randn(g, 2, 4, 9, 16), randn(g + 1, 2, 2, 11, 16), randn(g + 2, 2, 2, 11, 24)),
                dict(attn_mask=randn(g + 3, 9, 11) > 0, enable_gqa=True))
    if name == "rank3":
        return (randn(g, 2, 9, 16), randn(g + 1, 2, 11, 16), randn(g + 2, 2, 11, 16)), dict(is_causal=True)
    if name == "rank5":
        return (randn(g, 2, 1, 2, 9, 16), randn(g + 1, 2, 1, 2, 11, 16), randn(g + 2, 2, 1, 2, 11, 16)), {}
    if name == "fp64":
        return tuple(randn(g + i, 1, 2, 7, 16, dtype=torch.float64) for i in range(3)), dict(is_causal=True)
    if name == "head-dim-300":
        return tuple(randn(g + i, 1, 1, 5, 300) for i in range(3)), {}
    if name == "scale-0":
        return tuple(randn(g + i, 1, 2, 7, 16) for i in range(3)), dict(scale=0.0)
    if name == "mask-requires-grad":
        return tuple(randn(g + i, 1, 2, 7, 16) for i in range(3)), dict(attn_mask=randn(g + 3, 7, 7).requires_grad_())
    raise KeyError(name)


COMPILE_CASES = ["kernels-causal", "kernels-bool-mask-gqa", "rank3", "rank5", "fp64", "head-dim-300", "scale-0",
                 "mask-requires-grad"]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_compiled_fullgraph_answers_as_torch_forward_and_backward(case, fresh_dynamo):
    args, kw = _compile_case(case)
    leaves = [t.clone().requires_grad_() for t in args]
    mask = kw.get("attn_mask")
    with config.override(backend="reference"):
        fn = torch.compile(lambda q, k, v: ours(q, k, v, **kw), fullgraph=True, backend="aot_eager")
        o = fn(*leaves)
        do = randn(99, *o.shape, dtype=o.dtype)
        o.backward(do)
    refs = [t.double().requires_grad_() for t in args]
    kw64 = dict(kw)
    if mask is not None and mask.is_floating_point():
        mask_grad = mask.grad.clone() if mask.grad is not None else None
        kw64["attn_mask"] = mask.detach().double().requires_grad_(mask.requires_grad)
    o64 = torch_sdpa(*refs, **kw64)
    o64.backward(do.double())
    dtype = args[0].dtype
    assert o.dtype == dtype and o.shape == o64.shape and rel(o.detach(), o64.detach()) <= TOL[dtype]
    for t, t64 in zip(leaves, refs, strict=True):
        assert rel(t.grad, t64.grad) <= 2 * TOL[dtype]
    if case == "mask-requires-grad":
        assert rel(mask_grad, kw64["attn_mask"].grad) <= 2 * TOL[dtype]


def test_compiled_with_dynamic_shapes_answers_as_torch(fresh_dynamo):
    with config.override(backend="reference"):
        fn = torch.compile(lambda q, k, v: ours(q, k, v, is_causal=True, scale=0.25), fullgraph=True,
                           backend="aot_eager", dynamic=True)
        for n in (5, 9, 17):
            q, k, v = randn(n, 1, 2, n, 16), randn(n + 1, 1, 2, n + 3, 16), randn(n + 2, 1, 2, n + 3, 16)
            want = torch_sdpa(q.double(), k.double(), v.double(), is_causal=True, scale=0.25)
            assert rel(fn(q, k, v), want) <= TOL[torch.float32]


def test_compiled_dropout_runs_the_fused_kernels_in_one_graph(fresh_dynamo):
    q, k = randn(1, B, H, L, 8), randn(2, B, H, S, 8)
    v = _identity_value(torch.float32)
    with config.override(backend="reference", sdpa_dropout="fused"):
        fn = torch.compile(lambda q, k, v: ours(q, k, v, dropout_p=0.4), fullgraph=True, backend="aot_eager")
        torch.manual_seed(0)
        a = fn(q, k, v)
        torch.manual_seed(0)
        b = fn(q, k, v)
    P = torch_sdpa(q.double(), k.double(), v.double())
    keep = a != 0
    assert torch.equal(a, b) and abs(1 - keep.double().mean().item() - 0.4) <= 0.05
    assert float(((a - P / 0.6).abs() * keep).max()) <= 1e-5


# ---- torch.func --------------------------------------------------------------------------------------------------
Q, K, V = randn(1, 3, 2, 2, 5, 8), randn(2, 3, 2, 2, 7, 8), randn(3, 3, 2, 2, 7, 8)   # a batch of 3 to map over
M = randn(4, 3, 5, 7)


@pytest.mark.parametrize("in_dims, args", [
    ((0, 0, 0), (Q, K, V)),
    ((0, None, None), (Q, K[0], V[0])),
    ((None, 0, 0), (Q[0], K, V)),
    ((0, 0, 0, 0), (Q, K, V, M)),
    ((None, None, None, 0), (Q[0], K[0], V[0], M > 0)),
    ((2, 2, 2), (Q.movedim(0, 2), K.movedim(0, 2), V.movedim(0, 2))),
], ids=("all", "q-only", "kv-only", "with-mask", "bool-mask-only", "dim2"))
def test_vmap_answers_as_torch(in_dims, args):
    with config.override(backend="reference"):
        got = vmap(ours, in_dims=in_dims)(*args)
    want = vmap(torch_sdpa, in_dims=in_dims)(*(a.double() if a.is_floating_point() else a for a in args))
    assert got.shape == want.shape and rel(got, want) <= TOL[torch.float32]


@pytest.mark.parametrize("randomness", ("same", "different"))
def test_vmap_dropout_randomness_as_torch(randomness):
    """Identical slices: "same" gives one mask for every slice, "different" a mask each, as torch's."""
    x = randn(1, 1, 2, 6, 8).expand(3, 1, 2, 6, 8)
    results = {}
    for name, fn in (("ours", ours), ("torch", torch_sdpa)):
        with config.override(backend="reference"):
            torch.manual_seed(0)
            o = vmap(lambda a, fn=fn: fn(a, a, a, dropout_p=0.5), randomness=randomness)(x)
        results[name] = (torch.equal(o[0], o[1]), torch.equal(o[1], o[2]))
    assert results["ours"] == results["torch"] == ((True, True) if randomness == "same" else (False, False))


def test_vmap_dropout_in_error_mode_raises_as_torch():
    x = randn(1, 3, 1, 2, 6, 8)
    errors = []
    for fn in (ours, torch_sdpa):
        with config.override(backend="reference"), pytest.raises(RuntimeError) as e:
            vmap(lambda a, fn=fn: fn(a, a, a, dropout_p=0.5))(x)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "randomness" in errors[0]


@pytest.mark.parametrize("transform", ("grad", "jacrev", "grad-of-vmap", "vmap-of-grad", "grad-wrt-mask"))
def test_reverse_mode_transforms_answer_as_torch(transform):
    q, k, v, m = Q[0, :1], K[0, :1], V[0, :1], M[0]

    def make(fn, dtype):
        qq, kk, vv, mm = (t.to(dtype) for t in (q, k, v, m))
        if transform == "grad":
            return grad(lambda a: fn(a, kk, vv, is_causal=True).pow(2).sum())(qq)
        if transform == "jacrev":
            return jacrev(lambda a: fn(a, kk, vv))(qq)
        if transform == "grad-of-vmap":
            return grad(lambda a: vmap(fn)(a, K.to(dtype), V.to(dtype)).pow(2).sum())(Q.to(dtype))
        if transform == "vmap-of-grad":
            return vmap(grad(lambda a, b, c: fn(a, b, c).pow(2).sum()))(Q.to(dtype), K.to(dtype), V.to(dtype))
        return grad(lambda mask: fn(qq, kk, vv, attn_mask=mask).pow(2).sum())(mm)

    with config.override(backend="reference"):
        got = make(ours, torch.float32)
    want = make(torch_sdpa, torch.float64)
    assert got.shape == want.shape and rel(got, want) <= 2 * TOL[torch.float32]


FORWARD_MODE = {
    "jvp": lambda fn, q, k, v: jvp(lambda a: fn(a, k, v), (q,), (torch.ones_like(q),))[1],
    "jacfwd": lambda fn, q, k, v: jacfwd(lambda a: fn(a, k, v))(q),
    "hessian": lambda fn, q, k, v: hessian(lambda a: fn(a, k, v).pow(2).sum())(q),
}


@pytest.mark.parametrize("transform", list(FORWARD_MODE))
def test_forward_mode_transforms_raise_as_torchs_flash_kernel(transform):
    q, k, v = Q[0, :1, :1], K[0, :1, :1], V[0, :1, :1]
    with pytest.raises(NotImplementedError) as theirs:
        FORWARD_MODE[transform](torch_sdpa, q, k, v)
    with config.override(backend="reference"), pytest.raises(NotImplementedError) as got:
        FORWARD_MODE[transform](ours, q, k, v)
    assert str(got.value) == str(theirs.value)


@pytest.mark.parametrize("transform", list(FORWARD_MODE))
def test_forward_mode_transforms_answer_as_torchs_math_backend(transform):
    q, k, v = Q[0, :1, :1], K[0, :1, :1], V[0, :1, :1]
    with sdpa_kernel(SDPBackend.MATH):
        want = FORWARD_MODE[transform](torch_sdpa, q.double(), k.double(), v.double())
        with config.override(backend="reference"):
            got = FORWARD_MODE[transform](ours, q, k, v)
    assert got.shape == want.shape and rel(got, want) <= 1e-4


def test_double_backward_raises_a_runtime_error_as_torch():
    """torch's CPU flash kernel has no double backward (a RuntimeError); the kernels refuse it by name, also a
    RuntimeError (torch's DelayedError node)."""
    messages = []
    for fn in (ours, torch_sdpa):
        q = Q[0].clone().requires_grad_()
        with config.override(backend="reference"):
            gq, = torch.autograd.grad(fn(q, K[0], V[0]).pow(2).sum(), q, create_graph=True)
        with pytest.raises(RuntimeError) as e:
            gq.sum().backward()
        messages.append(str(e.value))
    assert "attention: double backward is not supported" in messages[0]
