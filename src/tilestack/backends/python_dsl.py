"""What the backends that write Python source for a Triton-family DSL share (Triton's ``tl``, Gluon's ``gl``).

The scalar index ops print the same in both, up to the module prefix: constants, sizes, program ids, and
integer/float arithmetic with Python's floor semantics (both DSLs' ``//`` and ``%`` truncate toward zero, so
an operand that may be negative goes through ``_floordiv`` / ``_floormod`` helpers the source then carries).
"""

from __future__ import annotations

import builtins
import math
import re
from collections.abc import Sequence

from tilestack.ir.ops import Op, register_emitter

# Python's floor division and remainder, where an operand may be negative; index values provably >= 0
# (ir.scalars.nonnegative) keep the plain operators of ``scalar_templates``.
# (cdiv is not -floordiv(-a, b): -a wraps at a = -2**31)
FLOOR_SCALAR = {"floordiv": "_floordiv({}, {})", "cdiv": "_ceildiv({}, {})", "mod": "_floormod({}, {})"}


def wide_index_op(fn: str, a: str, b: str, wide: bool, ns: str) -> str | None:
    """The SCALAR op ``fn(a, b)`` in 64 bits where it must be (``wide``: its result is in ``ir.scalars.wide_index``),
    else None. The DSLs take sizes, block ids and int arguments as i32 (when they fit) and add, subtract and multiply
    them in i32, so a sum or product of such values that is data wraps past 2**31 (``X.shape[0] * X.shape[1]``, the
    numel of an expanded tensor; ``off + X.shape[0]``, a position given to arange). Address math stays 32-bit: the
    copy engine takes 32-bit coordinates only, a 64-bit loop counter would make every offset of the loop 64-bit, and
    offsets that need 64 bits get them per tensor (``index64``)."""
    if not wide:
        return None
    return f"({ns}.cast({a}, {ns}.int64) {WIDE_SYMBOLS[fn]} {b})"


def engine_coord(x: str, n: int, ns: str) -> str:
    """The copy engine's (TMA's) coordinate ``x * n`` for an index read from memory (``ir.scalars.from_memory``):
    computed in 64 bits and saturated into the engine's 32-bit range. The DSLs refuse a 64-bit coordinate (an int64
    element), and a 32-bit product could wrap a coordinate far outside the tensor (a stale page id) back inside it;
    saturated, it stays outside and reads zeros, as the reference."""
    prod = f"{ns}.cast({x}, {ns}.int64)" + (f" * {n}" if n != 1 else "")
    return f"{ns}.minimum({ns}.maximum({prod}, {-2**31}), {2**31 - 1}).to({ns}.int32)"


def saturated_literal(text: str, n: int) -> str:
    """The copy engine's coordinate ``x * n`` for a constant ``x`` (its literal ``text``) whose product passes int32,
    as a literal saturated into the engine's 32-bit range; '' for any other (an expression, or a product in range).
    A constant tile coordinate far past a tensor (at=(R, 0) with R=2**27) failed deep inside the DSLs (Triton's
    interpreter: "Block pointers only support 32 bit offsets"; Gluon's compile a CompilationError); saturated, it
    stays outside the tensor, so a store writes nothing, as on the reference executor."""
    if not text.lstrip("-").isdigit():
        return ""
    v = int(text) * n
    return "" if -2**31 <= v < 2**31 else str(min(max(v, -2**31), 2**31 - 1))


WIDE_SYMBOLS = {"add": "+", "sub": "-", "mul": "*"}


def scalar_templates(ns: str) -> dict[str, str]:
    """Format strings of the SCALAR op's functions for the DSL module ``ns`` ("tl" or "gl"). cdiv of operands >= 0
    adds 1 where the division leaves a remainder ((a + b - 1) // b wraps for a size within b of 2**31)."""
    return {"add": "({} + {})", "sub": "({} - {})", "mul": "({} * {})", "floordiv": "({} // {})",
            "cdiv": "({0} // {1} + ({0} % {1} != 0))", "mod": "({} % {})", "min": f"{ns}.minimum({{}}, {{}})",
            "max": f"{ns}.maximum({{}}, {{}})", "fadd": "({} + {})", "fmul": "({} * {})", "fdiv": "({} / {})",
            # (an index base becomes a float first: the log of an integer is no DSL op)
            "fpow": f"{ns}.exp2(({{1}}) * {ns}.log2(({{0}}) * 1.0))"}


def floor_helpers(jit: str, ns: str, dsl: str) -> str:
    """Source of ``_floordiv``, ``_ceildiv`` and ``_floormod`` for a kernel module (``jit``: the decorator, e.g.
    "triton.jit")."""
    return f'''

@{jit}
def _floordiv(a, b):
    """a // b rounded toward -inf, as Python's ({dsl}'s // rounds toward zero)."""
    q = a // b
    r = a - q * b
    return {ns}.where((r != 0) & ((r < 0) != (b < 0)), q - 1, q)


@{jit}
def _ceildiv(a, b):
    """a / b rounded toward +inf (ceil), as -(-a // b) in Python."""
    q = a // b
    r = a - q * b
    return {ns}.where((r != 0) & ((r < 0) == (b < 0)), q + 1, q)


@{jit}
def _floormod(a, b):
    """a % b with the sign of b, as Python's."""
    return a - _floordiv(a, b) * b
'''


