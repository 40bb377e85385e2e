"""IFCA recovers planted client groups that one global model cannot serve.

    .venv/bin/python scripts/federated/clustering.py [--groups 4] [--rounds 30]

40 clients in ``groups`` planted groups; each group labels x ~ N(0, I) with its own teacher, so the groups
disagree on labels. IFCA (K = groups) against FedAvg; the agreement of IFCA's cluster choices with the
planted groups is the adjusted Rand index (1 = recovered exactly). Writes docs/federated/clustering.png/.json.
"""

from __future__ import annotations

import argparse
import json
import time

import _common  # noqa: F401
from flwr.serverapp.strategy import FedAvg

from tilestack.federated import Task, simulate
from tilestack.federated.plots import plot_rounds
from tilestack.federated.strategies import IFCA

NUM_CLIENTS, PER_ROUND = 40, 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    task = Task(dataset="clustered", num_clients=NUM_CLIENTS, groups=args.groups, num_features=20, num_classes=5,
                samples_per_client=200, lr=0.1, local_steps=20, seed=args.seed)  # fmt: skip
    common = dict(fraction_train=PER_ROUND / NUM_CLIENTS, fraction_evaluate=0.0, min_train_nodes=PER_ROUND)
    t0 = time.time()
    ifca = IFCA(num_clusters=args.groups, **common)
    ari = []
    res_ifca = simulate(ifca, task, rounds=args.rounds, initial=ifca.initial_arrays(task), seed=args.seed,
                        extra_metrics=lambda s, a, r: {"ari": s.agreement(task)})  # fmt: skip
    ari = [r.extra["ari"] for r in res_ifca.history.rounds]
    res_avg = simulate(FedAvg(**common), task, rounds=args.rounds, seed=args.seed)
    title = f"{args.groups} planted groups, {NUM_CLIENTS} clients"
    runs = {f"IFCA (K={args.groups})": res_ifca.history, "FedAvg": res_avg.history}
    plot_rounds(runs, "test_acc", _common.DOCS / "clustering.png", title=title)
    out = {
        "machine": _common.machine(), "rounds": args.rounds, "groups": args.groups, "seconds": time.time() - t0,
        "ifca_final_test_acc": res_ifca.history.rounds[-1].test_acc,
        "fedavg_final_test_acc": res_avg.history.rounds[-1].test_acc,
        "ifca_adjusted_rand_index_per_round": ari,
        "clients_assigned": len(ifca.assignments),
    }  # fmt: skip
    (_common.DOCS / "clustering.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
