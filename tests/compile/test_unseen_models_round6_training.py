"""The tilestack torch.compile backend on unseen models, round 6 (unseen_blocks_round6.py): training and shapes. A
causal LM with a tied head whose loss flattens (B, N, V) logits (``logits.view(-1, V)``: Hugging Face's form, which
was not fused and was reported as 'no tilestack kernel for it'), with ignore_index, label smoothing (left, the
argument named) and the logits returned too; a block with dropout and stochastic depth in train mode (every random
draw kept: the compiled model's outputs and gradients are eager's at the same seed, and the same with and without
the passes); a frozen teacher under torch.no_grad() inside a training forward; dynamic=True over varying batch and
sequence lengths; several outputs. Helpers and the reference-backend fixture from test_unseen_models_round1."""

from __future__ import annotations

import pytest
import torch
from test_unseen_models_round1 import _close, _consistent, _fresh, _run  # noqa: F401 - _fresh: autouse
from test_unseen_models_round2 import _declined, _one_graph
from unseen_blocks_round6 import (
    AlibiWindowAttention,
    DistilledStudent,
    DropoutBlock,
    IntermediatesBlock,
    TiedCausalLM,
    seeded,
)

import tilestack
import tilestack.compile as tc

BF16 = torch.bfloat16


def _ids(b: int = 2, n: int = 8, vocab: int = 48, ignore: int = -100):
    """ids (b, n) and labels with the first three of each row and the last sequence's last two set to ``ignore``."""
    torch.manual_seed(1)
    ids, labels = torch.randint(0, vocab, (b, n)), torch.randint(1, vocab, (b, n))
    labels[:, :3] = ignore
    labels[-1, -2:] = ignore
    return ids, labels


# ---- the causal LM's loss over flattened logits -----------------------------------------------------------------
@pytest.mark.parametrize("float_first", [False, True], ids=["view_then_float", "float_then_view"])
@pytest.mark.parametrize("ignore", [-100, 0], ids=["ignore_default", "ignore_pad_0"])
def test_tied_lm_loss_over_flattened_logits_is_fused(float_first, ignore):
    """F.cross_entropy(logits.view(-1, V).float(), labels.view(-1), ignore_index=...) of F.linear(h, wte.weight):
    the fused linear + cross-entropy (x flattened to rows by the op), the loss and every gradient eager's, the tied
    weight's two paths (embedding and head) summed; the three RMSNorm orderings and SDPA swapped too."""
    model = seeded(TiedCausalLM, train=True, float_first=float_first, ignore_index=ignore)
    ids, labels = _ids(ignore=ignore)
    _one_graph(model, ids, labels)
    got, swaps = _run(model, ids, labels, grad_of=list(model.parameters()))
    assert swaps.get("linear_cross_entropy") == 1 and swaps.get("norm") == 3 and swaps.get("sdpa") == 1, swaps
    # an independent reference: the mean over the kept labels of -log softmax in float64, from the model's logits
    with torch.no_grad():
        lp = torch.log_softmax(_logits(model, ids).double(), -1)                  # (B * N, V)
        keep = labels.view(-1) != ignore
        want = -lp[keep].gather(1, labels.view(-1)[keep, None]).mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def _logits(model, ids):
    """The model's logits, run eagerly (its loss path replaced by a capture of the flattened logits)."""
    seen = {}
    real = torch.nn.functional.cross_entropy

    def capture(flat, labels, **kwargs):
        seen["flat"] = flat
        return real(flat, labels, **kwargs)

    torch.nn.functional.cross_entropy = capture
    try:
        model(ids, torch.zeros_like(ids))
    finally:
        torch.nn.functional.cross_entropy = real
    return seen["flat"]


def test_tied_lm_loss_with_label_smoothing_is_left_with_the_argument_named():
    model = seeded(TiedCausalLM, train=True, ignore_index=0, label_smoothing=0.1)
    ids, labels = _ids(ignore=0)
    since = len(tc.reports())
    _, swaps = _run(model, ids, labels, grad_of=list(model.parameters()))
    assert "linear_cross_entropy" not in swaps and swaps.get("norm") == 3, swaps
    assert any("label_smoothing=0.1" in w and "smoothing or a reduction" in w
               for w in _declined("linear_cross_entropy", since))


