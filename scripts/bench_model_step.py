"""Time a whole training step (forward, backward, fused AdamW) of two language models on torch's kernels and on
tilestack's, eager and under torch.compile, from the same weights on the same batch.

    PYTHONPATH=src python3 scripts/bench_model_step.py                       # everything (GPU; long: see below)
    PYTHONPATH=src python3 scripts/bench_model_step.py --models gpt2 --modes eager --json gpt2_eager.json
    PYTHONPATH=src python3 scripts/bench_model_step.py --models llama --sizes 4x2048
    PYTHONPATH=src python3 scripts/bench_model_step.py --quick               # tiny models on the CPU (a check)
    PYTHONPATH=src python3 scripts/bench_model_step.py --kernels             # each op alone, at the models' shapes

Models (tilestack.bench.models): GPT-2 small (12 layers, d=768, 12 heads of 64, vocab 50257, tied LM head) at
(B, N) = (16, 512), (8, 1024), (4, 2048), (1, 8192); a Llama-style 1B (16 layers, d=2048, 16 query and 4 key/value
heads of 128, SwiGLU 5632, vocab 32000) at (4, 2048) and (1, 8192); ``gpt-1.3b`` (24 layers, d=2048, 16 heads of
128, vocab 50304) at (8, 2048), not in the default list: the model-FLOPs-utilisation case. bf16 parameters, AdamW
(fused). MFU = tokens/s * training FLOPs per token (the config's ``flops_per_token``, PaLM's convention) / the
device table's dense bf16 peak.

Per case and mode it prints the median step time over CUDA-event timed steps after warm-up, the ratio tilestack /
torch (the implementations run in alternating rounds, torch first then tilestack first, ``--rounds`` of them,
and each median is over the timed steps of all rounds, so a disturbance of the machine hits both), the
largest difference of the two runs' losses over the same steps, and the peak memory of each run; then,
for the eager steps, where the GPU time goes (torch.profiler: GEMM, attention, cross-entropy, norms, elementwise
and copies, optimizer, other). ``--json PATH`` writes all of it. Under ``compile`` each repeated block is compiled
(``--compile-scope block``: one compile serves every layer, embeddings and loss stay eager) or the whole model
as one graph (``model``: a 24-layer model did not finish compiling in 9 minutes on the H200).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from tilestack.bench.models import (
    GPT,
    GPT2_SMALL,
    GPT2_TINY,
    GPT_1P3B,
    IMPLS,
    LLAMA_1B,
    LLAMA_TINY,
    Llama,
    make_batch,
    make_optimizer,
    train_step,
)

CASES = {   # model name -> (class, config, [(B, N), ...])
    "gpt2": (GPT, GPT2_SMALL, [(16, 512), (8, 1024), (4, 2048), (1, 8192)]),
    "llama": (Llama, LLAMA_1B, [(4, 2048), (1, 8192)]),
    "gpt-1.3b": (GPT, GPT_1P3B, [(8, 2048)]),       # issue 12's MFU model (24 layers, d=2048, 16 heads of 128)
}
QUICK_CASES = {
    "gpt2": (GPT, GPT2_TINY, [(2, 16), (1, 32)]),
    "llama": (Llama, LLAMA_TINY, [(2, 16)]),
    "gpt-1.3b": (GPT, GPT2_TINY, [(2, 16)]),
}
MODES = ("eager", "compile")
LOSS_TOL = 1e-3
FAST_N = 2048          # from this sequence length on, the bar is a 5% faster step
FAST_MARGIN = 0.95

# where a GPU kernel's time goes, by its name (lowercase); the first category whose words match wins
CATEGORIES = (
    ("optimizer", ("adam", "multi_tensor")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "attn")),
    ("cross-entropy", ("softmax", "nll_loss", "cross_entropy", "crossentropy", "ce_grad")),
    ("norms", ("layer_norm", "layernorm", "rms_norm", "rmsnorm", "norm_fwd", "norm_bwd", "partial_sum", "_norm",
               "gammabeta")),
    ("GEMM", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "matmul", "wgmma", "splitk")),
    ("elementwise/copies", ("elementwise", "vectorized", "copy", "cat", "fill", "reduce", "triton", "index",
                            "embedding", "gelu", "silu", "rotary", "swiglu", "mul", "add")),
)


def category(kernel_name: str) -> str:
    name = kernel_name.lower()
    for cat, words in CATEGORIES:
        if any(w in name for w in words):
            return cat
    return "other"


class StepTimer:
    """Per-step wall time on the device: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, begin) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((begin, ev))
        else:
            self.marks.append((begin, time.perf_counter()))

    def times_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in self.marks]
        return [(b - a) * 1e3 for a, b in self.marks]


