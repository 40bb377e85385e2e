"""``tilestack.quantize`` on unseen models, round 15 (unseen_blocks_round15.py): two Linear modules sharing one weight
Parameter (tied), Linears whose in_features are no multiple of 16 (19 and 45, bare and in a model), a Conv1d front end
(left in float and named), each in int8, fp8 and fp8-act against the float model in float64 within the documented
bounds (docs/inference.md: 2 %, 8 %, 15 % of the largest output) and each layer against a hand computation, compiled
(check=True) within tolerance of its eager self; the state dict through ``torch.save`` into a freshly quantized model;
unknown modes and calibration batches of the wrong shape refused by name.

What this round found and fixed (``QuantLinear`` and ``calibrate``, src/tilestack/quant/linear.py):
- fp8-act gives a bias-free Linear a bias (the bias correction) only where a calibration batch reached it. A saved
  state from a model whose layer calibration reached, loaded into a fresh model whose calibration did not (or back),
  failed with torch's "Unexpected key(s) in state_dict: 'b.bias'" ("Missing key(s)" the other way); with
  ``strict=False`` the saved correction was dropped, or the fresh layer's own kept against the loaded weights, without
  a word. The bias now follows the state as ``x_scale`` does (``QuantLinear._load_from_state_dict``).
- A calibration batch of the wrong width failed on calibration's own statistics, not in the model: batch 1 of width 3
  after one of width 19 said "The size of tensor a (19) must match the size of tensor b (3)", a 0-d batch "IndexError:
  tuple index out of range". Calibration now checks each layer's input against its in_features first and names the
  layer, what it got and what it expects.
Helpers and the reference-backend fixture: test_unseen_models_round1, test_unseen_round9,
test_unseen_models_round12_quant, test_unseen_models_round13_quant."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from test_unseen_models_round1 import _fresh  # noqa: F401 - _fresh: autouse
from test_unseen_models_round12_quant import _layer_reference
from test_unseen_models_round13_quant import BOUNDS, MODES, _quantized, _relative
from test_unseen_round9 import _f64
from torch import nn
from unseen_blocks_round15 import ODD_HIDDEN, ODD_IN, ODD_OUT, ConvFrontEnd, TiedOddMLP, seeded

import tilestack
import tilestack.compile as tc
from tilestack.errors import LaunchError
from tilestack.quant import QuantLinear

F32, BF16 = torch.float32, torch.bfloat16
TIED_LAYERS = ["inp", "mid", "tied", "head"]
COMPILED_TOL = {"int8": 2e-2, "fp8": 2e-2, "fp8-act": 3e-2}     # the compiled model against its eager self


def _x(*shape, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(*shape)


def _calibration(*shape):
    return [_x(*shape, seed=s) for s in (20, 21)]


def _saved(model) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    return buf


# ---- tied Linears of odd sizes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_tied_linears_quantized(mode):
    """Every Linear quantized (19 -> 45 -> 45 -> 7); the two modules sharing one weight each hold its codes (the same
    qweight and scales), ``mid`` called once, ``tied`` once; each layer's output as computed by hand; the model against
    float64 within the bound and not equal to it; compiled (check=True) within tolerance of its eager self, the GELU
    and the SiLU + residual in the quantized GEMMs' epilogues."""
    model = seeded(TiedOddMLP)
    assert model.mid.weight is model.tied.weight
    qmodel = _quantized(model, mode, _calibration(4, 5, ODD_IN))
    for name in TIED_LAYERS:
        layer = qmodel.get_submodule(name)
        assert type(layer) is QuantLinear and layer.mode == mode, name
    torch.testing.assert_close(qmodel.mid.qweight.float(), qmodel.tied.qweight.float(), rtol=0, atol=0)
    torch.testing.assert_close(qmodel.mid.scale, qmodel.tied.scale, rtol=0, atol=0)
    assert (qmodel.tied.bias is None) == (mode != "fp8-act")      # fp8-act's bias correction gives it one
    x = _x(3, 5, ODD_IN)
    with torch.no_grad():
        h = torch.randn(3, 5, ODD_HIDDEN)
        for name in ("mid", "tied"):
            layer = qmodel.get_submodule(name)
            torch.testing.assert_close(layer(h).double(), _layer_reference(layer, h), rtol=1e-5, atol=1e-5)
        got = qmodel(x)
    assert got.shape == (3, 5, ODD_OUT)
    assert 1e-6 < _relative(got, _f64(model, x)) < BOUNDS[mode]
    since = len(tc.reports())
    with torch.no_grad():
        compiled = tilestack.optimize(qmodel, check=True, inner="aot_eager")(x)
    torch.testing.assert_close(compiled, got, rtol=COMPILED_TOL[mode], atol=COMPILED_TOL[mode])
    whats = sorted(s.what for r in tc.reports()[since:] for s in r.swaps if s.made)
    assert "quant_linear + bias + gelu_tanh -> tilestack::quant_linear_epilogue" in whats, whats
    assert "quant_linear + bias + silu + residual add -> tilestack::quant_linear_epilogue" in whats, whats


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [19, 45])
def test_bare_linear_of_odd_in_features(mode, k):
    """A bare ``nn.Linear(k, 7)`` with k no multiple of 16 or 32: quantize returns its QuantLinear; a 3-D input as
    computed by hand in float64, the float layer within the bound; compiled the same."""
    linear = seeded(nn.Linear, k, ODD_OUT)
    q = _quantized(linear, mode, _calibration(6, k))
    assert type(q) is QuantLinear and q.in_features == k
    x = _x(2, 3, k, seed=4) * 0.5               # within the calibrated range (fp8-act clamps beyond it)
    with torch.no_grad():
        got = q(x)
        torch.testing.assert_close(got.double(), _layer_reference(q, x), rtol=1e-5, atol=1e-5)
        assert _relative(got, linear.double()(x.double())) < BOUNDS[mode]
        torch.testing.assert_close(tilestack.optimize(q, inner="aot_eager")(x), got, rtol=1e-5, atol=1e-5)


