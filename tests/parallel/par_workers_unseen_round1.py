"""Rank functions (importable by spawned children) and single-process references for
test_parallel_unseen_round1*.py: models of shapes the project's own tests never use (odd widths, an odd vocabulary,
3 layers), trained in float64 so that every layout must match one process to rounding."""

from __future__ import annotations

import traceback

import torch

from tilestack.parallel import GPT, ModelConfig, ParallelConfig, Trainer, lm_loss, make_batch

# tp=2 divides n_head, d, vocab and max_seq; head_dim 6, MLP 144 wide
EVEN = ModelConfig(n_layer=4, d=36, n_head=6, vocab=50, max_seq=20)
# nothing divides evenly by 2 or 3 but n_layer by 3: FSDP2 and ZeRO shard ragged rows (vocab 37, width 52)
ODD = ModelConfig(n_layer=3, d=52, n_head=4, vocab=37, max_seq=19)
# no blocks at all (embeddings and head: a pipeline of 2 stages with nothing between them), and SDPA attention
# with one head per tensor-parallel rank
NO_BLOCKS = ModelConfig(n_layer=0, d=36, n_head=6, vocab=50, max_seq=20)
SDPA = ModelConfig(n_layer=2, d=36, n_head=2, vocab=50, max_seq=20, attention="sdpa")
MODELS = {"even": EVEN, "odd": ODD, "even-masked": EVEN, "no-blocks": NO_BLOCKS, "sdpa": SDPA}
MASKED = ("even-masked",)   # targets partly -100 (ignored), unevenly over the rows: rank 0's rows hold most of them
BATCH, SEQ = 6, 10
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
DTYPE = torch.float64


def batches(cfg: ModelConfig, steps: int, batch: int = BATCH, seq: int = SEQ, first_seed: int = 7,
            masked: bool = False):
    out = [make_batch(cfg, batch, seq, seed=first_seed + s) for s in range(steps)]
    if masked:     # rows 0 and 1 lose most of their targets, row 4 two of them
        for _, targets in out:
            targets[:2, 2:] = -100
            targets[4, :2] = -100
    return out


def new_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    return GPT(cfg, seed=seed).to(DTYPE)


