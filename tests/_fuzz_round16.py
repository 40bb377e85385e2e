"""What the round-16 fuzz tests share (tests/test_fuzz_round16*.py): seeded draws for ``quant.quantized_linear`` (the
one public op rounds 8-15 never fuzzed), its float64 reference, and the command-line runner.

Every case has its own generator, ``np.random.default_rng([SEED, group number, case index])``; a failure's message
starts with ``replay: seed=1600 group=... case=...`` and names the pytest node that reruns it alone (round 13's
``Replay``, with this round's seed).
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from _fuzz_round13 import Replay as _Replay13
from _fuzz_round13 import pick

SEED = 1600
GROUPS = ("qlinear", "compile", "cli")
SIZES = (0, 1, 2, 3, 5, 17, 33)
# every TRITON_EVERY-th case runs on the Triton interpreter (slower: small sizes), the others on the reference
TRITON_EVERY = 4
FP8_MAX = 448.0           # float8_e4m3fn's largest finite value: the saturating cast's bound

__all__ = ["FP8_MAX", "GROUPS", "SEED", "SIZES", "TRITON_EVERY", "Replay", "flat", "layout", "pick",
           "qlinear_reference", "rng_for"]


def rng_for(group: str, index: int) -> np.random.Generator:
    return np.random.default_rng([SEED, GROUPS.index(group), index])


class Replay(_Replay13):
    """``replay: seed=1600 group=qlinear case=7 backend=reference ... (.venv/bin/python -m pytest '<node>' ...)``."""

    seed, every = SEED, TRITON_EVERY


LAYOUTS = ("contiguous", "transposed", "offset", "stepped", "expanded")


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t`` (2-D or 1-D) with the same values laid out as ``kind`` says: ``transposed`` (columns first), ``offset``
    (a view into a larger NaN buffer, 3 elements in; 0 for ints), ``stepped`` (every other element of such a buffer
    along the last dim), ``expanded`` (stride 0 along the first dim: its first row repeated, so the values change)."""
    if t.numel() == 0 or kind == "contiguous":
        return t.contiguous()
    if kind == "transposed":
        return t.t().contiguous().t() if t.dim() == 2 else t.contiguous()
    fill = math.nan if t.dtype.is_floating_point else 0      # (int8 weights: 0 around them)
    if kind == "offset":
        buf = torch.full((t.numel() + 3,), fill, dtype=t.dtype)
        buf[3:] = t.reshape(-1)
        return buf[3:].view(t.shape)
    if kind == "stepped":
        buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), fill, dtype=t.dtype)
        buf[..., ::2] = t
        return buf[..., ::2]
    if kind == "expanded":
        return t[:1].expand(t.shape)
    raise ValueError(kind)


def qlinear_reference(x, q, scale, bias, residual, activation, x_scale=None) -> torch.Tensor:
    """float64 ``activation(xq @ (q * scale[:, None]).T + bias) + residual``; xq is x, or with ``x_scale``: x times
    the f32 inverse of x_scale, saturated to +-448, rounded to float8_e4m3fn, times x_scale (the activations the fp8
    GEMM multiplies)."""
    from tilestack.kernels.gemm import torch_activation

    x64 = x.double() if x.dtype != torch.float8_e4m3fn else x.float().double()
    if x_scale is not None and x.dtype != torch.float8_e4m3fn:     # as the kernels: times the f32 inverse, in f32
        inv = torch.tensor(1.0 / x_scale, dtype=torch.float32)
        x64 = (x.float() * inv).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).double()
    if x_scale is not None:
        x64 = x64 * x_scale
    y = x64 @ (q.float().double() * scale.double()[:, None]).t()
    if bias is not None:
        y = y + bias.double()
    y = torch_activation(y, activation)
    return y if residual is None else y + residual.double()


def flat(text: str) -> str:
    """``text`` without rich's box characters and white space (rich wraps and folds long words mid-word)."""
    return "".join(re.sub("[\u2500-\u257f]", "", text).split())
