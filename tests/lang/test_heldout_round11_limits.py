"""Round 11 of held-out kernels, continued (see test_heldout_round11.py's docstring): tiles past what Triton holds,
parameters named as the generated Triton source names its own, and f64 float arguments under its interpreter.

Bugs these found, fixed in the Triton backend, each kept here as its regression test:
- Triton: a tile of more than 2**20 elements (a (2048, 1024) tile, a 2**21 vector), or a product with a dimension
  under 16 whose (M, K, N) broadcast sum is (an (8, 512) x (512, 512)), failed inside Triton ("numel (2097152)
  exceeds triton maximum tensor numel (1048576)") when the kernel ran; the legalizer names the line, the op, the tile
  and the limit now, before anything is compiled or written (backends.triton.passes.legalize, _check_small_product).
  The reference executor runs them: test_a_tile_past_what_triton_holds_is_named,
  test_a_thin_product_past_what_triton_holds_is_named;
- Triton: a kernel parameter named as the generated source names its own failed there or read the wrong value: `X_d0`
  (or `X_s0`) beside a global `X` ("duplicate argument 'X_d0' in function definition"), `tl` (shadowing
  triton.language), `t1_o0` (an address offset: "Unsupported ptr type in tl.store"); such a parameter is renamed in
  the source now (backends.python_dsl.param_names): test_parameters_named_as_the_generated_source_names_its_own.
  (Gluon's source, compiled on the GPU only, does not rename them yet.)
- Triton's interpreter: an f64 kernel's float argument of -0.0 was +0.0 (round 10's open item); it is an f64 tensor
  in the interpreted kernel now, and other values keep all their bits (backends.triton.codegen._e_arg):
  test_f64_float_arguments_keep_their_value_and_sign.
"""

import math

import pytest
import torch
from heldout_support import BACKENDS, launch

import tilestack.lang as ts
from tilestack.errors import BackendError


@ts.kernel(grid=lambda X, BM, BN: (ts.cdiv(X.shape[0], BM), ts.cdiv(X.shape[1], BN)))
def scaled_copy(X, Y, *, BM: int = 16, BN: int = 16):
    i, j = ts.block_id(0), ts.block_id(1)
    t = ts.RegTile[ts.f32, BM, BN]()
    ts.load(t, X, at=(i, j))
    ts.mul(t, t, 2.0)
    ts.store(Y, t, at=(i, j))


@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def vec_copy(X, Y, *, BN: int = 16):
    t = ts.RegVec[ts.f32, BN]()
    ts.load(t, X, at=(ts.block_id(0),))
    ts.store(Y, t, at=(ts.block_id(0),))


@ts.kernel(grid=lambda A: (1,))
def thin_product(A, B, C, *, M: int = 8, K: int = 16, N: int = 16):
    """C (M, N) = A (M, K) @ B (K, N): M = 8 rows, under tl.dot's 16."""
    a = ts.RegTile[ts.f32, M, K]()
    b = ts.RegTile[ts.f32, K, N]()
    c = ts.RegTile[ts.f32, M, N]()
    ts.load(a, A, at=(0, 0))
    ts.load(b, B, at=(0, 0))
    ts.zero(c)
    ts.mma_AB(c, a, b, c)
    ts.store(C, c, at=(0, 0))


def test_a_tile_past_what_triton_holds_is_named():
    x, y = torch.ones(3, 5), torch.full((3, 5), math.nan)
    with pytest.raises(BackendError, match=r"test_heldout_round11_limits.py:\d+: load uses a RegTile\[f32, 2048, "
                                           r"1024\], 2097152 elements; a Triton tensor holds at most 1048576 "
                                           r"\(2\*\*20\): use smaller tiles and loop over them"):
        launch(scaled_copy, "triton", x, y, BM=2048, BN=1024)
    with pytest.raises(BackendError, match=r"RegVec\[f32, 2097152\], 2097152 elements"):
        launch(vec_copy, "triton", torch.ones(5), torch.zeros(5), BN=2**21)
    assert y.isnan().all()
    launch(scaled_copy, "reference", x, y, BM=2048, BN=1024)       # (the reference holds it)
    assert torch.equal(y, x * 2)
    y = torch.full((3, 5), math.nan)
    launch(scaled_copy, "triton", x, y, BM=1024, BN=1024)          # (2**20 exactly: held)
    assert torch.equal(y, x * 2)


