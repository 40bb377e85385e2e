"""``torch.compile(model, backend="tilestack")`` in a fresh process that never imports tilestack: Dynamo finds
the backend through the ``torch_dynamo_backends`` entry point that pyproject.toml declares (visible once the
package is installed, ``pip install -e .`` as scripts/setup.sh does)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points

ROOT = pathlib.Path(__file__).resolve().parents[2]
GROUP = "torch_dynamo_backends"        # the group torch._dynamo.backends.registry reads

CHILD = """
import sys
import torch
from torch import nn

loaded = lambda: sorted(m for m in sys.modules if m == "tilestack" or m.startswith("tilestack."))
assert not loaded(), loaded()
model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).to(torch.bfloat16).eval()
x = torch.randn(4, 8, dtype=torch.bfloat16)
with torch.no_grad():
    got = torch.compile(model, backend="tilestack", options={"inner": "eager", "check": True, "min_rows": 0})(x)
    want = model(x)
torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
import tilestack.compile as tc     # already loaded by Dynamo, through the entry point
print(dict(tc.last_report().swapped))
"""


def test_pyproject_declares_the_backend():
    with open(ROOT / "pyproject.toml", "rb") as f:
        declared = tomllib.load(f)["project"]["entry-points"][GROUP]
    assert declared == {"tilestack": "tilestack.compile.backend:tilestack_backend"}


def test_installed_entry_point_loads_the_backend_function():
    eps = {ep.name: ep for ep in entry_points(group=GROUP)}
    assert "tilestack" in eps, ("the installed tilestack predates its torch_dynamo_backends entry point: "
                                "run `pip install -e .` (scripts/setup.sh) again")
    from tilestack.compile.backend import tilestack_backend
    assert eps["tilestack"].load() is tilestack_backend


def test_compile_by_name_without_importing_tilestack():
    env = dict(os.environ, TILESTACK_BACKEND="reference")    # the kernels on the CPU: the reference executor
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT / "tests", env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "{'linear_epilogue': 1}", done.stdout
