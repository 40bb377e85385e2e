"""Every error path of the tile language.

Trace-time errors must name the kernel author's own ``file:line`` (this file, the line of the offending op,
found by the marker comment at its end) and the argument, what was given and what was expected. Launch-time
errors must come before any work: the outputs, poisoned with NaN, are untouched.
"""

import math
import pathlib

import pytest
import torch

import tilestack.lang as ts
from tilestack import config
from tilestack.errors import (
    BackendError,
    LaunchError,
    MemorySpaceError,
    TileDTypeError,
    TileShapeError,
    TraceError,
    TunableError,
)

HERE = pathlib.Path(__file__)
F32_2D = ts.ArgSpec(ts.f32, 2)
BACKENDS = ("reference", "triton")


def line_of(marker: str) -> str:
    """``test_errors.py:N`` of the one line of this file that ends with ``# <marker>``."""
    hits = [n for n, text in enumerate(HERE.read_text().splitlines(), 1) if text.endswith(f"# {marker}")]
    assert len(hits) == 1, f"marker {marker!r} is on lines {hits}"
    return f"{HERE.name}:{hits[0]}"


def assert_names(err: pytest.ExceptionInfo, marker: str, *fragments: str) -> None:
    """The error is located at the marked line and its message holds every fragment."""
    where = line_of(marker)
    message = str(err.value)
    assert err.value.where == where, message
    assert message.startswith(f"{where}: "), message
    for f in fragments:
        assert f in message, f"{f!r} not in {message!r}"


def one_program(fn):
    return ts.kernel(fn, grid=lambda: (1,))


