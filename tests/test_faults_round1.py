"""Nothing is lost on a fault: every store of state tilestack keeps on disk, against real faults.

A writer SIGKILLed while it writes leaves the previous good state and the next run works; a truncated, garbage or
foreign file is recovered from with a warning or refused with an error that names it and says what to do; two
processes writing one table keep each other's entries; a read-only cache folder costs a warning, not the run; a
training run killed in a checkpoint save resumes from the last whole checkpoint to the uninterrupted run's state.

The stores: the tuned-config tables (tune/cache.py), the AOT compile reports (tune/aot.py), the generated Triton
sources (backends/triton/launch.py), the device ceilings (perf/device.py), bench records and the result store as
bench opens it (bench/record.py, bench/runner.py), the distributed checkpoints (parallel/checkpoint.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from tilestack import config
from tilestack.tune import aot
from tilestack.tune.cache import ConfigCache, Table, key
from tilestack.tune.devices import DeviceKey

WORKERS = Path(__file__).with_name("_faults_workers_round1.py")
SRC = str(Path(__file__).resolve().parents[1] / "src")
H200 = DeviceKey.parse("sm90-132sm-227kb", name="NVIDIA H200")
GARBAGE = bytes(range(256)) * 8                    # not UTF-8, not JSON


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), **extra}


@pytest.fixture
def cache_dir(tmp_path):
    with config.override(cache_dir=tmp_path / "cache"):
        yield tmp_path / "cache"


# ---- tuned-config tables ------------------------------------------------------------------------------------------
def _writer(cache: Path, tag: str, n: int | None = None) -> subprocess.Popen:
    args = ["put-forever", str(cache), tag] if n is None else ["put-many", str(cache), tag, str(n)]
    return subprocess.Popen([sys.executable, str(WORKERS), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=_env())


@pytest.mark.parametrize("committed", [3, 40])
def test_a_tuning_run_killed_mid_write_leaves_its_table_whole(cache_dir, committed):
    """Each put rewrites the whole table: SIGKILLed at any point, the table holds every entry put before and is
    whole JSON; the next run reads it and adds to it."""
    p = _writer(cache_dir, "killed")
    try:
        for _ in range(committed):
            assert p.stdout.readline(), "the writer died before writing"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    path = cache_dir / "tuned" / f"{H200}.json"
    table = Table.read(path)
    assert {key("gemm", f"killed-{i}", 1024) for i in range(committed)} <= set(table.entries)
    cache = ConfigCache(cache_dir, tables_dir=None)
    cache.put("gemm", "next", H200, 1024, {"BM": 32}, options={})
    assert ConfigCache(cache_dir, tables_dir=None).get("gemm", "next", H200, 1024) == {"BM": 32}
    assert len(Table.read(path).entries) == len(table.entries) + 1


def test_a_write_interrupted_before_its_rename_keeps_the_old_table(cache_dir, monkeypatch):
    from tilestack.tune import cache as cache_mod

    cache = ConfigCache(cache_dir, tables_dir=None)
    cache.put("gemm", "sig", H200, 1024, {"BM": 64}, options={})
    path = cache.user_path(H200)
    before = path.read_bytes()

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.put("gemm", "sig", H200, 2048, {"BM": 128}, options={})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]        # no temporary left
    assert ConfigCache(cache_dir, tables_dir=None).get("gemm", "sig", H200, 1024) == {"BM": 64}


def test_two_tuning_processes_keep_each_others_entries(cache_dir):
    """``put`` re-reads the table before it writes (the design merges): under a lock, two writers at once lose
    nothing."""
    n = 25
    writers = [_writer(cache_dir, tag, n) for tag in ("a", "b")]
    for w in writers:
        assert w.stdout.readline() == "ready\n"
    for w in writers:                                # both start putting now
        w.stdin.write("go\n")
        w.stdin.flush()
    for w in writers:
        out, _ = w.communicate(timeout=120)
        assert w.returncode == 0 and len(out.split()) == n
    entries = Table.read(cache_dir / "tuned" / f"{H200}.json").entries
    assert {key("gemm", f"{t}-{i}", 1024) for t in "ab" for i in range(n)} == set(entries)


def test_tilestack_tune_killed_after_a_winner_keeps_it_and_the_next_run_knows(tmp_path):
    """The command, SIGKILLed in its second problem: the user's table and the --report file are whole and hold the
    first winner; the next run's --missing plan reads the table and leaves that problem out."""
    cache, report = tmp_path / "cache", tmp_path / "report.json"
    tune = [sys.executable, "-m", "tilestack.cli", "tune", "--small", "--as-device", "sm89-128sm-99kb", "-k", "gemm",
            "--dtype", "bfloat16"]
    env = _env(TILESTACK_CACHE_DIR=str(cache), COLUMNS="200")
    p = subprocess.Popen([*tune, "--budget-s", "10", "--report", str(report)], stdout=subprocess.PIPE, text=True,
                         env=env)
    try:
        for line in p.stdout:
            if " tried" in line:                         # "  gemm bfloat16 @64 (48x48x48): ... [8 tried, ...]"
                break
        else:
            pytest.fail("tilestack tune ended before a winner")
        deadline = time.monotonic() + 60                 # the report follows the line: kill in the next problem
        while not report.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    tuned = Table.read(cache / "tuned" / "sm89-128sm-99kb.json").entries
    assert tuned and all(e["seconds"] > 0 for e in tuned.values())
    rows = json.loads(report.read_text())["problems"]
    assert {f"gemm|bfloat16|{r['bucket']}" for r in rows if r["config"]} <= set(tuned)
    plan = subprocess.run([*tune, "--dry-run", "--missing"], capture_output=True, text=True, env=env, timeout=120)
    assert plan.returncode == 0, plan.stderr[-2000:]
    left = {int(b) for b in re.findall(r"gemm\s+.\s+bfloat16\s+.\s+(\d+)", plan.stdout)}
    assert left and not left & {int(k.split("|")[2]) for k in tuned}, plan.stdout


