"""Autotuning: search spaces from the IR, strategies, and a persistent cache of chosen configs.

    from tilestack.tune import SearchSpace, ConfigCache, tune
    space = SearchSpace(attention_fwd_kernel, fixed=dict(D=128, causal=False))
    result = tune("attention_fwd", space.configs(args), time=..., check=...)
    ConfigCache().put("attention_fwd", sig, device, bucket, result.best, seconds=result.seconds)
"""

from tilestack.tune.cache import ConfigCache, size_bucket
from tilestack.tune.search import TuneResult, tune
from tilestack.tune.space import SearchSpace

__all__ = ["ConfigCache", "SearchSpace", "TuneResult", "size_bucket", "tune"]
