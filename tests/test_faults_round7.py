"""Nothing is lost on a fault, round seven: paths the ``tilestack`` command cannot even look at, a full disk in the
middle of a write, files reached through a symbolic link, a launcher SIGKILLed under its ranks, and bad
TILESTACK_CACHE_DIR values. Workers: tests/_faults_workers_round7.py.

What this round found. pathlib's ``exists()`` / ``is_dir()`` / ``is_file()`` raise (they do not answer False) for a
path below a folder this user cannot enter (EACCES) or with a name over 255 bytes (ENAMETOOLONG): every path option
of every command (``--out``, ``--db``, ``--checkpoint``, ``--data``, ``--plan``, ``--doc``, ``--figures``, a
``bench compare`` record, a ``profile`` / ``plan --target`` script) came out as a PermissionError or OSError
traceback (exit 1) before saying which option it was; so did a TILESTACK_CACHE_DIR below such a folder (``runs``,
``train``, ``profile``, ``tune``, ``plan``), and ``ConfigCache(damaged="warn")``, which every kernel launch's tuned
lookup builds, raised it too instead of warning. Each is now refused naming the option (or the cache folder and its
variable), exit 2, before any work (``cli/args.py``, ``train_state``, ``planfile.read_plan``, ``perf/store.py``,
``bench/record.py``, ``profile_render.load_target``, ``tune/cache.py``, ``plan/comm.py``). ``train --plan`` of an
unreadable file was a PermissionError traceback. TILESTACK_CACHE_DIR='~nobody/x' was pathlib's bare RuntimeError
("Could not determine home directory") out of ``import tilestack``: a ValueError naming the variable, and exit 2 for
the command. ``write_atomic``'s errors after the temporary was made (os.write, os.fsync, os.replace: a full disk)
named no file, "[Errno 28] No space left on device", whichever cache or checkpoint it was: they name the file asked
for. A file reached through a symbolic link (a tuned table or a doc shared from elsewhere) was replaced by a copy,
the link gone and the shared file left behind: the file the link names is written. The rename was not made durable
(the folder was not fsynced). ``tilestack train`` SIGKILLed (by a user or the OOM killer) left its ranks training as
orphans, saving checkpoints into the run's --out while the user's ``--resume`` used the same folder: a rank now ends
when its launcher is gone. Two ``tilestack train --out DIR`` at once both passed the checks; the second wrote its
settings over the first's train.json and both saved checkpoints there: the run holds ``DIR/.lock`` and a second is
refused naming --out (``cli/train_state.py``; tests/test_faults_round2.py's listing of a resumed run's folder now
holds the .lock). ``train --save-every N`` without ``--out`` was dropped without a word.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

WORKERS = Path(__file__).with_name("_faults_workers_round7.py")
SRC = str(Path(__file__).resolve().parents[1] / "src")
TILESTACK = Path(sys.executable).parent / "tilestack"
LONG = "n" * 300                     # a file name over NAME_MAX (255 bytes)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILESTACK_")}
    return {**env, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), "COLUMNS": "400",
            "FLWR_TELEMETRY_ENABLED": "0", **extra}


def _flat(text: str) -> str:
    """``text`` without rich's box characters and white space (rich wraps a long message anywhere)."""
    return "".join(ch for ch in text if not ch.isspace() and not "\u2500" <= ch <= "\u257f")


