"""Federated scenarios, round 19 (1 of 2): a strategy's own setting given to another strategy, eight of Flower's server
rules side by side over five clients whose updates and weights are fixed, a SCAFFOLD client lost mid-round after its
local training and rejoining a round later, and a class held by one client only while that client goes offline and
comes back, a proximal pull that one client's own learning rate makes diverge, and evaluation-only rounds.

tilestack's ClientApp (and scripted Flower ClientApps, ``_fl_round5.scripted``) over tilestack's in-process Flower
``Grid`` under ``ManagedGrid`` (``run_rounds``, ``simulate``); Flower 1.41's FedAvg, FedProx, FedAvgM, FedAdagrad,
FedAdam, FedYogi, FedMedian and FedTrimmedAvg unchanged, tilestack's Scaffold and ``make_strategy``. References, all
independent of the code under test: each rule written out in float64 over the replies the scripts fix
(``_fl_round19.Rule``), SCAFFOLD's client replayed (``_fl_round10.scaffold_client``) with the server's rule written
out, tilestack's client SGD replayed on its seeded minibatches (``_fl_round7.client_model``).

What this round found, fixed:

- *A strategy's own setting given to another.* ``make_strategy("fedavg", proximal_mu=1.0)`` built plain FedAvg and
  the run trained without a proximal term, without a word (as did ``server_lr`` for FedProx, ``q`` for FedAvg,
  ``noise_multiplier`` / ``clipping_norm`` / ``accountant`` for anything but dp-fedavg), where ``tilestack fl run
  --mu 1`` refused the same. One table (``strategies.STRATEGY_SETTINGS``) and one check (``misplaced_setting``) now
  serve both: a ValueError names the argument, its value, the strategies that read it and the one given. (The bench
  passed every method proximal_mu, server_lr and q; it now passes each only what it reads: the same runs.)

- *A proximal pull one client's own lr makes diverge.* The run checks FedProx's mu and Ditto's lambda against the
  task's lr before any work, but a strategy may give one client its own ``lr`` in configure_train: lr 0.6 with mu 4
  (lr x mu = 2.4) made that client's proximal steps grow w - w_t by 1.4x each and its model was averaged in without a
  word (the global weights reached 254). The client now refuses (``client.check_pull``), naming the key, its lr and
  the bound; it is left out of the round saying so and the others aggregate.

Checked and found right: a client that raises after training leaves its node's state (SCAFFOLD's c_i) as it was, as
Flower does, and rejoins with it; the server's c moves by |S| / N of the kept clients' changes only.
"""

from __future__ import annotations

import numpy as np
import pytest
from _fl_round5 import blobs, make_grid, np_, scripted, update
from _fl_round7 import client_model, weighted_mean
from _fl_round9 import keep, near
from _fl_round10 import scaffold_client, with_config
from _fl_round18 import EVERYONE, fedavg, npy_bytes
from _fl_round19 import WEIGHTS, Rule, failing_app
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
)
from typer.testing import CliRunner

import tilestack.cli.fl  # noqa: F401  (registers `tilestack fl`)
from tilestack.cli import app as cli_app
from tilestack.federated import (
    InProcessGrid,
    ManagedGrid,
    SystemModel,
    Task,
    codec,
    initial_arrays,
    run_rounds,
    simulate,
)
from tilestack.federated import client as tsclient
from tilestack.federated.client import TASK_KEY
from tilestack.federated.strategies import (
    NAMES,
    STRATEGY_SETTINGS,
    Ditto,
    Scaffold,
    make_strategy,
    misplaced_setting,
)

# ---- a strategy's own setting given to another -----------------------------------------------------------------------
SETTINGS = [("proximal_mu", 1.0, "fedprox"), ("server_lr", 0.5, "fedadam or fedyogi"), ("q", 2.0, "qfedavg"),
            ("noise_multiplier", 0.5, "dp-fedavg"), ("clipping_norm", 2.0, "dp-fedavg")]  # fmt: skip


