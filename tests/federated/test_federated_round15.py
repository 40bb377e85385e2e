"""Federated scenarios, round 15 (1 of 2): the objects a run is built from, checked before any client trains.

tilestack's ClientApp over tilestack's in-process Flower ``Grid`` (``simulate``; ``run_rounds`` with ``ManagedGrid``),
Flower's FedAvg and tilestack's IFCA / HeteroFL; "before any work" is checked with a strategy that records every
``configure_train`` call (none: no message was sent, no client trained).

What this round found, fixed:

- *Hooks that are no functions.* ``simulate(..., on_round=3)`` or ``extra_metrics=3`` (and ``run_rounds``) ran round
  1's clients and its aggregation, then ended with "'int' object is not callable" (``driver.check_run_arguments``).
- *An evaluator of another task.* ``run_rounds(..., evaluator=Evaluator(other_task))`` whose model has other
  features trained round 1's clients, then ended with numpy's matmul error; an evaluator that is none
  (``evaluator=3``) with an AttributeError there. Refused before any work, naming the array and both shapes
  (``driver.check_evaluator``).
- *Constructors taking what is no size.* ``Evaluator(task, max_clients=2.5)`` failed in ``range()`` ('3' in a
  comparison, True scored one client); ``InProcessGrid(app, 2.5)`` failed in numpy's ``integers()``,
  ``workers=1.5`` was taken and refused by ``ProcessPoolExecutor`` at the first round, ``client_app=None`` at the
  first message; ``ManagedGrid(None, task)`` / ``ManagedGrid(grid, None)`` were built and failed at the roll call;
  ``FedBN(local_prefix=3)`` failed inside ``str.startswith``; ``simulate(flower_backend=3)`` was ignored by the
  tilestack engine and handed to Ray by Flower's. Each is now refused naming the argument and what was expected.
"""

from __future__ import annotations

import numpy as np
import pytest
from _fl_round5 import np_, same
from _fl_round7 import client_model, weighted_mean
from _fl_round9 import keep, near
from flwr.serverapp.strategy import FedAvg

from tilestack.federated import InProcessGrid, ManagedGrid, Task, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.evaluation import Evaluator
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import IFCA, FedBN, HeteroFL

ALL = dict(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)


def _task(**kw) -> Task:
    base = dict(dataset="blobs", num_samples=160, num_features=3, num_classes=2, num_clients=4, local_steps=2, lr=0.1)
    return Task(**(base | kw))


