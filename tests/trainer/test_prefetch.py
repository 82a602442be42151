"""What a checkpoint keeps of the steps drawn ahead (trainer/prefetch.py): their prompts with a parquet row's numpy
values, the samples made, floats exact, and a step whose generation failed, which fails at its turn."""
from types import SimpleNamespace

import numpy as np
import pytest

from megatron_opd.rollout.engine import RolloutError
from megatron_opd.trainer.prefetch import Ahead, RolloutPrefetch


def prefetch(rank=0, staleness=1):
    cfg = SimpleNamespace(rollout=SimpleNamespace(max_staleness=staleness), trainer=SimpleNamespace(total_steps=9))
    return RolloutPrefetch(SimpleNamespace(dims=SimpleNamespace(rank=rank)), cfg)


def test_the_steps_ahead_come_back_from_a_checkpoint_as_they_were():
    made = ([([1, 2], [3, 4])], [[-0.1 / 3, -1e-300]], [None], None, {"rollout/x": 0.3}, [2])
    items = [{"input_ids": np.array([1, 2]), "raw_prompt": np.array([{"role": "user", "content": "q"}])}]
    before = prefetch()
    before.ahead.extend([Ahead(3, items, made), Ahead(4, items, RolloutError("the engine sampled token id 99"))])
    after = prefetch()
    after.start(3, before.state())
    first, failed = after.ahead
    assert first.step == 3 and first.items == [{"input_ids": [1, 2], "raw_prompt": [{"role": "user", "content": "q"}]}]
    assert first.generated == [[[[1, 2], [3, 4]]], [[-0.1 / 3, -1e-300]], [None], None, {"rollout/x": 0.3}, [2]]
    assert isinstance(failed.generated, RolloutError) and str(failed.generated) == "the engine sampled token id 99"
    other_rank = prefetch(rank=1)
    other_rank.start(3, before.state())
    assert [a.generated for a in other_rank.ahead] == [None, None] and other_rank.ahead[0].items == first.items


def test_another_staleness_than_the_checkpoints_is_refused():
    with pytest.raises(ValueError, match="rollout.max_staleness=2: the checkpoint drew its samples ahead with "
                                         "rollout.max_staleness=1"):
        prefetch(staleness=2).start(3, prefetch().state())
