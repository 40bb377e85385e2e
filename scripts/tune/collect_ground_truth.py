"""Ground truth for the cost model: every config the constraints keep, and a sample of the dropped ones, timed
on this GPU for 20+ (kernel, shape) pairs across the library. JSON lines, appended as measured.

    PYTHONPATH=src python3 scripts/tune/collect_ground_truth.py --time-limit 500 \
        --out docs/results/tune_ground_truth_h200.jsonl
    # on a CPU (no GPU): the same machinery on small inputs under Triton's interpreter (wall times of the
    # interpreter, NOT GPU times: for testing the cost model's plumbing only)
    PYTHONPATH=src python3 scripts/tune/collect_ground_truth.py --cpu --max-configs 30 \
        --time-limit 600 --out docs/results/tune_ground_truth_cpu_interpreter.jsonl

Problems are measured one after the other in ``PLAN`` order (cheap, varied ones early; sizes of one kernel
next to each other so each config compiles once); within a problem the kept configs in a seeded random order,
then a few dropped ones (hard drops only on the first problem of a kernel: they fail to compile or launch
whatever the size). Each config is checked against the reference before it is timed (a wrong one is
recorded, not timed). No new config starts after --time-limit; every line is flushed as it is written, so a
run cut short keeps what it measured, and --resume skips the problems already complete in --out. A config
that breaks the CUDA context ends the run (what is written stays). The last lines are a table.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

from common import config_key, small_workload

from tilestack.tune.constraints import ConstrainedSpace, problem_domains
from tilestack.tune.features import config_features, device_peaks, resource_features
from tilestack.tune.library import library_problems

TOL = 2e-2
FATAL = re.compile(r"illegal memory access|unspecified launch failure|illegal instruction|misaligned address",
                   re.IGNORECASE)
# (tuner name, which of its bf16 problems): 29 (kernel, shape) pairs, in the order they are measured: cheap
# compiles first, sizes of one kernel together (a config compiles once for all its sizes: SwiGLU's four widths and
# attention's six sequence lengths cost one space of compiles each); GEMM stops at 4096 (the IR's cost analysis of
# an 8192 GEMM's small tiles takes seconds per tile shape on the host). About 480 distinct compiles in all: a
# 500 s run completes the first 20 or so pairs, --resume continues.
PLAN = (
    ("softmax", lambda p: p.n in (1024, 4096, 8192)),
    ("rms_norm", lambda p: p.n in (2048, 8192)),
    ("rotary", lambda p: True),
    ("layer_norm", lambda p: p.n == 4096),
    ("add_rms_norm", lambda p: p.n == 8192),
    ("swiglu", lambda p: True),
    ("attention_fwd", lambda p: p.fixed["D"] == 128 and not p.fixed["causal"]),
    ("gemm", lambda p: p.n in (1024, 2048, 4096)),
    ("cross_entropy", lambda p: True),
    ("attention_fwd", lambda p: p.fixed["D"] == 64 and p.fixed["causal"] and p.n in (2048, 8192)),
    ("attention_bwd", lambda p: p.kernel == "attention_bwd_dq" and p.fixed["D"] == 128 and not p.fixed["causal"]
     and p.n == 4096),
)
FIRST_S, LATER_S = 1.5, 0.15     # first guesses of a config's cost: compiled (first size of a kernel), or not
SHARE_CAP = 0.75                 # of the time left, the most one problem may take (the last: all of it)


def plan_problems(kernels=None) -> list:
    out, seen = [], set()
    for name, pick in PLAN:
        if kernels and name not in kernels:
            continue
        for p in library_problems([name], ("bfloat16",)):
            pid = problem_id(p)
            if pick(p) and pid not in seen:
                seen.add(pid)
                out.append(p)
    return out


def problem_id(p) -> str:
    return f"{p.kernel} {p.signature} {p.label}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON lines, appended")
    ap.add_argument("--time-limit", type=float, default=500.0, help="seconds; no config starts after it")
    ap.add_argument("--cpu", action="store_true", help="small inputs under Triton's interpreter (no GPU)")
    ap.add_argument("-k", "--kernel", action="append", help="only these PLAN names (repeatable)")
    ap.add_argument("--dropped", type=int, default=3, help="dropped configs per problem, hard and soft each")
    ap.add_argument("--max-configs", type=int, default=0, help="kept configs per problem at most (0: all)")
    ap.add_argument("--rep-ms", type=float, default=20.0, help="GPU timing per config (do_bench rep)")
    ap.add_argument("--dropped-timeout", type=float, default=20.0,
                    help="a dropped config is first compiled on the CPU (tune.aot) with this limit; one that does "
                         "not compile in time, or does not fit, never reaches the GPU")
    ap.add_argument("--resume", action="store_true", help="skip problems --out already has complete")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="list the problems and their spaces; measure nothing")
    a = ap.parse_args(argv)
    if a.dry_run:
        return dry_run(a.kernel)
    t_end = time.monotonic() + a.time_limit

    import torch

    from tilestack.tune.devices import DeviceKey, device_key

    if not a.cpu and not torch.cuda.is_available():
        print("no CUDA GPU: run with --cpu for the interpreter's (small, not GPU) measurements")
        return 2
    if a.cpu:
        dev, device_str = DeviceKey.parse("sm90-132sm-227kb", name="interpreter (CPU)"), "cpu"
        peak, bw = device_peaks("NVIDIA H200")       # features as for an H200; the times are the interpreter's
    else:
        dev, device_str = device_key(0), "cuda"
        peak, bw = device_peaks(dev.name)
    done = _complete_ids(a.out) if a.resume else set()
    problems = [p for p in plan_problems(a.kernel) if problem_id(p) not in done]
    print(f"{len(problems)} problems on {dev.name} ({dev}); {a.time_limit:.0f} s; writing {a.out}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    rows, compiled_kernels = [], set()
    with open(a.out, "a") as out:
        def write(rec):
            out.write(json.dumps(rec) + "\n")
            out.flush()

        per_config = {True: FIRST_S, False: LATER_S}      # running means of a config's cost, by "first of kernel"
        for i, p in enumerate(problems):
            if time.monotonic() >= t_end:
                print("time limit reached: stopping", flush=True)
                break
            first = (p.kernel, repr(p.fixed)) not in compiled_kernels
            compiled_kernels.add((p.kernel, repr(p.fixed)))
            last = i == len(problems) - 1

            def deadline(n_configs, first=first, last=last):
                """Time for the whole space (twice what configs have cost so far), but at most 75% of what is
                left (the last problem: all of it), so one large space cannot starve the rest."""
                left = t_end - time.monotonic()
                need = 2.0 * n_configs * per_config[first] + 10.0
                return time.monotonic() + (left if last else min(need, SHARE_CAP * left))

            try:
                row = measure_problem(p, dev, device_str, peak, bw, a, write, first, deadline)
            except FatalError as e:
                print(f"FATAL: {e}; stopping (the lines written stay)", flush=True)
                break
            rows.append(row)
            if row["timed_configs"]:
                per_config[first] = 0.5 * per_config[first] + 0.5 * row["seconds"] / row["timed_configs"]
            print(f"[{i + 1}/{len(problems)}] {row['id']}: {row['measured']}/{row['kept']} kept measured, "
                  f"{row['failed']} failed, best {row['best_us']} us, {row['seconds']:.0f} s", flush=True)
    print_table(rows)
    return 0


def dry_run(kernels) -> int:
    """The plan, with each problem's raw and kept configs (fake tensors: any machine, no GPU)."""
    from tilestack.tune.constraints import problem_args
    from tilestack.tune.devices import DeviceKey

    dev = DeviceKey.parse("sm90-132sm-227kb")
    total, compiles = 0, set()
    print(f"{'#':>3} {'problem':60} {'raw':>5} {'kept':>5}")
    for i, p in enumerate(plan_problems(kernels)):
        space = ConstrainedSpace(p.tile, problem_args(p), p.fixed, problem_domains(p), dev)
        kept = space.kept()
        total += len(kept)
        compiles.update((p.kernel, repr(p.fixed), config_key(c)) for c in kept)
        print(f"{i + 1:>3} {problem_id(p)[:60]:60} {len(space.raw()):>5} {len(kept):>5}")
    print(f"{total} kept configs to time, {len(compiles)} distinct compiles (sizes of one kernel share them)")
    return 0


