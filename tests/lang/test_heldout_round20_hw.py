"""Round 20's held-out kernels (test_heldout_round20.py, test_heldout_round20_more.py) compiled for Hopper (sm_90a) on
this CPU through the Triton backend and the Gluon backend, at serving-sized meta arguments (transposed weights, an
overlapping window view, a grid of 65535 on axis 2); and unusual-but-valid launch shapes run on the reference executor
and Triton's interpreter: sizes of 1 in every dimension, grids of exactly 65535 programs on axes 1 and 2 (checked by
the trace's grid and cost analysis alone, which count what such a launch would move, not by running it) and one past
(refused before any work), inputs and outputs at storage offsets that keep or break the copy engine's 16-byte
alignment, transposed operands of loads that want the copy engine, and element offsets past 2**31 (a table with rows
2**30 elements apart, and index and offset tensors whose elements past 2**31 come from an expanded view).

What this round found: no kernel gave a wrong answer on either executor, every kernel compiled for sm_90a through both
backends without spills, and every launch shape here ran or was refused by name. Fixed, kept as its test: the 2-D
max-pool's backward adds its gradient through an as_strided view of the input's gradient whose windows overlap, and
the launch check refused any output with indices sharing memory ("stores to them race"), atomic adds or not; taken
past that, the reference executor wrote its dense copy of the output back element by element and kept one of the adds
to each shared element (the gradient off by 4.2), where Triton's atomics summed them all. An output only added into
atomically is taken now (lang.launch._plan) and the reference holds it as a NumPy view of its storage, adding element
by element (backends.reference.executor._aliased) (240e35e): test_heldout_round20_more.py::
test_maxpool_with_indices_and_backward and test_atomic_adds_into_an_output_whose_indices_share_memory; a store into
such an output is still refused.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from heldout_support import BACKENDS, BF, F16, I32, I64, close, launch, meta, randn
from sm90a_compile import check_triton_sm90a, compile_gluon_sm90a
from test_heldout_round20 import causal_conv1d, conv1d_ref, embedding_bag, gemm_gelu_residual, log_softmax_backward
from test_heldout_round20_more import (
    adamw_step,
    bsr_gemm,
    greedy_argmax,
    grouped_gemm,
    maxpool_bwd,
    maxpool_fwd,
    windows,
)

from tilestack.errors import LaunchError

F32 = torch.float32
BIG_STRIDE = 2**30 + 64     # rows 2 and 3 of a (4, D) view start past element 2**31


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20262003)


# ---- sm_90a ---------------------------------------------------------------------------------------------------
def _gemm(b_transposed=False):
    b = meta(4096, 4096, dtype=F16).T if b_transposed else meta(4096, 4096, dtype=F16)
    return (gemm_gelu_residual, (meta(4096, 4096, dtype=F16), b, meta(4096), meta(4096, 4096, dtype=F16),
                                 meta(4096, 4096, dtype=F16)), dict(BM=64, BN=128, BK=64))


AOT_CASES = {   # name -> (kernel, meta args, constants)
    "gemm_gelu_residual": _gemm(),
    "gemm_gelu_residual_bT": _gemm(b_transposed=True),
    "log_softmax_backward": (log_softmax_backward, (meta(8192, 32000, dtype=BF),) * 3, dict(BM=8, BN=512)),
    "causal_conv1d": (causal_conv1d, (meta(8, 4096, 2048, dtype=BF), meta(2048, 4).T, meta(2048),
                                      meta(8, 4096, 2048, dtype=BF)), dict(BC=128, TC=64)),
    "causal_conv1d_65535": (causal_conv1d, (meta(65535, 64, 256, dtype=BF), meta(256, 4).T, meta(256),
                                            meta(65535, 64, 256, dtype=BF)), dict(BC=128, TC=64, HAS_BIAS=False)),
    "embedding_bag_mean": (embedding_bag, (meta(65536, dtype=I64), meta(1025, dtype=I64), meta(50000, 1024, dtype=BF),
                                           meta(65536), meta(1024, 1024)), dict(MODE="mean", BD=256)),
    "embedding_bag_max": (embedding_bag, (meta(65536, dtype=I32), meta(1025, dtype=I32), meta(50000, 1024, dtype=BF),
                                          meta(65536), meta(1024, 1024, dtype=BF)), dict(MODE="max", BD=256)),
    "grouped_gemm": (grouped_gemm, (meta(8, 1024, 1024, dtype=BF), meta(8, 1024, 1024, dtype=BF),
                                    meta(8, 3, dtype=I32), meta(8, 1024, 1024, dtype=BF)), dict(BM=64, BN=128, BK=64)),
    "maxpool_fwd": (maxpool_fwd, (windows(meta(32, 64, 112, 112, dtype=BF)), meta(32, 64, 55, 55, dtype=BF),
                                  meta(32, 64, 55, 55, dtype=I64), 112), dict(BH=16, BW=64)),
    "maxpool_bwd": (maxpool_bwd, (meta(32, 64, 55, 55), meta(32, 64, 55, 55, dtype=I64),
                                  windows(meta(32, 64, 112, 112)), 112), dict(BH=16, BW=64)),
    "bsr_gemm": (bsr_gemm, (meta(4096, 4096, dtype=BF), meta(65, dtype=I32), meta(4096, dtype=I32),
                            meta(4096, 4096, dtype=BF), meta(4096, 4096, dtype=BF)), dict(BM=64, BN=128, BK=64)),
    "greedy_argmax": (greedy_argmax, (meta(64, 128256, dtype=BF), meta(64, dtype=I64)), dict(BM=16, BV=512)),
    "adamw_step": (adamw_step, (meta(1 << 24), meta(1 << 24, dtype=BF), meta(1 << 24, dtype=BF), meta(1 << 24),
                                meta(1 << 24), 1e-3, 1e-8, 0.01, 10), dict(BLK=1024)),
}


@pytest.mark.parametrize("name", list(AOT_CASES))
def test_round20_compiles_for_sm90a_with_triton(name):
    check_triton_sm90a(*AOT_CASES[name])


@pytest.mark.parametrize("name", list(AOT_CASES))
def test_round20_compiles_for_sm90a_with_gluon(name):
    """wgmma's 64-row accumulators take one warpgroup (num_warps=4); no spills, no serialized wgmma."""
    from tilestack.backends import get_backend
    from tilestack.backends.gluon import aot as gaot
    try:
        gaot.tool("ptxas")
    except gaot.ToolMissing as e:
        pytest.skip(str(e))
    kernel, args, consts = AOT_CASES[name]
    be = get_backend("gluon")
    res = gaot.resources(be.aot(kernel.trace(*args, **consts), be.Options(num_warps=4)))
    assert res["spill_stores"] == res["spill_loads"] == 0 and not res["wgmma_serialized"], res["report"]


