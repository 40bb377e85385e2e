"""Robust aggregation with 20% of clients sending poisoned updates, against plain FedAvg.

    .venv/bin/python scripts/federated/robust_aggregation.py [--rounds 40] [--attack signflip|noise]

50 clients (a Gaussian-mixture task, 10 classes, class-mean spread 0.5, multinomial logistic regression),
20 per round; 10 of the 50 (20%) are malicious: they train honestly and send their update reversed and scaled by 10
(signflip) or their model plus N(0, 10^2) noise. Flower's FedAvg, FedMedian, FedTrimmedAvg, Krum,
MultiKrum and Bulyan are run unchanged in tilestack's engine. Writes docs/federated/robust_<attack>.png/.json.
"""

from __future__ import annotations

import argparse
import json
import time

import _common  # noqa: F401
from flwr.serverapp import strategy as fl

from tilestack.federated import Task, simulate
from tilestack.federated.plots import plot_rounds

NUM_CLIENTS, PER_ROUND, MALICIOUS = 50, 20, 0.2
ASSUMED_BAD = 5  # per round: 20% of 20 is 4 on average; the robust rules are told a little more


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--attack", default="signflip", choices=("signflip", "noise"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    base = dict(dataset="blobs", num_clients=NUM_CLIENTS, num_features=20, num_classes=10, num_samples=10000,
                separation=0.5, lr=0.05, batch_size=10, local_steps=20, attack=args.attack, seed=args.seed)  # fmt: skip
    common = dict(fraction_train=PER_ROUND / NUM_CLIENTS, fraction_evaluate=0.0, min_train_nodes=PER_ROUND)
    strategies = {
        "FedAvg, no attack": (fl.FedAvg(**common), 0.0),
        "FedAvg": (fl.FedAvg(**common), MALICIOUS),
        "FedMedian": (fl.FedMedian(**common), MALICIOUS),
        "FedTrimmedAvg (beta=0.3)": (fl.FedTrimmedAvg(**common, beta=0.3), MALICIOUS),
        "Krum": (fl.Krum(**common, num_malicious_nodes=ASSUMED_BAD), MALICIOUS),
        "MultiKrum": (fl.MultiKrum(**common, num_malicious_nodes=ASSUMED_BAD, num_nodes_to_select=10), MALICIOUS),
        "Bulyan": (fl.Bulyan(**common, num_malicious_nodes=4), MALICIOUS),
    }
    runs, summary = {}, {}
    t0 = time.time()
    for label, (strategy, share) in strategies.items():
        task = Task(**base, malicious_fraction=share)
        res = simulate(strategy, task, rounds=args.rounds, seed=args.seed)
        runs[label] = res.history
        last = res.history.rounds[-5:]
        summary[label] = {"final_test_acc": sum(r.test_acc for r in last) / len(last)}
        print(f"{label:28s} acc {summary[label]['final_test_acc']:.3f}", flush=True)
    plot_rounds(runs, "test_acc", _common.DOCS / f"robust_{args.attack}.png",
                title=f"20% of clients poisoned ({args.attack})")  # fmt: skip
    out = {"machine": _common.machine(), "rounds": args.rounds, "attack": args.attack,
           "seconds": time.time() - t0, "summary": summary}  # fmt: skip
    (_common.DOCS / f"robust_{args.attack}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
