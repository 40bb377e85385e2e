"""On a CUDA GPU: attention's SDPA drop-in variants against float64, then what a mask costs.

    PYTHONPATH=src python3 scripts/check_attention_sdpa.py                # both parts
    PYTHONPATH=src python3 scripts/check_attention_sdpa.py --part check   # correctness only (about a minute)

Part 1 runs attention_forward and attention_backward (the Triton backend, default configs) at GPU-sized
shapes for every variant the CPU tests cover at small sizes: head dims 1..256 (padded tiles), Dv != D, fp32
(tf32 matrix units), both causal alignments with Nq != Nk both ways, boolean and additive masks with fully
masked rows, empty problems; each against ``attention_fwd.reference`` in float64 on the GPU. A variant that
fails to compile (shared memory, registers) is reported, not fatal. Exit status 1 when any check fails.

Part 2 times the forward and forward+backward without a mask, with a boolean (N, N) mask and with an additive
(B, 1, 1, N) key-padding bias, against torch SDPA given the same mask (median of CUDA-event timings).
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback

import torch

from tilestack.kernels.attention_bwd import attention_backward
from tilestack.kernels.attention_fwd import attention_forward, reference

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-3}   # relative norm error, as the CPU tests

# (name, B, H, Hkv, Nq, Nk, D, Dv, dtype, causal, align, mask)
CASES = [
    ("common d128 causal", 2, 8, 8, 1024, 1024, 128, 128, torch.bfloat16, True, "top_left", None),
    ("common d64 ragged", 2, 8, 2, 1000, 777, 64, 64, torch.float16, False, "top_left", None),
    ("d256", 1, 4, 4, 513, 700, 256, 256, torch.bfloat16, True, "top_left", None),
    *[(f"d{d}", 2, 8, 4, 777, 1023, d, d, torch.bfloat16, True, "top_left", None)
      for d in (1, 8, 24, 40, 72, 80, 96, 112, 160, 200)],
    ("d80 dv64", 2, 8, 4, 600, 900, 80, 64, torch.bfloat16, False, "top_left", None),
    ("d192 dv128", 2, 4, 4, 600, 900, 192, 128, torch.float16, True, "top_left", None),
    ("d32 dv256", 1, 4, 2, 333, 555, 32, 256, torch.bfloat16, False, "top_left", None),
    ("fp32 d64", 2, 8, 4, 700, 900, 64, 64, torch.float32, True, "top_left", None),
    ("fp32 d128", 2, 8, 8, 700, 500, 128, 128, torch.float32, False, "top_left", None),
    ("fp32 d256", 1, 4, 4, 300, 333, 256, 256, torch.float32, True, "top_left", None),
    ("bottom-right nq<nk", 2, 8, 4, 300, 1111, 128, 128, torch.bfloat16, True, "bottom_right", None),
    ("bottom-right nq>nk", 2, 8, 4, 1111, 300, 64, 64, torch.bfloat16, True, "bottom_right", None),
    ("decode nq=1", 4, 16, 2, 1, 3000, 128, 128, torch.bfloat16, True, "bottom_right", None),
    ("top-left nq>nk", 2, 8, 4, 1111, 300, 64, 64, torch.float16, True, "top_left", None),
    ("bool mask qk", 2, 8, 4, 700, 900, 128, 128, torch.bfloat16, False, "top_left", "bool-qk"),
    ("bool key padding causal", 2, 8, 4, 700, 900, 64, 64, torch.bfloat16, True, "top_left", "bool-pad"),
    ("bias bhqk", 2, 4, 4, 513, 700, 128, 128, torch.float16, False, "top_left", "bias"),
    ("alibi fp32 bias + bottom-right", 2, 8, 2, 600, 900, 64, 64, torch.bfloat16, True, "bottom_right", "alibi"),
    ("bias fp32 inputs", 1, 4, 4, 300, 400, 64, 64, torch.float32, False, "top_left", "bias"),
    ("empty nk=0", 2, 8, 4, 100, 0, 64, 64, torch.bfloat16, False, "top_left", None),
    ("empty nq=0", 2, 8, 4, 0, 100, 64, 64, torch.bfloat16, True, "top_left", None),
]


def make_mask(kind, B, H, Nq, Nk, dtype, gen):
    if kind is None:
        return None
    if kind == "bool-qk":
        keep = torch.rand(Nq, Nk, device="cuda", generator=gen) < 0.7
        keep[::97] = False                                          # some rows see no key
        return keep
    if kind == "bool-pad":
        keep = torch.rand(B, 1, 1, Nk, device="cuda", generator=gen) < 0.9
        keep[-1] = False                                            # a batch with no key at all
        return keep
    if kind == "bias":
        return 2.0 * torch.randn(B, H, Nq, Nk, device="cuda", generator=gen).to(dtype)
    slopes = torch.arange(1, H + 1, device="cuda", dtype=torch.float32)[:, None, None] / H
    return -slopes * torch.arange(Nk, device="cuda", dtype=torch.float32)    # ALiBi-like (H, 1, Nk), fp32


def rel(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    if not bool(got.isfinite().all()):
        return math.inf
    return float((got - want).norm() / want.norm().clamp_min(1e-3))


def check(case, gen) -> bool:
    name, B, H, Hkv, Nq, Nk, D, Dv, dtype, causal, align, mask_kind = case
    q = torch.randn(B, H, Nq, D, device="cuda", generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, device="cuda", generator=gen).to(dtype)
    v = torch.randn(B, Hkv, Nk, Dv, device="cuda", generator=gen).to(dtype)
    do = torch.randn(B, H, Nq, Dv, device="cuda", generator=gen).to(dtype)
    mask = make_mask(mask_kind, B, H, Nq, Nk, dtype, gen)
    kw = dict(attn_mask=mask, causal_align=align)
    try:
        o, lse = attention_forward(q, k, v, causal, **kw)
        grads = attention_backward(q, k, v, o, lse, do, causal, **kw)
        torch.cuda.synchronize()
    except Exception as e:   # a compile failure is a finding, not the end of the run
        print(f"  FAIL {name:34s} {type(e).__name__}: {str(e).splitlines()[0][:150]}")
        traceback.print_exc(limit=2, file=sys.stdout)
        return False
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    o64, lse64 = reference(*leaves, causal, **kw)
    o64.backward(do.double())
    errs = {"o": rel(o, o64)}
    finite = lse64.isfinite()
    errs["lse"] = rel(lse[finite], lse64[finite]) if bool(finite.any()) else 0.0
    if not torch.equal(lse[~finite], lse64[~finite].float()):
        errs["lse"] = math.inf
    for n, g, t in zip(("dq", "dk", "dv"), grads, leaves, strict=True):
        errs[n] = rel(g, t.grad)
    bound = {"lse": 1e-4}
    ok = all(e <= bound.get(n, TOL[dtype]) for n, e in errs.items())
    shown = " ".join(f"{n}={e:.1e}" for n, e in errs.items())
    print(f"  {'ok  ' if ok else 'FAIL'} {name:34s} {shown}")
    return ok


def median_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def time_row(q, k, v, do, ours_kw: dict, sdpa_kw: dict) -> list[float]:
    """Median ms of tilestack and SDPA, forward (no grad) and forward+backward."""
    import torch.nn.functional as F

    qd, kd, vd = q.detach(), k.detach(), v.detach()

    def ours_fwd():
        attention_forward(qd, kd, vd, **ours_kw)

    def ours_both():
        o, lse = attention_forward(qd, kd, vd, **ours_kw)
        attention_backward(qd, kd, vd, o, lse, do, **ours_kw)

    def sdpa_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, **sdpa_kw)

    def sdpa_both():
        F.scaled_dot_product_attention(q, k, v, **sdpa_kw).backward(do)

    return [median_ms(fn) for fn in (ours_fwd, sdpa_fwd, ours_both, sdpa_both)]


def timings() -> None:
    print("\nmask cost, bf16 D=128 (ms, median): tilestack / SDPA")
    for B, H, N in ((8, 16, 1024), (2, 16, 4096)):
        q, k, v = (torch.randn(B, H, N, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        do = torch.randn_like(q)
        tri = torch.ones(N, N, device="cuda", dtype=torch.bool).tril()
        pad = torch.zeros(B, 1, 1, N, device="cuda", dtype=torch.bfloat16)
        pad[..., N - N // 8:] = -math.inf
        rows = (("causal, no mask", dict(causal=True), dict(is_causal=True)),
                ("bool (N, N) = causal", dict(attn_mask=tri), dict(attn_mask=tri)),
                ("bias (B,1,1,N) + causal", dict(attn_mask=pad, causal=True),
                 dict(attn_mask=pad.masked_fill(~tri, -math.inf))))
        for label, ours_kw, sdpa_kw in rows:
            f = time_row(q, k, v, do, ours_kw, sdpa_kw)
            print(f"  B={B} H={H} N={N:5d} {label:26s} fwd {f[0]:7.3f} / {f[1]:7.3f}   "
                  f"fwd+bwd {f[2]:7.3f} / {f[3]:7.3f}")


def sdpa_fully_masked_rows() -> None:
    """What each of torch's GPU backends gives for a query row whose boolean mask is all False (tilestack gives
    0, as the math backend)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print("\ntorch SDPA on a fully masked row (boolean mask), bf16:")
    q, k, v = (torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    keep = torch.ones(64, 64, device="cuda", dtype=torch.bool)
    keep[5] = False
    for backend in (SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.FLASH_ATTENTION):
        try:
            with sdpa_kernel(backend):
                row = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)[:, :, 5]
            what = "NaN" if bool(row.isnan().any()) else ("0" if not bool(row.any()) else "other")
        except RuntimeError as e:
            what = f"not available ({str(e).splitlines()[0][:60]})"
        print(f"  {backend.name:20s} {what}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("check", "time", "both"), default="both")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    ok = True
    if args.part in ("check", "both"):
        gen = torch.Generator(device="cuda").manual_seed(0)
        print("attention variants against float64 (relative norm errors)")
        ok = all([check(case, gen) for case in CASES])
        print("all ok" if ok else "SOME CHECKS FAILED")
    if args.part in ("time", "both"):
        sdpa_fully_masked_rows()
        timings()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
