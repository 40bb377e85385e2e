"""Federated scenarios, round 14 (1 of 2): a convex problem whose optima are known — softmax regression over clients of
Dirichlet(0.01) label skew, each stepping on its whole data — where SCAFFOLD, FedAvg and FedProx end is checked
against minimisers found by Newton's method in float64; and HeteroFL's width heterogeneity: a width function checked
for every client before any work, the only full-width client joining late and leaving mid-run beside a client sending
NaN, and a deadline over slow links that cuts the wide sub-models and spares the narrow ones.

tilestack's ClientApp over tilestack's in-process Flower ``Grid`` (``simulate``; ``run_rounds`` with ``ManagedGrid``),
Flower's FedAvg and FedProx and tilestack's Scaffold and HeteroFL. The references are written out in numpy: softmax
regression's loss, gradient and Hessian (``_fl_round14``), FedAvg / FedProx rounds of full-batch gradient descent, the
clients' own SGD replayed (``_fl_round7.client_model``), HeteroFL's per-element mean, a sub-model's ``.npy`` bytes and
the deadline's arithmetic as ``SystemModel`` documents it.

What this round found, fixed:

- *A HeteroFL width that cannot be, for a client sampled late.* ``width_of`` was asked only of the clients each round
  sampled, so a width of 0 (or NaN, 1.5, or a ``KeyError`` for a partition the function forgot) ended the run in the
  first round that sampled that client, after every earlier round's training was done (``fraction_train=0.25`` over 4
  clients: round 7 of 8). Every partition's width is now checked by ``HeteroFL.check_task``, which ``simulate`` and
  ``run_rounds`` run before any work, naming the partition and the value.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _fl_round5 import np_
from _fl_round7 import client_model
from _fl_round9 import keep, near
from _fl_round14 import fedavg_rounds, heterofl_mean, minimiser, npy_bytes
from flwr.serverapp.strategy import FedAvg, FedProx

from tilestack.federated import InProcessGrid, ManagedGrid, SystemModel, Task, codec, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import HeteroFL, Scaffold

ALL = dict(fraction_train=1.0, fraction_evaluate=0.0)


# ---- a convex problem with known optima ---------------------------------------------------------------------------
def _skewed_task(local_steps: int) -> Task:
    """Six clients of Dirichlet(0.01) label skew over 300 points of three overlapping classes (separation 0.6: no line
    separates them, so each weighted loss has one minimiser), every local step on the client's whole data."""
    return Task(dataset="blobs", num_samples=300, num_features=2, num_classes=3, num_clients=6, separation=0.6,
                partitioner="dirichlet", partition_alpha=0.01, batch_size=100_000, local_steps=local_steps,
                lr=0.5)  # fmt: skip


def _data(task: Task):
    xs, ys = zip(*[task.client_data(p)[:2] for p in range(task.num_clients)], strict=True)
    return list(xs), list(ys)


def _start64(task: Task):
    return codec.to_record({k: v.astype(np.float64) for k, v in task.initial_params().items()})


def _distance(model: dict[str, np.ndarray], w: np.ndarray, b: np.ndarray) -> float:
    return max(float(np.abs(model["fc.weight"] - w).max()), float(np.abs(model["fc.bias"] - b).max()))


