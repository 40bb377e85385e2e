"""tilestack.kernels.gemm's fused epilogue (bias, activation, residual, output cast) on both CPU backends (the
reference executor and Triton's interpreter) against float64 PyTorch.

The float64 reference keeps the kernel's f32 accumulator's range (each stage rounded through f32, so a sum past
f32's largest value is inf, as in the kernel and in torch's own bf16 Linear); everything else is float64. Sizes
are ragged, outputs start as NaN (``poison_empty``), argument errors come before any launch.
"""

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tilestack.errors import LaunchError

gemm_module = importlib.import_module("tilestack.kernels.gemm")
gemm = gemm_module.gemm

BACKENDS = ("reference", "triton")
DTYPES = (torch.bfloat16, torch.float16)                   # what gemm takes for a and b
FLOATS = (torch.float32, torch.bfloat16, torch.float16)    # bias, residual and output dtypes
ACTIVATIONS = (None, *gemm_module.ACTIVATIONS)
SMALL = dict(BM=32, BN=32, BK=16, GROUP_M=4, num_warps=4, num_stages=1)
# the output's rounding (bf16 under Triton's interpreter truncates: up to one ulp, 2^-8) and, in f32, the
# accumulation order and the activations' f32 arithmetic
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}

ACT64 = {None: lambda x: x, "relu": torch.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
         "silu": F.silu}


def f32_range(x: torch.Tensor) -> torch.Tensor:
    """x (float64) rounded through f32: what the kernel's f32 accumulator holds, infinities included."""
    return x.float().double()


def want64(a, b, bias=None, activation=None, residual=None) -> torch.Tensor:
    y = f32_range(a.double() @ b.double())
    if bias is not None:
        y = f32_range(y + bias.double())
    y = f32_range(ACT64[activation](y))
    if residual is not None:
        y = y + residual.double()
    return y


def check_close(got: torch.Tensor, want: torch.Tensor, dtype) -> None:
    """Element-wise: want rounded to the output dtype, a relative tolerance and an absolute one at the scale of
    the output's largest finite element; NaN and infinities exactly where want has them."""
    want = want.to(dtype).double()
    finite = want[want.isfinite()]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * max(scale, 1e-30),
                               equal_nan=True)


def randn(rng, shape, dtype) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_full_epilogue_matches_float64(backend, dtype, activation, rng, poison_empty):
    """bias + activation + residual on a ragged (45, 37) @ (37, 50), bias and residual in the inputs' dtype."""
    m, n, k = 45, 50, 37
    a, b = randn(rng, (m, k), dtype), randn(rng, (k, n), dtype)
    bias, residual = randn(rng, (n,), dtype), randn(rng, (m, n), dtype)
    c = gemm(a, b, bias=bias, activation=activation, residual=residual, backend=backend, **SMALL)
    assert c.dtype == dtype and c.shape == (m, n)
    check_close(c, want64(a, b, bias, activation, residual), dtype)


