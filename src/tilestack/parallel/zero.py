"""ZeRO-1 and ZeRO-2 (Rajbhandari et al. 2020) over a data-parallel group, written out: the optimizer sees only
this rank's 1/W slice of the flattened parameters.

    opt = ZeroOptimizer(model.parameters(), dp_group, stage=2, make_optimizer=lambda ps: torch.optim.AdamW(ps))
    loss.backward(); opt.reduce_gradients(); opt.step(); opt.zero_grad()

All parameters (the local shards of DTensors under tensor parallelism) are viewed as one flat vector. The
optimizer state (Adam's two moments: 8 bytes per element in f32) and an f32 master copy (f64 for f64
parameters) exist for this rank's slice only: 1/W of the memory of plain data parallelism.

- stage 1: gradients all-reduced whole (as DDP does), then this rank keeps its slice.
- stage 2: gradients reduce-scattered: each rank receives only its slice, summed (half the bytes of an all-reduce
  received). With ``overlap`` (the Trainer's choice without a pipeline) each bucket of gradients is
  reduce-scattered from a gradient hook as soon as backward has produced it and its full gradients are freed
  there, so at most about one bucket of full gradients is alive beyond the slices.
The flat vector is cut into buckets of consecutive parameters (the last parameters first, as backward produces
them); each bucket is padded to a multiple of W and rank r owns slice r of every bucket.
After the update each rank's slice is all-gathered back into every replica's parameters. The arithmetic of an
element-wise optimizer (SGD, Adam, AdamW) is that of the unsharded one, element for element.
"""

from __future__ import annotations

import dataclasses
import functools
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


@dataclasses.dataclass
class _Bucket:
    """Consecutive parameters reduced together: elements [rank * shard, (rank + 1) * shard) of their flattened,
    zero-padded gradients (``padded`` = W * shard elements) are this rank's."""
    index: list[int]            # into ZeroOptimizer.params
    numels: list[int]
    shard: int
    padded: int
    ready: int = 0              # gradients accumulated in this backward (overlapped stage 2)


