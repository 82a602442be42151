"""OPD's policy-gradient form with a task reward that a tiny student earns in different amounts
(`actor.policy_loss=pg reward.fn=tests.trainer.rewards:letter_share`): through the CLI, the first step's
gradient is the one computed from the logged per-sample rewards with the group baseline (transformers' model,
float32); in process, TP=2 and DP=2 give the 1-process run's KL and grad norm step by step (rel 1e-5), also
when stopped after 2 steps and run again; at TP=1 and DP=2 the resumed run equals the uninterrupted one bit for
bit. Two updates a step (ppo_epochs=2) so that pi_old comes from its own forward-only pass and the PPO clip can
act. Both engines' log-probs of the sampled tokens equal the trainer's (the mismatch metrics read 1).
~1 min on 2 CPU cores."""
import json
import subprocess
import sys

import pytest
import torch

from tests.runs import REL, assert_checkpoint, assert_same_curve, curve, learning, metrics, train
from tests.sglang_servers import rollout_at
from tests.trainer.test_layouts import STEPS, run_steps

REWARD = ("reward.fn=tests.trainer.rewards:letter_share", "reward.coef=1.0")
PG = ("actor.policy_loss=pg", *REWARD, "actor.ppo_epochs=2")
PG_METRICS = ("reward/mean", "actor/pg_loss", "actor/pg_clipfrac", "actor/advantage_mean", "actor/kl_loss",
              "mismatch/ratio_mean", "mismatch/ratio_max", "mismatch/changed_fraction", "mismatch/kl_engine_trainer")


@pytest.fixture(scope="module")
def one_process(distill_setup, tmp_path_factory):
    save = tmp_path_factory.mktemp("pg_one_process")
    run_steps(distill_setup, save, 1, *PG)
    return save


def test_metrics_of_the_policy_gradient_form(one_process):
    lines = metrics(one_process)
    for line in lines.values():
        assert all(name in line for name in PG_METRICS), sorted(line)
        # the embedded engine samples from the same float32 weights the trainer holds
        assert line["mismatch/ratio_mean"] == pytest.approx(1.0, abs=1e-4)
        assert line["mismatch/changed_fraction"] == 0.0
    rewards = [line["reward/mean"] for line in lines.values()]
    assert min(rewards) > 0 and len(set(rewards)) == len(rewards), rewards  # earned, and differently each step
    assert any(line["actor/pg_clipfrac"] > 0 for line in lines.values())  # the second epoch moved past the clip


def stop_and_resume(setup, save_dir, processes: int, *layout) -> dict:
    """A run stopped with a checkpoint after step 2, then the same run again; its metrics but the clock's."""
    run_steps(setup, save_dir, processes, *PG, *layout, "trainer.exit_interval=2")
    assert sorted(curve(save_dir)) == [1, 2]
    run_steps(setup, save_dir, processes, *PG, *layout)
    assert_checkpoint(save_dir, STEPS, processes)
    return learning(save_dir)


def test_one_process_and_dp2_resume_bit_for_bit(one_process, distill_setup, tmp_path):
    assert stop_and_resume(distill_setup, tmp_path / "tp1", 1) == learning(one_process)
    straight = tmp_path / "dp2"
    run_steps(distill_setup, straight, 2, *PG)
    assert_same_curve(curve(straight), curve(one_process))
    assert stop_and_resume(distill_setup, tmp_path / "dp2_resumed", 2) == learning(straight)


def test_tp2_stopped_and_resumed_equals_one_process(one_process, distill_setup, tmp_path):
    """Bit for bit against its own uninterrupted run is shown at TP=1 and DP=2 (and for the direct form at
    every layout, test_layouts.py); here the resumed TP=2 run against one process, to the reductions' order."""
    resumed = tmp_path / "tp2"
    stop_and_resume(distill_setup, resumed, 2, "parallel.tensor=2")
    assert_same_curve(curve(resumed), curve(one_process))


def reward_gradient_norm(model_dir: str, rows: list[dict], temperature: float) -> tuple[float, float]:
    """(loss, gradient norm) of the reward-only policy-gradient loss at the model's weights, from the logged
    rows: -sum over sequences of A_i x the sum of pi(y_t) / sg(pi(y_t)) over its response tokens, divided by the
    step's response tokens; A_i = r_i - the mean reward of its prompt's samples; pi at `temperature`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokens = sum(len(row["response_ids"]) for row in rows)
    loss = 0.0
    for row in rows:
        prompt, response = row["prompt_ids"], row["response_ids"]
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
        logprobs = torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(response)[:, None])
        loss = loss - row["advantage"] * torch.exp(logprobs - logprobs.detach()).sum() / tokens
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()


def test_a_task_reward_reaches_the_first_update_through_the_cli(distill_setup, tmp_path):
    """The reward alone (actor.kl_loss_coef=0), 4 samples a prompt, one update a step: the logged grad norm
    of step 1 is the gradient's computed from the rewards in trainer.rollout_data_dir, with each group's
    mean as the baseline."""
    from tests.conftest import distill_overrides
    from tests.launch.helpers import REPO

    save, rollouts, n = tmp_path / "run", tmp_path / "rollouts", 4
    overrides = distill_overrides(distill_setup, save, "actor.policy_loss=pg", *REWARD, "actor.kl_loss_coef=0",
                                  f"rollout.n={n}", "trainer.total_steps=2", "trainer.export_hf=false",
                                  f"trainer.rollout_data_dir={rollouts}")
    done = subprocess.run([sys.executable, "-m", "megatron_opd.train", *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    logged = metrics(save)
    rows = [json.loads(line) for line in open(rollouts / "1.jsonl")]
    rewards = [row["reward"] for row in rows]
    groups = [rewards[i:i + n] for i in range(0, len(rewards), n)]
    assert len(groups) == 4 and all(len(set(group)) > 1 for group in groups), groups  # a baseline that matters
    assert logged[1]["reward/mean"] == pytest.approx(sum(rewards) / len(rewards), rel=1e-12)
    assert logged[2]["reward/mean"] != logged[1]["reward/mean"]
    for row, group in zip(rows, (g for g in groups for _ in range(n))):
        row["advantage"] = row["reward"] - sum(group) / n
        assert row["reward_advantage"] == pytest.approx(row["advantage"], abs=1e-12)
    loss, norm = reward_gradient_norm(distill_setup["student"], rows, temperature=0.6)
    assert norm > 1e-3
    assert logged[1]["actor/pg_loss"] == pytest.approx(loss, rel=REL, abs=1e-9)
    # megatron's model against transformers', each with its own kernels: measured 9e-6
    assert logged[1]["actor/grad_norm"] == pytest.approx(norm, rel=1e-4)


def test_sglang_log_probs_are_the_trainers(qwen_pair, sglang_pair_server, tmp_path):
    """SGLang's log-prob of each sampled token, kept with the sample, is the trainer's at the same weights and
    temperature (the temperature-scaled distribution, both sides): one step's measured mismatch."""
    history = train(qwen_pair, tmp_path, *rollout_at(sglang_pair_server), "trainer.total_steps=1",
                    "actor.policy_loss=pg", "actor.kl_loss_type=reverse", "actor.is_cap=2.0")
    line = history[0]
    assert line["mismatch/ratio_mean"] == pytest.approx(1.0, abs=1e-4), line
    assert line["mismatch/ratio_max"] == pytest.approx(1.0, abs=1e-3) and line["mismatch/changed_fraction"] == 0.0
