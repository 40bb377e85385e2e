"""The one enum of IR operations. Each op's operands and attributes, as the tracer builds them:

    results  = op(srcs..., attrs)
"""

from __future__ import annotations

import enum


class Op(enum.Enum):
    # --- scalars (index arithmetic on sizes, block ids and loop counters; runtime floats) -----------------
    CONST = "const"              # () -> scalar                      attrs: value
    ARG = "arg"                  # () -> global | scalar             attrs: index, name  (kernel argument)
    DIM = "dim"                  # (global) -> index                 attrs: axis         (its size on an axis)
    BLOCK_ID = "block_id"        # () -> index                       attrs: axis
    NUM_BLOCKS = "num_blocks"    # () -> index                       attrs: axis
    SCALAR = "scalar"            # (a, b) -> scalar                  attrs: fn in SCALAR_FNS

    # --- tiles and vectors -------------------------------------------------------------------------------
    FILL = "fill"                # () -> tile                        attrs: value
    UNARY = "unary"              # (x) -> tile                       attrs: fn in UNARY_FNS
    BINARY = "binary"            # (x, y) -> tile  (y a tile, or a scalar broadcast)   attrs: fn in BINARY_FNS
    BROADCAST = "broadcast"      # (x, v) -> tile                    attrs: fn, axis
    #                              ("row": v[r] applies to row r; "col": v[c] to column c)
    CAST = "cast"                # (x) -> tile of another dtype or space (also register <-> shared copies)
    REDUCE = "reduce"            # (x[, acc]) -> vec                 attrs: fn in ("max", "min", "sum"), axis
    MASK = "mask"                # (x, k) -> tile                    attrs: kind in MASK_KINDS, value
    MMA = "mma"                  # (acc, a, b) -> acc + op(a) @ op(b) attrs: trans_a, trans_b
    # Element-wise ops with broadcasting: ``axes`` holds one entry per src, None for a tile of the result's
    # shape (or a scalar), "row" for a vector v applied as v[r] to element (r, c), "col" for v[c].
    COMPARE = "compare"          # (a, b) -> bool tile               attrs: fn in COMPARE_FNS, axes
    LOGIC = "logic"              # (a[, b]) -> bool tile             attrs: fn in LOGIC_FNS, axes
    SELECT = "select"            # (mask, a, b) -> tile: a where mask else b     attrs: axes
    ARANGE = "arange"            # (start) -> vec: start + k at element k

    # --- memory and control ------------------------------------------------------------------------------
    LOAD = "load"                # (global, *coords) -> tile         trailing coords count whole tiles
    STORE = "store"              # (global, tile, *coords) -> ()
    ATOMIC_ADD = "atomic_add"    # (global, tile, *coords) -> ()      global += tile, atomically per element
    RANGE = "range"              # (lo, hi, step, *inits) -> carried  attrs: stages; body: (i, *carried) -> yields
    #                              (i = lo, lo + step, ... while before hi, as Python's range; step != 0)


SCALAR_FNS = ("add", "sub", "mul", "floordiv", "cdiv", "mod", "min", "max", "fadd", "fmul", "fdiv")
UNARY_FNS = ("exp", "exp2", "log", "log2", "abs", "neg", "relu", "sqrt", "rsqrt", "sigmoid", "sin", "cos",
             "copy")
BINARY_FNS = ("add", "sub", "mul", "div", "max", "min")
REDUCE_FNS = ("max", "min", "sum")
COMPARE_FNS = ("lt", "le", "gt", "ge", "eq", "ne")
LOGIC_FNS = ("and", "or", "not")
# Masks keep x where a condition on the element's (row, col) inside the tile holds, else write ``value``:
#   tril: col - row <= k     triu: col - row >= k     right_fill: col < k (keeps the left k columns)
#   lower_fill: row < k (keeps the upper k rows)
MASK_KINDS = ("tril", "triu", "right_fill", "lower_fill")
