"""Attention backward as Hopper kernels schedule it: warp-specialized, in the language's explicit-hardware ops.

    dq, dk, dv = attention_backward(q, k, v, o, lse, do, causal=True, backend="gluon",
                                    config={"dkdv": {"schedule": "ws"}, "dq": {"schedule": "ws"}})

The same meaning as the split kernels of ``attention_bwd`` (GQA, power-of-two head tiles, Dv != D, ragged lengths,
top-left and bottom-right causal; no bias, no dropout), the same three launches (delta, then these two), each
scheduled by hand the way FlashAttention-3 schedules its backward:

- ``attention_bwd_dkdv_ws_kernel``: a program per (key block of BN rows, batch * K/V head, or query head with
  ``PER_Q_HEAD``). A producer warpgroup streams each query block's Q and dO into rings of ``STAGES`` shared buffers
  with the copy engine; two consumer warpgroups own BN / 2 keys each (their K, V in shared memory, their dK, dV
  accumulators in registers) and take every query block in the key-major orientation, so that P^T and dS^T, the
  left operands of dV += P^T dO and dK += dS^T Q, are made in registers where wgmma takes them from:
      S^T = K Q^T,  dP^T = V dO^T   (issued together, one wait)
      P^T = exp2(S^T c - lse),  dS^T = P^T (dP^T - delta)
      dV += P^T dO,  dK += dS^T Q   (issued together, waited within the trip)
- ``attention_bwd_dq_ws_kernel``: a program per (query block of BM rows, batch * head). The producer streams K and
  V; two consumer warpgroups own BM / 2 query rows each (Q and dO in shared memory, dQ in registers):
      S = Q K^T,  dP = dO V^T,  dS = P (dP - delta),  dQ += dS K.

With ``TURNS`` the two consumers issue their products in turn (``ts.turn``, named barriers on Gluon), so that
one's run on the matrix units while the other does its element-wise work. Each consumer's register budget is set
(``setmaxnreg``): 240 where the producer takes 32, so the two f32 accumulators of a dK/dV consumer (BN / 2 x D
each) stay in registers at head dim 128, where the Triton kernel spills them (docs/performance.md, "Attention
backward at head dim 128"; a few of the consumer's scalars still spill at query blocks of 64). On the Gluon
backend the roles become ``gl.warp_specialize`` partitions; the Triton backend drops the roles (a plain kernel),
the reference runs the program in order. ``attention_backward`` launches them for a part whose config says
``"schedule": "ws"`` (the tuning tables can carry it) on the Gluon backend, when the launch has no mask, no
dropout, 16-bit inputs and TMA-able tensors; otherwise the split kernels run.
"""

from __future__ import annotations

import contextlib
import math

import tilestack.lang as ts
from tilestack.errors import BackendError, LaunchError
from tilestack.kernels import attention_fwd  # its HEAD_GROUP, read when a kernel is traced
from tilestack.kernels.attention_bwd import _lse_log2, key_block_queries
from tilestack.kernels.attention_fwd import LOG2E, causal_diagonal, causal_shift, heavy_first, query_block_keys
from tilestack.tune.lookup import tuned_launcher

ROLES = ("consumer0", "consumer1")
CONSUMER = dict(warps=4, registers=240)
PRODUCER = dict(warps=4, registers=32)
SCHEDULES = ("split", "ws")          # the ``schedule`` config key of attention_backward's dkdv and dq parts
# attention_backward's configs for them where no table chose theirs: FlashAttention-3's tiles at head dim 128
# (query blocks of 64 against key blocks of 128 in dK/dV; the dQ kernel as the forward's ping-pong)
WS_DEFAULTS = {"dkdv": dict(BM=64, BN=128, STAGES=2), "dq": dict(BM=128, BN=64, STAGES=2)}


# ---- dK, dV ----------------------------------------------------------------------------------------------------------
def _in_turn(turns: bool):
    """The consumers' products issued in turn (``ts.turn``: one's run on the matrix units while the other does its
    element-wise work, as FlashAttention-3's forward ping-pong), or as they come."""
    return ts.turn(*ROLES) if turns else contextlib.nullcontext()


