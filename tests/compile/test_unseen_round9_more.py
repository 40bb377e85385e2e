"""The tilestack torch.compile backend and ``tilestack.quantize`` on unseen models, round 9 (unseen_blocks_round9.py):
training, losses, dynamic shapes and quantization. Gradients of multi-query attention, keys wider than values, ALiBi,
a cached decoding step and learned temperatures through the compiled model against a float64 reference (as near as
eager's own); the loss head's three forms (``nll_loss(log_softmax)`` with ``ignore_index=0`` fused, label smoothing
and ``reduction="none"`` left naming the argument, a batch whose every label is ignored: NaN as eager); a tiny decoder
under ``dynamic=True`` at two odd lengths, trained, and a cached step over three past lengths; a conv + linear
classifier and a tiny ``nn.MultiheadAttention`` transformer quantized int8, fp8 and fp8-act (the accuracy cost
measured, bounded against float64; the layers left in float reported by name; the quantized model compiled: its
GEMM's epilogue fused, its lone quantized GEMM said to be tilestack's own). Helpers and the reference-backend fixture
from test_unseen_models_round1."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_unseen_models_round1 import _consistent, _fresh  # noqa: F401 - _fresh: autouse
from test_unseen_models_round2 import _declined
from unseen_blocks_round9 import (
    HD,
    BloomAlibiAttention,
    ConvNet,
    D,
    H,
    LearnedScaleAttention,
    LossHead,
    MHATransformer,
    MultiQueryAttention,
    PastKVAttention,
    TinyDecoder,
    WideKeyAttention,
    seeded,
)

import tilestack
import tilestack.compile as tc
from tilestack.quant import accuracy_cost

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _swaps(since: int) -> dict:
    total: dict = {}
    for r in tc.reports()[since:]:
        _consistent(r)
        for k, v in r.swapped.items():
            total[k] = total.get(k, 0) + v
    return total


def _f64_args(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else
            tuple(t.double() for t in a) if isinstance(a, tuple) else a for a in args]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _grads(model, *args):
    """(output, {name: grad}) of the compiled model (check=True, aot_eager), of eager, and of the model in float64,
    for one backward of the same random output gradient (seed 5)."""
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    results = []
    for m, fn, a in ((model, compiled, args), (eager, eager, args), (ref, ref, _f64_args(args))):
        out = _first(fn(*a))
        torch.manual_seed(5)
        dy = torch.randn(out.shape, dtype=F32).to(out.dtype)
        out.backward(dy)
        results.append((out.detach(), {n: p.grad.detach().double() for n, p in m.named_parameters()
                                       if p.grad is not None}))
    return results


def _as_near_as_eager(got, eager, ref, floor: float):
    """Each gradient within 1.5x eager's own error against float64, plus ``floor`` (the dtype's rounding)."""
    assert got.keys() == eager.keys() == ref.keys()
    for name in ref:
        err, own = float((got[name] - ref[name]).abs().max()), float((eager[name] - ref[name]).abs().max())
        assert err <= 1.5 * own + floor, (name, err, own)


# ---- training -------------------------------------------------------------------------------------------------------
def _wide(dtype):
    return seeded(WideKeyAttention, dtype=dtype, train=True), (torch.randn(1, 9, D, dtype=dtype),)


def _mqa(dtype):
    return seeded(MultiQueryAttention, "broadcast", dtype=dtype, train=True), (torch.randn(1, 9, D, dtype=dtype),)


def _alibi(dtype):
    mask = torch.tensor([[0, 0] + [1] * 7])
    return seeded(BloomAlibiAttention, dtype=dtype, train=True), (torch.randn(1, 9, 48, dtype=dtype), mask)


def _cached(dtype):
    cache = (torch.randn(1, H, 4, HD, dtype=dtype), torch.randn(1, H, 4, HD, dtype=dtype))
    return (seeded(PastKVAttention, dtype=dtype, train=True),
            (torch.randn(1, 5, D, dtype=dtype), torch.ones(1, 9, dtype=torch.long), cache))


BLOCKS = {"wide_keys": _wide, "mqa_broadcast": _mqa, "alibi": _alibi, "past_kv": _cached}


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("block", list(BLOCKS))
def test_attention_gradients_against_float64(block, dtype):
    """One attention swapped in the training graph; every parameter's gradient as near float64's as eager's (the
    one key/value head's gradient summed over the query heads, the 12-wide keys' and 8-wide values' apart, the ALiBi
    bias and the cached keys' mask applied in the backward too)."""
    torch.manual_seed(1)
    model, args = BLOCKS[block](dtype)
    since = len(tc.reports())
    (out, got), (want_out, eager), (_, ref) = _grads(model, *args)
    assert _swaps(since) == {"explicit_attention": 1}, _swaps(since)
    rtol, atol = (1e-4, 1e-5) if dtype == F32 else (5e-2, 5e-2)
    torch.testing.assert_close(out.float(), want_out.float(), rtol=rtol, atol=atol)
    _as_near_as_eager(got, eager, ref, 1e-6 if dtype == F32 else 2e-2)


