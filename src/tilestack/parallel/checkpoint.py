"""Distributed checkpoints that load under another layout (torch.distributed.checkpoint: every rank writes the
shards it holds, keyed by the full model's parameter names and global shapes; loading reads whatever slices the
new layout's shards need).

    save(trainer, "ckpt/step100")          # under, say, dp=2
    load(trainer2, "ckpt/step100")         # under tp=2, pp=2, dp_shard=4 ...: same parameters and AdamW state

Saved: the model parameters and the optimizer state (AdamW's step and moments), as seen through
torch.distributed.checkpoint.state_dict (which drops DDP's ``module.`` and gathers nothing: DTensor shards are
written as shards). ``load`` returns the optimizer steps the checkpoint holds (where a resumed run goes on).

A save is whole or not there: the shards go to the sibling folder ``.<name>.partial``, which replaces ``path``
(renamed, by rank 0) only once every rank has written; a process killed at any point leaves the previous
checkpoint at ``path`` (a kill between the two renames of the swap is settled by the next save or load). ``load``
refuses, naming the folder, a folder that is no whole checkpoint (no ``.metadata``), a checkpoint of another model
(parameters missing, extra or of other shapes: nothing is loaded then) and one whose files cannot be read. A
save replaces only a checkpoint or an empty folder (a file, or a folder of other files, is refused).

Not supported: ZeRO-1/2 (its optimizer holds a flat slice, not per-parameter state) and more
than one pipeline stage per rank (stages would share one optimizer).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

from tilestack.parallel.config import ParallelConfigError
from tilestack.tune.cache import locked

_SHOWN = 3            # differing parameter names quoted in an error
_CHECKPOINT_FILE = re.compile(r"\.metadata|__\d+(_\d+\.distcp|\.metadata)")   # what torch.distributed.checkpoint writes


def _options(by_name: bool = True):
    """The optimizer's state and hyperparameters keyed by parameter name (``param_groups.<name>.lr``), not by group
    index: each pipeline stage's optimizer has a group 0 of its own parameters, and the stages' ``param_groups.0``
    entries collided in the checkpoint (a resumed pipeline rank lost lr, betas and eps: a KeyError in AdamW).
    ``by_name=False``: the layout of checkpoints saved before 2026-12-07, which still load."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(flatten_optimizer_state_dict=by_name)


def _saved_by_name(saved: dict, optim_sd: dict) -> bool:
    """Whether the checkpoint keys its optimizer by parameter name (``_options``): some of the hyperparameter
    entries this trainer's optimizer has by name are in it; a checkpoint saved before has none of them."""
    ours = {f"optim.{k}" for k in optim_sd if k.startswith("param_groups.")}
    return not ours or bool(ours & saved.keys())


def _check(trainer, what: str) -> None:
    if trainer.zero is not None:
        raise ParallelConfigError(f"checkpoint.{what}: zero={trainer.pc.zero}; ZeRO-1/2's flat optimizer slices "
                                  "cannot be resharded: expected zero=0 (use dp_shard for sharded state)")
    if len(trainer.parts) != 1:
        raise ParallelConfigError(f"checkpoint.{what}: stages_per_rank={trainer.pc.stages_per_rank}; expected 1 "
                                  "(one model part per rank)")


def _dist():
    """torch.distributed where a process group is up, else None (one process: nothing to wait for)."""
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier() -> None:
    if (dist := _dist()) is not None:
        dist.barrier()


def _rank0() -> bool:
    return (dist := _dist()) is None or dist.get_rank() == 0


def _siblings(path: Path) -> tuple[Path, Path]:
    """(where a save writes before the swap, where the previous checkpoint waits during it)."""
    return path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.old")


def _whole(folder: Path) -> bool:
    return (folder / ".metadata").is_file()     # torch.distributed.checkpoint writes it last, once all ranks have


def _settle(path: Path) -> None:
    """(Rank 0.) Finish a swap that a kill cut between its two renames: the new checkpoint where whole, else the
    previous one back at ``path``; then drop the previous one."""
    partial, old = _siblings(path)
    if not path.exists() and old.exists():
        os.replace(partial if _whole(partial) else old, path)
    if old.exists() and path.exists():
        shutil.rmtree(old)


