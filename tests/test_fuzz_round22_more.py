"""Fuzz round twenty-two, part two: gradcheck-style checks of every differentiable public op (finite differences
in f32 at a loose tolerance, with gradcheck's batched-gradient check, and torch.autograd.functional.jacobian with
vectorize=True against float64 torch); size-0 and size-1 dims in every position; attention masks broadcast along
each axis, expanded, transposed, holding NaN, +inf, -inf and finfo.min rows, with GQA, dropout (against the kernels'
own mask, regenerated) and causal with Nq != Nk around the CPU tile (16 +- 1); the fused cross-entropy on x and
weight of every layout; and bad inputs this round adds, refused by name before any kernel launches. CPU backends
(the NumPy reference executor); every result starts as NaN (``poisoned_allocations``).

What this round found (the test failed before its fix):
- a backward run with batched incoming gradients (``torch.autograd.grad(..., is_grads_batched=True)``, which
  ``torch.autograd.functional.jacobian``/``hessian`` with ``vectorize=True`` and gradcheck's
  ``check_batched_grad=True`` use) through an eager call of any norm, ``swiglu``, ``rotary`` or
  ``tilestack.attention`` failed inside the planned kernels ("Cannot access data pointer of Tensor that doesn't
  have storage"; rotary: "Batching rule not implemented for aten::detach"): the forward ran eagerly, so its node
  was the eager Function, whose backward handed vmap's wrappers to the kernels. Those backwards now call their
  ``tilestack::`` backward op when a gradient is batched (``torch._autograd.batched``), which vmap takes.
- ``fused_linear_cross_entropy`` of a batch with every row ignored (or none): its loss is NaN (0 / 0, as torch's),
  and a NaN loss gradient (the loss squared, or scaled by inf, on its way back) made dx and dw NaN, the saved
  zero gradients scaled by it (0 * NaN); rows labelled ignore_index got NaN that way whenever the loss gradient
  was NaN. Torch gives those rows (and dw where no row is labelled) zeros: the loss does not depend on them. The
  backward (eager, and the op's outside torch.func) now keeps them zero (``torch.ops._ce_grads``).
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian

import tilestack
import tilestack.kernels as K
from tilestack import config
from tilestack.errors import LaunchError
from tilestack.kernels import rotary_tables
from tilestack.kernels.attention_fwd import dropout_mask, dropout_rng
from tilestack.testing.fuzz.outcomes import poisoned_allocations
from tilestack.torch import ops


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(2250 + seed)


def randn(seed: int, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=torch.float64).to(dtype)


def close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """NaN and infinities exactly where float64 torch has them; elsewhere within ``tol`` of max(1, largest |want|)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    got, want = got.detach().double(), want.detach().double()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN where float64 torch has none, or the reverse"
    inf = want.isinf()
    assert torch.equal(got[inf], want[inf]) and not got[~inf].isinf().any(), f"{what}: infinities differ"
    ok = want.isfinite()
    if ok.any():
        err = ((got[ok] - want[ok]).abs().max() / want[ok].abs().max().clamp_min(1.0)).item()
        assert err <= tol, f"{what}: error {err:.3g} > {tol:.3g}"


COS, SIN = rotary_tables(3, 16)
LABELS = torch.tensor([0, 4, -100, 2])


def rotate64(t):
    h = t.shape[-1] // 2
    c, s = COS.double()[None, :, None], SIN.double()[None, :, None]
    return torch.cat((t[..., :h] * c - t[..., h:] * s, t[..., h:] * c + t[..., :h] * s), -1)


