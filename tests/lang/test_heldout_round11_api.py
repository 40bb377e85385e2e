"""Round 11 of held-out kernels, continued (see test_heldout_round11.py's docstring): the language as an outsider
writes it first. Python's `**` and `abs()` on tiles (a generalized-mean pooling, a Box-Cox transform and an integer
polynomial written with them), and the mistakes of a Triton or torch user, each refused when traced or launched with
a message that names the argument and says what to write.

Gaps and bugs these found, fixed in the language, each kept here as its test:
- language: `t ** 3`, `x ** 0.5` and `abs(t)` on tiles failed with Python's "unsupported operand type(s) for ** or
  pow(): 'Tile' and 'int'" and "bad operand type for abs(): 'Tile'", though `-t`, `t * t` and `Scalar ** e` were
  taken; a constant exponent is taken now (whole ones by repeated squaring in the f32 / f64 / integer work dtype, 0.5
  and -0.5 by sqrt and rsqrt, others as exp2(e log2 x)), and a runtime exponent, a bool_ mask or a fractional or
  negative power of an integer tile is refused saying what to write; `x **= 2` writes x in place, so a ts.range loop
  carries it as it carries `x *= x` (lang.tiles.Tile.__pow__, __ipow__, __abs__):
  test_powers_and_absolute_values_of_tiles, test_powers_that_cannot_be_taken_are_named,
  test_augmented_power_is_carried_by_a_loop;
- launch: a sparse or MKL-DNN tensor argument failed inside torch ("Cannot access data pointer of Tensor that doesn't
  have storage") while the launch key was made; it is refused naming the argument and its layout now
  (lang.launch.check_args, lang.kernel.Kernel.launcher_for): test_a_tensor_that_is_not_dense_is_named;
- language: a kernel called inside another kernel's body was refused as "argument X has dtype f32, which tiles cannot
  hold"; it is named as a kernel called while a kernel is traced now, saying to share a plain function
  (lang.kernel.Kernel.__call__): test_a_kernel_called_inside_a_kernel_is_named;
- language: a positional parameter annotated as a scalar of another kind (`flag: bool`, `s: ts.f32`, `s:
  torch.float32`, `s: np.float32`, `s: float | None`) was taken for a global tensor, and the number passed for it
  refused at launch as "must be a torch.Tensor"; it is refused when the kernel is made, saying a runtime scalar is
  annotated float or int and a flag is a keyword-only constant, and a number for an unannotated parameter says how to
  annotate it (lang.kernel._refuse_scalar_annotation, Kernel.signature):
  test_a_positional_parameter_annotated_as_another_scalar_is_named,
  test_a_number_for_an_unannotated_parameter_says_how_to_annotate_it;
- language: a fixed grid, `@ts.kernel(grid=(2, 3))` or `grid=4`, failed with "(2, 3) is not a callable object"; it
  is taken now, and a grid that is neither a function nor 1 to 3 ints >= 0 is named. `@ts.kernel` without a grid (as
  `@triton.jit`) and `k[grid](args)` (Triton's launch) said "missing 1 required keyword-only argument: 'grid'" and
  "'Kernel' object is not subscriptable"; both say how a tilestack kernel takes its grid now (lang.kernel.kernel,
  _grid_function, Kernel.__getitem__): test_a_fixed_grid, test_triton_habits_with_grids_are_named;
- language: Triton's spellings (`ts.program_id`, `ts.dot`, `ts.constexpr`, `ts.float32`, `ts.zeros`) said only "has no
  attribute"; each names the language's own now, still as an AttributeError (lang.__getattr__):
  test_triton_spellings_name_the_language_s_own;
- language: `where(t, m, t, None)` and `add(t, t, None)` said only "expected an index Scalar or a number, got None",
  with no op or argument; the result of an op used as a tile (`u = ts.exp(t, t)`, None), a transposed tile stored
  (`store(Y, t.T)`), Python's range over a Scalar and a torch dtype in a tile type are named with what to write
  (lang.ops._need_operand, _hint; lang.tiles): test_mistakes_of_triton_and_torch_users_are_named.
"""

import math

import numpy as np
import pytest
import torch
from heldout_support import BACKENDS, BF, F16, I32, I64, close, launch, randn

