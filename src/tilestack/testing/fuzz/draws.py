"""Random shapes, dtypes, value styles and layouts for the fuzzer's problems (per device: ``PROFILES``)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Profile:
    """Size limits of a run: small on the CPU (interpreted kernels), large on a GPU."""
    gemm: int
    rows: int
    cols: int
    seq: int
    batch: int
    kv_heads: int


PROFILES = {"cpu": Profile(gemm=96, rows=24, cols=700, seq=80, batch=2, kv_heads=2),
            "cuda": Profile(gemm=1500, rows=400, cols=20000, seq=1100, batch=3, kv_heads=4)}
TILES = (16, 32, 64, 128)


def size(rng, hi: int, *, empty: float = 0.03) -> int:
    """1..hi, often next to a tile edge, sometimes 1 and with probability ``empty`` 0."""
    r = rng.random()
    if r < empty:
        return 0
    if r < 0.12:
        return 1
    if r < 0.45:
        tile = int(rng.choice(TILES))
        n = tile * int(rng.integers(1, max(2, hi // tile + 1))) + int(rng.integers(-1, 2))
        return int(min(max(n, 1), hi))
    return int(rng.integers(1, hi + 1))


def log_uniform(rng, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def tensor(rng, shape, dtype, device, *, scale: float = 1.0, loc: float = 0.0):
    """Normal(loc, scale) values rounded to ``dtype``, clipped to its finite range."""
    import torch

    big = torch.finfo(dtype).max
    x = np.clip(loc + scale * rng.standard_normal(shape), -big, big)
    return torch.from_numpy(x).to(device=device, dtype=dtype)


def strided(rng, t, *, transpose_ok: bool = True):
    """``t``'s values in a non-contiguous layout (a transposed copy or a slice of a wider parent), or ``t``."""
    import torch

    r = rng.random()
    if r < 0.7 or t.dim() != 2 or t.numel() == 0:
        return t
    if r < 0.85 and transpose_ok:
        return t.t().contiguous().t()                      # column-major
    parent = torch.zeros(t.shape[0], t.shape[1] + int(rng.integers(1, 9)), dtype=t.dtype, device=t.device)
    view = parent[:, : t.shape[1]]
    view.copy_(t)
    return view                                            # row stride > width


def poisoned_out(rng, shape, dtype, device):
    """None (the library allocates), or a NaN-filled out: contiguous, column-major or a slice of a parent."""
    import torch

    r = rng.random()
    if r < 0.4:
        return None
    if r < 0.8 or len(shape) != 2 or 0 in shape:
        return torch.full(shape, math.nan, dtype=dtype, device=device)
    if r < 0.9:
        return torch.full(shape[::-1], math.nan, dtype=dtype, device=device).t()
    return torch.full((shape[0], shape[1] + 3), math.nan, dtype=dtype, device=device)[:, 1: 1 + shape[1]]


def _reduction_steps(n: int) -> float:
    """How many f32 roundings a sum of n terms takes, in the worst order a kernel may use (tiles of 16 summed
    in a tree, then one after another) with a margin: the growth factor of the accumulation bound."""
    return 4.0 * (math.log2(n + 1) + 2.0) + n / 8.0
