"""Federated scenarios, round 17 (2 of 2): metrics aggregation functions of the user's own, over clients of 1 to 343
training examples with one client's reply left out, and such a function that is no function.

tilestack's ClientApp over tilestack's in-process Flower ``Grid`` (``simulate``; ``run_rounds`` with ``ManagedGrid``),
Flower's FedAvg with ``train_metrics_aggr_fn`` / ``evaluate_metrics_aggr_fn``. References: each client's own metrics
as the grid recorded them (``RoundMetrics.client_train`` / ``client_eval``), reduced in float64 here; "before any
work" is checked with a strategy that records every ``configure_train`` call (none: no client trained).

What this round found, fixed:

- *A metrics aggregation function that is no function.* Flower's strategies store ``train_metrics_aggr_fn`` and
  ``evaluate_metrics_aggr_fn`` as given and call them once a round's replies are in: ``FedAvg(
  evaluate_metrics_aggr_fn=3)`` ended the run with "'int' object is not callable" after round 1's clients had
  trained. It is refused before any work, at every level of a wrapped strategy, naming the strategy and the argument
  (``checks.check_metric_functions``).
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import MetricRecord
from flwr.serverapp.strategy import FedAvg

from tilestack.federated import InProcessGrid, ManagedGrid, Task, initial_arrays, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.compression import Compressed

EVERYONE = dict(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=1, min_train_nodes=1,
                min_evaluate_nodes=1)  # fmt: skip


def _task(**kw) -> Task:
    base = dict(dataset="blobs", num_samples=900, num_features=4, num_classes=3, num_clients=6, local_steps=3, lr=0.1,
                partitioner="quantity", quantity_sigma=4.0, seed=1)  # fmt: skip
    return Task(**(base | kw))


class Spy(FedAvg):
    """FedAvg that records the rounds it configured (a message sent: clients trained)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.configured: list[int] = []

    def configure_train(self, server_round, arrays, config, grid):
        self.configured.append(server_round)
        return super().configure_train(server_round, arrays, config, grid)


def _metrics(records) -> list[dict]:
    return [dict(next(iter(r.metric_records.values()))) for r in records]


def worst_and_plain_mean(records, weighting_metric_name: str) -> MetricRecord:
    """Evaluation: the worst client's accuracy, the unweighted mean accuracy and how many replies came."""
    accs = [float(m["eval-acc"]) for m in _metrics(records)]
    return MetricRecord({"worst-acc": min(accs), "plain-acc": float(np.mean(accs)), "replies": len(accs)})


def median_loss(records, weighting_metric_name: str) -> MetricRecord:
    """Training: the median of the clients' losses and the total of the weights named by the strategy."""
    ms = _metrics(records)
    return MetricRecord({"median-loss": float(np.median([m["train-loss"] for m in ms])),
                         "total-weight": float(sum(m[weighting_metric_name] for m in ms))})  # fmt: skip


@pytest.mark.timeout(60)
def test_metrics_aggregation_functions_of_the_users_own_see_the_kept_replies_and_are_kept_per_round_by_hand():
    task = _task(faults=((1, "nan"),))  # client 1's training reply is left out every round; its evaluation is not
    sizes = {p: task.num_train(p) for p in range(task.num_clients)}
    assert sorted(sizes.values()) == [1, 36, 38, 56, 246, 343]  # clients of very different sizes
    strategy = FedAvg(**EVERYONE, train_metrics_aggr_fn=median_loss, evaluate_metrics_aggr_fn=worst_and_plain_mean)
    result = simulate(strategy, task, rounds=3, seed=2)
    for m in result.history.rounds:
        assert m.excluded == {"1": "non-finite: fc.weight"} and m.num_aggregated == 5
        train = {int(p): c for p, c in m.client_train.items()}
        assert sorted(train) == [0, 2, 3, 4, 5]
        assert m.train_metrics == pytest.approx({
            "median-loss": float(np.median(np.array([train[p]["train-loss"] for p in train], np.float64))),
            "total-weight": float(sum(sizes[p] for p in train)),
        }, rel=1e-15, abs=0)  # fmt: skip
        evals = {int(p): c for p, c in m.client_eval.items()}
        assert sorted(evals) == list(range(6))
        accs = np.array([evals[p]["eval-acc"] for p in sorted(evals)], np.float64)
        assert m.eval_metrics == pytest.approx({"worst-acc": accs.min(), "plain-acc": accs.mean(), "replies": 6.0},
                                               rel=1e-15, abs=0)  # fmt: skip
        assert m.client_acc["worst"] == accs.min()  # the fairness summary agrees with the user's own worst


@pytest.mark.timeout(60)
def test_flowers_own_weighted_metric_means_over_clients_1_to_343_in_size_are_the_float64_means_by_hand():
    task = _task()
    result = simulate(FedAvg(**EVERYONE), task, rounds=2, seed=1)
    for m in result.history.rounds:
        train = {int(p): c for p, c in m.client_train.items()}
        w = np.array([train[p]["num-examples"] for p in sorted(train)], np.float64)
        loss = np.array([train[p]["train-loss"] for p in sorted(train)], np.float64)
        assert w.min() <= 10 and w.max() >= 200
        assert m.train_metrics["train-loss"] == pytest.approx(float(w @ loss / w.sum()), rel=1e-12)
        evals = {int(p): c for p, c in m.client_eval.items()}
        we = np.array([evals[p]["num-examples"] for p in sorted(evals)], np.float64)
        acc = np.array([evals[p]["eval-acc"] for p in sorted(evals)], np.float64)
        assert m.eval_metrics["eval-acc"] == pytest.approx(float(we @ acc / we.sum()), rel=1e-12)
        assert m.eval_metrics["eval-acc"] != pytest.approx(float(acc.mean()), rel=1e-3)  # weighting is visible


NOT_FUNCTIONS = {
    "evaluate fn 3": (dict(evaluate_metrics_aggr_fn=3), r"Spy: evaluate_metrics_aggr_fn is a int; expected a function"),
    "train fn str": (dict(train_metrics_aggr_fn="median"), r"Spy: train_metrics_aggr_fn is a str; expected a function"),
}  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(NOT_FUNCTIONS))
@pytest.mark.parametrize("entry", ["simulate", "run_rounds", "wrapped"])
def test_a_metrics_aggregation_function_that_is_no_function_is_refused_before_any_client_trains(case, entry):
    kw, needle = NOT_FUNCTIONS[case]
    task = _task(partitioner="iid")
    spy = Spy(**EVERYONE, **kw)
    with pytest.raises(TypeError, match=needle):
        if entry == "simulate":
            simulate(spy, task, rounds=2)
        elif entry == "wrapped":
            simulate(Compressed(spy, "int8"), task, rounds=2)
        else:
            grid = ManagedGrid(InProcessGrid(tsclient.app, task.num_clients), task)
            run_rounds(spy, grid, initial_arrays(task), num_rounds=2)
    assert spy.configured == []
    # None is Flower's own weighted mean, and a function is taken
    for fn in (None, worst_and_plain_mean):
        ok = Spy(**EVERYONE, evaluate_metrics_aggr_fn=fn)
        assert simulate(ok, task, rounds=1).history.rounds[0].num_aggregated == 6 and ok.configured == [1]