class ZeroOptimizer:
    def __init__(self, params: Iterable[torch.nn.Parameter], group, *, stage: int,
                 make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
                 bucket_numel: int = 1 << 22, overlap: bool = False):
        """``bucket_numel``: elements per gradient bucket; ``overlap`` (stage 2): reduce-scatter each bucket from
        a gradient hook as soon as backward has produced it, and free its gradients there (one backward per
        step, one accumulation per parameter: not with pipeline micro-batches or tied weights)."""
        if stage not in (1, 2):
            raise ParallelConfigError(f"ZeroOptimizer: stage={stage!r}; expected 1 or 2 (3 is FSDP2: dp_shard)")
        if not isinstance(bucket_numel, int) or bucket_numel < 1:
            raise ParallelConfigError(f"ZeroOptimizer: bucket_numel={bucket_numel!r}; expected a positive int")
        self.params = [p for p in params if p.requires_grad]
        self.group, self.stage = group, stage
        self.W, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.numels = [_local(p).numel() for p in self.params]
        # buckets of consecutive parameters, the last first: the order in which backward produces gradients
        self.buckets: list[_Bucket] = []
        index: list[int] = []
        for i in reversed(range(len(self.params))):
            index.append(i)
            if sum(self.numels[j] for j in index) >= bucket_numel or i == 0:
                n = sum(self.numels[j] for j in index)
                shard = -(-n // self.W)                         # ceil(n / W)
                self.buckets.append(_Bucket(index, [self.numels[j] for j in index], shard, shard * self.W))
                index = []
        # this rank's slice of every bucket's parameters, in f32 (or f64): what the optimizer updates
        self.master = torch.cat([self._flatten(b, [_local(self.params[j]).detach() for j in b.index])
                                 [self.rank * b.shard:(self.rank + 1) * b.shard] for b in self.buckets]
                                ).to(self._master_dtype()).clone().requires_grad_(True)
        self.optimizer = make_optimizer([self.master])
        self.pieces: list[torch.Tensor | None] = [None] * len(self.buckets)
        self.got_grad: set[int] = set()     # parameters with a gradient since the last step (the rest: unused)
        self.grad_shard: torch.Tensor | None = None
        self.overlap = overlap and stage == 2
        if self.overlap:
            for k, b in enumerate(self.buckets):
                for j in b.index:
                    self.params[j].register_post_accumulate_grad_hook(functools.partial(self._grad_ready, k))

    def _master_dtype(self) -> torch.dtype:
        """f32, or wider where a parameter is (an f32 master of f64 parameters rounded every update to f32)."""
        dtype = torch.float32
        for p in self.params:
            dtype = torch.promote_types(dtype, _local(p).dtype)
        return dtype

    def _flatten(self, b: _Bucket, tensors: list[torch.Tensor]) -> torch.Tensor:
        """(b.padded,) the tensors flattened, then zeros."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        return torch.cat([flat, flat.new_zeros(b.padded - flat.numel())])

    def _reduce_bucket(self, k: int) -> None:
        b = self.buckets[k]
        self.got_grad.update(j for j in b.index if self.params[j].grad is not None)
        grads = [local_grad(self.params[j]) if self.params[j].grad is not None
                 else torch.zeros_like(_local(self.params[j])) for j in b.index]
        flat = self._flatten(b, grads)
        if self.stage == 1:
            dist.all_reduce(flat, group=self.group)
            piece = flat[self.rank * b.shard:(self.rank + 1) * b.shard].clone()
        else:
            piece = flat.new_empty(b.shard)
            _reduce_scatter(piece, flat, group=self.group)
            for j in b.index:                                      # the full gradient is not kept
                self.params[j].grad = None
        piece.div_(self.W)
        # several backwards before reduce_gradients (gradient accumulation): each one's reduced slice adds up
        self.pieces[k] = piece if self.pieces[k] is None else self.pieces[k].add_(piece)

    def _grad_ready(self, k: int, _param: torch.Tensor) -> None:
        b = self.buckets[k]
        b.ready += 1
        if b.ready == len(b.index):
            b.ready = 0                      # (the next backward of an accumulation counts afresh)
            self._reduce_bucket(k)

    def reduce_gradients(self) -> None:
        """After backward: this rank's slice of the gradients averaged over the group (see the module docstring);
        buckets already reduced during backward (``overlap``) are not reduced again. Stage 2 frees the full
        gradients, so the slices of calls not followed by ``step`` add up (as the full gradients of stage 1 do,
        which it keeps until ``zero_grad``)."""
        for k, b in enumerate(self.buckets):
            pending = any(self.params[j].grad is not None for j in b.index)
            # not overlapped, a bucket with a parameter that got no gradient, or gradients since its last reduction
            if self.pieces[k] is None or pending:
                self._reduce_bucket(k)
            b.ready = 0
        shard = torch.cat(self.pieces)
        self.pieces = [None] * len(self.buckets)
        if self.stage == 2 and self.grad_shard is not None:
            shard = self.grad_shard.add_(shard)
        self.grad_shard = shard

    def shard_spans(self):
        """(parameter index, start, stop) for every parameter with elements in this rank's slice: those elements
        are ``grad_shard[start:stop]`` (and ``master[start:stop]``); padding belongs to none."""
        offset = 0
        for b in self.buckets:
            mine = (self.rank * b.shard, (self.rank + 1) * b.shard)
            begin = 0
            for j, n in zip(b.index, b.numels, strict=True):
                lo, hi = max(begin, mine[0]), min(begin + n, mine[1])
                if lo < hi:
                    yield j, offset + lo - mine[0], offset + hi - mine[0]
                begin += n
            offset += b.shard

    def _gather_buckets(self, shard: torch.Tensor):
        """Every rank's ``shard`` (laid out as master) all-gathered a bucket at a time: yields (parameter index,
        whole tensor in local shape) for the bucket's parameters, views of one (padded,) buffer that the next
        bucket's gather replaces."""
        offset = 0
        for b in self.buckets:
            full = shard.new_empty(b.padded)
            _all_gather(full, shard[offset:offset + b.shard].contiguous(), group=self.group)
            offset += b.shard
            for j, t in zip(b.index, full[:sum(b.numels)].split(b.numels), strict=True):
                yield j, t.view_as(_local(self.params[j]))
            del full, t                  # freed before the next bucket's buffer is made

    def _gather(self, shard: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``shard`` all-gathered: one whole tensor per parameter, local shape (every bucket kept)."""
        out: list[torch.Tensor | None] = [None] * len(self.params)
        for j, whole in self._gather_buckets(shard):
            out[j] = whole
        return out

    def full_gradient(self) -> list[torch.Tensor]:
        """The reduced gradients, whole, one per parameter in local shape (all-gathered; for tests)."""
        if self.grad_shard is None:
            raise ParallelConfigError("ZeroOptimizer.full_gradient: no reduced gradient; call reduce_gradients() "
                                      "after backward first")
        return self._gather(self.grad_shard)

    @torch.no_grad()
    def step(self) -> None:
        """Update this rank's slice, then all-gather every slice into the parameters of every replica."""
        if self.grad_shard is None:
            raise ParallelConfigError("ZeroOptimizer.step: no reduced gradient; call reduce_gradients() first")
        self.master.grad = self.grad_shard.to(self.master.dtype)
        # a parameter no backward reached (unused by the model's forward) is skipped by torch's optimizers, as a
        # grad of None; in the flat slice its zeros were decayed by AdamW's weight decay: its elements and their
        # state (moments) are put back after the update (the graph, so the set, is the same on every rank)
        unused = [(lo, hi) for j, lo, hi in self.shard_spans() if j not in self.got_grad]
        kept = [(t, lo, hi, t[lo:hi].clone()) for t in self._elementwise() for lo, hi in unused]
        self.optimizer.step()
        for t, lo, hi, old in kept:
            t[lo:hi] = old
        # a bucket at a time, each copied into its parameters before the next is gathered: one bucket of whole
        # parameters alive beyond them, where gathering every bucket first held a second copy of the model
        for j, whole in self._gather_buckets(self.master.detach()):
            _local(self.params[j]).copy_(whole)
            del whole                    # (the loop variable would keep the bucket's buffer into the next gather)
        self.grad_shard = None
        self.got_grad = set()

    def _elementwise(self) -> list[torch.Tensor]:
        """The master slice and every optimizer state tensor laid out like it (Adam's moments)."""
        state = self.optimizer.state.get(self.master, {})
        return [self.master.data] + [v for v in state.values()
                                     if isinstance(v, torch.Tensor) and v.shape == self.master.shape]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.master.grad = None
        self.grad_shard = None
        self.pieces = [None] * len(self.buckets)
        self.got_grad = set()

    def state_bytes(self) -> int:
        """Bytes of optimizer state and master weights on this rank."""
        n = self.master.numel() * self.master.element_size()
        for st in self.optimizer.state.values():
            n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
        return n