def _without_write_permission() -> list[str]:
    """A command prefix under which permission bits hold: as root, without the capabilities that override them."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: a folder of mode 000 cannot be made to hold")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]


def _refused(got: list, *needles: str, code: int = 2) -> None:
    exit_code, output, exception = got
    assert exit_code == code, (exit_code, output[-2000:], exception)
    assert "Traceback" not in output, output[-2000:]
    assert exception is None or exception.startswith("SystemExit"), exception
    for needle in needles:
        assert _flat(needle) in _flat(output), (needle, output[-2000:])


# ---- every path option below a folder this user cannot enter ------------------------------------------------------
FL = ["fl", "run", "--rounds", "1", "--clients", "2", "--per-round", "1"]
TINY_PLAN = ["plan", "--nproc", "2", "--model", "tiny"]

# case -> (args with {x} for a path below the closed folder, what the message must hold)
CLOSED = {
    "fl-out": ([*FL, "--out", "{x}/h.json"], ["--out"]),
    "fl-checkpoint": ([*FL, "--checkpoint", "{x}/c.ckpt"], ["--checkpoint"]),
    "fl-data": ([*FL, "--data", "{x}/d.csv"], ["--data"]),
    "fl-trace": ([*FL, "--trace", "{x}/t.csv"], ["--trace"]),
    "fl-bench-doc": (["fl", "bench", "--doc", "{x}/f.md"], ["--doc"]),
    "fl-bench-img": (["fl", "bench", "--img", "{x}/img"], ["--img"]),
    "train-out": (["train", "--no-store", "--out", "{x}/run"], ["--out"]),
    "train-plan": (["train", "--no-store", "--plan", "{x}/plan.json"], ["plan file", "cannot be read"]),
    "plan-out": ([*TINY_PLAN, "--out", "{x}/plan.json"], ["--out"]),
    "plan-figures": ([*TINY_PLAN, "--figures", "{x}/figs"], ["--figures"]),
    "plan-target": (["plan", "--nproc", "2", "--target", "{x}/m.py"], ["target="]),
    "tune-report": (["tune", "--dry-run", "--report", "{x}/r.json"], ["--report"]),
    "tune-ship-out": (["tune", "--dry-run", "--ship", "--out", "{x}/t"], ["--out"]),
    "tune-model-data": (["tune", "--dry-run", "--model", "--model-data", "{x}/d.jsonl"], ["--model-data"]),
    "bench-out": (["bench", "--small", "--no-models", "-k", "gemm", "--out", "{x}/b"], ["--out"]),
    "bench-against": (["bench", "--small", "--no-models", "-k", "gemm", "--against", "{x}/r.json"], ["--against"]),
    "bench-compare": (["bench", "compare", "{x}/a.json", "{x}/b.json"], ["record="]),
    "bench-compare-db": (["bench", "compare", "latest", "latest", "--db", "{x}/s.sqlite"], ["--db"]),
    "runs-db": (["runs", "--db", "{x}/s.sqlite"], ["--db"]),
    "report-out": (["report", "latest", "--out", "{x}/rep"], ["--out"]),
    "compare-db": (["compare", "a", "b", "--db", "{x}/s.sqlite"], ["--db"]),
    "profile-target": (["profile", "{x}/m.py"], ["target="]),
    "profile-out": (["profile", "{afile}", "--out", "{x}/p"], ["--out"]),
    "profile-db": (["profile", "{afile}", "--db", "{x}/s.sqlite"], ["--db"]),
    "ncu-db": (["ncu", "--case", "gemm", "--db", "{x}/s.sqlite"], ["--db"]),
}
# the cache folder (TILESTACK_CACHE_DIR) below the closed folder
CLOSED_CACHE = {
    "cache-runs": (["runs"], ["results.sqlite", "TILESTACK_CACHE_DIR"]),
    "cache-train": (["train", "--steps", "2"], ["--store", "results.sqlite", "TILESTACK_CACHE_DIR"]),
    "cache-profile": (["profile", "{afile}"], ["results.sqlite", "TILESTACK_CACHE_DIR"]),
    "cache-tune": (["tune", "--dry-run", "-k", "softmax"], ["tuned-config folder", "TILESTACK_CACHE_DIR"]),
    "cache-plan": ([*TINY_PLAN], ["comm-gloo-cpu.json", "Permission denied"]),
}


@pytest.fixture(scope="module")
def closed_runs(tmp_path_factory):
    """Every case of CLOSED and CLOSED_CACHE run once, in one process without the capabilities that override
    permission bits, with a folder of mode 000 on each path's way."""
    root = tmp_path_factory.mktemp("closed")
    closed = root / "closed"
    (closed / "inner").mkdir(parents=True)
    (root / "a_file.py").write_text("x = 1\n")

    def fill(cases):
        return json.dumps({name: [a.format(x=closed / "inner", afile=root / "a_file.py") for a in args]
                           for name, (args, _) in cases.items()})

    prefix = _without_write_permission()
    closed.chmod(0o000)
    try:
        got = {}
        for cases, cache in ((CLOSED, root / "cache"), (CLOSED_CACHE, closed / "inner" / "cache")):
            r = subprocess.run([*prefix, sys.executable, str(WORKERS), "cli", fill(cases)], capture_output=True,
                               text=True, timeout=300, cwd=root, env=_env(TILESTACK_CACHE_DIR=str(cache)))
            assert r.returncode == 0, r.stderr[-3000:]
            got.update(json.loads(r.stdout.splitlines()[-1]))
    finally:
        closed.chmod(0o755)
    return root, got


