"""Federated scenarios, round 4: what a demanding Flower user tries next, checked against numbers computed here.

Real Flower strategies (FedAvg, FedYogi, FedAdagrad, the four DP wrappers), tilestack's real ClientApp or scripted
ClientApps, over tilestack's in-process Flower ``Grid``. Truth comes from numpy in float64 (weighted means, server
optimiser steps, clipped updates, the deadline arithmetic, compression error bounds), or from a second run that
differs only where the rule says it must not matter. What the round found, each now fixed:

- Client-side DP (``DifferentialPrivacyClientSideFixedClipping``) was accepted but tilestack's ClientApp never
  clipped: the server added noise calibrated for updates of norm C to updates 160x larger. The adaptive wrapper
  stopped the run (no ``norm_bit``). The ClientApp now clips as Flower's mods do and reports ``norm_bit``.
- A DP wrapper whose ``num_sampled_clients`` differed from what its strategy samples under-noised every round
  (noise std is noise_multiplier * C / num_sampled_clients); a DP wrapper around ``Compressed`` failed mid-run on
  the compressed bytes; client-side clipping under error feedback sent more than the norm. All refused up front.
- Flower's FedAvg summed float32 replies in float32 (12 ulps from the exact weighted mean over 100 clients of
  very unequal sizes); replies now reach strategies in float64 and the model is rounded once.
- A client that raised after changing its ``Context.state`` (SCAFFOLD's c_i, error-feedback residual) kept the
  change on tilestack's engine; Flower's engine drops the context of a ClientApp that raised. Now both drop it.
- ``partition.dirichlet(alpha=inf)`` put each class on one client (the opposite of IID), ``quantity_skew`` took a
  NaN or infinite sigma and lost clients, ``OortSelector(alpha=nan)`` and ``Scaffold(global_lr=inf)`` were taken.
"""

import math
import re

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)

from tilestack.errors import FederatedError
from tilestack.federated import ManagedGrid, SystemModel, Task, codec, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated import partition as P
from tilestack.federated.compression import Compressed
from tilestack.federated.engine import InProcessGrid
from tilestack.federated.grid import payload_bytes
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import OortSelector, RandomSelector, Scaffold, Selected

TINY = dict(dataset="synthetic", num_clients=6, max_samples=60, local_steps=2, lr=0.05)
UNIT = "unit-weight"  # equal client weights, as Flower's DP accounting requires


def _blobs(num_clients: int, features: int = 3, classes: int = 2, **kw) -> Task:
    return Task(**{**dict(dataset="blobs", num_samples=max(120, 4 * num_clients), num_features=features,
                          num_classes=classes, num_clients=num_clients, local_steps=2, lr=0.05), **kw})  # fmt: skip


def _np(arrays) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


def _same(a, b) -> bool:
    x, y = _np(a), _np(b)
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def _no_work(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr("tilestack.federated.simulation.Evaluator", fail)
    monkeypatch.setattr("tilestack.federated.simulation.InProcessGrid", fail)


def _scripted_app(script) -> ClientApp:
    """A ClientApp whose TRAIN reply is ``script(pid, round, start) -> (params, num_examples)``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        pid, rnd = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
        params, n = script(pid, rnd, codec.to_numpy(msg.content["arrays"]))
        metrics = MetricRecord({"num-examples": n, UNIT: 1, "train-loss": 0.0, "num-steps": 1})
        return Message(RecordDict({"arrays": codec.to_record(params), "metrics": metrics}), reply_to=msg)

    return app


class Recording(FedAvg):
    """Flower's FedAvg that keeps what it was given: per round, {partition: (arrays in float64, metrics)}."""

    def __init__(self, **kw):
        super().__init__(**{"fraction_train": 1.0, "fraction_evaluate": 0.0, **kw})
        self.seen: list[dict[int, tuple[dict[str, np.ndarray], dict]]] = []

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        round_seen = {}
        for m in replies:
            metrics = dict(next(iter(m.content.metric_records.values())))
            arrays = {k: v.astype(np.float64) for k, v in codec.to_numpy(m.content["arrays"]).items()}
            round_seen[int(metrics.get(tsclient.PARTITION_METRIC, len(round_seen)))] = (arrays, metrics)
        self.seen.append(round_seen)
        return super().aggregate_train(server_round, replies)


def _weighted(models: dict[int, dict[str, np.ndarray]], weights: dict[int, float]) -> dict[str, np.ndarray]:
    total = float(sum(weights[p] for p in models))
    keys = next(iter(models.values())).keys()
    return {k: sum(float(weights[p]) * models[p][k].astype(np.float64) for p in models) / total for k in keys}


# ---- weighting exact to float64, with wildly different client sizes ----------------------------------------------
@pytest.mark.timeout(60)
def test_fedavg_over_very_unequal_clients_is_the_float64_weighted_mean_rounded_once():
    """60 clients with 1 to 10**12 examples and updates of both signs around 1e3: the global model is the exact
    weighted mean rounded once to float32 (Flower's float32 running sum was several ulps off)."""
    task = _blobs(60, features=50)
    rng = np.random.default_rng(4)
    counts = {p: int(c) for p, c in enumerate(rng.integers(1, 10**6, 60))} | {0: 1, 1: 10**12, 2: 3}
    values = {p: {"fc.weight": rng.normal(0, 1e3, (50, 2)).astype(np.float32),
                  "fc.bias": rng.normal(0, 1e3, 2).astype(np.float32)} for p in range(60)}  # fmt: skip

    grid = ManagedGrid(InProcessGrid(_scripted_app(lambda pid, rnd, start: (values[pid], counts[pid])), 60), task)
    res = run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), grid, initial_arrays(task), num_rounds=1)
    exact = _weighted(values, counts)
    for k, v in _np(res.arrays).items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, exact[k].astype(np.float32))


