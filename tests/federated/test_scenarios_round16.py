"""Federated scenarios, round 16 (1 of 2): the tasks a run's configs send checked against its model, bad settings
refused before any client trains, a personalised client (Ditto) leaving mid-run and coming back, and FedAdam over
8-bit updates with error feedback while a client is away.

tilestack's ClientApp over tilestack's in-process Flower ``Grid`` (``simulate``; ``run_rounds`` with ``ManagedGrid``),
Flower's FedAvg and FedAdam, tilestack's Ditto and ``Compressed``. The references are written out in numpy: the
clients' own SGD replayed (``_fl_round7.client_model``; Ditto's personal SGD ``_fl_round10.logreg_sgd_by_hand``), the
8-bit quantisation and FedAdam's rule with Flower's bias correction (``_fl_round16``), accuracies in float64. "Before
any work" is checked with a strategy that records every ``configure_train`` call (none: no client trained).

What this round found, fixed:

- *A run over a model its clients cannot build.* ``run_rounds`` (unlike ``simulate``) never compared the initial
  arrays with the task the clients rebuild their model from: initial arrays of another task, or a ``train_config`` /
  ``evaluate_config`` carrying a task with other features or classes, made every client fail with numpy's matmul
  error in every round; the run ended with nothing aggregated and no error. An ``evaluate_config`` whose task was no
  Task as JSON (3, a typo) made every evaluation an error reply. Each is refused before any work, naming the config
  and both shapes (``driver.check_config_tasks``).
- *A strategy given as its class* (``simulate(FedAvg, ...)``) was refused as "strategy is a ABCMeta"; it says so now.
"""

from __future__ import annotations

import numpy as np
import pytest
from _fl_round5 import np_
from _fl_round7 import client_model, weighted_mean
from _fl_round9 import keep, near
from _fl_round10 import logreg_sgd_by_hand
from _fl_round16 import ServerOptimizer, int8_round_trip
from flwr.serverapp.strategy import FedAdam, FedAvg

from tilestack.errors import FederatedError
from tilestack.federated import InProcessGrid, ManagedGrid, SystemModel, Task, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.compression import RESIDUAL_STATE, Compressed
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import Ditto, make_strategy

EVERYONE = dict(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=1, min_train_nodes=1,
                min_evaluate_nodes=1)  # fmt: skip
TRAIN_ONLY = dict(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)


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


def _grid(task: Task, **kw) -> ManagedGrid:
    return ManagedGrid(InProcessGrid(tsclient.app, task.num_clients), task, **kw)


# ---- the tasks the configs send, against the run's model ------------------------------------------------------------
CONFIG_TASKS = {
    "initial arrays of 5 features": (
        dict(initial=_task(num_features=5)), ValueError,
        r"run_rounds: initial_arrays hold fc\.weight: \(5, 2\); expected the model of the task the clients train "
        r"\(the grid's task: fc\.weight: \(3, 2\)\)"),
    "train_config task of 3 classes": (
        dict(train_config={tsclient.TASK_KEY: _task(num_classes=3).to_json()}), ValueError,
        r"run_rounds: initial_arrays hold fc\.bias: \(2,\), fc\.weight: \(3, 2\); expected the model of the task the "
        r"clients train \(train_config\['tilestack\.task'\]: fc\.bias: \(3,\), fc\.weight: \(3, 3\)\)"),
    "evaluate_config task of an MLP": (
        dict(evaluate_config={tsclient.TASK_KEY: _task(model="mlp", hidden=4).to_json()}), ValueError,
        r"expected the model of the task the clients evaluate \(evaluate_config\['tilestack\.task'\]: fc1\.bias"),
    "evaluate_config task 3": (
        dict(evaluate_config={tsclient.TASK_KEY: 3}), FederatedError,
        r"run_rounds: evaluate_config\['tilestack\.task'\] is a int; expected task\.to_json\(\), the Task as JSON"),
    "evaluate_config task a typo": (
        dict(evaluate_config={tsclient.TASK_KEY: "{'dataset': 'blobs'}"}), FederatedError,
        r"run_rounds: evaluate_config\['tilestack\.task'\] is not a Task as JSON \(JSONDecodeError: .*\); expected "
        r"task\.to_json\(\)"),
}  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(CONFIG_TASKS))
def test_a_config_task_or_initial_model_the_clients_cannot_build_is_refused_before_any_client_trains(case):
    """Every client rebuilds its model from the task its message carries. Before, each of these ran every round with
    every client failing on numpy's matmul error (or every evaluation failing on the task), nothing aggregated, and
    returned without an error; now each is refused before round 1 is configured, naming the config and both models."""
    kw, kind, needle = CONFIG_TASKS[case]
    task = _task()
    start = initial_arrays(kw.pop("initial", task))
    spy = Spy(**EVERYONE)
    with pytest.raises(kind, match=needle):
        run_rounds(spy, _grid(task), start, num_rounds=2, **kw)
    assert spy.configured == []


