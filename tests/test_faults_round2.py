"""Nothing is lost on a fault, round two: a process SIGKILLed while it writes each store tilestack keeps on disk,
at several moments, and what the next run finds. The next run must load the last good state (everything the killed
writer had reported committed) or start clean with a warning; never crash, never read a half-written file.

The stores: the tuned-config tables (tune/cache.py), the perf result store that `tilestack bench` appends to
(perf/store.py, SQLite in WAL mode) and bench's record files (bench/record.py), the compile measurement cache
(compile/measure.py, <cache>/compile_measure.json), the federated checkpoint (federated/driver.py) and a training
run's checkpoint through ``tilestack train --out ... --resume`` (cli/train.py, cli/train_state.py,
parallel/checkpoint.py): resumed after a kill, the run ends with the uninterrupted run's losses and parameters,
bit for bit on the CPU.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from tilestack import config

WORKERS = Path(__file__).with_name("_faults_workers_round2.py")
SRC = str(Path(__file__).resolve().parents[1] / "src")
KILL_AFTER = [(2, 0.0), (5, 0.003), (9, 0.011)]     # (writes reported committed, then sleep s) before each kill


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), **extra}


def _kill_while_writing(what: str, target: Path, committed: int, delay: float) -> int:
    """Start the writer, wait for ``committed`` writes, let it go on ``delay`` s (into the next write), SIGKILL it;
    the number of writes it reported committed."""
    p = subprocess.Popen([sys.executable, str(WORKERS), what, str(target)], stdout=subprocess.PIPE, text=True,
                         env=_env())
    done = 0
    try:
        while done < committed:
            line = p.stdout.readline()
            assert line, f"the {what} writer died before its write {done + 1}"
            if line.strip().isdigit():
                done = int(line)
        time.sleep(delay)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    rest = p.stdout.read()                           # lines written before the kill count as committed too
    p.stdout.close()
    return max([done, *(int(t) for t in rest.split() if t.isdigit())])


def _no_warnings():
    return warnings.catch_warnings(record=True)


# ---- the stores, each killed three times mid-write ---------------------------------------------------------------
def test_tuned_table_killed_mid_write(tmp_path):
    from tilestack.tune.cache import ConfigCache, Table, key
    from tilestack.tune.devices import DeviceKey

    dev = DeviceKey.parse("sm90-132sm-227kb", name="NVIDIA H200")
    path = tmp_path / "tuned" / f"{dev}.json"
    for committed, delay in KILL_AFTER:
        done = _kill_while_writing("tune", tmp_path, committed, delay)
        entries = Table.read(path).entries                # whole JSON, or this raises
        assert {key("gemm", f"killed-{i}", 1024) for i in range(done)} <= set(entries)
    cache = ConfigCache(tmp_path, tables_dir=None)
    cache.put("gemm", "after", dev, 1024, {"BM": 32}, options={})
    assert ConfigCache(tmp_path, tables_dir=None).get("gemm", "after", dev, 1024) == {"BM": 32}
    # the temporaries the killed writers left (one a kill inside a write) are swept by the next write: before, each
    # kill left one more in the folder for good
    assert sorted(os.listdir(path.parent)) == [path.name]


def test_a_write_leaves_a_live_writers_temporary_alone(tmp_path):
    """The sweep takes only the temporaries of processes that are gone: another writer's, mid-write, stays."""
    from tilestack.tune.cache import write_json_atomic

    path = tmp_path / "table.json"
    live = tmp_path / f".table.{os.getppid()}.abc.tmp"          # the parent (pytest's runner) is alive
    dead = tmp_path / ".table.999999999.abc.tmp"
    other = tmp_path / ".other.999999999.abc.tmp"               # another file's: not this write's business
    for f in (live, dead, other):
        f.write_text("{")
    write_json_atomic(path, {"a": 1})
    assert sorted(os.listdir(tmp_path)) == sorted([path.name, live.name, other.name])


def test_perf_store_killed_mid_append(tmp_path):
    """SQLite in WAL mode: a committed append survives a kill, a cut one leaves nothing; the next open is whole."""
    from _faults_workers_round2 import measurement
    from tilestack.perf.store import Store

    db = tmp_path / "results.sqlite"
    total = 0
    for committed, delay in KILL_AFTER:
        done = _kill_while_writing("store", db, committed, delay)
        with Store(db) as st:
            assert st.integrity_ok()
            runs = st.runs()
            assert runs[0].n_results >= done, (runs[0].n_results, done)      # the newest run holds every committed row
            total += runs[0].n_results
    with Store(db) as st:
        run = st.start_run(device="cpu: test", versions={})
        st.append(run, measurement(0))
        assert sum(r.n_results for r in st.runs()) == total + 1