@pytest.mark.parametrize("form", ["temperature", "per_head"])
def test_learned_scales_get_their_gradients(form):
    """The temperature (0-d) and the per-head logit scales: left to the inner compiler, so their gradients are made
    (nonzero) and float64's."""
    torch.manual_seed(1)
    model = seeded(LearnedScaleAttention, form, train=True)
    (_, got), (_, eager), (_, ref) = _grads(model, torch.randn(2, 9, D))
    name = "temperature" if form == "temperature" else "logit_scale"
    assert float(ref[name].abs().max()) > 1e-4
    torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6)
    _as_near_as_eager(got, eager, ref, 1e-6)


# ---- losses ---------------------------------------------------------------------------------------------------------
def _loss_inputs(form: str, seed: int = 1):
    torch.manual_seed(seed)
    x, labels = torch.randn(2, 9, D), torch.randint(1, LossHead.vocab, (2, 9))
    labels[0, :3] = 0 if form == "nll_ignore0" else -1 if form == "ce_smooth_ignore" else labels[0, :3]
    weights = torch.ones(2, 9)
    weights[1, 5:] = 0
    return x, labels, weights


@pytest.mark.parametrize("form", ["nll_ignore0", "ce_smooth_ignore", "per_token_masked"])
def test_loss_head_forms(form):
    """nll_loss(log_softmax) with ignore_index=0: the fused linear + cross-entropy with that index; label smoothing
    and reduction="none": left, the argument and its value named. Loss and gradients against float64; and the ignored
    positions are ignored (their inputs changed, the compiled loss stays; counted, it moves)."""
    model = seeded(LossHead, form, train=True)
    x, labels, weights = _loss_inputs(form)
    since = len(tc.reports())
    (loss, got), (want, eager), (ref_loss, ref) = _grads(model, x, labels, weights)
    swaps = _swaps(since)
    if form == "nll_ignore0":
        assert swaps == {"norm": 1, "linear_cross_entropy": 1}, swaps
    else:
        assert "linear_cross_entropy" not in swaps, swaps
        arg = "label_smoothing=0.1" if form == "ce_smooth_ignore" else "reduction='none'"
        assert any(arg in w for w in _declined("linear_cross_entropy", since)), _declined("linear_cross_entropy", since)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    _as_near_as_eager(got, eager, ref, 1e-6)
    if form != "per_token_masked":          # the ignored positions' inputs changed: the loss stays
        moved = x.clone()
        moved[0, :3] = 10 * torch.randn(3, D)
        with torch.no_grad():
            compiled = tilestack.optimize(copy.deepcopy(model), check=True, inner="aot_eager")
            torch.testing.assert_close(compiled(moved, labels, weights), compiled(x, labels, weights), rtol=1e-6,
                                       atol=1e-6)
            assert abs(float(model(moved, labels.masked_fill(labels <= 0, 1), weights)) - float(loss)) > 1e-3


