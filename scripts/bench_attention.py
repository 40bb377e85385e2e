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
import time
from pathlib import Path

import torch

from tilestack.backends import get_backend
from tilestack.errors import BackendError
from tilestack.kernels import attention_bwd, attention_fwd
from tilestack.perf import time_fn
from tilestack.tune import ConfigCache, SearchSpace, lookup, size_bucket, tune
from tilestack.tune.cache import Table, file_name
from tilestack.tune.cache import key as cache_key
from tilestack.tune.devices import device_key

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
        return attention_fwd.attention_forward(q, k, v, causal, **(cfg or {}))[0]
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


def median_ms(fn, *args):
    return time_fn(lambda: fn(*args), device="cuda", repeats=30).median_s * 1e3


def rel(a, b):
    a, b = a.double(), b.double()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return float((a - b).norm() / b.norm())


FWD_RESTRICT = dict(BM=(64, 128), BN=(64, 128), num_warps=(4, 8), num_stages=(2, 3, 4))
BWD_RESTRICT_D256 = {"dkdv": dict(BM=(16, 32, 64), BN=(32, 64), num_warps=(4, 8), num_stages=(1, 2)),
                     "dq": dict(BM=(32, 64), BN=(32, 64), num_warps=(4, 8), num_stages=(1, 2))}
BWD_RESTRICT = {"dkdv": dict(BM=(32, 64, 128), BN=(64, 128), num_warps=(4, 8), num_stages=(2, 3)),
                "dq": dict(BM=(64, 128), BN=(64,), num_warps=(4, 8), num_stages=(2, 3))}
TUNED: dict = {}     # table entries written by this run: kernel -> key -> {"config", "seconds", ...}


def signature(q, D, causal):
    return f"{str(q.dtype).removeprefix('torch.')}-D{D}-{'causal' if causal else 'full'}"


def record(kernel, q, D, causal, N, result):
    sig, dev = signature(q, D, causal), device_key(q.device.index or 0)
    ConfigCache().put(kernel, sig, dev, size_bucket(N), result.best, seconds=result.seconds)
    TUNED.setdefault(kernel, {})[cache_key(kernel, sig, size_bucket(N))] = {"config": result.best,
                                                                            "seconds": result.seconds}
    lookup.reload()


def tune_fwd(q, k, v, causal, D, log):
    """The fastest correct forward config for this shape, from the kernel's declared domains."""
    ref = sdpa("FLASH_ATTENTION")(q, k, v, causal)
    B, H, N, _ = q.shape
    args = (q, k, v, ref, torch.empty(B, H, N, device="cuda"), 0.1)
    space = SearchSpace(attention_fwd.attention_fwd_kernel, fixed=dict(D=D, causal=causal), restrict=FWD_RESTRICT)
    result = tune("attention_fwd", space.configs(args),
                  check=lambda cfg: rel(ours_fwd(cfg)(q, k, v, causal), ref),
                  time=lambda cfg: median_ms(ours_fwd(cfg), q, k, v, causal), log=log)
    record("attention_fwd", q, D, causal, N, result)
    log(f"  fwd D={D} N={N} causal={causal}: {result.as_code()} ({len(result.trials)} tried)")
    return result.best


def tune_bwd(q, k, v, do, causal, D, log):
    """Each backward kernel tuned on its own (independent launches), checked against FA2's gradients."""
    ref = sdpa_bwd("FLASH_ATTENTION")(q, k, v, do, causal)()
    o, lse = attention_fwd.attention_forward(q, k, v, causal)
    N = q.shape[2]
    best = attention_bwd.default_config(D, causal, "cuda")
    kernels = {"dkdv": attention_bwd.attention_bwd_dkdv_kernel, "dq": attention_bwd.attention_bwd_dq_kernel}

    def run(cfg):
        return attention_bwd.attention_backward(q, k, v, o, lse, do, causal, config=cfg)

    for part in ("dkdv", "dq"):
        restrict = (BWD_RESTRICT_D256 if D > 128 else BWD_RESTRICT)[part]
        space = SearchSpace(kernels[part], fixed=dict(D=D, causal=causal), restrict=restrict)
        def check(c, part=part):
            return max(rel(g, r) for g, r in zip(run(dict(best, **{part: c})), ref, strict=True))

        def timed(c, part=part):
            return time_fn(lambda: run(dict(best, **{part: c})), device="cuda", repeats=20).median_s

        result = tune(f"attention_bwd_{part}", space.all_configs(), check=check, time=timed, log=log)
        best[part] = result.best
        record(f"attention_bwd_{part}", q, D, causal, N, result)
    return best


