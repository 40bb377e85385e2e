"""Round 10 of the planner's unseen inputs, the rest: bad inputs refused by the argument's name before any work
(zero, negative, NaN and huge sizes, unknown devices and dtypes, bad bandwidths and fits), GPUs of different memories
given to ``tilestack plan`` (one --memory-limit per GPU), and the plan file written, read back and run by
``tilestack train --plan`` on 2 gloo processes (a data-parallel ZeRO-1 plan of a tiny GPT)."""

import json
import math
import re

import pytest
import torch
from plan_models_round2 import FIT, Unit
from torch import nn
from typer.testing import CliRunner

from tilestack import config
from tilestack.cli import _register, app
from tilestack.parallel.model import ModelConfig
from tilestack.parallel.plan import (
    ClusterComm,
    CommModel,
    Plan,
    PlanError,
    RooflineCompute,
    describe_gpt,
    describe_module,
    describe_transformer,
    enumerate_plans,
    predict,
    read_plan,
    search,
    write_plan,
)
from tilestack.parallel.plan.search import gpu_limits, placeable

_register()
NAN, INF = float("nan"), float("inf")
KINDS = ("all_reduce", "all_gather", "reduce_scatter", "p2p")


@pytest.fixture(scope="module")
def small():
    return describe_transformer(n_layer=2, d=32, n_head=4, vocab=64, seq=16)


# ---- bad inputs, refused by name -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    ({"n_layer": 0}, "n_layer=0"), ({"d": -1}, "d=-1"), ({"n_head": NAN}, "n_head=nan"),
    ({"vocab": 10 ** 30}, "vocab=1000000000000000000000000000000"), ({"seq": 0}, "seq=0"), ({"seq": 2.5}, "seq=2.5"),
])
def test_describe_transformer_refuses_bad_sizes_by_name(kw, match):
    args = {"n_layer": 2, "d": 16, "n_head": 2, "vocab": 32, "seq": 8, **kw}
    with pytest.raises(PlanError, match=re.escape(match)):
        describe_transformer(**args)


@pytest.mark.parametrize("kw, match", [
    ({"world_size": 0}, "world_size=0"), ({"world_size": -3}, "world_size=-3"), ({"world_size": NAN}, "world_size=nan"),
    ({"world_size": 2.5}, "world_size=2.5"), ({"batch": 0}, "batch=0"), ({"batch": NAN}, "batch=nan"),
    ({"batch": 10 ** 20}, "batch=100000000000000000000"), ({"memory_limit": 0}, "memory_limit=0"),
    ({"memory_limit": -5}, "memory_limit=-5"), ({"memory_limit": NAN}, "memory_limit=nan"),
    ({"memory_limit": INF}, "memory_limit=inf"), ({"memory_limit": "1GB"}, "memory_limit='1GB'"),
    ({"memory_limit": [1e9, NAN]}, "memory_limit=[1000000000.0, nan]"),
    ({"memory_limit": [1e9]}, "expected 2 positive numbers of bytes, one per GPU"),
])
def test_search_refuses_bad_arguments_by_name(small, kw, match):
    args = {"world_size": 2, "batch": 8, **kw}
    with pytest.raises(PlanError, match=re.escape(match)):
        search(small, Unit(small), FIT, **args)


@pytest.mark.parametrize("fits, match", [
    ({k: {2: (1e-5, -1e-9)} for k in KINDS}, r"fits\['all_reduce'\]\[2\]=\(1e-05, -1e-09\)"),
    ({k: {2: (NAN, 1e-9)} for k in KINDS}, r"\(nan, 1e-09\)"),
    ({k: {2: (1e-5, INF)} for k in KINDS}, r"\(1e-05, inf\)"),
    ({k: {0: (1e-5, 1e-9)} for k in KINDS}, r"fits\['all_reduce'\]\[0\]"),
    ({"broadcast": {2: (1e-5, 1e-9)}}, r"fits\['broadcast'\]"),
])
def test_comm_fits_refuse_bad_bandwidths_by_name(fits, match):
    with pytest.raises(PlanError, match=match):
        CommModel(fits=fits, source="bad")


@pytest.mark.parametrize("kw, match", [
    ({"inter_bytes_per_s": NAN}, "inter_bytes_per_s=nan"), ({"inter_bytes_per_s": 0}, "inter_bytes_per_s=0"),
    ({"inter_bytes_per_s": INF}, "inter_bytes_per_s=inf"), ({"inter_alpha": -1}, "inter_alpha=-1"),
    ({"gpus_per_node": 0}, "gpus_per_node=0"), ({"nodes": 2.0}, "nodes=2.0"),
])
def test_cluster_refuses_bad_links_by_name(kw, match):
    with pytest.raises(PlanError, match=re.escape(match)):
        ClusterComm(intra=FIT, **kw)


