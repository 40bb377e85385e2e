"""The tilestack torch.compile backend on models it has never seen, round 12 (unseen_blocks_round12.py): a T5 encoder
stack (log-bucketed relative-position bias through an embedding, shared by the second layer, the padding bias folded
into it; T5's bias-free RMSNorm; unscaled scores; the softmax in f32 cast back; gated-GELU FFN), BERT with its three
embedding tables, an extended padding mask and a tanh pooler (a dict returned), Mistral's sliding window over GQA with
rotary (a boolean ``tril().triu()`` mask for SDPA, and written out with ``masked_fill(~allowed, finfo.min)`` and
``softmax(dtype=float32)``), a Whisper-like audio encoder (strided ``conv1d`` front end, sinusoid buffer, bias-free key
projection), a ViT with tanh GELU and layer scale, a tied autoencoder decoding with ``F.linear(h, w.t())`` / ``h @ w``
and a tied-embedding LM; inference in f32, bf16 and f16 and training (gradients against float64, then SGD steps);
BatchNorm's running statistics moved in train mode; ``mark_dynamic`` over batch and length; a graph break on
``.item()``. For each inference test: ``torch._dynamo.explain`` finds one graph and no break, the backend compiles
one graph and nothing on a second call (``test_unseen_round9._compiled``), the outputs are eager's within the dtype's
tolerance and (f32) within 1e-4 relative of a float64 run, and the report's swaps are checked by name and text.
Kernels on the reference executor at tiny sizes (the size policy off), the rest through aot_eager.

Every model here compiled correctly as it was: no src change came from this file (the bugs of this round are in
``tilestack.quantize``, test_unseen_models_round12_quant.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_unseen_models_round1 import _fresh  # noqa: F401 - _fresh: autouse
from test_unseen_models_round2 import _declined
from test_unseen_round9 import _compiled, _f64, _gap, _swaps, _whats
from torch.utils._pytree import tree_leaves
from unseen_blocks_round12 import (
    HD,
    MELS,
    TYPES,
    VOCAB,
    BertWithEmbeddings,
    BranchOnItem,
    CheckpointedBlocks,
    ConvBNClassifier,
    D,
    FrozenBackboneProbe,
    SlidingWindowBlock,
    T5Stack,
    TiedAutoencoder,
    TiedLM,
    ViTLayerScale,
    WhisperEncoder,
    seeded,
)

import tilestack
import tilestack.compile as tc

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
F64_TOL = {"rtol": 1e-4, "atol": 1e-5}
EPILOGUE_F32 = "x is torch.float32 and the weight torch.float32"     # tilestack's GEMM multiplies bf16 or f16
TRAINING = "a graph that needs gradients"


def _padding_mask(b: int = 2, n: int = 7) -> torch.Tensor:
    mask = torch.ones(b, n)
    mask[-1, n - 2:] = 0                         # the last sequence's last two tokens padding
    return mask


def _x(b: int = 2, n: int = 7, dtype=F32, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(b, n, D, dtype=dtype)


def _against_f64(model, got, *args):
    for g, w in zip(tree_leaves(got), tree_leaves(_f64(model, *args)), strict=True):
        torch.testing.assert_close(g.double(), w, **F64_TOL)


def _bert_inputs(b: int = 2, n: int = 7, seed: int = 2):
    torch.manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, n))
    types = torch.zeros(b, n, dtype=torch.long)
    types[:, n // 2:] = TYPES - 1                # sentence B
    return ids, types, _padding_mask(b, n).long()


# ---- inference -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_t5_stack_shared_position_bias(dtype):
    """Both layers' attentions taken at scale 1 with the position bias (padding folded in) as one additive mask, the
    five T5 norms taken as RMSNorms (the f32 variance, the cast back before the weight in 16 bits); in 16 bits the
    gated FFN's ``gelu_tanh(wi_0(h))`` and both residual projections as GEMM epilogues. The bias matters: zeroing its
    table changes the output; the padding holds: the padded tokens changed, the unpadded outputs stay."""
    model = seeded(T5Stack, dtype=dtype)
    x, mask = _x(dtype=dtype), _padding_mask()
    got, swaps, since = _compiled(model, x, mask, dtype=dtype)
    assert swaps == {"explicit_attention": 2, "norm": 5} | ({"linear_epilogue": 6} if dtype != F32 else {}), swaps
    assert _whats(since, "explicit_attention") == 2 * ["softmax(q @ k^T * 1) with an additive mask @ v -> "
                                                       "tilestack::attention_fwd"]
    if dtype != F32:
        assert sorted(_whats(since, "linear_epilogue")) == sorted(
            2 * ["linear + gelu_tanh -> tilestack::linear_epilogue"] + 4 * ["linear + residual add -> "
                                                                             "tilestack::linear_epilogue"])
        return
    _against_f64(model, got, x, mask)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.blocks[0].relative_attention_bias.weight.zero_()
        assert _gap(moved(x, mask), got) > 1e-3
        y = x.clone()
        y[1, 5:] = 10.0
        torch.testing.assert_close(model(y, mask)[1, :5], got[1, :5], **F64_TOL)


@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
def test_bert_with_token_types_and_padding(dtype):
    """The embeddings' second sum (a (1, n, D) position row broadcast over the batch) is left with the reason; the
    embedding LayerNorm, the attention (scale hd^-0.5, the extended mask additive) and both post-LN residual +
    LayerNorms are swapped; in 16 bits the intermediate Linear + GELU too. The token types matter."""
    model = seeded(BertWithEmbeddings, dtype=dtype)
    ids, types, mask = _bert_inputs()
    got, swaps, since = _compiled(model, ids, types, mask, dtype=dtype)
    want = {"explicit_attention": 1, "add_norm": 2, "norm": 1}
    assert swaps == want | ({"linear_epilogue": 1} if dtype != F32 else {}), swaps
    assert _whats(since, "explicit_attention") == [f"softmax(q @ k^T * {HD ** -0.5:.4g}) with an additive mask @ v "
                                                   "-> tilestack::attention_fwd"]
    assert any("differing shapes" in why for why in _declined("add_norm", since))
    assert set(got) == {"last_hidden_state", "pooler_output"} and got["pooler_output"].shape == (2, D)
    if dtype == F32:
        _against_f64(model, got, ids, types, mask)
        with torch.no_grad():
            assert _gap(model(ids, torch.zeros_like(types), mask)["last_hidden_state"],
                        got["last_hidden_state"]) > 1e-3


@pytest.mark.parametrize("form,dtype", [("sdpa", F32), ("explicit", F32), ("explicit", BF16)],
                         ids=["sdpa-f32", "explicit-f32", "explicit-bf16"])
def test_mistral_sliding_window(form, dtype):
    """GQA (4 query heads over 2 key/value heads by repeat_kv), rotary, a window of 3 keys as a boolean mask: the
    attention taken by SDPA's pass or the explicit one (the finfo.min fill), both RMSNorms; in 16 bits the gate's SiLU
    and the two residual projections as epilogues. The window holds (f32): a token 3 places back no longer changes a
    query's output, the one 2 back does."""
    model = seeded(SlidingWindowBlock, form, dtype=dtype)
    x = _x(n=9, dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    attention = "sdpa" if form == "sdpa" else "explicit_attention"
    assert swaps == {attention: 1, "norm": 2} | ({"linear_epilogue": 3} if dtype != F32 else {}), swaps
    if dtype != F32:
        assert sorted(_whats(since, "linear_epilogue")) == [
            *2 * ["linear + residual add -> tilestack::linear_epilogue"], "linear + silu -> tilestack::linear_epilogue"]
        return
    _against_f64(model, got, x)
    with torch.no_grad():
        far, near = x.clone(), x.clone()
        far[:, 2] += 3.0                          # 3 before query 5: outside the window of the attention
        near[:, 3] += 3.0
        # the MLP is per token and the residual carries x[:, 5] only: query 5's output moves with near alone
        torch.testing.assert_close(model(far)[:, 5], got[:, 5], **F64_TOL)
        assert _gap(model(near)[:, 5], got[:, 5]) > 1e-2


@pytest.mark.parametrize("dtype", [F32], ids=["f32"])
def test_whisper_like_audio_encoder(dtype):
    """Two conv1d + GELU (left: no tilestack kernel), the sinusoid buffer's rows added; both blocks' SDPA, the four
    residual + LayerNorms (the first block's ln after the conv front end's sum included) and ln_post swapped; in 16
    bits each fc1 + GELU an epilogue."""
    model = seeded(WhisperEncoder, dtype=dtype)
    torch.manual_seed(3)
    mel = torch.randn(2, MELS, 16, dtype=dtype)
    got, swaps, since = _compiled(model, mel, dtype=dtype)
    assert swaps == {"sdpa": 2, "add_norm": 4, "norm": 1} | ({"linear_epilogue": 2} if dtype != F32 else {}), swaps
    assert got.shape == (2, 8, D)
    if dtype == F32:
        _against_f64(model, got, mel)
        assert sum(EPILOGUE_F32 in why for why in _declined("linear_epilogue", since)) == 2
    else:
        assert _whats(since, "linear_epilogue") == 2 * ["linear + bias + gelu -> tilestack::linear_epilogue"]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_vit_tanh_gelu_layer_scale(dtype):
    """The class token and position table (their add left: differing shapes), SDPA, two residual + LayerNorms (the
    layer-scaled branches), the final norm; in 16 bits fc1 + tanh GELU an epilogue (fc2 is read by gamma_2's product:
    nothing after it to fuse)."""
    model = seeded(ViTLayerScale, dtype=dtype)
    torch.manual_seed(4)
    patches = torch.randn(3, 6, 12, dtype=dtype)
    got, swaps, since = _compiled(model, patches, dtype=dtype)
    assert swaps == {"sdpa": 1, "add_norm": 2, "norm": 1} | ({"linear_epilogue": 1} if dtype != F32 else {}), swaps
    if dtype == F32:
        _against_f64(model, got, patches)
    else:
        assert _whats(since, "linear_epilogue") == ["linear + bias + gelu_tanh -> tilestack::linear_epilogue"]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("form", ["linear_t", "matmul"])
def test_tied_autoencoder_transposed_weight(form, dtype):
    """The decoder reads the encoder's weight transposed (``F.linear(h, w.t(), b2)``, or ``h @ w + b2``): in 16 bits
    both GEMMs are epilogues (relu; the decoder's bias and residual) and the outputs eager's; in f32 both declined
    naming the dtype, and float64's."""
    model = seeded(TiedAutoencoder, form, dtype=dtype)
    x = _x(dtype=dtype)
    got, swaps, since = _compiled(model, x, dtype=dtype)
    if dtype == F32:
        assert swaps == {}, swaps
        assert sum(EPILOGUE_F32 in why for why in _declined("linear_epilogue", since)) == 2
        _against_f64(model, got, x)
        return
    assert swaps == {"linear_epilogue": 2}, swaps
    head = "linear" if form == "linear_t" else "matmul"
    assert sorted(_whats(since, "linear_epilogue")) == sorted([
        f"{head} + bias + residual add -> tilestack::linear_epilogue",
        "linear + bias + relu -> tilestack::linear_epilogue"])


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_tied_embedding_lm(dtype):
    """The head's weight is the embedding table: the residual + LayerNorm swapped, fc + GELU an epilogue in bf16, the
    head (a lone Linear) left; float64's logits in f32."""
    model = seeded(TiedLM, dtype=dtype)
    assert model.head.weight is model.emb.weight
    torch.manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, 7))
    got, swaps, _ = _compiled(model, ids, dtype=dtype)
    assert swaps == {"add_norm": 1} | ({"linear_epilogue": 1} if dtype == BF16 else {}), swaps
    assert got.shape == (2, 7, VOCAB)
    if dtype == F32:
        _against_f64(model, got, ids)


