"""Attention backward in the tile language: FlashAttention-2's three-kernel split.

    dq, dk, dv = attention_backward(q, k, v, o, lse, do, causal=False, scale=None)

1. ``attention_bwd_delta_kernel``: delta = rowsum(dO * O), one f32 per query row.
2. ``attention_bwd_dkdv_kernel``: one program per (key block, batch * K/V head); it loops over the query
   heads that share this K/V head (GQA) and over query blocks, rebuilding P from the saved log-sum-exp:
       dV += P^T dO,   dK += dS^T Q,   dS = P * (dO V^T - delta)
3. ``attention_bwd_dq_kernel``: one program per (query block, batch * head), looping over key blocks:
       dQ += dS K
Causal blocks on the diagonal are masked in a loop of their own, as in the forward. Ragged edges need no
mask: rows past the end load as zero, and zero dO, V or K rows contribute nothing to what is stored.
"""

from __future__ import annotations

import math

import tilestack.lang as ts
from tilestack.errors import LaunchError
from tilestack.kernels.attention_fwd import LOG2E, check_attention_args
from tilestack.tune.lookup import launch_config


@ts.kernel(grid=lambda O, BM: (ts.cdiv(O.shape[2], BM), O.shape[0] * O.shape[1]))
def attention_bwd_delta_kernel(O, dO, Delta, *, D: int,
                               BM: int = ts.tunable(64, (16, 32, 64, 128)),
                               num_warps: int = ts.tunable(4, (4, 8)),
                               num_stages: int = ts.tunable(1, (1, 2))):
    i, bh = ts.block_id(0), ts.block_id(1)
    H = O.shape[1]
    b, h = bh // H, bh % H
    o = ts.RegTile[ts.f32, BM, D]()
    do = ts.RegTile[ts.f32, BM, D]()
    delta = ts.RegVec[ts.f32, BM]()
    ts.load(o, O, at=(b, h, i, 0))
    ts.load(do, dO, at=(b, h, i, 0))
    ts.mul(o, o, do)
    ts.row_sum(delta, o)
    ts.store(Delta, delta, at=(b, h, i))


def _probabilities(s, q, k, lse, qk_scale, *, masked: bool, diagonal):
    """s = P = exp2(q k^T * qk_scale - lse) for one (query block, key block) pair, exactly as the forward
    normalised it; ``diagonal`` (= i*BM - j*BN) masks the causal diagonal when ``masked``."""
    ts.zero(s)
    ts.mma_ABt(s, q, k, s)                       # (BM, BN) = q @ k.T
    ts.mul(s, s, qk_scale)
    if masked:
        ts.make_causal(s, s, diagonal)
    ts.sub_row(s, s, lse)                        # lse in the log2 domain
    ts.exp2(s, s)


def _score_grad(ds, dp, p, do, v, delta):
    """ds = dS = P * (dO V^T - delta), in the input dtype for the matrix unit (dp is f32 scratch)."""
    ts.zero(dp)
    ts.mma_ABt(dp, do, v, dp)                    # (BM, BN) = dO @ V^T
    ts.sub_row(dp, dp, delta)
    ts.mul(dp, dp, p)
    ts.copy(ds, dp)


def _dkdv_block(i, h, *, b, q, do, lse, delta, k, v, s, dp, p, ds, dk, dv, Q, dO, LSE, Delta, qk_scale,
                masked: bool, j, BM: int, BN: int):
    """Query block i of query head h against this program's key block j."""
    ts.load(q, Q, at=(b, h, i, 0))               # (BM, D)
    ts.load(do, dO, at=(b, h, i, 0))             # (BM, D)
    ts.load(lse, LSE, at=(b, h, i))              # (BM,) natural log
    ts.load(delta, Delta, at=(b, h, i))          # (BM,)
    ts.mul(lse, lse, LOG2E)
    _probabilities(s, q, k, lse, qk_scale, masked=masked, diagonal=i * BM - j * BN)
    ts.copy(p, s)
    ts.mma_AtB(dv, p, do, dv)                    # (BN, D) += P^T dO
    _score_grad(ds, dp, s, do, v, delta)
    ts.mma_AtB(dk, ds, q, dk)                    # (BN, D) += dS^T Q


def _grid_kv(K, BN):
    return (ts.cdiv(K.shape[2], BN), K.shape[0] * K.shape[1])


