"""A parameter server on Ray: N worker actors compute gradients, k server actors each own 1/k of the parameters
and apply them (SGD), synchronously or asynchronously with a staleness bound.

    ps = ParameterServer(lambda: GPT(TINY, seed=0), batches, n_workers=4, n_servers=2, lr=0.1, mode="sync")
    losses = ps.train(steps=20)                  # the mean loss of every step (sync) or of every worker update
    state = ps.state_dict()                      # the model's parameters, gathered from the servers
    ps.shutdown()

``batches(step) -> (idx, targets)`` gives the global batch of a step; worker w trains on rows
[w * B / N, (w + 1) * B / N). The model's loss is ``lm_loss(model(idx), targets)`` unless ``loss_fn`` is given.

- sync: every step each worker pulls all k shards, computes its gradient and sends shard j of it straight to
  server j (Ray object references: the data does not pass through the driver); server j averages the N pieces and
  applies them. Equal to single-process SGD on the whole batch.
- async: each worker loops on its own: pull, gradient, push; a server applies a pushed gradient at once unless it
  was computed on a version of its shard more than ``staleness`` updates old, which it drops (the worker then
  pulls again). No barrier: fast workers are not held up by slow ones, at the price of stale gradients.

Traffic per step: each worker sends and receives S bytes (S the model's size), each server N S / k: time about
N S / (k B) with B a server's bandwidth, which is why the parameters are sharded over k servers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tilestack.parallel.config import ParallelConfigError

MODES = ("sync", "async")


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _check_rows(idx: Any, n_workers: int, where: str) -> None:
    """Every worker takes B / N whole rows of the global batch: a batch of B rows not divisible by N lost its last
    B mod N rows without a word (sync training then differed from SGD on the whole batch), and N > B gave a worker
    no rows (a NaN loss). Checked on the first batch before any actor starts, and by each worker on every batch."""
    rows = getattr(idx, "shape", (None,))[0] if getattr(idx, "ndim", 0) else None
    if rows is None or rows % n_workers or rows < n_workers:
        raise ParallelConfigError(f"ParameterServer: {where} gives a batch of {rows} rows for n_workers={n_workers}; "
                                  "expected a multiple of n_workers (whole, equal rows per worker)")


class _Server:
    """One shard of the flat parameter vector and its version (the number of updates applied)."""

    def __init__(self, shard: torch.Tensor, lr: float, staleness: int):
        torch.set_num_threads(1)
        self.shard, self.lr, self.staleness = shard.clone(), lr, staleness
        self.version, self.dropped = 0, 0

    def pull(self) -> tuple[int, torch.Tensor]:
        return self.version, self.shard

    def value(self) -> torch.Tensor:
        return self.shard

    def apply_mean(self, *grads: torch.Tensor) -> int:
        """Sync: the mean of the workers' gradient pieces, one SGD step."""
        self.shard -= self.lr * torch.stack(grads).mean(0)
        self.version += 1
        return self.version

    def push(self, grad: torch.Tensor, version: int) -> bool:
        """Async: apply ``grad`` (computed on ``version``) unless it is more than ``staleness`` updates old."""
        if self.version - version > self.staleness:
            self.dropped += 1
            return False
        self.shard -= self.lr * grad
        self.version += 1
        return True

    def stats(self) -> dict[str, int]:
        return dict(version=self.version, dropped=self.dropped)


class _Worker:
    def __init__(self, model_fn: Callable[[], nn.Module], batches: Callable, loss_fn: Callable | None,
                 rank: int, n_workers: int, bounds: list[int]):
        torch.set_num_threads(1)
        from tilestack.parallel.model import lm_loss
        self.model, self.batches = model_fn(), batches
        self.loss_fn = loss_fn or (lambda model, idx, targets: lm_loss(model(idx), targets))
        self.rank, self.n, self.bounds = rank, n_workers, bounds
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def _gradient(self, shards: list[torch.Tensor], step: int) -> tuple[float, list[torch.Tensor]]:
        """(loss, the gradient cut like the servers' shards) at the parameters ``shards`` on this worker's rows."""
        flat = torch.cat(shards)
        with torch.no_grad():
            offset = 0
            for p in self.params:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        idx, targets = self.batches(step)
        _check_rows(idx, self.n, f"batches({step})")
        rows = idx.shape[0] // self.n
        sl = slice(self.rank * rows, (self.rank + 1) * rows)
        for p in self.params:
            p.grad = None
        loss = self.loss_fn(self.model, idx[sl], targets[sl])
        loss.backward()
        g = _flat([p.grad for p in self.params])
        return loss.item(), [g[a:b].clone() for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True)]

    def gradient(self, step: int, *shards: torch.Tensor) -> tuple:
        """Sync: (loss, grad piece for server 0, ..., piece for server k - 1), one Ray return each."""
        loss, pieces = self._gradient(list(shards), step)
        return (loss, *pieces)

    def run_async(self, servers: list[Any], steps: int) -> list[float]:
        """Async: ``steps`` pull-compute-push rounds against the servers; the losses seen."""
        import ray
        losses = []
        for step in range(steps):
            pulled = ray.get([s.pull.remote() for s in servers])
            loss, pieces = self._gradient([t for _, t in pulled], step)
            ray.get([s.push.remote(g, v) for s, g, (v, _) in zip(servers, pieces, pulled, strict=True)])
            losses.append(loss)
        return losses


