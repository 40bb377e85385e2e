"""Second held-out round for the model profiler (tests/perf/perf_models_round2.py): recurrent nets, masked
transformers, 1-d/3-d/transposed/grouped/dilated convolutions, EmbeddingBag, top-k mixture of experts, in-place
and out= ops, batch norm, structured outputs, int/bool/keyword inputs, SDPA masks, einsum and friends, no_grad
and inference_mode inside forward, torch.compile, empty forwards, huge-but-cheap shapes, batch size 0.

FLOPs are compared with torch.utils.flop_counter.FlopCounterMode op by op, exactly: for an op torch counts,
both apply the same registered formula to the same ATen call, so any difference means the profiler saw the op
at another level (a composite it did not decompose) or not at all. The documented exceptions are checked
against hand formulas instead: a convolution's bias (one add per output element, which torch leaves out), a
grouped convolution's backward (torch counts its weight gradient as if groups were 1) and CPU attention and
LSTM kernels (torch counts nothing for them).
"""

import collections
import io
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

from tilestack import perf
from tilestack.errors import LaunchError
from tilestack.perf import formulas, profile
from tilestack.perf.profile import ProfileError

sys.path.insert(0, str(Path(__file__).parent))
import perf_models_round2 as pm  # noqa: E402
from profile_support import CEIL, REL, TORCH_COUNTED, Profiles, by_op, cases, torch_by_op  # noqa: E402

# Ops where tilestack's count differs from torch's on purpose, per model (checked by hand formulas below).
DEVIATIONS = {
    "convs": {"aten::convolution_backward"},  # grouped: torch ignores groups in the weight gradient
    "convs_bias": {"aten::convolution", "aten::convolution_backward"},  # + the bias's adds, + groups
    "sparse_matmul": {"aten::mm"},  # the backward's COO operand: its stored elements (round 5), torch: dense
}
CASES, IDS = cases(pm.MODELS)
profiled = Profiles(pm.MODELS)


@pytest.mark.parametrize("name,train", CASES, ids=IDS)
def test_profile_rows_add_up_agree_with_torch_and_stay_finite(name, train):
    p, counts, theirs = profiled(name, train)
    ours = by_op(counts)
    # Rows (and counted ops that got no time of their own) add up to what the counting pass counted.
    counted_flops = math.fsum(c.flops for c in counts.values())
    counted_bytes = math.fsum(c.bytes_read + c.bytes_written for c in counts.values())
    # The timed rows alone carry every counted FLOP: a counted op the profiler ran inside another (autograd's
    # clone inside mul_) or as its twin (add counted, add_ timed) is folded into that row, work and time alike.
    # Where plain eager runs another op than the counting pass saw (F.max_pool1d on a CPU tensor needing no grad
    # has its own kernel, but decomposes to max_pool2d_with_indices under a dispatch mode), the counted op is
    # folded into the composite it ran inside.
    rows_flops = math.fsum(o.m.flops * o.calls for o in p.ops)
    untimed_flops = math.fsum(u.flops for u in p.untimed)
    assert rows_flops + untimed_flops == pytest.approx(counted_flops, rel=REL, abs=1e-6)
    assert p.flops == pytest.approx(rows_flops + untimed_flops, rel=REL, abs=1e-6)
    assert untimed_flops == 0, p.untimed  # what stays apart moves bytes only
    assert p.bytes == pytest.approx(counted_bytes, rel=REL, abs=1e-6)
    # Every op torch counts, tilestack counts the same (never 0 where torch has a number).
    for op, n in theirs.items():
        if op not in DEVIATIONS.get(name, ()):
            assert ours.get(op, 0.0) == n, (op, ours.get(op), n)
    for op in set(ours) & TORCH_COUNTED - DEVIATIONS.get(name, set()):
        assert ours[op] == theirs.get(op, 0), op
    # Finite, non-negative numbers in every row; a bound for every counted row.
    for o in p.ops:
        m = o.m
        for v in (m.flops, m.bytes_read, m.bytes_written, m.intensity, m.flops_per_s, m.bytes_per_s):
            assert math.isfinite(v) and v >= 0, (o.label, v)
        assert math.isfinite(m.latency_s) and m.latency_s > 0 and o.calls >= 0
        if o.counted and o.flops_known:
            assert o.bound in ("memory", "compute") and o.tip
            assert o.roof_fraction is not None and math.isfinite(o.roof_fraction) and o.roof_fraction >= 0
        elif not o.flops_known:  # bytes alone would call it memory-bound: the bound is not claimed
            assert o.bound == "unknown" and o.roof_fraction is None and o.op in p.unsupported
    if p.ops:
        assert math.fsum(o.share for o in p.ops) == pytest.approx(1.0)
    out = io.StringIO()
    profile.print_profile(p, con=Console(file=out, width=1000))  # renders: notes, hot spots, the table
    assert p.name in out.getvalue()
    if p.unsupported:
        assert f"no FLOP formula for {', '.join(p.unsupported)}" in out.getvalue()
    assert set(p.unsupported) == {op for (op, _), c in counts.items() if c.unsupported}


