"""Which prompts the student answers, the rewards of its samples with their group baselines, and a step's
conversations (rollout.env) beside given responses."""
from types import SimpleNamespace

from megatron_opd.data.scorers import ENV_REWARD
from megatron_opd.demo.walk import WALK_DATA_SOURCE, walk_rows
from megatron_opd.rollout.chat_turns import ChatTurns
from megatron_opd.rollout.conversation import ConversationLimits, MultiTurn
from megatron_opd.rollout.engine import SamplingParams
from megatron_opd.trainer.rollouts import StepSamples, _aligned_only, _generate, on_policy_prompts, rewards_of
from tests.rollout.envs.countdown import TURNS, CountdownEnvironment
from tests.rollout.stand_in import StandInEngine


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


def test_a_steps_conversations_train_on_the_assistants_tokens_beside_given_responses(tiny_tokenizer):
    """rollout.env with actor.lmbda < 1 on rank 0: the student's conversations keep their loss masks, engine
    log-probs (pg) and environment rewards; a given response keeps its own mask; the batch trains on them."""
    end = tiny_tokenizer.eos_token_id
    turn = tiny_tokenizer.encode("ab") + [end]
    cfg = SimpleNamespace(rollout=SimpleNamespace(n=1, max_staleness=0),
                          actor=SimpleNamespace(policy_loss="pg", is_cap=None),
                          reward=SimpleNamespace(fn=ENV_REWARD))
    run = SimpleNamespace(multi_turn=MultiTurn(ChatTurns(tiny_tokenizer), CountdownEnvironment,
                                               ConversationLimits(max_turns=4, max_tokens=200)),
                          engine=StandInEngine([turn] * TURNS, end), sampling=lambda step: SamplingParams(seed=step),
                          vocab_size=len(tiny_tokenizer), tokenizer=tiny_tokenizer)
    items = [{"input_ids": [1, 5], "raw_prompt": [{"role": "user", "content": "q"}], "ground_truth": None,
              "data_source": "x", "index": k, "response_ids": [7, 8, 9], "response_loss_mask": [1.0, 0.0, 1.0]}
             for k in range(2)]
    pairs, logprobs, masks, rewards, metrics, versions = _generate(run, cfg, 0, items, {0})
    observation = run.multi_turn.chat.observation_ids([{"role": "user", "content": f"{TURNS - 1} left"}])
    assert pairs[0][1] == turn + observation + turn and pairs[1] == ([1, 5], [7, 8, 9])
    own_mask = [1.0] * len(turn) + [0.0] * len(observation) + [1.0] * len(turn)
    assert masks == [own_mask, [1.0, 0.0, 1.0]]
    assert logprobs[0] == [-0.5 * m for m in own_mask] and logprobs[1] is None
    assert versions == [0, None]  # the engine's weights for its own samples; none for a given response
    assert rewards == [(TURNS * len("ab") % 5) / 4, 0.0] and metrics["rollout/turns_mean"] == TURNS
    samples = StepSamples(pairs, [True, False], masks, logprobs, rewards, None, metrics)
    batch = samples.batch(0, "cpu", 1)
    prompt = len(pairs[0][0])
    assert batch.loss_mask[0, prompt - 1:prompt - 1 + len(own_mask)].tolist() == own_mask


def test_a_cross_teachers_alignment_masks_its_own_sequences_only():
    """Past its aligned tokens (and, for the full kinds, off its 1:1 spans) a sequence of a cross teacher has no
    loss; a sequence of another teacher keeps its mask, whatever the cross teacher's view of it says."""
    pairs = [([1], [5, 6, 7, 8])] * 3
    view = SimpleNamespace(aligned=[3, 3, 3], one_to_one=[[(0, 0), (2, 1)]] * 3)
    owners = ["cross", "same", "cross"]
    sampled = _aligned_only([None, None, [1.0, 0.0, 1.0, 1.0]], pairs, {"cross": view}, False, owners)
    assert sampled == [[1.0, 1.0, 1.0, 0.0], None, [1.0, 0.0, 1.0, 0.0]]
    full = _aligned_only([None, None, None], pairs, {"cross": view}, True, owners)
    assert full == [[1.0, 0.0, 1.0, 0.0], None, [1.0, 0.0, 1.0, 0.0]]
