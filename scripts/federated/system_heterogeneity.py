"""System heterogeneity: a round deadline over clients of very different speed, and how to cope with it.

    .venv/bin/python scripts/federated/system_heterogeneity.py [--rounds 60]

100 clients on Synthetic(1,1) with speeds spread lognormally (log-std 1.0, so the slowest are ~20x slower
than the fastest), a 10% dropout rate and a round deadline of 1 simulated second; 10 clients per round,
20 local epochs. Compared: FedAvg that drops the clients who miss the deadline, FedProx (mu=1) that keeps
their partial work, and FedProx with Oort-style selection. Plots accuracy against simulated wall-clock time,
the 25th percentile of client accuracy (fairness) and bytes per round. Writes docs/federated/system.png/.json.
"""

from __future__ import annotations

import argparse
import json
import time

import _common  # noqa: F401
from flwr.serverapp.strategy import FedAvg, FedProx

from tilestack.federated import SystemModel, Task, simulate
from tilestack.federated.strategies import OortSelector, Selected

NUM, PER_ROUND, DEADLINE = 100, 10, 1.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    task = Task(dataset="synthetic", num_clients=NUM, max_samples=2000, lr=0.01, local_epochs=20, seed=args.seed)
    system = SystemModel(NUM, speed=2000.0, speed_sigma=1.0, bandwidth=1e6, dropout=0.1, deadline=DEADLINE,
                         seed=args.seed)  # fmt: skip
    common = dict(fraction_evaluate=0.3, min_evaluate_nodes=30, min_available_nodes=NUM)
    steps = [task.steps_for(p) for p in range(NUM)]
    runs = {
        "FedAvg, drops late clients": (FedAvg(fraction_train=PER_ROUND / NUM, min_train_nodes=PER_ROUND, **common),
                                       "drop"),
        "FedProx mu=1, partial work": (FedProx(fraction_train=PER_ROUND / NUM, min_train_nodes=PER_ROUND,
                                               proximal_mu=1.0, **common), "partial"),
        "FedProx mu=1, partial work, Oort selection": (
            Selected(FedProx(fraction_train=1.0, min_train_nodes=PER_ROUND, proximal_mu=1.0, fraction_evaluate=0.3,
                             min_evaluate_nodes=30, min_available_nodes=PER_ROUND),
                     OortSelector(system, full_steps=steps, seed=args.seed), PER_ROUND), "partial"),
    }  # fmt: skip
    histories, summary = {}, {}
    t0 = time.time()
    for label, (strategy, policy) in runs.items():
        res = simulate(strategy, task, rounds=args.rounds, system=system, stragglers=policy, seed=args.seed)
        h = histories[label] = res.history
        reasons: dict[str, int] = {}
        for r in h.rounds:
            for why in r.excluded.values():
                reasons[why.split(":")[0]] = reasons.get(why.split(":")[0], 0) + 1
        summary[label] = {
            "final_test_acc": h.rounds[-1].test_acc,
            "client_acc_p25": h.rounds[-1].client_acc.get("p25"),
            "client_acc_median": h.rounds[-1].client_acc.get("median"),
            "client_acc_jain": h.rounds[-1].client_acc.get("jain"),
            "simulated_seconds": sum(r.sim_time for r in h.rounds),
            "steps_done_share": sum(r.steps_done for r in h.rounds) / max(1, sum(r.steps_full for r in h.rounds)),
            "mb_down": sum(r.bytes_down for r in h.rounds) / 1e6,
            "mb_up": sum(r.bytes_up for r in h.rounds) / 1e6,
            "left_out": reasons,
        }
        print(label, json.dumps(summary[label]), flush=True)
    _plot(histories)
    out = {"machine": _common.machine(), "rounds": args.rounds, "seconds": time.time() - t0, "summary": summary}
    (_common.DOCS / "system.json").write_text(json.dumps(out, indent=1))


def _plot(histories) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for label, h in histories.items():
        t = np.cumsum([r.sim_time for r in h.rounds])
        axes[0].plot(t, [r.test_acc for r in h.rounds], label=label)
        axes[1].plot([r.round for r in h.rounds], [r.client_acc.get("p25", np.nan) for r in h.rounds], label=label)
        axes[2].plot([r.round for r in h.rounds], [r.bytes_up / 1e3 for r in h.rounds], label=label)
    for ax, (x, y) in zip(axes, [("simulated time (s)", "test accuracy"),
                                 ("round", "client accuracy, 25th percentile"),
                                 ("round", "kB uploaded per round")], strict=True):  # fmt: skip
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(_common.DOCS / "system.png", dpi=110)


if __name__ == "__main__":
    main()
