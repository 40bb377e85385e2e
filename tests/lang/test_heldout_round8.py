"""Round 8 of held-out kernels (after test_heldout_kernels.py and rounds 2-7): kernels of kinds no earlier round
wrote, each on the reference executor and Triton's interpreter against float64 torch, outputs poisoned first.

RMSNorm's backward (dx per row in two passes over column tiles, dweight summed across row blocks atomically); chunked
causal linear attention (a (D, E) state carried across time chunks, fed by mma_AtB); a gated linear recurrence
h_t = a_t h_{t-1} + x_t along time by one-row tiles, forward or reversed, with an initial and a final state;
rotary embedding on interleaved pairs, two ways (even / odd strided views of a (S, H, D) tensor, and a pair-swap
matmul built from compares); an int4 GEMM whose weights are packed two nibbles to an int8 (sign-extended by shifts)
with per-group scales; a softmax down the columns (dim 0), online over row blocks, with a runtime temperature and
per-column lengths; Floyd-Warshall in one tile (column and row k picked out by compares with the loop counter); and a
transitive closure by repeated squaring (one register tile as both operands of the product, carried by the loop).
More kernels of this round are in test_heldout_round8_more.py.
"""

import math

import pytest
import torch
from heldout_support import BACKENDS, BF, F16, I8, I32, close, launch, meta, randn
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a

import tilestack.lang as ts

FLOAT_DTYPES = [torch.float32, F16, BF]
POISON = -77.0


def poisoned(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.full(shape, POISON, dtype=dtype)


# ---- 1. RMSNorm backward: dx by rows in two passes over column tiles, dweight atomically across row blocks ----------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def rmsnorm_bwd(X, W, DY, DX, DW, eps: float, *, BM: int = 8, BN: int = 16):
    """y = x rstd w with rstd = 1 / sqrt(mean(x^2) + eps) over rows of X (M, N); g = dy w:
    dx = rstd g - x rstd^3 mean(g x);  dw += sum over rows of dy x rstd (DW (N,) f32, added atomically)."""
    i = ts.block_id(0)
    n = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    dy = ts.RegTile[ts.f32, BM, BN]()
    g = ts.RegTile[ts.f32, BM, BN]()
    w = ts.RegVec[ts.f32, BN]()
    ss = ts.RegVec[ts.f32, BM]()
    dot = ts.RegVec[ts.f32, BM]()
    rstd = ts.RegVec[ts.f32, BM]()
    c = ts.RegVec[ts.f32, BM]()
    dw = ts.RegVec[ts.f32, BN]()
    dx = ts.RegTile[DX.dtype, BM, BN]()
    ts.zero(ss)
    ts.zero(dot)
    for j in ts.range(ts.cdiv(n, BN)):
        ts.load(x, X, at=(i, j))
        ts.load(dy, DY, at=(i, j))
        ts.load(w, W, at=(j,))
        ts.mul(g, dy, ts.per_col(w))
        ts.mul(g, g, x)
        ts.row_sum(dot, g, dot)
        ts.mul(g, x, x)
        ts.row_sum(ss, g, ss)
    ts.div(ss, ss, n)
    ts.add(ss, ss, eps)
    ts.rsqrt(rstd, ss)
    ts.mul(c, rstd, rstd)
    ts.mul(c, c, rstd)
    ts.mul(c, c, dot)
    ts.div(c, c, n)                                  # rstd^3 mean(g x)
    for j in ts.range(ts.cdiv(n, BN)):
        ts.load(x, X, at=(i, j))
        ts.load(dy, DY, at=(i, j))
        ts.load(w, W, at=(j,))
        ts.mul(g, dy, ts.per_col(w))
        ts.mul(g, g, ts.per_row(rstd))
        ts.mul(dy, dy, x)                            # dweight's term, before x is scaled
        ts.mul(dy, dy, ts.per_row(rstd))
        ts.col_sum(dw, dy)                           # rows past M read zeros: they add nothing
        ts.atomic_add(DW, dw, at=(j,))
        ts.mul(x, x, ts.per_row(c))
        ts.sub(g, g, x)
        ts.copy(dx, g)
        ts.store(DX, dx, at=(i, j))


def rmsnorm_ref(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + eps) * w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("M", "N"), [(21, 37), (8, 16), (1, 5), (3, 1), (0, 7), (5, 0)])
def test_rmsnorm_backward(backend, dtype, M, N, rng):
    x, dy = randn(rng, M, N, dtype=dtype) * 3, randn(rng, M, N, dtype=dtype)
    w = randn(rng, N, dtype=dtype)
    if M * N:
        x[0] = 0.0                                   # a zero row: rstd = 1 / sqrt(eps), large but finite
    eps = 1e-5
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    rmsnorm_ref(xd, wd, eps).backward(dy.double())
    dx, dw = poisoned(M, N, dtype=dtype), torch.zeros(N)
    launch(rmsnorm_bwd, backend, x, w, dy, dx, dw, eps)
    close(dx, xd.grad.to(dtype), scale=20)
    close(dw, wd.grad.float(), scale=10 * max(M, 1) ** 0.5)