BAD_TABLES = {
    "garbage bytes": GARBAGE,
    "empty": b"",
    "truncated": b'{"format": 3, "device": {"key": "sm90-132sm-227kb"}, "entries": {"gemm|s|1024": {"con',
    "a list": b"[1, 2, 3]",
    "an entry not a dict": json.dumps({"format": 3, "device": H200.meta(), "entries": {"gemm|s|1024": 7}}).encode(),
    "a config not a dict": json.dumps({"format": 3, "device": H200.meta(),
                                       "entries": {"gemm|s|1024": {"config": [64]}}}).encode(),
    "a key without bucket": json.dumps({"format": 3, "device": H200.meta(),
                                        "entries": {"gemm": {"config": {}}}}).encode(),
    "a device not a key": json.dumps({"format": 3, "device": {"key": "h200"}, "entries": {}}).encode(),
}


@pytest.mark.parametrize("content", BAD_TABLES.values(), ids=BAD_TABLES.keys())
def test_a_damaged_table_is_an_error_naming_it(cache_dir, content):
    path = cache_dir / "tuned" / f"{H200}.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"tuned-config table {path}.*(delete it|delete the file)") as e:
        ConfigCache(cache_dir, tables_dir=None)
    assert type(e.value) is ValueError               # ours, not json's, a UnicodeDecodeError or an AttributeError


def test_a_put_over_a_table_damaged_since_moves_it_aside(cache_dir):
    cache = ConfigCache(cache_dir, tables_dir=None)
    cache.put("gemm", "sig", H200, 1024, {"BM": 64}, options={})
    path = cache.user_path(H200)
    path.write_bytes(GARBAGE)                        # damaged while this process ran
    with pytest.warns(UserWarning, match=r"not valid JSON.*moved to .*\.corrupt"):
        cache.put("gemm", "sig", H200, 2048, {"BM": 128}, options={})
    assert path.with_name(path.name + ".corrupt").read_bytes() == GARBAGE
    assert ConfigCache(cache_dir, tables_dir=None).get("gemm", "sig", H200, 2048) == {"BM": 128}


