"""Applying a pass's matches to the graph, and checking each one first (check mode): the replaced nodes,
copied into a graph of their own, and the replacement run on the same random inputs, shaped as Dynamo's
example values, and compared with a tolerance for the dtype. A rewrite that fails its check is not made.

    check = check_match(gm, match)      # Check(ok, max_err, note)
    apply_match(gm, match)              # the graph now calls match.fn in place of match.nodes
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from tilestack.compile.patterns import Match, value

# max |new - old| / (1 + |old|) allowed, by the output's dtype: f32 products may run through tf32 on a GPU
TOLERANCE = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float64: 1e-9}


@dataclasses.dataclass
class Check:
    ok: bool
    max_err: float | None
    note: str = ""

    def __str__(self) -> str:
        if self.max_err is None:
            return self.note
        return f"{'passed' if self.ok else 'FAILED'} (max err {self.max_err:.2g}){' ' + self.note if self.note else ''}"


def external_inputs(match: Match) -> list[fx.Node]:
    """The nodes the matched nodes read that are not themselves matched, in first-use order."""
    inside = set(match.nodes)
    seen: dict[fx.Node, None] = {}
    for n in match.nodes:
        for a in n.all_input_nodes:
            if a not in inside:
                seen.setdefault(a)
    return list(seen)


def original_module(gm: fx.GraphModule, match: Match, inputs: list[fx.Node]) -> fx.GraphModule:
    """The matched nodes as a GraphModule of their own: inputs -> the outputs' values, as a tuple."""
    g = fx.Graph()
    env = {n: g.placeholder(f"in_{i}") for i, n in enumerate(inputs)}
    for n in match.nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in match.outputs))
    return fx.GraphModule(gm, g)


def size_hint(n) -> int:
    """A size of a fake tensor as a number: the example's size for a symbolic one, read without the guard that
    ``int(n)`` puts on it (``int`` specializes the graph to that size, so with ``check`` a ``dynamic=True``
    compile recompiled for every new batch or sequence length). Raises for a size with no example (unbacked)."""
    if type(n) is int:
        return n
    from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw
    return int(guarding_hint_or_throw(n))


def random_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A real tensor of t's shape, dtype and device. Booleans (masks) get, in every row, a True in column 0 and
    a False in column 1, so that a row is never fully masked whichever way the mask is read."""
    shape = tuple(size_hint(s) for s in t.shape)
    if t.dtype == torch.bool:
        out = torch.rand(shape, generator=gen) > 0.5
        if out.dim() and shape[-1] > 0:
            out[..., 0] = True
            if shape[-1] > 1:
                out[..., 1] = False
    elif t.dtype.is_floating_point:
        out = torch.randn(shape, generator=gen, dtype=torch.float32)
    else:
        out = torch.randint(0, 8, shape, generator=gen)
    return out.to(dtype=t.dtype, device=t.device)


def random_laid_out_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``random_like`` with t's strides as well (a transposed view of a projection stays one, an expanded mask
    keeps its stride 0): what a replacement is handed in the graph, so that timing it counts the copies it makes of
    such inputs. The values come from one random buffer as long as the layout reaches; a layout that cannot be
    read (a size or stride that is no int) gives ``random_like``'s contiguous tensor."""
    shape = tuple(size_hint(s) for s in t.shape)
    try:
        stride = tuple(int(s) for s in t.stride())
    except (TypeError, ValueError, RuntimeError):
        return random_like(t, gen)
    if t.dtype == torch.bool or any(s < 0 for s in stride):
        return random_like(t, gen)
    span = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) if all(shape) else 0
    flat = torch.randn(span, generator=gen, dtype=torch.float32) if t.dtype.is_floating_point else \
        torch.randint(0, 8, (span,), generator=gen)
    return flat.to(dtype=t.dtype, device=t.device).as_strided(shape, stride)


def _fn_args(match: Match, vals: dict) -> list:
    return [None if n is None else vals[n] for n in match.inputs] + list(match.consts)


