"""Shared fixtures.

``rng``: a NumPy generator with a fresh seed per test, printed so a failing run can be replayed with
``TILESTACK_TEST_SEED=<seed>``.

On a machine without a GPU, Triton runs kernels through its interpreter, which it decides when first
imported; torch.compile and opcheck import Triton too, so the interpreter is turned on here, before any test.
"""

import os
import random
import sys

import numpy as np
import pytest
import torch

from tilestack import config

if not torch.cuda.is_available() and "triton" not in sys.modules:
    config.use_triton_interpreter()


@pytest.fixture
def rng() -> np.random.Generator:
    seed = int(os.environ.get("TILESTACK_TEST_SEED") or random.randrange(2**32))
    print(f"rng seed: {seed} (replay with TILESTACK_TEST_SEED={seed})")
    return np.random.default_rng(seed)
