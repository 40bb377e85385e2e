import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg, FedMedian

from tilestack.federated import SystemModel, Task, simulate
from tilestack.federated.strategies import (
    IFCA,
    STRATEGY_SETTINGS,
    FedBN,
    FedDF,
    FedNova,
    HeteroFL,
    OortSelector,
    RandomSelector,
    Scaffold,
    Selected,
    adjusted_rand_index,
    make_strategy,
    sub_model,
)

SYN = dict(dataset="synthetic", num_clients=12, max_samples=300, lr=0.05)


def _acc(res):
    return res.history.rounds[-1].test_acc


def test_scaffold_keeps_client_control_variates_and_learns():
    task = Task(**SYN, local_steps=10)
    s = Scaffold(fraction_train=0.5, fraction_evaluate=0.0)
    res = simulate(s, task, rounds=6)
    assert any(np.abs(v).sum() > 0 for v in s.c.values())
    assert _acc(res) > res.history.rounds[0].test_acc
    assert res.history.rounds[-1].bytes_down > 0


def test_fednova_equals_fedavg_with_equal_work_and_differs_with_unequal_work():
    task = Task(**SYN, local_steps=8)
    kw = dict(fraction_train=0.5, fraction_evaluate=0.0)
    same = [simulate(s, task, rounds=3).arrays for s in (FedAvg(**kw), FedNova(**kw))]
    for k in same[0]:
        np.testing.assert_allclose(same[0][k].numpy(), same[1][k].numpy(), rtol=1e-5, atol=1e-6)
    system = SystemModel(12, straggler_fraction=0.7, seed=2)
    diff = [simulate(s, task, rounds=3, system=system).arrays for s in (FedAvg(**kw), FedNova(**kw))]
    assert any(not np.allclose(diff[0][k].numpy(), diff[1][k].numpy()) for k in diff[0])


def test_fedbn_keeps_normalisation_local_and_helps_under_feature_shift():
    task = Task(dataset="blobs", num_clients=10, num_features=20, model="mlp", hidden=16, norm=True,
                feature_shift=0.8, local_steps=20, lr=0.05, num_samples=3000)  # fmt: skip
    kw = dict(fraction_train=0.5, fraction_evaluate=1.0)
    avg = simulate(FedAvg(**kw), task, rounds=6)
    bn = simulate(FedBN(**kw), task, rounds=6)
    assert bn.history.rounds[-1].client_acc["mean"] > avg.history.rounds[-1].client_acc["mean"]
    assert bn.history.rounds[-1].bytes_up < avg.history.rounds[-1].bytes_up  # bn.* never uploaded


def test_heterofl_sub_models_and_aggregation():
    p = {"fc1.weight": np.ones((5, 8)), "fc1.bias": np.ones(8), "fc2.weight": np.ones((8, 3)), "fc2.bias": np.ones(3)}
    sub = sub_model(p, hidden=8, width=0.5)
    assert sub["fc1.weight"].shape == (5, 4) and sub["fc2.weight"].shape == (4, 3) and sub["fc2.bias"].shape == (3,)
    task = Task(dataset="blobs", num_clients=9, num_features=12, model="mlp", hidden=16, local_steps=10, lr=0.05)
    widths = {0: 1.0, 1: 0.5, 2: 0.25}
    res = simulate(HeteroFL(width_of=lambda pid: widths[pid % 3], hidden=16, fraction_train=1.0,
                            fraction_evaluate=0.0), task, rounds=4)  # fmt: skip
    assert res.arrays["fc1.weight"].numpy().shape == (12, 16)
    assert _acc(res) > 0.5
    up = res.history.rounds[-1].bytes_up
    full = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=1).history.rounds[0].bytes_up
    assert up < full  # narrower clients send less


def test_feddf_distils_on_unlabeled_data_and_validates_input():
    task = Task(dataset="blobs", num_clients=8, num_features=12, model="mlp", hidden=16, local_steps=10, lr=0.05)
    unlabeled = np.concatenate([task.client_data(p)[0] for p in range(2)])
    s = FedDF(model=task.build_model(), unlabeled=unlabeled, steps=30, fraction_train=0.5, fraction_evaluate=0.0)
    assert _acc(simulate(s, task, rounds=3)) > 0.5
    with pytest.raises(ValueError, match="unlabeled"):
        FedDF(model=task.build_model(), unlabeled=np.zeros(5), fraction_train=0.5)


