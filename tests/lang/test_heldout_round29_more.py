"""Round 29 of held-out kernels, continued (test_heldout_round29.py has the first seven): on the reference executor and
Triton's interpreter against float64 torch or exact integers, outputs poisoned first, ragged sizes, seeds fixed.

- Conway's game of life on a u8 grid: the eight neighbours read through a (3, 3, H, W) overlapping view of the
  padded grid (dead border), the next generation written as u8 into the interior of the other padded buffer and as
  a bool mask of the births, generations by ping-pong launches; a blinker's period 2, a glider's shift after 4.
- Row-wise cosine similarity (F.cosine_similarity, torch's eps per norm: x.y / (max(|x|, eps) max(|y|, eps))) over
  D wider than a tile, y one row expanded over the batch (stride 0), zero rows, norms under eps.
- KL divergence (F.kl_div, log_target False and True): the pointwise terms with 0 log 0 = 0 for zero targets (a -inf
  log-probability under one NaN, as torch's xlogy(p, p) - p lq makes it), the batchmean summed over programs by
  atomics.
- k nearest neighbours (squared L2, ties by lower index): k passes over the keys' tiles, each pass the smallest
  (distance, index) pair after the previous pass's, merged across tiles in vectors; distances from one f32 product
  (|q|^2 + |k|^2 - 2 q.k) of small-integer points (exact in f32), duplicate points, k up to the number of keys; the
  k-th column written through the transposed view of the (Q, k) outputs.
- Misuse: the wrong uses a user makes, refused when traced or launched, each naming the argument.

What this round found: no kernel gave a wrong answer on either executor (nor in test_heldout_round29.py); each compiled
for sm_90a through Triton without spills. Fixed, each kept as its test here:
- Gluon: the game of life's `where(out, nxt, 1, 0)` into a u8 tile (two int constants) was an i32 tensor that the u8
  shared tile of its store refused at compile time ("source dtype int32 and destination dtype uint8 must match");
  converted to dst's dtype now (backends.gluon.emit_compute._e_select): test_life_compiles_for_sm90a_through_gluon;
- Gluon: a tile the user named `o` (or `s`, `bar`, `trip`: the stems of the backend's own variables) could be given
  the name of a store's or load's offsets (o_1 both), which then rebound it: a vector store wrote the offsets 0, 1,
  2, ... in place of the tile, silently, and a bool mask's store failed to compile; fresh names skip the values'
  now (backends.gluon.emitter.Emitter.fresh): test_gluon_keeps_a_tile_named_o_apart_from_its_offsets;
- language: Triton's pointer arithmetic on a global (`ts.load(x, X + off, ...)`) failed with Python's bare "unsupported
  operand type(s) for +: 'GlobalTensor' and 'Scalar'"; `len(t)` of a tile with "object of type 'Tile' has no len()",
  and `for v in t` with t[0]'s message; each names the value and the language's way now (lang.tiles):
  test_python_operations_on_globals_and_tiles_say_how_the_language_writes_them;
- Triton and Gluon: a tile size no power of two was named by the tile only; the constant it came from is named too now
  ("the constant BN=12 of this launch", backends.triton.passes.legalize, backends.gluon.passes.legalize):
  test_a_tile_shape_of_twelve_is_refused_by_triton_and_runs_on_the_reference and
  test_gluon_names_the_constant_of_a_tile_size_no_power_of_two.
- launch: a NumPy integer as a grid axis (fixed, or returned by the grid function) was refused though it is taken as a
  tile size; an error raised inside the grid function named neither kernel nor grid (lang.kernel):
  test_a_numpy_integer_is_a_number_of_programs, test_an_error_inside_the_grid_function_names_the_kernel.
Met, not changed: the Gluon backend multiplies only 16- and 8-bit floats on wgmma (the GRU layer and kNN keep f32
operands for exactness, so they compile through Triton only), as its error says.
"""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, I32, I64, close, launch, meta, randn
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a

