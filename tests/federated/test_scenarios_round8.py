"""Federated scenarios, round 8: heterogeneous runs on real Flower components, checked against the arithmetic written
out by hand (``_fl_round8``) or tilestack's clients replayed (``_fl_round7.client_model``: the same minibatches).

- nodes that connect late, and a node that disconnects mid-round and comes back: each round averages exactly the
  clients that were there, and every lost update is on record;
- a client left out of both training and evaluation keeps its training reason on record;
- very unequal clients of Dirichlet(0.01) label skew, FedAvg's weights checked exactly, accuracy rising;
- batch norm: FedAvg averages the running statistics with the weights; FedBN keeps them on each client;
- FedProx's proximal term against softmax-regression SGD written out in float64;
- stragglers under a deadline (time-based rounds): each client's share, steps and the simulated time by hand, under
  both straggler policies;
- NaN and misshapen replies from real clients: left out each round naming them, the run still learns;
- interrupted runs resumed from their checkpoint equal the run never interrupted, bit for bit;
- server-side DP with dropouts (noise for the replies averaged) and with batch norm (a noisy running variance);
  client-side DP over HeteroFL and IFCA; DP over FedDF and the robust rules refused; SecAgg+ over clients of 1
  to 119 examples;
- 50 tiny clients, quickly and exactly.

What this round found, fixed:

- A client left out of training and then of evaluation in one round had its training reason overwritten by the
  evaluation's in ``RoundMetrics.excluded`` (a crash read as an evaluation failure, and the lost update's record was
  gone). The training reason now stays, the evaluation's is appended, and every evaluation exclusion is also in the
  new ``RoundMetrics.eval_excluded`` (grid.ManagedGrid._exclude).
- Flower's DP wrappers (no accountant) noise the mean by noise_multiplier * C / num_sampled_clients whatever the
  number of replies: with clients dropped out or crashed, the mean of n < num_sampled_clients clipped updates was
  noised for more clients than it held (an effective multiplier of sigma * n / num_sampled_clients, silently). The
  noise is now that of the n replies averaged (driver._noise_for).
- DP noise on an MLP with batch norm made running variances negative: every evaluation (server-side and federated)
  was NaN, each client's evaluation reply was left out, and the reported accuracy was that of NaN logits. A running
  variance below 0 is read as 0 (models.MLP._forward).
- Client-side DP over HeteroFL, IFCA or CFL: a unit only wider clients hold, or a cluster's model, is the mean of fewer
  replies than the wrapper's noise is sized for (a one-member IFCA cluster at a quarter of the noise multiplier).
  Each now adds the noise it lacks, std sigma C / its holders (HeteroFL._dp_top_up, strategies._util.dp_top_up, told
  by driver._noise_for). DP over FedDF (a distillation), FedNova (a straggler's update scaled up), Flower's robust
  rules, server optimisers (FedAdam, FedYogi, FedAdagrad, FedAvgM with momentum: Flower noises after their step) or
  q-FedAvg, whose aggregate one client moves by more than C / n, is refused (checks.check_privacy).
- partition.quantity_skew (and so every 'iid' split) gave the whole rounding remainder to the largest client: 220
  samples over 50 "IID" clients gave one client 24 and the other 49 four each. The remainder is now spread one sample
  per client.
"""

from __future__ import annotations

import json
import math
import re
import time

import numpy as np
import pytest
from _fl_round5 import blobs, make_grid, np_, scripted, update
from _fl_round7 import client_model
from _fl_round8 import (
    NODE_GONE,
    ComingAndGoingGrid,
    accuracy,
    flat_clip,
    mlp_bn_logits,
    softmax_prox_sgd,
    weighted_mean,
)
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedProx,
)

from tilestack.federated import Evaluator, History, ManagedGrid, SystemModel, Task, codec, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.driver import AGGREGATE_PHASE
from tilestack.federated.grid import payload_bytes
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import FedBN

UNIT = tsclient.UNIT_WEIGHT
GONE = f"error: {NODE_GONE}"


def _near(got: dict[str, np.ndarray], want: dict[str, np.ndarray], ulps: float = 1.0) -> None:
    """The float32 model is the float64 ``want`` rounded once (to ``ulps`` float32 ulps: Flower sums w_i / W * x_i)."""
    assert got.keys() == want.keys()
    for k, v in got.items():
        assert v.dtype == np.float32, (k, v.dtype)
        np.testing.assert_allclose(v, want[k], rtol=ulps * 2**-23, atol=1e-12, err_msg=k)


def _keep(models: list) -> callable:
    """``extra_metrics`` hook keeping the global model after each round."""

    def keep(strategy, arrays, server_round):
        models.append(np_(arrays))
        return {}

    return keep


def _without_wall_time(history: History) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in history.to_dict()["rounds"]]


