"""More of round 23's held-out kernels (test_heldout_round23.py has the first): a 3x3 median filter over a batch of
images with replicate (clamped) edges, its halo read as the eight neighbouring tiles and moved into place by 0/1 shift
matrices through the tensor cores (exact: one nonzero term per output), the edge rows and columns clamped by masks
and the median of nine taken by a 19-exchange min/max network (ties, +-3e38, ragged tiles, images of one pixel); and
farthest point sampling (pytorch3d's sample_farthest_points without a random start: a run-time loop carrying the
min-distance tile and the chosen index, ties to the first index, ragged lengths by a LEN tensor, a length of 0 and
more samples than points giving -1).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, I32, I64, launch, randn

import tilestack.lang as ts

F32 = torch.float32


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20262302)


def poisoned(*shape, dtype=F32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. a 3x3 median filter with clamped edges ----------------------------------------------------------------------
def _shift_matrix(dst, off: int, B: int) -> None:
    """dst[p, q] = 1 where p - q == off, else 0: x @ dst moves column q + off of x to q (dst^T @ x: rows)."""
    p, q = ts.RegVec[ts.i32, B](), ts.RegVec[ts.i32, B]()
    hit = ts.RegTile[ts.bool_, B, B]()
    ts.arange(p)
    ts.arange(q, off)
    ts.eq(hit, ts.per_row(p), ts.per_col(q))
    ts.where(dst, hit, 1.0, 0.0)


# Devillard's median-of-nine network: after these exchanges (min into the first) element 4 is the median.
MEDIAN9 = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8), (4, 7), (3, 6),
           (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))


@ts.kernel(grid=lambda X, BH, BW: (X.shape[0], ts.cdiv(X.shape[1], BH), ts.cdiv(X.shape[2], BW)))
def median3x3(X, Y, *, BH: int = 16, BW: int = 16):
    """Y (N, H, W) = the median of each pixel's 3x3 neighbourhood in X (N, H, W), edges replicated. The neighbour
    (r + d, c) of tile i is row r + d of tile i, or of tile i + d across the edge: S(d)^T x_i + S(d - d BH)^T x_(i+d);
    columns likewise from the right. Every product has one nonzero term, so the moved values are X's, exactly, and
    stay in X's dtype."""
    n, i, j = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    H, W = X.shape[1], X.shape[2]
    sr = {(d, s): ts.SharedTile[X.dtype, BH, BH]() for d in (-1, 1) for s in (0, d)}   # row shifts
    sc = {(d, s): ts.SharedTile[X.dtype, BW, BW]() for d in (-1, 1) for s in (0, d)}   # column shifts
    mr, mc = ts.RegTile[ts.f32, BH, BH](), ts.RegTile[ts.f32, BW, BW]()
    for d, s in sr:
        _shift_matrix(mr, d - s * BH, BH)
        ts.copy(sr[d, s], mr)
        _shift_matrix(mc, d - s * BW, BW)
        ts.copy(sc[d, s], mc)
    rows, cols = ts.RegVec[ts.i32, BH](), ts.RegVec[ts.i32, BW]()
    ts.arange(rows, i * BH)
    ts.arange(cols, j * BW)
    edge = {"top": ts.RegVec[ts.bool_, BH](), "bottom": ts.RegVec[ts.bool_, BH](),
            "left": ts.RegVec[ts.bool_, BW](), "right": ts.RegVec[ts.bool_, BW]()}
    ts.eq(edge["top"], rows, 0)
    ts.eq(edge["bottom"], rows, H - 1)
    ts.eq(edge["left"], cols, 0)
    ts.eq(edge["right"], cols, W - 1)
    x = {di: ts.SharedTile[X.dtype, BH, BW]() for di in (-1, 0, 1)}
    v = {(dj, di): ts.SharedTile[X.dtype, BH, BW]() for dj in (-1, 0, 1) for di in (-1, 0, 1)}  # rows moved
    c, acc = ts.RegTile[ts.f32, BH, BW](), ts.RegTile[ts.f32, BH, BW]()
    for dj in (-1, 0, 1):
        for di in (-1, 0, 1):
            ts.load(x[di], X, at=(n, i + di, j + dj))            # past an edge: zeros, replaced by the clamp
        ts.load(c, x[0])
        ts.copy(v[dj, 0], x[0])
        for d in (-1, 1):
            ts.zero(acc)
            ts.mma_AtB(acc, sr[d, 0], x[0], acc)
            ts.mma_AtB(acc, sr[d, d], x[d], acc)
            ts.where(acc, ts.per_row(edge["top" if d < 0 else "bottom"]), c, acc)
            ts.copy(v[dj, d], acc)
    p = [ts.RegTile[ts.f32, BH, BW]() for _ in range(9)]
    for di in (-1, 0, 1):
        centre = p[3 * (di + 1) + 1]
        ts.load(centre, v[0, di])
        for d in (-1, 1):
            out = p[3 * (di + 1) + 1 + d]
            ts.zero(out)
            ts.mma_AB(out, v[0, di], sc[d, 0], out)
            ts.mma_AB(out, v[d, di], sc[d, d], out)
            ts.where(out, ts.per_col(edge["left" if d < 0 else "right"]), centre, out)
    for a, b in MEDIAN9:
        ts.min(acc, p[a], p[b])
        ts.max(p[b], p[a], p[b])
        ts.copy(p[a], acc)
    y = ts.RegTile[Y.dtype, BH, BW]()
    ts.copy(y, p[4])
    ts.store(Y, y, at=(n, i, j))


