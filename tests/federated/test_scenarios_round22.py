"""Federated scenarios, round 22 (1 of 2): ``tilestack fl run`` given bad settings, each refused naming its option,
options the run does not read given a value of their own, and device traces with a bad row.

``tilestack fl run`` through typer's CliRunner on tiny runs (4 blobs clients, 1 round, 1 local step), and ``simulate``
on Flower's engine asked for tilestack's worker processes. A refusal is exit 2, before the first round (no report
table), with the option in typer's "Invalid value for --option" and the value given.

What this round found, fixed:

- *A refusal that named no option.* A value the library judges (``Task``, ``make_strategy``, Flower's Krum bound,
  ``simulate``) was reported as "Invalid value: make_strategy: num_clusters=0" (``--clusters 0 --strategy ifca``),
  "Task: lr=0.0" (``--lr 0``), "MultiKrum: num_malicious_nodes=1" (``--malicious 0.25``): the library's argument
  name, not the option. The option that sets the argument the message names first is now typer's param hint
  (``cli/fl.py``: ``ARGUMENT_OPTIONS``); the library's words are kept beside it.
- *Options the run does not read, taken without a word.* ``--clusters 5`` with ``--strategy fedavg`` (or cfl, which
  finds its own clusters; IFCA's knob, as ``--mu`` is FedProx's, already refused elsewhere) and ``--local-epochs``
  beside ``--local-steps``: each ran the run it would have run without it. Refused naming the option, its value and
  what reads it, after the values themselves are judged (a bad value is named for what it is). Settings of a data
  split, an attack or a straggler policy the run does not use stay taken (a sweep keeps its other options).
- *simulate(engine="flower", workers=2)* ran on Ray's workers, ``workers`` ignored; refused naming it.
- *A device trace with a speed <= 0* was refused as "SystemModel: speeds has shape (4,); expected (4,) finite numbers
  > 0" (the shape it had), naming no option, file or row: now ``--trace``, the file, the client and its value
  (``system.py``: ``from_trace``; ``SystemModel`` names ``speeds[i]``).
"""

from __future__ import annotations

import math
import re

import pytest
from flwr.serverapp.strategy import FedAvg
from typer.testing import CliRunner

import tilestack.cli.fl  # noqa: F401  (registers `tilestack fl`)
from tilestack.cli import app as cli_app
from tilestack.federated import SystemModel, Task, simulate

pytestmark = pytest.mark.timeout(120)

BASE = ["fl", "run", "--dataset", "blobs", "--clients", "4", "--per-round", "2", "--rounds", "1", "--local-steps", "1"]


def _fl_run(*extra: str):
    return CliRunner().invoke(cli_app, [*BASE, *extra], env={"COLUMNS": "400"})


def _flat(text: str) -> str:
    return " ".join(re.sub("[\u2500-\u257f]", " ", text).split())


def _refused(res, *needles: str) -> str:
    out = _flat(res.output)
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output and "test accuracy" not in res.output, res.output
    for needle in needles:
        assert needle in out, (needle, out)
    return out


# ---- a value the library judges, refused naming the option that sets it ---------------------------------------------
@pytest.mark.parametrize("extra, option, words", [
    (["--lr", "0"], "--lr", "lr=0.0"),
    (["--lr", "-0.5"], "--lr", "lr=-0.5"),
    (["--local-steps", "0", "--local-epochs", "0"], "--local-epochs", "local_epochs=0.0"),
    (["--local-steps", "0", "--local-epochs", "-2"], "--local-epochs", "local_epochs=-2.0"),
    (["--strategy", "ifca", "--clusters", "0"], "--clusters", "num_clusters=0"),
    (["--faults", "7:crash"], "--faults", "(7, 'crash')"),
    (["--faults", "1:melt"], "--faults", "'melt'"),
    (["--model", "resnet"], "--model", "model='resnet'"),
    (["--partitioner", "stripes"], "--partitioner", "partitioner='stripes'"),
    (["--attack", "flood", "--malicious", "0.5"], "--attack", "attack='flood'"),
    (["--dataset", "mnist"], "--dataset", "dataset='mnist'"),
    (["--dataset", "synthetic", "--alpha", "-1"], "--alpha", "alpha=-1.0"),
    (["--timeout", "nan"], "--timeout", "timeout=nan"),
    (["--strategy", "krum", "--per-round", "3", "--malicious", "0.5"], "--malicious", "num_malicious_nodes=1"),
    (["--strategy", "multikrum", "--per-round", "4", "--malicious", "0.25"], "--malicious", "num_malicious_nodes=1"),
    (["--strategy", "bulyan", "--per-round", "4", "--malicious", "0.25"], "--per-round", "clients_per_round=4"),
    (["--engine", "flower", "--workers", "2"], "--workers", "workers=2 with engine='flower'"),
    (["--strategy", "ifca", "--compress", "int8"], "--compress", "Compressed: inner=IFCA"),
    (["--strategy", "cfl", "--compress", "topk:0.5"], "--compress", "Compressed: inner=CFL"),
])  # fmt: skip
def test_a_value_the_library_judges_is_refused_naming_the_option_and_the_value(extra, option, words):
    _refused(_fl_run(*extra), f"Invalid value for {option}", words)


