"""The planner on models it was not built around, and bad inputs to every public entry.

Unseen models (describe_module, search, predict, the plan file, the CLI): a ResNet-like CNN with BatchNorm, an
MLP, an MoE block, a Llama-style decoder (GQA, RMSNorm, SwiGLU, rotary tables as buffers, token ids), an
encoder-decoder (two inputs, a shared embedding called twice), tied weights, children registered out of
execution order, 1 and 100 layers, batch 1, devices that are not here (the roofline of the device table). Checked
against what can be counted by hand: parameter and optimizer bytes by FSDP / ZeRO degree, an MLP's saved
activations, the bubble (p - 1) / (m + p - 1). Bad inputs: a PlanError naming the argument, the value and what
was expected, before any work."""

import dataclasses
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from tilestack import config
from tilestack.cli import _register, app
from tilestack.parallel import ModelConfig
from tilestack.parallel.plan import (
    AdaptiveBatch,
    ClusterComm,
    CommModel,
    GoodputController,
    GradientNoiseScale,
    MeasuredCompute,
    Plan,
    PlanError,
    RooflineCompute,
    accumulate_and_observe,
    alpa_stages,
    choose,
    describe_gpt,
    describe_module,
    describe_transformer,
    efficiency,
    enumerate_plans,
    h200_nccl,
    predict,
    read_plan,
    search,
    simulate,
    write_plan,
)
from tilestack.parallel.plan.comm import comm_path, fit_line, load_comm
from tilestack.parallel.plan.compute import ComputeModel
from tilestack.parallel.plan.predict import MEMORY_COMPONENTS

_register()
FREE = CommModel(fits={"all_reduce": {2: (0.0, 0.0)}}, source="free")
FP32 = 4


class Unit(ComputeModel):
    """Every layer 1 s forward, 2 s backward: the schedule's closed forms come out exactly."""

    def __init__(self, desc):
        self.desc, self.source = desc, "unit"

    def _times(self, layer, index, micro_batch, tp):
        return 1.0, 2.0

    def optimizer_s(self, params, tensors):
        return 0.0


