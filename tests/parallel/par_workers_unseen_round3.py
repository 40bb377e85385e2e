"""Rank functions (importable by spawned children) and single-process references for
test_parallel_unseen_round3*.py: what changes between the steps of one run (the batch's shape, which parameters
train), models the Trainer cannot take, a rank that fails or hangs in the middle of a step, and bf16 parameters
under ZeRO with its f32 master slice. A float64 model of 4 layers, width 16 with 2 heads, vocabulary 26 and a
position table of 10 (tp=2 divides them all; 4 layers: 2 stages of 2 or 4 virtual stages of 1)."""

from __future__ import annotations

import time
import traceback

import torch

from tilestack.parallel import GPT, ModelConfig, ParallelConfig, Trainer, lm_loss, make_batch

FOUR = ModelConfig(n_layer=4, d=16, n_head=2, vocab=26, max_seq=10)
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
DTYPE = torch.float64
BUILT_FROZEN = ("layers.1.attn.q_proj.weight", "layers.2.mlp.fc.bias")     # frozen before the Trainer is built
LATER_FROZEN = ("wpe.weight", "layers.0.mlp.fc.weight", "layers.3.ln_2.bias", "lm_head.weight")


def new_model(dtype: torch.dtype = DTYPE, *, frozen: tuple[str, ...] = ()) -> GPT:
    net = GPT(FOUR, seed=5).to(dtype)
    for name, p in net.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return net


