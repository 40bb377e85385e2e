"""Federated scenarios, round 9 (3 of 3): slow clients whose updates arrive rounds late, weighted by staleness.

tilestack's ClientApp over tilestack's in-process Flower ``Grid`` under a ``SystemModel`` of mixed speeds and a
round deadline, with ``stragglers='stale'``; each round written out from the run's own models
(``_fl_round9.replay_stale``, with ``_fl_round7.client_model``'s seeded minibatches):

- clients 1.5 and 2.4 deadlines slow: each trains in full and its update joins the round its work ends in, moved
  onto that round's model and weighted by (1 + rounds late) ** -a; busy until then, so not sampled; a client past
  ``max_staleness`` is left out saying so;
- the same with compressed updates (top-k): the late update arrives as sent;
- a late client offline when its work is done: it uploads once back (staleness grows), or is lost past the bound;
- a run stopped with late updates in flight and resumed from its checkpoint: nothing lost;
- on digits, slow clients holding classes nobody else has: late work keeps those classes, dropping it loses them;
- settings under which late updates cannot be right are refused before any client trains;
- on Flower's Simulation Engine (Ray): the same model and the same record as in-process (marked slow).

What this round found, fixed: a client cut by the deadline could only do partial work or be dropped; semi-
asynchronous training (FedBuff, FedAsync's staleness weights), which a user with slow devices expects, was missing.
``stragglers='stale'`` (grid.ManagedGrid, staleness.rebased, with ``staleness_exponent`` and ``max_staleness`` on
``simulate`` and ``ManagedGrid``) adds it; ``RoundMetrics.stale`` says which late updates joined each round, and
the late updates in flight are part of the checkpoint (driver.run_rounds); ``tilestack fl run`` takes
``--straggler-policy stale --staleness-exponent --max-staleness``.

Also fixed: on Flower's engine a round's record (the order of ``excluded`` and of the late updates held back) came
in the order Flower's workers finished, so two runs of the same seed saved different histories now and then; the
grid now takes replies in partition order (grid.ManagedGrid.send_and_receive).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from _fl_round5 import blobs, np_, scripted
from _fl_round9 import keep, near, replay_stale
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from tilestack.errors import FederatedError
from tilestack.federated import Evaluator, ManagedGrid, SystemModel, Task, run_rounds, simulate
from tilestack.federated import client as tsclient
from tilestack.federated.compression import Compressed
from tilestack.federated.engine import InProcessGrid
from tilestack.federated.simulation import initial_arrays
from tilestack.federated.strategies import HeteroFL, Scaffold

STEPS, DEADLINE = 6, 0.5
# steps per second: three on time, one 1.5 deadlines long (1 round late), one 2.4 (2 late), one 13.3 (past 4)
SPEEDS = np.array([1000.0, 1000.0, 1000.0, 8.0, 5.0, 0.9])
LATE_BY = {3: 1, 4: 2}


def _task(**kw) -> Task:
    return Task(**{**dict(dataset="blobs", num_samples=360, num_features=4, num_classes=3, num_clients=6,
                          local_steps=STEPS, batch_size=8, lr=0.1, partitioner="quantity", seed=7), **kw})  # fmt: skip


def _system(n: int = 6, speeds=SPEEDS) -> SystemModel:
    return SystemModel(n, speeds=speeds, bandwidths=np.full(n, 1e12), deadline=DEADLINE)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("exponent", [0.5, 0.0])
def test_late_updates_join_the_round_their_work_ends_in_moved_onto_its_model_and_weighted_by_staleness(exponent):
    """Six clients, FedAvg over all idle ones, six rounds, a 0.5 s deadline: clients 0-2 finish in time, client 3
    needs 0.75 s (its update joins 1 round later), client 4 1.2 s (2 rounds later), client 5 6.7 s (13 rounds: past
    max_staleness=4, left out). Each round's model is, written out by hand, the weighted mean of the on-time models
    and of each late update y - x0 (x0 the model it trained from) added to the round's starting model, weighted by
    examples x (1 + rounds late) ** -exponent; a late client is busy (not sampled) until its update is in. The record
    says which late updates joined each round, and why the others were left out."""
    task = _task()
    models: list[dict[str, np.ndarray]] = []
    res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=6, system=_system(),
                   stragglers="stale", staleness_exponent=exponent, extra_metrics=keep(models))  # fmt: skip
    want = replay_stale(task, np_(initial_arrays(task)), models, LATE_BY, exponent, out_of_time=frozenset({5}))
    assert [w["joined"] for w in want] == [[], [3], [4], [3], [], [3, 4]]  # the schedule the test is about
    for rnd, (r, w) in enumerate(zip(res.history.rounds, want, strict=True), start=1):
        near(models[rnd - 1], w["model"])
        assert r.stale == {str(p): LATE_BY[p] for p in w["joined"]}
        assert r.num_online == len(w["idle"]) and r.num_selected == len(w["idle"])
        assert r.num_aggregated == len([p for p in w["idle"] if p < 3]) + len(w["joined"])
        assert r.excluded["5"] == "deadline: its update would arrive 13 rounds late, past max_staleness=4"
        for p in set(w["idle"]) & set(LATE_BY):  # started this round: in flight
            due = rnd + LATE_BY[p]
            assert r.excluded[str(p)] == f"late: its update arrives in round {due} (staleness {LATE_BY[p]})"
        assert r.steps_done == STEPS * r.num_aggregated and set(r.client_train) == {
            str(p) for p in w["idle"] if p < 3} | {str(p) for p in w["joined"]}  # fmt: skip
        assert r.sim_time == DEADLINE  # the round ends at the deadline, the late clients still working
    assert res.history.rounds[-1].test_loss < res.history.rounds[0].test_loss


@pytest.mark.timeout(60)
def test_late_compressed_updates_arrive_as_sent_onto_the_current_model():
    """Top-k updates keeping every element (ratio 1): an update is y - x0 in float32, which Compressed adds to the
    model of the round it joins; a late one must be added to that round's model too, not the model it was computed
    from. Four rounds written out as above, from the float32 updates."""
    task = _task()
    models: list[dict[str, np.ndarray]] = []
    s = Compressed(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), "topk", 1.0)
    simulate(s, task, rounds=4, system=_system(), stragglers="stale", extra_metrics=keep(models))
    want = replay_stale(task, np_(initial_arrays(task)), models, LATE_BY, 0.5, out_of_time=frozenset({5}))
    for rnd in range(1, 5):
        near(models[rnd - 1], want[rnd - 1]["model"], ulps=4)


@pytest.mark.timeout(60)
def test_a_late_client_offline_when_its_work_is_done_uploads_once_back_or_is_lost_past_max_staleness():
    """Client 3's work (1 round late) ends in round 2, when it is offline. With max_staleness=4 it uploads in round 4,
    its first round back, at staleness 3 (weighted (1 + 3) ** -0.5), moved onto round 4's model; with max_staleness=2
    it is lost in round 3, saying so. Rounds written out by hand from the run's models."""
    task = _task()
    pattern = np.ones((4, 6))
    pattern[1:3, 3] = 0  # client 3 offline in rounds 2 and 3
    speeds = SPEEDS.copy()
    speeds[4:] = 1000.0  # only client 3 is slow here
    system = SystemModel(6, speeds=speeds, bandwidths=np.full(6, 1e12), deadline=DEADLINE, availability=pattern)
    for most, joins in ((4, 4), (2, None)):
        models: list[dict[str, np.ndarray]] = []
        res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=4, system=system,
                       stragglers="stale", max_staleness=most, extra_metrics=keep(models))  # fmt: skip
        stale = [r.stale for r in res.history.rounds]
        if joins:
            assert stale == [{}, {}, {}, {"3": 3}]
            want = replay_stale(task, np_(initial_arrays(task)), models, {3: 3}, 0.5)  # 3 rounds late, as it came
            near(models[3], want[3]["model"])
        else:
            assert stale == [{}, {}, {}, {}]
            lost = "late: its update from round 1 is lost, offline until past max_staleness=2"
            assert res.history.rounds[2].excluded == {"3": lost}
            assert res.history.rounds[3].excluded["3"].startswith("late: its update arrives in round 5")  # again


