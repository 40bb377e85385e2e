"""Round 10 of held-out kernels (after rounds 1-9): kernels of kinds no earlier round wrote, each on the reference
executor and Triton's interpreter against float64 torch, outputs poisoned first.

Paged-KV decode attention (a pool of physical key/value blocks and a block table per sequence: each program scans
the pool and finds, by compares against its table row, which logical block of its sequence a physical block holds;
table entries past the sequence's length padded with block 0); a KV-cache append (new tokens written at a
per-sequence start position, in place, by a one-hot product of the new tokens); rotary embedding on the first
rotary_dim of head_dim columns only (rotate-half pairs, frequencies base^(-2k / rotary_dim) made in the kernel from
runtime position ids); RMSNorm fused with per-row dynamic fp8 (e4m3) quantization; and SwiGLU's backward.
More kernels of this round are in test_heldout_round10_more.py, test_heldout_round10_linalg.py,
test_heldout_round10_quant.py and test_heldout_round10_varlen.py; all of them are
compiled for sm_90a in test_heldout_round10_aot.py.

Bugs this round found, fixed, each kept as its regression test:
- the language: a per_row / per_col vector as the first operand of a binary op (`add(t, per_row(u), x)`, as a
  user reads u + x) was refused with "a must be a tile or vector, got _PerAxis"; ops that commute take it with a
  tile b now, the others name how to broadcast it (lang.ops._binary): test_marked_vector_as_first_operand,
  test_marked_vector_first_in_an_op_that_does_not_commute_is_named;
- Triton and Gluon: a shared-tile load from a global of 6 dimensions (the conv's window view) went through the copy
  engine, whose descriptors address at most 5: the sm_90a compiles failed inside Triton's pipeliner ("TMA copies
  must have between 1 and 5 coordinates"); such globals go through pointers now, and Gluon refuses an async load
  from one by name (backends.triton.passes.uses_tma, backends.gluon.passes): test_round10_compiles_for_sm90a_*
  [conv2d_igemm], test_a_global_of_six_dimensions_is_read_through_pointers,
  test_gluon_refuses_an_async_load_from_a_global_of_six_dimensions_by_name;
- the language: `Q.shape[3] ** -0.5` (a softmax scale from a size) failed with Python's "unsupported operand
  type(s) for ** or pow(): 'Scalar' and 'float'", and `1.0 / math.sqrt(N)` said "a Scalar cannot be used as a Python
  int (tile sizes must be compile-time constants)"; a Scalar takes a constant exponent now (whole ones by products,
  others as exp2(e log2 x) in f32: ir.ops "fpow", every backend), and float() / math functions of one are refused
  saying what to write (lang.tiles.Scalar): test_powers_of_scalars,
  test_scalars_in_math_functions_and_runtime_exponents_are_named;
- Triton and Gluon: a NaN constant operand (`where(x, m, x, math.nan)`) was emitted as the bare name `nan`, a
  NameError when the kernel ran (backends.python_dsl.literal): test_nan_as_a_constant_operand
  (test_heldout_round10_linalg.py, found by its bitonic argsort);
- Triton and Gluon: a -0.0 constant (`mul(y, x, -0.0)`, `fill(y, -0.0)`, where) became +0.0: their scalar_constant
  makes every Python float equal to 0 the null value; a -0.0 is made at run time as -1.0 * 0.0 now
  (backends.python_dsl.literal, the CONST and FILL emitters): test_negative_zero_constants_keep_their_sign;
- Triton's interpreter: a float argument of -0.0 became +0.0 (passed as a Python float, a constant to Triton); the
  interpreted kernel makes it a tensor first (backends.triton.codegen._e_arg):
  test_runtime_float_argument_of_negative_zero. Open: an f64 kernel's float argument of -0.0 still does.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, I32, close, launch, randn

import tilestack.lang as ts
from tilestack.errors import TraceError

FLOAT_DTYPES = [torch.float32, F16, BF]


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. paged-KV decode attention: a block table maps each sequence's logical blocks to physical ones --------------
@ts.kernel(grid=lambda Q: (Q.shape[0] * Q.shape[1],))
def paged_decode(Q, KC, VC, BT, LEN, O, scale: float, *, BG: int = 16, BS: int = 16, NBT: int = 16, D: int = 16):
    """O[b, h] = softmax(Q[b, h] K_b^T scale) V_b for one new token: Q, O (B, Hkv, G, D) the G query heads sharing kv
    head h; KC, VC (P, Hkv, BS, D) the pool of P physical blocks of BS tokens; BT (B, G, NB) i32 sequence b's block
    table (stride 0 along G, NB <= NBT): logical block j (keys [j BS, (j + 1) BS)) lives in physical block BT[b, j];
    LEN (B, G) i32 the sequences' lengths (stride 0). Entries j with j BS >= LEN[b] are padding (any value). Every
    physical block p is visited; the table row says which logical block of b it holds, if any. A sequence of length
    0 gets 0."""
    bh = ts.block_id(0)
    b, h = bh // Q.shape[1], bh % Q.shape[1]
    q = ts.RegTile[Q.dtype, BG, D]()
    k = ts.SharedTile[Q.dtype, BS, D]()             # (shared: wgmma's b operand on Gluon)
    v = ts.SharedTile[Q.dtype, BS, D]()
    s = ts.RegTile[ts.f32, BG, BS]()
    p = ts.RegTile[Q.dtype, BG, BS]()
    acc = ts.RegTile[ts.f32, BG, D]()
    out = ts.RegTile[O.dtype, BG, D]()
    bt = ts.RegTile[ts.i32, BG, NBT]()
    jt = ts.RegTile[ts.i32, BG, NBT]()
    owned = ts.RegTile[ts.bool_, BG, NBT]()
    used = ts.RegTile[ts.bool_, BG, NBT]()
    kpos = ts.RegTile[ts.i32, BG, BS]()
    keep = ts.RegTile[ts.bool_, BG, BS]()
    jcol = ts.RegVec[ts.i32, NBT]()
    ncol = ts.RegVec[ts.i32, BS]()
    jrow = ts.RegVec[ts.i32, BG]()
    ln = ts.RegVec[ts.i32, BG]()
    m = ts.RegVec[ts.f32, BG]()
    mn = ts.RegVec[ts.f32, BG]()
    safe = ts.RegVec[ts.f32, BG]()
    live = ts.RegVec[ts.bool_, BG]()
    alpha = ts.RegVec[ts.f32, BG]()
    l_ = ts.RegVec[ts.f32, BG]()
    ts.load(q, Q, at=(b, h, 0, 0))
    ts.load(ln, LEN, at=(b, 0))
    ts.load(bt, BT, at=(b, 0, 0))
    ts.arange(jcol, 0)
    ts.arange(ncol, 0)
    ts.zero(jt)
    ts.add(jt, jt, ts.per_col(jcol))
    ts.mul(jt, jt, BS)
    ts.lt(used, jt, ts.per_row(ln))                  # table entries inside the sequence (past NB: read as 0, and
    ts.lt(owned, ts.per_col(jcol), BT.shape[2])      # cut here, so a padded 0 never claims block 0)
    ts.logical_and(used, used, owned)
    ts.neg_infty(m)
    ts.zero(l_)
    ts.zero(acc)
    for blk in ts.range(KC.shape[0]):
        ts.eq(owned, bt, blk)
        ts.logical_and(owned, owned, used)
        ts.where(jt, owned, ts.per_col(jcol), -1)
        ts.row_max(jrow, jt)                         # the logical block b keeps in `blk`, or -1
        ts.zero(kpos)
        ts.add(kpos, kpos, ts.per_row(jrow))
        ts.mul(kpos, kpos, BS)
        ts.add(kpos, kpos, ts.per_col(ncol))
        ts.lt(keep, kpos, ts.per_row(ln))
        ts.ge(live, jrow, 0)
        ts.logical_and(keep, keep, ts.per_row(live))
        ts.load(k, KC, at=(blk, h, 0, 0))
        ts.load(v, VC, at=(blk, h, 0, 0))
        ts.zero(s)
        ts.mma_ABt(s, q, k, s)
        ts.mul(s, s, scale)
        ts.where(s, keep, s, -math.inf)
        ts.row_max(mn, s, m)
        ts.gt(live, mn, -math.inf)
        ts.where(safe, live, mn, 0.0)
        ts.sub(alpha, m, safe)
        ts.exp(alpha, alpha)
        ts.mul(l_, l_, alpha)
        ts.sub(s, s, ts.per_row(safe))
        ts.exp(s, s)
        ts.row_sum(l_, s, l_)
        ts.mul(acc, acc, ts.per_row(alpha))
        ts.copy(p, s)
        ts.mma_AB(acc, p, v, acc)
        ts.copy(m, mn)
    ts.gt(live, l_, 0.0)
    ts.where(safe, live, l_, 1.0)
    ts.div(acc, acc, ts.per_row(safe))
    ts.copy(out, acc)
    ts.store(O, out, at=(b, h, 0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("lens", "Hkv", "G", "P"), [((37, 0, 9), 1, 4, 5), ((1,), 1, 7, 3), ((0, 0), 2, 2, 2)])
def test_paged_decode_attention(backend, dtype, lens, Hkv, G, P, rng):
    """Physical blocks handed out in a random order (a sequence's blocks scattered over the pool, some unused);
    padded table entries are 0 (block 0 belongs to another sequence); queries scaled by 6 so one key dominates."""
    lens = torch.tensor(lens, dtype=I32)
    nb = [-(-int(n) // 16) for n in lens]
    NB = max(max(nb), 1)
    perm = torch.from_numpy(rng.permutation(P)).to(I32)
    table = torch.zeros(len(lens), NB, dtype=I32)
    used = 0
    for i, n in enumerate(nb):
        table[i, :n] = perm[used:used + n]
        used += n
    Bn, D = len(lens), 16
    q = randn(rng, Bn, Hkv, G, D, dtype=dtype) * 6
    kc, vc = randn(rng, P, Hkv, 16, D, dtype=dtype), randn(rng, P, Hkv, 16, D, dtype=dtype)
    o = poisoned(Bn, Hkv, G, D, dtype=dtype)
    launch(paged_decode, backend, q, kc, vc, table[:, None, :].expand(Bn, G, NB), lens[:, None].expand(Bn, G), o,
           D ** -0.5)
    for i in range(Bn):
        n = int(lens[i])
        if n == 0:
            want = torch.zeros(Hkv, G, D, dtype=torch.float64)
        else:
            kk = torch.cat([kc[int(t)] for t in table[i, :nb[i]]], dim=1)[:, :n].double()   # (Hkv, n, D)
            vv = torch.cat([vc[int(t)] for t in table[i, :nb[i]]], dim=1)[:, :n].double()
            want = (q[i].double() @ kk.transpose(1, 2) * D ** -0.5).softmax(-1) @ vv
        close(o[i], want.to(dtype), scale=4)


# ---- 2. a KV-cache append: T new tokens written at rows POS[b] .. POS[b] + T - 1 of sequence b's cache, in place ----
@ts.kernel(grid=lambda C, BM: (ts.cdiv(C.shape[2], BM), C.shape[0] * C.shape[1]))
def kv_append(C, NEW, POS, *, BM: int = 16, BT: int = 16, D: int = 16):
    """C (B, H, Smax, D) the cache, updated in place; NEW (B, H, T, D); POS (B, BM) i32 the start rows (stride 0).
    Row r of a cache block takes new token r - POS[b] when that is in [0, T) (a one-hot (BM, BT) product, exact in
    the cache's dtype), else keeps its value; rows past Smax are dropped."""
    i, bh = ts.block_id(0), ts.block_id(1)
    b, h = bh // C.shape[1], bh % C.shape[1]
    c = ts.RegTile[C.dtype, BM, D]()
    nt = ts.SharedTile[C.dtype, BT, D]()
    sel = ts.RegTile[C.dtype, BM, BT]()
    hit = ts.RegTile[ts.bool_, BM, BT]()
    acc = ts.RegTile[ts.f32, BM, D]()
    rel = ts.RegVec[ts.i32, BM]()
    pos = ts.RegVec[ts.i32, BM]()
    tcol = ts.RegVec[ts.i32, BT]()
    inside = ts.RegVec[ts.bool_, BM]()
    upper = ts.RegVec[ts.bool_, BM]()
    ts.load(c, C, at=(b, h, i, 0))
    ts.load(pos, POS, at=(b, 0))
    ts.arange(rel, i * BM)
    ts.sub(rel, rel, pos)                            # each cache row's index among the new tokens
    ts.zero(acc)
    for t in ts.range(ts.cdiv(NEW.shape[2], BT)):
        ts.load(nt, NEW, at=(b, h, t, 0))
        ts.arange(tcol, t * BT)
        ts.eq(hit, ts.per_row(rel), ts.per_col(tcol))
        ts.where(sel, hit, 1.0, 0.0)
        ts.mma_AB(acc, sel, nt, acc)
    ts.ge(inside, rel, 0)
    ts.lt(upper, rel, NEW.shape[2])
    ts.logical_and(inside, inside, upper)
    ts.where(c, ts.per_row(inside), acc, c)
    ts.store(C, c, at=(b, h, i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("B", "H", "S", "T"), [(3, 2, 45, 7), (1, 3, 33, 0), (2, 2, 40, 20)])
def test_kv_cache_append(backend, dtype, B, H, S, T, rng):
    """Start rows 0, S - T (the last rows) and random; the new tokens hold the format's extremes (a product with
    one-hot rows must not round them); the old cache is kept everywhere else, bit for bit."""
    D = 16
    big = torch.finfo(dtype).max
    cache = randn(rng, B, H, S, D, dtype=dtype)
    new = randn(rng, B, H, T, D, dtype=dtype)
    if T:
        new[..., 0, 0], new[..., -1, 1] = big, -big
        new[..., 0, 2] = torch.finfo(dtype).tiny
    pos = torch.from_numpy(rng.integers(0, S - T + 1, B)).to(I32)
    pos[0] = 0
    if B > 1:
        pos[1] = S - T
    want = cache.clone()
    for i in range(B):
        want[i, :, int(pos[i]):int(pos[i]) + T] = new[i]
    launch(kv_append, backend, cache, new, pos[:, None].expand(B, 16))
    assert torch.equal(cache, want)


# ---- 3. partial rotary embedding: the first RD of Dh columns rotated (rotate-half pairs), the rest copied ----------
@ts.kernel(grid=lambda X, BT: (ts.cdiv(X.shape[1], BT), X.shape[0]))
def rope_partial(X, POS, Y, log2_base: float, *, RD: int = 16, BT: int = 16):
    """X, Y (H, T, Dh) views of (T, H, Dh) tensors; POS (H, T) i32 position ids (stride 0 along H). Columns k and
    k + RD/2 (k < RD/2) rotate by theta = pos base^(-2k / RD): y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin; columns
    from RD on are copied. Tiles are RD/2 wide, so column tile 0 is x1, 1 is x2, 2.. the copied rest."""
    HALF = RD // 2
    i, h = ts.block_id(0), ts.block_id(1)
    x1 = ts.RegTile[ts.f32, BT, HALF]()
    x2 = ts.RegTile[ts.f32, BT, HALF]()
    th = ts.RegTile[ts.f32, BT, HALF]()
    cs = ts.RegTile[ts.f32, BT, HALF]()
    sn = ts.RegTile[ts.f32, BT, HALF]()
    y = ts.RegTile[ts.f32, BT, HALF]()
    out = ts.RegTile[Y.dtype, BT, HALF]()
    pt = ts.RegTile[X.dtype, BT, HALF]()
    pos = ts.RegVec[ts.f32, BT]()
    posi = ts.RegVec[ts.i32, BT]()
    freq = ts.RegVec[ts.f32, HALF]()
    ts.load(posi, POS, at=(h, i))
    ts.copy(pos, posi)
    ts.arange(freq, 0)
    ts.mul(freq, freq, -2.0 * log2_base / RD)
    ts.exp2(freq, freq)                              # base^(-2k / RD)
    ts.zero(th)
    ts.add(th, th, ts.per_row(pos))
    ts.mul(th, th, ts.per_col(freq))
    ts.cos(cs, th)
    ts.sin(sn, th)
    ts.load(x1, X, at=(h, i, 0))
    ts.load(x2, X, at=(h, i, 1))
    ts.mul(y, x1, cs)
    ts.mul(th, x2, sn)
    ts.sub(y, y, th)
    ts.copy(out, y)
    ts.store(Y, out, at=(h, i, 0))
    ts.mul(y, x2, cs)
    ts.mul(th, x1, sn)
    ts.add(y, y, th)
    ts.copy(out, y)
    ts.store(Y, out, at=(h, i, 1))
    for j in ts.range(2, ts.cdiv(X.shape[2], HALF)):
        ts.load(pt, X, at=(h, i, j))
        ts.store(Y, pt, at=(h, i, j))


def rope_partial_ref(x, pos, rd, base):
    """x (T, H, Dh), pos (T,): the rotated float64 result."""
    half = rd // 2
    inv = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / rd)
    th = pos.double()[:, None] * inv[None, :]                         # (T, half)
    c, s = th.cos()[:, None, :], th.sin()[:, None, :]
    x = x.double()
    x1, x2 = x[..., :half], x[..., half:rd]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, x[..., rd:]], dim=-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("T", "H", "Dh", "RD"), [(37, 3, 40, 16), (5, 2, 64, 32), (0, 2, 24, 8)])
