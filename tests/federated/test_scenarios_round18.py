"""Federated scenarios, round 18 (1 of 2): the system-heterogeneity model end to end on three clients (speeds,
bandwidths, a deadline, dropouts and stragglers under the partial, drop and stale policies: each round's simulated time,
bytes, steps and model by hand), secure aggregation with a client that drops out after the key exchange, FedBN's local
batch norm checked by name, HeteroFL over two widths and SCAFFOLD's control variates after one round.

tilestack's ClientApp over tilestack's in-process Flower ``Grid`` (``simulate``; ``run_rounds`` with ``ManagedGrid``),
Flower's FedAvg, tilestack's FedBN, HeteroFL and Scaffold, Flower's SecAgg+ workflow and ``secaggplus_mod``
(``secagg.run_secure``). References, all independent of the code under test: the system model's documented arithmetic
and draws (``_fl_round18``), the clients' seeded SGD replayed (``_fl_round7.client_model``, SCAFFOLD's client
``_fl_round10.scaffold_client``, the SecAgg+ client ``_fl_round18.secure_update``), weighted means in float64, and the
MLP with batch norm scored in float64 (``_fl_round18.bn_mlp_scores``).

What this round found, fixed:

- *SecAgg+ settings no round can meet.* ``run_secure(reconstruction_threshold=5, per_round=4)`` (an integer count
  above the clients sampled) or ``num_shares=2.5`` (10 shares of 4 clients, a threshold of 6) halted every round in
  Flower's workflow and the run ended with "fewer clients ... survived each round" though no client dropped; an
  integer threshold of 0, or True, was taken (a key recoverable from no share). They are refused before any work,
  with the threshold each round resolves to as Flower computes it (``secagg._check_threshold``); a NumPy
  ``clipping_range`` (``np.float32(8.0)``) was refused as "not a finite number > 0" and is taken; ``run_plain`` of
  no Task names it (an AttributeError before).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _fl_round5 import np_
from _fl_round7 import client_model, weighted_mean
from _fl_round9 import keep, near
from _fl_round10 import scaffold_client
from _fl_round14 import heterofl_mean
from _fl_round18 import bn_mlp_scores, deadline_plan, draws, fedavg, npy_bytes, secure_update

from tilestack.federated import InProcessGrid, ManagedGrid, SystemModel, Task, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.client import TASK_KEY
from tilestack.federated.secagg import run_plain, run_secure
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import FedBN, HeteroFL, Scaffold


def _task(**kw) -> Task:
    base = dict(dataset="blobs", num_samples=240, num_features=3, num_classes=3, num_clients=3, local_steps=8,
                batch_size=8, lr=0.1, partitioner="quantity", quantity_sigma=0.8, seed=2)  # fmt: skip
    return Task(**(base | kw))


SPEEDS, BANDWIDTHS = np.array([20.0, 2.2, 0.3]), np.array([1e5, 1e4, 1e3])
DEADLINE = 3.0


# ---- a round deadline over three clients, each policy ---------------------------------------------------------------
@pytest.mark.parametrize("policy", ["partial", "drop"])
def test_deadline_round_of_three_clients_is_its_arithmetic_by_hand(policy):
    """Client 0 does its 8 steps well in time, client 1 can do only part of them before the 3 s deadline, client 2 not
    one (its transfers alone take 0.6 s of 3 and 0.3 steps/s fit 0.72 steps): one round, each number by hand: who is
    left out and why, the steps done of those asked, the bytes of the model sent to and from each client asked, the
    round's simulated time (the slowest kept client capped at the deadline, or the deadline where the server waited
    for a client it then dropped) and the model (the kept clients' replayed SGD, weighted by examples)."""
    task = _task()
    x0 = np_(initial_arrays(task))
    size = npy_bytes(x0)
    plans = {p: deadline_plan(DEADLINE, size, BANDWIDTHS[p], SPEEDS[p], 8) for p in range(3)}
    assert [plans[p][0] for p in range(3)] == ["", "deadline", "timeout"], plans  # the scenario
    system = SystemModel(3, speeds=SPEEDS, bandwidths=BANDWIDTHS, deadline=DEADLINE)
    models: list = []
    res = simulate(fedavg(), task, rounds=1, system=system, stragglers=policy, evaluate=False,
                   extra_metrics=keep(models))  # fmt: skip
    m = res.history.rounds[0]
    kept = [0, 1] if policy == "partial" else [0]
    want_out = {"2": "timeout"} | ({"1": "deadline"} if policy == "drop" else {})
    assert m.excluded == want_out
    assert (m.num_selected, m.num_aggregated, m.steps_full) == (3, len(kept), 24)
    assert m.steps_done == sum(plans[p][2] for p in kept) == (8 + 7 if policy == "partial" else 8)
    assert m.bytes_down == m.bytes_up == size * len(kept)  # dropped-out clients are not asked; replies as large
    times = [2 * size / BANDWIDTHS[p] + plans[p][2] / SPEEDS[p] for p in kept]
    want_time = min(DEADLINE, max(times)) if policy == "partial" else DEADLINE
    assert m.sim_time == pytest.approx(want_time, rel=1e-12)
    local = {p: client_model(task, p, 1, x0, work=plans[p][1])[0] for p in kept}
    near(models[0], weighted_mean(local, {p: task.num_train(p) for p in kept}), ulps=2)


def test_stale_policy_over_three_clients_joins_the_late_update_a_round_later_weighted_by_hand():
    """stragglers='stale': client 1's whole work (8 steps at 2.2/s plus its transfers: 3.7 s, past the 3 s deadline)
    ends in round 2 and joins it as x1 + (y1 - x0) weighted by n_1 (1 + 1)^-0.5; client 2 would be 9 rounds late
    (past max_staleness 4) and is left out each round, the server waiting until the deadline; client 1 is busy (not
    online) in round 2. Round 1's model is client 0's alone; round 2's, its new model and the late one by hand; the
    late update's bytes and steps count in round 2."""
    task = _task()
    x0 = np_(initial_arrays(task))
    size = npy_bytes(x0)
    full_time = {p: 2 * size / BANDWIDTHS[p] + 8 / SPEEDS[p] for p in range(3)}
    late = {p: max(1, math.ceil(full_time[p] / DEADLINE) - 1) for p in (1, 2)}
    assert late == {1: 1, 2: 9}  # the scenario
    system = SystemModel(3, speeds=SPEEDS, bandwidths=BANDWIDTHS, deadline=DEADLINE)
    models: list = []
    res = simulate(fedavg(), task, rounds=2, system=system, stragglers="stale", evaluate=False,
                   extra_metrics=keep(models))  # fmt: skip
    r1, r2 = res.history.rounds
    too_late = "deadline: its update would arrive 9 rounds late, past max_staleness=4"
    assert r1.excluded == {"1": "late: its update arrives in round 2 (staleness 1)", "2": too_late}
    assert r2.excluded == {"2": too_late} and r2.stale == {"1": 1}
    assert (r1.num_online, r2.num_online) == (3, 2)
    assert (r1.num_aggregated, r1.steps_done, r2.num_aggregated, r2.steps_done) == (1, 8, 2, 16)
    assert (r1.bytes_down, r1.bytes_up) == (2 * size, size)  # client 1 got the model; its reply is held back
    assert (r2.bytes_down, r2.bytes_up) == (size, 2 * size)  # client 0's round, and client 1's late upload
    assert r1.sim_time == r2.sim_time == DEADLINE
    y0 = client_model(task, 0, 1, x0)[0]
    near(models[0], {k: v.astype(np.float64) for k, v in y0.items()}, ulps=0)
    x1 = models[0]
    y1 = client_model(task, 1, 1, x0)[0]  # trained in round 1 from x0, with round 1's minibatches
    rebased = {k: x1[k].astype(np.float64) + (y1[k].astype(np.float64) - x0[k].astype(np.float64)) for k in x0}
    y0_2 = client_model(task, 0, 2, x1)[0]
    w = {0: task.num_train(0), 1: task.num_train(1) * 2**-0.5}
    want = {k: (w[0] * y0_2[k].astype(np.float64) + w[1] * rebased[k]) / (w[0] + w[1]) for k in x0}
    near(models[1], want, ulps=3)


def test_dropouts_and_stragglers_without_deadline_over_three_rounds_by_hand():
    """dropout 0.25 and half the clients stragglers doing k/4 of their work (system seed 0), no deadline: the draws of
    the documented (seed, round, client) streams give each kind in three rounds; each round's exclusions, steps, bytes,
    simulated time (the slowest kept client's transfers plus its steps) and model (the replayed partial SGD) by hand;
    under 'drop' the stragglers are left out and the server does not wait for them."""
    task = _task()
    speeds, bws = np.array([10.0, 4.0, 2.0]), np.array([1e4, 2e3, 1e3])
    for policy in ("partial", "drop"):
        system = SystemModel(3, speeds=speeds, bandwidths=bws, dropout=0.25, straggler_fraction=0.5,
                             straggler_epochs=4, seed=0)  # fmt: skip
        models: list = []
        res = simulate(fedavg(), task, rounds=3, system=system, stragglers=policy, evaluate=False,
                       extra_metrics=keep(models))  # fmt: skip
        x = np_(initial_arrays(task))
        size = npy_bytes(x)
        kinds = set()
        for rnd, m in enumerate(res.history.rounds, start=1):
            plan = {p: draws(0, rnd, p, 0.25, 0.5, 4) for p in range(3)}
            kinds |= {why for why, _ in plan.values()}
            kept = [p for p in range(3) if plan[p][1] > 0 and (policy == "partial" or not plan[p][0])]
            out = {str(p): why for p, (why, w) in plan.items() if why == "dropout" or (why and policy == "drop")}
            steps = {p: math.ceil(plan[p][1] * 8) for p in kept}
            assert m.excluded == out, (policy, rnd)
            assert (m.steps_done, m.steps_full, m.num_aggregated) == (sum(steps.values()), 24, len(kept))
            assert m.bytes_down == m.bytes_up == size * len(kept)
            assert m.sim_time == pytest.approx(max(2 * size / bws[p] + steps[p] / speeds[p] for p in kept), rel=1e-12)
            local = {p: client_model(task, p, rnd, x, work=plan[p][1])[0] for p in kept}
            near(models[rnd - 1], weighted_mean(local, {p: task.num_train(p) for p in kept}), ulps=2)
            x = models[rnd - 1]
        assert kinds == {"", "dropout", "straggler"}


# ---- secure aggregation ---------------------------------------------------------------------------------------------
def _secure_task(**kw) -> Task:
    base = dict(dataset="blobs", num_samples=160, num_features=3, num_classes=3, num_clients=4, local_steps=3,
                batch_size=8, lr=0.1, partitioner="quantity", quantity_sigma=0.6, seed=4)  # fmt: skip
    return Task(**(base | kw))


def test_secure_sum_with_a_client_crashing_after_the_key_exchange_is_the_survivors_mean_by_hand():
    """SecAgg+ over 4 clients, client 1 crashing where it would send its masked update (after the key exchange: its
    pairwise masks are in the others' vectors and must be rebuilt from the shares for the sum to unmask): two rounds
    give x + the survivors' updates weighted by examples, replayed in float64, to SecAgg+'s quantisation step; the
    same run without the crash differs from it by far more (client 1's update was not just ignored in the masks)."""
    task = _secure_task(faults=((1, "crash"),))
    got = run_secure(task, rounds=2, per_round=4)
    x = {k: v.astype(np.float64) for k, v in task.initial_params().items()}
    survivors = [0, 2, 3]
    n = {p: task.num_train(p) for p in survivors}
    for rnd in (1, 2):
        start = {k: v.astype(np.float32) for k, v in x.items()}
        ups = {p: secure_update(task, p, rnd, start) for p in survivors}
        x = {k: start[k].astype(np.float64) + sum(n[p] * ups[p][k] for p in survivors) / sum(n.values()) for k in x}
    step = 8.0 / 2**22 * 4  # clipping_range / quantization_range, a few quantisation steps
    for k in x:
        np.testing.assert_allclose(got[k], x[k], rtol=0, atol=step, err_msg=k)
    whole = run_secure(_secure_task(), rounds=2, per_round=4)
    assert max(float(np.abs(whole[k] - got[k]).max()) for k in x) > 100 * step
    plain = run_plain(task, rounds=2, per_round=4)  # Flower's plain workflow leaves the crashed client out alike
    for k in x:
        np.testing.assert_allclose(plain[k], x[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize(("kw", "match"), [
    (dict(reconstruction_threshold=5), r"reconstruction_threshold=5 with num_shares=1\.0 and per_round=4 asks for 5 "
     r"surviving clients of 4 holding shares; expected a threshold from 2 to 4"),
    (dict(num_shares=2.5), r"num_shares=2\.5 and per_round=4 asks for 6 surviving clients of 4"),
    (dict(reconstruction_threshold=0), r"reconstruction_threshold=0 .*asks for 0 surviving"),
    (dict(reconstruction_threshold=True), r"reconstruction_threshold=True; expected numbers .*not booleans"),
    (dict(num_shares=3, reconstruction_threshold=3), r"reconstruction_threshold=3 .*expected a threshold from 2 to 3|"
     r"must be less than `num_shares`"),
])  # fmt: skip
def test_secure_settings_no_round_can_meet_are_refused_before_any_work(kw, match):
    """Before, a threshold above the clients sampled (an integer 5 of 4; 2.5 x 4 shares -> 6) halted every round and the
    run ended blaming survivors, and an integer threshold of 0 or True was taken. A task whose every client would crash
    proves no round ran: the refusal comes first."""
    task = _secure_task(faults=((0, "crash"), (1, "crash"), (2, "crash"), (3, "crash")))
    with pytest.raises(ValueError, match=match):
        run_secure(task, rounds=1, per_round=4, **kw)


def test_secure_clipping_range_as_a_numpy_number_and_run_plain_of_no_task():
    """``clipping_range=np.float32(8.0)`` is the default 8.0, bit for bit (it was refused as 'not a finite number >
    0'); ``run_plain('x')`` names its argument (an AttributeError on num_clients before)."""
    task = _secure_task()
    a = run_secure(task, rounds=1, per_round=2, clipping_range=np.float32(8.0))
    b = run_secure(task, rounds=1, per_round=2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(TypeError, match=r"run_plain: task is a str; expected a tilestack.federated.Task"):
        run_plain("x", rounds=1, per_round=2)


# ---- FedBN: batch norm never leaves the clients ----------------------------------------------------------------------
def test_fedbn_never_averages_batch_norm_and_each_client_keeps_and_scores_with_its_own_by_name():
    """FedBN over three feature-shifted clients of an MLP with batch norm, two rounds: the global model's ``bn.*``
    arrays (scale, shift, running mean and variance) stay the initial ones bit for bit, the rest is the weighted mean of
    the clients' replayed SGD (round 2's clients start from their own round-1 batch norm), each node's Context holds its
    own round-2 ``bn.*`` arrays by name, and each client's federated evaluation is its own batch norm scored in
    float64."""
    task = Task(dataset="blobs", num_samples=240, num_features=4, num_classes=3, num_clients=3, local_steps=4,
                batch_size=16, lr=0.1, model="mlp", hidden=6, norm=True, feature_shift=1.0, seed=3)  # fmt: skip
    inner = InProcessGrid(tsclient.app, 3)
    models: list = []
    x0 = np_(initial_arrays(task))
    bn = sorted(k for k in x0 if k.startswith("bn."))
    assert bn == ["bn.bias", "bn.running_mean", "bn.running_var", "bn.weight"]
    config = {TASK_KEY: task.to_json()}
    res = run_rounds(FedBN(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=3), ManagedGrid(inner, task),
                     initial_arrays(task), num_rounds=2, train_config=config, evaluate_config=config,
                     extra_metrics=keep(models))  # fmt: skip
    n = {p: task.num_train(p) for p in range(3)}
    local = {p: {} for p in range(3)}  # each client's own bn.* after its last round
    x = x0
    for rnd in (1, 2):
        ys = {p: client_model(task, p, rnd, x | local[p])[0] for p in range(3)}
        local = {p: {k: ys[p][k] for k in bn} for p in range(3)}
        shared = weighted_mean({p: {k: v for k, v in ys[p].items() if k not in bn} for p in range(3)}, n)
        got = models[rnd - 1]
        for k in bn:
            assert np.array_equal(got[k], x0[k]), (rnd, k)
        near({k: v for k, v in got.items() if k not in bn}, shared, ulps=2)
        x = got
        m = res.history.rounds[rnd - 1]
        for p in range(3):
            _, xt, yt = (lambda d: (d[0], d[2], d[3]))(task.client_data(p))
            loss, acc = bn_mlp_scores({k: v for k, v in x.items() if k not in bn} | local[p], xt, yt)
            assert m.client_eval[str(p)]["eval-acc"] == pytest.approx(acc, abs=1e-12)
            assert m.client_eval[str(p)]["eval-loss"] == pytest.approx(loss, rel=1e-5)
    assert len({float(local[p]["bn.running_mean"][0]) for p in range(3)}) == 3  # three different clients' statistics
    for nid, p in inner.partitions.items():
        held = np_(inner.contexts[nid].state["fedbn-local"])
        assert sorted(held) == bn
        for k in bn:
            assert np.array_equal(held[k], local[p][k]), (p, k)


# ---- HeteroFL: two widths, one round ---------------------------------------------------------------------------------
def test_heterofl_two_widths_one_round_each_entry_from_the_clients_that_hold_it():
    """HeteroFL over an MLP of 6 hidden units, client 0 at full width and client 1 at width 0.5 (3 units), one round:
    fc1's first 3 columns (and fc1.bias's first 3, fc2's first 3 rows, all of fc2.bias) are the weighted mean of both
    clients' replayed SGD; fc1's last 3 columns and fc2's last 3 rows are client 0's alone, bit for bit."""
    task = Task(dataset="blobs", num_samples=200, num_features=3, num_classes=3, num_clients=2, local_steps=3,
                batch_size=8, lr=0.2, model="mlp", hidden=6, partitioner="quantity", quantity_sigma=0.7, seed=1)
    width = {0: 1.0, 1: 0.5}
    models: list = []
    simulate(HeteroFL(width_of=width.get, hidden=6, fraction_train=1.0, fraction_evaluate=0.0), task, rounds=1,
             evaluate=False, extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    sub = {"fc1.weight": x["fc1.weight"][:, :3], "fc1.bias": x["fc1.bias"][:3], "fc2.weight": x["fc2.weight"][:3],
           "fc2.bias": x["fc2.bias"]}  # fmt: skip
    y = {0: client_model(task, 0, 1, x)[0], 1: client_model(task, 1, 1, sub)[0]}
    assert y[1]["fc1.weight"].shape == (3, 3)
    n = {p: task.num_train(p) for p in width}
    assert n[0] != n[1]
    near(models[0], heterofl_mean(x, y, n), ulps=2)
    got = models[0]
    assert np.array_equal(got["fc1.weight"][:, 3:], y[0]["fc1.weight"][:, 3:])
    assert np.array_equal(got["fc2.weight"][3:], y[0]["fc2.weight"][3:])
    both = (n[0] * y[0]["fc2.bias"].astype(np.float64) + n[1] * y[1]["fc2.bias"].astype(np.float64)) / (n[0] + n[1])
    np.testing.assert_allclose(got["fc2.bias"], both, rtol=2 * 2**-23)


# ---- SCAFFOLD: control variates after one round ----------------------------------------------------------------------
def test_scaffold_control_variates_after_one_round_against_float64():
    """SCAFFOLD (option II) over three clients of unequal sizes, one round from c = c_i = 0: each node's c_i is
    (x - y_i) / (K lr) of its replayed SGD, the server's c the mean of the c_i changes over all clients (|S| / N = 1),
    the model the weighted mean of the y_i, against float64."""
    task = _task(local_steps=5)
    inner = InProcessGrid(tsclient.app, 3)
    strategy = Scaffold(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=3)
    config = {TASK_KEY: task.to_json()}
    models: list = []
    run_rounds(strategy, ManagedGrid(inner, task), initial_arrays(task), num_rounds=1, train_config=config,
               extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    zero = {k: np.zeros_like(v) for k, v in x.items()}
    out = {p: scaffold_client(task, p, 1, x, zero, zero) for p in range(3)}
    for nid, p in inner.partitions.items():
        ci = np_(inner.contexts[nid].state[tsclient.SCAFFOLD_C])
        y, _, steps = out[p]
        assert steps == 5
        for k in x:
            want = (x[k].astype(np.float64) - y[k].astype(np.float64)) / (5 * 0.1)
            np.testing.assert_allclose(ci[k], want, rtol=1e-5, atol=1e-6, err_msg=(p, k))
    c = strategy.c
    for k in x:
        want = sum(out[p][1][k].astype(np.float64) for p in range(3)) / 3
        np.testing.assert_allclose(np.asarray(c[k]), want, rtol=1e-5, atol=1e-6, err_msg=k)
    near(models[0], weighted_mean({p: out[p][0] for p in range(3)}, {p: task.num_train(p) for p in range(3)}))
