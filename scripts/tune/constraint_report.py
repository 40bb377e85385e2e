"""How precise the constrained spaces are, per library kernel: raw product of the kernel's declared tunables
times the backend's searched options (and of the library's narrower tuning domains), valid, kept; of a sample of
the kept configs how many compile for sm_90a (AOT, on this CPU) and compute the right result (Triton's interpreter on
small inputs); of a sample of the dropped ones how many compile after all (wrongly dropped).

    PYTHONPATH=src python3 scripts/tune/constraint_report.py --out docs/results/constraints_sm90a.json

Compiles are cached (``tune.aot``): a second run costs file reads. --per-kept / --per-dropped bound the samples
(seeded); --time-limit stops starting new groups. The last lines are a table.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import time
from pathlib import Path

from common import config_key, small_workload, study_problems

from tilestack.tune import aot
from tilestack.tune.cache import write_json_atomic
from tilestack.tune.constraints import ConstrainedSpace, problem_args, problem_domains
from tilestack.tune.devices import DeviceKey
from tilestack.tune.space import SearchSpace

TOL = 2e-2       # relative error against the reference, as `tilestack tune` checks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="sm90-132sm-227kb")
    ap.add_argument("-k", "--kernel", action="append")
    ap.add_argument("--per-kept", type=int, default=12)
    ap.add_argument("--per-dropped", type=int, default=6, help="per kind of drop: hard and soft")
    ap.add_argument("--time-limit", type=float, default=3000)
    ap.add_argument("--no-run", action="store_true", help="skip the interpreter runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="keep the groups --out has; study the others")
    a = ap.parse_args(argv)
    reason = aot.missing_tools()
    if reason:
        print(f"cannot compile for sm_90a here: {reason}")
        return 2
    dev = DeviceKey.parse(a.device)
    rng = random.Random(a.seed)
    t_end = time.monotonic() + a.time_limit
    groups, seen_kernels = [], set()
    if a.resume and a.out.exists():
        groups = json.loads(a.out.read_text())["groups"]
        seen_kernels = {(g["kernel"], ast.literal_eval(g["fixed"]).get("D")) for g in groups}
    for p in study_problems(a.kernel):
        group = (p.kernel, p.fixed.get("D"))
        if group in seen_kernels or p.fixed.get("causal"):
            continue                  # one group per kernel (attention: per head dim; the mask compiles alike)
        seen_kernels.add(group)
        if time.monotonic() > t_end:
            print("time limit: stopping")
            break
        groups.append(study(p, dev, rng, a))
        write_json_atomic(a.out, {"device": str(dev), "target": "sm_90a", "groups": groups})
        print_row(groups[-1], flush=True)
    print_table(groups)
    return 0


def study(p, dev, rng, a) -> dict:
    t0 = time.monotonic()
    args = problem_args(p)
    space = ConstrainedSpace(p.tile, args, p.fixed, SearchSpace(p.tile, fixed=p.fixed).domains(), dev)
    library = ConstrainedSpace(p.tile, args, p.fixed, problem_domains(p), dev).summary()
    est = space.estimates()
    kept = [e for e in est if e.kept]
    hard = [e for e in est if not e.valid]
    soft = [e for e in est if e.valid and not e.kept]
    sample = rng.sample(kept, min(a.per_kept, len(kept)))
    work = None if a.no_run else small_workload(p)
    rows = []

    def compile_row(e, group):
        r = aot.resources(p.tile, args, p.fixed, e.config, shared_limit=dev.shared_bytes)
        row = {"config": e.config, "group": group, "est_registers": e.registers, "est_shared": e.shared_bytes,
               "register_limit": e.register_limit, "reasons": e.hard + e.soft, **r.to_json()}
        if work is not None and r.ok:             # dropped ones too: a coverage drop compiles but is wrong
            try:
                err = work.check(e.config)
                row["rel_err"] = err
                row["correct"] = bool(err <= TOL)
            except Exception as ex:  # noqa: BLE001 - a config that fails to run is reported, not fatal
                row["correct"], row["run_error"] = False, f"{type(ex).__name__}: {str(ex)[:160]}"
        rows.append(row)

    for e in sample:
        compile_row(e, "kept")
    for kind, pool in (("hard", hard), ("soft", soft)):
        for e in rng.sample(pool, min(a.per_dropped, len(pool))):
            compile_row(e, kind)
    s = space.summary()
    k = [r for r in rows if r["group"] == "kept"]
    return {"kernel": p.kernel, "signature": p.signature, "shape": p.label, "fixed": repr(p.fixed), **s,
            "library_raw": library["raw"], "library_valid": library["valid"], "library_kept": library["kept"],
            "kept_sampled": len(k), "kept_compiled": sum(r["ok"] for r in k),
            "kept_spill_free": sum(r["ok"] and not r.get("spills") for r in k),
            "kept_correct": sum(bool(r.get("correct")) for r in k),
            "hard_sampled": sum(r["group"] == "hard" for r in rows),
            "hard_compiled": sum(r["ok"] for r in rows if r["group"] == "hard"),
            "hard_correct": sum(bool(r.get("correct")) for r in rows if r["group"] == "hard"),
            "soft_sampled": sum(r["group"] == "soft" for r in rows),
            "soft_compiled": sum(r["ok"] for r in rows if r["group"] == "soft"),
            "soft_spill_free": sum(r["ok"] and not r.get("spills") for r in rows if r["group"] == "soft"),
            "soft_correct": sum(bool(r.get("correct")) for r in rows if r["group"] == "soft"),
            "seconds": round(time.monotonic() - t0, 1),
            "configs": {config_key(r["config"]): r for r in rows}}


COLS = ("kernel", "fixed", "raw", "valid", "kept", "library_raw", "library_kept", "kept_sampled", "kept_compiled",
        "kept_spill_free", "kept_correct", "hard_sampled", "hard_compiled", "hard_correct", "soft_sampled",
        "soft_compiled", "soft_spill_free", "soft_correct")


def print_row(g, flush=False):
    print(" ".join(f"{g[c]}" for c in COLS) + f"  ({g['seconds']} s)", flush=flush)


def print_table(groups):
    head = ("kernel", "constants", "raw", "valid", "kept", "lib.raw", "lib.kept", "k.samp", "k.comp", "k.nospill",
            "k.correct", "h.samp", "h.comp", "h.correct", "s.samp", "s.comp", "s.nospill", "s.correct")
    widths = [22, 34] + [9] * (len(head) - 2)
    print(" ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths, strict=True))))
    tot = {c: 0 for c in COLS[2:]}
    for g in groups:
        cells = [g["kernel"][:22], g["fixed"][:34], *(str(g[c]) for c in COLS[2:])]
        print(" ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))))
        for c in COLS[2:]:
            tot[c] += g[c]
    cells = ["total", "", *(str(tot[c]) for c in COLS[2:])]
    print(" ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))))


if __name__ == "__main__":
    sys.exit(main())
