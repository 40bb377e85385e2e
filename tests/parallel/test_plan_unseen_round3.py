"""The planner on models it was not built around, round 3: descriptions and memory against torch and by hand.

Unseen models (tests/parallel/plan_models_round3.py): a stacked LSTM and a GRU language model, an LSTMCell unrolled
over time by the root (one cell, a layer per step), LoRA adapters on frozen linears (f32, and a QLoRA-like bf16
frozen base under f32 adapters), a frozen convolutional encoder (BatchNorm in eval mode) with a trainable head,
heterogeneous blocks (attention at width 32 and 16 alternating with narrowing MLP-only blocks), a million-row
embedding, a whole-bf16 model, blocks called with keyword arguments under a root returning a dict (an int64
position-id buffer), weight-normed dilated 1-D convolutions (torch's parametrizations), a frozen integer parameter.

Found and fixed (each test below failed first):
- a layer whose frozen parameters are of another dtype than its trained ones (a bf16 frozen base under f32 LoRA
  adapters, an int64 table beside an f32 linear) had its gradients and AdamW moments counted at the layer's
  average bytes per element (LayerDesc.frozen_bytes, predict._held);
- bytes saved once per micro-batch whatever its size (weight norm's derived weights, a position table broadcast
  over the batch) were counted per sample, so a plan's micro-batch other than the example's mispredicted them
  (LayerDesc.act_fixed_bytes, describe._saved_split measures the example at B and 2B);
- a forward with keyword-only arguments could not be described or timed (describe_module and
  MeasuredCompute.for_module take example_kwargs; the whole model's timing passed no keywords);
- AdamW's step was charged per tensor for frozen tensors too (LayerDesc.frozen_tensors, predict), and a model
  with every parameter frozen failed in MeasuredCompute.optimizer_context (torch's AdamW over an empty list).
"""

import math

import pytest
import torch
from plan_models_round2 import FREE, Unit
from plan_models_round3 import BF16, FP32, INT64, MODELS, _args, lstm_params

from tilestack.parallel.plan import Plan, describe_module, predict


@pytest.fixture(scope="module")
def described():
    return {name: describe_module(m, x) for name, (m, x) in MODELS.items()}


def _batch(x):
    return _args(x)[0].shape[0]


# parameter elements, of them frozen, and parameter bytes, counted by hand from the constructors
def _by_hand():
    lora_trained = 3 * (2 * 16 + 16 * 2) + 16 * 30 + 30                   # A (2, 16) and B (16, 2) per block; head
    lora_frozen = 30 * 16 + 3 * (16 * 16 + 16)                           # the embedding; the base linears
    enc_frozen = (3 * 6 * 9 + 6) + 2 * 6 + (6 * 6 * 9 + 6)               # conv, BatchNorm's affine, conv
    wn = 8 + 8 * 8 * 2 + 8                                              # weight norm: g (8, 1, 1), v (8, 8, 2), bias
    return {
        "lstm": (40 * 8 + lstm_params(8, 12, 2, 4) + 12 * 40 + 40, 0, None),
        "gru": (40 * 8 + lstm_params(8, 12, 3, 3) + 12 * 40 + 40, 0, None),
        "unrolled": (4 * 10 * (6 + 10) + 2 * 4 * 10 + 10 * 3 + 3, 0, None),
        "lora": (lora_trained + lora_frozen, lora_frozen, None),
        "lora bf16 base": (lora_trained + lora_frozen, lora_frozen,
                           (lora_trained + 30 * 16) * FP32 + 3 * (16 * 16 + 16) * BF16),
        "frozen encoder": (enc_frozen + (6 * 8 + 8) + (8 * 4 + 4), enc_frozen, None),
        "funnel": (2 * 32 + 4 * 32 * 32 + 4 * 32 + (32 * 64 + 64) + (64 * 16 + 16) + 2 * 16 + 4 * 16 * 16
                   + 4 * 16 + (16 * 32 + 32) + (32 * 8 + 8) + 8 * 5 + 5, 0, None),
        "big vocab": (1_000_000 * 4 + 4 * 4 + 4 + 4 * 3 + 3, 0, None),
        "bf16": (8 * 16 + 16 + 16 * 8 + 8, 0, (8 * 16 + 16 + 16 * 8 + 8) * BF16),
        "kwargs dict": (20 * 8 + 6 * 8 + 2 * (8 * 8 + 8) + 8 * 20 + 20, 0, None),
        "wavenet": ((8 + 8 * 1 * 1 + 8) + 3 * wn + (8 + 1), 0, None),
        "int param": (10 + 10 * 4 + 4, 10, 10 * INT64 + 44 * FP32),
    }


