"""Federated scenarios, round 16 (2 of 2): server optimisers across a round where no client is online, FedNova over a
device trace whose round deadline cuts one client short and times another out, a round whose aggregation fails with
late updates in flight resumed on the same grid, and a second run on the same grid.

Scripted Flower ClientApps (``_fl_round5.scripted``: each reply written here) and tilestack's ClientApp over
tilestack's in-process Flower ``Grid`` under ``ManagedGrid`` (``simulate``, ``run_rounds``); Flower's FedAvg, FedAdam
and FedYogi, tilestack's FedNova and SCAFFOLD. References: the server's rule written out in float64 over the replies
(``_fl_round16``), the clients' own SGD replayed (``_fl_round7.client_model``), the deadline's share of work as
``SystemModel`` documents it.

What this round found, fixed:

- *A failed round's accounting in the next run.* A round whose aggregation raised left its clients' selection, steps,
  bytes and simulated time in the grid's round log; the run resumed from its checkpoint on the same grid added them to
  its first round's record (``num_selected`` 8 of 4 clients, steps and bytes doubled). A run starting or resuming now
  starts with an empty log (``ManagedGrid.load_state_dict``).

A second run on the same in-process grid with a new strategy starts its clients from empty state
(run_state._fresh_clients; it inherited the first run's SCAFFOLD c_i, residuals and Ditto models before).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _fl_round5 import make_grid, np_, same, scripted, update
from _fl_round7 import client_model
from _fl_round9 import keep, near
from _fl_round14 import npy_bytes
from _fl_round16 import ServerOptimizer, deadline_share, fednova
from flwr.serverapp.strategy import FedAdam, FedAvg, FedYogi

from tilestack.federated import InProcessGrid, ManagedGrid, SystemModel, Task, codec, run_rounds
from tilestack.federated import client as tsclient
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import FedNova, Scaffold

TRAIN_ONLY = dict(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)


# ---- server optimisers across a round with no client online ---------------------------------------------------------
EXAMPLES = {0: 1, 1: 10_000, 2: 37}
NOBODY = [[1, 1, 1], [0, 0, 0], [1, 1, 1], [1, 0, 1]]  # round 2: every client offline; round 4: client 1 away


def _script(pid, rnd, got, ctx, cfg):
    x = got["arrays"]
    return {k: (v.astype(np.float64) + update(pid, rnd, v.shape, np.float64)).astype(v.dtype) for k, v in x.items()}, {
        "num-examples": EXAMPLES[pid]
    }


OPTIMISERS = {
    "FedAdam": (FedAdam, "adam", dict(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)),
    "FedYogi": (FedYogi, "yogi", dict(eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3)),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(OPTIMISERS))
def test_a_server_optimiser_across_a_round_with_no_client_online_keeps_its_moments_and_counts_that_round(name):
    """Three clients of 1, 10,000 and 37 examples; round 2 has none online, round 4 lacks the large one. Round 2 is
    skipped saying why (Flower's sampling would wait forever), nobody is asked, the model and the optimiser's moments
    stay; rounds 1, 3 and 4 are the optimiser's rule written out in float64 over the example-weighted mean of the
    replies, FedAdam's bias correction at the server round (3 and 4, not the 2nd and 3rd update), each rounded once
    to float32. The 1-example client's share in round 4 is 1/38, in round 1 1/10038."""
    cls, kind, hyper = OPTIMISERS[name]
    task = Task(dataset="blobs", num_samples=120, num_features=3, num_classes=2, num_clients=3, local_steps=1)
    x = np_(initial_arrays(task))
    grid = make_grid(scripted(_script), task, system=SystemModel(3, availability=NOBODY))
    models: list = []
    res = run_rounds(cls(**TRAIN_ONLY, **hyper), grid, codec.to_record(x), num_rounds=4, extra_metrics=keep(models))
    rounds = res.history.rounds
    assert [m.num_aggregated for m in rounds] == [3, 0, 3, 2]
    assert [m.num_selected for m in rounds] == [3, 0, 3, 2]
    assert "0 of 3 clients available" in rounds[1].skipped
    assert all(not m.skipped for i, m in enumerate(rounds) if i != 1)
    assert same(codec.to_record(models[1]), codec.to_record(models[0]))
    opt = ServerOptimizer(kind, **hyper)
    for rnd in (1, 3, 4):
        online = [p for p in range(3) if NOBODY[rnd - 1][p]]
        replies = {p: _script(p, rnd, {"arrays": x}, None, None)[0] for p in online}
        total = float(sum(EXAMPLES[p] for p in online))
        mean = {k: sum(EXAMPLES[p] / total * replies[p][k].astype(np.float64) for p in online) for k in x}
        want = opt.step(x, mean, rnd)
        near(models[rnd - 1], want)
        x = models[rnd - 1]
    if kind == "adam":  # the bias correction counts the skipped round: counted by updates, round 4 is another model
        again = ServerOptimizer(kind, **hyper)
        y = np_(initial_arrays(task))
        for count, rnd in enumerate((1, 3, 4), start=1):
            online = [p for p in range(3) if NOBODY[rnd - 1][p]]
            replies = {p: _script(p, rnd, {"arrays": y}, None, None)[0] for p in online}
            total = float(sum(EXAMPLES[p] for p in online))
            y = {k: v.astype(np.float32) for k, v in again.step(
                y, {k: sum(EXAMPLES[p] / total * replies[p][k].astype(np.float64) for p in online) for k in y},
                count).items()}  # fmt: skip
        assert max(float(np.abs(y[k] - models[3][k]).max()) for k in y) > 1e-4


# ---- FedNova over a device trace with a round deadline ---------------------------------------------------------------
STEPS, DEADLINE = 10, 0.1
TRACE = "client,speed,bandwidth\n0,1000,1e9\n1,60,1e9\n2,0.5,1e9\n3,250,1e9\n"  # steps/s, bytes/s


@pytest.mark.timeout(60)
def test_fednova_over_a_trace_whose_deadline_cuts_one_client_and_times_another_out_is_its_rule_by_hand(tmp_path):
    """Four devices from a CSV trace (1000, 60, 0.5 and 250 local steps per second, fast links), 10 local steps, a
    0.1 s round deadline: client 1 can do 6 of its steps (the deadline's share, written out), client 2 not one (left out
    as a timeout), clients 0 and 3 all 10. FedNova normalises each client's update by the steps it did: every round is
    x - tau_eff sum p_i (x - y_i) / tau_i over the clients' own SGD replayed here (client 1 cut to its share), which
    plain FedAvg of the same replies is not; each round is accounted as 26 of 40 steps and 0.1 simulated seconds."""
    path = tmp_path / "devices.csv"
    path.write_text(TRACE)
    system = SystemModel.from_trace(path, deadline=DEADLINE)
    task = Task(dataset="blobs", num_samples=240, num_features=3, num_classes=3, num_clients=4, local_steps=STEPS,
                batch_size=8, lr=0.1, partitioner="dirichlet", partition_alpha=0.5, seed=3)  # fmt: skip
    models: list = []
    res = run_rounds(FedNova(**TRAIN_ONLY), ManagedGrid(InProcessGrid(tsclient.app, 4), task, system=system),
                     initial_arrays(task), num_rounds=3, extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    model_bytes = sum(npy_bytes(v) for v in x.values())
    shares = {p: deadline_share(DEADLINE, model_bytes, 1e9, float(system.speeds[p]), STEPS) for p in range(4)}
    assert shares[2] is None and shares[0] == (1.0, 10) and shares[3] == (1.0, 10)
    assert shares[1][1] == 6 and 0.59 < shares[1][0] < 0.6
    n = {p: task.num_train(p) for p in range(4)}
    for rnd, m in enumerate(res.history.rounds, start=1):
        replies, steps = {}, {}
        for p in (0, 1, 3):
            replies[p], steps[p] = client_model(task, p, rnd, x, work=shares[p][0])
        assert steps == {0: 10, 1: 6, 3: 10}
        near(models[rnd - 1], fednova(x, replies, n, steps))
        plain = {k: sum(n[p] * replies[p][k].astype(np.float64) for p in replies) / sum(n[p] for p in replies)
                 for k in x}  # fmt: skip
        assert max(float(np.abs(plain[k] - models[rnd - 1][k]).max()) for k in x) > 1e-5
        assert m.excluded == {"2": "timeout"}
        assert (m.steps_done, m.steps_full, m.num_aggregated) == (26, 40, 3)
        assert m.sim_time == pytest.approx(DEADLINE, abs=1e-9)
        x = models[rnd - 1]


# ---- a round whose aggregation fails with late updates in flight, resumed on the same grid -------------------------
SPEEDS = np.array([1000.0, 1000.0, 1000.0, 8.0, 5.0, 0.9])  # 6 steps in a 0.5 s deadline: 3 on time, 1 and 2 late


class FailsOnce(FedAvg):
    """FedAvg whose aggregation raises once, in round ``fail`` (a bug in a custom strategy, an out-of-memory)."""

    fail: int | None = None

    def aggregate_train(self, server_round, replies):
        if server_round == FailsOnce.fail:
            FailsOnce.fail = None
            raise MemoryError("aggregation ran out of memory")
        return super().aggregate_train(server_round, replies)


def _stale_grid(task: Task) -> ManagedGrid:
    system = SystemModel(6, speeds=SPEEDS, bandwidths=np.full(6, 1e12), deadline=0.5)
    return ManagedGrid(InProcessGrid(tsclient.app, 6), task, system=system, stragglers="stale")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fail", [2, 3])
def test_a_round_failing_while_late_updates_join_it_resumes_on_the_same_grid_to_the_run_never_failed(fail, tmp_path):
    """Clients 3 and 4 are 1 and 2 rounds late (stragglers='stale'); round 2 (client 3's late update joining) or round
    3 (client 4's) fails in the strategy's aggregation, after the grid handed the late update over. Run again with
    the same checkpoint on the same grid object, the run resumes after the last completed round with the late updates
    in flight as they were then, and ends at the model of the run that never failed, bit for bit, with every round's
    record the same (before the fix, the failed round's selection, steps and bytes were added to the resumed round's:
    8 clients selected of 4)."""
    task = Task(dataset="blobs", num_samples=360, num_features=4, num_classes=3, num_clients=6, local_steps=6,
                batch_size=8, lr=0.1, partitioner="quantity", seed=7)  # fmt: skip
    strategy = dict(fraction_train=1.0, fraction_evaluate=0.5)
    full = run_rounds(FailsOnce(**strategy), _stale_grid(task), initial_arrays(task), num_rounds=4)
    grid, ckpt = _stale_grid(task), tmp_path / "run.ckpt"
    FailsOnce.fail = fail
    with pytest.raises(MemoryError):
        run_rounds(FailsOnce(**strategy), grid, initial_arrays(task), num_rounds=4, checkpoint=ckpt)
    resumed = run_rounds(FailsOnce(**strategy), grid, initial_arrays(task), num_rounds=4, checkpoint=ckpt)
    assert same(full.arrays, resumed.arrays)

    def record(result):
        rounds = result.history.to_dict()["rounds"]
        return json.dumps([{k: v for k, v in r.items() if k != "wall_time"} for r in rounds])

    assert record(resumed) == record(full)
    assert [m.stale for m in full.history.rounds][1:3] == [{"3": 1}, {"4": 2}]
    assert [m.num_selected for m in resumed.history.rounds] == [6, 4, 5, 5]  # the late clients busy


# ---- a second run on the same grid -----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_second_scaffold_run_on_the_same_grid_is_the_run_on_a_fresh_grid():
    """SCAFFOLD run twice from the same initial model on one grid object: the second run should be the first (and the
    run on a fresh grid), every client starting with c_i = 0 as the server starts with c = 0."""
    task = Task(dataset="blobs", num_samples=160, num_features=3, num_classes=2, num_clients=4, local_steps=3, lr=0.1)
    grid = make_grid(tsclient.app, task)
    first = run_rounds(Scaffold(**TRAIN_ONLY), grid, initial_arrays(task), num_rounds=2)
    second = run_rounds(Scaffold(**TRAIN_ONLY), grid, initial_arrays(task), num_rounds=2)
    fresh = run_rounds(Scaffold(**TRAIN_ONLY), make_grid(tsclient.app, task), initial_arrays(task), num_rounds=2)
    assert same(first.arrays, fresh.arrays)
    assert same(second.arrays, fresh.arrays)
