"""Configs for a launch: the tuned one for this kernel, signature, device and size, else the kernel's default.

    cfg = launch_config("attention_fwd", "bf16-D128-causal", q.device, n=q.shape[2], default={...})
"""

from __future__ import annotations

import functools

from tilestack.tune.cache import ConfigCache, size_bucket


@functools.cache
def _cache() -> ConfigCache:
    return ConfigCache()


@functools.cache
def device_name(device) -> str:
    import torch

    if getattr(device, "type", device) == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


# Signatures that tune alike: fp16 and bf16 tiles have the same size, so one's table serves the other.
SAME_SHAPE = {"float16": "bfloat16", "bfloat16": "float16"}


def launch_config(kernel: str, signature: str, device, n: int, default: dict) -> dict:
    """The tuned config for this signature (or a same-shape one: fp16 for bf16 and back), else ``default``."""
    if getattr(device, "type", device) != "cuda":
        return dict(default)
    dtype, _, rest = signature.partition("-")
    for sig in (signature, "-".join(filter(None, (SAME_SHAPE.get(dtype, dtype), rest)))):
        tuned = _cache().get(kernel, sig, device_name(device), size_bucket(n))
        if tuned is not None:
            return {**default, **tuned}
    return dict(default)


def reload() -> None:
    """Forget the cached tables (after a tuning run wrote new ones)."""
    _cache.cache_clear()