# ---- nodes that connect late, leave mid-round and come back -------------------------------------------------------
@pytest.mark.timeout(60)
def test_nodes_joining_late_and_leaving_mid_round_are_averaged_exactly_while_they_are_there():
    """Six SuperNodes of quantity-skewed blobs, FedAvg over all of them every round: node 5 connects in round 3 (Flower
    answers messages to it with NODE_UNAVAILABLE before), node 3 trains in round 2 but disconnects before replying
    and reconnects in round 4. Each round's model is the example-weighted mean of exactly the clients that replied,
    replayed from the model of the round before (a late node starts from the current model, not the initial one);
    every client whose update was lost is on record with the reason, the training reason first where evaluation
    failed too, and the clients evaluated are the ones there."""
    task = Task(dataset="blobs", num_samples=240, num_features=4, num_classes=3, num_clients=6, local_epochs=1.0,
                batch_size=8, lr=0.1, partitioner="quantity", seed=2)  # fmt: skip
    inner = ComingAndGoingGrid(tsclient.app, 6, joins={5: 3}, leaves={3: (2, 4)})
    models: list[dict[str, np.ndarray]] = []
    res = run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=1.0), ManagedGrid(inner, task), initial_arrays(task),
                     num_rounds=5, extra_metrics=_keep(models))  # fmt: skip
    there = {1: {0, 1, 2, 3, 4}, 2: {0, 1, 2, 4}, 3: {0, 1, 2, 4, 5}, 4: set(range(6)), 5: set(range(6))}
    assert inner.trained[2] == {0, 1, 2, 3, 4}  # node 3 did round 2's work; only its reply was lost
    x = np_(initial_arrays(task))
    n = {p: task.num_train(p) for p in range(6)}
    for rnd, r in enumerate(res.history.rounds, start=1):
        _near(models[rnd - 1], weighted_mean({p: client_model(task, p, rnd, x)[0] for p in there[rnd]}, n), ulps=2)
        x = models[rnd - 1]
        assert (r.num_selected, r.num_aggregated) == (6, len(there[rnd]))
        lost = {str(p) for p in range(6) if p not in there[rnd]}
        # away for the evaluation too: both reasons on record, the training one (the update lost) first
        assert r.excluded == dict.fromkeys(lost, f"{GONE}; in evaluation: {GONE}")
        assert r.eval_excluded == dict.fromkeys(lost, GONE)
        assert len(r.eval_metrics) > 0 and r.client_acc["mean"] > 0
    first, last = res.history.rounds[0], res.history.rounds[-1]
    assert last.client_acc["mean"] > first.client_acc["mean"]


@pytest.mark.timeout(60)
def test_a_client_left_out_of_training_and_evaluation_keeps_its_training_reason_on_record():
    """Scripted clients: client 2 crashes while training and again while evaluating, client 1 fails only its
    evaluation. Before, the evaluation's reason replaced client 2's training reason in ``excluded`` (its lost update
    read as an evaluation failure). Now: client 2's record starts with the training reason, client 1 (whose update
    was averaged) is in ``excluded`` as before, and ``eval_excluded`` holds the evaluation reasons alone; the model is
    the mean of clients 0, 1 and 3."""
    task = blobs(4)

    def script(pid, rnd, got, context, config):
        if pid == 2:
            raise RuntimeError("train boom")
        return {k: v + update(pid, rnd, v.shape, np.float32) for k, v in got["arrays"].items()}, {"num-examples": 3}

    def ev(pid, rnd):
        if pid in (1, 2):
            raise RuntimeError(f"eval boom {pid}")
        return {"num-examples": 2, "eval-loss": 1.0, "eval-acc": 0.5, UNIT: 1}

    res = run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=1.0), make_grid(scripted(script, ev), task),
                     initial_arrays(task), num_rounds=1)  # fmt: skip
    r = res.history.rounds[0]
    assert r.excluded == {"2": "error: RuntimeError: train boom; in evaluation: error: RuntimeError: eval boom 2",
                          "1": "error: RuntimeError: eval boom 1"}  # fmt: skip
    assert r.eval_excluded == {"1": "error: RuntimeError: eval boom 1", "2": "error: RuntimeError: eval boom 2"}
    assert (r.num_selected, r.num_aggregated) == (4, 3)
    x = np_(initial_arrays(task))
    want = weighted_mean({p: {k: v + update(p, 1, v.shape, np.float32) for k, v in x.items()} for p in (0, 1, 3)},
                         dict.fromkeys(range(4), 3))  # fmt: skip
    _near(np_(res.arrays), want, ulps=2)
    again = History.from_dict(json.loads(json.dumps(res.history.to_dict())))  # the record survives saving
    assert again.rounds[0].excluded == r.excluded and again.rounds[0].eval_excluded == r.eval_excluded


# ---- very unequal clients of extreme label skew -------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_dirichlet_001_clients_of_very_unequal_sizes_are_weighted_exactly_and_fedavg_learns():
    """Twelve clients of Dirichlet(0.01) blobs: most hold one class, sizes differ by more than 20x. Each of six
    rounds of FedAvg is the mean of the twelve replayed models weighted by training examples (not equally, not by
    steps); the global test accuracy rises well above chance; every client trained every round."""
    task = Task(dataset="blobs", num_samples=600, num_features=5, num_classes=4, num_clients=12,
                partitioner="dirichlet", partition_alpha=0.01, local_steps=4, batch_size=8, lr=0.2, seed=1)  # fmt: skip
    n = {p: task.num_train(p) for p in range(12)}
    assert max(n.values()) > 20 * min(n.values())
    assert sum(len(np.unique(task.client_data(p)[1])) == 1 for p in range(12)) >= 6
    models: list[dict[str, np.ndarray]] = []
    res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=6, extra_metrics=_keep(models))
    x = np_(initial_arrays(task))
    for rnd in range(1, 7):
        _near(models[rnd - 1], weighted_mean({p: client_model(task, p, rnd, x)[0] for p in range(12)}, n), ulps=2)
        x = models[rnd - 1]
    assert all(r.num_aggregated == 12 and not r.excluded for r in res.history.rounds)
    assert all(r.steps_done == r.steps_full == 12 * 4 for r in res.history.rounds)
    accs = res.history.column("test_acc")
    assert accs[-1] > 0.5 and accs[-1] > accs[0]


