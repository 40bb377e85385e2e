"""Federated scenarios, round 21 (2 of 2): scikit-learn's digits end to end to a target accuracy, a CSV file dataset
with bad rows, a label in the wrong column or one class, IFCA's cluster choices on planted groups checked by hand,
client sampling reproduced across seeds and across the in-process and Ray engines, Flower's DP wrapper over FedAvg
weighted by num-examples (no accountant), and ``tilestack fl run`` / ``fl bench`` outputs on tiny settings,
including a run killed mid-way whose ``--out`` file must hold the rounds it finished.

What this round found, fixed:

- *``fl run --out`` lost a killed run.* The history JSON was written once, after the last round: a run stopped by
  Ctrl-C, a crash or a kill in round 40 left no file (or the previous run's). ``--out`` is now rewritten atomically
  after every round (a resumed run's file holds the checkpoint's rounds first).
- *DP noise sized for equal shares over an example-weighted mean.* ``DifferentialPrivacyServerSideFixedClipping(
  FedAvg())`` without an accountant weights the clipped updates by num-examples while the noise's std is
  noise_multiplier x clip / n (equal shares): a client with most of the examples is protected less than stated. No
  epsilon is claimed, so the run goes on (the aggregate is checked by hand here), but a warning now names
  ``weighted_by_key`` and the equal weight (``unit-weight``) that gives the stated guarantee.
- *Two outputs on one file.* ``--out`` and ``--checkpoint`` (or ``--plot``) on one path overwrote each other; refused
  naming both options.
- *A share of attackers that makes none.* ``Task(malicious_fraction=0.1, num_clients=4)`` made round(0.4) = 0
  attackers and ran unattacked without a word; refused naming ``malicious_fraction`` (``--malicious``).
- *A CSV's first row with one bad value* (``0.5,,1.0,dog``) was dropped as a header; a header is now a first row none
  of whose features is a number.
- *Blobs settings given to digits* (``num_classes=3``) were ignored; refused naming them.
- *A file with no feature column* (``;``-separated, or labels only) trained a model of no inputs; refused naming
  ``data_path``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from _fl_round5 import np_
from _fl_round7 import client_model
from _fl_round9 import keep
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from typer.testing import CliRunner

import tilestack.cli.fl  # noqa: F401  (registers `tilestack fl`)
from tilestack.cli import app
from tilestack.federated import Task, initial_arrays, simulate
from tilestack.federated.bench import BenchSpec, run_bench, write_report
from tilestack.federated.client import UNIT_WEIGHT, cluster_key
from tilestack.federated.strategies import IFCA, RandomSelector, Selected

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


def _ce(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of softmax regression, float64."""
    logits = x.astype(np.float64) @ params["fc.weight"].astype(np.float64) + params["fc.bias"].astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


# ---- digits, end to end ---------------------------------------------------------------------------------------------
def test_digits_logistic_regression_reaches_80_percent_in_four_rounds_and_the_score_is_the_models():
    """scikit-learn's digits over 5 IID clients, FedAvg of all of them, one local epoch of SGD a round: the global
    test accuracy passes 0.80 by round 4 from about chance, and each round's test_acc is the accuracy of that
    round's global model on the clients' pooled test splits, scored here by hand."""
    task = Task(dataset="digits", num_clients=5, lr=0.1, batch_size=32, local_epochs=1)
    models: list = []
    res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=4, extra_metrics=keep(models))
    accs = res.history.column("test_acc")
    assert accs[-1] >= 0.80 and max(accs) >= 0.80, accs
    xs, ys = zip(*[task.client_data(p)[2:] for p in range(5)], strict=True)
    x, y = np.concatenate(xs), np.concatenate(ys)
    init = np_(initial_arrays(task))
    logits0 = x @ init["fc.weight"] + init["fc.bias"]
    assert (logits0.argmax(1) == y).mean() < 0.3  # where it started
    for m, acc in zip(models, accs, strict=True):
        got = float(((x.astype(np.float64) @ m["fc.weight"] + m["fc.bias"]).argmax(1) == y).mean())
        assert got == pytest.approx(acc, abs=1.5 / len(y))


# ---- a CSV file dataset ----------------------------------------------------------------------------------------------
def _csv(tmp_path: Path, rows: list[str]) -> str:
    p = tmp_path / "d.csv"
    p.write_text("\n".join(rows) + "\n")
    return str(p)


