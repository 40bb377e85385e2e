"""The cost model: features, the forest's mean and uncertainty, expected improvement, active search, the dataset."""

import json
import math

import numpy as np
import pytest
import torch

from tilestack.errors import TunableError
from tilestack.kernels.gemm import gemm_kernel
from tilestack.tune.constraints import estimate
from tilestack.tune.cost_model import CostModel, Dataset, active_search, bound_slope, expected_improvement, target
from tilestack.tune.devices import DeviceKey
from tilestack.tune.features import (
    FEATURES,
    config_features,
    derived_features,
    device_peaks,
    resource_features,
    vector,
)

pytest.importorskip("sklearn")
H100 = DeviceKey.parse("sm90-132sm-227kb")


def _gemm_features(n=4096, **cfg):
    m = [torch.empty(n, n, dtype=torch.bfloat16, device="meta") for _ in range(3)]
    e = estimate(gemm_kernel, m, {}, {"GROUP_M": 8, **cfg}, H100)
    peak, bw = device_peaks("NVIDIA H200")
    return config_features(e, sms=H100.sms, shared_per_block=H100.shared_bytes, peak_flops=peak, bandwidth=bw)


def test_gemm_features():
    f = _gemm_features(BM=128, BN=256, BK=64, num_warps=8, num_stages=3)
    assert set(f) == set(FEATURES)
    assert f["log2_warps"] == 3 and f["stages"] == 3 and f["log2_bm"] == 7 and f["log2_bn"] == 8
    assert f["log2_programs"] == math.log2(32 * 16)                       # (4096 / 128) x (4096 / 256) tiles
    assert f["log2_flops"] == pytest.approx(math.log2(2 * 4096**3))
    # 2 n^3 FLOPs at 989 TFLOP/s vs 3 n^2 x 2 bytes at 4.8 TB/s: compute bound, ~139 us
    assert f["compute_bound"] == 1 and 2 ** f["log2_roofline_us"] == pytest.approx(2 * 4096**3 / 989.4e6, rel=1e-6)
    assert f["waves"] == pytest.approx(512 / 132 / f["blocks_per_sm"])
    assert f["has_aot"] == 0
    v = vector(f | resource_features({"registers": 168, "spills": 0, "shared_bytes": 147480, "num_warps": 8}))
    assert len(v) == len(FEATURES) and all(math.isfinite(x) for x in v)
    assert v[FEATURES.index("aot_registers")] == 168 and v[FEATURES.index("has_aot")] == 1


def test_derived_features():
    # 32 programs of one block per SM on 132 SMs (waves = 32 / 132): 100 SMs idle; 8 warps over a 4096-element tile
    f = {"log2_programs": 5.0, "waves": 32 / 132, "blocks_per_sm": 1.0, "log2_warps": 3.0, "log2_tile_elements": 12.0}
    d = derived_features(f)
    assert d["log2_sm_fill"] == pytest.approx(math.log2(32 / 132)) and d["log2_elements_per_thread"] == 4.0
    # two blocks per SM: the same SMs, half the waves; more programs than SMs: no idle SM
    two = derived_features(f | {"waves": 32 / 264, "blocks_per_sm": 2.0})
    assert two["log2_sm_fill"] == pytest.approx(d["log2_sm_fill"])
    assert derived_features(f | {"log2_programs": 10.0, "waves": 1024 / 132})["log2_sm_fill"] == 0.0
    one = derived_features(f | {"log2_programs": 0.0, "waves": 1 / 132})       # one program: log2 of it is 0
    assert one["log2_sm_fill"] == pytest.approx(-math.log2(132))
    # a stored feature dict without them gains them in its vector; GEMM's features have them from the estimate
    v = vector(f)
    assert v[FEATURES.index("log2_sm_fill")] == pytest.approx(d["log2_sm_fill"])
    g = _gemm_features(n=1024, BM=128, BN=256, BK=64, num_warps=8, num_stages=3)       # 8 x 4 = 32 tiles
    assert 2 ** g["log2_sm_fill"] == pytest.approx(32 / H100.sms)


