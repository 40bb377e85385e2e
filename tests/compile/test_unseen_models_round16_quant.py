"""``tilestack.quantize`` on unseen models, round 16 (unseen_blocks_round16.py): DiT's adaLN-Zero block (its
modulation Linear reads (b, D) conditioning rows, the others (b, n, D) tokens), a conv + BatchNorm classifier (the
convolutions left in float and named), a pre-norm GQA block whose Linears have no bias (fp8-act's bias correction gives
them one), a diffusion time embedding whose first Linear has one input feature, a Linear with pruned (all-zero) output
channels, and layers quantize cannot take (a LoRA subclass of nn.Linear with its own forward, nn.Bilinear, an
uninitialized nn.LazyLinear), each named in the warning with its reason. Each model in int8, fp8 and fp8-act against
the float model in float64 within the documented bounds (docs/inference.md: 2 %, 8 %, 15 % of the largest output),
compiled (check=True) within tolerance of its eager self, the fused epilogues named in the report.

What this round fixed (src/tilestack/quant/linear.py): a subclass of nn.Linear with a forward of its own (a LoRA
layer: ``base(x) + x A^T B^T``) was left in float with the reason of nn.MultiheadAttention's out_proj, "which its owner
may read by weight", which says nothing of why; it now says its forward computes more than x @ W^T + b, which a
QuantLinear in its place would drop. A bare nn.Linear model quantize cannot take (a float64 or NaN weight) was refused
as "quantize_weight: w ...", naming neither the call nor the model; it is now refused as a model's layer is.
Helpers and the reference-backend fixture: test_unseen_models_round1, test_unseen_round9,
test_unseen_models_round12_quant, test_unseen_models_round13_quant."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_unseen_models_round1 import _fresh  # noqa: F401 - _fresh: autouse
from test_unseen_models_round12_quant import _layer_reference
from test_unseen_models_round13_quant import BOUNDS, MODES, _quantized, _relative
from test_unseen_round9 import _f64
from torch import nn
from unseen_blocks_round16 import (
    CLASSES,
    TIME_DIM,
    ConvBNClassifier,
    D,
    DiTBlock,
    MixedLayers,
    ScaledResidualGQABlock,
    TimeEmbedding,
    seeded,
)

import tilestack
import tilestack.compile as tc
from tilestack.errors import LaunchError
from tilestack.quant import QuantLinear

F32, BF16 = torch.float32, torch.bfloat16
COMPILED_TOL = {"int8": 2e-2, "fp8": 2e-2, "fp8-act": 3e-2}     # the compiled model against its eager self
CONVS = r"left in float .*: features\.0 \(Conv2d\), features\.3 \(Conv2d\)"


def _x(*shape, seed: int = 1, dtype=F32) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(*shape, dtype=dtype)


def _dit_args(b: int = 2, seed: int = 1):
    return _x(b, 7, D, seed=seed), _x(b, D, seed=seed + 100)


def _made(since: int) -> list[str]:
    return sorted(s.what for r in tc.reports()[since:] for s in r.swaps if s.made)


def _compiled_close(qmodel, mode: str, *args) -> list[str]:
    """qmodel compiled (check=True) within tolerance of its eager self; the rewrites made."""
    since = len(tc.reports())
    with torch.no_grad():
        want = qmodel(*args)
        got = tilestack.optimize(qmodel, check=True, inner="aot_eager")(*args)
    torch.testing.assert_close(got.float(), want.float(), rtol=COMPILED_TOL[mode], atol=COMPILED_TOL[mode])
    return _made(since)


# ---- DiT -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_dit_block_quantized(mode):
    """Every Linear quantized, the modulation's too (2-D conditioning rows, fp8-act calibrated on them); against
    float64 within the bound and not equal to it; compiled, the attention and norms swapped and the up projection's
    tanh GELU in the quantized GEMM's epilogue (fp8-act: in the fp8 chain to the down projection)."""
    model = seeded(DiTBlock)
    qmodel = _quantized(model, mode, [_dit_args(seed=s) for s in (20, 21)])
    for name in ("qkv", "proj", "fc1", "fc2", "adaLN_modulation.1"):
        assert type(qmodel.get_submodule(name)) is QuantLinear, name
    args = _dit_args()
    with torch.no_grad():
        got = qmodel(*args)
    assert 1e-6 < _relative(got, _f64(model, *args)) < BOUNDS[mode]
    made = _compiled_close(qmodel, mode, *args)
    assert {"scaled_dot_product_attention -> tilestack::attention_fwd", "layer_norm -> tilestack::layer_norm_fwd",
            "add + layer_norm -> tilestack::add_layer_norm_fwd"} <= set(made), made
    assert "quant_linear + bias + gelu_tanh -> tilestack::quant_linear_epilogue" in made, made


