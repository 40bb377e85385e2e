"""Round 27 of held-out kernels (after rounds 2-26): kernels of kinds no earlier round wrote, each on the reference
executor and Triton's interpreter against float64 torch / NumPy, outputs poisoned with NaN (or a sentinel) first,
ragged sizes (not tile multiples), seeds fixed (the ``rng`` fixture of this file).

- A fused QKV split + GPT-J (interleaved) rotary embedding from one packed (T, (HQ + 2 HKV) D) projection: the even
  and odd elements of each head read through stride-2 views of the packed tensor, rotated by the cos / sin row of
  the token's position (load_scalar of i32 / i64 positions), and written through stride-2 views of separate Q and K
  outputs; V copied bit for bit; k's head block past HKV reading 0 and storing nothing; D / 2 not a power of two.
- Jagged (offsets-driven) segment reductions of a (N, D) values tensor: per segment and column tile the sum, the
  mean (0 for an empty segment) and an online log-sum-exp over the segment's row tiles (rows outside the segment
  masked, -inf rows, all -inf and empty segments giving -inf, magnitudes of 1e30 that a naive exp overflows).
- A top-k-free router: a softmax over a ragged number of experts, every expert whose probability reaches a
  threshold kept, in token order, until its capacity is full (each token's rank among the earlier tokens that chose
  the expert from a strictly-lower-triangular product within the tile plus a count carried across token tiles);
  gates of dropped tokens 0, the per-expert load written at the end; capacity 0 and capacities past T.
- A weighted-Jacobi step of a 2-D Poisson problem with Dirichlet boundaries: the halo read through a (3, 3, H, W)
  overlapping view of the padded grid, obstacle cells (a bool mask) kept fixed, the result written through the
  non-contiguous interior view of the other padded buffer (two launches ping-pong).
- An int8 weight-only GEMM with per-group scales (a scale per 32 rows of K and column; the K tile is one group,
  its scales a vector row broadcast along the tile's columns), dequantized into the activations' dtype and
  multiplied on the matrix units; K not a multiple of the group, f32 / f16 / bf16, codes -128 and 127.

test_heldout_round27_more.py has the rest of this round (Mamba's causal depthwise conv1d forward and backward, a
histogram by atomics, a strided-transpose copy of non-contiguous views, misuse, the sm_90a compiles).
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, F64, I32, I64, close, launch, randn

import tilestack.lang as ts

F32 = torch.float32
I8 = torch.int8


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20262701)


def poisoned(*shape, dtype=F32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. fused QKV split + interleaved (GPT-J) rotary embedding ----------------------------------------------------
@ts.kernel(grid=lambda QE, POS, BH: (POS.shape[0], ts.cdiv(QE.shape[1], BH)))
def qkv_rope_split(QE, QO, KE, KO, V, POS, COS, SIN, OQE, OQO, OKE, OKO, OV, *, BH: int = 4, BD: int = 8):
    """For token t and a block of BH heads: Q's and K's heads rotated pairwise, (e, o) -> (e cos - o sin, e sin +
    o cos) with the cos / sin row of position POS[t], and V copied. Every *E / *O is the (T, H, D / 2) stride-2 view
    of a head's even / odd elements; COS, SIN (P, D / 2) f32."""
    t, h = ts.block_id(0), ts.block_id(1)
    pos = ts.load_scalar(POS, t)
    c, s = ts.RegVec[ts.f32, BD](), ts.RegVec[ts.f32, BD]()
    ts.load(c, COS, at=(pos, 0))
    ts.load(s, SIN, at=(pos, 0))
    e, o = ts.RegTile[ts.f32, BH, BD](), ts.RegTile[ts.f32, BH, BD]()
    re, ro, tmp = ts.RegTile[ts.f32, BH, BD](), ts.RegTile[ts.f32, BH, BD](), ts.RegTile[ts.f32, BH, BD]()
    out = ts.RegTile[OQE.dtype, BH, BD]()
    for se, so, de, do in ((QE, QO, OQE, OQO), (KE, KO, OKE, OKO)):
        ts.load(e, se, at=(t, h, 0))                  # (BH, BD): token t (an element coordinate), head block h
        ts.load(o, so, at=(t, h, 0))
        ts.mul(re, e, ts.per_col(c))                  # e cos - o sin
        ts.mul(tmp, o, ts.per_col(s))
        ts.sub(re, re, tmp)
        ts.mul(ro, e, ts.per_col(s))                  # e sin + o cos
        ts.mul(tmp, o, ts.per_col(c))
        ts.add(ro, ro, tmp)
        ts.copy(out, re)
        ts.store(de, out, at=(t, h, 0))
        ts.copy(out, ro)
        ts.store(do, out, at=(t, h, 0))
    v = ts.RegTile[V.dtype, BH, 2 * BD]()
    ts.load(v, V, at=(t, h, 0))
    ts.store(OV, v, at=(t, h, 0))


