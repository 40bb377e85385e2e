"""The ``linear_epilogue`` pass: Linear + bias + activation (+ residual add) in inference graphs -> one
tilestack GEMM with the epilogue fused, on the CPU (the reference executor; aot_eager as the inner compiler to
keep CI short). Each rewrite is checked on random inputs (check=True) and the outputs compared with eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tilestack
import tilestack.compile as tc
from tilestack import config
from tilestack.bench.models import GPT, GPT2_TINY, make_batch
from tilestack.compile import patterns

TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    # tiny shapes through the passes: the size thresholds (tilestack.compile.policy, test_policy.py) off
    with config.override(backend="reference"), tc.policy.override(min_rows=0, min_query_rows=0):
        yield
    torch._dynamo.reset()


class MLP(nn.Module):
    """A transformer MLP: x + dropout(proj(act(fc(x)))), with the activation written in one of torch's spellings."""

    ACTS = {
        "nn.GELU": (nn.GELU(), "gelu"),
        "F.gelu tanh": (lambda h: F.gelu(h, approximate="tanh"), "gelu_tanh"),
        "nn.ReLU inplace": (nn.ReLU(inplace=True), "relu"),
        "torch.relu": (torch.relu, "relu"),
        "Tensor.relu": (lambda h: h.relu(), "relu"),
        "F.silu": (F.silu, "silu"),
    }

    def __init__(self, act: str, d: int = 24, hidden: int = 40):
        super().__init__()
        self.fc, self.proj, self.drop = nn.Linear(d, hidden), nn.Linear(hidden, d), nn.Dropout(0.1)
        self.act = self.ACTS[act][0]

    def forward(self, x):
        return x + self.drop(self.proj(self.act(self.fc(x))))


def _made(report) -> list[str]:
    assert all(s.made and s.check.startswith("passed") for s in report.swaps), str(report)
    return [s.what for s in report.swaps]


@pytest.mark.parametrize("dtype", TOL, ids=str)
@pytest.mark.parametrize("act", MLP.ACTS)
def test_mlp_is_two_fused_gemms(act, dtype):
    """fc + bias + act, and proj + bias + (eval dropout) + residual add: two rewrites, each checked, eager's
    output."""
    torch.manual_seed(0)
    model = MLP(act).to(dtype).eval()
    x = torch.randn(2, 5, 24, dtype=dtype)
    with torch.no_grad():
        want = model(x.clone())
        got = tilestack.optimize(model, check=True, inner="aot_eager", fullgraph=True)(x.clone())
    report = tc.last_report()
    name = MLP.ACTS[act][1]
    assert _made(report) == [f"linear + bias + {name} -> tilestack::linear_epilogue",
                             "linear + bias + residual add -> tilestack::linear_epilogue"], str(report)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_through_inductor():
    """The custom op's fake implementation and the rest of the graph through Inductor (C++ on the CPU)."""
    pytest.importorskip("torch._inductor")
    model = MLP("nn.GELU").to(torch.bfloat16).eval()
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        got = torch.compile(model, backend="tilestack")(x)
        want = model(x)
    assert tc.last_report().swapped == {"linear_epilogue": 2}, str(tc.last_report())
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_matmul_plus_bias_and_aten_forms():
    """``x @ W + b`` then relu (W (K, N) as it is), and aten's addmm / mm + gelu + add as make_fx gives them."""
    torch.manual_seed(1)
    w, b = torch.randn(16, 12, dtype=torch.float16), torch.randn(12, dtype=torch.float16)
    r = torch.randn(7, 12, dtype=torch.float16)

    def f(x):
        return torch.relu(x @ w + b)

    x = torch.randn(7, 16, dtype=torch.float16)
    with torch.no_grad():
        got = tilestack.optimize(f, check=True, inner="aot_eager")(x)
    assert _made(tc.last_report()) == ["matmul + bias + relu -> tilestack::linear_epilogue"]
    torch.testing.assert_close(got, f(x), rtol=4e-3, atol=4e-3)

    from torch.fx.experimental.proxy_tensor import make_fx

    for fn, head in ((lambda x, w, b, r: F.gelu(torch.addmm(b, x, w)) + r, "addmm + bias + gelu"),
                     (lambda x, w, b, r: F.gelu(torch.mm(x, w), approximate="tanh") + r, "mm + gelu_tanh")):
        gm = make_fx(fn)(x, w, b, r)
        assert any(n.target is torch.ops.aten.gelu.default for n in gm.graph.nodes)
        report = tc.run_passes(gm, passes=["linear_epilogue"], check=True)
        assert _made(report) == [f"{head} + residual add -> tilestack::linear_epilogue"], str(report)
        torch.testing.assert_close(gm(x, w, b, r), fn(x, w, b, r), rtol=4e-3, atol=4e-3)

    # a 3-D input: view -> addmm(b, x2d, t(w)) -> view back -> gelu -> add, as AOT autograd writes F.linear
    x3, wl = torch.randn(2, 5, 16, dtype=torch.float16), torch.randn(12, 16, dtype=torch.float16)
    r3 = torch.randn(2, 5, 12, dtype=torch.float16)

    def linear3(x, w, b, r):
        return F.gelu(F.linear(x, w, b)) + r

    gm = make_fx(linear3)(x3, wl, b, r3)
    report = tc.run_passes(gm, passes=["linear_epilogue"], check=True)
    assert _made(report) == ["addmm + bias + gelu + residual add -> tilestack::linear_epilogue"], str(report)
    torch.testing.assert_close(gm(x3, wl, b, r3), linear3(x3, wl, b, r3), rtol=4e-3, atol=4e-3)


