"""Fuzz round twenty-one, part one: the norms at the small end of f32 (rows below the square root of f32's smallest
normal, with eps = 0 or a tiny eps), and every public op of ``tilestack.torch.ops`` (and ``tilestack.attention``) on
inputs of unusual layout (stride-0 expanded, channels_last, transposed, every-other-column views), with every
combination of inputs that require grad and incoming gradients of every layout (the stride-0 one ``y.sum()`` hands
back, transposed, a gradient of only one of two outputs), forward and backward against float64 torch, on the CPU
backends (the NumPy reference executor; the Triton interpreter where the test says). Every result starts as NaN
(``poisoned_allocations``), so an element no program writes cannot pass.

What this round found (the test failed before its fix):
- ``rms_norm``, ``layer_norm``, ``add_rms_norm`` and ``add_layer_norm`` (and the kernel functions below them, both
  paths, one tile or several) of a row whose largest |x| is below about 1e-19, with eps = 0 (or an eps below the
  row's mean square), summed squares that fell below f32's range: rstd inf and y = +-inf (layer norm too), where
  float64 torch answers about +-1; rows near 1e-20 lost about 20 bits to subnormal squares (error 3e-6). The
  kernels (``kernels.layernorm.row_scale``) now take such a row's statistics of x / c, c a power of two near its
  largest |x|, as round 19 did for rows past 2^32, and ``scaled_rstd`` forms eps / c^2 without overflowing
  (1 / sqrt(eps) where it would). What stays out of reach: a row of subnormals (|x| < 1.2e-38) with eps = 0, whose
  rstd (> 1e38) has no f32 value.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tilestack
import tilestack.kernels as K
from tilestack import config
from tilestack.kernels import rotary_tables
from tilestack.testing.fuzz.outcomes import poisoned_allocations
from tilestack.torch import ops

NORMS = ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(2100 + seed)


def randn(seed: int, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=torch.float64).to(dtype)


def close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """NaN exactly where float64 has it; elsewhere within ``tol`` of the largest |want| (relative: the rows here are
    tiny, and a bound in absolute terms would pass anything)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    got, want = got.double(), want.detach().double()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN where float64 torch has none, or the reverse"
    fin = want.isfinite()
    assert torch.equal(got[~fin & ~want.isnan()], want[~fin & ~want.isnan()]), f"{what}: infinities differ"
    if fin.any():
        scale = want[fin].abs().max().clamp_min(1e-300)
        err = ((got[fin] - want[fin]).abs().max() / scale).item()
        assert err <= tol, f"{what}: error {err:.3g} of the largest |want| > {tol:.3g}"


def torch_norm(name, x, r, w, b, eps):
    """float64 torch's answer, layer norm by its formula (F.layer_norm's float64 mean of a constant row is not
    always the row's value, so its x - mean is not 0 there)."""
    h = x if r is None else x + r
    if "layer" in name:
        d = h - h.mean(-1, keepdim=True)
        y = d * (d * d).mean(-1, keepdim=True).add(eps).rsqrt() * w + b
    else:
        y = F.rms_norm(h, h.shape[-1:], w, eps)
    return (y,) if r is None else (y, h)


def norm_args(name, x, r, w, b):
    return {"rms_norm": (x, w), "layer_norm": (x, w, b), "add_rms_norm": (x, r, w),
            "add_layer_norm": (x, r, w, b)}[name]


# ---- rows at the small end of f32 -----------------------------------------------------------------------------------
TINY = [(name, mag, eps, backend) for name in NORMS for mag, eps in [(1e-25, 0.0), (1e-37, 0.0), (1e-21, 2.0 ** -140)]
        for backend in ("reference", "triton") if backend == "reference" or mag == 1e-25]


