"""tilestack.perf on a real GPU: events, graphs, NVML energy, the device table, profiling. Skipped without one."""

import pytest
import torch

from tilestack import perf
from tilestack.perf import energy, formulas, nvtx, profile, timing

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SMALL = {"copy_bytes": 64 << 20, "matmul_n": 1024, "dtypes": ("bf16",)}


def test_detect_and_small_ceilings():
    dev = perf.detect()
    assert dev.kind == "cuda" and dev.sm_count and dev.l2_bytes
    c = perf.ceilings(dev, **SMALL)
    assert c.copy_bytes_per_s > 1e11 and c.matmul["bf16"] > 1e12


def test_events_graph_and_rotation():
    x = torch.randn(4096, device="cuda")
    ev = timing.time_fn(lambda a: a.mul_(1.0), args_sets=[(x,)])
    gr = timing.time_fn(lambda a: a.mul_(1.0), args_sets=[(x,)], graph=True)
    assert ev.method == "cuda-events" and gr.method == "cuda-graph" and 0 < gr.median_s <= ev.median_s * 2
    dev = perf.detect()
    sets = timing.rotating_sets(lambda: (torch.empty(1 << 20, device="cuda"),), bytes_per_set=4 << 20, device=dev)
    assert len(sets) * (4 << 20) >= 2 * dev.l2_bytes or len(sets) == timing.MAX_ROTATING_SETS


def test_measure_fills_energy_on_a_long_enough_window():
    dev = perf.detect()
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    c = formulas.matmul(2048, 2048, 2048, "bf16")
    m = perf.measure(torch.mm, args_sets=[(a, a)], flops=c.flops, bytes_read=c.bytes_read,
                     bytes_written=c.bytes_written, name="mm", device=dev, ceilings=perf.ceilings(dev, **SMALL))
    if not energy.meter_for(dev).available:
        pytest.skip(f"NVML energy counter not readable: {energy.meter_for(dev).reason}")
    assert m.joules_per_call > 0 and 10 < m.avg_power_w < 2000 and m.flops_per_joule > 0
    assert nvtx.active()


def test_profile_a_small_model_on_the_gpu():
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512)).cuda()
    x = torch.randn(64, 512, device="cuda")
    p = profile.profile_model(model, (x,), steps=2, ceilings=False)
    assert p.device.kind == "cuda" and p.ops[0].total_s > 0
    assert p.flops == pytest.approx(2 * 64 * 512 * 2048 * 2, rel=0.05)


def test_held_out_models_on_the_gpu_get_gpu_tips_and_ceilings_with_their_spread():
    import re
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import heldout_models as hm

    dev = perf.detect()
    ceil = perf.ceilings(dev, **SMALL)
    assert ceil.spread and all(e["repeats"] >= timing.MIN_CI_SAMPLES for e in ceil.spread.values())
    assert ceil.rel_ci("copy") < 0.1  # a GPU's copy is steady: its median is known to better than +-10%
    model, inputs = hm.convnet()
    p = profile.profile_model(model.cuda(), tuple(x.cuda() for x in inputs), steps=3, train=True, ceilings=ceil)
    convs = [o for o in p.ops if o.op == "aten::convolution"]
    assert len(convs) == 3 and all(o.m.device_kind == "cuda" for o in p.ops)
    cpu_words = re.compile(r"\b(SIMD|oneDNN|AVX|cores?|torch.get_num_threads)\b")
    assert not [o.tip for o in p.ops if cpu_words.search(o.tip)]
