"""Element-wise ops take a vector marked per_row(v) or per_col(v) as their second operand, as where() and the
comparisons do: ``add(x, x, per_col(bias))`` is ``add_col(x, x, bias)``, for add, sub, mul, div, max and min, on
both CPU backends, against float64 torch; an unmarked vector is refused with the fix in the message."""

import pytest
import torch

import tilestack.lang as ts
from tilestack.errors import TileShapeError

BACKENDS = ("reference", "triton")
FNS = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "max": torch.maximum,
       "min": torch.minimum}


def _kernel(fn: str, axis: str):
    op = getattr(ts, fn)
    mark = ts.per_row if axis == "row" else ts.per_col

    @ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
    def k(X, V, Y, *, BM: int = 16, BN: int = 32):
        i, j = ts.block_id(0), ts.block_id(1)
        x = ts.RegTile[ts.f32, BM, BN]()
        v = ts.RegVec[ts.f32, BM if axis == "row" else BN]()
        ts.load(x, X, at=(i, j))
        ts.load(v, V, at=(i,) if axis == "row" else (j,))
        op(x, x, mark(v))                          # (BM, BN) with v along the rows or the columns
        y = ts.RegTile[Y.dtype, BM, BN]()
        ts.copy(y, x)
        ts.store(Y, y, at=(i, j))
    return k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", ("row", "col"))
@pytest.mark.parametrize("fn", list(FNS))
def test_marked_vector_operand(fn, axis, backend):
    g = torch.Generator().manual_seed(hash((fn, axis)) % 1000)
    x = torch.randn(37, 53, generator=g)                          # ragged against (16, 32) tiles
    v = torch.randn(37 if axis == "row" else 53, generator=g).abs() + 0.5
    y = torch.full_like(x, float("nan"))
    _kernel(fn, axis)(x, v, y, backend=backend)
    vv = v.double()[:, None] if axis == "row" else v.double()[None, :]
    want = FNS[fn](x.double(), vv)
    assert not y.isnan().any()
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-6)


def test_unmarked_vector_names_the_fix():
    @ts.kernel(grid=lambda X: (1,))
    def k(X, V, Y):
        x = ts.RegTile[ts.f32, 16, 32]()
        v = ts.RegVec[ts.f32, 32]()
        ts.load(x, X, at=(0, 0))
        ts.load(v, V, at=(0,))
        ts.add(x, x, v)
        ts.store(Y, x, at=(0, 0))

    with pytest.raises(TileShapeError, match=r"per_row\(v\) or per_col\(v\)"):
        k(torch.zeros(16, 32), torch.zeros(32), torch.zeros(16, 32), backend="reference")
