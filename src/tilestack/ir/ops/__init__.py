"""The IR's operations: one enum, and one definition per op holding everything about it.

    from tilestack.ir.ops import Op, opdef
    d = opdef("unary")                  # or opdef(Op.UNARY): the OpDef
    d.attrs                             # its typed attributes (UnaryAttrs(fn=...))
    d.rule(ins)                         # its shape and dtype rule (the verifier calls it; raises TraceError)
    d.reference(ins, srcs, machine)     # its meaning on float64 NumPy arrays (the reference executor runs it)
    d.cost(ins, counter)                # what it costs (FLOPs, global bytes)
    d.fns                               # the functions it takes (exp, exp2, ...), each with its reference

Where things are: ``registry`` (the Op enum, typed attributes, ``define``/``opdef``, the emitter registry),
``rules`` (what the rules share), and one module per family of ops holding each op's block: ``scalar_ops``,
``tile_ops``, ``rand_ops`` (Philox), ``memory_ops`` (memory, loops and the explicit-hardware ops). Importing this
package defines every op.

Adding an op touches one place here (its attrs, rule, reference and cost, in one block in its family's module),
the public function in ``tilestack.lang`` that records it, and one emitter per backend (``register_emitter`` in
the backend's folder). ``tests/ir/test_registry.py`` fails if any op lacks one of them.

Each instruction is ``results = op(srcs..., attrs)``; the shape of ``srcs`` and ``results`` per op is in ``sig``.
"""

# the registry first; each family module defines its ops when imported
from tilestack.ir.ops import memory_ops  # noqa: F401 (defines the memory, loop and explicit-hardware ops)
from tilestack.ir.ops.rand_ops import (
    HALF_TO_UNIFORM,
    PHILOX_KEY,
    PHILOX_ROUND,
    PHILOX_ROUNDS,
    RAND_PER_COUNTER,
    UINT32_TO_UNIFORM,
    philox_uniform,
    philox_word,
    philox_words,
    rand_counters,
)
from tilestack.ir.ops.registry import (
    EMITTERS,
    KINDS,
    OPS,
    AccessAttrs,
    ArgAttrs,
    AxisAttrs,
    BroadcastAttrs,
    BroadcastingAttrs,
    ConstAttrs,
    Emitter,
    FillAttrs,
    FnAttrs,
    MaskAttrs,
    MmaAttrs,
    NoAttrs,
    Op,
    OpDef,
    RandAttrs,
    RangeAttrs,
    ReduceAttrs,
    TurnAttrs,
    check_lowerable,
    define,
    lowerable,
    make_attrs,
    opdef,
    register_emitter,
)
from tilestack.ir.ops.rules import (
    access_of,
    mask_of,
)
from tilestack.ir.ops.scalar_ops import (
    SCALAR_FNS,
)
from tilestack.ir.ops.tile_ops import (
    BINARY_FNS,
    BROADCAST_FNS,
    COMPARE_FNS,
    INT_ONLY_FNS,
    INT_UNARY,
    LOGIC_FNS,
    MASK_KINDS,
    MMA_INPUTS,
    MMA_PRECISIONS,
    REDUCE_FNS,
    TF32_DROPPED_BITS,
    UNARY_FNS,
    round_tf32,
    work_dtype,
)

__all__ = [
    "Op",
    "NoAttrs",
    "ConstAttrs",
    "ArgAttrs",
    "AxisAttrs",
    "FnAttrs",
    "FillAttrs",
    "BroadcastAttrs",
    "ReduceAttrs",
    "MaskAttrs",
    "MmaAttrs",
    "RandAttrs",
    "BroadcastingAttrs",
    "AccessAttrs",
    "RangeAttrs",
    "TurnAttrs",
    "KINDS",
    "OpDef",
    "OPS",
    "define",
    "opdef",
    "make_attrs",
    "Emitter",
    "EMITTERS",
    "register_emitter",
    "lowerable",
    "check_lowerable",
    "access_of",
    "mask_of",
    "SCALAR_FNS",
    "work_dtype",
    "UNARY_FNS",
    "INT_UNARY",
    "BINARY_FNS",
    "INT_ONLY_FNS",
    "BROADCAST_FNS",
    "REDUCE_FNS",
    "MASK_KINDS",
    "MMA_INPUTS",
    "MMA_PRECISIONS",
    "TF32_DROPPED_BITS",
    "round_tf32",
    "COMPARE_FNS",
    "LOGIC_FNS",
    "PHILOX_KEY",
    "PHILOX_ROUND",
    "PHILOX_ROUNDS",
    "UINT32_TO_UNIFORM",
    "HALF_TO_UNIFORM",
    "philox_uniform",
    "philox_word",
    "philox_words",
    "rand_counters",
    "RAND_PER_COUNTER",
]
