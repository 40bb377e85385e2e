"""tilestack.compile.eager_addmm: 16-bit addmm kept whole under numerics="eager" (the bias added before the one
rounding, as eager's cuBLAS call does). The split it prevents happens only on a GPU; here, on the CPU: the pass
marks exactly the 16-bit addmm nodes, the wrapped pattern check declines a marked node and defers to Inductor's
own check otherwise, the backend's patch has one of the two forms, and a model compiled with the pass runs and
equals eager."""

import types

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from tilestack.compile import eager_addmm
from tilestack.compile.backend import numerics_patches


def _graph(dtype):
    x = torch.randn(4, 8, dtype=dtype)
    w, b = torch.randn(16, 8, dtype=dtype), torch.randn(16, dtype=dtype)
    return make_fx(lambda x, w, b: F.gelu(F.linear(x, w, b)) + F.linear(x, w, b).float().to(dtype))(x, w, b).graph


@pytest.mark.parametrize("dtype,marked", [(torch.bfloat16, True), (torch.float16, True), (torch.float32, False)])
def test_the_pass_marks_16_bit_addmm_only(dtype, marked):
    graph = _graph(dtype)
    addmms = [n for n in graph.nodes if n.target is torch.ops.aten.addmm.default]
    assert len(addmms) == 2
    eager_addmm.KeepHalfAddmm()(graph)
    assert all(bool(n.meta.get(eager_addmm.MARK)) is marked for n in addmms)
    assert not any(n.meta.get(eager_addmm.MARK) for n in graph.nodes if n not in addmms)


def test_the_wrapped_check_declines_marked_nodes_and_defers_otherwise():
    assert eager_addmm.install()
    assert eager_addmm.install()          # a second call finds its wrapper, wraps nothing twice
    from torch._inductor.fx_passes import post_grad
    entries = [e for p in post_grad.pass_patterns for es in p.patterns.values() for e in es
               if getattr(getattr(e, "handler", None), "__name__", "") == "unfuse_bias_add_to_pointwise"]
    assert entries and all(e.extra_check._tilestack_keep_addmm for e in entries)
    # each wraps Inductor's own check, not a wrapper of ours (the second install wrapped nothing again)
    assert not any(getattr(e.extra_check.__defaults__[0], "_tilestack_keep_addmm", False) for e in entries)
    check = entries[0].extra_check
    calls = []
    marked = types.SimpleNamespace(output_node=lambda: types.SimpleNamespace(meta={eager_addmm.MARK: True}))
    plain = types.SimpleNamespace(output_node=lambda: types.SimpleNamespace(meta={}))
    inner = check.__defaults__[0]
    try:
        check.__defaults__ = (lambda m: calls.append(m) or True,)
        assert check(marked) is False and calls == []
        assert check(plain) is True and calls == [plain]
    finally:
        check.__defaults__ = (inner,)


def test_the_backend_patch_keeps_16_bit_addmm_whole_only_under_eager_numerics():
    from torch._inductor import config as inductor_config
    eager, fused = numerics_patches("eager"), numerics_patches("fused")
    assert eager["emulate_precision_casts"] is True and fused == {"emulate_precision_casts": False}
    if hasattr(inductor_config, "keep_addmm_fused_for_half_dtypes"):
        assert eager["keep_addmm_fused_for_half_dtypes"] is True
    else:
        assert isinstance(eager["post_grad_custom_pre_pass"], eager_addmm.KeepHalfAddmm)


def test_a_user_pre_pass_still_runs_and_the_uuid_names_both():
    seen = []

    class Mine(torch._inductor.custom_graph_pass.CustomGraphPass):
        def __call__(self, graph):
            seen.append(graph)

        def uuid(self):
            return "mine"

    keep = eager_addmm.KeepHalfAddmm(then=Mine())
    graph = _graph(torch.bfloat16)
    keep(graph)
    assert seen == [graph] and keep.uuid() == ("tilestack-keep-half-addmm-1", "mine")


def test_a_model_compiled_with_the_pass_runs_and_equals_eager():
    from torch._inductor.compile_fx import compile_fx
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)).to(torch.bfloat16)
    x = torch.randn(5, 8, dtype=torch.bfloat16)

    def backend(gm, inputs):
        return compile_fx(gm, inputs, config_patches={"post_grad_custom_pre_pass": eager_addmm.KeepHalfAddmm(),
                                                       "emulate_precision_casts": True})

    with torch.no_grad():
        got = torch.compile(model, backend=backend)(x)
        assert torch.equal(got, model(x))


