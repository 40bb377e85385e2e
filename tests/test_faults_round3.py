"""Nothing is lost on a fault, round three: what rounds one and two left out. Two real processes writing one store at
once (no lost update, no corrupt file); a disk that fills up in a write (``os.replace`` or ``os.fsync`` raising
ENOSPC in a worker process); stores that exist but are empty, from a newer format, or another program's SQLite
file; a cache folder that is a file; a bench run killed mid-append read by ``tilestack bench compare``.

After each fault the next run loads the last good state or starts clean with one clear warning; nothing crashes,
nothing half-written is read, nothing damaged is used without a word. Workers: tests/_faults_workers_round3.py.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

WORKERS = Path(__file__).with_name("_faults_workers_round3.py")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), **extra}


def _race(what: str, target: Path, n: int, tags=("a", "b")) -> list[dict]:
    """Two worker processes writing ``target`` at once (both wait for a line on stdin, then write n times)."""
    procs = [subprocess.Popen([sys.executable, str(WORKERS), what, str(target), tag, str(n)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()) for tag in tags]
    for p in procs:
        assert p.stdout.readline() == "ready\n", p.stderr.read()[-2000:]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.splitlines()[-1]))
    return out


def _fresh_measure():
    from tilestack.compile import measure
    measure._memory.clear()
    measure._loaded = False
    return measure


# ---- two processes, one store -------------------------------------------------------------------------------------
def test_two_processes_storing_compile_measurements_keep_each_others(tmp_path):
    """compile.measure re-reads the file before it writes (to merge another process's entries), but without a
    lock: a process that read before the other wrote replaced the other's entries with its own older view."""
    n = 15
    _race("measure", tmp_path, n)
    data = json.loads((tmp_path / "compile_measure.json").read_text())      # whole JSON
    tags = {k.split("|")[1] for k in data}
    assert tags == {f"{t}-{i}" for t in "ab" for i in range(n)}, sorted({f"{t}-{i}" for t in "ab"
                                                                         for i in range(n)} - tags)[:10]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_two_processes_appending_to_the_result_store_keep_every_row(tmp_path):
    from tilestack.perf.store import Store

    n = 40
    runs = [r["run"] for r in _race("store", tmp_path / "results.sqlite", n)]
    with Store(tmp_path / "results.sqlite") as st:
        assert st.integrity_ok()
        for tag, run in zip("ab", runs, strict=True):
            names = [m.name for m in st.measurements(run)]
            assert names == [f"{tag}-{i}" for i in range(n)]               # every row, in order, in its own run


def test_two_processes_saving_one_federated_checkpoint_leave_a_whole_one(tmp_path):
    """Two runs saving one checkpoint path (a mistake, but one a shared folder makes easy): both wrote one
    temporary, ``<name>.tmp``; the second truncated the first's mid-write and one rename found it gone."""
    from tilestack.federated.driver import load_checkpoint

    path = tmp_path / "run.ckpt"
    results = _race("federated", path, 150)
    assert [r["errors"] for r in results] == [[], []]
    state = load_checkpoint(path)
    assert state["tag"] in "ab" and (state["arrays"] == float(state["round"])).all()
    assert os.listdir(tmp_path) == ["run.ckpt"]


# ---- a full disk --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["replace", "fsync"])
def test_a_full_disk_keeps_every_stores_last_good_state(tmp_path, where):
    """Each store written once, then again with ``os.<where>`` failing with ENOSPC: the caches (tuned configs,
    compile measurements) warn and keep the new value for this process; the files a user asked for (a bench
    record, a federated checkpoint) raise the OSError. Every file on disk is the first write's, whole; no
    temporary is left. (Before, compile.measure and bench records did not fsync: a disk that filled up as the
    data was flushed went unnoticed, and a power cut could leave an empty file renamed over the good one.)"""
    from tilestack.bench.record import Record
    from tilestack.federated.driver import load_checkpoint
    from tilestack.tune.cache import Table

    r = subprocess.run([sys.executable, str(WORKERS), "full", str(tmp_path), where], capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    nospace = os.strerror(28)
    assert out["tune"] == "ok" and out["measure"] == "ok"
    assert [w for w in out["tune_warnings"] if "tuned config not saved" in w and nospace in w] == \
        out["tune_warnings"] and len(out["tune_warnings"]) == 1
    assert len(out["measure_warnings"]) == 1 and "cannot write" in out["measure_warnings"][0] and \
        nospace in out["measure_warnings"][0]
    assert out["record"].startswith("OSError 28") and out["federated"].startswith("OSError 28")
    assert out["tune_in_process"] == {"BM": 128} and out["measure_in_process"]
    assert out["files"] == ["bench/bench.json", "cache/compile_measure.json", "cache/tuned/sm90-132sm-227kb.json",
                            "fed/run.ckpt"]
    assert set(Table.read(tmp_path / "cache" / "tuned" / "sm90-132sm-227kb.json").entries) == {"gemm|sig|1024"}
    assert set(json.loads((tmp_path / "cache" / "compile_measure.json").read_text())) == {"k0"}
    assert Record.read(tmp_path / "bench" / "bench.json").device == "cpu: 0"
    assert load_checkpoint(tmp_path / "fed" / "run.ckpt")["round"] == 0


def test_the_result_store_full_says_so(tmp_path):
    """SQLite's own "database or disk is full" (a page limit stands in for the disk): the append's transaction was
    already rolled back by SQLite, and our ROLLBACK then raised "cannot rollback - no transaction is active",
    hiding the cause. The cause is raised; the rows committed before are all there and the store is whole."""
    from _faults_workers_round3 import measurement
    from tilestack.perf.store import Store

    db = tmp_path / "results.sqlite"
    with Store(db) as st:
        run = st.start_run(device="cpu: test", versions={})
        st.append(run, measurement("before"))
        st._db.execute(f"PRAGMA max_page_count={st._db.execute('PRAGMA page_count').fetchone()[0] + 2}")
        with pytest.raises(sqlite3.OperationalError, match="full"):
            for i in range(50):
                st.append(run, measurement(f"big-{i}", 1e-3) if i else measurement("x" * 20000))
    with Store(db) as st:
        assert st.integrity_ok() and st.measurements(run)[0].name == "before"
        st.append(run, measurement("after"))                      # the limit was this connection's only
        assert st.measurements(run)[-1].name == "after"


def test_bench_goes_on_when_the_store_fills_up(tmp_path):
    """An append that fails mid-run (the disk full) cost the whole bench run with a sqlite3 traceback: the cases
    measured are reported all the same, with one warning that this run's results are no longer stored (the rows
    committed before are kept), and the store is not tried again for the run's later cases."""
    from _faults_workers_round3 import measurement
    from tilestack.bench import runner
    from tilestack.perf.store import Store

    st = Store(tmp_path / "results.sqlite")
    run = st.start_run(device="cpu: test", versions={})
    rows = [runner.BenchRow(None, "ok", measurement(f"ours-{i}"), measurement(f"base-{i}")) for i in range(4)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for i, row in enumerate(rows):
            if i == 2:
                st._db.execute("PRAGMA max_page_count=1")           # full from here on
            st = runner._append_row(st, run, row) if st is not None else None
    said = [str(w.message) for w in seen]
    assert st is None and len(said) == 1, said
    assert "database or disk is full" in said[0] and "not stored" in said[0] and str(tmp_path) in said[0]
    with Store(tmp_path / "results.sqlite") as again:
        assert [m.name for m in again.measurements(run)] == ["ours-0", "base-0", "ours-1", "base-1"]
