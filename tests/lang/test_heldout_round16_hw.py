"""Round 16's held-out kernels on Hopper: an MLA decode written with the explicit-hardware ops, and every kernel of
test_heldout_round16*.py compiled for sm_90a on this CPU (no GPU).

mla_decode_ws is mla_decode_split (test_heldout_round16.py) scheduled by hand: a producer warpgroup streams the latent
cache and its rope keys through two rings, a consumer issues the two score products asynchronously into one
accumulator and then reads the latent stage a third time as the values of its p c product, so one stage is read by
three wgmmas, as keys and as values, before it is freed; the trip count and the stages come from a length read with
load_scalar (int32 or int64). Checked against float64 torch on the reference executor and under Triton's
interpreter (which drops the roles), then its Gluon source's synchronization (gluon_sync_check) and its sm_90a
compile. The other kernels are compiled by the Triton backend (no spills, at most 255 registers) and, where it lowers
them, by Gluon; arguments are meta tensors of serving-sized shapes.
"""

import math

import numpy as np
import pytest
import torch
from gluon_sync_check import check_sync, partitions
from heldout_support import BACKENDS, BF, I32, I64, close, launch, meta, randn
from sm90a_compile import check_triton_sm90a
from test_heldout_round16 import (
    mla_decode_split,
    mla_merge,
    mla_ref,
    rope_axial,
    spec_accept,
    spec_resample,
    t5_attention,
)
from test_heldout_round16_more import (
    lamb_apply,
    lamb_moments,
    moe_count_sort,
    moe_gather_order,
    triangle_mult,
    viterbi_backtrack,
    viterbi_forward,
)

import tilestack.lang as ts
from tilestack.backends import get_backend

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
PRODUCER = dict(warps=4, registers=40)
CONSUMER = dict(warps=4, registers=232)
ROLES = ("consumer", "producer")


