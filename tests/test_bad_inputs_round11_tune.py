"""Round eleven, part two: the tuning entry points (``tune.library.library_problems``, ``tune.session.Session``,
``tilestack tune``) and ``tilestack.quantize`` / ``tilestack.patch`` on models whose layers they cannot reach.

What it found (each test failed before its fix):
- ``library_problems("gemm")`` split the name into letters ("kernels ['g', 'e', 'm', 'm'] are not tunable"), as
  did ``dtypes="bfloat16"``; a kernel or dtype named twice (``tilestack tune -k softmax -k softmax``) listed every
  problem twice, each tuned twice on half its share of the budget; ``kernels=[]`` tuned every kernel where
  ``dtypes=[]`` tuned nothing. One name is now taken as a str, names given twice once, and an empty list refused;
- ``Session(budget_s=nan)`` (or 0, -1, inf, True, '10') was taken: NaN passes every deadline check (each compares
  False), as the CLI's check (round 8) knew; ``Session("sm90-132sm-227kb", ...)`` failed with an AttributeError,
  ``device_str='cuda:0'`` timed GPU work with the wall clock and ``'tpu'`` skipped every problem, and
  ``backends='triton'`` searched the backends 't', 'r', 'i', ...: each now a TunableError naming the argument;
- ``tilestack tune --out DIR`` without ``--ship`` wrote nothing to DIR without a word (``--out`` is --ship's
  folder); ``--backends triton,triton`` searched Triton twice per problem;
- ``tilestack.quantize(torch.jit.script(model))`` (or a traced one) returned the float model unchanged without a
  word (its compiled submodules are no nn.Linear), and ``tilestack.patch(scripted)`` patched nothing the model
  calls: both now refuse a TorchScript module by name;
- ``kernels.gemm(a, b, backend='')`` (or 0, False) ran on the default backend where ``backend='Triton'`` is refused.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import tilestack
from tilestack import config
from tilestack import kernels as K
from tilestack.cli import _register, app
from tilestack.errors import BackendError, LaunchError, TunableError
from tilestack.tune import ConfigCache
from tilestack.tune.devices import DeviceKey
from tilestack.tune.library import library_problems
from tilestack.tune.session import Session

_register()
DEV = DeviceKey(9, 0, 132, 227, name="Test GPU", memory_gb=100.0)


# ---- tune.library ------------------------------------------------------------------------------------------------
def _names(problems):
    return [p.name for p in problems]


def test_one_kernel_or_dtype_may_be_given_as_a_str():
    """Before: split into letters and refused ("kernels ['g', 'e', 'm', 'm'] are not tunable")."""
    assert _names(library_problems("gemm", small=True)) == _names(library_problems(["gemm"], small=True))
    got = library_problems(["softmax"], "float16", small=True)
    assert got and {p.signature for p in got} == {"float16"}


def test_a_kernel_or_dtype_named_twice_is_tuned_once():
    """Before: each problem listed (and tuned) twice, on half its share of the budget."""
    once = _names(library_problems(["softmax", "gemm"], ["bfloat16"], small=True))
    assert len(once) == len(set(once))
    assert _names(library_problems(["softmax", "gemm", "softmax"], ["bfloat16", "bfloat16"], small=True)) == once


@pytest.mark.parametrize("kw,needle", [
    (dict(kernels=[]), r"tune: kernels is empty; expected some of \[.*'softmax'.*\] \(or leave it out for all\)"),
    (dict(kernels=["softmax"], dtypes=()), r"tune: dtypes is empty; expected some of \['bfloat16', 'float16'\]"),
    (dict(kernels=["softmax"], dtypes=[torch.bfloat16]), r"tune: dtypes \[torch.bfloat16\]; expected some of"),
    (dict(kernels=["Softmax"]), r"tune: kernels \['Softmax'\] are not tunable"),
])
def test_empty_or_unknown_names_are_refused(kw, needle):
    """Before: kernels=[] listed every kernel's problems (where dtypes=[] listed none)."""
    with pytest.raises(TunableError, match=needle):
        library_problems(**kw, small=True)


def test_every_attention_problem_keeps_its_pingpong_variant_on_gluon():
    """Problem.variants (already right, pinned): each plain attention_fwd problem up to head dim 128 carries the
    ping-pong variant, searched on Gluon only, with its own tunables and the schedule its config is written with."""
    problems = library_problems(["attention_fwd"], small=True)
    assert problems
    for p in problems:
        assert [(v.schedule, v.backends, v.search_name) for v in p.variants] == \
            [("pingpong", ("gluon",), "attention_fwd:pingpong")]
        assert set(p.variants[0].restrict) == {"BM", "BN", "STAGES"} and "STAGES" not in p.restrict


# ---- tune.session.Session --------------------------------------------------------------------------------------
def _session(tmp_path, **kw):
    args = dict(budget_s=1, device_str="cpu", cache=ConfigCache(tmp_path / "cache", tables_dir=None)) | kw
    device = args.pop("device", DEV)
    return Session(device, **args)


@pytest.mark.parametrize("budget", [math.nan, 0, -1.0, math.inf, True, "10", None])
def test_session_refuses_a_budget_that_is_no_positive_finite_time(budget, tmp_path):
    """Before: every one was taken (NaN: every deadline check compares False; None: a bare TypeError)."""
    with pytest.raises(TunableError, match=re.escape(f"Session: budget_s must be a finite number of seconds > 0, "
                                                     f"got {budget!r}")):
        _session(tmp_path, budget_s=budget)


