"""GEMM: C = A @ B with bf16/f16 inputs and f32 accumulation, written in the tile language.

    c = tilestack.kernels.gemm(a, b)               # (M, K) @ (K, N) -> (M, N), a's dtype
    gemm_kernel.trace(a, b, c).source()            # the generated Triton
    y = tilestack.kernels.gemm(x, w.t(), bias=b, activation="gelu_tanh", residual=h)   # fused epilogue
    y = tilestack.kernels.gemm(a, b, out_dtype=torch.float32)                         # f32 out of bf16 in

Programs walk the output in groups of GROUP_M block-rows so that neighbouring programs share A and B
tiles in L2. The epilogue (``gemm_epilogue_kernel``, ``epilogue``) works on the f32 accumulator tile before
its one store: + bias (one per output column), the activation (``ACTIVATIONS``), + residual (a tensor of the
output's shape), then the cast to the output's dtype; a Linear + bias + GELU (+ residual add) is one kernel.
"""

from __future__ import annotations

import math

import tilestack.lang as ts
from tilestack.errors import LaunchError, TraceError
from tilestack.kernels._checks import (
    check_out_memory,
    check_same_device,
    check_tensor,
    nothing_to_launch,
    refuse_derived,
)
from tilestack.kernels._plan import forward_only, planned
from tilestack.tune.lookup import DEFAULT_BACKEND, launch_config, take_backend, tuned_launcher


def _grid(A, B, BM, BN):
    return (ts.cdiv(A.shape[0], BM) * ts.cdiv(B.shape[1], BN),)


def grouped_tile(M, N, BM: int, BN: int, GROUP_M: int, tile=None):
    """(i, j) of this program's output tile in grouped order: GROUP_M row tiles share their column tiles in
    turn, so the operands they read stay in L2. Shared by every GEMM-shaped kernel (a 1-D grid); ``tile``: the
    tile's number in that order where it is not the program's (a persistent kernel's loop over tiles)."""
    pid = ts.block_id(0) if tile is None else tile
    tiles_m, tiles_n = ts.cdiv(M, BM), ts.cdiv(N, BN)
    first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
    rows_in_group = ts.smin(tiles_m - first_m, GROUP_M)
    i = first_m + (pid % (GROUP_M * tiles_n)) % rows_in_group
    j = (pid % (GROUP_M * tiles_n)) // rows_in_group
    return i, j


@ts.kernel(grid=_grid, options=dict(num_warps=8, num_stages=3))   # Triton's launch options by default
def gemm_kernel(A, B, C, *,
                BM: int = ts.tunable(128, (16, 32, 64, 128, 256)),
                BN: int = ts.tunable(128, (16, 32, 64, 128, 256)),
                BK: int = ts.tunable(64, (16, 32, 64, 128)),
                GROUP_M: int = ts.tunable(8, (1, 4, 8, 16))):
    M, N = A.shape[0], B.shape[1]
    i, j = grouped_tile(M, N, BM, BN, GROUP_M)

    acc = ts.RegTile[ts.f32, BM, BN]()
    c = ts.RegTile[C.dtype, BM, BN]()
    accumulate(acc, A, B, i, j, BM, BN, BK)
    ts.copy(c, acc)
    ts.store(C, c, at=(i, j))


def accumulate(acc, A, B, i, j, BM: int, BN: int, BK: int, trans_b: bool = False) -> None:
    """acc (BM, BN) f32 = the (i, j) tile of A @ B: A (M, K), B (K, N), K in steps of BK (none for K = 0). With
    ``trans_b`` B is given as its (N, K) transpose, row-major: a Linear's weight, read as it is stored."""
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BN, BK]() if trans_b else ts.SharedTile[B.dtype, BK, BN]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        ts.load(a, A, at=(i, k))         # (BM, BK)
        if trans_b:
            ts.load(b, B, at=(j, k))     # (BN, BK)
            ts.mma_ABt(acc, a, b, acc)
        else:
            ts.load(b, B, at=(k, j))     # (BK, BN)
            ts.mma_AB(acc, a, b, acc)


# ---- fused epilogues ------------------------------------------------------------------------------------------
# On the f32 accumulator, in this order, before the one store: + bias, activation, + residual, cast.
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")   # gelu: the erf form (torch's default); gelu_tanh: its
#                                                        approximate="tanh" form
SQRT_HALF = math.sqrt(0.5)
GELU_TANH_SCALE = 2 * math.sqrt(2 / math.pi)          # 0.5 * (1 + tanh(u)) = sigmoid(2u), u = sqrt(2/pi) * (...)
GELU_TANH_CUBIC = 0.044715
# erfc(z) = t * exp(P(t) - z^2) with t = 1 / (1 + z/2), for z >= 0. P's coefficients, constant term first: our
# own fit (least squares on Chebyshev points, reweighted towards equal ripple) of log(erfc(z) / t) + z^2 over
# z in [0, 10]; erfc's relative error is below 5e-8 there, under f32's rounding (tests/kernels/
# test_gemm_epilogue.py measures it against math.erfc). Past z = 10 erfc underflows f32 anyway.
ERFC_POLY = (-1.2654414495603779, 0.9984927567980506, 0.38789762637389974, 0.02836725952159974,
             0.020165981868719426, -0.11673108292179571, -0.6513163283836104, 1.12245147624483,
             -0.6660842754871337, 0.14219808075815027)


