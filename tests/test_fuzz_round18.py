"""Fuzz round eighteen, part one: the public objects and entry points no earlier round drew bad values for:
``perf.Roof`` and ``perf.Device`` (the dataclasses a user builds to place a kernel by hand or to describe a machine),
``tune.DeviceKey`` and ``tune.ConfigCache``, ``tilestack.quantize(skip=...)``, ``tilestack.optimize``'s thresholds
and ``tilestack.patch`` on odd modules.

Rounds 16 and 17 fuzzed ``quantized_linear``, the ops under ``torch.compile``, the command line, ``perf.measure`` /
``time_fn`` / ``place`` / ``Store``, ``tune.device_key`` / ``size_bucket`` and the planner and federated API; round 13
``tune.tune``, ``SearchSpace`` and ``ConfigCache.put`` / ``get``. Here each field or argument in turn gets values drawn
with a fixed seed from the wrong kinds (``tests/_fuzz_round17.py``'s pool: a str, a float, a bool, None, a list, a
NumPy array, a 0-d tensor, NaN, inf, -1, 1 << 70): a clear refusal raised by tilestack that names it, when the object
is made (before any work), or, for a NumPy int where an int is asked, the same answer as the int gives.

What this round found (each test below failed before its fix):
- ``tilestack.quantize(model, skip=torch.tensor(3))`` failed inside torch ("iteration over a 0-d tensor"), a 0-d
  NumPy array inside numpy, and ``skip=torch.tensor([])`` was taken as "no layer named"; a skip that is no names is now
  a ``LaunchTypeError`` (a LaunchError and a TypeError) naming skip, what was given and its type; the same for
  ``quant.calibrate(model, names=torch.tensor(0), ...)``;
- ``tilestack.quantize`` of a model already quantized said it had "no nn.Linear layer ... (norms and activations
  alone)"; it now says the model is already quantized, naming its QuantLinear layers;
- ``perf.Roof`` took any fields: ``Roof(-1e12, 1e11)`` had a negative ridge, ``Roof(nan, 1)`` a NaN one,
  ``Roof("1e12", 1)`` failed in ``.ridge`` with a bare TypeError, ``Roof(1, 1, label=3)`` was kept; only ``place()``
  refused some of them, later. Now refused when made (``RooflineError``, the field named as ``place`` named it);
- ``perf.Device`` took any fields: ``kind="gpu"``, ``index=-1``, ``sm_count=0``, ``spec="h100"`` and
  ``capability=9.0`` were kept, ``name=3`` failed in ``.slug`` ("'int' object has no attribute 'lower'"), and a NumPy
  int index or memory size was kept as one, which ``describe()`` hands to JSON (it cannot write one);
- ``tune.DeviceKey`` took any fields: ``DeviceKey(9.0, 0, 132, 227)`` keyed its tables "sm9.00-132sm-227kb", a minor of
  10 gave "sm910-..." which parses back as sm91 minor 0, a negative SM count, 0 registers per thread or a NaN
  ``memory_gb`` were kept; ``DeviceKey.parse(3)`` failed inside ``re`` ("expected string or bytes-like object");
- ``perf.rotating_sets(make_args=3)`` failed "'int' object is not callable", ``l2_bytes="x"`` in a bare division,
  ``l2_bytes=-1`` was taken and ``max_sets=np.int64(3)`` refused; ``perf.EnergyMeter("x")`` or ``EnergyMeter(-1)`` made
  a meter that is never available (its reason a comparison's TypeError) and energy went unmeasured without a word;
  ``perf.ceilings(dev, remeasure="no")`` was taken by its truth and measured again;
- ``perf.formulas.matmul(np.int64(2**31), 2**31, 2**31)`` counted 0 FLOPs (NumPy's int64 products wrap, with a
  RuntimeWarning only): the formulas now count NumPy sizes as Python ints; ``formulas.convolution`` cut a size of 8.7
  to 8, gave negative counts for a negative size, counted True as 1, failed in a bare comparison for ``groups="x"``
  and took ``bias="no"`` / ``transposed="no"`` (and the backward's ``input_grad="no"``) by their truth;
- ``perf.range_name(None)`` (any non-str kernel) failed in ``.replace``, ``range_name("k", "BM")`` with "string
  indices must be integers": a LaunchTypeError naming kernel or config now;
- ``tune.ConfigCache(tables_dir="path/to/tables")`` failed with "'str' object has no attribute 'glob'" (a str
  ``cache_dir`` was taken), ``cache_dir=3`` inside pathlib;
- ``tune.SearchSpace(kernel, restrict={"BM": <a generator or iterator>})`` searched no config without a word (the
  check used the iterator up), and NumPy values in a restrict went on into the configs; ``configs(shared_limit=
  np.int64(...))`` or ``register_limit`` a NumPy number was refused;
- ``tune.tune(..., strategy="random", seed=np.int64(7))`` failed inside ``random`` ("The only supported seed types
  are ..."), and a seed of 1.5, "x" or None (another draw on every run) was taken: an int is asked for, by name;
- ``tilestack.optimize(model, min_rows=np.int64(4))`` (and ``torch.compile(..., options={"min_rows": ...})``) was
  refused as "expected an int >= 0"; a NumPy int is now the int it is.
(The ops' findings are in part two, test_fuzz_round18_more.py.)
"""

