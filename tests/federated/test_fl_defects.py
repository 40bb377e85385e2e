"""Defects found by trying tilestack.federated on scenarios it had not seen (issue 16), one test each."""

import json

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg, FedProx
from typer.testing import CliRunner

import tilestack.cli.fl  # noqa: F401  (registers `tilestack fl`)
from tilestack.cli import app
from tilestack.errors import FederatedError
from tilestack.federated import Task, simulate
from tilestack.federated.client import SCAFFOLD_DC_PREFIX
from tilestack.federated.client import app as client_app
from tilestack.federated.engine import InProcessGrid
from tilestack.federated.grid import ManagedGrid, error_reason
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import RandomSelector, Scaffold, Selected, make_strategy
from tilestack.federated.strategies._util import to_numpy

SMALL = dict(dataset="synthetic", num_clients=10, max_samples=200, local_steps=5, lr=0.05)


def _arrays(res):
    return {k: v.numpy() for k, v in res.arrays.items()}


# ---- 1, 2: missing or extra arrays, no MetricRecord ---------------------------------------------------
@pytest.mark.parametrize("make", [lambda: FedAvg(fraction_train=1.0, fraction_evaluate=0.5),
                                  lambda: Scaffold(fraction_train=1.0, fraction_evaluate=0.0)])  # fmt: skip
def test_replies_missing_or_extra_arrays_or_metrics_are_left_out_and_the_round_goes_on(make):
    faults = ((1, "missing"), (2, "extra"), (3, "nometrics"))
    res = simulate(make(), Task(**SMALL, faults=faults), rounds=2)
    for r in res.history.rounds:
        assert r.num_selected == 10 and r.num_aggregated == 7 and not r.skipped
        assert r.excluded["1"].startswith("keys: missing") and r.excluded["2"] == "keys: unexpected ['extra.weight']"
        assert r.excluded["3"].startswith("metrics: 0 MetricRecords")
    w = _arrays(res)
    assert not all(np.array_equal(v, np.zeros_like(v)) for v in w.values())  # the model moved
    assert res.history.rounds[-1].test_acc > 0.15


def test_error_reason_is_one_clean_line_from_a_ray_traceback():
    raw = ("\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=1, ip=127.0.0.1)\nTraceback (most recent call last):\n"
           '  File "client.py", line 3, in train\n    raise RuntimeError("x")\n'
           "\x1b[31mRuntimeError: simulated client crash (task.faults)\x1b[0m\n")  # fmt: skip
    assert error_reason(raw) == "RuntimeError: simulated client crash (task.faults)"
    assert error_reason("") == "(no reason given)"


# ---- 3: Bulyan's minimum number of replies ----------------------------------------------------------
def test_bulyan_refuses_too_few_clients_and_a_short_round_says_why():
    with pytest.raises(ValueError, match=r"clients_per_round=10 .*4 \* num_malicious \+ 3 = 11"):
        make_strategy("bulyan", clients_per_round=10, num_clients=30, num_malicious=2)
    res = CliRunner().invoke(app, ["fl", "run", "--dataset", "blobs", "--strategy", "bulyan", "--malicious", "0.2",
                                   "--rounds", "1"], env={"COLUMNS": "400"})  # fmt: skip
    assert res.exit_code != 0 and "4 * num_malicious + 3" in res.output
    # 7 = 4f + 3 with f = 1, but one client crashes: Bulyan cannot aggregate 6 and the round says so
    s = make_strategy("bulyan", clients_per_round=7, num_clients=7, num_malicious=1)
    res = simulate(s, Task(**{**SMALL, "num_clients": 7}, faults=((0, "crash"),)), rounds=1)
    r = res.history.rounds[0]
    assert r.num_aggregated == 0 and r.skipped == "Bulyan needs >= 4f+3 = 7 replies (f=1), got 6"