@pytest.mark.timeout(60)
def test_real_clients_of_quantity_skew_are_weighted_by_their_training_examples():
    """tilestack's ClientApp on a lognormal quantity skew (sizes 30x apart): each reply's weight is that client's
    number of training examples, and the model is their weighted mean, rounded once."""
    task = _blobs(12, features=4, classes=3, num_samples=1200, partitioner="quantity", local_steps=3)
    sizes = [task.num_train(p) for p in range(12)]
    assert max(sizes) > 10 * min(sizes)
    s = Recording()
    res = simulate(s, task, rounds=2, seed=3, evaluate=False)
    for rnd, seen in enumerate(s.seen):
        assert sorted(seen) == list(range(12))
        assert {p: m["num-examples"] for p, (_, m) in seen.items()} == dict(enumerate(sizes))
        if rnd == len(s.seen) - 1:
            exact = _weighted({p: a for p, (a, _) in seen.items()}, dict(enumerate(sizes)))
            for k, v in _np(res.arrays).items():
                np.testing.assert_array_equal(v, exact[k].astype(np.float32))


# ---- server optimisers Flower ships, against their update rules ---------------------------------------------------
def _step(pid: int) -> dict[str, np.ndarray]:
    return {"fc.weight": np.full((3, 2), (pid + 1) / 4, np.float32) * np.array([1, -1], np.float32),
            "fc.bias": np.full(2, -(pid + 1) / 8, np.float32)}  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["fedyogi", "fedadagrad"])
def test_fedyogi_and_fedadagrad_follow_their_update_rules(name):
    """Three rounds of scripted clients (updates scaled by the round, so the moments change sign and size)."""
    eta, b1, b2, tau = 0.05, 0.8, 0.95, 1e-2
    n = {p: p + 1 for p in range(6)}
    task = _blobs(6)

    def script(pid, rnd, start):
        return {k: start[k] + v * (1 if rnd != 2 else -2) for k, v in _step(pid).items()}, n[pid]

    grid = ManagedGrid(InProcessGrid(_scripted_app(script), 6), task)
    kw = dict(fraction_train=1.0, fraction_evaluate=0.0, eta=eta, tau=tau)
    s = FedYogi(**kw, beta_1=b1, beta_2=b2) if name == "fedyogi" else FedAdagrad(**kw)
    res = run_rounds(s, grid, initial_arrays(task), num_rounds=3)

    x = {"fc.weight": np.zeros((3, 2)), "fc.bias": np.zeros(2)}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v2 = {k: np.zeros_like(v) for k, v in x.items()}
    for rnd in (1, 2, 3):
        avg = _weighted({p: {k: x[k] + u * (1 if rnd != 2 else -2) for k, u in _step(p).items()} for p in n}, n)
        d = {k: avg[k] - x[k] for k in x}
        if name == "fedyogi":
            m = {k: b1 * m[k] + (1 - b1) * d[k] for k in x}
            v2 = {k: v2[k] - (1 - b2) * d[k] ** 2 * np.sign(v2[k] - d[k] ** 2) for k in x}
        else:  # Adagrad: no momentum, squares summed
            m = d
            v2 = {k: v2[k] + d[k] ** 2 for k in x}
        x = {k: (x[k] + eta * m[k] / (np.sqrt(v2[k]) + tau)).astype(np.float32).astype(np.float64) for k in x}
    for k, got in _np(res.arrays).items():
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, x[k], rtol=1e-6, atol=1e-7)


# ---- differential privacy: clipping norms and noise scale ---------------------------------------------------------
def _norm(update: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in update.values()))