def _dkdv_trip(t, i, h, *, masked: bool, diagonal: bool, b, j, k, v, dk, dv, q_ring, do_ring, q_s, do_s, Q, dO,
               LSE, Delta, qk_scale, shift, HALF: int, BM: int, STAGES: int, TURNS: bool):
    """Query block i of query head h, the program's t-th trip: the producer's loads, then each consumer's share of
    the block pair (its HALF keys against the BM queries). ``masked``: queries past Nq (columns here), and the
    causal diagonal if ``diagonal``."""
    st = t % STAGES
    with ts.partition("producer", **PRODUCER):
        ts.async_load(q_ring, st, Q, at=(b, h, i, 0))          # (BM, D); past Nq: zeros
        ts.async_load(do_ring, st, dO, at=(b, h, i, 0))        # (BM, DV)
    for g, role in enumerate(ROLES):
        with ts.partition(role, **CONSUMER):
            lse = ts.RegVec[ts.f32, BM]()                      # per query: per column of S^T
            ts.load(lse, LSE, at=(b, h, i))
            _lse_log2(lse)
            delta = ts.RegVec[ts.f32, BM]()
            ts.load(delta, Delta, at=(b, h, i))
            ts.wait_load(q_s, q_ring, st)
            ts.wait_load(do_s, do_ring, st)
            s = ts.RegTile[ts.f32, HALF, BM]()                 # S^T = K_g Q^T
            ts.zero(s)
            dp = ts.RegTile[ts.f32, HALF, BM]()                # dP^T = V_g dO^T
            ts.zero(dp)
            with _in_turn(TURNS):
                ts.mma_ABt_async(s, k[g], q_s, s)
                ts.mma_ABt_async(dp, v[g], do_s, dp)
            ts.mma_wait(s)                                     # (and dp: a wait retires every product before it)
            ts.mma_wait(dp)
            ts.mul(s, s, qk_scale)
            ts.sub_col(s, s, lse)                              # before the masks (attention_bwd._probabilities)
            if masked:
                ts.right_fill(s, s, Q.shape[2] - i * BM, -math.inf)        # queries past Nq
                if diagonal:   # keep key <= query + shift: row - col <= d, i.e. col - row >= -d
                    ts.triu(s, s, -causal_diagonal(i, 2 * j + g, BM, HALF, shift), -math.inf)
            ts.min(s, s, 0.0)                                  # P^T <= 1 (see attention_bwd._probabilities)
            ts.exp2(s, s)                                      # P^T
            ts.sub_col(dp, dp, delta)
            ts.mul(dp, dp, s)                                  # dS^T
            p = ts.RegTile[Q.dtype, HALF, BM]()                # each f32 tile narrowed when it is last read
            ts.copy(p, s)
            ds = ts.RegTile[Q.dtype, HALF, BM]()
            ts.copy(ds, dp)
            with _in_turn(TURNS):
                ts.mma_AB_async(dv[g], p, do_s, dv[g])         # (HALF, DV) += P^T dO
                ts.mma_AB_async(dk[g], ds, q_s, dk[g])         # (HALF, D) += dS^T Q
            ts.mma_wait(dv[g])                                 # nothing in flight past the trip
            ts.mma_wait(dk[g])


def _grid_kv(K, dK, BN):
    return (ts.cdiv(K.shape[2], BN), dK.shape[0] * dK.shape[1])     # dK's heads: K's, or Q's per query head


