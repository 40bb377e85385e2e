"""Round nine, part three: a result store that does not open, found only after the work it was to keep.

What it found (each test failed before its fix):
- ``tilestack profile model.py --db garbage.sqlite`` loaded the model, measured the device, profiled and printed the
  table, then failed at the store; ``tilestack train`` (which stores into the default store) trained every step
  first. Both now open the store before any work (``cli.args.check_store``) and refuse it naming the option; with
  ``--no-store`` the store is not read;
- ``tilestack profile --budget inf`` passed the command's "> 0" check and was refused inside the profiler after the
  model was loaded and the device measured: refused with the other options now.
"""

from __future__ import annotations

import re
import time

import pytest
from typer.testing import CliRunner

from tilestack import config
from tilestack.cli import _register, app

_register()

MODEL = """
import torch


def model():
    return torch.nn.Linear(8, 8), (torch.randn(4, 8),)
"""


def _invoke(args, tmp_path):
    with config.override(cache_dir=tmp_path / "cache"):
        res = CliRunner().invoke(app, args)
    return res, " ".join(re.sub("[\u2500-\u257f]", "", res.output).split())


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(MODEL)
    return f"{path}:model"


@pytest.fixture
def garbage(tmp_path):
    path = tmp_path / "garbage.sqlite"
    path.write_text("these are not the bytes of a SQLite database\n" * 20)
    return path


def test_profile_refuses_a_store_that_does_not_open_before_profiling(target, garbage, tmp_path):
    """Before: the whole profile ran and printed (its table, the device's ceilings measured), then the store
    failed. Now exit 2 naming --db and the file, with nothing profiled."""
    started = time.monotonic()
    res, flat = _invoke(["profile", target, "--steps", "2", "--budget", "5", "--db", str(garbage)], tmp_path)
    assert res.exit_code == 2, res.output
    assert "Invalid value for --db" in flat and "is not a readable SQLite database" in flat, flat
    assert "or --no-store" in flat and "move it aside" in flat
    assert "aten::addmm" not in flat            # no op profiled
    assert not (tmp_path / "cache" / "perf").exists() or not any((tmp_path / "cache" / "perf").glob("ceilings*"))
    assert time.monotonic() - started < 30


def test_profile_without_storing_does_not_read_the_store(target, garbage, tmp_path):
    res, flat = _invoke(["profile", target, "--steps", "2", "--budget", "5", "--warmup", "0", "--db", str(garbage),
                         "--no-store"], tmp_path)
    assert res.exit_code == 0, res.output
    assert "aten::addmm" in flat


def test_train_refuses_a_default_store_that_does_not_open_before_training(tmp_path):
    """``tilestack train`` stores into the default store (<cache_dir>/perf/results.sqlite): a damaged one was
    found after every step had run. Refused before the ranks start, naming --store (and --no-store)."""
    store = tmp_path / "cache" / "perf" / "results.sqlite"
    store.parent.mkdir(parents=True)
    store.write_bytes(b"\x00garbage" * 64)
    res, flat = _invoke(["train", "--steps", "2", "--batch", "2", "--seq", "8"], tmp_path)
    assert res.exit_code == 2, res.output
    assert "Invalid value for --store" in flat and "is not a readable SQLite database" in flat, flat
    assert "step" not in flat.lower().replace("--steps", "")          # no step trained


@pytest.mark.parametrize("budget", ["inf", "nan", "-1"])
def test_profile_refuses_a_budget_that_is_not_finite_and_positive(budget, target, tmp_path):
    res, flat = _invoke(["profile", target, "--budget", budget, "--no-store"], tmp_path)
    assert res.exit_code == 2, res.output
    assert f"--budget {float(budget)}; expected a finite number of seconds > 0" in flat, flat
