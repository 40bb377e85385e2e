"""Attention: tilestack vs torch SDPA's FLASH_ATTENTION (FlashAttention-2) and CUDNN_ATTENTION backends,
in one process, on the same inputs, over the FlashAttention-3 paper's grid (batch x seq = 16k tokens,
hidden 2048, seq 512..16k, head dim 64 and 128, causal and not).

    PYTHONPATH=src python3 scripts/bench_attention.py                  # the grid, default configs
    PYTHONPATH=src python3 scripts/bench_attention.py --tune           # sweep block configs first, keep the best
    PYTHONPATH=src python3 scripts/bench_attention.py --seqs 4096 --dims 128 --out results/

TFLOP/s are counted the way the FlashAttention papers count them: 4*B*H*N*N*D forward, halved when
causal; the backward 2.5x that. Every tilestack config is checked against FA2's output on the same inputs
before it is timed (and against float64 at a smaller size).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

from tilestack.backends.triton.launch import resource_report
from tilestack.kernels import attention_bwd, attention_fwd
from tilestack.perf import time_fn

TOKENS, HIDDEN = 16 * 1024, 2048
BWD_OVER_FWD = 2.5


def flops(B, H, N, D, causal, backward=False):
    f = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
    return f * (BWD_OVER_FWD if backward else 1.0)


def sdpa(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def ours_fwd(cfg):
    def run(q, k, v, causal):
        return attention_fwd.attention_forward(q, k, v, causal, **cfg)[0]
    return run


def sdpa_bwd(backend_name):
    """Times only the backward: the forward graph is built once, then grad is taken again and again."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name)

    def prepare(q, k, v, do, causal):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        with sdpa_kernel(backend):
            o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=causal)
        return lambda: torch.autograd.grad(o, (qq, kk, vv), do, retain_graph=True)
    return prepare


def ours_bwd(cfg):
    def prepare(q, k, v, do, causal):
        o, lse = attention_fwd.attention_forward(q, k, v, causal)
        return lambda: attention_bwd.attention_backward(q, k, v, o, lse, do, causal, config=cfg)
    return prepare


BWD_CONFIGS = {
    "dkdv": [dict(BM=bm, BN=bn, num_warps=w, num_stages=s) for bm, bn, w, s in
             itertools.product((32, 64), (64, 128), (4, 8), (2, 3))],
    "dq": [dict(BM=bm, BN=bn, num_warps=w, num_stages=s) for bm, bn, w, s in
           itertools.product((64, 128), (32, 64), (4, 8), (2, 3))],
}


def tune_bwd(q, k, v, do, causal, D, log):
    """Each backward kernel tuned on its own (they are independent launches), checked against FA2's grads."""
    ref = sdpa_bwd("FLASH_ATTENTION")(q, k, v, do, causal)()
    o, lse = attention_fwd.attention_forward(q, k, v, causal)
    best = attention_bwd.default_config(D, causal, "cuda")
    for part in ("dkdv", "dq"):
        found = None
        for c in BWD_CONFIGS[part]:
            cfg = dict(best, **{part: c})
            try:
                grads = attention_bwd.attention_backward(q, k, v, o, lse, do, causal, config=cfg)
                err = max(rel(g, r) for g, r in zip(grads, ref))
                if err > 2e-2:
                    log(f"  {part} {c}: WRONG (rel err {err:.1e})")
                    continue
                ms = time_fn(lambda cfg=cfg: attention_bwd.attention_backward(q, k, v, o, lse, do, causal, config=cfg),
                             device="cuda", repeats=20).median_s
            except Exception as e:  # a config the compiler rejects
                log(f"  {part} {c}: {type(e).__name__}: {str(e)[:80]}")
                continue
            if found is None or ms < found[1]:
                found = (c, ms)
        best[part] = found[0]
    return best


def median_ms(fn, *args):
    return time_fn(lambda: fn(*args), device="cuda", repeats=30).median_s * 1e3


def rel(a, b):
    a, b = a.double(), b.double()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return float((a - b).norm() / b.norm())


CONFIGS = [dict(BM=bm, BN=bn, num_warps=w, num_stages=s)
           for bm, bn, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
           if not (bm == 64 and w == 8)]


def tune(q, k, v, causal, D, log):
    """The fastest config that is also correct, for this shape."""
    ref = sdpa("FLASH_ATTENTION")(q, k, v, causal)
    best = None
    for cfg in CONFIGS:
        if D == 128 and cfg["BN"] == 128 and cfg["BM"] == 128 and cfg["num_stages"] > 2:
            continue   # over the shared-memory budget
        try:
            out = ours_fwd(cfg)(q, k, v, causal)
            err = rel(out, ref)
            if err > 2e-2:
                log(f"  config {cfg}: WRONG (rel err {err:.1e})")
                continue
            ms = median_ms(ours_fwd(cfg), q, k, v, causal)
        except Exception as e:  # a config the compiler rejects (too much shared memory, ...)
            log(f"  config {cfg}: {type(e).__name__}: {str(e)[:80]}")
            continue
        if best is None or ms < best[1]:
            best = (cfg, ms)
    return best[0]


