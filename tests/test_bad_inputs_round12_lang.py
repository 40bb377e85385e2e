"""Round twelve of the bad-input sweep, part two: the tile language's kernel decorator (``ts.kernel(options=...)``),
``ts.tunable`` domains and the launch options every backend checks (part one, ``test_bad_inputs_round12.py``: bench
records, the result store, environment variables).

What rounds 1-11 did not reach, and what it found (each test marked so failed before its fix):
- ``ts.kernel(options=dict(num_warps='4'))`` (or 3, 0): a kernel's default launch options were checked by name only,
  so a value no GPU backend takes ran on the reference backend (which ignores them) and failed only on the GPU; the
  launch-time options are checked (round 6), the defaults now the same way. ``options='num_warps'`` failed inside
  ``dict()`` ("dictionary update sequence element #0 has length 1"); a list of pairs was taken as a dict;
- ``num_warps=2**40`` (or 64) was taken by every backend's options: a block holds at most 1024 threads, 32 warps,
  so the GPU refused what the CPU ran; now at most ``backends.base.MAX_WARPS``;
- ``ts.tunable(16, (16, 16, 32))`` listed the config twice in ``kernel.configs()`` (a tuner timed and cached it
  twice); ``ts.tunable(16, "16")`` split the str into characters ("default 16 is not in its domain ('1', '6')"); a
  domain whose values do not fit the constant's annotation (``BM: int = ts.tunable(16, (16, '32'))``, 16.0 or NaN
  for an int) was found only when a tuner chose that config ("constant BM is declared int"): each is now refused
  when the kernel is declared, naming the constant and the value.

A grid past CUDA's limits (axis 0 above 2**31 - 1, axes 1 and 2 above 65535), refused on the GPU but run by the
reference executor and Triton's interpreter when this round was written, is now refused on every backend
(``TracedKernel.grid``; tests/lang/test_grid_limits.py). A user kernel's output that requires grad, written behind
autograd's back, is refused in grad mode on every launch (below).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tilestack.lang as ts
from tilestack import config
from tilestack.backends import check_launch_options
from tilestack.backends.gluon import GluonOptions
from tilestack.backends.triton import TritonOptions
from tilestack.errors import BackendError, LaunchError, TraceError, TunableError

BACKENDS = ["reference", "triton"]      # the Triton backend runs under its interpreter on this CPU


@pytest.fixture(autouse=True)
def reference_backend():
    with config.override(backend="reference"):
        yield


def _copy_kernel(*, options=None, domain=(16, 32), default=16):
    """A fresh kernel copying X into Y by (BM, 16) tiles (one program per BM rows)."""
    def copy(X, Y, *, BM: int = ts.tunable(default, domain)):
        i = ts.block_id(0)
        t = ts.RegTile[ts.f32, BM, 16]()
        ts.load(t, X, at=(i, 0))
        ts.store(Y, t, at=(i, 0))
    return ts.kernel(grid=lambda X, BM: (ts.cdiv(X.shape[0], BM),), options=options)(copy)


def _xy():
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    return x, torch.full_like(x, 7.0)


# ---- default launch options: checked as those given at launch ------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options, fragment", [
    (dict(num_warps="4"), "num_warps='4'"),
    (dict(num_warps=3), "num_warps=3"),
    (dict(num_warps=0), "num_warps=0"),
    (dict(num_stages=-1), "num_stages=-1"),
    (dict(num_stages=True), "num_stages=True"),
    (dict(num_warps=64), "num_warps=64"),
    (dict(warp_specialize="yes"), "warp_specialize='yes'"),
])
def test_a_default_launch_option_no_backend_takes_is_refused_before_any_work(backend, options, fragment):
    k = _copy_kernel(options=options)
    x, y = _xy()
    with pytest.raises(LaunchError, match=r"copy \(its default options=\): launch option " + fragment.replace(
            "(", r"\(").replace(")", r"\)") + " is refused by every backend"):
        k(x, y, backend=backend)
    assert torch.equal(y, torch.full_like(x, 7.0))        # nothing written


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_options_a_backend_takes_still_copy(backend):
    k = _copy_kernel(options=dict(num_warps=8, num_stages=2))
    x, y = _xy()
    k(x, y, backend=backend)
    assert torch.equal(y, x)
    k(x, y, backend=backend, num_warps=4)                   # a launch option over the default one
    assert torch.equal(y, x)


@pytest.mark.parametrize("options", ["num_warps", [("num_warps", 4)], 4, ("num_warps", 4)])
def test_options_that_are_no_dict_are_refused_when_declared(options):
    with pytest.raises(TraceError, match=rf"ts.kernel: options is {type(options).__name__} .*expected a dict of "
                                         r"launch options"):
        _copy_kernel(options=options)


@pytest.mark.parametrize("warps", [64, 128, 2**40])
def test_more_warps_than_a_block_holds_are_refused_by_every_backend(warps):
    for Options in (TritonOptions, GluonOptions):
        with pytest.raises(BackendError, match=rf"num_warps={warps}; expected at most 32 \(a block holds at most "
                                               r"1024 threads"):
            Options(num_warps=warps)
    with pytest.raises(LaunchError, match=rf"launch option num_warps={warps} is refused by every backend"):
        check_launch_options("k", {"num_warps": warps})
    k = _copy_kernel()
    x, y = _xy()
    with pytest.raises(LaunchError, match=rf"num_warps={warps} is refused"):
        k(x, y, num_warps=warps)
    assert torch.equal(y, torch.full_like(x, 7.0))


def test_the_most_warps_a_block_holds_are_taken():
    assert TritonOptions(num_warps=32).num_warps == 32 and GluonOptions(num_warps=32).num_warps == 32
    check_launch_options("k", {"num_warps": 32})


# ---- tunable domains -----------------------------------------------------------------------------------------------
def test_a_value_given_twice_in_a_domain_is_refused():
    with pytest.raises(TunableError, match=r"tunable domain \(16, 16, 32\) holds 16 twice; expected each value once"):
        _copy_kernel(domain=(16, 16, 32))
    with pytest.raises(TunableError, match=r"holds 16 twice"):      # a NumPy 16 is the int 16, as resolve() reads it
        _copy_kernel(domain=(16, np.int64(16)))


@pytest.mark.parametrize("domain", ["16", b"16", 16, None])
def test_a_domain_that_is_no_sequence_of_values_is_refused(domain):
    with pytest.raises(TunableError, match=rf"tunable domain {domain!r} \({type(domain).__name__}\); expected a "
                                           r"sequence of the values"):
        _copy_kernel(domain=domain)


@pytest.mark.parametrize("domain, default, wrong", [
    ((16, "32"), 16, "'32' (str)"),
    ((16.0, 32.0), 16.0, "16.0 (float)"),
    ((16, math.nan), 16, "nan (float)"),
    ((16, True), 16, "True (bool)"),
    ((16, None), 16, "None (NoneType)"),
])
def test_a_domain_value_the_annotation_does_not_take_is_refused_when_declared(domain, default, wrong):
    with pytest.raises(TunableError, match=r"kernel copy: tunable BM is declared int, but its domain .* holds "
                                           + wrong.replace("(", r"\(").replace(")", r"\)") + "; expected int"):
        _copy_kernel(domain=domain, default=default)


@pytest.mark.parametrize("backend", BACKENDS)
def test_domains_of_numpy_ints_sets_and_generators_still_work(backend):
    """What the checks leave alone: NumPy ints (taken as the ints they hold), a set or a generator of values."""
    for domain in ((np.int64(16), np.int32(32)), {16, 32}, (v for v in (16, 32))):
        k = _copy_kernel(domain=domain)
        assert sorted(c["BM"] for c in k.configs()) == [16, 32]
        assert all(type(c["BM"]) is int for c in k.configs())
        for config_ in k.configs():
            x, y = _xy()
            k(x, y, backend=backend, **config_)
            assert torch.equal(y, x), config_


def test_a_float_constant_takes_ints_and_floats_in_its_domain():
    k = _copy_kernel(domain=(16, 32), default=16)
    assert [c["BM"] for c in k.configs()] == [16, 32]

    def scaled(X, Y, *, S: float = ts.tunable(1, (1, 0.5, 2.0))):
        i = ts.block_id(0)
        t = ts.RegTile[ts.f32, 16, 16]()
        ts.load(t, X, at=(i, 0))
        ts.mul(t, t, S)
        ts.store(Y, t, at=(i, 0))
    k = ts.kernel(grid=lambda X: (ts.cdiv(X.shape[0], 16),))(scaled)
    x, y = _xy()
    k(x, y, S=0.5)
    assert torch.equal(y, x * 0.5)


# ---- an output that requires grad ----------------------------------------------------------------------------------
# A user kernel's output (a tensor it stores to) that required grad was not refused: the reference backend ran the
# kernel, then failed in its copy back with torch's bare RuntimeError ('a leaf Variable that requires grad is being
# used in an in-place operation'); Triton wrote it behind autograd's back. Refused now on every launch, cached too
# (the launch key holds neither requires_grad nor the grad mode).
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_output_that_requires_grad_is_refused_by_name(backend):
    k = _copy_kernel()
    x, _ = _xy()
    y = torch.zeros(32, 16, requires_grad=True)
    with pytest.raises(LaunchError, match=r"output Y .*requires grad"):
        k(x, y, backend=backend)
    assert not y.detach().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_output_that_requires_grad_is_refused_on_the_cached_launcher_too(backend):
    k = _copy_kernel()
    x, y = _xy()
    k(x, y, backend=backend)                        # the launcher of this signature is built and cached
    assert torch.equal(y, x)
    z = torch.zeros(32, 16, requires_grad=True)     # the same launch key: dtype, shape, strides, device
    with pytest.raises(LaunchError, match=r"output Y is a leaf tensor that requires grad \(shape \(32, 16\)\)"):
        k(x, z, backend=backend)
    assert not z.detach().any()
    launch = k.launcher_for((x, y), backend)        # a launcher a library keeps, skipping even the key
    with pytest.raises(LaunchError, match=r"output Y .*requires grad"):
        launch((x, z))
    assert not z.detach().any()
    traced = k.trace(x, y)                          # and a trace's own launches
    with pytest.raises(LaunchError, match=r"output Y .*requires grad"):
        traced.run(x, z, backend=backend)
    assert not z.detach().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_output_that_requires_grad_is_written_under_no_grad(backend):
    """Under torch.no_grad() the write is meant (an optimizer's update): it runs, the first launch and a cached one."""
    k = _copy_kernel()
    x, _ = _xy()
    y = torch.zeros(32, 16, requires_grad=True)
    with torch.no_grad():
        k(x, y, backend=backend)
    assert torch.equal(y.detach(), x) and y.requires_grad and y.is_leaf
    y2 = torch.zeros(32, 16, requires_grad=True)
    with torch.no_grad():
        k(x * 2, y2, backend=backend)               # the cached launcher
    assert torch.equal(y2.detach(), x * 2)
    with pytest.raises(LaunchError, match=r"output Y .*requires grad"):   # grad mode back on: refused again
        k(x, y2, backend=backend)
    assert torch.equal(y2.detach(), x * 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_autograd_tracked_intermediate_output_is_refused(backend):
    """Writing into a non-leaf that requires grad left autograd's graph without the kernel's math: refused."""
    k = _copy_kernel()
    x, _ = _xy()
    w = torch.ones(32, 16, requires_grad=True)
    y = w * 3                                       # tracked: grad_fn MulBackward0
    with pytest.raises(LaunchError, match=r"output Y is a tensor autograd tracks .*MulBackward0.*requires grad"):
        k(x, y, backend=backend)
    assert torch.equal(y.detach(), torch.full((32, 16), 3.0))
    view = w[:, :]                                  # a view of a leaf that requires grad
    with pytest.raises(LaunchError, match=r"output Y .*requires grad"):
        k(x, view, backend=backend)
    assert torch.equal(w.detach(), torch.ones(32, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_input_that_requires_grad_is_read_as_before(backend):
    """Only outputs are refused: a kernel reads tensors that require grad (its result carries no graph)."""
    k = _copy_kernel()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = torch.zeros(32, 16)
    k(x, y, backend=backend)
    assert torch.equal(y, x.detach()) and not y.requires_grad
