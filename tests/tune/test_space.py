"""SearchSpace: domains from a kernel's declared tunables, validated narrowing, and the shared-memory filter
(the IR's shared footprint, with num_stages copies of the tiles loaded in a loop), checked against the
footprint worked out by hand."""

import pytest
import torch

from tilestack.errors import TunableError
from tilestack.kernels import attention_fwd_kernel, gemm_kernel
from tilestack.tune import SearchSpace
from tilestack.tune.space import H100_SHARED_BYTES

BF16 = 2


def gemm_args():
    a = torch.empty(64, 48, dtype=torch.bfloat16)
    b = torch.empty(48, 80, dtype=torch.bfloat16)
    return a, b, torch.empty(64, 80, dtype=torch.bfloat16)


def gemm_shared(cfg) -> int:
    """gemm_kernel declares two shared tiles, A (BM, BK) and B (BK, BN), each copied per pipeline stage."""
    return (cfg["BM"] * cfg["BK"] + cfg["BK"] * cfg["BN"]) * BF16 * cfg["num_stages"]


def attention_args(D):
    q = torch.empty(1, 2, 40, D, dtype=torch.bfloat16)
    k = torch.empty(1, 1, 40, D, dtype=torch.bfloat16)
    return q, k, k.clone(), torch.empty_like(q), torch.empty(1, 2, 40), 0.125


def attention_shared(cfg, D) -> int:
    """q (BM, D) loaded once before the key loop; k and v (BN, D) loaded in it, one copy per stage."""
    return (cfg["BM"] + 2 * cfg["BN"] * cfg["num_stages"]) * D * BF16


def test_domains_are_the_declared_ones():
    space = SearchSpace(gemm_kernel)
    assert space.domains() == {n: t.domain for n, t in gemm_kernel.tunables.items()}
    assert set(space.domains()) == {"BM", "BN", "BK", "GROUP_M", "num_warps", "num_stages"}
    n = 1
    for dom in space.domains().values():
        n *= len(dom)
    configs = space.all_configs()
    assert len(configs) == n
    assert len({tuple(sorted(c.items())) for c in configs}) == n          # no duplicates


def test_restrict_narrows_the_domains():
    space = SearchSpace(gemm_kernel, restrict=dict(BM=(32, 64), num_stages=(2,)))
    doms = space.domains()
    assert doms["BM"] == (32, 64) and doms["num_stages"] == (2,)
    assert doms["BN"] == gemm_kernel.tunables["BN"].domain
    assert {c["BM"] for c in space.all_configs()} == {32, 64}
    assert {c["num_stages"] for c in space.all_configs()} == {2}


@pytest.mark.parametrize("restrict,message", [
    (dict(BLOCK=(64,)), r"'BLOCK' is not a tunable of gemm_kernel; its tunables are \['BK', 'BM', 'BN'"),
    (dict(D=(64,)), r"'D' is not a tunable"),
    (dict(BM=(32, 48, 512)), r"BM=\[48, 512\] is outside the declared domain \(16, 32, 64, 128, 256\)"),
    (dict(num_warps=(16,)), r"num_warps=\[16\] is outside the declared domain"),
])
def test_restrict_is_validated(restrict, message):
    kernel = attention_fwd_kernel if "D" in restrict else gemm_kernel
    with pytest.raises(TunableError, match=message):
        SearchSpace(kernel, restrict=restrict)


def test_shared_bytes_is_the_ir_footprint_times_stages():
    space = SearchSpace(gemm_kernel, restrict=dict(BM=(32, 128), BN=(16, 64), BK=(16, 64), GROUP_M=(4,),
                                                   num_warps=(4,), num_stages=(1, 3)))
    args = gemm_args()
    for cfg in space.all_configs():
        assert space.shared_bytes(args, cfg) == gemm_shared(cfg), cfg


@pytest.mark.parametrize("limit", [8 * 1024, 24 * 1024, 64 * 1024])
def test_shared_memory_filter_gemm(limit):
    space = SearchSpace(gemm_kernel, restrict=dict(BM=(32, 64, 128), BN=(32, 128), BK=(32, 64), GROUP_M=(4,),
                                                   num_warps=(4,), num_stages=(1, 2, 4)))
    kept = space.configs(gemm_args(), shared_limit=limit)
    want = [c for c in space.all_configs() if gemm_shared(c) <= limit]
    dropped = [c for c in space.all_configs() if gemm_shared(c) > limit]
    assert kept == want
    assert kept and dropped, "the limit should split this space"


@pytest.mark.parametrize("D", (128, 256))
def test_shared_memory_filter_attention(D):
    space = SearchSpace(attention_fwd_kernel, fixed=dict(D=D, causal=True),
                        restrict=dict(BM=(64, 128), BN=(32, 64, 128), num_warps=(8,), num_stages=(1, 2, 3, 4)))
    args = attention_args(D)
    kept = space.configs(args)          # the H100's 227 KiB
    assert kept == [c for c in space.all_configs() if attention_shared(c, D) <= H100_SHARED_BYTES]
    assert len(kept) < len(space.all_configs())
    big = dict(BM=128, BN=128, num_warps=8, num_stages=4)
    assert space.shared_bytes(args, big) == attention_shared(big, D) > H100_SHARED_BYTES
    assert big not in kept


def test_nothing_fits_gives_an_empty_list():
    space = SearchSpace(gemm_kernel, restrict=dict(BM=(64,), BN=(64,), BK=(64,), GROUP_M=(4,), num_warps=(4,),
                                                   num_stages=(1,)))
    assert space.configs(gemm_args(), shared_limit=1024) == []


def test_tiles_loaded_before_the_loop_are_not_pipelined():
    """attention_bwd_dq_kernel loads Q and dO once, K and V per key block: only K and V count num_stages times
    (the H100-tuned table holds BM=128, BN=64, 3 stages at D=128: 160 KiB, not 3 x 96 KiB)."""
    from tilestack.kernels.attention_bwd import attention_bwd_dq_kernel

    D = 128
    q, kv, rows = torch.empty(1, 2, 64, D, dtype=torch.bfloat16), torch.empty(1, 1, 64, D, dtype=torch.bfloat16), \
        torch.empty(1, 2, 64)
    args = (q, kv, kv, q, rows, rows, torch.empty_like(q), 0.1)
    space = SearchSpace(attention_bwd_dq_kernel, fixed=dict(D=D))
    for stages in (1, 2, 3, 4):
        cfg = dict(BM=128, BN=64, num_warps=8, num_stages=stages)
        assert space.shared_bytes(args, cfg) == (2 * 128 + stages * 2 * 64) * D * BF16
    assert dict(BM=128, BN=64, num_warps=8, num_stages=3) in space.configs(args)
    assert dict(BM=128, BN=128, num_warps=8, num_stages=4) not in space.configs(args)