# ---- training --------------------------------------------------------------------------------------------------------
def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _trained(model, batches, loss_of, *, lr: float = 0.05):
    """model compiled (check=True, aot_eager) and trained by SGD on ``batches`` beside an eager copy and a float64
    copy. Each step: the loss eager's (1e-5) and float64's (1e-4); the first step's gradients each within twice eager's
    own error against float64 (plus 1e-6). Returns (report index, eager copy)."""
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    since = len(tc.reports())
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in (model, eager, ref)]
    for step, args in enumerate(batches):
        as64 = tuple(a.double() if a.is_floating_point() else a for a in args)
        losses = []
        for fn, opt, a in ((compiled, opts[0], args), (eager, opts[1], args), (ref, opts[2], as64)):
            opt.zero_grad()
            loss = loss_of(fn(*a))
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(losses[0].double(), losses[2], rtol=1e-4, atol=1e-6)
        if step == 0:
            for i, (g, e, r) in enumerate(zip(_grads(model), _grads(eager), _grads(ref), strict=True)):
                own = float((e.double() - r).abs().max())
                assert float((g.double() - r).abs().max()) <= 2 * own + 1e-6, f"gradient {i}"
        for opt in opts:
            opt.step()
    assert len(tc.reports()) == since + 1, "training compiled more than one graph"
    return since, eager