def data(step: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return make_batch(FOUR, step["batch"], step["seq"], seed=31 + step["seed"])


def _set_requires_grad(named, step: dict) -> None:
    for name, p in named:
        if name in step.get("freeze", ()):
            p.requires_grad_(False)
        if name in step.get("unfreeze", ()):
            p.requires_grad_(True)


def reference(plan: list[dict], built_frozen: tuple[str, ...] = ()) -> dict:
    """One process: AdamW over every parameter (it skips those without a gradient, each its own step count),
    the whole batch of each step; requires_grad changed before the steps that say so."""
    net = new_model(frozen=built_frozen)
    opt = torch.optim.AdamW(list(net.parameters()), foreach=False, **HYPER)
    losses = []
    for step in plan:
        _set_requires_grad(net.named_parameters(), step)
        idx, targets = data(step)
        loss = lm_loss(net(idx), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return dict(losses=losses, params={n: p.detach().clone() for n, p in net.named_parameters()})


def run_plan(kw: dict, plan: list[dict], built_frozen: tuple[str, ...] = ()) -> dict:
    pc = ParallelConfig(**kw)
    trainer = Trainer(new_model(frozen=built_frozen), pc, pc.build_mesh("cpu"), **HYPER)
    losses = []
    for step in plan:
        _set_requires_grad(trainer.named_parts(), step)
        losses.append(trainer.step(*data(step), accumulate=step.get("accumulate", 1)))
    return dict(losses=losses, params=trainer.full_params())


def train_plans(rank: int, world_size: int, cases: list) -> dict:
    """Each (name, ParallelConfig keywords, plan, frozen at build): losses and the whole parameters this rank
    holds at the end; a case's exception is its result (the message: refusals are checked by it), then a barrier."""
    import torch.distributed as dist
    out = {}
    for name, kw, plan, built_frozen in cases:
        try:
            out[name] = run_plan(kw, plan, built_frozen)
        except Exception as e:  # noqa: BLE001 - reported per case
            out[name] = dict(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
        dist.barrier()
    return out


class TupleGPT(GPT):
    """A GPT whose forward returns (logits, an auxiliary tensor), as some model zoos' do."""

    def forward(self, x):
        y = super().forward(x)
        return (y, y.mean()) if self.lm_head is not None else y


def refusals(rank: int, world_size: int) -> dict:
    """Models the Trainer cannot train: the error each raises on every rank, then a barrier (the group went on)."""
    import torch.distributed as dist
    cases = {
        "sequential": lambda: torch.nn.Sequential(torch.nn.Embedding(26, 16), torch.nn.Linear(16, 26)),
        "tuple-forward": lambda: TupleGPT(FOUR, seed=5).to(DTYPE),
    }
    said = {}
    for name, make in cases.items():
        try:
            pc = ParallelConfig(dp=2)
            trainer = Trainer(make(), pc, pc.build_mesh("cpu"), **HYPER)
            trainer.step(*make_batch(FOUR, 4, 6))
            said[name] = "no error"
        except Exception as e:  # noqa: BLE001 - the message is the result
            said[name] = f"{type(e).__name__}: {e}"
        dist.barrier()
    return said


class _Boom(RuntimeError):
    pass


def raises_in_backward(rank: int, world_size: int) -> None:
    """DDP over every rank; on the second step the last rank raises from a gradient hook inside backward, while
    the others wait in DDP's gradient all-reduce."""
    pc = ParallelConfig(dp=world_size)
    net = new_model()
    steps = {"n": 0}

    def hook(grad):
        if rank == world_size - 1 and steps["n"] == 1:
            raise _Boom(f"rank {rank}'s own fault in backward")
        return grad

    net.lm_head.weight.register_hook(hook)
    trainer = Trainer(net, pc, pc.build_mesh("cpu"), **HYPER)
    for s in range(3):
        trainer.step(*make_batch(FOUR, 2 * world_size, 6, seed=s))
        steps["n"] += 1


def hangs_in_step(rank: int, world_size: int) -> None:
    """Rank 0 stops (sleeps) before its second step; the others wait for it in the gradient all-reduce."""
    pc = ParallelConfig(dp=world_size)
    trainer = Trainer(new_model(), pc, pc.build_mesh("cpu"), **HYPER)
    for s in range(2):
        if rank == 0 and s == 1:
            time.sleep(3600)
        trainer.step(*make_batch(FOUR, 2 * world_size, 6, seed=s))


def bf16_reference(steps: int) -> dict:
    """One process, bf16 parameters with f32 master weights: bf16 forward and backward, the gradients widened to
    f32, AdamW on the f32 masters, the parameters their bf16 rounding."""
    net = new_model(torch.bfloat16)
    masters = [p.detach().float().clone().requires_grad_(True) for p in net.parameters()]
    opt = torch.optim.AdamW(masters, foreach=False, **HYPER)
    losses = []
    for s in range(steps):
        idx, targets = make_batch(FOUR, 4, 6, seed=s)
        loss = lm_loss(net(idx), targets)
        loss.backward()
        for m, p in zip(masters, net.parameters(), strict=True):
            m.grad = p.grad.float()
            p.grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for m, p in zip(masters, net.parameters(), strict=True):
                p.copy_(m)
        losses.append(loss.item())
    names = [n for n, _ in net.named_parameters()]
    return dict(losses=losses, params={n: p.detach().clone() for n, p in net.named_parameters()},
                masters={n: m.detach().clone() for n, m in zip(names, masters, strict=True)})


def bf16_zero(rank: int, world_size: int, stages: tuple[int, ...], steps: int) -> dict:
    """For each ZeRO stage, over dp=2 of the bf16 model: losses, the bf16 parameters, the dtype of the master slice
    and the whole f32 masters (all-gathered from the slices)."""
    return {stage: _bf16_zero(world_size, stage, steps) for stage in stages}


def _bf16_zero(world_size: int, stage: int, steps: int) -> dict:
    pc = ParallelConfig(dp=world_size, zero=stage)
    trainer = Trainer(new_model(torch.bfloat16), pc, pc.build_mesh("cpu"), **HYPER, zero_bucket_numel=700)
    losses = [trainer.step(*make_batch(FOUR, 4, 6, seed=s)) for s in range(steps)]
    zero = trainer.zero
    names = {id(p): n for n, p in trainer.named_parts()}
    masters = {names[id(p)]: m.clone() for p, m in zip(zero.params, zero._gather(zero.master.detach()), strict=True)}
    return dict(losses=losses, params=trainer.full_params(), master_dtype=str(zero.master.dtype), masters=masters)


class RunningMeanGPT(GPT):
    """A GPT that keeps, as BatchNorm does, a running mean of its embeddings' output (a buffer, momentum 0.1),
    updated by every training forward of the first stage."""

    MOMENTUM = 0.1

    def __init__(self, cfg: ModelConfig, *, seed: int = 0):
        super().__init__(cfg, seed=seed)
        self.register_buffer("running", torch.zeros(cfg.d))

    def forward(self, x):
        if self.wte is None or not self.training:
            return super().forward(x)
        h = self.wte(x) + self.wpe(torch.arange(x.shape[1], device=x.device)[None])       # (B, N, d)
        with torch.no_grad():
            self.running.mul_(1 - self.MOMENTUM).add_(self.MOMENTUM * h.mean((0, 1)))
        wte, wpe = self.wte, self.wpe
        self.wte = self.wpe = None               # (the blocks and the head on h)
        try:
            return super().forward(h)
        finally:
            self.wte, self.wpe = wte, wpe


def running_reference(steps: int) -> dict:
    net = RunningMeanGPT(FOUR, seed=5).to(DTYPE)
    opt = torch.optim.AdamW(list(net.parameters()), foreach=False, **HYPER)
    losses = []
    for s in range(steps):
        idx, targets = make_batch(FOUR, 4, 6, seed=s)
        loss = lm_loss(net(idx), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return dict(losses=losses, running=net.running.clone())


def running_buffers(rank: int, world_size: int, layouts: list, steps: int, folder: str) -> dict:
    """Each (name, ParallelConfig keywords): losses and the running mean buffer of this rank after ``steps``;
    under layouts a checkpoint takes, the buffer a fresh trainer loads from one saved at the end."""
    import os

    import torch.distributed as dist

    from tilestack.parallel import checkpoint
    out = {}
    for name, kw in layouts:
        try:
            pc = ParallelConfig(**kw)
            trainer = Trainer(RunningMeanGPT(FOUR, seed=5).to(DTYPE), pc, pc.build_mesh("cpu"), **HYPER)
            losses = [trainer.step(*make_batch(FOUR, 4, 6, seed=s)) for s in range(steps)]
            running = next(b for n, b in trainer.parts[0].named_buffers() if n.endswith("running"))   # (DDP: module.)
            got = dict(losses=losses, running=running.clone())
            if not pc.zero:
                path = os.path.join(folder, name)
                checkpoint.save(trainer, path)
                fresh = Trainer(RunningMeanGPT(FOUR, seed=5).to(DTYPE), pc, pc.build_mesh("cpu"), **HYPER)
                checkpoint.load(fresh, path)
                got["loaded"] = next(b for n, b in fresh.parts[0].named_buffers() if n.endswith("running")).clone()
            out[name] = got
        except Exception:  # noqa: BLE001 - reported per layout
            out[name] = dict(error=traceback.format_exc())
        dist.barrier()
    return out


def refusals_and_running_buffers(rank: int, world_size: int, layouts: list, steps: int, folder: str) -> dict:
    """refusals and running_buffers in one group (a group's start is the slow part on 2 cores)."""
    return dict(refusals=refusals(rank, world_size), running=running_buffers(rank, world_size, layouts, steps, folder))


def ring_sizes(rank: int, world_size: int) -> dict:
    """The ring collectives where the last rank's tensor has another size (or dtype): the error each rank raises
    (on 2 ranks both are neighbours of the odd one) or its result; then bf16 tensors of sizes that the world size
    does not divide, against dist.all_reduce (the group still works after the refusals)."""
    import torch.distributed as dist

    from tilestack.parallel import ring_all_gather, ring_all_reduce, ring_reduce_scatter
    odd = rank == world_size - 1
    out = {}
    for name, fn, t in (("numel", ring_all_reduce, torch.ones(6 if odd else 5)),
                        ("dtype", ring_all_reduce, torch.ones(5, dtype=torch.float64 if odd else torch.float32)),
                        ("empty", ring_all_reduce, torch.ones(0 if odd else 4)),
                        ("reduce_scatter", ring_reduce_scatter, torch.ones(7 if odd else 5)),
                        ("all_gather", ring_all_gather, torch.ones(3 if odd else 5))):
        try:
            fn(t)
            out[name] = f"no error: {t.tolist()}"
        except Exception as e:  # noqa: BLE001 - the message is the result
            out[name] = f"{type(e).__name__}: {e}"
    checked = []
    for n in (1, 2, 5, 7, 11, 1001):
        gen = torch.Generator().manual_seed(100 * rank + n)
        t = torch.randn(n, generator=gen).to(torch.bfloat16)
        want = t.float()
        dist.all_reduce(want)
        got = t.clone()
        ring_all_reduce(got, chunks=3)
        assert got.dtype == torch.bfloat16
        # the sum of bf16 inputs, rounded once or twice to bf16 (2^-8 relative), against the f32 sum
        torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=1e-2)
        checked.append(n)
    out["bf16"] = checked
    return out
