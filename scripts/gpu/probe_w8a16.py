"""On a GPU: round 21's act-order W8A16 GEMM (tests/lang/test_heldout_round21.py) on the Triton backend compiled for
the GPU against float64, with variants that isolate what differs: u8 zero points and codes given as f16, the group
tile at 16 (the CPU tests run it under Triton's interpreter, where it was right; below a group tile of 16 the GPU
was wrong until the small-product fix of codegen._e_mma)."""
import math
import pathlib
import sys

import numpy as np
import torch

sys.path[:0] = [str(pathlib.Path(__file__).resolve().parents[2] / "tests" / "lang")]
from test_heldout_round21 import w8a16_act_order  # noqa: E402

from tilestack import config  # noqa: E402


def run(a, qw, s, z, g, BG):
    c = torch.full((a.shape[0], qw.shape[1]), float("nan"), dtype=a.dtype, device="cuda")
    with config.override(triton_interpret=False):
        w8a16_act_order(*(t.cuda() for t in (a, qw, s, z, g)), c, backend="triton", BG=BG)
    return c.cpu().double()


rng = np.random.default_rng(0)
for M, K, N, gs in [(5, 70, 37, 32), (1, 128, 48, 16), (33, 20, 16, 20), (64, 256, 64, 16)]:
    G = -(-K // gs)
    g = (torch.from_numpy(rng.permutation(K)) // gs).to(torch.int32)
    qw = torch.from_numpy(rng.integers(0, 256, (K, N))).to(torch.uint8)
    z = torch.from_numpy(rng.integers(100, 156, (G, N))).to(torch.uint8)
    s = (torch.from_numpy(rng.random((G, N))) * 0.02 + 1e-3).half()
    a = torch.from_numpy(rng.standard_normal((M, K))).half()
    want = a.double() @ ((qw.double() - z.double()[g.long()]) * s.double()[g.long()]).half().double()
    BG = min(16, 2 ** max(0, (G - 1).bit_length()))
    for name, args, bg in [("orig", (a, qw, s, z, g), BG), ("z f16", (a, qw, s, z.half(), g), BG),
                           ("qw f16", (a, qw.half(), s, z, g), BG), ("both f16", (a, qw.half(), s, z.half(), g), BG),
                           ("BG16", (a, qw, s, z, g), 16)]:
        err = (run(*args, bg) - want).abs().max().item() / math.sqrt(K)
        print(f"M={M} K={K} N={N} G={G} {name:9s} gpu error / sqrt(K) {err:9.2e}", flush=True)
