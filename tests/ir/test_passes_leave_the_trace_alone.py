"""Every backend's passes and code generation leave the traced IR alone.

A kernel is traced once per specialization and the one cached ``TracedKernel.ir`` is handed to the reference
executor, the Triton backend (passes, source, the interpreter) and the Gluon backend (passes, source, the sm_90a
compile), in whatever order the caller (or a pytest-xdist worker) runs them. A pass must build its output
(``ir.passes.clone``, new instructions, new operand lists) and never write into the instructions, operand tuples,
values, blocks or attributes it was given. Here: a structural snapshot of the cached trace (every instruction's
object, opcode, result and operand values, attributes, role, nested blocks and their lists), taken before and
compared after each backend path, run in several orders, for small kernels (masked stores and atomic adds,
where, loops with carried reductions, matrix products, runtime and memory-read scalars, a hand-scheduled kernel
with async loads, async mmas and warp roles) and the library's kernels at two specializations each. Generating a
source twice gives the same text, and the same text as a pristine trace of the same kernel.

The failure this guards against (CI, 2026-12-06): Gluon's sm_90a compile of tests/lang/test_masked_store.py's
``store_both`` found its masked store's operands (OUT, x, i, j, x, x) where the trace had (OUT, x, i, j, m).
"""

import contextlib
import dataclasses
import io
import random

import pytest
import torch

import tilestack.lang as ts
from tilestack.backends.gluon import codegen as gluon_codegen
from tilestack.backends.triton import codegen as triton_codegen
from tilestack.errors import TilestackError
from tilestack.ir.nodes import Block, KernelIR, Value
from tilestack.ir.ops import Op, mask_of
from tilestack.ir.passes import clone
from tilestack.lang.kernel import Kernel

F32_2, F32_1 = ts.ArgSpec(ts.f32, 2), ts.ArgSpec(ts.f32, 1)
BF16_2, BF16_1, BF16_4 = ts.ArgSpec(ts.bf16, 2), ts.ArgSpec(ts.bf16, 1), ts.ArgSpec(ts.bf16, 4)
F32_3, F32_4 = ts.ArgSpec(ts.f32, 3), ts.ArgSpec(ts.f32, 4)


# ---- the snapshot ----------------------------------------------------------------------------------------------------
def _val(v: Value) -> str:
    return f"{v!r}@{id(v):x}:{v.type}:buffer={v.buffer}"


def _vals(vs) -> str:
    return "(" + ", ".join(_val(v) for v in vs) + ")"


def snapshot(ir: KernelIR) -> list[str]:
    """One line per kernel, block and instruction: the objects (by identity) and everything they hold."""
    consts = sorted((k, repr(v)) for k, v in ir.constants.items())
    lines = [f"kernel {ir.name} params={ir.params!r} constants={consts} grid={_vals(ir.grid)} reads={ir.reads!r} "
             f"roles={sorted(ir.roles.items())!r} where={ir.where}"]

    def block(b: Block, pad: str) -> None:
        lines.append(f"{pad}block@{id(b):x} lists@{id(b.args):x},{id(b.instrs):x},{id(b.yields):x} "
                     f"args={_vals(b.args)}")
        for ins in b.instrs:
            lines.append(f"{pad}  instr@{id(ins):x} {ins.op.value} results={_vals(ins.results)} "
                         f"srcs={_vals(ins.srcs)} attrs={ins.attrs!r} role={ins.role!r} where={ins.where}")
            if ins.body is not None:
                block(ins.body, pad + "    ")
        lines.append(f"{pad}yields={_vals(b.yields)}")

    block(ir.body, "  ")
    return lines


