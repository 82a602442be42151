"""Tool calls in the Qwen/Hermes format: a call's result comes back as the tool message Qwen's chat template
renders, a bad call (invalid JSON, unknown tool, wrong arguments, a raising tool) gets an error message
instead of a crash, and a turn without a call ends the conversation scored like GSM8K."""
import json

import pytest

from megatron_opd.rollout.envs import CalculatorEnvironment, ToolEnvironment
from tests.rollout.envs.qwen_template import QWEN25_TEMPLATE

ROW = {"prompt": [{"role": "user", "content": "Natalia sold 48 clips in April and half as many in May. How many?"}],
       "reward_model": {"style": "rule", "ground_truth": "72"}}


def call(name, **arguments):
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def started(env=None, row=ROW):
    env = env or CalculatorEnvironment()
    env.start(row)
    return env


def error_of(observation) -> str:
    (message,) = observation.messages
    assert message["role"] == "tool" and not observation.done
    return json.loads(message["content"])["error"]


def test_a_call_comes_back_as_the_tool_message_qwens_template_renders(tiny_tokenizer):
    env = CalculatorEnvironment()
    first = env.start(ROW)
    turn = "In May she sold half.\n" + call("calculator", expression="48 / 2")
    observation = env.step(turn)
    assert observation.messages == [{"role": "tool", "content": "24"}] and not observation.done
    assert observation.info == {"tool_calls": 1, "tool_errors": 0}
    text = tiny_tokenizer.apply_chat_template(first + [{"role": "assistant", "content": turn}] + observation.messages,
                                              tools=env.tools, chat_template=QWEN25_TEMPLATE, tokenize=False,
                                              add_generation_prompt=True)
    assert text.endswith(f"<|im_start|>assistant\n{turn}<|im_end|>\n"
                         "<|im_start|>user\n<tool_response>\n24\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    advertised = text.split("<tools>\n")[1].split("\n</tools>")[0]
    assert json.loads(advertised) == env.tools[0]
    assert env.tools[0]["function"]["name"] == "calculator"
    assert env.tools[0]["function"]["parameters"]["required"] == ["expression"]


def test_several_calls_answer_one_message_each_in_order():
    observation = started().step(call("calculator", expression="48 / 2") + "\n"
                                 + call("calculator", expression="48 + 24"))
    assert observation.messages == [{"role": "tool", "content": "24"}, {"role": "tool", "content": "72"}]
    assert observation.info == {"tool_calls": 2, "tool_errors": 0}


@pytest.mark.parametrize("turn, problem", [
    (call("search", query="clips"), "unknown tool 'search'; the tools are calculator"),
    ("<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"1+1\"}\n</tool_call>",
     "invalid JSON in <tool_call>"),
    ("<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": ", "invalid JSON in <tool_call>"),
    ("<tool_call>\n[\"calculator\"]\n</tool_call>", 'a tool call is {"name": <tool name>'),
    ("<tool_call>\n{\"name\": \"calculator\", \"arguments\": \"1+1\"}\n</tool_call>",
     "arguments of calculator must be a JSON object"),
    (call("calculator"), "wrong arguments for calculator(expression: str) -> float: missing a required argument"),
    (call("calculator", expression="1", base=10), "wrong arguments for calculator"),
    (call("calculator", expression="1 / 0"), "calculator failed: ZeroDivisionError: division by zero"),
    (call("calculator", expression="open('x')"), "calculator failed: ValueError: \"open('x')\" is not allowed"),
])
def test_a_bad_call_gets_an_error_message_not_a_crash(turn, problem):
    observation = started().step(turn)
    assert problem in error_of(observation) and observation.info == {"tool_calls": 1, "tool_errors": 1}


def test_a_result_that_is_not_json_is_an_error_message():
    env = started(ToolEnvironment({"now": now}))
    assert error_of(env.step(call("now"))).startswith("now returned a result that is not JSON")


def now() -> object:
    """The current time, as an object JSON cannot hold."""
    return object()


@pytest.mark.parametrize("answer, reward", [("48 + 24 = 72 #### 72", 1.0), ("#### 71", 0.0), ("72", 0.0)])
def test_a_turn_without_a_call_ends_scored_against_the_ground_truth(answer, reward):
    observation = started().step(answer)
    assert (observation.messages, observation.reward, observation.done) == ([], reward, True)


def test_without_a_ground_truth_the_final_answer_earns_nothing():
    row = {"prompt": ROW["prompt"], "reward_model": {"style": "rule", "ground_truth": None}}
    assert started(row=row).step("#### 72").reward == 0.0