@pytest.mark.timeout(60)
def test_client_side_fixed_clipping_clips_every_update_to_the_norm():
    """Flower's DifferentialPrivacyClientSideFixedClipping with tilestack's ClientApp: each reply's update is the
    unclipped one (from a plain run, same seed) scaled by min(1, C / norm), and ``norm_bit`` says which were
    scaled; with no noise the model is their plain mean. Before: nothing was clipped (the model moved 0.16 with
    C = 1e-3, while the server's noise assumed norm 1e-3)."""
    task = Task(**TINY)
    x0 = _np(initial_arrays(task))
    plain = Recording(weighted_by_key=UNIT)
    simulate(plain, task, rounds=1, seed=2, evaluate=False)
    updates = {p: {k: a[k] - x0[k] for k in x0} for p, (a, _) in plain.seen[0].items()}
    norms = {p: _norm(u) for p, u in updates.items()}
    clip = float(np.median(list(norms.values())))  # half the clients are clipped

    inner = Recording(weighted_by_key=UNIT)
    s = DifferentialPrivacyClientSideFixedClipping(inner, noise_multiplier=0.0, clipping_norm=clip,
                                                   num_sampled_clients=6)  # fmt: skip
    res = simulate(s, task, rounds=1, seed=2, evaluate=False)
    clipped = {}
    for p, (arrays, metrics) in inner.seen[0].items():
        scale = min(1.0, clip / norms[p])
        clipped[p] = {k: x0[k] + scale * updates[p][k] for k in x0}
        for k in x0:
            np.testing.assert_allclose(arrays[k], clipped[p][k], rtol=0, atol=1e-6)
        assert _norm({k: arrays[k] - x0[k] for k in x0}) <= clip * (1 + 1e-5)
        assert metrics["norm_bit"] == int(norms[p] > clip)
    assert 0 < sum(m["norm_bit"] for _, m in inner.seen[0].values()) < 6
    mean = _weighted(clipped, dict.fromkeys(clipped, 1))
    for k, v in _np(res.arrays).items():
        np.testing.assert_allclose(v, mean[k], rtol=0, atol=1e-6)


@pytest.mark.timeout(60)
def test_client_side_adaptive_clipping_runs_and_moves_its_norm_by_the_clipped_share():
    """The adaptive wrapper needs each client's ``norm_bit`` (it stopped the run with an AggregationError): with
    no count noise its norm after a round is C * exp(-lr * (clipped share - target quantile))."""
    task = Task(**TINY)
    x0 = _np(initial_arrays(task))
    plain = Recording(weighted_by_key=UNIT)
    simulate(plain, task, rounds=1, seed=2, evaluate=False)
    norms = sorted(_norm({k: a[k] - x0[k] for k in x0}) for a, _ in plain.seen[0].values())
    c0, lr, q = (norms[3] + norms[4]) / 2, 0.3, 0.5  # 2 of 6 updates above c0
    s = DifferentialPrivacyClientSideAdaptiveClipping(
        FedAvg(fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=UNIT), noise_multiplier=0.0,
        num_sampled_clients=6, initial_clipping_norm=c0, target_clipped_quantile=q, clip_norm_lr=lr,
        clipped_count_stddev=0.0)  # fmt: skip
    res = simulate(s, task, rounds=1, seed=2, evaluate=False)
    assert res.history.rounds[0].num_aggregated == 6 and not res.history.rounds[0].skipped
    assert s.clipping_norm == pytest.approx(c0 * math.exp(-lr * (2 / 6 - q)), rel=1e-12)
    assert _norm({k: v - x0[k] for k, v in _np(res.arrays).items()}) <= c0 * (1 + 1e-5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("noise", [0.0, 2.0])
def test_server_side_clipping_and_noise_scale_match_the_formula(noise):
    """Scripted clients send updates of norm 3 to 8; Flower's server-side wrapper clips each to C and adds
    N(0, (noise * C / m)^2) to the mean: without noise the model is the mean of the clipped updates exactly; with
    noise the residual over 3,010 parameters has that standard deviation (within 8%) and mean 0."""
    task = _blobs(4, features=300, classes=10)
    clip, m = 0.5, 4
    rng = np.random.default_rng(9)
    raw = {p: {"fc.weight": rng.normal(0, 1, (300, 10)), "fc.bias": rng.normal(0, 1, 10)} for p in range(m)}
    updates = {p: {k: (v * (3 + p) / _norm(u)).astype(np.float32) for k, v in u.items()} for p, u in raw.items()}

    def script(pid, rnd, start):
        return {k: start[k] + updates[pid][k] for k in start}, 1

    grid = ManagedGrid(InProcessGrid(_scripted_app(script), m), task)
    inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=UNIT)
    s = DifferentialPrivacyServerSideFixedClipping(inner, noise_multiplier=noise, clipping_norm=clip,
                                                   num_sampled_clients=m)  # fmt: skip
    res = run_rounds(s, grid, initial_arrays(task), num_rounds=1, seed=5)
    clipped_mean = _weighted({p: {k: v * clip / _norm(u) for k, v in u.items()} for p, u in updates.items()},
                             dict.fromkeys(range(m), 1))  # fmt: skip
    residual = np.concatenate([(v - clipped_mean[k]).ravel() for k, v in _np(res.arrays).items()])  # x0 is 0
    if noise == 0.0:
        assert np.abs(residual).max() < 1e-6
    else:
        want = noise * clip / m
        assert abs(residual.std() / want - 1) < 0.08
        assert abs(residual.mean()) < 4 * want / math.sqrt(residual.size)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: DifferentialPrivacyServerSideFixedClipping(FedAvg(fraction_train=0.5, fraction_evaluate=0.0,
                                                                   weighted_by_key=UNIT), 1.0, 1.0, 5),
         "num_sampled_clients=5; expected 3, the nodes FedAvg samples each round (fraction_train=0.5 of the 6 nodes"),
        (lambda: DifferentialPrivacyClientSideFixedClipping(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), 1.0,
                                                            1.0, 2), "num_sampled_clients=2; expected 6"),
        (lambda: Selected(DifferentialPrivacyServerSideFixedClipping(
            FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2), 1.0, 1.0, 6),
            RandomSelector(0), per_round=2), "num_sampled_clients=6; expected 2"),
        (lambda: DifferentialPrivacyServerSideFixedClipping(Compressed(FedAvg(fraction_train=0.5,
                                                                              fraction_evaluate=0.0), "int8"),
                                                            1.0, 1.0, 3),
         "DifferentialPrivacyServerSideFixedClipping wraps Compressed"),
        (lambda: Compressed(DifferentialPrivacyClientSideFixedClipping(FedAvg(fraction_train=0.5,
                                                                              fraction_evaluate=0.0), 1.0, 1.0, 3),
                            "topk", 0.1), "DifferentialPrivacyClientSideFixedClipping with Compressed"),
    ],
    ids=["server-side-too-many", "client-side-too-few", "under-a-selector", "dp-around-compressed",
         "client-side-under-error-feedback"],
)  # fmt: skip
def test_dp_settings_whose_guarantee_would_not_hold_are_refused_before_any_work(monkeypatch, make, needle):
    _no_work(monkeypatch)
    with pytest.raises(FederatedError, match=re.escape(needle)):
        simulate(make(), Task(**TINY), rounds=1)