@pytest.mark.parametrize("name,mag,eps,backend", TINY, ids=[f"{n}-{m}-{e}-{b}" for n, m, e, b in TINY])
def test_norms_of_tiny_rows_match_float64_forward_and_backward(name, mag, eps, backend):
    """y and the gradients of x, r, weight and bias for rows near ``mag`` (an ordinary row beside them) with a tiny
    eps; before the fix y was +-inf (eps = 0) where float64 gives about +-1."""
    x, r = randn(1, 3, 40) * mag, randn(2, 3, 40) * mag
    x[1] /= mag                                                  # an ordinary row among the tiny ones
    w, b = randn(3, 40), randn(4, 40)
    leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
    ref = [t.double().requires_grad_() for t in (x, r, w, b)]
    residual = name.startswith("add")
    with config.override(backend=backend), poisoned_allocations():
        got = getattr(ops, name)(*norm_args(name, *leaves), eps=eps)
        got = got if isinstance(got, tuple) else (got,)
        dy = randn(5, 3, 40)
        (got[0] * dy).sum().backward()
    want = torch_norm(name, ref[0], ref[1] if residual else None, ref[2], ref[3] if "layer" in name else None, eps)
    (want[0] * dy.double()).sum().backward()
    for k, (g, wv) in enumerate(zip(got, want, strict=True)):
        close(g, wv, 1e-5, f"{name} output {k}")
    used = [0, 1, 2, 3] if name == "add_layer_norm" else [0, 2] + ([1] if residual else []) + \
        ([3] if "layer" in name else [])
    for k in used:
        close(leaves[k].grad, ref[k].grad, 1e-5, f"{name} gradient of {'xrwb'[k]}")


@pytest.mark.parametrize("kernel", NORMS)
@pytest.mark.parametrize("one_tile", [False, True], ids=["passes", "one_tile"])
def test_kernel_functions_on_tiny_rows_with_eps_zero(kernel, one_tile):
    """The kernel functions' both bodies (several passes; ``ONE_TILE=True``, the whole row in one tile)."""
    x, r, w, b = randn(6, 4, 100) * 1e-30, randn(7, 4, 100) * 1e-30, randn(8, 100), randn(9, 100)
    config_ = dict(ONE_TILE=True, BN=128) if one_tile else dict(BN=128)
    with config.override(backend="reference"), poisoned_allocations():
        out = getattr(K, kernel)(*norm_args(kernel, x, r, w, b), 0.0, **config_)
    want = torch_norm(kernel, x.double(), r.double() if kernel.startswith("add") else None, w.double(),
                      b.double() if "layer" in kernel else None, 0.0)
    close(out[0], want[0], 1e-5, f"{kernel} y")


def test_small_rows_keep_torchs_answer_for_an_ordinary_eps_and_eps_inf():
    """The small-row scale must not move the answer where eps dominates: eps = 1e-6 gives x / 1e-3, eps = 1e30 and
    eps = inf as float64 (inf: y = 0, layer norm's y = bias)."""
    x, w, b = randn(10, 3, 16) * 1e-25, randn(11, 16), randn(12, 16)
    with config.override(backend="reference"), poisoned_allocations():
        for eps in (1e-6, 1e30, float("inf")):
            close(ops.rms_norm(x, w, eps), F.rms_norm(x.double(), (16,), w.double(), eps), 1e-5, f"rms eps={eps}")
            close(ops.layer_norm(x, w, b, eps), F.layer_norm(x.double(), (16,), w.double(), b.double(), eps), 1e-5,
                  f"layer_norm eps={eps}")


# ---- layouts: stride 0, channels_last, transposed, every other column ---------------------------------------------
def layouts(seed: int, shape):
    """(name, tensor) pairs of ``shape`` in unusual layouts, each a view whose storage holds NaN elsewhere."""
    out = []
    one = randn(seed, *shape[:-1], 1).expand(shape)                            # stride 0 in the last dim
    out.append(("expanded last", one))
    out.append(("expanded rows", randn(seed + 1, 1, *shape[1:]).expand(shape)))
    base = torch.full((*shape[:-1], 2 * shape[-1]), float("nan"))
    base[..., ::2] = randn(seed + 2, *shape)
    out.append(("every other column", base[..., ::2]))
    out.append(("transposed", randn(seed + 3, *reversed(shape)).permute(*reversed(range(len(shape))))))
    if len(shape) == 4:
        out.append(("channels_last", randn(seed + 4, *shape).contiguous(memory_format=torch.channels_last)))
    return out


@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("layout", ["expanded last", "expanded rows", "every other column", "transposed",
                                    "channels_last"])
