"""The causal attention kernels' program order (kernels/attention_fwd.heavy_first): every (block, batch * head)
taken exactly once, the heaviest blocks started first across groups of HEAD_GROUP heads, on the reference
executor and Triton's interpreter; and the forward and backward through it against float64 with more heads than
one group holds, the last group narrower (B * H = 2 * 19 = 38: groups of 16, 16, 6)."""

import math

import pytest
import torch

import tilestack.lang as ts
from tilestack import config
from tilestack.kernels.attention_fwd import HEAD_GROUP, heavy_first

BACKENDS = ("reference", "triton")


@ts.kernel(grid=lambda Order: (Order.shape[1], Order.shape[0]))
def record_order(Order, Count, *, causal: bool, last_heaviest: bool):
    """Order[bh, block] = the program's place in the launch order (axis 0 fastest); Count[bh, block] += 1."""
    block, bh = heavy_first(causal, last_heaviest=last_heaviest, group=HEAD_GROUP)
    place = ts.RegTile[ts.f32, 1, 1]()
    ts.fill(place, ts.block_id(1) * ts.num_blocks(0) + ts.block_id(0))
    ts.store(Order, place, at=(bh, block))
    seen = ts.RegTile[ts.f32, 1, 1]()
    ts.load(seen, Count, at=(bh, block))
    ts.add(seen, seen, 1.0)
    ts.store(Count, seen, at=(bh, block))


def order_of(backend: str, heads: int, blocks: int, causal: bool, last_heaviest: bool) -> torch.Tensor:
    order = torch.full((heads, blocks), math.nan)
    count = torch.zeros(heads, blocks)
    with config.override(triton_interpret=True):
        record_order(order, count, causal=causal, last_heaviest=last_heaviest, backend=backend)
    assert torch.equal(count, torch.ones(heads, blocks)), f"programs per (head, block):\n{count}"
    return order


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads, blocks", [(1, 1), (3, 5), (HEAD_GROUP, 4), (2 * HEAD_GROUP + 6, 7), (40, 1)])
@pytest.mark.parametrize("last_heaviest", [True, False])
def test_causal_order_takes_every_block_once_heaviest_first(backend, heads, blocks, last_heaviest):
    order = order_of(backend, heads, blocks, True, last_heaviest)
    heavy = order.flip(1) if last_heaviest else order    # column c: each head's c-th heaviest block
    for first in range(0, heads, HEAD_GROUP):
        group = heavy[first:first + HEAD_GROUP]
        # within a group every head's heavier block starts before any lighter one, a level's heads side by side
        assert (group[:, 1:].min(dim=0).values > group[:, :-1].max(dim=0).values).all()
        assert torch.equal(group[:, 0].sort().values, group[:, 0].min() + torch.arange(len(group)))
        if first:                                          # groups one after another
            assert group.min() > heavy[:first].max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_not_causal_keeps_the_head_major_order(backend):
    order = order_of(backend, 5, 3, False, True)
    want = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    assert torch.equal(order, want)


def _reference(q, k, v, causal_align):
    nq, nk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    shift = nk - nq if causal_align == "bottom_right" else 0
    keep = torch.ones(nq, nk, dtype=torch.bool).tril(shift)
    s = s.masked_fill(~keep, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


@pytest.mark.parametrize("causal_align, nq, nk", [("top_left", 37, 37), ("bottom_right", 21, 45)])
def test_causal_attention_over_three_head_groups(causal_align, nq, nk):
    """B * H = 38 programs a block row (groups of 16, 16, 6), ragged lengths, GQA (19 query heads on 1 K/V
    head), forward and backward against float64."""
    g = torch.Generator().manual_seed(7)
    B, H, Hkv, D = 2, 19, 1, 16
    q = torch.randn(B, H, nq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, nk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, nk, D, generator=g, dtype=torch.float64)
    do = torch.randn(B, H, nq, D, generator=g, dtype=torch.float64)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    want = _reference(*ref, causal_align)
    want.backward(do)
    got_in = [t.float().requires_grad_() for t in (q, k, v)]
    with config.override(triton_interpret=True):
        import tilestack
        got = tilestack.attention(*got_in, causal=True, causal_align=causal_align)
        got.backward(do.float())
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-4)
    for a, b in zip(got_in, ref, strict=True):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=5e-4, atol=5e-4)