def check_match(gm: fx.GraphModule, match: Match, seed: int = 0) -> Check:
    """Run the original nodes and the replacement on the same random inputs and compare their outputs."""
    inputs = external_inputs(match)
    fakes = [value(n) for n in inputs]
    if not all(isinstance(f, torch.Tensor) for f in fakes):
        return Check(True, None, "not checked (an input is not a tensor)")
    try:
        gen = torch.Generator().manual_seed(seed)
        real = [random_like(f, gen) for f in fakes]
    except (TypeError, RuntimeError) as e:      # symbolic sizes without a hint
        return Check(True, None, f"not checked ({e.__class__.__name__}: dynamic sizes)")
    original = original_module(gm, match, inputs)
    with torch.no_grad():
        try:
            want = original(*real)
        except (IndexError, RuntimeError):
            # integers the nodes index with, out of their range (labels of a 3-class head drawn in 0..7): 0 is in
            # every nonempty range
            real = [r if r.dtype.is_floating_point or r.dtype == torch.bool else torch.zeros_like(r) for r in real]
            try:
                want = original(*real)
            except (IndexError, RuntimeError) as e:
                return Check(False, None, f"FAILED: the replaced nodes raise on random inputs ({type(e).__name__}: "
                                          f"{str(e)[:120]})")
        vals = dict(zip(inputs, real, strict=True))
        got = match.fn(*_fn_args(match, vals))
    got = got if isinstance(got, tuple) else (got,)
    worst = 0.0
    ok = True
    for w, g in zip(want, got, strict=True):
        if w.shape != g.shape or w.dtype != g.dtype:
            return Check(False, None, f"FAILED: shape/dtype {tuple(g.shape)} {g.dtype}, expected "
                                      f"{tuple(w.shape)} {w.dtype}")
        w64, g64 = w.double(), g.double()
        if not torch.equal(torch.isnan(w64), torch.isnan(g64)):
            return Check(False, None, "FAILED: NaN where the original has none (or the reverse)")
        finite = ~torch.isnan(w64)
        if match.l2_tolerance is not None:      # a rewrite that rounds differently: the error as a whole
            w_f, g_f = w64[finite], g64[finite]
            e = float((g_f - w_f).norm() / w_f.norm().clamp_min(1e-30)) if w_f.numel() else 0.0
            bound = match.l2_tolerance
        else:
            err = ((g64 - w64).abs() / (1 + w64.abs()))[finite]
            e = float(err.max()) if err.numel() else 0.0
            bound = TOLERANCE.get(w.dtype, 1e-3)
        worst = max(worst, e)
        ok = ok and e <= bound
    return Check(ok, worst)


def result_differs(match: Match) -> str | None:
    """Why the replacement would not give the dtypes and shapes of the nodes it replaces, or None: match.fn run on
    the graph's fake inputs. Under autocast (a ``torch.autocast`` region of the graph, or one around the compiled
    call) the replaced ops ran in autocast's dtypes (a matmul of f32 inputs gives bf16, a CUDA layer norm of bf16
    gives f32), and tilestack's ops keep their inputs' dtypes. None also where it cannot be told (an input with
    no fake value, a replacement that cannot run on fakes)."""
    from torch._subclasses.fake_tensor import FakeTensor

    fakes = {n: value(n) for n in match.inputs if n is not None}
    modes = {id(f.fake_mode): f.fake_mode for f in fakes.values() if isinstance(f, FakeTensor)}
    if len(modes) != 1 or not all(isinstance(f, FakeTensor) for f in fakes.values()):
        return None
    (mode,) = modes.values()
    try:
        with mode:
            got = match.fn(*_fn_args(match, fakes))
    except Exception:  # noqa: BLE001 - a replacement the fakes cannot run is judged by its check, not here
        return None
    got = got if isinstance(got, tuple) else (got,)
    if len(got) != len(match.outputs):
        return f"the replacement gives {len(got)} results for the {len(match.outputs)} nodes it replaces"
    for old, new in zip(match.outputs, got, strict=True):
        want = value(old)
        if not isinstance(want, torch.Tensor) or not isinstance(new, torch.Tensor):
            continue
        static = all(type(d) is int for d in (*want.shape, *new.shape))
        if want.dtype != new.dtype or (static and tuple(want.shape) != tuple(new.shape)):
            return (f"the replacement gives {new.dtype} {tuple(new.shape)} where {old.name} is {want.dtype} "
                    f"{tuple(want.shape)} (under autocast the replaced ops run in autocast's dtypes; tilestack's "
                    "keep their inputs')")
        strides = (*want.stride(), *new.stride())
        if all(type(d) is int for d in strides) and not _same_layout(want, new) and \
                (reader := _strided_view_reader(old)) is not None:
            return (f"the replacement lays {old.name} out with strides {tuple(new.stride())} where eager's are "
                    f"{tuple(want.stride())}, and node {reader.name}, a .view of it, needs eager's layout (an "
                    "elementwise op keeps a permuted input's layout; tilestack's kernels write contiguous rows)")
    return None


