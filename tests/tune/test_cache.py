"""ConfigCache: round trips through <cache_dir>/tuned.json, atomic writes, the nearest tuned size as a
fallback, the user's entries over the shipped tables; and launch_config, which reads it."""

import json

import numpy as np
import pytest
import torch

from tilestack import config
from tilestack.tune import ConfigCache, lookup, size_bucket
from tilestack.tune.cache import key

DEV = "NVIDIA H100 80GB HBM3"
SIG = "bfloat16-D64-causal"
KERNEL = "test_kernel"          # no shipped table has it


@pytest.fixture
def cache_dir(tmp_path):
    with config.override(cache_dir=tmp_path / "cache"):
        lookup.reload()
        yield tmp_path / "cache"
    lookup.reload()


def test_size_bucket():
    assert [size_bucket(n) for n in (1, 2, 3, 1000, 1024, 1025, 3000)] == [1, 2, 4, 1024, 1024, 2048, 4096]


def test_put_get_round_trip(cache_dir):
    cache = ConfigCache()
    assert cache.path == cache_dir / "tuned.json" and not cache.path.exists()
    assert cache.get(KERNEL, SIG, DEV, 1024) is None
    cfg = dict(BM=128, BN=64, num_warps=4, num_stages=3)
    cache.put(KERNEL, SIG, DEV, 1024, cfg, seconds=1.5e-4, tflops=321.0)
    assert cache.get(KERNEL, SIG, DEV, 1024) == cfg
    fresh = ConfigCache()                                   # another process reading the file
    assert fresh.get(KERNEL, SIG, DEV, 1024) == cfg
    data = json.loads(cache.path.read_text())
    assert data[key(KERNEL, SIG, DEV, 1024)] == {"config": cfg, "seconds": 1.5e-4, "tflops": 321.0}
    got = fresh.get(KERNEL, SIG, DEV, 1024)
    got["BM"] = 16                                          # a copy: the cache is not changed through it
    assert fresh.get(KERNEL, SIG, DEV, 1024)["BM"] == 128
    assert fresh.get(KERNEL, "float16-D64-causal", DEV, 1024) is None
    assert fresh.get(KERNEL, SIG, "NVIDIA A100-SXM4-80GB", 1024) is None
    assert fresh.get("other_kernel", SIG, DEV, 1024) is None


def test_puts_from_two_caches_both_survive(cache_dir):
    a, b = ConfigCache(), ConfigCache()
    a.put(KERNEL, SIG, DEV, 512, dict(BM=64))
    b.put(KERNEL, SIG, DEV, 4096, dict(BM=128))             # b re-reads the file before writing
    c = ConfigCache()
    assert c.get(KERNEL, SIG, DEV, 512) == dict(BM=64) and c.get(KERNEL, SIG, DEV, 4096) == dict(BM=128)


def test_atomic_write_leaves_valid_json(cache_dir):
    """Evidence JSON cannot hold fails the write: the previous file stays whole and no temp file is left."""
    cache = ConfigCache()
    cache.put(KERNEL, SIG, DEV, 1024, dict(BM=64), seconds=1.0)
    before = cache.path.read_text()
    with pytest.raises(TypeError):
        cache.put(KERNEL, SIG, DEV, 2048, dict(BM=128), seconds=np.float32(0.5))
    assert cache.path.read_text() == before
    assert json.loads(before)[key(KERNEL, SIG, DEV, 1024)]["config"] == dict(BM=64)
    assert sorted(p.name for p in cache_dir.iterdir()) == ["tuned.json"]
    assert ConfigCache().get(KERNEL, SIG, DEV, 2048) == dict(BM=64)    # nearest: the failed write is not there


