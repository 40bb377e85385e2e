"""The ``tilestack`` command under bad input: every command's --help, unknown commands and options, wrong types,
out-of-range counts and shares, missing input files, output paths that cannot be made, unknown names, conflicting
options, empty and corrupt result stores, and an interrupted run.

The rule each case checks: a non-zero exit with a message that names the argument (and, for names, lists the valid
ones), no Python traceback, and nothing done before the refusal; or exit 0 where the input is valid. Most cases run
in-process (typer's CliRunner); a few run the installed ``.venv/bin/tilestack`` to see the real exit code and stderr.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tilestack import config
from tilestack.cli import _register, app

_register()

REPO = Path(__file__).resolve().parents[1]
TILESTACK = Path(sys.executable).parent / "tilestack"


def _flat(text: str) -> str:
    """``text`` without rich's box characters and without white space: a message is found however rich wrapped it
    (it folds long words, e.g. paths, mid-word)."""
    return "".join(re.sub("[\u2500-\u257f]", "", text).split())


def _invoke(args: list[str], tmp_path: Path):
    with config.override(cache_dir=tmp_path / "cache"):       # nothing stored or measured outside tmp_path
        return CliRunner().invoke(app, args)


def _refused(res, *needles: str, code: int = 2) -> None:
    """Exit ``code``, no traceback, every needle in the message."""
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    for needle in needles:
        assert _flat(needle) in _flat(res.output), (needle, res.output)


# ---- --help of every command ----------------------------------------------------------------------------

COMMANDS = [[], ["bench"], ["bench", "compare"], ["compare"], ["device"], ["profile"], ["runs"], ["report"],
            ["ncu"], ["tune"], ["train"], ["plan"], ["fl"], ["fl", "run"], ["fl", "bench"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_help_of_every_command(command, tmp_path):
    res = _invoke([*command, "--help"], tmp_path)
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "cache").exists()                 # --help does no work


def test_bench_help_lists_exactly_the_cases_there_are(tmp_path):
    """The --kernel help names the suite's cases: none missing, none made up."""
    from tilestack.bench.cases import cases

    names = {c.name for c in cases("cpu", full=False, models=True)}
    res = _invoke(["bench", "--help"], tmp_path)
    listed = set(re.findall(r"[a-z0-9_]+", res.output.split("--kernel")[1].split("--small")[0]))
    assert names <= listed, names - listed
    assert not {"attention", "rms_norm"} & listed - names


# ---- unknown commands and options -----------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["nosuch"], "No such command 'nosuch'"),
    (["fl", "nosuch"], "No such command 'nosuch'"),
    (["bench", "--nosuch"], "No such option '--nosuch'"),
    (["train", "--nosuch"], "No such option '--nosuch'"),
    (["fl", "run", "--rounds"], "Option '--rounds' requires an argument"),
    (["plan"], "Missing option '--nproc'"),
    (["bench", "compare", "only-one"], "Missing argument 'B'"),
])
def test_unknown_commands_and_options(args, needle, tmp_path):
    _refused(_invoke(args, tmp_path), needle)


# ---- wrong types and out-of-range numbers ---------------------------------------------------------------