_STRIDED_VIEWS = {"view", "view_as"}


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b (of one shape) lay their elements out alike: equal strides on every dim of more than one element (a
    dim of size 1 may have any stride: (B, 1, H, D) from a transpose of (B, H, 1, D) is as contiguous as any)."""
    return a.numel() == 0 or all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True) if n != 1)


def _strided_view_reader(node: fx.Node) -> fx.Node | None:
    """A ``.view`` / ``view_as`` of node, or of a view of it (``y.transpose(1, 2).view(b, n, -1)``), or None:
    the readers whose success depends on node's strides (reshape copies where it must; view raises)."""
    todo, seen = [node], {node}
    while todo:
        x = todo.pop()
        for u in x.users:
            if u.args[:1] != (x,):
                continue
            if (u.op == "call_method" and u.target in _STRIDED_VIEWS) or \
                    (u.op == "call_function" and u.target is torch.ops.aten.view.default):
                return u
            if is_view(u) and u not in seen:
                seen.add(u)
                todo.append(u)
    return None


def apply_match(gm: fx.GraphModule, match: Match) -> dict[fx.Node, fx.Node]:
    """Insert a call of match.fn before the first of match.outputs, send the outputs' users to it, and erase the
    matched nodes nothing reads any more. Returns {replaced output: its new node}, for the pass's later matches
    that read one (``follow``)."""
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    first = min(match.outputs, key=order.__getitem__)
    with g.inserting_before(first):
        call = g.call_function(match.fn, tuple(match.inputs) + tuple(match.consts))
        if len(match.outputs) == 1:
            news = [call]
        else:
            news = [g.call_function(operator.getitem, (call, i)) for i in range(len(match.outputs))]
            call.meta["example_value"] = tuple(value(o) for o in match.outputs)
    for old, new in zip(match.outputs, news, strict=True):
        new.meta["example_value"] = value(old)
        old.replace_all_uses_with(new)
    for n in reversed(match.nodes):
        if not n.users:
            g.erase_node(n)
    return dict(zip(match.outputs, news, strict=True))


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.setitem}
_INPLACE_DUNDERS = {f"__{op.__name__}__" for op in _INPLACE_OPERATORS}          # x.__iadd__(t), x.__setitem__
_NOT_WRITES = {"requires_grad_", "share_memory_", "retain_grad_"}
# ops whose result may share its memory with their first argument: writing to it writes the argument
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "t", "expand", "expand_as",
                 "unsqueeze", "squeeze", "narrow", "select", "as_strided", "flatten", "unflatten", "unfold",
                 "swapaxes", "swapdims", "movedim", "diagonal", "split", "chunk", "unbind", "detach", "mT", "T"}
_VIEW_FUNCTIONS = {operator.getitem, torch.transpose, torch.permute, torch.reshape, torch.flatten, torch.squeeze,
                   torch.unsqueeze, torch.narrow, torch.select, torch.split, torch.chunk, torch.unbind, torch.detach,
                   torch.swapaxes, torch.movedim, torch.diagonal}


