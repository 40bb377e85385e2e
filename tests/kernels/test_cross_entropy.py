"""tilestack.kernels.fused_linear_cross_entropy on both backends against float64 PyTorch (whole logits,
autograd) and the reference executor: ragged T and V, chunks that do not divide T, several rows per program,
ignored labels, every float dtype, extreme logits, all rows ignored, and the argument checks."""

import importlib
import math

import pytest
import torch

from tilestack.errors import LaunchError
from tilestack.kernels import fused_linear_cross_entropy

mod = importlib.import_module("tilestack.kernels.cross_entropy")

BACKENDS = ("reference", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# the logits are rounded to x's dtype (as torch's LM head makes them) before the softmax
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not bool(got.isfinite().all()):
        return math.inf
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def f64(x, w, labels, ignore_index=-100):
    """(loss, dx, dw) in float64 from the whole logits."""
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    loss = torch.nn.functional.cross_entropy(xd @ wd.T, labels.long(), ignore_index=ignore_index)
    return (loss.detach(), *torch.autograd.grad(loss, (xd, wd)))


def data(rng, T, d, V, dtype, ignored=(), std=1.0):
    x = torch.from_numpy(rng.normal(0.0, std, (T, d))).to(dtype)
    w = torch.from_numpy(rng.normal(0.0, 1.0, (V, d))).to(dtype)
    labels = torch.from_numpy(rng.integers(0, V, T))
    labels[list(ignored)] = -100
    return x, w, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,d,V,chunk,cfg", [
    (11, 16, 37, 4, dict(BM=2, BN=16)),          # 3 chunks (4, 4, 3), 3 column tiles, a ragged last tile
    (9, 32, 100, None, dict(BM=1, BN=32)),       # one chunk
    (6, 16, 20, 5, dict(BM=4, BN=64)),           # one tile wider than V
    (9, 16, 130, 4, dict(BM=2, BN=32)),          # 3 chunks, each's GEMMs over columns 0-127 and 128-129 apart
    (37, 64, 101, None, dict(BM=4, BN=32)),      # torch 2.13's CPU bf16 mm reads a padded row past K
], ids=str)
@pytest.mark.parametrize("split", [True, False], ids=["gemms-split", "gemms-whole"])
def test_fused_linear_cross_entropy_matches_float64_and_reference(backend, dtype, T, d, V, chunk, cfg, split, rng,
                                                                  poison_empty, monkeypatch):
    """``split``: each chunk's GEMMs over the first multiple of 64 vocabulary entries and the rest apart (what
    large chunks get), or whole."""
    monkeypatch.setattr(mod, "SPLIT_MIN_LOGITS", 0 if split else 1 << 62)
    x, w, labels = data(rng, T, d, V, dtype, ignored=(1, T - 1), std=0.3)
    loss64, dx64, dw64 = f64(x, w, labels)

    loss, dx, dw = fused_linear_cross_entropy(x, w, labels, chunk=chunk, backend=backend, **cfg)
    rloss, rdx, rdw = fused_linear_cross_entropy(x, w, labels, chunk=chunk, backend="reference", **cfg)
    assert loss.shape == () and loss.dtype == torch.float32
    assert dx.shape == x.shape and dx.dtype == dtype and dw.shape == w.shape and dw.dtype == dtype
    tol = TOL[dtype]
    assert abs(float(loss) - float(loss64)) <= tol * float(loss64) and abs(float(loss) - float(rloss)) <= 1e-5
    assert rel(dx, dx64) <= tol and rel(dx, rdx) <= tol
    assert rel(dw, dw64) <= tol and rel(dw, rdw) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("std", [30.0, 1e17], ids=["logits~1e3", "logits~1e35"])
def test_fused_linear_cross_entropy_extreme_logits(backend, std, rng):
    """Logits in the thousands (exp overflows without the max) and near f32's largest: finite, exact."""
    x, w, labels = data(rng, 5, 16, 40, torch.float32, std=std)
    loss64, dx64, dw64 = f64(x, w, labels)
    loss, dx, dw = fused_linear_cross_entropy(x, w, labels, chunk=3, backend=backend, BM=1, BN=16)
    assert math.isfinite(float(loss))
    assert abs(float(loss) - float(loss64)) <= 1e-5 * float(loss64)
    assert rel(dx, dx64) <= 1e-5 and rel(dw, dw64) <= 1e-5