def _relu(x, BM: int, BN: int) -> None:
    neg = ts.RegTile[ts.bool_, BM, BN]()
    ts.lt(neg, x, 0.0)
    ts.where(x, neg, 0.0, x)              # not max(x, 0): a GPU's max gives 0 for NaN, torch.relu gives NaN


def _silu(x, BM: int, BN: int) -> None:
    s = ts.RegTile[ts.f32, BM, BN]()
    ts.sigmoid(s, x)
    ts.mul(x, x, s)                       # x * sigmoid(x)


def _gelu_tanh(x, BM: int, BN: int) -> None:
    u = ts.RegTile[ts.f32, BM, BN]()
    ts.mul(u, x, x)
    ts.mul(u, u, GELU_TANH_CUBIC)
    ts.add(u, u, 1.0)
    ts.mul(u, u, x)                       # x + 0.044715 x^3
    ts.mul(u, u, GELU_TANH_SCALE)
    ts.sigmoid(u, u)
    ts.mul(x, x, u)                       # x * sigmoid(2u) = 0.5 x (1 + tanh(u))


def _gelu_erf(x, BM: int, BN: int) -> None:
    """x * Phi(x), Phi(x) = erfc(-x / sqrt 2) / 2. erfc of z = |x| / sqrt 2 >= 0 from the fit (a relative error,
    so the far negative tail keeps its digits), reflected for x >= 0: erfc(-z) = 2 - erfc(z)."""
    z = ts.RegTile[ts.f32, BM, BN]()
    t = ts.RegTile[ts.f32, BM, BN]()
    p = ts.RegTile[ts.f32, BM, BN]()
    neg = ts.RegTile[ts.bool_, BM, BN]()
    ts.abs(z, x)
    ts.mul(z, z, SQRT_HALF)
    ts.mul(t, z, 0.5)
    ts.add(t, t, 1.0)
    ts.one(p)
    ts.div(t, p, t)                       # t = 1 / (1 + z/2), in (0, 1]
    ts.fill(p, ERFC_POLY[-1])
    for coef in reversed(ERFC_POLY[:-1]):  # Horner, unrolled while tracing: p = p t + coef
        ts.mul(p, p, t)
        ts.add(p, p, coef)
    ts.mul(z, x, x)
    ts.mul(z, z, 0.5)                     # z^2 = x^2 / 2, one rounding (not (|x| / sqrt 2)^2, two)
    ts.sub(p, p, z)
    ts.exp(p, p)
    ts.mul(p, p, t)
    ts.mul(p, p, 0.5)                     # erfc(z) / 2 = Phi(-|x|)
    ts.lt(neg, x, 0.0)
    ts.mul(z, p, -1.0)
    ts.add(z, z, 1.0)                     # Phi(|x|) = 1 - Phi(-|x|)
    ts.where(p, neg, p, z)
    ts.mul(x, x, p)


_ACTIVATION_TILES = {"relu": _relu, "gelu": _gelu_erf, "gelu_tanh": _gelu_tanh, "silu": _silu}


def epilogue(acc, Bias, R, i, j, *, activation: str | None, BM: int, BN: int) -> None:
    """acc = activation(acc + Bias[tile j's columns]) + R[tile (i, j)], in f32: acc (BM, BN) f32, Bias (N,) or
    None, R (M, N) or None, of any float dtype. Shared by every GEMM-shaped kernel."""
    if activation is not None and activation not in _ACTIVATION_TILES:
        raise TraceError(f"epilogue: activation={activation!r}; expected None or one of {ACTIVATIONS}")
    if Bias is not None:
        b = ts.RegVec[Bias.dtype, BN]()
        ts.load(b, Bias, at=(j,))                    # (BN,); zeros past N
        if Bias.dtype != ts.f32:
            b32 = ts.RegVec[ts.f32, BN]()
            ts.copy(b32, b)
            b = b32
        ts.add_col(acc, acc, b)
    if activation is not None:
        _ACTIVATION_TILES[activation](acc, BM, BN)
    if R is not None:
        r = ts.RegTile[R.dtype, BM, BN]()
        ts.load(r, R, at=(i, j))                     # (BM, BN)
        if R.dtype != ts.f32:
            r32 = ts.RegTile[ts.f32, BM, BN]()
            ts.copy(r32, r)
            r = r32
        ts.add(acc, acc, r)


