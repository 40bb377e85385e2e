"""The planner, round 9 continued: goodput by hand (Pollux's E(M), AdaScale's gain, the adaptive batch), gradient
noise scales of synthetic gradients whose answer is computed here, the plan file round trip and one run of it by
``tilestack train --plan`` on 2 gloo processes, the ranked table of ``tilestack plan`` (sorted, the bounding term
named), and bad arguments refused by name before any work.

Found and fixed (each test below failed first):
- numpy counts were refused by the goodput functions (``efficiency(np.int64(16), ...)``: "expected a positive, finite
  batch size"; ``AdaptiveBatch`` candidates, ``GradientNoiseScale.observe``'s micro_batch), where ``search`` takes
  them: a batch list built with numpy could be planned but not ranked by goodput (goodput._number, _count);
- ``AdaptiveBatch(base_batch=0)`` was made, and ``choose(nan)`` answered a batch of 0 (now refused when made);
  ``GoodputController(candidates=8)`` raised a TypeError from its own error message, ``every=True`` was taken as 1
  and a negative starting ``batch`` was kept;
- ``tilestack plan --comm NAME`` was dropped without a word on a GPU or a device-table device (the H200 figures
  were used, whether NAME was stored or not): an unknown name is refused before any work, a stored one is used;
- ``tilestack plan --layers -2`` failed inside ModelConfig ("ModelConfig.n_layer=-2", not the option) and
  ``--vocab -3`` was reported as "given without --vocab".
"""

import importlib
import json
import math
import re

import numpy as np
import pytest
import torch
from plan_models_round2 import FIT, Unit
from typer.testing import CliRunner

from tilestack import config
from tilestack.cli import _register, app
from tilestack.parallel.model import ModelConfig
from tilestack.parallel.plan import (
    AdaptiveBatch,
    GoodputController,
    GradientNoiseScale,
    Plan,
    PlanError,
    accumulate_and_observe,
    describe_gpt,
    efficiency,
    predict,
    read_plan,
    search,
    write_plan,
)
from tilestack.parallel.plan.comm import CommModel, comm_path
from tilestack.parallel.plan.goodput import lr_scale
from tilestack.parallel.plan.predict import TERMS

_register()


# ---- Pollux's statistical efficiency and AdaScale's gain, by hand ----------------------------------------------------

@pytest.mark.parametrize("m, phi, m0, e", [
    (32, 24.0, 8, 32 / 56),             # (24 + 8) / (24 + 32)
    (8, 24.0, 8, 1.0),                  # the base batch itself
    (8, 24.0, 32, 56 / 32),             # a batch below the base: more than 1
    (1000, 0.0, 10, 0.01),              # no noise: only M0 / M counts
    (1000, math.inf, 10, 1.0),          # all noise: every sample counts
])
def test_efficiency_by_hand(m, phi, m0, e):
    assert efficiency(m, phi, m0) == pytest.approx(e, rel=1e-12)
    assert lr_scale(m, phi, m0) == pytest.approx(m / m0 * e, rel=1e-12)


def test_goodput_functions_take_numpy_counts_as_numbers():
    assert efficiency(np.int64(32), np.float32(24.0), np.int64(8)) == pytest.approx(4 / 7, rel=1e-7)
    assert isinstance(efficiency(np.int64(32), 24.0, np.int64(8)), float)
    chooser = AdaptiveBatch([np.int64(8), np.int64(64)], lambda m: float(m), np.int64(8))
    assert chooser.choose(np.float64(1e9)) == 64 and isinstance(chooser.choose(1e9), int)
    gns = GradientNoiseScale()
    assert gns.observe([torch.tensor([3.0, 0.0]), torch.tensor([1.0, 0.0])], np.int64(1)) == pytest.approx(2 / 3)


def test_adaptive_batch_is_the_argmax_of_goodput_by_hand():
    """samples/s = M / (0.01 + 0.001 M) (a fixed cost per step, then linear); phi = 24, M0 = 8:
    goodput(M) = M / (0.01 + 0.001 M) x (32 / (24 + M)), computed for each candidate here."""
    def rate(m):
        return m / (0.01 + 0.001 * m)

    cands = [4, 8, 16, 32, 64, 128]
    chooser = AdaptiveBatch(cands, rate, 8)
    by_hand = max(cands, key=lambda m: rate(m) * 32 / (24 + m))
    assert chooser.choose(24.0) == by_hand == 16
    assert chooser.choose(math.inf) == 128 and chooser.choose(float("nan")) == 8