@pytest.mark.timeout(60)
def test_server_side_dp_inside_compressed_runs():
    """The order the refusal names: the server rebuilds the models from int8 updates, then clips them."""
    s = Compressed(DifferentialPrivacyServerSideFixedClipping(
        FedAvg(fraction_train=0.5, fraction_evaluate=0.0, weighted_by_key=UNIT), 0.0, 1e-3, 3), "int8")  # fmt: skip
    task = Task(**TINY)
    res = simulate(s, task, rounds=2, evaluate=False)
    assert all(r.num_aggregated == 3 and not r.skipped for r in res.history.rounds)
    moved = _norm({k: v - _np(initial_arrays(task))[k] for k, v in _np(res.arrays).items()})
    assert 0 < moved <= 2 * 1e-3 * (1 + 1e-4)  # two rounds, each a mean of updates clipped to 1e-3


# ---- a client that fails after changing its state, then comes back -----------------------------------------------
def _failing_app(when: str) -> ClientApp:
    """tilestack's ClientApp; client 1 loses its connection in round 2, ``before`` or ``after`` training (after:
    its Context.state already holds the new c_i / error-feedback residual)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        down = int(context.node_config["partition-id"]) == 1 and int(msg.content["config"]["server-round"]) == 2
        if down and when == "before":
            raise ConnectionError("lost the server")
        reply = tsclient.train(msg, context)
        if down and when == "after":
            raise ConnectionError("lost the server")
        return reply

    app.evaluate()(tsclient.evaluate_local)
    app.query()(tsclient.query)  # the roll call on Flower's engine
    return app


@pytest.mark.timeout(60)
@pytest.mark.parametrize("timeout", [None, 30.0])
@pytest.mark.parametrize(
    "make",
    [lambda: Scaffold(fraction_train=1.0, fraction_evaluate=0.0),
     lambda: Compressed(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), "topk", 0.2)],
    ids=["scaffold", "topk-error-feedback"],
)  # fmt: skip
def test_a_client_that_raises_after_changing_its_state_rejoins_with_the_state_it_had(make, timeout):
    """Flower's engine keeps a node's Context only from a ClientApp that returned; so must tilestack's: the run in
    which client 1 fails after training equals the one in which it fails before, round by round."""
    task = Task(**TINY)

    def run(when):
        grid = ManagedGrid(InProcessGrid(_failing_app(when), 6), task)
        return run_rounds(make(), grid, initial_arrays(task), num_rounds=4, timeout=timeout)

    before, after = run("before"), run("after")
    assert before.history.rounds[1].excluded == {"1": "error: ConnectionError: lost the server"}
    assert [r.excluded for r in after.history.rounds] == [r.excluded for r in before.history.rounds]
    assert [r.num_aggregated for r in after.history.rounds] == [6, 5, 6, 6]
    assert _same(before.arrays, after.arrays)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_flowers_engine_also_drops_the_state_of_a_client_that_raised():
    """The rule above is Flower's: on its Simulation Engine (Ray) the run in which client 1 fails after training
    equals tilestack's run in which it fails before (about 25 s, most of it Ray starting)."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    task, box = Task(**TINY), {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        box["res"] = run_rounds(Scaffold(fraction_train=1.0, fraction_evaluate=0.0), ManagedGrid(grid, task),
                                initial_arrays(task), num_rounds=4)  # fmt: skip

    run_simulation(server_app=server_app, client_app=_failing_app("after"), num_supernodes=6,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})  # fmt: skip
    grid = ManagedGrid(InProcessGrid(_failing_app("before"), 6), task)
    ours = run_rounds(Scaffold(fraction_train=1.0, fraction_evaluate=0.0), grid, initial_arrays(task), num_rounds=4)
    assert [r.excluded for r in box["res"].history.rounds] == [{}, {"1": "error: ConnectionError: lost the server"},
                                                               {}, {}]  # fmt: skip
    assert _same(box["res"].arrays, ours.arrays)


