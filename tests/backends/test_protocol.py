"""The backend protocol: one registry, typed options per backend, artifacts cached by the backend (not on the
trace), launchers prebuilt once per launch signature, and backends that never import the layers above them."""

import ast
import gc
import pathlib
import weakref

import pytest
import torch

import tilestack.lang as ts
from tilestack import config
from tilestack.backends import NAMES, get_backend
from tilestack.backends.base import Backend
from tilestack.errors import BackendError

CPU_NAMES = tuple(n for n in NAMES if n != "gluon")   # gluon runs only on a Hopper GPU (tests/backends/test_gluon_*)

BACKENDS_DIR = pathlib.Path(__file__).parents[2] / "src" / "tilestack" / "backends"


@ts.kernel(grid=lambda X: (ts.cdiv(X.shape[0], 16),))
def double(X, Y, *, num_warps: int = 4):
    x = ts.RegTile[ts.f32, 16, 16]()
    ts.load(x, X, at=(ts.block_id(0), 0))
    ts.mul(x, x, 2.0)
    ts.store(Y, x, at=(ts.block_id(0), 0))


def test_one_registry_of_backends_and_the_knob_derives_from_it():
    assert NAMES == ("reference", "triton", "gluon")
    assert config.BACKENDS == ("auto", *NAMES)
    for name in NAMES:
        be = get_backend(name)
        assert isinstance(be, Backend) and be.name == name and be is get_backend(name)
    with pytest.raises(BackendError, match=r"backend='cuda'; expected one of \('reference', 'triton', 'gluon'\)"):
        get_backend("cuda")


def test_backends_never_import_perf_tune_or_the_language():
    for path in BACKENDS_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                assert not n.startswith(("tilestack.perf", "tilestack.tune", "tilestack.kernels")), (path, n)


def test_triton_options_are_typed_and_come_from_the_kernel_constants():
    be = get_backend("triton")
    assert be.options({"num_warps": 8, "BM": 64}) == be.Options(num_warps=8)
    assert be.Options(num_warps=8, num_stages=3).launch_kwargs() == {"num_warps": 8, "num_stages": 3}
    assert be.Options().launch_kwargs() == {}
    with pytest.raises(BackendError, match="num_warps=3; expected a power of two"):
        be.Options(num_warps=3)
    with pytest.raises(BackendError, match="num_stages=0; expected a positive int"):
        be.Options(num_stages=0)
    assert get_backend("reference").options({"num_warps": 8}) == get_backend("reference").Options()


@pytest.mark.parametrize("backend", CPU_NAMES)
def test_compile_gives_an_artifact_that_launches(backend):
    x = torch.randn(40, 16)
    y = torch.full_like(x, float("nan"))
    traced = double.trace(x, y)
    art = get_backend(backend).compile(traced, get_backend(backend).options(traced.constants))
    art.launch((x, y))
    torch.testing.assert_close(y, 2 * x)


def test_artifacts_live_in_the_backends_cache_not_on_the_trace():
    be = get_backend("triton")
    x = torch.randn(32, 16)
    y = torch.empty_like(x)
    traced = double.trace(x, y, num_warps=2)
    traced.run(x, y, backend="triton")
    assert not hasattr(traced, "_compiled") and not hasattr(traced, "_launchers")
    assert [k[0] for k in be.cache(traced)] == ["jit"]
    assert be.compile(traced, interpret=True, tma=True) is be.compile(traced, interpret=True, tma=True)
    ref = weakref.ref(traced)
    double._traced.clear()
    double._launchers.clear()
    del traced
    gc.collect()
    assert ref() is None               # nothing the backend keeps holds the trace: a dropped trace frees its code


@pytest.mark.parametrize("backend", CPU_NAMES)
def test_a_repeated_launch_reuses_the_prebuilt_launcher(backend, monkeypatch):
    x = torch.randn(48, 16)
    y = torch.empty_like(x)
    built = []
    be = get_backend(backend)
    prepare = be.prepare
    monkeypatch.setattr(be, "prepare", lambda traced, args, options: built.append(1) or prepare(traced, args, options))
    double._launchers.clear()
    for _ in range(3):
        double(x, y, backend=backend)
    assert len(built) == 1
    for _ in range(3):   # a trace's own launches: keyed with every constant, so one launcher more
        double.trace(x, y).run(x, y, backend=backend)
    assert len(built) == 2
    torch.testing.assert_close(y, 2 * x)


def test_launch_options_reach_triton():
    from tilestack.backends.triton.launch import Launcher
    x = torch.randn(16, 16)
    launcher = Launcher(double.trace(x, x.clone(), num_warps=8), (x, x.clone()))
    assert launcher.options == {"num_warps": 8}


@ts.kernel(grid=lambda X: (ts.cdiv(X.shape[0], 16),))
def triple(X, Y):
    x = ts.RegTile[ts.f32, 16, 16]()
    ts.load(x, X, at=(ts.block_id(0), 0))
    ts.mul(x, x, 3.0)
    ts.store(Y, x, at=(ts.block_id(0), 0))


@pytest.mark.parametrize("backend", CPU_NAMES)
def test_launch_options_a_kernel_does_not_declare_are_given_at_launch(backend, monkeypatch):
    from tilestack.backends.triton.launch import Launcher
    x = torch.randn(20, 16)
    y = torch.full_like(x, float("nan"))
    seen = []
    init = Launcher.__init__
    monkeypatch.setattr(Launcher, "__init__", lambda self, *a: init(self, *a) or seen.append(self.options))
    triple(x, y, num_warps=2, num_stages=1, backend=backend)
    torch.testing.assert_close(y, 3 * x)
    assert seen == ([{"num_warps": 2, "num_stages": 1}] if backend == "triton" else [])
    assert "num_warps" not in triple.trace(x, y).constants     # the trace is the kernel's alone


def test_an_unknown_constant_is_still_refused_by_name():
    from tilestack.errors import LaunchError
    x = torch.randn(16, 16)
    with pytest.raises(LaunchError, match=r"unknown constant\(s\) \['num_wraps'\]"):
        triple(x, x.clone(), num_wraps=2)