@pytest.mark.parametrize("kw, match", [
    (dict(candidates=[8, 16], base_batch=0), "base_batch=0"),
    (dict(candidates=[8, 16], base_batch=True), "base_batch=True"),
    (dict(candidates=[], base_batch=8), "candidates=\\[\\]"),
    (dict(candidates=8, base_batch=8), "candidates=8"),
    (dict(candidates=[8, 2.5], base_batch=8), "candidates="),
])
def test_adaptive_batch_refuses_bad_fields_when_made(kw, match):
    with pytest.raises(PlanError, match=match):
        AdaptiveBatch(samples_per_s=float, **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(candidates=8), "candidates=8"),
    (dict(candidates=[8, 1]), "candidates="),
    (dict(every=True), "every=True"),
    (dict(probe_every=0), "probe_every=0"),
    (dict(batch=-4), "batch=-4"),
])
def test_goodput_controller_refuses_bad_fields_by_name(kw, match):
    args = dict(candidates=[8, 16], step_s={8: 0.1, 16: 0.15}, base_batch=8, base_lr=1e-3) | kw
    with pytest.raises(PlanError, match=match):
        GoodputController(**args)


def test_goodput_controller_takes_numpy_candidates():
    ctl = GoodputController(candidates=list(np.array([8, 16])), step_s={8: 0.1, 16: 0.15}, base_batch=np.int64(8),
                            base_lr=1e-3)
    assert ctl.batch == 8 and ctl.samples_per_s(16) == pytest.approx(16 / 0.15)


# ---- gradient noise scales with an answer computed here -------------------------------------------------------------

def test_noise_scale_of_two_single_sample_gradients_by_hand():
    """g1 = (3, 0), g2 = (1, 0), one sample each: |g_b|^2 = (9 + 1) / 2 = 5, |g_B|^2 = |(2, 0)|^2 = 4 (B = 2);
    |G|^2 = (2 x 4 - 5) / 1 = 3, tr(Sigma) = (5 - 4) / (1 - 1/2) = 2, phi = 2 / 3."""
    gns = GradientNoiseScale()
    assert gns.observe([torch.tensor([3.0, 0.0]), torch.tensor([1.0, 0.0])], 1) == pytest.approx(2 / 3, rel=1e-12)
    assert gns.grad_sq == pytest.approx(3.0) and gns.trace == pytest.approx(2.0)
    # a second observation, g1 = g2 = (2, 0): |G|^2 = 4, tr = 0; smoothed at 0.9: (0.9 x 2) / (0.9 x 3 + 0.1 x 4)
    phi = gns.observe([torch.tensor([2.0, 0.0]), torch.tensor([2.0, 0.0])], 1)
    assert phi == pytest.approx(1.8 / 3.1, rel=1e-12)
    assert gns.samples == 4 and [s for s, _ in gns.history] == [2, 4]


def test_noise_scale_of_four_gradients_with_orthogonal_noise_by_hand():
    """G = (2, 0, 0) plus noise (0, +-3, 0), (0, 0, +-3), micro-batches of 2: |g_b|^2 = 4 + 9 = 13, |g_B|^2 = 4,
    B = 8: |G|^2 = (8 x 4 - 2 x 13) / 6 = 1, tr(Sigma) = (13 - 4) / (1/2 - 1/8) = 24, phi = 24."""
    grads = [torch.tensor(v, dtype=torch.float64) for v in
             ([2.0, 3.0, 0.0], [2.0, -3.0, 0.0], [2.0, 0.0, 3.0], [2.0, 0.0, -3.0])]
    assert GradientNoiseScale().observe(grads, 2) == pytest.approx(24.0, rel=1e-12)


