"""Round six of bad inputs: the entry points rounds 1-5 did not reach or that changed since, each refused with the
error the module already uses, naming the argument and what was given, before any work.

Reached here: ``tilestack.optimize`` / ``torch.compile(backend="tilestack", options=...)`` (the new ``numerics``
option, mode and inner together), ``tilestack.compile.run_passes``, ``QuantLinear``'s constructor,
``InputStats``, ``quant.calibrate``, ``tilestack.quantize``'s calibration, launch options of any kernel
(``kernels.gemm(num_warps=5)``), ``kernels.add_layer_norm``, ``perf.place``'s roof, ``perf.ceilings`` and
``perf.lookup_peaks``, ``perf.time_fn``, ``rotating_sets`` and ``formulas.attention``, the federated ``Task``,
``CFL``, ``IFCA``, ``QFFL``, ``FedDF`` and ``HeteroFL``.
What it found (each row or test failed before its fix):
- QuantLinear took any module (AttributeError), a NaN, negative, str or None x_scale (refused only by the GEMM at
  the first forward, or a bare ValueError/TypeError), an x_scale with int8 weights, mode "fp8-act" without an
  x_scale (a weight-only layer under fp8-act's name), and a NaN, int, complex or meta input_mean (a NaN bias, or
  torch's copy error);
- InputStats took a negative or NaN amax and a list mean; calibrate took names that are no module (KeyError), a
  str of names (iterated by character) and a model that is none (AttributeError);
- quantize with calibration batches that all had no row fixed every activation scale at 1 without a word, and
  took a str or dict as the batches (iterated by character or key), and calibrated a model in training mode as
  such (dropout's scaled inputs, BatchNorm statistics moved); accuracy_cost compared models in training mode
  through dropout's random masks, compared a model quantized in place with itself (error 0) and read a NaN
  output as the other batches' error;
- optimize / the backend ignored mode= and numerics="fused" with inner="eager"/"aot_eager", and let an explicit
  emulate_precision_casts override numerics without a word;
- run_passes took passes=3, an int (TypeError), any gm and a rule of another type;
- kernel launch options no backend takes (num_warps=5 or 0, num_stages=0, num_warps="4") ran on the reference
  backend and failed only on the GPU;
- kernels.add_layer_norm with bias None took the RMS-norm path and failed unpacking its result (AttributeError);
- perf.place under a roof of negative, NaN or infinite rates placed every kernel compute-bound at a negative or
  NaN fraction; perf.ceilings took a str device and non-positive sizes or budgets (AttributeError, or work
  started); lookup_peaks(None) was an AttributeError; time_fn called fn with a tensor's rows for an args set
  that was a tensor, timed an unknown device ('tpu') on the CPU's clock, took a negative warm-up, and a float
  repeats was a TypeError; rotating_sets took a NaN set size and max_sets 0; formulas.attention took
  causal="no" as causal (half the FLOPs);
- federated: Task took a negative Synthetic alpha/beta (refused only once a client ran); CFL took a NaN or
  out-of-range max_cross_similarity (never or always splitting) and non-integer counts; IFCA a float or NaN
  num_clusters (TypeError deep in its constructor) and reseed_after; QFFL a NaN or inf q and learning rate;
  FedDF float counts, an infinite lr, a negative seed (numpy's error) and NaN unlabeled inputs; HeteroFL a str
  or float hidden width and a width_of that is not a function.
torch.compile's own options reach the backend only at the first call, inside Dynamo, which wraps any error in its
BackendCompilerFailed: the tilestack error is its inner exception (checked below), raised before any pass runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import tilestack
import tilestack.compile
from tilestack import config, perf
from tilestack.errors import DeviceError, LaunchError
from tilestack.kernels import add_layer_norm, gemm, softmax
from tilestack.perf.roofline import Roof, RooflineError, place
from tilestack.perf.timing import TimingError, rotating_sets, time_fn
from tilestack.quant import InputStats, QuantLinear, accuracy_cost, calibrate


@dataclasses.dataclass(frozen=True)
class Row:
    call: Callable[[], object]
    error: type[Exception]
    fragment: str


@pytest.fixture(autouse=True)
def reference_backend():
    with config.override(backend="reference"):
        yield


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


# ---- compile -----------------------------------------------------------------------------------------------------
def _compile_rows() -> dict[str, Row]:
    def opt(**kw):
        return tilestack.optimize(mlp(), **kw)

    from tilestack.compile import run_passes

    def passes(**kw):
        return lambda: run_passes(torch.fx.symbolic_trace(mlp()), **kw)

    return {
        "run_passes: gm a module": Row(lambda: run_passes(mlp()), LaunchError,
                                       "gm must be a torch.fx.GraphModule, got Sequential"),
        "run_passes: passes an int": Row(passes(passes=3), LaunchError, "passes=3"),
        "run_passes: passes unknown": Row(passes(passes=["nrom"]), LaunchError, "passes ['nrom'] unknown"),
        "run_passes: check a str": Row(passes(check="yes"), LaunchError, "check='yes'"),
        "run_passes: inner unknown": Row(passes(inner="cuda"), LaunchError, "inner='cuda'"),
        "run_passes: rule a dict": Row(passes(rule={"min_rows": 0}), LaunchError, "rule={'min_rows': 0}"),
        "optimize: numerics None": Row(lambda: opt(numerics=None), LaunchError, "numerics=None"),
        "optimize: numerics upper case": Row(lambda: opt(numerics="EAGER"), LaunchError, "numerics='EAGER'"),
        "optimize: numerics fused with inner eager": Row(lambda: opt(numerics="fused", inner="eager"), LaunchError,
                                                         "numerics='fused' with inner='eager'"),
        "optimize: numerics fused with inner aot_eager": Row(lambda: opt(numerics="fused", inner="aot_eager"),
                                                             LaunchError, "numerics='fused' with inner='aot_eager'"),
        "optimize: mode with inner eager": Row(lambda: opt(mode="max-autotune", inner="eager"), LaunchError,
                                               "mode='max-autotune' with inner='eager'"),
        "optimize: emulate_precision_casts against numerics": Row(
            lambda: opt(numerics="fused", emulate_precision_casts=True), LaunchError,
            "emulate_precision_casts=True contradicts numerics='fused'"),
        "optimize: emulate_precision_casts off under eager numerics": Row(
            lambda: opt(emulate_precision_casts=False), LaunchError, "numerics='eager'"),
        "optimize: min_rows a float": Row(lambda: opt(min_rows=1.5), LaunchError, "min_rows=1.5"),
        "optimize: min_query_rows a bool": Row(lambda: opt(min_query_rows=True), LaunchError, "min_query_rows=True"),
        "optimize: measure an int": Row(lambda: opt(measure=1), LaunchError, "measure=1"),
        "optimize: mode empty": Row(lambda: opt(mode=""), LaunchError, "mode=''"),
    }


@pytest.mark.parametrize("options, fragment", [
    ({"numerics": "fast", "inner": "eager"}, "numerics='fast'"),
    ({"numerics": "fused", "inner": "eager"}, "numerics='fused' with inner='eager'"),
    ({"mode": "reduce-overhead", "inner": "aot_eager"}, "mode='reduce-overhead' with inner='aot_eager'"),
    ({"min_rows": -1, "inner": "eager"}, "min_rows=-1"),
    ({"measure": "no", "inner": "eager"}, "measure='no'"),
], ids=["numerics", "numerics fused eager", "mode aot_eager", "min_rows", "measure"])
def test_torch_compile_options_are_refused_before_any_pass(options, fragment):
    """Dynamo wraps the backend's error in BackendCompilerFailed; inside it is the LaunchError naming the option,
    raised before the passes ran (no report was added)."""
    from torch._dynamo.exc import BackendCompilerFailed

    torch._dynamo.reset()
    before = len(tilestack.compile.reports())
    model = torch.compile(mlp(), backend="tilestack", options=options)
    with pytest.raises(BackendCompilerFailed) as e:
        model(randn(5, 8))
    assert isinstance(e.value.inner_exception, LaunchError), repr(e.value.inner_exception)
    assert fragment in str(e.value.inner_exception)
    assert len(tilestack.compile.reports()) == before


def test_compile_options_that_fit_still_compile():
    torch._dynamo.reset()
    x = randn(5, 8)
    model = mlp()
    want = model(x)
    for kw in (dict(inner="eager", numerics="eager"), dict(inner="eager", mode="default"),
               dict(inner="aot_eager", passes=[])):
        torch._dynamo.reset()
        torch.testing.assert_close(tilestack.optimize(model, **kw)(x), want)
    report = tilestack.compile.run_passes(torch.fx.symbolic_trace(model), passes="norm", inner="eager")
    assert not report.swaps


# ---- quant -------------------------------------------------------------------------------------------------------
def _quant_rows() -> dict[str, Row]:
    lin, x = nn.Linear(8, 6), randn(5, 8)

    def ql(*args, **kw):
        return QuantLinear(lin, *args, **kw)

    def fp8_act(batches):
        return tilestack.quantize(mlp(), "fp8-act", calibration=batches)

    return {
        "QuantLinear: linear None": Row(lambda: QuantLinear(None, "int8"), LaunchError,
                                        "linear must be a torch.nn.Linear, got NoneType"),
        "QuantLinear: linear a Conv1d": Row(lambda: QuantLinear(nn.Conv1d(8, 6, 1), "int8"), LaunchError,
                                            "got Conv1d"),
        "QuantLinear: mode a list": Row(lambda: ql(["int8"]), LaunchError, "mode=['int8']"),
        "QuantLinear: x_scale negative": Row(lambda: ql("fp8", x_scale=-1.0), LaunchError, "x_scale=-1.0"),
        "QuantLinear: x_scale nan": Row(lambda: ql("fp8", x_scale=math.nan), LaunchError, "x_scale=nan"),
        "QuantLinear: x_scale inf": Row(lambda: ql("fp8-act", x_scale=math.inf), LaunchError, "x_scale=inf"),
        "QuantLinear: x_scale a str": Row(lambda: ql("fp8", x_scale="0.5"), LaunchError, "x_scale='0.5'"),
        "QuantLinear: x_scale None": Row(lambda: ql("fp8", x_scale=None), LaunchError, "x_scale=None"),
        "QuantLinear: x_scale subnormal": Row(lambda: ql("fp8", x_scale=1e-40), LaunchError, "x_scale=1e-40"),
        "QuantLinear: x_scale with int8 weights": Row(lambda: ql("int8", x_scale=0.5), LaunchError,
                                                      "x_scale=0.5 with mode='int8'"),
        "QuantLinear: fp8-act without x_scale": Row(lambda: ql("fp8-act"), LaunchError,
                                                    "x_scale=0.0 with mode='fp8-act'"),
        "QuantLinear: input_mean nan": Row(lambda: ql("int8", input_mean=torch.full((8,), math.nan)), LaunchError,
                                           "input_mean (8,) holds NaN or infinite values"),
        "QuantLinear: input_mean inf": Row(lambda: ql("fp8", input_mean=torch.full((8,), -math.inf)), LaunchError,
                                           "input_mean (8,) holds NaN"),
        "QuantLinear: input_mean int64": Row(lambda: ql("int8", input_mean=torch.ones(8, dtype=torch.int64)),
                                             LaunchError, "input_mean has dtype int64"),
        "QuantLinear: input_mean complex": Row(lambda: ql("int8", input_mean=torch.ones(8, dtype=torch.complex64)),
                                               LaunchError, "input_mean has dtype complex64"),
        "QuantLinear: input_mean meta": Row(lambda: ql("int8", input_mean=torch.ones(8, device="meta")),
                                            LaunchError, "input_mean is a meta tensor"),
        "QuantLinear: input_mean 2-d": Row(lambda: ql("int8", input_mean=torch.ones(1, 8)), LaunchError,
                                           "input_mean is (1, 8)"),
        "InputStats: amax negative": Row(lambda: InputStats(-1.0, None), LaunchError, "amax=-1.0"),
        "InputStats: amax nan": Row(lambda: InputStats(math.nan, None), LaunchError, "amax=nan"),
        "InputStats: amax a bool": Row(lambda: InputStats(True, None), LaunchError, "amax=True"),
        "InputStats: mean a list": Row(lambda: InputStats(1.0, [0.0]), LaunchError, "mean is list"),
        "InputStats: mean of ints": Row(lambda: InputStats(1.0, torch.ones(3, dtype=torch.int32)), LaunchError,
                                        "mean is (3,) int32"),
        "calibrate: a name of no module": Row(lambda: calibrate(mlp(), ["3"], [x]), LaunchError,
                                              "names ['3'] are not modules of the model"),
        "calibrate: names one str": Row(lambda: calibrate(mlp(), "0", [x]), LaunchError, "names must be a list"),
        "calibrate: a name an int": Row(lambda: calibrate(mlp(), [0], [x]), LaunchError, "names [0]"),
        "calibrate: model None": Row(lambda: calibrate(None, ["0"], [x]), LaunchError,
                                     "model must be a torch.nn.Module, got NoneType"),
        "quantize: calibration batches without rows": Row(lambda: fp8_act([x[:0], x[:0]]), LaunchError,
                                                          "calibration batches brought no row"),
        "quantize: calibration a str": Row(lambda: fp8_act("batches"), LaunchError, "got str"),
        "accuracy_cost: qmodel is model": Row(lambda: accuracy_cost(*[tilestack.quantize(mlp(), "int8")] * 2, [x]),
                                              LaunchError, "model and qmodel are the same module"),
        "accuracy_cost: batches a str": Row(lambda: accuracy_cost(mlp(), mlp(), "x"), LaunchError, "got str"),
        "quantize: calibration a dict": Row(lambda: fp8_act({"x": x}), LaunchError, "got dict"),
    }


def test_quantlinear_arguments_that_fit_still_quantize():
    lin, x = nn.Linear(8, 6), randn(5, 8)
    mean = torch.zeros(8, dtype=torch.float64)
    for mode, x_scale in (("int8", 0), ("fp8", 0.0), ("fp8", 0.5), ("fp8-act", np.float32(0.5)), ("fp8-act", 1)):
        y = QuantLinear(lin, mode, x_scale, mean)(x)
        assert y.shape == (5, 6) and torch.isfinite(y).all()
    assert InputStats(0.0, None).amax == 0.0 and InputStats(2, torch.zeros(3)).amax == 2


def test_quantize_with_some_empty_calibration_batches_still_calibrates():
    x = randn(6, 8)
    qmodel = tilestack.quantize(mlp(), "fp8-act", calibration=[x[:0], x])
    assert all(m.x_scale > 0 for m in qmodel.modules() if isinstance(m, QuantLinear))


def test_calibration_of_a_model_in_training_mode_runs_it_as_inference():
    """A model left in training mode: its dropout scaled the recorded inputs (x_scale and the bias correction from
    dropped, rescaled activations) and its BatchNorm statistics moved with the calibration batches. Calibration
    now runs every module in eval mode and restores each module's mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 4)).train()
    model[0].eval()                                          # a mix of modes, restored as it was
    stats_before = model[1].running_mean.clone()
    x = randn(32, 8) * 3 + 1
    with torch.no_grad():
        model.eval()
        want = float(model[2](model[1](model[0](x))).abs().max())   # the last layer's largest input at inference
        model.train()
        model[0].eval()
    stats = calibrate(model, ["3"], [x])
    assert stats["3"].amax == want
    assert torch.equal(model[1].running_mean, stats_before)
    assert [m.training for m in model.modules()] == [True, False, True, True, True]


