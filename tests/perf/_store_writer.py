"""Helper run as a subprocess by test_store: appends results forever, until killed."""

import sys
import time

from tilestack.perf.metrics import compute_metrics
from tilestack.perf.store import Store

st = Store(sys.argv[1])
run = st.start_run(device="writer-device", versions={"python": "test"})
i = 0
while True:
    m = compute_metrics(name=f"k{i}", latency_s=1e-3, flops=1e9, bytes_read=1e6, bytes_written=1e6,
                        device="writer-device", config={"i": i})
    st.append(run, m)
    print(i, flush=True)
    i += 1
    time.sleep(0.001)
