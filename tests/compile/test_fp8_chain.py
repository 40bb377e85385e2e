"""The fp8_chain pass on the CPU (reference executor): after ``tilestack.quantize(model, "fp8-act")`` the norm
before a quantized layer writes its fp8 activations and each layer's epilogue writes the next one's, so no layer
quantizes its input in a pass of its own; the result matches the quantized model run eagerly."""

from __future__ import annotations

import pytest
import torch

import tilestack
import tilestack.compile as tc
import tilestack.quant.gemm as qg
from tilestack import config
from tilestack.bench.models import GPT, GPT2_TINY, make_batch
from tilestack.compile import ops
from tilestack.quant import quantize_weight, quantized_linear
from tilestack.quant.producers import norm_fp8


@pytest.fixture(autouse=True)
def _reference():
    torch._dynamo.reset()
    with config.override(backend="reference"), tc.policy.override(min_rows=0, min_query_rows=0):
        yield
    torch._dynamo.reset()


def _made(report) -> list[str]:
    return [s.what for s in report.swaps if s.made]


def test_gpt_blocks_become_fp8_chains():
    torch.manual_seed(0)
    model = GPT(GPT2_TINY).to(torch.bfloat16).eval()
    idx, _ = make_batch(GPT2_TINY, 2, 16, seed=0)
    qmodel = tilestack.quantize(model, "fp8-act", calibration=[idx], skip=("lm_head",))
    with torch.no_grad():
        want = qmodel(idx)
        got = tilestack.optimize(qmodel, check=True, inner="aot_eager")(idx)
    report = tc.last_report()
    chains = [w for w in _made(report) if "fp8 activations between" in w]
    n = GPT2_TINY.n_layer
    mlp = "add + layer_norm -> fp8 linear+gelu_tanh -> fp8 linear -> tilestack"   # ln_2 -> c_fc + GELU -> c_proj
    qkv = "layer_norm -> fp8 linear -> tilestack"                                 # ln_1 -> c_attn
    assert sum(w.startswith(mlp) for w in chains) == n, str(report)
    assert sum(w.startswith(qkv) or w.startswith("add + " + qkv) for w in chains) == n, str(report)
    assert len(chains) == 2 * n, str(report)
    assert all(s.check.startswith("passed") for s in report.swaps if s.pattern == "fp8_chain"), str(report)
    err = float((got.float() - want.float()).norm() / want.float().norm())
    assert err < 2e-2, err


def test_chain_runs_no_quantizing_pass(monkeypatch):
    """ts_fp8_chain's layers read fp8 and write fp8: neither the activation quantizer nor the in-GEMM quantizing
    kernel runs; the result is the same layers composed by hand with the producers' quantization."""
    torch.manual_seed(1)
    M, d, hidden = 12, 24, 40
    x, r = torch.randn(M, d).bfloat16(), torch.randn(M, d).bfloat16()
    w, b = torch.randn(d).bfloat16(), torch.randn(d).bfloat16()
    (q1, s1), (q2, s2) = quantize_weight(torch.randn(hidden, d) / 5, "fp8"), quantize_weight(torch.randn(d, hidden) / 6,
                                                                                               "fp8")
    b1, b2 = torch.randn(hidden).bfloat16(), torch.randn(d).bfloat16()
    xs1, xs2 = 0.02, 0.01
    spec = ("layer", 1e-5, (((xs1, "gelu_tanh"), (xs2, None)),), (torch.bfloat16,), (None,))   # one chain
    want_y8, want_h = norm_fp8(x, w, b, 1e-5, xs1, residual=r)
    mid = quantized_linear(want_y8, q1, s1, b1, x_scale=xs1, activation="gelu_tanh", out_scale=xs2)
    want = quantized_linear(mid, q2, s2, b2, x_scale=xs2)

    def refuse(*a, **k):
        raise AssertionError("a quantizing pass ran")
    monkeypatch.setattr(qg.quantize_fp8_kernel, "launcher_for", refuse)
    monkeypatch.setattr(qg.qgemm_act_kernel, "launcher_for", refuse)
    h, y = ops.ts_fp8_chain(x, r, w, b, q1, s1, b1, None, q2, s2, b2, None, spec)
    torch.testing.assert_close(h, want_h)
    torch.testing.assert_close(y, want)
    # against float64 on the same quantization steps: fc's f32 result times 1 / xs2, rounded once to fp8
    hf = (x.double() + r.double())
    ln = torch.nn.functional.layer_norm(hf, (d,), w.double(), b.double(), 1e-5)
    a8 = qg.quantize_activation(ln, xs1).double() * xs1
    f = qg.torch_activation(a8 @ (q1.double() * s1.double()[:, None]).T + b1.double(), "gelu_tanh")
    m8 = qg.quantize_activation(f, xs2).double() * xs2
    ref = m8 @ (q2.double() * s2.double()[:, None]).T + b2.double()
    assert float((y.double() - ref).norm() / ref.norm()) < 2e-2


def test_fp8_out_saturates_and_keeps_nan():
    q, s = quantize_weight(torch.eye(16), "fp8")
    x = torch.linspace(-4, 4, 16).repeat(3, 1)
    x[1, 3] = float("nan")
    y = quantized_linear(x, q, s, x_scale=4 / 448, out_scale=1 / 448, backend="reference")   # y * 448: saturates
    assert y.dtype == torch.float8_e4m3fn
    assert y[1, 3].float().isnan()
    assert float(y.float().nan_to_num().abs().max()) == 448.0


class _SharedNorm(torch.nn.Module):
    """One norm read by three projections (as Llama's separate q, k and v), and a lone layer after them."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))
        self.out = torch.nn.Linear(d, d)

    def forward(self, x):
        y = self.norm(x)
        return self.out(self.q(y) * torch.sigmoid(self.k(y)) * self.v(y))


def test_a_norm_read_by_several_layers_writes_one_fp8_tensor():
    torch.manual_seed(3)
    x = torch.randn(4, 24, 32, dtype=torch.bfloat16)
    model = _SharedNorm().to(torch.bfloat16).eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    qmodel = tilestack.quantize(model, "fp8-act", calibration=[x])
    scales = {qmodel.q.x_scale, qmodel.k.x_scale, qmodel.v.x_scale}
    assert len(scales) == 1                         # the same input calibrates the same scale
    with torch.no_grad():
        want = qmodel(x)
        got = tilestack.optimize(qmodel, check=True, inner="aot_eager")(x)
    made = [w for w in _made(tc.last_report()) if "fp8 activations between" in w]
    assert made == ["layer_norm -> (fp8 linear | fp8 linear | fp8 linear) -> tilestack::norm_fp8 / "
                    "quant_linear_fp8 (fp8 activations between)"], str(tc.last_report())
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 3e-2