# ---- 2. chunked causal linear attention: O_c = Q_c S + tril(Q_c K_c^T) V_c, then S += K_c^T V_c --------------------
@ts.kernel(grid=lambda Q: (Q.shape[0],))
def linear_attention(Q, K, V, O, *, BT: int = 16, D: int = 16, E: int = 16):
    """O[b] = tril(Q[b] K[b]^T) V[b] for Q, K (B, T, D), V and O (B, T, E), unnormalized: one program per b walks the
    time chunks, carrying the (D, E) state S = sum of k^T v over the chunks before. Operands in Q's dtype."""
    b = ts.block_id(0)
    q = ts.RegTile[Q.dtype, BT, D]()
    k = ts.RegTile[Q.dtype, BT, D]()
    v = ts.RegTile[Q.dtype, BT, E]()
    s = ts.RegTile[ts.f32, BT, BT]()
    p = ts.RegTile[Q.dtype, BT, BT]()
    st = ts.RegTile[ts.f32, D, E]()
    sq = ts.RegTile[Q.dtype, D, E]()
    o = ts.RegTile[ts.f32, BT, E]()
    out = ts.RegTile[O.dtype, BT, E]()
    ts.zero(st)
    for c in ts.range(ts.cdiv(Q.shape[1], BT)):
        ts.load(q, Q, at=(b, c, 0))
        ts.load(k, K, at=(b, c, 0))
        ts.load(v, V, at=(b, c, 0))
        ts.zero(s)
        ts.mma_ABt(s, q, k, s)
        ts.tril(s, s)                                # key t' <= query t inside the chunk
        ts.copy(p, s)
        ts.copy(sq, st)
        ts.zero(o)
        ts.mma_AB(o, q, sq, o)                       # the chunks before
        ts.mma_AB(o, p, v, o)
        ts.copy(out, o)
        ts.store(O, out, at=(b, c, 0))
        ts.mma_AtB(st, k, v, st)                     # S += k^T v (rows past T read zeros)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("B", "T", "D", "E", "BT"), [(2, 45, 16, 16, 16), (1, 16, 9, 13, 16), (3, 1, 16, 4, 16),
                                                     (1, 0, 16, 16, 16), (2, 29, 16, 16, 8)])
def test_linear_attention(backend, dtype, B, T, D, E, BT, rng):
    """BT = 8: chunks of 8 rows, so three of the four products have a dimension under 16 (Triton: not tl.dot)."""
    q, k, v = randn(rng, B, T, D, dtype=dtype), randn(rng, B, T, D, dtype=dtype), randn(rng, B, T, E, dtype=dtype)
    o = poisoned(B, T, E, dtype=dtype)
    launch(linear_attention, backend, q, k, v, o, BT=BT)
    s = (q.double() @ k.double().transpose(1, 2)).tril()
    want = s @ v.double()
    # 16-bit operands: the scores and the state are rounded to the dtype before their products
    close(o, want.to(dtype), scale=(T + 1) * (1 if dtype == torch.float32 else 8))


