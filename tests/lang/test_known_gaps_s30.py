"""Known gaps closed in session 30: index arithmetic from int arguments past int32, on the reference executor and
Triton's interpreter against exact integers (the Gluon backend's source and sm_90a compile checked where ptxas is
here), outputs poisoned first.

- An int argument that fits int32 is an i32 on Triton and Gluon: ``n0 + 3`` as a loop bound wrapped (no trips where
  the reference ran 3), and a tile row ``r`` times the tile size wrapped back inside the tensor (r = 2**28 rows of 16
  read row 0). ir.scalars.arg_bounds bounds the index values made from int arguments; address math whose bounds pass
  int32 is computed in 64 bits (ir.scalars.past_int32), the loops it bounds count in 64 bits, and a coordinate
  whose product with the tile may pass int32 is scaled in 64 bits (saturated into the copy engine's 32-bit range).
  Loops whose bounds fit (``ts.range(0, ts.cdiv(n, BN))``) keep their 32-bit counters.
- Gluon: a wgmma accumulation chain kept in flight across trips while the trip read its shared operand into
  registers (a cosine Gram matrix's row norms) was serialized by ptxas (C7515); it is waited in its trip now
  (backends.gluon.passes.deferrable), a plain GEMM's chain still kept in flight.
- Two outputs that are same-size views of one buffer in different dtypes (``Y`` and ``Y.view(torch.int32)``): the
  reference executor held a copy of each and wrote both back whole, so one view's stores undid the other's, where
  Triton keeps both. The GPU's answer is the one kept (the stores land in the one buffer, in program order): the
  reference holds such outputs as views of one copy of their bits (backends.reference.executor._Reinterpreted).
"""

import re

import pytest
import torch
from heldout_support import BACKENDS, launch, meta

import tilestack.lang as ts
from tilestack.backends import get_backend
from tilestack.ir.scalars import INT32_MAX, arg_bounds, past_int32

F32 = torch.float32


def poisoned(*shape) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=F32)


# ---- int arguments past int32 -----------------------------------------------------------------------------------
@ts.kernel(grid=(1,))
def rows_of_a_far_loop(X, Y, n0: int, *, BM: int = 4):
    """Y's tile k = X's tile k for the trips k = i - n0 of ts.range(n0, n0 + 3)."""
    t = ts.RegTile[ts.f32, BM, 8]()
    for i in ts.range(n0, n0 + 3):
        ts.load(t, X, at=(i - n0, 0))
        ts.store(Y, t, at=(i - n0, 0))


@ts.kernel(grid=(1,))
def store_rows_given_at_launch(X, Y, r: int, *, BM: int = 16):
    t = ts.RegTile[ts.f32, BM, 16]()
    ts.load(t, X, at=(0, 0))
    ts.store(Y, t, at=(r, 0))


@ts.kernel(grid=(1,))
def sum_tiles(X, Y, n: int, *, BN: int = 16):
    """Y = the sum of X's first cdiv(n, BN) tiles: a loop bound that fits int32 for every n."""
    acc = ts.RegVec[ts.f32, BN]()
    x = ts.RegVec[ts.f32, BN]()
    ts.zero(acc)
    for j in ts.range(0, ts.cdiv(n, BN)):
        ts.load(x, X, at=(j,))
        ts.add(acc, acc, x)
    ts.store(Y, acc, at=(0,))


