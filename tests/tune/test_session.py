"""Session: budgeted tuning of a list of problems. The search, the budget and the writing are tested with fake
timings (a table of seconds per config) over gemm's real search space; one tiny GEMM is tuned for real on
Triton's interpreter."""

import json

import pytest
import torch

from tilestack.kernels.gemm import gemm_kernel
from tilestack.tune import ConfigCache, lookup
from tilestack.tune.cache import Table, file_name, key, launch_kwargs
from tilestack.tune.devices import DeviceKey
from tilestack.tune.library import Problem, Workload, library_problems
from tilestack.tune.session import Session, ShipWriter

DEV = DeviceKey(9, 0, 132, 227, name="Test GPU", memory_gb=100.0)
BASE = dict(BK=32, GROUP_M=8, num_warps=4, num_stages=1)
RESTRICT = dict(BM=(32, 64, 128), BN=(32, 64), BK=(32,), GROUP_M=(8,), num_warps=(4,), num_stages=(1,))
DEFAULT = dict(BM=32, BN=32) | BASE


def cfg(bm, bn):
    return dict(BM=bm, BN=bn) | BASE


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


LAST: dict = {}     # the config the fakes last ran (shared: one timer serves a session's problems)


def fake_problem(n, seconds, clock=None, wrong=(), label="fake", calls=None):
    """A gemm problem whose run records its config, timed by ``seconds[(BM, BN)]`` (each timing advances the
    fake clock by 1 s); configs in ``wrong`` compute garbage."""
    a = torch.empty(64, 64, dtype=torch.bfloat16)
    args = (a, a, torch.empty_like(a))
    last = LAST

    def make(device):
        def run(c):
            last["cfg"] = c
            if calls is not None:
                calls.append((n, c["BM"], c["BN"]))

        def check(c):
            run(c)
            return 1.0 if (c["BM"], c["BN"]) in wrong else 0.0
        return Workload(args, run, check)

    p = Problem("test_gemm", "bfloat16", n, label, gemm_kernel, {}, RESTRICT, DEFAULT, make)

    def timer(fn, rep_ms):
        fn()
        if clock is not None:
            clock.t += 1.0
        c = last["cfg"]
        return seconds[c["BM"], c["BN"]]
    return p, timer


SECONDS = {(32, 32): 5.0, (32, 64): 4.0, (64, 32): 3.0, (64, 64): 2.0, (128, 32): 1.5, (128, 64): 1.0}


def session(tmp_path, timer, budget_s=1e9, clock=None, ship=True, tables_dir=None):
    cache = ConfigCache(tmp_path / "cache", tables_dir=tables_dir)
    s = Session(DEV, budget_s=budget_s, device_str="cpu", cache=cache,
                ship_dir=tmp_path / "ship" if ship else None, timer=timer, **({"clock": clock} if clock else {}))
    if tables_dir is not None:
        s.ship.tables_dir = tables_dir
    return s


def test_finds_the_fastest_and_writes_both_tables(tmp_path):
    p, timer = fake_problem(4096, SECONDS)
    s = session(tmp_path, timer)
    [out] = s.run([p])
    assert out.config == cfg(128, 64) and out.seconds == 1.0 and out.complete
    assert out.before == DEFAULT and out.before_seconds == 5.0 and out.speedup == 5.0
    assert out.tried == 6 and out.failed == 0
    user = Table.read(tmp_path / "cache" / "tuned" / "sm90-132sm-227kb.json")
    entry = user.entries[key("test_gemm", "bfloat16", 4096)]
    assert entry["config"] == dict(BM=128, BN=64, BK=32, GROUP_M=8) and entry["seconds"] == 1.0
    assert entry["options"] == dict(num_warps=4, num_stages=1) and entry["speedup"] == 5.0   # stored apart
    assert entry["shared_bytes"] == (128 * 32 + 32 * 64) * 2          # A and B tiles, one stage, bf16
    shipped = Table.read(tmp_path / "ship" / file_name("test_gemm", DEV))
    assert shipped.device.name == "Test GPU" and shipped.entries == user.entries
    assert lookup.resolve("test_gemm", "bfloat16", DEV, 3000, cache=ConfigCache(tmp_path / "cache",
                                                                                 tables_dir=None)) == cfg(128, 64)


