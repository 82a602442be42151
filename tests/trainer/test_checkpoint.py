"""Resume checks that need no training run: a checkpoint resumes at another DP size with the same TP, PP,
CP and EP (each rank finds the saved rank whose extras it loads), is refused with another TP/PP/CP/EP/expert-TP
(one written before expert parallelism reads as EP=1), and a saved state that does not fit the model (a missing or an extra key) is refused."""
import json
import types

import pytest
import torch

from megatron_opd.models.sharded_checkpoint import check_loaded_state
from megatron_opd.parallel import ParallelConfig
from megatron_opd.trainer.checkpoint import LAYOUT, ResumeError, _extras_rank


def dims(tensor=1, pipeline=1, context=1, expert=1, expert_tensor=None, pp_rank=0, tp_rank=0, cp_rank=0, dp_rank=0):
    config = ParallelConfig(tensor=tensor, pipeline=pipeline, context=context, expert=expert,
                            expert_tensor=expert_tensor)
    return types.SimpleNamespace(config=config,
                                 tp_size=tensor, cp_size=context, pp_rank=pp_rank, tp_rank=tp_rank, cp_rank=cp_rank,
                                 dp_rank=dp_rank)


def saved(tmp_path, ranks, tensor=1, pipeline=1, context=1):
    (tmp_path / LAYOUT).write_text(json.dumps({"tensor": tensor, "pipeline": pipeline, "context": context,
                                               "data": len(ranks) // (tensor * pipeline * context), "ranks": ranks}))
    return str(tmp_path)


def test_each_rank_loads_the_extras_of_its_coordinates(tmp_path):
    # Saved at TP=2 x DP=2 (ranks ordered tp-fastest): [pp, tp, cp, dp] per saved rank.
    path = saved(tmp_path, [[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 1, 0, 1]], tensor=2)
    assert _extras_rank(path, dims(tensor=2, tp_rank=1, dp_rank=1)) == 3  # same layout: its own file
    assert _extras_rank(path, dims(tensor=2, tp_rank=1, dp_rank=0)) == 1
    assert _extras_rank(path, dims(tensor=2, tp_rank=1, dp_rank=3)) == 1  # DP=4 now: DP rank 0's extras


@pytest.mark.parametrize("now", [dict(tensor=2), dict(pipeline=2), dict(context=2), dict(expert=2),
                                 dict(expert_tensor=2)])
def test_another_tensor_pipeline_context_or_expert_size_is_refused(tmp_path, now):
    path = saved(tmp_path, [[0, 0, 0, 0], [0, 0, 0, 1]])  # no expert sizes: written before them, EP=1
    assert _extras_rank(path, dims(dp_rank=1)) == 1
    with pytest.raises(ResumeError, match=r"resumes with the same tensor, pipeline, context and expert sizes"):
        _extras_rank(path, dims(**now))


def test_a_state_that_does_not_fit_the_model_is_refused():
    model = torch.nn.Linear(2, 2)
    check_loaded_state(model, {"weight": torch.ones(2, 2), "bias": torch.ones(2)}, "ckpt")
    assert torch.equal(model.bias, torch.ones(2))
    with pytest.raises(RuntimeError, match=r"ckpt: checkpoint does not fit the model: missing \['bias'\]"):
        check_loaded_state(model, {"weight": torch.ones(2, 2)}, "ckpt")
    with pytest.raises(RuntimeError, match=r"unexpected \['extra'\]"):
        check_loaded_state(model, {"weight": torch.ones(2, 2), "bias": torch.ones(2), "extra": torch.ones(1)}, "ckpt")