# ---- batch norm: statistics averaged (FedAvg) or kept by each client (FedBN) ---------------------------------------
def _bn_task(**kw) -> Task:
    return Task(**{**dict(dataset="blobs", num_samples=240, num_features=4, num_classes=3, num_clients=4, model="mlp",
                          hidden=6, norm=True, local_steps=5, batch_size=8, lr=0.1, partitioner="quantity",
                          feature_shift=0.5, seed=3), **kw})  # fmt: skip


@pytest.mark.timeout(60)
def test_fedavg_averages_batch_norm_statistics_like_every_other_array():
    """MLP with batch norm, FedAvg, two rounds: the global running mean and variance (which clients update from their
    minibatches, not by gradient) are the example-weighted means of the clients' replayed statistics, as the weights
    are; the server's test accuracy is the hand-written forward pass with those statistics."""
    task = _bn_task()
    models: list[dict[str, np.ndarray]] = []
    res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=2, extra_metrics=_keep(models))
    x0 = x = np_(initial_arrays(task))
    n = {p: task.num_train(p) for p in range(4)}
    for rnd in (1, 2):
        trained = {p: client_model(task, p, rnd, x)[0] for p in range(4)}
        assert len({trained[p]["bn.running_var"].tobytes() for p in range(4)}) == 4  # each client its own
        _near(models[rnd - 1], weighted_mean(trained, n), ulps=2)
        x = models[rnd - 1]
    assert not np.allclose(x["bn.running_mean"], x0["bn.running_mean"])
    ev = Evaluator(task)
    assert res.history.rounds[-1].test_acc == accuracy(mlp_bn_logits(np_(res.arrays), ev.x_test), ev.y_test)


@pytest.mark.timeout(60)
def test_fedbn_keeps_each_clients_normalisation_and_evaluates_with_it():
    """FedBN under per-client feature shift, two rounds: the server's bn.* arrays never move, the rest is the weighted
    mean of the clients' replies (which carry no bn.* array: fewer bytes up than down); in round 2 each client starts
    from the global weights with its own round-1 normalisation, and federated evaluation scores each client with its
    own normalisation: the aggregated accuracy is the test-example-weighted mean of those hand-computed scores."""
    task = _bn_task()
    models: list[dict[str, np.ndarray]] = []
    res = simulate(FedBN(fraction_train=1.0, fraction_evaluate=1.0), task, rounds=2, evaluate=False,
                   extra_metrics=_keep(models))  # fmt: skip
    x0 = np_(initial_arrays(task))
    bn = {k for k in x0 if k.startswith("bn.")}
    own: dict[int, dict[str, np.ndarray]] = {}
    x = x0
    n = {p: task.num_train(p) for p in range(4)}
    for rnd in (1, 2):
        trained = {p: client_model(task, p, rnd, x | own.get(p, {}))[0] for p in range(4)}
        own = {p: {k: trained[p][k] for k in bn} for p in range(4)}
        want = weighted_mean({p: {k: v for k, v in trained[p].items() if k not in bn} for p in range(4)}, n)
        _near({k: v for k, v in models[rnd - 1].items() if k not in bn}, want, ulps=2)
        assert all(np.array_equal(models[rnd - 1][k], x0[k]) for k in bn)
        x = models[rnd - 1]
    r = res.history.rounds[-1]
    assert r.bytes_up < r.bytes_down
    tests = {p: task.client_data(p)[2:] for p in range(4)}
    accs = {p: accuracy(mlp_bn_logits(x | own[p], tests[p][0]), tests[p][1]) for p in range(4)}
    m = {p: len(tests[p][1]) for p in range(4)}
    assert r.eval_metrics["eval-acc"] == pytest.approx(sum(accs[p] * m[p] for p in accs) / sum(m.values()), abs=1e-12)
    assert r.client_acc["mean"] == pytest.approx(np.mean(list(accs.values())), abs=1e-12)


# ---- FedProx's proximal term, written out ---------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mu", [0.0, 2.0])
def test_fedprox_clients_follow_the_proximal_sgd_written_out_in_float64(mu):
    """A float64 softmax-regression model, Flower's FedProx, quantity-skewed clients of unequal epochs' worth of
    steps: each client's model is SGD on cross-entropy + (mu / 2)||w - w_global||^2 written out here in float64 (the
    same seeded minibatches) to 1e-12, and FedProx's model their example-weighted mean, over two rounds. With mu = 2
    every client ends nearer the global model than with mu = 0."""
    task = Task(dataset="blobs", num_samples=200, num_features=5, num_classes=3, num_clients=4, local_epochs=2.0,
                batch_size=7, lr=0.1, partitioner="quantity", seed=4)  # fmt: skip
    start = ArrayRecord({k: codec.encode(v.astype(np.float64)) for k, v in np_(initial_arrays(task)).items()})
    models: list[dict[str, np.ndarray]] = []
    simulate(FedProx(fraction_train=1.0, fraction_evaluate=0.0, proximal_mu=mu), task, rounds=2, evaluate=False,
             initial=start, extra_metrics=_keep(models))  # fmt: skip
    x = np_(start)
    n = {p: task.num_train(p) for p in range(4)}
    for rnd in (1, 2):
        local = {}
        for p in range(4):
            xs, ys, _, _ = task.client_data(p)
            rng = np.random.default_rng([task.seed, p, rnd, 13])
            w, b = softmax_prox_sgd(x["fc.weight"], x["fc.bias"], xs, ys, steps=task.steps_for(p), batch=7, lr=0.1,
                                    mu=mu, rng=rng)  # fmt: skip
            local[p] = {"fc.weight": w, "fc.bias": b}
            if mu:  # the proximal pull: nearer the global model than plain SGD from it
                plain = np.random.default_rng([task.seed, p, rnd, 13])
                w0, _ = softmax_prox_sgd(x["fc.weight"], x["fc.bias"], xs, ys, steps=task.steps_for(p), batch=7,
                                         lr=0.1, mu=0.0, rng=plain)  # fmt: skip
                assert np.linalg.norm(w - x["fc.weight"]) < np.linalg.norm(w0 - x["fc.weight"])
        want = weighted_mean(local, n)
        for k, v in models[rnd - 1].items():
            assert v.dtype == np.float64
            np.testing.assert_allclose(v, want[k], rtol=1e-12, atol=1e-14, err_msg=k)
        x = models[rnd - 1]


