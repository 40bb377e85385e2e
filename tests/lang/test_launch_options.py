"""Launch options (Triton's num_warps, num_stages) are the backend's, not the kernel's: a kernel declares only its
tile sizes and variants, defaults its options in ``@ts.kernel(options=...)``, and takes them at launch; a kernel
written when they were tunables of its signature keeps working unchanged."""

import inspect

import pytest
import torch

import tilestack.kernels as library
import tilestack.lang as ts
from tilestack.backends.triton.launch import Launcher
from tilestack.errors import LaunchError, TraceError, TunableError

OPTIONS = {"num_warps", "num_stages"}


def _seen_options(monkeypatch) -> list:
    """The launch options of every Triton launcher built from now on."""
    seen = []
    init = Launcher.__init__
    monkeypatch.setattr(Launcher, "__init__", lambda self, *a: init(self, *a) or seen.append(self.options))
    return seen


@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),))
def legacy_scale(X, Y, *, BM: int = ts.tunable(16, (16, 32)), num_warps: int = ts.tunable(4, (2, 4)),
                 num_stages: int = ts.tunable(1, (1, 2))):
    """A user's kernel from before: its launch options are tunables of its signature."""
    x = ts.RegTile[ts.f32, BM, 16]()
    ts.load(x, X, at=(ts.block_id(0), 0))
    ts.mul(x, x, 3.0)
    ts.store(Y, x, at=(ts.block_id(0), 0))


@ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),), options=dict(num_warps=2, num_stages=1))
def scale(X, Y, *, BM: int = ts.tunable(16, (16, 32))):
    x = ts.RegTile[ts.f32, BM, 16]()
    ts.load(x, X, at=(ts.block_id(0), 0))
    ts.mul(x, x, 3.0)
    ts.store(Y, x, at=(ts.block_id(0), 0))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_kernel_declaring_its_launch_options_still_works(backend, monkeypatch):
    seen = _seen_options(monkeypatch)
    x = torch.randn(40, 16)
    y = torch.full_like(x, float("nan"))
    legacy_scale(x, y, BM=32, num_warps=2, num_stages=2, backend=backend)
    torch.testing.assert_close(y, 3 * x)
    assert legacy_scale.trace(x, y, num_warps=2).constants["num_warps"] == 2     # still its constant
    assert seen == ([{"num_warps": 2, "num_stages": 2}] if backend == "triton" else [])
    with pytest.raises(TunableError, match=r"num_warps=8 is outside its domain \(2, 4\)"):
        legacy_scale(x, y, num_warps=8, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_default_options_apply_and_launch_options_override_them(backend, monkeypatch):
    seen = _seen_options(monkeypatch)
    x = torch.randn(40, 16)
    y = torch.full_like(x, float("nan"))
    scale(x, y, backend=backend)
    torch.testing.assert_close(y, 3 * x)
    y.fill_(float("nan"))
    scale(x, y, BM=32, num_warps=8, backend=backend)
    torch.testing.assert_close(y, 3 * x)
    want = [{"num_warps": 2, "num_stages": 1}, {"num_warps": 8, "num_stages": 1}]
    assert seen == (want if backend == "triton" else [])
    traced = scale.trace(x, y, BM=32, num_warps=8)        # launch options do not change the trace
    assert traced is scale.trace(x, y, BM=32) and set(traced.constants) == {"BM"}


def test_a_traced_kernels_own_launch_uses_the_default_options(monkeypatch):
    seen = _seen_options(monkeypatch)
    x = torch.randn(16, 16)
    y = torch.empty_like(x)
    scale.trace(x, y).run(x, y, backend="triton")
    assert seen == [{"num_warps": 2, "num_stages": 1}]


def test_bad_default_options_are_refused_naming_them():
    with pytest.raises(TraceError, match=r"\['BM'\] are both constants of the kernel and launch options"):
        @ts.kernel(grid=lambda X: (1,), options=dict(BM=16))
        def clash(X, *, BM: int = 16):
            pass

    @ts.kernel(grid=lambda X: (1,), options=dict(num_wraps=4))
    def typo(X):
        pass
    with pytest.raises(LaunchError, match=r"default launch options \['num_wraps'\] are no backend's"):
        typo(torch.zeros(1))


def test_no_library_kernel_declares_launch_options():
    """Every tile kernel of the library declares only its own tunables; its warps and stages are defaults of
    the kernel (``Kernel.options``), which the tuner searches as the backend's."""
    kernels = {name: k for name, k in inspect.getmembers(library) if isinstance(k, ts.Kernel)}
    import tilestack.kernels.attention_bwd as ab
    import tilestack.kernels.layernorm_bwd as lb
    kernels |= {n: k for m in (ab, lb) for n, k in inspect.getmembers(m) if isinstance(k, ts.Kernel)}
    assert len(kernels) >= 10
    for name, k in kernels.items():
        assert not OPTIONS & set(k.constants), name
        assert set(k.options) <= OPTIONS, name