# ---- the models ------------------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):                                                   # (B, C, H, W)
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    def __init__(self, c=4, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(ResBlock(c), ResBlock(c))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


class MoE(nn.Module):
    """Top-2 routing over 4 experts; the experts run on the rows routed to them."""

    def __init__(self, d=8, experts=4, k=2):
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
                                     for _ in range(experts))
        self.k = k

    def forward(self, x):                                                   # (B, S, D)
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        w, idx = self.router(flat).softmax(-1).topk(self.k, -1)
        out = torch.zeros_like(flat)
        for j, expert in enumerate(self.experts):
            rows, slot = (idx == j).nonzero(as_tuple=True)
            if len(rows):
                out = out.index_add(0, rows, expert(flat[rows]) * w[rows, slot, None])
        return (flat + out).reshape(b, s, d)


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class LlamaBlock(nn.Module):
    """Grouped-query attention (kv heads < heads), RMSNorm, SwiGLU; cos / sin passed in by the model."""

    def __init__(self, d, heads, kv):
        super().__init__()
        self.h, self.kv, self.hd = heads, kv, d // heads
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.q, self.o = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.k, self.v = nn.Linear(d, kv * self.hd, bias=False), nn.Linear(d, kv * self.hd, bias=False)
        self.gate, self.up = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.down = nn.Linear(2 * d, d, bias=False)

    def forward(self, x, cos, sin):
        b, s, d = x.shape
        y = self.n1(x)
        q = self.q(y).view(b, s, self.h, self.hd).transpose(1, 2)           # (B, H, S, hd)
        k = self.k(y).view(b, s, self.kv, self.hd).transpose(1, 2)          # (B, KV, S, hd)
        v = self.v(y).view(b, s, self.kv, self.hd).transpose(1, 2)
        q, k = q * cos + q.flip(-1) * sin, k * cos + k.flip(-1) * sin
        k, v = k.repeat_interleave(self.h // self.kv, 1), v.repeat_interleave(self.h // self.kv, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        x = x + self.o(a)
        y = self.n2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class Llama(nn.Module):
    def __init__(self, vocab=32, d=16, heads=4, kv=2, n=2, seq=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LlamaBlock(d, heads, kv) for _ in range(n))
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("cos", torch.randn(seq, d // heads), persistent=False)
        self.register_buffer("sin", torch.randn(seq, d // heads), persistent=False)

    def forward(self, ids):                                                 # (B, S) int64
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, self.cos[:ids.shape[1]], self.sin[:ids.shape[1]])
        return self.lm_head(self.norm(x))


class EncDec(nn.Module):
    """An encoder-decoder over (source ids, target ids); the embedding is shared by both sides."""

    def __init__(self, vocab=24, d=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 2, 32, dropout=0.1, batch_first=True), 1)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(d, 2, 32, dropout=0.1, batch_first=True), 1)
        self.out = nn.Linear(d, vocab)

    def forward(self, src, tgt):
        return self.out(self.decoder(self.embed(tgt), self.encoder(self.embed(src))))


class Tied(nn.Module):
    """The head's weight is the embedding's; a scale parameter of the root's own."""

    def __init__(self, vocab=20, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, ids):
        return self.head(self.mid(self.emb(ids)) * self.scale)


class OutOfOrder(nn.Module):
    """Children registered head first; they run stem, body, act, head."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(12, 3)
        self.body = nn.Linear(6, 12)
        self.act = nn.Tanh()
        self.stem = nn.Linear(4, 6)

    def forward(self, x):
        return self.head(self.act(self.body(self.stem(x))))


def _models():
    torch.manual_seed(0)
    return {
        "resnet": (ResNet(), torch.randn(2, 3, 6, 6)),
        "mlp": (nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)),
                torch.randn(4, 8)),
        "moe": (MoE(), torch.randn(2, 3, 8)),
        "llama": (Llama(), torch.randint(0, 32, (2, 8))),
        "encdec": (EncDec(), (torch.randint(0, 24, (2, 6)), torch.randint(0, 24, (2, 5)))),
        "tied": (Tied(), torch.randint(0, 20, (2, 5))),
        "out-of-order": (OutOfOrder(), torch.randn(4, 4)),
        "one layer": (nn.Sequential(nn.Linear(4, 2)), torch.randn(2, 4)),
        "a bare Linear": (nn.Linear(4, 2), torch.randn(2, 4)),
        "deep": (nn.Sequential(*[nn.Linear(4, 4) for _ in range(100)]), torch.randn(2, 4)),
        "batch 1": (nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)), torch.randn(1, 4)),
    }


MODELS = _models()


def _said(res, text: str) -> bool:
    """``text`` is in the command's error output, however rich's box wrapped it (box characters and white space
    removed from both)."""
    flat = "".join(re.sub("[\u2500-\u257f]", "", res.output).split())
    return res.exit_code == 2 and "".join(text.split()) in flat


@pytest.fixture(scope="module")
def described():
    return {name: describe_module(m, x) for name, (m, x) in MODELS.items()}


def _buffer_bytes(module):
    return sum(b.numel() * b.element_size() for b in module.buffers())


@pytest.mark.parametrize("name", list(MODELS))
def test_describe_counts_every_parameter_once_and_leaves_the_module_as_it_was(name, described):
    module, x = MODELS[name]
    desc = described[name]
    assert desc.params == sum(p.numel() for p in module.parameters())             # tied weights once
    assert sum(layer.tensors for layer in desc.layers) == len(list(module.parameters()))
    assert sum(layer.buffer_bytes for layer in desc.layers) == _buffer_bytes(module)
    for layer in desc.layers:
        values = [layer.flops_fwd, layer.matmul_flops, layer.out_bytes, *layer.act_bytes.values()]
        assert all(math.isfinite(v) and v >= 0 for v in values), layer
    assert desc.flops_per_sample > 0
    before = [b.clone() for b in module.buffers()]
    describe_module(module, x)                                    # BatchNorm's statistics are not moved
    assert all(torch.equal(a, b) for a, b in zip(before, module.buffers(), strict=True))


def test_layers_come_in_execution_order_and_shared_ones_once(described):
    assert [layer.name for layer in described["out-of-order"].layers] == ["stem", "body", "act", "head"]
    tied = described["tied"]
    assert [layer.params for layer in tied.layers] == [20 * 8 + 8, 8 * 8 + 8, 0]     # the root's scale: first
    enc = described["encdec"]
    # the decoder's embedding is called first (Python evaluates the decoder's arguments in order)
    assert [layer.name for layer in enc.layers] == ["embed", "embed#2", "encoder", "decoder", "out"]
    assert enc.layers[0].params == 24 * 16 and enc.layers[1].params == 0 and enc.layers[1].flops_fwd == 0
    assert [layer.name for layer in described["resnet"].layers][:4] == ["stem.0", "stem.1", "stem.2", "blocks.0"]
    assert len(described["deep"].layers) == 100 and len(described["a bare Linear"].layers) == 1
    assert [layer.name for layer in described["llama"].layers] == ["embed", "layers.0", "layers.1", "norm",
                                                                   "lm_head"]


def test_token_ids_and_buffers(described):
    llama = described["llama"]
    # the embedding saves its int64 ids for backward: 8 bytes per token
    assert llama.layers[0].act_bytes["none"] == 8 * 8
    # the rotary tables are the root's buffers: kept by the first stage, counted in its memory, not as parameters
    assert llama.layers[0].buffer_bytes == 2 * 8 * 4 * FP32
    mem = predict(Plan(batch=2, pp=2, microbatches=2), llama, Unit(llama), FREE).memory
    assert mem[0]["buffers"] == 2 * 8 * 4 * FP32 and mem[1]["buffers"] == 0
    resnet = described["resnet"]
    one = predict(Plan(batch=2), resnet, Unit(resnet), FREE)
    assert one.memory[0]["buffers"] == _buffer_bytes(MODELS["resnet"][0])


def test_an_mlps_saved_activations_by_hand(described):
    """Linear(8, 16), ReLU, Linear(16, 8), ReLU, Linear(8, 4), per sample in f32: each Linear keeps its input,
    each ReLU its output, which is the next Linear's input (one tensor, counted once)."""
    desc = described["mlp"]
    assert [layer.act_bytes["none"] for layer in desc.layers] == [8 * FP32, 16 * FP32, 0, 8 * FP32, 0]
    assert [layer.act_bytes["full"] for layer in desc.layers] == [8 * FP32, 16 * FP32, 16 * FP32, 8 * FP32, 8 * FP32]
    assert [layer.flops_fwd for layer in desc.layers][::2] == [2 * 8 * 16, 2 * 16 * 8, 2 * 8 * 4]
    assert [layer.out_bytes for layer in desc.layers] == [16 * FP32, 16 * FP32, 8 * FP32, 8 * FP32, 4 * FP32]
    mlp, x = MODELS["mlp"]
    from tilestack.parallel.memory import saved_activation_bytes
    real = saved_activation_bytes(lambda: mlp(x).sum(), list(mlp.parameters()))
    assert sum(layer.act_bytes["none"] for layer in desc.layers) * x.shape[0] == real
    pred = predict(Plan(batch=4), desc, Unit(desc), FREE)
    assert pred.memory[0]["activations"] == real


@pytest.mark.parametrize("kw, shard, zero_dp", [(dict(), 1, 0), (dict(dp_shard=2), 2, 0), (dict(dp_shard=4), 4, 0),
                                                 (dict(dp=2, zero=1), 1, 2), (dict(dp=4, zero=2), 1, 4)])
def test_parameter_and_optimizer_bytes_by_hand(described, kw, shard, zero_dp):
    desc = described["llama"]
    n = desc.params
    mem = predict(Plan(batch=4, **kw), desc, Unit(desc), FREE).memory[0]
    assert mem["parameters"] == n * FP32 / shard
    if zero_dp:                                        # f32 master copy and two moments of 1/dp
        assert mem["optimizer"] == pytest.approx(3 * FP32 * n / zero_dp)
    else:                                              # AdamW's two moments of the rank's shard
        assert mem["optimizer"] == 2 * FP32 * n / shard
        assert mem["gradients"] == n * FP32 / shard


def test_frozen_parameters_have_no_gradients_or_optimizer_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8).requires_grad_(False), nn.GELU(), nn.Linear(8, 2))
    desc = describe_module(model, torch.randn(2, 4))
    trained = 8 * 2 + 2
    assert desc.params == 4 * 8 + 8 + trained and desc.layers[0].frozen == 4 * 8 + 8
    for kw, opt in ((dict(), 2 * FP32 * trained), (dict(dp=2, zero=1), 3 * FP32 * trained / 2)):
        mem = predict(Plan(batch=2, **kw), desc, Unit(desc), FREE).memory[0]
        assert mem["parameters"] == desc.params * FP32
        assert mem["gradients"] == trained * FP32 and mem["optimizer"] == opt


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m", [(2, 2), (4, 4), (4, 8), (5, 5)])
def test_bubble_of_an_unseen_deep_model(described, schedule, p, m):
    desc = described["deep"]                                # 100 equal layers: equal stages for p = 2, 4, 5
    pred = predict(Plan(batch=m, pp=p, microbatches=m, schedule=schedule), desc, Unit(desc), FREE)
    assert pred.sim.bubble == pytest.approx((p - 1) / (m + p - 1))
    per_stage = 100 // p * 3.0
    assert pred.sim.makespan == pytest.approx((m + p - 1) * per_stage)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("device", ["a100-sxm-80gb", "h100-sxm"])
