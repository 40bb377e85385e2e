"""attention_forward and attention_backward on both backends against float64 PyTorch (attention_fwd.reference
and its autograd), for every variant: causal or not, head dims 16..256, MHA/GQA/MQA, Nq != Nk, ragged
lengths, bf16 and fp16, a custom scale, and block shapes other than the default. Outputs (o, lse, dq, dk, dv
and the backward's delta) are allocated by the functions, so they are poisoned through ``torch.empty``.
"""

import importlib
import math

import pytest
import torch

from tilestack.errors import LaunchError
from tilestack.kernels.attention_bwd import attention_backward
from tilestack.kernels.attention_fwd import attention_forward, reference

fwd_module = importlib.import_module("tilestack.kernels.attention_fwd")
bwd_module = importlib.import_module("tilestack.kernels.attention_bwd")

BACKENDS = ("reference", "triton")
DTYPES = (torch.bfloat16, torch.float16)
# relative (norm) error of o, dq, dk, dv. fp32 goes through the tf32 matrix units on a GPU (10-bit mantissas,
# as fp16): the CPU backends compute in f32 (or float64), so its bound is the GPU's, with fp16's margin
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-3}
LSE_TOL = 1e-4                                       # lse is f32, from exact products of the inputs
# Triton's interpreter casts f32 to bf16 by truncation, not rounding (tests/backends/test_ops_sweep.py): P and
# dS lose up to one ulp instead of half, and the gradients' error grows ~2.5x (measured: up to 1.6e-2 for dq/dk
# on the short causal d256 case over 20 seeds, against 6e-3 for the rounding reference executor)
TRUNCATION = {torch.bfloat16: 2.5, torch.float16: 1.0, torch.float32: 1.0}

# (B, H, Hkv, Nq, Nk, D, scale)
SHAPES = {
    "mha-ragged-d16": (1, 2, 2, 37, 37, 16, None),
    "gqa-nq<nk-d32": (2, 4, 2, 29, 45, 32, None),
    "mqa-nq>nk-d64": (1, 4, 1, 50, 21, 64, None),
    "tile-multiple-d16-scale": (1, 2, 1, 32, 16, 16, 0.7),
    "gqa-d32-small-scale": (1, 6, 3, 19, 33, 32, 0.05),
    "single-row-d16": (1, 2, 1, 1, 40, 16, None),   # causal: o = v[0] and dq = dk = 0 exactly
}
BIG_D = {     # the largest head dims: short sequences keep the interpreter quick
    "d128": (1, 2, 1, 21, 19, 128, None),
    "d256": (1, 2, 2, 33, 40, 256, 0.2),
}


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Norm error relative to the truth's norm, floored at 1e-3: an all-zero truth (the causal single row's
    dq) then asks for an error norm under 1e-3 * tol instead of exactly zero. NaN never passes."""
    got, want = got.double(), want.double()
    if not bool(got.isfinite().all()):
        return math.inf
    return float((got - want).norm() / want.norm().clamp_min(1e-3))


def randn(rng, shape, dtype) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


def inputs(rng, shape, dtype, dv=None):
    """q, k, v, do and the scale for a SHAPES-style tuple; ``dv``: v's head dim when it differs from D."""
    B, H, Hkv, Nq, Nk, D, scale = shape
    dv = D if dv is None else dv
    q = randn(rng, (B, H, Nq, D), dtype)
    k, v = randn(rng, (B, Hkv, Nk, D), dtype), randn(rng, (B, Hkv, Nk, dv), dtype)
    do = randn(rng, (B, H, Nq, dv), dtype)
    return q, k, v, do, scale


def float64_truth(q, k, v, do, causal, scale, **kw):
    """o, lse and (dq, dk, dv) in float64 from the inputs as their dtype holds them (``kw``: attn_mask,
    causal_align)."""
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64, lse64 = reference(q64, k64, v64, causal, scale, **kw)
    o64.backward(do.double())
    return o64.detach(), lse64.detach(), (q64.grad, k64.grad, v64.grad)