def test_noise_scale_through_accumulation_of_a_one_weight_regression_by_hand():
    """w = 0, loss (w x - y)^2: a sample's gradient is -2 x y; x = (1, 1), y = (1.5, 0.5) give -3 and -1, the first
    test's gradients: phi = 2 / 3, and the accumulated gradient is their mean, -2."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    x, y = torch.tensor([[1.0], [1.0]]), torch.tensor([[1.5], [0.5]])
    gns = GradientNoiseScale()
    loss = accumulate_and_observe(model, torch.nn.functional.mse_loss, x, y, micro_batches=2, gns=gns)
    assert loss == pytest.approx((1.5 ** 2 + 0.5 ** 2) / 2)
    assert model.weight.grad.item() == pytest.approx(-2.0)
    assert gns.phi == pytest.approx(2 / 3, rel=1e-6)


def test_noise_scale_refuses_what_it_cannot_read():
    gns = GradientNoiseScale()
    for grads, b, match in (([torch.ones(2)], 1, "at least 2"), ([torch.ones(2), torch.ones(3)], 1, "one shape"),
                            ([torch.ones(2), torch.tensor([1.0, math.nan])], 1, "NaN or inf"),
                            ([torch.ones(2), torch.ones(2)], 0, "micro_batch=0")):
        with pytest.raises(PlanError, match=match):
            gns.observe(grads, b)
    assert gns.grad_sq is None and math.isnan(gns.phi)           # nothing refused was kept


# ---- goodput ranking in the search -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt():
    return describe_gpt(ModelConfig(n_layer=2, d=32, n_head=4, vocab=64, max_seq=16), seq=16)


def test_search_by_goodput_is_samples_per_s_times_efficiency_sorted(gpt):
    batches = [np.int64(4), 8, 16]
    ranked = search(gpt, Unit(gpt), FIT, world_size=2, batch=batches, rank_by="goodput",
                    efficiency=lambda m: efficiency(m, 10.0, 4))
    assert {r.plan.batch for r in ranked} == {4, 8, 16}
    for r in ranked:
        assert r.goodput == pytest.approx(r.plan.batch / r.step_s * (14 / (10 + r.plan.batch)), rel=1e-12)
    assert [r.goodput for r in ranked] == sorted((r.goodput for r in ranked), reverse=True)


# ---- the plan file: written, read, run ----------------------------------------------------------------------------

def test_plan_file_round_trip_then_train_it_on_two_gloo_ranks(tmp_path, gpt):
    plan = Plan(batch=4, pp=2, schedule="gpipe", microbatches=2)
    pred = predict(plan, gpt, Unit(gpt), FIT)
    assert pred.runnable
    path = write_plan(pred, gpt, tmp_path / "pp2.json")
    spec = read_plan(path)
    assert spec["nproc"] == 2 and spec["batch"] == 4 and spec["seq"] == 16 and spec["dtype"] == "float32"
    assert spec["parallel"] == plan.parallel_kwargs() and spec["label"] == "pp2-gpipe-m2"
    assert spec["bounds"] == [0, 2, 4] and spec["model"] == {**gpt.config}
    assert spec["predicted"]["step_s"] == pred.step_s and spec["predicted"]["bound"] in TERMS
    assert sum(spec["predicted"]["memory_at_peak"].values()) == pytest.approx(pred.memory_bytes, rel=1e-12)
    back = Plan(batch=spec["batch"], **{k: v for k, v in (
        ("pp", spec["parallel"]["pp"]), ("dp", spec["parallel"]["dp"]), ("schedule", spec["parallel"]["pp_schedule"]),
        ("microbatches", spec["parallel"]["microbatches"]))})
    assert back == plan
    with config.override(cache_dir=tmp_path):
        run = CliRunner().invoke(app, ["train", "--plan", str(path), "--steps", "3", "--no-store"])
    assert run.exit_code == 0, run.output
    loss = float(re.search(r"final loss ([0-9.]+)", run.output).group(1))
    assert "2 ranks" in run.output and math.isfinite(loss) and 0 < loss < 2 * math.log(64)


# ---- tilestack plan: the ranked table and refusals ------------------------------------------------------------------

MODEL = ["--layers", "6", "--d", "48", "--heads", "6", "--vocab", "96", "--seq", "16"]


def _rows(output: str) -> list[list[str]]:
    """The ranked table's rows, as cells."""
    rows = []
    for line in output.splitlines():
        cells = [c.strip() for c in re.split("[\u2502\u2503]", line)[1:-1]]
        if len(cells) >= 9 and cells[0].isdigit():
            rows.append(cells)
    return rows


