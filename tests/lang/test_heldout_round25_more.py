"""Round 25 of held-out kernels, continued (test_heldout_round25.py has the first three): MoE token dispatch as a
gather then a product (each dispatched slot reads the row of its source token, picked by an index read from memory,
and multiplies it by the weight of its expert, also picked from memory; a slot of source -1, capacity padding,
reads nothing and writes zeros); fp8 e4m3 quantization with one scale per BM x BN block (the block's amax reduced
to a 1-element vector that is stored as its scale); and a sliding-window row sum of width BN as two triangular
products per column tile, the previous tile carried by the loop (the triangles staged in shared memory: the Gluon
backend takes wgmma's b operand only from there, and says so naming the operand); on the reference executor and Triton's interpreter against float64 torch; then
every kernel of round 25 compiled for Hopper (sm_90a) on this CPU through the Triton backend (no spills, at most 255
registers) and the Gluon backend (one warpgroup; no spills, no serialized wgmma) at serving-sized meta arguments.
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, F64, I32, I64, close, gluon_resources_one_warpgroup, launch, meta, randn
from sm90a_compile import check_triton_sm90a
from test_heldout_round25 import E4M3, batched_atx, gemm_softmax, group_quant_e4m3

import tilestack.lang as ts

F32 = torch.float32


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20262502)


# ---- 4. MoE dispatch: gather a token's row, multiply by its expert's weight --------------------------------------------
@ts.kernel(grid=lambda SRC, W, BN: (SRC.shape[0], ts.cdiv(W.shape[1], BN)))
def moe_dispatch_gemv(X, SRC, EXPERT, W, Y, *, BN: int = 16, BK: int = 32):
    """Y[s, n] = sum_k X[SRC[s], k] W[EXPERT[s], n, k] for each slot s; SRC[s] < 0 (an empty slot) gives a zero
    row. X (T, K), SRC and EXPERT (S,), W (E, N, K), Y (S, N)."""
    slot, j = ts.block_id(0), ts.block_id(1)
    src, e = ts.load_scalar(SRC, slot), ts.load_scalar(EXPERT, slot)
    W32 = ts.f64 if X.dtype is ts.f64 else ts.f32
    w = ts.RegTile[W32, BN, BK]()
    x = ts.RegVec[W32, BK]()
    y = ts.RegVec[W32, BN]()
    valid = ts.RegVec[ts.bool_, BN]()
    ts.zero(y)
    for k in ts.range(ts.cdiv(X.shape[1], BK)):
        ts.load(x, X, at=(ts.smax(src, 0), k))
        ts.load(w, W, at=(e, j, k))
        ts.mul(w, w, ts.per_col(x))
        ts.row_sum(y, w, y)
    sv = ts.RegVec[ts.i32, BN]()
    ts.fill(sv, src)                                  # a runtime Scalar is compared as a tile
    ts.ge(valid, sv, 0)
    ts.where(y, valid, y, 0.0)
    out = ts.RegVec[Y.dtype, BN]()
    ts.copy(out, y)
    ts.store(Y, out, at=(slot, j))


def dispatch_ref(x, src, expert, w):
    xs = torch.where((src >= 0)[:, None], x.double()[src.long().clamp_min(0)], torch.zeros(()).double())
    return torch.einsum("sk,snk->sn", xs, w.double()[expert.long()])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF, F64])
@pytest.mark.parametrize("idx_dtype", [I32, I64])
@pytest.mark.parametrize(("T", "E", "N", "K", "S"), [(11, 3, 21, 37, 17), (1, 1, 1, 1, 2), (5, 4, 16, 64, 9)])
def test_moe_dispatch_gather_then_gemv(backend, dtype, idx_dtype, T, E, N, K, S, rng):
    x, w = randn(rng, T, K, dtype=dtype), randn(rng, E, N, K, dtype=dtype)
    src = torch.from_numpy(rng.integers(-1, T, S)).to(idx_dtype)
    src[0] = -1                                       # one empty slot at least
    src[-1] = T - 1                                   # the last token (a ragged row of X's last tile)
    expert = torch.from_numpy(rng.integers(0, E, S)).to(idx_dtype)
    expert[-1] = E - 1
    y = torch.full((S, N), math.nan, dtype=dtype)
    launch(moe_dispatch_gemv, backend, x, src, expert, w, y)
    want = dispatch_ref(x, src, expert, w)
    close(y, want, scale=math.sqrt(K))
    assert (y[0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_dispatch_of_a_nan_token_poisons_only_its_slots(backend):
    """Token 1 is NaN: the slots reading it are NaN, the empty slot (-1) that would read row 0 is zero, and a slot
    of token 0 is exact."""
    x = torch.ones(3, 4)
    x[1, 2] = math.nan
    w = torch.ones(2, 3, 4)
    src = torch.tensor([1, -1, 0, 1], dtype=I32)
    expert = torch.tensor([0, 1, 1, 1], dtype=I32)
    y = torch.full((4, 3), -7.0)
    launch(moe_dispatch_gemv, backend, x, src, expert, w, y)
    assert torch.isnan(y[0]).all() and torch.isnan(y[3]).all()
    assert (y[1] == 0).all() and (y[2] == 4).all()


def test_moe_dispatch_misuse_is_named():
    x, w, y = torch.ones(3, 4), torch.ones(2, 3, 4), torch.ones(2, 3)
    with pytest.raises(Exception, match="SRC"):
        launch(moe_dispatch_gemv, "reference", x, torch.zeros(2, 1, dtype=I32), torch.zeros(2, dtype=I32), w, y)
    with pytest.raises(Exception, match="EXPERT"):
        launch(moe_dispatch_gemv, "reference", x, torch.zeros(2, dtype=I32), torch.zeros(2), w, y)


@ts.kernel(grid=lambda SRC: (SRC.shape[0],))
def gather_scatter_row(X, SRC, Y, *, BK: int = 4):
    """Y[s, :BK] = X[SRC[s], :BK] and Y[SRC[s] - 1, BK:2BK] = the same row: a row coordinate of -1 or -2, read or
    written, is past the tensor (reads 0, writes dropped), as a row past its end is."""
    s = ts.block_id(0)
    src = ts.load_scalar(SRC, s)
    x = ts.RegVec[ts.f32, BK]()
    ts.load(x, X, at=(src, 0))
    ts.store(Y, x, at=(s, 0))
    ts.store(Y, x, at=(src - 1, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_index_below_0_reads_zeros_and_drops_its_store(backend):
    x = torch.arange(12, dtype=F32).view(3, 4) + 1
    y = torch.full((3, 8), -7.0)
    launch(gather_scatter_row, backend, x, torch.tensor([-1, 0, 2], dtype=I32), y)
    want = torch.full((3, 8), -7.0)
    want[0, :4] = 0.0
    want[1, :4] = x[0]
    want[2, :4] = x[2]
    want[1, 4:] = x[2]                                # SRC = 2 writes row 1; SRC = -1, 0 write rows -2, -1: dropped
    assert torch.equal(y, want), y


# ---- 5. fp8 e4m3 quantization with one scale per BM x BN block (a 1-element vector for the block's scale) ----------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def block_quant_e4m3(X, Q, S, *, BM: int = 16, BN: int = 16):
    """Q = X / s in e4m3 and S[i, j] = s = amax(|X[block i, j]|) / 448 (1 for an all-zero block): the block's amax
    reduced twice, to a (BM,) vector every element of which is the amax (to divide by per row) and to a (1,) vector
    stored as the block's one scale."""
    i, j = ts.block_id(0), ts.block_id(1)
    x, ax = ts.RegTile[ts.f32, BM, BN](), ts.RegTile[ts.f32, BM, BN]()
    ts.load(x, X, at=(i, j))
    ts.abs(ax, x)
    colmax = ts.RegVec[ts.f32, BN]()
    ts.col_max(colmax, ax)
    spread = ts.RegTile[ts.f32, BM, BN]()
    ts.zero(spread)
    ts.add(spread, spread, ts.per_col(colmax))
    amax = ts.RegVec[ts.f32, BM]()
    ts.row_max(amax, spread)                          # every row: the block's amax
    one = ts.RegTile[ts.f32, 1, BN]()
    ts.zero(one)
    ts.add(one, one, ts.per_col(colmax))
    amax1 = ts.RegVec[ts.f32, 1]()
    ts.row_max(amax1, one)
    for v in (amax, amax1):
        nz = ts.RegVec[ts.bool_, v.shape[0]]()
        ts.gt(nz, v, 0.0)
        ts.div(v, v, 448.0)
        ts.where(v, nz, v, 1.0)
    ts.div(x, x, ts.per_row(amax))
    q = ts.RegTile[Q.dtype, BM, BN]()
    ts.copy(q, x)
    ts.store(Q, q, at=(i, j))
    ts.store(S, amax1, at=(i, j))


