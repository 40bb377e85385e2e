"""Attention as a drop-in for torch's scaled_dot_product_attention (issue 8 item 6, kernel side; issue 9 item 8),
on both CPU backends against float64: both causal alignments with Nq != Nk both ways, every head dim 1..256
(80, 96, 112 included) and Dv != D, fp32 inputs, and an additive or boolean ``attn_mask`` broadcast to
(B, H, Nq, Nk), fully masked rows included. The float64 reference is itself checked against torch's math
backend first, so every comparison below is a comparison with torch.
"""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from test_attention import BACKENDS, TOL, check_against_float64, float64_truth, inputs, randn, rel

from tilestack.errors import LaunchError
from tilestack.kernels.attention_fwd import attention_forward, mask_as_bias, reference

fwd_module = importlib.import_module("tilestack.kernels.attention_fwd")
bwd_module = importlib.import_module("tilestack.kernels.attention_bwd")
HALF = (torch.bfloat16, torch.float16)
ALIGNS = ("top_left", "bottom_right")


def masks(rng, B, H, Nq, Nk, dtype) -> dict:
    """Masks of every kind torch accepts, broadcast from different shapes, with and without fully masked rows."""
    def bools(shape, p_keep=0.7):
        return torch.from_numpy(rng.random(shape) < p_keep)

    keep = bools((Nq, Nk))
    keep[1] = False                                                       # query row 1 sees no key
    padding = bools((B, 1, 1, Nk), 0.8)
    padding[-1] = False                                                   # the last batch has no key at all
    bias = 2.0 * randn(rng, (B, H, Nq, Nk), dtype)
    neg_inf = torch.where(bools((B, 1, Nq, Nk)), 0.0, -math.inf).to(dtype)
    neg_inf[0, 0, 2] = -math.inf                                          # a fully masked row, additively
    slopes = torch.arange(1, H + 1, dtype=torch.float32)[:, None, None] / H   # ALiBi-like: (H, 1, Nk), fp32
    alibi = -slopes * torch.arange(Nk, dtype=torch.float32)
    hf_min = torch.where(bools((Nq, Nk)), 0.0, torch.finfo(torch.float32).min)   # Hugging Face's masking value
    hf_min[:, 0] = 0.0                                                    # (no row masked everywhere: see fwd doc)
    return {"bool-qk": keep, "bool-key-padding": padding, "bias-bhqk": bias, "neg-inf-b1qk": neg_inf,
            "alibi-f32-h1k": alibi, "finfo-min-f32": hf_min}