def _grid_of_c(C, BM, BN):
    return (ts.cdiv(C.shape[0], BM) * ts.cdiv(C.shape[1], BN),)


@ts.kernel(grid=_grid_of_c, options=dict(num_warps=8, num_stages=3))
def gemm_epilogue_kernel(A, B, Bias, R, C, *,
                         activation: str | None = None, HAS_BIAS: bool = False, HAS_RESIDUAL: bool = False,
                         TRANS_B: bool = False,
                         BM: int = ts.tunable(128, (16, 32, 64, 128, 256)),
                         BN: int = ts.tunable(128, (16, 32, 64, 128, 256)),
                         BK: int = ts.tunable(64, (16, 32, 64, 128)),
                         GROUP_M: int = ts.tunable(8, (1, 4, 8, 16))):
    # C = activation(A @ B + Bias) + R: A (M, K), B (K, N) (with TRANS_B: (N, K), B^T is used), Bias (N,) read
    # only with HAS_BIAS, R (M, N) only with HAS_RESIDUAL (the caller passes another argument in their place
    # otherwise), C (M, N) of any float dtype
    M, N = C.shape
    i, j = grouped_tile(M, N, BM, BN, GROUP_M)

    acc = ts.RegTile[ts.f32, BM, BN]()
    c = ts.RegTile[C.dtype, BM, BN]()
    accumulate(acc, A, B, i, j, BM, BN, BK, trans_b=TRANS_B)
    epilogue(acc, Bias if HAS_BIAS else None, R if HAS_RESIDUAL else None, i, j, activation=activation,
             BM=BM, BN=BN)
    ts.copy(c, acc)
    ts.store(C, c, at=(i, j))


def torch_activation(y, activation: str | None):
    """torch's function for one of ``ACTIVATIONS`` applied to y (None: y itself)."""
    import torch
    import torch.nn.functional as F

    if activation is None:
        return y
    return {"relu": torch.relu, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
            "silu": F.silu}[activation](y)


def reference(a, b, *, bias=None, activation: str | None = None, residual=None, out_dtype=None):
    """Plain PyTorch: the product in f32 and the epilogue in f32, returned in ``out_dtype`` (default a's)."""
    y = a.float() @ b.float()
    if bias is not None:
        y = y + bias.float()
    y = torch_activation(y, activation)
    if residual is not None:
        y = y + residual.float()
    return y.to(a.dtype if out_dtype is None else out_dtype)


# the epilogue kernel's constants gemm sets from its arguments (a caller's clashed: a bare TypeError)
EPILOGUE_DERIVED = {"HAS_BIAS": "its bias argument", "HAS_RESIDUAL": "its residual argument",
                    "TRANS_B": "b's strides", "activation": "its activation argument"}


