"""The planner on models it was not built around, round 2, and the invariants any plan must keep.

Unseen models: a decoder whose feed-forward is a top-k mixture of experts (8 experts, top-1 and top-2, one
expert never routed to), a T5-like encoder-decoder (pre-norm RMSNorm, a relative position bias computed once and
passed to every encoder block, cross-attention, the embedding tied to the head), a ViT (a patch convolution, a
class token and position table of the root's own), a MobileNet-like conv net (depthwise and pointwise
convolutions, BatchNorm), an ALBERT-like model (one block applied four times), a tied GPT-like model, a very
wide MLP, 200 layers, a model with bf16 and f32 parameters. GPT shapes by formula: heads that a tensor-parallel
degree does not divide, sequences that a sequence-parallel degree does not divide, batch 1, 1 to 64 GPUs
(6, 12, 24 among them). Checked against torch on this CPU: parameter, gradient, AdamW and buffer bytes after a
real step, saved activations. Invariants: memory grows with the batch, recompute trades time for memory, more
data parallelism never adds activations per GPU, nothing over the limit is chosen, the choice is the best
enumerated plan, the search is deterministic. Alpa's DP: 100-200 layers plan in seconds (it took 36 s for
100). Bad inputs: a PlanError naming the argument.

Found and fixed (each test below failed first):
- a weight used by two layers (tied embedding and head, a block applied twice) was counted on the first layer's
  pipeline stage only: a later stage that runs it held no copy (LayerDesc.shared, predict), nor all-reduced its
  gradients with the owner's stage; a window of layers (Alpa's stage cost) counts the copies its layers use;
- sequence parallelism was planned on sequences its degree does not divide (Plan.check, enumerate_plans);
- a module whose parameters are of several dtypes had all its bytes counted at the first parameter's size
  (LayerDesc.param_bytes);
- Alpa's DP re-predicted every layer range and ran a DP per candidate stage time (plan_stage_cost keys ranges by
  their runs of equal layers; alpa_stages bisects the candidates and runs each DP over arrays);
- plan_stage_cost dropped the samples of a batch that its micro-batch count does not divide, and took a negative
  memory limit (every stage then "did not fit");
- alpa_stages took a stage cost's NaN time as "does not fit" and a bare number as a TypeError; both now name the
  stage_cost call and what it gave.
Added: search's memory_limit may be one limit per GPU (GPUs of different memories), checked against brute force
over every placement of the pipeline ranks.
"""

import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilestack.parallel.plan import (
    CommModel,
    Plan,
    PlanError,
    RooflineCompute,
    alpa_stages,
    brute_force_stages,
    choose,
    describe_module,
    describe_transformer,
    enumerate_plans,
    h200_nccl,
    predict,
    search,
)
from tilestack.parallel.plan.compute import ComputeModel
from tilestack.parallel.plan.search import plan_stage_cost

FREE = CommModel(fits={"all_reduce": {2: (0.0, 0.0)}}, source="free")
FIT = CommModel(fits={k: {2: (2e-5, 1e-10), 8: (4e-5, 2e-10)} for k in ("all_reduce", "all_gather", "reduce_scatter",
                                                                         "p2p")}, source="test fit")
FP32, BF16 = 4, 2


class Unit(ComputeModel):
    """Every layer 1 s forward, 2 s backward, AdamW free."""

    def __init__(self, desc):
        self.desc, self.source = desc, "unit"

    def _times(self, layer, index, micro_batch, tp):
        return 1.0, 2.0

    def optimizer_s(self, params, tensors):
        return 0.0


class Flops(ComputeModel):
    """Times proportional to FLOPs per rank, with a floor per layer; AdamW by elements and tensors."""

    def __init__(self, desc):
        self.desc, self.source = desc, "flops"

    def _times(self, layer, index, micro_batch, tp):
        f = layer.flops_fwd * micro_batch / (tp if layer.tp_able else 1) * 1e-12 + 2e-6
        return f, 2 * f

    def optimizer_s(self, params, tensors):
        return params * 1e-11 + tensors * 1e-6


# ---- the models ------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class TopK(nn.Module):
    """A mixture of ``experts`` feed-forwards, each token to its ``k`` best (softmax router, weights renormed)."""

    def __init__(self, d, experts, k):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
                                     for _ in range(experts))
        self.k = k

    def forward(self, x):                                                   # (B, S, D)
        flat = x.reshape(-1, x.shape[-1])
        w, idx = self.router(flat).softmax(-1).topk(self.k, -1)              # (T, k)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for j, expert in enumerate(self.experts):
            rows, slot = (idx == j).nonzero(as_tuple=True)
            if len(rows):
                out = out.index_add(0, rows, expert(flat[rows]) * w[rows, slot, None])
        return out.reshape(x.shape)


class MoEBlock(nn.Module):
    def __init__(self, d, heads, experts, k):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.moe = TopK(d, experts, k)

    def forward(self, x):
        y = self.n1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.moe(self.n2(x))