def test_a_batch_whose_every_label_is_ignored():
    """Every label is the ignore_index (0): eager's mean over no token is NaN; the fused kernel's loss is NaN too (not
    0, which would train on nothing silently)."""
    model = seeded(LossHead, "nll_ignore0", train=True)
    x = torch.randn(2, 9, D)
    labels = torch.zeros(2, 9, dtype=torch.long)
    since = len(tc.reports())
    loss = tilestack.optimize(model, check=True, inner="aot_eager")(x, labels)
    assert _swaps(since).get("linear_cross_entropy") == 1
    assert torch.isnan(model(x, labels)) and torch.isnan(loss)


@pytest.mark.parametrize("bad", [24, -100, -5])
def test_a_label_out_of_range_is_refused_by_name(bad):
    """A label of V (24), the default ignore_index -100 where the loss ignores 0, or -5: eager raises ("Target 24 is
    out of bounds"); the fused loss raises too, naming the label, its index and the classes, not a silent gather."""
    model = seeded(LossHead, "nll_ignore0", train=True)
    x, labels, _ = _loss_inputs("nll_ignore0")
    labels[1, 4] = bad
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
        model(x, labels)
    with pytest.raises(Exception, match=rf"labels holds {bad} \(at index 13\); expected classes 0..V-1 = 0..23 or "
                                        "ignore_index=0"):
        tilestack.optimize(model, check=True, inner="aot_eager")(x, labels)


# ---- dynamic shapes -------------------------------------------------------------------------------------------------
def test_tiny_decoder_dynamic_over_odd_lengths_trained():
    """``dynamic=True``, batch 1, lengths 7 then 13: the second length compiles nothing new; the attention and the
    norms are swapped in the graph that runs; at each length the loss and every gradient are float64's (within eager's
    own error). The shifted logits (``logits[:, :-1]``) keep the loss out of the fused kernel, said."""
    model = seeded(TinyDecoder, train=True)
    ref = copy.deepcopy(model).double()
    compiled = tilestack.optimize(model, check=True, inner="aot_eager", dynamic=True)
    for i, n in enumerate((7, 13)):
        torch.manual_seed(n)
        ids = torch.randint(0, 30, (1, n))
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        since = len(tc.reports())
        loss = compiled(ids, ids)
        loss.backward()
        want = ref(ids, ids)
        want.backward()
        if i == 0:
            assert tc.last_report().swapped == {"explicit_attention": 1, "add_norm": 2, "norm": 1}, \
                str(tc.last_report())
            assert any("not F.linear(x, w) without a bias read by the loss alone" in w
                       for w in _declined("linear_cross_entropy", since))
        else:
            assert len(tc.reports()) == since, "the second length compiled again under dynamic=True"
        torch.testing.assert_close(loss.detach().double(), want.detach(), rtol=1e-5, atol=1e-6)
        for (name, p), r in zip(model.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad.double(), r.grad, rtol=1e-4, atol=1e-5, msg=f"{name} at {n}")


def test_cached_step_dynamic_over_past_lengths():
    """``dynamic=True``, one new token after 5, 8 and 11 cached ones (batch 1, the first token padding): the same
    graph serves 8 and 11; each step's output is float64's and the attention swapped."""
    model = seeded(PastKVAttention, "explicit")
    compiled = tilestack.optimize(model, check=True, inner="aot_eager", dynamic=True)
    counts = []
    for past in (5, 8, 11):
        torch.manual_seed(past)
        cache = (torch.randn(1, H, past, HD), torch.randn(1, H, past, HD))
        x, mask = torch.randn(1, 1, D), torch.ones(1, past + 1, dtype=torch.long)
        mask[0, 0] = 0
        since = len(tc.reports())
        with torch.no_grad():
            got = compiled(x, mask, cache)[0]
        counts.append(len(tc.reports()) - since)
        if counts[-1]:
            assert tc.last_report().swapped == {"explicit_attention": 1}, str(tc.last_report())
        ref = copy.deepcopy(model).double()
        with torch.no_grad():
            want = ref(x.double(), mask, tuple(t.double() for t in cache))[0]
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=f"past {past}")
    assert counts[1:] == [0, 0], counts


