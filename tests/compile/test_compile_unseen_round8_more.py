"""The tilestack torch.compile backend on unseen models, round 8 (unseen_blocks_round8.py): training, shapes, graph
breaks and modes. A small causal LM trained for three SGD steps through the compiled model (the losses and parameters
eager's), its gradients in f32, bf16 and f16 against a float64 reference (as near as eager's own); a 16-bit loss left
with its reason and the ``logits.float()`` form fused; ``torch.inference_mode()``; ``dynamic=True``, ``mark_dynamic``
and automatic dynamic over sequence lengths and batch sizes (the relative bias's buckets and the sliding window built
at each length); graph breaks (``print``, ``.item()`` of a learned scale that then changes, a break between the scores
and their softmax); module attributes changed after the compile (the window, the GQA scale). Helpers and the
reference-backend fixture from test_unseen_models_round1."""

from __future__ import annotations

import copy

import pytest
import torch
from test_unseen_models_round1 import _consistent, _fresh  # noqa: F401 - _fresh: autouse
from test_unseen_models_round2 import _declined
from unseen_blocks_round8 import BreakingBlock, D, GQAttention, SlidingWindowAttention, T5Block, TinyLM, seeded

import tilestack
import tilestack.compile as tc

BF16, F16 = torch.bfloat16, torch.float16
FORMS = pytest.mark.parametrize("form", ["explicit", "sdpa"])


def _swaps(since: int) -> dict:
    total: dict = {}
    for r in tc.reports()[since:]:
        _consistent(r)
        for k, v in r.swapped.items():
            total[k] = total.get(k, 0) + v
    return total


def _batch(b: int = 2, n: int = 10, vocab: int = 40, seed: int = 1):
    torch.manual_seed(seed)
    ids, labels = torch.randint(0, vocab, (b, n)), torch.randint(0, vocab, (b, n))
    labels[0, :2] = -100                                          # ignored positions (a prompt)
    return ids, labels


def _attention(form: str) -> str:
    return "sdpa" if form == "sdpa" else "explicit_attention"


# ---- training -------------------------------------------------------------------------------------------------------
def _sgd_steps(model, ids, labels, steps: int, compiled: bool):
    """``steps`` SGD steps (momentum 0.9) on the model's own loss; returns the losses."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    fn = tilestack.optimize(model, check=True, inner="aot_eager") if compiled else model
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = fn(ids, labels)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@FORMS
def test_three_sgd_steps_through_the_compiled_model(form):
    """The LM's loss in its forward (``F.cross_entropy(logits.view(-1, V), labels.view(-1))``, two labels ignored):
    one training graph with the attention, both norms (the residual adds fused), the final norm and the fused
    linear + cross-entropy swapped; three SGD steps give eager's losses and parameters (the loss falls: it trained),
    and the parameters moved (the optimizer saw the compiled gradients)."""
    ids, labels = _batch()
    compiled, eager = seeded(TinyLM, form, train=True), seeded(TinyLM, form, train=True)
    start = copy.deepcopy(compiled.state_dict())
    since = len(tc.reports())
    got = _sgd_steps(compiled, ids, labels, 3, compiled=True)
    assert len(tc.reports()) == since + 1, "the steps after the first compiled again"
    assert _swaps(since) == {_attention(form): 1, "add_norm": 2, "norm": 1, "linear_cross_entropy": 1}
    want = _sgd_steps(eager, ids, labels, 3, compiled=False)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert got[2] < got[0] - 1.0, got
    for name, p in compiled.named_parameters():
        torch.testing.assert_close(p, dict(eager.named_parameters())[name], rtol=1e-4, atol=1e-5, msg=name)
        assert not torch.equal(p, start[name]), f"{name} did not move"


def _grads(model, ids, labels, compiled: bool):
    fn = tilestack.optimize(model, check=True, inner="aot_eager") if compiled else model
    loss = fn(ids, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _rel(got: dict, want: dict) -> float:
    return max(float((got[n].double() - want[n]).norm() / want[n].norm()) for n in want)


@FORMS
@pytest.mark.parametrize("dtype", [torch.float32, BF16, F16], ids=["f32", "bf16", "f16"])
def test_gradients_against_float64(form, dtype):
    """Every parameter's gradient from the compiled model in ``dtype`` against the same model in float64: as near
    as eager's own in that dtype (at most 1.5 times its relative error, or 1e-5 in f32); the loss likewise."""
    ids, labels = _batch()
    base = seeded(TinyLM, form, train=True)
    loss64, want = _grads(copy.deepcopy(base).double(), ids, labels, compiled=False)
    since = len(tc.reports())
    loss, got = _grads(copy.deepcopy(base).to(dtype), ids, labels, compiled=True)
    swaps = _swaps(since)
    assert swaps.get(_attention(form)) == 1 and swaps.get("add_norm") == 2 and swaps.get("norm") == 1, swaps
    eager_loss, eager = _grads(copy.deepcopy(base).to(dtype), ids, labels, compiled=False)
    bound = max(1.5 * _rel(eager, want), 1e-5)
    assert _rel(got, want) <= bound, (_rel(got, want), _rel(eager, want))
    assert abs(float(loss) - float(loss64)) <= max(1.5 * abs(float(eager_loss) - float(loss64)), 1e-5)


