"""Fuzz round twenty-three, part one: the public ops on inputs of every layout, forward and backward, against float64
torch: views whose rows overlap (``as_strided``: read correctly, their gradients summed into the shared elements by
autograd), storage offsets, zero-stride ``expand`` views, transposed last two dims, channels-last 4-D tensors;
incoming gradients of unusual layouts (a ``torch.cat``'s narrowed views, transposed, zero-stride, flipped); results
left unused (their inputs' gradients None exactly where torch's are None); long ragged rows (4099) holding -inf,
+inf, NaN and values at the dtype's limits; subnormal rows. CPU backends (the NumPy reference executor, and Triton's
interpreter where named); every result starts as NaN (``poisoned_allocations``).

What this round found (the test failed before its fix):
- ``tilestack.kernels.softmax`` of a row wider than one tile (the CPU's multi-pass path, and a GPU's for rows past
  16384) whose first tile was all -inf (a row masked over its first BN columns) was NaN everywhere, where torch's
  softmax is finite: the running max started at -inf, so the first tile's rescale was exp2(-inf + inf) = NaN. The
  running max now starts at the lowest finite f32 (as attention's does for rows that may see no key).
- ``add_rms_norm`` / ``add_layer_norm`` with y unused (only the residual stream h read) gave the weight and bias a
  zero gradient where torch's ``x + r`` then ``norm(h)`` gives None; ``rotary`` with one result unused gave its input
  a zero gradient where torch's two separate rotations give None. The eager backwards and those of the
  ``tilestack::`` ops now take an unused result's gradient as None (``set_materialize_grads(False)``) and give None
  for what only it reaches (torch.func.grad still reads such an input's gradient as zeros, as for torch's own ops).
  Round 21's "first output only" check, which asked for a gradient of rotary's k there, now asks for None, as torch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tilestack
import tilestack.kernels as K
from test_fuzz_round22_more import close  # (NaN and infinities exactly where float64 torch has them)
from tilestack import config
from tilestack.kernels import rotary_tables
from tilestack.testing.fuzz.outcomes import poisoned_allocations
from tilestack.torch import ops


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(2300 + seed)


def randn(seed: int, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=torch.float64).to(dtype)


COS, SIN = rotary_tables(4, 16)


def rotate64(t):
    h = t.shape[-1] // 2
    c, s = COS.double()[None, :, None], SIN.double()[None, :, None]
    return torch.cat((t[..., :h] * c - t[..., h:] * s, t[..., h:] * c + t[..., :h] * s), -1)


W8, B8 = randn(1, 8), randn(2, 8)

# op -> (tilestack's call, float64 torch's, the trailing shape its inputs take); each gives one tensor
OPS = {
    "rms_norm": (lambda x: ops.rms_norm(x, W8), lambda x: F.rms_norm(x, (8,), W8.double(), 1e-6)),
    "layer_norm": (lambda x: ops.layer_norm(x, W8, B8),
                   lambda x: F.layer_norm(x, (8,), W8.double(), B8.double(), 1e-5)),
    "add_rms_norm": (lambda x: ops.add_rms_norm(x, x.flip(-1), W8)[0],
                     lambda x: F.rms_norm(x + x.flip(-1), (8,), W8.double(), 1e-6)),
    "add_layer_norm": (lambda x: ops.add_layer_norm(x.flip(-1), x, W8, B8)[1] * 2 + ops.add_layer_norm(x, x, W8, B8)[0],
                       lambda x: (x.flip(-1) + x) * 2 + F.layer_norm(2 * x, (8,), W8.double(), B8.double(), 1e-5)),
    "swiglu": (lambda x: ops.swiglu(x), lambda x: F.silu(x[..., :4]) * x[..., 4:]),
    "attention": (lambda x: tilestack.attention(x, x.flip(-2), x, causal=True),
                  lambda x: F.scaled_dot_product_attention(x, x.flip(-2), x, is_causal=True)),
}


def _views() -> dict:
    """Views of a 1-D base (256 elements), of shape (2, 4, 8) (channels-last: (2, 2, 2, 8)); each a function of the
    base, so that autograd carries the gradient back into it (overlapping elements summed)."""
    return {
        "overlapping rows": lambda b: b.as_strided((2, 4, 8), (16, 4, 1)),            # rows share 4 elements
        "overlapping everything": lambda b: b.as_strided((2, 4, 8), (1, 1, 1), 7),
        "storage offset": lambda b: b[37:37 + 64].view(2, 4, 8),
        "transposed": lambda b: b[:64].view(2, 8, 4).transpose(-1, -2),             # strides (32, 1, 4)
        "expanded rows": lambda b: b[:8].expand(2, 4, 8),                           # strides (0, 0, 1)
        "expanded last": lambda b: b[:8].view(2, 4, 1).expand(2, 4, 8),             # strides (4, 1, 0)
        # an NCHW tensor in channels-last memory (N=2, C=2, H=2, W=8): strides (32, 1, 16, 2)
        "channels last": lambda b: b[:64].view(2, 2, 8, 2).permute(0, 3, 1, 2),
    }


LAYOUTS = list(_views())


def _as_attention(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(1) if t.dim() == 3 else t                       # (B, H, N, D)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", list(OPS))
def test_every_input_layout_forward_and_backward(op, layout):
    """The op on a view of a base tensor and its gradient carried back into the base, against float64 torch on the
    same view of a float64 copy of the base (the overlapping views: every element read where it is, the gradient of
    an element shared by rows summed over them, by autograd's as_strided backward)."""
    fn, ref = OPS[op]
    view = _views()[layout]
    shape_for = _as_attention if op == "attention" else (lambda t: t)
    base = randn(10, 256)
    b = base.clone().requires_grad_()
    bd = base.double().requires_grad_()
    with config.override(backend="reference"), poisoned_allocations():
        x = shape_for(view(b))
        y = fn(x)
        g = randn(11, *y.shape)
        y.backward(g)
    xd = shape_for(view(bd))
    yd = ref(xd)
    yd.backward(g.double())
    close(y, yd, 2e-6, f"{op} on {layout}: forward")
    # a row of one repeated value ("expanded last") has a (near) zero spread, and its gradient cancels in f32: to
    # about 4e-6 for the RMS norms and 1.2e-4 for layer norm (rstd = 1 / sqrt(eps)), torch's own f32 alike
    tol = 2e-4 if layout == "expanded last" else 1e-5
    close(b.grad, bd.grad, tol, f"{op} on {layout}: the base's gradient")


def test_rotary_and_cross_entropy_on_overlapping_offset_and_expanded_views():
    """rotary's q an overlapping view (heads share half their elements), k a zero-stride expand, cos/sin strided
    columns of one table; the cross-entropy's x rows expanded from one and weight an offset view of a bigger one."""
    base = randn(20, 400)
    b, bd = base.clone().requires_grad_(), base.double().requires_grad_()
    k1 = randn(21, 1, 4, 1, 16)
    cs = torch.stack((COS, SIN), -1)                                     # (N, D/2, 2): cos and sin interleaved
    with config.override(backend="reference"), poisoned_allocations():
        q = b.as_strided((1, 4, 3, 16), (0, 40, 8, 1), 5)
        qr, kr = ops.rotary(q, k1[0].expand(1, 4, 2, 16), cs[..., 0], cs[..., 1])
        (qr.sin().sum() + kr.sum()).backward()
    qd = bd.as_strided((1, 4, 3, 16), (0, 40, 8, 1), 5)
    (rotate64(qd).sin().sum()).backward()
    close(qr, rotate64(qd), 2e-6, "rotary q overlapping")
    close(kr, rotate64(k1[0].double().expand(1, 4, 2, 16)), 2e-6, "rotary k expanded")
    close(b.grad, bd.grad, 2e-6, "rotary: the base's gradient")

    x1, wbig = randn(22, 1, 8), randn(23, 40, 8)
    labels = torch.tensor([3, -100, 0, 9, 9])
    xl, wl = x1.clone().requires_grad_(), wbig.clone().requires_grad_()
    xd, wd = x1.double().requires_grad_(), wbig.double().requires_grad_()
    with config.override(backend="reference"), poisoned_allocations():
        loss = ops.fused_linear_cross_entropy(xl.expand(5, 8), wl[7:19], labels)
        loss.backward()
    want = F.cross_entropy(xd.expand(5, 8) @ wd[7:19].T, labels)
    want.backward()
    close(loss, want, 2e-6, "cross-entropy on expanded x, offset weight")
    close(xl.grad, xd.grad, 2e-6, "cross-entropy dx summed over the expanded rows")
    close(wl.grad, wd.grad, 2e-6, "cross-entropy dweight (zero outside the view)")


# ---- incoming gradients of unusual layouts -------------------------------------------------------------------------
def _first(y):
    return y[0] if isinstance(y, tuple) else y


UPSTREAM = {
    # torch.cat's backward hands each input a narrowed view of one gradient (an offset, rows not contiguous)
    "cat": lambda y: (torch.cat([y, 2 * y], -1) * torch.arange(2 * y.numel(), dtype=y.dtype).view(
        *y.shape[:-1], 2 * y.shape[-1]).sin()).sum(),
    "transposed": lambda y: (y.transpose(-1, -2).contiguous() * torch.arange(y.numel(), dtype=y.dtype).view(
        *y.shape[:-2], y.shape[-1], y.shape[-2]).cos()).sum(),
    "zero-stride rows": lambda y: (y * torch.arange(y.shape[-1], dtype=y.dtype).sin()).sum(),
    "every other column": lambda y: (y[..., ::2] * 3).sum(),
    "flipped": lambda y: (y.flip(-1) * torch.arange(y.shape[-1], dtype=y.dtype)).sum(),
}

GRAD_OPS = {
    "rms_norm": (lambda x, w: ops.rms_norm(x, w), lambda x, w: F.rms_norm(x, (8,), w, 1e-6), [(3, 5, 8), (8,)]),
    "add_layer_norm": (lambda x, r, w, b: ops.add_layer_norm(x, r, w, b)[0],
                       lambda x, r, w, b: F.layer_norm(x + r, (8,), w, b, 1e-5), [(3, 5, 8), (3, 5, 8), (8,), (8,)]),
    "swiglu": (lambda x: ops.swiglu(x), lambda x: F.silu(x[..., :4]) * x[..., 4:], [(3, 5, 8)]),
    "rotary": (lambda q, k: ops.rotary(q, k, COS, SIN)[0] * 1.0 + ops.rotary(k, k, COS, SIN)[1].mean(-2, keepdim=True),
               lambda q, k: rotate64(q) + rotate64(k).mean(-2, keepdim=True), [(2, 4, 3, 16), (2, 4, 1, 16)]),
    "attention": (lambda q, k, v: tilestack.attention(q, k, v, causal=True, causal_align="bottom_right"),
                  lambda q, k, v: F.scaled_dot_product_attention(
                      q, k.expand(2, 4, 6, 16), v.expand(2, 4, 6, 16),
                      attn_mask=torch.ones(5, 6, dtype=torch.bool).tril(1)), [(2, 4, 5, 16), (2, 1, 6, 16),
                                                                              (2, 1, 6, 16)]),
}


@pytest.mark.parametrize("upstream", list(UPSTREAM))
@pytest.mark.parametrize("op", list(GRAD_OPS))
def test_incoming_gradients_of_unusual_layouts(op, upstream):
    fn, ref, shapes = GRAD_OPS[op]
    inputs = [randn(30 + i, *s) for i, s in enumerate(shapes)]
    got = [t.clone().requires_grad_() for t in inputs]
    want = [t.double().requires_grad_() for t in inputs]
    post = UPSTREAM[upstream]
    with config.override(backend="reference"), poisoned_allocations():
        post(fn(*got)).backward()
    post(ref(*want)).backward()
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        close(g.grad, w.grad, 5e-6, f"{op}, gradient {upstream}: input {i}")


# ---- a result left unused: its inputs' gradients None where torch's are -------------------------------------------
def _grads(ts):
    return [None if t.grad is None else t.grad for t in ts]


UNUSED = {
    # (tilestack's call, float64 torch's, input shapes, which result the loss reads)
    "add_rms_norm h only": (lambda x, r, w: ops.add_rms_norm(x, r, w)[1],
                            lambda x, r, w: (F.rms_norm(x + r, (8,), w, 1e-6), x + r)[1], [(2, 3, 8), (2, 3, 8), (8,)]),
    "add_layer_norm h only": (lambda x, r, w, b: ops.add_layer_norm(x, r, w, b)[1],
                              lambda x, r, w, b: (F.layer_norm(x + r, (8,), w, b, 1e-5), x + r)[1],
                              [(2, 3, 8), (2, 3, 8), (8,), (8,)]),
    "rotary q only": (lambda q, k: ops.rotary(q, k, COS, SIN)[0], lambda q, k: (rotate64(q), rotate64(k))[0],
                      [(1, 4, 2, 16), (1, 4, 1, 16)]),
    "rotary k only": (lambda q, k: ops.rotary(q, k, COS, SIN)[1], lambda q, k: (rotate64(q), rotate64(k))[1],
                      [(1, 4, 2, 16), (1, 4, 1, 16)]),
}


@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "create_graph"])
@pytest.mark.parametrize("case", list(UNUSED))
def test_an_unused_result_leaves_its_inputs_gradient_none(case, create_graph):
    fn, ref, shapes = UNUSED[case]
    inputs = [randn(40 + i, *s) for i, s in enumerate(shapes)]
    got = [t.clone().requires_grad_() for t in inputs]
    want = [t.double().requires_grad_() for t in inputs]
    with config.override(backend="reference"), poisoned_allocations():
        (fn(*got) * randn(50, *fn(*inputs).shape)).sum().backward(create_graph=create_graph)
    (ref(*want) * randn(50, *ref(*[t.double() for t in inputs]).shape).double()).sum().backward()
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert (g.grad is None) == (w.grad is None), \
            f"{case}: input {i}'s gradient is {'None' if g.grad is None else 'a tensor'}; torch's is " \
            f"{'None' if w.grad is None else 'a tensor'}"
        if w.grad is not None:
            close(g.grad, w.grad, 2e-6, f"{case}: input {i}")


