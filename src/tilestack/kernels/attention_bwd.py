"""Attention backward in the tile language: FlashAttention-2's three-kernel split.

    dq, dk, dv = attention_backward(q, k, v, o, lse, do, causal=False, scale=None)
    dq, dk, dv = attention_backward(q, k, v, o, lse, do, causal, scale, attn_mask=mask, causal_align="bottom_right")

The same conventions as the forward (see ``attention_fwd``: head dims 1..256 with Dv free, bf16/fp16/fp32,
top-left or bottom-right causal alignment, an additive or boolean ``attn_mask`` that gets no gradient); ``o``,
``lse`` are the forward's outputs for the same arguments and ``do`` is o's gradient.

1. ``attention_bwd_delta_kernel``: delta = rowsum(dO * O), one f32 per query row.
2. ``attention_bwd_dkdv_kernel``: one program per (key block, batch * K/V head); it loops over the query
   heads that share this K/V head (GQA) and over query blocks, rebuilding P from the saved log-sum-exp:
       dV += P^T dO,   dK += dS^T Q,   dS = P * (dO V^T - delta)
3. ``attention_bwd_dq_kernel``: one program per (query block, batch * head), looping over key blocks:
       dQ += dS K
With GQA and few (key block, batch * K/V head) programs for the GPU (a Llama-style 4 K/V heads at batch 1:
512 programs of very unequal causal work for 132 SMs), the dK/dV kernel runs a program per query head instead
(``PER_Q_HEAD``), each writing its head's share of dK, dV, which are summed over each group (``split_group``).
Each has a ``*_bias_kernel`` twin that adds the bias to the scores (the same body), and ``*_dropout_kernel``
twins for a forward with dropout: the forward's mask M (kept entries, worth s = 1 / (1 - p)) is regenerated from
the same stream (``attention_fwd.Dropout``), and with delta = rowsum(dO * O) as before
       dV += (P * M)^T dO * s,   dP = M * (dO V^T) * s,   dS = P * (dP - delta)

Masks. P = exp2(s - lse) is only safe where s is a real score: a padded key (past Nk) loads as a zero row of K,
scores 0 and would get P = exp2(-lse), which overflows when the row's real scores are all strongly negative
(natural lse below about -88 in f32, -11 once P is rounded to fp16), and inf * 0 is NaN in dQ = dS K. So the
dQ kernel masks keys past Nk (in the loop that masks the causal diagonal, over the key blocks that need
either). The dK/dV kernel needs no key mask: a padded key's P reaches only its own dK, dV rows, which the store
drops. But it sums over query rows, so it masks the rows past Nq of the ragged last query block: they load q,
dO, lse and delta as zero, which gives a finite P and zero products for finite keys, but 0 * inf = NaN for a
key that overflowed to -inf (which torch treats as masked). In the dQ kernel a padded query row reaches only
its own dQ row, which the store drops. A row that saw no key has lse = -inf (and every score -inf); that can
happen to any row (a bias, bottom-right alignment, or q and k holding infinities), so lse is raised to the lowest
finite f32 and its P is exp2(-inf - lowest) = 0, not exp2(-inf + inf) = NaN.
"""

from __future__ import annotations

import math

import tilestack.lang as ts
from tilestack.errors import LaunchError
from tilestack.kernels import attention_fwd  # its HEAD_GROUP, read when a kernel is traced
from tilestack.kernels._checks import refuse_derived
from tilestack.kernels._plan import forward_only, planned
from tilestack.kernels.attention_fwd import (
    DERIVED,
    LOG2E,
    LOWEST_F32,
    Dropout,
    add_bias,
    causal_diagonal,
    causal_shift,
    check_attention_args,
    config_signature,
    dropout_scale,
    dropout_threshold,
    head_tile,
    heavy_first,
    mask_as_bias,
    philox_args,
    query_block_keys,
)
from tilestack.tune.lookup import DEFAULT_BACKEND, launch_config, take_backend, tuned_launcher

# attention_forward's derived constants, and whether each query head writes its own share of dK, dV (split_group)
BWD_DERIVED = DERIVED | {"PER_Q_HEAD": "the shapes and the device (split_group)"}


@ts.kernel(grid=lambda O, BM: (ts.cdiv(O.shape[2], BM), O.shape[0] * O.shape[1]),
           options=dict(num_warps=4, num_stages=1))
def attention_bwd_delta_kernel(O, dO, Delta, *, D: int,
                               BM: int = ts.tunable(64, (16, 32, 64, 128))):
    """O, dO: (B, H, Nq, *), Delta: (B, H, Nq) f32; D is the tile width of O's head dim (Dv's tile)."""
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


def _probabilities(s, q, k, lse, qk_scale, *, keys_left=None, rows_left=None, diagonal=None, Bias=None, bias=None,
                   at=None, precision: str = "ieee", l2=None):
    """s = P = exp2(q k^T * qk_scale [+ bias * log2 e] - lse [- l2]) for one (query block, key block) pair, exactly
    as the forward normalised it; ``keys_left`` (= Nk - j*BN) masks keys past the end, ``rows_left`` (= Nq - i*BM)
    queries past the end, ``diagonal`` (see ``causal_diagonal``) the causal diagonal; lse is in the log2
    domain, and with ``l2`` (the biased kernels, ``_load_row_stats``) it is the row max and l2 log2 of the row
    sum, subtracted one after the other: s - max is exact where both are huge, and l2 then still counts. The
    masks come after the subtraction: a masked entry's P is 0 whatever the row's lse, where exp2(-inf - NaN) (a
    row made NaN by a NaN or +inf score) was NaN and reached dV of keys the row never sees (torch's are finite)."""
    ts.zero(s)
    ts.mma_ABt(s, q, k, s, input_precision=precision)   # (BM, BN) = q @ k.T
    ts.mul(s, s, qk_scale)
    if Bias is not None:
        add_bias(s, bias, Bias, at)
    ts.sub_row(s, s, lse)
    if l2 is not None:
        ts.sub_row(s, s, l2)
    if keys_left is not None:
        ts.right_fill(s, s, keys_left, -math.inf)
    if rows_left is not None:
        ts.lower_fill(s, s, rows_left, -math.inf)
    if diagonal is not None:
        ts.make_causal(s, s, diagonal)
    # P <= 1 (s - lse <= 0): where q k^T is huge (inputs of magnitude ~1e3 and up) this product rounds apart from
    # the forward's, s - lse lands above 0, and P passed 1 (dV wrong), then overflowed to inf (NaN gradients)
    ts.min(s, s, 0.0)
    ts.exp2(s, s)


