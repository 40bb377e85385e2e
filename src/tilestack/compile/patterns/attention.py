"""The attention passes: ``sdpa`` (``F.scaled_dot_product_attention`` calls) and ``explicit_attention``
(``softmax(q @ k^T * s [+ mask]) @ v`` written out), both to ``tilestack::attention_fwd``."""

from __future__ import annotations

import math
import operator

import torch
from torch import fx

from tilestack.compile import ops
from tilestack.compile.patterns.match import (
    Match,
    Node,
    _arg,
    _last_dim,
    _softmax_dtype,
    cast_input,
    constant_nodes,
    kind,
    runs_here,
    scalar,
    value,
)
from tilestack.errors import LaunchError

_SDPA_ARGS = (("query", None), ("key", None), ("value", None), ("attn_mask", None), ("dropout_p", 0.0),
              ("is_causal", False), ("scale", None), ("enable_gqa", False))


def sdpa(gm: fx.GraphModule):
    from tilestack.kernels.attention_fwd import check_attention_args
    from tilestack.torch.sdpa import unsupported

    matches, declined = [], []
    for node in gm.graph.nodes:
        if kind(node) != "sdpa":
            continue
        a = {name: _arg(node, i, name, d) for i, (name, d) in enumerate(_SDPA_ARGS)}
        consts = [name for name in ("dropout_p", "is_causal", "scale", "enable_gqa") if isinstance(a[name], Node)]
        if consts:
            declined.append((node, f"{', '.join(consts)} computed in the graph (the kernels take constants)"))
            continue
        q, k, v, mask = (value(a[n]) for n in ("query", "key", "value", "attn_mask"))
        why = unsupported(q, k, v, mask, a["dropout_p"], a["is_causal"], a["enable_gqa"], a["scale"])
        if why is None and a["dropout_p"]:    # the rewrite's op call carries no dropout stream
            why = f"dropout_p={a['dropout_p']} (tilestack.scaled_dot_product_attention fuses it; the rewrite does not)"
        if why is None and isinstance(q, torch.Tensor):
            why = runs_here(q)
        if why is None:
            try:
                check_attention_args("attention", q, k, v, a["scale"], attn_mask=mask)
            except LaunchError as e:
                why = str(e)
        if why is None and a["scale"] is None and not isinstance(q.shape[-1], int):
            why = "a symbolic head dim with scale=None (the kernel's scale is a constant; pass scale=)"
        if why is not None:
            declined.append((node, why))
            continue
        scale = q.shape[-1] ** -0.5 if a["scale"] is None else float(a["scale"])
        matches.append(Match("sdpa", ops.ts_attention, [a["query"], a["key"], a["value"], a["attn_mask"]],
                             (False, bool(a["is_causal"]), scale), [node], [node],
                             f"scaled_dot_product_attention{' causal' if a['is_causal'] else ''}"
                             f"{' masked' if a['attn_mask'] is not None else ''} -> tilestack::attention_fwd"))
    return matches, declined


def _widening_cast(x) -> Node | None:
    """The input of x when x is a dtype cast that loses nothing (to the same dtype, or up to f32 / f64: the
    kernel's softmax runs in f32 whatever the inputs), else None."""
    inner = cast_input(x)
    if inner is None:
        return None
    src, dst = value(inner).dtype, value(x).dtype
    return inner if dst == src or (dst in (torch.float32, torch.float64) and src.is_floating_point and
                                   src.itemsize <= dst.itemsize) else None


def _through_widening_casts(x, chain: list[Node]):
    while (inner := _widening_cast(x)) is not None:
        chain.append(x)
        x = inner
    return x


_IN_PLACE_SCALES = {operator.imul: "mul", operator.itruediv: "div"}