def test_tied_lm_returning_its_logits_keeps_them():
    """(loss, logits) as Hugging Face returns them: the logits are read outside the loss, so the fused op (which
    never makes them) is not used; the reason is given (it was 'no tilestack kernel for it'), the logits eager's."""
    model = seeded(TiedCausalLM, train=True, return_logits=True)
    ids, labels = _ids()
    since = len(tc.reports())
    got, swaps = _run(model, ids, labels, grad_of=list(model.parameters()))
    assert got[1].shape == (2, 8, 48) and "linear_cross_entropy" not in swaps, swaps
    assert any("read by the loss alone" in w for w in _declined("linear_cross_entropy", since))


def test_tied_lm_in_bf16_through_the_flattened_logits():
    """bf16 parameters, the logits cast to f32 after the view: fused, the loss within bf16's tolerance."""
    model = seeded(TiedCausalLM, train=True, dtype=BF16)
    ids, labels = _ids()
    _, swaps = _run(model, ids, labels, dtype=BF16, grad_of=list(model.parameters()))
    assert swaps.get("linear_cross_entropy") == 1, swaps


# ---- train mode: dropout and stochastic depth ------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["explicit", "sdpa"])
def test_dropout_and_drop_path_in_train_mode_keep_every_random_draw(attn):
    """Dropout on the probabilities (or SDPA's dropout_p) is declined with the reason (the kernels fuse no
    dropout); the norms are swapped around the dropouts and the stochastic depth's bernoulli_. At one seed the
    compiled model's outputs and gradients are eager's (the same masks drawn in the same order), and equal to the
    compile without passes: no rewrite moved or dropped a draw."""
    model = seeded(DropoutBlock, attn=attn, train=True)
    torch.manual_seed(2)
    x = torch.randn(4, 10, 32, requires_grad=True)
    _one_graph(model, x)
    params = [x, *model.parameters()]
    torch.manual_seed(7)
    want = model(x)
    want_grads = torch.autograd.grad(want.sum(), params)
    since = len(tc.reports())
    outs = {}
    for passes in (None, ()):
        compiled = tilestack.optimize(model, check=True, inner="aot_eager", passes=passes)
        torch.manual_seed(7)
        got = compiled(x)
        outs[passes] = got
        _close(got, want, torch.float32, f"output, passes={passes}")
        for i, (g, w) in enumerate(zip(torch.autograd.grad(got.sum(), params), want_grads, strict=True)):
            _close(g, w, torch.float32, f"grad {i}, passes={passes}")
        torch._dynamo.reset()
    torch.testing.assert_close(outs[None], outs[()], rtol=1e-5, atol=1e-6)
    report = tc.reports()[since]
    _consistent(report)
    assert report.swapped.get("add_norm") == 1 and report.swapped.get("norm") == 1, str(report)
    assert any("dropout" in w for p, _, w in report.declined if p in ("sdpa", "explicit_attention")), str(report)
    torch.manual_seed(8)                               # the masks are drawn: another seed gives other outputs
    assert not torch.allclose(model(x), want)


def test_train_mode_under_no_grad_declines_the_dropout_not_the_gemm():
    """Monte Carlo dropout: train mode under torch.no_grad() in bf16. The probabilities' dropout keeps the
    attention out; the fc1 + GELU GEMM is fused (no dropout between them), the dropouts after the projections
    keep their residual adds out of the epilogues; eager's outputs at the same seed."""
    model = seeded(DropoutBlock, train=True, path=0.0, dtype=BF16)
    torch.manual_seed(2)
    x = torch.randn(4, 10, 32, dtype=BF16)
    since = len(tc.reports())
    with torch.no_grad():
        torch.manual_seed(7)
        want = model(x)
        torch.manual_seed(7)
        got = tilestack.optimize(model, check=True, inner="aot_eager")(x)
    _close(got, want, BF16, "output")
    report = tc.reports()[since]
    _consistent(report)
    whats = [s.what for s in report.swaps if s.pattern == "linear_epilogue"]
    assert whats == ["linear + bias + gelu_tanh -> tilestack::linear_epilogue"], str(report)
    assert "explicit_attention" not in report.swapped, str(report)