def test_collective_times_refuse_nan_bytes_and_empty_groups():
    with pytest.raises(PlanError, match="nbytes=nan"):
        FIT.time("all_reduce", NAN, 2)
    with pytest.raises(PlanError, match="nbytes=-5; expected a finite number of bytes >= 0"):
        FIT.time("all_reduce", -5, 2)
    with pytest.raises(PlanError, match="n=0"):
        FIT.time("all_reduce", 8, 0)
    with pytest.raises(PlanError, match="kind='broadcast'"):
        FIT.time("broadcast", 8, 2)


@pytest.mark.parametrize("device, kw, match", [
    ("tpu-v9", {}, "device='tpu-v9' is not in tilestack.perf.device's table"),
    ("", {}, "device=''"), (None, {}, "device=None"),
    ("h200", {"dtype": "fp4x"}, "dtype='fp4x' for H200 SXM: no published fp4x peak; expected one its table row gives"),
    ("h200", {"matmul_efficiency": 0}, "matmul_efficiency=0"),
    ("h200", {"attention_efficiency": NAN}, "attention_efficiency=nan"),
    ("h200", {"host_s_per_op": NAN}, "host_s_per_op=nan"),
    ({"flops": {"bf16": INF}, "bandwidth": 1e12}, {}, "flops['bf16']=inf"),
    ({"flops": {"bf16": 1e15}, "bandwidth": NAN}, {}, "bandwidth=nan"),
    ({"flops": {"bf16": 1e15}, "bandwidth": -1}, {}, "bandwidth=-1"),
    ({"flops": {"bf16": 1e15}}, {}, "expected a dict of 'flops'"),
])
def test_roofline_refuses_unknown_devices_dtypes_and_bad_figures_by_name(small, device, kw, match):
    """An unknown dtype on a table device said "has no published fp4x peak or bandwidth" (neither dtype= nor the
    dtypes it has); it names both now."""
    with pytest.raises(PlanError, match=re.escape(match)):
        RooflineCompute(small, device, **kw)


@pytest.mark.parametrize("example, match", [
    (lambda: torch.randn(0, 4), "first dim is a batch of at least one sample"),
    (lambda: torch.full((2, 4), NAN), "NaN or inf"),
    (lambda: torch.tensor(1.0), "first dim is a batch"),
    (lambda: 3, "example_input=int"),
])
def test_describe_module_refuses_bad_examples_by_name(example, match):
    with pytest.raises(PlanError, match=match):
        describe_module(nn.Linear(4, 4), example())


@pytest.mark.parametrize("kw, match", [
    ({"batch": NAN}, "batch=nan"), ({"batch": True}, "batch=True"), ({"dp": 0}, "dp=0"), ({"tp": -1}, "tp=-1"),
    ({"schedule": "zb"}, "schedule='zb'"), ({"recompute": "some"}, "recompute='some'"), ({"zero": 3}, "zero=3"),
])
def test_plans_refuse_bad_fields_by_name(small, kw, match):
    with pytest.raises(PlanError, match=re.escape(match)):
        Plan(**{"batch": 4, **kw}).check(small)


# ---- tilestack plan: GPUs of different memories --------------------------------------------------------------------

MODEL = ["--layers", "2", "--d", "32", "--heads", "4", "--vocab", "64", "--seq", "16"]


def _plan(tmp_path, *args):
    with config.override(cache_dir=tmp_path):
        return CliRunner().invoke(app, ["plan", *args], terminal_width=200)


def _said(res, text):
    flat = "".join(re.sub("[\u2500-\u257f]", "", res.output).split())
    return res.exit_code == 2 and "".join(text.split()) in flat


def test_the_cli_takes_one_memory_limit_per_gpu(tmp_path, small):
    """``--memory-limit 80GB,80GB,40GB,...`` was refused as "expected bytes with an optional unit", where search
    takes per-GPU limits; the CLI now passes them, and the chosen plan is placeable on those GPUs."""
    out = tmp_path / "plan.json"
    res = _plan(tmp_path, "--nproc", "5", *MODEL, "--batch", "5", "--device", "h200", "--memory-limit",
                "80GB,80GB,40GB,40GB,40GB", "--out", str(out))
    assert res.exit_code == 0, res.output
    spec = read_plan(out)
    assert spec["nproc"] == 5 and spec["predicted"]["memory_bytes"] <= 40e9


