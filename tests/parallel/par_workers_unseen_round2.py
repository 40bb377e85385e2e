"""Rank functions (importable by spawned children) and single-process references for
test_parallel_unseen_round2*.py: float64 models of shapes no other test uses (width 20 with 2 heads, vocabulary
30, position table 12), trained with what a training loop adds around a step: frozen parameters, tied
embeddings, a learning-rate schedule, clipping by the global gradient norm, gradient accumulation, strong weight
decay, a checkpoint saved and loaded mid-run. Every layout must match one process to f64 rounding."""

from __future__ import annotations

import traceback

import torch

from tilestack.parallel import GPT, ModelConfig, ParallelConfig, Trainer, lm_loss, make_batch

# tp=2 divides n_head, d, vocab and max_seq; 2 layers: 2 pipeline stages of one block each, 6 micro-batches > layers
TWO = ModelConfig(n_layer=2, d=20, n_head=2, vocab=30, max_seq=12)
# 3 layers: pp=3, and pp=2 must be refused; width 21 with 3 heads: ragged FSDP2 / ZeRO slices over 2 ranks
THREE = ModelConfig(n_layer=3, d=21, n_head=3, vocab=31, max_seq=11)
MODELS = {"two": TWO, "three": THREE}
BATCH, SEQ = 6, 8
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
DTYPE = torch.float64
FROZEN = ("wpe.weight", "layers.0.ln_1.weight", "layers.0.ln_1.bias", "layers.1.attn.k_proj.bias")
CLIP = 0.05          # far below the gradient norms of these models (about 1): every step is clipped


def batches(cfg: ModelConfig, steps: int, *, masked: bool = False, batch: int = BATCH, seq: int = SEQ):
    out = [make_batch(cfg, batch, seq, seed=101 + s) for s in range(steps)]
    if masked:       # the first rows lose most of their targets: shards and accumulation chunks count unevenly
        for _, targets in out:
            targets[:2, 1:] = -100
            targets[5, :3] = -100
    return out


def _schedule_factor(step: int) -> float:
    """A warm-up then a decay: every step has another learning rate."""
    return (step + 1) / 2 if step < 2 else 0.5 ** (step - 1)


def new_model(cfg: ModelConfig, opts: dict) -> GPT:
    net = GPT(cfg, seed=3).to(DTYPE)
    if opts.get("tied"):
        net.lm_head.weight = net.wte.weight          # (vocab, d) both
    if opts.get("unused"):                           # a parameter the forward never uses: no gradient, never moves
        net.extra = torch.nn.Parameter(torch.linspace(1.0, 2.0, 5, dtype=DTYPE))
    for name, p in net.named_parameters():
        if opts.get("frozen") and name in FROZEN:
            p.requires_grad_(False)
    return net


def reference(model: str, steps: int, opts: dict) -> dict:
    """One process, plain AdamW on the whole batch (torch's own clip_grad_norm_ and LambdaLR)."""
    cfg = MODELS[model]
    net = new_model(cfg, opts)
    hyper = dict(HYPER, weight_decay=opts.get("weight_decay", HYPER["weight_decay"]))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], foreach=False, **hyper)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule_factor) if opts.get("schedule") else None
    losses, norms = [], []
    for idx, targets in batches(cfg, steps, masked=opts.get("masked", False), batch=opts.get("batch", BATCH)):
        loss = lm_loss(net(idx), targets)
        loss.backward()
        if opts.get("grads") and not losses:
            grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        if opts.get("clip"):
            norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return dict(losses=losses, norms=norms, params={n: p.detach().clone() for n, p in net.named_parameters()},
                grads=grads if opts.get("grads") else None)


def run_scenario(model: str, kw: dict, steps: int, opts: dict) -> dict:
    kw = dict(kw)
    extra = {"zero_bucket_numel": kw.pop("zero_bucket_numel")} if "zero_bucket_numel" in kw else {}
    cfg = MODELS[model]
    pc = ParallelConfig(**kw)
    hyper = dict(HYPER, weight_decay=opts.get("weight_decay", HYPER["weight_decay"]))
    trainer = Trainer(new_model(cfg, opts), pc, pc.build_mesh("cpu"), **hyper, **extra)
    sched = (torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, _schedule_factor) if opts.get("schedule")
             else None)
    losses, norms = [], []
    for idx, targets in batches(cfg, steps, masked=opts.get("masked", False), batch=opts.get("batch", BATCH)):
        if opts.get("accumulate") and not opts.get("clip"):
            losses.append(trainer.step(idx, targets, accumulate=opts["accumulate"]))
        else:
            losses.append(trainer.forward_backward(idx, targets, accumulate=opts.get("accumulate", 1)))
            if opts.get("grads") and len(losses) == 1:
                grads = trainer.full_grads()
            if opts.get("clip"):
                norms.append(trainer.clip_grad_norm_(CLIP))
            trainer.optimizer_step()
        if sched is not None:
            sched.step()
    params = trainer.full_params()
    return dict(losses=losses, norms=norms, params=params, dtypes={str(p.dtype) for p in params.values()},
                lr=[g["lr"] for g in trainer.optimizer.param_groups], grads=grads if opts.get("grads") else None)


def train_scenarios(rank: int, world_size: int, scenarios: list) -> dict:
    """Each (name, model, ParallelConfig keywords, steps, opts): losses, clipped norms, whole parameters this rank
    holds at the end; a scenario's exception is its result (the others still run)."""
    import torch.distributed as dist
    out = {}
    for name, model, kw, steps, opts in scenarios:
        try:
            out[name] = run_scenario(model, kw, steps, opts)
        except Exception:  # noqa: BLE001 - reported per scenario
            out[name] = dict(error=traceback.format_exc())
        dist.barrier()
    return out


