"""Federated scenarios, round 9 (1 of 2): clients that come and go by schedule, and what each client reports.

tilestack's ClientApp (replayed here with ``_fl_round7.client_model``: the same seeded minibatches) or scripted
ClientApps, over tilestack's in-process Flower ``Grid`` under ``ManagedGrid``; the server's rule in float64:

- an availability schedule (``SystemModel(availability=...)``): clients joining late, leaving for rounds and coming
  back; each round samples from, and averages exactly, the clients online;
- rounds with no client online, or fewer than the strategy's minimum: skipped saying so, promptly, the model kept;
- fractional sampling over a random half of the clients online each round, with ``min_available_nodes`` met in some
  rounds and not in others; a selector wrapper over the clients online;
- IFCA with a planted group offline for longer than ``reseed_after``; SCAFFOLD's N with clients offline; a run
  with a schedule resumed from its checkpoint; bad schedules refused;
- per-client training and evaluation metrics, by partition id, in every round's record;
- one client of 1 example beside one of 10,503, weighted by examples or equally.

What this round found, fixed:

- A schedule of client availability could not be expressed (round 8 wrote its own grid for it); and the Flower
  behaviour it needs guarding against was a hang: Flower's ``sample_nodes`` polls once a second until
  ``min_available_nodes`` (2 by default) are connected, so a round with fewer online clients never ended.
  ``SystemModel.availability`` now gives each client's chance of being online per round of a repeating pattern;
  ``ManagedGrid.get_node_ids`` lists the clients online in the round, and ``run_rounds`` skips a round (and its
  federated evaluation) whose strategy needs more nodes than are online, naming the numbers (checks.nodes_short).
  SCAFFOLD's N (``ManagedGrid.population``) stays every node.
- ``run_rounds`` called again with the same ``ManagedGrid`` (a notebook's resume) found it at its last round, listing
  only the clients online then: the checkpoint was refused as another run's. Each call now starts before round 1,
  with no late update of an earlier run in flight (driver.run_rounds).
- IFCA counted a cluster as empty when no reply of the round chose it, and re-seeded it after ``reseed_after`` such
  rounds: a group offline (or not sampled) that long came back to a cluster re-seeded next to another group's, and
  scored 0.1-0.35 where it had scored 0.85-1. Only a cluster that no client holds as its last choice is empty now
  (strategies.ifca.IFCA.aggregate_train).
- The quantity partitioner's spread was fixed (lognormal sigma 1): a split of 1 example beside 10,000 could not be
  asked for. ``Task.quantity_sigma`` sets it (task._blobs).
- Each client's own metrics (its training loss and steps, its evaluation accuracy on its own test split) were
  computed and thrown away: ``RoundMetrics`` kept only the strategy's weighted means and the distribution of
  accuracies, not who scored what. They are now in ``RoundMetrics.client_train`` and ``client_eval``, by partition
  id (grid.ManagedGrid.send_and_receive), and saved with the history.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _fl_round5 import blobs, np_, scripted, update
from _fl_round7 import client_model, weighted_mean
from _fl_round9 import keep, near, online_sets
from flwr.serverapp.strategy import FedAvg, strategy_utils

from tilestack.errors import FederatedError
from tilestack.federated import History, ManagedGrid, SystemModel, Task, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.engine import InProcessGrid
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import RandomSelector, Scaffold, Selected

UNIT = tsclient.UNIT_WEIGHT


def _task(**kw) -> Task:
    return Task(**{**dict(dataset="blobs", num_samples=300, num_features=4, num_classes=3, num_clients=6,
                          local_epochs=1.0, batch_size=8, lr=0.1, partitioner="quantity", seed=2), **kw})  # fmt: skip


def _grid(task: Task, system: SystemModel) -> ManagedGrid:
    return ManagedGrid(InProcessGrid(tsclient.app, task.num_clients), task, system=system)


def _short(online: int, need: int, phase: str, *, avail: int = 2, least: int = 2, total: int = 6) -> str:
    return (f"{online} of {total} clients available (the others offline by the system's availability or busy with "
            f"late work); FedAvg samples its {phase} nodes from at least {need} (min_available_nodes={avail}, "
            f"min_{phase}_nodes={least}), and Flower's sampling would wait for nodes that do not come this "
            "round")  # fmt: skip


# ---- an availability schedule: joining late, leaving and coming back ------------------------------------------------
@pytest.mark.timeout(60)
def test_clients_joining_and_leaving_on_a_schedule_are_sampled_and_averaged_only_while_online():
    """Six clients of unequal sizes, FedAvg over every node online, five rounds: client 5 joins in round 3, client 3
    is away in rounds 2-3, client 1 only every other round from round 2. Each round samples exactly the clients
    online (nobody offline is messaged, so nobody is 'excluded'), its model is their example-weighted mean replayed
    from the round before (a late joiner starts from the current model), and each client's own training and
    evaluation metrics are on record by partition id: the examples it holds, the steps it did, its own accuracy, of
    which the strategy's eval-acc is the test-example-weighted mean."""
    task = _task()
    online = {1: {0, 1, 2, 3, 4}, 2: {0, 2, 4}, 3: {0, 1, 2, 4, 5}, 4: {0, 2, 3, 4, 5}, 5: set(range(6))}
    pattern = np.array([[p in online[r] for p in range(6)] for r in range(1, 6)], float)  # (5 rounds, 6 clients)
    grid = _grid(task, SystemModel(6, availability=pattern))
    assert online_sets(grid, 5) == online
    models: list[dict[str, np.ndarray]] = []
    res = run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=1.0), grid, initial_arrays(task), num_rounds=5,
                     extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    for rnd, r in enumerate(res.history.rounds, start=1):
        there = online[rnd]
        near(models[rnd - 1], weighted_mean({p: client_model(task, p, rnd, x)[0] for p in there},
                                            {p: task.num_train(p) for p in there}))  # fmt: skip
        x = models[rnd - 1]
        assert (r.num_online, r.num_selected, r.num_aggregated) == (len(there),) * 3
        assert not r.excluded and not r.skipped
        assert set(r.client_train) == set(r.client_eval) == {str(p) for p in there}
        for p in there:
            mine = r.client_train[str(p)]
            assert (mine["num-examples"], mine["num-steps"]) == (task.num_train(p), task.steps_for(p))
            assert r.client_eval[str(p)]["num-examples"] == len(task.client_data(p)[3])
        m = {p: r.client_eval[p]["num-examples"] for p in r.client_eval}
        accs = {p: r.client_eval[p]["eval-acc"] for p in r.client_eval}
        weighted = sum(accs[p] * m[p] for p in m) / sum(m.values())
        assert r.eval_metrics["eval-acc"] == pytest.approx(weighted, abs=1e-12)
        assert r.client_acc["mean"] == pytest.approx(np.mean(list(accs.values())), abs=1e-12)
    back = History.from_dict(json.loads(json.dumps(res.history.to_dict())))  # the per-client record is saved too
    assert [b.client_eval for b in back.rounds] == [r.client_eval for r in res.history.rounds]
    first, last = res.history.rounds[0], res.history.rounds[-1]
    assert last.eval_metrics["eval-acc"] > first.eval_metrics["eval-acc"]