def _warn_cut_short(path: Path) -> None:
    """(Rank 0, under the folder's lock.) A save of ``path`` that was killed left ``.<name>.partial`` beside the
    whole checkpoint it did not replace: that older checkpoint is the one loaded, and the caller is told (before,
    a resumed run went back to it without a word, its steps trained again as if nothing had happened)."""
    partial, _ = _siblings(path)
    if partial.exists() and _whole(path):
        import warnings
        warnings.warn(f"checkpoint.load: a later save of {os.fspath(path)!r} was cut short ({os.fspath(partial)!r} "
                      "was never swapped in); loading the previous whole checkpoint at that path", stacklevel=3)


def _sync_folder(folder: Path) -> None:
    """Make renames in ``folder`` durable (a power cut after a save keeps its swap)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_replaceable(path: Path) -> None:
    """Refuse to replace anything at ``path`` but a checkpoint or an empty folder (a save swaps the whole folder),
    and a path below a file (rank 0's mkdir would fail while the other ranks wait at the barrier). Every rank runs
    it, so every rank refuses alike."""
    if not path.exists():
        above = next((p for p in path.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise ParallelConfigError(f"checkpoint.save: path={os.fspath(path)!r} is below the file "
                                      f"{os.fspath(above)!r}; expected a folder path (a file cannot hold folders)")
        return
    if not path.is_dir():
        raise ParallelConfigError(f"checkpoint.save: path={os.fspath(path)!r} is a file; expected a folder for the "
                                  "checkpoint (absent, empty, or a checkpoint to replace)")
    foreign = sorted(f.name for f in path.iterdir() if not _CHECKPOINT_FILE.fullmatch(f.name))
    if foreign:
        raise ParallelConfigError(f"checkpoint.save: path={os.fspath(path)!r} holds files that are not a "
                                  f"checkpoint's ({', '.join(foreign[:_SHOWN])}); a save replaces the whole folder: "
                                  "expected a folder of its own (absent, empty, or a checkpoint to replace)")


def save(trainer, path: str | os.PathLike) -> None:
    """Write the trainer's parameters and optimizer state to the directory ``path`` (collective: every rank), whole
    or not at all: a checkpoint already at ``path`` is replaced only once the new one is complete."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    _check(trainer, "save")
    path = Path(path)
    _check_replaceable(path)
    partial, old = _siblings(path)
    with contextlib.ExitStack() as lock:
        if _rank0():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Two runs saving one path (two jobs given one --out) shared ``.<name>.partial``: one swapped it in while
            # the other still wrote there (a checkpoint holding the other's ``.metadata.tmp``), and the other died
            # in torch's rename of its .metadata. Rank 0 holds the folder's lock from here to the swap: saves of one
            # path take turns, each whole, the last one's kept.
            lock.enter_context(locked(path.parent))
            _settle(path)
            shutil.rmtree(partial, ignore_errors=True)      # what a save killed before its swap left
        _barrier()
        model_sd, optim_sd = get_state_dict(trainer.parts[0], trainer.optimizer, options=_options())
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.fspath(partial))
        _barrier()
        if _rank0():
            if path.exists():
                os.replace(path, old)
            os.replace(partial, path)
            shutil.rmtree(old, ignore_errors=True)
            _sync_folder(path.parent)
    _barrier()