def _rows(n: int = 24, label_first: bool = False) -> list[str]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        f = rng.normal(0, 1, 3) + (i % 2) * 2
        out.append(f"{i % 2}," + ",".join(f"{v:.3f}" for v in f) if label_first
                   else ",".join(f"{v:.3f}" for v in f) + f",{'cat' if i % 2 else 'dog'}")  # fmt: skip
    return out


@pytest.mark.parametrize("where", [0, 5, 23])
def test_a_csv_row_with_a_feature_that_is_no_number_is_refused_naming_the_file(tmp_path, where):
    rows = _rows()
    rows[where] = "0.5,abc,1.0,dog"
    path = _csv(tmp_path, rows)
    if where == 0:  # a first row with one name among numbers: a bad row, not a header of feature names
        with pytest.raises(ValueError, match="data_path=.*not a number"):
            Task(dataset="file", data_path=path, num_clients=2)
        return
    with pytest.raises(ValueError, match="data_path=.*not a number"):
        Task(dataset="file", data_path=path, num_clients=2)


def test_a_csv_with_an_empty_feature_in_its_first_row_is_refused_not_dropped_as_a_header(tmp_path):
    rows = _rows()
    rows[0] = "0.5,,1.0,dog"
    with pytest.raises(ValueError, match="data_path="):
        Task(dataset="file", data_path=_csv(tmp_path, rows), num_clients=2)


def test_a_csv_whose_label_is_in_the_first_column_is_refused_the_last_column_being_no_class(tmp_path):
    with pytest.raises(ValueError, match=r"data_path=.*not a whole number"):
        Task(dataset="file", data_path=_csv(tmp_path, _rows(label_first=True)), num_clients=2)


def test_a_csv_of_a_single_class_is_refused(tmp_path):
    rows = [r.rsplit(",", 1)[0] + ",dog" for r in _rows()]
    with pytest.raises(ValueError, match=r"data_path=.*single label 'dog'"):
        Task(dataset="file", data_path=_csv(tmp_path, rows), num_clients=2)


def test_a_csv_with_a_header_and_names_as_labels_trains_on_every_row(tmp_path):
    """A header row, labels 'cat'/'dog': 24 rows over 3 clients, every row some client's (train or test), and one
    FedAvg round aggregates all three."""
    path = _csv(tmp_path, ["a,b,c,animal", *_rows()])
    task = Task(dataset="file", data_path=path, num_clients=3, local_steps=2, lr=0.1)
    parts = [task.client_data(p) for p in range(3)]
    assert sum(len(d[1]) + len(d[3]) for d in parts) == 24
    assert task.classes == 2 and task.features == 3
    res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=1)
    assert res.history.rounds[0].num_aggregated == 3


# ---- IFCA's cluster choices ------------------------------------------------------------------------------------------
def test_ifca_clients_choose_the_cluster_model_of_least_loss_on_their_data_and_recover_the_planted_groups():
    """Six clients in two planted groups (each labels its inputs by its own teacher), IFCA with K = 2, everyone every
    round, 6 rounds: the cluster each client chose in the last round is the argmin over the two cluster models of
    round 5 of its training loss (computed here), and the choices match the planted groups (ARI 1)."""
    task = Task(dataset="clustered", num_clients=6, groups=2, num_features=5, num_classes=3, samples_per_client=80,
                local_steps=5, lr=0.3)  # fmt: skip
    s = IFCA(num_clusters=2, fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=6)
    models: list = []
    simulate(s, task, rounds=6, evaluate=False, extra_metrics=keep(models))
    before = models[-2]  # what the clients chose from in round 6
    for p in range(6):
        x, y = task.client_data(p)[:2]
        losses = [_ce({k: before[cluster_key(j, k)] for k in ("fc.weight", "fc.bias")}, x, y) for j in range(2)]
        assert s.assignments[p] == int(np.argmin(losses)), (p, losses)
    groups = [task.group(p) for p in range(6)]
    assert len(set(groups)) == 2
    same = {(a, b) for a in range(6) for b in range(6) if groups[a] == groups[b]}
    assert same == {(a, b) for a in range(6) for b in range(6) if s.assignments[a] == s.assignments[b]}
    assert s.agreement(task) == 1.0


# ---- client sampling reproduced --------------------------------------------------------------------------------------
def _picked(res) -> list[tuple[str, ...]]:
    return [tuple(sorted(r.client_train)) for r in res.history.rounds]


