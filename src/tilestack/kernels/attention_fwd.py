"""Attention forward with online softmax, in the tile language: FlashAttention's algorithm.

    o, lse = attention_forward(q, k, v, causal=False, scale=None)   # q: (B, H, Nq, D); k: (B, Hkv, Nk, D)
    o, lse = attention_forward(q, k, v, attn_mask=mask, causal=True, causal_align="bottom_right")
    # v: (B, Hkv, Nk, Dv); o: (B, H, Nq, Dv); lse: (B, H, Nq) f32, natural log

The meaning is torch's ``F.scaled_dot_product_attention`` (its math backend, in float64, is the reference):
- Head dims D and Dv are any of 1..256, and may differ. Tiles are a power of two wide (the head dim rounded up,
  at least 16): loads read zeros past the tensor's last column and stores drop what hangs past it, so the
  padding adds zero to every product.
- bf16, fp16 and fp32 inputs. P (and dS) are rounded to the input dtype for the second product, as
  FlashAttention does. fp32 products follow ``precision``: "ieee" (the default: exact f32 products, the CUDA
  cores; about 2e-7 relative norm error in o and the gradients against float64) or "tf32" (the tensor cores,
  several times faster: each operand keeps a 10-bit mantissa. With the CPU backends' round-to-nearest-even
  (error <= 2**-11 per operand) o is off by about 3e-4 and the gradients by about 6e-4 relative (norm) against
  float64, tested to 2e-3; on an H200 the largest of o, dq, dk, dv at (2, 4, 257, 64) causal was 1.9e-3, so
  expect up to about 4e-3, the GPU tests' bound).
  ``tilestack.attention`` picks tf32 exactly when torch's fp32 matmuls do (``torch.backends.cuda.matmul.
  allow_tf32``). bf16 and fp16 products are exact either way.
- ``dropout_p`` > 0 with a stream ``rng`` (``dropout_rng()``: seed and offset from torch's CPU generator): P's
  entries are dropped with probability p by counter-based random numbers (the rand op: Philox 4x32-10, as
  Triton's ``tl.randint4x``, eight 16-bit numbers per counter; see ``Dropout``) and the kept ones scaled by
  1 / (1 - p); the lse is the undropped one. The backward regenerates the same mask from the stream;
  ``dropout_mask(rng, p, shape)`` gives it on the host. Dropout runs its own kernels (``*_dropout_kernel``), so
  dropout_p = 0 costs nothing.
- Causal alignment: ``causal_align="top_left"`` (the default, as torch SDPA's ``is_causal``): query r sees keys
  c <= r. ``"bottom_right"`` (FlashAttention-2 >= 2.1, decoding against a KV cache): query r sees keys
  c <= r + Nk - Nq, so the last query sees every key. The two agree when Nq == Nk.
- ``attn_mask``: an additive float bias or a boolean mask (True = attend) of rank 2 to 4, broadcastable to
  (B, H, Nq, Nk) (H counts query heads); bool, float32 or q's dtype, the masks torch's SDPA takes. A boolean
  mask becomes a 0 / -inf bias; with ``causal`` both apply.
- A query row that sees no key (every key masked, bottom-right causal with Nq > Nk, Nk = 0, or every score -inf
  from infinities in q and k) gives o = 0 and lse = -inf, as torch's math backend. A finite additive bias past
  +-``MAX_BIAS`` (about 1.18e38) counts as +-MAX_BIAS (``add_bias``; its log2-domain value would overflow): a row
  masked everywhere with ``torch.finfo(torch.float32).min`` averages v over those keys as torch's (its softmax
  of equal huge scores is uniform), and a key with a huge positive bias takes its row's weight as in torch; but
  two such values in one row count alike where torch favours the larger.
- GQA/MQA: query head h reads key/value head h // (H // Hkv).

One program per (query block, batch*head). Keys are visited in two loops: blocks that need no mask (fully
inside the sequence and, when causal, fully at or below the diagonal), then the few that do (the ragged end
of the keys, the causal diagonal), so the common case pays for no masking. Scores live in the log2 domain (the
softmax scale is folded with log2(e)) so the exponentials are exp2. A bias is a kernel of its own
(``attention_fwd_bias_kernel``, the same body): the unbiased trace has no trace of it. Any row may see no key (a
bias or bottom-right alignment masks all its keys; q and k holding infinities make all its scores -inf, where
torch's o is 0 too), so rows start the running max at the lowest finite f32 instead of -inf: a fully masked block
gives exp2(-inf - lowest) = 0 rather than exp2(-inf + inf) = NaN; such a row ends with l = 0 and o = 0, and the
division is guarded.
The log-sum-exp (natural log, per query row, f32) is saved for the backward. The biased kernels also keep each
row's max m and log2 l apart (``STATS``, (2, B, H, Nq) f32, log2 domain; log2 0 raised to the lowest f32): where
a huge finite fill masks every key a row sees (-1e30, ``torch.finfo(f32).min``), m is about fill * log2 e and
m + log2 l rounds to m in f32, so a backward from the lse alone would take each such key's P as 1 instead of
1 / l. ``attention_forward(..., with_stats=True)`` returns them (the autograd paths' call).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import numpy as np

import tilestack.lang as ts
from tilestack.errors import LaunchError
from tilestack.kernels._checks import next_pow2, refuse_derived
from tilestack.kernels._plan import forward_only, planned
from tilestack.tune.lookup import DEFAULT_BACKEND, launch_config, take_backend, tuned_launcher

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
LOWEST_F32 = -3.4028234663852886e38   # the lowest finite f32: the running max of a row that has seen no key
MAX_SCALE = -LOWEST_F32 / LOG2E       # the largest scale whose product with log2(e) (qk_scale, f32) is finite
MAX_BIAS = float(np.float32(MAX_SCALE / 2))   # an additive mask's largest value (add_bias): x log2(e) stays finite
                                              # beside the scores
EMPTY_ROW_SUM = 1e-30                 # divides an empty row's zero output (a row that saw a key has l >= 1)
MAX_HEAD_DIM = 256
MIN_TILE = 16                         # the matrix units' smallest tile side
CAUSAL_ALIGNS = ("top_left", "bottom_right")

# the tunables, shared by the plain and the biased kernel
_BM = ts.tunable(128, (16, 32, 64, 128))
_BN = ts.tunable(64, (16, 32, 64, 128))
# Triton's launch options by default (not tunables of the kernel: the tuner searches them as the backend's)
_OPTIONS = dict(num_warps=8, num_stages=3)


def head_tile(d: int) -> int:
    """The tile width for a head dim: the next power of two, at least the matrix units' 16."""
    return max(MIN_TILE, next_pow2(d))


