"""Fuzz round nineteen, part two: second derivatives through the ops' eager path, masks that leave rows with no key,
empty dims in every position with gradients, and the ops' scalar arguments out of range.

Rounds 4 and 7 checked that ``penalty.backward()`` through a gradient made with ``create_graph=True`` raises, naming
the op. This round took the second derivative the other ways torch offers: ``torch.autograd.grad(g, x)``,
``torch.autograd.functional.hessian`` and ``hvp`` (rotary, linear, claims an exact one: checked against float64).

What this round found (each test below failed before its fix):
- ``torch.autograd.functional.hessian`` and ``hvp`` of a function through ``rms_norm``, ``layer_norm``,
  ``add_rms_norm``, ``add_layer_norm``, ``swiglu``, ``attention`` or ``fused_linear_cross_entropy`` (eager, plain
  tensors) returned zeros without a word, and ``torch.autograd.grad(g.sum(), x, allow_unused=True)`` None (without
  allow_unused: torch's "appears to not have been used in the graph"): the node that refuses a double backward
  (``torch._autograd.once_differentiable``) took detached leaves only, so x was not in the first gradient's graph
  and torch never reached it. The node now also takes the forward's inputs that require grad (the saved tensors, or
  the fused cross-entropy's x and weight), and each of these raises, naming the op.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tilestack
import tilestack.kernels as K
from tilestack import config
from tilestack.errors import LaunchError
from tilestack.testing.fuzz.outcomes import poisoned_allocations
from tilestack.torch import ops

SEED = 1901


def rng_for(*key: int) -> np.random.Generator:
    return np.random.default_rng([SEED, *key])


def randn(rng, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


# ---- second derivatives --------------------------------------------------------------------------------------------
def _fns():
    rng = rng_for(0)
    w, b, r = randn(rng, 8) + 2, randn(rng, 8), randn(rng, 3, 8)
    k, v = randn(rng, 1, 2, 5, 8), randn(rng, 1, 2, 5, 8)
    lm, labels = randn(rng, 10, 8), torch.tensor([0, 3, 9])
    return {
        "rms_norm": lambda x: ops.rms_norm(x, w).pow(3).sum(),
        "layer_norm": lambda x: ops.layer_norm(x, w, b).pow(3).sum(),
        "add_rms_norm": lambda x: ops.add_rms_norm(x, r, w)[0].pow(3).sum(),
        "add_layer_norm": lambda x: ops.add_layer_norm(x, r, w, b)[0].pow(3).sum(),
        "swiglu": lambda x: ops.swiglu(x).pow(2).sum(),
        "attention": lambda x: tilestack.attention(x[None, None].expand(1, 2, 3, 8), k, v).pow(2).sum(),
        "fused_linear_cross_entropy": lambda x: ops.fused_linear_cross_entropy(x, lm, labels),
    }


FNS = _fns()
SECOND = ("hessian", "hvp", "grad_allow_unused", "grad")


@pytest.mark.parametrize("how", SECOND)
@pytest.mark.parametrize("op", list(FNS))
def test_a_second_derivative_is_refused_by_name_every_way(op, how):
    """Each way torch takes a second derivative reaches the refusing node: a LaunchError (or the RuntimeError torch
    wraps it in) naming the op, never a Hessian of zeros or a None gradient."""
    fn = FNS[op]
    x = randn(rng_for(1), 3, 8)
    name = op.removeprefix("add_")
    with config.override(backend="reference"), \
            pytest.raises((LaunchError, RuntimeError), match=f"{name}: double backward is not supported"):
        if how == "hessian":
            torch.autograd.functional.hessian(fn, x)
        elif how == "hvp":
            torch.autograd.functional.hvp(fn, x, torch.ones_like(x))
        else:
            xr = x.clone().requires_grad_()
            g, = torch.autograd.grad(fn(xr), xr, create_graph=True)
            torch.autograd.grad(g.pow(2).sum(), xr, allow_unused=how == "grad_allow_unused")


@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "fused_linear_cross_entropy"])
def test_create_graph_alone_gives_the_usual_gradient(op):
    """The refusing node changes nothing until something differentiates through it: the first gradient under
    create_graph=True is the one without it."""
    fn = FNS[op]
    x = randn(rng_for(2), 3, 8)
    with config.override(backend="reference"):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        g1, = torch.autograd.grad(fn(a), a, create_graph=True)
        g2, = torch.autograd.grad(fn(b), b)
    assert g1.requires_grad and not g2.requires_grad
    assert torch.equal(g1.detach(), g2)


def _rotate64(x, cos, sin):
    half = x.shape[-1] // 2
    c, s = cos[None, :, None].double(), sin[None, :, None].double()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def test_rotary_hessian_vector_product_matches_float64():
    """rotary claims an exact double backward (it is linear in q and k): hvp of a cubic through it against float64."""
    rng = rng_for(3)
    q, k = randn(rng, 1, 3, 2, 16), randn(rng, 1, 3, 1, 16)
    cos, sin = K.rotary_tables(3, 16)
    vq, vk = randn(rng, *q.shape), randn(rng, *k.shape)

    def f(q, k):
        qr, kr = ops.rotary(q, k, cos, sin)
        return qr.pow(3).sum() + (kr * qr[:, :, :1]).pow(2).sum()

    def f64(q, k):
        qr, kr = _rotate64(q, cos, sin), _rotate64(k, cos, sin)
        return qr.pow(3).sum() + (kr * qr[:, :, :1]).pow(2).sum()

    with config.override(backend="reference"):
        _, (hq, hk) = torch.autograd.functional.hvp(f, (q, k), (vq, vk))
    _, (wq, wk) = torch.autograd.functional.hvp(f64, (q.double(), k.double()), (vq.double(), vk.double()))
    for got, want in ((hq, wq), (hk, wk)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


# ---- attention: rows with no key left ------------------------------------------------------------------------------
MASKS = ("bool_row", "additive_row", "bool_all", "additive_all", "bool_head", "additive_column")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kind", MASKS)
def test_attention_rows_with_every_key_masked_match_float64(kind, backend):
    """A boolean mask with a row of False or an additive mask with a row of -inf (one row, all rows, a whole head,
    broadcast from (Nq, 1)): the output and q, k, v gradients as float64 torch's SDPA gives them (zero rows), NaN
    nowhere; every result starts as NaN."""
    rng = rng_for(4, MASKS.index(kind))
    B, H, Nq, Nk, D = 2, 2, 5, 7, 8
    q, k, v = randn(rng, B, H, Nq, D), randn(rng, B, H, Nk, D), randn(rng, B, H, Nk, D)
    keep = torch.from_numpy(rng.random((B, H, Nq, Nk)) < 0.7)
    if kind.endswith("_row"):
        keep[:, :, 2] = False
    elif kind.endswith("_all"):
        keep[:] = False
    elif kind.endswith("_head"):
        keep[1, 0] = False
    mask = keep if kind.startswith("bool") else torch.zeros(keep.shape).masked_fill(~keep, -math.inf)
    if kind == "additive_column":                          # (Nq, 1): rows 1 and 3 see nothing
        mask = torch.zeros(Nq, 1)
        mask[1] = mask[3] = -math.inf
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with config.override(backend=backend), poisoned_allocations():
        o = tilestack.attention(*leaves, attn_mask=mask)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*ref, attn_mask=mask if mask.dtype == torch.bool else mask.double())
    assert not o.isnan().any(), f"{kind}: NaN in the output"
    torch.testing.assert_close(o.double(), want.detach().nan_to_num(0.0), rtol=1e-5, atol=1e-5)
    do = randn(rng, *o.shape)
    with config.override(backend=backend), poisoned_allocations():
        o.backward(do)
    want.backward(do.double())
    for name, got, r in zip("qkv", leaves, ref, strict=True):
        assert not got.grad.isnan().any(), f"{kind}: NaN in d{name}"
        torch.testing.assert_close(got.grad.double(), r.grad.nan_to_num(0.0), rtol=1e-4, atol=1e-4,
                                   msg=lambda m, name=name: f"{kind}: d{name}: {m}")


# ---- empty dims in every position, with gradients ------------------------------------------------------------------
def _empty_cases():
    z = []
    for shape in ((0, 8), (3, 0, 8), (0, 0, 8), (2, 3, 0)):
        z.append(("rms_norm", shape))
        z.append(("add_layer_norm", shape))
    for shape in ((0, 8), (3, 0, 8), (4, 0)):
        z.append(("swiglu", shape))
    for q, kv in (((0, 2, 3, 8), (0, 2, 4, 8)), ((1, 0, 3, 8), (1, 0, 4, 8)), ((1, 2, 0, 8), (1, 2, 4, 8)),
                  ((1, 2, 3, 8), (1, 2, 0, 8)), ((1, 4, 3, 8), (1, 2, 0, 8))):
        z.append(("attention", (q, kv)))
    for t, d in ((0, 8), (3, 0), (0, 0)):
        z.append(("fused_linear_cross_entropy", (t, d)))
    return z


EMPTY = _empty_cases()


@pytest.mark.parametrize("case", range(len(EMPTY)), ids=[f"{op}-{s}" for op, s in EMPTY])
def test_empty_dims_answer_as_float64_with_gradients(case):
    """Zero-size dims anywhere: the results and every gradient have the inputs' shapes and float64 torch's values (an
    empty softmax over Nk = 0 keys gives zero rows, as torch's SDPA; an empty batch for the cross-entropy a NaN mean
    and zero gradients; a width of 0 in a norm, an empty result)."""
    op, shape = EMPTY[case]
    rng = rng_for(5, case)
    with config.override(backend="triton" if case % 3 == 0 else "reference"), poisoned_allocations():
        if op == "attention":
            (qs, kvs) = shape
            q, k, v = (randn(rng, *s).requires_grad_() for s in (qs, kvs, kvs))
            got = tilestack.attention(q, k, v)
            ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
            want = F.scaled_dot_product_attention(*ref, enable_gqa=True)
            leaves = (q, k, v)
        elif op == "fused_linear_cross_entropy":
            t, d = shape
            x, lm = randn(rng, t, d).requires_grad_(), randn(rng, 5, d).requires_grad_()
            labels = torch.from_numpy(rng.integers(0, 5, t))
            got = ops.fused_linear_cross_entropy(x, lm, labels)
            ref = [x.detach().double().requires_grad_(), lm.detach().double().requires_grad_()]
            want = F.cross_entropy(ref[0] @ ref[1].t(), labels)
            leaves = (x, lm)
        else:
            x = randn(rng, *shape).requires_grad_()
            n = shape[-1]
            if op == "swiglu":
                got = ops.swiglu(x)
                ref = [x.detach().double().requires_grad_()]
                want = F.silu(ref[0][..., :n // 2]) * ref[0][..., n // 2:]
                leaves = (x,)
            elif op == "rms_norm":
                w = (randn(rng, n) + 2).requires_grad_()
                got = ops.rms_norm(x, w)
                ref = [x.detach().double().requires_grad_(), w.detach().double().requires_grad_()]
                want = F.rms_norm(ref[0], (n,), ref[1], 1e-6)
                leaves = (x, w)
            else:
                r, w, b = randn(rng, *shape).requires_grad_(), randn(rng, n).requires_grad_(), randn(rng, n)
                b.requires_grad_()
                got, h = ops.add_layer_norm(x, r, w, b)
                ref = [t.detach().double().requires_grad_() for t in (x, r, w, b)]
                want = F.layer_norm(ref[0] + ref[1], (n,), ref[2], ref[3], 1e-5)
                leaves = (x, r, w, b)
                got = got + 0 * h.sum()
    assert got.shape == want.shape, f"{op} {shape}: shape {tuple(got.shape)}; expected {tuple(want.shape)}"
    torch.testing.assert_close(got.double(), want.detach(), equal_nan=True, rtol=1e-5, atol=1e-5)
    dy = randn(rng, *got.shape)
    with config.override(backend="reference"), poisoned_allocations():
        got.backward(dy)
    want.backward(dy.double())
    for k, (leaf, r) in enumerate(zip(leaves, ref, strict=True)):
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape, f"{op} {shape}: gradient {k}"
        torch.testing.assert_close(leaf.grad.double(), r.grad.nan_to_num(0.0) if r.grad is not None else
                                   torch.zeros_like(r), rtol=1e-5, atol=1e-5)


# ---- scalar arguments out of range ---------------------------------------------------------------------------------
BAD_SCALARS = [
    ("attention", "scale", float("nan")), ("attention", "scale", -1.0), ("attention", "scale", 0.0),
    ("attention", "scale", math.inf), ("attention", "dropout_p", -0.1), ("attention", "dropout_p", 1.5),
    ("attention", "dropout_p", float("nan")), ("attention", "causal_align", "left"),
    ("rms_norm", "eps", -1e-6), ("rms_norm", "eps", float("nan")), ("layer_norm", "eps", -1.0),
    ("add_rms_norm", "eps", float("nan")), ("add_layer_norm", "eps", -math.inf),
    ("fused_linear_cross_entropy", "ignore_index", 1.5), ("fused_linear_cross_entropy", "labels", 10),
    ("fused_linear_cross_entropy", "labels", -1),
]


@pytest.mark.parametrize("op,arg,value", BAD_SCALARS, ids=[f"{o}-{a}-{v}" for o, a, v in BAD_SCALARS])
def test_a_scalar_out_of_range_is_refused_by_name_before_any_work(op, arg, value, monkeypatch):
    """A LaunchError naming the argument, raised before any kernel launches (the launcher is made to fail loudly
    if reached)."""
    rng = rng_for(6)
    x, w, b, r = randn(rng, 4, 8), randn(rng, 8), randn(rng, 8), randn(rng, 4, 8)
    q, k, v = randn(rng, 1, 2, 3, 8), randn(rng, 1, 2, 5, 8), randn(rng, 1, 2, 5, 8)
    lm, labels = randn(rng, 10, 8), torch.tensor([0, 1, 2, 3])
    kernel_module = importlib.import_module("tilestack.lang.kernel")

    def launched(*args, **kwargs):
        raise AssertionError(f"{op}: a kernel launched before {arg}={value!r} was refused")
    monkeypatch.setattr(kernel_module.Kernel, "launcher_for", launched, raising=False)
    with pytest.raises(LaunchError, match=arg):
        if op == "attention":
            tilestack.attention(q, k, v, causal=arg == "causal_align", **{arg: value})
        elif op == "fused_linear_cross_entropy":
            if arg == "labels":
                labels = labels.clone()
                labels[2] = value
                ops.fused_linear_cross_entropy(x, lm, labels)
            else:
                ops.fused_linear_cross_entropy(x, lm, labels, ignore_index=value)
        else:
            args = {"rms_norm": (x, w), "layer_norm": (x, w, b), "add_rms_norm": (x, r, w),
                    "add_layer_norm": (x, r, w, b)}[op]
            getattr(ops, op)(*args, eps=value)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cross_entropy_with_every_row_ignored_is_torchs_nan_and_zero_gradients(backend):
    """Every label ignore_index (the default, or one inside 0..V-1): a NaN mean as float64 torch, and zero
    gradients for x and weight, NaN nowhere in them."""
    rng = rng_for(7)
    x, lm = randn(rng, 4, 8).requires_grad_(), randn(rng, 10, 8).requires_grad_()
    for labels, ignore in ((torch.full((4,), -100), -100), (torch.full((4,), 3, dtype=torch.int32), 3)):
        x.grad = lm.grad = None
        with config.override(backend=backend), poisoned_allocations():
            loss = ops.fused_linear_cross_entropy(x, lm, labels, ignore_index=ignore)
            loss.backward()
        ref = [x.detach().double().requires_grad_(), lm.detach().double().requires_grad_()]
        want = F.cross_entropy(ref[0] @ ref[1].t(), labels.long(), ignore_index=ignore)
        want.backward()
        assert loss.isnan() and want.isnan()
        for got, r in ((x.grad, ref[0].grad), (lm.grad, ref[1].grad)):
            assert torch.equal(got.double(), r.nan_to_num(0.0)), "gradients of an all-ignored batch"
