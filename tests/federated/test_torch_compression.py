"""PyTorch models on the clients (CNN, transformer) and compressed client updates (top-k with error feedback, int8)."""

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.serverapp.strategy import FedAvg, FedProx

from tilestack.federated import Task, codec, simulate
from tilestack.federated.compression import Compressed, compress_update, parse
from tilestack.federated.strategies import Scaffold
from tilestack.federated.torch_models import TorchModel

DIGITS = dict(dataset="digits", num_clients=10, lr=0.3, batch_size=32, local_epochs=3)


@pytest.mark.parametrize("arch", ["cnn", "transformer"])
def test_torch_local_sgd_is_plain_sgd_with_prox_and_correction(arch):
    """One step of TorchModel.local_sgd against the same step written out in float64 torch."""
    model = TorchModel(arch, 64, 10)
    rng = np.random.default_rng(0)
    params = model.init(np.random.default_rng(1))
    x = rng.random((8, 64), dtype=np.float32)
    y = rng.integers(0, 10, 8)
    corr = {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in params.items()}
    anchor = {k: v + rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in params.items()}
    out, steps, loss = model.local_sgd(anchor, x, y, steps=1, batch_size=8, lr=0.1, rng=np.random.default_rng(2),
                                       prox_mu=0.5, correction=corr)  # fmt: skip
    # the reference: float64 copy of the module, the gradient of the mean cross-entropy at `anchor`
    ref = model._module(anchor).double()
    x64 = torch.as_tensor(x, dtype=torch.float64)
    ce = torch.nn.functional.cross_entropy(ref(x64), torch.as_tensor(y))
    grads = torch.autograd.grad(ce, list(ref.parameters()))
    model._module(anchor).float()  # the cached module back to float32
    for (k, _), g in zip(ref.named_parameters(), grads, strict=True):
        # prox term is 0 at the first step (w = w_start); the correction is added as is
        want = anchor[k].astype(np.float64) - 0.1 * (g.numpy() + corr[k])
        np.testing.assert_allclose(out[k], want, rtol=1e-4, atol=1e-5)
    assert steps == 1 and loss == pytest.approx(float(ce.detach()), rel=1e-4)
    assert set(out) == set(params) and all(v.dtype == np.float32 for v in out.values())


def test_torch_model_arguments_are_checked():
    with pytest.raises(ValueError, match="num_features=60 for cnn"):
        TorchModel("cnn", 60, 10)
    with pytest.raises(ValueError, match="tokens=7"):
        TorchModel("transformer", 64, 10, tokens=7)
    with pytest.raises(ValueError, match="model='resnet'"):
        Task(dataset="digits", model="resnet")


@pytest.mark.slow
def test_cnn_on_digits_reaches_95_percent_with_iid_clients():
    res = simulate(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), Task(**DIGITS, model="cnn"), rounds=12)
    assert res.history.rounds[-1].test_acc >= 0.95


def test_transformer_and_scaffold_run_on_torch_clients():
    task = Task(**{**DIGITS, "local_epochs": 1, "lr": 0.1}, model="transformer")
    res = simulate(Scaffold(fraction_train=0.5, fraction_evaluate=0.0), task, rounds=3)
    accs = res.history.column("test_acc")
    assert accs[-1] > 0.25 and accs[-1] > accs[0]  # ten classes: chance is 0.1
    assert {"embed.weight", "pos", "head.weight"} <= set(res.arrays.keys())


# ---- compression -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 3), (64, 10)])
def test_topk_and_int8_arrays_round_trip(shape):
    rng = np.random.default_rng(0)
    v = rng.normal(0, 1, shape).astype(np.float32)
    k = max(1, v.size // 4) if v.size else 1
    dense = codec.decode(codec.encode_topk(v, k)) if v.size else np.zeros(shape, np.float32)
    if v.size:
        keep = np.argsort(-np.abs(v.ravel()))[:k]
        want = np.zeros(v.size, np.float32)
        want[keep] = v.ravel()[keep]
        np.testing.assert_array_equal(dense.ravel(), want)
        assert len(codec.encode_topk(v, k).data) == 8 * k
    q = codec.encode_int8(v)
    assert len(q.data) == 8 + v.size and tuple(q.shape) == shape
    span = float(v.max() - v.min()) if v.size else 0.0
    assert np.all(np.abs(codec.decode(q) - v) <= span / 255 / 2 + 1e-6)


def test_error_feedback_sends_what_was_dropped_later():
    """Two rounds of the same update at top-1: the entry left out in round 1 goes out in round 2."""
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    start = {"w": np.zeros(2, np.float32)}
    trained = {"w": np.array([1.0, 0.6], np.float32)}
    first = codec.decode(compress_update("topk:0.5", start, trained, ctx)["w"])
    second = codec.decode(compress_update("topk:0.5", start, trained, ctx)["w"])
    np.testing.assert_array_equal(first, [1.0, 0.0])
    np.testing.assert_allclose(second, [0.0, 1.2])  # 0.6 of this round + 0.6 left from the last
    with pytest.raises(ValueError, match="ratio='2'"):
        parse("topk:2")
    with pytest.raises(ValueError, match="method='zip'"):
        Compressed(FedAvg(), "zip")


@pytest.mark.parametrize("make", [lambda: FedProx(fraction_train=0.5, fraction_evaluate=0.0, proximal_mu=0.1),
                                  lambda: Scaffold(fraction_train=0.5, fraction_evaluate=0.0)])  # fmt: skip
def test_compressed_updates_cut_upload_bytes_and_keep_learning(make):
    task = Task(dataset="blobs", num_clients=10, num_samples=2000, partitioner="dirichlet", partition_alpha=0.5,
                model="mlp", local_steps=20, lr=0.05, faults=((3, "nan"),))  # fmt: skip
    plain = simulate(make(), task, rounds=8)
    topk = simulate(Compressed(make(), "topk", 0.05), task, rounds=8)
    int8 = simulate(Compressed(make(), "int8"), task, rounds=8)
    up = {name: sum(r.history.column("bytes_up")) for name, r in [("plain", plain), ("topk", topk), ("int8", int8)]}
    assert up["plain"] / up["topk"] > 5 and 3.5 < up["plain"] / up["int8"] < 4.5
    acc = {name: r.history.rounds[-1].test_acc for name, r in [("plain", plain), ("topk", topk), ("int8", int8)]}
    assert acc["plain"] > 0.5 and acc["topk"] > acc["plain"] - 0.1 and acc["int8"] > acc["plain"] - 0.02
    # the NaN client is still caught through the compressed encoding
    assert any(r.excluded.get("3", "").startswith("non-finite") for r in topk.history.rounds)