def causal_shift(Q, K, causal: bool, causal_align: str):
    """How far right of the top-left diagonal query r's last key is (r sees keys c <= r + shift): None for no
    shift (not causal, or top-left), Nk - Nq (an index Scalar, maybe negative) for bottom-right."""
    if causal and causal_align == "bottom_right":
        return K.shape[2] - Q.shape[2]
    return None


def causal_diagonal(i, j, BM: int, BN: int, shift):
    """``make_causal``'s diagonal for query block i against key block j: keep col - row <= i*BM - j*BN + shift."""
    d = i * BM - j * BN
    return d if shift is None else d + shift


# heavy_first's group: the (batch, head) pairs whose blocks a causal launch interleaves. On an H100 (2026-12-06,
# FA3 grid at N=8192, causal, TFLOP/s, the mean of 2-3 runs of scripts/bench_attention.py and
# scripts/gpu/probe_head_group.py; groups 1 (head by head) / 4 / 16): forward hd64 392 / 402 / 409, hd128
# 563 / 592 / 569; backward hd64 361 / 366 / 356, hd128 413 / 431 / 416. Runs of one group differ by up to 5%.
HEAD_GROUP = 4


def heavy_first(causal: bool, *, last_heaviest: bool, group: int):
    """(block, bh): the sequence block and the (batch, head) pair this program takes, on a grid of (blocks, B*H).

    Not causal, every block costs the same: block_id(0) and block_id(1), so the programs that run together share
    one head's K and V in L2. Under a causal mask a block's cost grows along the sequence (a query block's rows
    see more keys the later it sits: ``last_heaviest``; a key block is seen by more query rows the earlier it
    sits), and a launch starts its programs about in linear order (axis 0 fastest). Head by head, each head's
    heaviest block would start one head's worth of programs before the end, and the launch waits for it alone.
    So the linear order runs over groups of HEAD_GROUP heads, and within a group level by level from the
    heaviest, the group's heads side by side: the heaviest blocks start first, the last programs are the
    lightest, and the programs running together still read the K and V of ``group`` heads (consecutive heads,
    which share K and V under GQA). ``group`` 1 is the head-by-head order."""
    x, y = ts.block_id(0), ts.block_id(1)
    if not causal:
        return x, y
    n, heads = ts.num_blocks(0), ts.num_blocks(1)
    pid = y * n + x                              # the launch order
    first = pid // (n * group) * group           # the group's first (batch, head) pair
    width = ts.smin(heads - first, group)        # the last group may be narrower
    r = pid - first * n                          # index within the group: level r // width, head r % width
    level = r // width
    return (n - 1 - level if last_heaviest else level), first + r % width