def test_fused_linear_cross_entropy_minus_inf_logits(rng):
    """A column of -inf logits (a masked vocabulary entry) takes no probability and leaves the rest exact."""
    x, w, labels = data(rng, 4, 16, 24, torch.float32)
    labels = labels.clamp(max=22)
    x = torch.cat((x, torch.ones(4, 1)), dim=1)
    w = torch.cat((w, torch.zeros(24, 1)), dim=1)
    w[23, :] = 0.0
    w[23, -1] = -math.inf                       # logit of class 23 = -inf for every row
    loss, dx, _ = fused_linear_cross_entropy(x, w, labels, backend="triton", BM=1, BN=16)
    logits = x.double() @ w.double().T
    want = torch.nn.functional.cross_entropy(logits, labels)
    assert abs(float(loss) - float(want)) <= 1e-5 * float(want)
    assert bool(dx[:, :-1].isfinite().all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_cross_entropy_all_ignored_is_nan_with_zero_gradients(backend, rng):
    """As torch: the mean over no rows is nan, and nothing flows back."""
    x, w, labels = data(rng, 3, 16, 20, torch.float32, ignored=(0, 1, 2))
    loss, dx, dw = fused_linear_cross_entropy(x, w, labels, backend=backend, BM=1, BN=16)
    assert math.isnan(float(loss))
    assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dw, torch.zeros_like(dw))


