"""Apply a ParallelConfig to a GPT, in one order:

    parts, stage_ids = parallelize(model, pc, mesh)

1. ``split_stages``  pipeline: cut the layers into ``pp * stages_per_rank`` stages; this rank keeps its own
                     (stage ``pp_rank + k * pp`` for k < stages_per_rank: the looped order interleaved 1F1B needs).
                     First, because every later step shards the modules a stage keeps, not the whole model.
2. ``apply_tp``      Megatron tensor parallelism (+ sequence parallelism) on each stage, over mesh["tp"].
                     Before data parallelism: FSDP2 then shards the TP-sharded DTensors along its own mesh dim
                     (2-D parameters), which is the only order FSDP2 composes with TP.
3. ``apply_recompute``  activation recompute flags on the blocks (after TP so that the recomputed region
                     replays the TP collectives; the flags do not change any parameter).
4. data parallel     FSDP2 over mesh["dp_shard"] (HSDP over mesh["dp", "dp_shard"] with dp > 1) wrapping each
                     block then the stage; or DDP over mesh["dp"] when the stage is the whole, unsharded model;
                     otherwise (dp with tp or pp, or ZeRO-1/2) the gradients are reduced by the Trainer.
                     Last, because it wraps whatever the earlier steps produced.

Tensor-parallel plan per block (Megatron-LM, Shoeybi et al. 2019; sequence parallel: Korthikanti et al. 2022):
q/k/v and mlp.fc are column-parallel (each rank computes n_head/tp whole heads, 4d/tp hidden units), o_proj and
mlp.proj row-parallel (a partial sum per rank). Without sp that is one all-reduce after o_proj and one after
mlp.proj forward, and their conjugates backward (2 + 2 per layer). With sp the LayerNorms run on a 1/tp slice of
the sequence: each all-reduce becomes a reduce-scatter (into the sequence-sharded residual stream) plus an
all-gather (before the next column-parallel matmul), the same bytes, and norm activations are stored 1/tp.
Embeddings are vocabulary-/position-parallel (row-parallel), the LM head column-parallel with replicated logits.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from tilestack.parallel.config import ParallelConfig, ParallelConfigError
from tilestack.parallel.model import GPT


def split_stages(model: GPT, pc: ParallelConfig, pp_rank: int) -> list[tuple[int, GPT]]:
    """This pipeline rank's stages as (stage index, module): copies of ``model`` keeping layers
    [s * L / S, (s + 1) * L / S) of S stages, the embeddings only on stage 0, the final norm and head only on
    stage S - 1. Parameter names stay those of the full model (``layers.5.attn.q_proj.weight``)."""
    S, L = pc.n_stages, model.cfg.n_layer
    per = L // S
    out = []
    for k in range(pc.stages_per_rank):
        s = pp_rank + k * pc.pp
        part = copy.deepcopy(model)
        for name in list(part.layers.keys()):
            if not s * per <= int(name) < (s + 1) * per:
                del part.layers[name]
        if s != 0:
            part.wte = part.wpe = None
        if s != S - 1:
            part.ln_f = part.lm_head = None
        out.append((s, part))
    return out


def apply_tp(part: GPT, tp_mesh, *, sp: bool) -> None:
    """Megatron tensor parallelism over ``tp_mesh`` (1-D), with sequence parallelism if ``sp`` (the residual stream
    between blocks is then sharded on the sequence dim 1: (B, N / tp, d) per rank)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )
    stream = Shard(1) if sp else Replicate()          # the layout of the residual stream between modules
    plan: dict[str, object] = {}
    if part.wte is not None:
        plan["wte"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
        plan["wpe"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
    for name in part.layers:
        b = f"layers.{name}"
        if sp:
            # norms on the local sequence slice; all-gather the sequence before the column-parallel matmuls
            for norm, sub in (("ln_1", "attn"), ("ln_2", "mlp")):
                plan[f"{b}.{norm}"] = SequenceParallel()
                plan[f"{b}.{sub}"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        for col in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc"):
            plan[f"{b}.{col}"] = ColwiseParallel()
        for row in ("attn.o_proj", "mlp.proj"):
            plan[f"{b}.{row}"] = RowwiseParallel(output_layouts=stream)     # all-reduce, or reduce-scatter with sp
    if part.lm_head is not None:
        if sp:
            plan["ln_f"] = SequenceParallel()
        plan["lm_head"] = ColwiseParallel(input_layouts=stream, output_layouts=Replicate())
    # SequenceParallel makes new (replicated) Parameters of the norms, which require grad: a frozen norm trained
    frozen = {name for name, p in part.named_parameters() if not p.requires_grad}
    parallelize_module(part, tp_mesh, plan)
    for name, p in part.named_parameters():
        if name in frozen:
            p.requires_grad_(False)


def apply_recompute(part: GPT, policy: str) -> None:
    """``selective``: each attention's core (scores, softmax, the product with v) runs under checkpoint, so the
    (B, H, N, N) scores and probabilities are recomputed in backward instead of stored (the 5 a s / h term of
    Korthikanti et al.); ``full``: each block keeps only its input and reruns forward in backward."""
    for block in part.layers.values():
        block.recompute = policy == "full"
        block.attn.recompute_scores = policy == "selective"


def apply_fsdp(part: GPT, dp_mesh, *, reshard_after_forward: bool = True) -> None:
    """FSDP2 (ZeRO-3): every block is its own unit (its parameters all-gathered just before use, gradients
    reduce-scattered just after), then the rest (embeddings, head) as the root. A 2-D ``dp_mesh``
    ("dp", "dp_shard") is HSDP: sharded within dp_shard, replicated across dp."""
    from torch.distributed.fsdp import fully_shard
    for block in part.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(part, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)


# the modules GPT.forward runs, every parameter under them used by every step
GPT_FORWARD_MODULES = ("wte.", "wpe.", "layers.", "ln_f.", "lm_head.")


def apply_ddp(part: nn.Module, dp_group, *, comm: str = "library") -> nn.Module:
    """torch DDP over ``dp_group`` (bucketed gradient all-reduce overlapped with backward); ``comm="ring"``
    registers tilestack's ring all-reduce as its communication hook."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    # a parameter the forward never reaches (one added to the model beside GPT's own modules) left its bucket
    # unreduced and failed the second step ("Expected to have finished reduction"): DDP then looks for unused
    # parameters after each forward (a walk of the graph, so only then; static_graph fails under no_sync)
    extra = any(not name.startswith(GPT_FORWARD_MODULES) for name, _ in part.named_parameters())
    ddp = DDP(part, process_group=dp_group, find_unused_parameters=extra)
    if comm == "ring":
        from tilestack.parallel.ring import ring_allreduce_hook
        ddp.register_comm_hook(state=dp_group, hook=ring_allreduce_hook)
    return ddp


def parallelize(model: GPT, pc: ParallelConfig, mesh) -> tuple[list[nn.Module], list[int]]:
    """Steps 1-4 of the module docstring; returns this rank's model parts (one per pipeline stage it holds; the
    whole model without a pipeline) and their stage indices."""
    pc.validate(mesh.size(), model=model.cfg)
    _check_tied(model, pc)
    pp_rank = mesh["pp"].get_local_rank()
    stages = split_stages(model, pc, pp_rank) if pc.pp > 1 else [(0, model)]
    parts: list[nn.Module] = []
    for _, part in stages:
        if pc.tp > 1:
            apply_tp(part, mesh["tp"], sp=pc.sp > 1)
        if pc.recompute != "none":
            apply_recompute(part, pc.recompute)
        if pc.dp_shard > 1:
            dp_mesh = mesh["dp", "dp_shard"] if pc.dp > 1 else mesh["dp_shard"]
            # under a pipeline each micro-batch would all-gather again: keep parameters gathered through forward
            apply_fsdp(part, dp_mesh, reshard_after_forward=pc.pp == 1)
        elif uses_ddp(pc):
            part = apply_ddp(part, mesh["dp"].get_group(), comm=pc.dp_comm)
        parts.append(part)
    return parts, [s for s, _ in stages]


def _check_tied(model: nn.Module, pc: ParallelConfig) -> None:
    """Refuse parameters tied to one tensor (``lm_head.weight = wte.weight``) under pipeline or tensor
    parallelism: the stages are copies and the TP plan shards each module's parameter on its own, so the tie was
    cut without a word and the two copies trained apart (the embedding and the head live on different stages)."""
    if pc.pp == 1 and pc.tp == 1:
        return                  # DDP, ZeRO and FSDP2 keep one tensor (and one gradient) for both names
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            raise ParallelConfigError(
                f"parallelize: {name} is tied to {first[id(param)]} (one tensor under two names) with pp={pc.pp}, "
                f"tp={pc.tp}; expected untied parameters under pipeline or tensor parallelism (each stage or shard "
                "keeps its own copy: the two would train apart), or tie them only with dp / dp_shard / zero")
        first[id(param)] = name


def uses_ddp(pc: ParallelConfig) -> bool:
    """Plain data parallelism over whole, unsharded models: torch DDP does it."""
    return pc.dp > 1 and pc.dp_shard == 1 and pc.tp == 1 and pc.pp == 1 and pc.zero == 0


def trainer_reduces_gradients(pc: ParallelConfig) -> bool:
    """dp replicas that neither DDP, FSDP2 nor ZeRO reduce: the Trainer all-reduces their gradients."""
    return pc.dp > 1 and pc.dp_shard == 1 and pc.zero == 0 and not uses_ddp(pc)


def all_reduce_gradients(params: list[torch.Tensor], group, *, comm: str = "library") -> None:
    """Average the gradients of ``params`` over ``group`` in one flat buffer (local shards of DTensors: replicas
    in a dp group hold the same shard)."""
    from tilestack.parallel.ring import ring_all_reduce
    grads = [local_grad(p) for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if comm == "ring":
        ring_all_reduce(flat, group)
    else:
        dist.all_reduce(flat, group=group)
    flat.div_(dist.get_world_size(group))
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def local_grad(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``p.grad``, laid out like this rank's shard of ``p``. DTensor autograd may leave a
    gradient in another placement than its parameter (a vocabulary-parallel embedding's comes back replicated):
    it is redistributed to the parameter's placement first, and stored back, so the returned tensor aliases
    ``p.grad``."""
    from torch.distributed.tensor import DTensor
    g = p.grad
    if not isinstance(g, DTensor):
        return g
    if tuple(g.placements) != tuple(p.placements):
        g = g.redistribute(p.device_mesh, p.placements)
        p.grad = g
    return g.to_local()