# ---- a frozen teacher under torch.no_grad() inside a training forward ----------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, BF16, torch.float16], ids=["f32", "bf16", "f16"])
def test_frozen_teacher_under_no_grad_in_a_training_forward(dtype):
    """The teacher's attention and norm are swapped inside the no_grad region of a training graph, and in 16 bits
    its GELU GEMM and residual GEMM too (nothing there needs a gradient); the student's RMSNorm swapped; the loss,
    both features and the student's gradients eager's; one graph."""
    model = seeded(DistilledStudent, train=True, dtype=dtype)
    torch.manual_seed(2)
    x = torch.randn(2, 10, 32, dtype=dtype)
    _one_graph(model, x)
    student = [p for p in model.parameters() if p.requires_grad]
    _, swaps = _run(model, x, dtype=torch.float32 if dtype == torch.float32 else BF16, grad_of=student)
    assert swaps.get("explicit_attention") == 1 and swaps.get("norm") == 2, swaps
    assert swaps.get("linear_epilogue", 0) == (0 if dtype == torch.float32 else 2), swaps


# ---- dynamic shapes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["f32", "bf16"])
def test_alibi_window_with_dynamic_batch_and_length(dtype):
    """dynamic=True over (batch, length) = (2, 10), (3, 7), (4, 12): the band and the ALiBi bias built from the
    symbolic length, one compiled graph for all, eager's outputs each time; the attention swapped, the RMSNorm's eps
    (a module attribute made a graph input) reported."""
    model = seeded(AlibiWindowAttention, dtype=dtype)
    since = len(tc.reports())
    compiled = tilestack.optimize(model, check=True, inner="aot_eager", dynamic=True)
    with torch.no_grad():
        for b, n in ((2, 10), (3, 7), (4, 12)):
            torch.manual_seed(b)
            x = torch.randn(b, n, 32, dtype=dtype)
            _close(compiled(x), model(x), dtype, f"batch {b}, length {n}")
    reports = tc.reports()[since:]
    assert len(reports) == 1, [str(r) for r in reports]
    _consistent(reports[0])
    assert reports[0].swapped.get("explicit_attention") == 1, str(reports[0])


def test_lm_training_with_a_dynamic_batch():
    """The tied LM's fused loss over symbolic rows (B * N): torch._dynamo.mark_dynamic on the batch, three batch
    sizes, the loss and the gradients eager's each time, one compiled graph."""
    compiled_model = seeded(TiedCausalLM, train=True)
    eager = seeded(TiedCausalLM, train=True)
    compiled = tilestack.optimize(compiled_model, check=True, inner="aot_eager")
    since = len(tc.reports())
    for b in (2, 3, 5):
        torch.manual_seed(b)
        ids, labels = torch.randint(0, 48, (b, 8)), torch.randint(0, 48, (b, 8))
        labels[:, :2] = -100
        torch._dynamo.mark_dynamic(ids, 0)
        torch._dynamo.mark_dynamic(labels, 0)
        got, want = compiled(ids, labels), eager(ids, labels)
        _close(got, want, torch.float32, f"loss, batch {b}")
        gg = torch.autograd.grad(got, list(compiled_model.parameters()))
        gw = torch.autograd.grad(want, list(eager.parameters()))
        for i, (g, w) in enumerate(zip(gg, gw, strict=True)):
            _close(g, w, torch.float32, f"grad {i}, batch {b}")
    reports = tc.reports()[since:]
    assert len(reports) == 1 and reports[0].swapped.get("linear_cross_entropy") == 1, [str(r) for r in reports]


# ---- several outputs in training --------------------------------------------------------------------------------
def test_intermediates_returned_in_training():
    """The dict of (out, residual h, the normalized rows) with gradients through all three: the fused add + norm's
    h and the RMSNorm's kept rows carry their gradients as eager's."""
    model = seeded(IntermediatesBlock, train=True)
    torch.manual_seed(2)
    x = torch.randn(2, 10, 32, requires_grad=True)
    got, swaps = _run(model, x, grad_of=[x, *model.parameters()])
    assert set(got) == {"out", "residual", "unit"}, got.keys()
    assert swaps.get("explicit_attention") == 1 and swaps.get("add_norm") == 1 and swaps.get("norm") == 1, swaps
