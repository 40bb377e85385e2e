"""``tilestack bench`` end to end on this machine at small sizes: the table, the three report files, and a
non-zero exit when a kernel's correctness check fails (a NaN left in the output, or a finite wrong result).
The ceilings are measured once per module into a private cache dir; --no-store writes no result store."""

import importlib

import pytest
import torch
from typer.testing import CliRunner

from tilestack import config
from tilestack.cli import _register, app

cases_module = importlib.import_module("tilestack.bench.cases")
runner_module = importlib.import_module("tilestack.bench.runner")
timing_module = importlib.import_module("tilestack.perf.timing")

_register()
runner = CliRunner()


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def cache_dir(module_cache):
    with config.override(cache_dir=module_cache):
        yield module_cache


def fewest_timed_calls(monkeypatch):
    """bench's timing of a kernel on a CPU at its fewest calls: one warm-up, one timed (not 5 + 3). Each call of
    the softmax under Triton's interpreter takes ~6 s on 2 busy cores; where a test checks what bench does with
    a result (a failed check, a record), not the timing, these calls were most of its time
    (test_bench_softmax_passes_and_writes_reports and tests/bench/test_import_order.py time at the defaults)."""
    monkeypatch.setattr(timing_module, "MIN_WARMUP_CALLS", 1)
    monkeypatch.setattr(runner_module, "CPU_REPEATS", 1)


def bench(out, *extra):
    return runner.invoke(app, ["bench", "-k", "softmax", "--small", "--no-store", "--out", str(out), *extra])


def test_bench_softmax_passes_and_writes_reports(cache_dir, tmp_path):
    out = tmp_path / "bench"
    r = bench(out)
    assert r.exit_code == 0, r.output
    assert "softmax" in r.output and "ok" in r.output and "FAIL" not in r.output
    assert "torch.softmax" in r.output                                  # the baseline beside it
    assert "attention" not in r.output.split("tilestack bench on")[-1]  # -k softmax: only softmax rows
    html, png, md = out / "report.html", out / "roofline.png", out / "bench.md"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tilestack.softmax" in html.read_text() and "tilestack.softmax" in md.read_text()
    assert not (cache_dir / "perf" / "results.sqlite").exists(), "--no-store wrote the result store"


def _unwritten(x, *, out=None, backend=None, **config):
    """A softmax that forgets to write: the bench's output stays NaN."""
    return torch.full_like(x, float("nan")) if out is None else out


def _off_by_ten_percent(x, *, out=None, backend=None, **config):
    return torch.softmax(x.float(), -1).to(x.dtype) * 1.1


@pytest.mark.parametrize("broken", [_unwritten, _off_by_ten_percent], ids=("nan", "wrong"))
def test_bench_fails_on_a_wrong_kernel(cache_dir, tmp_path, monkeypatch, broken):
    fewest_timed_calls(monkeypatch)
    monkeypatch.setattr(cases_module, "softmax", broken)
    r = bench(tmp_path / "bench")
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.output
    assert "correctness check failed: softmax" in r.output