def backward_row(q, k, v, B, H, N, D, causal, tune_it, log):
    do = torch.randn_like(q)
    cfg = tune_bwd(q, k, v, do, causal, D, log) if tune_it else None
    ref = sdpa_bwd("FLASH_ATTENTION")(q, k, v, do, causal)()
    o, lse = attention_fwd.attention_forward(q, k, v, causal)
    grads = attention_bwd.attention_backward(q, k, v, o, lse, do, causal, config=cfg)
    err = max(rel(g, r) for g, r in zip(grads, ref, strict=True))
    f = flops(B, H, N, D, causal, backward=True)
    t = {}
    for name, prep in (("tilestack", ours_bwd(cfg)), ("fa2", sdpa_bwd("FLASH_ATTENTION")),
                       ("cudnn", sdpa_bwd("CUDNN_ATTENTION"))):
        t[name] = time_fn(prep(q, k, v, do, causal), device="cuda", repeats=20).median_s * 1e3
    tf = {name: f / (ms * 1e-3) / 1e12 for name, ms in t.items()}
    used = cfg or {part: lookup.launch_config(f"attention_bwd_{part}", signature(q, D, causal), q.device, N, c)
                   for part, c in attention_bwd.default_config(D, causal, "cuda").items()}
    log(f"bwd D={D} N={N} causal={causal} err={err:.1e} ours={tf['tilestack']:.0f} fa2={tf['fa2']:.0f} "
        f"cudnn={tf['cudnn']:.0f} TFLOP/s {used}")
    return dict(pass_="bwd", D=D, N=N, B=B, H=H, causal=causal, config=used, err_vs_fa2=err, ms=t, tflops=tf,
                vs_fa2=tf["tilestack"] / tf["fa2"], vs_cudnn=tf["tilestack"] / tf["cudnn"])


