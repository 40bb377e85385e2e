"""Attention forward as FlashAttention-3 schedules it on Hopper, in the language's explicit-hardware ops.

    o, lse = attention_forward(q, k, v, causal=True, backend="gluon", schedule="pingpong")

The same meaning as ``attention_fwd_kernel`` (GQA, head dims up to 256 as power-of-two tiles, Dv != D, ragged
lengths, top-left and bottom-right causal, the natural-log LSE; no bias, no dropout), scheduled by hand:

- a producer warpgroup (4 warps, 32 registers) streams K one block ahead and V into rings of ``STAGES`` shared
  buffers with the copy engine (``async_load``);
- two consumer warpgroups (4 warps, 240 registers each) own BM / 2 query rows each, Q in shared memory;
- each trip of a consumer: the scores of block j (issued the trip before) through the online softmax, then P_j V_j
  and the scores of block j + 1 issued together, in turn with the other consumer (``ts.turn``: FlashAttention-3's
  ping-pong, so one consumer's products run on the matrix units while the other does its softmax), and waited
  within the trip (a wgmma left in flight across the loop's back edge makes ptxas serialize them all);
- two loops, as the plain kernel's: the key blocks every row of the program sees whole, unmasked, then the ragged
  end and the causal diagonal, masked (the turns balance in each).

On the Gluon backend the roles become ``gl.warp_specialize`` partitions and the turns named barriers; the Triton
backend drops roles and turns (a plain kernel, slower than ``attention_fwd_kernel``), the reference runs it in
program order. ``attention_forward`` launches it for ``schedule="pingpong"`` (a config key the tuning tables can
carry) on the Gluon backend when the launch has no bias, no dropout, 16-bit inputs and TMA-able tensors.
"""

from __future__ import annotations

import math

import tilestack.lang as ts
from tilestack.kernels import attention_fwd  # its HEAD_GROUP, read when a kernel is traced
from tilestack.kernels.attention_fwd import (
    EMPTY_ROW_SUM,
    LN2,
    LOG2E,
    LOWEST_F32,
    causal_diagonal,
    causal_shift,
    heavy_first,
    query_block_keys,
)

ROLES = ("consumer0", "consumer1")
CONSUMER = dict(warps=4, registers=240)
PRODUCER = dict(warps=4, registers=32)
SCHEDULES = ("plain", "pingpong")     # attention_forward's ``schedule`` config key
# attention_forward's config for it where no table chose it: key blocks of 128 measured fastest at head dims 64 and
# 128 (H100, docs/performance.md, session 18: 607 against 560 TFLOP/s at BN 64, head dim 128)
PINGPONG_DEFAULTS = dict(BM=128, BN=128, STAGES=2)


def _trip(j, q, acc, m, lsum, s_next, k_ring, v_ring, k_s, v_s, K, V, b, hk, i, Nk, qk_scale, *, masked: bool,
          causal: bool, shift, HALF: int, BN: int, STAGES: int):
    """Key block j: the producer's loads (block j + 1's keys, block j's values), then each consumer's softmax of
    S_j and its P_j V_j and S_{j+1} in turn. Blocks before ``n_full`` need no mask (the first loop)."""
    st, nx = j % STAGES, (j + 1) % STAGES
    with ts.partition("producer", **PRODUCER):
        ts.async_load(k_ring, nx, K, at=(b, hk, j + 1, 0))       # the next block's keys (past the end: zeros)
        ts.async_load(v_ring, st, V, at=(b, hk, j, 0))
    for g, role in enumerate(ROLES):
        with ts.partition(role, **CONSUMER):
            s = ts.RegTile[ts.f32, HALF, BN]()                   # S_j, raw
            ts.copy(s, s_next[g])
            if masked:
                ts.right_fill(s, s, Nk - j * BN, -math.inf)      # keys past the end
                if causal:
                    ts.make_causal(s, s, causal_diagonal(2 * i + g, j, HALF, BN, shift))
            m_new = ts.RegVec[ts.f32, HALF]()
            ts.row_max(m_new, s)                                 # the raw max, scaled (scale > 0): s * c - m_new
            ts.mul(m_new, m_new, qk_scale)                       # below is one FFMA an element
            ts.max(m_new, m_new, m[g])
            ts.mul(s, s, qk_scale)
            alpha = ts.RegVec[ts.f32, HALF]()
            ts.sub(alpha, m[g], m_new)
            ts.exp2(alpha, alpha)
            ts.sub_row(s, s, m_new)
            ts.exp2(s, s)
            ts.mul_row(acc[g], acc[g], alpha)
            ts.mul(lsum[g], lsum[g], alpha)
            ts.row_sum(lsum[g], s, lsum[g])
            p = ts.RegTile[V.dtype, HALF, BN]()
            ts.copy(p, s)
            ts.wait_load(v_s, v_ring, st)
            ts.wait_load(k_s, k_ring, nx)
            ts.zero(s_next[g])
            with ts.turn(*ROLES):                                # P_j V_j and S_{j+1}, in turn
                ts.mma_AB_async(acc[g], p, v_s, acc[g])
                ts.mma_ABt_async(s_next[g], q[g], k_s, s_next[g])
            ts.mma_wait(acc[g])
            ts.mma_wait(s_next[g])                               # nothing in flight past the trip
            ts.copy(m[g], m_new)


