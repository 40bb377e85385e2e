"""Fuzz round eight: the public ops and kernel functions over random legal shapes and dtypes, each input in a
random memory layout, against torch in float64 (forward, and the gradients where the op has them).

What the seeded fuzzer (``tilestack.testing.fuzz``) does not draw, and this does: inputs expanded from a size-1 dim
(stride 0, whose gradient sums over the broadcast), views at an element offset in a larger buffer (data pointers
off 16-byte alignment, which the plans key on), dims swapped in memory, the same tensor passed as two arguments
(add_rms_norm(x, x), attention(q, q, q)), zero-size dims in any position, GQA with Nq != Nk under both causal
alignments and broadcast masks, and the kernel functions ``gemm`` (with epilogues), ``softmax`` and
``quantized_linear``. Seeds 800..; the reference backend (the Triton interpreter is the seeded fuzzer's).
Set TILESTACK_FUZZ_ROUND8_CASES to draw more cases per op.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tilestack
from tilestack import config
from tilestack import kernels as K
from tilestack.quant import quantize_weight, quantized_linear
from tilestack.quant.gemm import reference as quantized_reference
from tilestack.torch import ops

CASES = int(os.environ.get("TILESTACK_FUZZ_ROUND8_CASES", "10"))
LAYOUTS = ("contiguous", "offset", "swapped", "strided", "expanded")
# tolerance on max |got - want| / (max |want| + 1), by the dtype the op computes in
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture(autouse=True)
def reference_backend():
    with config.override(backend="reference"):
        yield


def placed(values: torch.Tensor, layout: str, rng) -> torch.Tensor:
    """A tensor equal to ``values`` (``expanded``: equal to its first slice along dim 0, broadcast) in the given
    layout: at an element offset in a larger buffer (misaligned), with its first two dims swapped in memory,
    its last dim every other element of a wider one, or expanded with stride 0 along dim 0."""
    shape, n = tuple(values.shape), values.numel()
    if layout == "offset" or (values.dim() < 2 and layout == "swapped"):
        start = int(rng.integers(1, 4))
        buf = torch.empty(n + start + 3, dtype=values.dtype)
        out = buf[start:start + n].view(shape)
        out.copy_(values)
        return out
    if layout == "swapped":
        return values.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "strided" and values.dim() >= 1:
        wide = torch.empty(*shape[:-1], 2 * shape[-1], dtype=values.dtype)
        out = wide[..., ::2]
        out.copy_(values)
        return out
    if layout == "expanded" and values.dim() >= 1 and shape[0] > 0:
        return values[:1].clone().expand(shape)
    return values


def leaf_and_view(values, layout, rng):
    """(leaf, make): the leaf a gradient lands in, and the function making the op's input from it (for torch's
    float64 run, the same function on a float64 copy of the leaf)."""
    x = placed(values, layout, rng)
    if x.stride() and 0 in x.stride() and x.numel() > 1:        # expanded: the leaf is the single slice
        leaf = x[:1].clone()
        return leaf, lambda t: t.expand(x.shape)
    return x.detach().clone() if layout == "contiguous" else x.detach(), (lambda t: t)


def close(got, want, dtype, what, spread: float = 1.0, scale: float | None = None):
    """max |got - want| within the dtype's tolerance of ``scale`` (default max |want| + 1). ``spread``: how many
    terms each element sums (an expanded input's gradient), which widens the tolerance by its root."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    if got.numel() == 0:
        return
    got, want = got.double(), want.double()
    both_nan = got.isnan() & want.isnan()
    assert torch.equal(got.isnan(), want.isnan()), (what, "NaN in different places")
    diff = (got - want).abs().masked_fill(both_nan, 0).max().item()
    if scale is None:
        scale = want.abs().masked_fill(both_nan, 0).max().item() + 1
    assert diff <= TOL[dtype] * scale * math.sqrt(spread), (what, diff, scale, spread)


def rand(rng, shape, dtype=torch.float32, scale=1.0):
    return torch.from_numpy(rng.standard_normal(shape) * scale).to(dtype)


def dims(rng, rank, hi=5, zero=0.1):
    out = [int(rng.integers(1, hi + 1)) for _ in range(rank)]
    if out and rng.random() < zero:
        out[int(rng.integers(rank))] = 0
    return tuple(out)


def run_grad(fn, leaves, makes, grad_seed):
    """fn(*inputs), the leaves' gradients and the inputs' own (an expanded input's, before autograd sums it into
    its leaf), for a fixed random output gradient (None where none flows)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in leaves]
    inputs = [make(t) for make, t in zip(makes, leaves, strict=True)]
    for x, t in zip(inputs, leaves, strict=True):
        if x is not t and x.requires_grad:
            x.retain_grad()
    y = fn(*inputs)
    g = torch.from_numpy(np.random.default_rng(grad_seed).standard_normal(tuple(y.shape))).to(y.dtype)
    if y.requires_grad and y.numel():
        y.backward(g)
    return y.detach(), [t.grad for t in leaves], [x.grad for x in inputs]


def check_with_grads(ours, theirs, leaves, makes, dtype, what, seed):
    """ours against theirs (float64 on float64 copies of the leaves): the output, and each leaf's gradient. An
    expanded input's leaf gets the sum of its gradient's elements, each rounded to the op's dtype first (as the
    op gives them): compared with the float64 input gradient rounded so and summed, the tolerance scaled by the
    elements' size, not the (cancelling) sum's."""
    y, grads, _ = run_grad(ours, leaves, makes, seed)
    y64, grads64, input_grads64 = run_grad(theirs, [t.double() for t in leaves], makes, seed)
    close(y, y64, dtype, what + " output")
    for i, (g, g64, gx64, t, make) in enumerate(zip(grads, grads64, input_grads64, leaves, makes, strict=True)):
        if g64 is None or not g64.abs().sum() > 0:
            continue
        assert g is not None, (what, f"no gradient for input {i}")
        spread = make(t).numel() / max(1, t.numel())
        if gx64 is not None and gx64 is not g64 and spread > 1:        # expanded along dim 0 from its leaf
            want = gx64.to(g.dtype).double().sum(0, keepdim=True)
            close(g, want, dtype, f"{what} gradient of expanded input {i}", spread=spread,
                  scale=gx64.abs().max().item() + 1)
        else:
            close(g, g64, dtype, f"{what} gradient of input {i}")


def layout(rng):
    return str(rng.choice(LAYOUTS))


def dtype(rng):
    return (torch.float32, torch.bfloat16, torch.float16)[int(rng.integers(3))]


SEEDS = range(800, 800 + CASES)


@pytest.mark.parametrize("seed", SEEDS)
def test_norms(seed):
    rng = np.random.default_rng(seed)
    kind = ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm")[seed % 4]
    dt = dtype(rng)
    shape = (*dims(rng, int(rng.integers(0, 3))), int(rng.integers(1, 200)))
    n = shape[-1]
    eps = float(rng.choice([0.0, 1e-6, 1e-5, 0.1]))
    tensors = [rand(rng, shape, dt, scale=float(rng.choice([1e-3, 1.0, 30.0]))), rand(rng, (n,), dt)]
    residual = kind.startswith("add")
    if residual:
        tensors.insert(1, rand(rng, shape, dt))
    if kind.endswith("layer_norm"):
        tensors.append(rand(rng, (n,), dt))
    pairs = [leaf_and_view(t, layout(rng), rng) for t in tensors]
    leaves, makes = [p[0] for p in pairs], [p[1] for p in pairs]

    def ours(*a):
        out = getattr(ops, kind)(*a, eps=eps)
        return out[0] if residual else out

    def theirs(*a):
        x = a[0] + a[1] if residual else a[0]
        w, b = a[2 if residual else 1], (a[-1] if kind.endswith("layer_norm") else None)
        if b is None:
            return F.rms_norm(x.to(dt).double(), (n,), w, eps)
        return F.layer_norm(x.to(dt).double(), (n,), w, b, eps)
    check_with_grads(ours, theirs, leaves, makes, dt, f"{kind} {shape} {dt}", seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_add_norm_of_one_tensor_twice(seed):
    """x passed as both x and r: h = 2x, and x's gradient the sum of both paths."""
    rng = np.random.default_rng(seed)
    dt, n = dtype(rng), int(rng.integers(1, 100))
    x, w = rand(rng, (*dims(rng, 2, zero=0.0), n), dt), rand(rng, (n,), dt)
    pairs = [leaf_and_view(t, layout(rng), rng) for t in (x, w)]
    check_with_grads(lambda a, b: ops.add_rms_norm(a, a, b)[0],
                     lambda a, b: F.rms_norm((a + a).to(dt).double(), (n,), b, 1e-6),
                     [p[0] for p in pairs], [p[1] for p in pairs], dt, f"add_rms_norm(x, x) {tuple(x.shape)}", seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_attention(seed):
    rng = np.random.default_rng(seed)
    dt = dtype(rng)
    B, Hkv, groups = int(rng.integers(0 if rng.random() < 0.1 else 1, 3)), int(rng.integers(1, 3)), \
        int(rng.integers(1, 4))
    H, Nq, Nk = Hkv * groups, int(rng.integers(1, 12)), int(rng.integers(1, 12))
    D, Dv = int(rng.choice([8, 16, 24, 64])), int(rng.choice([8, 16, 32]))
    causal, align = bool(rng.random() < 0.5), str(rng.choice(["top_left", "bottom_right"]))
    scale = None if rng.random() < 0.5 else float(rng.uniform(0.05, 1.0))
    mask = None
    if rng.random() < 0.4:
        mshape = [(B, 1, Nq, Nk), (1, H, 1, Nk), (Nq, Nk), (H, Nq, 1)][int(rng.integers(4))]
        mask = (torch.from_numpy(rng.random(mshape) < 0.8) if rng.random() < 0.5 else
                rand(rng, mshape)).contiguous()
        mask = placed(mask, str(rng.choice(["contiguous", "swapped", "expanded"])), rng)
    tensors = [rand(rng, (B, H, Nq, D), dt), rand(rng, (B, Hkv, Nk, D), dt), rand(rng, (B, Hkv, Nk, Dv), dt)]
    pairs = [leaf_and_view(t, layout(rng), rng) for t in tensors]

    def theirs(q, k, v):
        m = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
        if causal:
            keep = torch.ones(Nq, Nk, dtype=torch.bool).tril(0 if align == "top_left" else Nk - Nq)
            m = keep if m is None else (m & keep if m.dtype == torch.bool else m.masked_fill(~keep, -math.inf))
        q, k, v = (t.to(dt).double() for t in (q, k, v))
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        s = q @ k.transpose(-1, -2) * (D ** -0.5 if scale is None else scale)
        if m is not None:
            s = s.masked_fill(~m, -math.inf) if m.dtype == torch.bool else s + m
        p = torch.softmax(s, -1).nan_to_num(0.0)     # a row that sees no key: zeros, as tilestack and torch give
        return p @ v

    check_with_grads(lambda q, k, v: tilestack.attention(q, k, v, causal, scale, attn_mask=mask, causal_align=align),
                     theirs, [p[0] for p in pairs], [p[1] for p in pairs], dt,
                     f"attention B={B} H={H}/{Hkv} Nq={Nq} Nk={Nk} D={D}/{Dv} causal={causal} {align} "
                     f"mask={None if mask is None else (tuple(mask.shape), mask.dtype, mask.stride())} {dt}", seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_rotary_and_swiglu(seed):
    rng = np.random.default_rng(seed)
    dt = dtype(rng)
    B, N, H, Hkv = *dims(rng, 2, zero=0.1), int(rng.integers(1, 4)), int(rng.integers(1, 3))
    D = int(rng.choice([16, 32, 64]))
    cos, sin = K.rotary_tables(N, D, theta=float(rng.choice([100.0, 10000.0])))

    def rotate(x):
        x1, x2 = x.to(dt).double().chunk(2, -1)
        c, s = cos.double()[None, :, None], sin.double()[None, :, None]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)
    pairs = [leaf_and_view(t, layout(rng), rng) for t in (rand(rng, (B, N, H, D), dt), rand(rng, (B, N, Hkv, D), dt))]
    # one output of both rotations, q's and k's heads side by side: (B, N, H + Hkv, D)
    check_with_grads(lambda q, k: torch.cat(ops.rotary(q, k, cos, sin), 2),
                     lambda q, k: torch.cat((rotate(q), rotate(k)), 2),
                     [p[0] for p in pairs], [p[1] for p in pairs], torch.float32 if dt == torch.float32 else dt,
                     f"rotary {(B, N, H, Hkv, D)} {dt}", seed)
    f = int(rng.integers(1, 70))
    x = rand(rng, (*dims(rng, int(rng.integers(0, 3))), 2 * f), dt, scale=float(rng.choice([0.1, 1.0, 8.0])))
    leaf, make = leaf_and_view(x, layout(rng), rng)
    check_with_grads(ops.swiglu, lambda t: F.silu(t.to(dt).double()[..., :f]) * t.to(dt).double()[..., f:],
                     [leaf], [make], dt, f"swiglu {tuple(x.shape)} {dt}", seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_fused_linear_cross_entropy(seed):
    rng = np.random.default_rng(seed)
    dt = dtype(rng)
    T, d, V = int(rng.integers(0 if rng.random() < 0.1 else 1, 20)), int(rng.integers(1, 40)), \
        int(rng.integers(1, 300))
    ignore = int(rng.choice([-100, -1, 0, V - 1, V + 5]))
    labels = torch.from_numpy(rng.integers(0, V, T))
    labels[torch.from_numpy(rng.random(T) < 0.2)] = ignore
    labels = placed(labels.to(torch.int64 if rng.random() < 0.5 else torch.int32), layout(rng), rng)
    pairs = [leaf_and_view(t, layout(rng), rng) for t in (rand(rng, (T, d), dt), rand(rng, (V, d), dt, scale=0.3))]

    def theirs(x, w):
        return F.cross_entropy(x.to(dt).double() @ w.to(dt).double().T, labels.long(), ignore_index=ignore)
    check_with_grads(lambda x, w: ops.fused_linear_cross_entropy(x, w, labels, ignore), theirs,
                     [p[0] for p in pairs], [p[1] for p in pairs], torch.float32 if dt == torch.float32 else dt,
                     f"fused_linear_cross_entropy T={T} d={d} V={V} ignore={ignore} labels {labels.dtype} "
                     f"{labels.stride()} {dt}", seed)


ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu")


@pytest.mark.parametrize("seed", SEEDS)
def test_kernel_functions(seed):
    """gemm with an epilogue, softmax and quantized_linear on placed inputs, forward only (no backward)."""
    rng = np.random.default_rng(seed)
    dt = (torch.bfloat16, torch.float16)[seed % 2]
    M, Kd, N = dims(rng, 3, hi=40, zero=0.1)
    act = ACTIVATIONS[int(rng.integers(len(ACTIVATIONS)))]
    a, b = placed(rand(rng, (M, Kd), dt), layout(rng), rng), placed(rand(rng, (Kd, N), dt), layout(rng), rng)
    bias = placed(rand(rng, (N,), torch.float32), layout(rng), rng) if rng.random() < 0.5 else None
    residual = placed(rand(rng, (M, N), dt), layout(rng), rng) if rng.random() < 0.5 else None
    out_dtype = (None, torch.float32)[int(rng.integers(2))]
    want = a.double() @ b.double() + (0 if bias is None else bias.double())
    want = {None: want, "relu": torch.relu(want), "gelu": F.gelu(want), "silu": F.silu(want),
            "gelu_tanh": F.gelu(want, approximate="tanh")}[act] + (0 if residual is None else residual.double())
    got = K.gemm(a, b, bias=bias, activation=act, residual=residual, out_dtype=out_dtype)
    close(got, want, dt, f"gemm {(M, Kd, N)} {act} bias={bias is not None} residual={residual is not None} {dt}")

    x = placed(rand(rng, (M, int(rng.integers(1, 300))), dt, scale=float(rng.choice([1.0, 20.0]))), layout(rng), rng)
    close(K.softmax(x), torch.softmax(x.double(), -1), dt, f"softmax {tuple(x.shape)} {x.stride()} {dt}")

    mode = ("int8", "fp8")[seed % 2]
    q, s = quantize_weight(rand(rng, (N, Kd)), mode)
    x = placed(rand(rng, (M, Kd), dt), layout(rng), rng)
    qb = placed(rand(rng, (N,), dt), layout(rng), rng) if rng.random() < 0.5 else None
    x_scale = 0.02 if mode == "fp8" and rng.random() < 0.5 else None
    q, s = placed(q, layout(rng), rng), placed(s, layout(rng), rng)
    close(quantized_linear(x, q, s, qb, x_scale=x_scale), quantized_reference(x, q, s, qb, x_scale).double(), dt,
          f"quantized_linear {mode} {(M, Kd, N)} x_scale={x_scale} {dt}")
