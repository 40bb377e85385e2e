"""Nothing is lost on a fault, round three (2 of 2): stores from a newer tilestack or another program, an interrupted
``tilestack tune`` (SIGINT), a bench run killed mid-append read back by ``tilestack bench compare``.
Workers: tests/_faults_workers_round3.py."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

WORKERS = Path(__file__).with_name("_faults_workers_round3.py")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), **extra}


# ---- stores from a newer format, or another program -----------------------------------------------------------------
def test_a_tuned_table_of_a_newer_format_says_so(tmp_path):
    """A table written by a newer tilestack (format 4) was refused as 'a table from before device keys'."""
    from tilestack.tune.cache import ConfigCache
    from tilestack.tune.devices import DeviceKey

    dev = DeviceKey.parse("sm90-132sm-227kb", name="NVIDIA H200")
    path = tmp_path / "tuned" / f"{dev}.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"format": 4, "device": dev.meta(), "entries": {}}))
    with pytest.raises(ValueError, match=r"format 4.*newer tilestack.*reads formats \(2, 3\)") as e:
        ConfigCache(tmp_path, tables_dir=None)
    assert str(path) in str(e.value) and "before device keys" not in str(e.value)


def test_an_empty_result_store_file_is_a_new_store(tmp_path):
    from tilestack.perf.store import Store

    db = tmp_path / "results.sqlite"
    db.write_bytes(b"")                                  # touched, never written: SQLite's empty database
    with Store(db) as st:
        assert st.runs() == []
        st.start_run(device="cpu: test", versions={})
        assert len(st.runs()) == 1


def test_a_result_store_of_a_newer_schema_is_refused_by_name(tmp_path):
    """A store whose schema is newer than this tilestack's was appended to without a word."""
    from tilestack.perf.store import SCHEMA_VERSION, Store, StoreError

    db = tmp_path / "results.sqlite"
    Store(db).close()
    with sqlite3.connect(db) as c:
        c.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StoreError, match=rf"result store {db}: schema {SCHEMA_VERSION + 1} is newer"):
        Store(db)


def test_another_programs_sqlite_file_is_refused_by_name(tmp_path):
    """A SQLite file of another program with a 'runs' table of its own: the store opened it, and the first
    start_run failed with sqlite3's 'table runs has 2 columns but 9 values were supplied'."""
    from tilestack.perf.store import Store, StoreError

    db = tmp_path / "results.sqlite"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE runs (a, b)")
        c.execute("INSERT INTO runs VALUES (1, 2)")
    with pytest.raises(StoreError, match=rf"result store {db}: table runs lacks the columns .*started_at"):
        Store(db)
    with sqlite3.connect(db) as c:                       # nothing changed
        assert c.execute("SELECT * FROM runs").fetchall() == [(1, 2)]


# ---- interrupted commands ---------------------------------------------------------------------------------------
def test_tilestack_tune_interrupted_by_sigint_keeps_its_winners(tmp_path):
    """Ctrl-C (SIGINT) in the second problem's search: exit 130, no traceback, the first winner in the table."""
    from tilestack.tune.cache import Table

    cache = tmp_path / "cache"
    # a budget the second search cannot run out of before the signal: with 6 s, a loaded CI machine (2026-12-07) spent
    # it all on the first problem, the second ended at once and the run exited 0 before SIGINT came
    p = subprocess.Popen([sys.executable, "-m", "tilestack.cli", "tune", "--small", "--as-device", "sm89-128sm-99kb",
                          "-k", "gemm", "--dtype", "bfloat16", "--budget-s", "60"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env(TILESTACK_CACHE_DIR=str(cache), COLUMNS="200"))
    try:
        for line in p.stdout:
            if " tried" in line:                         # the first winner's line, printed once it is written
                break
        else:
            pytest.fail("tilestack tune ended before a winner")
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and "Traceback" not in err, err[-3000:]
    entries = Table.read(cache / "tuned" / "sm89-128sm-99kb.json").entries
    assert "gemm|bfloat16|64" in entries and entries["gemm|bfloat16|64"]["seconds"] > 0
    assert not [f for f in (cache / "tuned").iterdir() if f.suffix == ".tmp"]


def test_a_bench_run_killed_mid_append_leaves_a_store_compare_reads(tmp_path):
    """A `tilestack bench` run SIGKILLed while it appends: the store is whole, the killed run holds every row it
    committed, and `tilestack bench compare` of the whole run before against it works (exit 0, both cases)."""
    from tilestack.perf.store import Store

    db = tmp_path / "results.sqlite"
    p = subprocess.Popen([sys.executable, str(WORKERS), "bench-run", str(db), "x"], stdout=subprocess.PIPE, text=True,
                         env=_env())
    try:
        for _ in range(7):
            assert p.stdout.readline(), "the bench writer died"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
    with Store(db) as st:
        assert st.integrity_ok()
        killed, whole = st.runs()[:2]
        assert whole.n_results == 4 and killed.n_results >= 7
    r = subprocess.run([sys.executable, "-m", "tilestack.cli", "bench", "compare", "latest~1", "latest", "--db",
                        str(db)], capture_output=True, text=True, env=_env(COLUMNS="200"), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "case-0" in r.stdout and "case-1" in r.stdout, r.stdout[-3000:]