class FatalError(RuntimeError):
    pass


def _complete_ids(path: Path) -> set[str]:
    if not path.exists():
        return set()
    out = set()
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("type") == "done" and r.get("complete"):
            out.add(r["id"])
    return out


def measure_problem(p, dev, device_str: str, peak, bw, a, write, first: bool, deadline) -> dict:
    """Measure one problem's kept configs and a sample of its dropped ones, until ``deadline(n_configs)``."""
    from tilestack.tune.session import cuda_timer, wall_timer

    t0 = time.monotonic()
    pid = problem_id(p)
    work = small_workload(p) if device_str == "cpu" else p.make(device_str)
    space = ConstrainedSpace(p.tile, work.args, p.fixed, problem_domains(p), dev)
    raw = space.raw()
    est = {config_key(c): space.estimate(c) for c in raw}
    rng = random.Random(f"{a.seed}-{pid}")
    kept = [c for c in raw if est[config_key(c)].kept]
    rng.shuffle(kept)
    if a.max_configs:
        kept = kept[:a.max_configs]
    hard = [c for c in raw if not est[config_key(c)].valid]
    soft = [c for c in raw if est[config_key(c)].valid and not est[config_key(c)].kept]
    dropped = [("soft", c) for c in rng.sample(soft, min(a.dropped, len(soft)))]
    if first:
        dropped += [("hard", c) for c in rng.sample(hard, min(a.dropped, len(hard)))]
    write({"type": "problem", "id": pid, "kernel": p.kernel, "signature": p.signature, "shape": p.label, "n": p.n,
           "bucket": p.bucket, "fixed": repr(p.fixed), "device": dev.meta(), "device_str": device_str,
           "domains": {k: list(v) for k, v in problem_domains(p).items()}, "space": space.summary(),
           "default": p.default, "timer": "cuda do_bench median" if device_str == "cuda" else
           "interpreter wall time (not GPU time)"})
    timer = cuda_timer if device_str == "cuda" else wall_timer
    todo = [("kept", c) for c in kept] + dropped
    deadline = deadline(len(todo))
    tried = 0
    measured = failed = 0
    best = None
    complete = True
    for group, cfg in todo:
        if time.monotonic() >= deadline:
            complete = group != "kept"          # every kept config was timed before the deadline
            break
        tried += 1
        e = est[config_key(cfg)]
        rec = {"type": "config", "id": pid, "config": cfg, "group": group, "raw_index": raw.index(cfg),
               "us": None, "error": None, "reasons": e.hard + e.soft}
        c0 = time.monotonic()
        if group != "kept" and device_str == "cuda":
            pre = _precompile(p, work, cfg, dev, a.dropped_timeout)
            if pre is not None and not pre.ok:
                rec["error"], rec["aot"] = f"aot: {pre.error}", pre.to_json()
                rec["features"] = config_features(e, sms=dev.sms, shared_per_block=dev.shared_bytes,
                                                  peak_flops=peak, bandwidth=bw)
                write(rec)
                continue
        try:
            err = work.check(cfg)
            rec["rel_err"] = err if err == err and err != float("inf") else None
            if not err <= TOL:
                rec["error"] = f"wrong result (rel err {err:.1e})"
            else:
                rec["first_s"] = round(time.monotonic() - c0, 3)        # compile + first launch
                rec["us"] = timer(lambda cfg=cfg: work.run(cfg), a.rep_ms) * 1e6
        except Exception as ex:  # noqa: BLE001 - a config that fails is data, not a stop (unless fatal)
            msg = f"{type(ex).__name__}: {' '.join(str(ex).split())[:300]}"
            rec["error"] = msg
            if FATAL.search(msg):
                write(rec)
                raise FatalError(msg) from ex
        res = _resources(p, work, cfg) if rec["us"] is not None and device_str == "cuda" else None
        rec["resources"] = res
        rec["features"] = config_features(e, sms=dev.sms, shared_per_block=dev.shared_bytes, peak_flops=peak,
                                          bandwidth=bw) | (resource_features(res) if res else {})
        write(rec)
        if group == "kept":
            measured += rec["us"] is not None
            failed += rec["us"] is None
            if rec["us"] is not None and (best is None or rec["us"] < best):
                best = rec["us"]
    # complete: every kept config (of the --max-configs sample, if capped) was measured
    write({"type": "done", "id": pid, "complete": complete, "capped": len(kept) < sum(e.kept for e in est.values()),
           "measured": measured})
    return {"id": pid, "raw": len(raw), "kept": len(kept), "measured": measured, "failed": failed,
            "best_us": None if best is None else round(best, 2), "seconds": time.monotonic() - t0,
            "complete": complete, "timed_configs": tried}


