"""Why the tilestack backend swapped or left each op of GPT-2 small's compiled prefill (B=8, N=1024, bf16) on this
GPU: the backend's report, and the measured decisions of the fused GEMMs at the four linear layers' shapes.

    PYTHONPATH=src python3 scripts/gpu/why_prefill_swaps.py
"""

from __future__ import annotations

import torch


def main() -> None:
    import tilestack
    import tilestack.compile as tc
    from tilestack.bench.models import GPT, GPT2_SMALL
    from tilestack.compile import measure

    dev = "cuda"
    model = GPT(GPT2_SMALL, impl="torch").to(device=dev, dtype=torch.bfloat16).eval()
    idx = torch.randint(0, GPT2_SMALL.vocab, (8, 1024), generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        tilestack.optimize(model)(idx)
    print(str(tc.last_report())[:6000])
    d = GPT2_SMALL.d
    for name, k, n, act, res in (("c_attn", d, 3 * d, None, False), ("attn.c_proj", d, d, None, True),
                                 ("mlp.c_fc", d, 4 * d, "gelu_tanh", False), ("mlp.c_proj", 4 * d, d, None, True)):
        x = torch.empty(8, 1024, k, device=dev, dtype=torch.bfloat16)
        w = torch.empty(n, k, device=dev, dtype=torch.bfloat16)
        b = torch.empty(n, device=dev, dtype=torch.bfloat16)
        r = torch.empty(8, 1024, n, device=dev, dtype=torch.bfloat16) if res else None
        dec = measure.linear_epilogue(x, w, b, r, act, False)
        print(f"{name}: pays={dec.pays} {dec.reason()}")


if __name__ == "__main__":
    main()