# ---- rounds with nobody, or too few, online --------------------------------------------------------------------------
def _no_poll(seconds: float) -> None:
    raise AssertionError(f"Flower's sample_nodes waited {seconds} s for nodes: the run would hang")


@pytest.mark.timeout(30)
def test_rounds_with_no_client_or_too_few_online_are_skipped_promptly_and_the_model_is_kept(monkeypatch):
    """Rounds 2 and 3 have no client and one client online. Under FedAvg's defaults (min_available_nodes=2), Flower's
    sampling polls once a second for nodes that never come: the run hung. Now both rounds are skipped at once with
    the numbers named, their evaluation too, the model stays as round 1 left it, and round 4 trains from it. With
    minimums of 1 the one online client trains alone in round 3 (the model is its model); with minimums of 0 the
    empty round samples nobody."""
    task = _task(local_steps=3)
    pattern = np.ones((4, 6))
    pattern[1] = 0
    pattern[2, 1:] = 0  # round 3: client 0 alone
    # promptly: Flower's sampling never polls for nodes (its one-second wait, the hang, refused here as it starts;
    # a bound on wall time instead moved with the load of CI's machine)
    monkeypatch.setattr(strategy_utils, "sleep", _no_poll)
    models: list[dict[str, np.ndarray]] = []
    res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=1.0), task, rounds=4, evaluate=False,
                   system=SystemModel(6, availability=pattern), extra_metrics=keep(models))  # fmt: skip
    r1, r2, r3, r4 = res.history.rounds
    assert r2.skipped == _short(0, 2, "train") and r3.skipped == _short(1, 2, "train")
    for r in (r2, r3):
        assert (r.num_selected, r.num_aggregated, r.steps_done) == (0, 0, 0)
        assert not r.client_train and not r.client_eval and not r.eval_metrics and not r.client_acc
    assert [r.num_online for r in res.history.rounds] == [6, 0, 1, 6]
    for k in models[0]:
        assert np.array_equal(models[1][k], models[0][k]) and np.array_equal(models[2][k], models[0][k])
    n = {p: task.num_train(p) for p in range(6)}
    near(models[3], weighted_mean({p: client_model(task, p, 4, models[2])[0] for p in range(6)}, n))
    assert r4.num_aggregated == 6 and r4.client_acc

    ones = dict(min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1)
    models = []
    res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=1.0, **ones), task, rounds=3, evaluate=False,
                   system=SystemModel(6, availability=pattern), extra_metrics=keep(models))  # fmt: skip
    assert res.history.rounds[1].skipped == _short(0, 1, "train", avail=1, least=1)
    assert res.history.rounds[2].num_aggregated == 1 and set(res.history.rounds[2].client_eval) == {"0"}
    near(models[2], client_model(task, 0, 3, models[1])[0], ulps=0)
    zeros = dict(min_available_nodes=0, min_train_nodes=0, min_evaluate_nodes=0)
    res = simulate(FedAvg(fraction_train=0.5, fraction_evaluate=0.5, **zeros), task, rounds=3, evaluate=False,
                   system=SystemModel(6, availability=pattern))  # fmt: skip
    assert res.history.rounds[1].skipped == "no clients were sampled for training"
    assert res.history.rounds[2].skipped == "no clients were sampled for training"  # int(1 x 0.5) = 0 of 1 online