@pytest.mark.timeout(60)
def test_an_evaluate_config_task_of_the_same_model_on_held_out_data_is_taken_and_each_client_scores_that_data():
    """The check is on the model, not the data: an ``evaluate_config`` carrying the task of another seed (the same
    model, held-out data) runs, and each client's federated eval-acc is the final global model's accuracy on that
    task's test split of its partition, computed here in float64; training used the grid's task (round 1 is the
    example-weighted mean of the clients' own SGD on their training data, replayed here)."""
    task, held_out = _task(), _task(seed=9)
    models: list = []
    res = run_rounds(FedAvg(**EVERYONE), _grid(task), initial_arrays(task), num_rounds=2, extra_metrics=keep(models),
                     evaluate_config={tsclient.TASK_KEY: held_out.to_json()})  # fmt: skip
    x0 = np_(initial_arrays(task))
    near(models[0], weighted_mean({p: client_model(task, p, 1, x0)[0] for p in range(4)},
                                  {p: task.num_train(p) for p in range(4)}))  # fmt: skip
    w = {k: v.astype(np.float64) for k, v in models[-1].items()}
    for p in range(4):
        _, _, xt, yt = held_out.client_data(p)
        acc = float(np.mean((xt.astype(np.float64) @ w["fc.weight"] + w["fc.bias"]).argmax(axis=1) == yt))
        assert res.history.rounds[-1].client_eval[str(p)]["eval-acc"] == pytest.approx(acc, abs=1e-12), p
        assert res.history.rounds[-1].client_eval[str(p)]["num-examples"] == len(yt)
    assert all(not np.array_equal(task.client_data(p)[2], held_out.client_data(p)[2]) for p in range(4))


# ---- bad settings, refused before any client trains ----------------------------------------------------------------
BAD_SETTINGS = {
    "rounds=-1": (lambda s: simulate(s, _task(), rounds=-1), ValueError, r"simulate: rounds=-1; expected an integer "
                                                                          r">= 0"),
    "rounds=2.5": (lambda s: simulate(s, _task(), rounds=2.5), ValueError, r"simulate: rounds=2\.5; expected an "
                                                                             r"integer"),
    "fraction_train=1.5": (lambda s: simulate(Spy(fraction_train=1.5), _task(), rounds=1), FederatedError,
                           r"Spy: fraction_train=1\.5; expected a number in \[0, 1\] \(the share of nodes sampled\)"),
    "fraction_evaluate=nan": (lambda s: simulate(Spy(fraction_train=1.0, fraction_evaluate=float("nan")), _task(),
                                                 rounds=1), FederatedError, r"Spy: fraction_evaluate=nan; expected"),
    "min_train_nodes above the nodes": (lambda s: simulate(Spy(fraction_train=1.0, min_train_nodes=5), _task(),
                                                           rounds=1), FederatedError,
                                        r"Spy: min_train_nodes=5; expected <= 4, the 4 nodes of the run"),
    "unknown strategy name": (lambda s: make_strategy("fedavgm", clients_per_round=2, num_clients=4), ValueError,
                              r"make_strategy: name='fedavgm'; expected one of \('fedavg', 'fedprox'"),
    "the strategy's class": (lambda s: simulate(FedAvg, _task(), rounds=1), TypeError,
                             r"strategy is the class FedAvg, not an instance; expected a flwr\.serverapp\.strategy\."
                             r"Strategy \(e\.g\. FedAvg\(\.\.\.\)\)"),
    "a strategy's name": (lambda s: simulate("fedavg", _task(), rounds=1), TypeError, r"strategy is a str; expected"),
    "int4 compression": (lambda s: Compressed(s, "int4"), ValueError, r"compression: method='int4'; expected one of "
                                                                         r"\('topk', 'int8'\)"),
    "top-k ratio 1.5": (lambda s: Compressed(s, "topk", 1.5), ValueError, r"compression: topk ratio='1\.5'; expected "
                                                                            r"a number in \(0, 1\]"),
    "a system of 5 clients": (lambda s: simulate(s, _task(), rounds=1, system=SystemModel(5)), ValueError,
                              r"simulate: system\.num_clients=5; expected task\.num_clients=4"),
    "timeout=0": (lambda s: simulate(s, _task(), rounds=1, timeout=0), ValueError,
                  r"simulate: timeout=0; expected None \(no limit\) or a finite number of seconds > 0"),
}  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_bad_settings_are_refused_naming_the_argument_before_any_client_trains(case):
    """Negative or fractional round counts, a sampling fraction above 1 or NaN, a minimum above the nodes, an unknown
    strategy name, the strategy's class for an instance, an unknown compression: each is an error naming the argument,
    the value and what was expected, and no round was configured."""
    run, kind, needle = BAD_SETTINGS[case]
    spy = Spy(**TRAIN_ONLY)
    with pytest.raises(kind, match=needle):
        run(spy)
    assert spy.configured == []