# ---- dropouts and rejoining, by hand --------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_clients_that_drop_out_rejoin_from_the_current_model():
    """30% dropout per round: each round's model is the weighted mean over the clients that stayed, and a client
    that dropped trains on the current global model when it is back."""
    task = _blobs(8)
    n = {p: 2 * p + 1 for p in range(8)}
    grid = ManagedGrid(InProcessGrid(_scripted_app(lambda pid, rnd, start: (
        {k: start[k] + v * rnd for k, v in _step(pid).items()}, n[pid])), 8), task,
        system=SystemModel(8, dropout=0.3, seed=4))  # fmt: skip
    res = run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), grid, initial_arrays(task), num_rounds=6)
    dropped = [{int(p) for p, why in r.excluded.items() if why == "dropout"} for r in res.history.rounds]
    assert all(set(r.excluded.values()) <= {"dropout"} for r in res.history.rounds)
    assert any(dropped) and any(p in dropped[i] and p not in dropped[i + 1] for i in range(5) for p in range(8))
    x = {"fc.weight": np.zeros((3, 2)), "fc.bias": np.zeros(2)}
    for rnd, gone in enumerate(dropped, start=1):
        stayed = [p for p in range(8) if p not in gone]
        assert res.history.rounds[rnd - 1].num_aggregated == len(stayed)
        x = _weighted({p: {k: x[k] + v * rnd for k, v in _step(p).items()} for p in stayed}, n)
    for k, v in _np(res.arrays).items():
        np.testing.assert_allclose(v, x[k], rtol=0, atol=1e-5)


# ---- stragglers under a deadline, against the arithmetic ---------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", ["partial", "drop"])
def test_a_deadline_cuts_each_client_to_the_steps_it_can_finish(policy):
    """Four clients of known speed (steps/s) and bandwidth (bytes/s), 20 local steps, a 1 s deadline: a client
    gets the share (deadline - download - upload) * speed / 20 of its work, rounded up to whole steps, and one that
    cannot finish a step is not asked ('timeout'); the round lasts the slowest kept client, capped at the deadline.
    Without a deadline everyone does all 20 steps and the round lasts exactly the slowest client's time."""
    task = _blobs(4, local_steps=20)
    speeds, bandwidths = np.array([100.0, 15.0, 2.0, 0.05]), np.array([1e6, 1e4, 1e6, 1e6])
    down = payload_bytes(RecordDict({"arrays": initial_arrays(task)}))
    full = 20
    for deadline in (1.0, None):
        system = SystemModel(4, speeds=speeds, bandwidths=bandwidths, deadline=deadline)
        res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=4), task, rounds=1,
                       system=system, stragglers=policy, evaluate=False)  # fmt: skip
        r = res.history.rounds[0]
        steps, reasons, times = {}, {}, []
        for p in range(4):
            comm = 2 * down / bandwidths[p]  # the reply is as large as the model (same float32 arrays)
            share = 1.0 if deadline is None else (deadline - comm) * speeds[p] / full
            if share * full < 1:
                reasons[str(p)] = "timeout"
                continue
            if share < 1 and policy == "drop":
                reasons[str(p)] = "deadline"
                times.append(deadline)
                continue
            steps[p] = math.ceil(min(1.0, share) * full)
            times.append(comm + steps[p] / speeds[p])
        assert r.excluded == reasons
        assert (r.steps_done, r.steps_full, r.num_aggregated) == (sum(steps.values()), 4 * full, len(steps))
        want_time = max(times) if deadline is None else min(deadline, max(times))
        assert r.sim_time == pytest.approx(want_time, rel=1e-12)
        assert (r.bytes_down, r.bytes_up) == (down * len(steps), down * len(steps))
    assert steps == {p: full for p in range(4)} and reasons == {}  # the run without a deadline


