"""Activation memory per layer with and without recompute, measured, against Korthikanti et al.

    PYTHONPATH=src python3 scripts/parallel/activation_memory.py                     # H200: bf16, s=2048, h=2048
    PYTHONPATH=src python3 scripts/parallel/activation_memory.py --device cpu --dtype float32 --seq 128 --d 128

Per layer = (model of 2 layers) - (model of 1 layer), so embeddings, head and loss cancel. Two measurements:
``saved``: the bytes autograd keeps for backward (tilestack.parallel.memory.saved_activation_bytes); ``allocated``
(CUDA only): torch.cuda.memory_allocated() after forward minus before. Formula: s b h (32 + 2 a s / h) bytes in
16-bit, 32 s b h with selective recompute, 2 s b h with full (this model has no dropout; with dropout the paper's
34 + 5 a s / h). ``--attention sdpa`` (flash on a GPU) never stores the scores: its no-recompute row should then
sit near the selective formula.
"""

from __future__ import annotations

import argparse

import torch

from tilestack.parallel import GPT, ModelConfig, apply_recompute, lm_loss, make_batch
from tilestack.parallel.memory import korthikanti_bytes, saved_activation_bytes


def measure(cfg: ModelConfig, policy: str, batch: int, seq: int, device: str, dtype) -> tuple[int, int | None]:
    model = GPT(cfg, seed=0).to(device=device, dtype=dtype)
    apply_recompute(model, policy)
    idx, targets = (t.to(device) for t in make_batch(cfg, batch, seq))
    saved = saved_activation_bytes(lambda: lm_loss(model(idx), targets), list(model.parameters()))
    allocated = None
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = lm_loss(model(idx), targets)
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated() - before
        loss.backward()
    return saved, allocated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--attention", default="math", choices=("math", "sdpa"))
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    elem = torch.tensor([], dtype=dtype).element_size()
    print(f"s={a.seq} b={a.batch} h={a.d} a={a.heads} {a.dtype} attention={a.attention}; bytes per layer")
    print(f"{'recompute':<11}{'saved MiB':>11}{'alloc MiB':>11}{'formula MiB':>13}{'saved/formula':>15}")
    for policy in ("none", "selective", "full"):
        per = []
        for n_layer in (1, 2):
            cfg = ModelConfig(n_layer=n_layer, d=a.d, n_head=a.heads, vocab=256, max_seq=a.seq,
                              attention=a.attention)
            per.append(measure(cfg, policy, a.batch, a.seq, a.device, dtype))
        saved = per[1][0] - per[0][0]
        alloc = per[1][1] - per[0][1] if per[0][1] is not None else None
        f = korthikanti_bytes(s=a.seq, b=a.batch, h=a.d, a=a.heads, policy=policy, dropout=False,
                              bytes_per_element=elem)
        alloc_s = f"{alloc / 2**20:>11.1f}" if alloc is not None else f"{'-':>11}"
        print(f"{policy:<11}{saved / 2**20:>11.1f}{alloc_s}{f / 2**20:>13.1f}{saved / f:>15.3f}")


if __name__ == "__main__":
    main()