def test_rope_partial_rotary(backend, dtype, T, H, Dh, RD, rng):
    """Position ids out of order, 0 and up to 2047 (decode with a cache offset); the copied columns hold inf and
    NaN (copied as they are, not rotated); base 10000 and 500000 (Llama 3)."""
    base = 10000.0 if RD != 32 else 500000.0
    x = randn(rng, T, H, Dh, dtype=dtype) * 3
    if T and Dh > RD:
        x[0, 0, RD], x[-1, -1, -1] = math.inf, math.nan
    pos = torch.from_numpy(rng.integers(0, 2048, T)).to(I32)
    if T:
        pos[0] = 0
    y = poisoned(T, H, Dh, dtype=dtype)
    launch(rope_partial, backend, x.transpose(0, 1), pos[None, :].expand(H, T), y.transpose(0, 1),
           math.log2(base), RD=RD)
    # (angles up to 2047 rad made in f32, as the GPU makes them: ~1e-4 rad off, times |x| up to ~15)
    close(y, rope_partial_ref(x, pos, RD, base).to(dtype), scale=300 if dtype is torch.float32 else 8)


# ---- 4. RMSNorm fused with dynamic per-row fp8 quantization: scale = amax(y) / 448, q = e4m3(y / scale) -----------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def rmsnorm_fp8(X, W, Q, SCALE, eps: float, *, BM: int = 8, BN: int = 16):
    """y = x rsqrt(mean(x^2) + eps) w over rows of X (M, N) wider than a tile, three passes over the column tiles:
    the sum of squares, the row's amax of |y|, then Q (M, N) e4m3 = y / SCALE saturated, SCALE (M,) f32 =
    max(amax, 1e-12) / 448 (a zero row: q 0)."""
    i = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, BN]()
    t = ts.RegTile[ts.f32, BM, BN]()
    q = ts.RegTile[ts.f8e4m3, BM, BN]()
    w = ts.RegVec[ts.f32, BN]()
    ss = ts.RegVec[ts.f32, BM]()
    rstd = ts.RegVec[ts.f32, BM]()
    amax = ts.RegVec[ts.f32, BM]()
    nj = ts.cdiv(X.shape[1], BN)
    ts.zero(ss)
    for j in ts.range(nj):
        ts.load(x, X, at=(i, j))
        ts.mul(t, x, x)
        ts.row_sum(ss, t, ss)
    ts.div(rstd, ss, X.shape[1])
    ts.add(rstd, rstd, eps)
    ts.rsqrt(rstd, rstd)
    ts.zero(amax)
    for j in ts.range(nj):
        ts.load(x, X, at=(i, j))
        ts.load(w, W, at=(j,))
        ts.mul(t, x, ts.per_row(rstd))
        ts.mul(t, t, ts.per_col(w))
        ts.abs(t, t)
        ts.row_max(amax, t, amax)
    ts.max(amax, amax, 1e-12)
    ts.div(amax, amax, 448.0)
    ts.store(SCALE, amax, at=(i,))
    ts.div(rstd, rstd, amax)                         # fold 1 / scale into the row factor
    for j in ts.range(nj):
        ts.load(x, X, at=(i, j))
        ts.load(w, W, at=(j,))
        ts.mul(t, x, ts.per_row(rstd))
        ts.mul(t, t, ts.per_col(w))
        ts.copy(q, t)
        ts.store(Q, q, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("M", "N"), [(19, 45), (1, 7), (0, 20)])