# ---- a Conv1d left in float ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_conv1d_left_in_float_and_named(mode):
    """The Conv1d stays float (its weight the float model's), named once in the warning (silenced by ``skip=``); both
    Linears quantized; the model within the bound of float64; compiled, the conv left as a convolution (the report said
    "no tilestack kernel for it", with no word of where it goes: ``patterns.LEFT_REASONS``)."""
    model = seeded(ConvFrontEnd)
    cal = _calibration(3, 5, 11) if mode == "fp8-act" else None
    with pytest.warns(UserWarning, match=r"left in float .*: conv \(Conv1d\)"):
        qmodel = tilestack.quantize(copy.deepcopy(model), mode, calibration=cal)
    assert type(qmodel.conv) is nn.Conv1d and torch.equal(qmodel.conv.weight, model.conv.weight)
    assert type(qmodel.fc1) is QuantLinear and type(qmodel.fc2) is QuantLinear
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tilestack.quantize(copy.deepcopy(model), mode, calibration=cal, skip=("conv",))
    x = _x(2, 5, 11, seed=3)
    with torch.no_grad():
        got = qmodel(x)
        assert 1e-6 < _relative(got, _f64(model, x)) < BOUNDS[mode]
        compiled = tilestack.optimize(qmodel, check=True, inner="aot_eager")(x)
    torch.testing.assert_close(compiled, got, rtol=COMPILED_TOL[mode], atol=COMPILED_TOL[mode])
    assert tc.last_report().left_why["conv1d"].startswith("a convolution: tilestack has no convolution kernel")


# ---- save / load -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_state_dict_into_a_freshly_quantized_model(mode):
    """The quantized state through ``torch.save`` / ``torch.load(weights_only=True)`` into a model quantized from other
    weights (and, fp8-act, calibrated on other data): every key matched, the outputs the saved model's exactly, and
    compiled the same."""
    qmodel = _quantized(seeded(TiedOddMLP), mode, _calibration(4, ODD_IN))
    torch.manual_seed(9)
    fresh = _quantized(TiedOddMLP(), mode, [_x(2, ODD_IN, seed=9) * 4])
    x = _x(3, ODD_IN, seed=2)
    with torch.no_grad():
        assert not torch.equal(fresh(x), qmodel(x))
        result = fresh.load_state_dict(torch.load(_saved(qmodel), weights_only=True))
        assert not result.missing_keys and not result.unexpected_keys
        torch.testing.assert_close(fresh(x), qmodel(x), rtol=0, atol=0)
        torch.testing.assert_close(tilestack.optimize(fresh, inner="aot_eager")(x), qmodel(x),
                                   rtol=COMPILED_TOL[mode], atol=COMPILED_TOL[mode])


