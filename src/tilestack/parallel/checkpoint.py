"""Distributed checkpoints that load under another layout (torch.distributed.checkpoint: every rank writes the
shards it holds, keyed by the full model's parameter names and global shapes; loading reads whatever slices the
new layout's shards need).

    save(trainer, "ckpt/step100")          # under, say, dp=2
    load(trainer2, "ckpt/step100")         # under tp=2, pp=2, dp_shard=4 ...: same parameters and AdamW state

Saved: the model parameters and the optimizer state (AdamW's step and moments), as seen through
torch.distributed.checkpoint.state_dict (which drops DDP's ``module.`` and gathers nothing: DTensor shards are
written as shards). Not supported: ZeRO-1/2 (its optimizer holds a flat slice, not per-parameter state) and more
than one pipeline stage per rank (stages would share one optimizer).
"""

from __future__ import annotations

import os

from tilestack.parallel.config import ParallelConfigError


def _check(trainer, what: str) -> None:
    if trainer.zero is not None:
        raise ParallelConfigError(f"checkpoint.{what}: zero={trainer.pc.zero}; ZeRO-1/2's flat optimizer slices "
                                  "cannot be resharded: expected zero=0 (use dp_shard for sharded state)")
    if len(trainer.parts) != 1:
        raise ParallelConfigError(f"checkpoint.{what}: stages_per_rank={trainer.pc.stages_per_rank}; expected 1 "
                                  "(one model part per rank)")


def save(trainer, path: str | os.PathLike) -> None:
    """Write the trainer's parameters and optimizer state to the directory ``path`` (collective: every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    _check(trainer, "save")
    model_sd, optim_sd = get_state_dict(trainer.parts[0], trainer.optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.fspath(path))


def load(trainer, path: str | os.PathLike) -> None:
    """Read a checkpoint written by ``save`` under any layout into ``trainer`` (collective: every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    _check(trainer, "load")
    if not os.path.isdir(path):
        raise ParallelConfigError(f"checkpoint.load: path={os.fspath(path)!r} is not a directory; expected a "
                                  "checkpoint written by tilestack.parallel.checkpoint.save")
    model_sd, optim_sd = get_state_dict(trainer.parts[0], trainer.optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.fspath(path))
    set_state_dict(trainer.parts[0], trainer.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
