"""On an H100/H200: tune GEMM and attention (forward, and the backward's parts) over both GPU backends (triton,
gluon) and keep, per kernel, signature and size, the faster backend with its config: tables to ship in
``src/tilestack/tune/tables/``.

    PYTHONPATH=src python3 scripts/gpu/tune_backends.py --budget-s 420 --out /tmp/tables --json /tmp/backends.json
    cp /tmp/tables/*.json src/tilestack/tune/tables/        # after reading the table this prints

Cases: GEMM 4096^3 and 8192^3 in bf16 and fp16; attention forward at head dims 64 and 128, N 1024 and 4096,
causal and not (bf16; ``--attention-dtypes`` adds fp16), at the library's tuning shapes (16k tokens, hidden
2048); ``--kernels attention_bwd_dkdv,attention_bwd_dq``: the backward's two main kernels at the same shapes, each
with its warp-specialized variant (``kernels.attention_bwd_ws``, schedule "ws") searched on gluon.
Each runs through ``tune.session.Session`` with ``backends=("triton", "gluon")``: per backend a local
search (checked against the reference, then timed with L2 flushed), the winner written with ``"backend"`` and
the other backend's best under ``"others"`` (``tune.lookup`` reads both). ``--out`` gets one table per kernel,
the packaged table of that name merged with this run's winners. The user's own tuning cache is not touched (a
cache folder under ``--out`` is used).

Then, with this run's tables, each case goes once more through the library function with no backend named
(``kernels.gemm.gemm``, ``attention_forward``): the backend its plan took, its error against float32 math and
its time against ``backend="triton"`` ("public" in the JSON; ``--no-verify`` skips it).

Bounded by ``--budget-s`` in all: the session spends 75% of it across the cases (most valuable first), a watchdog
stops the tuning at 88% whatever a compile does (the winners written so far stay written), and the check after it
ends 5 s before the budget (counted from the script's start). Prints, per case, each backend's best (ms and
TFLOP/s) and the winner, last; writes the same as JSON to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

GEMM_SIZES = (4096, 8192)
HEAD_DIMS = (64, 128)
SEQS = (1024, 4096)
TUNE_SHARE = 0.75       # of --budget-s: the session's budget (a search stops starting configs past it)
TUNE_STOP = 0.88        # of --budget-s: the tuning is stopped here whatever a compile does (the watchdog)
END_SLACK_S = 5         # the check through the public functions ends this long before --budget-s
# tried first on the gluon backend (seeds of its local search): the GEMM configs that measured best on the H200
# (docs/performance.md, second session: BN=256 at 4096^3), with and without the warp-specialize pass
SEEDS = {("gemm", "gluon"): [dict(BM=128, BN=256, BK=64, num_stages=3, warp_specialize=False, persistent=False),
                             dict(BM=128, BN=256, BK=64, num_stages=3, warp_specialize=True, persistent=False),
                             dict(BM=128, BN=128, BK=64, num_stages=4, warp_specialize=False, persistent=False)]}


# the attention tables this script tunes (library_problems' name: attention_fwd, attention_bwd)
ATTENTION_KERNELS = ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq")
# matrix products of 2 N^2 D a launch (B H of them, halved when causal): forward 2; dK/dV 4; dQ 3
PRODUCTS = {"attention_fwd": 2, "attention_bwd_dkdv": 4, "attention_bwd_dq": 3}


class Watchdog(Exception):
    """The run went past its share of --budget-s."""


def problems(attention_dtypes: tuple[str, ...], small: bool, kernels=("gemm", "attention_fwd"), seqs=SEQS):
    """The cases as ``tune.library`` problems (keyed as the library's launch path asks for them). An attention
    problem carries the ping-pong forward as a variant, searched on the gluon backend beside the plain kernel."""
    from tilestack.tune.library import DTYPES, library_problems

    gemm = [p for p in library_problems(["gemm"], DTYPES, small=small) if small or p.n in GEMM_SIZES] \
        if "gemm" in kernels else []
    attn = [p for k in ATTENTION_KERNELS if k in kernels
            for p in library_problems([k.removesuffix("_dkdv").removesuffix("_dq")], attention_dtypes, small=small)
            if p.kernel == k and (small or (p.fixed["D"] in HEAD_DIMS and p.n in seqs))]
    return sorted(gemm + attn, key=lambda p: p.priority)


def flops(p, small: bool) -> float:
    """FLOPs of one launch of problem ``p`` (GEMM: 2 n^3; attention: PRODUCTS x 2 B H N^2 D, halved when
    causal)."""
    from tilestack.tune.library import _attention_shape

    if p.kernel == "gemm":
        return 2.0 * p.n ** 3
    D, causal = p.fixed["D"], p.fixed["causal"]
    B, H, N = _attention_shape(p.n, D, small)
    return PRODUCTS[p.kernel] * 2.0 * B * H * N * N * D * (0.5 if causal else 1.0)


def row(o, small: bool) -> dict:
    p = o.problem
    f = flops(p, small)
    return {"kernel": p.kernel, "signature": p.signature, "bucket": p.bucket, "shape": p.label,
            "winner": o.backend, "schedule": (o.config or {}).get("schedule", "plain"),
            "config": o.config, "note": o.note, "tried": o.tried, "failed": o.failed,
            "ms": {b: s * 1e3 for b, s in o.seconds_by_backend.items()},
            "tflops": {b: f / s / 1e12 for b, s in o.seconds_by_backend.items()},
            "before_ms": o.before_seconds and o.before_seconds * 1e3}


def calls(p, where: str, small: bool):
    """(the library call with no backend named, the same with backend="triton", float32 math's result) at
    problem ``p``'s shape."""
    import torch

    from tilestack.kernels.attention_fwd import attention_forward
    from tilestack.kernels.gemm import gemm
    from tilestack.tune.library import _attention_shape

    dtype = getattr(torch, p.signature.partition("-")[0])
    g = torch.Generator(device=where).manual_seed(0)
    if p.kernel == "gemm":
        a, b = (torch.randn(p.n, p.n, generator=g, device=where, dtype=dtype) for _ in range(2))
        return (lambda: gemm(a, b)), (lambda: gemm(a, b, backend="triton")), a.float() @ b.float()
    D, causal = p.fixed["D"], p.fixed["causal"]
    B, H, N = _attention_shape(p.n, D, small)
    q, k, v = (torch.randn(B, H, N, D, generator=g, device=where, dtype=dtype) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    return (lambda: attention_forward(q, k, v, causal)[0]), \
        (lambda: attention_forward(q, k, v, causal, backend="triton")[0]), ref


def verify(done: list, rows: list[dict], cache_dir: Path, where: str, small: bool, deadline: float) -> None:
    """Through the library's own functions (``kernels.gemm.gemm``, ``attention_forward``), with no backend named
    and this run's tables: which backend the plan took (it must be the winner), the error against float32 math,
    and the time against the same call with ``backend="triton"`` (row["public"]); no case starts after
    ``deadline`` (a ``time.monotonic()`` value)."""
    import torch

    from tilestack import config
    from tilestack.tune import lookup
    from tilestack.tune.library import rel_error

    def bench(fn) -> float:
        if where != "cuda":
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        from triton.testing import do_bench
        return do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3

    with config.override(cache_dir=cache_dir):
        lookup.reload()
        for o, r in zip(done, rows, strict=True):
            p = o.problem
            if not o.config:
                continue
            if p.kernel not in ("gemm", "attention_fwd"):   # the backward's parts: timed by probe_attention_bwd.py
                continue
            if time.monotonic() >= deadline:
                r["public"] = {"backend": None, "error": "not checked: out of time"}
                continue
            run, named, ref = calls(p, where, small)
            planned = lookup.launch_config(p.kernel, p.signature, torch.device(where), p.n, {}, None)
            took = planned.get("backend", lookup.DEFAULT_BACKEND)
            try:
                err = rel_error(run(), ref)
                auto_s, triton_s = bench(run), bench(named)
                r["public"] = {"backend": took, "rel_err": err, "ms": auto_s * 1e3, "triton_ms": triton_s * 1e3,
                               "speedup_vs_triton": triton_s / auto_s}
            except Exception as e:  # noqa: BLE001 - reported per case, the others still checked
                r["public"] = {"backend": took, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    lookup.reload()


def table(rows: list[dict], backends: tuple[str, ...]) -> str:
    head = f"{'case':44} " + " ".join(f"{b + ' ms':>10} {'TFLOP/s':>8}" for b in backends) + "  winner"
    lines = [head, "-" * len(head)]
    for r in rows:
        case = f"{r['kernel']} {r['signature']} {r['shape']}"[:44]
        cells = []
        for b in backends:
            ms, tf = r["ms"].get(b), r["tflops"].get(b)
            cells.append(f"{ms:10.3f} {tf:8.1f}" if ms else f"{'-':>10} {'-':>8}")
        won = (f"{r['winner']} ({r['schedule']})" if r["winner"] else
               "(none: " + (r["note"] or "not tuned")[:60] + ")")
        if r["winner"] and len(r["ms"]) > 1:
            other = min(ms for b, ms in r["ms"].items() if b != r["winner"])
            won += f" {other / r['ms'][r['winner']]:.3f}x"
        pub = r.get("public")
        if pub and "error" in pub:
            won += f" | public: {pub['backend']} ERROR {pub['error'][:60]}"
        elif pub:
            won += (f" | public: {pub['backend']}{'' if pub['backend'] == r['winner'] else ' (NOT the winner)'}"
                    f" err {pub['rel_err']:.1e} {pub['speedup_vs_triton']:.3f}x vs triton")
        lines.append(f"{case:44} " + " ".join(cells) + "  " + won)
    return "\n".join(lines)


def main() -> int:
    started = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=420.0, help="seconds for every case together")
    ap.add_argument("--out", type=Path, default=Path("tune_backends_tables"), help="folder for the tables")
    ap.add_argument("--json", type=Path, default=Path("tune_backends.json"), help="per-case results")
    ap.add_argument("--backends", default="triton,gluon", help="comma-separated backends to search")
    ap.add_argument("--attention-dtypes", default="bfloat16", help="comma-separated: bfloat16,float16")
    ap.add_argument("--kernels", default="gemm,attention_fwd",
                    help="comma-separated: gemm,attention_fwd,attention_bwd_dkdv,attention_bwd_dq")
    ap.add_argument("--seqs", default=",".join(map(str, SEQS)), help="attention sequence lengths (comma-separated)")
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--no-verify", dest="verify", action="store_false",
                    help="skip the check through kernels.gemm / attention_forward with this run's tables")
    ap.add_argument("--small", action="store_true", help="tiny cases on the CPU (Triton's interpreter): a smoke test")
    args = ap.parse_args()

    from tilestack.tune.cache import ConfigCache
    from tilestack.tune.devices import DeviceKey, device_key
    from tilestack.tune.lookup import backend_refusal
    from tilestack.tune.session import Session

    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    if args.small:
        key, where = DeviceKey.parse("sm90-132sm-227kb", name="interpreter"), "cpu"
    else:
        import torch
        if not torch.cuda.is_available():
            print("tune_backends: needs a CUDA GPU (or --small for the CPU smoke test)", file=sys.stderr)
            return 2
        torch.cuda.set_device(args.device)
        key, where = device_key(args.device), "cuda"
        for b in backends:
            why = backend_refusal(b, key)
            if why:
                print(f"tune_backends: {b} cannot launch on {key.name} ({key}): {why}", file=sys.stderr)
    kernels = tuple(k.strip() for k in args.kernels.split(",") if k.strip())
    unknown = set(kernels) - {"gemm", *ATTENTION_KERNELS}
    if unknown:
        ap.error(f"--kernels: unknown {sorted(unknown)}; expected some of gemm, {', '.join(ATTENTION_KERNELS)}")
    todo = problems(tuple(d.strip() for d in args.attention_dtypes.split(",")), args.small, kernels,
                    tuple(int(n) for n in args.seqs.split(",") if n.strip()))
    args.out.mkdir(parents=True, exist_ok=True)
    session = Session(key, budget_s=args.budget_s * TUNE_SHARE, device_str=where, cache=ConfigCache(args.out / "cache"),
                      ship_dir=args.out, backends=backends, log=lambda s: None, seeds=SEEDS)
    rows: list[dict] = []
    outcomes: list = []
    t0 = time.monotonic()

    def write():
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": key.meta(), "backends": backends, "budget_s": args.budget_s,
                                         "elapsed_s": time.monotonic() - t0, "cases": rows}, indent=1) + "\n")

    def done(o):
        outcomes.append(o)
        rows.append(row(o, args.small))
        write()
        r = rows[-1]
        print(f"[{time.monotonic() - t0:6.0f} s] {r['kernel']} {r['signature']} {r['shape']}: "
              + ", ".join(f"{b} {ms:.3f} ms" for b, ms in r["ms"].items()) + f" -> {r['winner']} ({r['schedule']})"
              + (f" ({r['note']})" if r["note"] else ""), flush=True)

    def alarm(signum, frame):
        raise Watchdog(f"stopped at {TUNE_STOP:.0%} of --budget-s")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(max(1, int(started + args.budget_s * TUNE_STOP - time.monotonic())))
    status = 0
    try:
        session.run(todo, on_done=done)
    except (Watchdog, RuntimeError) as e:     # RuntimeError: a config broke the CUDA context (session.FATAL)
        print(f"tune_backends: {e}; the winners so far are written", file=sys.stderr)
        status = 1
    finally:
        signal.alarm(0)
    end = started + args.budget_s - END_SLACK_S
    if args.verify and status == 0 and end - time.monotonic() > 1:
        signal.alarm(max(1, int(end - time.monotonic())))
        try:
            verify(outcomes, rows, args.out / "cache", where, args.small, end - 10)
        except Watchdog:
            print("tune_backends: the public-function check stopped at --budget-s", file=sys.stderr)
            status = 1
        finally:
            signal.alarm(0)
    elif args.verify:
        print("tune_backends: no time left for the check through the public functions (raise --budget-s)",
              file=sys.stderr)
    write()
    print(f"\n{len(rows)} of {len(todo)} cases in {time.monotonic() - t0:.0f} s on {key.name} ({key}); tables in "
          f"{args.out}/ (copy the *.json beside src/tilestack/tune/tables/), results in {args.json}\n")
    print(table(rows, backends))
    return status


if __name__ == "__main__":
    sys.exit(main())