def _scaling(x) -> str | None:
    """"mul" or "div" when x multiplies or divides: ``s * c``, ``s / c``, or in place, ``s *= c`` / ``s /= c``
    (Falcon's ``attention_scores /= math.sqrt(head_dim)``) where nothing else reads s (FX gives later reads of s
    x's node; another reader of s's node would see the write, which the rewrite, replacing both, does not make)."""
    if isinstance(x, Node) and x.op == "call_function" and x.target in _IN_PLACE_SCALES and len(x.args) == 2 and \
            not x.kwargs:
        s = x.args[0]
        return _IN_PLACE_SCALES[x.target] if isinstance(s, Node) and list(s.users) == [x] else None
    k = kind(x)
    return k if k in ("mul", "div") else None


def _scale_factor(x: Node):
    """(c, inner) when x is ``inner * c``, ``c * inner`` or ``inner / c`` (or in place: ``_scaling``) for a
    constant c (a number or a 0-d constant tensor), else None."""
    a, b = _arg(x, 0, "input"), _arg(x, 1, "other")
    if _scaling(x) == "mul":
        for c, inner in ((scalar(b), a), (scalar(a), b)):
            if c is not None and isinstance(inner, Node) and scalar(inner) is None:
                return c, inner
        return None
    c = scalar(b)
    if c in (None, 0.0) or x.kwargs.get("rounding_mode") is not None or not isinstance(a, Node):
        return None
    return 1.0 / c, a


def _einsum(node, form: str):
    """(a, b) when node is ``torch.einsum(eq, a, b)`` of two 4-D tensors and eq is attention's scores
    (form "scores": "bhid,bhjd->bhij", q k^T) or its product with v (form "pv": "bhij,bhjd->bhid"), in any
    letters; else None."""
    if not isinstance(node, Node) or node.op != "call_function" or node.target is not torch.einsum or node.kwargs \
            or not node.args or not isinstance(node.args[0], str):
        return None
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], list | tuple):
        operands = tuple(operands[0])
    eq = node.args[0].replace(" ", "")
    if len(operands) != 2 or not all(isinstance(o, Node) for o in operands) or eq.count("->") != 1 or "." in eq:
        return None
    ins, out = eq.split("->")
    terms = ins.split(",")
    if len(terms) != 2 or not all(len(t) == 4 for t in (*terms, out)) or len(set(terms[0] + terms[1] + out)) != 5:
        return None
    (b, h, i, x), (b2, h2, y, z) = terms
    if form == "scores":       # bhid,bhjd->bhij
        ok = (b2, h2, z) == (b, h, x) and out == b + h + i + y
    else:                      # bhij,bhjd->bhid
        ok = (b2, h2, y) == (b, h, x) and out == b + h + i + z
    return tuple(operands) if ok else None


def _sole_iadd(x) -> bool:
    """x is ``scores += mask`` (Hugging Face's T5: ``scores += position_bias``) and nothing else reads the scores
    (FX gives later reads of them x's node; a view or another reader of the node before the write would see the
    write, which the rewrite, replacing both, does not make)."""
    if not (isinstance(x, Node) and x.op == "call_function" and x.target is operator.iadd and len(x.args) == 2):
        return False
    s = x.args[0]
    return isinstance(s, Node) and list(s.users) == [x]


def _scores_read_elsewhere(chain: list[Node], out: Node) -> list[str]:
    """The chain's scores and probabilities (its nodes but the output, the key's transpose and constants) that a
    node outside the chain reads (BERT's output_attentions returns them). Views and writes in place are not such
    reads here (a write is the backend's to decline: ``rewrite.written_in_place``)."""
    from tilestack.compile.rewrite import _writes, is_view

    inside, names = set(chain), []
    for n in chain:
        nv = value(n)
        if n is out or is_view(n) or not isinstance(nv, torch.Tensor) or nv.dim() < 2:
            continue
        if any(u not in inside and not is_view(u) and not _writes(u, n) for u in n.users):
            names.append(n.name)
    return names