# ---- a CNN -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_conv_bn_classifier_quantized(mode):
    """The two Linears quantized, both Conv2d left in float (their weights the float model's) and named in the one
    warning, silenced by naming them in ``skip``; the class probabilities within the bound of float64's, the top class
    the same for every image; compiled (channels-last input too), the hidden Linear's ReLU in the quantized GEMM's
    epilogue and the softmax swapped."""
    model = seeded(ConvBNClassifier)
    calibration = [_x(6, 3, 9, 9, seed=s) for s in (20, 21)] if mode == "fp8-act" else None
    with pytest.warns(UserWarning, match=CONVS):
        qmodel = tilestack.quantize(copy.deepcopy(model), mode, calibration=calibration)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tilestack.quantize(copy.deepcopy(model), mode, calibration=calibration, skip=("features.0", "features.3"))
    assert type(qmodel.fc) is QuantLinear and type(qmodel.head) is QuantLinear
    assert type(qmodel.features[0]) is nn.Conv2d and torch.equal(qmodel.features[0].weight, model.features[0].weight)
    x = _x(5, 3, 9, 9, seed=3)
    with torch.no_grad():
        got = qmodel(x)
    want = _f64(model, x)
    assert got.shape == (5, CLASSES)
    assert 0 < _relative(got, want) < BOUNDS[mode]
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    for layout in (torch.contiguous_format, torch.channels_last):
        torch._dynamo.reset()
        made = _compiled_close(qmodel, mode, x.to(memory_format=layout))
        assert "quant_linear + bias + relu -> tilestack::quant_linear_epilogue" in made, made
        assert "softmax(dim=-1) -> tilestack::softmax" in made, made


# ---- bias-free GQA block, bf16 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_bias_free_gqa_block_quantized_in_bf16(mode):
    """The bias-free Linears quantized (fp8-act's bias correction gives each a bias, int8 / fp8 none), the model then
    cast to bf16 (the 8-bit weights and f32 scales kept); against float64 within the bound plus bf16's rounding;
    compiled in bf16, the gate's SiLU in its GEMM's epilogue."""
    model = seeded(ScaledResidualGQABlock)
    qmodel = _quantized(model, mode, [_x(2, 7, D, seed=s) for s in (20, 21)])
    for name in ("q", "kv", "o", "gate", "up", "down"):
        layer = qmodel.get_submodule(name)
        assert type(layer) is QuantLinear and (layer.bias is None) == (mode != "fp8-act"), name
    qmodel = qmodel.to(BF16)
    assert qmodel.q.scale.dtype == F32 and qmodel.q.qweight.dtype in (torch.int8, torch.float8_e4m3fn)
    x = _x(2, 7, D)
    with torch.no_grad():
        got = qmodel(x.to(BF16))
    assert got.dtype == BF16
    assert _relative(got, _f64(model, x)) < BOUNDS[mode] + 2e-2
    made = _compiled_close(qmodel, mode, x.to(BF16))
    gate = "quant_linear + bias + silu" if mode == "fp8-act" else "quant_linear + silu"
    assert f"{gate} -> tilestack::quant_linear_epilogue" in made, made


# ---- one input feature -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_time_embedding_of_one_input_feature(mode):
    """``Linear(1, 16)`` of timesteps in [0, 1000), SiLU, ``Linear(16, 16)``: both quantized; the first layer's output
    as computed by hand in float64 (one weight per output channel, each its own scale); the model against float64
    within the bound; compiled, the SiLU in the first GEMM's epilogue."""
    model = seeded(TimeEmbedding)
    torch.manual_seed(7)
    t = torch.rand(6, 1) * 1000
    qmodel = _quantized(model, mode, [torch.rand(8, 1) * 1000 for _ in range(2)])
    assert type(qmodel.inp) is QuantLinear and qmodel.inp.in_features == 1 and qmodel.out.out_features == TIME_DIM
    with torch.no_grad():
        torch.testing.assert_close(qmodel.inp(t).double(), _layer_reference(qmodel.inp, t), rtol=1e-5, atol=1e-3)
        got = qmodel(t)
    assert 1e-7 < _relative(got, _f64(model, t)) < BOUNDS[mode]
    made = _compiled_close(qmodel, mode, t)
    assert "quant_linear + bias + silu -> tilestack::quant_linear_epilogue" in made, made