def lse_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """rel() over the finite entries of the truth; an infinite one (a row that sees no key: -inf) must be
    matched exactly."""
    inf = ~want.isfinite()
    if not torch.equal(got[inf], want[inf].to(got.dtype)):
        return math.inf
    return rel(got[~inf], want[~inf])


def check_against_float64(backend, q, k, v, do, causal, scale, fwd_cfg=None, bwd_cfg=None, grad_scale=1.0,
                          o_tol=None, **kw):
    """Forward and backward on ``backend`` against float64; ``kw``: attn_mask, causal_align. ``grad_scale`` widens
    the gradients' tolerance where few terms meet in a sum that cancels (head dim 1: dK and dV of 23 elements);
    ``o_tol`` replaces o's where its own sum cancels (see test_attention_sdpa.p_rounding_tol)."""
    dtype = q.dtype
    o, lse = attention_forward(q, k, v, causal, scale, backend=backend, **kw, **(fwd_cfg or {}))
    assert o.shape == (*q.shape[:3], v.shape[3]) and o.dtype == dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    grads = attention_backward(q, k, v, o, lse, do, causal, scale, backend=backend, config=bwd_cfg, **kw)
    o64, lse64, grads64 = float64_truth(q, k, v, do, causal, scale, **kw)
    grad_tol = TOL[dtype] * (TRUNCATION[dtype] if backend == "triton" else 1.0) * grad_scale
    tols = {"o": TOL[dtype] if o_tol is None else o_tol, "lse": LSE_TOL, "dq": grad_tol, "dk": grad_tol,
            "dv": grad_tol}
    errs = {"o": rel(o, o64), "lse": lse_error(lse, lse64)}
    for name, g, g64, t in zip(("dq", "dk", "dv"), grads, grads64, (q, k, v), strict=True):
        assert g.shape == t.shape and g.dtype == dtype, name
        errs[name] = rel(g, g64)
    bad = {n: e for n, e in errs.items() if not e <= tols[n]}
    assert not bad, f"relative errors over tolerance: {bad} (all: {errs})"
    return o, lse, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_attention_matches_float64(backend, dtype, causal, shape, rng, poison_empty):
    q, k, v, do, scale = inputs(rng, SHAPES[shape], dtype)
    check_against_float64(backend, q, k, v, do, causal, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("shape", list(BIG_D))
def test_attention_large_head_dims(backend, causal, shape, rng, poison_empty):
    q, k, v, do, scale = inputs(rng, BIG_D[shape], torch.bfloat16)
    check_against_float64(backend, q, k, v, do, causal, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("BM,BN", [(32, 16), (16, 32), (32, 32)], ids=str)
def test_attention_block_shapes(backend, causal, BM, BN, rng, poison_empty):
    """Blocks other than the CPU default (16x16): the causal loop bounds (full blocks, then the diagonal)
    differ when BM != BN, in the forward, in dK/dV (over query blocks) and in dQ (over key blocks)."""
    q, k, v, do, scale = inputs(rng, (1, 4, 2, 70, 53, 16, None), torch.bfloat16)
    small = dict(num_warps=4, num_stages=1)
    fwd = dict(BM=BM, BN=BN) | small
    bwd = {"delta": dict(BM=BM) | small, "dkdv": dict(BM=BM, BN=BN) | small, "dq": dict(BM=BM, BN=BN) | small}
    check_against_float64(backend, q, k, v, do, causal, scale, fwd, bwd)


@pytest.mark.parametrize("backend,dtype,causal,align", [
    *(("reference", dt, c, a) for dt in (torch.bfloat16, torch.float32)
      for c, a in ((False, "top_left"), (True, "top_left"), (True, "bottom_right"))),
    ("triton", torch.bfloat16, True, "bottom_right"), ("triton", torch.float32, False, "top_left")], ids=str)
def test_gqa_dkdv_per_query_head_matches_float64(backend, dtype, causal, align, rng, poison_empty, monkeypatch):
    """GQA's dK/dV run per query head (K, V repeated, f32 partials summed over each group: what a GPU gets when
    the per-K/V-head grid is too small for it) against float64, and against the per-K/V-head kernel."""
    bwd = importlib.import_module("tilestack.kernels.attention_bwd")
    q, k, v, do, scale = inputs(rng, (2, 6, 2, 29, 45, 32, None), dtype)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)     # (B, Hkv, Nk, D) viewed from (B, Nk, Hkv, D), as a model
    got = {}
    for per_sm, split in ((10**9, True), (0, False)):
        monkeypatch.setattr(bwd, "DKDV_PROGRAMS_PER_SM", per_sm)
        attention_backward.plans.clear()            # the policy is planned once per signature
        assert bwd.split_group(2, 6, 2, 45, 16, q.device, 32, 32) is split
        got[split] = check_against_float64(backend, q, k, v, do, causal, scale, causal_align=align)[2]
        assert got[split][1].stride() == torch.empty_like(k).stride()    # as torch.compile's fake kernel says
    attention_backward.plans.clear()
    for a, b in zip(got[True], got[False], strict=True):
        assert rel(a, b) <= TOL[dtype]


def test_gqa_split_needs_few_programs_and_bounded_partials(monkeypatch):
    bwd = importlib.import_module("tilestack.kernels.attention_bwd")
    monkeypatch.setattr(bwd, "_multiprocessors", lambda device: 132)     # an H200
    cuda = torch.device("cuda")
    assert bwd.split_group(1, 16, 4, 8192, 64, cuda, 128, 128)           # Llama at (1, 8192): 512 programs
    assert not bwd.split_group(4, 16, 4, 8192, 64, cuda, 128, 128)       # 2048 programs
    assert not bwd.split_group(1, 16, 16, 8192, 64, cuda, 128, 128)      # no group to split
    assert not bwd.split_group(1, 64, 1, 32768, 64, cuda, 256, 256)      # MQA: 8 GiB of partials


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_agrees_with_the_reference_executor(dtype, rng):
    q, k, v, do, scale = inputs(rng, SHAPES["gqa-nq<nk-d32"], dtype)
    out = {}
    for be in BACKENDS:
        o, lse = attention_forward(q, k, v, True, scale, backend=be)
        out[be] = (o, lse, *attention_backward(q, k, v, o, lse, do, True, scale, backend=be))
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), out["triton"], out["reference"], strict=True):
        assert rel(a, b) <= (LSE_TOL if name == "lse" else TOL[dtype] * TRUNCATION[dtype]), name


