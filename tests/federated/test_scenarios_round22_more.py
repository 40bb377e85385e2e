"""Federated scenarios, round 22 (2 of 2): a strategy subclass of the user's own with a client lost after its local
training, SCAFFOLD with a server learning rate under a selector that samples two of three clients, FedAvgM's server
momentum across a round where one client raises inside its training, each written out by hand in float64, and
SecAgg+'s share and threshold settings at their edges; and wrappers stacked on server rules (Oort over int8 over
SCAFFOLD, top-k over FedYogi under the stale policy, random selection over Ditto) under dropouts and a deadline,
stopped after round 2 and resumed.

tilestack's ClientApp (wrapped by ``_fl_round19.failing_app`` where a client fails) over tilestack's in-process Flower
``Grid`` under ``ManagedGrid`` (``run_rounds``); Flower 1.41's FedAvg (subclassed here) and FedAvgM, tilestack's
Scaffold, Selected and RandomSelector. References, independent of the code under test: each client's local SGD
replayed on its seeded minibatches (``_fl_round7.client_model``, ``_fl_round10.scaffold_client``), the server rules
in float64.

What this round found, fixed:

- *SecAgg+ settings that are no finite number.* ``run_secure(num_shares=nan)`` (or a NaN threshold) passed Flower's
  range checks and failed in ``round()`` with "cannot convert float NaN to integer", naming neither; refused naming
  the setting (``secagg.py``).
- *NumPy numbers as SecAgg+ settings.* ``num_shares=np.int64(3)`` was refused as "must be of type int or float"
  (Flower's isinstance check) where every other tilestack setting takes NumPy numbers; taken as the plain number.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from _fl_round5 import np_
from _fl_round7 import client_model, weighted_mean
from _fl_round9 import keep, near
from _fl_round10 import scaffold_client
from _fl_round17 import fedavgm
from _fl_round18 import EVERYONE
from _fl_round19 import failing_app
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedYogi

from tilestack.federated import InProcessGrid, ManagedGrid, SystemModel, Task, initial_arrays, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.compression import Compressed
from tilestack.federated.secagg import run_plain, run_secure
from tilestack.federated.strategies import Ditto, OortSelector, RandomSelector, Scaffold, Selected

pytestmark = pytest.mark.timeout(120)

ANY = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)


def _task(**kw) -> Task:
    base = dict(dataset="blobs", num_samples=150, num_features=3, num_classes=3, num_clients=3, local_steps=3,
                batch_size=8, lr=0.1, partitioner="quantity", quantity_sigma=0.8, seed=4)  # fmt: skip
    return Task(**(base | kw))


# ---- a strategy subclass of the user's own --------------------------------------------------------------------------
class LargestMove(FedAvg):
    """Each element of the new model is the upload whose update (upload - model) is largest in magnitude there; the
    replies' weights ignored. Flower's FedAvg does the sampling and the messages."""

    def configure_train(self, server_round, arrays, config, grid):
        self.x = {k: v.numpy() for k, v in arrays.items()}
        self.seen: list[int] = []
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = [m for m in replies if not m.has_error()]
        self.seen = sorted(int(m.content["metrics"][tsclient.PARTITION_METRIC]) for m in replies)
        ups = [{k: v.numpy() for k, v in m.content["arrays"].items()} for m in replies]
        out = {}
        for k, x in self.x.items():
            d = np.stack([u[k].astype(np.float64) - x.astype(np.float64) for u in ups])  # (n, *shape)
            pick = np.abs(d).argmax(axis=0)
            out[k] = (x.astype(np.float64) + np.take_along_axis(d, pick[None], axis=0)[0]).astype(x.dtype)
        return ArrayRecord({k: _array(v) for k, v in out.items()}), MetricRecord({"picked": float(len(ups))})


def _array(v: np.ndarray):
    from flwr.app import Array

    return Array(v)


def _largest_move(x: dict[str, np.ndarray], ups: dict[int, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The rule by hand, element by element (float64): the update of largest |.|, first client on a tie."""
    out = {}
    for k, v in x.items():
        base = v.astype(np.float64)
        best = np.zeros_like(base)
        for p in sorted(ups):
            d = ups[p][k].astype(np.float64) - base
            best = np.where(np.abs(d) > np.abs(best), d, best)
        out[k] = base + best
    return out


def test_a_strategy_subclass_of_the_users_own_sees_the_kept_replies_and_its_rule_is_the_model_by_hand():
    """Three clients, two rounds; client 1 trains in round 1 and then loses its connection (an error reply). The
    subclass sees the replies of clients 0 and 2 in round 1 and all three in round 2, and each round's model is its
    rule over the replayed uploads, written out element by element; the plain mean would be another model."""
    task = _task()
    strategy = LargestMove(**EVERYONE)
    models: list = []
    res = run_rounds(strategy, ManagedGrid(InProcessGrid(failing_app({(1, 1)}), 3), task), initial_arrays(task),
                     num_rounds=2, extra_metrics=keep(models))  # fmt: skip
    r1, r2 = res.history.rounds
    assert list(r1.excluded) == ["1"] and "lost its connection after training in round 1" in r1.excluded["1"]
    assert r2.excluded == {} and (r1.num_aggregated, r2.num_aggregated) == (2, 3)
    assert strategy.seen == [0, 1, 2]
    x = np_(initial_arrays(task))
    for rnd, kept in ((1, [0, 2]), (2, [0, 1, 2])):
        ups = {p: client_model(task, p, rnd, x)[0] for p in kept}
        want = _largest_move(x, ups)
        for k in x:
            np.testing.assert_allclose(models[rnd - 1][k], want[k], rtol=1e-6, atol=1e-7, err_msg=(rnd, k))
        mean = weighted_mean(ups, {p: task.num_train(p) for p in kept})
        assert max(float(np.abs(mean[k] - want[k]).max()) for k in x) > 1e-3
        x = models[rnd - 1]


