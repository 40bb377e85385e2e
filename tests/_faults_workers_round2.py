"""Writers that tests/test_faults_round2.py starts and SIGKILLs: each writes to one store forever, printing the
number of writes committed so far (a line after each), so the test knows what must survive the kill.

    python tests/_faults_workers_round2.py tune CACHE_DIR          # ConfigCache.put, one new entry a write
    python tests/_faults_workers_round2.py store DB                # perf Store.append, one row a write
    python tests/_faults_workers_round2.py record FILE             # bench Record.write, one more row a write
    python tests/_faults_workers_round2.py measure CACHE_DIR       # compile.measure._store, one entry a write
    python tests/_faults_workers_round2.py federated FILE          # federated save_checkpoint, the round a write

Each write is large (hundreds of KiB) so that a kill lands inside one more often than between two.
"""

from __future__ import annotations

import sys
from pathlib import Path

PAD = "x" * 4096


def measurement(i: int):
    from tilestack.perf.metrics import Measurement
    return Measurement(name=f"case-{i}", config={"i": i, "pad": PAD}, device="cpu: test", dtype="float32",
                       latency_s=1e-3 * (i + 1), flops=1e6, bytes_read=1e3, bytes_written=1e3, device_kind="cpu")


def tune(target: str):
    from tilestack.tune.cache import ConfigCache
    from tilestack.tune.devices import DeviceKey
    dev = DeviceKey.parse("sm90-132sm-227kb", name="NVIDIA H200")
    cache = ConfigCache(Path(target), tables_dir=None)
    i = 0
    while True:
        cache.put("gemm", f"killed-{i}", dev, 1024, {"BM": 64, "pad": PAD * 16}, options={}, seconds=1e-3)
        i += 1
        yield i


def store(target: str):
    from tilestack.perf.store import Store
    st = Store(target)
    run = st.start_run(device="cpu: test", label="faults", command="faults", versions={})
    print(run, flush=True)
    i = 0
    while True:
        st.append(run, measurement(i))
        i += 1
        yield i


def record(target: str):
    from tilestack.bench.record import Record
    rows = []
    i = 0
    while True:
        rows.append(measurement(i))
        Record("cpu: test", list(rows), started_at=f"t{i}").write(target)
        i += 1
        yield i


def measure(target: str):
    from tilestack import config
    from tilestack.compile import measure as m
    with config.override(cache_dir=Path(target)):
        i = 0
        while True:
            m._store(f"linear_epilogue|killed-{i}|{PAD * 8}", {"fused_s": 1e-6 * (i + 1), "unfused_s": 2e-6,
                                                                 "device": "test"})
            i += 1
            yield i


def federated(target: str):
    import numpy as np

    from tilestack.federated.driver import save_checkpoint
    i = 0
    while True:
        i += 1
        save_checkpoint(Path(target), {"round": i, "arrays": np.full(1 << 17, float(i)), "strategy": {},
                                       "history": list(range(i))})
        yield i


if __name__ == "__main__":
    what, target = sys.argv[1:3]
    for committed in {"tune": tune, "store": store, "record": record, "measure": measure,
                      "federated": federated}[what](target):
        print(committed, flush=True)
