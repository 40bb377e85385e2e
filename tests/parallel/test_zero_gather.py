"""ZeroOptimizer.step gathers the updated slices back a bucket at a time: each bucket's whole parameters are copied in
before the next bucket's buffer is made, so one bucket (not a second copy of the model) is alive beyond the
parameters; the update stays AdamW's, element for element. One process, a gloo group of one rank."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.distributed as dist

from tilestack.parallel import zero


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_the_step_holds_one_gathered_bucket_at_a_time_and_matches_adamw(group, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(5)])
    ref = [p.detach().clone().requires_grad_() for p in model.parameters()]
    opt = zero.ZeroOptimizer(model.parameters(), group, stage=1, bucket_numel=200,
                             make_optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    assert len(opt.buckets) >= 4                                  # a Linear (weight and bias) a bucket
    alive, most = [], []
    real = zero._all_gather

    def spy(full, piece, group=None):
        alive[:] = [r for r in alive if r() is not None]           # gathered buffers still referenced
        most.append(len(alive))
        alive.append(weakref.ref(full))
        # gloo's work object may hold its output a while after the call returns: gather into a buffer of the
        # spy's own, so `alive` counts only what ZeroOptimizer itself keeps
        staged = torch.empty_like(full)
        real(staged, piece, group=group)
        full.copy_(staged)
    monkeypatch.setattr(zero, "_all_gather", spy)

    x = torch.randn(8, 16)
    model(x).square().sum().backward()
    for r, p in zip(ref, model.parameters(), strict=True):
        r.grad = p.grad.clone()
    opt.reduce_gradients()
    opt.step()
    torch.optim.AdamW(ref, lr=1e-2).step()
    assert len(most) == len(opt.buckets) and max(most) == 0, most  # the previous bucket freed before the next
    for r, p in zip(ref, model.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=0, atol=1e-6)
