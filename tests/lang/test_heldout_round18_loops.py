"""Round 18 of held-out kernels, last part (see test_heldout_round18.py's docstring): generalized advantage estimation
(PPO's GAE: a loop counting down from a runtime int argument, ts.range(steps - 1, -1, -1), the advantage carried
backwards and cut at episode ends; a prefix of the steps written, none when steps = 0) and a 2-D five-point Laplacian
with reflect or periodic (wrap) boundaries from a str constant (each program's halo gathered from the eight
neighbouring tiles by exact 0/1 products whose rows are the reflected or wrapped indices, tiles past the edges
reading zero and matching no index), checked against np.pad(mode=...) in float64; and every kernel of this round
generating Triton source that parses.
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, F64, I32, I64, close, launch, randn

import tilestack.lang as ts
from tilestack.errors import TraceError

FLOAT_DTYPES = [torch.float32, F16, BF]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261802)


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. generalized advantage estimation ---------------------------------------------------------------------
@ts.kernel(grid=lambda R, BE: (ts.cdiv(R.shape[1], BE),))
def gae(R, VAL, DONE, ADV, RET, gamma: float, lam: float, steps: int, *, BE: int = 32):
    """R (T, E) rewards, VAL (T + 1, E) values (row T the bootstrap), DONE (T, E) bool (the episode ended at step t).
    For t = steps - 1 down to 0 (steps <= T; later rows untouched): delta = R_t + gamma V_{t+1} (1 - d_t) - V_t,
    A_t = delta + gamma lam (1 - d_t) A_{t+1} (A_steps = 0), V_{steps} the bootstrap; ADV = A, RET = A + V. Grid:
    (environment blocks,)."""
    j = ts.block_id(0)
    adv = ts.RegVec[ts.f32, BE]()
    ts.zero(adv)
    v_next = ts.RegVec[ts.f32, BE]()
    ts.load(v_next, VAL, at=(steps, j))
    r = ts.RegVec[ts.f32, BE]()
    v = ts.RegVec[ts.f32, BE]()
    d = ts.RegVec[ts.bool_, BE]()
    live = ts.RegVec[ts.f32, BE]()
    out = ts.RegVec[ADV.dtype, BE]()
    for t in ts.range(steps - 1, -1, -1):
        ts.load(r, R, at=(t, j))
        ts.load(v, VAL, at=(t, j))
        ts.load(d, DONE, at=(t, j))
        ts.where(live, d, 0.0, 1.0)
        delta = r + v_next * live * gamma - v
        ts.mul(adv, adv, live)
        ts.mul(adv, adv, gamma * lam)
        ts.add(adv, adv, delta)
        ts.copy(out, adv)
        ts.store(ADV, out, at=(t, j))
        ts.copy(out, adv + v)
        ts.store(RET, out, at=(t, j))
        ts.copy(v_next, v)


def gae_ref(r, val, done, gamma, lam, steps):
    r, val, live = r.double(), val.double(), 1.0 - done.double()
    adv = torch.zeros_like(r)
    a = torch.zeros(r.shape[1], dtype=F64)
    for t in range(steps - 1, -1, -1):
        delta = r[t] + gamma * val[t + 1] * live[t] - val[t]
        a = delta + gamma * lam * live[t] * a
        adv[t] = a
    return adv, adv + val[:-1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, BF])
@pytest.mark.parametrize(("T", "E", "steps"), [(37, 45, 37), (20, 8, 13), (5, 1, 1), (6, 3, 0), (0, 4, 0)])
def test_gae(backend, dtype, T, E, steps, rng):
    """Against a float64 loop: episodes ending at random steps (about 1 in 8) and at step steps - 1 in environment 0
    (the bootstrap cut), a prefix of the steps (rows from steps on stay poisoned), one step, none (nothing written), no
    rows at all; gamma and lam given as a Python float and an np.float32, steps as np.int64; environments not a multiple
    of the block; the rewards a transposed view."""
    r = randn(rng, E, T, dtype=dtype).T
    val = randn(rng, T + 1, E, dtype=dtype)
    done = torch.from_numpy(rng.uniform(size=(T, E)) < 0.125)
    if steps:
        done[steps - 1, 0] = True
    adv, ret = poisoned(T, E, dtype=dtype), poisoned(T, E, dtype=dtype)
    launch(gae, backend, r, val, done, adv, ret, 0.99, np.float32(0.95), np.int64(steps))
    want_adv, want_ret = gae_ref(r, val, done, 0.99, float(np.float32(0.95)), steps)
    close(adv[:steps], want_adv[:steps], scale=4)
    close(ret[:steps], want_ret[:steps], scale=4)
    assert adv[steps:].isnan().all() and ret[steps:].isnan().all()
    if steps:
        close(adv[steps - 1, :1], (r[steps - 1, :1].double() - val[steps - 1, :1].double()), scale=4)


# ---- 2. five-point Laplacian with reflect / wrap boundaries ------------------------------------------------------
def _boundary(k, n, mode):
    """k (an i32 vector of indices, -1 to n) mapped into [0, n): reflect (-1 -> 1, n -> n - 2) or wrap (-1 -> n - 1,
    n -> 0)."""
    low = ts.RegVec[ts.bool_, k.shape[0]]()
    high = ts.RegVec[ts.bool_, k.shape[0]]()
    ts.lt(low, k, 0)
    ts.ge(high, k, n)
    if mode == "reflect":
        ts.where(k, low, -k, k)
        ts.where(k, high, (-k) + (2 * n - 2), k)
    else:
        ts.where(k, low, k + n, k)
        ts.where(k, high, k - n, k)


def _neighbour_map(sel, dst_idx, src_idx, n, mode, rows, part="all"):
    """sel (f32, 0/1) picks, for each destination index, its two neighbours (index -1 and +1, mapped at the boundary)
    among the source indices: sel[d, s] (rows) or sel[s, d] (columns) counts the neighbours of d that are s. part:
    "all", or only the neighbours "inside" [0, n), or only those mapped from below 0 ("low") or from n on ("high"): a
    wrap's source tiles may be neighbouring tiles or one another, and each neighbour must be counted once."""
    ts.zero(sel)
    hit = ts.RegTile[ts.bool_, *sel.shape]()
    one = ts.RegTile[ts.f32, *sel.shape]()
    inside = ts.RegVec[ts.bool_, dst_idx.shape[0]]()
    below_n = ts.RegVec[ts.bool_, dst_idx.shape[0]]()
    for step in (-1, 1):
        k = dst_idx + step
        ts.ge(inside, k, 0)
        ts.lt(below_n, k, n)
        if part == "low":
            ts.logical_not(inside, inside)
        elif part == "high":
            ts.logical_not(inside, below_n)
        else:
            ts.logical_and(inside, inside, below_n)
        _boundary(k, n, mode)
        if rows:
            ts.eq(hit, ts.per_row(k), ts.per_col(src_idx))
            if part != "all":
                ts.logical_and(hit, hit, ts.per_row(inside))
        else:
            ts.eq(hit, ts.per_row(src_idx), ts.per_col(k))
            if part != "all":
                ts.logical_and(hit, hit, ts.per_col(inside))
        ts.where(one, hit, 1.0, 0.0)
        ts.add(sel, sel, one)


