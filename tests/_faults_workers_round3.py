"""Processes that tests/test_faults_round3.py and tests/test_faults_round3_more.py start: writers racing another
process for one store, writers whose disk fills up, a bench run killed mid-append.

    python tests/_faults_workers_round3.py measure TARGET TAG N     # compile.measure._store, N entries
    python tests/_faults_workers_round3.py store TARGET TAG N       # perf Store: a run of N rows
    python tests/_faults_workers_round3.py federated TARGET TAG N   # federated save_checkpoint, N saves
    python tests/_faults_workers_round3.py full WHERE TARGET        # every store written with the disk full
    python tests/_faults_workers_round3.py bench-run DB TAG         # a bench run's rows, forever (killed)

The racing writers print "ready", wait for a line on stdin (so that two start together), write, print one line
of JSON: what they wrote and the errors they met.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import warnings
from pathlib import Path

PAD = "x" * 2048


def measurement(name: str, latency_s: float = 1e-3, device: str = "cpu: test", role: str = "tilestack"):
    from tilestack.perf.metrics import Measurement  # config as the bench runner's: case, shape, role
    return Measurement(name=name, config={"case": name, "shape": "s", "role": role, "pad": PAD}, device=device,
                       dtype="float32", latency_s=latency_s, flops=1e6, bytes_read=1e3, bytes_written=1e3,
                       device_kind="cpu")


def race_measure(target: str, tag: str, n: int) -> dict:
    import time
    import types

    from tilestack import config
    from tilestack.compile import measure
    # each write waits 20 ms between reading the file and writing it (as a big file on a slow disk would): the
    # other writer's write lands in that gap every time, not once in many runs
    measure.json = types.SimpleNamespace(loads=json.loads,
                                         dumps=lambda *a, **k: time.sleep(0.02) or json.dumps(*a, **k))
    with config.override(cache_dir=Path(target)):
        for i in range(n):
            measure._store(f"linear_epilogue|{tag}-{i}|{PAD}", {"fused_s": 1e-6 * (i + 1), "unfused_s": 2e-6})
    return {"wrote": n}


def race_store(target: str, tag: str, n: int) -> dict:
    from tilestack.perf.store import Store
    with Store(target) as st:
        run = st.start_run(device="cpu: test", label=tag, command="faults", versions={})
        for i in range(n):
            st.append(run, measurement(f"{tag}-{i}"))
    return {"run": run}


def race_federated(target: str, tag: str, n: int) -> dict:  # noqa: D103
    import numpy as np

    from tilestack.federated.driver import save_checkpoint
    errors = []
    for i in range(n):
        try:
            save_checkpoint(Path(target), {"round": i, "arrays": np.full(1 << 15, float(i)), "strategy": {},
                                           "history": [], "tag": tag})
        except Exception as e:  # noqa: BLE001 - what the other writer's save did to this one's, reported
            errors.append(f"{type(e).__name__}: {e}")
    return {"errors": errors}


def _disk_full(*_, **__):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full(where: str, target: str) -> dict:
    """Write each store once whole, then again with ``os.<where>`` (replace or fsync) failing as on a full disk;
    what each write did (ok, a warning, an error) and the files left."""
    import numpy as np

    from tilestack import config
    from tilestack.bench.record import Record
    from tilestack.compile import measure
    from tilestack.federated.driver import save_checkpoint
    from tilestack.tune.cache import ConfigCache
    from tilestack.tune.devices import DeviceKey

    root = Path(target)
    dev = DeviceKey.parse("sm90-132sm-227kb", name="NVIDIA H200")
    out: dict = {}

    def attempt(name: str, fn) -> None:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                fn()
                out[name] = "ok"
            except OSError as e:
                out[name] = f"OSError {e.errno}: {e}"
        out[name + "_warnings"] = [str(w.message) for w in seen]

    def writes(i: int, cache) -> dict:
        return {
            "tune": lambda: cache.put("gemm", "sig", dev, 1024 * (i + 1), {"BM": 64 * (i + 1)}, options={}),
            "measure": lambda: measure._store(f"k{i}", {"fused_s": 1e-6, "unfused_s": 2e-6}),
            "record": lambda: Record(f"cpu: {i}", [], started_at=f"t{i}").write(root / "bench" / "bench.json"),
            "federated": lambda: save_checkpoint(root / "fed" / "run.ckpt", {"round": i, "arrays": np.zeros(4),
                                                                            "strategy": {}, "history": []}),
        }

    with config.override(cache_dir=root / "cache"):
        (root / "fed").mkdir(parents=True, exist_ok=True)
        for fn in writes(0, ConfigCache(root / "cache", tables_dir=None)).values():
            fn()
        cache = ConfigCache(root / "cache", tables_dir=None)
        for name, fn in writes(1, cache).items():
            real = getattr(os, where)
            setattr(os, where, _disk_full)
            try:
                attempt(name, fn)
            finally:
                setattr(os, where, real)
        out["tune_in_process"] = cache.get("gemm", "sig", dev, 2048)     # the winner is still this process's
        out["measure_in_process"] = "k1" in measure._memory
    out["files"] = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return out


def bench_runs(db: str, tag: str) -> None:
    """As ``tilestack bench`` stores a run: one whole run of two cases (tilestack and baseline rows), then a
    second whose rows are appended until the process is killed (a line after each committed row)."""
    from tilestack.bench import record
    st = record.open_store(db)
    for run_no in range(2):
        run = st.start_run(device="cpu: test", label="tilestack bench", command=record.BENCH_COMMAND, versions={})
        i = 0
        while run_no == 1 or i < 4:
            st.append(run, measurement(f"case-{i // 2 % 2}", latency_s=1e-3 * (run_no + 1),
                                       role=("tilestack", "baseline")[i % 2]))
            i += 1
            if run_no == 1:
                print(i, flush=True)
    st.close()


if __name__ == "__main__":
    what, target, tag = sys.argv[1], sys.argv[2], sys.argv[3]
    if what == "full":
        print(json.dumps(full(tag, target)), flush=True)
    elif what == "bench-run":
        bench_runs(target, tag)
    else:
        n = int(sys.argv[4])
        import importlib  # the store's module imported before "ready": the two start writing together
        importlib.import_module({"measure": "tilestack.compile.measure", "store": "tilestack.perf.store",
                                 "federated": "tilestack.federated.driver"}[what])
        print("ready", flush=True)
        sys.stdin.readline()
        fn = {"measure": race_measure, "store": race_store, "federated": race_federated}[what]
        print(json.dumps(fn(target, tag, n)), flush=True)
