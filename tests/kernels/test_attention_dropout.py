"""Dropout fused in the attention kernels (issue 8 item 6), on both CPU backends: the kernels' mask is exactly
``dropout_mask`` (regenerated in NumPy from the same (seed, offset)), the forward and the gradients equal float64
attention with that mask (ragged sizes, causal, GQA, a bias, bottom-right alignment), the kept fraction is 1 - p,
dropout_p = 0 runs the plain kernels, and ``tilestack.attention`` / ``scaled_dot_product_attention`` draw a
stream per call from torch's generator (``torch.manual_seed`` repeats it) and apply dropout in every mode.
"""

import importlib
import math
import warnings

import pytest
import torch
from test_attention import BACKENDS, LSE_TOL, TOL, TRUNCATION, inputs, lse_error, rel

import tilestack
from tilestack import config
from tilestack.errors import LaunchError
from tilestack.kernels.attention_bwd import attention_backward
from tilestack.kernels.attention_fwd import attention_forward, dropout_mask, dropout_rng, reference

fwd_module = importlib.import_module("tilestack.kernels.attention_fwd")
bwd_module = importlib.import_module("tilestack.kernels.attention_bwd")
sdpa_module = importlib.import_module("tilestack.torch.sdpa")


def _stream(seed: int) -> torch.Tensor:
    return dropout_rng(torch.Generator().manual_seed(seed))


def _truth(q, k, v, do, causal, scale, p, keep, **kw):
    """float64 o, lse and gradients of attention whose P is dropped by ``keep`` (kept entries * 1 / (1 - p))."""
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64, lse64 = reference(q64, k64, v64, causal, scale, dropout_p=p, dropout_keep=keep, **kw)
    o64.backward(do.double())
    return o64.detach(), lse64.detach(), (q64.grad, k64.grad, v64.grad)