def query_block_keys(i, Nk, BM: int, BN: int, causal: bool, shift):
    """(n_full, n_blocks) for query block i: key blocks [0, n_full) need no mask, [n_full, n_blocks) do (the
    ragged end, the diagonal); later blocks are invisible. Indices are clamped at 0 before any division (the
    Triton backend's // truncates toward zero)."""
    if not causal:
        return Nk // BN, ts.cdiv(Nk, BN)
    if shift is None:
        n_blocks = ts.smin(ts.cdiv((i + 1) * BM, BN), ts.cdiv(Nk, BN))
        return ts.smin((i * BM) // BN, Nk // BN), n_blocks
    n_blocks = ts.smin(ts.cdiv(ts.smax((i + 1) * BM + shift, 0), BN), ts.cdiv(Nk, BN))
    return ts.smin(ts.smax(i * BM + shift, 0) // BN, Nk // BN), n_blocks


def add_bias(s, bias, Bias, at) -> None:
    """s (log2-domain scores, f32) += the (BM, BN) tile of ``Bias`` at ``at``, taken to the log2 domain. A finite
    bias above ``MAX_BIAS`` counts as MAX_BIAS: its log2-domain value would be inf, and a row's max inf makes its
    exponentials inf - inf = NaN, where torch's f32 scores stay finite (such a key then takes the row's weight, as
    in torch; two of them in one row share it, where torch gives it to the larger). +inf stays inf.
    Likewise a finite bias below -MAX_BIAS counts as -MAX_BIAS: its log2-domain value was -inf, so a row masked
    everywhere with ``torch.finfo(dtype).min`` (Hugging Face's and nn.MultiheadAttention's masking value, bf16's
    and f32's) counted as fully masked (o = 0) where torch averages v over those keys (its softmax of equal huge
    scores is uniform). -inf stays -inf (a row of them sees no key: o = 0, as torch's)."""
    ts.load(bias, Bias, at=at)                   # (BM, BN) f32; zeros past the edges
    inf = ts.RegTile[ts.bool_, bias.shape[0], bias.shape[1]]()
    ts.eq(inf, bias, math.inf)                   # +inf stays inf (a NaN row, as torch's)
    ts.min(bias, bias, MAX_BIAS)
    ts.where(bias, inf, math.inf, bias)
    ts.eq(inf, bias, -math.inf)                  # -inf stays -inf (a masked key)
    ts.max(bias, bias, -MAX_BIAS)
    ts.where(bias, inf, -math.inf, bias)
    ts.mul(bias, bias, LOG2E)
    ts.add(s, s, bias)


@dataclasses.dataclass
class Dropout:
    """Dropout of P inside a kernel, by counter-based random numbers that the backward regenerates.

    Element (r, c) of the score grid of query row r (counted over all (batch, head) pairs: row = (b * H + h) * Nq
    + r) and key c is kept when its uniform under key ``seed`` is >= p: the rand op with eight 16-bit numbers per
    Philox counter (an eighth of the work of one; p is then kept to 2**-16: the chance of a drop is p rounded up
    to a multiple of 2**-16, at most 1.5e-5 more), number c % 8 of counter ``offset + row * cdiv(Nk, 8) + c // 8``.
    Kept entries are worth ``scale`` = 1 / (1 - p) (0 when p = 1), applied where it is cheapest (once to o in the
    forward, once to dV, per element to dP). ``u`` and ``keep`` are (BM, BN) scratch tiles."""
    seed: Any
    offset: Any
    p: Any
    scale: Any
    u: Any
    keep: Any

    @classmethod
    def tiles(cls, seed, offset, p, scale, BM: int, BN: int) -> Dropout:
        return cls(seed, offset, p, scale, ts.RegTile[ts.f32, BM, BN](), ts.RegTile[ts.bool_, BM, BN]())

    def mask(self, row, col, keys) -> None:
        """keep = the mask of the (BM, BN) block whose first element is (row, col) of a grid ``keys`` wide."""
        ts.rand(self.u, self.seed, self.offset, row=row, col=col, stride=ts.cdiv(keys, RAND_PER_COUNTER),
                per_counter=RAND_PER_COUNTER)
        ts.ge(self.keep, self.u, self.p)

    def drop(self, dst, x) -> None:
        """dst = x where kept, else 0 (unscaled)."""
        ts.where(dst, self.keep, x, 0.0)


def _attend_block(j, q, k, v, s, p, o, m, m_new, alpha, l, K, V, b, h, hk, qk_scale, *, masked: bool,
                  causal: bool, shift, bias, Bias, i, BM: int, BN: int, precision: str, dropout: Dropout | None,
                  row):
    """One key block j: s = q k^T, online-softmax update of (m, l), o += p v (p dropped if ``dropout``; l sums
    the undropped p, so the lse is dropout's too)."""
    ts.load(k, K, at=(b, hk, j, 0))              # (BN, D)
    ts.load(v, V, at=(b, hk, j, 0))              # (BN, DV)
    ts.zero(s)
    ts.mma_ABt(s, q, k, s, input_precision=precision)   # (BM, BN) = q @ k.T
    if Bias is not None:                         # scores to the log2 domain first, the bias added there
        ts.mul(s, s, qk_scale)
        add_bias(s, bias, Bias, (b, h, i, j))
    if masked:
        ts.right_fill(s, s, K.shape[2] - j * BN, -math.inf)      # keys past the end
        if causal:
            ts.make_causal(s, s, causal_diagonal(i, j, BM, BN, shift))   # keys after the query
    ts.row_max(m_new, s)
    if Bias is None:                             # the max of the raw scores, then scaled (the scale is > 0),
        ts.mul(m_new, m_new, qk_scale)           # so that s * qk_scale - m_new below is one FMA
    ts.max(m_new, m_new, m)
    if Bias is None:
        ts.mul(s, s, qk_scale)                   # log2 domain
    ts.sub(alpha, m, m_new)
    ts.exp2(alpha, alpha)                        # rescale of what was summed so far
    ts.sub_row(s, s, m_new)
    ts.exp2(s, s)
    ts.mul(l, l, alpha)
    ts.row_sum(l, s, l)
    ts.mul_row(o, o, alpha)
    if dropout is not None:                      # P's dropped entries to 0 (the kept ones scaled at the end)
        dropout.mask(row, j * BN, K.shape[2])
        dropout.drop(s, s)
    ts.copy(p, s)                                # to the input dtype for the matrix unit
    ts.mma_AB(o, p, v, o, input_precision=precision)   # (BM, DV) += (BM, BN) @ (BN, DV)
    ts.copy(m, m_new)


def _forward(Q, K, V, Bias, O, LSE, scale, *, D: int, DV: int | None, causal: bool, causal_align: str,
             BM: int, BN: int, precision: str = "ieee", dropout: tuple | None = None, STATS=None):
    """The body of every forward kernel (``Bias`` is None for the unbiased ones; ``dropout`` is (seed, offset,
    p, scale) for the dropout ones)."""
    DV = D if DV is None else DV
    i, bh = heavy_first(causal, last_heaviest=True, group=HEAD_GROUP)
    H = Q.shape[1]
    Nk = K.shape[2]
    b, h = bh // H, bh % H
    hk = h // (H // K.shape[1])                  # GQA: the key/value head of query head h
    shift = causal_shift(Q, K, causal, causal_align)

    q = ts.SharedTile[Q.dtype, BM, D]()
    k = ts.SharedTile[K.dtype, BN, D]()
    v = ts.SharedTile[V.dtype, BN, DV]()
    s = ts.RegTile[ts.f32, BM, BN]()
    p = ts.RegTile[Q.dtype, BM, BN]()
    o = ts.RegTile[ts.f32, BM, DV]()
    m = ts.RegVec[ts.f32, BM]()
    m_new = ts.RegVec[ts.f32, BM]()
    alpha = ts.RegVec[ts.f32, BM]()
    l = ts.RegVec[ts.f32, BM]()
    bias = ts.RegTile[ts.f32, BM, BN]() if Bias is not None else None
    drop = Dropout.tiles(*dropout, BM, BN) if dropout is not None else None
    ts.load(q, Q, at=(b, h, i, 0))               # (BM, D)
    ts.zero(o)
    ts.fill(m, LOWEST_F32)                       # not -inf: a row may see no key (module docstring)
    ts.zero(l)
    qk_scale = scale * LOG2E

    n_full, n_blocks = query_block_keys(i, Nk, BM, BN, causal, shift)
    tiles = dict(q=q, k=k, v=v, s=s, p=p, o=o, m=m, m_new=m_new, alpha=alpha, l=l, K=K, V=V, b=b, h=h, hk=hk,
                 qk_scale=qk_scale, causal=causal, shift=shift, bias=bias, Bias=Bias, i=i, BM=BM, BN=BN,
                 precision=precision, dropout=drop, row=bh * Q.shape[2] + i * BM)
    for j in ts.range(0, n_full):
        _attend_block(j, masked=False, **tiles)
    for j in ts.range(n_full, n_blocks):
        _attend_block(j, masked=True, **tiles)

    out = ts.RegTile[O.dtype, BM, DV]()
    l_div = ts.RegVec[ts.f32, BM]()              # a row that saw no key has o = 0 and l = 0: 0 / tiny = 0
    ts.max(l_div, l, EMPTY_ROW_SUM)
    ts.div_row(o, o, l_div)
    if drop is not None:                         # the kept entries' 1 / (1 - p)
        ts.mul(o, o, drop.scale)
    ts.copy(out, o)
    ts.store(O, out, at=(b, h, i, 0))
    lse = ts.RegVec[ts.f32, BM]()                # natural-log LSE = (m + log2 l) * ln 2 (-inf for l = 0)
    ts.log2(lse, l)
    ts.add(lse, lse, m)
    ts.mul(lse, lse, LN2)
    ts.store(LSE, lse, at=(b, h, i))
    if STATS is not None:                        # the biased kernels: m and log2 l apart, for the backward
        ts.store(STATS, m, at=(0, b, h, i))
        ts.log2(l, l)
        ts.max(l, l, LOWEST_F32)                 # a row that saw no key: log2 0 = -inf raised (module docstring)
        ts.store(STATS, l, at=(1, b, h, i))


def _grid(Q, BM):
    return (ts.cdiv(Q.shape[2], BM), Q.shape[0] * Q.shape[1])


@ts.kernel(grid=_grid, options=_OPTIONS)
def attention_fwd_kernel(Q, K, V, O, LSE, scale: float, *,
                         D: int, DV: int | None = None, causal: bool = False, causal_align: str = "top_left",
                         BM: int = _BM, BN: int = _BN, precision: str = "ieee"):
    """Q: (B, H, Nq, *), K: (B, Hkv, Nk, *), V: (B, Hkv, Nk, *), O: (B, H, Nq, *), LSE: (B, H, Nq) f32.
    D and DV are the tile widths of the q/k and v/o head dims (powers of two >= 16, see ``head_tile``);
    ``precision``: the products' input precision for fp32 inputs ("ieee" or "tf32")."""
    _forward(Q, K, V, None, O, LSE, scale, D=D, DV=DV, causal=causal, causal_align=causal_align, BM=BM, BN=BN,
             precision=precision)


@ts.kernel(grid=_grid, options=_OPTIONS)
def attention_fwd_bias_kernel(Q, K, V, Bias, O, LSE, STATS, scale: float, *,
                              D: int, DV: int | None = None, causal: bool = False, causal_align: str = "top_left",
                              BM: int = _BM, BN: int = _BN, precision: str = "ieee"):
    """``attention_fwd_kernel`` with an additive bias added to the scores: Bias (B, H, Nq, Nk), any float dtype,
    usually an expanded view (zero strides on the broadcast axes); STATS (2, B, H, Nq) f32: each row's max and
    log2 of its sum, kept apart for the backward (``row_stats``)."""
    _forward(Q, K, V, Bias, O, LSE, scale, D=D, DV=DV, causal=causal, causal_align=causal_align, BM=BM, BN=BN,
             precision=precision, STATS=STATS)


@ts.kernel(grid=_grid, options=_OPTIONS)
def attention_fwd_dropout_kernel(Q, K, V, O, LSE, scale: float, seed: int, offset: int, dropout_p: float,
                                 dropout_scale: float, *, D: int, DV: int | None = None, causal: bool = False,
                                 causal_align: str = "top_left", BM: int = _BM, BN: int = _BN,
                                 precision: str = "ieee"):
    """``attention_fwd_kernel`` with dropout on P (see ``Dropout``): the random stream ``(seed, offset)``, the
    probability ``dropout_p`` and the kept entries' ``dropout_scale`` = 1 / (1 - p)."""
    _forward(Q, K, V, None, O, LSE, scale, D=D, DV=DV, causal=causal, causal_align=causal_align, BM=BM, BN=BN,
             precision=precision, dropout=(seed, offset, dropout_p, dropout_scale))


@ts.kernel(grid=_grid, options=_OPTIONS)
def attention_fwd_bias_dropout_kernel(Q, K, V, Bias, O, LSE, STATS, scale: float, seed: int, offset: int,
                                      dropout_p: float, dropout_scale: float, *, D: int, DV: int | None = None,
                                      causal: bool = False, causal_align: str = "top_left", BM: int = _BM,
                                      BN: int = _BN, precision: str = "ieee"):
    """``attention_fwd_bias_kernel`` with dropout, as ``attention_fwd_dropout_kernel``."""
    _forward(Q, K, V, Bias, O, LSE, scale, D=D, DV=DV, causal=causal, causal_align=causal_align, BM=BM, BN=BN,
             precision=precision, dropout=(seed, offset, dropout_p, dropout_scale), STATS=STATS)


def reference(q, k, v, causal: bool = False, scale: float | None = None, *, attn_mask=None,
              causal_align: str = "top_left", dropout_p: float = 0.0, dropout_keep=None):
    """float64 PyTorch attention with the same conventions: torch's math backend (GQA by repeating K/V heads; a
    row that sees no key gives 0 and lse = -inf, and finite gradients). Returns (o, lse).

    ``dropout_keep``: a boolean (B, H, Nq, Nk) mask of the kept entries of P (``dropout_mask`` gives the kernels'),
    each worth 1 / (1 - dropout_p), as torch's dropout; the lse is the undropped one."""
    import torch

    group = q.shape[1] // max(k.shape[1], 1)
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.double() @ kk.transpose(-1, -2)) * scale                       # (B, H, Nq, Nk)
    nq, nk = q.shape[2], k.shape[2]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask.to(s.device), float("-inf"))
        else:
            s = s + attn_mask.to(s.device, torch.float64)
    if causal:
        shift = nk - nq if causal_align == "bottom_right" else 0
        keep = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(diagonal=shift)
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1) if nk else s.new_full(s.shape[:-1], float("-inf"))
    empty = torch.isneginf(lse)[..., None]                                # rows that see no key
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if dropout_keep is not None:
        p = p * dropout_keep.to(p.device, torch.float64) * dropout_scale(dropout_p)
    return p @ vv, lse


