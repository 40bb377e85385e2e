"""The op registry: every op defined once, with a rule, reference semantics, a cost rule and an emitter per
backend; a backend that cannot lower an op says so before emitting code, naming the op and the user's line."""

import dataclasses
import pathlib

import pytest

import tilestack.backends.triton.codegen  # noqa: F401  (registers the Triton emitters)
import tilestack.lang as ts
from tilestack.errors import TraceError
from tilestack.ir import ops as irops
from tilestack.ir.ops import EMITTERS, OPS, Emitter, Op, opdef

HERE = pathlib.Path(__file__)


@pytest.mark.parametrize("op", list(Op), ids=lambda o: o.value)
def test_every_op_is_defined_whole(op):
    d = OPS[op]
    assert d is opdef(op.value) is opdef(op)
    assert d.kind in irops.KINDS and d.sig and d.doc
    assert callable(d.rule) and callable(d.reference) and callable(d.cost)
    assert dataclasses.is_dataclass(d.attrs)
    for fn, ref in d.fns.items():
        assert isinstance(fn, str) and ref is not None, (op, fn)


@pytest.mark.parametrize("op", list(Op), ids=lambda o: o.value)
def test_every_op_and_function_has_a_triton_emitter_or_is_erased_by_its_passes(op):
    from tilestack.backends.triton.passes import ERASED
    e = EMITTERS["triton"].get(op)
    if op in ERASED:
        assert e is None, f"{op.value} is both erased and emitted"
        return
    assert e is not None, f"no Triton emitter for {op.value}"
    if e.fns is not None:
        assert set(OPS[op].fns) <= e.fns, f"Triton lowers {op.value} without {set(OPS[op].fns) - e.fns}"


def test_every_public_function_op_is_in_the_language():
    # fn-taking ops whose functions are public under their own names (scalar fns are operators on Scalars)
    public = set(ts.__all__)
    for op in (Op.UNARY, Op.BINARY, Op.COMPARE):
        assert set(OPS[op].fns) <= public, op
    assert {f"logical_{fn}" for fn in OPS[Op.LOGIC].fns} <= public
    assert {f"{axis}_{fn}" for fn in OPS[Op.REDUCE].fns for axis in ("row", "col")} <= public
    assert {f"{fn}_{axis}" for fn in OPS[Op.BROADCAST].fns for axis in ("row", "col")} <= public


def test_an_op_is_found_by_name_and_an_unknown_name_is_refused():
    assert opdef("mma").op is Op.MMA
    with pytest.raises(KeyError, match="no op named 'matmul'"):
        opdef("matmul")


def test_attrs_are_typed_and_unknown_fields_refused():
    from tilestack.ir.nodes import Instr, Value
    from tilestack.ir.types import INDEX
    ins = Instr(Op.CONST, (Value(INDEX),), (), {"value": 3})
    assert ins.attrs == irops.ConstAttrs(3) and ins.attrs.value == 3
    with pytest.raises(TypeError, match=r"const: unknown attribute\(s\) \['val'\]"):
        Instr(Op.CONST, (Value(INDEX),), (), {"val": 3})


@ts.kernel(grid=lambda X: (1,))
def exp_kernel(X):
    t = ts.RegTile[ts.f32, 16, 16]()
    ts.load(t, X, at=(0, 0))
    ts.exp(t, t)  # L:exp
    ts.store(X, t, at=(0, 0))


def _line(marker: str) -> str:
    hits = [n for n, text in enumerate(HERE.read_text().splitlines(), 1) if text.endswith(f"# {marker}")]
    return f"{HERE.name}:{hits[0]}"


def test_a_backend_without_an_emitter_fails_before_emitting_naming_op_and_line(monkeypatch):
    traced = exp_kernel.trace(ts.ArgSpec(ts.f32, 2))
    table = dict(EMITTERS["triton"])
    del table[Op.UNARY]
    monkeypatch.setitem(EMITTERS, "triton", table)
    with pytest.raises(TraceError, match=rf"^{_line('L:exp')}: the triton backend cannot lower op unary \(fn=exp\)"):
        traced.source("triton")


def test_a_backend_missing_one_function_of_an_op_names_it(monkeypatch):
    traced = exp_kernel.trace(ts.ArgSpec(ts.f32, 2))
    table = dict(EMITTERS["triton"])
    table[Op.UNARY] = Emitter(table[Op.UNARY].fn, frozenset({"log"}))
    monkeypatch.setitem(EMITTERS, "triton", table)
    with pytest.raises(TraceError, match=r"cannot lower op unary \(fn=exp\)"):
        traced.source("triton")


def test_an_op_cannot_be_defined_or_lowered_twice():
    with pytest.raises(ValueError, match="defined twice"):
        irops.define(OPS[Op.FILL])
    with pytest.raises(ValueError, match="two emitters"):
        irops.register_emitter("triton", Op.FILL)(lambda e, ins: None)
