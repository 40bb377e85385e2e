"""Round 30 of held-out kernels, continued (test_heldout_round30.py has the first seven): on the reference executor and
Triton's interpreter against float64 torch or exact integers, outputs poisoned first, ragged sizes, seeds fixed.

- A Householder reflection applied to the columns of X (n, k), n wider than a tile: Y = X - (2 / v.v) v (v^T X) in
  two passes over n (v^T X and v.v as column sums, v.v broadcast down a tile's columns since a vector has no sum),
  against (I - 2 v v^T / v^T v) X in float64 and against X after a second reflection; f32 / f64.
- Conjugate gradient for batched SPD systems (n <= a tile), a runtime number of iterations carrying x, r, p and r.r
  as vectors, the dot products as row sums of a broadcast tile, a converged step (p.Ap = 0 or r.r = 0) moving
  nothing; n iterations against torch.linalg.solve, 2n (past convergence), 0 (x = 0), f32 / f64.
- One-hot encoding (F.one_hot) into i64 / i32 / u8 / bool / f32 outputs from i64 / i32 / u8 labels, classes wider
  than a tile, an ignored label (-1, or C for u8) making a row of zeros.
- Kron again with a transposed A, an expanded (stride 0) B and a C whose inner stride is not 1.
- FNV-1a again, in i32: the offset basis as its signed bits, the multiply wrapping at 32 bits as the GPU's does.
- An f64 element read by load_scalar in every use f64 work makes of a float (fill, where, max, compares, scalar
  arithmetic, a sum in a loop): each an f64, against values f32 cannot hold.
- Misuse: wrong ranks, dtypes and argument kinds given to this round's kernels, each refused before any work with a
  message naming the argument; an error's recipe that named the user's tile as its own scratch.
- This round's kernels as Triton and Gluon source, and compiled for sm_90a through both (no spills).

What this round found (both files): no kernel gave a wrong answer in f32; fixed, each kept as its test:
- reference, Triton and Gluon: `ts.load_scalar` of an f64 tensor was the f32 nearest the element wherever it went,
  in f64 work too: kron's A[i, j] B and Clenshaw's coefficients were off by 4e-8 relative in f64 (an element of
  1 + 2**-40 read as 1). An f64 element that f64 work takes is an f64 now, as an f64 kernel's float argument is
  (ir.scalars.f64_floats, backends.reference.executor._Program.load_scalar, the Triton and Gluon
  _e_load_scalar): test_heldout_round30.py::test_kron and ::test_chebval_rows (f64),
  test_an_f64_element_read_by_load_scalar_stays_f64_in_f64_work;
- language: the recipe of a refused `div(t, 1.0, t)` (a number as a) was "zero(t); add(t, t, 1.0); div(dst, t, t)",
  the user's tile `t` named as the scratch too; the scratch takes a name none of the op's tiles has now
  (lang.ops._scratch_name): test_a_recipe_names_a_scratch_tile_apart_from_the_users.
Met, not changed: a marked vector cannot be `a` of sub (per_col(x) - per_row(y), the N-body differences), and a
float cannot fill an i32 tile with the unsigned bits 2166136261 (binary ops take them): both refused with a message
that says the way.
"""

import math
import re

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F64, I32, I64, close, ints, launch, meta, randn, wrap
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a
from test_heldout_round30 import (
    FNV_PRIME,
    bilateral_rows,
    black_scholes,
    chebval_rows,
    fnv1a,
    kron,
    nbody_accel,
    triplet_loss,
)

import tilestack.lang as ts
from tilestack.errors import LaunchError, TraceError

F32, U8 = torch.float32, torch.uint8


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20263002)


