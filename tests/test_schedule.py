"""The training schedule: learning-rate factor and data order as pure functions of (seed, step)."""

from __future__ import annotations

import pytest

from selfflow_world.schedule import StepBatches, batch_indices, lr_factor


def test_lr_schedule_warms_up_then_decays():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 10, 100, 0.1) < lr_factor(20, 10, 100, 0.1)


def test_batches_are_a_pure_function_of_seed_and_step_and_split_across_ranks():
    assert batch_indices(50, 8, 3, seed=1) == batch_indices(50, 8, 3, seed=1)
    assert batch_indices(50, 8, 3, seed=1) != batch_indices(50, 8, 3, seed=2)
    r0, r1 = batch_indices(50, 4, 2, 0, rank=0, world=2), batch_indices(50, 4, 2, 0, rank=1, world=2)
    assert not set(r0) & set(r1)
    epoch = [i for s in range(10) for i in batch_indices(40, 4, s, seed=0)]  # one full epoch
    assert sorted(epoch) == list(range(40))


def test_step_batches_resume_where_a_run_stopped():
    whole = list(StepBatches(30, 4, seed=3, start=0, total=8))
    resumed = list(StepBatches(30, 4, seed=3, start=5, total=8))
    assert len(whole) == 8 and resumed == whole[5:]