@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[1], BM), ts.cdiv(X.shape[2], BN), X.shape[0]))
def laplace2d(X, Y, *, MODE: str = "reflect", BM: int = 16, BN: int = 16):
    """Y (B, H, W) = x[r-1, c] + x[r+1, c] + x[r, c-1] + x[r, c+1] - 4 x[r, c] with np.pad's MODE boundaries ("reflect"
    or "wrap"; H, W >= 2 for reflect, any for wrap). Grid: (row blocks, column blocks, B)."""
    if MODE not in ("reflect", "wrap"):
        raise ValueError(f"MODE={MODE!r}; expected 'reflect' or 'wrap'")
    i, j, b = ts.block_id(0), ts.block_id(1), ts.block_id(2)
    H, W = X.shape[1], X.shape[2]
    acc = ts.RegTile[ts.f32, BM, BN]()
    ts.load(acc, X, at=(b, i, j))
    ts.mul(acc, acc, -4.0)
    x = ts.SharedTile[ts.f32, BM, BN]()
    rsel = ts.RegTile[ts.f32, BM, BM]()
    csel = ts.RegTile[ts.f32, BN, BN]()
    rdst = ts.RegVec[ts.i32, BM]()
    rsrc = ts.RegVec[ts.i32, BM]()
    cdst = ts.RegVec[ts.i32, BN]()
    csrc = ts.RegVec[ts.i32, BN]()
    ts.arange(rdst, i * BM)
    ts.arange(cdst, j * BN)
    nrt, nct = ts.cdiv(H, BM), ts.cdiv(W, BN)
    # reflect finds every neighbour in the neighbouring tiles; wrap's wrapped ones are in the first tile (from n on)
    # and the last (from below 0), which may be neighbouring tiles too: each tile contributes its own part
    row_tiles = (-1, 0, 1) if MODE == "reflect" else (-1, 0, 1, "first", "last")
    for di in row_tiles:
        src = 0 if di == "first" else nrt - 1 if di == "last" else i + di
        part = "all" if MODE == "reflect" else {"first": "high", "last": "low"}.get(di, "inside")
        ts.load(x, X, at=(b, src, j))                    # tiles past the edges read 0 (and match no index)
        ts.arange(rsrc, src * BM)
        _neighbour_map(rsel, rdst, rsrc, H, MODE, rows=True, part=part)
        ts.mma_AB(acc, rsel, x, acc)
    for dj in row_tiles:
        src = 0 if dj == "first" else nct - 1 if dj == "last" else j + dj
        part = "all" if MODE == "reflect" else {"first": "high", "last": "low"}.get(dj, "inside")
        ts.load(x, X, at=(b, i, src))
        ts.arange(csrc, src * BN)
        _neighbour_map(csel, cdst, csrc, W, MODE, rows=False, part=part)
        ts.mma_AB(acc, x, csel, acc)
    y = ts.RegTile[Y.dtype, BM, BN]()
    ts.copy(y, acc)
    ts.store(Y, y, at=(b, i, j))


