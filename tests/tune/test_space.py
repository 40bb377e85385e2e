"""SearchSpace: the kernel's declared tunables times the backend's launch options, validated narrowing, and the
shared-memory filter (the IR's shared footprint, with num_stages copies of the tiles loaded in a loop) at the
device's limit, checked against the footprint worked out by hand."""

import pytest
import torch

import tilestack.lang as ts
from tilestack.backends import get_backend
from tilestack.errors import TunableError
from tilestack.kernels import attention_fwd_kernel, gemm_kernel
from tilestack.tune import SearchSpace
from tilestack.tune.devices import HOPPER, DeviceKey

SEARCH = get_backend("triton").search_domains()       # Triton's num_warps and num_stages, as the tuner tries them

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


def test_domains_are_the_kernels_tunables_times_the_backends_options():
    assert set(gemm_kernel.tunables) == {"BM", "BN", "BK", "GROUP_M"}      # the kernel declares only its own
    space = SearchSpace(gemm_kernel)
    doms = space.domains()
    assert {n: doms[n] for n in gemm_kernel.tunables} == {n: t.domain for n, t in gemm_kernel.tunables.items()}
    assert set(doms) == {"BM", "BN", "BK", "GROUP_M", "num_warps", "num_stages"}
    # the backend's values, plus the kernel's own default (gemm: 8 warps, 3 stages) to start from
    assert set(doms["num_warps"]) == {*SEARCH["num_warps"], gemm_kernel.options["num_warps"]}
    assert set(doms["num_stages"]) == {*SEARCH["num_stages"], gemm_kernel.options["num_stages"]}
    assert space.defaults() == dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3)
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
    (dict(BLOCK=(64,)), r"'BLOCK' is not a tunable of gemm_kernel; its tunables are \['BK', 'BM', 'BN', "
                        r"'GROUP_M'\] and triton's options \['num_stages', 'num_warps'\]"),
    (dict(D=(64,)), r"'D' is not a tunable"),
    (dict(BM=(32, 48, 512)), r"BM=\[48, 512\] is outside the declared domain \(16, 32, 64, 128, 256\)"),
    (dict(num_warps=(4, 6)), r"num_warps=\[4, 6\] for gemm_kernel: triton: num_warps=6; expected a power of two"),
    (dict(num_stages=(0,)), r"num_stages=\[0\] for gemm_kernel: triton: num_stages=0; expected a positive int"),
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
    kept = space.configs(args)          # no GPU here: Hopper's 227 KiB
    assert kept == [c for c in space.all_configs() if attention_shared(c, D) <= HOPPER.shared_bytes]
    assert len(kept) < len(space.all_configs())
    big = dict(BM=128, BN=128, num_warps=8, num_stages=4)
    assert space.shared_bytes(args, big) == attention_shared(big, D) > HOPPER.shared_bytes
    assert big not in kept


def test_the_limit_is_the_devices():
    """The shared memory per block comes from the device the space is for (an Ampere A100 opts in to 163 KiB,
    a consumer Ada GPU to 99 KiB), not a constant."""
    restrict = dict(BM=(64, 128), BN=(32, 64, 128), num_warps=(8,), num_stages=(1, 2, 3, 4))
    args = attention_args(128)
    kept = {}
    for name, key in (("hopper", HOPPER), ("a100", DeviceKey(8, 0, 108, 163)), ("ada", DeviceKey(8, 9, 128, 99))):
        space = SearchSpace(attention_fwd_kernel, fixed=dict(D=128, causal=True), restrict=restrict, device=key)
        assert space.limits()[0] == key.shared_bytes
        kept[name] = space.configs(args)
        assert kept[name] == [c for c in space.all_configs() if attention_shared(c, 128) <= key.shared_bytes]
    assert len(kept["ada"]) < len(kept["a100"]) < len(kept["hopper"])
    assert SearchSpace(gemm_kernel).limits() == (HOPPER.shared_bytes, HOPPER.register_tile_bytes)   # no GPU


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


def test_split_parts_a_config_as_a_table_stores_it():
    space = SearchSpace(gemm_kernel)
    cfg = dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=4)
    assert space.split(cfg) == (dict(BM=128, BN=256, BK=64, GROUP_M=8), dict(num_warps=8, num_stages=4))


@ts.kernel(grid=lambda X: (ts.cdiv(X.shape[0], 16),))
def legacy_kernel(X, Y, *, BM: int = ts.tunable(16, (16,)), num_warps: int = ts.tunable(4, (2, 4)),
                  num_stages: int = ts.tunable(1, (1, 2))):
    """A kernel written before launch options left the signature: it declares them as its tunables."""
    x = ts.RegTile[ts.f32, 16, 16]()
    ts.load(x, X, at=(ts.block_id(0), 0))
    ts.store(Y, x, at=(ts.block_id(0), 0))


def test_a_kernel_declaring_launch_options_keeps_its_domains():
    space = SearchSpace(legacy_kernel, restrict=dict(num_stages=(2,)))
    assert space.domains() == dict(BM=(16,), num_warps=(2, 4), num_stages=(2,))
    assert space.all_configs() == [dict(BM=16, num_warps=2, num_stages=2), dict(BM=16, num_warps=4, num_stages=2)]
    assert space.defaults() == dict(BM=16, num_warps=4, num_stages=1)
    assert space.split(dict(BM=16, num_warps=4, num_stages=1)) == (dict(BM=16), dict(num_warps=4, num_stages=1))
    with pytest.raises(TunableError, match=r"num_warps=\[8\] is outside the declared domain \(2, 4\)"):
        SearchSpace(legacy_kernel, restrict=dict(num_warps=(8,)))
    x = torch.randn(32, 16)
    assert len(space.configs((x, torch.empty_like(x)))) == 2
