"""Mixture-of-experts models in the trainer, on in-process workers composed as opd-train composes its config
(tests/runs.py; the launchers are covered by tests/launch and tests/test_seed_example.py, verl's expert keys by
tests/config/test_verl_keys.py). A Qwen3-MoE student (its rollouts from the embedded engine's MoE block, its
expert weights pushed by HF name every step, gathered over the expert-parallel ranks) with a dense teacher, at
EP=2 on 2 processes, equals one process step by step (rel 1e-5) with either token dispatcher, and a stop and
resume at EP=2 continues bit for bit. A dense student with a MoE teacher: co-located at EP=2 it equals one
process; a Mixtral or DeepSeek-V3 teacher at TP=2 (its experts cut by expert-TP) equals TP=1; in a layout of its
own at EP=2 (its tokens sent to the other rank's experts, alltoall) beside a DP=2 student it equals the
co-located teacher. Refused at start-up, naming the key: expert parallelism where no model has experts, for the
run or for a dense teacher; a Qwen3-MoE with dense layers on SGLang (which builds every layer with experts); a
DeepSeek-V3 student on the embedded engine."""
import pytest

from megatron_opd.config import ConfigError
from megatron_opd.trainer.setup import check_layout_and_vocab
from tests.runs import REL, assert_checkpoint, learning, run_config, train

RUN = ("trainer.total_steps=3", "trainer.export_hf=false")


def _same(one, other, *names):
    for step_one, step_other in zip(one, other, strict=True):
        for name in names:
            assert step_other[name] == pytest.approx(step_one[name], rel=REL), name


@pytest.fixture(scope="module")
def moe_student(distill_setup, tiny_moe_models):
    return dict(distill_setup, student=tiny_moe_models["qwen3_moe"])


@pytest.fixture(scope="module")
def one_process(moe_student, tmp_path_factory):
    return train(moe_student, tmp_path_factory.mktemp("one"), *RUN)


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_a_moe_student_at_ep2_equals_one_process(moe_student, one_process, tmp_path, dispatcher):
    two = train(moe_student, tmp_path, *RUN, "parallel.expert=2", f"parallel.token_dispatcher={dispatcher}",
                world_size=2)
    _same(one_process, two, "actor/kl_loss", "actor/grad_norm", "response_length/mean")
    assert all(step["actor/kl_loss"] > 0 for step in one_process)


def test_stop_and_resume_at_ep2_continues_exactly(moe_student, tmp_path):
    ep2 = ("parallel.expert=2", "parallel.token_dispatcher=alltoall")
    train(moe_student, tmp_path / "whole", *RUN, *ep2, world_size=2)
    train(moe_student, tmp_path / "stopped", *RUN, *ep2, "trainer.exit_interval=1", world_size=2)
    assert_checkpoint(tmp_path / "stopped", 1, processes=2)
    train(moe_student, tmp_path / "stopped", *RUN, *ep2, world_size=2)
    assert learning(tmp_path / "stopped") == learning(tmp_path / "whole")


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_a_moe_teacher_at_tp2_equals_tp1(distill_setup, tiny_moe_models, tmp_path, family):
    setup = dict(distill_setup, teacher=tiny_moe_models[family])
    one = train(setup, tmp_path / "one", *RUN, "actor.kl_loss_type=reverse")
    two = train(setup, tmp_path / "two", *RUN, "actor.kl_loss_type=reverse", "parallel.tensor=2", world_size=2)
    _same(one, two, "actor/kl_loss", "actor/grad_norm")


def test_a_colocated_moe_teacher_at_ep2_equals_one_process(distill_setup, tiny_moe_models, tmp_path):
    setup = dict(distill_setup, teacher=tiny_moe_models["qwen3_moe"])
    one = train(setup, tmp_path / "one", *RUN)
    two = train(setup, tmp_path / "two", *RUN, "parallel.expert=2", world_size=2)
    _same(one, two, "actor/kl_loss", "actor/grad_norm", "response_length/mean")


def test_a_moe_teacher_in_its_own_layout_at_ep2_equals_the_colocated_one(distill_setup, tiny_moe_models, tmp_path):
    setup = dict(distill_setup, teacher=tiny_moe_models["qwen3_moe"])
    colocated = train(setup, tmp_path / "colocated", *RUN, world_size=2)
    own = train(setup, tmp_path / "own", *RUN, "teacher.parallel.expert=2", "parallel.token_dispatcher=alltoall",
                world_size=2)
    _same(colocated, own, "actor/kl_loss", "actor/grad_norm")


@pytest.mark.parametrize("models, overrides, says", [
    ({}, ("parallel.expert=2",), r"parallel.expert=2: no model in the student's layout has experts"),
    ({}, ("teacher.parallel.expert=2",), r"teacher.parallel.expert=2: .* is a dense model"),
    ({"student": "qwen3_moe"}, ("rollout.engine=sglang",),
     r"rollout.engine=sglang: .*qwen3_moe cannot be served by SGLang: its layers \[0\] are dense"),
    ({"teacher": "qwen3_moe"}, ("teacher.engine=sglang", "actor.kl_temperature=1.0"),
     r"teacher.engine=sglang: .* its layers \[0\] are dense"),
    ({"student": "deepseek_v3"}, (), r"rollout.engine=local: .* has multi-latent attention"),
])
def test_what_the_trainer_does_not_run_is_refused(distill_setup, tiny_moe_models, tmp_path, models, overrides, says):
    setup = dict(distill_setup, **{role: tiny_moe_models[family] for role, family in models.items()})
    with pytest.raises(ConfigError, match=says):
        check_layout_and_vocab(run_config(setup, tmp_path, *overrides), world_size=2)