def _grid(Q, BM):
    return (ts.cdiv(Q.shape[2], BM), Q.shape[0] * Q.shape[1])


@ts.kernel(grid=_grid)
def attention_fwd_pingpong_kernel(Q, K, V, O, LSE, scale: float, *, D: int, DV: int | None = None,
                                  causal: bool = False, causal_align: str = "top_left",
                                  BM: int = ts.tunable(128, (32, 64, 128, 256)),
                                  BN: int = ts.tunable(128, (16, 32, 64, 128)),
                                  STAGES: int = ts.tunable(2, (2, 3, 4))):
    """Q: (B, H, Nq, *), K: (B, Hkv, Nk, *), V: (B, Hkv, Nk, *), O: (B, H, Nq, *), LSE: (B, H, Nq) f32; D and DV
    the tile widths of the q/k and v/o head dims (``head_tile``); BM query rows a program, BM / 2 a consumer."""
    DV = D if DV is None else DV
    i, bh = heavy_first(causal, last_heaviest=True, group=attention_fwd.HEAD_GROUP)
    H, Nk = Q.shape[1], K.shape[2]
    b, h = bh // H, bh % H
    hk = h // (H // K.shape[1])                                  # GQA: the key/value head of query head h
    shift = causal_shift(Q, K, causal, causal_align)
    HALF = BM // 2
    qk_scale = scale * LOG2E
    k_ring = ts.SharedStages[K.dtype, STAGES, BN, D]()
    v_ring = ts.SharedStages[V.dtype, STAGES, BN, DV]()
    k_s = ts.SharedTile[K.dtype, BN, D]()
    v_s = ts.SharedTile[V.dtype, BN, DV]()
    with ts.partition("producer", **PRODUCER):
        ts.async_load(k_ring, 0, K, at=(b, hk, 0, 0))            # block 0's keys, before the loop
    q, acc, m, lsum, s_next = [], [], [], [], []
    for g, role in enumerate(ROLES):
        with ts.partition(role, **CONSUMER):
            q.append(ts.SharedTile[Q.dtype, HALF, D]())          # (HALF, D) from shared memory: registers go to
            ts.load(q[g], Q, at=(b, h, 2 * i + g, 0))            # the two products in flight
            acc.append(ts.RegTile[ts.f32, HALF, DV]())
            ts.zero(acc[g])
            m.append(ts.RegVec[ts.f32, HALF]())
            ts.fill(m[g], LOWEST_F32)                             # a row may see no key (attention_fwd)
            lsum.append(ts.RegVec[ts.f32, HALF]())
            ts.zero(lsum[g])
            ts.wait_load(k_s, k_ring, 0)
            s_next.append(ts.RegTile[ts.f32, HALF, BN]())
            ts.zero(s_next[g])
            ts.mma_ABt_async(s_next[g], q[g], k_s, s_next[g])      # S_0
            ts.mma_wait(s_next[g])
    n_full, n_blocks = query_block_keys(i, Nk, BM, BN, causal, shift)   # both consumers run the program's trips
    tiles = dict(q=q, acc=acc, m=m, lsum=lsum, s_next=s_next, k_ring=k_ring, v_ring=v_ring, k_s=k_s, v_s=v_s, K=K,
                 V=V, b=b, hk=hk, i=i, Nk=Nk, qk_scale=qk_scale, causal=causal, shift=shift, HALF=HALF, BN=BN,
                 STAGES=STAGES)
    for j in ts.range(0, n_full):
        _trip(j, masked=False, **tiles)
    for j in ts.range(n_full, n_blocks):
        _trip(j, masked=True, **tiles)
    for g, role in enumerate(ROLES):
        with ts.partition(role, **CONSUMER):
            l_div = ts.RegVec[ts.f32, HALF]()                    # a row that saw no key: o = 0, l = 0
            ts.max(l_div, lsum[g], EMPTY_ROW_SUM)
            ts.div_row(acc[g], acc[g], l_div)
            o = ts.RegTile[O.dtype, HALF, DV]()
            ts.copy(o, acc[g])
            ts.store(O, o, at=(b, h, 2 * i + g, 0))
            lse = ts.RegVec[ts.f32, HALF]()                      # natural-log LSE = (m + log2 l) ln 2
            ts.log2(lse, lsum[g])
            ts.add(lse, lse, m[g])
            ts.mul(lse, lse, LN2)
            ts.store(LSE, lse, at=(b, h, 2 * i + g))