def backward_row(q, k, v, B, H, N, D, causal, tune, log):
    do = torch.randn_like(q)
    cfg = tune_bwd(q, k, v, do, causal, D, log) if tune else attention_bwd.default_config(D, causal, "cuda")
    ref = sdpa_bwd("FLASH_ATTENTION")(q, k, v, do, causal)()
    o, lse = attention_fwd.attention_forward(q, k, v, causal)
    grads = attention_bwd.attention_backward(q, k, v, o, lse, do, causal, config=cfg)
    err = max(rel(g, r) for g, r in zip(grads, ref))
    f = flops(B, H, N, D, causal, backward=True)
    t = {}
    for name, prep in (("tilestack", ours_bwd(cfg)), ("fa2", sdpa_bwd("FLASH_ATTENTION")),
                       ("cudnn", sdpa_bwd("CUDNN_ATTENTION"))):
        run = prep(q, k, v, do, causal)
        t[name] = time_fn(run, device="cuda", repeats=20).median_s * 1e3
    tf = {name: f / (ms * 1e-3) / 1e12 for name, ms in t.items()}
    log(f"bwd D={D} N={N} causal={causal} err={err:.1e} ours={tf['tilestack']:.0f} fa2={tf['fa2']:.0f} "
        f"cudnn={tf['cudnn']:.0f} TFLOP/s {cfg}")
    return dict(pass_="bwd", D=D, N=N, B=B, H=H, causal=causal, config=cfg, err_vs_fa2=err, ms=t, tflops=tf,
                vs_fa2=tf["tilestack"] / tf["fa2"], vs_cudnn=tf["tilestack"] / tf["cudnn"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--dims", type=int, nargs="*", default=[64, 128])
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--tune", action="store_true", help="sweep block configs per shape; keep the best")
    p.add_argument("--backward", action="store_true", help="also time the backward")
    p.add_argument("--no-forward", action="store_true", help="time only the backward")
    p.add_argument("--out", type=Path, default=None, help="folder for results.json")
    a = p.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    dev = torch.cuda.get_device_name()
    log(f"device: {dev}; torch {torch.__version__}")
    # float64 check at a modest ragged size, GQA, both masks
    for D in a.dims:
        for causal in (False, True):
            q = torch.randn(2, 4, 1000, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(2, 2, 1100, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(2, 2, 1100, D, device="cuda", dtype=torch.bfloat16)
            o, lse = attention_fwd.attention_forward(q, k, v, causal)
            ro, rlse = attention_fwd.reference(q, k, v, causal)
            log(f"float64 check D={D} causal={causal}: out {rel(o, ro):.2e}, lse {rel(lse, rlse):.2e}")
            assert rel(o, ro) < 1e-2 and rel(lse, rlse) < 1e-4
    rows = []
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[a.causal]
    for D, N, causal in itertools.product(a.dims, a.seqs, causals):
        B, H = TOKENS // N, HIDDEN // D
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        if a.backward:
            rows.append(backward_row(q, k, v, B, H, N, D, causal, a.tune, log))
        if a.no_forward:
            continue
        cfg = tune(q, k, v, causal, D, log) if a.tune else attention_fwd.default_config(D, causal, "cuda")
        ref = sdpa("FLASH_ATTENTION")(q, k, v, causal)
        err = rel(ours_fwd(cfg)(q, k, v, causal), ref)
        f = flops(B, H, N, D, causal)
        t = {name: median_ms(fn, q, k, v, causal) for name, fn in
             (("tilestack", ours_fwd(cfg)), ("fa2", sdpa("FLASH_ATTENTION")), ("cudnn", sdpa("CUDNN_ATTENTION")))}
        tf = {name: f / (ms * 1e-3) / 1e12 for name, ms in t.items()}
        traced = attention_fwd.attention_fwd_kernel.trace(q, k, v, ref, torch.empty(B, H, N, device="cuda"),
                                                          0.1, D=D, causal=causal, **cfg)
        res = resource_report(traced)
        row = dict(pass_="fwd", D=D, N=N, B=B, H=H, causal=causal, config=cfg, err_vs_fa2=err, ms=t, tflops=tf,
                   vs_fa2=tf["tilestack"] / tf["fa2"], vs_cudnn=tf["tilestack"] / tf["cudnn"], resources=res)
        rows.append(row)
        log(f"D={D} N={N} causal={causal} {cfg} err={err:.1e} ours={tf['tilestack']:.0f} fa2={tf['fa2']:.0f} "
            f"cudnn={tf['cudnn']:.0f} TFLOP/s  regs={res['registers']} spills={res['spills']}")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "attention_results.json").write_text(json.dumps(dict(device=dev, torch=torch.__version__,
                                                                      rows=rows), indent=1))
    print(f"\nattention, bf16, {dev}, TFLOP/s (forward 4BHN^2D, causal halved; backward 2.5x forward)")
    print(f"{'pass':>4} {'D':>4} {'N':>6} {'causal':>6} | {'tilestack':>9} {'FA2':>6} {'cuDNN':>6} | {'/FA2':>5} {'/cuDNN':>6} | config")
    for r in rows:
        c = r["config"]
        c = c if "BM" in c else c["dkdv"] | {"BM": f"{c['dkdv']['BM']}/{c['dq']['BM']}", "BN": f"{c['dkdv']['BN']}/{c['dq']['BN']}"}
        print(f"{r['pass_']:>4} {r['D']:>4} {r['N']:>6} {str(r['causal']):>6} | {r['tflops']['tilestack']:>9.0f} "
              f"{r['tflops']['fa2']:>6.0f} {r['tflops']['cudnn']:>6.0f} | {r['vs_fa2']:>5.2f} {r['vs_cudnn']:>6.2f} | "
              f"{c['BM']}x{c['BN']} w{c['num_warps']} s{c['num_stages']}")


if __name__ == "__main__":
    main()
