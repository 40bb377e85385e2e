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
ap.add_argument("--cheap-lowering-errors", action="store_true", help="Inductor's LoweringException names the "
                "op and its arguments' types only: its full message prints every argument's IR, which took minutes "
                "on a 12-layer graph (the fp8-act prefill, session 11)")
ap.add_argument("script")
ap.add_argument("args", nargs=argparse.REMAINDER)
a = ap.parse_args()
if a.cheap_lowering_errors:
    import torch._inductor.exc as inductor_exc
    import torch._inductor.graph as inductor_graph

    def _operator_str(target, args, kwargs):
        return f"{target}({', '.join(type(x).__name__ for x in args)}; {sorted(kwargs)})"
    inductor_exc.operator_str = _operator_str
    if hasattr(inductor_graph, "operator_str"):     # graph.py's own name for it (the H200 run: graph.py:1319)
        inductor_graph.operator_str = _operator_str
faulthandler.dump_traceback_later(a.every, repeat=True, file=sys.stderr)
sys.argv = [a.script, *a.args]
runpy.run_path(a.script, run_name="__main__")
