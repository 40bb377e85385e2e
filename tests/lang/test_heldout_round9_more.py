"""Round 9 of held-out kernels, continued (see test_heldout_round9.py's docstring): 2-D max pooling with torch's
indices through one overlapping 5-D window view (NaN and -inf windows, dilation); an embedding bag (sum or mean, per
sample weights, a padding index, empty bags) gathered by one-hot products against bag-membership masks built from
the offsets; dropout + residual + LayerNorm fused over rows wider than a tile (Philox by element counters, p = 0 and
p = 1, the new residual written out); a prefix sum across blocks in three launches (block totals, their exclusive
scan by one program, the blocks rescanned with their offsets), in i32 (wrapping), i64 and f32; 2:4 structured
sparsity (the two largest magnitudes of each group of four, NaN as the largest, ties to the lower index) written as
a dense pruned copy, a torch.bool mask and the compressed values with their positions; MX-style fp8 (e4m3) quantization
with one power-of-two scale per 32 elements; and a MoE grouped GEMM whose rows pick their expert from an offsets
vector.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, I8, I32, I64, close, launch, randn, wrap

import tilestack.lang as ts

FLOAT_DTYPES = [torch.float32, F16, BF]
F8 = torch.float8_e4m3fn


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. 2-D max pooling with torch's flat indices, through one overlapping (NC, KH, KW, OH, OW) window view ----------
@ts.kernel(grid=lambda XW, BH, BW: (ts.cdiv(XW.shape[3], BH), ts.cdiv(XW.shape[4], BW), XW.shape[0]))
def max_pool2d(XW, Y, IDX, width: int, *, K: int = 2, S: int = 2, DIL: int = 1, BH: int = 8, BW: int = 16):
    """Y[c, oh, ow] = max over the K x K window XW[c, :, :, oh, ow] (XW[c, a, b, oh, ow] = X[c, oh S + a DIL,
    ow S + b DIL]); IDX (i64) its position (oh S + a DIL) width + ow S + b DIL in X's plane, the first maximum in
    row-major order; a NaN wins (the first NaN), an all -inf window gives its first element."""
    i, j, c = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    best = ts.RegTile[ts.f32, BH, BW]()
    v = ts.RegTile[ts.f32, BH, BW]()
    take = ts.RegTile[ts.bool_, BH, BW]()
    vnan = ts.RegTile[ts.bool_, BH, BW]()
    bnan = ts.RegTile[ts.bool_, BH, BW]()
    bi = ts.RegTile[ts.i64, BH, BW]()
    base = ts.RegTile[ts.i64, BH, BW]()
    cand = ts.RegTile[ts.i64, BH, BW]()
    oh = ts.RegVec[ts.i64, BH]()
    ow = ts.RegVec[ts.i64, BW]()
    out = ts.RegTile[Y.dtype, BH, BW]()
    ts.arange(oh, i * BH)
    ts.arange(ow, j * BW)
    ts.mul(oh, oh, S * width)
    ts.mul(ow, ow, S)
    ts.zero(base)
    ts.add(base, base, ts.per_row(oh))
    ts.add(base, base, ts.per_col(ow))              # the window's first element, flat in X's plane
    for a in range(K):
        for b in range(K):
            ts.load(v, XW, at=(c, a, b, i, j))
            if a == 0 and b == 0:
                ts.copy(best, v)
                ts.copy(bi, base)
                continue
            ts.gt(take, v, best)
            ts.ne(vnan, v, v)
            ts.ne(bnan, best, best)
            ts.logical_not(bnan, bnan)
            ts.logical_and(vnan, vnan, bnan)
            ts.logical_or(take, take, vnan)
            ts.where(best, take, v, best)
            ts.add(cand, base, a * DIL * width + b * DIL)
            ts.where(bi, take, cand, bi)
    ts.copy(out, best)
    ts.store(Y, out, at=(c, i, j))
    ts.store(IDX, bi, at=(c, i, j))


def windows(x, K, S, DIL):
    """The (NC, K, K, OH, OW) view of x (NC, H, W): element (c, a, b, oh, ow) is x[c, oh S + a DIL, ow S + b DIL]."""
    nc, H, W = x.shape
    oh, ow = (H - DIL * (K - 1) - 1) // S + 1, (W - DIL * (K - 1) - 1) // S + 1
    sc, sh, sw = x.stride()
    return x.as_strided((nc, K, K, max(oh, 0), max(ow, 0)), (sc, DIL * sh, DIL * sw, S * sh, S * sw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("K", "S", "DIL"), [(2, 2, 1), (3, 2, 1), (3, 1, 2)])
@pytest.mark.parametrize(("NC", "H", "W"), [(3, 19, 37), (1, 8, 16), (2, 4, 3), (0, 9, 9)])
def test_max_pool2d_with_indices(backend, dtype, K, S, DIL, NC, H, W, rng):
    """Against F.max_pool2d(return_indices=True) in float64 of the same values: values exactly, indices exactly
    (ties are common in bf16: the first maximum wins on both), NaN windows NaN at an index holding a NaN (torch takes
    the last NaN, this kernel the first), an all -inf plane gives -inf at each window's first element."""
    x = randn(rng, NC, H, W, dtype=dtype).round(decimals=1)          # ties within windows
    if NC > 1 and H > 3 and W > 3:
        x[0, 1, 2] = math.nan
        x[1] = -math.inf
    xw = windows(x, K, S, DIL)
    OH, OW = xw.shape[3:]
    y = poisoned(NC, OH, OW, dtype=dtype, value=7.0)
    idx = torch.full((NC, OH, OW), -5, dtype=I64)
    launch(max_pool2d, backend, xw, y, idx, W, K=K, S=S, DIL=DIL)
    if OH * OW == 0 or NC == 0:
        return
    want, wi = F.max_pool2d(x.double()[:, None], K, S, dilation=DIL, return_indices=True)
    want, wi = want[:, 0], wi[:, 0]
    nan = want.isnan()
    assert torch.equal(y[~nan].double(), want[~nan])
    assert torch.equal(idx[~nan], wi[~nan])
    assert y[nan].isnan().all()
    assert x.reshape(NC, -1).gather(1, idx.reshape(NC, -1))[nan.reshape(NC, -1)].isnan().all()