def reference(model: str, steps: int, batch: int = BATCH, seq: int = SEQ) -> dict:
    """One process, plain AdamW: the losses per step and the parameters at the end."""
    cfg = MODELS[model]
    net = new_model(cfg)
    opt = torch.optim.AdamW(net.parameters(), foreach=False, **HYPER)
    losses = []
    for idx, targets in batches(cfg, steps, batch, seq, masked=model in MASKED):
        loss = lm_loss(net(idx), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return dict(losses=losses, params={n: p.detach().clone() for n, p in net.named_parameters()})


def train_scenarios(rank: int, world_size: int, scenarios: list[tuple[str, str, dict, int]]) -> dict:
    """Each (name, model, ParallelConfig keywords, steps): losses per step, the whole parameters this rank holds at
    the end and their dtype; a scenario's exception is its result (the others still run)."""
    out = {}
    for name, model, kw, steps in scenarios:
        try:
            kw = dict(kw)
            extra = {"zero_bucket_numel": kw.pop("zero_bucket_numel")} if "zero_bucket_numel" in kw else {}
            cfg = MODELS[model]
            pc = ParallelConfig(**kw)
            trainer = Trainer(new_model(cfg), pc, pc.build_mesh("cpu"), **HYPER, **extra)
            losses = [trainer.step(idx, targets) for idx, targets in batches(cfg, steps, masked=model in MASKED)]
            params = trainer.full_params()
            out[name] = dict(losses=losses, params=params, dtypes={str(p.dtype) for p in params.values()})
        except Exception:  # noqa: BLE001 - reported per scenario
            out[name] = dict(error=traceback.format_exc())
    return out


def scenarios_then_bad_batches(rank: int, world_size: int, scenarios: list, cases: list) -> tuple[dict, list[str]]:
    """train_scenarios then bad_batch in one group (one spawn fewer)."""
    return train_scenarios(rank, world_size, scenarios), bad_batch(rank, world_size, cases)


def bad_batch(rank: int, world_size: int, cases: list[tuple[dict, int, int]]) -> list[str]:
    """Trainers given a global (batch, seq) their layout cannot split: the error each rank raises (all must refuse
    it alike, before a collective: the barrier after each proves the group is still in step)."""
    import torch.distributed as dist

    from tilestack.parallel import ParallelConfigError
    said = []
    for kw, batch, seq, *ignored in cases:
        pc = ParallelConfig(**kw)
        trainer = Trainer(new_model(EVEN), pc, pc.build_mesh("cpu"), **HYPER)
        idx, targets = make_batch(EVEN, batch, seq)
        if ignored:                   # every target -100
            targets.fill_(-100)
        try:
            trainer.step(idx, targets)
            said.append("no error")
        except ParallelConfigError as e:
            said.append(str(e))
        dist.barrier()
    return said


def ring_cases(rank: int, world_size: int) -> tuple[list[str], list[str]]:
    """(ring_mixed's cases, ring_bad's errors) in one group."""
    return ring_mixed(rank, world_size), ring_bad()


def ring_mixed(rank: int, world_size: int) -> list[str]:
    """ring_all_reduce on odd sizes and several dtypes against dist.all_reduce."""
    import torch.distributed as dist

    from tilestack.parallel import ring_all_reduce
    checked = []
    for dtype in (torch.float64, torch.float32, torch.int32, torch.int64, torch.bfloat16, torch.float16, torch.uint8,
                  torch.int8):
        for shape in ((0,), (1,), (2,), (4,), (7,), (3, 0), (5, 7), (10,), (2, 3, 5)):
            gen = torch.Generator().manual_seed(31 * rank + len(checked))
            if dtype.is_floating_point:
                t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
            else:
                t = torch.randint(0, 40, shape, generator=gen).to(dtype)
            expect = t.clone()
            dist.all_reduce(expect)
            got = t.clone()
            ret = ring_all_reduce(got)
            assert ret.data_ptr() == got.data_ptr() or got.numel() == 0, "not in place"
            assert got.dtype == dtype and got.shape == t.shape
            if dtype.is_floating_point:
                tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
                torch.testing.assert_close(got, expect, rtol=tol, atol=tol)
            else:
                assert torch.equal(got, expect), f"{dtype} {shape}: {got} vs {expect}"
            checked.append(f"{dtype} {shape}")
    # a leaf that requires grad (a parameter) is reduced in place like any tensor, as dist.all_reduce does
    leaf = torch.full((7,), float(rank + 1), requires_grad=True)
    ring_all_reduce(leaf)
    assert torch.equal(leaf.detach(), torch.full((7,), float(sum(range(1, world_size + 1)))))
    checked.append("leaf requiring grad")
    # several tensors of different dtypes reduced one after another on the same group keep their pairing
    a, b = torch.full((5,), rank + 1, dtype=torch.int16), torch.full((3,), 0.5 * rank, dtype=torch.float64)
    ring_all_reduce(a)
    ring_all_reduce(b)
    assert torch.equal(a, torch.full((5,), sum(range(1, world_size + 1)), dtype=torch.int16))
    torch.testing.assert_close(b, torch.full((3,), 0.5 * sum(range(world_size)), dtype=torch.float64))
    return checked


def ring_bad() -> list[str]:
    """Bad inputs to the ring collectives on a live group: each refused on every rank before any message, so the
    group still works afterwards (a good reduce follows each)."""
    import torch.distributed as dist

    from tilestack.errors import LaunchError
    from tilestack.parallel import ring_all_reduce
    said = []
    for bad, kw in ((torch.ones(4, 4).t(), {}), ([1.0, 2.0], {}), (torch.ones(3), {"chunks": 0}),
                    (torch.ones(3), {"chunks": 1.5})):
        try:
            ring_all_reduce(bad, **kw)
            said.append("no error")
        except LaunchError as e:
            said.append(str(e))
        t = torch.ones(4)
        ring_all_reduce(t)
        assert torch.equal(t, torch.full((4,), float(dist.get_world_size())))
    return said


def checkpoint_reshard(rank: int, world_size: int, path: str, before: dict, steps: int, cut: int) -> dict:
    """Train ``cut`` steps under ``before`` (world_size ranks) and save; the uninterrupted losses after the cut."""
    from tilestack.parallel import checkpoint
    cfg = EVEN
    data = batches(cfg, steps)
    pc = ParallelConfig(**before)
    t = Trainer(new_model(cfg), pc, pc.build_mesh("cpu"), **HYPER)
    for idx, targets in data[:cut]:
        t.step(idx, targets)
    checkpoint.save(t, path)
    cont = [t.step(idx, targets) for idx, targets in data[cut:]]
    return dict(cont=cont, params=t.full_params())


def checkpoint_resume(rank: int, world_size: int, path: str, after: dict, steps: int) -> dict:
    """Load ``path`` into a fresh trainer (another initial model) under ``after`` and train the remaining steps."""
    from tilestack.parallel import checkpoint
    cfg = EVEN
    data = batches(cfg, steps)
    pc = ParallelConfig(**after)
    t = Trainer(new_model(cfg, seed=5), pc, pc.build_mesh("cpu"), **HYPER)
    start = checkpoint.load(t, path)
    resumed = [t.step(idx, targets) for idx, targets in data[start:]]
    return dict(start=start, resumed=resumed, params=t.full_params())


def _interrupted_save(world_size: int, path: str, when: str) -> dict:
    """Save after 2 steps; a second save after 3 dies on every rank in torch.distributed.checkpoint's save, ``when``
    "before" it wrote anything or "after" it wrote everything (not yet swapped in); a fresh trainer then loads: the
    first checkpoint (2 steps) must be what it finds."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from tilestack.parallel import checkpoint
    cfg = EVEN
    data = batches(cfg, 3)
    pc = ParallelConfig(dp=world_size)
    t = Trainer(new_model(cfg), pc, pc.build_mesh("cpu"), **HYPER)
    for idx, targets in data[:2]:
        t.step(idx, targets)
    checkpoint.save(t, path)
    at_save = t.full_params()
    t.step(*data[2])
    real_save = dcp.save

    def dying_save(*a, **k):
        if when == "after":
            real_save(*a, **k)
        raise RuntimeError("disk full (simulated)")
    dcp.save = dying_save
    try:
        checkpoint.save(t, path)
        died = "no error"
    except RuntimeError as e:
        died = str(e)
    finally:
        dcp.save = real_save
    t2 = Trainer(new_model(cfg, seed=9), pc, pc.build_mesh("cpu"), **HYPER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = checkpoint.load(t2, path)
    got = t2.full_params()
    same = all(torch.equal(got[n], at_save[n]) for n in at_save)
    return dict(died=died, start=start, same=same, warned=[str(w.message) for w in caught])


def interrupted_saves(rank: int, world_size: int, folder: str) -> dict:
    """_interrupted_save dying before and after writing, then checkpoint_zero_refused, in one group."""
    out = {when: _interrupted_save(world_size, f"{folder}/{when}/ckpt", when) for when in ("before", "after")}
    out["zero"] = checkpoint_zero_refused(world_size, f"{folder}/zero")
    return out


def checkpoint_zero_refused(world_size: int, path: str) -> tuple[str, bool]:
    """checkpoint.save under ZeRO-1: refused on every rank, nothing written."""
    import os

    from tilestack.parallel import ParallelConfigError, checkpoint
    pc = ParallelConfig(dp=world_size, zero=1)
    t = Trainer(new_model(EVEN), pc, pc.build_mesh("cpu"), **HYPER)
    t.step(*batches(EVEN, 1)[0])
    try:
        checkpoint.save(t, path)
        said = "no error"
    except ParallelConfigError as e:
        said = str(e)
    return said, os.path.exists(path)


# ---- the parameter server: a model that is no GPT (Ray actors import these by name) --------------------------------

class TinyMixer(torch.nn.Module):
    """An MLP-mixer of 5 positions by 7 channels (hidden 11), f64, its token-mixing bias frozen: (B, 5, 7) -> (B, 1)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.token = torch.nn.Linear(5, 5)                                   # mixes positions
        self.channel = torch.nn.Sequential(torch.nn.Linear(7, 11), torch.nn.Tanh(), torch.nn.Linear(11, 7))
        self.head = torch.nn.Linear(7, 1, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        self.double()
        self.token.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token(x.transpose(1, 2)).transpose(1, 2)               # (B, 5, 7)
        x = x + self.channel(x)
        return self.head(x.mean(1))                                         # (B, 1)


def mixer_batch(step: int, rows: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(50 + step)
    x = torch.randn(rows, 5, 7, generator=gen, dtype=torch.float64)
    return x, torch.sin(x.sum((1, 2)))[:, None]


def mixer_batch_8(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return mixer_batch(step, rows=8)


def mixer_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def mixer_sgd(steps: int, lr: float) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, plain SGD on the whole batch of each step."""
    model = TinyMixer()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = mixer_loss(model, *mixer_batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}
