"""Round 6 of held-out kernels (after test_heldout_kernels.py and rounds 2-5): ops and combinations no earlier round
ran, each on the reference executor and Triton's interpreter against float64 / exact torch, outputs poisoned first.

exp2 / log2 on 1-D vectors and sin / cos on tiles with one dimension 1, the broadcast max_row / min_row / min_col /
max_col with vectors of another dtype than the tile, make_causal with a block diagonal, logical_not and pos_infty,
Philox dropout (rand) the same on both executors, column reductions (axis 0) over a loop of row blocks with ragged
rows masked, nested loops carrying tiles at both levels, mma_AtBt, a transpose through a SharedTile, one kernel
writing four outputs of four dtypes, constexpr switches (an activation name, an optional bias given as a flag)
traced once per constant set, a grid from an int argument (0 programs too), a store guarded by a loop of 0 or 1
trips, a grid-stride loop over num_blocks, comparisons of mixed dtypes (i32 against a float, f16 against an i64
vector), and misuse at launch (a None tensor, a constant out of its tunable domain or misspelt, a float for an int)
refused with a message naming the argument before anything is written. More kernels of this round (unary ops at
the extremes, loop shapes, index arithmetic, operator sugar, misuse when traced) and the bugs the round found are in
test_heldout_round6_more.py. The kernels here are also compiled for sm_90a on this CPU (section 18).
(No kernel of this file found a bug: each passed on both executors as written. Scalar float arithmetic is f32 by
design, so nan_to_num takes -big as an argument; see round6_more's open item.)
"""

import math

import pytest
import torch
from heldout_support import BACKENDS, BF, F16, F64, I8, I32, I64, close, ints, launch, meta, randn
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a

import tilestack.lang as ts
from tilestack.errors import LaunchError, TunableError

POISON = -77.0
EXTREMES = [math.nan, math.inf, -math.inf, 1e30, -1e30, 0.0, -0.0]


