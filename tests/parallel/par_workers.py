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
    kw = dict(kw)
    extra = {"zero_bucket_numel": kw.pop("zero_bucket_numel")} if "zero_bucket_numel" in kw else {}
    pc = ParallelConfig(**kw)
    trainer = Trainer(GPT(CFG, seed=0), pc, pc.build_mesh("cpu"), **HYPER, **extra)
    losses, grads = [], None
    for idx, targets in batches(steps):
        losses.append(trainer.forward_backward(idx, targets))
        if grads is None:
            grads = trainer.full_grads()
        trainer.optimizer_step()
    return dict(losses=losses, grads=grads, params=trainer.full_params())


def ring_cases(rank: int, world_size: int) -> list[str]:
    """ring_all_reduce against dist.all_reduce on this group and on a sub-group, ragged sizes, several chunk
    counts; raises on the first mismatch. Returns the cases checked."""
    import torch.distributed as dist

    from tilestack.parallel import ring_all_gather, ring_all_reduce, ring_reduce_scatter
    checked = []
    sub = dist.new_group([0, world_size - 1])            # ranks 0 and W-1: global ranks differ from group ranks
    for group, members in ((None, range(world_size)), (sub, [0, world_size - 1])):
        if rank not in members:
            continue
        for numel in (0, 1, 2, 5, 1001):
            for chunks in (1, 3, 8):
                gen = torch.Generator().manual_seed(1000 * rank + numel)
                ints = torch.randint(-2**40, 2**40, (numel,), generator=gen, dtype=torch.int64)
                expect = ints.clone()
                dist.all_reduce(expect, group=group)
                got = ring_all_reduce(ints.clone(), group, chunks=chunks)
                assert torch.equal(got, expect), f"int64 numel={numel} chunks={chunks}: {got} vs {expect}"
                f = torch.randn((numel, 3), generator=gen)     # 2-D: reduced through a flat view
                fe = f.clone()
                dist.all_reduce(fe, group=group)
                torch.testing.assert_close(ring_all_reduce(f.clone(), group, chunks=chunks), fe, rtol=1e-6, atol=1e-6)
                checked.append(f"group={'sub' if group else 'world'} numel={numel} chunks={chunks}")
        # reduce-scatter leaves rank r's segment (r + 1) mod W summed; all-gather with owned_shift=0 copies segment r
        Wg, r = dist.get_world_size(group), dist.get_rank(group)
        t = torch.arange(10, dtype=torch.int64) * (r + 1)
        seg = ring_reduce_scatter(t, group)
        total = sum(range(1, Wg + 1))
        assert torch.equal(seg, (torch.arange(10) * total).tensor_split(Wg)[(r + 1) % Wg])
        t = torch.zeros(10, dtype=torch.int64)
        t.tensor_split(Wg)[r].fill_(r + 7)
        ring_all_gather(t, group, owned_shift=0)
        assert torch.equal(t, torch.cat([torch.full_like(s, i + 7) for i, s in enumerate(t.tensor_split(Wg))]))
    return checked


def reshard_cases(rank: int, world_size: int, path: str, cases: list[tuple[dict, dict]]) -> list[dict]:
    return [reshard(rank, world_size, f"{path}/{i}", before, after) for i, (before, after) in enumerate(cases)]


def reshard(rank: int, world_size: int, path: str, before: dict, after: dict, steps: int = 5, cut: int = 3) -> dict:
    """Train ``cut`` steps under ``before``, save, train on; load the checkpoint into a fresh trainer (another
    initial model) under ``after`` and train the same remaining steps. Both loss sequences after the cut."""
    from tilestack.parallel import checkpoint
    data = batches(steps)
    pc = ParallelConfig(**before)
    t1 = Trainer(GPT(CFG, seed=0), pc, pc.build_mesh("cpu"), **HYPER)
    for idx, targets in data[:cut]:
        t1.step(idx, targets)
    checkpoint.save(t1, path)
    cont = [t1.step(idx, targets) for idx, targets in data[cut:]]
    pc2 = ParallelConfig(**after)
    t2 = Trainer(GPT(CFG, seed=1), pc2, pc2.build_mesh("cpu"), **HYPER)
    checkpoint.load(t2, path)
    resumed = [t2.step(idx, targets) for idx, targets in data[cut:]]
    return dict(cont=cont, resumed=resumed)