def _scaled_by_constants(x, nodes: list[Node], scale: float, sole_reader: Node | None = None):
    """(inner, scale times the constants) where x is inner times or divided by constants (through casts that lose
    nothing), the nodes peeled off added to nodes. With ``sole_reader`` (a product's operand: OpenAI's Whisper
    scales q and k each by hd ** -0.25), a node is peeled only where that reader is its only one (another reader
    keeps it, and the rewrite erases what it peels) and not where it scales in place (``kt *= c``: the tensor it
    writes is the rewrite's input, which the write would have changed); None when a scaling's factor is not a
    constant."""
    while _scaling(x) is not None:
        if sole_reader is not None and (list(x.users) != [sole_reader] or x.target in _IN_PLACE_SCALES):
            break
        found = _scale_factor(x)
        if found is None:
            return (x, scale) if sole_reader is not None else None
        c, inner = found
        nodes.append(x)
        for a in x.args:                 # a 0-d constant tensor (and what makes it) the rewrite no longer reads
            if a is not inner:
                nodes.extend(constant_nodes(a))
        scale = scale * c
        sole_reader = x if sole_reader is not None else None
        x = inner if sole_reader is not None else _through_widening_casts(inner, nodes)
    return x, scale


def _scores(x: Node, chain: list[Node]):
    """(q, k, scale, k_transposed) if x is ``q @ k.transpose(-2, -1)`` times constants (through casts that lose
    nothing; q and k each times constants too), with its nodes added to chain. ``q @ kt`` with kt any other 4-D
    tensor (Whisper's ``k.view(b, n, h, hd).permute(0, 2, 3, 1)``) is q @ (kt^T)^T: k is kt, k_transposed True."""
    nodes: list[Node] = []
    x = _through_widening_casts(x, nodes)
    found = _scaled_by_constants(x, nodes, 1.0)
    if found is None:
        return None
    x, scale = found
    if (qk := _einsum(x, "scores")) is not None:
        chain.extend([x, *reversed(nodes)])
        return qk[0], qk[1], scale, False
    if kind(x) != "matmul":
        return None
    q, kt = _arg(x, 0, "input"), _arg(x, 1, "other")
    q, scale = _scaled_by_constants(q, nodes, scale, sole_reader=x)
    kt, scale = _scaled_by_constants(kt, nodes, scale, sole_reader=x)
    k, k_transposed = _key_transposed(kt), False
    if k is None and isinstance(kt, Node) and isinstance(value(kt), torch.Tensor) and value(kt).dim() == 4:
        k, k_transposed = kt, True
    if k is None or not isinstance(q, Node):
        return None
    chain.extend([*([] if k_transposed else [kt]), x, *reversed(nodes)])
    return q, k, scale, k_transposed


def _uncast_operands(q: Node, k: Node, v, chain: list[Node]) -> tuple[Node, Node]:
    """(q, k) read before their casts where both are cast up from v's dtype (Phi-2's and GPT-J's
    ``q.to(torch.float32) @ k.to(torch.float32).transpose(2, 3)``, the probabilities cast back to v's dtype): the
    kernel multiplies v's dtype with f32 products and sums, what the f32 product of those values computes. Each
    cast that only the chain reads is erased with it. Else (q, k) as they are."""
    qi, ki, vv = _widening_cast(q), _widening_cast(k), value(v)
    if qi is None or ki is None or not isinstance(vv, torch.Tensor) or value(q).dtype == vv.dtype or \
            not value(qi).dtype == value(ki).dtype == vv.dtype:
        return q, k
    inside = set(chain)
    for cast in (q, k):
        if all(u in inside for u in cast.users):
            chain.append(cast)
            inside.add(cast)
    return qi, ki


def _symbolic_scale(x) -> bool:
    """x (the softmax's input, under casts and a mask) is scores multiplied or divided by a number the graph
    computes (a SymFloat: ``dynamic=True`` makes ``self.scaling`` a graph input) rather than a constant."""
    seen: list[Node] = []
    while isinstance(x, Node) and x not in seen:
        seen.append(x)
        if _scaling(x) is not None:
            if any(isinstance(value(a), torch.SymFloat | torch.SymInt) for a in x.args[:2]):
                return True
            x = next((a for a in x.args[:2] if isinstance(value(a), torch.Tensor)), None)
        elif kind(x) in ("add", "masked_fill", "where") or cast_input(x) is not None or _sole_iadd(x):
            x = _arg(x, 1, "input") if kind(x) == "where" else x.args[0]
        else:
            return False
    return False