class Spy(FedAvg):
    """FedAvg that records the rounds it configured (a message sent: clients trained)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.configured: list[int] = []

    def configure_train(self, server_round, arrays, config, grid):
        self.configured.append(server_round)
        return super().configure_train(server_round, arrays, config, grid)


def _grid(task: Task) -> ManagedGrid:
    return ManagedGrid(InProcessGrid(tsclient.app, task.num_clients), task)


# ---- hooks that are no functions -------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("entry", ["simulate", "run_rounds"])
@pytest.mark.parametrize("hook", ["on_round", "extra_metrics"])
@pytest.mark.parametrize("value", [3, "keep", [print]], ids=["int", "str", "list"])
def test_a_round_hook_that_is_no_function_is_refused_before_any_client_trains(entry, hook, value):
    """``on_round`` / ``extra_metrics`` are called after each round: one that is no function is a TypeError naming the
    argument before round 1 is configured (before: round 1's clients trained and were aggregated, then "'int' object is
    not callable" ended the run)."""
    task = _task()
    spy = Spy(**ALL)
    with pytest.raises(TypeError, match=rf"{entry}: {hook} is a {type(value).__name__}; expected a function"):
        if entry == "simulate":
            simulate(spy, task, rounds=2, **{hook: value})
        else:
            run_rounds(spy, _grid(task), initial_arrays(task), num_rounds=2, **{hook: value})
    assert spy.configured == []


@pytest.mark.timeout(60)
def test_round_hooks_that_are_functions_are_each_called_once_a_round_with_that_rounds_model():
    """The check refuses only what is no function: a plain function, a bound method and a callable object all run, each
    called once per round, ``extra_metrics`` with the round's model (which is the run's final model in the last round)
    and its numbers kept in ``RoundMetrics.extra``."""
    task = _task()
    seen, models = [], []

    class Counter:
        def __call__(self, m):
            seen.append(m.round)

    def extra(strategy, arrays, server_round):
        models.append(np_(arrays))
        return {"norm": float(sum(np.sum(v.astype(np.float64) ** 2) for v in np_(arrays).values()))}

    res = simulate(FedAvg(**ALL), task, rounds=3, on_round=Counter(), extra_metrics=extra, evaluate=False)
    assert seen == [1, 2, 3] and len(models) == 3
    final = np_(res.arrays)
    assert all(np.array_equal(final[k], models[-1][k]) for k in final)
    want = float(sum(np.sum(v.astype(np.float64) ** 2) for v in final.values()))
    assert res.history.rounds[-1].extra == {"norm": want}


# ---- the evaluator ---------------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "other, needle",
    [
        (dict(num_features=5), r"fc\.weight: \(5, 2\)\); expected an Evaluator of the run's task, whose model is the "
                               r"initial arrays' \(fc\.weight: \(3, 2\)\)"),
        (dict(num_classes=3), r"fc\.bias: \(3,\), fc\.weight: \(3, 3\)\); expected .* \(fc\.bias: \(2,\), "
                              r"fc\.weight: \(3, 2\)\)"),
        (dict(model="mlp", hidden=4), r"fc1\.bias: \(4,\), fc1\.weight: \(3, 4\), fc2\.bias: \(2,\), fc2\.weight"),
    ],
    ids=["features", "classes", "model"],
)  # fmt: skip
def test_an_evaluator_of_another_tasks_model_is_refused_before_any_client_trains(other, needle):
    """``run_rounds(..., evaluator=Evaluator(t))`` scores the global model after each round: an Evaluator of a task
    whose model has other arrays (features, classes, an MLP for logistic regression) is refused naming them and both
    shapes, before round 1 (before: round 1's clients trained, then numpy's matmul error ended the run)."""
    task = _task()
    spy = Spy(**ALL)
    with pytest.raises(ValueError, match=r"run_rounds: evaluator scores the model of another task \(" + needle):
        run_rounds(spy, _grid(task), initial_arrays(task), num_rounds=1, evaluator=Evaluator(_task(**other)))
    assert spy.configured == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", [3, "server", Evaluator], ids=["int", "str", "the class"])
def test_an_evaluator_that_is_no_evaluator_is_refused_before_any_client_trains(value):
    task = _task()
    spy = Spy(**ALL)
    with pytest.raises(TypeError, match=r"run_rounds: evaluator is (a \w+|the class Evaluator); expected a tilestack"):
        run_rounds(spy, _grid(task), initial_arrays(task), num_rounds=1, evaluator=value)
    assert spy.configured == []


@pytest.mark.timeout(60)
def test_an_evaluator_of_the_same_model_on_other_data_is_taken_and_scores_that_data_by_hand():
    """The check is on the model, not the data: an Evaluator of the same model over another seed's data (a held-out
    set) runs, and its test accuracy is the final model's accuracy on that data, computed here in float64."""
    task, held_out = _task(), _task(seed=7)
    res = run_rounds(FedAvg(**ALL), _grid(task), initial_arrays(task), num_rounds=2, evaluator=Evaluator(held_out))
    w = np_(res.arrays)
    xs, ys = zip(*[held_out.client_data(p)[2:] for p in range(held_out.num_clients)], strict=True)
    x, y = np.concatenate(xs).astype(np.float64), np.concatenate(ys)
    acc = float(np.mean((x @ w["fc.weight"].astype(np.float64) + w["fc.bias"]).argmax(axis=1) == y))
    assert res.history.rounds[-1].test_acc == pytest.approx(acc, abs=1e-12)


@pytest.mark.timeout(60)
def test_evaluators_of_ifca_cluster_models_and_heterofl_full_width_models_are_taken():
    """IFCA's record holds K cluster models (``cluster{j}/fc.weight``) and HeteroFL's the full-width MLP: the
    evaluator of the task fits both (the check reads names within a cluster), and both runs aggregate every client."""
    clustered = Task(dataset="clustered", groups=2, num_clients=4, num_features=3, num_classes=3,
                     samples_per_client=30, local_steps=2, batch_size=8, lr=0.2)  # fmt: skip
    ifca = IFCA(num_clusters=2, **ALL)
    res = run_rounds(ifca, _grid(clustered), ifca.initial_arrays(clustered), num_rounds=2,
                     evaluator=Evaluator(clustered))  # fmt: skip
    assert [m.num_aggregated for m in res.history.rounds] == [4, 4]
    assert 0.0 <= res.history.rounds[-1].test_acc <= 1.0
    mlp = _task(model="mlp", hidden=8)
    res = run_rounds(HeteroFL(width_of=lambda p: (1.0, 0.5)[p % 2], hidden=8, **ALL), _grid(mlp), initial_arrays(mlp),
                     num_rounds=2, evaluator=Evaluator(mlp))  # fmt: skip
    assert [m.num_aggregated for m in res.history.rounds] == [4, 4]


