"""Nothing is lost on a fault, round five (2 of 2): a folder where one of the files should be written, and a
read-only folder, for the writers of tests/test_faults_round5.py: through the commands (``tilestack report``,
``profile``, ``bench``, ``plan --figures``, ``fl bench``) and through the Python functions.

What this round found: a command whose ``--out`` folder held a folder named like one of its files (``out/report.md``,
``out/bench.json``) ran to its end (a whole bench, a profile) and then failed writing that file, with an
IsADirectoryError traceback; ``check_output`` now takes the names a command writes in its folder (``files=``) and
refuses such a folder by its option before any work. ``tilestack fl bench`` did not check ``--doc`` and ``--img`` at
all: a --doc that is a folder or in a read-only folder, an --img that is a file, lost the bench's minutes of runs to
a traceback in ``write_report``. The deployment ServerApp took a ``result-path`` that is a folder and failed after
its last round. ``write_atomic`` itself now says that the path is a folder before it makes a temporary, and a
temporary it cannot make (a read-only folder) is an error naming the file asked for, not only the temporary. A file
name of 224 to 255 bytes (which open() takes) failed with "File name too long" on its temporary's longer name: the
temporaries' prefix is cut to fit (``files._fit``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import _faults_workers_round5 as W  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _invoke(args: list[str], tmp_path: Path):
    from tilestack import config
    from tilestack.cli import _register, app

    _register()
    with config.override(cache_dir=tmp_path / "cache"):
        return CliRunner().invoke(app, args, catch_exceptions=True)


def _flat(text: str) -> str:
    """``text`` without rich's box characters and white space (rich wraps long paths mid-word)."""
    return "".join(re.sub("[\u2500-\u257f]", "", text).split())


def _refused(res, option: str, *words: str) -> None:
    assert res.exit_code == 2, (res.exit_code, res.output[-2000:], res.exception)
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit | None), res.exception
    for w in (option, *words):
        assert _flat(w) in _flat(res.output), (w, res.output[-1500:])


def _never(*a, **k):
    raise AssertionError("the command's work ran before its output was checked")


# ---- a folder where a command writes one of its files ---------------------------------------------------------------
COMMANDS = {   # args (OUT: the folder), the file made a folder there, what must not run
    "report": (["report", "latest", "--out", "{out}"], "report.md", None),
    "report png": (["report", "latest", "--out", "{out}"], "roofline.png", None),
    "profile": (["profile", "nothing_here.py", "--out", "{out}"], "profile.md", None),
    "bench": (["bench", "--out", "{out}", "--no-store"], "bench.json", ("tilestack.bench", "run_suite")),
    "bench md": (["bench", "--out", "{out}", "--no-store"], "bench.md", ("tilestack.bench", "run_suite")),
    "plan": (["plan", "--nproc", "2", "--model", "tiny", "--figures", "{out}"], "timeline.png", None),
    "fl bench": (["fl", "bench", "--img", "{out}", "--doc", "{tmp}/doc.md"], "fl_bench.png",
                 ("tilestack.federated.bench", "run_bench")),
}


@pytest.mark.parametrize("name", COMMANDS)
def test_a_folder_where_a_command_writes_a_file_is_refused_before_the_run(tmp_path, monkeypatch, name):
    """Before: each ran (a bench, a profile, a plan's search) and failed writing that file with an
    IsADirectoryError traceback, the files written before it left beside it."""
    import importlib

    args, made, work = COMMANDS[name]
    out = tmp_path / "out"
    (out / made).mkdir(parents=True)
    if work is not None:
        monkeypatch.setattr(importlib.import_module(work[0]), work[1], _never)
    option = next(a for a in args if a.startswith("--") and "{out}" in args[args.index(a) + 1])
    res = _invoke([a.format(out=out, tmp=tmp_path) for a in args], tmp_path)
    _refused(res, option, f"'{out / made}' is a folder")
    assert sorted(p.name for p in out.iterdir()) == [made]             # nothing written beside it
    assert not (tmp_path / "doc.md").exists()


