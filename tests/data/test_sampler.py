import json

import pytest

from megatron_opd.data import PromptSampler


def draw(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_each_epoch_is_a_permutation_without_the_remainder():
    sampler = PromptSampler(num_items=50, batch_size=8, seed=3)
    assert sampler.batches_per_epoch == 6
    epoch0, epoch1 = draw(sampler, 6), draw(sampler, 6)
    for epoch in (epoch0, epoch1):
        seen = [i for batch in epoch for i in batch]
        assert len(seen) == len(set(seen)) == 48 and all(0 <= i < 50 for i in seen)
        assert all(len(batch) == 8 for batch in epoch)
    assert epoch0 != epoch1
    assert (sampler.epoch, sampler.position) == (1, 48)
    sampler.next_batch()
    assert (sampler.epoch, sampler.position) == (2, 8)


def test_order_depends_on_the_seed_only():
    assert draw(PromptSampler(50, 8, seed=3), 13) == draw(PromptSampler(50, 8, seed=3), 13)
    assert draw(PromptSampler(50, 8, seed=3), 6) != draw(PromptSampler(50, 8, seed=4), 6)
    assert draw(PromptSampler(10, 5, shuffle=False), 4) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] * 2


@pytest.mark.parametrize("stop_after", [0, 1, 5, 6, 7, 12, 16])
def test_resume_sees_exactly_the_uninterrupted_batches(stop_after):
    uninterrupted = draw(PromptSampler(50, 8, seed=11), 20)
    first = PromptSampler(50, 8, seed=11)
    before = draw(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = PromptSampler(50, 8, seed=11)
    resumed.load_state_dict(state)
    assert before + draw(resumed, 20 - stop_after) == uninterrupted


def test_state_dict_contents():
    sampler = PromptSampler(50, 8, seed=11)
    draw(sampler, 7)
    assert sampler.state_dict() == {"epoch": 1, "position": 8, "seed": 11, "num_items": 50, "shuffle": True}


def test_resume_with_another_batch_size_continues_the_same_order():
    order = [i for batch in draw(PromptSampler(48, 4, seed=1), 12) for i in batch]
    first = PromptSampler(48, 4, seed=1)
    draw(first, 3)
    resumed = PromptSampler(48, 6, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert [i for batch in draw(resumed, 6) for i in batch] == order[12:48]


@pytest.mark.parametrize("key, value", [("seed", 12), ("num_items", 49), ("shuffle", False)])
def test_resume_refuses_a_different_order(key, value):
    state = PromptSampler(50, 8, seed=11).state_dict()
    state[key] = value
    with pytest.raises(ValueError, match=f"sampler state: {key}={value!r} in the checkpoint"):
        PromptSampler(50, 8, seed=11).load_state_dict(state)


def test_resume_refuses_an_impossible_position():
    state = dict(PromptSampler(50, 8).state_dict(), position=51)
    with pytest.raises(ValueError, match="position=51 is out of range for 50 prompts"):
        PromptSampler(50, 8).load_state_dict(state)


def test_batch_larger_than_the_dataset():
    with pytest.raises(ValueError, match="the dataset has 3 prompts, fewer than data.train_batch_size=4"):
        PromptSampler(3, 4)
    with pytest.raises(ValueError, match="data.train_batch_size=0: must be >= 1"):
        PromptSampler(3, 0)
