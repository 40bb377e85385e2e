"""The warp-specialized attention backward (kernels/attention_bwd_ws.py) as a tuned choice: the library offers it
beside each dK/dV and dQ problem on the Gluon backend, and ``attention_backward`` launches what a table entry
names: the ws kernel at the entry's config, or, where a launch cannot take it (a mask, f32) or its backend refuses
it, the split kernel at a config of its own (the entry's best on the default backend, else the default), never
the ws entry's STAGES. On the CPU, with the ``Recorder`` backend of tests/tune/test_backend_choice.py (the
reference executor, recording what it prepares)."""

import math

import pytest
import test_backend_choice as choice
import torch

from tilestack.kernels import attention_bwd as ab
from tilestack.kernels import attention_bwd_ws as ws
from tilestack.kernels import attention_fwd as af
from tilestack.tune.library import ATTN_BWD_WS, WS_BACKENDS, attention_bwd_problems

HOPPER, put = choice.HOPPER, choice.put
tables = choice.tables          # the fixture: a user table that lookups read, and the Recorder backend

B, H, N, D = 1, 2, 48, 16
KERNELS = (ab.attention_bwd_dkdv_kernel, ab.attention_bwd_dq_kernel, ab.attention_bwd_delta_kernel,
           ab.attention_bwd_dkdv_bias_kernel, ab.attention_bwd_dq_bias_kernel, ws.attention_bwd_dkdv_ws_kernel,
           ws.attention_bwd_dq_ws_kernel)
WS_KV = dict(BM=16, BN=32, STAGES=3, schedule="ws")
WS_Q = dict(BM=32, BN=16, STAGES=2, schedule="ws")


@pytest.fixture(autouse=True)
def fresh_launchers():
    for k in KERNELS:
        k._launchers.clear()
    yield
    for k in KERNELS:
        k._launchers.clear()


def test_the_library_offers_the_ws_kernels_on_gluon_for_dkdv_and_dq_up_to_head_dim_128():
    seen = set()
    for p in attention_bwd_problems("bfloat16"):
        part = p.kernel.removeprefix("attention_bwd_")
        if part == "delta" or p.fixed["D"] > 128:
            assert p.variants == ()
            continue
        (v,) = p.variants
        assert v.schedule == "ws" and v.backends == WS_BACKENDS == ("gluon",) and v.restrict == ATTN_BWD_WS[part]
        assert v.tile is (ws.attention_bwd_dkdv_ws_kernel if part == "dkdv" else ws.attention_bwd_dq_ws_kernel)
        assert (v.kernel, v.signature, v.n, v.fixed) == (p.kernel, p.signature, p.n, p.fixed)
        assert v.default == ws.WS_DEFAULTS[part] and v.search_name == f"{p.kernel}:ws"
        seen.add(part)
    assert seen == {"dkdv", "dq"}


def inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, generator=g).bfloat16() for _ in range(4))
    return q, k, v, do


def truth(q, k, v, do, causal, mask=None):
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(q64, k64, v64, is_causal=causal,
                                                         attn_mask=None if mask is None else mask.double())
    return torch.autograd.grad(o, (q64, k64, v64), do.double())


def check(got, want):
    for g, w in zip(got, want, strict=True):
        assert bool(g.isfinite().all())
        assert float((g.double() - w).norm() / w.norm()) < 2e-2


def entries(cache, sig, kv=WS_KV, q=WS_Q, others=None):
    put(cache, "attention_bwd_dkdv", sig, N, kv, backend="recorder", others=others)
    put(cache, "attention_bwd_dq", sig, N, q, backend="recorder")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_backward_launches_the_ws_kernels_the_table_names(tables, causal, monkeypatch):
    cache, rec = tables
    q, k, v, do = inputs()
    sig = af.config_signature(q, af.head_tile(D), af.head_tile(D), causal)
    entries(cache, sig)
    seen = {}
    for kern in (ws.attention_bwd_dkdv_ws_kernel, ws.attention_bwd_dq_ws_kernel):
        real = kern.launcher_for
        monkeypatch.setattr(kern, "launcher_for", lambda *a, _k=kern, _r=real, **kw: (
            seen.__setitem__(_k.name, {x: kw[x] for x in ("BM", "BN", "STAGES")}), _r(*a, **kw))[1])
    o, lse = af.attention_forward(q, k, v, causal, backend="reference")
    grads = ab.attention_backward(q, k, v, o, lse, do, causal)
    assert {"attention_bwd_dkdv_ws_kernel", "attention_bwd_dq_ws_kernel"} <= set(rec.prepared), rec.prepared
    assert seen == {"attention_bwd_dkdv_ws_kernel": dict(BM=16, BN=32, STAGES=3),
                    "attention_bwd_dq_ws_kernel": dict(BM=32, BN=16, STAGES=2)}
    check(grads, truth(q, k, v, do, causal))


@pytest.mark.parametrize("why", ["mask", "f32"])
def test_where_the_ws_kernel_cannot_run_the_split_one_runs_at_its_own_config(tables, why, monkeypatch):
    """The entry's best on the default backend ("others") where it has one, the split default where not; the
    ws entry's STAGES never reaches the split kernel (it has no such constant)."""
    cache, rec = tables
    q, k, v, do = inputs()
    if why == "f32":
        q, k, v, do = (t.float() for t in (q, k, v, do))
    sig = af.config_signature(q, af.head_tile(D), af.head_tile(D), False)
    entries(cache, sig, others={"triton": {"config": dict(BM=16, BN=16), "options": {"num_warps": 4},
                                           "seconds": 2e-3}})
    seen = []
    kv = ab.attention_bwd_dkdv_bias_kernel if why == "mask" else ab.attention_bwd_dkdv_kernel
    real = kv.launcher_for
    monkeypatch.setattr(kv, "launcher_for", lambda *a, **kw: (seen.append((a[1], kw["BM"], kw["BN"],
                                                                            "STAGES" in kw)), real(*a, **kw))[1])
    mask = None
    if why == "mask":
        mask = torch.zeros(N, N).masked_fill(torch.ones(N, N, dtype=torch.bool).triu(5), -math.inf)
    o, lse = af.attention_forward(q, k, v, attn_mask=mask, backend="reference")
    grads = ab.attention_backward(q, k, v, o, lse, do, attn_mask=mask)
    assert not any(name.endswith("_ws_kernel") for name in rec.prepared), rec.prepared
    assert seen == [(None, 16, 16, False)]             # the entry's triton config, on the default backend
    check(grads, truth(q, k, v, do, False, mask))


def test_a_ws_entry_whose_backend_refuses_gives_way_to_the_split_kernel(tables):
    cache, rec = tables
    rec.refuse.update({"attention_bwd_dkdv_ws_kernel", "attention_bwd_dq_ws_kernel"})
    q, k, v, do = inputs()
    sig = af.config_signature(q, af.head_tile(D), af.head_tile(D), True)
    entries(cache, sig)
    o, lse = af.attention_forward(q, k, v, True, backend="reference")
    grads = ab.attention_backward(q, k, v, o, lse, do, True)
    assert not any(name.endswith("_ws_kernel") for name in rec.prepared), rec.prepared
    check(grads, truth(q, k, v, do, True))
