"""Benchmark suites: tilestack's kernels beside their baselines, in one process, on one device.

    tilestack bench                   # the CLI
    from tilestack.bench import run_suite
"""

from tilestack.bench.runner import BenchRow, run_suite

__all__ = ["BenchRow", "run_suite"]
