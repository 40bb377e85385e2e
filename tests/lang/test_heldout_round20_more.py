"""Round 20 of held-out kernels, continued (see test_heldout_round20.py's docstring): a grouped GEMM over a list of
problem sizes given as an index tensor (each group's (M, N, K) read with load_scalar, its operands in padded storage
whose padding is NaN, so every element past a group's sizes must be masked out of the product and the store; programs
past a group's tiles run no trips); a 2-D max-pool with indices (3x3 windows of stride 2 that overlap, the nine window
offsets as the leading axes of one as_strided view of the input; the first maximum's flat index as torch's, NaN
winning, -inf windows) and its backward by atomic adds through the same overlapping view of the input's gradient;
a block-sparse GEMM whose nonzero blocks of A are listed in a CSR of blocks (row pointers, block columns), the blocks
not listed NaN so that reading one shows, empty block rows giving 0; greedy decoding's argmax over a vocabulary wider
than a tile (an online maximum and the first index attaining it carried across vocabulary tiles, NaN first as
torch.argmax, ties to the first, the padding columns -inf); and a fused AdamW step (f32 master weights, moments and
f32 or bf16 gradients, bf16 weights written beside, the bias corrections 1 - beta ** step from a runtime step); and
atomic adds into outputs whose indices share memory (an expanded view, an overlapping as_strided one), the fix this
round made (see test_heldout_round20.py's docstring).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, I32, I64, close, launch, randn

import tilestack.lang as ts

FLOAT_DTYPES = [torch.float32, F16, BF]
BIG = 2**30


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20262002)


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. grouped GEMM over problem sizes in an index tensor ---------------------------------------------------------
@ts.kernel(grid=lambda A, B, BM, BN: (ts.cdiv(A.shape[1], BM), ts.cdiv(B.shape[2], BN), A.shape[0]))
def grouped_gemm(A, B, SIZES, C, *, BM: int = 16, BN: int = 16, BK: int = 16):
    """C[g, :M, :N] = A[g, :M, :K] @ B[g, :K, :N] for (M, N, K) = SIZES[g] (G, 3), in padded storage A (G, Mmax,
    Kmax), B (G, Kmax, Nmax), C (G, Mmax, Nmax); nothing of A, B outside the sizes is read into the product and
    nothing of C outside them is written. Grid: (Mmax blocks, Nmax blocks, G)."""
    i, j, g = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    M, N, K = ts.load_scalar(SIZES, g, 0), ts.load_scalar(SIZES, g, 1), ts.load_scalar(SIZES, g, 2)
    # a program past its group's rows or columns runs no K trips (1 when its tile starts inside, else 0)
    live = ts.smin(1, ts.smax(0, M - i * BM)) * ts.smin(1, ts.smax(0, N - j * BN))
    acc = ts.RegTile[ts.f32, BM, BN]()
    ts.zero(acc)
    a = ts.RegTile[A.dtype, BM, BK]()
    b = ts.RegTile[B.dtype, BK, BN]()
    a_s = ts.SharedTile[A.dtype, BM, BK]()
    b_s = ts.SharedTile[B.dtype, BK, BN]()
    kc = ts.RegVec[ts.i32, BK]()
    ok_a = ts.RegTile[ts.bool_, BM, BK]()
    ok_b = ts.RegTile[ts.bool_, BK, BN]()
    for k in ts.range(ts.cdiv(K, BK) * live):
        ts.arange(kc, k * BK)
        ts.load(a, A, at=(g, i, k))
        ts.lt(ok_a, ts.per_col(kc), K)
        ts.where(a, ok_a, a, 0.0)                       # A's padding columns are NaN
        ts.load(b, B, at=(g, k, j))
        ts.lt(ok_b, ts.per_row(kc), K)
        ts.where(b, ok_b, b, 0.0)
        ts.copy(a_s, a)
        ts.copy(b_s, b)
        ts.mma_AB(acc, a_s, b_s, acc)
    rows, cols = ts.RegVec[ts.i32, BM](), ts.RegVec[ts.i32, BN]()
    ts.arange(rows, i * BM)
    ts.arange(cols, j * BN)
    keep, in_n = ts.RegTile[ts.bool_, BM, BN](), ts.RegTile[ts.bool_, BM, BN]()
    ts.lt(keep, ts.per_row(rows), M)
    ts.lt(in_n, ts.per_col(cols), N)
    ts.logical_and(keep, keep, in_n)
    out = ts.RegTile[C.dtype, BM, BN]()
    ts.copy(out, acc)
    ts.store(C, out, at=(g, i, j), mask=keep)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "sdtype"), [(BF, I32), (F16, I64), (torch.float32, I32)])
def test_grouped_gemm(backend, dtype, sdtype, rng):
    """Groups (37, 20, 50), (1, 1, 1), (0, 8, 8) (no rows), (16, 33, 0) (K = 0: zeros), (5, 0, 9) (no columns); the
    padding of A and B NaN, C's padding a sentinel that must survive."""
    sizes = [(37, 20, 50), (1, 1, 1), (0, 8, 8), (16, 33, 0), (5, 0, 9)]
    G, Mx, Nx, Kx = len(sizes), 40, 40, 52
    a, b = poisoned(G, Mx, Kx, dtype=dtype), poisoned(G, Kx, Nx, dtype=dtype)
    want = torch.full((G, Mx, Nx), -7.0, dtype=torch.float64)
    for g, (m, n, k) in enumerate(sizes):
        a[g, :m, :k] = randn(rng, m, k, dtype=dtype)
        b[g, :k, :n] = randn(rng, k, n, dtype=dtype)
        want[g, :m, :n] = a[g, :m, :k].double() @ b[g, :k, :n].double()
    c = torch.full((G, Mx, Nx), -7.0, dtype=torch.float32 if dtype is torch.float32 else dtype)
    launch(grouped_gemm, backend, a, b, torch.tensor(sizes, dtype=sdtype), c)
    close(c, want, scale=4)