def test_the_ranked_table_of_six_ranks_is_sorted_and_names_the_bound(tmp_path):
    with config.override(cache_dir=tmp_path):
        res = CliRunner().invoke(app, ["plan", "--nproc", "6", *MODEL, "--batch", "12", "--device", "h200",
                                       "--top", "500"], terminal_width=200)
    assert res.exit_code == 0, res.output
    rows = _rows(res.output)
    count = int(re.search(r"(\d+) plans fit", res.output).group(1))
    assert len(rows) == count > 20
    assert [int(r[0]) for r in rows] == list(range(1, count + 1))
    steps = [float(r[3]) for r in rows]
    assert steps == sorted(steps)
    assert all(r[7] in TERMS for r in rows)
    starred = [r for r in rows if r[1].endswith("*")]
    assert len(starred) == 1 and starred[0] is next(r for r in rows if r[8] == "yes")
    assert re.search(rf"chosen \(\*\): {re.escape(starred[0][1][:-2])}, predicted .* bound by {starred[0][7]}",
                     res.output)
    # the samples/s column is the batch over the step
    for r in rows:
        assert float(r[4].replace(",", "")) == pytest.approx(12 / (float(r[3]) / 1e3), rel=0.01)


def test_the_table_just_above_and_below_the_smallest_plans_memory(tmp_path):
    """The smallest plan's peak (read from the unlimited table's MiB column, rounded to 0.1 MiB): a limit of 0.2 MiB
    above it plans, one of 0.1 MiB below the rounded value says no plan fits (not a traceback)."""
    with config.override(cache_dir=tmp_path):
        res = CliRunner().invoke(app, ["plan", "--nproc", "2", *MODEL, "--batch", "4", "--device", "h200", "--top",
                                       "500"], terminal_width=200)
        least = min(float(r[5].replace(",", "")) for r in _rows(res.output))
        above = CliRunner().invoke(app, ["plan", "--nproc", "2", *MODEL, "--batch", "4", "--device", "h200",
                                         "--memory-limit", f"{least + 0.2:.2f}MiB"])
        below = CliRunner().invoke(app, ["plan", "--nproc", "2", *MODEL, "--batch", "4", "--device", "h200",
                                         "--memory-limit", f"{least - 0.1:.2f}MiB"])
    assert above.exit_code == 0, above.output
    assert below.exit_code == 2 and "no plan fits" in below.output and "Traceback" not in below.output


def _said(res, text: str) -> bool:
    flat = "".join(re.sub("[\u2500-\u257f]", "", res.output).split())
    return res.exit_code == 2 and "".join(text.split()) in flat