def test_search_on_a_device_not_here(name, described, device):
    desc = described[name]
    compute = RooflineCompute(desc, device, dtype="bf16")
    batch = MODELS[name][1][0].shape[0] if isinstance(MODELS[name][1], tuple) else MODELS[name][1].shape[0]
    ranked = search(desc, compute, h200_nccl(), world_size=2, batch=max(batch, 2))
    assert ranked and all(r.plan.tp == 1 for r in ranked)              # no known tensor-parallel layout
    for r in ranked:
        p = r.prediction
        assert math.isfinite(p.step_s) and p.step_s > 0
        assert sum(p.terms.values()) == pytest.approx(p.step_s)
        for rank, (mem, peak) in enumerate(zip(p.memory, p.peaks, strict=True)):
            _, parts = p.at_peak(rank)
            assert sum(parts.values()) == pytest.approx(peak) and min(parts.values()) >= 0
            assert all(math.isfinite(mem[c]) and mem[c] >= 0 for c in MEMORY_COMPONENTS)
            always = mem["parameters"] + mem["buffers"] + mem["optimizer"]
            assert peak >= always + max(mem["activations"], mem["gradients"]) - 1e-6
            assert peak <= always + sum(v for k, v in mem.items() if k not in ("parameters", "buffers", "optimizer")
                                        ) + 1e-6
    assert not choose(ranked).prediction.runnable                        # tilestack train runs its GPT only