@pytest.mark.parametrize("name", ["bert", "mistral_explicit", "vit", "tied"])
def test_training_through_the_backend(name):
    """Each model trained two SGD steps through the backend: the attention and norms swapped, the GEMM epilogues
    declined (training), losses and first-step gradients as eager's against float64."""
    if name == "bert":
        model = seeded(BertWithEmbeddings, train=True)
        model.drop.p = 0.0
        batches = [_bert_inputs(seed=s) for s in (3, 4)]
        loss_of = lambda y: y["last_hidden_state"].pow(2).mean() + y["pooler_output"].sum()   # noqa: E731
        swaps = {"explicit_attention": 1, "add_norm": 2, "norm": 1}
    elif name.startswith("mistral"):
        model = seeded(SlidingWindowBlock, name.split("_")[1], train=True)
        batches = [(_x(n=9, seed=s),) for s in (3, 4)]
        loss_of = lambda y: y.pow(2).mean()                                                   # noqa: E731
        swaps = {"sdpa" if name.endswith("sdpa") else "explicit_attention": 1, "norm": 2}
    elif name == "vit":
        model = seeded(ViTLayerScale, train=True)
        labels = torch.tensor([1, 4, 0])
        batches = [(torch.randn(3, 6, 12),) for _ in range(2)]
        loss_of = lambda y: F.cross_entropy(y, labels)                                        # noqa: E731
        swaps = {"sdpa": 1, "add_norm": 2, "norm": 1}
    else:
        model = seeded(TiedAutoencoder, "linear_t", train=True)
        batches = [(_x(seed=s),) for s in (3, 4)]
        loss_of = lambda y: y.pow(2).mean()                                                   # noqa: E731
        swaps = {}
    since, eager = _trained(model, batches, loss_of)
    assert _swaps(since) == swaps, _swaps(since)
    if name == "tied":                           # the one weight took both uses' gradients, as eager's did
        torch.testing.assert_close(model.w, eager.w, rtol=1e-5, atol=1e-6)
    assert all(TRAINING in why for why in _declined("linear_epilogue", since))