def test_the_idle_sm_bound_extrapolates_past_the_training_launches():
    # trained only on launches that fill the SMs; a launch on a quarter of them is predicted 2 (log2) slower
    rng = np.random.default_rng(4)
    X, y = _synthetic(300, rng)
    model = CostModel(n_trees=30).fit(X, y)
    Xt = _noise(rng, 20)
    idle = Xt.copy()
    idle[:, FEATURES.index("log2_sm_fill")] = -2.0
    assert model.predict(idle)[0] - model.predict(Xt)[0] == pytest.approx(np.full(20, 2.0))


def test_the_bound_holds_unless_the_times_run_against_it():
    b = np.array([0.0, 0.0, 1.0, 2.0, 3.0])
    assert bound_slope(b, 0.5 * b + 3.0) == 1.0          # slower with idle SMs, if less than the bound: it holds
    assert bound_slope(b, -b) == 0.0                     # faster with idle SMs: not a GPU's times
    assert bound_slope(np.zeros(5), b) == 1.0            # no idle SM in the data: nothing against it
    y = np.array([0.0, 0.0, -1.0, 5.0, 9.0])
    assert bound_slope(b, y) == 1.0 and bound_slope(b, y, np.array([1.0, 1.0, 1.0, 0.0, 0.0])) == 0.0   # weighted


def test_vector_zeroes_what_is_missing_or_not_finite():
    v = vector({"log2_warps": float("nan"), "stages": float("inf"), "log2_bm": 3.0})
    assert v[:3] == [0.0, 0.0, 3.0] and len(v) == len(FEATURES)


def _noise(rng, n):
    """(n, features) of noise, except that every launch fills the SMs (``log2_sm_fill`` 0: no idle-SM bound)."""
    X = rng.normal(size=(n, len(FEATURES)))
    X[:, FEATURES.index("log2_sm_fill")] = 0.0
    return X


def _synthetic(n, rng, shift=0.0):
    """Candidates with 3 informative features and the rest noise; time = a bowl with its minimum at (1, -1)."""
    X = _noise(rng, n)
    y = (X[:, 0] - 1) ** 2 + (X[:, 1] + 1) ** 2 + 0.5 * X[:, 2] + shift
    return X, y


def test_forest_predicts_and_knows_what_it_has_not_seen():
    rng = np.random.default_rng(0)
    X, y = _synthetic(400, rng)
    model = CostModel(n_trees=60).fit(X, y)
    Xt, yt = _synthetic(200, rng)
    mean, std = model.predict(Xt)
    from scipy.stats import spearmanr
    assert spearmanr(mean, yt).statistic > 0.8
    far = np.full((1, len(FEATURES)), 6.0)                   # far outside the training data
    assert model.predict(far)[1][0] > np.median(std)


def test_fit_and_predict_check_their_inputs():
    with pytest.raises(TunableError, match="fit"):
        CostModel().fit(np.zeros((0, len(FEATURES))), [])
    with pytest.raises(TunableError, match="fit the model first"):
        CostModel().predict(np.zeros((1, len(FEATURES))))


def test_expected_improvement():
    best = 1.0
    ei = expected_improvement(np.array([0.5, 1.5, 1.5, 1.5]), np.array([1e-12, 1e-12, 0.1, 1.0]), best, xi=0.0)
    assert ei[0] == pytest.approx(0.5)           # certain to improve by 0.5
    assert ei[1] == pytest.approx(0.0, abs=1e-9)  # certain not to
    assert 0 < ei[2] < ei[3]                       # more uncertainty, more hope


def _search_score(order, y):
    """Measurements until the true best is found."""
    best = int(np.argmin(y))
    return order.index(best) + 1 if best in order else len(y) + 1