# ---- pruned output channels ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_pruned_output_channels_give_their_bias(mode):
    """A Linear whose output channels 0, 3 and 5 were pruned to zero weights: their codes are 0 and their outputs the
    bias exactly (fp8-act's correction adds (W - Wq) E[x] = 0 there), the other channels within the bound of
    float64's; no NaN from a zero scale."""
    linear = seeded(nn.Linear, D, 8)
    pruned = [0, 3, 5]
    with torch.no_grad():
        linear.weight[pruned] = 0.0
    q = _quantized(linear, mode, [_x(4, D, seed=s) for s in (20, 21)])
    assert type(q) is QuantLinear
    assert not q.qweight[pruned].float().any() and bool(torch.isfinite(q.scale).all())
    x = _x(3, 5, D, seed=4) * 0.5
    with torch.no_grad():
        got = q(x)
    assert not got.isnan().any()
    torch.testing.assert_close(got[..., pruned], linear.bias[pruned].detach().expand(3, 5, 3), rtol=0, atol=0)
    assert _relative(got, linear.double()(x.double()).detach()) < BOUNDS[mode]


# ---- layers left in float --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lazy", [False, True], ids=["initialized", "lazy"])
def test_layers_quantize_cannot_take_are_named_with_their_reason(lazy):
    """The plain Linear quantized; the LoRA layer (a subclass of nn.Linear with its own forward: was named with
    nn.MultiheadAttention's reason, "its owner may read by weight"), the nn.Bilinear and an nn.LazyLinear never run left
    in float, each named once with why; ``skip`` of all three silences the warning. The quantized model, LoRA term and
    all, within int8's bound of float64 (its LazyLinear initialized first, so that both copies share its weights)."""
    model = seeded(MixedLayers, lazy=lazy)
    with pytest.warns(UserWarning) as record:
        qmodel = tilestack.quantize(copy.deepcopy(model), "int8")
    (message,) = [str(w.message) for w in record if "left in float" in str(w.message)]
    assert "lora (LoRALinear: a subclass of nn.Linear with a forward of its own" in message, message
    assert "owner may read" not in message.split("lora (")[1].split("), ")[0], message
    assert "bilinear (Bilinear)" in message, message
    assert ("lazy (LazyLinear: not initialized" in message) == lazy, message
    assert type(qmodel.fc) is QuantLinear and type(qmodel.lora) is type(model.lora)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tilestack.quantize(copy.deepcopy(model), "int8", skip=("lora", "bilinear", "lazy") if lazy else (
            "lora", "bilinear"))
    if lazy:
        return
    x = _x(3, D, seed=5)
    with torch.no_grad():
        got = qmodel(x)
    assert 1e-7 < _relative(got, _f64(model, x)) < BOUNDS["int8"]


def test_multihead_attention_out_proj_keeps_its_reason():
    """nn.MultiheadAttention's out_proj (a subclass of nn.Linear without a forward of its own) keeps the owner's
    reason."""
    model = nn.Sequential(nn.MultiheadAttention(D, 4, batch_first=True), nn.Linear(D, D))
    with pytest.warns(UserWarning, match=r"0\.out_proj \(NonDynamicallyQuantizableLinear: a subclass of nn\.Linear, "
                                         r"which its owner may read by weight"):
        tilestack.quantize(model, "int8")


@pytest.mark.parametrize("bad", ["float64", "nan"])
def test_bare_linear_that_cannot_be_quantized_names_the_model(bad):
    """A bare ``nn.Linear`` model whose weight is float64 or holds a NaN: refused as the call and its argument, as a
    model's layer is ("quantize: layer 'fc' cannot be quantized"); it said only "quantize_weight: w ...". The layer
    is left as it was."""
    linear = seeded(nn.Linear, 4, 3)
    if bad == "float64":
        linear = linear.double()
    else:
        with torch.no_grad():
            linear.weight[1, 2] = float("nan")
    fragment = "float64; expected one of float32" if bad == "float64" else "holds NaN or infinite values"
    with pytest.raises(LaunchError, match=rf"quantize: model \(an nn.Linear itself\) cannot be quantized: "
                                         rf"quantize_weight: w .*{fragment}"):
        tilestack.quantize(linear, "int8")
    assert type(linear) is nn.Linear
