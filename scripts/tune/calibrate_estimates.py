"""How close the IR's estimates (tune.constraints) are to what sm_90a compiles give, on the configs the constraint
report compiled: shared memory (exact bytes) and registers per thread (ratio), per kernel.

    PYTHONPATH=src python3 scripts/tune/calibrate_estimates.py docs/results/constraints_sm90a.json

Estimates are recomputed with the current rules (the report's stored ones may be older); compiles are read from
the report. The last lines are a table.
"""

from __future__ import annotations

import json
import statistics
import sys

from common import study_problems

from tilestack.tune.constraints import estimate, problem_args
from tilestack.tune.devices import DeviceKey


def main(path: str) -> int:
    report = json.load(open(path))
    dev = DeviceKey.parse(report["device"])
    problems = {(p.kernel, repr(p.fixed)): p for p in study_problems()}
    print(f"{'kernel':22} {'constants':32} {'n':>3} {'shared exact':>12} {'shared |err| KiB':>16} "
          f"{'regs est/aot':>12} {'under':>5} {'spill caught':>12}")
    for g in report["groups"]:
        p = problems.get((g["kernel"], g["fixed"]))
        if p is None:
            continue
        args = problem_args(p)
        rows = []
        for r in g["configs"].values():
            if r.get("shared_bytes") is None or r.get("registers") is None:
                continue
            e = estimate(p.tile, args, p.fixed, r["config"], dev)
            if not e.threads or e.hard and not e.registers:
                continue
            rows.append((e, r))
        if not rows:
            continue
        err = [abs(e.shared_bytes - r["shared_bytes"]) for e, r in rows]
        exact = sum(x <= 1024 for x in err)           # within Triton's barriers and reduction scratch
        ratio = [e.registers / max(1, r["registers"]) for e, r in rows if r["spills"] == 0]
        under = sum(x < 0.8 for x in ratio)
        spilled = [(e, r) for e, r in rows if r["spills"]]
        caught = sum(any(s.startswith("registers") for s in e.soft) for e, r in spilled)
        med = statistics.median(ratio) if ratio else float("nan")
        print(f"{g['kernel'][:22]:22} {g['fixed'][:32]:32} {len(rows):>3} {exact:>8}/{len(rows):<3} "
              f"{statistics.median(err) / 1024:>16.1f} {med:>12.2f} {under:>5} {caught:>8}/{len(spilled):<3}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/results/constraints_sm90a.json"))