def test_active_search_with_a_prior_beats_random_search():
    rng = np.random.default_rng(1)
    prior = _synthetic(600, rng, shift=3.0)           # another "kernel": same shape of landscape, other times
    X, y = _synthetic(200, rng)
    steps = active_search(X, lambda i: float(y[i]), budget=20, prior=prior, n_trees=40)
    found = min(y[s.index] for s in steps)
    # random search with 20 of 200 finds something this good with probability ~ 1 - (1 - k/200)^20
    rank = int((y < found).sum())                     # configs better than what active search found
    assert rank <= 2
    assert len({s.index for s in steps}) == 20


def test_active_search_measures_seeds_first_and_survives_failures():
    rng = np.random.default_rng(2)
    X, y = _synthetic(50, rng)
    failed = set(range(0, 50, 3))
    steps = active_search(X, lambda i: None if i in failed else float(y[i]), budget=10, seeds=[7, 7, 3],
                          n_trees=20)
    assert [s.index for s in steps[:2]] == [7, 3] and steps[1].y is None        # 3 failed: counted, no crash
    assert len(steps) == 10 and len({s.index for s in steps}) == 10


def test_an_untuned_default_goes_first_only_where_the_model_ranks_nothing_clearly_faster():
    from tilestack.tune.cost_model import TRUST, first_seeds

    rng = np.random.default_rng(3)
    prior = _synthetic(600, rng)
    model = CostModel(n_trees=40).fit(*prior)
    X, _ = _synthetic(60, rng)
    mean = model.predict(X)[0]
    best, worst = int(np.argmin(mean)), int(np.argmax(mean))
    assert mean[worst] - mean[best] > TRUST                         # the bowl spans several units
    assert first_seeds(X, [5], worst, model) == [5]                 # clearly slower: a candidate like any
    assert first_seeds(X, [5], best, model) == [5, best]            # the model's own pick: it goes first
    assert first_seeds(X, [], worst, model, trust=math.inf) == [worst]
    assert first_seeds(X, [], worst, None) == [worst]              # no model: nothing to rank it against
    # another size's winner (a prior) is gated like the default; this size's (a seed) is not
    assert first_seeds(X, [], None, model, priors=[worst, best]) == [best]
    assert first_seeds(X, [worst], None, model, priors=[best]) == [worst, best]
    # in the search: the model's pick replaces the clearly slower default as the first measurement
    y = X[:, 0]
    steps = active_search(X, lambda i: float(y[i]), budget=3, prior=prior, default=worst, n_trees=40)
    assert steps[0].index == best and worst not in [s.index for s in steps]
    steps = active_search(X, lambda i: float(y[i]), budget=3, prior=prior, default=worst, trust=math.inf,
                          n_trees=40)
    assert steps[0].index == worst


def test_the_offset_trusts_the_residuals_the_forest_is_sure_of():
    from tilestack.tune.cost_model import _offset

    # the target runs 1.0 slower than predicted where the trees agree (spread 0.1) and 0.0 where they do not (1.0)
    off = _offset(np.array([1.0, 0.0]), np.zeros(2), np.array([0.1, 1.0]))
    assert 0.95 < off < 1.0                                     # the plain mean would say 0.5
    assert _offset(np.array([1.0, 0.0]), np.zeros(2), np.array([0.5, 0.5])) == pytest.approx(0.5)