def rope_tables(P: int, half: int, base: float = 10000.0) -> tuple:
    inv = base ** (-torch.arange(half, dtype=F64) * 2 / (2 * half))
    ang = torch.arange(P, dtype=F64)[:, None] * inv[None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()


def run_qkv_rope(backend, qkv, pos, cos, sin, HQ, HKV, D, **consts):
    T = qkv.shape[0]
    q = qkv[:, :HQ * D].view(T, HQ, D // 2, 2)
    k = qkv[:, HQ * D:(HQ + HKV) * D].view(T, HKV, D // 2, 2)
    v = qkv[:, (HQ + HKV) * D:].view(T, HKV, D)
    oq, ok, ov = (poisoned(T, H, D, dtype=qkv.dtype) for H in (HQ, HKV, HKV))
    oqv, okv = oq.view(T, HQ, D // 2, 2), ok.view(T, HKV, D // 2, 2)
    launch(qkv_rope_split, backend, q[..., 0], q[..., 1], k[..., 0], k[..., 1], v, pos, cos, sin,
           oqv[..., 0], oqv[..., 1], okv[..., 0], okv[..., 1], ov, **consts)
    return oq, ok, ov


def rope_ref(x: torch.Tensor, pos: torch.Tensor, cos, sin) -> torch.Tensor:
    """(T, H, D) rotated pairwise in float64 (GPT-J's rotate_every_two)."""
    c, s = cos.double()[pos.long()][:, None, :], sin.double()[pos.long()][:, None, :]
    e, o = x.double()[..., 0::2], x.double()[..., 1::2]
    return torch.stack([e * c - o * s, e * s + o * c], dim=-1).flatten(-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF])
@pytest.mark.parametrize(("T", "HQ", "HKV", "D", "BH", "BD"), [(7, 5, 2, 12, 4, 8), (3, 8, 8, 16, 4, 8),
                                                             (1, 1, 1, 2, 1, 1)])
def test_qkv_rope_split(backend, dtype, T, HQ, HKV, D, BH, BD, rng):
    qkv = randn(rng, T, (HQ + 2 * HKV) * D, dtype=dtype)
    pos = torch.from_numpy(rng.integers(0, 40, T)).to(I32 if dtype is F16 else I64)
    cos, sin = rope_tables(40, D // 2)
    oq, ok, ov = run_qkv_rope(backend, qkv, pos, cos, sin, HQ, HKV, D, BH=BH, BD=BD)
    q = qkv[:, :HQ * D].view(T, HQ, D)
    k = qkv[:, HQ * D:(HQ + HKV) * D].view(T, HKV, D)
    close(oq, rope_ref(q, pos, cos, sin))
    close(ok, rope_ref(k, pos, cos, sin))
    assert torch.equal(ov, qkv[:, (HQ + HKV) * D:].view(T, HKV, D))


@pytest.mark.parametrize("backend", BACKENDS)
def test_qkv_rope_position_zero_is_identity_and_huge_values(backend):
    """Position 0 rotates by nothing (cos 1, sin 0): Q and K come back exactly; values of 1e30 stay finite in f32
    and an inf element makes its own pair +-inf (its partner finite), as torch's arithmetic."""
    T, HQ, HKV, D = 2, 3, 1, 6
    qkv = torch.arange(T * (HQ + 2 * HKV) * D, dtype=F32).view(T, -1) - 20
    qkv[1, 0] = 1e30
    qkv[1, 3] = math.inf
    cos, sin = rope_tables(4, D // 2)
    pos = torch.tensor([0, 2], dtype=I32)
    oq, ok, ov = run_qkv_rope(backend, qkv, pos, cos, sin, HQ, HKV, D, BH=4, BD=4)
    assert torch.equal(oq[0], qkv[0, :HQ * D].view(HQ, D))
    assert torch.equal(ok[0], qkv[0, HQ * D:(HQ + HKV) * D].view(HKV, D))
    want = rope_ref(qkv[:, :HQ * D].view(T, HQ, D), pos, cos, sin)
    torch.testing.assert_close(oq.double(), want, equal_nan=True, rtol=1e-6, atol=1e-5)
    assert torch.isinf(oq[1, 0, 2:4]).all() and torch.isfinite(oq[1, 0, :2]).all()


# ---- 2. jagged segment sum / mean / log-sum-exp ---------------------------------------------------------------------
@ts.kernel(grid=lambda OFFSETS, VALUES, BD: (OFFSETS.shape[0] - 1, ts.cdiv(VALUES.shape[1], BD)))
def jagged_reduce(VALUES, OFFSETS, SUM, MEAN, LSE, *, BM: int = 8, BD: int = 16):
    """Segment b holds rows [OFFSETS[b], OFFSETS[b + 1]) of VALUES (N, D): SUM and MEAN (B, D) in VALUES' dtype
    (MEAN 0 for an empty segment), LSE (B, D) f32 the column-wise log-sum-exp (-inf for an empty segment)."""
    b, j = ts.block_id(0), ts.block_id(1)
    start, end = ts.load_scalar(OFFSETS, b), ts.load_scalar(OFFSETS, b + 1)
    x, e = ts.RegTile[ts.f32, BM, BD](), ts.RegTile[ts.f32, BM, BD]()
    mask, inside = ts.RegTile[ts.bool_, BM, BD](), ts.RegVec[ts.bool_, BM]()
    rows = ts.RegVec[ts.i64, BM]()
    acc, m, l = ts.RegVec[ts.f32, BD](), ts.RegVec[ts.f32, BD](), ts.RegVec[ts.f32, BD]()
    m_new, safe, scale = ts.RegVec[ts.f32, BD](), ts.RegVec[ts.f32, BD](), ts.RegVec[ts.f32, BD]()
    finite = ts.RegVec[ts.bool_, BD]()
    ts.zero(acc)
    ts.zero(l)
    ts.neg_infty(m)
    for k in ts.range(start // BM, ts.cdiv(end, BM)):
        ts.load(x, VALUES, at=(k, j))
        ts.arange(rows, k * BM)
        ts.ge(inside, rows, start)
        ts.fill(mask, True)
        ts.logical_and(mask, mask, ts.per_row(inside))
        ts.lt(inside, rows, end)
        ts.logical_and(mask, mask, ts.per_row(inside))
        ts.where(e, mask, x, 0.0)
        ts.col_sum(acc, e, acc)
        ts.where(e, mask, x, -math.inf)
        ts.col_max(m_new, e, m)                       # the running maximum, -inf while every row so far is -inf
        ts.ne(finite, m_new, -math.inf)
        ts.where(safe, finite, m_new, 0.0)            # a reference point that is never -inf: no -inf - -inf
        ts.sub(scale, m, safe)
        ts.exp(scale, scale)
        ts.mul(l, l, scale)
        ts.sub(e, e, ts.per_col(safe))
        ts.exp(e, e)
        ts.col_sum(l, e, l)
        ts.copy(m, m_new)
    ts.ne(finite, m, -math.inf)
    ts.where(safe, finite, m, 0.0)
    ts.log(l, l)                                      # log 0 = -inf for a segment of -inf (or no) rows
    ts.add(l, l, safe)
    ts.store(LSE, l, at=(b, j))
    out = ts.RegVec[SUM.dtype, BD]()
    ts.copy(out, acc)
    ts.store(SUM, out, at=(b, j))
    count = ts.smax(end - start, 1)
    ts.div(acc, acc, count)
    ts.copy(out, acc)
    ts.store(MEAN, out, at=(b, j))


def jagged_ref(values: torch.Tensor, offsets: torch.Tensor) -> tuple:
    v = values.double()
    sums, means, lses = [], [], []
    for b in range(offsets.shape[0] - 1):
        seg = v[int(offsets[b]):int(offsets[b + 1])]
        sums.append(seg.sum(0))
        means.append(seg.mean(0) if seg.shape[0] else torch.zeros(v.shape[1], dtype=F64))
        lses.append(torch.logsumexp(seg, 0) if seg.shape[0] else torch.full((v.shape[1],), -math.inf, dtype=F64))
    return torch.stack(sums), torch.stack(means), torch.stack(lses)


def run_jagged(backend, values, offsets, **consts):
    B, D = offsets.shape[0] - 1, values.shape[1]
    s, m, lse = poisoned(B, D, dtype=values.dtype), poisoned(B, D, dtype=values.dtype), poisoned(B, D)
    launch(jagged_reduce, backend, values, offsets, s, m, lse, **consts)
    return s, m, lse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF])
@pytest.mark.parametrize("idx_dtype", [I32, I64])
@pytest.mark.parametrize("lengths", [[3, 0, 17, 1, 8, 0, 5], [0], [21], [1, 1, 1]])
def test_jagged_reduce(backend, dtype, idx_dtype, lengths, rng):
    offsets = torch.tensor([0, *np.cumsum(lengths)], dtype=idx_dtype)
    N, D = int(offsets[-1]), 19
    values = randn(rng, N, D, dtype=dtype) * 3
    s, m, lse = run_jagged(backend, values, offsets)
    ws, wm, wl = jagged_ref(values, offsets)
    n = max(max(lengths), 1)
    close(s, ws, scale=math.sqrt(n) * 3)
    close(m, wm, scale=3)
    close(lse, wl, dtype=F32, scale=3)
    for b, length in enumerate(lengths):
        if length == 0:
            assert (s[b] == 0).all() and (m[b] == 0).all() and (lse[b] == -math.inf).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_jagged_lse_of_neg_inf_rows_and_huge_values(backend):
    """A segment of -inf rows has log-sum-exp -inf (not NaN from -inf - -inf); -inf rows beside finite ones count
    for nothing; values of 1e30 (exp overflows f32 without the running maximum) give 1e30 + log(count of ties)."""
    values = torch.zeros(20, 3)
    values[0:4] = -math.inf                            # segment 0: all -inf
    values[4:6, 0] = -math.inf                         # segment 1: -inf rows in column 0 next to a finite one
    values[6, 0] = 2.0
    values[7:20] = 1e30                                # segment 2: 13 rows of 1e30 (crossing tile edges)
    values[19, 1] = -1e30
    offsets = torch.tensor([0, 4, 7, 20], dtype=I64)
    s, m, lse = run_jagged(backend, values, offsets, BM=4, BD=4)
    assert (lse[0] == -math.inf).all() and (s[0] == -math.inf).all()
    assert lse[1, 0] == 2.0 and lse[1, 1] == pytest.approx(math.log(3.0), rel=1e-6)
    assert lse[2, 0] == pytest.approx(1e30 + math.log(13), rel=1e-6) and torch.isfinite(lse[2]).all()
    _, _, want = jagged_ref(values, offsets)
    close(lse, want)


# ---- 3. router softmax with capacity masking (no top-k) ---------------------------------------------------------
@ts.kernel(grid=(1,))
def capacity_router(LOGITS, GATES, LOAD, tau: float, capacity: int, *, BT: int = 8, BE: int = 16):
    """GATES (T, E) = softmax(LOGITS) where the probability reaches tau and the expert has taken fewer than
    ``capacity`` earlier tokens (in token order) that reached tau, else 0; LOAD (E,) i32 = tokens each expert took."""
    T, E = LOGITS.shape[0], LOGITS.shape[1]
    x, p = ts.RegTile[ts.f32, BT, BE](), ts.RegTile[ts.f32, BT, BE]()
    chose, keep = ts.RegTile[ts.bool_, BT, BE](), ts.RegTile[ts.bool_, BT, BE]()
    chose_f, rank = ts.RegTile[ts.f32, BT, BE](), ts.RegTile[ts.f32, BT, BE]()
    lower, zero_acc = ts.RegTile[ts.f32, BT, BT](), ts.RegTile[ts.f32, BT, BE]()
    ts.one(lower)
    ts.tril(lower, lower, -1)                          # strictly lower: row r counts the rows before it
    rmax, rsum = ts.RegVec[ts.f32, BT](), ts.RegVec[ts.f32, BT]()
    cols, rows = ts.RegVec[ts.i32, BE](), ts.RegVec[ts.i32, BT]()
    col_in, row_in = ts.RegVec[ts.bool_, BE](), ts.RegVec[ts.bool_, BT]()
    ts.arange(cols)
    ts.lt(col_in, cols, E)
    taken = ts.RegVec[ts.f32, BE]()
    ts.zero(taken)
    out = ts.RegTile[GATES.dtype, BT, BE]()
    for i in ts.range(ts.cdiv(T, BT)):
        ts.load(x, LOGITS, at=(i, 0))
        ts.where(x, ts.per_col(col_in), x, -math.inf)  # experts past E
        ts.row_max(rmax, x)
        ts.sub(p, x, ts.per_row(rmax))
        ts.exp(p, p)
        ts.row_sum(rsum, p)
        ts.div(p, p, ts.per_row(rsum))
        ts.arange(rows, i * BT)
        ts.lt(row_in, rows, T)
        ts.ge(chose, p, tau)
        ts.logical_and(chose, chose, ts.per_row(row_in))
        ts.logical_and(chose, chose, ts.per_col(col_in))
        ts.where(chose_f, chose, 1.0, 0.0)
        ts.zero(zero_acc)
        ts.mma_AB(rank, lower, chose_f, zero_acc)     # earlier choosers in this tile (exact small integers)
        ts.add(rank, rank, ts.per_col(taken))         # and in the tiles before
        ts.lt(keep, rank, capacity)
        ts.logical_and(keep, keep, chose)
        ts.where(p, keep, p, 0.0)
        ts.copy(out, p)
        ts.store(GATES, out, at=(i, 0))
        ts.col_sum(taken, chose_f, taken)
    ts.min(taken, taken, capacity)
    load = ts.RegVec[ts.i32, BE]()
    ts.copy(load, taken)
    ts.store(LOAD, load, at=(0,))


def router_ref(logits: torch.Tensor, tau: float, capacity: int) -> tuple:
    p = torch.softmax(logits.double(), dim=1)
    T, E = p.shape
    gates, load = torch.zeros(T, E, dtype=F64), [0] * E
    for t in range(T):
        for e in range(E):
            if p[t, e] >= tau:
                if load[e] < capacity:
                    gates[t, e] = p[t, e]
                load[e] += 1
    return p, gates, torch.tensor([min(n, capacity) for n in load], dtype=I32)


def away_from_probabilities(logits: torch.Tensor, tau: float) -> float:
    """``tau`` moved to the middle of the gap between the probabilities around it, so that the kernel's f32
    softmax and float64 torch choose the same tokens."""
    p = torch.softmax(logits.double(), dim=1).flatten().sort().values
    below, above = p[p < tau], p[p >= tau]
    lo = float(below[-1]) if below.numel() else 0.0
    hi = float(above[0]) if above.numel() else 1.0
    return (lo + hi) / 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF])
@pytest.mark.parametrize(("T", "E", "tau", "capacity"), [(37, 6, 0.15, 5), (9, 13, 0.05, 100), (20, 3, 0.2, 0),
                                                         (1, 1, 0.5, 1)])
def test_capacity_router(backend, dtype, T, E, tau, capacity, rng):
    logits = randn(rng, T, E, dtype=dtype) * 1.5
    tau = away_from_probabilities(logits, tau)
    gates, load = poisoned(T, E, dtype=dtype), torch.full((E,), -7, dtype=I32)
    launch(capacity_router, backend, logits, gates, load, tau, capacity)
    _, want, want_load = router_ref(logits, tau, capacity)
    close(gates, want)
    assert torch.equal(load, want_load)
    assert torch.equal(gates != 0, want != 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_router_ties_extremes_and_order(backend):
    """Equal logits (every expert 1 / E, exactly at tau: kept), logits of -1e4 / 1e4 (probabilities exactly 0 and
    1), and capacities that fill inside the first tile: the earliest tokens keep their gates, later ones get 0."""
    T, E = 11, 4
    logits = torch.zeros(T, E)
    logits[1] = torch.tensor([1e4, -1e4, 0.0, 0.0])
    gates, load = poisoned(T, E), torch.full((E,), -7, dtype=I32)
    launch(capacity_router, backend, logits, gates, load, 0.25, 3, BT=4, BE=4)
    _, want, want_load = router_ref(logits, 0.25, 3)
    assert torch.equal(gates.double(), want) and torch.equal(load, want_load), (gates, load)
    assert gates[:3, 0].tolist() == [0.25, 1.0, 0.25] and (gates[3:, 0] == 0).all() and (gates[1, 1:] == 0).all()
    assert gates[:4, 1].tolist() == [0.25, 0.0, 0.25, 0.25] and (gates[4:, 1] == 0).all()
    assert load.tolist() == [3, 3, 3, 3]


# ---- 4. weighted Jacobi with a halo view, Dirichlet boundaries and obstacles ------------------------------------------
@ts.kernel(grid=lambda F, BM, BN: (ts.cdiv(F.shape[0], BM), ts.cdiv(F.shape[1], BN)))
def jacobi_step(HALO, F, FIXED, OUT, omega: float, h2: float, *, BM: int = 8, BN: int = 16):
    """OUT (H, W) = (1 - omega) u + omega (u_up + u_down + u_left + u_right + h2 F) / 4 for u = HALO[1, 1], the
    (3, 3, H, W) view HALO[dy, dx, r, c] = U[r + dy, c + dx] of the padded grid U (H + 2, W + 2); cells where FIXED
    holds keep u."""
    i, j = ts.block_id(0), ts.block_id(1)
    u, nb, acc, f = (ts.RegTile[ts.f32, BM, BN]() for _ in range(4))
    ts.load(u, HALO, at=(1, 1, i, j))
    ts.load(f, F, at=(i, j))
    ts.mul(acc, f, h2)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        ts.load(nb, HALO, at=(dy, dx, i, j))
        ts.add(acc, acc, nb)
    ts.mul(acc, acc, 0.25)
    ts.mul(acc, acc, omega)
    ts.mul(nb, u, 1.0 - omega)                         # a runtime Scalar's arithmetic
    ts.add(acc, acc, nb)
    fixed = ts.RegTile[ts.bool_, BM, BN]()
    ts.load(fixed, FIXED, at=(i, j))
    ts.where(acc, fixed, u, acc)
    out = ts.RegTile[OUT.dtype, BM, BN]()
    ts.copy(out, acc)
    ts.store(OUT, out, at=(i, j))


def halo_view(u_pad: torch.Tensor) -> torch.Tensor:
    H, W = u_pad.shape[0] - 2, u_pad.shape[1] - 2
    s0, s1 = u_pad.stride()
    return u_pad.as_strided((3, 3, H, W), (s0, s1, s0, s1), u_pad.storage_offset())


def jacobi_ref(u_pad: np.ndarray, f: np.ndarray, fixed: np.ndarray, omega: float, h2: float, dtype) -> np.ndarray:
    """One step in float64, the interior rounded to ``dtype`` as the kernel stores it."""
    u = u_pad[1:-1, 1:-1]
    nb = u_pad[:-2, 1:-1] + u_pad[2:, 1:-1] + u_pad[1:-1, :-2] + u_pad[1:-1, 2:]
    new = np.where(fixed, u, (1 - omega) * u + omega * (nb + h2 * f) / 4)
    out = u_pad.copy()
    out[1:-1, 1:-1] = torch.from_numpy(new).to(dtype).double().numpy()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF])
@pytest.mark.parametrize(("H", "W"), [(13, 21), (1, 1), (8, 16)])
def test_jacobi_ping_pong(backend, dtype, H, W, rng):
    omega, h2, steps = 0.8, 0.01, 3
    a = torch.zeros(H + 2, W + 2, dtype=dtype)
    a[0, :] = 1.0                                      # Dirichlet: the top edge hot, the rest 0
    a[:, -1] = torch.linspace(0, 2, H + 2)
    a[1:-1, 1:-1] = randn(rng, H, W, dtype=dtype)
    b = a.clone()
    b[1:-1, 1:-1] = math.nan                           # the other buffer's interior poisoned
    f = randn(rng, H, W, dtype=dtype)
    fixed = torch.from_numpy(rng.random((H, W)) < 0.1)
    want = a.double().numpy()
    bufs = [a, b]
    for step in range(steps):
        src, dst = bufs[step % 2], bufs[1 - step % 2]
        launch(jacobi_step, backend, halo_view(src), f, fixed, dst[1:-1, 1:-1], omega, h2)
        want = jacobi_ref(want, f.double().numpy(), fixed.numpy(), omega, h2, dtype)
    got = bufs[steps % 2]
    close(got, torch.from_numpy(want), scale=4)
    assert torch.equal(got[0], a[0]) and torch.equal(got[:, -1], a[:, -1])   # the boundary never written
    assert torch.equal(got[1:-1, 1:-1][fixed], a[1:-1, 1:-1][fixed])          # obstacles kept bit for bit


# ---- 5. int8 weight-only GEMM with per-group scales (group 32 along K) ---------------------------------------------
GROUP = 32


@ts.kernel(grid=lambda X, WQ, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(WQ.shape[1], BN)))
def w8_group_gemm(X, WQ, S, Y, *, BM: int = 16, BN: int = 16):
    """Y (M, N) = X (M, K) @ (WQ (K, N) int8 * S[k // 32, n]), the weights dequantized into X's dtype."""
    i, j = ts.block_id(0), ts.block_id(1)
    a = ts.RegTile[X.dtype, BM, GROUP]()
    q = ts.RegTile[ts.i8, GROUP, BN]()
    wf = ts.RegTile[ts.f32, GROUP, BN]()
    w = ts.SharedTile[X.dtype, GROUP, BN]()
    sc = ts.RegVec[ts.f32, BN]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    ts.zero(acc)
    for g in ts.range(ts.cdiv(X.shape[1], GROUP)):   # a K tile is one group
        ts.load(a, X, at=(i, g))
        ts.load(q, WQ, at=(g, j))
        ts.load(sc, S, at=(g, j))                     # the group's row of scales (an element coordinate)
        ts.copy(wf, q)
        ts.mul(wf, wf, ts.per_col(sc))
        ts.copy(w, wf)
        ts.mma_AB(acc, a, w, acc)
    y = ts.RegTile[Y.dtype, BM, BN]()
    ts.copy(y, acc)
    ts.store(Y, y, at=(i, j))