@pytest.mark.timeout(120)
def test_scaffold_under_dirichlet_001_converges_to_the_minimiser_of_the_unweighted_mean_of_client_losses():
    """Six clients, most holding one class (sizes 1 to 149), 10 full-batch steps each per round, every client every
    round, a float64 model. SCAFFOLD's fixed point has every client's correction c_i equal its gradient and c = the
    mean of the c_i = 0: the minimiser of (1/N) sum_i f_i, the clients' mean losses weighted equally (its server
    averages models by examples, but its control variate by clients). The run reaches that minimiser, found by Newton's
    method in float64 (gradient norm < 1e-15), to 1e-5 in 100 rounds, its distance shrinking all the way; it is 0.6
    away from the minimiser of the pooled loss (examples weighted equally), which the test can tell apart."""
    task = _skewed_task(local_steps=10)
    xs, ys = _data(task)
    sizes = [len(y) for y in ys]
    assert min(sizes) == 1 and max(sizes) > 100  # (the skew the test is about: clients of one example beside many)
    assert sum(np.count_nonzero(np.bincount(y, minlength=3)) == 1 for y in ys) >= 4  # most clients hold one class
    w_u, b_u, g_u = minimiser(xs, ys, [1.0] * task.num_clients, task.num_classes)
    w_p, b_p, g_p = minimiser(xs, ys, sizes, task.num_classes)
    assert g_u < 1e-13 and g_p < 1e-13
    assert _distance({"fc.weight": w_u, "fc.bias": b_u}, w_p, b_p) > 0.3

    models: list = []
    res = simulate(Scaffold(**ALL), task, rounds=100, initial=_start64(task), evaluate=False,
                   extra_metrics=keep(models))  # fmt: skip
    dist = [_distance(m, w_u, b_u) for m in models]
    assert all(m.num_aggregated == task.num_clients for m in res.history.rounds)
    assert np_(res.arrays)["fc.weight"].dtype == np.float64
    assert dist[-1] < 1e-5, dist[-1]
    assert all(dist[i + 10] < dist[i] for i in range(0, 90, 10)), dist[::10]  # steadily, not by chance at the end
    assert _distance(models[-1], w_p, b_p) > 0.3  # not the pooled minimiser


