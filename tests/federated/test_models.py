import numpy as np
import pytest

from tilestack.federated.models import MLP, SoftmaxRegression, evaluate, local_sgd


def _numeric_grad(model, params, x, y, key, idx, eps=1e-6):
    p1 = {k: v.copy() for k, v in params.items()}
    p2 = {k: v.copy() for k, v in params.items()}
    p1[key][idx] += eps
    p2[key][idx] -= eps
    return (model.loss_and_grads(p1, x, y)[0] - model.loss_and_grads(p2, x, y)[0]) / (2 * eps)


@pytest.mark.parametrize(
    "model", [SoftmaxRegression(7, 4), MLP(7, 5, 4), MLP(7, 5, 4, norm=True)], ids=["logreg", "mlp", "mlp-bn"]
)
@pytest.mark.parametrize("soft", [False, True])
def test_gradients_match_finite_differences(model, soft):
    rng = np.random.default_rng(0)
    params = {k: rng.normal(0, 0.5, v.shape).astype(np.float64) for k, v in model.init(rng).items()}
    x = rng.normal(0, 1, (12, 7))
    y = rng.dirichlet(np.ones(4), 12) if soft else rng.integers(0, 4, 12)
    _, grads = model.loss_and_grads({k: v.copy() for k, v in params.items()}, x, y)
    for key in grads:
        if key.startswith("bn.running"):
            continue
        for idx in [(0,) * params[key].ndim, tuple(s - 1 for s in params[key].shape)]:
            assert grads[key][idx] == pytest.approx(_numeric_grad(model, params, x, y, key, idx), rel=1e-4, abs=1e-7)


def test_local_sgd_learns_and_prox_term_holds_weights_near_start():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, (10, 3))
    x = rng.normal(0, 1, (300, 10)).astype(np.float32)
    y = np.argmax(x @ w, axis=1)
    model = SoftmaxRegression(10, 3)
    p0 = model.init(rng)
    free, steps, _ = local_sgd(model, p0, x, y, steps=300, batch_size=10, lr=0.1, rng=np.random.default_rng(0))
    prox, _, _ = local_sgd(model, p0, x, y, steps=300, batch_size=10, lr=0.1, rng=np.random.default_rng(0), prox_mu=5.0)
    assert steps == 300
    assert evaluate(model, free, x, y)[1] > 0.9
    dist = lambda p: sum(np.sum((p[k] - p0[k]) ** 2) for k in p0)  # noqa: E731
    assert dist(prox) < 0.5 * dist(free)
