"""Benchmark suites: tilestack's kernels, and training steps of two language models, beside their baselines, in one
process, on one device; runs kept in the result store and as record files, compared across runs and devices.

    tilestack bench                                   # the CLI: run the suite
    tilestack bench compare docs/results/bench_h100.json latest
    from tilestack.bench import run_suite             # cases.py (kernels), steps.py (model steps), runner.py
    from tilestack.bench.compare import compare       # record.py: a run as a JSON file
"""

from tilestack.bench.runner import BenchRow, run_suite

__all__ = ["BenchRow", "run_suite"]