@pytest.mark.timeout(120)
def test_fedavg_and_fedprox_under_dirichlet_001_stop_at_their_drifted_fixed_points_written_out():
    """The same clients under FedAvg and FedProx (mu 1), 10 full-batch steps per round, 40 rounds: each run is its
    rounds of gradient descent written out in float64 (to 1e-10), and both stop short of the minimiser of the pooled
    loss that FedAvg with one local step would reach (client drift: the local steps run towards each client's own
    optimum). FedAvg stays 0.1 away (rounds 30 to 40 move it by < 1e-6: a fixed point, not slowness); the proximal
    term keeps the clients nearer the global model and halves that distance, as the FedProx paper argues."""
    task = _skewed_task(local_steps=10)
    xs, ys = _data(task)
    w_p, b_p, _ = minimiser(xs, ys, [len(y) for y in ys], task.num_classes)
    ends = {}
    for name, strategy, mu in (("fedavg", FedAvg(**ALL), 0.0), ("fedprox", FedProx(**ALL, proximal_mu=1.0), 1.0)):
        models: list = []
        simulate(strategy, task, rounds=40, initial=_start64(task), evaluate=False, extra_metrics=keep(models))
        w, b = fedavg_rounds(xs, ys, rounds=40, steps=10, lr=task.lr, mu=mu, classes=task.num_classes)
        np.testing.assert_allclose(models[-1]["fc.weight"], w, rtol=1e-10, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(models[-1]["fc.bias"], b, rtol=1e-10, atol=1e-12, err_msg=name)
        ends[name] = _distance(models[-1], w_p, b_p)
        if name == "fedavg":
            assert _distance(models[-1], models[29]["fc.weight"], models[29]["fc.bias"]) < 1e-6
    assert ends["fedavg"] > 0.05, ends
    assert ends["fedprox"] < 0.75 * ends["fedavg"], ends


# ---- HeteroFL: widths checked before any work ---------------------------------------------------------------------
def _mlp_task(**kw) -> Task:
    base = dict(dataset="blobs", num_samples=240, num_features=3, num_classes=3, num_clients=4, local_steps=3,
                batch_size=8, lr=0.2, model="mlp", hidden=8)  # fmt: skip
    return Task(**(base | kw))


def _forgets_three(pid: int) -> float:
    return {0: 1.0, 1: 0.5, 2: 0.25}[pid]


BAD_WIDTHS = {  # width_of: (the function, what the error names)
    "0 for the last client": (lambda p: (1.0, 0.5, 0.25, 0.0)[p], "width_of(3) = 0.0"),
    "NaN for one client": (lambda p: math.nan if p == 2 else 1.0, "width_of(2) = nan"),
    "1.5 for one client": (lambda p: 1.5 if p == 1 else 0.5, "width_of(1) = 1.5"),
    "a string": (lambda p: "0.5", "width_of(0) = '0.5'"),
    "a KeyError for a forgotten client": (_forgets_three, "width_of(3) raised KeyError"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(BAD_WIDTHS))
@pytest.mark.parametrize("entry", ["simulate", "run_rounds"])
def test_a_heterofl_width_that_cannot_be_for_any_client_is_refused_before_any_client_trains(case, entry):
    """A quarter of 4 clients sampled per round: the client with the bad width may first be sampled in a late round.
    Before, the run trained round after round and then raised there (round 7 of 8 for the first case; a bare KeyError
    for the forgotten client). Now both entry points refuse it before any client trains, naming the partition and the
    value."""
    fn, named = BAD_WIDTHS[case]
    task = _mlp_task()
    trained: list[int] = []

    def counting(msg, context):
        trained.append(int(context.node_config["partition-id"]))
        return tsclient.train(msg, context)

    strategy = HeteroFL(width_of=fn, hidden=8, fraction_train=0.25, fraction_evaluate=0.0, min_available_nodes=4,
                        min_train_nodes=1)  # fmt: skip
    with pytest.raises(ValueError, match="HeteroFL: ") as info:
        if entry == "simulate":
            simulate(strategy, task, rounds=8, evaluate=False)
        else:
            app = tsclient.ClientApp()
            app.train()(counting)
            grid = ManagedGrid(InProcessGrid(app, task.num_clients), task)
            run_rounds(strategy, grid, initial_arrays(task), num_rounds=8)
    assert named in str(info.value), str(info.value)
    assert "expected" in str(info.value)
    assert trained == []


@pytest.mark.timeout(60)
def test_heterofl_widths_given_as_numpy_numbers_for_every_client_run_as_floats():
    """The same check accepts a width that is a NumPy number (from an array of widths) and the run is the one of the
    same widths as Python floats, bit for bit."""
    task = _mlp_task()
    widths = np.array([1.0, 0.5, 0.25, 0.5], np.float32)
    a = simulate(HeteroFL(width_of=lambda p: widths[p], hidden=8, **ALL), task, rounds=2, evaluate=False)
    b = simulate(HeteroFL(width_of=lambda p: float(widths[p]), hidden=8, **ALL), task, rounds=2, evaluate=False)
    assert all(np.array_equal(x, y) for x, y in zip(np_(a.arrays).values(), np_(b.arrays).values(), strict=True))


# ---- HeteroFL: the wide client comes and goes, a narrow one sends NaN ----------------------------------------------
def _slice(x: dict[str, np.ndarray], h: int) -> dict[str, np.ndarray]:
    """The first ``h`` hidden units of tilestack's MLP, written out (fc1 (D, H) by columns, fc2 (H, C) by rows)."""
    return {"fc1.weight": x["fc1.weight"][:, :h], "fc1.bias": x["fc1.bias"][:h], "fc2.weight": x["fc2.weight"][:h],
            "fc2.bias": x["fc2.bias"]}  # fmt: skip


@pytest.mark.timeout(90)
def test_heterofl_with_its_only_full_width_client_joining_late_and_leaving_is_its_per_element_mean_by_hand():
    """Hidden 8; client 0 alone holds the full width and is online only in rounds 3 and 4 (it joins late and leaves
    mid-run); clients 1 and 3 hold 4 units, client 2 holds 2 units and sends NaN every round. Each round is the
    per-element mean (by training examples) of the replayed clients online and finite, each element over the clients
    whose sub-model holds it: units 4..7 keep their value in rounds 1, 2, 5 and 6 and move only with client 0, and
    client 2's NaN never reaches the model (it is left out, naming the array)."""
    task = _mlp_task(faults=((2, "nan"),))
    width = {0: 1.0, 1: 0.5, 2: 0.25, 3: 0.5}
    online = np.ones((6, 4))
    online[[0, 1, 4, 5], 0] = 0.0  # client 0: rounds 3 and 4 only
    system = SystemModel(4, availability=online)
    models: list = []
    res = simulate(HeteroFL(width_of=width.get, hidden=8, **ALL), task, rounds=6, system=system, evaluate=False,
                   extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    for rnd, got in enumerate(models, start=1):
        m = res.history.rounds[rnd - 1]
        present = [p for p in range(4) if online[rnd - 1, p]]
        assert m.num_online == len(present)
        assert m.excluded.get("2", "").startswith("non-finite"), m.excluded
        replies = {p: client_model(task, p, rnd, _slice(x, round(8 * width[p])))[0] for p in present if p != 2}
        want = heterofl_mean(x, replies, {p: task.num_train(p) for p in replies})
        near(got, want)
        moved = not np.array_equal(got["fc1.weight"][:, 4:], x["fc1.weight"][:, 4:])
        assert moved == (rnd in (3, 4)), rnd  # units only client 0 holds
        assert all(np.all(np.isfinite(v)) for v in got.values())
        x = got


# ---- HeteroFL under a deadline over slow links ----------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_deadline_over_slow_links_times_out_the_full_width_client_cuts_the_half_and_spares_the_quarter():
    """Hidden 64, widths 1, 1/2, 1/4, every link 1000 bytes/s and 10 steps/s, 10 local steps, deadline 3.5 s. Each
    client's sub-model travels as .npy arrays (2316, 1420 and 972 bytes here, counted with numpy), so its download and
    upload take 2 x bytes / bandwidth: the full-width client cannot finish one step (timeout), the half-width one can do
    (3.5 - 2.84) x 10 / 10 of its work (7 steps, 'deadline'), the quarter-width one all of it. The round is HeteroFL's
    mean of the two replayed with that work, the steps and bytes are those, and the simulated time is the slowest kept
    client's (download + steps / speed + upload), capped at the deadline."""
    task = _mlp_task(num_clients=3, hidden=64, local_steps=10)
    width = {0: 1.0, 1: 0.5, 2: 0.25}
    bw, speed, deadline, full = 1000.0, 10.0, 3.5, 10
    system = SystemModel(3, speeds=np.full(3, speed), bandwidths=np.full(3, bw), deadline=deadline)
    models: list = []
    res = simulate(HeteroFL(width_of=width.get, hidden=64, **ALL), task, rounds=1, system=system, evaluate=False,
                   extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    subs = {p: _slice(x, round(64 * width[p])) for p in width}
    down = {p: sum(npy_bytes(a) for a in subs[p].values()) for p in width}
    assert down == {0: 2316, 1: 1420, 2: 972}
    work = {p: min(1.0, (deadline - 2 * down[p] / bw) * speed / full) for p in width}
    assert work[0] * full < 1 and 0 < work[1] < 1 and work[2] == 1.0
    steps = {p: math.ceil(work[p] * full) for p in (1, 2)}
    assert steps == {1: 7, 2: 10}

    m = res.history.rounds[0]
    assert m.excluded == {"0": "timeout"}, m.excluded
    assert m.num_aggregated == 2 and m.steps_done == 17 and m.steps_full == 30
    assert m.bytes_down == down[1] + down[2] and m.bytes_up == down[1] + down[2]  # the replies: same shapes, float32
    durations = [2 * down[p] / bw + steps[p] / speed for p in (1, 2)]
    assert m.sim_time == pytest.approx(min(max(durations), deadline), rel=1e-12)
    replies = {p: client_model(task, p, 1, subs[p], work=work[p])[0] for p in (1, 2)}
    assert {p: client_model(task, p, 1, subs[p], work=work[p])[1] for p in (1, 2)} == steps
    near(models[0], heterofl_mean(x, replies, {p: task.num_train(p) for p in replies}))
    assert np.array_equal(models[0]["fc1.weight"][:, 32:], x["fc1.weight"][:, 32:])  # only client 0 holds them
