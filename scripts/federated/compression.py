"""Uplink compression against uncompressed updates: bytes per round and accuracy (digits CNN, IID clients).

    PYTHONPATH=src python3 scripts/federated/compression.py          # about 3 minutes on 2 CPU cores

The same run (10 clients, FedAvg, 15 rounds, 3 local epochs) with client updates sent as they are, as
8-bit codes, and as top-k (1%, 4%) with error feedback. Prints a markdown table and writes
docs/img/fl_compression.png.
"""

from __future__ import annotations

import _common  # noqa: F401  (single-threaded BLAS, Flower offline)
from flwr.serverapp.strategy import FedAvg

from tilestack.federated import Task, simulate
from tilestack.federated.compression import Compressed
from tilestack.federated.plots import plot_grid

ROUNDS = 15
VARIANTS = [("uncompressed", None, 0.0), ("int8", "int8", 0.0), ("top-k 4% + EF", "topk", 0.04),
            ("top-k 1% + EF", "topk", 0.01)]  # fmt: skip


def main() -> None:
    task = Task(dataset="digits", num_clients=10, model="cnn", lr=0.3, batch_size=32, local_epochs=3)
    histories, rows, base = {}, [], None
    for label, method, ratio in VARIANTS:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0)
        if method:
            strategy = Compressed(strategy, method, ratio)
        h = simulate(strategy, task, rounds=ROUNDS).history
        histories[label] = h
        up = sum(h.column("bytes_up")) / len(h.rounds)
        down = sum(h.column("bytes_down")) / len(h.rounds)
        acc = h.rounds[-1].test_acc
        base = base or (up, acc)
        rows.append(f"| {label} | {up:,.0f} | {base[0] / up:.1f}x | {down:,.0f} | {acc:.4f} | "
                    f"{100 * (acc - base[1]):+.2f} |")  # fmt: skip
        print(rows[-1], flush=True)
    print("\n| updates | bytes up / round | fewer bytes up | bytes down / round | test accuracy | vs uncompressed "
          "(points) |\n|---|---|---|---|---|---|")  # fmt: skip
    print("\n".join(rows))
    print(plot_grid({"digits CNN, 10 IID clients": histories}, ["test_acc"],
                    _common.ROOT / "docs" / "img" / "fl_compression.png"))  # fmt: skip


if __name__ == "__main__":
    main()
