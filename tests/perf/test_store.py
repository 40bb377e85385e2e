import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tilestack.perf.store import Store, StoreError, default_path

VERSIONS = {"torch": "2.13", "triton": "3.6"}


def test_default_path_is_under_the_cache_dir(cache_dir):
    assert default_path() == cache_dir / "perf" / "results.sqlite"
    with Store() as st:
        assert st.path.is_file()


def test_append_and_read_back(tmp_path, measurements, h100, h100_ceilings):
    with Store(tmp_path / "r.sqlite") as st:
        run = st.start_run(device=h100, ceilings=h100_ceilings, label="first", command="pytest",
                           versions=VERSIONS)
        for m in measurements:
            st.append(run, m)
        (r,) = st.runs()
        assert r.id == run and r.n_results == 2 and r.device == h100.name and r.versions == VERSIONS
        assert r.ceilings["copy_bytes_per_s"] == h100_ceilings.copy_bytes_per_s and r.host
        assert st.measurements(run) == measurements
        assert st.run("latest").id == st.run(run[:12]).id == st.run("first").id == run
        assert st.latest_result("gemm") == (run, measurements[0])
        assert st.integrity_ok()


def test_unknown_runs_and_devices(tmp_path, measurements):
    with Store(tmp_path / "r.sqlite") as st:
        with pytest.raises(StoreError, match="holds no runs"):
            st.run("latest")
        st.start_run(device="d", versions=VERSIONS)
        with pytest.raises(StoreError, match="run='nope' matches no run"):
            st.run("nope")
        with pytest.raises(StoreError, match="latest~5"):
            st.run("latest~5")
        with pytest.raises(StoreError, match="device='nope'"):
            st.compare("nope", "latest")


def test_compare_two_runs_and_two_devices(tmp_path, measurements):
    gemm, norm = measurements
    faster = dataclasses.replace(gemm, latency_s=gemm.latency_s / 2)
    other = [dataclasses.replace(m, device="NVIDIA H200") for m in (faster, norm)]
    with Store(tmp_path / "r.sqlite") as st:
        a = st.start_run(device=gemm.device, versions=VERSIONS)
        for m in measurements:
            st.append(a, m)
        b = st.start_run(device="NVIDIA H200", versions=VERSIONS)
        for m in other:
            st.append(b, m)
        cmp = st.compare(a, b)
        by_name = {r.name: r for r in cmp.rows}
        assert by_name["gemm"].speedup == pytest.approx(2.0) and by_name["rmsnorm"].speedup == pytest.approx(1.0)
        dev = st.compare("H100", "H200")  # devices, by a unique part of their names
        assert {r.name: r.speedup for r in dev.rows} == {"gemm": pytest.approx(2.0), "rmsnorm": pytest.approx(1.0)}
        assert "device NVIDIA H200" in dev.b_label


def test_a_run_killed_half_way_leaves_a_readable_store(tmp_path):
    db = tmp_path / "killed.sqlite"
    writer = Path(__file__).with_name("_store_writer.py")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, str(writer), str(db)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(20):  # wait until 20 rows are committed
            assert p.stdout.readline(), "the writer died before writing"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    # Nothing closed the connection or checkpointed the WAL: the next reader must still see a whole store.
    with Store(db) as st:
        assert st.integrity_ok()
        ms = st.measurements("latest")
        assert len(ms) >= 20 and [m.name for m in ms[:3]] == ["k0", "k1", "k2"]
        assert st.runs()[0].n_results == len(ms)
    con = sqlite3.connect(db)  # and plain sqlite3 reads it too
    assert con.execute("SELECT COUNT(*) FROM results").fetchone()[0] == len(ms)


def test_a_speed_up_within_the_spread_is_called_noise(tmp_path, measurements):
    from rich.console import Console

    from tilestack.perf import report

    gemm, _ = measurements
    known = dataclasses.replace(gemm, latency_rel_ci=0.01)
    with Store(tmp_path / "r.sqlite") as st:
        a = st.start_run(device=gemm.device, versions=VERSIONS)
        st.append(a, known)
        b = st.start_run(device=gemm.device, versions=VERSIONS)
        st.append(b, dataclasses.replace(known, latency_s=gemm.latency_s / 1.015))  # 1.5% faster: within +-2%
        c = st.start_run(device=gemm.device, versions=VERSIONS)
        st.append(c, dataclasses.replace(known, latency_s=gemm.latency_s / 1.5))
        assert st.compare(a, b).rows[0].within_noise and not st.compare(a, c).rows[0].within_noise
        con = Console(record=True, width=200)
        con.print(report.comparison_table(st.compare(a, b)))
    assert "1.01x (noise)" in con.export_text() or "1.02x (noise)" in con.export_text()
    from tilestack.perf.store import CompareRow

    assert CompareRow("gemm", {}, gemm, gemm).within_noise is None  # rows without a spread: no verdict