def refusals(rank: int, world_size: int, cases: list) -> list[str]:
    """Each (model, ParallelConfig keywords, opts, batch, call): the error the Trainer's construction or its step
    raises, every rank alike, then a barrier (the group stayed in step)."""
    import torch.distributed as dist
    said = []
    for model, kw, opts, batch, call in cases:
        cfg = MODELS[model]
        try:
            pc = ParallelConfig(**kw)
            trainer = Trainer(new_model(cfg, opts), pc, pc.build_mesh("cpu"), **HYPER)
            idx, targets = make_batch(cfg, batch, SEQ)
            if call == "clip-before-backward":
                trainer.clip_grad_norm_(1.0)
            elif call.startswith("clip="):
                trainer.forward_backward(idx, targets)
                trainer.clip_grad_norm_(float(call[5:]))
            else:
                trainer.step(idx, targets, **({"accumulate": int(call)} if call else {}))
            said.append("no error")
        except Exception as e:  # noqa: BLE001 - the message is the result
            said.append(f"{type(e).__name__}: {e}")
        dist.barrier()
    return said


def checkpoint_continuation(rank: int, world_size: int, kw: dict, folder: str, steps: int, cut: int,
                            opts: dict) -> dict:
    """Under one layout: an uninterrupted run of ``steps`` that saves after ``cut`` steps, and a fresh trainer that
    loads that checkpoint and runs the rest (the same batches). Both runs' losses and final parameters."""
    from tilestack.parallel import checkpoint
    cfg = TWO
    data = batches(cfg, steps, masked=opts.get("masked", False), batch=opts.get("batch", BATCH))

    def fresh():
        pc = ParallelConfig(**kw)
        return Trainer(new_model(cfg, opts), pc, pc.build_mesh("cpu"), **HYPER)

    def run(trainer, lo):
        out = []
        for s in range(lo, steps):
            out.append(trainer.step(*data[s]))
            if s + 1 == cut:
                checkpoint.save(trainer, folder)
        return out

    first = fresh()
    whole = run(first, 0)
    second = fresh()
    start = checkpoint.load(second, folder)
    rest = run(second, start)
    return dict(start=start, whole=whole, rest=rest, params_whole=first.full_params(),
                params_rest=second.full_params())


def checkpoint_continuations(rank: int, world_size: int, cases: list, folder: str, steps: int, cut: int) -> dict:
    """checkpoint_continuation for each (name, ParallelConfig keywords, opts), a folder each, in one group; an
    exception is the case's result."""
    import os
    out = {}
    for name, kw, opts in cases:
        try:
            out[name] = checkpoint_continuation(rank, world_size, kw, os.path.join(folder, name), steps, cut, opts)
        except Exception:  # noqa: BLE001 - reported per case
            out[name] = dict(error=traceback.format_exc())
    return out


def ring_round2(rank: int, world_size: int) -> list[str]:
    """The ring collectives on a sub-group (global ranks 0 and 2 of 3: ranks looked up through the group), on a
    0-d tensor, with more chunks than elements, and the reduce-scatter / all-gather halves on their own, against
    torch.distributed's collectives. An AssertionError is raised on the rank that disagrees."""
    import torch.distributed as dist

    from tilestack.parallel import ring_all_gather, ring_all_reduce, ring_reduce_scatter
    checked = []
    members = [0, world_size - 1]
    sub = dist.new_group(members)                     # every rank makes it; only the members use it
    if rank in members:
        for dtype in (torch.float64, torch.float16, torch.int32):
            for shape in ((), (1,), (5,), (0,), (3, 3)):
                for chunks in (1, 16):
                    gen = torch.Generator().manual_seed(17 * rank + len(checked))
                    t = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) if dtype.is_floating_point
                         else torch.randint(-50, 50, shape, generator=gen).to(dtype))
                    expect = t.clone()
                    dist.all_reduce(expect, group=sub)
                    got = t.clone()
                    ring_all_reduce(got, sub, chunks=chunks)
                    assert got.shape == t.shape and got.dtype == dtype
                    if dtype == torch.int32:
                        assert torch.equal(got, expect), (shape, chunks, got, expect)
                    else:
                        tol = 1e-12 if dtype == torch.float64 else 2e-3
                        torch.testing.assert_close(got, expect, rtol=tol, atol=tol)
                    checked.append(f"sub {dtype} {shape} chunks={chunks}")
    dist.barrier()
    # the halves on the whole group: 11 elements over W ranks (segments of unequal sizes)
    t = torch.arange(11, dtype=torch.float64) * (rank + 1)
    total = t.clone()
    dist.all_reduce(total)
    seg = ring_reduce_scatter(t.clone(), chunks=3)
    mine = total.tensor_split(world_size)[(rank + 1) % world_size]
    assert torch.equal(seg, mine), (rank, seg, mine)
    checked.append("reduce_scatter segment")
    own = torch.full((11,), -1.0)
    parts = own.tensor_split(world_size)
    parts[rank].fill_(rank)                           # owned_shift=0: rank r owns segment r
    ring_all_gather(own, owned_shift=0, chunks=5)
    expect = torch.cat([torch.full((p.numel(),), float(r)) for r, p in enumerate(parts)])
    assert torch.equal(own, expect), (rank, own, expect)
    checked.append("all_gather owned_shift=0")
    return checked