from __future__ import annotations

import json
import sys
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tilestack
from _fuzz_round17 import POOL, draws, refused
from tilestack.errors import LaunchError, LaunchTypeError
from tilestack.perf import Device, Roof, lookup_peaks, place
from tilestack.tune import ConfigCache, DeviceKey

SEED = 1800


# ---- tilestack.quantize(skip=...) -------------------------------------------------------------------------------
def mlp() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


SKIP_BAD = {"0-d tensor": torch.tensor(3), "1-d tensor": torch.tensor([0, 2]), "empty tensor": torch.tensor([]),
            "0-d array": np.array("0"), "int": 0, "float": 1.5, "bytes": b"0", "list of None": [None],
            "list of int": ["0", 2], "bool": True}


@pytest.mark.parametrize("label", sorted(SKIP_BAD))
def test_quantize_refuses_a_skip_that_is_no_names_with_a_type_error_and_leaves_the_model(label):
    model = mlp()
    before = [type(m) for m in model]
    value = SKIP_BAD[label]
    with pytest.raises(LaunchTypeError) as info:
        tilestack.quantize(model, "int8", skip=value)
    assert isinstance(info.value, TypeError) and isinstance(info.value, LaunchError)
    message = str(info.value)
    assert "skip" in message and type(value).__name__ in message and "iterable of str" in message, message
    assert "tilestack" in info.traceback[-1].path.as_posix()
    assert [type(m) for m in model] == before          # refused before any layer was replaced


@pytest.mark.parametrize("skip", [("0",), ["0"], np.array(["0"]), iter(["0"]), "0", {"0": 1}],
                         ids=["tuple", "list", "array", "iterator", "str", "dict"])
def test_quantize_takes_any_iterable_of_names_and_skips_that_layer(skip):
    model = mlp()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(SEED))
    first = model[0].weight.detach().double().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # every name matched: no "match no nn.Linear" warning
        q = tilestack.quantize(model, "int8", skip=skip)
    assert type(q[0]) is nn.Linear and type(q[2]).__name__ == "QuantLinear"
    assert torch.equal(q[0].weight.detach().double(), first)     # the skipped layer untouched
    # the quantized layer against float64 of its dequantized weight (int8 per-channel: x @ (q * s)^T + b)
    h = torch.relu(x.double() @ first.T + model[0].bias.double())
    deq = q[2].qweight.double() * q[2].scale.double()[:, None]
    want = h @ deq.T + q[2].bias.double()
    with torch.no_grad():
        torch.testing.assert_close(q(x).double(), want, rtol=1e-4, atol=1e-4)


