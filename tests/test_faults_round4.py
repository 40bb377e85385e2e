"""Nothing is lost on a fault, round four (1 of 2): the stores rounds one to three did not reach, the planner's plan
files and communication fits, a federated run's history and a training run's ``train.json``, each written by a real
process that is SIGKILLed at a chosen point of its write (the temporary half written; whole but not renamed; renamed,
the process dying before it returns) or races another process for the same file; a cache dir named by
TILESTACK_CACHE_DIR that does not exist yet (made) or is a file; a folder where a store's file should be; files cut
short at every length. Workers: tests/_faults_workers_round4.py. The checkpoints: tests/test_faults_round4_more.py.

What this round found: the plan-file, comm-fit, history and ``train.json`` writers left each killed writer's
temporary for good (``.plan.json.<pid>.tmp``, ``comm-x.<pid>.tmp``, ...; rounds two and three swept those of the
other stores); now the next write sweeps the temporaries of writers that are gone. ``measure_gloo`` measured for
minutes and then lost the fit to the OSError of an unwritable cache (a cache dir that is a file): it warns and
returns the fit now (``comm.store_comm``). ``load_comm`` of a folder at the fit's path raised a bare
IsADirectoryError, ``federated.load_checkpoint`` of a folder too, and ``read_plan`` called a folder at the plan's
path a file that "does not exist": each is an error naming the path and saying it is a folder. (The checkpoint
faults found: tests/test_faults_round4_more.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

WORKERS = Path(__file__).with_name("_faults_workers_round4.py")
SRC = str(Path(__file__).resolve().parents[1] / "src")
STORES = ["plan", "comm", "history", "train-json"]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), **extra}


def _target(store: str, root: Path) -> Path:
    import _faults_workers_round4 as W
    return W.target_of(store, root)


def _folder(store: str, target: Path) -> Path:
    return target / "plan" if store == "comm" else target.parent


# ---- a writer SIGKILLed at each point of its write ------------------------------------------------------------------
@pytest.mark.parametrize("point", ["mid-write", "before-rename", "after-rename"])
@pytest.mark.parametrize("store", STORES)
def test_a_writer_killed_at_each_point_leaves_a_whole_store(tmp_path, store, point):
    """Version 0 written whole, version 1's write SIGKILLed at ``point``: the store reads back whole, as version 0
    (killed before its rename) or 1 (after); the next write works and leaves no temporary of the dead writer (before,
    every kill left one for good)."""
    import _faults_workers_round4 as W

    target = _target(store, tmp_path)
    r = subprocess.run([sys.executable, str(WORKERS), "killed", store, str(target), point], capture_output=True,
                       text=True, env=_env(), timeout=120)
    assert r.returncode == -9 and r.stdout == "0\n", (r.returncode, r.stdout, r.stderr[-3000:])
    folder = _folder(store, target)
    if point != "after-rename":
        assert [f for f in os.listdir(folder) if f.endswith(".tmp")], "the kill left no temporary: not mid-write"
    assert W.version_of(store, target) == (1 if point == "after-rename" else 0)
    W.write_store(store, target, 2)
    assert W.version_of(store, target) == 2
    assert sorted(os.listdir(folder)) == [("comm-x.json" if store == "comm" else target.name)]


# ---- two processes, one file ----------------------------------------------------------------------------------------
def test_two_processes_writing_one_store_leave_one_whole_file(tmp_path):
    """Two processes write each store (plan file, comm fit, history, train.json) 12 times at once: every write
    succeeds; each file is whole and is the last write of one of them (the last rename of all is some writer's
    last write); no temporary is left."""
    import _faults_workers_round4 as W

    n = 12
    shared = tmp_path / "shared"
    for store in STORES:
        (shared / store).mkdir(parents=True)
    procs = [subprocess.Popen([sys.executable, str(WORKERS), "race", "all", str(shared), tag, str(n)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for tag in "ab"]
    for p in procs:
        assert p.stdout.readline() == "ready\n", p.stderr.read()[-2000:]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        assert json.loads(out.splitlines()[-1]) == {s: {"errors": []} for s in STORES}
    for store in STORES:
        target = _target(store, shared / store)
        assert W.version_of(store, target) in (n - 1, 1000 + n - 1), store
        assert os.listdir(_folder(store, target)) == [("comm-x.json" if store == "comm" else target.name)]


# ---- the cache dir from the environment ---------------------------------------------------------------------------
def _caches(cache: Path) -> dict:
    r = subprocess.run([sys.executable, str(WORKERS), "cache-file", str(cache)], capture_output=True, text=True,
                       env=_env(TILESTACK_CACHE_DIR=str(cache)), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_a_cache_dir_named_by_the_environment_is_made_when_missing(tmp_path):
    cache = tmp_path / "not" / "yet" / "there"
    out = _caches(cache)
    assert [out[k] for k in ("tune", "measure", "store", "comm_store")] == ["ok", "ok", "ok", "True"], out
    assert "source='mine'" in out["comm_load"]
    assert not any(out[k + "_warnings"] for k in ("tune", "measure", "store", "comm_store", "comm_load")), out
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()) == [
        "compile_measure.json", "perf/results.sqlite", "plan/comm-mine.json", "tuned/sm90-132sm-227kb.json"]


def test_a_cache_dir_that_is_a_file_costs_warnings_naming_it(tmp_path):
    """Each cache says it cannot write below the file and goes on with what it has (the result store, a file the
    user asked for, is an error naming the file). Before, measure_gloo lost its measured fit to the OSError."""
    cache = tmp_path / "cache"
    cache.write_text("my notes")
    out = _caches(cache)
    assert out["tune"] == "ok" and out["measure"] == "ok" and out["comm_store"] == "False"
    for k, said in (("tune", "tuned config not saved"), ("measure", "cannot write"), ("comm_store", "not stored")):
        assert len(out[k + "_warnings"]) == 1 and said in out[k + "_warnings"][0], out[k + "_warnings"]
        assert str(cache) in out[k + "_warnings"][0]
    assert out["store"].startswith("StoreError") and f"it is below the file '{cache}'" in out["store"]
    assert out["comm_load"] == "ok" and not out["comm_load_warnings"]          # no fit stored: None, measure again
    assert cache.read_text() == "my notes"


# ---- a folder where a store's file should be ----------------------------------------------------------------------
def _comm(root):
    from tilestack import config
    from tilestack.parallel.plan.comm import load_comm
    with config.override(cache_dir=root / "cache"):
        return load_comm("x")


def _plan(root):
    from tilestack.parallel.plan.planfile import read_plan
    return read_plan(root / "plan.json")


def _federated(root):
    from tilestack.federated.driver import load_checkpoint
    return load_checkpoint(root / "run.ckpt")


def _tuned(root):
    from tilestack.tune.cache import ConfigCache
    return ConfigCache(root / "cache", tables_dir=None)


def _store(root):
    from tilestack import config
    from tilestack.perf.store import Store
    with config.override(cache_dir=root / "cache"):
        return Store()


FOLDERS = {   # reader, the folder it meets, the error it must raise (type name, words after the path)
    "comm fit": (_comm, "cache/plan/comm-x.json", "PlanError", "is not readable (IsADirectoryError"),
    "plan file": (_plan, "plan.json", "PlanError", "is a folder; expected a file written by `tilestack plan"),
    "federated checkpoint": (_federated, "run.ckpt", "FederatedError", "is a folder; expected a checkpoint file"),
    "tuned table": (_tuned, "cache/tuned/sm90-132sm-227kb.json", "ValueError", "is not valid JSON"),
    "result store": (_store, "cache/perf/results.sqlite", "StoreError", "is a folder; expected a SQLite file"),
}


@pytest.mark.parametrize("name", FOLDERS)
def test_a_folder_where_a_stores_file_should_be_is_named(tmp_path, name):
    """Before: load_comm and load_checkpoint raised a bare IsADirectoryError, read_plan said 'does not exist'."""
    read, rel, error, words = FOLDERS[name]
    (tmp_path / rel).mkdir(parents=True)
    (tmp_path / rel / "x").write_text("a user's file")
    with pytest.raises(Exception) as e:
        read(tmp_path)
    assert type(e.value).__name__ == error and str(tmp_path / rel) in str(e.value) and words in str(e.value), e.value
    assert (tmp_path / rel / "x").read_text() == "a user's file"


def test_a_compile_measurement_cache_that_is_a_folder_is_measured_again_with_a_warning(tmp_path):
    from tilestack import config
    from tilestack.compile import measure

    (tmp_path / "compile_measure.json").mkdir()
    measure._memory.clear()
    measure._loaded = False
    with config.override(cache_dir=tmp_path), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        measure._load()
        measure._store("k", {"fused_s": 1e-6, "unfused_s": 2e-6})
    said = [str(w.message) for w in seen]
    assert len(said) == 2 and all(str(tmp_path / "compile_measure.json") in s for s in said), said
    assert measure._memory["k"]["fused_s"] == 1e-6                                   # this process keeps it
    measure._memory.clear()
    measure._loaded = False


# ---- cut short anywhere ------------------------------------------------------------------------------------
def _cut_everywhere(path: Path, read, error: type, words: str) -> int:
    """Every length below 256 bytes (the headers), then 120 spread over the rest."""
    data = path.read_bytes()
    for n in sorted({*range(min(256, len(data))), *range(256, len(data), max(1, len(data) // 120))}):
        path.write_bytes(data[:n])
        with pytest.raises(error) as e:
            read()
        assert str(path) in str(e.value) and words in str(e.value), (n, str(e.value))
    return len(data)


def test_stores_cut_short_anywhere_are_refused_by_name(tmp_path):
    """A plan file, a comm fit, a run's train.json and a federated checkpoint, each cut at every length below 256
    bytes and at 120 beyond: an error of tilestack's naming the file, never a half-read store (a copy cut short, a
    disk that lost a tail)."""
    import numpy as np
    import typer
    from flwr.serverapp.strategy import FedAvg

    import _faults_workers_round4 as W
    from tilestack import config
    from tilestack.cli.train_state import _read_settings
    from tilestack.errors import FederatedError
    from tilestack.federated.driver import load_checkpoint, save_checkpoint
    from tilestack.parallel.plan.comm import load_comm
    from tilestack.parallel.plan.describe import PlanError
    from tilestack.parallel.plan.planfile import read_plan

    W.write_store("plan", tmp_path / "plan.json", 0)
    assert _cut_everywhere(tmp_path / "plan.json", lambda: read_plan(tmp_path / "plan.json"), PlanError,
                           "expected") > 500
    W.write_store("comm", tmp_path / "cache", 0)
    with config.override(cache_dir=tmp_path / "cache"):
        _cut_everywhere(tmp_path / "cache" / "plan" / "comm-x.json", lambda: load_comm("x"), PlanError,
                        "is not readable")
    W.write_store("train-json", tmp_path / "train.json", 0)
    _cut_everywhere(tmp_path / "train.json", lambda: _read_settings(tmp_path / "train.json"), typer.BadParameter,
                    "cannot be read")
    save_checkpoint(tmp_path / "run.ckpt", {"round": 3, "arrays": np.arange(40.0), "strategy": FedAvg(),
                                            "history": [{"loss": 1.5}], "signature": {"seed": 0}})
    _cut_everywhere(tmp_path / "run.ckpt", lambda: load_checkpoint(tmp_path / "run.ckpt"), FederatedError,
                    "cannot be read")


def test_a_plan_file_and_a_comm_fit_of_another_version_are_refused_by_name(tmp_path):
    """A plan file of another format, and a fit holding a collective this tilestack does not know (a newer one's):
    refused naming the file and what it holds, before anything runs or is predicted."""
    import _faults_workers_round4 as W
    from tilestack import config
    from tilestack.parallel.plan.comm import load_comm
    from tilestack.parallel.plan.describe import PlanError
    from tilestack.parallel.plan.planfile import read_plan

    W.write_store("plan", tmp_path / "plan.json", 0)
    spec = json.loads((tmp_path / "plan.json").read_text())
    (tmp_path / "plan.json").write_text(json.dumps({**spec, "format": "tilestack-plan/2"}))
    with pytest.raises(PlanError, match=r"plan\.json': format='tilestack-plan/2'; expected 'tilestack-plan/1'"):
        read_plan(tmp_path / "plan.json")
    (tmp_path / "cache" / "plan").mkdir(parents=True)
    (tmp_path / "cache" / "plan" / "comm-x.json").write_text(json.dumps(
        {"source": "newer", "fits": {"all_reduce": {"2": [1e-5, 1e-9]}, "all_to_all": {"2": [1e-5, 1e-9]}}}))
    with config.override(cache_dir=tmp_path / "cache"), pytest.raises(PlanError) as e:
        load_comm("x")
    assert "comm-x.json' is not readable" in str(e.value) and "fits['all_to_all']" in str(e.value)


def test_ceilings_written_again_remove_a_killed_writers_temporary(tmp_path):
    """device.ceilings' cache write: a temporary of a process that is gone (SIGKILLed before its rename) is removed
    by the next write, a live process's is kept; the file written is whole (it was left for good before)."""
    from tilestack import config
    from tilestack.perf import device

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    with config.override(cache_dir=tmp_path):
        dev = device.detect("cpu")
        path = device.ceilings_path(dev)
        path.parent.mkdir(parents=True)
        dead, live = (path.with_suffix(f".{pid}.tmp") for pid in (dead_pid, 1))
        dead.write_text('{"half": ')
        live.write_text('{"half": ')
        c = device.ceilings(dev, copy_bytes=1 << 16, matmul_n=32, dtypes=("fp32",), budget_s=0.05)
    assert not dead.exists() and live.exists()
    assert json.loads(path.read_text())["matmul"]["fp32"] == c.matmul["fp32"] > 0
