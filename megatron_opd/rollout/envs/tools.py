"""Tool calls in the Qwen / Hermes format: the assistant calls registered Python functions, the environment
answers with their results.

A call is a block in the assistant's text (several may follow one another):
    <tool_call>
    {"name": "calculator", "arguments": {"expression": "48 / 2"}}
    </tool_call>
Each call gets one message of role "tool" whose content is its result as JSON, or {"error": "..."} for a call
that cannot run (invalid JSON, unknown tool, wrong arguments, a function that raised): the student reads what
was wrong and may try again, the rollout never stops. Qwen2.5/Qwen3 chat templates render a tool message as
"<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>" (consecutive ones share one user
turn), so the content carries no tags of its own. A turn without a call is the final answer: it ends the
conversation, scored like GSM8K when the row has reward_model.ground_truth."""
import inspect
import json
import re
from typing import Callable, Mapping

from transformers.utils import get_json_schema

from megatron_opd.data.gsm8k_score import score as gsm8k_score
from megatron_opd.rollout.envs.base import Environment, Observation, prompt_messages, row_ground_truth

# An unclosed block (a response cut at the length limit) runs to the end of the text and fails as JSON.
_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
CALL_FORMAT = '{"name": <tool name>, "arguments": {<argument>: <value>, ...}}'


class ToolCallError(ValueError):
    """A call that cannot run; its message is what the student reads."""


def tool_schema(name: str, function: Callable) -> dict:
    """`function`'s schema as chat templates take it ({"type": "function", "function": {...}}), from its type
    hints and Google-style docstring (transformers' get_json_schema, which says what is missing), as `name`."""
    schema = get_json_schema(function)
    schema["function"]["name"] = name
    return schema


class ToolEnvironment(Environment):
    """Runs the tools `functions` names (tool name -> function); `tools` holds their schemas for the chat
    template's system prompt. A subclass with a zero-argument __init__ is a `module:Class` for rollout.env."""

    def __init__(self, functions: Mapping[str, Callable]):
        self.functions = dict(functions)
        self.tools = [tool_schema(name, function) for name, function in self.functions.items()]
        self.ground_truth = None

    def start(self, row: dict) -> list[dict]:
        self.ground_truth = row_ground_truth(row)
        return prompt_messages(row)

    def step(self, assistant_text: str) -> Observation:
        blocks = _TOOL_CALL.findall(assistant_text)
        if not blocks:
            reward = 0.0 if self.ground_truth is None else gsm8k_score(assistant_text, str(self.ground_truth))
            return Observation(messages=[], reward=reward, done=True, info={"tool_calls": 0, "tool_errors": 0})
        messages, errors = [], 0
        for block in blocks:
            try:
                content = self.call(block)
            except ToolCallError as err:
                content, errors = json.dumps({"error": str(err)}), errors + 1
            messages.append({"role": "tool", "content": content})
        return Observation(messages=messages, info={"tool_calls": len(blocks), "tool_errors": errors})

    def call(self, block: str) -> str:
        """The result, as JSON, of the call written in `block` (the text between the tags)."""
        try:
            call = json.loads(block)
        except json.JSONDecodeError as err:
            raise ToolCallError(f"invalid JSON in <tool_call> ({err}); write {CALL_FORMAT}") from None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ToolCallError(f"a tool call is {CALL_FORMAT}")
        name, arguments = call["name"], call.get("arguments", {})
        if name not in self.functions:
            raise ToolCallError(f"unknown tool {name!r}; the tools are {', '.join(self.functions)}")
        function = self.functions[name]
        if not isinstance(arguments, dict):
            raise ToolCallError(f"arguments of {name} must be a JSON object, got {json.dumps(arguments)}")
        try:
            inspect.signature(function).bind(**arguments)
        except TypeError as err:
            raise ToolCallError(f"wrong arguments for {name}{inspect.signature(function)}: {err}") from None
        try:
            result = function(**arguments)
        except Exception as err:  # the tool's own failure is the student's to read, not the run's
            raise ToolCallError(f"{name} failed: {type(err).__name__}: {err}") from None
        try:
            return json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ToolCallError(f"{name} returned a result that is not JSON ({err})") from None