@ts.kernel(grid=lambda QN, SPLITS: (SPLITS, QN.shape[0]))
def mla_decode_ws(QN, QP, CKV, KPE, LENS, OP, LSE, scale: float, *, BH: int = 64, BT: int = 64, DC: int = 256,
                  DR: int = 64, SPLITS: int = 4, STAGES: int = 2):
    """mla_decode_split's meaning (test_heldout_round16.py), warp-specialized: the producer fills the latent and rope
    rings, the consumer waits, issues q_n c^T + q_p kpe^T asynchronously, then p c on the same latent stage."""
    sp, b = ts.block_id(0), ts.block_id(1)
    L = ts.load_scalar(LENS, b)
    tiles = ts.cdiv(L, BT)
    per = ts.cdiv(tiles, SPLITS)
    lo = sp * per
    hi = ts.smin(lo + per, tiles)
    c_ring = ts.SharedStages[CKV.dtype, STAGES, BT, DC]()
    kp_ring = ts.SharedStages[KPE.dtype, STAGES, BT, DR]()
    c = ts.SharedTile[CKV.dtype, BT, DC]()
    kp = ts.SharedTile[KPE.dtype, BT, DR]()
    with ts.partition("consumer", **CONSUMER):
        qn = ts.SharedTile[QN.dtype, BH, DC]()
        qp = ts.SharedTile[QP.dtype, BH, DR]()
        ts.load(qn, QN, at=(b, 0, 0))
        ts.load(qp, QP, at=(b, 0, 0))
        acc = ts.RegTile[ts.f32, BH, DC]()
        m = ts.RegVec[ts.f32, BH]()
        lsum = ts.RegVec[ts.f32, BH]()
        ts.zero(acc)
        ts.neg_infty(m)
        ts.zero(lsum)
    for j in ts.range(lo, hi):
        st = (j - lo) % STAGES
        with ts.partition("producer", **PRODUCER):
            ts.async_load(c_ring, st, CKV, at=(b, j, 0))
            ts.async_load(kp_ring, st, KPE, at=(b, j, 0))
        with ts.partition("consumer", **CONSUMER):
            ts.wait_load(c, c_ring, st)
            ts.wait_load(kp, kp_ring, st)
            s = ts.RegTile[ts.f32, BH, BT]()
            ts.zero(s)
            ts.mma_ABt_async(s, qn, c, s)
            ts.mma_ABt_async(s, qp, kp, s)
            ts.mma_wait(s)
            ts.mul(s, s, scale * LOG2E)
            ts.right_fill(s, s, L - j * BT, -math.inf)
            m_new = ts.RegVec[ts.f32, BH]()
            ts.row_max(m_new, s, m)
            alpha = ts.RegVec[ts.f32, BH]()
            ts.sub(alpha, m, m_new)
            ts.exp2(alpha, alpha)
            ts.sub_row(s, s, m_new)
            ts.exp2(s, s)
            ts.mul_row(acc, acc, alpha)
            ts.mul(lsum, lsum, alpha)
            ts.row_sum(lsum, s, lsum)
            p = ts.RegTile[CKV.dtype, BH, BT]()
            ts.copy(p, s)
            ts.mma_AB_async(acc, p, c, acc)               # the latent stage again, as the values
            ts.mma_wait(acc)
            ts.copy(m, m_new)
    with ts.partition("consumer", **CONSUMER):
        empty = ts.RegVec[ts.bool_, BH]()
        ts.eq(empty, lsum, 0.0)
        safe = ts.RegVec[ts.f32, BH]()
        ts.where(safe, empty, 1.0, lsum)
        ts.div_row(acc, acc, safe)
        lse = ts.RegVec[ts.f32, BH]()
        ts.log2(lse, safe)
        ts.add(lse, lse, m)
        ts.mul(lse, lse, LN2)
        ts.where(lse, empty, -math.inf, lse)
        ts.store(OP, acc, at=(b, sp, 0, 0))
        ts.store(LSE, lse, at=(b, sp, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("len_dtype", [I32, I64])
def test_mla_decode_warp_specialized(backend, len_dtype):
    """Lengths of 70 (5 tiles over 3 splits: 2, 2, 1), 0 and 16 (one tile: two empty splits); 5 heads in 16 rows."""
    rng = np.random.default_rng(20261602)
    lens = (70, 0, 16)
    B, H, T, DC, DR, splits = len(lens), 5, 70, 64, 16, 3
    qn, qp = randn(rng, B, H, DC, dtype=BF) * 4, randn(rng, B, H, DR, dtype=BF) * 4
    ckv, kpe = randn(rng, B, T, DC, dtype=BF), randn(rng, B, T, DR, dtype=BF)
    ln = torch.tensor(lens, dtype=len_dtype)
    scale = 1 / math.sqrt(DC + DR)
    op, lse = torch.full((B, splits, H, DC), math.nan), torch.full((B, splits, H), math.nan)
    launch(mla_decode_ws, backend, qn, qp, ckv, kpe, ln, op, lse, scale, BH=16, BT=16, DC=DC, DR=DR, SPLITS=splits)
    o, lse_out = torch.full((B, H, DC), math.nan, dtype=BF), torch.full((B, H), math.nan)
    launch(mla_merge, backend, op, lse, o, lse_out, BH=16, DC=DC, SPLITS=splits)
    o_ref, lse_ref = mla_ref(qn, qp, ckv, kpe, ln, scale)
    close(o, o_ref, scale=4)
    torch.testing.assert_close(lse_out.double(), lse_ref, rtol=1e-5, atol=1e-4)
    assert torch.isneginf(lse[1]).all() and torch.isneginf(lse[2, 1:]).all()


BF3 = ts.ArgSpec(ts.bf16, 3)
F3, F4 = ts.ArgSpec(ts.f32, 3), ts.ArgSpec(ts.f32, 4)


@pytest.mark.parametrize("len_dtype", [ts.i32, ts.i64])
def test_mla_decode_ws_gluon_synchronization(len_dtype):
    """Each stage freed once, after the last of the three wgmmas that read it (two score products and p c) retired."""
    t = mla_decode_ws.trace(BF3, BF3, BF3, BF3, ts.ArgSpec(len_dtype, 1), F4, F3, 0.1)
    src = get_backend("gluon").source(t)
    compile(src, "<gluon mla_decode_ws>", "exec")
    check_sync(src, "mla_decode_ws", ROLES)
    part = partitions(src, "mla_decode_ws", ROLES)["consumer"]
    frees = [n for n, x in enumerate(part) if "mbarrier.arrive(c_ring_empty" in x]
    mmas = [n for n, x in enumerate(part) if "warpgroup_mma(" in x]
    assert len(frees) == 1 and len(mmas) == 3 and mmas[-1] < frees[0], (frees, mmas)


# ---- sm_90a ---------------------------------------------------------------------------------------------------
_B, _H, _T = 32, 16, 4096


def _mla(kernel, lens=I32):
    return (kernel, (meta(_B, 64, 256, dtype=BF), meta(_B, 64, 64, dtype=BF), meta(_B, _T, 256, dtype=BF),
                     meta(_B, _T, 64, dtype=BF), meta(_B, dtype=lens), meta(_B, 4, 64, 256), meta(_B, 4, 64), 0.07),
            dict(BH=64, BT=64, DC=256, DR=64, SPLITS=4))


def _lamb(n=1 << 24, tensors=64):
    flat = meta(1, n)
    return (flat, meta(1, n, dtype=BF), flat, flat, flat, meta(tensors + 1, dtype=I64), meta(tensors), meta(tensors),
            0.9, 0.999, 1e-6, 0.01, 0.1, 0.001)


def _tri(n=4, c=128, L=256):
    t = meta(n, L, L, c, dtype=BF).permute(0, 3, 1, 2)
    m = meta(n, L, L)
    return (t, t, m, m, t, t)


AOT_CASES = {   # name -> (kernel, meta args, constants)
    "mla_decode_split": _mla(mla_decode_split),
    "mla_decode_split_i64": _mla(mla_decode_split, I64),
    "mla_decode_ws": _mla(mla_decode_ws),
    "mla_merge": (mla_merge, (meta(_B, 4, 16, 256), meta(_B, 4, 16), meta(_B, 16, 256, dtype=BF), meta(_B, 16)),
                  dict(BH=16, DC=256, SPLITS=4)),
    "t5_bidir": (t5_attention, (meta(8, _H, 512, 64, dtype=BF),) * 3 + (meta(32, _H), meta(8, dtype=I64),
                                                                       meta(8, _H, 512, 64, dtype=BF)),
                 dict(NB=32, MAXD=128, BIDIR=True, BM=64, BN=64, D=64)),
    "t5_causal": (t5_attention, (meta(8, _H, 512, 64, dtype=BF),) * 3 + (meta(32, _H), meta(8, dtype=I32),
                                                                        meta(8, _H, 512, 64, dtype=BF)),
                  dict(NB=32, MAXD=128, BIDIR=False, BM=64, BN=64, D=64)),
    "rope_axial": (rope_axial, (meta(16, 577, 12, 64, dtype=BF).transpose(1, 2),
                                meta(16, 577, 12, 64, dtype=BF).transpose(1, 2), 24, 1), dict(BT=64, DQ=16)),
    "spec_accept": (spec_accept, (meta(64, 7, dtype=I64), meta(64, 7, 32000), meta(64, 8, 32000), meta(64, 7),
                                  meta(64, dtype=I32)), dict(BK=8, BV=1024)),
    "spec_resample": (spec_resample, (meta(64, 7, dtype=I64), meta(64, 7, 32000), meta(64, 8, 32000),
                                      meta(64, dtype=I32), meta(64), meta(64, 8, dtype=I64)), dict(BK1=8, BV=64)),
    "viterbi_forward": (viterbi_forward, (meta(256, 512, 48), meta(48, 48), meta(48), meta(256, dtype=I64),
                                          meta(256, 512, 48, dtype=I32), meta(256), meta(256, dtype=I32)),
                        dict(BS=64)),
    "viterbi_backtrack": (viterbi_backtrack, (meta(256, 512, 48, dtype=I32), meta(256, dtype=I32),
                                              meta(256, dtype=I64), meta(256, 512, dtype=I32)), dict(BS=64)),
    "lamb_moments": (lamb_moments, _lamb(), dict(BLK=1024)),
    "lamb_apply": (lamb_apply, (meta(1, 1 << 24), meta(1, 1 << 24), meta(65, dtype=I64), meta(64), meta(64), 1e-3),
                   dict(BLK=1024)),
    "triangle_mult": (triangle_mult, _tri(), dict(BI=64, BJ=64, BK=32)),
    "moe_count_sort": (moe_count_sort, (meta(8192, dtype=I32), meta(64, dtype=I32), meta(65, dtype=I32),
                                        meta(8192, dtype=I64)), dict(BM=64, BE=128)),
    "moe_gather_order": (moe_gather_order, (meta(8192, dtype=I64), meta(8192, dtype=I32)), dict(BO=64, BM=64)),
}


@pytest.mark.parametrize("name", [n for n in AOT_CASES if n != "rope_axial"])
def test_round16_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*AOT_CASES[name])


def test_rope_axial_compiles_for_sm90a_with_triton():
    """sin and cos made in the kernel keep libdevice's few words of stack (counted with spills; as round 10's rope)."""
    from tilestack.tune import aot
    if aot.missing_tools():
        pytest.skip(aot.missing_tools())
    r = aot.resources(*AOT_CASES["rope_axial"], {}, cache=False, timeout_s=None)
    assert r.ok and r.registers <= 255 and r.spills <= 8, r


# Gluon: wgmma's 64-row accumulators (a head tile of 64, a query block of 64) take one warpgroup (num_warps=4); the
# products of f32 tiles (the sampler's prefix sum) are refused by name, below.
GLUON_CASES = {name: {} for name in AOT_CASES if name != "spec_resample"}
GLUON_CASES.update({name: dict(num_warps=4) for name in ("mla_decode_split", "mla_decode_split_i64", "t5_bidir",
                                                         "t5_causal", "triangle_mult")})


@pytest.mark.parametrize("name", list(GLUON_CASES))
def test_round16_compiles_for_sm90a_with_gluon(name):
    from tilestack.backends.gluon import aot as gaot
    try:
        gaot.tool("ptxas")
    except gaot.ToolMissing as e:
        pytest.skip(str(e))
    kernel, args, consts = AOT_CASES[name]
    be = get_backend("gluon")
    res = gaot.resources(be.aot(kernel.trace(*args, **consts), be.Options(**GLUON_CASES[name])))
    assert res["spill_stores"] == res["spill_loads"] == 0 and not res["wgmma_serialized"], res["report"]
    assert res["stack"] <= (32 if name == "rope_axial" else 0), res["report"]


def test_gluon_refuses_the_samplers_f32_prefix_product_by_name():
    from tilestack.errors import BackendError
    kernel, args, consts = AOT_CASES["spec_resample"]
    with pytest.raises(BackendError, match=r"test_heldout_round16\.py:\d+: the gluon backend multiplies "
                                           r"bf16/f16/f8e4m3 tiles on wgmma; mma has f32 operands"):
        get_backend("gluon").source(kernel.trace(*args, **consts))


def test_thin_tiles_spread_their_warps_across_columns_on_gluon():
    """A (1, 1024) row (LAMB's flat-buffer tiles) took a layout with all 8 warps down its one row: 7 warps held copies
    of the first's elements (32 registers per f32 tile instead of 4), and lamb_moments spilled 284 bytes per thread
    at 255 registers. Warps go across the columns where the rows run out now (backends.gluon.layouts.blocked_params);
    tiles with rows for every warp keep the layout they had."""
    from tilestack.backends.gluon.layouts import blocked_params
    assert blocked_params(1, 1024, 4, 8) == ([1, 4], [1, 32], [1, 8])
    assert blocked_params(4, 256, 4, 8) == ([1, 4], [1, 32], [4, 2])
    for rows, cols in ((64, 64), (128, 128), (16, 16), (8, 1024), (64, 256)):
        assert blocked_params(rows, cols, 4, 8)[2] == [8, 1]
    kernel, args, consts = AOT_CASES["lamb_moments"]
    src = get_backend("gluon").source(kernel.trace(*args, **consts))
    assert "gl.BlockedLayout([1, 4], [1, 32], [1, 8], [1, 0])" in src and "[8, 1], [1, 0])" not in src
