"""IFCA recovers planted client groups that one global model cannot serve.

    .venv/bin/python scripts/federated/clustering.py [--groups 2 4] [--seeds 0 1 2] [--rounds 30]

40 clients in ``groups`` planted groups; each group labels x ~ N(0, I) with its own teacher, so the groups
disagree on labels. IFCA (K = groups, 20 clients per round) against FedAvg. The agreement of IFCA's cluster
choices with the planted groups is the adjusted Rand index (ARI: 1 = recovered exactly, 0 = chance).
Writes docs/federated/clustering.png (first seed of each group count) and clustering.json.
"""

from __future__ import annotations

import argparse
import json
import time

import _common  # noqa: F401
from flwr.serverapp.strategy import FedAvg

from tilestack.federated import Task, simulate
from tilestack.federated.plots import plot_grid
from tilestack.federated.strategies import IFCA

NUM_CLIENTS, PER_ROUND = 40, 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    common = dict(fraction_train=PER_ROUND / NUM_CLIENTS, fraction_evaluate=0.0, min_train_nodes=PER_ROUND)
    t0 = time.time()
    panels, rows = {}, []
    for groups in args.groups:
        for seed in args.seeds:
            task = Task(dataset="clustered", num_clients=NUM_CLIENTS, groups=groups, num_features=20,
                        num_classes=5, samples_per_client=200, lr=0.1, local_steps=20, seed=seed)  # fmt: skip
            ifca = IFCA(num_clusters=groups, **common)
            res_ifca = simulate(ifca, task, rounds=args.rounds, initial=ifca.initial_arrays(task), seed=seed,
                                extra_metrics=lambda s, a, r, t=task: {"ari": s.agreement(t)})  # fmt: skip
            res_avg = simulate(FedAvg(**common), task, rounds=args.rounds, seed=seed)
            row = {
                "groups": groups, "seed": seed, "ifca_final_ari": res_ifca.history.rounds[-1].extra["ari"],
                "ifca_final_test_acc": res_ifca.history.rounds[-1].test_acc,
                "fedavg_final_test_acc": res_avg.history.rounds[-1].test_acc,
            }  # fmt: skip
            rows.append(row)
            print(row, flush=True)
            if seed == args.seeds[0]:
                panels[f"{groups} planted groups (seed {seed})"] = {
                    f"IFCA (K={groups})": res_ifca.history, "FedAvg": res_avg.history,
                }  # fmt: skip
    plot_grid(panels, ["test_acc", "extra.ari"], _common.DOCS / "clustering.png")
    out = {"machine": _common.machine(), "rounds": args.rounds, "seconds": time.time() - t0, "runs": rows}
    (_common.DOCS / "clustering.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