def test_gpt2_tiny_inference():
    """The benchmark GPT in bf16: each block's c_fc + GELU fused (the projections' outputs feed the fused add +
    LayerNorm, which keeps them); the logits as eager's."""
    torch.manual_seed(0)
    model = GPT(GPT2_TINY, impl="torch").to(torch.bfloat16).eval()
    idx, _ = make_batch(GPT2_TINY, 2, 8)
    with torch.no_grad():
        want = model(idx)
        got = tilestack.optimize(model, check=True, inner="aot_eager", fullgraph=True)(idx)
    report = tc.last_report()
    assert report.swapped["linear_epilogue"] == GPT2_TINY.n_layer, str(report)
    assert _made(report).count("linear + bias + gelu_tanh -> tilestack::linear_epilogue") == GPT2_TINY.n_layer
    scale = float(want.float().abs().max())
    assert float((got.float() - want.float()).abs().max()) <= 1e-2 * scale


# ---- what is left, and why ------------------------------------------------------------------------------------------
def _declined(report) -> str:
    return "\n".join(why for pattern, _, why in report.declined if pattern == "linear_epilogue")


def test_training_graph_is_left_to_inductor():
    model = MLP("nn.GELU").to(torch.bfloat16)                # parameters need gradients, no no_grad
    tilestack.optimize(model, inner="aot_eager")(torch.randn(3, 24, dtype=torch.bfloat16))
    report = tc.last_report()
    assert "linear_epilogue" not in report.swapped and "needs gradients" in _declined(report), str(report)


def test_f32_and_unforced_cpu_are_declined():
    model = MLP("F.silu").eval()
    with torch.no_grad():
        tilestack.optimize(model, inner="aot_eager")(torch.randn(3, 24))
    assert "tilestack's GEMM multiplies bf16 or f16" in _declined(tc.last_report()), str(tc.last_report())
    torch._dynamo.reset()
    with config.override(backend="auto"), torch.no_grad():
        tilestack.optimize(model.to(torch.bfloat16), inner="aot_eager")(torch.randn(3, 24, dtype=torch.bfloat16))
    assert "tensors on cpu" in _declined(tc.last_report()), str(tc.last_report())


def test_nothing_to_fuse_or_a_shared_intermediate_is_left():
    """A lone Linear (bias only), and a Linear whose output is read twice (the activation cannot be fused without
    writing the pre-activation anyway): no rewrite; the report says why linear stayed."""
    fc = nn.Linear(8, 8).to(torch.bfloat16)

    def f(x):
        h = fc(x)
        return F.gelu(h) * h, fc(x)

    with torch.no_grad():
        tilestack.optimize(f, inner="aot_eager")(torch.randn(4, 8, dtype=torch.bfloat16))
    report = tc.last_report()
    assert "linear_epilogue" not in report.swapped, str(report)
    assert "no activation or residual add after it to fuse" in report.left_why["linear"]


def test_residual_of_another_dtype_stops_before_the_add():
    """A residual add that promotes (bf16 + f32 -> f32) is not fused; the activation before it is."""
    fc = nn.Linear(8, 8).to(torch.bfloat16)

    def f(x, r):
        return F.silu(fc(x)) + r

    x, r = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4, 8)
    with torch.no_grad():
        got = tilestack.optimize(f, check=True, inner="aot_eager")(x, r)
        assert _made(tc.last_report()) == ["linear + bias + silu -> tilestack::linear_epilogue"]
        torch.testing.assert_close(got, f(x, r), rtol=2e-2, atol=2e-2)