@pytest.mark.parametrize("bucket,want", [
    (1024, 1024),       # exact
    (2048, 1024),       # one power of two from 1024, two from 8192
    (4096, 8192),       # one from 8192, two from 1024
    (512, 1024),
    (65536, 8192),
    (1, 1024),
])
def test_nearest_bucket_fallback(cache_dir, bucket, want):
    cache = ConfigCache()
    for b in (1024, 8192):
        cache.put(KERNEL, SIG, DEV, b, dict(BM=b // 16))
    assert cache.get(KERNEL, SIG, DEV, bucket) == dict(BM=want // 16)


def test_nearest_bucket_tie_takes_the_smaller(cache_dir):
    cache = ConfigCache()
    for b in (4096, 1024):
        cache.put(KERNEL, SIG, DEV, b, dict(BM=b // 16))
    assert cache.get(KERNEL, SIG, DEV, 2048) == dict(BM=64)


def test_nearest_bucket_ignores_other_signatures_and_devices(cache_dir):
    cache = ConfigCache()
    cache.put(KERNEL, "bfloat16-D64-full", DEV, 1024, dict(BM=1))
    cache.put(KERNEL, SIG, "NVIDIA H200", 1024, dict(BM=2))
    cache.put(KERNEL + "_x", SIG, DEV, 1024, dict(BM=3))
    assert cache.get(KERNEL, SIG, DEV, 1024) is None


def test_user_entries_override_the_shipped_tables(cache_dir):
    cache = ConfigCache()
    shipped = next(k for k in cache.entries() if k.startswith("attention_fwd|"))
    kernel, sig, dev, bucket = shipped.split("|")
    assert cache.get(kernel, sig, dev, int(bucket)) == cache.entries()[shipped]["config"]
    mine = dict(BM=16, BN=16, num_warps=4, num_stages=1)
    cache.put(kernel, sig, dev, int(bucket), mine)
    assert ConfigCache().get(kernel, sig, dev, int(bucket)) == mine
    on_disk = json.loads(cache.path.read_text())
    assert list(on_disk) == [shipped]                       # the shipped tables are not copied into the user's


def test_corrupt_json_is_a_clear_error(cache_dir):
    cache_dir.mkdir(parents=True)
    (cache_dir / "tuned.json").write_text('{"attention_fwd|x": {"config": ')
    with pytest.raises(ValueError, match=r"tuned.json is not valid JSON .*delete it to start over"):
        ConfigCache()


# ---- launch_config ----------------------------------------------------------------------------------------------
DEFAULT = dict(BM=16, BN=16, num_warps=4, num_stages=1)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "meta"])
def test_launch_config_off_gpu_is_the_default(cache_dir, device):
    ConfigCache().put("attention_fwd", SIG, "cpu", 1024, dict(BM=128))       # even with an entry for "cpu"
    lookup.reload()
    got = lookup.launch_config("attention_fwd", SIG, device, 1000, DEFAULT)
    assert got == DEFAULT and got is not DEFAULT


def test_launch_config_on_a_gpu_reads_the_tables(cache_dir, monkeypatch):
    """A CUDA device by name alone (no GPU needed): the tuned config over the default, nearest size first."""
    monkeypatch.setattr(lookup, "device_name", lambda device: DEV)
    entries = ConfigCache().entries()
    tuned = entries[key("attention_fwd", "bfloat16-D128-causal", DEV, 4096)]["config"]
    got = lookup.launch_config("attention_fwd", "bfloat16-D128-causal", "cuda", 3000, DEFAULT | {"extra": 1})
    assert got == DEFAULT | {"extra": 1} | tuned
    untuned = lookup.launch_config("attention_fwd", "float32-D48-full", "cuda", 3000, DEFAULT)
    assert untuned == DEFAULT


def test_launch_config_sees_a_put_after_reload(cache_dir, monkeypatch):
    monkeypatch.setattr(lookup, "device_name", lambda device: DEV)
    assert lookup.launch_config(KERNEL, SIG, "cuda", 100, DEFAULT) == DEFAULT
    ConfigCache().put(KERNEL, SIG, DEV, 128, dict(BM=64))
    lookup.reload()
    assert lookup.launch_config(KERNEL, SIG, "cuda", 100, DEFAULT) == DEFAULT | dict(BM=64)
