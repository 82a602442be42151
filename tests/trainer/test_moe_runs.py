"""Mixture-of-experts models in the trainer at EP=1: a Qwen3-MoE student (its rollouts from the embedded
engine's MoE block, its expert weights pushed by HF name every step) with a dense teacher, and a dense student
with a Mixtral teacher (co-located, full-vocabulary reverse KL). DP=2 equals one process for the MoE student,
and TP=2 for the MoE teacher (its experts cut by expert-TP) equals TP=1, step by step (rel 1e-5). What the
trainer does not run yet is refused at start-up, naming the key: expert parallelism, and a MoE teacher in a
layout of its own."""
import pytest

from megatron_opd.config import ConfigError
from megatron_opd.trainer.setup import check_layout_and_vocab
from tests.runs import REL, run_config, train

RUN = ("trainer.total_steps=2", "trainer.export_hf=false")


def _same(one, other, *names):
    for step_one, step_other in zip(one, other, strict=True):
        for name in names:
            assert step_other[name] == pytest.approx(step_one[name], rel=REL), name


def test_a_moe_student_on_two_processes_equals_one(distill_setup, tiny_moe_models, tmp_path):
    setup = dict(distill_setup, student=tiny_moe_models["qwen3_moe"])
    one = train(setup, tmp_path / "one", *RUN)
    two = train(setup, tmp_path / "two", *RUN, world_size=2)
    _same(one, two, "actor/kl_loss", "actor/grad_norm")
    assert all(step["actor/kl_loss"] > 0 for step in one)


def test_a_moe_teacher_at_tp2_equals_tp1(distill_setup, tiny_moe_models, tmp_path):
    setup = dict(distill_setup, teacher=tiny_moe_models["mixtral"])
    one = train(setup, tmp_path / "one", *RUN, "actor.kl_loss_type=reverse")
    two = train(setup, tmp_path / "two", *RUN, "actor.kl_loss_type=reverse", "parallel.tensor=2", world_size=2)
    _same(one, two, "actor/kl_loss", "actor/grad_norm")


@pytest.mark.parametrize("override, says", [
    ("parallel.expert=2", r"parallel.expert=2: the trainer runs mixture-of-experts models at parallel.expert=1"),
    ("teacher.parallel.tensor=2", r"teacher.path=.*: a mixture-of-experts teacher runs co-located for now"),
])
def test_what_the_trainer_does_not_run_yet_is_refused(distill_setup, tiny_moe_models, tmp_path, override, says):
    setup = dict(distill_setup, student=tiny_moe_models["qwen3_moe"], teacher=tiny_moe_models["mixtral"])
    cfg = run_config(setup, tmp_path, override)
    with pytest.raises(ConfigError, match=says):
        check_layout_and_vocab(cfg, world_size=2)
