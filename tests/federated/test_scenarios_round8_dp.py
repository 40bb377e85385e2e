"""Federated scenarios, round 8 (2 of 2): differential privacy with clients that send nothing new.

What this found, fixed: Flower's server-side clipping scales each update by min(1, C / ||update||) and divided by the
norm, so one client that sent the global model back unchanged (a free rider, a client with nothing left to learn)
ended a server-side DP run with ZeroDivisionError inside the wrapper. While a round aggregates, ``run_rounds`` now has
Flower's wrappers clip with a factor of 1 for an update of norm 0 (driver._clip_scale): the free rider's zero update
is averaged in as what it is.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _fl_round5 import blobs, make_grid, np_, scripted, update
from _fl_round8 import flat_clip
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)

from tilestack.federated import client as tsclient
from tilestack.federated import run_rounds
from tilestack.federated.driver import AGGREGATE_PHASE
from tilestack.federated.simulation import initial_arrays

UNIT = tsclient.UNIT_WEIGHT


def _free_rider(pid, rnd, got, context, config):
    """Client 2 sends the model it got back unchanged; the others a known update."""
    if pid == 2:
        return dict(got["arrays"]), {}
    return {k: v + update(pid, rnd, v.shape, np.float32) for k, v in got["arrays"].items()}, {}


@pytest.mark.timeout(60)
def test_server_side_fixed_clipping_averages_a_free_riders_zero_update_in():
    """DP-FedAvg (server-side clipping to C = 0.5, noise 0.4, four clients), client 2 a free rider, two rounds: before,
    the run ended in round 1 with ZeroDivisionError; now each round's model is the mean of the four clipped updates
    (client 2's is zero) plus the noise of NumPy's stream seeded by (seed, round, aggregate phase)."""
    task = blobs(4, features=3)
    noise, clip, seed = 0.4, 0.5, 13
    models: list[dict[str, np.ndarray]] = []

    def keep(strategy, arrays, server_round):
        models.append(np_(arrays))
        return {}

    inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=UNIT)
    s = DifferentialPrivacyServerSideFixedClipping(inner, noise, clip, 4)
    res = run_rounds(s, make_grid(scripted(_free_rider), task), initial_arrays(task), num_rounds=2, seed=seed,
                     extra_metrics=keep)  # fmt: skip
    assert all(r.num_aggregated == 4 and not r.skipped for r in res.history.rounds)
    x = np_(initial_arrays(task))
    for rnd in (1, 2):
        ups = {p: flat_clip({k: update(p, rnd, v.shape, np.float32) for k, v in x.items()}, clip) for p in (0, 1, 3)}
        mean = {k: x[k] + sum(ups[p][k] for p in ups) / 4 for k in x}  # client 2 adds 0 and counts
        state = int(np.random.SeedSequence([seed, rnd, AGGREGATE_PHASE]).generate_state(1)[0])
        stream = np.random.RandomState(state % 2**32)
        for k, v in mean.items():
            want = v + stream.normal(0, noise * clip / 4, v.shape)
            np.testing.assert_allclose(models[rnd - 1][k], want, rtol=2**-22, atol=1e-7, err_msg=k)
        x = models[rnd - 1]


@pytest.mark.timeout(60)
def test_server_side_adaptive_clipping_with_a_free_rider_runs_and_counts_it_unclipped():
    """Flower's adaptive clipping with a free rider: before, ZeroDivisionError in round 1; now every round aggregates
    the four replies, the model stays finite, and the clipping norm moves by the share of clipped updates (the free
    rider's zero update is one that was not clipped)."""
    task = blobs(4, features=3)
    inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=UNIT)
    s = DifferentialPrivacyServerSideAdaptiveClipping(inner, noise_multiplier=0.3, num_sampled_clients=4,
                                                      initial_clipping_norm=0.5)  # fmt: skip
    res = run_rounds(s, make_grid(scripted(_free_rider), task), initial_arrays(task), num_rounds=3, seed=2)
    assert all(r.num_aggregated == 4 and not r.skipped for r in res.history.rounds)
    assert all(np.all(np.isfinite(v)) for v in np_(res.arrays).values())
    assert math.isfinite(s.clipping_norm) and s.clipping_norm > 0 and s.clipping_norm != 0.5