# ---- AOT compile reports ------------------------------------------------------------------------------------------
needs_aot = pytest.mark.skipif(aot.missing_tools() is not None, reason=f"AOT compiles: {aot.missing_tools()}")


def _small_gemm():
    from tilestack.kernels.gemm import gemm_kernel
    args = tuple(torch.empty(256, 256, dtype=torch.bfloat16, device="meta") for _ in range(3))
    return gemm_kernel, args, {}, dict(BM=64, BN=64, BK=32, GROUP_M=8, num_warps=4, num_stages=2)


@needs_aot
def test_a_damaged_aot_report_is_compiled_again(cache_dir):
    first = aot.resources(*_small_gemm())
    [path] = (cache_dir / "aot").glob("*.json")
    for content in (GARBAGE, b"", b'{"ok": true, "regis', b'["a", "list"]', b'{"ok": true, "colour": 1}'):
        path.write_bytes(content)
        with pytest.warns(UserWarning, match=rf"ignoring the cached report {path}"):
            again = aot.resources(*_small_gemm())
        assert not again.cached and again.ok and again.shared_bytes == first.shared_bytes
        assert json.loads(path.read_text())["shared_bytes"] == first.shared_bytes      # whole again


@needs_aot
def test_an_unwritable_aot_cache_still_reports(tmp_path):
    (tmp_path / "aot").write_text("a file where the folder goes")
    with config.override(cache_dir=tmp_path), pytest.warns(UserWarning, match="report not cached"):
        assert aot.resources(*_small_gemm()).ok


# ---- generated Triton sources -------------------------------------------------------------------------------------
ADD_ONE = textwrap.dedent("""
    import triton
    import triton.language as tl


    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)
""")


@pytest.mark.parametrize("damage", [b"", b"import triton\n@triton.ji", GARBAGE])
def test_a_damaged_generated_source_is_written_again(cache_dir, damage):
    import hashlib

    from tilestack.backends.triton.launch import compile_source

    path = cache_dir / "triton" / f"add_one_{hashlib.sha256(ADD_ONE.encode()).hexdigest()[:16]}.py"
    path.parent.mkdir(parents=True)
    path.write_bytes(damage)
    fn = compile_source(ADD_ONE, "add_one", True)
    x = torch.zeros(10)
    fn[(1,)](x, 10, BLOCK=16)
    assert torch.equal(x, torch.ones(10)) and path.read_text() == ADD_ONE
    assert not list(path.parent.glob("*.tmp"))


# ---- device ceilings ----------------------------------------------------------------------------------------------
SMALL = {"copy_bytes": 1 << 16, "matmul_n": 32, "dtypes": ("fp32",), "budget_s": 0.05}


@pytest.mark.parametrize("content", [GARBAGE, b"", b"[]", b'{"device": 1}', "spread"])
def test_damaged_ceilings_are_measured_again_with_a_warning(cache_dir, content):
    from tilestack.perf import device

    dev = device.detect("cpu")
    path = device.ceilings_path(dev)
    if content == "spread":                          # whole JSON, a field of the wrong type: stale_reason crashed
        good = device.ceilings(dev, **SMALL)
        content = json.dumps({**good.to_json(), "spread": ["copy"]}).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        c = device.ceilings(dev, **SMALL)
    assert any(f"ceilings cached in {path} cannot be read" in str(w.message) for w in seen)
    assert c.matmul["fp32"] > 0 and json.loads(path.read_text())["matmul"]["fp32"] == c.matmul["fp32"]


# ---- bench records and the result store ---------------------------------------------------------------------------
BAD_RECORDS = {"garbage": GARBAGE, "empty": b"", "truncated": b'{"format": 1, "kind": "tilestack bench rec',
               "a list": b"[]", "rows not rows": b'{"format": 1, "kind": "tilestack bench record", '
                                                  b'"device": "x", "results": [1, 2]}',
               "no device": b'{"format": 1, "kind": "tilestack bench record", "results": []}'}


