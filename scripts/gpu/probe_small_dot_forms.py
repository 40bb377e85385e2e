"""On a GPU, raw Triton: forms of a (16, K) @ (K, 16) product with K below tl.dot's 16, against float64, to find one
Triton 3.6 compiles right (the backend's broadcast-sum over axis 1 is wrong on an H100 for K <= 4 in f16)."""
import torch
import triton
import triton.language as tl


@triton.jit
def prod(A, B, C, K: tl.constexpr, FORM: tl.constexpr):
    m = tl.arange(0, 16)
    k = tl.arange(0, K)
    a = tl.load(A + m[:, None] * K + k[None, :]).to(tl.float32)
    b = tl.load(B + k[:, None] * 16 + m[None, :]).to(tl.float32)
    if FORM == 0:       # the backend's form: reduce the middle axis
        c = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    elif FORM == 1:     # reduce the last axis (B transposed)
        c = tl.sum(a[:, None, :] * tl.trans(b)[None, :, :], axis=2)
    elif FORM == 2:     # one outer product per k, its column and row picked by a masked sum
        c = tl.zeros((16, 16), tl.float32)
        for i in tl.static_range(K):
            col = tl.sum(tl.where(k[None, :] == i, a, 0.0), axis=1)
            row = tl.sum(tl.where(k[:, None] == i, b, 0.0), axis=0)
            c += col[:, None] * row[None, :]
    else:               # tl.dot on operands widened to 16 (each column repeated 16 / K times, B's rows scaled)
        r: tl.constexpr = 16 // K
        aw = tl.reshape(tl.broadcast_to(a[:, :, None], (16, K, r)), (16, 16))
        bw = tl.reshape(tl.broadcast_to(b[:, None, :], (K, r, 16)), (16, 16)) * (1.0 / r)
        c = tl.dot(aw, bw, input_precision="ieee")
    tl.store(C + m[:, None] * 16 + m[None, :], c)


for K in (1, 2, 4, 8):
    a = torch.randn(16, K, device="cuda").half()
    b = torch.randint(0, 200, (K, 16), device="cuda").half()
    want = a.double() @ b.double()
    out = []
    for form in range(4):
        c = torch.full((16, 16), float("nan"), device="cuda")
        try:
            prod[(1,)](a, b, c, K, form)
            out.append(f"{(c.double() - want).abs().max().item():.3g}")
        except Exception as e:  # noqa: BLE001
            out.append(type(e).__name__)
    print(f"K={K}: middle-sum {out[0]}  last-sum {out[1]}  outer-loop {out[2]}  widened-dot {out[3]}", flush=True)