# ---- the reference is torch's math backend ---------------------------------------------------------------------------
def torch_math(q, k, v, causal, scale, attn_mask=None, causal_align="top_left"):
    """torch's math backend in float64 (bottom-right causal as an explicit mask, GQA through enable_gqa)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    nq, nk = q.shape[2], k.shape[2]
    if causal and causal_align == "bottom_right":
        tri = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
        attn_mask = tri if attn_mask is None else (
            attn_mask & tri if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~tri, -math.inf))
        causal = False
    if causal and attn_mask is not None:       # SDPA takes one or the other: fold the causal mask in
        tri = torch.ones(nq, nk, dtype=torch.bool).tril()
        attn_mask = attn_mask & tri if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~tri, -math.inf)
        causal = False
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.double()
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("align", ALIGNS)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("mask", [None, "bool-qk", "bool-key-padding", "bias-bhqk", "neg-inf-b1qk", "alibi-f32-h1k",
                                  "finfo-min-f32"])
@pytest.mark.parametrize("nq,nk", [(13, 21), (21, 13)], ids=str)
def test_reference_is_torchs_math_backend(nq, nk, mask, causal, align, rng):
    q, k, v, do, _ = inputs(rng, (2, 4, 2, nq, nk, 16, None), torch.float64, dv=24)
    kw = dict(attn_mask=None if mask is None else masks(rng, 2, 4, nq, nk, torch.float64)[mask], causal_align=align)
    ours, theirs = [], []
    for fn, out in ((reference, ours), (torch_math, theirs)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = fn(*leaves, causal, 0.3, **kw)
        o = o[0] if isinstance(o, tuple) else o
        o.backward(do)
        out += [o.detach(), *(t.grad for t in leaves)]
    for name, a, b in zip(("o", "dq", "dk", "dv"), ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


# ---- causal alignment ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("align", ALIGNS)
@pytest.mark.parametrize("nq,nk", [(13, 40), (40, 13), (1, 37), (37, 37)], ids=str)
def test_causal_alignment(backend, dtype, align, nq, nk, rng, poison_empty):
    """Nq < Nk and Nq > Nk both ways: bottom-right with Nq > Nk leaves the first Nq - Nk rows with no key
    (o = 0, lse = -inf, zero gradients). One query row aligned top-left sees one key: P = 1, o = v_0 and
    dS = dO.v_0 - dO.o, zero exactly, so dq and dk are zero and the kernels' are the f32 rounding of that
    difference (about 1e-6 here), measured against rel()'s 1e-3 floor: a wider bound there."""
    q, k, v, do, scale = inputs(rng, (1, 4, 2, nq, nk, 16, None), dtype)
    single = nq == 1 and align == "top_left"
    o, lse, _ = check_against_float64(backend, q, k, v, do, True, scale, causal_align=align,
                                      grad_scale=4.0 if single else 1.0)
    if align == "bottom_right" and nq > nk:
        assert torch.equal(o[:, :, : nq - nk], torch.zeros_like(o[:, :, : nq - nk]))
        assert bool(torch.isneginf(lse[:, :, : nq - nk]).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("BM,BN", [(32, 16), (16, 32)], ids=str)
@pytest.mark.parametrize("nq,nk", [(70, 53), (53, 70)], ids=str)
def test_bottom_right_block_shapes(backend, BM, BN, nq, nk, rng, poison_empty):
    """The loop bounds of both alignments when BM != BN: over key blocks in the forward and dQ, over query
    blocks in dK/dV, with the diagonal shifted by Nk - Nq (negative included)."""
    q, k, v, do, scale = inputs(rng, (1, 2, 1, nq, nk, 16, None), torch.bfloat16)
    small = dict(num_warps=4, num_stages=1)
    fwd = dict(BM=BM, BN=BN) | small
    bwd = {"delta": dict(BM=BM) | small, "dkdv": dict(BM=BM, BN=BN) | small, "dq": dict(BM=BM, BN=BN) | small}
    check_against_float64(backend, q, k, v, do, True, scale, fwd, bwd, causal_align="bottom_right")


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoding_one_query_sees_the_whole_cache(backend, rng):
    """Bottom-right: the one new query attends to every cached key (top-left would see key 0 only)."""
    q, k, v, _, _ = inputs(rng, (2, 4, 1, 1, 45, 64, None), torch.float16)
    o_causal, lse_causal = attention_forward(q, k, v, True, backend=backend, causal_align="bottom_right")
    o_full, lse_full = attention_forward(q, k, v, False, backend=backend)
    assert torch.equal(o_causal, o_full) and torch.equal(lse_causal, lse_full)


# ---- head dims, Dv != D, fp32 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d,dv", [(1, 1), (8, 8), (24, 24), (80, 80), (96, 96), (112, 112), (200, 200), (32, 80),
                                  (80, 16), (1, 64), (256, 8)], ids=str)
def test_head_dims(backend, d, dv, rng, poison_empty):
    """Tiles are the head dim rounded up to a power of two >= 16: loads zero-fill, stores drop the edge."""
    causal = d % 2 == 0
    q, k, v, do, scale = inputs(rng, (1, 2, 1, 19, 23, d, None), torch.bfloat16, dv=dv)
    grad_scale, o_tol = 1.0, None
    if min(d, dv) == 1:
        # a head dim of 1: each gradient element is a short sum that cancels, so bf16 dS alone can cost several
        # percent (seen: 8% on dq for one seed in 100); the yardstick is torch's own bf16 attention on the inputs
        grad_scale = max(3.0, 2 * _torch_bf16_grad_error(q, k, v, do, causal) / TOL[torch.bfloat16])
        # o of one column is a short sum P v that cancels too (seen: 1.5% for seed 3928911029)
        o_tol = max(TOL[torch.bfloat16], p_rounding_tol(q, k, v, causal))
    check_against_float64(backend, q, k, v, do, causal, scale, grad_scale=grad_scale, o_tol=o_tol)


