"""Round 10 of held-out kernels, continued (see test_heldout_round10.py's docstring): quantized products and sampling.
An fp8 (e4m3) GEMM with DeepSeek-style block scales (one scale per row and K block of A, one per (N block, K block)
of B; each K block's product scaled before it is added), an AWQ-style int4 GEMM (two 4-bit codes of consecutive K
rows to a uint8, group-wise f16 scales and uint8 zero points: w = (q - z) s; the activations' even and odd columns
as two strided views), and Gumbel-max sampling (argmax of logits / T - log(-log u), u Philox uniforms that a second
kernel writes out, ties to the first index).
"""

import math

import pytest
import torch
from heldout_support import BACKENDS, BF, F16, I64, close, launch, randn

import tilestack.lang as ts

F8 = torch.float8_e4m3fn


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. fp8 GEMM with block scales: C = sum_kb (A_kb B_kb^T) SA[:, kb] SB[nb, kb] ----------------------------------
@ts.kernel(grid=lambda C, BM, BN: (ts.cdiv(C.shape[0], BM), ts.cdiv(C.shape[1], BN)))
def fp8_block_gemm(A, B, SAT, SB, C, *, QB: int = 32, BM: int = 16, BN: int = 16):
    """A (M, K) e4m3, B (N, K) e4m3; SAT (KB, M) f32 A's scales transposed (row kb: K block kb's scale of each row);
    SB (NB, KB, BN) f32 B's scale of (N block, K block), expanded along its last axis (stride 0) so a program reads
    it as a vector; C (M, N). K blocks of QB; BN divides QB (a program's columns share one N block)."""
    i, j = ts.block_id(0), ts.block_id(1)
    nb = (j * BN) // QB
    a = ts.SharedTile[ts.f8e4m3, BM, QB]()
    b = ts.SharedTile[ts.f8e4m3, BN, QB]()
    part = ts.RegTile[ts.f32, BM, BN]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    out = ts.RegTile[C.dtype, BM, BN]()
    sa = ts.RegVec[ts.f32, BM]()
    sb = ts.RegVec[ts.f32, BN]()
    ts.zero(acc)
    for kb in ts.range(ts.cdiv(A.shape[1], QB)):
        ts.load(a, A, at=(i, kb))
        ts.load(b, B, at=(j, kb))
        ts.load(sa, SAT, at=(kb, i))
        ts.load(sb, SB, at=(nb, kb, 0))
        ts.zero(part)
        ts.mma_ABt(part, a, b, part)
        ts.mul(part, part, ts.per_row(sa))
        ts.mul(part, part, ts.per_col(sb))
        ts.add(acc, acc, part)
    ts.copy(out, acc)
    ts.store(C, out, at=(i, j))


def quant_blocks(x, rows, qb):
    """x (R, K) float64 -> (e4m3 codes, scales (cdiv(R, rows), cdiv(K, qb))): each (rows, qb) block scaled so its
    amax is 448."""
    R, K = x.shape
    nr, nk = -(-R // rows), -(-K // qb)
    s = torch.ones(nr, nk, dtype=torch.float64)
    q = torch.empty(R, K, dtype=F8)
    for r in range(nr):
        for k in range(nk):
            blk = x[r * rows:(r + 1) * rows, k * qb:(k + 1) * qb]
            s[r, k] = blk.abs().max().clamp_min(1e-12) / 448
            q[r * rows:(r + 1) * rows, k * qb:(k + 1) * qb] = (blk / s[r, k]).to(F8)
    return q, s.float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.float32, BF])
@pytest.mark.parametrize(("M", "N", "K"), [(21, 40, 70), (5, 7, 3), (0, 16, 32)])
def test_fp8_block_scaled_gemm(backend, out_dtype, M, N, K, rng):
    """A's blocks of very different magnitudes (1e-4 .. 1e4 across K blocks), per-token scales (1 row, QB columns)
    for A and (QB, QB) blocks for B; against the float64 product of the dequantized operands."""
    QB = 32
    x = randn(rng, M, K, dtype=torch.float64) * (10.0 ** torch.from_numpy(rng.integers(-4, 5, (1, K))))
    w = randn(rng, N, K, dtype=torch.float64)
    qa, sa = quant_blocks(x, 1, QB)                  # (M, KB)
    qb, sb = quant_blocks(w, QB, QB)                 # (NB, KB)
    c = poisoned(M, N, dtype=out_dtype)
    sbx = sb[:, :, None].expand(sb.shape[0], sb.shape[1], 16)
    launch(fp8_block_gemm, backend, qa, qb, sa.t().contiguous(), sbx, c, QB=QB)
    da = qa.double() * sa.double().repeat_interleave(QB, 1)[:, :K]
    db = qb.double() * sb.double().repeat_interleave(QB, 0).repeat_interleave(QB, 1)[:N, :K]
    want = da @ db.t()
    scale = 1.0 + want.abs().max().item() if M else 1.0
    close(c, want.to(out_dtype), dtype=out_dtype, scale=scale)


