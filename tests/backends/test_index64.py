"""Element offsets past 2**31: 64-bit where a tensor needs them, 32-bit where every offset fits.

A tensor past 2**31 elements would take gigabytes on a CPU; a view with a huge row stride addresses the same
offsets with a few hundred elements (torch allocates lazily: only the pages a test touches are committed).
The full-size run (RMSNorm of a (262400, 8192) bf16 tensor) is scripts/gpu/check_index64.py, for the GPU.
"""

import re

import numpy as np
import pytest
import torch

import tilestack.lang as ts
from tilestack import config
from tilestack.backends.triton.codegen import INT32_MAX, generate, needs_int64, wide_globals

BACKENDS = ("reference", "triton")
BIG_STRIDE = 2**30 + 64     # rows 2 and 3 of a (4, 64) view start past element 2**31


@ts.kernel(grid=lambda X: (1,))
def copy_rows(X, Y, r: int):
    """Rows 2r, 2r+1 of X into Y: a 2-D register tile in (pointer path) and one vector per row out."""
    x = ts.RegTile[ts.bf16, 2, 64]()
    v = ts.RegVec[ts.bf16, 64]()
    w = ts.RegVec[ts.f32, 64]()
    ts.load(x, X, at=(r, 0))
    ts.col_sum(w, x)                   # both rows, so both took part
    ts.load(v, X, at=(2 * r + 1, 0))
    ts.store(Y, v, at=(2 * r, 0))
    ts.copy(v, w)
    ts.store(Y, v, at=(2 * r + 1, 0))


@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def rms_norm(X, Y, eps: float, *, BM: int = 2, BN: int = 64):
    """y = x / sqrt(mean(x**2) + eps) over rows of width <= BN."""
    i = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, BN]()
    sq = ts.RegTile[ts.f32, BM, BN]()
    ms = ts.RegVec[ts.f32, BM]()
    y = ts.RegTile[Y.dtype, BM, BN]()
    ts.load(x, X, at=(i, 0))
    ts.mul(sq, x, x)
    ts.row_sum(ms, sq)
    ts.div(ms, ms, X.shape[1] * 1.0)
    ts.add(ms, ms, eps)
    ts.rsqrt(ms, ms)
    ts.mul_row(x, x, ms)
    ts.copy(y, x)
    ts.store(Y, y, at=(i, 0))


def big_view(values: torch.Tensor) -> torch.Tensor:
    """A (4, 64) bf16 view whose rows are BIG_STRIDE elements apart, holding ``values``."""
    store = torch.empty(3 * BIG_STRIDE + 64, dtype=torch.bfloat16)
    v = store.as_strided((4, 64), (BIG_STRIDE, 1))
    v.copy_(values)
    return v


@pytest.mark.parametrize(("shape", "stride", "wide"), [
    ((262400, 8192), (8192, 1), True),         # the RMSNorm that died on the H200: 2,149,580,800 elements
    ((262143, 8192), (8192, 1), False),        # just under: the last offset is 2**31 - 8193
    ((2**31,), (1,), False),                   # the last offset is INT32_MAX itself
    ((2**31 + 1,), (1,), True),
    ((2**31 + 1,), (0,), True),                # expanded: offsets are 0, the coordinate is not
    ((4, 64), (BIG_STRIDE, 1), True),          # few elements, far apart
    ((0, 2**40), (1, 1), False),               # empty: nothing is addressed
    ((3, 5), (1, 3), False),
])
def test_needs_int64(shape, stride, wide):
    assert needs_int64(shape, stride) is wide