@pytest.mark.parametrize("kw,needle", [
    (dict(device="sm90-132sm-227kb"), r"Session: device must be a DeviceKey .*got str 'sm90-132sm-227kb'"),
    (dict(device_str="cuda:0"), r"Session: device_str='cuda:0'; expected 'cuda' .* or 'cpu'"),
    (dict(device_str="tpu"), r"Session: device_str='tpu'"),
    (dict(backends="triton"), r"Session: backends='triton'; expected None or a non-empty tuple of backend names"),
    (dict(backends=()), r"Session: backends=\(\); expected None or a non-empty tuple"),
    (dict(backends=(None,)), r"Session: backends=\(None,\)"),
])
def test_session_refuses_other_arguments_by_name(kw, needle, tmp_path):
    """Before: an AttributeError (a str device), the wall clock for GPU work ('cuda:0'), every problem skipped
    ('tpu'), the backends 't', 'r', 'i', ... searched ('triton')."""
    with pytest.raises(TunableError, match=needle):
        _session(tmp_path, **kw)


def test_session_arguments_that_fit_still_make_a_session(tmp_path):
    s = _session(tmp_path, budget_s=2.5, backends=["triton"])
    assert (s.budget_s, s.backends, s.device_str) == (2.5, ("triton",), "cpu")


# ---- tilestack tune ----------------------------------------------------------------------------------------------
def _tune(args, tmp_path):
    with config.override(cache_dir=tmp_path / "cache"):
        res = CliRunner().invoke(app, ["tune", *args])
    return res, " ".join(re.sub("[\u2500-\u257f]", "", res.output).split())


def test_tune_refuses_out_without_ship(tmp_path):
    """Before: the plan was listed (or the run tuned) and nothing was ever written to --out."""
    res, flat = _tune(["-k", "softmax", "--dry-run", "--out", str(tmp_path / "tables")], tmp_path)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert "--out" in flat and "without --ship; expected --ship" in flat, flat
    res, flat = _tune(["-k", "softmax", "--dry-run", "--ship", "--out", str(tmp_path / "tables")], tmp_path)
    assert res.exit_code == 0 and "softmax" in flat, res.output


def test_tune_lists_a_kernel_or_dtype_given_twice_once(tmp_path):
    """Before: '28 problems' for -k softmax -k softmax (each twice), against 14 for -k softmax."""
    _, once = _tune(["-k", "softmax", "--dry-run"], tmp_path)
    _, twice = _tune(["-k", "softmax", "-k", "softmax", "--dtype", "bfloat16", "--dtype", "float16", "--dry-run"],
                     tmp_path)
    count = re.compile(r"(\d+) problems, ")
    assert count.search(once).group(1) == count.search(twice).group(1) == "14", (once, twice)


def test_tune_searches_a_backend_given_twice_once(tmp_path, monkeypatch):
    """Before: --backends triton,triton searched Triton twice per problem (its share of the time halved)."""
    import tilestack.tune.session as session

    seen = []
    real = session.Session.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("backends"))
        real(self, *args, **kwargs)
    monkeypatch.setattr(session.Session, "__init__", spy)
    monkeypatch.setattr(session.Session, "run", lambda self, problems, **_: [])
    res, _ = _tune(["-k", "softmax", "--small", "--size", "40", "--dtype", "bfloat16", "--budget-s", "1",
                    "--backends", "triton, triton,triton"], tmp_path)
    assert res.exit_code == 0, res.output
    assert seen == [("triton",)]


# ---- quantize / patch on models they cannot reach ---------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_quantize_refuses_a_torchscript_module(how):
    """Before: the float model came back unchanged, its answer bit for bit the float one, without a word."""
    model = _mlp()
    x = torch.randn(4, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # torch.jit's deprecation
        compiled = torch.jit.script(model) if how == "script" else torch.jit.trace(model, x)
    with pytest.raises(LaunchError, match=r"quantize: model is a TorchScript module \(\w+: scripted or traced\), "
                                          r"whose layers cannot be replaced; expected the torch.nn.Module itself"):
        tilestack.quantize(compiled)


def test_quantize_of_the_module_itself_still_quantizes():
    """The same model as an nn.Module: quantized, within int8's error of the float answer in float64."""
    model = _mlp()
    x = torch.randn(4, 16)
    want = model.double()(x.double())
    q = tilestack.quantize(_mlp(), "int8")
    assert sum(type(m).__name__ == "QuantLinear" for m in q.modules()) == 2
    got = q(x).double()
    assert 0 < (got - want).abs().max() < 5e-2 * want.abs().max()


def test_patch_refuses_a_torchscript_module():
    """Before: F was patched, the scripted model (which calls torch's op from compiled code) ran torch's SDPA."""
    import torch.nn.functional as F

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(nn.Linear(4, 4))
    before = F.scaled_dot_product_attention
    with pytest.raises(LaunchError, match=r"patch: model is a TorchScript module \(RecursiveScriptModule: scripted "
                                          r"or traced\), whose compiled code calls torch's scaled_dot_product_"
                                          r"attention directly"):
        tilestack.patch(scripted)
    assert F.scaled_dot_product_attention is before            # nothing patched


@pytest.mark.parametrize("backend", ["", 0, False])
def test_a_falsy_backend_is_refused_as_any_other_junk(backend):
    """Before: '' (and 0, False) ran on the default backend without a word, where 'Triton' is refused."""
    a = torch.randn(8, 16).bfloat16()
    with pytest.raises(BackendError, match=re.escape(f"backend={backend!r}; expected one of ('reference', 'triton', "
                                                     "'gluon')")):
        K.gemm(a, a.t(), backend=backend)