def test_batch_one_and_one_rank(described):
    desc = described["batch 1"]
    ranked = search(desc, Unit(desc), FREE, world_size=1, batch=1)
    assert [r.plan.label() for r in ranked] == ["single"]
    pp = search(desc, Unit(desc), FREE, world_size=3, batch=1)            # 3 layers, one per stage
    assert {r.plan.label() for r in pp} == {"pp3-gpipe-m1"}
    with pytest.raises(PlanError, match="no plan of world_size=4 fits batch=1"):
        search(desc, Unit(desc), FREE, world_size=4, batch=1)


def test_plans_that_cannot_divide_are_refused_with_reasons(described):
    gpt = describe_transformer(n_layer=4, d=24, n_head=6, vocab=48, seq=8)
    with pytest.raises(PlanError, match="tp=4 does not split model 'gpt-L4-d24' \\(n_head=6, d=24, vocab=48\\)"):
        predict(Plan(batch=4, tp=4), gpt, Unit(gpt), FREE)
    with pytest.raises(PlanError, match="8 pipeline stages do not divide the model's 4 blocks"):
        predict(Plan(batch=8, pp=8, microbatches=8), gpt, Unit(gpt), FREE)
    one = described["one layer"]
    with pytest.raises(PlanError, match="2 pipeline stages for 1 layers"):
        predict(Plan(batch=2, pp=2, microbatches=2), one, Unit(one), FREE)
    with pytest.raises(PlanError, match="tp=2 does not split .* no tensor-parallel layout"):
        predict(Plan(batch=2, tp=2), described["llama"], Unit(described["llama"]), FREE)
    assert all(p.pp == 1 for p in enumerate_plans(one, 2, 4))


def test_plan_file_round_trips(tmp_path, described):
    desc = describe_gpt(ModelConfig(n_layer=2, d=16, n_head=2, vocab=32, max_seq=8), 8)
    ranked = search(desc, RooflineCompute(desc, "h200"), h200_nccl(), world_size=2, batch=4)
    best = choose(ranked)
    spec = read_plan(write_plan(best.prediction, desc, tmp_path / "plan.json", device="h200"))
    assert spec["nproc"] == 2 and spec["parallel"] == best.plan.parallel_kwargs() and spec["model"] == desc.config
    assert spec["predicted"]["step_s"] == pytest.approx(best.step_s)
    assert spec["predicted"]["memory_bytes"] == pytest.approx(best.prediction.memory_bytes)
    assert sum(spec["predicted"]["memory_at_peak"].values()) == pytest.approx(best.prediction.memory_bytes)
    for r in ranked:                                     # a GPT's components at its peak add up too, every rank
        for rank, peak in enumerate(r.prediction.peaks):
            moment, parts = r.prediction.at_peak(rank)
            assert sum(parts.values()) == pytest.approx(peak), (r.plan.label(), moment)
    with pytest.raises(PlanError, match="rank=5"):
        best.prediction.at_peak(5)
    for kw, match in ((dict(peak_flops=math.nan), "peak_flops=nan"), (dict(device=None), "device=None")):
        with pytest.raises(PlanError, match=match):
            write_plan(best.prediction, desc, tmp_path / "bad.json", **kw)
    with pytest.raises(PlanError, match="path="):
        write_plan(best.prediction, desc, tmp_path)
    with pytest.raises(PlanError, match="pred=Ranked"):
        write_plan(best, desc, tmp_path / "p.json")
    # a module's plan is written, but tilestack train refuses it by name
    llama = described["llama"]
    path = write_plan(choose(search(llama, Unit(llama), FREE, world_size=2, batch=2)).prediction, llama,
                      tmp_path / "llama.json")
    with pytest.raises(PlanError, match="not tilestack's parallel GPT"):
        read_plan(path)


def _edited(tmp_path, spec, **changes):
    path = tmp_path / "edited.json"
    path.write_text(json.dumps({**spec, **changes}))
    return path


