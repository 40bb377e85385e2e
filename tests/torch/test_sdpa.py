"""tilestack.scaled_dot_product_attention as a drop-in for torch's, and tilestack.patch: what SDPA accepts works
with the same meaning (float64 torch as the reference), what the kernels do not take goes to torch with a
one-time notice, and a patched model runs tilestack's kernels without being edited."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.functional import scaled_dot_product_attention as sdpa_bound_at_import

import tilestack
from tilestack import config
from tilestack.torch import sdpa as sdpa_module

TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 4e-3}


def rel(got, want) -> float:
    got, want = got.double(), want.double()
    if not bool(got.isfinite().all()):
        return math.inf
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def reference(q, k, v, do, **kw):
    """torch's math in float64: o and the grads of q, k, v."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = kw.pop("attn_mask", None)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    o = sdpa_module.torch_sdpa(q64, k64, v64, attn_mask=mask, **kw)
    o.backward(do.double())
    return o.detach(), (q64.grad, k64.grad, v64.grad)


# (B, H, Hkv, Nq, Nk, D, Dv)
CASES = {
    "hd80": (1, 2, 2, 19, 23, 80, 80),
    "hd96-gqa": (2, 4, 2, 17, 9, 96, 96),
    "hd112-dv64": (1, 2, 1, 11, 30, 112, 64),
    "hd40-dv24": (1, 1, 1, 7, 12, 40, 24),
}


def make(rng, case, dtype):
    B, H, Hkv, Nq, Nk, D, Dv = case
    t = lambda *s: torch.from_numpy(rng.standard_normal(s)).to(dtype).requires_grad_()  # noqa: E731
    return t(B, H, Nq, D), t(B, Hkv, Nk, D), t(B, Hkv, Nk, Dv)


@pytest.mark.parametrize("backend", ("reference", "triton"))
@pytest.mark.parametrize("case", list(CASES))
def test_head_dims_and_dv_match_torch(backend, case, rng):
    dtype = torch.float16
    q, k, v = make(rng, CASES[case], dtype)
    gqa = q.shape[1] != k.shape[1]
    with config.override(backend=backend):
        o = tilestack.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        do = torch.randn_like(o)
        o.backward(do)
    o64, g64 = reference(q, k, v, do, is_causal=True, enable_gqa=gqa)
    assert o.shape == o64.shape and rel(o, o64) <= TOL[dtype]
    for t, g in zip((q, k, v), g64, strict=True):
        assert rel(t.grad, g) <= 2 * TOL[dtype]


