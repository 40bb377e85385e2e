"""FedProx vs FedAvg on Synthetic(1,1) with 0%, 50% and 90% stragglers (FedProx paper, Figure 1).

    .venv/bin/python scripts/federated/fedprox_stragglers.py [--rounds 100]

30 devices, 10 per round, E = 20 local epochs, batch 10, lr 0.01, multinomial logistic regression.
Stragglers (a share of the selected devices each round) do k/E of the work, k uniform in 1..E-1.
FedAvg drops them (the paper's FedAvg); FedProx keeps their partial work, with mu = 0 and mu = 1.
Writes docs/federated/fedprox_stragglers.png and .json.
"""

from __future__ import annotations

import argparse
import json
import time

import _common  # noqa: F401  (environment first)
from flwr.serverapp.strategy import FedAvg, FedProx

from tilestack.federated import SystemModel, Task, simulate
from tilestack.federated.plots import plot_grid

NUM_DEVICES, PER_ROUND = 30, 10


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    task = Task(dataset="synthetic", alpha=1.0, beta=1.0, num_clients=NUM_DEVICES, seed=args.seed,
                lr=0.01, batch_size=10, local_epochs=20)  # fmt: skip
    common = dict(fraction_train=PER_ROUND / NUM_DEVICES, fraction_evaluate=0.0, min_train_nodes=PER_ROUND)
    panels, summary = {}, {}
    t0 = time.time()
    for share in (0.0, 0.5, 0.9):
        system = SystemModel(NUM_DEVICES, straggler_fraction=share, straggler_epochs=20, seed=args.seed)
        runs = {
            "FedAvg (drops stragglers)": (FedAvg(**common), "drop"),
            "FedProx mu=0": (FedProx(**common, proximal_mu=0.0), "partial"),
            "FedProx mu=1": (FedProx(**common, proximal_mu=1.0), "partial"),
        }
        panel = {}
        for label, (strategy, policy) in runs.items():
            res = simulate(strategy, task, rounds=args.rounds, system=system, stragglers=policy, seed=args.seed)
            panel[label] = res.history
            last = res.history.rounds[-10:]
            summary[f"{int(share * 100)}% / {label}"] = {
                "final_train_loss": sum(r.train_loss for r in last) / len(last),
                "final_test_acc": sum(r.test_acc for r in last) / len(last),
                "max_train_loss_last_half": max(r.train_loss for r in res.history.rounds[args.rounds // 2 :]),
            }
            print(f"{share:.0%} {label:28s} loss {summary[f'{int(share * 100)}% / {label}']['final_train_loss']:.3f} "
                  f"acc {summary[f'{int(share * 100)}% / {label}']['final_test_acc']:.3f}", flush=True)  # fmt: skip
        panels[f"{int(share * 100)}% stragglers"] = panel
    plot_grid(panels, ["train_loss", "test_acc"], _common.DOCS / "fedprox_stragglers.png")
    out = {"machine": _common.machine(), "rounds": args.rounds, "seconds": time.time() - t0, "summary": summary}
    (_common.DOCS / "fedprox_stragglers.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
