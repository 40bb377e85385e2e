"""GEMM: C = A @ B with bf16/f16 inputs and f32 accumulation, written in the tile language.

    c = tilestack.kernels.gemm(a, b)               # (M, K) @ (K, N) -> (M, N), a's dtype
    gemm_kernel.trace(a, b, c).source()            # the generated Triton

Programs walk the output in groups of GROUP_M block-rows so that neighbouring programs share A and B
tiles in L2.
"""

from __future__ import annotations

import tilestack.lang as ts
from tilestack.errors import LaunchError
from tilestack.kernels._checks import check_out_memory, check_same_device, check_tensor, nothing_to_launch
from tilestack.kernels._plan import planned
from tilestack.tune.lookup import launch_config


def _grid(A, B, BM, BN):
    return (ts.cdiv(A.shape[0], BM) * ts.cdiv(B.shape[1], BN),)


def grouped_tile(M, N, BM: int, BN: int, GROUP_M: int):
    """(i, j) of this program's output tile in grouped order: GROUP_M row tiles share their column tiles in
    turn, so the operands they read stay in L2. Shared by every GEMM-shaped kernel (a 1-D grid)."""
    pid = ts.block_id(0)
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
    M, K = A.shape
    N = B.shape[1]
    i, j = grouped_tile(M, N, BM, BN, GROUP_M)

    acc = ts.RegTile[ts.f32, BM, BN]()
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    c = ts.RegTile[C.dtype, BM, BN]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(K, BK)):
        ts.load(a, A, at=(i, k))         # (BM, BK)
        ts.load(b, B, at=(k, j))         # (BK, BN)
        ts.mma_AB(acc, a, b, acc)
    ts.copy(c, acc)
    ts.store(C, c, at=(i, j))


def reference(a, b):
    """Plain PyTorch: the product in f32, returned in a's dtype."""
    return (a.float() @ b.float()).to(a.dtype)


@planned
def gemm(a, b, *, out=None, backend: str | None = None, **config):
    """C = A @ B for 2-D bf16/f16 tensors of any size, accumulated in f32.

    ``out`` (optional) must not share memory with a or b nor require grad. Empty problems launch nothing
    (K = 0 gives zeros); meta tensors give a meta result of the right shape. Checks, config and launcher are
    planned once per launch signature (``kernels._plan``); only ``out``'s memory is checked on every call."""
    import torch

    check_tensor("gemm", "a", a, rank=2, dtypes=(torch.bfloat16, torch.float16))
    check_tensor("gemm", "b", b, rank=2, dtypes=(a.dtype,))
    if a.shape[1] != b.shape[0]:
        raise LaunchError(f"gemm: a is {tuple(a.shape)} and b is {tuple(b.shape)}; a.shape[1] must equal "
                          "b.shape[0]")
    shape = (a.shape[0], b.shape[1])
    if out is not None:
        check_tensor("gemm", "out", out, rank=2, dtypes=(a.dtype,))
        if tuple(out.shape) != shape:
            raise LaunchError(f"gemm: out is {tuple(out.shape)}; expected (a.shape[0], b.shape[1]) = {shape}")
    check_same_device("gemm", a=a, b=b, out=out)

    def output(a, b, out):
        if out is None:
            return torch.empty(shape, dtype=a.dtype, device=a.device)
        check_out_memory("gemm", out, a=a, b=b)
        return out

    if nothing_to_launch(output(a, b, out), a):
        # (M, 0) @ (0, N) is a sum of nothing: zeros
        return lambda a, b, *, out=None, **_: (output(a, b, out).zero_() if a.shape[1] == 0
                                                else output(a, b, out))
    cfg = gemm_config(a.shape[0], b.shape[1], a.shape[1], a.dtype, a.device) | config
    launch = gemm_kernel.launcher_for((a, b, output(a, b, out)), backend, **cfg)

    def run(a, b, *, out=None, **_):
        c = output(a, b, out)
        launch((a, b, c))
        return c
    return run


def gemm_config(m: int, n: int, k: int, dtype, device) -> dict:
    """The tuned config for this size (tilestack.tune's tables, by the largest dimension), else the default."""
    sig = str(dtype).removeprefix("torch.")
    return launch_config("gemm", sig, device, max(m, n, k), {})