def spin_up(seconds=1.0):
    """Bring the GPU out of its idle clocks before anything is timed (the first measurement would be low)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a
        torch.cuda.synchronize()


def launched_resources(q, k, v, o, cfg, D, N, causal):
    """(config, resources) of the forward kernel the op launched: the tuned config (the backend the tables
    chose, gluon or triton, read from the same lookup the op makes) and that backend's ptxas report."""
    B, H = q.shape[:2]
    if cfg is None:
        cfg = lookup.launch_config("attention_fwd", signature(q, D, causal), q.device, N,
                                   attention_fwd.default_config(D, causal, "cuda"), backend=None)
    consts = dict(cfg)
    backend = lookup.take_backend(consts, None) or "triton"
    lse = torch.empty(B, H, N, device="cuda")
    try:
        if consts.pop("schedule", "plain") == "pingpong":   # attention_forward's _pingpong_launcher's kernel
            from tilestack.kernels.attention_fwd_pingpong import attention_fwd_pingpong_kernel as kernel
            consts = {key: consts[key] for key in ("BN", "STAGES") if key in consts} | {
                "BM": max(consts.get("BM", 128), 128 if backend == "gluon" else 32)}
        else:
            kernel = attention_fwd.attention_fwd_kernel
        traced = kernel.trace(q, k, v, o, lse, 0.1, D=D, causal=causal, **consts)
        res = get_backend(backend).resources(traced)
    except (BackendError, TypeError) as e:   # the op launched a variant this trace does not name: keep timing
        res = {"registers": "?", "spills": "?", "why": str(e)[:120]}
    return cfg, res | {"backend": backend}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--dims", type=int, nargs="*", default=[64, 128])
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--tune", action="store_true", help="sweep block configs per shape; keep the best")
    p.add_argument("--backward", action="store_true", help="also time the backward")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--no-forward", action="store_true", help="time only the backward")
    p.add_argument("--out", type=Path, default=None, help="folder for results.json")
    a = p.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    dev = torch.cuda.get_device_name()
    dtype = getattr(torch, a.dtype)
    log(f"device: {dev}; torch {torch.__version__}; {a.dtype}")
    spin_up()
    # float64 check at a modest ragged size, GQA, both masks
    for D in a.dims:
        for causal in (False, True):
            q = torch.randn(2, 4, 1000, D, device="cuda", dtype=dtype)
            k = torch.randn(2, 2, 1100, D, device="cuda", dtype=dtype)
            v = torch.randn(2, 2, 1100, D, device="cuda", dtype=dtype)
            o, lse = attention_fwd.attention_forward(q, k, v, causal)
            ro, rlse = attention_fwd.reference(q, k, v, causal)
            do = torch.randn_like(q)
            grads = attention_bwd.attention_backward(q, k, v, o, lse, do, causal)
            q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
            o64 = attention_fwd.reference(q64, k64, v64, causal)[0]
            ref_grads = torch.autograd.grad(o64, (q64, k64, v64), do.double())
            gerr = max(rel(g, r) for g, r in zip(grads, ref_grads, strict=True))
            log(f"float64 check D={D} causal={causal}: out {rel(o, ro):.2e}, lse {rel(lse, rlse):.2e}, "
                f"grads {gerr:.2e}")
            assert rel(o, ro) < 1e-2 and rel(lse, rlse) < 1e-4 and gerr < 2e-2
    rows = []
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[a.causal]
    for D, N, causal in itertools.product(a.dims, a.seqs, causals):
        B, H = TOKENS // N, HIDDEN // D
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype) for _ in range(3))
        if a.backward:
            rows.append(backward_row(q, k, v, B, H, N, D, causal, a.tune, log))
        if a.no_forward:
            continue
        cfg = tune_fwd(q, k, v, causal, D, log) if a.tune else None
        ref = sdpa("FLASH_ATTENTION")(q, k, v, causal)
        err = rel(ours_fwd(cfg)(q, k, v, causal), ref)
        f = flops(B, H, N, D, causal)
        t = {name: median_ms(fn, q, k, v, causal) for name, fn in
             (("tilestack", ours_fwd(cfg)), ("fa2", sdpa("FLASH_ATTENTION")), ("cudnn", sdpa("CUDNN_ATTENTION")))}
        tf = {name: f / (ms * 1e-3) / 1e12 for name, ms in t.items()}
        cfg, res = launched_resources(q, k, v, ref, cfg, D, N, causal)
        row = dict(pass_="fwd", D=D, N=N, B=B, H=H, causal=causal, config=cfg, err_vs_fa2=err, ms=t, tflops=tf,
                   vs_fa2=tf["tilestack"] / tf["fa2"], vs_cudnn=tf["tilestack"] / tf["cudnn"], resources=res)
        rows.append(row)
        log(f"D={D} N={N} causal={causal} {cfg} err={err:.1e} ours={tf['tilestack']:.0f} fa2={tf['fa2']:.0f} "
            f"cudnn={tf['cudnn']:.0f} TFLOP/s  regs={res['registers']} spills={res['spills']}")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        for kernel, entries in TUNED.items():   # tables as tilestack ships them (src/tilestack/tune/tables/)
            dev = device_key(torch.cuda.current_device())
            Table(dev, entries).write(a.out / file_name(kernel, dev))
        results = dict(device=dev, torch=torch.__version__, dtype=a.dtype, rows=rows)
        (a.out / "attention_results.json").write_text(json.dumps(results, indent=1))
    print(f"\nattention, {a.dtype}, {dev}, TFLOP/s (forward 4BHN^2D, causal halved; backward 2.5x forward)")
    print(f"{'pass':>4} {'D':>4} {'N':>6} {'causal':>6} | {'tilestack':>9} {'FA2':>6} {'cuDNN':>6} | "
          f"{'/FA2':>5} {'/cuDNN':>6} | config")
    for r in rows:
        c = r["config"]
        if "BM" not in c:   # backward: dK/dV and dQ blocks side by side
            c = c["dkdv"] | {"BM": f"{c['dkdv']['BM']}/{c['dq']['BM']}", "BN": f"{c['dkdv']['BN']}/{c['dq']['BN']}"}
        print(f"{r['pass_']:>4} {r['D']:>4} {r['N']:>6} {str(r['causal']):>6} | {r['tflops']['tilestack']:>9.0f} "
              f"{r['tflops']['fa2']:>6.0f} {r['tflops']['cudnn']:>6.0f} | {r['vs_fa2']:>5.2f} {r['vs_cudnn']:>6.2f} | "
              f"{c['BM']}x{c['BN']} w{c['num_warps']} s{c['num_stages']}")


if __name__ == "__main__":
    main()