def test_per_gpu_limits_that_fit_only_the_pipeline_ranks_that_can_be_placed(tmp_path):
    """Two GPUs, one small: the smallest plan of the 2-block GPT fits neither rank in 1 KB; the CLI names the
    option and the smallest plan's need (before any timing)."""
    res = _plan(tmp_path, "--nproc", "2", *MODEL, "--batch", "4", "--device", "h200", "--memory-limit", "80GB,1KB")
    assert _said(res, "--memory-limit [80000000000.0, 1000.0] bytes per GPU: no plan fits"), res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("limit, match", [
    ("80GB,80GB,40GB", "--memory-limit '80GB,80GB,40GB': 3 sizes for --nproc 5"),
    ("80GB,80GB,-1GB,40GB,40GB", "--memory-limit '-1GB'"),
    ("80GB,80GB,nanGB,40GB,40GB", "--memory-limit 'nanGB'"),
    ("80GB,80GB,1e400,40GB,40GB", "--memory-limit '1e400'"),
])
def test_bad_per_gpu_limits_are_refused_by_the_option(tmp_path, limit, match):
    res = _plan(tmp_path, "--nproc", "5", *MODEL, "--batch", "5", "--device", "h200", "--memory-limit", limit)
    assert _said(res, match), res.output


def test_the_cli_and_search_agree_on_per_gpu_limits(tmp_path, small):
    """The CLI's first row is search's first plan under the same per-GPU limits (a limit between two plans' peaks)."""
    from tilestack.parallel.plan import RooflineCompute, h200_nccl
    rc, comm = RooflineCompute(small, "h200", dtype="fp32"), h200_nccl()
    preds = [predict(p, small, rc, comm) for p in enumerate_plans(small, 2, 4)]
    mid = sorted(p.memory_bytes for p in preds)[len(preds) // 2]
    limits = [1e12, mid]
    ranked = search(small, rc, comm, world_size=2, batch=4, memory_limit=limits)
    assert all(placeable(r.prediction, gpu_limits("t", limits, 2)) for r in ranked)
    assert len(ranked) < len(preds)


# ---- the plan file, round trip and run -----------------------------------------------------------------------------

def test_plan_file_of_a_zero1_plan_round_trip_then_train_it_on_two_gloo_ranks(tmp_path):
    cfg = ModelConfig(n_layer=2, d=32, n_head=4, vocab=64, max_seq=16)
    desc = describe_gpt(cfg, seq=16)
    plan = Plan(batch=4, dp=2, zero=1)
    pred = predict(plan, desc, Unit(desc), FIT)
    path = write_plan(pred, desc, tmp_path / "dp2.json")
    raw = json.loads(path.read_text())
    spec = read_plan(path)
    assert spec == raw
    assert spec["nproc"] == 2 and spec["batch"] == 4 and spec["seq"] == 16 and spec["label"] == "dp2-zero1"
    assert spec["parallel"] == plan.parallel_kwargs() and spec["model"] == {**desc.config}
    assert spec["predicted"]["memory_bytes"] == pred.memory_bytes and spec["predicted"]["step_s"] == pred.step_s
    # written twice: the same bytes (the search and the file are deterministic)
    again = write_plan(predict(plan, desc, Unit(desc), FIT), desc, tmp_path / "again.json")
    assert again.read_text() == path.read_text()
    with config.override(cache_dir=tmp_path):
        run = CliRunner().invoke(app, ["train", "--plan", str(path), "--steps", "2", "--no-store"])
    assert run.exit_code == 0, run.output
    loss = float(re.search(r"final loss ([0-9.]+)", run.output).group(1))
    assert "2 ranks" in run.output and math.isfinite(loss) and 0 < loss < 2 * math.log(64)


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.update(nproc=3), "nproc"),
    (lambda s: s.update(batch=0), "batch=0"),
    (lambda s: s.update(seq=-1), "seq=-1"),
    (lambda s: s["parallel"].update(dp=5), "dp"),
    (lambda s: s.update(dtype="float64"), "dtype='float64'"),
])
def test_a_plan_file_edited_by_hand_is_refused_naming_the_field(tmp_path, edit, match):
    cfg = ModelConfig(n_layer=2, d=32, n_head=4, vocab=64, max_seq=16)
    desc = describe_gpt(cfg, seq=16)
    path = write_plan(predict(Plan(batch=4, dp=2), desc, Unit(desc), FIT), desc, tmp_path / "p.json")
    spec = json.loads(path.read_text())
    edit(spec)
    path.write_text(json.dumps(spec))
    with pytest.raises(PlanError, match=re.escape(match)):
        read_plan(path)
