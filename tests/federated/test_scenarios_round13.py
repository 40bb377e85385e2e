"""Federated scenarios, round 13 (1 of 2): one strategy object run twice, Flower's own loop asking for more nodes than
the run has, and the server optimisers over clients of 1 to 100+ in size with a NaN and a misshapen reply.

tilestack's ClientApp over tilestack's in-process Flower ``Grid`` (``simulate``, ``run_rounds`` with ``ManagedGrid``),
with Flower's strategies (FedAvgM, FedAdam, FedYogi) and tilestack's (SCAFFOLD, Compressed); the reference is the
clients' SGD replayed by hand (``_fl_round7.client_model``: the same seeded minibatches) and the server's rule written
out in float64 (``_fl_round13.ServerOpt``).
"""

from __future__ import annotations

import numpy as np
import pytest
from _fl_round5 import np_, same
from _fl_round7 import client_model
from _fl_round9 import keep, near
from _fl_round13 import ServerOpt, f32, fedavg_round, tiny_task
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi

from tilestack.errors import FederatedError
from tilestack.federated import InProcessGrid, ManagedGrid, SystemModel, Task, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.compression import Compressed
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import Scaffold

ALL4 = dict(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=4, min_train_nodes=4)

# ---- one strategy object, two runs -----------------------------------------------------------------------------------
REUSED = {  # a strategy whose server state a run changes
    "FedAvgM(lr 0.5, momentum 0.5)": lambda: FedAvgM(**ALL4, server_learning_rate=0.5, server_momentum=0.5),
    "FedAdam": lambda: FedAdam(**ALL4, eta=0.05, tau=0.5),
    "SCAFFOLD": lambda: Scaffold(fraction_train=1.0, fraction_evaluate=0.0),
    "Compressed(FedYogi), int8": lambda: Compressed(FedYogi(**ALL4, eta=0.05, tau=0.5), "int8"),
}  # fmt: skip


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", sorted(REUSED))
def test_a_strategy_object_run_twice_gives_its_second_run_the_model_of_a_new_object(name):
    """A notebook keeps its strategy object and calls ``simulate`` again, on another seed and then on the first one:
    each run ends at the model of a new object's run, bit for bit. Before, the second run carried the first one's server
    state: FedAvgM kept the first run's last model as its own and stepped from it (the new run's initial model was
    never the server's), FedAdam and FedYogi their moments, SCAFFOLD its c."""
    make, task = REUSED[name], tiny_task()
    first = simulate(make(), task, rounds=2, seed=0, evaluate=False)
    other = simulate(make(), task, rounds=3, seed=5, evaluate=False)
    s = make()
    assert same(simulate(s, task, rounds=2, seed=0, evaluate=False).arrays, first.arrays)
    assert same(simulate(s, task, rounds=3, seed=5, evaluate=False).arrays, other.arrays)
    again = simulate(s, task, rounds=2, seed=0, evaluate=False)
    assert same(again.arrays, first.arrays), "the second run started from the first run's server state"
    assert not same(other.arrays, first.arrays)  # (the runs differ: the test can tell them apart)


@pytest.mark.timeout(60)
def test_the_second_run_of_a_reused_fedavgm_is_its_rule_from_the_new_initial_model_written_out():
    """FedAvgM (server lr 0.5, momentum 0.5) run once from the task's model, then again from another initial model:
    the second run's two rounds are x1 = x0 - 0.5 g1, x2 = x1 - 0.5 (0.5 g1 + g2) with g = (the model FedAvgM holds) -
    (the clients' weighted mean), from the new x0, the clients' SGD replayed by hand. Before, its round 1 stepped from
    the first run's last model (x1 = that model - 0.5 (it - mean)), not from x0."""
    task = tiny_task()
    s = FedAvgM(**ALL4, server_learning_rate=0.5, server_momentum=0.5)
    simulate(s, task, rounds=2, evaluate=False)
    x0 = {k: (v + 0.25).astype(np.float32) for k, v in np_(initial_arrays(task)).items()}
    models: list = []
    res = run_rounds(s, ManagedGrid(InProcessGrid(tsclient.app, 4), task), tsclient._to_record(x0), num_rounds=2,
                     extra_metrics=keep(models))  # fmt: skip
    opt, held, x = ServerOpt("fedavgm", lr=0.5, momentum=0.5), x0, x0
    for rnd in (1, 2):
        held = opt.step(rnd, held, fedavg_round(task, rnd, x, range(4)))  # FedAvgM's own model: float64
        near(models[rnd - 1], held)
        x = f32(held)
    near(np_(res.arrays), held)


