"""Round 11 of held-out kernels, continued (see test_heldout_round11.py's docstring): reductions over segments given
by offsets (CSR), as torch_scatter's segment_max_csr and np.maximum.reduceat take them. Each segment's max and its
first argmax (NaN the largest, as np.argmax: a segment holding NaN gives NaN at its first NaN), empty segments -inf
and -1; each program owns a block of segments and scans every element tile, its trip count from the tensor's size,
segments masked out of the tiles by their bounds.
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, I32, I64, launch

import tilestack.lang as ts

NONE = 2**31 - 1   # an index no segment has


@ts.kernel(grid=lambda STARTS, BS: (ts.cdiv(STARTS.shape[0], BS),))
def segment_argmax(X, STARTS, ENDS, VAL, IDX, *, BS: int = 8, BN: int = 32):
    """X (N,) values; STARTS, ENDS (S,) the segments' bounds (offsets[:-1] and offsets[1:], two views of one (S + 1,)
    tensor); VAL (S,) f32 the max, IDX (S,) i32 its first position."""
    sb = ts.block_id(0)
    x = ts.RegVec[ts.f32, BN]()
    nan = ts.RegVec[ts.bool_, BN]()
    pos = ts.RegVec[ts.i32, BN]()
    inside = ts.RegTile[ts.bool_, BS, BN]()
    bound = ts.RegTile[ts.bool_, BS, BN]()
    cand = ts.RegTile[ts.f32, BS, BN]()
    at = ts.RegTile[ts.i32, BS, BN]()
    lo = ts.RegVec[STARTS.dtype, BS]()
    hi = ts.RegVec[ENDS.dtype, BS]()
    best_v = ts.RegVec[ts.f32, BS]()
    best_i = ts.RegVec[ts.i32, BS]()
    first_nan = ts.RegVec[ts.i32, BS]()
    tile_v = ts.RegVec[ts.f32, BS]()
    tile_i = ts.RegVec[ts.i32, BS]()
    better = ts.RegVec[ts.bool_, BS]()
    flag = ts.RegVec[ts.bool_, BS]()
    ts.load(lo, STARTS, at=(sb,))
    ts.load(hi, ENDS, at=(sb,))
    ts.neg_infty(best_v)
    ts.fill(best_i, NONE)
    ts.fill(first_nan, NONE)
    for j in ts.range(ts.cdiv(X.shape[0], BN)):
        ts.load(x, X, at=(j,))
        ts.arange(pos, j * BN)
        ts.ge(inside, ts.per_col(pos), ts.per_row(lo))
        ts.lt(bound, ts.per_col(pos), ts.per_row(hi))
        ts.logical_and(inside, inside, bound)
        ts.ne(nan, x, x)
        ts.logical_and(bound, inside, ts.per_col(nan))
        ts.where(at, bound, ts.per_col(pos), NONE)
        ts.row_min(first_nan, at, first_nan)          # the first NaN of each segment, carried
        ts.logical_not(nan, nan)
        ts.logical_and(inside, inside, ts.per_col(nan))   # (the rest compares numbers only)
        ts.where(cand, inside, ts.per_col(x), -math.inf)
        ts.row_max(tile_v, cand)
        ts.eq(bound, cand, ts.per_row(tile_v))
        ts.logical_and(bound, bound, inside)
        ts.where(at, bound, ts.per_col(pos), NONE)
        ts.row_min(tile_i, at)
        ts.gt(better, tile_v, best_v)                 # (an equal value came first: it stays)
        ts.eq(flag, best_i, NONE)
        ts.logical_or(better, better, flag)
        ts.ne(flag, tile_i, NONE)
        ts.logical_and(better, better, flag)
        ts.where(best_v, better, tile_v, best_v)
        ts.where(best_i, better, tile_i, best_i)
    ts.ne(flag, first_nan, NONE)
    ts.where(best_v, flag, math.nan, best_v)
    ts.where(best_i, flag, first_nan, best_i)
    ts.eq(flag, best_i, NONE)
    ts.where(best_i, flag, -1, best_i)                # empty: -1 (and -inf)
    ts.store(VAL, best_v, at=(sb,))
    ts.store(IDX, best_i, at=(sb,))


def segment_argmax_ref(x: np.ndarray, offsets: np.ndarray):
    vals, idx = [], []
    for a, b in zip(offsets[:-1], offsets[1:], strict=True):
        if a == b:
            vals.append(-math.inf)
            idx.append(-1)
        else:
            k = int(np.argmax(x[a:b]))                # (the first max; the first NaN if any)
            vals.append(x[a + k])
            idx.append(a + k)
    return np.array(vals, dtype=np.float64), np.array(idx, dtype=np.int64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F16, BF])
@pytest.mark.parametrize("off_dtype", [I32, I64])
@pytest.mark.parametrize(("N", "S"), [(200, 21), (33, 5), (40, 1), (0, 3)])
def test_segment_argmax(backend, dtype, off_dtype, N, S, rng):
    """Random cuts (empty segments among them, one segment of everything when S = 1); small integers (ties); a NaN in
    one segment, -inf and +inf in others, a segment of only -inf (its first element)."""
    x = torch.from_numpy(rng.integers(-4, 5, N).astype(np.float64))
    cuts = np.sort(rng.integers(0, N + 1, S - 1)) if S > 1 else np.array([], dtype=np.int64)
    offsets = np.concatenate([[0], cuts, [N]]).astype(np.int64)
    sizes = np.diff(offsets)
    filled = [s for s in range(S) if sizes[s] >= 2]
    if len(filled) >= 3:
        a, b, c = (int(offsets[s]) for s in filled[:3])
        x[a + 1] = math.nan
        x[b] = -math.inf
        x[b + 1] = math.inf
        x[c:int(offsets[filled[2] + 1])] = -math.inf
    x = x.to(dtype)
    off = torch.from_numpy(offsets).to(off_dtype)
    val, idx = torch.full((S,), 7.0), torch.full((S,), -7, dtype=I32)
    launch(segment_argmax, backend, x, off[:-1], off[1:], val, idx)
    want_v, want_i = segment_argmax_ref(x.double().numpy(), offsets)
    assert np.array_equal(idx.numpy(), want_i), (idx, want_i)
    assert np.array_equal(val.double().numpy(), want_v, equal_nan=True)