# ---- dropout: a random stream per call, regenerated by the backward ----------------------------------------------
PRECISIONS = ("ieee", "tf32")   # the products' input precision for fp32 inputs (bf16/fp16 are exact either way)
RAND_PER_COUNTER = 8            # dropout's uniforms per Philox counter (the rand op's per_counter: 16-bit halves)


def dropout_rng(generator=None):
    """A fresh random stream for one dropout call, from torch's CPU generator (``torch.manual_seed`` repeats it;
    activation checkpointing, which restores the CPU generator, redraws the same one): a CPU int64 tensor (2,),
    (seed, offset) before ``philox_args``. A tensor, not ints, so that launch plans are not keyed by its value.
    Keep it for the backward."""
    import torch

    return torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=generator)


def philox_args(rng) -> tuple[int, int]:
    """The kernels' (seed, offset) for the stream ``rng``: both 64-bit, the seed odd and >= 2**62, the offset
    a multiple of 16 in [2**61, 2**61 + 2**60), so every call matches what Triton specialized the compiled kernel
    for on the first (an int argument's == 1, divisibility by 16 and 32-bit range); the counters offset +
    (B * H * Nq * Nk) stay below 2**63."""
    s, o = rng.tolist()
    return 2**62 | (s & (2**62 - 1)) | 1, 2**61 + ((o & (2**56 - 1)) << 4)