# op -> (input shapes, tilestack's call, float64 torch's); a tuple of outputs from both
OPS = {
    "rms_norm": ([(2, 3, 8), (8,)], lambda x, w: (ops.rms_norm(x, w),),
                 lambda x, w: (F.rms_norm(x, (8,), w, 1e-6),)),
    "layer_norm": ([(2, 3, 8), (8,), (8,)], lambda x, w, b: (ops.layer_norm(x, w, b),),
                   lambda x, w, b: (F.layer_norm(x, (8,), w, b, 1e-5),)),
    "add_rms_norm": ([(2, 3, 8), (2, 3, 8), (8,)], lambda x, r, w: ops.add_rms_norm(x, r, w),
                     lambda x, r, w: (F.rms_norm(x + r, (8,), w, 1e-6), x + r)),
    "add_layer_norm": ([(2, 3, 8), (2, 3, 8), (8,), (8,)], lambda x, r, w, b: ops.add_layer_norm(x, r, w, b),
                       lambda x, r, w, b: (F.layer_norm(x + r, (8,), w, b, 1e-5), x + r)),
    "swiglu": ([(3, 8)], lambda x: (ops.swiglu(x),), lambda x: (F.silu(x[..., :4]) * x[..., 4:],)),
    "rotary": ([(1, 3, 2, 16), (1, 3, 1, 16)], lambda q, k: ops.rotary(q, k, COS, SIN),
               lambda q, k: (rotate64(q), rotate64(k))),
    "attention": ([(1, 2, 3, 4), (1, 1, 4, 4), (1, 1, 4, 4)],
                  lambda q, k, v: (tilestack.attention(q, k, v, causal=True),),
                  lambda q, k, v: (F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),)),
    "attention masked": ([(1, 2, 3, 4), (1, 2, 4, 4), (1, 2, 4, 4)],
                         lambda q, k, v: (tilestack.attention(q, k, v, attn_mask=torch.tensor([[True, False, True,
                                                                                                True]])),),
                         lambda q, k, v: (F.scaled_dot_product_attention(
                             q, k, v, attn_mask=torch.tensor([[True, False, True, True]])),)),
    "fused_linear_cross_entropy": ([(4, 4), (5, 4)], lambda x, w: (ops.fused_linear_cross_entropy(x, w, LABELS),),
                                   lambda x, w: (F.cross_entropy(x @ w.T, LABELS),)),
}


@pytest.mark.parametrize("batched", [False, True], ids=["plain", "check_batched_grad"])
@pytest.mark.parametrize("op", list(OPS))
def test_gradcheck_in_f32_at_a_loose_tolerance(op, batched):
    """torch.autograd.gradcheck (finite differences of the f32 forward against the backward; the backward run twice
    and compared, undefined output gradients handed in), with check_batched_grad: the backward under
    is_grads_batched=True, i.e. vmap's wrappers as incoming gradients."""
    shapes, fn, _ = OPS[op]
    inputs = tuple(randn(i, *s).requires_grad_() for i, s in enumerate(shapes))
    with config.override(backend="reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore")               # gradcheck's "inputs are not double precision"
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-2, atol=5e-2, rtol=5e-2, check_batched_grad=batched)


@pytest.mark.parametrize("op", list(OPS))
def test_vectorized_jacobian_matches_float64(op):
    """jacobian(vectorize=True): one backward with batched incoming gradients (the rows of the identity)."""
    shapes, fn, ref_fn = OPS[op]
    inputs = tuple(randn(10 + i, *s) for i, s in enumerate(shapes))
    with config.override(backend="reference"), poisoned_allocations():
        got = jacobian(fn, inputs, vectorize=True)
    want = jacobian(ref_fn, tuple(t.double() for t in inputs), vectorize=True)
    for k, (g_out, w_out) in enumerate(zip(got, want, strict=True)):
        for i, (g, w) in enumerate(zip(g_out, w_out, strict=True)):
            close(g, w, 2e-5, f"{op} d output {k} / d input {i}")


# ---- size-0 and size-1 dims in every position -------------------------------------------------------------------
def _size_cases():
    out = []
    for shape in [(0, 3, 8), (2, 0, 8), (1, 1, 8), (2, 3, 1), (1, 8)]:
        out.append(("rms_norm", shape))
        out.append(("add_layer_norm", shape))
    for shape in [(0, 8), (3, 2), (1, 1, 2), (2, 0, 4)]:
        out.append(("swiglu", shape))
    for shape in [(0, 2, 3, 3, 8), (1, 0, 3, 3, 8), (1, 2, 0, 3, 8), (1, 2, 3, 0, 8), (1, 1, 1, 1, 1),
                  (1, 2, 1, 17, 8), (1, 2, 17, 1, 8)]:
        out.append(("attention", shape))
    for shape in [(0, 5, 8), (1, 1, 8), (3, 1, 1), (3, 5, 0)]:
        out.append(("fused_linear_cross_entropy", shape))
    return out


SIZES = _size_cases()


