"""What ptxas makes of the attention backward's dK/dV kernels for sm_90a, compiled on this CPU (no GPU): registers
and spilled words per thread, shared memory, for the shipped query-major block, the key-major one (KEY_MAJOR) and
both with dQ fused (attention_bwd_dkdvdq_kernel), at Llama's (1, 16 heads, 4 K/V heads, 8192, D) causal bf16.
docs/performance.md ("Attention backward at head dim 128") has the table this prints.

    PYTHONPATH=src python scripts/attention_bwd_resources.py [--d 128] [--configs "64,64,4,2;32,128,8,3"]
"""

from __future__ import annotations

import argparse

import torch

from tilestack.kernels import attention_bwd
from tilestack.tune import aot

CONFIGS = "64,64,4,2;64,128,8,2;32,128,8,3"     # BM, BN, num_warps, num_stages


def _args(D: int, fused: bool, B=1, H=16, Hkv=4, N=8192):
    meta = dict(device="meta")
    q = torch.empty(B, H, N, D, dtype=torch.bfloat16, **meta)
    k = torch.empty(B, Hkv, N, D, dtype=torch.bfloat16, **meta)
    lse = torch.empty(B, H, N, **meta)
    dq32 = torch.empty(B, H, N, D, **meta)
    return (q, k, k, q, lse, lse, dq32, k, k, 0.1) if fused else (q, k, k, q, lse, lse, k, k, 0.1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--configs", default=CONFIGS)
    a = ap.parse_args()
    reason = aot.missing_tools()
    if reason:
        raise SystemExit(f"cannot compile for sm_90a here: {reason}")
    print("| config | variant | registers | spilled words | shared bytes |")
    print("|---|---|---|---|---|")
    for cfg in a.configs.split(";"):
        BM, BN, nw, st = map(int, cfg.split(","))
        for fused in (False, True):
            kernel = attention_bwd.attention_bwd_dkdvdq_kernel if fused else attention_bwd.attention_bwd_dkdv_kernel
            for key_major in (False, True):
                r = aot.resources(kernel, _args(a.d, fused), dict(D=a.d, causal=True),
                                  dict(BM=BM, BN=BN, num_warps=nw, num_stages=st, KEY_MAJOR=key_major),
                                  timeout_s=None)
                name = f"{'fused dQ, ' if fused else ''}{'key' if key_major else 'query'}-major"
                cols = (r.registers, r.spills, r.shared_bytes) if r.ok else (r.error, "", "")
                print(f"| BM{BM} BN{BN} w{nw} s{st} | {name} | " + " | ".join(map(str, cols)) + " |", flush=True)


if __name__ == "__main__":
    main()
