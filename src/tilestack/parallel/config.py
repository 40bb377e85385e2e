"""The parallel configuration: degrees, checked against the world size and the model, and the device mesh.

    pc = ParallelConfig(dp=2, tp=2, sp=2, recompute="selective")
    pc.validate(world_size=4, model=TINY, batch=8, seq=16)   # ParallelConfigError naming the bad degree
    mesh = pc.build_mesh("cpu")                              # dims ("pp", "dp", "dp_shard", "tp"), sizes (1, 2, 1, 2)

The mesh always has the four dimensions, size 1 where a parallelism is off, ordered outermost first:
pipeline stages, replicated data parallel, sharded data parallel (FSDP2), tensor parallel. Tensor parallelism is
innermost because it talks on every layer (neighbouring ranks: one NVLink domain); pipeline parallelism is
outermost because it sends one activation per micro-batch and stage (it tolerates the slowest links).
Sequence parallelism is Megatron's: it runs on the tensor-parallel group, so ``sp`` is 1 (off) or ``tp``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tilestack.errors import TilestackError

PP_SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
RECOMPUTE = ("none", "selective", "full")
ZERO_STAGES = (0, 1, 2)
DP_COMMS = ("library", "ring")
MESH_DIMS = ("pp", "dp", "dp_shard", "tp")


class ParallelConfigError(TilestackError, ValueError):
    """Parallel degrees that do not fit the world size, the model or the batch."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How one training step is spread over ``world_size`` ranks.

    dp        replicated data parallel (DDP, or ZeRO-1/2 with ``zero``): each replica holds the whole model
    dp_shard  fully sharded data parallel (FSDP2, ZeRO-3): parameters, gradients, optimizer state sharded
    tp        Megatron tensor parallel: column-parallel QKV / MLP-up, row-parallel out-proj / MLP-down
    sp        Megatron sequence parallel on the tp group (1: off, or equal to tp)
    pp        pipeline stages; ``pp_schedule`` gpipe, 1f1b or interleaved-1f1b (with ``stages_per_rank`` >= 2)
    microbatches     micro-batches per step for the pipeline (1 without one)
    recompute        none, selective (attention scores recomputed in backward) or full (whole blocks)
    zero             0, 1 (optimizer state sharded over dp) or 2 (and gradients); needs dp > 1
    dp_comm          library (dist.all_reduce) or ring (tilestack's ring all-reduce) for dp gradients
    """

    dp: int = 1
    dp_shard: int = 1
    tp: int = 1
    sp: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"
    stages_per_rank: int = 1
    microbatches: int = 1
    recompute: str = "none"
    zero: int = 0
    dp_comm: str = "library"

    def __post_init__(self) -> None:
        for name in ("dp", "dp_shard", "tp", "sp", "pp", "stages_per_rank", "microbatches"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ParallelConfigError(f"ParallelConfig: {name}={v!r}; expected a positive int")
        if self.sp not in (1, self.tp):
            raise ParallelConfigError(
                f"ParallelConfig: sp={self.sp} with tp={self.tp}; expected sp=1 (off) or sp=tp (Megatron sequence "
                "parallelism shards the sequence over the tensor-parallel group)")
        if self.pp_schedule not in PP_SCHEDULES:
            raise ParallelConfigError(f"ParallelConfig: pp_schedule={self.pp_schedule!r}; "
                                      f"expected one of {PP_SCHEDULES}")
        if self.recompute not in RECOMPUTE:
            raise ParallelConfigError(f"ParallelConfig: recompute={self.recompute!r}; expected one of {RECOMPUTE}")
        if self.dp_comm not in DP_COMMS:
            raise ParallelConfigError(f"ParallelConfig: dp_comm={self.dp_comm!r}; expected one of {DP_COMMS}")
        # (type first: True and 1.0 compare equal to 1 and were taken for ZeRO-1)
        if isinstance(self.zero, bool) or not isinstance(self.zero, int) or self.zero not in ZERO_STAGES:
            hint = " (ZeRO-3 is dp_shard > 1: FSDP2)" if self.zero == 3 else ""
            raise ParallelConfigError(f"ParallelConfig: zero={self.zero!r}; expected one of {ZERO_STAGES}{hint}")
        if self.zero and self.dp == 1:
            raise ParallelConfigError(f"ParallelConfig: zero={self.zero} shards over the dp group; expected dp > 1, "
                                      f"got dp={self.dp}")
        if self.zero and self.dp_shard > 1:
            raise ParallelConfigError(f"ParallelConfig: zero={self.zero} with dp_shard={self.dp_shard}; FSDP2 already "
                                      "shards optimizer state and gradients: expected one of them")
        interleaved = self.pp_schedule == "interleaved-1f1b"
        if self.pp > 1 and interleaved and self.stages_per_rank < 2:
            raise ParallelConfigError(f"ParallelConfig: pp_schedule='interleaved-1f1b' with stages_per_rank="
                                      f"{self.stages_per_rank}; expected stages_per_rank >= 2 (virtual stages)")
        if self.stages_per_rank > 1 and not (self.pp > 1 and interleaved):
            raise ParallelConfigError(f"ParallelConfig: stages_per_rank={self.stages_per_rank} needs pp > 1 and "
                                      f"pp_schedule='interleaved-1f1b'; got pp={self.pp}, "
                                      f"pp_schedule={self.pp_schedule!r}")
        if self.pp == 1 and self.microbatches > 1:
            raise ParallelConfigError(f"ParallelConfig: microbatches={self.microbatches} without a pipeline (pp=1); "
                                      "expected microbatches=1")
        if self.pp > 1 and self.pp_schedule != "gpipe" and self.microbatches < self.pp:
            raise ParallelConfigError(f"ParallelConfig: microbatches={self.microbatches} < pp={self.pp}; the "
                                      f"{self.pp_schedule} schedule needs at least one micro-batch per stage")
        if self.pp > 1 and interleaved and self.microbatches % self.pp:
            raise ParallelConfigError(f"ParallelConfig: microbatches={self.microbatches} with pp={self.pp}; "
                                      "interleaved-1f1b expects microbatches divisible by pp")

    # ---- sizes --------------------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.dp_shard * self.tp

    @property
    def dp_total(self) -> int:
        """The number of batch shards: replicas times shards."""
        return self.dp * self.dp_shard

    @property
    def n_stages(self) -> int:
        """Pipeline stages in all (virtual ones included)."""
        return self.pp * self.stages_per_rank

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, world_size: int, *, model: Any = None, batch: int | None = None,
                 seq: int | None = None) -> ParallelConfig:
        """Check the degrees against ``world_size``, the model's shape (``n_head``, ``d``, ``vocab``, ``n_layer``)
        and the global batch (``batch`` sequences of ``seq`` tokens). Returns self; raises ParallelConfigError."""
        # (batch=0 or -4 passed every divisibility check below; world_size=True equalled a product of 1)
        for name, v in (("world_size", world_size), ("batch", batch), ("seq", seq)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ParallelConfigError(f"ParallelConfig.validate: {name}={v!r}; expected a positive int")
        if self.world_size != world_size:
            raise ParallelConfigError(
                f"ParallelConfig: pp*dp*dp_shard*tp = {self.pp}*{self.dp}*{self.dp_shard}*{self.tp} = "
                f"{self.world_size}; expected the world size {world_size}")
        if model is not None:
            for attr, what in (("n_head", "attention heads"), ("d", "model width d"), ("vocab", "vocabulary"),
                               ("max_seq", "position table")):
                v = getattr(model, attr)
                if v % self.tp:
                    raise ParallelConfigError(f"ParallelConfig: tp={self.tp} does not divide the model's {what} "
                                              f"{attr}={v}; expected {attr} % tp == 0")
            if model.n_layer % self.n_stages:
                raise ParallelConfigError(
                    f"ParallelConfig: pp*stages_per_rank = {self.n_stages} pipeline stages do not divide the model's "
                    f"n_layer={model.n_layer}; expected n_layer % {self.n_stages} == 0")
        if batch is not None:
            if batch % self.dp_total:
                raise ParallelConfigError(f"ParallelConfig: batch={batch} is not divisible by dp*dp_shard="
                                          f"{self.dp_total}; expected whole sequences per data-parallel rank")
            local = batch // self.dp_total
            if local % self.microbatches:
                raise ParallelConfigError(f"ParallelConfig: the per-rank batch {local} (batch={batch} / "
                                          f"{self.dp_total}) is not divisible by microbatches={self.microbatches}")
        if seq is not None:
            if self.sp > 1 and seq % self.sp:
                raise ParallelConfigError(f"ParallelConfig: seq={seq} is not divisible by sp={self.sp}; sequence "
                                          "parallelism gives each tp rank an equal slice of the sequence")
            if model is not None and seq > model.max_seq:
                raise ParallelConfigError(f"ParallelConfig: seq={seq} is longer than the model's "
                                          f"max_seq={model.max_seq}")
        return self

    def build_mesh(self, device_type: str):
        """The DeviceMesh over the default process group, dims MESH_DIMS (sizes 1 kept, so ``mesh["tp"]`` always
        exists). Needs an initialised process group of ``world_size`` ranks."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        if not dist.is_initialized():
            raise ParallelConfigError("ParallelConfig.build_mesh: no process group; expected "
                                      "torch.distributed.init_process_group(...) first (see tilestack.parallel.launch)")
        self.validate(dist.get_world_size())
        return init_device_mesh(device_type, (self.pp, self.dp, self.dp_shard, self.tp), mesh_dim_names=MESH_DIMS)