def test_the_snapshot_sees_each_kind_of_in_place_edit():
    """The checker itself can fail: each in-place edit a pass could make of a shared trace changes the snapshot
    (on a private copy of the IR, so no cached trace is touched)."""
    t = _store_both_fresh().trace(F32_2, F32_2, F32_2)
    edits = {
        "operands, as the CI failure saw them": lambda ir, s: setattr(s, "srcs", (*s.srcs[:-1], s.srcs[1], s.srcs[1])),
        "attrs": lambda ir, s: setattr(s, "attrs", type(s.attrs)(via="pointer")),
        "role": lambda ir, s: setattr(s, "role", "consumer"),
        "opcode": lambda ir, s: setattr(s, "op", Op.ATOMIC_ADD),
        "a value's hint": lambda ir, s: setattr(s.srcs[1], "hint", "renamed"),
        "an instruction replaced by an equal one": lambda ir, s: ir.body.instrs.__setitem__(
            ir.body.instrs.index(s), type(s)(s.op, s.results, s.srcs, s.attrs, s.body, s.where, s.role)),
        "an instruction dropped": lambda ir, s: ir.body.instrs.remove(s),
        "the block's list rebound": lambda ir, s: setattr(ir.body, "instrs", list(ir.body.instrs)),
        "reads": lambda ir, s: setattr(ir, "reads", ()),
    }
    for name, edit in edits.items():
        ir = clone(t.ir)
        store = next(i for i in ir.walk() if i.op is Op.STORE and mask_of(i) is not None)
        if "hint" in name:
            _own_values(store)
        before = snapshot(ir)
        edit(ir, store)
        assert snapshot(ir) != before, name


def _own_values(store):
    """``store`` with its operand values replaced by copies (a clone shares the trace's values: editing a copy
    leaves the cached trace's own alone)."""
    copies = {v: dataclasses.replace(v) for v in store.srcs}
    store.srcs = tuple(copies[v] for v in store.srcs)
    return store


# ---- small kernels: one of each thing a pass rewrites ----------------------------------------------------------------
def store_both(X, OUT, OUT2):
    """A masked store (pointers) and an unmasked one (the copy engine), as tests/lang/test_masked_store.py's."""
    x = ts.RegTile[ts.f32, 64, 64]()
    m = ts.RegTile[ts.bool_, 64, 64]()
    ts.load(x, X, at=(0, 0))
    ts.gt(m, x, 0.0)
    ts.store(OUT, x, at=(0, 0), mask=m)
    ts.store(OUT2, x, at=(0, 0))


def _store_both_fresh() -> Kernel:
    return ts.kernel(grid=(1,))(store_both)


def clamp_add(X, Flags, OUT, SUM, lo: float, *, BM: int = 16, BN: int = 32):
    """where, a runtime float, a scalar read from memory, a masked atomic add, a masked store, edge tiles."""
    i = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, BN]()
    z = ts.RegTile[ts.f32, BM, BN]()
    m = ts.RegTile[ts.bool_, BM, BN]()
    y = ts.RegTile[ts.f32, BM, BN]()
    ts.load(x, X, at=(i, 0))
    ts.zero(z)
    ts.gt(m, x, lo)
    ts.where(y, m, x, z)
    flag = ts.load_scalar(Flags, i)
    ts.mul(y, y, flag)
    ts.store(OUT, y, at=(i, 0), mask=m)
    ts.atomic_add(SUM, y, at=(0, 0), mask=m)


def row_softmax_loop(X, Y, *, BM: int = 8, BN: int = 16):
    """A loop carrying row reductions (running max and sum), then a second loop that normalizes."""
    i = ts.block_id(0)
    N = X.shape[1]
    x = ts.RegTile[ts.f32, BM, BN]()
    mx = ts.RegVec[ts.f32, BM]()
    s = ts.RegVec[ts.f32, BM]()
    part = ts.RegVec[ts.f32, BM]()
    ts.neg_infty(mx)
    ts.zero(s)
    for j in ts.range(ts.cdiv(N, BN)):
        ts.load(x, X, at=(i, j))
        ts.row_max(mx, x, mx)
    for j in ts.range(ts.cdiv(N, BN)):
        ts.load(x, X, at=(i, j))
        ts.sub_row(x, x, mx)
        ts.exp(x, x)
        ts.row_sum(part, x)
        ts.add(s, s, part)
    for j in ts.range(ts.cdiv(N, BN)):
        ts.load(x, X, at=(i, j))
        ts.sub_row(x, x, mx)
        ts.exp(x, x)
        ts.div_row(x, x, s)
        ts.store(Y, x, at=(i, j))


