"""tilestack's single-process simulation engine: a Flower ``Grid`` that runs ClientApps in this process.

    from tilestack.federated.engine import InProcessGrid
    from tilestack.federated.client import app
    grid = InProcessGrid(app, num_nodes=1000, seed=0)
    replies = grid.send_and_receive(strategy.configure_train(1, arrays, config, grid))

It is "just another transport" under the same Flower ``Strategy`` objects: the strategy samples nodes from
``get_node_ids()`` and builds ``Message`` s; the grid hands each one to the very ``ClientApp`` Flower's
engine would run, with the same per-node ``Context`` (``partition-id``, ``num-partitions``, a persistent
``state``), and returns the replies. What it leaves out is Flower's machinery around that call: no Ray
actors, no LinkState, no polling every 0.1 s of every registered node, so a round costs the clients' work.
A client that raises becomes an error reply, as in Flower; one that answers after ``timeout`` seconds is
dropped, as Flower's ``send_and_receive`` would drop it. Under a ``timeout`` each client runs on a daemon
thread with a private copy of its ``Context.state``: the server stops waiting for it after ``timeout``
seconds (a client that never returns cannot hang the round), and only a client that answered in time has
its state kept. A client that raises leaves its node's state as it was before the call, as Flower's engine
keeps a node's ``Context`` only from a ClientApp that returned (SCAFFOLD's c_i or an error-feedback residual
changed just before a crash must not carry into the next round). Node ids are seeded, not random. A worker
process ends once the process that started it is gone (a simulation killed with SIGKILL leaves no orphans), and
a client whose worker process dies (a segfault, the OOM killer) gets an error reply: the jobs that process had
are run again, each in a process of its own, and the round goes on (with ``workers=1`` the client runs in this
very process, which its death ends).
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from tilestack.federated.checks import require_int

NODE_ID_BITS = 62


def _private_copy(content: RecordDict) -> RecordDict:
    """Each client gets its own records, as after a trip over the wire: strategies share one RecordDict
    between all messages of a round, and a client (or a mod such as SecAgg+'s) may change what it got.
    The arrays themselves (immutable bytes) are shared."""
    return RecordDict({k: type(rec)(dict(rec)) for k, rec in content.items()})


_WORKER_APP: ClientApp | None = None
PARENT_POLL_S = 1.0  # how often a worker process looks whether the process that started it is still there


def _set_worker_app(client_app: ClientApp, parent: int) -> None:
    global _WORKER_APP
    _WORKER_APP = client_app
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="tilestack-parent-watch").start()


def _exit_with(parent: int) -> None:
    """End this worker process once ``parent`` (the simulation that started it) is gone. A simulation killed with
    SIGKILL (or by the OOM killer) never shuts its pool down, and its workers, which hold the pool's queue open
    themselves, waited for jobs forever: orphans, each with its copy of the clients' data."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(0)


def _run_one(client_app: ClientApp, msg: Message, context: Context) -> tuple[Message, float, RecordDict]:
    """Run one message on a private copy of the node's state; returns (reply, seconds, the node's new state).
    A client's exception (``sys.exit`` too) becomes its error reply and the node keeps the state it had, as in
    Flower. Only KeyboardInterrupt stops the run: it is the user's."""
    private = Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                      state=_private_copy(context.state), run_config=context.run_config)  # fmt: skip
    t0 = time.perf_counter()
    try:
        reply = client_app(msg, private)
    except (Exception, SystemExit) as ex:  # noqa: BLE001 - a client's failure becomes its error reply, as in Flower
        reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(ex).__name__}: {ex}"),
                        reply_to=msg)  # fmt: skip
        return reply, time.perf_counter() - t0, context.state
    return reply, time.perf_counter() - t0, private.state


Result = tuple[Message, float, RecordDict]
Job = tuple[Message, Context]


def _run_with_deadline(client_app: ClientApp, msg: Message, context: Context, timeout: float) -> Result | None:
    """``_run_one`` (which works on a private copy of the node's state) on a daemon thread; None when it is not
    back within ``timeout`` seconds (the thread is left to finish on its own, and what it does is dropped)."""
    box: list[Result] = []
    worker = threading.Thread(target=lambda: box.append(_run_one(client_app, msg, context)), daemon=True,
                              name=f"tilestack-client-{context.node_id}")  # fmt: skip
    worker.start()
    worker.join(timeout)
    return box[0] if box else None


def _run_jobs(client_app: ClientApp, jobs: list[tuple[Message, Context]], timeout: float | None) -> list[Result | None]:
    if timeout is None:
        return [_run_one(client_app, msg, ctx) for msg, ctx in jobs]
    return [_run_with_deadline(client_app, msg, ctx, timeout) for msg, ctx in jobs]


def _run_chunk(jobs: list[tuple[Message, Context]], timeout: float | None = None) -> list[Result | None]:
    assert _WORKER_APP is not None
    return _run_jobs(_WORKER_APP, jobs, timeout)


def _worker_pool(client_app: ClientApp, workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_set_worker_app,
                               initargs=(client_app, os.getpid()))  # fmt: skip


