"""Shared fixtures.

``rng``: a NumPy generator with a fresh seed per test, printed so a failing run can be replayed with
``TILESTACK_TEST_SEED=<seed>``.

The session's cache folder (TILESTACK_CACHE_DIR) is a fresh temporary one unless the environment names one: no
test reads what an earlier run left in ~/.cache/tilestack.

Nothing here turns Triton's interpreter on: the Triton backend decides per launch (CPU tensors with no GPU
present run under the interpreter) whatever was imported first, as it does for a user.
"""

import atexit
import os
import random
import shutil
import sys
import tempfile

import numpy as np
import pytest

# A cache folder of the session's own (unless TILESTACK_CACHE_DIR names one), set before tilestack is imported so
# that the processes tests start inherit it too. In the user's ~/.cache/tilestack what a test stores (a measured
# gloo fit, CPU ceilings, profile results, tuned configs) outlived the run: the next run on the machine read it in
# place of measuring afresh, so a test could pass or fail by what an earlier run, or the user, left there.
if not os.environ.get("TILESTACK_CACHE_DIR"):
    _SESSION_CACHE = tempfile.mkdtemp(prefix="tilestack-test-cache-")
    os.environ["TILESTACK_CACHE_DIR"] = _SESSION_CACHE
    atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)
    if "tilestack.config" in sys.modules:   # imported already (a plugin): its knobs read the environment then
        from pathlib import Path

        sys.modules["tilestack.config"].knobs.cache_dir = Path(_SESSION_CACHE)


@pytest.fixture
def rng() -> np.random.Generator:
    seed = int(os.environ.get("TILESTACK_TEST_SEED") or random.randrange(2**32))
    print(f"rng seed: {seed} (replay with TILESTACK_TEST_SEED={seed})")
    return np.random.default_rng(seed)
