"""What the round-15 fuzz tests share (tests/test_fuzz_round15*.py): seeded case draws for the non-attention ops
(the four norms, softmax, SwiGLU, rotary, the fused linear + cross-entropy, gemm with epilogues, and the kernel
functions behind them: the norms' backward, ``swiglu``/``swiglu_backward``/``rotary`` into given outputs), and
seeded *bad* calls made by mutating one argument of a good call.

What rounds 8, 12, 13 and 14 drew is left to them (their value styles, tile-edge sizes, upstream-gradient layouts,
masked attention). This round draws:
- sizes from ``RAGGED`` (1, 3, 17, 1000, 4097: one, odd, prime, past a tile, one past a power of two), 0 now and
  then, inputs of rank 1 (no leading dims) to 4;
- values at the edges of a dtype: rows at 1e4 in f16 (their squares and products leave f16's range), rows of
  -1e30 / finfo.min / finfo.max / -inf / +inf for softmax, rows of -1e30 (f32) under the cross-entropy, rows whose
  label is ignore_index and batches where every label is;
- eps from 1e-12 to 1e39 and inf (past f32: the kernels' f32 eps is inf, y = 0 as torch's) and 0 on rows with a spread;
- outputs given as ``out=``-style buffers poisoned with NaN (views of a larger NaN buffer: written everywhere
  inside, nowhere outside), and the in-place forms the kernels allow (q_out is q, out is a, da is a);
- the bad calls: a tensor argument replaced by another dtype (an int, bool, float64), a rank more or less, a size
  off by one, the meta device, a list or None; each must raise a tilestack error naming that argument before any
  work (a given output left as poisoned).

Every case has its own generator, ``np.random.default_rng([SEED, group number, case index])``; a failure's message
starts with ``replay: seed=1500 group=... case=...`` and names the pytest node that reruns it alone.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from _fuzz_round13 import DTYPES, TOL, U32, pick
from _fuzz_round13 import Replay as _Replay13

SEED = 1500
GROUPS = ("norm", "softmax", "swiglu", "rotary", "cross_entropy", "gemm", "norm_backward", "bad")
RAGGED = (1, 3, 17, 1000, 4097)
SMALL = (1, 2, 3, 5, 7, 17, 33)
# every TRITON_EVERY-th case runs on the Triton interpreter (slower: small sizes), the others on the reference
TRITON_EVERY = 5
EPS = (1e-12, 1e-6, 1e-5, 0.1, 1.0, 1e39, math.inf)

__all__ = ["DTYPES", "EPS", "GROUPS", "RAGGED", "SEED", "SMALL", "TOL", "TRITON_EVERY", "U32", "Replay",
           "backend_for", "budget_rows", "edge_rows", "leading_dims", "pick", "ragged", "rng_for", "seeded"]


def rng_for(group: str, index: int) -> np.random.Generator:
    return np.random.default_rng([SEED, GROUPS.index(group), index])


def backend_for(index: int, every: int = TRITON_EVERY) -> str:
    return "triton" if index % every == every - 1 else "reference"


class Replay(_Replay13):
    """``replay: seed=1500 group=norm case=17 backend=reference ... (.venv/bin/python -m pytest '<node>' ...)``: the
    line that reruns one case, and what was drawn for it, on every failure (round 13's, with this round's seed and
    share of Triton cases)."""

    seed, every = SEED, TRITON_EVERY

    @property
    def triton(self) -> bool:
        return self.fields["backend"] == "triton"


def ragged(rng, *, zero: float = 0.05, cap: int | None = None) -> int:
    """A size from RAGGED (now and then SMALL), 0 with probability ``zero``; at most ``cap``."""
    if rng.random() < zero:
        return 0
    n = int(pick(rng, RAGGED if rng.random() < 0.6 else SMALL))
    return n if cap is None or n <= cap else int(pick(rng, [s for s in SMALL if s <= cap] or [1]))


def leading_dims(rng, max_rank: int, rows: int) -> tuple[int, ...]:
    """0..max_rank leading dims (rank 1 inputs have none) of sizes 1, 2, 3, 5, 17, product <= ``rows``."""
    dims = [int(pick(rng, (1, 2, 3, 5, 17))) for _ in range(int(rng.integers(0, max_rank + 1)))]
    while math.prod(dims) > max(1, rows):
        dims[dims.index(max(dims))] = max(1, dims[dims.index(max(dims))] // 2)
    return tuple(dims)


def budget_rows(rep: Replay, n: int, reference: int, triton: int) -> int:
    """How many rows of width n a case may have: ``reference`` / ``triton`` elements in all (the interpreter runs
    its programs one by one in Python)."""
    return max(1, (triton if rep.triton else reference) // max(n, 1))


def seeded(rng) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(1 << 30)))


EDGE_STYLES = ("normal", "normal", "big", "minus_huge_rows", "finfo_rows", "inf_rows")


def edge_rows(rng, shape, dtype, style: str) -> torch.Tensor:
    """float64 values of ``shape`` (rows along the last dim) in ``style``: N(0, 1); ``big``: scaled 1e4 (in f16 the
    squares and products of such values leave its range); ``minus_huge_rows``: some rows, or parts of rows, -1e30
    (f16 rounds it to -inf; bf16 and f32 hold it); ``finfo_rows``: rows of the dtype's lowest or
    largest value, or one such element in a row; ``inf_rows``: -inf entries, a row all -inf, a +inf."""
    g = seeded(rng)
    v = torch.randn(shape, generator=g, dtype=torch.float64)
    if v.numel() == 0 or style == "normal":
        return v
    if style == "big":
        return v * 1e4
    rows = v.view(-1, shape[-1])
    m, n = rows.shape
    chosen = [int(r) for r in rng.choice(m, size=max(1, m // 3), replace=False)]
    fin = torch.finfo(dtype)
    for r in chosen:
        kind = int(rng.integers(3))
        cols = slice(None) if kind == 0 else (slice(0, max(1, n // 2)) if kind == 1 else int(rng.integers(n)))
        if style == "minus_huge_rows":
            rows[r, cols] = -1e30
        elif style == "finfo_rows":
            rows[r, cols] = pick(rng, (fin.min, fin.max))
        else:
            rows[r, cols] = pick(rng, (-math.inf, -math.inf, math.inf))
    return v
