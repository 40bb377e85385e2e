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
