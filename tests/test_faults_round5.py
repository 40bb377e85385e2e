"""Nothing is lost on a fault, round five (1 of 2): every writer that rounds one to four did not kill, now that one
module writes every file (``tilestack.files``): the perf reports (``roofline_png``, ``html_report``, ``tilestack
report --out``'s report.md and roofline.png), ``run_suite``'s bench.md and bench.json, the planner's timeline and
memory pictures, a federated run's plot, ``tilestack fl bench``'s doc update, the deployment ServerApp's result
file, the compile measure cache, the ceilings cache, the tune cache and the generated-kernel source cache. Each
is written through its public entry point by a child process SIGKILLed at a chosen point of the write (the
temporary half written; whole but not renamed; renamed, the child dying before it returns), killed again and
again, and raced by a sibling for the same file. Workers: tests/_faults_workers_round5.py. Folders and read-only
folders where the files should go: tests/test_faults_round5_more.py.

What this round found: the generated-kernel cache names each kernel's file after its source's hash, and each is
written once: with ``write_atomic``'s default ``.<name>.`` temporaries, a writer killed mid-write left its temporary
for good (no later write has that name), one more per kill. The kernel cache's temporaries now share one prefix
(``launch.KERNEL_TMP_PREFIX``), so any kernel's write sweeps the temporaries of writers that are gone.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

WORKERS = Path(__file__).with_name("_faults_workers_round5.py")
SRC = str(Path(__file__).resolve().parents[1] / "src")
sys.path.insert(0, str(Path(__file__).parent))
import _faults_workers_round5 as W  # noqa: E402
from _shared_fixture import shared_parts  # noqa: E402

POINTS = W.POINTS
KILLED = list(W.WRITERS)
RACED = [w for w in W.WRITERS if w not in ("kernel-src", "perf-report-png", "bench-json")]
RACE_N = 4


def _run(what: str, root: Path, *args: str) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
           "TILESTACK_CACHE_DIR": str(root / "default-cache"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(WORKERS), what, str(root), *args], capture_output=True, text=True,
                       env=env, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "child error" not in r.stderr, r.stderr[-4000:]
    return json.loads(r.stdout.splitlines()[-1])


def _halves(tmp_path_factory, what: str, writers: list[str], *args: str) -> dict:
    """``{writer: its result}``: the writers run in two halves, each in one worker process (``_run``), each half
    computed once per pytest session (``_shared_fixture``: under ``-n 2`` each xdist worker computes one half, at
    the same time). Each writer's result holds its half's ``root`` (its refs/ are there) and ``pid``, the pytest
    process that computed it (for the matrix, the live process whose pid the live temporary carries)."""
    def half(k: int):
        def compute(root: Path) -> dict:
            out = _run(what, root, *args, *writers[k::2])
            assert sorted(out) == sorted(writers[k::2]), sorted(out)
            return {w: {**res, "root": str(root), "pid": os.getpid()} for w, res in out.items()}
        return compute

    parts = shared_parts(tmp_path_factory, f"round5-{what}", {"a": half(0), "b": half(1)})
    return {**parts["a"], **parts["b"]}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    return _halves(tmp_path_factory, "matrix", KILLED, str(os.getpid()))   # (the live pid: the computing process)


@pytest.fixture(scope="module")
def race(tmp_path_factory):
    return _halves(tmp_path_factory, "race", RACED, str(RACE_N))


# ---- whole files, read independently of tilestack ------------------------------------------------------------------
def _png_whole(data: bytes) -> bool:
    """Every chunk's CRC right, up to IEND, and nothing after it (a PNG cut anywhere fails)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    at = 8
    while at + 12 <= len(data):
        (n,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + n]
        if len(body) != n or data[at + 8 + n:at + 12 + n] != struct.pack(">I", zlib.crc32(kind + body)):
            return False
        at += 12 + n
        if kind == b"IEND":
            return at == len(data)
    return False


def _whole(path: Path, data: bytes) -> bool:
    if path.suffix == ".png":
        return _png_whole(data)
    text = data.decode("utf-8")
    if path.suffix == ".json":
        json.loads(text)
        return True
    if path.suffix == ".html":
        return text.startswith("<!DOCTYPE html>") and text.endswith("</body></html>")
    if path.suffix == ".md":
        return text.rstrip("\n").endswith(("|", "<!-- fl-bench:end -->"))
    if path.suffix == ".py":
        compile(text, str(path), "exec")
        return text.endswith("#\n")
    raise AssertionError(f"no wholeness check for {path}")


