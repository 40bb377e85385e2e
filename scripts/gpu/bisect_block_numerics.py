"""On a GPU: GPT-2 small's first block cut into its parts, each compiled alone (``tilestack.optimize``, eager
numerics) and fed eager's own input, against eager: which part moves the compiled block's bf16 output away from
eager's (issue 14; ``diagnose_prefill_numerics.py`` finds 1.3-1.7e-3 per block where each op alone, in
``probe_eager_numerics.py``, is within 2e-5).

    PYTHONPATH=src python3 scripts/gpu/bisect_block_numerics.py [--quick]    # --quick: GPT-2 tiny on the CPU
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _to_y2(blk, h, dl, d, eps):
    """The block from its inputs to its second norm's output (what the MLP reads)."""
    h1 = h + dl
    y1 = F.layer_norm(h1, (d,), blk.ln_1.weight, blk.ln_1.bias, eps)
    return F.layer_norm(h1 + blk.attn(y1), (d,), blk.ln_2.weight, blk.ln_2.bias, eps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    import tilestack
    from tilestack.bench.models import GPT, GPT2_SMALL, GPT2_TINY

    dev = "cpu" if a.quick else "cuda"
    cfg = GPT2_TINY if a.quick else GPT2_SMALL
    B, N = (2, 64) if a.quick else (8, 1024)
    model = GPT(cfg, impl="torch").to(device=dev, dtype=torch.bfloat16).eval()
    blk = model.h[1]
    idx = torch.randint(0, cfg.vocab, (B, N), generator=torch.Generator().manual_seed(0)).to(dev)
    d, H = cfg.d, cfg.n_head
    hd = d // H

    def qkv_split(qkv):
        q, k, v = qkv.split(d, dim=2)
        return [t.view(B, N, H, hd).transpose(1, 2) for t in (q, k, v)]

    def sdpa(qkv):
        q, k, v = qkv_split(qkv)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, N, d)

    with torch.no_grad():
        h0 = model.wte(idx) + model.wpe(torch.arange(N, device=dev))
        h, delta = model.h[0](h0, None)
        y1 = F.layer_norm(h + delta, (d,), blk.ln_1.weight, blk.ln_1.bias, cfg.eps)
        qkv = blk.attn.c_attn(y1)
        att = sdpa(qkv)
        ao = blk.attn.c_proj(att)
        y2 = F.layer_norm(h + delta + ao, (d,), blk.ln_2.weight, blk.ln_2.bias, cfg.eps)
        fc = blk.mlp.c_fc(y2)
        ge = F.gelu(fc, approximate="tanh")
        parts = {
            "add + ln_1": (lambda h, dl: F.layer_norm(h + dl, (d,), blk.ln_1.weight, blk.ln_1.bias, cfg.eps),
                           (h, delta)),
            "c_attn (linear + bias)": (blk.attn.c_attn, (y1,)),
            "split + sdpa + reshape": (sdpa, (qkv,)),
            "c_attn + sdpa": (lambda y: sdpa(blk.attn.c_attn(y)), (y1,)),
            "attn.c_proj": (blk.attn.c_proj, (att,)),
            "whole attn": (blk.attn, (y1,)),
            "c_fc": (blk.mlp.c_fc, (y2,)),
            "gelu": (lambda x: F.gelu(x, approximate="tanh"), (fc,)),
            "c_fc + gelu": (lambda y: F.gelu(blk.mlp.c_fc(y), approximate="tanh"), (y2,)),
            "mlp.c_proj": (blk.mlp.c_proj, (ge,)),
            "whole mlp": (lambda y: blk.mlp.c_proj(F.gelu(blk.mlp.c_fc(y), approximate="tanh")), (y2,)),
            "h + delta + ao -> ln_2": (lambda h, dl, ao: F.layer_norm(h + dl + ao, (d,), blk.ln_2.weight,
                                                                      blk.ln_2.bias, cfg.eps), (h, delta, ao)),
            "block up to ln_2's output": (lambda h, dl: _to_y2(blk, h, dl, d, cfg.eps), (h, delta)),
            "whole block (h out)": (lambda h, dl: blk(h, dl)[0], (h, delta)),
            "whole block (delta out)": (lambda h, dl: blk(h, dl)[1], (h, delta)),
        }
        print(f"{'part of GPT-2 block 1':28} {'vs eager':>10} {'share differing':>16}   ({dev}, B={B}, N={N}, bf16)")
        for name, (fn, args) in parts.items():
            want = fn(*args)
            torch._dynamo.reset()
            got = tilestack.optimize(fn)(*args)
            print(f"{name:28} {rel(got, want):10.2e} {float((got != want).float().mean()):16.2e}")


if __name__ == "__main__":
    main()
