"""Round 7 of held-out kernels (after test_heldout_kernels.py and rounds 2-6): kernels of kinds no earlier round
wrote, each on the reference executor and Triton's interpreter against float64 / exact torch, outputs poisoned first.

A fused AdamW step over flat buffers (f32 master weights and moments updated in place, a bf16 copy of the weights
out, AMSGrad as a constexpr) checked step by step against torch.optim.AdamW; gradient clipping by the global norm in
two launches (squares summed atomically into one element, then read back as a per-row broadcast); scans along rows
that no matmul can do (cummax / cummin with torch's indices, logcumsumexp), carried across column tiles by a loop
unrolled over a tile's columns; bucketize against a runtime number of boundaries (NaN past the last, as torch);
segment sums, maxima and means by data ids in any order; bits reversed and Gray codes of i8 / i32 / i64 by operator
sugar. More kernels of this round, and the bugs the round found, are in test_heldout_round7_more.py. Each kernel here
is also compiled for sm_90a on this CPU (the last section). (No kernel of this file found a bug.)
"""

import math

import pytest
import torch
from heldout_support import BACKENDS, BF, F16, F64, I8, I32, I64, close, ints, launch, meta, randn, wrap
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a

import tilestack.lang as ts

POISON = -77.0


def poisoned(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.full(shape, POISON, dtype=dtype)


# ---- 1. a fused AdamW step over flat buffers: f32 master weights and moments in place, bf16 weights out -----------
@ts.kernel(grid=lambda P, BN: (ts.cdiv(P.shape[0], BN),))
def adamw_step(P, G, M, V, Vmax, P16, lr: float, beta1: float, beta2: float, eps: float, wd: float, bc1: float,
               bc2_sqrt: float, *, AMSGRAD: bool = False, BN: int = 64):
    """One torch.optim.AdamW step on (N,) buffers: P, M, V (and Vmax with AMSGRAD) f32, read and written in place;
    G the gradient (any float dtype); P16 the new weights in P16's dtype. bc1 = 1 - beta1**t, bc2_sqrt =
    sqrt(1 - beta2**t) for step t."""
    i = ts.block_id(0)
    p = ts.RegVec[ts.f32, BN]()
    g = ts.RegVec[ts.f32, BN]()
    m = ts.RegVec[ts.f32, BN]()
    v = ts.RegVec[ts.f32, BN]()
    t = ts.RegVec[ts.f32, BN]()
    p16 = ts.RegVec[P16.dtype, BN]()
    ts.load(p, P, at=(i,))
    ts.load(g, G, at=(i,))
    ts.load(m, M, at=(i,))
    ts.load(v, V, at=(i,))
    ts.mul(p, p, 1.0 - lr * wd)                      # decoupled weight decay first, as torch
    ts.mul(m, m, beta1)
    ts.mul(t, g, 1.0 - beta1)
    ts.add(m, m, t)
    ts.mul(v, v, beta2)
    ts.mul(t, g, g)
    ts.mul(t, t, 1.0 - beta2)
    ts.add(v, v, t)
    ts.store(M, m, at=(i,))
    ts.store(V, v, at=(i,))
    if AMSGRAD:
        vmax = ts.RegVec[ts.f32, BN]()
        ts.load(vmax, Vmax, at=(i,))
        ts.max(v, vmax, v)                           # NaN propagates, as torch.maximum
        ts.store(Vmax, v, at=(i,))
    ts.sqrt(t, v)
    ts.div(t, t, bc2_sqrt)
    ts.add(t, t, eps)
    ts.div(t, m, t)
    ts.mul(t, t, lr / bc1)
    ts.sub(p, p, t)
    ts.store(P, p, at=(i,))
    ts.copy(p16, p)
    ts.store(P16, p16, at=(i,))


HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gdt", [torch.float32, BF, F16])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("N", [1000, 63, 1, 0])
def test_adamw_step_matches_torch(backend, gdt, amsgrad, N, rng):
    """Three steps against torch.optim.AdamW in float64 (the kernel's state stays f32); the last gradient holds NaN,
    +-inf and +-1e18 (whose square still fits f32), which reach the weights as torch's do."""
    p = randn(rng, N)
    ref = torch.nn.Parameter(p.double())
    opt = torch.optim.AdamW([ref], amsgrad=amsgrad, foreach=False, **HYPER)
    m, v, vmax = torch.zeros(N), torch.zeros(N), torch.zeros(N) if amsgrad else torch.empty(0)
    (b1, b2), lr = HYPER["betas"], HYPER["lr"]
    for step in (1, 2, 3):
        g = randn(rng, N, dtype=gdt) * 10 ** (step - 2)
        if step == 3 and N >= 6:
            g[:6] = torch.tensor([math.nan, math.inf, -math.inf, 1e18, -1e18, 0.0]).to(gdt)
        ref.grad = g.double()
        opt.step()
        p16 = poisoned(N, dtype=BF)
        launch(adamw_step, backend, p, g, m, v, vmax, p16, lr, b1, b2, HYPER["eps"], HYPER["weight_decay"],
               1 - b1**step, math.sqrt(1 - b2**step), AMSGRAD=amsgrad)
        state = opt.state[ref]
        close(m, state["exp_avg"].float(), scale=10 ** (step - 2))
        close(v, state["exp_avg_sq"].float(), scale=10 ** (2 * step - 4))
        if amsgrad:
            close(vmax, state["max_exp_avg_sq"].float(), scale=10 ** (2 * step - 4))
        close(p, ref.detach().float(), scale=10)
        close(p16, ref.detach().to(BF))
    if N >= 6:
        assert torch.equal(p[:6].isnan(), ~g[:6].isfinite())        # NaN and inf gradients (1e18 in f16): NaN weights


# ---- 2. gradient clipping by the global norm: squares summed atomically into one element, then a second launch -------
@ts.kernel(grid=lambda G, BN: (ts.cdiv(G.shape[1], BN),))
def sum_squares(G, Total, *, BN: int = 256):
    """Total[0] += sum of G's squares, G a flat buffer viewed as (1, N); Total (1,) f32 or f64."""
    j = ts.block_id(0)
    g = ts.RegTile[ts.f32, 1, BN]()
    s = ts.RegVec[ts.f32, 1]()
    ts.load(g, G, at=(0, j))
    ts.mul(g, g, g)
    ts.row_sum(s, g)
    ts.atomic_add(Total, s, at=(0,))


@ts.kernel(grid=lambda G, BN: (ts.cdiv(G.shape[1], BN),))
def clip_by_norm(G, Total, Y, max_norm: float, *, BN: int = 256):
    """Y = G * min(1, max_norm / (sqrt(Total[0]) + 1e-6)) (torch.nn.utils.clip_grad_norm_), the one-element total
    broadcast over the (1, BN) tile as a per-row vector."""
    j = ts.block_id(0)
    g = ts.RegTile[ts.f32, 1, BN]()
    coef = ts.RegVec[ts.f32, 1]()
    norm = ts.RegVec[ts.f32, 1]()
    y = ts.RegTile[Y.dtype, 1, BN]()
    ts.load(norm, Total, at=(0,))
    ts.sqrt(norm, norm)
    ts.add(norm, norm, 1e-6)
    ts.zero(coef)
    ts.add(coef, coef, max_norm)
    ts.div(coef, coef, norm)
    ts.min(coef, coef, 1.0)                          # NaN propagates: a NaN norm makes every gradient NaN, as torch
    ts.load(g, G, at=(0, j))
    ts.mul(g, g, ts.per_row(coef))
    ts.copy(y, g)
    ts.store(Y, y, at=(0, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gdt", [torch.float32, BF])
@pytest.mark.parametrize("tdt", [torch.float32, F64])
@pytest.mark.parametrize(("N", "max_norm", "special"), [(3000, 1.0, None), (777, 1e6, None), (300, 1.0, math.inf),
                                                        (300, 1.0, math.nan), (1, 0.5, None), (0, 1.0, None)])
def test_clip_by_global_norm(backend, gdt, tdt, N, max_norm, special, rng):
    g = randn(rng, N, dtype=gdt)
    if special is not None:
        g[7] = special
    total = torch.zeros(1, dtype=tdt)
    launch(sum_squares, backend, g.view(1, N), total)
    ref = torch.nn.Parameter(torch.zeros(N, dtype=F64))
    ref.grad = g.double()
    norm = torch.nn.utils.clip_grad_norm_([ref], max_norm, foreach=False)
    close(total.sqrt(), norm.to(tdt).reshape(1), torch.float32, scale=10)
    y = poisoned(1, N, dtype=gdt)
    launch(clip_by_norm, backend, g.view(1, N), total, y, max_norm)
    close(y.reshape(N), ref.grad.to(gdt), scale=4)
    if special is not None:
        assert y.isnan().all() if math.isnan(special) else y[0, 7].isnan() and (y[0, :7] == 0).all()


# ---- 3. cummax / cummin with torch's indices along rows: a scan unrolled over a tile's columns, carried across tiles
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def row_cumext(X, Y, I, *, MODE: str = "max", BM: int = 8, BN: int = 16):
    """Y, I = torch.cummax(X, 1) (MODE "max") or torch.cummin: a later equal value takes the index; the first NaN
    takes it and keeps it. Column c of a tile: the row's running best against X[:, c], picked out by a mask."""
    i = ts.block_id(0)
    n = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    t = ts.RegTile[ts.f32, BM, BN]()
    y = ts.RegTile[Y.dtype, BM, BN]()
    idx = ts.RegTile[ts.i64, BM, BN]()
    col = ts.RegVec[ts.i32, BN]()
    at_c = ts.RegTile[ts.bool_, BM, BN]()
    xc = ts.RegVec[ts.f32, BM]()
    best = ts.RegVec[ts.f32, BM]()
    best_i = ts.RegVec[ts.i64, BM]()
    take = ts.RegVec[ts.bool_, BM]()
    nan = ts.RegVec[ts.bool_, BM]()
    fill = -math.inf if MODE == "max" else math.inf
    ts.fill(best, fill)
    ts.zero(best_i)
    ts.arange(col)
    for j in ts.range(ts.cdiv(n, BN)):
        ts.load(x, X, at=(i, j))
        ts.zero(y)
        ts.zero(idx)
        for c in range(BN):                          # (a Python loop: unrolled when traced)
            ts.eq(at_c, ts.per_col(col), c)
            ts.where(t, at_c, x, fill)
            (ts.row_max if MODE == "max" else ts.row_min)(xc, t)     # column c alone (NaN kept)
            (ts.ge if MODE == "max" else ts.le)(take, xc, best)
            ts.ne(nan, xc, xc)
            ts.logical_or(take, take, nan)
            ts.ne(nan, best, best)                   # once the best is NaN, nothing replaces it
            ts.logical_not(nan, nan)
            ts.logical_and(take, take, nan)
            ts.where(best, take, xc, best)
            ts.where(best_i, take, j * BN + c, best_i)
            ts.where(y, at_c, ts.per_row(best), y)
            ts.where(idx, at_c, ts.per_row(best_i), idx)
        ts.store(Y, y, at=(i, j))
        ts.store(I, idx, at=(i, j))


def with_ties_and_nans(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to halves (many ties), with rows of NaN, -inf and +inf entries where it has room."""
    x = (x * 2).round() / 2
    M, N = x.shape
    if M >= 4 and N >= 5:
        x[0, 3] = math.nan
        x[1, :] = -math.inf
        x[2, 1], x[2, 4] = math.inf, math.nan
        x[3, :] = 1.5
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["max", "min"])
@pytest.mark.parametrize("ydt", [torch.float32, BF])
@pytest.mark.parametrize(("M", "N"), [(8, 16), (13, 37), (1, 1), (3, 0)])
def test_row_cummax_cummin_with_indices(backend, mode, ydt, M, N, rng):
    x = with_ties_and_nans(randn(rng, M, N))
    y, idx = poisoned(M, N, dtype=ydt), torch.full((M, N), -5, dtype=I64)
    launch(row_cumext, backend, x, y, idx, MODE=mode)
    want = (torch.cummax if mode == "max" else torch.cummin)(x.double(), 1)
    close(y, want.values.to(ydt))
    assert torch.equal(idx, want.indices)


# ---- 4. logcumsumexp along rows: logaddexp of the running value and each column, in a form safe at +-inf ------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def row_logcumsumexp(X, Y, *, BM: int = 8, BN: int = 16):
    """Y = torch.logcumsumexp(X, 1) in X's float work: run = max + log(1 + exp(min - max)) of (run, X[:, c]), the
    difference taken as 0 where the two are equal (both -inf or both +inf would make it NaN)."""
    i = ts.block_id(0)
    n = X.shape[1]
    x = ts.RegTile[X.dtype, BM, BN]()
    t = ts.RegTile[X.dtype, BM, BN]()
    y = ts.RegTile[X.dtype, BM, BN]()
    col = ts.RegVec[ts.i32, BN]()
    at_c = ts.RegTile[ts.bool_, BM, BN]()
    xc = ts.RegVec[X.dtype, BM]()
    run = ts.RegVec[X.dtype, BM]()
    hi = ts.RegVec[X.dtype, BM]()
    d = ts.RegVec[X.dtype, BM]()
    same = ts.RegVec[ts.bool_, BM]()
    ts.neg_infty(run)
    ts.arange(col)
    for j in ts.range(ts.cdiv(n, BN)):
        ts.load(x, X, at=(i, j))
        ts.zero(y)
        for c in range(BN):
            ts.eq(at_c, ts.per_col(col), c)
            ts.where(t, at_c, x, -math.inf)
            ts.row_max(xc, t)
            ts.max(hi, run, xc)                      # NaN in either: NaN from here on
            ts.min(d, run, xc)
            ts.sub(d, d, hi)
            ts.eq(same, run, xc)
            ts.where(d, same, 0.0, d)
            ts.exp(d, d)
            ts.add(d, d, 1.0)
            ts.log(d, d)
            ts.add(run, hi, d)
            ts.where(y, at_c, ts.per_row(run), y)
        ts.store(Y, y, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", [torch.float32, F64])
@pytest.mark.parametrize(("M", "N"), [(8, 16), (11, 35), (1, 1), (0, 5)])
def test_row_logcumsumexp(backend, dt, M, N, rng):
    x = randn(rng, M, N, dtype=dt) * 30
    if M >= 5 and N >= 5:
        x[0, :] = -math.inf
        x[1, 2] = math.inf
        x[2, 3], x[2, 0] = math.nan, -math.inf
        x[3, :3] = torch.tensor([math.inf, math.inf, 1.0])
        x[4, :] = -1e4                               # exp underflows: a rescaling the form must not need
    y = poisoned(M, N, dtype=dt)
    launch(row_logcumsumexp, backend, x, y)
    close(y, torch.logcumsumexp(x.double(), 1).to(dt), scale=10)


# ---- 5. bucketize against a runtime number of sorted boundaries: a (BN, BK) compare per boundary block -------------
@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def bucketize(X, Bounds, Out, *, RIGHT: bool = False, BN: int = 32, BK: int = 16):
    """Out = torch.bucketize(X, Bounds, right=RIGHT): the number of boundaries b with not (x <= b) (not (x < b) with
    RIGHT), so NaN lands past the last boundary, as torch puts it; X and Bounds of one dtype, Out i32 or i64."""
    i = ts.block_id(0)
    nb = Bounds.shape[0]
    x = ts.RegVec[X.dtype, BN]()
    b = ts.RegVec[X.dtype, BK]()
    k = ts.RegVec[ts.i32, BK]()
    real = ts.RegVec[ts.bool_, BK]()
    below = ts.RegTile[ts.bool_, BN, BK]()
    cnt = ts.RegTile[Out.dtype, BN, BK]()
    out = ts.RegVec[Out.dtype, BN]()
    ts.load(x, X, at=(i,))
    ts.zero(out)
    for kb in ts.range(ts.cdiv(nb, BK)):
        ts.load(b, Bounds, at=(kb,))
        ts.arange(k, kb * BK)
        ts.lt(real, k, nb)                           # boundaries past the end read as 0: not boundaries
        (ts.lt if RIGHT else ts.le)(below, ts.per_row(x), ts.per_col(b))
        ts.logical_not(below, below)
        ts.logical_and(below, below, ts.per_col(real))
        ts.where(cnt, below, 1, 0)
        ts.row_sum(out, cnt, out)
    ts.store(Out, out, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("right", [False, True])
@pytest.mark.parametrize("dt", [torch.float32, F16, I64])
@pytest.mark.parametrize(("N", "nb"), [(100, 37), (32, 16), (5, 1), (7, 0), (0, 3)])
def test_bucketize(backend, right, dt, N, nb, rng):
    if dt.is_floating_point:
        bounds = randn(rng, nb, dtype=dt).sort().values
        x = torch.cat([bounds[: N // 2], randn(rng, N - min(N // 2, nb), dtype=dt) * 2])[:N]   # some on a boundary
        if N >= 5:
            x[:4] = torch.tensor([math.nan, -math.inf, math.inf, -0.0]).to(dt)
        if nb >= 3:
            bounds[1] = bounds[2]                    # a repeated boundary
    else:
        bounds = ints(rng, -2**62, 2**62, (nb,), dt).sort().values
        x = torch.cat([bounds[: N // 2], ints(rng, -2**63, 2**63 - 1, (N - min(N // 2, nb),), dt)])[:N]
    out = torch.full((N,), -5, dtype=I32 if right else I64)
    launch(bucketize, backend, x, bounds, out, RIGHT=right)
    assert torch.equal(out, torch.bucketize(x, bounds, right=right).to(out.dtype))


# ---- 6. segment reductions by data ids (sum, amax, mean), ids in any order, those outside [0, S) in no segment -------
@ts.kernel(grid=lambda Out, BS, BN: (ts.cdiv(Out.shape[0], BS), ts.cdiv(Out.shape[1], BN)))
def segment_reduce(X, Ids, Out, Count, *, REDUCE: str = "sum", BS: int = 8, BM: int = 16, BN: int = 16):
    """Out[s] = REDUCE ("sum", "amax" or "mean") of the rows r of X with Ids[r] == s, 0 for a segment with none
    (torch's scatter_reduce into zeros, include_self=False); Count[s] = their number. Program (sb, j) owns segments
    sb * BS .. + BS and column block j, and reads every row block; segment s of its block is one unrolled step."""
    sb, j = ts.block_id(0), ts.block_id(1)
    m = X.shape[0]
    x = ts.RegTile[ts.f32, BM, BN]()
    t = ts.RegTile[ts.f32, BM, BN]()
    ids = ts.RegVec[Ids.dtype, BM]()
    rows = ts.RegVec[ts.i32, BM]()
    real = ts.RegVec[ts.bool_, BM]()
    mine = ts.RegTile[ts.bool_, BM, BN]()
    ones = ts.RegTile[ts.i32, BM, BN]()
    seg = ts.RegVec[ts.i32, BS]()
    at_s = ts.RegTile[ts.bool_, BS, BN]()
    part = ts.RegVec[ts.f32, BN]()
    npart = ts.RegVec[ts.i32, BN]()
    out = ts.RegTile[ts.f32, BS, BN]()
    merged = ts.RegTile[ts.f32, BS, BN]()
    cnt = ts.RegTile[ts.i32, BS, BN]()
    counted = ts.RegTile[ts.i32, BS, BN]()
    cnt_f = ts.RegTile[ts.f32, BS, BN]()
    empty = ts.RegTile[ts.bool_, BS, BN]()
    per_seg = ts.RegVec[ts.i32, BS]()
    y = ts.RegTile[Out.dtype, BS, BN]()
    idle = -math.inf if REDUCE == "amax" else 0.0
    ts.fill(out, idle)
    ts.zero(cnt)
    ts.arange(seg)
    for rb in ts.range(ts.cdiv(m, BM)):
        ts.load(x, X, at=(rb, j))
        ts.load(ids, Ids, at=(rb,))
        ts.arange(rows, rb * BM)
        ts.lt(real, rows, m)
        ts.where(ids, real, ids, -1)                 # rows past the end read id 0: no segment's
        for s in range(BS):
            ts.eq(mine, ts.per_row(ids), sb * BS + s)
            ts.where(t, mine, x, idle)
            (ts.col_max if REDUCE == "amax" else ts.col_sum)(part, t)
            ts.where(ones, mine, 1, 0)
            ts.col_sum(npart, ones)
            ts.eq(at_s, ts.per_row(seg), s)          # row s of this program's (BS, BN) result
            ts.where(merged, at_s, ts.per_col(part), idle)
            (ts.max if REDUCE == "amax" else ts.add)(out, out, merged)
            ts.where(counted, at_s, ts.per_col(npart), 0)
            ts.add(cnt, cnt, counted)
    ts.eq(empty, cnt, 0)
    ts.where(out, empty, 0.0, out)
    if REDUCE == "mean":
        ts.copy(cnt_f, cnt)
        ts.max(cnt_f, cnt_f, 1.0)
        ts.div(out, out, cnt_f)
    ts.copy(y, out)
    ts.store(Out, y, at=(sb, j))
    ts.row_max(per_seg, cnt)                         # (every column counts the same rows)
    ts.store(Count, per_seg, at=(sb,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", ["sum", "amax", "mean"])
@pytest.mark.parametrize(("xdt", "idt"), [(torch.float32, I64), (BF, I32)])
@pytest.mark.parametrize(("M", "N", "S"), [(50, 20, 11), (16, 16, 8), (1, 1, 3), (0, 4, 5)])
def test_segment_reduce(backend, reduce, xdt, idt, M, N, S, rng):
    x = randn(rng, M, N, dtype=xdt) * 4
    ids = ints(rng, -1, S + 1, (M,), idt)                  # -1 and S: in no segment
    if M >= 3:
        x[0, 0], x[1, 1], x[2, :] = math.nan, math.inf, -math.inf
        ids[:3] = torch.tensor([0, 0, S - 1])
    out, count = poisoned(S, N, dtype=xdt), torch.full((S,), -5, dtype=I32)
    launch(segment_reduce, backend, x, ids, out, count, REDUCE=reduce)
    keep = (ids >= 0) & (ids < S)
    idx = ids[keep].long()[:, None].expand(-1, N)
    want = torch.zeros(S, N, dtype=F64).scatter_reduce(0, idx, x[keep].double(), reduce, include_self=False)
    close(out, want.to(xdt), scale=10)
    assert torch.equal(count, torch.bincount(ids[keep].long(), minlength=S).to(I32))


# ---- 7. bits reversed and Gray codes on i8 / i32 / i64, logical shifts made by masking arithmetic ones, by sugar -----
@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def bit_tricks(X, Rev, Gray, Back, *, BN: int = 32):
    """Rev = X's bits reversed (as a word of X's width), Gray = X ^ (X >>> 1), Back = Gray decoded (X again) by
    b ^= b >>> s for s = 1, 2, 4, ...; >>> (logical) is >> (arithmetic) masked to the bits that stay."""
    i = ts.block_id(0)
    bits = 8 * X.dtype.itemsize
    x = ts.RegVec[X.dtype, BN]()
    r = ts.RegVec[X.dtype, BN]()
    b = ts.RegVec[X.dtype, BN]()
    ts.load(x, X, at=(i,))
    ts.copy(r, x)
    s = 1
    while s < bits:                                  # swap neighbouring groups of s bits (a Python loop: unrolled)
        groups = sum(((1 << s) - 1) << (2 * s * k) for k in range(bits // (2 * s)))
        high = (r >> s) & groups
        r &= groups
        r <<= s
        r |= high
        s *= 2
    ts.store(Rev, r, at=(i,))
    g = x ^ ((x >> 1) & (2 ** (bits - 1) - 1))
    ts.store(Gray, g, at=(i,))
    ts.copy(b, g)
    s = 1
    while s < bits:
        b ^= (b >> s) & ((1 << (bits - s)) - 1)
        s *= 2
    ts.store(Back, b, at=(i,))


def bit_tricks_want(x: torch.Tensor) -> list[torch.Tensor]:
    bits = 8 * x.element_size()
    u = [v % 2**bits for v in x.tolist()]
    rev = [int(format(v, f"0{bits}b")[::-1], 2) for v in u]
    gray = [v ^ (v >> 1) for v in u]
    return [torch.tensor([wrap(v, bits) for v in vs], dtype=torch.int64).to(x.dtype) for vs in (rev, gray)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", [I8, I32, I64])
@pytest.mark.parametrize("N", [100, 32, 1, 0])
def test_bit_reverse_and_gray_codes(backend, dt, N, rng):
    bits = 8 * torch.empty(0, dtype=dt).element_size()
    x = ints(rng, -2 ** (bits - 1), 2 ** (bits - 1), (N,), dt)
    if N >= 4:
        x[:4] = torch.tensor([-1, -(2 ** (bits - 1)), 1, 0])
    rev, gray, back = (torch.full((N,), -5, dtype=dt) for _ in range(3))
    launch(bit_tricks, backend, x, rev, gray, back)
    want_rev, want_gray = bit_tricks_want(x)
    assert torch.equal(rev, want_rev)
    assert torch.equal(gray, want_gray)
    assert torch.equal(back, x)


# ---- 8. the kernels above compiled for Hopper (sm_90a) on this CPU, by Triton and (where it lowers them) Gluon ------
AOT_CASES = {   # name -> (kernel, meta args, constants)
    "adamw_step": (adamw_step, (meta(1 << 20), meta(1 << 20, dtype=BF), meta(1 << 20), meta(1 << 20), meta(1 << 20),
                                meta(1 << 20, dtype=BF), 1e-3, 0.9, 0.999, 1e-8, 0.01, 0.1, 0.05),
                   dict(AMSGRAD=True, BN=1024)),
    "sum_squares": (sum_squares, (meta(1, 1 << 20, dtype=BF), meta(1)), dict(BN=1024)),
    "clip_by_norm": (clip_by_norm, (meta(1, 1 << 20, dtype=BF), meta(1, dtype=F64), meta(1, 1 << 20, dtype=BF),
                                    1.0), dict(BN=1024)),
    "row_cummax": (row_cumext, (meta(4096, 4096), meta(4096, 4096, dtype=BF), meta(4096, 4096, dtype=I64)),
                   dict(MODE="max", BM=32, BN=16)),
    "row_logcumsumexp": (row_logcumsumexp, (meta(4096, 4096), meta(4096, 4096)), dict(BM=32, BN=16)),
    "bucketize": (bucketize, (meta(1 << 20, dtype=F16), meta(1000, dtype=F16), meta(1 << 20, dtype=I64)),
                  dict(RIGHT=True, BN=128, BK=32)),
    "bit_tricks_i64": (bit_tricks, (meta(1 << 20, dtype=I64),) * 4, dict(BN=256)),
    "bit_tricks_i8": (bit_tricks, (meta(1 << 20, dtype=I8),) * 4, dict(BN=1024)),
    "segment_reduce": (segment_reduce, (meta(8192, 1024, dtype=BF), meta(8192, dtype=I64), meta(512, 1024, dtype=BF),
                                        meta(512, dtype=I32)), dict(REDUCE="amax", BS=8, BM=32, BN=64)),
}


@pytest.mark.parametrize("name", AOT_CASES)
def test_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*AOT_CASES[name])


@pytest.mark.parametrize("name", AOT_CASES)
def test_compiles_for_sm90a_with_gluon(name):
    compile_gluon_sm90a(*AOT_CASES[name])