@pytest.mark.parametrize("op,shape", SIZES, ids=[f"{o}-{'x'.join(map(str, s))}" for o, s in SIZES])
def test_size_zero_and_one_dims_forward_and_backward_match_float64(op, shape):
    if op in ("rms_norm", "add_layer_norm"):
        n = shape[-1]
        inputs = [randn(20, *shape), randn(21, *shape), randn(22, n), randn(23, n)]
        if op == "rms_norm":
            inputs = inputs[0::2][:2]
            fn, ref_fn = (lambda x, w: (ops.rms_norm(x, w),)), (lambda x, w: (F.rms_norm(x, (n,), w, 1e-6),))
        else:
            fn = lambda x, r, w, b: ops.add_layer_norm(x, r, w, b)                               # noqa: E731
            ref_fn = lambda x, r, w, b: (F.layer_norm(x + r, (n,), w, b, 1e-5), x + r)        # noqa: E731
    elif op == "swiglu":
        f = shape[-1] // 2
        inputs = [randn(24, *shape)]
        fn, ref_fn = (lambda x: (ops.swiglu(x),)), (lambda x: (F.silu(x[..., :f]) * x[..., f:],))
    elif op == "attention":
        b, h, nq, nk, d = shape
        inputs = [randn(25, b, h, nq, d), randn(26, b, 1, nk, d), randn(27, b, 1, nk, d)]
        fn = lambda q, k, v: (tilestack.attention(q, k, v, causal=True, causal_align="bottom_right"),)  # noqa: E731
        mask = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)

        def ref_fn(q, k, v):
            if 0 in q.shape or 0 in k.shape:     # torch's SDPA of an empty tensor: zeros of the output's shape
                return (q.new_zeros(b, h, nq, d) * (q.sum() + k.sum() + v.sum()),)
            return (F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),)
    else:
        t, v, d = shape
        labels = torch.arange(t) % max(v, 1)
        inputs = [randn(28, t, d), randn(29, v, d)]
        fn = lambda x, w: (ops.fused_linear_cross_entropy(x, w, labels),)                       # noqa: E731
        ref_fn = lambda x, w: (F.cross_entropy(x @ w.T, labels),)                                # noqa: E731
    leaves = [t.clone().requires_grad_() for t in inputs]
    refs = [t.double().requires_grad_() for t in inputs]
    with config.override(backend="reference"), poisoned_allocations():
        got = fn(*leaves)
        sum((o * o).sum() for o in got).backward()
    want = ref_fn(*refs)
    if any(w.requires_grad for w in want):
        sum((o * o).sum() for o in want).backward()
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        close(g, w, 2e-5, f"{op} {shape} output {k}")
    for i, (leaf, ref) in enumerate(zip(leaves, refs, strict=True)):
        want_grad = ref.grad if ref.grad is not None else torch.zeros_like(ref)
        close(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf), want_grad, 2e-5,
              f"{op} {shape} gradient {i}")


# ---- attention masks, GQA, dropout, causal around the tile ---------------------------------------------------------
B, H, HKV, NQ, NK, D, DV = 2, 4, 2, 5, 7, 8, 6


def _masks():
    g = gen(30)
    bools = torch.rand(B, H, NQ, NK, generator=g) > 0.4
    return {
        "head-broadcast float (1, H, 1, Nk)": torch.randn(1, H, 1, NK, generator=g),
        "row-broadcast bool (B, 1, Nq, 1)": bools[:, :1, :, :1],
        "expanded bool": bools[:1, :1, :1].expand(B, H, NQ, NK),
        "transposed float": torch.randn(NK, NQ, generator=g).T,
        "bool with a row of False": bools[0, 0].index_fill(0, torch.tensor([1]), False),
        "-inf row": torch.zeros(NQ, NK).index_fill(0, torch.tensor([2]), float("-inf")),
        "finfo.min row": torch.zeros(NQ, NK).index_fill(0, torch.tensor([3]), torch.finfo(torch.float32).min),
        "NaN entries": torch.zeros(NQ, NK).index_put((torch.tensor([0, 4]), torch.tensor([1, 6])),
                                                     torch.tensor(float("nan"))),
        "+inf entries": torch.zeros(NQ, NK).index_put((torch.tensor([1, 1, 3]), torch.tensor([0, 5, 2])),
                                                      torch.tensor(float("inf"))),
    }


MASKS = list(_masks())


