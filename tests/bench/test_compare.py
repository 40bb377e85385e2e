"""Bench records and ``tilestack bench compare``: case-by-case pairing by name and shape across runs and devices,
the ratios, the notices that say when and why runs are not comparable, the record file round trip, and the H100
run converted from its bench.md."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tilestack import config
from tilestack.bench import record
from tilestack.bench.compare import compare
from tilestack.cli import _register, app
from tilestack.perf.metrics import compute_metrics

_register()
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
H100_MD = ROOT / "docs" / "results" / "bench_h100.md"
H100_JSON = ROOT / "docs" / "results" / "bench_h100.json"
H100 = "NVIDIA H100 80GB HBM3"
H200 = "NVIDIA H200"


def result(case, shape, role, latency, device, **tuning):
    name = f"tilestack.{case}" if role == "tilestack" else f"baseline of {case}"
    return compute_metrics(name=name, latency_s=latency, flops=1e12, bytes_read=1e9, bytes_written=1e9,
                           device=device, device_kind="cpu" if device.startswith("cpu") else "cuda", dtype="bf16",
                           config={"case": case, "shape": shape, "role": role, **tuning})


def run_of(device, rows, versions=None):
    """rows: (case, shape, ours latency, baseline latency, tuning)."""
    ms = []
    for case, shape, ours, base, tuning in rows:
        ms += [result(case, shape, "tilestack", ours, device, **tuning), result(case, shape, "baseline", base, device)]
    return record.Record(device, ms, versions or {"torch": "2.11", "triton": "3.6"}, source=f"run on {device}")


def test_pairs_by_case_and_shape_with_ratios_and_notices():
    a = run_of(H100, [("gemm", "4096 bf16", 2.0e-4, 2.2e-4, {"BM": 128}),
                      ("softmax", "8192 bf16", 1.0e-4, 3.0e-4, {"BM": 1}),
                      ("gemm", "8192 bf16", 1.0e-3, 1.0e-3, {})])
    b = run_of(H200, [("softmax", "8192 bf16", 0.5e-4, 2.0e-4, {"BM": 1}),
                      ("gemm", "4096 bf16", 1.6e-4, 2.0e-4, {"BM": 64}),
                      ("layer_norm", "8192 bf16", 1e-4, 1e-4, {})], {"torch": "2.11", "triton": "3.7"})
    cmp = compare(a, b)
    assert cmp.comparable
    got = {(p.case, p.shape): p for p in cmp.pairs}
    assert set(got) == {("gemm", "4096 bf16"), ("softmax", "8192 bf16")}   # shapes must match, not only names
    gemm = got["gemm", "4096 bf16"]
    assert gemm.speedup == pytest.approx(2.0 / 1.6) and gemm.baseline_speedup == pytest.approx(2.2 / 2.0)
    assert gemm.vs_baseline("a") == pytest.approx(1.1) and gemm.vs_baseline("b") == pytest.approx(1.25)
    assert got["softmax", "8192 bf16"].speedup == pytest.approx(2.0)
    assert cmp.only_a == [("gemm", "8192 bf16")] and cmp.only_b == [("layer_norm", "8192 bf16")]
    text = "\n".join(cmp.notices)
    assert "devices differ" in text and H100 in text and H200 in text
    assert "triton 3.6 -> 3.7" in text and "torch" not in text.split("versions differ")[1]
    assert "launch configs differ" in text and "gemm 4096 bf16" in text and "softmax" not in text.split(
        "launch configs differ")[1]
    assert "NOT COMPARABLE" not in text


def test_cpu_small_run_against_a_gpu_run_is_not_comparable():
    cpu = run_of("cpu: AMD EPYC", [("gemm", "128x96x80 bf16", 0.3, 0.02, {})])
    gpu = run_of(H100, [("gemm", "4096x4096x4096 bf16", 2e-4, 2e-4, {})])
    cmp = compare(cpu, gpu)
    assert not cmp.comparable and cmp.pairs == []
    assert cmp.notices[0].startswith("NOT COMPARABLE") and "cpu" in cmp.notices[0] and "cuda" in cmp.notices[0]


def test_record_round_trip(tmp_path):
    rec = run_of(H200, [("gemm", "4096 bf16", 2e-4, 2.2e-4, {"BM": 128})])
    path = rec.write(tmp_path / "r" / "bench.json")
    back = record.Record.read(path)
    assert back.device == H200 and back.versions == rec.versions
    assert [m.to_row() for m in back.measurements] == [m.to_row() for m in rec.measurements]
    (tmp_path / "other.json").write_text(json.dumps({"kind": "something else", "format": 1}))
    with pytest.raises(record.RecordError, match="is not a tilestack bench record"):
        record.Record.read(tmp_path / "other.json")


def test_h100_record_is_its_bench_md_converted():
    rec = record.Record.read(H100_JSON)
    again = record.from_bench_markdown(H100_MD.read_text(), device=rec.device, versions=rec.versions,
                                       started_at=rec.started_at, source=rec.source)
    assert [m.to_row() for m in again.measurements] == [m.to_row() for m in rec.measurements]
    gemm = rec.measurements[0]               # | tilestack.gemm | shape=4096x4096x4096 bf16, BK=64, ... | 183 us |
    assert gemm.name == "tilestack.gemm" and gemm.config["shape"] == "4096x4096x4096 bf16"
    assert gemm.config["BK"] == 64 and gemm.latency_s == pytest.approx(183e-6)
    assert gemm.flops_per_s == pytest.approx(753e12) and gemm.roof_fraction == pytest.approx(0.97)
    assert gemm.joules_per_call == pytest.approx(0.149)
    softmax = rec.measurements[2]
    assert softmax.config["ONE_TILE"] is True and softmax.item_name == "rows"
    assert softmax.items == pytest.approx(8192, rel=2e-3)    # 64.4 M rows/s x 127 us, to three digits


def test_records_without_case_keys_pair_by_name_and_following_baseline():
    # the H100 record predates the runner's case/role keys: tilestack.<case>, then its baseline
    h100 = record.Record.read(H100_JSON)
    faster = [dataclasses.replace(m, device=H200, latency_s=m.latency_s / 2) for m in h100.measurements]
    cmp = compare(h100, record.Record(H200, faster, h100.versions))
    assert len(cmp.pairs) == 6 and all(p.speedup == pytest.approx(2.0) for p in cmp.pairs)
    assert all(p.baseline_speedup == pytest.approx(2.0) for p in cmp.pairs)
    attn = [p for p in cmp.pairs if p.case == "attention_fwd"]
    assert len(attn) == 3 and attn[0].vs_baseline("a") == pytest.approx(1.63 / 1.03)


def test_cli_compare_files_runs_and_devices(tmp_path):
    a = run_of(H100, [("gemm", "4096 bf16", 2e-4, 2.2e-4, {})]).write(tmp_path / "a.json")
    b = run_of(H200, [("gemm", "4096 bf16", 1e-4, 2.0e-4, {})]).write(tmp_path / "b.json")
    r = runner.invoke(app, ["bench", "compare", str(a), str(b)])
    assert r.exit_code == 0, r.output
    assert "gemm" in r.output and "2.00x" in r.output and "devices differ" in r.output
    cpu = run_of("cpu: test", [("gemm", "128 bf16", 1.0, 1.0, {})]).write(tmp_path / "cpu.json")
    r = runner.invoke(app, ["bench", "compare", str(cpu), str(b)])
    assert r.exit_code == 1 and "NOT COMPARABLE" in r.output
    # runs of the result store, by id and by device name
    from tilestack.perf.store import Store

    db = tmp_path / "results.sqlite"
    with Store(db) as st:
        for rec in (record.Record.read(a), record.Record.read(b)):
            run = st.start_run(device=rec.device, label="tilestack bench", command=record.BENCH_COMMAND,
                               versions=rec.versions)
            for m in rec.measurements:
                st.append(run, m)
    r = runner.invoke(app, ["bench", "compare", "H100", "latest", "--db", str(db)])
    assert r.exit_code == 0, r.output
    assert "2.00x" in r.output
    with Store(db) as st:          # a newer run of another kind: `bench compare` counts bench runs only
        st.append(st.start_run(device=H200, label="profile x", command="tilestack profile"),
                  result("mm", "8 bf16", "tilestack", 1e-3, H200))
    r = runner.invoke(app, ["bench", "compare", "latest~1", "latest", "--db", str(db)])
    assert r.exit_code == 0 and "2.00x" in r.output, r.output
    r = runner.invoke(app, ["compare", "latest~1", "latest", "--db", str(db)])   # the store's own meaning
    assert "vs baseline" not in r.output
    r = runner.invoke(app, ["bench", "compare", "A100", "latest", "--db", str(db)])
    assert r.exit_code == 2 and "matches no device" in r.output and "NVIDIA H200" in r.output


def test_bench_writes_a_record_that_compares_with_its_stored_run(tmp_path, monkeypatch):
    # each run times the softmax at its fewest calls (test_bench_cli.fewest_timed_calls): what is checked is the
    # record, the store and the comparison, not the timing
    from tilestack.bench import runner as bench_runner
    from tilestack.perf import timing
    monkeypatch.setattr(timing, "MIN_WARMUP_CALLS", 1)
    monkeypatch.setattr(bench_runner, "CPU_REPEATS", 1)
    with config.override(cache_dir=tmp_path / "cache"):
        out = tmp_path / "out"
        r = runner.invoke(app, ["bench", "-k", "softmax", "--small", "--out", str(out)])
        assert r.exit_code == 0, r.output
        rec = record.Record.read(out / "bench.json")
        assert {m.config["role"] for m in rec.measurements} == {"tilestack", "baseline"}
        r = runner.invoke(app, ["bench", "compare", "latest", str(out / "bench.json")])
        assert r.exit_code == 0, r.output
        assert "softmax" in r.output and "1.00x" in r.output        # the same results on both sides
        r = runner.invoke(app, ["bench", "-k", "softmax", "--small", "--no-store", "--out", str(tmp_path / "again"),
                                "--against", str(out / "bench.json")])
        assert r.exit_code == 0, r.output
        assert "B = this run" in r.output and "vs baseline" in r.output
        r = runner.invoke(app, ["bench", "--against", str(tmp_path / "none.json")])   # refused before any work
        assert r.exit_code == 2 and "no such file" in r.output


def test_tilestack_compare_pairs_bench_records_by_case(tmp_path):
    # `tilestack compare` (the perf command) hands two bench sides to the bench comparison: tuned configs differ
    a = run_of(H100, [("gemm", "4096 bf16", 2e-4, 2.2e-4, {"BM": 128})]).write(tmp_path / "a.json")
    b = run_of(H200, [("gemm", "4096 bf16", 1e-4, 2.0e-4, {"BM": 64})]).write(tmp_path / "b.json")
    r = runner.invoke(app, ["compare", str(a), str(b)])
    assert r.exit_code == 0, r.output
    assert "2.00x" in r.output and "launch configs differ" in r.output
