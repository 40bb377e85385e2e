"""Start a process group on this machine and run a function on every rank.

    results = run_local(fn, world_size=4, args=(cfg,))      # fn(rank, world_size, *args) on 4 processes
    results[r]                                              # what rank r returned (picklable)

Backend ``gloo`` on the CPU (one thread per process, so that W processes share the cores without
oversubscription), ``nccl`` with one GPU per rank when ``device="cuda"``. The rendezvous is a file in a fresh
temporary directory (no port to collide with a concurrent run). An exception on any rank is raised here with that
rank's traceback; the other ranks are then terminated.
"""

from __future__ import annotations

import io
import math
import os
import queue as queue_mod
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tilestack.errors import LaunchError

# How often a rank looks whether the process that started it is still there (seconds).
PARENT_POLL_S = 0.5


def _exit_with_parent(parent: int) -> None:
    """End this rank when ``parent`` (run_local's process) is gone. A launcher SIGKILLed (by a user, the OOM killer)
    cannot terminate its ranks: they went on training as orphans, saving checkpoints into the run's --out folder
    while the user's next run (``--resume``) read and wrote the same folder. Checkpoints and stores are written
    whole or not at all, so ending mid-step loses no more than the kill did."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="tilestack-parent-watch", daemon=True).start()


def _entry(rank: int, world_size: int, init_file: str, device: str, fn: Callable, args: tuple, results,
           parent: int | None = None) -> None:
    if parent is not None:
        _exit_with_parent(parent)
    try:
        if device == "cuda":
            torch.cuda.set_device(rank)
            backend = "nccl"
        else:
            torch.set_num_threads(1)
            backend = "gloo"
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        buf = io.BytesIO()      # bytes, not shared-memory tensors: the child may exit before the parent reads
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        results.put((rank, False, traceback.format_exc()))


class GroupFailure(LaunchError):
    """A rank of run_local's group failed; ``transient`` when none raised on its own (``_failure_report``)."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


# what a rank's traceback says when it failed only because another rank went away first: its report comes after
# those of the ranks that failed on their own
_KNOCK_ON = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Socket closed")


def _failure_report(failed: dict[int, str], results, procs, got: dict, grace_s: float = 10.0) -> GroupFailure:
    """The error for a failed run: every rank's traceback that arrives within ``grace_s`` of the first. When one
    rank raises, it destroys its process group and the others fail in their next collective with a transport
    error ("Connection reset by peer") that can reach the queue first; the rank that failed on its own is the
    cause, so it is listed first. Transient when no rank raised on its own: every report is a knock-on, or a
    rank was killed by a signal (the OS's out-of-memory killer on a shared machine, a crash in gloo)."""
    deadline, done = time.monotonic() + grace_s, set(got)
    while time.monotonic() < deadline:
        pending = [r for r, p in enumerate(procs) if r not in done and r not in failed and p.exitcode in (None, 0)]
        if not pending:
            break
        try:
            rank, ok, out = results.get(timeout=0.5)
        except queue_mod.Empty:
            continue
        if ok:
            done.add(rank)
        else:
            failed[rank] = out
    signalled = set()
    for r, p in enumerate(procs):       # killed, or crashed in native code (a signal: a negative exit code)
        if r not in done and r not in failed and p.exitcode not in (None, 0):
            failed[r] = f"exited with code {p.exitcode} without a report"
            if p.exitcode < 0:
                signalled.add(r)
    knock_on = {r for r, text in failed.items() if any(k in text for k in _KNOCK_ON)}
    order = sorted(failed, key=lambda r: (r in knock_on, r))
    head = f"run_local: rank {order[0]} failed"
    if len(order) > 1:
        head += f" (then ranks {order[1:]})"
    return GroupFailure(head + ":\n" + "\n".join(f"--- rank {r} ---\n{failed[r]}" for r in order),
                        transient=set(failed) <= knock_on | signalled)


def run_local(fn: Callable[..., Any], world_size: int, args: tuple = (), *, device: str = "cpu",
              timeout_s: float = 600.0, retries: int = 0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes in one process group; returns
    the per-rank results in rank order. ``fn`` must be importable (a module-level function). A run that fails
    transiently (no rank raised on its own: a rank killed by a signal, the others' transport errors) is run again
    up to ``retries`` times with a warning: measurements, whose runs are idempotent, pass 1; training does not."""
    if not isinstance(world_size, int) or world_size < 1:
        raise LaunchError(f"run_local: world_size={world_size!r}; expected a positive int")
    if device not in ("cpu", "cuda"):
        raise LaunchError(f"run_local: device={device!r}; expected 'cpu' or 'cuda'")
    if device == "cuda" and torch.cuda.device_count() < world_size:
        raise LaunchError(f"run_local: world_size={world_size} on cuda; this machine has "
                          f"{torch.cuda.device_count()} GPUs")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise LaunchError(f"run_local: retries={retries!r}; expected an int >= 0")
    _check_call(fn, args, timeout_s)
    for attempt in range(retries + 1):
        try:
            return _run_once(fn, world_size, args, device, timeout_s)
        except GroupFailure as e:
            if not e.transient or attempt == retries:
                raise
            warnings.warn(f"run_local: {fn.__name__} failed transiently; running it again "
                          f"({attempt + 1} of {retries}):\n{e}", RuntimeWarning, stacklevel=2)
    raise AssertionError("unreachable")


def _check_call(fn: Any, args: Any, timeout_s: Any) -> None:
    """What the spawned ranks would fail on, refused before any starts: a callable they cannot import by name (a
    lambda or a nested function: a PicklingError from the first start), ``args`` that is no tuple or list (a string
    or a dict was unpacked into its characters or keys), a timeout that is not a positive number of seconds (0 or
    NaN gave up at once or never)."""
    if not callable(fn):
        raise LaunchError(f"run_local: fn is {type(fn).__name__}; expected a module-level function")
    qualname = getattr(fn, "__qualname__", "")
    if "<lambda>" in qualname or "<locals>" in qualname:
        raise LaunchError(f"run_local: fn={qualname!r} cannot be imported by the spawned ranks; expected a "
                          "module-level function")
    if not isinstance(args, tuple | list):
        raise LaunchError(f"run_local: args is {type(args).__name__}; expected a tuple of extra arguments, e.g. "
                          "(cfg,)")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not 0 < timeout_s < math.inf:
        raise LaunchError(f"run_local: timeout_s={timeout_s!r}; expected a positive, finite number of seconds")


def _run_once(fn: Callable[..., Any], world_size: int, args: tuple, device: str, timeout_s: float) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(r, world_size, init_file, device, fn, args, results, os.getpid()))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while len(got) < world_size:
                try:
                    rank, ok, out = results.get(timeout=1.0)
                except queue_mod.Empty:
                    dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode not in (None, 0)]
                    if dead:   # died without reporting (killed, or failed before its first line)
                        raise _failure_report({}, results, procs, got) from None
                    if time.monotonic() > deadline:
                        missing = sorted(set(range(world_size)) - set(got))
                        raise LaunchError(f"run_local: no result from ranks {missing} within {timeout_s} s") from None
                    continue
                if not ok:
                    raise _failure_report({rank: out}, results, procs, got)
                got[rank] = torch.load(io.BytesIO(out), weights_only=False)
        finally:
            for p in procs:
                p.join(timeout=5 if len(got) == world_size else 0.1)
                if p.is_alive():
                    p.terminate()
                    p.join()
    return [got[r] for r in range(world_size)]
