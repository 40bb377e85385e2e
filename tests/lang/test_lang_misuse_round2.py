"""Tile-language misuse, round 2: kernels written the way a new user writes them, with a mistake each, on the reference
executor and Triton's interpreter. Each mistake must give a tilestack error (TraceError, LaunchError, ...) naming the
kernel or the author's line (``test_lang_misuse_round2.py:NN``, found by the ``# E:tag`` comment on that line), the
argument or tile, what was given and what was expected, before any work: the output, poisoned (NaN) first, stays
poisoned. Earlier rounds: tests/test_bad_inputs_round12_lang.py, tests/lang/test_errors.py. More in
test_lang_misuse_round2_more.py.

What this round found (fixed in src/tilestack/lang/kernel.py, each kept as its test):
- a kernel that returned a value (``return t``, ``return 5``) had it dropped silently: a user who returned the result
  tile instead of storing it got an output never written, and no error; now a TraceError naming the kernel;
- a helper that recursed without end gave Python's bare RecursionError, naming neither kernel nor line; now a
  TraceError naming the kernel;
- a helper that raised a plain Python error (a ValueError of the user's) surfaced with no word of which kernel was
  traced; the error keeps its type and gets a note naming the kernel, the raising line and the kernel line calling it;
- (src/tilestack/backends/triton/codegen.py, gluon/emitter.py, python_dsl.py) a constant tile coordinate whose
  product with the tile size passes int32 (at=(R, 0), R=2**27) failed deep inside Triton's interpreter, for loads
  ("Scalar 2147483648 is out of range for type int32") and stores ("Block pointers only support 32 bit offsets"), and
  was a CompilationError through Gluon; now 64-bit (loads) or saturated into int32 (copy-engine stores): zeros read,
  nothing written, as on the reference executor.
Fixed in session 30 (was a strict xfail): a coordinate from a runtime int argument whose product with the tile size
passes int32 wrapped on Triton and read rows inside the tensor; it is scaled in 64 bits now (ir.scalars.arg_bounds).
"""

from __future__ import annotations

import misuse_support
import pytest
import torch
from heldout_support import BACKENDS, launch
from misuse_support import nan, untouched

import tilestack.lang as ts
from tilestack.errors import BackendError, LaunchError, TileShapeError, TraceError


def line_of(tag: str) -> str:
    return misuse_support.line_of(__file__, tag)


def raises_at(exc, tag: str, *fragments: str):
    return misuse_support.raises_at(__file__, exc, tag, *fragments)


def x32(rows=32, cols=32) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(2))


# ---- mma --------------------------------------------------------------------------------------------------------
@ts.kernel(grid=(1,))
def mma_inner_mismatch(A, B, C, *, BM: int = 16, BN: int = 16, BK: int = 16):
    acc = ts.RegTile[ts.f32, BM, BN]()
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, 2 * BK, BN]()
    ts.zero(acc)
    ts.load(a, A, at=(0, 0))
    ts.load(b, B, at=(0, 0))
    ts.mma_AB(acc, a, b, acc)  # E:mma_inner
    ts.store(C, acc, at=(0, 0))


