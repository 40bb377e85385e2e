"""The alpha-beta cost of the collectives, and its fit to measurements.

    ring_allreduce_time(S, N, alpha, B) = 2 (N - 1) alpha + 2 (N - 1) / N * S / B      (Patarasuk & Yuan 2009)
    ps_time(S, N, k, B)                 = N S / (k B)   (each of k servers receives N workers' S / k bytes)
    alpha, B = fit_ring(sizes, times, N)               # least squares over measured (bytes, seconds)

alpha: the latency of one message (s); B: the bandwidth of one link (bytes/s); S: bytes reduced per rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ring_allreduce_time(nbytes: float, world_size: int, alpha: float, bandwidth: float) -> float:
    n = world_size
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes / bandwidth


def ps_time(nbytes: float, n_workers: int, n_servers: int, bandwidth: float) -> float:
    return n_workers * nbytes / (n_servers * bandwidth)


def fit_ring(sizes: Sequence[float], times: Sequence[float], world_size: int) -> tuple[float, float]:
    """(alpha seconds, bandwidth bytes/s) of the ring model fitted to times(sizes) by least squares: t = a + b S
    with a = 2 (N - 1) alpha and b = 2 (N - 1) / (N B). Needs two sizes or more and N >= 2."""
    if world_size < 2:
        raise ValueError(f"fit_ring: world_size={world_size}; expected >= 2 (one rank sends nothing)")
    if len(sizes) != len(times) or len(set(sizes)) < 2:
        raise ValueError(f"fit_ring: {len(sizes)} sizes ({len(set(sizes))} distinct) and {len(times)} times; "
                         "expected as many times as sizes, two distinct sizes or more")
    s, t = np.asarray(sizes, dtype=np.float64), np.asarray(times, dtype=np.float64)
    b, a = np.polyfit(s, t, 1)
    n = world_size
    return a / (2 * (n - 1)), 2 * (n - 1) / (n * b)
