"""A misspelled constant or keyword (a kernel's, or a library function's config passed through to its kernel) is
refused before any work with the nearest name it could have meant."""

import pytest
import torch

import tilestack.lang as ts
from tilestack.errors import LaunchError
from tilestack.kernels.attention_fwd import attention_forward


@ts.kernel(grid=(1,))
def scale_k(X, Y, *, BLOCK: int = 16, CAUSAL: bool = False):
    x = ts.RegTile[ts.f32, 1, BLOCK]()
    ts.load(x, X, at=(0, 0))
    ts.store(Y, x, at=(0, 0))


def test_a_misspelled_kernel_constant_names_the_nearest():
    x = torch.zeros(1, 16)
    with pytest.raises(LaunchError, match=r"scale_k: unknown constant\(s\) \['BLOK'\] \('BLOK': did you mean "
                                          r"'BLOCK'\?\); its constants are \['BLOCK', 'CAUSAL'\]"):
        scale_k(x, torch.empty_like(x), BLOK=16, backend="reference")
    with pytest.raises(LaunchError, match=r"unknown constant\(s\) \['ZZZ'\]; its constants"):   # nothing near
        scale_k(x, torch.empty_like(x), ZZZ=1, backend="reference")


def test_a_misspelled_library_keyword_names_the_nearest():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(LaunchError, match=r"\('causl': did you mean 'causal'\?\)"):
        attention_forward(q, q, q, causl=True, backend="reference")