def test_calibrate_refuses_names_that_are_no_list_of_names_and_takes_any_iterable():
    from tilestack.quant import calibrate

    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(SEED))
    for value in (torch.tensor(0), np.array("0"), "0", 3, None):
        with pytest.raises(LaunchTypeError, match=r"calibrate: names must be a list of the model's module names"):
            calibrate(mlp(), value, [x])
    for names in (["0"], np.array(["0"]), iter(["0"]), ("0",)):
        stats = calibrate(mlp(), names, [x])
        assert list(stats) == ["0"]
        assert stats["0"].amax == pytest.approx(float(x.abs().max()))          # the largest |x| by hand
        torch.testing.assert_close(stats["0"].mean, x.double().mean(0))        # each feature's mean


def test_quantize_of_a_quantized_model_says_so():
    q = tilestack.quantize(mlp(), "int8")
    for model in (q, q[0]):                       # the model, and a QuantLinear alone
        with pytest.raises(LaunchError, match=r"is already quantized: its layers \[.*\] are QuantLinear"):
            tilestack.quantize(model, "fp8")
    with pytest.raises(LaunchError, match=r"norms and activations alone"):   # a model with no weights at all
        tilestack.quantize(nn.Sequential(nn.ReLU(), nn.LayerNorm(4, elementwise_affine=False)))


# ---- perf.Roof ----------------------------------------------------------------------------------------------------
ROOF_LABELS = ("str", "bool", "list", "nan", "inf", "ninf", "neg", "array", "tensor", "dict")


@pytest.mark.parametrize("field", ["peak_flops_per_s", "bandwidth"])
def test_roof_refuses_a_field_that_is_no_rate_when_made(field):
    for label in draws(f"Roof.{field}", ROOF_LABELS, k=5):
        value = POOL[label]
        kwargs = dict(peak_flops_per_s=1e12, bandwidth=1e11) | {field: value}
        message = refused(lambda kwargs=kwargs: Roof(**kwargs), field, value)
        assert "finite rate >= 0" in message, message


def test_roof_refuses_a_label_that_is_no_str():
    for label in draws("Roof.label", ("float", "none", "list", "tensor"), k=3):
        refused(lambda label=label: Roof(1e12, 1e11, POOL[label]), "label", POOL[label])


def test_roof_takes_numpy_numbers_and_places_as_a_hand_computation():
    roof = Roof(np.float64(2e12), np.int64(100_000_000_000), "given")
    assert roof.ridge == pytest.approx(20.0)               # 2e12 / 1e11 FLOP per byte
    assert roof.attainable(5.0) == pytest.approx(5e11)     # below the ridge: bandwidth * intensity
    assert roof.attainable(50.0) == pytest.approx(2e12)    # above: the peak
    p = place(flops=1e9, bytes_moved=1e9, seconds=0.1, roof=roof, kind="cpu")   # intensity 1 < 20: memory-bound
    assert p.bound == "memory" and p.fraction == pytest.approx((1e9 / 0.1) / 1e11)
    assert Roof(None, None).ridge is None and Roof(0.0, None).attainable(3.0) is None


# ---- perf.Device --------------------------------------------------------------------------------------------------
H100 = "NVIDIA H100 80GB HBM3"
DEVICE_FIELDS = {
    "kind": ("str", "none", "list", "array", "float"),
    "name": ("float", "none", "list", "bool", "tensor"),
    "index": ("str", "float", "bool", "neg", "nan", "tensor", "none"),
    "spec": ("str", "float", "dict", "list"),
    "sm_count": ("str", "float", "bool", "neg", "zero", "nan", "tensor"),
    "memory_bytes": ("str", "float", "bool", "neg", "zero", "inf"),
    "capability": ("float", "list", "tensor"),
    "cores": ("str", "float", "bool", "neg", "zero"),
    "l2_cache_bytes": ("str", "float", "bool", "neg", "nan"),
}


