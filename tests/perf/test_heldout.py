"""Performance analysis of models the perf code was not written against (tests/perf/heldout_models.py):
convolution FLOPs with groups, one row per op and input shapes, comparisons keyed by model, device tips."""

import itertools
import math
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from tilestack.errors import LaunchError
from tilestack.perf import formulas, profile, roofline
from tilestack.perf.store import Store

sys.path.insert(0, str(Path(__file__).parent))
import heldout_models as hm  # noqa: E402
from profile_support import CEIL, flops_of  # noqa: E402

GPU_WORDS = re.compile(r"\b(CUDA|128-bit|occupancy|mma|warps?|launch(es)?)\b")  # what a GPU's tips speak of


@pytest.mark.parametrize("groups,transposed", [(8, False), (4, False), (8, True), (2, True)])
def test_grouped_convolution_costs_what_its_groups_cost_apart(groups, transposed):
    """A convolution of G groups does the work of G dense ones of C/G channels: forward and backward alike."""
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    c, g = 8, groups
    x = torch.randn(2, c, 9, 7, requires_grad=True)  # (N, C, H, W), odd sizes: stride 2 leaves a ragged edge
    grouped = conv(c, c, 3, stride=2, padding=1, groups=g, bias=False)
    parts = [conv(c // g, c // g, 3, stride=2, padding=1, bias=False) for _ in range(g)]
    xs = [torch.randn(2, c // g, 9, 7, requires_grad=True) for _ in range(g)]

    ours_grouped = profile.count_ops(lambda: grouped(x).sum().backward())
    ours_split = profile.count_ops(lambda: sum(p(xi).sum() for p, xi in zip(parts, xs, strict=True)).backward())
    with torch.utils.flop_counter.FlopCounterMode(display=False) as torch_split:  # right where groups == 1
        sum(p(xi).sum() for p, xi in zip(parts, xs, strict=True)).backward()
    for op in ("aten::convolution", "aten::convolution_backward"):
        assert flops_of(ours_grouped, op) == flops_of(ours_split, op) > 0, op
    assert flops_of(ours_split, "aten::convolution") + flops_of(ours_split, "aten::convolution_backward") == (
        torch_split.get_total_flops()
    )


def test_convolution_formulas_by_hand():
    # depthwise 3x3 over (2, 8, 10, 10): 9 taps per output element, 2 FLOPs each
    x, w = (2, 8, 10, 10), (8, 1, 3, 3)
    fwd = formulas.convolution(x, w, x, "fp32", groups=8)
    assert fwd.flops == 2 * 9 * 2 * 8 * 100
    assert fwd.bytes_read == (2 * 8 * 100 + 8 * 9) * 4 and fwd.bytes_written == 2 * 8 * 100 * 4
    assert formulas.convolution(x, w, x, groups=8, bias=True).flops == fwd.flops + 2 * 8 * 100  # one add each
    bwd = formulas.convolution_backward(x, x, w, groups=8, bias_grad=True)
    assert bwd.flops == 2 * fwd.flops + 2 * 8 * 100
    assert formulas.convolution_backward(x, x, w, groups=8, input_grad=False).flops == fwd.flops
    with pytest.raises(LaunchError, match="groups=4.*expected x with 4 channels"):
        formulas.convolution(x, w, x, groups=4)
    with pytest.raises(LaunchError, match="groups=0"):
        formulas.convolution(x, w, x, groups=0)


def test_depthwise_convnet_backward_is_counted_with_its_groups():
    model, inputs = hm.convnet()
    counts = profile.count_ops(profile.make_step(model, inputs, train=True))
    fwd = {shapes[1]: c.flops for (op, shapes), c in counts.items() if op == "aten::convolution"}
    stem, dw, pw = (tuple(m.weight.shape) for m in (model.stem, model.depthwise, model.pointwise))
    # The stem's input needs no gradient: only its weight gradient is computed.
    expected = fwd[stem] + 2 * fwd[dw] + 2 * fwd[pw]
    assert flops_of(counts, "aten::convolution_backward") == expected
    x = (hm.BATCH, hm.STEM, hm.IMAGE, hm.IMAGE)
    assert fwd[dw] == formulas.convolution(x, dw, x, groups=hm.STEM).flops


@pytest.fixture(scope="module")
def convnet_profile():
    model, inputs = hm.convnet()
    return profile.profile_model(model, inputs, steps=2, warmup=1, ceilings=CEIL, device="cpu", name="convnet")


def test_each_convolution_is_its_own_row_with_its_own_bound_and_tip(convnet_profile):
    rows = {o.shapes[1]: o for o in convnet_profile.ops if o.op == "aten::convolution"}
    model = hm.DepthwiseConvNet()
    stem, dw, pw = (rows[tuple(m.weight.shape)] for m in (model.stem, model.depthwise, model.pointwise))
    assert dw.m.intensity < 3 and dw.bound == "memory"  # 2 FLOPs per tap, each element read and written once
    assert stem.bound == "compute" and pw.bound == "compute" and pw.m.intensity > 15
    assert dw.tip.split(":")[0] != pw.tip.split(":")[0]
    assert "2x64x16x16, 64x1x3x3" in dw.label
    for o in (stem, dw, pw):
        assert o.m.config["shapes"] == profile.shapes_text(o.shapes) and o.m.config["model"] == "convnet"
    assert math.fsum(o.share for o in convnet_profile.ops) == pytest.approx(1.0)


def test_compare_pairs_only_the_same_model_at_the_same_shapes(tmp_path, convnet_profile):
    model, inputs = hm.mixer()
    mixer = profile.profile_model(model, inputs, steps=1, warmup=1, ceilings=CEIL, device="cpu", name="mixer")
    db = tmp_path / "r.sqlite"
    with Store(db) as st:
        runs = {}
        for label, p in (("convnet", convnet_profile), ("mixer", mixer), ("convnet again", convnet_profile)):
            runs[label] = st.start_run(device=p.device, ceilings=CEIL, label=label)
            for o in p.ops:
                if o.counted:
                    st.append(runs[label], o.m)
        both = [o.op for o in mixer.ops if o.counted and o.op in {c.op for c in convnet_profile.ops if c.counted}]
        assert "aten::mean" in both  # the op the old comparison paired across the two models
        cmp = st.compare("convnet", "mixer")
        assert not cmp.comparable and cmp.paired == []
        assert "not comparable" in cmp.notes[0] and "model convnet" in cmp.notes[0] and "model mixer" in cmp.notes[0]
        same = st.compare(runs["convnet"], "convnet again")
        assert same.comparable and len(same.paired) == len(same.rows) == sum(o.counted for o in convnet_profile.ops)
        assert len({r.config["shapes"] for r in same.paired if r.name == "aten::convolution"}) == 3

    from tilestack.cli import _register, app

    _register()
    r = CliRunner().invoke(app, ["compare", "convnet", "mixer", "--db", str(db)])
    assert r.exit_code == 1 and "not comparable" in r.output and "model mixer" in r.output


def test_tips_speak_of_the_device_at_hand():
    model, inputs = hm.mixer()
    p = profile.profile_model(model, inputs, steps=1, warmup=1, ceilings=CEIL, device="cpu", train=True)
    tips = [o.tip for o in p.ops]
    assert all(o.m.device_kind == "cpu" for o in p.ops)
    assert not [t for t in tips if GPU_WORDS.search(t)]
    # Every situation has a CPU tip and a GPU tip; only the GPU's speak of GPU things.
    assert set(roofline.TIPS["cuda"]) <= set(roofline.TIPS["cpu"])  # every GPU situation has its CPU words
    for kind in ("cpu", "cuda"):
        for situation in roofline.TIPS[kind]:
            text = roofline.tips_for(kind)[situation]
            assert text and (kind == "cuda" or not GPU_WORDS.search(text)), (kind, situation)
    tiny = dict(flops=1e6, bytes_moved=1e6, seconds=3e-6, roof=roofline.Roof(1e13, 3e12))  # 11% of bandwidth
    assert "CUDA graph" in roofline.place(**tiny, kind="cuda").tip
    assert roofline.place(**tiny, kind="cpu").tip.startswith("overhead-bound")
    # Far below the roof on a CPU, and not short: the time is not in the work (a busy or oversubscribed machine).
    far = dict(flops=1e6, bytes_moved=1e6, seconds=0.07, roof=roofline.Roof(1e11, 5e9))
    assert "not in its work" in roofline.place(**far, kind="cpu").tip
    assert "not in its work" not in roofline.place(**far, kind="cuda").tip


def test_a_small_transformer_counts_causal_attention_and_its_backward():
    model, inputs = hm.transformer()
    p = profile.profile_model(model, inputs, steps=2, warmup=1, ceilings=CEIL, device="cpu", train=True)
    ops = {o.op: o for o in p.ops}
    b, h, n, d = hm.BATCH, hm.HEADS, hm.TOKENS, hm.DIM // hm.HEADS
    fwd = ops["aten::_scaled_dot_product_flash_attention_for_cpu"]
    assert fwd.m.flops == 4 * b * h * n * n * d * formulas.CAUSAL_FRACTION
    bwd = ops["aten::_scaled_dot_product_flash_attention_for_cpu_backward"]
    assert bwd.counted and bwd.m.flops == formulas.ATTENTION_BWD_OVER_FWD * fwd.m.flops
    assert len(p.step_times_s) == 2 and p.step_rel_ci is not None
    assert all(o.m.latency_rel_ci is not None for o in p.ops if o.op != profile.OTHER)


def test_profile_command_on_a_model_it_has_never_seen(tmp_path, cache_dir):
    from tilestack.cli import _register, app

    _register()
    target = f"{Path(hm.__file__)}:mixer"
    r = CliRunner().invoke(app, ["profile", target, "--steps", "2", "--warmup", "1", "--device", "cpu", "--top", "8"])
    assert r.exit_code == 0, r.output
    assert "input shapes" in r.output and "roofs measured" in r.output and "hot spots" in r.output
    assert not GPU_WORDS.search(r.output.replace(str(tmp_path), "")), r.output
    with Store() as st:
        ms = st.measurements("latest")
    assert ms and {m.config["model"] for m in ms} == {"heldout_models:mixer"}
    assert all(m.device_kind == "cpu" and m.latency_rel_ci is not None for m in ms)


class EveryThirdStepSlow(nn.Module):
    """A linear layer, and on every third call a large matmul as well: steps of two lengths, like a busy host's."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(32, 32)
        # the calls counted by an iterator, which a profile does not rewind (it starts every step from the state
        # the warm-up left: a counter attribute would read the same in every step, and no step would be slow)
        self.calls = itertools.count(1)
        self.big = torch.randn(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 32)
        if next(self.calls) % 3 == 0:
            x = x + (self.big @ self.big).sum() * 0  # the slow step's extra work
        return self.lin(x)


def test_profile_rounds_go_on_until_the_step_time_is_known_or_the_budget_is_spent():
    import time

    # A profile first, so that what the first one in a process pays (the profiler's start, lazy imports: 26 s of
    # wall time for 1.4 s of CPU on a machine at load 16, against 1.1 s for the next) is not in the budget: the
    # budget (wall time) then stopped the first round, which this test needs to see go on.
    profile.profile_model(nn.Linear(2, 2), (torch.randn(1, 2),), steps=1, warmup=0, ceilings=CEIL, device="cpu")
    model = EveryThirdStepSlow()
    budget_s = 3.0  # the second round is started only where the first took under half of it (0.3 s at load 16)
    w0, c0 = time.perf_counter(), time.process_time()
    p = profile.profile_model(model, (torch.randn(4, 32),), warmup=0, ceilings=CEIL, device="cpu", budget_s=budget_s)
    # the budget, plus counting: CPU time of the steps (two threads at most), wall time only against a runaway
    cpu_s, wall_s = time.process_time() - c0, time.perf_counter() - w0
    assert cpu_s < 5 * budget_s and wall_s < 20 * budget_s, (cpu_s, wall_s)
    assert p.steps > profile.ROUND_STEPS and len(p.step_times_s) == p.steps  # one round was not enough
    # The median step is a fast one: the slow third of the steps does not set the profile. step_s is the sum of
    # each op's median over the steps, not the median step's total: on a busy machine the ops' jitter makes it
    # a few percent above the median step (+1.1% seen with both cores busy), far below a slow step's 300x.
    slow = sorted(p.step_times_s)[-(p.steps // 3):]
    assert p.step_s <= statistics.median(p.step_times_s) * 1.25 < min(slow)
    assert p.step_s < statistics.fmean(p.step_times_s)
    with pytest.raises(profile.ProfileError, match="budget_s=0"):
        profile.profile_model(model, (torch.randn(4, 32),), ceilings=False, device="cpu", budget_s=0)