def attention64(q, k, v, mask=None, keep=None, p=0.0):
    """float64 attention by its formula (GQA by repeating k/v's heads; a row that sees no key gives 0, as torch's
    SDPA; ``keep``: the dropout mask, kept entries scaled by 1 / (1 - p))."""
    rep = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s + (torch.zeros_like(mask, dtype=s.dtype).masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                 else mask.double())
    empty = (s == float("-inf")).all(-1, keepdim=True)
    p_ = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    if keep is not None:
        p_ = p_ * keep.double() / (1 - p)
    return p_ @ v.repeat_interleave(rep, 1)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("mask", MASKS)
def test_attention_masks_gqa_and_dropout_match_float64(mask, dropout):
    m = _masks()[mask]
    q, k, v = randn(31, B, H, NQ, D), randn(32, B, HKV, NK, D), randn(33, B, HKV, NK, DV)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    refs = [t.double().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(2251)
    with config.override(backend="reference"), poisoned_allocations():
        o = tilestack.attention(*leaves, attn_mask=m, dropout_p=dropout)
        (o * o).sum().backward()
    keep = None
    if dropout:
        torch.manual_seed(2251)                   # the stream the call drew
        keep = dropout_mask(dropout_rng(), dropout, (B, H, NQ, NK))
    want = attention64(*refs, m, keep, dropout)
    (want * want).sum().backward()
    close(o, want, 2e-5, f"{mask} o")
    for name, leaf, ref in zip("qkv", leaves, refs, strict=True):
        close(leaf.grad, ref.grad, 2e-5, f"{mask} d{name}")


CAUSAL = [(nq, nk, align) for nq, nk in [(15, 17), (17, 15), (16, 33), (33, 16), (1, 17), (17, 1)]
          for align in ("top_left", "bottom_right")]


@pytest.mark.parametrize("nq,nk,align", CAUSAL, ids=[f"{a}-{b}-{c}" for a, b, c in CAUSAL])
def test_causal_with_nq_not_nk_around_the_tile(nq, nk, align):
    q, k, v = randn(34, 1, 2, nq, 8), randn(35, 1, 1, nk, 8), randn(36, 1, 1, nk, 4)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    refs = [t.double().requires_grad_() for t in (q, k, v)]
    with config.override(backend="reference"), poisoned_allocations():
        o = tilestack.attention(*leaves, causal=True, causal_align=align, scale=0.7)
        (o * o).sum().backward()
    mask = torch.ones(nq, nk, dtype=torch.bool).tril(0 if align == "top_left" else nk - nq)
    refs_scaled = [refs[0] * (0.7 * 8 ** 0.5), refs[1], refs[2]]      # attention64 scales by D**-0.5
    want = attention64(*refs_scaled, mask)
    (want * want).sum().backward()
    close(o, want, 2e-5, "o")
    for name, leaf, ref in zip("qkv", leaves, refs, strict=True):
        close(leaf.grad, ref.grad, 2e-5, f"d{name}")


# ---- the fused cross-entropy on x and weight of every layout --------------------------------------------------------
def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "transposed":
        return t.T.contiguous().T
    if kind == "every other column":
        base = torch.full((t.shape[0], 2 * t.shape[1]), float("nan"), dtype=t.dtype)
        base[:, ::2] = t
        return base[:, ::2]
    if kind == "expanded rows":
        return t[:1].expand(t.shape)
    if kind == "storage offset":
        base = torch.full((t.shape[0] + 1, t.shape[1]), float("nan"), dtype=t.dtype)
        base[1:] = t
        return base[1:]
    return t.clone()


LAYOUTS = ["contiguous", "transposed", "every other column", "expanded rows", "storage offset"]
CE = [(lx, lw, dt) for lx in LAYOUTS for lw in LAYOUTS for dt in (torch.float32, torch.bfloat16)
      if lx == "contiguous" or lw == "contiguous" or lx == lw]


@pytest.mark.parametrize("lx,lw,dtype", CE, ids=[f"{a}-{b}-{str(c)[6:]}" for a, b, c in CE])
def test_fused_cross_entropy_on_every_layout(lx, lw, dtype):
    labels = torch.tensor([0, 69, -100, 5, 64, 63])            # V = 70: one past a 64-wide row, the last class
    x, w = _layout(randn(37, 6, 8, dtype=dtype), lx), _layout(randn(38, 70, 8, dtype=dtype), lw)
    xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    with config.override(backend="reference"), poisoned_allocations():
        loss = ops.fused_linear_cross_entropy(xl, wl, labels)
        (loss * 3).backward()
    want = F.cross_entropy(xd @ wd.T, labels)
    (want * 3).backward()
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    close(loss, want, tol, "loss")
    close(xl.grad, xd.grad, tol, "dx")
    close(wl.grad, wd.grad, tol, "dw")
    assert xl.grad.dtype == dtype and wl.grad.dtype == dtype


# ---- bad inputs, refused by name before any work --------------------------------------------------------------------
X, W, BB, R = randn(40, 4, 8), randn(41, 8), randn(42, 8), randn(43, 4, 8)
Q, KK, VV = randn(44, 1, 2, 3, 8), randn(45, 1, 2, 5, 8), randn(46, 1, 2, 5, 8)
Q16, K16 = randn(47, 1, 3, 2, 16), randn(48, 1, 3, 1, 16)
LM, LAB4 = randn(49, 10, 8), torch.tensor([0, 1, 2, 3])
A16, B16 = randn(50, 4, 8, dtype=torch.float16), randn(51, 8, 6, dtype=torch.float16)

BAD = [
    ("attention meta q, cpu k", "k", lambda: tilestack.attention(Q.to("meta"), KK, VV)),
    ("attention k of another D", "k", lambda: tilestack.attention(Q, KK[..., :4], VV)),
    ("attention v of another Nk", "v", lambda: tilestack.attention(Q, KK, VV[:, :, :4])),
    ("attention 6 heads over 4", "H", lambda: tilestack.attention(randn(52, 1, 6, 3, 8), randn(53, 1, 4, 5, 8),
                                                                  randn(54, 1, 4, 5, 8))),
    ("attention causal_align unknown", "causal_align",
     lambda: tilestack.attention(Q, KK, VV, causal=True, causal_align="bottom")),
    ("attention dropout 1.5", "dropout_p", lambda: tilestack.attention(Q, KK, VV, dropout_p=1.5)),
    ("attention dropout NaN", "dropout_p", lambda: tilestack.attention(Q, KK, VV, dropout_p=float("nan"))),
    ("attention dropout True", "dropout_p", lambda: tilestack.attention(Q, KK, VV, dropout_p=True)),
    ("attention scale 0", "scale", lambda: tilestack.attention(Q, KK, VV, scale=0.0)),
    ("attention scale negative", "scale", lambda: tilestack.attention(Q, KK, VV, scale=-1.0)),
    ("attention scale NaN", "scale", lambda: tilestack.attention(Q, KK, VV, scale=float("nan"))),
    ("attention scale inf", "scale", lambda: tilestack.attention(Q, KK, VV, scale=float("inf"))),
    ("attention scale str", "scale", lambda: tilestack.attention(Q, KK, VV, scale="0.5")),
    ("attention bool q", "q", lambda: tilestack.attention(Q > 0, KK > 0, VV > 0)),
    ("attention mask of another Nk", "attn_mask", lambda: tilestack.attention(Q, KK, VV, attn_mask=torch.zeros(3, 4))),
    ("attention complex mask", "attn_mask",
     lambda: tilestack.attention(Q, KK, VV, attn_mask=torch.zeros(3, 5, dtype=torch.complex64))),
    ("attention f16 mask, f32 q", "attn_mask",
     lambda: tilestack.attention(Q, KK, VV, attn_mask=torch.zeros(3, 5, dtype=torch.float16))),
    ("attention list mask", "attn_mask", lambda: tilestack.attention(Q, KK, VV, attn_mask=[[True]])),
    ("attention mask requires grad", "attn_mask",
     lambda: tilestack.attention(Q, KK, VV, attn_mask=torch.zeros(3, 5).requires_grad_())),
    ("attention head dim 0", "D", lambda: tilestack.attention(randn(55, 1, 1, 2, 0), randn(56, 1, 1, 2, 0),
                                                              randn(57, 1, 1, 2, 4))),
    ("attention head dim 300", "D", lambda: tilestack.attention(randn(58, 1, 1, 2, 300), randn(59, 1, 1, 2, 300),
                                                                randn(60, 1, 1, 2, 4))),
    ("rms weight of 7", "weight", lambda: ops.rms_norm(X, W[:7])),
    ("layer_norm bias of 7", "bias", lambda: ops.layer_norm(X, W, BB[:7])),
    ("rms bool x", "x", lambda: ops.rms_norm(X > 0, W)),
    ("rms meta weight", "weight", lambda: ops.rms_norm(X, W.to("meta"))),
    ("add_rms meta r", "r", lambda: ops.add_rms_norm(X, R.to("meta"), W)),
    ("add_rms r None", "r", lambda: ops.add_rms_norm(X, None, W)),
    ("add_rms r transposed shape", "r", lambda: ops.add_rms_norm(X, R.T, W)),
    ("add_rms r python", "r", lambda: ops.add_rms_norm(X, 1.0, W)),
    ("add_layer_norm r 3-D", "r", lambda: ops.add_layer_norm(X, R[None], W, BB)),
    ("layer_norm eps list", "eps", lambda: ops.layer_norm(X, W, BB, eps=[1e-5])),
    ("layer_norm eps -inf", "eps", lambda: ops.layer_norm(X, W, BB, eps=float("-inf"))),
    ("layer_norm eps NaN", "eps", lambda: ops.layer_norm(X, W, BB, eps=float("nan"))),
    ("rms eps negative", "eps", lambda: ops.rms_norm(X, W, -1e-6)),
    ("rotary cos requires grad", "cos", lambda: ops.rotary(Q16, K16, COS.clone().requires_grad_(), SIN)),
    ("rotary f16 sin", "sin", lambda: ops.rotary(Q16, K16, COS, SIN.half())),
    ("rotary head dim 12", "D", lambda: ops.rotary(randn(61, 1, 3, 2, 12), randn(62, 1, 3, 1, 12), COS[:, :6],
                                                   SIN[:, :6])),
    ("rotary k of another batch", "k", lambda: ops.rotary(Q16, randn(63, 2, 3, 1, 16), COS, SIN)),
    ("rotary cos 3-D", "cos", lambda: ops.rotary(Q16, K16, COS[None], SIN)),
    ("rotary tables of another N", "cos", lambda: ops.rotary(Q16, K16, *rotary_tables(8, 16))),
    ("rotary k None", "k", lambda: ops.rotary(Q16, None, COS, SIN)),
    ("swiglu bool", "x", lambda: ops.swiglu(X > 0)),
    ("swiglu complex", "x", lambda: ops.swiglu(X.cfloat())),
    ("swiglu 0-d", "x", lambda: ops.swiglu(torch.tensor(2.0))),
    ("swiglu sparse", "x", lambda: ops.swiglu(X.to_sparse())),
    ("ce labels of 3", "labels", lambda: ops.fused_linear_cross_entropy(X, LM, LAB4[:3])),
    ("ce x 3-D", "x", lambda: ops.fused_linear_cross_entropy(X[None], LM, LAB4)),
    ("ce weight 1-D", "weight", lambda: ops.fused_linear_cross_entropy(X, LM[0], LAB4)),
    ("ce weight of another d", "weight", lambda: ops.fused_linear_cross_entropy(X, LM[:, :7], LAB4)),
    ("ce ignore_index float", "ignore_index",
     lambda: ops.fused_linear_cross_entropy(X, LM, LAB4, ignore_index=-100.0)),
    ("ce ignore_index bool", "ignore_index", lambda: ops.fused_linear_cross_entropy(X, LM, LAB4, ignore_index=True)),
    ("ce ignore_index past int64", "ignore_index",
     lambda: ops.fused_linear_cross_entropy(X, LM, LAB4, ignore_index=2**70)),
    ("ce ignore_index None", "ignore_index", lambda: ops.fused_linear_cross_entropy(X, LM, LAB4, ignore_index=None)),
    ("ce labels list", "labels", lambda: ops.fused_linear_cross_entropy(X, LM, [0, 1, 2, 3])),
    ("ce meta labels", "labels", lambda: ops.fused_linear_cross_entropy(X, LM, LAB4.to("meta"))),
    ("ce bool x", "x", lambda: ops.fused_linear_cross_entropy(X > 0, LM, LAB4)),
    ("ce label past V", "labels", lambda: ops.fused_linear_cross_entropy(X, LM, torch.tensor([0, 1, 2, 10]))),
    ("ce label -1", "labels", lambda: ops.fused_linear_cross_entropy(X, LM, torch.tensor([0, -1, 2, 3]))),
    ("ce int8 labels", "labels", lambda: ops.fused_linear_cross_entropy(X, LM, LAB4.to(torch.int8))),
    ("gemm 3-D a", "a", lambda: K.gemm(A16[None], B16)),
    ("gemm K mismatch", "b", lambda: K.gemm(A16, B16[:7])),
    ("gemm bias of 5", "bias", lambda: K.gemm(A16, B16, bias=torch.zeros(5))),
    ("gemm residual (4, 5)", "residual", lambda: K.gemm(A16, B16, residual=torch.zeros(4, 5))),
    ("gemm f32 out for f16", "out", lambda: K.gemm(A16, B16, out=torch.zeros(4, 6))),
    ("gemm out (4, 5)", "out", lambda: K.gemm(A16, B16, out=torch.zeros(4, 5, dtype=torch.float16))),
    ("gemm str out", "out", lambda: K.gemm(A16, B16, out="x")),
    ("gemm int activation", "activation", lambda: K.gemm(A16, B16, activation=1)),
    ("gemm GELU upper case", "activation", lambda: K.gemm(A16, B16, activation="GELU")),
    ("gemm int32 bias", "bias", lambda: K.gemm(A16, B16, bias=torch.zeros(6, dtype=torch.int32))),
    ("gemm out aliasing a", "out", lambda: K.gemm(A16, randn(64, 8, 8, dtype=torch.float16), out=A16)),
    ("softmax f64", "x", lambda: K.softmax(X.double())),
    ("softmax 3-D", "x", lambda: K.softmax(X[None])),
    ("softmax out (4, 7)", "out", lambda: K.softmax(X, out=torch.empty(4, 7))),
    ("softmax f16 out", "out", lambda: K.softmax(X, out=torch.empty(4, 8, dtype=torch.float16))),
    ("softmax out=x", "out", lambda: (lambda t: K.softmax(t, out=t))(X.clone())),
    ("softmax list", "x", lambda: K.softmax([1.0])),
]


@pytest.mark.parametrize("case", range(len(BAD)), ids=[b[0] for b in BAD])
def test_bad_inputs_refused_by_name_before_any_work(case, monkeypatch):
    name, arg, call = BAD[case]
    kernel_module = importlib.import_module("tilestack.lang.kernel")

    def launched(*args, **kwargs):
        raise AssertionError(f"{name}: a kernel launched before the bad {arg} was refused")
    monkeypatch.setattr(kernel_module.Kernel, "launcher_for", launched, raising=False)
    with config.override(backend="reference"), pytest.raises(LaunchError, match=rf"\b{arg}\b"):
        call()


# ---- a non-finite loss gradient and the rows cross-entropy ignores --------------------------------------------------
# (times inf only where no row is labelled: elsewhere torch's inf meets the logits' gradient before its GEMM makes
# inf - inf = NaN of dx, where the kernels' dx, made for 1 and scaled after, is +-inf: the same limit, another order)
CE_NAN = [(labels, path, upstream) for labels in ("all ignored", "one ignored", "none ignored", "no rows")
          for path in ("eager", "op") for upstream in ("loss squared", "times inf")
          if upstream == "loss squared" or labels in ("all ignored", "no rows")]


@pytest.mark.parametrize("labels,path,upstream", CE_NAN, ids=["-".join(c) for c in CE_NAN])
def test_fused_cross_entropy_ignored_rows_keep_zero_gradients_under_a_nan_loss_gradient(labels, path, upstream):
    """The loss of a batch whose rows are all ignored is NaN (0 / 0, as torch's); squared (or scaled by inf) on its
    way to the backward, its gradient is NaN too. Ignored rows, and the weight where no row is labelled, do not
    reach the loss: their gradient is 0 in torch whatever comes back, and NaN elsewhere. (Before the fix the saved
    zero gradients were scaled into 0 * NaN = NaN.)"""
    rows = {"all ignored": [-100, -100, -100], "one ignored": [1, -100, 4], "none ignored": [0, 2, 4],
            "no rows": []}[labels]
    lab = torch.tensor(rows, dtype=torch.long)
    x, w = randn(70, len(rows), 8), randn(71, 5, 8)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()

    def up(loss):
        return loss * loss if upstream == "loss squared" else loss * float("inf")
    with config.override(backend="reference"), poisoned_allocations():
        loss = (ops.fused_linear_cross_entropy(xl, wl, lab) if path == "eager" else
                torch.ops.tilestack.fused_linear_cross_entropy(xl, wl, lab, -100)[0])
        up(loss).backward()
    want = F.cross_entropy(xd @ wd.T, lab)
    up(want).backward()
    close(loss, want, 2e-5, "loss")
    close(xl.grad, xd.grad, 2e-5, "dx")
    close(wl.grad, wd.grad, 2e-5, "dw")