# ---- stragglers under a deadline: time-based rounds -----------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", ["partial", "drop"])
def test_a_deadline_over_heterogeneous_speeds_cuts_work_and_round_time_as_computed_by_hand(policy):
    """Six clients at 2000 down to 2 steps/s, a 0.5 s deadline, FedProx (mu 0.5), three rounds. By hand: client p
    gets share = (deadline - 2 x bytes down / bandwidth) x speed / full steps (capped at 1) and does ceil(share x full)
    steps, or none when that is under one step ('timeout', never sent the model); 'partial' averages the cut clients'
    work, 'drop' leaves them out ('deadline'). The simulated round time is the slowest kept client's download, steps
    and upload, or the deadline where the server waited for a client it then dropped; the model is the replayed
    FedProx clients' weighted mean; the test accuracy rises."""
    task = Task(dataset="blobs", num_samples=300, num_features=4, num_classes=3, num_clients=6, local_epochs=2.0,
                batch_size=6, lr=0.1, partitioner="quantity", seed=5)  # fmt: skip
    speeds = np.array([2000.0, 400.0, 60.0, 25.0, 8.0, 0.5])
    bw, deadline, mu = 2e5, 0.5, 0.5
    system = SystemModel(6, speeds=speeds, bandwidths=np.full(6, bw), deadline=deadline)
    models: list[dict[str, np.ndarray]] = []
    res = simulate(FedProx(fraction_train=1.0, fraction_evaluate=0.0, proximal_mu=mu), task, rounds=3, system=system,
                   stragglers=policy, extra_metrics=_keep(models))  # fmt: skip
    down = payload_bytes(RecordDict({"arrays": initial_arrays(task)}))
    full = {p: task.steps_for(p) for p in range(6)}
    share = {p: min(1.0, (deadline - 2 * down / bw) * speeds[p] / full[p]) for p in range(6)}
    cut = {p for p in range(6) if share[p] < 1 and share[p] * full[p] >= 1}
    late = {p for p in range(6) if share[p] * full[p] < 1}
    assert cut and late and len(cut | late) < 6
    kept = [p for p in range(6) if p not in late and (policy == "partial" or p not in cut)]
    steps = {p: max(1, math.ceil(share[p] * full[p])) for p in kept}
    dur = {p: 2 * down / bw + steps[p] / speeds[p] for p in kept}
    want_time = deadline if policy == "drop" else min(deadline, max(dur.values()))
    x = np_(initial_arrays(task))
    for rnd, r in enumerate(res.history.rounds, start=1):
        local = {p: client_model(task, p, rnd, x, work=share[p], mu=mu)[0] for p in kept}
        _near(models[rnd - 1], weighted_mean(local, {p: task.num_train(p) for p in kept}), ulps=2)
        x = models[rnd - 1]
        want_out = {str(p): "timeout" for p in late} | ({str(p): "deadline" for p in cut} if policy == "drop" else {})
        assert r.excluded == want_out
        assert (r.steps_done, r.steps_full) == (sum(steps.values()), sum(full.values()))
        assert r.sim_time == pytest.approx(want_time, rel=1e-12)
        assert r.bytes_down == r.bytes_up == down * len(kept)  # the clients asked to work, their replies
    assert res.history.rounds[-1].test_acc > Evaluator(task)(initial_arrays(task))[1]


# ---- corrupt replies from real clients -------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_nan_and_misshapen_replies_are_left_out_every_round_and_the_run_still_learns(tmp_path):
    """Eight real clients, client 1 sending NaN weights and client 4 a fc.weight one column too wide, ten rounds of
    FedAvg with federated evaluation: each round both are left out naming the array (and nobody else), the model is the
    weighted mean of the other six (round 1 replayed), accuracy rises well above chance, and the saved history keeps
    every record."""
    task = Task(dataset="blobs", num_samples=400, num_features=5, num_classes=4, num_clients=8, local_steps=5,
                batch_size=8, lr=0.2, faults=((1, "nan"), (4, "shape")), seed=6)  # fmt: skip
    models: list[dict[str, np.ndarray]] = []
    res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.5), task, rounds=10, extra_metrics=_keep(models))
    good = [p for p in range(8) if p not in (1, 4)]
    x0 = np_(initial_arrays(task))
    _near(models[0], weighted_mean({p: client_model(task, p, 1, x0)[0] for p in good},
                                   {p: task.num_train(p) for p in good}), ulps=2)  # fmt: skip
    for r in res.history.rounds:
        assert r.excluded == {"1": "non-finite: fc.weight", "4": "shape: fc.weight is (5, 5), expected (5, 4)"}
        assert (r.num_selected, r.num_aggregated) == (8, 6) and not r.skipped and not r.eval_excluded
    accs = res.history.column("test_acc")
    assert accs[-1] > 0.6 and accs[-1] > accs[0]
    res.history.to_json(tmp_path / "h.json")
    back = History.from_dict(json.loads((tmp_path / "h.json").read_text()))
    assert [r.excluded for r in back.rounds] == [r.excluded for r in res.history.rounds]