@pytest.mark.parametrize("field", sorted(DEVICE_FIELDS))
def test_device_refuses_a_bad_field_by_name_when_made(field):
    for label in draws(f"Device.{field}", DEVICE_FIELDS[field], k=4):
        value = POOL[label]
        kwargs = dict(kind="cuda", name=H100) | {field: value}
        refused(lambda kwargs=kwargs: Device(**kwargs), field, value)


def test_device_refuses_a_kind_or_capability_it_does_not_know():
    for kwargs, field in ((dict(kind="gpu"), "kind"), (dict(kind="CUDA"), "kind"), (dict(capability="9"), "capability"),
                          (dict(capability="sm90"), "capability"), (dict(name=""), "name"), (dict(name="  "), "name")):
        refused(lambda kwargs=kwargs: Device(**(dict(kind="cuda", name=H100) | kwargs)), field, kwargs[field])


def test_device_takes_numpy_ints_as_ints_and_describes_as_json():
    dev = Device("cuda", H100, np.int64(1), lookup_peaks(H100), sm_count=np.int32(132),
                 memory_bytes=np.int64(80 << 30), capability="9.0", l2_cache_bytes=np.int64(50 << 20))
    got = json.loads(json.dumps(dev.describe()))          # a NumPy int in describe() is no JSON
    assert got == {"kind": "cuda", "name": H100, "index": 1, "spec": "h100-sxm", "sm_count": 132,
                   "memory_bytes": 80 << 30, "capability": "9.0", "cores": None}
    assert type(dev.index) is int and dev.torch_device == "cuda:1" and dev.l2_bytes == 50 << 20
    assert dev.slug == "nvidia-h100-80gb-hbm3"
    cpu = tilestack.perf.detect("cpu")                    # the detected CPU passes its own checks
    assert cpu.kind == "cpu" and cpu.torch_device == "cpu" and cpu.name.startswith("cpu: ")


def test_range_name_refuses_a_kernel_or_config_that_is_no_name_and_labels_by_hand():
    for label in draws("range_name.kernel", ("none", "float", "list", "tensor", "array"), k=3):
        refused(lambda label=label: tilestack.perf.range_name(POOL[label]), "kernel", POOL[label])
    for value in ("BM=64", {1: 2, "BN": 3}, [("BM", 64)], 3):
        refused(lambda value=value: tilestack.perf.range_name("k", value), "config", value)
    assert tilestack.perf.range_name("attn/fwd", {"BN": np.int64(64), "BM": 128}) == "attn|fwd[BM=128,BN=64]"
    assert tilestack.perf.range_name("k", {}) == tilestack.perf.range_name("k") == "k"


def test_rotating_sets_energy_meter_and_ceilings_refuse_a_bad_argument_by_name_before_any_work():
    made = []

    def make():
        made.append(1)
        return (torch.ones(4),)
    for arg, labels in (("l2_bytes", ("str", "neg", "nan", "inf", "list", "bool")),
                        ("max_sets", ("float", "bool", "zero", "str", "nan"))):
        for label in draws(f"rotating_sets.{arg}", labels, k=3):
            refused(lambda arg=arg, label=label: tilestack.perf.rotating_sets(make, bytes_per_set=16,
                                                                              **{arg: POOL[label]}), arg, POOL[label])
    refused(lambda: tilestack.perf.rotating_sets(3, bytes_per_set=16), "make_args", 3)
    assert made == []                                                   # no input set made for a refused call
    # a NumPy int is the int it is: twice a 64-byte L2 over 16-byte sets is 8 sets, capped by max_sets=3
    assert len(tilestack.perf.rotating_sets(make, bytes_per_set=16, l2_bytes=np.int64(64))) == 8
    assert len(tilestack.perf.rotating_sets(make, bytes_per_set=16, l2_bytes=64, max_sets=np.int64(3))) == 3
    for label in draws("EnergyMeter.index", ("str", "float", "bool", "neg", "none", "tensor"), k=3):
        refused(lambda label=label: tilestack.perf.EnergyMeter(POOL[label]), "index", POOL[label])
    refused(lambda: tilestack.perf.EnergyMeter(0, pci_bus_id=19), "pci_bus_id", 19)
    assert tilestack.perf.EnergyMeter(np.int64(0)).index == 0
    cpu = tilestack.perf.detect("cpu")
    for value in ("no", 1, None, []):                 # ("no" measured again, for seconds)
        refused(lambda value=value: tilestack.perf.ceilings(cpu, remeasure=value), "remeasure", value)


