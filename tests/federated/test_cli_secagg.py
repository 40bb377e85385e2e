import json

import numpy as np
import pytest
from typer.testing import CliRunner

import tilestack.cli.fl  # noqa: F401  (registers `tilestack fl`)
from tilestack.cli import app
from tilestack.federated import Task


def test_fl_run_reports_and_writes_history_and_plot(tmp_path):
    out, plot = tmp_path / "h.json", tmp_path / "p.png"
    args = ["fl", "run", "--strategy", "fedprox", "--mu", "1", "--clients", "12", "--per-round", "4", "--rounds",
            "3", "--local-steps", "5", "--stragglers", "0.5", "--eval-fraction", "0.5", "--out", str(out),
            "--plot", str(plot)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "test accuracy (last round)" in res.output and "bytes down / up" in res.output
    rounds = json.loads(out.read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3] and plot.stat().st_size > 1000


def test_fl_run_resumes_from_checkpoint(tmp_path):
    ckpt = tmp_path / "c.ckpt"
    base = ["fl", "run", "--clients", "8", "--per-round", "4", "--local-steps", "3", "--checkpoint", str(ckpt)]
    assert CliRunner().invoke(app, [*base, "--rounds", "2"]).exit_code == 0
    res = CliRunner().invoke(app, [*base, "--rounds", "4", "--out", str(tmp_path / "h.json")])
    assert res.exit_code == 0, res.output
    assert [r["round"] for r in json.loads((tmp_path / "h.json").read_text())["rounds"]] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "extra, needle",
    [(["--strategy", "nope"], "--strategy 'nope'"), (["--per-round", "50"], "per_round=50"),
     (["--selection", "best"], "selection='best'"), (["--dataset", "mnist"], "dataset='mnist'")],
)  # fmt: skip
def test_fl_run_bad_arguments_are_named(extra, needle):
    res = CliRunner().invoke(app, ["fl", "run", "--clients", "12", "--rounds", "1", *extra], env={"COLUMNS": "400"})
    assert res.exit_code != 0 and needle in res.output


def test_fl_run_with_oort_selection_and_dp():
    res = CliRunner().invoke(app, ["fl", "run", "--clients", "10", "--per-round", "3", "--rounds", "2",
                                   "--local-steps", "3", "--selection", "oort", "--speed-sigma", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["fl", "run", "--clients", "10", "--per-round", "5", "--rounds", "2",
                                   "--local-steps", "3", "--strategy", "dp-fedavg", "--noise", "1.0"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "epsilon" in res.output


def test_secure_aggregation_matches_plain_average_up_to_quantisation():
    from tilestack.federated.secagg import run_plain, run_secure

    task = Task(dataset="synthetic", num_clients=5, max_samples=200, local_steps=5, lr=0.05)
    secure = run_secure(task, rounds=2, per_round=5)
    plain = run_plain(task, rounds=2, per_round=5)
    for k in plain:
        assert np.abs(plain[k]).max() > 0
        np.testing.assert_allclose(secure[k], plain[k], atol=1e-4)
        assert not np.array_equal(secure[k], plain[k])  # it really went through quantised masking