import tilestack.lang as ts
from tilestack.errors import LaunchError, TraceError

FLOAT_DTYPES = [torch.float32, F16, BF, torch.float64]


def poisoned(*shape, dtype=torch.float32, value=math.nan) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


# ---- 1. `**` and abs() on tiles --------------------------------------------------------------------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def gem_pool(X, Y, *, P: float = 3.0, BM: int = 16, BN: int = 16):
    """Generalized-mean pooling of each row of X (M, N): Y[r] = (mean_c |x|^P)^(1/P), over column tiles (|x|^P a
    tile of X's dtype, as the sugar makes it)."""
    i = ts.block_id(0)
    x = ts.RegTile[X.dtype, BM, BN]()
    acc = ts.RegVec[ts.f32, BM]()
    ts.zero(acc)
    for j in ts.range(ts.cdiv(X.shape[1], BN)):
        ts.load(x, X, at=(i, j))
        p = abs(x) ** P                              # (columns past N read as 0: 0 ** P adds 0)
        ts.row_sum(acc, p, acc)
    ts.div(acc, acc, X.shape[1])
    y = acc ** (1.0 / P)
    ts.store(Y, y, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("P", [3.0, 2.0, 2.5, 1.0])
def test_gem_pool(backend, dtype, P, rng):
    M, N = 21, 37
    x = randn(rng, M, N, dtype=dtype)
    x[0] = 0.0                                       # (0 ** (1 / P) is 0)
    y = poisoned(M)
    launch(gem_pool, backend, x, y, P=P)
    want = x.double().abs().pow(P).mean(-1).pow(1 / P)
    close(y, want.float(), dtype if dtype is not torch.float64 else None, scale=4)   # (|x|^P rounded to x's dtype)


@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def powers(X, SQ, CUBE, INV2, HALF, RHALF, FRAC, ABS, *, BN: int = 16):
    """Each output (N,) of X's dtype: x ** 2, x ** 3, x ** -2, x ** 0.5, x ** -0.5, x ** 1.7, |x|."""
    i = ts.block_id(0)
    x = ts.RegVec[X.dtype, BN]()
    ts.load(x, X, at=(i,))
    for out, y in ((SQ, x ** 2), (CUBE, x ** 3), (INV2, x ** -2), (HALF, x ** 0.5), (RHALF, x ** -0.5),
                   (FRAC, x ** 1.7), (ABS, abs(x))):
        ts.store(out, y, at=(i,))


@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def int_powers(X, P0, P5, P13, ABS, *, BN: int = 16):
    """Integer tiles: x ** 0, x ** 5, x ** 13 (wrapping in the integer work dtype) and |x|."""
    i = ts.block_id(0)
    x = ts.RegVec[X.dtype, BN]()
    ts.load(x, X, at=(i,))
    for out, y in ((P0, x ** 0), (P5, x ** 5), (P13, x ** 13), (ABS, abs(x))):
        ts.store(out, y, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_powers_and_absolute_values_of_tiles(backend, dtype, rng):
    """Against torch.pow in float64, rounded once to the dtype: negatives (NaN for a fractional power, as torch),
    zeros of both signs (inf for negative powers), inf, -inf and NaN; then integer powers that wrap, as torch's."""
    x = randn(rng, 37, dtype=torch.float64) * 3
    x[:8] = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0, 2.0], dtype=torch.float64)
    x = x.to(dtype)
    outs = [poisoned(37, dtype=dtype) for _ in range(7)]
    launch(powers, backend, x, *outs)
    x64 = x.double()
    for got, e in zip(outs, (2, 3, -2, 0.5, -0.5, 1.7), strict=False):
        close(got, x64.pow(e).to(dtype), scale=2)
    close(outs[6], x.abs())
    for idt in (I32, I64, torch.int8):
        xi = torch.tensor([0, 1, -1, 2, -3, 7, 100, -128], dtype=idt)
        got = [torch.full((8,), 55, dtype=idt) for _ in range(4)]
        launch(int_powers, backend, xi, *got)
        for g, e in zip(got, (0, 5, 13), strict=False):
            assert torch.equal(g, xi.pow(e)), (idt, e, g)
        assert torch.equal(got[3], xi.abs())


