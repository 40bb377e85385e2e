"""Row softmax of a 2-D tensor, any width. A row that fits one tile (``ONE_TILE``) is read once and written once;
a wider one takes a pass for the running max and sum (online softmax), then a pass to write.

    y = tilestack.kernels.softmax(x)       # softmax over the last dim, x's dtype, f32 arithmetic
"""

from __future__ import annotations

import math
import numbers

import numpy as np

import tilestack.lang as ts
from tilestack.errors import LaunchError
from tilestack.kernels._checks import (
    check_out_memory,
    check_same_device,
    check_tensor,
    next_pow2,
    nothing_to_launch,
)
from tilestack.kernels._plan import forward_only, planned
from tilestack.tune.lookup import launch_config

LOG2E = math.log2(math.e)
LOWEST_F32 = -3.4028234663852886e38   # the lowest finite f32: the running max of a row that has seen only -inf


@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),), options=dict(num_warps=4, num_stages=1))
def softmax_kernel(X, Y, *,
                   BM: int = ts.tunable(4, (1, 2, 4, 8, 16)),
                   BN: int = ts.tunable(1024, (128, 256, 512, 1024, 2048, 4096, 8192, 16384)),
                   ONE_TILE: bool = False):
    # ONE_TILE: the row is read once into one (BM, BN) tile; it needs BN >= the row width, which the public
    # function checks (the kernel cannot: the width is known only at run time)
    i = ts.block_id(0)
    N = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    if ONE_TILE:                                 # the whole row in registers: one read, one write
        m1 = ts.RegVec[ts.f32, BM]()
        l1 = ts.RegVec[ts.f32, BM]()
        y1 = ts.RegTile[Y.dtype, BM, BN]()
        ts.load(x, X, at=(i, 0))                 # (BM, BN)
        ts.right_fill(x, x, N, -math.inf)
        ts.row_max(m1, x)
        ts.sub_row(x, x, m1)                     # x - max <= 0 before the scale: x * log2e overflows past 2.4e38
        ts.mul(x, x, LOG2E)
        ts.exp2(x, x)
        ts.row_sum(l1, x)
        ts.div_row(x, x, l1)
        ts.copy(y1, x)
        ts.store(Y, y1, at=(i, 0))
        return
    m = ts.RegVec[ts.f32, BM]()
    m_new = ts.RegVec[ts.f32, BM]()
    alpha = ts.RegVec[ts.f32, BM]()
    l = ts.RegVec[ts.f32, BM]()
    # m starts at the lowest finite f32, not -inf: a tile of -inf alone (a row masked over its first BN columns)
    # then keeps m finite, so its rescale exp2(m - m_new) is 1 and its terms exp2(-inf - m) are 0, where
    # exp2(-inf + inf) was NaN and made the whole row NaN; a row of -inf alone still ends 0 / 0 = NaN, as torch's
    ts.fill(m, LOWEST_F32)
    ts.zero(l)
    # m is the running max of x itself (not of x*log2e, which overflows f32 for |x| > 2.4e38); differences
    # from it are <= 0 and are scaled to the log2 domain only then
    for j in ts.range(ts.cdiv(N, BN)):          # pass 1: running max m and sum l of exp2((x - m)*log2e)
        ts.load(x, X, at=(i, j))                 # (BM, BN)
        ts.right_fill(x, x, N - j * BN, -math.inf)
        ts.row_max(m_new, x, m)
        ts.sub(alpha, m, m_new)
        ts.mul(alpha, alpha, LOG2E)
        ts.exp2(alpha, alpha)
        ts.mul(l, l, alpha)
        ts.sub_row(x, x, m_new)
        ts.mul(x, x, LOG2E)
        ts.exp2(x, x)
        ts.row_sum(l, x, l)
        ts.copy(m, m_new)
    y = ts.RegTile[Y.dtype, BM, BN]()
    for j in ts.range(ts.cdiv(N, BN)):          # pass 2: y = exp2((x - m)*log2e) / l
        ts.load(x, X, at=(i, j))
        ts.sub_row(x, x, m)
        ts.mul(x, x, LOG2E)
        ts.exp2(x, x)
        ts.div_row(x, x, l)
        ts.copy(y, x)
        ts.store(Y, y, at=(i, j))