def test_rmsnorm_fp8_quant(backend, dtype, M, N, rng):
    """Rows of very different magnitudes (1e-3 .. the format's large values), a zero row, a weight with a 0; the
    e4m3 values are within one e4m3 step (2^-3 relative) of torch's, the scales within f32 rounding."""
    x = randn(rng, M, N, dtype=torch.float64)
    if M > 2:
        x[0] *= 1e-3
        x[1] *= 1e4 if dtype is not F16 else 1e2
        x[2] = 0
    x = x.to(dtype)
    w = randn(rng, N, dtype=torch.float32)
    w[0] = 0
    qo = torch.full((M, N), 1.0, dtype=torch.float8_e4m3fn)
    sc = poisoned(M)
    launch(rmsnorm_fp8, backend, x, w, qo, sc, 1e-6)
    xd = x.double()
    y = xd * (xd.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt() * w.double()
    want_sc = y.abs().amax(-1).clamp_min(1e-12) / 448
    close(sc, want_sc.float(), dtype=torch.float32, scale=10)
    want_q = (y / want_sc[:, None]).float().to(torch.float8_e4m3fn)
    torch.testing.assert_close(qo.float(), want_q.float(), rtol=0.126, atol=2.0 ** -9)
    assert not qo.float().isnan().any()


# ---- 5. SwiGLU's backward: y = silu(a) b; da = dy b s (1 + a (1 - s)), db = dy silu(a), s = sigmoid(a) -----------
@ts.kernel(grid=lambda A, BM, BN: (ts.cdiv(A.shape[0], BM), ts.cdiv(A.shape[1], BN)))
def swiglu_bwd(A, B, DY, DA, DB, *, BM: int = 16, BN: int = 16):
    """A, B, DY, DA, DB (M, N); math in f32."""
    i, j = ts.block_id(0), ts.block_id(1)
    a = ts.RegTile[ts.f32, BM, BN]()
    b = ts.RegTile[ts.f32, BM, BN]()
    dy = ts.RegTile[ts.f32, BM, BN]()
    s = ts.RegTile[ts.f32, BM, BN]()
    da = ts.RegTile[DA.dtype, BM, BN]()
    db = ts.RegTile[DB.dtype, BM, BN]()
    ts.load(a, A, at=(i, j))
    ts.load(b, B, at=(i, j))
    ts.load(dy, DY, at=(i, j))
    ts.sigmoid(s, a)
    ts.copy(db, dy * a * s)
    ts.copy(da, dy * b * s * (1.0 + a * (1.0 - s)))
    ts.store(DA, da, at=(i, j))
    ts.store(DB, db, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("M", "N"), [(21, 37), (1, 1), (0, 5)])
def test_swiglu_backward(backend, dtype, M, N, rng):
    """Gates up to +-80 (sigmoid saturated both ways: da -> dy b and -> 0), against torch.autograd in float64."""
    a = (randn(rng, M, N, dtype=torch.float64) * 8).clamp(-80, 80).to(dtype)
    if M and N > 1:
        a[0, 0], a[0, 1] = 80.0, -80.0
    b, dy = randn(rng, M, N, dtype=dtype), randn(rng, M, N, dtype=dtype)
    da, db = poisoned(M, N, dtype=dtype), poisoned(M, N, dtype=dtype)
    launch(swiglu_bwd, backend, a, b, dy, da, db)
    ad, bd = a.double().requires_grad_(), b.double().requires_grad_()
    (F.silu(ad) * bd).backward(dy.double())
    close(da, ad.grad.to(dtype), scale=4)
    close(db, bd.grad.to(dtype), scale=4)


# ---- 6. a marked vector as the first operand: outer sums and products (v_r + u_c, v_r u_c) by commuting ops -------
@ts.kernel(grid=lambda X: (1,))
def outer_ops(X, U, V, S, P, *, BM: int = 16, BN: int = 16):
    """S = (u_r + X) max v_c, P = v_c X u_r for X (M, N), U (M,), V (N,): the vectors written first, as a user
    reads `u + X`."""
    x = ts.RegTile[X.dtype, BM, BN]()
    t = ts.RegTile[X.dtype, BM, BN]()
    u = ts.RegVec[X.dtype, BM]()
    v = ts.RegVec[X.dtype, BN]()
    ts.load(x, X, at=(0, 0))
    ts.load(u, U, at=(0,))
    ts.load(v, V, at=(0,))
    ts.add(t, ts.per_row(u), x)
    ts.max(t, ts.per_col(v), t)
    ts.store(S, t, at=(0, 0))
    ts.mul(t, ts.per_col(v), x)
    ts.mul(t, ts.per_row(u), t)
    ts.store(P, t, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, I32])
