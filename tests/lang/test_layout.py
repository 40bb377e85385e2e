"""tilestack.lang.layout: the overlap check against brute force over small layouts, and memory sharing."""

import itertools

import pytest
import torch

from tilestack.errors import LaunchError
from tilestack.lang.layout import check_not_aliased, check_writable, overlap_reason, shares_memory


def offsets_repeat(shape, strides) -> bool:
    seen = set()
    for idx in itertools.product(*(range(n) for n in shape)):
        off = sum(i * s for i, s in zip(idx, strides, strict=True))
        if off in seen:
            return True
        seen.add(off)
    return False


LAYOUTS = [(shape, strides) for shape in itertools.product((0, 1, 2, 3), repeat=2)
           for strides in itertools.product((0, 1, 2, 3, 4, 6), repeat=2)]
LAYOUTS += [((2, 3, 2), st) for st in itertools.product((1, 2, 3, 6, 7), repeat=3)]


def test_overlap_reason_never_misses_an_overlap():
    """Sound: every layout that reaches an element twice is flagged (a few interleaved layouts that do not
    overlap are flagged too; that is the documented conservative side)."""
    flagged_safe = 0
    for shape, strides in LAYOUTS:
        repeats, reason = offsets_repeat(shape, strides), overlap_reason(shape, strides)
        assert not repeats or reason is not None, (shape, strides)
        flagged_safe += reason is not None and not repeats
    assert flagged_safe < len(LAYOUTS) // 10


@pytest.mark.parametrize("make", [
    lambda: torch.zeros(5, 7), lambda: torch.zeros(5, 7).t(), lambda: torch.zeros(9, 11)[2:7, 1:9:3],
    lambda: torch.zeros(2, 3, 4).permute(2, 0, 1), lambda: torch.zeros(4, 1, 6)[:, :, ::2],
    lambda: torch.zeros(6, 1).expand(6, 1), lambda: torch.zeros(0, 5).expand(0, 5)],
    ids=("contiguous", "transposed", "sliced", "permuted", "expand size 1", "column", "empty"))
def test_layouts_torch_makes_without_as_strided_are_writable(make):
    t = make()
    assert overlap_reason(tuple(t.shape), tuple(t.stride())) is None
    check_writable("k", "out", t)


@pytest.mark.parametrize("t,message", [
    (torch.zeros(16).as_strided((4, 4), (1, 1)), r"k: out has shape \(4, 4\) and strides \(1, 1\)"),
    (torch.zeros(1, 5).expand(3, 5), r"stride 0 on axis 0 \(size 3\)"),
    (torch.zeros(12).as_strided((3, 4), (3, 1)), r"stride 3 on axis 0"),
], ids=("(1,1)", "expand", "rows overlap"))
def test_overlapping_layouts_are_refused(t, message):
    with pytest.raises(LaunchError, match=message):
        check_writable("k", "out", t)


def test_shares_memory():
    base = torch.zeros(8, 8)
    assert shares_memory(base, base) and shares_memory(base[2:5], base[4:])
    assert not shares_memory(base[:4], base[4:])            # disjoint rows
    assert not shares_memory(base, torch.zeros(8, 8))       # another storage
    assert not shares_memory(base[:0], base)                # nothing in it
    meta = torch.zeros(3, device="meta")
    assert not shares_memory(meta, meta)                     # no memory at all
    with pytest.raises(LaunchError, match="k: out shares memory with b"):
        check_not_aliased("k", "out", base[4:], a=base[:4], b=base[7:], c=None)
