"""The pass pipeline: named IR -> IR passes, verified between, every stage printable; dead code and parameter
pruning on the IR."""

import io

import pytest

import tilestack.lang as ts
from tilestack.errors import TraceError
from tilestack.ir.nodes import KernelIR
from tilestack.ir.ops import Op
from tilestack.ir.passes import DCE, Pass, Pipeline, clone, dead_code

F32_2 = ts.ArgSpec(ts.f32, 2)


@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def scaled(X, Y, n: int, unused: float, *, BM: int = 16):
    i = ts.block_id(0)
    x = ts.RegTile[ts.f32, BM, 16]()
    dead = ts.RegTile[ts.f32, BM, 16]()
    junk = ts.RegVec[ts.f32, BM]()
    ts.load(x, X, at=(i, 0))
    ts.exp(dead, x)                      # read by nothing
    ts.zero(junk)
    for _ in ts.range(n):
        ts.row_sum(junk, x, junk)        # carried by the loop, read by nothing after it
        ts.add(x, x, 1.0)                # carried and stored
    ts.store(Y, x, at=(i, 0))


def traced():
    return scaled.trace(F32_2, F32_2, 3, 1.0)


def ops(ir: KernelIR) -> list[str]:
    return [ins.op.value + (f".{ins.attrs.fn}" if getattr(ins.attrs, "fn", "") else "") for ins in ir.walk()]


def test_dead_code_removes_dead_tiles_and_dead_carried_values_but_keeps_effects():
    t = traced()
    before = ops(t.ir)
    after_ir = dead_code(t.ir)
    after = ops(after_ir)
    assert "unary.exp" in before and "unary.exp" not in after
    assert "reduce.sum" in before and "reduce.sum" not in after      # a carried value nothing reads
    assert after.count("store") == 1 and "binary.add" in after and "range" in after
    loop = next(ins for ins in after_ir.walk() if ins.op is Op.RANGE)
    assert len(loop.results) == 1 and len(loop.body.args) == 2        # index and x only
    assert ops(t.ir) == before                                        # the input is never changed


def test_dead_code_keeps_the_grid_unless_the_host_split_drops_it():
    t = traced()
    kept = dead_code(t.ir)
    assert kept.grid == t.ir.grid
    device = dict(t.passes("triton"))["dce"]
    assert device.grid == () and sum(ins.op is Op.DIM for ins in device.walk()) < sum(
        ins.op is Op.DIM for ins in t.ir.walk())


def test_a_loop_with_nothing_live_is_removed():
    @ts.kernel(grid=lambda: (1,))
    def k(X):
        t = ts.RegTile[ts.f32, 16, 16]()
        ts.zero(t)
        u = ts.RegTile[ts.f32, 16, 16]()
        ts.zero(u)
        for _ in ts.range(4):
            ts.add(u, u, 1.0)
        ts.store(X, t, at=(0, 0))

    assert "range" not in ops(dead_code(k.trace(F32_2).ir))


def test_triton_pipeline_stages_are_named_and_printable():
    t = traced()
    stages = t.passes("triton")
    assert [n for n, _ in stages] == ["traced", "split_host", "dce", "erase_async", "dce.erased", "legalize",
                                      "choose_access", "prune_params"]
    text = str(t.ir_after("prune_params"))
    # X loads into registers (pointers: its sizes for the masks, its strides); Y's 2-D store goes through a TMA
    # descriptor; the runtime int n bounds the loop; `unused` is read by nothing, so it is pruned
    assert "  reads = (X, X.shape[0], X.shape[1], X.stride[0], X.stride[1], n, Y.desc[16, 16])\n" in text
    out = io.StringIO()
    Pipeline([DCE]).run(t.ir, print_after=("dce",), file=out)
    assert out.getvalue().startswith("// ---- after dce ----\nkernel scaled(")


def test_print_after_an_unknown_pass_is_refused():
    with pytest.raises(ValueError, match=r"print_after: no pass named \['dse'\]"):
        Pipeline([DCE]).run(traced().ir, print_after=("dse",))
    with pytest.raises(KeyError, match="has no pass 'dse'"):
        traced().ir_after("dse")


def test_the_verifier_runs_after_every_pass_and_names_the_one_that_broke_the_ir():
    def drop_first(ir):      # removes the argument every later instruction reads
        out = clone(ir)
        out.body.instrs = out.body.instrs[1:]
        return out

    with pytest.raises(TraceError, match="after pass drop_first: .*used before it is defined"):
        Pipeline([Pass("drop_first", drop_first)]).run(traced().ir)


def test_choose_access_records_the_copy_engine_or_pointer_decision():
    @ts.kernel(grid=lambda: (1,))
    def k(X, Y):
        s = ts.SharedTile[ts.f32, 16, 16]()
        r = ts.RegTile[ts.f32, 16, 16]()
        ts.load(s, X, at=(0, 0))
        ts.copy(r, s)
        ts.store(Y, r, at=(0, 0))

    t = k.trace(F32_2, F32_2)
    vias = [ins.attrs.via for ins in t.ir_after("choose_access").walk() if ins.op in (Op.LOAD, Op.STORE)]
    assert vias == ["tma", "tma"]
    vias = [ins.attrs.via for ins in t.ir_after("choose_access", tma=False).walk()
            if ins.op in (Op.LOAD, Op.STORE)]
    assert vias == ["pointer", "pointer"]
    assert "via=tma" in str(t.ir_after("choose_access"))
    assert str(t.ir_after("prune_params")).count(".desc[16, 16]") == 2


def test_reference_pipeline_is_dead_code_only():
    assert [n for n, _ in traced().passes("reference")] == ["traced", "dce"]