@pytest.fixture(scope="module")
def good_spec(tmp_path_factory):
    desc = describe_gpt(ModelConfig(n_layer=2, d=16, n_head=2, vocab=32, max_seq=8), 8)
    pred = predict(Plan(batch=4, dp=2), desc, Unit(desc), FREE)
    path = write_plan(pred, desc, tmp_path_factory.mktemp("plan") / "plan.json")
    return json.loads(path.read_text())


@pytest.mark.parametrize("changes, match", [
    (dict(nproc=0), "nproc=0; expected a positive int"),
    (dict(nproc="2"), "nproc='2'"),
    (dict(batch=3), "batch"),
    (dict(seq=-1), "seq=-1"),
    (dict(seq=99), "seq"),
    (dict(dtype="float16"), "dtype='float16'"),
    (dict(nproc=4), "expected the world size 4"),
    (dict(model={"n_layer": 2, "d": 16, "n_head": 3, "vocab": 32, "max_seq": 8}), "whole heads"),
    (dict(model={"n_layer": 2, "width": 16}), "model has \\['width'\\]"),
    (dict(model={"n_layer": 0}), "model.n_layer=0"),
    (dict(model={"n_layer": 2, "attention": "flash9"}), "model.attention='flash9'"),
    (dict(parallel={"dp": 2, "warp": 1}), "parallel has \\['warp'\\]"),
    (dict(parallel={"dp": 2, "zero": 3}), "zero=3"),
    (dict(parallel="dp2"), "parallel has str"),
])
def test_train_plan_file_fields_are_checked(tmp_path, good_spec, changes, match):
    path = _edited(tmp_path, good_spec, **changes)
    with pytest.raises(PlanError, match=match):
        read_plan(path)
    res = CliRunner().invoke(app, ["train", "--plan", str(path), "--steps", "2"])
    assert _said(res, "edited.json"), res.output


def test_read_plan_refuses_other_files(tmp_path, good_spec):
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    for path, match in ((tmp_path, "is a folder"), (tmp_path / "none.json", "does not exist"),
                        (tmp_path / "bin.json", "is not JSON"),
                        (_edited(tmp_path, good_spec, format="tilestack-plan/0"), "format='tilestack-plan/0'")):
        with pytest.raises(PlanError, match=match):
            read_plan(path)
    with pytest.raises(PlanError, match="path=None"):
        read_plan(None)
    spec = dict(good_spec)
    del spec["seq"]
    with pytest.raises(PlanError, match="lacks \\['seq'\\]"):
        read_plan(_edited(tmp_path, spec))


# ---- bad inputs ------------------------------------------------------------------------------------------------------
GPT = describe_transformer(n_layer=2, d=16, n_head=2, vocab=32, seq=8)


@pytest.mark.parametrize("kw, match", [
    (dict(batch=0), "batch=0"), (dict(batch=4, pp=0), "pp=0"), (dict(batch=4, dp=2.0), "dp=2.0"),
    (dict(batch=4, tp=True), "tp=True"), (dict(batch=4, schedule="zb"), "schedule='zb'"),
    (dict(batch=4, recompute="half"), "recompute='half'"), (dict(batch=4, zero=3), "zero=3"),
    (dict(batch=4, dp=2, zero=1.0), "zero=1.0"), (dict(batch=4, zero=1), "zero=1 with dp=1"),
    (dict(batch=4, sp="yes"), "sp='yes'"), (dict(batch=4, pp=2, stages_per_rank=2, microbatches=2),
                                            "stages_per_rank=2"),
    (dict(batch=4, microbatches=2), "microbatches=2 without a pipeline"),
    (dict(batch=3, dp=2), "batch=3 is not divisible"), (dict(batch=4, pp=2, microbatches=2, bounds=(0, 1.5, 4)),
                                                        "bounds=\\(0, 1.5, 4\\)"),
    (dict(batch=4, pp=2, microbatches=2, bounds=(0, 3, 2, 4)), "bounds"),
])
def test_bad_plans_are_refused_by_name(kw, match):
    with pytest.raises(PlanError, match=match):
        predict(Plan(**kw), GPT, Unit(GPT), FREE)


