"""Run a Python script with its stack printed every ``--every`` seconds (faulthandler), to see where a run that
never finishes spends its time on a machine where no profiler attaches (the H200's image: no py-spy).

    PYTHONPATH=src python3 scripts/gpu/trace_stuck.py --every 40 -- scripts/bench_inference.py --worker \
        gpt2-prefill tilestack-fp8-act
"""

from __future__ import annotations

import argparse
import faulthandler
import runpy
import sys

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--every", type=float, default=40.0, help="seconds between stack dumps")
ap.add_argument("script")
ap.add_argument("args", nargs=argparse.REMAINDER)
a = ap.parse_args()
faulthandler.dump_traceback_later(a.every, repeat=True, file=sys.stderr)
sys.argv = [a.script, *a.args]
runpy.run_path(a.script, run_name="__main__")
