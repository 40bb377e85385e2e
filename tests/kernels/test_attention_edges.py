"""Attention at the edges (issue 9, items 1 and 4), on both CPU backends against float64:

- scores all strongly negative with Nk not a multiple of the key block (and causal with Nq > Nk): a padded key
  scores 0, and P = exp2(-lse) overflowed into NaN gradients before the backward masked keys past Nk;
- empty problems (Nk = 0, Nq = 0, B = 0, H = 0): the right zeros or empties, -inf lse for rows that see no key,
  without launching a kernel (the Triton backend cannot describe an empty tensor to the copy engine).
"""

import importlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_attention import BACKENDS, check_against_float64, randn

import tilestack
from tilestack.kernels.attention_bwd import attention_backward
from tilestack.kernels.attention_fwd import attention_forward

fwd_module = importlib.import_module("tilestack.kernels.attention_fwd")
bwd_module = importlib.import_module("tilestack.kernels.attention_bwd")
HALF = (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_issue_repro_dq_is_zero_not_nan(backend):
    """The report's case: one query, three keys (the key block is 16 wide), every score -12 in fp16: SDPA's
    gradient is exactly 0 (all scores equal, so P is uniform and dS = P * (dO.v - delta) = 0)."""
    q = torch.ones(1, 1, 1, 16, dtype=torch.float16)
    k, v = torch.full((1, 1, 3, 16), -3.0, dtype=torch.float16), torch.ones(1, 1, 3, 16, dtype=torch.float16)
    o, lse = attention_forward(q, k, v, backend=backend)
    dq, dk, dv = attention_backward(q, k, v, o, lse, torch.ones_like(q), backend=backend)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(q64, k64, v64).backward(torch.ones_like(q64))
    for name, got, want in (("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        assert got.isfinite().all(), name
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3, msg=name)


def negative_scores(rng, B, H, Nq, Nk, D, dtype, level):
    """q, k, v, do whose scores (default scale) are all near ``level`` (natural log), about one unit apart.

    Each key is level/sqrt(D) on every element (the common score) plus a small per-key constant plus a large
    part orthogonal to the all-ones vector; each query is all ones plus a small part orthogonal to it. The
    large orthogonal part moves the scores little but keeps dQ = sum_c dS_c k_c and dK = sum_r dS_r q_r well
    conditioned: without it, dQ would be a difference of near-equal terms (sum_c dS_c = 0 against a large
    common key) that half-precision dS loses whatever the kernel does."""
    zq = randn(rng, (B, H, Nq, D), torch.float64)
    q = (1.0 + 0.05 * (zq - zq.mean(-1, keepdim=True))).to(dtype)
    z = randn(rng, (B, H, Nk, D), torch.float64)
    orthogonal = 20.0 * (z - z.mean(-1, keepdim=True))
    spread = 0.1 * randn(rng, (B, H, Nk, 1), torch.float64)
    k = (level / math.sqrt(D) + spread + orthogonal).to(dtype)
    return q, k, randn(rng, (B, H, Nk, D), dtype), randn(rng, (B, H, Nq, D), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", [
    # (causal, Nq, Nk, score level): bf16 P overflows f32 below about -88, fp16 P overflows fp16 below -11
    (False, 9, 21, -120.0),
    (False, 37, 7, -30.0),
    (True, 40, 21, -120.0),       # causal with Nq > Nk: the rows past Nk see every key, the last block ragged
    (True, 40, 21, -30.0),
], ids=str)
def test_strongly_negative_scores_with_ragged_keys(backend, dtype, case, rng, poison_empty):
    causal, Nq, Nk, level = case
    q, k, v, do = negative_scores(rng, 1, 2, Nq, Nk, 16, dtype, level)
    check_against_float64(backend, q, k, v, do, causal, None)


# ---- empty problems ---------------------------------------------------------------------------------------------
EMPTY = {   # (B, H, Hkv, Nq, Nk)
    "Nk=0": (2, 4, 2, 5, 0),
    "Nq=0": (2, 4, 2, 0, 7),
    "B=0": (0, 4, 2, 5, 7),
    "H=0": (1, 0, 2, 5, 7),
    "H=Hkv=0": (1, 0, 0, 5, 7),
    "Nq=Nk=0": (1, 2, 1, 0, 0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("shape", list(EMPTY))
def test_empty_problems_give_torchs_answer_without_launching(backend, causal, shape, rng, no_launch):
    for module in (fwd_module, bwd_module):
        no_launch(module, *(name for name in dir(module) if name.endswith("_kernel")))
    B, H, Hkv, Nq, Nk = EMPTY[shape]
    q, k, v = (randn(rng, shape, torch.bfloat16) for shape in ((B, H, Nq, 16), (B, Hkv, Nk, 16), (B, Hkv, Nk, 16)))
    do = randn(rng, (B, H, Nq, 16), torch.bfloat16)
    for mask in ({}, {"attn_mask": torch.ones(Nq, Nk, dtype=torch.bool)}):
        o, lse = fwd_module.attention_forward(q, k, v, causal, backend=backend, **mask)
        assert o.shape == (B, H, Nq, 16) and o.dtype == q.dtype and lse.shape == (B, H, Nq)
        assert torch.equal(o, torch.zeros_like(o))                     # SDPA: a row with no key gives 0
        assert torch.equal(lse, torch.full_like(lse, -math.inf))       # log of an empty sum
        grads = bwd_module.attention_backward(q, k, v, o, lse, do, causal, backend=backend, **mask)
        for g, t in zip(grads, (q, k, v), strict=True):
            assert g.shape == t.shape and g.dtype == t.dtype and torch.equal(g, torch.zeros_like(t))
    if H == Hkv:   # torch's own answer (SDPA has no GQA without enable_gqa)
        q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
        o64 = F.scaled_dot_product_attention(q64, k64, v64, is_causal=causal)
        o64.backward(do.double())
        assert torch.equal(o.double(), o64) and torch.equal(grads[0].double(), q64.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_keys_at_minus_infinity_act_as_masked(backend, causal, rng):
    """Keys that overflowed to -inf (fp16) with positive queries score -inf: torch's math backend gives them
    P = 0 and zero dK, dV. The dK/dV kernel sums over query rows, so a padded query row (q = 0, past Nq) must
    not score 0 * -inf = NaN into that sum: it is masked. (dQ = dS K is 0 * -inf = NaN for torch too.)"""
    q = (1.0 + randn(rng, (1, 2, 21, 16), torch.float64).abs()).half()
    k, v = randn(rng, (1, 2, 19, 16), torch.float16), randn(rng, (1, 2, 19, 16), torch.float16)
    k[:, :, [3, 7]] = -math.inf
    do = randn(rng, (1, 2, 21, 16), torch.float16)
    o, lse = attention_forward(q, k, v, causal, backend=backend)
    _, dk, dv = attention_backward(q, k, v, o, lse, do, causal, backend=backend)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    o64 = F.scaled_dot_product_attention(*leaves, is_causal=causal)
    o64.backward(do.double())
    for name, got, want in (("o", o, o64.detach()), ("dk", dk, leaves[1].grad), ("dv", dv, leaves[2].grad)):
        assert got.isfinite().all() and want.isfinite().all(), name
        torch.testing.assert_close(got.double(), want, rtol=5e-3, atol=5e-3, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="shared-memory limits are a GPU's (Triton's compiler)")
@pytest.mark.parametrize("mask_kind", ["bias", "bool"])
def test_wide_heads_with_a_mask_fit_shared_memory(mask_kind):
    """Head dim 192 (padded to a 256-wide tile) with a mask tile: the tuned 3-stage config of the unmasked kernel
    needs more shared memory than an H100/H200 block has; the launch drops a stage (with a warning) and is right."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 192, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
    mask = (torch.randn(1, 1, 300, 300, device="cuda", generator=g) if mask_kind == "bias"
            else torch.rand(1, 1, 300, 300, device="cuda", generator=g) > 0.2)
    q.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = tilestack.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.float().sum().backward()
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                         attn_mask=mask if mask_kind == "bool" else mask.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    assert q.grad is not None and bool(q.grad.isfinite().all())
