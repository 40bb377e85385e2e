"""A checkpoint saved under one layout resumes under another to the same losses (2 gloo processes)."""

import par_workers as W
import pytest
import torch

from tilestack.parallel import GPT, ParallelConfig, ParallelConfigError, run_local

CASES = [(dict(dp=2), dict(tp=2, sp=2)), (dict(dp_shard=2), dict(pp=2, microbatches=2))]   # before -> after


def test_resume_under_another_layout(tmp_path):
    res = run_local(W.reshard_cases, 2, (str(tmp_path / "ckpt"), CASES), timeout_s=300)
    ref = W.reference(5)["losses"][3:]
    for r in (case for per_rank in res for case in per_rank):
        torch.testing.assert_close(torch.tensor(r["cont"]), torch.tensor(ref), rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.tensor(r["resumed"]), torch.tensor(ref), rtol=1e-5, atol=0)


def test_missing_checkpoint_is_refused(tmp_path):
    from tilestack.parallel import checkpoint

    class _T:      # what load looks at before touching a process group
        zero, parts, pc = None, [GPT(W.CFG)], ParallelConfig()
    with pytest.raises(ParallelConfigError, match="is not a directory"):
        checkpoint.load(_T(), tmp_path / "nothing")


def test_a_checkpoint_of_the_old_layout_still_resumes(tmp_path):
    """A checkpoint saved before the optimizer was keyed by parameter name (2026-12-07) loads, and the run goes on
    to the same losses as the uninterrupted one."""
    res = run_local(W.resume_old_layout, 2, (str(tmp_path / "old"),), timeout_s=300)
    for r in res:
        torch.testing.assert_close(torch.tensor(r["resumed"]), torch.tensor(r["cont"]), rtol=1e-6, atol=0)