# ---- 2. an embedding bag: rows gathered by one-hot products, summed into bags by membership masks from the offsets --
@ts.kernel(grid=lambda OUT, BB, BD: (ts.cdiv(OUT.shape[0], BB), ts.cdiv(OUT.shape[1], BD)))
def embedding_bag(IDX, STARTS, ENDS, PSW, WEIGHT, OUT, pad: int, *, MEAN: bool = False, BB: int = 16, BL: int = 16,
                  BV: int = 16, BD: int = 16):
    """OUT[b] = sum (MEAN: mean) of PSW[l] WEIGHT[IDX[l]] over l in [STARTS[b], ENDS[b]) with IDX[l] != pad (the
    mean over those too; an empty bag is 0). IDX (L,) i64, STARTS / ENDS (B,) i64 (views of the offsets), PSW (L,)
    f32, WEIGHT (V, D). An index outside [0, V) gathers zeros."""
    i, j = ts.block_id(0), ts.block_id(1)
    nl, nv = IDX.shape[0], WEIGHT.shape[0]
    st = ts.RegVec[ts.i64, BB]()
    en = ts.RegVec[ts.i64, BB]()
    idx = ts.RegVec[ts.i64, BL]()
    lpos = ts.RegVec[ts.i64, BL]()
    vpos = ts.RegVec[ts.i64, BV]()
    psw = ts.RegVec[ts.f32, BL]()
    real = ts.RegVec[ts.bool_, BL]()
    mem = ts.RegTile[ts.bool_, BB, BL]()
    t = ts.RegTile[ts.bool_, BB, BL]()
    memf = ts.RegTile[ts.f32, BB, BL]()
    hot = ts.RegTile[ts.bool_, BL, BV]()
    hotf = ts.RegTile[WEIGHT.dtype, BL, BV]()
    w = ts.RegTile[WEIGHT.dtype, BV, BD]()
    g = ts.RegTile[ts.f32, BL, BD]()
    acc = ts.RegTile[ts.f32, BB, BD]()
    cnt = ts.RegVec[ts.f32, BB]()
    out = ts.RegTile[OUT.dtype, BB, BD]()
    ts.load(st, STARTS, at=(i,))
    ts.load(en, ENDS, at=(i,))
    ts.zero(acc)
    ts.zero(cnt)
    for lt in ts.range(ts.cdiv(nl, BL)):
        ts.load(idx, IDX, at=(lt,))
        ts.load(psw, PSW, at=(lt,))
        ts.arange(lpos, lt * BL)
        ts.ne(real, idx, pad)
        ts.ge(mem, ts.per_col(lpos), ts.per_row(st))
        ts.lt(t, ts.per_col(lpos), ts.per_row(en))
        ts.logical_and(mem, mem, t)
        ts.logical_and(mem, mem, ts.per_col(real))   # (lpos past L: no bag reaches it)
        ts.where(memf, mem, 1.0, 0.0)
        ts.row_sum(cnt, memf, cnt)
        ts.mul(memf, memf, ts.per_col(psw))
        ts.zero(g)
        for vt in ts.range(ts.cdiv(nv, BV)):
            ts.arange(vpos, vt * BV)
            ts.eq(hot, ts.per_row(idx), ts.per_col(vpos))
            ts.where(hotf, hot, 1.0, 0.0)
            ts.load(w, WEIGHT, at=(vt, j))
            ts.mma_AB(g, hotf, w, g)                  # the rows IDX[l], exact (one product per element)
        ts.mma_AB(acc, memf, g, acc)
    if MEAN:
        ts.max(cnt, cnt, 1.0)
        ts.div(acc, acc, ts.per_row(cnt))
    ts.copy(out, acc)
    ts.store(OUT, out, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("B", "L", "V", "D"), [(5, 37, 45, 20), (17, 40, 16, 16), (3, 0, 8, 8), (0, 5, 8, 8)])
