"""Helpers of the round 7 federated scenario tests: tilestack's client training replayed by hand, and the child
processes the kill tests run (``python _fl_round7.py CHECKPOINT``, ``python _fl_round7.py --workers``)."""

import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from flwr.serverapp.strategy import FedAdam

from tilestack.federated import Task
from tilestack.federated.compression import Compressed
from tilestack.federated.models import MLP, local_sgd

HANG_FILE = "TILESTACK_TEST_HANG_FILE"  # env: the file a HangingFedAdam touches before it hangs
HANG_ROUND = 3


def client_model(task: Task, pid: int, rnd: int, start: dict[str, np.ndarray], *, work: float = 1.0,
                 mu: float = 0.0) -> tuple[dict[str, np.ndarray], int]:  # fmt: skip
    """What tilestack's client ``pid`` sends in round ``rnd`` from ``start`` when asked for ``work`` of its local
    steps (``ceil(work * full)``), and the steps it did: the same seeded minibatches (rng (seed, pid, round, 13))."""
    x, y, _, _ = task.client_data(pid)
    full = task.steps_for(pid)
    steps = max(1, math.ceil(work * full))
    model = task.build_model()
    if "fc1.weight" in start:  # an MLP of the width it was sent (HeteroFL)
        model = MLP(task.features, start["fc1.weight"].shape[1], task.classes, norm=task.norm)
    rng = np.random.default_rng([task.seed, pid, rnd, 13])
    trained, done, _ = local_sgd(model, start, x, y, steps=steps, batch_size=task.batch_size, lr=task.lr, rng=rng,
                                 prox_mu=mu)  # fmt: skip
    return {k: v.astype(np.float32) for k, v in trained.items()}, done


def weighted_mean(models: dict[int, dict[str, np.ndarray]], weights: dict[int, float]) -> dict[str, np.ndarray]:
    """The float64 weighted mean of the clients' float32 models."""
    total = float(sum(weights[p] for p in models))
    keys = next(iter(models.values())).keys()
    return {k: sum(weights[p] * models[p][k].astype(np.float64) for p in models) / total for k in keys}


class HangingFedAdam(FedAdam):
    """FedAdam that, in a process whose environment names ``HANG_FILE``, touches that file in round ``HANG_ROUND``
    once its clients have trained and then hangs, so that a test can kill the process mid-round."""

    def aggregate_train(self, server_round, replies):
        if server_round == HANG_ROUND and os.environ.get(HANG_FILE):
            Path(os.environ[HANG_FILE]).touch()
            time.sleep(600)
        return super().aggregate_train(server_round, replies)


def kill_task() -> Task:
    return Task(dataset="blobs", num_samples=240, num_features=4, num_classes=3, num_clients=6, local_steps=3,
                lr=0.1, partitioner="dirichlet", partition_alpha=0.3)  # fmt: skip


def kill_strategy() -> Compressed:
    """Top-k updates with error feedback: each client's residual lives in the engine's per-node state."""
    inner = HangingFedAdam(fraction_train=0.5, fraction_evaluate=0.5, eta=0.05, min_available_nodes=6)
    return Compressed(inner, "topk", 0.3)


KILL_ROUNDS, KILL_SEED = 5, 4
WORKERS = "--workers"


def print_workers_then_hang(metrics) -> None:
    """``on_round`` of the ``--workers`` child: print the pids of its worker processes, then hang (to be killed)."""
    import multiprocessing

    print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
    time.sleep(600)


if __name__ == "__main__":  # the child: the run a test kills while round HANG_ROUND aggregates
    from _fl_round7 import kill_strategy as by_module_name  # pickled as _fl_round7.HangingFedAdam, not __main__'s

    from tilestack.federated import simulate

    if sys.argv[1] == WORKERS:  # a round on two worker processes, then hang
        simulate(FedAdam(fraction_train=1.0, fraction_evaluate=0.0), kill_task(), rounds=2, workers=2,
                 on_round=print_workers_then_hang, evaluate=False)  # fmt: skip
    else:
        simulate(by_module_name(), kill_task(), rounds=KILL_ROUNDS, seed=KILL_SEED, checkpoint=sys.argv[1])