def w8_ref(x, wq, s) -> torch.Tensor:
    K = wq.shape[0]
    scale = s.double().repeat_interleave(GROUP, dim=0)[:K]
    w = (wq.double() * scale).to(x.dtype).double()    # dequantized into x's dtype, as the kernel
    return x.double() @ w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF])
@pytest.mark.parametrize(("M", "K", "N"), [(19, 70, 23), (1, 32, 16), (5, 96, 1), (16, 7, 40)])
def test_w8_group_gemm(backend, dtype, M, K, N, rng):
    x = randn(rng, M, K, dtype=dtype)
    wq = torch.from_numpy(rng.integers(-128, 128, (K, N))).to(I8)
    wq[0, 0], wq[K - 1, N - 1] = -128, 127
    s = torch.from_numpy(rng.uniform(0.001, 0.02, (math.ceil(K / GROUP), N))).to(dtype)
    y = poisoned(M, N, dtype=dtype)
    launch(w8_group_gemm, backend, x, wq, s, y)
    close(y, w8_ref(x, wq, s), scale=math.sqrt(K))


@pytest.mark.parametrize("backend", BACKENDS)
def test_w8_group_gemm_each_group_takes_its_own_scale(backend):
    """One-hot activations pick single rows of W: each K row is scaled by its group's scale exactly (a scale read
    from the wrong group, or a group boundary off by one, shows as a factor of 2 or 3)."""
    K, N = 70, 5
    wq = torch.ones(K, N, dtype=I8) * 3
    s = torch.tensor([1.0, 2.0, 4.0])[:, None].repeat(1, N)
    x = torch.eye(K)[[0, 31, 32, 63, 64, 69]]
    y = poisoned(6, N)
    launch(w8_group_gemm, backend, x, wq, s, y)
    assert torch.equal(y[:, 0], torch.tensor([3.0, 3.0, 6.0, 6.0, 12.0, 12.0])), y