def p_rounding_tol(q, k, v, causal) -> float:
    """o's norm error, relative to its norm, when P is rounded to bf16 before P V as the kernels (and
    FlashAttention) do: each p_j off by up to bf16's eps relative (truncation, the interpreter's cast: a bias of
    eps/2 on every p_j, which moves o by eps/2 of itself, and a spread of eps/sqrt(12)), so an element of o is off
    by its bias plus three standard deviations of the spread, eps/sqrt(12) * sqrt(sum_j p_j^2 v_j^2), plus o's own
    rounding; K/V heads repeated for GQA."""
    eps = torch.finfo(torch.bfloat16).eps
    group = q.shape[1] // k.shape[1]
    k64, v64 = (t.double().repeat_interleave(group, 1) for t in (k, v))
    s = q.double() @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    p = torch.softmax(s, -1)
    o = p @ v64
    bound = 1.5 * eps * o.abs() + 3 * eps / math.sqrt(12) * (p.square() @ v64.square()).sqrt()
    return float(bound.norm() / o.norm().clamp_min(1e-3))


def _torch_bf16_grad_error(q, k, v, do, causal) -> float:
    """The largest relative gradient error of torch's SDPA in bf16 (K/V heads repeated) against float64."""
    from test_attention import float64_truth

    group = q.shape[1] // k.shape[1]
    qb, kb, vb = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(qb, kb.repeat_interleave(group, 1),
                                                         vb.repeat_interleave(group, 1), is_causal=causal)
    o.backward(do)
    _, _, grads64 = float64_truth(q, k, v, do, causal, None)
    return max(rel(t.grad, g) for t, g in zip((qb, kb, vb), grads64, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [(False, None, "top_left"), (True, None, "top_left"),
                                  (True, "bool-qk", "bottom_right"), (False, "bias-bhqk", "top_left")], ids=str)
def test_float32(backend, case, rng, poison_empty):
    causal, mask, align = case
    q, k, v, do, scale = inputs(rng, (1, 2, 1, 21, 18, 48, None), torch.float32)
    attn_mask = None if mask is None else masks(rng, 1, 2, 21, 18, torch.float32)[mask]
    check_against_float64(backend, q, k, v, do, causal, scale, attn_mask=attn_mask, causal_align=align)


TF32_TOL = 2e-3     # the documented bound of fp32 through tf32 (attention_fwd's docstring), o and gradients
IEEE_TOL = 1e-4     # IEEE f32 products: f32 rounding only (typically 5e-7; a gradient whose terms cancel: 3e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_float32_through_tf32(backend, causal, rng, poison_empty):
    """fp32 inputs through the tf32 matrix units (operands rounded to 10-bit mantissas, as on a GPU; the CPU
    backends round them too): o and the gradients within the documented bound of float64, and clearly worse
    than IEEE f32 products (the rounding really happens); both CPU backends agree."""
    q, k, v, do, scale = inputs(rng, (1, 2, 1, 21, 18, 48, None), torch.float32)
    attention_backward = bwd_module.attention_backward
    o64, _, grads64 = float64_truth(q, k, v, do, causal, scale)
    errs, outs = {}, {}
    for precision in ("ieee", "tf32"):
        o, lse = attention_forward(q, k, v, causal, scale, backend=backend, precision=precision)
        grads = attention_backward(q, k, v, o, lse, do, causal, scale, backend=backend, precision=precision)
        outs[precision] = (o, *grads)
        errs[precision] = [rel(o, o64)] + [rel(g, g64) for g, g64 in zip(grads, grads64, strict=True)]
    assert max(errs["ieee"]) <= IEEE_TOL, errs
    assert max(errs["tf32"]) <= TF32_TOL, errs
    # the rounding really happens, on every output (each against its own IEEE error: a gradient whose terms
    # cancel is worse in both)
    assert all(t > 5 * i for t, i in zip(errs["tf32"], errs["ieee"], strict=True)), errs
    if backend == "triton":
        # the same roundings, but f32 results that differ in their last bit (NumPy's f32 exp2 against float64's
        # rounded) can flip the tf32 rounding of a P entry that sits near a tie: that row of o moves by up to 2**-11
        # of one term (seen over 60 seeds: at most 2 rows of 42; every output at most 0.32 as far from the other
        # backend's tf32 result as from IEEE's)
        o, lse = attention_forward(q, k, v, causal, scale, backend="reference", precision="tf32")
        grads = attention_backward(q, k, v, o, lse, do, causal, scale, backend="reference", precision="tf32")
        assert int(((outs["tf32"][0] - o).abs().amax(-1) > 1e-5).sum()) <= 3
        for a, b, c in zip(outs["tf32"], (o, *grads), outs["ieee"], strict=True):
            assert rel(a, b) <= 0.5 * rel(a, c), (rel(a, b), rel(a, c))


def test_tilestack_attention_follows_torchs_matmul_precision(rng):
    """tf32 exactly when torch's own fp32 matmuls use it (torch.backends.cuda.matmul.allow_tf32, which
    set_float32_matmul_precision("high") turns on); "highest", torch's default, keeps IEEE f32."""
    import tilestack
    from tilestack import config

    q, k, v, _, _ = inputs(rng, (1, 2, 1, 9, 12, 16, None), torch.float32)
    want = {p: attention_forward(q, k, v, backend="reference", precision=p)[0] for p in ("ieee", "tf32")}
    assert not torch.equal(want["ieee"], want["tf32"])
    before = torch.get_float32_matmul_precision()
    try:
        with config.override(backend="reference"):
            for setting, precision in (("highest", "ieee"), ("high", "tf32"), ("highest", "ieee")):
                torch.set_float32_matmul_precision(setting)
                assert torch.equal(tilestack.attention(q, k, v), want[precision]), setting
            torch.set_float32_matmul_precision("high")
            half = tuple(t.to(torch.bfloat16) for t in (q, k, v))     # half inputs: exact either way
            assert torch.equal(tilestack.attention(*half), attention_forward(*half, backend="reference")[0])
    finally:
        torch.set_float32_matmul_precision(before)


# ---- attn_mask -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask,causal,align", [
    ("bool-qk", False, "top_left"), ("bool-qk", True, "bottom_right"), ("bool-key-padding", True, "top_left"),
    ("bias-bhqk", False, "top_left"), ("bias-bhqk", True, "bottom_right"), ("neg-inf-b1qk", True, "top_left"),
    ("alibi-f32-h1k", True, "bottom_right"), ("finfo-min-f32", False, "top_left")], ids=str)