def test_batchnorm_running_statistics_in_training():
    """Conv + BatchNorm2d (momentum 0.3) + BatchNorm1d + Linear trained three steps: the compiled model's running
    means, variances and num_batches_tracked are eager's after each step (the buffers' in-place updates kept), its
    losses and weights too; then in eval mode its outputs use those statistics, as eager's."""
    model = seeded(ConvBNClassifier, train=True)
    eager = copy.deepcopy(model)
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager)]
    labels = torch.tensor([0, 2, 1, 1])
    torch.manual_seed(6)
    for step in range(3):
        x = torch.randn(4, 3, 5, 5) + step                # the mean moves: the running mean must follow
        for fn, opt in ((compiled, opts[0]), (eager, opts[1])):
            opt.zero_grad()
            F.cross_entropy(fn(x), labels).backward()
            opt.step()
        for (name, b), (_, e) in zip(model.named_buffers(), eager.named_buffers(), strict=True):
            if b.is_floating_point():
                torch.testing.assert_close(b, e, rtol=1e-5, atol=1e-6, msg=f"{name} after step {step}")
            else:
                assert torch.equal(b, e), name
    assert int(model.bn.num_batches_tracked) == 3
    assert float(model.bn.running_mean.abs().max()) > 0.1           # moved from its zeros
    model.eval()
    eager.eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_left_with_its_reason():
    """Both blocks under ``torch.utils.checkpoint``: the compiled model trains as eager (losses, first-step gradients
    against float64); the region is one higher-order op whose body the passes do not enter, and the report says so
    (it said "no tilestack kernel for it", silent on the attention inside). Without checkpointing, the same blocks'
    attentions and norms are swapped."""
    model = seeded(CheckpointedBlocks, train=True)
    since, _ = _trained(model, [(_x(n=9, seed=s),) for s in (3, 4)], lambda y: y.pow(2).mean())
    assert _swaps(since) == {}, _swaps(since)
    why = [w for r in tc.reports()[since:] for op, w in r.left_why.items() if op == "tag_activation_checkpoint"]
    assert why and "torch.utils.checkpoint region" in why[0] and "do not look into" in why[0], why


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_frozen_backbone_under_a_trained_probe(dtype):
    """A training graph whose frozen backbone needs no gradient: its LayerNorm swapped, and in bf16 fc1 + tanh GELU and
    fc2 + residual as GEMM epilogues (the fused op has no backward, and none is asked of it); the probe's loss and
    gradients eager's (bf16: within its rounding), the backbone without gradients."""
    model = seeded(FrozenBackboneProbe, dtype=dtype, train=True)
    eager = copy.deepcopy(model)
    labels = torch.tensor([2, 0])
    since = len(tc.reports())
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    x = _x(dtype=dtype)
    losses = [F.cross_entropy(fn(x).float(), labels) for fn in (compiled, eager)]
    for loss in losses:
        loss.backward()
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == F32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(losses[0], losses[1], **tol)
    for p, e in zip(model.head.parameters(), eager.head.parameters(), strict=True):
        torch.testing.assert_close(p.grad.float(), e.grad.float(), **tol)
    assert model.fc1.weight.grad is None and model.norm.weight.grad is None
    assert _swaps(since) == {"norm": 1} | ({"linear_epilogue": 2} if dtype == BF16 else {}), _swaps(since)


