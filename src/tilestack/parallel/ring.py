"""Ring all-reduce on torch.distributed point-to-point: a reduce-scatter then an all-gather around the ring.

    ring_all_reduce(t, group)             # in place, the sum over the group (as dist.all_reduce)
    ring_reduce_scatter(t, group)         # -> this rank's fully reduced segment (a view of t)
    ring_all_gather(t, group)             # every rank's own segment broadcast to all (in place)
    ddp.register_comm_hook(group, ring_allreduce_hook)

The flat tensor is cut into W segments (W ranks; ``tensor_split``: sizes differ by at most one element). Step s
of the reduce-scatter sends segment (r - s) mod W to the next rank and adds the one received from the previous
rank into segment (r - s - 1) mod W; after W - 1 steps rank r holds segment (r + 1) mod W summed over all
ranks. The all-gather passes the finished segments round the ring in W - 1 more steps. Every rank sends
2 (W - 1) / W of the bytes whatever W is: time ~ 2 (W - 1) alpha + 2 (W - 1) / W * S / B.

Each step's segment goes as ``chunks`` messages, posted together (one ``batch_isend_irecv``), and the received
chunks are added in order as they complete, so adding chunk i overlaps the transfer of chunk i + 1 (the
pipelining of NCCL's ring).
Integer tensors give bit-equal results to dist.all_reduce (integer sums do not depend on the order); floating
point ones agree to rounding (the summation order differs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tilestack.errors import LaunchError


def _ring(group) -> tuple[int, int, int, int]:
    """(W, rank in group, global rank of the next rank, global rank of the previous one)."""
    W, r = dist.get_world_size(group), dist.get_rank(group)
    glob = (lambda i: dist.get_global_rank(group, i)) if group is not None else (lambda i: i)
    return W, r, glob((r + 1) % W), glob((r - 1) % W)


def _check(t: torch.Tensor, chunks: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise LaunchError(f"ring collective: tensor is {type(t).__name__}; expected a torch.Tensor")
    if not t.is_contiguous():
        raise LaunchError(f"ring collective: tensor of strides {t.stride()} is not contiguous; expected a "
                          "contiguous tensor (it is reduced in place through a flat view)")
    if not isinstance(chunks, int) or chunks < 1:
        raise LaunchError(f"ring collective: chunks={chunks!r}; expected a positive int")


def _check_same_size(t: torch.Tensor, group, nxt: int, prv: int, what: str) -> None:
    """Each rank sends its tensor's size (elements, bytes per element) to the next and compares the previous one's:
    a rank holding another size left one rank with a wrong sum and no error (the pieces of unequal segments were
    received into buffers of other sizes), the other failing. Both neighbours of a rank that differs raise (on
    3 ranks or more the others then fail in the ring on the transport, as after a rank gone away)."""
    mine = torch.tensor([t.numel(), t.element_size()], dtype=torch.int64, device=t.device)
    theirs = torch.empty_like(mine)
    for work in dist.batch_isend_irecv([dist.P2POp(dist.irecv, theirs, prv, group),
                                        dist.P2POp(dist.isend, mine, nxt, group)]):
        work.wait()
    if not torch.equal(mine, theirs):
        n, size = (int(v) for v in theirs)
        raise LaunchError(f"{what}: tensor has {t.numel()} elements of {t.element_size()} bytes here (global rank "
                          f"{dist.get_rank()}) and {n} of {size} bytes on global rank {prv}; expected one size and "
                          "dtype on every rank of the group")


@torch.no_grad()   # a parameter (a leaf that requires grad) is reduced in place too, as dist.all_reduce does
def _step(send: torch.Tensor, recv_into: torch.Tensor, nxt: int, prv: int, chunks: int, *, accumulate: bool,
          group) -> None:
    """Send ``send`` to ``nxt`` and receive a tensor of ``recv_into``'s size from ``prv``, both in ``chunks``
    pieces; add the received pieces into ``recv_into`` (or copy them) as they arrive."""
    send_parts = [p for p in send.tensor_split(chunks) if p.numel()]
    dst_parts = [p for p in recv_into.tensor_split(chunks) if p.numel()]
    bufs = [torch.empty_like(p) for p in dst_parts] if accumulate else dst_parts
    # one batch (an NCCL group): separately posted blocking-in-order sends and receives would deadlock on NCCL,
    # every rank's first receive waiting for a send queued behind its neighbour's receive
    ops = [dist.P2POp(dist.irecv, b, prv, group) for b in bufs] + [dist.P2POp(dist.isend, p, nxt, group)
                                                                   for p in send_parts]
    works = dist.batch_isend_irecv(ops) if ops else []
    for work, buf, dst in zip(works[:len(bufs)], bufs, dst_parts, strict=True):
        work.wait()
        if accumulate:
            dst.add_(buf)
    for work in works[len(bufs):]:
        work.wait()


def ring_reduce_scatter(t: torch.Tensor, group=None, *, chunks: int = 4, check_size: bool = True) -> torch.Tensor:
    """Sum ``t`` (contiguous, any shape) over ``group`` segment-wise, in place: on return segment (r + 1) mod W of
    ``t.view(-1).tensor_split(W)`` holds the full sum on rank r (returned, a view); other segments hold partials.
    ``check_size``: first compare the ranks' sizes (one small message; a LaunchError where they differ)."""
    _check(t, chunks)
    W, r, nxt, prv = _ring(group)
    if check_size and W > 1:
        _check_same_size(t, group, nxt, prv, "ring_reduce_scatter")
    segs = t.view(-1).tensor_split(W)
    for s in range(W - 1):
        _step(segs[(r - s) % W], segs[(r - s - 1) % W], nxt, prv, chunks, accumulate=True, group=group)
    return segs[(r + 1) % W]


