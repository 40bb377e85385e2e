"""Ring all-reduce on point-to-point messages, against dist.all_reduce on 3 gloo processes (an odd ring: the
segment arithmetic is not symmetric) and on a 2-rank sub-group whose ranks are not the global ones."""

import par_workers as W
import pytest
import torch

from tilestack.errors import LaunchError
from tilestack.parallel import ring_all_reduce, run_local


def test_ring_all_reduce_matches_the_library():
    checked = run_local(W.ring_cases, 3, timeout_s=300)
    assert len(checked[0]) == 2 * 15 and len(checked[1]) == 15        # rank 1 is not in the sub-group


def test_bad_tensors_are_refused_before_any_message():
    with pytest.raises(LaunchError, match="not contiguous"):
        ring_all_reduce(torch.zeros(4, 4).t())
    with pytest.raises(LaunchError, match="chunks=0; expected a positive int"):
        ring_all_reduce(torch.zeros(4), chunks=0)
    with pytest.raises(LaunchError, match="tensor is list"):
        ring_all_reduce([1.0, 2.0])
