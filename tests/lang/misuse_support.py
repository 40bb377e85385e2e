"""What the tile-language misuse rounds share: a kernel line found by its ``# E:tag`` comment, NaN-poisoned outputs,
and pytest.raises matching an error that starts with that line."""

import math
import os
import re

import pytest
import torch


def line_of(test_file: str, tag: str) -> str:
    """``<file name>:NN`` of the line of ``test_file`` carrying ``# E:tag``."""
    with open(test_file) as f:
        for n, text in enumerate(f, 1):
            if text.rstrip().endswith(f"# E:{tag}"):
                return f"{os.path.basename(test_file)}:{n}"
    raise AssertionError(tag)


def nan(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.full(shape, math.nan, dtype=dtype)


def untouched(t: torch.Tensor) -> bool:
    return bool(torch.isnan(t).all())


def raises_at(test_file: str, exc, tag: str, *fragments: str):
    """pytest.raises(exc) whose message starts with the tagged line and holds each fragment."""
    pattern = "^" + re.escape(line_of(test_file, tag)) + ": " + "".join(f"(?s:.*){re.escape(f)}" for f in fragments)
    return pytest.raises(exc, match=pattern)