def test_default_scale_is_inverse_sqrt_d(rng):
    q, k, v, _, _ = inputs(rng, SHAPES["mha-ragged-d16"], torch.float16)
    o_default, lse_default = attention_forward(q, k, v, backend="reference")
    o_explicit, lse_explicit = attention_forward(q, k, v, scale=0.25, backend="reference")
    o_other, _ = attention_forward(q, k, v, scale=0.5, backend="reference")
    assert torch.equal(o_default, o_explicit) and torch.equal(lse_default, lse_explicit)
    assert not torch.equal(o_default, o_other)


def test_causal_first_query_sees_only_the_first_key(rng):
    """Top-left aligned causal mask, as torch's: query 0 attends to key 0 alone, so o[0] = v[0]."""
    q, k, v, _, _ = inputs(rng, (1, 2, 2, 20, 30, 16, None), torch.float16)
    for be in BACKENDS:
        o, lse = attention_forward(q, k, v, causal=True, backend=be)
        torch.testing.assert_close(o[:, :, 0], v[:, :, 0], rtol=0, atol=0)
        want = (q[:, :, 0].double() * k[:, :, 0].double()).sum(-1) / 4.0
        torch.testing.assert_close(lse[:, :, 0].double(), want, rtol=1e-5, atol=1e-5)