@pytest.mark.parametrize("case", CLOSED)
def test_a_path_below_a_folder_this_user_cannot_enter_is_refused_by_its_option(closed_runs, case):
    """A PermissionError traceback (exit 1) before; now exit 2, the option, the path and why, before any work."""
    root, got = closed_runs
    code = 1 if case == "profile-target" else 2          # (profile's target errors are exit 1: test_cli_bad_args)
    _refused(got[case], *CLOSED[case][1], "Permission denied", code=code)
    assert not (root / "cache").exists()                  # no store made, no fit measured, no ceilings cached


@pytest.mark.parametrize("case", CLOSED_CACHE)
def test_a_cache_folder_below_a_folder_this_user_cannot_enter_is_named_before_any_work(closed_runs, case):
    _, got = closed_runs
    _refused(got[case], *CLOSED_CACHE[case][1], "Permission denied")
    assert "step 1/" not in got[case][1]                  # refused before training


def test_the_library_names_a_folder_it_cannot_enter(tmp_path):
    """The store, the plan file reader, a record, the tuned tables: each names the path; a kernel launch's lookup
    (``damaged="warn"``) warns and takes the shipped tables, as for a damaged table."""
    code = r"""
import json, sys, warnings
from pathlib import Path
from tilestack.perf.store import Store
from tilestack.parallel.plan.planfile import read_plan
from tilestack.bench.record import load_side
from tilestack.tune.cache import ConfigCache
inner = Path(sys.argv[1]) / "inner"
out = {}
for name, fn in [("store", lambda: Store(inner / "s.sqlite")), ("plan", lambda: read_plan(inner / "p.json")),
                 ("record", lambda: load_side(str(inner / "r.json"))),
                 ("tables", lambda: ConfigCache(inner, tables_dir=None))]:
    try:
        fn()
        out[name] = "no error"
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    cache = ConfigCache(inner, damaged="warn")
out["warn"] = [str(w.message) for w in seen]
out["shipped"] = len(cache.shipped)
out["user"] = len(cache.user)
print(json.dumps(out))
"""
    closed = tmp_path / "closed"
    (closed / "inner").mkdir(parents=True)
    prefix = _without_write_permission()
    closed.chmod(0o000)
    try:
        r = subprocess.run([*prefix, sys.executable, "-c", code, str(closed)], capture_output=True, text=True,
                           timeout=120, env=_env())
    finally:
        closed.chmod(0o755)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    inner = closed / "inner"
    assert out["store"].startswith("StoreError") and str(inner / "s.sqlite") in out["store"], out["store"]
    assert out["plan"].startswith("PlanError") and str(inner / "p.json") in out["plan"], out["plan"]
    assert out["record"].startswith("RecordError") and str(inner / "r.json") in out["record"], out["record"]
    assert out["tables"].startswith("ValueError") and str(inner / "tuned") in out["tables"], out["tables"]
    assert all("Permission denied" in out[k] for k in ("store", "plan", "record", "tables"))
    assert len(out["warn"]) == 1 and str(inner / "tuned") in out["warn"][0] and "shipped" in out["warn"][0]
    assert out["user"] == 0 and out["shipped"] > 0


def test_an_unreadable_plan_file_is_refused_by_name(tmp_path):
    """``train --plan`` of a file this user cannot read: a PermissionError traceback before."""
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    plan.chmod(0o000)
    try:
        r = subprocess.run([*_without_write_permission(), str(TILESTACK), "train", "--no-store", "--plan", str(plan)],
                           capture_output=True, text=True, timeout=120, env=_env(TILESTACK_CACHE_DIR=str(tmp_path)))
    finally:
        plan.chmod(0o644)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert _flat(f"plan file {str(plan)!r} cannot be read (Permission denied)") in _flat(r.stderr), r.stderr[-2000:]


