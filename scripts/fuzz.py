"""Fuzz the kernel library against float64 PyTorch (see tilestack.testing.fuzz).

    PYTHONPATH=src python scripts/fuzz.py --budget 2000 --device cpu            # reference + Triton interpreter
    PYTHONPATH=src python scripts/fuzz.py --budget 10000 --device cuda --json fuzz_gpu.json
    PYTHONPATH=src python scripts/fuzz.py --seed 0 --start 417 --budget 1 -v    # replay one problem

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
    ap.add_argument("--kinds", default=None, help="comma-separated subset of gemm,softmax,layer_norm,rms_norm,"
                                                  "attention")
    ap.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds")
    ap.add_argument("--json", default=None, help="write the full report here")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every problem")
    args = ap.parse_args(argv)

    import torch

    if args.device == "cpu" and not torch.cuda.is_available():
        from tilestack.config import use_triton_interpreter
        use_triton_interpreter()               # before Triton is first imported
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU here")

    from tilestack.testing.fuzz import KINDS, fuzz

    kinds = tuple(args.kinds.split(",")) if args.kinds else KINDS
    backends = tuple(args.backends.split(",")) if args.backends else None
    done = [0]

    def progress(o):
        done[0] += 1
        if args.verbose or o.status != "ok":
            print(f"[{o.index}] {o.status} {o.kind}/{o.backend} {o.problem}" + (f": {o.detail}" if o.detail else ""),
                  flush=True)
        elif done[0] % 100 == 0:
            print(f"... {done[0]} problems", flush=True)

    report = fuzz(args.budget, args.seed, args.device, backends, start=args.start, kinds=kinds,
                  time_limit=args.time_limit, progress=progress)
    print(report.summary(max_failures=50))
    print(f"attention capabilities: {report.capabilities}")
    if report.tried < args.budget:
        print(f"stopped by --time-limit: continue with --start {args.start + report.tried} "
              f"--budget {args.budget - report.tried}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.as_dict(), f, indent=1)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
