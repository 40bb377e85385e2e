"""Round 11 of held-out kernels, continued (see test_heldout_round11.py's docstring): a Walsh-Hadamard transform of
rows (QuaRot's rotation: the +-1 matrix made in the kernel from the parity of popcount(r & c) of the global row and
column, any power-of-two width, several column tiles); sparsemax by bisection on its threshold followed by one exact
solve on the support it finds; Muon's Newton-Schulz orthogonalization of a batch of small matrices (one tile each, a
Frobenius norm by a full reduction, five quintic steps whose products take register tiles as both operands, f32 or
bf16 operands); RetNet's retention in its parallel form (scores times a per-head decay gamma^(n - m) below the
diagonal, no softmax, gamma from a stride-0 view); and a top-k of rows wider than a tile by K passes, each the
largest (value, index) after the last one taken, -inf entries and ties included.
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, I32, close, launch, randn

import tilestack.lang as ts

FLOAT_DTYPES = [torch.float32, F16, BF]


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


def _broadcast_index(dst, v, axis):
    """dst (i32 tile) = v along rows (per_row) or columns (per_col)."""
    ts.zero(dst)
    ts.add(dst, dst, ts.per_row(v) if axis == "row" else ts.per_col(v))


# ---- 1. a Walsh-Hadamard transform of rows: Y = X H_D / sqrt(D), H_D[r, c] = (-1)^popcount(r & c) ---------------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def hadamard_rows(X, Y, *, BM: int = 16, BN: int = 32, BK: int = 32):
    """X, Y (M, D), D a power of two (the Sylvester matrix's order); block (i, j) of Y sums X's column tiles k times
    the (BK, BN) block (k, j) of H, made from the global indices: bit parity by xor-folding r & c."""
    i, j = ts.block_id(0), ts.block_id(1)
    D = X.shape[1]
    x = ts.RegTile[X.dtype, BM, BK]()
    h = ts.SharedTile[X.dtype, BK, BN]()             # (shared: wgmma's b operand on Gluon)
    r = ts.RegTile[ts.i32, BK, BN]()
    c = ts.RegTile[ts.i32, BK, BN]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    out = ts.RegTile[Y.dtype, BM, BN]()
    rows = ts.RegVec[ts.i32, BK]()
    cols = ts.RegVec[ts.i32, BN]()
    ts.arange(cols, j * BN)
    _broadcast_index(c, cols, "col")
    ts.zero(acc)
    for k in ts.range(ts.cdiv(D, BK)):
        ts.arange(rows, k * BK)
        _broadcast_index(r, rows, "row")
        ts.bit_and(r, r, c)
        for s in (16, 8, 4, 2, 1):                    # parity of the set bits: fold the halves together
            r ^= r >> s
        ts.bit_and(r, r, 1)
        ts.mul(r, r, -2)
        ts.add(r, r, 1)                              # +1 or -1
        ts.copy(h, r)
        ts.load(x, X, at=(i, k))
        ts.mma_AB(acc, x, h, acc)
    ts.mul(acc, acc, D ** -0.5)
    ts.copy(out, acc)
    ts.store(Y, out, at=(i, j))


def sylvester(d: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("M", "D"), [(21, 128), (5, 32), (3, 16), (0, 64)])
def test_hadamard_rows(backend, dtype, M, D, rng):
    """D = 16 is narrower than a tile (columns past it read as zero, stored nowhere); the transform applied twice
    is the identity (H H = D I)."""
    x = randn(rng, M, D, dtype=dtype)
    y = poisoned(M, D, dtype=dtype)
    launch(hadamard_rows, backend, x, y)
    want = x.double() @ sylvester(D) / math.sqrt(D)
    close(y, want.to(dtype), scale=2)
    back = poisoned(M, D, dtype=dtype)
    launch(hadamard_rows, backend, y, back)
    close(back, x, scale=4)


# ---- 2. sparsemax: y = max(z - tau, 0) with sum(y) = 1 ----------------------------------------------------------
@ts.kernel(grid=lambda Z, BM: (ts.cdiv(Z.shape[0], BM),))
def sparsemax(Z, Y, *, ITERS: int = 24, BM: int = 8, BN: int = 64):
    """Z, Y (M, N), N <= BN. tau lies in [max - 1, max]: ITERS bisection steps keep sum(max(z - lo, 0)) >= 1 >
    sum(max(z - hi, 0)); then tau = (sum of z over S - 1) / |S| with S = {z > lo}, exact but for elements within
    2^-ITERS of tau."""
    i = ts.block_id(0)
    z = ts.RegTile[ts.f32, BM, BN]()
    t = ts.RegTile[ts.f32, BM, BN]()
    inside = ts.RegTile[ts.bool_, BM, BN]()
    out = ts.RegTile[Y.dtype, BM, BN]()
    lo = ts.RegVec[ts.f32, BM]()
    hi = ts.RegVec[ts.f32, BM]()
    mid = ts.RegVec[ts.f32, BM]()
    f = ts.RegVec[ts.f32, BM]()
    big = ts.RegVec[ts.bool_, BM]()
    k = ts.RegVec[ts.f32, BM]()
    ts.load(z, Z, at=(i, 0))
    ts.right_fill(z, z, Z.shape[1], -math.inf)
    ts.row_max(hi, z)
    ts.sub(lo, hi, 1.0)
    for _ in ts.range(ITERS):
        ts.add(mid, lo, hi)
        ts.mul(mid, mid, 0.5)
        ts.sub(t, z, ts.per_row(mid))
        ts.relu(t, t)
        ts.row_sum(f, t)
        ts.ge(big, f, 1.0)
        ts.where(lo, big, mid, lo)
        ts.where(hi, big, hi, mid)
    ts.gt(inside, z, ts.per_row(lo))
    ts.where(t, inside, 1.0, 0.0)
    ts.row_sum(k, t)
    ts.where(t, inside, z, 0.0)
    ts.row_sum(f, t)
    ts.sub(f, f, 1.0)
    ts.div(f, f, k)                                  # tau
    ts.sub(z, z, ts.per_row(f))
    ts.relu(z, z)
    ts.copy(out, z)
    ts.store(Y, out, at=(i, 0))


def sparsemax_ref(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    zs = z.sort(-1, descending=True).values
    k = torch.arange(1, z.shape[-1] + 1, dtype=torch.float64)
    cum = zs.cumsum(-1)
    support = 1 + k * zs > cum
    kz = support.sum(-1, keepdim=True)
    tau = (cum.gather(-1, kz - 1) - 1) / kz
    return (z - tau).clamp_min(0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("M", "N"), [(13, 50), (8, 64), (3, 1), (0, 8)])
def test_sparsemax(backend, dtype, M, N, rng):
    """Rows of small spread (dense outputs), wide spread (one or two survivors), ties at the top, a -inf entry and a
    row of one element (1)."""
    z = randn(rng, M, N) * torch.from_numpy(rng.choice([0.05, 1.0, 8.0], (M, 1))).float()
    if M >= 3 and N >= 4:
        z[0, :3] = 2.0
        z[1, 1] = -math.inf
    z = z.to(dtype)
    y = poisoned(M, N, dtype=dtype)
    launch(sparsemax, backend, z, y)
    want = sparsemax_ref(z)
    close(y, want.to(dtype), scale=4)
    if M:
        close(y.double().sum(-1), torch.ones(M, dtype=torch.float64), dtype, scale=8)


# ---- 3. Muon's Newton-Schulz orthogonalization of a batch of (M, N) matrices, M <= N ------------------------------
NS_COEFFS = (3.4445, -4.7750, 2.0315)


@ts.kernel(grid=lambda G: (G.shape[0],))
def newton_schulz(G, O, *, STEPS: int = 5, OPS: str = "f32", BM: int = 32, BN: int = 64):
    """X = G / (||G||_F + 1e-7), then STEPS times A = X X^T, B = b A + c A A, X = a X + B X; O = X. Products take
    X and A in OPS (f32, exact; or bf16, as Muon runs them) and accumulate in f32."""
    a_, b_, c_ = NS_COEFFS
    n = ts.block_id(0)
    odt = ts.f32 if OPS == "f32" else ts.bf16
    x = ts.RegTile[ts.f32, BM, BN]()
    xo = ts.RegTile[odt, BM, BN]()
    a = ts.RegTile[ts.f32, BM, BM]()
    ao = ts.RegTile[odt, BM, BM]()
    bm = ts.RegTile[ts.f32, BM, BM]()
    bo = ts.RegTile[odt, BM, BM]()
    sq = ts.RegTile[ts.f32, BM, BN]()
    tot = ts.RegTile[ts.f32, BM, BM]()
    out = ts.RegTile[O.dtype, BM, BN]()
    rs = ts.RegVec[ts.f32, BM]()
    norm = ts.RegVec[ts.f32, BM]()
    ts.load(x, G, at=(n, 0, 0))
    ts.mul(sq, x, x)
    ts.row_sum(rs, sq)
    ts.zero(tot)
    ts.add(tot, tot, ts.per_col(rs))
    ts.row_sum(norm, tot)                            # every row: the sum over all rows
    ts.sqrt(norm, norm)
    ts.add(norm, norm, 1e-7)
    ts.div(x, x, ts.per_row(norm))
    for _ in ts.range(STEPS):
        ts.copy(xo, x)
        ts.zero(a)
        ts.mma_ABt(a, xo, xo, a)                     # A = X X^T
        ts.copy(ao, a)
        ts.zero(bm)
        ts.mma_AB(bm, ao, ao, bm)                    # A A
        ts.mul(bm, bm, c_)
        ts.mul(a, a, b_)
        ts.add(bm, bm, a)                            # B = b A + c A A
        ts.copy(bo, bm)
        ts.mul(x, x, a_)
        ts.mma_AB(x, bo, xo, x)                      # X = a X + B X
    ts.copy(out, x)
    ts.store(O, out, at=(n, 0, 0))


def newton_schulz_ref(g: torch.Tensor, steps: int, bf16_ops: bool) -> torch.Tensor:
    """The same iteration in float64 (operands rounded to bf16 where the kernel rounds them)."""
    a_, b_, c_ = NS_COEFFS
    rnd = (lambda t: t.to(BF).double()) if bf16_ops else (lambda t: t)
    x = g.double()
    x = x / (x.square().sum((-2, -1), keepdim=True).sqrt() + 1e-7)
    for _ in range(steps):
        xo = rnd(x)
        a = xo @ xo.transpose(-2, -1)
        ao = rnd(a)
        bm = rnd(b_ * a + c_ * ao @ ao)
        x = a_ * x + bm @ xo
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ops", ["f32", "bf16"])
@pytest.mark.parametrize(("Bt", "M", "N", "tall"), [(3, 20, 50, False), (2, 32, 64, False), (2, 24, 9, True)])
def test_newton_schulz(backend, ops, Bt, M, N, tall, rng):
    """Gradients of rank-deficient and full rank; a tall (M > N) matrix is orthogonalized through its transpose, a
    (N, M) view of it. After five steps the singular values lie near 1 (Muon's coefficients trade exactness for
    speed: within about 0.3)."""
    g = randn(rng, Bt, M, N)
    g[0] = randn(rng, M, 2) @ randn(rng, 2, N)              # rank 2
    arg = g.transpose(1, 2) if tall else g
    o = poisoned(*arg.shape)
    launch(newton_schulz, backend, arg, o, OPS=ops)
    want = newton_schulz_ref(arg, 5, ops == "bf16")
    close(o, want.float(), torch.bfloat16 if ops == "bf16" else None, scale=1 if ops == "bf16" else 100)
    sv = torch.linalg.svdvals(o[1:].double())
    assert ((sv > 0.6) & (sv < 1.25)).all(), sv


# ---- 4. RetNet's retention, parallel form: O = (Q K^T scale * D) V, D[n, m] = gamma^(n - m) for n >= m -------------
@ts.kernel(grid=lambda Q, BM: (ts.cdiv(Q.shape[2], BM), Q.shape[0] * Q.shape[1]))
def retention(Q, K, V, LG, O, scale: float, *, BM: int = 16, BN: int = 16, D: int = 32):
    """Q, K, V, O (B, H, S, D); LG (H, BM) f32 log2(gamma) of each head (stride 0 along BM). Key blocks up to the
    diagonal's; the decay made as exp2((n - m) log2 gamma) from the positions, zero above the diagonal."""
    i, bh = ts.block_id(0), ts.block_id(1)
    b, h = bh // Q.shape[1], bh % Q.shape[1]
    q = ts.RegTile[Q.dtype, BM, D]()
    k = ts.SharedTile[Q.dtype, BN, D]()
    v = ts.SharedTile[Q.dtype, BN, D]()
    s = ts.RegTile[ts.f32, BM, BN]()
    dec = ts.RegTile[ts.f32, BM, BN]()
    past = ts.RegTile[ts.bool_, BM, BN]()
    p = ts.RegTile[Q.dtype, BM, BN]()
    acc = ts.RegTile[ts.f32, BM, D]()
    out = ts.RegTile[O.dtype, BM, D]()
    qpos = ts.RegVec[ts.f32, BM]()
    kpos = ts.RegVec[ts.f32, BN]()
    lg = ts.RegVec[ts.f32, BM]()
    ts.load(q, Q, at=(b, h, i, 0))
    ts.load(lg, LG, at=(h, 0))
    ts.arange(qpos, i * BM)
    ts.zero(acc)
    for j in ts.range(ts.cdiv((i + 1) * BM, BN)):
        ts.load(k, K, at=(b, h, j, 0))
        ts.load(v, V, at=(b, h, j, 0))
        ts.zero(s)
        ts.mma_ABt(s, q, k, s)
        ts.arange(kpos, j * BN)
        ts.zero(dec)
        ts.add(dec, dec, ts.per_row(qpos))
        ts.sub(dec, dec, ts.per_col(kpos))           # n - m
        ts.ge(past, dec, 0.0)
        ts.mul(dec, dec, ts.per_row(lg))
        ts.exp2(dec, dec)
        ts.where(dec, past, dec, 0.0)
        ts.mul(s, s, dec)
        ts.mul(s, s, scale)
        ts.copy(p, s)
        ts.mma_AB(acc, p, v, acc)
    ts.copy(out, acc)
    ts.store(O, out, at=(b, h, i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("B", "H", "S"), [(2, 3, 37), (1, 2, 16), (1, 1, 5)])
def test_retention(backend, dtype, B, H, S, rng):
    """gamma = 1 - 2^(-5 - h), RetNet's per-head decays; keys past S read as zero, their columns add nothing."""
    D = 32
    q, k, v = (randn(rng, B, H, S, D, dtype=dtype) for _ in range(3))
    gamma = 1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64))
    o = poisoned(B, H, S, D, dtype=dtype)
    launch(retention, backend, q, k, v, gamma.log2().float()[:, None].expand(H, 16), o, D ** -0.5)
    n = torch.arange(S, dtype=torch.float64)
    diff = n[:, None] - n[None, :]
    decay = torch.where(diff >= 0, gamma[:, None, None] ** diff.clamp_min(0), 0.0)          # (H, S, S)
    s = q.double() @ k.double().transpose(-1, -2) * D ** -0.5 * decay
    if dtype is not torch.float32:
        s = s.to(dtype).double()                     # (p rounded to the operands' dtype before its product)
    close(o, (s @ v.double()).to(dtype), scale=4)