# ---- compression: exact bytes and error bounds -------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("spec", ["int8", "topk:0.1"])
def test_compressed_round_stays_within_its_error_bound_of_the_uncompressed_one(spec):
    """One round from the same model and seed with and without compression: the clients send exactly the bytes
    the encoding takes (int8: 8 + one per entry; top-k: 8 per kept entry), and each global entry differs from
    the uncompressed one by at most the weighted mean of the clients' per-entry error bounds (int8: half a step
    of (max - min) / 255; top-k: the smallest magnitude kept)."""
    task = _blobs(6, features=20, classes=5, local_steps=5, lr=0.2)
    x0 = _np(initial_arrays(task))
    plain = Recording()
    ref = simulate(plain, task, rounds=1, seed=1, evaluate=False)
    method, _, ratio = spec.partition(":")
    res = simulate(Compressed(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), method, float(ratio or 0)), task,
                   rounds=1, seed=1, evaluate=False)  # fmt: skip
    weights = {p: m["num-examples"] for p, (_, m) in plain.seen[0].items()}
    total = sum(weights.values())
    bound = {k: 0.0 for k in x0}
    want_bytes = 0
    for p, (arrays, _) in plain.seen[0].items():
        for k in x0:
            u = (arrays[k] - x0[k]).astype(np.float32).ravel()
            if method == "int8":
                err, sent = float(u.max() - u.min()) / 255 / 2, 8 + u.size
            else:
                kept = math.ceil(float(ratio) * u.size)
                err, sent = float(np.sort(np.abs(u))[u.size - kept]), 8 * kept
            bound[k] += weights[p] / total * err
            want_bytes += sent
    assert res.history.rounds[0].bytes_up == want_bytes
    assert res.history.rounds[0].bytes_down == ref.history.rounds[0].bytes_down
    got, base = _np(res.arrays), _np(ref.arrays)
    for k in x0:
        diff = np.abs(got[k].astype(np.float64) - base[k])
        assert diff.max() <= bound[k] * (1 + 1e-5) + 1e-6
        assert diff.max() > 0  # it really was compressed


# ---- sampling: many small clients, a fraction each round ----------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["fraction_train", "selector"])
def test_sampling_120_clients_a_tenth_per_round_is_uniform(how):
    """40 rounds of 12 of 120 clients: every round 12 distinct clients, and over the run each client was picked
    about 4 times (a chi-square of the counts within 4 sigma of its 119 degrees of freedom; sampling the first
    12, or any fixed 12, gives thousands). The same seed repeats the picks, another does not."""
    task = _blobs(120, local_steps=1)

    def picks(seed):
        inner = Recording(fraction_train=0.1 if how == "fraction_train" else 1.0, min_train_nodes=2,
                          min_available_nodes=2)  # fmt: skip
        s = inner if how == "fraction_train" else Selected(inner, RandomSelector(seed), per_round=12)
        res = simulate(s, task, rounds=40, seed=seed, evaluate=False)
        assert all(r.num_selected == 12 == r.num_aggregated for r in res.history.rounds)
        return [sorted(seen) for seen in inner.seen]

    rounds = picks(7)
    assert all(len(set(r)) == 12 for r in rounds)
    counts = np.bincount(np.concatenate(rounds), minlength=120)
    expected = 40 * 12 / 120
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 119 + 4 * math.sqrt(2 * 119), chi2
    assert picks(7) == rounds and picks(8) != rounds


