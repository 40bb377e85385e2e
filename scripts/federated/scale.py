"""Scale and speed: tilestack's in-process engine beside Flower's Simulation Engine, same strategy and seed.

    .venv/bin/python scripts/federated/scale.py [--clients 1000 10000] [--rounds 10]

Task as in ../shared/ANCHORS.md: Synthetic(1,1) over N clients (sizes capped at 1,000 samples), 100 clients
per round, multinomial logistic regression (60 -> 10), 20 local SGD steps of batch 10. The strategy is
Flower's own ``FedAvg`` (one object per engine, same arguments); both engines run the same ServerApp loop
(``run_rounds`` over ``ManagedGrid``) and the same ClientApp. Reports the median seconds per round
(rounds 2..R; round 1 carries Ray's start-up), the set-up time (node start and roll call), and whether
the final global models are bit-identical. tilestack's engine runs once in one process and once with two
worker processes (the machine's two cores, as Flower's two Ray actors use them).
Writes docs/federated/scale.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import _common  # noqa: F401
import numpy as np
from flwr.serverapp.strategy import FedAvg

from tilestack.federated import Evaluator, Task, simulate
from tilestack.federated.strategies._util import to_record

PER_ROUND = 100


def run(engine: str, task: Task, rounds: int, seed: int, workers: int = 1) -> dict:
    strategy = FedAvg(fraction_train=PER_ROUND / task.num_clients, fraction_evaluate=0.0,
                      min_train_nodes=PER_ROUND, min_available_nodes=task.num_clients)  # fmt: skip
    t0 = time.perf_counter()
    res = simulate(strategy, task, rounds=rounds, engine=engine, seed=seed, evaluate=False, workers=workers)
    total = time.perf_counter() - t0
    per_round = [r.wall_time for r in res.history.rounds]
    steady = per_round[1:] if len(per_round) > 1 else per_round
    median = statistics.median(steady)
    return {
        "engine": engine if engine == "flower" else f"tilestack, {workers} process(es)",
        "median_s_per_round": median,
        "rounds_per_s": 1.0 / median,
        "first_round_s": per_round[0],
        "setup_s": total - sum(per_round),
        "total_s": total,
        "arrays": {k: v.numpy() for k, v in res.arrays.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--long-rounds", type=int, default=100, help="then this many rounds on tilestack's engine alone")
    args = ap.parse_args()
    results = []
    for n in args.clients:
        task = Task(dataset="synthetic", alpha=1, beta=1, num_clients=n, max_samples=1000, local_steps=20,
                    batch_size=10, lr=0.01, seed=args.seed)  # fmt: skip
        ours = run("tilestack", task, args.rounds, args.seed)
        ours2 = run("tilestack", task, args.rounds, args.seed, workers=2)
        flower = run("flower", task, args.rounds, args.seed)
        same = all(
            np.array_equal(ours["arrays"][k], flower["arrays"][k])
            and np.array_equal(ours2["arrays"][k], flower["arrays"][k])
            for k in ours["arrays"]
        )
        acc = Evaluator(task, 200)(to_record(ours["arrays"]))[1]
        row = {
            "clients": n, "per_round": PER_ROUND, "rounds": args.rounds, "identical_final_model": same,
            "test_acc_after_rounds": acc,
            "speedup_rounds_per_s": flower["median_s_per_round"] / ours["median_s_per_round"],
            "speedup_rounds_per_s_2_workers": flower["median_s_per_round"] / ours2["median_s_per_round"],
            "tilestack": {k: v for k, v in ours.items() if k != "arrays"},
            "tilestack_2_workers": {k: v for k, v in ours2.items() if k != "arrays"},
            "flower": {k: v for k, v in flower.items() if k != "arrays"},
        }  # fmt: skip
        if args.long_rounds:  # does the model learn? (tilestack's engine only; Flower's would take minutes)
            strategy = FedAvg(fraction_train=PER_ROUND / n, fraction_evaluate=0.0, min_train_nodes=PER_ROUND,
                              min_available_nodes=n)  # fmt: skip
            long = simulate(strategy, task, rounds=args.long_rounds, seed=args.seed, eval_clients=200)
            row["long_run"] = {"rounds": args.long_rounds, "test_acc": [r.test_acc for r in long.history.rounds]}
        results.append(row)
        print(json.dumps(row, indent=1), flush=True)
    out = {"machine": _common.machine(), "results": results}
    name = "scale.json" if len(args.clients) > 1 else f"scale_{args.clients[0]}.json"
    (_common.DOCS / name).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