@pytest.mark.parametrize("arg, value, users", SETTINGS)
def test_make_strategy_refuses_a_setting_the_named_strategy_does_not_read(arg, value, users):
    """Given to every strategy that does not read it, the setting is refused naming the argument, its value, who reads
    it and the strategy named; the strategies that read it take it, and every strategy takes the default."""
    readers = STRATEGY_SETTINGS[arg][1]
    assert " or ".join(readers) == users
    for name in NAMES:
        kw = dict(clients_per_round=4, num_clients=8, **({"num_clusters": 2} if name == "ifca" else {}))
        if name in readers:
            make_strategy(name, **kw, **{arg: value})
            continue
        msg = f"make_strategy: {arg}={value!r} is a setting of {users}; got name={name!r}, which does not use it"
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            make_strategy(name, **kw, **{arg: value})
        make_strategy(name, **kw, **{arg: STRATEGY_SETTINGS[arg][0]})  # the default is no setting at all


def test_a_misplaced_setting_is_refused_before_its_value_is_judged_only_when_the_value_is_good():
    """A bad value is named for what it is (not for the strategy that ignores it); NumPy numbers equal to the default
    are the default; an accountant is dp-fedavg's; the run made with proximal_mu for FedProx sends it to its clients."""
    with pytest.raises(ValueError, match=r"proximal_mu=-1.0; expected a number >= 0"):
        make_strategy("fedavg", clients_per_round=2, num_clients=4, proximal_mu=-1.0)
    with pytest.raises(ValueError, match=r"server_lr=nan; expected a number > 0"):
        make_strategy("fedprox", clients_per_round=2, num_clients=4, server_lr=float("nan"))
    assert misplaced_setting("fedavg", {"proximal_mu": np.float32(0.0), "q": np.float64(1.0)}) is None
    assert misplaced_setting("krum", {"accountant": object()})[0] == "accountant"
    with pytest.raises(ValueError, match=r"accountant=.* is a setting of dp-fedavg; got name='fedprox'"):
        make_strategy("fedprox", clients_per_round=2, num_clients=4, accountant=object())
    s = make_strategy("fedprox", clients_per_round=2, num_clients=4, proximal_mu=0.25)
    assert isinstance(s, FedProx) and s.proximal_mu == 0.25


@pytest.mark.parametrize("extra, needle", [
    (["--strategy", "fedprox", "--clip", "2"], "--clip 2 is a setting of --strategy dp-fedavg; got --strategy fedprox"),
    (["--strategy", "fedyogi", "--q", "0"], "--q 0 is a setting of --strategy qfedavg; got --strategy fedyogi"),
])  # fmt: skip
def test_fl_run_refuses_the_same_settings_through_the_same_check(extra, needle):
    args = ["fl", "run", "--clients", "4", "--per-round", "2", "--rounds", "1", "--local-steps", "1", *extra]
    res = CliRunner().invoke(cli_app, args, env={"COLUMNS": "400"})
    assert res.exit_code == 2 and needle in res.output and "test accuracy" not in res.output, res.output


# ---- eight server rules over five clients of fixed updates -----------------------------------------------------------
RULES = {
    "fedavg": lambda: FedAvg(**EVERYONE),
    "fedprox": lambda: FedProx(**EVERYONE, proximal_mu=0.3),
    "fedavgm": lambda: FedAvgM(**EVERYONE, server_learning_rate=0.7, server_momentum=0.5),
    "fedadagrad": lambda: FedAdagrad(**EVERYONE, eta=0.1, tau=1e-3),
    "fedadam": lambda: FedAdam(**EVERYONE, eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3),
    "fedyogi": lambda: FedYogi(**EVERYONE, eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3),
    "fedmedian": lambda: FedMedian(**EVERYONE),
    "fedtrimmedavg": lambda: FedTrimmedAvg(**EVERYONE, beta=0.2),
}


