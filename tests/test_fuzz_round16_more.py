"""Fuzz round sixteen, part two: the ``tilestack`` command under seeded bad option values, and the bugs this round
found there.

The fuzz (``test_a_bad_value_is_refused_naming_its_option``): for ``fl run``, ``plan``, ``train`` and ``tune``, each
numeric option given a value it cannot take (drawn per option from -1, 0, NaN, inf, -inf, 1e400, a word, an empty
string, past a share's 1) on a run that would otherwise take a second: a non-zero exit, the option named (as
``--lr`` or, from the library check behind it, ``lr=``), no traceback and nothing written. The cases it drew that the
commands rightly take (0 where 0 means "off", a share of 0) are kept out of the draw by ``ACCEPTED``.

What this round found (each test below failed before its fix):
- an output path in an existing folder that takes no new file (``/proc`` or ``/sys``, which refuse even root; a
  read-only folder or another user's) passed every check: ``fl run --out /proc/run.json`` (and ``--plot``,
  ``--checkpoint``), ``plan --out``/``--figures``, ``bench --out``, ``profile --out``, ``tune --report``, ``bench
  compare --db`` ran the whole command, then ended in a FileNotFoundError or PermissionError traceback when writing.
  ``cli.args.check_output`` now tries the folder with an unnamed temporary file first;
- ``fl run --out new/run.json`` (a folder not there yet) trained every round, then failed with a FileNotFoundError
  on the history's temporary (the plot and the checkpoint make their folder; the history did not);
- ``plan --model tiny --d 4096`` (or ``--heads``, ``--vocab``; or with ``--target``) planned tiny's d=32 and dropped
  the options without a word: they shape the GPT of ``--layers`` only, and are now refused beside the others;
- ``bench --against nope.json`` said ``error: record='nope.json': no such file`` (the message of ``bench compare``'s
  A or B) without naming ``--against``;
- ``fl run --faults 0:crash,0:nan`` (a partition given two faults; also ``Task(faults=...)``) ran client 0 with NaN
  updates only, its crash dropped without a word (``Task.fault`` kept the last entry); one fault per partition now.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from typer.testing import CliRunner

from _fuzz_round16 import Replay, flat, pick, rng_for
from tilestack import config
from tilestack.cli import _register, app

_register()

FL = ["fl", "run", "--rounds", "1", "--clients", "2", "--per-round", "2", "--local-steps", "1"]
PLAN = ["plan", "--nproc", "2", "--model", "tiny", "--device", "h200"]    # a roofline plan: no measuring here
BAD = ("-1", "0", "nan", "inf", "-inf", "1e400", "abc", "", "1.5")
# option -> what a base run of its command takes (a value the command must refuse is drawn from the rest)
OPTIONS = {
    "fl": (FL, {"--lr": "0.01", "--mu": "0", "--server-lr": "0.1", "--partition-alpha": "0.5", "--q": "1",
                "--stragglers": "0", "--staleness-exponent": "0.5", "--max-staleness": "4", "--dropout": "0",
                "--deadline": "0", "--speed-sigma": "0", "--malicious": "0", "--noise": "1", "--clip": "1",
                "--eval-fraction": "0", "--timeout": "0", "--batch-size": "10", "--workers": "1",
                "--clusters": "2"}),
    "plan": (PLAN, {"--seq": "64", "--batch": "8", "--memory-limit": "", "--noise-scale": "0", "--base-batch": "0",
                    "--top": "12"}),
    "tune": (["tune", "--dry-run"], {"--budget-s": "600", "--size": "1024", "--top-k": "8", "--device": "0"}),
    "train": (["train", "--steps", "2", "--no-store"], {"--lr": "0.001", "--batch": "8", "--seq": "32",
                                                        "--zero": "0", "--stages-per-rank": "1"}),
}
# values an option rightly takes (0 for "off", a share at an end, a word that is a valid choice)
ACCEPTED = {("--mu", "0"), ("--stragglers", "0"), ("--dropout", "0"), ("--deadline", "0"), ("--speed-sigma", "0"),
            ("--malicious", "0"), ("--eval-fraction", "0"), ("--timeout", "0"), ("--q", "0"), ("--q", "1.5"),
            ("--noise-scale", "0"), ("--base-batch", "0"), ("--memory-limit", ""), ("--mu", "1.5"),
            ("--lr", "1.5"), ("--noise", "0"), ("--noise", "1.5"), ("--clip", "1.5"), ("--zero", "0"),
            ("--staleness-exponent", "0"), ("--staleness-exponent", "1.5"), ("--server-lr", "1.5"),
            ("--partition-alpha", "1.5"), ("--budget-s", "1.5"), ("--eval-fraction", "1.5"), ("--deadline", "1.5"),
            ("--speed-sigma", "1.5"), ("--timeout", "1.5"), ("--noise-scale", "1.5"), ("--noise", "1e400"),
            ("--timeout", "inf"), ("--budget-s", "inf"), ("--budget-s", "1e400"), ("--timeout", "1e400"),
            ("--clip", "inf"), ("--clip", "1e400"), ("--noise", "inf"), ("--eval-fraction", "1"),
            ("--lr", "0"), ("--q", "inf"), ("--q", "1e400"), ("--deadline", "inf"), ("--deadline", "1e400")}
FUZZ_CASES = 40


def _invoke(args, tmp_path):
    with config.override(cache_dir=tmp_path / "cache"):         # nothing stored or measured outside tmp_path
        return CliRunner().invoke(app, args, catch_exceptions=True)


def _refused(res, *needles: str, code: int = 2) -> None:
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    for needle in needles:
        assert flat(needle) in flat(res.output), (needle, res.output)


def _draw(rng):
    command = str(pick(rng, sorted(OPTIONS)))
    base, options = OPTIONS[command]
    option = str(pick(rng, sorted(options)))
    value = str(pick(rng, [v for v in BAD if (option, v) not in ACCEPTED and v != options[option]]))
    return command, base, option, value


@pytest.mark.parametrize("case", range(FUZZ_CASES))
def test_a_bad_value_is_refused_naming_its_option(case, request, tmp_path):
    rep = Replay("cli", case, request)
    command, base, option, value = _draw(rng_for("cli", case))
    rep.fields.update(command=command, option=option, value=repr(value))
    res = _invoke([*base, option, value], tmp_path)
    assert res.exit_code != 0, (str(rep), res.output)
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit)), (
        str(rep), res.output, repr(res.exception))
    name = option.removeprefix("--")
    assert any(flat(n) in flat(res.output) for n in (option, f"{name.replace('-', '_')}=", f"'{option}'")), (
        str(rep), res.output)
    assert not (tmp_path / "cache" / "perf").exists(), str(rep)     # refused before any run was stored


# ---- outputs in a folder that takes no new file -------------------------------------------------------------
UNWRITABLE = [
    (["fl", "run", "--out", "{d}/run.json"], "--out"),
    (["fl", "run", "--plot", "{d}/sub/run.png"], "--plot"),
    (["fl", "run", "--checkpoint", "{d}/run.ckpt"], "--checkpoint"),
    ([*PLAN, "--out", "{d}/plan.json"], "--out"),
    ([*PLAN, "--figures", "{d}/figs"], "--figures"),
    (["bench", "--small", "--no-models", "-k", "softmax", "--out", "{d}/bench"], "--out"),
    (["profile", "torch.nn:Linear", "--out", "{d}/prof"], "--out"),
    (["tune", "--dry-run", "--report", "{d}/tune.json"], "--report"),
    (["bench", "compare", "latest", "latest", "--db", "{d}/results.sqlite"], "--db"),
]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and /sys are Linux's")
@pytest.mark.parametrize("folder", ["/proc", "/sys"])
@pytest.mark.parametrize("args, option", UNWRITABLE, ids=lambda v: v if isinstance(v, str) else " ".join(v[:2]))
def test_an_output_in_a_folder_that_takes_no_file_is_refused_before_the_run(args, option, folder, tmp_path):
    """/proc and /sys refuse new files even to root (where a chmod'ed folder does not): each command refuses the path
    by its option, exit 2, before any work; before, each ran to its end and failed writing, with a traceback."""
    res = _invoke([a.format(d=folder) for a in args], tmp_path)
    _refused(res, option, "cannot be written", f"the folder '{folder}' takes no new file")
    assert not (tmp_path / "cache" / "perf").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into a read-only folder")
def test_an_output_in_a_read_only_folder_is_refused_before_the_run(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        res = _invoke([*FL, "--out", str(ro / "run.json")], tmp_path)
    finally:
        ro.chmod(0o755)
    _refused(res, "--out", "cannot be written", "Permission denied")
    assert not list(ro.iterdir())


def test_writable_outputs_are_still_taken_and_leave_nothing_behind_from_the_check(tmp_path):
    """The check's probe leaves no file: an fl run into a new folder writes its history (and the folder above holds
    only it)."""
    out = tmp_path / "new" / "deeper" / "run.json"
    res = _invoke([*FL, "--out", str(out)], tmp_path)
    assert res.exit_code == 0, (res.output, res.exception)
    assert sorted(p.name for p in out.parent.iterdir()) == ["run.json"]
    history = json.loads(out.read_text())
    assert len(history["rounds"]) == 1, history.keys()


def test_fl_history_into_a_folder_not_there_yet_is_written(tmp_path):
    """``fl run --out new/run.json`` trained every round, then failed with FileNotFoundError writing the history's
    temporary (the plot and the checkpoint make their folders, the history did not)."""
    out = tmp_path / "made" / "run.json"
    plot = tmp_path / "made_too" / "run.png"
    res = _invoke([*FL, "--out", str(out), "--plot", str(plot)], tmp_path)
    assert res.exit_code == 0, (res.output, res.exception)
    assert out.is_file() and plot.is_file()
    assert json.loads(out.read_text())["rounds"][0]["round"] == 1


# ---- options dropped without a word -------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [["--d", "4096"], ["--heads", "8"], ["--vocab", "50000"], ["--d", "-1"],
                                   ["--heads", "2", "--vocab", "7"]], ids=lambda e: " ".join(e))
def test_plan_refuses_gpt_shape_options_beside_model(extra, tmp_path):
    """--d/--heads/--vocab shape the GPT of --layers; beside --model tiny they were ignored (tiny's d=32 planned)."""
    res = _invoke([*PLAN, *extra], tmp_path)
    _refused(res, f"{extra[0]} {extra[1]}", "given with --model", "expected them only with --layers")


def test_plan_still_takes_the_shape_options_with_layers(tmp_path):
    res = _invoke(["plan", "--nproc", "2", "--layers", "2", "--d", "64", "--heads", "4", "--vocab", "97",
                   "--device", "h200", "--out", str(tmp_path / "p.json")], tmp_path)
    assert res.exit_code == 0, (res.output, res.exception)
    plan = json.loads((tmp_path / "p.json").read_text())
    assert "d=64" in json.dumps(plan) or plan.get("model", {}).get("d") == 64, plan


@pytest.mark.parametrize("against", ["nope.json", "no-such-run-or-device"])
def test_bench_against_names_the_option(against, tmp_path):
    """A baseline that is not there: refused naming --against, exit 2, before the suite runs (no report made)."""
    res = _invoke(["bench", "--small", "--no-models", "-k", "softmax", "--out", str(tmp_path / "b"),
                   "--against", str(tmp_path / against) if against.endswith(".json") else against], tmp_path)
    assert res.exit_code == 2, (res.output, res.exception)
    assert "error: --against:" in res.output, res.output
    assert not (tmp_path / "b").exists()              # (a run name is looked up in the store, which that opens)


@pytest.mark.parametrize("faults", ["0:crash,0:nan", "1:nan,0:slow,1:nan"])
def test_fl_refuses_two_faults_for_one_partition(faults, tmp_path):
    """Before, the last entry won: ``0:crash,0:nan`` ran client 0 with NaN updates and never crashed it."""
    res = _invoke([*FL, "--faults", faults], tmp_path)
    pid = faults.split(",")[0].split(":")[0]
    _refused(res, f"faults gives partition {pid} two faults", "expected at most one fault per partition")


def test_task_refuses_two_faults_for_one_partition():
    from tilestack.federated import Task

    with pytest.raises(ValueError, match=r"Task: faults gives partition 0 two faults, 'crash' and 'nan'"):
        Task(num_clients=3, faults=((0, "crash"), (0, "nan")))
    assert Task(num_clients=3, faults=((0, "crash"), (2, "nan"))).fault(2) == "nan"
