"""Draws and checks shared by tests/test_fuzz_round17.py and tests/test_fuzz_round17_more.py."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from tilestack.errors import TilestackError

# wrong kinds, by label: what a fuzzer hands a numeric, boolean or name argument
POOL = {
    "str": "abc", "float": 1.5, "bool": True, "none": None, "list": [1, 2], "empty": [], "dict": {}, "nan": math.nan,
    "inf": math.inf, "ninf": -math.inf, "neg": -1, "zero": 0, "huge": 1 << 70, "array": np.ones(3),
    "tensor": torch.tensor(3.0),
}


def draws(arg: str, labels: tuple[str, ...], k: int = 4) -> list[str]:
    """``k`` labels of ``labels`` drawn with a seed fixed per argument (the same draws on every run)."""
    rng = np.random.default_rng(sum(map(ord, arg)) * 7919 + 17)
    return sorted(rng.choice(labels, size=min(k, len(labels)), replace=False).tolist())


def refused(call, arg: str, value) -> str:
    """The message of the clear refusal ``call()`` must give for ``arg=value``: a TilestackError, ValueError or
    TypeError raised by tilestack (not by numpy, torch or sqlite3) that names the argument."""
    with pytest.raises((TilestackError, ValueError, TypeError)) as info:
        call()
    message = str(info.value)
    assert re.search(rf"\b{re.escape(arg)}\b", message), f"{arg}={value!r}: {type(info.value).__name__}: {message}"
    assert "tilestack" in info.traceback[-1].path.as_posix(), f"{arg}={value!r} failed outside tilestack: {message}"
    return message