class MoEDecoder(nn.Module):
    def __init__(self, vocab=32, d=16, heads=2, experts=8, k=2, n=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(MoEBlock(d, heads, experts, k) for _ in range(n))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class T5Block(nn.Module):
    """Pre-norm self-attention (with the position bias added to its scores), cross-attention (decoder), MLP."""

    def __init__(self, d, heads, cross):
        super().__init__()
        self.h = heads
        self.n1, self.n3 = RMSNorm(d), RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.cross = nn.MultiheadAttention(d, heads, bias=False, batch_first=True) if cross else None
        self.n2 = RMSNorm(d) if cross else None
        self.ff = nn.Sequential(nn.Linear(d, 4 * d, bias=False), nn.ReLU(), nn.Linear(4 * d, d, bias=False))

    def forward(self, x, bias, memory=None):
        b, s, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, s, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)            # bias: (H, S, S)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, d))
        if self.cross is not None:
            y = self.n2(x)
            x = x + self.cross(y, memory, memory, need_weights=False)[0]
        return x + self.ff(self.n3(x))


class T5(nn.Module):
    def __init__(self, vocab=40, d=16, heads=2, n_enc=2, n_dec=2, buckets=8):
        super().__init__()
        self.shared = nn.Embedding(vocab, d)
        self.rel = nn.Embedding(buckets, heads)                              # the relative position bias
        self.encoder = nn.ModuleList(T5Block(d, heads, False) for _ in range(n_enc))
        self.decoder = nn.ModuleList(T5Block(d, heads, True) for _ in range(n_dec))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.shared.weight
        self.buckets = buckets

    def bias(self, s):
        pos = torch.arange(s)
        return self.rel((pos[None] - pos[:, None]).clamp(0, self.buckets - 1)).permute(2, 0, 1)

    def forward(self, src, tgt):
        x = self.shared(src)
        bias = self.bias(src.shape[1])
        for blk in self.encoder:
            x = blk(x, bias)
        y = self.shared(tgt)
        causal = self.bias(tgt.shape[1]) + torch.full((tgt.shape[1],) * 2, -1e9).triu(1)
        for blk in self.decoder:
            y = blk(y, causal, x)
        return self.lm_head(y)


class ViT(nn.Module):
    def __init__(self, d=16, heads=2, patch=4, image=8, n=2, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.02)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True,
                                                               norm_first=True) for _ in range(n))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, img):                                                 # (B, 3, H, W)
        x = self.patch(img).flatten(2).transpose(1, 2)                      # (B, P, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, 0]))


def _separable(c_in, c_out, stride):
    return nn.Sequential(nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in),
                         nn.ReLU6(), nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU6())


class MobileNet(nn.Module):
    def __init__(self, classes=7):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.body = nn.Sequential(_separable(8, 16, 1), _separable(16, 16, 2), nn.Dropout(0.2))
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.body(self.stem(x)), 1).flatten(1))