@pytest.mark.parametrize("args, needles", [
    (["train", "--nproc", "abc"], ["'--nproc'", "'abc' is not a valid integer"]),
    (["train", "--steps", "0"], ["'--steps'", "0 is not in the range"]),
    (["train", "--batch", "-8"], ["'--batch'"]),
    (["train", "--zero", "5"], ["--zero 5", "expected one of (0, 1, 2)"]),
    (["train", "--lr", "fast"], ["'--lr'", "'fast' is not a valid float"]),
    (["plan", "--nproc", "0", "--model", "tiny"], ["'--nproc'", "0 is not in the range"]),
    (["plan", "--nproc", "2", "--model", "tiny", "--batch", "4,x"], ["--batch '4,x'"]),
    (["plan", "--nproc", "2", "--model", "tiny", "--memory-limit", "5XB"], ["--memory-limit '5XB'"]),
    (["plan", "--nproc", "2", "--model", "tiny", "--seq", "100000"], ["--seq 100000", "max_seq=64"]),
    (["fl", "run", "--rounds", "0"], ["'--rounds'"]),
    (["fl", "run", "--clients", "-1"], ["'--clients'"]),
    (["fl", "run", "--per-round", "40", "--clients", "30"], ["--per-round", "per_round=40 > clients=30"]),
    (["fl", "run", "--stragglers", "1.5"], ["--stragglers 1.5", "expected a share in [0, 1]"]),
    (["fl", "run", "--dropout", "1"], ["--dropout 1.0", "expected a share in [0, 1)"]),
    (["fl", "run", "--malicious", "-0.2"], ["--malicious -0.2"]),
    (["fl", "run", "--eval-fraction", "2"], ["--eval-fraction 2.0"]),
    (["fl", "run", "--compress", "topk:2"], ["--compress", "expected a number in (0, 1]"]),
    (["fl", "run", "--faults", "x"], ["--faults", "expected PARTITION:KIND"]),
    (["tune", "--budget-s", "0", "--dry-run"], ["--budget-s must be > 0, got 0.0"]),
    (["tune", "--top-k", "0", "--model", "--dry-run"], ["'--top-k'"]),
    (["tune", "--size", "-5", "--dry-run"], ["'--size'"]),
    (["runs", "--limit", "-1"], ["'--limit'"]),
    (["profile", "x.py", "--steps", "0"], ["'--steps'"]),
    (["profile", "x.py", "--budget", "0"], ["--budget 0.0"]),
    (["ncu", "--count", "0", "--case", "gemm"], ["'--count'"]),
])
def test_wrong_types_and_ranges(args, needles, tmp_path):
    _refused(_invoke(args, tmp_path), *needles)


# ---- unknown names: the message lists the valid ones ----------------------------------------------------

@pytest.mark.parametrize("args, needles", [
    (["train", "--model", "nope"], ["--model 'nope'", "'tiny', '1.3b'"]),
    (["train", "--schedule", "zigzag"], ["--schedule 'zigzag'", "'gpipe', '1f1b', 'interleaved-1f1b'"]),
    (["train", "--recompute", "some"], ["--recompute 'some'", "'selective'"]),
    (["train", "--dp-comm", "tree"], ["--dp-comm 'tree'", "'ring'"]),
    (["train", "--attention", "nope"], ["--attention 'nope'", "'sdpa'"]),
    (["plan", "--nproc", "2", "--model", "nope"], ["--model 'nope'", "'tiny', '1.3b'"]),
    (["plan", "--nproc", "2", "--model", "tiny", "--dtype", "int3"], ["--dtype 'int3'", "float32 or bfloat16"]),
    (["plan", "--nproc", "2", "--model", "tiny", "--device", "tpu9"], ["device='tpu9'", "'h200'"]),
    (["fl", "run", "--strategy", "nope"], ["--strategy 'nope'", "'fedavg'", "'scaffold'"]),
    (["fl", "run", "--model", "nope"], ["model='nope'", "'logreg'"]),
    (["fl", "run", "--selection", "nope"], ["--selection", "'oort'"]),
    (["fl", "bench", "--size", "huge"], ["--size", "expected default or full"]),
    (["bench", "-k", "nope"], ["--kernel nope", "'gemm'", "'softmax'"]),
    (["tune", "-k", "nope", "--dry-run"], ["['nope'] are not tunable", "'softmax'"]),
    (["tune", "--backends", "cuda-graphs", "--dry-run"], ["--backends 'cuda-graphs'", "'triton'"]),
    (["device", "--device", "tpu"], ["device='tpu'", "'cpu', 'cuda'"]),
])
def test_unknown_names_list_the_valid_ones(args, needles, tmp_path):
    res = _invoke(args, tmp_path)
    _refused(res, *needles, code=1 if args[0] == "device" else 2)