# ---- resuming an interrupted run -------------------------------------------------------------------------------------
def _resume_case(name: str):
    if name == "fedprox-system":
        task = Task(dataset="blobs", num_samples=300, num_features=4, num_classes=3, num_clients=6, local_epochs=1.0,
                    batch_size=8, lr=0.1, partitioner="dirichlet", partition_alpha=0.3,
                    faults=((2, "crash"),))  # fmt: skip
        system = SystemModel(6, speed_sigma=1.0, dropout=0.2, straggler_fraction=0.3, deadline=0.8, seed=4)
        return task, system, lambda: FedProx(fraction_train=0.67, fraction_evaluate=0.5, proximal_mu=0.3)
    if name == "fedbn":
        return _bn_task(num_clients=5), None, lambda: FedBN(fraction_train=0.6, fraction_evaluate=1.0)
    task = Task(dataset="blobs", num_samples=300, num_features=4, num_classes=3, num_clients=6, local_steps=4, lr=0.1)
    system = SystemModel(6, dropout=0.3, seed=2)
    inner = FedAvg(fraction_train=0.67, fraction_evaluate=0.0, weighted_by_key=UNIT)
    return task, system, lambda: DifferentialPrivacyServerSideFixedClipping(inner, 0.8, 0.5, 4)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", ["fedprox-system", "fedbn", "dp-dropouts"])
def test_a_run_interrupted_and_resumed_from_its_checkpoint_equals_the_run_never_interrupted(tmp_path, name):
    """Five rounds with heterogeneous clients (FedProx under dropouts, stragglers, a deadline and a crashing client;
    FedBN whose normalisation lives in each client's state; noisy DP over dropouts), run once straight through and once
    stopped after two rounds and resumed from the checkpoint by a new strategy object: the final weights are identical
    bit for bit, and so is every round's record (but the wall time)."""
    task, system, make = _resume_case(name)
    straight = simulate(make(), task, rounds=5, system=system, seed=3)
    ckpt = tmp_path / "run.ckpt"
    first = simulate(make(), task, rounds=5, system=system, seed=3, checkpoint=ckpt, stop_after=2)
    assert len(first.history.rounds) == 2 and ckpt.exists()
    resumed = simulate(make(), task, rounds=5, system=system, seed=3, checkpoint=ckpt)
    a, b = np_(straight.arrays), np_(resumed.arrays)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert _without_wall_time(straight.history) == _without_wall_time(resumed.history)
    assert any(r.excluded for r in straight.history.rounds) or name == "fedbn"
    assert not np.array_equal(a[next(iter(a))], np_(initial_arrays(task))[next(iter(a))])


# ---- differential privacy with dropouts, and with batch norm ---------------------------------------------------------
@pytest.mark.timeout(60)
def test_server_side_dp_noise_is_that_of_the_replies_averaged_when_clients_drop_out():
    """DP-FedAvg (server-side clipping to C = 0.5, noise 0.8, five sampled clients) over scripted clients with known
    updates; in round 1 clients 1 and 3 crash. The model is the mean of the three clipped updates plus Gaussian noise of
    std 0.8 x C / 3 (the replies averaged; before, / 5: the mean of three was noised as if it held five, a noise
    multiplier of 0.48 instead of 0.8), drawn from the stream seeded by (seed, round, aggregate phase); round 2, where
    all five reply, is noised by / 5. Float64, rounded once."""
    task = blobs(5, features=3)
    noise, clip, seed = 0.8, 0.5, 11

    def script(pid, rnd, got, context, config):
        if rnd == 1 and pid in (1, 3):
            raise ConnectionError("gone")
        return {k: v + update(pid, rnd, v.shape, np.float32) for k, v in got["arrays"].items()}, {}

    inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=UNIT)
    s = DifferentialPrivacyServerSideFixedClipping(inner, noise, clip, 5)
    models: list[dict[str, np.ndarray]] = []
    res = run_rounds(s, make_grid(scripted(script), task), initial_arrays(task), num_rounds=2, seed=seed,
                     extra_metrics=_keep(models))  # fmt: skip
    assert [r.num_aggregated for r in res.history.rounds] == [3, 5] and s.num_sampled_clients == 5
    x = np_(initial_arrays(task))
    for rnd, kept in ((1, (0, 2, 4)), (2, range(5))):
        raw = {p: {k: update(p, rnd, v.shape, np.float32) for k, v in x.items()} for p in kept}
        assert all(math.sqrt(sum(float(np.sum(u.astype(np.float64) ** 2)) for u in raw[p].values())) > clip
                   for p in kept)  # every update is clipped  # fmt: skip
        ups = {p: flat_clip(raw[p], clip) for p in kept}
        mean = {k: x[k] + sum(ups[p][k] for p in kept) / len(kept) for k in x}
        state = int(np.random.SeedSequence([seed, rnd, AGGREGATE_PHASE]).generate_state(1)[0])
        stream = np.random.RandomState(state % 2**32)
        _near(models[rnd - 1], {k: v + stream.normal(0, noise * clip / len(kept), v.shape) for k, v in mean.items()},
              ulps=2)  # fmt: skip
        x = models[rnd - 1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("wrapper", [DifferentialPrivacyServerSideFixedClipping,
                                     DifferentialPrivacyClientSideFixedClipping])  # fmt: skip
def test_dp_noise_on_batch_norm_statistics_leaves_evaluation_finite(wrapper):
    """Noisy DP (noise 8, C = 1, four clients) over an MLP with batch norm: the noise reaches the running variances,
    some of which go below 0. Before, every evaluation was NaN (the server's test loss, each client's reply, left out
    as 'non-finite metric') and the accuracy was that of NaN logits. Now a negative running variance reads as 0: the
    losses are finite, no evaluation reply is left out, and the server's accuracy is the forward pass written out with
    the variance clipped at 0."""
    task = _bn_task()
    inner = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, weighted_by_key=UNIT)
    res = simulate(wrapper(inner, noise_multiplier=8.0, clipping_norm=1.0, num_sampled_clients=4), task, rounds=2)
    final = np_(res.arrays)
    assert np.any(final["bn.running_var"] < 0)  # the case at hand
    for r in res.history.rounds:
        assert math.isfinite(r.test_loss) and math.isfinite(r.train_loss) and not r.eval_excluded and not r.excluded
        assert math.isfinite(r.eval_metrics["eval-loss"]) and 0 <= r.eval_metrics["eval-acc"] <= 1
    ev = Evaluator(task)
    assert res.history.rounds[-1].test_acc == accuracy(mlp_bn_logits(final, ev.x_test), ev.y_test)