# ---- secure aggregation over a sample of clients, with a dropout ------------------------------------------------
@pytest.mark.timeout(120)
def test_secure_aggregation_of_a_sample_repeats_and_matches_the_plain_average():
    """SecAgg+ with 4 of 6 clients per round (power-law sizes) and one client that crashes when sampled: two runs
    are bit-identical, and the secure model is the plain FedAvg of the same sampled survivors to the quantisation
    step (unseeded, Flower's sampling picked other clients each run: 0.04 apart)."""
    from tilestack.federated.secagg import run_plain, run_secure

    task = Task(dataset="synthetic", num_clients=6, max_samples=80, local_steps=3, lr=0.05, faults=((2, "crash"),))
    a, b = run_secure(task, rounds=3, per_round=4), run_secure(task, rounds=3, per_round=4)
    plain, again = run_plain(task, rounds=3, per_round=4), run_plain(task, rounds=3, per_round=4)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(plain[k], again[k])
        np.testing.assert_allclose(a[k], plain[k], rtol=0, atol=1e-4)


# ---- resume on another number of worker processes -------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_run_stopped_on_two_workers_resumes_on_one_to_the_same_model(tmp_path):
    """SCAFFOLD (server c and every client's c_i in the checkpoint): two rounds in two worker processes, then the
    rest in this process, equals four rounds in this process."""
    task = Task(**TINY)

    def make():
        return Scaffold(fraction_train=1.0, fraction_evaluate=0.0)

    full = simulate(make(), task, rounds=4, seed=6, evaluate=False)
    ckpt = tmp_path / "run.ckpt"
    simulate(make(), task, rounds=4, seed=6, evaluate=False, checkpoint=ckpt, stop_after=2, workers=2)
    resumed = simulate(make(), task, rounds=4, seed=6, evaluate=False, checkpoint=ckpt)
    assert [r.round for r in resumed.history.rounds] == [1, 2, 3, 4]
    assert _same(full.arrays, resumed.arrays)


@pytest.mark.timeout(60)
def test_zero_rounds_returns_the_initial_model():
    task = Task(**TINY)
    res = simulate(FedAvg(fraction_train=0.5, fraction_evaluate=0.0), task, rounds=0)
    assert res.history.rounds == [] and _same(res.arrays, initial_arrays(task))


# ---- Byzantine-robust rules that cannot have the replies they need ---------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: Krum(fraction_train=1.0, fraction_evaluate=0.0, num_malicious_nodes=2),
         "Krum: num_malicious_nodes=2; expected at most 1 for the 6 nodes it samples each round"),
        (lambda: Krum(fraction_train=0.5, fraction_evaluate=0.0, num_malicious_nodes=1),
         "expected at most 0 for the 3 nodes it samples each round (fraction_train=0.5"),
        (lambda: MultiKrum(fraction_train=1.0, fraction_evaluate=0.0, num_malicious_nodes=1, num_nodes_to_select=9),
         "MultiKrum: num_nodes_to_select=9; expected at most the 6 nodes"),
        (lambda: Bulyan(fraction_train=1.0, fraction_evaluate=0.0, num_malicious_nodes=1),
         "Bulyan: num_malicious_nodes=1; expected at most 0 for the 6 nodes it samples each round"),
    ],
)  # fmt: skip
def test_robust_rules_without_enough_sampled_replies_are_refused_before_any_work(monkeypatch, make, needle):
    """Flower ran them anyway: Krum with f = 2 of 6 scored each update by its single nearest neighbour, and Bulyan
    returned no model in every round."""
    _no_work(monkeypatch)
    with pytest.raises(FederatedError, match=re.escape(needle)):
        simulate(make(), Task(**TINY), rounds=1)


@pytest.mark.timeout(60)
def test_krum_at_its_bound_picks_the_update_closest_to_its_neighbours():
    """Krum with f = 1 of 5 replies (2f + 3): four honest updates near 1 and one at 100; the global model is the
    honest update with the smallest sum of squared distances to its n - f - 2 = 2 nearest others."""
    task = _blobs(5)
    shift = {0: 1.0, 1: 1.2, 2: 0.9, 3: 1.5, 4: 100.0}

    def script(pid, rnd, start):
        return {k: start[k] + shift[pid] for k in start}, 1

    grid = ManagedGrid(InProcessGrid(_scripted_app(script), 5), task)
    res = run_rounds(Krum(fraction_train=1.0, fraction_evaluate=0.0, num_malicious_nodes=1, min_available_nodes=5),
                     grid, initial_arrays(task), num_rounds=1)  # fmt: skip
    size = sum(v.size for v in _np(initial_arrays(task)).values())
    score = {p: sum(sorted(size * (shift[p] - shift[q]) ** 2 for q in shift if q != p)[:2]) for p in shift}
    best = min(score, key=score.get)
    assert best == 0
    for v in _np(res.arrays).values():
        np.testing.assert_allclose(v, shift[best], rtol=0, atol=1e-6)


# ---- the deployment ServerApp, driven by its run config ---------------------------------------------------------
def _deploy(grid, run_config: dict) -> None:
    from flwr.app import Context

    from tilestack.federated import deploy

    deploy.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))