# ---- an option the run does not read ---------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, option, shown, reader", [
    (["--clusters", "5"], "--clusters", "--clusters 5", "--strategy ifca or --dataset clustered"),
    (["--strategy", "cfl", "--clusters", "3"], "--clusters", "--clusters 3", "--strategy ifca or --dataset clustered"),
    (["--strategy", "fedprox", "--mu", "0.5", "--clusters", "4"], "--clusters", "--clusters 4",
     "--strategy ifca or --dataset clustered"),
    (["--local-steps", "2", "--local-epochs", "0.5"], "--local-epochs", "--local-epochs 0.5", "--local-steps 0"),
    (["--local-epochs", "3"], "--local-epochs", "--local-epochs 3", "--local-steps 0"),
])  # fmt: skip
def test_an_option_the_run_does_not_read_is_refused_naming_it_and_what_reads_it(extra, option, shown, reader):
    _refused(_fl_run(*extra), f"Invalid value for {option}", shown, f"is read only with {reader}",
             "which does not use it")  # fmt: skip


@pytest.mark.parametrize("extra, needle", [
    (["--clusters", "-1"], "num_clusters=-1"),                           # named for what it is, not as unread
    (["--staleness-exponent", "-1"], "staleness_exponent=-1.0"),
    (["--strategy", "ifca", "--clusters", "0", "--local-epochs", "3"], "num_clusters=0"),
    (["--local-epochs", "nan"], "local_epochs=nan"),
])  # fmt: skip
def test_a_bad_value_of_an_unread_option_is_named_for_its_value(extra, needle):
    out = _refused(_fl_run(*extra), needle)
    assert "is read only with" not in out


@pytest.mark.parametrize("extra", [
    ["--strategy", "ifca", "--clusters", "3"],
    ["--dataset", "clustered", "--clusters", "3", "--strategy", "cfl"],
    ["--local-steps", "0", "--local-epochs", "0.5"],
    ["--workers", "2"],
    # settings of a data split, an attack or a straggler policy the run does not use are taken, as before: a sweep
    # over --partitioner or --malicious 0 / 0.25 keeps the rest of its options (test_fuzz_round16_more: "values an
    # option rightly takes")
    ["--partition-alpha", "0.1"],
    ["--partitioner", "dirichlet", "--partition-alpha", "0.1"],
    ["--attack", "noise"],
    ["--staleness-exponent", "1.5", "--max-staleness", "2"],
])  # fmt: skip
def test_the_same_options_where_the_run_reads_them_run(extra):
    res = _fl_run(*extra)
    assert res.exit_code == 0, res.output
    assert "test accuracy" in res.output


def test_simulate_on_flowers_engine_refuses_worker_processes_before_ray_starts():
    task = Task(dataset="blobs", num_samples=40, num_features=3, num_classes=2, num_clients=2, local_steps=1)
    with pytest.raises(ValueError, match=r"simulate: workers=2 with engine='flower'.*expected workers=1"):
        simulate(FedAvg(), task, rounds=1, engine="flower", workers=2)



# ---- a device trace with a bad row -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rows, needle", [
    (["0,1,100", "1,-1,100", "2,1,100", "3,1,100"], "gives client 1 speed=-1.0; expected finite numbers > 0"),
    (["0,1,100", "1,2,100", "2,1,inf", "3,1,100"], "gives client 2 bandwidth=inf; expected finite numbers > 0"),
    (["0,1,100", "1,0,100", "2,1,100", "3,1,100"], "gives client 1 speed=0.0"),
    (["0,1,100", "1,x,100", "2,1,100", "3,1,100"], "has a row that is not numbers"),
])  # fmt: skip
def test_a_trace_with_a_bad_row_is_refused_naming_the_option_the_client_and_the_value(tmp_path, rows, needle):
    """A speed <= 0 was reported as "Invalid value: SystemModel: speeds has shape (4,); expected (4,) finite numbers >
    0": no option, no file, no row, and a shape that was right. Named now: --trace, the file, the client, the value."""
    trace = tmp_path / "trace.csv"
    trace.write_text("\n".join(["client,speed,bandwidth", *rows]) + "\n")
    _refused(_fl_run("--trace", str(trace)), "Invalid value for --trace", str(trace), needle)


def test_a_system_models_bad_speed_or_bandwidth_is_named_by_client_and_value():
    with pytest.raises(ValueError, match=r"SystemModel: speeds\[2\]=0.0 \(client 2\); expected \(3,\) finite"):
        SystemModel(3, speeds=[1.0, 2.0, 0.0], bandwidths=[1e6] * 3)
    with pytest.raises(ValueError, match=r"SystemModel: bandwidths\[0\]=nan \(client 0\)"):
        SystemModel(3, speeds=[1.0, 2.0, 3.0], bandwidths=[math.nan, 1e6, 1e6])
    with pytest.raises(ValueError, match=r"SystemModel: speeds has shape \(2,\); expected \(3,\)"):
        SystemModel(3, speeds=[1.0, 2.0], bandwidths=[1e6] * 3)