def test_bench_unknown_case_is_refused_before_the_suite_runs(tmp_path):
    """It used to run the (empty) suite, print its tables and write out/ before saying no case matched."""
    out = tmp_path / "bench_out"
    _refused(_invoke(["bench", "-k", "nope", "--small", "--out", str(out)], tmp_path), "--kernel nope")
    assert not out.exists() and not (tmp_path / "cache").exists()


# ---- input files that are not there, output paths that cannot be made -----------------------------------

@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("x")
    return path


@pytest.mark.parametrize("make_args, needles", [
    (lambda d, f: ["fl", "run", "--data", str(d / "none.csv")], ["--data", "expected an existing file"]),
    (lambda d, f: ["fl", "run", "--trace", str(d)], ["--trace", "is a folder"]),
    (lambda d, f: ["train", "--plan", str(d / "none.json")], ["plan file", "does not exist"]),
    (lambda d, f: ["profile", str(d / "none.py")], ["target=", "no file"]),
    (lambda d, f: ["bench", "compare", str(d / "none.json"), str(d / "none.json")], ["no such file"]),
    (lambda d, f: ["fl", "run", "--out", str(f / "x.json")], ["--out", "below the file"]),
    (lambda d, f: ["fl", "run", "--plot", str(d)], ["--plot", "is a folder"]),
    (lambda d, f: ["fl", "run", "--checkpoint", str(f / "x.ckpt")], ["--checkpoint", "below the file"]),
    (lambda d, f: ["plan", "--nproc", "2", "--model", "tiny", "--out", str(f / "plan.json")], ["--out", "below"]),
    (lambda d, f: ["plan", "--nproc", "2", "--model", "tiny", "--figures", str(f)], ["--figures", "is a file"]),
    (lambda d, f: ["train", "--out", str(f / "run")], ["--out", "below the file"]),
    (lambda d, f: ["bench", "--small", "--out", str(f)], ["--out", "is a file"]),
    (lambda d, f: ["tune", "--report", str(f / "r.json"), "--dry-run"], ["--report", "below the file"]),
    (lambda d, f: ["tune", "--ship", "--out", str(f), "--dry-run"], ["--out", "is a file"]),
    (lambda d, f: ["report", "latest", "--out", str(f)], ["--out", "is a file"]),
    (lambda d, f: ["profile", str(f), "--out", str(f)], ["--out", "is a file"]),
    (lambda d, f: ["runs", "--db", str(d)], ["--db", "is a folder"]),
    (lambda d, f: ["bench", "compare", "latest", "latest", "--db", str(f / "x.sqlite")], ["--db", "below the file"]),
])
def test_missing_inputs_and_unwritable_outputs(make_args, needles, tmp_path, a_file):
    res = _invoke(make_args(tmp_path, a_file), tmp_path)
    _refused(res, *needles, code=1 if res.exit_code == 1 and "target=" in needles else 2)
    assert not (tmp_path / "cache" / "perf").exists()          # no store made, no gloo fit measured


# ---- conflicting options --------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needles, code", [
    (["plan", "--nproc", "2", "--model", "tiny", "--layers", "2"], ["--model and --layers given"], 2),
    (["plan", "--nproc", "2", "--model", "tiny", "--rank-by", "goodput"], ["--noise-scale 0.0"], 2),
    (["train", "--resume"], ["--resume", "give --out"], 2),
    (["train", "--nproc", "2", "--dp", "3"], ["expected the world size 2"], 2),
    (["train", "--nproc", "2", "--tp", "2", "--noise-scale"], ["--noise-scale reads the per-rank gradients"], 2),
    (["ncu"], ["expected exactly one"], 1),
    (["ncu", "--case", "gemm", "--", "x.py"], ["expected exactly one"], 1),
])
def test_conflicting_options(args, needles, code, tmp_path):
    _refused(_invoke(args, tmp_path), *needles, code=code)