# ---- 2. AWQ-style int4 GEMM: uint8 bytes of two K rows, group-wise scales and zero points ---------------------------
@ts.kernel(grid=lambda Y, BM, BN: (ts.cdiv(Y.shape[0], BM), ts.cdiv(Y.shape[1], BN)))
def int4_zp_gemm(XE, XO, QW, S, Z, Y, *, G: int = 32, BM: int = 16, BN: int = 16, BK2: int = 16):
    """Y = X W for XE, XO (M, K/2) X's even and odd columns (strided views); QW (K/2, N) u8, byte row r holding
    W[2r] in its low nibble and W[2r + 1] in its high one; S (K/G, N) f16 scales, Z (K/G, N) u8 zero points;
    W[k, n] = (q - Z[k // G, n]) S[k // G, n], rounded to X's dtype for the product. A step takes BK2 byte rows,
    2 BK2 K rows of one group (2 BK2 divides G)."""
    i, j = ts.block_id(0), ts.block_id(1)
    q = ts.RegTile[ts.u8, BK2, BN]()
    nib = ts.RegTile[ts.u8, BK2, BN]()
    wf = ts.RegTile[ts.f32, BK2, BN]()
    w = ts.SharedTile[XE.dtype, BK2, BN]()
    xe = ts.SharedTile[XE.dtype, BM, BK2]()
    xo = ts.SharedTile[XE.dtype, BM, BK2]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    out = ts.RegTile[Y.dtype, BM, BN]()
    s = ts.RegVec[ts.f32, BN]()
    z = ts.RegVec[ts.f32, BN]()
    ts.zero(acc)
    for kk in ts.range(ts.cdiv(QW.shape[0], BK2)):
        g = (kk * 2 * BK2) // G
        ts.load(q, QW, at=(kk, j))
        ts.load(s, S, at=(g, j))
        ts.load(z, Z, at=(g, j))
        ts.load(xe, XE, at=(i, kk))
        ts.load(xo, XO, at=(i, kk))
        for half in (0, 1):                          # (unrolled when traced: low nibbles, then high ones)
            if half == 0:
                ts.bit_and(nib, q, 15)
            else:
                ts.shr(nib, q, 4)
            ts.copy(wf, nib)
            ts.sub(wf, wf, ts.per_col(z))
            ts.mul(wf, wf, ts.per_col(s))
            ts.copy(w, wf)                           # (into shared: wgmma's b operand on Gluon)
            ts.mma_AB(acc, xe if half == 0 else xo, w, acc)
    ts.copy(out, acc)
    ts.store(Y, out, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F16, BF])