def gemm_ws(A, B, C, *, BM: int = 64, BN: int = 64, BK: int = 16, STAGES: int = 2):
    """Hand-scheduled: async loads into rings by a producer role, waits and async mmas by a consumer role (Triton
    erases these ops, renaming the mma_wait's uses: its passes' most rewriting)."""
    M, K = A.shape
    N = B.shape[1]
    pid = ts.block_id(0)
    i, j = pid // ts.cdiv(N, BN), pid % ts.cdiv(N, BN)
    a_ring = ts.SharedStages[A.dtype, STAGES, BM, BK]()
    b_ring = ts.SharedStages[B.dtype, STAGES, BK, BN]()
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    with ts.partition("consumer", warps=4, registers=232):
        acc = ts.RegTile[ts.f32, BM, BN]()
        ts.zero(acc)
    for k in ts.range(ts.cdiv(K, BK)):
        s = k % STAGES
        with ts.partition("producer", warps=4, registers=40):
            ts.async_load(a_ring, s, A, at=(i, k))
            ts.async_load(b_ring, s, B, at=(k, j))
        with ts.partition("consumer", warps=4, registers=232):
            ts.wait_load(a, a_ring, s)
            ts.wait_load(b, b_ring, s)
            ts.mma_AB_async(acc, a, b, acc)
    with ts.partition("consumer", warps=4, registers=232):
        ts.mma_wait(acc)
        c = ts.RegTile[C.dtype, BM, BN]()
        ts.copy(c, acc)
        ts.store(C, c, at=(i, j))


def _gemm_grid(A, B, BM, BN):
    return (ts.cdiv(A.shape[0], BM) * ts.cdiv(B.shape[1], BN),)


def plain_gemm(A, B, C, *, BM: int = 64, BN: int = 64, BK: int = 16):
    """A plain loop of shared-tile loads and an accumulation chain: what Gluon's warp_specialize, persistent and
    schedule passes rewrite (rings threaded through the loop, async mmas, a loop around the body)."""
    K = A.shape[1]
    N = B.shape[1]
    pid = ts.block_id(0)
    i, j = pid // ts.cdiv(N, BN), pid % ts.cdiv(N, BN)
    acc = ts.RegTile[ts.f32, BM, BN]()
    a = ts.SharedTile[A.dtype, BM, BK]()
    b = ts.SharedTile[B.dtype, BK, BN]()
    c = ts.RegTile[C.dtype, BM, BN]()
    ts.zero(acc)
    for k in ts.range(ts.cdiv(K, BK)):
        ts.load(a, A, at=(i, k))
        ts.load(b, B, at=(k, j))
        ts.mma_AB(acc, a, b, acc)
    ts.copy(c, acc)
    ts.store(C, c, at=(i, j))


def _small(fn, grid, options=None) -> Kernel:
    return Kernel(fn, grid if callable(grid) else (lambda: grid), options)


def _tensors(seed: int, *specs):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype in specs:
        out.append(torch.randn(*shape, generator=g).to(dtype) if dtype.is_floating_point
                   else torch.randint(0, 3, shape, generator=g, dtype=dtype))
    return tuple(out)


