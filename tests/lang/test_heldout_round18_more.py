"""Round 18 of held-out kernels, continued (see test_heldout_round18.py's docstring): decode attention against an
int8 KV cache (per-token scales, grouped-query heads as the rows of a query tile read through a (B, Hkv, G, D) view,
ragged lengths read with load_scalar, an empty cache giving 0); torchvision's sigmoid focal loss (every reduction from
a str constant, alpha < 0 switching the weighting off, gamma = 0 at p_t = 1 where exp2(gamma log2(0)) is NaN, the
edge tiles' padding kept out of the sum, the sum by atomic adds) with its runtime scalars given every accepted way;
a bias + tanh-GELU + positional-residual epilogue broadcast over a leading batch dimension (a transposed input, the
positions a slice of a longer table); an embedding's backward by atomic scatter-adds into f32 / f64 (duplicates,
padding_idx, scale_grad_by_freq from counts made by atomic adds in a first launch); an int8 x int8 -> int32 GEMM
exact for any K (each K tile's products summed exactly in f32, then added in i32; K past 2**24 / 2**14, and a sum
wrapping past 2**31 as the GPU's integer adds do); AlexNet's local response normalization across channels (the
channel window as a banded 0/1 product over the neighbouring channel tiles, channels-last input); and launches that
must be refused before any work (a dtype the trace is not for, a rank, a missing argument, an id tensor of floats, an
atomic add into bf16).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, F64, I8, I32, I64, close, launch, randn, wrap

import tilestack.lang as ts
from tilestack.errors import LaunchError, TileDTypeError, TraceError

FLOAT_DTYPES = [torch.float32, F16, BF]
GELU_C = math.sqrt(2 / math.pi)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261801)


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. decode attention against an int8 KV cache -------------------------------------------------------------
@ts.kernel(grid=lambda K8: (K8.shape[1], K8.shape[0]))
def int8_kv_decode(Q, K8, V8, KS, VS, LENS, O, scale: float, *, BH: int = 4, BT: int = 16, D: int = 32):
    """Q (B, Hkv, G, D): the G query heads sharing each KV head; K8, V8 (B, Hkv, T, D) i8 with per-token scales KS, VS
    (B, Hkv, T) f32 (k = K8 * KS); LENS (B,) the cached lengths. O (B, Hkv, G, D) = softmax(scale q k^T) v over the
    first LENS[b] tokens, 0 for an empty cache. Grid: (Hkv, B)."""
    h, b = ts.block_id(0), ts.block_id(1)
    L = ts.load_scalar(LENS, b)
    q = ts.RegTile[ts.f32, BH, D]()
    ts.load(q, Q, at=(b, h, 0, 0))                       # rows past G read 0 and are dropped when stored
    k8 = ts.RegTile[ts.i8, BT, D]()
    kv = ts.RegTile[ts.f32, BT, D]()
    k_s = ts.SharedTile[ts.f32, BT, D]()
    v_s = ts.SharedTile[ts.f32, BT, D]()
    sc = ts.RegVec[ts.f32, BT]()
    pos = ts.RegVec[ts.i32, BT]()
    valid = ts.RegVec[ts.bool_, BT]()
    acc = ts.RegTile[ts.f32, BH, D]()
    m = ts.RegVec[ts.f32, BH]()
    m_new = ts.RegVec[ts.f32, BH]()
    lsum = ts.RegVec[ts.f32, BH]()
    alpha = ts.RegVec[ts.f32, BH]()
    ts.zero(acc)
    ts.neg_infty(m)
    ts.zero(lsum)
    for t in ts.range(ts.cdiv(L, BT)):
        for src, scales, dst in ((K8, KS, k_s), (V8, VS, v_s)):
            ts.load(k8, src, at=(b, h, t, 0))
            ts.load(sc, scales, at=(b, h, t))
            ts.copy(kv, k8)
            ts.mul(kv, kv, ts.per_row(sc))               # dequantized: one scale per token
            ts.copy(dst, kv)
        s = ts.RegTile[ts.f32, BH, BT]()
        ts.zero(s)
        ts.mma_ABt(s, q, k_s, s)
        ts.mul(s, s, scale)
        ts.arange(pos, t * BT)
        ts.lt(valid, pos, L)
        ts.where(s, ts.per_col(valid), s, -math.inf)     # every tile here holds at least one valid token
        ts.row_max(m_new, s, m)
        ts.exp(alpha, m - m_new)
        ts.sub(s, s, ts.per_row(m_new))
        ts.exp(s, s)
        ts.mul(acc, acc, ts.per_row(alpha))
        ts.mul(lsum, lsum, alpha)
        ts.row_sum(lsum, s, lsum)
        ts.mma_AB(acc, s, v_s, acc)
        ts.copy(m, m_new)
    empty = ts.RegVec[ts.bool_, BH]()
    ts.eq(empty, lsum, 0.0)
    ts.where(lsum, empty, 1.0, lsum)
    ts.div(acc, acc, ts.per_row(lsum))
    out = ts.RegTile[O.dtype, BH, D]()
    ts.copy(out, acc)
    ts.store(O, out, at=(b, h, 0, 0))


def quantize_tokens(x):
    """Per-token symmetric int8 (absmax / 127, rounded half to even; an all-zero token gets scale 1)."""
    amax = x.abs().amax(-1)
    s = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).float()
    q = torch.round(x / s[..., None]).clamp(-128, 127).to(I8)
    return q, s


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("Hkv", "G", "T", "lens"), [(2, 3, 45, (45, 0, 17, 1)), (1, 4, 16, (16, 5)),
                                                     (3, 1, 20, (0,))])
def test_int8_kv_decode(backend, dtype, Hkv, G, T, lens, rng):
    """Against float64 attention over the dequantized cache: lengths not a multiple of the tile, one token (the output
    its value exactly up to rounding), an empty cache (0, not NaN), G = 3 heads in a 4-row tile, G = 1; a -128 code in
    the cache; the queries a (B, Hkv, G, D) view of (B, Hq, D)."""
    B, D = len(lens), 32
    q = randn(rng, B, Hkv * G, D, dtype=dtype)
    k, v = randn(rng, B, Hkv, T, D) * 2, randn(rng, B, Hkv, T, D)
    k8, ks = quantize_tokens(k)
    v8, vs = quantize_tokens(v)
    k8[0, 0, 0, 0] = -128
    lens_t = torch.tensor(lens, dtype=I32)
    o = poisoned(B, Hkv, G, D, dtype=dtype)
    scale = 1 / math.sqrt(D)
    launch(int8_kv_decode, backend, q.view(B, Hkv, G, D), k8, v8, ks, vs, lens_t, o, scale)
    kd, vd = k8.double() * ks.double()[..., None], v8.double() * vs.double()[..., None]
    want = torch.zeros(B, Hkv, G, D, dtype=F64)
    for b, L in enumerate(lens):
        if L:
            qb = q[b].double().view(Hkv, G, D)
            p = torch.softmax(qb @ kd[b, :, :L].transpose(-1, -2) * scale, -1)
            want[b] = p @ vd[b, :, :L]
    close(o, want, scale=4 if dtype is torch.float32 else 1)
    for b, L in enumerate(lens):
        if L == 0:
            assert (o[b] == 0).all()


# ---- 2. sigmoid focal loss, and its runtime scalars ----------------------------------------------------------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def sigmoid_focal_loss(X, TGT, LOSS, TOTAL, alpha: float, gamma: float = 2.0, *, REDUCTION: str = "none",
                       BM: int = 16, BN: int = 32):
    """torchvision.ops.sigmoid_focal_loss of logits X (R, C) and targets TGT (R, C) (any dtype, soft labels too):
    REDUCTION "none" writes LOSS (R, C); "sum" and "mean" add into TOTAL (1,) f32 (zeroed by the caller). alpha < 0:
    no class weighting. Grid: (row blocks, column blocks)."""
    if REDUCTION not in ("none", "sum", "mean"):
        raise ValueError(f"REDUCTION={REDUCTION!r}; expected 'none', 'sum' or 'mean'")
    i, j = ts.block_id(0), ts.block_id(1)
    x = ts.RegTile[ts.f32, BM, BN]()
    t = ts.RegTile[ts.f32, BM, BN]()
    ts.load(x, X, at=(i, j))
    ts.load(t, TGT, at=(i, j))
    p = ts.RegTile[ts.f32, BM, BN]()
    ts.sigmoid(p, x)
    ce = ts.RegTile[ts.f32, BM, BN]()                    # BCE with logits: max(x, 0) - x t + log(1 + e^-|x|)
    ts.abs(ce, x)
    ts.neg(ce, ce)
    ts.exp(ce, ce)
    ts.add(ce, ce, 1.0)
    ts.log(ce, ce)
    r = ts.RegTile[ts.f32, BM, BN]()
    ts.relu(r, x)
    ts.add(ce, ce, r)
    ts.sub(ce, ce, x * t)
    base = ts.RegTile[ts.f32, BM, BN]()                  # 1 - p_t = p (1 - t) + (1 - p) t
    one_m_t = 1.0 - t
    ts.add(base, p * one_m_t, (1.0 - p) * t)
    g = ts.RegTile[ts.f32, BM, BN]()
    ts.zero(g)
    ts.add(g, g, gamma)
    mod = ts.RegTile[ts.f32, BM, BN]()
    ts.log2(mod, base)
    ts.mul(mod, mod, g)
    ts.exp2(mod, mod)                                    # (1 - p_t) ** gamma ...
    at_zero = ts.RegTile[ts.bool_, BM, BN]()
    gz = ts.RegTile[ts.bool_, BM, BN]()
    ts.eq(at_zero, base, 0.0)
    ts.eq(gz, g, 0.0)
    ts.logical_and(gz, gz, at_zero)
    ts.where(mod, gz, 1.0, mod)                          # ... with 0 ** 0 = 1 (exp2(0 * -inf) is NaN)
    loss = ce * mod
    aw = ts.RegTile[ts.f32, BM, BN]()
    ts.zero(aw)
    ts.add(aw, aw, alpha)
    no_alpha = ts.RegTile[ts.bool_, BM, BN]()
    ts.lt(no_alpha, aw, 0.0)
    ts.add(aw, aw * t, (1.0 - aw) * one_m_t)
    ts.where(aw, no_alpha, 1.0, aw)
    ts.mul(loss, loss, aw)
    if REDUCTION == "none":
        out = ts.RegTile[LOSS.dtype, BM, BN]()
        ts.copy(out, loss)
        ts.store(LOSS, out, at=(i, j))
        return
    rows = ts.RegVec[ts.i32, BM]()
    cols = ts.RegVec[ts.i32, BN]()
    ts.arange(rows, i * BM)
    ts.arange(cols, j * BN)
    inside = ts.RegTile[ts.bool_, BM, BN]()
    col_in = ts.RegTile[ts.bool_, BM, BN]()
    ts.lt(inside, ts.per_row(rows), X.shape[0])
    ts.lt(col_in, ts.per_col(cols), X.shape[1])
    ts.logical_and(inside, inside, col_in)
    ts.where(loss, inside, loss, 0.0)                    # the edge tiles' padding reads x = 0: log 2 each
    part = ts.RegVec[ts.f32, BM]()
    ts.row_sum(part, loss)
    one_row = ts.RegTile[ts.f32, 1, BM]()
    ts.zero(one_row)
    ts.add(one_row, one_row, ts.per_col(part))
    tot = ts.RegVec[ts.f32, 1]()
    ts.row_sum(tot, one_row)
    if REDUCTION == "mean":
        ts.mul(tot, tot, 1.0 / (X.shape[0] * X.shape[1]))
    ts.atomic_add(TOTAL, tot, at=(0,))


def focal_ref(x, t, alpha, gamma):
    """torchvision.ops.sigmoid_focal_loss(reduction='none'), in float64."""
    x, t = x.double(), t.double()
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "tdtype"), [(torch.float32, torch.float32), (BF, torch.bool), (F16, I64)])
@pytest.mark.parametrize(("R", "C", "alpha", "gamma"), [(37, 45, 0.25, 2.0), (16, 32, -1.0, 0.0), (5, 3, 0.9, 1.5),
                                                       (0, 7, 0.25, 2.0)])
def test_sigmoid_focal_loss(backend, dtype, tdtype, R, C, alpha, gamma, rng):
    """Each reduction against torchvision's formula in float64: logits up to +-30 (p_t = 1 in f32: the gamma = 0 case's
    0 ** 0), hard targets as bool or int64 and soft ones as f32, alpha off (-1), edge tiles (the padding must not add
    log 2 per element to the sum), no rows (sum 0)."""
    x = randn(rng, R, C, dtype=dtype) * 10
    if R:
        x[0, :3] = torch.tensor([30.0, -30.0, 0.0]).to(dtype)
    if tdtype is torch.float32:
        t = torch.from_numpy(rng.uniform(size=(R, C))).float()
        if R:
            t[0, :3] = torch.tensor([1.0, 0.0, 1.0])
    else:
        t = torch.from_numpy(rng.integers(0, 2, (R, C))).to(tdtype)
        if R:
            t[0, :2] = torch.tensor([1, 0]).to(tdtype)
    want = focal_ref(x, t, alpha, gamma)
    loss = poisoned(R, C, dtype=dtype)
    launch(sigmoid_focal_loss, backend, x, t, loss, torch.zeros(1), alpha, gamma)
    close(loss, want, scale=4 if dtype is torch.float32 else 1)
    for red, fn in (("sum", torch.sum), ("mean", torch.mean)):
        if red == "mean" and R * C == 0:
            continue                                     # (torch's mean of nothing is NaN; the kernel adds nothing)
        total = torch.zeros(1)
        launch(sigmoid_focal_loss, backend, x, t, loss, total, alpha, gamma, REDUCTION=red)
        torch.testing.assert_close(total.double(), fn(want).reshape(1), rtol=2e-5, atol=1e-5)


def test_focal_loss_scalars_every_accepted_way(rng):
    """A runtime float given as a Python float, a Python int, np.float32, np.float64 or np.int64, by keyword, or left
    to its default (gamma = 2.0), all giving the same numbers; the str constant as a keyword. Refused before any work
    (the poisoned output untouched), naming the argument, what was given and what was expected: a bool or a str for
    a runtime float, a missing argument, a constant of the wrong kind, an unknown constant (with the near name)."""
    x, t = randn(rng, 9, 11) * 3, torch.from_numpy(rng.integers(0, 2, (9, 11))).float()
    want = focal_ref(x, t, 1, 2.0)
    ways = [((1, 2.0), {}), ((np.float32(1.0), np.float64(2.0)), {}), ((), dict(alpha=1.0, gamma=2)),
            ((1.0,), dict(REDUCTION="none")), ((np.int64(1),), {})]
    for backend in BACKENDS:
        for scalars, kw in ways:
            loss = poisoned(9, 11)
            launch(sigmoid_focal_loss, backend, x, t, loss, torch.zeros(1), *scalars, **kw)
            close(loss, want)
        loss = poisoned(9, 11)
        launch(sigmoid_focal_loss, backend, X=x, TGT=t, LOSS=loss, TOTAL=torch.zeros(1), alpha=1.0)
        close(loss, want)
    bad = [((1.0, True), {}, r"argument gamma is a runtime float; got bool True"),
           (("0.25",), {}, r"argument alpha is a runtime float; got str '0.25'"),
           ((None,), {}, r"argument alpha is a runtime float; got NoneType None"),
           ((), {}, r"sigmoid_focal_loss takes 6 arguments .*missing \['alpha'\]"),
           ((1.0,), {"REDUCTION": 3}, r"constant REDUCTION is declared str; got int 3"),
           ((1.0,), {"REDUCTIONS": "sum"}, r"unknown constant\(s\) \['REDUCTIONS'\].*did you mean 'REDUCTION'")]
    for scalars, consts, msg in bad:
        loss, total = poisoned(9, 11), torch.full((1,), 5.0)
        with pytest.raises(LaunchError, match=msg):
            launch(sigmoid_focal_loss, "reference", x, t, loss, total, *scalars, **consts)
        assert loss.isnan().all() and total.item() == 5.0
    with pytest.raises(ValueError, match=r"REDUCTION='avg'; expected 'none', 'sum' or 'mean'"):
        launch(sigmoid_focal_loss, "reference", x, t, loss, total, 1.0, REDUCTION="avg")
    assert loss.isnan().all()


# ---- 3. bias + tanh-GELU + positional residual over a leading batch dimension ---------------------------------
@ts.kernel(grid=lambda X, BT, BC: (ts.cdiv(X.shape[1], BT), ts.cdiv(X.shape[2], BC), X.shape[0]))
def bias_gelu_pos(X, BIAS, POS, Y, *, BT: int = 16, BC: int = 32):
    """Y (B, T, C) = gelu_tanh(X + BIAS) + POS: BIAS (C,) over every row, POS (T, C) over every batch. gelu_tanh(z) =
    z sigmoid(2 sqrt(2/pi) (z + 0.044715 z^3)) (= 0.5 z (1 + tanh(...)) exactly). Grid: (T blocks, C blocks, B)."""
    i, j, b = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    z = ts.RegTile[ts.f32, BT, BC]()
    ts.load(z, X, at=(b, i, j))
    bias = ts.RegVec[ts.f32, BC]()
    ts.load(bias, BIAS, at=(j,))
    ts.add(z, z, ts.per_col(bias))
    inner = ts.RegTile[ts.f32, BT, BC]()
    ts.mul(inner, z, z)
    ts.mul(inner, inner, 0.044715)
    ts.add(inner, inner, 1.0)
    ts.mul(inner, inner, z)
    ts.mul(inner, inner, 2 * GELU_C)
    ts.sigmoid(inner, inner)
    ts.mul(z, z, inner)
    pos = ts.RegTile[ts.f32, BT, BC]()
    ts.load(pos, POS, at=(i, j))
    ts.add(z, z, pos)
    y = ts.RegTile[Y.dtype, BT, BC]()
    ts.copy(y, z)
    ts.store(Y, y, at=(b, i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("B", "T", "C"), [(3, 21, 45), (1, 16, 32), (2, 1, 1), (0, 5, 5), (2, 4, 0)])
def test_bias_gelu_pos(backend, dtype, B, T, C, rng):
    """Against F.gelu(approximate='tanh') in float64: X a transposed view of (B, C, T) storage, POS the first T rows of
    a (64, C) table, values up to +-1e4 (z^3 = 1e12: the cubic's f32 range; gelu(-1e4) = -0) and -20 (the tail);
    an empty batch and no channels (nothing to write)."""
    x = (randn(rng, B, C, T, dtype=dtype) * 4).transpose(1, 2)
    if B and T > 0 and C > 3:
        x[0, 0, :4] = torch.tensor([1e4, -1e4, -20.0, 0.0]).to(dtype)
    bias = randn(rng, C)
    table = randn(rng, 64, C, dtype=dtype)
    y = poisoned(B, T, C, dtype=dtype)
    launch(bias_gelu_pos, backend, x, bias, table[:T], y)
    want = F.gelu(x.double() + bias.double(), approximate="tanh") + table[:T].double()
    close(y, want, scale=4 if dtype is torch.float32 else 1)


# ---- 4. embedding backward by atomic scatter-adds -------------------------------------------------------------
@ts.kernel(grid=lambda IDS: (IDS.shape[0],))
def token_counts(IDS, COUNT):
    """COUNT[IDS[t]] += 1 for each token t (COUNT (V,) i32, zeroed by the caller). Grid: (tokens,)."""
    one = ts.RegVec[ts.i32, 1]()
    ts.fill(one, 1)
    ts.atomic_add(COUNT, one, at=(ts.load_scalar(IDS, ts.block_id(0)),))


@ts.kernel(grid=lambda DY, BD: (DY.shape[0], ts.cdiv(DY.shape[1], BD)))
def embedding_backward(IDS, DY, COUNT, DW, *, PAD: int = None, BY_FREQ: bool = False, BD: int = 32):
    """DW (V, D) += the rows of DY (N, D) at their tokens IDS (N,) (F.embedding's weight gradient): tokens equal to PAD
    add nothing; BY_FREQ divides each by its token's count COUNT[IDS[t]] (scale_grad_by_freq). DW f32 or f64 (atomic
    adds), zeroed by the caller. Grid: (tokens, column blocks)."""
    t, j = ts.block_id(0), ts.block_id(1)
    tok = ts.load_scalar(IDS, t)
    g = ts.RegTile[DW.dtype, 1, BD]()
    ts.load(g, DY, at=(t, j))
    if BY_FREQ:
        ts.div(g, g, ts.load_scalar(COUNT, tok))
    if PAD is None:
        ts.atomic_add(DW, g, at=(tok, j))
        return
    ids = ts.RegTile[ts.i64, 1, BD]()
    ts.zero(ids)
    ts.add(ids, ids, tok)
    not_pad = ts.RegTile[ts.bool_, 1, BD]()
    ts.ne(not_pad, ids, PAD)
    ts.atomic_add(DW, g, at=(tok, j), mask=not_pad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("gdtype", "wdtype", "id_dtype"), [(torch.float32, torch.float32, I64), (BF, F64, I32),
                                                            (F16, torch.float32, I32)])
@pytest.mark.parametrize(("N", "V", "D", "pad", "freq"), [(40, 11, 45, 3, True), (17, 5, 32, None, False),
                                                          (1, 2, 1, 0, True), (9, 30, 16, None, True)])
def test_embedding_backward(backend, gdtype, wdtype, id_dtype, N, V, D, pad, freq, rng):
    """Against autograd of F.embedding(padding_idx, scale_grad_by_freq) in float64: many duplicates (11 ids for 40
    tokens), the padding row exactly 0, rows no token uses exactly 0, D not a multiple of the block, one token, a
    sparse case (30 ids, 9 tokens); DY a transposed view; 16-bit gradients into an f64 weight gradient."""
    ids = torch.from_numpy(rng.integers(0, V, N)).to(id_dtype)
    if pad is not None:
        ids[0] = pad
    dy = randn(rng, D, N, dtype=gdtype).T
    counts = torch.zeros(V, dtype=I32)
    launch(token_counts, backend, ids, counts)
    assert torch.equal(counts, torch.bincount(ids.long(), minlength=V).to(I32))
    dw = torch.zeros(V, D, dtype=wdtype)
    launch(embedding_backward, backend, ids, dy, counts, dw, PAD=pad, BY_FREQ=freq)
    w = torch.zeros(V, D, dtype=F64, requires_grad=True)
    F.embedding(ids.long(), w, padding_idx=pad, scale_grad_by_freq=freq).backward(dy.double())
    close(dw, w.grad, dtype=torch.float32)
    unused = [v for v in range(V) if v not in ids.tolist() or v == pad]
    assert (dw[unused] == 0).all()


# ---- 5. int8 x int8 -> int32, exact for any K ------------------------------------------------------------------
@ts.kernel(grid=lambda A, B, BM, BN: (ts.cdiv(A.shape[0], BM), ts.cdiv(B.shape[1], BN)))
def i8_gemm_exact(A, B, C, *, BM: int = 16, BN: int = 16, BK: int = 32):
    """C (M, N) i32 or i64 = A (M, K) i8 @ B (K, N) i8, exactly: each K tile's products (|sum| <= BK 2**14) summed in
    f32 from bf16 operands (exact), then added in C's integers (i32 wraps as the GPU's adds). Grid: (row blocks,
    column blocks)."""
    i, j = ts.block_id(0), ts.block_id(1)
    a8 = ts.RegTile[ts.i8, BM, BK]()
    b8 = ts.RegTile[ts.i8, BK, BN]()
    a = ts.RegTile[ts.bf16, BM, BK]()
    b = ts.SharedTile[ts.bf16, BK, BN]()
    part = ts.RegTile[ts.f32, BM, BN]()
    parti = ts.RegTile[C.dtype, BM, BN]()
    acc = ts.RegTile[C.dtype, BM, BN]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        ts.load(a8, A, at=(i, k))
        ts.load(b8, B, at=(k, j))
        ts.copy(a, a8)
        ts.copy(b, b8)
        ts.zero(part)
        ts.mma_AB(part, a, b, part)
        ts.copy(parti, part)
        ts.add(acc, acc, parti)
    ts.store(C, acc, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cdtype", [I32, I64])
@pytest.mark.parametrize(("M", "N", "K"), [(19, 21, 2500), (16, 16, 32), (3, 1, 1), (5, 7, 0)])
def test_i8_gemm_exact(backend, cdtype, M, N, K, rng):
    """Equal to the int64 product: K = 2500 with row 0 of A and column 0 of B all -128 (C[0, 0] = 2500 * 2**14 + 0,
    past 2**24 where an f32 accumulator would round it; an odd total beside it), B a transposed view of (N, K)
    storage, K = 1, K = 0 (C = 0)."""
    a = torch.from_numpy(rng.integers(-128, 128, (M, K))).to(I8)
    b = torch.from_numpy(rng.integers(-128, 128, (N, K))).to(I8).T
    if K > 1000:
        a[0], b[:, 0] = -128, -128
        a[1, 0], b[0, 1] = 2, 2                          # C[1, 1] = 4 + 2499 * 127**2: odd and past 2**25
        a[1, 1:], b[1:, 1] = 127, 127
    c = poisoned(M, N, dtype=cdtype, value=-7)
    launch(i8_gemm_exact, backend, a, b, c)
    want = a.long() @ b.long()
    assert torch.equal(c.long(), want)
    if K > 1000:
        assert int(want[0, 0]) == K * 2**14 > 2**24 and float(np.float32(int(want[1, 1]))) != int(want[1, 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_i8_gemm_wraps_in_i32(backend):
    """K = 2**17 + 3 codes of -128 times -128: 2**31 + 3 * 2**14 wraps to -2**31 + 49152 in i32 (as the GPU's adds
    and C's int32 arithmetic do), and is exact in i64."""
    K = 2**17 + 3
    a = torch.full((1, K), -128, dtype=I8)
    b = torch.full((K, 1), -128, dtype=I8)
    for cdtype in (I32, I64):
        c = poisoned(1, 1, dtype=cdtype, value=-7)
        launch(i8_gemm_exact, backend, a, b, c, BM=16, BN=16, BK=4096)
        total = K * 2**14
        assert int(c) == (wrap(total, 32) if cdtype is I32 else total)


# ---- 6. local response normalization across channels ---------------------------------------------------------
@ts.kernel(grid=lambda X, BP: (ts.cdiv(X.shape[2], BP), X.shape[0]))
def local_response_norm(X, Y, alpha: float, beta: float, k: float, *, SIZE: int = 5, BC: int = 16, BP: int = 32):
    """Y = X / (k + alpha / SIZE * sum of X^2 over the channel window [c - SIZE // 2, c + (SIZE - 1) // 2]) ** beta,
    as F.local_response_norm; X, Y (N, C, P) (P = H * W, any strides). SIZE // 2 < BC. Grid: (P blocks, N)."""
    p, nb = ts.block_id(0), ts.block_id(1)
    nct = ts.cdiv(X.shape[1], BC)
    x = ts.RegTile[ts.f32, BC, BP]()
    sq = ts.SharedTile[ts.f32, BC, BP]()
    band = ts.RegTile[ts.f32, BC, BC]()
    diff = ts.RegTile[ts.i32, BC, BC]()
    inb = ts.RegTile[ts.bool_, BC, BC]()
    hi = ts.RegTile[ts.bool_, BC, BC]()
    oc = ts.RegVec[ts.i32, BC]()
    ic = ts.RegVec[ts.i32, BC]()
    acc = ts.RegTile[ts.f32, BC, BP]()
    y = ts.RegTile[Y.dtype, BC, BP]()
    for ci in ts.range(nct):
        ts.zero(acc)
        ts.arange(oc, ci * BC)
        for cj in ts.range(ts.smax(ci - 1, 0), ts.smin(ci + 2, nct)):   # the window reaches the next tiles only
            ts.load(x, X, at=(nb, cj, p))
            ts.copy(sq, x * x)
            ts.arange(ic, cj * BC)
            ts.zero(diff)
            ts.add(diff, diff, ts.per_col(ic))
            ts.sub(diff, diff, ts.per_row(oc))
            ts.ge(inb, diff, -(SIZE // 2))
            ts.le(hi, diff, (SIZE - 1) // 2)
            ts.logical_and(inb, inb, hi)
            ts.where(band, inb, 1.0, 0.0)
            ts.mma_AB(acc, band, sq, acc)
        ts.mul(acc, acc, alpha / SIZE)
        ts.add(acc, acc, k)
        ts.log2(acc, acc)
        ts.mul(acc, acc, -beta)
        ts.exp2(acc, acc)
        ts.load(x, X, at=(nb, ci, p))
        ts.copy(y, x * acc)
        ts.store(Y, y, at=(nb, ci, p))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("N", "C", "H", "W", "size"), [(2, 37, 3, 5, 5), (1, 16, 4, 8, 2), (2, 3, 2, 2, 7),
                                                        (1, 20, 1, 1, 1), (1, 4, 0, 3, 3)])
def test_local_response_norm(backend, dtype, N, C, H, W, size, rng):
    """Against F.local_response_norm in float64: channels across three tiles (windows crossing tile edges), an even
    size (2: the window's asymmetric pad), a window wider than the channels (7 of 3), size 1, an empty image; the
    input channels-last (the (N, C, H*W) view has channel stride 1); values of scale 5 (the sum of squares
    matters) and AlexNet's alpha 1e-4 raised to 0.1 so it does."""
    alpha, beta, k = 0.1, 0.75, 2.0
    x = (randn(rng, N, H, W, C, dtype=dtype) * 5).permute(0, 3, 1, 2)
    xv = x.flatten(2)
    assert xv.stride(1) == 1 and xv.data_ptr() == x.data_ptr()
    y = poisoned(N, C, H * W, dtype=dtype)
    launch(local_response_norm, backend, xv, y, alpha, beta, k, SIZE=size)
    want = F.local_response_norm(x.double(), size, alpha, beta, k).flatten(2)
    close(y, want, scale=4 if dtype is torch.float32 else 1)


# ---- 7. launches refused before any work ------------------------------------------------------------------------
def test_bad_launches_are_refused_before_any_work(rng):
    """A traced kernel run with a dtype or rank it was not traced for, or an argument missing; an id tensor of floats
    where load_scalar must give a tile coordinate; an atomic add into bf16; a tensor of a dtype tiles cannot hold. Each
    names the argument, what was given and what was expected, and the poisoned outputs stay as they were."""
    x = randn(rng, 2, 5, 4)
    y = poisoned(2, 5, 4)
    traced = bias_gelu_pos.trace(x, randn(rng, 4), randn(rng, 5, 4), y)
    with pytest.raises(LaunchError, match=r"bias_gelu_pos: argument X is torch.float16; this trace of bias_gelu_pos "
                                          r"is for f16|bias_gelu_pos: argument X is torch.float16; this trace .*f32"):
        traced.run(x.half(), randn(rng, 4), randn(rng, 5, 4), y, backend="reference")
    with pytest.raises(LaunchError, match=r"argument POS has rank 3 \(shape \(1, 5, 4\)\); this trace is for rank 2"):
        traced.run(x, randn(rng, 4), randn(rng, 1, 5, 4), y, backend="reference")
    with pytest.raises(LaunchError, match=r"bias_gelu_pos takes 4 arguments .*missing \['Y'\]"):
        launch(bias_gelu_pos, "reference", x, randn(rng, 4), randn(rng, 5, 4))
    with pytest.raises(TraceError, match=r"X.shape\[2\]: argument X has rank 2 \(axes 0 to 1\), so it has no axis 2"):
        launch(bias_gelu_pos, "triton", x[0], randn(rng, 4), randn(rng, 5, 4), y)
    assert y.isnan().all()
    dw = torch.zeros(3, 8)
    with pytest.raises(TraceError, match=r"at\[0\] must be an index.*load_scalar"):
        launch(embedding_backward, "reference", torch.tensor([0.0, 2.0]), randn(rng, 2, 8), torch.ones(3, dtype=I32),
               dw)
    with pytest.raises(TileDTypeError, match=r"atomic_add: `DW` is bf16; atomic adds go into f64, f32, f16, i32, i64"):
        launch(embedding_backward, "triton", torch.tensor([0, 2]), randn(rng, 2, 8), torch.ones(3, dtype=I32),
               dw.bfloat16())
    with pytest.raises(LaunchError, match=r"argument IDS has dtype torch.int16, which tiles cannot hold"):
        launch(embedding_backward, "reference", torch.tensor([0, 2], dtype=torch.int16), randn(rng, 2, 8),
               torch.ones(3, dtype=I32), dw)
    assert (dw == 0).all()
