"""The warp-specialized attention backward (kernels/attention_bwd_ws.py) on the Gluon backend, on this machine (no
GPU): the generated source frees each ring stage to the producer only after the last wgmma that reads it has
retired (the dK/dV consumer reads one Q stage in S^T = K Q^T and again in dK += dS^T Q), and the sm_90a compile
has the warp-specialized partitions with their register budgets and the trip's wgmma. Its meaning is tested in
tests/kernels/test_attention_bwd_ws.py."""

import re

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


def consumer_loops(src: str) -> list[list[str]]:
    """The body lines of every loop of the consumer partitions that waits on a ring, one list a loop."""
    loops, cur, inside, depth = [], None, False, 0
    for line in src.splitlines():
        if line.startswith("def "):
            inside = "_consumer" in line
            continue
        if not inside:
            continue
        m = re.match(r"( *)for ", line)
        if m:
            cur, depth = [], len(m.group(1))
            loops.append(cur)
            continue
        if cur is not None and line.strip() and len(line) - len(line.lstrip()) > depth:
            cur.append(line.strip())
    return [body for body in loops if any("mbarrier.wait(" in x and "_ready" in x for x in body)]


@pytest.mark.parametrize("make", [dkdv, dq], ids=["dkdv", "dq"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_a_stage_is_freed_after_the_last_wgmma_that_reads_it(make, causal):
    src = get_backend("gluon").source(make(128, causal))
    loops = consumer_loops(src)
    assert loops, "no consumer loop waits on a ring"
    for body in loops:
        views = {m.group(1): m.group(2) for x in body
                 if (m := re.match(r"(\w+) = (\w+)\.index\(\w+\)\.reshape", x))}    # stage view -> ring
        assert views, body
        for view, ring in views.items():
            reads = [n for n, x in enumerate(body) if "warpgroup_mma(" in x and re.search(rf"\b{view}\b", x)]
            frees = [n for n, x in enumerate(body) if f"{ring}_empty.index" in x and "arrive" in x]
            assert reads and len(frees) == 1, (view, body)
            # freed after its last reader, and after a wait that retires everything (wait(0)) following it
            retire = [n for n, x in enumerate(body) if "warpgroup_mma_wait(0" in x and n > reads[-1]]
            assert retire and retire[0] < frees[0], (view, body)
    if make is dkdv:   # the Q stage is read twice in a trip: by S^T = K Q^T and by dK += dS^T Q
        assert any(sum("warpgroup_mma(" in x and "q_s" in x for x in body) == 2 for body in loops)


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