def median_ref(x):
    xp = F.pad(x.double()[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]          # (N, H + 2, W + 2)
    win = xp.unfold(1, 3, 1).unfold(2, 3, 1)                                          # (N, H, W, 3, 3)
    return win.reshape(*win.shape[:3], 9).median(-1).values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF])
@pytest.mark.parametrize(("N", "H", "W"), [(2, 19, 37), (1, 16, 16), (1, 1, 1), (3, 2, 17), (1, 33, 1)])
def test_median3x3_replicate(backend, dtype, N, H, W, rng):
    """Small integers (ties everywhere), a salt-and-pepper pixel of +-3e38 (f32) / +-6e4 (f16) / +-1e38 (bf16)
    removed by the filter, ragged tiles of 16; exact."""
    x = torch.from_numpy(rng.integers(-3, 4, (N, H, W))).to(F32)
    big = {F32: 3e38, F16: 6e4, BF: 1e38}[dtype]
    x[0, H // 2, W // 2] = big
    x[-1, 0, -1] = -big
    x = x.to(dtype)
    y = poisoned(N, H, W, dtype=dtype)
    launch(median3x3, backend, x, y, BH=16, BW=8)
    assert torch.equal(y.double(), median_ref(x)), (y, median_ref(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_median3x3_of_gaussian_noise(backend, rng):
    x = randn(rng, 2, 23, 29)
    y = poisoned(2, 23, 29)
    launch(median3x3, backend, x, y)
    assert torch.equal(y.double(), median_ref(x))


# ---- 2. farthest point sampling ------------------------------------------------------------------------------------
BIG_INDEX = 2**30


@ts.kernel(grid=lambda P: (P.shape[0],))
def farthest_points(P, LEN, IDX, *, BN: int = 64):
    """IDX[b, s] (B, S) = the s-th of S farthest-point samples of the first LEN[b] points of P[b] (B, N, 3), N <= BN,
    from point 0: each next point the one whose squared distance to the chosen set is largest (the first on ties);
    -1 past LEN[b]."""
    b = ts.block_id(0)
    n = ts.load_scalar(LEN, b)
    p = ts.RegTile[ts.f32, BN, 4]()
    ts.load(p, P, at=(b, 0, 0))                       # (BN, 4): x, y, z, 0; rows past N zero
    iv = ts.RegVec[ts.i32, BN]()
    ts.arange(iv)
    idx = ts.RegTile[ts.i32, BN, 1]()
    ts.zero(idx)
    ts.add(idx, idx, ts.per_row(iv))
    valid = ts.RegTile[ts.bool_, BN, 1]()
    ts.lt(valid, idx, n)
    dist = ts.RegTile[ts.f32, BN, 1]()
    ts.pos_infty(dist)
    k = ts.RegVec[ts.i32, 1]()                        # the chosen point
    ts.zero(k)
    sel, hit = ts.RegTile[ts.bool_, BN, 1](), ts.RegTile[ts.bool_, BN, 1]()
    w, d1 = ts.RegTile[ts.f32, BN, 1](), ts.RegTile[ts.f32, BN, 1]()
    wv, dv = ts.RegVec[ts.f32, BN](), ts.RegVec[ts.f32, BN]()
    t4 = ts.RegTile[ts.f32, BN, 4]()
    xyz = ts.RegVec[ts.f32, 4]()
    cand = ts.RegTile[ts.i32, BN, 1]()
    best = ts.RegVec[ts.f32, 1]()
    sv, ok = ts.RegVec[ts.i32, 1](), ts.RegVec[ts.bool_, 1]()
    out = ts.RegVec[ts.i32, 1]()
    for s in ts.range(IDX.shape[1]):
        ts.fill(sv, s)
        ts.lt(ok, sv, n)
        ts.where(out, ok, k, -1)
        ts.store(IDX, out, at=(b, s))
        ts.eq(sel, idx, ts.per_col(k))
        ts.where(w, sel, 1.0, 0.0)
        ts.row_sum(wv, w)                             # (BN,) 1 at the chosen point
        ts.mul(t4, p, ts.per_row(wv))
        ts.col_sum(xyz, t4)                           # (4,) its coordinates
        ts.sub(t4, p, ts.per_col(xyz))
        ts.mul(t4, t4, t4)
        ts.row_sum(dv, t4)                            # (BN,) squared distances to it
        ts.zero(d1)
        ts.add(d1, d1, ts.per_row(dv))
        ts.min(dist, dist, d1)
        ts.where(dist, valid, dist, -1.0)             # past LEN: never chosen
        ts.col_max(best, dist)
        ts.eq(hit, dist, ts.per_col(best))
        ts.where(cand, hit, idx, BIG_INDEX)
        ts.col_min(k, cand)                           # the first farthest


def fps_ref(p, lens, S):
    out = torch.full((p.shape[0], S), -1, dtype=torch.int64)
    for b in range(p.shape[0]):
        n = int(lens[b])
        if n == 0:
            continue
        pts = p[b, :n].double()
        dist = torch.full((n,), math.inf, dtype=torch.float64)
        k = 0
        for s in range(min(S, n)):
            out[b, s] = k
            dist = torch.minimum(dist, ((pts - pts[k]) ** 2).sum(1))
            k = int(torch.argmax(dist))               # the first maximum
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ldtype", [I32, I64])
@pytest.mark.parametrize("odtype", [I32, I64])
def test_farthest_point_sampling(backend, ldtype, odtype, rng):
    """Integer coordinates (squared distances exact in f32; ties everywhere: a grid of points and a duplicate of
    point 0), lengths 50, 7, 1 and 0 of N = 50, S = 9 samples (more than 7 and 1: the rest -1)."""
    B, N, S = 4, 50, 9
    p = torch.from_numpy(rng.integers(-20, 21, (B, N, 3))).to(F32)
    p[1, :7] = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [-1, 0, 0], [0, -1, 0]],
                            dtype=F32)
    p[0, 5] = p[0, 0]
    lens = torch.tensor([50, 7, 1, 0], dtype=ldtype)
    idx = torch.full((B, S), 99, dtype=odtype)
    launch(farthest_points, backend, p, lens, idx, BN=64)
    assert torch.equal(idx.long(), fps_ref(p, lens, S)), (idx, fps_ref(p, lens, S))


@pytest.mark.parametrize("backend", BACKENDS)
def test_farthest_point_sampling_of_no_samples_and_no_batch(backend, rng):
    p = randn(rng, 2, 10, 3)
    idx = torch.empty(2, 0, dtype=I32)
    launch(farthest_points, backend, p, torch.tensor([10, 3]), idx, BN=16)
    launch(farthest_points, backend, torch.empty(0, 10, 3), torch.empty(0, dtype=I64), torch.empty(0, 4, dtype=I32),
           BN=16)
