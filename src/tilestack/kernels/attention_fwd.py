"""Attention forward with online softmax, in the tile language: FlashAttention's algorithm.

    o, lse = attention_forward(q, k, v, causal=False, scale=None)   # q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D)

One program per (query block, batch*head). Keys are visited in two loops: blocks that need no mask (fully
inside the sequence and, when causal, fully at or below the diagonal), then the few that do (the ragged
end of the keys, the causal diagonal), so the common case pays for no masking. Scores live in the log2
domain (the softmax scale is folded with log2(e)) so the exponentials are exp2.
Causal means query r sees keys c <= r (top-left aligned, as torch's scaled_dot_product_attention).
GQA/MQA: query head h reads key/value head h // (H // Hkv).
The log-sum-exp (natural log, per query row, f32) is saved for the backward.
"""

from __future__ import annotations

import math
import numbers

import tilestack.lang as ts
from tilestack.tune.lookup import launch_config

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def _grid(Q, BM):
    return (ts.cdiv(Q.shape[2], BM), Q.shape[0] * Q.shape[1])


def _attend_block(j, q, k, v, s, p, o, m, m_new, alpha, l, K, V, b, hk, qk_scale, *, masked: bool,
                  causal: bool, i, BM: int, BN: int):
    """One key block j: s = q k^T, online-softmax update of (m, l), o += p v."""
    ts.load(k, K, at=(b, hk, j, 0))              # (BN, D)
    ts.load(v, V, at=(b, hk, j, 0))              # (BN, D)
    ts.zero(s)
    ts.mma_ABt(s, q, k, s)                       # (BM, BN) = q @ k.T
    if masked:
        ts.right_fill(s, s, K.shape[2] - j * BN, -math.inf)      # keys past the end
        if causal:
            ts.make_causal(s, s, i * BM - j * BN)                 # keys after the query
    ts.row_max(m_new, s)                         # max of the raw scores, then scaled (the scale is > 0),
    ts.mul(m_new, m_new, qk_scale)               # so that s * qk_scale - m_new below is one FMA
    ts.max(m_new, m_new, m)
    ts.mul(s, s, qk_scale)                       # log2 domain
    ts.sub(alpha, m, m_new)
    ts.exp2(alpha, alpha)                        # rescale of what was summed so far
    ts.sub_row(s, s, m_new)
    ts.exp2(s, s)
    ts.mul(l, l, alpha)
    ts.row_sum(l, s, l)
    ts.mul_row(o, o, alpha)
    ts.copy(p, s)                                # to the input dtype for the matrix unit
    ts.mma_AB(o, p, v, o)                        # (BM, D) += (BM, BN) @ (BN, D)
    ts.copy(m, m_new)