def _writes(user: fx.Node, node: fx.Node) -> bool:
    """user writes to node's memory in place (``node += t``, ``node.masked_fill_(...)``, ``node[i] = t``,
    ``torch.relu_(node)``, ``inplace=True``, ``out=node``, an aten op whose schema writes that argument)."""
    if user.kwargs.get("out") is node:
        return True
    first = user.args[0] if user.args else None
    if user.kwargs.get("inplace") is True and first is node:           # F.relu(x, inplace=True), F.dropout(...)
        return True
    if user.op == "call_method":
        return first is node and (user.target in _INPLACE_DUNDERS or (
            user.target.endswith("_") and not user.target.startswith("_") and user.target not in _NOT_WRITES))
    if user.op != "call_function":
        return False
    if user.target in _INPLACE_OPERATORS:
        return first is node
    schema = getattr(user.target, "_schema", None)
    if schema is not None:
        return any(a.alias_info is not None and a.alias_info.is_write and i < len(user.args) and user.args[i] is node
                   for i, a in enumerate(schema.arguments))
    name = getattr(user.target, "__name__", "")
    return first is node and name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES


def is_view(node: fx.Node) -> bool:
    """node's result may be a view of its first argument (``transpose``, ``view``, ``x[i]``, ``x.mT``, ...)."""
    return (node.op == "call_method" and node.target in _VIEW_METHODS) or (node.op == "call_function" and (
        node.target in _VIEW_FUNCTIONS or (node.target is getattr and node.args[1:] in (("mT",), ("T",)))))


def _base(node: fx.Node) -> fx.Node:
    """The tensor node's memory belongs to: node with the views under it removed (``cache[:, :, :n].mT`` ->
    ``cache``)."""
    while is_view(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _aliases(node: fx.Node) -> list[fx.Node]:
    """Every node that may share node's memory: the tensor it is a view of (``_base``) and every view of that in the
    graph (views of views too), node's siblings included: a write to ``cache`` or to ``cache[:, :, -1]`` changes
    ``cache[:, :, :n]``."""
    node = _base(node)
    seen, todo = [node], [node]
    while todo:
        for u in todo.pop().users:
            if is_view(u) and u.args and u.args[0] in seen and u not in seen:
                seen.append(u)
                todo.append(u)
    return seen


def reads_own_nodes(match: Match) -> str | None:
    """Why the rewrite would read a value it replaces, or None: one of its inputs is one of its nodes (the scores
    as their own mask, ``softmax(s + s)``, or as the values, ``softmax(s) @ s``: attention's shape, but the
    "mask" or "v" is computed by the nodes the rewrite erases, which it then reads: a KeyError inside the
    backend)."""
    inside = set(match.nodes)
    for n in match.inputs:
        if n is not None and n in inside:
            return f"{n.name} is both an input of the rewrite and one of the nodes it replaces"
    return None


def written_in_place(gm: fx.GraphModule, match: Match) -> str | None:
    """Why the rewrite would read other values than the nodes it replaces, or None: an in-place op (outside the
    match) writes to one of its nodes or inputs (or a view of one) between the match's first node and its last.
    FX keeps the written tensor's node as the one later nodes read (``s.masked_fill_(m, -inf); softmax(s)``: the
    softmax's argument is the node of ``s`` before the write), so the pattern there is not what runs; and the
    replacement computes every output at the first one's place, before a write among the nodes it replaces."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    inside = set(match.nodes)
    # a constant the rewrite inlines (a 0-d scale or fill: torch.full([], c)) reads nothing, and may be made long
    # before the pattern (at the top of forward, before a cache write its keys view): the window starts at the
    # first node that reads a tensor; a constant itself must not be written from its making on
    first = min((order[n] for n in match.nodes if n.all_input_nodes), default=min(order[n] for n in match.nodes))
    last = max(order[n] for n in match.nodes)       # the replacement computes every output at the first one's place
    for n in [*match.nodes, *(i for i in match.inputs if isinstance(i, fx.Node))]:
        start = order[n] if n in inside and not n.all_input_nodes else first
        for alias in _aliases(n):
            for u in alias.users:
                if u not in inside and start < order[u] < last and _writes(u, alias):
                    op = u.target if u.op == "call_method" else getattr(u.target, "__name__", u.target)
                    return f"{u.name} ({op}) writes {n.name} in place between the pattern's nodes"
    return None


def follow(match: Match, replaced: dict[fx.Node, fx.Node]) -> Match:
    """match with inputs that an earlier rewrite replaced read from their replacements (a norm's input may be
    the previous fused add + norm's residual output)."""
    return dataclasses.replace(match, inputs=[replaced.get(n, n) if n is not None else None for n in match.inputs])
