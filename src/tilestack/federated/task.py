"""A federated task as one small, validated, JSON-serialisable value: data, model, local training, misbehaviour.

    from tilestack.federated.task import Task
    task = Task(dataset="synthetic", alpha=1, beta=1, num_clients=30, model="logreg")
    x, y, x_test, y_test = task.client_data(7)      # built locally, identical in every process
    model = task.build_model(); params = task.initial_params()
    Task.from_json(task.to_json()) == task           # travels to clients inside the round config

The ClientApp rebuilds the task from the JSON it receives, so the same spec works in tilestack's in-process
engine, in Flower's Ray simulation and in a real SuperLink/SuperNode deployment with no shared files.
Datasets (all generated locally, no downloads):

- ``synthetic``: Synthetic(alpha, beta) of the FedProx paper, one device per client.
- ``blobs``: a Gaussian-mixture classification set of ``num_samples`` points split by ``partitioner``
  (``iid``, ``dirichlet`` with ``partition_alpha``, ``shards`` with ``classes_per_client``, ``quantity`` with
  ``quantity_sigma``);
  ``feature_shift`` > 0 gives every client its own affine distortion of the features (FedBN's setting).
- ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the package), split by
  ``partitioner`` (and distorted by ``feature_shift``) as ``blobs`` is.
- ``file``: a user's own data, ``data_path`` to an ``.npz`` (``x``, ``y``) or a ``.csv`` (label last),
  split by ``partitioner``.
- ``clustered``: ``groups`` planted groups; clients of group g label x ~ N(0, I) by their own teacher W_g,
  so one global model cannot fit them all (client i is in group i % groups).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import numbers
import os
import threading
from pathlib import Path

import numpy as np

from tilestack.federated import partition
from tilestack.federated.models import MLP, Model, Params, SoftmaxRegression
from tilestack.federated.synthetic import SIZE_MIN, Synthetic
from tilestack.federated.system import MAX_CLIENTS

DATASETS = ("synthetic", "blobs", "clustered", "digits", "file")
DIGITS_MAX = 16.0  # scikit-learn's digits are 8x8 images of 0..16
PARTITIONERS = ("iid", "dirichlet", "shards", "quantity")
MODELS = ("logreg", "mlp", "cnn", "transformer")  # the last two are PyTorch models (torch_models)
ATTACKS = ("signflip", "noise")
FAULTS = ("crash", "nan", "shape", "slow", "missing", "extra", "nometrics")
TEST_FRACTION = 0.2
TRANSFORMER_TOKENS = 8  # TorchModel's default tokens: the transformer cuts the features into that many
MIN_CLIENT_SAMPLES = 2  # a client's smallest share of a pooled dataset: one to train on, one to test
BLOB_SEPARATION = 1.5  # std of the class means, in units of the within-class std
BLOB_NOISE_TAIL = 64.0  # the within-class N(0, 1) noise never passes 64 stds: |x| <= |mean| + 64
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the clients' features are float32

MAX_LOCAL_EPOCHS = 1e6   # local_epochs past this is a typo: its step count would overflow or never end
MAX_LOCAL_STEPS = 10**9   # local_steps past this is a typo too: a billion SGD steps per client and round (2**63 was
# taken, and every client's round never ended)


# the settings of the generated Gaussian-mixture set that other datasets do not read: a pooled set (digits, a file)
# has its own size, features and classes, Synthetic(alpha, beta) its 60 features and 10 classes, and the clustered
# task its samples_per_client and its teachers
BLOBS_GENERATOR = ("num_samples", "num_features", "num_classes", "separation")
UNREAD_BLOBS_SETTINGS = {"digits": BLOBS_GENERATOR, "file": BLOBS_GENERATOR, "synthetic": BLOBS_GENERATOR,
                         "clustered": ("num_samples", "separation")}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Task:
    """Everything a client needs to rebuild its data and model and to train, as plain values."""

    dataset: str = "synthetic"
    num_clients: int = 30
    seed: int = 0
    # synthetic
    alpha: float = 1.0
    beta: float = 1.0
    max_samples: int | None = None
    # blobs
    num_samples: int = 6000
    num_features: int = 60
    num_classes: int = 10
    partitioner: str = "iid"
    partition_alpha: float = 0.5
    classes_per_client: int = 2
    quantity_sigma: float = 1.0
    """``quantity``: client sizes proportional to lognormal(0, quantity_sigma) draws (0: equal; 5: a few examples
    beside thousands)."""
    feature_shift: float = 0.0
    separation: float = BLOB_SEPARATION
    """Std of the class means in units of the within-class std (smaller: harder)."""
    # file: a user's own dataset (see load_file), split like blobs
    data_path: str = ""
    # clustered
    groups: int = 2
    samples_per_client: int = 200
    # model and local training
    model: str = "logreg"
    hidden: int = 32
    norm: bool = False
    lr: float = 0.01
    batch_size: int = 10
    local_epochs: float = 20.0
    """Local work per round in passes over the client's training data (FedProx: E = 20)."""
    local_steps: int | None = None
    """Fixed local SGD steps per round instead of epochs (scale benchmarks)."""
    # misbehaviour, simulated by the clients themselves
    malicious_fraction: float = 0.0
    attack: str = "signflip"
    attack_scale: float = 10.0
    faults: tuple[tuple[int, str], ...] = ()
    """(partition id, kind) pairs: kind in FAULTS. 'slow' sleeps ``slow_seconds`` before replying; 'missing'
    drops an array from the reply, 'extra' adds one, 'nometrics' sends no MetricRecord."""
    slow_seconds: float = 5.0

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"Task: {name}={getattr(self, name)!r}; expected {expected}")

        for field in dataclasses.fields(self):  # numbers first: the range checks below compare them
            value, kind = getattr(self, field.name), str(field.type)
            if kind.startswith("int") and not (value is None and "None" in kind):
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise bad(field.name, "an integer" + (" or None" if "None" in kind else ""))
                object.__setattr__(self, field.name, int(value))  # numpy integers as plain ones (JSON)
            if kind == "float":
                if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                    raise bad(field.name, "a finite number")
                object.__setattr__(self, field.name, float(value))
            # (norm="no" or norm=1.5 was taken by its truth: a normed model trained; a NumPy array as dataset failed
            # in `not in` with "truth value of an array ... is ambiguous")
            if kind == "bool" and not isinstance(value, bool):
                raise bad(field.name, "True or False")
            if kind == "str" and not isinstance(value, str):
                raise bad(field.name, "a str")
        if self.seed < 0:
            raise bad("seed", ">= 0")
        if self.dataset not in DATASETS:
            raise bad("dataset", f"one of {DATASETS}")
        if self.partitioner not in PARTITIONERS:
            raise bad("partitioner", f"one of {PARTITIONERS}")
        if self.model not in MODELS:
            raise bad("model", f"one of {MODELS}")
        if self.attack not in ATTACKS:
            raise bad("attack", f"one of {ATTACKS}")
        if self.dataset in ("synthetic", "clustered"):  # each client's data is generated for it: nothing is split
            for name, default in (("partitioner", "iid"), ("feature_shift", 0.0)):
                if getattr(self, name) != default:
                    raise ValueError(
                        f"Task: {name}={getattr(self, name)!r} with dataset={self.dataset!r}, which generates each "
                        f"client's own data (it was ignored); expected {name}={default!r}, or a pooled dataset to "
                        "split: 'blobs', 'digits' or 'file'"
                    )
        if not 1 <= self.num_clients <= MAX_CLIENTS:   # (1 << 70 clients was taken)
            raise bad("num_clients", f"in [1, {MAX_CLIENTS}]")
        for name in ("alpha", "beta"):     # Synthetic(alpha, beta)'s variances: refused there only once a client ran
            if getattr(self, name) < 0:
                raise bad(name, ">= 0 (a variance of Synthetic(alpha, beta))")
        if not 0.0 <= self.malicious_fraction < 1.0:
            raise bad("malicious_fraction", "in [0, 1)")
        if self.malicious_fraction > 0 and _malicious_count(self) == 0:  # (ran with no attacker, without a word)
            raise bad("malicious_fraction", f"0, or a share of num_clients={self.num_clients} that rounds to at least "
                      f"one malicious client (round({self.malicious_fraction:g} x {self.num_clients}) is 0)")
        if not 0 < self.lr < FLOAT32_MAX:  # (1e300 was taken: every step inf, every client's update left out, every
            # round aggregating nothing)
            raise bad("lr", f"> 0 (and below {FLOAT32_MAX:.3g}, float32's largest value: a larger step is inf for any "
                      "gradient of 1 or more)")  # fmt: skip
        if self.batch_size < 1:
            raise bad("batch_size", ">= 1")
        if self.local_steps is None and not 0 < self.local_epochs <= MAX_LOCAL_EPOCHS:
            # (1e308 or inf was taken, and the client's step count overflowed once the run had started)
            raise bad("local_epochs", f"in (0, {MAX_LOCAL_EPOCHS:g}]")
        if self.local_steps is not None and self.local_steps < 1:
            raise bad("local_steps", ">= 1 or None")
        if self.local_steps is not None and self.local_steps > MAX_LOCAL_STEPS:
            raise bad("local_steps", f"at most {MAX_LOCAL_STEPS:,} (SGD steps per client and round), or None")
        if not self.separation > 0:
            raise bad("separation", "> 0")
        if self.num_features < 1:
            raise bad("num_features", ">= 1")
        if self.num_classes < 2:
            raise bad("num_classes", ">= 2")
        if self.dataset == "blobs" and (big := float(np.abs(_blob_means(self)).max())) + BLOB_NOISE_TAIL > FLOAT32_MAX:
            # (the class means, drawn at this scale, became inf in float32 and every client trained on inf: NaN)
            raise bad("separation", f"a scale whose class means fit float32, the models' precision (they reach "
                      f"{big:.3g}, beyond {FLOAT32_MAX:.3g})")
        if self.hidden < 1:
            raise bad("hidden", ">= 1")
        if not self.partition_alpha > 0:
            raise bad("partition_alpha", "> 0 (the Dirichlet concentration)")
        if self.classes_per_client < 1:
            raise bad("classes_per_client", ">= 1")
        if self.quantity_sigma < 0:
            raise bad("quantity_sigma", ">= 0 (the log-std of the quantity partitioner's client sizes)")
        if self.feature_shift < 0:
            raise bad("feature_shift", ">= 0")
        if self.attack_scale < 0:
            raise bad("attack_scale", ">= 0")
        if not 0 <= self.slow_seconds <= threading.TIMEOUT_MAX:  # (1e300 made the 'slow' client fail with
            # "OverflowError: timestamp out of range" in time.sleep, an error reply instead of a late one)
            raise bad("slow_seconds", f"in [0, {threading.TIMEOUT_MAX:g}] (the longest sleep Python takes)")
        if self.max_samples is not None and self.max_samples < SIZE_MIN:
            raise bad("max_samples", f">= {SIZE_MIN} (Synthetic's smallest device) or None")
        if self.samples_per_client < MIN_CLIENT_SAMPLES:
            raise bad("samples_per_client", f">= {MIN_CLIENT_SAMPLES} (one to train on, one to test)")
        if self.dataset == "blobs" and self.num_samples < MIN_CLIENT_SAMPLES * self.num_clients:
            raise ValueError(
                f"Task: num_samples={self.num_samples} for num_clients={self.num_clients}; expected num_samples >= "
                f"{MIN_CLIENT_SAMPLES * self.num_clients} ({MIN_CLIENT_SAMPLES} per client: one to train on, one "
                "to test)"
            )
        if self.dataset == "file" and not Path(self.data_path).is_file():
            raise ValueError(f"Task: data_path={self.data_path!r} is not a file; expected an .npz (x, y) or a .csv")
        if self.dataset == "file" and not self.data_path.lower().endswith((".npz", ".csv")):  # (a data.txt was said
            # to be "not a file"; DATA.CSV was refused)
            raise ValueError(f"Task: data_path={self.data_path!r} has the suffix {Path(self.data_path).suffix!r}; "
                             "expected an .npz (x, y) or a .csv file")  # fmt: skip
        if self.dataset == "clustered" and not 1 <= self.groups <= self.num_clients:
            raise bad("groups", f"in [1, num_clients={self.num_clients}]")
        if self.model == "cnn" and (math.isqrt(self.features) ** 2 != self.features or math.isqrt(self.features) % 2):
            raise ValueError(
                f"Task: model='cnn' on {self.features} features (dataset={self.dataset!r}); expected images of an "
                "even square side**2 features, e.g. dataset='digits' (8x8)"
            )  # the rule TorchModel checks, here without importing torch
        if self.model == "transformer" and self.features % TRANSFORMER_TOKENS:
            raise ValueError(
                f"Task: model='transformer' on {self.features} features (dataset={self.dataset!r}); expected a "
                f"multiple of its {TRANSFORMER_TOKENS} tokens"
            )
        if self.dataset in ("digits", "file") and len(_pooled(self)[1]) < MIN_CLIENT_SAMPLES * self.num_clients:
            raise ValueError(
                f"Task: num_clients={self.num_clients} for the {len(_pooled(self)[1])} examples of "
                f"dataset={self.dataset!r}; expected at most {len(_pooled(self)[1]) // MIN_CLIENT_SAMPLES} "
                f"({MIN_CLIENT_SAMPLES} examples per client: one to train on, one to test)"
            )
        if self.partitioner == "shards" and self.dataset in ("blobs", "digits", "file"):
            # the label-sorted data is cut into num_clients x classes_per_client shards, each client taking that many:
            # more than the dataset's classes made every client a near-IID mix (11 'classes' of 10), and more shards
            # than examples failed once a client built its data, naming 'num_clients' = the shard count
            pooled = self.num_samples if self.dataset == "blobs" else len(_pooled(self)[1])
            if self.classes_per_client > self.classes:
                raise ValueError(
                    f"Task: classes_per_client={self.classes_per_client} with partitioner='shards' over the "
                    f"{self.classes} classes of dataset={self.dataset!r}; expected at most {self.classes}"
                )
            if pooled < self.num_clients * self.classes_per_client:
                raise ValueError(
                    f"Task: classes_per_client={self.classes_per_client} with partitioner='shards' for "
                    f"num_clients={self.num_clients} cuts the {pooled} examples into "
                    f"{self.num_clients * self.classes_per_client} shards; expected at most {pooled} shards "
                    f"(classes_per_client <= {pooled // self.num_clients})"
                )
        if not isinstance(self.faults, (tuple, list)) or not all(
            isinstance(f, (tuple, list)) and len(f) == 2 for f in self.faults
        ):
            raise bad("faults", "a tuple of (partition id, kind) pairs")
        object.__setattr__(self, "faults", tuple(tuple(f) for f in self.faults))  # hashable, as from_json makes it
        for pid, kind in self.faults:
            bad_id = isinstance(pid, bool) or not isinstance(pid, numbers.Integral)
            if bad_id or kind not in FAULTS or not 0 <= pid < self.num_clients:
                raise ValueError(
                    f"Task: faults entry {(pid, kind)!r}; expected (partition id in [0, {self.num_clients}), "
                    f"kind in {FAULTS})"
                )
        # one fault per partition: ``fault(pid)`` keeps the last of a partition's entries, so (0, 'crash'), (0, 'nan')
        # ran client 0 with NaN updates and dropped its crash without a word
        kinds: dict = {}
        for pid, kind in self.faults:
            if pid in kinds:
                raise ValueError(f"Task: faults gives partition {pid} two faults, {kinds[pid]!r} and {kind!r}; "
                                 "expected at most one fault per partition")
            kinds[pid] = kind
        # last: a setting's own errors (shards over more classes than digits has) are named first
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in UNREAD_BLOBS_SETTINGS.get(self.dataset, ()):
            if getattr(self, name) != defaults[name]:  # (Task(dataset="digits", num_classes=3) ran 10 classes)
                raise ValueError(
                    f"Task: {name}={getattr(self, name)!r} with dataset={self.dataset!r}, which does not read it (it "
                    f"was ignored); expected {name}={defaults[name]!r}, or dataset='blobs' to generate the examples"
                )

    # ---- serialisation -------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Task:
        return _from_json(text)

    # ---- data ---------------------------------------------------------------------------------------
    @property
    def features(self) -> int:
        if self.dataset in ("digits", "file"):
            return _pooled(self)[0].shape[1]
        return 60 if self.dataset == "synthetic" else self.num_features

    @property
    def classes(self) -> int:
        if self.dataset in ("digits", "file"):
            return int(_pooled(self)[1].max()) + 1
        return 10 if self.dataset == "synthetic" else self.num_classes

    def _synthetic(self) -> Synthetic:
        return Synthetic(self.alpha, self.beta, self.num_clients, seed=self.seed, max_samples=self.max_samples)

    def client_data(self, pid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(x_train, y_train, x_test, y_test)`` of client ``pid``."""
        if not 0 <= pid < self.num_clients:
            raise ValueError(f"Task.client_data: pid={pid!r}; expected 0 <= pid < num_clients={self.num_clients}")
        if self.dataset == "synthetic":
            return self._synthetic().device(pid)
        if self.dataset == "clustered":
            return _clustered_client(self, pid)
        return _blobs_client(self, pid)

    def group(self, pid: int) -> int:
        """Planted group of client ``pid`` (``clustered``; 0 otherwise)."""
        return pid % self.groups if self.dataset == "clustered" else 0

    def is_malicious(self, pid: int) -> bool:
        """Whether client ``pid`` sends poisoned updates: a fixed, seeded ``malicious_fraction`` of clients."""
        return pid in _malicious_set(self)

    def fault(self, pid: int) -> str | None:
        return dict(self.faults).get(pid)

    def num_train(self, pid: int) -> int:
        return len(self.client_data(pid)[1])

    def steps_for(self, pid: int) -> int:
        """Full local work of client ``pid`` in SGD steps: ``local_steps`` or epochs x batches per epoch."""
        if self.local_steps is not None:
            return self.local_steps
        batches = -(-self.num_train(pid) // self.batch_size)
        return max(1, int(round(self.local_epochs * batches)))

    # ---- model --------------------------------------------------------------------------------------
    def build_model(self, width: float = 1.0) -> Model:
        """The task's model; ``width`` < 1 gives a HeteroFL sub-model with that fraction of hidden units."""
        if self.model in ("cnn", "transformer"):
            from tilestack.federated.torch_models import TorchModel  # torch only where a task asks for it

            return TorchModel(self.model, self.features, self.classes)
        if self.model == "logreg":
            return SoftmaxRegression(self.features, self.classes)
        return MLP(self.features, max(1, int(round(self.hidden * width))), self.classes, norm=self.norm)

    def initial_params(self) -> Params:
        return self.build_model().init(np.random.default_rng([self.seed, 7]))


@functools.lru_cache(maxsize=64)
def _from_json(text: str) -> Task:
    fields = json.loads(text)
    fields["faults"] = tuple(tuple(f) for f in fields.get("faults", ()))
    return Task(**fields)


@functools.lru_cache(maxsize=64)
def _malicious_count(task: Task) -> int:
    return int(round(task.malicious_fraction * task.num_clients))


def _malicious_set(task: Task) -> frozenset[int]:
    count = _malicious_count(task)
    rng = np.random.default_rng([task.seed, 11])
    return frozenset(int(i) for i in rng.choice(task.num_clients, size=count, replace=False))


def _split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The first ``TEST_FRACTION`` (at least one example) to test, the rest to train; a client with a single
    example trains on it and has no test split."""
    n_test = max(1, int(round(TEST_FRACTION * len(y)))) if len(y) >= MIN_CLIENT_SAMPLES else 0
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def _file_stamp(task: Task) -> tuple[int, int] | None:
    """The data file's (modification time in ns, size) for ``dataset='file'``, else None: part of the keys of the caches
    below, so that a file written anew at the same path (a notebook regenerating its data) is read anew. Before, the
    process kept the first file's examples, features and classes for every later Task naming that path, while worker
    processes and deployed clients read the new file."""
    return _stamp_of(task.data_path) if task.dataset == "file" else None


def _stamp_of(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:  # gone: load_file names it
        return None
    return stat.st_mtime_ns, stat.st_size


def _pooled(task: Task) -> tuple[np.ndarray, np.ndarray]:
    """All examples of a pooled dataset, ``x`` (N, D) float32 and ``y`` (N,) int64 in [0, C)."""
    return _pooled_at(task, _file_stamp(task))


@functools.lru_cache(maxsize=8)
def _pooled_at(task: Task, stamp: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    if task.dataset == "digits":
        try:
            from sklearn.datasets import load_digits  # ships with scikit-learn: no download
        except ImportError as ex:
            raise ValueError("Task: dataset='digits' needs scikit-learn; expected it installed (the federated "
                             "extra: pip install -e '.[federated]')") from ex  # fmt: skip

        d = load_digits()
        x = (d.data / DIGITS_MAX).astype(np.float32)  # (1797, 64), pixels in [0, 1]
        order = np.random.default_rng([task.seed, 4]).permutation(len(d.target))
        return x[order], d.target.astype(np.int64)[order]
    if task.dataset == "file":
        return _load_file_at(task.data_path, stamp)
    rng = np.random.default_rng([task.seed, 3])
    means = _blob_means(task, rng)  # (C, D)
    y = rng.integers(0, task.num_classes, task.num_samples)
    x = (means[y] + rng.normal(0, 1, (task.num_samples, task.num_features))).astype(np.float32)
    return x, y


def _blob_means(task: Task, rng: np.random.Generator | None = None) -> np.ndarray:
    """The generated set's class means (C, D): the first draws of its stream (``rng``, else a fresh one)."""
    rng = np.random.default_rng([task.seed, 3]) if rng is None else rng
    return rng.normal(0, task.separation, (task.num_classes, task.num_features))


def _blobs(task: Task) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    return _blobs_at(task, _file_stamp(task))


@functools.lru_cache(maxsize=8)
def _blobs_at(task: Task, stamp: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    x, y = _pooled_at(task, stamp)
    n = len(y)
    if task.partitioner == "dirichlet":
        parts = partition.dirichlet(y, task.num_clients, task.partition_alpha, seed=task.seed, min_size=2)
    elif task.partitioner == "shards":
        parts = partition.shards(y, task.num_clients, task.classes_per_client, seed=task.seed)
    elif task.partitioner == "quantity":
        parts = partition.quantity_skew(n, task.num_clients, task.quantity_sigma, seed=task.seed, min_size=2)
    else:
        parts = partition.quantity_skew(n, task.num_clients, sigma=0.0, seed=task.seed, min_size=2)
    return x, y, parts


def load_file(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A user's dataset: ``.npz`` with arrays ``x`` (N, D) and ``y`` (N,), or ``.csv`` whose last column is the
    label, numbers or names ('setosa'), and the others numbers (a first row whose features are not numbers is a
    header). Labels become 0..C-1, in sorted order. Read once per version of the file (its time and size)."""
    return _load_file_at(path, _stamp_of(path))


@functools.lru_cache(maxsize=8)
def _load_file_at(path: str, stamp: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"Task: data_path={path!r} is not a file; expected an .npz (x, y) or a .csv")
    suffix = p.suffix.lower()  # (DATA.CSV was refused as neither .npz nor .csv)
    if suffix == ".npz":
        with np.load(p) as f:
            if "x" not in f or "y" not in f:
                raise ValueError(f"Task: data_path={path!r} holds {sorted(f.files)}; expected arrays 'x' and 'y'")
            try:
                x, y = np.asarray(f["x"]), np.asarray(f["y"])
            except ValueError as ex:  # object arrays: numpy's "cannot be loaded when allow_pickle=False", no file named
                raise ValueError(f"Task: data_path={path!r}: {ex}; expected numeric arrays 'x' (N, D) and 'y' (N,) "
                                 "saved without pickle") from None  # fmt: skip
        _check_npz_arrays(path, x, y)
    elif suffix == ".csv":
        x, y = _read_csv(p)
    else:
        raise ValueError(f"Task: data_path={path!r}; expected a .npz or .csv file")
    if y.ndim == 2 and y.shape[1] == 1:  # a column of labels
        y = y[:, 0]
    try:
        x = x.reshape(len(x), -1).astype(np.float64)  # float32 below, once its range is checked
    except ValueError as ex:  # text that is no number ("could not convert string to float"), naming no file
        raise ValueError(f"Task: data_path={path!r} has features that are not numbers ({ex}); expected real "
                         "numbers") from None  # fmt: skip
    if x.shape[1] == 0:  # a CSV of one value a row (';'-separated, or labels only) trained a model of no inputs
        raise ValueError(
            f"Task: data_path={path!r} has no feature columns, only the label; expected at least one feature before "
            "the label in each row (values separated by ',')"
        )
    if len(x) != len(y) or len(y) < 2:
        raise ValueError(f"Task: data_path={path!r} has {len(x)} rows of x and {len(y)} labels; expected equal, >= 2")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"Task: data_path={path!r} has non-finite features; expected finite numbers")
    if x.size and (big := float(np.abs(x).max())) > float(np.finfo(np.float32).max):  # (became inf in float32, and was
        # refused as "non-finite features" though the file's values are finite)
        raise ValueError(f"Task: data_path={path!r} has a feature of magnitude {big:g}, beyond the float32 range the "
                         f"models train in; expected values up to {float(np.finfo(np.float32).max):g} (rescale them)")
    x = x.astype(np.float32)
    if y.dtype.kind in "fc" and not np.all(np.isfinite(y)):  # np.unique made NaN a class of its own
        raise ValueError(f"Task: data_path={path!r} has non-finite labels; expected a class label in every row")
    if y.dtype.kind == "f" and not np.all(y == np.round(y)):  # each distinct value became a class of its own
        frac = y[y != np.round(y)][0]
        raise ValueError(
            f"Task: data_path={path!r} has a label {frac.item()!r} that is not a whole number; expected class labels "
            "(integers or names), not a regression target"
        )
    names, y = np.unique(y, return_inverse=True)
    if len(names) < 2:  # a one-output model scores every example right: accuracy 1.0 of nothing learned
        raise ValueError(
            f"Task: data_path={path!r} has the single label {names[0].item()!r}; expected examples of at least 2 "
            "classes"
        )
    return x, y.astype(np.int64)


def _check_npz_arrays(path: str, x: np.ndarray, y: np.ndarray) -> None:
    """The shapes and kinds of an .npz's ``x`` and ``y`` a model can train on: y (N,) labels (a (N, 2) y failed inside
    the partitioner with numpy's broadcast error, a scalar with "len() of unsized object"), x of real numbers (complex
    features lost their imaginary part without a word, complex labels became classes of their own)."""
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"Task: data_path={path!r} has x of shape {x.shape} and y of shape {y.shape}; expected x "
                         "(N, D) and y (N,)")  # fmt: skip
    if not (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
        raise ValueError(f"Task: data_path={path!r} has labels y of shape {y.shape}; expected one label per row, "
                         "shape (N,)")  # fmt: skip
    if x.dtype.kind == "c" or y.dtype.kind == "c":
        which = "x" if x.dtype.kind == "c" else "y"
        raise ValueError(f"Task: data_path={path!r} has {which} of dtype {(x if which == 'x' else y).dtype}; "
                         f"expected real numbers{' (class labels: integers or names)' if which == 'y' else ''}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_csv(p: Path) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (N, D) float64 and ``y`` (N,) labels (numbers where every label is one, else names) of a CSV file,
    its label last. Blank lines and spaces around values are ignored. Labels that are names ('cat') stopped the
    run in numpy's parser, though the same labels in an .npz were read."""
    # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") made the first value '\ufeff0.5', refused as no number
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            rows = [[v.strip() for v in row] for row in csv.reader(f) if any(v.strip() for v in row)]
    except UnicodeDecodeError as ex:  # (a Latin-1 file, or a binary one named .csv: the codec's error, no file named)
        raise ValueError(f"Task: data_path={str(p)!r} is not UTF-8 text ({ex.reason} at byte {ex.start}); expected a "
                         "CSV file in UTF-8") from None  # fmt: skip
    if rows and not any(_is_number(v) for v in rows[0][:-1]):
        # a header: none of its feature names is a number. A first row with one bad value among numbers ("0.5,,1,dog")
        # was dropped as a header without a word; it is a bad row, refused below like any other
        rows = rows[1:]
    if not rows:
        raise ValueError(f"Task: data_path={str(p)!r} has no rows of data; expected features and a label per row")
    widths = sorted({len(r) for r in rows})
    if len(widths) > 1:
        raise ValueError(f"Task: data_path={str(p)!r} has rows of {widths} values; expected the same number in each")
    unlabelled = [i for i, r in enumerate(rows) if r[-1] == ""]
    if unlabelled:  # ("0.1,0.2," made '' a class of its own; a trailing comma on every row was named a bad feature)
        raise ValueError(f"Task: data_path={str(p)!r} has {len(unlabelled)} data row(s) with an empty last value, the "
                         f"first data row {unlabelled[0] + 1}; expected a class label last in every row")  # fmt: skip
    try:
        x = np.array([r[:-1] for r in rows], np.float64).reshape(len(rows), -1)
    except ValueError as ex:
        raise ValueError(
            f"Task: data_path={str(p)!r} has a feature that is not a number ({ex}); expected numbers, the label last"
        ) from ex
    labels = [r[-1] for r in rows]
    y = np.array([float(v) for v in labels]) if all(_is_number(v) for v in labels) else np.array(labels)
    return x, y


def _blobs_client(task: Task, pid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y, parts = _blobs(task)
    idx = np.random.default_rng([task.seed, 5, pid]).permutation(parts[pid])
    xc, yc = x[idx], y[idx]
    if task.feature_shift > 0:  # a client-specific affine distortion of the inputs (scanner, camera)
        d = x.shape[1]  # the dataset's features: digits' 64 and a file's own, not the num_features of blobs
        rng = np.random.default_rng([task.seed, 6, pid])
        with np.errstate(over="ignore", invalid="ignore"):  # checked below
            scale = np.exp(rng.normal(0, task.feature_shift, d)).astype(np.float32)
            shift = rng.normal(0, 3 * task.feature_shift, d).astype(np.float32)
            xc = xc * scale + shift
        if not np.all(np.isfinite(xc)):  # (inf or NaN features without a word: every step of that client NaN)
            raise ValueError(
                f"Task: feature_shift={task.feature_shift!r} scales client {pid}'s features by up to "
                f"{float(np.max(scale)):.3g} (exp of N(0, feature_shift) draws), beyond the float32 range the models "
                "train in; expected a smaller feature_shift (FedBN's setting is about 0.5 to 1)"
            )
    return _split(xc, yc)


@functools.lru_cache(maxsize=4096)
def _clustered_client(task: Task, pid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    g = task.group(pid)
    teacher = np.random.default_rng([task.seed, 9, g]).normal(0, 1, (task.num_features, task.num_classes))
    rng = np.random.default_rng([task.seed, 10, pid])
    x = rng.normal(0, 1, (task.samples_per_client, task.num_features)).astype(np.float32)
    y = np.argmax(x @ teacher, axis=1).astype(np.int64)
    return _split(x, y)