def test_fused_linear_cross_entropy_int32_labels_and_custom_ignore_index(rng):
    x, w, labels = data(rng, 7, 16, 30, torch.float32)
    labels[2] = -1
    loss64, dx64, dw64 = f64(x, w, labels, ignore_index=-1)
    loss, dx, dw = fused_linear_cross_entropy(x, w, labels.int(), ignore_index=-1, backend="triton", BM=1, BN=16)
    assert abs(float(loss) - float(loss64)) <= 1e-5 * float(loss64)
    assert rel(dx, dx64) <= 1e-5 and rel(dw, dw64) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_ignore_index_that_is_a_class_leaves_its_rows_out_as_torch_does(backend, rng):
    """torch takes any ignore_index, a class among them: rows labelled with it leave the mean (loss and
    gradients), other rows keep that class in their softmax."""
    x, w, labels = data(rng, 9, 16, 30, torch.float32)
    labels[[1, 4, 5]] = 7
    loss64, dx64, dw64 = f64(x, w, labels, ignore_index=7)
    loss, dx, dw = fused_linear_cross_entropy(x, w, labels, ignore_index=7, backend=backend, BM=1, BN=16)
    assert abs(float(loss) - float(loss64)) <= 1e-5 * abs(float(loss64))
    assert rel(dx, dx64) <= 1e-5 and rel(dw, dw64) <= 1e-5
    assert torch.equal(dx[[1, 4, 5]], torch.zeros_like(dx[[1, 4, 5]]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_only_matches_float64_and_makes_no_gradient(backend, dtype, rng):
    """grad=False (what a no_grad call takes): the same loss as float64, ragged T, V and chunks, ignored rows,
    and no gradient made (None, and one GEMM per chunk part instead of three)."""
    x, w, labels = data(rng, 13, 16, 37, dtype, ignored=(2, 9), std=0.5)
    loss64 = f64(x, w, labels)[0]
    calls = []
    real_mm = torch.mm

    def counting_mm(*args, **kwargs):
        calls.append(1)
        return real_mm(*args, **kwargs)

    torch.mm = counting_mm
    try:
        loss, dx, dw = fused_linear_cross_entropy(x, w, labels, chunk=5, grad=False, backend=backend, BM=2, BN=16)
    finally:
        torch.mm = real_mm
    assert dx is None and dw is None
    assert len(calls) == 3                      # one logits GEMM for each of the 3 chunks of 5, 5, 3 rows
    assert abs(float(loss) - float(loss64)) <= TOL[dtype] * float(loss64)
    with_grad = fused_linear_cross_entropy(x, w, labels, chunk=5, backend=backend, BM=2, BN=16)[0]
    assert float(loss) == float(with_grad)       # the same kernel arithmetic, the gradient's store aside


def test_public_op_under_no_grad_gives_the_training_loss(rng):
    """tilestack.torch.ops.fused_linear_cross_entropy under no_grad (an evaluation loop) takes the loss-only
    path and gives the loss the training call gives."""
    from tilestack.torch.ops import fused_linear_cross_entropy as op

    x, w, labels = data(rng, 11, 16, 29, torch.float32, ignored=(3,))
    x.requires_grad_()
    want = op(x, w, labels)
    with torch.no_grad():
        got = op(x, w, labels)
    assert float(got) == float(want.detach()) and not got.requires_grad


@pytest.mark.parametrize("grad", (True, False))
def test_an_ignored_row_of_inf_hidden_state_stays_out_of_the_loss(grad, rng):
    """A padding row (ignored) whose hidden state overflowed: its loss is left out, not 0 times inf (NaN)."""
    x, w, labels = data(rng, 6, 16, 20, torch.float32, ignored=(4,))
    want = f64(x, w, labels)[0]
    x[4] = math.inf
    loss = fused_linear_cross_entropy(x, w, labels, grad=grad, backend="triton", BM=1, BN=16)[0]
    assert abs(float(loss) - float(want)) <= 1e-5 * float(want)


def test_grad_must_be_a_bool(rng):
    x, w, labels = data(rng, 3, 16, 20, torch.float32)
    with pytest.raises(LaunchError, match="grad must be a bool, got 1"):
        fused_linear_cross_entropy(x, w, labels, grad=1)


@pytest.mark.parametrize("chunk", (5, 3, 4))
def test_each_launcher_runs_only_pointers_of_the_alignment_it_was_made_for(chunk, rng, monkeypatch):
    """A launcher is specialized for its pointers' 16-byte alignment (a GPU kernel reads them vectorized); chunks
    of 5 rows start the next chunk's labels, scale and loss slices off 16 bytes, so the plan keeps a launcher per
    alignment, never one made on aligned slices for misaligned ones."""
    kernel = mod.ce_grad_kernel
    real = kernel.launcher_for
    made = []

    def align(args):
        return tuple(a.data_ptr() % 16 for a in args if isinstance(a, torch.Tensor))

    def launcher_for(args, *a, **k):
        run, want = real(args, *a, **k), align(args)
        made.append(want)

        def checked(call_args):
            assert align(call_args) == want, (align(call_args), want)
            run(call_args)
        return checked

    monkeypatch.setattr(kernel, "launcher_for", launcher_for)
    x, w, labels = data(rng, 17, 16, 23, torch.float32, ignored=(6,))
    loss, dx, dw = fused_linear_cross_entropy(x, w, labels, chunk=chunk, backend="triton", BM=1, BN=16)
    loss64, dx64, dw64 = f64(x, w, labels)
    assert abs(float(loss) - float(loss64)) <= 1e-5 * float(loss64) and rel(dx, dx64) <= 1e-5
    assert len(set(made)) >= (2 if chunk != 4 else 1)      # misaligned chunks got launchers of their own


def test_chunk_rows_keeps_chunks_within_the_budget():
    assert mod.chunk_rows(8192, 50257, 2) == 2048
    assert mod.chunk_rows(8192, 32000, 2) == 4096
    assert mod.chunk_rows(100, 50257, 2) == 100
    assert mod.chunk_rows(5, 1 << 30, 4) == 1


@pytest.mark.parametrize("call,match", [
    (lambda: fused_linear_cross_entropy(torch.ones(4, 8), torch.ones(10, 7), torch.zeros(4, dtype=torch.long)),
     "weight is \\(10, 7\\) and x is \\(4, 8\\)"),
    (lambda: fused_linear_cross_entropy(torch.ones(4, 8), torch.ones(10, 8), torch.zeros(3, dtype=torch.long)),
     "labels has 3 elements; expected x.shape\\[0\\] = 4"),
    (lambda: fused_linear_cross_entropy(torch.ones(4, 8), torch.ones(10, 8), torch.zeros(4)),
     "labels has dtype float32"),
    (lambda: fused_linear_cross_entropy(torch.ones(4, 8), torch.ones(10, 8).half(),
                                        torch.zeros(4, dtype=torch.long)), "weight has dtype float16"),
    (lambda: fused_linear_cross_entropy(torch.ones(4, 8), torch.ones(10, 8), torch.zeros(4, dtype=torch.long),
                                        ignore_index=2**63), "ignore_index must be an int within"),
    (lambda: fused_linear_cross_entropy(torch.ones(4, 8), torch.ones(10, 8), torch.zeros(4, dtype=torch.long),
                                        chunk=0), "chunk must be a positive int"),
    (lambda: fused_linear_cross_entropy(torch.ones(4, 8), torch.ones(0, 8), torch.zeros(4, dtype=torch.long)),
     "the vocabulary weight.shape\\[0\\] = 0"),
], ids=["d", "labels-len", "labels-dtype", "weight-dtype", "ignore-index", "chunk", "empty-vocab"])
def test_fused_linear_cross_entropy_bad_arguments_refused_before_launch(call, match, no_launch):
    no_launch(mod, "ce_grad_kernel")
    with pytest.raises(LaunchError, match=match):
        call()


def test_gpu_default_config_trace_and_run(rng):
    """The GPU's config (one row a program, 4096-wide tiles) on a vocabulary of two and a bit tiles."""
    cfg = mod.default_config(9000, "cuda")
    x, w, labels = data(rng, 3, 16, 9000, torch.float32, ignored=(1,), std=0.3)
    loss, dx, dw = fused_linear_cross_entropy(x, w, labels, backend="triton", **cfg)
    loss64, dx64, dw64 = f64(x, w, labels)
    assert cfg == dict(BM=1, BN=4096, num_warps=8)
    assert abs(float(loss) - float(loss64)) <= 1e-5 * float(loss64)
    assert rel(dx, dx64) <= 1e-5 and rel(dw, dw64) <= 1e-5


def test_a_transformed_input_is_refused_naming_the_public_function(rng):
    """Under torch.func.vmap the kernel function cannot read the batched wrapper; the refusal names
    fused_linear_cross_entropy, not its private plan."""
    x, w, labels = data(rng, 4, 16, 20, torch.float32)
    with pytest.raises(LaunchError, match=r"^fused_linear_cross_entropy: x is a tensor of a torch.func transform"):
        torch.func.vmap(lambda x: fused_linear_cross_entropy(x, w, labels)[0])(torch.stack((x, x)))
