"""On a GPU: the launch options that left the kernels' signatures (num_warps, num_stages) still reach Triton's
compile, with the values the tuned tables (or the kernel's defaults) give.

    PYTHONPATH=src python3 scripts/gpu/check_launch_options.py --out /tmp/launch_options.json

For a few library functions at benchmark sizes it launches once through the public function, then compares,
per launcher the kernel built, the options it launched with against those Triton compiled (the binary's
metadata) and against what ``tune.lookup.launch_config`` plus the kernel's default options say. Prints a table
last, writes JSON, exits non-zero on a mismatch. Takes well under a minute (compiles included).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys

import torch


def cases():
    """(name, the tile kernel, launch it once, the tuned table's config) per case."""
    import importlib

    af = importlib.import_module("tilestack.kernels.attention_fwd")
    sm = importlib.import_module("tilestack.kernels.softmax")   # the package exports a function of that name
    from tilestack.kernels.gemm import gemm, gemm_config, gemm_kernel
    from tilestack.tune.lookup import launch_config

    dev = torch.device("cuda")
    n = 4096
    a = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    yield "gemm 4096^3", gemm_kernel, lambda: gemm(a, a), gemm_config(n, n, n, a.dtype, dev)

    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    auto = {k: v for k, v in sm.row_config(8192, "cuda").items()}
    yield "softmax 8192x8192", sm.softmax_kernel, lambda: sm.softmax(x), \
        launch_config("softmax", "bfloat16", dev, 8192, auto)

    B, H, N, D = 4, 16, 4096, 128
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.bfloat16, device=dev) for _ in range(3))
    default = af.default_config(D, True, "cuda", q.dtype)
    cfg = launch_config("attention_fwd", af.config_signature(q, D, D, True), dev, N, default)
    yield "attention_fwd D128 causal 4096", af.attention_fwd_kernel, \
        lambda: af.attention_forward(q, k, v, True, 1 / math.sqrt(D)), cfg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="launch_options.json", help="where to write the JSON results")
    ap.add_argument("--time-limit", type=int, default=300, help="seconds before giving up")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    signal.alarm(args.time_limit)
    from tilestack.backends import get_backend

    triton = get_backend("triton")
    rows, bad = [], 0
    for name, kernel, launch, tuned in cases():
        kernel._launchers.clear()
        launch()
        torch.cuda.synchronize()
        want = {k: v for k, v in {**kernel.options, **tuned}.items() if k in ("num_warps", "num_stages")}
        for launcher in kernel._launchers.values():
            res = triton.resources(launcher.traced)
            got = {"num_warps": res["num_warps"], "num_stages": res["num_stages"]}
            ok = launcher.options == want and all(got[k] == v for k, v in want.items())
            bad += not ok
            rows.append(dict(case=name, expected=want, launched=launcher.options, compiled=got,
                             registers=res["registers"], spills=res["spills"], shared_bytes=res["shared_bytes"],
                             ok=ok))
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    print(f"{'case':34} {'expected':34} {'compiled':34} ok")
    for r in rows:
        print(f"{r['case']:34} {json.dumps(r['expected']):34} {json.dumps(r['compiled']):34} {r['ok']}")
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
