"""run_local's report of a failed group: the rank that failed on its own is named first, with its traceback,
whichever rank's report reached the parent first (the others' transport errors are knock-ons)."""

import par_workers as W
import pytest

from tilestack.errors import LaunchError
from tilestack.parallel import run_local


@pytest.mark.parametrize("world_size", [2, 3])
def test_the_rank_that_failed_first_is_named_first(world_size):
    with pytest.raises(LaunchError) as info:
        run_local(W.one_rank_raises, world_size, timeout_s=120)
    msg = str(info.value)
    assert msg.startswith("run_local: rank 0 failed"), msg[:400]
    assert "rank zero's own fault" in msg.split("--- rank", 2)[1], msg[:2000]


def test_bad_arguments_are_refused_before_any_process_starts():
    with pytest.raises(LaunchError, match="world_size=0"):
        run_local(W.one_rank_raises, 0)
    with pytest.raises(LaunchError, match="retries=-1"):
        run_local(W.one_rank_raises, 2, retries=-1)
    with pytest.raises(LaunchError, match="device='tpu'"):
        run_local(W.one_rank_raises, 2, device="tpu")


def test_a_rank_killed_by_a_signal_is_named_and_the_run_is_retried_when_asked(tmp_path):
    marker = str(tmp_path / "killed")
    with pytest.raises(LaunchError) as info:
        run_local(W.killed_on_first_attempt, 2, (marker,), timeout_s=120)
    msg = str(info.value)
    assert msg.startswith("run_local: rank 0 failed") and "exited with code -9 without a report" in msg, msg[:600]
    assert info.value.transient
    with pytest.warns(RuntimeWarning, match="killed_on_first_attempt failed transiently"):
        assert run_local(W.killed_on_first_attempt, 2, (marker + "2",), timeout_s=120, retries=1) == [0, 1]


def test_a_rank_that_raised_is_not_retried():
    with pytest.raises(LaunchError, match="rank 0 failed") as info:
        run_local(W.one_rank_raises, 2, timeout_s=120, retries=3)
    assert not info.value.transient