# ---- a writer SIGKILLed at each point of its write ----------------------------------------------------------------
@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("writer", KILLED)
def test_a_writer_killed_at_each_point_leaves_the_old_file_or_the_new_one_whole(matrix, writer, point):
    """The file left is byte for byte the one before (killed before its rename; none, for a kernel written for the
    first time) or the one the killed write was writing (killed after), and whole by a check of its own format
    (every PNG chunk's CRC, JSON, the HTML's last tag). A kill before the rename leaves the dead writer's
    temporary (the kill landed mid-write), after it none."""
    res = matrix[writer]["points"][point]
    refs = Path(matrix[writer]["root"]) / "refs" / writer / point
    assert res["how"] == ["signal", 9], res
    new = (refs / "new").read_bytes()
    old = (refs / "old").read_bytes() if (refs / "old").exists() else None
    assert new != old and _whole(Path(res["target"]), new)            # (a kill of a write that changes the file)
    after = (refs / "after").read_bytes() if (refs / "after").exists() else None
    if point == "after-rename":
        assert after == new and res["tmps"] == []
    else:
        assert after == old, (len(after or b""), len(old or b""))
        assert len(res["tmps"]) == 1, res["tmps"]
    if after is not None:
        assert _whole(Path(res["target"]), after)
    if writer == "fl-doc":                                       # the user's text kept by every version
        assert after.decode().startswith(W.USER_DOC)


@pytest.mark.parametrize("writer", KILLED)
def test_kills_again_and_again_leave_one_temporary_the_next_write_sweeps_a_live_writers_stays(matrix, writer):
    """Two more writes killed mid-write after the three points: one temporary is left (the last kill's; each write
    swept the one before). Then a temporary named after a live process (the test's) is put beside it: the next
    write removes the dead writer's and keeps the live one's. Before this round the kernel cache kept every kill's
    (each kernel's file is written once, and nothing swept its name's temporaries again)."""
    res = matrix[writer]
    assert len(res["after_repeats"]) == 1, res["after_repeats"]
    assert res["after_next_write"] == [res["live_tmp"]], res
    assert f".{res['pid']}." in res["live_tmp"]           # (the pytest process that ran the matrix: alive)


@pytest.mark.parametrize("writer", KILLED)
def test_files_are_made_under_the_umask(matrix, writer):
    """0o644 under umask 022, 0o640 under 027 (a file written again takes the umask's mode, as a new one does):
    not mkstemp's owner-only 0o600."""
    res = matrix[writer]
    assert (res["mode_022"], res["mode_027"]) == ("0o644", "0o640"), res


# ---- two processes, one file ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("writer", RACED)
def test_two_processes_writing_one_file_leave_one_of_theirs_whole(race, writer):
    """Two children released together write the file RACE_N times each: no write fails, the file left is the last
    write of one of them (by its bytes' sha256), no temporary is left."""
    res = race[writer]
    for child in res["children"]:
        assert child["errors"] == [] and len(child["renamed"]) == RACE_N, child
    assert res["final"] in {child["renamed"][-1] for child in res["children"]}
    assert res["tmps"] == []
    data = Path(res["target"]).read_bytes()
    assert _whole(Path(res["target"]), data)
    if writer == "fl-doc":
        text = data.decode()
        assert text.startswith(W.USER_DOC) and text.count("<!-- fl-bench:start -->") == 1, text[:400]


def test_the_tune_cache_and_the_measure_cache_keep_both_racing_writers_entries(race):
    """The tune table and the compile measure cache are read, merged and written under the folder's lock: each of
    the 2 x RACE_N entries the two children added is in the file (plus the first writer's)."""
    from tilestack.tune.cache import Table

    table = Table.read(Path(race["tune"]["target"]))
    sigs = sorted(k.split("|")[1] for k in table.entries)
    assert sigs == sorted(["sig0", *(f"sig{1000 * k + j}" for k in (1, 2) for j in range(RACE_N))])
    assert table.entries[f"gemm|sig{2000 + RACE_N - 1}|1024"]["config"] == {"BM": 16 * (2000 + RACE_N)}
    measured = json.loads(Path(race["measure"]["target"]).read_text())
    ms = sorted(int(k.split("|M")[1].split(" ")[0]) for k in measured)
    assert ms == sorted([8, *(8 + 1000 * k + j for k in (1, 2) for j in range(RACE_N))])
    for k, v in measured.items():
        m = int(k.split("|M")[1].split(" ")[0])
        assert v["fused_s"] == pytest.approx(1e-6 * (m - 8 + 1)), k