def poisoned(*shape, dtype=F32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 8. a Householder reflection -----------------------------------------------------------------------------------
@ts.kernel(grid=lambda X, BK: (ts.cdiv(X.shape[1], BK),))
def householder(V, X, Y, *, BN: int = 16, BK: int = 16):
    """Y (n, k) = (I - 2 v v^T / v^T v) X for V (n,), X (n, k)."""
    c = ts.block_id(0)
    n = X.shape[0]
    W = ts.f64 if X.dtype is ts.f64 else ts.f32
    v = ts.RegVec[W, BN]()
    x, t = ts.RegTile[W, BN, BK](), ts.RegTile[W, BN, BK]()
    s, vv = ts.RegVec[W, BK](), ts.RegVec[W, BK]()
    ts.zero(s)
    ts.zero(vv)
    for i in ts.range(ts.cdiv(n, BN)):                 # s = v^T X, vv = v.v (in every column)
        ts.load(v, V, at=(i,))
        ts.load(x, X, at=(i, c))
        ts.mul(t, x, ts.per_row(v))
        ts.col_sum(s, t, s)
        ts.zero(t)
        ts.add(t, t, ts.per_row(v))
        ts.mul(t, t, t)
        ts.col_sum(vv, t, vv)
    ts.div(s, s, vv)
    ts.mul(s, s, 2.0)                                  # (BK,): 2 v^T X / v.v
    out = ts.RegTile[Y.dtype, BN, BK]()
    for i in ts.range(ts.cdiv(n, BN)):
        ts.load(v, V, at=(i,))
        ts.load(x, X, at=(i, c))
        ts.zero(t)
        ts.add(t, t, ts.per_row(v))
        ts.mul(t, t, ts.per_col(s))
        ts.sub(x, x, t)
        ts.copy(out, x)
        ts.store(Y, out, at=(i, c))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize(("n", "k", "BN"), [(37, 5, 16), (16, 17, 16), (1, 3, 16), (70, 2, 32), (5, 0, 16)])
def test_householder(backend, dtype, n, k, BN, rng):
    v, x = randn(rng, n, dtype=dtype), randn(rng, n, k, dtype=dtype)
    if n > 3:
        v[1] = 0.0
    y, back = poisoned(n, k, dtype=dtype), poisoned(n, k, dtype=dtype)
    launch(householder, backend, v, x, y, BN=BN)
    v64 = v.double()
    h = torch.eye(n, dtype=F64) - 2 * torch.outer(v64, v64) / (v64 @ v64)
    close(y, h @ x.double(), scale=10)
    launch(householder, backend, v, y, back, BN=BN)    # a reflection is its own inverse
    close(back, x.double(), scale=10)


# ---- 9. FNV-1a in wrapping i32 -------------------------------------------------------------------------------------
FNV_OFFSET_I32 = wrap(2166136261, 32)


@ts.kernel(grid=lambda BYTES_T, BR: (ts.cdiv(BYTES_T.shape[1], BR),))
def fnv1a_i32(BYTES_T, H, *, BR: int = 16):
    """H (R,) i32 = FNV-1a of each whole row of the u8 rows (BYTES_T (L, R) their transposed view), in i32."""
    b = ts.block_id(0)
    h = ts.RegVec[ts.i32, BR]()
    ts.fill(h, FNV_OFFSET_I32)
    byte = ts.RegVec[ts.u8, BR]()
    w = ts.RegVec[ts.i32, BR]()
    for j in ts.range(BYTES_T.shape[0]):
        ts.load(byte, BYTES_T, at=(j, b))
        ts.copy(w, byte)
        ts.bit_xor(h, h, w)
        ts.mul(h, h, FNV_PRIME)                         # wraps at 32 bits
    ts.store(H, h, at=(b,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("R", "L"), [(19, 9), (3, 0), (16, 33)])
def test_fnv1a_i32_against_the_i64_kernel(backend, R, L, rng):
    data = torch.from_numpy(rng.integers(0, 256, (R, L), dtype=np.uint8))
    h = torch.full((R,), -1, dtype=I32)
    launch(fnv1a_i32, backend, data.T, h)
    h64, h32 = torch.full((R,), -1, dtype=I64), torch.full((R,), -1, dtype=I32)
    launch(fnv1a, backend, data.T, torch.full((R,), L, dtype=I32), h64, h32)
    assert torch.equal(h, h32)
    if L == 0:
        assert h.tolist() == [FNV_OFFSET_I32] * R      # the empty string's hash is the offset basis


# ---- 10. conjugate gradient, a runtime number of iterations ------------------------------------------------------
@ts.kernel(grid=lambda A: (A.shape[0],))
def conjugate_gradient(A, RHS, X, iters: int, *, BN: int = 16):
    """X[b] = A[b]^-1 RHS[b] for symmetric positive definite A (B, n, n) (n <= BN) by ``iters`` CG steps from 0;
    a step whose p.Ap or r.r is 0 (converged) moves nothing."""
    b = ts.block_id(0)
    W = ts.f64 if A.dtype is ts.f64 else ts.f32
    a = ts.RegTile[W, BN, BN]()
    ts.load(a, A, at=(b, 0, 0))
    r, p, x, ap = ts.RegVec[W, BN](), ts.RegVec[W, BN](), ts.RegVec[W, BN](), ts.RegVec[W, BN]()
    ts.load(r, RHS, at=(b, 0))
    ts.copy(p, r)
    ts.zero(x)
    t = ts.RegTile[W, BN, BN]()
    e = ts.RegVec[W, BN]()

    def dot(dst, u, v):
        """dst (BN,) = u.v in every element (a vector has no sum: broadcast down a tile's rows, summed per row)."""
        ts.mul(e, u, v)
        ts.zero(t)
        ts.add(t, t, ts.per_col(e))
        ts.row_sum(dst, t)

    rs, rs_new, pap, alpha = ts.RegVec[W, BN](), ts.RegVec[W, BN](), ts.RegVec[W, BN](), ts.RegVec[W, BN]()
    zero = ts.RegVec[ts.bool_, BN]()
    dot(rs, r, r)
    for _ in ts.range(iters):
        ts.mul(t, a, ts.per_col(p))
        ts.row_sum(ap, t)                              # A p
        dot(pap, p, ap)
        ts.eq(zero, pap, 0.0)
        ts.where(pap, zero, 1.0, pap)
        ts.div(alpha, rs, pap)
        ts.where(alpha, zero, 0.0, alpha)
        ts.mul(e, p, alpha)
        ts.add(x, x, e)
        ts.mul(e, ap, alpha)
        ts.sub(r, r, e)
        dot(rs_new, r, r)
        ts.eq(zero, rs, 0.0)
        ts.where(rs, zero, 1.0, rs)
        ts.div(alpha, rs_new, rs)                      # beta
        ts.where(alpha, zero, 0.0, alpha)
        ts.mul(p, p, alpha)
        ts.add(p, p, r)
        ts.copy(rs, rs_new)
    out = ts.RegVec[X.dtype, BN]()
    ts.copy(out, x)
    ts.store(X, out, at=(b, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize(("B", "n", "iters", "BN"), [(3, 7, 7, 16), (2, 16, 16, 16), (1, 1, 3, 16), (2, 20, 40, 32),
                                                      (2, 5, 0, 16)])
def test_conjugate_gradient(backend, dtype, B, n, iters, BN, rng):
    m = randn(rng, B, n, n, dtype=F64)
    a = (m @ m.transpose(1, 2) / n + torch.eye(n, dtype=F64)).to(dtype)
    rhs = randn(rng, B, n, dtype=dtype)
    x = poisoned(B, n, dtype=dtype)
    launch(conjugate_gradient, backend, a, rhs, x, iters, BN=BN)
    want = torch.linalg.solve(a.double(), rhs.double()) if iters else torch.zeros(B, n, dtype=F64)
    close(x, want, scale=100)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64, I64, BF])
def test_kron_of_strided_views(backend, dtype, rng):
    m, n, p, q = 3, 2, 5, 7
    a = ints(rng, -9, 9, (n, m), dtype).T                       # transposed
    b = ints(rng, -9, 9, (1, q), dtype).expand(p, q)            # stride 0 down the rows
    c = torch.full((n * q, m * p), -5, dtype=dtype).T           # C's inner stride is n q
    launch(kron, backend, a, b, c.unflatten(0, (m, p)).unflatten(2, (n, q)).permute(0, 2, 1, 3))
    assert torch.equal(c.double(), torch.kron(a.double().contiguous(), b.double().contiguous()))


# ---- 11. one-hot encoding ----------------------------------------------------------------------------------------
@ts.kernel(grid=lambda LABELS, BM: (ts.cdiv(LABELS.shape[0], BM),))
def one_hot(LABELS, OUT, *, BM: int = 16, BC: int = 16):
    """OUT (M, C) = F.one_hot(LABELS (M,), C) in OUT's dtype (i64, i32, u8, bool, f32); a label outside [0, C) (an
    ignore index of -1) makes a row of zeros."""
    b = ts.block_id(0)
    lab = ts.RegVec[LABELS.dtype, BM]()
    ts.load(lab, LABELS, at=(b,))
    wide = ts.RegVec[ts.i64, BM]()
    ts.copy(wide, lab)
    cols = ts.RegVec[ts.i64, BC]()
    hit = ts.RegTile[ts.bool_, BM, BC]()
    out = ts.RegTile[OUT.dtype, BM, BC]()
    for j in ts.range(ts.cdiv(OUT.shape[1], BC)):
        ts.arange(cols, j * BC)
        ts.eq(hit, ts.per_row(wide), ts.per_col(cols))
        if OUT.dtype is ts.bool_:
            ts.copy(out, hit)
        else:
            ts.where(out, hit, 1, 0)
        ts.store(OUT, out, at=(b, j))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [I64, I32, U8, torch.bool, F32])
@pytest.mark.parametrize("label_dtype", [I64, I32, U8])
@pytest.mark.parametrize(("M", "C"), [(21, 37), (16, 1), (3, 300), (0, 4)])
def test_one_hot(backend, out_dtype, label_dtype, M, C, rng):
    labels = ints(rng, 0, C, (M,), I64)
    if M > 2:
        labels[0], labels[1] = C - 1, -1 if label_dtype is not U8 else C   # the last class; an ignored label
    labels = labels.to(label_dtype)
    out = torch.full((M, C), 7, dtype=out_dtype) if out_dtype is not torch.bool else torch.ones(M, C, dtype=torch.bool)
    launch(one_hot, backend, labels, out)
    keep = (labels.long() >= 0) & (labels.long() < C)
    want = torch.zeros(M, C, dtype=I64)
    want[keep] = torch.nn.functional.one_hot(labels.long()[keep], C)
    assert torch.equal(out, want.to(out_dtype))


# ---- f64 elements read by load_scalar ------------------------------------------------------------------------------
@ts.kernel(grid=(1,))
def f64_element_uses(A, Y, *, BN: int = 16):
    """Rows of Y (5, BN) from a = A[0] = 1 + 2**-40 and b = A[1] = 1 - 2**-45, each exact only in f64."""
    a, b = ts.load_scalar(A, 0), ts.load_scalar(A, 1)
    t = ts.RegVec[ts.f64, BN]()
    ts.fill(t, a)
    ts.sub(t, t, 1.0)
    ts.store(Y, t, at=(0, 0))                          # 2**-40
    idx = ts.RegVec[ts.i32, BN]()
    ts.arange(idx, 0)
    m = ts.RegVec[ts.bool_, BN]()
    ts.lt(m, idx, 4)
    ts.where(t, m, a, b)
    ts.sub(t, t, 1.0)
    ts.store(Y, t, at=(1, 0))                          # 2**-40 on 0..3, -2**-45 after
    ts.zero(t)
    ts.max(t, t, a * 2.0 - 2.0)
    ts.store(Y, t, at=(2, 0))                          # 2**-39: scalar arithmetic in f64 from the element
    ts.fill(t, 1.0)
    ts.lt(m, t, a)
    ts.where(t, m, 1.0, 0.0)
    ts.store(Y, t, at=(3, 0))                          # 1 < a only in f64
    ts.zero(t)
    for k in ts.range(2):
        ts.add(t, t, ts.load_scalar(A, k) - 1.0)
    ts.store(Y, t, at=(4, 0))                          # 2**-40 - 2**-45


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_f64_element_read_by_load_scalar_stays_f64_in_f64_work(backend):
    """Was the f32 nearest the element (1 + 2**-40 read as 1: rows of 0, a false compare) on every backend."""
    a = torch.tensor([1 + 2**-40, 1 - 2**-45], dtype=F64)
    y = poisoned(5, 16, dtype=F64)
    launch(f64_element_uses, backend, a, y)
    want = torch.tensor([2**-40, 2**-40, 2**-39, 1.0, 2**-40 - 2**-45], dtype=F64)[:, None].repeat(1, 16)
    want[1, 4:] = -2**-45
    assert torch.equal(y, want)


def test_an_f64_element_is_an_f64_in_the_generated_sources():
    traced = f64_element_uses.trace(meta(2, dtype=F64), meta(5, 16, dtype=F64))
    for backend, ns in (("triton", "tl"), ("gluon", "gl")):
        src = traced.source(backend)
        reads = re.findall(rf"^\s+(\w+) = {ns}\.load\(A \+ [^\n]*\)$", src, flags=re.M)
        assert len(reads) == 3, src                    # A[0], A[1], A[k]: each kept as its f64, not .to(float32)
        assert f".to({ns}.float32)" not in src, src


# ---- misuse --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_misuse_is_refused_naming_the_argument(backend):
    N, s = 5, torch.rand(8) + 1
    p, a = torch.randn(N, 3), poisoned(N, 3)
    out = poisoned(3)
    three = [torch.ones(3, 4) for _ in range(3)]
    cases = [
        (lambda: launch(nbody_accel, backend, p.T, torch.ones(N, 1), a.T, 0.1), "`MASS` has rank 2"),
        (lambda: launch(nbody_accel, backend, p.T, torch.ones(N), a.T, torch.tensor(0.1)), "argument eps"),
        (lambda: launch(black_scholes, backend, s, s, s, out, out, torch.tensor(0.1), 0.2), "argument r"),
        (lambda: launch(kron, backend, torch.ones(2, 2), torch.ones(3, 3), a), "`C4` has rank 2"),
        (lambda: launch(triplet_loss, backend, *three, out, 1.0, SWAP="yes"), "constant SWAP is declared bool"),
        (lambda: launch(triplet_loss, backend, *three, out, "1.0"), "argument margin"),
        (lambda: launch(bilateral_rows, backend, torch.ones(3, 2, 4), a, 1.0, 1.0, R=1.5), "constant R"),
        (lambda: launch(chebval_rows, backend, torch.ones(2, 4), torch.ones(3), a), "argument C has rank 1"),
        (lambda: launch(chebval_rows, backend, torch.ones(2, 4, dtype=torch.complex64), torch.ones(2, 3), a),
         "argument X has dtype torch.complex64"),
        (lambda: launch(fnv1a, backend, torch.zeros(4, 3, dtype=U8).T, torch.ones(3, dtype=I32),
                        torch.zeros(3, dtype=torch.int16), torch.zeros(3, dtype=I32)), "argument H64"),
    ]
    for call, fragment in cases:
        with pytest.raises((TraceError, LaunchError), match=re.escape(fragment)):
            call()
    assert torch.isnan(a).all() and torch.isnan(out).all()   # nothing ran


@ts.kernel(grid=(1,))
def reciprocal(X, Y, *, BN: int = 16):
    t = ts.RegVec[ts.f32, BN]()
    ts.load(t, X, at=(0,))
    ts.div(t, 1.0, t)
    ts.store(Y, t, at=(0,))


@ts.kernel(grid=(1,))
def col_minus_row(X, Y, *, BN: int = 16):
    t = ts.RegTile[ts.f32, BN, BN]()
    x = ts.RegVec[ts.f32, BN]()
    ts.load(x, X, at=(0,))
    ts.zero(t)
    ts.sub(t, ts.per_col(x), t)
    ts.store(Y, t, at=(0, 0))


def test_a_recipe_names_a_scratch_tile_apart_from_the_users():
    """Was "div(dst, t, t)" for the user's tile `t`: the recipe's scratch had the user's tile's name."""
    with pytest.raises(TraceError, match=re.escape("zero(tmp); add(tmp, tmp, 1.0); div(dst, tmp, t)")):
        launch(reciprocal, "reference", torch.ones(16), poisoned(16))
    with pytest.raises(TraceError, match=re.escape("zero(tmp); add(tmp, tmp, per_col(x)); sub(dst, tmp, t)")):
        launch(col_minus_row, "reference", torch.ones(16), poisoned(16, 16))


# ---- this round's kernels as source, and compiled for sm_90a -------------------------------------------------------
def _cases() -> dict:
    def shifted(M, N, R):
        return meta(M, N + 2 * R).as_strided((2 * R + 1, M, N), (1, N + 2 * R, 1))

    return {
        "nbody": (nbody_accel, (meta(64, 3).T, meta(64), meta(64, 3).T, 0.1), {}),
        "black_scholes": (black_scholes, (meta(64),) * 5 + (0.05, 0.2), {}),
        "bilateral": (bilateral_rows, (shifted(64, 64, 2), meta(64, 64), 1.5, 0.7), {}),
        "kron_f64": (kron, (meta(3, 4, dtype=F64), meta(16, 16, dtype=F64),
                            meta(48, 64, dtype=F64).view(3, 16, 4, 16).permute(0, 2, 1, 3)), {}),
        "triplet": (triplet_loss, (meta(64, 100),) * 3 + (meta(64), 1.0), {"SWAP": True}),
        "chebval_f64": (chebval_rows, (meta(4, 100, dtype=F64), meta(4, 8, dtype=F64), meta(4, 100, dtype=F64)), {}),
        "fnv1a": (fnv1a, (meta(64, 40, dtype=U8).T, meta(64, dtype=I32), meta(64, dtype=I64), meta(64, dtype=I32)),
                  {}),
        "householder": (householder, (meta(100), meta(100, 64), meta(100, 64)), {}),
        "fnv1a_i32": (fnv1a_i32, (meta(64, 40, dtype=U8).T, meta(64, dtype=I32)), {}),
        "conjugate_gradient": (conjugate_gradient, (meta(8, 16, 16), meta(8, 16), meta(8, 16), 16), {}),
        "one_hot_bool": (one_hot, (meta(64, dtype=U8), meta(64, 100, dtype=torch.bool)), {"BM": 64, "BC": 64}),
        "one_hot_u8": (one_hot, (meta(64, dtype=I32), meta(64, 100, dtype=U8)), {"BM": 64, "BC": 64}),
        "one_hot_f32": (one_hot, (meta(64, dtype=I64), meta(64, 100)), {"BM": 64, "BC": 64}),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_round30_sources_and_sm90a_compiles(case):
    kernel, args, consts = _cases()[case]
    traced = kernel.trace(*args, **consts)
    assert "@triton.jit" in traced.source("triton")
    assert "@gluon.jit" in traced.source("gluon")
    check_triton_sm90a(kernel, args, consts)
    compile_gluon_sm90a(kernel, args, consts)
