"""Fixtures for the perf tests: a private cache dir, synthetic roofs, a few measurements."""

from __future__ import annotations

import pytest

from tilestack import config
from tilestack.perf import device
from tilestack.perf.metrics import Measurement, compute_metrics, roofs_for

TFLOPS = 1e12
TBPS = 1e12


@pytest.fixture(autouse=True)
def cache_dir(tmp_path):
    """Every test gets its own cache dir (ceilings, result store)."""
    with config.override(cache_dir=tmp_path / "cache"):
        yield tmp_path / "cache"


@pytest.fixture(autouse=True)
def small_cpu_ceilings(monkeypatch):
    """CPU ceilings measured at small sizes within a short budget, so commands that measure them stay fast."""
    monkeypatch.setattr(device, "CPU_COPY_BYTES", 1 << 20)
    monkeypatch.setattr(device, "CPU_MATMUL_N", (64,))
    monkeypatch.setattr(device, "CPU_CEILING_BUDGET_S", 0.2)


@pytest.fixture
def h100() -> device.Device:
    """A device record for an H100 SXM, built without a GPU (the table lookup is the real one)."""
    return device.Device("cuda", "NVIDIA H100 80GB HBM3", 0, device.lookup_peaks("NVIDIA H100 80GB HBM3"),
                         sm_count=132)


@pytest.fixture
def h100_ceilings() -> device.Ceilings:
    """Ceilings like those measured on the project's H100 (ANCHORS.md): 3.02 TB/s copy, 757 TFLOP/s bf16."""
    return device.Ceilings("NVIDIA H100 80GB HBM3", 3.02 * TBPS,
                           {"bf16": 757 * TFLOPS, "fp16": 757 * TFLOPS, "fp32": 51 * TFLOPS, "tf32": 370 * TFLOPS},
                           "2026-11-21T00:00:00+00:00")


@pytest.fixture
def measurements(h100, h100_ceilings) -> list[Measurement]:
    """A compute-bound GEMM and a memory-bound norm on the synthetic H100."""
    roofs = roofs_for(h100, h100_ceilings, "bf16")
    n = 4096
    gemm = compute_metrics(name="gemm", latency_s=2 * n**3 / (600 * TFLOPS), flops=2 * n**3,
                           bytes_read=2 * n * n * 2, bytes_written=n * n * 2, roofs=roofs, device=h100.name,
                           dtype="bf16", config={"BM": 128, "BN": 128})
    rows, cols = 16384, 4096
    moved = 2 * rows * cols * 2
    norm = compute_metrics(name="rmsnorm", latency_s=moved / (1.5 * TBPS), flops=4 * rows * cols,
                           bytes_read=rows * cols * 2, bytes_written=rows * cols * 2, roofs=roofs,
                           device=h100.name, dtype="bf16", config={"BLOCK": 1024}, items=rows, item_name="rows")
    return [gemm, norm]
