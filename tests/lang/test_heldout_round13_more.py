"""Round 13 of held-out kernels, continued (see test_heldout_round13.py): embedding bags (sum and mean) from offsets,
a weighted and an unweighted bincount by atomic adds at indices read from memory, a softmax with a per-row temperature
read as a float from bf16/f16/f32 tensors and a per-tensor scale held in a 0-d tensor, indices of every integer width
and bool flags, int64 coordinates past 2**31 into expanded (stride-0) tensors, and stale ids far outside a tensor
(2**30 in an int32 block table: a product with the tile size that must not wrap back inside it).
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, I32, I64, close, launch, randn

import tilestack.lang as ts
from tilestack.errors import LaunchError

U8, BOOL = torch.uint8, torch.bool


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261314)


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. embedding bag -----------------------------------------------------------------------------------------------
@ts.kernel(grid=lambda OFFS, W, BD: (OFFS.shape[0] - 1, ts.cdiv(W.shape[1], BD)))
def embedding_bag(W, IDX, OFFS, OUT, mean: int, *, BD: int = 16):
    """OUT[b] = sum (mean: average) of W[IDX[p]] over p in [OFFS[b], OFFS[b + 1]); an index outside W's rows adds a
    row of zeros (and counts toward the mean); an empty bag gives 0. W (V, Dm), IDX (nnz,) int, OFFS (B + 1,) int."""
    b, j = ts.block_id(0), ts.block_id(1)
    start, end = ts.load_scalar(OFFS, b), ts.load_scalar(OFFS, b + 1)
    acc = ts.RegTile[ts.f32, 1, BD]()
    row = ts.RegTile[ts.f32, 1, BD]()
    ts.zero(acc)
    for p in ts.range(start, end):
        ts.load(row, W, at=(ts.load_scalar(IDX, p), j))
        ts.add(acc, acc, row)
    n = ts.smax(end - start, 1) * mean + (1 - mean)  # mean: the bag's size (1 for an empty one); sum: 1
    ts.div(acc, acc, n * 1.0)
    out = ts.RegTile[OUT.dtype, 1, BD]()
    ts.copy(out, acc)
    ts.store(OUT, out, at=(b, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, BF, F16])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("idx_dtype", [I32, I64])
def test_embedding_bag(backend, dtype, mode, idx_dtype, rng):
    """Against torch's embedding_bag on in-range bags (an empty bag, one of one index, a repeated index), plus a bag
    holding -1 and V (outside: zero rows, counted by the mean)."""
    V, Dm = 23, 40
    w = randn(rng, V, Dm, dtype=dtype)
    bags = [[3, 5, 5], [], [22], list(rng.integers(0, V, 9)), [0, -1, V, 7]]
    idx = torch.tensor([i for bag in bags for i in bag], dtype=idx_dtype)
    offs = torch.tensor([0, *np.cumsum([len(bag) for bag in bags])], dtype=idx_dtype)
    out = poisoned(len(bags), Dm, dtype=dtype)
    launch(embedding_bag, backend, w, idx, offs, out, int(mode == "mean"))
    good = len(bags) - 1
    want = torch.nn.functional.embedding_bag(idx[:int(offs[good])].long(), w.double(), offs[:good].long(), mode=mode)
    last = w.double()[[0, 7]].sum(0) / (4 if mode == "mean" else 1)
    close(out, torch.cat([want, last[None]]).to(dtype))


# ---- 2. bincount / histogram by atomic adds --------------------------------------------------------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def bincount(X, HIST, *, BM: int = 8):
    """HIST[X[p]] += 1 for each p (HIST (nbins,) i32 zeroed by the caller); values outside [0, nbins) are dropped."""
    i = ts.block_id(0)
    one = ts.RegVec[ts.i32, 1]()
    ts.fill(one, 1)
    for p in ts.range(i * BM, ts.smin(i * BM + BM, X.shape[0])):
        ts.atomic_add(HIST, one, at=(ts.load_scalar(X, p),))


@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def weighted_bincount(X, WT, HIST, *, BM: int = 8):
    """HIST[X[p]] += WT[p] (f32 HIST zeroed by the caller; WT of any float dtype, read as f32)."""
    i = ts.block_id(0)
    w = ts.RegVec[ts.f32, 1]()
    for p in ts.range(i * BM, ts.smin(i * BM + BM, X.shape[0])):
        ts.zero(w)
        ts.add(w, w, ts.load_scalar(WT, p))
        ts.atomic_add(HIST, w, at=(ts.load_scalar(X, p),))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype", [torch.int8, U8, I32, I64, BOOL])
@pytest.mark.parametrize("N", [0, 1, 37])
def test_bincount(backend, x_dtype, N, rng):
    """int8 values include negatives (dropped), uint8 values past 127 (no sign), int64 values past 2**32 (dropped, not
    wrapped into a bin); bools count into bins 0 and 1."""
    nbins = 200
    lo, hi = {torch.int8: (-128, 128), U8: (0, 256), I32: (-5, nbins + 5), I64: (-5, nbins + 5), BOOL: (0, 2)}[x_dtype]
    x = torch.from_numpy(rng.integers(lo, hi, N)).to(x_dtype)
    if x_dtype is I64 and N > 3:
        x[1], x[2] = 2**32 + 3, -(2**40)
    hist = torch.zeros(nbins, dtype=I32)
    launch(bincount, backend, x, hist)
    vals = x.long()
    want = torch.bincount(vals[(vals >= 0) & (vals < nbins)], minlength=nbins)
    assert torch.equal(hist, want.to(I32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w_dtype", [torch.float32, BF, F16])
def test_weighted_bincount(backend, w_dtype, rng):
    N, nbins = 50, 7
    x = torch.from_numpy(rng.integers(-1, nbins + 1, N)).to(I32)
    wt = randn(rng, N, dtype=w_dtype)
    hist = torch.zeros(nbins)
    launch(weighted_bincount, backend, x, wt, hist)
    keep = (x >= 0) & (x < nbins)
    want = torch.zeros(nbins, dtype=torch.float64).index_add_(0, x[keep].long(), wt[keep].double())
    close(hist, want, torch.float32)


# ---- 3. floats from memory: a temperature per row, a per-tensor scale in a 0-d tensor --------------------------------
@ts.kernel(grid=lambda X: (X.shape[0],))
def temperature_softmax(X, TEMP, SCALE, OUT, *, BN: int = 64):
    """OUT[b] = softmax(X[b] * SCALE / TEMP[b]) over a row of at most BN; TEMP (B,) and SCALE (a 0-d tensor) of any
    float dtype, read as f32."""
    b = ts.block_id(0)
    inv = ts.load_scalar(SCALE) / ts.load_scalar(TEMP, b)
    x = ts.RegTile[ts.f32, 1, BN]()
    m = ts.RegVec[ts.f32, 1]()
    s = ts.RegVec[ts.f32, 1]()
    ts.load(x, X, at=(b, 0))
    ts.mul(x, x, inv)
    ts.right_fill(x, x, X.shape[1], -math.inf)
    ts.row_max(m, x)
    ts.sub(x, x, ts.per_row(m))
    ts.exp(x, x)
    ts.row_sum(s, x)
    ts.div(x, x, ts.per_row(s))
    out = ts.RegTile[OUT.dtype, 1, BN]()
    ts.copy(out, x)
    ts.store(OUT, out, at=(b, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, BF, F16])
def test_temperature_softmax(backend, dtype, rng):
    """Temperatures 0.1 to 4 and one of 1e-3 (a near one-hot row), given in the logits' dtype (so as that dtype
    rounds them), and a scale of 0.75 held in a 0-d tensor."""
    B, V = 6, 50
    x = randn(rng, B, V, dtype=dtype) * 2
    temp = torch.tensor([0.1, 0.7, 1.0, 2.5, 4.0, 1e-3]).to(dtype)
    scale = torch.tensor(0.75, dtype=dtype)
    out = poisoned(B, V, dtype=dtype)
    launch(temperature_softmax, backend, x, temp, scale, out)
    want = torch.softmax(x.double() * (scale.double() / temp.double()[:, None]), -1)
    close(out, want.to(dtype), scale=2)


# ---- 4. indices and flags of every width, reads outside the tensor ---------------------------------------------------
@ts.kernel(grid=lambda SEL: (SEL.shape[0],))
def select_rows(X, SEL, FLAG, OUT, shift: int, *, D: int = 16):
    """OUT[k] = X[SEL[k + shift]] * FLAG[k] (the flag an int8/uint8/bool read as an index); a selector read outside SEL
    (k + shift past its ends) is 0, so row 0; a selector outside X reads zeros."""
    k = ts.block_id(0)
    r = ts.load_scalar(SEL, k + shift)
    f = ts.load_scalar(FLAG, k)
    x = ts.RegTile[ts.f32, 1, D]()
    ts.load(x, X, at=(r, 0))
    ts.mul(x, x, f)
    ts.store(OUT, x, at=(k, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sel_dtype", [torch.int8, U8, I32, I64])
@pytest.mark.parametrize("flag_dtype", [torch.int8, U8, BOOL])
@pytest.mark.parametrize("shift", [0, 2, -3])
def test_select_rows_with_flags(backend, sel_dtype, flag_dtype, shift, rng):
    X = randn(rng, 9, 16)
    sel = torch.tensor([4, 0, 8, 2, 9, 7]).to(sel_dtype)                  # 9: outside X
    if sel_dtype not in (U8,):
        sel[1] = -1                                                       # before X: zeros
    flag = torch.tensor([1, 1, 0, 1, 1, 1]).to(flag_dtype)
    if flag_dtype is not BOOL:
        flag[5] = 3                                                       # a flag of 3 scales by 3
    out = poisoned(6, 16)
    launch(select_rows, backend, X, sel, flag, out, shift)
    want = torch.empty(6, 16)
    for k in range(6):
        j = k + shift
        r = int(sel[j]) if 0 <= j < 6 else 0
        want[k] = (X[r] if 0 <= r < 9 else torch.zeros(16)) * int(flag[k])     # (times 3: rounded in f32)
    assert torch.equal(out, want)


def test_an_int16_index_tensor_is_refused_by_name():
    x, out = torch.zeros(9, 16), torch.zeros(6, 16)
    with pytest.raises(LaunchError, match=r"select_rows: argument SEL has dtype torch.int16, which tiles cannot hold"):
        select_rows(x, torch.zeros(6, dtype=torch.int16), torch.ones(6, dtype=U8), out, 0, backend="reference")


# ---- 5. int64 coordinates past 2**31 into expanded tensors -----------------------------------------------------------
@ts.kernel(grid=lambda IDX: (IDX.shape[0],))
def gather_far(X, X3, IDX, OUT, OUT3, *, BM: int = 4, D: int = 16):
    """OUT[k] = the (BM, D) tile of X at tile row IDX[k] (X (N, D) with N past 2**33); OUT3[k] = X3[IDX[k], :BM, :]
    (X3 (N, R, D), the index an element coordinate). Shared-tile loads (the copy engine's path where the layout
    allows) and register-tile loads."""
    k = ts.block_id(0)
    r = ts.load_scalar(IDX, k)
    a = ts.SharedTile[X.dtype, BM, D]()
    b = ts.RegTile[X3.dtype, BM, D]()
    ts.load(a, X, at=(r, 0))
    ts.load(b, X3, at=(r, 0, 0))
    ts.store(OUT, a, at=(k, 0))
    ts.store(OUT3, b, at=(k, 0))


def test_int64_coordinates_past_2_31(rng):
    """Tile rows 2**31 + 5 (rows past 2**33 with BM = 4) and 2**32 + 1 read the data (an i32 truncation would read
    a negative row: zeros, or row 1); -1 and past the end read zeros. X and X3 are stride-0 expanded: no memory."""
    BM, D, N = 4, 16, 2**34
    base = randn(rng, 1, D)
    base3 = randn(rng, 1, 3, D)
    x = base.expand(N, D)
    x3 = base3.expand(N, 3, D)
    idx = torch.tensor([2**31 + 5, 2**32 + 1, -1, N // BM, N, 7], dtype=I64)
    want = torch.zeros(len(idx), BM, D)
    want3 = torch.zeros(len(idx), BM, D)
    for k, r in enumerate(idx.tolist()):
        if 0 <= r < N // BM:
            want[k] = base
        if 0 <= r < N:
            want3[k, :3] = base3[0]
    for backend in BACKENDS:
        out, out3 = poisoned(len(idx) * BM, D), poisoned(len(idx) * BM, D)
        launch(gather_far, backend, x, x3, idx, out, out3)
        assert torch.equal(out.view(-1, BM, D), want), backend
        assert torch.equal(out3.view(-1, BM, D), want3), backend


@ts.kernel(grid=lambda TABLE: (TABLE.shape[0],))
def gather_flat_pages(CACHE, TABLE, OUT, *, P: int = 16, D: int = 16):
    """OUT[j] = CACHE rows [TABLE[j] P, TABLE[j] P + P): CACHE (pages P, D) flat, a page the tile row coordinate; a
    page id outside the cache reads zeros. Both a register tile (pointers) and a shared one (the copy engine)."""
    j = ts.block_id(0)
    page = ts.load_scalar(TABLE, j)
    a = ts.RegTile[CACHE.dtype, P, D]()
    b = ts.SharedTile[CACHE.dtype, P, D]()
    c = ts.RegTile[CACHE.dtype, P, D]()
    ts.load(a, CACHE, at=(page, 0))
    ts.load(b, CACHE, at=(page, 0))
    ts.load(c, b)
    ts.add(a, a, c)
    ts.store(OUT, a, at=(j, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("table_dtype", [I32, I64])
def test_stale_page_ids_far_outside_read_zeros(backend, table_dtype, rng):
    """Page ids 2**28 and 2**30 times P = 16 pass 2**31: in 32 bits 2**28 * 16 wraps to 0 (page 0's rows); -2**31
    too. Each must read zeros, as the reference does."""
    pages, P, D = 5, 16, 16
    cache = randn(rng, pages * P, D)
    table = torch.tensor([3, 2**28, 2**30, -(2**31), 0, 4, 2**27 + 1], dtype=table_dtype)
    out = poisoned(len(table) * P, D)
    launch(gather_flat_pages, backend, cache, table, out)
    want = torch.zeros(len(table), P, D)
    for j, p in enumerate(table.tolist()):
        if 0 <= p < pages:
            want[j] = 2 * cache[p * P:(p + 1) * P]
    assert torch.equal(out.view(-1, P, D), want)


# ---- 6. the cost analysis: bytes by hand, and tensors not shapes -----------------------------------------------------
def test_embedding_bag_bytes_by_hand():
    """Per program (bag b, column tile j): two i64 offsets, and per index its i64 read and a row tile of W masked to
    Dm (nothing for an index outside W); the output tile written (bf16)."""
    V, Dm, BD = 10, 40, 16
    w = torch.zeros(V, Dm, dtype=BF)
    idx = torch.tensor([1, 2, 3, -1, 10, 4, 4], dtype=I64)
    offs = torch.tensor([0, 3, 3, 5, 7], dtype=I64)
    out = torch.empty(4, Dm, dtype=BF)
    cost = embedding_bag.trace(w, idx, offs, out, 1).cost(w, idx, offs, out, 1)
    tiles = -(-Dm // BD)
    assert cost.bytes_read == tiles * (4 * 2 * 8 + 7 * 8) + 5 * Dm * 2
    assert cost.bytes_written == 4 * Dm * 2
    with pytest.raises(LaunchError, match=r"embedding_bag.cost: argument IDX is read by ts.load_scalar .*pass its "
                                          r"tensor, not the shape \(7,\)"):
        embedding_bag.trace(w, idx, offs, out, 1).cost(w, (7,), offs, out, 1)


def test_bincount_bytes_by_hand_and_a_shape_for_its_values():
    """N one-byte reads and an i32 atomic add for each value inside the histogram (a drop moves nothing); given X's
    shape instead of X, a LaunchError naming X before any work."""
    x = torch.tensor([0, 5, 300 % 256, 7, 7, 1, 2, 9, 0, 3, 200], dtype=U8)
    hist = torch.zeros(100, dtype=I32)
    cost = bincount.trace(x, hist).cost(x, hist)
    inside = int((x.long() < 100).sum())
    assert cost.bytes_read == len(x) * 1 + inside * 4          # (an atomic add reads and writes its element)
    assert cost.bytes_written == inside * 4
    with pytest.raises(LaunchError, match=r"bincount.cost: argument X is read by ts.load_scalar"):
        bincount.trace(x, hist).cost((11,), hist)


def test_the_cost_of_a_meta_or_expanded_index_tensor():
    """A meta tensor holds no values: refused by name (torch's "Cannot copy out of meta tensor" named nothing). An
    index tensor expanded to 2**33 elements (stride 0) is read where the kernel reads it, not copied out whole (64 GiB
    as int64)."""
    w, out = torch.zeros(10, 40, dtype=BF), torch.empty(2, 40, dtype=BF)
    offs = torch.tensor([0, 2, 5], dtype=I64)
    idx = torch.tensor([3], dtype=I64).expand(2**33)
    t = embedding_bag.trace(w, idx, offs, out, 0)
    cost = t.cost(w, idx, offs, out, 0)
    assert cost.bytes_read == 3 * (2 * 2 * 8 + 5 * 8) + 5 * 40 * 2
    with pytest.raises(LaunchError, match=r"embedding_bag.cost: argument OFFS is read by ts.load_scalar .*not a meta "
                                          r"tensor \(shape \(3,\)\)"):
        t.cost(w, idx, offs.to("meta"), out, 0)