def dropout_scale(p: float) -> float:
    """What a kept entry is worth: 1 / (1 - p); 0 when p = 1 (everything dropped: o = 0, as torch's dropout)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def dropout_threshold(p: float) -> float:
    """p as the f32 the kernels compare their f32 uniforms with (an element is kept when u >= it)."""
    import numpy as np

    return float(np.float32(p))


def dropout_mask(rng, dropout_p: float, shape):
    """The kernels' dropout mask for stream ``rng`` and probability ``dropout_p``: a boolean CPU tensor of
    ``shape`` (B, H, Nq, Nk), True where P's entry is kept; regenerated with the same Philox bits as the kernels
    (``tilestack.ir.ops.philox_uniform``), for tests and for checking a run."""
    import numpy as np
    import torch

    from tilestack.ir.ops import philox_uniform

    seed, offset = philox_args(rng)
    *lead, keys = shape
    per_row = -(-keys // RAND_PER_COUNTER)                                # counters per row of the grid
    rows = np.arange(math.prod(lead), dtype=np.uint64)[:, None] * np.uint64(per_row)
    counters = np.uint64(offset) + rows + np.arange(per_row, dtype=np.uint64)[None, :]
    u = philox_uniform(seed, counters, per_counter=RAND_PER_COUNTER)      # (8, rows, per_row)
    u = np.moveaxis(u, 0, -1).reshape(len(rows), RAND_PER_COUNTER * per_row)[:, :keys]   # key 8k + m: number m
    return torch.from_numpy(u.reshape(tuple(shape)) >= np.float32(dropout_threshold(dropout_p)))


def check_attention_args(fn: str, q, k, v, scale, *, causal=False, attn_mask=None, causal_align: str = "top_left",
                         dropout_p: float = 0.0, rng=None, precision: str = "ieee") -> None:
    """Every check on attention inputs, before any work (shared by forward, backward and the torch op)."""
    import torch

    from tilestack.errors import LaunchError
    from tilestack.kernels._checks import check_same_device, check_tensor, finite_real

    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(fn, name, t, rank=4, dtypes=(torch.bfloat16, torch.float16, torch.float32))
    check_same_device(fn, q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise LaunchError(f"{fn}: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, _, D = q.shape
    if k.shape[:3] != v.shape[:3]:
        raise LaunchError(f"{fn}: k and v must agree on (B, Hkv, Nk); got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise LaunchError(f"{fn}: k is {tuple(k.shape)}; expected (B={B}, Hkv, Nk, D={D}) to match q "
                          f"{tuple(q.shape)}")
    Hkv = k.shape[1]
    if (Hkv == 0 and H != 0) or (Hkv != 0 and H % Hkv):
        raise LaunchError(f"{fn}: q has H={H} heads and k/v have {Hkv}; H must be a multiple of the "
                          "K/V heads (GQA/MQA)")
    for name, d in (("D", D), ("Dv", v.shape[3])):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise LaunchError(f"{fn}: head dim {name}={d} is not supported; expected 1..{MAX_HEAD_DIM}")
    if scale is not None and (not finite_real(scale) or not 0 < scale <= MAX_SCALE):
        raise LaunchError(f"{fn}: scale must be a positive number or None, got {scale!r} (finite, not a bool, at "
                          f"most {MAX_SCALE:.4g}: the kernels' f32 scale times log2(e) must not overflow)")
    if not isinstance(causal, bool | np.bool_):                  # Python's or NumPy's bool (np.True_)
        raise LaunchError(f"{fn}: causal must be a bool, got {causal!r} ({type(causal).__name__})")
    if causal_align not in CAUSAL_ALIGNS:
        raise LaunchError(f"{fn}: causal_align must be one of {CAUSAL_ALIGNS}, got {causal_align!r}")
    if attn_mask is not None:
        # torch's SDPA takes a bool mask, or a float one in float32 or in q's dtype, of rank 2 to 4
        check_tensor(fn, "attn_mask", attn_mask, dtypes=dict.fromkeys((torch.bool, q.dtype, torch.float32)))
        check_same_device(fn, q=q, attn_mask=attn_mask)
        want = (B, H, q.shape[2], k.shape[2])
        tail = want[4 - attn_mask.dim():] if 2 <= attn_mask.dim() <= 4 else None
        if tail is None or any(m not in (1, w) for m, w in zip(attn_mask.shape, tail, strict=True)):
            raise LaunchError(f"{fn}: attn_mask is {tuple(attn_mask.shape)}; expected a shape broadcastable to "
                              f"(B, H, Nq, Nk) = {want}, of rank 2 to 4")
    if (isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p <= 1.0):
        raise LaunchError(f"{fn}: dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if dropout_p > 0:
        if not isinstance(rng, torch.Tensor) or rng.dtype != torch.int64 or tuple(rng.shape) != (2,) \
                or rng.device.type != "cpu":
            got = f"{tuple(rng.shape)} {rng.dtype} on {rng.device}" if isinstance(rng, torch.Tensor) else repr(rng)
            raise LaunchError(f"{fn}: dropout_p={dropout_p} needs rng, the dropout stream: a CPU int64 tensor (2,) "
                              f"(seed, offset) from dropout_rng(), the same in the forward and the backward; got {got}")
    if precision not in PRECISIONS:
        raise LaunchError(f"{fn}: precision must be one of {PRECISIONS}, got {precision!r}")


def mask_as_bias(attn_mask, shape):
    """attn_mask as an additive bias view of ``shape`` (B, H, Nq, Nk), or None: a boolean mask becomes 0 where
    True and -inf where False, in bf16 (exact), at the mask's own size; then both are expanded (zero strides on
    the broadcast axes, no copy)."""
    import torch

    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:   # log of the 0/1 mask: log 1 = 0, log 0 = -inf, exactly (two small kernels)
        attn_mask = attn_mask.to(torch.bfloat16).log_()
    return attn_mask.expand(shape)


# the kernel constants attention_forward and attention_backward set from their inputs, never from a config: a
# caller's D or DV replaced the head tile the kernels read (a wrong answer), causal & co. clashed (a TypeError)
DERIVED = {"D": "q's head dim (q.shape[3])", "DV": "v's head dim (v.shape[3])", "causal": "its causal argument",
           "causal_align": "its causal_align argument", "precision": "its precision argument"}


def default_config(D: int, causal: bool, device_type: str, dtype=None) -> dict:
    """Block shapes for a launch (D: the widest head tile): large tiles on a GPU (tuned configs come from
    tilestack.tune), small ones for the CPU executors, which are slow per element but not per tile. fp32 tiles
    take twice the shared memory, so they get half the rows."""
    import torch

    if device_type != "cuda":
        return dict(BM=16, BN=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        if D <= 64:
            return dict(BM=64, BN=64, num_warps=4, num_stages=2)
        if D <= 128:
            return dict(BM=64, BN=32, num_warps=8, num_stages=2)
        return dict(BM=32, BN=32, num_warps=8, num_stages=1)
    if D <= 64:
        return dict(BM=128, BN=64, num_warps=4, num_stages=3)
    if D <= 128:
        return dict(BM=128, BN=64, num_warps=8, num_stages=3)
    return dict(BM=64, BN=32, num_warps=8, num_stages=2)


def config_signature(q, D: int, DV: int, causal: bool) -> str:
    """The tuning tables' key: dtype, head tile widths (one when equal), causal or not."""
    dims = f"D{D}" if D == DV else f"D{D}-DV{DV}"
    return f"{str(q.dtype).removeprefix('torch.')}-{dims}-{'causal' if causal else 'full'}"