@ts.kernel(grid=_grid_kv)
def attention_bwd_dkdv_kernel(Q, K, V, dO, LSE, Delta, dK, dV, scale: float, *,
                              D: int, causal: bool = False,
                              BM: int = ts.tunable(64, (16, 32, 64, 128)),
                              BN: int = ts.tunable(128, (16, 32, 64, 128)),
                              num_warps: int = ts.tunable(8, (4, 8)),
                              num_stages: int = ts.tunable(2, (1, 2, 3, 4))):
    j, bh = ts.block_id(0), ts.block_id(1)
    Hkv = K.shape[1]
    b, hk = bh // Hkv, bh % Hkv
    group = Q.shape[1] // Hkv                    # query heads per K/V head
    Nq = Q.shape[2]

    k = ts.SharedTile[K.dtype, BN, D]()
    v = ts.SharedTile[V.dtype, BN, D]()
    q = ts.SharedTile[Q.dtype, BM, D]()
    do = ts.SharedTile[dO.dtype, BM, D]()
    lse = ts.RegVec[ts.f32, BM]()
    delta = ts.RegVec[ts.f32, BM]()
    s = ts.RegTile[ts.f32, BM, BN]()
    dp = ts.RegTile[ts.f32, BM, BN]()
    p = ts.RegTile[Q.dtype, BM, BN]()
    ds = ts.RegTile[Q.dtype, BM, BN]()
    dk = ts.RegTile[ts.f32, BN, D]()
    dv = ts.RegTile[ts.f32, BN, D]()
    ts.load(k, K, at=(b, hk, j, 0))
    ts.load(v, V, at=(b, hk, j, 0))
    ts.zero(dk)
    ts.zero(dv)
    n_q_blocks = ts.cdiv(Nq, BM)
    if causal:   # query blocks that reach this key block's diagonal are masked; later ones see all of it
        first = ts.smin((j * BN) // BM, n_q_blocks)
        full = ts.smin(ts.cdiv((j + 1) * BN, BM), n_q_blocks)
    else:
        first = full = 0
    tiles = dict(b=b, q=q, do=do, lse=lse, delta=delta, k=k, v=v, s=s, dp=dp, p=p, ds=ds, dk=dk, dv=dv, Q=Q,
                 dO=dO, LSE=LSE, Delta=Delta, qk_scale=scale * LOG2E, j=j, BM=BM, BN=BN)
    for g in ts.range(group):
        h = hk * group + g
        for i in ts.range(first, full):
            _dkdv_block(i, h, masked=True, **tiles)
        for i in ts.range(full, n_q_blocks):
            _dkdv_block(i, h, masked=False, **tiles)
    ts.mul(dk, dk, scale)
    out_k = ts.RegTile[dK.dtype, BN, D]()
    out_v = ts.RegTile[dV.dtype, BN, D]()
    ts.copy(out_k, dk)
    ts.copy(out_v, dv)
    ts.store(dK, out_k, at=(b, hk, j, 0))
    ts.store(dV, out_v, at=(b, hk, j, 0))


def _dq_block(j, *, b, hk, q, do, lse, delta, k, v, s, dp, ds, dq, K, V, qk_scale, masked: bool, i,
              BM: int, BN: int):
    """This program's query block i against key block j."""
    ts.load(k, K, at=(b, hk, j, 0))              # (BN, D)
    ts.load(v, V, at=(b, hk, j, 0))              # (BN, D)
    _probabilities(s, q, k, lse, qk_scale, masked=masked, diagonal=i * BM - j * BN)
    _score_grad(ds, dp, s, do, v, delta)
    ts.mma_AB(dq, ds, k, dq)                     # (BM, D) += dS @ K


@ts.kernel(grid=lambda Q, BM: (ts.cdiv(Q.shape[2], BM), Q.shape[0] * Q.shape[1]))
def attention_bwd_dq_kernel(Q, K, V, dO, LSE, Delta, dQ, scale: float, *,
                            D: int, causal: bool = False,
                            BM: int = ts.tunable(128, (16, 32, 64, 128)),
                            BN: int = ts.tunable(64, (16, 32, 64, 128)),
                            num_warps: int = ts.tunable(8, (4, 8)),
                            num_stages: int = ts.tunable(2, (1, 2, 3, 4))):
    i, bh = ts.block_id(0), ts.block_id(1)
    H = Q.shape[1]
    b, h = bh // H, bh % H
    hk = h // (H // K.shape[1])
    Nk = K.shape[2]

    q = ts.SharedTile[Q.dtype, BM, D]()
    do = ts.SharedTile[dO.dtype, BM, D]()
    k = ts.SharedTile[K.dtype, BN, D]()
    v = ts.SharedTile[V.dtype, BN, D]()
    lse = ts.RegVec[ts.f32, BM]()
    delta = ts.RegVec[ts.f32, BM]()
    s = ts.RegTile[ts.f32, BM, BN]()
    dp = ts.RegTile[ts.f32, BM, BN]()
    ds = ts.RegTile[Q.dtype, BM, BN]()
    dq = ts.RegTile[ts.f32, BM, D]()
    ts.load(q, Q, at=(b, h, i, 0))
    ts.load(do, dO, at=(b, h, i, 0))
    ts.load(lse, LSE, at=(b, h, i))
    ts.load(delta, Delta, at=(b, h, i))
    ts.mul(lse, lse, LOG2E)
    ts.zero(dq)
    if causal:
        n_blocks = ts.smin(ts.cdiv((i + 1) * BM, BN), ts.cdiv(Nk, BN))
        n_full = ts.smin((i * BM) // BN, n_blocks)
    else:
        n_blocks = n_full = ts.cdiv(Nk, BN)
    tiles = dict(b=b, hk=hk, q=q, do=do, lse=lse, delta=delta, k=k, v=v, s=s, dp=dp, ds=ds, dq=dq, K=K, V=V,
                 qk_scale=scale * LOG2E, i=i, BM=BM, BN=BN)
    for j in ts.range(0, n_full):
        _dq_block(j, masked=False, **tiles)
    for j in ts.range(n_full, n_blocks):
        _dq_block(j, masked=True, **tiles)
    ts.mul(dq, dq, scale)
    out = ts.RegTile[dQ.dtype, BM, D]()
    ts.copy(out, dq)
    ts.store(dQ, out, at=(b, h, i, 0))


def _check_saved(q, o, lse, do) -> None:
    """The forward's output and log-sum-exp and the incoming gradient must match q."""
    import torch

    for name, t, shape, dtype in (("o", o, q.shape, q.dtype), ("do", do, q.shape, q.dtype),
                                  ("lse", lse, q.shape[:3], torch.float32)):
        if not isinstance(t, torch.Tensor):
            raise LaunchError(f"attention_backward: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != q.device:
            raise LaunchError(f"attention_backward: {name} is {tuple(t.shape)} {t.dtype} on {t.device}; expected "
                              f"{tuple(shape)} {dtype} on {q.device}")


def default_config(D: int, causal: bool, device_type: str) -> dict[str, dict]:
    """Per-kernel block shapes (tuned ones come from the tuner's cache)."""
    if device_type != "cuda":
        small = dict(num_warps=4, num_stages=1)
        return {"delta": dict(BM=16) | small, "dkdv": dict(BM=16, BN=16) | small, "dq": dict(BM=16, BN=16) | small}
    # the shapes tuning on the H100 picks most often (tune/tables/ has them per size)
    if D <= 64:
        return {"delta": dict(BM=64, num_warps=4, num_stages=1),
                "dkdv": dict(BM=64, BN=64, num_warps=4, num_stages=3),
                "dq": dict(BM=128, BN=64, num_warps=4, num_stages=3)}
    if D <= 128:
        return {"delta": dict(BM=64, num_warps=4, num_stages=1),
                "dkdv": dict(BM=64, BN=64, num_warps=4, num_stages=2),
                "dq": dict(BM=128, BN=64, num_warps=8, num_stages=3)}
    # D = 256: the f32 accumulators (dK, dV: BN x 256 each) must fit the registers of 8 warps
    return {"delta": dict(BM=32, num_warps=4, num_stages=1),
            "dkdv": dict(BM=32, BN=32, num_warps=8, num_stages=2),
            "dq": dict(BM=64, BN=32, num_warps=8, num_stages=2)}


def attention_backward(q, k, v, o, lse, do, causal: bool = False, scale: float | None = None, *,
                       backend: str | None = None, config: dict[str, dict] | None = None):
    """(dq, dk, dv) of attention, from the forward's output ``o`` and log-sum-exp ``lse``."""
    import torch

    check_attention_args("attention_backward", q, k, v, scale)
    B, H, Nq, D = q.shape
    _check_saved(q, o, lse, do)
    unknown = set(config or {}) - {"delta", "dkdv", "dq"}
    if unknown:
        raise LaunchError(f"attention_backward: config has {sorted(unknown)}; its kernels are delta, dkdv and dq")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    sig = f"{str(q.dtype).removeprefix('torch.')}-D{D}-{'causal' if causal else 'full'}"
    defaults = default_config(D, causal, q.device.type)
    cfg = {part: launch_config(f"attention_bwd_{part}", sig, q.device, Nq, c) for part, c in defaults.items()}
    for name, c in (config or {}).items():
        cfg[name] = cfg[name] | c
    do = do.contiguous()
    delta = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    attention_bwd_delta_kernel(o, do, delta, D=D, backend=backend, **cfg["delta"])
    attention_bwd_dkdv_kernel(q, k, v, do, lse, delta, dk, dv, scale, D=D, causal=bool(causal), backend=backend,
                              **cfg["dkdv"])
    attention_bwd_dq_kernel(q, k, v, do, lse, delta, dq, scale, D=D, causal=bool(causal), backend=backend,
                            **cfg["dq"])
    return dq, dk, dv
