"""Round eight, part two: the ``tilestack`` command's numbers that are no numbers (NaN, inf, negative rates) and a
plan file whose write is cut short by a real fault (the file-size limit the kernel enforces), an empty cache-folder
setting.

What it found (each test failed before its fix):
- ``tilestack train --lr nan`` or ``--lr -1`` started the ranks and failed inside them (AdamW's ValueError, a
  traceback); ``--lr inf`` trained to NaN losses and stored the run in the perf store;
- ``tilestack tune --budget-s nan`` passed the "must be > 0" check (NaN compares False) and planned a run whose
  every deadline compares False; ``inf``, a run without an end;
- ``parallel.plan.write_plan`` (``tilestack plan --out``) wrote the file in place: a write cut short (a full disk, a
  file-size limit, a kill) left half a file where the previous plan was, which ``tilestack train --plan`` then
  refused; it now writes a temporary file and renames it over the old one;
- ``TILESTACK_CACHE_DIR`` set but empty made the cache folder the current one (``Path("")`` is "."): refused.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from tilestack import config
from tilestack.cli import _register, app

_register()


def _refused(args, tmp_path, *needles):
    with config.override(cache_dir=tmp_path / "cache"):
        res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit))
    flat = "".join(re.sub("[\u2500-\u257f]", "", res.output).split())     # without rich's box characters
    for needle in needles:
        assert "".join(needle.split()) in flat, (needle, res.output)


@pytest.mark.parametrize("lr", ["nan", "inf", "-1", "-inf"])
def test_train_refuses_a_learning_rate_that_cannot_train(lr, tmp_path):
    _refused(["train", "--steps", "2", "--lr", lr, "--no-store"], tmp_path, f"--lr {float(lr)}",
             "expected a finite learning rate >= 0")


@pytest.mark.parametrize("budget", ["nan", "inf"])
def test_tune_refuses_a_budget_that_is_not_finite(budget, tmp_path):
    _refused(["tune", "--budget-s", budget, "--dry-run"], tmp_path, f"--budget-s must be > 0, got {float(budget)}",
             "a finite number of seconds")


_WRITER = textwrap.dedent("""
    import resource, signal, sys
    from tilestack.parallel import ModelConfig
    from tilestack.parallel.plan import RooflineCompute, choose, describe_gpt, h200_nccl, search, write_plan

    desc = describe_gpt(ModelConfig(n_layer=2, d=16, n_head=2, vocab=32, max_seq=8), 8)
    best = choose(search(desc, RooflineCompute(desc, "h200"), h200_nccl(), world_size=2, batch=int(sys.argv[2])))
    if sys.argv[3] == "cut":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # the write fails with EFBIG past the limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (256, resource.RLIM_INFINITY))
    try:
        write_plan(best.prediction, desc, sys.argv[1], device="h200")
    except OSError as e:
        print("cut short:", e.errno)
""")


def test_a_plan_write_cut_short_keeps_the_previous_plan(tmp_path):
    """A plan written, then a second write to the same path cut short by the file-size limit (a real EFBIG from
    the kernel, as a full disk gives ENOSPC): the first plan is still there, whole, and no temporary is left."""
    from tilestack.parallel.plan import read_plan

    path = tmp_path / "plan.json"

    def write(batch: int, mode: str) -> str:
        done = subprocess.run([sys.executable, "-c", _WRITER, str(path), str(batch), mode], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout
    write(4, "whole")
    before = path.read_text()
    assert read_plan(path)["batch"] == 4
    assert "cut short" in write(8, "cut")
    assert path.read_text() == before and read_plan(path)["batch"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_cache_dir_setting_is_refused_by_name(value, tmp_path):
    """TILESTACK_CACHE_DIR set but empty (``export TILESTACK_CACHE_DIR=`` in a script) made the cache folder ".":
    tuned tables, ceilings and result stores written into whatever folder a run started in. Refused at import,
    as an unknown TILESTACK_BACKEND is, naming the variable."""
    import os

    done = subprocess.run([sys.executable, "-c", "import tilestack"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env={**os.environ, "TILESTACK_CACHE_DIR": value})
    assert done.returncode != 0
    assert f"TILESTACK_CACHE_DIR={value!r}; expected a folder path" in done.stderr
    assert list(tmp_path.iterdir()) == []