# ---- shapes -------------------------------------------------------------------------------------------------
def test_binary_shape_mismatch():
    @one_program
    def k(X):
        a = ts.RegTile[ts.f32, 16, 32]()
        b = ts.RegTile[ts.f32, 32, 16]()
        ts.zero(a)
        ts.zero(b)
        ts.add(a, a, b)  # E:add-shape

    with pytest.raises(TileShapeError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:add-shape", "add", "a `a` is (16, 32)", "b `b` is (32, 16)")


def test_unary_shape_mismatch():
    @one_program
    def k(X):
        x = ts.RegTile[ts.f32, 16, 16]()
        y = ts.RegTile[ts.f32, 16, 32]()
        ts.load(x, X, at=(0, 0))
        ts.exp(y, x)  # E:exp-shape

    with pytest.raises(TileShapeError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:exp-shape", "exp", "src `x` is (16, 16)", "dst `y` is (16, 32)")


def test_result_does_not_fit_dst():
    @one_program
    def k(X):
        x = ts.RegTile[ts.f32, 16, 32]()
        total = ts.RegVec[ts.f32, 32]()
        ts.load(x, X, at=(0, 0))
        ts.row_sum(total, x)  # E:reduce-dst

    with pytest.raises(TileShapeError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:reduce-dst", "row_sum", "result is (16,)", "dst `total` is (32,)")


def test_broadcast_vector_of_the_wrong_length():
    @one_program
    def k(X):
        x = ts.RegTile[ts.f32, 16, 32]()
        v = ts.RegVec[ts.f32, 32]()
        ts.zero(x)
        ts.zero(v)
        ts.mul_row(x, x, v)  # E:bcast

    with pytest.raises(TileShapeError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:bcast", "mul_row", "src `x` (16, 32) has 16 rows", "vec `v` has 32 elements")


def test_reduction_acc_of_the_wrong_shape():
    @one_program
    def k(X):
        x = ts.RegTile[ts.f32, 16, 32]()
        m = ts.RegVec[ts.f32, 16]()
        acc = ts.RegVec[ts.f32, 32]()
        ts.zero(x)
        ts.zero(acc)
        ts.row_max(m, x, acc)  # E:reduce-acc

    with pytest.raises(TileShapeError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:reduce-acc", "row_max", "acc `acc` is (32,)", "expected (16,)")


def test_tile_sizes_are_compile_time_ints():
    @one_program
    def k(X):
        ts.RegTile[ts.f32, X.shape[0], 16]()  # E:symbolic-size

    with pytest.raises(TileShapeError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:symbolic-size", "RegTile sizes are positive compile-time ints", "Scalar(")


def test_tile_type_needs_a_dtype_and_sizes():
    @one_program
    def k(X):
        ts.RegTile[16, 16]()  # E:no-dtype

    with pytest.raises(TraceError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:no-dtype", "RegTile[...] takes a dtype and 2 size(s)", "got (16, 16)")


# ---- dtypes -------------------------------------------------------------------------------------------------
def test_binary_dtype_mismatch():
    @one_program
    def k(X):
        a = ts.RegTile[ts.f32, 16, 16]()
        b = ts.RegTile[ts.bf16, 16, 16]()
        ts.zero(a)
        ts.zero(b)
        ts.mul(a, a, b)  # E:mul-dtype

    with pytest.raises(TileDTypeError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:mul-dtype", "mul", "a `a` is f32", "b `b` is bf16")


def test_math_on_an_integer_tile():
    @one_program
    def k(X):
        n = ts.RegTile[ts.i32, 16, 16]()
        y = ts.RegTile[ts.f32, 16, 16]()
        ts.zero(n)
        ts.exp(y, n)  # E:int-exp

    with pytest.raises(TileDTypeError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:int-exp", "exp", "src `n` is i32", "expected a float dtype")


def test_mma_operand_dtypes_differ():
    @one_program
    def k(X):
        a = ts.SharedTile[ts.bf16, 16, 16]()
        b = ts.SharedTile[ts.f16, 16, 16]()
        acc = ts.RegTile[ts.f32, 16, 16]()
        ts.zero(a)
        ts.zero(b)
        ts.zero(acc)
        ts.mma_AB(acc, a, b, acc)  # E:mma-dtypes

    with pytest.raises(TileDTypeError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:mma-dtypes", "mma_AB", "a `a` is bf16", "b `b` is f16", "both bf16, both f16")


def test_mma_accumulates_in_f32_only():
    @one_program
    def k(X):
        a = ts.RegTile[ts.bf16, 16, 16]()
        acc = ts.RegTile[ts.bf16, 16, 16]()
        ts.zero(a)
        ts.zero(acc)
        ts.mma_ABt(acc, a, a, acc)  # E:mma-acc-dtype

    with pytest.raises(TileDTypeError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:mma-acc-dtype", "mma_ABt", "accumulates in f32", "dst is bf16 and acc is bf16")


# ---- mma shapes -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fn", "a_shape", "b_shape", "given"), [
    ("mma_AB", (16, 32), (16, 16), "a is (16, 32) and b is (16, 16)"),
    ("mma_ABt", (16, 32), (16, 16), "a is (16, 32) and b.T is (16, 16)"),
    ("mma_AtB", (32, 16), (16, 16), "a.T is (16, 32) and b is (16, 16)"),
    ("mma_AtBt", (32, 16), (16, 16), "a.T is (16, 32) and b.T is (16, 16)"),
])
def test_mma_inner_dimensions_differ(fn, a_shape, b_shape, given):
    @one_program
    def k(X):
        a = ts.SharedTile[ts.bf16, a_shape[0], a_shape[1]]()
        b = ts.SharedTile[ts.bf16, b_shape[0], b_shape[1]]()
        acc = ts.RegTile[ts.f32, 16, 16]()
        ts.zero(a)
        ts.zero(b)
        ts.zero(acc)
        getattr(ts, fn)(acc, a, b, acc)  # E:mma-inner

    with pytest.raises(TileShapeError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:mma-inner", fn, "inner dimensions differ", given,
                 f"a `a` {a_shape}", f"b `b` {b_shape}")


def test_mma_acc_of_the_wrong_shape():
    @one_program
    def k(X):
        a = ts.SharedTile[ts.f16, 16, 32]()
        b = ts.SharedTile[ts.f16, 32, 16]()
        acc = ts.RegTile[ts.f32, 16, 32]()
        ts.zero(a)
        ts.zero(b)
        ts.zero(acc)
        ts.mma_AB(acc, a, b, acc)  # E:mma-acc-shape

    with pytest.raises(TileShapeError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:mma-acc-shape", "mma_AB", "acc `acc` is (16, 32)", "expected (16, 16)")


def test_mma_of_a_vector():
    @one_program
    def k(X):
        v = ts.RegVec[ts.f16, 16]()
        acc = ts.RegTile[ts.f32, 16, 16]()
        ts.zero(v)
        ts.zero(acc)
        ts.mma_AB(acc, v, v, acc)  # E:mma-vec

    with pytest.raises(TileShapeError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:mma-vec", "mma_AB", "a must be a tile", "RegVec[f16, 16]")


# ---- memory spaces ----------------------------------------------------------------------------------------------
def test_exp_of_a_shared_tile():
    @one_program
    def k(X):
        s = ts.SharedTile[ts.f32, 16, 16]()
        r = ts.RegTile[ts.f32, 16, 16]()
        ts.load(s, X, at=(0, 0))
        ts.exp(r, s)  # E:exp-shared

    with pytest.raises(MemorySpaceError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:exp-shared", "exp", "src `s` is a SharedTile[f32, 16, 16]", "register tiles")


def test_binary_with_a_shared_operand():
    @one_program
    def k(X):
        s = ts.SharedTile[ts.f32, 16, 16]()
        r = ts.RegTile[ts.f32, 16, 16]()
        ts.load(s, X, at=(0, 0))
        ts.zero(r)
        ts.add(r, r, s)  # E:add-shared

    with pytest.raises(MemorySpaceError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:add-shared", "add", "b `s` is a SharedTile[f32, 16, 16]")


def test_reduce_into_a_shared_vector():
    @one_program
    def k(X):
        r = ts.RegTile[ts.f32, 16, 16]()
        v = ts.SharedVec[ts.f32, 16]()
        ts.zero(r)
        ts.col_sum(v, r)  # E:reduce-shared

    with pytest.raises(MemorySpaceError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:reduce-shared", "col_sum", "dst `v` is a SharedVec[f32, 16]", "RegVec")


def test_mma_accumulator_in_shared_memory():
    @one_program
    def k(X):
        a = ts.SharedTile[ts.f16, 16, 16]()
        acc = ts.SharedTile[ts.f32, 16, 16]()
        ts.zero(a)
        ts.zero(acc)
        ts.mma_AB(acc, a, a, acc)  # E:mma-shared-acc

    with pytest.raises(MemorySpaceError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:mma-shared-acc", "mma_AB", "dst `acc` is a SharedTile[f32, 16, 16]", "RegTile")


def test_tile_to_tile_load_goes_shared_to_registers():
    @one_program
    def k(X):
        r = ts.RegTile[ts.f32, 16, 16]()
        s = ts.SharedTile[ts.f32, 16, 16]()
        ts.zero(r)
        ts.load(s, r)  # E:load-reg-to-shared

    with pytest.raises(MemorySpaceError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:load-reg-to-shared", "shared -> register",
                 "got RegTile[f32, 16, 16] -> SharedTile[f32, 16, 16]")


# ---- loops -------------------------------------------------------------------------------------------------------
def test_loop_carried_tile_changes_shape():
    @one_program
    def k(X):
        acc = ts.RegTile[ts.f32, 16, 16]()
        wide = ts.RegTile[ts.f32, 16, 32]()
        ts.zero(acc)
        for j in ts.range(4):  # E:carried-loop
            ts.load(wide, X, at=(0, j))
            ts.add(acc, wide, wide)  # E:carried-write

    with pytest.raises(TileShapeError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:carried-write", "add: loop-carried tile `acc` is (16, 16)",
                 f"when the loop at {line_of('E:carried-loop')} starts", "(16, 32)")


def test_tile_made_inside_a_loop_is_used_after_it():
    @one_program
    def k(X):
        for j in ts.range(4):
            t = ts.RegTile[ts.f32, 16, 16]()
            ts.load(t, X, at=(0, j))  # E:made-in-loop
        ts.store(X, t, at=(0, 0))  # E:used-after-loop

    with pytest.raises(TraceError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:used-after-loop", "store", f"made inside the loop at {line_of('E:made-in-loop')}",
                 "used after the loop ended", "declare it before the loop")


def test_a_loop_left_early():
    @one_program
    def k(X):
        for _ in ts.range(4):  # E:break
            break

    with pytest.raises(TraceError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:break", "left early")


def test_python_if_on_a_runtime_index():
    @one_program
    def k(X):
        i = ts.block_id(0)
        if i:  # E:python-if
            pass

    with pytest.raises(TraceError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:python-if", "Python `if`/`while` cannot branch on it")


def test_tile_read_before_it_is_written():
    @one_program
    def k(X):
        acc = ts.RegTile[ts.f32, 16, 16]()
        ts.store(X, acc, at=(0, 0))  # E:unwritten

    with pytest.raises(TraceError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:unwritten", "store", "acc (RegTile[f32, 16, 16]) is read before anything wrote it")


# ---- globals, grid and op use ------------------------------------------------------------------------------------
def test_load_with_the_wrong_number_of_coordinates():
    @one_program
    def k(X):
        t = ts.RegTile[ts.f32, 16, 16]()
        ts.load(t, X, at=(0,))  # E:coords

    with pytest.raises(TraceError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:coords", "load", "at=(0,) has 1 coordinates", "`X` has rank 2")


def test_store_into_a_tile():
    @one_program
    def k(X):
        t = ts.RegTile[ts.f32, 16, 16]()
        ts.zero(t)
        ts.store(t, t, at=(0, 0))  # E:store-tile

    with pytest.raises(TraceError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:store-tile", "store: dst must be a global tensor argument", "RegTile[f32, 16, 16]")


def test_block_id_axis_out_of_range():
    @one_program
    def k(X):
        ts.block_id(3)  # E:axis

    with pytest.raises(TraceError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:axis", "block_id: axis must be 0, 1 or 2, got 3")


def test_tile_op_outside_a_kernel():
    with pytest.raises(TraceError) as err:
        ts.RegTile[ts.f32, 16, 16]()  # E:outside
    assert_names(err, "E:outside", "inside a @ts.kernel function")


# ---- tunables -----------------------------------------------------------------------------------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def tuned(X, *, BM: int = ts.tunable(32, (16, 32))):
    t = ts.RegTile[ts.f32, BM, 16]()
    ts.zero(t)
    ts.store(X, t, at=(ts.block_id(0), 0))


def test_tunable_outside_its_domain():
    with pytest.raises(TunableError) as err:
        tuned.trace(F32_2D, BM=48)  # E:tunable
    assert_names(err, "E:tunable", "tuned: tunable BM=48 is outside its domain (16, 32)")


def test_tunable_default_outside_its_domain():
    with pytest.raises(TunableError) as err:
        ts.tunable(48, (16, 32))  # E:tunable-default
    assert_names(err, "E:tunable-default", "default 48 is not in its domain (16, 32)")


def test_unknown_and_missing_constants():
    with pytest.raises(LaunchError, match=r"unknown constant\(s\) \['BN'\]; its constants are \['BM'\]"):
        tuned.trace(F32_2D, BN=16)

    @ts.kernel(grid=lambda: (1,))
    def needs_b(X, *, B: int):
        pass

    with pytest.raises(LaunchError, match="constant B= is required"):
        needs_b.trace(F32_2D)


# ---- Triton backend limits, named at the user's line --------------------------------------------------------------
def test_triton_needs_power_of_two_tiles():
    @one_program
    def k(X):
        t = ts.RegTile[ts.f32, 24, 16]()
        ts.load(t, X, at=(0, 0))  # E:pow2
        ts.store(X, t, at=(0, 0))

    with pytest.raises(BackendError) as err:
        k.trace(F32_2D).source()
    assert str(err.value).startswith(f"{line_of('E:pow2')}: ")
    assert "power-of-two tile sizes" in str(err.value) and "RegTile[f32, 24, 16]" in str(err.value)


def test_triton_mma_under_16_is_a_broadcast_sum_not_refused():
    """tl.dot takes no dimension under 16; such a product is summed from its f32 products (round 8's
    test_small_products_on_triton checks the values)."""
    @one_program
    def k(X):
        a = ts.RegTile[ts.f16, 8, 16]()
        acc = ts.RegTile[ts.f32, 8, 8]()
        ts.zero(a)
        ts.zero(acc)
        ts.mma_ABt(acc, a, a, acc)
        ts.store(X, acc, at=(0, 0))

    src = k.trace(F32_2D).source()
    assert "tl.dot" not in src and "tl.sum(" in src and "[:, None, :] * tl.trans(" in src   # (the last axis: 7a5c739)


# ---- launch: before any work ----------------------------------------------------------------------------------------
@ts.kernel(grid=lambda C, B: (ts.cdiv(C.shape[0], B), ts.cdiv(C.shape[1], B)))
def scale(A, C, s: float, *, B: int = 16):
    i, j = ts.block_id(0), ts.block_id(1)
    a = ts.RegTile[ts.f32, B, B]()
    c = ts.RegTile[C.dtype, B, B]()
    ts.load(a, A, at=(i, j))
    ts.mul(a, a, s)
    ts.copy(c, a)
    ts.store(C, c, at=(i, j))


def nan_tensor(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.full(shape, math.nan, dtype=dtype, device=device)


def assert_untouched(t: torch.Tensor) -> None:
    assert torch.isnan(t).all(), "the launch did work before its error"


@pytest.fixture
def traced():
    return scale.trace(torch.ones(20, 20), nan_tensor(20, 20), 2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_number_of_arguments(backend, traced):
    c = nan_tensor(20, 20)
    with pytest.raises(LaunchError, match=r"scale takes 3 arguments \(A, C, s\); got 2"):
        traced.run(torch.ones(20, 20), c, backend=backend)
    with pytest.raises(LaunchError, match=r"scale takes 3 arguments \(A, C, s\); got 4"):
        scale(torch.ones(20, 20), c, 2.0, 3.0, backend=backend)
    assert_untouched(c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_list_instead_of_a_tensor(backend, traced):
    c = nan_tensor(20, 20)
    with pytest.raises(LaunchError, match="argument A must be a torch.Tensor, got list"):
        traced.run([[1.0] * 20] * 20, c, 2.0, backend=backend)
    with pytest.raises(LaunchError, match=r"argument A must be a torch.Tensor \(or ArgSpec to trace\), got list"):
        scale([[1.0] * 20] * 20, c, 2.0, backend=backend)
    assert_untouched(c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tensor_for_a_runtime_scalar(backend, traced):
    c = nan_tensor(20, 20)
    with pytest.raises(LaunchError, match="argument s is a runtime float; got Tensor"):
        traced.run(torch.ones(20, 20), c, torch.tensor(2.0), backend=backend)
    assert_untouched(c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensors_on_two_devices(backend, traced):
    c = nan_tensor(20, 20)
    with pytest.raises(LaunchError, match="all tensors must be on one device; got A on meta, C on cpu"):
        traced.run(torch.ones(20, 20, device="meta"), c, 2.0, backend=backend)
    assert_untouched(c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtype_other_than_traced(backend, traced):
    c = nan_tensor(20, 20, dtype=torch.float16)
    with pytest.raises(LaunchError, match="argument C is torch.float16; this trace of scale is for f32"):
        traced.run(torch.ones(20, 20), c, 2.0, backend=backend)
    assert_untouched(c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_other_than_traced(backend, traced):
    c = nan_tensor(20, 20)
    with pytest.raises(LaunchError, match=r"argument A has rank 3 \(shape \(1, 20, 20\)\); this trace is for rank 2"):
        traced.run(torch.ones(1, 20, 20), c, 2.0, backend=backend)
    assert_untouched(c)


def test_dtype_tiles_cannot_hold():
    with pytest.raises(LaunchError, match="argument A has dtype torch.int16, which tiles cannot hold"):
        scale.trace(torch.ones(20, 20, dtype=torch.int16), nan_tensor(20, 20), 2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_with_overlapping_elements(backend, traced):
    c = nan_tensor(1, 20).expand(20, 20)
    with pytest.raises(LaunchError, match=r"output C has shape \(20, 20\) and strides \(0, 1\): stride 0 on axis 0"):
        traced.run(torch.ones(20, 20), c, 2.0, backend=backend)
    assert_untouched(c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(20, 20), (1, 37), (33, 17)])
def test_ragged_sizes_are_not_rejected(backend, shape):
    a = torch.randn(shape)
    c = nan_tensor(*shape)
    with config.override(triton_interpret=True):   # CPU tensors: Triton's interpreter, GPU or not
        scale(a, c, -1.5, backend=backend)
    torch.testing.assert_close(c, a * -1.5)


# ---- index scalars, runtime scalars, grids and ranks (issue 9, item 6) -----------------------------------------------
@ts.kernel(grid=lambda Y: (1,))
def scalar_division(X, Y, n: int, *, HOW: str):
    """Y[:16] = a float made from index scalars (X's width N and the runtime int n) in one of several ways."""
    y = ts.RegVec[ts.f32, 16]()
    N = X.shape[1]
    value = {"N/4": lambda: N / 4, "1.0/N": lambda: 1.0 / N, "n/N": lambda: n / N, "-N//n": lambda: -N // n,
             "7%N": lambda: 7 % N, "N/n": lambda: N / n, "-N%n": lambda: -N % n,
             "cdiv(-N,n)": lambda: ts.cdiv(-N, n)}[HOW]()
    ts.zero(y)
    ts.add(y, y, value)
    ts.store(Y, y, at=(0,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:divide by zero")
@pytest.mark.parametrize(("how", "want"), [("N/4", 2.5), ("1.0/N", 0.1), ("n/N", 0.3), ("-N//n", -4.0),
                                           ("7%N", 7.0), ("N/n", float("inf")), ("-N%n", 2.0),
                                           ("cdiv(-N,n)", -3.0)])
def test_index_scalars_divide_as_python_does(backend, how, want):
    x, y = torch.zeros(3, 10), nan_tensor(16)
    n = 0 if how == "N/n" else 3
    with config.override(triton_interpret=True):
        scalar_division(x, y, n, HOW=how, backend=backend)
    torch.testing.assert_close(y, torch.full((16,), want))


def test_a_float_tile_coordinate():
    @one_program
    def k(X):
        x = ts.RegTile[ts.f32, 16, 16]()
        ts.load(x, X, at=(X.shape[0] / 16, 0))  # E:float-at

    with pytest.raises(TraceError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:float-at", "load: at[0] must be an index, got a float scalar", "divide with //")


def test_a_float_loop_bound():
    @one_program
    def k(X):
        for _ in ts.range(X.shape[0] * 0.5):  # E:float-range
            pass

    with pytest.raises(TraceError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:float-range", "range: an operand must be an index, got a float scalar")


def test_floor_division_of_a_float_scalar():
    @ts.kernel(grid=lambda: (1,))
    def k(X, s: float):
        _ = s // 2  # E:float-floordiv

    with pytest.raises(TraceError) as err:
        k.trace(F32_2D, 1.0)
    assert_names(err, "E:float-floordiv", "`//` is for index scalars; got float // index")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float_for_an_int_scalar(backend):
    y = nan_tensor(16)
    with pytest.raises(LaunchError, match=r"scalar_division: argument n is a runtime int; got float 2.0"):
        scalar_division(torch.zeros(3, 10), y, 2.0, HOW="n/N", backend=backend)
    assert_untouched(y)


def test_grid_parameter_that_names_nothing():
    @ts.kernel(grid=lambda Out, BM: (ts.cdiv(Out.shape[0], BM),))  # E:grid-names
    def k(X, Y, *, BM: int = 16):
        pass

    with pytest.raises(TraceError) as err:
        k.trace(F32_2D, F32_2D)
    assert_names(err, "E:grid-names", "grid: parameter(s) Out name no argument or constant",
                  "the grid may take any of X, Y, BM")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tensor_of_lower_rank_on_first_launch(backend):
    @ts.kernel(grid=lambda X: (ts.cdiv(X.shape[0], 16),))
    def rowsum(X, Y):
        x = ts.RegTile[ts.f32, 16, 16]()
        s = ts.RegVec[ts.f32, 16]()
        ts.zero(s)
        for j in ts.range(ts.cdiv(X.shape[1], 16)):  # E:rank-axis
            ts.load(x, X, at=(ts.block_id(0), j))
            ts.row_sum(s, x, s)
        ts.store(Y, s, at=(ts.block_id(0),))

    y = nan_tensor(20)
    with pytest.raises(LaunchError) as err:
        rowsum(torch.ones(20), y, backend=backend)
    assert isinstance(err.value, TraceError)
    assert_names(err, "E:rank-axis", "X.shape[1]: argument X has rank 1 (axes 0 to 0), so it has no axis 1")
    assert_untouched(y)
    rowsum.trace(ts.ArgSpec(ts.f32, 2), ts.ArgSpec(ts.f32, 1))   # the rank it reads traces
    with pytest.raises(LaunchError, match=r"X.shape\[-2\]: argument X has rank 1"):
        ts.kernel(lambda X: ts.cdiv(X.shape[-2], 4), grid=lambda: (1,)).trace(ts.ArgSpec(ts.f32, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tile_sugar_with_index_scalars(backend, rng):
    @ts.kernel(grid=lambda: (1,))
    def k(X, Y):
        x = ts.RegTile[ts.f32, 16, 16]()
        ts.load(x, X, at=(0, 0))
        N = X.shape[1]
        y = (N / x) + (2 * N * x) - (N - x) + x / N     # a Scalar on either side of a tile
        ts.store(Y, y, at=(0, 0))

    x = torch.from_numpy(rng.uniform(0.5, 2.0, (16, 16)).astype("float32"))
    y = nan_tensor(16, 16)
    with config.override(triton_interpret=True):
        k(x, y, backend=backend)
    torch.testing.assert_close(y, 16 / x + 32 * x - (16 - x) + x / 16)


def test_python_comparison_of_a_runtime_index():
    @one_program
    def k(X):
        _ = ts.block_id(0) < X.shape[0]  # E:scalar-lt

    with pytest.raises(TraceError) as err:
        k.trace(F32_2D)
    assert_names(err, "E:scalar-lt", "`<` on a Scalar", "ts.lt")
