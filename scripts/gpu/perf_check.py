"""Exercise everything GPU-specific in tilestack.perf on one GPU and write the evidence under --out.

    PYTHONPATH=src python3 scripts/gpu/perf_check.py --out $OUT            # about 4-7 minutes on an H100
    PYTHONPATH=src python3 scripts/gpu/perf_check.py --out $OUT --skip ncu,library

Sections (each runs on its own; a failure is recorded and the next one runs):
  device    detection, spec-sheet lookup, ceilings re-measured (copy bandwidth, matmul per dtype)
  timing    CUDA events vs CUDA-graph replay on a tiny kernel; one input set vs rotated sets (L2 effect)
  energy    NVML: idle power, a too-short window (flagged), a long window
  nvtx      ranges active
  torch     SDPA (flash, cuDNN; causal and not), GEMM, layer/RMS norm, softmax, add, copy: full metrics
  library   tilestack's own kernels through tilestack.bench (FLOPs and bytes from the IR)
  store     every result appended to $OUT/results.sqlite; compare
  ncu       Nsight Compute (--clock-control none) on SDPA, by kernel regex and by NVTX range; folded in;
            plus the `tilestack ncu` command, on SDPA and on the library's attention (--case)
  profile   a small GPT built here, forward and forward+backward, under torch.profiler + FLOP counting;
            plus the `tilestack profile` command on the same model
  report    rich tables, roofline.png, report.html, report.md, profile.{html,png,md}
The last thing printed is a short table of every check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tilestack import perf  # noqa: E402
from tilestack.perf import energy, formulas, ncu, nvtx, report, timing  # noqa: E402
from tilestack.perf import profile as profile_mod  # noqa: E402

SECTIONS = ("device", "timing", "energy", "nvtx", "torch", "library", "store", "ncu", "profile", "report")
# Attention as ANCHORS.md measures it: bf16, B*N = 16k tokens, H*D = 2048.
ATTN = {"B": 4, "H": 16, "N": 4096, "D": 128}
GEMM_N = 4096
ROWS, COLS = 16384, 4096
ADD_NUMEL = 64 << 20
TINY_NUMEL = 4096
L2_RESIDENT_NUMEL = 1 << 20  # 2 MiB of bf16 per tensor: fits the L2 several times over
GPT = {"vocab": 8192, "d": 512, "heads": 8, "layers": 4, "ff": 2048, "batch": 8, "seq": 1024}
NCU_TIMEOUT_S = 150  # per ncu run; four runs keep the whole script within a 10-minute device call
ATTENTION_KERNELS = "flash|fmha|attention|sdpa|cudnn"


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    seconds: float
    detail: str


class Checker:
    """Runs sections, records pass/fail with a one-line detail, never lets one failure stop the rest."""

    def __init__(self, out: Path):
        self.out, self.checks = out, []

    def run(self, name: str, fn: Callable[[], str | None]) -> Any:
        t0 = time.perf_counter()
        print(f"\n=== {name} " + "=" * max(0, 70 - len(name)), flush=True)
        try:
            detail = fn() or ""
            self.checks.append(Check(name, True, time.perf_counter() - t0, detail))
        except Exception as e:
            tb = traceback.format_exc()
            print(tb, flush=True)
            with (self.out / "errors.log").open("a") as log:
                log.write(f"--- {name}\n{tb}\n")
            self.checks.append(Check(name, False, time.perf_counter() - t0, f"{type(e).__name__}: {e}"[:160]))


class State:
    dev: Any = None
    ceil: Any = None
    ms: list = []
    prof: Any = None
    run_id: str | None = None


S = State()


def _sync() -> None:
    torch.cuda.synchronize()


# --- device ----------------------------------------------------------------------------------------------
def check_device() -> str:
    S.dev = perf.detect()
    print(json.dumps(S.dev.describe(), indent=2))
    if S.dev.kind != "cuda":
        raise RuntimeError(f"no CUDA GPU: detect() gave {S.dev.name}")
    print("spec:", S.dev.spec.label if S.dev.spec else "NOT IN THE TABLE (measured roofs only)")
    t0 = time.perf_counter()
    S.ceil = perf.ceilings(S.dev, remeasure=True)
    took = time.perf_counter() - t0
    again = perf.ceilings(S.dev)
    assert again.measured_at == S.ceil.measured_at, "the ceilings were not read back from the cache"
    bf16 = S.ceil.peak("bf16")
    pub = S.dev.spec.peak("bf16") if S.dev.spec else None
    print(f"copy {report.si(S.ceil.copy_bytes_per_s, 'B/s')}, matmul "
          + ", ".join(f"{k} {report.si(v, 'FLOP/s')}" for k, v in S.ceil.matmul.items())
          + f" (measured in {took:.1f} s, cached at {perf.device.ceilings_path(S.dev)})")
    return (f"{S.dev.name}: copy {report.si(S.ceil.copy_bytes_per_s, 'B/s')}, bf16 {report.si(bf16, 'FLOP/s')}"
            + (f" ({bf16 / pub:.0%} of sheet)" if pub else ""))


# --- timing ----------------------------------------------------------------------------------------------
def check_timing() -> str:
    x = torch.randn(TINY_NUMEL, device="cuda")
    events = timing.time_fn(lambda a: a.mul_(1.0), args_sets=[(x,)])
    graph = timing.time_fn(lambda a: a.mul_(1.0), args_sets=[(x,)], graph=True)
    print(f"tiny mul_ ({TINY_NUMEL} floats): events {report.seconds(events.median_s)} "
          f"(p10 {report.seconds(events.p10_s)}, p90 {report.seconds(events.p90_s)}, {events.repeats} repeats); "
          f"graph replay {report.seconds(graph.median_s)} per call")

    def make() -> tuple:
        return (torch.randn(L2_RESIDENT_NUMEL, device="cuda", dtype=torch.bfloat16),
                torch.randn(L2_RESIDENT_NUMEL, device="cuda", dtype=torch.bfloat16))

    per_set = 3 * L2_RESIDENT_NUMEL * 2
    one = timing.time_fn(torch.add, args_sets=[make()])
    sets = timing.rotating_sets(make, bytes_per_set=per_set, device=S.dev)
    rotated = timing.time_fn(torch.add, args_sets=sets)
    print(f"add of {per_set >> 20} MiB: one set (L2-warm) {report.seconds(one.median_s)}, "
          f"{len(sets)} rotated sets {report.seconds(rotated.median_s)}")
    return (f"tiny: events {report.seconds(events.median_s)} vs graph {report.seconds(graph.median_s)}; "
            f"L2-warm {report.seconds(one.median_s)} vs rotated x{len(sets)} {report.seconds(rotated.median_s)}")


# --- energy ----------------------------------------------------------------------------------------------
def check_energy() -> str:
    meter = energy.meter_for(S.dev)
    if meter is None or not meter.available:
        raise RuntimeError(f"no NVML energy counter: {meter.reason if meter else 'not CUDA'}")
    idle = energy.idle_power_w(meter)
    a = torch.randn(GEMM_N, GEMM_N, device="cuda", dtype=torch.bfloat16)
    with meter.window() as short:  # one GEMM: about a millisecond, far below the counter's update period
        torch.mm(a, a)
        _sync()
    assert not short.result.valid, "a too-short window was not flagged"
    t = timing.time_fn(torch.mm, args_sets=[(a, a)])
    long = energy.measure_energy(torch.mm, args_sets=[(a, a)], per_call_s=t.median_s, meter=meter, sync=_sync)
    print(f"idle {report.si(idle, 'W')}; short window: {short.result.note}")
    print(f"GEMM {GEMM_N}^3 bf16: {report.si(long.joules_per_call, 'J')}/call at {report.si(long.avg_power_w, 'W')}"
          f" over {long.window.seconds:.2f} s ({long.calls} calls), power reading now "
          f"{report.si(meter.power_w(), 'W')}")
    return (f"idle {report.si(idle, 'W')}, GEMM {report.si(long.avg_power_w, 'W')}, "
            f"{report.si(2 * GEMM_N**3 / long.joules_per_call, 'FLOP/J')}; short window flagged")


# --- nvtx ------------------------------------------------------------------------------------------------
def check_nvtx() -> str:
    with nvtx.range(nvtx.range_name("perf_check", {"section": "nvtx"})):
        nvtx.mark("inside")
    if not nvtx.active():
        raise RuntimeError("NVTX ranges are no-ops: torch.cuda.nvtx not usable")
    return "torch.cuda.nvtx ranges active"


# --- torch ops -------------------------------------------------------------------------------------------
def _attn_inputs() -> tuple:
    b, h, n, d = ATTN["B"], ATTN["H"], ATTN["N"], ATTN["D"]
    return tuple(torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))  # (B, H, N, D)


def _measure(fn: Callable, make: Callable[[], tuple], cost: formulas.Cost, name: str, config: dict, **kw: Any):
    sets = timing.rotating_sets(make, bytes_per_set=cost.bytes, device=S.dev)
    m = perf.measure(fn, args_sets=sets, flops=cost.flops, bytes_read=cost.bytes_read,
                     bytes_written=cost.bytes_written, name=name, config=config, device=S.dev, ceilings=S.ceil, **kw)
    S.ms.append(m)
    print(f"{name} {config}: {report.seconds(m.latency_s)}, {report.si(m.flops_per_s, 'FLOP/s')}, "
          f"{report.si(m.bytes_per_s, 'B/s')}, {m.bound}, {report.pct(m.roof_fraction)} of roof, "
          f"{report.si(m.joules_per_call, 'J')}/call, {report.si(m.avg_power_w, 'W')} "
          f"{('(' + m.energy_note + ')') if m.energy_note else ''}")
    return m


def check_torch() -> str:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, n, d = ATTN["B"], ATTN["H"], ATTN["N"], ATTN["D"]
    tokens = b * n
    for backend, label in ((SDPBackend.FLASH_ATTENTION, "flash"), (SDPBackend.CUDNN_ATTENTION, "cudnn")):
        for causal in (False, True):
            def sdpa(q, k, v, backend=backend, causal=causal):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            try:
                _measure(sdpa, _attn_inputs, formulas.attention(b, h, n, n, d, "bf16", causal=causal),
                         f"torch.sdpa[{label}]", {**ATTN, "causal": causal}, items=tokens, item_name="tokens")
            except Exception as e:  # cuDNN attention may be missing from a build: say so, keep going
                print(f"sdpa {label} causal={causal}: {type(e).__name__}: {e}")
    mk = lambda: (torch.randn(GEMM_N, GEMM_N, device="cuda", dtype=torch.bfloat16),  # noqa: E731
                  torch.randn(GEMM_N, GEMM_N, device="cuda", dtype=torch.bfloat16))
    _measure(torch.mm, mk, formulas.matmul(GEMM_N, GEMM_N, GEMM_N, "bf16"), "torch.mm", {"n": GEMM_N})
    rows = lambda: (torch.randn(ROWS, COLS, device="cuda", dtype=torch.bfloat16),)  # noqa: E731
    w = torch.ones(COLS, device="cuda", dtype=torch.bfloat16)
    _measure(lambda x: F.layer_norm(x, (COLS,), w, w), rows, formulas.layernorm(ROWS, COLS, "bf16"),
             "torch.layer_norm", {"rows": ROWS, "cols": COLS}, items=ROWS, item_name="rows")
    _measure(lambda x: F.rms_norm(x, (COLS,), w), rows, formulas.rmsnorm(ROWS, COLS, "bf16"),
             "torch.rms_norm", {"rows": ROWS, "cols": COLS}, items=ROWS, item_name="rows")
    _measure(lambda x: torch.softmax(x, -1), rows, formulas.softmax(ROWS, COLS, "bf16"), "torch.softmax",
             {"rows": ROWS, "cols": COLS}, items=ROWS, item_name="rows")
    pair = lambda: (torch.randn(ADD_NUMEL, device="cuda", dtype=torch.bfloat16),  # noqa: E731
                    torch.randn(ADD_NUMEL, device="cuda", dtype=torch.bfloat16))
    _measure(torch.add, pair, formulas.elementwise(ADD_NUMEL, "bf16", inputs=2), "torch.add", {"numel": ADD_NUMEL})
    _measure(lambda s, d: d.copy_(s), pair, formulas.elementwise(ADD_NUMEL, "bf16", flops_per_element=0),
             "torch.copy_", {"numel": ADD_NUMEL})
    tiny = lambda: (torch.randn(TINY_NUMEL, device="cuda"),)  # noqa: E731
    for graph in (False, True):
        _measure(lambda x: x.mul_(1.0), tiny, formulas.elementwise(TINY_NUMEL, "fp32"), "torch.mul_",
                 {"numel": TINY_NUMEL, "graph": graph}, graph=graph)
    with_energy = [m for m in S.ms if m.joules_per_call is not None]
    return f"{len(S.ms)} measurements, {len(with_energy)} with energy per op and perf/W"


# --- library kernels -------------------------------------------------------------------------------------
def check_library() -> str:
    from tilestack.bench.cases import cases
    from tilestack.bench.runner import run_case

    done, failed = 0, []
    for case in cases("cuda", full=True):
        try:
            row = run_case(case, S.dev, S.ceil)
            S.ms += [row.ours, row.baseline]
            print(f"{case.name} {case.shape}: check {row.check['vs_float64']:.1e}, ours "
                  f"{report.si(row.ours.flops_per_s, 'FLOP/s')} vs {row.case.baseline_name} "
                  f"{report.si(row.baseline.flops_per_s, 'FLOP/s')} ({row.speedup:.2f}x)")
            done += 1
        except Exception as e:
            failed.append(f"{case.name}: {type(e).__name__}")
            traceback.print_exc()
    if failed and not done:
        raise RuntimeError("; ".join(failed))
    return f"{done} cases" + (f"; failed {', '.join(failed)}" if failed else "")


# --- store -----------------------------------------------------------------------------------------------
def check_store(out: Path) -> str:
    with perf.Store(out / "results.sqlite") as st:
        S.run_id = st.start_run(device=S.dev, ceilings=S.ceil, label="perf_check", command=" ".join(sys.argv))
        for m in S.ms:
            st.append(S.run_id, m)
        back = st.measurements(S.run_id)
        assert [(m.name, m.latency_s) for m in back] == [(m.name, m.latency_s) for m in S.ms], "read-back differs"
        cmp = st.compare(S.run_id, S.dev.name)
        assert st.integrity_ok()
    report.console().print(report.comparison_table(cmp))
    return f"{len(back)} rows in run {S.run_id}; compare by run and by device ok"


# --- ncu -------------------------------------------------------------------------------------------------
NCU_TARGET = '''
import torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tilestack.perf import nvtx
B, H, N, D = {B}, {H}, {N}, {D}
q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
for _ in range(5):
    with nvtx.range(nvtx.range_name("sdpa", {{"backend": "flash"}})), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        F.scaled_dot_product_attention(q, k, v)
torch.cuda.synchronize()
'''


def check_ncu(out: Path) -> str:
    target = out / "ncu_target.py"
    target.write_text(NCU_TARGET.format(**ATTN))
    env = {"PYTHONPATH": str(ROOT / "src")}
    argv = [sys.executable, str(target)]
    notes = []
    try:
        res = ncu.run(argv, kernel_regex=ATTENTION_KERNELS, launch_skip=2, launch_count=1, env=env,
                      timeout_s=NCU_TIMEOUT_S)
    except ncu.NcuPermissionError as e:
        print(e)
        return f"counters not permitted here (clear message given): {str(e)[:80]}"
    for k in res.kernels:
        print(k)
    flash = [i for i, m in enumerate(S.ms) if m.name == "torch.sdpa[flash]" and not m.config.get("causal")]
    if flash:
        S.ms[flash[0]] = ncu.fold(S.ms[flash[0]], res)
        print("folded:", report.ncu_summary(S.ms[flash[0]].ncu))
    notes.append(f"regex: {report.ncu_summary(res.summary())}")
    rng = f"{nvtx.PREFIX}{nvtx.range_name('sdpa', {'backend': 'flash'})}/"
    try:
        by_range = ncu.run(argv, nvtx_include=rng, launch_skip=0, launch_count=1, env=env, timeout_s=NCU_TIMEOUT_S)
        notes.append(f"nvtx '{rng}': {len(by_range.kernels)} kernel(s) {by_range.kernels[0].name[:40]}")
    except ncu.NcuError as e:
        notes.append(f"nvtx filter '{rng}' failed: {str(e)[:100]}")
    cli = subprocess.run([sys.executable, "-m", "tilestack.cli", "ncu", "--kernel", ATTENTION_KERNELS, "--skip", "2",
                          "--json", "--", str(target)], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=NCU_TIMEOUT_S)
    (out / "ncu_cli.json").write_text(cli.stdout)
    notes.append(f"`tilestack ncu` exit {cli.returncode}")
    if cli.returncode:
        print(cli.stdout[-2000:], cli.stderr[-2000:])
    # One of the library's own kernels, selected by its NVTX range (`tilestack ncu --case`).
    lib = subprocess.run([sys.executable, "-m", "tilestack.cli", "ncu", "--case", "attention_fwd", "--json"],
                         capture_output=True, text=True, env={**os.environ, **env}, timeout=NCU_TIMEOUT_S)
    (out / "ncu_case.json").write_text(lib.stdout)
    notes.append(f"`tilestack ncu --case attention_fwd` exit {lib.returncode}")
    if lib.returncode:
        print(lib.stdout[-2000:], lib.stderr[-2000:])
    else:
        print(lib.stdout[-3000:])
    print("; ".join(notes))
    return "; ".join(notes)


# --- profile ---------------------------------------------------------------------------------------------
GPT_SOURCE = '''
"""A small GPT, for `tilestack profile` (written by scripts/gpu/perf_check.py)."""
import torch
import torch.nn.functional as F
from torch import nn

CFG = {cfg}


class Block(nn.Module):
    def __init__(self, d, heads, ff):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x):  # x: (B, N, d)
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, N, d/H)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab, d, heads, layers, ff, **_):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, ff) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):  # tokens: (B, N)
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))  # (B, N, vocab)


def build(device="cuda"):
    torch.manual_seed(0)
    model = TinyGPT(**CFG).to(device=device, dtype=torch.bfloat16)
    tokens = torch.randint(0, CFG["vocab"], (CFG["batch"], CFG["seq"]), device=device)
    return model, (tokens,)
'''


def check_profile(out: Path) -> str:
    src = out / "tiny_gpt.py"
    src.write_text(GPT_SOURCE.format(cfg=GPT))
    model, inputs = profile_mod.load_target(str(src))
    fwd = profile_mod.profile_model(model, inputs, steps=5, name="TinyGPT", ceilings=S.ceil)
    profile_mod.print_profile(fwd, top=15)
    train = profile_mod.profile_model(model, inputs, steps=3, train=True, name="TinyGPT train", ceilings=S.ceil)
    profile_mod.print_profile(train, top=15)
    S.prof = (fwd, train)
    for p, stem in ((fwd, "profile"), (train, "profile_train")):
        profile_mod.profile_html(p, out / f"{stem}.html", out / f"{stem}.png")
        (out / f"{stem}.md").write_text(report.markdown_table(profile_mod.PROFILE_COLUMNS,
                                                              profile_mod.profile_rows(p)[:20]) + "\n")
    cli = subprocess.run([sys.executable, "-m", "tilestack.cli", "profile", str(src), "--steps", "3", "--top", "10",
                          "--out", str(out / "profile_cli"), "--db", str(out / "results.sqlite")],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                         timeout=NCU_TIMEOUT_S)
    (out / "profile_cli.log").write_text(cli.stdout + cli.stderr)
    if cli.returncode:
        print(cli.stdout[-3000:], cli.stderr[-3000:])
    top = fwd.hot_spots(1)[0]
    return (f"fwd {report.seconds(fwd.step_s)}/step, {report.si(fwd.flops / fwd.step_s, 'FLOP/s')}, top "
            f"{top.op} {report.pct(top.share)}; train {report.seconds(train.step_s)}/step; "
            f"`tilestack profile` exit {cli.returncode}")


# --- report ----------------------------------------------------------------------------------------------
def check_report(out: Path) -> str:
    title = f"tilestack perf_check on {S.dev.name}"
    report.print_measurements(S.ms, title=title)
    report.roofline_png(S.ms, out / "roofline.png", device=S.dev, ceilings=S.ceil, title=title)
    report.html_report(S.ms, out / "report.html", device=S.dev, ceilings=S.ceil, versions=perf.versions(),
                       title=title)
    (out / "report.md").write_text(f"## {title}\n\n" + report.measurements_markdown(S.ms) + "\n\n"
                                   + "\n".join(f"- **{m.name}** {m.config}: {m.tip}" for m in S.ms) + "\n")
    sizes = {f: (out / f).stat().st_size for f in ("roofline.png", "report.html", "report.md")}
    return ", ".join(f"{f} {s >> 10} KiB" for f, s in sizes.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/perf_check"))
    ap.add_argument("--skip", default="", help=f"comma-separated sections to skip, of {', '.join(SECTIONS)}")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens, even through a pipe
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    print("versions:", json.dumps(perf.versions()))
    c = Checker(out)
    c.run("device", check_device)
    if S.dev is None or S.dev.kind != "cuda":
        print("no GPU: nothing else to check here")
    else:
        plan: list[tuple[str, Callable[[], str | None]]] = [
            ("timing", check_timing), ("energy", check_energy), ("nvtx", check_nvtx), ("torch", check_torch),
            ("library", check_library), ("ncu", lambda: check_ncu(out)), ("store", lambda: check_store(out)),
            ("profile", lambda: check_profile(out)), ("report", lambda: check_report(out)),
        ]
        for name, fn in plan:
            if name not in skip:
                c.run(name, fn)
    from rich.table import Table

    t = Table(title="perf_check", header_style="bold")
    for col in ("check", "ok", "seconds", "detail"):
        t.add_column(col, overflow="fold")
    for ch in c.checks:
        t.add_row(ch.name, "[green]ok[/]" if ch.ok else "[red]FAIL[/]", f"{ch.seconds:.1f}", ch.detail)
    report.console().print(t)
    (out / "checks.json").write_text(json.dumps([dataclasses.asdict(ch) for ch in c.checks], indent=2))
    return 0 if all(ch.ok for ch in c.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
