"""Functions the spawned ranks of tests/parallel/test_plan_unseen_round5_search.py run (importable by the
children): train a planned GPT whose vocabulary outweighs its blocks, and the single-process losses to compare."""

from __future__ import annotations

import functools

import torch

from tilestack.parallel import GPT, ModelConfig, ParallelConfig, Trainer, lm_loss, make_batch

CFG = dict(n_layer=4, d=16, n_head=2, vocab=2000, max_seq=8)      # the tables are 90% of the parameters
BATCH, SEQ, STEPS = 4, 8, 3
HYPER = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = ModelConfig(**CFG)
    return [make_batch(cfg, BATCH, SEQ, seed=500 + s) for s in range(STEPS)]


@functools.cache
def reference_losses() -> list[float]:
    model = GPT(ModelConfig(**CFG), seed=0)
    opt = torch.optim.AdamW(model.parameters(), foreach=False, **HYPER)
    losses = []
    for idx, targets in _batches():
        loss = lm_loss(model(idx), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def train_plan(rank: int, world_size: int, kw: dict) -> list[float]:
    """The plan's ParallelConfig (``Plan.parallel_kwargs``) run by the real Trainer: the losses per step."""
    pc = ParallelConfig(**kw)
    trainer = Trainer(GPT(ModelConfig(**CFG), seed=0), pc, pc.build_mesh("cpu"), **HYPER)
    losses = []
    for idx, targets in _batches():
        losses.append(trainer.forward_backward(idx, targets))
        trainer.optimizer_step()
    return losses
