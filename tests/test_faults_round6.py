"""Nothing is lost on a fault, round six: the result store locked by another process, the ``tilestack`` command
under bad TILESTACK_* settings, and ``tilestack compare`` / ``bench compare`` on runs that do not exist, ran on
different devices, or hold no case in common. Real processes and real files throughout; workers:
tests/_faults_workers_round6.py.

What this round found: every ``Store`` open wrote the schema row (an INSERT, so the write lock), so ``tilestack
runs``, ``compare`` and ``report`` waited out another process's write transaction for the busy timeout (10 s) and
then called the store "not a readable SQLite database ... move it aside (its results are lost to tilestack)": a
store in use, intact, was declared lost. The row is written only by the opener that makes the store; readers read
through another process's write, and a writer that cannot get the lock says the store is locked and its results
intact (``perf/store.py``). A bad TILESTACK_BACKEND, TILESTACK_SDPA_DROPOUT or an empty TILESTACK_CACHE_DIR made
the ``tilestack`` command die in ``import tilestack`` with a Python traceback (exit 1): the command now prints the
same message naming the variable and exits 2 (``config._knobs_or_exit``); ``import tilestack`` still raises. A
TILESTACK_CACHE_DIR that is a file made ``tilestack runs`` name only the store's path below it: the message now says
it is the cache folder and names the variable. ``bench compare`` called a run of ``tilestack profile`` rows
"no results", as if it were empty: it says how many results it holds and of which command. One damaged row (a run's
versions or a result that is no JSON any more) was a JSONDecodeError traceback out of every command reading the
store: the field reads as unknown, the result is skipped, each with a warning naming the store and the row.
``tilestack tune --head-dim 7`` (or a --size no problem has) dropped the value without a word and tuned the rest:
it is refused naming the option, the value and the values there are. A damaged user tuning table made every kernel
launch that looks up a tuned config raise its ValueError: the launch's lookup leaves it out with a warning naming it
and takes the shipped config (``ConfigCache(damaged="warn")``); ``ConfigCache()`` still raises, and ``tilestack
tune``, which died in a ValueError traceback once it read the tables, refuses such a table by name before any work.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WORKERS = Path(__file__).with_name("_faults_workers_round6.py")
SRC = str(Path(__file__).resolve().parents[1] / "src")
TILESTACK = Path(sys.executable).parent / "tilestack"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILESTACK_")}
    return {**env, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), "COLUMNS": "400", **extra}


def _worker(*args: str, env: dict | None = None, timeout: float = 60) -> str:
    done = subprocess.run([sys.executable, str(WORKERS), *args], capture_output=True, text=True, timeout=timeout,
                          env=env or _env())
    assert done.returncode == 0, done.stderr
    return done.stdout


def _command(*args: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(TILESTACK), *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                          env=_env(**env))


def _flat(text: str) -> str:
    """``text`` without rich's box characters and white space (rich wraps a long message anywhere)."""
    return "".join(ch for ch in text if not ch.isspace() and not "\u2500" <= ch <= "\u257f")


@pytest.fixture(scope="module")
def filled_once(tmp_path_factory) -> Path:
    """A result store of three runs: ``on-gpu`` (gemm, on an H100), ``on-cpu`` (softmax) and ``a-profile``."""
    folder = tmp_path_factory.mktemp("store")
    db = folder / "results.sqlite"
    assert "filled" in _worker("fill", str(db), env=_env(TILESTACK_CACHE_DIR=str(folder / "cache")))
    assert not Path(f"{db}-wal").exists()          # checkpointed at close: the one file is the whole store
    return db


@pytest.fixture
def filled(filled_once, tmp_path) -> Path:
    """A copy of the store of three runs, for one test."""
    db = tmp_path / "results.sqlite"
    shutil.copyfile(filled_once, db)
    return db


def _invoke(*args: str, cache: Path):
    """The command in this process (typer's runner): its exit code and output, the store a real file."""
    from typer.testing import CliRunner

    from tilestack import config
    from tilestack.cli import _register, app

    _register()
    with config.override(cache_dir=cache):
        res = CliRunner().invoke(app, list(args), terminal_width=400)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res