def test_formulas_count_numpy_sizes_as_python_ints_without_wrapping():
    from tilestack.perf import formulas

    big = 1 << 31                                      # 2 * big**3 = 2**94 FLOPs: past int64, where NumPy wraps
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # (NumPy's "overflow encountered in scalar multiply")
        cost = formulas.matmul(np.int64(big), np.int64(big), np.uint32(big), "bf16")
    assert cost.flops == 2 * big**3 and type(cost.flops) is int          # by hand; was 0
    assert cost.bytes_read == 2 * (big * big + big * big) and cost.bytes_written == 2 * big * big
    att = formulas.attention(np.int64(2), np.int64(4), np.int64(1 << 20), np.int64(1 << 20), np.int64(128), "bf16")
    assert att.flops == 2 * 2 * 4 * (1 << 40) * 256 and type(att.flops) is int
    assert formulas.fft_flops(np.int64(8)) == formulas.fft_flops(8)
    assert formulas.transformer_train_flops_per_token(matmul_params=np.int64(10), n_layer=np.int64(2),
                                                      seq=np.int64(4), attention_width=np.int64(8)) == 6 * 10 + 12 * 64


def test_convolution_refuses_shapes_groups_and_switches_it_would_miscount():
    from tilestack.perf import formulas

    x, w, y = (1, 3, 8, 8), (4, 3, 3, 3), (1, 4, 6, 6)
    assert formulas.convolution(x, w, y).flops == 2 * 1 * (4 * 3 * 9) * 36    # 2 N numel(w) prod(S_out), by hand
    for bad in ((1, 3, 8.7, 8), (1, 3, -8, 8), (True, 3, 8, 8), "1388"):   # cut to 8, negative counts, 1, (1,3,8,8)
        with pytest.raises(LaunchError, match=r"expected sequences of ints >= 0"):
            formulas.convolution(bad, w, y)
    for groups in ("x", 0, 2.5, None):
        refused(lambda groups=groups: formulas.convolution(x, w, y, groups=groups), "groups", groups)
    for flag in ("bias", "transposed"):
        refused(lambda flag=flag: formulas.convolution(x, w, y, **{flag: "no"}), flag, "no")
    for flag in ("input_grad", "weight_grad", "bias_grad"):
        refused(lambda flag=flag: formulas.convolution_backward(y, x, w, **{flag: "no"}), flag, "no")
    assert formulas.convolution(np.array(x), torch.Size(w), y).flops == formulas.convolution(x, w, y).flops


# ---- tune.DeviceKey, tune.ConfigCache -----------------------------------------------------------------------------
KEY_FIELDS = {
    "major": ("str", "float", "bool", "neg", "zero", "none", "tensor"),
    "minor": ("str", "float", "bool", "neg", "none", "nan"),
    "sms": ("str", "float", "bool", "neg", "zero", "none"),
    "shared_kb": ("str", "float", "bool", "neg", "zero", "list"),
    "registers_per_thread": ("str", "float", "bool", "neg", "zero"),
    "name": ("float", "none", "list", "bool"),
    "memory_gb": ("str", "none", "nan", "inf", "neg", "bool", "list"),
}


@pytest.mark.parametrize("field", sorted(KEY_FIELDS))
def test_device_key_refuses_a_bad_field_by_name_when_made(field):
    for label in draws(f"DeviceKey.{field}", KEY_FIELDS[field], k=4):
        value = POOL[label]
        kwargs = dict(major=9, minor=0, sms=132, shared_kb=227) | {field: value}
        refused(lambda kwargs=kwargs: DeviceKey(**kwargs), field, value)


