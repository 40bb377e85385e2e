"""q-FedAvg (fairness) and CFL (clustering by update similarity), against Flower's FedAvg and tilestack's IFCA."""

import random

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

from tilestack.federated import InProcessGrid, ManagedGrid, Task, fairness, simulate
from tilestack.federated.client import TASK_KEY
from tilestack.federated.client import app as client_app
from tilestack.federated.models import evaluate
from tilestack.federated.strategies import CFL, IFCA, QFFL, make_strategy
from tilestack.federated.strategies._util import to_numpy, to_record
from tilestack.federated.strategies.cfl import bipartition

SYN = dict(dataset="synthetic", num_clients=12, max_samples=200, local_steps=5, lr=0.05)
CLUSTERED = dict(dataset="clustered", num_clients=20, groups=2, num_features=20, num_classes=5, local_steps=20,
                 lr=0.1)  # fmt: skip


def test_fairness_reports_variance_and_the_worst_ten_percent():
    v = [0.1 * i for i in range(1, 21)]  # 20 clients: the worst 10% are 0.1 and 0.2
    f = fairness(v)
    assert f["worst10"] == pytest.approx(0.15) and f["var"] == pytest.approx(np.var(v)) and f["worst"] == 0.1


def test_qffl_with_q_zero_is_fedavg_unweighted_and_asks_for_the_start_loss():
    """q = 0: w - sum L (w - w_k) / sum L, the plain mean of the client models (FedAvg with equal weights)."""
    task = Task(**SYN)
    q0 = simulate(QFFL(q=0.0, client_learning_rate=task.lr, fraction_train=1.0, fraction_evaluate=0.0,
                       weighted_by_key="unit-weight"), task, rounds=2)  # fmt: skip
    avg = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key="unit-weight"), task, rounds=2)
    for k, v in avg.arrays.items():
        np.testing.assert_allclose(q0.arrays[k].numpy(), v.numpy(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="q=-1"):
        QFFL(q=-1, client_learning_rate=0.1)


def test_qffl_weighs_each_update_by_the_clients_loss_at_the_global_model():
    """One round of q = 2 by hand: Delta_k = F_k^q L (w - w_k), h_k = q F_k^(q-1) L^2 ||w - w_k||^2 + L F_k^q,
    with F_k the loss of the *received* model on client k's training data, computed here independently."""
    task, q = Task(**SYN), 2.0
    L = 1.0 / task.lr
    grid = ManagedGrid(InProcessGrid(client_app, task.num_clients, seed=0), task)
    s = QFFL(q=q, client_learning_rate=task.lr, fraction_train=0.5, fraction_evaluate=0.0)
    w0 = {k: v + 0.1 for k, v in task.initial_params().items()}  # not zero, so that losses differ
    random.seed(0)
    replies = list(grid.send_and_receive(s.configure_train(1, to_record(w0), ConfigRecord({TASK_KEY: task.to_json()}),
                                                           grid)))  # fmt: skip
    keys = list(w0)
    num, den = {k: 0.0 for k in keys}, 0.0
    for m in replies:
        pid = grid.partition_of[m.metadata.src_node_id]
        x, y, _, _ = task.client_data(pid)
        f = evaluate(task.build_model(), w0, x, y)[0]
        wk = to_numpy(m.content["arrays"])
        grad = {k: L * (w0[k].astype(np.float64) - wk[k]) for k in keys}
        sq = sum(float((g**2).sum()) for g in grad.values())
        for k in keys:
            num[k] = num[k] + f**q * grad[k]
        den += q * f ** (q - 1) * sq + L * f**q
    new, _ = s.aggregate_train(1, replies)  # (Flower's QFedAvg consumes the replies' arrays)
    for k in keys:
        np.testing.assert_allclose(new[k].numpy(), w0[k] - num[k] / den, rtol=1e-4, atol=1e-6)
    s = make_strategy("qfedavg", clients_per_round=6, num_clients=12, q=2.0, client_lr=0.05)
    assert isinstance(s, QFFL) and s.q == 2.0 and s.client_learning_rate == 0.05


def test_bipartition_separates_two_groups_of_directions():
    rng = np.random.default_rng(0)
    d = np.array([1.0, 0.0, 0.0])
    u = np.stack([d + rng.normal(0, 0.1, 3) for _ in range(4)] + [-d + rng.normal(0, 0.1, 3) for _ in range(3)])
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    assert bipartition(u @ u.T) == ([0, 1, 2, 3], [4, 5, 6])


def test_cfl_splits_planted_groups_that_fedavg_cannot_fit_like_ifca():
    task = Task(**CLUSTERED)
    cfl = CFL(fraction_train=1.0, fraction_evaluate=0.0, warmup=3)
    res = simulate(cfl, task, rounds=12, initial=cfl.initial_arrays(task))
    fedavg = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=12)
    ifca = IFCA(num_clusters=2, fraction_train=1.0, fraction_evaluate=0.0)
    ifca_res = simulate(ifca, task, rounds=12, initial=ifca.initial_arrays(task))
    assert cfl.splits and cfl.splits[0][0] > 3 and cfl.agreement(task) == 1.0
    acc = {n: r.history.rounds[-1].test_acc for n, r in [("cfl", res), ("fedavg", fedavg), ("ifca", ifca_res)]}
    assert acc["fedavg"] < 0.6 and acc["cfl"] > 0.8 and acc["cfl"] > acc["ifca"] - 0.05


def test_cfl_does_not_split_one_congruent_population():
    cfl = CFL(fraction_train=1.0, fraction_evaluate=0.0, warmup=2)
    simulate(cfl, Task(**{**CLUSTERED, "groups": 1}), rounds=8, initial=cfl.initial_arrays(Task(**CLUSTERED)))
    assert cfl.splits == []