def laplace_ref(x, mode):
    p = np.pad(x.double().numpy(), ((0, 0), (1, 1), (1, 1)), mode=mode)
    c = p[:, 1:-1, 1:-1]
    return torch.from_numpy(p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:] - 4 * c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", ["reflect", "wrap"])
@pytest.mark.parametrize(("B", "H", "W"), [(2, 37, 21), (1, 16, 32), (1, 2, 2), (2, 17, 16), (1, 3, 49)])
def test_laplace2d(backend, dtype, mode, B, H, W, rng):
    """Against np.pad(mode='reflect' / 'wrap') and the stencil in float64: sizes not multiples of the tile (the wrap's
    neighbour in a partial last tile), exact multiples (the reflected index in the neighbouring tile), the smallest
    reflect (2 x 2: both neighbours the same element), one row past a tile (17: a last tile of one row), a wide thin
    image; the input a transposed view. A harmonic quadratic's interior is checked exactly 0 beside it."""
    x = randn(rng, B, W, H, dtype=dtype).transpose(1, 2) * 4
    y = poisoned(B, H, W, dtype=dtype)
    launch(laplace2d, backend, x, y, MODE=mode)
    close(y, laplace_ref(x, mode), scale=8)
    rr, cc = torch.meshgrid(torch.arange(H, dtype=F64), torch.arange(W, dtype=F64), indexing="ij")
    harm = (rr * rr - cc * cc)[None].float()                 # x^2 - y^2: Laplacian 0 inside
    z = poisoned(1, H, W)
    launch(laplace2d, backend, harm, z, MODE=mode)
    if H > 2 and W > 2:
        assert (z[0, 1:-1, 1:-1] == 0).all()


def test_laplace2d_refuses_an_unknown_mode():
    y = poisoned(1, 4, 4)
    with pytest.raises(ValueError, match=r"MODE='edge'; expected 'reflect' or 'wrap'"):
        launch(laplace2d, "reference", torch.zeros(1, 4, 4), y, MODE="edge")
    assert y.isnan().all()


# ---- 3. every kernel of this round generates Triton source -------------------------------------------------------
def _source_cases():
    import test_heldout_round18 as r18
    import test_heldout_round18_more as r18m
    z = lambda *s, dtype=torch.float32: torch.zeros(*s, dtype=dtype)                    # noqa: E731
    I8, U8, B1 = torch.int8, torch.uint8, torch.bool
    return {
        "rwkv4_wkv": (r18.rwkv4_wkv, (z(64), z(64), z(2, 9, 64, dtype=BF), z(2, 9, 64, dtype=BF),
                                      z(2, 9, 64, dtype=BF)), {}),
        "sgmv_lora": (r18.sgmv_lora, (z(256, 64, dtype=BF), z(5, dtype=I32), z(4, dtype=I64), z(3, dtype=I32),
                                      z(3, 64, 16, dtype=BF), z(3, 16, 64, dtype=BF), z(256, 64, dtype=BF), 0.5), {}),
        "apply_penalties": (r18.apply_penalties, (z(4, 1000), z(4, 30, dtype=I64), z(4, 20, dtype=I64), z(4), z(4),
                                                  z(4), z(4, 1000)), {}),
        "packbits": (r18.packbits, (z(64, 100, dtype=B1), z(64, 13, dtype=U8)), {}),
        "unpackbits": (r18.unpackbits, (z(64, 13, dtype=U8), z(64, 100, dtype=B1)), dict(BIG=True)),
        "segment_softmax": (r18.segment_softmax, (z(100, 8), z(9, dtype=I64), z(100, 8)), {}),
        "lu_factor": (r18.lu_factor, (z(3, 16, 16, dtype=F64), z(3, 16, 16, dtype=F64), z(3, 16, dtype=I32)), {}),
        "int8_kv_decode": (r18m.int8_kv_decode, (z(2, 2, 4, 32, dtype=BF), z(2, 2, 64, 32, dtype=I8),
                                                 z(2, 2, 64, 32, dtype=I8), z(2, 2, 64), z(2, 2, 64), z(2, dtype=I32),
                                                 z(2, 2, 4, 32, dtype=BF), 0.1), {}),
        "sigmoid_focal_loss": (r18m.sigmoid_focal_loss, (z(64, 64), z(64, 64), z(64, 64), z(1), 0.25, 2.0),
                               dict(REDUCTION="mean")),
        "bias_gelu_pos": (r18m.bias_gelu_pos, (z(2, 64, 64, dtype=BF), z(64), z(64, 64, dtype=BF),
                                               z(2, 64, 64, dtype=BF)), {}),
        "embedding_backward": (r18m.embedding_backward, (z(10, dtype=I64), z(10, 64, dtype=BF), z(5, dtype=I32),
                                                         z(5, 64)), dict(PAD=0, BY_FREQ=True)),
        "i8_gemm_exact": (r18m.i8_gemm_exact, (z(128, 256, dtype=I8), z(256, 128, dtype=I8), z(128, 128, dtype=I32)),
                          {}),
        "local_response_norm": (r18m.local_response_norm, (z(2, 64, 256, dtype=BF), z(2, 64, 256, dtype=BF), 1e-4,
                                                           0.75, 2.0), {}),
        "gae": (gae, (z(16, 64), z(17, 64), z(16, 64, dtype=B1), z(16, 64), z(16, 64), 0.99, 0.95, 16), {}),
        "laplace2d": (laplace2d, (z(2, 64, 64), z(2, 64, 64)), dict(MODE="wrap")),
    }