def _key_transposed(kt) -> Node | None:
    """k when kt is a 4-D k with its last two dims swapped: ``k.transpose(-2, -1)`` (or (2, 3), (3, 2), ...),
    ``torch.transpose``, ``k.swapaxes`` / ``swapdims`` (method or function), ``k.permute(0, 1, 3, 2)``, ``k.mT``;
    else None."""
    if not isinstance(kt, Node):
        return None
    if kind(kt) == "transpose" or (kt.op in ("call_method", "call_function") and kt.target in (
            "swapaxes", "swapdims", torch.swapaxes, torch.swapdims)):
        k, dims = kt.args[0] if kt.args else None, tuple(kt.args[1:3])
        if kind(kt) == "transpose":
            k, dims = _arg(kt, 0, "input"), (_arg(kt, 1, "dim0"), _arg(kt, 2, "dim1"))
        swapped = len(dims) == 2 and all(type(d) is int for d in dims) and {d % 4 for d in dims} == {2, 3}
    elif kt.op == "call_method" and kt.target == "permute" and not kt.kwargs:
        k = kt.args[0]
        dims = tuple(kt.args[1]) if len(kt.args) == 2 and isinstance(kt.args[1], list | tuple) else kt.args[1:]
        swapped = all(type(d) is int for d in dims) and tuple(d % 4 for d in dims) == (0, 1, 3, 2)
    elif kt.op == "call_function" and kt.target is getattr and kt.args[1:] == ("mT",):
        k, swapped = kt.args[0], True
    else:
        return None
    kv = value(k)
    return k if swapped and isinstance(k, Node) and isinstance(kv, torch.Tensor) and kv.dim() == 4 else None


def _lowest_fill(fill, scores) -> bool | None:
    """Whether ``fill`` (a number, or a 0-d constant tensor: ``torch.tensor(finfo.min)``, ``torch.full([], min)``)
    stored in the scores' dtype is finite (True: finfo.min), when it is the lowest value there (-inf or finfo.min),
    else None. A number below finfo.min rounds to -inf there (``torch.where(keep, s, -1e30)`` on f16 scores)."""
    low = scalar(fill)
    if low is None or not isinstance(scores, torch.Tensor) or not scores.dtype.is_floating_point or \
            not (low == -math.inf or low <= torch.finfo(scores.dtype).min):
        return None
    return bool(torch.tensor(low, dtype=torch.float64).to(scores.dtype).isfinite())


def _fill_not_lowest(how: str, fill, scores) -> str | None:
    """Why a ``masked_fill`` / ``torch.where`` of the scores with the number ``fill`` is left, where the fill is a
    number but not the lowest value of the scores' dtype (``masked_fill(mask == 0, -1e9)``, the Annotated
    Transformer's; ``-10000.0``, older BERT code's). It was reported as "s is not ... with one mask at most (additive,
    masked_fill or where ...)", which names the very form the model wrote. Such a fill is not -inf: a row whose
    scores come near it gives the masked keys a weight, and the kernel drops them. None where fill is no number."""
    low = scalar(fill)
    if low is None or not isinstance(scores, torch.Tensor) or not scores.dtype.is_floating_point:
        return None
    return (f"a {how} of the scores with {low:g}, not their dtype's lowest value (-inf or finfo({scores.dtype}).min = "
            f"{torch.finfo(scores.dtype).min:.4g}): a row whose scores come near the fill gives the masked keys a "
            "weight, and the kernels drop them; fill -inf or finfo.min to have it taken")