@pytest.mark.parametrize("mask_kind", ("bool-key-padding", "additive-per-head"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_masks_match_torch(mask_kind, dtype, rng):
    q, k, v = make(rng, (2, 2, 2, 13, 21, 32, 32), dtype)
    if mask_kind == "bool-key-padding":      # (B, 1, 1, Nk): the last keys of batch 1 are padding
        mask = torch.ones(2, 1, 1, 21, dtype=torch.bool)
        mask[1, ..., 15:] = False
    else:                                     # (1, H, Nq, Nk) additive, ALiBi-like
        mask = -torch.arange(21).float().mul(0.3).expand(1, 2, 13, 21).to(dtype).contiguous()
    with config.override(backend="reference"):
        o = tilestack.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        do = torch.randn_like(o)
        o.backward(do)
    o64, g64 = reference(q, k, v, do, attn_mask=mask)
    assert rel(o, o64) <= TOL[dtype]
    for t, g in zip((q, k, v), g64, strict=True):
        assert rel(t.grad, g) <= 2 * TOL[dtype]


@pytest.mark.parametrize("why, call", [
    ("dropout_p outside [0, 1]", lambda q, k, v: dict(dropout_p=1.5)),
    ("rank 3", lambda q, k, v: dict(query=q[0], key=k[0], value=v[0])),
    ("mask needs grad", lambda q, k, v: dict(attn_mask=torch.zeros(1, 1, 6, 6, requires_grad=True))),
    ("heads without enable_gqa", lambda q, k, v: dict(key=k[:, :1], value=v[:, :1])),
])
def test_what_the_kernels_do_not_take_goes_to_torch_once_noticed(why, call, rng):
    _hand_off_once(call, rng, {})


def test_dropout_goes_to_torch_when_the_knob_says_so(rng):
    """sdpa_dropout="torch" (the default on a GPU, where the fused kernels are slower) hands dropout to torch."""
    _hand_off_once(lambda q, k, v: dict(dropout_p=0.2), rng, dict(sdpa_dropout="torch"))


def test_dropout_is_fused_on_cpu_by_default(rng, monkeypatch):
    q, k, v = (torch.from_numpy(rng.standard_normal((1, 2, 6, 16))).float() for _ in range(3))
    monkeypatch.setattr(sdpa_module, "torch_sdpa", lambda *a, **kw: pytest.fail("handed to torch"))
    with config.override(backend="reference", sdpa_dropout="auto"):
        o = tilestack.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    assert o.shape == q.shape and bool(o.isfinite().all())


def _hand_off_once(call, rng, knobs):
    q, k, v = (torch.from_numpy(rng.standard_normal((1, 2, 6, 16))).float() for _ in range(3))
    kw = dict(query=q, key=k, value=v) | call(q, k, v)
    sdpa_module._noticed.clear()
    with config.override(backend="reference", **knobs), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        try:
            ours = tilestack.scaled_dot_product_attention(**kw)
        except RuntimeError as e:            # torch refuses it: so must we, with torch's own error
            with pytest.raises(RuntimeError, match=str(e)[:40].replace("(", r"\(").replace(")", r"\)")):
                sdpa_module.torch_sdpa(**kw)
            return
        tilestack.scaled_dot_product_attention(**kw)          # a second call: no second notice
        torch.manual_seed(0)
        theirs = sdpa_module.torch_sdpa(**kw)
    notices = [w for w in seen if "handing" in str(w.message)]
    assert len(notices) == 1
    assert torch.equal(ours, theirs)


class _Attend(torch.nn.Module):
    """A model that calls torch's function through F and through a name bound at import."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) + sdpa_bound_at_import(q, k, v)


def test_patch_swaps_in_tilestack_and_undo_restores(rng, monkeypatch):
    q, k, v = (torch.from_numpy(rng.standard_normal((1, 2, 9, 16))).to(torch.float16) for _ in range(3))
    model = _Attend()
    calls = []
    real = sdpa_module.attention
    monkeypatch.setattr(sdpa_module, "attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    want = model(q, k, v)
    with config.override(backend="reference"), tilestack.patch(model):
        assert F.scaled_dot_product_attention is tilestack.scaled_dot_product_attention
        got = model(q, k, v)
    assert len(calls) == 2     # both call sites reached tilestack's kernels
    assert F.scaled_dot_product_attention is sdpa_module.torch_sdpa
    assert globals()["sdpa_bound_at_import"] is sdpa_module.torch_sdpa
    assert rel(got, want.double()) <= 4e-3


def test_undo_leaves_a_later_replacement_in_place_and_says_so():
    """Another library patching F.scaled_dot_product_attention after tilestack.patch: undo must not put torch's
    function back over it (its patch would be lost without a word)."""
    def theirs(*args, **kwargs):
        return sdpa_module.torch_sdpa(*args, **kwargs)

    p = tilestack.patch()
    try:
        assert F.scaled_dot_product_attention is tilestack.scaled_dot_product_attention
        F.scaled_dot_product_attention = theirs
        with pytest.warns(RuntimeWarning, match=r"scaled_dot_product_attention as it is: it was replaced since"):
            p.undo()
        assert F.scaled_dot_product_attention is theirs
    finally:
        F.scaled_dot_product_attention = sdpa_module.torch_sdpa
    p = tilestack.patch()                       # and without a later replacement: torch's back, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.undo()
    assert F.scaled_dot_product_attention is sdpa_module.torch_sdpa