def test_a_16_bit_loss_is_left_with_its_reason():
    """A bf16 model's ``F.cross_entropy(logits.view(-1, V), labels)`` is a bf16 loss: the fused kernel gives an f32
    one, so the pass leaves it. It was skipped without a word and the report said "cross_entropy: no tilestack kernel
    for it"; now it is declined naming the loss's dtype and the form that is fused."""
    model = seeded(TinyLM, dtype=BF16, train=True)
    since = len(tc.reports())
    _grads(model, *_batch(), compiled=True)
    assert "linear_cross_entropy" not in _swaps(since)
    (why,) = _declined("linear_cross_entropy", since)
    assert why.startswith("a loss in torch.bfloat16") and "logits.float()" in why, why
    assert tc.last_report().left_why["cross_entropy"] == why


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
def test_a_16_bit_model_with_float_logits_fuses_its_loss(dtype):
    """The same model taking the loss of ``logits.float()`` (Hugging Face's): the f32 loss of bf16 / f16 logits is the
    fused kernel's, swapped; the loss and the head's gradient near eager's (the kernel's logits are not rounded to 16
    bits, eager's are: within 16-bit rounding)."""
    base = seeded(TinyLM, float_logits=True, dtype=dtype, train=True)
    ids, labels = _batch()
    since = len(tc.reports())
    loss, got = _grads(copy.deepcopy(base), ids, labels, compiled=True)
    assert _swaps(since).get("linear_cross_entropy") == 1
    want_loss, want = _grads(copy.deepcopy(base), ids, labels, compiled=False)
    assert loss.dtype == want_loss.dtype == torch.float32
    torch.testing.assert_close(loss, want_loss, rtol=1e-2, atol=1e-2)
    assert _rel(got, {n: g.double() for n, g in want.items()}) < 5e-2


# ---- inference_mode -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["f32", "bf16"])
def test_t5_block_under_inference_mode(dtype):
    """Compiled and called under torch.inference_mode(): the swaps of no_grad (the GEMM epilogues in bf16 too), the
    outputs eager's, inference tensors out."""
    model = seeded(T5Block, dtype=dtype)
    torch.manual_seed(1)
    x = torch.randn(2, 10, D, dtype=dtype)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    since = len(tc.reports())
    with torch.inference_mode():
        want = model(x, mask)
        got = tilestack.optimize(model, check=True, inner="aot_eager")(x, mask)
    assert got.is_inference()
    swaps = _swaps(since)
    assert swaps.get("explicit_attention") == 1 and swaps.get("norm") == 2, swaps
    assert swaps.get("linear_epilogue") == (3 if dtype == BF16 else None), swaps
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


# ---- shapes ---------------------------------------------------------------------------------------------------------
def _t5_inputs(n: int):
    torch.manual_seed(n)
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, n - 3:] = 0
    return torch.randn(2, n, D), mask


@pytest.mark.parametrize("how", ["dynamic", "mark_dynamic", "automatic"])
def test_t5_over_sequence_lengths(how):
    """Lengths 10, 13, 7: the buckets, the position bias and the masks built at each length. ``dynamic=True`` and
    ``mark_dynamic`` compile one graph for all (Dynamo may restart the first, specializing the norms' eps: the last
    report is the graph that runs); automatic dynamic a second at the second length, then none. The attention is
    swapped in the graph that runs, and every length's outputs are eager's."""
    model = seeded(T5Block)
    compiled = tilestack.optimize(model, check=True, inner="aot_eager", dynamic=True if how == "dynamic" else None)
    counts = []
    for n in (10, 13, 7):
        x, mask = _t5_inputs(n)
        if how == "mark_dynamic":
            torch._dynamo.mark_dynamic(x, 1)
            torch._dynamo.mark_dynamic(mask, 1)
        since = len(tc.reports())
        with torch.no_grad():
            got, want = compiled(x, mask), model(x, mask)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"length {n}")
        counts.append(len(tc.reports()) - since)
        if counts[-1]:
            assert tc.last_report().swapped.get("explicit_attention") == 1, str(tc.last_report())
    assert counts[1:] == ([1, 0] if how == "automatic" else [0, 0]), counts


@FORMS
def test_lm_over_batch_sizes(form):
    """Batches of 2, 3 and 5 rows: automatic dynamic compiles a second graph at 3 (the batch symbolic), none at 5;
    each graph swaps the attention and the norms; every batch's logits are eager's."""
    model = seeded(TinyLM, form)
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    counts = []
    for b in (2, 3, 5):
        ids, _ = _batch(b=b, seed=b)
        since = len(tc.reports())
        with torch.no_grad():
            got, want = compiled(ids), model(ids)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"batch {b}")
        counts.append(len(tc.reports()) - since)
        if counts[-1]:
            assert _swaps(since) == {_attention(form): 1, "add_norm": 2, "norm": 1}, _swaps(since)
    assert counts == [1, 1, 0], counts