@pytest.mark.parametrize("name", list(RULES))
def test_each_server_rule_over_five_clients_of_fixed_updates_and_weights_is_its_formula_by_hand(name):
    """Five clients send x + a fixed update (both signs, low bits float32 cannot hold) with num-examples 1, 3, 6, 2, 8;
    three rounds. Each round's global model is the rule written out in float64 from the float32 model the clients were
    sent (the server optimisers' moments chained over the rounds), rounded once to float32; FedProx sends
    proximal-mu = 0.3 in every client's config and aggregates as FedAvg."""
    task = blobs(5, features=3, classes=3)
    configs: list = []

    def script(pid, rnd, got, context, config):
        configs.append(dict(config))
        x = got["arrays"]
        model = {k: (x[k] + update(pid, rnd, x[k].shape, np.float32)).astype(np.float32) for k in x}
        return model, {"num-examples": WEIGHTS[pid]}

    models: list = []
    x0 = np_(initial_arrays(task))
    run_rounds(RULES[name](), make_grid(scripted(script), task), initial_arrays(task), num_rounds=3,
               extra_metrics=keep(models))  # fmt: skip
    rule, x = Rule(name), x0
    for rnd, got in enumerate(models, start=1):
        sent = {p: {k: (x[k] + update(p, rnd, x[k].shape, np.float32)).astype(np.float32) for k in x}
                for p in range(5)}  # fmt: skip
        want = rule.step(x, sent, rnd)
        near(got, want, ulps=4)
        x = got
    assert not np.allclose(models[-1]["fc.weight"], x0["fc.weight"])  # the rounds moved the model
    assert len(configs) == 15
    mus = {c.get("proximal-mu") for c in configs}
    assert mus == ({0.3} if name == "fedprox" else {None})


def test_the_rules_differ_where_their_formulas_do():
    """The same replies give FedAvg's weighted mean, the median and the trimmed mean apart: the references are not one
    formula under eight names (client 4's weight 8 pulls the mean toward it; the median ignores weights)."""
    x = {"w": np.zeros(4, np.float32)}
    models = {p: {"w": np.full(4, float(p), np.float32)} for p in range(5)}
    got = {n: Rule(n).step(x, models, 1)["w"][0] for n in ("fedavg", "fedmedian", "fedtrimmedavg")}
    assert got == {"fedavg": (3 * 1 + 6 * 2 + 2 * 3 + 8 * 4) / 20, "fedmedian": 2.0, "fedtrimmedavg": 2.0}
    models[4] = {"w": np.full(4, 40.0, np.float32)}
    assert Rule("fedtrimmedavg").step(x, models, 1)["w"][0] == 2.0 and Rule("fedmedian").step(x, models, 1)["w"][0] == 2