import tilestack.lang as ts
from tilestack.errors import BackendError, LaunchError, TileShapeError, TraceError

F32, U8 = torch.float32, torch.uint8


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20262902)


def poisoned(*shape, dtype=F32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 6. Conway's game of life on u8 cells ----------------------------------------------------------------------------
@ts.kernel(grid=lambda NB, BM, BN: (ts.cdiv(NB.shape[2], BM), ts.cdiv(NB.shape[3], BN)))
def life_step(NB, NEXT, BORN, *, BM: int = 16, BN: int = 16):
    """NB (3, 3, H, W): NB[dy, dx] the grid shifted by (dy - 1, dx - 1); NEXT (H, W) u8 the next generation (1 alive,
    0 dead) and BORN (H, W) bool the cells alive next that are dead now."""
    i, j = ts.block_id(0), ts.block_id(1)
    cell, count, t = ts.RegTile[ts.u8, BM, BN](), ts.RegTile[ts.u8, BM, BN](), ts.RegTile[ts.u8, BM, BN]()
    ts.zero(count)
    for dy in range(3):
        for dx in range(3):
            if dy == 1 and dx == 1:
                ts.load(cell, NB, at=(1, 1, i, j))
            else:
                ts.load(t, NB, at=(dy, dx, i, j))
                ts.add(count, count, t)
    alive, three, two = ts.RegTile[ts.bool_, BM, BN](), ts.RegTile[ts.bool_, BM, BN](), ts.RegTile[ts.bool_, BM, BN]()
    ts.ne(alive, cell, 0)
    ts.eq(three, count, 3)
    ts.eq(two, count, 2)
    ts.logical_and(two, two, alive)
    nxt = ts.RegTile[ts.bool_, BM, BN]()
    ts.logical_or(nxt, three, two)
    born = ts.RegTile[ts.bool_, BM, BN]()
    ts.logical_not(born, alive)
    ts.logical_and(born, born, nxt)
    out = ts.RegTile[ts.u8, BM, BN]()
    ts.where(out, nxt, 1, 0)
    ts.store(NEXT, out, at=(i, j))
    ts.store(BORN, born, at=(i, j))


def halo(g_pad: torch.Tensor) -> torch.Tensor:
    H, W = g_pad.shape[0] - 2, g_pad.shape[1] - 2
    s0, s1 = g_pad.stride()
    return g_pad.as_strided((3, 3, H, W), (s0, s1, s0, s1), g_pad.storage_offset())


def life_ref(g: np.ndarray) -> np.ndarray:
    p = np.pad(g.astype(np.int64), 1)
    H, W = g.shape
    n = sum(p[dy:dy + H, dx:dx + W] for dy in range(3) for dx in range(3)) - g
    return ((n == 3) | ((g == 1) & (n == 2))).astype(np.uint8)


def run_life(backend, g: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    H, W = g.shape
    bufs = [torch.zeros(H + 2, W + 2, dtype=U8), torch.full((H + 2, W + 2), 7, dtype=U8)]
    bufs[1][0], bufs[1][-1], bufs[1][:, 0], bufs[1][:, -1] = 0, 0, 0, 0   # dead border; the interior poisoned
    bufs[0][1:-1, 1:-1] = g
    born = torch.ones(H, W, dtype=torch.bool)
    for s in range(steps):
        src, dst = bufs[s % 2], bufs[(s + 1) % 2]
        dst[1:-1, 1:-1] = 7
        launch(life_step, backend, halo(src), dst[1:-1, 1:-1], born)
    return bufs[steps % 2][1:-1, 1:-1], born


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("H", "W", "steps"), [(21, 37, 3), (16, 16, 1), (5, 3, 2)])
def test_life_random(backend, H, W, steps, rng):
    g = torch.from_numpy((rng.random((H, W)) < 0.4).astype(np.uint8))
    got, born = run_life(backend, g, steps)
    want, prev = g.numpy(), g.numpy()
    for _ in range(steps):
        prev, want = want, life_ref(want)
    assert torch.equal(got, torch.from_numpy(want))
    assert torch.equal(born, torch.from_numpy((want == 1) & (prev == 0)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_life_blinker_and_glider(backend):
    g = torch.zeros(9, 11, dtype=U8)
    g[1, 1:4] = 1                                              # a blinker, period 2
    glider = torch.tensor([[0, 1, 0], [0, 0, 1], [1, 1, 1]], dtype=U8)
    g[4:7, 5:8] = glider                                       # a glider: one cell down-right per 4 generations
    got, _ = run_life(backend, g, 4)
    want = torch.zeros_like(g)
    want[1, 1:4] = 1
    want[5:8, 6:9] = glider
    assert torch.equal(got, want)
    got, _ = run_life(backend, g, 1)
    assert got[0:3, 2].tolist() == [1, 1, 1] and int(got[0:3].sum()) == 3


# ---- 7. row-wise cosine similarity ---------------------------------------------------------------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def cosine_rows(X, Y, OUT, eps: float, *, BM: int = 16, BD: int = 16):
    """OUT[r] = X[r].Y[r] / (max(|X[r]|, eps) max(|Y[r]|, eps)) in f32 work (X, Y (R, D))."""
    i = ts.block_id(0)
    x, y = ts.RegTile[ts.f32, BM, BD](), ts.RegTile[ts.f32, BM, BD]()
    p = ts.RegTile[ts.f32, BM, BD]()
    dot, nx, ny = ts.RegVec[ts.f32, BM](), ts.RegVec[ts.f32, BM](), ts.RegVec[ts.f32, BM]()
    ts.zero(dot)
    ts.zero(nx)
    ts.zero(ny)
    for k in ts.range(ts.cdiv(X.shape[1], BD)):
        ts.load(x, X, at=(i, k))
        ts.load(y, Y, at=(i, k))
        ts.mul(p, x, y)
        ts.row_sum(dot, p, dot)
        ts.mul(p, x, x)
        ts.row_sum(nx, p, nx)
        ts.mul(p, y, y)
        ts.row_sum(ny, p, ny)
    ts.sqrt(nx, nx)
    ts.sqrt(ny, ny)
    ts.max(nx, nx, eps)
    ts.max(ny, ny, eps)
    ts.div(dot, dot, nx)
    ts.div(dot, dot, ny)
    out = ts.RegVec[OUT.dtype, BM]()
    ts.copy(out, dot)
    ts.store(OUT, out, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF])
@pytest.mark.parametrize(("R", "D"), [(19, 37), (3, 5), (17, 16)])
def test_cosine_rows(backend, dtype, R, D, rng):
    x, y = randn(rng, R, D, dtype=dtype), randn(rng, R, D, dtype=dtype)
    x[0] = 0.0                                                 # |x| = 0: 0 / eps
    if R > 2:
        y[1] = x[1] * -3                                       # exactly opposite
        x[2] *= 1e-4                                           # |x| under a large eps
    for eps in (1e-8, 1e-2):
        out = poisoned(R, dtype=dtype)
        launch(cosine_rows, backend, x, y, out, eps)
        close(out, F.cosine_similarity(x.double(), y.double(), dim=1, eps=eps), scale=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_against_one_row_expanded(backend, rng):
    x, y = randn(rng, 9, 40), randn(rng, 1, 40)
    out = poisoned(9)
    launch(cosine_rows, backend, x, y.expand(9, 40), out, 1e-8)
    close(out, F.cosine_similarity(x.double(), y.double(), dim=1))


# ---- 8. KL divergence ------------------------------------------------------------------------------------------------
@ts.kernel(grid=lambda LQ, BM, BN: (ts.cdiv(LQ.shape[0], BM), ts.cdiv(LQ.shape[1], BN)))
def kl_div(LQ, P, OUT, TOTAL, *, BM: int = 16, BN: int = 16, LOG_TARGET: bool = False):
    """OUT = P (log P - LQ) (0 where P = 0) or, LOG_TARGET, exp(P) (P - LQ); TOTAL[0] += the tile's sum / rows."""
    i, j = ts.block_id(0), ts.block_id(1)
    lq, p = ts.RegTile[ts.f32, BM, BN](), ts.RegTile[ts.f32, BM, BN]()
    ts.load(lq, LQ, at=(i, j))
    ts.load(p, P, at=(i, j))
    term = ts.RegTile[ts.f32, BM, BN]()
    if LOG_TARGET:
        e = ts.RegTile[ts.f32, BM, BN]()
        ts.exp(e, p)
        ts.sub(term, p, lq)
        ts.mul(term, term, e)
        # padding: p = 0 and lq = 0 there, e = 1: a term of 0
    else:                                              # torch's xlogy(p, p) - p lq: 0 log 0 = 0, but 0 (-inf) NaN
        zero = ts.RegTile[ts.bool_, BM, BN]()
        ts.eq(zero, p, 0.0)
        ts.log(term, p)
        ts.mul(term, term, p)
        ts.where(term, zero, 0.0, term)
        plq = ts.RegTile[ts.f32, BM, BN]()
        ts.mul(plq, p, lq)
        ts.sub(term, term, plq)
    out = ts.RegTile[OUT.dtype, BM, BN]()
    ts.copy(out, term)
    ts.store(OUT, out, at=(i, j))
    part, tot = ts.RegVec[ts.f32, BM](), ts.RegVec[ts.f32, 1]()
    ts.row_sum(part, term)
    one = ts.RegTile[ts.f32, 1, BM]()
    ts.zero(one)
    ts.add(one, one, ts.per_col(part))
    ts.row_sum(tot, one)
    ts.mul(tot, tot, 1.0 / LQ.shape[0])
    ts.atomic_add(TOTAL, tot, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("dtype", [F32, BF])
@pytest.mark.parametrize(("R", "C"), [(7, 37), (18, 5)])
def test_kl_div(backend, log_target, dtype, R, C, rng):
    lq = torch.log_softmax(randn(rng, R, C) * 2, dim=1).to(dtype)
    p = torch.softmax(randn(rng, R, C) * 2, dim=1)
    if not log_target:
        p[0, : C // 2] = 0.0                                   # zero targets: terms of 0 (xlogy)
    p = (p.log() if log_target else p).to(dtype)
    out, total = poisoned(R, C, dtype=dtype), torch.zeros(1)
    launch(kl_div, backend, lq, p, out, total, LOG_TARGET=log_target)
    want = F.kl_div(lq.double(), p.double(), reduction="none", log_target=log_target)
    close(out, want, scale=2)
    assert not torch.isnan(out).any()
    close(total[0], want.sum() / R, dtype=F32, scale=4)
    # a log-probability of -inf: 0 (-inf) is NaN under a zero target as in torch, +inf under a positive one
    lq[0, 0] = -math.inf
    p[0, 0] = -math.inf if log_target else 0.0
    lq[1, 0] = -math.inf
    out = poisoned(R, C, dtype=dtype)
    launch(kl_div, backend, lq, p, out, torch.zeros(1), LOG_TARGET=log_target)
    want = F.kl_div(lq.double(), p.double(), reduction="none", log_target=log_target)
    assert math.isnan(want[0, 0]) and want[1, 0] == math.inf
    close(out, want, scale=2)


# ---- 9. k nearest neighbours by k passes -----------------------------------------------------------------------------
BIG = 2**62   # above every key index: the "no index" of a merge


@ts.kernel(grid=lambda Q, BQ: (ts.cdiv(Q.shape[0], BQ),))
def knn(Q, KEYS, DT, IT, *, K: int = 3, BQ: int = 16, BK: int = 16, BD: int = 16):
    """For each query row of Q (NQ, D): the K keys of KEYS (NK, D) nearest in squared L2, ascending, ties by the
    lower index; DT (K, NQ) their distances and IT (K, NQ) their indices (the transposed views of (NQ, K))."""
    qb = ts.block_id(0)
    nk = KEYS.shape[0]
    q = ts.RegTile[ts.f32, BQ, BD]()
    ts.load(q, Q, at=(qb, 0))
    qq, sq = ts.RegTile[ts.f32, BQ, BD](), ts.RegVec[ts.f32, BQ]()
    ts.mul(qq, q, q)
    ts.row_sum(sq, qq)
    kt, kk = ts.RegTile[ts.f32, BK, BD](), ts.RegTile[ts.f32, BK, BD]()
    sk = ts.RegVec[ts.f32, BK]()
    d = ts.RegTile[ts.f32, BQ, BK]()
    idx = ts.RegVec[ts.i64, BK]()
    valid = ts.RegVec[ts.bool_, BK]()
    prev_d, prev_i = ts.RegVec[ts.f32, BQ](), ts.RegVec[ts.i64, BQ]()
    ts.neg_infty(prev_d)
    ts.fill(prev_i, -1)
    best_d, best_i = ts.RegVec[ts.f32, BQ](), ts.RegVec[ts.i64, BQ]()
    td, ti = ts.RegVec[ts.f32, BQ](), ts.RegVec[ts.i64, BQ]()
    after, t = ts.RegTile[ts.bool_, BQ, BK](), ts.RegTile[ts.bool_, BQ, BK]()
    cand = ts.RegTile[ts.f32, BQ, BK]()
    ci = ts.RegTile[ts.i64, BQ, BK]()
    better, tie = ts.RegVec[ts.bool_, BQ](), ts.RegVec[ts.bool_, BQ]()
    for p in range(K):
        ts.pos_infty(best_d)
        ts.fill(best_i, BIG)
        for kb in ts.range(ts.cdiv(nk, BK)):
            ts.load(kt, KEYS, at=(kb, 0))
            ts.mul(kk, kt, kt)
            ts.row_sum(sk, kk)
            ts.zero(d)
            ts.mma_ABt(d, q, kt, d)                           # (BQ, BK) q.k
            ts.mul(d, d, -2.0)
            ts.add(d, d, ts.per_col(sk))
            ts.add(d, d, ts.per_row(sq))
            ts.arange(idx, kb * BK)
            ts.lt(valid, idx, nk)
            # after the previous pick: d > prev_d, or d == prev_d and index > prev_i
            ts.gt(after, d, ts.per_row(prev_d))
            ts.eq(t, d, ts.per_row(prev_d))
            tie_i = ts.RegTile[ts.bool_, BQ, BK]()
            ts.gt(tie_i, ts.per_col(idx), ts.per_row(prev_i))
            ts.logical_and(t, t, tie_i)
            ts.logical_or(after, after, t)
            ts.logical_and(after, after, ts.per_col(valid))
            ts.where(cand, after, d, math.inf)
            ts.row_min(td, cand)
            ts.eq(t, cand, ts.per_row(td))
            ts.logical_and(t, t, after)
            ts.where(ci, t, ts.per_col(idx), BIG)
            ts.row_min(ti, ci)
            # merge (td, ti) into (best_d, best_i) lexicographically
            ts.lt(better, td, best_d)
            ts.eq(tie, td, best_d)
            lower = ts.RegVec[ts.bool_, BQ]()
            ts.lt(lower, ti, best_i)
            ts.logical_and(tie, tie, lower)
            ts.logical_or(better, better, tie)
            ts.where(best_d, better, td, best_d)
            ts.where(best_i, better, ti, best_i)
        od, oi = ts.RegVec[DT.dtype, BQ](), ts.RegVec[IT.dtype, BQ]()
        ts.copy(od, best_d)
        ts.copy(oi, best_i)
        ts.store(DT, od, at=(p, qb))
        ts.store(IT, oi, at=(p, qb))
        ts.copy(prev_d, best_d)
        ts.copy(prev_i, best_i)


def knn_ref(q: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = ((q.double()[:, None, :] - keys.double()[None]) ** 2).sum(-1)    # (NQ, NK), exact for small integers
    order = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return torch.gather(d, 1, order), order


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("NQ", "NK", "D", "K"), [(19, 37, 3, 3), (5, 4, 7, 4), (16, 17, 16, 2), (3, 1, 2, 1)])
def test_knn(backend, NQ, NK, D, K, rng):
    q = torch.from_numpy(rng.integers(-4, 5, (NQ, D))).float()
    keys = torch.from_numpy(rng.integers(-4, 5, (NK, D))).float()
    if NK > 3:
        keys[3] = keys[1]                                      # a duplicate point: ties broken by index
    q[0] = keys[NK - 1]                                        # distance 0
    dist, idx = poisoned(NQ, K), torch.full((NQ, K), -7, dtype=I64)
    launch(knn, backend, q, keys, dist.T, idx.T, K=K)
    want_d, want_i = knn_ref(q, keys, K)
    assert torch.equal(idx, want_i), (idx, want_i)
    assert torch.equal(dist.double(), want_d)


# ---- misuse ----------------------------------------------------------------------------------------------------------
@ts.kernel(grid=(1,))
def mixed_add(X, I, Y, *, BN: int = 16):
    x, i = ts.RegVec[ts.f32, BN](), ts.RegVec[ts.i32, BN]()
    ts.load(x, X, at=(0,))
    ts.load(i, I, at=(0,))
    ts.add(x, x, i)
    ts.store(Y, x, at=(0,))


@ts.kernel(grid=(1,))
def copy_vec(X, Y, *, BN: int = 16):
    x = ts.RegVec[ts.f32, BN]()
    ts.load(x, X, at=(0,))
    ts.store(Y, x, at=(0,))


@ts.kernel(grid=(1,))
def load_at_a_float_read(X, OFF, Y, *, BN: int = 16):
    o = ts.load_scalar(OFF, 0)
    x = ts.RegVec[ts.f32, BN]()
    ts.load(x, X, at=(o,))
    ts.store(Y, x, at=(0,))


@ts.kernel(grid=(1,))
def store_a_tile_into_a_vector(X, Y, *, BN: int = 16):
    x = ts.RegTile[ts.f32, BN, BN]()
    ts.load(x, X, at=(0, 0))
    ts.store(Y, x, at=(0,))


@ts.kernel(grid=(1,))
def scale_by(X, Y, s: float, n: int, *, BN: int = 16):
    x = ts.RegVec[ts.f32, BN]()
    for i in ts.range(n):
        ts.load(x, X, at=(i,))
        ts.mul(x, x, s)
        ts.store(Y, x, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_misuse_is_refused_naming_the_argument(backend):
    x, y = torch.zeros(16), poisoned(16)
    cases = [
        (lambda: launch(mixed_add, backend, x, torch.zeros(16, dtype=I32), y), "`i` is i32"),
        (lambda: launch(load_at_a_float_read, backend, x, torch.zeros(2), y), "`OFF`"),
        (lambda: launch(store_a_tile_into_a_vector, backend, torch.zeros(16, 16), y), "`Y`"),
        (lambda: launch(copy_vec, backend, 3.0, y), "argument X"),
        (lambda: launch(copy_vec, backend, x.numpy(), y), "argument X"),
        (lambda: launch(scale_by, backend, x, y, x, 1), "argument s"),
        (lambda: launch(scale_by, backend, x, y, 2.0, 1.5), "argument n"),
        (lambda: launch(scale_by, backend, x, y, 2.0, torch.tensor(1)), "argument n"),
    ]
    for call, fragment in cases:
        with pytest.raises((TraceError, LaunchError), match=re.escape(fragment)):
            call()
    assert torch.isnan(y).all()                                # nothing ran


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tile_shape_of_twelve_is_refused_by_triton_and_runs_on_the_reference(backend):
    x, y = torch.arange(12.0), poisoned(12)
    if backend == "triton":
        with pytest.raises(BackendError, match=r"power-of-two tile sizes; load uses a RegVec\[f32, 12\].*the constant "
                                               r"BN=12 of this launch"):
            launch(copy_vec, backend, x, y, BN=12)
        assert torch.isnan(y).all()
    else:
        launch(copy_vec, backend, x, y, BN=12)
        assert torch.equal(y, x)


def test_store_shape_error_names_the_tile_and_tensor():
    with pytest.raises(TileShapeError, match=r"RegTile\[f32, 16, 16\] does not fit rank-1 `Y`"):
        launch(store_a_tile_into_a_vector, "reference", torch.zeros(16, 16), torch.zeros(16))


@ts.kernel(grid=(1,))
def pointer_offset(X, Y, off: int, *, BN: int = 16):
    x = ts.RegVec[ts.f32, BN]()
    ts.load(x, X + off, at=(0,))                               # Triton's pointer arithmetic
    ts.store(Y, x, at=(0,))


@ts.kernel(grid=(1,))
def tile_length(X, Y, *, BN: int = 16):
    x = ts.RegVec[ts.f32, BN]()
    ts.load(x, X, at=(0,))
    ts.mul(x, x, len(x))
    ts.store(Y, x, at=(0,))


@ts.kernel(grid=(1,))
def tile_iteration(X, Y, *, BN: int = 16):
    x = ts.RegVec[ts.f32, BN]()
    ts.load(x, X, at=(0,))
    for v in x:
        ts.store(Y, v, at=(0,))


def test_python_operations_on_globals_and_tiles_say_how_the_language_writes_them():
    """Were Python's bare TypeErrors ("unsupported operand type(s) for +: 'GlobalTensor' and 'Scalar'", "object of
    type 'Tile' has no len()") or the message of t[0] for a loop over a tile; now each names the value and the way."""
    x, y = torch.zeros(16), poisoned(16)
    with pytest.raises(TraceError, match=r"`\+` on the global tensor `X`: a global is not a pointer.*at=\(\.\.\.\)"):
        launch(pointer_offset, "reference", x, y, 3)
    with pytest.raises(TraceError, match=r"`len\(\)` on a tile: its shape is `x`\.shape.*\(16\)"):
        launch(tile_length, "reference", x, y)
    with pytest.raises(TraceError, match=r"`for \.\.\. in` on a tile.*ts\.range"):
        launch(tile_iteration, "reference", x, y)
    assert torch.isnan(y).all()


# ---- this round's kernels compiled for sm_90a ------------------------------------------------------------------------
def _life_args():
    return meta(3, 3, 64, 64, dtype=U8), meta(64, 64, dtype=U8), meta(64, 64, dtype=torch.bool)


def test_life_compiles_for_sm90a_through_gluon():
    """Was a compile error in Gluon: where(u8 tile, m, 1, 0) of two int constants made an i32 tensor, and the u8
    shared tile of NEXT's store took only u8 ("source dtype int32 and destination dtype uint8 must match");
    backends.gluon.emit_compute._e_select converts it to dst's dtype now."""
    compile_gluon_sm90a(life_step, _life_args(), {})


@pytest.mark.parametrize("case", ["life", "cosine", "kl_log", "knn", "hamming", "gru"])
def test_round29_compiles_for_sm90a_through_triton(case):
    from test_heldout_round29 import gru_layer, hamming
    bf = torch.bfloat16
    kernel, args, consts = {
        "hamming": (hamming, (meta(64, 8, dtype=U8).T, meta(64, 8, dtype=U8).T, meta(64, 64, dtype=I32)),
                    {"BQ": 64, "BK": 64}),
        "gru": (gru_layer, (meta(4, 33, 16, dtype=bf), meta(33, 16, dtype=bf), meta(3, 16, 16, dtype=bf),
                            meta(3, 16, 16, dtype=bf), meta(3, 16, dtype=bf), meta(3, 16, dtype=bf),
                            meta(4, 33, 16, dtype=bf), meta(33, 16, dtype=bf), 4), {}),
        "life": (life_step, _life_args(), {}),
        "cosine": (cosine_rows, (meta(64, 100), meta(64, 100), meta(64), 1e-8), {}),
        "kl_log": (kl_div, (meta(64, 100), meta(64, 100), meta(64, 100), meta(1)), {"LOG_TARGET": True}),
        "knn": (knn, (meta(64, 16), meta(100, 16), meta(3, 64), meta(3, 64, dtype=I64)), {"K": 3}),
    }[case]
    check_triton_sm90a(kernel, args, consts)


# ---- Gluon: a tile named as the backend's own offset variables -------------------------------------------------------
@ts.kernel(grid=(1,))
def fill_named_o(Y, *, BN: int = 64):
    o = ts.RegVec[ts.i32, BN]()
    ts.fill(o, 7)
    ts.store(Y, o, at=(0,))


@ts.kernel(grid=(1,))
def fill_mask_named_o(Y, *, BM: int = 64, BN: int = 64):
    o = ts.RegTile[ts.bool_, BM, BN]()
    ts.fill(o, 1)
    ts.store(Y, o, at=(0, 0))


def _assigned(src: str, kernel_name: str) -> list[str]:
    body = src.split(f"def {kernel_name}_kernel")[1]
    return re.findall(r"^\s+(\w+) = ", body, flags=re.M)


def test_gluon_keeps_a_tile_named_o_apart_from_its_offsets():
    """Were one name in Gluon's source: the user's tile `o` (o_1) and the store's offsets (fresh o_1), so the offsets
    rebound the tile and the store wrote 0, 1, 2, ... where 7 was meant (a (64, 64) bool mask failed to compile:
    "Cannot broadcast, rank mismatch"). backends.gluon.emitter.Emitter.fresh skips the names values have."""
    from tilestack.backends import get_backend
    src = get_backend("gluon").source(fill_named_o.trace(meta(64, dtype=I32)))
    names = _assigned(src, "fill_named_o")
    assert len(names) == len(set(names)), src
    stored = re.search(r"gl\.store\([^,]+, (\w+),", src).group(1)
    assert re.search(rf"^\s+{stored} = gl\.full\(\[64\], 7,", src, flags=re.M), src
    compile_gluon_sm90a(fill_mask_named_o, (meta(64, 64, dtype=torch.bool),), {})


def test_gluon_names_the_constant_of_a_tile_size_no_power_of_two():
    traced = copy_vec.trace(meta(16), meta(16), BN=12)
    with pytest.raises(BackendError, match=r"gluon backend needs power-of-two tile sizes; load uses a "
                                           r"RegVec\[f32, 12\] \(the constant BN=12 of this launch\)"):
        traced.source("gluon")


# ---- grids -----------------------------------------------------------------------------------------------------------
def _copy_rows(X, Y, *, BN: int = 4):
    x = ts.RegVec[ts.f32, BN]()
    ts.load(x, X, at=(ts.block_id(0),))
    ts.store(Y, x, at=(ts.block_id(0),))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_numpy_integer_is_a_number_of_programs(backend):
    """Was refused ("grid axis 0 is int64 np.int64(2); expected ... an int"), fixed or returned by the grid function,
    though a NumPy integer is taken as a tile size and a constant (lang.kernel)."""
    for grid in ((np.int64(2),), lambda X, BN: (np.int32(2),)):
        k = ts.kernel(grid=grid)(_copy_rows)
        y = poisoned(8)
        launch(k, backend, torch.arange(8.0), y)
        assert torch.equal(y, torch.arange(8.0))


def test_an_error_inside_the_grid_function_names_the_kernel():
    """A bare KeyError from the grid function named neither the kernel nor the grid: a note says both."""
    per_row = {}
    k = ts.kernel(grid=lambda X, BN: (per_row[BN],))(_copy_rows)          # a table without the key
    with pytest.raises(KeyError) as err:
        launch(k, "reference", torch.arange(8.0), poisoned(8))
    assert "while computing the grid of kernel _copy_rows" in "".join(getattr(err.value, "__notes__", []))