# ---- constructors ----------------------------------------------------------------------------------------------------
CONSTRUCTORS = {
    "Evaluator max_clients=2.5": (lambda: Evaluator(_task(), 2.5), ValueError, r"Evaluator: max_clients=2\.5; expected "
                                                                               r"an integer >= 1"),
    "Evaluator max_clients='3'": (lambda: Evaluator(_task(), "3"), ValueError, r"Evaluator: max_clients='3'"),
    "Evaluator max_clients=True": (lambda: Evaluator(_task(), True), ValueError, r"Evaluator: max_clients=True"),
    "Evaluator task=None": (lambda: Evaluator(None, 3), TypeError, r"Evaluator: task is a NoneType; expected a "
                                                                    r"tilestack.federated.Task"),
    "InProcessGrid num_nodes=2.5": (lambda: InProcessGrid(tsclient.app, 2.5), ValueError,
                                    r"InProcessGrid: num_nodes=2\.5; expected an integer >= 1"),
    "InProcessGrid num_nodes='3'": (lambda: InProcessGrid(tsclient.app, "3"), ValueError, r"num_nodes='3'"),
    "InProcessGrid workers=1.5": (lambda: InProcessGrid(tsclient.app, 3, workers=1.5), ValueError,
                                  r"InProcessGrid: workers=1\.5; expected an integer >= 1"),
    "InProcessGrid client_app=None": (lambda: InProcessGrid(None, 3), TypeError,
                                      r"InProcessGrid: client_app is a NoneType; expected a flwr ClientApp"),
    "ManagedGrid inner=None": (lambda: ManagedGrid(None, _task()), TypeError,
                               r"ManagedGrid: inner is a NoneType; expected a flwr Grid"),
    "ManagedGrid task=None": (lambda: ManagedGrid(InProcessGrid(tsclient.app, 4), None), TypeError,
                              r"ManagedGrid: task is a NoneType; expected a tilestack.federated.Task"),
    "ManagedGrid task=its JSON": (lambda: ManagedGrid(InProcessGrid(tsclient.app, 4), _task().to_json()), TypeError,
                                  r"ManagedGrid: task is a str"),
    "FedBN local_prefix=3": (lambda: FedBN(local_prefix=3, **ALL), ValueError,
                             r"FedBN: local_prefix=3; expected the name prefix of the local layers \(a non-empty "
                             r"str\)"),
    "simulate flower_backend=3": (lambda: simulate(FedAvg(**ALL), _task(), rounds=1, flower_backend=3), TypeError,
                                  r"simulate: flower_backend is a int; expected a dict of Flower's backend_config"),
}  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
def test_a_building_block_given_what_it_cannot_use_is_refused_naming_the_argument(name):
    build, kind, needle = CONSTRUCTORS[name]
    with pytest.raises(kind, match=needle):
        build()


@pytest.mark.timeout(60)
def test_building_blocks_given_numpy_integers_run_as_with_plain_ones():
    """The checks take NumPy integers where a count is asked for (the sizes users compute with NumPy): the run over
    ``InProcessGrid(app, np.int64(4), workers=np.int64(1))`` and ``Evaluator(task, np.int32(4))`` is the run with plain
    ints, bit for bit, and its first round is the example-weighted mean of the four clients' own SGD replayed here."""
    task = _task()

    def run(n, workers, clients):
        grid = ManagedGrid(InProcessGrid(tsclient.app, n, workers=workers), task)
        return run_rounds(FedAvg(**ALL), grid, initial_arrays(task), num_rounds=2, evaluator=Evaluator(task, clients),
                          extra_metrics=keep(models := []), ), models  # fmt: skip

    (a, models), (b, _) = run(np.int64(4), np.int64(1), np.int32(4)), run(4, 1, 4)
    assert same(a.arrays, b.arrays)
    assert a.history.rounds[-1].test_acc == b.history.rounds[-1].test_acc
    x0 = np_(initial_arrays(task))
    replies = {p: client_model(task, p, 1, x0)[0] for p in range(4)}
    near(models[0], weighted_mean(replies, {p: task.num_train(p) for p in range(4)}))