def test_gluon_names_the_warps_a_64_row_gemm_needs_and_compiles_it_with_them():
    """Gluon's default 8 warps split a wgmma's accumulator into 16-row slices, so a 64-row one is refused when traced,
    naming the way out (num_warps=4), which then compiles (the transposed B operand too)."""
    from tilestack.backends import get_backend
    from tilestack.errors import BackendError
    kernel, args, consts = _gemm(b_transposed=True)
    with pytest.raises(BackendError, match=r"test_heldout_round20\.py:\d+: the gluon backend gives each of the 8 "
                                           r"warps .* mma accumulates 64 rows .* or num_warps=4\)"):
        get_backend("gluon").source(kernel.trace(*args, **consts))
    compile_gluon_sm90a(kernel, args, {**consts, "BM": 128})


# ---- sizes of 1 in every dimension ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_kernel_at_sizes_of_one(backend, rng):
    """Each kernel with every size 1 (one group of (1, 1, 1), one block, one token of a one-word vocabulary, one
    bag of one index, a 3x3 image pooled to 1x1, one sequence step of one channel): against float64 torch."""
    a, b = randn(rng, 1, 1, 1, dtype=BF), randn(rng, 1, 1, 1, dtype=BF)
    c = torch.full((1, 1, 1), math.nan, dtype=BF)
    launch(grouped_gemm, backend, a, b, torch.ones(1, 3, dtype=I32), c)
    close(c, a.double() * b.double())
    a2, b2 = a[0], b[0]
    c2 = torch.full((1, 1), math.nan, dtype=BF)
    launch(bsr_gemm, backend, a2, torch.tensor([0, 1], dtype=I32), torch.zeros(1, dtype=I32), b2, c2)
    close(c2, a2.double() * b2.double())
    tok = torch.full((1,), -3, dtype=I64)
    launch(greedy_argmax, backend, torch.full((1, 1), -math.inf), tok)
    assert tok.tolist() == [0]
    w = randn(rng, 1, 1)
    out = torch.full((1, 1), math.nan)
    launch(embedding_bag, backend, torch.zeros(1, dtype=I64), torch.tensor([0, 1], dtype=I64), w, torch.zeros(1),
           out, MODE="mean")
    assert torch.equal(out, w)
    x = randn(rng, 1, 1, 3, 3)
    y, ind = torch.full((1, 1, 1, 1), math.nan), torch.full((1, 1, 1, 1), -1, dtype=I64)
    launch(maxpool_fwd, backend, windows(x), y, ind, 3)
    assert ind.item() == int(x.reshape(-1).argmax()) and y.item() == x.max().item()
    xs, wt = randn(rng, 1, 1, 1), randn(rng, 1, 4)
    ys = torch.full((1, 1, 1), math.nan)
    launch(causal_conv1d, backend, xs, wt.T, torch.zeros(1), ys, HAS_BIAS=False)
    close(ys, conv1d_ref(xs, wt, None, True))


