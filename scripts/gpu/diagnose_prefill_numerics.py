"""Where a compiled GPT-2 small prefill's output moves away from eager's (issue 14: bf16 outputs within 1e-2 of
eager, norm-relative): each block, and the LM head, compiled alone and fed eager's own input, against eager and
against the f32 model on the same input; then the GPU kernels each side runs for one block.

    PYTHONPATH=src python3 scripts/gpu/diagnose_prefill_numerics.py [--quick]   # --quick: GPT-2 tiny, the CPU

A block whose local difference is far above one bf16 rounding (about 1e-3 norm-relative) is where the compiled
graph computes something else; local differences near it that grow with depth are the model's own amplification.
"""

from __future__ import annotations

import argparse

import torch


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


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
    f32 = GPT(cfg, impl="torch").to(device=dev).eval()
    f32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    idx = torch.randint(0, cfg.vocab, (B, N), generator=torch.Generator().manual_seed(0)).to(dev)

    compilers = {"inductor": lambda m: torch.compile(m),
                 "tilestack": lambda m: tilestack.optimize(m),
                 "tilestack-fused": lambda m: tilestack.optimize(m, numerics="fused")}
    with torch.no_grad():
        h = model.wte(idx) + model.wpe(torch.arange(N, device=dev))
        delta = None
        rows = []
        for i, block in enumerate(model.h):
            ref = block(h, delta)
            exact = f32.h[i](h.float(), None if delta is None else delta.float())
            row = {"where": f"block {i}", "eager-f32": rel(ref[1], exact[1])}
            for name, make in compilers.items():
                got = make(block)(h, delta)
                row[name] = rel(got[1], ref[1])
                row[name + "-f32"] = rel(got[1], exact[1])
            rows.append(row)
            h, delta = ref
            if i >= 2 and not a.quick:
                break                                     # the first blocks tell; the rest repeat them

        def head(h, delta):
            x = h + delta
            return torch.nn.functional.linear(torch.nn.functional.layer_norm(x, (cfg.d,), model.ln_f.weight,
                                                                            model.ln_f.bias, cfg.eps), model.wte.weight)
        ref = head(h, delta)
        exact = torch.nn.functional.linear(torch.nn.functional.layer_norm(
            (h + delta).float(), (cfg.d,), f32.ln_f.weight, f32.ln_f.bias, cfg.eps), f32.wte.weight)
        row = {"where": "ln_f + lm_head", "eager-f32": rel(ref, exact)}
        for name, make in compilers.items():
            got = make(head)(h, delta)
            row[name], row[name + "-f32"] = rel(got, ref), rel(got, exact)
        rows.append(row)
        whole = {"where": "whole model", "eager-f32": rel(model(idx), f32(idx))}
        ref, exact = model(idx), f32(idx)
        for name, make in compilers.items():
            got = make(model)(idx)
            whole[name], whole[name + "-f32"] = rel(got, ref), rel(got, exact)
        rows.append(whole)

    if dev == "cuda":
        from torch.profiler import ProfilerActivity, profile
        block = model.h[0]
        sides = (("eager", block), ("inductor", torch.compile(block)), ("tilestack", tilestack.optimize(block)))
        for name, fn in sides:
            with torch.no_grad():
                fn(h, delta)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    fn(h, delta)
                    torch.cuda.synchronize()
            kernels = [e.key for e in prof.key_averages() if e.device_type.name == "CUDA"]
            print(f"{name} block 0 kernels: " + "; ".join(k[:60] for k in kernels))

    names = ["eager-f32"] + [n for c in compilers for n in (c, c + "-f32")]
    where = "GPT-2 tiny, CPU" if a.quick else "GPT-2 small, " + torch.cuda.get_device_name()
    print(f"\nnorm-relative differences ({where}, B={B}, N={N}, bf16): <compiler> against "
          "eager on eager's input, <compiler>-f32 against the f32 model")
    print(f"{'where':<16}" + "".join(f"{n:>20}" for n in names))
    for r in rows:
        print(f"{r['where']:<16}" + "".join(f"{r[n]:20.2e}" for n in names))


if __name__ == "__main__":
    main()