def test_sliding_window_over_lengths_dynamic():
    """``dynamic=True`` with the window of 3 built from ``arange(n)`` at lengths 10, 16, 6: one graph, each length's
    outputs eager's and apart from the plain causal model's (the window applied at every length)."""
    model = seeded(SlidingWindowAttention, "masked_fill")
    causal = copy.deepcopy(model)
    causal.window = 100
    compiled = tilestack.optimize(model, check=True, inner="aot_eager", dynamic=True)
    before = len(tc.reports())
    for n in (10, 16, 6):
        torch.manual_seed(n)
        x = torch.randn(2, n, D)
        with torch.no_grad():
            got, want, plain = compiled(x), model(x), causal(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"length {n}")
        assert float((got - plain).abs().max()) > 1e-2
    assert tc.reports()[before:][-1].swapped.get("explicit_attention") == 1
    assert len(tc.reports()) - before <= 2         # one graph (and the restart Dynamo may make of the first)


# ---- graph breaks ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["print", "item"])
def test_graph_breaks_before_the_attention(mode, capsys):
    """A print, or the scale read by ``.item()``: two graphs, the norm in the first, the attention in the second
    (after an .item() its scale is a number there, folded into the kernel's), the outputs eager's."""
    model = seeded(BreakingBlock, mode)
    explained = torch._dynamo.explain(model)(torch.randn(2, 10, D))
    assert explained.graph_count == 2 and explained.graph_break_count == 1
    torch._dynamo.reset()
    torch.manual_seed(1)
    x = torch.randn(2, 10, D)
    since = len(tc.reports())
    with torch.no_grad():
        got, want = tilestack.optimize(model, check=True, inner="aot_eager")(x), model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert [dict(r.swapped) for r in tc.reports()[since:]] == [{"norm": 1}, {"explicit_attention": 1}]
    assert all(_consistent(r) is None for r in tc.reports()[since:])
    if mode == "print":
        assert "block input (2, 10, 32)" in capsys.readouterr().out


def test_an_item_scale_that_changes_is_read_again():
    """The learned scale changed between calls (as an optimizer step would): each call's outputs are eager's at
    that scale, never the first call's scale folded into a kernel (the changed number is a graph input: the
    attention is then left, said so, or swapped with the new constant)."""
    model = seeded(BreakingBlock, "item")
    compiled = tilestack.optimize(model, check=False, inner="aot_eager")
    torch.manual_seed(1)
    x = torch.randn(2, 10, D)
    outs = []
    with torch.no_grad():
        for scale in (0.35, 0.2, 0.7, 3.0):
            model.logit_scale.fill_(torch.tensor(scale).log())
            got = compiled(x)
            torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-5, msg=f"scale {scale}")
            outs.append(got)
    assert float((outs[0] - outs[3]).abs().max()) > 1e-2


def test_a_break_between_the_scores_and_the_softmax():
    """The scores made in one graph, their softmax and product in the next: no attention can be taken across the
    break (left, with the reason), the softmax swapped alone; the outputs eager's."""
    model = seeded(BreakingBlock, "mid")
    torch.manual_seed(1)
    x = torch.randn(2, 10, D)
    since = len(tc.reports())
    with torch.no_grad():
        got, want = tilestack.optimize(model, check=True, inner="aot_eager")(x), model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert _swaps(since) == {"norm": 1, "softmax": 1}
    assert any("one mask at most" in w for w in _declined("explicit_attention", since))


# ---- attributes changed after the compile ---------------------------------------------------------------------------
def test_a_window_changed_after_the_compile():
    """The sliding window's int attribute set to 2, then 6: Dynamo guards on it; each call is eager's at that window,
    never a stale mask."""
    model = seeded(SlidingWindowAttention, "where")
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    torch.manual_seed(1)
    x = torch.randn(2, 10, D)
    with torch.no_grad():
        for window in (3, 2, 6):
            model.window = window
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5, msg=f"window {window}")


def test_a_gqa_scale_changed_after_the_compile():
    """SDPA's scale= from a float attribute, 0.3, then 0.5, then None (SDPA's default): each call eager's; where the
    changed float is a graph input the SDPA swap is declined naming it, never run at the first scale."""
    model = seeded(GQAttention, "sdpa")
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    torch.manual_seed(1)
    x = torch.randn(2, 10, D)
    with torch.no_grad():
        for scale in (0.3, 0.5, None):
            model.scale = scale
            since = len(tc.reports())
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5, msg=f"scale {scale}")
            for why in _declined("sdpa", since):
                assert "scale" in why, why
