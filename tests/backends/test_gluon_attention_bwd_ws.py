"""The warp-specialized attention backward (kernels/attention_bwd_ws.py) on the Gluon backend, on this machine (no
GPU): the sm_90a compile has the warp-specialized partitions with their register budgets and the trip's wgmma.
Its synchronization (each ring stage freed only after the last wgmma that reads it has retired: the dK/dV
consumer reads one Q stage in S^T = K Q^T and again in dK += dS^T Q) is checked in
tests/lang/test_library_gluon_sync.py, its meaning in tests/kernels/test_attention_bwd_ws.py."""

import pytest

import tilestack.lang as ts
from tilestack.backends import get_backend
from tilestack.backends.gluon import aot
from tilestack.kernels import attention_bwd_ws as ws

BF16_4, F32_3 = ts.ArgSpec(ts.bf16, 4), ts.ArgSpec(ts.f32, 3)


def dkdv(D: int, causal: bool, **consts):
    return ws.attention_bwd_dkdv_ws_kernel.trace(BF16_4, BF16_4, BF16_4, BF16_4, F32_3, F32_3, BF16_4, BF16_4, 0.1,
                                                 D=D, causal=causal, **consts)


def dq(D: int, causal: bool, **consts):
    return ws.attention_bwd_dq_ws_kernel.trace(BF16_4, BF16_4, BF16_4, BF16_4, F32_3, F32_3, BF16_4, 0.1, D=D,
                                               causal=causal, **consts)


@pytest.fixture(scope="module")
def _ptxas():
    try:
        aot.tool("ptxas")
        aot.tool("cuobjdump")
    except aot.ToolMissing as e:
        pytest.skip(str(e))


def compiled(traced):
    be = get_backend("gluon")
    k = be.aot(traced, be.Options())
    return k, aot.resources(k), aot.sass(k)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dq_ws_compiles_warp_specialized_without_spills(_ptxas, D, causal):
    k, res, sass = compiled(dq(D, causal))
    assert res["spill_stores"] == res["spill_loads"] == 0, res["report"]
    assert not res["wgmma_serialized"], res["report"]
    assert k.metadata.num_warps == 12 and "USETMAXREG" in sass
    # per consumer trip: S and dP over D / 16 k-steps each, dQ += dS K over BN / 16 (BN = 64)
    assert sass.count("HGMMA") >= 2 * (2 * D // 16 + 64 // 16), sass.count("HGMMA")


@pytest.mark.parametrize("D", [64, 128])
def test_dkdv_ws_compiles_warp_specialized(_ptxas, D):
    k, res, sass = compiled(dkdv(D, False))
    assert not res["wgmma_serialized"], res["report"]
    assert k.metadata.num_warps == 12 and "USETMAXREG" in sass
    # per consumer trip: S^T and dP^T over D / 16 k-steps each, dV and dK over BM / 16 = 4
    assert sass.count("HGMMA") >= 2 * (2 * D // 16 + 2 * 4), sass.count("HGMMA")
    if D == 64:        # at 128 the two (64, 128) f32 accumulators leave a consumer a few scalars to spill
        assert res["spill_stores"] == res["spill_loads"] == 0, res["report"]


def test_turns_become_named_barriers(_ptxas):
    """TURNS: each consumer's products issued in turn with the other's (bar.sync / bar.arrive on named barriers)."""
    plain = aot.sass(compiled(dq(64, False))[0])
    k, res, sass = compiled(dq(64, False, TURNS=True))
    assert sass.count("BAR.ARV") > plain.count("BAR.ARV") and sass.count("BAR.SYNC") > plain.count("BAR.SYNC")
    assert res["spill_stores"] == 0 and not res["wgmma_serialized"], res["report"]