# ---- argument errors, before any work ------------------------------------------------------------------------
def _bad_cases():
    bf = torch.bfloat16
    q, k, v = torch.zeros(1, 4, 8, 16, dtype=bf), torch.zeros(1, 2, 8, 16, dtype=bf), torch.zeros(1, 2, 8, 16, dtype=bf)
    return {
        "head dims differ": ((q, torch.zeros(1, 2, 8, 32, dtype=bf), torch.zeros(1, 2, 8, 32, dtype=bf), None),
                             r"k is \(1, 2, 8, 32\); expected \(B=1, Hkv, Nk, D=16\)"),
        "batch differs": ((q, torch.zeros(2, 2, 8, 16, dtype=bf), torch.zeros(2, 2, 8, 16, dtype=bf), None),
                          r"expected \(B=1"),
        "k and v differ": ((q, k, torch.zeros(1, 2, 9, 16, dtype=bf), None), r"k and v must agree on \(B, Hkv, Nk\)"),
        "H not a multiple of Hkv": ((torch.zeros(1, 3, 8, 16, dtype=bf), k, v, None),
                                    r"H=3 heads and k/v have 2; H must be a multiple"),
        "no K/V heads": ((q, torch.zeros(1, 0, 8, 16, dtype=bf), torch.zeros(1, 0, 8, 16, dtype=bf), None),
                         r"must be a multiple of the K/V heads"),
        "float64": ((q.double(), k.double(), v.double(), None),
                    r"q has dtype float64; expected one of bfloat16, float16, float32"),
        "v float64": ((q, k, v.double(), None), r"v has dtype float64"),
        "v float32, q bf16": ((q, k, v.float(), None), r"q, k, v must share a dtype"),
        "mixed half dtypes": ((q, k.half(), v.half(), None), r"q, k, v must share a dtype"),
        "head dim 0": ((torch.zeros(1, 4, 8, 0, dtype=bf), torch.zeros(1, 2, 8, 0, dtype=bf),
                        torch.zeros(1, 2, 8, 0, dtype=bf), None), r"head dim D=0 is not supported; expected 1..256"),
        "head dim 264": ((torch.zeros(1, 4, 8, 264, dtype=bf), torch.zeros(1, 2, 8, 264, dtype=bf),
                          torch.zeros(1, 2, 8, 264, dtype=bf), None), r"head dim D=264 is not supported"),
        "v head dim 512": ((q, k, torch.zeros(1, 2, 8, 512, dtype=bf), None), r"head dim Dv=512 is not supported"),
        "rank 3": ((q[0], k[0], v[0], None), r"q must have rank 4"),
        "k on meta": ((q, k.to("meta"), v, None), r"k on meta"),
        "v on meta": ((q, k, v.to("meta"), None), r"v on meta"),
        "zero scale": ((q, k, v, 0.0), r"scale must be a positive number or None, got 0.0"),
        "negative scale": ((q, k, v, -0.5), r"scale must be a positive number or None, got -0.5"),
        "nan scale": ((q, k, v, math.nan), r"scale must be a positive number"),
        "string scale": ((q, k, v, "0.5"), r"scale must be a positive number or None, got '0.5'"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_attention_forward_bad_arguments(case, no_launch):
    (q, k, v, scale), message = _bad_cases()[case]
    no_launch(fwd_module, "attention_fwd_kernel")
    with pytest.raises(LaunchError, match=message) as e:
        fwd_module.attention_forward(q, k, v, scale=scale, backend="reference")
    assert str(e.value).startswith("attention_forward: ")


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_attention_backward_bad_arguments(case, no_launch):
    (q, k, v, scale), message = _bad_cases()[case]
    no_launch(bwd_module, "attention_bwd_delta_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel")
    o, lse = torch.zeros_like(q), torch.zeros(q.shape[:-1])
    with pytest.raises(LaunchError, match=message) as e:
        bwd_module.attention_backward(q, k, v, o, lse, torch.zeros_like(q), scale=scale, backend="reference")
    assert str(e.value).startswith("attention_backward: ")
