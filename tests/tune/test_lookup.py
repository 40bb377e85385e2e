"""launch_config: the tuned config for a CUDA device found by its key (here from fake device properties: no GPU
needed), the nearest device of the same architecture as the fallback (logged once), defaults elsewhere; one
dictionary lookup once resolved; fp16 borrowing bf16's table and back."""

import logging
from types import SimpleNamespace

import pytest
import torch

from tilestack import config
from tilestack.tune import ConfigCache, cache, lookup
from tilestack.tune.cache import key
from tilestack.tune.devices import DeviceKey, device_key

DEFAULT = dict(BM=16, BN=16, num_warps=4, num_stages=1)
SIG = "bfloat16-D128-causal"
CUDA = torch.device("cuda", 0)
H100_TABLE = DeviceKey(9, 0, 132, 227, name="NVIDIA H100 80GB HBM3")


def props(name, major=9, minor=0, sms=132, optin=232448, memory=150_011_035_648):
    return SimpleNamespace(name=name, major=major, minor=minor, multi_processor_count=sms,
                           shared_memory_per_block_optin=optin, total_memory=memory)


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """Pretend CUDA device 0 has the given properties; an empty user cache."""
    def use(p):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: p)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        lookup.reload()
    with config.override(cache_dir=tmp_path / "cache"):
        yield use
    lookup.reload()


def shipped(kernel, sig, bucket, device=H100_TABLE, backend="triton"):
    """What the shipped tables of ``device``'s key hold for it (its own GPU's table first), on ``backend`` (as
    ``launch_config`` asks by default): an entry another backend won keeps this one's best under "others"."""
    entry = ConfigCache(tables_dir=cache.TABLES).view(device)[key(kernel, sig, bucket)]
    if entry.get("backend", "triton") != backend and backend in entry.get("others", {}):
        entry = entry["others"][backend]
    return cache.launch_kwargs(entry)


@pytest.mark.parametrize("name", ["NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA H800"])
def test_a_132_sm_hopper_reads_the_tables_of_its_key(gpu, caplog, name):
    """The H100 SXM, the H200 and the H800 have the same SMs and shared memory: one key, one set of tables
    (each GPU's own name first where two tables of the key hold an entry)."""
    gpu(props(name))
    me = DeviceKey(9, 0, 132, 227, name=name, memory_gb=139.7)
    with caplog.at_level(logging.WARNING, logger="tilestack.tune.lookup"):
        got = lookup.launch_config("attention_fwd", SIG, CUDA, 3000, DEFAULT | {"extra": 1})
        gemm = lookup.launch_config("gemm", "bfloat16", "cuda", 4096, {})
    assert got == DEFAULT | {"extra": 1} | shipped("attention_fwd", SIG, 4096, me)
    assert gemm == shipped("gemm", "bfloat16", 4096, me) and gemm["BN"] in (128, 256)
    assert not caplog.records                                   # an exact key: no fallback to report


def test_the_h100_and_the_h200_each_prefer_their_own_table(gpu):
    got = {}
    for name in ("NVIDIA H200", "NVIDIA H100 80GB HBM3"):
        gpu(props(name))
        got[name] = lookup.launch_config("gemm", "bfloat16", CUDA, 8192, {})
    h100 = ConfigCache(tables_dir=cache.TABLES)
    by_name = {t.device.name: t.entries.get(key("gemm", "bfloat16", 8192)) for t in h100.tables_for(H100_TABLE)}
    for name, cfg in got.items():
        if by_name.get(name):
            assert cfg == cache.launch_kwargs(by_name[name]), name


def test_another_hopper_falls_back_to_the_nearest_device_once(gpu, caplog):
    gpu(props("NVIDIA H100 PCIe", sms=114, memory=85_520_809_984))
    with caplog.at_level(logging.WARNING, logger="tilestack.tune.lookup"):
        for n in (1000, 3000, 3000, 9000):
            got = lookup.launch_config("attention_fwd", SIG, CUDA, n, DEFAULT)
            assert got == DEFAULT | shipped("attention_fwd", SIG, cache.size_bucket(n))
        lookup.launch_config("gemm", "bfloat16", CUDA, 4096, {})
    fallbacks = [r.getMessage() for r in caplog.records]
    assert len(fallbacks) == 1, fallbacks
    assert "sm90-114sm-227kb (NVIDIA H100 PCIe)" in fallbacks[0] and "sm90-132sm-227kb" in fallbacks[0]
    assert "NVIDIA H100 80GB HBM3" in fallbacks[0] and "tilestack tune" in fallbacks[0]


def test_the_users_own_table_comes_before_the_fallback(gpu):
    pcie = DeviceKey(9, 0, 114, 227, name="NVIDIA H100 PCIe")
    ConfigCache().put("attention_fwd", SIG, pcie, 4096, dict(BM=64, BN=32))
    gpu(props("NVIDIA H100 PCIe", sms=114, memory=85_520_809_984))     # 79.6 GB: the H100's table is nearest
    assert lookup.launch_config("attention_fwd", SIG, CUDA, 4096, DEFAULT) == DEFAULT | dict(BM=64, BN=32)
    # a kernel the user did not tune still falls back to the nearest device
    assert lookup.launch_config("gemm", "bfloat16", CUDA, 4096, {}) == shipped("gemm", "bfloat16", 4096)


