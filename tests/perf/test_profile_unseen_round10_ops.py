"""The counting fixes of the profiler's tenth held-out round (tests/perf/test_profile_unseen_round10.py), op by op:

- torch.isin had no FLOP formula (reported uncounted): now by torch's own choice of algorithm, pairwise compares for
  few test elements, a sort of both sides otherwise;
- torch.segment_reduce's backward (aten::_segment_reduce_backward) had none: now per element of the data, by
  reduction;
- a dense tensor made sparse (Tensor.to_sparse, to_sparse_csr, ...) was reported uncounted: it computes nothing (its
  nonzeros found and copied out, as torch.nonzero);
- an op over a batch of 0 moved no bytes: its empty output and empty input share the null data pointer, which read
  as an alias (a view), so a convolution or a linear of 0 rows did not read its weight.

Each count is written out from the shapes here, never read off the profiler.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tilestack.perf import counting, formulas

sys.path.insert(0, str(Path(__file__).parent))
from _profile_helpers import FILTERS, one_row  # noqa: E402

pytestmark = FILTERS


def counts_of(fn):
    return counting.count_ops(fn)


def sort_compares(n):
    return n * math.ceil(math.log2(n)) if n > 1 else 0


def test_isin_with_few_test_elements_counts_each_pair():
    """E = 40 elements, T = 5 < 10 * 40^0.145 (= 17): each element compared with each test element."""
    x, stop = torch.randint(0, 50, (4, 10)), torch.tensor([1, 3, 5, 7, 9])
    assert stop.numel() < int(10 * x.numel() ** 0.145)
    c = one_row(counts_of(lambda: torch.isin(x, stop)), "aten::isin")
    assert not c.unsupported and c.flops == x.numel() * stop.numel()
    assert c.bytes_read == (x.numel() + stop.numel()) * 8 and c.bytes_written == x.numel()


@pytest.mark.parametrize("assume_unique", [False, True])
def test_isin_with_many_test_elements_counts_the_sorts(assume_unique):
    """E = 12, T = 30 >= 10 * 12^0.145 (= 14): torch sorts instead; both sides sorted unique first unless
    assume_unique, then E + T sorted together and each neighbouring pair compared."""
    x, test = torch.randperm(100)[:12], torch.randperm(100)[:30]
    assert test.numel() >= int(10 * x.numel() ** 0.145)
    c = one_row(counts_of(lambda: torch.isin(x, test, assume_unique=assume_unique)), "aten::isin")
    e, t = x.numel(), test.numel()
    unique = 0 if assume_unique else sort_compares(e) + sort_compares(t)
    assert not c.unsupported and c.flops == unique + sort_compares(e + t) + e + t


def test_isin_with_a_scalar_side_counts_it_as_one_element():
    x = torch.randint(0, 9, (6,))
    assert one_row(counts_of(lambda: torch.isin(x, 3)), "aten::isin").flops == x.numel()
    assert one_row(counts_of(lambda: torch.isin(3, x)), "aten::isin").flops == x.numel()
    assert one_row(counts_of(lambda: torch.isin(torch.empty(0, dtype=torch.long), x)), "aten::isin").flops == 0


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min", "prod"])
def test_segment_reduce_backward_is_counted_per_data_element(reduce):
    """(6, 3) data in segments of 2 and 4: the forward one combine per data element, the backward
    SEGMENT_BWD_FLOPS_PER_ELEMENT[reduce] per data element (a copy for sum: a true 0, not a missing formula)."""
    data = torch.randn(6, 3, requires_grad=True)

    def step():
        torch.segment_reduce(data, reduce, lengths=torch.tensor([2, 4])).sum().backward()

    counts = counts_of(step)
    assert one_row(counts, "aten::segment_reduce").flops == data.numel()
    back = one_row(counts, "aten::_segment_reduce_backward")
    assert not back.unsupported
    assert back.flops == formulas.SEGMENT_BWD_FLOPS_PER_ELEMENT[reduce] * data.numel()
    assert back.bytes_written == data.numel() * 4


def test_segment_reduce_backward_by_offsets_counts_alike():
    data = torch.randn(5, 2, requires_grad=True)
    counts = counts_of(lambda: torch.segment_reduce(data, "mean", offsets=torch.tensor([0, 1, 5])).sum().backward())
    assert one_row(counts, "aten::_segment_reduce_backward").flops == data.numel()


@pytest.mark.parametrize("convert,op", [
    (lambda x: x.to_sparse(), "aten::_to_sparse"),
    (lambda x: x.to_sparse_csr(), "aten::_to_sparse_csr"),
    (lambda x: x.to_sparse_csc(), "aten::_to_sparse_csc"),
    (lambda x: x.to_sparse_bsr((2, 2)), "aten::_to_sparse_bsr"),
], ids=["coo", "csr", "csc", "bsr"])
def test_dense_to_sparse_moves_data_and_computes_nothing(convert, op):
    """The conversion reads the dense (4, 6) matrix and writes the sparse one; its 0 FLOPs is the count (it is
    listed as computing nothing, not as uncounted)."""
    x = torch.randn(4, 6).relu()
    c = one_row(counts_of(lambda: convert(x)), op)
    assert c.flops == 0 and not c.unsupported
    assert c.bytes_read == x.numel() * 4 and c.bytes_written > 0


def test_a_batch_of_zero_reads_the_weights_of_its_layers():
    """Over 0 rows a convolution and a linear compute nothing but still take their weight and bias as inputs (the
    empty input and output no longer read as aliases of each other); a view of an empty tensor still moves nothing."""
    w, b = torch.randn(4, 3, 3, 3), torch.randn(4)
    conv = one_row(counts_of(lambda: F.conv2d(torch.empty(0, 3, 5, 5), w, b)), "aten::convolution")
    assert conv.flops == 0 and conv.bytes_read == (w.numel() + b.numel()) * 4 and conv.bytes_written == 0
    lw, lb = torch.randn(5, 3), torch.randn(5)
    linear = one_row(counts_of(lambda: F.linear(torch.empty(0, 3), lw, lb)), "aten::addmm")
    assert linear.flops == 0 and linear.bytes_read == (lw.numel() + lb.numel()) * 4
    empty = torch.empty(0, 6)
    counts = counts_of(lambda: empty.view(0, 2, 3).transpose(1, 2))
    assert all(c.bytes_read + c.bytes_written == 0 for c in counts.values())


def test_a_tensor_subclass_built_inside_the_counted_step_is_built():
    """torch.nn.attention.bias.causal_lower_right inside the step (torch.Tensor's legacy constructor under a dispatch
    mode): built, its attention counted over every key (4*B*H*Lq*Lk*D, the mask materialised), and torch.Tensor left
    without a constructor of tilestack's once counted, also when the step raises."""
    import torch.nn.attention.bias as attention_bias

    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8)
    mask = attention_bias.causal_lower_right
    counts = counts_of(lambda: F.scaled_dot_product_attention(q, k, k, attn_mask=mask(3, 5)))
    assert one_row(counts, "aten::_scaled_dot_product_flash_attention_for_cpu").flops == 4 * 2 * 3 * 5 * 8
    assert "__new__" not in vars(torch.Tensor)

    def raising():
        attention_bias.causal_upper_left(2, 2)
        raise ValueError("the model's own error")

    with pytest.raises(ValueError, match="the model's own error"):
        counts_of(raising)
    assert "__new__" not in vars(torch.Tensor) and type(torch.Tensor(2)) is torch.Tensor


