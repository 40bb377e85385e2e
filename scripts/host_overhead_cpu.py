"""Host (Python) cost per call of the training-step ops of ``tilestack.torch.ops``, and of the ``tilestack::*``
ops a compiled graph calls (the ``*_op`` cases), on a CPU, with the kernel launch stubbed: what a call costs on
the host before the GPU sees it, beside torch's own op at a tiny size.

    PYTHONPATH=src .venv/bin/python scripts/host_overhead_cpu.py [--n 3000] [--only attention_fwd_op,layer_norm]
                                                                 [--profile attention_fwd_op:fwd]

Everything of a call runs for real (the plan lookups, the checks, autograd, the allocations, the launcher's
argument list) through the Triton backend's direct launch path (``launch._DirectLaunch``, what a GPU launch
takes after its first); only the compiled kernel's C launcher, the CUDA stream query and the NVTX range are
no-ops. The shapes are tiny, so torch's numbers are its call overhead (its arithmetic is a few hundred
elements). These are CPU host-path numbers, not GPU times: a GPU launch adds the same few microseconds
(cuLaunchKernel) to both columns.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
import types

import torch
import torch.nn.functional as F

import tilestack
import tilestack.backends.triton.launch as launch
from tilestack import config, kernels
from tilestack.torch import ops

# inference ops, and the backward ops as a compiled backward graph calls them (no autograd): timed forward only
FORWARD_ONLY = ("linear_epilogue", "gemm", "attention_bwd_op", "layer_norm_bwd_op", "rms_norm_bwd_op")


def _noop(*args, **kwargs) -> None:
    return None


def stub_launches() -> None:
    """Every Triton launcher takes the direct path with a no-op C launcher: Python cost only."""
    launcher = _noop

    def expand_descriptors(*args):   # Triton's wrapper of its C launcher, which _DirectLaunch looks inside
        return launcher(*args)

    real_call = launch.Launcher.__call__

    def call(self, args):
        if self.fast is None:    # as _first_launch leaves it, minus the GPU
            compiled = types.SimpleNamespace(
                run=types.SimpleNamespace(global_scratch_size=0, profile_scratch_size=0, launch=expand_descriptors,
                                          launch_cooperative_grid=False, launch_pdl=False),
                function=0, packed_metadata=None,
                metadata=types.SimpleNamespace(tensordesc_meta=[{}] * len(self.descriptors)))
            fast = launch._DirectLaunch(self, compiled, 0)
            fast.stream = lambda device_index: 0
            fast.encode = lambda descriptor, meta: [0]     # encoded once per address: not the per-call path
            fast.nvtx = (_noop, _noop, "stub")
            self.fast = fast
        return real_call(self, args)

    launch.Launcher.__call__ = call


def per_call_us(fn, n: int) -> float:
    """Fastest of 7 rounds of the mean wall time per call over ``n`` calls (a shared machine: the minimum is
    the least disturbed round)."""
    for _ in range(max(20, n // 20)):
        fn()
    best = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def _forward(f):
    def call():
        with torch.no_grad():
            f()
    return call


def _forward_backward(f):
    def call():
        out = f()
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return call


def cases() -> dict:
    """Each op of a training step beside what a PyTorch model calls for it, at (B, N) = (2, 4), bf16."""
    bf = torch.bfloat16

    def leaf(*shape, dtype=bf):
        return torch.randn(*shape, dtype=dtype).requires_grad_()

    d = 64
    h, r, w, b = leaf(2, 4, d), leaf(2, 4, d), leaf(d), leaf(d)
    gu = leaf(2, 4, 2 * d)
    q, k = leaf(2, 4, 4, 16), leaf(2, 4, 2, 16)
    cos, sin = kernels.rotary_tables(4, 16)

    def torch_rotary(q, k):
        def rot(x):
            x1, x2 = x.chunk(2, dim=-1)
            c = torch.cat((cos, cos), -1)[None, :, None, :].to(x.dtype)
            s = torch.cat((sin, sin), -1)[None, :, None, :].to(x.dtype)
            return x * c + torch.cat((-x2, x1), -1) * s
        return rot(q), rot(k)

    import tilestack.compile.ops  # noqa: F401 - registers the backend's tilestack:: ops
    xe, we = leaf(8, d), leaf(100, d)
    labels = torch.randint(0, 100, (8,))
    x2, wl, bl = torch.randn(8, d, dtype=bf), torch.randn(2 * d, d, dtype=bf), torch.randn(2 * d, dtype=bf)
    return {
        # the backend's fused GEMM as a compiled graph calls it (a tilestack:: op), and the library's GEMM under it
        "linear_epilogue": (lambda: torch.ops.tilestack.linear_epilogue(x2, wl, bl, None, "gelu_tanh", False),
                            lambda: F.gelu(F.linear(x2, wl, bl), approximate="tanh")),
        "gemm": (lambda: kernels.gemm(x2, wl.t(), bias=bl, activation="gelu_tanh"),
                 lambda: F.gelu(F.linear(x2, wl, bl), approximate="tanh")),
        "layer_norm": (lambda: ops.layer_norm(h, w, b), lambda: F.layer_norm(h, (d,), w, b)),
        "add_layer_norm": (lambda: ops.add_layer_norm(h, r, w, b), lambda: (F.layer_norm(h + r, (d,), w, b), h + r)),
        "rms_norm": (lambda: ops.rms_norm(h, w), lambda: F.rms_norm(h, (d,), w)),
        "add_rms_norm": (lambda: ops.add_rms_norm(h, r, w), lambda: (F.rms_norm(h + r, (d,), w), h + r)),
        "swiglu": (lambda: ops.swiglu(gu), lambda: F.silu(gu[..., :d]) * gu[..., d:]),
        "rotary": (lambda: ops.rotary(q, k, cos, sin), lambda: torch_rotary(q, k)),
        "linear_cross_entropy": (lambda: ops.fused_linear_cross_entropy(xe, we, labels),
                                 lambda: F.cross_entropy(F.linear(xe, we).float(), labels)),
    } | op_cases(leaf, h, w, b, d)


def op_cases(leaf, h, w, b, d) -> dict:
    """The ``tilestack::*`` ops a compiled graph calls (``*_op``): a compiled forward graph calls the forward op
    without autograd (mode fwd), its backward graph the backward op (the ``*_bwd_op`` rows); fwd+bwd is the op
    with autograd, as a tensor subclass's eager call takes it. Beside them the public ``tilestack.attention``,
    whose eager path skips the dispatcher, and torch's own op at the same size."""
    t = torch.ops.tilestack
    q, k, v = leaf(1, 2, 8, 16), leaf(1, 2, 8, 16), leaf(1, 2, 8, 16)        # (B, H, N, D)
    qd, kd, vd, hd = q.detach(), k.detach(), v.detach(), h.detach()
    with torch.no_grad():
        o, lse, _ = t.attention_fwd(qd, kd, vd, None, True, 0.25, "top_left")   # (o, lse, stats)
        o_cpu, lse_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qd, kd, vd, 0.0, True)[:2]
        _, mean, rstd = t.layer_norm_fwd(hd, w.detach(), b.detach(), 1e-5)
        _, mean_t, rstd_t = torch.ops.aten.native_layer_norm(hd, (d,), w.detach(), b.detach(), 1e-5)
    dy, do = torch.randn_like(hd), torch.randn_like(o)
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)       # noqa: E731
    ln = lambda: F.layer_norm(h, (d,), w, b)                                                  # noqa: E731
    ln_bwd = lambda: torch.ops.aten.native_layer_norm_backward(                              # noqa: E731
        dy, hd, (d,), mean_t, rstd_t, w.detach(), b.detach(), [True, True, True])
    return {
        "attention": (lambda: tilestack.attention(q, k, v, causal=True, scale=0.25), sdpa),
        "attention_fwd_op": (lambda: t.attention_fwd(q, k, v, None, True, 0.25, "top_left")[0], sdpa),
        "attention_bwd_op": (lambda: t.attention_bwd(qd, kd, vd, o, lse, do, None, True, 0.25, "top_left"),
                             lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                                 do, qd, kd, vd, o_cpu, lse_cpu, 0.0, True)),
        "layer_norm_fwd_op": (lambda: t.layer_norm_fwd(h, w, b, 1e-5)[0], ln),
        "layer_norm_bwd_op": (lambda: t.layer_norm_bwd(dy, hd, w.detach(), mean, rstd, None), ln_bwd),
        "rms_norm_fwd_op": (lambda: t.rms_norm_fwd(h, w, 1e-6)[0], lambda: F.rms_norm(h, (d,), w, 1e-6)),
        "rms_norm_bwd_op": (lambda: t.rms_norm_bwd(dy, hd, w.detach(), rstd, None), ln_bwd),
        "add_layer_norm_fwd_op": (lambda: t.add_layer_norm_fwd(h, h, w, b, 1e-5)[0],
                                  lambda: F.layer_norm(h + h, (d,), w, b)),
        "softmax_op": (lambda: t.softmax(h), lambda: torch.softmax(h, -1)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000, help="calls per round (forward+backward: a fifth of it)")
    ap.add_argument("--only", help="comma-separated ops to measure")
    ap.add_argument("--profile", help="OP:MODE (MODE fwd or fwd+bwd): cProfile's table of that case, by own time")
    args = ap.parse_args()
    torch.set_num_threads(1)
    stub_launches()
    with config.override(backend="triton"):
        all_cases = cases()
        if args.profile:
            name, mode = args.profile.split(":")
            f = (_forward if mode == "fwd" else _forward_backward)(all_cases[name][0])
            per_call_us(f, 50)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.n):
                f()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
            return
        names = args.only.split(",") if args.only else list(all_cases)
        print(f"{'op':<22}{'mode':<9}{'tilestack us':>13}{'torch us':>10}{'ratio':>7}")
        for name in names:
            ours, theirs = all_cases[name]
            modes = (("fwd", _forward, args.n), ("fwd+bwd", _forward_backward, max(1, args.n // 5)))
            for mode, wrap, n in modes[:1] if name in FORWARD_ONLY else modes:
                t_ours, t_torch = per_call_us(wrap(ours), n), per_call_us(wrap(theirs), n)
                print(f"{name:<22}{mode:<9}{t_ours:13.1f}{t_torch:10.1f}{t_ours / t_torch:7.2f}", flush=True)


if __name__ == "__main__":
    main()
