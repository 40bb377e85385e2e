"""Markdown tables from a results file of scripts/bench_attention.py (for docs/performance.md).

    python3 scripts/attention_table.py docs/results/attention_h100_final.json
"""

from __future__ import annotations

import json
import sys

BARS = {("fwd", 128): 1.45, ("fwd", 64): 1.35, ("bwd", 128): 1.25, ("bwd", 64): 1.25}   # vs FA2, seq >= 4k


def main(path: str) -> None:
    res = json.load(open(path))
    print(f"Device: {res['device']}; torch {res['torch']}. TFLOP/s: forward 4*B*H*N*N*D (halved when causal), "
          "backward 2.5x that. B*N = 16384 tokens, H*D = 2048.\n")
    for pass_ in ("fwd", "bwd"):
        rows = [r for r in res["rows"] if r.get("pass_", "fwd") == pass_]
        if not rows:
            continue
        print(f"**{'Forward' if pass_ == 'fwd' else 'Backward'}**\n")
        print("| D | N | causal | tilestack | FA2 | cuDNN | / FA2 | / cuDNN | bar (seq >= 4k) | rel err vs FA2 |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: (r["D"], r["N"], r["causal"])):
            t = r["tflops"]
            bar = BARS.get((pass_, r["D"]))   # the issue sets no bar at hd256
            mark = ("met" if r["vs_fa2"] >= bar else "**missed**") if bar and r["N"] >= 4096 else "-"
            print(f"| {r['D']} | {r['N']} | {'yes' if r['causal'] else 'no'} | {t['tilestack']:.0f} | {t['fa2']:.0f} | "
                  f"{t['cudnn']:.0f} | {r['vs_fa2']:.2f} | {r['vs_cudnn']:.2f} | {bar or ''} {mark} | "
                  f"{r['err_vs_fa2']:.1e} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1])