class FeedForward(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Albert(nn.Module):
    """One block's weights applied ``repeat`` times (ALBERT shares them across depth)."""

    def __init__(self, vocab=30, d=16, repeat=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.block = FeedForward(d)
        self.head = nn.Linear(d, vocab)
        self.repeat = repeat

    def forward(self, ids):
        x = self.embed(ids)
        for _ in range(self.repeat):
            x = x + self.block(x)
        return self.head(x)


class TiedLM(nn.Module):
    """Embedding, four blocks, head tied to the embedding: a pipeline puts the head far from the embedding."""

    def __init__(self, vocab=64, d=16, n=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d)) for _ in range(n))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class Mixed(nn.Module):
    """A bf16 projection between f32 layers (the parameters are of two dtypes)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.mid = nn.Linear(32, 32).to(torch.bfloat16)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        return self.out(self.mid(self.inp(x).bfloat16()).float())


def _models():
    torch.manual_seed(0)
    return {
        "moe top-2": (MoEDecoder(k=2), torch.randint(0, 32, (2, 6))),
        "moe top-1": (MoEDecoder(k=1), torch.randint(0, 32, (2, 6))),
        "t5": (T5(), (torch.randint(0, 40, (2, 7)), torch.randint(0, 40, (2, 5)))),
        "vit": (ViT(), torch.randn(2, 3, 8, 8)),
        "mobilenet": (MobileNet(), torch.randn(2, 3, 12, 12)),
        "albert": (Albert(), torch.randint(0, 30, (2, 5))),
        "tied": (TiedLM(), torch.randint(0, 64, (2, 5))),
        "wide": (nn.Sequential(nn.Linear(4, 4096), nn.GELU(), nn.Linear(4096, 4)), torch.randn(3, 4)),
        "mixed dtypes": (Mixed(), torch.randn(2, 8)),
        "batch 1": (nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh()), torch.randn(1, 6)),
    }


MODELS = _models()


@pytest.fixture(scope="module")
def described():
    return {name: describe_module(m, x) for name, (m, x) in MODELS.items()}


def _args(x):
    return x if isinstance(x, tuple) else (x,)


# ---- descriptions against torch ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_describe_counts_every_parameter_once_and_leaves_the_module_as_it_was(name, described):
    module, x = MODELS[name]
    desc = described[name]
    assert desc.params == sum(p.numel() for p in module.parameters())
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
    """Parameter, gradient, AdamW moment and buffer bytes after one real AdamW step on this CPU (each tensor
    once), and the bytes autograd saved for the step's backward."""
    import copy

    from tilestack.parallel.memory import saved_activation_bytes
    from tilestack.parallel.plan.describe import _loss_of
    model = copy.deepcopy(module)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    # buffers are not activations (BatchNorm's backward takes its running statistics, which autograd then saves)
    saved = saved_activation_bytes(lambda: _loss_of(model(*_args(x))), [*model.parameters(), *model.buffers()])
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)     # noqa: E731
    moments = [v for st in opt.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
    return dict(parameters=nbytes(model.parameters()), gradients=nbytes(p.grad for p in model.parameters()
                                                                         if p.grad is not None),
                optimizer=nbytes(moments), buffers=nbytes(model.buffers()), saved=saved)


@pytest.mark.parametrize("name", [n for n in MODELS if n != "moe top-1"])
def test_one_rank_bytes_equal_a_real_adamw_step(name, described):
    """Parameters, gradients, AdamW's two moments and buffers of a one-rank plan, to the byte, against the tensors
    a real step leaves (every expert is routed some tokens here, so every parameter has a gradient); the
    activations against what autograd saved."""
    module, x = MODELS[name]
    desc = described[name]
    real = _real_step(module, x)
    batch = _args(x)[0].shape[0]
    mem = predict(Plan(batch=batch), desc, Unit(desc), FREE).memory[0]
    for part in ("parameters", "gradients", "optimizer", "buffers"):
        assert mem[part] == real[part], part
    assert mem["activations"] == pytest.approx(real["saved"], rel=1e-9)


def test_an_expert_never_routed_to_is_still_held(described):
    """Top-1 over 8 experts and 12 tokens leaves some experts without tokens: their weights are held (and counted)
    on the rank all the same; FLOPs follow the routing, so top-2 does more expert work than top-1."""
    module, x = MODELS["moe top-1"]
    flat = module.embed(x).reshape(-1, 16)
    routed = set(module.blocks[0].moe.router(module.blocks[0].n2(flat)).argmax(-1).tolist())
    assert len(routed) < 8
    one, two = described["moe top-1"], described["moe top-2"]
    assert one.params == two.params == sum(p.numel() for p in module.parameters())
    blocks = lambda d: sum(layer.flops_fwd for layer in d.layers if layer.name.startswith("blocks"))   # noqa: E731
    assert blocks(two) > blocks(one)


def test_layer_order_and_shared_calls(described):
    t5 = described["t5"]
    assert [layer.name for layer in t5.layers] == ["shared", "rel", "encoder.0", "encoder.1", "shared#2", "rel#2",
                                                   "decoder.0", "decoder.1", "lm_head"]
    assert [layer.params for layer in t5.layers if "#" in layer.name or layer.name == "lm_head"] == [0, 0, 0]
    albert = described["albert"]
    assert [layer.name for layer in albert.layers] == ["embed", "block", "block#2", "block#3", "block#4", "head"]
    assert [layer.params for layer in albert.layers][1:5] == [16 * 32 + 32 + 32 * 16 + 16, 0, 0, 0]
    assert len({layer.flops_fwd for layer in albert.layers[1:5]}) == 1 and albert.layers[4].flops_fwd > 0
    vit = described["vit"]
    assert vit.layers[0].name == "patch" and vit.layers[0].params == 16 * 3 * 16 + 16 + 16 + 5 * 16  # + cls, pos
    assert described["mobilenet"].layers[1].buffer_bytes > 0


@pytest.mark.parametrize("name, pp", [("albert", 2), ("albert", 3), ("tied", 2), ("tied", 3), ("t5", 2)])
def test_a_weight_used_on_two_stages_is_held_by_both(name, described, pp):
    """Every pipeline stage that runs a layer holds its weights, even when an earlier layer on another stage owns
    them (the tied head, the second call of a shared block): the stage's parameters, gradients and moments are
    those of the distinct tensors its layers use."""
    module, x = MODELS[name]
    desc = described[name]
    pred = predict(Plan(batch=2, pp=pp, microbatches=2), desc, Unit(desc), FREE)
    bounds = Plan(batch=2, pp=pp, microbatches=2).stage_bounds(desc)
    names = [layer.name.split("#")[0] for layer in desc.layers]
    # the tensors each stage's layers use: the layers by name (a second call, name#2, is the same module)
    by_name = dict(module.named_modules())
    for s in range(pp):
        used = {id(p): p for i in range(bounds[s], bounds[s + 1]) for p in by_name[names[i]].parameters()}
        if s == 0:                                    # the root's own parameters (none here but ViT's) go first
            used |= {id(p): p for p in module.parameters(recurse=False)}
        nbytes = sum(p.numel() * p.element_size() for p in used.values())
        assert pred.memory[s]["parameters"] == nbytes, s
        assert pred.memory[s]["gradients"] == nbytes and pred.memory[s]["optimizer"] == 2 * nbytes


@pytest.mark.parametrize("name", ["tied", "albert", "t5"])
def test_a_window_of_layers_holds_the_weights_its_layers_use(name, described):
    """Alpa's stage cost predicts a window [k, i) of the model's layers (its compute model offset by k): a window
    holds the weights its layers use, whether their owner is inside it or not."""
    from tilestack.parallel.plan.search import _Offset
    module, _ = MODELS[name]
    desc = described[name]
    by_name = dict(module.named_modules())
    for k in range(len(desc.layers)):
        for i in range(k + 1, len(desc.layers) + 1):
            sub = type(desc)(**{**desc.__dict__, "layers": desc.layers[k:i]})
            mem = predict(Plan(batch=2), sub, _Offset(Unit(desc), k), FREE).memory[0]
            used = {id(p): p for layer in sub.layers for p in by_name[layer.name.split("#")[0]].parameters()}
            if k == 0:
                used |= {id(p): p for p in module.parameters(recurse=False)}
            assert mem["parameters"] == sum(p.numel() * p.element_size() for p in used.values()), (k, i)


def test_a_tied_weight_on_two_stages_has_its_gradients_all_reduced_between_them(described):
    """Megatron's embedding group: the stage that holds the tied copy and the owner's stage all-reduce its
    gradients once a step (one all-reduce over 2 ranks of the weight's bytes); without a pipeline there is no
    copy and nothing to reduce."""
    import dataclasses
    desc = described["tied"]
    untied = dataclasses.replace(desc, layers=tuple(dataclasses.replace(layer, shared=()) for layer in desc.layers))
    weight = 64 * 16 * FP32
    for kw, extra in ((dict(pp=2, microbatches=2), FIT.time("all_reduce", weight, 2, stride=1)), (dict(), 0.0)):
        tied = predict(Plan(batch=4, **kw), desc, Unit(desc), FIT).terms["dp comm"]
        plain = predict(Plan(batch=4, **kw), untied, Unit(untied), FIT).terms["dp comm"]
        assert tied - plain == pytest.approx(extra, rel=1e-9, abs=1e-15), kw
    wide = Plan(batch=4, pp=2, dp=2, microbatches=2)           # the copy's gradients also go round dp
    assert predict(wide, desc, Unit(desc), FIT).terms["dp comm"] > \
        predict(wide, untied, Unit(untied), FIT).terms["dp comm"] + FIT.time("all_reduce", weight, 2, stride=2)


def test_mixed_dtype_parameters_are_counted_at_their_own_size(described):
    desc = described["mixed dtypes"]
    mem = predict(Plan(batch=2), desc, Unit(desc), FREE).memory[0]
    assert mem["parameters"] == (8 * 32 + 32 + 32 * 4 + 4) * FP32 + (32 * 32 + 32) * BF16


# ---- GPT shapes by formula: heads, sequences, GPU counts, batch 1 ---------------------------------------------------
@pytest.mark.parametrize("heads, d, tp, ok", [(6, 48, 4, False), (6, 48, 2, True), (6, 48, 3, True), (5, 40, 2, False),
                                              (7, 56, 7, True), (12, 96, 8, False), (3, 48, 3, True)])
def test_head_counts_a_tp_degree_does_not_divide_are_refused_by_name(heads, d, tp, ok):
    desc = describe_transformer(n_layer=2, d=d, n_head=heads, vocab=d * 7 * 8, seq=8)
    plan = Plan(batch=4, tp=tp)
    if ok:
        assert predict(plan, desc, Flops(desc), FIT).step_s > 0
    else:
        with pytest.raises(PlanError, match=f"tp={tp} does not split .*n_head={heads}"):
            predict(plan, desc, Flops(desc), FIT)
    tps = {p.tp for p in enumerate_plans(desc, tp, 4 * tp)}
    assert (tp in tps) == ok and 1 in tps


@pytest.mark.parametrize("seq, tp, ok", [(30, 4, False), (30, 2, True), (30, 3, True), (17, 2, False),
                                         (32, 4, True)])
def test_sequence_parallel_needs_a_sequence_its_degree_divides(seq, tp, ok):
    desc = describe_transformer(n_layer=2, d=48, n_head=12, vocab=96, seq=seq)
    plan = Plan(batch=4, tp=tp, sp=True)
    if ok:
        assert predict(plan, desc, Flops(desc), FIT).step_s > 0
    else:
        with pytest.raises(PlanError, match=f"sp=True with tp={tp}: seq={seq}"):
            predict(plan, desc, Flops(desc), FIT)
        assert predict(Plan(batch=4, tp=tp), desc, Flops(desc), FIT).step_s > 0      # tp alone is fine
    sp = [p for p in enumerate_plans(desc, tp, 4) if p.sp and p.tp == tp]
    assert bool(sp) == ok


GPT24 = describe_transformer(n_layer=24, d=96, n_head=12, vocab=192, seq=24)


@pytest.mark.parametrize("world", [1, 2, 3, 5, 6, 7, 12, 24, 48, 64])
def test_search_on_one_to_sixty_four_gpus(world):
    """Non-powers of two among them: every plan has that many ranks, splits the blocks and heads it claims to,
    the choice fits, and a world no layout splits (5 or 7 ranks: 24 blocks, 12 heads, batch 48 are not
    divisible by them) plans data parallelism over a batch it divides, or says why not."""
    batch = 48 if world not in (5, 7) else 35 * (world // 5 + world // 7)
    ranked = search(GPT24, Flops(GPT24), FIT, world_size=world, batch=batch, recompute=("none", "full"))
    for r in ranked[:50]:
        assert r.plan.world_size == world and batch % (r.plan.dp * r.plan.dp_shard * r.plan.microbatches) == 0
        assert 24 % r.plan.n_stages == 0 and 12 % r.plan.tp == 0
    assert choose(ranked) is ranked[0]


def test_a_model_too_big_for_a_batch_of_one_is_refused_naming_the_limit():
    desc = describe_transformer(n_layer=4, d=64, n_head=4, vocab=128, seq=16)
    ranked = search(desc, Flops(desc), FIT, world_size=4, batch=1)
    assert {(r.plan.dp, r.plan.dp_shard, r.plan.microbatches) for r in ranked} == {(1, 1, 1)}
    assert {r.plan.label() for r in ranked} >= {"pp4-gpipe-m1", "tp4", "pp2-tp2-gpipe-m1"}
    with pytest.raises(PlanError, match="no plan of world_size=32 fits batch=1"):
        search(desc, Flops(desc), FIT, world_size=32, batch=1)   # at most 4 stages x tp 4, no data to split
    with pytest.raises(PlanError, match="memory_limit=1000 bytes per rank; no plan of"):
        search(desc, Flops(desc), FIT, world_size=4, batch=1, memory_limit=1000)


def test_batch_one_of_a_module(described):
    desc = described["batch 1"]
    assert {r.plan.label() for r in search(desc, Unit(desc), FREE, world_size=2, batch=1)} == {"pp2-gpipe-m1"}
    assert [r.plan.label() for r in search(desc, Unit(desc), FREE, world_size=1, batch=1)] == ["single"]


# ---- invariants ------------------------------------------------------------------------------------------------------
INVARIANT_MODELS = ["moe top-2", "t5", "vit", "mobilenet", "albert"]
GPT8 = describe_transformer(n_layer=8, d=64, n_head=8, vocab=128, seq=32)


@pytest.mark.parametrize("kw", [dict(), dict(dp=2), dict(dp_shard=2), dict(dp=2, zero=2), dict(tp=2, sp=True),
                                dict(pp=2, microbatches=2), dict(pp=2, schedule="gpipe", microbatches=2,
                                                                  recompute="full")])
def test_memory_grows_with_the_batch(kw):
    peaks = [predict(Plan(batch=b, **kw), GPT8, Flops(GPT8), FIT) for b in (4, 8, 16, 32)]
    for a, b in zip(peaks, peaks[1:], strict=False):
        assert b.memory_bytes >= a.memory_bytes
        assert all(y["activations"] >= x["activations"] for x, y in zip(a.memory, b.memory, strict=True))
    assert peaks[-1].memory_bytes > peaks[0].memory_bytes


@pytest.mark.parametrize("name", INVARIANT_MODELS)
def test_memory_of_a_module_grows_with_the_batch(name, described):
    desc = described[name]
    for kw in (dict(), dict(dp=2), dict(pp=2, microbatches=2)):
        preds = [predict(Plan(batch=b, **kw), desc, Unit(desc), FREE) for b in (2, 4, 8)]
        peaks = [p.memory_bytes for p in preds]
        assert peaks == sorted(peaks)                   # (the gradients may be the peak: then it stays)
        acts = [p.memory[0]["activations"] for p in preds]
        assert acts[0] < acts[1] < acts[2]


@pytest.mark.parametrize("kw", [dict(), dict(dp=2), dict(tp=2), dict(tp=2, sp=True), dict(dp_shard=2),
                                dict(pp=2, microbatches=4), dict(pp=2, microbatches=4, schedule="gpipe")])
def test_recompute_lowers_memory_and_raises_time(kw):
    preds = {rc: predict(Plan(batch=8, recompute=rc, **kw), GPT8, Flops(GPT8), FIT)
             for rc in ("none", "selective", "full")}
    assert preds["full"].memory_bytes < preds["selective"].memory_bytes < preds["none"].memory_bytes
    assert preds["full"].step_s > preds["selective"].step_s > preds["none"].step_s


@pytest.mark.parametrize("desc_name", ["gpt", "vit", "moe top-2", "mobilenet"])
def test_more_data_parallelism_never_adds_activations_per_gpu(desc_name, described):
    desc = GPT8 if desc_name == "gpt" else described[desc_name]
    compute = Flops(desc) if desc_name == "gpt" else Unit(desc)
    for kind in ("dp", "dp_shard"):
        last = math.inf
        for n in (1, 2, 4, 8):
            mem = predict(Plan(batch=8, **{kind: n}), desc, compute, FIT).memory[0]["activations"]
            assert mem <= last
            last = mem


@pytest.mark.parametrize("limit_share", [1.0, 0.6, 0.35, 0.2])
def test_nothing_over_the_limit_is_chosen_and_the_choice_is_the_best_enumerated(limit_share):
    """Every plan enumerated, predicted here once more: those over the limit are not ranked, and the first ranked
    is the fastest of those under it; a tighter limit never gives a faster choice."""
    compute = Flops(GPT8)
    preds = [predict(p, GPT8, compute, FIT) for p in enumerate_plans(GPT8, 4, 16)]
    peaks = sorted(p.memory_bytes for p in preds)
    limit = peaks[0] + limit_share * (peaks[-1] - peaks[0])
    ranked = search(GPT8, compute, FIT, world_size=4, batch=16, memory_limit=limit)
    fits = [p for p in preds if p.memory_bytes <= limit]
    assert {r.plan for r in ranked} == {p.plan for p in fits}
    assert all(r.prediction.memory_bytes <= limit for r in ranked)
    assert ranked[0].step_s == min(p.step_s for p in fits)
    assert [r.step_s for r in ranked] == sorted(r.step_s for r in ranked)
    looser = search(GPT8, compute, FIT, world_size=4, batch=16, memory_limit=peaks[-1])
    assert looser[0].step_s <= ranked[0].step_s


def test_search_is_deterministic(described):
    for desc, compute in ((GPT24, Flops(GPT24)), (described["t5"], Unit(described["t5"]))):
        runs = [search(desc, compute, FIT, world_size=6, batch=12) for _ in range(2)]
        assert [(r.plan, r.step_s, r.prediction.memory_bytes) for r in runs[0]] == \
            [(r.plan, r.step_s, r.prediction.memory_bytes) for r in runs[1]]
    again = describe_module(*MODELS["vit"])
    assert again == described["vit"]


# ---- Alpa's DP: non-powers of two, memory limits, deep models -------------------------------------------------------
@pytest.mark.parametrize("n_devices, sizes", [(6, (1, 2, 4, 6)), (3, (1, 2, 3)), (5, (1, 2, 4, 5))])
def test_alpa_on_a_gpu_count_that_is_not_a_power_of_two_equals_brute_force(described, n_devices, sizes):
    desc = described["albert"]
    cost = plan_stage_cost(desc, Unit(desc), FIT, batch=8, microbatches=4, memory_limit=None)
    kw = dict(n_devices=n_devices, submeshes=sizes, microbatches=4, stage_cost=cost)
    dp = alpa_stages(len(desc.layers), **kw)
    assert dp.latency == pytest.approx(brute_force_stages(len(desc.layers), **kw).latency, rel=1e-12)
    assert sum(d for _, _, d, _ in dp.stages) == n_devices


@pytest.mark.parametrize("share", [None, 0.5, 0.3])
def test_alpa_under_memory_limits_equals_brute_force_and_fits(share):
    desc = describe_transformer(n_layer=4, d=32, n_head=4, vocab=64, seq=16)
    compute = Flops(desc)
    loose = plan_stage_cost(desc, compute, FIT, batch=8, microbatches=4, memory_limit=None)
    whole = predict(Plan(batch=2), desc, compute, FIT).memory_bytes
    limit = None if share is None else share * whole
    cost = plan_stage_cost(desc, compute, FIT, batch=8, microbatches=4, memory_limit=limit)
    kw = dict(n_devices=4, submeshes=(1, 2, 4), microbatches=4, stage_cost=cost)
    dp = alpa_stages(len(desc.layers), **kw)
    assert dp.latency == pytest.approx(brute_force_stages(len(desc.layers), **kw).latency, rel=1e-12)
    assert dp.latency >= alpa_stages(len(desc.layers), **{**kw, "stage_cost": loose}).latency


def test_alpa_ties_and_random_costs_equal_brute_force():
    """Equal stage times everywhere (every t_max a tie) and costs that are None at random: the bisection over
    t_max still finds the brute-force optimum."""
    import random
    rnd = random.Random(7)
    for trial in range(12):
        n, devices = rnd.randint(3, 6), rnd.choice([2, 3, 4, 6])
        sizes = sorted({1, rnd.randint(1, devices), devices})
        table = {}

        def cost(k, i, d, after, table=table, tie=trial % 3 == 0):
            if (k, i, d, after) not in table:
                table[k, i, d, after] = None if rnd.random() < 0.15 else (
                    (1.0 if tie else round(rnd.uniform(0.1, 2.0) * (i - k) / d, 2)), f"{k}-{i}-{d}")
            return table[k, i, d, after]

        kw = dict(n_devices=devices, submeshes=sizes, microbatches=rnd.choice([1, 2, 5]), stage_cost=cost)
        try:
            brute = brute_force_stages(n, **kw)
        except PlanError:
            with pytest.raises(PlanError, match="no split"):
                alpa_stages(n, **kw)
            continue
        assert alpa_stages(n, **kw).latency == pytest.approx(brute.latency, rel=1e-12)


@pytest.fixture(scope="module")
def deep():
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(100) for m in (nn.Linear(8, 8), nn.ReLU())])
    return describe_module(model, torch.randn(4, 8))