def check_dropout(backend, q, k, v, do, causal, scale, p, seed, **kw):
    """Forward and backward with dropout on ``backend`` against float64 with the kernels' own mask."""
    rng = _stream(seed)
    o, lse = attention_forward(q, k, v, causal, scale, backend=backend, dropout_p=p, rng=rng, **kw)
    grads = attention_backward(q, k, v, o, lse, do, causal, scale, backend=backend, dropout_p=p, rng=rng, **kw)
    keep = dropout_mask(rng, p, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    o64, lse64, grads64 = _truth(q, k, v, do, causal, scale, p, keep, **kw)
    grad_tol = TOL[q.dtype] * (TRUNCATION[q.dtype] if backend == "triton" else 1.0)
    errs = {"o": rel(o, o64), "lse": lse_error(lse, lse64)}
    errs |= {n: rel(g, g64) for n, g, g64 in zip(("dq", "dk", "dv"), grads, grads64, strict=True)}
    tols = {"o": TOL[q.dtype], "lse": LSE_TOL, "dq": grad_tol, "dk": grad_tol, "dv": grad_tol}
    bad = {n: e for n, e in errs.items() if not e <= tols[n]}
    assert not bad, f"relative errors over tolerance: {bad} (all: {errs})"
    # the same inputs without dropout are far from this: the mask mattered
    o_plain = reference(q.double(), k.double(), v.double(), causal, scale, **kw)[0]
    assert rel(o, o_plain) > 10 * TOL[q.dtype]
    return o, grads


# (B, H, Hkv, Nq, Nk, D, scale)
CASES = {
    "mha-ragged": ((1, 2, 2, 37, 29, 16, None), False, {}),
    "gqa-causal": ((2, 4, 2, 29, 45, 32, None), True, {}),
    "mqa-nq>nk-bottom-right": ((1, 4, 1, 40, 21, 16, 0.3), True, dict(causal_align="bottom_right")),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_dropout_matches_float64_with_the_same_mask(backend, case, rng, poison_empty):
    shape, causal, kw = CASES[case]
    q, k, v, do, scale = inputs(rng, shape, torch.bfloat16)
    check_dropout(backend, q, k, v, do, causal, scale, 0.3, int(rng.integers(2**31)), **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_with_a_bias_and_fp16(backend, rng, poison_empty):
    q, k, v, do, scale = inputs(rng, (1, 2, 1, 19, 33, 16, None), torch.float16, dv=24)
    keep = torch.from_numpy(rng.random((19, 33)) < 0.8)
    keep[3] = False                                                  # a row that sees no key: o = 0 there
    check_dropout(backend, q, k, v, do, True, scale, 0.5, 11, attn_mask=keep)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_kernels_mask_is_dropout_mask_exactly(backend, rng):
    """With v = the identity (Dv = Nk), o = P * keep / (1 - p): its zeros are the dropped entries, one by one,
    over blocks of a ragged grid, two heads and a batch of two."""
    B, H, Nq, Nk, p = 2, 2, 37, 40, 0.25
    q = torch.from_numpy(0.1 * rng.standard_normal((B, H, Nq, 16))).float()
    k = torch.from_numpy(0.1 * rng.standard_normal((B, H, Nk, 16))).float()
    v = torch.eye(Nk).expand(B, H, Nk, Nk).contiguous()
    rng_t = _stream(int(rng.integers(2**31)))
    o, _ = attention_forward(q, k, v, backend=backend, dropout_p=p, rng=rng_t)
    keep = dropout_mask(rng_t, p, (B, H, Nq, Nk))
    assert torch.equal(o != 0, keep)
    assert 0.6 < keep.float().mean() < 0.9
    o64 = reference(q, k, v, dropout_p=p, dropout_keep=keep)[0]
    assert rel(o, o64) < 1e-5


def test_the_kept_fraction_is_one_minus_p():
    for p in (0.1, 0.5, 0.9):
        keep = dropout_mask(_stream(int(p * 10)), p, (2, 4, 256, 256))
        assert abs(keep.float().mean().item() - (1 - p)) < 4e-3, p
    assert not torch.equal(dropout_mask(_stream(1), 0.5, (64, 64)), dropout_mask(_stream(2), 0.5, (64, 64)))
    heads = dropout_mask(_stream(3), 0.5, (2, 2, 64, 64)).flatten(0, 1)       # each (batch, head) its own mask
    assert all(not torch.equal(heads[a], heads[b]) for a in range(4) for b in range(a))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_one_drops_everything(backend, rng):
    q, k, v, do, scale = inputs(rng, (1, 2, 1, 17, 20, 16, None), torch.bfloat16)
    rng_t = _stream(5)
    o, lse = attention_forward(q, k, v, backend=backend, dropout_p=1.0, rng=rng_t)
    grads = attention_backward(q, k, v, o, lse, do, backend=backend, dropout_p=1.0, rng=rng_t)
    assert torch.equal(o, torch.zeros_like(o))
    assert lse_error(lse, reference(q.double(), k.double(), v.double())[1]) <= LSE_TOL   # the undropped lse
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_dropout_p_zero_runs_the_plain_kernels(rng, no_launch):
    """dropout_p = 0 (with or without a stream) never reaches the dropout kernels and gives the plain result."""
    q, k, v, do, scale = inputs(rng, (1, 2, 1, 19, 23, 16, None), torch.bfloat16)
    want = attention_forward(q, k, v, True, backend="reference")
    want_grads = attention_backward(q, k, v, *want, do, True, backend="reference")
    no_launch(fwd_module, *(n for n in dir(fwd_module) if n.endswith("dropout_kernel")))
    no_launch(bwd_module, *(n for n in dir(bwd_module) if n.endswith("dropout_kernel")))
    for rng_t in (None, _stream(1)):
        o, lse = attention_forward(q, k, v, True, backend="reference", dropout_p=0.0, rng=rng_t)
        assert torch.equal(o, want[0]) and torch.equal(lse, want[1])
        grads = attention_backward(q, k, v, o, lse, do, True, backend="reference", dropout_p=0, rng=rng_t)
        assert all(torch.equal(a, b) for a, b in zip(grads, want_grads, strict=True))


def test_the_plain_kernels_trace_no_random_op():
    import tilestack.lang as ts

    spec = [ts.ArgSpec(ts.bf16, 4)] * 4 + [ts.ArgSpec(ts.f32, 3)]
    plain = fwd_module.attention_fwd_kernel.trace(*spec, 0.25, D=16, BM=16, BN=16)
    dropped = fwd_module.attention_fwd_dropout_kernel.trace(*spec, 0.25, 2**62 + 1, 2**61, 0.1, 1 / 0.9, D=16,
                                                            BM=16, BN=16)
    assert " rand" not in str(plain.ir) and " rand" in str(dropped.ir)


# ---- bad arguments, before any work --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,message", [
    (dict(dropout_p=1.5, rng=torch.zeros(2, dtype=torch.int64)), r"dropout_p must be a number in \[0, 1\], got 1.5"),
    (dict(dropout_p=-0.1), r"dropout_p must be a number in \[0, 1\], got -0.1"),
    (dict(dropout_p=math.nan), r"dropout_p must be a number in \[0, 1\], got nan"),
    (dict(dropout_p=True), r"dropout_p must be a number in \[0, 1\], got True"),
    (dict(dropout_p=0.1), r"dropout_p=0.1 needs rng, the dropout stream: a CPU int64 tensor \(2,\) .* got None"),
    (dict(dropout_p=0.1, rng=torch.zeros(3, dtype=torch.int64)), r"got \(3,\) torch.int64 on cpu"),
    (dict(dropout_p=0.1, rng=torch.zeros(2)), r"got \(2,\) torch.float32 on cpu"),
    (dict(precision="tf32x3"), r"precision must be one of \('ieee', 'tf32'\), got 'tf32x3'"),
], ids=str)
def test_bad_dropout_arguments(kw, message, no_launch):
    bf = torch.bfloat16
    q, k, v = torch.zeros(1, 2, 8, 16, dtype=bf), torch.zeros(1, 2, 8, 16, dtype=bf), torch.zeros(1, 2, 8, 16, dtype=bf)
    for module in (fwd_module, bwd_module):
        no_launch(module, *(name for name in dir(module) if name.endswith("_kernel")))
    with pytest.raises(LaunchError, match=message) as e:
        attention_forward(q, k, v, backend="reference", **kw)
    assert str(e.value).startswith("attention_forward: ")
    with pytest.raises(LaunchError, match=message) as e:
        attention_backward(q, k, v, q, torch.zeros(1, 2, 8), q, backend="reference", **kw)
    assert str(e.value).startswith("attention_backward: ")


# ---- the torch op and the drop-in ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_op_dropout_gradients_and_reproducibility(backend, rng):
    """Training: torch.manual_seed fixes the stream (the same draw as dropout_rng()), so the mask is known and the
    gradients equal float64 autograd with it; another seed gives another mask."""
    q, k, v, do, _ = inputs(rng, (1, 4, 2, 21, 26, 16, None), torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with config.override(backend=backend):
        torch.manual_seed(123)
        o = tilestack.attention(*leaves, causal=True, dropout_p=0.2)
        o.backward(do)
        torch.manual_seed(123)
        again = tilestack.attention(q, k, v, causal=True, dropout_p=0.2)
        torch.manual_seed(124)
        other = tilestack.attention(q, k, v, causal=True, dropout_p=0.2)
    torch.manual_seed(123)
    keep = dropout_mask(dropout_rng(), 0.2, (1, 4, 21, 26))
    o64, _, grads64 = _truth(q, k, v, do, True, None, 0.2, keep)
    tol = TOL[torch.bfloat16] * (TRUNCATION[torch.bfloat16] if backend == "triton" else 1.0)
    assert rel(o, o64) <= TOL[torch.bfloat16]
    for t, g in zip(leaves, grads64, strict=True):
        assert rel(t.grad, g) <= tol
    assert torch.equal(again, o.detach()) and not torch.equal(other, again)


def test_sdpa_applies_dropout_in_every_mode_without_a_notice(rng):
    """As torch's SDPA: dropout_p > 0 drops in training, in eval and under no_grad (a model passes 0 in eval)."""
    q, k, v, _, _ = inputs(rng, (1, 2, 2, 12, 12, 16, None), torch.float16)
    sdpa_module._noticed.clear()
    with config.override(backend="reference"), warnings.catch_warnings():
        warnings.simplefilter("error")                               # no hand-off notice
        plain = tilestack.scaled_dot_product_attention(q, k, v)
        torch.manual_seed(0)
        with torch.no_grad():
            dropped = tilestack.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
        torch.manual_seed(0)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        trained = tilestack.scaled_dot_product_attention(*leaves, dropout_p=0.4)
    torch.manual_seed(0)
    keep = dropout_mask(dropout_rng(), 0.4, (1, 2, 12, 12))
    want = reference(q.double(), k.double(), v.double(), dropout_p=0.4, dropout_keep=keep)[0]
    assert rel(dropped, want) <= TOL[torch.float16] and torch.equal(trained.detach(), dropped)
    assert rel(plain, want) > 0.1


def test_dropout_under_torch_compile_fullgraph(rng):
    """No graph break: the stream is drawn in the graph and passed to the custom op, which saves it for the
    backward; under one seed the compiled call drops what eager drops, and each call draws a new mask."""
    q, k, v, do, _ = inputs(rng, (1, 2, 1, 16, 16, 16, None), torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def f(q, k, v):
        return tilestack.attention(q, k, v, causal=True, dropout_p=0.3)

    with config.override(backend="reference"):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        torch.manual_seed(9)
        o = compiled(*leaves)
        o.backward(do)
        torch.manual_seed(9)
        eager = f(q, k, v)
        other = compiled(q, k, v)
    assert torch.equal(o.detach(), eager) and not torch.equal(other, eager)
    torch.manual_seed(9)
    keep = dropout_mask(dropout_rng(), 0.3, (1, 2, 16, 16))
    _, _, grads64 = _truth(q, k, v, do, True, None, 0.3, keep)
    for t, g in zip(leaves, grads64, strict=True):
        assert rel(t.grad, g) <= 1e-5


def test_activation_checkpointing_recomputes_the_same_mask(rng):
    """torch.utils.checkpoint restores torch's CPU generator before recomputing, so the recomputed forward draws
    the same stream: its gradients equal those of the plain run."""
    from torch.utils.checkpoint import checkpoint

    q, k, v, do, _ = inputs(rng, (1, 2, 1, 12, 14, 16, None), torch.float32)
    grads = {}
    with config.override(backend="reference"):
        for how in ("plain", "checkpointed"):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            torch.manual_seed(3)
            if how == "plain":
                o = tilestack.attention(*leaves, dropout_p=0.5)
            else:
                o = checkpoint(lambda *a: tilestack.attention(*a, dropout_p=0.5), *leaves, use_reentrant=False)
            o.backward(do)
            grads[how] = [t.grad for t in leaves]
    assert all(torch.equal(a, b) for a, b in zip(grads["plain"], grads["checkpointed"], strict=True))
