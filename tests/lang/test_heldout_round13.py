"""Round 13 of held-out kernels (after rounds 2-12): kernels whose loop bounds and tile coordinates come from memory
through ``ts.load_scalar``, each on the reference executor and Triton's interpreter against float64 torch, outputs
poisoned (NaN) first, seeds fixed (the ``rng`` fixture).

Packed (varlen) causal attention with an online softmax: a program per aligned query tile of the packed token axis
finds the sequences its rows belong to by a binary search over cu_seqlens (unrolled at trace time, each probe a
load_scalar) and loops over key tiles from its first sequence's start only; paged-KV decode attention (a block table
of page ids, per-sequence context lengths, grouped query heads, the last page partly filled); an MoE grouped GEMM (rows
sorted by expert, each expert's segment padded to the row tile, a tile's expert id and the segment's end read from
memory, the weight tile of that expert of an (E, K, N) tensor); CSR sparse times dense (row pointers, column indices
and values read one element at a time, the dense rows gathered a row tile at a time). More kernels of this round are
in test_heldout_round13_more.py; the sm_90a compiles in test_heldout_round13_aot.py.

What this round found (each fixed, the test kept): a tile coordinate read from an int64 tensor (a paged cache's block
table, int64 cu_seqlens bounding a loop) failed in Triton and Gluon, whose copy engine takes 32-bit coordinates only,
and a stale int32 page id of 2**28 times the tile size wrapped back to page 0 instead of reading zeros (64c4471: such
coordinates are scaled in 64 bits and saturated); a tensor with an axis past 2**31 went through the copy engine, which
cannot reach past row 2**31 (0f9bc04); Gluon's pipelined loop bounded by int64 values indexed its ring with an i64
(4bbb027); the cost analysis counted a whole tile for a tile coordinate of -1 (c2f7374); cost() crashed in torch given a
meta tensor to read scalars from, and would have copied an expanded index tensor out whole (ae4bb90).
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, I32, I64, close, launch, randn

import tilestack.lang as ts


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261313)


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


def le01(a, b):
    """1 where index a <= index b, else 0 (index Scalars or ints): a branch-free compare for index arithmetic."""
    return ts.smin(ts.smax(b - a + 1, 0), 1)


def find_segment(CU, row, steps: int):
    """The largest b in [0, CU.shape[0] - 1) with CU[b] <= row (CU non-decreasing from CU[0] = 0): a binary search of
    ``steps`` probes (enough for 2**steps segments), unrolled at trace time. A probe past CU's end reads 0, so the
    predicate also asks b <= the number of segments."""
    nseg = CU.shape[0] - 1
    lo = 0
    for k in reversed(range(steps)):
        cand = lo + (1 << k)
        lo = lo + (1 << k) * (le01(cand, nseg) * le01(ts.load_scalar(CU, cand), row))
    return lo


# ---- 1. packed varlen causal attention ----------------------------------------------------------------------------
@ts.kernel(grid=lambda Q, BM: (ts.cdiv(Q.shape[1], BM), Q.shape[0]))
def varlen_attention(Q, K, V, CU, O, scale: float, *, BM: int = 16, BN: int = 16, D: int = 16, STEPS: int = 4):
    """Q, O (H, T, D) and K, V (Hkv, T, D) views of packed (T, H, D) tensors, H a multiple of Hkv; CU (B + 1,) int
    cu_seqlens. Query t of sequence b sees keys s with CU[b] <= s <= t. A program takes an aligned tile of BM packed
    queries (it may hold the ends of several sequences): the key tiles it visits run from the start of its first row's
    sequence to its last row, and each row's own start masks keys of earlier sequences."""
    i, h = ts.block_id(0), ts.block_id(1)
    T = Q.shape[1]
    hk = h // (Q.shape[0] // K.shape[0])
    first = i * BM
    last = ts.smin(first + BM, T) - 1
    b0 = find_segment(CU, first, STEPS)
    b1 = find_segment(CU, last, STEPS)
    lo = ts.load_scalar(CU, b0)
    rows = ts.RegVec[ts.i64, BM]()
    starts = ts.RegVec[ts.i64, BM]()
    later = ts.RegVec[ts.bool_, BM]()
    ts.arange(rows, first)
    ts.zero(starts)
    ts.add(starts, starts, lo)
    for b in ts.range(b0 + 1, b1 + 1):               # the sequences that start inside this tile
        c = ts.load_scalar(CU, b)
        ts.ge(later, rows, c)
        ts.where(starts, later, c, starts)
    q = ts.SharedTile[Q.dtype, BM, D]()
    k = ts.SharedTile[K.dtype, BN, D]()
    v = ts.SharedTile[V.dtype, BN, D]()
    s = ts.RegTile[ts.f32, BM, BN]()
    p = ts.RegTile[V.dtype, BM, BN]()
    seen = ts.RegTile[ts.bool_, BM, BN]()
    inseq = ts.RegTile[ts.bool_, BM, BN]()
    kpos = ts.RegVec[ts.i64, BN]()
    acc = ts.RegTile[ts.f32, BM, D]()
    out = ts.RegTile[O.dtype, BM, D]()
    m = ts.RegVec[ts.f32, BM]()
    m_new = ts.RegVec[ts.f32, BM]()
    m_use = ts.RegVec[ts.f32, BM]()
    alpha = ts.RegVec[ts.f32, BM]()
    l = ts.RegVec[ts.f32, BM]()  # noqa: E741
    rs = ts.RegVec[ts.f32, BM]()
    dead = ts.RegVec[ts.bool_, BM]()
    ts.load(q, Q, at=(h, i, 0))
    ts.neg_infty(m)
    ts.zero(l)
    ts.zero(acc)
    for j in ts.range(lo // BN, ts.cdiv(last + 1, BN)):
        ts.load(k, K, at=(hk, j, 0))
        ts.load(v, V, at=(hk, j, 0))
        ts.zero(s)
        ts.mma_ABt(s, q, k, s)
        ts.mul(s, s, scale)
        ts.arange(kpos, j * BN)
        ts.le(seen, ts.per_col(kpos), ts.per_row(rows))      # causal
        ts.ge(inseq, ts.per_col(kpos), ts.per_row(starts))   # not an earlier sequence's key
        ts.logical_and(seen, seen, inseq)
        ts.where(s, seen, s, -math.inf)
        ts.row_max(m_new, s, m)
        ts.eq(dead, m_new, -math.inf)                 # rows past T see nothing
        ts.where(m_use, dead, 0.0, m_new)
        ts.sub(alpha, m, m_use)
        ts.exp(alpha, alpha)
        ts.sub(s, s, ts.per_row(m_use))
        ts.exp(s, s)
        ts.row_sum(rs, s)
        ts.mul(l, l, alpha)
        ts.add(l, l, rs)
        ts.mul(acc, acc, ts.per_row(alpha))
        ts.copy(p, s)
        ts.mma_AB(acc, p, v, acc)
        ts.copy(m, m_new)
    ts.max(l, l, 1e-30)
    ts.div(acc, acc, ts.per_row(l))
    ts.copy(out, acc)
    ts.store(O, out, at=(h, i, 0))


def varlen_ref(q, k, v, cu, scale):
    """float64, (T, H, D) packed inputs: causal attention inside each sequence."""
    T, H, D = q.shape
    g = H // k.shape[1]
    out = torch.zeros(T, H, v.shape[2], dtype=torch.float64)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        if b == a:
            continue
        qs = q[a:b].double().transpose(0, 1)                              # (H, n, D)
        ks = k[a:b].double().transpose(0, 1).repeat_interleave(g, 0)
        vs = v[a:b].double().transpose(0, 1).repeat_interleave(g, 0)
        s = qs @ ks.transpose(-1, -2) * scale
        n = b - a
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
        out[a:b] = (torch.softmax(s, -1) @ vs).transpose(0, 1)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F16, BF])