def test_a_thin_product_past_what_triton_holds_is_named():
    a, b = torch.ones(8, 512), torch.ones(512, 512)
    c = torch.full((8, 512), math.nan)
    with pytest.raises(BackendError, match=r"test_heldout_round11_limits.py:\d+: a \(8, 512\) x \(512, 512\) product "
                                           r"has a dimension under 16, which the Triton backend sums from its 8 x 512 "
                                           r"x 512 = 2097152 products at once; .* split K into a loop"):
        launch(thin_product, "triton", a, b, c, K=512, N=512)
    assert c.isnan().all()
    launch(thin_product, "triton", a[:, :256], b[:256], c, K=256, N=512)   # (2**20 products: held)
    assert torch.equal(c, torch.full((8, 512), 256.0))


def _kernel_named(x: str, y: str, s: str):
    """Y = X * s + X.shape[0] with the parameters named ``x``, ``y`` and ``s`` (made by exec: names as written)."""
    ns = {"ts": ts}
    exec(f"@ts.kernel(grid=lambda {x}, BN: (ts.cdiv({x}.shape[0], BN),))\n"
         f"def named({x}, {y}, {s}: float, *, BN: int = 16):\n"
         f"    t = ts.RegVec[ts.f32, BN]()\n"
         f"    ts.load(t, {x}, at=(ts.block_id(0),))\n"
         f"    ts.mul(t, t, {s})\n"
         f"    ts.add(t, t, {x}.shape[0])\n"
         f"    ts.store({y}, t, at=(ts.block_id(0),))\n", ns)
    return ns["named"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("names", [("tl", "Y", "s"), ("X", "X_d0", "s"), ("X", "Y", "X_s0"), ("X", "t1_o0", "s"),
                                   ("float", "range", "str"), ("_to_bf16", "Y", "_floordiv"), ("X", "triton", "v3"),
                                   ("x_1", "x_1_p", "s")])
def test_parameters_named_as_the_generated_source_names_its_own(backend, names, rng):
    """Failed under Triton: a duplicate argument (X beside X_d0: X's size parameter), `tl` shadowed (AttributeError
    inside the interpreter), a store through a generated offset (t1_o0); the reference ran them. The generated
    source renames such a parameter (backends.python_dsl.param_names)."""
    x = torch.from_numpy(rng.standard_normal(37)).float()
    y = torch.full((37,), math.nan)
    launch(_kernel_named(*names), backend, x, y, 2.0)
    torch.testing.assert_close(y, x * 2.0 + 37)


@ts.kernel(grid=lambda X, BN: (ts.cdiv(X.shape[0], BN),))
def f64_scale(X, Y, Z, s: float, *, BN: int = 16):
    """Y = X / s, Z = max(X s, s) in f64 work (s an f64 parameter)."""
    t = ts.RegVec[X.dtype, BN]()
    u = ts.RegVec[X.dtype, BN]()
    ts.load(t, X, at=(ts.block_id(0),))
    ts.div(u, t, s)
    ts.store(Y, u, at=(ts.block_id(0),))
    ts.mul(u, t, s)
    ts.max(u, u, s)
    ts.store(Z, u, at=(ts.block_id(0),))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("s", [-0.0, 0.0, 1.0 + 2.0**-40, 1e-310, -1e300, math.inf, math.nan])
def test_f64_float_arguments_keep_their_value_and_sign(backend, s):
    """Under Triton's interpreter an f64 kernel's float argument of -0.0 was +0.0 (X / -0.0 gave +inf for X > 0): the
    interpreter passes it as a Python float, a constant Triton makes its null value; made an f64 tensor now
    (backends.triton.codegen._e_arg), without rounding other values to f32 (a conditional takes a float in f32's
    range as an f32: 1 + 2**-40 became 1)."""
    x = torch.tensor([1.0, -2.0, 0.0, -0.0, 3.0, math.inf, -math.inf, math.nan] * 2 + [0.5], dtype=torch.float64)
    y, z = torch.full_like(x, 7.0), torch.full_like(x, 7.0)
    launch(f64_scale, backend, x, y, z, s)
    for got, want in ((y, x / s), (z, torch.maximum(x * s, torch.tensor(s, dtype=torch.float64)))):
        same = (got == want) & (got.signbit() == want.signbit()) | (got.isnan() & want.isnan())
        assert same.all(), (s, got[~same], want[~same])
