"""Federated scenarios, round 18 (2 of 2): ``tilestack fl run`` resumed from ``--checkpoint`` against the uninterrupted
run, a device trace and a deadline from the command line by hand, FedBN from the command line, a sampled federated
evaluation (``fraction_evaluate`` between 0 and 1) scored by hand, the History JSON and the plots, the bench's table,
and PyTorch clients (CNN, transformer) repeating bit for bit across runs and across one and two worker processes.

``tilestack fl run`` through typer's CliRunner, ``simulate`` on tilestack's in-process Flower ``Grid`` with Flower's
FedAvg and tilestack's FedBN, ``plots.plot_rounds`` / ``plot_grid``, ``bench.BenchSpec`` / ``run_bench`` / ``table``.
References: the uninterrupted run's history (every field but wall time), softmax regression scored in float64
(``_fl_round12.softmax_scores``), the fairness summary written out, the bench cells' own numbers.

What this round found, fixed:

- *``fl run --strategy fedbn`` could never run.* The help lists fedbn, but no option built the MLP with batch norm, so
  every such run was refused for a model without ``bn.`` arrays ("an MLP with norm=True", which nothing sets). FedBN's
  task now has batch norm, and another ``--model`` is refused naming ``--model`` before any work.
- *A device trace from the command line.* ``fl run --trace`` of 3 devices with ``--clients 5`` was refused as
  "simulate: system.num_clients=3", naming no option, and ``--speed-sigma`` beside a trace was ignored without a word
  (the trace gives the speeds); each is refused naming its option.
- *Plots of what is not there.* ``plot_rounds(runs, 'accuracy')`` raised AttributeError, ``'excluded'`` a TypeError
  from float() of a dict, and ``'extra.epsilon'`` of runs without DP (or ``'client_acc.p99'``) wrote an empty plot
  without a word; no runs or no metrics failed in matplotlib ("Number of rows must be a positive integer"). Each is a
  ValueError naming the metric and what is plottable (``plots._check``); a key held by one panel's runs only (IFCA's
  ``extra.ari`` beside FedAvg) is still a metric of the grid.
- *The bench.* ``BenchSpec(clients=2.5)`` or ``seeds=(-1,)`` failed in the first cell's Task (in a worker process),
  naming Task; ``seeds=(0, 0)`` ran one seed twice and reported its std 0 "over seeds"; refused naming BenchSpec's
  field. A column whose first method's value is NaN (no client scores: worst10) had no best in bold (``max`` of a NaN
  first is NaN).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _fl_round9 import keep
from _fl_round12 import softmax_scores
from _fl_round18 import deadline_plan, fedavg, npy_bytes
from typer.testing import CliRunner

import tilestack.cli.fl  # noqa: F401  (registers `tilestack fl`)
from tilestack.cli import app
from tilestack.federated import History, SystemModel, Task, simulate
from tilestack.federated.bench import BenchSpec, Cell, run_bench, table
from tilestack.federated.metrics import RoundMetrics
from tilestack.federated.plots import plot_grid, plot_rounds
from tilestack.federated.strategies import FedBN


def _invoke(args: list[str]):
    return CliRunner().invoke(app, ["fl", "run", *args], env={"COLUMNS": "200"})


def _rounds(path) -> list[dict]:
    rounds = json.loads(path.read_text())["rounds"]
    for r in rounds:
        r.pop("wall_time")
    return rounds


# ---- the CLI: --checkpoint resumed equals the uninterrupted run ------------------------------------------------------
@pytest.mark.timeout(180)
def test_cli_checkpoint_resumed_with_two_workers_is_the_uninterrupted_run(tmp_path):
    """SCAFFOLD (each client's c_i in its node state) with dropouts, stragglers doing partial work and a sampled
    federated evaluation: 2 rounds into a checkpoint, then the same command for 4 rounds resumed from it on two worker
    processes, writes the history of the 4-round run without a checkpoint, every field of every round but wall time."""
    base = ["--dataset", "blobs", "--strategy", "scaffold", "--clients", "5", "--per-round", "3", "--local-steps", "3",
            "--lr", "0.05", "--seed", "3", "--eval-fraction", "0.4", "--dropout", "0.2", "--stragglers", "0.5"]
    full, resumed, ckpt = tmp_path / "full.json", tmp_path / "resumed.json", tmp_path / "run.ckpt"
    assert _invoke([*base, "--rounds", "4", "--out", str(full)]).exit_code == 0
    first = _invoke([*base, "--rounds", "2", "--checkpoint", str(ckpt)])
    assert first.exit_code == 0 and ckpt.is_file(), first.output
    res = _invoke([*base, "--rounds", "4", "--checkpoint", str(ckpt), "--workers", "2", "--out", str(resumed)])
    assert res.exit_code == 0, res.output
    want, got = _rounds(full), _rounds(resumed)
    assert [r["round"] for r in got] == [1, 2, 3, 4]
    assert any(r["excluded"] for r in want) and any(r["client_eval"] for r in want)  # the scenario
    assert got == want


# ---- the CLI: a device trace and a deadline --------------------------------------------------------------------------
def test_cli_trace_and_deadline_rounds_are_the_system_arithmetic_by_hand(tmp_path):
    """``fl run --trace`` (3 devices: 20, 2.2 and 0.3 steps/s over 1e5, 1e4 and 1e3 bytes/s) with a 3 s deadline and 8
    local steps: in each round client 2 times out (its transfers alone take 5.4 s), client 1 does ceil(share x 8) = 6
    steps, the history's steps, bytes (the 2696-byte model to and from each client asked) and simulated time (capped
    at the deadline) are the documented arithmetic. A trace of another client count than --clients is refused naming
    --trace (it named simulate's system.num_clients), and --speed-sigma beside a trace naming --speed-sigma (it was
    ignored without a word)."""
    trace = tmp_path / "devices.csv"
    trace.write_text("client,speed,bandwidth\n0,20,1e5\n1,2.2,1e4\n2,0.3,1e3\n")
    size = npy_bytes(Task(dataset="blobs", num_clients=3, local_steps=8).initial_params())
    plans = [deadline_plan(3.0, size, bw, sp, 8) for sp, bw in [(20, 1e5), (2.2, 1e4), (0.3, 1e3)]]
    assert [p[0] for p in plans] == ["", "deadline", "timeout"] and plans[1][2] == 6
    out = tmp_path / "h.json"
    base = ["--dataset", "blobs", "--clients", "3", "--per-round", "3", "--local-steps", "8", "--trace", str(trace)]
    res = _invoke([*base, "--rounds", "2", "--deadline", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    times = [2 * size / 1e5 + 8 / 20, 2 * size / 1e4 + 6 / 2.2]
    for r in _rounds(out):
        assert r["excluded"] == {"2": "timeout"}
        assert (r["steps_done"], r["steps_full"], r["num_aggregated"]) == (14, 24, 2)
        assert r["bytes_down"] == r["bytes_up"] == 2 * size
        assert r["sim_time"] == pytest.approx(min(3.0, max(times)), rel=1e-12)
    bad = _invoke([*base[:2], "--clients", "5", "--per-round", "2", "--trace", str(trace), "--rounds", "1"])
    assert bad.exit_code == 2 and "Invalid value for --trace" in bad.output and "lists 3 clients" in bad.output
    bad = _invoke([*base, "--rounds", "1", "--speed-sigma", "1"])
    assert bad.exit_code == 2 and "Invalid value for --speed-sigma" in bad.output


# ---- the CLI: FedBN --------------------------------------------------------------------------------------------------
def test_cli_fedbn_runs_on_an_mlp_with_batch_norm_and_is_the_library_run(tmp_path):
    """``fl run --strategy fedbn --model mlp`` (refused before: no option gave the MLP batch norm) writes the history of
    ``simulate(FedBN(...))`` over the same task with ``norm=True`` (and the CLI's default system model); with the
    default logistic regression it is refused naming --model, before any round."""
    out = tmp_path / "h.json"
    args = ["--dataset", "blobs", "--strategy", "fedbn", "--model", "mlp", "--clients", "4", "--per-round", "4",
            "--rounds", "2", "--local-steps", "3", "--lr", "0.05", "--eval-fraction", "1.0", "--seed", "1"]
    res = _invoke([*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    task = Task(dataset="blobs", num_clients=4, model="mlp", norm=True, lr=0.05, local_steps=3, seed=1)
    lib = simulate(FedBN(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=4, min_train_nodes=4,
                         min_evaluate_nodes=4), task, rounds=2, seed=1, system=SystemModel(4))  # fmt: skip
    want = lib.history.to_dict()["rounds"]
    for r in want:
        r.pop("wall_time")
    got = _rounds(out)
    assert got == want
    assert all(sorted(r["client_eval"]) == ["0", "1", "2", "3"] for r in got)
    bad = _invoke(["--dataset", "blobs", "--strategy", "fedbn", "--rounds", "1", "--out", str(tmp_path / "x.json")])
    assert bad.exit_code == 2 and "--model" in bad.output and "got --model logreg, expected --model mlp" in bad.output
    assert not (tmp_path / "x.json").exists()


# ---- a sampled federated evaluation ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("fraction", "count"), [(0.5, 3), (0.2, 1)])
def test_sampled_federated_evaluation_is_each_sampled_clients_score_by_hand(fraction, count):
    """FedAvg with fraction_evaluate 0.5 (3 of 6 clients) or 0.2 (1 of 6) over clients of unequal sizes, three rounds:
    each round evaluates that many clients, each client's eval-loss and eval-acc are the round's global model scored
    on its test split in float64, ``eval_metrics`` their means weighted by test examples, and ``client_acc`` the
    fairness summary of the sampled clients' accuracies written out (mean, worst, Jain's index)."""
    task = Task(dataset="blobs", num_samples=300, num_features=4, num_classes=3, num_clients=6, local_steps=2,
                lr=0.1, partitioner="quantity", quantity_sigma=0.8, seed=6)  # fmt: skip
    models: list = []
    res = simulate(fedavg(fraction_evaluate=fraction), task, rounds=3, seed=2, extra_metrics=keep(models))
    sampled = set()
    for m, x in zip(res.history.rounds, models, strict=True):
        assert len(m.client_eval) == count and not m.eval_excluded
        scores = {}
        for pid, got in m.client_eval.items():
            _, _, xt, yt = task.client_data(int(pid))
            loss, acc = softmax_scores(x, xt, yt)
            assert got["num-examples"] == len(yt)
            assert got["eval-acc"] == pytest.approx(acc, abs=1e-12)
            assert got["eval-loss"] == pytest.approx(loss, rel=1e-5)
            scores[pid] = (len(yt), loss, acc)
        total = sum(n for n, _, _ in scores.values())
        assert m.eval_metrics["eval-acc"] == pytest.approx(sum(n * a for n, _, a in scores.values()) / total, rel=1e-9)
        assert m.eval_metrics["eval-loss"] == pytest.approx(sum(n * lo for n, lo, _ in scores.values()) / total,
                                                            rel=1e-5)  # fmt: skip
        accs = np.array([a for _, _, a in scores.values()])
        assert m.client_acc["mean"] == pytest.approx(accs.mean(), abs=1e-12)
        assert m.client_acc["worst"] == pytest.approx(accs.min(), abs=1e-12)
        assert m.client_acc["jain"] == pytest.approx(accs.sum() ** 2 / (len(accs) * (accs**2).sum()), abs=1e-12)
        sampled |= set(m.client_eval)
    assert len(sampled) > count  # the sample changes from round to round


# ---- the History JSON and the plots ---------------------------------------------------------------------------------
def test_history_json_round_trips_and_plots_refuse_what_is_not_there(tmp_path):
    """A run's History written as JSON reads back equal, NaN fields included (no evaluation: test loss NaN), and plots
    as a PNG; a metric no round holds, a name that is no number field, no runs and no metrics are each refused naming
    the metric or argument (before: AttributeError, TypeError, an empty plot without a word, matplotlib's error)."""
    task = Task(dataset="blobs", num_samples=120, num_features=3, num_classes=3, num_clients=3, local_steps=2)
    h = simulate(fedavg(), task, rounds=2, evaluate=False).history
    path = tmp_path / "sub" / "h.json"
    h.to_json(path)
    back = History.from_dict(json.loads(path.read_text()))
    assert np.isnan(back.rounds[0].test_loss)
    assert json.dumps(back.to_dict(), sort_keys=True) == json.dumps(h.to_dict(), sort_keys=True)
    png = plot_grid({"FedAvg": {"a": h}}, ["train_loss", "bytes_up"], tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with_ari = History([RoundMetrics(1, test_acc=0.5, extra={"ari": 0.7})])
    assert plot_grid({"IFCA": {"i": with_ari}, "FedAvg": {"a": h}}, ["extra.ari"], tmp_path / "g.png").is_file()
    bad = [
        (lambda: plot_rounds({"a": h}, "accuracy", tmp_path / "x.png"), r"metric='accuracy'; expected a number field"),
        (lambda: plot_rounds({"a": h}, "excluded", tmp_path / "x.png"), r"metric='excluded'; expected a number field"),
        (lambda: plot_rounds({"a": h}, "extra.epsilon", tmp_path / "x.png"),
         r"metric='extra\.epsilon': no round of these runs has extra 'epsilon'"),
        (lambda: plot_rounds({"a": with_ari}, "client_acc.p99", tmp_path / "x.png"), r"client_acc 'p99'"),
        (lambda: plot_rounds({}, "test_acc", tmp_path / "x.png"), r"plot_rounds: runs=\{\}; expected a non-empty dict"),
        (lambda: plot_grid({}, ["test_acc"], tmp_path / "x.png"), r"plot_grid: panels=\{\}"),
        (lambda: plot_grid({"p": {"a": h}}, [], tmp_path / "x.png"), r"plot_grid: metrics=\[\]"),
    ]
    for call, match in bad:
        with pytest.raises(ValueError, match=match):
            call()
    assert not (tmp_path / "x.png").exists()


# ---- the bench -------------------------------------------------------------------------------------------------------
def test_small_bench_table_is_its_cells_and_bad_specs_are_refused():
    """A small bench (blobs, IID, two profiles, two methods, two seeds, 4 clients, 2 rounds): its table holds each
    cell group's mean ± population std over seeds, written out from the cells, with the best method of each column in
    bold; a NaN first in a column still leaves the best bold. Specs the cells could not run are refused naming
    BenchSpec's field (clients=2.5 and seeds=(-1,) failed in a cell's Task, seeds=(0, 0) ran one seed twice)."""
    spec = BenchSpec(tasks=("blobs",), partitions=("iid",), profiles=("uniform", "stragglers"),
                     methods=("fedavg", "fedprox"), seeds=(0, 1), clients=4, per_round=2, rounds=2, local_steps=2)
    cells = run_bench(spec, workers=1)
    text = table(spec, cells)
    for profile in ("uniform", "stragglers"):
        block = text.split(f"**blobs, {profile}**")[1].split("**blobs")[0]
        means = {}
        for method in ("fedavg", "fedprox"):
            accs = np.array([c.test_acc for c in cells if (c.profile, c.method) == (profile, method)])
            assert len(accs) == 2
            means[method] = accs.mean()
            row = next(line for line in block.splitlines() if line.startswith(f"| {method} |"))
            assert f"{accs.mean():.3f} ± {accs.std():.3f}" in row
        best = max(means, key=means.get)
        assert f"| {best} | **" in block
    nan_first = [Cell("blobs", "iid", "uniform", "fedavg", s, 0.5, float("nan"), 1, 0.1, []) for s in (0, 1)] + [
        Cell("blobs", "iid", "uniform", "fedprox", s, 0.6, 0.3 + 0.1 * s, 1, 0.1, []) for s in (0, 1)]
    one = BenchSpec(tasks=("blobs",), partitions=("iid",), profiles=("uniform",), methods=("fedavg", "fedprox"))
    assert "| fedprox | **0.350 ± 0.050** |" in table(one, nan_first, "worst10")
    for kw, match in [(dict(clients=2.5, per_round=2), r"BenchSpec: clients=2\.5; expected an integer >= 1"),
                      (dict(seeds=(-1,)), r"BenchSpec: a seed of seeds=-1; expected an integer >= 0"),
                      (dict(seeds=(0, 0)), r"BenchSpec: seeds=\(0, 0\); expected a non-empty tuple of distinct"),
                      (dict(rounds=True), r"BenchSpec: rounds=True")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            BenchSpec(**kw)


# ---- PyTorch clients: one seed, one history ------------------------------------------------------------------------
@pytest.mark.timeout(240)
@pytest.mark.parametrize("model", ["cnn", "transformer"])
def test_torch_clients_repeat_bit_for_bit_across_runs_and_worker_processes(model):
    """The CNN and the transformer on digits (Dirichlet label skew, 3 clients, two thirds sampled for training and
    evaluation, 2 rounds): one seed gives the same history (every field but wall time) and the same model bit for bit
    in two runs on one process and in a run on two worker processes; another seed gives another model."""
    task = Task(dataset="digits", model=model, num_clients=3, local_steps=2, batch_size=16, lr=0.1, seed=1,
                partitioner="dirichlet", partition_alpha=0.5)  # fmt: skip

    def run(workers: int, seed: int = 5):
        st = fedavg(fraction_train=2 / 3, fraction_evaluate=2 / 3, min_available_nodes=3, min_train_nodes=2,
                    min_evaluate_nodes=2)  # fmt: skip
        r = simulate(st, task, rounds=2, seed=seed, workers=workers, eval_clients=3)
        rounds = r.history.to_dict()["rounds"]
        for x in rounds:
            x.pop("wall_time")
        return json.dumps(rounds, sort_keys=True), {k: v.numpy().copy() for k, v in r.arrays.items()}

    a, b, c = run(1), run(1), run(2)
    assert a[0] == b[0] == c[0]
    assert all(np.array_equal(a[1][k], b[1][k]) and np.array_equal(a[1][k], c[1][k]) for k in a[1])
    assert json.loads(a[0])[0]["num_aggregated"] == 2
    other = run(1, seed=6)[1]
    assert any(not np.array_equal(a[1][k], other[k]) for k in a[1])
