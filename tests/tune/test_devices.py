"""Device keys: what decides a tuned config (architecture, SMs, shared memory per block), read from the device's
properties once, and the nearest known device of the same architecture."""

from types import SimpleNamespace

import pytest
import torch

from tilestack.errors import DeviceError
from tilestack.tune import devices
from tilestack.tune.devices import DeviceKey, device_key, nearest

HOPPER_OPTIN = 232448           # bytes a block may opt in to on sm90 (227 KiB)


def props(name="NVIDIA H200", major=9, minor=0, sms=132, optin=HOPPER_OPTIN, memory=150_011_035_648):
    return SimpleNamespace(name=name, major=major, minor=minor, multi_processor_count=sms,
                           shared_memory_per_block_optin=optin, shared_memory_per_block=49152, total_memory=memory)


def test_key_from_properties():
    k = DeviceKey.from_properties(props())
    assert str(k) == "sm90-132sm-227kb" and k.shared_bytes == 227 * 1024 and k.arch == (9, 0)
    assert k.name == "NVIDIA H200" and k.memory_gb == 139.7 and k.slug == "nvidia-h200"
    h100 = DeviceKey.from_properties(props("NVIDIA H100 80GB HBM3", memory=85_520_809_984))
    assert k == h100 and str(k) == str(h100)              # the name and memory are not part of the key
    no_optin = SimpleNamespace(name="x", major=8, minor=6, multi_processor_count=84, shared_memory_per_block=49152)
    assert str(DeviceKey.from_properties(no_optin)) == "sm86-84sm-48kb"


def test_key_round_trips_and_bad_keys_are_named():
    for text in ("sm90-132sm-227kb", "sm100-148sm-227kb", "sm80-108sm-163kb"):
        assert str(DeviceKey.parse(text)) == text
    assert DeviceKey.parse("sm100-148sm-227kb").arch == (10, 0)
    meta = DeviceKey.parse("sm90-114sm-227kb", name="NVIDIA H100 PCIe", memory_gb=79.6).meta()
    assert DeviceKey.from_meta(meta).meta() == meta and meta["capability"] == "9.0" and meta["sms"] == 114
    with pytest.raises(DeviceError, match=r"device key 'NVIDIA H100 80GB HBM3'; expected 'sm<major><minor>-"):
        DeviceKey.parse("NVIDIA H100 80GB HBM3")
    with pytest.raises(DeviceError, match="expected a dict with 'key'"):
        DeviceKey.from_meta({"name": "NVIDIA H200"})


def test_device_key_reads_the_properties_once(monkeypatch):
    calls = []

    def fake(index):
        calls.append(index)
        return props(sms=114 + index)

    monkeypatch.setattr(torch.cuda, "get_device_properties", fake)
    device_key.cache_clear()
    try:
        assert str(device_key(0)) == "sm90-114sm-227kb" and str(device_key(1)) == "sm90-115sm-227kb"
        for _ in range(3):
            device_key(0)
        assert calls == [0, 1]
    finally:
        device_key.cache_clear()


def test_nearest_same_architecture_closest_first():
    target = DeviceKey.parse("sm90-114sm-227kb", name="NVIDIA H100 PCIe")
    known = [DeviceKey.parse("sm80-108sm-163kb", name="A100"),
             DeviceKey.parse("sm90-132sm-227kb", name="NVIDIA H100 80GB HBM3"),
             DeviceKey.parse("sm90-78sm-227kb", name="NVIDIA H20"),
             DeviceKey.parse("sm90-114sm-255kb", name="more shared memory than the target"),
             DeviceKey.parse("sm90-114sm-227kb", name="NVIDIA H100 PCIe")]
    order = [d.name for d in nearest(target, known)]
    # its own key first; then by SM ratio (132/114 is nearer than 78/114); more shared memory than it has: last
    assert order == ["NVIDIA H100 PCIe", "NVIDIA H100 80GB HBM3", "NVIDIA H20", "more shared memory than the target"]
    assert nearest(DeviceKey.parse("sm89-128sm-99kb"), known) == []
    assert devices.distance(target, known[1]) < devices.distance(target, known[2])
