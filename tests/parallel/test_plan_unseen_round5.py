"""The planner on models it was not built around, round 5: descriptions, memory and stage boundaries.

Unseen models (tests/parallel/plan_models_round5.py): a Mixtral-like decoder (top-2 of 4 SwiGLU experts and a
shared expert), a Mamba-like selective scan written as a Python loop over time, a diffusion U-Net (a timestep
embedding handed to every block, the down path's outputs handed to the up path as skips), a vision-language
model (two towers of their own inputs meeting in a fusion block), an MLP with one layer 500 times the others.
Checked against torch on this CPU (what one AdamW step leaves, what autograd saves) and by hand.

Found and fixed (each test below failed first):
- a pipeline stage received only what its first layer takes: a U-Net cut after its second down block sent the
  mid block's input (1056 bytes per sample) but not the first down block's output that the up path takes as its
  skip (3104 in all); a cut inside the text tower of a two-tower model did not carry the image tower's output to
  the fusion block, and a cut inside the image tower did not carry the text tower's token ids. Sends and both
  stages' receive buffers were under-predicted by them. A stage now receives every per-sample tensor that
  existed before its first layer and that one of its layers (or a later stage's) takes
  (describe._carried_bytes, LayerDesc.in_bytes).
"""

import copy

import pytest
import torch
from plan_models_round2 import FIT, FREE, Flops, Unit
from plan_models_round5 import BY_HAND, FP32, MODELS, MambaLike, args_of

from tilestack.parallel.plan import Plan, describe_module, predict


@pytest.fixture(scope="module")
def described():
    return {name: describe_module(m, x) for name, (m, x) in MODELS.items()}


def _batch(x):
    return args_of(x)[0].shape[0]


def _nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


def _times(x, k):
    """The example k times over (every sample repeated, so a router sends each copy where it sent the original)."""
    return tuple(torch.cat([a] * k) for a in args_of(x))