@pytest.mark.timeout(60)
def test_a_run_stopped_with_late_updates_in_flight_resumes_with_nothing_lost(tmp_path):
    """Stopped after round 1 (clients 3 and 4 still training, their updates due in rounds 2 and 3) and again after
    round 4, then resumed from the checkpoint: the model and every round's record equal the run never stopped, the
    late updates of round 1 included."""
    task = _task()

    def run(ckpt=None, stop_after=None):
        return simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.5), task, rounds=6, system=_system(),
                        stragglers="stale", checkpoint=ckpt, stop_after=stop_after)  # fmt: skip

    full = run()
    ckpt = tmp_path / "run.ckpt"
    first = run(ckpt, stop_after=1)
    assert "late" in first.history.rounds[0].excluded["3"] and "late" in first.history.rounds[0].excluded["4"]
    run(ckpt, stop_after=3)
    resumed = run(ckpt)
    for k, v in np_(full.arrays).items():
        assert np.array_equal(np_(resumed.arrays)[k], v), k

    def plain(h):
        return [{k: v for k, v in r.items() if k != "wall_time"} for r in h.to_dict()["rounds"]]

    assert json.dumps(plain(resumed.history)) == json.dumps(plain(full.history))
    assert [r.stale for r in resumed.history.rounds][1:3] == [{"3": 1}, {"4": 2}]
    with pytest.raises(FederatedError, match=r"staleness_exponent"):
        simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.5), task, rounds=6, system=_system(),
                 stragglers="stale", staleness_exponent=1.0, checkpoint=ckpt)  # fmt: skip


