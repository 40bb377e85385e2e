"""On a GPU: where the host time of a norm's forward + backward through autograd goes (tilestack.torch.ops
against torch), piece by piece at a small size (4 x 16 x 1024 bf16), then torch.profiler's table by self CPU time.

    PYTHONPATH=src python3 scripts/gpu/diagnose_norm_host.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_host_cost import per_call_us  # noqa: E402  (scripts/bench_host_cost.py: the same timing loop)


def main() -> None:
    import tilestack  # noqa: F401
    from tilestack.kernels.layernorm_bwd import norm_backward
    from tilestack.kernels.rmsnorm import norm_forward
    from tilestack.torch import ops

    dev, bf = "cuda", torch.bfloat16
    h = torch.randn(4, 16, 1024, device=dev, dtype=bf, requires_grad=True)
    w = torch.ones(1024, device=dev, dtype=bf, requires_grad=True)
    b = torch.zeros(1024, device=dev, dtype=bf, requires_grad=True)
    dy = torch.ones_like(h)
    hr = h.detach().reshape(-1, 1024)
    y, _, mean, rstd = norm_forward(hr, w.detach(), b.detach(), None, 1e-5, backend=None, config={})
    leaves = (h, w, b)
    pieces = {
        "torch.empty_like": lambda: torch.empty_like(hr),
        "norm_forward (kernel fn)": lambda: norm_forward(hr, w.detach(), b.detach(), None, 1e-5, backend=None,
                                                         config={}),
        "norm_backward (kernel fn)": lambda: norm_backward(dy.view(-1, 1024), hr, w.detach(), mean, rstd,
                                                           centered=True, backend=None, config={}),
        "ops.layer_norm no grad": lambda: _nograd(lambda: ops.layer_norm(h, w, b)),
        "ops.layer_norm fwd (grad)": lambda: ops.layer_norm(h, w, b),
        "F.layer_norm fwd (grad)": lambda: F.layer_norm(h, (1024,), w, b),
        "ops.layer_norm fwd+grad": lambda: torch.autograd.grad(ops.layer_norm(h, w, b), leaves, dy),
        "F.layer_norm fwd+grad": lambda: torch.autograd.grad(F.layer_norm(h, (1024,), w, b), leaves, dy),
    }
    y_ts, y_t = ops.layer_norm(h, w, b), F.layer_norm(h, (1024,), w, b)
    pieces["ops.layer_norm grad only (retained)"] = lambda: torch.autograd.grad(y_ts, leaves, dy, retain_graph=True)
    pieces["F.layer_norm grad only (retained)"] = lambda: torch.autograd.grad(y_t, leaves, dy, retain_graph=True)
    for name, f in pieces.items():
        print(f"{name:<40}{per_call_us(f):8.1f} us/call", flush=True)

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(50):
            torch.autograd.grad(ops.layer_norm(h, w, b), leaves, dy)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def _nograd(f):
    with torch.no_grad():
        return f()


if __name__ == "__main__":
    main()
