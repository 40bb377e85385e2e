"""Round 9 of held-out kernels, continued (see test_heldout_round9.py's docstring): torch.bool tensors as kernel
arguments. Attention under a boolean attn_mask as F.scaled_dot_product_attention takes it (True attends), the mask
(B, 1, T, S) expanded over heads (stride 0) or whole, fully masked rows 0; a padding mask read into float and integer
tiles (0 / 1) for a masked mean; masks and numbers stored into bool outputs (x != 0, NaN true, as torch's .bool()).

Bugs (gaps) these found, fixed in the compiler, each kept here as its regression test:
- launch: a torch.bool tensor was refused ("has dtype torch.bool, which tiles cannot hold") though bool_ masks are
  the language's own; bool globals are taken now (ir.types.TORCH_NAMES), loaded into masks or numbers and stored
  from either. Triton and Gluon address them through pointers only (backends.triton.passes.choose_access,
  backends.gluon.passes._choose_access: the copy engine has no 1-bit element, and Triton types a bool tensor i1,
  so a descriptor's box row was 0 bytes); Gluon refuses a shared bool tile or ring, naming it (its shared layouts
  take 8- to 64-bit elements: such a tile failed with a bare AssertionError inside Triton, backends.gluon.passes
  legalize): test_gluon_refuses_shared_bool_tiles_naming_them.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, I32, close, launch, meta, randn
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a

import tilestack.lang as ts
from tilestack.errors import BackendError

FLOAT_DTYPES = [torch.float32, F16, BF]


# ---- 1. attention under a boolean mask (True attends), operands in shared tiles ----------------------------------
@ts.kernel(grid=lambda Q, BM: (ts.cdiv(Q.shape[2], BM), Q.shape[0] * Q.shape[1]))
def bool_mask_attention(Q, K, V, MASK, O, scale: float, *, BM: int = 16, BN: int = 16, D: int = 16):
    """O[b, h] = softmax(Q K^T scale, keys where MASK[b, h, i, j]) V; MASK (B, H, T, S) torch.bool (any strides: an
    expanded (B, 1, T, S) is stride 0 along H); a query with no key attends to nothing: 0."""
    i, bh = ts.block_id(0), ts.block_id(1)
    b, h = bh // Q.shape[1], bh % Q.shape[1]
    q = ts.SharedTile[Q.dtype, BM, D]()
    k = ts.SharedTile[Q.dtype, BN, D]()
    v = ts.SharedTile[Q.dtype, BN, D]()
    ps = ts.SharedTile[Q.dtype, BM, BN]()
    s = ts.RegTile[ts.f32, BM, BN]()
    keep = ts.RegTile[ts.bool_, BM, BN]()
    acc = ts.RegTile[ts.f32, BM, D]()
    out = ts.RegTile[O.dtype, BM, D]()
    m = ts.RegVec[ts.f32, BM]()
    mn = ts.RegVec[ts.f32, BM]()
    safe = ts.RegVec[ts.f32, BM]()
    live = ts.RegVec[ts.bool_, BM]()
    alpha = ts.RegVec[ts.f32, BM]()
    l_ = ts.RegVec[ts.f32, BM]()
    ts.load(q, Q, at=(b, h, i, 0))
    ts.neg_infty(m)
    ts.zero(l_)
    ts.zero(acc)
    for j in ts.range(ts.cdiv(K.shape[2], BN)):
        ts.load(k, K, at=(b, h, j, 0))
        ts.load(v, V, at=(b, h, j, 0))
        ts.load(keep, MASK, at=(b, h, i, j))         # past the edges: False (reads 0)
        ts.zero(s)
        ts.mma_ABt(s, q, k, s)
        ts.mul(s, s, scale)
        ts.where(s, keep, s, -math.inf)
        ts.row_max(mn, s, m)
        ts.gt(live, mn, -math.inf)
        ts.where(safe, live, mn, 0.0)
        ts.sub(alpha, m, safe)
        ts.exp(alpha, alpha)
        ts.mul(l_, l_, alpha)
        ts.sub(s, s, ts.per_row(safe))
        ts.exp(s, s)
        ts.row_sum(l_, s, l_)
        ts.mul(acc, acc, ts.per_row(alpha))
        ts.copy(ps, s)
        ts.mma_AB(acc, ps, v, acc)
        ts.copy(m, mn)
    ts.gt(live, l_, 0.0)
    ts.where(l_, live, l_, 1.0)
    ts.div(acc, acc, ts.per_row(l_))
    ts.copy(out, acc)
    ts.store(O, out, at=(b, h, i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("B", "H", "T", "S"), [(2, 3, 21, 37), (1, 2, 16, 16), (1, 1, 1, 5), (2, 2, 0, 4)])
@pytest.mark.parametrize("expanded", [True, False])
def test_attention_under_a_bool_mask(backend, dtype, B, H, T, S, expanded, rng):
    """Against F.scaled_dot_product_attention in float64 with the same bool mask (its fully masked rows, NaN there,
    are 0 here): a random mask, a causal band in batch 0, a row with no key and a key no row sees."""
    D = 16
    q, k, v = (randn(rng, B, H, n, D, dtype=dtype) for n in (T, S, S))
    mask = torch.from_numpy(rng.uniform(size=(B, 1, T, S)) < 0.6)
    if T > 3 and S > 3:
        mask[0, 0] = torch.ones(T, S, dtype=torch.bool).tril()
        mask[-1, 0, 2] = False
        mask[-1, 0, :, 3] = False
    full = mask.expand(B, H, T, S) if expanded else mask.expand(B, H, T, S).clone()
    o = torch.full((B, H, T, D), math.nan, dtype=dtype)
    launch(bool_mask_attention, backend, q, k, v, full, o, D ** -0.5)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=full).nan_to_num(0.0)
    close(o, want.to(dtype), scale=4)


# ---- 2. a padding mask read into numbers; numbers and masks stored into bool outputs -------------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def masked_mean(X, PAD, MEAN, COUNT, NZ, BIG, thr: float, *, BM: int = 8, BN: int = 16):
    """MEAN[r] = mean of X[r, c] over the c where PAD[r, c] (torch.bool, read as a mask; counted read as f32 0 / 1),
    COUNT[r] (i32, PAD read as i32) their number, 0 / 0 = NaN as torch's; NZ = X != 0 as a bool (X's f32 stored
    into a torch.bool output: NaN is true), BIG = |X| > thr (a mask stored)."""
    i = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, BN]()
    pf = ts.RegTile[ts.f32, BM, BN]()
    pi = ts.RegTile[ts.i32, BM, BN]()
    big = ts.RegTile[ts.bool_, BM, BN]()
    s = ts.RegVec[ts.f32, BM]()
    n = ts.RegVec[ts.f32, BM]()
    c = ts.RegVec[ts.i32, BM]()
    ts.zero(s)
    ts.zero(n)
    ts.zero(c)
    for j in ts.range(ts.cdiv(X.shape[1], BN)):
        ts.load(x, X, at=(i, j))
        ts.load(pf, PAD, at=(i, j))
        ts.load(pi, PAD, at=(i, j))
        ts.store(NZ, x, at=(i, j))
        ts.load(big, PAD, at=(i, j))                 # the same mask as a bool_ tile
        ts.where(x, big, x, 0.0)                     # (not x * pf: a NaN under the padding would reach the sum)
        ts.row_sum(s, x, s)
        ts.row_sum(n, pf, n)
        ts.row_sum(c, pi, c)
        ts.load(x, X, at=(i, j))
        ts.abs(x, x)
        ts.gt(big, x, thr)
        ts.store(BIG, big, at=(i, j))
    ts.div(s, s, n)
    ts.store(MEAN, s, at=(i,))
    ts.store(COUNT, c, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("M", "N"), [(13, 37), (8, 16), (1, 1), (0, 5)])
def test_bool_padding_mask_and_bool_outputs(backend, dtype, M, N, rng):
    """A row with nothing kept (mean NaN, count 0), NaN under the padding (ignored) and kept (the mean NaN), zeros,
    -0.0, infinities and subnormals into the bool outputs (x != 0, as torch's .bool())."""
    x = randn(rng, M, N, dtype=dtype).round(decimals=0)             # zeros among the values
    pad = torch.from_numpy(rng.uniform(size=(M, N)) < 0.7)
    if M > 3 and N > 5:
        pad[0] = False
        x[1, 0], pad[1, 0] = math.nan, False
        x[2, 1], pad[2, 1] = math.nan, True
        x[3, :5] = torch.tensor([-0.0, math.inf, -math.inf, 1e-40 if dtype == torch.float32 else 1e-7, 0.0])
    mean, count = torch.full((M,), 5.0), torch.full((M,), -1, dtype=I32)
    nz, big = torch.zeros(M, N, dtype=torch.bool), torch.zeros(M, N, dtype=torch.bool)
    nz[:, ::2] = True
    big[:, 1::2] = True
    launch(masked_mean, backend, x, pad, mean, count, nz, big, 1.5)
    xd = x.double()
    want = torch.where(pad, xd, 0.0).sum(1) / pad.sum(1)
    close(mean, want.float())
    assert torch.equal(count, pad.sum(1).to(I32))
    assert torch.equal(nz, x.bool())
    assert torch.equal(big, xd.abs() > float(torch.tensor(1.5, dtype=torch.float32)))


# ---- 3. compiled for sm_90a: bool globals through pointers; an asynchronous load of one refused by Gluon -----------
AOT_CASES = {
    "bool_mask_attention": (bool_mask_attention, (meta(2, 16, 2048, 64, dtype=BF),) * 3
                            + (meta(2, 16, 2048, 2048, dtype=torch.bool), meta(2, 16, 2048, 64, dtype=BF), 0.125),
                            dict(BM=128, BN=64, D=64)),
    "masked_mean": (masked_mean, (meta(4096, 4096, dtype=BF), meta(4096, 4096, dtype=torch.bool), meta(4096),
                                  meta(4096, dtype=I32), meta(4096, 4096, dtype=torch.bool),
                                  meta(4096, 4096, dtype=torch.bool), 1.5), dict(BM=16, BN=128)),
}


@pytest.mark.parametrize("name", AOT_CASES)
def test_bool_globals_compile_for_sm90a_with_triton(name):
    check_triton_sm90a(*AOT_CASES[name])


@pytest.mark.parametrize("name", AOT_CASES)
def test_bool_globals_compile_for_sm90a_with_gluon(name):
    """The bool tensors through pointers (no descriptor of theirs), the others' tiles through the copy engine."""
    kernel, args, consts = AOT_CASES[name]
    compile_gluon_sm90a(kernel, args, consts)
    src = kernel.trace(*args, **consts).source("gluon")
    bools = [p.name for p, a in zip(kernel.params, args, strict=True) if getattr(a, "dtype", None) is torch.bool]
    assert bools and all(f"{b}_desc" not in src and (f"gl.load({b} +" in src or f"gl.store({b} +" in src)
                         for b in bools)
    if name == "bool_mask_attention":
        assert "Q_desc" in src and "K_desc" in src


@ts.kernel(grid=lambda M: (1,))
def staged_mask_rows(M, Y, *, BN: int = 64, STAGES: int = 2):
    """Y (16, BN) f32 = the number of true elements at each position of the (16, BN) blocks of the bool mask M, its
    blocks fed through a ring of asynchronous loads (the copy engine does not convert: bool stages)."""
    ring = ts.SharedStages[ts.bool_, STAGES, 16, BN]()
    st = ts.SharedTile[ts.bool_, 16, BN]()
    r = ts.RegTile[ts.f32, 16, BN]()
    acc = ts.RegTile[ts.f32, 16, BN]()
    ts.zero(acc)
    for j in ts.range(ts.cdiv(M.shape[0], 16)):
        ts.async_load(ring, j % STAGES, M, at=(j, 0))
        ts.wait_load(st, ring, j % STAGES)
        ts.load(r, st)
        ts.add(acc, acc, r)
    ts.store(Y, acc, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bool_mask_through_asynchronous_stages(backend, rng):
    m = torch.from_numpy(rng.uniform(size=(45, 64)) < 0.5)
    y = torch.full((16, 64), math.nan)
    launch(staged_mask_rows, backend, m, y)
    want = torch.nn.functional.pad(m.double(), (0, 0, 0, 3)).reshape(3, 16, 64).sum(0)
    assert torch.equal(y.double(), want)


@ts.kernel(grid=lambda M: (ts.cdiv(M.shape[0], 64),))
def bool_through_shared(M, Y, *, BN: int = 64):
    """Y = M as 0 / 1 floats, the mask through a shared bool tile."""
    i = ts.block_id(0)
    s = ts.SharedTile[ts.bool_, 64, BN]()
    r = ts.RegTile[ts.bool_, 64, BN]()
    f = ts.RegTile[ts.f32, 64, BN]()
    ts.load(s, M, at=(i, 0))
    ts.load(r, s)
    ts.where(f, r, 1.0, 0.0)
    ts.store(Y, f, at=(i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bool_mask_through_a_shared_tile(backend, rng):
    m = torch.from_numpy(rng.uniform(size=(100, 64)) < 0.5)
    y = torch.full((100, 64), math.nan)
    launch(bool_through_shared, backend, m, y)
    assert torch.equal(y, m.float())


@pytest.mark.parametrize(("kernel", "args"), [
    (staged_mask_rows, (meta(4096, 64, dtype=torch.bool), meta(16, 64))),
    (bool_through_shared, (meta(4096, 64, dtype=torch.bool), meta(4096, 64)))], ids=["stages", "shared tile"])
def test_gluon_refuses_shared_bool_tiles_naming_them(kernel, args):
    """Gluon's shared layouts take 8- to 64-bit elements: a shared bool tile or ring failed inside Triton (an
    AssertionError from NVMMASharedLayout); refused with the op and the tile (the Triton backend runs both)."""
    with pytest.raises(BackendError, match=r"test_heldout_round9_masks\.py:\d+: the gluon backend keeps bool_ masks "
                                           r"in registers; \w+ uses a Shared\w+\[bool, "):
        compile_gluon_sm90a(kernel, args, {})