@pytest.mark.timeout(60)
def test_fractional_sampling_over_a_random_half_online_meets_min_available_in_some_rounds_only():
    """Ten clients each online with chance 1/2 every round (seeded per round and client), FedAvg sampling half of the
    online clients for training (at least 2) and 30% for evaluation (at least 1), min_available_nodes=4, ten rounds.
    A round with fewer than 4 online is skipped naming both numbers; every other one trains max(int(online / 2), 2)
    clients and evaluates max(int(0.3 online), 1), all online ones. The draws repeat under the same seed and differ
    under another."""
    task = _task(num_clients=10, num_samples=400, local_steps=2)
    system = SystemModel(10, availability=np.full(10, 0.5), seed=3)
    grid = _grid(task, system)
    online = online_sets(grid, 10)
    assert online == online_sets(_grid(task, SystemModel(10, availability=np.full(10, 0.5), seed=3)), 10)
    assert online != online_sets(_grid(task, SystemModel(10, availability=np.full(10, 0.5), seed=4)), 10)
    s = FedAvg(fraction_train=0.5, fraction_evaluate=0.3, min_available_nodes=4, min_train_nodes=2,
               min_evaluate_nodes=1)  # fmt: skip
    res = run_rounds(s, grid, initial_arrays(task), num_rounds=10)
    counts = [len(online[r]) for r in range(1, 11)]
    assert min(counts) < 4 <= max(counts)  # both kinds of round happen
    for rnd, r in enumerate(res.history.rounds, start=1):
        k = len(online[rnd])
        assert r.num_online == k
        if k < 4:
            assert r.skipped == _short(k, 4, "train", avail=4, total=10)
            assert not r.client_train and not r.client_eval
            continue
        assert not r.skipped and r.num_selected == r.num_aggregated == max(k // 2, 2)
        assert {int(p) for p in r.client_train} <= online[rnd]
        assert len(r.client_eval) == max(int(k * 0.3), 1) and {int(p) for p in r.client_eval} <= online[rnd]


@pytest.mark.timeout(60)
def test_a_selector_wrapper_picks_among_the_online_clients_and_skips_when_too_few_are_online():
    """Selected(FedAvg(min 3), RandomSelector, per_round=3) over eight clients: with two online the wrapped FedAvg,
    shown only what the selector can pick, would wait for a third forever; the round is skipped naming its 3. With
    five online, three of them train."""
    task = _task(num_clients=8, num_samples=320, local_steps=2)
    pattern = np.ones((3, 8))
    pattern[1, 2:] = 0  # round 2: clients 0 and 1
    pattern[2, :3] = 0  # round 3: clients 3-7
    s = Selected(FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3),
                 RandomSelector(seed=1), per_round=3)  # fmt: skip
    res = run_rounds(s, _grid(task, SystemModel(8, availability=pattern)), initial_arrays(task), num_rounds=3)
    r1, r2, r3 = res.history.rounds
    assert r1.num_aggregated == 3 and r2.skipped == _short(2, 3, "train", avail=3, least=3, total=8)
    assert r3.num_aggregated == 3 and {int(p) for p in r3.client_train} <= {3, 4, 5, 6, 7}