@pytest.mark.timeout(60)
def test_a_setting_changed_between_two_runs_of_one_object_is_kept_and_its_state_is_not():
    """Between two runs the caller lowers FedAdam's eta: the second run is a new FedAdam(eta=0.01)'s run bit for bit
    (the setting kept, the moments of the first run not), and differs from a run at the first eta."""
    task = tiny_task()
    s = FedAdam(**ALL4, eta=0.05, tau=0.5)
    simulate(s, task, rounds=2, evaluate=False)
    s.eta = 0.01
    again = simulate(s, task, rounds=2, evaluate=False)
    assert same(again.arrays, simulate(FedAdam(**ALL4, eta=0.01, tau=0.5), task, rounds=2, evaluate=False).arrays)
    assert not same(again.arrays, simulate(FedAdam(**ALL4, eta=0.05, tau=0.5), task, rounds=2, evaluate=False).arrays)


@pytest.mark.timeout(90)
def test_a_stopped_run_resumed_with_an_object_that_ran_another_run_is_the_run_never_stopped(tmp_path):
    """One FedAdam object runs a whole run, then a second run (another seed, a checkpoint) stopped after round 2, then
    resumes it: the end is a new object's four uninterrupted rounds bit for bit (the checkpoint's moments, not the first
    run's, and not a fresh start at round 3)."""
    task, ckpt = tiny_task(), tmp_path / "run.ckpt"
    make = lambda: FedAdam(**ALL4, eta=0.05, tau=0.5)  # noqa: E731
    full = simulate(make(), task, rounds=4, seed=3, evaluate=False)
    s = make()
    simulate(s, task, rounds=3, seed=0, evaluate=False)
    simulate(s, task, rounds=4, seed=3, evaluate=False, checkpoint=ckpt, stop_after=2)
    resumed = simulate(s, task, rounds=4, seed=3, evaluate=False, checkpoint=ckpt)
    assert [r.round for r in resumed.history.rounds] == [1, 2, 3, 4]
    assert same(resumed.arrays, full.arrays)


# ---- Flower's own loop asking for more nodes than there are ----------------------------------------------------------
WAITS = {  # strategy -> nodes it waits for, over 4
    "min_available_nodes=10": (lambda: FedAvg(fraction_evaluate=0.0, min_available_nodes=10), 10),
    "min_train_nodes=6": (lambda: FedAvg(fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=6), 6),
}  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(WAITS))
def test_flowers_own_loop_waiting_for_more_nodes_than_the_grid_has_is_refused_not_a_hang(name):
    """``FedAvg(min_available_nodes=10).start(grid=ManagedGrid(...))`` over 4 clients (or a sample of
    ``min_train_nodes=6``): Flower's ``sample_nodes`` polled the grid every second for nodes that never come, for ever.
    It is a FederatedError naming the number waited for and the 4 the grid has, before any client trains; the same
    strategy over a grid of enough nodes runs."""
    make, want = WAITS[name]
    task, trained = tiny_task(), []

    def on_train(msg, ctx):  # counts the clients that trained
        trained.append(ctx.node_config["partition-id"])
        return tsclient.app(msg, ctx)

    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(on_train)
    grid = ManagedGrid(InProcessGrid(app, 4), task)
    with pytest.raises(FederatedError, match=rf"min_available_nodes={want} .*lists 4 of the run's 4"):
        make().start(grid=grid, initial_arrays=initial_arrays(task), num_rounds=1, train_config=ConfigRecord())
    assert trained == []
    big = tiny_task(num_clients=want)
    res = make().start(grid=ManagedGrid(InProcessGrid(tsclient.app, want), big), initial_arrays=initial_arrays(big),
                       num_rounds=1)  # fmt: skip
    assert sorted(res.arrays) == sorted(np_(initial_arrays(big)))