def _real_step(module, x):
    """Parameter, gradient, AdamW moment and buffer bytes after one real AdamW step on this CPU."""
    from tilestack.parallel.plan.describe import _loss_of
    model = copy.deepcopy(module)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _loss_of(model(*args_of(x))).backward()
    opt.step()
    moments = [v for st in opt.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
    return dict(parameters=_nbytes(model.parameters()), buffers=_nbytes(model.buffers()),
                gradients=_nbytes(p.grad for p in model.parameters() if p.grad is not None),
                optimizer=_nbytes(moments))


@pytest.mark.parametrize("name", list(MODELS))
def test_parameters_and_a_real_adamw_step(name, described):
    """Parameters by hand from the constructors; parameter, gradient, moment and buffer bytes of a one-rank plan
    equal, to the byte, what one AdamW step leaves on this CPU (every expert was routed to, so every one has a
    gradient; the U-Net's frequency table is its only buffer)."""
    module, x = MODELS[name]
    desc = described[name]
    params, buffers = BY_HAND[name]
    assert desc.params == params == sum(p.numel() for p in module.parameters())
    assert sum(layer.buffer_bytes for layer in desc.layers) == buffers == _nbytes(module.buffers())
    mem = predict(Plan(batch=_batch(x)), desc, Unit(desc), FREE).memory[0]
    real = _real_step(module, x)
    for part in ("parameters", "gradients", "optimizer", "buffers"):
        assert mem[part] == real[part], part


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_activations_equal_what_autograd_saves(name, k, described):
    """A one-rank plan's activations at k times the example's batch equal the bytes autograd saves for backward
    in one training forward of the whole module on this CPU (each storage once; parameters and buffers not)."""
    from tilestack.parallel.memory import saved_activation_bytes
    from tilestack.parallel.plan.describe import _loss_of
    module, x = MODELS[name]
    desc = described[name]
    xs = _times(x, k)
    real = saved_activation_bytes(lambda: _loss_of(module(*xs)), list(module.parameters()))
    got = predict(Plan(batch=k * _batch(x)), desc, Unit(desc), FREE).memory[0]["activations"]
    assert got == pytest.approx(real, rel=1e-9)


def test_a_python_loop_scan_saves_by_hand():
    """The selective scan's Python loop saves, per sample and time step, in bytes: exp(dt A) and the new state
    (12 x 4 f32 each), dt B (4), and the step's share of the tensors made for all steps (dt 4, x_proj's output 36,
    in_proj's output 96, the block's input 32, y, silu(z) and out_proj's input 48 each): 712; plus the first
    state's zeros (192) per sample, and once per micro-batch A = -exp(A_log) and exp(A_log) (2 x 192). FLOPs
    grow linearly with the sequence."""
    torch.manual_seed(0)
    model = MambaLike()
    flops = []
    for T in (3, 5, 10, 20):
        desc = describe_module(model, torch.randn(2, T, 8))
        for block in desc.layers[:2]:
            assert block.act_bytes["none"] == 712 * T + 192, T
            assert block.act_fixed_bytes == 2 * 12 * 4 * FP32
        flops.append(desc.layers[0].flops_fwd)
    # affine in T (the projections, the per-step ops): equal steps between equal increments
    assert flops[2] - flops[1] == pytest.approx((flops[1] - flops[0]) * 5 / 2)
    assert flops[3] - flops[2] == pytest.approx((flops[2] - flops[1]) * 2)


def test_a_sparse_moe_counts_the_experts_each_token_visits(described):
    """Per sample (6 tokens of width 16): q, k, v, o 2 x 6 x 16 x 64; the router 2 x 6 x 16 x 4; the shared
    SwiGLU 3 x 2 x 6 x 16 x 24 for every token and the routed ones twice that (top-2). The experts are inside
    the block: no pipeline cut falls between experts that run side by side."""
    desc = described["mixtral"]
    assert [layer.name for layer in desc.layers] == ["embed", "blocks.0", "blocks.1", "norm", "head"]
    s, d, h = 6, 16, 24
    attn, router, swiglu = 2 * s * d * 4 * d, 2 * s * d * 4, 3 * 2 * s * d * h
    for block in desc.layers[1:3]:
        assert block.matmul_flops == attn + router + 3 * swiglu
    assert desc.layers[4].matmul_flops == 2 * s * d * 40


# the U-Net's per-sample tensors (f32): the timestep embedding, the down path's outputs, the up path's
TEMB, H1, H2, POOLED, U2_UP = 8 * FP32, 8 * 8 * 8 * FP32, 16 * 4 * 4 * FP32, 8 * 4 * 4 * FP32, 8 * 8 * 8 * FP32


def test_a_unet_stage_receives_the_skips_that_cross_it(described):
    """Layers time, down1, down2, mid, up2, up1, out. A stage that begins at mid receives down2's output (mid's
    input and up2's skip), the timestep embedding, and down1's output, which up1 takes as its skip: 3104 bytes per
    sample, not mid's 1056. Beginning at up2 it also receives mid's output; at up1, only what up1 takes (the
    upsampled input is made by the module's own code just before it)."""
    desc = described["unet"]
    assert [layer.name for layer in desc.layers] == ["time", "down1", "down2", "mid", "up2", "up1", "out"]
    carried = {layer.name: layer.in_bytes for layer in desc.layers}
    assert carried["down1"] == 3 * 8 * 8 * FP32 + TEMB                    # the image and the embedding
    assert carried["down2"] == POOLED + TEMB + H1
    assert carried["mid"] == H2 + TEMB + H1
    assert carried["up2"] == H2 + H2 + TEMB + H1                           # mid's output and down2's, its skip
    assert carried["up1"] == U2_UP + TEMB + H1
    assert carried["out"] == 8 * 8 * 8 * FP32


@pytest.mark.parametrize("bounds", [(0, 3, 7), (0, 4, 7), (0, 3, 5, 7)])
def test_a_unet_pipeline_keeps_the_skips_on_every_stage_they_cross(bounds, described):
    """Each stage's receive buffers (one per micro-batch: its input, and its output's gradient) hold every tensor
    crossing its edges; the middle stage of three receives down1's output and passes it on."""
    desc = described["unet"]
    m, b = 2, 3
    pp = len(bounds) - 1
    pred = predict(Plan(batch=m * b, pp=pp, microbatches=m, bounds=bounds), desc, Unit(desc), FREE)
    cross = {3: H2 + TEMB + H1, 4: H2 + TEMB + H1 + H2, 5: U2_UP + TEMB + H1}
    for r in range(pp):
        edges = (cross[bounds[r]] if r else 0) + (cross[bounds[r + 1]] if r < pp - 1 else 0)
        assert pred.memory[r]["transient"] == m * b * edges, r


def test_a_two_tower_model_carries_one_tower_past_the_other(described):
    """patch, vision.0, vision.1, embed, text.0, text.1, fusion: a stage beginning inside the image tower also
    receives the token ids (40 bytes per sample) that the text tower reads; one beginning in the text tower also
    receives the image tower's output (6 x 8 f32) that the fusion block attends to."""
    desc = described["vlm"]
    names = [layer.name for layer in desc.layers]
    assert names == ["patch", "vision.0", "vision.1", "embed", "text.0", "text.1", "fusion"]
    ids, image, text = 5 * 8, 6 * 8 * FP32, 5 * 8 * FP32
    assert [layer.in_bytes for layer in desc.layers[1:]] == [image + ids, image + ids, ids + image, text + image,
                                                             text + image, text + image]
    m, b = 2, 2
    pred = predict(Plan(batch=m * b, pp=2, microbatches=m, bounds=(0, 4, 7)), desc, Unit(desc), FREE)
    assert pred.memory[1]["transient"] == m * b * (text + image)
    # each stage holds its own tower's parameters (the branch's weights stay where they run)
    module, _ = MODELS["vlm"]
    first = _nbytes(module.patch.parameters()) + _nbytes(module.vision.parameters()) + \
        _nbytes(module.embed.parameters())
    assert [mm["parameters"] for mm in pred.memory] == [first, _nbytes(module.parameters()) - first]


def test_the_carried_tensors_price_the_sends():
    """A send costs the bytes crossing the edge: with a communication model whose send is 1 s per byte and
    free compute, the U-Net cut after down2 with one micro-batch of one sample is its two sends (forward and
    backward) of 3104 bytes, not of 1056."""
    from tilestack.parallel.plan import CommModel
    module, x = MODELS["unet"]
    desc = describe_module(module, x)
    per_byte = CommModel(fits={"p2p": {2: (0.0, 1.0)}, "all_reduce": {2: (0.0, 0.0)}}, source="1 s per byte")

    class Free(Unit):
        def _times(self, layer, index, micro_batch, tp):
            return 0.0, 0.0

    pred = predict(Plan(batch=1, pp=2, microbatches=1, bounds=(0, 3, 7)), desc, Free(desc), per_byte)
    assert pred.step_s == pytest.approx(2 * (H2 + TEMB + H1))


def test_stage_times_of_an_uneven_model_add_up(described):
    """The wide layer's FLOPs are 2 x 2 x 8 x 512 per token against 2 x 8 x 8: with times proportional to FLOPs,
    the one-stage forward is the sum over the layers, and a pipeline puts the wide layer's whole time on the
    stage that holds it."""
    desc = described["uneven"]
    assert [layer.matmul_flops for layer in desc.layers] == [4 * 128.0] * 2 + [4 * 2 * 2 * 8 * 512.0] + \
        [4 * 128.0] * 2 + [4 * 2 * 8 * 2.0]
    cm = Flops(desc)
    whole = predict(Plan(batch=4), desc, cm, FIT)
    per = [cm.layer_times(i, 4, 1)[0] for i in range(len(desc.layers))]
    assert whole.stage_fwd[0] == pytest.approx(sum(per))
    pipe = predict(Plan(batch=4, pp=3, microbatches=4, bounds=(0, 2, 3, 6)), desc, cm, FIT)
    assert pipe.stage_fwd[1] == pytest.approx(cm.layer_times(2, 1, 1)[0])