def test_norms_on_unusual_layouts_forward_and_backward(name, layout):
    shape = (2, 3, 4, 16)
    x = dict(layouts(20, shape))[layout]
    r = dict(layouts(30, shape))[layout]
    wb = torch.full((16, 2), float("nan"))
    wb[:, 0] = randn(41, 16)
    w, b = wb[:, 0], randn(42, 16)                               # a weight of stride 2 too, NaN between
    leaves = [t.detach().clone().requires_grad_() if t.is_contiguous() else t.detach().requires_grad_()
              for t in (x, r, w, b)]
    ref = [t.detach().double().requires_grad_() for t in (x, r, w, b)]
    with config.override(backend="reference"), poisoned_allocations():
        got = getattr(ops, name)(*norm_args(name, *leaves))
        got = got if isinstance(got, tuple) else (got,)
        sum(o.sum() for o in got).backward()
    eps = 1e-5 if "layer" in name else 1e-6
    want = torch_norm(name, ref[0], ref[1] if name.startswith("add") else None, ref[2],
                      ref[3] if "layer" in name else None, eps)
    sum(o.sum() for o in want).backward()
    for k, (g, wv) in enumerate(zip(got, want, strict=True)):
        close(g, wv, 2e-5, f"{name} {layout} output {k}")
    for k, (leaf, rf) in enumerate(zip(leaves, ref, strict=True)):
        if rf.grad is not None:
            close(leaf.grad, rf.grad, 2e-5, f"{name} {layout} gradient {k}")


def swiglu64(x):
    f = x.shape[-1] // 2
    return F.silu(x[..., :f]) * x[..., f:]


def rotate64(x, cos, sin):
    h = x.shape[-1] // 2
    c, s = cos.double()[None, :, None, :], sin.double()[None, :, None, :]
    return torch.cat((x[..., :h] * c - x[..., h:] * s, x[..., h:] * c + x[..., :h] * s), -1)


@pytest.mark.parametrize("layout", ["expanded last", "expanded rows", "every other column", "transposed",
                                    "channels_last"])
@pytest.mark.parametrize("op", ["swiglu", "rotary", "attention"])
def test_other_ops_on_unusual_layouts_forward_and_backward(op, layout):
    if op == "swiglu":
        inputs = [dict(layouts(50, (2, 3, 4, 16)))[layout]]
        fn, ref_fn = ops.swiglu, swiglu64
    elif op == "rotary":
        cos, sin = rotary_tables(4, 16)
        inputs = [dict(layouts(51, (2, 4, 3, 16)))[layout], dict(layouts(52, (2, 4, 1, 16)))[layout]]
        fn = lambda q, k: ops.rotary(q, k, cos, sin)                                   # noqa: E731
        ref_fn = lambda q, k: (rotate64(q, cos, sin), rotate64(k, cos, sin))          # noqa: E731
    else:
        inputs = [dict(layouts(53, (2, 4, 5, 8)))[layout], dict(layouts(54, (2, 2, 6, 8)))[layout],
                  dict(layouts(55, (2, 2, 6, 8)))[layout]]
        fn = lambda q, k, v: tilestack.attention(q, k, v, causal=True)                 # noqa: E731
        ref_fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,  # noqa: E731
                                                                enable_gqa=True)
    leaves = [t.detach().requires_grad_() for t in inputs]
    ref = [t.detach().double().requires_grad_() for t in inputs]
    with config.override(backend="reference"), poisoned_allocations():
        got = fn(*leaves)
        got = got if isinstance(got, tuple) else (got,)
        sum((o * o).sum() for o in got).backward()
    want = ref_fn(*ref)
    want = want if isinstance(want, tuple) else (want,)
    sum((o * o).sum() for o in want).backward()
    for k, (g, wv) in enumerate(zip(got, want, strict=True)):
        close(g, wv, 2e-5, f"{op} {layout} output {k}")
    for k, (leaf, rf) in enumerate(zip(leaves, ref, strict=True)):
        close(leaf.grad, rf.grad, 2e-5, f"{op} {layout} gradient {k}")


# ---- which inputs require grad, and the incoming gradient's layout --------------------------------------------------
REDUCERS = {
    "sum": lambda outs: sum(o.sum() for o in outs),                             # dy: stride 0 (expanded ones)
    "transposed": lambda outs: sum((o.transpose(0, -1) ** 2).sum() for o in outs),
    "first output only": lambda outs: (outs[0] * 3).sum(),
}


