"""Task's local work is refused before a run where its step count could not be computed: local_epochs of 1e308 or
inf was taken, and the client's step count overflowed (OverflowError) once the run had started."""

import pytest

from tilestack.federated.task import MAX_LOCAL_EPOCHS, Task


@pytest.mark.parametrize("epochs, fragment", [(1e308, r"local_epochs=1e\+308; expected in \(0, 1e\+06\]"),
                                              (float("inf"), "local_epochs=inf"), (0.0, "local_epochs=0.0"),
                                              (-1.0, "local_epochs=-1.0"), (float("nan"), "local_epochs=nan")])
def test_local_epochs_out_of_range_is_refused(epochs, fragment):
    with pytest.raises(ValueError, match=fragment):
        Task(local_epochs=epochs)


def test_local_epochs_at_the_limit_counts_its_steps():
    task = Task(local_epochs=MAX_LOCAL_EPOCHS, num_clients=2)
    batches = -(-task.num_train(0) // task.batch_size)
    assert task.steps_for(0) == int(MAX_LOCAL_EPOCHS * batches)
    assert Task(local_epochs=0.5, num_clients=2).steps_for(0) >= 1
