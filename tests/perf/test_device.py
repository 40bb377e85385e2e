import json

import pytest

from tilestack.errors import DeviceError
from tilestack.perf import device


@pytest.mark.parametrize("name,key", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H200", "h200"), ("NVIDIA H200 NVL", "h200-nvl"), ("NVIDIA A100-SXM4-80GB", "a100-sxm-80gb"),
    ("NVIDIA A100-SXM4-40GB", "a100-sxm-40gb"), ("NVIDIA A100 80GB PCIe", "a100-pcie-80gb"),
    ("NVIDIA A100-PCIE-40GB", "a100-pcie-40gb"), ("NVIDIA L40S", "l40s"), ("NVIDIA L4", "l4"),
    ("cpu: Intel(R) Xeon(R) Processor", "cpu"), ("h100-sxm", "h100-sxm"), ("NVIDIA GH200 480GB", "gh200"),
])
def test_driver_names_find_their_spec_sheet(name, key):
    assert device.lookup_peaks(name).key == key


def test_published_peaks_are_dense_and_in_base_units():
    h100 = device.lookup_peaks("NVIDIA H100 80GB HBM3")
    assert h100.peak("bf16") == pytest.approx(989.4e12) and h100.bandwidth == pytest.approx(3.35e12)
    assert device.lookup_peaks("NVIDIA H200").bandwidth == pytest.approx(4.8e12)
    assert device.lookup_peaks("NVIDIA L4").peak("fp64") is None
    assert device.lookup_peaks("cpu").bandwidth is None


def test_unknown_device_names_the_value_and_the_choices():
    with pytest.raises(DeviceError, match="'NVIDIA GeForce GTX 480'.*H100 SXM"):
        device.lookup_peaks("NVIDIA GeForce GTX 480")
    assert device.lookup_peaks("NVIDIA GeForce GTX 480", strict=False) is None


@pytest.mark.parametrize("arg", ["tpu", "cuda:x", "gpu0"])
def test_detect_refuses_unknown_device_strings(arg):
    with pytest.raises(DeviceError, match=f"device='{arg}'"):
        device.detect(arg)


def test_detect_cpu_and_cuda_without_a_gpu(monkeypatch):
    d = device.detect("cpu")
    assert d.kind == "cpu" and d.name.startswith("cpu: ") and d.spec.key == "cpu" and d.torch_device == "cpu"
    monkeypatch.setattr(device, "cuda_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        device.detect("cuda")
    assert device.detect().kind == "cpu"


SMALL = {"copy_bytes": 1 << 20, "matmul_n": 64, "dtypes": ("fp32",), "budget_s": 0.1}


def test_ceilings_are_measured_once_then_cached(cache_dir, monkeypatch):
    monkeypatch.setattr(device, "MAX_REMEASURES", 1)  # used as measured, however loose (see the tests below)
    dev = device.detect("cpu")
    first = device.ceilings(dev, **SMALL)
    assert first.copy_bytes_per_s > 0 and first.matmul["fp32"] > 0
    path = device.ceilings_path(dev)
    assert path.is_file() and str(path).startswith(str(cache_dir))
    again = device.ceilings(dev, **SMALL)
    assert again == first  # read back, not measured again
    fresh = device.ceilings(dev, remeasure=True, **SMALL)
    assert fresh.copy_bytes_per_s != first.copy_bytes_per_s or fresh.measured_at >= first.measured_at
    assert json.loads(path.read_text())["copy_bytes_per_s"] == fresh.copy_bytes_per_s


def test_a_corrupt_cache_is_measured_again():
    dev = device.detect("cpu")
    path = device.ceilings_path(dev)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{half a fi")
    assert device.ceilings(dev, **SMALL).matmul["fp32"] > 0
    assert json.loads(path.read_text())["device"] == dev.name


def test_unknown_ceiling_dtype():
    with pytest.raises(DeviceError, match="'int4'"):
        device.ceilings(device.detect("cpu"), copy_bytes=1 << 16, matmul_n=8, dtypes=("int4",))


def test_an_unwritable_cache_warns_and_still_measures(tmp_path):
    from tilestack import config

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with config.override(cache_dir=blocker), pytest.warns(UserWarning, match="ceilings not cached"):
        assert device.ceilings(device.detect("cpu"), **SMALL).matmul["fp32"] > 0


def _cached(dev, **changes):
    """Write a cache file for ``dev`` measured on this machine, with ``changes`` applied; return its path."""
    import dataclasses

    tight = {"rel_ci": 0.0, "rel_spread": 0.0, "repeats": 100, "converged": True}
    c = device.Ceilings(dev.name, 1.0, {"fp32": 2.0}, "2026-01-01T00:00:00+00:00", {}, {"copy_bytes": 1 << 20,
                        "matmul_n": [64]}, spread={"copy": dict(tight), "matmul fp32": dict(tight)},
                        machine=device.machine_fingerprint(dev))
    c = dataclasses.replace(c, **changes)
    path = device.ceilings_path(dev)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(c.to_json()))
    return path


def test_each_ceiling_keeps_its_spread_on_disk():
    dev = device.detect("cpu")
    device.ceilings(dev, **SMALL)
    data = json.loads(device.ceilings_path(dev).read_text())
    assert set(data["spread"]) == {"copy", "matmul fp32"}
    for entry in data["spread"].values():
        assert entry["repeats"] >= 3 and entry["rel_ci"] >= 0 and entry["converged"] in (True, False)
    assert data["machine"] == device.machine_fingerprint(dev)


def test_cached_ceilings_from_another_machine_are_measured_again():
    dev = device.detect("cpu")
    elsewhere = dict(device.machine_fingerprint(dev), host="another-host")
    _cached(dev, machine=elsewhere)
    with pytest.warns(UserWarning, match="another machine.*another-host"):
        c = device.ceilings(dev, **SMALL)
    assert c.copy_bytes_per_s != 1.0 and c.machine == device.machine_fingerprint(dev) and c.measurements == 1


def test_a_loose_cached_ceiling_is_measured_again_and_the_better_known_kept():
    dev = device.detect("cpu")
    loose = {"rel_ci": 50.0, "rel_spread": 90.0, "repeats": 40, "converged": False}  # beaten by any measurement
    tight = {"rel_ci": 0.0, "rel_spread": 0.0, "repeats": 100, "converged": True}
    _cached(dev, spread={"copy": loose, "matmul fp32": tight})
    with pytest.warns(UserWarning, match="copy known only to \\+-5000%"):
        c = device.ceilings(dev, **SMALL)
    assert c.copy_bytes_per_s != 1.0  # measured again, and the new one is known better than +-5000%
    assert c.matmul["fp32"] == 2.0 and c.rel_ci("matmul fp32") == 0.0  # the old one was known better
    assert c.measurements == 2
    # Still loose after MAX_REMEASURES measurements (a busy machine): used as it is, spread and all.
    _cached(dev, spread={"copy": loose, "matmul fp32": tight}, measurements=device.MAX_REMEASURES)
    assert device.ceilings(dev, **SMALL).copy_bytes_per_s == 1.0


def test_a_ceiling_timed_too_few_times_is_not_trusted():
    dev = device.detect("cpu")
    few = {"rel_ci": 0.0, "rel_spread": 0.0, "repeats": 3, "converged": False}
    tight = {"rel_ci": 0.0, "rel_spread": 0.0, "repeats": 100, "converged": True}
    _cached(dev, spread={"copy": tight, "matmul fp32": few})
    with pytest.warns(UserWarning, match="matmul fp32 timed only 3 times"):
        device.ceilings(dev, **SMALL)
