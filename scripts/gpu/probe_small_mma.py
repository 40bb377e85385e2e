"""On a GPU: a product whose inner dim is below tl.dot's 16 (the Triton backend's broadcast-sum path) against float64,
for inner dims 1-16, the B operand loaded from an f16 or a u8 global into an f16 tile, A made in registers (a where)
or loaded: what round 21's W8A16 GEMM (wrong on an H100 at a group tile below 16) needs isolated."""
import os

import torch

import tilestack.backends.triton.launch as triton_launch
import tilestack.lang as ts

if os.environ.get("NO_TMA"):          # pointers everywhere: whether the copy engine is what goes wrong
    triton_launch._tma_capability = False


@ts.kernel(grid=lambda A, B: (1,))
def small_mma(A, B, C, *, BM: int = 16, BK: int = 4, BN: int = 16, MAKE_A: bool = False):
    a = ts.RegTile[ts.f16, BM, BK]()
    b = ts.SharedTile[ts.f16, BK, BN]()
    acc = ts.RegTile[ts.f32, BM, BN]()
    ts.zero(acc)
    if MAKE_A:
        rows, cols = ts.RegVec[ts.i32, BM](), ts.RegVec[ts.i32, BK]()
        ts.arange(rows, 0)
        ts.arange(cols, 0)
        pick = ts.RegTile[ts.bool_, BM, BK]()
        ts.eq(pick, ts.per_row(rows), ts.per_col(cols))       # a[i, k] = 1 where k == i % ... (identity block)
        ts.where(a, pick, 1.0, 0.0)
    else:
        ts.load(a, A, at=(0, 0))
    ts.load(b, B, at=(0, 0))
    ts.mma_AB(acc, a, b, acc)
    ts.store(C, acc, at=(0, 0))


for bk in (1, 2, 4, 8, 16):
    for bdt in (torch.float16, torch.uint8):
        for make_a in (False, True):
            g = torch.Generator().manual_seed(bk)
            a = torch.randn(16, bk, generator=g).half()
            if make_a:
                a = (torch.arange(16)[:, None] == torch.arange(bk)[None, :]).half()
            b = torch.randint(0, 200, (bk, 16), generator=g).to(bdt)
            c = torch.full((16, 16), float("nan"), device="cuda")
            small_mma(a.cuda(), b.cuda(), c, BK=bk, MAKE_A=make_a, backend="triton")
            want = a.double() @ b.double()
            err = (c.cpu().double() - want).abs().max().item()
            print(f"BK={bk:2d} B {str(bdt)[6:]:8s} A {'made' if make_a else 'loaded'}: max err {err:.3g}", flush=True)
