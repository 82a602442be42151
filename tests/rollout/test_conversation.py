"""Multi-turn rollouts (rollout/conversation.py) against hand-built conversations: the token ids are the
prompt, the engine's own tokens and the environment's messages exactly as the chat template writes them
(assistant tokens carry the loss, the environment's none, and both are what the teacher scores); a tool call
gets its result back in Qwen's format, a bad one an error message; a failing environment ends only its own
conversation; each ending (done, max_turns, the token limit, a turn cut at max_turn_tokens) and metric.

The engine here is a stand-in (tests/rollout/stand_in.py); the real engines' conversations are in
test_conversation_engines.py."""
import copy

import pytest

from megatron_opd.models.batch import build_batch, response_loss_mask
from megatron_opd.rollout.chat_turns import ChatTurns, ChatTurnsError
from megatron_opd.rollout.conversation import (
    ConversationLimits, Conversation, as_text, conversation_metrics, roll_out)
from megatron_opd.rollout.engine import SamplingParams
from megatron_opd.rollout.envs import CalculatorEnvironment
from megatron_opd.rollout.envs.base import Environment, Observation
from tests.rollout.envs.countdown import TURNS, CountdownEnvironment
from tests.rollout.envs.qwen_template import QWEN25_TEMPLATE
from tests.rollout.stand_in import StandInEngine

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "48 / 2"}}\n</tool_call>'
ROW = {"prompt": [{"role": "user", "content": "Natalia sold 48 clips, then half as many. How many in May?"}],
       "reward_model": {"ground_truth": "24"}}
SAMPLING = SamplingParams(max_new_tokens=0, temperature=1.0, n=1, seed=5)
LIMITS = ConversationLimits(max_turns=4, max_tokens=400)