# ---- a name too long to look up -----------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needles", [
    (["runs", "--db", LONG], ["--db", "File name too long"]),
    ([*FL, "--out", LONG], ["--out", "File name too long"]),
    ([*FL, "--data", LONG], ["--data", "File name too long"]),
    (["train", "--no-store", "--out", LONG], ["--out", "File name too long"]),
    (["train", "--no-store", "--plan", LONG], ["plan file", "File name too long"]),
    ([*TINY_PLAN, "--out", LONG], ["--out", "File name too long"]),
    ([*TINY_PLAN, "--figures", LONG], ["--figures", "File name too long"]),
    (["bench", "compare", LONG + ".json", "x.json"], ["record=", "File name too long"]),
    (["profile", LONG + ".py"], ["target=", "File name too long"]),
], ids=["runs-db", "fl-out", "fl-data", "train-out", "train-plan", "plan-out", "plan-figures", "bench-compare",
        "profile"])
def test_a_name_too_long_is_refused_by_its_option(args, needles, tmp_path, monkeypatch):
    """An OSError (ENAMETOOLONG) traceback out of pathlib before."""
    from typer.testing import CliRunner

    from tilestack import config
    from tilestack.cli import _register, app

    _register()
    monkeypatch.chdir(tmp_path)
    with config.override(cache_dir=tmp_path / "cache"):
        res = CliRunner().invoke(app, args)
    _refused([res.exit_code, res.output, None if res.exception is None else repr(res.exception)], *needles,
             code=1 if args[0] == "profile" else 2)
    assert not (tmp_path / "cache").exists()


# ---- TILESTACK_CACHE_DIR with a '~' of no user --------------------------------------------------------------------
def test_a_cache_dir_of_an_unknown_home_names_the_variable():
    """pathlib's bare RuntimeError ("Could not determine home directory.") out of ``import tilestack`` before."""
    value = "~no_such_user_r7/cache"
    env = _env(TILESTACK_CACHE_DIR=value)
    lib = subprocess.run([sys.executable, "-c", "import tilestack"], capture_output=True, text=True, timeout=60,
                         env=env)
    assert lib.returncode == 1 and f"ValueError: TILESTACK_CACHE_DIR={value!r}" in lib.stderr, lib.stderr[-1500:]
    cmd = subprocess.run([str(TILESTACK), "runs"], capture_output=True, text=True, timeout=60, env=env)
    assert cmd.returncode == 2 and "Traceback" not in cmd.stderr, cmd.stderr[-1500:]
    assert f"TILESTACK_CACHE_DIR={value!r}" in cmd.stderr and "home" in cmd.stderr


# ---- a full disk in the middle of a write -------------------------------------------------------------------------
def _writers(root: Path) -> dict:
    import numpy as np

    from tilestack.bench.record import Record
    from tilestack.federated.run_state import save_checkpoint
    from tilestack.files import write_atomic

    return {
        "write_atomic": (root / "notes.txt", lambda i: write_atomic(root / "notes.txt", f"version {i}\n" * 5000)),
        "bench-record": (root / "bench.json",
                         lambda i: Record(f"cpu: {i}", [], started_at=f"t{i}").write(root / "bench.json")),
        "federated-checkpoint": (root / "run.ckpt", lambda i: save_checkpoint(
            root / "run.ckpt", {"round": i, "arrays": np.full(1 << 14, float(i)), "strategy": {}, "history": []})),
    }