# ---- a clustered population whose one group goes offline ------------------------------------------------------------
@pytest.mark.timeout(60)
def test_ifca_keeps_the_cluster_of_a_group_that_is_offline_for_longer_than_reseed_after():
    """Two planted groups (even and odd clients), IFCA with two clusters and reseed_after=3; the odd group is offline
    in rounds 4-8. Before, a cluster nobody chose in the round's replies counted as empty: in round 6 the odd group's
    cluster was re-seeded next to the even group's, and back in round 9 the odd clients scored 0.1-0.35 (from 0.85-1).
    A cluster that clients still hold (their last choice) is not empty: its model stays exactly as the odd group left
    it while they are away, and they come back to it."""
    from tilestack.federated.strategies import IFCA

    task = Task(dataset="clustered", num_clients=8, groups=2, num_features=10, num_classes=3, local_steps=10, lr=0.1,
                samples_per_client=100)  # fmt: skip
    pattern = np.ones((10, 8))
    pattern[3:8, 1::2] = 0
    s = IFCA(num_clusters=2, reseed_after=3, fraction_train=1.0, fraction_evaluate=1.0)
    models: list[dict[str, np.ndarray]] = []
    res = simulate(s, task, rounds=10, system=SystemModel(8, availability=pattern), extra_metrics=keep(models))
    odd = s.assignments[1]
    assert {s.assignments[p] for p in range(1, 8, 2)} == {odd}
    assert {s.assignments[p] for p in range(0, 8, 2)} == {1 - odd}
    for rnd in range(4, 9):  # rounds 4-8: the odd group's cluster as round 3 left it
        for k, v in models[2].items():
            if k.startswith(f"cluster{odd}/"):
                assert np.array_equal(models[rnd - 1][k], v), (rnd, k)
    back = res.history.rounds[8]
    assert min(back.client_eval[str(p)]["eval-acc"] for p in range(1, 8, 2)) >= 0.8
    assert s.agreement(task) == 1.0


