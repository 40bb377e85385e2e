"""Explicit-hardware ops (staged shared buffers, async loads and waits, async mma and its wait, warp roles): a
hand-scheduled attention forward (a producer role loading K/V stages, two ping-pong consumer roles doing mma and
softmax) computes what float64 attention does on the reference executor (synchronous semantics) and under the
Triton interpreter (the ops erased by the Triton passes); misuse is refused with the op and line."""

import math

import pytest
import torch

import tilestack.lang as ts
from tilestack.errors import BackendError, TileShapeError, TraceError

LOG2E = math.log2(math.e)
BACKENDS = ("reference", "triton")
F32_4 = ts.ArgSpec(ts.f32, 4)


@ts.kernel(grid=lambda Q, BM: (ts.cdiv(Q.shape[2], BM), Q.shape[0] * Q.shape[1]))
def attention_hs(Q, K, V, O, scale: float, *, BM: int = 32, BN: int = 16, D: int = 16, STAGES: int = 2):
    i, bh = ts.block_id(0), ts.block_id(1)
    H, Nk = Q.shape[1], K.shape[2]
    b, h = bh // H, bh % H
    HALF = BM // 2                                     # each consumer role owns half the query rows
    kv_k = ts.SharedStages[K.dtype, STAGES, BN, D]()   # rings the producer fills
    kv_v = ts.SharedStages[V.dtype, STAGES, BN, D]()
    k_s = ts.SharedTile[K.dtype, BN, D]()
    v_s = ts.SharedTile[V.dtype, BN, D]()
    roles = ("consumer0", "consumer1")
    q, acc, m, l = [], [], [], []
    for g, role in enumerate(roles):
        with ts.partition(role, warps=4, registers=240):
            q.append(ts.RegTile[Q.dtype, HALF, D]())
            ts.load(q[g], Q, at=(b, h, 2 * i + g, 0))                     # (HALF, D)
            acc.append(ts.RegTile[ts.f32, HALF, D]())
            ts.zero(acc[g])
            m.append(ts.RegVec[ts.f32, HALF]())
            ts.neg_infty(m[g])
            l.append(ts.RegVec[ts.f32, HALF]())
            ts.zero(l[g])
    for j in ts.range(ts.cdiv(Nk, BN)):
        st = j % STAGES
        with ts.partition("producer", warps=4, registers=24):
            ts.async_load(kv_k, st, K, at=(b, h, j, 0))                  # (BN, D) into stage st
            ts.async_load(kv_v, st, V, at=(b, h, j, 0))
        for g, role in enumerate(roles):                                   # ping-pong: one role's mma, then the other's
            with ts.partition(role, warps=4, registers=240):
                ts.wait_load(k_s, kv_k, st)
                ts.wait_load(v_s, kv_v, st)
                s = ts.RegTile[ts.f32, HALF, BN]()
                ts.zero(s)
                ts.mma_ABt_async(s, q[g], k_s, s)                          # (HALF, BN) scores, in flight
                ts.mma_wait(s)
                ts.mul(s, s, scale * LOG2E)
                ts.right_fill(s, s, Nk - j * BN, -math.inf)                # keys past the end
                m_new = ts.RegVec[ts.f32, HALF]()
                ts.row_max(m_new, s, m[g])
                alpha = ts.RegVec[ts.f32, HALF]()
                ts.sub(alpha, m[g], m_new)
                ts.exp2(alpha, alpha)
                ts.sub_row(s, s, m_new)
                ts.exp2(s, s)
                ts.mul_row(acc[g], acc[g], alpha)
                ts.mul(l[g], l[g], alpha)
                ts.row_sum(l[g], s, l[g])
                p = ts.RegTile[V.dtype, HALF, BN]()
                ts.copy(p, s)
                ts.mma_AB_async(acc[g], p, v_s, acc[g])
                ts.mma_wait(acc[g])
                ts.copy(m[g], m_new)
    for g, role in enumerate(roles):
        with ts.partition(role, warps=4, registers=240):
            ts.div_row(acc[g], acc[g], l[g])
            o = ts.RegTile[O.dtype, HALF, D]()
            ts.copy(o, acc[g])
            ts.store(O, o, at=(b, h, 2 * i + g, 0))


def attention64(q, k, v, scale):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    return torch.softmax(s, dim=-1) @ v.double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("nq", "nk"), [(40, 37), (32, 16), (1, 1)])
def test_hand_scheduled_attention_matches_float64(backend, nq, nk):
    g = torch.Generator().manual_seed(nq * 100 + nk)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g) for n in (nq, nk, nk))
    o = torch.full_like(q, float("nan"))
    attention_hs(q, k, v, o, 0.25, backend=backend)
    torch.testing.assert_close(o.double(), attention64(q, k, v, 0.25), rtol=1e-5, atol=1e-5)