@pytest.mark.parametrize("content", BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_a_damaged_bench_record_is_an_error_naming_it(tmp_path, content):
    from tilestack.bench.record import Record, RecordError

    path = tmp_path / "bench.json"
    path.write_bytes(content)
    with pytest.raises(RecordError, match=rf"record='{path}'"):
        Record.read(path)


def test_a_record_write_interrupted_before_its_rename_keeps_the_old_file(tmp_path, monkeypatch):
    from tilestack.bench import record

    path = record.Record("cpu: test", [], started_at="t0").write(tmp_path / "bench.json")
    before = path.read_bytes()

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)           # (tilestack.files.write_atomic's rename)
    with pytest.raises(KeyboardInterrupt):
        record.Record("cpu: other", [], started_at="t1").write(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["bench.json"]
    assert record.Record.read(path).device == "cpu: test"


@pytest.mark.parametrize("content", [GARBAGE, b"SQLite format 3\x00" + GARBAGE])
def test_a_result_store_that_is_no_database_is_named_by_bench(tmp_path, content, cache_dir):
    from tilestack.bench import runner
    from tilestack.bench.record import RecordError, load_side

    db = tmp_path / "results.sqlite"
    db.write_bytes(content)
    with pytest.raises(RecordError, match=rf"result store '{db}' cannot be opened.*move.* aside"):
        load_side("latest", db)
    if content == GARBAGE:                           # the command, once: a clear error, exit 2
        r = subprocess.run([sys.executable, "-m", "tilestack.cli", "bench", "compare", "latest", "latest~1", "--db",
                            str(db)], capture_output=True, text=True, env=_env(), timeout=120)
        assert r.returncode == 2 and f"result store '{db}' cannot be opened" in r.stderr, r.stderr[-2000:]
    default = cache_dir / "perf" / "results.sqlite"
    default.parent.mkdir(parents=True)
    default.write_bytes(content)
    with pytest.warns(UserWarning, match="this run's results are not stored"):
        assert runner._open_store() is None          # `tilestack bench` measures and reports all the same
    assert db.read_bytes() == content                # nothing overwritten


def test_the_perf_store_names_a_file_that_is_no_database(tmp_path):
    from tilestack.perf.store import Store

    db = tmp_path / "results.sqlite"
    db.write_bytes(GARBAGE)
    with pytest.raises(ValueError, match=str(db)):
        Store(db)


# ---- a read-only cache folder -------------------------------------------------------------------------------------
READ_ONLY = textwrap.dedent("""
    import json, sys, warnings
    import torch
    warnings.simplefilter("always")
    from tilestack.tune.cache import ConfigCache
    from tilestack.tune.devices import DeviceKey
    from tilestack.backends.triton.launch import compile_source
    from tilestack.perf import device
    from tilestack.bench import runner
    out = {}
    with warnings.catch_warnings(record=True) as seen:
        dev = DeviceKey.parse("sm90-132sm-227kb", name="NVIDIA H200")
        cache = ConfigCache(tables_dir=None)
        out["old"] = cache.get("gemm", "sig", dev, 1024)
        cache.put("gemm", "sig", dev, 2048, {"BM": 128}, options={})
        out["new"] = cache.get("gemm", "sig", dev, 2048)
        fn = compile_source(sys.argv[1], "add_one", True)
        x = torch.zeros(4)
        fn[(1,)](x, 4, BLOCK=8)
        out["kernel"] = x.tolist()
        out["ceilings"] = device.ceilings(device.detect("cpu"), copy_bytes=1 << 16, matmul_n=32, dtypes=("fp32",),
                                          budget_s=0.05).matmul["fp32"] > 0
        out["store"] = runner._open_store() is None
    out["warnings"] = [str(w.message) for w in seen]
    print(json.dumps(out))
""")


def _without_write_permission() -> list[str]:
    """A command prefix under which permission bits hold: as root, without the capabilities that override them."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: a read-only folder cannot be made to hold")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]


def test_a_read_only_cache_folder_costs_warnings_not_the_run(tmp_path):
    cache = tmp_path / "cache"
    ConfigCache(cache, tables_dir=None).put("gemm", "sig", H200, 1024, {"BM": 64}, options={})
    (cache / "perf").mkdir()
    before = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    for folder in [cache, *(p for p in cache.rglob("*") if p.is_dir())]:
        folder.chmod(0o555)
    try:
        r = subprocess.run([*_without_write_permission(), sys.executable, "-c", READ_ONLY, ADD_ONE],
                           capture_output=True, text=True, timeout=240, env=_env(TILESTACK_CACHE_DIR=str(cache)))
    finally:
        for folder in [cache, *(p for p in cache.rglob("*") if p.is_dir())]:
            folder.chmod(0o755)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["old"] == {"BM": 64} and out["new"] == {"BM": 128}      # the new winner, for this process
    assert out["kernel"] == [1.0] * 4 and out["ceilings"] and out["store"]
    said = "\n".join(out["warnings"])
    for expected in ("tuned config not saved", "generated kernels go to", "ceilings not cached",
                     "results are not stored"):
        assert expected in said, said
    assert {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()} == before


# ---- distributed checkpoints --------------------------------------------------------------------------------------
def test_training_killed_in_a_checkpoint_save_resumes_to_the_uninterrupted_state(tmp_path):
    """2 gloo ranks save every 2 steps; in the save after step 4 rank 1 is SIGKILLed as it writes its shards (rank
    0 has written its own). The checkpoint is still step 2's, whole; resumed from it in a fresh process group
    (another initial model), training reaches the uninterrupted run's losses and parameters exactly. Checkpoints
    of other models and damaged ones are refused, naming the folder; a kill between the swap's renames settles."""
    import _faults_workers_round1 as W  # tests/ is on the path (conftest); spawned ranks inherit it
    from tilestack.errors import LaunchError
    from tilestack.parallel import run_local

    ckpt = tmp_path / "run" / "ckpt"
    with pytest.raises(LaunchError, match="rank"):
        run_local(W.train_killed_in_save, 2, (str(ckpt), 4), timeout_s=120)
    r = run_local(W.resume_and_faults, 2, (str(ckpt), str(tmp_path)), timeout_s=240)[0]
    assert r["start"] == 2                                          # the last whole checkpoint's step
    assert r["resumed_losses"] == r["whole_losses"][2:]
    for name, p in r["whole"].items():
        assert torch.equal(r["resumed"][name], p), name
        assert torch.equal(r["again"][name], p), name
    assert r["again_start"] == W.STEPS and r["left"] == ["ckpt"]       # the killed save's files gone
    assert r["swap_cut_after_old"] == W.STEPS and r["swap_cut_after_old_left"] == ["ckpt"]
    assert r["swap_cut_in_save"] == 2                              # the previous checkpoint back in place
    assert "holds files that are not a checkpoint's (notes.txt)" in r["foreign_folder"]
    assert "is a file; expected a folder" in r["a_file"] and r["mine_left"] == ["notes.txt"]
    assert "this model lacks (layers.1." in r["fewer_layers"] and "nothing was loaded" in r["fewer_layers"]
    assert "of another shape (" in r["wider"] and "saved [32], here [64]" in r["wider"]
    assert "holds another model: 16 parameters it lacks (layers.2." in r["more_layers"]      # 16 per block
    for damaged in ("no_metadata", "empty"):
        assert f"'{tmp_path / damaged}' has no .metadata: not a whole checkpoint" in r[damaged]
    assert f"'{tmp_path / 'garbage_metadata' / '.metadata'}' cannot be read" in r["garbage_metadata"]
    assert f"'{tmp_path / 'truncated_shard'}' cannot be read" in r["truncated_shard"]
    assert "load an earlier" in r["truncated_shard"] and "load an earlier" in r["garbage_metadata"]