def block_quant_ref(x, BM=16, BN=16):
    M, N = x.shape
    gm, gn = -(-M // BM), -(-N // BN)
    xf = torch.nn.functional.pad(x.float(), (0, gn * BN - N, 0, gm * BM - M)).view(gm, BM, gn, BN)
    amax = xf.abs().amax((1, 3))
    s = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (xf / s[:, None, :, None]).clamp(-448, 448).to(E4M3).view(gm * BM, gn * BN)[:M, :N]
    return q, s


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF])
@pytest.mark.parametrize(("M", "N"), [(37, 21), (1, 1), (16, 48)])
def test_block_fp8_quantize(backend, dtype, M, N, rng):
    x = (randn(rng, M, N) * 10).to(dtype)
    if M > 16:
        x[16:32] = 0.0                                # an all-zero block row: scale 1
        x[0, 0] = -1e30 if dtype is not F16 else -6e4
    q = torch.full((M, N), 0x7F, dtype=torch.uint8).view(E4M3)
    s = torch.full((-(-M // 16), -(-N // 16)), math.nan)
    launch(block_quant_e4m3, backend, x, q, s)
    wq, ws = block_quant_ref(x)
    torch.testing.assert_close(s, ws, rtol=1e-6, atol=0)
    assert torch.equal(q.view(torch.uint8), wq.view(torch.uint8)), (q.float() - wq.float()).abs().max()
    if M > 16:
        assert (s[1] == 1).all() and q[0, 0].float().item() == -448.0


# ---- 6. a sliding-window row sum of width BN: two triangular products and the previous tile carried by the loop ---
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def window_row_sum(X, Y, *, BM: int = 16, BN: int = 16):
    """Y[r, c] = sum of X[r, c'] for c - BN < c' <= c (the window runs off the row's start as zeros): for column
    tile j, x_j @ U (U[c', c] = c' <= c) + x_{j-1} @ L (L[c', c] = c' > c), x_{j-1} the tile the loop carries."""
    i = ts.block_id(0)
    ones = ts.RegTile[X.dtype, BN, BN]()
    up, lo = ts.RegTile[X.dtype, BN, BN](), ts.RegTile[X.dtype, BN, BN]()
    ts.one(ones)
    ts.triu(up, ones, 0)
    ts.tril(lo, ones, -1)
    s_up, s_lo = ts.SharedTile[X.dtype, BN, BN](), ts.SharedTile[X.dtype, BN, BN]()
    ts.copy(s_up, up)                                 # wgmma's b operand lives in shared memory
    ts.copy(s_lo, lo)
    x, prev = ts.RegTile[X.dtype, BM, BN](), ts.RegTile[X.dtype, BM, BN]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    out = ts.RegTile[Y.dtype, BM, BN]()
    ts.zero(prev)
    for j in ts.range(ts.cdiv(X.shape[1], BN)):
        ts.load(x, X, at=(i, j))
        ts.zero(acc)
        ts.mma_AB(acc, x, s_up, acc)
        ts.mma_AB(acc, prev, s_lo, acc)
        ts.copy(out, acc)
        ts.store(Y, out, at=(i, j))
        ts.copy(prev, x)


def window_ref(x, w):
    c = torch.nn.functional.pad(x.double(), (1, 0)).cumsum(1)
    n = x.shape[1]
    idx = torch.arange(1, n + 1)
    return c[:, idx] - c[:, (idx - w).clamp_min(0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF, F16])
@pytest.mark.parametrize(("M", "N"), [(19, 53), (1, 1), (16, 32), (3, 17)])
def test_window_row_sum_with_a_carried_tile(backend, dtype, M, N, rng):
    x = torch.from_numpy(rng.integers(-8, 9, (M, N))).to(dtype)   # small integers: exact sums
    y = torch.full((M, N), math.nan)
    launch(window_row_sum, backend, x, y)
    assert torch.equal(y.double(), window_ref(x, 16)), (y.double() - window_ref(x, 16)).abs().max()
    xr = randn(rng, M, N, dtype=dtype) * 1e3
    launch(window_row_sum, backend, xr, y)
    close(y, window_ref(xr, 16), dtype=F32, scale=1e3)


# ---- sm_90a compiles -----------------------------------------------------------------------------------------------
AOT_CASES = {   # name -> (kernel, meta args, constants)
    "gemm_softmax": (gemm_softmax, (meta(8192, 512, dtype=BF), meta(4096, 512, dtype=BF), meta(8192, 4096, dtype=BF),
                                    0.044), dict(BM=64, BN=64, BK=64)),
    "batched_atx": (batched_atx, (meta(64, 4096, 1024, dtype=BF).transpose(1, 2), meta(64, 4096, dtype=BF),
                                  meta(64, 1024, dtype=BF)), dict(BN=64, BK=64)),
    "group_quant_e4m3": (group_quant_e4m3, (meta(16384, 7168, dtype=BF), meta(16384, 7168, dtype=E4M3),
                                            meta(16384, 56).T), dict(BM=32, BN=128)),
    "moe_dispatch_gemv": (moe_dispatch_gemv, (meta(4096, 2048, dtype=BF), meta(8192, dtype=I32),
                                              meta(8192, dtype=I32), meta(8, 1408, 2048, dtype=BF),
                                              meta(8192, 1408, dtype=BF)), dict(BN=64, BK=64)),
    "block_quant_e4m3": (block_quant_e4m3, (meta(16384, 7168, dtype=BF), meta(16384, 7168, dtype=E4M3),
                                            meta(128, 56)), dict(BM=128, BN=128)),
    "window_row_sum": (window_row_sum, (meta(8192, 4096, dtype=BF), meta(8192, 4096)), dict(BM=64, BN=64)),
}


@pytest.mark.parametrize("name", list(AOT_CASES))
def test_round25_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*AOT_CASES[name])


@pytest.mark.parametrize("name", list(AOT_CASES))
def test_round25_compiles_for_sm90a_with_gluon(name):
    """One warpgroup (num_warps=4); no spills, no serialized wgmma."""
    res = gluon_resources_one_warpgroup(*AOT_CASES[name])
    assert res["spill_stores"] == res["spill_loads"] == 0 and not res["wgmma_serialized"], res["report"]
