"""Bounded staleness (rollout.max_staleness, trainer/prefetch.py) in runs as users launch them, in process: each
step trains on samples drawn from the weights of step max(0, s - k), as recorded by the engine; a run stopped at
a checkpoint and resumed equals the uninterrupted one (the steps drawn ahead come back from the checkpoint);
DP=2 equals one process; the SGLang engine draws ahead between weight pushes. rollout.max_staleness=0 is the
loop every other run test exercises."""
import json

import pytest

from tests.conftest import fixed_data
from tests.runs import assert_same_curve, curve, learning, train
from tests.sglang_servers import rollout_at

STEPS = ("trainer.total_steps=4", "trainer.export_hf=false", "rollout.max_staleness=1")


@pytest.fixture(scope="module")
def stale_one_process(distill_setup, tmp_path_factory):
    save = tmp_path_factory.mktemp("stale_one_process")
    return save, train(distill_setup, save, *STEPS, "trainer.rollout_data_dir=${trainer.save_dir}/rollouts")


def test_each_step_trains_on_samples_of_the_weights_k_steps_back(stale_one_process):
    save, history = stale_one_process
    for index, step in enumerate(history):  # history[index] is step index + 1, trained from version index
        drawn = max(0, index - 1)
        lines = [json.loads(line) for line in open(save / "rollouts" / f"{index + 1}.jsonl")]
        assert {line["weight_version"] for line in lines} == {drawn}
        assert step["rollout/staleness_max"] == step["rollout/staleness_mean"] == index - drawn
    assert [step["rollout/staleness_max"] for step in history] == [0, 1, 1, 1]


def test_stopped_and_resumed_it_equals_the_uninterrupted_run(distill_setup, stale_one_process, tmp_path):
    train(distill_setup, tmp_path, *STEPS, "trainer.exit_interval=2")
    train(distill_setup, tmp_path, *STEPS)
    assert learning(tmp_path) == learning(stale_one_process[0])


def test_at_two_processes_it_equals_one(distill_setup, stale_one_process, tmp_path):
    train(distill_setup, tmp_path, *STEPS, world_size=2)
    assert_same_curve(curve(tmp_path), curve(stale_one_process[0]))


def test_the_sglang_engine_draws_ahead_between_weight_pushes(qwen_pair, sglang_pair_server, tmp_path):
    """The suite's server at rollout.url, k=1: the version SGLang stamps on each answer (checked by the engine
    against the weights it pushed) is max(0, s - 1) for step s, the pushes landing between generations."""
    train(qwen_pair, tmp_path, *fixed_data(qwen_pair), *rollout_at(sglang_pair_server), *STEPS,
          "actor.kl_loss_type=reverse", "trainer.rollout_data_dir=${trainer.save_dir}/rollouts")
    for index in range(4):
        lines = [json.loads(line) for line in open(tmp_path / "rollouts" / f"{index + 1}.jsonl")]
        assert {line["weight_version"] for line in lines} == {max(0, index - 1)}