def test_cpu_lstm_is_counted_as_its_matmuls():
    """torch counts nothing for the fused CPU LSTM (mkldnn_rnn_layer); tilestack counts its matmuls, which is
    what torch counts for the same LSTM run unfused (oneDNN off)."""
    p, counts, theirs = profiled("lstm", False)
    assert "aten::mkldnn_rnn_layer" in by_op(counts) and not theirs  # torch: 0 FLOPs
    model, (x,) = pm.lstm()
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):  # the unfused path: addmm and mm
        unfused = sum(torch_by_op(lambda: model(x)).values())
    fused = by_op(counts)["aten::mkldnn_rnn_layer"]
    assert fused == unfused > 0
    # By hand: per layer and direction, 2 * B * T * (4H * I_layer + 4H * H); layer 1 reads both directions.
    b, t, i, h, g = pm.BATCH, pm.SEQ, pm.FEAT, pm.HIDDEN, pm.LSTM_GATES
    assert fused == 2 * sum(2 * b * t * (g * h * width + g * h * h) for width in (i, 2 * h))
    _, train_counts, _ = profiled("lstm", True)
    backward = by_op(train_counts)["aten::mkldnn_rnn_layer_backward"]
    assert backward == formulas.MATMUL_BWD_OVER_FWD * fused