def with_extremes(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its first elements (flattened) replaced by NaN, +-inf, +-1e30 and +-0."""
    flat = x.reshape(-1).clone()
    k = min(len(EXTREMES), flat.numel())
    flat[:k] = torch.tensor(EXTREMES[:k], dtype=x.dtype)
    return flat.reshape(x.shape)


def poisoned(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.full(shape, POISON, dtype=dtype)


# ---- 1. base-2 softplus on a 1-D vector: log2(1 + exp2(x)), stable: max(x, 0) + log2(1 + exp2(-|x|)) -------------
@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def softplus2(X, Y, *, BN: int = 32):
    i = ts.block_id(0)
    x = ts.RegVec[X.dtype, BN]()                 # f64 work for f64 (f32 for f16: the language's float work)
    t = ts.RegVec[X.dtype, BN]()
    pos = ts.RegVec[X.dtype, BN]()
    ts.load(x, X, at=(i,))
    ts.abs(t, x)
    ts.neg(t, t)
    ts.exp2(t, t)
    ts.add(t, t, 1.0)
    ts.log2(t, t)
    ts.relu(pos, x)
    ts.add(t, t, pos)
    ts.store(Y, t, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", [torch.float32, F16, F64])
@pytest.mark.parametrize("N", [32, 45, 1, 0])
def test_softplus2_on_a_vector(backend, dt, N, rng):
    x = with_extremes(randn(rng, N, dtype=dt) * 4)
    y = poisoned(N, dtype=dt)
    launch(softplus2, backend, x, y)
    xd = x.double()
    want = xd.clamp(min=0) + torch.log2(1 + torch.exp2(-xd.abs()))
    close(y, want.to(dt))


# ---- 2. sin / cos on tiles with one dimension 1: a (1, N) row rotated by a (M, 1) column of angles ------------------
@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[1], BN),))
def rotate_row(X, Theta, C, S, *, BM: int = 16, BN: int = 32):
    """C[m, n] = cos(theta[m]) * x[n], S[m, n] = sin(theta[m]) * x[n] for one row X (1, N), Theta (M, 1), M <= BM."""
    j = ts.block_id(0)
    x = ts.RegTile[ts.f32, 1, BN]()
    th = ts.RegTile[ts.f32, BM, 1]()
    c = ts.RegTile[ts.f32, BM, 1]()
    s = ts.RegTile[ts.f32, BM, 1]()
    cv = ts.RegVec[ts.f32, BM]()
    sv = ts.RegVec[ts.f32, BM]()
    xv = ts.RegVec[ts.f32, BN]()
    out = ts.RegTile[ts.f32, BM, BN]()
    ts.load(x, X, at=(0, j))
    ts.load(th, Theta, at=(0, 0))
    ts.cos(c, th)
    ts.sin(s, th)
    ts.row_sum(cv, c)                                # (BM, 1) -> (BM,): the one column
    ts.row_sum(sv, s)
    ts.col_sum(xv, x)                                # (1, BN) -> (BN,): the one row
    ts.zero(out)
    ts.add_col(out, out, xv)
    ts.mul_row(out, out, cv)
    ts.store(C, out, at=(0, j))
    ts.zero(out)
    ts.add_col(out, out, xv)
    ts.mul_row(out, out, sv)
    ts.store(S, out, at=(0, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(16, 64), (5, 37), (1, 1), (3, 0)])
def test_sin_cos_on_tiles_with_a_dimension_of_1(backend, M, N, rng):
    x = randn(rng, 1, N)
    th = randn(rng, M, 1) * 10
    if M > 2:
        th[:3, 0] = torch.tensor([0.0, math.pi, 1e4])
    c, s = poisoned(M, N), poisoned(M, N)
    launch(rotate_row, backend, x, th, c, s)
    close(c, torch.cos(th.double()) * x.double(), scale=10)
    close(s, torch.sin(th.double()) * x.double(), scale=10)


# ---- 3. per-row / per-column clamps by the broadcast max/min ops, vectors of another dtype than the tile ------------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def clamp_rows_cols(X, Lo, Hi, Cap, Y, *, BM: int = 16, BN: int = 16):
    """Y = min(clamp(X, Lo[r], Hi[r]), Cap[c]) and then max(., -Cap[c]): Lo/Hi/Cap bf16, X f32 (the work in f32)."""
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[ts.f32, BM, BN]()
    lo = ts.RegVec[ts.bf16, BM]()
    hi = ts.RegVec[ts.bf16, BM]()
    cap = ts.RegVec[ts.bf16, BN]()
    ncap = ts.RegVec[ts.bf16, BN]()
    ts.load(x, X, at=(i, j))
    ts.load(lo, Lo, at=(i,))
    ts.load(hi, Hi, at=(i,))
    ts.load(cap, Cap, at=(j,))
    ts.max_row(x, x, lo)
    ts.min_row(x, x, hi)
    ts.min_col(x, x, cap)
    ts.neg(ncap, cap)
    ts.max_col(x, x, ncap)
    ts.store(Y, x, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(16, 16), (21, 35), (1, 7), (0, 4)])
def test_per_row_and_per_col_clamps_of_mixed_dtypes(backend, M, N, rng):
    x = with_extremes(randn(rng, M, N) * 3)
    lo = randn(rng, M, dtype=BF) - 1
    hi = lo + torch.rand(M, generator=torch.Generator().manual_seed(1)).to(BF) * 2
    cap = (randn(rng, N).abs() * 2).to(BF)
    y = poisoned(M, N)
    launch(clamp_rows_cols, backend, x, lo, hi, cap, y)
    c = cap.double()
    want = torch.maximum(torch.minimum(torch.minimum(torch.maximum(x.double(), lo.double()[:, None]),
                                                     hi.double()[:, None]), c), -c)
    close(y, want.float())


# ---- 4. causal softmax by make_causal and exp2, a loop over key blocks (two passes: max and sum, then store) -------
@ts.kernel(grid=lambda S, BM: (ts.cdiv(S.shape[0], BM),))
def causal_softmax(S, P, *, BM: int = 16, BN: int = 16):
    """P = softmax(S masked to the lower triangle) along rows, S square (N, N); exp2 of log2(e)-scaled scores."""
    i = ts.block_id(0)
    n = S.shape[1]
    s = ts.RegTile[ts.f32, BM, BN]()
    m = ts.RegVec[ts.f32, BM]()
    m_new = ts.RegVec[ts.f32, BM]()
    alpha = ts.RegVec[ts.f32, BM]()
    ell = ts.RegVec[ts.f32, BM]()
    ts.neg_infty(m)
    ts.zero(ell)
    for j in ts.range(ts.cdiv(n, BN)):
        ts.load(s, S, at=(i, j))
        ts.mul(s, s, 1.4426950408889634)
        ts.make_causal(s, s, i * BM - j * BN)
        ts.right_fill(s, s, n - j * BN, -math.inf)
        ts.row_max(m_new, s, m)
        ts.sub(alpha, m, m_new)
        ts.exp2(alpha, alpha)
        ts.mul(ell, ell, alpha)
        ts.sub_row(s, s, m_new)
        ts.exp2(s, s)
        ts.row_sum(ell, s, ell)
        ts.copy(m, m_new)
    for j in ts.range(ts.cdiv(n, BN)):
        ts.load(s, S, at=(i, j))
        ts.mul(s, s, 1.4426950408889634)
        ts.make_causal(s, s, i * BM - j * BN)
        ts.sub_row(s, s, m)
        ts.exp2(s, s)
        ts.div_row(s, s, ell)
        ts.store(P, s, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N", [32, 37, 1, 0])
def test_causal_softmax_by_make_causal(backend, N, rng):
    s = randn(rng, N, N) * 3
    if N > 4:
        s[3, 1] = 1e30                     # a huge score under the diagonal wins its row
        s[2, 3] = math.inf                 # above the diagonal: masked away
    p = poisoned(N, N)
    launch(causal_softmax, backend, s, p)
    mask = torch.ones(N, N, dtype=torch.bool).tril()
    want = torch.softmax(s.double().masked_fill(~mask, -math.inf), dim=1)
    close(p, want.float())


# ---- 5. nan_to_num by logical_not, pos_infty and where: NaN -> 0, +inf -> Big, -inf -> -Big (f64 and f16) --------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def nan_to_num(X, Y, big: float, neg_big: float, *, BM: int = 8, BN: int = 16):
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[X.dtype, BM, BN]()
    inf = ts.RegTile[X.dtype, BM, BN]()
    is_num = ts.RegTile[ts.bool_, BM, BN]()
    is_nan = ts.RegTile[ts.bool_, BM, BN]()
    hit = ts.RegTile[ts.bool_, BM, BN]()
    ts.load(x, X, at=(i, j))
    ts.pos_infty(inf)
    ts.eq(is_num, x, x)
    ts.logical_not(is_nan, is_num)
    ts.where(x, is_nan, 0.0, x)
    ts.eq(hit, x, inf)
    ts.where(x, hit, big, x)
    ts.neg(inf, inf)
    ts.eq(hit, x, inf)
    ts.where(x, hit, neg_big, x)                 # (not -big: scalar float arithmetic is f32, -1e300 -> -inf)
    ts.store(Y, x, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", [F64, F16])
@pytest.mark.parametrize(("M", "N"), [(8, 16), (11, 19), (0, 3)])
def test_nan_to_num_by_logical_not(backend, dt, M, N, rng):
    x = with_extremes(randn(rng, M, N, dtype=dt))
    y = poisoned(M, N, dtype=dt)
    big = 1e300 if dt is F64 else 60000.0
    launch(nan_to_num, backend, x, y, big, -big)
    assert torch.equal(y, torch.nan_to_num(x, nan=0.0, posinf=big, neginf=-big))


# ---- 6. dropout by rand: the same Philox mask on both executors, seed and offset runtime ints ---------------------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def dropout(X, Y, seed: int, offset: int, p: float, *, BM: int = 16, BN: int = 32):
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[ts.f32, BM, BN]()
    u = ts.RegTile[ts.f32, BM, BN]()
    keep = ts.RegTile[ts.bool_, BM, BN]()
    ts.load(x, X, at=(i, j))
    ts.rand(u, seed, offset, row=i * BM, col=j * BN, stride=X.shape[1])
    ts.ge(keep, u, p)
    ts.div(x, x, 1.0 - p)
    ts.where(x, keep, x, 0.0)
    ts.store(Y, x, at=(i, j))


@pytest.mark.parametrize(("M", "N"), [(64, 64), (37, 29), (0, 8)])
def test_dropout_mask_is_the_same_on_both_executors(M, N, rng):
    x = randn(rng, M, N) + 3.0                       # no zeros: a zero output is a dropped element
    ys = {b: poisoned(M, N) for b in BACKENDS}
    for b in BACKENDS:
        launch(dropout, b, x, ys[b], 1234, 2**33 + 5, 0.25)
    assert torch.equal(ys["reference"], ys["triton"])
    kept = ys["reference"] != 0
    close(ys["reference"][kept], x[kept] / 0.75)
    if M * N > 1000:
        assert 0.2 < 1 - kept.double().mean().item() < 0.3
    again = poisoned(M, N)
    launch(dropout, "reference", x, again, 1235, 2**33 + 5, 0.25)  # another seed, another mask
    assert M * N == 0 or not torch.equal(again, ys["reference"])


# ---- 7. column max / min / sum (axis 0) over a loop of row blocks, ragged rows masked by lower_fill ----------------
@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[1], BN),))
def col_stats(X, Max, Min, Sum, *, BM: int = 8, BN: int = 16):
    j = ts.block_id(0)
    m = X.shape[0]
    x = ts.RegTile[ts.f32, BM, BN]()
    t = ts.RegTile[ts.f32, BM, BN]()
    hi = ts.RegVec[ts.f32, BN]()
    lo = ts.RegVec[ts.f32, BN]()
    sm = ts.RegVec[ts.f32, BN]()
    ts.neg_infty(hi)
    ts.pos_infty(lo)
    ts.zero(sm)
    for k in ts.range(ts.cdiv(m, BM)):
        ts.load(x, X, at=(k, j))
        ts.col_sum(sm, x, sm)                        # padding rows read 0: no effect on the sum
        ts.lower_fill(t, x, m - k * BM, -math.inf)
        ts.col_max(hi, t, hi)
        ts.lower_fill(t, x, m - k * BM, math.inf)
        ts.col_min(lo, t, lo)
    ts.store(Max, hi, at=(j,))
    ts.store(Min, lo, at=(j,))
    ts.store(Sum, sm, at=(j,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", [torch.float32, BF])
@pytest.mark.parametrize(("M", "N"), [(32, 16), (19, 21), (1, 1), (0, 5)])
def test_column_reductions_over_row_blocks(backend, dt, M, N, rng):
    x = randn(rng, M, N, dtype=dt) - 5               # all negative: a padding 0 would win the max
    if M > 2 and N > 3:
        x[1, 0], x[0, 1], x[2, 2] = math.inf, -math.inf, math.nan
    outs = [poisoned(N) for _ in range(3)]
    launch(col_stats, backend, x, *outs)
    xd = x.double()
    if M == 0:
        want = (torch.full((N,), -math.inf), torch.full((N,), math.inf), torch.zeros(N))
    else:
        want = (xd.amax(0), xd.amin(0), xd.sum(0))
    for got, w in zip(outs, want, strict=True):
        close(got, w.float(), torch.float32, scale=4)


# ---- 8. nested loops carrying tiles at both levels: the largest sum over groups of G row blocks, per column -------
@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[1], BN),))
def max_group_sum(X, Y, *, G: int = 2, BM: int = 8, BN: int = 16):
    """Y[c] = max over groups g of sum(X[g*G*BM:(g+1)*G*BM, c]); rows past the end add 0."""
    j = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, BN]()
    group = ts.RegVec[ts.f32, BN]()
    best = ts.RegVec[ts.f32, BN]()
    ts.neg_infty(best)
    for g in ts.range(ts.cdiv(X.shape[0], G * BM)):
        ts.zero(group)
        for k in ts.range(G):
            ts.load(x, X, at=(g * G + k, j))
            ts.col_sum(group, x, group)
        ts.max(best, best, group)
    ts.store(Y, best, at=(j,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N", "G"), [(64, 16, 2), (37, 23, 3), (5, 1, 1), (0, 4, 2)])
def test_nested_loops_carry_tiles(backend, M, N, G, rng):
    x = randn(rng, M, N)
    y = poisoned(N)
    launch(max_group_sum, backend, x, y, G=G)
    rows = G * 8
    groups = [x[r:r + rows].double().sum(0) for r in range(0, M, rows)]
    want = torch.stack(groups).amax(0) if groups else torch.full((N,), -math.inf, dtype=F64)
    close(y, want.float(), scale=4)


# ---- 9. mma_AtBt: C = A^T @ B^T from A (K, M) and B (N, K), f16 operands, K a loop with a ragged end ---------------
@ts.kernel(grid=lambda C, BM, BN: (ts.cdiv(C.shape[0], BM), ts.cdiv(C.shape[1], BN)))
def gemm_at_bt(A, B, C, *, BM: int = 16, BN: int = 16, BK: int = 16):
    i, j = ts.block_id(0), ts.block_id(1)
    a = ts.SharedTile[A.dtype, BK, BM]()
    b = ts.SharedTile[B.dtype, BN, BK]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[0], BK)):
        ts.load(a, A, at=(k, i))
        ts.load(b, B, at=(j, k))
        ts.mma_AtBt(acc, a, b, acc)
    ts.store(C, acc, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("K", "M", "N"), [(32, 16, 32), (19, 21, 13), (0, 5, 7), (1, 1, 1)])
def test_mma_AtBt(backend, K, M, N, rng):
    a, b = randn(rng, K, M, dtype=F16), randn(rng, N, K, dtype=F16)
    c = poisoned(M, N, dtype=BF)
    launch(gemm_at_bt, backend, a, b, c)
    close(c, (a.double().T @ b.double().T).to(BF), scale=4)


# ---- 10. a transpose through a shared tile, i8 -> i64 (integers widened exactly) ----------------------------------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def transpose_widen(X, Y, *, BM: int = 16, BN: int = 32):
    i, j = ts.block_id(0), ts.block_id(1)
    s = ts.SharedTile[ts.i8, BM, BN]()
    x = ts.RegTile[ts.i8, BM, BN]()
    t = ts.RegTile[ts.i64, BN, BM]()
    ts.load(s, X, at=(i, j))
    ts.load(x, s)
    ts.transpose(t, x)
    ts.mul(t, t, 2**40)                               # i64 work: past 32 bits
    ts.store(Y, t, at=(j, i))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(16, 32), (17, 45), (1, 1), (0, 3)])
def test_transpose_through_shared_widened(backend, M, N, rng):
    x = ints(rng, -128, 128, (M, N), I8)
    y = torch.full((N, M), -5, dtype=I64)
    launch(transpose_widen, backend, x, y)
    assert torch.equal(y, x.T.to(I64) * 2**40)


# ---- 11. one kernel, four outputs of four dtypes: row mean (f64), row max (f16), positives (i32), any NaN (i8) -----
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def row_report(X, Mean, Max, Pos, HasNan, *, BM: int = 8, BN: int = 16):
    i = ts.block_id(0)
    n = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    t = ts.RegTile[ts.f32, BM, BN]()
    flag = ts.RegTile[ts.bool_, BM, BN]()
    cnt = ts.RegTile[ts.i32, BM, BN]()
    sm = ts.RegVec[ts.f32, BM]()
    mx = ts.RegVec[ts.f32, BM]()
    pos = ts.RegVec[ts.i32, BM]()
    nan = ts.RegVec[ts.i32, BM]()
    mean = ts.RegVec[ts.f64, BM]()
    mx16 = ts.RegVec[ts.f16, BM]()
    nan8 = ts.RegVec[ts.i8, BM]()
    ts.zero(sm)
    ts.neg_infty(mx)
    ts.zero(pos)
    ts.zero(nan)
    for j in ts.range(ts.cdiv(n, BN)):
        ts.load(x, X, at=(i, j))
        ts.row_sum(sm, x, sm)
        ts.right_fill(t, x, n - j * BN, -math.inf)
        ts.row_max(mx, t, mx)
        ts.gt(flag, x, 0.0)
        ts.where(cnt, flag, 1, 0)
        ts.row_sum(pos, cnt, pos)
        ts.ne(flag, x, x)
        ts.where(cnt, flag, 1, 0)
        ts.row_max(nan, cnt, nan)
    ts.copy(mean, sm)
    ts.div(mean, mean, n)
    ts.copy(mx16, mx)
    ts.copy(nan8, nan)
    ts.store(Mean, mean, at=(i,))
    ts.store(Max, mx16, at=(i,))
    ts.store(Pos, pos, at=(i,))
    ts.store(HasNan, nan8, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(8, 32), (13, 21), (1, 1), (0, 4)])
def test_four_outputs_of_four_dtypes(backend, M, N, rng):
    x = randn(rng, M, N) * 100
    if M > 3 and N > 2:
        x[1, 1], x[2, :] = math.nan, -math.inf
        x[3, 0] = 1e6                                 # past f16's range: its max is +inf in f16
    outs = (torch.full((M,), POISON, dtype=F64), poisoned(M, dtype=F16), torch.full((M,), -5, dtype=I32),
            torch.full((M,), -5, dtype=I8))
    launch(row_report, backend, x, *outs)
    xd = x.double()
    close(outs[0], xd.sum(1).float().double() / N, torch.float32)
    close(outs[1], xd.amax(1).to(F16))
    assert torch.equal(outs[2], (x > 0).sum(1).to(I32))
    assert torch.equal(outs[3], x.isnan().any(1).to(I8))


# ---- 12. constexpr switches: an activation by name and an optional bias by a flag, one trace per constant set ------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def bias_act(X, Bias, Y, *, ACT: str = "none", HAS_BIAS: bool = False,
             BM: int = ts.tunable(16, (8, 16)), BN: int = ts.tunable(16, (16, 32))):
    """Y = act(X + Bias[c]); without HAS_BIAS, Bias is a placeholder tensor that is never read."""
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[ts.f32, BM, BN]()
    ts.load(x, X, at=(i, j))
    if HAS_BIAS:
        b = ts.RegVec[ts.f32, BN]()
        ts.load(b, Bias, at=(j,))
        ts.add_col(x, x, b)
    if ACT == "relu":
        ts.relu(x, x)
    elif ACT == "sigmoid":
        ts.sigmoid(x, x)
    elif ACT == "sin":
        ts.sin(x, x)
    ts.store(Y, x, at=(i, j))


ACTS = {"none": lambda v: v, "relu": torch.relu, "sigmoid": torch.sigmoid, "sin": torch.sin}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(16, 32), (9, 19)])
def test_constexpr_switches_trace_once_per_constant_set(backend, M, N, rng):
    x, bias = with_extremes(randn(rng, M, N)), randn(rng, N)
    for act in ACTS:
        for has_bias in (False, True):
            for bm, bn in ((16, 16), (8, 32)):
                y = poisoned(M, N)
                launch(bias_act, backend, x, bias if has_bias else torch.empty(0), y, ACT=act, HAS_BIAS=has_bias,
                       BM=bm, BN=bn)
                close(y, ACTS[act](x.double() + (bias.double() if has_bias else 0)).float())
    traced = [k for k in bias_act._traced if k[0] == ((ts.f32, 2), (ts.f32, 1), (ts.f32, 2))]
    assert len(traced) == len(ACTS) * 2 * 2       # one trace per (ACT, HAS_BIAS, BM, BN), the same across backends


# ---- 13. a grid from an int argument: only the first `rows` rows are written (0 rows: no programs at all) --------
@ts.kernel(grid=lambda rows, BM: (ts.cdiv(rows, BM),))
def scale_first_rows(X, Y, rows: int, a: float, *, BM: int = 8, BN: int = 32):
    i = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, BN]()
    ts.load(x, X, at=(i, 0))
    ts.mul(x, x, a)
    ts.lower_fill(x, x, rows - i * BM, POISON)      # rows of this block at or past `rows` keep the poison
    ts.store(Y, x, at=(i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "rows"), [(40, 40), (40, 13), (40, 0), (3, 3)])
def test_grid_from_an_int_argument(backend, M, rows, rng):
    x, y = randn(rng, M, 20), poisoned(M, 20)
    launch(scale_first_rows, backend, x, y, rows, -2.5)
    want = poisoned(M, 20)
    want[:rows] = x[:rows] * -2.5
    assert torch.equal(y, want)


# ---- 14. a store guarded at run time by a loop of 0 or 1 trips: blocks whose row sum is not above a threshold -----
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def store_if_enabled(X, Y, enable: int, *, BM: int = 8, BN: int = 16):
    """Y's block i = 2 * X's block i when enable != 0 (a loop of smin(enable, 1) trips); else Y is untouched."""
    i = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, BN]()
    for _ in ts.range(ts.smin(ts.smax(enable, 0), 1)):
        ts.load(x, X, at=(i, 0))
        ts.add(x, x, x)
        ts.store(Y, x, at=(i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("enable", [0, 1, 7, -3, 2**40])
def test_a_store_guarded_by_a_loop_of_0_or_1_trips(backend, enable, rng):
    x, y = randn(rng, 19, 16), poisoned(19, 16)
    launch(store_if_enabled, backend, x, y, enable)
    assert torch.equal(y, 2 * x if enable > 0 else poisoned(19, 16))


# ---- 15. a grid-stride loop over num_blocks(0): 3 programs cover any number of row blocks --------------------------
@ts.kernel(grid=lambda X: (3,))
def grid_stride_square(X, Y, *, BN: int = 16):
    x = ts.RegVec[X.dtype, BN]()
    for t in ts.range(ts.block_id(0), ts.cdiv(X.shape[0], BN), ts.num_blocks(0)):
        ts.load(x, X, at=(t,))
        ts.mul(x, x, x)
        ts.store(Y, x, at=(t,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N", [100, 48, 5, 0])
@pytest.mark.parametrize("dt", [torch.float32, F64])
def test_grid_stride_loop_over_num_blocks(backend, N, dt, rng):
    x = with_extremes(randn(rng, N, dtype=dt) * 1e160)
    y = poisoned(N, dtype=dt)
    launch(grid_stride_square, backend, x, y)
    close(y, (x.double() * x.double()).to(dt))


# ---- 16. comparisons of mixed dtypes: an i32 tile against a float, an f16 tile against an i64 vector ---------------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def mixed_compares(X, H, T, Y, *, BM: int = 8, BN: int = 16):
    """Y = (X > 2.5) + 2 * (H[r, c] <= T[c]) + 4 * (X == H) as i32; X i32, H f16, T i64."""
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[ts.i32, BM, BN]()
    h = ts.RegTile[ts.f16, BM, BN]()
    t = ts.RegVec[ts.i64, BN]()
    m = ts.RegTile[ts.bool_, BM, BN]()
    y = ts.RegTile[ts.i32, BM, BN]()
    bit = ts.RegTile[ts.i32, BM, BN]()
    ts.load(x, X, at=(i, j))
    ts.load(h, H, at=(i, j))
    ts.load(t, T, at=(j,))
    ts.gt(m, x, 2.5)                                 # i32 against a float: 3 > 2.5, 2 is not
    ts.where(y, m, 1, 0)
    ts.le(m, h, ts.per_col(t))                       # f16 against an i64 vector (values past f16's 2048 exactly)
    ts.where(bit, m, 2, 0)
    ts.add(y, y, bit)
    ts.eq(m, x, h)                                   # i32 against f16, elementwise
    ts.where(bit, m, 4, 0)
    ts.add(y, y, bit)
    ts.store(Y, y, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N"), [(8, 16), (11, 21), (0, 2)])
def test_comparisons_of_mixed_dtypes(backend, M, N, rng):
    x = ints(rng, -4, 6, (M, N), I32)
    h = ints(rng, -4, 6, (M, N), F16)
    t = ints(rng, -4, 6, (N,), I64)
    if M > 2 and N > 1:
        h[0, 0], h[1, 0], h[2, 0], t[0] = math.nan, math.inf, 2049, 2**40   # NaN compares false; 2049 is 2048 in f16
        h[0, 1], t[1] = 2048, 2047
    y = torch.full((M, N), -5, dtype=I32)
    launch(mixed_compares, backend, x, h, t, y)
    hd, xd, td = h.double(), x.double(), t.double()
    want = (xd > 2.5).int() + 2 * (hd <= td).int() + 4 * (xd == hd).int()
    assert torch.equal(y, want)


# ---- 17. misuse: refused with a message naming the argument, before anything is written -----------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_none_tensor_is_named(backend):
    y = poisoned(16, 16)
    with pytest.raises(LaunchError, match=r"bias_act: argument Bias must be a torch.Tensor .*got NoneType"):
        launch(bias_act, backend, torch.zeros(16, 16), None, y)
    assert torch.equal(y, poisoned(16, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_constant_outside_its_tunable_domain_is_named(backend):
    y = poisoned(16, 16)
    with pytest.raises(TunableError, match=r"bias_act: tunable BM=32 is outside its domain \(8, 16\)"):
        launch(bias_act, backend, torch.zeros(16, 16), torch.zeros(16), y, BM=32)
    with pytest.raises(LaunchError, match=r"bias_act: unknown constant\(s\) \['HAS_BAIS'\]"):
        launch(bias_act, backend, torch.zeros(16, 16), torch.zeros(16), y, HAS_BAIS=True)
    assert torch.equal(y, poisoned(16, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float_for_an_int_argument_is_named(backend):
    y = poisoned(8, 32)
    with pytest.raises(LaunchError, match=r"scale_first_rows: argument rows is a runtime int; got float 3.0"):
        launch(scale_first_rows, backend, torch.zeros(8, 32), y, 3.0, 1.0)
    assert torch.equal(y, poisoned(8, 32))


# ---- 18. the kernels above compiled for Hopper (sm_90a) on this CPU, by Triton and (where it lowers them) Gluon ------
AOT_CASES = {   # name -> (kernel, meta args, constants)
    "softplus2": (softplus2, (meta(4096, dtype=F64), meta(4096, dtype=F64)), dict(BN=256)),
    "clamp_rows_cols": (clamp_rows_cols, (meta(1024, 1024), meta(1024, dtype=BF), meta(1024, dtype=BF),
                                          meta(1024, dtype=BF), meta(1024, 1024)), dict(BM=64, BN=64)),
    "causal_softmax": (causal_softmax, (meta(2048, 2048), meta(2048, 2048)), dict(BM=64, BN=64)),
    "nan_to_num": (nan_to_num, (meta(1024, 1024, dtype=F64), meta(1024, 1024, dtype=F64), 1e300, -1e300),
                   dict(BM=32, BN=64)),
    "col_stats": (col_stats, (meta(4096, 1024), meta(1024), meta(1024), meta(1024)), dict(BM=64, BN=64)),
    "max_group_sum": (max_group_sum, (meta(4096, 1024), meta(1024)), dict(G=4, BM=32, BN=64)),
    "transpose_widen": (transpose_widen, (meta(1024, 1024, dtype=I8), meta(1024, 1024, dtype=I64)),
                        dict(BM=64, BN=64)),
    "row_report": (row_report, (meta(1024, 1024), meta(1024, dtype=F64), meta(1024, dtype=F16),
                                meta(1024, dtype=I32), meta(1024, dtype=I8)), dict(BM=32, BN=128)),
    "bias_act": (bias_act, (meta(1024, 1024), meta(1024), meta(1024, 1024)), dict(ACT="sigmoid", HAS_BIAS=True)),
    "scale_first_rows": (scale_first_rows, (meta(1024, 64), meta(1024, 64), 1000, 0.5), dict(BM=32, BN=64)),
    "store_if_enabled": (store_if_enabled, (meta(1024, 64), meta(1024, 64), 1), dict(BM=32, BN=64)),
    "grid_stride_square": (grid_stride_square, (meta(1 << 20), meta(1 << 20)), dict(BN=1024)),
    "mixed_compares": (mixed_compares, (meta(1024, 1024, dtype=I32), meta(1024, 1024, dtype=F16),
                                        meta(1024, dtype=I64), meta(1024, 1024, dtype=I32)), dict(BM=32, BN=64)),
    "gemm_at_bt": (gemm_at_bt, (meta(512, 256, dtype=F16), meta(256, 512, dtype=F16), meta(256, 256, dtype=BF)),
                   dict(BM=128, BN=64, BK=32)),
}
TRITON_ONLY = {   # Gluon lowers no rand; (rotate_row is left out: sin / cos of large arguments keep a stack frame)
    "dropout": (dropout, (meta(1024, 1024), meta(1024, 1024), 7, 2**33, 0.1), dict(BM=64, BN=64)),
}


@pytest.mark.parametrize("name", [*AOT_CASES, *TRITON_ONLY])
def test_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*{**AOT_CASES, **TRITON_ONLY}[name])


@pytest.mark.parametrize("name", AOT_CASES)
def test_compiles_for_sm90a_with_gluon(name):
    compile_gluon_sm90a(*AOT_CASES[name])
