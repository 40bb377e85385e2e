"""What the planner knows about a model: a sequence of layers, each with its parameters, FLOPs, activations and
boundary tensor, per sample (one sequence of ``seq`` tokens).

    desc = describe_gpt(ModelConfig(n_layer=4, d=128, n_head=4, vocab=256, max_seq=64), seq=64)
    desc = describe_transformer(n_layer=24, d=2048, n_head=16, vocab=50304, seq=2048, dtype_bytes=2)
    desc = describe_module(nn.Sequential(...), example_input)   # any model whose top-level children run in order

A layer is the unit the pipeline cuts at. ``describe_gpt`` and ``describe_transformer`` count a GPT's layers by
formula (embeddings, ``n_layer`` blocks, final norm + head); ``describe_module`` measures an arbitrary module:
its children (or the ``layers`` given) in the order they run, each with the tensor it received, FLOPs counted by
``tilestack.perf.profile.count_ops`` and bytes saved for backward by ``tilestack.parallel.memory``.

Only layers whose kind is ``"block"`` (a transformer block laid out as ``tilestack.parallel.model.Block``) can be
tensor-parallel; the planner keeps tp = 1 for a model with other layers unless they say how they shard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tilestack.errors import TilestackError

FP32_BYTES = 4
INT64_BYTES = 8
# Per transformer block (GPT-2 layout): q, k, v, o, fc, proj weights and biases, two LayerNorms (weight, bias)
BLOCK_TENSORS = 16
# Training FLOPs are forward + backward = 3 x forward (backward computes the input and the weight gradients)
TRAIN_FLOPS_PER_FORWARD = 3
# Megatron TP per block: forward all-reduces after o_proj and mlp.proj, backward their conjugates (Shoeybi 2019)
TP_ALLREDUCES_FWD = 2
TP_ALLREDUCES_BWD = 2


class PlanError(TilestackError, ValueError):
    """A planning question that cannot be answered as asked: names the argument, what was given and expected."""


@dataclasses.dataclass(frozen=True)
class LayerDesc:
    """One layer, per sample (a sequence of ``seq`` tokens; a micro-batch of b samples costs b times this).

    params          parameter elements
    tensors         parameter tensors (the optimizer's per-tensor overhead)
    tp_params       of ``params``, those split over the tensor-parallel group (the rest are replicated)
    flops_fwd       forward FLOPs; backward is twice that
    matmul_flops    of ``flops_fwd``, those in matrix products (the rest: attention's scores and elementwise)
    act_bytes       bytes saved for backward, by recompute policy ("none", "selective", "full")
    act_tp_bytes    of act_bytes["none"] and ["selective"], the bytes that tensor parallelism divides by tp
                    without sequence parallelism (with it, all of them are divided)
    out_bytes       bytes of the layer's output (what a pipeline stage sends to the next)
    tp_comm_bytes   bytes all-reduced over the tp group per forward collective (each of TP_ALLREDUCES_FWD)
    selective_flops forward FLOPs recomputed under selective recompute (attention scores, softmax, times V)
    kind            "embed", "block", "head" or "layer" (a measured module's child)
    """

    name: str
    params: int
    tensors: int
    flops_fwd: float
    act_bytes: dict[str, float]
    out_bytes: float
    kind: str = "layer"
    tp_params: int = 0
    matmul_flops: float = 0.0
    act_tp_bytes: dict[str, float] = dataclasses.field(default_factory=dict)
    tp_comm_bytes: float = 0.0
    selective_flops: float = 0.0

    @property
    def tp_able(self) -> bool:
        return self.kind in ("embed", "block", "head")


@dataclasses.dataclass(frozen=True)
class ModelDesc:
    """A model as the planner sees it: ``layers`` in order, ``seq`` tokens per sample, ``dtype_bytes`` per
    parameter and activation element, ``n_head`` / ``d`` / ``vocab`` where tensor parallelism must divide them,
    and ``config`` (ModelConfig keywords) when it is tilestack's parallel GPT, so that a plan can run."""

    name: str
    layers: tuple[LayerDesc, ...]
    seq: int
    dtype_bytes: int = FP32_BYTES
    n_head: int | None = None
    d: int | None = None
    vocab: int | None = None
    config: dict[str, Any] | None = None

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def flops_per_sample(self) -> float:
        """Training FLOPs of one sample (forward + backward), for MFU."""
        return TRAIN_FLOPS_PER_FORWARD * sum(layer.flops_fwd for layer in self.layers)

    @property
    def tp_able(self) -> bool:
        return all(layer.tp_able for layer in self.layers)

    def tp_divides(self, tp: int) -> bool:
        """Whether ``tp`` whole heads, columns and vocabulary rows go to each tensor-parallel rank."""
        if tp == 1:
            return True
        if not self.tp_able:
            return False
        dims = [v for v in (self.n_head, self.d, self.vocab) if v is not None]
        if self.config:
            dims.append(self.config.get("max_seq", 0) or tp)
        return all(v % tp == 0 for v in dims)


def _block(s: int, h: int, a: int, e: int, i: int, flash: bool = False) -> LayerDesc:
    """A GPT-2 block of width h, a heads, at s tokens, e bytes per element (Korthikanti et al. 2022, no dropout).

    Activations (tilestack.parallel.memory, per sample): s h (32 + 2 a s / h) e / 2 bytes; selective recompute
    drops the 2 a s^2 e / 2 scores; full keeps the block's input s h e. Of the 32 s h, the LayerNorm inputs and
    the residual-stream tensors (10 s h in the paper's 16-bit count) are not split by tensor parallelism without
    sequence parallelism; the rest (the projections' outputs, 24 s h, and the scores) are. ``flash``: a fused
    attention (SDPA's flash kernel, tilestack's) keeps no scores, only its f32 log-sum-exp per row and head."""
    from tilestack.parallel.memory import korthikanti_bytes
    params = 12 * h * h + 13 * h
    matmul = 24 * s * h * h                      # q, k, v, o (4 x 2 s h^2) and the MLP (2 x 8 s h^2)
    scores = 4 * s * s * h                       # q k^T and p v, the full (s, s) product (the model masks it)
    act = {p: korthikanti_bytes(s=s, b=1, h=h, a=a, policy=p, dropout=False, bytes_per_element=e)
           for p in ("none", "selective", "full")}
    if flash:
        act["none"] = act["selective"] + a * s * FP32_BYTES
    replicated = 10 * s * h * e / 2              # not split by tp without sp (Korthikanti et al., eq. 2)
    act_tp = {p: max(act[p] - replicated, 0.0) for p in ("none", "selective")}
    return LayerDesc(name=f"layers.{i}", params=params, tensors=BLOCK_TENSORS, flops_fwd=matmul + scores,
                     act_bytes=act, out_bytes=s * h * e, kind="block", tp_params=12 * h * h + 9 * h,
                     matmul_flops=matmul, act_tp_bytes=act_tp, tp_comm_bytes=s * h * e, selective_flops=scores)


def describe_transformer(*, n_layer: int, d: int, n_head: int, vocab: int, seq: int, dtype_bytes: int = FP32_BYTES,
                         max_seq: int | None = None, name: str | None = None,
                         config: dict[str, Any] | None = None, flash: bool = False) -> ModelDesc:
    """A GPT-2 shaped decoder (learned positions, pre-LN, MLP of 4d, untied head) counted by formula; ``flash``:
    its attention is fused (keeps no scores)."""
    for arg, v in (("n_layer", n_layer), ("d", d), ("n_head", n_head), ("vocab", vocab), ("seq", seq),
                   ("dtype_bytes", dtype_bytes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PlanError(f"describe_transformer: {arg}={v!r}; expected a positive int")
    if d % n_head:
        raise PlanError(f"describe_transformer: d={d} is not divisible by n_head={n_head}; expected whole heads")
    max_seq = max_seq or seq
    s, h, e = seq, d, dtype_bytes
    # embeddings: token + position lookups; backward keeps the int64 ids (and the position ids)
    embed = LayerDesc(name="embed", params=(vocab + max_seq) * h, tensors=2, flops_fwd=float(s * h),
                      act_bytes={p: 2.0 * s * INT64_BYTES for p in ("none", "selective", "full")},
                      out_bytes=s * h * e, kind="embed", tp_params=(vocab + max_seq) * h,
                      act_tp_bytes={"none": 0.0, "selective": 0.0}, tp_comm_bytes=s * h * e)
    # final LayerNorm (input, output, per-row mean and 1/std) and the head; cross-entropy keeps its f32
    # log-softmax (s, vocab). bf16 logits are not kept: their f32 cast saves nothing for its backward, so they
    # are freed once cast (the H200's peaks, session 11: counting them over-predicted every plan by one
    # (b, s, vocab) bf16 tensor, 0.70 GiB at b=8 x 1024 tokens of GPT-2's vocabulary)
    head_act = 2 * s * h * e + 2 * s * FP32_BYTES + s * vocab * FP32_BYTES
    head = LayerDesc(name="head", params=2 * h + vocab * h, tensors=3, flops_fwd=float(2 * s * h * vocab),
                     act_bytes={p: float(head_act) for p in ("none", "selective", "full")},
                     out_bytes=float(s * vocab * e), kind="head", tp_params=vocab * h, matmul_flops=2.0 * s * h * vocab,
                     act_tp_bytes={"none": 0.0, "selective": 0.0})
    blocks = tuple(_block(s, h, n_head, e, i, flash) for i in range(n_layer))
    return ModelDesc(name=name or f"gpt-L{n_layer}-d{d}", layers=(embed, *blocks, head), seq=seq, dtype_bytes=e,
                     n_head=n_head, d=d, vocab=vocab, config=config)


def describe_gpt(cfg: Any, seq: int, *, dtype_bytes: int = FP32_BYTES, name: str | None = None) -> ModelDesc:
    """tilestack.parallel's GPT of ``cfg`` (a ModelConfig) at ``seq`` tokens: runnable by ``tilestack train``."""
    if seq > cfg.max_seq:
        raise PlanError(f"describe_gpt: seq={seq} is longer than the model's max_seq={cfg.max_seq}")
    return describe_transformer(n_layer=cfg.n_layer, d=cfg.d, n_head=cfg.n_head, vocab=cfg.vocab, seq=seq,
                                dtype_bytes=dtype_bytes, max_seq=cfg.max_seq, config=dataclasses.asdict(cfg),
                                name=name or f"gpt-L{cfg.n_layer}-d{cfg.d}", flash=cfg.attention != "math")


def _children_in_order(module: Any) -> list[tuple[str, Any]]:
    """A module's top-level children, or those of its one ModuleList / Sequential / ModuleDict, in call order."""
    from torch import nn
    kids = list(module.named_children())
    if len(kids) == 1 and isinstance(kids[0][1], nn.ModuleList | nn.Sequential | nn.ModuleDict):
        prefix, inner = kids[0]
        return [(f"{prefix}.{n}", m) for n, m in inner.named_children()]
    return kids


def describe_module(module: Any, example_input: Any, *, layers: Sequence[tuple[str, Any]] | None = None,
                    name: str | None = None) -> ModelDesc:
    """Measure a torch module whose ``layers`` (default: its children) run one after another, each on the
    previous one's output. ``example_input``: a tensor whose first dim is the batch. Per layer: parameters,
    forward FLOPs (tilestack.perf.profile.count_ops), bytes saved for backward with and without recompute
    (tilestack.parallel.memory.saved_activation_bytes; "full" keeps the layer's input) and the output bytes,
    all divided by the example's batch."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from tilestack.parallel.memory import saved_activation_bytes
    from tilestack.perf.profile import count_ops
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1 or example_input.shape[0] < 1:
        raise PlanError(f"describe_module: example_input={type(example_input).__name__}; expected a tensor whose "
                        "first dim is a batch of at least one sample")
    chain = list(layers) if layers is not None else _children_in_order(module)
    if not chain:
        raise PlanError(f"describe_module: module {type(module).__name__} has no child layers; expected the layers "
                        "to cut between (pass layers=[(name, module), ...])")
    batch = example_input.shape[0]
    seq = example_input.shape[1] if example_input.dim() > 1 else 1
    x = example_input
    out: list[LayerDesc] = []
    dtype_bytes = FP32_BYTES
    for lname, layer in chain:
        params = list(layer.parameters())
        if params:
            dtype_bytes = params[0].element_size()
        xin = x.detach().requires_grad_(x.is_floating_point())

        def run(layer=layer, xin=xin):
            return layer(xin)

        counts = count_ops(lambda run=run: run().detach())
        flops = sum(c.flops for c in counts.values())
        matmul = sum(c.flops for (op, _), c in counts.items() if "mm" in op or "linear" in op or "conv" in op)

        def loss(run=run):
            return run().float().sum()

        def loss_full(layer=layer, xin=xin):
            return checkpoint(layer, xin, use_reentrant=False).float().sum()

        saved = saved_activation_bytes(loss, params) if any(p.requires_grad for p in params) or xin.requires_grad \
            else 0
        saved_full = saved_activation_bytes(loss_full, params) if saved else 0
        with torch.no_grad():
            y = layer(x)
        per = 1.0 / batch
        out.append(LayerDesc(name=lname, params=sum(p.numel() for p in params), tensors=len(params),
                             flops_fwd=flops * per, matmul_flops=matmul * per,
                             act_bytes={"none": saved * per, "selective": saved * per, "full": saved_full * per},
                             out_bytes=y.numel() * y.element_size() * per))
        x = y
    return ModelDesc(name=name or type(module).__name__, layers=tuple(out), seq=seq, dtype_bytes=dtype_bytes)