@pytest.mark.parametrize(("mode", "weighted"), [("sum", False), ("sum", True), ("mean", False)])
def test_embedding_bag(backend, dtype, mode, B, L, V, D, weighted, rng):
    """Random offsets with empty bags (two equal offsets) and the first bag starting at 0 as torch requires; one index
    repeated through a bag; padding_idx 3. Per-sample weights with sum only (as torch takes them)."""
    idx = torch.from_numpy(rng.integers(0, V, L))
    cuts = np.sort(rng.integers(0, L + 1, max(B - 1, 0)))
    offs = torch.from_numpy(np.concatenate([[0], cuts, [L]])).to(I64) if B else torch.zeros(1, dtype=I64)
    if B > 2:
        offs[2] = offs[1]                             # bag 1 empty
    if L > 4:
        idx[:4] = 3
    wt = randn(rng, V, D, dtype=dtype)
    psw = randn(rng, L) if weighted else torch.ones(L)
    out = poisoned(B, D, dtype=dtype)
    launch(embedding_bag, backend, idx, offs[:-1], offs[1:], psw, wt, out, 3, MEAN=mode == "mean")
    want = torch.zeros(B, D, dtype=torch.float64)    # (F.embedding_bag crashes on some empty inputs: by hand)
    for bag in range(B):
        lo, hi = int(offs[bag]), int(offs[bag + 1])
        live = [k for k in range(lo, hi) if idx[k] != 3]
        for k in live:
            want[bag] += psw[k].double() * wt[idx[k]].double()
        if mode == "mean" and live:
            want[bag] /= len(live)
    if B and L and V > 3:                            # torch agrees where it runs
        ref = F.embedding_bag(idx, wt.double(), offs[:-1], mode=mode, padding_idx=3,
                              per_sample_weights=psw.double() if weighted else None)
        torch.testing.assert_close(ref, want)
    close(out, want.to(dtype), scale=4)


# ---- 3. dropout + residual + LayerNorm over rows wider than a tile; the new residual written out -------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def dropout_add_layernorm(X, R, W, B, Y, RES, p: float, seed: int, eps: float, *, BM: int = 8, BN: int = 16):
    """h = R + dropout(X) (element (r, c) dropped where Philox uniform number r N + c under ``seed`` is < p, kept
    ones scaled by 1 / (1 - p)); RES = h (X's dtype); Y = (h - mean) / sqrt(var + eps) W + B over each row (M, N).
    Three passes over the row's column tiles (sum, centered squares, output), the dropout mask regenerated in each
    from its counters; h is computed in f32 and normalized from f32, not from RES's rounding."""
    i = ts.block_id(0)
    n = X.shape[1]
    scale = 1.0 / (1.0 - p)
    x = ts.RegTile[ts.f32, BM, BN]()
    r = ts.RegTile[ts.f32, BM, BN]()
    u = ts.RegTile[ts.f32, BM, BN]()
    keep = ts.RegTile[ts.bool_, BM, BN]()
    inside = ts.RegVec[ts.bool_, BN]()
    cols = ts.RegVec[ts.i32, BN]()
    w = ts.RegVec[ts.f32, BN]()
    bb = ts.RegVec[ts.f32, BN]()
    mean = ts.RegVec[ts.f32, BM]()
    var = ts.RegVec[ts.f32, BM]()
    rstd = ts.RegVec[ts.f32, BM]()
    res = ts.RegTile[RES.dtype, BM, BN]()
    y = ts.RegTile[Y.dtype, BM, BN]()

    def residual(jt):                                # x <- R + dropout(X) for column tile jt
        ts.load(x, X, at=(i, jt))
        ts.load(r, R, at=(i, jt))
        ts.rand(u, seed, 0, row=i * BM, col=jt * BN, stride=n)
        ts.ge(keep, u, p)
        ts.mul(x, x, scale)
        ts.where(x, keep, x, 0.0)
        ts.add(x, x, r)

    ts.zero(mean)
    for jt in ts.range(ts.cdiv(n, BN)):
        residual(jt)
        ts.row_sum(mean, x, mean)
        ts.copy(res, x)
        ts.store(RES, res, at=(i, jt))
    ts.div(mean, mean, n)
    ts.zero(var)
    for jt in ts.range(ts.cdiv(n, BN)):
        residual(jt)
        ts.sub(x, x, ts.per_row(mean))
        ts.arange(cols, jt * BN)
        ts.lt(inside, cols, n)
        ts.where(x, ts.per_col(inside), x, 0.0)      # columns past N are 0 - mean: out of the variance
        ts.mul(x, x, x)
        ts.row_sum(var, x, var)
    ts.div(var, var, n)
    ts.add(var, var, eps)
    ts.rsqrt(rstd, var)
    for jt in ts.range(ts.cdiv(n, BN)):
        residual(jt)
        ts.load(w, W, at=(jt,))
        ts.load(bb, B, at=(jt,))
        ts.sub(x, x, ts.per_row(mean))
        ts.mul(x, x, ts.per_row(rstd))
        ts.mul(x, x, ts.per_col(w))
        ts.add(x, x, ts.per_col(bb))
        ts.copy(y, x)
        ts.store(Y, y, at=(i, jt))