@pytest.mark.parametrize(("lengths", "H", "Hkv", "cu_dtype"),
                         [([5, 0, 1, 40, 16, 3], 2, 1, I32),       # ragged, an empty sequence, one token
                          ([1], 1, 1, I64),                        # a single token
                          ([16, 16, 0, 0, 33], 4, 2, I64),         # tile-aligned boundaries, two empties in a row
                          ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2, 2, I32)])  # 15 sequences in one tile
def test_varlen_causal_attention(backend, dtype, lengths, H, Hkv, cu_dtype, rng):
    D = 16
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=cu_dtype)
    T = int(cu[-1])
    q = randn(rng, T, H, D, dtype=dtype)
    k = randn(rng, T, Hkv, D, dtype=dtype)
    v = randn(rng, T, Hkv, D, dtype=dtype)
    o = poisoned(T, H, D, dtype=dtype)
    launch(varlen_attention, backend, q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu,
           o.transpose(0, 1), D ** -0.5, D=D)
    close(o, varlen_ref(q, k, v, cu, D ** -0.5).to(dtype))


def test_varlen_attention_visits_only_its_own_key_tiles():
    """The cost analysis reads cu_seqlens as the kernel does: a tile's K and V reads run from its first sequence's
    start to its last row (lengths 40, 40: the tile of rows 48-63 starts at key tile 2 (row 40), not 0)."""
    D, T = 16, 80
    cu = torch.tensor([0, 40, 80], dtype=I32)
    q, k, v, o = (torch.zeros(1, T, D, dtype=F16) for _ in range(4))
    cost = varlen_attention.trace(q, k, v, cu, o, 0.25).cost(q, k, v, cu, o, 0.25)
    # tiles i = 0..4 (rows 16i..16i+15): key tiles [lo // 16, i] with lo = 0 for i <= 2, 40 for i >= 3
    key_tiles = sum(i - (0 if i <= 2 else 40 // 16) + 1 for i in range(5))
    assert key_tiles == 1 + 2 + 3 + 2 + 3
    # the binary searches: 4 probes each, two per tile, reading CU where the probe is inside it (index <= 2)
    probes = 0
    for i in range(5):
        for row in (16 * i, 16 * i + 15):
            lo_ = 0
            for kk in (8, 4, 2, 1):
                probes += lo_ + kk < 3
                if lo_ + kk <= 2 and int(cu[lo_ + kk]) <= row:
                    lo_ += kk
    starts_loop = sum(1 for i in range(5) if 16 * i < 40 <= 16 * i + 15)     # tile 2 holds sequence 1's start
    scalar_bytes = (probes + 5 + starts_loop) * 4                              # + each tile's CU[b0]
    assert cost.bytes_read == 5 * 16 * D * 2 + key_tiles * 2 * 16 * D * 2 + scalar_bytes
    assert cost.bytes_written == T * D * 2


# ---- 2. paged-KV decode attention -----------------------------------------------------------------------------------
@ts.kernel(grid=lambda Q, K_CACHE: (Q.shape[0], K_CACHE.shape[1]))
def paged_decode(Q, K_CACHE, V_CACHE, TABLE, LENS, O, scale: float, *, G: int = 16, P: int = 16, D: int = 16):
    """One query per sequence. Q, O (B, Hkv, Gr, D) views of (B, H, D), H = Hkv Gr (the Gr heads sharing a kv head as
    the rows of one tile of G >= Gr rows); K_CACHE, V_CACHE (pages, Hkv, P, D) views of vLLM's (pages, P, Hkv, D);
    TABLE (B, max_pages) int page ids; LENS (B,) int context lengths (pages past cdiv(len, P) are not read; the last
    page's slots past len are masked). A sequence of length 0 gives 0."""
    b, hk = ts.block_id(0), ts.block_id(1)
    n = ts.load_scalar(LENS, b)
    q = ts.SharedTile[Q.dtype, G, D]()
    k = ts.SharedTile[K_CACHE.dtype, P, D]()
    v = ts.SharedTile[V_CACHE.dtype, P, D]()
    s = ts.RegTile[ts.f32, G, P]()
    p = ts.RegTile[V_CACHE.dtype, G, P]()
    acc = ts.RegTile[ts.f32, G, D]()
    out = ts.RegTile[O.dtype, G, D]()
    m = ts.RegVec[ts.f32, G]()
    m_new = ts.RegVec[ts.f32, G]()
    alpha = ts.RegVec[ts.f32, G]()
    l = ts.RegVec[ts.f32, G]()  # noqa: E741
    rs = ts.RegVec[ts.f32, G]()
    ts.load(q, Q, at=(b, hk, 0, 0))
    ts.fill(m, -1e30)                                # finite: every row sees a key once the loop runs
    ts.zero(l)
    ts.zero(acc)
    for j in ts.range(ts.cdiv(n, P)):
        page = ts.load_scalar(TABLE, b, j)
        ts.load(k, K_CACHE, at=(page, hk, 0, 0))
        ts.load(v, V_CACHE, at=(page, hk, 0, 0))
        ts.zero(s)
        ts.mma_ABt(s, q, k, s)
        ts.mul(s, s, scale)
        ts.right_fill(s, s, n - j * P, -math.inf)    # the slots of the last page past the context
        ts.row_max(m_new, s, m)
        ts.sub(alpha, m, m_new)
        ts.exp(alpha, alpha)
        ts.sub(s, s, ts.per_row(m_new))
        ts.exp(s, s)
        ts.row_sum(rs, s)
        ts.mul(l, l, alpha)
        ts.add(l, l, rs)
        ts.mul(acc, acc, ts.per_row(alpha))
        ts.copy(p, s)
        ts.mma_AB(acc, p, v, acc)
        ts.copy(m, m_new)
    ts.max(l, l, 1e-30)
    ts.div(acc, acc, ts.per_row(l))
    ts.copy(out, acc)
    ts.store(O, out, at=(b, hk, 0, 0))


def paged_ref(q, kc, vc, table, lens, scale):
    """float64: q (B, H, D); caches (pages, P, Hkv, D)."""
    B, H, D = q.shape
    P, Hkv = kc.shape[1], kc.shape[2]
    out = torch.zeros(B, H, vc.shape[3], dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        if n == 0:
            continue
        pages = table[b, :(n + P - 1) // P].long()
        ks = kc[pages].double().reshape(-1, Hkv, D)[:n].repeat_interleave(H // Hkv, 1)    # (n, H, D)
        vs = vc[pages].double().reshape(-1, Hkv, vc.shape[3])[:n].repeat_interleave(H // Hkv, 1)
        s = torch.einsum("hd,nhd->hn", q[b].double(), ks) * scale
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, -1), vs)
    return out


def paged_case(rng, dtype, lens, H, Hkv, table_dtype, P=16, D=16, pages=13):
    lens = torch.tensor(lens, dtype=table_dtype)
    B = len(lens)
    max_pages = max(1, max((int(n) + P - 1) // P for n in lens)) + 1
    perm = torch.from_numpy(rng.permutation(pages))
    table = torch.full((B, max_pages), 10**6, dtype=table_dtype)     # entries past a sequence's pages: never read
    used = 0
    for b in range(B):
        npg = (int(lens[b]) + P - 1) // P
        table[b, :npg] = perm[used:used + npg]
        used += npg
    assert used <= pages
    kc = randn(rng, pages, P, Hkv, D, dtype=dtype)
    vc = randn(rng, pages, P, Hkv, D, dtype=dtype)
    for b in range(B):                               # stale slots past each context: large, finite
        n = int(lens[b])
        if n % P:
            kc[table[b, n // P], n % P:] = 1e4
            vc[table[b, n // P], n % P:] = -1e4
    q = randn(rng, B, H, D, dtype=dtype)
    return q, kc, vc, table, lens


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F16, BF])
@pytest.mark.parametrize(("lens", "H", "Hkv", "table_dtype"),
                         [([37, 0, 1, 16], 8, 2, I32),      # partial pages, an empty context, one token, one page
                          ([100, 5], 4, 4, I64),            # no grouping
                          ([17, 33, 48], 6, 1, I32)])       # six heads on one kv head
def test_paged_decode_attention(backend, dtype, lens, H, Hkv, table_dtype, rng):
    D, P = 16, 16
    q, kc, vc, table, lens = paged_case(rng, dtype, lens, H, Hkv, table_dtype)
    B, Gr = q.shape[0], H // Hkv
    o = poisoned(B, H, D, dtype=dtype)
    launch(paged_decode, backend, q.view(B, Hkv, Gr, D), kc.permute(0, 2, 1, 3), vc.permute(0, 2, 1, 3), table,
           lens, o.view(B, Hkv, Gr, D), D ** -0.5, P=P, D=D)
    close(o, paged_ref(q, kc, vc, table, lens, D ** -0.5).to(dtype))


# ---- 3. MoE grouped GEMM --------------------------------------------------------------------------------------------
@ts.kernel(grid=lambda X, W, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(W.shape[2], BN)))
def moe_grouped_gemm(X, W, BLOCK_EXPERT, ENDS, Y, *, BM: int = 16, BN: int = 16, BK: int = 16):
    """X (Tpad, K) tokens sorted by expert, expert e's segment starting at a multiple of BM (moe_align_block_size);
    BLOCK_EXPERT (Tpad / BM,) the expert of each row tile (-1: a tile of padding); ENDS (E,) where each segment's
    tokens end; W (E, K, N). Y[r] = X[r] @ W[e] for the tokens of expert e, 0 on padding rows."""
    i, j = ts.block_id(0), ts.block_id(1)
    e = ts.load_scalar(BLOCK_EXPERT, i)
    end = ts.load_scalar(ENDS, e)                     # 0 for e = -1: every row is padding
    a = ts.SharedTile[X.dtype, BM, BK]()
    w = ts.SharedTile[W.dtype, BK, BN]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    out = ts.RegTile[Y.dtype, BM, BN]()
    rows = ts.RegVec[ts.i64, BM]()
    real = ts.RegVec[ts.bool_, BM]()
    ts.zero(acc)
    for kk in ts.range(ts.cdiv(X.shape[1], BK)):
        ts.load(a, X, at=(i, kk))
        ts.load(w, W, at=(e, kk, j))                  # the weight of the expert read from memory
        ts.mma_AB(acc, a, w, acc)
    ts.arange(rows, i * BM)
    ts.lt(real, rows, end)
    ts.where(acc, ts.per_row(real), acc, 0.0)
    ts.copy(out, acc)
    ts.store(Y, out, at=(i, j))


def moe_case(rng, dtype, counts, K, N, BM=16, ends_dtype=I32):
    E = len(counts)
    starts, tiles, ends, t = [], [], [], 0
    for e, c in enumerate(counts):
        starts.append(t)
        ends.append(t + c)
        nt = -(-c // BM)
        tiles += [e] * nt
        t += nt * BM
    tiles += [-1, -1]                                # unused tiles at the end of the buffer
    Tpad = len(tiles) * BM
    x = randn(rng, Tpad, K, dtype=dtype)
    for e, c in enumerate(counts):                   # padding rows hold garbage
        x[ends[e]:starts[e] + -(-c // BM) * BM] = 1e3
    x[t:] = 1e3
    w = randn(rng, E, K, N, dtype=dtype) * K ** -0.5
    want = torch.zeros(Tpad, N, dtype=torch.float64)
    for e in range(E):
        want[starts[e]:ends[e]] = x[starts[e]:ends[e]].double() @ w[e].double()
    return x, w, torch.tensor(tiles, dtype=I32), torch.tensor(ends, dtype=ends_dtype), want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F16, BF])
@pytest.mark.parametrize(("counts", "K", "N"), [([5, 0, 17, 32, 1], 40, 24), ([3], 16, 16), ([0, 0, 20], 7, 33)])
def test_moe_grouped_gemm(backend, dtype, counts, K, N, rng):
    """Experts with no tokens, one token, a segment one row past a tile; K and N not multiples of the tiles; the
    weight given as a transposed view of (E, N, K) memory."""
    x, w, tiles, ends, want = moe_case(rng, dtype, counts, K, N)
    wt = w.transpose(1, 2).contiguous().transpose(1, 2)
    y = poisoned(x.shape[0], N)
    launch(moe_grouped_gemm, backend, x, wt, tiles, ends, y)
    close(y, want, torch.float32, scale=10 if dtype is BF else 3)


# ---- 4. CSR sparse times dense ---------------------------------------------------------------------------------------
@ts.kernel(grid=lambda ROWPTR, B, BN: (ROWPTR.shape[0] - 1, ts.cdiv(B.shape[1], BN)))
def csr_spmm(ROWPTR, COL, VAL, B, C, *, BN: int = 16):
    """C = A @ B for A in CSR (ROWPTR (M + 1,), COL (nnz,) int, VAL (nnz,) float), B (K, N): each program a row of A
    and a column tile of B, gathering B's rows named by COL (a column index outside [0, K) reads a row of zeros)."""
    r, j = ts.block_id(0), ts.block_id(1)
    acc = ts.RegTile[ts.f32, 1, BN]()
    row = ts.RegTile[ts.f32, 1, BN]()
    ts.zero(acc)
    for p in ts.range(ts.load_scalar(ROWPTR, r), ts.load_scalar(ROWPTR, r + 1)):
        c = ts.load_scalar(COL, p)
        a = ts.load_scalar(VAL, p)
        ts.load(row, B, at=(c, j))
        ts.mul(row, row, a)
        ts.add(acc, acc, row)
    ts.store(C, acc, at=(r, j))


def csr_case(rng, M, K, N, density, val_dtype, idx_dtype, bad_cols=False):
    dense = torch.from_numpy(rng.standard_normal((M, K)) * (rng.random((M, K)) < density))
    if M > 2:
        dense[1] = 0                                  # an empty row
    rowptr, cols, vals = [0], [], []
    for r in range(M):
        nz = torch.nonzero(dense[r]).flatten().tolist()
        cols += nz
        vals += dense[r, nz].tolist()
        if bad_cols and r == 0:
            cols += [-1, K, K + 1000]                # outside B: rows of zeros
            vals += [5.0, 5.0, 5.0]
        if r == M - 1 and nz:                        # a repeated column: its products add
            cols.append(nz[0])
            vals.append(0.5)
        rowptr.append(len(cols))
    val = torch.tensor(vals, dtype=torch.float64).to(val_dtype)
    return (torch.tensor(rowptr, dtype=idx_dtype), torch.tensor(cols, dtype=idx_dtype), val,
            randn(rng, K, N))


def csr_ref(rowptr, col, val, b):
    out = torch.zeros(len(rowptr) - 1, b.shape[1], dtype=torch.float64)
    for r in range(len(rowptr) - 1):
        for p in range(int(rowptr[r]), int(rowptr[r + 1])):
            c = int(col[p])
            if 0 <= c < b.shape[0]:
                out[r] += float(val[p].float()) * b[c].double()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("val_dtype", "idx_dtype"), [(torch.float32, I32), (F16, I64), (BF, I32)])
@pytest.mark.parametrize(("M", "K", "N", "density"), [(7, 20, 37, 0.3), (1, 1, 1, 1.0), (12, 50, 16, 0.05)])
def test_csr_spmm(backend, val_dtype, idx_dtype, M, K, N, density, rng):
    """Values read as f32 scalars from f32, f16 and bf16 tensors; empty rows, a repeated column, column indices of
    -1, K and K + 1000 (a zero row each)."""
    rowptr, col, val, b = csr_case(rng, M, K, N, density, val_dtype, idx_dtype, bad_cols=True)
    c = poisoned(M, N)
    launch(csr_spmm, backend, rowptr, col, val, b, c)
    close(c, csr_ref(rowptr, col, val, b), torch.float32, scale=4)


def test_csr_spmm_bytes_by_hand(rng):
    """Per program (row r, column tile j): two row pointers; per stored element its column index and value and the
    row tile of B it names (masked to B's N columns; nothing for a column outside B); C's tile written."""
    M, K, N, BN = 5, 9, 21, 16
    rowptr, col, val, b = csr_case(rng, M, K, N, 0.4, F16, I32, bad_cols=True)
    c = torch.empty(M, N)
    cost = csr_spmm.trace(rowptr, col, val, b, c).cost(rowptr, col, val, b, c)
    tiles = -(-N // BN)
    inside = sum(1 for x in col.tolist() if 0 <= x < K)
    want = tiles * (M * 2 * 4 + len(col) * (4 + 2)) + inside * N * 4
    assert cost.bytes_read == want
    assert cost.bytes_written == M * N * 4
    assert cost.flops == tiles * len(col) * 2 * BN          # a multiply and an add per element of the row tile