# ---- 2. 2-D max-pool with indices (3x3, stride 2, overlapping) and its backward -----------------------------------
def windows(x: torch.Tensor, ks: int = 3, stride: int = 2) -> torch.Tensor:
    """x (N, C, H, W) as a (ks, ks, N, C, Ho, Wo) view: [di, dj, n, c, oh, ow] = x[n, c, stride oh + di, stride ow +
    dj] (windows overlap where stride < ks: one element appears under several (di, dj, oh, ow))."""
    N, C, H, W = x.shape
    sn, sc, sh, sw = x.stride()
    Ho, Wo = (H - ks) // stride + 1, (W - ks) // stride + 1
    return x.as_strided((ks, ks, N, C, Ho, Wo), (sh, sw, sn, sc, stride * sh, stride * sw), x.storage_offset())


@ts.kernel(grid=lambda DY, BH, BW: (ts.cdiv(DY.shape[2], BH), ts.cdiv(DY.shape[3], BW), DY.shape[0] * DY.shape[1]))
def maxpool_bwd(DY, IND, DXW, W: int, *, KS: int = 3, STRIDE: int = 2, BH: int = 8, BW: int = 16):
    """DX += DY at IND: each window offset (di, dj) adds DY where IND names it, through DXW = windows(DX) (the
    windows overlap, so two programs' or two offsets' adds meet on one element: atomic adds). Grid: maxpool_fwd's."""
    i, j, nc = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    C = DY.shape[1]
    n, c = nc // C, nc % C
    g = ts.RegTile[DXW.dtype, BH, BW]()
    ts.load(g, DY, at=(n, c, i, j))
    idx = ts.RegTile[ts.i64, BH, BW]()
    ts.load(idx, IND, at=(n, c, i, j))
    oh, ow = ts.RegVec[ts.i64, BH](), ts.RegVec[ts.i64, BW]()
    ts.arange(oh, i * BH)
    ts.arange(ow, j * BW)
    base, here = ts.RegTile[ts.i64, BH, BW](), ts.RegTile[ts.i64, BH, BW]()
    ts.zero(base)
    ts.add(base, base, ts.per_row(oh))
    ts.mul(base, base, STRIDE * W)
    ts.zero(here)
    ts.add(here, here, ts.per_col(ow))
    ts.mul(here, here, STRIDE)
    ts.add(base, base, here)
    hit = ts.RegTile[ts.bool_, BH, BW]()
    for di in range(KS):
        for dj in range(KS):
            ts.add(here, base, di * W + dj)
            ts.eq(hit, idx, here)
            ts.atomic_add(DXW, g, at=(di, dj, n, c, i, j), mask=hit)


