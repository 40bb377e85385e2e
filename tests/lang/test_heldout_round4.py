"""Round 4 of held-out kernels (after test_heldout_kernels.py, test_heldout_round2.py and test_heldout_round3.py):
kernels an outsider would write with the tile language, run on the reference executor and Triton's interpreter
against float64 / exact-integer NumPy and torch, outputs poisoned first, then compiled for Hopper (sm_90a) on this
CPU by the Triton and Gluon backends.

Index arithmetic past 2**31 on an expanded (65536, 65537) tensor (its numel, flat positions row * N), band masks
built on bool_ masks by tril/triu and combined with the & | ~ operators while a loop carries them, float scalar
arithmetic (a runtime float and sizes past 2**24 meeting constants), a 64-bit xorshift whose state a loop carries,
Python's floor division and modulo built from C's truncating div and rem with per-column divisors, column min-max
scaling and double centering (reductions along both axes broadcast back, padding masked out), a temporal difference
on a 3-D grid whose leading coordinate reaches -1 on a transposed view, 1x1 tiles with atomic adds at coordinates past
the edges, nested loops whose inner bound is the outer counter, nan_to_num with runtime replacements, conversions
between 16-bit floats, bools and wide integers, integer sums that wrap, and misuse of Python's operators on tiles.

Bugs these found, fixed in the compiler, each kept here as its regression test: an index product of two runtime
values (X.shape[0] * X.shape[1]) wrapped at 2**31 on Triton and Gluon; tril/triu/right_fill/lower_fill of a bool_
mask turned it into an i32 tile on Triton and Gluon, so a later logical_not (~) left every element true; float
scalar arithmetic ran in float64 in the reference but in f32 on the backends; `if tile:` was silently true.
"""

import math

import numpy as np
import pytest
import torch
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a

import tilestack.lang as ts
from tilestack import config
from tilestack.errors import TileDTypeError, TraceError

BACKENDS = ("reference", "triton")
FLOATS = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
BF, I8, I32, I64, F16 = torch.bfloat16, torch.int8, torch.int32, torch.int64, torch.float16
POISON = -77                       # no integer result below can be this
U64 = 2**64 - 1


def launch(kernel, backend, *args, **consts) -> None:
    with config.override(triton_interpret=True):
        kernel(*args, backend=backend, **consts)


