"""What a multi-turn environment is: it opens a conversation from a dataset row, then answers each of the
student's turns with an Observation (its messages, a reward, whether the conversation is over).

One Environment instance serves one conversation (a factory makes a fresh one per row), so it may keep
the conversation's state in attributes. A minimal one:

    class Echo(Environment):
        def start(self, row):
            return prompt_messages(row)

        def step(self, assistant_text):
            return Observation(messages=[], reward=float("42" in assistant_text), done=True)
"""
import abc
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class Observation:
    """The environment's answer to one assistant turn."""
    messages: list[dict]  # chat messages {"role", "content"} (role "user" or "tool"); may be empty when done
    reward: float = 0.0  # the conversation's reward, read when done
    done: bool = False
    info: dict = field(default_factory=dict)  # free, e.g. counts for metrics


class Environment(abc.ABC):
    """One conversation's environment; see the module docstring."""

    # Tool schemas (the `tools=[...]` list apply_chat_template takes) the chat template advertises in the
    # system prompt; none unless the environment runs tools.
    tools: Sequence[dict] = ()

    @abc.abstractmethod
    def start(self, row: dict) -> list[dict]:
        """The conversation's first messages, from a verl-schema row (`prompt`, `reward_model`, `extra_info`)."""

    @abc.abstractmethod
    def step(self, assistant_text: str) -> Observation:
        """The answer to the student's turn `assistant_text`."""


def prompt_messages(row: dict) -> list[dict]:
    """The row's prompt as plain {"role", "content"} dicts (a parquet row's prompt may be an array of
    structs with more fields)."""
    return [{"role": message["role"], "content": message["content"]} for message in row["prompt"]]


def row_ground_truth(row: dict):
    """The row's reward_model.ground_truth, or None when it carries none."""
    return (row.get("reward_model") or {}).get("ground_truth")


def message_problem(messages) -> str:
    """What is wrong with `messages` as chat messages, or "" when nothing is."""
    if not isinstance(messages, (list, tuple)):
        return f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            return f"message {index} is not a {{'role': str, 'content': str}} dict: {message!r:.200}"
    return ""
