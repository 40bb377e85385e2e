"""The ``tilestack`` torch.compile backend: the named pattern passes over each captured graph, then the
inner compiler (Inductor by default, through ``compile_fx``, which runs AOT autograd: the tilestack custom
ops carry their own backward, so training graphs work too).

    model = torch.compile(model, backend="tilestack")                      # after `import tilestack.compile`
    model = torch.compile(model, backend="tilestack", mode="max-autotune")
    model = torch.compile(model, backend="tilestack", options={"check": True, "inner": "aot_eager"})
    model = tilestack.optimize(model, check=True)                          # the same, in one call

Options (``options=``): ``check`` (bool: test every rewrite on random inputs first, and keep the original
where the test fails), ``inner`` ("inductor", "aot_eager" or "eager"), ``passes`` (names, a subset of
``PASSES``, run in PASSES' order whatever the order given), ``min_rows`` and ``min_query_rows`` (the size
thresholds below which a swap does not pay: ``tilestack.compile.policy``), ``measure`` (bool, default True: on a
GPU a fused GEMM is swapped only where it was measured faster, ``tilestack.compile.measure``), ``numerics``
("eager", the default: Inductor's fused kernels round every intermediate to the model's dtype where eager's ops
would, so a bf16 model's outputs stay within bf16's own rounding of eager's (Inductor's
``emulate_precision_casts``; without it a GPT-2 small's logits differ from eager's by 1.2e-2 relative, as far as two
bf16 rounding orders lie apart); "exact": eager's bits where Inductor can give them: casts emulated, no tilestack
kernel swapped in unless ``passes`` names some (each sums in its own order), and the layer and RMS norms left to
eager's own kernels (extern calls, not fused with the residual add), so that their reduction order, and with it
every bf16 result downstream, is eager's (a GPT-2 block is otherwise 1.5e-3 from eager's, its norms' last bits
amplified; what this costs is not yet timed on a GPU); "fused": intermediates stay f32 inside a fused kernel,
nearer the f32 model and further from eager; the speed is the same within noise, see docs/inference.md); any other
key is
an Inductor config patch (a name of ``torch._inductor.config``, with ``inner="inductor"`` only: ``check_options``
refuses the rest).
``mode`` is Inductor's ("reduce-overhead" captures the result in CUDA graphs; "max-autotune").
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping

import torch
from torch import fx

from tilestack.compile import ops, policy
from tilestack.compile.patterns import LEFT_REASONS, LEFT_UNMATCHED, PASSES, kind, op_name
from tilestack.compile.report import Report, Swap
from tilestack.compile.rewrite import (
    apply_match,
    check_match,
    follow,
    reads_own_nodes,
    result_differs,
    written_in_place,
)
from tilestack.errors import LaunchError

INNER = ("inductor", "aot_eager", "eager")
NUMERICS = ("eager", "exact", "fused")   # where a fused kernel rounds its intermediates (module docstring)
ROUNDED = ("eager", "exact")             # the numerics whose fused kernels round as eager's ops would
# the ops that numerics="exact" leaves to eager's own kernels (an extern call each) where Inductor would decompose
# them into a fused reduction whose summation order, and so a bf16 result's last bit, differs from eager's
EXACT_KEPT = ("native_layer_norm", "native_layer_norm_backward", "_fused_rms_norm", "_fused_rms_norm_backward")
_OPS_FUNCTIONS = {getattr(ops, n) for n in dir(ops) if n.startswith("ts_")}
_NOT_OPS = ("placeholder", "output", "get_attr")
_reports: list[Report] = []


def reports() -> list[Report]:
    """The reports of every graph the backend compiled in this process, oldest first."""
    return list(_reports)


def last_report() -> Report:
    if not _reports:
        raise LaunchError("last_report: the tilestack backend has compiled no graph yet in this process")
    return _reports[-1]


def run_passes(gm: fx.GraphModule, *, passes=None, check: bool = False, inner: str = "inductor",
               rule: policy.Policy | None = None) -> Report:
    """Rewrite ``gm`` in place with the named passes (all of ``PASSES`` by default) and say what happened. Each
    match is made only where it pays at the graph's static shapes (``rule``, default ``policy.current()``; see
    ``tilestack.compile.policy``)."""
    if not isinstance(gm, fx.GraphModule):
        raise LaunchError(f"run_passes: gm must be a torch.fx.GraphModule, got {type(gm).__name__}")
    if rule is not None and not isinstance(rule, policy.Policy):
        raise LaunchError(f"run_passes: rule={rule!r}; expected None or a tilestack.compile.policy.Policy")
    passes = check_options("run_passes", check=check, inner=inner, passes=passes)
    rule = rule or policy.current()
    chosen = list(PASSES) if passes is None else list(passes)
    names = [n for n in PASSES if n in chosen]        # PASSES' order: add_norm must see the adds before norm runs
    report = Report(graph=f"#{len(_reports)}", inner=inner)
    declined_nodes: dict[fx.Node, str] = {}
    for name in names:
        matches, declined = PASSES[name](gm)
        for node, why in declined:
            report.declined.append((name, node.name, why))
            declined_nodes[node] = why
        replaced: dict[fx.Node, fx.Node] = {}
        taken: dict[fx.Node, str] = {}       # node -> the output of the rewrite of this pass that replaced it
        for m in matches:
            m = follow(m, replaced)
            shared = [n for n in m.nodes if n in taken]
            if shared:      # head(a) + head_dist(b): each Linear takes the add as its residual; the first one has it
                why = f"shares {shared[0].name} with the rewrite of {taken[shared[0]]} made before it"
                report.declined.append((name, m.outputs[-1].name, why))
                declined_nodes.update(dict.fromkeys(m.nodes, why))
                continue
            written = reads_own_nodes(m) or written_in_place(gm, m)
            if written is not None:
                report.declined.append((name, m.outputs[-1].name, f"not the pattern it looks like: {written}"))
                declined_nodes.update(dict.fromkeys(m.nodes, written))
                continue
            differs = result_differs(m)
            if differs is not None:
                report.declined.append((name, m.outputs[-1].name, differs))
                declined_nodes.update(dict.fromkeys(m.nodes, differs))
                continue
            why = policy.unpaid(m, rule, gm)
            if why is not None:
                report.declined.append((name, m.outputs[-1].name, f"does not pay: {why}"))
                declined_nodes.update(dict.fromkeys(m.nodes, f"does not pay: {why}"))
                continue
            verdict = check_match(gm, m) if check else None
            made = verdict is None or verdict.ok
            report.swaps.append(Swap(name, m.outputs[-1].name, m.what, "not run" if verdict is None else
                                     str(verdict), made))
            if made:
                taken.update(dict.fromkeys(m.nodes, m.outputs[-1].name))
                replaced.update(apply_match(gm, m))
    gm.graph.lint()
    gm.recompile()
    left: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op in _NOT_OPS or node.target in _OPS_FUNCTIONS or op_name(node) == "getitem":
            continue
        op = op_name(node)
        left[op] += 1
        if op not in report.left_why:
            family = kind(node) or op
            report.left_why[op] = LEFT_REASONS.get(family, declined_nodes.get(
                node, LEFT_UNMATCHED.get(family, "no tilestack kernel for it")))
    report.left = left
    return report


def check_options(fn: str, *, mode=None, check=False, inner="inductor", passes=None, inductor_options=None,
                  numerics="eager"):
    """Every option of a compile checked before Dynamo runs (a mistake found inside it comes back wrapped in
    Dynamo's BackendCompilerFailed, after a trace): ``passes`` returned as a tuple of names (a str is one name),
    or None for all. ``inductor_options`` must be names of ``torch._inductor.config`` (an unknown one, or any
    with an ``inner`` other than "inductor", would be ignored without a word) with a bool where it takes one."""
    if not isinstance(inner, str) or inner not in INNER:
        raise LaunchError(f"{fn}: inner={inner!r}; expected one of {INNER}")
    if not isinstance(check, bool):
        raise LaunchError(f"{fn}: check={check!r}; expected a bool (test every rewrite on random inputs first)")
    if not isinstance(numerics, str) or numerics not in NUMERICS:
        raise LaunchError(f"{fn}: numerics={numerics!r}; expected one of {NUMERICS} (round intermediates as eager "
                          "does, or keep them f32 inside fused kernels)")
    if numerics == "fused" and inner != "inductor":    # eager's numerics are all the other inners have
        raise LaunchError(f"{fn}: numerics={numerics!r} with inner={inner!r}; it applies only with "
                          "inner='inductor' (the other inners fuse nothing)")
    if mode is not None:
        from torch._inductor import list_mode_options
        modes = tuple(list_mode_options())
        if not isinstance(mode, str) or mode not in modes:
            raise LaunchError(f"{fn}: mode={mode!r}; expected None or one of Inductor's modes {modes}")
        if inner != "inductor" and mode != "default":   # it would be ignored without a word
            raise LaunchError(f"{fn}: mode={mode!r} with inner={inner!r}; Inductor's modes apply only with "
                              "inner='inductor'")
    if passes is not None:
        given = passes
        if isinstance(passes, Mapping):   # iterating gives its keys: {"norm": False} ran the norm pass without a word
            raise LaunchError(f"{fn}: passes={given!r} is a mapping; expected a pass name or an iterable of the names "
                              f"to run, from {list(PASSES)} (leave a pass out to turn it off)")
        passes = (passes,) if isinstance(passes, str) else tuple(passes) if isinstance(passes, Iterable) else None
        if passes is None or not all(isinstance(n, str) for n in passes):
            raise LaunchError(f"{fn}: passes={given!r}; expected a pass name or an iterable of names from "
                              f"{list(PASSES)}")
        unknown = [n for n in passes if n not in PASSES]
        if unknown:
            raise LaunchError(f"{fn}: passes {unknown} unknown; expected names from {list(PASSES)}")
    if inductor_options:
        from torch._inductor import config as inductor_config
        known = inductor_config.get_config_copy()
        unknown = sorted(k for k in inductor_options if k not in known)
        if unknown:
            raise LaunchError(f"{fn}: options {unknown} unknown; expected tilestack's (check, inner, passes, mode, "
                              "numerics, min_rows, min_query_rows, measure) or names of torch._inductor.config")
        if inner != "inductor":
            raise LaunchError(f"{fn}: Inductor options {sorted(inductor_options)} with inner={inner!r}; they "
                              "apply only with inner='inductor'")
        for k, v in inductor_options.items():
            if isinstance(known[k], bool) and not isinstance(v, bool):
                raise LaunchError(f"{fn}: Inductor option {k}={v!r}; expected a bool")
        casts = inductor_options.get("emulate_precision_casts", numerics in ROUNDED)
        if casts != (numerics in ROUNDED):    # the option would override numerics without a word
            raise LaunchError(f"{fn}: Inductor option emulate_precision_casts={casts!r} contradicts "
                              f"numerics={numerics!r}; give numerics='eager' (casts emulated) or 'fused' alone")
    return passes


def tilestack_backend(gm: fx.GraphModule, example_inputs, *, mode: str | None = None, options: dict | None = None):
    """The backend function ``torch.compile`` calls with each captured graph (see the module docstring)."""
    options = dict(options or {})
    mode = options.pop("mode", None) or mode     # optimize() passes it here: torch.compile takes mode or options
    check = options.pop("check", False)
    inner = options.pop("inner", "inductor")
    passes = options.pop("passes", None)
    numerics = options.pop("numerics", "eager")
    thresholds = {k: options.pop(k) for k in ("min_rows", "min_query_rows", "measure") if k in options}
    rule = dataclasses.replace(policy.current(), **thresholds)
    passes = check_options("tilestack backend", mode=mode, check=check, inner=inner, passes=passes,
                           inductor_options=options, numerics=numerics)
    if numerics == "exact" and passes is None:     # each tilestack kernel sums in its own order: none swapped in
        passes = ()
    _reports.append(run_passes(gm, passes=passes, check=check, inner=inner, rule=rule))
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx
    patches = numerics_patches(numerics) | (list_mode_options(mode) if mode else {}) | options
    explicit_fallbacks()
    if numerics == "exact":
        exact_fallbacks()
    return compile_fx(gm, example_inputs, config_patches=patches, decompositions=exact_decompositions(numerics))


def numerics_patches(numerics: str) -> dict:
    """The Inductor config patch for ``numerics`` (see the module docstring): intermediates rounded as eager's ops
    round them, and a 16-bit linear layer's bias added before its one rounding (``eager_addmm``); empty on a torch
    whose Inductor has no such switch."""
    from torch._inductor import config as inductor_config

    from tilestack.compile import eager_addmm
    if not hasattr(inductor_config, "emulate_precision_casts"):
        return {}
    rounded = "eager" if numerics in ROUNDED else numerics
    patches = {"emulate_precision_casts": rounded == "eager"} | eager_addmm.patches(rounded)
    if numerics == "exact":   # the decompositions are not in Inductor's cache key: a pass whose uuid says "exact" is
        patches["post_grad_custom_pre_pass"] = eager_addmm.Tagged(
            "tilestack-exact-1", patches.get("post_grad_custom_pre_pass", inductor_config.post_grad_custom_pre_pass))
    return patches


def exact_decompositions(numerics: str) -> dict | None:
    """Inductor's decomposition table less ``EXACT_KEPT`` for ``numerics="exact"`` (those ops then run as extern
    calls of eager's kernels: Inductor falls back to the aten op where it has no lowering), else None (Inductor's
    own table)."""
    if numerics != "exact":
        return None
    from torch._inductor.decomposition import select_decomp_table
    kept = {getattr(torch.ops.aten, name).default for name in EXACT_KEPT if hasattr(torch.ops.aten, name)}
    return {op: fn for op, fn in select_decomp_table().items() if op not in kept}


def exact_fallbacks() -> None:
    """``EXACT_KEPT``'s aten ops registered as Inductor fallbacks (extern calls of eager's kernels) before an exact
    compile lowers them. Left to Inductor's implicit path, an op that has a decomposition is refused whenever the
    environment variable CI is set (torch 2.11+: "make_fallback(...): a decomposition exists"), so an exact compile
    failed on CI machines only; torch registers its own allow-listed ops so (``override_decomp``). A backward op
    asks for contiguous inputs, as the implicit path asks of an aten op without a layout tag in a backward graph.
    The lowering is reached only where the decomposition was taken out, so other compiles do not change."""
    from torch._inductor.lowering import lowerings, make_fallback, require_contiguous, tag_to_layout_constraint
    from torch._library.utils import get_layout_constraint_tag

    for name in EXACT_KEPT:
        if not hasattr(torch.ops.aten, name):
            continue
        op = getattr(torch.ops.aten, name).default
        if op in lowerings:
            continue
        constraint = (require_contiguous if name.endswith("_backward")
                      else tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True)))
        make_fallback(op, layout_constraint=constraint, warn=False, override_decomp=True)


def explicit_fallbacks() -> None:
    """Every tilestack custom op made an Inductor fallback up front, with the layout constraint Inductor's implicit
    path would give it. On the implicit path torch 2.11 formats the op's arguments' IR for a log line whatever the
    log level; for the fp8 chain's op, whose arguments are a 12-layer graph's nested views, that string took
    minutes (the H200, session 11: the fp8-act GPT-2 prefill never finished compiling, its stack in
    ``exc.operator_str``). Ops registered later are taken on the next call."""
    from torch._inductor.lowering import lowerings, make_fallback, tag_to_layout_constraint
    from torch._library.utils import get_layout_constraint_tag

    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("tilestack::"):
            continue
        packet = getattr(torch.ops.tilestack, name.split("::", 1)[1])
        for overload in packet.overloads():
            op = getattr(packet, overload)
            if op not in lowerings:
                make_fallback(op, layout_constraint=tag_to_layout_constraint(
                    get_layout_constraint_tag(op, with_default=True)), warn=False)


def optimize(model, *, mode: str | None = None, check: bool = False, inner: str = "inductor",
             passes=None, dynamic: bool | None = None, fullgraph: bool = False, min_rows: int | None = None,
             min_query_rows: int | None = None, measure: bool | None = None, numerics: str = "eager",
             **inductor_options):
    """``torch.compile(model, backend="tilestack", ...)``: the module (or function) compiled with the pattern
    passes, the rest by ``inner``. ``tilestack.compile.last_report()`` says what was swapped, after the first call
    (Dynamo captures on the first call). ``min_rows`` / ``min_query_rows``: the thresholds of
    ``tilestack.compile.policy`` for this compile (default: ``policy.current()``); ``measure``: whether a GPU's
    fused GEMMs are swapped only where measured faster (default True, ``tilestack.compile.measure``); ``numerics``:
    "eager" (default), "exact" or "fused", as the backend's option (module docstring)."""
    if not (isinstance(model, torch.nn.Module) or callable(model)):
        raise LaunchError(f"optimize: model must be a torch.nn.Module or a function, got {type(model).__name__}")
    passes = check_options("optimize", mode=mode, check=check, inner=inner, passes=passes,
                           inductor_options=inductor_options, numerics=numerics)
    for name, value, kinds in (("dynamic", dynamic, (bool, type(None))), ("fullgraph", fullgraph, (bool,))):
        if not isinstance(value, kinds):
            raise LaunchError(f"optimize: {name}={value!r}; expected a bool{' or None' if len(kinds) > 1 else ''}")
    options = dict(inductor_options, check=check, inner=inner, numerics=numerics)
    if passes is not None:
        options["passes"] = passes
    thresholds = {k: v for k, v in (("min_rows", min_rows), ("min_query_rows", min_query_rows),
                                    ("measure", measure)) if v is not None}
    checked = dataclasses.replace(policy.current(), **thresholds)   # a bad threshold is refused here, not in Dynamo
    options |= {k: getattr(checked, k) for k in thresholds}          # as Policy took them (a NumPy int as an int)
    if mode is not None:    # torch.compile refuses both mode= and options=: the backend reads it from options
        options["mode"] = mode
    return torch.compile(model, backend="tilestack", options=options, dynamic=dynamic,
                         fullgraph=fullgraph)


def register() -> None:
    """Make ``backend="tilestack"`` known to torch.compile (once per process)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend
    if "tilestack" not in _BACKENDS:
        register_backend(name="tilestack")(tilestack_backend)