@pytest.mark.timeout(60)
def test_run_rounds_over_the_same_settings_refuses_before_any_work_and_an_offline_round_is_still_skipped():
    """Under tilestack's own loop nothing changes: min_available_nodes=10 over 4 is refused before the first round, and
    a round of an availability pattern with one client online is skipped saying so, the run going on."""
    task = tiny_task()
    with pytest.raises(FederatedError, match="min_available_nodes"):
        simulate(FedAvg(fraction_evaluate=0.0, min_available_nodes=10), task, rounds=1)
    system = SystemModel(4, availability=[[1.0] * 4, [1.0, 0.0, 0.0, 0.0]], seed=0)
    res = simulate(FedAvg(fraction_evaluate=0.0, min_available_nodes=2), task, rounds=3, system=system, evaluate=False)
    assert [r.num_aggregated for r in res.history.rounds] == [4, 0, 4]
    assert res.history.rounds[1].skipped.startswith("1 of 4 clients available")


# ---- server optimisers over very unequal clients, one NaN and one misshapen ------------------------------------------
def _skewed() -> Task:
    """Five clients of 104, 338, 100, 3 and 415 training examples; client 0 sends NaN, client 2 an array one column
    too wide: the three kept are 338, 3 and 415 (138 to 1)."""
    return Task(dataset="blobs", num_samples=1200, num_features=3, num_classes=3, num_clients=5, partitioner="quantity",
                quantity_sigma=2.5, seed=1, local_steps=3, batch_size=8, lr=0.1,
                faults=((0, "nan"), (2, "shape")))  # fmt: skip


OPTIMISERS = {
    "FedAdam": (lambda: FedAdam(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=5, min_train_nodes=5,
                                eta=0.05, tau=0.5), dict(kind="fedadam", eta=0.05, tau=0.5)),
    "FedYogi": (lambda: FedYogi(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=5, min_train_nodes=5,
                                eta=0.05, tau=0.5), dict(kind="fedyogi", eta=0.05, tau=0.5)),
    "FedAvgM": (lambda: FedAvgM(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=5, min_train_nodes=5,
                                server_learning_rate=0.7, server_momentum=0.9), dict(kind="fedavgm", lr=0.7,
                                                                                       momentum=0.9)),
}  # fmt: skip


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", sorted(OPTIMISERS))
def test_server_optimisers_over_clients_138_to_1_with_a_nan_and_a_misshapen_reply_follow_their_rule(name):
    """Three rounds of FedAdam, FedYogi (tau 0.5: the step depends on the size of the mean update, not only its sign)
    and FedAvgM (lr 0.7, momentum 0.9) over five real clients: the NaN and the misshapen reply are left out every round
    naming the client and the array, and each round's model is the optimiser's rule written out in float64 over the
    example-weighted mean of the other three (338, 3 and 415 examples), its clients replayed by hand."""
    make, rule = OPTIMISERS[name]
    task = _skewed()
    assert [task.num_train(p) for p in range(5)] == [104, 338, 100, 3, 415]
    models: list = []
    res = simulate(make(), task, rounds=3, evaluate=False, extra_metrics=keep(models))
    rule = dict(rule)
    opt, x = ServerOpt(rule.pop("kind"), **rule), np_(initial_arrays(task))
    held = x
    for rnd, r in enumerate(res.history.rounds, start=1):
        assert r.excluded == {"0": "non-finite: fc.weight", "2": "shape: fc.weight is (3, 4), expected (3, 3)"}
        assert r.num_aggregated == 3
        held = opt.step(rnd, held if name == "FedAvgM" else x, fedavg_round(task, rnd, x, (1, 3, 4)))
        near(models[rnd - 1], held, ulps=4)
        x = f32(held)
    # the weighting matters: the same rule over the unweighted mean of the three is another model
    x0 = np_(initial_arrays(task))
    rule_again = dict(OPTIMISERS[name][1])
    unweighted = {k: np.mean([client_model(task, p, 1, x0)[0][k].astype(np.float64) for p in (1, 3, 4)], axis=0)
                  for k in x0}  # fmt: skip
    other = ServerOpt(rule_again.pop("kind"), **rule_again).step(1, x0, unweighted)
    assert not np.allclose(other["fc.weight"], models[0]["fc.weight"], rtol=1e-3, atol=1e-4)