def _score_grad(ds, dp, p, do, v, delta, precision: str = "ieee", dropout: Dropout | None = None):
    """ds = dS = P * (dP - delta), dP = dO V^T (on the kept entries, times 1 / (1 - p), with ``dropout``, whose
    mask is made), in the input dtype for the matrix unit (dp is f32 scratch)."""
    ts.zero(dp)
    ts.mma_ABt(dp, do, v, dp, input_precision=precision)   # (BM, BN) = dO @ V^T
    if dropout is not None:
        dropout.drop(dp, dp)
        ts.mul(dp, dp, dropout.scale)
    ts.sub_row(dp, dp, delta)
    ts.mul(dp, dp, p)
    ts.copy(ds, dp)


def _lse_log2(lse) -> None:
    """The saved natural-log lse to the log2 domain; -inf (a row that saw no key) raised to the lowest f32."""
    ts.mul(lse, lse, LOG2E)
    ts.max(lse, lse, LOWEST_F32)


def _load_row_stats(lse, l2, LSE, at) -> None:
    """A query block's normaliser for ``_probabilities``: from the saved natural-log lse (B, H, Nq), or where
    ``l2`` is a vector (the biased kernels) from the forward's STATS (2, B, H, Nq): the row max into lse and log2
    of the row sum into l2, both log2 domain (kernels.attention_fwd's module docstring says why)."""
    if l2 is None:
        ts.load(lse, LSE, at=at)                 # (BM,) natural log
        _lse_log2(lse)
    else:
        ts.load(lse, LSE, at=(0, *at))           # (BM,) row max
        ts.load(l2, LSE, at=(1, *at))            # (BM,) log2 row sum


