"""Shared fixtures.

``rng``: a NumPy generator with a fresh seed per test, printed so a failing run can be replayed with
``TILESTACK_TEST_SEED=<seed>``.

Nothing here turns Triton's interpreter on: the Triton backend decides per launch (CPU tensors with no GPU
present run under the interpreter) whatever was imported first, as it does for a user.
"""

import os
import random

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    seed = int(os.environ.get("TILESTACK_TEST_SEED") or random.randrange(2**32))
    print(f"rng seed: {seed} (replay with TILESTACK_TEST_SEED={seed})")
    return np.random.default_rng(seed)