def test_predict_and_search_refuse_bad_arguments():
    unit = Unit(GPT)
    other = describe_transformer(n_layer=3, d=16, n_head=2, vocab=32, seq=8)
    for call, match in [
        (lambda: predict("dp2", GPT, unit, FREE), "plan=str"),
        (lambda: predict(Plan(batch=4), {"layers": []}, unit, FREE), "desc=dict"),
        (lambda: predict(Plan(batch=4), GPT, None, FREE), "compute=NoneType"),
        (lambda: predict(Plan(batch=4), GPT, unit, "nccl"), "comm=str"),
        (lambda: predict(Plan(batch=4), GPT, unit, FREE, overlap_dp=1.5), "overlap_dp=1.5"),
        (lambda: predict(Plan(batch=4), other, unit, FREE), "compute was built for model"),
        (lambda: search(GPT, unit, FREE, world_size=2, batch=[]), "batch=\\[\\]"),
        (lambda: search(GPT, unit, FREE, world_size=2, batch=4.0), "batch=4.0"),
        (lambda: search(GPT, unit, FREE, world_size=2, batch=[4, -8]), "batch=-8"),
        (lambda: search(GPT, unit, FREE, world_size=2, batch=4, memory_limit="64MiB"), "memory_limit='64MiB'"),
        (lambda: search(GPT, unit, FREE, world_size=2, batch=4, memory_limit=float("nan")), "memory_limit=nan"),
        (lambda: search(GPT, unit, FREE, world_size=0, batch=4), "world_size=0"),
        (lambda: search(GPT, unit, FREE, world_size=2, batch=4, rank_by="goodput"), "efficiency=None"),
        (lambda: search(GPT, unit, FREE, world_size=2, batch=4, rank_by="goodput", efficiency=lambda m: math.nan),
         "efficiency\\(4\\)=nan"),
        (lambda: search(GPT, unit, FREE, world_size=2, batch=4, schedules=["zero-bubble"]), "schedules="),
        (lambda: search(GPT, unit, FREE, world_size=2, batch=4, recompute=["some"]), "recompute="),
        (lambda: search(GPT, unit, FREE, world_size=2, batch=4, max_microbatches=0), "max_microbatches=0"),
        (lambda: search(GPT, unit, FREE, world_size=2, batch=4, memory_limit=1.0), "memory_limit=1 bytes"),
        (lambda: enumerate_plans("gpt", 2, 4), "desc=str"),
        (lambda: choose([]), "choose: ranked="),
        (lambda: alpa_stages(4, n_devices=2, submeshes=(1, 2), microbatches=0, stage_cost=lambda *a: (1.0, "x")),
         "microbatches=0"),
        (lambda: alpa_stages(4, n_devices=2, submeshes=(3,), microbatches=2, stage_cost=lambda *a: (1.0, "x")),
         "submeshes=\\[3\\]"),
        (lambda: alpa_stages(4, n_devices=2, submeshes=(1,), microbatches=2, stage_cost=None), "stage_cost=None"),
        (lambda: simulate("1f1b", pp=2, stages_per_rank=1, microbatches=2, fwd=[1, math.nan], bwd=[2, 2]),
         "fwd=\\[1, nan\\]"),
        (lambda: simulate("1f1b", pp=0, stages_per_rank=1, microbatches=2, fwd=[], bwd=[]), "pp=0"),
    ]:
        with pytest.raises(PlanError, match=match):
            call()


class NaNCompute(Unit):
    def _times(self, layer, index, micro_batch, tp):
        return math.nan, 2.0


def test_a_compute_model_that_returns_nan_is_named_not_ranked():
    with pytest.raises(PlanError, match="gave layer 'embed' forward nan s"):
        predict(Plan(batch=4), GPT, NaNCompute(GPT), FREE)


def test_describe_refuses_bad_inputs():
    mlp, x = MODELS["mlp"]
    for call, match in [
        (lambda: describe_module("mlp", x), "module=str"),
        (lambda: describe_module(mlp, [x]), "example_input=list"),
        (lambda: describe_module(mlp, torch.tensor(1.0)), "example_input=Tensor"),
        (lambda: describe_module(mlp, torch.empty(0, 8)), "example_input=Tensor"),
        (lambda: describe_module(mlp, (x, "mask")), "example_input=tuple of str"),
        (lambda: describe_module(mlp, (x, torch.randn(3, 8))), "batch sizes \\[4, 3\\]"),
        (lambda: describe_module(mlp, torch.full((4, 8), math.nan)), "NaN or inf"),
        (lambda: describe_module(mlp, torch.randn(4, 5)), "failed \\(RuntimeError"),
        (lambda: describe_module(mlp, x, layers=[]), "layers=\\[\\]"),
        (lambda: describe_module(mlp, x, layers=[("a", mlp[0]), ("a", mlp[1])]), "distinct string names"),
        (lambda: describe_module(mlp, x, layers=[("a", "linear")]), "layers="),
        (lambda: describe_module(mlp, x, layers=[("other", nn.Linear(8, 8))]), "none of the layers"),
        (lambda: describe_transformer(n_layer=2, d=16, n_head=2, vocab=32, seq=8, max_seq=4), "max_seq=4"),
        (lambda: describe_transformer(n_layer=2, d=16, n_head=3, vocab=32, seq=8), "whole heads"),
        (lambda: describe_gpt({"n_layer": 2}, 8), "cfg=dict"),
        (lambda: describe_gpt(ModelConfig(), 0), "seq=0"),
        (lambda: RooflineCompute(GPT, None), "device=None"),
        (lambda: RooflineCompute(GPT, "tpu-v9"), "device='tpu-v9'"),
        (lambda: RooflineCompute(GPT, "h100-sxm", dtype="fp3"), "no published fp3 peak"),
        (lambda: RooflineCompute(GPT, "h100-sxm", matmul_efficiency=1.5), "matmul_efficiency=1.5"),
        (lambda: MeasuredCompute.for_module(GPT, mlp, x), "are not layers of module"),
        (lambda: MeasuredCompute.for_gpt(dataclasses.replace(describe_gpt(ModelConfig(), 8), dtype_bytes=1)),
         "dtype_bytes=1"),
    ]:
        with pytest.raises(PlanError, match=match):
            call()


