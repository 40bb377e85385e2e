"""Federated scenarios, round 17 (1 of 2): clients that send their model's arrays in an order of their own under the
rules that pair arrays by position, and the public partitioners given what they cannot use.

tilestack's in-process Flower ``Grid`` under ``ManagedGrid`` (``run_rounds``) with scripted Flower ClientApps
(``_fl_round5.scripted``: each reply written here) and Flower 1.41's own FedAvgM, Krum, MultiKrum, QFedAvg and
server-side fixed-clipping DP wrapper. References: the rules written out in float64 over the replies the clients sent
(``_fl_round17``; Krum's pick ``_fl_round9.krum_pick``, Flower's FlatClip ``_fl_round8.flat_clip``), and for each rule
the same run whose clients send their arrays in the server's order.

What this round found, fixed:

- *A reply's arrays in another order.* An ArrayRecord maps names to arrays, and the grid checked each reply's names
  and shapes by name, but Flower's FedAvgM, Krum / MultiKrum, QFedAvg and its DP wrappers pair a reply's arrays with
  the global model's by position (``to_numpy_ndarrays``). Clients that sent ``fc.bias`` before ``fc.weight`` (a dict
  sorted by name, another framework's state dict) made FedAvgM's global ``fc.bias`` the (3, 3) difference of a weight
  and a bias, server-side DP clipped norms of such differences, and Krum measured distances between unlike entries,
  all without a word. A kept reply's arrays now reach the strategy in the order the server sent them
  (``grid.for_aggregation``).
- *The partitioners' arguments.* ``partition.dirichlet``, ``shards`` and ``quantity_skew`` failed deep in numpy on
  ``num_clients=2.0`` ("'float' object cannot be interpreted as an integer", an AxisError in ``shards``, "slice
  indices must be integers"), on ``alpha='0.5'`` or None (a comparison of int and str), on ``seed=-1`` ("expected
  non-negative integer", naming no argument); ``shards(num_clients=-1)`` was named ``num_clients=-2`` (the shard
  count) and ``dirichlet(min_size=1.5)`` was taken. Each is a ValueError naming the function, the argument, the value
  and what was expected; numpy integers are taken as plain ones.
"""

from __future__ import annotations

import numpy as np
import pytest
from _fl_round5 import make_grid, np_, scripted
from _fl_round9 import keep, krum_pick, near
from _fl_round17 import client_models, clipped_mean, fedavgm, ordered_script, qfedavg, tiny_task
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedAvgM,
    Krum,
    MultiKrum,
    QFedAvg,
)

from tilestack.federated import initial_arrays, partition, run_rounds

LABELS = np.repeat(np.arange(5), 40)  # 200 examples of 5 classes


# ---- the partitioners given what they cannot use --------------------------------------------------------------------
BAD_PARTITIONS = {
    "dirichlet num_clients 2.0": (lambda: partition.dirichlet(LABELS, 2.0, 0.5), r"dirichlet: num_clients=2\.0; "
                                  r"expected an integer >= 1"),
    "dirichlet num_clients True": (lambda: partition.dirichlet(LABELS, True, 0.5), r"num_clients=True"),
    "dirichlet alpha str": (lambda: partition.dirichlet(LABELS, 4, "0.5"), r"dirichlet: alpha='0\.5'; expected a "
                            r"finite number > 0"),
    "dirichlet alpha None": (lambda: partition.dirichlet(LABELS, 4, None), r"dirichlet: alpha=None"),
    "dirichlet seed -1": (lambda: partition.dirichlet(LABELS, 4, 0.5, seed=-1), r"dirichlet: seed=-1; expected an "
                          r"integer >= 0"),
    "dirichlet min_size 1.5": (lambda: partition.dirichlet(LABELS, 4, 0.5, min_size=1.5), r"dirichlet: "
                               r"min_size=1\.5; expected an integer >= 0"),
    "dirichlet max_tries 2.5": (lambda: partition.dirichlet(LABELS, 4, 0.5, max_tries=2.5), r"max_tries=2\.5"),
    "shards num_clients -1": (lambda: partition.shards(LABELS, -1), r"shards: num_clients=-1; expected an integer "
                              r">= 1"),
    "shards num_clients 2.0": (lambda: partition.shards(LABELS, 2.0), r"shards: num_clients=2\.0"),
    "shards classes_per_client 1.5": (lambda: partition.shards(LABELS, 4, 1.5), r"shards: classes_per_client=1\.5"),
    "quantity num_samples 30.0": (lambda: partition.quantity_skew(30.0, 3), r"quantity_skew: num_samples=30\.0; "
                                  r"expected an integer >= 0"),
    "quantity sigma str": (lambda: partition.quantity_skew(30, 3, "1"), r"quantity_skew: sigma='1'; expected a "
                           r"finite number >= 0"),
    "quantity seed 0.5": (lambda: partition.quantity_skew(30, 3, seed=0.5), r"quantity_skew: seed=0\.5"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_PARTITIONS))
