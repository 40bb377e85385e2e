"""The parameter server on Ray: synchronous training equals single-process SGD on the whole batch; asynchronous
training (staleness bound 1) lowers the loss."""

import os
import pathlib

import par_workers as W
import pytest
import torch

from tilestack.parallel import GPT, ParallelConfigError, lm_loss

ray = pytest.importorskip("ray")
from tilestack.parallel.ps import ParameterServer  # noqa: E402

LR = 0.5


def _model():
    return GPT(W.CFG, seed=0)


def _batch(step):
    return W.batches(6)[step % 6]


def _sgd_reference(steps):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(steps):
        idx, targets = _batch(step)
        loss = lm_loss(model(idx), targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, dict(model.named_parameters())


@pytest.fixture(scope="module")
def ray_session():
    # the actors unpickle this module's functions by name: give them its directory
    here = str(pathlib.Path(__file__).parent)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}})
    yield
    ray.shutdown()


def test_sync_equals_single_process_sgd(ray_session):
    ps = ParameterServer(_model, _batch, n_workers=4, n_servers=3, lr=LR, mode="sync")
    try:
        losses = ps.train(5)
        state, stats = ps.state_dict(), ps.stats()
    finally:
        ps.shutdown()
    ref_losses, ref_params = _sgd_reference(5)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    for n, p in ref_params.items():
        torch.testing.assert_close(state[n], p.detach(), rtol=1e-5, atol=1e-6)
    assert [s["version"] for s in stats] == [5, 5, 5]


def _regression_model():
    torch.manual_seed(0)
    return torch.nn.Linear(8, 1)


def _regression_batch(step):
    """Rows of y = x . w_true + 0.5 (12 rows: 4 per worker), a fresh x each step."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(12, 8, generator=gen)
    w_true = torch.linspace(-1, 1, 8)
    return x, (x @ w_true + 0.5)[:, None]


def _mse(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def test_async_with_a_staleness_bound_converges(ray_session):
    steps = 30
    ps = ParameterServer(_regression_model, _regression_batch, n_workers=3, n_servers=2, lr=0.1, mode="async",
                         staleness=1, loss_fn=_mse)
    try:
        losses = ps.train(steps)
        stats = ps.stats()
    finally:
        ps.shutdown()
    per_worker = torch.tensor(losses).view(3, steps)
    first, last = per_worker[:, :3].mean().item(), per_worker[:, -3:].mean().item()
    assert last < 0.1 * first, f"async PS did not converge: {first:.3f} -> {last:.3f}"
    for s in stats:         # every push was applied or dropped as too stale
        assert s["version"] + s["dropped"] == 3 * steps and s["version"] > 0


def test_bad_arguments():
    with pytest.raises(ParallelConfigError, match="mode='ring'"):
        ParameterServer(_model, _batch, mode="ring")
    with pytest.raises(ParallelConfigError, match="n_servers=0"):
        ParameterServer(_model, _batch, n_servers=0)
    with pytest.raises(ParallelConfigError, match="staleness=-1"):
        ParameterServer(_model, _batch, staleness=-1)
