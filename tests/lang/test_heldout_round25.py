"""Round 25 of held-out kernels (after rounds 2-24): kernels in the forms ThunderKittens users write, each on the
reference executor and Triton's interpreter against float64 torch, outputs poisoned with NaN (or a sentinel) first,
at ragged sizes (not multiples of the tile), seeds fixed; each is also compiled for sm_90a on this CPU through the
Triton and Gluon backends (the end of this file).

- A GEMM fused with a row-wise softmax over N in one program: pass 1 walks N's tiles keeping each row's running
  max and rescaled sum of exponentials (online softmax), pass 2 recomputes each tile's product and stores
  exp(s - max) / sum; logits up to 1e4 apart (exp overflows without the running max), a row of equal logits,
  columns past N masked to -inf.
- A batched matrix-vector product y[b] = A[b]^T x[b] read through a transposed view of A (last stride N, not 1),
  K walked in ragged tiles and each tile's rows scaled per column by x's slice.
- Per-group fp8 (e4m3) quantization, one scale per row and 1 x BN group (DeepSeek-style 1 x 128 groups): amax of
  the group, scale = amax / 448 (1 for an all-zero group), q = x / scale saturating, scales written through a
  transposed view; dequantized against torch's own e4m3 conversion of the same quotient.
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, F64, close, launch, randn

import tilestack.lang as ts

F32 = torch.float32
E4M3 = torch.float8_e4m3fn


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20262501)


def poisoned(*shape, dtype=F32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. GEMM + row softmax over N, two passes over N's tiles ---------------------------------------------------------
@ts.kernel(grid=lambda A, BM: (ts.cdiv(A.shape[0], BM),))
def gemm_softmax(A, B, P, scale: float, *, BM: int = 16, BN: int = 16, BK: int = 16):
    """P (M, N) = softmax(scale * A @ B^T, dim=1) for A (M, K), B (N, K); the (M, N) logits never leave the program."""
    i = ts.block_id(0)
    N, K = B.shape[0], A.shape[1]
    a, b = ts.SharedTile[A.dtype, BM, BK](), ts.SharedTile[B.dtype, BN, BK]()
    s = ts.RegTile[ts.f32, BM, BN]()
    m, l, t = ts.RegVec[ts.f32, BM](), ts.RegVec[ts.f32, BM](), ts.RegVec[ts.f32, BM]()
    cols = ts.RegVec[ts.i32, BN]()
    inside = ts.RegVec[ts.bool_, BN]()
    ts.neg_infty(m)
    ts.zero(l)
    for j in ts.range(ts.cdiv(N, BN)):
        ts.zero(s)
        for k in ts.range(ts.cdiv(K, BK)):
            ts.load(a, A, at=(i, k))
            ts.load(b, B, at=(j, k))
            ts.mma_ABt(s, a, b, s)
        ts.mul(s, s, scale)
        ts.arange(cols, j * BN)
        ts.lt(inside, cols, N)
        ts.where(s, ts.per_col(inside), s, -math.inf)
        ts.row_max(t, s, m)                           # the new running max
        ts.sub(m, m, t)
        ts.exp(m, m)                                  # exp(old - new): 0 on the first tile
        ts.mul(l, l, m)
        ts.sub(s, s, ts.per_row(t))
        ts.exp(s, s)
        ts.row_sum(l, s, l)
        ts.copy(m, t)
    out = ts.RegTile[P.dtype, BM, BN]()
    for j in ts.range(ts.cdiv(N, BN)):
        ts.zero(s)
        for k in ts.range(ts.cdiv(K, BK)):
            ts.load(a, A, at=(i, k))
            ts.load(b, B, at=(j, k))
            ts.mma_ABt(s, a, b, s)
        ts.mul(s, s, scale)
        ts.sub(s, s, ts.per_row(m))
        ts.exp(s, s)
        ts.div(s, s, ts.per_row(l))
        ts.copy(out, s)
        ts.store(P, out, at=(i, j))


def gemm_softmax_ref(a, b, scale):
    return torch.softmax(scale * (a.double() @ b.double().T), dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF])
@pytest.mark.parametrize(("M", "N", "K"), [(21, 37, 19), (1, 1, 1), (16, 17, 33), (5, 50, 7)])
def test_gemm_row_softmax_two_passes(backend, dtype, M, N, K, rng):
    a, b = randn(rng, M, K, dtype=dtype), randn(rng, N, K, dtype=dtype)
    scale = 1 / math.sqrt(K)
    p = poisoned(M, N)
    launch(gemm_softmax, backend, a, b, p, scale)
    want = gemm_softmax_ref(a, b, scale)
    t = dict(rtol=1e-4, atol=1e-5) if dtype is F32 else dict(rtol=1e-2, atol=2e-3)
    torch.testing.assert_close(p.double(), want, **t)
    torch.testing.assert_close(p.double().sum(1), torch.ones(M, dtype=F64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemm_row_softmax_of_logits_far_apart(backend, rng):
    """Logits up to ~1e4: exp of them overflows f32 unless the running max is subtracted. Row 0 has its largest
    logit in the last (ragged) tile: every earlier tile's sum is rescaled by exp(-thousands) = 0. Row 1: all logits
    equal (a uniform row). The f16 output stores 1/37 and the near-0 / near-1 probabilities."""
    M, N, K = 3, 37, 4
    a, b = torch.zeros(M, K), torch.zeros(N, K)
    b[:, 0] = torch.arange(N, dtype=F32) * 300.0         # column n's logit: 300 n a[r, 0]
    a[0, 0] = 1.0
    a[2] = randn(rng, K) * 20
    b[:, 1:] = randn(rng, N, K - 1)
    a[1] = 0.0                                            # row 1: every logit 0
    for out_dtype in (F32, F16):
        p = poisoned(M, N, dtype=out_dtype)
        launch(gemm_softmax, backend, a, b, p, 1.0)
        want = gemm_softmax_ref(a, b, 1.0)
        assert torch.isfinite(p).all(), p
        close(p, want, dtype=out_dtype)
        assert p[0, N - 1].item() == 1.0
        torch.testing.assert_close(p[1].double(), torch.full((N,), 1 / N, dtype=F64), rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemm_row_softmax_of_no_columns_writes_nothing(backend):
    """N = 0: no tiles in either pass, no store; an empty P stays empty (no launch error)."""
    a, b = torch.ones(5, 3), torch.ones(0, 3)
    p = poisoned(5, 0)
    launch(gemm_softmax, backend, a, b, p, 1.0)
    assert p.shape == (5, 0)


def test_gemm_row_softmax_misuse_is_named():
    a, b, p = torch.ones(5, 3), torch.ones(4, 3), torch.ones(5, 4)
    with pytest.raises(Exception, match="scale"):
        launch(gemm_softmax, "reference", a, b, p, "x")
    with pytest.raises(Exception, match="constant BM=-3"):
        launch(gemm_softmax, "reference", a, b, p, 1.0, BM=-3)


# ---- 2. batched A^T x through a transposed view ------------------------------------------------------------------
@ts.kernel(grid=lambda AT, BN: (AT.shape[0], ts.cdiv(AT.shape[1], BN)))
def batched_atx(AT, X, Y, *, BN: int = 16, BK: int = 16):
    """Y[b, n] = sum_k AT[b, n, k] X[b, k]: AT (Bt, N, K) is the transposed view of A (Bt, K, N), so its last
    stride is N. Accumulates in f32 (f64 for f64 inputs)."""
    bi, i = ts.block_id(0), ts.block_id(1)
    W = ts.f64 if AT.dtype is ts.f64 else ts.f32
    w = ts.RegTile[W, BN, BK]()
    x = ts.RegVec[W, BK]()
    y = ts.RegVec[W, BN]()
    ts.zero(y)
    for k in ts.range(ts.cdiv(AT.shape[2], BK)):
        ts.load(w, AT, at=(bi, i, k))
        ts.load(x, X, at=(bi, k))
        ts.mul(w, w, ts.per_col(x))
        ts.row_sum(y, w, y)
    out = ts.RegVec[Y.dtype, BN]()
    ts.copy(out, y)
    ts.store(Y, out, at=(bi, i))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF, F64])
@pytest.mark.parametrize(("Bt", "K", "N"), [(3, 37, 21), (1, 1, 1), (2, 16, 33), (4, 50, 5)])
def test_batched_matvec_of_a_transposed_view(backend, dtype, Bt, K, N, rng):
    a = randn(rng, Bt, K, N, dtype=dtype)
    x = randn(rng, Bt, K, dtype=dtype)
    at = a.transpose(1, 2)
    assert at.stride(-1) == N and not at.is_contiguous() or N == 1
    y = poisoned(Bt, N, dtype=dtype)
    launch(batched_atx, backend, at, x, y)
    want = torch.einsum("bkn,bk->bn", a.double(), x.double())
    close(y, want, scale=math.sqrt(K))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_matvec_extremes(backend):
    """inf times 0 is NaN (a zero x against an inf entry), inf + finite stays inf, and f32 sums past f16's range
    land in an f16 output as inf; K = 0 gives zeros."""
    a = torch.ones(2, 3, 4)
    x = torch.ones(2, 3)
    a[0, 1, 0] = math.inf
    x[0, 1] = 0.0                                         # column 0 of batch 0: inf * 0 = NaN
    a[1, 2, 3] = math.inf                                 # column 3 of batch 1: inf
    y = poisoned(2, 4)
    launch(batched_atx, backend, a.transpose(1, 2), x, y)
    want = torch.einsum("bkn,bk->bn", a.double(), x.double())
    close(y, want)
    assert math.isnan(y[0, 0].item()) and y[1, 3].item() == math.inf
    big = torch.full((1, 3, 2), 60000.0, dtype=F16)
    y16 = poisoned(1, 2, dtype=F16)
    launch(batched_atx, backend, big.transpose(1, 2), torch.ones(1, 3, dtype=F16), y16)
    assert (y16 == math.inf).all()
    y0 = poisoned(2, 4)
    launch(batched_atx, backend, torch.ones(2, 0, 4).transpose(1, 2), torch.ones(2, 0), y0)
    assert (y0 == 0).all()


def test_batched_matvec_misuse_is_named():
    at, x, y = torch.ones(2, 4, 3).transpose(1, 2), torch.ones(2, 4), torch.ones(2, 3)
    with pytest.raises(Exception, match="X"):
        launch(batched_atx, "reference", at, torch.ones(2, 4, 1), y)      # X of rank 3
    with pytest.raises(Exception, match="constant BK=0"):
        launch(batched_atx, "reference", at, x, y, BK=0)


# ---- 3. fp8 e4m3 quantization with one scale per 1 x BN group ------------------------------------------------------
@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def group_quant_e4m3(X, Q, ST, *, BM: int = 16, BN: int = 32):
    """Q (M, N) e4m3 = X / s and ST (groups, M) = s, s = amax(|X[r, group]|) / 448 per row r and 1 x BN column
    group (1 where the group is all zero). ST is the transposed view of the (M, groups) scale matrix."""
    i, j = ts.block_id(0), ts.block_id(1)
    x, ax = ts.RegTile[ts.f32, BM, BN](), ts.RegTile[ts.f32, BM, BN]()
    amax, s = ts.RegVec[ts.f32, BM](), ts.RegVec[ts.f32, BM]()
    nonzero = ts.RegVec[ts.bool_, BM]()
    ts.load(x, X, at=(i, j))                          # past N: 0, which does not change an amax
    ts.abs(ax, x)
    ts.row_max(amax, ax)
    ts.gt(nonzero, amax, 0.0)
    ts.div(s, amax, 448.0)
    ts.where(s, nonzero, s, 1.0)
    ts.div(x, x, ts.per_row(s))
    q = ts.RegTile[Q.dtype, BM, BN]()
    ts.copy(q, x)
    ts.store(Q, q, at=(i, j))
    ts.store(ST, s, at=(j, i))


def quant_ref(x, BN=32):
    """torch's answer: per-group scales and the e4m3 of x / s (torch's f32 -> e4m3 conversion, saturated first as
    the kernel's is), and the dequantized values."""
    M, N = x.shape
    g = -(-N // BN)
    xf = torch.nn.functional.pad(x.float(), (0, g * BN - N)).view(M, g, BN)
    amax = xf.abs().amax(2)
    s = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (xf / s[..., None]).clamp(-448, 448).to(E4M3).view(M, g * BN)[:, :N]
    return q, s


def run_quant(backend, x, BN=32):
    M, N = x.shape
    g = -(-N // BN)
    q = torch.full((M, N), 0x7F, dtype=torch.uint8).view(E4M3)    # e4m3 NaN
    s = poisoned(M, g)
    launch(group_quant_e4m3, backend, x, q, s.T, BN=BN)
    return q, s


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF, F16])
@pytest.mark.parametrize(("M", "N"), [(21, 70), (1, 1), (16, 64), (3, 33)])
def test_group_fp8_quantize(backend, dtype, M, N, rng):
    x = (randn(rng, M, N) * torch.from_numpy(rng.uniform(0.01, 100, (M, 1))).float()).to(dtype)
    if M > 2:
        x[1] = 0.0                                    # all-zero groups: scale 1, q 0
        x[2, 0] = 3e4 if dtype is not F16 else 6e4    # one large entry saturates nothing: it sets the scale
    q, s = run_quant(backend, x)
    wq, ws = quant_ref(x)
    torch.testing.assert_close(s, ws, rtol=1e-6, atol=0)
    assert torch.equal(q.view(torch.uint8), wq.view(torch.uint8)), (q.float() - wq.float()).abs().max()
    deq = q.float().view(M, N)
    g = torch.arange(N) // 32
    back = deq * s[:, g]
    err = (back.double() - x.double()).abs()          # e4m3: 3 mantissa bits; subnormals below 2^-6 s
    assert (err <= x.double().abs() / 16 + s[:, g].double() * 2.0**-10).all(), err.max()
    if M > 2:
        assert (s[1] == 1).all() and (q[1].float() == 0).all()
        assert q[2, 0].float().item() == 448.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_fp8_quantize_nan_and_inf(backend):
    """A NaN in a group: torch's amax is NaN, so the group's scale is NaN and all of it quantizes to NaN; an inf:
    scale inf, x / inf = 0 for the finite entries and NaN for the inf itself. Groups without either are exact."""
    x = torch.ones(2, 40)
    x[0, 3] = math.nan
    x[1, 35] = math.inf
    q, s = run_quant(backend, x)
    wq, ws = quant_ref(x)
    torch.testing.assert_close(s, ws, equal_nan=True)
    assert torch.equal(q.view(torch.uint8) & 0x7F == 0x7F, wq.view(torch.uint8) & 0x7F == 0x7F)
    torch.testing.assert_close(q.float(), wq.float(), equal_nan=True)


