"""The masked kernels keep each row's max and log2 sum apart (``STATS``) for the backward: a query row whose keys
are all masked by a huge finite fill (Hugging Face's ``torch.finfo(dtype).min`` padding, -1e30) has a row max of
about fill * log2 e, which absorbs log2 l in the f32 lse, so a backward from the lse alone took each key's P as 1
instead of 1 / l. Checked against float64 torch through every path that saves the forward for the backward: the
eager autograd Function, the custom ops (as torch.compile runs them), ``attention_backward`` given the stats, with
dropout; and the stats argument's checks."""

from __future__ import annotations

import math

import pytest
import torch

import tilestack
from tilestack import config
from tilestack.errors import LaunchError
from tilestack.kernels.attention_bwd import attention_backward, row_stats
from tilestack.kernels.attention_fwd import attention_forward, dropout_mask, dropout_rng, reference

BACKENDS = ["reference", "triton"]


def _inputs(dtype, seed=0, B=2, H=2, Nq=9, Nk=11, D=16):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(dtype) for n in (Nq, Nk, Nk))
    do = torch.randn(B, H, Nq, D, generator=g).to(dtype)
    return q, k, v, do


def _padding_mask(Nq, Nk, fill, dtype=torch.float32):
    """An additive (1, 1, Nq, Nk) mask as a padded batch's: query rows 0 and 5 see no real key (every key at the
    fill), row 3 sees keys 0..3 only, the rest see every key."""
    m = torch.zeros(1, 1, Nq, Nk, dtype=dtype)
    m[..., 0, :] = fill
    m[..., 5, :] = fill
    m[..., 3, 4:] = fill
    return m


def _grads64(q, k, v, do, mask, **kw):
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    o, _ = reference(*leaves, attn_mask=mask, **kw)
    o.backward(do.double())
    return o.detach(), [t.grad for t in leaves]