# ---- a store locked by another process ------------------------------------------------------------------------------
def test_a_store_locked_by_another_process_is_read_at_once_and_a_writer_is_told_it_is_locked(filled, tmp_path):
    """Readers (`tilestack runs`, `compare`) read through another process's write transaction at once; a writer
    waits the busy timeout and is then told the store is locked and intact, never that it is unreadable."""
    before = filled.read_bytes()
    holder = subprocess.Popen([sys.executable, str(WORKERS), "hold-lock", str(filled), "60"], stdout=subprocess.PIPE,
                              text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        writer = subprocess.Popen([sys.executable, str(WORKERS), "start-run", str(filled)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=_env(TILESTACK_CACHE_DIR=str(tmp_path)))
        runs = _command("runs", "--db", str(filled), cwd=tmp_path)   # (it failed after a 10 s wait)
        assert runs.returncode == 0, runs.stdout + runs.stderr
        assert {"on-gpu", "on-cpu", "a-profile"} <= set(runs.stdout.split()), runs.stdout
        cmp = _command("bench", "compare", "on-gpu", "on-cpu", "--db", str(filled), cwd=tmp_path)
        assert cmp.returncode == 1 and "NOT COMPARABLE" in cmp.stdout, cmp.stdout + cmp.stderr
        out, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err
        assert out.startswith("error "), out                  # the lock outlived the writer's busy timeout
        assert "is locked by another process" in out and str(filled) in out, out
        assert "not a readable" not in out and "move it aside" not in out, out
    finally:
        holder.kill()
        holder.wait()
    # the lock gone, the same writer starts its run and nothing was lost
    assert _worker("start-run", str(filled)).startswith("started ")
    assert before  # (the WAL holds the new run until a checkpoint: the file's bytes need not change)
    listed = _command("runs", "--db", str(filled), cwd=tmp_path)
    assert {"on-gpu", "on-cpu", "a-profile", "late"} <= set(listed.stdout.split()), listed.stdout


# ---- the command under bad TILESTACK_* settings ---------------------------------------------------------------------
BAD_SETTINGS = [("TILESTACK_BACKEND", "garbage", "expected one of"),
                ("TILESTACK_SDPA_DROPOUT", "sometimes", "expected one of"),
                ("TILESTACK_CACHE_DIR", "", "expected a folder path"),
                ("TILESTACK_CACHE_DIR", "   ", "expected a folder path")]


@pytest.mark.parametrize("how", ["script", "-m"])
@pytest.mark.parametrize("var, value, expected", BAD_SETTINGS, ids=lambda v: repr(v) if v.strip() == "" else v)
def test_a_bad_setting_is_a_usage_error_of_the_command_naming_the_variable(var, value, expected, how, tmp_path):
    """It was a traceback out of ``import tilestack`` (exit 1); now exit 2, the variable, the value, no work done."""
    args = ["runs", "--db", str(tmp_path / "r.sqlite")]
    cmd = [str(TILESTACK), *args] if how == "script" else [sys.executable, "-m", "tilestack.cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=_env(**{var: value}))
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert f"{var}={value!r}" in done.stderr and expected in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []                       # no store made, nothing written where it ran


def test_the_library_still_raises_on_a_bad_setting(tmp_path):
    """Only the command turns the error into a usage message: ``import tilestack`` in a program still raises it."""
    done = subprocess.run([sys.executable, "-c", "import tilestack"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env=_env(TILESTACK_BACKEND="garbage"))
    assert done.returncode == 1 and "ValueError: TILESTACK_BACKEND='garbage'" in done.stderr, done.stderr


@pytest.mark.parametrize("command", [["runs"], ["compare", "latest", "latest~1"]])
def test_a_cache_dir_that_is_a_file_is_named_as_the_cache_folder(command, tmp_path):
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("keep me")
    done = _command(*command, cwd=tmp_path, TILESTACK_CACHE_DIR=str(a_file))
    assert done.returncode in (1, 2), (done.returncode, done.stdout, done.stderr)   # (compare and report exit 1)
    text = _flat(done.stdout + done.stderr)
    assert "Traceback" not in text
    assert "TILESTACK_CACHE_DIR" in text and _flat(str(a_file)) in text, text
    assert a_file.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]


# ---- compare: runs that do not exist, other devices, no case in common (in this process, the store a real file) ----
@pytest.mark.parametrize("command", ["compare", "bench compare"])
@pytest.mark.parametrize("sides, missing", [(["on-gpu", "no-such-run"], "no-such-run"),
                                            (["20990101-000000-dead", "on-cpu"], "20990101-000000-dead"),
                                            (["on-gpu", "latest~7"], "latest~7")])
def test_compare_refuses_a_run_that_is_not_there_naming_it_and_the_devices_there_are(command, sides, missing,
                                                                                      filled_once, tmp_path):
    before = filled_once.read_bytes()
    res = _invoke(*command.split(), *sides, "--db", str(filled_once), cache=tmp_path / "cache")
    assert res.exit_code in (1, 2), (res.exit_code, res.output)
    text = _flat(res.output)
    assert "Traceback" not in text and f"'{missing}'" in text, text
    if not missing.startswith("latest"):
        assert "NVIDIAH10080GBHBM3" in text and "cpu" in text, text      # the devices there are, to choose from
    assert "NOTCOMPARABLE" not in text                                    # refused, not compared with nothing
    assert filled_once.read_bytes() == before


@pytest.mark.parametrize("command", ["compare", "bench compare"])
def test_compare_of_two_devices_with_no_case_in_common_says_so_and_exits_1(command, filled_once, tmp_path):
    res = _invoke(*command.split(), "on-gpu", "on-cpu", "--db", str(filled_once), cache=tmp_path / "cache")
    assert res.exit_code == 1, (res.exit_code, res.output)
    text = _flat(res.output)
    assert "NOTCOMPARABLE" in text and "devicesdiffer" in text, text
    assert "gemm" in text and "softmax" in text, text                       # what each side did hold


def test_bench_compare_of_a_profile_run_says_what_it_holds_not_that_it_is_empty(filled_once, tmp_path):
    res = _invoke("bench", "compare", "a-profile", "on-cpu", "--db", str(filled_once), cache=tmp_path / "cache")
    assert res.exit_code == 1, res.output
    text = _flat(res.output)
    assert "A:nobenchresults(1resultof'tilestackprofile'" in text, text
    assert "A:noresults" not in text


def test_compare_of_a_run_with_itself_pairs_every_case_at_speed_up_one(filled_once, tmp_path):
    res = _invoke("bench", "compare", "on-gpu", "on-gpu", "--db", str(filled_once), cache=tmp_path / "cache")
    assert res.exit_code == 0, res.output
    assert "NOT COMPARABLE" not in res.output and "gemm" in res.output and "1.00" in res.output, res.output


# ---- tune: a --size or --head-dim that no problem has ---------------------------------------------------------------
@pytest.mark.parametrize("args, needles", [
    (["--head-dim", "7"], ["--head-dim 7", "[64, 128, 256]"]),
    (["--head-dim", "64", "--head-dim", "100000"], ["--head-dim 100000", "[64, 128, 256]"]),
    (["--size", "1024", "--size", "1000"], ["--size 1000", "1024"]),
    (["-k", "gemm", "--head-dim", "64"], ["--head-dim 64", "only the attention kernels have one"]),
    (["--small", "-k", "gemm", "--dtype", "bfloat16", "--size", "48", "--size", "64"], ["--size 64", "[48, 80]"]),
])
def test_tune_refuses_a_size_or_head_dim_no_problem_has_naming_it_and_the_valid_ones(args, needles, tmp_path):
    """Such a value was dropped without a word: --head-dim 7 tuned every kernel but attention, --size 1024 --size
    1000 tuned the 1024 problems only, -k gemm --head-dim 64 tuned gemm as if --head-dim were not given."""
    report = tmp_path / "report.json"
    res = _invoke("tune", *args, "--dry-run", "--report", str(report), cache=tmp_path / "cache")
    assert res.exit_code == 2, (res.exit_code, res.output)
    text = _flat(res.output)
    for needle in needles:
        assert _flat(needle) in text, (needle, res.output)
    assert "Traceback" not in text and not report.exists() and not (tmp_path / "cache").exists()


def test_tune_still_plans_the_sizes_and_head_dims_there_are(tmp_path):
    res = _invoke("tune", "-k", "attention_fwd", "--head-dim", "64", "--size", "1024", "--dry-run",
                  cache=tmp_path / "cache")
    assert res.exit_code == 0, res.output
    assert "D=64" in res.output and "N=1024" in res.output and "D=128" not in res.output, res.output


# ---- a store with damaged rows --------------------------------------------------------------------------------------
def _damage(db: Path) -> None:
    """One run's versions and one result's row, not JSON any more (edited by hand, or another tool)."""
    import sqlite3

    con = sqlite3.connect(db)
    con.execute("UPDATE runs SET versions_json = '{broken' WHERE label = 'on-cpu'")
    con.execute("UPDATE results SET row_json = '{cut' WHERE id = (SELECT MIN(id) FROM results WHERE run_id = "
                "(SELECT id FROM runs WHERE label = 'on-gpu'))")
    con.commit()
    con.close()


def test_a_damaged_row_costs_a_warning_naming_it_not_the_whole_store(filled, tmp_path):
    """A JSONDecodeError traceback came out of `tilestack runs`, `compare`, `bench compare` and `report` for every
    run of the store; now the damaged field reads as unknown and the damaged result is skipped, each with a warning."""
    _damage(filled)
    runs = _command("runs", "--db", str(filled), cwd=tmp_path)
    assert runs.returncode == 0 and "Traceback" not in runs.stderr, runs.stderr
    assert {"on-gpu", "on-cpu", "a-profile"} <= set(runs.stdout.split()), runs.stdout
    assert "versions_json is damaged" in runs.stderr and str(filled) in runs.stderr, runs.stderr
    with pytest.warns(UserWarning, match=r"1 damaged result row\(s\) skipped"):
        res = _invoke("bench", "compare", "on-gpu", "on-gpu", "--db", str(filled), cache=tmp_path / "cache")
    assert res.exit_code == 0 and "gemm" in res.output, res.output          # the whole row of the pair still pairs
    from tilestack.perf.store import Store

    with Store(filled) as st, pytest.warns(UserWarning, match="damaged"):
        assert [m.name for m in st.measurements("on-gpu")] == ["baseline.gemm"]
        assert st.run("on-cpu").versions is None and st.run("on-gpu").versions["torch"]


# ---- a damaged user tuning table at a kernel launch -----------------------------------------------------------------
@pytest.mark.parametrize("content", [b'{"format": 3, "device": {"key": "sm90-132sm', b"\x00" * 64, b"[]"],
                         ids=["cut-short", "zeros", "a-list"])
def test_a_damaged_user_table_costs_a_launch_a_warning_and_the_shipped_config(content, tmp_path):
    """The launch's lookup raised the table's ValueError: every tuned kernel launch on that GPU failed until the
    file was deleted. It warns, naming the file, and takes the shipped table's config, the one it takes with no
    user table at all; the damaged file is left as it was (`tilestack tune` still refuses it by name)."""
    shipped = _worker("resolve", "gemm", "bfloat16", "4096", env=_env(TILESTACK_CACHE_DIR=str(tmp_path / "clean")))
    assert "warning" not in shipped and shipped.strip() not in ("", "null"), shipped
    table = tmp_path / "cache" / "tuned" / "sm90-132sm-227kb.json"
    table.parent.mkdir(parents=True)
    table.write_bytes(content)
    out = _worker("resolve", "gemm", "bfloat16", "4096", env=_env(TILESTACK_CACHE_DIR=str(tmp_path / "cache")))
    warned = [line for line in out.splitlines() if line.startswith("warning ")]
    assert len(warned) == 1 and f"tuned-config table {table}" in warned[0] and "shipped" in warned[0], out
    assert out.splitlines()[-1] == shipped.splitlines()[-1]
    assert table.read_bytes() == content
    from tilestack.tune.cache import ConfigCache

    with pytest.raises(ValueError, match=f"tuned-config table {table}"):
        ConfigCache(tmp_path / "cache", tables_dir=None)



@pytest.mark.parametrize("args", [["--missing", "--dry-run", "--as-device", "sm90-132sm-227kb:NVIDIA H200"],
                                  ["--small", "-k", "gemm", "--dtype", "bfloat16", "--budget-s", "5"]],
                         ids=["missing", "run"])
def test_tune_refuses_a_damaged_user_table_by_name_before_any_work(args, tmp_path):
    """It was a ValueError traceback, once --missing (or the run) first read the tables."""
    cache = tmp_path / "cache"
    table = cache / "tuned" / "sm89-128sm-99kb.json"
    table.parent.mkdir(parents=True)
    table.write_bytes(b'{"format": 3, "dev')
    report = tmp_path / "report.json"
    res = _invoke("tune", *args, "--report", str(report), cache=cache)
    assert res.exit_code == 2, (res.exit_code, res.output)
    text = _flat(res.output)
    assert "Traceback" not in text and _flat(f"tuned-config table {table}") in text and "deleteit" in text, text
    assert table.read_bytes() == b'{"format": 3, "dev' and not report.exists()
    assert sorted(p.name for p in table.parent.iterdir()) == [table.name]       # nothing tuned, nothing moved aside


def test_bench_compare_calls_a_folder_named_like_a_record_a_folder(tmp_path):
    """It said "no such file" of a folder that is there."""
    folder = tmp_path / "run.json"
    folder.mkdir()
    res = _invoke("bench", "compare", str(folder), str(folder), cache=tmp_path / "cache")
    assert res.exit_code == 2, res.output
    assert _flat(f"record='{folder}' is a folder") in _flat(res.output) and "nosuchfile" not in _flat(res.output)
