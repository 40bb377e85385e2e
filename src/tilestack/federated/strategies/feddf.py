"""FedDF-style ensemble distillation (Lin et al., NeurIPS 2020) on the server's unlabeled data.

    from tilestack.federated.strategies import FedDF
    strategy = FedDF(model=task.build_model(), unlabeled=x_server, steps=100, lr=0.05, fraction_train=0.3)

After Flower's weighted averaging, the averaged model (student) is trained for ``steps`` SGD steps to
match the ensemble of the round's client models (teacher: their mean softmax at ``temperature``) on
``unlabeled`` inputs the server holds. No labels are used on the server.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from tilestack.federated.checks import require_int, require_real
from tilestack.federated.models import Model, is_statistic
from tilestack.federated.strategies._util import ok_replies, to_numpy, to_record
from tilestack.federated.task import MAX_LOCAL_STEPS


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class FedDF(FedAvg):
    """FedAvg followed by server-side distillation of the client ensemble (see module doc)."""

    # why a DP wrapper's noise (sized for one client's share of a mean) does not cover this aggregate
    # (checks.check_privacy reads it)
    NOT_A_MEAN = ("distils the ensemble of the individual client models into the average, steps of SGD whose change "
                  "from one client is not bounded by clipping_norm / num_sampled_clients")  # fmt: skip

    def __init__(
        self, *, model: Model, unlabeled: np.ndarray, steps: int = 100, lr: float = 0.05, batch_size: int = 50,
        temperature: float = 1.0, seed: int = 0, **fedavg_kwargs,
    ):  # fmt: skip
        super().__init__(**fedavg_kwargs)
        # (10**12 was taken: the server distilled for ever after round 1's clients trained)
        require_int("FedDF", "steps", steps, low=0, high=MAX_LOCAL_STEPS)
        require_int("FedDF", "batch_size", batch_size, low=1)
        require_int("FedDF", "seed", seed, low=0)
        require_real("FedDF", "lr", lr, lambda v: v > 0, "a finite number > 0")
        require_real("FedDF", "temperature", temperature, lambda v: v > 0, "a finite number > 0")
        if np.asarray(unlabeled).ndim != 2 or len(unlabeled) == 0:
            raise ValueError(f"FedDF: unlabeled has shape {np.shape(unlabeled)}; expected (N, features), N > 0")
        if not np.isfinite(np.asarray(unlabeled, np.float32)).all():   # NaN logits would poison the distilled model
            raise ValueError("FedDF: unlabeled holds NaN or infinite values; expected finite inputs to distill on")
        self.model, self.unlabeled = model, np.asarray(unlabeled, np.float32)
        self.steps, self.lr, self.batch_size, self.temperature = steps, lr, batch_size, temperature
        self.rng = np.random.default_rng(seed)
        self._x: dict[str, np.ndarray] = {}  # this round's global model: the dtypes the student is rounded to

    def check_task(self, task) -> None:
        """The server's inputs and model must be the task's (run by ``simulate`` and ``run_rounds`` before any work).
        Before, unlabeled inputs of another width let round 1's clients train and then ended the run in the
        distillation with numpy's matmul error, and a model of another kind (an MLP for a logistic regression) with a
        KeyError on its arrays."""
        width = self.unlabeled.shape[1]
        if width != task.features:
            raise ValueError(
                f"FedDF: unlabeled has {width} features per input; expected the task's {task.features} "
                f"(dataset={task.dataset!r})"
            )
        got = {k: tuple(np.shape(v)) for k, v in self.model.init(np.random.default_rng(0)).items()}
        want = {k: tuple(np.shape(v)) for k, v in task.initial_params().items()}
        if got != want:
            raise ValueError(f"FedDF: model has arrays {got}; expected the task's model {want} (task.build_model())")

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._x = to_numpy(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = ok_replies(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or not replies:
            return arrays, metrics
        teachers = [to_numpy(next(iter(m.content.array_records.values()))) for m in replies]
        x = self.unlabeled
        probs = np.mean([_softmax(self.model.logits(t, x) / self.temperature) for t in teachers], axis=0)  # (N, C)
        student = to_numpy(arrays)
        for _ in range(self.steps):
            idx = self.rng.choice(len(x), size=min(self.batch_size, len(x)), replace=False)
            _, grads = self.model.loss_and_grads(student, x[idx], probs[idx])
            for k, g in grads.items():
                if not is_statistic(k):
                    student[k] = student[k] - self.lr * g  # in the aggregate's float64
        return to_record(student, like=self._x or None), metrics
