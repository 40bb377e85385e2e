"""Configs for a launch: the tuned one for this kernel, signature, device and size, else the kernel's default.

    cfg = launch_config("attention_fwd", "bfloat16-D128-causal", q.device, n=q.shape[2], default={...})

The first call for a (kernel, signature, device, size bucket) resolves it from the tables; every later call is
one dictionary lookup (no device query, no file read) plus the merge of the tuned values over ``default``.
Resolution, for the device's key (architecture, SM count, shared memory per block; see ``tune.devices``):

1. the tables of that key (the user's, then the shipped ones), this signature, else the same-shape signature
   (fp16 for bf16 and back: same tile sizes), at this bucket or the nearest tuned one;
2. else the same from the nearest known device of the same architecture (nearest SM count, then shared
   memory), once per device logged as a fallback;
3. else ``default``. Off a GPU (CPU, meta) always ``default``.

A config from another device that needs more shared memory than this one has is never used.
"""

from __future__ import annotations

import logging

from tilestack.tune.cache import ConfigCache, launch_kwargs, lookup_entry
from tilestack.tune.devices import DeviceKey, device_key, nearest

log = logging.getLogger(__name__)

# Signatures that tune alike: fp16 and bf16 tiles have the same size, so one's table serves the other.
SAME_SHAPE = {"float16": "bfloat16", "bfloat16": "float16"}

_resolved: dict[tuple, dict | None] = {}     # (kernel, signature, device, bucket exponent) -> tuned values | None
_cache: ConfigCache | None = None
_views: dict[str, list[tuple[str, str, dict]]] = {}    # device key -> per known device key, nearest first
_logged: set[tuple] = set()


def launch_config(kernel: str, signature: str, device, n: int, default: dict) -> dict:
    """The tuned config for this launch over ``default`` (a new dict either way; see the module docstring).

    ``device`` is a ``torch.device`` or its string; one without an index means the current device when first
    seen. ``n`` is the size the kernel tunes by (sequence length, the largest GEMM dimension, the row width)."""
    try:
        k = (kernel, signature, device, (n - 1).bit_length())
    except AttributeError:            # a NumPy integer, a SymInt: not a Python int
        k = (kernel, signature, device, (int(n) - 1).bit_length())
    try:
        tuned = _resolved[k]
    except KeyError:
        tuned = _resolved[k] = _resolve(kernel, signature, device, n)
    return {**default, **tuned} if tuned else default.copy()


def _resolve(kernel: str, signature: str, device, n: int) -> dict | None:
    import torch

    dev = device if isinstance(device, torch.device) else torch.device(device)
    if dev.type != "cuda":
        return None
    target = device_key(dev.index if dev.index is not None else torch.cuda.current_device())
    return resolve(kernel, signature, target, n)


def resolve(kernel: str, signature: str, target: DeviceKey, n: int, cache: ConfigCache | None = None) -> dict | None:
    """The tuned values for ``target`` (see the module docstring), uncached; None where nothing applies. The
    kernel's tunables and the backend's launch options come merged, as a launch takes them.
    ``cache``: read these tables instead of the user's and the shipped ones (and log no fallback)."""
    bucket = 1 << max(0, (int(n) - 1).bit_length())
    dtype, _, rest = signature.partition("-")
    twin = "-".join(filter(None, (SAME_SHAPE.get(dtype, dtype), rest)))
    signatures = (signature,) if twin == signature else (signature, twin)
    devices = _devices(target, cache)
    for source, names, entries in devices:
        for sig in signatures:
            entry = lookup_entry(entries, kernel, sig, bucket)
            if entry is None or entry.get("shared_bytes", 0) > target.shared_bytes:
                continue
            if source != str(target) and cache is None and (str(target), source) not in _logged:
                _logged.add((str(target), source))
                log.warning("tilestack.tune: no tuned config of %s for %s (%s); using those of the nearest known "
                            "device, %s (tuned on %s). `tilestack tune` tunes this GPU.", kernel, target,
                            target.name or "?", source, names)
            return launch_kwargs(entry)
    if not devices and cache is None and (str(target), None) not in _logged:
        _logged.add((str(target), None))
        log.warning("tilestack.tune: no tuned configs for %s (%s) or any device of its architecture; using "
                    "defaults. `tilestack tune` tunes this GPU.", target, target.name or "?")
    return None


def _devices(target: DeviceKey, cache: ConfigCache | None = None) -> list[tuple[str, str, dict]]:
    """(device key, the GPUs its tables were tuned on, its entries) for ``target``'s key, then for each nearest
    known device of its architecture. Kept per device for the shared cache."""
    global _cache
    if cache is not None:
        return _views_of(target, cache)
    if str(target) not in _views:
        if _cache is None:
            _cache = ConfigCache()
        _views[str(target)] = _views_of(target, _cache)
    return _views[str(target)]


def _views_of(target: DeviceKey, cache: ConfigCache) -> list[tuple[str, str, dict]]:
    keys = dict.fromkeys(str(d) for d in nearest(target, cache.devices()))   # nearest first
    # a key's view merges all its tables, those of a name and memory size like the target's first
    like = [DeviceKey.parse(k, name=target.name, memory_gb=target.memory_gb) for k in keys]
    return [(str(d), ", ".join(t.device.name for t in cache.tables_for(d)), cache.view(d)) for d in like]


def reload() -> None:
    """Forget everything resolved and read the tables again on the next launch (after a tuning run wrote)."""
    global _cache
    _resolved.clear()
    _views.clear()
    _logged.clear()
    _cache = None
    device_key.cache_clear()