# ---- Ditto: a personalised client leaving mid-run and coming back ---------------------------------------------------
LAM = 0.5
AWAY = 2  # offline in rounds 2 and 3, back in round 4
ONLINE = [[1] * 6, [1, 1, 0, 1, 1, 1], [1, 1, 0, 1, 1, 1], [1] * 6]


def _ditto_task() -> Task:
    return Task(dataset="blobs", num_samples=400, num_features=5, num_classes=4, num_clients=6, local_steps=5,
                batch_size=8, lr=0.1, partitioner="dirichlet", partition_alpha=0.1, seed=4)  # fmt: skip


def _accuracy(model: dict, x: np.ndarray, y: np.ndarray) -> float:
    z = x.astype(np.float64) @ model["fc.weight"].astype(np.float64) + model["fc.bias"].astype(np.float64)
    return float(np.mean(z.argmax(axis=1) == y))


@pytest.mark.timeout(60)
def test_ditto_personal_model_of_a_client_away_for_two_rounds_waits_for_it_and_goes_on_from_where_it_was():
    """Ditto(lambda 0.5) over 6 clients of Dirichlet(0.1) labels, client 2 offline in rounds 2 and 3. Each round's
    global model is the example-weighted mean of the online clients' own SGD (replayed here); each online client's
    personal model takes its 5 proximal steps from where it was (replayed in float64), so client 2's round-4 steps
    start from its round-1 personal model, untouched while it was away; the away client is neither trained nor
    evaluated, and every evaluated client scores its own personal model on its test split."""
    task = _ditto_task()
    grid = _grid(task, system=SystemModel(6, availability=ONLINE))
    models: list = []
    res = run_rounds(Ditto(lam=LAM, **EVERYONE), grid, initial_arrays(task), num_rounds=4, extra_metrics=keep(models))
    x = np_(initial_arrays(task))
    personal: dict[int, dict] = {}
    data = {p: task.client_data(p) for p in range(6)}
    for rnd, m in enumerate(res.history.rounds, start=1):
        online = [p for p in range(6) if ONLINE[rnd - 1][p]]
        near(models[rnd - 1], weighted_mean({p: client_model(task, p, rnd, x)[0] for p in online},
                                            {p: task.num_train(p) for p in online}))  # fmt: skip
        assert sorted(int(p) for p in m.client_train) == online
        assert sorted(int(p) for p in m.client_eval) == online
        for p in online:
            xs, ys, xt, yt = data[p]
            rng = np.random.default_rng([task.seed, p, rnd, tsclient.DITTO_SEED])
            personal[p] = logreg_sgd_by_hand(xs, ys, personal.get(p, x), x, steps=task.steps_for(p),
                                             batch=task.batch_size, lr=task.lr, lam=LAM, rng=rng)  # fmt: skip
            assert m.client_eval[str(p)]["eval-acc"] == _accuracy(personal[p], xt, yt), (rnd, p)
        x = models[rnd - 1]
    held = {grid.partition_of[nid]: tsclient._to_numpy(ctx.state[tsclient.DITTO_STATE])
            for nid, ctx in grid.inner.contexts.items()}  # fmt: skip
    for p in range(6):
        for k in x:
            np.testing.assert_allclose(held[p][k], personal[p][k], rtol=1e-4, atol=1e-5, err_msg=f"client {p} {k}")
    # had client 2 restarted from the global model on its return, its personal model would be another one
    xs, ys, _, _ = data[AWAY]
    personal_from_global = logreg_sgd_by_hand(
        xs, ys, models[2], models[2], steps=task.steps_for(AWAY), batch=task.batch_size, lr=task.lr, lam=LAM,
        rng=np.random.default_rng([task.seed, AWAY, 4, tsclient.DITTO_SEED]))  # fmt: skip
    assert max(float(np.abs(held[AWAY][k] - personal_from_global[k]).max()) for k in x) > 1e-3