# ---- numerics="exact": eager's own norm kernels, no tilestack kernel swapped in ------------------------------------
class _Block(torch.nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.fc = torch.nn.Linear(d, 4 * d)
        self.proj = torch.nn.Linear(4 * d, d)

    def forward(self, h, r):
        h = h + r
        y = self.ln(h)
        return h, self.proj(F.gelu(self.fc(y), approximate="tanh"))


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_exact_keeps_eager_layer_norm_as_an_extern_call_and_swaps_nothing(dtype):
    from torch._inductor.utils import run_and_get_code

    import tilestack
    from tilestack.compile import last_report

    torch._dynamo.reset()
    block = _Block().to(dtype)
    h, r = torch.randn(2, 8, 16, dtype=dtype), torch.randn(2, 8, 16, dtype=dtype)
    with torch.no_grad():
        want = block(h, r)
        got, code = run_and_get_code(tilestack.optimize(block, numerics="exact"), h, r)
    src = "\n".join(code)
    assert "aten.native_layer_norm.default" in src             # eager's kernel, called
    assert not last_report().swaps                              # no tilestack kernel: each sums in its own order
    if dtype == torch.bfloat16:     # every result rounded as eager rounds it: eager's bits
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    else:                           # f32 intermediates are not rounded: Inductor's pointwise order, within ulps
        assert all(torch.allclose(g, w, rtol=1e-6, atol=1e-6) for g, w in zip(got, want, strict=True))
    torch._dynamo.reset()
    with torch.no_grad():
        _, code = run_and_get_code(tilestack.optimize(block), h, r)
    assert "aten.native_layer_norm.default" not in "\n".join(code)     # "eager" lets Inductor fuse it


def test_exact_trains_with_eager_layer_norm_backward():
    import tilestack
    torch._dynamo.reset()
    block = _Block()
    ref = _Block()
    ref.load_state_dict(block.state_dict())
    h, r = torch.randn(2, 8, 16, requires_grad=True), torch.randn(2, 8, 16)
    h2 = h.detach().clone().requires_grad_()
    sum(o.sum() for o in tilestack.optimize(block, numerics="exact")(h, r)).backward()
    sum(o.sum() for o in ref(h2, r)).backward()
    assert torch.allclose(h.grad, h2.grad, atol=1e-6)
    assert all(torch.allclose(p.grad, q.grad, atol=1e-6) for p, q in zip(block.parameters(), ref.parameters(),
                                                                         strict=True))


def test_exact_and_eager_compiles_of_one_graph_are_kept_apart_in_inductors_cache():
    """The decomposition table is not in Inductor's cache key: an "exact" compile of a graph already compiled with
    "eager" numerics (cache on) must still call eager's layer norm, and the other way round."""
    from torch._inductor.utils import run_and_get_code

    import tilestack
    block, h, r = _Block(), torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=True):
        for numerics, kept in (("eager", False), ("exact", True), ("eager", False), ("exact", True)):
            torch._dynamo.reset()
            _, code = run_and_get_code(tilestack.optimize(block, numerics=numerics), h, r)
            assert ("aten.native_layer_norm.default" in "\n".join(code)) is kept, numerics


def test_exact_decompositions_leave_out_the_norms_only():
    from torch._inductor.decomposition import select_decomp_table

    from tilestack.compile.backend import exact_decompositions
    assert exact_decompositions("eager") is None and exact_decompositions("fused") is None
    table, full = exact_decompositions("exact"), select_decomp_table()
    left = set(full) - set(table)
    assert torch.ops.aten.native_layer_norm.default in left
    assert all(op._opname in ("native_layer_norm", "native_layer_norm_backward", "_fused_rms_norm",
                              "_fused_rms_norm_backward") for op in left)


def test_exact_with_a_bad_numerics_value_is_refused_by_name():
    import tilestack
    from tilestack.errors import LaunchError
    with pytest.raises(LaunchError, match=r"numerics='bits'; expected one of \('eager', 'exact', 'fused'\)"):
        tilestack.optimize(_Block(), numerics="bits")


class _RmsBlock(torch.nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.norm = torch.nn.RMSNorm(d, eps=1e-6)
        self.fc = torch.nn.Linear(d, d)

    def forward(self, h):
        return self.fc(self.norm(h))


@pytest.mark.parametrize("make", (_Block, _RmsBlock))
def test_exact_compiles_forward_and_backward_with_the_ci_variable_set(monkeypatch, make):
    """Inductor refuses an implicit fallback for an op that has a decomposition whenever ``CI`` is set (the project's
    CI sets it; session 15's landing failed so). The exact compile registers its kept norms itself; taken out of
    Inductor's lowerings first, so that an earlier test's registration cannot hide the refusal."""
    from torch._inductor import lowering

    import tilestack
    from tilestack.compile.backend import EXACT_KEPT
    monkeypatch.setenv("CI", "1")
    for name in EXACT_KEPT:
        if hasattr(torch.ops.aten, name):
            monkeypatch.delitem(lowering.lowerings, getattr(torch.ops.aten, name).default, raising=False)
    torch._dynamo.reset()
    block = make()
    ref = make()
    ref.load_state_dict(block.state_dict())
    args = (torch.randn(2, 8, 16, requires_grad=True),) + ((torch.randn(2, 8, 16),) if make is _Block else ())
    args2 = (args[0].detach().clone().requires_grad_(),) + args[1:]
    out, want = tilestack.optimize(block, numerics="exact")(*args), ref(*args2)
    out, want = (out,) if torch.is_tensor(out) else out, (want,) if torch.is_tensor(want) else want
    sum(o.sum() for o in out).backward()
    sum(o.sum() for o in want).backward()
    assert all(torch.allclose(o, w, atol=1e-6) for o, w in zip(out, want, strict=True))
    assert torch.allclose(args[0].grad, args2[0].grad, atol=1e-5)
    torch._dynamo.reset()
