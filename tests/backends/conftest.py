"""Fixtures shared by the backend tests."""

import pytest


class _Hopper:
    """A stand-in for Triton's CUDA driver that answers only what compiling asks (target, device, stream)."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@pytest.fixture
def hopper_jit():
    from triton.runtime import driver
    saved = driver._active
    driver.set_active(_Hopper())
    yield
    driver._active = saved
