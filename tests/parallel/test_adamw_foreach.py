"""The Trainer's AdamW takes torch's multi-tensor path where it can (on a GPU a loop over the parameters costs a
launch per op: about 20 of a 38 ms step for a 124M GPT on the H200) and the loop only for lists that mix
DTensors with plain tensors, which the foreach kernels reject; the planner times the optimizer the same way."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tilestack.parallel.engine import adamw_foreach


def test_plain_parameters_take_torchs_choice():
    ps = [torch.nn.Parameter(torch.zeros(3)) for _ in range(4)]
    assert adamw_foreach(ps) is None
    assert adamw_foreach([]) is None


def test_mixed_dtensor_and_plain_take_the_loop_and_step_correctly():
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        d = torch.nn.Parameter(DTensor.from_local(torch.ones(4), mesh, [Replicate()]))
        p = torch.nn.Parameter(torch.ones(4))
        assert adamw_foreach([d]) is None                      # all DTensors: torch's choice
        assert adamw_foreach([d, p]) is False                  # mixed: the loop
        for t in (d, p):
            t.grad = torch.full_like(t, 0.5)
        opt = torch.optim.AdamW([d, p], lr=0.1, weight_decay=0.0, foreach=adamw_foreach([d, p]))
        opt.step()
        # first Adam step moves every element by lr (m / sqrt(v) = 1 for a constant gradient)
        torch.testing.assert_close(d.full_tensor(), torch.full((4,), 0.9))
        torch.testing.assert_close(p.detach(), torch.full((4,), 0.9))
    finally:
        dist.destroy_process_group()
