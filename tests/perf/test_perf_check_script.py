"""scripts/gpu/perf_check.py on a machine without a GPU: it must say so and still write its table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu" / "perf_check.py"


def test_runs_and_reports_no_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script runs for real there")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TILESTACK_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 1
    assert "perf_check" in p.stdout and "no CUDA GPU" in p.stdout
    (check,) = json.loads((tmp_path / "out" / "checks.json").read_text())
    assert check["name"] == "device" and not check["ok"]


def test_capture_graph_needs_cuda():
    import torch

    from tilestack.perf import timing

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(timing.TimingError, match="no CUDA device"):
        timing.capture_graph(lambda: None, None)