# ---- SCAFFOLD's N, and resuming --------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_scaffold_divides_by_every_client_not_by_those_online():
    """SCAFFOLD's server control variate moves by |S| / N times the mean of the replies' control-variate changes, N
    every client of the run. With three of six clients online, N must stay 6 (the grid lists only the online ones
    to the strategy): c after two rounds is the hand-computed sum of 3/6 of each round's mean change."""
    task = blobs(6, features=3)
    pattern = np.ones((2, 6))
    pattern[:, 3:] = 0

    def script(pid, rnd, got, context, config):
        dc = {k: update(pid, rnd, v.shape, np.float32) for k, v in got[tsclient.SCAFFOLD_C].items()}
        model = {k: v + 0.01 * update(pid, rnd, v.shape, np.float32) for k, v in got["arrays"].items()}
        return model | {tsclient.SCAFFOLD_DC_PREFIX + k: v for k, v in dc.items()}, {}

    s = Scaffold(fraction_train=1.0, fraction_evaluate=0.0)
    grid = ManagedGrid(InProcessGrid(scripted(script), 6), task, system=SystemModel(6, availability=pattern))
    run_rounds(s, grid, initial_arrays(task), num_rounds=2)
    c = {k: np.zeros(v.shape) for k, v in np_(initial_arrays(task)).items()}
    for rnd in (1, 2):
        c = {k: v + 3 / 6 * np.mean([update(p, rnd, v.shape, np.float32).astype(np.float64) for p in range(3)],
                                    axis=0) for k, v in c.items()}  # fmt: skip
    for k, v in s.c.items():
        np.testing.assert_allclose(v, c[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert grid.population == 6 and len(list(grid.get_node_ids())) == 3


@pytest.mark.timeout(60)
def test_a_scheduled_run_resumed_from_its_checkpoint_equals_the_run_never_stopped(tmp_path):
    """A Dirichlet(0.3) run with a random availability pattern (chances 0.2 to 1), a crashing client, FedAvg with
    min_available_nodes=3, six rounds: stopped after round 2 and resumed, it ends at the uninterrupted run's model
    and rounds (skips, online counts and per-client records included). Resuming it under another schedule, or
    with another local_steps, is refused naming just what differs (before, the first 160 characters of the system
    model's fields or of the task's JSON, where the difference was not)."""
    task = _task(partitioner="dirichlet", partition_alpha=0.3, faults=((2, "crash"),), local_steps=3)
    pattern = np.random.default_rng(0).uniform(0.2, 1.0, (3, 6))

    def run(ckpt=None, stop_after=None, pattern=pattern, task=task):
        s = FedAvg(fraction_train=0.8, fraction_evaluate=0.5, min_available_nodes=3)
        return simulate(s, task, rounds=6, system=SystemModel(6, availability=pattern, seed=1), checkpoint=ckpt,
                        stop_after=stop_after)  # fmt: skip

    full = run()
    assert any(r.skipped for r in full.history.rounds) and any(r.num_aggregated for r in full.history.rounds)
    ckpt = tmp_path / "run.ckpt"
    run(ckpt, stop_after=2)
    resumed = run(ckpt)
    for k, v in np_(full.arrays).items():
        assert np.array_equal(np_(resumed.arrays)[k], v), k

    def plain(h):
        return [{k: v for k, v in r.items() if k != "wall_time"} for r in h.to_dict()["rounds"]]

    assert json.dumps(plain(resumed.history)) == json.dumps(plain(full.history))
    with pytest.raises(FederatedError, match=r"belongs to another run \(system: .*'availability \(sha256\)'"):
        run(ckpt, pattern=pattern[::-1])
    # the task's field that differs is named, not the first 160 characters of its JSON
    with pytest.raises(FederatedError, match=r"\(task: checkpoint has \{'local_steps': 3\}, this run has "
                                             r"\{'local_steps': 4\}\)"):  # fmt: skip
        run(ckpt, task=_task(partitioner="dirichlet", partition_alpha=0.3, faults=((2, "crash"),), local_steps=4))


# ---- one example beside ten thousand -------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("weighted_by", ["num-examples", UNIT])
def test_one_example_beside_ten_thousand_is_weighted_exactly_and_reported_per_client(weighted_by):
    """Eight clients of quantity skew with quantity_sigma=6: 1 training example beside 10,503. Three rounds of FedAvg,
    weighted by examples (the big client dominates) or equally (the 1-example client counts as much): each model is
    the replayed mean under those weights; every client's own metrics, the 1-example one's too, are on record;
    the test accuracy passes 0.8. Before, the quantity partitioner's spread was fixed (lognormal sigma 1: eight
    clients within about 6x of each other) and no such split could be asked for (Task.quantity_sigma)."""
    task = _task(num_samples=15000, num_features=5, num_clients=8, quantity_sigma=6.0, local_steps=5, batch_size=16)
    n = {p: task.num_train(p) for p in range(8)}
    assert min(n.values()) == 1 and max(n.values()) > 10_000
    weights = n if weighted_by == "num-examples" else dict.fromkeys(range(8), 1)
    models: list[dict[str, np.ndarray]] = []
    res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=1.0, weighted_by_key=weighted_by), task, rounds=3,
                   extra_metrics=keep(models))  # fmt: skip
    x = np_(initial_arrays(task))
    for rnd, r in enumerate(res.history.rounds, start=1):
        near(models[rnd - 1], weighted_mean({p: client_model(task, p, rnd, x)[0] for p in range(8)}, weights))
        x = models[rnd - 1]
        assert {int(p): c["num-examples"] for p, c in r.client_train.items()} == n
        tiny = min(n, key=n.get)
        assert r.client_eval[str(tiny)]["num-examples"] == 1 and r.client_eval[str(tiny)]["eval-acc"] in (0.0, 1.0)
    assert res.history.rounds[-1].test_acc > 0.8
    with pytest.raises(ValueError, match=r"Task: quantity_sigma=-1.0; expected >= 0"):
        _task(quantity_sigma=-1.0)