def test_a_wrong_config_never_wins_and_the_config_in_use_stays_when_fastest(tmp_path):
    seconds = dict(SECONDS) | {(32, 32): 0.5}
    p, timer = fake_problem(1024, seconds, wrong={(128, 64)})
    [out] = session(tmp_path, timer).run([p])
    assert out.config == DEFAULT and out.speedup == 1.0 and out.failed == 1


def test_budget_cuts_searches_short_and_skips_what_is_left(tmp_path):
    """Every timing takes 1 s of a 9 s budget, shared 2:1:1 (carried over); the local search is cut short; the
    config in use and the default are always tried; once the budget is spent the rest are skipped."""
    clock = Clock()
    p1, timer = fake_problem(4096, SECONDS, clock)
    p1.weight = 2.0
    p2, _ = fake_problem(8192, SECONDS, clock)
    p3, _ = fake_problem(16384, SECONDS, clock)
    outs = session(tmp_path, timer, budget_s=9, clock=clock).run([p1, p2, p3])
    # p1: a 4.5 s share: five 1 s trials, then its 2 finalists and the config in use timed again (t = 8)
    assert not outs[0].complete and outs[0].tried == 5 and outs[0].config == cfg(128, 64)
    # p2: half of the 1 s left: the config in use only (at least one trial), timed again (t = 10)
    assert outs[1].tried == 1 and outs[1].config == DEFAULT and clock.t == 10
    assert outs[2].config is None and "budget is spent" in outs[2].note and outs[2].tried == 0
    entries = json.loads((tmp_path / "cache" / "tuned" / "sm90-132sm-227kb.json").read_text())["entries"]
    assert set(entries) == {key("test_gemm", "bfloat16", 4096), key("test_gemm", "bfloat16", 8192)}


def test_winners_seed_the_next_sizes(tmp_path):
    """A later size tries the config in use before the run (here the default), then the earlier size's winners
    (fastest first), then their neighbours."""
    calls = []
    p1, timer = fake_problem(4096, SECONDS, calls=calls)
    p2, _ = fake_problem(8192, SECONDS, calls=calls)
    s = session(tmp_path, timer)
    s.run([p1])
    calls.clear()
    [out] = s.run([p2])
    tried = [c for c in calls if c[0] == 8192]
    # (check and time each: every config appears twice in a row)
    order = list(dict.fromkeys((bm, bn) for _, bm, bn in tried))
    assert order[:3] == [(32, 32), (128, 64), (128, 32)]
    assert out.before == DEFAULT and out.config == cfg(128, 64)


def test_an_interrupted_run_keeps_every_winner_written(tmp_path):
    p1, timer = fake_problem(4096, SECONDS)
    p2, _ = fake_problem(8192, SECONDS)

    def interrupted(device):
        raise KeyboardInterrupt
    p2.make = interrupted
    with pytest.raises(KeyboardInterrupt):
        session(tmp_path, timer).run([p1, p2])
    for path in (tmp_path / "cache" / "tuned" / "sm90-132sm-227kb.json",
                 tmp_path / "ship" / file_name("test_gemm", DEV)):
        assert launch_kwargs(Table.read(path).entries[key("test_gemm", "bfloat16", 4096)]) == cfg(128, 64)
        assert sorted(x.name for x in path.parent.iterdir()) == [path.name]       # no temporary left


def test_ship_writer_keeps_the_packaged_entries(tmp_path):
    tables = tmp_path / "tables"
    Table(DEV, {key("test_gemm", "bfloat16", 1024): {"config": dict(BM=16)}}).write(
        tables / file_name("test_gemm", DEV))
    w = ShipWriter(tmp_path / "out", DEV, tables_dir=tables)
    path = w.put("test_gemm", "bfloat16", 4096, {"config": dict(BM=64)})
    assert path == tmp_path / "out" / file_name("test_gemm", DEV)
    assert Table.read(path).entries == {key("test_gemm", "bfloat16", 1024): {"config": dict(BM=16), "options": {}},
                                        key("test_gemm", "bfloat16", 4096): {"config": dict(BM=64), "options": {}}}


