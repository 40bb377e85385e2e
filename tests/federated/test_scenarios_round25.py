"""Federated scenarios, round 25 (1 of 2): server steps too large for any model to survive (SCAFFOLD's global_lr,
FedAvgM's server learning rate, FedOpt's eta at 1e300) refused before any client runs, and the largest allowed step
still SCAFFOLD's rule by hand; one checkpoint written by two runs at once refused (a nested run, a second
``tilestack fl run``), the lock gone with the run that held it, whether it ended or failed.

tilestack's ClientApp (or scripted ones) over tilestack's in-process Flower ``Grid`` under ``ManagedGrid``
(``run_rounds``), ``simulate`` and the ``tilestack fl run`` CLI; Flower 1.41's FedAvg, FedAvgM, FedAdam and FedYogi.
References written out here in float64 (SCAFFOLD's server step x + g (mean - x), c + |S|/N mean(dc)), or the
uninterrupted run of the same seed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re

import numpy as np
import pytest
from _fl_round5 import DC, SC, make_grid, np_, scripted, update, wmean
from _fl_round11 import counting_app as _counting_app
from _fl_round18 import EVERYONE
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi

from tilestack.errors import FederatedError
from tilestack.federated import InProcessGrid, ManagedGrid, Task, initial_arrays, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.checks import SERVER_STEP_LIMIT
from tilestack.federated.run_state import load_checkpoint
from tilestack.federated.strategies import Scaffold, make_strategy

pytestmark = pytest.mark.timeout(120)


def _task(**kw) -> Task:
    base = dict(dataset="blobs", num_samples=120, num_features=3, num_classes=2, num_clients=3, local_steps=2,
                batch_size=8, lr=0.1, seed=5)  # fmt: skip
    return Task(**(base | kw))




# ---- server steps past float32's resolution ---------------------------------------------------------------------
def test_the_server_step_limit_is_float32s_resolution():
    assert SERVER_STEP_LIMIT == 2.0**23 == 1 / np.finfo(np.float32).eps


def _set(strategy, **settings):
    """``strategy`` with ``settings`` set after construction (as a sweep script might)."""
    for k, v in settings.items():
        setattr(strategy, k, v)
    return strategy


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: Scaffold(global_lr=1e300, **EVERYONE), "Scaffold: global_lr=1e+300"),
        (lambda: Scaffold(global_lr=2.0**23, **EVERYONE), "Scaffold: global_lr=8388608.0"),
        (lambda: FedAvgM(server_learning_rate=1e300, **EVERYONE), "FedAvgM: server_learning_rate=1e+300"),
        (lambda: FedAdam(eta=1e300, **EVERYONE), "FedAdam: eta=1e+300"),
        (lambda: FedYogi(eta=1e40, **EVERYONE), "FedYogi: eta=1e+40"),
        (lambda: make_strategy("fedadam", num_clients=3, clients_per_round=3, server_lr=1e300), "server_lr=1e+300"),
        (lambda: _set(Scaffold(**EVERYONE), global_lr=1e300), "Scaffold: global_lr=1e+300"),
        (lambda: _set(FedAvgM(**EVERYONE), server_learning_rate=1e10), "FedAvgM: server_learning_rate=10000000000.0"),
    ],
)
def test_a_server_step_no_model_can_take_is_refused_naming_it_before_any_client_runs(make, words):
    """Found here: ``Scaffold(global_lr=1e300)`` ran every round and rejected every aggregate as non-finite (x + 1e300
    (mean - x) overflows float32 for any update), the model never moving; FedAvgM's server_learning_rate and FedOpt's
    eta did the same. Refused before any client runs, naming the setting, the value and the bound."""
    calls: list = []
    task = _task()
    with pytest.raises((ValueError, FederatedError)) as ex:
        run_rounds(make(), ManagedGrid(InProcessGrid(_counting_app(calls), 3), task), initial_arrays(task),
                   num_rounds=2)  # fmt: skip
    assert words in str(ex.value) and "2**23" in str(ex.value), str(ex.value)
    assert calls == []


def _scaffold_script(pid, rnd, got, context, config):
    """Client ``pid`` moves the model by a small update and reports a control-variate change (float32)."""
    x = got["arrays"]
    assert set(got[SC]) == set(x)
    model = {k: (v + 1e-3 * update(pid, rnd, v.shape, np.float32)).astype(np.float32) for k, v in x.items()}
    dc = {DC + k: update(pid + 10, rnd, v.shape, np.float32) for k, v in x.items()}
    return model | dc, {"num-examples": pid + 1}


def test_scaffold_at_the_largest_server_step_allowed_is_its_rule_by_hand_and_finite():
    """global_lr = 2**23 - 1 (just inside the bound) over three scripted clients of 1, 2 and 3 examples, two rounds:
    each round x <- x + g (weighted mean - x) and c <- c + 3/3 mean(dc), in float64 and rounded once to float32; every
    aggregate finite (each update is 1e-3 of a unit normal, moved by about 8e3)."""
    task = _task()
    g = SERVER_STEP_LIMIT - 1
    models: list = []
    strategy = Scaffold(global_lr=g, **EVERYONE)
    res = run_rounds(strategy, make_grid(scripted(_scaffold_script), task), initial_arrays(task), num_rounds=2,
                     extra_metrics=lambda s, a, r: models.append(np_(a)) or {})  # fmt: skip
    x = {k: v.astype(np.float64) for k, v in np_(initial_arrays(task)).items()}
    c = {k: np.zeros_like(v) for k, v in x.items()}
    for rnd in (1, 2):
        assert res.history.rounds[rnd - 1].num_aggregated == 3 and not res.history.rounds[rnd - 1].skipped
        x32 = {k: v.astype(np.float32) for k, v in x.items()}
        ups = {p: _scaffold_script(p, rnd, {"arrays": x32, SC: c}, None, None)[0] for p in range(3)}
        mean = wmean({p: {k: u[k] for k in x} for p, u in ups.items()}, {p: p + 1 for p in range(3)})
        want = {k: (x32[k].astype(np.float64) + g * (mean[k] - x32[k])).astype(np.float32) for k in x}
        for k in x:
            assert np.all(np.isfinite(models[rnd - 1][k]))
            np.testing.assert_array_equal(models[rnd - 1][k], want[k], err_msg=f"round {rnd}: {k}")
        c = {k: (c[k] + np.mean([ups[p][DC + k].astype(np.float64) for p in range(3)], axis=0)).astype(np.float32)
             for k in c}  # fmt: skip
        x = {k: v.astype(np.float64) for k, v in want.items()}
    for k in c:
        np.testing.assert_array_equal(strategy.c[k], c[k])


# ---- one checkpoint, two runs at once ------------------------------------------------------------------------------
def test_a_second_run_of_a_checkpoint_in_use_is_refused_before_any_client_runs_and_the_first_is_unharmed(tmp_path):
    """Found here: run_rounds took no lock on its checkpoint, so a second run of the same file while the first ran
    resumed from it and saved over it (each saving its own rounds, the file ending as whoever saved last). Now the
    second, started from the first's round hook after round 1, is refused naming the checkpoint, no client of it
    runs; the first goes on to the model and history of a run without a checkpoint, and its file holds its three
    rounds."""
    task, ckpt = _task(), tmp_path / "run.ckpt"
    refusals, nested_calls = [], []

    def second_run(m):
        if m.round == 1:
            grid = ManagedGrid(InProcessGrid(_counting_app(nested_calls), 3), task)
            with pytest.raises(FederatedError) as ex:
                run_rounds(FedAvg(**EVERYONE), grid, initial_arrays(task), num_rounds=3, checkpoint=ckpt)
            refusals.append(str(ex.value))

    first = run_rounds(FedAvg(**EVERYONE), ManagedGrid(InProcessGrid(tsclient.app, 3), task), initial_arrays(task),
                       num_rounds=3, checkpoint=ckpt, on_round=second_run)  # fmt: skip
    assert len(refusals) == 1 and f"checkpoint={str(ckpt)!r}" in refusals[0] and "in use" in refusals[0], refusals
    assert nested_calls == []
    plain = run_rounds(FedAvg(**EVERYONE), ManagedGrid(InProcessGrid(tsclient.app, 3), task), initial_arrays(task),
                       num_rounds=3)  # fmt: skip
    for k, v in np_(plain.arrays).items():
        np.testing.assert_array_equal(np_(first.arrays)[k], v)
    state = load_checkpoint(ckpt)
    assert state["round"] == 3 and len(state["history"]["rounds"]) == 3
    for k, v in np_(plain.arrays).items():
        np.testing.assert_array_equal(state["arrays"][k].numpy(), v)


def test_a_run_that_failed_mid_way_leaves_its_checkpoint_free_and_the_resume_is_the_uninterrupted_run(tmp_path):
    """A run whose round hook raises after round 2 ends with that error; its lock goes with it, so the same
    checkpoint resumes at once (not refused as in use) to the model of a run never interrupted (FedAdam: its moments
    travel in the checkpoint)."""
    task, ckpt = _task(), tmp_path / "run.ckpt"

    def boom(m):
        if m.round == 2:
            raise RuntimeError("the server went down")

    def fedadam():
        return FedAdam(eta=0.05, eta_l=0.1, **EVERYONE)

    with pytest.raises(RuntimeError, match="the server went down"):
        run_rounds(fedadam(), ManagedGrid(InProcessGrid(tsclient.app, 3), task), initial_arrays(task), num_rounds=4,
                   checkpoint=ckpt, on_round=boom)  # fmt: skip
    assert load_checkpoint(ckpt)["round"] == 2
    resumed = run_rounds(fedadam(), ManagedGrid(InProcessGrid(tsclient.app, 3), task), initial_arrays(task),
                         num_rounds=4, checkpoint=ckpt)  # fmt: skip
    plain = run_rounds(fedadam(), ManagedGrid(InProcessGrid(tsclient.app, 3), task), initial_arrays(task),
                       num_rounds=4)  # fmt: skip
    assert [r.round for r in resumed.history.rounds] == [1, 2, 3, 4]
    for k, v in np_(plain.arrays).items():
        np.testing.assert_array_equal(np_(resumed.arrays)[k], v)


def test_simulate_on_a_checkpoint_held_by_another_process_is_refused_naming_it(tmp_path):
    """``simulate`` (run_rounds under it) refuses a checkpoint whose lock another holder has (here this test, through
    its own open file description, as a second process would), before any round; once released it runs."""
    task, ckpt = _task(), tmp_path / "sub" / "run.ckpt"
    ckpt.parent.mkdir()
    with _held(ckpt):
        with pytest.raises(FederatedError, match=re.escape(f"checkpoint={str(ckpt)!r} is in use")):
            simulate(FedAvg(**EVERYONE), task, rounds=2, checkpoint=ckpt, evaluate=False)
        assert not ckpt.exists()
    res = simulate(FedAvg(**EVERYONE), task, rounds=2, checkpoint=ckpt, evaluate=False)
    assert len(res.history.rounds) == 2 and load_checkpoint(ckpt)["round"] == 2


@contextlib.contextmanager
def _held(ckpt):
    fd = os.open(ckpt.with_name(ckpt.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def test_fl_run_on_a_checkpoint_another_run_holds_is_refused_naming_checkpoint(tmp_path):
    """``tilestack fl run --checkpoint`` took no lock: two runs of one checkpoint wrote over each other. With the
    checkpoint held (as a running ``fl run`` holds it) a second exits 2 naming --checkpoint, before any round, and
    writes no checkpoint; released, the same command runs and writes it."""
    from typer.testing import CliRunner

    import tilestack.cli.fl  # noqa: F401  (registers `tilestack fl`)
    from tilestack.cli import app as cli_app

    ckpt = tmp_path / "run.ckpt"
    args = ["fl", "run", "--dataset", "blobs", "--clients", "3", "--per-round", "3", "--rounds", "2",
            "--local-steps", "1", "--checkpoint", str(ckpt)]  # fmt: skip
    with _held(ckpt):
        res = CliRunner().invoke(cli_app, args, env={"COLUMNS": "400"})
    out = " ".join(re.sub("[\u2500-\u257f]", " ", res.output).split())
    assert res.exit_code == 2 and "Invalid value for --checkpoint" in out and "in use" in out, out
    assert "test accuracy" not in out and not ckpt.exists()
    res = CliRunner().invoke(cli_app, args, env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    assert load_checkpoint(ckpt)["round"] == 2


def test_fl_run_with_a_server_lr_past_the_limit_is_refused_naming_it_and_just_inside_it_runs():
    """``tilestack fl run --strategy fedadam --server-lr 1e7`` is refused before any round naming --server-lr and the
    bound; FedYogi at 2**23 - 1 runs its round."""
    from typer.testing import CliRunner

    import tilestack.cli.fl  # noqa: F401  (registers `tilestack fl`)
    from tilestack.cli import app as cli_app

    base = ["fl", "run", "--dataset", "blobs", "--clients", "3", "--per-round", "3", "--rounds", "1",
            "--local-steps", "1"]  # fmt: skip
    res = CliRunner().invoke(cli_app, [*base, "--strategy", "fedadam", "--server-lr", "1e7"], env={"COLUMNS": "400"})
    out = " ".join(re.sub("[\u2500-\u257f]", " ", res.output).split())
    assert res.exit_code == 2 and "Invalid value for --server-lr" in out and "server_lr=10000000.0" in out, out
    assert "2**23 = 8388608" in out and "test accuracy" not in out
    res = CliRunner().invoke(cli_app, [*base, "--strategy", "fedyogi", "--server-lr", str(2**23 - 1)],
                             env={"COLUMNS": "400"})  # fmt: skip
    assert res.exit_code == 0, res.output


def test_a_resume_on_the_same_grid_of_worker_processes_is_not_refused_by_the_idle_workers(tmp_path):
    """Found with the lock: InProcessGrid's worker processes (forked during the run, kept for the next) inherited the
    open lock file, and an flock lasts while any copy is open, so resuming on the same grid was refused as in use by
    its idle workers. The workers drop their copies: the resume runs, to the model of a run never stopped (one
    process)."""
    task, ckpt = _task(num_clients=4), tmp_path / "run.ckpt"
    inner = InProcessGrid(tsclient.app, 4, workers=2)
    try:
        grid = ManagedGrid(inner, task)
        run_rounds(FedAvg(**EVERYONE), grid, initial_arrays(task), num_rounds=3, checkpoint=ckpt, stop_after=1)
        assert inner._pool is not None  # the workers outlive the run
        resumed = run_rounds(FedAvg(**EVERYONE), grid, initial_arrays(task), num_rounds=3, checkpoint=ckpt)
    finally:
        inner.close()
    assert [r.round for r in resumed.history.rounds] == [1, 2, 3]
    plain = run_rounds(FedAvg(**EVERYONE), ManagedGrid(InProcessGrid(tsclient.app, 4), task), initial_arrays(task),
                       num_rounds=3)  # fmt: skip
    for k, v in np_(plain.arrays).items():
        np.testing.assert_array_equal(np_(resumed.arrays)[k], v)


# ---- a client learning rate past float32 ---------------------------------------------------------------------------
def test_a_client_lr_past_float32s_largest_value_is_refused_where_it_is_given_naming_lr():
    """Found beside SCAFFOLD's global_lr: ``Task(lr=1e300)`` (or a round config's ``lr``, or ``fl run --lr``) was taken,
    every local step was inf, every client's update was left out as non-finite and no round aggregated anything.
    Refused naming lr: in the Task, in run_rounds' train_config before any client runs, and as --lr; 3e38 (inside
    float32) is still a Task."""
    from typer.testing import CliRunner

    import tilestack.cli.fl  # noqa: F401  (registers `tilestack fl`)
    from tilestack.cli import app as cli_app

    with pytest.raises(ValueError, match=r"Task: lr=1e\+300; expected > 0 \(and below 3\.4e\+38"):
        _task(lr=1e300)
    assert _task(lr=3e38).lr == 3e38
    task, calls = _task(), []
    with pytest.raises(FederatedError, match=r"train_config: config lr=1e\+39: Task: lr=1e\+39; expected > 0"):
        run_rounds(FedAvg(**EVERYONE), ManagedGrid(InProcessGrid(_counting_app(calls), 3), task), initial_arrays(task),
                   num_rounds=1, train_config={"lr": 1e39})  # fmt: skip
    assert calls == []
    res = CliRunner().invoke(cli_app, ["fl", "run", "--dataset", "blobs", "--clients", "3", "--per-round", "3",
                                       "--rounds", "1", "--lr", "1e300"], env={"COLUMNS": "400"})  # fmt: skip
    out = " ".join(re.sub("[\u2500-\u257f]", " ", res.output).split())
    assert res.exit_code == 2 and "Invalid value for --lr" in out and "lr=1e+300" in out, out
