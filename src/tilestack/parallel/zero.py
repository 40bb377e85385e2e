"""ZeRO-1 and ZeRO-2 (Rajbhandari et al. 2020) over a data-parallel group, written out: the optimizer sees only
this rank's 1/W slice of the flattened parameters.

    opt = ZeroOptimizer(model.parameters(), dp_group, stage=2, make_optimizer=lambda ps: torch.optim.AdamW(ps))
    loss.backward(); opt.reduce_gradients(); opt.step(); opt.zero_grad()

All parameters (the local shards of DTensors under tensor parallelism) are viewed as one flat vector of P
elements, padded to W * ceil(P / W); rank r owns slice r. The optimizer state (Adam's two moments: 8 bytes per
element in f32) and an f32 master copy exist for that slice only: 1/W of the memory of plain data parallelism.

- stage 1: gradients all-reduced whole (as DDP does), then this rank keeps its slice.
- stage 2: gradients reduce-scattered: each rank receives only its slice, summed (half the bytes of an all-reduce
  received, and the full gradient is freed after the step). This implementation reduces after backward, so
  the peak still holds one full gradient; FSDP2 (``dp_shard``) reduce-scatters per block during backward.
After the update each rank's slice is all-gathered back into every replica's parameters. The arithmetic of an
element-wise optimizer (SGD, Adam, AdamW) is that of the unsharded one, element for element.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from tilestack.parallel.config import ParallelConfigError
from tilestack.parallel.parallelize import local_grad

# torch 2.13 renamed the flat collectives (the old names warn); 2.11 has only the old ones
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


class ZeroOptimizer:
    def __init__(self, params: Iterable[torch.nn.Parameter], group, *, stage: int,
                 make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer]):
        if stage not in (1, 2):
            raise ParallelConfigError(f"ZeroOptimizer: stage={stage!r}; expected 1 or 2 (3 is FSDP2: dp_shard)")
        self.params = [p for p in params if p.requires_grad]
        self.group, self.stage = group, stage
        self.W, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.numels = [_local(p).numel() for p in self.params]
        total = sum(self.numels)
        self.shard = -(-total // self.W)                      # ceil(P / W)
        self.padded = self.shard * self.W
        lo = self.rank * self.shard
        flat = self._flatten([_local(p).detach() for p in self.params])
        # this rank's slice of the parameters, in f32: what the optimizer updates
        self.master = flat[lo:lo + self.shard].float().clone().requires_grad_(True)
        self.optimizer = make_optimizer([self.master])
        self.grad_shard: torch.Tensor | None = None

    def _flatten(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """(padded,) the tensors flattened, then zeros."""
        flat = torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.empty(0)
        return torch.cat([flat, flat.new_zeros(self.padded - flat.numel())])

    def _grads(self) -> list[torch.Tensor]:
        return [local_grad(p) if p.grad is not None else torch.zeros_like(_local(p)) for p in self.params]

    def reduce_gradients(self) -> None:
        """After backward: this rank's slice of the gradients averaged over the group (see the module docstring)."""
        flat = self._flatten(self._grads())
        if self.stage == 1:
            dist.all_reduce(flat, group=self.group)
            self.grad_shard = flat[self.rank * self.shard:(self.rank + 1) * self.shard].clone()
        else:
            self.grad_shard = flat.new_empty(self.shard)
            _reduce_scatter(self.grad_shard, flat, group=self.group)
            for p in self.params:                                  # the full gradient is not kept
                p.grad = None
        self.grad_shard.div_(self.W)

    def full_gradient(self) -> list[torch.Tensor]:
        """The reduced gradients, whole, one per parameter in local shape (all-gathered; for tests)."""
        if self.grad_shard is None:
            raise ParallelConfigError("ZeroOptimizer.full_gradient: no reduced gradient; call reduce_gradients() "
                                      "after backward first")
        full = self.grad_shard.new_empty(self.padded)
        _all_gather(full, self.grad_shard.contiguous(), group=self.group)
        return [t.view_as(_local(p)) for t, p in zip(full.split(self.numels + [self.padded - sum(self.numels)])[:-1],
                                                     self.params, strict=True)]

    @torch.no_grad()
    def step(self) -> None:
        """Update this rank's slice, then all-gather every slice into the parameters of every replica."""
        if self.grad_shard is None:
            raise ParallelConfigError("ZeroOptimizer.step: no reduced gradient; call reduce_gradients() first")
        self.master.grad = self.grad_shard.to(self.master.dtype)
        self.optimizer.step()
        full = self.master.new_empty(self.padded)
        _all_gather(full, self.master.detach().contiguous(), group=self.group)
        offset = 0
        for p, n in zip(self.params, self.numels, strict=True):
            local = _local(p)
            local.copy_(full[offset:offset + n].view_as(local))
            offset += n
        self.grad_shard = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.master.grad = None

    def state_bytes(self) -> int:
        """Bytes of optimizer state and master weights on this rank."""
        n = self.master.numel() * self.master.element_size()
        for st in self.optimizer.state.values():
            n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
        return n