def test_marked_vector_as_first_operand(backend, dtype, rng):
    """Was refused as "mul: a must be a tile or vector, got _PerAxis" (ops._binary took marked vectors as b only)."""
    M, N = 11, 13
    x = (randn(rng, M, N) * 8).to(dtype)
    u, v = (randn(rng, M) * 8).to(dtype), (randn(rng, N) * 8).to(dtype)
    s, p = torch.zeros(M, N, dtype=dtype), torch.zeros(M, N, dtype=dtype)
    launch(outer_ops, backend, x, u, v, s, p)
    assert torch.equal(s, torch.maximum(u[:, None] + x, v[None, :].expand(M, N)))
    torch.testing.assert_close(p, v[None, :] * x * u[:, None])


def test_marked_vector_first_in_an_op_that_does_not_commute_is_named():
    @ts.kernel(grid=lambda X: (1,))
    def bad(X, V, *, BM: int = 16):
        t = ts.RegTile[ts.f32, BM, BM]()
        v = ts.RegVec[ts.f32, BM]()
        ts.load(v, V, at=(0,))
        ts.sub(t, ts.per_col(v), 1.0)
        ts.store(X, t, at=(0, 0))

    with pytest.raises(TraceError, match=r"sub: a is per_col\(v\).*zero\(t\); add\(t, t, per_col\(v\)\); "
                                         r"sub\(dst, t, b\)"):
        bad.trace(torch.empty(4, 4), torch.empty(4))