def op_cases():
    x, r, w, b = randn(60, 3, 4, 8), randn(61, 3, 4, 8), randn(62, 8), randn(63, 8)
    cos, sin = rotary_tables(4, 16)
    q16, k16 = randn(64, 2, 4, 3, 16), randn(65, 2, 4, 1, 16)
    q, k, v = randn(66, 2, 4, 5, 8), randn(67, 2, 2, 6, 8), randn(68, 2, 2, 6, 12)
    xs, lm, labels = randn(69, 6, 8), randn(70, 5, 8), torch.tensor([0, 4, -100, 2, 2, 1])
    return {
        "add_rms_norm": ((x, r, w), lambda x, r, w: ops.add_rms_norm(x, r, w),
                         lambda x, r, w: (F.rms_norm(x + r, (8,), w, 1e-6), x + r)),
        "add_layer_norm": ((x, r, w, b), lambda x, r, w, b: ops.add_layer_norm(x, r, w, b),
                           lambda x, r, w, b: (F.layer_norm(x + r, (8,), w, b, 1e-5), x + r)),
        "rotary": ((q16, k16), lambda q, k: ops.rotary(q, k, cos, sin),
                   lambda q, k: (rotate64(q, cos, sin), rotate64(k, cos, sin))),
        "attention": ((q, k, v), lambda q, k, v: tilestack.attention(q, k, v),
                      lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)),
        "fused_linear_cross_entropy": ((xs, lm), lambda x, w: ops.fused_linear_cross_entropy(x, w, labels),
                                       lambda x, w: F.cross_entropy(x @ w.T, labels)),
    }


GRAD_CASES = [(op, mask, red) for op, n in [("add_rms_norm", 3), ("add_layer_norm", 4), ("rotary", 2),
                                            ("attention", 3), ("fused_linear_cross_entropy", 2)]
              for mask in range(1, 2 ** n) if bin(mask).count("1") in (1, n) for red in REDUCERS
              if not (op == "fused_linear_cross_entropy" and red == "transposed")]


@pytest.mark.parametrize("op,mask,reducer", GRAD_CASES, ids=[f"{o}-{m:b}-{r}" for o, m, r in GRAD_CASES])
def test_each_input_alone_or_all_requiring_grad_match_float64(op, mask, reducer):
    """Gradients where one input alone requires grad (or all do), for an incoming gradient of stride 0, a
    transposed one, or one for the first output only (the second's then absent: zeros)."""
    inputs, fn, ref_fn = op_cases()[op]
    leaves = [t.clone().requires_grad_(bool(mask >> i & 1)) for i, t in enumerate(inputs)]
    ref = [t.double().requires_grad_(bool(mask >> i & 1)) for i, t in enumerate(inputs)]
    with config.override(backend="reference"), poisoned_allocations():
        got = fn(*leaves)
        got = got if isinstance(got, tuple) else (got,)
        got_loss = REDUCERS[reducer](got)
    want = ref_fn(*ref)
    want = want if isinstance(want, tuple) else (want,)
    loss = REDUCERS[reducer](want)
    # (rotary's q alone read, k alone requiring grad: no graph, as torch's; round 26)
    assert got_loss.requires_grad == loss.requires_grad, f"{op}: the loss requires grad exactly where torch's does"
    if loss.requires_grad:
        with config.override(backend="reference"), poisoned_allocations():
            got_loss.backward()
        loss.backward()
    for k, (g, wv) in enumerate(zip(got, want, strict=True)):
        close(g, wv, 2e-5, f"{op} output {k}")
    for k, (leaf, rf) in enumerate(zip(leaves, ref, strict=True)):
        if not leaf.requires_grad:
            assert leaf.grad is None, f"{op}: input {k} does not require grad but got one"
            continue
        if rf.grad is None:     # only an unused output reaches it (rotary's k, "first output only"): None, as torch's
            assert leaf.grad is None, f"{op}: input {k} reaches only an unused output and got a gradient"
            continue
        assert leaf.grad is not None, f"{op}: input {k} requires grad and got none"
        close(leaf.grad, rf.grad, 2e-5, f"{op} gradient {k}")