def run_impl(model, init_state, impl: str, mode: str, batch, args, device) -> dict:
    """Train ``warmup + steps`` steps from ``init_state`` with ``impl``; the timed steps' median and the losses."""
    model.load_state_dict(init_state)
    model.set_impl(impl)
    opt = make_optimizer(model, lr=args.lr)
    step_model = compiled(model, mode, args)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer(device)
    losses = []
    for _ in range(args.warmup + args.steps):
        t = timer.start()
        losses.append(train_step(step_model, batch, opt))
        timer.stop(t)
    times = timer.times_ms()[args.warmup:]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    out = {"median_ms": statistics.median(times), "min_ms": min(times), "losses": [float(x) for x in losses],
           "peak_gib": peak, "times_ms": times}
    del opt, step_model
    uncompiled(model, mode)
    return out


def compiled(model, mode: str, args):
    """The model a step runs in ``mode``: eager as it is; compiled as ``args.compile_scope`` says (each repeated
    block, one compile serving them all, the rest eager; or the whole model as one graph)."""
    if mode == "compile" and args.compile_scope == "model":
        return torch.compile(model, dynamic=False)
    if mode == "compile":
        for block in model.repeated_blocks():
            block.compile(dynamic=False)
    return model


def uncompiled(model, mode: str) -> None:
    """Undo ``compiled``: the next run starts uncompiled."""
    if mode == "compile":
        for block in model.repeated_blocks():
            block._compiled_call_impl = None      # what nn.Module.compile set
        torch._dynamo.reset()