@pytest.mark.parametrize("name", ["sdpa_causal", "sdpa_bool_mask", "sdpa_float_mask"])
def test_attention_with_masks_is_counted_as_the_math_path_counts_it(name):
    """The CPU flash kernel is not in torch's registry; torch's math path (bmm) is: the same FLOPs, halved by
    is_causal (tilestack's convention); an explicit mask, even a triangular one, costs the full product."""
    p, counts, _ = profiled(name, False)
    ours = by_op(counts).get("aten::_scaled_dot_product_flash_attention_for_cpu", 0.0)
    model, (x,) = pm.MODELS[name][0]()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        math_path = torch_by_op(lambda: model(x))
    attention = math_path.get("aten::bmm", 0)
    assert attention == 4 * pm.BATCH * pm.HEADS * 6 * 6 * (pm.DIM // pm.HEADS)
    assert ours == attention * (formulas.CAUSAL_FRACTION if name == "sdpa_causal" else 1)
    _, train_counts, _ = profiled(name, True)
    bwd = by_op(train_counts)["aten::_scaled_dot_product_flash_attention_for_cpu_backward"]
    assert bwd == formulas.ATTENTION_BWD_OVER_FWD * ours


def test_convolutions_by_hand():
    model, inputs = pm.convs_bias()
    _, counts, theirs = profiled("convs_bias", False)
    a, b, c = inputs
    bias_adds = sum(conv(x).numel() for conv, x in ((model.c1, a), (model.c3, b), (model.ct, c), (model.dw, c)))
    assert by_op(counts)["aten::convolution"] == theirs["aten::convolution"] + bias_adds
    # No input needs a gradient: each backward is the weight gradient alone, as many FLOPs as its forward
    # (torch's own count of the grouped ones is larger: it ignores groups).
    _, train_counts, train_theirs = profiled("convs", True)
    ours = by_op(train_counts)
    assert ours["aten::convolution_backward"] == ours["aten::convolution"] == train_theirs["aten::convolution"]
    assert train_theirs["aten::convolution_backward"] > ours["aten::convolution_backward"]


def test_gathers_and_scatters_count_their_work_and_bytes():
    _, counts, _ = profiled("moe", False)
    index_add = [(k, c) for k, c in counts.items() if k[0] == "aten::index_add_"]
    assert math.fsum(c.flops for _, c in index_add) == pm.TOKENS * pm.TOP_K * pm.DIM  # one add per routed value
    _, counts, _ = profiled("bag", False)
    (bag,) = [c for (op, _), c in counts.items() if op == "aten::_embedding_bag"]
    # every looked-up row added into its bag, then each of the 3 mean bags divided by its size (round 18)
    assert bag.flops == 10 * pm.BAG_DIM + 3 * pm.BAG_DIM
    # A 64 MiB table looked up for 8 tokens reads 8 rows, not the table; an expanded view reads what it holds.
    p, counts, _ = profiled("huge_but_cheap", False)
    (emb,) = [c for (op, _), c in counts.items() if op == "aten::embedding"]
    tokens = pm.BATCH * 4
    assert emb.bytes_read == tokens * pm.BAG_DIM * 4 + tokens * 8
    (mul,) = [c for (op, _), c in counts.items() if op == "aten::mul"]
    assert mul.bytes_read == pm.BAG_DIM * 4  # one held row of the 2**30-row view (2.0 is a Python scalar)
    assert p.bytes < 1e5


def test_batch_norm_counts_statistics_only_in_training():
    elements = pm.BATCH * 8 * 6 * 6
    for name, step, per_element in (
        ("batchnorm_train", False, formulas.BATCHNORM_TRAIN_FLOPS_PER_ELEMENT),  # native_batch_norm (no_grad)
        ("batchnorm_train", True, formulas.BATCHNORM_TRAIN_FLOPS_PER_ELEMENT),  # _native_batch_norm_legit
        ("batchnorm_eval", False, formulas.BATCHNORM_EVAL_FLOPS_PER_ELEMENT),  # native_batch_norm(training=False)
        ("batchnorm_eval", True, formulas.BATCHNORM_EVAL_FLOPS_PER_ELEMENT),  # _native_batch_norm_legit_no_training
    ):
        _, counts, _ = profiled(name, step)
        norm = [c for (op, _), c in counts.items() if "batch_norm" in op and "backward" not in op]
        assert len(norm) == 1 and norm[0].flops == per_element * elements, (name, step)


def test_pools_count_one_operation_per_tap():
    p, counts, _ = profiled("pools", False)
    ops = by_op(counts)
    b = pm.BATCH
    pooled_1d = [c.flops for (op, shapes), c in counts.items() if op.startswith("aten::max_pool") and shapes == (
        (b, 4, 1, 9),)]  # max_pool1d, as the counting pass sees it: a 2-d pool over (B, C, 1, L)
    assert pooled_1d == [3 * b * 4 * 4]  # L 9 -> 4, 3 taps each
    (row,) = [o for o in p.ops if o.op == "aten::max_pool1d"]  # eager ran max_pool1d's own kernel: its row
    assert row.counted and row.m.flops * row.calls == 3 * b * 4 * 4 and not p.untimed
    assert ops["aten::avg_pool2d"] == 2 * 2 * b * 4 * 3 * 3
    assert ops["aten::max_pool3d_with_indices"] == 1 * 2 * 2 * 1 * 2 * 3 * 2 * 2
    assert counts["aten::max_pool2d_with_indices", ((b, 4, 6, 6),)].flops == 3 * 3 * b * 4 * 6 * 6
    assert ops["aten::_adaptive_avg_pool2d"] == b * 4 * 6 * 6  # each input element added once
    assert p.unsupported == ()


def test_norm_backwards_count_each_gradient_they_compute():
    f = formulas
    full = (
        f.NORM_BWD_RECOMPUTE_FLOPS_PER_ELEMENT + f.NORM_BWD_INPUT_FLOPS_PER_ELEMENT
        + f.NORM_BWD_WEIGHT_FLOPS_PER_ELEMENT + f.NORM_BWD_BIAS_FLOPS_PER_ELEMENT
    )
    frozen = full - f.NORM_BWD_INPUT_FLOPS_PER_ELEMENT + f.NORM_BWD_FROZEN_INPUT_FLOPS_PER_ELEMENT
    elements = pm.BATCH * 8 * 6 * 6
    for name, per_element in (("batchnorm_train", full), ("batchnorm_eval", frozen)):
        p, counts, _ = profiled(name, True)
        (bwd,) = [c for (op, _), c in counts.items() if op == "aten::native_batch_norm_backward"]
        assert bwd.flops == per_element * elements and not p.unsupported, name
    # Two layers, each with two layer norms over (B, N, D) with x, weight and bias all trainable.
    p, counts, _ = profiled("encoder", True)
    layer_norms = [c for (op, _), c in counts.items() if op == "aten::native_layer_norm_backward"]
    assert math.fsum(c.flops for c in layer_norms) == 2 * 2 * full * pm.BATCH * 6 * pm.DIM
    assert p.unsupported == ()


def test_ops_without_a_formula_are_reported_not_shown_as_free():
    p, counts, theirs = profiled("unsupported", False)
    uncounted = "aten::linalg_matrix_exp"
    assert uncounted in p.unsupported and uncounted not in theirs  # torch has no number either
    row = next(o for o in p.ops if o.op == "aten::linalg_matrix_exp")
    assert not row.flops_known and row.m.bytes > 0
    assert row.bound == "unknown" and row.roof_fraction is None and row.tip == profile.NO_FORMULA_TIP
    assert row.m.config["flops"] == "no formula"  # what the store keeps: its 0 FLOPs are not a count
    table = {r[0]: r for r in profile.profile_rows(p)}
    assert table["aten::linalg_matrix_exp"][profile.PROFILE_COLUMNS.index("FLOPs/step")] == profile.UNKNOWN_FLOPS
    assert any("no FLOP formula for aten::linalg_matrix_exp" in line for line in profile.notes(p))
    # A copy is no arithmetic, though torch tags clone pointwise.
    _, gru_counts, _ = profiled("gru", True)
    clones = [c for (op, _), c in gru_counts.items() if op == "aten::clone"]
    assert clones and all(c.flops == 0 and c.bytes_written > 0 for c in clones)
    # Known ops with zero FLOPs are not reported: views, copies, the sum's reduction is counted.
    clean, _, _ = profiled("products", True)
    assert clean.unsupported == ()


def test_sparse_and_nested_tensors_are_profiled_and_their_kernels_reported():
    p, counts, _ = profiled("sparse_matmul", False)
    (sparse,) = [c for (op, _), c in counts.items() if op == "aten::_sparse_addmm"]
    model, (a,) = pm.sparse_matmul()
    # torch.sparse.mm had no formula (reported uncounted) until round 5: a multiply-add per stored element and column
    assert "aten::_sparse_addmm" not in p.unsupported and sparse.flops == 2 * a._nnz() * model.w.shape[1]
    held = a._indices().numel() * 8 + a._values().numel() * 4  # a COO tensor holds its indices and values
    assert sparse.bytes_read >= held and math.isfinite(sparse.bytes_read)
    # The encoder's fast path runs fused kernels on nested tensors: profiled, each named as uncounted.
    model, inputs = pm.encoder_nested()
    p = profile.profile_model(model, inputs, steps=1, warmup=1, ceilings=CEIL, device="cpu", fastpath=True)
    assert "aten::_transformer_encoder_layer_fwd" in p.unsupported
    assert all(math.isfinite(o.m.bytes) and math.isfinite(o.m.intensity) for o in p.ops)
    assert any("no FLOP formula for" in line and "_transformer_encoder_layer_fwd" in line for line in profile.notes(p))


def test_no_grad_and_inference_mode_inside_forward_count_like_torch():
    """Under inference_mode a linear reaches the dispatch mode whole: it is counted as the matmul it runs."""
    p, counts, theirs = profiled("no_grad_inside", False)
    ours = by_op(counts)
    assert ours.get("aten::linear", 0.0) == 0 and ("aten::linear", ()) not in counts
    assert sum(v for op, v in ours.items() if op in TORCH_COUNTED) == sum(theirs.values())
    assert sum(theirs.values()) == 3 * formulas.matmul(3, pm.FEAT, pm.FEAT).flops  # three linears of 3 rows


def test_empty_forwards_and_batch_zero():
    for name in ("identity", "nothing"):
        p, _, _ = profiled(name, False)
        assert p.flops == 0 and p.bytes == 0
        assert all(math.isfinite(o.m.intensity) for o in p.ops)
        if not p.ops:
            assert "ran no ATen op" in " ".join(profile.notes(p))
        # Profiled until known: a step of no ops is known at once (0 s), not profiled until the budget is spent.
        model, inputs = pm.MODELS[name][0]()
        until = profile.profile_model(model, inputs, warmup=0, ceilings=CEIL, device="cpu", budget_s=30)
        assert until.steps == profile.ROUND_STEPS and until.step_rel_ci is None
    for train in (False, True):
        p, _, _ = profiled("batch_zero", train)
        matmuls = [o for o in p.ops if o.op in ("aten::addmm", "aten::mm", "aten::convolution")]
        assert all(o.m.flops == 0 for o in matmuls)
        assert all(o.m.intensity == 0 for o in p.ops if o.m.bytes == 0)


FORWARD_CALLS: collections.Counter = collections.Counter()  # Counting's calls, by instance


class Counting(nn.Module):
    """Counts its forward calls: a refused argument must be refused before any. The count is kept outside the
    module (a profile puts back the module's own attributes, a counter among them, as they were)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(pm.FEAT, pm.FEAT)
        self.calls = 0  # a new instance may have a freed one's id

    @property
    def calls(self) -> int:
        return FORWARD_CALLS[id(self)]

    @calls.setter
    def calls(self, n: int) -> None:
        FORWARD_CALLS[id(self)] = n

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        FORWARD_CALLS[id(self)] += 1
        return self.lin(x)


X = torch.randn(2, pm.FEAT)
BAD_ARGUMENTS = [
    ({"model": "resnet"}, r"model='resnet' \(str\); expected a torch.nn.Module or a callable"),
    ({"model": None}, r"model=None \(NoneType\); expected"),
    ({"inputs": 5}, r"inputs=5 \(int\); expected a tensor, a tuple or list"),
    ({"inputs": None}, r"inputs=None \(NoneType\); expected a tensor"),
    ({"inputs": np.zeros((2, pm.FEAT))}, r"inputs=.* \(ndarray\); expected torch tensors \(torch.from_numpy"),
    ({"inputs": {0: X}}, r"inputs=\{0: tensor 2x8 float32\} \(dict\); expected a dict whose keys are the names"),
    ({"inputs": (X, X, X)}, r"inputs=\(tensor 2x8 float32, .*\) do not fit Counting.forward\(x.*too many"),
    ({"inputs": {"z": X}}, r"inputs=\{'z': tensor 2x8 float32\} do not fit Counting.forward.*'x'"),
    ({"inputs": ()}, r"inputs=\(\) do not fit Counting.forward.*missing a required argument: 'x'"),
    ({"steps": 2.5}, r"steps=2.5 \(float\); expected an int >= 1"),
    ({"steps": True}, r"steps=True \(bool\); expected an int >= 1"),
    ({"steps": 0}, r"steps=0 \(int\); expected an int >= 1"),
    ({"warmup": -1}, r"warmup=-1 \(int\); expected an int >= 0"),
    ({"warmup": "2"}, r"warmup='2' \(str\); expected an int >= 0"),
    ({"train": "yes"}, r"train='yes' \(str\); expected True or False"),
    ({"budget_s": 0}, r"budget_s=0 \(int\); expected a positive, finite time budget"),
    ({"budget_s": float("nan")}, r"budget_s=nan \(float\); expected a positive"),
    ({"ceilings": "fast"}, r"ceilings='fast' \(str\); expected a perf.Ceilings"),
    ({"device": 1.5}, r"device=1.5 \(float\); expected 'cpu', 'cuda'"),
    ({"name": 7}, r"name=7 \(int\); expected a str"),
]


BAD_IDS = [",".join(f"{k}-{type(v).__name__}-{i}" for k, v in kw.items()) for i, (kw, _) in enumerate(BAD_ARGUMENTS)]


@pytest.mark.parametrize("kwargs,message", BAD_ARGUMENTS, ids=BAD_IDS)
def test_bad_arguments_are_refused_before_any_work(kwargs, message):
    model = Counting()
    args = {"model": model, "inputs": (X,), "steps": 1, "warmup": 1, "ceilings": CEIL, "device": "cpu", **kwargs}
    with pytest.raises(ProfileError, match=message):
        profile.profile_model(args.pop("model"), args.pop("inputs"), **args)
    assert model.calls == 0


def test_tensors_off_the_profiled_device_are_refused_before_any_work():
    model = Counting()
    with pytest.raises(ProfileError, match=r"inputs on meta; expected the model and its inputs on the profiled"):
        profile.profile_model(model, (torch.empty(2, pm.FEAT, device="meta"),), ceilings=CEIL, device="cpu")
    with pytest.raises(ProfileError, match=r"model parameters on meta; expected .* \(cpu\)"):
        profile.profile_model(Counting().to("meta"), (X,), ceilings=CEIL, device="cpu")
    assert model.calls == 0
    profile.profile_model(model, (X, torch.tensor(1.0)), steps=1, warmup=0, ceilings=CEIL)  # 0-dim: fine


def test_train_without_anything_to_differentiate_and_mismatched_shapes():
    ident = pm.Identity()
    with pytest.raises(ProfileError, match="train=True, but model Identity has no parameter that requires grad"):
        profile.profile_model(ident, (X,), train=True, ceilings=CEIL, device="cpu")
    model = Counting()
    with torch.no_grad(), pytest.raises(ProfileError, match="train=True, but gradients are off"):
        profile.profile_model(model, (X,), train=True, ceilings=CEIL, device="cpu")
    with torch.inference_mode():  # a forward profile inside inference_mode counts its linears as torch does
        p = profile.profile_model(model, (X,), steps=1, warmup=0, ceilings=CEIL, device="cpu")
    assert p.flops >= formulas.matmul(2, pm.FEAT, pm.FEAT).flops and model.calls > 0
    model.calls = 0
    with pytest.raises(ProfileError, match=r"raised RuntimeError during the warm-up: .*inputs=\(tensor 2x5 float32,\)"):
        profile.profile_model(model, (torch.randn(2, 5),), ceilings=CEIL, device="cpu")
    assert model.calls == 1  # the first forward, in the warm-up, raised


def test_a_compiled_module_stays_compiled_and_counts_as_its_eager_self():
    model, (x,) = pm.products()
    compiled = torch.compile(model, backend="aot_eager")
    p = profile.profile_model(compiled, (x,), steps=1, warmup=1, ceilings=CEIL, device="cpu")
    eager, _, _ = profiled("products", False)
    assert p.flops == eager.flops > 0
    with torch.profiler.profile() as prof, torch.no_grad():
        compiled(x)
    assert any(e.name.startswith("Torch-Compiled Region") for e in prof.events())  # profiling did not undo it


def test_profile_command_reports_what_it_cannot_count(tmp_path):
    from tilestack.cli import _register, app

    _register()
    runner = CliRunner()
    target = f"{Path(pm.__file__)}:unsupported"
    r = runner.invoke(app, ["profile", target, "--steps", "1", "--warmup", "1", "--device", "cpu", "--no-store"])
    assert r.exit_code == 0, r.output
    assert "no FLOP formula for aten::linalg_matrix_exp" in r.output
    r = runner.invoke(app, ["profile", f"{Path(pm.__file__)}:identity", "--train", "--steps", "1", "--device", "cpu"])
    assert r.exit_code == 1 and "train=True, but model Identity" in r.output
    r = runner.invoke(app, ["profile", f"{Path(pm.__file__)}:lstm", "--device", "tpu", "--steps", "1", "--no-store"])
    assert r.exit_code == 1 and "device='tpu'; expected 'cpu', 'cuda'" in r.output and r.exception is not None
    assert isinstance(r.exception, SystemExit)  # a clean exit, not torch's RuntimeError


BAD_NUMBERS = [
    (
        lambda: perf.compute_metrics(name="mm", latency_s=1e-3, flops="2e9", bytes_read=0, bytes_written=0),
        perf.MetricsError,
        r"flops='2e9' \(str\) for 'mm'; expected a finite count >= 0",
    ),
    (
        lambda: perf.compute_metrics(name="mm", latency_s=1e-3, flops=torch.tensor(2.0), bytes_read=0, bytes_written=0),
        perf.MetricsError,
        r"flops=tensor\(2\.\) \(Tensor\) for 'mm'",
    ),
    (
        lambda: perf.compute_metrics(name="mm", latency_s="1ms", flops=1, bytes_read=0, bytes_written=0),
        perf.MetricsError,
        r"latency_s='1ms' \(str\) for 'mm'; expected a positive time in seconds",
    ),
    (
        lambda: perf.compute_metrics(name=3, latency_s=1e-3, flops=1, bytes_read=0, bytes_written=0),
        perf.MetricsError,
        r"name=3 \(int\); expected the kernel's name as a str",
    ),
    (
        lambda: perf.compute_metrics(name="mm", latency_s=1e-3, flops=1, bytes_read=0, bytes_written=0, roofs="h100"),
        perf.MetricsError,
        r"roofs='h100' \(str\); expected perf.roofs_for",
    ),
    (
        lambda: perf.measure(None, args_sets=None, flops=1, bytes_read=0, bytes_written=0, name="f", device="cpu"),
        perf.MetricsError,
        r"fn=None \(NoneType\); expected the callable to time",
    ),
    (
        lambda: perf.measure(print, args_sets="ab", flops=1, bytes_read=0, bytes_written=0, name="f", device="cpu"),
        perf.MetricsError,
        r"args_sets='ab' \(str\); expected a list of argument tuples",
    ),
    (
        lambda: perf.measure(print, args_sets=None, flops=-1, bytes_read=0, bytes_written=0, name="f", device="cpu"),
        perf.MetricsError,
        r"flops=-1 \(int\) for 'f'; expected a finite count >= 0",
    ),
    (
        lambda: perf.place(flops=1, bytes_moved=1, seconds=0, roof=perf.Roof(1e12, 1e11)),
        perf.RooflineError,
        r"seconds=0 \(int\); expected a positive, finite time",
    ),
    (
        lambda: perf.place(flops=-5, bytes_moved=1, seconds=1, roof=perf.Roof(1e12, 1e11)),
        perf.RooflineError,
        r"flops=-5 \(int\); expected a finite count >= 0",
    ),
    (
        lambda: perf.place(flops=1, bytes_moved=1, seconds=1, roof=None),
        perf.RooflineError,
        r"roof=None \(NoneType\); expected a roofline.Roof",
    ),
    (lambda: formulas.matmul("64", 64, 64), LaunchError, r"m='64' \(str\); expected a positive whole size"),
    (lambda: formulas.matmul(64, 2.5, 64), LaunchError, r"n=2.5 \(float\); expected a positive whole size"),
    (lambda: formulas.attention(1, 2, 0, 4, 8), LaunchError, r"n_q=0 \(int\); expected a positive whole size"),
    (
        lambda: formulas.convolution("2x3x8x8", (4, 3, 3, 3), (2, 4, 6, 6)),
        LaunchError,
        r"x_shape='2x3x8x8'.*expected sequences of ints",
    ),
]


BAD_NUMBERS += [
    (lambda: profile.load_target(42), ProfileError, r"target=42 \(int\); expected 'path/to/script.py\[:fn\]'"),
    (lambda: profile.count_ops("model"), ProfileError, r"step='model' \(str\); expected a callable"),
]


@pytest.mark.parametrize("call,error,message", BAD_NUMBERS, ids=[str(i) for i in range(len(BAD_NUMBERS))])
def test_the_rest_of_the_public_api_refuses_bad_arguments_by_name(call, error, message):
    with pytest.raises(error, match=message):
        call()
    assert formulas.matmul(64.0, 64, 64) == formulas.matmul(64, 64, 64)  # a whole float is a size


def test_counting_inside_a_callers_profiler_leaves_their_session_running():
    model, (x,) = pm.products()
    with torch.profiler.profile() as theirs:
        counts = profile.count_ops(lambda: model(x))
        with torch.profiler.record_function("after counting"):
            model(x)
    assert math.fsum(c.flops for c in counts.values()) == math.fsum(
        c.flops for c in profile.count_ops(lambda: model(x)).values()
    ) > 0
    assert any(e.name == "after counting" for e in theirs.events())  # their session outlived the counting
