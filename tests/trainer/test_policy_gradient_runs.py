"""OPD's policy-gradient form through the CLI, with a task reward (`actor.policy_loss=pg reward.fn=gsm8k
reward.coef=1.0`): TP=2 and DP=2 give the 1-process run's KL and grad norm step by step (rel 1e-3), and at
TP=1, TP=2 and DP=2 a run stopped after 2 steps and run again continues bit for bit. Two updates a step
(ppo_epochs=2) so that pi_old comes from its own forward-only pass and the PPO clip can act. Both engines'
log-probs of the sampled tokens equal the trainer's (the mismatch metrics read 1). ~3.5 min on 2 CPU cores."""
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


@pytest.mark.parametrize("processes, layout", [(1, ()), (2, ("parallel.tensor=2",)), (2, ())],
                         ids=["tp1", "tp2", "dp2"])
def test_layouts_equal_one_process_and_resume_exactly(one_process, distill_setup, tmp_path, processes, layout):
    straight = one_process
    if processes > 1:
        straight = tmp_path / "straight"
        launch(distill_setup, straight, processes, *PG, *layout)
        assert_same_curve(curve(straight), curve(one_process))
    resumed = tmp_path / "resumed"
    launch(distill_setup, resumed, processes, *PG, *layout, "trainer.exit_interval=2")
    assert sorted(curve(resumed)) == [1, 2]
    launch(distill_setup, resumed, processes, *PG, *layout)
    assert_checkpoint(resumed, 4, processes)
    assert learning(resumed) == learning(straight)


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