# ---- many tiny clients -----------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_fifty_tiny_clients_finish_quickly_and_are_averaged_exactly():
    """50 clients of 4-5 examples (3-4 to train on), half of them sampled per round, 8 rounds of FedAvg with federated
    evaluation of a fifth: under 20 s on this CPU; every round trains 25 clients, the last round's model is the
    replayed mean of exactly the 25 it sampled, weighted by their examples, and the accuracy rises above chance."""
    task = Task(dataset="blobs", num_samples=220, num_features=4, num_classes=3, num_clients=50, local_epochs=2.0,
                batch_size=2, lr=0.2, seed=8)  # fmt: skip
    models: list[dict[str, np.ndarray]] = []
    inner = ComingAndGoingGrid(tsclient.app, 50, joins={}, leaves={})  # every node there: it records who trained
    t0 = time.perf_counter()
    res = run_rounds(FedAvg(fraction_train=0.5, fraction_evaluate=0.2), ManagedGrid(inner, task), initial_arrays(task),
                     num_rounds=8, evaluator=Evaluator(task), extra_metrics=_keep(models))  # fmt: skip
    assert time.perf_counter() - t0 < 20
    assert all((r.num_selected, r.num_aggregated) == (25, 25) and not r.excluded for r in res.history.rounds)
    assert all(r.eval_metrics and r.client_acc for r in res.history.rounds)
    assert all(len(inner.trained[rnd]) == 25 for rnd in range(1, 9)) and inner.trained[7] != inner.trained[8]
    picked = inner.trained[8]
    _near(models[7], weighted_mean({p: client_model(task, p, 8, models[6])[0] for p in picked},
                                   {p: task.num_train(p) for p in picked}), ulps=2)  # fmt: skip
    assert res.history.rounds[-1].steps_done == sum(task.steps_for(p) for p in picked)
    assert {task.num_train(p) for p in range(50)} == {3, 4}  # 220 = 30 x 4 + 20 x 5 examples, one of each to test
    assert res.history.rounds[-1].test_acc > 0.5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sigma", [0.0, 0.5, 2.0])
def test_quantity_partitions_spread_the_rounding_remainder_one_sample_per_client(sigma):
    """Sizes proportional to lognormal(0, sigma) draws (sigma 0: the IID split): each client's size is its exact share
    rounded down or up, never more. Before, the whole rounding remainder (up to num_clients - 1 samples) went to the
    largest client: the "IID" split of 220 samples over 50 clients gave one client 24 and every other 4."""
    from tilestack.federated.partition import quantity_skew

    for n, k in ((220, 50), (1001, 7), (5000, 333)):
        parts = quantity_skew(n, k, sigma, seed=1, min_size=2)
        assert sorted(np.concatenate(parts).tolist()) == list(range(n))
        w = np.random.default_rng(1).lognormal(0.0, sigma, k)
        exact = 2 + w / w.sum() * (n - 2 * k)
        sizes = np.array([len(p) for p in parts])
        assert np.all((sizes == np.floor(exact)) | (sizes == np.floor(exact) + 1)), (n, k)
        if sigma == 0:
            assert sizes.max() - sizes.min() <= 1


# ---- secure aggregation over very unequal clients --------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_secure_aggregation_over_very_unequal_clients_with_a_dropout_is_the_plain_weighted_mean():
    """SecAgg+ over six Dirichlet(0.01) clients holding 1 to 119 training examples (each update scaled by its examples
    over the largest client's before masking), two rounds: the secure model is the plain example-weighted FedAvg to
    1e-4 (quantisation), also when client 2 crashes every round (a dropout SecAgg+ survives: the plain run without
    it); a client that would corrupt its update, which the server could never see through the masks, is refused before
    any work, naming it."""
    from tilestack.federated.secagg import run_plain, run_secure

    base = dict(dataset="blobs", num_samples=600, num_features=5, num_classes=4, num_clients=6, partitioner="dirichlet",
                partition_alpha=0.01, local_steps=4, lr=0.1, seed=1)  # fmt: skip
    task = Task(**base)
    sizes = [task.num_train(p) for p in range(6)]
    assert min(sizes) == 1 and max(sizes) > 100
    for t in (task, Task(**base, faults=((2, "crash"),))):
        secure, plain = run_secure(t, rounds=2, per_round=6), run_plain(t, rounds=2, per_round=6)
        for k in plain:
            assert np.abs(plain[k]).max() > 0.01
            np.testing.assert_allclose(secure[k], plain[k], atol=1e-4, err_msg=k)
    with pytest.raises(ValueError, match=r"run_secure: task.faults has \[\(3, 'nan'\)\]; expected only dropouts"):
        run_secure(Task(**base, faults=((3, "nan"),)), rounds=1, per_round=6)