@ts.kernel(grid=lambda Y, BH, BW: (ts.cdiv(Y.shape[2], BH), ts.cdiv(Y.shape[3], BW), Y.shape[0] * Y.shape[1]))
def maxpool_fwd(XW, Y, IND, W: int, *, KS: int = 3, STRIDE: int = 2, BH: int = 8, BW: int = 16):
    """Y (N, C, Ho, Wo) = the max of each KS x KS window of X (N, C, H, W), IND its flat index h W + w in X's plane
    (the first maximum in the window's row-major order, a NaN winning, as torch's CPU kernel), made from the window
    offsets: (STRIDE oh + di) W + STRIDE ow + dj; XW = windows(X). Grid: (Ho blocks, Wo blocks, N C)."""
    i, j, nc = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    C = Y.shape[1]
    n, c = nc // C, nc % C
    best = ts.RegTile[ts.f32, BH, BW]()
    idx, base, here = (ts.RegTile[ts.i64, BH, BW]() for _ in range(3))
    v = ts.RegTile[ts.f32, BH, BW]()
    upd, nan = ts.RegTile[ts.bool_, BH, BW](), ts.RegTile[ts.bool_, BH, BW]()
    oh, ow = ts.RegVec[ts.i64, BH](), ts.RegVec[ts.i64, BW]()
    ts.arange(oh, i * BH)
    ts.arange(ow, j * BW)
    ts.zero(base)
    ts.add(base, base, ts.per_row(oh))
    ts.mul(base, base, STRIDE * W)
    ts.zero(here)
    ts.add(here, here, ts.per_col(ow))
    ts.mul(here, here, STRIDE)
    ts.add(base, base, here)
    for di in range(KS):
        for dj in range(KS):
            ts.load(v, XW, at=(di, dj, n, c, i, j))
            ts.add(here, base, di * W + dj)
            if di == 0 and dj == 0:
                ts.copy(best, v)
                ts.copy(idx, here)
                continue
            ts.gt(upd, v, best)
            ts.ne(nan, v, v)
            ts.logical_or(upd, upd, nan)
            ts.where(best, upd, v, best)
            ts.where(idx, upd, here, idx)
    out = ts.RegTile[Y.dtype, BH, BW]()
    ts.copy(out, best)
    ts.store(Y, out, at=(n, c, i, j))
    ts.store(IND, idx, at=(n, c, i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("N", "C", "H", "W"), [(2, 3, 19, 37), (1, 1, 3, 3), (1, 2, 4, 40)])
def test_maxpool_with_indices_and_backward(backend, dtype, N, C, H, W, rng):
    """Against F.max_pool2d(3, 2, return_indices=True) and its autograd in float64: rows of 37 (18 windows, two
    column blocks), a single window, a channel of ties (all 1.0: the first index of each window), a -inf window, a
    NaN; the gradient summed where overlapping windows pick the same element."""
    x = randn(rng, N, C, H, W, dtype=dtype)
    x[0, 0, :3, :3] = -math.inf
    if C > 1:
        x[0, 1] = 1.0
    if H > 6 and W > 6:
        x[1, 2, 5, 6] = math.nan
    Ho, Wo = (H - 3) // 2 + 1, (W - 3) // 2 + 1
    y, ind = poisoned(N, C, Ho, Wo, dtype=dtype), torch.full((N, C, Ho, Wo), -1, dtype=I64)
    launch(maxpool_fwd, backend, windows(x), y, ind, W)
    y_ref, ind_ref = F.max_pool2d(x.double(), 3, 2, return_indices=True)
    assert torch.equal(ind, ind_ref)
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=0, equal_nan=True)
    dy = randn(rng, N, C, Ho, Wo)
    dx = torch.zeros(N, C, H, W)
    launch(maxpool_bwd, backend, dy, ind, windows(dx), W)
    xg = x.double().requires_grad_(True)
    F.max_pool2d(xg, 3, 2).backward(dy.double())
    close(dx, xg.grad)


