"""``tilestack plan`` end to end: the ranked table, the plan file, the figures, then ``tilestack train --plan``
running that file on gloo; and its refusals of bad input, before any measurement."""

import json
import re

import pytest
from typer.testing import CliRunner

from tilestack import config
from tilestack.cli import _register, app
from tilestack.parallel.plan.comm import CommModel, comm_path

_register()
# a stored gloo fit, so the test does not spend its time measuring collectives
FIT = CommModel(fits={k: {2: (3e-4, 1e-9)} for k in ("all_reduce", "all_gather", "reduce_scatter", "p2p")},
                source="test fit")
MODEL = ["--layers", "2", "--d", "32", "--heads", "4", "--vocab", "64", "--seq", "16"]


def _store_fit(tmp_path):
    path = comm_path("gloo-cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(FIT.to_json()))


def _said(res, text: str) -> bool:
    """``text`` is in the command's error output, however rich's box wrapped it (box characters and white space
    removed from both)."""
    flat = "".join(re.sub("[\u2500-\u257f]", "", res.output).split())
    return res.exit_code == 2 and "".join(text.split()) in flat


def test_plan_then_train_the_plan(tmp_path):
    out, figs = tmp_path / "plan.json", tmp_path / "figs"
    with config.override(cache_dir=tmp_path):
        _store_fit(tmp_path)
        res = CliRunner().invoke(app, ["plan", "--nproc", "2", *MODEL, "--batch", "4", "--memory-limit", "64MiB",
                                       "--out", str(out), "--figures", str(figs)])
        assert res.exit_code == 0, res.output
        assert "step ms" in res.output and "chosen (*)" in res.output and "test fit" in res.output
        spec = json.loads(out.read_text())
        assert spec["nproc"] == 2 and spec["batch"] == 4 and spec["seq"] == 16 and spec["runnable"]
        assert spec["model"]["n_layer"] == 2 and spec["predicted"]["step_s"] > 0
        assert spec["predicted"]["memory_bytes"] <= 64 * 2**20
        assert (figs / "timeline.png").stat().st_size > 0 and (figs / "memory.png").stat().st_size > 0
        run = CliRunner().invoke(app, ["train", "--plan", str(out), "--steps", "3"])
        assert run.exit_code == 0, run.output
        assert "2 ranks" in run.output and "tokens/s" in run.output


@pytest.mark.parametrize("args, match", [
    (["--nproc", "0", *MODEL], "'--nproc': 0 is not in the range"),
    (["--nproc", "3", *MODEL, "--batch", "4"], "no plan of world_size=3"),
    (["--nproc", "2", *MODEL, "--memory-limit", "1KB"], "--memory-limit 1000 bytes per rank: no plan fits"),
    (["--nproc", "2", *MODEL, "--memory-limit", "lots"], "--memory-limit 'lots'"),
    (["--nproc", "2", *MODEL, "--device", "tpu-v9"], "device='tpu-v9'"),
    (["--nproc", "2", "--model", "tiny", *MODEL], "--model and --layers given"),
    (["--nproc", "2", *MODEL, "--batch", "4,x"], "--batch '4,x'"),
    (["--nproc", "2", *MODEL, "--rank-by", "goodput"], "--noise-scale 0.0"),
])
def test_bad_input_is_refused_before_any_measurement(tmp_path, args, match):
    with config.override(cache_dir=tmp_path):            # no stored fit: measuring it would leave a file here
        res = CliRunner().invoke(app, ["plan", *args])
        assert res.exit_code != 0
        assert _said(res, match), res.output
        assert not comm_path("gloo-cpu").exists()


def test_train_refuses_a_bad_plan_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    for path, match in ((tmp_path / "none.json", "does not exist"), (bad, "format='something-else'")):
        res = CliRunner().invoke(app, ["train", "--plan", str(path)])
        assert _said(res, match), res.output


TARGET = '''
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4)), \\
        torch.randn(4, 16)
'''


def test_plan_a_module_it_has_never_seen(tmp_path):
    """Any torch module (a script's build() -> (module, example input)): planned with data and pipeline
    parallelism, its plan file refused by tilestack train (it trains tilestack's GPT only)."""
    script, out = tmp_path / "mlp.py", tmp_path / "plan.json"
    script.write_text(TARGET)
    with config.override(cache_dir=tmp_path):
        _store_fit(tmp_path)
        res = CliRunner().invoke(app, ["plan", "--nproc", "2", "--target", str(script), "--batch", "8",
                                       "--out", str(out), "--alpa"])
        assert res.exit_code == 0, res.output
        assert "Alpa's inter-operator DP" in res.output
        assert "not runnable by tilestack train" in res.output and "dp2" in res.output and "pp2" in res.output
        spec = json.loads(out.read_text())
        assert spec["model"] is None and spec["bounds"][0] == 0 and spec["bounds"][-1] == 5
        run = CliRunner().invoke(app, ["train", "--plan", str(out)])
        assert _said(run, "not tilestack's parallel GPT"), run.output


def test_device_names_cpu_and_cuda_in_any_case(tmp_path):
    """``--device CPU`` is the CPU (it was looked up in the device table and refused for a bf16 peak the user never
    asked for: --dtype float32); a device-table device is checked for the --dtype's peak, as its costs ask for."""
    with config.override(cache_dir=tmp_path):
        _store_fit(tmp_path)
        lower = CliRunner().invoke(app, ["plan", "--nproc", "2", *MODEL, "--batch", "4", "--device", "cpu"])
        # (one rank: the same measured path, without the 2-rank wrapper overheads and lockstep probe, ~35 s here;
        # the lower-case run and test_plan_then_train_the_plan measure those)
        upper = CliRunner().invoke(app, ["plan", "--nproc", "1", *MODEL, "--batch", "4", "--device", " CPU"])
    assert lower.exit_code == 0 and upper.exit_code == 0, upper.output
    # Both price the plans with this CPU's own measured profile (the chosen plan itself can differ between the two
    # runs: each measures the model afresh, and two plans can be within the timing noise of each other).
    for res in (lower, upper):
        assert "measured on this CPU" in res.output, res.output
        assert any("chosen (*)" in line for line in res.output.splitlines()), res.output
    assert "bf16" not in upper.output
    with config.override(cache_dir=tmp_path):
        res = CliRunner().invoke(app, ["plan", "--nproc", "2", *MODEL, "--batch", "4", "--device", "h200",
                                       "--dtype", "bfloat16"])
    assert res.exit_code == 0, res.output