def key_block_queries(j, Nq, BM: int, BN: int, causal: bool, shift):
    """(first, full, tail, n_q_blocks) for key block j: query blocks [first, full) reach its causal diagonal,
    [full, tail) see all of it and need no mask, [tail, n_q_blocks) is the ragged last block (masked: its rows
    past Nq); earlier blocks see none of it. Clamped at 0 before dividing."""
    n_q_blocks = ts.cdiv(Nq, BM)
    if not causal:
        return 0, 0, Nq // BM, n_q_blocks
    if shift is None:
        first = ts.smin((j * BN) // BM, n_q_blocks)
        full = ts.smin(ts.cdiv((j + 1) * BN, BM), n_q_blocks)
    else:
        first = ts.smin(ts.smax(j * BN - shift, 0) // BM, n_q_blocks)
        full = ts.smin(ts.cdiv(ts.smax((j + 1) * BN - shift, 0), BM), n_q_blocks)
    return first, full, ts.smax(full, Nq // BM), n_q_blocks


def _dkdv_block(i, h, *, b, q, do, lse, delta, k, v, s, dp, p, ds, dk, dv, Q, dO, LSE, Delta, qk_scale,
                masked: bool, diagonal: bool, shift, Bias, bias, j, BM: int, BN: int,
                precision: str, dropout: Dropout | None, Nk, DQ=None, dq=None, scale=None, l2=None):
    """Query block i of query head h against this program's key block j; ``masked``: rows past Nq, and the
    causal diagonal if ``diagonal``. With ``dropout``: dV from the dropped P (scaled once, at the end), dS from the
    dropped dP. With ``DQ`` (an f32 (B, H, Nq, D) sum): this pair's share of dQ, dS K * scale, added to it
    atomically (``dq``: its (BM, D) f32 scratch)."""
    ts.load(q, Q, at=(b, h, i, 0))               # (BM, D)
    ts.load(do, dO, at=(b, h, i, 0))             # (BM, DV)
    _load_row_stats(lse, l2, LSE, (b, h, i))
    ts.load(delta, Delta, at=(b, h, i))          # (BM,)
    # with DQ, keys past Nk are masked too: their P (exp2(0 - lse), which can overflow) would reach dQ = dS K
    _probabilities(s, q, k, lse, qk_scale, rows_left=Q.shape[2] - i * BM if masked else None,
                   keys_left=Nk - j * BN if DQ is not None else None,
                   diagonal=causal_diagonal(i, j, BM, BN, shift) if diagonal else None,
                   Bias=Bias, bias=bias, at=(b, h, i, j), precision=precision, l2=l2)
    if dropout is None:
        ts.copy(p, s)
    else:                                        # the forward's mask for these (row, key) pairs
        dropout.mask((b * Q.shape[1] + h) * Q.shape[2] + i * BM, j * BN, Nk)
        dropout.drop(dp, s)
        ts.copy(p, dp)
    ts.mma_AtB(dv, p, do, dv, input_precision=precision)   # (BN, DV) += P^T dO
    _score_grad(ds, dp, s, do, v, delta, precision, dropout)
    ts.mma_AtB(dk, ds, q, dk, input_precision=precision)   # (BN, D) += dS^T Q
    if DQ is not None:                           # FlashAttention-2's dQ: dS is here, no second kernel rebuilds it
        ts.zero(dq)
        ts.mma_AB(dq, ds, k, dq, input_precision=precision)  # (BM, D) = dS @ K
        ts.mul(dq, dq, scale)
        ts.atomic_add(DQ, dq, at=(b, h, i, 0))


def _dkdv_block_t(i, h, *, b, q, do, lse, delta, k, v, s, dp, p, ds, dk, dv, Q, dO, LSE, Delta, qk_scale,
                  masked: bool, diagonal: bool, shift, j, BM: int, BN: int, precision: str, Nk,
                  DQ=None, dq=None, scale=None, **_):
    """``_dkdv_block`` in the key-major orientation, as FlashAttention-2's backward works: S^T = K Q^T (BN, BM), so
    P^T and dS^T, the left operands of dV += P^T dO and dK += dS^T Q, are made in registers in the layout the
    matrix unit takes them from (no transpose through shared memory); lse and delta are per column. ``s``, ``dp``
    are (BN, BM) f32 and ``p``, ``ds`` (BN, BM) in the input dtype here; no bias, no dropout."""
    ts.load(q, Q, at=(b, h, i, 0))               # (BM, D)
    ts.load(do, dO, at=(b, h, i, 0))             # (BM, DV)
    ts.load(lse, LSE, at=(b, h, i))              # (BM,) natural log
    ts.load(delta, Delta, at=(b, h, i))          # (BM,)
    _lse_log2(lse)
    ts.zero(s)
    ts.mma_ABt(s, k, q, s, input_precision=precision)     # (BN, BM) = K @ Q^T
    ts.mul(s, s, qk_scale)
    ts.sub_col(s, s, lse)                        # before the masks (see _probabilities)
    if masked:                                   # queries past Nq are columns here
        ts.right_fill(s, s, Q.shape[2] - i * BM, -math.inf)
    if DQ is not None:                           # keys past Nk: their P would reach dQ (see _dkdv_block)
        ts.lower_fill(s, s, Nk - j * BN, -math.inf)
    if diagonal:                                 # keep key <= query + shift: row - col <= d, i.e. col - row >= -d
        ts.triu(s, s, -causal_diagonal(i, j, BM, BN, shift), -math.inf)
    ts.exp2(s, s)                                # P^T
    ts.copy(p, s)
    ts.mma_AB(dv, p, do, dv, input_precision=precision)    # (BN, DV) += P^T dO
    ts.zero(dp)
    ts.mma_ABt(dp, v, do, dp, input_precision=precision)   # (BN, BM) = V @ dO^T = dP^T
    ts.sub_col(dp, dp, delta)
    ts.mul(dp, dp, s)
    ts.copy(ds, dp)                              # dS^T
    ts.mma_AB(dk, ds, q, dk, input_precision=precision)    # (BN, D) += dS^T Q
    if DQ is not None:
        ts.zero(dq)
        ts.mma_AtB(dq, ds, k, dq, input_precision=precision)  # (BM, D) = dS @ K
        ts.mul(dq, dq, scale)
        ts.atomic_add(DQ, dq, at=(b, h, i, 0))


def _dkdv(Q, K, V, Bias, dO, LSE, Delta, dK, dV, scale, *, D: int, DV: int | None, causal: bool,
          causal_align: str, BM: int, BN: int, precision: str = "ieee", dropout: tuple | None = None,
          per_query_head: bool = False, DQ=None, key_major: bool = False):
    """The body of every dK/dV kernel (``Bias`` is None for the unbiased ones; ``dropout`` is the forward's
    (seed, offset, p, scale) for the dropout ones). ``per_query_head``: a program per (key block, batch * query
    head), whose dK, dV (B, H, Nk, *) are that head's share, summed over the group afterwards; else a program per
    (key block, batch * K/V head) that sums its group's heads itself. ``DQ``: an f32 (B, H, Nq, D) tensor of
    zeros that dQ is added into (``_dkdv_block``)."""
    DV = D if DV is None else DV
    # key block 0 is seen by the most query rows
    j, bh = heavy_first(causal, last_heaviest=False, group=attention_fwd.HEAD_GROUP)
    Hkv = K.shape[1]
    group = Q.shape[1] // Hkv                    # query heads per K/V head
    if per_query_head:
        b, out_h = bh // Q.shape[1], bh % Q.shape[1]
        hk, first_h, heads = out_h // group, out_h, 1
    else:
        b, out_h = bh // Hkv, bh % Hkv
        hk, first_h, heads = out_h, out_h * group, group
    shift = causal_shift(Q, K, causal, causal_align)

    k = ts.SharedTile[K.dtype, BN, D]()
    v = ts.SharedTile[V.dtype, BN, DV]()
    q = ts.SharedTile[Q.dtype, BM, D]()
    do = ts.SharedTile[dO.dtype, BM, DV]()
    lse = ts.RegVec[ts.f32, BM]()
    l2 = ts.RegVec[ts.f32, BM]() if Bias is not None else None   # LSE is then the forward's STATS
    delta = ts.RegVec[ts.f32, BM]()
    key_major = key_major and Bias is None and dropout is None
    score = (BN, BM) if key_major else (BM, BN)  # S^T in the key-major orientation (_dkdv_block_t)
    s = ts.RegTile[ts.f32, score[0], score[1]]()
    dp = ts.RegTile[ts.f32, score[0], score[1]]()
    p = ts.RegTile[Q.dtype, score[0], score[1]]()
    ds = ts.RegTile[Q.dtype, score[0], score[1]]()
    dk = ts.RegTile[ts.f32, BN, D]()
    dv = ts.RegTile[ts.f32, BN, DV]()
    bias = ts.RegTile[ts.f32, BM, BN]() if Bias is not None else None
    drop = Dropout.tiles(*dropout, BM, BN) if dropout is not None else None
    ts.load(k, K, at=(b, hk, j, 0))
    ts.load(v, V, at=(b, hk, j, 0))
    ts.zero(dk)
    ts.zero(dv)
    first, full, tail, n_q_blocks = key_block_queries(j, Q.shape[2], BM, BN, causal, shift)
    tiles = dict(b=b, q=q, do=do, lse=lse, delta=delta, k=k, v=v, s=s, dp=dp, p=p, ds=ds, dk=dk, dv=dv, Q=Q,
                 dO=dO, LSE=LSE, Delta=Delta, qk_scale=scale * LOG2E, shift=shift, Bias=Bias, bias=bias, j=j,
                 BM=BM, BN=BN,
                 precision=precision, dropout=drop, Nk=K.shape[2])
    if l2 is not None:
        tiles["l2"] = l2
    if DQ is not None:
        tiles.update(DQ=DQ, dq=ts.RegTile[ts.f32, BM, D](), scale=scale)
    block = _dkdv_block_t if key_major else _dkdv_block
    for g in ts.range(heads):
        h = first_h + g
        if causal:                               # the diagonal (and maybe the ragged last query block)
            for i in ts.range(first, full):
                block(i, h, masked=True, diagonal=True, **tiles)
        for i in ts.range(full, tail):
            block(i, h, masked=False, diagonal=False, **tiles)
        for i in ts.range(tail, n_q_blocks):     # the ragged last query block, past the diagonal
            block(i, h, masked=True, diagonal=False, **tiles)
    ts.mul(dk, dk, scale)
    if drop is not None:                         # dV summed the kept entries of P unscaled
        ts.mul(dv, dv, drop.scale)
    out_k = ts.RegTile[dK.dtype, BN, D]()
    out_v = ts.RegTile[dV.dtype, BN, DV]()
    ts.copy(out_k, dk)
    ts.copy(out_v, dv)
    ts.store(dK, out_k, at=(b, out_h, j, 0))
    ts.store(dV, out_v, at=(b, out_h, j, 0))


def _grid_kv(K, dK, BN):
    return (ts.cdiv(K.shape[2], BN), dK.shape[0] * dK.shape[1])     # dK's heads: K's, or Q's per query head


# Triton's launch options by default (not tunables of the kernel: the tuner searches them as the backend's)
_BWD_OPTIONS = dict(num_warps=8, num_stages=2)
_KV_BM = ts.tunable(64, (16, 32, 64, 128))
_KV_BN = ts.tunable(128, (16, 32, 64, 128))
_KEY_MAJOR = ts.tunable(False, (False, True))


@ts.kernel(grid=_grid_kv, options=_BWD_OPTIONS)
def attention_bwd_dkdv_kernel(Q, K, V, dO, LSE, Delta, dK, dV, scale: float, *,
                              D: int, DV: int | None = None, causal: bool = False, causal_align: str = "top_left",
                              BM: int = _KV_BM, BN: int = _KV_BN, precision: str = "ieee",
                              PER_Q_HEAD: bool = False, KEY_MAJOR: bool = _KEY_MAJOR):
    """dK (like K) and dV (like V); D and DV are the tile widths of the q/k and v head dims. ``PER_Q_HEAD``: dK,
    dV are (B, H, Nk, *), each query head's share (GQA: summed over each group by the caller). ``KEY_MAJOR``:
    the scores as S^T = K Q^T (``_dkdv_block_t``)."""
    _dkdv(Q, K, V, None, dO, LSE, Delta, dK, dV, scale, D=D, DV=DV, causal=causal, causal_align=causal_align,
          BM=BM, BN=BN, precision=precision, per_query_head=PER_Q_HEAD, key_major=KEY_MAJOR)


@ts.kernel(grid=_grid_kv, options=_BWD_OPTIONS)
def attention_bwd_dkdv_bias_kernel(Q, K, V, Bias, dO, STATS, Delta, dK, dV, scale: float, *,
                                   D: int, DV: int | None = None, causal: bool = False,
                                   causal_align: str = "top_left", BM: int = _KV_BM, BN: int = _KV_BN,
                                   precision: str = "ieee"):
    """``attention_bwd_dkdv_kernel`` with the forward's bias (B, H, Nq, Nk) added to the scores; STATS (2, B, H,
    Nq) f32 in place of the lse: the biased forward's row max and log2 sum (``_load_row_stats``)."""
    _dkdv(Q, K, V, Bias, dO, STATS, Delta, dK, dV, scale, D=D, DV=DV, causal=causal, causal_align=causal_align,
          BM=BM, BN=BN, precision=precision)


@ts.kernel(grid=_grid_kv, options=_BWD_OPTIONS)
def attention_bwd_dkdv_dropout_kernel(Q, K, V, dO, LSE, Delta, dK, dV, scale: float, seed: int, offset: int,
                                      dropout_p: float, dropout_scale: float, *, D: int, DV: int | None = None,
                                      causal: bool = False, causal_align: str = "top_left", BM: int = _KV_BM,
                                      BN: int = _KV_BN, precision: str = "ieee"):
    """``attention_bwd_dkdv_kernel`` for a forward with dropout: its (seed, offset, p, scale)."""
    _dkdv(Q, K, V, None, dO, LSE, Delta, dK, dV, scale, D=D, DV=DV, causal=causal, causal_align=causal_align,
          BM=BM, BN=BN, precision=precision, dropout=(seed, offset, dropout_p, dropout_scale))


@ts.kernel(grid=_grid_kv, options=_BWD_OPTIONS)
def attention_bwd_dkdv_bias_dropout_kernel(Q, K, V, Bias, dO, STATS, Delta, dK, dV, scale: float, seed: int,
                                           offset: int, dropout_p: float, dropout_scale: float, *, D: int,
                                           DV: int | None = None, causal: bool = False,
                                           causal_align: str = "top_left", BM: int = _KV_BM, BN: int = _KV_BN,
                                           precision: str = "ieee"):
    """``attention_bwd_dkdv_bias_kernel`` for a forward with dropout."""
    _dkdv(Q, K, V, Bias, dO, STATS, Delta, dK, dV, scale, D=D, DV=DV, causal=causal, causal_align=causal_align,
          BM=BM, BN=BN, precision=precision, dropout=(seed, offset, dropout_p, dropout_scale))


@ts.kernel(grid=_grid_kv, options=_BWD_OPTIONS)
def attention_bwd_dkdvdq_kernel(Q, K, V, dO, LSE, Delta, DQ, dK, dV, scale: float, *,
                                D: int, DV: int | None = None, causal: bool = False, causal_align: str = "top_left",
                                BM: int = _KV_BM, BN: int = _KV_BN, precision: str = "ieee",
                                PER_Q_HEAD: bool = False, KEY_MAJOR: bool = _KEY_MAJOR):
    """``attention_bwd_dkdv_kernel`` that also adds dQ into ``DQ`` (f32 (B, H, Nq, D), zeros before the launch):
    5 matrix products per (query block, key block) pair where the dK/dV and dQ kernels take 7, for f32 atomic
    adds of (BM, D) tiles (FlashAttention-2's backward). The adds' order varies between runs on a GPU, so dQ is
    not bitwise reproducible (attention_backward keeps the two kernels under torch's deterministic mode)."""
    _dkdv(Q, K, V, None, dO, LSE, Delta, dK, dV, scale, D=D, DV=DV, causal=causal, causal_align=causal_align,
          BM=BM, BN=BN, precision=precision, per_query_head=PER_Q_HEAD, DQ=DQ, key_major=KEY_MAJOR)


def _dq_block(j, *, b, h, hk, q, do, lse, delta, k, v, s, dp, ds, dq, K, V, qk_scale, masked: bool, causal: bool,
              shift, Bias, bias, i, BM: int, BN: int, precision: str, dropout: Dropout | None, row, l2=None):
    """This program's query block i against key block j (``row``: block i's first row in the dropout grid)."""
    ts.load(k, K, at=(b, hk, j, 0))              # (BN, D)
    ts.load(v, V, at=(b, hk, j, 0))              # (BN, DV)
    _probabilities(s, q, k, lse, qk_scale, keys_left=K.shape[2] - j * BN if masked else None,
                   diagonal=causal_diagonal(i, j, BM, BN, shift) if masked and causal else None,
                   Bias=Bias, bias=bias, at=(b, h, i, j), precision=precision, l2=l2)
    if dropout is not None:                      # the forward's mask for these (row, key) pairs
        dropout.mask(row, j * BN, K.shape[2])
    _score_grad(ds, dp, s, do, v, delta, precision, dropout)
    ts.mma_AB(dq, ds, k, dq, input_precision=precision)   # (BM, D) += dS @ K


def _dq(Q, K, V, Bias, dO, LSE, Delta, dQ, scale, *, D: int, DV: int | None, causal: bool, causal_align: str,
        BM: int, BN: int, precision: str = "ieee", dropout: tuple | None = None):
    """The body of every dQ kernel (``Bias`` is None for the unbiased ones; ``dropout`` as in ``_dkdv``)."""
    DV = D if DV is None else DV
    i, bh = heavy_first(causal, last_heaviest=True, group=attention_fwd.HEAD_GROUP)
    H = Q.shape[1]
    b, h = bh // H, bh % H
    hk = h // (H // K.shape[1])
    shift = causal_shift(Q, K, causal, causal_align)

    q = ts.SharedTile[Q.dtype, BM, D]()
    do = ts.SharedTile[dO.dtype, BM, DV]()
    k = ts.SharedTile[K.dtype, BN, D]()
    v = ts.SharedTile[V.dtype, BN, DV]()
    lse = ts.RegVec[ts.f32, BM]()
    l2 = ts.RegVec[ts.f32, BM]() if Bias is not None else None   # LSE is then the forward's STATS
    delta = ts.RegVec[ts.f32, BM]()
    s = ts.RegTile[ts.f32, BM, BN]()
    dp = ts.RegTile[ts.f32, BM, BN]()
    ds = ts.RegTile[Q.dtype, BM, BN]()
    dq = ts.RegTile[ts.f32, BM, D]()
    bias = ts.RegTile[ts.f32, BM, BN]() if Bias is not None else None
    drop = Dropout.tiles(*dropout, BM, BN) if dropout is not None else None
    ts.load(q, Q, at=(b, h, i, 0))
    ts.load(do, dO, at=(b, h, i, 0))
    _load_row_stats(lse, l2, LSE, (b, h, i))
    ts.load(delta, Delta, at=(b, h, i))
    ts.zero(dq)
    n_full, n_blocks = query_block_keys(i, K.shape[2], BM, BN, causal, shift)
    tiles = dict(b=b, h=h, hk=hk, q=q, do=do, lse=lse, delta=delta, k=k, v=v, s=s, dp=dp, ds=ds, dq=dq, K=K, V=V,
                 qk_scale=scale * LOG2E, causal=causal, shift=shift, Bias=Bias, bias=bias, i=i, BM=BM, BN=BN,
                 precision=precision, dropout=drop, row=bh * Q.shape[2] + i * BM, l2=l2)
    for j in ts.range(0, n_full):
        _dq_block(j, masked=False, **tiles)
    for j in ts.range(n_full, n_blocks):         # the ragged end of the keys and the causal diagonal
        _dq_block(j, masked=True, **tiles)
    ts.mul(dq, dq, scale)
    out = ts.RegTile[dQ.dtype, BM, D]()
    ts.copy(out, dq)
    ts.store(dQ, out, at=(b, h, i, 0))


def _grid_q(Q, BM):
    return (ts.cdiv(Q.shape[2], BM), Q.shape[0] * Q.shape[1])


_DQ_BM = ts.tunable(128, (16, 32, 64, 128))
_DQ_BN = ts.tunable(64, (16, 32, 64, 128))


@ts.kernel(grid=_grid_q, options=_BWD_OPTIONS)
def attention_bwd_dq_kernel(Q, K, V, dO, LSE, Delta, dQ, scale: float, *,
                            D: int, DV: int | None = None, causal: bool = False, causal_align: str = "top_left",
                            BM: int = _DQ_BM, BN: int = _DQ_BN, precision: str = "ieee"):
    """dQ (like Q); D and DV are the tile widths of the q/k and v head dims."""
    _dq(Q, K, V, None, dO, LSE, Delta, dQ, scale, D=D, DV=DV, causal=causal, causal_align=causal_align,
        BM=BM, BN=BN, precision=precision)


@ts.kernel(grid=_grid_q, options=_BWD_OPTIONS)
def attention_bwd_dq_bias_kernel(Q, K, V, Bias, dO, STATS, Delta, dQ, scale: float, *,
                                 D: int, DV: int | None = None, causal: bool = False,
                                 causal_align: str = "top_left", BM: int = _DQ_BM, BN: int = _DQ_BN,
                                 precision: str = "ieee"):
    """``attention_bwd_dq_kernel`` with the forward's bias (B, H, Nq, Nk) added to the scores; STATS in place of
    the lse, as ``attention_bwd_dkdv_bias_kernel``."""
    _dq(Q, K, V, Bias, dO, STATS, Delta, dQ, scale, D=D, DV=DV, causal=causal, causal_align=causal_align,
        BM=BM, BN=BN, precision=precision)


@ts.kernel(grid=_grid_q, options=_BWD_OPTIONS)
def attention_bwd_dq_dropout_kernel(Q, K, V, dO, LSE, Delta, dQ, scale: float, seed: int, offset: int,
                                    dropout_p: float, dropout_scale: float, *, D: int, DV: int | None = None,
                                    causal: bool = False, causal_align: str = "top_left", BM: int = _DQ_BM,
                                    BN: int = _DQ_BN, precision: str = "ieee"):
    """``attention_bwd_dq_kernel`` for a forward with dropout: its (seed, offset, p, scale)."""
    _dq(Q, K, V, None, dO, LSE, Delta, dQ, scale, D=D, DV=DV, causal=causal, causal_align=causal_align,
        BM=BM, BN=BN, precision=precision, dropout=(seed, offset, dropout_p, dropout_scale))


@ts.kernel(grid=_grid_q, options=_BWD_OPTIONS)
def attention_bwd_dq_bias_dropout_kernel(Q, K, V, Bias, dO, STATS, Delta, dQ, scale: float, seed: int, offset: int,
                                         dropout_p: float, dropout_scale: float, *, D: int, DV: int | None = None,
                                         causal: bool = False, causal_align: str = "top_left", BM: int = _DQ_BM,
                                         BN: int = _DQ_BN, precision: str = "ieee"):
    """``attention_bwd_dq_bias_kernel`` for a forward with dropout."""
    _dq(Q, K, V, Bias, dO, STATS, Delta, dQ, scale, D=D, DV=DV, causal=causal, causal_align=causal_align,
        BM=BM, BN=BN, precision=precision, dropout=(seed, offset, dropout_p, dropout_scale))


def row_stats(lse):
    """The biased kernels' STATS (2, B, H, Nq) made from a natural-log ``lse`` alone (no forward's stats at hand):
    the row max lse * log2 e (-inf raised to the lowest f32, as ``_lse_log2``) and a log2 sum of 0, so their
    P = exp2(s - lse log2 e) is the unbiased kernels'."""
    import torch

    return torch.stack((torch.clamp_min(lse * LOG2E, LOWEST_F32), torch.zeros_like(lse)))


def _check_stats(stats, attn_mask, q) -> None:
    """``stats`` is None, or the (2, B, H, Nq) f32 tensor on q's device of a forward with a mask."""
    import torch

    if stats is None:
        return
    want = (2, *q.shape[:3])
    if not isinstance(stats, torch.Tensor):
        raise LaunchError(f"attention_backward: stats is {type(stats).__name__}; expected None or the forward's "
                          f"{want} float32 tensor (attention_forward(..., with_stats=True))")
    if attn_mask is None:
        raise LaunchError("attention_backward: stats given without attn_mask; they are the masked forward's "
                          "(attention_forward(..., with_stats=True) gives None without a mask)")
    if tuple(stats.shape) != want or stats.dtype != torch.float32 or stats.device != q.device:
        raise LaunchError(f"attention_backward: stats is {tuple(stats.shape)} {stats.dtype} on {stats.device}; "
                          f"expected {want} torch.float32 on {q.device} (the forward's, with_stats=True)")


def _check_saved(q, v, o, lse, do) -> None:
    """The forward's output and log-sum-exp and the incoming gradient must match q and v."""
    import torch

    o_shape = (*q.shape[:3], v.shape[3])
    for name, t, shape, dtype in (("o", o, o_shape, q.dtype), ("do", do, o_shape, q.dtype),
                                  ("lse", lse, q.shape[:3], torch.float32)):
        if not isinstance(t, torch.Tensor):
            raise LaunchError(f"attention_backward: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != q.device:
            raise LaunchError(f"attention_backward: {name} is {tuple(t.shape)} {t.dtype} on {t.device}; expected "
                              f"{tuple(shape)} {dtype} on {q.device}")


def default_config(D: int, causal: bool, device_type: str, dtype=None) -> dict[str, dict]:
    """Per-kernel block shapes (D: the widest head tile; tuned ones come from the tuner's cache). fp32 tiles
    take twice the shared memory and registers of half ones, so they get the shapes of twice the head dim."""
    import torch

    if device_type != "cuda":
        small = dict(num_warps=4, num_stages=1)
        return {"delta": dict(BM=16) | small, "dkdv": dict(BM=16, BN=16) | small, "dq": dict(BM=16, BN=16) | small}
    if dtype == torch.float32:
        D *= 2
    # the shapes tuning on the H100 picks most often (tune/tables/ has them per size)
    if D <= 64:
        return {"delta": dict(BM=64, num_warps=4, num_stages=1),
                "dkdv": dict(BM=64, BN=64, num_warps=4, num_stages=3),
                "dq": dict(BM=128, BN=64, num_warps=4, num_stages=3)}
    if D <= 128:
        return {"delta": dict(BM=64, num_warps=4, num_stages=1),
                "dkdv": dict(BM=64, BN=64, num_warps=4, num_stages=2),
                "dq": dict(BM=128, BN=64, num_warps=8, num_stages=3)}
    if D <= 256:   # the f32 accumulators (dK, dV: BN x 256 each) must fit the registers of 8 warps
        return {"delta": dict(BM=32, num_warps=4, num_stages=1),
                "dkdv": dict(BM=32, BN=32, num_warps=8, num_stages=2),
                "dq": dict(BM=64, BN=32, num_warps=8, num_stages=2)}
    return {"delta": dict(BM=32, num_warps=4, num_stages=1),       # fp32 at D = 256
            "dkdv": dict(BM=16, BN=32, num_warps=8, num_stages=1),
            "dq": dict(BM=32, BN=32, num_warps=8, num_stages=1)}


DKDV_PROGRAMS_PER_SM = 4     # below this many dK/dV programs per SM, a GQA group is split across programs
SPLIT_MAX_BYTES = 1 << 30    # ... unless its dK, dV shares (B, H, Nk, *) would take more than this


def _multiprocessors(device) -> int:
    """SMs of a CUDA device; 1 elsewhere (the CPU executors: a split group then needs fewer than 4 programs)."""
    import torch
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_group(B: int, H: int, Hkv: int, Nk: int, BN: int, device, D: int = 0, Dv: int = 0) -> bool:
    """Whether the dK/dV kernel runs per query head (each head's share of dK, dV summed over its group after):
    GQA (H > Hkv) with fewer than DKDV_PROGRAMS_PER_SM programs per SM when it runs per K/V head, and shares of
    head dims D and Dv (at most 4 bytes an element) within SPLIT_MAX_BYTES."""
    few = B * Hkv * -(-Nk // BN) < DKDV_PROGRAMS_PER_SM * _multiprocessors(device)
    return H > Hkv and few and B * H * Nk * (D + Dv) * 4 <= SPLIT_MAX_BYTES


@planned
@forward_only("attention_backward")   # not differentiable: a backward through it raises
def attention_backward(q, k, v, o, lse, do, causal: bool = False, scale: float | None = None, *,
                       backend: str | None = None, config: dict[str, dict] | None = None, attn_mask=None,
                       causal_align: str = "top_left", dropout_p: float = 0.0, rng=None, precision: str = "ieee",
                       stats=None):
    """(dq, dk, dv) of attention, from the forward's output ``o`` and log-sum-exp ``lse`` (for the same
    ``causal``, ``scale``, ``attn_mask``, ``causal_align``, ``dropout_p`` and stream ``rng``, whose mask is
    regenerated, and ``precision``). The mask gets no gradient. With a mask, ``stats`` (2, B, H, Nq) are the
    forward's row max and log2 sum (``attention_forward(..., with_stats=True)``; they keep the gradients of a row
    masked everywhere by a huge finite fill right); without them they are made from lse. Checks, configs and
    launchers are planned once per launch signature (``kernels._plan``)."""
    import torch

    check_attention_args("attention_backward", q, k, v, scale, causal=causal, attn_mask=attn_mask,
                         causal_align=causal_align,
                         dropout_p=dropout_p, rng=rng, precision=precision)
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    _check_saved(q, v, o, lse, do)
    _check_stats(stats, attn_mask, q)
    if config is not None and not isinstance(config, dict):
        raise LaunchError(f"attention_backward: config is {type(config).__name__}; expected a dict of kernel name "
                          f"-> that kernel's config (delta, dkdv, dq, dkdvdq)")
    unknown = set(config or {}) - {"delta", "dkdv", "dq", "dkdvdq"}
    if unknown:
        raise LaunchError(f"attention_backward: config has {sorted(unknown)}; its kernels are delta, dkdv, dq and "
                          f"dkdvdq (dK, dV and dQ in one kernel)")
    for part, c in (config or {}).items():
        if not isinstance(c, dict):
            raise LaunchError(f"attention_backward: config[{part!r}] is {c!r}; expected a dict of that kernel's "
                              f"tunables and launch options (e.g. dict(BM=64, BN=64, num_warps=4))")
        # the head tiles, causal & co. and the split over query heads are the function's (config[...]['DV']
        # replaced the head tile the kernels read: a wrong answer)
        refuse_derived("attention_backward", c, BWD_DERIVED, where=f"config[{part!r}]")
    if 0 in (B, H, Nq, Nk):       # nothing to launch: no query reaches a key, every gradient is zero (or empty)
        return lambda q, k, v, *_, **__: (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    DT, DVT = head_tile(D), head_tile(Dv)
    sig = config_signature(q, DT, DVT, causal)
    defaults = default_config(max(DT, DVT), causal, q.device.type, q.dtype)
    cfg = {part: launch_config(f"attention_bwd_{part}", sig, q.device, Nq, c, backend)
           for part, c in defaults.items()}
    # dQ inside the dK/dV kernel (atomic adds) where a tuning table or the caller asks for it: not under torch's
    # deterministic mode (the adds' order varies), nor with a mask or dropout (their kernels are the split ones)
    fused_cfg = launch_config("attention_bwd_dkdvdq", sig, q.device, Nq, {}, backend)
    fused = (bool(fused_cfg) or "dkdvdq" in (config or {})) and attn_mask is None and not dropout_p \
        and not torch.are_deterministic_algorithms_enabled()
    if fused:
        cfg["dkdvdq"] = cfg["dkdv"] | fused_cfg
    for name, c in (config or {}).items():
        if name in cfg:
            cfg[name] = cfg[name] | c
    # a part whose config says schedule="ws" (a caller's, or a table's) runs attention_bwd_ws's warp-specialized
    # kernel where it can: 16-bit inputs, no mask, no dropout; elsewhere the split kernel at its own config
    def split_config(part: str) -> dict:   # a part's split-kernel config where the tables' entry is a ws one
        base = defaults[part]
        if backend is None:                  # the entry's best on the default backend (its "others"), if split
            other = launch_config(f"attention_bwd_{part}", sig, q.device, Nq, base, DEFAULT_BACKEND)
            base = other if other.get("schedule", "split") == "split" else base
        return base | (config or {}).get(part, {})

    from tilestack.kernels.attention_bwd_ws import ws_launcher, ws_parts  # (it imports this module)
    ws = ws_parts(cfg, config or {}, q.dtype, split_config,
                   with_mask=attn_mask is not None or bool(dropout_p), fused=fused)
    # each kernel on the backend named, else on the one its own table entry chose (each is tuned on its own)
    backends = {part: (take_backend(c, backend), backend) for part, c in cfg.items()}   # (to launch on, named)
    consts = dict(D=DT, causal=bool(causal))
    if DVT != DT:
        consts["DV"] = DVT
    if causal and causal_align != "top_left":
        consts["causal_align"] = causal_align
    if precision != "ieee" and q.dtype == torch.float32:   # half inputs are exact either way: one trace
        consts["precision"] = precision
    with_bias = attn_mask is not None

    def buffers(q, k, v):
        return (torch.empty(B, H, Nq, dtype=torch.float32, device=q.device),
                torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))

    delta, dq, dk, dv = buffers(q, k, v)
    do = do.contiguous()
    bias = mask_as_bias(attn_mask, (B, H, Nq, Nk))
    launch_delta = tuned_launcher(attention_bwd_delta_kernel, (o, do, delta), *backends["delta"], D=DVT,
                                  **cfg["delta"])
    if dropout_p > 0:   # kernels of their own: dropout_p = 0 runs the kernels below, untouched
        return _dropout_run(q, k, v, bias, do, lse if bias is None else (row_stats(lse) if stats is None else stats),
                            delta, dq, dk, dv, scale, rng, float(dropout_p), buffers,
                            launch_delta, backends, consts, cfg, (B, H, Nq, Nk))
    group = H // k.shape[1]
    kv_part = "dkdvdq" if fused else "dkdv"
    kv_bn = (ws.get("dkdv") or cfg[kv_part]).get("BN", _KV_BN.default)
    split = not with_bias and split_group(B, H, k.shape[1], Nk, kv_bn, q.device, D, Dv)

    def shares(q, k, v):    # split: each query head's share of dK, dV (B, H, Nk, *) in k's and v's dtypes
        return (torch.empty((B, H, Nk, D), dtype=k.dtype, device=q.device),
                torch.empty((B, H, Nk, Dv), dtype=v.dtype, device=q.device))

    dq_sum = (lambda q: torch.zeros((B, H, Nq, D), dtype=torch.float32, device=q.device)) if fused else None
    if fused:
        dk_out, dv_out = shares(q, k, v) if split else (dk, dv)
        launch_dkdv = tuned_launcher(attention_bwd_dkdvdq_kernel,
                                     (q, k, v, do, lse, delta, dq_sum(q), dk_out, dv_out, scale),
                                     *backends["dkdvdq"], **consts, **cfg["dkdvdq"], PER_Q_HEAD=split)
        launch_dq = None
    elif not with_bias:
        dk_out, dv_out = shares(q, k, v) if split else (dk, dv)
        args_kv = (q, k, v, do, lse, delta, dk_out, dv_out, scale)
        launch_dkdv = (ws["dkdv"] and ws_launcher("dkdv", args_kv, backends["dkdv"], consts, ws["dkdv"],
                                                   PER_Q_HEAD=split)) \
            or tuned_launcher(attention_bwd_dkdv_kernel, args_kv, *backends["dkdv"], **consts, **cfg["dkdv"],
                              PER_Q_HEAD=split)
        args_q = (q, k, v, do, lse, delta, dq, scale)
        launch_dq = (ws["dq"] and ws_launcher("dq", args_q, backends["dq"], consts, ws["dq"])) \
            or tuned_launcher(attention_bwd_dq_kernel, args_q, *backends["dq"], **consts, **cfg["dq"])
    else:
        st = row_stats(lse) if stats is None else stats
        launch_dkdv = tuned_launcher(attention_bwd_dkdv_bias_kernel, (q, k, v, bias, do, st, delta, dk, dv, scale),
                                     *backends["dkdv"], **consts, **cfg["dkdv"])
        launch_dq = tuned_launcher(attention_bwd_dq_bias_kernel, (q, k, v, bias, do, st, delta, dq, scale),
                                   *backends["dq"], **consts, **cfg["dq"])

    def run(q, k, v, o, lse, do, *_, attn_mask=None, stats=None, **__):
        delta, dq, dk, dv = buffers(q, k, v)
        do = do.contiguous()
        launch_delta((o, do, delta))
        if with_bias:
            bias = mask_as_bias(attn_mask, (B, H, Nq, Nk))
            stats = row_stats(lse) if stats is None else stats
            launch_dkdv((q, k, v, bias, do, stats, delta, dk, dv, scale))
            launch_dq((q, k, v, bias, do, stats, delta, dq, scale))
        elif fused:                 # dQ summed in f32 by the dK/dV kernel, then cast (a copy when q is f32)
            dq32 = dq_sum(q)
            dkx, dvx = shares(q, k, v) if split else (dk, dv)
            launch_dkdv((q, k, v, do, lse, delta, dq32, dkx, dvx, scale))
            dq = dq32 if q.dtype == torch.float32 else dq.copy_(dq32)
        else:
            dkx, dvx = (shares(q, k, v) if split else (dk, dv))
            launch_dkdv((q, k, v, do, lse, delta, dkx, dvx, scale))
            launch_dq((q, k, v, do, lse, delta, dq, scale))
        if split and not with_bias:
            Hkv = k.shape[1]        # the shares (each in k's dtype, as FlashAttention-2's) summed in f32
            dk.copy_(dkx.view(B, Hkv, group, Nk, D).sum(2, dtype=torch.float32))
            dv.copy_(dvx.view(B, Hkv, group, Nk, Dv).sum(2, dtype=torch.float32))
        return dq, dk, dv
    return run


def _dropout_run(q, k, v, bias, do, lse, delta, dq, dk, dv, scale, rng, p, buffers, launch_delta, backends, consts,
                 cfg, shape):
    """attention_backward's ``run`` after a forward with dropout: the dropout twins of the dK/dV and dQ kernels
    (with the bias or not), the stream's (seed, offset) read per call; ``backends``: per part (the backend to
    launch on, the one the caller named)."""
    extra = (*philox_args(rng), dropout_threshold(p), dropout_scale(p))
    with_bias = bias is not None
    # (with the bias, ``lse`` is the stats: attention_backward's run makes them as its own)
    kdkdv, kdq = ((attention_bwd_dkdv_bias_dropout_kernel, attention_bwd_dq_bias_dropout_kernel) if with_bias else
                  (attention_bwd_dkdv_dropout_kernel, attention_bwd_dq_dropout_kernel))
    b = (bias,) if with_bias else ()
    launch_dkdv = tuned_launcher(kdkdv, (q, k, v, *b, do, lse, delta, dk, dv, scale, *extra), *backends["dkdv"],
                                 **consts, **cfg["dkdv"])
    launch_dq = tuned_launcher(kdq, (q, k, v, *b, do, lse, delta, dq, scale, *extra), *backends["dq"], **consts,
                               **cfg["dq"])

    def run(q, k, v, o, lse, do, *_, attn_mask=None, rng=None, stats=None, **__):
        delta, dq, dk, dv = buffers(q, k, v)
        do = do.contiguous()
        launch_delta((o, do, delta))
        b = (mask_as_bias(attn_mask, shape),) if with_bias else ()
        if with_bias:
            lse = row_stats(lse) if stats is None else stats
        x = (*philox_args(rng), *extra[2:])
        launch_dkdv((q, k, v, *b, do, lse, delta, dk, dv, scale, *x))
        launch_dq((q, k, v, *b, do, lse, delta, dq, scale, *x))
        return dq, dk, dv
    return run
