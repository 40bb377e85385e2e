"""q-FedAvg's client accuracy distribution against FedAvg, and CFL beside IFCA on planted client groups.

    PYTHONPATH=src python3 scripts/federated/fairness_clustering.py    # about 2 minutes on 2 CPU cores

Fairness: Synthetic(1, 1), 30 clients, 10 per round, 60 rounds of 5 local steps; q in {0, 0.5, 1, 2}
(q = 0 is the plain mean of client models) beside FedAvg; the distribution of the clients' test
accuracies (mean, variance, worst 10%, Jain). Clustering: the ``clustered`` task with 2 and 4 planted
groups (20 and 40 clients, everyone every round, 20 rounds), FedAvg vs IFCA (K = groups) vs CFL (no K
given). Prints markdown tables; writes docs/img/fl_qffl.png and docs/img/fl_cfl.png.
"""

from __future__ import annotations

import _common  # noqa: F401  (single-threaded BLAS, Flower offline)
from flwr.serverapp.strategy import FedAvg

from tilestack.federated import Task, simulate
from tilestack.federated.plots import plot_grid
from tilestack.federated.strategies import CFL, IFCA, QFFL


def fairness() -> None:
    task = Task(dataset="synthetic", alpha=1, beta=1, num_clients=30, local_steps=5, lr=0.05)
    runs = {"FedAvg": FedAvg(fraction_train=1 / 3, fraction_evaluate=0.0)}
    for q in (0.0, 0.5, 1.0, 2.0):
        runs[f"q-FedAvg q={q:g}"] = QFFL(q=q, client_learning_rate=task.lr * task.local_steps, fraction_train=1 / 3,
                                         fraction_evaluate=0.0)  # fmt: skip
    print("| method | test accuracy | client mean | variance | worst 10% | worst | Jain |")
    print("|---|---|---|---|---|---|---|")
    hs = {}
    for label, s in runs.items():
        h = simulate(s, task, rounds=60).history
        hs[label] = h
        c, last = h.rounds[-1].client_acc, h.rounds[-1]
        print(f"| {label} | {last.test_acc:.3f} | {c['mean']:.3f} | {c['var']:.4f} | {c['worst10']:.3f} | "
              f"{c['worst']:.3f} | {c['jain']:.3f} |", flush=True)  # fmt: skip
    print(plot_grid({"Synthetic(1,1)": hs}, ["test_acc", "client_acc.worst10"],
                    _common.ROOT / "docs" / "img" / "fl_qffl.png"))  # fmt: skip


def clustering() -> None:
    print("\n| groups | method | test accuracy | ARI vs planted groups | clusters found |\n|---|---|---|---|---|")
    panels = {}
    for groups, clients in ((2, 20), (4, 40)):
        task = Task(dataset="clustered", num_clients=clients, groups=groups, num_features=20, num_classes=5,
                    local_steps=20, lr=0.1)  # fmt: skip
        hs = {}
        for label, s in (("FedAvg", FedAvg(fraction_train=1.0, fraction_evaluate=0.0)),
                         ("IFCA", IFCA(num_clusters=groups, fraction_train=1.0, fraction_evaluate=0.0)),
                         ("CFL", CFL(fraction_train=1.0, fraction_evaluate=0.0))):  # fmt: skip
            init = s.initial_arrays(task) if hasattr(s, "initial_arrays") else None
            h = simulate(s, task, rounds=20, initial=init).history
            hs[label] = h
            ari = f"{s.agreement(task):.3f}" if hasattr(s, "agreement") else "-"
            found = 1 + len(s.splits) if isinstance(s, CFL) else (groups if isinstance(s, IFCA) else 1)
            print(f"| {groups} | {label} | {h.rounds[-1].test_acc:.3f} | {ari} | {found} |", flush=True)
        panels[f"{groups} planted groups"] = hs
    print(plot_grid(panels, ["test_acc"], _common.ROOT / "docs" / "img" / "fl_cfl.png"))


if __name__ == "__main__":
    fairness()
    clustering()