def test_a_strategy_subclass_whose_aggregation_returns_nothing_keeps_the_model_and_says_so():
    """A subclass returning (None, None) aggregated nothing: the model stays where it was and the round says so."""

    class Nothing(FedAvg):
        def aggregate_train(self, server_round, replies):
            list(replies)
            return None, None

    task = _task()
    models: list = []
    res = run_rounds(Nothing(**EVERYONE), ManagedGrid(InProcessGrid(tsclient.app, 3), task), initial_arrays(task),
                     num_rounds=2, extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    for m in models:
        for k in x:
            np.testing.assert_array_equal(m[k], x[k])
    assert all(r.skipped for r in res.history.rounds), [r.skipped for r in res.history.rounds]


# ---- SCAFFOLD with a server learning rate, two of three clients a round ------------------------------------------
def test_scaffold_with_global_lr_half_under_a_two_of_three_selector_is_its_rule_by_hand():
    """Selected(Scaffold(global_lr=0.5), RandomSelector(3), 2) over three clients, three rounds. Each round: the two
    clients the run reports, each from (x, c, its own c_i) (``scaffold_client``); x + 0.5 x (weighted mean - x); c +
    2/3 x the mean of their c_i changes (N counts every node, not the two the strategy was shown)."""
    task = _task()
    strategy = Scaffold(global_lr=0.5, **EVERYONE)
    models: list = []
    inner = InProcessGrid(tsclient.app, 3)
    res = run_rounds(Selected(strategy, RandomSelector(3), 2), ManagedGrid(inner, task), initial_arrays(task),
                     num_rounds=3, extra_metrics=keep(models))  # fmt: skip
    n = {p: task.num_train(p) for p in range(3)}
    x = np_(initial_arrays(task))
    zero = {k: np.zeros_like(v) for k, v in x.items()}
    c, ci = dict(zero), {p: dict(zero) for p in range(3)}
    chosen = []
    for rnd, r in enumerate(res.history.rounds, start=1):
        kept = sorted(int(p) for p in r.client_train)
        assert len(kept) == 2 and r.num_aggregated == 2, r
        chosen.append(tuple(kept))
        out = {p: scaffold_client(task, p, rnd, x, c, ci[p]) for p in kept}
        mean = weighted_mean({p: out[p][0] for p in kept}, n)
        want = {k: x[k].astype(np.float64) + 0.5 * (mean[k] - x[k].astype(np.float64)) for k in x}
        dc = {k: np.mean([out[p][1][k].astype(np.float64) - ci[p][k] for p in kept], axis=0) for k in x}
        c = {k: (c[k] + 2 / 3 * dc[k]).astype(np.float32) for k in x}
        for p in kept:
            ci[p] = out[p][1]
        near(models[rnd - 1], want, ulps=8)
        x = models[rnd - 1]
    assert len(set(chosen)) > 1, chosen  # the selector moved: the share and the c_i histories differ by client
    for k in x:
        np.testing.assert_allclose(strategy.c[k], c[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for nid, p in inner.partitions.items():
        held = np_(inner.contexts[nid].state[tsclient.SCAFFOLD_C]) if tsclient.SCAFFOLD_C in inner.contexts[nid].state \
            else zero  # fmt: skip
        for k in x:
            np.testing.assert_allclose(held[k], ci[p][k], rtol=1e-5, atol=1e-6, err_msg=(p, k))


# ---- FedAvgM across a round where one client raises inside its training --------------------------------------------
def _raising_app(fail_at: set[tuple[int, int]]) -> ClientApp:
    """tilestack's ClientApp, except that client ``pid`` raises before any training in round ``rnd``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        key = (int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"]))
        if key in fail_at:
            raise RuntimeError(f"client {key[0]} ran out of memory in round {key[1]}")
        return tsclient.app(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        return tsclient.app(msg, context)

    @app.query()
    def query(msg: Message, context) -> Message:
        return tsclient.app(msg, context)

    return app


def test_fedavgm_momentum_across_a_round_where_one_client_raises_is_its_rule_by_hand():
    """FedAvgM(server_learning_rate=0.7, server_momentum=0.5), three rounds; client 2 raises in round 2 before it
    trains. Round by round by hand: m = 0.5 m + (x - mean of the kept clients' models by num_train), x - 0.7 m; the
    momentum carries through the round with two replies."""
    task = _task()
    strategy = FedAvgM(**EVERYONE, server_learning_rate=0.7, server_momentum=0.5)
    models: list = []
    res = run_rounds(strategy, ManagedGrid(InProcessGrid(_raising_app({(2, 2)}), 3), task), initial_arrays(task),
                     num_rounds=3, extra_metrics=keep(models))  # fmt: skip
    assert [list(r.excluded) for r in res.history.rounds] == [[], ["2"], []]
    assert "ran out of memory in round 2" in res.history.rounds[1].excluded["2"]
    n = {p: task.num_train(p) for p in range(3)}
    x = np_(initial_arrays(task))
    momentum = None
    for rnd, kept in ((1, [0, 1, 2]), (2, [0, 1]), (3, [0, 1, 2])):
        ups = {p: client_model(task, p, rnd, x)[0] for p in kept}
        want, momentum = fedavgm(x, ups, n, momentum, lr=0.7, beta=0.5)
        near(models[rnd - 1], want, ulps=16)
        x = models[rnd - 1]


# ---- secure aggregation settings at their edges ----------------------------------------------------------------------
@pytest.mark.parametrize("kw, name", [
    (dict(num_shares=float("nan")), "num_shares=nan"),
    (dict(num_shares=float("inf")), "num_shares=inf"),
    (dict(reconstruction_threshold=float("nan")), "reconstruction_threshold=nan"),
    (dict(reconstruction_threshold=np.float32("inf")), "reconstruction_threshold=np.float32(inf)"),
])  # fmt: skip
def test_a_secure_share_or_threshold_that_is_no_finite_number_is_refused_naming_it(kw, name):
    """NaN passed Flower's own range checks (every comparison False) and failed in round() as "cannot convert float NaN
    to integer", naming neither setting; inf as an OverflowError."""
    task = Task(dataset="blobs", num_samples=60, num_features=3, num_classes=2, num_clients=3, local_steps=1)
    with pytest.raises(ValueError, match=rf"run_secure: {re.escape(name)}; expected a finite number"):
        run_secure(task, rounds=1, per_round=3, **kw)


def test_numpy_numbers_as_secure_shares_and_threshold_are_the_plain_ones():
    """np.int64(3) shares and an np.int64(2) threshold (or np.float64 shares of the clients) were refused as "must be
    of type int or float" (Flower's isinstance check); they run the same rounds as 3 and 2, and the secure model is
    the plain FedAvg model to SecAgg+'s quantisation step."""
    task = Task(dataset="blobs", num_samples=60, num_features=3, num_classes=2, num_clients=3, local_steps=2, lr=0.1)
    ref = run_secure(task, rounds=1, per_round=3, num_shares=3, reconstruction_threshold=2)
    got = run_secure(task, rounds=1, per_round=3, num_shares=np.int64(3), reconstruction_threshold=np.int64(2))
    share = run_secure(task, rounds=1, per_round=3, num_shares=np.float64(1.0), reconstruction_threshold=np.float32(1))
    plain = run_plain(task, rounds=1, per_round=3)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
        np.testing.assert_allclose(share[k], plain[k], atol=1e-4, err_msg=k)
        np.testing.assert_allclose(ref[k], plain[k], atol=1e-4, err_msg=k)


# ---- stacked wrappers stopped after round 2 and resumed ------------------------------------------------------------
def _system() -> SystemModel:
    return SystemModel(4, speed_sigma=1.0, dropout=0.25, straggler_fraction=0.5, deadline=0.08, seed=5)


STACKS = {
    "oort(int8(scaffold))": (lambda: Selected(Compressed(Scaffold(**ANY), "int8"), OortSelector(_system(), seed=2), 3),
                             "partial"),
    "topk(fedyogi), stale": (lambda: Compressed(FedYogi(**ANY), "topk", 0.4), "stale"),
    "random(ditto)": (lambda: Selected(Ditto(lam=0.2, **ANY), RandomSelector(2), 2), "drop"),
}


@pytest.mark.parametrize("name", list(STACKS))
def test_stacked_wrappers_under_dropouts_and_a_deadline_resumed_after_round_two_equal_the_run_never_stopped(
    name, tmp_path
):
    """Four clients of unequal sizes, a quarter dropping out, half straggling, a round deadline that cuts some and
    times others out: the run stopped after round 2 and resumed from its checkpoint ends at the uninterrupted run's
    model bit for bit, with the same clients left out each round and for the same reasons."""
    make, policy = STACKS[name]
    task = _task(num_clients=4)
    kw = dict(rounds=4, evaluate=False, stragglers=policy)
    full = simulate(make(), task, system=_system(), **kw)
    ckpt = tmp_path / "run.ckpt"
    simulate(make(), task, system=_system(), checkpoint=ckpt, stop_after=2, **kw)
    resumed = simulate(make(), task, system=_system(), checkpoint=ckpt, **kw)
    assert [r.excluded for r in resumed.history.rounds] == [r.excluded for r in full.history.rounds]
    assert any(r.excluded for r in full.history.rounds)  # the system model did leave clients out
    a, b = np_(full.arrays), np_(resumed.arrays)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