@pytest.mark.parametrize(("M", "K", "N", "G"), [(19, 96, 40, 32), (1, 64, 16, 64), (3, 20, 5, 32), (0, 32, 8, 32)])
def test_int4_zero_point_gemm(backend, dtype, M, K, N, G, rng):
    """Every code 0..15 and zero point 0..15 (w from -15 s to 15 s), scales from 1e-3 to 1; K not a multiple of
    the step (20: a partial group and byte rows past the end) and a group of 64 (two steps); no rows."""
    codes = torch.from_numpy(rng.integers(0, 16, (K, N))).to(torch.uint8)
    zeros = torch.from_numpy(rng.integers(0, 16, (-(-K // G), N))).to(torch.uint8)
    scales = (torch.from_numpy(rng.random((-(-K // G), N))) * 10.0 ** -torch.from_numpy(
        rng.integers(0, 4, (-(-K // G), N)))).to(F16)
    packed = codes[0::2] | (codes[1::2] << 4)                          # (K/2, N)
    x = randn(rng, M, K, dtype=dtype)
    y = poisoned(M, N, dtype=dtype)
    launch(int4_zp_gemm, backend, x[:, 0::2], x[:, 1::2], packed, scales, zeros, y, G=G)
    zf = zeros.double().repeat_interleave(G, 0)[:K]
    sf = scales.double().repeat_interleave(G, 0)[:K]
    w = ((codes.double() - zf) * sf).to(dtype).double()                # as the kernel rounds it
    close(y, (x.double() @ w).to(dtype), scale=8)


# ---- 3. Gumbel-max sampling: argmax_j (x_j / T - log(-log u_j)), u the Philox uniform of (row, j) --------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def gumbel_sample(X, OUT, U, inv_t: float, seed: int, *, WRITE_U: bool = False, BM: int = 4, BN: int = 32):
    """OUT (M,) i64: each row's sample over X (M, V), online over column tiles (the first index of the max; a row
    of -inf logits gives 0); u drawn at counter row V + col. WRITE_U: instead write u into U (M, V) f32, so a test
    can make the same draw in float64."""
    i = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, BN]()
    u = ts.RegTile[ts.f32, BM, BN]()
    idx = ts.RegTile[ts.i64, BM, BN]()
    hit = ts.RegTile[ts.bool_, BM, BN]()
    col = ts.RegVec[ts.i64, BN]()
    best = ts.RegVec[ts.f32, BM]()
    arg = ts.RegVec[ts.i64, BM]()
    tm = ts.RegVec[ts.f32, BM]()
    ta = ts.RegVec[ts.i64, BM]()
    better = ts.RegVec[ts.bool_, BM]()
    ts.neg_infty(best)
    ts.zero(arg)
    for j in ts.range(ts.cdiv(X.shape[1], BN)):
        ts.rand(u, seed, 0, row=i * BM, col=j * BN, stride=X.shape[1])
        if WRITE_U:
            ts.store(U, u, at=(i, j))
        else:
            ts.load(x, X, at=(i, j))
            ts.log(u, u)
            ts.neg(u, u)
            ts.log(u, u)                             # log(-log u); u = 0 gives +inf: that logit is dropped
            ts.mul(x, x, inv_t)
            ts.sub(x, x, u)
            ts.arange(col, j * BN)
            ts.lt(hit, ts.per_col(col), X.shape[1])
            ts.where(x, hit, x, -math.inf)
            ts.row_max(tm, x)
            ts.eq(hit, x, ts.per_row(tm))
            ts.where(idx, hit, ts.per_col(col), 2 ** 62)
            ts.row_min(ta, idx)                      # the first column holding the tile's max
            ts.gt(better, tm, best)                  # (strictly: an earlier tile keeps a tie)
            ts.where(arg, better, ta, arg)
            ts.max(best, best, tm)
    if not WRITE_U:
        ts.store(OUT, arg, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F16, BF])
@pytest.mark.parametrize(("M", "V", "T"), [(9, 70, 1.0), (3, 5, 0.25), (0, 8, 1.0)])
def test_gumbel_max_sampling(backend, dtype, M, V, T, rng):
    """The uniforms written by the same kernel (WRITE_U) give the float64 argmax to compare with; one row of -inf
    but one logit (that one is sampled), one row of -inf only (index 0)."""
    x = randn(rng, M, V, dtype=dtype) * 3
    if M > 2:
        x[1] = -math.inf
        x[1, V // 2] = 0
        x[2] = -math.inf
    seed = int(rng.integers(0, 2**31))
    u = poisoned(M, V)
    out = torch.full((M,), -7, dtype=I64)
    launch(gumbel_sample, backend, x, out, u, 1.0 / T, seed, WRITE_U=True)
    launch(gumbel_sample, backend, x, out, u, 1.0 / T, seed)
    assert ((u >= 0) & (u < 1)).all()
    g = x.double() / T - (-u.double().log()).log()
    want = g.argmax(-1) if M else torch.zeros(0, dtype=I64)
    if M > 2:
        assert int(out[1]) == V // 2 and int(out[2]) == 0
        want[2] = 0
    live = g.amax(-1) > -math.inf if M else torch.zeros(0, dtype=torch.bool)
    assert ((out >= 0) & (out < V)).all()
    picked = g.gather(1, out[:, None].clamp(0, max(V - 1, 0)))[:, 0] if M else g.new_zeros(0)
    # the sample is the float64 argmax, or (f32 work) a value within f32 rounding of the max
    ok = (out == want) | (live & (picked >= g.amax(-1) - 1e-5 * (1 + g.amax(-1).abs())))
    assert ok.all(), (out, want)