# ---- 7. powers of sizes and float arguments: a softmax scale from a shape, `N ** -0.5`, `N ** 2`, `t ** 1.5` --------
@ts.kernel(grid=lambda X: (1,))
def scalar_powers(X, Y, t: float, *, BN: int = 8):
    """Y[k] = X[k] times the k-th power below, X and Y (8,) f32; D = X.shape[0] (a size: known at run time)."""
    D = X.shape[0]
    x = ts.RegVec[ts.f32, BN]()
    y = ts.RegVec[ts.f32, BN]()
    col = ts.RegVec[ts.i32, BN]()
    hit = ts.RegVec[ts.bool_, BN]()
    ts.load(x, X, at=(0,))
    ts.arange(col, 0)
    ts.zero(y)
    for k, p in enumerate((D ** -0.5, D ** 2, D ** 3 * 1.0, t ** 1.5, t ** -2, t ** 0, D ** 0.25, t ** 2.0)):
        ts.eq(hit, col, k)
        ts.where(y, hit, p, y)
    ts.mul(y, y, x)
    ts.store(Y, y, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [3.0, 0.5, 0.0])
def test_powers_of_scalars(backend, t):
    """Were refused: `**` of a Scalar ("unsupported operand type(s) for ** or pow(): 'Scalar' and 'float'"), so a
    user could not write `Q.shape[3] ** -0.5`. t = 0: 0 ** 1.5 = 0, 0 ** -2 = inf, 0 ** 0 = 1."""
    x = torch.ones(8)
    y = torch.full((8,), math.nan)
    launch(scalar_powers, backend, x, y, t)
    D = 8.0
    inf = math.inf
    want = torch.tensor([D ** -0.5, D ** 2, D ** 3, t ** 1.5, 1 / t ** 2 if t else inf, 1.0, D ** 0.25, t ** 2.0],
                        dtype=torch.float64)
    torch.testing.assert_close(y.double(), want, rtol=2e-6, atol=0)