def test_powers_that_cannot_be_taken_are_named():
    def traced(body, dtype=torch.float32):
        @ts.kernel(grid=lambda X: (1,))
        def k(X, Y, s: float):
            x = ts.RegVec[X.dtype, 16]()
            ts.load(x, X, at=(0,))
            ts.store(Y, body(x, s), at=(0,))
        with pytest.raises(TraceError) as e:
            k.trace(torch.zeros(16, dtype=dtype), torch.zeros(16, dtype=dtype), 1.0)
        return str(e.value)

    assert "exponent must be a constant" in traced(lambda x, s: x ** s) and "ts.exp2" in traced(lambda x, s: x ** s)
    assert "got a tile" in traced(lambda x, s: x ** x)
    assert "constant, finite" in traced(lambda x, s: x ** math.inf)
    assert "whole exponent >= 0, got -1" in traced(lambda x, s: x ** -1, I32)
    assert "got 0.5" in traced(lambda x, s: x ** 0.5, I32)
    assert "log2(base)" in traced(lambda x, s: 2.0 ** x)
    assert "bool_ mask" in traced(lambda x, s: _mask_of(x) ** 2)


def _mask_of(x):
    m = ts.RegVec[ts.bool_, 16]()
    ts.gt(m, x, 0.0)
    return m


