import numpy as np
import pytest

from tilestack.federated import Synthetic, Task
from tilestack.federated import partition as P


def _labels(n=2000, c=10, seed=0):
    return np.random.default_rng(seed).integers(0, c, n)


@pytest.mark.parametrize(
    "parts_fn",
    [
        lambda y: P.dirichlet(y, 20, 0.3, seed=1),
        lambda y: P.shards(y, 20, 2, seed=1),
        lambda y: P.quantity_skew(len(y), 20, 1.0, seed=1),
    ],
    ids=["dirichlet", "shards", "quantity"],
)
def test_partitions_cover_every_sample_once(parts_fn):
    y = _labels()
    parts = parts_fn(y)
    assert len(parts) == 20
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(len(y)))
    assert min(len(p) for p in parts) >= 1


def test_dirichlet_alpha_controls_label_skew():
    y = _labels(5000)

    def classes_per_client(alpha):
        return np.mean([len(np.unique(y[p])) for p in P.dirichlet(y, 20, alpha, seed=0, min_size=1)])

    assert classes_per_client(0.05) < 5 < classes_per_client(100.0)
    assert classes_per_client(100.0) == 10


def test_shards_give_few_classes_and_quantity_skew_unequal_sizes():
    y = _labels(4000)
    assert max(len(np.unique(y[p])) for p in P.shards(y, 20, 2)) <= 4  # 2 shards, each may straddle one boundary
    sizes = [len(p) for p in P.quantity_skew(4000, 20, sigma=1.5)]
    assert max(sizes) > 4 * min(sizes)
    assert len(set(len(p) for p in P.quantity_skew(4000, 20, sigma=0.0))) <= 2


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda: P.dirichlet(_labels(), 10, 0.0), "alpha=0.0"),
        (lambda: P.dirichlet(_labels(100), 60, 1.0, min_size=2), "min_size=2"),
        (lambda: P.shards(np.zeros((3, 3), int), 2), "labels"),
        (lambda: P.quantity_skew(100, 0), "num_clients=0"),
        (lambda: Task(dataset="mnist"), "dataset='mnist'"),
        (lambda: Task(faults=((99, "crash"),)), "faults entry"),
        (lambda: Synthetic(alpha=-1), "alpha=-1"),
    ],
)
def test_bad_input_names_the_argument(call, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_synthetic_is_deterministic_per_device_and_heterogeneous():
    a = Synthetic(1, 1, num_devices=30, seed=3)
    x1, y1, xt1, yt1 = a.device(4)
    x2, y2, _, _ = Synthetic(1, 1, num_devices=30, seed=3).device(4)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert x1.shape[1] == 60 and set(np.unique(y1)) <= set(range(10))
    assert len(y1) + len(yt1) == a.num_samples(4)
    sizes = [a.num_samples(k) for k in range(30)]
    assert max(sizes) > 5 * min(sizes)  # power law
    # alpha, beta > 0: devices differ in their input means; Synthetic-IID: they do not
    means = [a.device(k)[0].mean(axis=0) for k in range(5)]
    iid = Synthetic(1, 1, num_devices=30, seed=3, iid=True)
    iid_means = [iid.device(k)[0].mean(axis=0) for k in range(5)]
    assert np.std(means, axis=0).mean() > 3 * np.std(iid_means, axis=0).mean()


def test_task_json_round_trip_and_client_data():
    t = Task(dataset="blobs", partitioner="dirichlet", num_clients=8, faults=((1, "nan"),), malicious_fraction=0.25)
    assert Task.from_json(t.to_json()) == t
    assert sum(t.is_malicious(p) for p in range(8)) == 2
    x, y, xt, yt = t.client_data(3)
    assert x.shape[1] == t.num_features and len(xt) >= 1
    c = Task(dataset="clustered", num_clients=6, groups=3)
    assert [c.group(p) for p in range(6)] == [0, 1, 2, 0, 1, 2]
