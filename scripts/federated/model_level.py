"""Model-level methods on the tasks they are made for, and client-level DP with its epsilon.

    .venv/bin/python scripts/federated/model_level.py [--rounds 40]

- Label skew with unequal local work (blobs, Dirichlet alpha = 0.1 over 30 clients, half of each round's
  clients stragglers): FedAvg, FedProx (mu = 0.1), SCAFFOLD, FedNova, FedAdam, FedYogi.
- Feature shift (every client distorts its inputs its own way; MLP with batch norm): FedAvg vs FedBN,
  judged by federated evaluation on each client's own test data.
- Width heterogeneity (MLP, hidden 64): a third of the clients can hold the full model, a third half,
  a third a quarter. HeteroFL (everyone trains a sub-model of one global model) against FedAvg over the
  full-width clients only, and FedDF (server-side distillation on unlabeled inputs) against FedAvg.
- Client-level DP (Flower's server-side fixed clipping + Flower's RDP accountant, delta = 1/N) at three
  noise levels: accuracy and epsilon after the run.
Writes docs/federated/model_level.json and model_level.png.
"""

from __future__ import annotations

import argparse
import json
import time

import _common  # noqa: F401
import numpy as np
from flwr.serverapp import strategy as fl
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from tilestack.federated import SystemModel, Task, simulate
from tilestack.federated.plots import plot_grid
from tilestack.federated.strategies import FedBN, FedDF, FedNova, HeteroFL, Scaffold, Selected, make_strategy


def _last(h, key="test_acc", n=5):
    vals = [getattr(r, key) if key != "client_mean" else r.client_acc.get("mean", float("nan")) for r in h.rounds]
    return float(np.mean(vals[-n:]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    R, seed, out, panels = args.rounds, args.seed, {}, {}
    t0 = time.time()

    # 1. label skew + unequal work
    task = Task(dataset="blobs", num_clients=30, num_features=20, separation=0.5, partitioner="dirichlet",
                partition_alpha=0.1, lr=0.05, local_epochs=2, seed=seed)  # fmt: skip
    system = SystemModel(30, straggler_fraction=0.5, straggler_epochs=10, seed=seed)
    kw = dict(fraction_train=1 / 3, fraction_evaluate=0.0, min_train_nodes=10)
    runs = {
        "FedAvg": fl.FedAvg(**kw), "FedProx mu=0.1": fl.FedProx(**kw, proximal_mu=0.1), "SCAFFOLD": Scaffold(**kw),
        "FedNova": FedNova(**kw), "FedAdam": fl.FedAdam(**kw, eta=0.03), "FedYogi": fl.FedYogi(**kw, eta=0.03),
    }  # fmt: skip
    hs = {k: simulate(s, task, rounds=R, system=system, seed=seed).history for k, s in runs.items()}
    out["label_skew_unequal_work"] = {k: _last(h) for k, h in hs.items()}
    panels["label skew (Dir 0.1), 50% stragglers"] = hs
    print(out["label_skew_unequal_work"], flush=True)

    # 2. feature shift: FedBN
    task = Task(dataset="blobs", num_clients=20, num_features=20, separation=0.5, model="mlp", hidden=32, norm=True,
                feature_shift=1.0, lr=0.05, local_steps=30, seed=seed)  # fmt: skip
    kw = dict(fraction_train=0.5, fraction_evaluate=1.0)
    hs = {k: simulate(s, task, rounds=R, seed=seed).history for k, s in
          {"FedAvg": fl.FedAvg(**kw), "FedBN": FedBN(**kw)}.items()}  # fmt: skip
    out["feature_shift_client_acc"] = {k: _last(h, "client_mean") for k, h in hs.items()}
    print(out["feature_shift_client_acc"], flush=True)

    # 3. width heterogeneity: HeteroFL, FedDF
    task = Task(dataset="blobs", num_clients=30, num_features=20, separation=0.5, model="mlp", hidden=64, lr=0.05,
                local_steps=20, seed=seed)  # fmt: skip
    width = {0: 1.0, 1: 0.5, 2: 0.25}
    kw = dict(fraction_train=1.0, fraction_evaluate=0.0)
    full_only = Selected(fl.FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=10,
                                   min_available_nodes=10), _FullWidth(), per_round=10)  # fmt: skip
    unlabeled = np.concatenate([task.client_data(p)[0] for p in range(30)])[:2000]
    hs = {
        "HeteroFL (widths 1, 1/2, 1/4)": simulate(HeteroFL(width_of=lambda p: width[p % 3], hidden=64, **kw), task,
                                                  rounds=R, seed=seed).history,
        "FedAvg, full-width clients only": simulate(full_only, task, rounds=R, seed=seed).history,
        "FedAvg, all clients full width": simulate(fl.FedAvg(**kw), task, rounds=R, seed=seed).history,
        "FedDF (distil on 2,000 unlabeled)": simulate(FedDF(model=task.build_model(), unlabeled=unlabeled, steps=50,
                                                            **kw), task, rounds=R, seed=seed).history,
    }  # fmt: skip
    out["width_heterogeneity"] = {k: _last(h) for k, h in hs.items()}
    panels["MLP widths"] = hs
    print(out["width_heterogeneity"], flush=True)

    # 4. client-level DP
    task = Task(dataset="blobs", num_clients=100, num_features=20, separation=0.5, lr=0.05, local_steps=20,
                seed=seed)  # fmt: skip
    dp = {}
    for noise in (0.3, 1.0, 3.0):
        acc = RdpAccountant(PrivacyConfig(1 / 100, 100, NeighboringRelation.ADD_OR_REMOVE_ONE,
                                          SamplingMethod.NO_AMPLIFICATION))  # fmt: skip
        s = make_strategy("dp-fedavg", clients_per_round=20, num_clients=100, noise_multiplier=noise,
                          clipping_norm=1.0, accountant=acc)  # fmt: skip
        h = simulate(s, task, rounds=R, seed=seed).history
        dp[f"noise {noise}"] = {"test_acc": _last(h), "epsilon": acc.get_privacy_spent().epsilon, "delta": 0.01}
    h = simulate(make_strategy("fedavg", clients_per_round=20, num_clients=100), task, rounds=R, seed=seed).history
    dp["no DP"] = {"test_acc": _last(h), "epsilon": float("inf"), "delta": 0.0}
    out["client_level_dp"] = dp
    print(dp, flush=True)

    plot_grid(panels, ["test_acc"], _common.DOCS / "model_level.png")
    out |= {"machine": _common.machine(), "rounds": R, "seconds": time.time() - t0}
    (_common.DOCS / "model_level.json").write_text(json.dumps(out, indent=1))


class _FullWidth:
    """Selects the full-width clients (partition id % 3 == 0)."""

    def select(self, server_round, node_ids, k, grid):
        return [n for n in node_ids if grid.partition_of[n] % 3 == 0][:k]

    def observe(self, server_round, replies):
        pass


if __name__ == "__main__":
    main()