# ---- a SCAFFOLD client lost mid-round, back a round later ------------------------------------------------------------
def test_a_scaffold_client_lost_after_its_local_training_rejoins_with_the_control_variate_it_had():
    """Client 1 trains in round 2 (its ClientApp changed c_1 in its Context.state) and then loses its connection: an
    error reply. It is left out of round 2 by name, its node keeps the c_1 of round 1 (as Flower keeps a failed
    client's context), and in round 3 it trains from that c_1. x and c each round by hand: x the num_train-weighted
    mean of the kept clients' models, c + |S| / N x the mean of their c_i changes (N = 3)."""
    task = Task(dataset="blobs", num_samples=180, num_features=3, num_classes=3, num_clients=3, local_steps=4,
                batch_size=8, lr=0.1, partitioner="quantity", quantity_sigma=0.7, seed=5)  # fmt: skip
    inner = InProcessGrid(failing_app({(1, 2)}), 3)
    strategy = Scaffold(**EVERYONE)
    models: list = []
    res = run_rounds(strategy, ManagedGrid(inner, task), initial_arrays(task), num_rounds=3,
                     extra_metrics=keep(models))  # fmt: skip
    r1, r2, r3 = res.history.rounds
    assert r1.excluded == {} and r3.excluded == {}
    assert list(r2.excluded) == ["1"] and r2.excluded["1"].startswith("error: ")
    assert "lost its connection after training in round 2" in r2.excluded["1"]
    assert (r1.num_aggregated, r2.num_aggregated, r3.num_aggregated) == (3, 2, 3)

    n = {p: task.num_train(p) for p in range(3)}
    x = np_(initial_arrays(task))
    zero = {k: np.zeros_like(v) for k, v in x.items()}
    c, ci = dict(zero), {p: dict(zero) for p in range(3)}
    for rnd, kept in ((1, [0, 1, 2]), (2, [0, 2]), (3, [0, 1, 2])):
        out = {p: scaffold_client(task, p, rnd, x, c, ci[p]) for p in kept}
        mean = weighted_mean({p: out[p][0] for p in kept}, n)
        dc = {k: np.mean([out[p][1][k].astype(np.float64) - ci[p][k] for p in kept], axis=0) for k in x}
        c = {k: (c[k] + len(kept) / 3 * dc[k]).astype(np.float32) for k in x}
        for p in kept:
            ci[p] = out[p][1]
        near(models[rnd - 1], mean, ulps=8)
        x = models[rnd - 1]
    for k in x:
        np.testing.assert_allclose(strategy.c[k], c[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for nid, p in inner.partitions.items():
        held = np_(inner.contexts[nid].state[tsclient.SCAFFOLD_C])
        for k in x:
            np.testing.assert_allclose(held[k], ci[p][k], rtol=1e-5, atol=1e-6, err_msg=(p, k))


def test_without_the_failure_client_1s_control_variate_would_differ():
    """The reference can tell: had client 1's round-2 state been kept, its c_1 after round 3 would be another one."""
    task = Task(dataset="blobs", num_samples=180, num_features=3, num_classes=3, num_clients=3, local_steps=4,
                batch_size=8, lr=0.1, partitioner="quantity", quantity_sigma=0.7, seed=5)  # fmt: skip
    x = np_(initial_arrays(task))
    zero = {k: np.zeros_like(v) for k, v in x.items()}
    _, ci_1, _ = scaffold_client(task, 1, 1, x, zero, zero)
    _, ci_2, _ = scaffold_client(task, 1, 2, x, zero, ci_1)
    assert max(float(np.abs(ci_1[k] - ci_2[k]).max()) for k in x) > 1e-3


# ---- a class held by one client only, that client away and back ------------------------------------------------------
def test_a_class_only_one_client_holds_is_lost_while_it_is_away_and_the_rounds_are_its_replayed_sgd():
    """Shards of one class per client (cut across class boundaries: a client holds one or two classes); one class is
    on one client alone (checked on the data). That client is offline in round 2 (availability 0) and back in round 3.
    Each round's model is the num_train-weighted mean of the online clients' replayed SGD, round 2 the two others
    alone; the global model's accuracy on that class's test examples drops while its only holder is away (nobody
    trains on it) and recovers when it is back."""
    task = Task(dataset="blobs", num_samples=300, num_features=4, num_classes=3, num_clients=3, partitioner="shards",
                classes_per_client=1, local_steps=6, batch_size=10, lr=0.2, seed=3)  # fmt: skip
    held = {p: set(np.unique(task.client_data(p)[1]).tolist()) for p in range(3)}
    only = [(c, [p for p in range(3) if c in held[p]]) for c in range(3)]
    only = [(c, ps[0]) for c, ps in only if len(ps) == 1]
    assert only, held  # the scenario: a class that one client alone holds (the shards cut across class boundaries)
    lone, owner = only[0]
    pattern = np.ones((3, 3))
    pattern[1, owner] = 0.0
    models: list = []
    res = simulate(fedavg(), task, rounds=3, system=SystemModel(3, availability=pattern), evaluate=False,
                   extra_metrics=keep(models))  # fmt: skip
    assert [r.num_online for r in res.history.rounds] == [3, 2, 3]
    assert [r.num_aggregated for r in res.history.rounds] == [3, 2, 3]
    assert set(res.history.rounds[1].client_train) == {str(p) for p in range(3) if p != owner}
    n = {p: task.num_train(p) for p in range(3)}
    x = np_(initial_arrays(task))
    for rnd, got in enumerate(models, start=1):
        online = [p for p in range(3) if rnd != 2 or p != owner]
        near(got, weighted_mean({p: client_model(task, p, rnd, x)[0] for p in online}, n), ulps=4)
        x = got
    xs, ys = task.client_data(owner)[2:]
    xs = xs[ys == lone]
    assert len(xs) > 0

    def lone_class_acc(m):
        logits = xs.astype(np.float64) @ m["fc.weight"].astype(np.float64) + m["fc.bias"].astype(np.float64)
        return float((logits.argmax(axis=1) == lone).mean())

    acc = [lone_class_acc(m) for m in models]
    assert acc[1] < 0.5 < min(acc[0], acc[2]), acc  # (1.0, 0.15, 0.75)


# ---- a proximal pull that one client's own lr makes diverge ----------------------------------------------------------
class OwnLr(FedProx):
    """FedProx (mu 4) giving client 0 lr 0.6 in its own message (lr x mu = 2.4) and the others the task's 0.05."""

    def configure_train(self, server_round, arrays, config, grid):
        return [with_config(m, lr=0.6 if grid.partition_of[m.metadata.dst_node_id] == 0 else 0.05)
                for m in super().configure_train(server_round, arrays, config, grid)]  # fmt: skip


def test_a_proximal_pull_one_clients_own_lr_makes_diverge_leaves_that_client_out_naming_both():
    """The run's check (lr x mu < 2 at the task's lr 0.05) passes, but client 0's message carries lr 0.6: its proximal
    steps multiply w - w_t by 1 - 2.4 = -1.4 each (20 steps: about 800x), and its model was averaged in without a word
    (the global model's weights grew to 254). The client now refuses, naming proximal-mu, its lr and the bound; the
    round is the other two clients' replayed proximal SGD (mu 4, lr 0.05), weighted by examples."""
    task = Task(dataset="blobs", num_samples=240, num_features=3, num_classes=3, num_clients=3, local_steps=20, lr=0.05,
                seed=2)  # fmt: skip
    models: list = []
    res = run_rounds(OwnLr(**EVERYONE, proximal_mu=4.0), ManagedGrid(InProcessGrid(tsclient.app, 3), task),
                     initial_arrays(task), num_rounds=2, train_config={TASK_KEY: task.to_json()},
                     extra_metrics=keep(models))  # fmt: skip
    want = ("error: ValueError: config proximal-mu=4.0 with lr=0.6; expected a number >= 0 and < 2 / lr = 3.33333 "
            "(lr * mu >= 2 makes every local step overshoot the model it pulls towards)")  # fmt: skip
    x = np_(initial_arrays(task))
    for rnd, (r, got) in enumerate(zip(res.history.rounds, models, strict=True), start=1):
        assert r.excluded == {"0": want} and r.num_aggregated == 2
        kept = {p: client_model(task, p, rnd, x, mu=4.0)[0] for p in (1, 2)}
        near(got, weighted_mean(kept, {p: task.num_train(p) for p in kept}), ulps=4)
        x = got
    assert max(float(np.abs(v).max()) for v in x.values()) < 5.0


def test_dittos_pull_one_clients_own_lr_makes_diverge_is_refused_by_that_client_alike():
    """Ditto (lambda 4) passes its check at the task's lr 0.05; the client whose message carries lr 0.6 would pull its
    personal model past the global one each step: it refuses, naming Ditto's key, and keeps no personal model."""
    task = Task(dataset="blobs", num_samples=240, num_features=3, num_classes=3, num_clients=3, local_steps=5, lr=0.05,
                seed=2)  # fmt: skip

    class DittoOwnLr(Ditto):
        def configure_train(self, server_round, arrays, config, grid):
            return [with_config(m, lr=0.6 if grid.partition_of[m.metadata.dst_node_id] == 0 else 0.05)
                    for m in super().configure_train(server_round, arrays, config, grid)]  # fmt: skip

    inner = InProcessGrid(tsclient.app, 3)
    res = run_rounds(DittoOwnLr(lam=4.0, **EVERYONE), ManagedGrid(inner, task), initial_arrays(task), num_rounds=1,
                     train_config={TASK_KEY: task.to_json()})  # fmt: skip
    r = res.history.rounds[0]
    assert list(r.excluded) == ["0"] and "config tilestack.ditto-lambda=4.0 with lr=0.6; expected" in r.excluded["0"]
    assert r.num_aggregated == 2
    held = {p: tsclient.DITTO_STATE in inner.contexts[nid].state for nid, p in inner.partitions.items()}
    assert held == {0: False, 1: True, 2: True}


# ---- evaluation-only rounds ------------------------------------------------------------------------------------------
def test_evaluation_only_rounds_score_the_unchanged_model_on_every_client_by_hand_each_round():
    """FedAvg with fraction_train 0 and fraction_evaluate 1 over four clients of unequal sizes (quantity skew), from a
    random model: each round trains nobody (skipped, saying so; no steps, nothing uploaded), sends the model to the four
    clients for evaluation (4 x its .npy bytes), keeps it, and each client scores it on its own test split: loss and
    accuracy by hand in float64, the round's aggregate their mean weighted by test examples, which is also the
    server's score of the pooled test data; the same every round. (Small weights: the clients' cross-entropy is
    -log(p + 1e-12), which for such a model is -log p to float64.)"""
    task = Task(dataset="blobs", num_samples=400, num_features=4, num_classes=3, num_clients=4, local_steps=3, lr=0.1,
                partitioner="quantity", quantity_sigma=1.0, seed=7)  # fmt: skip
    rng = np.random.default_rng(3)
    x0 = {"fc.weight": rng.normal(0, 0.1, (4, 3)).astype(np.float32), "fc.bias": rng.normal(0, 1, 3).astype(np.float32)}
    strategy = FedAvg(fraction_train=0.0, fraction_evaluate=1.0, min_available_nodes=1, min_train_nodes=0,
                      min_evaluate_nodes=1)  # fmt: skip
    res = simulate(strategy, task, rounds=2, initial=codec.to_record(x0))
    assert all(np.array_equal(v.numpy(), x0[k]) for k, v in res.arrays.items())

    def scores(m, x, y):
        logits = x.astype(np.float64) @ m["fc.weight"].astype(np.float64) + m["fc.bias"].astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(y)), y].mean()), float((logits.argmax(axis=1) == y).mean()), len(y)

    own = {p: scores(x0, *task.client_data(p)[2:]) for p in range(4)}
    n = sum(s[2] for s in own.values())
    assert len({s[2] for s in own.values()}) > 1 and len({s[1] for s in own.values()}) > 1  # the weights matter
    loss, acc = sum(s[0] * s[2] for s in own.values()) / n, sum(s[1] * s[2] for s in own.values()) / n
    for r in res.history.rounds:
        assert r.skipped == "no clients were sampled for training" and r.num_selected == 0 and r.steps_done == 0
        assert (r.bytes_down, r.bytes_up) == (4 * npy_bytes(x0), 0)
        assert set(r.client_eval) == {"0", "1", "2", "3"}
        for p, (p_loss, p_acc, count) in own.items():
            got = r.client_eval[str(p)]
            assert got["num-examples"] == count and got["eval-acc"] == pytest.approx(p_acc, abs=1e-12)
            np.testing.assert_allclose(got["eval-loss"], p_loss, rtol=1e-5)
        np.testing.assert_allclose([r.eval_metrics["eval-loss"], r.test_loss], loss, rtol=1e-5)
        np.testing.assert_allclose([r.eval_metrics["eval-acc"], r.test_acc], acc, rtol=1e-12)
    assert res.history.rounds[0].eval_metrics == res.history.rounds[1].eval_metrics
