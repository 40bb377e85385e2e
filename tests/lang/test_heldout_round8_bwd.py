"""Round 8 of held-out kernels, the attention backward (see test_heldout_round8.py's docstring): FlashAttention-2's
backward in the tile language, one program per key block walking the query blocks (from the diagonal's block when
causal): p recomputed from the forward's logsumexp, dV += p^T dO, dS = p (dO V^T - delta), dK += dS^T Q, and dQ += dS K
added atomically across the key blocks. Checked against float64 autograd on the reference executor and Triton's
interpreter (16-bit operands round p and dS before their products, as the GPU kernel does), then compiled for sm_90a.
"""

import math

import pytest
import torch
from heldout_support import BACKENDS, BF, F16, close, launch, meta, randn
from sm90a_compile import check_triton_sm90a

import tilestack.lang as ts

POISON = -77.0


@ts.kernel(grid=lambda K, BN: (ts.cdiv(K.shape[1], BN), K.shape[0]))
def attention_bwd(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, scale: float, *, CAUSAL: bool = False, BM: int = 16,
                  BN: int = 16, D: int = 16):
    """Q, K, V, DO (BH, T, D); LSE (BH, T) the forward's row logsumexp of the scaled (masked) scores, DELTA (BH, T)
    the rows of dO * O summed; DQ (BH, T, D) f32, zeroed, added into atomically; DK, DV written whole."""
    j, bh = ts.block_id(0), ts.block_id(1)
    T = Q.shape[1]
    k = ts.RegTile[K.dtype, BN, D]()
    v = ts.RegTile[K.dtype, BN, D]()
    q = ts.RegTile[Q.dtype, BM, D]()
    do = ts.RegTile[Q.dtype, BM, D]()
    s = ts.RegTile[ts.f32, BM, BN]()
    dp = ts.RegTile[ts.f32, BM, BN]()
    p16 = ts.RegTile[Q.dtype, BM, BN]()
    lse = ts.RegVec[ts.f32, BM]()
    delta = ts.RegVec[ts.f32, BM]()
    dk = ts.RegTile[ts.f32, BN, D]()
    dv = ts.RegTile[ts.f32, BN, D]()
    dq = ts.RegTile[ts.f32, BM, D]()
    out = ts.RegTile[DK.dtype, BN, D]()
    ts.load(k, K, at=(bh, j, 0))
    ts.load(v, V, at=(bh, j, 0))
    ts.zero(dk)
    ts.zero(dv)
    start = j * BN // BM if CAUSAL else 0             # query blocks above the diagonal see none of these keys
    for i in ts.range(start, ts.cdiv(T, BM)):
        ts.load(q, Q, at=(bh, i, 0))
        ts.load(do, DO, at=(bh, i, 0))
        ts.load(lse, LSE, at=(bh, i))
        ts.load(delta, DELTA, at=(bh, i))
        ts.zero(s)
        ts.mma_ABt(s, q, k, s)
        ts.mul(s, s, scale)
        ts.right_fill(s, s, T - j * BN, -math.inf)    # keys past T
        if CAUSAL:
            ts.make_causal(s, s, i * BM - j * BN)
        ts.sub(s, s, ts.per_row(lse))
        ts.exp(s, s)                                  # p
        ts.copy(p16, s)
        ts.mma_AtB(dv, p16, do, dv)
        ts.zero(dp)
        ts.mma_ABt(dp, do, v, dp)
        ts.sub(dp, dp, ts.per_row(delta))
        ts.mul(s, s, dp)
        ts.mul(s, s, scale)                           # dS, scaled for the products with Q and K
        ts.copy(p16, s)
        ts.mma_AtB(dk, p16, q, dk)
        ts.zero(dq)
        ts.mma_AB(dq, p16, k, dq)
        ts.atomic_add(DQ, dq, at=(bh, i, 0))
    ts.copy(out, dk)
    ts.store(DK, out, at=(bh, j, 0))
    ts.copy(out, dv)
    ts.store(DV, out, at=(bh, j, 0))


def forward64(q, k, v, scale, causal):
    s = q.double() @ k.double().transpose(1, 2) * scale
    if causal:
        T = q.shape[1]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    return s, s.softmax(-1) @ v.double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F16, BF])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("BH", "T", "Dh", "BM", "BN"), [(2, 37, 16, 16, 16), (1, 16, 12, 16, 16), (2, 1, 16, 16, 16),
                                                         (1, 45, 16, 16, 32), (1, 0, 16, 16, 16), (1, 21, 8, 8, 8)])
def test_attention_backward(backend, dtype, causal, BH, T, Dh, BM, BN, rng):
    """BN = 2 BM (a key block spans two query blocks: the causal start is a floor division) and 8-row blocks with an
    8-wide head (every product under 16: Triton's broadcast sums)."""
    scale = Dh ** -0.5
    q, k, v, do = (randn(rng, BH, T, Dh, dtype=dtype) for _ in range(4))
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    s, o = forward64(qd, kd, vd, scale, causal)
    o.backward(do.double())
    lse = s.detach().logsumexp(-1).float()
    delta = (do.double() * o.detach()).sum(-1).float()
    dq = torch.zeros(BH, T, Dh)
    dk, dv = torch.full((BH, T, Dh), POISON, dtype=dtype), torch.full((BH, T, Dh), POISON, dtype=dtype)
    launch(attention_bwd, backend, q, k, v, do, lse, delta, dq, dk, dv, scale, CAUSAL=causal, BM=BM, BN=BN,
           D=max(Dh, 8) if Dh <= 8 else 16)
    grow = 1 if dtype == torch.float32 else 4
    close(dq, qd.grad.float(), dtype, scale=grow * (T + 1) ** 0.5)
    close(dk, kd.grad.to(dtype), scale=grow * (T + 1) ** 0.5)
    close(dv, vd.grad.to(dtype), scale=grow * (T + 1) ** 0.5)


def test_compiles_for_sm90a_with_triton():
    check_triton_sm90a(attention_bwd, (*(meta(64, 4096, 64, dtype=BF),) * 4, meta(64, 4096), meta(64, 4096),
                                       meta(64, 4096, 64), *(meta(64, 4096, 64, dtype=BF),) * 2, 0.125),
                       dict(CAUSAL=True, BM=64, BN=64, D=64))
