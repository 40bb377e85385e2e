"""Parallel training on torch.distributed: data (DDP, ZeRO-1/2, FSDP2), tensor + sequence, pipeline parallelism
and their hybrids on one DeviceMesh, activation recompute, a ring all-reduce, and a parameter server on Ray.

    from tilestack.parallel import GPT, TINY, ParallelConfig, Trainer, make_batch

    def worker(rank, world_size):                        # run on every rank, e.g. with run_local(worker, 4)
        pc = ParallelConfig(dp=2, tp=2, sp=2, recompute="selective")
        mesh = pc.build_mesh("cpu")                        # ("pp", "dp", "dp_shard", "tp") = (1, 2, 1, 2)
        trainer = Trainer(GPT(TINY, seed=0), pc, mesh)
        idx, targets = make_batch(TINY, batch=8, seq=16)
        return [trainer.step(idx, targets) for _ in range(5)]

The order in which the parallelisms are applied is documented in ``parallelize.py``; ``docs/parallel.md`` has
the whole picture. ``ps`` (the parameter server) needs ray and is imported on its own.
"""

from tilestack.parallel.config import PP_SCHEDULES, RECOMPUTE, ParallelConfig, ParallelConfigError
from tilestack.parallel.engine import Trainer
from tilestack.parallel.launch import run_local
from tilestack.parallel.model import GPT, GPT_1P3B, TINY, ModelConfig, ModelConfigError, lm_loss, make_batch
from tilestack.parallel.parallelize import apply_fsdp, apply_recompute, apply_tp, parallelize, split_stages
from tilestack.parallel.ring import ring_all_gather, ring_all_reduce, ring_allreduce_hook, ring_reduce_scatter
from tilestack.parallel.zero import ZeroOptimizer

__all__ = [
    "GPT", "GPT_1P3B", "PP_SCHEDULES", "RECOMPUTE", "TINY", "ModelConfig", "ModelConfigError", "ParallelConfig",
    "ParallelConfigError",
    "Trainer", "ZeroOptimizer", "apply_fsdp", "apply_recompute", "apply_tp", "lm_loss", "make_batch", "parallelize",
    "ring_all_gather", "ring_all_reduce", "ring_allreduce_hook", "ring_reduce_scatter", "run_local", "split_stages",
]