@pytest.mark.parametrize("n_layers, n_devices", [(100, 8), (200, 8), (200, 6)])
def test_alpa_plans_a_deep_module_in_seconds(deep, n_layers, n_devices):
    """Linear and ReLU in turn, 200 layers (100 Linear layers took 36 s before, alternating ones 46 s for 100):
    stages of about equal length, under 20 s."""
    desc = deep if n_layers == 200 else type(deep)(**{**deep.__dict__, "layers": deep.layers[:n_layers]})
    t0 = time.perf_counter()
    cost = plan_stage_cost(desc, Flops(desc), FIT, batch=16, microbatches=4, memory_limit=None)
    sizes = sorted({1 << k for k in range(n_devices.bit_length()) if 1 << k <= n_devices} | {n_devices})
    split = alpa_stages(n_layers, n_devices=n_devices, submeshes=sizes, microbatches=4, stage_cost=cost)
    assert time.perf_counter() - t0 < 20
    lengths = [i - k for k, i, _, _ in split.stages]
    assert sum(lengths) == n_layers and max(lengths) - min(lengths) <= max(2, n_layers // 20)


def test_alpa_plans_a_hundred_block_gpt_in_seconds():
    desc = describe_transformer(n_layer=100, d=64, n_head=4, vocab=128, seq=32)
    t0 = time.perf_counter()
    cost = plan_stage_cost(desc, RooflineCompute(desc, "h100-sxm", dtype="bf16"), h200_nccl(), batch=16,
                           microbatches=4, memory_limit=None, recompute=("none",))
    split = alpa_stages(len(desc.layers), n_devices=8, submeshes=(1, 2, 4, 8), microbatches=4, stage_cost=cost)
    assert time.perf_counter() - t0 < 20
    assert split.stages[0][0] == 0 and split.stages[-1][1] == 102


def test_a_very_wide_model_is_sharded_under_a_limit_and_refused_below_any_plan():
    """d = 8192, 64 heads, a 128k vocabulary, bf16 (about 4.3 billion parameters): 20 GB per GPU on 8 GPUs needs
    tensor parallelism, FSDP, ZeRO or a pipeline; 1 GB fits nothing, and the error says how much the smallest
    plan needs."""
    desc = describe_transformer(n_layer=4, d=8192, n_head=64, vocab=128000, seq=2048, dtype_bytes=2, flash=True)
    compute = RooflineCompute(desc, "h100-sxm", dtype="bf16")
    one = predict(Plan(batch=8, dp=8), desc, compute, h200_nccl())
    assert one.memory[0]["parameters"] == desc.params * BF16 and desc.params > 4e9
    ranked = search(desc, compute, h200_nccl(), world_size=8, batch=8, memory_limit=20e9, recompute=("none", "full"))
    assert all(r.prediction.memory_bytes <= 20e9 for r in ranked)
    assert all(r.plan.tp > 1 or r.plan.dp_shard > 1 or r.plan.zero or r.plan.pp > 1 for r in ranked)
    with pytest.raises(PlanError, match="memory_limit=1e\\+09 bytes per rank; no plan of .* needs"):
        search(desc, compute, h200_nccl(), world_size=8, batch=8, memory_limit=1e9, recompute=("full",))


def test_search_on_a_two_hundred_block_gpt_over_64_gpus_in_seconds():
    desc = describe_transformer(n_layer=200, d=64, n_head=4, vocab=128, seq=32)
    t0 = time.perf_counter()
    ranked = search(desc, RooflineCompute(desc, "h100-sxm", dtype="bf16"), h200_nccl(), world_size=64, batch=64,
                    recompute=("none",))
    assert time.perf_counter() - t0 < 20 and ranked[0].plan.world_size == 64


# ---- bad inputs ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, match", [
    (lambda: search(GPT8, Unit(GPT8), FREE, world_size=0, batch=4), "world_size=0"),
    (lambda: search(GPT8, Unit(GPT8), FREE, world_size=-4, batch=4), "world_size=-4"),
    (lambda: search(GPT8, Unit(GPT8), FREE, world_size=2.0, batch=4), "world_size=2.0"),
    (lambda: search(GPT8, Unit(GPT8), FREE, world_size=2, batch=-8), "batch=-8"),
    (lambda: search(GPT8, Unit(GPT8), FREE, world_size=2, batch=0), "batch=0"),
    (lambda: search(GPT8, Unit(GPT8), FREE, world_size=2, batch=4, schedules=["pipedream"]), "schedules=\\['pipe"),
    (lambda: search(GPT8, Unit(GPT8), FREE, world_size=2, batch=4, recompute=["offload"]), "recompute=\\['off"),
    (lambda: search(GPT8, Unit(GPT8), FREE, world_size=2, batch=4, recompute=[]), "recompute=\\[\\]"),
    (lambda: search(GPT8, Unit(GPT8), FREE, world_size=2, batch=4, rank_by="speed"), "rank_by='speed'"),
    (lambda: search(GPT8, Unit(GPT8), FREE, world_size=2, batch=4, memory_limit=-1), "memory_limit=-1"),
    (lambda: enumerate_plans(GPT8, 0, 4), "world_size=0"),
    (lambda: enumerate_plans(GPT8, 2, -1), "batch=-1"),
    (lambda: predict(Plan(batch=-2), GPT8, Unit(GPT8), FREE), "batch=-2"),
    (lambda: predict(Plan(batch=4, schedule="zero-bubble", pp=2, microbatches=2), GPT8, Unit(GPT8), FREE),
     "schedule='zero-bubble'"),
    (lambda: predict(Plan(batch=4, tp=-2), GPT8, Unit(GPT8), FREE), "tp=-2"),
    (lambda: alpa_stages(4, n_devices=0, submeshes=(1,), microbatches=2, stage_cost=lambda *a: (1.0, "x")),
     "n_devices=0"),
    (lambda: alpa_stages(-1, n_devices=2, submeshes=(1,), microbatches=2, stage_cost=lambda *a: (1.0, "x")),
     "n_layers=-1"),
    (lambda: alpa_stages(3, n_devices=2, submeshes=(1, 2), microbatches=2, stage_cost=lambda *a: (math.nan, "x")),
     "stage_cost\\(0, 1, 1, 0\\) gave \\(nan, 'x'\\)"),
    (lambda: alpa_stages(3, n_devices=2, submeshes=(1, 2), microbatches=2, stage_cost=lambda *a: 1.0),
     "stage_cost\\(0, 1, 1, 0\\) gave 1.0"),
    (lambda: plan_stage_cost(GPT8, Unit(GPT8), FREE, batch=-4, microbatches=2, memory_limit=None), "batch=-4"),
    (lambda: plan_stage_cost(GPT8, Unit(GPT8), FREE, batch=2, microbatches=4, memory_limit=None),
     "batch=2 in microbatches=4"),
    (lambda: plan_stage_cost(GPT8, Unit(GPT8), FREE, batch=10, microbatches=4, memory_limit=None),
     "batch=10 in microbatches=4"),
    (lambda: plan_stage_cost(GPT8, Unit(GPT8), FREE, batch=8, microbatches=4, memory_limit=-1.0),
     "memory_limit=-1.0"),
    (lambda: describe_transformer(n_layer=2, d=48, n_head=0, vocab=96, seq=8), "n_head=0"),
    (lambda: describe_transformer(n_layer=2, d=50, n_head=6, vocab=96, seq=8), "d=50 is not divisible by n_head=6"),
    (lambda: describe_module(nn.Linear(4, 4), torch.randn(0, 4)), "example_input=Tensor"),
])
def test_bad_inputs_are_refused_by_name(call, match):
    with pytest.raises(PlanError, match=match):
        call()


