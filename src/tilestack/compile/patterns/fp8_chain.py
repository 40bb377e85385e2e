"""The ``fp8_chain`` pass: ``tilestack.quantize(..., "fp8-act")`` layers that read the norm or the layer before them ->
the producer writes their fp8 activations (no quantizing pass of their own)."""

from __future__ import annotations

import operator

import torch
from torch import fx

from tilestack.compile import ops
from tilestack.compile.patterns.epilogue import _ATEN_VIEWS
from tilestack.compile.patterns.match import Match, Node, kind, runs_here, value

_VIEW_METHODS = ("view", "reshape")


def _fp8_gemm(node: Node):
    """(x, q, scale, bias, residual, x_scale, activation, shape) of a ``tilestack.quantize(..., "fp8-act")``
    layer (``tilestack::quant_linear`` with x_scale > 0, or the linear_epilogue pass's fused form of it), else
    None."""
    if kind(node) == "quant_linear" and len(node.args) == 5 and not node.kwargs:
        x, q, scale, bias, x_scale = node.args
        residual, activation, shape = None, None, None
    elif node.op == "call_function" and node.target is ops.ts_quant_linear_epilogue and len(node.args) == 8:
        x, q, scale, bias, residual, x_scale, activation, shape = node.args
    else:
        return None
    qv = value(q)
    if not isinstance(x_scale, float) or x_scale <= 0 or not isinstance(qv, torch.Tensor) or \
            qv.dtype != torch.float8_e4m3fn:
        return None
    return x, q, scale, bias, residual, x_scale, activation, shape


def _unview(x):
    """(the node x views, the view nodes between, in graph order): x through reshape/view nodes that each have
    one user."""
    views = []
    while isinstance(x, Node) and len(x.users) == 1 and (
            (x.op == "call_method" and x.target in _VIEW_METHODS) or
            (x.op == "call_function" and x.target in _ATEN_VIEWS)):
        views.append(x)
        x = x.args[0]
    return x, views[::-1]


_NORM_OPS = {ops.ts_layer_norm: ("layer", False), ops.ts_rms_norm: ("rms", False),
             ops.ts_add_layer_norm: ("layer", True), ops.ts_add_rms_norm: ("rms", True)}


def _norm_source(src: Node):
    """(kind, adds, the nodes it replaces, h node or None, (x, r, weight, bias), eps) when src is a norm's output
    (the norm and add_norm passes' calls), else None. Who reads src is the caller's to check."""
    if not isinstance(src, Node) or src.op != "call_function":
        return None
    if src.target in (ops.ts_layer_norm, ops.ts_rms_norm):
        k, _ = _NORM_OPS[src.target]
        x, w, *rest = src.args
        bias, eps = (rest[0], rest[1]) if k == "layer" else (None, rest[0])
        if w is None or (k == "layer" and bias is None):
            return None          # a norm without affine parameters: the fp8 producer takes them (bias: layer norm)
        return k, False, [src], None, (x, None, w, bias), eps
    if src.target is operator.getitem and src.args[1] == 1:
        call = src.args[0]
        if not (isinstance(call, Node) and call.op == "call_function" and
                call.target in (ops.ts_add_layer_norm, ops.ts_add_rms_norm)):
            return None
        k, _ = _NORM_OPS[call.target]
        x, r, w, *rest = call.args
        bias, eps = (rest[0], rest[1]) if k == "layer" else (None, rest[0])
        if w is None or (k == "layer" and bias is None):
            return None
        hs = [u for u in call.users if u.target is operator.getitem and u.args[1] == 0]
        if len(call.users) != len(hs) + 1 or len(hs) > 1:
            return None
        h = hs[0] if hs else None
        return k, True, [call, src] + hs, h, (x, r, w, bias), eps
    return None


def _what(norm: tuple | None, chains: list[list[tuple]]) -> str:
    head = [f"{'add + ' if norm[1] else ''}{norm[0]}_norm"] if norm else []
    body = [" -> ".join(f"fp8 linear{'+' + a if a else ''}{' + h' if from_h else ''}" for _, a, from_h in chain)
            for chain in chains]
    return " -> ".join(head + ([body[0]] if len(body) == 1 else [f"({' | '.join(body)})"]))


# The chain quantizes each layer's f32 result once; the layers it replaces rounded it to bf16 first and then
# to fp8, so an element within a bf16 step of an fp8 rounding boundary lands one fp8 step (2^-3 relative) apart:
# about 1 in 32. An output element that sums few inputs (the check's tiny models: K = 32) can then move by a
# large share of itself, so the check bounds the relative L2 error (1-4% measured on GPT-2 tiny's chains).
FP8_CHAIN_TOLERANCE = 0.08