# (name, make a fresh Kernel, the arguments to trace with, constants, tensors to run with or None)
SMALL = [
    ("store_both", _store_both_fresh, lambda: _tensors(1, *[((64, 64), torch.float32)] * 3), {}),
    ("clamp_add", lambda: _small(clamp_add, lambda X, BM: (ts.cdiv(X.shape[0], BM),)),
     lambda: (*_tensors(2, ((40, 20), torch.float32), ((3,), torch.int32), ((40, 20), torch.float32),
                        ((16, 32), torch.float32)), 0.25), {}),
    ("row_softmax_loop", lambda: _small(row_softmax_loop, lambda X, BM: (ts.cdiv(X.shape[0], BM),)),
     lambda: _tensors(3, ((20, 48), torch.float32), ((20, 48), torch.float32)), {}),   # (whole column tiles)
    ("gemm_ws", lambda: _small(gemm_ws, _gemm_grid),
     lambda: _tensors(4, ((64, 48), torch.float32), ((48, 128), torch.float32), ((64, 128), torch.float32)), {}),
    ("plain_gemm", lambda: _small(plain_gemm, _gemm_grid),
     lambda: _tensors(5, ((64, 48), torch.float32), ((48, 128), torch.float32), ((64, 128), torch.float32)), {}),
]


# ---- the backend paths that run on a CPU -----------------------------------------------------------------------------
# Gluon's options (warps, stages, warp_specialize, persistent, tma): each turns on other passes
GLUON_OPTIONS = [(8, 4, False, False, True), (4, 3, True, False, True), (4, 3, False, True, True),
                 (4, 2, True, True, True), (4, 4, False, False, False)]
TRITON_OPTIONS = [(False, True), (True, False), (False, False)]      # (interpret, tma)


def _twice(make) -> str:
    """The source ``make`` generates, made twice (the same text both times), or the backend's refusal."""
    try:
        first = make()
    except TilestackError as e:      # a backend refusing the kernel (an op or shape it cannot lower) is its right
        return f"refused: {type(e).__name__}: {e}"
    assert make() == first, "generating the source twice gave different text"
    return first


def _paths(traced, tensors) -> dict:
    """name -> a function running that path on ``traced``; each returns what it generated (compared later)."""
    def reference():
        args = [a.clone() if isinstance(a, torch.Tensor) else a for a in tensors]
        traced.run(*args, backend="reference")
        return args

    def triton_run():
        args = [a.clone() if isinstance(a, torch.Tensor) else a for a in tensors]
        traced.run(*args, backend="triton")
        return args

    def passes():        # every stage printed (to a buffer), as `traced.passes(..., print_after="all")` does
        with contextlib.redirect_stdout(io.StringIO()):
            return [str(ir) for _, ir in traced.passes("triton", print_after="all")
                    + traced.passes("gluon", print_after="all", warp_specialize=True, persistent=True)]

    paths = {
        "print": lambda: str(traced.ir),
        "triton_source": lambda: traced.source(backend="triton"),
        "gluon_source": lambda: traced.source(backend="gluon"),
        "triton_generate": lambda: [_twice(lambda o=o: triton_codegen.generate(traced.ir, interpret=o[0], tma=o[1])
                                           .source) for o in TRITON_OPTIONS],
        "gluon_generate": lambda: [_twice(lambda o=o: gluon_codegen.generate(traced.ir, *o).source)
                                   for o in GLUON_OPTIONS],       # (one refusal each, where there is one)
        "passes": passes,
    }
    if tensors is not None:
        paths["cost"] = lambda: traced.cost(*tensors)
        paths["reference"] = reference
        paths["triton_run"] = triton_run
    return paths


def _run_path(name, fn, traced, before, done):
    try:
        out = fn()
    except TilestackError as e:      # a backend refusing the kernel (an op or shape it cannot lower) is its right
        out = f"refused: {type(e).__name__}: {e}"
    after = snapshot(traced.ir)
    assert after == before, f"{traced.name}: {name} (after {done}) changed the cached trace"
    return out


def _check_all_paths(traced, tensors, order) -> dict:
    before = snapshot(traced.ir)
    paths = _paths(traced, tensors)
    results, done = {}, []
    for name in order:
        if name in paths:
            results[name] = _run_path(name, paths[name], traced, before, done)
            done.append(name)
    return results