@ts.kernel(grid=_grid)
def attention_fwd_kernel(Q, K, V, O, LSE, scale: float, *,
                         D: int, causal: bool = False,
                         BM: int = ts.tunable(128, (16, 32, 64, 128)),
                         BN: int = ts.tunable(64, (16, 32, 64, 128)),
                         num_warps: int = ts.tunable(8, (4, 8)),
                         num_stages: int = ts.tunable(3, (1, 2, 3, 4))):
    i = ts.block_id(0)
    bh = ts.block_id(1)
    H = Q.shape[1]
    Nk = K.shape[2]
    b, h = bh // H, bh % H
    hk = h // (H // K.shape[1])                  # GQA: the key/value head of query head h

    q = ts.SharedTile[Q.dtype, BM, D]()
    k = ts.SharedTile[K.dtype, BN, D]()
    v = ts.SharedTile[V.dtype, BN, D]()
    s = ts.RegTile[ts.f32, BM, BN]()
    p = ts.RegTile[Q.dtype, BM, BN]()
    o = ts.RegTile[ts.f32, BM, D]()
    m = ts.RegVec[ts.f32, BM]()
    m_new = ts.RegVec[ts.f32, BM]()
    alpha = ts.RegVec[ts.f32, BM]()
    l = ts.RegVec[ts.f32, BM]()
    ts.load(q, Q, at=(b, h, i, 0))               # (BM, D)
    ts.zero(o)
    ts.neg_infty(m)
    ts.zero(l)
    qk_scale = scale * LOG2E

    if causal:
        n_blocks = ts.smin(ts.cdiv((i + 1) * BM, BN), ts.cdiv(Nk, BN))
        n_full = ts.smin((i * BM) // BN, Nk // BN)
    else:
        n_blocks = ts.cdiv(Nk, BN)
        n_full = Nk // BN
    tiles = dict(q=q, k=k, v=v, s=s, p=p, o=o, m=m, m_new=m_new, alpha=alpha, l=l, K=K, V=V, b=b, hk=hk,
                 qk_scale=qk_scale, causal=causal, i=i, BM=BM, BN=BN)
    for j in ts.range(0, n_full):
        _attend_block(j, masked=False, **tiles)
    for j in ts.range(n_full, n_blocks):
        _attend_block(j, masked=True, **tiles)

    out = ts.RegTile[O.dtype, BM, D]()
    ts.div_row(o, o, l)
    ts.copy(out, o)
    ts.store(O, out, at=(b, h, i, 0))
    lse = ts.RegVec[ts.f32, BM]()                # natural-log LSE = (m + log2 l) * ln 2
    ts.log2(lse, l)
    ts.add(lse, lse, m)
    ts.mul(lse, lse, LN2)
    ts.store(LSE, lse, at=(b, h, i))


def reference(q, k, v, causal: bool = False, scale: float | None = None):
    """float64 PyTorch attention with the same conventions (GQA by repeating K/V heads)."""
    import torch

    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    if causal:
        nq, nk = q.shape[2], k.shape[2]
        keep = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.softmax(s, dim=-1) @ vv, lse


SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


def check_attention_args(fn: str, q, k, v, scale) -> None:
    """Every check on attention inputs, before any work (shared by forward, backward and the torch op)."""
    import torch

    from tilestack.errors import LaunchError
    from tilestack.kernels._checks import check_same_device, check_tensor

    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(fn, name, t, rank=4, dtypes=(torch.bfloat16, torch.float16))
    check_same_device(fn, q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise LaunchError(f"{fn}: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, _, D = q.shape
    if k.shape != v.shape:
        raise LaunchError(f"{fn}: k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise LaunchError(f"{fn}: k is {tuple(k.shape)}; expected (B={B}, Hkv, Nk, D={D}) to match q "
                          f"{tuple(q.shape)}")
    if k.shape[1] == 0 or H % k.shape[1]:
        raise LaunchError(f"{fn}: q has H={H} heads and k/v have {k.shape[1]}; H must be a multiple of the "
                          "K/V heads (GQA/MQA)")
    if D not in SUPPORTED_HEAD_DIMS:
        raise LaunchError(f"{fn}: head dim D={D} is not supported; expected one of {SUPPORTED_HEAD_DIMS}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(scale) or scale <= 0):
        raise LaunchError(f"{fn}: scale must be a positive number or None, got {scale!r} (finite, not a bool)")


def default_config(D: int, causal: bool, device_type: str) -> dict:
    """Block shapes for a launch: large tiles on a GPU (tuned configs come from tilestack.tune), small ones for
    the CPU executors, which are slow per element but not per tile."""
    if device_type != "cuda":
        return dict(BM=16, BN=16, num_warps=4, num_stages=1)
    if D <= 64:
        return dict(BM=128, BN=64, num_warps=4, num_stages=3)
    if D <= 128:
        return dict(BM=128, BN=64, num_warps=8, num_stages=3)
    return dict(BM=64, BN=32, num_warps=8, num_stages=2)


def attention_forward(q, k, v, causal: bool = False, scale: float | None = None, *,
                      backend: str | None = None, **config):
    """(o, lse): o (B, H, Nq, D) in q's dtype; lse (B, H, Nq) f32, natural log."""
    import torch

    check_attention_args("attention_forward", q, k, v, scale)
    B, H, Nq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    o = torch.empty_like(q)
    lse = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    sig = f"{str(q.dtype).removeprefix('torch.')}-D{D}-{'causal' if causal else 'full'}"
    cfg = launch_config("attention_fwd", sig, q.device, Nq, default_config(D, causal, q.device.type)) | config
    attention_fwd_kernel(q, k, v, o, lse, scale, D=D, causal=bool(causal), backend=backend, **cfg)
    return o, lse
