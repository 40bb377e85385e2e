"""Which heavy_first group (kernels/attention_fwd.HEAD_GROUP) the causal attention kernels run
fastest with, on this GPU: the FA3 grid's causal rows (scripts/bench_attention.py) once per group, each in its own
process (a kernel is traced with the constant it finds). Group 1 is the head-by-head order.

    PYTHONPATH=src python3 scripts/gpu/probe_head_group.py --groups 1 4 16 --seqs 2048 8192
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def child(group: int, seqs: list[int]) -> None:
    from tilestack.kernels import attention_fwd
    attention_fwd.HEAD_GROUP = group
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_attention
    bench_attention.main(["--backward", "--causal", "yes", "--seqs", *map(str, seqs)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        child(a.child, a.seqs)
        return
    for g in a.groups:
        print(f"=== group {g}", flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", str(g), "--seqs", *map(str, a.seqs)],
                             capture_output=True, text=True, env=os.environ)
        found = out.stdout.find("pass ")
        print(out.stdout[found:] if found >= 0 else out.stdout[-2000:] + out.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
