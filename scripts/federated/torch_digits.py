"""PyTorch models on federated clients: a CNN and a small transformer on scikit-learn's digits.

    PYTHONPATH=src python3 scripts/federated/torch_digits.py          # about 4 minutes on 2 CPU cores

10 clients, all of them every round (FedAvg), 3 local epochs of SGD (batch 32) per round; IID clients and
Dirichlet(0.1) label skew. Prints a markdown table and writes docs/img/fl_torch_digits.png. Runs on the
GPU when there is one (the clients' torch models move there).
"""

from __future__ import annotations

import time

import _common  # noqa: F401  (single-threaded BLAS, Flower offline)
from flwr.serverapp.strategy import FedAvg

from tilestack.federated import Task, simulate
from tilestack.federated.plots import plot_grid

RUNS = [  # (label, model, partitioner, lr, rounds)
    ("CNN, IID", "cnn", "iid", 0.3, 15),
    ("CNN, Dirichlet 0.1", "cnn", "dirichlet", 0.3, 30),
    ("transformer, IID", "transformer", "iid", 0.1, 20),
    ("transformer, Dirichlet 0.1", "transformer", "dirichlet", 0.1, 30),
]


def main() -> None:
    histories, rows = {}, []
    for label, model, part, lr, rounds in RUNS:
        task = Task(dataset="digits", num_clients=10, model=model, partitioner=part, partition_alpha=0.1, lr=lr,
                    batch_size=32, local_epochs=3)  # fmt: skip
        t0 = time.perf_counter()
        res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), task, rounds=rounds)
        h = res.history
        histories[label] = h
        last = h.rounds[-1]
        rows.append(f"| {label} | {rounds} | {last.test_acc:.4f} | {max(h.column('test_acc')):.4f} | "
                    f"{last.client_acc['worst10']:.3f} | {time.perf_counter() - t0:.0f} |")  # fmt: skip
        print(rows[-1], flush=True)
    print("\n| run | rounds | test accuracy (last) | best | worst 10% of clients | seconds |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    panels = {"CNN": {k: v for k, v in histories.items() if k.startswith("CNN")},
              "transformer": {k: v for k, v in histories.items() if k.startswith("transformer")}}  # fmt: skip
    print(plot_grid(panels, ["test_acc"], _common.ROOT / "docs" / "img" / "fl_torch_digits.png"))


if __name__ == "__main__":
    main()