@ts.kernel(grid=_grid_kv)
def attention_bwd_dkdv_ws_kernel(Q, K, V, dO, LSE, Delta, dK, dV, scale: float, *, D: int, DV: int | None = None,
                                 causal: bool = False, causal_align: str = "top_left",
                                 BM: int = ts.tunable(64, (16, 32, 64, 128)),
                                 BN: int = ts.tunable(128, (32, 64, 128, 256)),
                                 STAGES: int = ts.tunable(2, (2, 3)),
                                 TURNS: bool = ts.tunable(False, (False, True)),
                                 PER_Q_HEAD: bool = False):
    """dK (like K) and dV (like V), as ``attention_bwd_dkdv_kernel``'s (``PER_Q_HEAD``: each query head's share,
    (B, H, Nk, *), summed over its group by the caller); BN / 2 keys a consumer (at least wgmma's 64 rows)."""
    DV = D if DV is None else DV
    # key block 0 is seen by the most query rows
    j, bh = heavy_first(causal, last_heaviest=False, group=attention_fwd.HEAD_GROUP)
    Hkv = K.shape[1]
    group = Q.shape[1] // Hkv
    if PER_Q_HEAD:
        b, out_h = bh // Q.shape[1], bh % Q.shape[1]
        hk, first_h, heads = out_h // group, out_h, 1
    else:
        b, out_h = bh // Hkv, bh % Hkv
        hk, first_h, heads = out_h, out_h * group, group
    shift = causal_shift(Q, K, causal, causal_align)
    HALF = BN // 2
    q_ring = ts.SharedStages[Q.dtype, STAGES, BM, D]()
    do_ring = ts.SharedStages[dO.dtype, STAGES, BM, DV]()
    q_s = ts.SharedTile[Q.dtype, BM, D]()
    do_s = ts.SharedTile[dO.dtype, BM, DV]()
    k, v, dk, dv = [], [], [], []
    for g, role in enumerate(ROLES):
        with ts.partition(role, **CONSUMER):
            k.append(ts.SharedTile[K.dtype, HALF, D]())
            ts.load(k[g], K, at=(b, hk, 2 * j + g, 0))
            v.append(ts.SharedTile[V.dtype, HALF, DV]())
            ts.load(v[g], V, at=(b, hk, 2 * j + g, 0))
            dk.append(ts.RegTile[ts.f32, HALF, D]())
            ts.zero(dk[g])
            dv.append(ts.RegTile[ts.f32, HALF, DV]())
            ts.zero(dv[g])
    first, full, tail, n_q_blocks = key_block_queries(j, Q.shape[2], BM, BN, causal, shift)
    per_head = n_q_blocks - first                              # trips a head takes (the rings' stage: trip % STAGES)
    tiles = dict(b=b, j=j, k=k, v=v, dk=dk, dv=dv, q_ring=q_ring, do_ring=do_ring, q_s=q_s, do_s=do_s, Q=Q, dO=dO,
                 LSE=LSE, Delta=Delta, qk_scale=scale * LOG2E, shift=shift, HALF=HALF, BM=BM, STAGES=STAGES,
                 TURNS=TURNS)
    for g_h in ts.range(heads):
        h = first_h + g_h
        t0 = g_h * per_head - first
        if causal:                                             # the diagonal (and maybe the ragged last block)
            for i in ts.range(first, full):
                _dkdv_trip(t0 + i, i, h, masked=True, diagonal=True, **tiles)
        for i in ts.range(full, tail):
            _dkdv_trip(t0 + i, i, h, masked=False, diagonal=False, **tiles)
        for i in ts.range(tail, n_q_blocks):                   # the ragged last query block, past the diagonal
            _dkdv_trip(t0 + i, i, h, masked=True, diagonal=False, **tiles)
    for g, role in enumerate(ROLES):
        with ts.partition(role, **CONSUMER):
            ts.mul(dk[g], dk[g], scale)
            out_k = ts.RegTile[dK.dtype, HALF, D]()
            ts.copy(out_k, dk[g])
            ts.store(dK, out_k, at=(b, out_h, 2 * j + g, 0))
            out_v = ts.RegTile[dV.dtype, HALF, DV]()
            ts.copy(out_v, dv[g])
            ts.store(dV, out_v, at=(b, out_h, 2 * j + g, 0))


# ---- dQ --------------------------------------------------------------------------------------------------------------
def _dq_trip(j, *, masked: bool, causal: bool, b, hk, i, q, do, lse, delta, dq, k_ring, v_ring, k_s, v_s, K, V,
             qk_scale, shift, HALF: int, BN: int, STAGES: int, TURNS: bool):
    """Key block j: the producer's loads, then each consumer's dS of its HALF query rows and dQ += dS K."""
    st = j % STAGES
    with ts.partition("producer", **PRODUCER):
        ts.async_load(k_ring, st, K, at=(b, hk, j, 0))         # (BN, D); past Nk: zeros
        ts.async_load(v_ring, st, V, at=(b, hk, j, 0))         # (BN, DV)
    for g, role in enumerate(ROLES):
        with ts.partition(role, **CONSUMER):
            ts.wait_load(k_s, k_ring, st)
            ts.wait_load(v_s, v_ring, st)
            s = ts.RegTile[ts.f32, HALF, BN]()                 # S = Q_g K^T
            ts.zero(s)
            dp = ts.RegTile[ts.f32, HALF, BN]()                # dP = dO_g V^T
            ts.zero(dp)
            with _in_turn(TURNS):
                ts.mma_ABt_async(s, q[g], k_s, s)
                ts.mma_ABt_async(dp, do[g], v_s, dp)
            ts.mma_wait(s)
            ts.mma_wait(dp)
            ts.mul(s, s, qk_scale)
            ts.sub_row(s, s, lse[g])                           # before the masks (attention_bwd._probabilities)
            if masked:         # keys past Nk (a zero key's P = exp2(-lse) may overflow, and dQ = dS K sums keys)
                ts.right_fill(s, s, K.shape[2] - j * BN, -math.inf)
                if causal:
                    ts.make_causal(s, s, causal_diagonal(2 * i + g, j, HALF, BN, shift))
            ts.min(s, s, 0.0)                                  # P <= 1 (see attention_bwd._probabilities)
            ts.exp2(s, s)                                      # P
            ts.sub_row(dp, dp, delta[g])
            ts.mul(dp, dp, s)                                  # dS
            ds = ts.RegTile[K.dtype, HALF, BN]()
            ts.copy(ds, dp)
            with _in_turn(TURNS):
                ts.mma_AB_async(dq[g], ds, k_s, dq[g])         # (HALF, D) += dS K
            ts.mma_wait(dq[g])


