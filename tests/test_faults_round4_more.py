"""Nothing is lost on a fault, round four (2 of 2): distributed checkpoints (``tilestack.parallel.checkpoint``) in
one-rank gloo groups of real processes. Two processes saving one checkpoint path at once; a save SIGKILLed while
torch writes its shards, or after they are whole but before the swap, next to the older whole checkpoint; loads
that fail part way (a shard or the .metadata cut short); a checkpoint of two ranks loaded by one; tensors of the
wrong shape for the model; one checkpoint loaded twice. Workers: tests/_faults_workers_round4.py.

What this round found: two processes saving one path shared ``.<name>.partial``; one swapped it in while the other
still wrote there (the checkpoint then held the other's ``.metadata.tmp`` and refused the next save as "a folder of
other files"), and the other died in torch's rename of its .metadata with a CheckpointException. Rank 0 now holds
the parent folder's lock (``tune.cache.locked``) from its settle to its swap, so saves of one path take turns, each
whole. A load that failed part way (a shard cut short) left the trainer's parameters partly or wholly the file's
behind the error (26 of 37 tensors changed at a tenth of the shard, all 37 at half): ``load`` checks that every byte
range the .metadata names lies in its file before DCP touches a tensor (reading into copies would cost a second copy
of the state at every resume). A killed save's ``.<name>.partial`` beside the older whole checkpoint
was passed over without a word: the older is loaded, with a warning saying the later save was cut short.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKERS = Path(__file__).with_name("_faults_workers_round4.py")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), **extra}


def _loads(tmp_path: Path, loads: list) -> list[dict]:
    out = tmp_path / "loads.pt"
    r = subprocess.run([sys.executable, str(WORKERS), "load", str(out), json.dumps(loads)], capture_output=True,
                       text=True, env=_env(), timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out, weights_only=False)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_saving_one_checkpoint_take_turns(tmp_path):
    """Each process saves its trainer (every parameter 1.0, or 2.0) to one path 3 times at once: no save fails,
    the folder holds one whole checkpoint, and it is one trainer's (all 1.0 or all 2.0), not a mix."""
    target = tmp_path / "ck"
    procs = [subprocess.Popen([sys.executable, str(WORKERS), "ckpt-race", str(target), tag, "3"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for tag in "ab"]
    for p in procs:
        assert p.stdout.readline() == "ready\n", p.stderr.read()[-3000:]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        assert json.loads(out.splitlines()[-1]) == {"errors": []}
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert sorted(os.listdir(target)) == [".metadata", "__0_0.distcp"]
    (got,) = _loads(tmp_path, [[str(target), {}, "fresh"]])
    assert "error" not in got, got["error"]
    values = {float(v.unique()[0]) for v in got["params"].values() if v.unique().numel() == 1}
    assert len(values) == 1 and values <= {1.0, 2.0} and all(v.unique().numel() == 1 for v in got["params"].values())


@pytest.mark.parametrize("where", ["in-shards", "before-swap"])
def test_a_half_written_newest_checkpoint_beside_a_whole_older_one(tmp_path, where):
    """A save after step 4 SIGKILLed ``where`` (torch writing its shards: no .metadata; or the new checkpoint whole in
    ``.ck.partial``, the old not yet moved aside). The load takes the whole step-2 checkpoint, with a warning naming
    the cut-short save (before: silently); with nothing cut short beside it, a checkpoint loads without one."""
    target = tmp_path / "ck"
    r = subprocess.run([sys.executable, str(WORKERS), "half-written", str(target), where], capture_output=True,
                       text=True, env=_env(), timeout=240)
    assert r.returncode == -9 and "survived" not in r.stdout, r.stderr[-3000:]
    assert (tmp_path / ".ck.partial").is_dir() and (tmp_path / ".ck.partial" / ".metadata").exists() == (
        where == "before-swap")
    first, = _loads(tmp_path, [[str(target), {}, "fresh"]])
    assert first["steps"] == 2 and _same(first["params"], torch.load(str(target) + ".pt"))
    assert len(first["warnings"]) == 1 and "later save" in first["warnings"][0] and "cut short" in first["warnings"][0]
    assert str(tmp_path / ".ck.partial") in first["warnings"][0]
    if where == "before-swap":            # the cut-short save was whole: swapped in by hand, it is step 4's
        shutil.rmtree(target)
        os.replace(tmp_path / ".ck.partial", target)
        again, = _loads(tmp_path, [[str(target), {}, "fresh"]])
        assert again["steps"] == 4 and again["warnings"] == []


def test_a_load_that_fails_part_way_leaves_the_trainer_as_it_was(tmp_path):
    """A shard cut short at a tenth, half and all but one byte, and a .metadata cut short at 40 lengths: each load
    is a ParallelConfigError naming the folder or file, and the trainer keeps every parameter it had (before: a
    shard cut at half left all 37 tensors the file's, behind the error). A whole copy then loads, twice into one
    trainer (a resume repeated) with the same steps and parameters."""
    whole = tmp_path / "whole" / "ck"
    r = subprocess.run([sys.executable, str(WORKERS), "half-written", str(whole), "in-shards"], capture_output=True,
                       text=True, env=_env(), timeout=240)
    assert r.returncode == -9, r.stderr[-3000:]
    shutil.rmtree(tmp_path / "whole" / ".ck.partial")
    shard = next(whole.glob("*.distcp"))
    loads, meta_size = [], (whole / ".metadata").stat().st_size
    for i, frac in enumerate((0.1, 0.5, None)):
        d = tmp_path / f"shard{i}"
        shutil.copytree(whole, d)
        with open(d / shard.name, "r+b") as f:
            f.truncate(int(shard.stat().st_size * frac) if frac else shard.stat().st_size - 1)
        loads.append([str(d), {}, "fresh"])
    for n in sorted({*range(0, meta_size, max(1, meta_size // 36)), 1, 2, meta_size - 1}):
        d = tmp_path / f"meta{n}"
        shutil.copytree(whole, d)
        with open(d / ".metadata", "r+b") as f:
            f.truncate(n)
        loads.append([str(d), {}, "fresh"])
    loads += [[str(whole), {}, "fresh"], [str(whole), {}, "again"]]
    results = _loads(tmp_path, loads)
    for (d, _, _), res in zip(loads[:-2], results[:-2], strict=True):
        assert "steps" not in res, d
        assert f"'{d}" in res["error"] and ("cannot be read" in res["error"] or "no .metadata" in res["error"])
        assert _same(res["params"], res["before"]), f"{d}: a failed load changed the trainer"
    saved = torch.load(str(whole) + ".pt")
    for res in results[-2:]:
        assert res["steps"] == 2 and _same(res["params"], saved) and res["warnings"] == []


def test_a_checkpoint_of_two_ranks_loads_in_one_and_wrong_shapes_are_named(tmp_path):
    """Saved by 2 ranks under dp=2, loaded by one process (another world size): the same parameters and step. Into
    a model with another vocabulary: refused naming each tensor of another shape with both shapes, the trainer
    untouched."""
    import _faults_workers_round4 as W
    from tilestack.parallel import run_local

    target = tmp_path / "ck"
    saved = run_local(W.save_two_ranks, 2, (str(target),), timeout_s=180)[0]
    one, wrong = _loads(tmp_path, [[str(target), {}, "fresh"], [str(target), {"vocab": 96}, "fresh"]])
    assert one["steps"] == 3 and _same(one["params"], saved)
    assert "holds another model: 2 of another shape (" in wrong["error"] and "nothing was loaded" in wrong["error"]
    for name in [k for k in saved if saved[k].shape[0] == 64 and saved[k].ndim == 2]:     # the embedding, the head
        assert f"{name} saved [64, 32], here [96, 32]" in wrong["error"], wrong["error"]
    assert _same(wrong["params"], wrong["before"])