def qwen_tokenizer(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = QWEN25_TEMPLATE
    return tokenizer


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_a_tool_call_conversation_equals_the_hand_built_one(tiny_tokenizer):
    tokenizer = qwen_tokenizer(tiny_tokenizer)
    env = CalculatorEnvironment()
    chat = ChatTurns(tokenizer, env.tools)
    end = tokenizer.eos_token_id
    call, answer = encode(tokenizer, CALL) + [end], encode(tokenizer, "half of 48 is 24 #### 24") + [end]
    engine = StandInEngine([call, answer], end)
    [conversation] = roll_out(engine, chat, CalculatorEnvironment, [ROW], [7], [[1, 2]], SAMPLING, LIMITS)
    prompt = encode(tokenizer, tokenizer.apply_chat_template(ROW["prompt"], tools=env.tools, tokenize=False,
                                                             add_generation_prompt=True))
    tool_turn = encode(tokenizer, "\n<|im_start|>user\n<tool_response>\n24\n</tool_response><|im_end|>\n"
                                  "<|im_start|>assistant\n")
    assert conversation.prompt_ids == prompt
    assert conversation.response_ids == call + tool_turn + answer
    assert conversation.loss_mask == [1.0] * len(call) + [0.0] * len(tool_turn) + [1.0] * len(answer)
    assert conversation.logprobs == [-0.5] * len(call) + [0.0] * len(tool_turn) + [-0.5] * len(answer)
    assert (conversation.turns, conversation.reward, conversation.ending) == (2, 1.0, "done")
    # token in, token out: the second turn continued the exact ids, not a re-rendering of the text
    assert engine.sent == [[prompt], [prompt + call + tool_turn]]
    # what the teacher scores and the loss reads: the whole conversation, the loss on the assistant's tokens
    batch = build_batch([conversation.prompt_ids], [conversation.response_ids], 0, "cpu", 1, None,
                        [conversation.loss_mask])
    assert batch.tokens[0].tolist() == prompt + call + tool_turn + answer
    assert batch.loss_mask[0].tolist() == [0.0] * (len(prompt) - 1) + conversation.loss_mask + [0.0]


def test_a_bad_call_gets_an_error_message_and_the_conversation_goes_on(tiny_tokenizer):
    tokenizer = qwen_tokenizer(tiny_tokenizer)
    end = tokenizer.eos_token_id
    bad = encode(tokenizer, '<tool_call>\n{"name": "search", "arguments": {}}\n</tool_call>') + [end]
    engine = StandInEngine([bad, encode(tokenizer, "#### 24") + [end]], end)
    chat = ChatTurns(tokenizer, CalculatorEnvironment.tools)
    [conversation] = roll_out(engine, chat, CalculatorEnvironment, [ROW], [0], [[1]], SAMPLING, LIMITS)
    text = tokenizer.decode(conversation.response_ids, skip_special_tokens=False)
    assert '<tool_response>\n{"error": "unknown tool \'search\'' in text
    assert (conversation.turns, conversation.ending, conversation.reward) == (2, "done", 1.0)


class Failing(Environment):
    def start(self, row):
        if row["reward_model"]["ground_truth"] == "fails at start":
            raise RuntimeError("no such level")
        return [{"role": "user", "content": "go"}]

    def step(self, text):
        return "not an observation"


def test_a_failing_environment_ends_its_own_conversation_naming_the_row(tiny_tokenizer, capsys):
    end = tiny_tokenizer.eos_token_id
    rows = [{"prompt": [{"role": "user", "content": "a"}], "reward_model": {"ground_truth": "fails at start"}},
            {"prompt": [{"role": "user", "content": "b"}], "reward_model": {"ground_truth": "fails later"}}]
    turn = encode(tiny_tokenizer, "hello") + [end]
    conversations = roll_out(StandInEngine([turn], end), ChatTurns(tiny_tokenizer), Failing, rows, [3, 9],
                             [[5, 6], [7]], SAMPLING, LIMITS)
    first, second = conversations
    assert (first.prompt_ids, first.response_ids, first.ending) == ([5, 6], [], "env_error")
    assert "row 3: Failing.start raised RuntimeError: no such level" in first.error
    assert second.ending == "env_error" and second.response_ids == turn
    assert "row 9: Failing.step returned str, not an Observation" in second.error
    err = capsys.readouterr().err
    assert "rollout.env: row 3" in err and "rollout.env: row 9" in err
    assert conversation_metrics(conversations)["rollout/env_errors"] == 2.0


def countdown(tokenizer, limits, script, n=1, stop_ids=()):
    engine = StandInEngine(script, tokenizer.eos_token_id)
    row = {"prompt": [{"role": "user", "content": "count"}], "reward_model": {"ground_truth": None}}
    return engine, roll_out(engine, ChatTurns(tokenizer), CountdownEnvironment, [row], [0], [[1]],
                            SamplingParams(n=n, seed=5, stop_token_ids=stop_ids), limits)


def test_each_ending(tiny_tokenizer):
    end = tiny_tokenizer.eos_token_id
    turn = encode(tiny_tokenizer, "ab") + [end]
    observation = ChatTurns(tiny_tokenizer).observation_ids([{"role": "user", "content": f"{TURNS - 1} left"}])
    _, [done] = countdown(tiny_tokenizer, LIMITS, [turn] * TURNS)
    assert (done.turns, done.ending, done.reward) == (TURNS, "done", (TURNS * len("ab") % 5) / 4)
    assert done.response_ids == turn + observation + turn
    _, [capped] = countdown(tiny_tokenizer, ConversationLimits(max_turns=1, max_tokens=400), [turn] * TURNS)
    assert (capped.turns, capped.ending, capped.truncated, capped.reward) == (1, "max_turns", True, 0.0)
    assert capped.response_ids == turn  # no observation after the last turn
    # The limit falls inside the second turn: it is cut there and the conversation ends.
    limit = len(turn) + len(observation) + 1
    _, [cut] = countdown(tiny_tokenizer, ConversationLimits(max_turns=4, max_tokens=limit), [turn] * TURNS)
    assert (cut.turns, cut.ending, len(cut.response_ids)) == (2, "length", limit)
    assert cut.response_ids == turn + observation + turn[:1]
    # A turn cut at max_turn_tokens is closed by the template's stop token, without loss, and answered.
    long = encode(tiny_tokenizer, "abcdefgh") + [end]
    limits = ConversationLimits(max_turns=4, max_tokens=400, max_turn_tokens=2)
    engine, [closed] = countdown(tiny_tokenizer, limits, [long] * TURNS)
    assert closed.response_ids[:2 + 1 + len(observation)] == long[:2] + [end] + observation
    assert closed.loss_mask[:3] == [1.0, 1.0, 0.0] and closed.ending == "done"
    # Another stop token than the turn's end (e.g. <|endoftext|>): no turn can follow it.
    other = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    _, [stopped] = countdown(tiny_tokenizer, LIMITS, [turn[:-1] + [other]] * TURNS, stop_ids=(other,))
    assert (stopped.turns, stopped.ending, stopped.truncated, stopped.response_ids) == (1, "stopped", False,
                                                                                      turn[:-1] + [other])


def test_metrics_and_turn_seeds(tiny_tokenizer):
    end = tiny_tokenizer.eos_token_id
    turn = encode(tiny_tokenizer, "ab") + [end]
    engine, conversations = countdown(tiny_tokenizer, LIMITS, [turn] * TURNS, n=2)
    _, [capped] = countdown(tiny_tokenizer, ConversationLimits(max_turns=1, max_tokens=400), [turn])
    observation = len(ChatTurns(tiny_tokenizer).observation_ids([{"role": "user", "content": f"{TURNS - 1} left"}]))
    metrics = conversation_metrics(conversations + [capped])
    assert metrics["rollout/turns_mean"] == (2 * TURNS + 1) / 3
    assert metrics["rollout/env_tokens_share"] == 2 * observation / (2 * observation + (2 * TURNS + 1) * len(turn))
    assert metrics["rollout/truncated_share"] == 1 / 3 and metrics["rollout/env_errors"] == 0
    assert metrics["rollout/prefix_cached_share"] == 0.0
    assert len(set(engine.seeds)) == TURNS  # each turn samples with a seed of its own


def test_as_text_gives_the_ids_back_with_the_environment_spans(tiny_tokenizer):
    tokenizer = qwen_tokenizer(tiny_tokenizer)
    end = tokenizer.eos_token_id
    engine = StandInEngine([encode(tokenizer, CALL) + [end], encode(tokenizer, "#### 24") + [end]], end)
    [conversation] = roll_out(engine, ChatTurns(tokenizer, CalculatorEnvironment.tools), CalculatorEnvironment,
                              [ROW], [0], [[1]], SAMPLING, LIMITS)
    text, spans = as_text(conversation, tokenizer)
    # how the trainer reads a given response (trainer/setup.py next_items): the text, then the eos
    encoded = tokenizer(text + tokenizer.eos_token, add_special_tokens=False, return_offsets_mapping=True)
    assert encoded["input_ids"] == conversation.response_ids
    assert response_loss_mask(encoded["offset_mapping"], spans) == conversation.loss_mask


def test_a_template_that_does_not_end_a_turn_with_the_eos_is_refused(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ChatTurnsError, match="does not end an assistant turn with the tokenizer's eos token"):
        ChatTurns(tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ChatTurnsError, match="rollout.env needs a tokenizer with a chat template"):
        ChatTurns(tokenizer)


def test_a_conversation_is_kept_as_it_was_built():
    conversation = Conversation([1, 2])
    conversation._append([3, 4], True, [-1.0, -2.0])
    conversation._append([5], False)
    assert (conversation.response_ids, conversation.loss_mask, conversation.logprobs, conversation.segments) == \
        ([3, 4, 5], [1.0, 1.0, 0.0], [-1.0, -2.0, 0.0], [(True, 2), (False, 1)])