# ---- 3. a gated linear recurrence along time, h_t = a_t h_{t-1} + x_t, by one-row tiles; forward or reversed -------
@ts.kernel(grid=lambda X, BC: (ts.cdiv(X.shape[1], BC),))
def linear_scan(A, X, H0, H, HT, *, REVERSE: bool = False, BC: int = 16):
    """H[t] = A[t] * H[t-1] + X[t] over rows t of (T, C) tensors, H[-1] = H0 (1, C); HT (1, C) the last state.
    REVERSE runs t from T-1 down to 0 (H[t] = A[t] H[t+1] + X[t], H[T] = H0). A column block per program."""
    j = ts.block_id(0)
    T = X.shape[0]
    h = ts.RegTile[ts.f32, 1, BC]()
    a = ts.RegTile[ts.f32, 1, BC]()
    x = ts.RegTile[ts.f32, 1, BC]()
    out = ts.RegTile[H.dtype, 1, BC]()
    ts.load(h, H0, at=(0, j))
    steps = ts.range(T - 1, -1, -1) if REVERSE else ts.range(T)
    for t in steps:
        ts.load(a, A, at=(t, j))
        ts.load(x, X, at=(t, j))
        ts.mul(h, h, a)
        ts.add(h, h, x)
        ts.copy(out, h)
        ts.store(H, out, at=(t, j))
    ts.store(HT, h, at=(0, j))