def test_largest_offset_is_the_boundary():
    assert not needs_int64((2, INT32_MAX), (0, 1))
    assert needs_int64((2, 2, INT32_MAX // 2 + 1), (INT32_MAX // 2 + 1, 1, 1))


def test_source_widens_only_the_globals_it_is_told():
    ir = rms_norm.trace(ts.ArgSpec(ts.bf16, 2), ts.ArgSpec(ts.bf16, 2), 1e-6).ir
    narrow = generate(ir, index64=False).source
    assert "int64" not in narrow
    x_only = generate(ir, index64={0}).source           # X needs 64 bits, Y does not
    load = next(ln for ln in x_only.splitlines() if "tl.load(X" in ln)
    store = next(ln for ln in x_only.splitlines() if "tl.store(Y" in ln)
    offsets = {name: expr for name, expr in re.findall(r"^\s+(t\d+_o\d) = (.*)$", x_only, re.M)}
    load_offs = re.findall(r"t\d+_o\d", load)
    store_offs = re.findall(r"t\d+_o\d", store)
    assert load_offs and all("tl.cast(" in offsets[o] and "tl.int64" in offsets[o] for o in load_offs)
    assert store_offs and not any("int64" in offsets[o] for o in store_offs)
    both = generate(ir).source                           # the default: every global in 64 bits
    assert both.count("tl.int64") == 4


def test_rms_norm_of_the_tensor_that_died_gets_64_bit_offsets():
    shape, stride = (262400, 8192), (8192, 1)
    ir = rms_norm.trace(ts.ArgSpec(ts.bf16, 2), ts.ArgSpec(ts.bf16, 2), 1e-6).ir
    wide = {i for i in (0, 1) if needs_int64(shape, stride)}
    assert wide == {0, 1}
    src = generate(ir, index64=wide).source
    assert len(re.findall(r"tl\.cast\(\w+, tl\.int64\)", src)) == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_loads_and_stores_past_element_2_31(backend):
    values = torch.arange(256.0).reshape(4, 64)          # exact in bf16 (integers < 256)
    x = big_view(values)
    y = big_view(torch.full((4, 64), float("nan")))
    assert x.storage_offset() + 2 * BIG_STRIDE > INT32_MAX
    with config.override(triton_interpret=True):
        copy_rows(x, y, 1, backend=backend)
    got = y.to(torch.float64).numpy()
    want = values.numpy().astype(np.float64)
    np.testing.assert_array_equal(got[2], want[3])
    np.testing.assert_array_equal(got[3], want[2] + want[3])
    assert np.isnan(got[:2]).all()                     # rows the kernel does not own stay untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_coordinates_past_2_31_on_an_expanded_axis(backend):
    @ts.kernel(grid=lambda X: (1,))
    def last_tile(X, Y):
        v = ts.RegVec[ts.f32, 16]()
        ts.load(v, X, at=(ts.cdiv(X.shape[0], 16) - 1,))
        ts.store(Y, v, at=(0,))

    n = 2**31 + 8                                       # the last tile holds 8 elements, at 2**31 - 8 .. 2**31 + 7
    x = torch.full((1,), 2.5).expand(n)
    y = torch.full((16,), float("nan"))
    with config.override(triton_interpret=True):
        last_tile(x, y, backend=backend)
    np.testing.assert_array_equal(y.numpy(), np.r_[np.full(8, 2.5), np.zeros(8)])


def test_wide_globals_picks_the_tensors_that_need_64_bits():
    ir = copy_rows.trace(ts.ArgSpec(ts.bf16, 2), ts.ArgSpec(ts.bf16, 2), 0).ir
    small = torch.zeros(4, 64, dtype=torch.bfloat16)
    big = big_view(torch.zeros(4, 64))
    assert wide_globals(ir, (small, small, 1)) == frozenset()
    assert wide_globals(ir, (big, small, 1)) == {0}
    assert wide_globals(ir, (big, big, 1)) == {0, 1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_output_with_stride_0_on_a_size_1_axis_is_written(backend):
    @ts.kernel(grid=lambda: (1,))
    def copy_row(X, Y):
        v = ts.RegVec[ts.f32, 16]()
        ts.load(v, X, at=(0, 0))
        ts.store(Y, v, at=(0, 0))

    x = torch.arange(5.0).reshape(1, 5)
    y = torch.full((5,), float("nan")).as_strided((1, 5), (0, 1))   # legal: one row, nothing overlaps
    with config.override(triton_interpret=True):
        copy_row(x, y, backend=backend)
    np.testing.assert_array_equal(y.numpy(), x.numpy())