class ParameterServer:
    def __init__(self, model_fn: Callable[[], nn.Module], batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                 *, n_workers: int = 2, n_servers: int = 1, lr: float = 0.1, mode: str = "sync",
                 staleness: int = 1, loss_fn: Callable | None = None):
        if mode not in MODES:
            raise ParallelConfigError(f"ParameterServer: mode={mode!r}; expected one of {MODES}")
        for name, v in (("n_workers", n_workers), ("n_servers", n_servers)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ParallelConfigError(f"ParameterServer: {name}={v!r}; expected a positive int")
        if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
            raise ParallelConfigError(f"ParameterServer: staleness={staleness!r}; expected an int >= 0")
        # (lr=nan or inf trained to NaN parameters, a negative one climbed the loss, all without a word)
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 <= lr < math.inf:
            raise ParallelConfigError(f"ParameterServer: lr={lr!r}; expected a finite learning rate >= 0")
        for name, fn in (("model_fn", model_fn), ("batches", batches), ("loss_fn", loss_fn)):
            if fn is not None and not callable(fn):
                raise ParallelConfigError(f"ParameterServer: {name} is {type(fn).__name__}; expected a callable")
        _check_rows(batches(0)[0], n_workers, "batches(0)")
        try:
            import ray
        except ModuleNotFoundError as e:
            raise ParallelConfigError("ParameterServer needs ray: pip install 'tilestack[parallel]'") from e
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        self.mode, self.n_workers = mode, n_workers
        model = model_fn()
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shapes = [p.shape for p in model.parameters() if p.requires_grad]
        flat = _flat([p for p in model.parameters() if p.requires_grad])
        pieces = flat.tensor_split(n_servers)                  # server j owns elements [bounds[j], bounds[j+1])
        bounds = [0]
        for p in pieces:
            bounds.append(bounds[-1] + p.numel())
        server_cls, worker_cls = ray.remote(num_cpus=0)(_Server), ray.remote(num_cpus=0)(_Worker)
        self.servers = [server_cls.remote(p, lr, staleness) for p in pieces]
        self.workers = [worker_cls.remote(model_fn, batches, loss_fn, w, n_workers, bounds) for w in range(n_workers)]

    def train(self, steps: int) -> list[float]:
        """Sync: the mean loss of each step. Async: each worker's losses, concatenated worker by worker."""
        import ray
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ParallelConfigError(f"ParameterServer.train: steps={steps!r}; expected an int >= 0")
        if self.mode == "async":
            return [x for w in ray.get([w.run_async.remote(self.servers, steps) for w in self.workers]) for x in w]
        k, losses = len(self.servers), []
        for step in range(steps):
            shards = [s.value.remote() for s in self.servers]        # references: workers fetch them from servers
            outs = [w.gradient.options(num_returns=k + 1).remote(step, *shards) for w in self.workers]
            done = [s.apply_mean.remote(*[o[1 + j] for o in outs]) for j, s in enumerate(self.servers)]
            losses.append(sum(ray.get([o[0] for o in outs])) / self.n_workers)
            ray.get(done)
        return losses

    def stats(self) -> list[dict[str, int]]:
        """Per server: updates applied and (async) stale gradients dropped."""
        import ray
        return ray.get([s.stats.remote() for s in self.servers])

    def state_dict(self) -> dict[str, torch.Tensor]:
        import ray
        flat = torch.cat([t for _, t in ray.get([s.pull.remote() for s in self.servers])])
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = shape.numel()
            out[name] = flat[offset:offset + n].view(shape).clone()
            offset += n
        return out

    def shutdown(self) -> None:
        import ray
        for a in self.servers + self.workers:
            ray.kill(a)