BY_HAND = _by_hand()


@pytest.mark.parametrize("name", list(MODELS))
def test_parameters_by_hand_and_the_module_left_as_it_was(name, described):
    module, x = MODELS[name]
    desc = described[name]
    params, frozen, nbytes = BY_HAND[name]
    assert desc.params == params == sum(p.numel() for p in module.parameters())
    assert sum(layer.frozen for layer in desc.layers) == frozen
    mem = predict(Plan(batch=_batch(x)), desc, Unit(desc), FREE).memory[0]
    assert mem["parameters"] == (nbytes if nbytes is not None else params * FP32)
    assert sum(layer.tensors for layer in desc.layers) == len(list(module.parameters()))
    for layer in desc.layers:
        values = [layer.flops_fwd, layer.matmul_flops, layer.out_bytes, layer.buffer_bytes, *layer.act_bytes.values()]
        assert all(math.isfinite(v) and v >= 0 for v in values), layer
    state = {k: v.clone() for k, v in module.state_dict().items()}
    describe_module(module, x)
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())
    assert all(p.grad is None for p in module.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _real_step(module, x):
    """Parameter, gradient, AdamW moment and buffer bytes after one real AdamW step on this CPU, and the bytes
    autograd saved for its backward."""
    import copy

    from tilestack.parallel.memory import saved_activation_bytes
    from tilestack.parallel.plan.describe import _loss_of
    model = copy.deepcopy(module)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    saved = saved_activation_bytes(lambda: _loss_of(model(*_args(x))), [*model.parameters(), *model.buffers()])
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)     # noqa: E731
    moments = [v for st in opt.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
    return dict(parameters=nbytes(model.parameters()), gradients=nbytes(p.grad for p in model.parameters()
                                                                         if p.grad is not None),
                optimizer=nbytes(moments), buffers=nbytes(model.buffers()), saved=saved)


@pytest.mark.parametrize("name", list(MODELS))
def test_one_rank_bytes_equal_a_real_adamw_step(name, described):
    """To the byte: parameters, gradients (none for frozen ones), AdamW's moments (of the trained parameters'
    own dtype: bf16 moments for bf16 weights), buffers (BatchNorm's, the int64 position ids), and the activations
    autograd saved (an LSTM's workspace, a frozen encoder's none: its input needs no gradient)."""
    module, x = MODELS[name]
    desc = described[name]
    real = _real_step(module, x)
    mem = predict(Plan(batch=_batch(x)), desc, Unit(desc), FREE).memory[0]
    for part in ("parameters", "gradients", "optimizer", "buffers"):
        assert mem[part] == real[part], part
    assert mem["activations"] == pytest.approx(real["saved"], rel=1e-9)


def test_a_frozen_encoder_saves_nothing_and_has_no_gradients(described):
    desc = described["frozen encoder"]
    enc = [layer for layer in desc.layers if layer.name.startswith("encoder")]
    assert [layer.act_bytes["none"] for layer in enc] == [0.0] * 4
    assert all(layer.frozen == layer.params for layer in enc)
    # BatchNorm's running mean, variance (6 f32 each) and its int64 batch counter
    assert sum(layer.buffer_bytes for layer in desc.layers) == 2 * 6 * FP32 + INT64


@pytest.mark.parametrize("name", ["lora", "lora bf16 base", "int param", "frozen encoder"])
@pytest.mark.parametrize("kw", [dict(dp=2, zero=1), dict(dp=2, zero=2), dict(dp_shard=2), dict(dp=4, zero=1)])
def test_sharding_divides_only_the_trained_state(name, kw, described):
    """ZeRO's f32 master and moments are of the rank's 1/dp of the trained elements; FSDP divides parameters and
    gradients by its degree; frozen parameters never have gradients or optimizer state, whatever their dtype."""
    module, _ = MODELS[name]
    desc = described[name]
    trained = [p for p in module.parameters() if p.requires_grad]
    n_trained = sum(p.numel() for p in trained)
    trained_bytes = sum(p.numel() * p.element_size() for p in trained)
    all_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    mem = predict(Plan(batch=4, **kw), desc, Unit(desc), FREE).memory[0]
    if kw.get("zero"):
        # ZeroOptimizer pads its flat buffer to a multiple of dp: each rank owns ceil(n / dp) elements (round 6)
        assert mem["optimizer"] == 3 * FP32 * -(-n_trained // kw["dp"])
        assert mem["parameters"] == all_bytes
        if kw["zero"] == 1:
            assert mem["gradients"] == pytest.approx(trained_bytes)
    else:
        assert mem["parameters"] == pytest.approx(all_bytes / 2)
        assert mem["gradients"] == pytest.approx(trained_bytes / 2)
        assert mem["optimizer"] == pytest.approx(2 * trained_bytes / 2)


def _tiled(x, b):
    """The example's samples repeated to a batch of ``b``."""
    args = tuple(torch.cat([a] * b)[:b].clone() for a in _args(x))          # a storage of b samples
    return args if len(args) > 1 else args[0]


@pytest.mark.parametrize("name", ["gru", "funnel", "kwargs dict", "lora", "wavenet", "unrolled", "bf16"])
def test_activations_at_other_batches_equal_what_torch_saves(name, described):
    """Described at the example's batch (2), predicted at micro-batches 1, 3 and 8: what autograd really saves
    there. Weight norm's weights are derived from g and v in every forward and saved once per micro-batch, not
    per sample (as is the position table the kwargs model broadcasts over the batch): counting them per sample
    over-predicted a batch of 8 by 3 of them and under-predicted a batch of 1."""
    from tilestack.parallel.memory import saved_activation_bytes
    from tilestack.parallel.plan.describe import _loss_of
    module, x = MODELS[name]
    desc = described[name]
    for b in (1, 3, 8):
        xb = _args(_tiled(x, b))
        real = saved_activation_bytes(lambda xb=xb: _loss_of(module(*xb)), [*module.parameters(), *module.buffers()])
        pred = predict(Plan(batch=b), desc, Unit(desc), FREE).memory[0]["activations"]
        assert pred == pytest.approx(real, rel=1e-9), b
    # described at another batch, the same per-sample and per-micro-batch bytes
    twice = describe_module(module, _tiled(x, 4))
    pairs = lambda d: [v for layer in d.layers for v in (layer.act_bytes["none"], layer.act_fixed_bytes)]  # noqa
    assert pairs(twice) == pytest.approx(pairs(desc))
    if name == "wavenet":        # each weight-normed conv saves its derived weight (8, 8, 2) and norm (8, 1, 1) once
        assert [layer.act_fixed_bytes for layer in desc.layers[1:4]] == [(8 * 8 * 2 + 8) * FP32] * 3


def test_a_recurrent_model_grows_with_the_sequence(described):
    """No attention: the embedding's and the head's saved bytes grow linearly with the sequence described. (An
    LSTM's workspace on this CPU grows in steps with batch and sequence: only its bytes at the example's batch
    are exact, test_one_rank_bytes_equal_a_real_adamw_step.)"""
    for name in ("lstm", "gru"):
        module, x = MODELS[name]
        desc = described[name]
        longer = describe_module(module, torch.cat([x, x, x], 1))
        body = lambda d: sum(layer.act_bytes["none"] for layer in d.layers if layer.name != "rnn")  # noqa: E731
        assert body(longer) == pytest.approx(3 * body(desc))
        assert longer.flops_per_sample == pytest.approx(3 * desc.flops_per_sample)


def test_an_unrolled_cell_is_one_weight_used_by_every_step(described):
    """The LSTMCell called once per time step: four layers, the first owning the weights, the others sharing
    them; a pipeline that puts steps on two ranks holds the cell on both and all-reduces its gradients."""
    desc = described["unrolled"]
    assert [layer.name for layer in desc.layers] == ["cell", "cell#2", "cell#3", "cell#4", "out"]
    cell = 4 * 10 * (6 + 10) + 2 * 4 * 10
    assert desc.layers[0].params == cell and all(layer.params == 0 for layer in desc.layers[1:4])
    assert all(sum(p.numel for p in layer.shared) == cell for layer in desc.layers[1:4])
    pred = predict(Plan(batch=2, pp=2, microbatches=2, bounds=(0, 2, 5)), desc, Unit(desc), FREE)
    assert pred.memory[0]["parameters"] == cell * FP32
    assert pred.memory[1]["parameters"] == (cell + 10 * 3 + 3) * FP32
    one = predict(Plan(batch=2, pp=2, microbatches=2, bounds=(0, 4, 5)), desc, Unit(desc), FREE)
    assert pred.terms["dp comm"] >= one.terms["dp comm"]


@pytest.mark.parametrize("name", ["funnel", "frozen encoder", "unrolled", "lora", "wavenet", "gru"])
@pytest.mark.parametrize("pp", [2, 3])
def test_pipeline_stages_sum_to_the_whole(name, pp, described):
    """Every split of the layers into pp stages: the stages' parameters and buffers add up to the model's (plus
    the copies of weights shared across stages, none here but the unrolled cell's)."""
    from tilestack.parallel.plan.search import compositions
    desc = described[name]
    n = len(desc.layers)
    if n < pp:
        pytest.skip("fewer layers than stages")
    total_bytes = sum(layer.param_bytes for layer in desc.layers)
    total_buffers = sum(layer.buffer_bytes for layer in desc.layers)
    for sizes in compositions(n):
        if len(sizes) != pp:
            continue
        bounds = tuple(sum(sizes[:k]) for k in range(pp + 1))
        pred = predict(Plan(batch=pp, pp=pp, microbatches=pp, bounds=bounds), desc, Unit(desc), FREE)
        copies = sum(p.nbytes for r in range(pp) for p in
                     {q.ordinal: q for i in range(bounds[r], bounds[r + 1]) for q in desc.layers[i].shared
                      if not bounds[r] <= q.owner < bounds[r + 1]}.values())
        assert sum(m["parameters"] for m in pred.memory) == pytest.approx(total_bytes + copies), bounds
        assert sum(m["buffers"] for m in pred.memory) == total_buffers


def test_a_forward_with_keyword_only_arguments_is_described_with_example_kwargs():
    """``forward(x, *, attention_mask)``: refused without the keyword (naming it and example_kwargs), described
    with it: the mask, (batch, 4) and per sample, goes with the batch when the planner doubles it; the saved
    bytes at other batches are torch's, and the layers time on the arguments they received."""
    from plan_models_round3 import KeywordOnly

    from tilestack.parallel.memory import saved_activation_bytes
    from tilestack.parallel.plan import MeasuredCompute, PlanError
    from tilestack.parallel.plan.describe import _loss_of
    torch.manual_seed(0)
    module, x = KeywordOnly(), torch.randn(2, 4)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    with pytest.raises(PlanError, match="attention_mask.*example_kwargs"):
        describe_module(module, x)
    desc = describe_module(module, x, example_kwargs={"attention_mask": mask})
    assert desc.params == 4 * 4 + 4 and [layer.name for layer in desc.layers] == ["lin"]
    for b in (1, 3, 8):
        xb, mb = torch.cat([x] * b)[:b].clone(), torch.cat([mask] * b)[:b].clone()
        real = saved_activation_bytes(lambda xb=xb, mb=mb: _loss_of(module(xb, attention_mask=mb)),
                                      list(module.parameters()))
        assert predict(Plan(batch=b), desc, Unit(desc), FREE).memory[0]["activations"] == real, b
    cm = MeasuredCompute.for_module(desc, module, x, example_kwargs={"attention_mask": mask})
    f, g = cm.layer_times(0, 3)
    assert 0 < f < 1 and 0 <= g < 1
    for kw, match in (([mask], "example_kwargs=list"), ({"attention_mask": mask * math.nan}, "NaN or inf"),
                      ({1: mask}, "example_kwargs=dict")):
        with pytest.raises(PlanError, match=match):
            describe_module(module, x, example_kwargs=kw)


def test_adamw_is_charged_for_the_trained_tensors_only(described):
    """LoRA: 3 x (A, B) and the head's weight and bias are stepped; the frozen embedding and base linears (7
    tensors) are given to no optimizer, so they cost no per-tensor step. A model with every parameter frozen has
    no step: its measured compute model timed an AdamW over an empty list and failed in torch."""
    from torch import nn

    from tilestack.parallel.plan import MeasuredCompute, search

    class Spy(Unit):
        def optimizer_s(self, params, tensors):
            self.asked = (params, tensors)
            return 0.0

    module, _ = MODELS["lora"]
    desc = described["lora"]
    spy = Spy(desc)
    predict(Plan(batch=2), desc, spy, FREE)
    trained = [p for p in module.parameters() if p.requires_grad]
    assert spy.asked == (sum(p.numel() for p in trained), len(trained)) == (3 * 64 + 510, 8)
    torch.manual_seed(0)
    frozen = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).requires_grad_(False)
    x = torch.randn(2, 8)
    fdesc = describe_module(frozen, x)
    cm = MeasuredCompute.for_module(fdesc, frozen, x)
    assert cm.optimizer_s(0, 0) == 0.0
    ranked = search(fdesc, cm, FREE, world_size=2, batch=4, recompute=["none"])
    assert all(r.prediction.terms["optimizer"] == 0.0 for r in ranked)
    assert all(r.prediction.memory[0]["gradients"] == 0 == r.prediction.memory[0]["optimizer"] for r in ranked)
