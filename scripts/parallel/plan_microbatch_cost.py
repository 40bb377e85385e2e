"""docs/planner.md, Session 16: one process, one thread: forward and backward of gpt 4x64 at batch 4 once against
batch 2 twice (and 8 once against 1 four times), medians in ms.

    PYTHONPATH=src python3 scripts/parallel/plan_microbatch_cost.py
"""
import statistics
import time

import torch

from tilestack.parallel import GPT, ModelConfig, lm_loss, make_batch

torch.set_num_threads(1)
cfg = ModelConfig(n_layer=4, d=64, n_head=4, vocab=256, max_seq=64)
m = GPT(cfg, seed=0)
def step(b, reps):
    ts=[]
    for i in range(30):
        t0=time.perf_counter()
        for _ in range(reps):
            idx, t = make_batch(cfg, b, 64, seed=i)
            loss = lm_loss(m(idx), t)
            loss.backward()
        ts.append(time.perf_counter()-t0)
    return statistics.median(ts[5:])*1e3
for _ in range(2):
    print("b4 x1", round(step(4, 1), 2), "b2 x2", round(step(2, 2), 2), "b8 x1", round(step(8, 1), 2),
          "b1 x4", round(step(1, 4), 2))
