"""Whether the backend's swap measurements (``tilestack.compile.measure``) see the host cost a compiled graph
pays: a fused GEMM (GPT-2 small's mlp.c_fc + GELU at 8 x 1024 tokens) timed per call, host included, from a plain
script, from inside a torch.compile backend on the compiling thread, and from there on a thread of its own.

    PYTHONPATH=src python3 scripts/gpu/check_compile_measure.py
"""

from __future__ import annotations

import threading

import torch


def main() -> None:
    from tilestack.compile import measure
    from tilestack.compile.ops import linear_epilogue_op
    from tilestack.perf.timing import time_fn

    dev = "cuda"
    x = torch.randn(8192, 768, device=dev, dtype=torch.bfloat16)
    w = torch.randn(3072, 768, device=dev, dtype=torch.bfloat16) * 768**-0.5
    b = torch.randn(3072, device=dev, dtype=torch.bfloat16)

    def fused():
        linear_epilogue_op(x, w, b, None, "gelu_tanh", False)

    def addmm():
        torch.addmm(b, x, w.t())

    def timed(fn):
        return time_fn(fn, args_sets=[()], device=dev, budget_s=0.15, warmup_s=0.02).median_s * 1e6

    def on_thread(fn):
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("us", timed(fn)))
        t.start()
        t.join()
        return out["us"]

    rows = [("plain script", timed(fused), timed(addmm))]

    def backend(gm, example_inputs):
        rows.append(("in the backend, compiling thread", timed(fused), timed(addmm)))
        rows.append(("in the backend, own thread", on_thread(fused), on_thread(addmm)))
        rows.append(("in the backend, measure._time", measure._time(fused, dev) * 1e6, measure._time(addmm, dev) * 1e6))
        return gm.forward

    with torch.no_grad():
        torch.compile(lambda t: t * 2, backend=backend)(x)
    graph = time_fn(fused, args_sets=[()], device=dev, budget_s=0.15, graph=True).median_s * 1e6
    print(f"\n{torch.cuda.get_device_name()}: fused GEMM 8192 x 768 x 3072 + bias + GELU, us per call "
          f"(kernel alone, CUDA graph: {graph:.1f})")
    print(f"{'where':<36} {'fused op':>9} {'addmm':>9}")
    for where, f, a in rows:
        print(f"{where:<36} {f:9.1f} {a:9.1f}")


if __name__ == "__main__":
    main()
