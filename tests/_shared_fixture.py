"""Compute an expensive fixture's result once per pytest session, however many xdist workers need it.

Use from a (module- or session-scoped) fixture::

    from _shared_fixture import shared_parts

    @pytest.fixture(scope="module")
    def matrix(tmp_path_factory):
        return shared_parts(tmp_path_factory, "round5-matrix",
                            {"a": lambda root: run_half(root, 0), "b": lambda root: run_half(root, 1)})

Each part is a function of a fresh folder (``root``) that returns a JSON-serialisable value. Under ``pytest -n N``
every worker has its own basetemp (``.../pytest-K/popen-gwI``); their parent folder is shared by the session's
workers, and that is where the parts are computed and their results kept (without xdist, the basetemp itself). The
first worker to reach a part takes its file lock (``fcntl.flock``), computes it and writes the result atomically to
``<name>-<part>.json``; a worker that finds the part's lock taken goes on to the next free part, and only then waits
on the locks of the parts others are computing and reads their results. So with two workers and two parts, the two
are computed at once, one by each, and no part is computed twice. A part that raised is recorded as an error that
every other worker raises again (not computed a second time).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


class SharedPartFailed(RuntimeError):
    """A shared part raised in the worker that computed it."""


def shared_folder(tmp_path_factory) -> Path:
    """The folder every worker of this pytest session sees: the basetemp's parent under xdist, else the basetemp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _read(result: Path, label: str) -> Any:
    data = json.loads(result.read_text())
    if "error" in data:
        raise SharedPartFailed(f"shared part {label} failed in process {data['pid']}:\n{data['error']}")
    return data["value"]


def _compute(folder: Path, name: str, part: str, fn: Callable[[Path], Any], result: Path) -> Any:
    root = Path(tempfile.mkdtemp(prefix=f"{name}-{part}-", dir=folder))
    try:
        data = {"pid": os.getpid(), "value": fn(root)}
    except BaseException:
        data = {"pid": os.getpid(), "error": traceback.format_exc()[-6000:]}
    tmp = result.with_name(f".{result.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, result)                     # (readers see the whole result or none)
    return _read(result, f"{name}/{part}")


def shared_parts(tmp_path_factory, name: str, parts: dict[str, Callable[[Path], Any]]) -> dict[str, Any]:
    """``{part: fn(root)}`` computed once per session across xdist workers (see the module docstring); returns
    ``{part: value}``. ``name`` must be unique in the session (it names the lock and result files)."""
    folder = shared_folder(tmp_path_factory)
    out: dict[str, Any] = {}
    waiting: list[str] = []
    for blocking in (False, True):              # first the free parts, then wait for those others are computing
        for part in (waiting if blocking else list(parts)):
            result = folder / f"{name}-{part}.json"
            with open(folder / f"{name}-{part}.lock", "a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                except BlockingIOError:
                    waiting.append(part)
                    continue
                try:
                    if result.exists():
                        out[part] = _read(result, f"{name}/{part}")
                    else:
                        out[part] = _compute(folder, name, part, parts[part], result)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
    return {part: out[part] for part in parts}


def shared_result(tmp_path_factory, name: str, fn: Callable[[Path], Any]) -> Any:
    """One part: ``fn(root)`` computed once per session across xdist workers."""
    return shared_parts(tmp_path_factory, name, {"all": fn})["all"]
