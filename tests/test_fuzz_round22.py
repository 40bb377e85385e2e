"""Fuzz round twenty-two, part one: the public ops' results modified in place before the backward (``y.mul_(2)``,
``F.relu(y, inplace=True)``: a model's in-place activation or scaling after a norm or SwiGLU), on both paths (the
eager autograd Functions and the ``tilestack::`` ops that torch.compile, tensor subclasses and torch.func reach),
against float64 torch doing the same; an in-place change of a tensor the backward needs refused as torch refuses
it; inputs that alias each other (one tensor as q, k and v, as x and r, as x and the vocabulary's weight); and a
backward run twice through a retained graph. CPU backends (the NumPy reference executor); every result starts as
NaN (``poisoned_allocations``).

What this round found (the test failed before its fix):
- ``rms_norm``, ``layer_norm``, ``add_rms_norm``, ``add_layer_norm`` and ``swiglu`` returned views (of the kernels'
  (rows, N) results, viewed to the caller's shape) made inside an autograd Function, which autograd forbids to
  modify in place: ``y = ops.rms_norm(x, w); y.mul_(2)`` raised "Output 0 of _Norm is a view and is being modified
  inplace" where torch's F.rms_norm answers (a 2-D x too). Same through the ``tilestack::`` ops. The results are
  tensors of their own now (``detach`` of the view in the Functions' forward: the same memory and version counter,
  so a change of a saved output, add_*_norm's h, is still caught at the backward).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tilestack
from test_fuzz_round22_more import close  # (NaN and infinities exactly where float64 torch has them)
from tilestack import config
from tilestack.kernels import rotary_tables
from tilestack.testing.fuzz.outcomes import poisoned_allocations
from tilestack.torch import ops


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(2200 + seed)


def randn(seed: int, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=torch.float64).to(dtype)


COS, SIN = rotary_tables(3, 16)


def rotate64(t):
    h = t.shape[-1] // 2
    c, s = COS.double()[None, :, None], SIN.double()[None, :, None]
    return torch.cat((t[..., :h] * c - t[..., h:] * s, t[..., h:] * c + t[..., :h] * s), -1)


# op -> (input shapes, tilestack's eager call, the same through the tilestack:: op, float64 torch); each returns the
# outputs as a tuple, the one modified in place first
def _cases():
    return {
        "rms_norm": ([(2, 3, 8), (8,)], lambda x, w: (ops.rms_norm(x, w),),
                     lambda x, w: (torch.ops.tilestack.rms_norm_fwd(x, w, 1e-6)[0],),
                     lambda x, w: (F.rms_norm(x, (8,), w, 1e-6),)),
        "rms_norm 2-D": ([(5, 8), (8,)], lambda x, w: (ops.rms_norm(x, w),),
                         lambda x, w: (torch.ops.tilestack.rms_norm_fwd(x, w, 1e-6)[0],),
                         lambda x, w: (F.rms_norm(x, (8,), w, 1e-6),)),
        "layer_norm": ([(2, 3, 8), (8,), (8,)], lambda x, w, b: (ops.layer_norm(x, w, b),),
                       lambda x, w, b: (torch.ops.tilestack.layer_norm_fwd(x, w, b, 1e-5)[0],),
                       lambda x, w, b: (F.layer_norm(x, (8,), w, b, 1e-5),)),
        "add_rms_norm": ([(2, 3, 8), (2, 3, 8), (8,)], lambda x, r, w: ops.add_rms_norm(x, r, w),
                         lambda x, r, w: torch.ops.tilestack.add_rms_norm_fwd(x, r, w, 1e-6)[:2],
                         lambda x, r, w: (F.rms_norm(x + r, (8,), w, 1e-6), x + r)),
        "add_layer_norm": ([(2, 3, 8), (2, 3, 8), (8,), (8,)], lambda x, r, w, b: ops.add_layer_norm(x, r, w, b),
                           lambda x, r, w, b: torch.ops.tilestack.add_layer_norm_fwd(x, r, w, b, 1e-5)[:2],
                           lambda x, r, w, b: (F.layer_norm(x + r, (8,), w, b, 1e-5), x + r)),
        "swiglu": ([(2, 3, 8)], lambda x: (ops.swiglu(x),), lambda x: (torch.ops.tilestack.swiglu_fwd(x),),
                   lambda x: (F.silu(x[..., :4]) * x[..., 4:],)),
        "rotary": ([(1, 3, 2, 16), (1, 3, 1, 16)], lambda q, k: ops.rotary(q, k, COS, SIN),
                   lambda q, k: torch.ops.tilestack.rotary(q, k, COS, SIN, False),
                   lambda q, k: (rotate64(q), rotate64(k))),
    }


INPLACE = {"mul_": lambda y: y.mul_(2.5), "relu_": lambda y: F.relu(y, inplace=True),
           "view add_": lambda y: y.view(-1)[::3].add_(1.0)}
CASES = [(op, path, change) for op in _cases() for path in ("eager", "op") for change in INPLACE]


@pytest.mark.parametrize("op,path,change", CASES, ids=[f"{o}-{p}-{c}" for o, p, c in CASES])
def test_results_modified_in_place_before_the_backward(op, path, change):
    shapes, eager, via_op, ref_fn = _cases()[op]
    fn = eager if path == "eager" else via_op
    inputs = [randn(i + 10 * len(op), *s) for i, s in enumerate(shapes)]
    leaves = [t.clone().requires_grad_() for t in inputs]
    ref = [t.double().requires_grad_() for t in inputs]
    with config.override(backend="reference"), poisoned_allocations():
        got = fn(*leaves)
        INPLACE[change](got[0])
        sum((o * o).sum() for o in got).backward()
    want = ref_fn(*ref)
    INPLACE[change](want[0])
    sum((o * o).sum() for o in want).backward()
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        close(g, w, 2e-5, f"{op} {path} output {k}")
    for k, (leaf, r) in enumerate(zip(leaves, ref, strict=True)):
        close(leaf.grad, r.grad, 2e-5, f"{op} {path} gradient {k}")


@pytest.mark.parametrize("name", ["add_rms_norm", "add_layer_norm", "rms_norm", "swiglu"])
def test_changing_a_tensor_the_backward_reads_is_refused_as_torch_refuses_it(name):
    """add_*_norm's backward reads h (returned and saved); the plain norms and swiglu read their input: an in-place
    change of either before the backward raises torch's version-counter RuntimeError, never a silent wrong
    gradient."""
    x = randn(1, 2, 3, 8).requires_grad_()
    w, b = randn(2, 8).requires_grad_(), randn(3, 8)
    with config.override(backend="reference"):
        if name.startswith("add_"):
            args = (x, randn(4, 2, 3, 8), w) + ((b,) if "layer" in name else ())
            y, h = getattr(ops, name)(*args)
            h.mul_(2)                                  # the residual stream changed in place
        else:
            x2 = x * 1
            y = ops.swiglu(x2) if name == "swiglu" else ops.rms_norm(x2, w)
            x2.add_(1)                                 # the saved input changed in place
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_results_under_no_grad_and_inference_mode_may_be_changed_in_place():
    x, r, w, b = randn(1, 2, 3, 8), randn(2, 2, 3, 8), randn(3, 8), randn(4, 8)
    for mode in (torch.no_grad, torch.inference_mode):
        with config.override(backend="reference"), poisoned_allocations(), mode():
            y, h = ops.add_layer_norm(x, r, w, b)
            y.mul_(2)
            h.add_(1)
            s = ops.swiglu(x)
            s.relu_()
        close(y, 2 * F.layer_norm((x + r).double(), (8,), w.double(), b.double(), 1e-5), 2e-5, f"{mode} y")
        close(h, (x + r).double() + 1, 2e-6, f"{mode} h")
        close(s, F.relu(F.silu(x.double()[..., :4]) * x.double()[..., 4:]), 2e-6, f"{mode} swiglu")


# ---- inputs aliasing each other ----------------------------------------------------------------------------------
def test_one_tensor_as_several_inputs_sums_its_gradients():
    """q = k = v, x = r, rotary's q = k, and the cross-entropy's x as its own vocabulary (T = V): each gradient
    is the sum over the roles, as float64 torch's."""
    q = randn(30, 1, 2, 5, 8)
    x = randn(31, 5, 8)
    w = randn(32, 8)
    labels = torch.tensor([0, 4, -100, 2, 2])
    qr = randn(33, 1, 3, 2, 16)
    cases = {
        "attention q=k=v": (q, lambda t: tilestack.attention(t, t, t, causal=True),
                            lambda t: F.scaled_dot_product_attention(t, t, t, is_causal=True)),
        "add_rms_norm x=r": (x, lambda t: ops.add_rms_norm(t, t, w),
                             lambda t: (F.rms_norm(t + t, (8,), w.double(), 1e-6), t + t)),
        "rotary q=k": (qr, lambda t: ops.rotary(t, t, COS, SIN), lambda t: (rotate64(t), rotate64(t))),
        "cross-entropy x=weight": (x, lambda t: ops.fused_linear_cross_entropy(t, t, labels),
                                   lambda t: F.cross_entropy(t @ t.T, labels)),
    }
    for name, (t, fn, ref_fn) in cases.items():
        leaf, ref = t.clone().requires_grad_(), t.double().requires_grad_()
        with config.override(backend="reference"), poisoned_allocations():
            got = fn(leaf)
            got = got if isinstance(got, tuple) else (got,)
            sum((o * o.detach().sin()).sum() for o in got).backward()
        want = ref_fn(ref)
        want = want if isinstance(want, tuple) else (want,)
        sum((o * o.detach().sin()).sum() for o in want).backward()
        for k, (g, wv) in enumerate(zip(got, want, strict=True)):
            close(g, wv, 2e-5, f"{name} output {k}")
        close(leaf.grad, ref.grad, 2e-5, f"{name} gradient")