def load(trainer, path: str | os.PathLike) -> int:
    """Read a checkpoint written by ``save`` under any layout into ``trainer`` (collective: every rank); the
    number of optimizer steps it holds (the step a resumed run continues from)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    _check(trainer, "load")
    path = Path(path)
    if _rank0() and path.parent.is_dir():
        with locked(path.parent):       # (a save of this path in another process finishes its swap first)
            _settle(path)
            _warn_cut_short(path)
    _barrier()
    if not path.is_dir():
        raise ParallelConfigError(f"checkpoint.load: path={os.fspath(path)!r} is not a directory; expected a "
                                  "checkpoint written by tilestack.parallel.checkpoint.save")
    saved = _saved_shapes(path)
    model_sd, optim_sd = get_state_dict(trainer.parts[0], trainer.optimizer, options=_options())
    by_name = _saved_by_name(saved, optim_sd)
    if not by_name:      # saved before 2026-12-07: the optimizer by group index (a pipeline's never resumed)
        model_sd, optim_sd = get_state_dict(trainer.parts[0], trainer.optimizer, options=_options(False))
    _check_same_model(path, saved, model_sd)
    # DCP loads in place: a shard cut short (past its first tensors) left the trainer's parameters and moments partly
    # the file's behind an error a caller could catch and train on. Every byte range the .metadata names is checked
    # to be in its file first, so a truncated checkpoint fails before any tensor is touched (reading into copies
    # instead would cost a second copy of the state, on the GPU, at every resume).
    _check_shards_whole(path)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=os.fspath(path))
    except (Exception, CheckpointException) as e:   # (CheckpointException is a BaseException)
        why = next((ln for ln in reversed(str(e).splitlines()) if ln.strip()), type(e).__name__)
        raise ParallelConfigError(f"checkpoint.load: {os.fspath(path)!r} cannot be read ({why.strip()[:300]}); its "
                                  "files are damaged or incomplete: load an earlier checkpoint, or delete it and "
                                  "train from the start") from e
    set_state_dict(trainer.parts[0], trainer.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"], options=_options(by_name))
    return _steps(trainer.optimizer)


def _check_shards_whole(path: Path) -> None:
    """Every (file, offset, length) of the checkpoint's .metadata lies inside its file (a save cut short, or a file
    truncated since, named before the load touches the trainer)."""
    import torch.distributed.checkpoint as dcp
    storage = dcp.FileSystemReader(os.fspath(path)).read_metadata().storage_data or {}
    need: dict[str, int] = {}
    for info in storage.values():
        rel = getattr(info, "relative_path", None)
        if rel is not None:
            need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, end in sorted(need.items()):
        f = path / rel
        size = f.stat().st_size if f.is_file() else None
        if size is None or size < end:
            have = "is missing" if size is None else f"holds {size} bytes"
            raise ParallelConfigError(f"checkpoint.load: {os.fspath(path)!r} cannot be read ({rel} {have}; its "
                                      f".metadata says {end}); its files are damaged or incomplete: load an earlier "
                                      "checkpoint, or delete it and train from the start")


def _saved_shapes(path: Path) -> dict[str, tuple[int, ...] | None]:
    """Every entry of the checkpoint's ``.metadata``: its global shape (None for a non-tensor entry)."""
    import torch.distributed.checkpoint as dcp
    if not _whole(path):
        raise ParallelConfigError(f"checkpoint.load: {os.fspath(path)!r} has no .metadata: not a whole checkpoint "
                                  "(a save cut short, or another folder); expected one written by "
                                  "tilestack.parallel.checkpoint.save")
    try:
        meta = dcp.FileSystemReader(os.fspath(path)).read_metadata()
        return {k: (tuple(m.size) if hasattr(m, "size") else None) for k, m in meta.state_dict_metadata.items()}
    except Exception as e:  # noqa: BLE001 - a damaged .metadata fails in pickle, in any of its ways
        raise ParallelConfigError(f"checkpoint.load: {os.fspath(path / '.metadata')!r} cannot be read "
                                  f"({type(e).__name__}: {e}); the checkpoint is damaged: load an earlier one, or "
                                  "delete it and train from the start") from e


def _check_same_model(path: Path, saved: dict, model_sd: dict) -> None:
    """Refuse a checkpoint of another model (DCP would load a smaller model from a bigger one's without a word),
    comparing every rank's parameters (a pipeline stage holds only its own) with the saved global shapes."""
    ours = {f"model.{k}": tuple(v.shape) for k, v in model_sd.items() if hasattr(v, "shape")}
    if (dist := _dist()) is not None:
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, ours)
        ours = {k: v for d in every for k, v in d.items()}
    theirs = {k: v for k, v in saved.items() if k.startswith("model.")}
    missing = sorted(set(ours) - set(theirs))
    extra = sorted(set(theirs) - set(ours))
    shapes = [f"{k[6:]} saved {list(theirs[k])}, here {list(ours[k])}" for k in sorted(set(ours) & set(theirs))
              if theirs[k] != ours[k]]
    if missing or extra or shapes:
        what = [f"{len(missing)} parameters it lacks ({', '.join(k[6:] for k in missing[:_SHOWN])})" * bool(missing),
                f"{len(extra)} this model lacks ({', '.join(k[6:] for k in extra[:_SHOWN])})" * bool(extra),
                f"{len(shapes)} of another shape ({'; '.join(shapes[:_SHOWN])})" * bool(shapes)]
        raise ParallelConfigError(f"checkpoint.load: {os.fspath(path)!r} holds another model: "
                                  f"{', '.join(w for w in what if w)}; expected a checkpoint of this model (the same "
                                  "ModelConfig): nothing was loaded")


def _steps(optimizer) -> int:
    """AdamW's step count (the same for every parameter it has stepped)."""
    steps = [s["step"] for s in optimizer.state.values() if "step" in s]
    steps = [s.full_tensor() if hasattr(s, "full_tensor") else s for s in steps]
    return int(max((float(s) for s in steps), default=0))
