"""``tilestack train`` end to end on 2 gloo processes (its report and its perf-store row), and its refusal of a
bad layout before spawning."""

import re

from typer.testing import CliRunner

from tilestack import config
from tilestack.cli import _register, app
from tilestack.perf.store import Store

_register()


def _said(res, text: str) -> bool:
    """``text`` is in the command's error output, however rich's box wrapped it (box characters and white space
    removed from both)."""
    flat = "".join(re.sub("[\u2500-\u257f]", "", res.output).split())
    return res.exit_code == 2 and "".join(text.split()) in flat


def test_train_pp2_runs_reports_and_stores(tmp_path):
    with config.override(cache_dir=tmp_path):
        res = CliRunner().invoke(app, ["train", "--nproc", "2", "--pp", "2", "--microbatches", "2", "--steps", "3",
                                       "--batch", "2", "--seq", "8"])
        assert res.exit_code == 0, res.output
        with Store() as st:
            (m,) = st.measurements("latest")
    assert "2 ranks" in res.output and "tokens/s" in res.output and "MFU: no published peak" in res.output
    assert m.name == "train/pp2" and m.items == 2 * 8 / 2 and m.latency_s > 0 and m.config["nproc"] == 2


def test_train_refuses_degrees_that_do_not_fit():
    res = CliRunner().invoke(app, ["train", "--nproc", "2", "--tp", "3"])
    assert res.exit_code != 0
    assert _said(res, "expected the world size 2"), res.output


def test_train_noise_scale_needs_plain_data_parallelism():
    res = CliRunner().invoke(app, ["train", "--nproc", "2", "--tp", "2", "--noise-scale", "--no-store"])
    assert res.exit_code != 0
    assert "--noise-scale reads the per-rank gradients" in res.output + str(res.exception)