def zero2_overlap(rank: int, world_size: int) -> dict:
    """After a bare backward under ZeRO-2 with overlap, before reduce_gradients: which buckets the gradient hooks
    already reduce-scattered, and which full gradients are still alive."""
    pc = ParallelConfig(dp=2, zero=2)
    trainer = Trainer(GPT(CFG, seed=0), pc, pc.build_mesh("cpu"), zero_bucket_numel=3000, **HYPER)
    idx, targets = trainer.local_batch(*batches(1)[0])
    lm_loss(trainer.parts[0](idx), targets).backward()
    return dict(buckets=len(trainer.zero.buckets), reduced=sum(p is not None for p in trainer.zero.pieces),
                alive=sum(p.grad is not None for p in trainer.params))


def noise_scale_dp(rank: int, world_size: int, steps: int = 6) -> dict:
    """Plain data parallelism measuring the gradient noise scale from the per-rank gradients: losses and phi after
    each step (and a refusal of a sharded layout)."""
    from tilestack.parallel.config import ParallelConfigError
    from tilestack.parallel.plan.goodput import GradientNoiseScale
    pc = ParallelConfig(dp=world_size)
    gns = GradientNoiseScale(ema=0.5)
    trainer = Trainer(GPT(CFG, seed=0), pc, pc.build_mesh("cpu"), gns=gns, **HYPER)
    losses = [trainer.step(idx, targets) for idx, targets in batches(steps)]
    try:
        sharded = ParallelConfig(dp_shard=world_size)
        Trainer(GPT(CFG, seed=0), sharded, sharded.build_mesh("cpu"), gns=GradientNoiseScale(), **HYPER)
        refused = ""
    except ParallelConfigError as e:
        refused = str(e)
    return dict(losses=losses, phi=[phi for _, phi in gns.history], refused=refused)


def one_rank_raises(rank: int, world_size: int) -> None:
    """Rank 0 raises on its own; the others are then in a collective with a rank that went away (their own error
    is the transport's, a knock-on of rank 0's)."""
    import torch.distributed as dist
    dist.barrier()
    if rank == 0:
        raise ValueError("rank zero's own fault")
    for _ in range(50):
        dist.all_reduce(torch.ones(1024))


def killed_on_first_attempt(rank: int, world_size: int, marker: str) -> int:
    """Rank 0 is killed by SIGKILL (as the OS's out-of-memory killer does) on the first attempt, the one that finds
    no ``marker`` file; the other ranks are then in a collective with a rank that went away. Every rank returns
    its rank on a later attempt."""
    import os
    import signal
    from pathlib import Path

    import torch.distributed as dist
    dist.barrier()
    first = not Path(marker).exists()
    dist.barrier()
    if first and rank == 0:
        Path(marker).write_text("killed once")
        os.kill(os.getpid(), signal.SIGKILL)
    if first:
        for _ in range(50):
            dist.all_reduce(torch.ones(1024))
    return rank


def resume_old_layout(rank: int, world_size: int, path: str, steps: int = 5, cut: int = 3) -> dict:
    """``reshard`` under dp=2 with the checkpoint written in the layout saved before 2026-12-07 (the optimizer by
    group index): it must still load, and train on as the run that was not stopped."""
    from tilestack.parallel import checkpoint
    data = batches(steps)
    pc = ParallelConfig(dp=2)
    t1 = Trainer(GPT(CFG, seed=0), pc, pc.build_mesh("cpu"), **HYPER)
    for idx, targets in data[:cut]:
        t1.step(idx, targets)
    by_name = checkpoint._options
    checkpoint._options = lambda by_name_=True: by_name(False)      # the old save
    try:
        checkpoint.save(t1, path)
    finally:
        checkpoint._options = by_name
    cont = [t1.step(idx, targets) for idx, targets in data[cut:]]
    t2 = Trainer(GPT(CFG, seed=1), pc, pc.build_mesh("cpu"), **HYPER)
    checkpoint.load(t2, path)
    resumed = [t2.step(idx, targets) for idx, targets in data[cut:]]
    return dict(cont=cont, resumed=resumed)