# (bias dtype or None, activation, residual dtype or None, out_dtype or None (a's))
COMBOS = [
    (None, None, None, torch.float32),                    # the cast alone
    (torch.float32, None, None, None),                    # bias alone
    (None, "gelu", None, None),                           # activation alone
    (None, None, torch.float32, torch.float16),           # residual alone, into f16 from bf16 inputs
    (torch.float16, "silu", None, torch.float32),
    (torch.float32, "gelu_tanh", torch.bfloat16, torch.float32),
    (torch.bfloat16, "relu", torch.float16, torch.bfloat16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combo", COMBOS, ids=str)
def test_each_part_and_mixed_dtypes(backend, combo, rng, poison_empty):
    bias_dt, activation, res_dt, out_dtype = combo
    m, n, k = 33, 21, 19
    a, b = randn(rng, (m, k), torch.bfloat16), randn(rng, (k, n), torch.bfloat16)
    bias = None if bias_dt is None else randn(rng, (n,), bias_dt)
    residual = None if res_dt is None else randn(rng, (m, n), res_dt)
    c = gemm(a, b, bias=bias, activation=activation, residual=residual, out_dtype=out_dtype, backend=backend,
             **SMALL)
    dtype = out_dtype or torch.bfloat16
    assert c.dtype == dtype and c.shape == (m, n)
    check_close(c, want64(a, b, bias, activation, residual), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_and_strided_operands(backend, rng):
    """out= of out_dtype is written and returned; b as a transposed view (a Linear's weight.t()), a residual
    with a row stride, and a bias slice with a stride."""
    m, n, k = 20, 26, 18
    a = randn(rng, (m, k), torch.float16)
    w = randn(rng, (n, k), torch.float16)                 # (out_features, in_features)
    bias = randn(rng, (2 * n,), torch.float32)[::2]
    residual = randn(rng, (m, n + 5), torch.float16)[:, 3:n + 3]
    out = torch.full((m, n), math.nan, dtype=torch.float32)
    c = gemm(a, w.t(), bias=bias, activation="gelu_tanh", residual=residual, out=out, out_dtype=torch.float32,
             backend=backend, **SMALL)
    assert c is out
    check_close(c, want64(a, w.t(), bias, "gelu_tanh", residual), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_planned_call_reads_the_new_bias_and_residual(backend, rng):
    """The second call with the same signature runs the plan of the first with its own bias and residual."""
    m, n, k = 17, 19, 9
    a, b = randn(rng, (m, k), torch.bfloat16), randn(rng, (k, n), torch.bfloat16)
    for _ in range(2):
        bias, residual = randn(rng, (n,), torch.float32), randn(rng, (m, n), torch.float32)
        c = gemm(a, b, bias=bias, activation="relu", residual=residual, out_dtype=torch.float32, backend=backend,
                 **SMALL)
        check_close(c, want64(a, b, bias, "relu", residual), torch.float32)


# ---- the activations themselves, in f32, over their whole range -----------------------------------------------------
def _act_inputs() -> torch.Tensor:
    xs = np.concatenate([np.linspace(-20, 20, 4001), np.geomspace(1e-30, 1e30, 61), -np.geomspace(1e-30, 1e30, 61),
                         [0.0, -0.0, 3.4e38, -3.4e38, math.inf, -math.inf, math.nan]])
    return torch.from_numpy(xs).float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", gemm_module.ACTIVATIONS)
def test_activation_over_f32_range(backend, activation):
    """K = 0 makes the accumulator zeros, so the f32 output is activation(bias): every activation on every f32
    magnitude, infinities and NaN, against float64 torch (torch's -inf -> NaN for gelu and silu included)."""
    x = _act_inputs()
    a, b = torch.zeros(1, 0, dtype=torch.bfloat16), torch.zeros(0, x.numel(), dtype=torch.bfloat16)
    y = gemm(a, b, bias=x, activation=activation, out_dtype=torch.float32, backend=backend, **SMALL)[0]
    want = ACT64[activation](x.double())
    torch.testing.assert_close(y.double(), want, rtol=2e-6, atol=1e-6, equal_nan=True)
    if activation == "gelu":   # the far negative tail to its relative digits (torch's own f64 erf loses them)
        tail = (x > -13) & (x < -1)
        exact = torch.tensor([v * 0.5 * math.erfc(-v / math.sqrt(2)) for v in x[tail].double().tolist()],
                             dtype=torch.float64)
        # the condition number there is about x^2: x^2 times f32 rounding
        torch.testing.assert_close(y[tail].double(), exact, rtol=3e-5, atol=0)


def test_erfc_fit_error():
    """The gelu epilogue's erfc(z) = t exp(P(t) - z^2), t = 1 / (1 + z/2), within 1e-7 (relative) of math.erfc
    on z in [0, 10]: under f32's own rounding, so the fit is not what limits the result."""
    z = np.linspace(0.0, 10.0, 200_001)
    t = 1.0 / (1.0 + z / 2)
    p = np.polynomial.polynomial.polyval(t, gemm_module.ERFC_POLY)
    got = t * np.exp(p - z * z)
    want = np.array([math.erfc(v) for v in z])
    assert float(np.max(np.abs(got / want - 1))) < 1e-7


# ---- extreme values and empty problems -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_extreme_inputs(backend, activation, rng):
    """inf and NaN in a, and rows whose f32 sums overflow (+-1e38 times positive b): each row's NaN, inf or the
    activation of +-inf as float64 torch gives them after the f32 accumulator (gelu(-inf) is NaN, relu 0)."""
    m, n, k = 9, 20, 37
    a = randn(rng, (m, k), torch.bfloat16)
    b = (randn(rng, (k, n), torch.float32).abs() + 0.1).to(torch.bfloat16)     # positive: no inf - inf
    a[0, 5] = math.inf
    a[1, 3] = math.nan
    a[2, 7] = -math.inf
    a[3, :] = 1e38                                        # each product fits f32, the sum does not
    a[4, :] = -1e38
    bias = randn(rng, (n,), torch.float32)
    residual = randn(rng, (m, n), torch.bfloat16)
    c = gemm(a, b, bias=bias, activation=activation, residual=residual, out_dtype=torch.float32, backend=backend,
             **SMALL)
    want = want64(a, b, bias, activation, residual)
    assert bool(want[3].isinf().all()) and bool(want[1].isnan().all())      # the cases are what they claim
    check_close(c, want, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_k_runs_the_epilogue(backend, dtype, poison_empty):
    """K = 0: the accumulator is zeros and the epilogue still applies: silu(bias) + residual."""
    m, n = 6, 11
    a, b = torch.ones(m, 0, dtype=dtype), torch.ones(0, n, dtype=dtype)
    bias = torch.linspace(-3, 3, n, dtype=torch.float32)
    residual = torch.arange(m * n, dtype=dtype).reshape(m, n) / 10
    c = gemm(a, b, bias=bias, activation="silu", residual=residual, backend=backend, **SMALL)
    check_close(c, want64(a, b, bias, "silu", residual), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mn", [(0, 7), (5, 0), (0, 0)], ids=str)
def test_empty_outputs_launch_nothing(backend, mn, no_launch):
    m, n = mn
    a, b = torch.ones(m, 4, dtype=torch.bfloat16), torch.ones(4, n, dtype=torch.bfloat16)
    no_launch(gemm_module, "gemm_kernel", "gemm_epilogue_kernel")
    c = gemm(a, b, bias=torch.ones(n), activation="gelu", residual=torch.ones(m, n), out_dtype=torch.float32,
             backend=backend)
    assert c.shape == (m, n) and c.dtype == torch.float32


def test_meta_gives_a_meta_result(no_launch):
    a = torch.empty(37, 20, dtype=torch.float16, device="meta")
    b = torch.empty(20, 11, dtype=torch.float16, device="meta")
    no_launch(gemm_module, "gemm_kernel", "gemm_epilogue_kernel")
    c = gemm(a, b, bias=torch.empty(11, device="meta"), activation="relu", out_dtype=torch.float32)
    assert c.device.type == "meta" and c.shape == (37, 11) and c.dtype == torch.float32


# ---- bad arguments: clear errors naming the argument, before any launch ----------------------------------------------
def _bad_cases():
    bf = torch.bfloat16
    a, b = torch.zeros(8, 4, dtype=bf), torch.zeros(4, 6, dtype=bf)
    r = torch.zeros(8, 6, dtype=bf)
    return {
        "activation name": (dict(activation="gelu_erf"), r"activation='gelu_erf'; expected None or one of"),
        "activation a function": (dict(activation=torch.relu), r"activation=<built-in method relu"),
        "bias rank": (dict(bias=torch.zeros(1, 6)), r"bias must have rank 1"),
        "bias length": (dict(bias=torch.zeros(8)), r"bias has 8 elements; expected b.shape\[1\] = 6"),
        "bias int": (dict(bias=torch.zeros(6, dtype=torch.int32)), r"bias has dtype int32"),
        "bias a list": (dict(bias=[0.0] * 6), r"bias must be a torch.Tensor"),
        "bias on meta": (dict(bias=torch.zeros(6, device="meta")), r"bias on meta"),
        "residual shape": (dict(residual=torch.zeros(6, 8)), r"residual is \(6, 8\); expected the output's shape"),
        "residual f64": (dict(residual=torch.zeros(8, 6, dtype=torch.float64)), r"residual has dtype float64"),
        "out_dtype": (dict(out_dtype=torch.int8), r"out_dtype=torch.int8; expected"),
        "out not out_dtype": (dict(out=torch.zeros(8, 6), out_dtype=torch.float16), r"out has dtype float32"),
        "out is residual": (dict(out=r, residual=r), r"out shares memory with residual"),
    }, a, b


@pytest.mark.parametrize("case", list(_bad_cases()[0]))
def test_bad_arguments(case, no_launch):
    cases, a, b = _bad_cases()
    kwargs, message = cases[case]
    no_launch(gemm_module, "gemm_kernel", "gemm_epilogue_kernel")
    with pytest.raises(LaunchError, match=message):
        gemm(a, b, backend="reference", **kwargs)
