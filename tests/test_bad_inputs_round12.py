"""Round twelve of the bad-input sweep, part one: the benchmark's records and result store, and the environment
variables tilestack reads (part two, ``test_bad_inputs_round12_lang.py``: the tile language's kernel decorator,
tunables, launch options and grids).

What rounds 1-11 did not reach, and what it found (each test marked so failed before its fix):
- ``tilestack bench compare`` on a record file whose rows or fields are not what ``--out`` writes (a hand-edited or
  foreign record: ``versions`` a list, a ``config`` or ``name`` of the wrong type, a latency that is a string) ended
  in an AttributeError or TypeError traceback from inside the comparison; a latency of 0, NaN, None or below 0 was
  refused only while printing, as "seconds=None", naming neither the file nor the row. ``Record.read`` now checks
  every row and field the comparison reads and names the file, the row and the field;
- an empty side (``tilestack bench compare "" latest``) is a part of every device name and a prefix of every run id:
  it named the newest run without a word (``Store.run("")`` the only run, ``Store.latest_on_device("")`` the only
  device); ``Store.run(None)`` was an AttributeError;
- ``Store.append`` to a run id that names no run stored the row as an orphan no run lists (SQLite does not enforce
  the REFERENCES clause), without a word; a non-Measurement was an AttributeError, ``start_run(device=None)`` stored
  a run on the device "None"; ``Store(folder)`` failed with sqlite3's "unable to open database file" and a store
  path below a file with a bare FileExistsError;
- ``TRITON_INTERPRET=true`` (or yes, on, TRUE) made Triton interpret while tilestack's knob, which counted only "1",
  said no: on a GPU machine its launches compiled for the GPU and refused CPU tensors with "set
  TRITON_INTERPRET=1". The knob now reads the variable as Triton does;
- ``TILESTACK_CACHE_DIR="~/cache"`` (a "~" the shell did not expand: a quoted value, an env file) made a folder
  named "~" wherever a run started: expanded now;
- the federated ``History.to_json`` wrote its file in place (a write cut short left half a JSON file where the
  previous history was), and ``save_checkpoint`` interrupted mid-pickle (Ctrl-C, an unpicklable strategy) left its
  ``.tmp`` beside the checkpoint: the first writes a temporary and renames it, both remove the temporary.

Checked and left as they are (pinned here): a KeyboardInterrupt inside ``Store.append`` rolls its transaction
back, leaving every earlier row and a store the next append writes to.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tilestack import config
from tilestack.bench.record import Record, RecordError, load_side
from tilestack.cli import _register, app
from tilestack.perf import store as store_mod
from tilestack.perf.metrics import compute_metrics
from tilestack.perf.store import Store, StoreError

_register()

REPO = Path(__file__).resolve().parents[1]
H100 = REPO / "docs" / "results" / "bench_h100.json"


def _flat(text: str) -> str:
    return "".join(re.sub("[\u2500-\u257f]", "", text).split())


def _compare(tmp_path, a, b):
    with config.override(cache_dir=tmp_path / "cache"):
        return CliRunner().invoke(app, ["bench", "compare", str(a), str(b)])


def _record(tmp_path, change) -> Path:
    data = json.loads(H100.read_text())
    change(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


def _set(key, value, row=None):
    def change(data):
        (data if row is None else data["results"][row])[key] = copy.deepcopy(value)
    return change


# (what is edited, the fragment the refusal must hold)
BAD_RECORDS = {
    "versions a list": (_set("versions", [1, 2]), "versions is list [1, 2]; expected an object"),
    "versions a str": (_set("versions", "torch 2.13"), "versions is str 'torch 2.13'"),
    "device_info a str": (_set("device_info", "H100"), "device_info is str 'H100'"),
    "source a number": (_set("source", 5), "source is int 5; expected a string"),
    "started_at a number": (_set("started_at", 5), "started_at is int 5"),
    "results an object": (_set("results", {}), "results is dict; expected a list"),
    "a row a list": (_set("results", [[1, 2]]), "result 0 is list"),
    "latency a str": (_set("latency_s", "fast", 0), "result 0 ('tilestack.gemm'): latency_s='fast'"),
    "latency None": (_set("latency_s", None, 0), "latency_s=None; expected a positive, finite time"),
    "latency 0": (_set("latency_s", 0, 0), "latency_s=0; expected a positive"),
    "latency < 0": (_set("latency_s", -1e-3, 2), "result 2 ('tilestack.softmax'): latency_s=-0.001"),
    "latency NaN": (_set("latency_s", math.nan, 0), "latency_s=nan"),
    "latency inf": (_set("latency_s", math.inf, 0), "latency_s=inf"),
    "latency True": (_set("latency_s", True, 0), "latency_s=True"),
    "config a str": (_set("config", "BM=64", 0), "config='BM=64'; expected an object"),
    "name a number": (_set("name", 5, 0), "result 0: name=5; expected a string"),
    "flops a str": (_set("flops", "x", 1), "result 1 ('torch.matmul (cuBLAS)'): flops='x'; expected a finite count"),
    "bytes_read < 0": (_set("bytes_read", -1.0, 0), "bytes_read=-1.0"),
    "a roof a str": (_set("measured_peak_flops", "x", 0), "measured_peak_flops='x'; expected a finite number"),
    "device_kind a number": (_set("device_kind", 5, 0), "device_kind=5; expected a string"),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_bench_compare_names_the_field_of_a_record_that_is_not_what_out_writes(case, tmp_path):
    change, fragment = BAD_RECORDS[case]
    res = _compare(tmp_path, H100, _record(tmp_path, change))
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit), res.output
    assert _flat(f"record='{tmp_path / 'edited.json'}'") in _flat(res.output), res.output
    assert _flat(fragment) in _flat(res.output), (fragment, res.output)
    with pytest.raises(RecordError, match=re.escape(fragment)):     # the library function says the same
        Record.read(tmp_path / "edited.json")


def test_a_record_as_out_writes_it_still_compares(tmp_path):
    """The checks refuse only what --out never writes: every shipped record reads, and compares with itself."""
    for path in sorted((REPO / "docs" / "results").glob("bench_*.json")):
        rec = Record.read(path)
        assert rec.measurements and all(m.latency_s > 0 for m in rec.measurements), path
    res = _compare(tmp_path, H100, _record(tmp_path, _set("config", None, 0)))    # null config: as an empty one
    assert res.exit_code == 0, res.output


def _store_with_runs(path: Path, devices=("cpu: a",)):
    st = Store(path)
    ids = []
    for dev in devices:
        run = st.start_run(device=dev, versions={}, command="tilestack bench")
        st.append(run, compute_metrics(name="tilestack.softmax", latency_s=1e-3, flops=10.0, bytes_read=8.0,
                                       bytes_written=8.0, device=dev, config={"case": "softmax", "shape": "8x8",
                                                                              "role": "tilestack"}))
        ids.append(run)
    return st, ids


@pytest.mark.parametrize("side", ["", "   "])
def test_an_empty_side_names_no_run(side, tmp_path):
    db = tmp_path / "results.sqlite"
    st, _ = _store_with_runs(db)
    with pytest.raises(StoreError, match=r"run=.*expected a run id"):
        st.run(side)
    with pytest.raises(StoreError, match=r"device=.*expected \(a unique part of\) a device name"):
        st.latest_on_device(side)
    st.close()
    with pytest.raises(RecordError, match="expected a record file"):
        load_side(side, db)
    with config.override(cache_dir=tmp_path):      # the default store is <cache_dir>/perf/results.sqlite
        (tmp_path / "perf").mkdir()
        db.rename(tmp_path / "perf" / "results.sqlite")
        res = CliRunner().invoke(app, ["bench", "compare", side, "latest"])
    assert res.exit_code == 2 and "expected a record file" in res.output, res.output


@pytest.mark.parametrize("ref", [None, 5, b"latest"])
def test_a_run_named_by_no_str_is_refused_by_name(ref, tmp_path):
    st, _ = _store_with_runs(tmp_path / "r.sqlite")
    with st, pytest.raises(StoreError, match=re.escape(f"run={ref!r}")):
        st.run(ref)


def _count(st: Store) -> int:
    return st._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]


def test_a_result_for_a_run_that_does_not_exist_is_refused_and_not_stored(tmp_path):
    st, (run,) = _store_with_runs(tmp_path / "r.sqlite")
    m = st.measurements(run)[0]
    with st:
        with pytest.raises(StoreError, match=r"run_id='nosuch' names no run"):
            st.append("nosuch", m)
        with pytest.raises(StoreError, match=r"m='x' \(str\); expected a perf.Measurement"):
            st.append(run, "x")
        with pytest.raises(StoreError, match=r"device=None; expected the device"):
            st.start_run(device=None)
        assert _count(st) == 1 and [r.id for r in st.runs()] == [run]
        st.append(run, m)                      # the run itself still takes results
        assert st.run(run).n_results == 2


def test_a_store_path_that_is_a_folder_or_below_a_file_is_named(tmp_path):
    with pytest.raises(StoreError, match=r"is a folder; expected a SQLite file path"):
        Store(tmp_path)
    (tmp_path / "f").write_text("not a folder")
    with pytest.raises(StoreError, match=r"below the file .*f'; expected a SQLite file path"):
        Store(tmp_path / "f" / "results.sqlite")
    assert (tmp_path / "f").read_text() == "not a folder"


def test_an_append_interrupted_inside_its_transaction_keeps_the_store(tmp_path, monkeypatch):
    """A KeyboardInterrupt raised while the row is being written (inside BEGIN IMMEDIATE) rolls it back: the earlier
    rows are there, the store holds no open transaction (the next append commits), and another connection reads it
    whole."""
    path = tmp_path / "r.sqlite"
    st, (run,) = _store_with_runs(path)
    m = st.measurements(run)[0]
    canon = store_mod._canon

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod, "_canon", interrupted)
    with pytest.raises(KeyboardInterrupt):
        st.append(run, m)
    monkeypatch.setattr(store_mod, "_canon", canon)
    assert _count(st) == 1
    st.append(run, m)
    st.close()
    with Store(path) as again:
        assert again.integrity_ok() and again.run(run).n_results == 2
        assert [x.latency_s for x in again.measurements(run)] == [1e-3, 1e-3]


def _knobs_in_a_fresh_process(env: dict, code: str) -> list:
    full = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TILESTACK_CACHE_DIR")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300,
                         cwd=env.get("CWD"))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True),
                                       ("0", False), ("false", False), ("off", False), ("2", False)])
def test_the_interpret_knob_reads_triton_interpret_as_triton_does(value, on):
    code = ("import json, triton; from tilestack import config; "
            "print(json.dumps([config.knobs.triton_interpret, triton.knobs.runtime.interpret]))")
    ours, triton_says = _knobs_in_a_fresh_process({"TRITON_INTERPRET": value}, code)
    assert triton_says is on, (value, triton_says)      # the reference: Triton's own reading
    assert ours is on, f"TRITON_INTERPRET={value!r}: tilestack read {ours}, Triton {triton_says}"


def test_a_cache_dir_with_an_unexpanded_home_is_expanded(tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    code = "import json; from tilestack import config; print(json.dumps([str(config.knobs.cache_dir)]))"
    (got,) = _knobs_in_a_fresh_process({"TILESTACK_CACHE_DIR": "~/ts-cache", "HOME": str(home), "CWD": str(cwd)},
                                       code)
    assert got == str(home / "ts-cache")
    assert not (cwd / "~").exists()


def _cut_short(monkeypatch, target, name):
    """``target.name`` writing half its text, then a KeyboardInterrupt: a write interrupted mid-way."""
    real = getattr(target, name)

    def half(self, text, *a, **k):
        real(self, text[: len(text) // 2], *a, **k)
        raise KeyboardInterrupt
    monkeypatch.setattr(target, name, half)


def test_a_federated_history_written_half_way_keeps_the_previous_one(tmp_path, monkeypatch):
    from tilestack.federated.metrics import History, RoundMetrics

    path = tmp_path / "history.json"
    History([RoundMetrics(round=1, test_acc=0.5)]).to_json(path)
    before = path.read_text()
    _cut_short(monkeypatch, os, "write")      # (tilestack.files.write_atomic writes through os.write)
    with pytest.raises(KeyboardInterrupt):
        History([RoundMetrics(round=1, test_acc=0.5), RoundMetrics(round=2, test_acc=0.6)]).to_json(path)
    monkeypatch.undo()
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["history.json"]
    assert json.loads(before)["rounds"][0]["round"] == 1


def test_a_federated_checkpoint_interrupted_mid_pickle_leaves_no_temporary(tmp_path, monkeypatch):
    from tilestack.federated import driver

    path = tmp_path / "ckpt.pkl"
    driver.save_checkpoint(path, {"round": 1})
    before = path.read_bytes()

    def interrupted(self, obj):       # the temporary is open (and empty) when the pickling is cut short
        raise KeyboardInterrupt

    monkeypatch.setattr(driver._Pickler, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        driver.save_checkpoint(path, {"round": 2})
    monkeypatch.undo()
    with pytest.raises(Exception, match="Can't pickle|can't pickle|cannot pickle"):
        driver.save_checkpoint(path, {"round": 2, "fn": lambda: 0})          # an unpicklable state
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ckpt.pkl"]