def test_bench_record_killed_mid_write(tmp_path):
    from tilestack.bench.record import Record

    path = tmp_path / "bench.json"
    for committed, delay in KILL_AFTER:
        done = _kill_while_writing("record", path, committed, delay)
        rec = Record.read(path)                              # whole, or a RecordError naming it
        assert len(rec.measurements) >= done and rec.started_at == f"t{len(rec.measurements) - 1}"
    (tmp_path / ".bench.json.999999999.x.tmp").write_text("{")   # as a writer killed mid-write leaves it
    Record("cpu: after", [], started_at="t").write(path)       # sweeps what the killed writers left
    assert os.listdir(tmp_path) == [path.name] and Record.read(path).device == "cpu: after"


def _measure_state(cache: Path):
    """compile.measure's entries as a fresh process reads them, and the warnings that reading gave."""
    from tilestack.compile import measure

    measure._memory.clear()
    measure._loaded = False
    with config.override(cache_dir=cache), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        measure._load()
    return dict(measure._memory), [str(w.message) for w in seen]


def test_compile_measure_cache_killed_mid_write(tmp_path):
    from tilestack.compile import measure

    try:
        for committed, delay in KILL_AFTER:
            done = _kill_while_writing("measure", tmp_path, committed, delay)
            entries, said = _measure_state(tmp_path)
            assert not said, said                             # whole JSON: no "ignoring" warning
            assert {k.split("|")[1] for k in entries} >= {f"killed-{i}" for i in range(done)}
        (tmp_path / "compile_measure.999999999.tmp").write_text("{")  # as a writer killed mid-write leaves it
        with config.override(cache_dir=tmp_path):
            measure._store("linear_epilogue|after", {"fused_s": 1e-6, "unfused_s": 2e-6, "device": "test"})
        assert os.listdir(tmp_path) == [measure.FILE]          # the killed writers' temporaries swept
        (tmp_path / measure.FILE).write_text('{"linear_epilogue|cut": {"fused_s": 1e-6, "unf')   # a copy cut short
        entries, said = _measure_state(tmp_path)
        assert entries == {} and any("ignoring" in s and "measured again" in s for s in said)
    finally:
        measure._memory.clear()
        measure._loaded = False


def test_federated_checkpoint_killed_mid_save(tmp_path):
    from tilestack.errors import FederatedError
    from tilestack.federated.driver import load_checkpoint, save_checkpoint

    path = tmp_path / "run.ckpt"
    for committed, delay in KILL_AFTER:
        done = _kill_while_writing("federated", path, committed, delay)
        state = load_checkpoint(path)                         # whole, or a FederatedError naming it
        assert state["round"] >= done and len(state["history"]) == state["round"]
        assert bool((state["arrays"] == float(state["round"])).all())
    save_checkpoint(path, {"round": 99, "arrays": [], "strategy": {}, "history": []})   # over a killed .tmp
    assert load_checkpoint(path)["round"] == 99
    path.write_bytes(path.read_bytes()[:40])                  # a copy cut short: refused by name
    with pytest.raises(FederatedError, match=re.escape(f"checkpoint={str(path)!r} cannot be read")):
        load_checkpoint(path)


# ---- tilestack train --out / --resume --------------------------------------------------------------------------------
TRAIN = [sys.executable, "-m", "tilestack.cli", "train", "--batch", "4", "--seq", "16", "--no-store",
         "--save-every", "1"]
