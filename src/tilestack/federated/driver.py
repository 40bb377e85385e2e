"""The round loop: Flower ``Strategy`` hooks over a ``ManagedGrid``, with metrics, checkpoints and resume.

    from tilestack.federated.driver import run_rounds
    result = run_rounds(strategy, grid, initial_arrays, num_rounds=50, train_config=cfg,
                        evaluator=Evaluator(task), checkpoint="run.ckpt", seed=0)
    result.arrays, result.history.rounds[-1].test_acc

It calls the strategy exactly as Flower's ``Strategy.start`` does (configure_train, send, aggregate_train,
configure_evaluate, send, aggregate_evaluate, then server-side evaluation), and adds what ``start`` lacks:

- Seeding: Flower's node sampling uses Python's global ``random`` and takes no seed; the loop seeds it from
  (seed, round) just before each configure call, so a run is reproducible and engines can be compared.
- Safety: an aggregate with a non-finite value is rejected (the global model stays as it was, the reason
  is logged) - the server never adopts a NaN.
- Resume: after every completed round the server state (round, global arrays, the strategy object with
  its own state such as server-optimiser moments or SCAFFOLD's c, metrics, and the in-process engine's
  per-client state) is written to ``checkpoint`` atomically (temporary file, fsync, rename); a later call
  with the same checkpoint starts after the last completed round.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import Strategy

from tilestack.federated import codec
from tilestack.federated.evaluation import Evaluator
from tilestack.federated.grid import ManagedGrid
from tilestack.federated.metrics import History, RoundMetrics, fairness

log = logging.getLogger("tilestack.federated")
ROUND_SEED_STRIDE = 1_000_003


@dataclasses.dataclass
class RunResult:
    arrays: ArrayRecord
    history: History
    strategy: Strategy


def _round_seed(seed: int, server_round: int, phase: int) -> int:
    return (seed * ROUND_SEED_STRIDE + server_round) * 2 + phase


def _finite(arrays: ArrayRecord) -> bool:
    return all(np.all(np.isfinite(codec.decode(a))) for a in arrays.values())


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` so that ``path`` always holds a complete checkpoint (temporary file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f)


def run_rounds(
    strategy: Strategy,
    grid: ManagedGrid,
    initial_arrays: ArrayRecord,
    *,
    num_rounds: int,
    train_config: dict | None = None,
    evaluate_config: dict | None = None,
    evaluator: Evaluator | None = None,
    checkpoint: str | Path | None = None,
    seed: int = 0,
    timeout: float | None = None,
    on_round: Callable[[RoundMetrics], None] | None = None,
    extra_metrics: Callable[[Strategy, ArrayRecord, int], dict[str, float]] | None = None,
    stop_after: int | None = None,
) -> RunResult:
    """Run rounds ``1..num_rounds`` (or resume after the checkpoint's last round); see module doc.

    ``stop_after`` ends the call after that many rounds of this call (to test resuming).
    """
    if num_rounds < 0:
        raise ValueError(f"run_rounds: num_rounds={num_rounds!r}; expected >= 0")
    if not isinstance(grid, ManagedGrid):
        raise TypeError(f"run_rounds: grid is a {type(grid).__name__}; expected a ManagedGrid")
    ckpt = Path(checkpoint) if checkpoint is not None else None
    arrays, history, first = initial_arrays, History(), 1
    if ckpt is not None and ckpt.exists():
        state = load_checkpoint(ckpt)
        arrays = ArrayRecord(state["arrays"])
        strategy.__dict__.update(state["strategy"].__dict__)
        history = History.from_dict(state["history"])
        if state.get("grid_state") is not None and hasattr(grid.inner, "load_state_dict"):
            grid.inner.load_state_dict(state["grid_state"])
        first = state["round"] + 1
        log.info("resuming after round %d from %s", state["round"], ckpt)
    grid.get_node_ids()  # the roll call, before any seeding: it may draw random numbers on some engines
    done_now = 0
    for r in range(first, num_rounds + 1):
        if stop_after is not None and done_now >= stop_after:
            break
        t0 = time.perf_counter()
        grid.server_round = r
        random.seed(_round_seed(seed, r, 0))
        messages = strategy.configure_train(r, arrays, ConfigRecord(dict(train_config or {})), grid)
        replies = grid.send_and_receive(messages, timeout=timeout)
        try:
            new_arrays, _ = strategy.aggregate_train(r, replies)
        except InconsistentMessageReplies as ex:
            log.warning("round %d: aggregation skipped: %s", r, ex)
            new_arrays = None
        if new_arrays is not None and not _finite(new_arrays):
            log.warning("round %d: aggregate has non-finite values; the global model is kept", r)
            new_arrays = None
        if new_arrays is not None:
            arrays = new_arrays
        random.seed(_round_seed(seed, r, 1))
        eval_messages = strategy.configure_evaluate(r, arrays, ConfigRecord(dict(evaluate_config or {})), grid)
        eval_replies = grid.send_and_receive(eval_messages, timeout=timeout)
        strategy.aggregate_evaluate(r, eval_replies)
        rlog = grid.take_round_log()
        m = RoundMetrics(
            round=r,
            client_acc=fairness([float(c["eval-acc"]) for c in rlog["client_metrics"] if "eval-acc" in c]),
            num_selected=rlog["selected"],
            num_aggregated=rlog["aggregated"],
            steps_done=rlog["steps_done"],
            steps_full=rlog["steps_full"],
            bytes_down=rlog["bytes_down"],
            bytes_up=rlog["bytes_up"],
            sim_time=rlog["sim_time"],
            excluded=rlog["excluded"],
        )
        if evaluator is not None:
            m.test_loss, m.test_acc, m.train_loss = evaluator(arrays)
        if extra_metrics is not None:
            m.extra = extra_metrics(strategy, arrays, r)
        m.wall_time = time.perf_counter() - t0
        history.rounds.append(m)
        done_now += 1
        if ckpt is not None:
            grid_state = grid.inner.state_dict() if hasattr(grid.inner, "state_dict") else None
            save_checkpoint(
                ckpt,
                {
                    "round": r,
                    "arrays": {k: v for k, v in arrays.items()},
                    "strategy": strategy,
                    "history": history.to_dict(),
                    "grid_state": grid_state,
                },
            )
        if on_round is not None:
            on_round(m)
    return RunResult(arrays, history, strategy)
