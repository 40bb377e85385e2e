"""Round 7 of held-out kernels, continued (see test_heldout_round7.py's docstring): a 1-D im2col (unfold) with runtime
stride, dilation and padding by one-row tiles, checked through conv1d; a split-K GEMM whose programs add partial
products atomically (a grid axis from an int argument, a grid-stride K loop); a row RMSNorm fed by a ring of
asynchronous loads, with and without warp roles (explicit hardware outside a GEMM); and misuse named at launch.
Each kernel here is also compiled for sm_90a on this CPU (the last section).

Bugs these found, fixed in the compiler, each kept here as its regression test:
- Triton: a wait_load whose stage was written out again (`j % STAGES` at the async_load and at the wait, two IR
  values of one index) was refused as "this wait's load is elsewhere"; erase_async compares the stage computations
  now (backends.triton.passes._same_index): test_staged_rmsnorm on Triton;
- Gluon: a stage made from a size (`(cdiv(n, BN) + j) % STAGES`, the second pass's stages) was widened to i64 as
  data, and Gluon's `.index()` of a ring takes only an i32: the compile failed; a stage is address math now
  (ir.scalars.addressing): test_compiles_for_sm90a_with_gluon[staged_rmsnorm].
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, F64, I8, close, launch, meta, randn
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a

import tilestack.lang as ts
from tilestack.errors import LaunchError, TileDTypeError

POISON = -77.0


def poisoned(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.full(shape, POISON, dtype=dtype)


# ---- 1. im2col for a 1-D convolution: one-row tiles, so a row coordinate is an element's (negative reads zero) -------
@ts.kernel(grid=lambda Out, BC: (Out.shape[1], ts.cdiv(Out.shape[3], BC), Out.shape[0]))
def unfold1d(X, Out, stride: int, dilation: int, padding: int, *, BC: int = 16):
    """Out[b, t, k, c] = X[b, t * stride + k * dilation - padding, c], 0 outside X; X (B, L, C), Out (B, T, K, C)."""
    t, cb, b = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    x = ts.RegTile[X.dtype, 1, BC]()
    for k in ts.range(Out.shape[2]):
        ts.load(x, X, at=(b, t * stride + k * dilation - padding, cb))
        ts.store(Out, x, at=(b, t, k, cb))


def unfold1d_want(x: torch.Tensor, K: int, stride: int, dilation: int, padding: int) -> torch.Tensor:
    B, L, C = x.shape
    T = (L + 2 * padding - dilation * (K - 1) - 1) // stride + 1
    xp = F.pad(x, (0, 0, padding, padding))
    rows = torch.arange(max(T, 0))[:, None] * stride + torch.arange(K)[None, :] * dilation      # (T, K)
    return xp[:, rows.reshape(-1)].reshape(B, max(T, 0), K, C)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", [torch.float32, BF, I8])
@pytest.mark.parametrize(("B", "L", "C", "K", "stride", "dilation", "padding"),
                         [(2, 37, 19, 3, 1, 1, 1), (1, 50, 8, 4, 3, 2, 5), (3, 9, 33, 1, 2, 1, 0),
                          (1, 1, 1, 1, 1, 1, 0), (2, 3, 5, 3, 1, 2, 0)])       # (the last: no output positions)
def test_unfold1d(backend, dt, B, L, C, K, stride, dilation, padding, rng):
    x = (randn(rng, B, C, L) * 4).to(dt).transpose(1, 2)          # (B, L, C), channels strided: a transposed view
    T = (L + 2 * padding - dilation * (K - 1) - 1) // stride + 1
    out = torch.full((B, max(T, 0), K, C), -5, dtype=dt)
    launch(unfold1d, backend, x, out, stride, dilation, padding)
    want = unfold1d_want(x, K, stride, dilation, padding)
    assert torch.equal(out, want)
    if dt is torch.float32 and T > 0:                             # it is conv1d's input: the product is conv1d
        w = randn(rng, 6, C, K)
        got = out.double().reshape(B, T, K * C) @ w.double().permute(2, 1, 0).reshape(K * C, 6)
        conv = F.conv1d(x.double().transpose(1, 2), w.double(), stride=stride, padding=padding, dilation=dilation)
        close(got.transpose(1, 2), conv, F64)


# ---- 2. a split-K GEMM: program z of `splits` takes K tiles z, z + splits, ... and adds its product atomically -----
@ts.kernel(grid=lambda C, splits, BM, BN: (ts.cdiv(C.shape[0], BM), ts.cdiv(C.shape[1], BN), splits))
def gemm_split_k(A, B, C, splits: int, *, BM: int = 16, BN: int = 16, BK: int = 16):
    """C += A @ B, A (M, K), B (K, N), C f32 or f64; `splits` programs per output tile (none: C is untouched)."""
    i, j, z = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    ts.zero(acc)
    for k in ts.range(z, ts.cdiv(A.shape[1], BK), ts.num_blocks(2)):
        ts.load(a, A, at=(i, k))
        ts.load(b, B, at=(k, j))
        ts.mma_AB(acc, a, b, acc)
    ts.atomic_add(C, acc, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", [BF, F16, torch.float32])
@pytest.mark.parametrize("cdt", [torch.float32, F64])
@pytest.mark.parametrize(("M", "N", "K", "splits"), [(32, 48, 100, 3), (21, 13, 40, 7), (5, 7, 0, 2),
                                                      (16, 16, 16, 1), (9, 9, 33, 0)])
def test_split_k_gemm(backend, dt, cdt, M, N, K, splits, rng):
    a, b = randn(rng, M, K, dtype=dt), randn(rng, K, N, dtype=dt)
    c0 = randn(rng, M, N, dtype=cdt)
    c = c0.clone()
    launch(gemm_split_k, backend, a, b, c, splits)
    want = c0.double() + (a.double() @ b.double() if splits else 0)
    close(c, want, torch.float32, scale=10)


# ---- 3. a row RMSNorm fed by a ring of asynchronous loads, in two passes; optionally a producer and a consumer role --
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def staged_rmsnorm(X, W, Y, eps: float, *, BM: int = 16, BN: int = 32, STAGES: int = 2, ROLES: bool = False):
    """Y = X * rsqrt(mean(X^2) + eps) * W over rows wider than a tile: each pass streams X's column tiles through a
    ring of STAGES shared tiles (tile j in stage j % STAGES); with ROLES a producer warpgroup issues the loads."""
    i = ts.block_id(0)
    n = X.shape[1]
    nb = ts.cdiv(n, BN)
    ring = ts.SharedStages[X.dtype, STAGES, BM, BN]()
    xs = ts.SharedTile[X.dtype, BM, BN]()

    def role(name):
        return ts.partition(name, warps=4, registers=232 if name == "consumer" else 40) if ROLES else \
            contextlib.nullcontext()

    with role("consumer"):
        x = ts.RegTile[ts.f32, BM, BN]()
        ss = ts.RegVec[ts.f32, BM]()
        w = ts.RegVec[ts.f32, BN]()
        y = ts.RegTile[Y.dtype, BM, BN]()
        ts.zero(ss)
    for j in ts.range(nb):
        with role("producer"):
            ts.async_load(ring, j % STAGES, X, at=(i, j))
        with role("consumer"):
            ts.wait_load(xs, ring, j % STAGES)
            ts.load(x, xs)
            ts.mul(x, x, x)
            ts.row_sum(ss, x, ss)
    with role("consumer"):
        ts.div(ss, ss, n)
        ts.add(ss, ss, eps)
        ts.rsqrt(ss, ss)
    for j in ts.range(nb):
        with role("producer"):
            ts.async_load(ring, (nb + j) % STAGES, X, at=(i, j))
        with role("consumer"):
            ts.wait_load(xs, ring, (nb + j) % STAGES)
            ts.load(x, xs)
            ts.load(w, W, at=(j,))
            ts.mul(x, x, ts.per_row(ss))
            ts.mul(x, x, ts.per_col(w))
            ts.copy(y, x)
            ts.store(Y, y, at=(i, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("roles", [False, True])
@pytest.mark.parametrize("dt", [BF, torch.float32])
@pytest.mark.parametrize(("M", "N", "stages"), [(32, 96, 2), (19, 70, 3), (1, 1, 2), (0, 8, 2)])
def test_staged_rmsnorm(backend, roles, dt, M, N, stages, rng):
    x, w = randn(rng, M, N, dtype=dt) * 3, randn(rng, N, dtype=dt)
    if M > 2:
        x[1] = 0.0                                   # rsqrt(eps): finite
        x[2, 0] = 1e20                               # its square is past f32: that row is 0 (x / sqrt(inf))
    y = poisoned(M, N, dtype=dt)
    launch(staged_rmsnorm, backend, x, w, y, 1e-6, STAGES=stages, ROLES=roles)
    xd = x.float().double()
    ms = (xd.float() * xd.float()).double().mean(1, keepdim=True)   # (the squares in f32, as the kernel's)
    close(y, (xd * torch.rsqrt(ms + 1e-6) * w.double()).to(dt), scale=4)


# ---- 4. misuse at launch: refused with a message naming the argument, before anything is written -----------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bf16_atomic_destination_is_named_when_traced(backend):
    a, b, c = torch.zeros(16, 16, dtype=BF), torch.zeros(16, 16, dtype=BF), poisoned(16, 16, dtype=BF)
    with pytest.raises(TileDTypeError, match=r"atomic_add: `C` is bf16; atomic adds go into f64, f32, f16, i32, i64"):
        launch(gemm_split_k, backend, a, b, c, 2)
    assert torch.equal(c, poisoned(16, 16, dtype=BF))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tensor_for_an_int_argument_is_named(backend):
    x, out = torch.zeros(1, 8, 4), poisoned(1, 8, 1, 4)
    with pytest.raises(LaunchError, match=r"unfold1d: argument stride is a runtime int; got Tensor"):
        launch(unfold1d, backend, x, out, torch.tensor(1), 1, 0)
    with pytest.raises(LaunchError, match=r"Out.shape\[3\]: argument Out has rank 3"):
        launch(unfold1d, backend, x, out[:, :, 0], 1, 1, 0)
    assert torch.equal(out, poisoned(1, 8, 1, 4))


# ---- 5. the kernels above compiled for Hopper (sm_90a) on this CPU, by Triton and (where it lowers them) Gluon ------
AOT_CASES = {   # name -> (kernel, meta args, constants)
    "unfold1d": (unfold1d, (meta(8, 4096, 512, dtype=BF), meta(8, 2048, 3, 512, dtype=BF), 2, 1, 1), dict(BC=128)),
    "gemm_split_k": (gemm_split_k, (meta(512, 8192, dtype=BF), meta(8192, 512, dtype=BF), meta(512, 512), 4),
                     dict(BM=128, BN=128, BK=64)),
    "staged_rmsnorm": (staged_rmsnorm, (meta(4096, 4096, dtype=BF), meta(4096, dtype=BF), meta(4096, 4096, dtype=BF),
                                        1e-6), dict(BM=64, BN=128, STAGES=3)),
    "staged_rmsnorm_roles": (staged_rmsnorm, (meta(4096, 4096, dtype=BF), meta(4096, dtype=BF),
                                              meta(4096, 4096, dtype=BF), 1e-6),
                             dict(BM=64, BN=128, STAGES=3, ROLES=True)),
}


@pytest.mark.parametrize("name", AOT_CASES)
def test_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*AOT_CASES[name])


@pytest.mark.parametrize("name", AOT_CASES)
def test_compiles_for_sm90a_with_gluon(name):
    compile_gluon_sm90a(*AOT_CASES[name])