@ts.kernel(grid=lambda U: (1,))
def uniforms(U, seed: int, *, BM: int = 64, BN: int = 64):
    """U (M, N) f32 = the Philox uniforms of counters r N + c under ``seed`` (M, N <= BM, BN): the test's mask."""
    u = ts.RegTile[ts.f32, BM, BN]()
    ts.rand(u, seed, 0, stride=U.shape[1])
    ts.store(U, u, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
@pytest.mark.parametrize(("M", "N"), [(13, 45), (8, 16), (1, 1), (0, 7)])
def test_dropout_add_layernorm(backend, dtype, p, M, N, rng):
    """The mask is the Philox stream (generated by a separate kernel on the reference executor and checked to drop
    about p); p = 0 keeps everything, p = 1 drops everything (1 / (1 - p) is inf: never multiplied into a kept
    element); a row of the residual at 1e4 (mean subtraction must not lose the row's spread)."""
    seed = int(rng.integers(0, 2**31))
    x, r = randn(rng, M, N, dtype=dtype), randn(rng, M, N, dtype=dtype)
    if M > 2:
        r[2] += 1e3 if dtype == F16 else 1e4
    w, b = randn(rng, N), randn(rng, N)
    y, res = poisoned(M, N, dtype=dtype), poisoned(M, N, dtype=dtype)
    launch(dropout_add_layernorm, backend, x, r, w, b, y, res, p, seed, 1e-5)
    u = torch.full((M, N), math.nan)
    launch(uniforms, "reference", u, seed)
    keep = u >= float(np.float32(p))
    if M * N > 300 and 0 < p < 1:
        assert abs(keep.double().mean() - (1 - p)) < 0.08
    h = r.double() + torch.where(keep, x.double() / (1 - p) if p < 1 else 0.0, 0.0)
    close(res, h.to(dtype), scale=4)
    # h as the kernel forms it in f32 (x times the f32 of 1 / (1 - p), plus r): at 1e4 its rounding is 5e-4, as
    # large as f32's whole tolerance once normalized, and no kernel working in f32 can do better
    sc = float(np.float32(1 / (1 - p))) if p < 1 else 0.0
    h32 = (r.float() + torch.where(keep, x.float() * sc, 0.0)).double()
    want = F.layer_norm(h32, (N,), w.double(), b.double(), 1e-5)
    # the f32 sum of a row's N values rounds its mean by ~ |mean| sqrt(N) 2^-24: after the division by the row's
    # std that is each row's floor (0.01 |mean| sqrt(N) / std times f32's atol of 1e-5)
    for k in range(M):
        ratio = float(h32[k].mean().abs() * math.sqrt(N) / (h32[k].std(unbiased=False) + 1e-3))
        close(y[k], want[k].to(dtype), scale=4 * (1 + 0.01 * ratio))


# ---- 4. a prefix sum across blocks in three launches: block totals, their exclusive scan, each block rescanned ------
def _scan_tile(incl, tot, v, tri, t, k, j):
    """incl[j] = sum_{k <= j} v[k] and tot[j] = sum_k v[k] for the (BN,) vector v, through (BN, BN) tiles."""
    ts.arange(k)
    ts.arange(j)
    ts.le(tri, ts.per_row(k), ts.per_col(j))
    ts.where(t, tri, ts.per_row(v), 0)
    ts.col_sum(incl, t)
    ts.zero(t)
    ts.add(t, t, ts.per_row(v))
    ts.col_sum(tot, t)


def _acc(X):
    return ts.f32 if X.dtype.is_float else X.dtype   # floats sum in f32, integers in their own width (wrapping)


@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[1], BN),))
def scan_totals(X, BS, *, BN: int = 16):
    """BS[b] = sum of block b of BN elements of X (1, n) (a row: its sum reduces a tile's row into a (1,) vector)."""
    b = ts.block_id(0)
    x = ts.RegTile[_acc(X), 1, BN]()
    s = ts.RegVec[_acc(X), 1]()
    ts.load(x, X, at=(0, b))                         # X as a (1, n) view
    ts.row_sum(s, x)
    ts.store(BS, s, at=(b,))