def test_sampling_is_the_seeds_both_for_flowers_own_sampling_and_for_randomselector():
    task = Task(dataset="blobs", num_samples=240, num_features=3, num_classes=2, num_clients=8, local_steps=1)
    kw = dict(rounds=4, evaluate=False)

    def flower(seed):
        return _picked(simulate(FedAvg(fraction_train=0.25, fraction_evaluate=0.0), task, seed=seed, **kw))

    def selected(sel_seed):
        s = Selected(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), RandomSelector(sel_seed), 2)
        return _picked(simulate(s, task, seed=0, **kw))

    for run in (flower, selected):
        a, b, c = run(1), run(1), run(2)
        assert a == b and all(len(r) == 2 for r in a)
        assert a != c


@pytest.mark.timeout(300)
def test_sampled_clients_and_the_model_are_the_same_on_the_in_process_and_ray_engines():
    task = Task(dataset="blobs", num_samples=120, num_features=3, num_classes=2, num_clients=4, local_steps=2)
    runs = {}
    for engine in ("tilestack", "flower"):
        res = simulate(FedAvg(fraction_train=0.5, fraction_evaluate=0.0), task, rounds=2, seed=3, engine=engine,
                       evaluate=False)  # fmt: skip
        runs[engine] = (_picked(res), np_(res.arrays))
    assert runs["tilestack"][0] == runs["flower"][0]
    for k, v in runs["tilestack"][1].items():
        np.testing.assert_array_equal(v, runs["flower"][1][k])


# ---- DP over an example-weighted FedAvg, no accountant ---------------------------------------------------------------
def test_server_side_dp_over_fedavg_weighted_by_examples_warns_and_aggregates_the_weighted_clipped_mean():
    """Four clients of very different sizes, clip 0.05 (every update is clipped), noise 0: the aggregate is the
    num-examples weighted mean of the clipped models (written out here); the run warns that the noise is sized for
    equal shares, naming weighted_by_key. With weighted_by_key='unit-weight' there is no such warning."""
    task = Task(dataset="blobs", num_samples=240, num_features=4, num_classes=3, num_clients=4, local_steps=3, lr=0.2,
                partitioner="quantity", quantity_sigma=1.5)  # fmt: skip
    clip = 0.05
    s = DifferentialPrivacyServerSideFixedClipping(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), 0.0, clip, 4)
    models: list = []
    with pytest.warns(UserWarning, match="weighted_by_key='num-examples'"):
        simulate(s, task, rounds=1, evaluate=False, extra_metrics=keep(models))
    x0 = np_(initial_arrays(task))
    want, total = {k: np.zeros(v.shape) for k, v in x0.items()}, 0
    sizes = [len(task.client_data(p)[1]) for p in range(4)]
    assert max(sizes) > 2 * min(sizes)
    for p in range(4):
        m = client_model(task, p, 1, x0)[0]
        d = {k: m[k].astype(np.float64) - x0[k] for k in x0}
        norm = np.sqrt(sum(float(np.sum(v**2)) for v in d.values()))
        assert norm > clip
        for k in x0:
            want[k] += sizes[p] * (x0[k] + d[k] * clip / norm)
        total += sizes[p]
    for k in x0:
        np.testing.assert_allclose(models[-1][k], want[k] / total, rtol=1e-5, atol=1e-6, err_msg=k)
    unit = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=UNIT_WEIGHT), 0.0, clip, 4)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*weighted_by_key.*")
        simulate(unit, task, rounds=1, evaluate=False)


# ---- fl run / fl bench outputs ---------------------------------------------------------------------------------------
RUN = ["fl", "run", "--dataset", "blobs", "--clients", "4", "--per-round", "2", "--local-steps", "2", "--lr", "0.1"]