def test_scalars_in_math_functions_and_runtime_exponents_are_named():
    """math.sqrt(N) said "a Scalar cannot be used as a Python int (tile sizes must be compile-time constants)"."""
    def make(expr):
        @ts.kernel(grid=lambda X: (1,))
        def k(X, Y, *, BN: int = 8):
            y = ts.RegVec[ts.f32, BN]()
            ts.fill(y, expr(X.shape[0]))
            ts.store(Y, y, at=(0,))
        return k

    args = (torch.empty(8), torch.empty(8))
    with pytest.raises(TraceError, match=r"math functions cannot take it: use Scalar arithmetic .*N \*\* -0.5"):
        make(lambda n: 1.0 / math.sqrt(n)).trace(*args)
    with pytest.raises(TraceError, match=r"`-2 \*\* <Scalar>`: a run-time exponent takes a constant, positive"):
        make(lambda n: (-2) ** n).trace(*args)
    for backend in ("reference", "triton"):     # a positive base: exp2(N log2 b), filled into the tile at run time
        y = torch.full((8,), float("nan"))
        make(lambda n: 2 ** n + 0.5 ** (n - 5))(torch.empty(8), y, backend=backend)
        assert torch.equal(y, torch.full((8,), 256.0 + 0.125)), (backend, y)
    with pytest.raises(TraceError, match=r"`\*\*` of a Scalar takes a constant, finite exponent.*got Scalar"):
        make(lambda n: n ** (n * 1.0)).trace(*args)