def scan_ref(a, x, h0, reverse):
    h, hs = h0.double().reshape(-1), []
    order = range(a.shape[0] - 1, -1, -1) if reverse else range(a.shape[0])
    for t in order:
        h = a[t].double() * h + x[t].double()
        hs.append((t, h))
    out = torch.empty(a.shape, dtype=torch.float64)
    for t, v in hs:
        out[t] = v
    return out, h


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("T", "C"), [(37, 21), (1, 16), (0, 5), (9, 1)])
@pytest.mark.parametrize("transposed", [False, True])
def test_linear_scan(backend, dtype, reverse, T, C, transposed, rng):
    """Gates in [0, 1] (0 resets the state, 1 carries it whole); in wide cases a gate-1 column accumulates 1e30s and
    an inf in one step and a NaN in another reach every later step of their columns. ``transposed``: X and H are
    views of (C, T) buffers (strides (1, T)), each row a column of the buffer."""
    a = torch.from_numpy(rng.uniform(0, 1, (T, C))).to(dtype)
    x = randn(rng, T, C, dtype=dtype)
    h0 = randn(rng, 1, C)
    if T > 4 and C > 3:
        a[:, 0], a[T // 2, 1] = 1.0, 0.0
        x[:, 2] = 1e30 if dtype != F16 else 6e4
        x[2, 3], x[T - 3, 3] = math.inf, math.nan
    h, ht = poisoned(T, C, dtype=dtype), poisoned(1, C)
    if transposed:
        x, h = x.T.contiguous().T, poisoned(C, T, dtype=dtype).T
    launch(linear_scan, backend, a, x, h0, h, ht, REVERSE=reverse)
    want, last = scan_ref(a, x, h0, reverse)
    close(h, want.to(dtype), scale=8)
    close(ht, last.reshape(1, C).float(), scale=8)


# ---- 4. rotary embedding on interleaved pairs (x[2k], x[2k+1]): strided even / odd views, or a pair-swap matmul -----
@ts.kernel(grid=lambda XE, BS: (ts.cdiv(XE.shape[1], BS), XE.shape[0]))
def rope_pairs(XE, XO, COS, SIN, OE, OO, *, BS: int = 8, D2: int = 8):
    """(oe, oo) = (xe cos - xo sin, xe sin + xo cos) on (H, S, D/2) views of the even and odd elements of a (S, H, D)
    tensor (strides (D, H D, 2)); COS, SIN (S, D/2) f32. OE / OO may be XE / XO (in place)."""
    i, h = ts.block_id(0), ts.block_id(1)
    xe = ts.RegTile[ts.f32, BS, D2]()
    xo = ts.RegTile[ts.f32, BS, D2]()
    c = ts.RegTile[ts.f32, BS, D2]()
    s = ts.RegTile[ts.f32, BS, D2]()
    t = ts.RegTile[ts.f32, BS, D2]()
    oe = ts.RegTile[OE.dtype, BS, D2]()
    oo = ts.RegTile[OO.dtype, BS, D2]()
    ts.load(xe, XE, at=(h, i, 0))
    ts.load(xo, XO, at=(h, i, 0))
    ts.load(c, COS, at=(i, 0))
    ts.load(s, SIN, at=(i, 0))
    ts.copy(oe, xe * c - xo * s)
    ts.mul(t, xe, s)
    ts.mul(xo, xo, c)
    ts.add(t, t, xo)
    ts.copy(oo, t)
    ts.store(OE, oe, at=(h, i, 0))
    ts.store(OO, oo, at=(h, i, 0))


@ts.kernel(grid=lambda X, BS: (ts.cdiv(X.shape[1], BS), X.shape[0]))
def rope_swap(X, COS, SIN, O, *, BS: int = 8, D: int = 16):
    """The same rotation on (H, S, D) views of the whole rows: rot(x) = x @ P swaps each pair with a sign
    (rot[2k] = -x[2k+1], rot[2k+1] = x[2k]); cos and sin (S, D/2) are widened to D columns by a matmul with
    E[k, j] = (j // 2 == k). P and E are built from aranges and compares, exact in f32."""
    i, h = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[ts.f32, BS, D]()
    c2 = ts.RegTile[ts.f32, BS, D // 2]()
    s2 = ts.RegTile[ts.f32, BS, D // 2]()
    rows = ts.RegVec[ts.i32, D]()
    cols = ts.RegVec[ts.i32, D]()
    half = ts.RegVec[ts.i32, D // 2]()
    par = ts.RegVec[ts.i32, D]()
    sel = ts.RegTile[ts.bool_, D, D]()
    p = ts.RegTile[ts.f32, D, D]()
    sgn = ts.RegVec[ts.f32, D]()
    e = ts.RegTile[ts.f32, D // 2, D]()
    esel = ts.RegTile[ts.bool_, D // 2, D]()
    out = ts.RegTile[O.dtype, BS, D]()
    ts.arange(rows)
    ts.arange(cols)
    ts.arange(half)
    ts.bit_xor(par, cols, 1)                          # the partner of column j: j ^ 1
    ts.eq(sel, ts.per_row(rows), ts.per_col(par))     # P[k, j] != 0 where k is j's partner
    ts.rem(par, cols, 2)
    ts.copy(sgn, par)
    ts.mul(sgn, sgn, 2.0)
    ts.sub(sgn, sgn, 1.0)                            # -1 for even j, +1 for odd j
    ts.where(p, sel, ts.per_col(sgn), 0.0)
    ts.shr(par, cols, 1)
    ts.eq(esel, ts.per_row(half), ts.per_col(par))
    ts.where(e, esel, 1.0, 0.0)
    ts.load(x, X, at=(h, i, 0))
    ts.load(c2, COS, at=(i, 0))
    ts.load(s2, SIN, at=(i, 0))
    rot = x @ p
    ts.mul(rot, rot, s2 @ e)
    ts.mul(x, x, c2 @ e)
    ts.add(x, x, rot)                                # x cos + rot(x) sin
    ts.copy(out, x)
    ts.store(O, out, at=(h, i, 0))


def rope_ref(x, cos, sin):
    """Interleaved (GPT-J) RoPE in float64 on x (S, H, D), cos / sin (S, D/2)."""
    xd = x.double()
    xe, xo = xd[..., 0::2], xd[..., 1::2]
    c, s = cos.double()[:, None, :], sin.double()[:, None, :]
    out = torch.empty_like(xd)
    out[..., 0::2], out[..., 1::2] = xe * c - xo * s, xe * s + xo * c
    return out


def rope_tables(S, D2):
    ang = torch.arange(S, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(D2) / D2)
    return ang.cos().float(), ang.sin().float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("S", "H", "D"), [(19, 3, 16), (8, 1, 16), (5, 2, 10), (0, 2, 16), (6, 0, 16)])
@pytest.mark.parametrize("in_place", [False, True])
def test_rope_interleaved_by_strided_views(backend, dtype, S, H, D, in_place, rng):
    x = randn(rng, S, H, D, dtype=dtype) * 4
    if S > 3 and H:
        x[3, 0, 1] = math.inf                         # inf in one element of a pair: NaN / inf only in that pair
    cos, sin = rope_tables(S, D // 2)
    want = rope_ref(x, cos, sin)
    out = x.clone() if in_place else poisoned(S, H, D, dtype=dtype)
    src = out if in_place else x
    xe, xo = src[..., 0::2].permute(1, 0, 2), src[..., 1::2].permute(1, 0, 2)     # (H, S, D/2), strides (D, HD, 2)
    oe, oo = out[..., 0::2].permute(1, 0, 2), out[..., 1::2].permute(1, 0, 2)
    launch(rope_pairs, backend, xe, xo, cos, sin, oe, oo, D2=max(8, D // 2))
    close(out, want.to(dtype), scale=4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("S", "H"), [(19, 3), (1, 1), (0, 4)])
def test_rope_interleaved_by_pair_swap(backend, dtype, S, H, rng):
    D = 16
    x = randn(rng, S, H, D, dtype=dtype) * 4
    cos, sin = rope_tables(S, D // 2)
    out = poisoned(S, H, D, dtype=dtype)
    launch(rope_swap, backend, x.permute(1, 0, 2), cos, sin, out.permute(1, 0, 2), D=D)
    close(out, rope_ref(x, cos, sin).to(dtype), scale=4)


# ---- 5. an int4 GEMM: weights packed two nibbles to an int8, sign-extended by shifts, scaled per group of K rows -----
@ts.kernel(grid=lambda A_lo, P, BM, BN: (ts.cdiv(A_lo.shape[0], BM), ts.cdiv(P.shape[1], BN)))
def int4_gemm(A_lo, A_hi, P, S, C, *, G: int = 16, BM: int = 16, BN: int = 16, BK: int = 16):
    """C = A @ (W * scale) for W (K, N) int4 in [-8, 7], packed: P[k, n] (int8, K/2 rows) holds W[k, n] in its low
    nibble and W[k + K/2, n] in its high one; A_lo / A_hi are the views A[:, :K/2] and A[:, K/2:]; S (K/G, N) f32
    holds a scale per group of G rows of W (G a multiple of BK, K/2 of G)."""
    i, j = ts.block_id(0), ts.block_id(1)
    k2 = P.shape[0]
    a = ts.RegTile[ts.f32, BM, BK]()
    p = ts.RegTile[ts.i32, BK, BN]()
    lo = ts.RegTile[ts.i32, BK, BN]()
    w = ts.RegTile[ts.f32, BK, BN]()
    sc = ts.RegVec[ts.f32, BN]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    out = ts.RegTile[C.dtype, BM, BN]()
    ts.zero(acc)
    for kb in ts.range(ts.cdiv(k2, BK)):
        ts.load(p, P, at=(kb, j))                    # i8 -> i32: sign-extended
        ts.shl(lo, p, 28)
        ts.shr(lo, lo, 28)                           # the low nibble, signed
        ts.copy(w, lo)
        ts.load(sc, S, at=(kb * BK // G, j))
        ts.mul(w, w, ts.per_col(sc))
        ts.load(a, A_lo, at=(i, kb))
        ts.mma_AB(acc, a, w, acc)
        ts.shr(p, p, 4)                              # the high nibble, signed (arithmetic shift of the i8's value)
        ts.copy(w, p)
        ts.load(sc, S, at=((k2 + kb * BK) // G, j))
        ts.mul(w, w, ts.per_col(sc))
        ts.load(a, A_hi, at=(i, kb))
        ts.mma_AB(acc, a, w, acc)
    ts.copy(out, acc)
    ts.store(C, out, at=(i, j))


def pack_int4(w):
    """W (K, N) in [-8, 7] -> (K/2, N) int8: low nibble row k, high nibble row k + K/2."""
    k2 = w.shape[0] // 2
    lo, hi = w[:k2].to(torch.int32) & 0xF, w[k2:].to(torch.int32) & 0xF
    return ((hi << 4) | lo).to(torch.uint8).view(I8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("M", "K", "N", "G"), [(33, 64, 40, 16), (5, 32, 7, 16), (16, 96, 16, 48), (0, 32, 8, 16),
                                                (4, 0, 8, 16)])
def test_int4_packed_gemm(backend, dtype, M, K, N, G, rng):
    w = torch.from_numpy(rng.integers(-8, 8, (K, N))).to(torch.int64)
    if K:
        w[0, :], w[K - 1, :] = -8, 7                  # the nibbles' extremes, in both halves
    scale = torch.from_numpy(rng.uniform(0.01, 0.1, (max(K // G, 0), N))).float()
    a = randn(rng, M, K, dtype=dtype)
    c = poisoned(M, N, dtype=dtype)
    launch(int4_gemm, backend, a[:, :K // 2], a[:, K // 2:], pack_int4(w), scale, c, G=G)
    ws = w.double() * scale.double().repeat_interleave(G, 0)
    close(c, (a.double() @ ws).to(dtype), scale=4)


# ---- 6. softmax down the columns (dim 0), online over row blocks, with a temperature and per-column lengths ---------
@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[1], BN),))
def col_softmax(X, LEN, Y, inv_temp: float, *, BM: int = 8, BN: int = 16):
    """Y[:, c] = softmax(X[:LEN[c], c] * inv_temp) down column c (rows at or past LEN[c] are 0 in Y; a column of no
    rows, or of only -inf, is NaN as torch's). LEN (N,) i32. Pass 1 carries the columns' max and sum."""
    j = ts.block_id(0)
    M = X.shape[0]
    x = ts.RegTile[ts.f32, BM, BN]()
    y = ts.RegTile[Y.dtype, BM, BN]()
    keep = ts.RegTile[ts.bool_, BM, BN]()
    pos = ts.RegVec[ts.i32, BM]()
    inside = ts.RegVec[ts.bool_, BM]()
    ln = ts.RegVec[ts.i32, BN]()
    m = ts.RegVec[ts.f32, BN]()
    mn = ts.RegVec[ts.f32, BN]()
    safe = ts.RegVec[ts.f32, BN]()
    alpha = ts.RegVec[ts.f32, BN]()
    live = ts.RegVec[ts.bool_, BN]()
    s = ts.RegVec[ts.f32, BN]()
    ts.load(ln, LEN, at=(j,))
    ts.neg_infty(m)
    ts.zero(s)
    for r in ts.range(ts.cdiv(M, BM)):
        ts.load(x, X, at=(r, j))
        ts.mul(x, x, inv_temp)
        ts.arange(pos, r * BM)
        ts.lt(keep, ts.per_row(pos), ts.per_col(ln))
        ts.lt(inside, pos, M)                        # rows past M read zeros: a length past M must not keep them
        ts.logical_and(keep, keep, ts.per_row(inside))
        ts.where(x, keep, x, -math.inf)
        ts.col_max(mn, x, m)
        ts.gt(live, mn, -math.inf)
        ts.where(safe, live, mn, 0.0)                # a column with nothing live yet shifts by 0
        ts.sub(alpha, m, safe)
        ts.exp(alpha, alpha)
        ts.mul(s, s, alpha)
        ts.sub(x, x, ts.per_col(safe))
        ts.exp(x, x)
        ts.col_sum(s, x, s)
        ts.copy(m, mn)
    for r in ts.range(ts.cdiv(M, BM)):
        ts.load(x, X, at=(r, j))
        ts.mul(x, x, inv_temp)
        ts.arange(pos, r * BM)
        ts.lt(keep, ts.per_row(pos), ts.per_col(ln))
        ts.lt(inside, pos, M)                        # rows past M read zeros: a length past M must not keep them
        ts.logical_and(keep, keep, ts.per_row(inside))
        ts.where(x, keep, x, -math.inf)
        ts.sub(x, x, ts.per_col(m))
        ts.exp(x, x)
        ts.div(x, x, ts.per_col(s))
        ts.where(x, keep, x, 0.0)
        ts.copy(y, x)
        ts.store(Y, y, at=(r, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("temp", [1.0, 0.25, 40.0, math.inf])     # (inf: 0 x, uniform; 0 times +-inf is NaN)
@pytest.mark.parametrize(("M", "N"), [(29, 21), (8, 16), (1, 3), (0, 4)])
def test_column_softmax_with_lengths(backend, dtype, temp, M, N, rng):
    x = randn(rng, M, N, dtype=dtype) * 5
    lens = torch.from_numpy(rng.integers(0, M + 3, N)).to(I32)     # some past M (all rows), some 0
    if N > 2 and M > 3:
        x[:, 0] = -math.inf                          # a column of -inf: NaN, as torch
        x[1, 1] = -1e4 if dtype == F16 else -1e30    # a very negative score: a 0, no NaN
        x[2, 2], lens[2] = math.inf, M               # +inf in a column: NaN down it, as torch
    y = poisoned(M, N, dtype=dtype)
    launch(col_softmax, backend, x, lens, y, 1.0 / temp)
    keep = torch.arange(M)[:, None] < lens[None, :].long()
    xs = (x.double() * float(torch.tensor(1.0 / temp, dtype=torch.float32))).masked_fill(~keep, -math.inf)
    want = xs.softmax(0).masked_fill(~keep, 0.0)     # live rows all -inf (or +inf among them): NaN, as torch
    close(y, want.to(dtype), scale=2)
    assert not y[keep & want.isfinite()].isnan().any()


# ---- 6b. graphs in one tile: Floyd-Warshall (row and column k picked out by the loop counter), transitive closure --
@ts.kernel(grid=lambda D: (1,))
def floyd_warshall(D, OUT, *, N: int = 32):
    """OUT = all-pairs shortest path lengths of the (n, n) weights D (inf: no edge; n <= N): for k in range(n),
    d = min(d, d[:, k] + d[k, :]), column and row k picked out of the carried tile by compares with the counter."""
    n = D.shape[0]
    d = ts.RegTile[ts.f32, N, N]()
    t = ts.RegTile[ts.f32, N, N]()
    hit = ts.RegTile[ts.bool_, N, N]()
    idx = ts.RegVec[ts.i32, N]()
    ck = ts.RegVec[ts.f32, N]()
    rk = ts.RegVec[ts.f32, N]()
    out = ts.RegTile[OUT.dtype, N, N]()
    ts.load(d, D, at=(0, 0))
    ts.arange(idx)
    for k in ts.range(n):
        ts.eq(hit, ts.per_col(idx), k)
        ts.where(t, hit, d, math.inf)
        ts.row_min(ck, t)                            # d[:, k]
        ts.eq(hit, ts.per_row(idx), k)
        ts.where(t, hit, d, math.inf)
        ts.col_min(rk, t)                            # d[k, :]
        ts.zero(t)
        ts.add(t, t, ts.per_row(ck))
        ts.add(t, t, ts.per_col(rk))
        ts.min(d, d, t)
    ts.copy(out, d)
    ts.store(OUT, out, at=(0, 0))


@ts.kernel(grid=lambda A: (1,))
def transitive_closure(A, R, rounds: int, *, N: int = 32):
    """R = reachability (0/1) of the adjacency A (n, n), self-loops included: r = min(1, r + r @ r), ``rounds``
    times (ceil(log2 n) suffice); the product's two operands are one register tile, in A's dtype (0/1 exact)."""
    r = ts.RegTile[ts.f32, N, N]()
    rr = ts.RegTile[A.dtype, N, N]()
    p = ts.RegTile[ts.f32, N, N]()
    eye = ts.RegTile[ts.bool_, N, N]()
    idx = ts.RegVec[ts.i32, N]()
    out = ts.RegTile[R.dtype, N, N]()
    ts.load(r, A, at=(0, 0))
    ts.arange(idx)
    ts.eq(eye, ts.per_row(idx), ts.per_col(idx))
    ts.where(r, eye, 1.0, r)
    for _ in ts.range(rounds):
        ts.copy(rr, r)
        ts.zero(p)
        ts.mma_AB(p, rr, rr, p)                      # paths of two hops (counts up to N: exact)
        ts.add(r, r, p)
        ts.min(r, r, 1.0)
    ts.copy(out, r)
    ts.store(R, out, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("n", "N"), [(29, 32), (32, 32), (7, 8), (1, 8)])
def test_floyd_warshall(backend, dtype, n, N, rng):
    """Integer weights (sums exact); about half the pairs have no edge (inf), so some nodes are unreachable."""
    w = torch.from_numpy(rng.integers(0, 10, (n, n))).double()
    w[torch.from_numpy(rng.uniform(size=(n, n)) < 0.6)] = math.inf
    w.fill_diagonal_(0.0)
    out = poisoned(n, n, dtype=dtype)
    launch(floyd_warshall, backend, w.to(dtype), out, N=N)
    d = w.to(dtype).double()
    for k in range(n):
        d = torch.minimum(d, d[:, k:k + 1] + d[k:k + 1, :])
    assert torch.equal(out, d.to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("n", "N"), [(29, 32), (8, 8), (5, 8), (0, 8)])
def test_transitive_closure(backend, dtype, n, N, rng):
    """A sparse random graph and a path 0 -> 1 -> ... (reachable only through many hops); N = 8: products under 16."""
    a = torch.from_numpy(rng.uniform(size=(n, n)) < 1.5 / max(n, 1)).double()
    if n > 3:
        a[torch.arange(n - 1), torch.arange(1, n)] = 1.0
    rounds = max(math.ceil(math.log2(max(n, 1))), 1)
    r = poisoned(n, n, dtype=dtype)
    launch(transitive_closure, backend, a.to(dtype), r, rounds, N=N)
    reach = (a + torch.eye(n, dtype=torch.float64)).clamp(max=1)
    for _ in range(n):
        reach = (reach + reach @ reach).clamp(max=1)
    assert torch.equal(r, reach.to(dtype))


# ---- 7. the kernels above compiled for Hopper (sm_90a) on this CPU, by Triton and (where it lowers them) Gluon ------
AOT_CASES = {   # name -> (kernel, meta args, constants)
    "rmsnorm_bwd": (rmsnorm_bwd, (meta(4096, 4096, dtype=BF), meta(4096, dtype=BF), meta(4096, 4096, dtype=BF),
                                  meta(4096, 4096, dtype=BF), meta(4096), 1e-5), dict(BM=16, BN=128)),
    "linear_attention": (linear_attention, (meta(64, 4096, 64, dtype=BF),) * 4, dict(BT=64, D=64, E=64)),
    "linear_scan": (linear_scan, (meta(4096, 4096, dtype=BF),) * 2 + (meta(1, 4096), meta(4096, 4096, dtype=BF),
                                                                       meta(1, 4096)), dict(REVERSE=True, BC=256)),
    "rope_pairs": (rope_pairs, (meta(32, 4096, 64, dtype=BF),) * 2 + (meta(4096, 64),) * 2
                   + (meta(32, 4096, 64, dtype=BF),) * 2, dict(BS=32, D2=64)),
    "rope_swap": (rope_swap, (meta(32, 4096, 64, dtype=BF), meta(4096, 32), meta(4096, 32),
                              meta(32, 4096, 64, dtype=BF)), dict(BS=32, D=64)),
    "int4_gemm": (int4_gemm, (meta(4096, 2048, dtype=BF),) * 2 + (meta(2048, 4096, dtype=I8), meta(32, 4096),
                                                                   meta(4096, 4096, dtype=BF)),
                  dict(G=128, BM=64, BN=64, BK=16)),
    "col_softmax": (col_softmax, (meta(4096, 4096, dtype=BF), meta(4096, dtype=I32), meta(4096, 4096, dtype=BF), 0.5),
                    dict(BM=64, BN=64)),
    "floyd_warshall": (floyd_warshall, (meta(64, 64), meta(64, 64)), dict(N=64)),
    "transitive_closure": (transitive_closure, (meta(64, 64, dtype=BF), meta(64, 64, dtype=BF), 6), dict(N=64)),
}
# Gluon multiplies 16-bit operands from shared memory only (wgmma): the f32 and register-operand products are refused
# by name there (linear_attention, rope_swap, int4_gemm, transitive_closure)
GLUON_CASES = ("rmsnorm_bwd", "linear_scan", "rope_pairs", "col_softmax", "floyd_warshall")


@pytest.mark.parametrize("name", AOT_CASES)
def test_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*AOT_CASES[name])


@pytest.mark.parametrize("name", GLUON_CASES)
def test_compiles_for_sm90a_with_gluon(name):
    compile_gluon_sm90a(*AOT_CASES[name])