def test_ifca_recovers_two_planted_groups_where_fedavg_cannot_fit():
    task = Task(dataset="clustered", num_clients=20, groups=2, num_features=10, num_classes=4, local_steps=20, lr=0.1)
    s = IFCA(num_clusters=2, fraction_train=1.0, fraction_evaluate=0.0)
    res = simulate(s, task, rounds=8, initial=s.initial_arrays(task))
    assert s.agreement(task) == 1.0
    avg = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=8)
    assert _acc(res) > _acc(avg) + 0.2
    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 7, 7]) == 1.0
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) < 0.0 + 1e-9


def test_robust_aggregation_holds_where_fedavg_collapses_under_poisoning():
    task = Task(dataset="blobs", num_clients=20, num_features=20, malicious_fraction=0.2, local_steps=10, lr=0.05)
    kw = dict(fraction_train=1.0, fraction_evaluate=0.0)
    avg = simulate(FedAvg(**kw), task, rounds=5)
    med = simulate(FedMedian(**kw), task, rounds=5)
    assert _acc(med) > 0.8 > 0.3 > _acc(avg)


def test_dp_wrapper_reports_growing_epsilon_from_flowers_accountant():
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    task = Task(**SYN, local_steps=5)
    acc = RdpAccountant(PrivacyConfig(1e-3, 12, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION))
    s = make_strategy("dp-fedavg", clients_per_round=6, num_clients=12, noise_multiplier=1.0, clipping_norm=1.0,
                      accountant=acc)  # fmt: skip
    res = simulate(s, task, rounds=3, extra_metrics=lambda st, a, r: {"epsilon": st.privacy_spent().epsilon})
    eps = [r.extra["epsilon"] for r in res.history.rounds]
    assert 0 < eps[0] < eps[1] < eps[2] < float("inf")


def test_oort_prefers_fast_useful_clients_over_random():
    task = Task(**SYN, local_steps=10)
    system = SystemModel(12, speed_sigma=1.5, seed=4)
    steps = [task.steps_for(p) for p in range(12)]

    def run(selector):
        s = Selected(FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=4, min_available_nodes=4),
                     selector, per_round=4)  # fmt: skip
        return simulate(s, task, rounds=8, system=system)

    oort = run(OortSelector(system, full_steps=steps, seed=0))
    rand = run(RandomSelector(0))
    assert sum(r.sim_time for r in oort.history.rounds[3:]) < sum(r.sim_time for r in rand.history.rounds[3:])
    with pytest.raises(ValueError, match="fraction_train"):
        Selected(FedAvg(fraction_train=0.5), RandomSelector(), per_round=3)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "trimmedmean", "krum",
                                  "multikrum", "scaffold", "fednova", "fedbn"])  # fmt: skip
def test_every_named_strategy_runs_and_learns(name):
    fedbn = name == "fedbn"  # local batch norm (on a model that has it), judged by each client's own evaluation
    task = Task(**SYN, local_steps=10, **(dict(model="mlp", norm=True) if fedbn else {}))
    own = {k: v for k, v in dict(proximal_mu=0.1, server_lr=0.05).items() if name in STRATEGY_SETTINGS[k][1]}
    s = make_strategy(name, clients_per_round=6, num_clients=12, num_malicious=1, eval_fraction=1.0 if fedbn else 0.0,
                      **own)  # fmt: skip
    res = simulate(s, task, rounds=4)
    acc = res.history.rounds[-1].eval_metrics["eval-acc"] if fedbn else _acc(res)
    assert acc > 0.2  # ten classes: chance is about 0.1
    with pytest.raises(ValueError, match="clients_per_round=13"):
        make_strategy(name, clients_per_round=13, num_clients=12)


@pytest.mark.slow
def test_ifca_reseeds_an_empty_cluster_so_four_groups_split():
    task = Task(dataset="clustered", num_clients=40, groups=4, num_features=20, num_classes=5, local_steps=20, lr=0.1)
    found = {}
    for reseed in (0, 3):
        s = IFCA(num_clusters=4, reseed_after=reseed, fraction_train=0.5, fraction_evaluate=0.0)
        simulate(s, task, rounds=30, initial=s.initial_arrays(task))
        found[reseed] = s.agreement(task)
    assert found[3] == 1.0 and found[0] < 0.9  # without re-seeding two groups stay merged (seed 0)
