"""Performance analysis of held-out models on one GPU: the checks of issue 9 (items 9-12) with the evidence.

    PYTHONPATH=src python3 scripts/gpu/perf_heldout.py --out $OUT          # about a minute on an H100/H200

Checks (each runs on its own; a failure is recorded and the next one runs), written to $OUT/checks.json and
printed last:
  ceilings  re-measured with their spread (each until +-2% or its budget), read back from the cache, and a
            cache from "another machine" measured again
  timing    a tiny kernel timed with events and with graph replay until its median is known (converged)
  flops     grouped and depthwise convolutions forward and backward count what their groups cost apart
  profile   the depthwise ConvNet, the MLP-Mixer and the small transformer of tests/perf/heldout_models.py,
            forward and forward+backward: one row per op and input shapes, GPU tips only, spreads kept
  compare   two models' runs are not comparable; one model's two runs pair row by row
Profiles are printed and written as profile_<model>.md under $OUT.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests" / "perf"))

import heldout_models as hm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from tilestack import config, perf  # noqa: E402
from tilestack.perf import device, profile, report, timing  # noqa: E402
from tilestack.perf.store import Store  # noqa: E402

CPU_WORDS = re.compile(r"\b(SIMD|oneDNN|AVX|AMX|cores?|torch\.get_num_threads|overhead-bound)\b")
TINY_NUMEL = 4096


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str


CHECKS: list[Check] = []


def check(name: str, fn: Callable[[], str]) -> None:
    t0 = time.perf_counter()
    try:
        CHECKS.append(Check(name, True, f"{fn()} ({time.perf_counter() - t0:.1f} s)"))
    except Exception as e:
        traceback.print_exc()
        CHECKS.append(Check(name, False, f"{type(e).__name__}: {e}"))


def check_ceilings(dev: device.Device) -> str:
    c = device.ceilings(dev, remeasure=True)
    for key, entry in c.spread.items():
        print(f"  {key}: +-{entry['rel_ci']:.2%} over {entry['repeats']} calls, converged={entry['converged']}")
    assert all(e["converged"] for e in c.spread.values()), f"a ceiling did not converge: {c.spread}"
    again = device.ceilings(dev)
    assert again.measured_at == c.measured_at, "the ceilings were not read back from the cache"
    path = device.ceilings_path(dev)
    data = json.loads(path.read_text())
    data["machine"]["host"] = "another-host"
    path.write_text(json.dumps(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        third = device.ceilings(dev)
    assert any("another machine" in str(w.message) for w in caught), "a cache from another host was used"
    return report.ceilings_line(third)


def check_timing(dev: device.Device) -> str:
    x = torch.randn(TINY_NUMEL, device="cuda")
    ev = timing.time_fn(lambda a: a.mul_(1.0), args_sets=[(x,)], device=dev)
    gr = timing.time_fn(lambda a: a.mul_(1.0), args_sets=[(x,)], device=dev, graph=True)
    for t in (ev, gr):
        assert t.converged, f"{t.method}: +-{t.rel_ci:.1%} after {t.repeats} repeats"
    return (f"events {report.seconds(ev.median_s)} {report.spread(ev.rel_ci)} ({ev.repeats} calls), "
            f"graph {report.seconds(gr.median_s)} {report.spread(gr.rel_ci)} ({gr.repeats} replays)")


def _grouped_and_split(groups: int, transposed: bool) -> tuple[dict, dict]:
    """Counts of one grouped convolution's forward and backward, and of its groups run apart as dense ones."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    c = 8
    x = torch.randn(2, c, 9, 7, device="cuda", requires_grad=True)  # (N, C, H, W)
    grouped = conv(c, c, 3, stride=2, padding=1, groups=groups, bias=False).cuda()
    parts = [conv(c // groups, c // groups, 3, stride=2, padding=1, bias=False).cuda() for _ in range(groups)]
    xs = [torch.randn(2, c // groups, 9, 7, device="cuda", requires_grad=True) for _ in range(groups)]
    a = profile.count_ops(lambda: grouped(x).sum().backward())
    b = profile.count_ops(lambda: sum(p(xi).sum() for p, xi in zip(parts, xs, strict=True)).backward())
    return a, b


def check_flops() -> str:
    out = []
    for groups, transposed in ((8, False), (8, True), (2, False)):
        a, b = _grouped_and_split(groups, transposed)
        for op in ("aten::convolution", "aten::convolution_backward"):
            fa = sum(v.flops for (name, _), v in a.items() if name == op)
            fb = sum(v.flops for (name, _), v in b.items() if name == op)
            assert fa == fb > 0, f"groups={groups} transposed={transposed} {op}: {fa} vs {fb} split"
        out.append(f"g={groups}{' T' if transposed else ''} ok")
    return ", ".join(out)


def check_profiles(out: Path, dev: device.Device, ceil: device.Ceilings) -> str:
    notes = []
    for build in (hm.convnet, hm.mixer, hm.transformer):
        model, inputs = build()
        model, inputs = model.cuda(), tuple(t.cuda() for t in inputs)
        for train in (False, True):
            p = profile.profile_model(model, inputs, train=train, name=build.__name__, device=dev, ceilings=ceil)
            profile.print_profile(p, top=15)
            stem = f"profile_{build.__name__}{'_train' if train else ''}"
            (out / f"{stem}.md").write_text(
                report.markdown_table(profile.PROFILE_COLUMNS, profile.profile_rows(p)) + "\n")
            cpu = [o.tip for o in p.ops if CPU_WORDS.search(o.tip)]
            assert not cpu, f"{stem}: CPU tips on a GPU: {cpu[:2]}"
            assert all(o.m.device_kind == "cuda" for o in p.ops)
            if build is hm.convnet:
                convs = {o.shapes[1]: o for o in p.ops if o.op == "aten::convolution"}
                assert len(convs) == 3, f"{stem}: {len(convs)} convolution rows"
                dw = convs[(hm.STEM, 1, 3, 3)]
                assert dw.bound == "memory", f"depthwise row is {dw.bound}-bound at {dw.m.intensity:.2f} FLOP/B"
            notes.append(f"{stem}: {len(p.ops)} rows, {p.steps} steps, step {report.seconds(p.step_s)} "
                         f"{report.spread(p.step_rel_ci)}")
    return "; ".join(notes)


def check_compare(out: Path, dev: device.Device, ceil: device.Ceilings) -> str:
    db = out / "results.sqlite"
    with Store(db) as st:
        for label, build in (("convnet", hm.convnet), ("mixer", hm.mixer), ("convnet again", hm.convnet)):
            model, inputs = build()
            p = profile.profile_model(model.cuda(), tuple(t.cuda() for t in inputs), steps=6, device=dev,
                                      ceilings=ceil, name=build.__name__)
            run = st.start_run(device=dev, ceilings=ceil, label=label)
            for o in p.ops:
                if o.counted:
                    st.append(run, o.m)
        cross = st.compare("convnet", "mixer")
        same = st.compare("convnet", "convnet again")
    assert not cross.comparable, f"convnet vs mixer paired {len(cross.paired)} rows"
    assert same.comparable and len(same.paired) == len(same.rows), f"convnet twice: {same.notes}"
    return f"convnet vs mixer: {cross.notes[0][:80]}...; convnet twice: {len(same.paired)} rows paired"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check")
        return 1
    with config.override(cache_dir=args.out / "cache"):
        dev = perf.detect()
        print(f"device: {dev.name}")
        check("ceilings", lambda: check_ceilings(dev))
        ceil = device.ceilings(dev)
        check("timing", lambda: check_timing(dev))
        check("flops", check_flops)
        check("profile", lambda: check_profiles(args.out, dev, ceil))
        check("compare", lambda: check_compare(args.out, dev, ceil))
    (args.out / "checks.json").write_text(json.dumps([dataclasses.asdict(c) for c in CHECKS], indent=2))
    for c in CHECKS:
        print(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    return 0 if all(c.ok for c in CHECKS) else 1


if __name__ == "__main__":
    sys.exit(main())