@ts.kernel(grid=(1,))
def mma_acc_mismatch(A, B, C, *, BM: int = 16, BN: int = 16, BK: int = 16):
    acc = ts.RegTile[ts.f32, BM, 2 * BN]()
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    ts.zero(acc)
    ts.load(a, A, at=(0, 0))
    ts.load(b, B, at=(0, 0))
    ts.mma_AB(acc, a, b, acc)  # E:mma_acc
    ts.store(C, acc, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mma_with_inner_dimensions_that_differ_is_refused_naming_both_tiles(backend):
    c = nan(16, 16)
    with raises_at(TileShapeError, "mma_inner", "mma_AB: inner dimensions differ", "(16, 16)", "(32, 16)"):
        launch(mma_inner_mismatch, backend, x32(), x32(), c)
    assert untouched(c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mma_into_an_accumulator_of_the_wrong_shape_is_refused(backend):
    c = nan(16, 32)
    with raises_at(TileShapeError, "mma_acc", "acc `acc` is (16, 32); expected (16, 16)"):
        launch(mma_acc_mismatch, backend, x32(), x32(), c)
    assert untouched(c)


@ts.kernel(grid=(1,))
def mma_any(A, B, C, *, BM: int = 16, BN: int = 16, BK: int = 16):
    acc = ts.RegTile[ts.f32, BM, BN]()
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    ts.zero(acc)
    ts.load(a, A, at=(0, 0))  # E:mma_any_load
    ts.load(b, B, at=(0, 0))
    ts.mma_AB(acc, a, b, acc)
    ts.store(C, acc, at=(0, 0))


def test_a_tile_size_no_power_of_two_is_refused_by_triton_and_computed_right_by_the_reference():
    """BK=12: the language takes it (the reference executor computes it, checked against float64 torch); Triton's
    legalizer refuses it by name before any work, with the author's line (a backend's hard rule, docs/autotuning.md)."""
    a, b = x32(), x32()
    c = nan(16, 16)
    with raises_at(BackendError, "mma_any_load", "power-of-two tile sizes", "SharedTile[f32, 16, 12]"):
        launch(mma_any, "triton", a, b, c, BK=12)
    assert untouched(c)
    launch(mma_any, "reference", a, b, c, BK=12)
    want = a[:16, :12].double() @ b[:12, :16].double()
    torch.testing.assert_close(c.double(), want, rtol=1e-5, atol=1e-5)


# ---- loads and stores -------------------------------------------------------------------------------------------
@ts.kernel(grid=(1,))
def load_three_coords(X, Y, *, BM: int = 16):
    t = ts.RegTile[ts.f32, BM, 16]()
    ts.load(t, X, at=(0, 0, 0))  # E:load3
    ts.store(Y, t, at=(0, 0))


@ts.kernel(grid=(1,))
def store_three_coords(X, Y, *, BM: int = 16):
    t = ts.RegTile[ts.f32, BM, 16]()
    ts.load(t, X, at=(0, 0))
    ts.store(Y, t, at=(0, 0, 0))  # E:store3


@ts.kernel(grid=(1,))
def store_tile_into_vector(X, Y, *, BM: int = 16):
    t = ts.RegTile[ts.f32, BM, 16]()
    ts.load(t, X, at=(0, 0))
    ts.store(Y, t, at=(0,))  # E:store_rank1


@ts.kernel(grid=(1,))
def store_arguments_swapped(X, Y, *, BM: int = 16):
    t = ts.RegTile[ts.f32, BM, 16]()
    ts.load(t, X, at=(0, 0))
    ts.store(t, Y, at=(0, 0))  # E:swapped


@ts.kernel(grid=(1,))
def load_at_a_float(X, Y, *, BM: int = 16):
    t = ts.RegTile[ts.f32, BM, 16]()
    ts.load(t, X, at=(0.5, 0))  # E:at_float
    ts.store(Y, t, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kern, ydims, tag, exc, fragments", [
    (load_three_coords, (32, 32), "load3", TraceError, ("load: at=(0, 0, 0) has 3 coordinates", "`X` has rank 2")),
    (store_three_coords, (32, 32), "store3", TraceError, ("store: at=(0, 0, 0) has 3 coordinates", "`Y` has rank 2")),
    (store_tile_into_vector, (32,), "store_rank1", TileShapeError, ("RegTile[f32, 16, 16] does not fit rank-1 `Y`",)),
    (store_arguments_swapped, (32, 32), "swapped", TraceError, ("store: src must be a tile", "got GlobalTensor Y")),
    (load_at_a_float, (32, 32), "at_float", TraceError, ("at[0] must be an index", "got float 0.5")),
], ids=["load-3-coords", "store-3-coords", "store-2d-into-1d", "store-swapped", "load-at-float"])
def test_loads_and_stores_past_a_globals_rank_or_of_the_wrong_kind_are_refused(backend, kern, ydims, tag, exc,
                                                                                fragments):
    y = nan(*ydims)
    with raises_at(exc, tag, *fragments):
        launch(kern, backend, x32(), y)
    assert untouched(y)


@ts.kernel(grid=(1,))
def load_far_rows(X, Y, *, BM: int = 16, R: int = 2**24):
    t = ts.RegTile[ts.f32, BM, 16]()
    ts.load(t, X, at=(R, 0))
    ts.store(Y, t, at=(0, 0))


@ts.kernel(grid=(1,))
def store_far_rows(X, Y, *, BM: int = 16, R: int = 2**24, ATOMIC: bool = False):
    t = ts.RegTile[ts.f32, BM, 16]()
    ts.load(t, X, at=(0, 0))
    if ATOMIC:
        ts.atomic_add(Y, t, at=(R, 0))
    else:
        ts.store(Y, t, at=(R, 0))


@ts.kernel(grid=(1,))
def load_rows_given_at_launch(X, Y, r: int, *, BM: int = 16):
    t = ts.RegTile[ts.f32, BM, 16]()
    ts.load(t, X, at=(r, 0))
    ts.store(Y, t, at=(0, 0))


def counting(rows=32) -> torch.Tensor:
    return torch.arange(rows * 16, dtype=torch.float32).reshape(rows, 16) + 1     # no zero anywhere


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("r", [2**24, 2**27, 2**31, 2**32, -2**32])
def test_a_constant_tile_row_past_int32_loads_out_of_bounds_zeros(backend, r):
    """Tile row R of a (32, 16) tensor: R * 16 (the first element row) past int32 for R >= 2**27, and the element
    offset past it from 2**24 on (2**24 * 16 * 16 = 2**32, which an int32 offset wraps to 0: row 0's data). The load
    is outside the tensor, so masked: zeros, as any tile past the edge. Fixed: from R=2**27 Triton's interpreter
    failed deep inside Triton ("Scalar 2147483648 is out of range for type int32")."""
    y = nan(16, 16)
    launch(load_far_rows, backend, counting(), y, R=r)
    assert torch.equal(y, torch.zeros(16, 16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("atomic", [False, True], ids=["store", "atomic_add"])
@pytest.mark.parametrize("r", [2**27, 2**32, -2**32])
def test_a_constant_tile_row_past_int32_stores_nothing(backend, atomic, r):
    """Fixed: the store's copy-engine coordinate R * 16 failed deep inside Triton's interpreter ("Block pointers
    only support 32 bit offsets"); saturated into int32 it stays past the tensor, and nothing is written."""
    y = nan(32, 16)
    launch(store_far_rows, backend, counting(), y, R=r, ATOMIC=atomic)
    assert untouched(y)


@pytest.mark.parametrize("backend", [
    "reference",
    "triton",
])
def test_a_runtime_tile_row_whose_product_with_the_tile_passes_int32_reads_zeros(backend):
    y = nan(16, 16)
    launch(load_rows_given_at_launch, backend, counting(), y, 2**28)
    assert torch.equal(y, torch.zeros(16, 16))


# ---- constants and tile sizes -----------------------------------------------------------------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def copy_rows(X, Y, *, BM: int = 16):
    i = ts.block_id(0)
    t = ts.RegTile[ts.f32, BM, 16]()  # E:copy_tile
    ts.load(t, X, at=(i, 0))  # E:copy_load
    ts.store(Y, t, at=(i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("consts, exc, pattern", [
    (dict(BM=32.5), LaunchError, r"copy_rows: constant BM is declared int; got float 32.5"),
    (dict(BM=16.0), LaunchError, r"copy_rows: constant BM is declared int; got float 16.0"),
    (dict(BM=True), LaunchError, r"copy_rows: constant BM is declared int; got bool True"),
    (dict(BM=torch.tensor(16)), LaunchError, r"copy_rows: constant BM is declared int; got Tensor"),
    (dict(Bm=16), LaunchError, r"copy_rows: unknown constant\(s\) \['Bm'\]; its constants are \['BM'\]"),
    (dict(BM=16, BN=16), LaunchError, r"copy_rows: unknown constant\(s\) \['BN'\]"),
], ids=["float", "float-integral", "bool", "tensor", "typo", "extra"])
def test_a_constant_of_the_wrong_type_or_name_is_refused_at_launch(backend, consts, exc, pattern):
    y = nan(32, 16)
    with pytest.raises(exc, match=pattern):
        launch(copy_rows, backend, x32(32, 16), y, **consts)
    assert untouched(y)


@ts.kernel(grid=(1,))
def copy_first(X, Y, *, BM: int = 16):
    t = ts.RegTile[ts.f32, BM, 16]()  # E:first_tile
    ts.load(t, X, at=(0, 0))
    ts.store(Y, t, at=(0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bm", [0, -16])
def test_a_tile_size_of_zero_or_below_is_refused_naming_it(backend, bm):
    y = nan(32, 16)
    with raises_at(TileShapeError, "first_tile", "RegTile sizes are positive compile-time ints", f"got {bm}"):
        launch(copy_first, backend, x32(32, 16), y, BM=bm)
    assert untouched(y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_zero_tile_size_in_the_grid_is_refused_naming_the_constant(backend):
    y = nan(32, 16)
    with pytest.raises(TraceError, match=r"`cdiv` of an index by the constant 0 \(a constant divisor must not be 0"):
        launch(copy_rows, backend, x32(32, 16), y, BM=0)
    assert untouched(y)


def test_an_enormous_tile_is_refused_by_triton_naming_its_size():
    y = nan(32, 16)
    with raises_at(BackendError, "copy_load", "RegTile[f32, 1048576, 16], 16777216 elements",
                   "at most 1048576 (2**20)"):
        launch(copy_rows, "triton", x32(32, 16), y, BM=2**20)
    assert untouched(y)


@pytest.mark.parametrize("bm", [3, 24])
def test_a_tile_of_rows_no_power_of_two_copies_right_on_the_reference_and_is_refused_by_triton(bm):
    x = x32(48, 16)
    y = nan(48, 16)
    with raises_at(BackendError, "copy_load", "power-of-two tile sizes", f"RegTile[f32, {bm}, 16]"):
        launch(copy_rows, "triton", x, y, BM=bm)
    assert untouched(y)
    launch(copy_rows, "reference", x, y, BM=bm)
    assert torch.equal(y, x)


# ---- launch arguments -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_too_few_or_too_many_arguments_are_refused_naming_the_parameters(backend):
    x, y = x32(32, 16), nan(32, 16)
    with pytest.raises(LaunchError, match=r"copy_rows takes 2 arguments \(X, Y\); got 1, missing \['Y'\]"):
        launch(copy_rows, backend, x)
    with pytest.raises(LaunchError, match=r"copy_rows takes 2 arguments \(X, Y\); got 3"):
        launch(copy_rows, backend, x, y, y.clone())
    assert untouched(y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_meta_tensor_among_cpu_tensors_is_refused_naming_each_device(backend):
    y = nan(32, 16)
    with pytest.raises(LaunchError, match=r"copy_rows: all tensors must be on one device; got X on meta, Y on cpu"):
        launch(copy_rows, backend, torch.empty(32, 16, device="meta"), y)
    assert untouched(y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_contiguous_input_is_read_through_its_strides(backend):
    """Every other column of a (32, 32) tensor: no descriptor here needs contiguity, the strides are honoured."""
    base = x32(32, 32)
    x = base[:, ::2]
    assert not x.is_contiguous()
    y = nan(32, 16)
    launch(copy_rows, backend, x, y)
    assert torch.equal(y, base[:, ::2].contiguous())


# ---- a kernel's Python ------------------------------------------------------------------------------------------
@ts.kernel(grid=(1,))
def returns_its_tile(X, Y, *, BM: int = 16):  # E:returns_tile
    t = ts.RegTile[ts.f32, BM, 16]()
    ts.load(t, X, at=(0, 0))
    return t


@ts.kernel(grid=(1,))  # E:returns_int
def returns_a_number(X, Y, *, BM: int = 16):
    t = ts.RegTile[ts.f32, BM, 16]()
    ts.load(t, X, at=(0, 0))
    ts.store(Y, t, at=(0, 0))
    return 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_kernel_returning_a_tile_is_refused_not_its_result_dropped(backend):
    """Fixed: the returned tile was dropped and Y left unwritten, silently."""
    y = nan(32, 16)
    with pytest.raises(TraceError, match=r"kernel returns_its_tile returned Tile RegTile\[f32, 16, 16\].*a kernel "
                                         r"returns nothing: write its results into an output tensor with ts.store"):
        launch(returns_its_tile, backend, x32(32, 16), y)
    assert untouched(y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_kernel_returning_a_number_is_refused_before_its_store_runs(backend):
    y = nan(32, 16)
    with raises_at(TraceError, "returns_int", "kernel returns_a_number returned int 5"):
        launch(returns_a_number, backend, x32(32, 16), y)
    assert untouched(y)


# ---- the Gluon backend's compile path -----------------------------------------------------------------------------
@pytest.mark.parametrize("kern", [load_far_rows, store_far_rows], ids=["load", "store"])
def test_a_constant_tile_row_past_int32_compiles_for_sm90a_through_gluon(kern):
    """Fixed: 134217728 * 16 multiplied as int32 literals was a CompilationError deep inside Gluon ("Scalar
    2147483648 is out of range for type int32"): the load's offsets are now 64-bit from the coordinate on, the store's
    copy-engine coordinate saturated to 2**31 - 1 (past the tensor: nothing written); both compile (meta tensors)."""
    from sm90a_compile import compile_gluon_sm90a
    args = (torch.empty(32, 16, device="meta"), torch.empty(32, 16, device="meta"))
    src = kern.trace(*args, R=2**27).source("gluon")
    assert ("2147483647" in src) == (kern is store_far_rows)
    compile_gluon_sm90a(kern, args, dict(R=2**27))