def reference(x):
    import torch

    return torch.softmax(x.float(), dim=-1).to(x.dtype)


@planned
@forward_only("softmax")     # no backward: a backward through it raises, naming it
def softmax(x, *, out=None, backend: str | None = None, **config):
    """Softmax over the last dim of a 2-D f32/bf16/f16 tensor.

    ``out`` (optional) must not share memory with x nor require grad. Empty tensors launch nothing; meta
    tensors give a meta result of the right shape. Planned once per launch signature (``kernels._plan``)."""
    import torch

    check_tensor("softmax", "x", x, rank=2, dtypes=(torch.float32, torch.bfloat16, torch.float16))
    if out is not None:
        check_tensor("softmax", "out", out, rank=2, dtypes=(x.dtype,))
        if out.shape != x.shape:
            raise LaunchError(f"softmax: out is {tuple(out.shape)}; expected x's shape {tuple(x.shape)}")
    check_same_device("softmax", x=x, out=out)

    def output(x, out):
        if out is None:
            return torch.empty_like(x)
        check_out_memory("softmax", out, x=x)
        return out

    cfg = resolve_row_config("softmax", x.shape[1], x.device.type, config, x=x)
    y = output(x, out)
    if nothing_to_launch(y):
        return lambda x, *, out=None, **_: output(x, out)
    launch = softmax_kernel.launcher_for((x, y), backend, **cfg)

    def run(x, *, out=None, **_):
        y = output(x, out)
        launch((x, y))
        return y
    return run


def resolve_row_config(fn: str, n: int, device_type: str, config: dict, x=None) -> dict:
    """The automatic row config (tuned for ``fn`` on ``x``'s dtype and device, if given) with the caller's choices
    on top; ``ONE_TILE`` follows the final BN (a tile narrower than the row cannot hold it whole), and asking for
    it with too narrow a tile is an error."""
    auto = row_config(n, device_type)
    if x is not None:
        auto = launch_config(fn, str(x.dtype).removeprefix("torch."), x.device, n, auto)
    # the types first: BN is compared with the row width below (BN=None or '64' failed there with a bare
    # TypeError), and ONE_TILE='yes' was taken as True
    bn = config.get("BN", 0)
    if isinstance(bn, bool) or not isinstance(bn, numbers.Real):     # (64.0 passes on: the kernel takes it as 64)
        raise LaunchError(f"{fn}: BN={bn!r} ({type(bn).__name__}); expected an int, a power of two")
    if not isinstance(config.get("ONE_TILE", False), bool | np.bool_):
        raise LaunchError(f"{fn}: ONE_TILE={config['ONE_TILE']!r} ({type(config['ONE_TILE']).__name__}); "
                          "expected a bool")
    if config.get("ONE_TILE"):
        bn = config.get("BN", auto.get("BN", 0))
        if bn < n:
            raise LaunchError(f"{fn}: ONE_TILE=True needs BN >= the row width {n}; got BN={bn}")
    cfg = auto | config
    if "ONE_TILE" not in config:
        cfg["ONE_TILE"] = cfg.get("BN", 0) >= n and cfg.get("ONE_TILE", False)
    return cfg


MAX_ONE_TILE = 16384   # widest row kept whole in registers (f32: 64 KB a row over the program's threads)


def row_config(n: int, device_type: str) -> dict:
    """Launch config for rows of width ``n``: the whole row in one tile where it fits (GPU)."""
    if device_type != "cuda":
        return {}
    width = next_pow2(n)
    if width <= MAX_ONE_TILE:
        return dict(BM=1, BN=max(width, 128), ONE_TILE=True, num_warps=min(16, max(4, width // 1024)))
    return dict(BM=1, BN=4096, num_warps=8)