# ---- FedAdam over 8-bit updates with error feedback, a client away for a round ---------------------------------------
ADAM = dict(eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3)
AWAY_ONCE = [[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]


@pytest.mark.timeout(60)
def test_fedadam_over_int8_updates_with_error_feedback_follows_its_rule_and_keeps_an_away_clients_residual():
    """Compressed(FedAdam, int8) over 4 clients (sizes from a Dirichlet(0.3) split), client 1 offline in round 2.
    Written out: each online client sends its update plus what earlier rounds left out (its residual) as 8-bit codes,
    keeps the rounding error as its new residual, the server rebuilds global + decoded update, takes the
    example-weighted mean, and FedAdam steps with Flower's bias correction (eta sqrt(1 - b2^(r+1)) / (1 - b1^(r+1))).
    Every round's model is that, rounded once to float32; the away client's residual waits for it (its round-3
    update carries its round-1 rounding error), each client's residual is the one held in its node's state, and
    nothing is lost: what the server decoded plus the residual is each client's true updates summed."""
    task = Task(dataset="blobs", num_samples=240, num_features=3, num_classes=3, num_clients=4, local_steps=3,
                lr=0.1, partitioner="dirichlet", partition_alpha=0.3, seed=2)  # fmt: skip
    grid = _grid(task, system=SystemModel(4, availability=AWAY_ONCE))
    models: list = []
    run_rounds(Compressed(FedAdam(**TRAIN_ONLY, **ADAM), "int8"), grid, initial_arrays(task), num_rounds=4,
               extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    adam = ServerOptimizer("adam", **ADAM)
    residual = {p: {k: np.zeros_like(v) for k, v in x.items()} for p in range(4)}
    sent_total = {p: {k: np.zeros(v.shape) for k, v in x.items()} for p in range(4)}
    true_total = {p: {k: np.zeros(v.shape) for k, v in x.items()} for p in range(4)}
    for rnd in range(1, 5):
        online = [p for p in range(4) if AWAY_ONCE[rnd - 1][p]]
        rebuilt = {}
        for p in online:
            y = client_model(task, p, rnd, x)[0]
            sent = {}
            for k in x:
                update = (y[k] - x[k]).astype(np.float32)
                true_total[p][k] += update
                delta = update + residual[p][k]
                sent[k] = int8_round_trip(delta)
                residual[p][k] = delta - sent[k]
                sent_total[p][k] += sent[k]
            rebuilt[p] = {k: x[k].astype(np.float64) + sent[k].astype(np.float64) for k in x}
        mean = weighted_mean(rebuilt, {p: task.num_train(p) for p in online})
        want = adam.step(x, mean, rnd)
        near(models[rnd - 1], want)
        x = models[rnd - 1]
    held = {grid.partition_of[nid]: tsclient._to_numpy(ctx.state[RESIDUAL_STATE])
            for nid, ctx in grid.inner.contexts.items()}  # fmt: skip
    for p in range(4):
        for k in x:
            np.testing.assert_allclose(held[p][k], residual[p][k], rtol=0, atol=1e-6, err_msg=f"client {p} {k}")
            np.testing.assert_allclose(sent_total[p][k] + residual[p][k], true_total[p][k], rtol=0, atol=1e-5)
    assert any(float(np.abs(residual[1][k]).max()) > 0 for k in x), "client 1 carried nothing"
