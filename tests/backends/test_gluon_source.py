"""The Gluon backend's generated source (no GPU, no compile): the GEMM's pipelined TMA ring with mbarriers and
wgmma kept in flight, a hand-scheduled warp-specialized GEMM and the explicit attention forward as
gl.warp_specialize partitions with their register budgets, and the refusals that name the op and the line.
Compiling it for sm_90a is test_gluon_aot.py; running it, scripts/gpu/check_gluon.py on an H200."""

import importlib.util
import math
import pathlib
import re

import pytest
import torch

import tilestack.lang as ts
from tilestack.backends import get_backend
from tilestack.errors import BackendError, LaunchError, TraceError
from tilestack.ir.ops import EMITTERS, Op
from tilestack.kernels.gemm import gemm_kernel

BF16_2 = ts.ArgSpec(ts.bf16, 2)
BF16_4 = ts.ArgSpec(ts.bf16, 4)


def explicit_attention():
    """The hand-scheduled attention forward of tests/lang/test_explicit.py (one kernel, one place)."""
    path = pathlib.Path(__file__).parents[1] / "lang" / "test_explicit.py"
    spec = importlib.util.spec_from_file_location("tilestack_explicit_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.attention_hs


@ts.kernel(grid=lambda A, B, BM, BN: (ts.cdiv(A.shape[0], BM) * ts.cdiv(B.shape[1], BN),))
def gemm_ws(A, B, C, *, BM: int = 128, BN: int = 128, BK: int = 64, STAGES: int = 4):
    """C = A @ B, hand-scheduled: a producer warpgroup fills rings of A and B tiles, a consumer of two
    warpgroups waits on each stage and multiplies on wgmma, one wgmma in flight (waited after the loop)."""
    M, K = A.shape
    N = B.shape[1]
    pid = ts.block_id(0)
    i, j = pid // ts.cdiv(N, BN), pid % ts.cdiv(N, BN)
    a_ring = ts.SharedStages[A.dtype, STAGES, BM, BK]()
    b_ring = ts.SharedStages[B.dtype, STAGES, BK, BN]()
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    with ts.partition("consumer", warps=8, registers=232):
        acc = ts.RegTile[ts.f32, BM, BN]()
        ts.zero(acc)
    for k in ts.range(ts.cdiv(K, BK)):
        s = k % STAGES
        with ts.partition("producer", warps=4, registers=40):
            ts.async_load(a_ring, s, A, at=(i, k))          # (BM, BK) into stage s
            ts.async_load(b_ring, s, B, at=(k, j))          # (BK, BN)
        with ts.partition("consumer", warps=8, registers=232):
            ts.wait_load(a, a_ring, s)
            ts.wait_load(b, b_ring, s)
            ts.mma_AB_async(acc, a, b, acc)
    with ts.partition("consumer", warps=8, registers=232):
        ts.mma_wait(acc)
        c = ts.RegTile[C.dtype, BM, BN]()
        ts.copy(c, acc)
        ts.store(C, c, at=(i, j))


LOG2E = 1.4426950408889634


@ts.kernel(grid=lambda Q, BM: (ts.cdiv(Q.shape[2], BM), Q.shape[0] * Q.shape[1]))
def attention_fa3(Q, K, V, O, scale: float, *, BM: int = 128, BN: int = 128, D: int = 64, STAGES: int = 2,
                  CAUSAL: bool = False):
    """Attention forward, scheduled as FlashAttention-3 does on Hopper: a producer warpgroup loads K one block
    ahead and V into rings; two consumer warpgroups (64 query rows each) issue the next block's scores
    (S = Q K^T on wgmma) before the online softmax of this block's, so the matrix units work while it runs.
    CAUSAL: query r sees keys <= r (top-left aligned, Nq <= Nk); key blocks past the query block are skipped.
    Every wgmma of a trip is waited within the trip: one still in flight across the loop's back edge makes ptxas
    serialize every wgmma of the kernel (its C7512 notice, "insufficient register resources"; the H200 numbers
    of sessions 10-15 were of that serialized kernel)."""
    i, bh = ts.block_id(0), ts.block_id(1)
    H, Nk = Q.shape[1], K.shape[2]
    b, h = bh // H, bh % H
    HALF = BM // 2
    k_ring = ts.SharedStages[K.dtype, STAGES, BN, D]()
    v_ring = ts.SharedStages[V.dtype, STAGES, BN, D]()
    k_s = ts.SharedTile[K.dtype, BN, D]()
    v_s = ts.SharedTile[V.dtype, BN, D]()
    roles = ("consumer0", "consumer1")
    with ts.partition("producer", warps=4, registers=32):
        ts.async_load(k_ring, 0, K, at=(b, h, 0, 0))                  # block 0's keys, before the loop
    q, acc, m, lsum, s_next = [], [], [], [], []
    for g, role in enumerate(roles):
        with ts.partition(role, warps=4, registers=240):
            q.append(ts.RegTile[Q.dtype, HALF, D]())
            ts.load(q[g], Q, at=(b, h, 2 * i + g, 0))                   # (HALF, D)
            acc.append(ts.RegTile[ts.f32, HALF, D]())
            ts.zero(acc[g])
            m.append(ts.RegVec[ts.f32, HALF]())
            ts.neg_infty(m[g])
            lsum.append(ts.RegVec[ts.f32, HALF]())
            ts.zero(lsum[g])
            ts.wait_load(k_s, k_ring, 0)
            s_next.append(ts.RegTile[ts.f32, HALF, BN]())
            ts.zero(s_next[g])
            ts.mma_ABt_async(s_next[g], q[g], k_s, s_next[g])            # S_0
            ts.mma_wait(s_next[g])
    blocks = ts.cdiv(ts.smin(Nk, (i + 1) * BM), BN) if CAUSAL else ts.cdiv(Nk, BN)
    for j in ts.range(blocks):
        st, nx = j % STAGES, (j + 1) % STAGES
        with ts.partition("producer", warps=4, registers=32):
            ts.async_load(k_ring, nx, K, at=(b, h, j + 1, 0))           # the next block's keys (past the end: unused)
            ts.async_load(v_ring, st, V, at=(b, h, j, 0))
        for g, role in enumerate(roles):
            with ts.partition(role, warps=4, registers=240):
                s = ts.RegTile[ts.f32, HALF, BN]()                       # S_j
                ts.copy(s, s_next[g])
                ts.wait_load(k_s, k_ring, nx)
                ts.zero(s_next[g])
                ts.mma_ABt_async(s_next[g], q[g], k_s, s_next[g])        # S_{j+1}, under the softmax below
                ts.mul(s, s, scale * LOG2E)
                ts.right_fill(s, s, Nk - j * BN, -math.inf)              # keys past the end
                if CAUSAL:
                    ts.make_causal(s, s, (2 * i + g) * HALF - j * BN)        # keys after the query
                m_new = ts.RegVec[ts.f32, HALF]()
                ts.row_max(m_new, s, m[g])
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
                ts.mma_AB_async(acc[g], p, v_s, acc[g])
                ts.mma_wait(acc[g])
                ts.mma_wait(s_next[g])                                   # nothing in flight past the trip
                ts.copy(m[g], m_new)
    for g, role in enumerate(roles):
        with ts.partition(role, warps=4, registers=240):
            ts.div_row(acc[g], acc[g], lsum[g])
            o = ts.RegTile[O.dtype, HALF, D]()
            ts.copy(o, acc[g])
            ts.store(O, o, at=(b, h, 2 * i + g, 0))


def gemm_source(**options):
    return get_backend("gluon").source(gemm_kernel.trace(BF16_2, BF16_2, BF16_2), get_backend("gluon").Options(
        **options))


def test_gemm_is_a_pipelined_tma_ring_with_wgmma_in_flight():
    src = gemm_source()
    compile(src, "<gluon gemm>", "exec")                          # valid Python
    assert "@gluon.jit" in src and "def gemm_kernel_kernel(" in src
    # a ring of 4 stages per operand, one barrier per stage, fed by the copy engine
    assert re.search(r"gl\.allocate_shared_memory\(gl\.bfloat16, \[4, 128, 64\], A_desc\d\.layout\)", src)
    assert re.search(r"gl\.allocate_shared_memory\(gl\.bfloat16, \[4, 64, 128\], B_desc\d\.layout\)", src)
    assert "gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())" in src
    assert "for p in gl.static_range(3):" in src                  # the prologue: 3 loads in flight
    assert src.count("tma.async_copy_global_to_shared(") == 4     # two in the prologue, two refills
    assert "block_type.nbytes + B_desc1.block_type.nbytes" in src  # expect-tx: both tiles' bytes
    assert re.search(r"mbarrier\.wait\(ready_\d+\.index\(s_\d+\), \(k_\d+ // 4\) & 1\)", src)   # the trip's phase
    # the accumulation keeps one wgmma in flight, waited for after the loop
    assert re.search(r"hopper\.warpgroup_mma\(a_\d+, b_\d+, acc_\d+, is_async=True\)", src)
    assert "hopper.warpgroup_mma_wait(1, deps=" in src and "hopper.warpgroup_mma_wait(0, deps=" in src
    assert "NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1], instr_shape=[16, 128, 16])" in src
    # the epilogue: registers -> shared -> the copy engine
    assert "hopper.fence_async_shared()" in src and "tma.async_copy_shared_to_global(C_desc" in src
    assert "tma.store_wait(0)" in src


def test_stages_and_warps_are_backend_options():
    src = gemm_source(num_stages=3, num_warps=4)
    assert "[3, 128, 64]" in src and "for p in gl.static_range(2):" in src
    assert "warps_per_cta=[4, 1]" in src
    with pytest.raises(BackendError, match="num_warps=6; expected a multiple of 4"):
        get_backend("gluon").Options(num_warps=6)


def test_the_pass_pipeline_is_printable_and_schedules_the_loop():
    traced = gemm_kernel.trace(BF16_2, BF16_2, BF16_2)
    stages = dict(traced.passes("gluon"))
    assert list(stages) == ["traced", "split_host", "dce", "kmajor_8bit", "legalize", "choose_access", "schedule",
                            "prune_params"]
    assert "range stages=4(" in str(stages["schedule"]) and "stages=4" not in str(stages["choose_access"])
    assert "load via=tma(" in str(stages["choose_access"])


def test_explicit_gemm_becomes_producer_and_consumer_partitions():
    traced = gemm_ws.trace(BF16_2, BF16_2, BF16_2)
    src = get_backend("gluon").source(traced)
    compile(src, "<gluon gemm_ws>", "exec")
    assert "def gemm_ws_consumer(" in src and "def gemm_ws_producer(" in src
    # the consumer (largest budget) is the default partition; the producer a worker with its warps and registers
    assert re.search(r"gl\.warp_specialize\(\[\(gemm_ws_consumer, \(.*\)\), \(gemm_ws_producer, \(.*\)\)\],", src)
    assert "[4], [40])" in src
    consumer = src.split("def gemm_ws_consumer(")[1].split("@gluon.jit")[0]
    producer = src.split("def gemm_ws_producer(")[1].split("@gluon.jit")[0]
    # the producer waits for a stage to be freed (the first pass goes through: phase ^ 1), then expect + TMA
    assert re.search(r"mbarrier\.wait\(a_ring_empty\.index\(\w+\), \(\(a_ring_eph >> \w+\) & 1\) \^ 1\)",
                     producer)
    assert "mbarrier.expect(a_ring_ready.index(" in producer and "warpgroup_mma" not in producer
    # the consumer waits on the stage's ready phase, multiplies keeping one wgmma in flight, and frees the
    # previous trip's stage (whose wgmma has retired) at the end of each trip
    assert re.search(r"mbarrier\.wait\(a_ring_ready\.index\(\w+\), \(a_ring_rph >> \w+\) & 1\)", consumer)
    assert "is_async=True" in consumer and "hopper.warpgroup_mma_wait(1, deps=[" in consumer
    trip = re.search(r"hopper\.warpgroup_mma_wait\(1, deps=\[\w+\]\)\n\s+mbarrier\.arrive\(a_ring_empty\.index\("
                     r"(a_ring_busy_\d+)\), pred=(a_ring_live_\d+) == 1\)", consumer)
    assert trip, consumer                                      # after wait(1): the previous trip's stage is free
    busy, live = trip.groups()
    assert re.search(rf"{busy} = 0\n\s+{live} = 0 .*\n(.*\n)*\s+for k_\d+ in range", consumer)   # none before
    assert f"{busy} = v" in consumer and f"{live} = 1" in consumer   # this trip's stage, carried to the next
    assert "async_copy_global_to_shared" not in consumer
    assert "warps_per_cta=[8, 1]" in consumer                     # layouts for the role's own warps
    kernel = src.split("def gemm_ws_kernel(")[1]
    assert "mbarrier.init(a_ring_empty.index(st), count=1)" in kernel   # one consumer role frees a stage


@pytest.mark.parametrize(("m", "n", "k"), [(130, 136, 72), (1, 8, 264)])
def test_the_explicit_gemm_means_a_product(m, n, k):
    # its reference semantics (synchronous, roles in program order): what the GPU runs must equal this
    g = torch.Generator().manual_seed(m + n + k)
    a, b = torch.randn(m, k, generator=g).bfloat16(), torch.randn(k, n, generator=g).bfloat16()
    c = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    gemm_ws(a, b, c, backend="reference")
    torch.testing.assert_close(c.double(), a.double() @ b.double(), rtol=1e-2, atol=1e-2)


def test_warp_specialize_splits_a_plain_gemm_into_producer_and_consumer():
    traced = gemm_kernel.trace(BF16_2, BF16_2, BF16_2)
    ws = str(dict(traced.passes("gluon", warp_specialize=True))["warp_specialize"])
    assert "role producer: warps=4 registers=40" in ws and "role consumer: warps=8 registers=232" in ws
    assert "= stages() : SharedStages[bf16, 4 x 128, 64] #a_ring" in ws
    assert "[producer] %a_ring" in ws and "= async_load via=tma(" in ws and "[consumer] %a" in ws and "wait_load(" in ws
    assert "= mma_async " in ws and "= mma_wait(" in ws and "[consumer] store(" in ws
    src = get_backend("gluon").source(traced, get_backend("gluon").Options(warp_specialize=True, num_stages=3))
    assert "def gemm_kernel_producer(" in src and "[4], [40])" in src and "[3, 128, 64]" in src
    assert "for p in gl.static_range(" not in src          # the producer's ring replaces the one-partition pipeline


@pytest.mark.parametrize(("m", "n", "k"), [(130, 136, 72), (1, 8, 264)])
def test_warp_specialize_keeps_the_kernels_meaning(m, n, k):
    # the split IR (async loads, waits, async mmas, roles) run by the reference executor: the same product
    from tilestack.backends.gluon.passes import warp_specialize
    from tilestack.lang.kernel import TracedKernel

    g = torch.Generator().manual_seed(m * n + k)
    a, b = torch.randn(m, k, generator=g).bfloat16(), torch.randn(k, n, generator=g).bfloat16()
    c = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    traced = gemm_kernel.trace(a, b, c)
    split = TracedKernel(traced.kernel, traced.signature, traced.constants, warp_specialize(8, 3)(traced.ir))
    assert split.ir.roles and not traced.ir.roles
    get_backend("reference").run(split, (a, b, c))
    torch.testing.assert_close(c.double(), a.double() @ b.double(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_warp_specialize_splits_the_library_attention_sharing_rings_across_its_loops(causal):
    # the diagonal and the full key blocks are two loops: one K ring and one V ring, carried from the first into
    # the second; the split IR computes attention (o and lse) on the reference executor
    import importlib

    from tilestack.backends.gluon.passes import warp_specialize
    from tilestack.lang.kernel import TracedKernel

    af = importlib.import_module("tilestack.kernels.attention_fwd")
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, n, 64, generator=g).bfloat16() for n in (200, 260, 260))
    o, lse = torch.full_like(q, float("nan")), torch.full((1, 2, 200), float("nan"))
    traced = af.attention_fwd_kernel.trace(q, k, v, o, lse, 0.125, D=64, DV=64, causal=causal, BM=128, BN=64)
    split = warp_specialize(8, 3)(traced.ir)
    assert sum(i.op is Op.STAGES for i in split.walk()) == 2 and set(split.roles) == {"consumer", "producer"}
    get_backend("reference").run(TracedKernel(traced.kernel, traced.signature, traced.constants, split),
                                 (q, k, v, o, lse, 0.125))
    ref_o, ref_lse = af.reference(q, k, v, causal, 0.125)
    torch.testing.assert_close(o.double(), ref_o, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("programs", "ws"), [(1, True), (3, True), (4, True), (4, False)])
def test_persistent_programs_loop_over_all_tiles(programs, ws):
    # the persistent IR run by the reference executor with fewer programs than tiles (2 x 3 = 6 output tiles):
    # every tile is still computed once, by a grid-stride loop
    from tilestack.backends.gluon.passes import persistent, warp_specialize
    from tilestack.backends.reference import executor

    g = torch.Generator().manual_seed(programs)
    a, b = torch.randn(130, 72, generator=g).bfloat16(), torch.randn(72, 300, generator=g).bfloat16()
    c = torch.full((130, 300), float("nan"), dtype=torch.bfloat16)
    traced = gemm_kernel.trace(a, b, c)
    ir = persistent(traced.ir)
    ir = warp_specialize(8, 3)(ir) if ws else ir
    assert bool(ir.roles) == ws and any(i.op is Op.NUM_BLOCKS for i in ir.walk())

    class FewerPrograms:
        def __init__(self):
            self.ir = ir

        def grid(self, *args):
            return (programs,)

    executor.run(FewerPrograms(), (a, b, c))
    torch.testing.assert_close(c.double(), a.double() @ b.double(), rtol=1e-2, atol=1e-2)


def test_persistent_gemm_source_and_launch_flag():
    be = get_backend("gluon")
    traced = gemm_kernel.trace(BF16_2, BF16_2, BF16_2)
    low = be.generate(traced, be.Options(persistent=True, warp_specialize=True))
    assert low.persistent and not be.generate(traced, be.Options()).persistent
    consumer = low.source.split("def gemm_kernel_consumer(")[1].split("@gluon.jit")[0]
    assert re.search(r"for tile_\d+ in range\(pid_\d+, v\d+, programs_\d+\):", consumer)
    # the last trip's stages are freed after the tile's final wait, so the producer can fill the next tile's
    tail = consumer.split("hopper.warpgroup_mma_wait(0, deps=")[1]
    assert tail.index("mbarrier.arrive(a_ring_empty") < tail.index("tma.async_copy_shared_to_global")


def test_explicit_attention_splits_into_ping_pong_consumers_and_a_producer():
    attention = explicit_attention()
    traced = attention.trace(BF16_4, BF16_4, BF16_4, BF16_4, 1.0, BM=128, BN=64, D=64, STAGES=2)
    src = get_backend("gluon").source(traced)
    compile(src, "<gluon attention>", "exec")
    assert "[4, 4], [240, 24])" in src                            # consumer1 and the producer as workers
    assert src.count("count=2)   # one arrival per role") == 2      # K and V stages freed by both consumers
    for role in ("consumer0", "consumer1"):
        body = src.split(f"def attention_hs_{role}(")[1].split("@gluon.jit")[0]
        assert body.count("hopper.warpgroup_mma(") == 2 and "_max_nan)" in body and "gl.exp2(" in body
        assert "gl.DotOperandLayout(0, L1, 2)" in body           # P (and Q) as wgmma's register operand
        assert ".permute((1, 0))" in body                          # K^T straight from its stage


@pytest.mark.parametrize(("nq", "nk", "causal"), [(130, 200, False), (1, 64, False), (128, 1, False),
                                                  (200, 260, True), (64, 64, True)])
def test_fa3_scheduled_attention_means_attention(nq, nk, causal):
    # its reference semantics (synchronous; K loaded one block ahead, waited across trips) against float64
    g = torch.Generator().manual_seed(nq + nk)
    q, k, v = (torch.randn(1, 2, n, 64, generator=g).bfloat16() for n in (nq, nk, nk))
    o = torch.full_like(q, float("nan"))
    attention_fa3(q, k, v, o, 0.125, backend="reference", BN=64, CAUSAL=causal)
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.125
    if causal:
        s = s.masked_fill(torch.ones(nq, nk, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(o.double(), torch.softmax(s, -1) @ v.double(), rtol=2e-2, atol=2e-2)


def test_fa3_scheduled_attention_issues_the_next_scores_before_the_softmax():
    src = get_backend("gluon").source(attention_fa3.trace(BF16_4, BF16_4, BF16_4, BF16_4, 1.0, BN=64))
    compile(src, "<gluon fa3>", "exec")
    body = src.split("def attention_fa3_consumer1(")[1].split("@gluon.jit")[0]
    loop = body.split("for j_")[1].split("\n    v")[0]                  # the trip (up to the next unindented line)
    issue, softmax = loop.index("is_async=True"), loop.index("_max_nan)")
    assert issue < softmax                                         # S_{j+1} in flight while the softmax runs
    # ... and waited before the trip ends: no wgmma in flight across the back edge (ptxas would serialize them all)
    assert loop.rindex("hopper.warpgroup_mma_wait(0, deps=[") > loop.rindex("is_async=True")
    assert "mbarrier.arrive(k_ring_empty.index(" in loop            # the keys' stage freed within the trip
    producer = src.split("def attention_fa3_producer(")[1].split("@gluon.jit")[0]
    assert producer.index("K_desc") < producer.index("for j_")    # block 0's keys before the loop


def test_an_op_the_backend_cannot_lower_fails_naming_op_and_line(monkeypatch):
    table = dict(EMITTERS["gluon"])
    del table[Op.MASK]
    monkeypatch.setitem(EMITTERS, "gluon", table)
    traced = explicit_attention().trace(BF16_4, BF16_4, BF16_4, BF16_4, 1.0, BM=128, BN=64, D=64)
    with pytest.raises(TraceError, match=r"test_explicit\.py:\d+: the gluon backend cannot lower op mask"):
        traced.source("gluon")


def test_f32_operands_and_small_accumulators_are_refused_with_the_line():
    with pytest.raises(BackendError, match=r"gemm\.py:\d+: the gluon backend multiplies bf16/f16/f8e4m3 tiles"):
        gemm_kernel.trace(ts.ArgSpec(ts.f32, 2), ts.ArgSpec(ts.f32, 2), ts.ArgSpec(ts.f32, 2)).source("gluon")
    with pytest.raises(BackendError, match=r"accumulates 64 rows \(need a multiple of 128"):
        gemm_kernel.trace(BF16_2, BF16_2, BF16_2, BM=64).source("gluon")


def test_roles_share_only_staged_buffers():
    @ts.kernel(grid=lambda: (1,))
    def crossing(X, Y):
        t = ts.RegTile[ts.bf16, 64, 64]()
        with ts.partition("a", warps=4, registers=128):
            ts.load(t, X, at=(0, 0))
        with ts.partition("b", warps=4, registers=128):
            ts.exp(t, t)
            ts.store(Y, t, at=(0, 0))

    with pytest.raises(BackendError, match=r"role b's unary reads %t\d+, which role a computes"):
        crossing.trace(BF16_2, BF16_2).source("gluon")


def test_launching_without_a_hopper_gpu_is_a_clear_error():
    x = torch.zeros(128, 128, dtype=torch.bfloat16)
    with pytest.raises(LaunchError, match="gluon backend: runs on CUDA tensors of a Hopper GPU; got tensors on"):
        gemm_kernel(x, x, x.clone(), backend="gluon")


@ts.kernel(grid=lambda A, B, BM, BN: (ts.cdiv(A.shape[0], BM) * ts.cdiv(B.shape[1], BN),))
def scaled_gemm(A, B, C, p: float, st: float, gl: float, L0: float, X_ready: float, *, BM: int = 128,
                BN: int = 64, BK: int = 32):
    """C = (A @ B) p + st + gl + L0 + X_ready: parameters named as the Gluon source names its own."""
    N = B.shape[1]
    pid = ts.block_id(0)
    i, j = pid // ts.cdiv(N, BN), pid % ts.cdiv(N, BN)
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(A.shape[1], BK)):
        ts.load(a, A, at=(i, k))
        ts.load(b, B, at=(k, j))
        ts.mma_AB(acc, a, b, acc)
    ts.mul(acc, acc, p)
    for x in (st, gl, L0, X_ready):
        ts.add(acc, acc, x)
    c = ts.RegTile[C.dtype, BM, BN]()
    ts.copy(c, acc)
    ts.store(C, c, at=(i, j))


def test_parameters_named_as_the_sources_own_names_are_renamed():
    # a parameter `p` was read after the pipeline's `for p in gl.static_range(...)` prologue as its last index
    # (a silent wrong answer on the GPU); `gl` shadowed the module, `L0` a layout, `X_ready` a ring's barriers' form
    src = get_backend("gluon").source(scaled_gemm.trace(BF16_2, BF16_2, BF16_2, 2.0, 1.0, 0.5, 0.25, 0.125))
    compile(src, "<gluon scaled gemm>", "exec")
    head = re.search(r"def scaled_gemm_kernel\((.*)\):", src).group(1).split(", ")
    assert {"p_p", "st_p", "gl_p", "L0_p", "X_ready_p"} <= set(head) and not {"p", "st", "gl", "L0"} & set(head)
    assert "for p in gl.static_range(" in src                   # the source's own p is still there
    assert re.search(r"= \(acc_\d+ \* p_p\)", src) and "+ X_ready_p)" in src


def test_parameters_named_as_the_sources_own_names_mean_the_same_on_the_reference():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(130, 40, generator=g).bfloat16(), torch.randn(40, 70, generator=g).bfloat16()
    c = torch.full((130, 70), float("nan"), dtype=torch.bfloat16)
    scaled_gemm(a, b, c, 2.0, 1.0, 0.5, 0.25, 0.125, backend="reference", BM=32, BN=32, BK=16)
    want = (a.double() @ b.double()) * 2.0 + 1.875
    torch.testing.assert_close(c.double(), want, rtol=1e-2, atol=2e-2)
