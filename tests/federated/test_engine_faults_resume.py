import numpy as np
import pytest
from flwr.serverapp.strategy import FedAdam, FedAvg

from tilestack.federated import SystemModel, Task, simulate
from tilestack.federated.client import app
from tilestack.federated.engine import InProcessGrid
from tilestack.federated.strategies import Scaffold
from tilestack.federated.strategies._util import to_record

SMALL = dict(dataset="synthetic", num_clients=10, max_samples=200, local_steps=5, lr=0.05)


def _arrays(res):
    return {k: v.numpy() for k, v in res.arrays.items()}


def test_faulty_clients_are_left_out_with_reasons_and_the_round_goes_on():
    faults = ((1, "crash"), (2, "nan"), (3, "shape"), (4, "slow"))
    # The honest clients took 5 ms here, up to 29 ms beside two busy processes; a 0.2 s timeout left a loaded
    # machine a 7x margin before it dropped one of them. 1 s gives 30x and costs 2 s (a round waits it out for
    # client 4, whose 2 s sleep is late however busy the machine).
    task = Task(**SMALL, faults=faults, slow_seconds=2.0)
    res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=2, timeout=1.0)
    for r in res.history.rounds:
        assert r.num_selected == 10 and r.num_aggregated == 6
        ex = r.excluded
        assert ex["1"].startswith("error:") and "simulated client crash" in ex["1"]
        assert ex["2"].startswith("non-finite")
        assert ex["3"].startswith("shape:")
        assert ex["4"].startswith("timeout")
    assert all(np.all(np.isfinite(v)) for v in _arrays(res).values())
    assert res.history.rounds[-1].test_acc > 0.15


def test_server_never_adopts_a_non_finite_aggregate():
    class BrokenAggregation(FedAvg):  # a real strategy whose aggregation produces NaN
        def aggregate_train(self, server_round, replies):
            arrays, metrics = super().aggregate_train(server_round, replies)
            bad = {k: np.full_like(v.numpy(), np.nan) for k, v in arrays.items()}
            return to_record(bad), metrics

    task = Task(**SMALL)
    res = simulate(BrokenAggregation(fraction_train=0.5, fraction_evaluate=0.0), task, rounds=2)
    assert all(np.array_equal(v, np.zeros_like(v)) for v in _arrays(res).values())  # still the initial zeros


def test_system_model_dropout_deadline_and_partial_work():
    task = Task(**SMALL)
    system = SystemModel(10, speed=50.0, speed_sigma=1.5, dropout=0.2, deadline=0.1, seed=1)
    res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=4, system=system)
    reasons = {v for r in res.history.rounds for v in r.excluded.values()}
    assert "dropout" in reasons
    rounds = res.history.rounds
    assert all(r.sim_time <= 0.1 + 1e-9 for r in rounds)
    assert sum(r.steps_done for r in rounds) < sum(r.steps_full for r in rounds)  # partial work, counted
    assert all(r.bytes_down > 0 and r.bytes_up > 0 for r in rounds)
    dropped = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=4, system=system,
                       stragglers="drop")  # fmt: skip
    assert sum(r.num_aggregated for r in dropped.history.rounds) < sum(r.num_aggregated for r in rounds)


def test_trace_file_gives_speeds(tmp_path):
    p = tmp_path / "trace.csv"
    p.write_text("client,speed,bandwidth\n1,20,1000\n0,10,500\n")
    s = SystemModel.from_trace(p)
    assert s.speeds.tolist() == [10.0, 20.0] and s.bandwidths.tolist() == [500.0, 1000.0]
    assert s.duration(0, steps=10, bytes_down=250, bytes_up=250) == pytest.approx(1.0 + 1.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Scaffold(fraction_train=0.5, fraction_evaluate=0.5),
        lambda: FedAdam(fraction_train=0.5, fraction_evaluate=0.0, eta=0.05),
    ],
)
def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path, make):
    task = Task(**SMALL)
    system = SystemModel(10, straggler_fraction=0.5)
    full = simulate(make(), task, rounds=6, system=system, seed=3)
    ckpt = tmp_path / "run.ckpt"
    part = simulate(make(), task, rounds=6, system=system, seed=3, checkpoint=ckpt, stop_after=3)
    assert len(part.history.rounds) == 3 and ckpt.exists() and not list(tmp_path.glob("*.tmp"))
    resumed = simulate(make(), task, rounds=6, system=system, seed=3, checkpoint=ckpt)
    assert [r.round for r in resumed.history.rounds] == [1, 2, 3, 4, 5, 6]
    a, b = _arrays(full), _arrays(resumed)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert [r.test_acc for r in full.history.rounds] == [r.test_acc for r in resumed.history.rounds]


def test_in_process_grid_runs_the_client_app_with_contexts():
    grid = InProcessGrid(app, num_nodes=5, seed=0)
    ids = list(grid.get_node_ids())
    assert len(set(ids)) == 5 and [grid.partitions[i] for i in ids] == list(range(5))
    assert ids == list(InProcessGrid(app, num_nodes=5, seed=0).get_node_ids())  # seeded
    with pytest.raises(ValueError, match="num_nodes=0"):
        InProcessGrid(app, num_nodes=0)


def test_worker_processes_give_the_same_rounds_as_one_process():
    task = Task(**SMALL, faults=((2, "crash"),))
    runs = [
        simulate(Scaffold(fraction_train=1.0, fraction_evaluate=0.5), task, rounds=3, workers=w, seed=1) for w in (1, 2)
    ]
    a, b = (_arrays(r) for r in runs)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # SCAFFOLD: the clients' c_i came back from the workers
    assert [r.excluded for r in runs[0].history.rounds] == [r.excluded for r in runs[1].history.rounds]
    assert runs[1].history.rounds[0].excluded["2"].startswith("error:")
