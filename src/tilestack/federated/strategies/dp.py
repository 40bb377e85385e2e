"""Adaptive clipping for DP-FedAvg that moves its norm towards the updates (Andrew et al., NeurIPS 2021).

    from tilestack.federated.strategies import ServerSideAdaptiveClipping
    strategy = ServerSideAdaptiveClipping(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), noise_multiplier=1.0,
                                          num_sampled_clients=10, target_clipped_quantile=0.5, clip_norm_lr=0.2)

Subclasses of Flower 1.41's ``DifferentialPrivacyServerSideAdaptiveClipping`` / ``...ClientSideAdaptiveClipping``
(same arguments, sampling, clipping, noise and checks) with one change: the geometric update of the clipping norm.
Flower documents ``target_clipped_quantile`` as the share of updates that should be clipped, and moves the norm by
C <- C exp(-lr (clipped share - target)): with more updates clipped than wanted the norm shrinks, clipping still more
(every update clipped: 0.001 -> 0.00078 -> ...; none: 100 -> 128 -> ...), away from the updates. Andrew et al. move
it by the share b of updates *not* clipped towards the quantile gamma = 1 - target: C <- C exp(-lr (b - gamma)),
which is C exp(lr (clipped share - target)). The privacy is the same (the norm is still a function of the noised
count), only the direction differs. Flower's classes are left as they are: a strategy the user built from them runs
as Flower defines it.
"""

from __future__ import annotations

import math

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
)


def towards_the_quantile(clipping_norm: float, clipped_fraction: float, target_clipped_quantile: float,
                         clip_norm_lr: float) -> float:  # fmt: skip
    """The next clipping norm (Andrew et al. 2021, with Flower's target share clipped): grows while more updates are
    clipped than the target share, shrinks while fewer are."""
    return clipping_norm * math.exp(clip_norm_lr * (clipped_fraction - target_clipped_quantile))


class ServerSideAdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, its norm moved towards the target quantile of update norms."""

    def _geometric_update(self, clipped_fraction: float) -> None:
        self.clipping_norm = towards_the_quantile(
            self.clipping_norm, clipped_fraction, self.target_clipped_quantile, self.clip_norm_lr
        )


class ClientSideAdaptiveClipping(DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping (clients clip and report ``norm_bit``), its norm moved towards the
    target quantile of update norms."""

    def _geometric_update(self, clipped_fraction: float) -> None:
        self.clipping_norm = towards_the_quantile(
            self.clipping_norm, clipped_fraction, self.target_clipped_quantile, self.clip_norm_lr
        )