# ---- 3. block-sparse GEMM over a CSR of blocks ---------------------------------------------------------------------
@ts.kernel(grid=lambda C, BM, BN: (ts.cdiv(C.shape[0], BM), ts.cdiv(C.shape[1], BN)))
def bsr_gemm(A, ROWPTR, COLS, B, C, *, BM: int = 16, BN: int = 16, BK: int = 16):
    """C (M, N) = A (M, K) @ B (K, N) where A's (BM, BK) blocks outside the CSR (ROWPTR (M/BM + 1,), COLS (nnz,)) are
    zero and never read. Grid: (row blocks, column blocks)."""
    i, j = ts.block_id(0), ts.block_id(1)
    acc = ts.RegTile[ts.f32, BM, BN]()
    ts.zero(acc)
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    for p in ts.range(ts.load_scalar(ROWPTR, i), ts.load_scalar(ROWPTR, i + 1)):
        kb = ts.load_scalar(COLS, p)
        ts.load(a, A, at=(i, kb))
        ts.load(b, B, at=(kb, j))
        ts.mma_AB(acc, a, b, acc)
    out = ts.RegTile[C.dtype, BM, BN]()
    ts.copy(out, acc)
    ts.store(C, out, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "idtype"), [(BF, I32), (F16, I64)])