@pytest.mark.timeout(60)
def test_the_deployment_server_app_gives_the_simulated_model(tmp_path):
    """tilestack's deployment ServerApp (the one ``flwr run`` starts) over the in-process grid: its JSON result
    is the model ``simulate`` gives for the same strategy name, seed and timeout."""
    import json

    from tilestack.federated.strategies import make_strategy

    task = Task(**TINY)
    out = tmp_path / "result.json"
    _deploy(InProcessGrid(tsclient.app, 6), {"task": task.to_json(), "strategy": "fedprox", "num-rounds": 2,
                                             "clients-per-round": 3, "proximal-mu": 0.1, "seed": 4,
                                             "result-path": str(out)})  # fmt: skip
    got = json.loads(out.read_text())
    ref = simulate(make_strategy("fedprox", clients_per_round=3, num_clients=6, eval_fraction=1.0, proximal_mu=0.1),
                   task, rounds=2, seed=4, timeout=120.0)  # fmt: skip
    assert [r["round"] for r in got["rounds"]] == [1, 2]
    for k, v in _np(ref.arrays).items():
        np.testing.assert_array_equal(np.asarray(got["arrays"][k], np.float32), v)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "change, needle",
    [
        ({"num_rounds": 5}, "unknown key(s) ['num_rounds']; expected keys among"),
        ({"num-rounds": 2.5}, "num-rounds=2.5; expected an int"),
        ({"clients-per-round": "3"}, "clients-per-round='3'; expected an int"),
        ({"proximal-mu": True}, "proximal-mu=True; expected a float"),
        ({"task": ""}, "task is not a Task as JSON"),
        ({"result-path": ""}, "result-path=''; expected a file path in an existing folder"),
        ({"clients-per-round": 0}, "clients_per_round=0; expected an integer in [1, 6]"),
    ],
)
def test_the_deployment_run_config_is_checked_before_the_roll_call(tmp_path, change, needle):
    """A typo'd key was ignored (the default ran), a float number of rounds truncated, an empty result path failed
    after the last round, and clients-per-round=0 meant every client."""

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the grid was used ({name}) before the run config was checked")

    cfg = {"task": Task(**TINY).to_json(), "result-path": str(tmp_path / "r.json"), "num-rounds": 1} | change
    with pytest.raises(ValueError, match=re.escape(needle)):
        _deploy(Untouchable(), cfg)


# ---- bad values a user may pass to the building blocks ---------------------------------------------------------
@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: OortSelector(SystemModel(6), alpha=float("nan")), "OortSelector: alpha=nan; expected a finite"),
        (lambda: OortSelector(SystemModel(6), preferred_percentile=150), "OortSelector: preferred_percentile=150"),
        (lambda: Scaffold(global_lr=float("inf")), "Scaffold: global_lr=inf; expected a finite number > 0"),
        (lambda: P.dirichlet(np.arange(40) % 4, 4, float("inf")), "dirichlet: alpha=inf; expected a finite number"),
        (lambda: P.quantity_skew(100, 4, float("nan")), "quantity_skew: sigma=nan; expected a finite number >= 0"),
        (lambda: P.quantity_skew(100, 4, float("inf")), "quantity_skew: sigma=inf"),
    ],
)
def test_building_blocks_name_non_finite_settings(make, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        make()


@pytest.mark.parametrize("alpha", [0.05, 0.5, 5.0])
def test_dirichlet_label_shares_have_the_dirichlet_mean_and_variance(alpha):
    """Label skew as the Dirichlet prescribes: over 200 classes split across 10 clients, the share of a class on a
    client has mean 1/K and variance (1/K)(1 - 1/K) / (K alpha + 1) (within 15%); at alpha = 0.05 most classes sit
    almost wholly on one client."""
    k, classes, per_class = 10, 200, 300
    y = np.repeat(np.arange(classes), per_class)
    parts = P.dirichlet(y, k, alpha, seed=3)
    shares = np.stack([np.bincount(y[p], minlength=classes) for p in parts], axis=1) / per_class  # (classes, K)
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)
    want = (1 / k) * (1 - 1 / k) / (k * alpha + 1)
    assert abs(shares.var() / want - 1) < 0.15, (shares.var(), want)
    if alpha == 0.05:
        assert np.median(shares.max(axis=1)) > 0.8


def test_a_very_large_dirichlet_alpha_is_close_to_iid():
    """The limit the refused alpha=inf stood for: with alpha = 1e6 every client holds each class in equal share."""
    y = np.arange(1000) % 4
    parts = P.dirichlet(y, 4, 1e6, seed=0)
    shares = np.array([np.bincount(y[p], minlength=4) for p in parts]) / 250
    assert np.abs(shares - 0.25).max() < 0.02