@pytest.mark.parametrize("bad", ["doc folder", "img file"])
def test_fl_bench_refuses_a_doc_that_is_a_folder_and_an_img_that_is_a_file_before_its_runs(tmp_path, monkeypatch,
                                                                                           bad):
    import tilestack.federated.bench as fb

    monkeypatch.setattr(fb, "run_bench", _never)
    doc, img = tmp_path / "doc.md", tmp_path / "img"
    (doc.mkdir() if bad == "doc folder" else img.write_text("not a folder"))
    res = _invoke(["fl", "bench", "--doc", str(doc), "--img", str(img)], tmp_path)
    if bad == "doc folder":
        _refused(res, "--doc", f"'{doc}' is a folder; expected a file path")
    else:
        _refused(res, "--img", f"'{img}' is a file; expected a folder path")


# ---- a folder at the path, through the Python functions ------------------------------------------------------------
PY_WRITERS = ["roofline", "html", "bench-json", "timeline", "memory", "fl-plot", "fl-doc"]


def _write_bench_json(root: Path, i: int) -> None:
    from tilestack.bench.record import Record
    Record("cpu-test", W._ms(i), source=f"v{i}").write(root / "bench" / "bench.json")


@pytest.mark.parametrize("writer", PY_WRITERS)
def test_a_folder_at_the_path_is_an_error_naming_it_and_leaves_no_temporary(tmp_path, writer):
    """IsADirectoryError saying the path (not a temporary's name) is a folder; the folder and what it holds are left
    as they were, and no temporary is left beside it."""
    write, target_of = W.WRITERS[writer] if writer != "bench-json" else (_write_bench_json, W.WRITERS[writer][1])
    target = target_of(tmp_path, 0)
    (target / "mine").mkdir(parents=True)
    with pytest.raises(IsADirectoryError) as e:
        write(tmp_path, 0)
    assert e.value.filename == str(target) and ".tmp" not in str(e.value), str(e.value)
    assert os.listdir(target) == ["mine"] and not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]


def test_the_deployment_refuses_a_result_path_that_is_a_folder_before_its_rounds(tmp_path):
    """Before: read_run_config took it (its parent is a folder), and main failed writing after the last round."""
    from tilestack.federated.deploy import read_run_config
    from tilestack.federated.task import Task

    (tmp_path / "result.json").mkdir()
    cfg = {"task": Task(dataset="synthetic", num_clients=4, max_samples=60).to_json(),
           "result-path": str(tmp_path / "result.json")}
    with pytest.raises(ValueError, match=r"result-path='.*result\.json' is a folder; expected a file path"):
        read_run_config(cfg)


