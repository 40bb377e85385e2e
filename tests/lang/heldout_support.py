"""What the held-out kernel rounds (tests/lang/test_heldout_round*.py) share: launching a kernel as a user would on
a CPU (the reference executor, or Triton's interpreter), random inputs, tolerances by dtype, integer wrapping as the
GPU does it, and meta tensors for the sm_90a compiles.

    from heldout_support import BACKENDS, launch, randn, close
    launch(my_kernel, "triton", x, y, BM=16)     # Triton's interpreter on CPU tensors
"""

import numpy as np
import torch

from tilestack import config

BACKENDS = ("reference", "triton")
FLOATS = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
BF, F16, F64 = torch.bfloat16, torch.float16, torch.float64
I8, I32, I64 = torch.int8, torch.int32, torch.int64


def launch(kernel, backend, *args, **consts) -> None:
    """One launch of ``kernel`` on ``backend``, under Triton's interpreter when that backend is Triton."""
    with config.override(triton_interpret=True):
        kernel(*args, backend=backend, **consts)


def randn(rng, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


def ints(rng, lo, hi, shape, dtype) -> torch.Tensor:
    """Integers in [lo, hi) drawn exactly (in int64), then as ``dtype``."""
    return torch.from_numpy(rng.integers(lo, hi, shape, dtype=np.int64)).to(dtype)


def tol(dtype: torch.dtype) -> dict:
    """Tolerances of a result stored in ``dtype`` (computed in f32, or f64 for f64)."""
    return {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2), torch.float64: dict(rtol=1e-9, atol=1e-9)}[dtype]


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0) -> None:
    """``got`` within ``dtype``'s tolerance (got's own by default; atol times ``scale``) of ``want``, NaN where
    want is NaN."""
    t = tol(dtype or got.dtype)
    torch.testing.assert_close(got.double(), want.double(), rtol=t["rtol"], atol=t["atol"] * scale, equal_nan=True)


def wrap(v: int, bits: int) -> int:
    """The signed ``bits``-bit integer with the low bits of ``v`` (two's complement, as a C cast and the GPU)."""
    return (v + 2 ** (bits - 1)) % 2**bits - 2 ** (bits - 1)


def meta(*shape, dtype=torch.float32) -> torch.Tensor:
    """A tensor with a shape and dtype and no memory: an argument of the sm_90a compiles."""
    return torch.empty(*shape, dtype=dtype, device="meta")


def gluon_resources_one_warpgroup(kernel, args, consts) -> dict:
    """The sm_90a resource report of ``kernel`` compiled by the Gluon backend at one warpgroup (num_warps=4: the
    64-row wgmma accumulators take it; the case's num_warps and num_stages are the Triton backend's); skips the
    test where Triton's ptxas is missing."""
    import pytest

    from tilestack.backends import get_backend
    from tilestack.backends.gluon import aot as gaot
    try:
        gaot.tool("ptxas")
    except gaot.ToolMissing as e:
        pytest.skip(str(e))
    consts = {k: v for k, v in consts.items() if k not in ("num_warps", "num_stages")}
    be = get_backend("gluon")
    return gaot.resources(be.aot(kernel.trace(*args, **consts), be.Options(num_warps=4)))