# ---- grids of 65535 on axes 1 and 2: the trace's grid and cost, not a run -------------------------------------
def test_a_grid_of_65535_on_axis_2_by_the_trace_alone():
    """causal_conv1d over 65535 sequences: (1, 1, 65535) programs; the cost counts each program's work 65535 times
    (FLOPs and bytes written exactly 65535 times one sequence's), DRAM reads X once plus the taps and bias once."""
    x, x1 = (65535, 8, 32), (1, 8, 32)
    t = causal_conv1d.trace(meta(*x), meta(32, 4).T, meta(32), meta(*x))
    assert t.grid(meta(*x), None, None, meta(*x)) == (1, 1, 65535)
    big, one = t.cost(x, (4, 32), (32,), x), t.cost(x1, (4, 32), (32,), x1)
    assert big.programs == 65535 and big.flops == 65535 * one.flops > 0
    assert big.bytes_written == big.dram_bytes_written == 65535 * 8 * 32 * 4
    assert big.dram_bytes_read == 65535 * 8 * 32 * 4 + 4 * 32 * 4 + 32 * 4


def test_a_grid_of_65535_on_axis_1_by_the_trace_alone():
    """One sequence of 65535 rows in chunks of one row: (1, 65535, 1) programs, each writing one row of 32 f32."""
    x = (1, 65535, 32)
    t = causal_conv1d.trace(meta(*x), meta(32, 4).T, meta(32), meta(*x), TC=1)
    assert t.grid(meta(*x), None, None, meta(*x)) == (1, 65535, 1)
    assert t.cost(x, (4, 32), (32,), x).bytes_written == 65535 * 32 * 4


def test_grouped_gemm_with_65535_groups_by_the_trace_alone():
    """65535 groups on axis 2, the sizes a real tensor (load_scalar reads them): all (16, 16, 16) but the last,
    (0, 16, 16): its program runs no K trips, so the cost's matrix FLOPs are 65534 groups' of 2 16^3."""
    sizes = torch.full((65535, 3), 16, dtype=I32)
    sizes[-1, 0] = 0
    t = grouped_gemm.trace(meta(65535, 16, 16, dtype=BF), meta(65535, 16, 16, dtype=BF), sizes,
                           meta(65535, 16, 16, dtype=BF))
    args = ((65535, 16, 16), (65535, 16, 16), sizes, (65535, 16, 16))
    assert t.grid(meta(65535, 16, 16), meta(65535, 16, 16), sizes, None) == (1, 1, 65535)
    assert t.cost(*args).mma_flops == 65534 * 2 * 16**3


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_program_past_65535_on_axis_2_is_refused_before_any_work(backend):
    x = torch.zeros(65536, 1, 1)
    y = torch.full((65536, 1, 1), 7.0)
    with pytest.raises(LaunchError, match=r"causal_conv1d: grid axis 2 has 65536 programs; .* at most 65535"):
        launch(causal_conv1d, backend, x, torch.zeros(4, 1), torch.zeros(1), y)
    assert bool((y == 7).all())