STEPS = 8     # the kill comes after step 4: 4 more steps and saves (0.2-0.6 s each here) before the run would end


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    r = subprocess.run([*TRAIN, "--steps", str(STEPS), "--out", str(out), *extra], capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _step_losses(text: str) -> dict[int, str]:
    return {int(s): loss for s, loss in re.findall(r"step (\d+)/\d+  loss (\S+)", text)}


def _parameters(ckpt: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = ckpt.parent.with_suffix(".pt")                    # beside the run's folder, not in it
    dcp_to_torch_save(ckpt, flat)
    return torch.load(flat, weights_only=False)["model"]


def test_train_killed_mid_run_resumes_to_the_uninterrupted_run(tmp_path):
    """`tilestack train --out` SIGKILLed (the whole process group) just after step 4's line, while it saves
    that step's checkpoint; `--resume` starts from the last whole checkpoint (that of the last step line printed,
    or the one before it), and its remaining steps' losses and final parameters are the uninterrupted run's
    exactly."""
    whole = _train(tmp_path / "whole")
    killed = tmp_path / "killed"
    p = subprocess.Popen([*TRAIN, "--steps", str(STEPS), "--out", str(killed)], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, env=_env(), start_new_session=True)
    try:
        for line in p.stdout:
            if line.startswith("step 4/"):
                break
        else:
            pytest.fail("tilestack train ended before step 4")
        time.sleep(0.05)                                       # into the save after step 4
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        rest = p.stdout.read()                                 # step lines printed before the kill, not yet read
        p.stdout.close()
    # Each step prints its line (flushed), then saves: at the kill the last step printed was saving or saved, the
    # one before it saved. That is step 4 unless this process, slowed by other work, read step 4's line late:
    # a step and its save take 0.2-0.6 s, so a busy machine could let the run print and save step 5 first.
    last = max([4, *(int(s) for s in re.findall(r"^step (\d+)/", rest, re.M))])
    assert last < STEPS, f"the run ended before the kill: {rest}"
    resumed = _train(killed, "--resume")
    start = int(re.search(r"resumed from \S+ at step (\d+)", resumed.stdout)[1])
    assert start in (last - 1, last), (last, resumed.stdout)
    want, got = _step_losses(whole.stdout), _step_losses(resumed.stdout)
    assert set(got) == set(range(start + 1, STEPS + 1)) and all(got[s] == want[s] for s in got), (got, want)
    final = re.compile(r"final loss (\S+)")
    assert final.search(resumed.stdout)[1] == final.search(whole.stdout)[1]
    # no .partial or .old left (.lock: the run's claim on the folder, tests/test_faults_round7.py)
    assert sorted(os.listdir(killed)) == [".lock", "checkpoint", "train.json"]
    a, b = _parameters(tmp_path / "whole" / "checkpoint"), _parameters(killed / "checkpoint")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_resume_guards(tmp_path):
    """Refused before any rank starts: --resume without --out, a resume under another lr or seed (two runs mixed),
    a new run into a folder holding a checkpoint (it would replace it), --out with ZeRO; --resume of a folder
    without a checkpoint trains from step 0 with a warning; one already at --steps trains nothing."""
    from typer.testing import CliRunner

    from tilestack.cli import _register, app

    _register()

    def refused(*args: str) -> str:
        r = CliRunner().invoke(app, ["train", "--no-store", *args])
        assert r.exit_code == 2, r.output
        return " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.output).split())      # typer's box, unwrapped

    out = tmp_path / "run"
    assert "--resume goes on from the checkpoint in --out" in refused("--resume")
    (tmp_path / "a_file").write_text("x")
    assert "is a file; expected a folder" in refused("--out", str(tmp_path / "a_file"))
    assert "cannot be made" in refused("--out", str(tmp_path / "a_file" / "run"))
    assert "ZeRO-1/2" in refused("--out", str(out), "--nproc", "2", "--dp", "2", "--zero", "1")
    fresh = subprocess.run([*TRAIN, "--steps", "2", "--out", str(out), "--resume"], capture_output=True, text=True,
                           env=_env(), timeout=300)
    assert fresh.returncode == 0 and f"no whole checkpoint in {out / 'checkpoint'}; training from step 0" in \
        fresh.stderr, fresh.stderr[-3000:]
    assert set(_step_losses(fresh.stdout)) == {1, 2}
    assert "holds a checkpoint of an earlier run; pass --resume" in refused("--out", str(out), "--steps", "4")
    said = refused("--out", str(out), "--steps", "4", "--resume", "--lr", "0.01", "--seed", "3")
    assert "lr: the checkpoint's run has 0.001, this one 0.01" in said and "seed: the checkpoint's run has 0" in said
    done = subprocess.run([*TRAIN, "--steps", "2", "--out", str(out), "--resume"], capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert done.returncode == 0 and "is at step 2; --steps 2 leaves nothing to train" in done.stdout, done.stdout
    assert json.loads((out / "train.json").read_text())["lr"] == 0.001


def test_checkpoint_save_under_a_file_is_refused_by_name(tmp_path):
    """A checkpoint path below a file (``run.txt/ckpt``): rank 0's mkdir raised a bare FileExistsError while the
    other ranks waited at the next barrier for good. Every rank now refuses it first, naming the path."""
    from types import SimpleNamespace

    from tilestack.parallel import ParallelConfigError, checkpoint

    (tmp_path / "run.txt").write_text("notes")
    trainer = SimpleNamespace(zero=None, parts=[torch.nn.Linear(2, 2)], pc=None)
    target = tmp_path / "run.txt" / "a" / "ckpt"
    said = f"checkpoint.save: path={str(target)!r} is below the file {str(tmp_path / 'run.txt')!r}"
    with pytest.raises(ParallelConfigError, match=re.escape(said)):
        checkpoint.save(trainer, target)
    assert (tmp_path / "run.txt").read_text() == "notes"


def test_compile_measure_cache_drops_entries_it_cannot_use(tmp_path):
    """Whole JSON whose entries hold times that are not positive numbers (a string, null, NaN as JSON's NaN, a
    bool): they were kept, and the Decision made of them raised a TypeError inside torch.compile (``"abc" <=
    0.97 * x``) or decided on NaN. Such entries are dropped with a warning naming the file; the others kept."""
    from tilestack.compile import measure

    good = {"fused_s": 1e-6, "unfused_s": 2e-6, "device": "test"}
    bad = {f"k{i}": {"fused_s": v, "unfused_s": 2e-6} for i, v in enumerate(["abc", None, float("nan"), True, -1.0])}
    (tmp_path / measure.FILE).write_text(json.dumps({"good": good, **bad}))
    try:
        entries, said = _measure_state(tmp_path)
        assert set(entries) == {"good"}
        assert any(str(tmp_path / measure.FILE) in s and "5 entries" in s for s in said), said
    finally:
        measure._memory.clear()
        measure._loaded = False