# ---- quantization ---------------------------------------------------------------------------------------------------
def _quant_batches(cls, seed: int = 3):
    torch.manual_seed(seed)
    if cls is ConvNet:
        return [torch.randn(4, 3, 8, 8) for _ in range(2)]
    return [torch.randint(0, 40, (2, 7)) for _ in range(2)]


def _quantized(model, mode, batches):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        q = tilestack.quantize(copy.deepcopy(model), mode, calibration=batches if mode == "fp8-act" else None)
    return q, [str(w.message) for w in seen if issubclass(w.category, UserWarning)]


LEFT_FLOAT = {ConvNet: ["conv1 (Conv2d)", "conv2 (Conv2d)"],
              MHATransformer: ["embed (Embedding)", "attn (MultiheadAttention)",
                               "attn.out_proj (NonDynamicallyQuantizableLinear"]}
BOUND = {"int8": 1e-2, "fp8": 5e-2, "fp8-act": 5e-2}     # measured at most 0.005, 0.036, 0.033


@pytest.mark.parametrize("mode", ["int8", "fp8", "fp8-act"])
@pytest.mark.parametrize("cls", [ConvNet, MHATransformer], ids=["convnet", "mha_transformer"])
def test_quantized_unseen_models(cls, mode):
    """The Linear layers quantized (fc1, fc2, and the transformer's head), the accuracy cost measured by
    accuracy_cost and bounded against the float model run in float64 (relative to its largest output), top-1 measured;
    the layers with weights left in float (convolutions, the embedding, the attention's projections) reported by name
    in one warning, not skipped without a word."""
    model = seeded(cls)
    batches = _quant_batches(cls)
    q, said = _quantized(model, mode, batches)
    made = sorted(n for n, m in q.named_modules() if type(m).__name__ == "QuantLinear")
    assert made == (["fc1", "fc2"] if cls is ConvNet else ["fc1", "fc2", "head"]), made
    cost = accuracy_cost(model, q, batches)
    # top-1 of an untrained net whose logits lie close: int8 keeps every row, fp8 at least half
    assert 0 < cost["max_rel_err"] < BOUND[mode] and cost["top1_agree"] >= (1.0 if mode == "int8" else 0.5), cost
    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for b in batches:
            want = ref(b.double() if b.is_floating_point() else b)
            assert 0 < float((q(b).double() - want).abs().max() / want.abs().max()) < BOUND[mode]
    report = [s for s in said if "left in float" in s]
    assert len(report) == 1, said
    for layer in LEFT_FLOAT[cls]:
        assert layer in report[0], (layer, report[0])
    assert "fc1" not in report[0] and "bn1" not in report[0], report[0]


def test_layers_named_in_skip_are_not_reported():
    """skip= names the convolutions: nothing is left in float that the caller did not name, no warning at all."""
    model = seeded(ConvNet)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tilestack.quantize(copy.deepcopy(model), "int8", skip=("conv1", "conv2"))
    assert [str(w.message) for w in seen] == []