def test_fl_run_writes_its_history_json_and_a_table_that_agree(tmp_path):
    out = tmp_path / "run.json"
    res = CliRunner().invoke(app, [*RUN, "--rounds", "2", "--out", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    rounds = json.loads(out.read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["num_selected"] == 2 and r["num_aggregated"] == 2 and len(r["client_train"]) == 2
        assert {"test_acc", "train_loss", "client_acc", "bytes_up", "bytes_down", "excluded"} <= r.keys()
    assert f"{rounds[-1]['test_acc']:.4f}" in res.output and "test accuracy (last round)" in res.output
    assert f"{sum(r['bytes_up'] for r in rounds):,}" in res.output


def test_fl_run_resumed_writes_the_checkpoints_rounds_and_its_own(tmp_path):
    out, ckpt = tmp_path / "run.json", tmp_path / "run.ckpt"
    first = CliRunner().invoke(app, [*RUN, "--rounds", "2", "--out", str(out), "--checkpoint", str(ckpt)])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(app, [*RUN, "--rounds", "3", "--out", str(out), "--checkpoint", str(ckpt)])
    assert again.exit_code == 0, again.output
    assert [r["round"] for r in json.loads(out.read_text())["rounds"]] == [1, 2, 3]


@pytest.mark.timeout(180)
def test_a_killed_fl_run_leaves_an_out_file_with_the_rounds_it_finished(tmp_path):
    """``fl run --rounds 100000`` killed (SIGKILL) once its --out file shows 2 rounds: the file is whole JSON holding
    rounds 1..k in order, k >= 2. Before, --out was written only after the last round."""
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "tilestack.cli", *RUN, "--rounds", "100000", "--out", str(out)]
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and len(json.loads(out.read_text())["rounds"]) >= 2:
                break
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL) if proc.poll() is None else None
        err = proc.communicate()[1].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, err[-2000:]  # killed mid-run, not finished
    assert out.exists(), err[-2000:]
    rounds = [r["round"] for r in json.loads(out.read_text())["rounds"]]
    assert len(rounds) >= 2 and rounds == list(range(1, len(rounds) + 1))


def test_fl_bench_tiny_grid_table_holds_each_cells_accuracy_and_an_interrupted_bench_leaves_the_doc(tmp_path):
    """A 2-cell grid (blobs, iid, uniform, fedavg and fedprox, one seed, 2 rounds): the table written between the
    markers of the doc holds each cell's final accuracy, the best in bold, and the text around the markers is kept.
    A bench that fails in its second cell leaves the doc as it was."""
    spec = BenchSpec(tasks=("blobs",), partitions=("iid",), profiles=("uniform",), methods=("fedavg", "fedprox"),
                     seeds=(0,), clients=4, per_round=2, rounds=2, local_steps=2)  # fmt: skip
    cells = run_bench(spec)
    assert [c.method for c in cells] == ["fedavg", "fedprox"] and all(len(c.accs) == 2 for c in cells)
    doc = tmp_path / "doc.md"
    doc.write_text("# before\n\ntext kept\n")
    write_report(spec, cells, doc, tmp_path / "img")
    text = doc.read_text()
    assert text.startswith("# before\n\ntext kept\n") and (tmp_path / "img" / "fl_bench.png").exists()
    best = max(c.test_acc for c in cells)
    for c in cells:
        cell = f"{c.test_acc:.3f}"
        row = next(line for line in text.splitlines() if line.startswith(f"| {c.method} |") and "(" not in line)
        assert (f"**{cell}**" if c.test_acc == best else cell) in row
    before = doc.read_bytes()
    bad = BenchSpec(**{**spec.__dict__, "methods": ("fedavg", "fedprox")})
    seen = []

    def stop(cell):
        seen.append(cell)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_report(bad, run_bench(bad, on_cell=stop), doc, tmp_path / "img")
    assert len(seen) == 1 and doc.read_bytes() == before


# ---- a share of attackers that makes none ---------------------------------------------------------------------------
@pytest.mark.parametrize("fraction, clients", [(0.1, 4), (0.01, 30), (1 / 8, 4)])
def test_a_malicious_fraction_that_rounds_to_no_attacker_is_refused_naming_it(fraction, clients):
    """round(0.1 x 4) = 0: the task ran with no attacker at all, without a word (a robust-aggregation experiment
    that attacked nobody). Refused in Task and by ``fl run --malicious``, naming the argument; a share that makes
    one attacker is taken and makes exactly round(share x clients)."""
    with pytest.raises(ValueError, match=rf"malicious_fraction={fraction!r}.*num_clients={clients}"):
        Task(dataset="blobs", num_samples=120, num_features=3, num_classes=2, num_clients=clients,
             malicious_fraction=fraction)  # fmt: skip
    res = CliRunner().invoke(app, [*RUN[:4], "--clients", str(clients), "--per-round", "2", "--malicious",
                                   str(fraction), "--rounds", "1"], env={"COLUMNS": "200"})  # fmt: skip
    assert res.exit_code != 0 and "--malicious" in res.output and "no malicious client" in res.output, res.output
    ok = Task(dataset="blobs", num_samples=120, num_features=3, num_classes=2, num_clients=clients,
              malicious_fraction=fraction * 2 if fraction * 2 * clients >= 0.75 else 1 / clients)  # fmt: skip
    assert sum(ok.is_malicious(p) for p in range(clients)) == round(ok.malicious_fraction * clients) >= 1


def test_client_side_dp_over_an_example_weighted_fedavg_warns_too_and_still_clips_on_the_clients():
    """Flower's client-side fixed clipping over FedAvg() (num-examples weights): the same warning, naming
    weighted_by_key; the clients clip (every reply reports norm_bit 1 at clip 0.01) and the round aggregates all."""
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    task = Task(dataset="blobs", num_samples=240, num_features=4, num_classes=3, num_clients=4, local_steps=3, lr=0.2,
                partitioner="quantity")  # fmt: skip
    s = DifferentialPrivacyClientSideFixedClipping(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), 0.0, 0.01, 4)
    with pytest.warns(UserWarning, match="weighted_by_key='num-examples'"):
        res = simulate(s, task, rounds=1, evaluate=False)
    r = res.history.rounds[0]
    assert r.num_aggregated == 4
    assert all(m.get("norm_bit") == 1 for m in r.client_train.values()), r.client_train