def test_a_folder_at_a_caches_path_costs_the_documented_warning(tmp_path):
    """The ceilings cache and the generated-kernel cache: the ceilings are measured and returned, with the warning
    naming the file; the kernel is written to this process's private folder (its warning) and runs."""
    import hashlib

    import torch

    from tilestack import config
    from tilestack.backends.triton import launch
    from tilestack.perf import device

    with config.override(cache_dir=tmp_path / "cache"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        dev = device.detect("cpu")
        device.ceilings_path(dev).mkdir(parents=True)
        c = device.ceilings(dev, remeasure=True, copy_bytes=1 << 14, matmul_n=16, dtypes=("fp32",), budget_s=0.02)
        src = ("import triton\nimport triton.language as tl\n\n\n@triton.jit\ndef add_one(x, n, BLOCK: tl.constexpr):\n"
               "    o = tl.arange(0, BLOCK)\n    m = o < n\n    tl.store(x + o, tl.load(x + o, mask=m) + 1, mask=m)\n")
        digest_path = tmp_path / "cache" / "triton" / f"add_one_{hashlib.sha256(src.encode()).hexdigest()[:16]}.py"
        digest_path.mkdir(parents=True)         # (named as launch names it: the source's sha256)
        fn = launch.compile_source(src, "add_one", True)
        x = torch.zeros(4)
        fn[(1,)](x, 4, BLOCK=8)
        ceilings_at = device.ceilings_path(dev)
    said = [str(w.message) for w in seen]
    assert c.matmul["fp32"] > 0 and x.tolist() == [1.0] * 4
    assert any("ceilings not cached" in s and str(ceilings_at) in s for s in said), said
    assert any("generated kernels go to" in s for s in said), said
    assert os.listdir(digest_path) == [] and ceilings_at.is_dir()


# ---- a read-only folder ----------------------------------------------------------------------------------------------
def _without_write_permission() -> list[str]:
    """A command prefix under which permission bits hold: as root, without the capabilities that override them."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: a read-only folder cannot be made to hold")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]


READ_ONLY = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import _faults_workers_round5 as W
ro = Path(sys.argv[1])
out = {}
for name in ("roofline", "html", "timeline", "fl-plot", "deploy"):
    write, target_of = W.WRITERS[name]
    try:
        write(ro, 0)
        out[name] = "written"
    except OSError as e:
        out[name] = [type(e).__name__, e.filename, str(e)]
print(json.dumps(out))
"""


def test_a_read_only_folder_is_an_error_naming_the_file_and_fl_bench_refuses_it_before_its_runs(tmp_path):
    """In a folder that takes no new file, each writer raises PermissionError naming the file asked for (before,
    only its temporary's name, ``.report.html.<pid>.<random>.tmp``), and leaves the folder as it was;
    ``tilestack fl bench --doc`` in it is refused by --doc before a run (exit 2)."""
    ro = tmp_path / "ro"
    for sub in ("", "figures", "fl"):
        (ro / sub).mkdir(exist_ok=True)
    for sub in ("figures", "fl", ""):
        (ro / sub).chmod(0o555)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
           "TILESTACK_CACHE_DIR": str(tmp_path / "cache"), "FLWR_TELEMETRY_ENABLED": "0"}
    try:
        r = subprocess.run([*_without_write_permission(), sys.executable, "-c", READ_ONLY, str(ro),
                            str(Path(__file__).parent)], capture_output=True, text=True, env=env, timeout=240)
        cli = subprocess.run([*_without_write_permission(), sys.executable, "-m", "tilestack.cli", "fl", "bench",
                              "--doc", str(ro / "federated.md"), "--img", str(tmp_path / "img")],
                             capture_output=True, text=True, env=env, timeout=120)
    finally:
        for sub in ("", "figures", "fl"):
            (ro / sub).chmod(0o755)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    for name in ("roofline", "html", "timeline", "fl-plot", "deploy"):
        target = W.WRITERS[name][1](ro, 0)
        assert out[name][:2] == ["PermissionError", str(target)], out[name]
    assert sorted(str(p.relative_to(ro)) for p in ro.rglob("*")) == ["figures", "fl"]
    assert cli.returncode == 2, (cli.returncode, cli.stderr[-2000:])
    for words in ("--doc", "cannot be written", "Permission denied"):
        assert _flat(words) in _flat(cli.stderr), cli.stderr[-1500:]
    assert not (tmp_path / "img").exists()


# ---- a long file name ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chars", ["a", "é"])
def test_a_file_name_near_the_limit_is_written_whole(tmp_path, chars):
    """A 250-byte file name (open() takes up to 255): before, write_atomic's temporary ``.<name>.<pid>.<random>.tmp``
    was over the limit and every report, record and figure of that name failed with "File name too long"."""
    from tilestack.bench.record import Record
    from tilestack.perf import report

    stem = chars * ((250 - len(".html")) // len(chars.encode()))
    html = tmp_path / f"{stem}.html"
    assert 245 <= len(html.name.encode()) <= 255
    report.html_report(W._ms(0), html, title="v0")
    report.html_report(W._ms(1), html, title="v1")
    assert "<title>v1</title>" in html.read_text() and html.read_text().endswith("</body></html>")
    rec = tmp_path / f"{stem[:-1]}.json"
    Record("cpu-test", W._ms(2), source="v2").write(rec)
    assert Record.read(rec).source == "v2"
    assert sorted(os.listdir(tmp_path)) == sorted([html.name, rec.name])