def _filled_in_place(x: Node, readers: set[Node]) -> Node | None:
    """The ``s.masked_fill_(cond, fill)`` node when the softmax reads scores filled in place (lucidrains' and
    OpenNMT's ``sim.masked_fill_(~mask, -finfo.max)``), directly or through the widening casts in ``readers`` (the
    softmax and its chain): FX keeps s's node as the one read after the write (x is s, its readers the write, made
    first, and one of readers), or the write's own node where its result is read (x is the write, s read by it
    alone). Else None. Such attention was declined as a write between the pattern's nodes."""
    if x.op == "call_method" and x.target == "masked_fill_":
        fill, s = x, x.args[0] if x.args else None
        if not (isinstance(s, Node) and list(s.users) == [x] and len(x.users) == 1 and
                next(iter(x.users)) in readers):
            return None
    else:
        users = list(x.users)
        reader = next((u for u in users if u in readers), None)
        fill = next((u for u in users if u is not reader), None)
        if len(users) != 2 or reader is None or fill.op != "call_method" or fill.target != "masked_fill_" or \
                fill.users:
            return None
        n = fill.next                      # the write made before the softmax's chain reads s
        while n is not reader and n.op != "root":
            n = n.next
        if n is not reader:
            return None
    return fill if len(fill.args) == 3 and not fill.kwargs and fill.args[0] is not None else None


def _erased_with(x, chain: list[Node]) -> None:
    """A 0-d constant the rewrite no longer reads, added to the chain it replaces (nothing else reads it)."""
    chain.extend(constant_nodes(x))


