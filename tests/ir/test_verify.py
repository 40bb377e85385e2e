"""The IR verifier: each rule rejects a kernel that breaks it, naming the instruction's source line."""

import pytest

import tilestack.lang as ts
from tilestack.errors import TraceError
from tilestack.ir.nodes import Block, Instr, KernelIR, Value
from tilestack.ir.ops import Op
from tilestack.ir.types import INDEX, Space, TileType
from tilestack.ir.verify import verify

TILE = TileType(Space.REG, ts.f32, (16, 16))
TILE_BF16 = TileType(Space.REG, ts.bf16, (16, 16))


def const(value: int = 4, where: str = "k.py:2") -> Instr:
    return Instr(Op.CONST, (Value(INDEX),), (), {"value": value}, None, where)


def fill(type_: TileType = TILE, where: str = "k.py:3") -> Instr:
    return Instr(Op.FILL, (Value(type_),), (), {"value": 0.0}, None, where)


def kernel(*instrs: Instr, grid=()) -> KernelIR:
    return KernelIR("k", [], Block(instrs=list(instrs)), {}, tuple(grid), "k.py:1")


def loop(lo: Instr, init: Instr, body_result_type: TileType, where: str = "k.py:5") -> Instr:
    """A loop carrying ``init``'s tile, whose body yields a fresh fill of ``body_result_type``."""
    arg = Value(init.result.type)
    inner = fill(body_result_type, "k.py:6")
    body = Block(args=[Value(INDEX), arg], instrs=[inner], yields=[inner.result])
    return Instr(Op.RANGE, (Value(init.result.type),), (lo.result, lo.result, lo.result, init.result), {}, body,
                 where)


def test_a_well_formed_kernel_passes():
    c, f = const(), fill()
    verify(kernel(c, f, loop(c, f, TILE), grid=[c.result]))


def test_every_traced_kernel_passes():
    @ts.kernel(grid=lambda X: (ts.cdiv(X.shape[0], 16),))
    def k(X):
        t = ts.RegTile[ts.f32, 16, 16]()
        ts.zero(t)
        for _ in ts.range(ts.block_id(0)):
            ts.add(t, t, 1.0)
        ts.store(X, t, at=(ts.block_id(0), 0))

    verify(k.trace(ts.ArgSpec(ts.f32, 2)).ir)


def test_operand_used_before_it_is_defined():
    c = const()
    use = Instr(Op.SCALAR, (Value(INDEX),), (c.result, c.result), {"fn": "add"}, None, "k.py:9")
    with pytest.raises(TraceError, match=r"^k.py:9: scalar: operand %v\d+ is used before it is defined"):
        verify(kernel(use, c))


def test_value_of_a_loop_body_used_after_the_loop():
    c, f = const(), fill()
    rng = loop(c, f, TILE)
    inside = rng.body.instrs[0].result
    use = Instr(Op.UNARY, (Value(TILE),), (inside,), {"fn": "exp"}, None, "k.py:8")
    with pytest.raises(TraceError, match="^k.py:8: unary: operand .* is used before it is defined"):
        verify(kernel(c, f, rng, use))


def test_tile_op_must_produce_a_tile():
    bad = Instr(Op.FILL, (Value(INDEX),), (), {"value": 0.0}, None, "k.py:4")
    with pytest.raises(TraceError, match="^k.py:4: fill must produce one tile"):
        verify(kernel(bad))


def test_scalar_op_must_produce_a_scalar():
    bad = Instr(Op.CONST, (Value(TILE),), (), {"value": 1}, None, "k.py:4")
    with pytest.raises(TraceError, match="^k.py:4: const must produce a scalar"):
        verify(kernel(bad))


def test_store_produces_nothing():
    c = const()
    bad = Instr(Op.STORE, (Value(INDEX),), (), {}, None, "k.py:7")
    with pytest.raises(TraceError, match="^k.py:7: store produces no value"):
        verify(kernel(c, bad))


def test_loop_carried_value_keeps_its_type():
    c, f = const(), fill()
    with pytest.raises(TraceError, match=r"^k.py:5: range: loop-carried value changes type: "
                                         r"RegTile\[f32, 16, 16\] -> RegTile\[bf16, 16, 16\]"):
        verify(kernel(c, f, loop(c, f, TILE_BF16)))


def test_grid_must_be_an_index_defined_at_entry():
    c, f = const(), fill()
    with pytest.raises(TraceError, match="^k.py:1: kernel k: grid value .* is not an index defined at entry"):
        verify(kernel(c, f, grid=[f.result]))
    with pytest.raises(TraceError, match="not an index defined at entry"):
        verify(kernel(c, grid=[Value(INDEX)]))


# ---- broadcasting ops, arange, atomic adds ------------------------------------------------------------------------
BOOL_TILE = TileType(Space.REG, ts.bool_, (16, 16))
VEC16 = TileType(Space.REG, ts.f32, (16,))


def test_compare_with_vectors_along_axes_passes():
    u, v = fill(VEC16), fill(VEC16)
    cmp = Instr(Op.COMPARE, (Value(BOOL_TILE),), (u.result, v.result), {"fn": "lt", "axes": ("row", "col")},
                None, "k.py:7")
    sel = Instr(Op.SELECT, (Value(TILE),), (cmp.result, u.result, v.result),
                {"axes": (None, "row", "col")}, None, "k.py:8")
    verify(kernel(u, v, cmp, sel))


@pytest.mark.parametrize(("op", "result", "srcs", "attrs", "message"), [
    (Op.COMPARE, TILE, ("tile", "tile"), {"fn": "lt", "axes": (None, None)}, "compare and logic make bool masks"),
    (Op.COMPARE, BOOL_TILE, ("tile", "tile"), {"fn": "less", "axes": (None, None)}, "unknown fn 'less'"),
    (Op.COMPARE, BOOL_TILE, ("vec", "tile"), {"fn": "lt", "axes": (None, None)}, "does not broadcast"),
    (Op.COMPARE, BOOL_TILE, ("tile", "tile"), {"fn": "lt", "axes": (None,)}, "2 operands and axes"),
    (Op.LOGIC, BOOL_TILE, ("tile", "tile"), {"fn": "and", "axes": (None, None)}, "a mask must be bool"),
    (Op.SELECT, TILE, ("tile", "tile", "tile"), {"axes": (None, None, None)}, "a mask must be bool"),
    (Op.SELECT, TILE, ("mask", "mask", "tile"), {"axes": (None, None, None)}, "values must not be bool"),
])
def test_broadcasting_rules(op, result, srcs, attrs, message):
    make = {"tile": lambda: fill(TILE), "vec": lambda: fill(VEC16), "mask": lambda: fill(BOOL_TILE)}
    defs = [make[s]() for s in srcs]
    ins = Instr(op, (Value(result),), tuple(d.result for d in defs), attrs, None, "k.py:9")
    with pytest.raises(TraceError, match=rf"^k.py:9: {op.value}: .*{message}"):
        verify(kernel(*defs, ins))


def test_atomic_add_produces_nothing():
    f = fill()
    bad = Instr(Op.ATOMIC_ADD, (Value(TILE),), (f.result,), {}, None, "k.py:4")
    with pytest.raises(TraceError, match="^k.py:4: atomic_add produces no value"):
        verify(kernel(f, bad))


def test_range_bounds_must_be_indices():
    c, f = const(), fill()
    lp = loop(c, f, TILE)
    lp.srcs = (c.result, c.result, f.result, f.result)
    with pytest.raises(TraceError, match="^k.py:5: range: start, stop and step must be indices"):
        verify(kernel(c, f, lp))