OP_UNUSED = {
    # the same through the tilestack:: ops (torch.compile's, tensor subclasses', torch.func's path)
    "add_rms_norm h only": (lambda x, r, w: torch.ops.tilestack.add_rms_norm_fwd(x, r, w, 1e-6)[1],
                            UNUSED["add_rms_norm h only"][1], UNUSED["add_rms_norm h only"][2]),
    "add_layer_norm h only": (lambda x, r, w, b: torch.ops.tilestack.add_layer_norm_fwd(x, r, w, b, 1e-5)[1],
                              UNUSED["add_layer_norm h only"][1], UNUSED["add_layer_norm h only"][2]),
    "rotary q only": (lambda q, k: torch.ops.tilestack.rotary(q, k, COS, SIN, False)[0], UNUSED["rotary q only"][1],
                      UNUSED["rotary q only"][2]),
    "rotary k only": (lambda q, k: torch.ops.tilestack.rotary(q, k, COS, SIN, False)[1], UNUSED["rotary k only"][1],
                      UNUSED["rotary k only"][2]),
}


@pytest.mark.parametrize("case", list(OP_UNUSED))
def test_an_unused_result_of_the_tilestack_ops_leaves_its_inputs_gradient_none(case):
    fn, ref, shapes = OP_UNUSED[case]
    inputs = [randn(45 + i, *s) for i, s in enumerate(shapes)]
    got = [t.clone().requires_grad_() for t in inputs]
    want = [t.double().requires_grad_() for t in inputs]
    g = randn(55, *ref(*[t.double() for t in inputs]).shape)
    with config.override(backend="reference"), poisoned_allocations():
        (fn(*got) * g).sum().backward()
    (ref(*want) * g.double()).sum().backward()
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert (a.grad is None) == (b.grad is None), f"{case} (op): input {i}'s gradient None differs from torch's"
        if b.grad is not None:
            close(a.grad, b.grad, 2e-6, f"{case} (op): input {i}")
    # torch.func.grad of the op with respect to the unused input: zeros, as torch.func gives for torch's own
    unused = next(i for i, b in enumerate(want) if b.grad is None)
    with config.override(backend="reference"):
        zero = torch.func.grad(lambda t: (fn(*[t if j == unused else inputs[j] for j in range(len(inputs))])
                                          * g).sum())(inputs[unused])
    close(zero, torch.zeros_like(inputs[unused]), 0.0, f"{case} (op): torch.func.grad of the unused input")