@pytest.mark.parametrize("args, match", [
    (["--layers", "-2", "--d", "32", "--heads", "4", "--vocab", "64"], "--layers -2; expected a positive int"),
    (["--layers", "2", "--d", "32", "--heads", "4", "--vocab", "-3"], "--vocab -3; expected a positive int"),
    (["--layers", "2", "--d", "30", "--heads", "4", "--vocab", "64"], "--d 30 is not divisible by --heads 4"),
    ([*MODEL, "--comm", "no-such-fit", "--device", "h200"], "--comm 'no-such-fit'"),
    ([*MODEL, "--dtype", "float16"], "--dtype 'float16'"),
    ([*MODEL, "--rank-by", "speed"], "--rank-by 'speed'"),
    ([*MODEL, "--memory-limit", "-5MB"], "--memory-limit '-5MB'"),
    ([*MODEL, "--memory-limit", "1e-400"], "--memory-limit '1e-400'"),
    ([*MODEL, "--batch", "8,0"], "--batch '8,0'"),
    ([*MODEL, "--base-batch", "-1"], "--base-batch -1"),
    ([*MODEL, "--rank-by", "goodput", "--noise-scale", "nan"], "--noise-scale nan"),
    ([*MODEL, "--measure", "2", "--device", "h200"], "--measure 2 with --device h200"),
    (["--layers", "3", "--d", "48", "--heads", "6", "--vocab", "95", "--batch", "5"],
     "no plan of world_size=2 fits batch=5"),
])
def test_bad_plan_arguments_are_refused_by_name_before_any_work(tmp_path, monkeypatch, args, match):
    import tilestack.parallel.plan as plan_pkg
    from tilestack.parallel.plan import compute as compute_mod
    search_mod = importlib.import_module("tilestack.parallel.plan.search")  # (plan.search is the function)

    def boom(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    for mod in (plan_pkg, compute_mod):
        monkeypatch.setattr(mod.MeasuredCompute, "for_gpt", boom)
    monkeypatch.setattr(search_mod, "search", boom)
    with config.override(cache_dir=tmp_path):
        res = CliRunner().invoke(app, ["plan", "--nproc", "2", *args])
        assert _said(res, match), res.output
        assert not comm_path("gloo-cpu").exists()


def test_a_stored_fit_named_by_comm_is_used_on_a_device_table_device(tmp_path):
    fit = CommModel(fits={k: {2: (1e-3, 1e-9)} for k in ("all_reduce", "all_gather", "reduce_scatter", "p2p")},
                    source="my cluster's fit")
    with config.override(cache_dir=tmp_path):
        path = comm_path("mine")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fit.to_json()))
        res = CliRunner().invoke(app, ["plan", "--nproc", "2", *MODEL, "--device", "h200", "--comm", "mine"],
                                 terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "my cluster's fit" in res.output


def test_a_cpu_limit_that_only_a_cpu_plan_fits_is_not_refused_before_measuring(tmp_path, monkeypatch):
    """On a CPU AdamW keeps no copy of the second moments beside the gradients (its multi-tensor path on a GPU
    does), so a CPU plan peaks lower. ``tilestack plan`` checked the limit before measuring with a GPU's unit model,
    and refused a limit between the two least peaks as fitting no plan. The measured compute is replaced here by
    unit times on 2 cores (memory does not depend on the times), the collectives by a stored fit."""
    import tilestack.parallel.plan as plan_pkg
    from tilestack.parallel.plan import enumerate_plans

    class UnitCPU(Unit):
        cores = 2

    desc = describe_gpt(ModelConfig(n_layer=2, d=32, n_head=4, vocab=64, max_seq=16), seq=16)
    least_cpu = min(predict(p, desc, UnitCPU(desc), FIT).memory_bytes for p in enumerate_plans(desc, 2, 2))
    least_gpu = min(predict(p, desc, Unit(desc), FIT).memory_bytes for p in enumerate_plans(desc, 2, 2))
    assert least_cpu < least_gpu
    limit = (least_cpu + least_gpu) // 2
    monkeypatch.setattr(plan_pkg.MeasuredCompute, "for_gpt", classmethod(lambda cls, d, **kw: UnitCPU(d)))
    with config.override(cache_dir=tmp_path):
        path = comm_path("gloo-cpu")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(FIT.to_json()))
        out = tmp_path / "plan.json"
        res = CliRunner().invoke(app, ["plan", "--nproc", "2", "--layers", "2", "--d", "32", "--heads", "4",
                                       "--vocab", "64", "--seq", "16", "--batch", "2", "--memory-limit",
                                       f"{limit:.0f}", "--out", str(out)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["predicted"]["memory_bytes"] <= limit


def test_a_plan_file_of_uneven_stages_is_refused_not_trained_on_the_even_split(tmp_path):
    """A GPT of 4 blocks with stages of 1 and 3 blocks (bounds (0, 2, 6), as Alpa's DP or a hand split gives) is
    predicted and written with runnable=false; the Trainer splits evenly, so running the file trained (0, 3, 6),
    another plan than the one predicted. read_plan and tilestack train now refuse it by its bounds."""
    gpt4 = describe_gpt(ModelConfig(n_layer=4, d=32, n_head=4, vocab=64, max_seq=16), seq=16)
    pred = predict(Plan(batch=4, pp=2, schedule="gpipe", microbatches=2, bounds=(0, 2, 6)), gpt4, Unit(gpt4), FIT)
    assert not pred.runnable
    path = write_plan(pred, gpt4, tmp_path / "uneven.json")
    with pytest.raises(PlanError, match=r"bounds=\[0, 2, 6\].*expected \[0, 3, 6\]"):
        read_plan(path)
    run = CliRunner().invoke(app, ["train", "--plan", str(path), "--steps", "3", "--no-store"])
    assert _said(run, "bounds=[0, 2, 6]"), run.output
    # the even split of the same plan reads
    even = write_plan(predict(Plan(batch=4, pp=2, schedule="gpipe", microbatches=2), gpt4, Unit(gpt4), FIT), gpt4,
                      tmp_path / "even.json")
    assert read_plan(even)["bounds"] == [0, 3, 6]


# ---- numpy numbers where the planner takes numbers ------------------------------------------------------------------

def test_numpy_numbers_are_numbers_across_the_planner(gpt):
    """Each was refused as "expected a positive int" / "finite numbers" / "a positive finite efficiency": a Plan of
    numpy degrees, simulate's numpy counts and times, Alpa's numpy sub-meshes and stage seconds, an E(M) in float32."""
    from tilestack.parallel.plan import alpa_stages, brute_force_stages, simulate

    plan = Plan(batch=np.int64(4), dp=np.int64(2), bounds=[np.int64(0), np.int64(4)])
    assert plan == Plan(batch=4, dp=2, bounds=(0, 4)) and type(plan.batch) is int
    pred = predict(plan, gpt, Unit(gpt), FIT)
    assert pred.runnable and pred.step_s == predict(Plan(batch=4, dp=2), gpt, Unit(gpt), FIT).step_s
    sim = simulate("1f1b", pp=np.int64(2), stages_per_rank=1, microbatches=np.int64(2),
                   fwd=np.array([1.0, 1.0], dtype=np.float32), bwd=[2.0, np.float32(2.0)], p2p=[0.0, 0.0])
    assert sim.makespan == pytest.approx(9.0)                        # (m + p - 1)(f + b) = 3 x 3
    kw = dict(n_devices=np.int64(2), submeshes=(np.int64(1), np.int64(2)), microbatches=np.int64(2),
              stage_cost=lambda k, i, d, after: (np.float32((i - k) / d), f"{d}"))
    assert alpa_stages(3, **kw).latency == pytest.approx(brute_force_stages(3, **kw).latency) == pytest.approx(3.0)
    ranked = search(gpt, Unit(gpt), FIT, world_size=2, batch=[4, 8], rank_by="goodput",
                    efficiency=lambda m: np.float32(8 / (4 + m)))
    assert all(r.goodput == pytest.approx(r.plan.batch / r.step_s * 8 / (4 + r.plan.batch), rel=1e-6) for r in ranked)


def test_numpy_arrays_of_batches_and_per_gpu_limits_are_lists(gpt):
    """np.array([4, 8]) of batches and an array of per-GPU limits are no collections.abc.Sequence: both were
    refused ("expected a positive int or a non-empty sequence", "a positive number of bytes per rank")."""
    as_list = search(gpt, Unit(gpt), FIT, world_size=2, batch=[4, 8], memory_limit=[2**30, 2**29])
    as_array = search(gpt, Unit(gpt), FIT, world_size=2, batch=np.array([4, 8]),
                      memory_limit=np.array([2**30, 2**29]))
    assert [(r.plan, r.step_s) for r in as_array] == [(r.plan, r.step_s) for r in as_list]
    with pytest.raises(PlanError, match="bytes per GPU"):
        search(gpt, Unit(gpt), FIT, world_size=2, batch=4, memory_limit=np.array([1000.0, 1000.0]))
    with pytest.raises(PlanError, match="expected 2 positive numbers of bytes"):
        search(gpt, Unit(gpt), FIT, world_size=2, batch=4, memory_limit=np.array([2**30, 2**30, 2**30]))


def test_accumulation_takes_a_numpy_micro_batch_count():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    gns = GradientNoiseScale()
    accumulate_and_observe(model, torch.nn.functional.mse_loss, torch.tensor([[1.0], [1.0]]),
                           torch.tensor([[1.5], [0.5]]), micro_batches=np.int64(2), gns=gns)
    assert gns.phi == pytest.approx(2 / 3, rel=1e-6)
    for bad in (True, 0, 3, 2.0):
        with pytest.raises(PlanError, match=f"micro_batches={bad}"):
            accumulate_and_observe(model, torch.nn.functional.mse_loss, torch.ones(2, 1), torch.ones(2, 1),
                                   micro_batches=bad)


def test_the_goodput_table_is_samples_per_s_times_efficiency_and_sorted_by_it(tmp_path):
    """--rank-by goodput over batches 4, 8, 16 at phi 12 (M0: the smallest, 4): a row's goodput is its samples/s x
    (12 + 4) / (12 + M), the rows fall in goodput, every batch is ranked."""
    with config.override(cache_dir=tmp_path):
        res = CliRunner().invoke(app, ["plan", "--nproc", "2", *MODEL, "--batch", "4,8,16", "--device", "h200",
                                       "--rank-by", "goodput", "--noise-scale", "12", "--top", "1000"],
                                 terminal_width=220)
    assert res.exit_code == 0, res.output
    rows = _rows(res.output)
    assert len(rows) == int(re.search(r"(\d+) plans fit", res.output).group(1))
    assert {int(r[2]) for r in rows} == {4, 8, 16}
    goodputs = [float(r[5].replace(",", "")) for r in rows]
    for r, g in zip(rows, goodputs, strict=True):
        assert g == pytest.approx(float(r[4].replace(",", "")) * 16 / (12 + int(r[2])), rel=2e-3, abs=0.06)
        assert r[8] in TERMS
    assert goodputs == sorted(goodputs, reverse=True)


@pytest.mark.parametrize("plan", [
    Plan(batch=4, pp=2, schedule="interleaved-1f1b", stages_per_rank=2, microbatches=2),
    Plan(batch=8, pp=4, schedule="1f1b", microbatches=4),
    Plan(batch=4, dp=2, tp=2, sp=True, zero=0),
])
def test_plan_files_of_even_stages_read_back_as_written(tmp_path, plan):
    gpt4 = describe_gpt(ModelConfig(n_layer=4, d=32, n_head=4, vocab=64, max_seq=16), seq=16, dtype_bytes=2)
    pred = predict(plan, gpt4, Unit(gpt4), FIT)
    assert pred.runnable
    spec = read_plan(write_plan(pred, gpt4, tmp_path / "plan.json"))
    assert spec["bounds"] == list(plan.stage_bounds(gpt4)) and spec["parallel"] == plan.parallel_kwargs()
    assert spec["dtype"] == "bfloat16" and spec["nproc"] == plan.world_size


def test_numpy_figures_in_fits_rooflines_overlaps_and_peaks_are_numbers(tmp_path, gpt):
    """A fit from np.polyfit (np.int64 group sizes, np.float32 seconds), an np.float32 efficiency or host cost, an
    np.float32 overlap and peak FLOP/s: each was refused by name as not a number; now kept as Python numbers."""
    from tilestack.parallel.plan import RooflineCompute

    given = {np.int64(2): (np.float32(2e-5), np.float64(1e-10))}
    cm = CommModel(fits={"all_reduce": given}, source="numpy fit")
    assert cm.fits == {"all_reduce": {2: (float(np.float32(2e-5)), 1e-10)}} and type(next(iter(given))) is np.int64
    assert cm.time("all_reduce", 1e6, 2) == pytest.approx(2e-5 + 1e-4, rel=1e-6)
    with pytest.raises(PlanError, match=r"fits\['all_reduce'\]\[True\]"):
        CommModel(fits={"all_reduce": {True: (1e-5, 1e-9)}}, source="bool size")
    rc = RooflineCompute(gpt, "h200", matmul_efficiency=np.float32(0.5), host_s_per_op=np.float32(0.0))
    assert rc.layer_times(1, 2, 1) == RooflineCompute(gpt, "h200", matmul_efficiency=float(np.float32(0.5)),
                                                      host_s_per_op=0.0).layer_times(1, 2, 1)
    plan = Plan(batch=4, dp=2)
    half = predict(plan, gpt, Unit(gpt), FIT, overlap_dp=np.float32(0.5))
    assert half.step_s == pytest.approx(predict(plan, gpt, Unit(gpt), FIT, overlap_dp=0.5).step_s, rel=1e-12)
    spec = json.loads(write_plan(half, gpt, tmp_path / "p.json", peak_flops=np.float32(1e12)).read_text())
    assert spec["predicted"]["mfu"] == pytest.approx(half.mfu(1e12), rel=1e-6)


def test_a_plan_of_a_compute_model_with_float32_times_is_written(tmp_path, gpt):
    """Every term of a compute model that answers np.float32 seconds is an np.float32: the plan file was a TypeError
    (not JSON serializable) after the whole search."""
    class Float32(Unit):
        def _times(self, layer, index, micro_batch, tp):
            return np.float32(1.0), np.float32(2.0)

    ranked = search(gpt, Float32(gpt), FIT, world_size=2, batch=4)
    spec = json.loads(write_plan(ranked[0].prediction, gpt, tmp_path / "f32.json").read_text())
    assert spec["predicted"]["step_s"] == pytest.approx(float(ranked[0].step_s))
    assert spec["predicted"]["bound"] in TERMS