# ---- 5. top-k of rows wider than a tile: K passes, each the largest (value, index) after the last one taken -------
NONE = 2**31 - 1   # an index no row has


@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def wide_topk(X, VALS, IDX, *, K: int = 4, BM: int = 8, BN: int = 16):
    """VALS, IDX (M, K): row r's K largest, in torch.topk's order (descending; ties: the lower index first; -inf
    entries are values like any other). Pass t takes, over all column tiles, the best element that comes after the
    last one taken in that order: a value below it, or equal with a higher index. The (BM, K) results are held in
    tiles KW = K rounded up to a power of two wide (Triton's tile sizes); stores drop the columns past K."""
    KW = 1 << (K - 1).bit_length()
    i = ts.block_id(0)
    N = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    ok = ts.RegTile[ts.bool_, BM, BN]()
    tie = ts.RegTile[ts.bool_, BM, BN]()
    after = ts.RegTile[ts.bool_, BM, BN]()
    cand = ts.RegTile[ts.f32, BM, BN]()
    at = ts.RegTile[ts.i32, BM, BN]()
    vals = ts.RegTile[ts.f32, BM, KW]()
    idx = ts.RegTile[ts.i32, BM, KW]()
    in_slot = ts.RegTile[ts.bool_, BM, KW]()
    outv = ts.RegTile[VALS.dtype, BM, KW]()
    cols = ts.RegVec[ts.i32, BN]()
    slot = ts.RegVec[ts.i32, KW]()
    last_v = ts.RegVec[ts.f32, BM]()
    last_i = ts.RegVec[ts.i32, BM]()
    best_v = ts.RegVec[ts.f32, BM]()
    best_i = ts.RegVec[ts.i32, BM]()
    tile_v = ts.RegVec[ts.f32, BM]()
    tile_i = ts.RegVec[ts.i32, BM]()
    have = ts.RegVec[ts.bool_, BM]()
    better = ts.RegVec[ts.bool_, BM]()
    empty = ts.RegVec[ts.bool_, BM]()
    ts.arange(slot)
    ts.pos_infty(last_v)
    ts.fill(last_i, -1)
    ts.zero(vals)
    ts.zero(idx)
    for t in range(K):                               # unrolled when traced
        ts.neg_infty(best_v)
        ts.fill(best_i, -1)                          # none yet (a -inf element still beats this)
        for j in ts.range(ts.cdiv(N, BN)):
            ts.load(x, X, at=(i, j))
            ts.arange(cols, j * BN)
            ts.lt(ok, x, ts.per_row(last_v))
            ts.eq(tie, x, ts.per_row(last_v))
            ts.gt(after, ts.per_col(cols), ts.per_row(last_i))
            ts.logical_and(tie, tie, after)
            ts.logical_or(ok, ok, tie)
            ts.lt(after, ts.per_col(cols), N)
            ts.logical_and(ok, ok, after)            # columns past N are no candidates
            ts.where(cand, ok, x, -math.inf)
            ts.row_max(tile_v, cand)
            ts.eq(tie, cand, ts.per_row(tile_v))
            ts.logical_and(tie, tie, ok)
            ts.where(at, tie, ts.per_col(cols), NONE)
            ts.row_min(tile_i, at)                   # the tile's best and its first index (NONE: no candidate)
            ts.ne(have, tile_i, NONE)
            ts.gt(better, tile_v, best_v)            # (an equal value came first: it stays)
            ts.lt(empty, best_i, 0)
            ts.logical_or(better, better, empty)
            ts.logical_and(better, better, have)
            ts.where(best_v, better, tile_v, best_v)
            ts.where(best_i, better, tile_i, best_i)
        ts.eq(in_slot, ts.per_col(slot), t)
        ts.where(vals, in_slot, ts.per_row(best_v), vals)
        ts.where(idx, in_slot, ts.per_row(best_i), idx)
        ts.copy(last_v, best_v)
        ts.copy(last_i, best_i)
    ts.copy(outv, vals)
    ts.store(VALS, outv, at=(i, 0))
    ts.store(IDX, idx, at=(i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("M", "N", "K"), [(11, 45, 4), (8, 16, 3), (3, 5, 5), (0, 7, 2)])
def test_wide_topk(backend, dtype, M, N, K, rng):
    """Small integers (ties everywhere); a row of all -inf but one (the top-k reaches into the -inf entries, lowest
    index first); the largest value last in the row, across tiles."""
    x = torch.from_numpy(rng.integers(-3, 4, (M, N)).astype(np.float32))
    if M >= 2:
        x[0] = -math.inf
        x[0, N // 2] = 1.0
        x[1, -1] = 100.0
    x = x.to(dtype)
    vals = poisoned(M, K, dtype=dtype)
    idx = torch.full((M, K), -7, dtype=I32)
    launch(wide_topk, backend, x, vals, idx, K=K)
    order = torch.from_numpy((-x.double()).numpy().argsort(axis=1, kind="stable")[:, :K].copy())
    assert torch.equal(idx.long(), order)
    assert torch.equal(vals, x.gather(1, order))
