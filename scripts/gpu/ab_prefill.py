"""GPT-2 small prefill (B=8, N=1024, bf16), or ResNet-50 (``--model resnet50-b64`` / ``-b1``), compiled several
ways in one process and timed in alternating rounds,
so that the GPU's clock and power state fall on every variant alike (separate processes, as bench_inference.py
runs them, moved Inductor's own time by up to 15% between runs on the H200). Prints each variant's median step
time, its ratio to Inductor's and its output error against eager (norm-relative).

    PYTHONPATH=src python3 scripts/gpu/ab_prefill.py [--model gpt2-prefill] [--rounds 7] [--variants ...]
Variants: inductor; tilestack (all passes); tilestack-exact (numerics="exact"); tilestack-fused
(numerics="fused"); tilestack-reduce-overhead;
tilestack-<pass> (that pass alone);
tilestack-no-<pass> (every pass but it);
ts:<numerics>:<pass>+<pass>... (those passes under that numerics, e.g. ts:exact:sdpa+linear_epilogue: eager's norm
kernels, tilestack's attention and GEMM epilogues).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2-prefill", choices=("gpt2-prefill", "resnet50-b64", "resnet50-b1"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--variants", default="inductor,tilestack,tilestack-linear_epilogue,tilestack-no-sdpa")
    a = ap.parse_args()
    import tilestack
    from tilestack.bench.models import GPT, GPT2_SMALL
    from tilestack.compile.patterns import PASSES

    dev = "cuda"
    if a.model == "gpt2-prefill":
        base = GPT(GPT2_SMALL, impl="torch").to(device=dev, dtype=torch.bfloat16).eval()
        idx = torch.randint(0, GPT2_SMALL.vocab, (8, 1024), generator=torch.Generator().manual_seed(0)).to(dev)
    else:                                   # torchvision's ResNet-50, random weights, as bench_inference.py's case
        import torchvision
        torch.manual_seed(0)
        base = torchvision.models.resnet50(weights=None).to(device=dev, dtype=torch.bfloat16).eval()
        idx = torch.randn(int(a.model.removeprefix("resnet50-b")), 3, 224, 224, device=dev, dtype=torch.bfloat16)

    def build(name):
        model = copy.deepcopy(base)
        if name == "eager":
            return model
        if name == "inductor":
            return torch.compile(model)
        if name == "tilestack":
            return tilestack.optimize(model)
        if name == "tilestack-reduce-overhead":
            return tilestack.optimize(model, mode="reduce-overhead")
        if name == "tilestack-fused":
            return tilestack.optimize(model, numerics="fused")
        if name == "tilestack-exact":        # eager's own norm kernels, nothing swapped: eager's bits in bf16
            return tilestack.optimize(model, numerics="exact")
        if name.startswith("ts:"):
            _, numerics, chosen = name.split(":")
            return tilestack.optimize(model, numerics=numerics, passes=[p for p in chosen.split("+") if p])
        if name.startswith("tilestack-no-"):
            return tilestack.optimize(model, passes=[p for p in PASSES if p != name.removeprefix("tilestack-no-")])
        return tilestack.optimize(model, passes=[name.removeprefix("tilestack-")])

    names = ["eager"] + [n for n in a.variants.split(",") if n != "eager"]
    fns, errs = {}, {}
    with torch.no_grad():
        want = base(idx).double()
        for n in names:
            fns[n] = build(n)
            got = fns[n](idx).double()
            errs[n] = float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))
            for _ in range(3):
                fns[n](idx)
        torch.cuda.synchronize()
        times = {n: [] for n in names}
        for _ in range(a.rounds):
            for n in names:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(a.steps):
                    fns[n](idx)
                end.record()
                end.synchronize()
                times[n].append(start.elapsed_time(end) / a.steps)
    ind = statistics.median(times["inductor"]) if "inductor" in times else None
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}: {a.model}, ms per step "
          f"(median of {a.rounds} alternating rounds of {a.steps} steps)")
    print(f"{'variant':<32} {'ms':>8} {'min':>8} {'max':>8} {'vs Inductor':>12} {'err vs eager':>13}")
    for n in names:
        m = statistics.median(times[n])
        ratio = f"{ind / m:.3f}x" if ind else "-"
        print(f"{n:<32} {m:8.3f} {min(times[n]):8.3f} {max(times[n]):8.3f} {ratio:>12} {errs[n]:13.2e}")


if __name__ == "__main__":
    main()