def test_device_key_refuses_a_minor_its_key_cannot_hold():
    message = refused(lambda: DeviceKey(9, 10, 132, 227), "minor", 10)
    assert "0..9" in message
    # every key made is read back as itself
    for major, minor, sms, kb in ((9, 0, 132, 227), (8, 9, 128, 99), (12, 1, 1, 1), (10, 0, 148, 227)):
        key = DeviceKey(major, minor, sms, kb)
        assert DeviceKey.parse(str(key)) == key and str(key) == f"sm{major}{minor}-{sms}sm-{kb}kb"


def test_device_key_takes_numpy_ints_and_parse_refuses_what_is_no_text():
    key = DeviceKey(np.int64(9), np.int32(0), np.int64(132), np.int64(227), memory_gb=np.float32(79.5))
    assert key == DeviceKey(9, 0, 132, 227) and str(key) == "sm90-132sm-227kb"
    assert type(key.sms) is int and key.shared_bytes == 227 * 1024 and key.memory_gb == 79.5
    assert json.loads(json.dumps(key.meta()))["sms"] == 132
    for value in (3, None, b"sm90-132sm-227kb", ["sm90-132sm-227kb"]):
        with pytest.raises(tilestack.errors.DeviceError) as info:
            DeviceKey.parse(value)
        assert repr(value) in str(info.value) and "sm90-132sm-227kb" in str(info.value)


def test_config_cache_refuses_a_folder_that_is_no_path_and_takes_a_str(tmp_path):
    for field in ("cache_dir", "tables_dir"):
        for label in draws(f"ConfigCache.{field}", ("float", "list", "bool", "tensor", "dict"), k=3):
            refused(lambda field=field, label=label: ConfigCache(**{field: POOL[label]}), field, POOL[label])
    from tilestack.tune.cache import TABLES
    by_path = ConfigCache(cache_dir=tmp_path, tables_dir=TABLES)
    by_str = ConfigCache(cache_dir=str(tmp_path), tables_dir=str(TABLES))
    assert len(by_str.shipped) == len(by_path.shipped) == len(list(TABLES.glob("*.json"))) > 0
    assert {str(d) for d in by_str.devices()} == {str(d) for d in by_path.devices()}
    assert ConfigCache(cache_dir=tmp_path, tables_dir=None).shipped == []


def test_search_space_keeps_a_restrict_given_as_an_iterator_and_takes_numpy_values_and_limits():
    from tilestack.kernels import softmax_kernel
    from tilestack.tune import SearchSpace

    x = torch.randn(8, 256)
    args = (x, torch.empty_like(x))
    want = SearchSpace(softmax_kernel, restrict={"BM": (1, 2)}).configs(args)
    assert want and {c["BM"] for c in want} == {1, 2}
    for dom in ((b for b in (1, 2)), iter([1, 2]), np.array([1, 2]), [np.int64(1), np.int32(2)]):
        got = SearchSpace(softmax_kernel, restrict={"BM": dom}).configs(args)    # a generator gave no config
        assert got == want and all(type(v) is int for c in got for v in c.values())
    space = SearchSpace(softmax_kernel)
    assert space.configs(args, shared_limit=np.int64(100_000), register_limit=np.float64(1e6)) == \
        space.configs(args, shared_limit=100_000, register_limit=1e6)
    with pytest.raises(tilestack.errors.TunableError, match=r"restrict\['BM'\]=\(\); expected a non-empty tuple"):
        SearchSpace(softmax_kernel, restrict={"BM": iter([])})