# ---- 2. mistakes of Triton and torch users ---------------------------------------------------------------------------
@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def scale_rows(X, Y, s: float, *, BM: int = 16, BN: int = 16):
    i = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, BN]()
    ts.load(x, X, at=(i, 0))
    ts.mul(x, x, s)
    ts.store(Y, x, at=(i, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr", "mkldnn"])
@pytest.mark.parametrize("which", ["X", "Y"])
def test_a_tensor_that_is_not_dense_is_named(backend, layout, which):
    """Nothing is written, and the dense tensor then runs (the launch cache keeps nothing of the refused call)."""
    dense = torch.arange(1.0, 33.0).reshape(4, 8)
    other = getattr(dense, {"sparse_coo": "to_sparse", "sparse_csr": "to_sparse_csr", "mkldnn": "to_mkldnn"}[layout])()
    y = poisoned(4, 8)
    args = (other, y) if which == "X" else (dense, other)
    with pytest.raises(LaunchError, match=rf"scale_rows: argument {which} has layout torch\.(sparse_coo|sparse_csr|"
                                          rf"_mkldnn); kernels address dense tensors \(torch\.strided\): pass "
                                          rf"{which}\.to_dense\(\)"):
        launch(scale_rows, backend, *args, 2.0)
    assert y.isnan().all()
    launch(scale_rows, backend, dense, y, 2.0)
    assert torch.equal(y, dense * 2)


def _trace_error(body) -> str:
    """The TraceError of tracing a kernel (X, Y) f32 (16, 16) whose body is ``body(X, Y)``."""
    @ts.kernel(grid=lambda X: (1,))
    def k(X, Y):
        body(X, Y)
    with pytest.raises(TraceError) as e:
        k.trace(torch.zeros(16, 16), torch.zeros(16, 16))
    return str(e.value)


def _loaded(X):
    t = ts.RegTile[ts.f32, 16, 16]()
    ts.load(t, X, at=(0, 0))
    return t


@ts.kernel(grid=lambda X: (1,))
def copy_tile(X, Y):
    ts.store(Y, _loaded(X), at=(0, 0))


def test_a_kernel_called_inside_a_kernel_is_named():
    msg = _trace_error(lambda X, Y: copy_tile(X, Y))
    assert "copy_tile is a kernel, launched from the host; a kernel being traced cannot call it" in msg
    assert "plain Python function" in msg and "test_heldout_round11_api.py" in msg
    y = poisoned(16, 16)
    launch(copy_tile, "reference", torch.ones(16, 16), y)     # (and from the host it runs)
    assert torch.equal(y, torch.ones(16, 16))


def _op_result_as_tile(X, Y):
    t = _loaded(X)
    u = ts.exp(t, t)                                  # (Triton style: ops return their result)
    ts.store(Y, u, at=(0, 0))


def _python_range(X, Y):
    t = _loaded(X)
    for _ in range(X.shape[0]):
        ts.exp(t, t)


def _torch_dtype(X, Y):
    ts.RegTile[torch.bfloat16, 16, 16]()


def _none_operand(op):
    def body(X, Y):
        t = _loaded(X)
        m = ts.RegTile[ts.bool_, 16, 16]()
        ts.gt(m, t, 0.0)
        if op == "where":
            ts.where(t, m, t, None)
        else:
            ts.add(t, t, None)
    return body


@pytest.mark.parametrize(("body", "expected"), [
    (_op_result_as_tile, r"store: src must be a tile or vector, got NoneType None \(ts ops write their first "
                         r"argument, dst, and return None"),
    (lambda X, Y: ts.store(Y, _loaded(X).T, at=(0, 0)),
     r"store: src must be a tile or vector, got _Transposed .*\(t\.T is read by `@` and copy: .* copy\(u, t\.T\)\)"),
    (_python_range, r"a Scalar \(in `for _ in range\(X\.shape\[0\]\):`\) cannot be used as a Python int .* "
                    r"`for j in ts\.range\(n\)`, not Python's range"),
    (_torch_dtype, r"RegTile\[\.\.\.\] takes a dtype .* \(a tile's dtype is the language's: ts\.bf16, not "
                   r"torch\.bfloat16\)"),
    (_none_operand("where"), r"where: b must be a tile, a number or a Scalar, got NoneType None"),
    (_none_operand("add"), r"add: b must be a tile, a number or a Scalar, got NoneType None"),
])
def test_mistakes_of_triton_and_torch_users_are_named(body, expected):
    import re
    msg = _trace_error(body)
    assert re.search(expected, msg), msg
    assert "test_heldout_round11_api.py:" in msg      # (the user's line)


def _kernel_with(annotation):
    """A kernel whose third parameter ``s`` is annotated ``annotation`` (made by exec: annotations as written)."""
    ns = {"ts": ts, "torch": torch, "np": np}
    exec(f"@ts.kernel(grid=lambda X: (1,))\n"
         f"def k(X, Y, s: {annotation}):\n"
         f"    t = ts.RegVec[ts.f32, 16]()\n"
         f"    ts.load(t, X, at=(0,))\n"
         f"    ts.mul(t, t, s)\n"
         f"    ts.store(Y, t, at=(0,))\n", ns)
    return ns["k"]


@pytest.mark.parametrize("annotation", ["bool", "str", "complex", "ts.f32", "ts.i32", "torch.float32", "np.float32",
                                        "float | None", "'bool'"])
def test_a_positional_parameter_annotated_as_another_scalar_is_named(annotation):
    """Was taken for a global tensor: a number passed for it was refused at launch as "must be a torch.Tensor"."""
    with pytest.raises(TraceError, match=r"kernel k: parameter s is annotated .*; a positional parameter is a global "
                                         r"tensor \(unannotated or Global\) or a runtime scalar annotated float or "
                                         r"int .*keyword-only, after \*: `\*, s: bool = False`"):
        _kernel_with(annotation)


def test_a_number_for_an_unannotated_parameter_says_how_to_annotate_it():
    y = poisoned(16)
    with pytest.raises(LaunchError, match=r"argument s must be a torch.Tensor .*got float \(a runtime scalar parameter "
                                          r"is annotated: `s: float` or `s: int`\)"):
        launch(_kernel_with("'Global'"), "reference", torch.ones(16), y, 2.0)
    assert y.isnan().all()
    for annotation, value in (("float", 2.5), ("'float'", 2.5), ("int", 3)):
        launch(_kernel_with(annotation), "reference", torch.ones(16), y, value)
        assert torch.equal(y, torch.full((16,), float(value)))


@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def repeated_squares(X, Y, n: int, *, BN: int = 16):
    """Y = X ** (2 ** n) by n squarings carried by a runtime loop (`x **= 2` writes x in place, as `x *= x`)."""
    i = ts.block_id(0)
    x = ts.RegVec[ts.f64, BN]()
    ts.load(x, X, at=(i,))
    for _ in ts.range(n):
        x **= 2
    ts.store(Y, x, at=(i,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 5])
def test_augmented_power_is_carried_by_a_loop(backend, n, rng):
    x = torch.from_numpy(rng.uniform(0.5, 1.5, 21) * rng.choice([-1, 1], 21))
    y = poisoned(21, dtype=torch.float64)
    launch(repeated_squares, backend, x, y, n)
    close(y, x ** (2 ** n))


# ---- 3. grids as Triton users write them -----------------------------------------------------------------------------
@ts.kernel(grid=(2, 3))
def fixed_grid_ids(Y, *, BN: int = 16):
    """Y (2, 3, BN) i32: program (i, j) writes i * 10 + j over its row (a fixed grid: no function of the arguments)."""
    i, j = ts.block_id(0), ts.block_id(1)
    v = ts.RegVec[ts.i32, BN]()
    ts.zero(v)
    ts.add(v, v, i * 10 + j)
    ts.store(Y, v, at=(i, j, 0))


@ts.kernel(grid=4)
def fixed_grid_1d(Y, *, BN: int = 16):
    v = ts.RegVec[ts.i32, BN]()
    ts.arange(v, ts.block_id(0) * BN)
    ts.store(Y, v, at=(ts.block_id(0),))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_fixed_grid(backend):
    """Was refused: `grid=(2, 3)` said "(2, 3) is not a callable object" (a grid was a function only)."""
    y = torch.full((2, 3, 16), -1, dtype=I32)
    launch(fixed_grid_ids, backend, y)
    assert torch.equal(y, (torch.arange(2)[:, None, None] * 10 + torch.arange(3)[None, :, None]).expand(2, 3, 16).int())
    y = torch.full((64,), -1, dtype=I32)
    launch(fixed_grid_1d, backend, y)
    assert torch.equal(y, torch.arange(64, dtype=I32))


def test_triton_habits_with_grids_are_named():
    """`@ts.kernel` as `@triton.jit` (Python said "kernel() missing 1 required keyword-only argument: 'grid'"),
    `k[grid](args)` ("'Kernel' object is not subscriptable") and grids that are no grid."""
    with pytest.raises(TraceError, match=r"ts.kernel needs its grid \(kernel no_grid\): .*@ts.kernel\(grid=lambda X, "
                                         r"BM: .*grid=\(4,\)\)`; it is launched as k\(args\), with no \[grid\]"):
        @ts.kernel
        def no_grid(X):
            pass
    with pytest.raises(LaunchError, match=r"fixed_grid_1d\[\(4,\)\]: a tilestack kernel takes its grid where it is "
                                          r"made, @ts.kernel\(grid=...\) .* launched as fixed_grid_1d\(args...\), "
                                          r"with no \[grid\] \(declared at test_heldout_round11_api.py:\d+\)"):
        fixed_grid_1d[(4,)](torch.zeros(64, dtype=I32))
    for bad in ((1, 2, 3, 4), (-1,), "4", (2.0,), ()):
        with pytest.raises(TraceError, match=r"ts.kernel: grid is .*; expected a function of the arguments and "
                                             r"constants .* or a fixed int or tuple of 1 to 3 ints >= 0"):
            ts.kernel(grid=bad)


@pytest.mark.parametrize(("name", "hint"), [("program_id", r"ts\.block_id\(axis\)"), ("dot", r"ts\.mma_AB"),
                                            ("constexpr", r"keyword-only constant"), ("float32", r"ts\.f32"),
                                            ("zeros", r"ts\.zero\(t\)")])
def test_triton_spellings_name_the_language_s_own(name, hint):
    """`ts.program_id(0)` said only "module 'tilestack.lang' has no attribute 'program_id'" (lang.__getattr__);
    still an AttributeError, so hasattr is False."""
    with pytest.raises(AttributeError, match=rf"tilestack.lang has no '{name}' \(Triton's spelling\); here it is "
                                             rf".*{hint}"):
        getattr(ts, name)
    assert not hasattr(ts, name)
    with pytest.raises(AttributeError, match=r"module 'tilestack.lang' has no attribute 'no_such_op'"):
        ts.no_such_op  # noqa: B018
