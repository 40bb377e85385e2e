"""Worker processes for tests/test_faults_round6.py: each is run as ``python _faults_workers_round6.py MODE ARGS``.

    hold-lock DB SECONDS   take the write lock of the SQLite file DB (BEGIN EXCLUSIVE), print "locked", hold it
    start-run DB           open DB as a result store and start a run; print "started <id>" or "error <message>"
    fill DB                a store of bench runs: two devices, no case in common, and one run of profile rows
    resolve KERNEL SIG N   the tuned config a launch on an H200 looks up (TILESTACK_CACHE_DIR's tables over the
                           shipped ones), printed as JSON, each warning as a line "warning <message>"
"""

from __future__ import annotations

import sqlite3
import sys
import time


def hold_lock(db: str, seconds: str) -> None:
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    time.sleep(float(seconds))
    con.execute("ROLLBACK")


def start_run(db: str) -> None:
    from tilestack.perf.store import Store, StoreError

    t0 = time.monotonic()
    try:
        with Store(db) as st:
            print(f"started {st.start_run(device='cpu', label='late')} {time.monotonic() - t0:.1f}", flush=True)
    except StoreError as e:
        print(f"error {time.monotonic() - t0:.1f} {e}", flush=True)


def _bench_row(case: str, role: str, device: str, latency_s: float):
    """One result as ``tilestack bench`` stores it: its case, role (tilestack or baseline) and shape in the config."""
    from tilestack.perf.metrics import Measurement

    return Measurement(name=f"{role}.{case}", config={"case": case, "role": role, "shape": "64x64"}, device=device,
                       dtype="float32", latency_s=latency_s, flops=2 * 64**3, bytes_read=2 * 64 * 64 * 4,
                       bytes_written=64 * 64 * 4, device_kind="cuda" if "NVIDIA" in device else "cpu")


def fill(db: str) -> None:
    from tilestack.bench.record import BENCH_COMMAND
    from tilestack.perf.metrics import Measurement
    from tilestack.perf.store import Store

    with Store(db) as st:
        gpu = st.start_run(device="NVIDIA H100 80GB HBM3", label="on-gpu", command=BENCH_COMMAND)
        st.append(gpu, _bench_row("gemm", "tilestack", "NVIDIA H100 80GB HBM3", 1e-5))
        st.append(gpu, _bench_row("gemm", "baseline", "NVIDIA H100 80GB HBM3", 2e-5))
        cpu = st.start_run(device="cpu", label="on-cpu", command=BENCH_COMMAND)
        st.append(cpu, _bench_row("softmax", "tilestack", "cpu", 3e-3))
        st.append(cpu, _bench_row("softmax", "baseline", "cpu", 1e-3))
        prof = st.start_run(device="cpu", label="a-profile", command="tilestack profile")
        st.append(prof, Measurement(name="aten::mm", config={"model": "mlp", "step": "fwd", "shapes": "[[8, 8]]"},
                                    device="cpu", dtype="float32", latency_s=1e-4, flops=1024, bytes_read=512,
                                    bytes_written=256, device_kind="cpu"))
    print("filled", flush=True)


def resolve(kernel: str, signature: str, n: str) -> None:
    import json
    import warnings

    from tilestack.tune.devices import DeviceKey
    from tilestack.tune.lookup import resolve

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = resolve(kernel, signature, DeviceKey.parse("sm90-132sm-227kb", name="NVIDIA H200"), int(n))
    for w in caught:
        print(f"warning {w.message}")
    print(json.dumps(cfg, sort_keys=True))


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"hold-lock": hold_lock, "start-run": start_run, "fill": fill, "resolve": resolve}[mode](*args)