class FailsLate(nn.Module):
    """BatchNorm runs (moving its statistics), then the forward fails."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(self.bn(x))


def test_a_failing_forward_leaves_no_hooks_and_the_statistics_as_they_were():
    model = FailsLate()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match="FailsLate\\(example_input\\) failed"):
        describe_module(model, torch.randn(5, 4) * 3 + 1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ---- GPUs of different memories --------------------------------------------------------------------------------------
def _fits_some_placement(pred, limits):
    """Brute force: some assignment of the GPUs to the pipeline ranks (world / pp each) holds every rank's peak."""
    import itertools
    group = len(limits) // pred.plan.pp
    for order in itertools.permutations(range(len(limits))):
        if all(pred.peaks[r] <= min(limits[g] for g in order[r * group:(r + 1) * group]) for r in range(pred.plan.pp)):
            return True
    return False


@pytest.fixture(scope="module")
def uneven():
    """A model whose last layer is far heavier than the rest: pipeline ranks of very different peaks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 512))
    return describe_module(model, torch.randn(4, 8))


@pytest.mark.parametrize("shares", [(1.0, 1.0, 1.0, 1.0), (1.0, 0.5, 0.5, 0.2), (0.9, 0.3, 0.3, 0.3),
                                    (1.0, 1.0, 0.1, 0.1)])
def test_gpus_of_different_memories(uneven, shares):
    """Per-GPU limits: a plan is ranked exactly when some placement of its pipeline ranks fits (brute force over
    every assignment of the GPUs), a limit the same for every GPU is the scalar limit, and big GPUs beside small
    ones fit every plan that the small ones alone would."""
    compute = Unit(uneven)
    preds = [predict(p, uneven, compute, FREE) for p in enumerate_plans(uneven, 4, 8)]
    top = max(p.memory_bytes for p in preds)
    limits = [s * top for s in shares]
    ranked = search(uneven, compute, FREE, world_size=4, batch=8, memory_limit=limits)
    assert {r.plan for r in ranked} == {p.plan for p in preds if _fits_some_placement(p, limits)}
    smallest = [r.plan for r in search(uneven, compute, FREE, world_size=4, batch=8, memory_limit=min(limits))] \
        if any(p.memory_bytes <= min(limits) for p in preds) else []
    assert set(smallest) <= {r.plan for r in ranked}
    if len(set(shares)) == 1:
        assert [r.plan for r in ranked] == smallest
    assert len(ranked) < len(preds) or shares[-1] == 1.0


@pytest.mark.parametrize("limits, match", [([1e9] * 3, "expected 4 positive numbers"),
                                           ([1e9, math.nan, 1e9, 1e9], "nan"), ([1e9, -1, 1e9, 1e9], "-1"),
                                           (["1GB"] * 4, "'1GB'"), ([1.0] * 4, "bytes per GPU; no plan of")])
def test_bad_per_gpu_limits_are_refused_by_name(uneven, limits, match):
    with pytest.raises(PlanError, match=f"memory_limit=.*{match}"):
        search(uneven, Unit(uneven), FREE, world_size=4, batch=8, memory_limit=limits)