def test_attn_mask(backend, mask, causal, align, rng, poison_empty):
    """Each kind of mask (GQA: the mask's H counts query heads), with either alignment."""
    B, H, Hkv, Nq, Nk = 2, 2, 1, 19, 21
    q, k, v, do, scale = inputs(rng, (B, H, Hkv, Nq, Nk, 32, None), torch.bfloat16)
    attn_mask = masks(rng, B, H, Nq, Nk, torch.bfloat16)[mask]
    check_against_float64(backend, q, k, v, do, causal, scale, attn_mask=attn_mask, causal_align=align)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_are_zero_as_torchs_math_backend(backend, rng):
    """A boolean mask with rows all False: torch's math backend gives o = 0 there and zero gradients."""
    q, k, v, do, scale = inputs(rng, (1, 2, 2, 9, 20, 16, None), torch.float16)
    keep = torch.ones(9, 20, dtype=torch.bool)
    keep[[0, 4, 8]] = False
    o, lse = attention_forward(q, k, v, backend=backend, attn_mask=keep)
    grads = bwd_module.attention_backward(q, k, v, o, lse, do, backend=backend, attn_mask=keep)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    o64 = torch_math(*leaves, False, None, attn_mask=keep)
    o64.backward(do.double())
    assert torch.equal(o[:, :, [0, 4, 8]], torch.zeros_like(o[:, :, [0, 4, 8]]))
    assert bool(torch.isneginf(lse[:, :, [0, 4, 8]]).all())
    assert rel(o, o64) <= TOL[torch.float16]
    for g, t in zip(grads, leaves, strict=True):
        assert rel(g, t.grad) <= TOL[torch.float16]