def test_measured_compute_times_an_unseen_module():
    """The recorded calls, repeated to the micro-batch: a layer with extra arguments (the Llama block's cos, sin),
    an in-place ReLU, BatchNorm; times positive and finite, the module's buffers as they were."""
    for name in ("llama", "resnet"):
        module, x = MODELS[name]
        desc = describe_module(module, x)
        before = [b.clone() for b in module.buffers()]
        cm = MeasuredCompute.for_module(desc, module, x)
        for i in (0, 1, len(desc.layers) - 1):
            f, b = cm.layer_times(i, 3)
            assert 0 < f < 1 and 0 <= b < 1
        assert all(torch.equal(a, b) for a, b in zip(before, module.buffers(), strict=True))


def test_comm_models_refuse_bad_inputs(tmp_path):
    for call, match in [
        (lambda: FREE.time("all_reduce", math.nan, 2), "nbytes=nan"),
        (lambda: FREE.time("all_reduce", 16, 0), "n=0"),
        (lambda: FREE.time("broadcast", 16, 2), "kind='broadcast'"),
        (lambda: CommModel(fits={}, source="x"), "fits="),
        (lambda: CommModel(fits={"all_reduce": {2: (math.inf, 0.0)}}, source="x"), "fits\\['all_reduce'\\]\\[2\\]"),
        (lambda: CommModel(fits={"allreduce": {2: (0.0, 0.0)}}, source="x"), "fits\\['allreduce'\\]"),
        (lambda: ClusterComm(fits={}, source="x", intra=None), "intra=None"),
        (lambda: fit_line([1, 2], [0.0, 1.0]), "positive, finite times"),
        (lambda: fit_line([1, 2, 3], [1.0, 2.0]), "3 sizes and 2 times"),
        (lambda: load_comm("../etc"), "name='../etc'"),
    ]:
        with pytest.raises(PlanError, match=match):
            call()
    with config.override(cache_dir=tmp_path):
        path = comm_path("broken")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{not json")
        with pytest.raises(PlanError, match="comm-broken.json' is not readable"):
            load_comm("broken")


def test_goodput_refuses_empty_nan_and_inf_statistics():
    gns = GradientNoiseScale()
    g = torch.randn(16)
    for call, match in [
        (lambda: gns.observe([], 4), "0 micro-batch gradients"),
        (lambda: gns.observe(torch.randn(2, 16), 4), "micro_grads=Tensor"),
        (lambda: gns.observe([g, g.clone().fill_(math.nan)], 4), "NaN or inf"),
        (lambda: gns.observe([g, torch.full((16,), math.inf)], 4), "NaN or inf"),
        (lambda: gns.observe([g, torch.randn(8)], 4), "one shape"),
        (lambda: gns.observe([torch.empty(0), torch.empty(0)], 4), "non-empty"),
        (lambda: gns.observe([g, g], 0), "micro_batch=0"),
        (lambda: gns.update(math.nan, 1.0, 2, 4), "small_sq=nan"),
        (lambda: gns.update(1.0, math.inf, 2, 4), "big_sq=inf"),
        (lambda: gns.update(1.0, 1.0, 4, 2), "small=4, big=2"),
        (lambda: GradientNoiseScale(ema=1.0), "ema=1.0"),
        (lambda: efficiency(math.nan, 10.0, 8), "batch=nan"),
        (lambda: efficiency(16, 10.0, math.inf), "base_batch=inf"),
        (lambda: efficiency(16, -1.0, 8), "phi=-1.0"),
        (lambda: efficiency(16, "10", 8), "phi='10'"),
        (lambda: AdaptiveBatch([8, 16], lambda m: math.nan, 8).choose(10.0), "samples_per_s gave"),
        (lambda: AdaptiveBatch([8, 16], lambda m: 1.0, 8).choose(-3.0), "phi=-3.0"),
        (lambda: GoodputController(candidates=[8, math.nan], step_s={8: 0.1}, base_batch=8, base_lr=1e-3),
         "candidates="),
        (lambda: GoodputController(candidates=[8], step_s={8: math.inf}, base_batch=8, base_lr=1e-3), "step_s"),
        (lambda: GoodputController(candidates=[8], step_s={8: 0.1}, probe_s={8: math.nan}, base_batch=8,
                                   base_lr=1e-3), "probe_s="),
        (lambda: GoodputController(candidates=[8], step_s={8: 0.1}, base_batch=8, base_lr=math.inf), "base_lr=inf"),
        (lambda: accumulate_and_observe(nn.Linear(2, 1), F.mse_loss, torch.randn(4, 2), torch.randn(4, 1),
                                        micro_batches=3), "micro_batches=3"),
    ]:
        with pytest.raises(PlanError, match=match):
            call()
    assert gns.grad_sq is None and gns.history == []                        # nothing bad got into the averages
    assert efficiency(16, math.inf, 8) == 1.0


# ---- the CLI ---------------------------------------------------------------------------------------------------------
GPT_ARGS = ["--layers", "2", "--d", "32", "--heads", "4", "--vocab", "64", "--seq", "16"]
TARGET = '''
import torch
from torch import nn


class Net(nn.Module):
    """Children registered out of order, a tied head, token ids."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 40, bias=False)
        self.emb = nn.Embedding(40, 16)
        self.body = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.body(self.emb(ids)))


def build():
    torch.manual_seed(0)
    return Net(), torch.randint(0, 40, (4, 6))
'''


@pytest.mark.parametrize("device", ["cpu", "a100-sxm-80gb"])
def test_cli_plans_an_unseen_module(tmp_path, device):
    script = tmp_path / "net.py"
    script.write_text(TARGET)
    out = tmp_path / "plan.json"
    fit = CommModel(fits={k: {2: (3e-4, 1e-9)} for k in ("all_reduce", "all_gather", "reduce_scatter", "p2p")},
                    source="test fit")
    with config.override(cache_dir=tmp_path):
        path = comm_path("gloo-cpu")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fit.to_json()))
        res = CliRunner().invoke(app, ["plan", "--nproc", "2", "--target", f"{script}:build", "--batch", "4",
                                       "--device", device, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "not runnable by tilestack train" in res.output
    spec = json.loads(out.read_text())
    assert spec["model"] is None and spec["predicted"]["step_s"] > 0
    assert spec["model_name"].endswith("net.py:build")


@pytest.mark.parametrize("args, match", [
    ([*GPT_ARGS, "--rank-by", "goodput", "--noise-scale", "nan"], "--noise-scale nan"),
    ([*GPT_ARGS, "--rank-by", "goodput", "--noise-scale", "inf"], "--noise-scale inf"),
    ([*GPT_ARGS, "--rank-by", "goodput", "--noise-scale", "4", "--base-batch", "-2"], "--base-batch -2"),
    ([*GPT_ARGS, "--comm", "nosuch"], "--comm 'nosuch'"),
    ([*GPT_ARGS, "--device", "h100-sxm", "--measure", "2"], "--measure 2 with --device h100-sxm"),
    ([*GPT_ARGS, "--memory-limit", "nan"], "--memory-limit 'nan'"),
    ([*GPT_ARGS, "--batch", ""], "--batch ''"),
    ([*GPT_ARGS, "--batch", "0,4"], "--batch '0,4'"),
    ([*GPT_ARGS, "--dtype", "float16"], "--dtype 'float16'"),
    (["--layers", "-1", "--d", "32", "--heads", "4", "--vocab", "64"], "n_layer=-1"),
    ([*GPT_ARGS, "--heads", "3"], "--heads 3"),
    (["--layers", "3", "--d", "32", "--heads", "1", "--vocab", "64", "--batch", "3"],
     "no plan of world_size=2 fits batch=3"),
])
def test_cli_refuses_bad_options_before_any_measurement(tmp_path, args, match):
    with config.override(cache_dir=tmp_path):
        res = CliRunner().invoke(app, ["plan", "--nproc", "2", *args])
        assert _said(res, match), res.output
        assert not comm_path("gloo-cpu").exists()


def test_cli_refuses_output_paths_it_cannot_write_before_measuring(tmp_path):
    (tmp_path / "afile").write_text("")
    with config.override(cache_dir=tmp_path / "cache"):
        for args, match in ((["--out", str(tmp_path)], "is a directory"),
                            (["--figures", str(tmp_path / "afile")], "is a file")):
            res = CliRunner().invoke(app, ["plan", "--nproc", "2", *GPT_ARGS, *args])
            assert _said(res, match), res.output
            assert not comm_path("gloo-cpu").exists()