def ring_all_gather(t: torch.Tensor, group=None, *, chunks: int = 4, owned_shift: int = 1,
                    check_size: bool = True) -> torch.Tensor:
    """In place: rank r's segment (r + owned_shift) mod W of ``t.view(-1).tensor_split(W)`` is copied to every
    rank (``owned_shift=1``: the layout ring_reduce_scatter leaves; 0: rank r owns segment r). ``check_size``: as
    ring_reduce_scatter's."""
    _check(t, chunks)
    W, r, nxt, prv = _ring(group)
    if check_size and W > 1:
        _check_same_size(t, group, nxt, prv, "ring_all_gather")
    segs = t.view(-1).tensor_split(W)
    for s in range(W - 1):
        _step(segs[(r + owned_shift - s) % W], segs[(r + owned_shift - s - 1) % W], nxt, prv, chunks,
              accumulate=False, group=group)
    return t


def ring_all_reduce(t: torch.Tensor, group=None, *, chunks: int = 4, check_size: bool = True) -> torch.Tensor:
    """In place: ``t`` becomes its sum over ``group`` (dist.all_reduce with ReduceOp.SUM); returns ``t``.
    ``check_size``: first compare the ranks' sizes (one small message; a LaunchError naming both where they
    differ); callers whose tensors have one size by construction (DDP's buckets) pass False."""
    _check(t, chunks)
    W, _, nxt, prv = _ring(group)
    if W == 1:
        return t
    if check_size:
        _check_same_size(t, group, nxt, prv, "ring_all_reduce")
    if t.numel() == 0:
        return t
    ring_reduce_scatter(t, group, chunks=chunks, check_size=False)
    return ring_all_gather(t, group, chunks=chunks, check_size=False)


def ring_allreduce_hook(state, bucket):  # no annotations: DDP compares them to objects, these would be strings
    """A DDP communication hook: the bucket's gradients averaged with ring_all_reduce over ``state`` (a process
    group, or None for the default one); returns a completed torch.futures.Future of the bucket."""
    buf = bucket.buffer()
    ring_all_reduce(buf, state, check_size=False)       # (DDP checked the parameters' shapes across ranks)
    buf.div_(dist.get_world_size(state))
    fut = torch.futures.Future()
    fut.set_result(buf)
    return fut
