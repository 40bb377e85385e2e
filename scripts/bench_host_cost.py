"""Host cost per call of what users call, beside torch, in one process: wall time per call over a loop
(launch included, no sync inside the loop), so it measures what a training step at small sizes feels.

    PYTHONPATH=src python3 scripts/bench_host_cost.py [--json out.json]

Cases: tilestack.attention forward and forward+backward against torch SDPA (FLASH_ATTENTION, CUDNN and its
default choice) at a tiny size (1, 8, 128, 64) and at (8, 16, 1024, 128), bf16; gemm, softmax and layer_norm
against torch at small sizes. Then: the op captured in a CUDA graph replays to the eager result, and
torch.compile(fullgraph=True) of a model using it compiles without a graph break and matches eager.
Prints a table with the ratios last.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import tilestack
from tilestack import kernels


def per_call_us(fn, n: int = 300, warmup: int = 30) -> float:
    """Median over 5 rounds of the wall time per call of ``n`` back-to-back calls, synchronized at the ends."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return sorted(rounds)[2]


def per_call_us_interleaved(fns: dict, n: int = 300, warmup: int = 30, rounds: int = 7) -> dict:
    """{name: median us per call} of several implementations timed in alternating rounds (the order rotated each
    round), so a slow spell of a shared host lands on all of them alike and their ratios hold. An implementation
    that raises (a backend refusing the shape) is left out, with its message printed."""
    live = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
            live[name] = fn
        except RuntimeError as e:
            print(f"{name}: {e}".splitlines()[0])
    times: dict = {name: [] for name in live}
    names = list(live)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)] if names else ():
            fn = live[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / n * 1e6)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def _sdpa_with(backend, q, k, v):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _check_against_sdpa(q, k, v, do) -> dict:
    """Relative errors of tilestack.attention's output and gradients against SDPA's (both bf16)."""
    def run(f):
        for t in (q, k, v):
            t.grad = None
        o = f(q, k, v)
        o.backward(do)
        return [o.detach()] + [t.grad.clone() for t in (q, k, v)]

    ours = run(lambda q, k, v: tilestack.attention(q, k, v, causal=True))
    ref = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    return {name: float((a.float() - b.float()).norm() / b.float().norm())
            for name, a, b in zip(("o", "dq", "dk", "dv"), ours, ref, strict=True)}


def attention_cases(rows: list) -> None:
    for shape in ((1, 8, 128, 64), (8, 16, 1024, 128)):
        B, H, N, D = shape
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        do = torch.randn_like(q)

        impls = {"tilestack": functools.partial(tilestack.attention, q, k, v, causal=True),
                 "sdpa-default": functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=True),
                 "sdpa-flash": functools.partial(_sdpa_with, SDPBackend.FLASH_ATTENTION, q, k, v),
                 "sdpa-cudnn": functools.partial(_sdpa_with, SDPBackend.CUDNN_ATTENTION, q, k, v)}
        for mode in ("fwd", "fwd+bwd"):
            calls = {}
            for name, f in impls.items():
                if mode == "fwd":
                    def call(f=f):
                        with torch.no_grad():
                            f()
                else:
                    def call(f=f, do=do):
                        f().backward(do)
                calls[name] = call
            res = per_call_us_interleaved(calls)   # a backend that refuses this shape is left out
            if mode == "fwd+bwd":   # after thousands of direct launches: still the right answer?
                checks = _check_against_sdpa(q, k, v, do)
                print(f"attention{shape} vs SDPA after the timing loops: {checks}")
            for name, us in res.items():
                rows.append({"case": f"attention{shape}", "mode": mode, "impl": name, "us": us,
                             "vs_flash": us / res["sdpa-flash"] if "sdpa-flash" in res else None})


def _torch_rotary(q, k, cos, sin):
    """Rotate-half RoPE as a PyTorch model writes it (the Llama reference code's form)."""
    def rot(x):
        x1, x2 = x.chunk(2, dim=-1)
        c = torch.cat((cos, cos), -1)[None, :, None, :].to(x.dtype)
        s = torch.cat((sin, sin), -1)[None, :, None, :].to(x.dtype)
        return x * c + torch.cat((-x2, x1), -1) * s
    return rot(q), rot(k)