def test_another_architecture_gets_the_defaults(gpu, caplog):
    gpu(props("NVIDIA A100-SXM4-80GB", major=8, minor=0, sms=108, optin=166912))
    with caplog.at_level(logging.WARNING, logger="tilestack.tune.lookup"):
        for _ in range(3):
            assert lookup.launch_config("attention_fwd", SIG, CUDA, 4096, DEFAULT) == DEFAULT
    assert len(caplog.records) == 1 and "sm80-108sm-163kb" in caplog.records[0].getMessage()


def test_a_config_needing_more_shared_memory_than_the_device_has_is_not_used(gpu):
    """A Hopper-class device with less shared memory (a hypothetical 99 KiB part) does not take the H100's
    configs that recorded a larger footprint."""
    big = DeviceKey(9, 0, 132, 227, name="NVIDIA H100 80GB HBM3")
    ConfigCache().put("k_shared", "bfloat16", big, 1024, dict(BM=128), shared_bytes=200 * 1024)
    ConfigCache().put("k_small", "bfloat16", big, 1024, dict(BM=64), shared_bytes=64 * 1024)
    gpu(props("small part", sms=132, optin=99 * 1024))
    assert lookup.launch_config("k_shared", "bfloat16", CUDA, 1024, {"BM": 16}) == {"BM": 16}
    assert lookup.launch_config("k_small", "bfloat16", CUDA, 1024, {"BM": 16}) == {"BM": 64}


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "meta"])
def test_off_gpu_is_the_default(gpu, device):
    gpu(props("NVIDIA H200"))
    got = lookup.launch_config("attention_fwd", SIG, device, 4096, DEFAULT)
    assert got == DEFAULT and got is not DEFAULT


def test_once_resolved_a_call_reads_nothing(gpu, monkeypatch):
    """The second call for a (kernel, signature, device, size bucket) is one dictionary lookup: no device
    query, no table, no resolution (each of which now raises)."""
    gpu(props("NVIDIA H200"))
    first = lookup.launch_config("attention_fwd", SIG, CUDA, 3000, DEFAULT)

    def forbidden(*a, **k):
        raise AssertionError("the hot path must not get here")

    monkeypatch.setattr(torch.cuda, "get_device_properties", forbidden)
    device_key.cache_clear()
    monkeypatch.setattr(lookup, "_resolve", forbidden)
    monkeypatch.setattr(lookup, "ConfigCache", forbidden)
    again = lookup.launch_config("attention_fwd", SIG, CUDA, 4000, DEFAULT)   # same bucket (4096)
    assert again == first and again is not first
    again["BM"] = -1                                            # the caller's copy: the next call is unaffected
    assert lookup.launch_config("attention_fwd", SIG, CUDA, 2049, DEFAULT) == first
    with pytest.raises(AssertionError, match="hot path"):
        lookup.launch_config("attention_fwd", SIG, CUDA, 2048, DEFAULT)     # a new bucket resolves


def test_a_put_is_seen_after_reload(gpu):
    gpu(props("NVIDIA H200"))
    assert lookup.launch_config("test_kernel", "bfloat16", CUDA, 100, DEFAULT) == DEFAULT
    ConfigCache().put("test_kernel", "bfloat16", device_key(0), 128, dict(BM=64))
    assert lookup.launch_config("test_kernel", "bfloat16", CUDA, 100, DEFAULT) == DEFAULT      # memoized
    lookup.reload()
    assert lookup.launch_config("test_kernel", "bfloat16", CUDA, 100, DEFAULT) == DEFAULT | dict(BM=64)


def test_fp16_borrows_the_bf16_table_and_others_do_not(gpu):
    gpu(props("NVIDIA H200"))
    bf16 = lookup.launch_config("attention_bwd_dkdv", "bfloat16-D128-full", CUDA, 4096, {"sentinel": 1})
    fp16 = lookup.launch_config("attention_bwd_dkdv", "float16-D128-full", CUDA, 4096, {"sentinel": 1})
    assert bf16 == fp16 and "BM" in fp16 and fp16["sentinel"] == 1
    assert lookup.launch_config("gemm", "float16", CUDA, 4096, {})["BN"] == 256
    assert lookup.launch_config("attention_fwd", "float32-D128-full", CUDA, 4096, {"d": 1}) == {"d": 1}


def test_sizes_that_are_not_python_ints(gpu):
    import numpy as np

    gpu(props("NVIDIA H200"))
    want = lookup.launch_config("attention_fwd", SIG, CUDA, 3000, DEFAULT)
    assert lookup.launch_config("attention_fwd", SIG, CUDA, np.int64(3000), DEFAULT) == want