def literal(x, ns: str | None = None) -> str:
    """A Python literal for a constant (infinities as float("inf"), NaN as float("nan"): repr gives the bare names
    inf and nan, which a kernel module does not define). -0.0, given the DSL module ``ns``, as a product made when the
    kernel runs, -1.0 * 0.0: the DSLs make every Python float equal to 0 their null value, +0.0 (Triton's
    scalar_constant), so `x * -0.0` would be +0.0 for x > 0."""
    if isinstance(x, float) and math.isinf(x):
        return 'float("inf")' if x > 0 else 'float("-inf")'
    if isinstance(x, float) and math.isnan(x):
        return 'float("nan")'
    if isinstance(x, float) and x == 0 and math.copysign(1.0, x) < 0:
        return f"({ns}.full((), -1.0, {ns}.float32) * 0.0)" if ns else 'float("-0.0")'
    return repr(x)


def register_scalar_emitters(backend: str, ns: str, templates: dict[str, str]) -> None:
    """Register ``backend``'s emitters of CONST, DIM, BLOCK_ID, NUM_BLOCKS and SCALAR. Its emitter object has
    ``names``, ``consts``, ``globals``, ``nonneg``, ``wide_index`` (``ir.scalars``), ``floor_helpers``, ``name()`` and
    ``assign()``."""

    @register_emitter(backend, Op.CONST)
    def _e_const(e, ins) -> None:
        e.names[ins.result] = literal(ins.attrs.value, ns)
        e.consts.add(ins.result)

    @register_emitter(backend, Op.DIM)
    def _e_dim(e, ins) -> None:
        e.names[ins.result] = f"{e.globals[ins.srcs[0]]}_d{ins.attrs.axis}"

    @register_emitter(backend, Op.BLOCK_ID)
    def _e_block_id(e, ins) -> None:
        e.assign(ins.result, f"{ns}.program_id({ins.attrs.axis})")

    @register_emitter(backend, Op.NUM_BLOCKS)
    def _e_num_blocks(e, ins) -> None:
        e.assign(ins.result, f"{ns}.num_programs({ins.attrs.axis})")

    @register_emitter(backend, Op.SCALAR, fns=templates)
    def _e_scalar(e, ins) -> None:
        fn = ins.attrs.fn
        if ins.result in e.f64_floats:
            # float arithmetic that f64 work takes (ir.scalars.f64_floats): in f64, from the f64 values of its float
            # operands and exact f64 constants; an f32 of the result wherever else it is used, as an f64 argument's
            name = e.name(ins.result)
            a, b = (e.f64_floats.get(s) or f"{ns}.full((), {e.name(s)}, {ns}.float64)" for s in ins.srcs)
            e.emit(f"{name} = {templates[fn].format(a, b)}")
            e.f64_floats[ins.result] = name
            e.names[ins.result] = f"{ns}.cast({name}, {ns}.float32)"
            return
        a, b = (e.name(s) for s in ins.srcs)
        wide = wide_index_op(fn, a, b, ins.result in e.wide_index, ns)
        if wide is not None:
            e.assign(ins.result, wide)
            return
        if fn in FLOOR_SCALAR and not all(s in e.nonneg for s in ins.srcs):
            e.floor_helpers = True
            e.assign(ins.result, FLOOR_SCALAR[fn].format(a, b))
            return
        e.assign(ins.result, templates[fn].format(a, b))


# Names the generated source makes itself: values (`{hint}_{n}`, `v{n}`), a global's sizes, strides and descriptors
# (`X_d0`, `X_s1`, `X_desc0`), address offsets (`t3_o1`), helpers (`_to_bf16`); and the modules and builtins it reads.
_GENERATED_NAME = re.compile(r"_\d+$|_[ds]\d+$|_desc\d+$|_o\d+$|^v\d+$|^_")
_RESERVED_NAMES = frozenset({"tl", "triton"}) | frozenset(dir(builtins))


def param_names(names: Sequence[str], reserved: frozenset[str] = frozenset(),
                generated: re.Pattern | None = None) -> list[str]:
    """Each kernel parameter's name in the generated source: the user's own, unless the source could make or read
    that name itself (a parameter `X_d0` beside a global `X`, one named `tl`, `float` or `t1_o0`: the source failed
    with a duplicate argument or read the wrong value); such a name gets `_p` appended (more p's while taken).
    A backend adds the names its source uses beside these (``reserved``) and the forms it makes (``generated``)."""
    def clashes(n: str) -> bool:
        return bool(_GENERATED_NAME.search(n) or n in _RESERVED_NAMES or n in reserved
                    or (generated is not None and generated.search(n)))
    out = []
    taken = {n for n in names if not clashes(n)}
    for n in names:
        if clashes(n):
            n = (n.lstrip("_") or "arg") + "_p"
            while n in taken:
                n += "p"
            taken.add(n)
        out.append(n)
    return out