def test_tune_takes_a_numpy_seed_as_the_int_and_refuses_a_seed_that_is_no_int():
    from tilestack.tune import tune

    candidates = [{"BM": bm} for bm in (16, 32, 64, 128, 256)]
    timed = []

    def seconds(c):
        timed.append(c["BM"])
        return c["BM"] * 1e-6
    for value in (1.5, "x", None, True, [1], torch.tensor(1)):      # (None drew another subset on every run)
        refused(lambda value=value: tune("k", candidates, time=seconds, strategy="random", samples=2, seed=value),
                "seed", value)
    assert timed == []                                                     # refused before anything was timed
    a = tune("k", candidates, time=seconds, strategy="random", samples=3, seed=np.int64(7))
    drawn, timed[:] = list(timed), []
    b = tune("k", candidates, time=seconds, strategy="random", samples=3, seed=7)
    assert timed == drawn and a.best == b.best == {"BM": min(drawn)}       # the same draw as the int, its fastest


# ---- tilestack.optimize / backend="tilestack": NumPy thresholds ------------------------------------------------
def test_optimize_takes_numpy_int_thresholds_as_ints():
    import tilestack.compile
    from tilestack.compile.policy import Policy

    assert Policy(min_rows=np.int64(4), min_query_rows=np.int32(2)) == Policy(min_rows=4, min_query_rows=2)
    assert type(Policy(min_rows=np.int64(4)).min_rows) is int
    for bad in (1.5, True, -1, "4", np.float64(4.0)):
        with pytest.raises(LaunchError, match=r"min_rows=.*expected an int >= 0"):
            tilestack.optimize(nn.Linear(4, 4), min_rows=bad)
    torch._dynamo.reset()
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)).eval()
    x = torch.randn(16, 8)
    compiled = tilestack.optimize(model, inner="eager", min_rows=np.int64(1), min_query_rows=np.int64(1))
    with torch.no_grad():
        got = compiled(x)
        want = model.double()(x.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


# ---- tilestack.patch on odd modules ------------------------------------------------------------------------------
def test_patch_refuses_what_is_no_module_instance():
    for value in (nn.Linear, 3, "model", [nn.Linear(2, 2)], nn.ModuleList, torch.ones(2)):
        with pytest.raises(LaunchError, match="patch: model must be a torch.nn.Module or None"):
            tilestack.patch(value)
    with pytest.raises(LaunchError, match="TorchScript"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)     # (torch.jit.script is deprecated)
        tilestack.patch(torch.jit.script(nn.Linear(2, 2)))
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention


def test_patch_rebinds_a_name_in_a_module_made_at_run_time_and_puts_it_back():
    torch_sdpa = F.scaled_dot_product_attention
    mod = types.ModuleType("_round18_model")
    sys.modules[mod.__name__] = mod
    try:
        exec("import torch\nfrom torch.nn.functional import scaled_dot_product_attention as sdpa\n"
             "class M(torch.nn.Module):\n    def forward(self, q, k, v):\n"
             "        return sdpa(q, k, v, is_causal=True)\n",
             mod.__dict__)
        model = nn.ModuleDict({"attn": mod.M()})   # the class's module found through a container
        g = torch.Generator().manual_seed(SEED)
        q, k, v = (torch.randn(1, 2, 5, 16, generator=g) for _ in range(3))
        with tilestack.patch(model) as p:
            assert mod.sdpa is tilestack.scaled_dot_product_attention
            assert len(p.replaced) == 2            # torch.nn.functional's and the module's own name
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")      # (on a CPU the drop-in hands the call to torch, said once)
                got = model["attn"](q, k, v)
        assert mod.sdpa is torch_sdpa and F.scaled_dot_product_attention is torch_sdpa
        want = torch_sdpa(q.double(), k.double(), v.double(), is_causal=True)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        # a module gone from sys.modules: only torch.nn.functional is patched, and nothing fails
        del sys.modules[mod.__name__]
        with tilestack.patch(model) as p:
            assert [name for _, name, _ in p.replaced] == ["scaled_dot_product_attention"]
        assert mod.sdpa is torch_sdpa
    finally:
        sys.modules.pop(mod.__name__, None)
    with pytest.raises(KeyError):                 # an error in the block still puts torch's back
        with tilestack.patch():
            raise KeyError("x")
    assert F.scaled_dot_product_attention is torch_sdpa