def profile_impl(model, init_state, impl: str, mode: str, batch, args, device) -> dict:
    """GPU time per category over two steps in ``mode`` (after two untimed, which compile), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    model.load_state_dict(init_state)
    model.set_impl(impl)
    opt = make_optimizer(model, lr=args.lr)
    step_model = compiled(model, mode, args)
    for _ in range(2):
        train_step(step_model, batch, opt)
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(2):
            train_step(step_model, batch, opt)
        if device.type == "cuda":
            torch.cuda.synchronize()
    totals: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for ev in prof.key_averages():
        if device.type == "cuda" and str(getattr(ev, "device_type", "")).split(".")[-1] != "CUDA":
            continue
        us = getattr(ev, "self_device_time_total", None)
        if us is None:
            us = getattr(ev, "self_cuda_time_total", 0.0)
        if device.type != "cuda":
            us = ev.self_cpu_time_total
        if us <= 0:
            continue
        cat = category(ev.key)
        totals[cat] = totals.get(cat, 0.0) + us / 2e3      # ms per step
        kernels[ev.key] = kernels.get(ev.key, 0.0) + us / 2e3
    del opt, step_model
    uncompiled(model, mode)
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    return {"ms_per_step": totals, "top_kernels": top}


def kernel_cases(quick: bool, device):
    """(name, tilestack fn, torch fn, input maker) for each op at the models' shapes (T = 8192 tokens): forward and
    backward together, as a training step runs them."""
    import torch.nn.functional as F

    from tilestack.kernels import rotary_tables
    from tilestack.torch import ops

    T, dg, dl, F_, V1, V2 = (64, 32, 64, 96, 97, 101) if quick else (8192, 768, 2048, 5632, 50257, 32000)
    H, Hkv, D, N = (4, 2, 16, 16) if quick else (16, 4, 128, 2048)
    dt = torch.bfloat16

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dt).requires_grad_()

    cos, sin = rotary_tables(N, D, device=device)
    B = T // N

    def rope_torch(q, k):
        def rot(x):
            x1, x2 = x.chunk(2, -1)
            c, s_ = cos.to(x.dtype)[None, :, None], sin.to(x.dtype)[None, :, None]
            return torch.cat((x1 * c - x2 * s_, x2 * c + x1 * s_), -1)
        return rot(q), rot(k)

    labels = {V1: torch.randint(0, V1, (T,), device=device), V2: torch.randint(0, V2, (T,), device=device)}
    return [
        ("add_layer_norm d=768", lambda x, r, w, b: ops.add_layer_norm(x, r, w, b),
         lambda x, r, w, b: (F.layer_norm(x + r, (dg,), w, b), x + r), lambda: (t(T, dg), t(T, dg), t(dg), t(dg))),
        ("add_rms_norm d=2048", lambda x, r, w: ops.add_rms_norm(x, r, w),
         lambda x, r, w: (F.rms_norm(x + r, (dl,), w, 1e-6), x + r), lambda: (t(T, dl), t(T, dl), t(dl))),
        ("rotary H=16/4 D=128", lambda q, k: ops.rotary(q, k, cos, sin), rope_torch,
         lambda: (t(B, N, H, D), t(B, N, Hkv, D))),
        ("swiglu F=5632", ops.swiglu, lambda x: F.silu(x[..., :F_]) * x[..., F_:], lambda: (t(T, 2 * F_),)),
        (f"linear+CE V={V1}", lambda x, w: ops.fused_linear_cross_entropy(x, w, labels[V1]),
         lambda x, w: F.cross_entropy(F.linear(x, w).float(), labels[V1]), lambda: (t(T, dg), t(V1, dg, scale=0.02))),
        (f"linear+CE V={V2}", lambda x, w: ops.fused_linear_cross_entropy(x, w, labels[V2]),
         lambda x, w: F.cross_entropy(F.linear(x, w).float(), labels[V2]), lambda: (t(T, dl), t(V2, dl, scale=0.02))),
    ]


def bench_kernels(args, device) -> list[dict]:
    """Each op forward + backward at the models' shapes: tilestack against torch eager (and torch.compile), the
    median time, the peak memory above the inputs, and the largest difference of outputs and gradients."""
    rows = []
    print(f"{'op':24} {'tilestack ms':>12} {'torch ms':>9} {'compiled':>9} {'ratio':>6} {'peak ts':>8} "
          f"{'peak torch':>10} {'max rel err':>11}")
    for name, ours, theirs, make in kernel_cases(args.quick, device):
        inputs = make()
        res, outs = {}, {}
        fns = {"tilestack": ours, "torch": theirs}
        if "compile" in args.modes and not args.quick:
            fns["compiled"] = torch.compile(theirs, dynamic=False)
        for impl, fn in fns.items():
            def step(fn=fn, inputs=inputs):
                y = fn(*inputs)
                y = y if isinstance(y, tuple) else (y,)
                grads = torch.autograd.grad(y, inputs, [torch.ones_like(v) for v in y])
                return y, grads
            for _ in range(args.warmup):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            timer = StepTimer(device)
            for _ in range(max(args.steps, 5)):
                b = timer.start()
                outs[impl] = step()
                timer.stop(b)
            times = timer.times_ms()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else None
            res[impl] = {"median_ms": statistics.median(times), "peak_gib": peak}
        err = 0.0
        for a, b in zip([*outs["tilestack"][0], *outs["tilestack"][1]], [*outs["torch"][0], *outs["torch"][1]],
                        strict=True):
            a, b = a.detach().double(), b.detach().double()
            err = max(err, float((a - b).norm() / b.norm().clamp_min(1e-30)))
        row = {"op": name, **{k: v for k, v in res.items()}, "ratio": res["tilestack"]["median_ms"] /
               res["torch"]["median_ms"], "max_rel_err": err}
        comp = res.get("compiled", {}).get("median_ms")
        print(f"{name:24} {res['tilestack']['median_ms']:>12.3f} {res['torch']['median_ms']:>9.3f} "
              f"{comp if comp is not None else float('nan'):>9.3f} {row['ratio']:>6.3f} "
              f"{_gib(res['tilestack']['peak_gib']):>8} {_gib(res['torch']['peak_gib']):>10} {err:>11.2e}",
              flush=True)
        rows.append(row)
    return rows


def parse_sizes(text: str | None) -> list[tuple[int, int]] | None:
    if not text:
        return None
    out = []
    for part in text.split(","):
        b, n = part.lower().split("x")
        out.append((int(b), int(n)))
    return out


def run_rounds(model, init_state, mode: str, batch, args, device) -> dict:
    """Each implementation ``args.rounds`` times, alternating which goes first; medians over every timed step of
    every round, losses of the first round (each round starts from the same weights, so they repeat)."""
    runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
    for r in range(args.rounds):
        for impl in (IMPLS if r % 2 == 0 else tuple(reversed(IMPLS))):
            runs[impl].append(run_impl(model, init_state, impl, mode, batch, args, device))
    res = {}
    for impl, rs in runs.items():
        times = [t for x in rs for t in x["times_ms"]]
        peaks = [x["peak_gib"] for x in rs if x["peak_gib"] is not None]
        res[impl] = {**rs[0], "median_ms": statistics.median(times), "min_ms": min(times), "times_ms": times,
                     "round_medians_ms": [x["median_ms"] for x in rs], "peak_gib": max(peaks) if peaks else None}
    return res


def bench_case(name: str, cls, cfg, sizes, args, device, dtype) -> list[dict]:
    torch.manual_seed(0)
    model = cls(cfg, seed=0).to(device=device, dtype=dtype)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for B, N in sizes:
        batch = make_batch(cfg, B, N, seed=1, device=device)
        for mode in args.modes:
            res = run_rounds(model, init_state, mode, batch, args, device)
            t, s = res["torch"], res["tilestack"]
            diffs = [abs(a - b) for a, b in zip(t["losses"], s["losses"], strict=True)]
            row = {"model": name, "B": B, "N": N, "mode": mode, "torch": t, "tilestack": s,
                   "ratio": s["median_ms"] / t["median_ms"], "loss_diff_max": max(diffs),
                   "loss_diff_first": diffs[0], "loss_first": t["losses"][0], "loss_last": t["losses"][-1]}
            for impl in IMPLS:
                tok_s = B * N / (row[impl]["median_ms"] / 1e3)
                row[impl]["tokens_per_s"] = tok_s
                row[impl]["mfu"] = tok_s * cfg.flops_per_token(N) / args.peak if args.peak else None
            bar = FAST_MARGIN if N >= FAST_N else 1.0
            # the first step's loss: later steps drift apart in bf16 (rounding compounds through AdamW)
            row["meets_bar"] = bool(row["ratio"] < bar and row["loss_diff_first"] < LOSS_TOL
                                    and (t["peak_gib"] is None or s["peak_gib"] <= t["peak_gib"]))
            rows.append(row)
            print_row(row)
    # profiles after every timed step of this model: a profiler leaves the host slower for a while after it
    # stops (seen on the H200: steps timed right after a profile ran 1.2-1.5x slower and noisy), and an eager
    # tilestack step, closer to host-bound than torch's, felt it more
    if args.profile:
        for B, N in sizes:
            batch = make_batch(cfg, B, N, seed=1, device=device)
            for mode in args.modes:
                prof = {impl: profile_impl(model, init_state, impl, mode, batch, args, device) for impl in IMPLS}
                next(r for r in reversed(rows) if (r["B"], r["N"], r["mode"]) == (B, N, mode))["profile"] = prof
                print_profile(name, B, N, mode, prof)
    del model, init_state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


HEADER = (f"{'model':8} {'B':>3} {'N':>5} {'mode':7} {'torch ms':>9} {'tilestack ms':>12} {'ratio':>6} "
          f"{'MFU torch':>9} {'MFU ts':>7} {'loss diff 1st/max':>17} {'peak torch':>10} {'peak ts':>8} {'bar':>4}")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _gib(x) -> str:
    return "-" if x is None else f"{x:.2f}G"


def print_row(r: dict) -> None:
    print(f"{r['model']:8} {r['B']:>3} {r['N']:>5} {r['mode']:7} {r['torch']['median_ms']:>9.2f} "
          f"{r['tilestack']['median_ms']:>12.2f} {r['ratio']:>6.3f} {_pct(r['torch']['mfu']):>9} "
          f"{_pct(r['tilestack']['mfu']):>7} {r['loss_diff_first']:>8.1e}/{r['loss_diff_max']:.1e} "
          f"{_gib(r['torch']['peak_gib']):>10} {_gib(r['tilestack']['peak_gib']):>8} "
          f"{'ok' if r['meets_bar'] else 'MISS':>4}", flush=True)


def print_profile(name: str, B: int, N: int, mode: str, prof: dict) -> None:
    cats = [c for c, _ in CATEGORIES] + ["other"]
    print(f"  where the {mode} step's time goes, {name} B={B} N={N} (ms per step, share):")
    for impl in IMPLS:
        tot = sum(prof[impl]["ms_per_step"].values()) or 1.0
        parts = ", ".join(f"{c} {prof[impl]['ms_per_step'].get(c, 0.0):.2f} "
                          f"({100 * prof[impl]['ms_per_step'].get(c, 0.0) / tot:.0f}%)" for c in cats)
        print(f"    {impl:9} total {tot:.2f}: {parts}")
    for impl in IMPLS:
        top = "; ".join(f"{k[:60]} {v:.2f}" for k, v in prof[impl]["top_kernels"][:6])
        print(f"    top {impl}: {top}")
    sys.stdout.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models on the CPU: checks that everything runs")
    ap.add_argument("--models", default="gpt2,llama", help="comma-separated: gpt2, llama, gpt-1.3b")
    ap.add_argument("--sizes", default=None, help="BxN,BxN,... instead of each model's sizes")
    ap.add_argument("--modes", default=None, help="comma-separated: eager, compile (default both)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; quick 1)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--compile-scope", default="block", choices=("block", "model"),
                    help="torch.compile each repeated block (default; compiles once, as torchtitan does) or the "
                         "whole model as one graph (did not finish in 9 min for 24 layers on an H200)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per implementation (default 2)")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the torch.profiler breakdown")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--kernels", action="store_true", help="time each op (forward + backward) at the models' "
                    "shapes against torch instead of the model steps")
    args = ap.parse_args(argv)
    args.modes = tuple(args.modes.split(",")) if args.modes else (("eager",) if args.quick else MODES)
    for m in args.modes:
        if m not in MODES:
            ap.error(f"--modes: {m!r} is not one of {MODES}")
    args.steps = args.steps or (2 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if args.quick:
        from tilestack import config
        config.use_triton_interpreter()
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA GPU here; use --quick for the CPU check")
        device = torch.device("cuda")
    args.peak = None
    if device.type == "cuda":
        from tilestack.perf.device import detect
        spec = detect(0).spec
        args.peak = spec.peak("bf16") if spec else None
    cases = QUICK_CASES if args.quick else CASES
    sizes = parse_sizes(args.sizes)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "dtype": "bfloat16", "peak_bf16_flops": args.peak, "steps": args.steps, "warmup": args.warmup, "lr": args.lr}
    print(f"# {env}")
    if args.kernels:
        rows = bench_kernels(args, device)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"env": env, "kernels": rows}, f, indent=1)
        return 0
    print(HEADER)
    rows = []
    for name in args.models.split(","):
        if name not in cases:
            ap.error(f"--models: {name!r} is not one of {sorted(cases)}")
        cls, cfg, default_sizes = cases[name]
        rows += bench_case(name, cls, cfg, sizes or default_sizes, args, device, torch.bfloat16)
    print(f"# bar (faster everywhere, >= 5% at N >= {FAST_N}, first loss within {LOSS_TOL}, peak memory no higher): "
          f"{sum(r['meets_bar'] for r in rows)}/{len(rows)} rows meet it")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
    bad = [r for r in rows if not r["loss_diff_first"] < LOSS_TOL]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