@planned
@forward_only("attention_forward")   # its backward is attention_backward: a backward through it raises
def attention_forward(q, k, v, causal: bool = False, scale: float | None = None, *,
                      backend: str | None = None, attn_mask=None, causal_align: str = "top_left",
                      dropout_p: float = 0.0, rng=None, precision: str = "ieee", with_stats: bool = False,
                      **config):
    """(o, lse): o (B, H, Nq, Dv) in q's dtype; lse (B, H, Nq) f32, natural log (-inf for a row that sees no key).
    ``with_stats``: (o, lse, stats), stats the biased kernels' (2, B, H, Nq) row max and log2 sum for
    ``attention_backward`` (module docstring), None without a mask.
    See the module docstring for ``attn_mask``, ``causal_align``, ``dropout_p`` with its stream ``rng`` and
    ``precision``; ``config`` overrides block shapes. Checks, config and launcher are planned once per launch
    signature (``kernels._plan``)."""
    import torch

    check_attention_args("attention_forward", q, k, v, scale, causal=causal, attn_mask=attn_mask,
                         causal_align=causal_align,
                         dropout_p=dropout_p, rng=rng, precision=precision)
    refuse_derived("attention_forward", config, DERIVED)
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if with_stats is not True and with_stats is not False:
        raise LaunchError(f"attention_forward: with_stats={with_stats!r}; expected True or False")
    if 0 in (B, H, Nq, Nk):       # nothing to launch: no rows, or rows that see no key (o = 0, lse = -inf)
        if with_stats:            # (the backward launches nothing either)
            return lambda q, *_, **__: (q.new_zeros((B, H, Nq, Dv)), torch.full((B, H, Nq), -math.inf,
                                                                                device=q.device), None)
        return lambda q, *_, **__: (q.new_zeros((B, H, Nq, Dv)), torch.full((B, H, Nq), -math.inf, device=q.device))
    DT, DVT = head_tile(D), head_tile(Dv)
    default = default_config(max(DT, DVT), causal, q.device.type, q.dtype)
    signature = config_signature(q, DT, DVT, causal)
    tuned = launch_config("attention_fwd", signature, q.device, Nq, default, backend)
    cfg = tuned | config
    asked, backend = backend, take_backend(cfg, backend)      # the tuned backend where none was named
    schedule = cfg.pop("schedule", "plain")
    if schedule not in ("plain", "pingpong"):
        raise LaunchError(f"attention_forward: schedule={schedule!r}; expected 'plain' or 'pingpong' "
                          "(FlashAttention-3's ping-pong, kernels.attention_fwd_pingpong)")

    def constants(cfg: dict) -> dict:
        consts = dict(D=DT, causal=bool(causal), **cfg)
        if DVT != DT:
            consts["DV"] = DVT
        if causal and causal_align != "top_left":
            consts["causal_align"] = causal_align
        if precision != "ieee" and q.dtype == torch.float32:   # half inputs are exact either way: one trace
            consts["precision"] = precision
        return consts

    consts = constants(cfg)
    o_shape, lse_shape = (B, H, Nq, Dv), (B, H, Nq)

    def outputs(q):
        return (torch.empty_like(q) if Dv == D else q.new_empty(o_shape),
                torch.empty(lse_shape, dtype=torch.float32, device=q.device))

    def stats_buffer(q):          # the biased kernels' row max and log2 sum (module docstring)
        return torch.empty((2, *lse_shape), dtype=torch.float32, device=q.device)

    o, lse = outputs(q)
    bias = mask_as_bias(attn_mask, (B, H, Nq, Nk))
    plain_consts, plain_backend = consts, backend
    caller = {key: value for key, value in config.items() if key != "schedule"}   # the caller's own config keys
    if tuned.get("schedule", "plain") != "plain":
        # the tables chose the ping-pong kernel (tune.library's variant): its config (STAGES, tiles tuned for it)
        # is not the plain kernel's. Where the plain kernel runs (the caller's schedule="plain", or a launch the
        # ping-pong cannot take: a mask, dropout, strides) it takes the entry's best on the default backend (kept
        # under "others") where no backend was named, else the launch path's default; the caller's keys over it
        base = default
        if asked is None:
            other = launch_config("attention_fwd", signature, q.device, Nq, default, DEFAULT_BACKEND)
            base, plain_backend = (other if other.get("schedule", "plain") == "plain" else default), None
        plain_consts = constants(base | caller)
    if dropout_p > 0:   # a kernel of its own: dropout_p = 0 runs the kernels above, untouched
        return _dropout_run(q, k, v, bias, o, lse, scale, rng, float(dropout_p), outputs, (plain_backend, asked),
                            plain_consts, (B, H, Nq, Nk), stats_buffer, with_stats)
    if bias is None and schedule == "pingpong" and q.dtype in (torch.bfloat16, torch.float16):
        # the tables' config where they chose the ping-pong kernel; else its own defaults under the caller's keys
        # (the tables' entry was tuned for the plain kernel: its BN of 64 is the ping-pong's slower choice)
        from tilestack.kernels.attention_fwd_pingpong import PINGPONG_DEFAULTS
        _refuse_unknown_pingpong_keys(caller)
        ping = cfg if tuned.get("schedule") == "pingpong" else PINGPONG_DEFAULTS | caller
        launch = _pingpong_launcher(q, k, v, o, lse, scale, backend, asked, constants(ping), "schedule" in config)
        if launch is not None:
            def run(q, k, v, *_, **__):
                o, lse = outputs(q)
                launch((q, k, v, o, lse, scale))
                return (o, lse, None) if with_stats else (o, lse)
            return run
    if bias is None:
        launch = tuned_launcher(attention_fwd_kernel, (q, k, v, o, lse, scale), plain_backend, asked,
                                **plain_consts)

        def run(q, k, v, *_, **__):
            o, lse = outputs(q)
            launch((q, k, v, o, lse, scale))
            return (o, lse, None) if with_stats else (o, lse)
    else:
        launch = tuned_launcher(attention_fwd_bias_kernel, (q, k, v, bias, o, lse, stats_buffer(q), scale),
                                plain_backend, asked, **plain_consts)

        def run(q, k, v, *_, attn_mask=None, **__):
            o, lse = outputs(q)
            stats = stats_buffer(q)
            launch((q, k, v, mask_as_bias(attn_mask, (B, H, Nq, Nk)), o, lse, stats, scale))
            return (o, lse, stats) if with_stats else (o, lse)
    return run