def fp8_chain(gm: fx.GraphModule):
    """Chains of ``tilestack.quantize(..., "fp8-act")`` layers, each reading only the one before it (through
    views), and the norm before the first -> ``ops.ts_fp8_chain``: the norm writes the first layer's fp8
    activations (``quant.producers``) and each layer's epilogue the next one's (``qgemm_fp8_out_kernel``), so no
    layer makes a quantizing pass over its input and the activations between them cross memory in 8 bits. A norm
    read by several chains with one calibrated scale (Llama's q, k and v projections, its gate and up: the same
    input, so the same scale) writes one fp8 tensor for all. GPT-2's MLP (ln_2 -> c_fc + GELU -> c_proj) is one
    chain, its qkv projection (ln_1 -> c_attn) another."""
    matches, declined = [], []
    gemms = {n: g for n in gm.graph.nodes if (g := _fp8_gemm(n)) is not None}
    after: dict[Node, tuple[Node, list[Node]]] = {}      # a layer -> (the layer it reads, the views between)
    for node, g in gemms.items():
        src, views = _unview(g[0])
        if src in gemms and len(src.users) == 1 and src is not node:
            after[node] = (src, views)
    nxt = {prev: (node, views) for node, (prev, views) in after.items()}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def chain_from(head: Node) -> tuple[list[Node], list[Node]]:
        layers, nodes = [head], [head]
        while layers[-1] in nxt:
            node, views = nxt[layers[-1]]
            layers.append(node)
            nodes += views + [node]
        return layers, nodes

    groups: dict[Node, list[tuple[Node, list[Node]]]] = {}   # a layer's source -> [(head, views)] in graph order
    for head, g in gemms.items():
        if head not in after:
            src, views = _unview(g[0])
            groups.setdefault(src, []).append((head, views))
    for src, heads in groups.items():
        norm = _norm_source(src)
        readers = {u for _, views in heads for u in (views[:1] or [])} | {h for h, views in heads if not views}
        if norm is not None and (set(src.users) != readers or len({gemms[h][5] for h, _ in heads}) != 1):
            norm = None                   # read by something else too, or by layers of different scales
        units = [[h] for h, _ in heads] if norm is None else [[h for h, _ in heads]]
        for unit in units:
            chains = [chain_from(h) for h in unit]
            if norm is None and len(chains[0][0]) == 1:
                continue                  # a lone layer with a float input: quant_linear as it is
            lasts = [layers[-1] for layers, _ in chains]
            outs = [value(n) for n in lasts]
            if not all(isinstance(o, torch.Tensor) and not o.requires_grad for o in outs):
                continue
            nodes = [n for _, chain_nodes in chains for n in chain_nodes]
            if norm is not None:
                k, adds, norm_nodes, h, head_inputs, eps = norm
                nodes += norm_nodes + [v for _, views in heads for v in views]
            else:
                k, adds, h, eps = None, False, None, 0.0
                head_inputs = (gemms[unit[0]][0], None, None, None)     # the first layer's float input
            if adds and h is None:
                declined.append((lasts[-1], "fp8 chain: the fused add + norm's residual output is unused"))
                continue
            inputs, specs = list(head_inputs), []
            for layers, _ in chains:
                spec_chain = []
                for layer in layers:
                    _, q, scale, lbias, residual, x_scale, activation, _ = gemms[layer]
                    from_h = h is not None and residual is h     # the block's last layer adds the norm's own sum
                    inputs += [q, scale, lbias, None if from_h else residual]
                    spec_chain.append((x_scale, activation, from_h))
                specs.append(tuple(spec_chain))
            outputs = ([h] if adds else []) + lasts
            first = min(outputs, key=order.__getitem__)
            inside = set(nodes)
            if any(isinstance(n, Node) and n in inside for n in inputs):
                declined.append((lasts[-1], "fp8 chain: a layer reads a value the chain itself replaces"))
                continue
            late = [n for n in inputs if isinstance(n, Node) and n not in nodes and order[n] > order[first]]
            if late:
                declined.append((lasts[-1], "fp8 chain: an input computed after the chain's first output"))
                continue
            xv = value(head_inputs[0])
            if isinstance(xv, torch.Tensor) and (why := runs_here(xv)) is not None:
                declined.append((lasts[-1], f"fp8 chain: {why}"))
                continue
            spec = (k, float(eps), tuple(specs), tuple(o.dtype for o in outs),
                    tuple(gemms[n][7] for n in lasts))
            matches.append(Match("fp8_chain", ops.ts_fp8_chain, inputs, (spec,), outputs,
                                 sorted(set(nodes), key=order.__getitem__),
                                 f"{_what(norm, specs)} -> tilestack::norm_fp8 / quant_linear_fp8 (fp8 activations "
                                 "between)", l2_tolerance=FP8_CHAIN_TOLERANCE))
    return matches, declined
