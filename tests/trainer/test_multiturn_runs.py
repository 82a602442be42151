"""Multi-turn runs (rollout.env) as users launch them, in process on forked gloo workers (tests/runs.py):
DP=2 and CP=2 give the 1-process run's KL and grad norm step by step (rel 1e-5), a run stopped after step 2
continues as the uninterrupted one, the served teacher gives the Megatron teacher's numbers on
conversations, and the policy-gradient form, given conversations (actor.lmbda) and token-budget
micro-batches train on them. The environment counts turns down whatever the tiny student writes
(tests/rollout/envs/countdown.py), so every conversation has environment tokens."""
import json

import pytest

from megatron_opd.config import ModelConfig, RolloutConfig
from megatron_opd.data.config import DataConfig
from megatron_opd.generate import GenerateConfig, generate
from tests.conftest import fixed_data
from tests.runs import assert_same_curve, curve, kl_curve, train
from tests.sglang_servers import SGLANG_STUB, rollout_at

STEPS = 3
COUNTDOWN = "tests.rollout.envs.countdown:CountdownEnvironment"
ENV = (f"rollout.env={COUNTDOWN}", "rollout.response_length=64", "rollout.max_turns=4", "rollout.max_turn_tokens=8",
       "trainer.export_hf=false", f"trainer.total_steps={STEPS}")


def run(setup, save_dir, *extra, processes=1):
    return train(setup, save_dir, *ENV, *extra, world_size=processes)


@pytest.fixture(scope="module")
def one_process(distill_setup, tmp_path_factory):
    save = tmp_path_factory.mktemp("multiturn_one_process")
    history = run(distill_setup, save, f"trainer.rollout_data_dir={save / 'rollouts'}")
    return save, history


def test_conversations_have_turns_and_environment_tokens(one_process):
    save, history = one_process
    for step in history:
        assert step["rollout/turns_mean"] > 1
        assert 0 < step["rollout/env_tokens_share"] < 1
        assert step["rollout/env_errors"] == 0
    dumped = [json.loads(line) for line in open(save / "rollouts" / "1.jsonl")]
    masked = sum(len(d["loss_mask"]) - sum(d["loss_mask"]) for d in dumped)
    assert masked / sum(len(d["response_ids"]) for d in dumped) == history[0]["rollout/env_tokens_share"]


@pytest.mark.parametrize("processes, layout", [(2, ()), (2, ("parallel.context=2",)),
                                               (1, ("actor.max_tokens_per_micro_batch=128",))],
                         ids=["dp2", "cp2", "token_budget"])
def test_layouts_equal_one_process(one_process, distill_setup, tmp_path, processes, layout):
    run(distill_setup, tmp_path, *layout, processes=processes)
    assert_same_curve(curve(tmp_path), curve(one_process[0]))


def test_stopped_and_resumed_equals_the_uninterrupted_run(one_process, distill_setup, tmp_path):
    run(distill_setup, tmp_path, "trainer.exit_interval=2")
    assert sorted(curve(tmp_path)) == [1, 2]
    run(distill_setup, tmp_path)
    assert curve(tmp_path) == curve(one_process[0])


def test_policy_gradient_with_the_environment_reward_at_dp2_equals_one_process(distill_setup, tmp_path):
    pg = ("actor.policy_loss=pg", "reward.fn=env")
    one = run(distill_setup, tmp_path / "one", *pg)
    two = run(distill_setup, tmp_path / "two", *pg, processes=2)
    assert_same_curve(curve(tmp_path / "two"), curve(tmp_path / "one"))
    assert [h["reward/mean"] for h in two] == [h["reward/mean"] for h in one]
    assert any(h["reward/mean"] > 0 for h in one)  # the advantages carry the environment's reward


def test_given_conversations_from_opd_generate_train_beside_the_students(distill_setup, tmp_path):
    """actor.lmbda=0.5: half the prompts answered by the teacher's conversations with the environment
    (opd-generate with rollout.env), trained without their environment tokens."""
    given = tmp_path / "teacher_conversations.jsonl"
    generate(GenerateConfig(model=ModelConfig(path=distill_setup["teacher"]),
                            data=DataConfig(val_files=distill_setup["fixed"], max_prompt_length=128),
                            rollout=RolloutConfig(env=COUNTDOWN, response_length=64, max_turns=4, max_turn_tokens=8),
                            do_sample=True, output=str(given)))
    history = run(distill_setup, tmp_path / "run", f"data.train_files={given}", "data.response_key=response",
                  "data.response_skip_key=extra_info.env_spans", "actor.lmbda=0.5", "data.shuffle=false")
    for step in history:
        assert step["rollout/on_policy_fraction"] == 0.5
        assert step["actor/kl_loss_on_policy"] > 0 and step["actor/kl_loss_off_policy"] > 0


SERVED = ("teacher.engine=sglang", f"teacher.sglang.pythonpath=[{SGLANG_STUB}]", "teacher.sglang.dtype=float32",
          "teacher.sglang.request_timeout_s=120", "actor.kl_temperature=1.0", "actor.kl_loss_type=low_var_kl")


def test_the_served_teacher_equals_the_megatron_teacher_on_conversations(sglang_teacher, distill_setup, tmp_path):
    common = (*fixed_data(distill_setup), "actor.kl_temperature=1.0", "actor.kl_loss_type=low_var_kl")
    co_located = run(distill_setup, tmp_path / "megatron", *common)
    served = run(distill_setup, tmp_path / "sglang", *common, *SERVED, f"teacher.url={sglang_teacher.server.url}")
    assert all(h["rollout/env_tokens_share"] > 0 for h in served)
    assert kl_curve(served) == pytest.approx(kl_curve(co_located), rel=1e-5)


def test_a_run_rolls_out_conversations_on_the_sglang_server(sglang_engine, distill_setup, tmp_path):
    """The suite's server (the student's architecture) at rollout.url: the run pushes the student's weights, and
    each later turn finds the conversation's earlier ones in the server's prefix cache."""
    history = run(distill_setup, tmp_path, *rollout_at(sglang_engine), "trainer.total_steps=2")
    for step in history:
        assert step["rollout/turns_mean"] > 1 and step["rollout/env_tokens_share"] > 0
        assert step["rollout/prefix_cached_share"] > 0.3
