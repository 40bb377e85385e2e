"""Processes that tests/test_faults_round1.py starts and kills: importable by spawned ranks and by ``python -m``.

    python tests/_faults_workers_round1.py put-forever CACHE_DIR TAG     # ConfigCache.put until killed
    python tests/_faults_workers_round1.py put-many CACHE_DIR TAG N      # "ready"; after a line on stdin N entries
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import torch

CFG_KW = dict(n_layer=2, d=32, n_head=4, vocab=64, max_seq=16)
BATCH, SEQ, STEPS, SAVE_EVERY = 4, 16, 6, 2
HYPER = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)


def _cfg(**change):
    from tilestack.parallel import ModelConfig
    return ModelConfig(**{**CFG_KW, **change})


def _batches():
    from tilestack.parallel import make_batch
    return [make_batch(_cfg(), BATCH, SEQ, seed=200 + s) for s in range(STEPS)]


def _trainer(seed: int, **change):
    from tilestack.parallel import GPT, ParallelConfig, Trainer
    pc = ParallelConfig(dp=2)
    return Trainer(GPT(_cfg(**change), seed=seed), pc, pc.build_mesh("cpu"), **HYPER)


def train_killed_in_save(rank: int, world_size: int, path: str, kill_at: int) -> None:
    """Train, saving to ``path`` every SAVE_EVERY steps; in the save after step ``kill_at`` rank 1 is SIGKILLed as
    it starts writing its shards, while rank 0 writes its own (an in-place save would mix the two steps' files)."""
    from torch.distributed.checkpoint import FileSystemWriter

    from tilestack.parallel import checkpoint
    t = _trainer(seed=0)
    for step, (idx, targets) in enumerate(_batches(), start=1):
        t.step(idx, targets)
        if step % SAVE_EVERY == 0:
            if step == kill_at and rank == 1:
                FileSystemWriter.write_data = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
            checkpoint.save(t, path)


def _load_error(path: str, **change) -> str:
    from tilestack.parallel import ParallelConfigError, checkpoint
    t = _trainer(seed=3, **change)
    try:
        checkpoint.load(t, path)
    except ParallelConfigError as e:
        return str(e)
    return "loaded"


def resume_and_faults(rank: int, world_size: int, path: str, scratch: str) -> dict:
    """Resume from ``path`` to the end; train the same run uninterrupted; then load checkpoints of other models
    and damaged ones (copies of ``path`` in ``scratch``). Losses and whole parameters of both runs, the errors."""
    import torch.distributed as dist

    from tilestack.parallel import ParallelConfigError, checkpoint
    data = _batches()
    resumed = _trainer(seed=1)                     # another initial model: everything must come from the file
    start = checkpoint.load(resumed, path)
    resumed_losses = [resumed.step(idx, targets) for idx, targets in data[start:]]
    whole = _trainer(seed=0)
    whole_losses = [whole.step(idx, targets) for idx, targets in data]
    before, swap = Path(scratch) / "before", Path(scratch) / "swap"
    if rank == 0:
        shutil.copytree(path, before)
    checkpoint.save(resumed, path)                 # over the old one, past what the killed save left
    again = _trainer(seed=2)
    out = dict(start=start, resumed_losses=resumed_losses, whole_losses=whole_losses,
               resumed=resumed.full_params(), whole=whole.full_params(),
               again_start=checkpoint.load(again, path), again=again.full_params(),
               left=sorted(os.listdir(Path(path).parent)))
    for name, whole_partial in (("swap_cut_after_old", True), ("swap_cut_in_save", False)):
        if rank == 0:                              # a kill between the swap's renames: the old one moved aside
            shutil.rmtree(swap, ignore_errors=True)
            shutil.copytree(before, swap / ".ckpt.old")
            shutil.copytree(path, swap / ".ckpt.partial")
            if not whole_partial:
                (swap / ".ckpt.partial" / ".metadata").unlink()
        dist.barrier()
        out[name] = checkpoint.load(_trainer(seed=4), swap / "ckpt")
        out[name + "_left"] = sorted(os.listdir(swap))
    mine = Path(scratch) / "mine"                 # a folder of the user's: a save must not swap it away
    if rank == 0:
        mine.mkdir()
        (mine / "notes.txt").write_text("keep")
    dist.barrier()
    for name, target in (("foreign_folder", mine), ("a_file", mine / "notes.txt")):
        try:
            checkpoint.save(resumed, target)
            out[name] = "saved"
        except ParallelConfigError as e:
            out[name] = str(e)
    out["mine_left"] = sorted(os.listdir(mine))
    out["fewer_layers"] = _load_error(path, n_layer=1)
    out["wider"] = _load_error(path, d=64)
    out["more_layers"] = _load_error(path, n_layer=3)
    damaged = {"no_metadata": lambda d: (d / ".metadata").unlink(),
               "garbage_metadata": lambda d: (d / ".metadata").write_bytes(b"\x00not a pickle" * 7),
               "truncated_shard": lambda d: _truncate(next(d.glob("*.distcp"))),
               "empty": lambda d: [f.unlink() for f in d.iterdir()]}
    for name, spoil in damaged.items():
        target = Path(scratch) / name
        if rank == 0:
            shutil.copytree(path, target)
            spoil(target)
        dist.barrier()
        out[name] = _load_error(str(target))
    return out


def _truncate(f: Path) -> None:
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 3)


def put_entries(cache_dir: str, tag: str, n: int | None) -> None:
    """``ConfigCache.put`` of entries ``tag-0``, ``tag-1``... (``n`` of them, or until killed), printing each."""
    from tilestack.tune.cache import ConfigCache
    from tilestack.tune.devices import DeviceKey
    dev = DeviceKey.parse("sm90-132sm-227kb", name="NVIDIA H200")
    cache = ConfigCache(Path(cache_dir), tables_dir=None)
    if n is not None:                  # start together with the other writer: "ready", then wait for a line
        print("ready", flush=True)
        sys.stdin.readline()
    i = 0
    while n is None or i < n:
        cache.put("gemm", f"{tag}-{i}", dev, 1024, {"BM": 64, "pad": "x" * 2000}, options={}, seconds=1e-3 * i)
        print(i, flush=True)
        i += 1


if __name__ == "__main__":
    torch.set_num_threads(1)
    what, cache_dir, tag = sys.argv[1:4]
    put_entries(cache_dir, tag, int(sys.argv[4]) if what == "put-many" else None)