# ---- storage offsets, transposed operands ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [0, 1, 8])
def test_gemm_at_storage_offsets_and_a_transposed_operand(backend, shift, rng):
    """A, R and C slices of larger tensors starting ``shift`` f16 elements in (8: 16-byte aligned, the copy engine's
    path under Triton's interpreter; 1: 2 bytes off, the pointers'), B a transposed view (its last stride not 1);
    against float64 torch, C's neighbours in its storage untouched."""
    M, N, K = 37, 45, 50
    abuf = randn(rng, M * K + shift, dtype=F16)
    a = abuf[shift:].view(M, K)
    b = randn(rng, N, K, dtype=F16).T
    bias = randn(rng, N)
    rbuf = randn(rng, M * N + shift, dtype=F16)
    r = rbuf[shift:].view(M, N)
    cbuf = torch.full((M * N + shift + 5,), -9.0, dtype=F16)
    c = cbuf[shift:shift + M * N].view(M, N)
    assert c.storage_offset() == shift
    launch(gemm_gelu_residual, backend, a, b, bias, r, c, BM=16, BN=16, BK=16)
    want = F.gelu(a.double() @ b.double() + bias.double(), approximate="tanh") + r.double()
    close(c, want, scale=4)
    assert (cbuf[:shift] == -9).all() and (cbuf[shift + M * N:] == -9).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_softmax_backward_of_transposed_and_offset_views(backend, rng):
    """Y a transposed view, DY a column slice (storage offset 3, row stride 80), DX a transposed output."""
    x = randn(rng, 77, 21, dtype=torch.float64)
    y = F.log_softmax(x.T, dim=1)                          # (21, 77), last stride 21
    dy = randn(rng, 21, 80)[:, 3:]
    dx = torch.full((77, 21), math.nan).T
    launch(log_softmax_backward, backend, y.float(), dy, dx)
    want = dy.double() - y.float().double().exp() * dy.double().sum(1, keepdim=True)
    close(dx, want, scale=8)


# ---- element offsets past 2**31 --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_bag_offsets_past_2_31(backend, rng):
    """A (4, 64) bf16 table whose rows are 2**30 + 64 elements apart (rows 2, 3 start past element 2**31), indices
    an expanded view of 2**31 + 5 elements (all 3), and bags at positions past 2**31 (offsets in i64): the loop
    counter, the index read at it and the row offset it makes are all 64-bit."""
    store = torch.empty(3 * BIG_STRIDE + 64, dtype=BF)      # (lazily allocated: only the rows touched are committed)
    w = store.as_strided((4, 64), (BIG_STRIDE, 1))
    w.copy_(randn(rng, 4, 64, dtype=BF))
    n = 2**31 + 5
    idx = torch.tensor([3], dtype=I64).expand(n)
    offs = torch.tensor([n - 7, n - 3, n], dtype=I64)
    out = torch.full((2, 64), math.nan)
    launch(embedding_bag, backend, idx, offs, w, torch.zeros(1), out, BD=64)
    close(out, torch.stack([4 * w[3].double(), 3 * w[3].double()]))
    out2 = torch.full((2, 64), math.nan)
    launch(embedding_bag, backend, idx, offs, w, torch.zeros(1), out2, MODE="max", BD=64)
    assert torch.equal(out2, w[3].float().expand(2, 64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemm_residual_rows_past_2_31(backend, rng):
    """The residual and the output as (4, 64) views with rows 2**30 + 64 elements apart: rows 2 and 3 of each past
    element 2**31 (64-bit offsets in the epilogue's load and store)."""
    a, b = randn(rng, 4, 32, dtype=BF), randn(rng, 32, 64, dtype=BF)
    bias = randn(rng, 64)
    rstore, cstore = torch.empty(3 * BIG_STRIDE + 64, dtype=BF), torch.empty(3 * BIG_STRIDE + 64, dtype=BF)
    r = rstore.as_strided((4, 64), (BIG_STRIDE, 1))
    r.copy_(randn(rng, 4, 64, dtype=BF))
    c = cstore.as_strided((4, 64), (BIG_STRIDE, 1))
    c.fill_(math.nan)
    launch(gemm_gelu_residual, backend, a, b, bias, r, c, BM=16, BN=64, BK=16)
    want = F.gelu(a.double() @ b.double() + bias.double(), approximate="tanh") + r.double()
    close(c, want, scale=2)
