"""The output folder of ``tilestack train --out DIR``: what a resumed run needs to go on where it stopped.

    DIR/checkpoint/    the model and AdamW state (tilestack.parallel.checkpoint: whole or not at all)
    DIR/train.json     the settings that decide the losses (model, batch, seq, lr, dtype, seed)
    DIR/.lock          held (flock) by the run writing DIR: a second run of the same DIR at once is refused

A run with ``--resume`` loads DIR/checkpoint and skips the steps it holds; batch ``s`` is the same whichever run
makes it, so the losses after the checkpoint are the uninterrupted run's. ``train.json`` is compared first: a
resume under other settings (another lr, batch or seed) would mix two runs without a word, so it is refused,
naming what differs. The layout (dp, tp, pp, ...) may change: checkpoints load under any layout. Without
``--resume`` a folder that holds a checkpoint is refused (the run would replace it).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import typer

SETTINGS = "train.json"
CHECKPOINT = "checkpoint"
LOCK = ".lock"                  # held (flock) by the run writing the folder
_DECIDING = ("model", "batch", "seq", "lr", "dtype", "seed")    # what the losses depend on besides the layout


def _settings(spec: dict) -> dict:
    return {k: spec.get(k) for k in _DECIDING}


def _write_atomically(path: Path, text: str) -> None:
    from tilestack.files import write_atomic
    write_atomic(path, text)                    # a reader sees the old file or the new one, never half of one


def _read_settings(path: Path) -> dict | None:
    """The saved settings; None where the file is missing or cut short (a kill before its rename cannot cut it,
    but a copy can), said by the caller."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise typer.BadParameter(f"--out: {path} cannot be read ({e}); it records the run's settings: restore it, "
                                 "or delete the folder and train from the start") from e
    if not isinstance(data, dict):
        raise typer.BadParameter(f"--out: {path} holds a {type(data).__name__}; expected the run's settings")
    return data


@contextlib.contextmanager
def _claimed(folder: Path, out: str) -> Iterator[None]:
    """Hold ``folder/.lock`` (flock) while a run writes into ``folder``. Two runs of one --out at once (a second
    started while the first trains, a --resume while the first still runs) both passed the checks: the second
    wrote its settings over the first's train.json and both saved checkpoints in turn, so a later --resume checked
    one run's settings and loaded the other's state."""
    from tilestack.files import LockHeldError, held_lock

    lock = folder / LOCK
    try:
        with held_lock(lock):                   # (released at the block's end, the process's end, a kill too)
            yield
    except LockHeldError:
        raise typer.BadParameter(f"--out {out!r} is in use by another tilestack train run (it holds {lock}); "
                                 "expected a folder no other run is writing: wait for that run to end, or give "
                                 "another --out", param_hint="--out") from None


def prepare_output(out: str, spec: dict, pc, resume: bool, claim: contextlib.ExitStack | None = None) -> str:
    """Check and make the folder ``out`` for a run of ``spec`` (under ParallelConfig ``pc``); the checkpoint's
    path for ``run_training``. Refused before any rank starts: a file at ``out``, a layout whose optimizer
    state cannot be checkpointed, a folder of another run's checkpoint (on resume: its settings differ; without
    resume: it is there at all), a folder another run is writing (with ``claim``: the folder is held for the run
    until ``claim`` closes)."""
    from tilestack.cli.args import check_output

    # a file there, a file above it, a folder that takes no new file, a folder on its way this user cannot enter
    # (pathlib's exists() raised PermissionError out of the command as a traceback)
    check_output("--out", out, folder=True)
    folder = Path(out)
    if pc.zero:
        raise typer.BadParameter(f"--out with --zero {pc.zero}: ZeRO-1/2's flat optimizer slices cannot be "
                                 "checkpointed; expected --zero 0 (use --dp-shard for sharded state)")
    if pc.stages_per_rank != 1:
        raise typer.BadParameter(f"--out with --stages-per-rank {pc.stages_per_rank}: expected 1 (one model part "
                                 "per rank) to checkpoint")
    ckpt = folder / CHECKPOINT
    has_checkpoint = any((f / ".metadata").is_file() for f in (ckpt, folder / f".{CHECKPOINT}.old"))
    saved = _read_settings(folder / SETTINGS)
    now = json.loads(json.dumps(_settings(spec)))         # as JSON gives it back (tuples as lists)
    if has_checkpoint and not resume:
        raise typer.BadParameter(f"--out {out!r} holds a checkpoint of an earlier run; pass --resume to go on from "
                                 "it, or another --out for a new run")
    if resume and saved is not None:
        differ = [f"{k}: the checkpoint's run has {saved.get(k)!r}, this one {now[k]!r}" for k in _DECIDING
                  if saved.get(k) != now[k]]
        if differ:
            raise typer.BadParameter(f"--resume from {out!r} under other settings ({'; '.join(differ)}); expected "
                                     "the same settings as the run that made the checkpoint (the layout may change)")
    if resume and has_checkpoint and saved is None:
        raise typer.BadParameter(f"--resume: {folder / SETTINGS} is missing, so the checkpoint's settings are "
                                 "unknown; expected a folder made by tilestack train --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:                                     # below a file, read-only, ...: before any rank starts
        raise typer.BadParameter(f"--out {out!r} cannot be made ({e}); expected a folder path this user can "
                                 "write") from e
    if claim is not None:
        claim.enter_context(_claimed(folder, out))
    _write_atomically(folder / SETTINGS, json.dumps(now, indent=1, sort_keys=True))
    return os.fspath(ckpt)
