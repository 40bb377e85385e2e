"""tilestack.torch.ops (rms_norm, layer_norm, rotary, swiglu, fused_linear_cross_entropy) as PyTorch ops:
values and gradients against float64 torch through both paths (the eager autograd.Function and the custom op
that torch.compile sees), torch.library.opcheck of every custom op, torch.compile(fullgraph=True) without a
graph break, and bad inputs refused with a LaunchError. The kernels run on the backend the knob names."""

import math

import pytest
import torch
import torch.nn.functional as F

from tilestack import config
from tilestack.errors import LaunchError
from tilestack.kernels import rotary_tables
from tilestack.torch import ops

BACKENDS = ("reference", "triton")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not bool(got.isfinite().all()):
        return math.inf
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _rope64(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos.double()[None, :, None, :], sin.double()[None, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def _rms64(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def cases(rng, dtype):
    """name -> (op, custom-op call, float64 reference, differentiable inputs, other arguments)."""
    def t(*shape, std=1.0, loc=0.0):
        return torch.from_numpy(rng.normal(loc, std, shape)).to(dtype).requires_grad_()

    cos, sin = rotary_tables(5, 16)
    labels = torch.from_numpy(rng.integers(0, 37, 9))
    labels[4] = -100
    return {
        "rms_norm": (ops.rms_norm, lambda x, w: ops.rms_norm_fwd_op(x, w, 1e-6)[0],
                     _rms64,
                     (t(2, 3, 40, loc=1.0), t(40, loc=1.0)), ()),
        "layer_norm": (ops.layer_norm, lambda x, w, b: ops.layer_norm_fwd_op(x, w, b, 1e-5)[0],
                       lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-5),
                       (t(2, 3, 40, loc=2.0), t(40, loc=1.0), t(40)), ()),
        "add_rms_norm": (ops.add_rms_norm, lambda x, r, w: ops.add_rms_norm_fwd_op(x, r, w, 1e-6)[:2],
                         lambda x, r, w: (_rms64(x + r, w), x + r),
                         (t(2, 3, 40, loc=1.0), t(2, 3, 40), t(40, loc=1.0)), ()),
        "add_layer_norm": (ops.add_layer_norm, lambda x, r, w, b: ops.add_layer_norm_fwd_op(x, r, w, b, 1e-5)[:2],
                           lambda x, r, w, b: (F.layer_norm(x + r, x.shape[-1:], w, b, 1e-5), x + r),
                           (t(2, 3, 40, loc=2.0), t(2, 3, 40), t(40, loc=1.0), t(40)), ()),
        "swiglu": (ops.swiglu, ops.swiglu_fwd_op, lambda x: F.silu(x[..., :20]) * x[..., 20:], (t(2, 3, 40),), ()),
        "rotary": (lambda q, k: ops.rotary(q, k, cos, sin), lambda q, k: ops.rotary_op(q, k, cos, sin, False),
                   lambda q, k: (_rope64(q, cos, sin), _rope64(k, cos, sin)), (t(2, 5, 4, 16), t(2, 5, 2, 16)), ()),
        "cross_entropy": (lambda x, w: ops.fused_linear_cross_entropy(x, w, labels),
                          lambda x, w: ops.fused_linear_cross_entropy_op(x, w, labels, -100)[0],
                          lambda x, w: F.cross_entropy(x @ w.T, labels), (t(9, 16, std=0.3), t(37, 16)), ()),
    }


NAMES = ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm", "swiglu", "rotary", "cross_entropy")


def _outputs(y):
    return y if isinstance(y, tuple) else (y,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["eager", "custom_op"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_op_values_and_gradients_match_float64(name, dtype, path, backend, rng):
    op, custom, ref, inputs, _ = cases(rng, dtype)[name]
    fn = op if path == "eager" else custom
    with config.override(backend=backend):
        got = _outputs(fn(*inputs))
    want = _outputs(ref(*(x.detach().double().requires_grad_() for x in inputs)))
    grads_out = [torch.from_numpy(rng.normal(0.0, 1.0, tuple(g.shape))) for g in got]
    with config.override(backend=backend):
        grads = torch.autograd.grad(got, inputs, [g.to(x.dtype) for g, x in zip(grads_out, got, strict=True)])
    ins64 = [x.detach().double().requires_grad_() for x in inputs]
    want = _outputs(ref(*ins64))
    grads64 = torch.autograd.grad(want, ins64, grads_out)
    tol = TOL[dtype]
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == (torch.float32 if name == "cross_entropy" else dtype)
        assert rel(g, w) <= tol
    for g, w, x in zip(grads, grads64, inputs, strict=True):
        assert g.shape == x.shape and g.dtype == x.dtype
        assert rel(g, w) <= tol


@pytest.mark.parametrize("name", NAMES)
def test_no_grad_path_gives_the_same_values(name, rng):
    op, _, ref, inputs, _ = cases(rng, torch.float32)[name]
    with torch.no_grad(), config.override(backend="reference"):
        got = _outputs(op(*inputs))
    want = _outputs(ref(*(x.detach().double() for x in inputs)))
    for g, w in zip(got, want, strict=True):
        assert not g.requires_grad and rel(g, w) <= 1e-5


def test_rotary_outputs_are_contiguous(rng):
    q = torch.from_numpy(rng.normal(0, 1, (2, 5, 4, 16))).float()
    k = torch.from_numpy(rng.normal(0, 1, (2, 5, 2, 16))).float()
    cos, sin = rotary_tables(5, 16)
    for qr, kr in (ops.rotary(q, k, cos, sin), ops.rotary_op(q, k, cos, sin, False)):
        assert qr.shape == q.shape and qr.is_contiguous() and kr.shape == k.shape and kr.is_contiguous()


OPCHECKS = {
    "rms_norm_fwd": lambda r: (ops.rms_norm_fwd_op, (r(3, 4, 32), r(32), 1e-6)),
    "rms_norm_bwd": lambda r: (ops.rms_norm_bwd_op, (r(3, 32), r(3, 32), r(32), r(3).abs(), None)),
    "rms_norm_bwd_dh": lambda r: (ops.rms_norm_bwd_op, (r(3, 32), r(3, 32), r(32), r(3).abs(), r(3, 32))),
    "add_rms_norm_fwd": lambda r: (ops.add_rms_norm_fwd_op, (r(3, 4, 32), r(3, 4, 32), r(32), 1e-6)),
    "layer_norm_fwd": lambda r: (ops.layer_norm_fwd_op, (r(3, 4, 32), r(32), r(32), 1e-5)),
    "layer_norm_bwd": lambda r: (ops.layer_norm_bwd_op, (r(3, 32), r(3, 32), r(32), r(3), r(3).abs(), None)),
    "layer_norm_bwd_dh": lambda r: (ops.layer_norm_bwd_op, (r(3, 32), r(3, 32), r(32), r(3), r(3).abs(),
                                                           r(3, 32))),
    "add_layer_norm_fwd": lambda r: (ops.add_layer_norm_fwd_op, (r(3, 4, 32), r(3, 4, 32), r(32), r(32), 1e-5)),
    "rotary": lambda r: (ops.rotary_op, (r(1, 3, 2, 16), r(1, 3, 1, 16), *rotary_tables(3, 16), False)),
    "swiglu_fwd": lambda r: (ops.swiglu_fwd_op, (r(3, 4, 32),)),
    "swiglu_bwd": lambda r: (ops.swiglu_bwd_op, (r(3, 4, 16), r(3, 4, 32))),
    "fused_linear_cross_entropy": lambda r: (ops.fused_linear_cross_entropy_op,
                                             (r(6, 16), r(21, 16), torch.tensor([0, 5, -100, 20, 3, 3]), -100)),
}


@pytest.mark.parametrize("name", list(OPCHECKS))
def test_opcheck(name, rng):
    def r(*shape):   # the backward ops have no derivative of their own: their inputs need none
        return torch.from_numpy(rng.normal(0.0, 1.0, shape)).float().requires_grad_("_bwd" not in name)

    op, args = OPCHECKS[name](r)
    with config.override(backend="reference"):
        torch.library.opcheck(op, args)


def test_compile_fullgraph_keeps_every_op_in_the_graph(rng):
    """A small Llama-like block through torch.compile(fullgraph=True): no graph break, the eager values."""
    def t(*shape):
        return torch.from_numpy(rng.normal(0.0, 1.0, shape)).float().requires_grad_()

    x, w, gu_w, head, b = t(2, 5, 32), t(32), t(64, 32), t(37, 32), t(32)
    cos, sin = rotary_tables(5, 16)
    labels = torch.from_numpy(rng.integers(0, 37, 10))

    def block(x, w, gu_w, head, b):
        h = ops.rms_norm(x, w)
        h = ops.layer_norm(h, w, b)
        h, s = ops.add_rms_norm(h, x, w)
        h, s = ops.add_layer_norm(s, h, w, b)
        q, k = ops.rotary(h.view(2, 5, 2, 16), h.view(2, 5, 2, 16), cos, sin)
        h = h + q.reshape(2, 5, 32) * k.reshape(2, 5, 32)
        h = ops.swiglu(h @ gu_w.T)
        return ops.fused_linear_cross_entropy((h + s).reshape(10, 32), head, labels)

    with config.override(backend="reference"):
        want = block(x, w, gu_w, head, b)
        gwant = torch.autograd.grad(want, (x, w, gu_w, head, b))
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        got = compiled(x, w, gu_w, head, b)
        ggot = torch.autograd.grad(got, (x, w, gu_w, head, b))
    assert abs(float(got) - float(want)) <= 1e-6
    for g, e in zip(ggot, gwant, strict=True):
        assert rel(g, e) <= 1e-6


@pytest.mark.parametrize("call,match", [
    (lambda: ops.rms_norm(torch.ones(2, 4), torch.ones(3)), "weight has 3 elements"),
    (lambda: ops.rms_norm(torch.tensor(1.0), torch.ones(1)), "at least one dim"),
    (lambda: ops.layer_norm(torch.ones(2, 4), torch.ones(4), torch.ones(4).half()), "bias has dtype float16"),
    (lambda: ops.add_rms_norm(torch.ones(2, 4), torch.ones(3, 4), torch.ones(4)), "r is \\(3, 4\\)"),
    (lambda: ops.add_layer_norm(torch.ones(2, 4), torch.ones(2, 4).half(), torch.ones(4), torch.ones(4)),
     "r has dtype float16"),
    (lambda: ops.swiglu(torch.ones(2, 5)), "last dim is even"),
    (lambda: ops.swiglu(torch.ones(2, 4, dtype=torch.int64)), "dtype torch.int64"),
    (lambda: ops.rotary(torch.ones(1, 3, 2, 16), torch.ones(1, 3, 2, 32), *rotary_tables(3, 16)), "k is"),
    (lambda: ops.fused_linear_cross_entropy(torch.ones(3, 4), torch.ones(5, 4), torch.zeros(2, dtype=torch.long)),
     "labels has 2 elements"),
], ids=["rms-weight", "rms-0d", "ln-bias-dtype", "add-r-shape", "add-r-dtype", "swiglu-odd", "swiglu-dtype",
        "rotary-k", "ce-labels"])
def test_bad_inputs_are_launch_errors(call, match):
    with pytest.raises(LaunchError, match=match):
        call()


@pytest.mark.parametrize("name", ["layer_norm", "add_rms_norm"])
def test_eager_norm_backward_takes_any_gradient_layout(name, rng):
    """The eager norms plan their backward per gradient layout (strides, dtype, alignment) under the forward's
    plan: a transposed-strided gradient after a contiguous one (and the reverse) each get a right answer, and
    one forward signature keeps one plan."""
    x0 = torch.from_numpy(rng.normal(1.0, 1.0, (6, 40))).float()
    r0 = torch.from_numpy(rng.normal(0.0, 1.0, (6, 40))).float()
    w0 = torch.from_numpy(rng.normal(1.0, 0.1, 40)).float()
    b0 = torch.from_numpy(rng.normal(0.0, 0.1, 40)).float()
    g = torch.from_numpy(rng.normal(0.0, 1.0, (6, 40))).float()
    layouts = [g, g.t().contiguous().t(), g]                  # contiguous, column-major, contiguous again
    ops._norm_plans.plans.clear()
    with config.override(backend="reference"):
        for dy in layouts:
            x, r, w, b = (t.clone().requires_grad_() for t in (x0, r0, w0, b0))
            x64, r64, w64, b64 = (t.double().requires_grad_() for t in (x0, r0, w0, b0))
            if name == "layer_norm":
                ins, ins64 = (x, w, b), (x64, w64, b64)
                y, y64 = ops.layer_norm(x, w, b), F.layer_norm(x64, (40,), w64, b64, 1e-5)
            else:
                ins, ins64 = (x, r, w), (x64, r64, w64)
                y, y64 = ops.add_rms_norm(x, r, w)[0], _rms64(x64 + r64, w64)
            got = torch.autograd.grad(y, ins, dy)
            want = torch.autograd.grad(y64, ins64, dy.double())
            for a, e in zip(got, want, strict=True):
                assert rel(a, e) < 1e-5
    assert len(ops._norm_plans.plans) == 1
    plan = next(iter(ops._norm_plans.plans.values()))
    assert len(plan._backward) == 2                           # the two layouts, each planned once
