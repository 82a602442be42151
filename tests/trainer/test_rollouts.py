"""Which prompts the student answers, and the rewards of its samples with their group baselines."""
from megatron_opd.demo.walk import WALK_DATA_SOURCE, walk_rows
from megatron_opd.trainer.rollouts import on_policy_prompts, rewards_of


def test_on_policy_prompts_are_lmbda_of_the_batch_drawn_per_step():
    assert on_policy_prompts(8, 1.0, 0, 3) == set(range(8)) and on_policy_prompts(8, 0.0, 0, 3) == set()
    draws = [on_policy_prompts(8, 0.5, 0, step) for step in range(6)]
    assert {len(d) for d in draws} == {4} and len({frozenset(d) for d in draws}) > 1
    assert draws == [on_policy_prompts(8, 0.5, 0, step) for step in range(6)]  # a resumed run draws the same


def test_rewards_score_each_sample_against_its_prompts_ground_truth():
    items = [{"data_source": "openai/gsm8k", "ground_truth": truth} for truth in ("18", "7")]
    texts = ["9 + 9 = 18\n#### 18", "#### 17", "#### 7", "the answer is 7"]
    assert rewards_of("gsm8k", items, texts, 2) == [1.0, 0.0, 1.0, 0.0]  # strict: only after "####"


def test_data_source_rewards_use_each_rows_scorer():
    row = next(walk_rows(1))
    walk = {"data_source": WALK_DATA_SOURCE, "ground_truth": row["reward_model"]["ground_truth"]}
    answer = row["extra_info"]["answer"]
    items = [walk, {"data_source": "openai/gsm8k", "ground_truth": "3"}]
    assert rewards_of("data_source", items, [answer, "", "#### 3", "#### 4"], 2) == [1.0, 0.0, 1.0, 0.0]
