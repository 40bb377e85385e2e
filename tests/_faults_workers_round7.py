"""Worker processes for tests/test_faults_round7.py.

    python _faults_workers_round7.py cli CASES_JSON       # each case through the tilestack command, in-process
    python _faults_workers_round7.py launch FOLDER        # run_local with one rank that beats until told to stop

``cli`` runs under ``setpriv`` without the capabilities that let root pass permission bits, so that a folder of
mode 000 holds; it prints one JSON line: per case [exit code, output, repr of the exception].
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

BEATS = 2400          # a rank's heart beats (0.05 s apart): two minutes, far beyond what the test waits


def cli(cases_json: str) -> None:
    from typer.testing import CliRunner

    from tilestack.cli import _register, app

    _register()
    out = {}
    for name, args in json.loads(cases_json).items():
        res = CliRunner().invoke(app, args)
        out[name] = [res.exit_code, res.output, None if res.exception is None else repr(res.exception)]
    print(json.dumps(out))


def beat(rank: int, world_size: int, folder: str) -> int:
    """A rank that says its pid, then writes its beat count whole, again and again."""
    from tilestack.files import write_atomic

    folder_path = Path(folder)
    write_atomic(folder_path / "rank.pid", str(os.getpid()))
    for i in range(BEATS):
        write_atomic(folder_path / "beat", str(i))
        time.sleep(0.05)
    return BEATS


def launch(folder: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))      # (the spawned rank imports beat from this module)
    from _faults_workers_round7 import beat as importable_beat
    from tilestack.parallel.launch import run_local

    run_local(importable_beat, 1, (folder,))


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"cli": cli, "launch": launch}[mode](*rest)
