"""Functions that run on every rank of the spawned process groups of tests/parallel (importable by the children),
and the single-process reference they are checked against."""

from __future__ import annotations

import functools
import traceback

import torch

from tilestack.parallel import GPT, ModelConfig, ParallelConfig, Trainer, lm_loss, make_batch

CFG = ModelConfig(n_layer=4, d=32, n_head=4, vocab=64, max_seq=32)
BATCH, SEQ, STEPS, LR = 8, 16, 20, 1e-3
HYPER = dict(lr=LR, betas=(0.9, 0.95), weight_decay=0.1)


def batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A different global batch per step, the same on every rank."""
    return [make_batch(CFG, BATCH, SEQ, seed=100 + s) for s in range(steps)]


@functools.cache
def reference(steps: int = STEPS) -> dict:
    """The single-process run: losses per step, the first step's gradients, the parameters at the end."""
    torch.manual_seed(0)
    model = GPT(CFG, seed=0)
    opt = torch.optim.AdamW(model.parameters(), foreach=False, **HYPER)
    losses, grads = [], None
    for idx, targets in batches(steps):
        loss = lm_loss(model(idx), targets)
        loss.backward()
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return dict(losses=losses, grads=grads, params={n: p.detach().clone() for n, p in model.named_parameters()})


def strategies(rank: int, world_size: int, scenarios: list[tuple[str, dict]], steps: int = STEPS) -> dict:
    """Train every scenario's ParallelConfig from the same initial model on the same batches; per scenario the
    losses, the first step's reduced gradients and the final parameters this rank can see (whole tensors)."""
    out = {}
    for name, kw in scenarios:
        try:
            out[name] = _train(kw, steps)
        except Exception:  # noqa: BLE001 - one scenario's failure is that scenario's test failure, not all of them
            out[name] = dict(error=traceback.format_exc())
    return out


def _train(kw: dict, steps: int) -> dict:
    pc = ParallelConfig(**kw)
    trainer = Trainer(GPT(CFG, seed=0), pc, pc.build_mesh("cpu"), **HYPER)
    losses, grads = [], None
    for idx, targets in batches(steps):
        losses.append(trainer.forward_backward(idx, targets))
        if grads is None:
            grads = trainer.full_grads()
        trainer.optimizer_step()
    return dict(losses=losses, grads=grads, params=trainer.full_params())