@ts.kernel(grid=lambda BS: (1,))
def scan_offsets(BS, *, BN: int = 16):
    """BS = its own exclusive prefix sum, in place, by one program carrying the running total across tiles."""
    acc = _acc(BS)
    v = ts.RegVec[acc, BN]()
    incl = ts.RegVec[acc, BN]()
    tot = ts.RegVec[acc, BN]()
    carry = ts.RegVec[acc, BN]()
    k = ts.RegVec[ts.i32, BN]()
    j = ts.RegVec[ts.i32, BN]()
    tri = ts.RegTile[ts.bool_, BN, BN]()
    t = ts.RegTile[acc, BN, BN]()
    ts.zero(carry)
    for c in ts.range(ts.cdiv(BS.shape[0], BN)):
        ts.load(v, BS, at=(c,))
        _scan_tile(incl, tot, v, tri, t, k, j)
        ts.sub(incl, incl, v)
        ts.add(incl, incl, carry)
        ts.store(BS, incl, at=(c,))
        ts.add(carry, carry, tot)


@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def scan_blocks(X, OFF, Y, *, BN: int = 16):
    """Y = the inclusive prefix sum of X (n,): each block's own scan plus its offset, read from OFF (nb, BN), the
    exclusive block offsets expanded along a stride-0 axis."""
    b = ts.block_id(0)
    acc = _acc(X)
    v = ts.RegVec[acc, BN]()
    incl = ts.RegVec[acc, BN]()
    tot = ts.RegVec[acc, BN]()
    off = ts.RegVec[acc, BN]()
    k = ts.RegVec[ts.i32, BN]()
    j = ts.RegVec[ts.i32, BN]()
    tri = ts.RegTile[ts.bool_, BN, BN]()
    t = ts.RegTile[acc, BN, BN]()
    y = ts.RegVec[Y.dtype, BN]()
    ts.load(v, X, at=(b,))
    ts.load(off, OFF, at=(b, 0))
    _scan_tile(incl, tot, v, tri, t, k, j)
    ts.add(incl, incl, off)
    ts.copy(y, incl)
    ts.store(Y, y, at=(b,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [I32, I64, torch.float32, BF, F16])
@pytest.mark.parametrize("n", [300, 16, 1, 0, 4099])
def test_three_launch_prefix_sum(backend, dtype, n, rng):
    """Integers near the top of their range (the sums wrap as the GPU's, checked against exact sums wrapped); floats
    into an f32 output (the sum's error grows as sqrt(n)). n = 4099: 257 blocks, 17 tiles of the second pass."""
    BN = 16
    if dtype in (I32, I64):
        bits = 32 if dtype == I32 else 64
        x = torch.from_numpy(rng.integers(-2 ** (bits - 2), 2 ** (bits - 2), n, dtype=np.int64)).to(dtype)
        odt = dtype
    else:
        x = randn(rng, n, dtype=dtype)
        odt = torch.float32
    nb = -(-n // BN)
    bs = torch.full((nb,), -7, dtype=odt)
    y = torch.full((n,), -7, dtype=odt)
    launch(scan_totals, backend, x[None, :], bs, BN=BN)
    launch(scan_offsets, backend, bs, BN=BN)
    launch(scan_blocks, backend, x, bs[:, None].expand(nb, BN), y, BN=BN)
    if dtype in (I32, I64):
        want = np.cumsum([int(v) for v in x.tolist()], dtype=object) if n else []
        assert y.tolist() == [wrap(int(v), bits) for v in want]
    else:
        want = x.double().cumsum(0)
        scale = x.double().abs().cumsum(0) + 1
        assert ((y.double() - want).abs() <= 1e-6 * scale * math.sqrt(max(n, 1))).all()


# ---- 5. 2:4 structured sparsity: the two largest magnitudes of each group of four kept -----------------------------
@ts.kernel(grid=lambda XG, BM, BG: (ts.cdiv(XG.shape[1], BM), ts.cdiv(XG.shape[2], BG)))
def prune_2_4(XG, PG, KG, VG, IG, *, BM: int = 16, BG: int = 16):
    """XG (4, M, N/4): the four members of each group of X (M, N) as strided views; PG the pruned copy (the two kept,
    zeros), KG (4, M, N/4) torch.bool the mask, VG (2, M, N/4) the kept values in order (X (M, N/2)'s pairs),
    IG (2, M, N/4) int8 their positions in the group. Magnitude ranks with NaN largest, ties to the lower position."""
    i, j = ts.block_id(0), ts.block_id(1)
    xs = [ts.RegTile[XG.dtype, BM, BG]() for _ in range(4)]
    key = [ts.RegTile[ts.f32, BM, BG]() for _ in range(4)]
    keep = [ts.RegTile[ts.bool_, BM, BG]() for _ in range(4)]
    rank = ts.RegTile[ts.i32, BM, BG]()
    beat = ts.RegTile[ts.bool_, BM, BG]()
    nan = ts.RegTile[ts.bool_, BM, BG]()
    zero = ts.RegTile[XG.dtype, BM, BG]()
    val = ts.RegTile[XG.dtype, BM, BG]()
    pos = ts.RegTile[ts.i8, BM, BG]()
    ts.zero(zero)
    for k in range(4):
        ts.load(xs[k], XG, at=(k, i, j))
        ts.abs(key[k], xs[k])
        ts.ne(nan, key[k], key[k])
        ts.where(key[k], nan, math.inf, key[k])
    for k in range(4):
        ts.zero(rank)
        for m in range(4):
            if m == k:
                continue
            if m < k:
                ts.ge(beat, key[m], key[k])          # a tie goes to the lower position
            else:
                ts.gt(beat, key[m], key[k])
            ts.where(rank, beat, rank + 1, rank)
        ts.lt(keep[k], rank, 2)
        ts.store(KG, keep[k], at=(k, i, j))          # a mask into a torch.bool tensor
        ts.where(val, keep[k], xs[k], zero)
        ts.store(PG, val, at=(k, i, j))
    for slot, order in ((0, (3, 2, 1, 0)), (1, (0, 1, 2, 3))):   # the lowest kept, then the highest kept
        ts.zero(val)
        ts.zero(pos)
        for k in order:
            ts.where(val, keep[k], xs[k], val)
            ts.where(pos, keep[k], k, pos)
        ts.store(VG, val, at=(slot, i, j))
        ts.store(IG, pos, at=(slot, i, j))


def groups_view(t, g):
    """(g, M, N/g) strided view of t (M, N): member k of each group of g along the last axis."""
    M, N = t.shape
    return t.as_strided((g, M, N // g), (t.stride(1), t.stride(0), g * t.stride(1)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("M", "N"), [(21, 84), (16, 64), (1, 4), (3, 0), (0, 8)])
def test_prune_2_4(backend, dtype, M, N, rng):
    """Against a stable descending sort of each group's magnitudes (NaN as +inf): NaNs, infinities, ties (rounded
    values; a group of four equal magnitudes with mixed signs, a group of zeros and -0.0)."""
    x = randn(rng, M, N, dtype=dtype).round(decimals=1)
    if M > 2 and N >= 8:
        x[0, :4] = torch.tensor([0.5, -0.5, 0.5, -0.5])
        x[1, :4] = torch.tensor([0.0, -0.0, 0.0, 0.0])
        x[2, :4] = torch.tensor([1.0, math.nan, -math.inf, math.nan])
        x[2, 4:8] = torch.tensor([math.inf, 2.0, -math.inf, 1e4])
    pruned = poisoned(M, N, dtype=dtype, value=9.0)
    mask = torch.zeros(M, N, dtype=torch.bool)
    mask.fill_(True)
    vals = poisoned(M, N // 2, dtype=dtype, value=9.0)
    pos = torch.full((M, N // 2), -1, dtype=I8)
    launch(prune_2_4, backend, groups_view(x, 4), groups_view(pruned, 4), groups_view(mask, 4), groups_view(vals, 2),
           groups_view(pos, 2))
    key = torch.where(x.isnan(), math.inf, x.double().abs()).reshape(M, N // 4, 4)
    top = key.sort(dim=-1, descending=True, stable=True).indices[..., :2].sort(dim=-1).values   # (M, N/4, 2)
    want_mask = torch.zeros(M, N // 4, 4, dtype=torch.bool).scatter_(-1, top, True).reshape(M, N)
    assert torch.equal(mask, want_mask)
    assert torch.equal(pruned.double().nan_to_num(nan=123.0),
                       torch.where(want_mask, x.double(), 0.0).nan_to_num(nan=123.0))
    assert torch.equal(pos, top.reshape(M, N // 2).to(I8))
    want_vals = x.reshape(M, N // 4, 4).gather(-1, top).reshape(M, N // 2)
    assert torch.equal(vals.double().nan_to_num(nan=123.0), want_vals.double().nan_to_num(nan=123.0))


# ---- 6. MX-style fp8 quantization: one power-of-two scale per 32 elements of a row, e4m3 elements -----------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], 32)))
def mx_quantize(X, Q, ET, *, BM: int = 16):
    """For each block of 32 elements along a row of X (M, K): e = floor(log2(amax)) - 8 (e4m3's largest exponent),
    -127 for a block of zeros (E8M0's least), at least -127; Q = e4m3(x / 2^e) (rounded to nearest even,
    saturating at 448); ET (K/32, M) i32 (a transposed view of (M, K/32)) holds e. floor(log2) from log2 is
    corrected by exp2 both ways, so an amax just below a power of two (log2 rounds up to it) is not taken as it."""
    i, kb = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[ts.f32, BM, 32]()
    ax = ts.RegTile[ts.f32, BM, 32]()
    q = ts.RegTile[ts.f8e4m3, BM, 32]()
    amax = ts.RegVec[ts.f32, BM]()
    lg = ts.RegVec[ts.f32, BM]()
    back = ts.RegVec[ts.f32, BM]()
    p2 = ts.RegVec[ts.f32, BM]()
    e = ts.RegVec[ts.i32, BM]()
    fix = ts.RegVec[ts.bool_, BM]()
    ts.load(x, X, at=(i, kb))
    ts.abs(ax, x)
    ts.row_max(amax, ax)
    ts.log2(lg, amax)
    ts.copy(e, lg)                                   # truncated toward zero: floor for lg >= 0
    ts.copy(back, e)
    ts.gt(fix, back, lg)
    ts.where(e, fix, e - 1, e)                       # floor for negative lg
    for _ in range(2):                               # log2's rounding: 2^e <= amax < 2^(e+1) exactly
        ts.copy(back, e)
        ts.exp2(p2, back)
        ts.gt(fix, p2, amax)
        ts.where(e, fix, e - 1, e)
        ts.mul(p2, p2, 2.0)
        ts.le(fix, p2, amax)
        ts.where(e, fix, e + 1, e)
    ts.sub(e, e, 8)
    ts.eq(fix, amax, 0.0)
    ts.where(e, fix, -127, e)
    ts.max(e, e, -127)
    ts.copy(back, e)
    ts.neg(back, back)
    ts.exp2(back, back)
    ts.mul(x, x, ts.per_row(back))                   # exact: a power of two
    ts.copy(q, x)
    ts.store(Q, q, at=(i, kb))
    ts.store(ET, e, at=(kb, i))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("M", "K"), [(21, 100), (16, 64), (1, 5), (0, 32), (3, 0)])
def test_mx_fp8_quantize(backend, dtype, M, K, rng):
    """Bit-exact against frexp and torch's e4m3 conversion: blocks of zeros, of tiny (subnormal in bf16 / f16) and
    huge values, an amax exactly a power of two and one just below it (the largest value under 2^k in the dtype),
    -0.0, and block magnitudes from 1e-3 to 1e3."""
    x = randn(rng, M, K, dtype=torch.float64) * torch.from_numpy(10.0 ** rng.uniform(-3, 3, (M, 1)))
    x = x.to(dtype)
    if M > 2 and K >= 64:
        x[0, :32] = 0.0
        x[0, 32:64] = -0.0
        x[1, :32] = 4.0 * torch.sign(x[1, :32].float())
        x[1, 32:64] /= 2 * x[1, 32:64].abs().max()
        x[1, 33] = torch.nextafter(torch.tensor(1.0, dtype=dtype), torch.tensor(0.0, dtype=dtype))
        x[2, :32] = torch.finfo(dtype).tiny / 4 if dtype != torch.float32 else 1e-40
        x[2, 32:64] *= 1e3 if dtype != F16 else 20   # (finite blocks: E8M0's NaN scale is not modelled)
    nb = -(-K // 32)
    q = torch.full((M, K), 99.0).to(F8)
    e = torch.full((M, nb), -999, dtype=I32)
    launch(mx_quantize, backend, x, q, e.T)
    xd = x.double()
    pad = torch.nn.functional.pad(xd, (0, nb * 32 - K)).reshape(M, nb, 32)
    amax = pad.abs().amax(-1)
    want_e = (torch.frexp(amax).exponent - 1 - 8).clamp(min=-127)
    want_e[amax == 0] = -127
    assert torch.equal(e, want_e.to(I32))
    scaled = xd / torch.pow(2.0, want_e.double()).repeat_interleave(32, 1)[:, :K]
    want_q = scaled.clamp(-448, 448).to(F8)
    assert torch.equal(q.view(I8), want_q.view(I8))


# ---- 7. a MoE grouped GEMM: rows sorted by expert, each row's expert found from the offsets vector ------------------
@ts.kernel(grid=lambda X, W, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(W.shape[2], BN)))
def moe_gemm(X, W, ENDS, Y, *, BM: int = 16, BN: int = 16, BK: int = 16, EB: int = 16):
    """Y[t] = X[t] @ W[e] for the rows t in expert e's range [ENDS[e - 1], ENDS[e]) (ENDS (E,) i32, cumulative, its
    last the number of rows; E <= EB). X (T, K), W (E, K, N). Each row's expert is the number of ends at or below
    it; each expert's product takes only its rows (the others masked to 0 in the A tile)."""
    i, j = ts.block_id(0), ts.block_id(1)
    ne = W.shape[0]
    rows = ts.RegVec[ts.i32, BM]()
    ends = ts.RegVec[ts.i32, EB]()
    eidx = ts.RegVec[ts.i32, EB]()
    real = ts.RegVec[ts.bool_, EB]()
    past = ts.RegTile[ts.bool_, BM, EB]()
    cnt = ts.RegTile[ts.i32, BM, EB]()
    eid = ts.RegVec[ts.i32, BM]()
    mine = ts.RegVec[ts.bool_, BM]()
    a = ts.RegTile[X.dtype, BM, BK]()
    a_s = ts.SharedTile[X.dtype, BM, BK]()
    w = ts.SharedTile[W.dtype, BK, BN]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    out = ts.RegTile[Y.dtype, BM, BN]()
    ts.arange(rows, i * BM)
    ts.load(ends, ENDS, at=(0,))
    ts.arange(eidx)
    ts.lt(real, eidx, ne)
    ts.le(past, ts.per_col(ends), ts.per_row(rows))
    ts.logical_and(past, past, ts.per_col(real))
    ts.copy(cnt, past)
    ts.row_sum(eid, cnt)
    ts.zero(acc)
    for e in ts.range(ne):
        ts.eq(mine, eid, e)
        for kb in ts.range(ts.cdiv(X.shape[1], BK)):
            ts.load(a, X, at=(i, kb))
            ts.where(a, ts.per_row(mine), a, 0.0)
            ts.copy(a_s, a)                          # operands in shared memory (Gluon's wgmma reads them there)
            ts.load(w, W, at=(e, kb, j))
            ts.mma_AB(acc, a_s, w, acc)
    ts.copy(out, acc)
    ts.store(Y, out, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("T", "E", "K", "N"), [(45, 5, 40, 20), (16, 1, 16, 16), (7, 16, 8, 5), (0, 3, 16, 16),
                                               (9, 2, 0, 8)])
def test_moe_grouped_gemm(backend, dtype, T, E, K, N, rng):
    """Random group sizes with empty experts (the first, a middle one, the last) and a group crossing row blocks."""
    sizes = rng.multinomial(T, np.ones(E) / E) if E else np.zeros(0, int)
    if E > 3:
        sizes[1] += sizes[0] + sizes[-1]
        sizes[0] = sizes[-1] = 0
    ends = torch.from_numpy(np.cumsum(sizes)).to(I32)
    x = randn(rng, T, K, dtype=dtype)
    w = randn(rng, E, K, N, dtype=dtype)
    y = poisoned(T, N, dtype=dtype)
    launch(moe_gemm, backend, x, w, ends, y)
    want = torch.zeros(T, N, dtype=torch.float64)
    lo = 0
    for e in range(E):
        hi = int(ends[e])
        want[lo:hi] = x[lo:hi].double() @ w[e].double()
        lo = hi
    close(y, want.to(dtype), scale=4)