@pytest.mark.parametrize("name", list(_source_cases()))
def test_generates_triton_source(name):
    """The generated module parses as Python and defines the kernel, reading memory with tl.load."""
    kernel, args, consts = _source_cases()[name]
    src = kernel.trace(*args, **consts).source(backend="triton")
    compile(src, f"<triton:{name}>", "exec")
    assert f"def {name}" in src and "tl.load" in src


# ---- 4. a number or Scalar as an op's first operand ------------------------------------------------------------
@ts.kernel(grid=lambda X: (1,))
def number_first(X, Y, n: int, *, FN: str = "add", BN: int = 8):
    """Y = FN(3, X) (FN(n, X) for FN = "add_scalar"): a number (or the runtime Scalar n) as a, the tile as b."""
    x = ts.RegVec[X.dtype, BN]()
    ts.load(x, X, at=(0,))
    y = ts.RegVec[X.dtype, BN]()
    if FN == "add_scalar":
        ts.add(y, n, x)
    else:
        getattr(ts, FN)(y, 3, x)
    ts.store(Y, y, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_number_as_the_first_operand(backend):
    """`add(dst, 3, x)`, as one writes 3 + x: ops that commute take it (it was refused as "add: a must be a tile or
    vector, got int 3", the form left to find); sub, div, rem and the shifts refuse it naming the number, the tile and
    the way to write it (the operator sugar `3 - x` where there is one), before any work."""
    x = torch.tensor([1, -7, 100, 2, 0, 5, -1, 9], dtype=I32)
    want = {"add": x + 3, "mul": x * 3, "max": x.clamp(min=3), "min": x.clamp(max=3), "bit_and": x & 3,
            "bit_or": x | 3, "bit_xor": x ^ 3, "add_scalar": x + 5}
    for fn, w in want.items():
        y = poisoned(8, dtype=I32, value=-99)
        launch(number_first, backend, x, y, 5, FN=fn)
        assert torch.equal(y, w), (fn, y, w)
    xf = torch.linspace(-2, 2, 8)
    y = poisoned(8)
    launch(number_first, backend, xf, y, 5, FN="max")
    assert torch.equal(y, xf.clamp(min=3.0))
    for fn, how in (("sub", r"write `3 - x` \(operator sugar\), or broadcast it into a tile first: zero\(t\); "
                            r"add\(t, t, 3\); sub\(dst, t, x\)"),
                    ("div", r"write `3 / x` \(operator sugar\), or broadcast"),
                    ("rem", r"broadcast it into a tile first: zero\(t\); add\(t, t, 3\); rem\(dst, t, x\)"),
                    ("shl", r"broadcast it into a tile first")):
        y = poisoned(8, dtype=I32, value=-99)
        with pytest.raises(TraceError, match=rf"test_heldout_round18_loops\.py:\d+: {fn}: a is the number 3 and b the "
                                             rf"tile `x`; {fn} takes a tile as a \(a number or Scalar goes in b\): "
                                             rf"{how}"):
            launch(number_first, backend, x, y, 5, FN=fn)
        assert (y == -99).all()