@pytest.mark.parametrize("dist,op", [
    (lambda c: torch.distributions.Gamma(c, torch.ones(4)), "aten::_standard_gamma_grad"),
    (lambda c: torch.distributions.Dirichlet(c), "aten::_dirichlet_grad"),
], ids=["gamma", "dirichlet"])
def test_reparameterised_gamma_and_dirichlet_gradients_are_counted(dist, op):
    """rsample's gradient through a Gamma (or Dirichlet) draw: one FLOP per element, as every element-wise special
    function (lgamma, digamma) is counted; it was reported uncounted."""
    conc = torch.rand(4, requires_grad=True)

    def step():
        dist(conc + 0.5).rsample().sum().backward()

    c = one_row(counts_of(step), op)
    assert not c.unsupported and c.flops == 4


def test_ldl_solve_is_counted_as_a_factored_solve():
    """linalg.ldl_solve of a factored n x n system for k right-hand sides: two triangular solves, 2 n^2 k (the
    diagonal's n k left out, as formulas.factorization's factored_solve); it was reported uncounted."""
    a = torch.randn(3, 3)
    ld, pivots = torch.linalg.ldl_factor(a @ a.T + 3 * torch.eye(3))
    rhs = torch.randn(3, 2)
    c = one_row(counts_of(lambda: torch.linalg.ldl_solve(ld, pivots, rhs)), "aten::linalg_ldl_solve")
    assert not c.unsupported and c.flops == 2 * 3**2 * 2
