import pytest

from part_distillation.engine.sampler import GlobalBatchSampler, accumulation_steps, epoch_order


def _iteration(sampler, it):
    return [sampler.micro_batch(it, a) for a in range(sampler.accum)]


def test_accumulation_steps():
    assert accumulation_steps(256, 32, 8) == 1       # the reference: 4 nodes x 8 GPUs x 8
    assert accumulation_steps(256, 1, 8) == 32       # one process
    assert accumulation_steps(256, 8, 4) == 8
    with pytest.raises(ValueError, match="stage.batch_size"):
        accumulation_steps(256, 3, 8)


def test_micro_batches_are_the_same_set_for_any_number_of_processes():
    one = GlobalBatchSampler(10, global_batch=4, per_device_batch=1, seed=3)
    two = [GlobalBatchSampler(10, 4, 1, seed=3, rank=r, world_size=2) for r in range(2)]
    for it in range(6):
        single = _iteration(one, it)
        split = [mb for s in two for mb in _iteration(s, it)]
        assert sorted(single) == sorted(split)
        assert len({sid for mb in single for sid in mb}) == 4


def test_every_epoch_visits_every_sample_once_in_a_seeded_order():
    sampler = GlobalBatchSampler(6, global_batch=4, per_device_batch=2, seed=1)
    ids = [sid for it in range(3) for mb in _iteration(sampler, it) for sid in mb]  # 12 = two epochs
    assert [e for e, _ in ids] == [0] * 6 + [1] * 6
    assert sorted(i for e, i in ids if e == 0) == list(range(6))
    assert [i for e, i in ids if e == 0] == epoch_order(6, 1, 0).tolist()
    assert [i for e, i in ids if e == 1] == epoch_order(6, 1, 1).tolist()
    assert epoch_order(6, 1, 0).tolist() != epoch_order(6, 1, 1).tolist()


def test_iterating_from_start_iter_equals_skipping_ahead():
    full = iter(GlobalBatchSampler(7, global_batch=4, per_device_batch=2, seed=0))
    batches = [next(full) for _ in range(10)]  # 5 iterations x 2 micro-batches
    resumed = iter(GlobalBatchSampler(7, global_batch=4, per_device_batch=2, seed=0, start_iter=3))
    assert [next(resumed) for _ in range(4)] == batches[6:]
