"""The scripted-policy conversation on both real engines: a tiny Qwen2 rewritten to always write the move "R"
and stop (tests/rollout/scripted_policy.py) walks two steps to its goal with the walk environment keeping the
position, and the rollout's token ids, loss mask, log-probs and the batch the teacher scores equal the
hand-built conversation exactly, on the embedded engine and on the real SGLang CPU server (whose prefix cache
holds the first turn when the second is sent)."""
import pytest

from megatron_opd.demo.walk_env import TURN_INSTRUCTION, WalkEnvironment
from megatron_opd.models.batch import build_batch
from megatron_opd.rollout.chat_turns import ChatTurns
from megatron_opd.rollout.conversation import ConversationLimits, conversation_metrics, roll_out
from megatron_opd.rollout.embedded_engine import EmbeddedEngine
from megatron_opd.rollout.engine import SamplingParams
from tests.rollout.scripted_policy import scripted_checkpoint
from tests.sglang_servers import served_by

ROW = {"prompt": [{"role": "user", "content": "walk 0 0 -> 2 0 :"}], "reward_model": {"ground_truth": "0 0 2 0"}}
SAMPLING = SamplingParams(max_new_tokens=0, temperature=1.0, seed=3)  # sampled: the margin makes it certain


@pytest.fixture(scope="module")
def scripted(tiny_models, tiny_tokenizer, tmp_path_factory):
    """The always-"R" policy: the generation prompt's last token "\n" -> "R" -> the stop token."""
    newline, move = tiny_tokenizer.encode("\n"), tiny_tokenizer.encode("R")
    assert len(newline) == len(move) == 1
    chain = {newline[0]: move[0], move[0]: tiny_tokenizer.eos_token_id}
    return scripted_checkpoint(tiny_models["qwen2"], str(tmp_path_factory.mktemp("scripted")), chain)


def hand_built(tokenizer):
    """(prompt, response, loss mask) of the conversation, written out from the chat template's text."""
    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False)

    prompt = ids(f"<|im_start|>user\nwalk 0 0 -> 2 0 : {TURN_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
    move = ids("R<|im_end|>")
    answer = ids("\n<|im_start|>user\nat 1 0, left 1 0<|im_end|>\n<|im_start|>assistant\n")
    return prompt, move + answer + move, [1.0] * len(move) + [0.0] * len(answer) + [1.0] * len(move)


def check(engine, tokenizer):
    [conversation] = roll_out(engine, ChatTurns(tokenizer), WalkEnvironment, [ROW], [0], [[0]], SAMPLING,
                              ConversationLimits(max_turns=8, max_tokens=200))
    prompt, response, mask = hand_built(tokenizer)
    assert (conversation.prompt_ids, conversation.response_ids, conversation.loss_mask) == (prompt, response, mask)
    assert (conversation.turns, conversation.ending, conversation.reward) == (2, "done", 1.0)
    sampled = [lp for lp, m in zip(conversation.logprobs, mask) if m]
    assert sampled == pytest.approx([0.0] * len(sampled), abs=1e-4)
    assert [lp for lp, m in zip(conversation.logprobs, mask) if not m] == [0.0] * (len(mask) - len(sampled))
    batch = build_batch([conversation.prompt_ids], [conversation.response_ids], 0, "cpu", 1, None,
                        [conversation.loss_mask])
    assert batch.tokens[0].tolist() == prompt + response
    assert batch.loss_mask[0].tolist() == [0.0] * (len(prompt) - 1) + mask + [0.0]
    return conversation


def test_the_embedded_engine_rolls_out_the_hand_built_conversation(scripted, tiny_tokenizer):
    engine = EmbeddedEngine(scripted)
    engine.start()
    conversation = check(engine, tiny_tokenizer)
    assert conversation.cached_tokens == 0  # it re-fills each turn


def test_the_sglang_engine_rolls_out_the_hand_built_conversation(sglang_engine, scripted, tiny_tokenizer):
    conversation = check(served_by(sglang_engine, scripted), tiny_tokenizer)
    # the second turn's ids begin with the first turn's prompt and answer: the prefix cache has them
    assert conversation.cached_tokens >= len(conversation.prompt_ids)
    assert conversation_metrics([conversation])["rollout/prefix_cached_share"] > 0