def test_dataset_load(tmp_path):
    feats = {"log2_roofline_us": 3.0, "log2_warps": 2.0}
    lines = [{"type": "problem", "id": "a", "kernel": "gemm", "signature": "bfloat16", "n": 4096},
             {"type": "config", "id": "a", "config": {"BM": 64}, "group": "kept", "us": 16.0, "features": feats},
             {"type": "config", "id": "a", "config": {"BM": 128}, "group": "kept", "us": None, "features": feats,
              "error": "wrong result"},
             {"type": "config", "id": "a", "config": {"BM": 256}, "group": "hard", "us": None, "features": feats},
             {"type": "done", "id": "a", "complete": True},
             {"type": "problem", "id": "b", "kernel": "softmax", "n": 1024},
             {"type": "config", "id": "b", "config": {"BM": 1}, "group": "kept", "us": 4.0, "features": feats}]
    path = tmp_path / "gt.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"type": "config", "id": "b", "conf')   # torn
    d = Dataset.load([path])
    a, b = d.problems["a"], d.problems["b"]
    assert a.complete and not b.complete and d.kernels() == ["gemm", "softmax"]
    assert a.kept() == [0, 1] and a.best_us() == 16.0 and a.y(0) == target(16.0, feats) == 1.0
    X, y = d.training(exclude_kernel="gemm", center=False)
    assert y == [target(4.0, feats)] and len(X[0]) == len(FEATURES)
    assert d.training(exclude_kernel="gemm")[1] == [0.0]          # centred per problem
    assert len(d.training()[1]) == 2


def _write_dataset(path, rng, n=40):
    lines = [{"type": "problem", "id": "p", "kernel": "gemm", "n": 64}]
    for _ in range(n):
        f = {name: float(v) for name, v in zip(FEATURES, _noise(rng, 1)[0], strict=True)}
        lines.append({"type": "config", "id": "p", "config": {}, "group": "kept", "us": float(rng.uniform(1, 9)),
                      "features": f})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_cli_tune_model_times_only_the_top_k(tmp_path):
    from typer.testing import CliRunner

    from tilestack import config
    from tilestack.cli import _register, app

    _register()
    data, report = tmp_path / "gt.jsonl", tmp_path / "report.json"
    _write_dataset(data, np.random.default_rng(3))
    args = ["tune", "--small", "-k", "gemm", "--dtype", "bfloat16", "--size", "48", "--budget-s", "30", "--model",
            "--top-k", "2"]
    with config.override(cache_dir=tmp_path / "cache"):
        res = CliRunner().invoke(app, [*args, "--model-data", str(data), "--report", str(report)])
        assert res.exit_code == 0, res.output
        (row,) = json.loads(report.read_text())["problems"]
        # 8 configs in the tiny space; the config in use and 2 more (seeds, then the model's picks) are timed
        assert row["config"] and 1 <= row["tried"] <= 3
        res = CliRunner().invoke(app, [*args, "--model-data", str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 2 and "--model-data" in res.output


def test_active_order_is_active_search_one_step_at_a_time():
    # the generator the tuner drives and the batch search pick the same configs from the same measurements
    from tilestack.tune.cost_model import active_order

    rng = np.random.default_rng(5)
    X = _noise(rng, 40)
    y = X[:, 0] ** 2 + 0.3 * X[:, 1]
    prior_X = _noise(rng, 200)
    prior = (prior_X, prior_X[:, 0] ** 2 + 0.3 * prior_X[:, 1])
    batch = [s.index for s in active_search(X, lambda i: float(y[i]), budget=8, prior=prior, seeds=[4],
                                            n_trees=30)]
    order = active_order(X, base=CostModel(30).fit(*prior), seeds=[4], n_trees=30)
    stepped = [next(order)]
    while len(stepped) < 8:
        stepped.append(order.send(float(y[stepped[-1]])))
    assert stepped == batch and stepped[0] == 4 and len(set(stepped)) == 8


def test_tune_drives_a_generator_strategy_with_each_trial():
    from tilestack.tune.search import tune

    cands = [{"BM": b} for b in (16, 32, 64, 128)]
    seen = []

    def strategy(candidates, seeds):
        assert candidates == cands and seeds == [{"BM": 64}]
        trial = yield seeds[0]
        seen.append((trial.config["BM"], trial.seconds))
        trial = yield candidates[0]              # stops after two: the search ends with the generator
        seen.append((trial.config["BM"], trial.seconds))

    res = tune("k", cands, time=lambda c: 1.0 / c["BM"], strategy=strategy, seeds=[{"BM": 64}])
    assert seen == [(64, 1 / 64), (16, 1 / 16)] and res.best == {"BM": 64} and len(res.trials) == 2
