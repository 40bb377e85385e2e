"""Federated scenarios, round 27: each client its own learning-rate schedule (and one client given a rate that cannot
be, in one round), each client its own proximal pull, FedAvg weighted by the local steps each client really ran under
stragglers (on time, and late under the stale policy), a round whose training can sample nobody while a late update
lands (under run_rounds and under Flower's own loop), clients joining mid-training (under FedAdagrad, and under
Flower's own loop), a local body per client sharing only the head (with a client joining late), label skew at
Dirichlet alpha 0.01 under FedMedian, and a compressed FedAdagrad run with per-client schedules crashing mid-round and
resumed from its checkpoint.

tilestack's ClientApp over tilestack's in-process Flower ``Grid`` under ``ManagedGrid`` (``run_rounds``), with
Flower 1.41's FedAvg, FedProx, FedAdagrad and FedMedian subclassed where a strategy gives each client its own settings
(``configure_train``, as a Flower user writes it). References independent of the code under test: each client's local
SGD replayed on its seeded minibatches (``_fl_round7.client_model``) at the settings its message carried, the system
model's straggler draws written out, and the server rules in float64 (FedAdagrad's m = delta, v += delta^2,
x + eta m / (sqrt(v) + tau); the element-wise median; the step-weighted mean).

What this round found, fixed:

- *A round that could sample nobody aggregated a late update alone, without a word.* Under ``stragglers='stale'`` a
  strategy asking for every client (``min_available_nodes`` = ``min_train_nodes`` = the clients) can sample nobody in
  a round where a straggler is busy with its late work; the round aggregated that late update alone (the model moved
  by one client's work of the round before) and nothing said no client had been asked to train (the same shortness in
  evaluation was logged). A warning now names the round, the minimum that could not be met and the late updates
  aggregated instead (``driver._rounds``).
- *Flower's own loop sampled each round from the round before's clients.* Under ``FedAvg.start`` over a ManagedGrid
  with an availability pattern, the grid learned the round only from the messages, after the strategy had sampled:
  a pattern of {0, 1}, {2, 3}, all trained 0 and 1, then nobody, then 2 and 3 alone (run_rounds, which tells the grid
  the round first, was right). The grid now reads the round from the strategy's configure_train / configure_evaluate
  call that samples (``grid._sampling_round``); Flower's loop trains each round's online clients and gives
  run_rounds' model bit for bit.

Checked and sound: per-client settings a Task refuses (a negative ``lr``, a ``proximal-mu`` whose step with that
client's ``lr`` overshoots) leave that client's reply out of that round alone, naming the key, the value and the range,
and the client is back the next round; the other scenarios match their hand computation.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
from _fl_round7 import client_model, weighted_mean
from _fl_round9 import keep, near
from _fl_round10 import with_config
from _fl_round18 import EVERYONE
from flwr.app import Message
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdagrad, FedAvg, FedMedian, FedProx

from tilestack.errors import FederatedError
from tilestack.federated import InProcessGrid, ManagedGrid, SystemModel, Task, codec, initial_arrays, run_rounds
from tilestack.federated import client as tsclient
from tilestack.federated.compression import Compressed
from tilestack.federated.strategies import FedBN

pytestmark = pytest.mark.timeout(120)

BASE_LR = {0: 0.05, 1: 0.1, 2: 0.2, 3: 0.4}  # each client's own starting learning rate
DECAY = 0.5  # every client's rate halves each round


def _task(**kw) -> Task:
    base = dict(dataset="blobs", num_samples=240, num_features=3, num_classes=3, num_clients=4, local_steps=2,
                batch_size=8, lr=0.1, partitioner="quantity", seed=7)  # fmt: skip
    return Task(**(base | kw))


def _grid(task: Task, system: SystemModel | None = None, **kw) -> ManagedGrid:
    return ManagedGrid(InProcessGrid(tsclient.app, task.num_clients), task, system=system, **kw)


def _rate(pid: int, rnd: int) -> float:
    return BASE_LR[pid] * DECAY ** (rnd - 1)


def _start(task: Task) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in initial_arrays(task).items()}


def _per_client(base: type, settings):
    """A subclass of the Flower strategy ``base`` whose configure_train adds ``settings(pid, round)`` to each client's
    own round config (a new config per message: Flower's FedAvg shares one RecordDict among its messages)."""

    class PerClient(base):
        def configure_train(self, server_round, arrays, config, grid):
            return [with_config(m, **settings(grid.partition_of[m.metadata.dst_node_id], server_round))
                    for m in super().configure_train(server_round, arrays, config, grid)]  # fmt: skip

    return PerClient


CRASH_IN: set[int] = set()  # rounds whose aggregation raises once (a server crash after the clients ran)


class ScheduledAdagrad(FedAdagrad):
    """FedAdagrad whose clients each train at their own rate ``_rate(pid, round)``; module level, so that a checkpoint
    pickles it. Its aggregation of a round in ``CRASH_IN`` raises, once."""

    def configure_train(self, server_round, arrays, config, grid):
        return [with_config(m, lr=_rate(grid.partition_of[m.metadata.dst_node_id], server_round))
                for m in super().configure_train(server_round, arrays, config, grid)]  # fmt: skip

    def aggregate_train(self, server_round, replies):
        if server_round in CRASH_IN:
            CRASH_IN.discard(server_round)
            raise RuntimeError(f"server crashed while aggregating round {server_round}")
        return super().aggregate_train(server_round, replies)


def _adagrad(x: dict[str, np.ndarray], mean: dict[str, np.ndarray], v: dict, *, eta: float, tau: float) -> dict:
    """One FedAdagrad step (Flower 1.41, beta_1 = 0), float64: delta = mean - x, v += delta^2,
    x + eta delta / (sqrt(v) + tau); ``v`` is updated in place."""
    out = {}
    for k in x:
        d = mean[k] - x[k].astype(np.float64)
        v[k] = v.get(k, 0.0) + d**2
        out[k] = x[k].astype(np.float64) + eta * d / (np.sqrt(v[k]) + tau)
    return out


# ---- each client its own learning-rate schedule ---------------------------------------------------------------------
def test_each_client_training_at_its_own_decaying_learning_rate_is_replayed_by_hand():
    """Client p trains round r at BASE_LR[p] x 0.5^(r - 1) (0.05 to 0.4 in round 1), set per message by the strategy.
    Each round's model is the example-weighted mean of the four clients' SGD at their own rate, replayed by hand; the
    run at the task's single rate differs (the per-client rates were used, not one of them for all)."""
    task = _task()
    models: list[dict] = []
    strategy = _per_client(FedAvg, lambda p, r: {"lr": _rate(p, r)})(**EVERYONE)
    run_rounds(strategy, _grid(task), initial_arrays(task), num_rounds=3, extra_metrics=keep(models))
    x = _start(task)
    for rnd in range(1, 4):
        sent = {p: client_model(dataclasses.replace(task, lr=_rate(p, rnd)), p, rnd, x)[0] for p in range(4)}
        near(models[rnd - 1], weighted_mean(sent, {p: task.num_train(p) for p in range(4)}))
        x = models[rnd - 1]
    plain = run_rounds(FedAvg(**EVERYONE), _grid(task), initial_arrays(task), num_rounds=3)
    assert not np.allclose(plain.arrays["fc.weight"].numpy(), models[-1]["fc.weight"])


def test_a_client_given_a_rate_that_cannot_be_in_one_round_is_left_out_of_that_round_alone():
    """Client 1's message of round 2 carries lr = -0.1 (a schedule gone wrong). That reply alone is left out, naming
    the config key, its value and the range; round 2's model is the weighted mean of clients 0, 2 and 3 by hand, and
    client 1 is back in round 3 at its own rate."""
    task = _task()

    def settings(p, r):
        return {"lr": -0.1 if (p, r) == (1, 2) else _rate(p, r)}

    models: list[dict] = []
    res = run_rounds(_per_client(FedAvg, settings)(**EVERYONE), _grid(task), initial_arrays(task), num_rounds=3,
                     extra_metrics=keep(models))  # fmt: skip
    excluded = [r.excluded for r in res.history.rounds]
    assert excluded[0] == {} and excluded[2] == {} and set(excluded[1]) == {"1"}, excluded
    assert "lr=-0.1" in excluded[1]["1"] and "expected > 0" in excluded[1]["1"], excluded[1]
    assert [r.num_aggregated for r in res.history.rounds] == [4, 3, 4]
    x = _start(task)
    for rnd in range(1, 4):
        pids = [p for p in range(4) if (p, rnd) != (1, 2)]
        sent = {p: client_model(dataclasses.replace(task, lr=_rate(p, rnd)), p, rnd, x)[0] for p in pids}
        near(models[rnd - 1], weighted_mean(sent, {p: task.num_train(p) for p in pids}))
        x = models[rnd - 1]


# ---- each client its own proximal pull -------------------------------------------------------------------------------
def test_fedprox_with_each_client_its_own_mu_and_one_mu_that_overshoots_is_replayed_by_hand():
    """FedProx (mu = 0.5) whose strategy gives client p its own ``proximal-mu`` 0, 1, 3 and, for client 3, 25: with
    lr 0.1, lr x 25 >= 2 makes every proximal step overshoot, so client 3 is left out naming proximal-mu and the bound
    2 / lr = 20 (each round). The model is the weighted mean of clients 0-2's proximal SGD at their own mu, by hand
    (mu = 0 is plain SGD: client 0 is the FedAvg client)."""
    task = _task(local_steps=3)
    mus = {0: 0.0, 1: 1.0, 2: 3.0, 3: 25.0}
    models: list[dict] = []
    strategy = _per_client(FedProx, lambda p, r: {"proximal-mu": mus[p]})(**EVERYONE, proximal_mu=0.5)
    res = run_rounds(strategy, _grid(task), initial_arrays(task), num_rounds=2, extra_metrics=keep(models))
    for r in res.history.rounds:
        assert set(r.excluded) == {"3"} and r.num_aggregated == 3, r.excluded
        assert "proximal-mu=25.0" in r.excluded["3"] and "< 2 / lr = 20" in r.excluded["3"], r.excluded["3"]
    x = _start(task)
    for rnd in (1, 2):
        sent = {p: client_model(task, p, rnd, x, mu=mus[p])[0] for p in range(3)}
        near(models[rnd - 1], weighted_mean(sent, {p: task.num_train(p) for p in range(3)}))
        x = models[rnd - 1]
    assert not np.allclose(sent[1]["fc.weight"], client_model(task, 1, 2, models[0])[0]["fc.weight"])  # mu mattered


# ---- FedAvg weighted by the local steps each client ran ------------------------------------------------------------
def test_fedavg_weighted_by_the_steps_each_straggler_really_ran_is_the_step_weighted_mean_by_hand():
    """``FedAvg(weighted_by_key="num-steps")`` with half the clients stragglers doing a random k/4 of their 8 steps
    (stragglers='partial'). Each client's plan is drawn from the system model's documented rng (seed, round, pid, 23)
    written out here; the model is the mean of the clients' partial SGD weighted by the steps each ran (1 to 8), not
    by its examples."""
    task = _task(local_steps=8)
    system = SystemModel(4, straggler_fraction=0.5, straggler_epochs=4, seed=3)
    models: list[dict] = []
    res = run_rounds(FedAvg(**EVERYONE, weighted_by_key="num-steps"), _grid(task, system), initial_arrays(task),
                     num_rounds=3, extra_metrics=keep(models))  # fmt: skip
    x, cut = _start(task), 0
    for rnd, r in enumerate(res.history.rounds, start=1):
        work = {}
        for p in range(4):  # SystemModel.plan's draws, no dropout, no deadline
            rng = np.random.default_rng([3, rnd, p, 23])
            work[p] = rng.integers(1, 4) / 4 if rng.random() < 0.5 else 1.0
        cut += sum(w < 1 for w in work.values())
        sent = {p: client_model(task, p, rnd, x, work=work[p]) for p in range(4)}
        assert {p: r.client_train[str(p)]["num-steps"] for p in range(4)} == {p: s[1] for p, s in sent.items()}
        near(models[rnd - 1], weighted_mean({p: s[0] for p, s in sent.items()}, {p: s[1] for p, s in sent.items()}))
        by_examples = weighted_mean({p: s[0] for p, s in sent.items()}, {p: task.num_train(p) for p in sent})
        assert not np.allclose(models[rnd - 1]["fc.weight"], by_examples["fc.weight"], rtol=1e-5, atol=0)
        x = models[rnd - 1]
    assert cut >= 2  # stragglers were there to weigh less


def test_a_late_update_weighted_by_its_steps_is_discounted_by_its_staleness_and_moved_onto_the_new_model():
    """``FedAvg(weighted_by_key="num-steps")`` under stragglers='stale': client 3 (speed 5 steps/s, deadline 1 s) cannot
    finish its 8 steps in round 1 and delivers them in round 2, and again in rounds 3 -> 4. Round 1 (and 3) is the
    step-weighted mean of clients 0-2; round 2 (and 4) adds client 3's update of the round before, moved onto the
    current model (x_r + y_3 - x_(r-1)) and weighted 8 x (1 + 1)^-0.5 beside the others' 8, all by hand."""
    task = _task(local_steps=8)
    system = SystemModel(4, speeds=np.array([1e3, 1e3, 1e3, 5.0]), bandwidths=np.full(4, 1e9), deadline=1.0)
    models: list[dict] = []
    res = run_rounds(FedAvg(**EVERYONE, weighted_by_key="num-steps"), _grid(task, system, stragglers="stale"),
                     initial_arrays(task), num_rounds=4, extra_metrics=keep(models))  # fmt: skip
    assert [(r.num_aggregated, r.stale) for r in res.history.rounds] == [(3, {}), (4, {"3": 1}), (3, {}), (4, {"3": 1})]
    x, late = _start(task), None
    for rnd in range(1, 5):
        sent = {p: client_model(task, p, rnd, x)[0] for p in range(3)}
        weights = {p: 8.0 for p in range(3)}
        if late is not None:  # client 3's work of the round before, rebased onto this round's model
            y3, x_then = late
            sent[3] = {k: x[k].astype(np.float64) + y3[k].astype(np.float64) - x_then[k].astype(np.float64) for k in x}
            weights[3] = 8.0 * 2.0**-0.5
        late = (client_model(task, 3, rnd, x)[0], x) if rnd % 2 == 1 else None
        near(models[rnd - 1], weighted_mean(sent, weights), ulps=4.0)
        if 3 in sent:  # the discount mattered: undiscounted, client 3 would weigh 8
            undiscounted = weighted_mean(sent, {p: 8.0 for p in sent})
            assert not np.allclose(models[rnd - 1]["fc.weight"], undiscounted["fc.weight"], rtol=1e-5, atol=0)
        x = models[rnd - 1]


def test_a_round_whose_training_samples_nobody_while_a_late_update_lands_says_so(caplog):
    """Found here: FedAvg asking for all 4 clients each round (min_available_nodes = min_train_nodes = 4) under
    stragglers='stale', client 3 too slow for the deadline. In rounds 2 and 4 client 3 is busy with its late work, so
    the strategy can sample nobody (3 of 4 online); the round aggregated client 3's late update alone, its model the
    late update moved onto the current one (x_r + y_3 - x_(r-1), by hand), without a word that no client had trained
    (the evaluation's shortness was logged, training's not). A warning now names the round, the minimum that could not
    be met and the late updates aggregated instead (driver._rounds)."""
    task = _task(local_steps=8)
    system = SystemModel(4, speeds=np.array([1e3, 1e3, 1e3, 5.0]), bandwidths=np.full(4, 1e9), deadline=1.0)
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=4, min_train_nodes=4)
    models: list[dict] = []
    with caplog.at_level(logging.WARNING, logger="tilestack.federated"):
        res = run_rounds(strategy, _grid(task, system, stragglers="stale"), initial_arrays(task), num_rounds=4,
                         extra_metrics=keep(models))  # fmt: skip
    rounds = res.history.rounds
    assert [(r.num_online, r.num_selected, r.num_aggregated, r.skipped) for r in rounds] == [
        (4, 4, 3, ""), (3, 0, 1, ""), (4, 4, 3, ""), (3, 0, 1, "")]  # fmt: skip
    for rnd in (2, 4):
        said = [m for m in caplog.messages if m.startswith(f"round {rnd}: no client sampled for training")]
        assert len(said) == 1 and "min_available_nodes=4" in said[0] and "1 late update" in said[0], caplog.messages
    x = _start(task)
    for rnd in range(1, 5):
        if rnd % 2:
            sent = {p: client_model(task, p, rnd, x)[0] for p in range(3)}
            want = weighted_mean(sent, {p: task.num_train(p) for p in range(3)})
            late = (client_model(task, 3, rnd, x)[0], x)
        else:
            want = {k: x[k].astype(np.float64) + late[0][k].astype(np.float64) - late[1][k].astype(np.float64)
                    for k in x}  # fmt: skip
        near(models[rnd - 1], want, ulps=4.0)
        x = models[rnd - 1]