class Branch(nn.Module):
    """Two bias-free Linears, one chosen per call: a calibration that never takes ``b`` leaves it without fp8-act's
    bias correction (no bias at all)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(ODD_IN, ODD_HIDDEN, bias=False)
        self.b = nn.Linear(ODD_IN, ODD_HIDDEN, bias=False)

    def forward(self, x, use_b: bool = False):
        return self.b(x) if use_b else self.a(x)


def _branch(reach_b: bool, seed: int):
    batches = [(_x(4, ODD_IN, seed=seed), False)] + ([(_x(4, ODD_IN, seed=seed + 1), True)] if reach_b else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")              # (the unreached layer's warning: test_unseen_models_round12_quant)
        return tilestack.quantize(seeded(Branch), "fp8-act", calibration=batches)


@pytest.mark.parametrize("saved_reached,strict", [(True, True), (False, True), (True, False), (False, False)],
                         ids=["bias-into-none", "none-into-bias", "bias-into-none-lax", "none-into-bias-lax"])
def test_fp8_act_state_dict_carries_the_bias_correction(saved_reached, strict):
    """fp8-act's bias on a bias-free Linear is calibration's: the saved state's (or its absence) loaded into a model
    calibrated otherwise; every key matched and both branches give the saved model's outputs. (Was "Unexpected
    key(s) in state_dict: 'b.bias'" / "Missing key(s)"; with strict=False the saved correction dropped or the fresh
    one kept.)"""
    saved = _branch(saved_reached, seed=30)
    fresh = _branch(not saved_reached, seed=40)
    assert (saved.b.bias is None) != saved_reached and (fresh.b.bias is None) == saved_reached
    result = fresh.load_state_dict(torch.load(_saved(saved), weights_only=True), strict=strict)
    assert not result.missing_keys and not result.unexpected_keys
    assert (fresh.b.bias is None) != saved_reached
    x = _x(3, ODD_IN, seed=5)
    with torch.no_grad():
        for use_b in (False, True):
            torch.testing.assert_close(fresh(x, use_b), saved(x, use_b), rtol=0, atol=0)


# ---- bad arguments ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["int4", "fp16", "FP8", "fp8_act", ""])
def test_unknown_mode_refused(mode):
    model = seeded(TiedOddMLP)
    with pytest.raises(LaunchError, match=f"quantize: mode={mode!r}; expected one of"):
        tilestack.quantize(model, mode)
    assert type(model.inp) is nn.Linear


@pytest.mark.parametrize("batches,fragment", [
    ([_x(2, ODD_IN), _x(2, 3)], r"calibration batch 1 \(\(2, 3\)\) failed in model\(batch\): LaunchError: layer 'inp' "
                                r"got an input \(2, 3\); expected \(\.\.\., in_features=19\)"),
    ([_x(2, ODD_IN + 1)], r"calibration batch 0 \(\(2, 20\)\) .*layer 'inp' got an input \(2, 20\); expected "
                          r"\(\.\.\., in_features=19\)"),
    ([torch.tensor(1.0)], r"calibration batch 0 \(\(\)\) .*layer 'inp' got an input \(\); expected"),
], ids=["second-batch-narrower", "wider", "0-d"])
def test_calibration_batch_of_the_wrong_shape(batches, fragment):
    """A calibration batch whose width does not fit the model: refused naming the batch, the layer it reached, what
    that got and its in_features (the second batch was "The size of tensor a (19) must match the size of tensor b (3)",
    a 0-d one "tuple index out of range": calibration's own statistics failed, said as the model's error). The model
    stays float."""
    model = seeded(TiedOddMLP)
    with pytest.raises(LaunchError, match=fragment):
        tilestack.quantize(model, "fp8-act", calibration=batches)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in TIED_LAYERS)