def test_accuracy_cost_of_models_in_training_mode_compares_inference():
    """Float and quantized models in training mode: dropout made the comparison measure random masks (a relative
    error near 1), not the quantization. Both now run in eval mode, their modes restored; dict batches are keyword
    arguments, as calibration's."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 4)).train()
    qmodel = tilestack.quantize(copy.deepcopy(model), "int8").train()
    x = randn(16, 8)
    cost = accuracy_cost(model, qmodel, [x, {"input": x}])
    assert cost["max_rel_err"] < 0.02 and cost["top1_agree"] > 0.9, cost
    assert model.training and model[1].training and qmodel[1].training


def test_accuracy_cost_reports_a_nan_output_as_nan():
    """A quantized model giving NaN on one batch: max(worst, nan) kept the worst of the others, so the NaN read as
    a small error."""
    x = randn(4, 8)
    model = mlp()

    def poisoned(t):
        return model(t) if t.shape[0] != 1 else torch.full((1, 4), math.nan)

    class Poisoned(nn.Module):
        def forward(self, t):
            return poisoned(t)

    cost = accuracy_cost(model, Poisoned(), [x, x[:1]])
    assert math.isnan(cost["max_rel_err"]) and math.isnan(cost["mean_rel_err"]), cost
    assert accuracy_cost(model, Poisoned(), [x])["max_rel_err"] == 0.0


# ---- kernels: launch options, a missing bias -------------------------------------------------------------------------
def _launch_option_rows() -> dict[str, Row]:
    a, b = randn(8, 8).bfloat16(), randn(8, 6).bfloat16()
    return {
        "gemm: num_warps 5": Row(lambda: gemm(a, b, num_warps=5), LaunchError, "launch option num_warps=5"),
        "gemm: num_warps 0": Row(lambda: gemm(a, b, num_warps=0), LaunchError, "num_warps=0"),
        "gemm: num_warps a str": Row(lambda: gemm(a, b, num_warps="4"), LaunchError, "num_warps='4'"),
        "gemm: num_warps a float": Row(lambda: gemm(a, b, num_warps=4.0), LaunchError, "num_warps=4.0"),
        "gemm: num_stages 0": Row(lambda: gemm(a, b, num_stages=0), LaunchError, "num_stages=0"),
        "gemm: num_stages negative": Row(lambda: gemm(a, b, num_stages=-1), LaunchError, "num_stages=-1"),
        "add_layer_norm: bias None": Row(lambda: add_layer_norm(randn(4, 8), randn(4, 8), torch.ones(8), None),
                                         LaunchError, "add_layer_norm: bias must be a torch.Tensor, got NoneType"),
        "softmax: num_warps 3": Row(lambda: softmax(randn(3, 8), num_warps=3), LaunchError, "num_warps=3"),
        "gemm: warp_specialize a str": Row(lambda: gemm(a, b, warp_specialize="yes"), LaunchError,
                                           "warp_specialize='yes'"),
    }


def test_launch_options_some_backend_takes_still_run():
    """num_warps=8 (Triton and Gluon), 12 (Gluon's whole warpgroups only), warp_specialize (Gluon's): the
    reference runs them as it runs any config."""
    a, b = randn(8, 8).bfloat16(), randn(8, 6).bfloat16()
    want = (a.double() @ b.double()).bfloat16()
    for kw in (dict(num_warps=8, num_stages=2), dict(num_warps=12), dict(warp_specialize=False)):
        torch.testing.assert_close(gemm(a, b, **kw), want, atol=0, rtol=0)


# ---- perf --------------------------------------------------------------------------------------------------------
def noop():
    return None


def _perf_rows() -> dict[str, Row]:
    def at(*roof):   # the Roof made inside the call: a bad field is refused when the Roof is made (round 18)
        return lambda: place(flops=1e6, bytes_moved=1e6, seconds=1e-3, roof=Roof(*roof))

    cpu = perf.detect("cpu")
    return {
        "place: peak negative": Row(at(-1e12, 1e11), RooflineError, "roof.peak_flops_per_s=-1000000000000.0"),
        "place: peak nan": Row(at(math.nan, 1e11), RooflineError, "roof.peak_flops_per_s=nan"),
        "place: bandwidth inf": Row(at(1e12, math.inf), RooflineError, "roof.bandwidth=inf"),
        "place: bandwidth a bool": Row(at(1e12, True), RooflineError, "roof.bandwidth=True"),
        "place: peak a str": Row(at("1e12", 1e11), RooflineError, "roof.peak_flops_per_s='1e12'"),
        "ceilings: dev a str": Row(lambda: perf.ceilings("cpu"), DeviceError, "dev='cpu'"),
        "ceilings: copy_bytes 0": Row(lambda: perf.ceilings(cpu, copy_bytes=0), DeviceError, "copy_bytes=0"),
        "ceilings: matmul_n negative": Row(lambda: perf.ceilings(cpu, matmul_n=[64, -1]), DeviceError,
                                           "matmul_n=[64, -1]"),
        "ceilings: matmul_n empty": Row(lambda: perf.ceilings(cpu, matmul_n=()), DeviceError, "matmul_n=()"),
        "ceilings: dtypes one str": Row(lambda: perf.ceilings(cpu, dtypes="fp32"), DeviceError, "dtypes='fp32'"),
        "ceilings: dtypes unknown": Row(lambda: perf.ceilings(cpu, dtypes=["fp7"]), DeviceError, "dtypes=['fp7']"),
        "ceilings: budget_s nan": Row(lambda: perf.ceilings(cpu, budget_s=math.nan), DeviceError, "budget_s=nan"),
        "ceilings: budget_s negative": Row(lambda: perf.ceilings(cpu, budget_s=-1.0), DeviceError, "budget_s=-1.0"),
        "time_fn: repeats a float": Row(lambda: time_fn(noop, device="cpu", repeats=1.5), TimingError, "repeats=1.5"),
        "time_fn: warmup_s negative": Row(lambda: time_fn(noop, device="cpu", warmup_s=-1.0, repeats=3), TimingError,
                                          "warmup_s=-1.0"),
        "time_fn: an args set a tensor": Row(lambda: time_fn(torch.sum, device="cpu", args_sets=[torch.ones(1, 4)],
                                                             repeats=3), TimingError, "args_sets[0] is a Tensor"),
        "time_fn: device unknown": Row(lambda: time_fn(noop, device="tpu", repeats=3), TimingError, "device='tpu'"),
        "rotating_sets: bytes_per_set nan": Row(lambda: rotating_sets(tuple, bytes_per_set=math.nan, device="cpu"),
                                                TimingError, "bytes_per_set=nan"),
        "rotating_sets: max_sets 0": Row(lambda: rotating_sets(tuple, bytes_per_set=64, device="cpu", max_sets=0),
                                         TimingError, "max_sets=0"),
        "formulas.attention: causal a str": Row(lambda: perf.formulas.attention(1, 2, 64, 64, 16, causal="no"),
                                                LaunchError, "causal='no' (str); expected True or False"),
        "formulas.attention: backward an int": Row(lambda: perf.formulas.attention(1, 2, 64, 64, 16, backward=1),
                                                   LaunchError, "backward=1"),
        "lookup_peaks: name None": Row(lambda: perf.lookup_peaks(None), DeviceError, "name=None"),
        "detect: a float index": Row(lambda: perf.detect(1.5), DeviceError, "device=1.5"),
    }


def test_ceilings_refused_before_any_measurement(tmp_path):
    """A refused argument measures nothing and caches nothing."""
    with config.override(cache_dir=tmp_path):
        for kw in (dict(copy_bytes=-1), dict(matmul_n=0), dict(budget_s=0.0), dict(dtypes=["int4"])):
            with pytest.raises(DeviceError):
                perf.ceilings(perf.detect("cpu"), remeasure=True, **kw)
    assert not any(tmp_path.rglob("*")), list(tmp_path.rglob("*"))


def test_time_fn_arguments_that_fit_still_time():
    x = torch.ones(1, 4)
    for kw in (dict(args_sets=[(x,)]), dict(args_sets=[[x]], device=torch.device("cpu")), dict(device="cpu"),
               dict(warmup_s=0)):
        fn = noop if "args_sets" not in kw else torch.sum
        assert time_fn(fn, repeats=3, **kw).median_s >= 0


def test_place_under_a_partly_unknown_roof_still_places():
    p = place(flops=0, bytes_moved=1e6, seconds=1e-3, roof=Roof(None, 1e11))
    assert p.bound == "memory" and p.fraction == pytest.approx(1e-2)
    assert place(flops=1e6, bytes_moved=1e6, seconds=1e-3, roof=Roof(0.0, None)).bound == "unknown"


# ---- federated ---------------------------------------------------------------------------------------------------
def _federated_rows() -> dict[str, Row]:
    from tilestack.federated.strategies.cfl import CFL
    from tilestack.federated.strategies.feddf import FedDF
    from tilestack.federated.strategies.heterofl import HeteroFL
    from tilestack.federated.strategies.ifca import IFCA
    from tilestack.federated.strategies.qffl import QFFL
    from tilestack.federated.task import Task

    task = Task(dataset="blobs", num_clients=2, num_samples=40, num_features=4, model="mlp", hidden=4)
    unlabeled = np.zeros((6, 4), np.float32)

    def feddf(**kw):
        return lambda: FedDF(model=task.build_model(), **({"unlabeled": unlabeled} | kw))

    return {
        "FedDF: steps a float": Row(feddf(steps=1.5), ValueError, "FedDF: steps=1.5"),
        "FedDF: lr inf": Row(feddf(lr=math.inf), ValueError, "FedDF: lr=inf"),
        "FedDF: temperature nan": Row(feddf(temperature=math.nan), ValueError, "FedDF: temperature=nan"),
        "FedDF: batch_size a float": Row(feddf(batch_size=2.5), ValueError, "FedDF: batch_size=2.5"),
        "FedDF: seed negative": Row(feddf(seed=-1), ValueError, "FedDF: seed=-1"),
        "FedDF: unlabeled with NaN": Row(feddf(unlabeled=np.full((6, 4), np.nan, np.float32)), ValueError,
                                         "FedDF: unlabeled holds NaN"),
        "HeteroFL: hidden a str": Row(lambda: HeteroFL(width_of=lambda p: 0.5, hidden="4"), ValueError,
                                      "HeteroFL: hidden='4'"),
        "HeteroFL: hidden a float": Row(lambda: HeteroFL(width_of=lambda p: 0.5, hidden=4.5), ValueError,
                                        "HeteroFL: hidden=4.5"),
        "HeteroFL: width_of a number": Row(lambda: HeteroFL(width_of=0.5, hidden=4), ValueError,
                                           "HeteroFL: width_of=0.5"),
        "Task: alpha negative": Row(lambda: Task(alpha=-1.0), ValueError, "Task: alpha=-1.0; expected >= 0"),
        "Task: beta negative": Row(lambda: Task(beta=-0.5), ValueError, "Task: beta=-0.5"),
        "CFL: max_cross_similarity nan": Row(lambda: CFL(max_cross_similarity=math.nan), ValueError,
                                             "max_cross_similarity=nan"),
        "CFL: max_cross_similarity 5": Row(lambda: CFL(max_cross_similarity=5.0), ValueError,
                                           "max_cross_similarity=5.0; expected a number in [-1, 1]"),
        "CFL: eps1 a str": Row(lambda: CFL(eps1="0.4"), ValueError, "eps1='0.4'"),
        "CFL: warmup a float": Row(lambda: CFL(warmup=1.5), ValueError, "warmup=1.5"),
        "CFL: max_clusters a str": Row(lambda: CFL(max_clusters="3"), ValueError, "max_clusters='3'"),
        "CFL: min_cluster_size 0": Row(lambda: CFL(min_cluster_size=0), ValueError, "min_cluster_size=0"),
        "IFCA: num_clusters a float": Row(lambda: IFCA(num_clusters=2.5), ValueError, "num_clusters=2.5"),
        "IFCA: num_clusters nan": Row(lambda: IFCA(num_clusters=math.nan), ValueError, "num_clusters=nan"),
        "IFCA: num_clusters a bool": Row(lambda: IFCA(num_clusters=True), ValueError, "num_clusters=True"),
        "IFCA: reseed_after nan": Row(lambda: IFCA(num_clusters=2, reseed_after=math.nan), ValueError,
                                      "reseed_after=nan"),
        "QFFL: q nan": Row(lambda: QFFL(q=math.nan, client_learning_rate=0.1), ValueError, "q=nan"),
        "QFFL: q inf": Row(lambda: QFFL(q=math.inf, client_learning_rate=0.1), ValueError, "q=inf"),
        "QFFL: q a str": Row(lambda: QFFL(q="1", client_learning_rate=0.1), ValueError, "q='1'"),
        "QFFL: client_learning_rate inf": Row(lambda: QFFL(client_learning_rate=math.inf), ValueError,
                                              "client_learning_rate=inf"),
    }


def test_federated_numbers_that_fit_still_build():
    from tilestack.federated.strategies.cfl import CFL
    from tilestack.federated.strategies.ifca import IFCA
    from tilestack.federated.strategies.qffl import QFFL
    from tilestack.federated.task import Task

    assert CFL(max_cross_similarity=-0.5, warmup=np.int64(0)).max_cross == -0.5
    assert IFCA(num_clusters=np.int64(3), reseed_after=0).num_clusters == 3
    assert QFFL(q=0, client_learning_rate=1).q == 0
    assert Task(alpha=0.0, beta=0.0).alpha == 0.0


# ---- the table ---------------------------------------------------------------------------------------------------
ROWS: dict[str, Row] = {**_compile_rows(), **_quant_rows(), **_launch_option_rows(), **_perf_rows(),
                        **_federated_rows()}


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_is_refused_clearly(row):
    r = ROWS[row]
    with pytest.raises(Exception) as e:
        r.call()
    assert isinstance(e.value, r.error), f"{type(e.value).__name__} instead of {r.error.__name__}: {e.value}"
    assert r.fragment in str(e.value), f"{r.fragment!r} not in {str(e.value)!r}"
