"""OPD's policy-gradient form through the CLI, with a task reward (`actor.policy_loss=pg reward.fn=gsm8k
reward.coef=1.0`): TP=2 and DP=2 give the 1-process run's KL and grad norm step by step (rel 1e-3), also when
stopped after 2 steps and run again; at TP=1 and DP=2 the resumed run equals the uninterrupted one bit for
bit. Two updates a step (ppo_epochs=2) so that pi_old comes from its own forward-only pass and the PPO clip
can act. Both engines' log-probs of the sampled tokens equal the trainer's (the mismatch metrics read 1).
~3 min on 2 CPU cores."""
import pytest

from tests.trainer.test_layouts import assert_checkpoint, assert_same_curve, curve, launch, metrics

PG = ("actor.policy_loss=pg", "reward.fn=gsm8k", "reward.coef=1.0", "actor.ppo_epochs=2")
PG_METRICS = ("reward/mean", "actor/pg_loss", "actor/pg_clipfrac", "actor/advantage_mean", "actor/kl_loss",
              "mismatch/ratio_mean", "mismatch/ratio_max", "mismatch/changed_fraction", "mismatch/kl_engine_trainer")


def learning(save_dir) -> dict:
    """step -> every metric but the clock's."""
    return {step: {k: v for k, v in line.items() if not k.startswith(("timing_s/", "perf/"))}
            for step, line in metrics(save_dir).items()}


@pytest.fixture(scope="module")
def one_process(distill_setup, tmp_path_factory):
    save = tmp_path_factory.mktemp("pg_one_process")
    launch(distill_setup, save, 1, *PG)
    return save


def test_metrics_of_the_policy_gradient_form(one_process):
    lines = metrics(one_process)
    for line in lines.values():
        assert all(name in line for name in PG_METRICS), sorted(line)
        assert line["reward/mean"] == 0.0  # an untrained tiny model never writes "#### <the answer>"
        # the embedded engine samples from the same float32 weights the trainer holds
        assert line["mismatch/ratio_mean"] == pytest.approx(1.0, abs=1e-4)
        assert line["mismatch/changed_fraction"] == 0.0
    assert any(line["actor/pg_clipfrac"] > 0 for line in lines.values())  # the second epoch moved past the clip


def stop_and_resume(setup, save_dir, processes: int, *layout) -> dict:
    """A run stopped with a checkpoint after step 2, then the same command again; its metrics but the clock's."""
    launch(setup, save_dir, processes, *PG, *layout, "trainer.exit_interval=2")
    assert sorted(curve(save_dir)) == [1, 2]
    launch(setup, save_dir, processes, *PG, *layout)
    assert_checkpoint(save_dir, 4, processes)
    return learning(save_dir)


def test_one_process_and_dp2_resume_bit_for_bit(one_process, distill_setup, tmp_path):
    assert stop_and_resume(distill_setup, tmp_path / "tp1", 1) == learning(one_process)
    straight = tmp_path / "dp2"
    launch(distill_setup, straight, 2, *PG)
    assert_same_curve(curve(straight), curve(one_process))
    assert stop_and_resume(distill_setup, tmp_path / "dp2_resumed", 2) == learning(straight)


def test_tp2_stopped_and_resumed_equals_one_process(one_process, distill_setup, tmp_path):
    """Bit for bit against its own uninterrupted run is shown at TP=1 and DP=2 (and for the direct form at
    every layout, test_layouts.py); here the resumed TP=2 run against one process, to the reductions' order."""
    resumed = tmp_path / "tp2"
    stop_and_resume(distill_setup, resumed, 2, "parallel.tensor=2")
    assert_same_curve(curve(resumed), curve(one_process))


def test_sglang_log_probs_are_the_trainers(qwen_pair, tmp_path):
    """SGLang's log-prob of each sampled token, kept with the sample, is the trainer's at the same weights and
    temperature (the temperature-scaled distribution, both sides): one step's measured mismatch."""
    from tests.conftest import SGLANG_STUB
    from tests.trainer.test_loop import train

    history = train(qwen_pair, tmp_path, "rollout.engine=sglang", f"rollout.sglang.pythonpath=[{SGLANG_STUB}]",
                    "rollout.sglang.dtype=float32", "rollout.sglang.max_total_tokens=4096", "trainer.total_steps=1",
                    "actor.policy_loss=pg", "actor.kl_loss_type=reverse", "actor.is_cap=2.0")
    line = history[0]
    assert line["mismatch/ratio_mean"] == pytest.approx(1.0, abs=1e-4), line
    assert line["mismatch/ratio_max"] == pytest.approx(1.0, abs=1e-3) and line["mismatch/changed_fraction"] == 0.0
