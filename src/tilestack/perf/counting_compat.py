"""What torch cannot run under a dispatch mode, and how the counting pass (``tilestack.perf.counting``) runs it anyway.

    with counting_compat.subclasses_built_unwatched(), Counter():
        step()          # a forward that builds torch.nn.attention.bias.causal_lower_right(...) counts as it runs

A tensor subclass with no ``__new__`` of its own (``torch.nn.attention.bias.CausalBias``, built by
``causal_lower_right`` / ``causal_upper_left`` inside a forward) is made by torch.Tensor's legacy constructor, which
allocates its tensor through the dispatcher. Under a dispatch mode that tensor comes back to Python as a plain
Tensor, and torch then refuses to make it the subclass ("the raw Tensor object is already associated to a python
object of type Tensor"): the model runs eagerly but not while counted. Such constructions run with the modes off:
an allocation of an empty tensor, nothing to count; the ops the subclass runs afterwards are counted as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def subclasses_built_unwatched() -> Iterator[None]:
    """While open, ``torch.Tensor.__new__`` of a subclass (not of torch.Tensor itself) runs with the dispatch modes
    off; torch.Tensor is left as it was on exit (and left alone where something else gave it a ``__new__``)."""
    import torch
    from torch.utils._python_dispatch import _disable_current_modes

    if "__new__" in vars(torch.Tensor):
        yield
        return
    base_new = torch._C.TensorBase.__new__

    def new(cls: Any, *args: Any, **kwargs: Any) -> Any:
        if cls is torch.Tensor:
            return base_new(cls, *args, **kwargs)
        with _disable_current_modes():
            return base_new(cls, *args, **kwargs)

    torch.Tensor.__new__ = staticmethod(new)  # type: ignore[assignment]
    try:
        yield
    finally:
        del torch.Tensor.__new__