# ---- dynamic shapes and graph breaks ---------------------------------------------------------------------------------
def test_sliding_window_over_batches_and_lengths():
    """The written-out sliding-window block over (batch, length) (2, 7), (3, 5), (4, 11), both dims of the first input
    ``mark_dynamic`` (the window's mask and the rotary tables built from the symbolic length): one graph serving all,
    its attention and two norms swapped; each output eager's."""
    model = seeded(SlidingWindowBlock, "explicit")
    since = len(tc.reports())
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    for i, (b, n) in enumerate(((2, 7), (3, 5), (4, 11))):
        x = _x(b, n, seed=b + n)
        if i == 0:
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(x, 1)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    assert [r.swapped for r in tc.reports()[since:]] == [{"explicit_attention": 1, "norm": 2}]


def test_graph_break_on_item():
    """``.item()`` splits the model in two graphs (explain: one break); each compiled by the backend, the first with
    SDPA and the first norm, the second (the MLP branch taken) with its norm; the returned value and outputs eager's.
    A threshold above the level skips the branch: the compiled model follows (eager's output)."""
    model = seeded(BranchOnItem)
    x = _x(n=9)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count >= 1
    torch._dynamo.reset()
    since = len(tc.reports())
    compiled = tilestack.optimize(model, check=True, inner="aot_eager")
    with torch.no_grad():
        got, level = compiled(x)
        want, want_level = model(x)
        torch.testing.assert_close(got, want, **F64_TOL)
        assert level == pytest.approx(want_level, rel=1e-6)
        swaps = _swaps(since)
        assert swaps == {"sdpa": 1, "norm": 2}, swaps
        skipped, _ = compiled(x, 1e9)
        torch.testing.assert_close(skipped, model(x, 1e9)[0], **F64_TOL)
        assert _gap(skipped, got) > 1e-3