ORDERS = {"forward": ["print", "cost", "reference", "triton_run", "triton_source", "triton_generate", "passes",
                      "gluon_source", "gluon_generate"]}
ORDERS["reverse"] = ORDERS["forward"][::-1]
ORDERS["shuffled"] = random.Random(7).sample(ORDERS["forward"], len(ORDERS["forward"]))
ORDERS["gluon_first"] = ["gluon_generate", "gluon_source", "passes", "reference", "triton_generate", "triton_run",
                         "triton_source", "cost", "print"]


def _same_outputs(a, b, name):
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize(("name", "make", "args", "consts"), SMALL, ids=[c[0] for c in SMALL])
def test_small_kernels_every_path_in_every_order_leaves_the_trace_alone(name, make, args, consts, order):
    tensors = args()
    traced = make().trace(*tensors, **consts)
    results = _check_all_paths(traced, tensors, ORDERS[order])
    # what the paths made agrees with a pristine trace of the same kernel (nothing else ever ran on it)
    pristine = make().trace(*tensors, **consts)
    assert results["triton_source"] == pristine.source(backend="triton")
    assert results["gluon_generate"] == [gluon_codegen.generate(pristine.ir, *o).source
                                         if not r.startswith("refused") else r
                                         for o, r in zip(GLUON_OPTIONS, results["gluon_generate"], strict=True)]
    assert not results["triton_source"].startswith("refused"), results["triton_source"]
    # and the runs are right: the reference against float64 torch where it is easy to say, Triton against it
    assert not isinstance(results["reference"], str), results["reference"]
    _same_outputs(results["reference"], results["triton_run"], name)
    ref = results["reference"]
    if name == "store_both":
        x = tensors[0].double()
        torch.testing.assert_close(ref[1].double(), torch.where(x > 0, x, tensors[1].double()))
        torch.testing.assert_close(ref[2].double(), x)
    elif name in ("gemm_ws", "plain_gemm"):
        torch.testing.assert_close(ref[2].double(), tensors[0].double() @ tensors[1].double(), rtol=1e-4, atol=1e-4)
    elif name == "row_softmax_loop":
        torch.testing.assert_close(ref[1].double(), torch.softmax(tensors[0].double(), dim=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("order", ["forward", "gluon_first"])
@pytest.mark.parametrize("name", ["gemm_ws", "plain_gemm"])
def test_bf16_matrix_kernels_gluon_paths_leave_the_trace_alone(name, order):
    """The matrix kernels traced for bf16 (what Gluon's wgmma takes): the Gluon passes that rewrite matrix loops
    (warp_specialize, persistent, schedule) run, where f32 products are refused."""
    make = dict((c[0], c[1]) for c in SMALL)[name]
    traced = make().trace(BF16_2, BF16_2, BF16_2, BM=128)   # (8 warps: 128 rows of wgmma)
    results = _check_all_paths(traced, None, ORDERS[order])
    assert not any(r.startswith("refused") for r in results["gluon_generate"]), results["gluon_generate"]
    pristine = make().trace(BF16_2, BF16_2, BF16_2, BM=128)   # (8 warps: 128 rows of wgmma)
    assert results["gluon_generate"] == [gluon_codegen.generate(pristine.ir, *o).source for o in GLUON_OPTIONS]
    if name == "plain_gemm":     # the passes did rewrite it (a ring, async mmas, roles): in their copies only
        specialized = gluon_codegen.lower(traced.ir, 4, 3, specialize=True, persist=True)[0]
        assert any(i.op is Op.MMA_ASYNC for i in specialized.walk()) and specialized.roles
        assert not any(i.op is Op.MMA_ASYNC or i.role for i in traced.ir.walk()) and not traced.ir.roles


# ---- the library's kernels, at two specializations each --------------------------------------------------------------
def _lib(module: str, kernel: str):
    import importlib
    return getattr(importlib.import_module(f"tilestack.kernels.{module}"), kernel)


F3 = F32_3
LIBRARY = [
    ("softmax", "softmax_kernel", (BF16_2, BF16_2), [{}, dict(BM=2, BN=256, ONE_TILE=True)]),
    ("rmsnorm", "rms_norm_kernel", (BF16_2, BF16_1, BF16_2, F32_1, 1e-6), [{}, dict(BN=512, ONE_TILE=True)]),
    ("rmsnorm", "norm_fwd_kernel", (BF16_2, BF16_2, BF16_1, BF16_1, BF16_2, BF16_2, F32_1, F32_1, 1e-5),
     [dict(CENTERED=True), dict(CENTERED=False, BM=1, BN=256)]),
    ("layernorm", "layer_norm_kernel", (BF16_2, BF16_1, BF16_1, BF16_2, F32_1, F32_1, 1e-5), [{}, dict(BM=1, BN=256)]),
    ("layernorm_bwd", "norm_bwd_kernel", (BF16_2, BF16_1, BF16_2, BF16_2, F32_1, F32_1, BF16_2, F32_2, F32_2),
     [dict(CENTERED=True, ADD_DH=True), dict(CENTERED=False, BN=256)]),
    ("layernorm_bwd", "partial_sum_kernel", (F32_3, BF16_2), [{}, dict(BP=8, BN=128)]),
    ("swiglu", "swiglu_fwd_kernel", (BF16_2, BF16_2, BF16_2), [{}, dict(BM=16, BN=64)]),
    ("swiglu", "swiglu_bwd_kernel", (BF16_2,) * 5, [{}, dict(BM=8, BN=128)]),
    ("rotary", "rotary_kernel", (BF16_4, BF16_4, F32_2, F32_2, BF16_4, BF16_4),
     [dict(HALF=32, BH=8, BHK=2), dict(HALF=64, BH=4, BHK=4, INVERSE=True)]),
    ("cross_entropy", "ce_grad_kernel", (BF16_2, ts.ArgSpec(ts.i64, 1), F32_1, F32_1, F32_1),
     [{}, dict(BM=2, BN=256, GRAD=False)]),
    ("gemm", "gemm_kernel", (BF16_2, BF16_2, BF16_2), [{}, dict(BM=64, BN=128, BK=32)]),
    ("gemm", "gemm_epilogue_kernel", (BF16_2, BF16_2, BF16_1, BF16_2, BF16_2),
     [dict(activation="gelu", HAS_BIAS=True, HAS_RESIDUAL=True), dict(TRANS_B=True, BM=64)]),
    ("attention_fwd", "attention_fwd_kernel", (BF16_4, BF16_4, BF16_4, BF16_4, F3, 0.1),
     [dict(D=64), dict(D=128, causal=True, BM=64)]),
    ("attention_fwd", "attention_fwd_bias_kernel", (BF16_4, BF16_4, BF16_4, BF16_4, BF16_4, F3, F32_4, 0.1),
     [dict(D=64), dict(D=64, causal=True, causal_align="bottom_right")]),
    ("attention_fwd", "attention_fwd_dropout_kernel", (BF16_4, BF16_4, BF16_4, BF16_4, F3, 0.1, 1, 2, 0.1, 1.1),
     [dict(D=64), dict(D=64, causal=True, BN=32)]),
    ("attention_fwd_pingpong", "attention_fwd_pingpong_kernel", (BF16_4, BF16_4, BF16_4, BF16_4, F3, 0.1),
     [dict(D=64), dict(D=128, causal=True)]),
    ("attention_bwd", "attention_bwd_delta_kernel", (BF16_4, BF16_4, F3), [dict(D=64), dict(D=128, BM=32)]),
    ("attention_bwd", "attention_bwd_dkdv_kernel", (BF16_4,) * 4 + (F3, F3, BF16_4, BF16_4, 0.1),
     [dict(D=64, BM=64, BN=64), dict(D=64, causal=True)]),
    ("attention_bwd", "attention_bwd_dkdvdq_kernel", (BF16_4,) * 4 + (F3, F3, F32_4, BF16_4, BF16_4, 0.1),
     [dict(D=64), dict(D=64, causal=True)]),
    ("attention_bwd", "attention_bwd_dq_kernel", (BF16_4,) * 4 + (F3, F3, BF16_4, 0.1),
     [dict(D=64, BM=128, BN=64), dict(D=128, causal=True)]),
    ("attention_bwd", "attention_bwd_dq_bias_dropout_kernel",
     (BF16_4,) * 5 + (F32_4, F3, BF16_4, 0.1, 1, 2, 0.1, 1.1), [dict(D=64), dict(D=64, causal=True)]),
    ("attention_bwd_ws", "attention_bwd_dkdv_ws_kernel", (BF16_4,) * 4 + (F3, F3, BF16_4, BF16_4, 0.1),
     [dict(D=64), dict(D=64, causal=True)]),
    ("attention_bwd_ws", "attention_bwd_dq_ws_kernel", (BF16_4,) * 4 + (F3, F3, BF16_4, 0.1),
     [dict(D=64), dict(D=128, causal=True)]),
]


@pytest.mark.parametrize(("module", "kernel", "specs", "configs"), LIBRARY, ids=[c[1] for c in LIBRARY])
def test_library_kernels_every_source_path_leaves_the_trace_alone(module, kernel, specs, configs):
    k = _lib(module, kernel)
    sources = {}
    for n, consts in enumerate(configs):
        traced = k.trace(*specs, **consts)       # the library's own kernel object: its cache, as launches share
        order = ORDERS["forward"] if n == 0 else ORDERS["gluon_first"]
        results = _check_all_paths(traced, None, order)
        assert not results["triton_source"].startswith("refused"), results["triton_source"]
        sources[n] = results
        # the shared trace's sources, after every other path ran on it, are a pristine trace's
        pristine = Kernel(k.fn, k.grid_fn, k.options).trace(*specs, **consts)
        assert results["triton_source"] == pristine.source(backend="triton")
        assert results["gluon_generate"] == [gluon_codegen.generate(pristine.ir, *o).source
                                             if not r.startswith("refused") else r
                                             for o, r in zip(GLUON_OPTIONS, results["gluon_generate"], strict=True)]
    assert sources[0]["triton_source"] != sources[1]["triton_source"]   # two specializations, two kernels


# ---- the library's kernels run (reference and Triton's interpreter) on one shared trace ------------------------------
def _library_runs():
    g = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=g)     # noqa: E731
    q, kk, v = r(1, 2, 64, 32), r(1, 2, 64, 32), r(1, 2, 64, 32)
    return [
        ("softmax", "softmax_kernel", (r(6, 300), torch.empty(6, 300)), dict(BM=2, BN=128),
         lambda a: [torch.softmax(a[0].double(), 1)], [1]),
        ("rmsnorm", "rms_norm_kernel", (r(6, 40), r(40), torch.empty(6, 40), torch.empty(6), 1e-6),
         dict(BM=2, BN=16),
         lambda a: [a[0].double() * torch.rsqrt(a[0].double().pow(2).mean(1, keepdim=True) + 1e-6) * a[1].double()],
         [2]),
        ("swiglu", "swiglu_fwd_kernel", (r(6, 40), r(6, 40), torch.empty(6, 40)), dict(BM=4, BN=16),
         lambda a: [torch.nn.functional.silu(a[0].double()) * a[1].double()], [2]),
        ("gemm", "gemm_kernel", (r(40, 24), r(24, 36), torch.empty(40, 36)), dict(BM=16, BN=16, BK=16),
         lambda a: [a[0].double() @ a[1].double()], [2]),
        ("attention_fwd", "attention_fwd_kernel", (q, kk, v, torch.empty(1, 2, 64, 32), torch.empty(1, 2, 64), 0.2),
         dict(D=32, BM=32, BN=32, causal=True),
         lambda a: [torch.nn.functional.scaled_dot_product_attention(a[0].double(), a[1].double(), a[2].double(),
                                                                     is_causal=True, scale=0.2)], [3]),
    ]


@pytest.mark.parametrize("case", range(5), ids=["softmax", "rmsnorm", "swiglu", "gemm", "attention_fwd"])
def test_library_kernels_run_on_every_backend_and_leave_the_trace_alone(case):
    module, kernel, tensors, consts, expect, outs = _library_runs()[case]
    traced = _lib(module, kernel).trace(*tensors, **consts)
    results = _check_all_paths(traced, tensors, ORDERS["shuffled"])
    for backend in ("reference", "triton_run"):
        got = results[backend]
        assert not isinstance(got, str), got
        for want, i in zip(expect(tensors), outs, strict=True):
            torch.testing.assert_close(got[i].double(), want, rtol=2e-4, atol=2e-5,
                                       msg=lambda m, b=backend: f"{b}: {m}")


# ---- the sm_90a compiles (slow: a few) -------------------------------------------------------------------------------
def _gluon_aot(traced, **options):
    from tilestack.backends import get_backend
    from tilestack.backends.gluon import aot as gaot
    try:
        gaot.tool("ptxas")
    except gaot.ToolMissing as e:
        pytest.skip(str(e))
    be = get_backend("gluon")
    return be.aot(traced, be.Options(**options)).asm["ptx"]


def _triton_aot(kernel, args):
    from tilestack.tune import aot
    reason = aot.missing_tools()
    if reason:
        pytest.skip(reason)
    r = aot.resources(kernel, args, {}, {}, cache=False, timeout_s=None)
    assert r.ok, r.error


@pytest.mark.parametrize("first", ["triton", "gluon"])
def test_the_sm90a_compiles_leave_store_boths_trace_alone_in_either_order(first):
    """The CI failure's own path: Triton's source and AOT compile, the reference run and Gluon's sm_90a compile of
    one cached store_both trace, in both orders; the masked store keeps (OUT, x, i, j, m)."""
    meta = tuple(torch.empty(64, 64, device="meta") for _ in range(3))
    k = _store_both_fresh()
    traced = k.trace(*meta)
    before = snapshot(traced.ir)
    store = next(i for i in traced.ir.walk() if i.op is Op.STORE and mask_of(i) is not None)
    operands = store.srcs
    steps = [lambda: _triton_aot(k, meta), lambda: traced.source(backend="triton"),
             lambda: traced.run(*_tensors(1, *[((64, 64), torch.float32)] * 3), backend="reference"),
             lambda: _gluon_aot(traced)]
    for step in (steps if first == "triton" else steps[::-1]):
        step()
        assert snapshot(traced.ir) == before
    assert store.srcs is operands
    assert [v.hint for v in (*store.srcs[:2], store.srcs[-1])] == ["OUT", "x", "m"]
    ptx = _gluon_aot(traced)
    assert ptx.count("cp.async.bulk.tensor") == 1      # the unmasked store; the masked one through pointers


def test_the_warp_specialized_gluon_compile_leaves_a_plain_gemms_trace_alone():
    traced = _small(plain_gemm, _gemm_grid).trace(BF16_2, BF16_2, BF16_2, BM=64, BN=64, BK=64)
    before = snapshot(traced.ir)
    ptx = _gluon_aot(traced, num_warps=4, num_stages=3, warp_specialize=True, persistent=True)
    assert "setmaxnreg" in ptx and "wgmma.mma_async" in ptx
    assert snapshot(traced.ir) == before
    assert not any(i.op in (Op.ASYNC_LOAD, Op.MMA_ASYNC, Op.STAGES) or i.role for i in traced.ir.walk())