def _precompile(p, work, cfg, dev, timeout_s: float):
    """The config compiled on the CPU for this GPU's architecture (None where ptxas is missing)."""
    from tilestack.tune import aot

    if aot.missing_tools():
        return None
    return aot.resources(p.tile, work.args, p.fixed, cfg, shared_limit=dev.shared_bytes,
                         target=("cuda", dev.major * 10 + dev.minor, 32), timeout_s=timeout_s)


def _resources(p, work, cfg) -> dict | None:
    """Registers, spills and shared memory of the kernel Triton compiled for this config on the GPU."""
    from tilestack.backends.triton import BACKEND
    from tilestack.tune.constraints import split_config

    try:
        consts, _ = split_config(p.tile, cfg)
        traced = p.tile.trace(*work.args, **p.fixed, **consts)
        return BACKEND.resources(traced)
    except Exception:  # noqa: BLE001 - a kernel launched through another path: no report, not an error
        return None


def print_table(rows) -> None:
    print(f"{'problem':60} {'raw':>5} {'kept':>5} {'timed':>6} {'failed':>6} {'best us':>10} {'s':>5} complete")
    for r in rows:
        print(f"{r['id'][:60]:60} {r['raw']:>5} {r['kept']:>5} {r['measured']:>6} {r['failed']:>6} "
              f"{str(r['best_us']):>10} {r['seconds']:>5.0f} {r['complete']}")


if __name__ == "__main__":
    sys.exit(main())