# ---- DP over strategies that are not one plain mean ---------------------------------------------------------------
@pytest.mark.timeout(60)
def test_client_side_dp_over_heterofl_noises_each_unit_for_the_clients_that_hold_it():
    """Client-side DP (noise 0.7, C = 1) over HeteroFL, four scripted clients at widths 1 and 1/2 of 4 hidden units,
    equal weights, two rounds. Units 0-1 are the mean of all four replies, units 2-3 of the two full-width clients
    only, where one client moves the mean by C / 2, not C / 4. Before, every element got the wrapper's noise of std
    0.7 C / 4 (units 2-3 released at half the noise multiplier asked for); now HeteroFL first adds noise of std
    0.7 C sqrt(1/2^2 - 1/4^2) where a unit has two holders, so that each element's noise is 0.7 C / (its holders).
    Checked against NumPy's seeded stream: HeteroFL's draw for every array, then Flower's, in float32."""
    from tilestack.federated.strategies import HeteroFL

    task = blobs(4, features=3, classes=3, model="mlp", hidden=4)
    noise, clip, seed = 0.7, 1.0, 5

    def script(pid, rnd, got, context, config):
        return {k: v + 0.01 * update(pid, rnd, v.shape, np.float32) for k, v in got["arrays"].items()}, {}

    inner = HeteroFL(width_of=lambda p: (1.0, 0.5)[p % 2], hidden=4, fraction_train=1.0, fraction_evaluate=0.0,
                     weighted_by_key=UNIT)  # fmt: skip
    s = DifferentialPrivacyClientSideFixedClipping(inner, noise_multiplier=noise, clipping_norm=clip,
                                                   num_sampled_clients=4)  # fmt: skip
    models: list[dict[str, np.ndarray]] = []
    run_rounds(s, make_grid(scripted(script), task), initial_arrays(task), num_rounds=2, seed=seed,
               extra_metrics=_keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    hidden_axis = {"fc1.weight": 1, "fc1.bias": 0, "fc2.weight": 0}
    for rnd in (1, 2):
        state = int(np.random.SeedSequence([seed, rnd, AGGREGATE_PHASE]).generate_state(1)[0])
        stream = np.random.RandomState(state % 2**32)
        holders, mean = {}, {}
        for k, v in x.items():
            held = np.full(v.shape, 4.0)
            if k in hidden_axis:
                held[(slice(None),) * hidden_axis[k] + (slice(2, 4),)] = 2.0  # units 2-3: clients 0 and 2
            holders[k] = held
            subs = {p: v[(slice(None),) * hidden_axis[k] + (slice(0, 4 if p % 2 == 0 else 2),)] if k in hidden_axis
                    else v for p in range(4)}  # fmt: skip
            total = np.zeros(v.shape)
            for p in range(4):
                u = subs[p].astype(np.float64) + 0.01 * update(p, rnd, subs[p].shape, np.float32).astype(np.float64)
                total[tuple(slice(0, n) for n in u.shape)] += u
            mean[k] = total / held
        topped = {k: mean[k] + stream.normal(0.0, 1.0, v.shape) * noise * clip * np.sqrt(1 / holders[k] ** 2 - 1 / 16)
                  for k, v in x.items()}  # fmt: skip
        want = {}
        for k, v in topped.items():
            a = v.astype(np.float32)
            a += stream.normal(0, noise * clip / 4, a.shape).astype(np.float32)
            want[k] = a
        got = models[rnd - 1]
        for k in x:
            np.testing.assert_allclose(got[k], want[k], rtol=2**-22, atol=1e-6, err_msg=k)
        x = got
    assert inner._dp_noise is None  # told only while a round aggregates


@pytest.mark.timeout(60)
@pytest.mark.parametrize("wrapper", [DifferentialPrivacyServerSideFixedClipping,
                                     DifferentialPrivacyClientSideFixedClipping])  # fmt: skip
@pytest.mark.parametrize("inner", ["FedDF", "Krum", "MultiKrum", "FedMedian", "FedTrimmedAvg", "Bulyan", "FedNova",
                                   "FedAdam", "FedYogi", "FedAvgM", "QFFL"])  # fmt: skip
def test_dp_over_an_aggregate_that_is_no_mean_of_the_replies_is_refused_before_any_client_trains(wrapper, inner):
    """A DP wrapper's noise is sized for one client's share (C / n) of a mean of n clipped updates, and Flower adds it
    after the inner strategy's step. FedDF distils the individual client models; Krum releases one client's update,
    MultiKrum and Bulyan a mean of the replies they pick, FedMedian a median, FedTrimmedAvg a mean of what trimming
    leaves; FedNova scales a straggler's update by tau_eff / its steps; FedAdam and FedYogi divide by the root of
    unnoised moments, FedAvgM (momentum 0.9) carries unnoised means into later rounds; q-FedAvg weights by losses. One
    client moves each past C / n. Before, DP over them ran under a guarantee that did not hold; now it is refused
    before any client trains, naming why (FedAvgM with no momentum and lr 1, plain FedAvg, runs)."""
    from flwr.serverapp import strategy as fl

    from tilestack.errors import FederatedError
    from tilestack.federated.strategies import QFFL, FedDF, FedNova

    task = blobs(4)
    trained = []

    def script(pid, rnd, got, context, config):
        trained.append(pid)
        return got["arrays"], {}

    kw = dict(fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=UNIT)
    unlabeled = np.random.default_rng(0).normal(0, 1, (20, task.features))
    make = {"FedDF": lambda: FedDF(model=task.build_model(), unlabeled=unlabeled, steps=5, **kw),
            "Krum": lambda: fl.Krum(num_malicious_nodes=0, **kw),
            "MultiKrum": lambda: fl.MultiKrum(num_malicious_nodes=0, num_nodes_to_select=2, **kw),
            "FedMedian": lambda: fl.FedMedian(**kw), "FedTrimmedAvg": lambda: fl.FedTrimmedAvg(beta=0.25, **kw),
            "Bulyan": lambda: fl.Bulyan(num_malicious_nodes=0, **kw), "FedNova": lambda: FedNova(**kw),
            "FedAdam": lambda: fl.FedAdam(**kw), "FedYogi": lambda: fl.FedYogi(**kw),
            "FedAvgM": lambda: fl.FedAvgM(server_momentum=0.9, **kw),
            "QFFL": lambda: QFFL(q=1.0, client_learning_rate=0.1, **kw)}[inner]  # fmt: skip
    needle = f"{wrapper.__name__} over {inner}: the noise is sized for one client's share of a mean of clipped updates"
    with pytest.raises(FederatedError, match=re.escape(needle) + ".*privacy guarantee would not hold"):
        run_rounds(wrapper(make(), 0.5, 1.0, 4), make_grid(scripted(script), task), initial_arrays(task), num_rounds=1)
    with pytest.raises(FederatedError, match=re.escape(needle)):
        simulate(wrapper(make(), noise_multiplier=0.5, clipping_norm=1.0, num_sampled_clients=4), task, rounds=1)
    assert not trained
    if inner == "FedAvgM":  # with no momentum and lr 1 it is the mean, which the noise covers
        plain = fl.FedAvgM(server_momentum=0.0, server_learning_rate=1.0, **kw)
        res = run_rounds(wrapper(plain, 0.5, 1.0, 4), make_grid(scripted(script), task), initial_arrays(task),
                         num_rounds=1)  # fmt: skip
        assert res.history.rounds[0].num_aggregated == 4


@pytest.mark.timeout(60)
def test_client_side_dp_over_ifca_noises_each_cluster_for_its_members():
    """Client-side DP (noise 0.6, C = 1) over IFCA with two clusters, four scripted clients choosing clusters 0, 0, 0
    and 1: cluster 0 is the mean of three replies, cluster 1 a single client's model, which the wrapper's noise of std
    0.6 C / 4 left at a quarter of the noise multiplier. Now IFCA tops each cluster up to std 0.6 C / (its members)
    before the wrapper's noise; both draws come from NumPy's seeded stream (cluster 0's, cluster 1's, then Flower's
    over the packed record), checked over two rounds."""
    from tilestack.federated.strategies import IFCA

    task = blobs(4, features=3)
    noise, clip, seed = 0.6, 1.0, 9
    choice = {0: 0, 1: 0, 2: 0, 3: 1}

    def script(pid, rnd, got, context, config):
        j = choice[pid]
        mine = {k.partition("/")[2]: v for k, v in got["arrays"].items() if k.startswith(f"cluster{j}/")}
        return ({k: v + 0.01 * update(pid, rnd, v.shape, np.float32) for k, v in mine.items()},
                {"cluster-id": j})  # fmt: skip

    inner = IFCA(num_clusters=2, reseed_after=0, fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=UNIT)
    s = DifferentialPrivacyClientSideFixedClipping(inner, noise_multiplier=noise, clipping_norm=clip,
                                                   num_sampled_clients=4)  # fmt: skip
    models: list[dict[str, np.ndarray]] = []
    start = inner.initial_arrays(task)
    run_rounds(s, make_grid(scripted(script), task), start, num_rounds=2, seed=seed, extra_metrics=_keep(models))
    x = np_(start)
    for rnd in (1, 2):
        state = int(np.random.SeedSequence([seed, rnd, AGGREGATE_PHASE]).generate_state(1)[0])
        stream = np.random.RandomState(state % 2**32)
        want = {}
        for j, members in ((0, (0, 1, 2)), (1, (3,))):
            own = {k.partition("/")[2]: v for k, v in x.items() if k.startswith(f"cluster{j}/")}
            mean = {k: sum(v.astype(np.float64) + 0.01 * update(p, rnd, v.shape, np.float32).astype(np.float64)
                           for p in members) / len(members) for k, v in own.items()}  # fmt: skip
            extra = noise * clip * math.sqrt(1 / len(members) ** 2 - 1 / 16)
            want |= {f"cluster{j}/{k}": v + stream.normal(0.0, extra, v.shape) for k, v in mean.items()}
        for k in want:
            a = want[k].astype(np.float32)
            a += stream.normal(0, noise * clip / 4, a.shape).astype(np.float32)
            np.testing.assert_allclose(models[rnd - 1][k], a, rtol=2**-22, atol=1e-6, err_msg=k)
        x = models[rnd - 1]