def library_cases(rows: list) -> None:
    """Every other op of the library against what a PyTorch model calls for it, at a small size where the host
    cost is what a call costs: forward alone (no grad) and forward + backward through autograd."""
    from tilestack.torch import ops

    dev, bf = "cuda", torch.bfloat16
    a = torch.randn(256, 256, device=dev, dtype=bf)
    x = torch.randn(64, 1024, device=dev, dtype=bf)
    w = torch.ones(1024, device=dev, dtype=bf)
    b = torch.zeros(1024, device=dev, dtype=bf)
    pairs = {"gemm(256^3)": (lambda: kernels.gemm(a, a), lambda: a @ a),
             "softmax(64x1024)": (lambda: kernels.softmax(x), lambda: torch.softmax(x, -1)),
             "layer_norm(64x1024)": (lambda: kernels.layer_norm(x, w, b), lambda: F.layer_norm(x, (1024,), w, b))}
    for case, (ours, theirs) in pairs.items():
        _pair(rows, case, "fwd", ours, theirs)

    # the ops of a training step (tilestack.torch.ops), each with its gradient, at (B, N) = (4, 16)
    def leaf(*shape, dtype=bf):
        return torch.randn(*shape, device=dev, dtype=dtype).requires_grad_()

    h, r = leaf(4, 16, 1024), leaf(4, 16, 1024)
    wl, bl = leaf(1024), leaf(1024)
    gu = leaf(4, 16, 2 * 1024)
    q, k = leaf(4, 16, 8, 64), leaf(4, 16, 2, 64)
    cos, sin = kernels.rotary_tables(16, 64, device=dev)
    xe, we = leaf(64, 256), leaf(1000, 256)
    labels = torch.randint(0, 1000, (64,), device=dev)
    step_ops = {
        "layer_norm(4x16x1024)": (lambda: ops.layer_norm(h, wl, bl), lambda: F.layer_norm(h, (1024,), wl, bl)),
        "add_layer_norm(4x16x1024)": (lambda: ops.add_layer_norm(h, r, wl, bl),
                                      lambda: (F.layer_norm(h + r, (1024,), wl, bl), h + r)),
        "rms_norm(4x16x1024)": (lambda: ops.rms_norm(h, wl), lambda: F.rms_norm(h, (1024,), wl)),
        "add_rms_norm(4x16x1024)": (lambda: ops.add_rms_norm(h, r, wl),
                                    lambda: (F.rms_norm(h + r, (1024,), wl), h + r)),
        "swiglu(4x16x2048)": (lambda: ops.swiglu(gu), lambda: F.silu(gu[..., :1024]) * gu[..., 1024:]),
        "rotary(4x16x8|2x64)": (lambda: ops.rotary(q, k, cos, sin), lambda: _torch_rotary(q, k, cos, sin)),
        "linear+cross_entropy(64x256, V=1000)": (lambda: ops.fused_linear_cross_entropy(xe, we, labels),
                                                 lambda: F.cross_entropy((xe @ we.T).float(), labels)),
    }
    for case, (ours, theirs) in step_ops.items():
        def fwd(f):
            def call():
                with torch.no_grad():
                    f()
            return call

        def fwd_bwd(f):
            def call():
                out = f()
                outs = out if isinstance(out, tuple) else (out,)
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            return call
        _pair(rows, case, "fwd", fwd(ours), fwd(theirs))
        _pair(rows, case, "fwd+bwd", fwd_bwd(ours), fwd_bwd(theirs))


def _pair(rows: list, case: str, mode: str, ours, theirs) -> None:
    t = per_call_us_interleaved({"ours": ours, "torch": theirs})
    t_ours, t_torch = t["ours"], t["torch"]
    rows.append({"case": case, "mode": mode, "impl": "tilestack", "us": t_ours, "vs_torch": t_ours / t_torch})
    rows.append({"case": case, "mode": mode, "impl": "torch", "us": t_torch, "vs_torch": 1.0})