@pytest.mark.parametrize("n0", [0, 2**31 - 2, 2**31 - 1, -(2**31)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loop_past_int32_counts_its_trips_and_addresses_from_its_counter(backend, n0):
    """ts.range(n0, n0 + 3) at n0 near 2**31: 3 trips whose counter minus n0 (0, 1, 2) picks the rows copied."""
    x = torch.arange(12 * 8, dtype=F32).reshape(12, 8)
    y = poisoned(12, 8)
    launch(rows_of_a_far_loop, backend, x, y, n0)
    assert torch.equal(y, x), (backend, y)


@pytest.mark.parametrize("r", [2**27, 2**28, -(2**28), 2**31 - 1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_runtime_tile_row_past_int32_stores_nothing(backend, r):
    """The store's coordinate r * 16 from an int argument: wrapped in 32 bits (2**28 * 16 = 2**32 -> row 0) it wrote
    inside the tensor; outside it, nothing is written, as on the reference."""
    x = torch.arange(16 * 16, dtype=F32).reshape(16, 16) + 1
    y = poisoned(32, 16)
    launch(store_rows_given_at_launch, backend, x, y, r)
    assert torch.isnan(y).all(), (backend, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_runtime_tile_row_inside_the_tensor_still_stores(backend):
    x = torch.arange(16 * 16, dtype=F32).reshape(16, 16) + 1
    y = poisoned(32, 16)
    launch(store_rows_given_at_launch, backend, x, y, 1)
    assert torch.equal(y[16:], x) and torch.isnan(y[:16]).all()


def test_bounds_of_values_made_from_int_arguments():
    traced = rows_of_a_far_loop.trace(meta(12, 8), meta(12, 8), 5)
    bounds = arg_bounds(traced.ir.body)
    assert (-(2**31), INT32_MAX) in bounds.values()                   # n0
    assert (-(2**31) + 3, INT32_MAX + 3) in bounds.values()           # n0 + 3: past int32, so 64-bit
    traced = sum_tiles.trace(meta(64), meta(16), 40)
    assert not past_int32(traced.ir.body)                                      # cdiv(n, 16) and its counter fit


def _source(kernel, backend, *args) -> str:
    return get_backend(backend).source(kernel.trace(*args))


@pytest.mark.parametrize("backend", ["triton", "gluon"])
def test_loop_bound_past_int32_is_64_bit_and_a_fitting_one_stays_32_bit(backend):
    """The source of both compiled backends: ``n0 + 3`` computed in 64 bits and the counter's coordinate scaled in
    64 bits; a loop to cdiv(n, BN) keeps 32-bit offsets (no cast: the common case is not slowed)."""
    ns = "tl" if backend == "triton" else "gl"
    src = _source(rows_of_a_far_loop, backend, meta(12, 8), meta(12, 8), 5)
    assert re.search(rf"= \({ns}\.cast\(n0, {ns}\.int64\) \+ 3\)", src), src
    src = _source(sum_tiles, backend, meta(64), meta(16), 40)
    assert f"{ns}.int64" not in src.split("def sum_tiles_kernel")[1].replace(".to(gl.int64)", ""), src


@pytest.mark.parametrize("case", ["far_loop", "far_store"])
def test_triton_compiles_the_64_bit_index_math_for_sm90a(case):
    """The Triton backend's sm_90a compile (the copy engine's stores included, their coordinates saturated from
    64 bits): the 64-bit loop counter and the widened coordinate compile, no spills."""
    from sm90a_compile import check_triton_sm90a
    kernel, args = {"far_loop": (rows_of_a_far_loop, (meta(12, 8), meta(12, 8), 2**31 - 2)),
                    "far_store": (store_rows_given_at_launch, (meta(16, 16), meta(32, 16), 2**28))}[case]
    check_triton_sm90a(kernel, args, {})


def test_gluon_compiles_the_far_loop_with_a_64_bit_counter():
    """sm_90a (ptxas here): the loop's induction variable is an i64 in the Gluon backend's TTGIR."""
    from tilestack.backends.gluon import aot as gaot
    try:
        gaot.tool("ptxas")
    except gaot.ToolMissing as e:
        pytest.skip(str(e))
    be = get_backend("gluon")
    k = be.aot(rows_of_a_far_loop.trace(meta(12, 8), meta(12, 8), 2**31 - 2), be.Options(num_warps=4))
    loops = [line for line in k.asm["ttgir"].splitlines() if "scf.for" in line]
    assert loops and all(line.rstrip().endswith(": i64 {") for line in loops), loops


# ---- two outputs that are views of one buffer in different dtypes ------------------------------------------------
@ts.kernel(grid=(1,))
def floats_then_ints(X, N, Y, Z, *, BS: int = 8, SAME: int = 0):
    """Y's tile 0 = X's tile 0 (floats); Z's tile 1 (SAME=0) or tile 0 (SAME=1) = N's tile 0 (ints): with
    Z = Y.view(torch.int32), the int stores land in Y's memory, after the float ones."""
    x = ts.RegVec[ts.f32, BS]()
    n = ts.RegVec[ts.i32, BS]()
    ts.load(x, X, at=(0,))
    ts.load(n, N, at=(0,))
    ts.store(Y, x, at=(0,))
    ts.store(Z, n, at=(1 - SAME,))


@ts.kernel(grid=(1,))
def ints_then_floats(X, N, Y, Z, *, BS: int = 8):
    """Z's tile 0 = N's (ints), then Y's tile 0 = X's (floats): the floats are what the memory holds last."""
    x = ts.RegVec[ts.f32, BS]()
    n = ts.RegVec[ts.i32, BS]()
    ts.load(x, X, at=(0,))
    ts.load(n, N, at=(0,))
    ts.store(Z, n, at=(0,))
    ts.store(Y, x, at=(0,))


def _floats_and_ints():
    x = torch.arange(8, dtype=F32) * 1.5 - 3.0
    n = torch.tensor([7, -1, 2**31 - 1, -(2**31), 0, 1065353216, 123456, -42], dtype=torch.int32)
    return x, n


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_outputs_viewing_one_buffer_in_two_dtypes_keep_both_stores(backend):
    """Y (f32) and Z = Y.view(torch.int32) as two outputs: the reference executor held a copy of each and wrote both
    back whole, so Z's copy put Y's first tile back as it was (NaN); Triton kept both. The stores land in the one
    buffer now, as bits (backends.reference.executor._Reinterpreted)."""
    x, n = _floats_and_ints()
    y = poisoned(16)
    launch(floats_then_ints, backend, x, n, y, y.view(torch.int32))
    assert torch.equal(y[:8], x), y
    assert torch.equal(y.view(torch.int32)[8:], n), y.view(torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stores_through_two_dtype_views_of_one_element_land_in_program_order(backend):
    x, n = _floats_and_ints()
    y = poisoned(8)
    launch(floats_then_ints, backend, x, n, y, y.view(torch.int32), SAME=1)
    assert torch.equal(y.view(torch.int32), n), y.view(torch.int32)          # the ints, stored last
    y = poisoned(8)
    launch(ints_then_floats, backend, x, n, y, y.view(torch.int32))
    assert torch.equal(y, x), y                                               # the floats, stored last


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, bits", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16),
                                         (torch.float64, torch.int64), (torch.uint8, torch.int8)])
def test_two_dtype_views_of_other_sizes(backend, dtype, bits):
    """8-, 16- and 64-bit buffers: Y of ``dtype`` and its view as ``bits``; Y's first tile is X as ``dtype``, the
    second tile N's ints as ``bits``, each converted by the store."""
    @ts.kernel(grid=(1,))
    def write_both(X, N, Y, Z, *, BS: int = 8):
        x = ts.RegVec[ts.f32, BS]()
        n = ts.RegVec[ts.i32, BS]()
        ts.load(x, X, at=(0,))
        ts.load(n, N, at=(0,))
        ts.store(Y, x, at=(0,))
        ts.store(Z, n, at=(1,))

    x = torch.arange(8, dtype=F32) * 1.25 - 2.0
    n = torch.tensor([7, -1, 300, -300, 0, 15360, 12345, -42], dtype=torch.int32)
    y = torch.full((16,), 77 if dtype is torch.uint8 else float("nan"), dtype=dtype)
    if dtype is torch.uint8:
        x = x.abs().round()
        n = n.remainder(100) - 50
    launch(write_both, backend, x, n, y, y.view(bits))
    assert torch.equal(y[:8], x.to(dtype)), y
    assert torch.equal(y.view(bits)[8:], n.to(bits)), y.view(bits)


# ---- Gluon: a wgmma chain whose trip reads its shared operand into registers -------------------------------------
@ts.kernel(grid=lambda A, C, BM: (ts.cdiv(A.shape[0], BM),))
def gram_with_row_norms(A, C, NORM, *, BM: int = 64, BK: int = 64):
    """C's diagonal tile = A's rows against themselves; NORM = the rows' squared norms, read from the product's own
    shared stage in each trip (the cosine Gram kernel's pattern)."""
    i = ts.block_id(0)
    a = ts.SharedTile[A.dtype, BM, BK]()
    ra = ts.RegTile[ts.f32, BM, BK]()
    acc = ts.RegTile[ts.f32, BM, BM]()
    n = ts.RegVec[ts.f32, BM]()
    ts.zero(acc)
    ts.zero(n)
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        ts.load(a, A, at=(i, k))
        ts.mma_ABt(acc, a, a, acc)
        ts.load(ra, a)
        ts.mul(ra, ra, ra)
        ts.row_sum(n, ra, n)
    ts.store(C, acc, at=(i, i))
    ts.store(NORM, n, at=(i,))


def test_gluon_waits_a_chain_whose_trip_reads_its_operand_into_registers():
    """Kept in flight past the register reads of its stage, the wgmma was serialized by ptxas (C7515); the chain is
    waited in its trip now (backends.gluon.passes.deferrable), and a plain GEMM's chain still stays in flight."""
    be = get_backend("gluon")
    bf = torch.bfloat16
    src = be.source(gram_with_row_norms.trace(meta(512, 256, dtype=bf), meta(512, 512), meta(512)),
                    be.Options(num_warps=4))
    assert "warpgroup_mma(" in src and "warpgroup_mma_wait(1" not in src, src

    @ts.kernel(grid=lambda A, C, BM: (ts.cdiv(A.shape[0], BM),))
    def gram(A, C, *, BM: int = 64, BK: int = 64):
        i = ts.block_id(0)
        a = ts.SharedTile[A.dtype, BM, BK]()
        acc = ts.RegTile[ts.f32, BM, BM]()
        ts.zero(acc)
        for k in ts.range(ts.cdiv(A.shape[1], BK)):
            ts.load(a, A, at=(i, k))
            ts.mma_ABt(acc, a, a, acc)
        ts.store(C, acc, at=(i, i))

    src = be.source(gram.trace(meta(512, 256, dtype=bf), meta(512, 512)), be.Options(num_warps=4))
    assert "warpgroup_mma_wait(1" in src, src


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_with_row_norms_runs(backend):
    g = torch.Generator().manual_seed(30)
    a = torch.randn(70, 90, generator=g).to(torch.bfloat16)
    c, norm = poisoned(70, 70), poisoned(70)
    launch(gram_with_row_norms, backend, a, c, norm, BM=16, BK=32)
    a64 = a.double()
    want = a64 @ a64.T
    for t in range(5):                                       # the diagonal tiles (70 rows: 4 whole, 1 ragged)
        rows = slice(16 * t, min(16 * t + 16, 70))
        torch.testing.assert_close(c[rows, rows].double(), want[rows, rows], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(norm.double(), (a64 * a64).sum(1), rtol=1e-5, atol=1e-4)
