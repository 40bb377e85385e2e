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


SMALL = {"copy_bytes": 1 << 20, "matmul_n": 64, "dtypes": ("fp32",)}


def test_ceilings_are_measured_once_then_cached(cache_dir):
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