def test_rotary_with_one_result_unused_under_a_vectorized_jacobian():
    """jacobian(vectorize=True) of rotary's first result alone: batched incoming gradients for q, None for k."""
    from torch.autograd.functional import jacobian

    q, k = randn(60, 1, 4, 1, 16), randn(61, 1, 4, 1, 16)
    with config.override(backend="reference"), poisoned_allocations():
        got = jacobian(lambda q, k: ops.rotary(q, k, COS, SIN)[0], (q, k), vectorize=True)
    want = jacobian(lambda q, k: rotate64(q) + 0 * k.sum(), (q.double(), k.double()), vectorize=True)
    close(got[0], want[0], 2e-6, "d rotated q / d q")
    close(got[1], want[1], 0.0, "d rotated q / d k (zeros)")


# ---- long ragged rows with special values --------------------------------------------------------------------------
def _softmax_rows(n: int, dtype) -> torch.Tensor:
    x = randn(70, 8, n)
    x[0, : n // 2] = -torch.inf               # the first tiles all -inf (a row masked over its first columns)
    x[1] = -torch.inf                         # all -inf: NaN, as torch's
    x[2, n - 99] = torch.inf                  # +inf late: NaN, as torch's
    x[3, n - 1] = torch.nan
    x[4] = -3e38
    x[4, n - 1] = 3e38                        # one huge value at the very end, the rest hugely negative
    x[5, :-1] = -torch.inf                    # only the last (ragged) column finite: 1 there
    x[6, 1:] = -torch.inf                     # only the first column finite
    return x.to(dtype)


@pytest.mark.parametrize("backend,n,dtype", [("reference", 4099, torch.float32), ("reference", 4099, torch.bfloat16),
                                             ("reference", 1025, torch.float16), ("triton", 2051, torch.float32)])
def test_softmax_of_long_rows_with_minus_inf_prefixes_and_specials(backend, n, dtype):
    x = _softmax_rows(n, dtype)
    with config.override(backend=backend), poisoned_allocations():
        y = K.softmax(x)
    want = torch.softmax(x.double(), -1)
    close(y, want, 1e-2 if dtype != torch.float32 else 1e-6, f"softmax of rows of {n} ({dtype})")


@pytest.mark.parametrize("cfg", [dict(BN=128), dict(BN=512, ONE_TILE=True)], ids=["BN=128", "one tile"])
def test_softmax_minus_inf_prefix_with_an_explicit_tile(cfg):
    """The multi-pass path with a tile of 128 columns (the first 3 tiles all -inf), and the one-tile path (a GPU's
    for rows up to 16384) on the same rows."""
    x = randn(71, 3, 500)
    x[:, :384] = -torch.inf
    x[1, 499] = -torch.inf
    with config.override(backend="reference"), poisoned_allocations():
        y = K.softmax(x, **cfg)
    close(y, torch.softmax(x.double(), -1), 1e-6, f"softmax {cfg}")


@pytest.mark.parametrize("name", ["rms_norm", "layer_norm"])
def test_norms_of_long_rows_with_specials(name):
    n = 4099
    x = randn(72, 5, n)
    x[0, n - 1] = torch.inf
    x[1, 4000] = torch.nan
    x[2] = 1e30
    x[2, n - 1] = -1e30
    x[3] = 0.0
    x[4] = 1e6
    x[4, ::2] += 1.0                          # a large mean over a small spread
    w, b = randn(73, n), randn(74, n)
    with config.override(backend="reference"), poisoned_allocations():
        got = ops.rms_norm(x, w) if name == "rms_norm" else ops.layer_norm(x, w, b)
    want = F.rms_norm(x.double(), (n,), w.double(), 1e-6) if name == "rms_norm" else \
        F.layer_norm(x.double(), (n,), w.double(), b.double(), 1e-5)
    close(got, want, 1e-3, f"{name} of rows of {n}")


# ---- values at the dtype's limits, subnormals ----------------------------------------------------------------------
LIMITS = [(torch.float16, 65504.0), (torch.bfloat16, 3e38), (torch.float32, 3.4e38)]


@pytest.mark.parametrize("dtype,big", LIMITS, ids=["f16", "bf16", "f32"])
def test_norms_and_softmax_at_the_dtypes_largest_values(dtype, big):
    x = torch.full((3, 8), big)
    x[0, ::2] = -big
    x[2, 3] = 1.0
    x = x.to(dtype)
    w, b = torch.ones(8, dtype=dtype), torch.zeros(8, dtype=dtype)
    with config.override(backend="reference"), poisoned_allocations():
        rms, ln, sm = ops.rms_norm(x, w), ops.layer_norm(x, w, b), K.softmax(x)
        yh, h = ops.add_rms_norm(x, torch.zeros_like(x), w)
    xd = x.double()
    close(rms, F.rms_norm(xd, (8,), w.double(), 1e-6), 1e-2, f"rms_norm at {big}")
    close(ln, F.layer_norm(xd, (8,), w.double(), b.double(), 1e-5), 1e-2, f"layer_norm at {big}")
    close(sm, torch.softmax(xd, -1), 1e-2, f"softmax at {big}")
    close(yh, F.rms_norm(xd, (8,), w.double(), 1e-6), 1e-2, f"add_rms_norm at {big}")
    assert torch.equal(h, x), "add_rms_norm: h = x + 0 at the limit"


@pytest.mark.parametrize("name", ["rms_norm", "layer_norm", "add_rms_norm"])
def test_norms_of_subnormal_rows_forward_and_backward(name):
    """Rows of f32 subnormals (1e-40, -3e-41, the smallest 1.4e-45) beside an ordinary row, with the default eps:
    y stays at their tiny size and the gradients are rstd ~ 1/sqrt(eps) times dy, as float64's. (eps = 0 on such a
    row is out of reach, round 21: its rstd, > 1e38, has no f32 value.)"""
    x = torch.tensor([[1e-40, -3e-41] * 4, [1e-40] * 8, [1.4e-45, 0.0] * 4, [0.5, -2.0] * 4])
    w, b = randn(90, 8), randn(91, 8)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    g = randn(92, 4, 8)
    with config.override(backend="reference"), poisoned_allocations():
        y = {"rms_norm": lambda: ops.rms_norm(xl, wl), "layer_norm": lambda: ops.layer_norm(xl, wl, b),
             "add_rms_norm": lambda: ops.add_rms_norm(xl, torch.zeros(4, 8), wl)[0]}[name]()
        y.backward(g)
    yd = F.layer_norm(xd, (8,), wd, b.double(), 1e-5) if name == "layer_norm" else F.rms_norm(xd, (8,), wd, 1e-6)
    yd.backward(g.double())
    close(y, yd, 1e-6, f"{name} of subnormal rows")
    close(xl.grad, xd.grad, 1e-5, f"{name}: dx at subnormal rows")
    close(wl.grad, wd.grad, 1e-6, f"{name}: dweight with subnormal rows")


def test_softmax_and_attention_of_subnormal_inputs():
    """Subnormal logits and scores: a uniform softmax (exp of ~0), as float64's."""
    x = torch.tensor([[1e-40, -3e-41, 1.4e-45, 0.0], [-1e-45, 1e-39, 2e-38, -2e-38]])
    with config.override(backend="reference"), poisoned_allocations():
        y = K.softmax(x)
    close(y, torch.softmax(x.double(), -1), 1e-7, "softmax of subnormals")
    q = torch.full((1, 1, 3, 16), 1e-30)
    v = randn(93, 1, 1, 3, 16)
    with config.override(backend="reference"), poisoned_allocations():
        o = tilestack.attention(q, q, v)                 # scores 16e-60 * scale: underflow to 0, uniform weights
    close(o, F.scaled_dot_product_attention(q.double(), q.double(), v.double()), 1e-6, "attention, subnormal scores")


def test_swiglu_and_attention_at_fp16_limits():
    """swiglu of +-65504 overflows to +-inf exactly where torch's f16 result does (silu(65504) * 65504); attention
    on +-65504 entries with a small scale is the average of v, as float64."""
    x = torch.tensor([[65504.0, -65504.0, 1.0, 65504.0, 65504.0, 65504.0, 65504.0, 1e-3]], dtype=torch.float16)
    with config.override(backend="reference"), poisoned_allocations():
        y = ops.swiglu(x)
    want = (F.silu(x.double()[:, :4]) * x.double()[:, 4:]).to(torch.float16)
    close(y, want, 1e-3, "swiglu at 65504")
    q = torch.full((1, 1, 4, 16), 65504.0)
    q[..., ::2] = -65504.0
    q = q.to(torch.float16)
    v = randn(80, 1, 1, 4, 16).to(torch.float16)
    with config.override(backend="reference"), poisoned_allocations():
        o = tilestack.attention(q, q, v, scale=1e-12)
    close(o, F.scaled_dot_product_attention(q.double(), q.double(), v.double(), scale=1e-12), 2e-3,
          "attention at 65504")
