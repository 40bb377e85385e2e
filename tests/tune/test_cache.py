"""ConfigCache and its tables: round trips through <cache_dir>/tuned/<device key>.json, atomic writes, the nearest
tuned size as a fallback, the user's entries over the shipped tables, tables of one key merged (the same GPU
name first), and tables in the old name-keyed format refused with a clear message."""

import json
import os

import numpy as np
import pytest

from tilestack.tune import ConfigCache, size_bucket
from tilestack.tune.cache import Table, file_name, key, launch_kwargs, write_json_atomic
from tilestack.tune.devices import DeviceKey

H100 = DeviceKey(9, 0, 132, 227, name="NVIDIA H100 80GB HBM3", memory_gb=79.6)
H200 = DeviceKey(9, 0, 132, 227, name="NVIDIA H200", memory_gb=139.8)
PCIE = DeviceKey(9, 0, 114, 227, name="NVIDIA H100 PCIe", memory_gb=79.6)
SIG = "bfloat16-D64-causal"
KERNEL = "test_kernel"          # no shipped table has it


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


def test_size_bucket():
    assert [size_bucket(n) for n in (1, 2, 3, 1000, 1024, 1025, 3000)] == [1, 2, 4, 1024, 1024, 2048, 4096]


def test_put_get_round_trip(cache_dir):
    cache = ConfigCache(cache_dir)
    path = cache.user_path(H100)
    assert path == cache_dir / "tuned" / "sm90-132sm-227kb.json" and not path.exists()
    assert cache.get(KERNEL, SIG, H100, 1024) is None
    cfg = dict(BM=128, BN=64, num_warps=4, num_stages=3)
    cache.put(KERNEL, SIG, H100, 1024, cfg, seconds=1.5e-4, tflops=321.0)
    assert cache.get(KERNEL, SIG, H100, 1024) == cfg
    fresh = ConfigCache(cache_dir)                          # another process reading the file
    assert fresh.get(KERNEL, SIG, H100, 1024) == cfg
    assert fresh.get(KERNEL, SIG, H200, 1024) == cfg        # the same key: an H200 reads the H100's entries
    data = json.loads(path.read_text())
    assert data["format"] == 3 and data["device"]["key"] == "sm90-132sm-227kb"
    assert data["device"]["name"] == "NVIDIA H100 80GB HBM3" and data["device"]["sms"] == 132
    # the kernel's tunables and the backend's launch options stored apart
    assert data["entries"][key(KERNEL, SIG, 1024)] == {"config": dict(BM=128, BN=64),
                                                       "options": dict(num_warps=4, num_stages=3),
                                                       "seconds": 1.5e-4, "tflops": 321.0}
    got = fresh.get(KERNEL, SIG, H100, 1024)
    got["BM"] = 16                                          # a copy: the cache is not changed through it
    assert fresh.get(KERNEL, SIG, H100, 1024)["BM"] == 128
    assert fresh.get(KERNEL, "float16-D64-causal", H100, 1024) is None
    assert fresh.get(KERNEL, SIG, PCIE, 1024) is None       # another key: not this table (lookup falls back)
    assert fresh.get("other_kernel", SIG, H100, 1024) is None


def test_puts_from_two_caches_both_survive(cache_dir):
    a, b = ConfigCache(cache_dir), ConfigCache(cache_dir)
    a.put(KERNEL, SIG, H100, 512, dict(BM=64))
    b.put(KERNEL, SIG, H100, 4096, dict(BM=128))            # b re-reads the file before writing
    c = ConfigCache(cache_dir)
    assert c.get(KERNEL, SIG, H100, 512) == dict(BM=64) and c.get(KERNEL, SIG, H100, 4096) == dict(BM=128)


def test_atomic_write_leaves_valid_json(cache_dir):
    """Evidence JSON cannot hold fails the write: the previous file stays whole and no temp file is left."""
    cache = ConfigCache(cache_dir)
    cache.put(KERNEL, SIG, H100, 1024, dict(BM=64), seconds=1.0)
    path = cache.user_path(H100)
    before = path.read_text()
    with pytest.raises(TypeError):
        cache.put(KERNEL, SIG, H100, 2048, dict(BM=128), seconds=np.float32(0.5))
    assert path.read_text() == before
    assert json.loads(before)["entries"][key(KERNEL, SIG, 1024)]["config"] == dict(BM=64)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert ConfigCache(cache_dir).get(KERNEL, SIG, H100, 2048) == dict(BM=64)    # nearest: 2048 is not there


def test_write_json_atomic_interrupted(tmp_path, monkeypatch):
    """An interrupt in the middle of writing (here: in the fsync after the temporary's bytes) leaves the old file
    and no temporary."""
    path = tmp_path / "t.json"
    write_json_atomic(path, {"a": 1})

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["t.json"]


