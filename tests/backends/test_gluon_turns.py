"""Turns among warp roles (ts.turn): FlashAttention-3's ping-pong of two consumer warpgroups' matrix products, as
kernels/attention_fwd_pingpong takes them. Their meaning is timing only (the reference runs program order, the
Triton backend drops them); the Gluon backend makes each role's turn a named barrier it syncs on and the previous
role arrives at; the checks refuse a turn that could hang (outside its roles, unbalanced, roles taking different
numbers of turns in a loop)."""

import math
import re

import pytest
import torch

import tilestack.lang as ts
from tilestack import config
from tilestack.backends import get_backend
from tilestack.errors import TraceError
from tilestack.kernels.attention_fwd import attention_forward
from tilestack.kernels.attention_fwd_pingpong import attention_fwd_pingpong_kernel as pingpong

ROLES = ("consumer0", "consumer1")
BF16_4, F32_3 = ts.ArgSpec(ts.bf16, 4), ts.ArgSpec(ts.f32, 3)


def traced_pingpong(**consts):
    return pingpong.trace(BF16_4, BF16_4, BF16_4, BF16_4, F32_3, 1.0, **{"D": 128, "BN": 64, **consts})


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize(("nq", "nk", "causal"), [(130, 200, False), (64, 64, True), (100, 77, True)])
def test_the_turns_change_when_never_what(backend, nq, nk, causal):
    # kernels/attention_fwd_pingpong against the plain kernel at the same blocks: the same bits
    g = torch.Generator().manual_seed(nq * 7 + nk)
    q, k, v = (torch.randn(1, 2, n, 64, generator=g).bfloat16() for n in (nq, nk, nk))
    with config.override(triton_interpret=True):
        ping = attention_forward(q, k, v, causal, backend=backend, schedule="pingpong", BM=32, BN=16)
        plain = attention_forward(q, k, v, causal, backend=backend, BM=32, BN=16)
    if backend == "reference":
        assert torch.equal(ping[0], plain[0]) and torch.equal(ping[1], plain[1])
    else:
        # Triton's interpreter runs tl.dot through numpy's BLAS, whose kernels may round a product of 16 rows (a
        # consumer's) and of 32 (the plain kernel's) differently: on an AVX2 OpenBLAS every one of 200 random
        # (32, 64) x (64, 16) products differed from its two halves in some bit; the AVX-512 kernels agreed. Those
        # last bits carry through the online softmax: the LSE within a few f32 ulps, o within one bf16 ulp
        torch.testing.assert_close(ping[1], plain[1], rtol=2e-6, atol=0)
        assert ulps(ping[0], plain[0]) <= 1


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The most units in the last place between a and b (same dtype, finite, same signs)."""
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return int((a.view(ints).long() - b.view(ints).long()).abs().max()) if a.numel() else 0


def barriers(text: str) -> list[tuple[str, int, int]]:
    return [(kind, int(bar), int(n)) for kind, bar, n in re.findall(r"bar\.(sync|arrive) (\d+), (\d+);", text)]


def test_gluon_makes_each_turn_a_named_barrier_the_previous_role_arrives_at():
    src = get_backend("gluon").source(traced_pingpong())
    compile(src, "<gluon pingpong>", "exec")
    part = {r: src.split(f"def attention_fwd_pingpong_kernel_{r}(")[1].split("@gluon.jit")[0]
            for r in (*ROLES, "producer")}
    first, second = part["consumer0"], part["consumer1"]
    # consumer0 waits on barrier 15 and hands on at 14; consumer1 the other way round; 2 x 4 warps at each; in each
    # of the two loops (full key blocks, masked ones)
    loops0, loops1 = first.split("for j_")[1:], second.split("for j_")[1:]
    assert len(loops0) == len(loops1) == 2
    for loop0, loop1 in zip(loops0, loops1, strict=True):
        assert barriers(loop0)[:2] == [("sync", 15, 256), ("arrive", 14, 256)]
        assert barriers(loop1)[:2] == [("sync", 14, 256), ("arrive", 15, 256)]
        # ... around both of the trip's products, issued together
        turn = loop0.split("bar.sync 15")[1].split("bar.arrive 14")[0]
        assert turn.count("hopper.warpgroup_mma(") == 2 and "warpgroup_mma_wait" not in turn
    # the last role hands the first its first turn before its loops; the first takes the last one after them
    assert barriers(second.split("for j_")[0]) == [("arrive", 15, 256)]
    assert barriers(first.split("for j_")[0]) == []
    assert barriers(first)[-1] == ("sync", 15, 256) and first.rindex("bar.sync 15") > first.rindex("for j_")
    assert not barriers(part["producer"])                    # roles outside the order take no part
    # every arrival at a barrier is met by a sync there: at 15, one first plus one a trip; at 14, one a trip
    assert len(barriers(first)) == 2 * 2 + 1 and len(barriers(second)) == 2 * 2 + 1


def test_triton_drops_the_turns():
    src = get_backend("triton").source(traced_pingpong(D=64))
    assert "bar." not in src and "inline_asm" not in src


def test_the_ir_prints_the_turns():
    text = str(traced_pingpong(D=64).ir)
    assert "turn_wait" in text and "turn_pass" in text and "consumer0" in text


# ---- refusals: a turn that could hang is refused at trace time, naming the line ---------------------------------
G2 = ts.ArgSpec(ts.f32, 2)


def traced(body):
    @ts.kernel(grid=lambda X: (1,))
    def k(X, Y):
        body(X, Y)
    return lambda: k.trace(G2, G2)


def two_roles(first, second):
    """A kernel whose loop runs ``first`` in consumer0 and ``second`` in consumer1 (each a function of nothing)."""
    def body(X, Y):
        for _ in ts.range(4):
            with ts.partition("consumer0", warps=4, registers=240):
                first()
            with ts.partition("consumer1", warps=4, registers=240):
                second()
    return traced(body)


def one_turn():
    with ts.turn(*ROLES):
        pass


def test_a_turn_outside_its_roles_is_refused():
    with pytest.raises(TraceError, match=r"turn: taken outside any role"):
        traced(lambda X, Y: one_turn())()

    def body(X, Y):
        with ts.partition("producer", warps=4, registers=32), ts.turn(*ROLES):
            pass
    with pytest.raises(TraceError, match=r"taken inside role 'producer'; expected inside one of the roles"):
        traced(body)()


@pytest.mark.parametrize("roles", [("consumer0",), ("consumer0", "consumer0"), ("consumer0", "not a name"),
                                   ("consumer0", 3)])
def test_an_order_of_fewer_than_two_distinct_roles_is_refused(roles):
    def body(X, Y):
        with ts.partition("consumer0", warps=4, registers=240), ts.turn(*roles):
            pass
    with pytest.raises(TraceError, match=r"turn: roles=.*expected two or more distinct role names"):
        traced(body)()


def test_a_role_of_the_order_that_is_never_declared_is_refused():
    def body(X, Y):
        for _ in ts.range(2):
            with ts.partition("consumer0", warps=4, registers=240), ts.turn("consumer0", "ghost"):
                pass
    with pytest.raises(TraceError, match=r"role 'ghost' of the turn order .* is not declared"):
        traced(body)()


def test_a_role_taking_its_turns_in_a_loop_the_other_role_takes_none_in_is_refused():
    def body(X, Y):
        for _ in ts.range(4):
            with ts.partition("consumer0", warps=4, registers=240):
                one_turn()
        with ts.partition("consumer1", warps=4, registers=240):
            one_turn()
    with pytest.raises(TraceError, match=r"test_gluon_turns.py:\d+: turn_wait: in this loop the roles of the turn "
                                         r"order .* take \{'consumer0': [01], 'consumer1': [01]\} turns; each must "
                                         "take as many in each loop"):
        traced(body)()


def test_two_loops_each_balanced_trace():
    def body(X, Y):
        for n in (3, 5):
            for _ in ts.range(n):
                for role in ROLES:
                    with ts.partition(role, warps=4, registers=240):
                        one_turn()
    traced(body)()


def test_roles_taking_different_numbers_of_turns_are_refused():
    with pytest.raises(TraceError, match=r"take \{'consumer0': 2, 'consumer1': 1\} turns; each must take as many"):
        two_roles(lambda: (one_turn(), one_turn()), one_turn)()


def test_a_turn_inside_its_own_turn_is_refused():
    def nested():
        with ts.turn(*ROLES), ts.turn(*ROLES):
            pass
    with pytest.raises(TraceError, match=r"role 'consumer0' already holds its turn"):
        two_roles(nested, one_turn)()


def test_balanced_turns_trace():
    two_roles(one_turn, one_turn)()
    two_roles(lambda: (one_turn(), one_turn()), lambda: (one_turn(), one_turn()))()


def test_the_named_barriers_run_out_past_eight_roles_in_orders():
    roles = [f"r{k}" for k in range(9)]

    def body(X, Y):
        for _ in ts.range(2):
            for r in roles:
                with ts.partition(r, warps=4, registers=24), ts.turn(*roles):
                    pass
    from tilestack.errors import BackendError
    with pytest.raises(BackendError, match=r"named barriers; the gluon backend has 8 for them"):
        get_backend("gluon").source(traced(body)())


def test_the_sm90a_compile_keeps_the_barriers_and_the_wgmma_asynchronous():
    from tilestack.backends.gluon import aot
    try:
        aot.tool("ptxas")
        aot.tool("cuobjdump")
    except aot.ToolMissing as e:
        pytest.skip(str(e))
    be = get_backend("gluon")
    q = torch.empty(4, 16, 4096, 128, dtype=torch.bfloat16, device="meta")
    lse = torch.empty(4, 16, 4096, dtype=torch.float32, device="meta")
    k = be.aot(pingpong.trace(q, q, q, torch.empty_like(q), lse, 1 / math.sqrt(128), D=128, BN=64), be.Options())
    res, sass = aot.resources(k), aot.sass(k)
    assert res["spill_stores"] == res["spill_loads"] == 0 and not res["wgmma_serialized"], res["report"]
    assert "BAR.SYNC.DEFER_BLOCKING 0xf, 0x100" in sass and "BAR.ARV 0xe, 0x100" in sass
    assert "BAR.SYNC.DEFER_BLOCKING 0xe, 0x100" in sass and "BAR.ARV 0xf, 0x100" in sass
