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


def launch_config(kernel: str, signature: str, device, n: int, default: dict) -> dict:
    if getattr(device, "type", device) != "cuda":
        return dict(default)
    tuned = _cache().get(kernel, signature, device_name(device), size_bucket(n))
    return dict(default) if tuned is None else {**default, **tuned}


def reload() -> None:
    """Forget the cached tables (after a tuning run wrote new ones)."""
    _cache.cache_clear()