def _refuse_unknown_pingpong_keys(caller: dict) -> None:
    """The caller's config keys that neither the ping-pong kernel nor any backend takes (a misspelling: STAGE=3,
    bn=64), refused by name with the nearest: ``_pingpong_launcher`` keeps only the kernel's own keys, so they were
    dropped without a word (the plain kernel's launch path refuses them, naming the kernel's constants)."""
    import difflib

    from tilestack.backends import launch_option_names
    from tilestack.kernels.attention_fwd_pingpong import attention_fwd_pingpong_kernel as kernel

    known = set(kernel.constants) | launch_option_names()
    unknown = sorted(set(caller) - known)
    if unknown:
        lower = {name.lower(): name for name in kernel.constants}      # 'bn' is 'BN' misspelled
        near = {u: [lower[m] for m in difflib.get_close_matches(u.lower(), sorted(lower), n=1)] for u in unknown}
        hint = "".join(f" ({u!r}: did you mean {m[0]!r}?)" for u, m in near.items() if m)
        raise LaunchError(f"attention_forward: schedule='pingpong' config key(s) {unknown}{hint} are not the "
                          f"ping-pong kernel's; expected its tunables {sorted(kernel.tunables)} or launch options")


def _pingpong_launcher(q, k, v, o, lse, scale, backend, asked, consts, named: bool):
    """The launcher of kernels.attention_fwd_pingpong for these tensors, or None where it cannot launch (strides
    the copy engine cannot take, a backend that cannot lower it) and the schedule came from the tables (``named``
    False): the plain kernel then runs. Its block rows are at least 32 (two consumers of 16 rows), and on the Gluon
    backend at least 128: a consumer warpgroup's wgmma accumulates 64-row slices (the tables' BM of 64 for head
    dim 64 or causal launches, tuned for the plain kernel, would leave each consumer 32)."""
    from tilestack.errors import BackendError
    from tilestack.kernels.attention_fwd_pingpong import attention_fwd_pingpong_kernel

    keep = {key: consts[key] for key in ("D", "DV", "causal", "causal_align", "BN", "STAGES") if key in consts}
    keep["BM"] = max(consts.get("BM", 128), 128 if backend == "gluon" else 32)
    try:
        # from the tables (not named), a backend that refuses it gives way to the plain kernel (attention_forward's
        # fallback), not to the ping-pong kernel on the default backend (Triton's drops the roles and turns)
        return tuned_launcher(attention_fwd_pingpong_kernel, (q, k, v, o, lse, scale), backend,
                              asked if named else backend, **keep)
    except (BackendError, LaunchError):
        if named:
            raise
        return None