def randn(rng, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


def ints(rng, lo, hi, shape, dtype) -> torch.Tensor:
    return torch.from_numpy(rng.integers(lo, hi, shape, dtype=np.int64)).to(dtype)


# ---- 1. index arithmetic past 2**31: the numel and flat positions of an expanded (65536, 65537) tensor --------------
@ts.kernel(grid=lambda X: (1,))
def flat_positions(X, Pos, Inv, row: int, *, BN: int = 16):
    """Pos[0] = row * N + k (flat positions of row `row`'s first BN elements), Pos[1] = numel - BN + k (the last BN),
    Inv = X's first BN elements of that row / numel, for an (M, N) X."""
    numel = X.shape[0] * X.shape[1]
    p = ts.RegVec[ts.i64, BN]()
    ts.arange(p, row * X.shape[1])
    ts.store(Pos, p, at=(0, 0))
    ts.arange(p, numel - BN)
    ts.store(Pos, p, at=(1, 0))
    x = ts.RegVec[ts.f32, BN]()
    ts.load(x, X, at=(row, 0))
    ts.div(x, x, numel)                                # an index scalar in f32 work: f32(numel)
    ts.store(Inv, x, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N", "row"), [(65536, 65537, 65535), (3, 40, 2), (46341, 46341, 46340)])
def test_index_products_past_2_31(backend, M, N, row, rng):
    BN = 16
    base = randn(rng, 1, BN) + 2
    x = base.expand(M, BN) if N == BN else torch.cat([base, torch.zeros(1, N - BN)], 1).expand(M, N)  # no memory
    pos, inv = torch.full((2, BN), POISON, dtype=I64), torch.full((BN,), math.nan)
    launch(flat_positions, backend, x, pos, inv, row)
    k = torch.arange(BN, dtype=I64)
    assert torch.equal(pos[0], row * N + k) and torch.equal(pos[1], M * N - BN + k)
    numel32 = torch.tensor(float(M * N), dtype=torch.float32)         # the index scalar as f32 work takes it
    assert torch.equal(inv, base[0] / numel32)


def test_index_products_of_runtime_values_are_64_bit_in_generated_source():
    traced = flat_positions.trace(ts.ArgSpec(ts.f32, 2), ts.ArgSpec(ts.i64, 2), ts.ArgSpec(ts.f32, 1), 3)
    src = traced.source("triton")
    assert "tl.cast(X_d0, tl.int64) * X_d1" in src and "tl.cast(row, tl.int64) * X_d1" in src
    assert "tl.int64) * 16" not in src                  # a product with a constant (tile coordinates) stays 32-bit


# ---- 2. band masks on bool_ masks: tril/triu of a mask, & | ~ operators, a mask and a count carried by a loop --------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def band_mask(X, Count, Any, Y, lo: int, hi: int, *, BM: int = 8, BN: int = 16):
    """Per row r: Count = #{c : x[r, c] > 0 and lo <= c - r <= hi}, Any = whether that set is non-empty or the row
    has a NaN; Y = x there, else -x."""
    i = ts.block_id(0)
    n = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    band = ts.RegTile[ts.bool_, BM, BN]()
    nan = ts.RegTile[ts.bool_, BM, BN]()
    hit = ts.RegVec[ts.bool_, BM]()
    seen = ts.RegVec[ts.bool_, BM]()
    count = ts.RegVec[ts.i32, BM]()
    y = ts.RegTile[Y.dtype, BM, BN]()
    ts.fill(seen, 0)
    ts.zero(count)
    for k in ts.range(ts.cdiv(n, BN)):
        shift = k * BN - i * BM                        # (global col - global row) - (tile col - tile row)
        ts.load(x, X, at=(i, k))
        ts.gt(band, x, 0.0)
        ts.tril(band, band, hi - shift, 0)             # col - row <= hi: masks of masks stay masks
        ts.triu(band, band, lo - shift, 0)
        ts.ne(nan, x, x)
        ts.row_sum(count, band, count)                 # bool_ counted in i32
        ts.row_max(hit, band | nan)
        ts.logical_or(seen, seen, hit)
        ts.where(y, ~band, -x, x)                       # (-NaN is NaN)
        ts.store(Y, y, at=(i, k))
    c8 = ts.RegVec[ts.i8, BM]()
    ts.copy(c8, seen)
    ts.store(Count, count, at=(i,))
    ts.store(Any, c8, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("M", "N", "lo", "hi"), [(8, 16, 0, 0), (13, 37, -3, 5), (21, 19, 2, 30), (5, 0, 0, 1)])
@pytest.mark.parametrize("ydt", [torch.float32, BF])
def test_band_mask_on_bool_masks(backend, M, N, lo, hi, ydt, rng):
    x = randn(rng, M, N)
    if M > 4 and N > 4:
        x[4, 3] = math.nan
    count, any_ = torch.full((M,), POISON, dtype=I32), torch.full((M,), POISON, dtype=I8)
    y = torch.full((M, N), 99.0, dtype=ydt)
    launch(band_mask, backend, x, count, any_, y, lo, hi)
    d = torch.arange(N)[None, :] - torch.arange(M)[:, None]
    band = (x > 0) & (d >= lo) & (d <= hi)
    assert torch.equal(count, band.sum(1).to(I32))
    assert torch.equal(any_, (band | x.isnan()).any(1).to(I8))
    torch.testing.assert_close(y, torch.where(band, x, -x).to(ydt), rtol=0, atol=0, equal_nan=True)


# ---- 3. float scalar arithmetic runs in f32 on every backend: a runtime float, sizes past 2**24, constants ---------
@ts.kernel(grid=lambda X: (1,))
def scalar_chain(X, Y, a: float, *, N: int = 8):
    x = ts.RegVec[ts.f32, N]()
    ts.load(x, X, at=(0,))
    n = X.shape[0]
    exprs = [(a + 3.0) + 3.0, n * 3.0 - a, a / 7 * 1e-3, -a - 1.0, n / 3, 1.0 / (n * n * 1.0) * a]
    for k, s in enumerate(exprs):
        ts.store(Y, x + s, at=(k,))


def _scalar_chain_f32(a: float, n: int) -> list[np.float32]:
    """The expressions of scalar_chain, each step in f32 (a runtime float is an f32, an index meeting a float too)."""
    f = np.float32
    a32, n32 = f(a), f(n)
    with np.errstate(all="ignore"):
        return [(a32 + f(3)) + f(3), n32 * f(3) - a32, a32 / f(7) * f(1e-3), f(0) - a32 - f(1), n32 / f(3),
                f(1) / (f(n * n) * f(1)) * a32]


# a runtime float is an f32 argument on the GPU; these are f32 values, as Triton's interpreter keeps a Python float
# until its first operation
F32_ARGS = [float(np.float32(v)) for v in (1e8, 0.1, 3.3e7, -2.5e-39, 1e30)]


@pytest.mark.parametrize(("n", "a"), zip((8, 2**24 + 1, 2**25 + 7, 3, 46341), F32_ARGS, strict=True))
def test_float_scalar_arithmetic_is_f32(n, a):
    x = torch.tensor([0.0, 1.0, -1.0, 0.5, 1e-3, 7.0, -2.0, 3.0]).repeat((n + 7) // 8)[:n] if n < 100 else \
        torch.tensor([0.0, 1.0, -1.0, 0.5, 1e-3, 7.0, -2.0, 3.0])[:1].expand(n)
    outs = []
    for backend in BACKENDS:
        y = torch.full((8 * 6,), math.nan)
        launch(scalar_chain, backend, x, y, a)
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0, equal_nan=True)
    want = [torch.from_numpy(x[:8].numpy() + s) if n >= 8 else None for s in _scalar_chain_f32(a, n)]
    for k, w in enumerate(want):
        if w is not None:
            torch.testing.assert_close(outs[0][8 * k:8 * k + 8], w, rtol=0, atol=0, equal_nan=True)