@pytest.mark.timeout(60)
def test_on_digits_late_work_from_slow_clients_counts_for_more_than_dropping_it():
    """Digits over ten clients of two shards each; the four clients holding the digits 0 and 4 (nobody else has them)
    are slow: 5 steps at 6 steps/s, 0.83 s against a 0.5 s deadline. Eight rounds of FedAvg under each policy:
    dropping them never learns what only they hold; their late updates do better, overall and on their own test
    data; partial work, which keeps them in every round, does best (while they are busy, the rounds average the
    other clients alone, which pull the digits 0 and 4 back)."""
    task = Task(dataset="digits", num_clients=10, model="logreg", partitioner="shards", classes_per_client=2,
                local_steps=5, batch_size=16, lr=0.1)  # fmt: skip
    classes = {p: set(np.unique(np.concatenate(task.client_data(p)[1::2])).tolist()) for p in range(10)}
    slow = [p for p in range(10) if classes[p] & {0, 4}]
    assert len(slow) == 4 and not set().union(*(classes[p] for p in range(10) if p not in slow)) & {0, 4}
    speeds = np.full(10, 1000.0)
    speeds[slow] = 6.0
    system = SystemModel(10, speeds=speeds, bandwidths=np.full(10, 1e12), deadline=DEADLINE)
    kw = dict(fraction_train=1.0, fraction_evaluate=0.0)
    runs = {p: simulate(FedAvg(**kw), task, rounds=8, system=system, stragglers=p)
            for p in ("drop", "stale", "partial")}  # fmt: skip
    assert all(r.stale == dict.fromkeys(map(str, slow), 1) for r in runs["stale"].history.rounds[1::2])
    acc = {p: runs[p].history.rounds[-1].test_acc for p in runs}
    evaluator = Evaluator(task)
    on_slow = {p: np.mean([evaluator.client_accuracies(runs[p].arrays)[c] for c in slow]) for p in runs}
    assert acc["drop"] + 0.05 < acc["stale"] < acc["partial"]
    assert on_slow["drop"] + 0.05 < on_slow["stale"] < on_slow["partial"]
    assert acc["stale"] > 0.5  # ten classes: chance is 0.1


@pytest.mark.timeout(60)
def test_a_second_run_on_the_same_grid_takes_in_no_late_update_of_the_first():
    """A run ends with client 3's update still in flight (due after its last round); a second run_rounds on the same
    ManagedGrid object, from the start, must not take that update in: it equals the first run, bit for bit."""
    task = _task()
    grid = ManagedGrid(InProcessGrid(tsclient.app, 6), task, system=_system(), stragglers="stale")
    def run(rounds):
        return run_rounds(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), grid, initial_arrays(task),
                          num_rounds=rounds)  # fmt: skip

    runs = [run(3)]
    assert grid.late[3].started == 3 and grid.late[3].due == 4  # in flight when the run ended
    run(0)
    assert not grid.late  # a new run starts with nothing in flight
    runs.append(run(3))
    for k, v in np_(runs[0].arrays).items():
        assert np.array_equal(np_(runs[1].arrays)[k], v), k
    assert [r.stale for r in runs[1].history.rounds] == [r.stale for r in runs[0].history.rounds]


# ---- settings under which late updates cannot be right -------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["no-deadline", "no-system", "exponent", "max", "heterofl", "scaffold", "dp"])
def test_late_updates_where_they_cannot_be_right_are_refused_before_any_client_trains(case):
    """No deadline (nothing is late), a negative or NaN staleness exponent, max_staleness 0, a strategy whose replies
    are not the global model's arrays (HeteroFL's sub-models, SCAFFOLD's control variates), a DP wrapper (a staleness-
    weighted mean gives an on-time client more than the 1/n its noise covers): refused by simulate and by run_rounds
    (ManagedGrid) before any client trains, naming the argument and what was expected."""
    task = blobs(6, features=3, classes=3, model="mlp", hidden=4)
    trained = []

    def script(pid, rnd, got, context, config):
        trained.append(pid)
        return got["arrays"], {}

    kw = dict(fraction_train=1.0, fraction_evaluate=0.0)
    strategy, system, extra = FedAvg(**kw), _system(), {}
    needle = ""
    if case == "no-deadline":
        system = SystemModel(6, speeds=SPEEDS)
        needle = "stragglers='stale' with system=a SystemModel without deadline; expected a SystemModel with a deadline"
    elif case == "no-system":
        system = None
        needle = "stragglers='stale' with system=None; expected a SystemModel with a deadline"
    elif case == "exponent":
        extra = dict(staleness_exponent=float("nan"))
        needle = "staleness_exponent=nan; expected a finite number >= 0"
    elif case == "max":
        extra = dict(max_staleness=0)
        needle = "max_staleness=0; expected an integer >= 1"
    elif case == "heterofl":
        strategy = HeteroFL(width_of=lambda p: (1.0, 0.5)[p % 2], hidden=4, **kw)
        needle = "stragglers='stale' with HeteroFL: a late update is moved onto the current global model array by array"
    elif case == "scaffold":
        strategy = Scaffold(**kw)
        needle = "stragglers='stale' with Scaffold: a late update is moved onto the current global model"
    else:
        strategy = DifferentialPrivacyServerSideFixedClipping(FedAvg(**kw), 0.5, 1.0, 6)
        needle = "stragglers='stale' with DifferentialPrivacyServerSideFixedClipping: late updates are weighted"
    with pytest.raises(ValueError, match=re.escape(needle)):
        simulate(strategy, task, rounds=1, system=system, stragglers="stale", **extra)
    with pytest.raises(ValueError, match=re.escape(needle)):
        grid = ManagedGrid(InProcessGrid(scripted(script), 6), task, system=system, stragglers="stale", **extra)
        run_rounds(strategy, grid, initial_arrays(task), num_rounds=1)
    assert not trained


