"""kernels.attention_fwd_pingpong: the attention forward scheduled as FlashAttention-3 (a producer, two consumer
warpgroups whose products take turns) means what attention_fwd_kernel means, on the reference executor and under
Triton's interpreter, over GQA, both causal alignments, ragged and empty rows, Dv != D and a head dim that is not
a power of two; attention_forward launches it for schedule="pingpong"; it compiles for sm_90a with its wgmma
asynchronous and its turns as named barriers."""

import math

import pytest
import torch

from tilestack import config
from tilestack.errors import LaunchError
from tilestack.kernels.attention_fwd import attention_forward, head_tile
from tilestack.kernels.attention_fwd_pingpong import attention_fwd_pingpong_kernel

CASES = [  # B, H, Hkv, Nq, Nk, D, Dv, causal, align
    (1, 2, 2, 130, 200, 64, 64, False, "top_left"),
    (2, 4, 2, 64, 64, 64, 64, True, "top_left"),
    (1, 2, 1, 200, 260, 128, 64, True, "bottom_right"),
    (1, 2, 2, 150, 90, 80, 80, True, "bottom_right"),       # the first 60 rows see no key
    (1, 2, 2, 33, 1, 64, 64, False, "top_left"),
    (1, 3, 1, 47, 47, 32, 64, True, "top_left"),
]


def float64_attention(q, k, v, causal, align, scale):
    rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    s = q.double() @ k.transpose(-1, -2) * scale
    nq, nk = q.shape[2], k.shape[2]
    if causal:
        shift = nk - nq if align == "bottom_right" else 0
        s = s.masked_fill(torch.ones(nq, nk, dtype=torch.bool).triu(1 + shift), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)                 # a row that sees no key: o = 0, lse = -inf
    return p @ v, lse


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_it_means_attention(backend, case):
    B, H, Hkv, Nq, Nk, d, dv, causal, align = case
    g = torch.Generator().manual_seed(Nq * 31 + Nk)
    q = torch.randn(B, H, Nq, d, generator=g).bfloat16()
    k = torch.randn(B, Hkv, Nk, d, generator=g).bfloat16()
    v = torch.randn(B, Hkv, Nk, dv, generator=g).bfloat16()
    o = torch.full((B, H, Nq, dv), float("nan"), dtype=torch.bfloat16)
    lse = torch.full((B, H, Nq), float("nan"))
    consts = dict(D=head_tile(d), causal=causal, BM=32, BN=16)
    if head_tile(dv) != head_tile(d):
        consts["DV"] = head_tile(dv)
    if causal and align != "top_left":
        consts["causal_align"] = align
    scale = 1 / math.sqrt(d)
    with config.override(triton_interpret=True):
        attention_fwd_pingpong_kernel(q, k, v, o, lse, scale, backend=backend, **consts)
    want_o, want_lse = float64_attention(q, k, v, causal, align, scale)
    assert not o.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(o.double(), want_o, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


def test_attention_forward_runs_it_for_schedule_pingpong(monkeypatch):
    from tilestack.kernels import attention_fwd_pingpong as module
    calls = []
    launcher_for = module.attention_fwd_pingpong_kernel.launcher_for
    monkeypatch.setattr(module.attention_fwd_pingpong_kernel, "launcher_for",
                        lambda *a, **kw: (calls.append(kw), launcher_for(*a, **kw))[1])
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 100, 64, generator=g).bfloat16()
    k, v = (torch.randn(1, 2, 77, 64, generator=g).bfloat16() for _ in range(2))
    with config.override(triton_interpret=True):
        ping = attention_forward(q, k, v, True, backend="triton", causal_align="bottom_right", schedule="pingpong",
                                 BM=32, BN=16)
        plain = attention_forward(q, k, v, True, backend="triton", causal_align="bottom_right", BM=32, BN=16)
    assert len(calls) == 1 and calls[0]["BM"] == 32 and calls[0]["causal_align"] == "bottom_right"
    torch.testing.assert_close(ping[0], plain[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ping[1], plain[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("backend", "bm", "want"), [("gluon", 64, 128), ("gluon", 256, 256), ("triton", 64, 64),
                                                     ("reference", 16, 32)])
def test_its_block_rows_fit_the_backend(monkeypatch, backend, bm, want):
    """The tables' BM, tuned for the plain kernel (64 at head dim 64 or causal), would leave each Gluon consumer
    32 rows where a warpgroup's wgmma accumulates 64 (a BackendError at the first H100 launch): BM is raised to
    128 there, and to 32 (two consumers of 16) elsewhere."""
    from tilestack.kernels import attention_fwd as af
    seen = []
    monkeypatch.setattr(af, "tuned_launcher", lambda kernel, args, *backends, **kw: seen.append(kw) or "launch")
    q = torch.empty(1, 2, 300, 64, dtype=torch.bfloat16)
    lse = torch.empty(1, 2, 300)
    consts = dict(D=64, causal=True, BM=bm, BN=128, STAGES=3, num_warps=4)
    assert af._pingpong_launcher(q, q, q, q, lse, 0.125, backend, backend, consts, True) == "launch"
    assert seen == [dict(D=64, causal=True, BN=128, STAGES=3, BM=want)]


def test_what_it_does_not_take_runs_the_plain_kernel_and_a_bad_schedule_is_refused(monkeypatch):
    from tilestack.kernels import attention_fwd_pingpong as module
    monkeypatch.setattr(module.attention_fwd_pingpong_kernel, "launcher_for",
                        lambda *a, **kw: pytest.fail("the ping-pong kernel takes no f32 inputs and no mask"))
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g) for _ in range(3))
    o, _ = attention_forward(q, k, v, backend="reference", schedule="pingpong")            # f32
    mask = torch.zeros(20, 20)
    attention_forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="reference", schedule="pingpong",
                      attn_mask=mask)                                                       # an additive mask
    assert not o.isnan().any()
    with pytest.raises(LaunchError, match=r"schedule='fastest'; expected 'plain' or 'pingpong'"):
        attention_forward(q, k, v, backend="reference", schedule="fastest")


@pytest.mark.parametrize(("d", "bn", "causal"), [(64, 128, False), (128, 64, False), (128, 64, True),
                                                 (64, 64, True)])
def test_it_compiles_for_sm90a_with_its_wgmma_asynchronous(d, bn, causal):
    from tilestack.backends import get_backend
    from tilestack.backends.gluon import aot
    try:
        aot.tool("ptxas")
        aot.tool("cuobjdump")
    except aot.ToolMissing as e:
        pytest.skip(str(e))
    be = get_backend("gluon")
    q = torch.empty(4, 16, 4096, d, dtype=torch.bfloat16, device="meta")
    k4 = torch.empty(4, 4, 4096, d, dtype=torch.bfloat16, device="meta")              # GQA: 4 heads of K and V
    lse = torch.empty(4, 16, 4096, dtype=torch.float32, device="meta")
    traced = attention_fwd_pingpong_kernel.trace(q, k4, k4, torch.empty_like(q), lse, 0.1, D=d, causal=causal,
                                                 BM=128, BN=bn)
    k = be.aot(traced, be.Options())
    res, sass = aot.resources(k), aot.sass(k)
    assert res["spill_stores"] == res["spill_loads"] == 0 and not res["wgmma_serialized"], res["report"]
    assert res["num_warps"] == 12 and sass.count("HGMMA") >= 2 * d // 16
    assert "BAR.SYNC.DEFER_BLOCKING 0xf, 0x100" in sass and "BAR.ARV 0xe, 0x100" in sass