@pytest.mark.timeout(60)
def test_the_same_grid_object_stopped_and_resumed_under_a_schedule_equals_the_run_never_stopped(tmp_path):
    """A notebook keeps its ManagedGrid: run_rounds stops after round 2 (a round with half the clients offline) and is
    called again with the same grid and checkpoint. Before, the grid was still at round 2, listing only its online
    clients: the resume was refused as another run ("nodes: checkpoint has 6, this run has 3"). Now every call starts
    from all nodes before round 1, and the resumed run equals one never stopped."""
    task = _task(local_steps=3)
    pattern = np.ones((4, 6))
    pattern[1, :3] = 0

    def grid():
        return _grid(task, SystemModel(6, availability=pattern))

    def strategy():
        return FedAvg(fraction_train=1.0, fraction_evaluate=0.5)

    full = run_rounds(strategy(), grid(), initial_arrays(task), num_rounds=4)
    kept, ckpt = grid(), tmp_path / "run.ckpt"
    run_rounds(strategy(), kept, initial_arrays(task), num_rounds=4, checkpoint=ckpt, stop_after=2)
    resumed = run_rounds(strategy(), kept, initial_arrays(task), num_rounds=4, checkpoint=ckpt)
    for k, v in np_(full.arrays).items():
        assert np.array_equal(np_(resumed.arrays)[k], v), k
    assert [r.num_online for r in resumed.history.rounds] == [6, 3, 6, 6]


# ---- schedules that cannot be right ----------------------------------------------------------------------------------
@pytest.mark.parametrize("availability, needle", [
    (np.ones((3, 5)), r"availability has shape \(3, 5\); expected \(rounds of the pattern >= 1, num_clients=6\)"),
    (np.ones((0, 6)), r"availability has shape \(0, 6\); expected \(rounds of the pattern >= 1"),
    (np.ones((2, 3, 6)), r"availability has shape \(2, 3, 6\)"),
    ([[1, 1, 1, 1, 1, 1.5]], r"availability holds 1.5 \(row 0, client 5\); expected each client's chance of being "
                             r"online in \[0, 1\]"),
    ([[1, 1, 1, 1, 1, float("nan")]], r"availability holds nan \(row 0, client 5\); expected"),
    ([[-0.1] * 6], r"availability holds -0.1 \(row 0, client 0\)"),
    ([["yes"] * 6], r"availability is not an array of numbers .*; expected \(rounds of the pattern, num_clients=6\)"),
])  # fmt: skip
def test_an_availability_pattern_that_cannot_be_right_is_refused_naming_it(availability, needle):
    """A pattern of the wrong width (another client count), with no rounds, of three axes, a chance outside [0, 1]
    or NaN, or not numbers: refused when the system model is made, before any run, naming what was given."""
    with pytest.raises(ValueError, match=r"SystemModel: " + needle):
        SystemModel(6, availability=availability)
    one_row = SystemModel(6, availability=np.ones(6))  # a single row: the same every round
    assert one_row.availability.shape == (1, 6) and one_row.online(7).all()