@pytest.mark.parametrize(("M", "N", "K"), [(45, 37, 70), (16, 1, 16)])
def test_bsr_gemm(backend, dtype, idtype, M, N, K, rng):
    """Against the dense product in float64 with the blocks not listed zeroed: those blocks hold NaN in A (a read
    shows), block columns listed out of order, an empty block row (its C rows 0), the ragged last block row and
    column (edges past A read 0)."""
    mb, kb = -(-M // 16), -(-K // 16)
    mask = torch.from_numpy(rng.random((mb, kb)) < 0.5)
    mask[min(1, mb - 1)] = False                            # an empty block row
    mask[0, 0] = True
    a = randn(rng, M, K, dtype=dtype)
    dense = a.double().clone()
    for r in range(mb):
        for k in range(kb):
            if not mask[r, k]:
                a[r * 16:(r + 1) * 16, k * 16:(k + 1) * 16] = math.nan
                dense[r * 16:(r + 1) * 16, k * 16:(k + 1) * 16] = 0
    cols = [list(rng.permutation(np.flatnonzero(mask[r].numpy()))) for r in range(mb)]
    rowptr = torch.tensor([0, *np.cumsum([len(c) for c in cols])], dtype=idtype)
    colidx = torch.tensor([k for c in cols for k in c], dtype=idtype)
    b = randn(rng, K, N, dtype=dtype)
    c = poisoned(M, N, dtype=dtype)
    launch(bsr_gemm, backend, a, rowptr, colidx, b, c)
    close(c, dense @ b.double(), scale=4)
    if mb > 1:
        assert (c[16:32] == 0).all()


# ---- 4. greedy decoding: argmax over a vocabulary wider than a tile -----------------------------------------------
@ts.kernel(grid=lambda LOGITS, BM: (ts.cdiv(LOGITS.shape[0], BM),))
def greedy_argmax(LOGITS, TOKENS, *, BM: int = 4, BV: int = 64):
    """TOKENS (B,) = argmax of each row of LOGITS (B, V) as torch.argmax: the first maximum, the first NaN if any.
    An online (max, first index) carried across vocabulary tiles; padding columns -inf. Grid: (row blocks,)."""
    i = ts.block_id(0)
    V = LOGITS.shape[1]
    best = ts.RegVec[ts.f32, BM]()
    best_i = ts.RegVec[ts.i64, BM]()
    first_nan = ts.RegVec[ts.i64, BM]()
    ts.neg_infty(best)
    ts.zero(best_i)
    ts.fill(first_nan, BIG)
    s = ts.RegTile[ts.f32, BM, BV]()
    col = ts.RegVec[ts.i64, BV]()
    cand = ts.RegTile[ts.i64, BM, BV]()
    hit = ts.RegTile[ts.bool_, BM, BV]()
    m = ts.RegVec[ts.f32, BM]()
    m_i = ts.RegVec[ts.i64, BM]()
    better = ts.RegVec[ts.bool_, BM]()
    for t in ts.range(ts.cdiv(V, BV)):
        ts.load(s, LOGITS, at=(i, t))
        ts.right_fill(s, s, V - t * BV, -math.inf)
        ts.arange(col, t * BV)
        ts.ne(hit, s, s)                                  # NaN: the first one wins, whatever else
        ts.where(cand, hit, ts.per_col(col), BIG)
        ts.row_min(first_nan, cand, first_nan)
        ts.row_max(m, s)                                  # (NaN-free where it matters: rows with NaN take first_nan)
        ts.eq(hit, s, ts.per_row(m))
        ts.where(cand, hit, ts.per_col(col), BIG)
        ts.row_min(m_i, cand)
        ts.gt(better, m, best)                            # strictly: an earlier tile keeps a tie
        ts.where(best, better, m, best)
        ts.where(best_i, better, m_i, best_i)
    ts.lt(better, first_nan, BIG)
    ts.where(best_i, better, first_nan, best_i)
    out = ts.RegVec[TOKENS.dtype, BM]()
    ts.copy(out, best_i)
    ts.store(TOKENS, out, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("odtype", [I64, I32])
def test_greedy_argmax(backend, dtype, odtype, rng):
    """Against torch.argmax: V = 200 (4 tiles, the last of 8 columns); a tie across tiles (the first wins), a tie in
    one tile, the maximum in the last column, a row of -inf (0), a NaN after the maximum (the NaN's index), two NaN
    (the first), +inf, and rows of 16-bit values equal after rounding."""
    B, V = 10, 200
    x = randn(rng, B, V, dtype=dtype)
    x[0, [5, 150]] = 9.0
    x[1, [70, 71]] = 9.0
    x[2, V - 1] = 9.0
    x[3] = -math.inf
    x[4, 3], x[4, 100] = 9.0, math.nan
    x[5, [120, 60]] = math.nan
    x[6, [10, 190]] = math.inf
    out = torch.full((B,), -5, dtype=odtype)
    launch(greedy_argmax, backend, x, out)
    assert out.tolist() == torch.argmax(x.float(), dim=1).tolist()
    assert out[:7].tolist() == [5, 70, V - 1, 0, 100, 60, 10]


# ---- 5. fused AdamW ----------------------------------------------------------------------------------------------
@ts.kernel(grid=lambda P, BLK: (ts.cdiv(P.shape[0], BLK),))
def adamw_step(P, P16, G, M, V, lr: float, eps: float, wd: float, step: int, *, B1: float = 0.9, B2: float = 0.999,
               BLK: int = 128):
    """One AdamW step (torch.optim.AdamW) on flat f32 master weights P with f32 moments M, V and gradients G (f32 or
    bf16), in place, writing P16 = bf16(P). Bias corrections 1 - B ** step from the runtime step. Grid: (blocks,)."""
    i = ts.block_id(0)
    p, g, m, v = (ts.RegVec[ts.f32, BLK]() for _ in range(4))
    ts.load(p, P, at=(i,))
    ts.load(g, G, at=(i,))
    ts.load(m, M, at=(i,))
    ts.load(v, V, at=(i,))
    ts.mul(p, p, 1.0 - lr * wd)
    ts.mul(m, m, B1)
    t = ts.RegVec[ts.f32, BLK]()
    ts.mul(t, g, 1.0 - B1)
    ts.add(m, m, t)
    ts.mul(v, v, B2)
    ts.mul(t, g, g)
    ts.mul(t, t, 1.0 - B2)
    ts.add(v, v, t)
    bc1, bc2 = 1.0 - B1 ** step, 1.0 - B2 ** step
    ts.div(t, v, bc2)
    ts.sqrt(t, t)
    ts.add(t, t, eps)
    u = ts.RegVec[ts.f32, BLK]()
    ts.div(u, m, t)
    ts.mul(u, u, lr / bc1)
    ts.sub(p, p, u)
    ts.store(P, p, at=(i,))
    ts.store(M, m, at=(i,))
    ts.store(V, v, at=(i,))
    p16 = ts.RegVec[P16.dtype, BLK]()
    ts.copy(p16, p)
    ts.store(P16, p16, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gdtype", [torch.float32, BF])
@pytest.mark.parametrize(("n", "step"), [(1000, 1), (333, 7), (1, 1000), (0, 3)])
def test_adamw_step(backend, gdtype, n, step, rng):
    """Against torch.optim.AdamW (float64 state, the same moments, its step count set to step - 1): a ragged size,
    one element, none; step 1 (bias corrections 0.1 and 0.001) and 1000; a zero gradient with zero moments (the
    update 0 / eps), gradients of 1e3 and 1e-20."""
    p = randn(rng, n)
    g = randn(rng, n, dtype=gdtype)
    m, v = randn(rng, n) * 0.1, randn(rng, n).abs() * 0.01
    if n > 4:
        g[:3] = torch.tensor([0.0, 1e3, 1e-20]).to(gdtype)
        m[0], v[0] = 0.0, 0.0
    lr, eps, wd = 1e-2, 1e-8, 0.1
    p64 = p.double().clone().requires_grad_(True)
    opt = torch.optim.AdamW([p64], lr=lr, betas=(0.9, 0.999), eps=eps, weight_decay=wd)
    p64.grad = g.double()
    opt.state[p64] = {"step": torch.tensor(float(step - 1)), "exp_avg": m.double().clone(),
                      "exp_avg_sq": v.double().clone()}
    opt.step()
    st = opt.state[p64]
    p16 = poisoned(n, dtype=BF)
    launch(adamw_step, backend, p, p16, g, m, v, lr, eps, wd, step)
    close(m, st["exp_avg"])
    close(v, st["exp_avg_sq"])
    close(p, p64.detach(), scale=5)
    assert torch.equal(p16, p.to(BF))


@ts.kernel(grid=lambda X, BLK: (ts.cdiv(X.shape[0], BLK),))
def add_into(X, S, *, BLK: int = 16, STORE: bool = False):
    """S[k] += X[k] by atomic adds (or S[k] = X[k] with STORE), S any layout of X's shape. Grid: (blocks,)."""
    i = ts.block_id(0)
    x = ts.RegVec[ts.f32, BLK]()
    ts.load(x, X, at=(i,))
    if STORE:
        ts.store(S, x, at=(i,))
    else:
        ts.atomic_add(S, x, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_atomic_adds_into_an_output_whose_indices_share_memory(backend, rng):
    """The max-pool's backward above adds through an overlapping view; the launch check refused any output with
    indices sharing memory ('stores to them race'), and the reference executor wrote a dense copy back element by
    element, keeping one of the adds to a shared element (maxpool_bwd off by 4.2). An output only added into
    atomically is taken now (lang.launch._plan) and the reference holds it as a view of its storage
    (reference.executor._aliased): here 40 elements summed into one through an expanded view (two indices of one
    tile reaching one element, and two programs), and into the pairs of a (20, 2) view with stride (1, 1); a store
    into such an output is still refused before any work."""
    x = randn(rng, 40)
    s = torch.zeros(1)
    launch(add_into, backend, x, s.expand(40))
    close(s, x.double().sum().reshape(1), scale=10)
    pairs = torch.zeros(21)
    over = pairs.as_strided((20, 2), (1, 1))                  # [r, c] is element r + c: 21 elements, 40 indices
    launch(add_into2d, backend, x.reshape(20, 2), over)
    want = torch.zeros(21, dtype=torch.float64)
    want[:20] += x.double()[0::2]
    want[1:] += x.double()[1::2]
    close(pairs, want)
    y = torch.full((1,), 5.0)
    with pytest.raises(Exception, match=r"add_into: output S has shape \(40,\) and strides \(0,\): stride 0"):
        launch(add_into, backend, x, y.expand(40), STORE=True)
    assert y.item() == 5.0


@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def add_into2d(X, S, *, BM: int = 8):
    """S[r, c] += X[r, c] by atomic adds, a (BM, 2) tile per program. Grid: (row blocks,)."""
    x = ts.RegTile[ts.f32, BM, 2]()
    ts.load(x, X, at=(ts.block_id(0), 0))
    ts.atomic_add(S, x, at=(ts.block_id(0), 0))