def test_a_problem_whose_inputs_fail_is_skipped(tmp_path):
    p1, timer = fake_problem(4096, SECONDS)

    def oom(device):
        raise RuntimeError("CUDA out of memory")
    p1.make = oom
    [out] = session(tmp_path, timer).run([p1])
    assert out.config is None and "inputs failed: RuntimeError: CUDA out of memory" in out.note


def test_a_tiny_gemm_tuned_on_the_interpreter(tmp_path):
    """The real thing, small: gemm's problem at 48^3 on Triton's interpreter, two tile shapes, wall-clock timed,
    each checked against float32 PyTorch first."""
    [p] = [p for p in library_problems(["gemm"], ["bfloat16"], small=True) if p.n == 48]
    p.restrict = dict(p.restrict, BM=(16,), BN=(16, 32), BK=(16,))
    s = Session(DEV, budget_s=120, device_str="cpu", cache=ConfigCache(tmp_path / "cache", tables_dir=None))
    [out] = s.run([p])
    assert out.config in ({**p.default, "BN": 16}, {**p.default, "BN": 32}) and out.failed == 0
    assert out.tried == 2 and out.seconds > 0
    assert ConfigCache(tmp_path / "cache", tables_dir=None).get("gemm", "bfloat16", DEV, 48) == out.config


def test_plan_gives_the_most_valuable_problems_most_of_a_budget():
    from tilestack.tune.session import plan, share_weight

    p0, _ = fake_problem(1024, SECONDS)
    p1, _ = fake_problem(2048, SECONDS)
    p2, _ = fake_problem(4096, SECONDS)
    p1.priority, p2.priority, p2.weight = 1, 2, 4.0
    assert [share_weight(p) for p in (p0, p1, p2)] == [1.0, 0.5, 1.0]
    assert plan([p0, p1, p2], 100.0) == [40.0, 20.0, 40.0]


def test_the_model_session_measures_its_pick_before_an_untuned_default(tmp_path):
    """No table gives the config in use, so it is the kernel's default (BM=32, BN=32: 5 s); a model fitted on
    this space's times ranks it far slower than BM=64 (2-3 s; the constraints drop BM=128 on 64x64 inputs), so
    the model's pick is measured first, and with top_k=1 the default is never timed."""
    import math

    from tilestack.tune.constraints import ConstrainedSpace
    from tilestack.tune.cost_model import TRUST, CostModel
    from tilestack.tune.features import vector
    from tilestack.tune.guided import ModelSession
    from tilestack.tune.space import SearchSpace

    calls = []
    p, timer = fake_problem(64, SECONDS, calls=calls)
    s = ModelSession(DEV, budget_s=1e9, device_str="cpu", cache=ConfigCache(tmp_path / "cache", tables_dir=None),
                     timer=timer, model=None, top_k=1)
    args = p.make("cpu").args
    space = SearchSpace(p.tile, fixed=p.fixed, restrict=p.restrict, device=DEV)
    cs = ConstrainedSpace(p.tile, args, p.fixed, space.domains(), DEV)
    kept = cs.kept()
    assert DEFAULT in kept and cfg(64, 64) in kept and cfg(128, 64) not in kept
    X = [vector(s._features(cs, c), aot=False) for c in kept]
    s.model = CostModel(n_trees=20).fit(X, [math.log2(SECONDS[c["BM"], c["BN"]]) for c in kept])
    mean = s.model.predict(X)[0]
    assert mean[kept.index(DEFAULT)] - mean.min() > TRUST
    [out] = s.run([p])
    timed = list(dict.fromkeys(c[1:] for c in calls))
    assert timed[0][0] == 64 and len(timed) == 2 and (32, 32) not in timed
    assert out.config == cfg(64, 64) and out.tried == 2