# ---- 4: the seed fixes differential-privacy noise ---------------------------------------------------
def test_dp_fedavg_runs_with_one_seed_are_identical_and_resume_reproduces(tmp_path):
    base = ["fl", "run", "--strategy", "dp-fedavg", "--seed", "0", "--clients", "10", "--per-round", "5",
            "--local-steps", "5", "--noise", "1.0", "--clip", "1.0"]  # fmt: skip
    outs = []
    for i in range(2):
        out = tmp_path / f"h{i}.json"
        res = CliRunner().invoke(app, [*base, "--rounds", "3", "--out", str(out)])
        assert res.exit_code == 0, res.output
        outs.append([(r["test_acc"], r["train_loss"]) for r in json.loads(out.read_text())["rounds"]])
    assert outs[0] == outs[1]
    ckpt, out = tmp_path / "c.ckpt", tmp_path / "r.json"
    assert CliRunner().invoke(app, [*base, "--rounds", "1", "--checkpoint", str(ckpt)]).exit_code == 0
    np.random.seed(12345)  # whatever the global state is, the resumed rounds draw the same noise
    res = CliRunner().invoke(app, [*base, "--rounds", "3", "--checkpoint", str(ckpt), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert [(r["test_acc"], r["train_loss"]) for r in json.loads(out.read_text())["rounds"]] == outs[0]


# ---- 5: SCAFFOLD's |S| / N under a client selector --------------------------------------------------
def test_scaffold_under_a_selector_moves_c_by_selected_over_all_clients():
    task = Task(**{**SMALL, "num_clients": 20})
    grid = ManagedGrid(InProcessGrid(client_app, 20, seed=0), task)
    inner = Scaffold(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)
    strategy = Selected(inner, RandomSelector(0), per_round=5)
    arrays = initial_arrays(task)
    messages = strategy.configure_train(1, arrays, _config(task), grid)
    replies = list(grid.send_and_receive(messages))
    assert len(replies) == 5
    strategy.aggregate_train(1, replies)
    dc = [{k.removeprefix(SCAFFOLD_DC_PREFIX): v for k, v in to_numpy(m.content["arrays"]).items()
           if k.startswith(SCAFFOLD_DC_PREFIX)} for m in replies]  # fmt: skip
    for k, c in inner.c.items():  # c starts at 0: c = (|S| / N) mean(dc) = (5 / 20) mean(dc)
        np.testing.assert_allclose(c, 5 / 20 * np.mean([d[k] for d in dc], axis=0), rtol=1e-5, atol=1e-7)


def _config(task):
    from flwr.app import ConfigRecord

    from tilestack.federated.client import TASK_KEY

    return ConfigRecord({TASK_KEY: task.to_json()})


# ---- 6: a checkpoint from another run is refused ----------------------------------------------------
@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(strategy=lambda: FedProx(fraction_train=0.5, fraction_evaluate=0.0, proximal_mu=0.1)), "strategy"),
        (dict(task=Task(**{**SMALL, "num_clients": 12})), "nodes"),
        (dict(task=Task(**SMALL, model="mlp")), "arrays"),
        (dict(seed=5), "seed"),
    ],
)
def test_a_checkpoint_from_another_run_is_refused_with_what_differs(tmp_path, change, needle):
    ckpt = tmp_path / "run.ckpt"
    run = dict(strategy=lambda: FedAvg(fraction_train=0.5, fraction_evaluate=0.0), task=Task(**SMALL), seed=0)
    simulate(run["strategy"](), run["task"], rounds=2, seed=run["seed"], checkpoint=ckpt)
    run |= change
    with pytest.raises(FederatedError, match=f"belongs to another run .*{needle}: checkpoint has"):
        simulate(run["strategy"](), run["task"], rounds=4, seed=run["seed"], checkpoint=ckpt)


# ---- 7: usability of `tilestack fl run` ---------------------------------------------------------------
def test_fl_run_takes_a_users_file_faults_timeout_workers_and_reports_client_accuracy(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (400, 5))
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    data = tmp_path / "mine.csv"
    np.savetxt(data, np.column_stack([x, y]), delimiter=",", header="a,b,c,d,e,label", comments="")
    out = tmp_path / "h.json"
    args = ["fl", "run", "--data", str(data), "--partitioner", "dirichlet", "--clients", "8", "--per-round", "8",
            "--rounds", "3", "--local-steps", "10", "--lr", "0.1", "--faults", "1:crash,2:extra", "--timeout",
            "30", "--workers", "2", "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "error: 3" in res.output and "keys: 3" in res.output  # 3 rounds, the two faulty clients each round
    assert "whole run incl. start-up" in res.output
    last = json.loads(out.read_text())["rounds"][-1]
    assert last["test_acc"] > 0.8 and 0.0 < last["client_acc"]["worst"] <= last["client_acc"]["mean"] <= 1.0
    bad = CliRunner().invoke(app, ["fl", "run", "--faults", "1-crash", "--rounds", "1"], env={"COLUMNS": "200"})
    assert bad.exit_code != 0 and "'1-crash'" in bad.output
    bad = CliRunner().invoke(app, ["fl", "run", "--data", str(tmp_path / "none.npz"), "--rounds", "1"],
                             env={"COLUMNS": "200"})  # fmt: skip
    assert bad.exit_code != 0 and "--data" in bad.output and "is not there" in bad.output
