"""On a GPU: attention dropout fused in tilestack's kernels, checked and timed (issue 8, item 6).

    PYTHONPATH=src python3 scripts/gpu/check_dropout.py --json /tmp/dropout.json [--time-limit 115]

1. Correctness (bf16 unless said): the compiled kernels' mask is ``dropout_mask`` bit for bit (v = the
   identity, so o's zeros are the dropped entries); forward and gradients of ``tilestack.attention(...,
   dropout_p=0.1)`` against float64 attention with that same mask (ragged GQA, causal); the kept fraction;
   dropout_p = 0 gives exactly the plain kernels' output; fp32 through tf32 (``allow_tf32``) and IEEE against
   float64.
2. Time, forward and forward+backward, bf16, non-causal, at (8, 16, 1024, 64) and (4, 16, 2048, 128):
   tilestack with dropout 0.1 and 0, torch SDPA with dropout 0.1 (its default backend choice) and 0.

Bounded: an alarm stops the run after --time-limit seconds (compiles included), the cases not reached are
listed as skipped. JSON to --json, a table last; exits non-zero if a correctness check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time

import torch
import torch.nn.functional as F

P = 0.1
TOL = {torch.bfloat16: 1e-2, torch.float32: 4e-3}   # fp32: tf32's documented bound on a GPU (attention_fwd)


class _OutOfTime(Exception):
    pass


def _alarm(*_):
    raise _OutOfTime


def rel(got, want) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    if not bool(got.isfinite().all()):
        return math.inf
    return float((got - want).norm() / want.norm().clamp_min(1e-3))


def _float64(q, k, v, do, causal, p, keep):
    from tilestack.kernels.attention_fwd import reference

    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    o, _ = reference(*leaves, causal, None, dropout_p=p, dropout_keep=keep)
    o.backward(do.cpu().double())
    return o.detach(), [t.grad for t in leaves]


def check_mask_bits(dev) -> dict:
    """v = I: o = P * keep / (1 - p), so (o != 0) is the kernels' mask; compared with dropout_mask."""
    from tilestack.kernels.attention_fwd import attention_forward, dropout_mask, dropout_rng

    B, H, N, D = 2, 4, 200, 128
    q, k = (0.1 * torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    v = torch.eye(N, D, device=dev, dtype=torch.bfloat16).expand(B, H, N, D).contiguous()   # keys past D: unseen
    rng = dropout_rng()
    o, _ = attention_forward(q, k, v, dropout_p=P, rng=rng)
    keep = dropout_mask(rng, P, (B, H, N, N))[..., :D]
    same = torch.equal((o != 0).cpu(), keep)
    return dict(check="kernel mask == dropout_mask (bits)", value=f"{'equal' if same else 'DIFFERENT'}",
                limit="equal", ok=same)


def check_against_float64(dev, name, shape, causal) -> list[dict]:
    import tilestack
    from tilestack.kernels.attention_fwd import dropout_mask, dropout_rng

    B, H, Hkv, Nq, Nk, D = shape
    dt = torch.bfloat16
    q = torch.randn(B, H, Nq, D, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(B, Hkv, Nk, D, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(B, Hkv, Nk, D, device=dev, dtype=dt, requires_grad=True)
    do = torch.randn(B, H, Nq, D, device=dev, dtype=dt)
    torch.manual_seed(1234)
    o = tilestack.attention(q, k, v, causal=causal, dropout_p=P)
    grads = torch.autograd.grad(o, (q, k, v), do)
    torch.manual_seed(1234)
    keep = dropout_mask(dropout_rng(), P, (B, H, Nq, Nk))
    o64, g64 = _float64(q, k, v, do, causal, P, keep)
    rows = [dict(check=f"{name}: o vs float64, same mask", value=rel(o, o64), limit=TOL[dt])]
    for n, g, w in zip(("dq", "dk", "dv"), grads, g64, strict=True):
        rows.append(dict(check=f"{name}: {n} vs float64, same mask", value=rel(g, w), limit=2.5 * TOL[dt]))
    frac = float(keep.float().mean())
    rows.append(dict(check=f"{name}: kept fraction", value=frac, limit=f"{1 - P} +- 0.01",
                     ok=abs(frac - (1 - P)) < 0.01))
    for r in rows:
        if "ok" not in r:
            r["ok"] = r["value"] <= r["limit"]
    return rows


def check_p_zero(dev) -> dict:
    import tilestack

    q, k, v = (torch.randn(2, 8, 333, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
    same = torch.equal(tilestack.attention(q, k, v, dropout_p=0.0), tilestack.attention(q, k, v))
    return dict(check="dropout_p=0 == no dropout (exact)", value="equal" if same else "DIFFERENT", limit="equal",
                ok=same)


def check_tf32(dev) -> list[dict]:
    import tilestack

    q, k, v, do = (torch.randn(2, 4, 257, 64, device=dev) for _ in range(4))
    rows = []
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for allow, limit in ((False, 1e-5), (True, TOL[torch.float32])):
            torch.backends.cuda.matmul.allow_tf32 = allow
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            o = tilestack.attention(*leaves, causal=True)
            grads = torch.autograd.grad(o, leaves, do)
            o64, g64 = _float64(q, k, v, do, True, 0.0, None)
            err = max([rel(o, o64)] + [rel(g, w) for g, w in zip(grads, g64, strict=True)])
            rows.append(dict(check=f"fp32 {'tf32' if allow else 'ieee'}: max rel error of o, dq, dk, dv",
                             value=err, limit=limit, ok=err <= limit))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return rows


def timings(dev, shape, budget_s: float) -> list[dict]:
    import tilestack
    from tilestack.perf import timing

    B, H, N, D = shape
    q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    fns = {"tilestack": lambda *a, p: tilestack.attention(*a, dropout_p=p),
           "torch SDPA": lambda *a, p: F.scaled_dot_product_attention(*a, dropout_p=p)}
    rows = []
    for name, fn in fns.items():
        for p in (P, 0.0):
            torch.autograd.grad(fn(*leaves, p=p), leaves, do)        # compiles outside the timed calls
            torch.cuda.synchronize()
            fwd = timing.time_fn(lambda fn=fn, p=p: fn(q, k, v, p=p), budget_s=budget_s)
            both = timing.time_fn(lambda fn=fn, p=p: torch.autograd.grad(fn(*leaves, p=p), leaves, do),
                                  budget_s=budget_s)
            rows.append(dict(shape=str(shape), impl=name, dropout_p=p, fwd_ms=fwd.median_s * 1e3,
                             fwd_bwd_ms=both.median_s * 1e3))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", "--out", dest="json", default="check_dropout.json", help="where to write results")
    ap.add_argument("--time-limit", type=int, default=115, help="seconds for the whole run, compiles included")
    ap.add_argument("--budget-s", type=float, default=0.5, help="timed seconds per measurement")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(args.time_limit)
    checks, times, skipped = [], [], []
    # most wanted first: each step compiles kernels of its own (a few seconds each, cached on disk after a run)
    steps = [("mask bits", lambda: checks.append(check_mask_bits(dev))),
             ("ragged GQA", lambda: checks.extend(check_against_float64(dev, "ragged GQA (2,8,2,300,260,64)",
                                                                        (2, 8, 2, 300, 260, 64), False))),
             ("time (8,16,1024,64)", lambda: times.extend(timings(dev, (8, 16, 1024, 64), args.budget_s))),
             ("time (4,16,2048,128)", lambda: times.extend(timings(dev, (4, 16, 2048, 128), args.budget_s))),
             ("causal d128", lambda: checks.extend(check_against_float64(dev, "causal (1,4,4,257,257,128)",
                                                                         (1, 4, 4, 257, 257, 128), True))),
             ("p = 0", lambda: checks.append(check_p_zero(dev))),
             ("fp32 tf32", lambda: checks.extend(check_tf32(dev)))]
    for at, (_, step) in enumerate(steps):
        try:
            step()
            torch.cuda.synchronize()
        except _OutOfTime:
            skipped = [name for name, _ in steps[at:]]
            break
    signal.alarm(0)
    bad = [c for c in checks if not c["ok"]]
    with open(args.json, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dropout_p": P,
                   "checks": checks, "timings": times, "skipped": skipped,
                   "seconds": time.perf_counter() - start}, f, indent=1, default=str)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{time.perf_counter() - start:.0f} s; skipped: {skipped or 'none'}")
    print(f"\n{'check':52} {'value':>12} {'limit':>14} ok")
    for c in checks:
        value = f"{c['value']:.2e}" if isinstance(c["value"], float) else c["value"]
        limit = f"{c['limit']:.0e}" if isinstance(c["limit"], float) else c["limit"]
        print(f"{c['check']:52} {value:>12} {limit:>14} {'yes' if c['ok'] else 'NO'}")
    print(f"\n{'shape':22} {'impl':12} {'dropout':>7} {'fwd ms':>8} {'fwd+bwd ms':>11} {'SDPA / ours':>12}")
    sdpa = {(r["shape"], r["dropout_p"]): r for r in times if r["impl"] == "torch SDPA"}
    for r in times:
        base = sdpa.get((r["shape"], r["dropout_p"]))
        ratio = f"{base['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}" if base and r["impl"] != "torch SDPA" else ""   # fwd+bwd
        print(f"{r['shape']:22} {r['impl']:12} {r['dropout_p']:>7} {r['fwd_ms']:>8.3f} {r['fwd_bwd_ms']:>11.3f} "
              f"{ratio:>12}")
    return 1 if bad or not checks else 0


if __name__ == "__main__":
    sys.exit(main())
