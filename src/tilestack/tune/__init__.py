"""Autotuning: search spaces from the IR, strategies, tables of chosen configs keyed by what decides them.

    from tilestack.tune import SearchSpace, ConfigCache, device_key, tune
    key = device_key(0)                              # "sm90-132sm-227kb": architecture, SMs, shared memory
    space = SearchSpace(attention_fwd_kernel, fixed=dict(D=128, causal=False), device=key)
    result = tune("attention_fwd", space.configs(args), time=..., check=...)   # tiles x Triton's warps, stages
    ConfigCache().put("attention_fwd", sig, key, bucket, result.best, seconds=result.seconds)

A config is flat, as a launch takes it (``kernel(*args, **cfg)``); a table stores the kernel's tunables and the
backend's launch options apart (``SearchSpace.split``, ``tune.cache``).

The whole library is tuned by ``tilestack tune`` (``tune.library`` lists the problems, ``tune.session`` spends
the time budget); launches read the tables through ``tune.lookup.launch_config``.
"""

from tilestack.tune.cache import ConfigCache, size_bucket
from tilestack.tune.devices import DeviceKey, device_key
from tilestack.tune.search import TuneResult, tune
from tilestack.tune.space import SearchSpace

__all__ = ["ConfigCache", "DeviceKey", "SearchSpace", "TuneResult", "device_key", "size_bucket", "tune"]
