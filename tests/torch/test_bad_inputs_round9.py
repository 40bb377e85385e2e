"""Round nine of the bad-input sweep: float arguments outside f32's normal range under Triton's interpreter, a
Linear registered under two names given to ``tilestack.quantize``, and ``tilestack tune`` options a dry run
returned before reading.

What it found (each test failed before its fix):
- ``tilestack.attention(q, k, v, scale=1e-40)`` (a subnormal f32 scale; torch's SDPA takes it) on the Triton
  backend without a GPU failed inside Triton's interpreter ("Both operands must be same dtype. Got fp64 and fp32"):
  the interpreter hands a float argument outside f32's normal range to the kernel as an fp64 scalar, which made the
  f32 work f64. The generated kernel casts such an argument to f32 (``backends/triton/codegen.py``), as the
  compiled kernel's fp32 parameter is;
- ``tilestack.quantize`` on a model holding one nn.Linear under two names (``self.b = self.a``, a layer applied
  twice) quantized it under its first name only: the second kept the float layer, and the model ran half
  quantized without a word. Every name now gets the one QuantLinear; a ``skip`` naming any of them keeps the layer
  in float under all;
- ``tilestack tune --dry-run --as-device nosuch`` and ``--model --model-data missing.jsonl`` listed a plan and
  exited 0 (a dry run returned before either was read), ``--model-data`` without ``--model`` was ignored, and
  ``--device -1`` was taken: each refused by name before any work.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import tilestack
from tilestack import config
from tilestack.cli import _register, app
from tilestack.quant import QuantLinear

_register()
F = torch.nn.functional


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---- float arguments outside f32's normal range under Triton's interpreter ----------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("scale", [1e-40, 1e-45, 2e-38])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_a_subnormal_scale_answers_as_torch(backend, scale, causal):
    """A scale below f32's smallest normal (2**-126 ~ 1.2e-38): torch's SDPA answers (the softmax of scores near
    0 is near uniform); the Triton backend failed inside the interpreter's tl.dot on an fp64 operand. Forward and
    backward against float64 torch."""
    q, k, v = randn(1, 2, 5, 16), randn(1, 2, 5, 16, seed=1), randn(1, 2, 5, 16, seed=2)
    do = randn(1, 2, 5, 16, seed=3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    refs = [t.double().requires_grad_() for t in (q, k, v)]
    with config.override(backend=backend):
        o = tilestack.attention(*leaves, causal=causal, scale=scale)
        o.backward(do)
    want = F.scaled_dot_product_attention(*refs, is_causal=causal, scale=scale)
    want.backward(do.double())
    torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=1e-5)
    for got, ref in zip(leaves, refs, strict=True):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_the_sdpa_drop_in_takes_a_subnormal_scale(backend):
    """The drop-in hands the kernels any scale in (0, MAX_SCALE]: a subnormal one too, answered as torch's."""
    q, k, v = randn(2, 2, 7, 8), randn(2, 2, 7, 8, seed=1), randn(2, 2, 7, 8, seed=2)
    with config.override(backend=backend):
        got = tilestack.scaled_dot_product_attention(q, k, v, scale=3e-39)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=3e-39)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("eps", [1e-45, 1e39])
def test_norms_take_an_eps_outside_f32s_normal_range(backend, eps):
    """eps a subnormal or past f32's largest (its infinity in f32: y = 0): each norm as torch's, in float64."""
    x, w, b = randn(4, 16), randn(16, seed=1), randn(16, seed=2)
    with config.override(backend=backend):
        rms = tilestack.rms_norm(x, w, eps=eps)
        ln = tilestack.layer_norm(x, w, b, eps=eps)
    torch.testing.assert_close(rms.double(), F.rms_norm(x.double(), (16,), w.double(), eps), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ln.double(), F.layer_norm(x.double(), (16,), w.double(), b.double(), eps),
                               rtol=1e-5, atol=1e-5)


