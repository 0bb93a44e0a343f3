import pytest

from part_distillation.engine.schedule import MultiStepSchedule


def test_step_decay_reference_schedule():
    lr = MultiStepSchedule(1e-4, steps=(40_000, 45_000))
    assert lr(0) == 1e-4
    assert lr(39_999) == 1e-4
    assert lr(40_000) == pytest.approx(1e-5)   # the decay applies at the step itself
    assert lr(44_999) == pytest.approx(1e-5)
    assert lr(45_000) == pytest.approx(1e-6)
    assert lr(49_999) == pytest.approx(1e-6)


def test_linear_warmup_then_steps():
    lr = MultiStepSchedule(1.0, steps=(10,), warmup_iters=4, warmup_factor=0.2)
    # hand-worked: factor = 0.2 * (1 - i/4) + i/4
    assert [lr(i) for i in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lr(10) == pytest.approx(0.1)


def test_pure_function_of_iteration():
    lr = MultiStepSchedule(1e-4, steps=(3, 6))
    forward = [lr(i) for i in range(8)]
    assert [lr(i) for i in reversed(range(8))] == forward[::-1]


def test_refuses_unsorted_steps():
    with pytest.raises(ValueError, match="increasing"):
        MultiStepSchedule(1e-4, steps=(5, 2))