def _grid_q(Q, BM):
    return (ts.cdiv(Q.shape[2], BM), Q.shape[0] * Q.shape[1])


@ts.kernel(grid=_grid_q)
def attention_bwd_dq_ws_kernel(Q, K, V, dO, LSE, Delta, dQ, scale: float, *, D: int, DV: int | None = None,
                               causal: bool = False, causal_align: str = "top_left",
                               BM: int = ts.tunable(128, (32, 64, 128, 256)),
                               BN: int = ts.tunable(64, (16, 32, 64, 128)),
                               STAGES: int = ts.tunable(2, (2, 3)),
                               TURNS: bool = ts.tunable(False, (False, True))):
    """dQ (like Q), as ``attention_bwd_dq_kernel``'s; BM / 2 query rows a consumer (at least wgmma's 64)."""
    DV = D if DV is None else DV
    i, bh = heavy_first(causal, last_heaviest=True, group=attention_fwd.HEAD_GROUP)
    H = Q.shape[1]
    b, h = bh // H, bh % H
    hk = h // (H // K.shape[1])
    shift = causal_shift(Q, K, causal, causal_align)
    HALF = BM // 2
    k_ring = ts.SharedStages[K.dtype, STAGES, BN, D]()
    v_ring = ts.SharedStages[V.dtype, STAGES, BN, DV]()
    k_s = ts.SharedTile[K.dtype, BN, D]()
    v_s = ts.SharedTile[V.dtype, BN, DV]()
    q, do, lse, delta, dq = [], [], [], [], []
    for g, role in enumerate(ROLES):
        with ts.partition(role, **CONSUMER):
            q.append(ts.SharedTile[Q.dtype, HALF, D]())
            ts.load(q[g], Q, at=(b, h, 2 * i + g, 0))
            do.append(ts.SharedTile[dO.dtype, HALF, DV]())
            ts.load(do[g], dO, at=(b, h, 2 * i + g, 0))
            lse.append(ts.RegVec[ts.f32, HALF]())
            ts.load(lse[g], LSE, at=(b, h, 2 * i + g))
            _lse_log2(lse[g])
            delta.append(ts.RegVec[ts.f32, HALF]())
            ts.load(delta[g], Delta, at=(b, h, 2 * i + g))
            dq.append(ts.RegTile[ts.f32, HALF, D]())
            ts.zero(dq[g])
    n_full, n_blocks = query_block_keys(i, K.shape[2], BM, BN, causal, shift)
    tiles = dict(b=b, hk=hk, i=i, q=q, do=do, lse=lse, delta=delta, dq=dq, k_ring=k_ring, v_ring=v_ring, k_s=k_s,
                 v_s=v_s, K=K, V=V, qk_scale=scale * LOG2E, causal=causal, shift=shift, HALF=HALF, BN=BN,
                 STAGES=STAGES, TURNS=TURNS)
    for j in ts.range(0, n_full):
        _dq_trip(j, masked=False, **tiles)
    for j in ts.range(n_full, n_blocks):                       # the ragged end of the keys and the causal diagonal
        _dq_trip(j, masked=True, **tiles)
    for g, role in enumerate(ROLES):
        with ts.partition(role, **CONSUMER):
            ts.mul(dq[g], dq[g], scale)
            out = ts.RegTile[dQ.dtype, HALF, D]()
            ts.copy(out, dq[g])
            ts.store(dQ, out, at=(b, h, 2 * i + g, 0))


# attention_backward's choice between these kernels and the split ones, per part of its config