def graph_and_compile_checks() -> dict:
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    eager = tilestack.attention(q, k, v, causal=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            tilestack.attention(q, k, v, causal=True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = tilestack.attention(q, k, v, causal=True)
    q.copy_(torch.randn_like(q))
    g.replay()
    torch.cuda.synchronize()
    graph_ok = bool(torch.allclose(out, tilestack.attention(q, k, v, causal=True), atol=0, rtol=0))
    graph_ok &= not torch.equal(out, eager)   # the replay read the new q

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(256, 768, dtype=torch.bfloat16, device="cuda")

        def forward(self, x):
            B, N, _ = x.shape
            q, k, v = self.qkv(x).view(B, N, 3, 4, 64).permute(2, 0, 3, 1, 4)
            return tilestack.attention(q, k, v, causal=True).transpose(1, 2).reshape(B, N, 256)

    m = Block()
    x = torch.randn(2, 128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    explain = torch._dynamo.explain(m)(x)
    compiled = torch.compile(m, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    compile_ok = bool(torch.allclose(y, m(x), atol=2e-2, rtol=2e-2))
    return {"cuda_graph_replay_ok": graph_ok, "graph_breaks": explain.graph_break_count,
            "compile_fullgraph_ok": compile_ok}


def diagnose() -> None:
    """Where a tiny forward+backward spends its host time: torch.profiler's table by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = (torch.randn(1, 8, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    for _ in range(10):
        tilestack.attention(q, k, v, causal=True).backward(do)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(50):
            tilestack.attention(q, k, v, causal=True).backward(do)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    # the same pieces timed one by one, without the profiler
    from tilestack.kernels.attention_bwd import attention_backward
    from tilestack.kernels.attention_fwd import attention_forward

    with torch.no_grad():
        o, lse = attention_forward(q, k, v, True, None)
        pieces = {"attention_forward": lambda: attention_forward(q, k, v, True, None),
                  "attention_backward": lambda: attention_backward(q, k, v, o, lse, do, True, None),
                  "torch.empty_like": lambda: torch.empty_like(q)}
        # inside one launch: the prebuilt launcher, its argument list, the compiled kernel's own launcher
        from triton.backends.nvidia.driver import make_tensordesc_arg

        from tilestack.kernels.attention_fwd import attention_fwd_kernel
        launcher = next(iter(attention_fwd_kernel._launchers.values()))
        args = (q, k, v, o, lse, 0.125)
        flat = launcher.flat(args)
        compiled, grid = launcher.compiled, launcher.grid
        stream = torch.cuda.current_stream().cuda_stream
        pieces["Launcher(args)"] = lambda: launcher(args)
        pieces["Launcher.flat(args)"] = lambda: launcher.flat(args)
        pieces["CompiledKernel.run"] = lambda: compiled.run(*grid, stream, compiled.function, compiled.packed_metadata,
                                                            None, None, None, *flat)
        meta = getattr(compiled.metadata, "tensordesc_meta", None)
        descs = [a for a in flat if type(a).__name__ == "TensorDescriptor"]
        if descs:
            pieces["make_tensordesc_arg"] = lambda: make_tensordesc_arg(descs[0], meta[0] if meta else None)
        for name, f in pieces.items():
            print(f"{name:<24}{per_call_us(f):8.1f} us/call")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--diagnose", action="store_true", help="profile a tiny forward+backward first")
    args = ap.parse_args()
    if args.diagnose:
        diagnose()
    rows: list = []
    attention_cases(rows)
    library_cases(rows)
    try:
        checks = graph_and_compile_checks()
    except Exception as e:   # reported, not fatal: the timings above still print
        import traceback
        traceback.print_exc()
        checks = {"error": f"{type(e).__name__}: {e}"[:2000]}
    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'case':<38}{'mode':<9}{'impl':<14}{'us/call':>9}{'ratio':>8}")
    for r in rows:
        ratio = r.get("vs_flash", r.get("vs_torch"))
        shown = "" if ratio is None else f"{ratio:8.2f}"
        print(f"{r['case']:<38}{r['mode']:<9}{r['impl']:<14}{r['us']:>9.1f}{shown}")
    print(checks)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
                       "checks": checks}, f, indent=1)


if __name__ == "__main__":
    main()
