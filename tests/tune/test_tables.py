"""The tuned-config tables shipped in src/tilestack/tune/tables/: every file parses, every key names a kernel
the library launches with a signature its launch path builds, and every config is inside the declared
tunable domains of that kernel and fits the shared memory of the device it was tuned on."""

import json
import re
from pathlib import Path

import pytest
import torch

from tilestack.kernels.attention_bwd import attention_bwd_dkdv_kernel, attention_bwd_dq_kernel
from tilestack.kernels.attention_fwd import SUPPORTED_HEAD_DIMS, attention_fwd_kernel
from tilestack.kernels.gemm import gemm_kernel
from tilestack.tune import ConfigCache, SearchSpace
from tilestack.tune.cache import TABLES
from tilestack.tune.space import H100_SHARED_BYTES

KERNELS = {"attention_fwd": attention_fwd_kernel, "attention_bwd_dkdv": attention_bwd_dkdv_kernel,
           "attention_bwd_dq": attention_bwd_dq_kernel, "gemm": gemm_kernel}
GEMM_SIGNATURES = ("bfloat16", "float16")   # what gemm_config builds: the input dtype
# what attention_forward / attention_backward build: f"{dtype}-D{D}-{'causal' if causal else 'full'}"
SIGNATURE = re.compile(r"^(bfloat16|float16)-D(\d+)-(causal|full)$")
SHARED = {"NVIDIA H100 80GB HBM3": H100_SHARED_BYTES}
FILES = sorted(TABLES.glob("*.json"))


def entries():
    for path in FILES:
        for k, entry in json.loads(path.read_text()).items():
            yield pytest.param(path, k, entry, id=f"{path.stem}:{k}")


def args_for(kernel_name: str, D: int):
    """Small tensors of the kernel's dtypes and ranks (shared footprints do not depend on the sizes)."""
    bf = dict(dtype=torch.bfloat16)
    if kernel_name == "gemm":
        a = torch.empty(64, 64, **bf)
        return a, a, torch.empty_like(a)
    q, kv = torch.empty(1, 2, 64, D, **bf), torch.empty(1, 1, 64, D, **bf)
    rows = torch.empty(1, 2, 64)
    if kernel_name == "attention_fwd":
        return q, kv, kv, torch.empty_like(q), rows, 0.1
    if kernel_name == "attention_bwd_dkdv":
        return q, kv, kv, q, rows, rows, torch.empty_like(kv), torch.empty_like(kv), 0.1
    return q, kv, kv, q, rows, rows, torch.empty_like(q), 0.1


def test_there_are_tables():
    assert FILES, f"no tables in {TABLES}"
    for path in FILES:
        data = json.loads(path.read_text())
        assert isinstance(data, dict) and data, path.name


def test_the_cache_loads_every_table():
    cache = ConfigCache(Path("/nonexistent/tuned.json"))
    total = sum(len(json.loads(p.read_text())) for p in FILES)
    assert len(cache.entries()) == total, "two tables share a key"


@pytest.mark.parametrize("path,key,entry", list(entries()))
def test_entry_is_a_valid_config_of_its_kernel(path, key, entry):
    kernel_name, signature, device, bucket = key.split("|")
    assert kernel_name in KERNELS, f"{kernel_name!r}: no such tuned kernel"
    kernel = KERNELS[kernel_name]
    if kernel_name == "gemm":
        assert signature in GEMM_SIGNATURES, f"signature {signature!r} is not what gemm_config builds"
        D, fixed = 0, {}
    else:
        m = SIGNATURE.match(signature)
        assert m, f"signature {signature!r} is not what the launch path builds"
        D, fixed = int(m.group(2)), dict(D=int(m.group(2)), causal=m.group(3) == "causal")
        assert D in SUPPORTED_HEAD_DIMS
    assert bucket.isdigit() and int(bucket) > 0 and int(bucket) & (int(bucket) - 1) == 0, "bucket: a power of 2"
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    assert path.stem.endswith(slug), f"{path.name} holds an entry for {device}"

    cfg = entry["config"]
    assert set(entry) <= {"config", "seconds", "tflops", "flops", "bytes", "speedup"}, set(entry)
    assert entry.get("seconds", 1.0) > 0
    tunables = kernel.tunables
    assert set(cfg) <= set(tunables), f"not tunables of {kernel.name}: {set(cfg) - set(tunables)}"
    for name, value in cfg.items():
        assert value in tunables[name].domain, f"{name}={value} outside {tunables[name].domain}"
    kernel.resolve(cfg | fixed)                                        # the kernel's own check agrees
    if device in SHARED:
        space = SearchSpace(kernel, fixed=fixed)
        assert space.shared_bytes(args_for(kernel_name, D), cfg) <= SHARED[device]
