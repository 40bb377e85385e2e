"""What one trip of the Gluon backend's attention loops is, from the SASS compiled for sm_90a on this CPU (no GPU).

    PYTHONPATH=src python scripts/gluon_attention_loop_sass.py [--d 64,128] [--dump /tmp/sass]

For the explicit ping-pong kernel (a producer and two consumer roles, tests/backends/test_gluon_source.py's
``explicit_attention``), the FA3-scheduled one (``attention_fa3``) and the library's forward with its products
issued in turn (kernels/attention_fwd_pingpong, ts.turn: named barriers; its two loops, full and masked blocks),
at (4, 16, 4096, D) bf16 with the block sizes scripts/gpu/check_gluon.py times: ptxas's resources, then every loop
that issues wgmma (a backward branch and its target in the SASS: one per consumer partition and loop) with its
instruction mix per trip: HGMMA, exponentials, the warpgroup barriers (BAR.SYNC), mbarrier waits and arrives,
shared-memory traffic and shuffles. It is the evidence issue 11 asks for where the attention bar is missed: what a
trip spends beside its matrix work, and what orders (or does not order) the two consumers' wgmma.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import math
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (4, 16, 4096)
CLASSES = {          # a column per class: the SASS opcodes (prefix match) it counts
    "HGMMA": ("HGMMA",),
    "EX2": ("MUFU.EX2",),
    "FMUL/FADD/FFMA": ("FMUL", "FADD", "FFMA"),
    "max (FMNMX)": ("FMNMX",),
    "BAR.SYNC": ("BAR.SYNC", "BAR.ARV"),
    "mbar wait": ("SYNCS.PHASECHK",),
    "mbar arrive": ("SYNCS.ARRIVE",),
    "STS/STSM": ("STS", "STSM"),
    "LDS/LDSM": ("LDS", "LDSM"),
    "SHFL": ("SHFL",),
}
LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)([^;]*);")


def instructions(sass: str) -> list[tuple[int, str, str, bool]]:
    """(address, opcode, operands, predicated) of every instruction, in order."""
    return [(int(m.group(1), 16), m.group(3), m.group(4), bool(m.group(2)))
            for line in sass.splitlines() if (m := LINE.match(line))]


def loops(ins: list[tuple[int, str, str, bool]]) -> list[list[tuple[int, str, str, bool]]]:
    """The instructions of each innermost loop that issues wgmma: from a conditional backward branch's target to
    the branch, holding no other such loop (the outer ones are the partitions' dispatch and the kernel's own; an
    unconditional backward branch ends an mbarrier wait's retry path, placed after the function's body)."""
    spans = []
    for addr, op, rest, predicated in ins:
        m = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") and predicated else None
        if m and int(m.group(1), 16) < addr:
            lo = int(m.group(1), 16)
            if any(o.startswith("HGMMA") for a, o, _, _ in ins if lo <= a <= addr):
                spans.append((lo, addr))
    inner = [(lo, hi) for lo, hi in spans if not any((lo, hi) != s and lo <= s[0] and s[1] <= hi for s in spans)]
    return [[i for i in ins if lo <= i[0] <= hi] for lo, hi in sorted(inner)]


def census(body) -> dict[str, int]:
    counts = collections.Counter()
    for _, op, _, _ in body:
        for name, prefixes in CLASSES.items():
            if op.startswith(prefixes):
                counts[name] += 1
    counts["all"] = len(body)
    return counts


def load_kernels():
    spec = importlib.util.spec_from_file_location("gluon_source_tests", ROOT / "tests/backends/test_gluon_source.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from tilestack.kernels.attention_fwd_pingpong import attention_fwd_pingpong_kernel
    return {"explicit ping-pong": mod.explicit_attention(), "FA3 schedule": mod.attention_fa3,
            "library ping-pong (turns)": attention_fwd_pingpong_kernel}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", default="64,128", help="head dims")
    ap.add_argument("--dump", default="", help="write each kernel's Gluon source and SASS into this folder")
    args = ap.parse_args()

    from tilestack.backends import get_backend
    from tilestack.backends.gluon import aot as gaot
    try:
        gaot.tool("ptxas")
    except gaot.ToolMissing as e:
        print(f"cannot compile for sm_90a here: {e}")
        return 1
    be = get_backend("gluon")
    header = ["kernel", "D", "regs", "spills", "smem KiB", "loop", *CLASSES, "all"]
    print(" | ".join(header))
    for d in (int(x) for x in args.d.split(",")):
        q = torch.empty(*SHAPE, d, dtype=torch.bfloat16, device="meta")
        for name, kernel in load_kernels().items():
            consts = dict(BM=128, BN=64 if d == 128 else 128, D=d, STAGES=2)   # check_gluon.py's blocks
            lse = (torch.empty(*SHAPE, dtype=torch.float32, device="meta"),) if "library" in name else ()
            traced = kernel.trace(q, q, q, torch.empty_like(q), *lse, 1 / math.sqrt(d), **consts)
            compiled = be.aot(traced, be.Options())
            res = gaot.resources(compiled)
            sass = gaot.sass(compiled)
            if args.dump:
                out = Path(args.dump)
                out.mkdir(parents=True, exist_ok=True)
                stem = f"{re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')}_d{d}"
                (out / f"{stem}.gluon.py").write_text(traced.source(backend="gluon"))
                (out / f"{stem}.sass").write_text(sass)
            head = [name, str(d), str(res["registers"]), str(res["spill_stores"] + res["spill_loads"]),
                    f"{res['shared_bytes'] / 1024:.0f}"]
            for k, body in enumerate(loops(instructions(sass))):
                c = census(body)
                print(" | ".join(head + [str(k)] + [str(c[n]) for n in CLASSES] + [str(c["all"])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
