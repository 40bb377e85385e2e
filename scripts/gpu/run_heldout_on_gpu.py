"""On a GPU: the held-out rounds' tests (tests/lang/test_heldout_round*.py) with their Triton launches compiled for
the GPU instead of interpreted: each launch on the "triton" backend moves its tensors to CUDA, launches there on
``--backend`` (triton, or gluon: kernels Gluon refuses to lower are counted apart), and copies the results back,
so every assertion of the CPU test runs on the GPU's results.

    PYTHONPATH=src python3 scripts/gpu/run_heldout_on_gpu.py --backend triton tests/lang/test_heldout_round5.py

Expanded inputs (a stride of 0: tensors of 2**31 elements held in one) go to the GPU expanded; other views go as
dense copies, so a test's checks of memory around a view see the CPU tensor (written through the view).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "lang")]

import heldout_support  # noqa: E402

from tilestack.errors import BackendError  # noqa: E402

REFUSED: list[str] = []          # Gluon's refusals (layouts, f32 products): not results


def to_gpu(t: torch.Tensor) -> torch.Tensor:
    if any(s == 0 and d > 1 for d, s in zip(t.shape, t.stride(), strict=True)):
        base = t[tuple(slice(0, 1) if s == 0 else slice(None) for s in t.stride())]
        return base.cuda().expand(t.shape)
    return t.cuda()


def gpu_launcher(backend: str):
    interpreted = heldout_support.launch

    def launch(kernel, which, *args, **consts) -> None:
        if which != "triton":
            interpreted(kernel, which, *args, **consts)
            return
        dev = [to_gpu(a) if isinstance(a, torch.Tensor) else a for a in args]
        try:
            kernel(*dev, backend=backend, **consts)
        except BackendError as e:
            if backend == "gluon" and "the gluon backend" in str(e):
                REFUSED.append(f"{kernel.name}: {str(e)[:160]}")
                pytest.skip("gluon refuses this kernel")
            raise
        torch.cuda.synchronize()
        for a, d in zip(args, dev, strict=True):
            if isinstance(a, torch.Tensor) and d.stride() and 0 not in d.stride():
                a.copy_(d.cpu())
    return launch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="triton", choices=("triton", "gluon"))
    p.add_argument("files", nargs="+")
    args, rest = p.parse_known_args()
    heldout_support.launch = gpu_launcher(args.backend)
    for mod in list(sys.modules.values()):          # the rounds import launch by name: patch it where they look
        if getattr(mod, "launch", None) is not None and getattr(mod, "__name__", "").startswith("test_heldout"):
            mod.launch = heldout_support.launch

    class Patch:
        @staticmethod
        def pytest_collection_modifyitems(session, config, items):
            for item in items:
                if getattr(item.module, "launch", None) is not None:
                    item.module.launch = heldout_support.launch

    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-k", "triton and not sm90a", *rest, *args.files],
                     plugins=[Patch()])
    if REFUSED:
        print(f"{len(REFUSED)} launches gluon refused; first: {REFUSED[0]}")
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