def _close(name, got, want, tol):
    assert got.isfinite().all(), f"{name}: {int((~got.isfinite()).sum())} non-finite"
    err = (got.double() - want).abs().max().item()
    assert err <= tol * (1 + want.abs().max().item()), (name, err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fill", [-1e30, torch.finfo(torch.float32).min])
def test_eager_gradients_of_rows_masked_by_a_huge_fill(backend, fill):
    q, k, v, do = _inputs(torch.float32)
    mask = _padding_mask(9, 11, fill)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with config.override(backend=backend):
        o = tilestack.attention(*leaves, attn_mask=mask)
        o.backward(do)
    o64, want = _grads64(q, k, v, do, mask)
    _close("o", o.detach(), o64, 1e-5)
    for name, leaf, w in zip("qkv", leaves, want, strict=True):
        _close(f"d{name}", leaf.grad, w, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_with_their_own_finfo_min(dtype):
    q, k, v, do = _inputs(dtype, seed=1)
    mask = _padding_mask(9, 11, torch.finfo(dtype).min, dtype)     # the mask in q's dtype, as HF builds it
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with config.override(backend="triton"):
        tilestack.attention(*leaves, attn_mask=mask, causal=True).backward(do)
    _, want = _grads64(q, k, v, do, mask, causal=True)
    for name, leaf, w in zip("qkv", leaves, want, strict=True):
        _close(f"d{name}", leaf.grad, w, 3e-2)


def test_the_custom_ops_carry_the_stats_to_the_backward():
    """The path torch.compile takes: tilestack::attention_fwd returns (o, lse, stats), its backward hands the stats
    to tilestack::attention_bwd; without a mask the stats are an empty tensor."""
    q, k, v, do = _inputs(torch.float32, seed=2)
    mask = _padding_mask(9, 11, -1e30)
    o, lse, stats = torch.ops.tilestack.attention_fwd(q, k, v, mask, False, 0.25, "top_left")
    assert stats.shape == (2, 2, 2, 9) and stats.dtype == torch.float32
    # the row max and log2 sum make the lse: (m + log2 l) ln 2, here where nothing is absorbed
    plain = ~(mask[0, 0] < -1).all(-1)
    torch.testing.assert_close(((stats[0] + stats[1]) * math.log(2))[..., plain], lse[..., plain])
    assert (stats[1][..., ~plain] - math.log2(11)).abs().max() < 1e-5     # l = 11 equal keys, kept apart
    _, _, none = torch.ops.tilestack.attention_fwd(q, k, v, None, False, 0.25, "top_left")
    assert none.numel() == 0
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.ops.tilestack.attention_fwd(*leaves, mask, False, 0.25, "top_left")[0].backward(do)
    _, want = _grads64(q, k, v, do, mask, scale=0.25)
    for name, leaf, w in zip("qkv", leaves, want, strict=True):
        _close(f"d{name}", leaf.grad, w, 1e-5)


def test_attention_backward_with_and_without_the_stats():
    """Given the forward's stats the gradients are right; from the lse alone (a caller who kept only it) a row
    masked everywhere by -1e30 gets P = 1 per key, as FlashAttention's: the stats are what fixes it."""
    q, k, v, do = _inputs(torch.float32, seed=3)
    mask = _padding_mask(9, 11, -1e30)
    o, lse, stats = attention_forward(q, k, v, attn_mask=mask, with_stats=True)
    _, want = _grads64(q, k, v, do, mask)
    got = attention_backward(q, k, v, o, lse, do, attn_mask=mask, stats=stats)
    for name, g, w in zip("qkv", got, want, strict=True):
        _close(f"d{name}", g, w, 1e-5)
    lossy = attention_backward(q, k, v, o, lse, do, attn_mask=mask)
    assert (lossy[2] - want[2]).abs().max() > 1.0                  # dv of the masked rows' keys, 11x too large
    # rows with ordinary values: the stats made from the lse give what the forward's give
    light = torch.zeros(1, 1, 9, 11)
    light[..., :, 7:] = -5.0
    o, lse, stats = attention_forward(q, k, v, attn_mask=light, with_stats=True)
    torch.testing.assert_close(row_stats(lse)[0] + row_stats(lse)[1], stats[0] + stats[1], rtol=0, atol=1e-5)
    a = attention_backward(q, k, v, o, lse, do, attn_mask=light, stats=stats)
    b = attention_backward(q, k, v, o, lse, do, attn_mask=light)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_with_dropout_the_masked_rows_are_right_too():
    q, k, v, do = _inputs(torch.float32, seed=4)
    mask = _padding_mask(9, 11, torch.finfo(torch.float32).min)
    torch.manual_seed(7)
    rng = dropout_rng()
    keep = dropout_mask(rng, 0.25, (2, 2, 9, 11))
    o, lse, stats = attention_forward(q, k, v, attn_mask=mask, dropout_p=0.25, rng=rng, with_stats=True)
    got = attention_backward(q, k, v, o, lse, do, attn_mask=mask, dropout_p=0.25, rng=rng, stats=stats)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    o64, _ = reference(*leaves, attn_mask=mask, dropout_p=0.25, dropout_keep=keep)
    o64.backward(do.double())
    _close("o", o, o64.detach(), 1e-5)
    for name, g, leaf in zip("qkv", got, leaves, strict=True):
        _close(f"d{name}", g, leaf.grad, 1e-5)


def test_no_mask_gives_no_stats_and_an_empty_launch_none():
    q, k, v, _ = _inputs(torch.float32, seed=5)
    assert attention_forward(q, k, v, with_stats=True)[2] is None
    assert len(attention_forward(q, k, v)) == 2                          # the public pair, unchanged
    empty = k[:, :, :0]
    o, lse, stats = attention_forward(q, empty, empty, attn_mask=torch.zeros(9, 0), with_stats=True)
    assert stats is None and not o.any() and torch.isneginf(lse).all()


@pytest.mark.parametrize(("stats", "mask", "match"), [
    ("list", True, r"stats is list; expected None or the forward's \(2, 2, 2, 9\) float32"),
    ("no mask", False, r"stats given without attn_mask"),
    ("shape", True, r"stats is \(2, 2, 9\) torch.float32 .*expected \(2, 2, 2, 9\)"),
    ("dtype", True, r"stats is \(2, 2, 2, 9\) torch.float64 .*expected"),
])
def test_bad_stats_are_refused_by_name(stats, mask, match):
    q, k, v, do = _inputs(torch.float32, seed=6)
    m = _padding_mask(9, 11, -1e30)
    o, lse, good = attention_forward(q, k, v, attn_mask=m, with_stats=True)
    bad = {"list": [1, 2], "no mask": good, "shape": good[0], "dtype": good.double()}[stats]
    with pytest.raises(LaunchError, match=match):
        attention_backward(q, k, v, o, lse, do, attn_mask=m if mask else None, stats=bad)


def test_with_stats_must_be_a_bool():
    q, k, v, _ = _inputs(torch.float32, seed=6)
    with pytest.raises(LaunchError, match=r"with_stats='yes'; expected True or False"):
        attention_forward(q, k, v, with_stats="yes")