# ---- tilestack.quantize: one Linear under two names ---------------------------------------------------------------
class Shared(nn.Module):
    """One Linear applied twice, registered as ``a`` and as ``b`` (weight sharing across depth)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = self.a
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))))


def _shared():
    torch.manual_seed(0)
    return Shared()


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_a_linear_under_two_names_is_quantized_under_both(mode):
    """Before: named_modules() gave the shared layer once (as ``a``), so ``b`` kept the float layer and the model
    ran half quantized. Now both names hold one QuantLinear, and the model's output is that of quantizing the
    layer at both places (its own quantized reference, built by hand)."""
    model = _shared()
    x = randn(3, 16, seed=4)
    with config.override(backend="reference"):
        manual = _shared()
        qa = QuantLinear(manual.a, mode)
        manual.a, manual.b, manual.head = qa, qa, QuantLinear(manual.head, mode)
        want = manual(x)
        q = tilestack.quantize(model, mode)
        assert type(q.a) is QuantLinear and q.b is q.a
        torch.testing.assert_close(q(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["a", "b"])
def test_skip_by_any_name_of_a_shared_linear_keeps_it_float_under_all(name):
    """A layer is one module: skipped under any of its names, it stays the float Linear under every one (before,
    skip=("b",) matched nothing named_modules() gave and warned, then quantized the layer as ``a`` anyway)."""
    model = _shared()
    float_layer = model.a
    with config.override(backend="reference"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")      # the name matches a Linear of the model: no warning
            q = tilestack.quantize(model, "int8", skip=(name,))
    assert q.a is float_layer and q.b is float_layer and type(q.head) is QuantLinear


def test_fp8_act_calibrates_a_shared_linear_once_per_call():
    """fp8-act: the shared layer's activation scale from every input it sees (both calls), recorded by one hook,
    and set under both names."""
    model = _shared()
    batches = [randn(4, 16, seed=5), randn(2, 16, seed=6)]
    seen = []
    with torch.no_grad():
        for x in batches:
            first = model.a(x)
            seen += [x, torch.relu(first)]
    amax = max(float(t.abs().max()) for t in seen)
    with config.override(backend="reference"):
        q = tilestack.quantize(model, "fp8-act", calibration=batches)
    assert q.b is q.a
    from tilestack.quant.gemm import activation_scale
    assert q.a.x_scale == activation_scale(amax)


# ---- tilestack tune: options a dry run returned before reading ----------------------------------------------------
def _tune(args, tmp_path):
    with config.override(cache_dir=tmp_path / "cache"):
        res = CliRunner().invoke(app, ["tune", "--budget-s", "5", "-k", "softmax", *args])
    flat = " ".join(re.sub("[\u2500-\u257f]", "", res.output).split())
    return res, flat


@pytest.mark.parametrize("args,needle", [
    (["--dry-run", "--as-device", "nosuch"], "--as-device 'nosuch': device key 'nosuch'; expected"),
    (["--dry-run", "--as-device", "sm90-132sm:H200"], "--as-device 'sm90-132sm:H200': device key 'sm90-132sm'"),
    (["--dry-run", "--model", "--model-data", "{tmp}/missing.jsonl"], "is not there; expected an existing file"),
    (["--dry-run", "--model", "--model-data", "{tmp}"], "is a folder; expected an existing file"),
    (["--dry-run", "--model-data", "{tmp}/data.jsonl"], "without --model; expected --model"),
    (["--dry-run", "--device", "-1"], "-1 is not in the range x>=0"),
])
def test_tune_refuses_what_a_dry_run_skipped(args, needle, tmp_path):
    """Each of these listed a plan and exited 0 before; now exit 2 naming the option, before any work."""
    (tmp_path / "data.jsonl").write_text("")
    res, flat = _tune([a.replace("{tmp}", str(tmp_path)) for a in args], tmp_path)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert " ".join(needle.replace("{tmp}", str(tmp_path)).split()) in flat, flat


def test_tune_dry_run_for_a_valid_device_key_still_plans(tmp_path):
    res, flat = _tune(["--dry-run", "--as-device", "sm90-132sm-227kb:NVIDIA H200"], tmp_path)
    assert res.exit_code == 0, res.output
    assert "softmax" in flat