@pytest.mark.timeout(60)
def test_fl_run_takes_late_updates_from_the_command_line(tmp_path):
    """``tilestack fl run --straggler-policy stale --deadline ... --max-staleness ... --staleness-exponent ...``: the
    history it writes holds the late updates each round took in; a bad bound or a stale policy without a deadline
    is a usage error naming it, before any round."""
    from typer.testing import CliRunner

    from tilestack import config
    from tilestack.cli import _register, app

    _register()

    def invoke(*extra):
        args = ["fl", "run", "--rounds", "3", "--clients", "6", "--per-round", "6", "--local-steps", "20",
                "--straggler-policy", "stale", *extra]  # fmt: skip
        with config.override(cache_dir=tmp_path / "cache"):
            return CliRunner().invoke(app, args)

    out = tmp_path / "h.json"
    res = invoke("--speed-sigma", "1.5", "--deadline", "0.15", "--max-staleness", "8", "--staleness-exponent", "1",
                 "--out", str(out))  # fmt: skip
    assert res.exit_code == 0, res.output
    rounds = json.loads(out.read_text())["rounds"]
    assert any(r["stale"] for r in rounds) and all("num_online" in r and "client_train" in r for r in rounds)
    flat = "".join(re.sub("[\u2500-\u257f]", "", invoke("--deadline", "0.15", "--max-staleness", "0").output).split())
    assert "max_staleness=0;expectedaninteger>=1" in flat
    flat = "".join(re.sub("[\u2500-\u257f]", "", invoke().output).split())
    assert "stragglers='stale'withsystem=aSystemModelwithoutdeadline" in flat


# ---- on Flower's own Simulation Engine ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_schedule_and_late_updates_run_the_same_on_flowers_simulation_engine():
    """Flower's Simulation Engine (Ray) under a schedule that takes four of six clients offline in round 2 and two
    slow clients whose updates are due 1 and 2 rounds late (client 3's in round 2, when it is offline: it uploads in
    round 3, once back): the model is bit for bit the in-process engine's, and so
    is the whole record, per-client metrics, the late updates and who was left out included, in the same order (the
    grid takes replies in partition order: Flower's came as its workers finished, and the record's order with
    them)."""
    task = _task(num_samples=300, local_steps=STEPS)
    pattern = np.ones((3, 6))
    pattern[1, :4] = 0
    system = SystemModel(6, speeds=SPEEDS, bandwidths=np.full(6, 1e12), deadline=DEADLINE, availability=pattern)

    def run(engine):
        return simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.5), task, rounds=4, engine=engine,
                        system=system, stragglers="stale")  # fmt: skip

    ours, flower = run("tilestack"), run("flower")
    x, y = np_(ours.arrays), np_(flower.arrays)
    assert all(np.array_equal(x[k], y[k]) for k in x)

    def record(res):
        return json.dumps([{k: v for k, v in r.items() if k != "wall_time"} for r in res.history.to_dict()["rounds"]])

    assert record(ours) == record(flower)
    r1, r2, r3, _ = flower.history.rounds
    assert "late" in r1.excluded["3"] and "late" in r1.excluded["4"]
    # round 2: client 5 alone online and idle (3 is offline when its work is done, 4 still working): skipped
    assert r2.num_online == 1 and r2.skipped.startswith("1 of 6 clients available") and not r2.stale
    assert r3.stale == {"3": 2, "4": 2}  # client 3 uploads once back online, a round later than its work ended
    assert any(r.client_eval for r in flower.history.rounds)