# ---- empty and corrupt result stores --------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"this is not a SQLite database\n" * 40], ids=["empty", "corrupt"])
@pytest.mark.parametrize("command", [["compare", "latest", "latest~1"], ["bench", "compare", "latest", "latest~1"],
                                     ["report", "latest"]])
def test_compare_and_report_on_an_empty_or_corrupt_store(command, content, tmp_path):
    db = tmp_path / "results.sqlite"
    db.write_bytes(content)
    res = _invoke([*command, "--db", str(db)], tmp_path)
    assert res.exit_code in (1, 2), res.output
    _refused(res, str(db) if content else "run='latest'", code=res.exit_code)
    assert db.read_bytes() == content or not content          # a corrupt store is not overwritten


# ---- valid input still works ----------------------------------------------------------------------------

def test_valid_runs_and_dry_runs_succeed(tmp_path):
    res = _invoke(["runs", "--db", str(tmp_path / "new.sqlite"), "--limit", "1"], tmp_path)
    assert res.exit_code == 0, res.output
    res = _invoke(["tune", "-k", "softmax", "--small", "--dry-run", "--backends", "triton"], tmp_path)
    assert res.exit_code == 0 and "softmax" in res.output, res.output


def test_a_tiny_federated_run_writes_its_history(tmp_path):
    out = tmp_path / "deep" / "history.json"                   # a folder not made yet is fine
    out.parent.mkdir()
    res = _invoke(["fl", "run", "--rounds", "1", "--clients", "4", "--per-round", "2", "--local-epochs", "1",
                   "--out", str(out)], tmp_path)
    assert res.exit_code == 0, res.output
    assert len(json.loads(out.read_text())["rounds"]) == 1


# ---- an interrupted run leaves no partial output --------------------------------------------------------

def test_interrupted_federated_run_leaves_no_output(tmp_path, monkeypatch):
    import tilestack.federated as federated

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(federated, "simulate", interrupted)       # Ctrl-C during the rounds
    out, plot = tmp_path / "history.json", tmp_path / "plot.png"
    res = _invoke(["fl", "run", "--rounds", "1", "--clients", "4", "--per-round", "2", "--out", str(out),
                   "--plot", str(plot)], tmp_path)
    assert res.exit_code == 130 and "Traceback" not in res.output     # 128 + SIGINT, as a shell reports Ctrl-C
    assert not out.exists() and not plot.exists()


def test_interrupted_plan_leaves_no_plan_file(tmp_path, monkeypatch):
    import importlib

    search = importlib.import_module("tilestack.parallel.plan.search")   # (the package's `search` is the function)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(search, "search", interrupted)
    monkeypatch.setattr(search, "check_world", interrupted)       # before any measurement: the test stays fast
    out, figures = tmp_path / "plan.json", tmp_path / "figs"
    res = _invoke(["plan", "--nproc", "2", "--model", "tiny", "--out", str(out), "--figures", str(figures)], tmp_path)
    assert res.exit_code == 130 and "Traceback" not in res.output
    assert not out.exists() and not figures.exists()


# ---- the installed command: real exit codes, stderr, no traceback ---------------------------------------

@pytest.mark.parametrize("args, code, needle", [
    (["--help"], 0, "Usage:"),
    (["nosuch"], 2, "No such command"),
    (["plan", "--nproc", "2", "--model", "tiny", "--dtype", "int3"], 2, "--dtype 'int3'"),
    (["train", "--schedule", "zigzag"], 2, "--schedule 'zigzag'"),
])
def test_installed_command(args, code, needle, tmp_path):
    if not TILESTACK.exists():
        pytest.skip(f"{TILESTACK} is not installed")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TILESTACK_CACHE_DIR": str(tmp_path / "cache"),
           "COLUMNS": "200"}
    proc = subprocess.run([str(TILESTACK), *args], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=env)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    both = proc.stdout + proc.stderr
    assert "Traceback" not in both, both
    assert _flat(needle) in _flat(both), both