def _run_isolated(client_app: ClientApp, jobs: list[Job], timeout: float | None) -> list[Result | None]:
    """Each job in a fresh process of its own: after a worker process died, the jobs it had are run again this way,
    so that the client that kills its process (a segfault, the OOM killer, ``os._exit``) gets an error reply and
    every other client its own result, as if nothing had happened (a job's result depends only on its message and
    its node's state, neither of which the dead process changed)."""
    out: list[Result | None] = []
    for msg, ctx in jobs:
        with _worker_pool(client_app, 1) as pool:
            try:
                out.append(pool.submit(_run_chunk, [(msg, ctx)], timeout).result()[0])
            except BrokenProcessPool:
                reason = "ProcessDied: the client's process ended abruptly (a crash, the OOM killer or os._exit)"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
                out.append((reply, 0.0, ctx.state))
    return out


class InProcessGrid(Grid):
    """A Flower ``Grid`` over ``num_nodes`` virtual SuperNodes that run ``client_app`` in this process."""

    def __init__(self, client_app: ClientApp, num_nodes: int, *, seed: int = 0, run_id: int = 1, workers: int = 1):
        # integers, not bools: num_nodes=2.5 failed in numpy's integers(), '3' in a comparison, and workers=1.5 made a
        # pool that ProcessPoolExecutor refused at the first round's messages
        require_int("InProcessGrid", "num_nodes", num_nodes, low=1)
        require_int("InProcessGrid", "workers", workers, low=1)
        if not callable(client_app):  # (None ran until the first message raised "'NoneType' object is not callable")
            raise TypeError(f"InProcessGrid: client_app is a {type(client_app).__name__}; expected a flwr ClientApp")
        self.client_app, self.workers = client_app, workers
        self._pool: ProcessPoolExecutor | None = None
        rng = np.random.default_rng([seed, 17])
        ids: list[int] = []
        seen: set[int] = set()
        while len(ids) < num_nodes:  # distinct, nonzero, seeded
            for v in rng.integers(1, 2**NODE_ID_BITS, num_nodes).tolist():
                if v not in seen and len(ids) < num_nodes:
                    seen.add(v)
                    ids.append(v)
        self._node_ids = ids
        self.partitions = {nid: pid for pid, nid in enumerate(ids)}
        self.contexts = {
            nid: Context(
                run_id=run_id,
                node_id=nid,
                node_config={"partition-id": pid, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for pid, nid in enumerate(ids)
        }
        self._run = Run.create_empty(run_id)
        # This process is now the server task, as run_simulation declares it for its ServerApp thread.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
        self._replies: dict[str, Message] = {}
        self._elapsed: dict[str, float] = {}
        self._counter = itertools.count(1)
        self._timeout: float | None = None  # of the send_and_receive under way

    # ---- Grid interface -----------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run every message's ClientApp now (in ``workers`` processes); replies wait for ``pull_messages``."""
        jobs = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"InProcessGrid.push_messages: dst_node_id={msg.metadata.dst_node_id}; unknown node")
            mid = f"m{next(self._counter)}"
            msg.metadata.__dict__["_message_id"] = mid  # what Flower's own grids do when they accept a message
            private = Message(content=_private_copy(msg.content), metadata=msg.metadata)
            jobs.append((private, self.contexts[msg.metadata.dst_node_id]))
        if self.workers > 1 and len(jobs) >= 2 * self.workers:
            if self._pool is None:
                self._pool = _worker_pool(self.client_app, self.workers)
            # A node always goes to the same worker, so each worker's caches (the client's data) stay warm.
            chunks = [
                [j for j in jobs if self.partitions[j[1].node_id] % self.workers == i] for i in range(self.workers)
            ]
            run = functools.partial(_run_chunk, timeout=self._timeout)
            futures = [self._pool.submit(run, chunk) for chunk in chunks]
            results = []
            for chunk, future in zip(chunks, futures, strict=True):
                try:
                    results += future.result()
                except BrokenProcessPool:  # a worker died: the pool is lost, and so are its unfinished chunks
                    results += _run_isolated(self.client_app, chunk, self._timeout)
            if any(f.exception() is not None for f in futures):
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None  # a fresh pool next time
            jobs = [j for c in chunks for j in c]  # in the order of the results
        else:
            results = _run_jobs(self.client_app, jobs, self._timeout)
        ids = []
        for (msg, ctx), result in zip(jobs, results, strict=True):
            mid = msg.metadata.message_id
            ids.append(mid)
            if result is None:  # still running at the deadline: no reply, the node's state as it was
                self._elapsed[mid] = float("inf")
                continue
            reply, elapsed, state = result
            self.contexts[ctx.node_id].state = state  # the node's state as the client left it
            self._elapsed[mid] = elapsed
            self._replies[mid] = reply
        return ids

    def close(self) -> None:
        """Stop the worker processes (if any)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        self._timeout = timeout
        try:
            ids = list(self.push_messages(messages))
        finally:
            self._timeout = None
        late = {m for m in ids if timeout is not None and self._elapsed.get(m, 0.0) > timeout}
        replies = self.pull_messages([m for m in ids if m not in late])
        for m in ids:
            self._elapsed.pop(m, None)
            self._replies.pop(m, None)  # a late reply is dropped, not kept for a later pull
        return replies

    # ---- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[int, RecordDict]:
        """Each node's persistent ``Context.state`` (SCAFFOLD's c_i, FedBN's local layers)."""
        return {nid: ctx.state for nid, ctx in self.contexts.items()}

    def load_state_dict(self, states: dict[int, RecordDict]) -> None:
        for nid, state in states.items():
            self.contexts[nid].state = state