@pytest.mark.parametrize("op", ["add_layer_norm", "swiglu", "attention", "fused_linear_cross_entropy", "rotary"])
def test_a_retained_graph_backward_twice_doubles_the_gradients(op):
    x, r = randn(40, 2, 3, 16), randn(41, 2, 3, 16)
    w, b = randn(42, 16), randn(43, 16)
    lm, labels = randn(44, 5, 16), torch.tensor([0, 4, -100, 2, 1, 3])
    fns = {"add_layer_norm": lambda t: ops.add_layer_norm(t, r, w, b),
           "swiglu": lambda t: ops.swiglu(t),
           "attention": lambda t: tilestack.attention(t[None], t[None], t[None]),
           "fused_linear_cross_entropy": lambda t: ops.fused_linear_cross_entropy(t.reshape(6, 16), lm, labels),
           "rotary": lambda t: ops.rotary(t.transpose(0, 1)[None], t[:1].transpose(0, 1)[None],   # (1, 3, 2|1, 16)
                                          *rotary_tables(3, 16))}
    leaf = x.clone().requires_grad_()
    with config.override(backend="reference"), poisoned_allocations():
        out = fns[op](leaf)
        out = out if isinstance(out, tuple) else (out,)
        loss = sum((o * o).sum() for o in out)
        loss.backward(retain_graph=True)
        once = leaf.grad.clone()
        loss.backward()
    assert once.isfinite().all() and once.abs().max() > 0, f"{op}: first gradient"
    close(leaf.grad, 2 * once, 1e-6, f"{op} second backward")
