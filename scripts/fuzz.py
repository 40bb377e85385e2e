"""Fuzz the kernel library against float64 PyTorch (see tilestack.testing.fuzz).

    PYTHONPATH=src python scripts/fuzz.py --budget 2000 --device cpu            # reference + Triton interpreter
    PYTHONPATH=src python scripts/fuzz.py --budget 10000 --device cuda --json fuzz_gpu.json
    PYTHONPATH=src python scripts/fuzz.py --seed 0 --start 417 --budget 1 -v    # replay one problem
    PYTHONPATH=src python scripts/fuzz.py --budget 10000 --device cuda --workers 14   # 14 processes, one GPU

A GPU run is bound by compiling each new kernel variant on the host, so --workers N runs N processes, each
taking every N-th problem (they share Triton's on-disk cache), and merges their reports.

A large budget can be split into chunks (--start 0 --budget 5000, then --start 5000 --budget 5000): problem i
is the same whatever the chunk. With --time-limit a run stops early and prints where to continue. Exit status 1
when any problem failed.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=200, help="number of problems")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="index of the first problem")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--backends", default=None, help="comma-separated (default: reference,triton on cpu; "
                                                     "triton on cuda)")
    ap.add_argument("--kinds", default=None, help="comma-separated kinds (gemm,softmax,layer_norm,rms_norm,"
                    "layer_norm_bwd,rms_norm_bwd,attention; the public ops' sdpa_op,norm_op,rotary_op,swiglu_op,"
                    "cross_entropy_op), or 'public' (those five) or 'all'; default: the kernels' kinds")
    ap.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds")
    ap.add_argument("--json", default=None, help="write the full report here")
    ap.add_argument("--workers", type=int, default=1, help="processes sharing the budget (compile-bound GPU runs)")
    ap.add_argument("--shard", default=None, help=argparse.SUPPRESS)   # "w/n": set by --workers for its children
    ap.add_argument("-v", "--verbose", action="store_true", help="print every problem")
    args = ap.parse_args(argv)

    if args.workers < 1:
        ap.error(f"--workers must be >= 1; got {args.workers}")
    if args.workers > 1:
        return run_workers(args, argv if argv is not None else sys.argv[1:])

    import torch

    if args.device == "cpu" and not torch.cuda.is_available():
        from tilestack.config import use_triton_interpreter
        use_triton_interpreter()               # before Triton is first imported
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU here")

    from tilestack.testing.fuzz import ALL_KINDS, KINDS, PUBLIC_KINDS, fuzz

    groups = {"all": ALL_KINDS, "public": PUBLIC_KINDS, "kernels": KINDS}
    kinds = tuple(k for part in args.kinds.split(",") for k in groups.get(part, (part,))) if args.kinds else KINDS
    backends = tuple(args.backends.split(",")) if args.backends else None
    done = [0]

    def progress(o):
        done[0] += 1
        if args.verbose or o.status != "ok":
            print(f"[{o.index}] {o.status} {o.kind}/{o.backend} {o.problem}" + (f": {o.detail}" if o.detail else ""),
                  flush=True)
        elif done[0] % 100 == 0:
            print(f"... {done[0]} problems", flush=True)

    shard = tuple(int(x) for x in args.shard.split("/")) if args.shard else (0, 1)
    report = fuzz(args.budget, args.seed, args.device, backends, start=args.start, kinds=kinds,
                  time_limit=args.time_limit, progress=progress, shard=shard)
    if args.shard:                         # a child of --workers: the parent prints the merged summary
        with open(args.json, "w") as f:
            json.dump(report.as_dict(), f)
        return 1 if report.failures else 0
    print(report.summary(max_failures=50))
    print(f"attention capabilities: {report.capabilities}")
    if report.next_index < args.start + args.budget:
        print(f"stopped by --time-limit: continue with --start {report.next_index} "
              f"--budget {args.start + args.budget - report.next_index}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.as_dict(), f, indent=1)
    return 1 if report.failures else 0


def run_workers(args, argv: list[str]) -> int:
    """Run ``args.workers`` children of this script on interleaved shards of the budget; merge their reports."""
    import os
    import subprocess
    import tempfile
    import time
    from collections import Counter

    drop = {"--workers", "--json"}
    child_argv, skip = [], False
    for a in argv:                                   # the children get the same problem set, minus these options
        if skip:
            skip = False
            continue
        if a in drop:
            skip = True
            continue
        if a.split("=")[0] in drop:
            continue
        child_argv.append(a)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for w in range(args.workers):
            out = os.path.join(tmp, f"shard{w}.json")
            cmd = [sys.executable, __file__, *child_argv, "--shard", f"{w}/{args.workers}", "--json", out]
            procs.append((out, subprocess.Popen(cmd)))
        parts = []
        for out, p in procs:
            p.wait()
            if not os.path.exists(out):
                print(f"fuzz worker {out} died with status {p.returncode} before writing its report", flush=True)
                parts.append(None)
                continue
            with open(out) as f:
                parts.append(json.load(f))
    done = [d for d in parts if d is not None]
    merged = dict(seed=args.seed, device=args.device, workers=args.workers,
                  tried=sum(d["tried"] for d in done), seconds=round(time.perf_counter() - t0, 1),
                  capabilities=done[0]["capabilities"] if done else {},
                  failures=sorted((f for d in done for f in d["failures"]), key=lambda f: f["index"]),
                  next_index=min((d["next_index"] for d in done), default=args.start),
                  workers_lost=len(parts) - len(done))
    for s in ("ok", "mismatch", "nan", "crash"):
        merged[s] = sum(d[s] for d in done)
    by_kind: dict[str, Counter] = {}
    for d in done:
        for k, c in d["by_kind"].items():
            by_kind.setdefault(k, Counter()).update(c)
    merged["by_kind"] = {k: dict(v) for k, v in sorted(by_kind.items())}
    print(f"fuzz seed={args.seed} device={args.device} workers={args.workers}: {merged['tried']} problems tried "
          f"in {merged['seconds']:.0f} s; mismatches {merged['mismatch']}, NaN {merged['nan']}, "
          f"crashes {merged['crash']}, workers lost {merged['workers_lost']}")
    for k, c in merged["by_kind"].items():
        print(f"  {k:24s} " + "  ".join(f"{s} {n}" for s, n in c.items()))
    for f in merged["failures"][:50]:
        print(f"  [{f['index']}] {f['status']} {f['kind']}/{f['backend']} {f['problem']}: {f['detail']}")
    end = args.start + args.budget
    if merged["next_index"] < end:
        print(f"stopped by --time-limit: every problem below {merged['next_index']} was tried (and some above); "
              f"continue with --start {merged['next_index']} --budget {end - merged['next_index']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(merged, f, indent=1)
    return 1 if merged["failures"] or merged["workers_lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