def _dropout_run(q, k, v, bias, o, lse, scale, rng, p, outputs, backend, consts, shape, stats_buffer,
                 with_stats: bool):
    """attention_forward's ``run`` for dropout_p > 0: the dropout twin of the plain or biased kernel, the stream's
    (seed, offset) read per call. ``backend``: (the backend to launch on, the one the caller named)."""
    extra = (*philox_args(rng), dropout_threshold(p), dropout_scale(p))
    if bias is None:
        launch = tuned_launcher(attention_fwd_dropout_kernel, (q, k, v, o, lse, scale, *extra), *backend, **consts)

        def run(q, k, v, *_, rng=None, **__):
            o, lse = outputs(q)
            launch((q, k, v, o, lse, scale, *philox_args(rng), *extra[2:]))
            return (o, lse, None) if with_stats else (o, lse)
    else:
        launch = tuned_launcher(attention_fwd_bias_dropout_kernel,
                                (q, k, v, bias, o, lse, stats_buffer(q), scale, *extra), *backend, **consts)

        def run(q, k, v, *_, attn_mask=None, rng=None, **__):
            o, lse = outputs(q)
            stats = stats_buffer(q)
            launch((q, k, v, mask_as_bias(attn_mask, shape), o, lse, stats, scale, *philox_args(rng),
                    *extra[2:]))
            return (o, lse, stats) if with_stats else (o, lse)
    return run