@planned
@forward_only("gemm")     # no backward: a backward through it raises, naming it
def gemm(a, b, *, bias=None, activation: str | None = None, residual=None, out=None, out_dtype=None,
         backend: str | None = None, **config):
    """C = activation(A @ B + bias) + residual for 2-D bf16/f16 tensors of any size, accumulated in f32, the
    epilogue applied to the f32 accumulator and C cast to ``out_dtype`` once, when stored.

    a (M, K) and b (K, N) of one dtype; ``bias`` (N,), one per output column, and ``residual`` (M, N), each of
    f32, bf16 or f16; ``activation`` None or one of ``ACTIVATIONS`` ("gelu" is the erf form, "gelu_tanh"
    torch's approximate="tanh"); ``out_dtype`` f32, bf16 or f16 (default: a's dtype). ``out`` (optional, of
    dtype out_dtype) must not share memory with an input nor require grad. Empty outputs launch nothing; K = 0
    gives the epilogue of zeros (activation(bias) + residual, or zeros); meta tensors give a meta result of the
    right shape. Checks, config and launcher are planned once per launch signature (``kernels._plan``); only
    ``out``'s memory is checked on every call."""
    import torch

    floats = (torch.float32, torch.bfloat16, torch.float16)
    check_tensor("gemm", "a", a, rank=2, dtypes=(torch.bfloat16, torch.float16))
    check_tensor("gemm", "b", b, rank=2, dtypes=(a.dtype,))
    if a.shape[1] != b.shape[0]:
        raise LaunchError(f"gemm: a is {tuple(a.shape)} and b is {tuple(b.shape)}; a.shape[1] must equal "
                          "b.shape[0]")
    shape = (a.shape[0], b.shape[1])
    if activation is not None and activation not in ACTIVATIONS:
        raise LaunchError(f"gemm: activation={activation!r}; expected None or one of {ACTIVATIONS}")
    if out_dtype is not None and out_dtype not in floats:
        raise LaunchError(f"gemm: out_dtype={out_dtype!r}; expected torch.float32, torch.bfloat16 or "
                          "torch.float16")
    dtype = a.dtype if out_dtype is None else out_dtype
    if bias is not None:
        check_tensor("gemm", "bias", bias, rank=1, dtypes=floats)
        if bias.shape[0] != shape[1]:
            raise LaunchError(f"gemm: bias has {bias.shape[0]} elements; expected b.shape[1] = {shape[1]} (one "
                              "per output column)")
    if residual is not None:
        check_tensor("gemm", "residual", residual, rank=2, dtypes=floats)
        if tuple(residual.shape) != shape:
            raise LaunchError(f"gemm: residual is {tuple(residual.shape)}; expected the output's shape "
                              f"(a.shape[0], b.shape[1]) = {shape}")
    if out is not None:
        check_tensor("gemm", "out", out, rank=2, dtypes=(dtype,))
        if tuple(out.shape) != shape:
            raise LaunchError(f"gemm: out is {tuple(out.shape)}; expected (a.shape[0], b.shape[1]) = {shape}")
    check_same_device("gemm", a=a, b=b, bias=bias, residual=residual, out=out)
    refuse_derived("gemm", config, EPILOGUE_DERIVED)

    def output(a, b, out, bias=None, residual=None):
        if out is None:
            return torch.empty(shape, dtype=dtype, device=a.device)
        check_out_memory("gemm", out, a=a, b=b, bias=bias, residual=residual)
        return out

    fused = bias is not None or activation is not None or residual is not None or dtype != a.dtype
    c = output(a, b, out, bias, residual)
    if nothing_to_launch(c, a) and not (fused and c.numel() and c.device.type != "meta"):
        # (M, 0) @ (0, N) is a sum of nothing: zeros (an epilogue still runs on them: below)
        return lambda a, b, *, out=None, bias=None, residual=None, **_: (
            output(a, b, out, bias, residual).zero_() if a.shape[1] == 0 else output(a, b, out, bias, residual))
    cfg = gemm_config(a.shape[0], b.shape[1], a.shape[1], a.dtype, a.device, backend) | config
    asked, backend = backend, take_backend(cfg, backend)      # the tuned backend where none was named
    if not fused:
        launch = tuned_launcher(gemm_kernel, (a, b, c), backend, asked, **cfg)

        def run(a, b, *, out=None, **_):
            c = output(a, b, out)
            launch((a, b, c))
            return c
        return run

    # a b stored as its transpose (a Linear's weight.t(): column-major) is read as (N, K) rows; an absent bias or
    # residual: a stands in for it, never read (HAS_BIAS / HAS_RESIDUAL are False)
    trans_b = b.shape[1] > 1 and b.stride(0) == 1 and b.stride(1) != 1
    launch = tuned_launcher(
        gemm_epilogue_kernel,
        (a, b.t() if trans_b else b, a if bias is None else bias, a if residual is None else residual, c), backend,
        asked, activation=activation, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, TRANS_B=trans_b,
        **cfg)

    def run_fused(a, b, *, bias=None, residual=None, out=None, **_):
        c = output(a, b, out, bias, residual)
        launch((a, b.t() if trans_b else b, a if bias is None else bias, a if residual is None else residual, c))
        return c
    return run_fused


def gemm_config(m: int, n: int, k: int, dtype, device, backend: str | None = DEFAULT_BACKEND) -> dict:
    """The tuned config for this size (tilestack.tune's tables, by the largest dimension), else the default;
    ``backend`` as ``tune.lookup.launch_config`` takes it (None: the tables' choice, carried as "backend").

    A short-K GEMM (K at most half the larger output side: a transformer's projections at many tokens, K = d or
    4d) looks up its own signature first, "<dtype>-shortk": its main loop is a few steps (12 of BK = 64 at
    K = 768), so each tile's prologue and epilogue weigh as much as its loads, and a tile half the size that fits
    two blocks per SM (one block's epilogue under the other's mma) wins, where the square sizes of the same bucket
    want the widest tile (on the H200: 128 x 128 x 64 at 4 warps is 1.15x the 128 x 256 of the 8192 bucket at
    8192 x 768 x 3072 with GELU; docs/inference.md). Without such an entry, the plain signature's."""
    sig = str(dtype).removeprefix("torch.")
    size = max(m, n, k)
    if 2 * k <= max(m, n):
        tuned = launch_config("gemm", f"{sig}-shortk", device, size, {}, backend)
        if tuned:
            return tuned
    return launch_config("gemm", sig, device, size, {}, backend)