def ws_parts(cfg: dict, caller: dict, dtype, split_config, *, with_mask: bool, fused: bool) -> dict:
    """Per part (dkdv, dq): the config of attention_bwd_ws's kernel where that part's config says
    schedule="ws" and the launch can take it (16-bit inputs, no mask or dropout, dQ not fused into dK/dV), else
    None; the ``schedule`` key taken out of every part's config (the split kernels have no such constant). A
    table's entry that chose "ws" carries that kernel's config; a caller's schedule="ws" over a table entry tuned
    for the split kernel takes ``WS_DEFAULTS`` under the caller's own keys. Where a table's entry chose "ws",
    ``cfg[part]`` becomes ``split_config(part)`` (its STAGES and tiles are not the split kernel's), for the
    launches that run the split kernel (a mask, dropout, or a ws launch the backend refuses)."""
    import torch

    out = {}
    for part in ("dkdv", "dq", "dkdvdq", "delta"):
        c = cfg.get(part)
        schedule = c.pop("schedule", "split") if c is not None else "split"
        if schedule not in SCHEDULES:
            raise LaunchError(f"attention_backward: config[{part!r}]['schedule'] is {schedule!r}; expected one of "
                              f"{SCHEDULES} ('ws': kernels.attention_bwd_ws, warp-specialized)")
        if schedule == "ws" and part not in WS_DEFAULTS and caller.get(part, {}).get("schedule") == "ws":
            raise LaunchError(f"attention_backward: config[{part!r}] has schedule='ws'; only the parts "
                              f"{sorted(WS_DEFAULTS)} have a warp-specialized kernel")
        if part not in WS_DEFAULTS:
            continue
        mine = caller.get(part, {})
        able = dtype in (torch.bfloat16, torch.float16) and not with_mask and not fused
        asked = mine.get("schedule") == "ws"
        if schedule != "ws" or not able:
            out[part] = None
        elif asked:                            # the caller asked: defaults under the caller's keys
            refuse_unknown_ws_keys(part, mine)
            out[part] = WS_DEFAULTS[part] | {k: v for k, v in mine.items() if k != "schedule"}
        else:
            out[part] = dict(c)
        if schedule == "ws":                   # the split kernel, where it runs, at a config of its own
            plain = cfg[part] if asked else split_config(part)
            cfg[part] = {k: v for k, v in plain.items() if k not in WS_ONLY and k != "schedule"}
    return out


def refuse_unknown_ws_keys(part: str, caller: dict) -> None:
    """The caller's config keys of a ws part that neither its kernel nor any backend takes (a misspelling:
    STAGE=3), refused by name with the nearest: ``ws_launcher`` keeps only the kernel's own keys."""
    import difflib

    from tilestack.backends import launch_option_names

    kernel = attention_bwd_dkdv_ws_kernel if part == "dkdv" else attention_bwd_dq_ws_kernel
    unknown = sorted(set(caller) - set(kernel.tunables) - launch_option_names() - {"schedule", "backend"})
    if unknown:
        near = {u: difflib.get_close_matches(u, sorted(kernel.tunables), n=1) for u in unknown}
        hint = "".join(f" ({u!r}: did you mean {m[0]!r}?)" for u, m in near.items() if m)
        raise LaunchError(f"attention_backward: config[{part!r}] with schedule='ws' has key(s) {unknown}{hint} that "
                          f"are not {kernel.name}'s; expected its tunables {sorted(kernel.tunables)}")


WS_ONLY = ("STAGES", "TURNS")   # the ws kernels' tunables that the split kernels do not have


def ws_launcher(part: str, args: tuple, backends: tuple, consts: dict, cfg: dict, **extra):
    """The launcher of attention_bwd_ws's kernel for ``part`` (dkdv or dq), or None where a backend the tables
    chose cannot launch it (the split kernel then runs); a named backend's refusal raises. A consumer owns half a
    block: on the Gluon backend at least wgmma's 64 rows, so the halved block is at least 128."""
    kernel = attention_bwd_dkdv_ws_kernel if part == "dkdv" else attention_bwd_dq_ws_kernel
    backend, asked = backends
    if asked is None and "backend" in cfg:   # the table entry's own backend (the part's split config has its own)
        backend = cfg["backend"]
    halved = "BN" if part == "dkdv" else "BM"
    keep = {key: cfg[key] for key in ("BM", "BN", "STAGES", "TURNS") if key in cfg}
    keep[halved] = max(keep.get(halved, WS_DEFAULTS[part][halved]), 128 if backend == "gluon" else 32)
    try:
        return tuned_launcher(kernel, args, backend, asked, **consts, **keep, **extra)
    except (BackendError, LaunchError):
        if asked is not None:
            raise
        return None