@pytest.mark.timeout(60)
def test_flowers_own_loop_asking_for_every_client_while_one_is_busy_with_late_work_fails_naming_it_not_hangs():
    """The same setting under Flower's own ``FedAvg.start`` over the ManagedGrid: round 1 trains, and in round 2
    Flower's ``sample_nodes`` would poll forever for the busy fourth client. It fails at once instead, a
    FederatedError naming min_available_nodes=4 and the 3 nodes online of 4 (the test's 60 s timeout would catch a
    hang)."""
    task = _task(local_steps=8)
    system = SystemModel(4, speeds=np.array([1e3, 1e3, 1e3, 5.0]), bandwidths=np.full(4, 1e9), deadline=1.0)
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=4, min_train_nodes=4)
    grid = _grid(task, system, stragglers="stale")
    with pytest.raises(FederatedError, match=r"min_available_nodes=4 .* lists 3 online this round of the run's 4"):
        strategy.start(grid=grid, initial_arrays=initial_arrays(task), num_rounds=3)
    assert grid.server_round == 2 and set(grid.late) == {3}  # (round 1 ran; client 3 its late work)


# ---- clients joining mid-training -----------------------------------------------------------------------------------
def test_clients_joining_in_round_three_under_fedadagrad_are_its_rule_by_hand():
    """Clients 2 and 3 are offline in rounds 1 and 2 (availability 0) and join in round 3. FedAdagrad (eta 0.1, tau
    1e-3) builds its v from clients 0 and 1's means in rounds 1-2 and takes all four in round 3: each model is the rule
    over the online clients' SGD replayed by hand, and each round counts the clients online and aggregated."""
    task = _task()
    system = SystemModel(4, availability=[[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    models: list[dict] = []
    res = run_rounds(FedAdagrad(**EVERYONE, eta=0.1, tau=1e-3), _grid(task, system), initial_arrays(task),
                     num_rounds=3, extra_metrics=keep(models))  # fmt: skip
    assert [(r.num_online, r.num_aggregated) for r in res.history.rounds] == [(2, 2), (2, 2), (4, 4)]
    x, v = _start(task), {}
    for rnd, pids in ((1, (0, 1)), (2, (0, 1)), (3, (0, 1, 2, 3))):
        sent = {p: client_model(task, p, rnd, x)[0] for p in pids}
        want = _adagrad(x, weighted_mean(sent, {p: task.num_train(p) for p in pids}), v, eta=0.1, tau=1e-3)
        near(models[rnd - 1], want, ulps=4.0)
        x = models[rnd - 1]


def _recording_app(seen: list) -> ClientApp:
    """tilestack's ClientApp, noting (round, partition) of each TRAIN message it answers."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        seen.append((int(msg.content["config"]["server-round"]), int(context.node_config["partition-id"])))
        return tsclient.app(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        return tsclient.app(msg, context)

    @app.query()
    def query(msg: Message, context) -> Message:
        return tsclient.app(msg, context)

    return app


def test_flowers_own_loop_samples_each_round_from_the_clients_online_in_that_round():
    """Found here: ``FedAvg.start`` (Flower's own loop) over a ManagedGrid whose clients come and go by an availability
    pattern ({0, 1} in round 1, {2, 3} in round 2, all in round 3). The grid learned the round only from the messages,
    after the strategy had sampled, so each round was sampled from the round before's online clients: round 1 trained
    0 and 1 (all four sampled, two refused as offline), round 2 nobody (it sampled 0 and 1, now offline), round 3 only
    2 and 3 while all four were online. The grid now takes the round from the strategy's configure_train / evaluate
    call that samples (grid._sampling_round): each round trains exactly its online clients, and the model is the
    weighted mean of their SGD by hand, as run_rounds gives it."""
    task = _task()
    pattern = {1: (0, 1), 2: (2, 3), 3: (0, 1, 2, 3)}
    system = SystemModel(4, availability=[[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    seen: list = []
    grid = ManagedGrid(InProcessGrid(_recording_app(seen), 4), task, system=system)
    result = FedAvg(**EVERYONE).start(grid=grid, initial_arrays=initial_arrays(task), num_rounds=3)
    assert sorted(seen) == [(r, p) for r, pids in pattern.items() for p in pids]
    final = {k: v.numpy().astype(np.float32) for k, v in result.arrays.items()}  # (Flower's loop keeps it float64)
    x = _start(task)
    for rnd, pids in pattern.items():
        sent = {p: client_model(task, p, rnd, x)[0] for p in pids}
        want = weighted_mean(sent, {p: task.num_train(p) for p in pids})
        x = {k: v.astype(np.float32) for k, v in want.items()}  # the clients are sent the float32 model
    near(final, want, ulps=4.0)
    ours = run_rounds(FedAvg(**EVERYONE), _grid(task, system), initial_arrays(task), num_rounds=3)
    for k, v in ours.arrays.items():
        np.testing.assert_array_equal(final[k], v.numpy(), err_msg=k)


# ---- a local body per client, only the head shared ---------------------------------------------------------------
def test_a_local_body_per_client_sharing_only_the_head_with_a_client_joining_late_is_replayed_by_hand():
    """``FedBN(local_prefix='fc1.')`` over an MLP: each client keeps its own body (fc1) and only the head (fc2) is
    averaged (LG-FedAvg's split, the mirror of FedPer). Client 2 is offline in rounds 1-2 and joins in round 3, when it
    starts from the server's body (never moved) and the global head. Each round's head is the example-weighted mean of
    the online clients' heads, each client having trained from its own body of the round before, by hand; the server's
    body never moves and no reply carries one (the bytes up are the heads')."""
    task = _task(model="mlp", hidden=4, num_clients=3)
    system = SystemModel(3, availability=[[1, 1, 0], [1, 1, 0], [1, 1, 1]])
    models: list[dict] = []
    res = run_rounds(FedBN(local_prefix="fc1.", **EVERYONE), _grid(task, system), initial_arrays(task), num_rounds=3,
                     extra_metrics=keep(models))  # fmt: skip
    x0 = _start(task)
    x, bodies = dict(x0), {}
    head_bytes = sum(len(codec.encode(v).data) for k, v in x0.items() if k.startswith("fc2."))
    for rnd, pids in ((1, (0, 1)), (2, (0, 1)), (3, (0, 1, 2))):
        trained = {p: client_model(task, p, rnd, x | bodies.get(p, {}))[0] for p in pids}
        bodies |= {p: {k: v for k, v in t.items() if k.startswith("fc1.")} for p, t in trained.items()}
        heads = {p: {k: v for k, v in t.items() if k.startswith("fc2.")} for p, t in trained.items()}
        got = models[rnd - 1]
        near({k: v for k, v in got.items() if k.startswith("fc2.")},
             weighted_mean(heads, {p: task.num_train(p) for p in pids}), ulps=4.0)  # fmt: skip
        for k in ("fc1.weight", "fc1.bias"):
            np.testing.assert_array_equal(got[k], x0[k])
        assert res.history.rounds[rnd - 1].bytes_up == len(pids) * head_bytes
        x = got
    assert not np.allclose(bodies[0]["fc1.weight"], bodies[1]["fc1.weight"])  # (each client its own body)


# ---- label skew at Dirichlet alpha 0.01 -----------------------------------------------------------------------------
def test_fedmedian_over_dirichlet_0_01_label_skew_is_the_element_wise_median_by_hand():
    """Five clients of a Dirichlet(0.01) label split (nearly one class each: checked), FedMedian two rounds. Each
    model is the element-wise median of the five clients' SGD replayed by hand (weights ignored)."""
    task = _task(num_clients=5, partitioner="dirichlet", partition_alpha=0.01, num_samples=300)
    majority = [np.bincount(task.client_data(p)[1], minlength=3).max() / task.num_train(p) for p in range(5)]
    assert min(majority) >= 0.9, majority  # the skew is there
    models: list[dict] = []
    run_rounds(FedMedian(**EVERYONE), _grid(task), initial_arrays(task), num_rounds=2, extra_metrics=keep(models))
    x = _start(task)
    for rnd in (1, 2):
        sent = {p: client_model(task, p, rnd, x)[0] for p in range(5)}
        want = {k: np.median(np.stack([sent[p][k].astype(np.float64) for p in range(5)]), axis=0) for k in x}
        near(models[rnd - 1], want)
        mean = weighted_mean(sent, {p: 1.0 for p in range(5)})
        assert not np.allclose(models[rnd - 1]["fc.weight"], mean["fc.weight"], rtol=1e-5, atol=0)
        x = models[rnd - 1]


# ---- a compressed run with per-client schedules crashing mid-round, resumed -----------------------------------------
def test_int8_fedadagrad_with_per_client_schedules_crashing_in_round_two_resumes_to_the_uninterrupted_run(tmp_path):
    """Compressed(ScheduledAdagrad, 'int8'): each client's rate its own and decaying, its int8 residual (error
    feedback) in its node's state. The server crashes while aggregating round 2 (after the clients trained and moved
    their residuals); a new server process (new strategy object, new grid) resumes from the checkpoint of round 1.
    The resumed run's history and model equal the uninterrupted run's bit for bit: round 2 is redone from round 1's
    client state, not from the residuals the lost round left."""
    task = _task()

    def strategy():
        return Compressed(ScheduledAdagrad(**EVERYONE, eta=0.1, tau=1e-3), "int8")

    whole = run_rounds(strategy(), _grid(task), initial_arrays(task), num_rounds=3, seed=2)
    ckpt = tmp_path / "run.ckpt"
    CRASH_IN.add(2)
    with pytest.raises(RuntimeError, match="round 2"):
        run_rounds(strategy(), _grid(task), initial_arrays(task), num_rounds=3, seed=2, checkpoint=ckpt)
    resumed = run_rounds(strategy(), _grid(task), initial_arrays(task), num_rounds=3, seed=2, checkpoint=ckpt)
    assert [r.round for r in resumed.history.rounds] == [1, 2, 3]
    for k, v in whole.arrays.items():
        np.testing.assert_array_equal(resumed.arrays[k].numpy(), v.numpy(), err_msg=k)
    for a, b in zip(whole.history.rounds, resumed.history.rounds, strict=True):
        assert (a.num_aggregated, a.bytes_up, a.client_train) == (b.num_aggregated, b.bytes_up, b.client_train)
    # the residuals were in play: the run differs from the same schedule uncompressed
    plain = run_rounds(strategy().inner, _grid(task), initial_arrays(task), num_rounds=3, seed=2)
    assert not np.array_equal(plain.arrays["fc.weight"].numpy(), whole.arrays["fc.weight"].numpy())