@pytest.mark.parametrize("bucket,want", [
    (1024, 1024),       # exact
    (2048, 1024),       # one power of two from 1024, two from 8192
    (4096, 8192),       # one from 8192, two from 1024
    (512, 1024),
    (65536, 8192),
    (1, 1024),
])
def test_nearest_bucket_fallback(cache_dir, bucket, want):
    cache = ConfigCache(cache_dir)
    for b in (1024, 8192):
        cache.put(KERNEL, SIG, H100, b, dict(BM=b // 16))
    assert cache.get(KERNEL, SIG, H100, bucket) == dict(BM=want // 16)


def test_nearest_bucket_tie_takes_the_smaller(cache_dir):
    cache = ConfigCache(cache_dir)
    for b in (4096, 1024):
        cache.put(KERNEL, SIG, H100, b, dict(BM=b // 16))
    assert cache.get(KERNEL, SIG, H100, 2048) == dict(BM=64)


def test_nearest_bucket_ignores_other_signatures_and_kernels(cache_dir):
    cache = ConfigCache(cache_dir)
    cache.put(KERNEL, "bfloat16-D64-full", H100, 1024, dict(BM=1))
    cache.put(KERNEL, SIG, PCIE, 1024, dict(BM=2))
    cache.put(KERNEL + "_x", SIG, H100, 1024, dict(BM=3))
    assert cache.get(KERNEL, SIG, H100, 1024) is None


def test_user_entries_override_the_shipped_tables(cache_dir):
    cache = ConfigCache(cache_dir)
    shipped = next(k for k in cache.view(H100) if k.startswith("attention_fwd|"))
    kernel, sig, bucket = shipped.split("|")
    assert cache.get(kernel, sig, H100, int(bucket)) == launch_kwargs(cache.view(H100)[shipped])
    mine = dict(BM=16, BN=16, num_warps=4, num_stages=1)
    cache.put(kernel, sig, H100, int(bucket), mine)
    assert ConfigCache(cache_dir).get(kernel, sig, H100, int(bucket)) == mine
    on_disk = json.loads(cache.user_path(H100).read_text())["entries"]
    assert list(on_disk) == [shipped]                       # the shipped tables are not copied into the user's


def write_table(folder, device, entries):
    Table(device, {key(KERNEL, SIG, b): {"config": c} for b, c in entries.items()}).write(
        folder / file_name(KERNEL, device))


def test_tables_of_one_key_merge_the_same_name_first(tmp_path):
    """An H100 and an H200 table share a key: each GPU reads its own name's entry where both have one, the
    other's where only it has one; a third GPU of that key takes the closer memory size's."""
    tables = tmp_path / "tables"
    write_table(tables, H100, {1024: dict(BM=1), 4096: dict(BM=4)})
    write_table(tables, H200, {1024: dict(BM=2)})
    cache = ConfigCache(tmp_path / "cache", tables_dir=tables)
    assert cache.get(KERNEL, SIG, H200, 1024) == dict(BM=2)
    assert cache.get(KERNEL, SIG, H100, 1024) == dict(BM=1)
    assert cache.get(KERNEL, SIG, H200, 4096) == dict(BM=4)          # only the H100 tuned it
    gh200 = DeviceKey(9, 0, 132, 227, name="NVIDIA GH200 144G HBM3e", memory_gb=132.0)
    assert cache.get(KERNEL, SIG, gh200, 1024) == dict(BM=2)         # 132 GB: nearer the H200's 140
    assert [t.device.name for t in cache.tables_for(gh200)] == ["NVIDIA H200", "NVIDIA H100 80GB HBM3"]
    assert {(str(d), d.name) for d in cache.devices()} == {(str(H100), H100.name), (str(H200), H200.name)}


def test_corrupt_json_is_a_clear_error(cache_dir):
    (cache_dir / "tuned").mkdir(parents=True)
    (cache_dir / "tuned" / "sm90-132sm-227kb.json").write_text('{"format": 2, "entries": ')
    with pytest.raises(ValueError, match=r"sm90-132sm-227kb.json is not valid JSON .*delete it to start over"):
        ConfigCache(cache_dir)


def test_a_name_keyed_table_is_refused(tmp_path):
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "old.json").write_text(json.dumps({"gemm|bfloat16|NVIDIA H100 80GB HBM3|4096": {"config": {}}}))
    with pytest.raises(ValueError, match=r"old.json: expected \{'format': 3.*a table from before device keys"):
        ConfigCache(tmp_path / "cache", tables_dir=tables)


def test_a_format_2_table_loads_with_its_launch_options_apart(tmp_path):
    """Tables written before the split (one flat config) still load: the launch options move to ``options``,
    every value kept; a lookup gives the same flat config as before."""
    flat = dict(BM=128, BN=64, num_warps=8, num_stages=3)
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "old.json").write_text(json.dumps({"format": 2, "device": H100.meta(), "entries": {
        key(KERNEL, SIG, 1024): {"config": flat, "seconds": 2.5e-4}}}))
    [table] = ConfigCache(tmp_path / "cache", tables_dir=tables).shipped
    assert table.entries[key(KERNEL, SIG, 1024)] == {"config": dict(BM=128, BN=64),
                                                     "options": dict(num_warps=8, num_stages=3), "seconds": 2.5e-4}
    assert ConfigCache(tmp_path / "cache", tables_dir=tables).get(KERNEL, SIG, H100, 1024) == flat
    table.write(tmp_path / "new.json")
    assert json.loads((tmp_path / "new.json").read_text())["format"] == 3
