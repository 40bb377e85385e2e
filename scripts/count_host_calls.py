"""Python calls per eager norm call (forward, and backward through autograd), counted with sys.setprofile on the
CPU with every kernel launch stubbed out: a deterministic measure of the host path's length where this machine's
timings are too noisy to compare two versions.

    PYTHONPATH=src python3 scripts/count_host_calls.py            # this tree
    PYTHONPATH=/tmp/old/src python3 scripts/count_host_calls.py   # another checkout's src, to compare
"""

from __future__ import annotations

import sys

import torch


def stub_launches() -> None:
    """Every backend's prepared launcher becomes a no-op (the outputs stay uninitialized: only calls count)."""
    import tilestack.backends as backends

    real = backends.get_backend

    class Stub:
        def __init__(self, backend):
            self.backend = backend

        def __getattr__(self, name):
            return getattr(self.backend, name)

        def prepare(self, traced, args, options=None):
            return lambda args: None

    backends.get_backend = lambda name: Stub(real(name))


def count(fn) -> tuple[int, int]:
    """(Python calls, C calls) of one call of ``fn`` after five warm-up calls (plans made)."""
    for _ in range(5):
        fn()
    n = [0, 0]

    def prof(frame, event, arg):
        if event == "call":
            n[0] += 1
        elif event == "c_call":
            n[1] += 1
    sys.setprofile(prof)
    fn()
    sys.setprofile(None)
    return n[0], n[1]


def main() -> None:
    import tilestack  # noqa: F401
    from tilestack.torch import ops

    stub_launches()
    bf = torch.bfloat16
    x = torch.randn(4, 16, 1024, dtype=bf, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = torch.ones(1024, dtype=bf, requires_grad=True)
    b = torch.zeros(1024, dtype=bf, requires_grad=True)
    ys = ops.add_layer_norm(x, r, w, b)
    g = (torch.ones_like(ys[0]), torch.ones_like(ys[1]))
    yl = ops.layer_norm(x, w, b)
    cases = {"add_layer_norm forward": lambda: ops.add_layer_norm(x, r, w, b),
             "layer_norm forward": lambda: ops.layer_norm(x, w, b),
             "add_layer_norm backward": lambda: torch.autograd.grad(ys, (x, r, w, b), g, retain_graph=True),
             "layer_norm backward": lambda: torch.autograd.grad(yl, (x, w, b), g[0], retain_graph=True)}
    def show(name, fn):
        py, c = count(fn)
        print(f"{name:<28}{py} Python + {c} C calls")

    with torch.no_grad():
        show("add_layer_norm, no grad", cases["add_layer_norm forward"])
    for name, fn in cases.items():
        show(name, fn)


if __name__ == "__main__":
    main()