def test_the_ir_holds_stages_async_ops_and_roles():
    text = str(attention_hs.trace(F32_4, F32_4, F32_4, F32_4, 1.0).ir)
    assert "role producer: warps=4 registers=24 groups=1" in text
    assert "role consumer0: warps=4 registers=240" in text and "role consumer1:" in text
    assert "= stages() : SharedStages[f32, 2 x 16, 16] #kv_k" in text   # the buffer named by its first hint
    assert "[producer] %kv_k" in text and "= async_load(" in text
    assert "[consumer1] %k_s" in text and "= wait_load(" in text
    assert "= mma_async trans_a=False trans_b=True(" in text and "= mma_wait(" in text


def test_triton_erases_them_and_pipelines_the_loop_by_the_stage_count():
    traced = attention_hs.trace(F32_4, F32_4, F32_4, F32_4, 1.0)
    erased = str(traced.ir_after("dce.erased"))
    for op in ("stages(", "async_load", "wait_load", "mma_async", "mma_wait", "[producer]", "role "):
        assert op not in erased, op
    assert "range stages=2(" in erased
    src = traced.source()
    assert "num_stages=2" in src and src.count("tl.dot(") == 4


def test_shared_budget_counts_every_stage():
    cost = attention_hs.trace(F32_4, F32_4, F32_4, F32_4, 1.0).cost(*((1, 1, 16, 16),) * 4, 1.0)
    # two rings of 2 stages of (16, 16) f32, and the two stage tiles
    assert cost.shared_bytes == 2 * 2 * 16 * 16 * 4 + 2 * 16 * 16 * 4


def one_tile(body):
    @ts.kernel(grid=lambda: (1,))
    def k(X, Y):
        body(X, Y)
    return k


def test_reading_an_async_mma_before_its_wait_is_refused():
    def body(X, Y):
        a = ts.RegTile[ts.f32, 16, 16]()
        ts.load(a, X, at=(0, 0))
        acc = ts.RegTile[ts.f32, 16, 16]()
        ts.zero(acc)
        ts.mma_AB_async(acc, a, a, acc)
        ts.exp(acc, acc)
        ts.store(Y, acc, at=(0, 0))

    with pytest.raises(TraceError, match=r"unary: reads %acc\d+, an async mma's result, before mma_wait"):
        one_tile(body).trace(ts.ArgSpec(ts.f32, 2), ts.ArgSpec(ts.f32, 2))


@pytest.mark.parametrize(("decls", "message"), [
    ([("p", 4, 24), ("p", 8, 24)], "role p was declared as"),
    ([("c", 8, 256), ("d", 8, 256)], "registers; an SM has 65536"),
    ([("c", 4, 100)], "registers 24..256 in steps of 8"),
])
def test_roles_keep_their_numbers_and_fit_the_register_file(decls, message):
    def body(X, Y):
        t = ts.RegTile[ts.f32, 16, 16]()
        ts.load(t, X, at=(0, 0))
        for name, warps, regs in decls:
            with ts.partition(name, warps=warps, registers=regs):
                ts.exp(t, t)
        ts.store(Y, t, at=(0, 0))

    with pytest.raises(TraceError, match=message):
        one_tile(body).trace(ts.ArgSpec(ts.f32, 2), ts.ArgSpec(ts.f32, 2))


def staged_copy(stage_of_wait):
    def body(X, Y):
        buf = ts.SharedStages[ts.f32, 2, 16, 16]()
        t = ts.SharedTile[ts.f32, 16, 16]()
        for j in ts.range(2):
            s = j % 2
            ts.async_load(buf, s, X, at=(j, 0))
            ts.wait_load(t, buf, stage_of_wait(s, j))
            r = ts.RegTile[ts.f32, 16, 16]()
            ts.copy(r, t)
            ts.store(Y, r, at=(j, 0))
    return one_tile(body)


def test_a_stage_read_before_any_load_is_nan_on_the_reference_and_refused_by_triton():
    k = staged_copy(lambda s, j: (j + 1) % 2)           # waits on the other stage: loaded in another iteration
    x, y = torch.randn(32, 16), torch.zeros(32, 16)
    k(x, y, backend="reference")
    assert y[:16].isnan().all() and torch.equal(y[16:], x[:16])   # iteration 1 reads what iteration 0 loaded
    with pytest.raises(BackendError, match="erases staged loads only where a wait_load reads the stage"):
        k.trace(x, y).source()


def test_a_stage_out_of_range_fails_on_the_reference_and_at_trace_time_when_known():
    with pytest.raises(BackendError, match="wait_load of stage 2 in a buffer of 2 stages"):
        staged_copy(lambda s, j: s + 2)(torch.randn(32, 16), torch.zeros(32, 16), backend="reference")
    with pytest.raises(TileShapeError, match="stage 5 of `buf`, which has 2 stages"):
        staged_copy(lambda s, j: 5).trace(ts.ArgSpec(ts.f32, 2), ts.ArgSpec(ts.f32, 2))