@pytest.mark.parametrize("mode", ["int8", "fp8-act"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("cls", [ConvNet, MHATransformer], ids=["convnet", "mha_transformer"])
def test_quantized_unseen_models_compiled(cls, dtype, mode):
    """The quantized model compiled: fc1's quantized GEMM fuses its activation (relu / gelu); with fp8 activations
    fc1 also writes fc2's fp8 input (the fp8 chain, fc2 with it); the other quantized GEMMs stay as
    tilestack::quant_linear, said to be tilestack's quantized GEMM with nothing to fuse (it read "no tilestack kernel
    for it"); the convolutions and the attention module left with reasons; one graph; the outputs the quantized
    model's eager ones."""
    model = seeded(cls, dtype=dtype)
    batches = [b.to(dtype) if b.is_floating_point() else b for b in _quant_batches(cls)]
    q, _ = _quantized(model, mode, batches)
    since = len(tc.reports())
    with torch.no_grad():
        got, want = tilestack.optimize(q, check=True, inner="aot_eager")(batches[0]), q(batches[0])
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    act = "relu" if cls is ConvNet else "gelu"
    report = tc.last_report()
    assert [s.what for s in report.swaps if s.pattern == "linear_epilogue"] == \
        [f"quant_linear + bias + {act} -> tilestack::quant_linear_epilogue"]
    assert report.swapped.get("fp8_chain", 0) == (mode == "fp8-act"), str(report)
    why = report.left_why
    if cls is ConvNet and mode == "fp8-act":      # fc2 is the chain's: no quantized GEMM left alone
        assert "quant_linear.default" not in why, why
    else:
        assert "no tilestack kernel" not in why["quant_linear.default"], why
        assert "quantized GEMM" in why["quant_linear.default"], why
    left = "conv2d" if cls is ConvNet else "multi_head_attention_forward"
    assert why[left] and report.left[left] == (2 if cls is ConvNet else 1), str(report)
    assert len(tc.reports()) == since + 1


class _PositionalMLP(torch.nn.Module):
    """A learned position table (1, 7, D) of the model's own, one Linear: the table is reported by its name."""

    def __init__(self):
        super().__init__()
        self.pos_embed = torch.nn.Parameter(torch.randn(1, 7, D))
        self.fc = torch.nn.Linear(D, D)

    def forward(self, x):
        return self.fc(x + self.pos_embed)


@pytest.mark.parametrize("case", ["conv_alone", "own_parameter", "lazy"])
def test_what_is_left_in_float_is_named(case):
    """A bare Conv2d (no Linear at all: nothing quantized) is reported as the model; a model's own 2-D parameter by
    its name; the Linear beside it quantized and not reported. A LazyLinear not yet run (its parameters have no
    shape: asking for their dims raised ValueError inside quantize) is reported as not initialized."""
    nn = torch.nn
    model = {"conv_alone": lambda: nn.Conv2d(3, 4, 3), "own_parameter": _PositionalMLP,
             "lazy": lambda: nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 4))}[case]()
    with pytest.warns(UserWarning, match="left in float") as seen:
        q = tilestack.quantize(model, "int8")
    text = " ".join(str(w.message) for w in seen)
    if case == "conv_alone":
        assert q is model and "the model (Conv2d)" in text, text
    elif case == "lazy":
        assert type(q[2]).__name__ == "QuantLinear" and "0 (LazyLinear: not initialized" in text, text
    else:
        assert type(q.fc).__name__ == "QuantLinear" and "the model (_PositionalMLP: pos_embed)" in text, text
        assert "fc" not in text.replace("left in float", ""), text


def test_quantized_convnet_dynamic_over_batches():
    """The int8 conv net under ``dynamic=True`` at batches 3, 5, 7: every output the quantized model's eager one. The
    graph with a symbolic batch fuses fc1's relu: QuantLinear views its rows back to the input's leading dims, symbolic
    there, and the fused op takes the input itself and makes the rows and that view from its sizes when it runs
    (round 14; until then the relu was declined, "a view with symbolic sizes"); that graph serves 7 too."""
    q, _ = _quantized(seeded(ConvNet), "int8", None)
    compiled = tilestack.optimize(q, check=True, inner="aot_eager", dynamic=True)
    counts = []
    for b in (3, 5, 7):
        torch.manual_seed(b)
        x = torch.randn(b, 3, 8, 8)
        since = len(tc.reports())
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), q(x), rtol=1e-5, atol=1e-6, msg=f"batch {b}")
        counts.append(len(tc.reports()) - since)
        if b == 5:
            assert tc.last_report().swapped == {"linear_epilogue": 1}, str(tc.last_report())
            assert [s.what for s in tc.last_report().swaps] == [
                "quant_linear + bias + relu -> tilestack::quant_linear_epilogue"], str(tc.last_report())
    assert counts[2] == 0, counts