def test_a_partitioner_given_what_it_cannot_use_names_the_argument_and_the_value(case):
    call, needle = BAD_PARTITIONS[case]
    with pytest.raises(ValueError, match=needle):
        call()


@pytest.mark.parametrize("alpha", [0.02, 0.5, 50.0])
def test_dirichlet_label_skew_covers_every_example_once_and_numpy_arguments_give_the_same_split(alpha):
    parts = partition.dirichlet(LABELS, 7, alpha, seed=3, min_size=4)
    again = partition.dirichlet(LABELS, np.int64(7), np.float64(alpha), seed=np.int32(3), min_size=np.int16(4))
    assert len(parts) == 7 and all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    union = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(union), np.arange(len(LABELS)))  # each example to exactly one client
    assert min(len(p) for p in parts) >= 4 and all(np.all(np.diff(p) > 0) for p in parts)
    # each class's examples are split over the clients and nothing else: the label counts add up class by class
    counts = np.stack([np.bincount(LABELS[p], minlength=5) for p in parts])  # (clients, classes)
    np.testing.assert_array_equal(counts.sum(axis=0), np.bincount(LABELS))
    if alpha == 50.0:  # close to IID: no client holds less than half its fair share of any class
        assert counts.min() >= 0.5 * (40 / 7)
    if alpha == 0.02:  # strong skew: most clients hold most of their examples in one class
        assert np.median(counts.max(axis=1) / counts.sum(axis=1)) > 0.6


# ---- a reply's arrays in an order of the client's own ----------------------------------------------------------------
TRAIN_ONLY = dict(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)
PAIRING_RULES = {
    "FedAvgM": lambda: FedAvgM(**TRAIN_ONLY, server_learning_rate=0.7, server_momentum=0.9),
    "DP fixed clipping": lambda: DifferentialPrivacyServerSideFixedClipping(FedAvg(**TRAIN_ONLY), 0.0, 0.8, 5),
    "Krum": lambda: Krum(**TRAIN_ONLY, num_malicious_nodes=1),
    "MultiKrum": lambda: MultiKrum(**TRAIN_ONLY, num_malicious_nodes=1, num_nodes_to_select=3),
    "QFedAvg": lambda: QFedAvg(**TRAIN_ONLY, q=0.5, client_learning_rate=0.2, train_loss_key="train-loss"),
}  # fmt: skip


def _by_hand(name: str, rounds: int, x0: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The global model after each round, the rule written out by name in float64 and rounded to float32."""
    pids, weights, out, x, m = range(5), {p: p + 1 for p in range(5)}, [], x0, None
    for rnd in range(1, rounds + 1):
        models = client_models(x, rnd, pids)
        if name == "FedAvgM":
            new, m = fedavgm(x, models, weights, m, lr=0.7, beta=0.9)
        elif name == "DP fixed clipping":
            new = clipped_mean(x, models, weights, 0.8)
        elif name == "Krum":
            new = models[krum_pick(models, 1)]
        elif name == "QFedAvg":
            new = qfedavg(x, models, {p: 0.5 + p for p in pids}, q=0.5, client_lr=0.2)
        else:
            raise AssertionError(name)
        x = {k: v.astype(np.float32) for k, v in new.items()}
        out.append(x)
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(PAIRING_RULES))
def test_replies_listing_their_arrays_in_another_order_are_paired_by_name_under_rules_that_pair_by_position(name):
    task = tiny_task()
    runs = {}
    for reorder in (False, True):
        models: list = []
        result = run_rounds(PAIRING_RULES[name](), make_grid(scripted(ordered_script(reorder)), task),
                            initial_arrays(task), num_rounds=3, extra_metrics=keep(models))  # fmt: skip
        assert [r.num_aggregated for r in result.history.rounds] == [5, 5, 5]
        assert not any(r.excluded or r.skipped for r in result.history.rounds)
        runs[reorder] = (models, list(result.arrays.keys()))
    for got, want in zip(runs[True][0], runs[False][0], strict=True):  # the order a client lists its arrays in is
        assert got.keys() == want.keys()  # no input
        for k in want:
            assert got[k].shape == want[k].shape and np.array_equal(got[k], want[k]), (k, got[k], want[k])
    if name != "MultiKrum":  # (MultiKrum's own pick and mean: round 6, against the in-order run above)
        for got, want in zip(runs[True][0], _by_hand(name, 3, np_(initial_arrays(task))), strict=True):
            near(got, want, ulps=4)
    assert runs[True][1] == runs[False][1] == ["fc.weight", "fc.bias"]  # the model keeps its own order