def test_group_fp8_quantize_misuse_is_named():
    x = torch.ones(4, 40)
    q = torch.zeros(4, 40, dtype=E4M3)
    with pytest.raises(Exception, match="ST"):
        launch(group_quant_e4m3, "reference", x, q, torch.ones(2, 4, 1))     # ST of rank 3
    with pytest.raises(Exception, match="BN"):
        launch(group_quant_e4m3, "reference", x, q, torch.ones(2, 4), BN="32")


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_fp8_quantize_of_tiny_and_huge_groups(backend):
    """A group of amax 1e-38 (its scale 2.2e-41 is an f32 subnormal: flushing it to 0 would make x / s inf, then
    448) and one of amax 3e38 (x / s of 1.0 underflows e4m3 to 0): scales and codes as torch's."""
    X = torch.tensor([[1e-38, -3e-39, 5e-40, 0.0] * 10, [3e38, -1e38, 1.0, 0.0] * 10])
    q, s = run_quant(backend, X)
    wq, ws = quant_ref(X)
    torch.testing.assert_close(s, ws, rtol=1e-6, atol=0)
    assert torch.equal(q.view(torch.uint8), wq.view(torch.uint8))
    assert q[0, 0].float().item() == 448.0 and q[1, 2].float().item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemm_row_softmax_of_e4m3_operands(backend):
    """e4m3 operands (both of the product in fp8, accumulated in f32), K = 40 in tiles of 32 (a ragged last K tile
    whose padding must read as 0, not as an fp8 NaN code)."""
    g = torch.Generator().manual_seed(25)
    a = (torch.randn(21, 40, generator=g) * 3).to(E4M3)
    b = (torch.randn(19, 40, generator=g) * 3).to(E4M3)
    p = poisoned(21, 19)
    launch(gemm_softmax, backend, a, b, p, 0.1, BK=32)
    torch.testing.assert_close(p.double(), gemm_softmax_ref(a.float(), b.float(), 0.1), rtol=1e-5, atol=1e-6)