def explicit_attention(gm: fx.GraphModule):
    from tilestack.kernels.attention_fwd import check_attention_args
    from tilestack.torch.sdpa import unsupported

    matches, declined = [], []
    for node in gm.graph.nodes:
        if (pv := _einsum(node, "pv")) is not None:
            p, v = pv
        elif kind(node) == "matmul":
            p, v = _arg(node, 0, "input"), _arg(node, 1, "other")
        else:
            continue
        # between the softmax and the product: dropouts (nanoGPT's attn_dropout: a no-op in eval mode or with
        # p = 0) and casts (Hugging Face's softmax in f32, then .to(q.dtype); the kernel's softmax runs in f32)
        chain: list[Node] = []
        active_dropout = False
        while True:
            if kind(p) == "dropout":
                active_dropout |= _arg(p, 2, "training", True) is not False and _arg(p, 1, "p", 0.5) != 0
            elif cast_input(p) is None:
                break
            chain.append(p)
            p = _arg(p, 0, "input")
        if kind(p) != "softmax":
            continue
        if active_dropout:
            declined.append((node, "explicit attention: dropout on the probabilities (training; the kernels "
                                   "fuse no dropout)"))
            continue
        pv = value(p)
        if not isinstance(pv, torch.Tensor) or not _last_dim(_arg(p, 1, "dim"), pv.dim()) or \
                _softmax_dtype(p) not in (None, torch.float32, value(_arg(p, 0, "input")).dtype):
            continue
        x = _through_widening_casts(_arg(p, 0, "input"), chain)       # softmax(s.float()): the f32 it runs in
        mask, fill, finite = None, False, False     # finite: the masked scores were set to a finite lowest value
        not_lowest = None                           # a fill that is not the lowest value (the reason it was left)
        in_place = _filled_in_place(x, {p, *chain})
        found = None if in_place is not None else _scores(x, chain)
        if in_place is not None:
            s, cond, fillv = in_place.args
            lowest = _lowest_fill(fillv, value(s))
            if lowest is not None and isinstance(cond, Node):
                found = _scores(s, chain)
                mask, fill, finite = cond, True, lowest
                chain.append(in_place)
                _erased_with(fillv, chain)
            elif lowest is None and _scores(s, []) is not None:       # attention but for its fill
                not_lowest = _fill_not_lowest("masked_fill_", fillv, value(s))
        elif found is None and (kind(x) == "add" or _sole_iadd(x)):
            a, b = _arg(x, 0, "input"), _arg(x, 1, "other")
            for s, m in ((a, b), (b, a) if kind(x) == "add" else ()):
                if isinstance(s, Node) and isinstance(m, Node) and "alpha" not in x.kwargs:
                    found = _scores(s, chain)
                    if found is not None:
                        mask = m
                        break
        elif found is None and kind(x) == "masked_fill":
            s, cond, fillv = _arg(x, 0, "input"), _arg(x, 1, "mask"), _arg(x, 2, "value")
            lowest = _lowest_fill(fillv, value(s))
            if lowest is not None and isinstance(cond, Node):
                found = _scores(s, chain)           # DistilBERT fills torch.tensor(finfo.min), a 0-d constant
                mask, fill, finite = cond, True, lowest
                _erased_with(fillv, chain)
            elif lowest is None and _scores(s, []) is not None:       # attention but for its fill
                not_lowest = _fill_not_lowest("masked_fill", fillv, value(s))
        elif found is None and kind(x) == "where" and x.op == "call_function":
            cond, s, fillv = _arg(x, 0, "condition"), _arg(x, 1, "input"), _arg(x, 2, "other")
            lowest = _lowest_fill(fillv, value(s))
            if lowest is not None and isinstance(cond, Node):
                found = _scores(s, chain)           # Hugging Face's eager GPT-2: where(causal, scores, min)
                mask, finite = cond, lowest
                _erased_with(fillv, chain)
            elif lowest is None and _scores(s, []) is not None:       # attention but for its fill
                not_lowest = _fill_not_lowest("torch.where", fillv, value(s))
        if found is None:
            why = ("a scale computed in the graph (dynamic=True makes a module's float attribute a graph input; the "
                   "kernel takes a constant)" if _symbolic_scale(x) else not_lowest if not_lowest is not None else
                   "softmax(s) @ v where s is not a 4-D q @ k^T times constants with one mask at most (additive, "
                   "masked_fill or where; ALiBi's bias then a causal fill is two)")
            declined.append((node, f"explicit attention: {why}"))
            continue
        q, k, scale, k_transposed = found
        if mask is not None:
            chain.append(x)
        chain.extend([p, node])
        q, k = _uncast_operands(q, k, v, chain)
        qv, kv_, vv, mv = value(q), value(k), value(v), value(mask)
        if k_transposed:
            kv_ = kv_.transpose(-2, -1)                               # (B, H, Nk, D), as the rewrite reads it
        # one key/value head that the products broadcast over the query heads (k (B, 1, N, D) without an expand)
        broadcast = qv.dim() == kv_.dim() == vv.dim() == 4 and qv.shape[1] > 1 and kv_.shape[1] == vv.shape[1] == 1
        why = unsupported(qv, kv_, vv, mv, 0.0, False, broadcast)
        if why is None and mask is not None and not fill and kind(x) != "where" and mv.dtype == torch.bool:
            why = ("a boolean tensor added to the scores (it adds 1 where True; the kernels read a boolean mask as "
                   "the keys to attend)")
        if why is None:
            why = runs_here(qv)
        if why is None and (read_elsewhere := _scores_read_elsewhere(chain, node)):
            why = (f"{' and '.join(read_elsewhere)} read elsewhere too (the probabilities or scores are kept for "
                   "those readers: the rewrite would compute the attention twice)")
        if why is None:
            try:
                check_attention_args("attention", qv, kv_, vv, scale, attn_mask=mv)
            except LaunchError as e:
                why = str(e)
        if why is not None:
            declined.append((node, f"explicit attention: {why}"))
            continue
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        chain = sorted(set(chain), key=order.__getitem__)
        how = "" if mask is None else (" with masked_fill(cond, -inf)" if fill else " with a boolean mask"
                                       if kind(x) == "where" else " with an additive mask")
        additive = mask is not None and not fill and kind(x) != "where"
        added_in = value(x).dtype if additive else torch.float32      # how large a bias swallows the scores
        matches.append(Match("explicit_attention", ops.ts_attention, [q, k, v, mask],
                             (fill, False, scale, finite, added_in, k_transposed),
                             [node], chain, f"softmax(q @ k^T * {scale:.4g}){how} @ v -> tilestack::attention_fwd"))
    return matches, declined