def test_dynamic_shapes():
    model = MLP("nn.GELU").to(torch.bfloat16).eval()
    g = tilestack.optimize(model, check=True, inner="aot_eager", dynamic=True)
    with torch.no_grad():
        for n in (5, 7):
            x = torch.randn(n, 24, dtype=torch.bfloat16)
            torch.testing.assert_close(g(x).float(), model(x).float(), rtol=2e-2, atol=2e-2)
    assert tc.last_report().swapped == {"linear_epilogue": 2}, str(tc.last_report())


def test_pass_is_listed_after_the_norms():
    """add_norm must see the residual adds first (a pre-norm block's add feeds the next norm)."""
    names = list(patterns.PASSES)
    assert names.index("add_norm") < names.index("norm") < names.index("linear_epilogue")


@pytest.mark.parametrize("mode", ["int8", "fp8", "fp8-act"])
def test_quantized_mlp(mode):
    """After tilestack.quantize: tilestack::quant_linear, its view back to (B, N, .), GELU and the residual add
    become the quantized GEMM with the epilogue fused (kernels.gemm's, after the scales)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 24, dtype=torch.bfloat16)
    model = tilestack.quantize(MLP("F.gelu tanh").to(torch.bfloat16).eval(), mode,
                               calibration=[x] if mode == "fp8-act" else None)
    with torch.no_grad():
        want = model(x)
        got = tilestack.optimize(model, check=True, inner="aot_eager", fullgraph=True)(x)
    chain = ["fp8 linear+gelu_tanh -> fp8 linear -> tilestack::norm_fp8 / quant_linear_fp8 (fp8 activations "
             "between)"] if mode == "fp8-act" else []     # fc writes proj's fp8 activations (test_fp8_chain.py)
    assert _made(tc.last_report()) == [
        "quant_linear + bias + gelu_tanh -> tilestack::quant_linear_epilogue",
        "quant_linear + bias + residual add -> tilestack::quant_linear_epilogue"] + chain, str(tc.last_report())
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_the_fused_gemm_op_is_a_plain_library_op_with_its_fake():
    """tilestack::linear_epilogue is registered through torch.library.Library (no custom_op wrapper on its call
    path: compile/ops.py says why): its schema and fake implementation pass torch's own checks, and its result is
    the kernel's."""
    from tilestack.compile import ops

    x, w = torch.randn(3, 5, 16, dtype=torch.bfloat16), torch.randn(24, 16, dtype=torch.bfloat16)
    b, r = torch.randn(24, dtype=torch.bfloat16), torch.randn(3, 5, 24, dtype=torch.bfloat16)
    args = (x, w, b, r, "gelu_tanh", False)
    assert isinstance(ops.linear_epilogue_op, torch._ops.OpOverload)
    with config.override(backend="reference"):
        torch.library.opcheck(ops.linear_epilogue_op, args, test_utils=("test_schema", "test_faketensor"))
        got = ops.linear_epilogue_op(*args)
    want = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh") + r.float()
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


class _AutocastMLP(MLP):
    def __init__(self, dtype):
        super().__init__("F.silu")
        self.dtype = dtype

    def forward(self, x):
        with torch.autocast("cpu", dtype=self.dtype):
            return super().forward(x)


@pytest.mark.parametrize("model_dtype, autocast_dtype", [(torch.float32, torch.bfloat16),
                                                         (torch.bfloat16, torch.float16)], ids=str)
def test_linear_layers_cast_by_autocast_are_declined_naming_the_region(model_dtype, autocast_dtype):
    """Inside torch.autocast the graph holds the tensors before the linear casts them: an f32 model's layers said
    "weight f32" (true of the graph, silent on autocast), and a bf16 model's under f16 autocast were matched and
    then caught only by the replacement's dtype check (bf16 where eager gives f16). Both now name the region."""
    model = _AutocastMLP(autocast_dtype).to(model_dtype).eval()
    x = torch.randn(3, 24, dtype=model_dtype)
    with torch.no_grad():
        want = model(x)
        got = tilestack.optimize(model, inner="aot_eager")(x)
    report = tc.last_report()
    assert "linear_epilogue" not in report.swapped, str(report)
    assert f"inside a torch.autocast({autocast_dtype}) region" in _declined(report), str(report)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_a_model_already_in_the_autocast_dtype_is_still_fused():
    model = _AutocastMLP(torch.bfloat16).to(torch.bfloat16).eval()
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        want = model(x)
        got = tilestack.optimize(model, check=True, inner="aot_eager")(x)
    assert "linear_epilogue" in tc.last_report().swapped, str(tc.last_report())
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