def test_masks_are_broadcast_views_not_copies():
    """A float mask reaches the kernel as an expanded view of the caller's tensor (zero strides, no copy); a
    boolean one is converted at its own size only."""
    bias = torch.randn(1, 4, 1, 33)
    view = mask_as_bias(bias, (2, 4, 19, 33))
    assert view.data_ptr() == bias.data_ptr() and view.stride() == (0, 33, 0, 1)
    keep = torch.rand(19, 33) < 0.5
    converted = mask_as_bias(keep, (2, 4, 19, 33))
    assert converted.stride()[:2] == (0, 0) and converted.untyped_storage().nbytes() == 19 * 33 * 2
    assert torch.equal(converted[1, 3] == 0, keep) and bool(torch.isneginf(converted[0, 0][~keep]).all())


# ---- argument errors, before any work --------------------------------------------------------------------------------
def _bad_cases():
    bf = torch.bfloat16
    q, k, v = torch.zeros(1, 4, 8, 16, dtype=bf), torch.zeros(1, 2, 6, 16, dtype=bf), torch.zeros(1, 2, 6, 16, dtype=bf)
    return q, k, v, {
        "mask wrong Nk": (dict(attn_mask=torch.zeros(8, 7, dtype=bf)),
                          r"attn_mask is \(8, 7\); expected a shape broadcastable to \(B, H, Nq, Nk\) = "
                          r"\(1, 4, 8, 6\)"),
        "mask heads of k/v": (dict(attn_mask=torch.zeros(1, 2, 8, 6, dtype=bf)), r"attn_mask is \(1, 2, 8, 6\)"),
        "mask rank 5": (dict(attn_mask=torch.zeros(1, 1, 4, 8, 6, dtype=bf)), r"attn_mask is \(1, 1, 4, 8, 6\)"),
        "mask int": (dict(attn_mask=torch.zeros(8, 6, dtype=torch.int32)),
                     r"attn_mask has dtype int32; expected one of bool, bfloat16"),
        "mask not a tensor": (dict(attn_mask=[[True]]), r"attn_mask must be a torch.Tensor, got list"),
        "mask on meta": (dict(attn_mask=torch.zeros(8, 6, dtype=bf, device="meta")), r"attn_mask on meta"),
        "align typo": (dict(causal_align="bottom-right"),
                       r"causal_align must be one of \('top_left', 'bottom_right'\), got 'bottom-right'"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()[3]))
def test_mask_and_alignment_bad_arguments(case, no_launch):
    q, k, v, cases = _bad_cases()
    kw, message = cases[case]
    for module in (fwd_module, bwd_module):
        no_launch(module, *(name for name in dir(module) if name.endswith("_kernel")))
    with pytest.raises(LaunchError, match=message) as e:
        fwd_module.attention_forward(q, k, v, True, backend="reference", **kw)
    assert str(e.value).startswith("attention_forward: ")
    o, lse = torch.zeros_like(q), torch.zeros(q.shape[:3])
    with pytest.raises(LaunchError, match=message) as e:
        bwd_module.attention_backward(q, k, v, o, lse, torch.zeros_like(q), True, backend="reference", **kw)
    assert str(e.value).startswith("attention_backward: ")