@pytest.mark.parametrize("rows", [[f"{i % 3};{i * 0.1};{i % 2}" for i in range(20)], [str(i % 2) for i in range(20)]],
                         ids=["semicolons", "labels-only"])  # fmt: skip
def test_a_csv_with_no_feature_column_is_refused(tmp_path, rows):
    """A ';'-separated file (one value a row for the csv reader) became 0 features and 19 'classes' made of whole rows,
    and a file of labels only a model with no inputs; both trained without a word. Refused naming data_path."""
    with pytest.raises(ValueError, match="data_path=.*no feature columns"):
        Task(dataset="file", data_path=_csv(tmp_path, rows), num_clients=2)
    np.savez(tmp_path / "empty.npz", x=np.zeros((20, 0)), y=np.arange(20) % 2)
    with pytest.raises(ValueError, match="data_path=.*no feature columns"):
        Task(dataset="file", data_path=str(tmp_path / "empty.npz"), num_clients=2)


@pytest.mark.parametrize("a, b", [("--out", "--checkpoint"), ("--out", "--plot"), ("--plot", "--checkpoint")])
def test_fl_run_refuses_two_of_its_outputs_on_one_file_before_any_round(tmp_path, a, b):
    """``--out run.json --checkpoint run.json``: the history JSON overwrote the checkpoint, and the resume failed on a
    JSON file; ``--plot`` over ``--out`` left a PNG for the history. Refused naming both options, nothing written."""
    same = tmp_path / "same.file"
    res = CliRunner().invoke(app, [*RUN, "--rounds", "1", a, str(same), b, str(tmp_path / "." / "same.file")],
                             env={"COLUMNS": "200"})  # fmt: skip
    assert res.exit_code != 0 and a in res.output and b in res.output, res.output
    assert not same.exists()


@pytest.mark.parametrize("dataset, name, value", [
    ("digits", "num_classes", 3), ("digits", "num_features", 10), ("digits", "num_samples", 100),
    ("digits", "separation", 0.1), ("synthetic", "num_classes", 3), ("synthetic", "num_features", 5),
    ("clustered", "num_samples", 100), ("clustered", "separation", 0.5)])  # fmt: skip
def test_blobs_generator_settings_given_to_another_dataset_are_refused_naming_them(dataset, name, value):
    """``Task(dataset="digits", num_classes=3)`` ran the ten digit classes (Synthetic its 10 classes and 60 features),
    the setting ignored without a word; refused naming the argument and the dataset. The clustered task reads its
    num_features and num_classes, so those are taken."""
    with pytest.raises(ValueError, match=rf"{name}={value!r} with dataset='{dataset}'"):
        Task(dataset=dataset, num_clients=4, **{name: value})
    t = Task(dataset="clustered", num_clients=4, num_features=5, num_classes=3)
    assert (t.features, t.classes) == (5, 3)
