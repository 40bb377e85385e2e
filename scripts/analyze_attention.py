"""Why tilestack's attention stops short of cuDNN: what the Triton backend's code is, and where its time goes.

    PYTHONPATH=src python3 scripts/analyze_attention.py --out results/      # on an H100, about 2 minutes

1. The compiler's resource report and a census of the SASS of the generated forward kernels (hd64, hd128,
   the tuned configs): matrix instructions (HGMMA = Hopper wgmma, HMMA = the older mma.sync), TMA loads
   (UTMALDG), exponentials (MUFU.EX2), barriers, register spills (LDL/STL), setmaxnreg (USETMAXREG).
2. Nsight Compute (--clock-control none) on tilestack's forward and cuDNN's at the same shape: speed of
   light, pipe utilisation, occupancy and warp stall reasons, side by side.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

SHAPE = dict(B=4, H=16, N=4096)
SASS_OPS = ("HGMMA", "HMMA", "UTMALDG", "UTMASTG", "LDGSTS", "MUFU.EX2", "BAR", "LDL", "STL", "USETMAXREG")
PTX_OPS = ("wgmma.mma_async", "mma.sync", "cp.async.bulk.tensor", "cp.async.cg", "ex2.approx", "setmaxnreg",
           "mbarrier.try_wait", "bar.sync", "ld.local", "st.local")
NCU_SECTIONS = ("SpeedOfLight", "ComputeWorkloadAnalysis", "Occupancy", "WarpStateStats", "SchedulerStats")


def inputs(D):
    return tuple(torch.randn(SHAPE["B"], SHAPE["H"], SHAPE["N"], D, device="cuda", dtype=torch.bfloat16)
                 for _ in range(3))


def run_ours(D, causal):
    from tilestack.kernels import attention_fwd
    q, k, v = inputs(D)
    attention_fwd.attention_forward(q, k, v, causal)
    torch.cuda.synchronize()


def run_cudnn(D, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = inputs(D)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.cuda.synchronize()


def sass_census(D, causal):
    from tilestack.backends.triton.launch import resource_report
    from tilestack.kernels import attention_fwd
    from tilestack.tune.lookup import launch_config
    q, k, v = inputs(D)
    sig = f"bfloat16-D{D}-{'causal' if causal else 'full'}"
    cfg = launch_config("attention_fwd", sig, q.device, SHAPE["N"], attention_fwd.default_config(D, causal, "cuda"))
    o, lse = torch.empty_like(q), torch.empty(SHAPE["B"], SHAPE["H"], SHAPE["N"], device="cuda")
    traced = attention_fwd.attention_fwd_kernel.trace(q, k, v, o, lse, 0.1, D=D, causal=causal, **cfg)
    traced.run(q, k, v, o, lse, 0.1)
    from tilestack.backends import get_backend
    binary = get_backend("triton").binary(traced)
    ptx = binary.asm["ptx"]
    try:
        sass = binary.asm["sass"]          # disassembled on first access (needs nvdisasm)
    except Exception as e:  # noqa: BLE001 - the census still has the PTX
        sass = f"unavailable: {e}"
    census = {op: len(re.findall(rf"\b{re.escape(op)}", ptx)) for op in PTX_OPS}
    census |= {f"sass {op}": len(re.findall(rf"\b{re.escape(op)}", sass)) for op in SASS_OPS}
    return {"D": D, "causal": causal, "config": cfg, **resource_report(traced), "census": census}


def ncu_metrics(target: str, D: int, causal: bool, regex: str) -> dict[str, str]:
    cmd = ["ncu", "--clock-control", "none", "--kernel-name", f"regex:{regex}", "--launch-skip", "1",
           "--launch-count", "1", "--csv", "--page", "details"]
    for s in NCU_SECTIONS:
        cmd += ["--section", s]
    cmd += [sys.executable, __file__, "--target", target, "--dim", str(D)] + (["--causal"] if causal else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    rows = list(csv.reader(io.StringIO(out.stdout[out.stdout.find('"ID"'):])))
    if len(rows) < 2:
        return {"error": (out.stderr or out.stdout)[-400:]}
    head = rows[0]
    name_i, unit_i, val_i = head.index("Metric Name"), head.index("Metric Unit"), head.index("Metric Value")
    return {r[name_i]: f"{r[val_i]} {r[unit_i]}".strip() for r in rows[1:] if len(r) > val_i}


KEEP = ("Duration", "Compute (SM) Throughput", "Memory Throughput", "DRAM Throughput", "Registers Per Thread",
        "Achieved Occupancy", "Theoretical Occupancy", "Issue Slots Busy", "Executed Ipc Active",
        "No Eligible", "Active Warps Per Scheduler", "Eligible Warps Per Scheduler",
        "Warp Cycles Per Issued Instruction")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--target", choices=["ours", "cudnn"])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    if a.target:   # the program ncu profiles: two launches (a warm-up, then the one measured)
        fn = run_ours if a.target == "ours" else run_cudnn
        fn(a.dim, a.causal)
        fn(a.dim, a.causal)
        return
    result = {"device": torch.cuda.get_device_name(), "shape": SHAPE, "census": [], "ncu": {}}
    for D in (64, 128):
        for causal in (False, True):
            c = sass_census(D, causal)
            result["census"].append(c)
            print(f"D={D} causal={causal} {c['config']}: regs {c['registers']}, spills {c['spills']}, "
                  f"smem {c['shared_bytes']} B; {c['census']}", flush=True)
    for D in (128,):
        ours = ncu_metrics("ours", D, False, "attention_fwd")
        theirs = ncu_metrics("cudnn", D, False, "cudnn|fmha|sm90|flash")
        result["ncu"][f"D{D}"] = {"tilestack": ours, "cudnn": theirs}
        print(f"\nNsight Compute, forward D={D} non-causal, B={SHAPE['B']} H={SHAPE['H']} N={SHAPE['N']}")
        print(f"{'metric':<44} {'tilestack':>22} {'cuDNN':>22}")
        for key in sorted(set(ours) | set(theirs)):
            if any(key.startswith(k) for k in KEEP) or key == "error":
                print(f"{key:<44} {ours.get(key, '-'):>22} {theirs.get(key, '-'):>22}")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "attention_analysis.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