@pytest.mark.parametrize("writer", ["write_atomic", "bench-record", "federated-checkpoint"])
@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_a_disk_that_fills_mid_write_keeps_the_old_file_and_names_the_file(tmp_path, monkeypatch, writer, where):
    """ENOSPC from ``os.write`` after part of the data went out (or from fsync, or the rename): the error names the
    file asked for (it said only "[Errno 28] No space left on device"), keeps its class and errno, and the file on
    disk is the previous one, whole, with no temporary beside it."""
    path, write = _writers(tmp_path)[writer]
    write(0)
    before = path.read_bytes()
    real = getattr(os, where)

    def full(*args, **kwargs):
        if where == "write" and len(args[1]) > 64:
            real(args[0], bytes(args[1][:64]))        # part of it written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, where, full)
    with pytest.raises(OSError) as info:
        write(1)
    monkeypatch.setattr(os, where, real)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path), repr(info.value)
    assert str(path) in str(info.value) and os.strerror(errno.ENOSPC) in str(info.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_full_disk_in_a_tuning_run_warns_naming_the_table(tmp_path, monkeypatch):
    """The tuning cache keeps the winner in memory and warns; the warning names the table and the reason."""
    from tilestack.tune.cache import ConfigCache
    from tilestack.tune.devices import DeviceKey

    dev = DeviceKey.parse("sm90-132sm-227kb", name="NVIDIA H200")
    cache = ConfigCache(tmp_path, tables_dir=None)
    cache.put("gemm", "sig", dev, 1024, {"BM": 64}, options={})
    table = cache.user_path(dev)
    before = table.read_bytes()
    real = os.write

    def full(fd, data):
        real(fd, bytes(data[:10]))                # part of it written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cache.put("gemm", "sig", dev, 4096, {"BM": 128}, options={})
    monkeypatch.setattr(os, "write", real)
    said = [str(w.message) for w in seen]
    assert len(said) == 1 and str(table) in said[0] and os.strerror(errno.ENOSPC) in said[0], said
    assert table.read_bytes() == before and cache.get("gemm", "sig", dev, 4096) == {"BM": 128}
    assert ConfigCache(tmp_path, tables_dir=None).get("gemm", "sig", dev, 4096) == {"BM": 64}   # the old entry
    assert sorted(p.name for p in table.parent.iterdir()) == [table.name]


# ---- files reached through a symbolic link; the rename made durable -----------------------------------------------
def test_a_file_reached_through_a_link_is_written_where_the_link_points(tmp_path):
    """A tuned table shared through a link (``<cache>/tuned/<key>.json -> /shared/tables/<key>.json``) was replaced
    by a copy: the link gone, the shared table never updated again. The shared file gets the entry, the link
    stays, and nothing is left beside either."""
    from tilestack.tune.cache import ConfigCache
    from tilestack.tune.devices import DeviceKey

    dev = DeviceKey.parse("sm90-132sm-227kb", name="NVIDIA H200")
    shared = tmp_path / "shared"
    ConfigCache(shared, tables_dir=None).put("gemm", "sig", dev, 1024, {"BM": 64}, options={})
    target = ConfigCache(shared, tables_dir=None).user_path(dev)
    mine = tmp_path / "mine"
    (mine / "tuned").mkdir(parents=True)
    link = ConfigCache(mine, tables_dir=None).user_path(dev)
    link.symlink_to(target)
    ConfigCache(mine, tables_dir=None).put("gemm", "sig", dev, 4096, {"BM": 128}, options={})
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert ConfigCache(shared, tables_dir=None).get("gemm", "sig", dev, 4096) == {"BM": 128}
    assert ConfigCache(shared, tables_dir=None).get("gemm", "sig", dev, 1024) == {"BM": 64}
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    assert sorted(p.name for p in link.parent.iterdir()) == [link.name]


def test_a_loop_of_links_is_refused_naming_it(tmp_path):
    from tilestack.files import write_atomic

    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(OSError) as info:
        write_atomic(tmp_path / "a", "x")
    assert info.value.errno == errno.ELOOP and "a" in Path(info.value.filename).name
    assert (tmp_path / "a").is_symlink() and (tmp_path / "b").is_symlink()


def test_the_rename_is_synced_with_its_folder(tmp_path, monkeypatch):
    """The data is fsynced before the rename and the folder after it: a power cut cannot bring back the old file
    after the writer was told the new one is written (checkpoints, tuned tables, records)."""
    import stat

    from tilestack.files import write_atomic

    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_atomic(tmp_path / "x.json", "{}")
    assert synced == ["file", "folder"]


# ---- a launcher SIGKILLed under its ranks -------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has ended; only its parent has not collected it yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_ranks_end_when_their_launcher_is_sigkilled(tmp_path):
    """run_local's ranks went on as orphans after a SIGKILL of the launching process (``tilestack train``: still
    training, still saving checkpoints into --out while the next ``--resume`` used it). Each rank ends once the
    process that started it is gone."""
    launcher = subprocess.Popen([sys.executable, str(WORKERS), "launch", str(tmp_path)], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rank = None
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "beat").exists():
            assert launcher.poll() is None, launcher.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the rank never started"
            time.sleep(0.2)
        rank = int((tmp_path / "rank.pid").read_text())
        assert _alive(rank)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 60        # it ends within its poll (0.5 s); the margin is the machine's load
        while _alive(rank) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(rank), "the rank outlived its launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        if rank is not None and _alive(rank):
            os.kill(rank, signal.SIGKILL)
    assert (tmp_path / "beat").read_text().isdigit()          # its last beat whole


# ---- --save-every without --out -----------------------------------------------------------------------------------
def test_save_every_without_out_is_refused(tmp_path):
    from typer.testing import CliRunner

    from tilestack import config
    from tilestack.cli import _register, app

    _register()
    with config.override(cache_dir=tmp_path / "cache"):
        res = CliRunner().invoke(app, ["train", "--no-store", "--save-every", "2"])
    _refused([res.exit_code, res.output, None], "--save-every 2", "give --out")


# ---- two runs of one --out at once -------------------------------------------------------------------------------
def test_a_second_run_of_an_out_folder_in_use_is_refused_and_leaves_the_first_runs_settings(tmp_path):
    """Two ``tilestack train --out DIR`` at once both passed the checks (no checkpoint yet): the second wrote its
    settings (another lr) over the first's train.json, and both saved checkpoints there in turn, so a later
    --resume checked one run's settings and loaded the other's state. The running one holds DIR/.lock; the second
    is refused naming --out, before it writes anything; once the first is gone the folder can be used again."""
    out = tmp_path / "run"
    cmd = [str(TILESTACK), "train", "--batch", "4", "--seq", "16", "--no-store", "--out", str(out)]
    env = _env(TILESTACK_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    first = subprocess.Popen([*cmd, "--steps", "2000", "--save-every", "1000"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        seen = ""
        for line in first.stdout:          # its first step: the folder is claimed, its settings written
            seen += line
            if line.startswith("step 1/"):
                break
        assert "step 1/" in seen, seen[-3000:]
        settings = (out / "train.json").read_text()
        second = subprocess.run([*cmd, "--steps", "4", "--lr", "0.01"], env=env, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert _flat(f"--out {str(out)!r} is in use by another tilestack train run") in _flat(second.stderr)
        assert (out / "train.json").read_text() == settings and json.loads(settings)["lr"] == 0.001
    finally:
        first.kill()
        first.wait(timeout=60)
        first.stdout.close()
    again = subprocess.run([*cmd, "--steps", "2"], env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-2000:]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads process trees from /proc")
def test_fl_bench_workers_end_when_it_is_sigkilled(tmp_path):
    """``tilestack fl bench``'s spawned pool workers hold the pool's queue open themselves: after a SIGKILL of the
    command they waited for cells forever (found here: two such workers were still there 52 minutes later). Each
    ends once the command is gone (``federated/bench.py``, as ``fl run``'s workers do: ``federated/engine.py``)."""
    bench = subprocess.Popen([str(TILESTACK), "fl", "bench", "--workers", "2", "--seeds", "1", "--doc",
                              str(tmp_path / "fl.md"), "--img", str(tmp_path / "img")],
                             env=_env(TILESTACK_CACHE_DIR=str(tmp_path / "cache")), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while len(workers) < 2:
            assert bench.poll() is None, bench.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no workers started"
            workers = [c for c in _children(bench.pid)
                       if "spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="replace")]
            time.sleep(0.2)
        bench.send_signal(signal.SIGKILL)
        bench.wait(timeout=30)
        deadline = time.monotonic() + 60       # each ends within its poll; the margin is the machine's load
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "fl bench's workers outlived it"
    finally:
        if bench.poll() is None:
            bench.kill()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        bench.stderr.close()
